//! Training losses. All are means over the batch (PyTorch's `reduction="mean"`).

use ringtrain_autograd::{Graph, Tensor, Var};

use crate::{NnError, Result};

/// What a batch is compared against.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices, one per example.
    Classes(Vec<usize>),
    /// Real values (regression) or 0/1 labels (binary cross-entropy), shaped like the output.
    Values(Tensor),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Mean squared error.
    Mse,
    /// Mean absolute error.
    Mae,
    /// Binary cross-entropy of sigmoid(logits), computed stably from the logits.
    BinaryCrossEntropy,
    /// Softmax cross-entropy of logits `[batch, classes]` against class indices.
    CrossEntropy,
}

impl Loss {
    pub fn compute(self, g: &mut Graph<'_>, output: Var, targets: &Targets) -> Result<Var> {
        let mismatch = |what: &str| NnError::Layer {
            layer: "loss".into(),
            reason: format!("{self:?} needs {what}"),
        };
        match (self, targets) {
            (Loss::Mse | Loss::Mae | Loss::BinaryCrossEntropy, Targets::Values(t)) => {
                let t = if t.shape() == g.shape(output) {
                    t.clone()
                } else {
                    t.reshape(g.shape(output))
                        .map_err(|_| mismatch("targets shaped like the output"))?
                };
                match self {
                    Loss::BinaryCrossEntropy => Ok(g.bce_with_logits(output, t)?),
                    _ => {
                        let t = g.input(t);
                        let d = g.sub(output, t)?;
                        let e = if self == Loss::Mse { g.square(d) } else { g.abs(d) };
                        Ok(g.mean(e))
                    }
                }
            }
            (Loss::CrossEntropy, Targets::Classes(c)) => Ok(g.cross_entropy(output, c)?),
            (Loss::CrossEntropy, _) => Err(mismatch("class indices")),
            _ => Err(mismatch("real-valued targets")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ringtrain_autograd::gradcheck::{check, Tolerance};

    #[test]
    fn values_match_definitions() {
        let mut g = Graph::standalone();
        let y = g.variable(Tensor::from_vec(&[2, 1], vec![1.0, 4.0]).unwrap());
        let target = Targets::Values(Tensor::from_vec(&[2], vec![0.0, 2.0]).unwrap());
        let mse = Loss::Mse.compute(&mut g, y, &target).unwrap();
        let mae = Loss::Mae.compute(&mut g, y, &target).unwrap();
        assert_eq!(g.value(mse).item().unwrap(), 2.5);
        assert_eq!(g.value(mae).item().unwrap(), 1.5);
        assert!(Loss::CrossEntropy.compute(&mut g, y, &target).is_err());
    }

    #[test]
    fn every_loss_passes_gradcheck() {
        let out = Tensor::from_vec(&[3, 2], vec![0.3, -1.2, 2.0, 0.7, -0.4, 1.1]).unwrap();
        let vals = Targets::Values(Tensor::from_vec(&[3, 2], vec![1.0, 0.0, 0.5, 1.5, -1.0, 0.0]).unwrap());
        let bin = Targets::Values(Tensor::from_vec(&[3, 2], vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0]).unwrap());
        let cls = Targets::Classes(vec![1, 0, 1]);
        for (loss, targets) in [
            (Loss::Mse, &vals),
            (Loss::Mae, &vals),
            (Loss::BinaryCrossEntropy, &bin),
            (Loss::CrossEntropy, &cls),
        ] {
            let res = check(
                |g, v| loss.compute(g, v[0], targets),
                std::slice::from_ref(&out),
                Tolerance::default(),
            )
            .unwrap();
            assert!(res.is_none(), "{loss:?}: {res:?}");
        }
    }
}
