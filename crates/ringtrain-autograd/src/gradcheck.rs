//! Central finite-difference checks of backward rules.
//!
//! Our tensors are f32, so differences are taken with a step of `eps` (1e-2 by default) on
//! inputs of order one: the truncation error is O(eps²) ≈ 1e-4 and the rounding error about
//! f32 epsilon × |f| / eps ≈ 1e-5, so agreement to `atol + rtol·|numeric|` with
//! atol = rtol = 1e-2 is a meaningful test (a wrong rule is off by O(1)). Non-scalar outputs
//! are reduced to a scalar with fixed pseudo-random weights so every output element counts.

use ringtrain_tensor::{random, Tensor};

use crate::{AutogradError, Graph, Result, Var};

/// Tolerances of [`check`].
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub eps: f32,
    pub atol: f32,
    pub rtol: f32,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            eps: 1e-2,
            atol: 1e-2,
            rtol: 1e-2,
        }
    }
}

/// The first disagreement found.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub input: usize,
    pub element: usize,
    pub analytic: f32,
    pub numeric: f32,
}

/// Compares the analytic gradient of `f` at `inputs` with central differences.
///
/// `f` builds the computation on a fresh tape from one [`Var`] per input.
pub fn check<F, E>(f: F, inputs: &[Tensor], tol: Tolerance) -> Result<Option<Mismatch>, E>
where
    F: Fn(&mut Graph<'static>, &[Var]) -> Result<Var, E>,
    E: From<AutogradError>,
{
    let mut weights: Option<Tensor> = None;
    let mut eval = |values: &[Tensor], record: bool| -> Result<(f32, Vec<Option<Tensor>>), E> {
        let mut g = Graph::standalone();
        let vars: Vec<Var> = values.iter().map(|t| g.variable(t.clone())).collect();
        let out = f(&mut g, &vars)?;
        let w = weights
            .get_or_insert_with(|| random::uniform(g.shape(out), 0.5, 1.5, &mut random::rng(0x5eed)))
            .clone();
        let w = g.input(w);
        let prod = g.mul(out, w)?;
        let loss = g.sum(prod);
        let value = g.value(loss).item().map_err(AutogradError::from)?;
        if !record {
            return Ok((value, Vec::new()));
        }
        let grads = g.backward(loss)?;
        Ok((value, vars.iter().map(|&v| grads.get(v).cloned()).collect()))
    };
    let (_, analytic) = eval(inputs, true)?;
    let mut values = inputs.to_vec();
    for (k, a) in analytic.iter().enumerate() {
        for e in 0..inputs[k].len() {
            let orig = values[k].as_slice()[e];
            values[k].as_mut_slice()[e] = orig + tol.eps;
            let (plus, _) = eval(&values, false)?;
            values[k].as_mut_slice()[e] = orig - tol.eps;
            let (minus, _) = eval(&values, false)?;
            values[k].as_mut_slice()[e] = orig;
            let numeric = (plus - minus) / (2.0 * tol.eps);
            let analytic = a.as_ref().map_or(0.0, |t| t.as_slice()[e]);
            if (analytic - numeric).abs() > tol.atol + tol.rtol * numeric.abs() {
                return Ok(Some(Mismatch {
                    input: k,
                    element: e,
                    analytic,
                    numeric,
                }));
            }
        }
    }
    Ok(None)
}
