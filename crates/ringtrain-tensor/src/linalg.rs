//! Matrix products through BLAS sgemm.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, Axis, Ix2, Ix3};

use crate::{Result, Tensor, TensorError};

fn view2<'a>(t: &'a Tensor, op: &'static str) -> Result<ArrayView2<'a, f32>> {
    t.data
        .view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| TensorError::Invalid {
            op,
            reason: format!("expected a 2-D tensor, got shape {:?}", t.shape()),
        })
}

fn maybe_t(v: ArrayView2<'_, f32>, transpose: bool) -> ArrayView2<'_, f32> {
    if transpose {
        v.reversed_axes()
    } else {
        v
    }
}

impl Tensor {
    /// `self · other` for 2-D tensors; see [`Tensor::matmul_t`].
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        self.matmul_t(other, false, false)
    }

    /// `op(self) · op(other)`, where `op` transposes when its flag is set.
    ///
    /// Transposition is a stride swap: ndarray hands the transposed view to `cblas_sgemm` with
    /// the matching `Trans` flag, so no operand is copied.
    ///
    /// # Shapes
    /// - 2-D × 2-D: `[m, k] · [k, n] -> [m, n]` (after the optional transposes);
    /// - 3-D × 3-D: batched, `[b, m, k] · [b, k, n] -> [b, m, n]`, one sgemm per batch entry.
    pub fn matmul_t(&self, other: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul";
        match (self.ndim(), other.ndim()) {
            (2, 2) => {
                let a = maybe_t(view2(self, OP)?, trans_a);
                let b = maybe_t(view2(other, OP)?, trans_b);
                if a.ncols() != b.nrows() {
                    return Err(self.shape_err(OP, other));
                }
                let mut out = ndarray::Array2::<f32>::zeros((a.nrows(), b.ncols()));
                general_mat_mul(1.0, &a, &b, 0.0, &mut out);
                Ok(Tensor::from_array(out.into_dyn()))
            }
            (3, 3) => {
                let a3 = self
                    .data
                    .view()
                    .into_dimensionality::<Ix3>()
                    .map_err(|_| self.shape_err(OP, other))?;
                let b3 = other
                    .data
                    .view()
                    .into_dimensionality::<Ix3>()
                    .map_err(|_| self.shape_err(OP, other))?;
                let batch = a3.len_of(Axis(0));
                if b3.len_of(Axis(0)) != batch {
                    return Err(self.shape_err(OP, other));
                }
                let (m, k) = if trans_a {
                    (a3.dim().2, a3.dim().1)
                } else {
                    (a3.dim().1, a3.dim().2)
                };
                let (k2, n) = if trans_b {
                    (b3.dim().2, b3.dim().1)
                } else {
                    (b3.dim().1, b3.dim().2)
                };
                if k != k2 {
                    return Err(self.shape_err(OP, other));
                }
                let mut out = ndarray::Array3::<f32>::zeros((batch, m, n));
                for i in 0..batch {
                    let a = maybe_t(a3.index_axis(Axis(0), i), trans_a);
                    let b = maybe_t(b3.index_axis(Axis(0), i), trans_b);
                    let mut c = out.index_axis_mut(Axis(0), i);
                    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
                }
                Ok(Tensor::from_array(out.into_dyn()))
            }
            _ => Err(self.shape_err(OP, other)),
        }
    }

    pub(crate) fn shape_err(&self, op: &'static str, other: &Tensor) -> TensorError {
        TensorError::Shape {
            op,
            lhs: self.shape().to_vec(),
            rhs: other.shape().to_vec(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Triple loop in f64: the reference sgemm is checked against.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    acc += f64::from(av) * f64::from(bv);
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn sgemm_matches_naive(m in 1usize..20, k in 1usize..20, n in 1usize..20, ta: bool, tb: bool, seed: u64) {
            let mut rng = crate::random::rng(seed);
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let a = crate::random::uniform(&a_shape, -1.0, 1.0, &mut rng);
            let b = crate::random::uniform(&b_shape, -1.0, 1.0, &mut rng);
            let c = a.matmul_t(&b, ta, tb).unwrap();
            prop_assert_eq!(c.shape(), &[m, n]);
            let want = naive(a.as_slice(), b.as_slice(), m, k, n, ta, tb);
            for (x, y) in c.as_slice().iter().zip(&want) {
                prop_assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }

        #[test]
        fn batched_matches_per_batch(b in 1usize..4, m in 1usize..8, k in 1usize..8, n in 1usize..8, tb: bool, seed: u64) {
            let mut rng = crate::random::rng(seed);
            let a = crate::random::uniform(&[b, m, k], -1.0, 1.0, &mut rng);
            let bs = if tb { [b, n, k] } else { [b, k, n] };
            let w = crate::random::uniform(&bs, -1.0, 1.0, &mut rng);
            let c = a.matmul_t(&w, false, tb).unwrap();
            for i in 0..b {
                let ai = &a.as_slice()[i * m * k..(i + 1) * m * k];
                let wi = &w.as_slice()[i * k * n..(i + 1) * k * n];
                let want = naive(ai, wi, m, k, n, false, tb);
                for (x, y) in c.as_slice()[i * m * n..(i + 1) * m * n].iter().zip(&want) {
                    prop_assert!((x - y).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn mismatched_inner_dimension_names_both_shapes() {
        let a = Tensor::zeros(&[2, 3]);
        let b = Tensor::zeros(&[4, 5]);
        let err = a.matmul(&b).unwrap_err();
        assert_eq!(err.to_string(), "matmul: shapes [2, 3] and [4, 5] are incompatible");
    }
}
