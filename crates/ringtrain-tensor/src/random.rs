//! Seeded random tensors. There is deliberately no unseeded constructor: every random number
//! in ringtrain comes from a [`Rng`] built from an explicit seed.

use rand::Rng as _;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::Tensor;

/// The generator used throughout ringtrain: fast, portable and reproducible across platforms.
pub type Rng = rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> Rng {
    Rng::seed_from_u64(seed)
}

/// Values drawn uniformly from `[low, high)`.
pub fn uniform(shape: &[usize], low: f32, high: f32, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let values = if low < high {
        let dist = Uniform::new(low, high).expect("low < high was checked");
        (0..n).map(|_| dist.sample(rng)).collect()
    } else {
        vec![low; n]
    };
    Tensor::from_vec(shape, values).expect("length matches shape by construction")
}

/// Values drawn from a normal distribution N(0, std²).
pub fn normal(shape: &[usize], std: f32, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let values = match Normal::new(0.0f32, std.abs()) {
        Ok(dist) => (0..n).map(|_| dist.sample(rng)).collect(),
        Err(_) => vec![0.0; n],
    };
    Tensor::from_vec(shape, values).expect("length matches shape by construction")
}

/// A Bernoulli(p) mask of 0.0/1.0 values.
pub fn bernoulli(shape: &[usize], p: f64, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|_| if rng.random_bool(p.clamp(0.0, 1.0)) { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(shape, values).expect("length matches shape by construction")
}

/// Keep/drop decisions with probability `keep` of keeping, from 16 random bits each.
///
/// Dropout masks are the largest random draws of a training step: four decisions come from
/// each u64 draw and are compared without branches; 1/65536 resolution on `keep` is far below
/// anything training can notice.
#[derive(Debug, Clone, Copy)]
pub struct KeepSampler {
    threshold: u32,
}

impl KeepSampler {
    pub fn new(keep: f64) -> KeepSampler {
        KeepSampler {
            threshold: (keep.clamp(0.0, 1.0) * 65536.0).round() as u32,
        }
    }

    /// Calls `f(i, keep)` for `i` in `0..n`, in order.
    #[inline]
    pub fn decide(&self, rng: &mut Rng, n: usize, mut f: impl FnMut(usize, bool)) {
        use rand::RngCore as _;
        let mut i = 0;
        while i < n {
            let w = rng.next_u64();
            for k in 0..4.min(n - i) {
                f(i + k, u32::from((w >> (16 * k)) as u16) < self.threshold);
            }
            i += 4;
        }
    }
}

/// An inverted-dropout mask: each value is 0 with probability `p`, else `1/(1 − p)`.
pub fn dropout_mask(shape: &[usize], p: f64, rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let keep = (1.0 - p).clamp(0.0, 1.0);
    let scale = if keep > 0.0 { (1.0 / keep) as f32 } else { 0.0 };
    let mut values = vec![0.0f32; n];
    KeepSampler::new(keep).decide(rng, n, |i, k| values[i] = if k { scale } else { 0.0 });
    Tensor::from_vec(shape, values).expect("length matches shape by construction")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_different_seed_different_values() {
        let a = uniform(&[16], -1.0, 1.0, &mut rng(7));
        let b = uniform(&[16], -1.0, 1.0, &mut rng(7));
        let c = uniform(&[16], -1.0, 1.0, &mut rng(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.as_slice().iter().all(|v| (-1.0..1.0).contains(v)));
    }

    #[test]
    fn dropout_mask_keeps_the_expectation() {
        let m = dropout_mask(&[100_000], 0.2, &mut rng(3));
        let mean = m.sum_all() / m.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert!(m.as_slice().iter().all(|&v| v == 0.0 || v == 1.25));
    }
}
