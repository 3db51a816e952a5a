//! Seeded weight initialisers.

use ringtrain_tensor::random::{self, Rng};
use ringtrain_tensor::Tensor;

/// How a weight matrix `[fan_out, fan_in, ...]` is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Glorot & Bengio (2010): U(±√(6/(fan_in+fan_out))); suits tanh/sigmoid layers.
    XavierUniform,
    /// He et al. (2015): N(0, 2/fan_in); suits ReLU layers.
    HeNormal,
    /// PyTorch's `nn.Linear` default: U(±1/√fan_in).
    LecunUniform,
}

impl Init {
    pub fn sample(self, shape: &[usize], fan_in: usize, fan_out: usize, rng: &mut Rng) -> Tensor {
        let (fi, fo) = (fan_in.max(1) as f32, fan_out.max(1) as f32);
        match self {
            Init::XavierUniform => {
                let a = (6.0 / (fi + fo)).sqrt();
                random::uniform(shape, -a, a, rng)
            }
            Init::HeNormal => random::normal(shape, (2.0 / fi).sqrt(), rng),
            Init::LecunUniform => {
                let a = 1.0 / fi.sqrt();
                random::uniform(shape, -a, a, rng)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_the_formulas() {
        let mut rng = random::rng(1);
        let x = Init::XavierUniform.sample(&[100, 200], 200, 100, &mut rng);
        let bound = (6.0f32 / 300.0).sqrt();
        assert!(x.as_slice().iter().all(|v| v.abs() <= bound));
        let h = Init::HeNormal.sample(&[200, 400], 400, 200, &mut rng);
        let var = h.as_slice().iter().map(|v| v * v).sum::<f32>() / h.len() as f32;
        assert!((var - 2.0 / 400.0).abs() < 0.1 * 2.0 / 400.0, "variance {var}");
    }
}
