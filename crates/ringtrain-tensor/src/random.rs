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
}
