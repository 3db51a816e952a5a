//! Matrix products through BLAS sgemm.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, Axis, Ix3};

use crate::{threads, Result, Tensor, TensorError, TensorRef};

/// Multiply-adds from which a product on several rayon threads is split among them: the
/// benches' LSTM input projection and weight gradients (2²⁶ and 2²⁷), not an MLP's or a
/// transformer's layers (at most 2²⁵), whose products are too short to hand to other threads.
const SPLIT_MACS: usize = 1 << 26;

/// `c = alpha·a·b + beta·c` through OpenBLAS.
///
/// A product of at least [`SPLIT_MACS`] on several rayon threads runs as one single-threaded
/// OpenBLAS call per thread, each on a block of c's rows. OpenBLAS's own workers spin for
/// about 0.1 s after each call they share, and through the rayon kernels between products
/// (an LSTM's recurrence) that spinning took a core's share from the rayon threads: a fifth
/// of the samples of a 2-thread LSTM step. Every element of c is the same kernel's sum, in the
/// same order, whichever block computes it, so the split does not change the bits.
pub(crate) fn gemm(
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    beta: f32,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    let parts = rayon::current_num_threads();
    let (m, k) = a.dim();
    if parts < 2 || m < parts || m * k * b.ncols() < SPLIT_MACS {
        general_mat_mul(alpha, a, b, beta, c);
        return;
    }
    let rows = m.div_ceil(parts);
    let _one = threads::BlasThreads::one();
    let blocks: Vec<_> = c
        .axis_chunks_iter_mut(Axis(0), rows)
        .zip(a.axis_chunks_iter(Axis(0), rows))
        .collect();
    use rayon::prelude::*;
    blocks
        .into_par_iter()
        .for_each(|(mut cb, ab)| general_mat_mul(alpha, &ab, b, beta, &mut cb));
}

fn view2<'a>(t: impl Into<TensorRef<'a>>, op: &'static str) -> Result<ArrayView2<'a, f32>> {
    let t = t.into();
    match *t.shape() {
        [r, c] => Ok(ArrayView2::from_shape((r, c), t.as_slice()).expect("a TensorRef's sizes agree")),
        _ => Err(TensorError::Invalid {
            op,
            reason: format!("expected a 2-D tensor, got shape {:?}", t.shape()),
        }),
    }
}

/// `[..., n]` as `(rows, n)`.
fn rows_cols(t: &Tensor, op: &'static str) -> Result<(usize, usize)> {
    match t.shape().split_last() {
        Some((&n, lead)) if !lead.is_empty() => Ok((lead.iter().product(), n)),
        _ => Err(TensorError::Invalid {
            op,
            reason: format!("expected at least 2 axes [.., features], got shape {:?}", t.shape()),
        }),
    }
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
                // beta = 1 on a zeroed buffer: BLAS then skips its own pass zeroing C
                gemm(1.0, &a, &b, 1.0, &mut out.view_mut());
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
                    general_mat_mul(1.0, &a, &b, 1.0, &mut c);
                }
                Ok(Tensor::from_array(out.into_dyn()))
            }
            _ => Err(self.shape_err(OP, other)),
        }
    }

    /// `x · wᵀ + b` over the last axis (PyTorch's `F.linear`), one sgemm for all leading axes.
    ///
    /// The leading axes are folded into rows of the product from the contiguous data, with no
    /// reshape copy, and the bias is the initial `C` of the sgemm (`beta = 1`) rather than a
    /// second pass over the output.
    ///
    /// # Shapes
    /// `self: [..., in]`, `w: [out, in]`, `b: [out]` → `[..., out]`.
    pub fn linear<'w>(&self, w: impl Into<TensorRef<'w>>, b: Option<TensorRef<'_>>) -> Result<Tensor> {
        const OP: &str = "linear";
        let (rows, inp) = rows_cols(self, OP)?;
        let w = w.into();
        let wv = view2(w, OP)?;
        let out_f = wv.nrows();
        if wv.ncols() != inp || b.is_some_and(|b| b.shape() != [out_f]) {
            return Err(TensorError::Invalid {
                op: OP,
                reason: format!(
                    "input {:?}, weight {:?} and bias {:?} do not fit [.., in] · [out, in]ᵀ + [out]",
                    self.shape(),
                    w.shape(),
                    b.map(|b| b.shape())
                ),
            });
        }
        let mut out = Vec::with_capacity(rows * out_f);
        match b {
            Some(b) => (0..rows).for_each(|_| out.extend_from_slice(b.as_slice())),
            None => out.resize(rows * out_f, 0.0),
        }
        let mut c = ndarray::Array2::from_shape_vec((rows, out_f), out).map_err(|e| TensorError::Invalid {
            op: OP,
            reason: e.to_string(),
        })?;
        let x = ArrayView2::from_shape((rows, inp), self.as_slice()).map_err(|e| TensorError::Invalid {
            op: OP,
            reason: e.to_string(),
        })?;
        // beta = 1: C holds the bias rows, or zeros (BLAS then skips its own zeroing pass)
        gemm(1.0, &x, &wv.t(), 1.0, &mut c.view_mut());
        let mut shape = self.shape().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out_f;
        }
        Tensor::from_vec(&shape, c.into_raw_vec_and_offset().0)
    }

    /// Gradients of [`Tensor::linear`] for the parts asked for: `(dx, dw, db)`, with
    /// `dx = g · w`, `dw = gᵀ · x`, `db = Σ_rows g`.
    pub fn linear_backward(g: &Tensor, x: &Tensor, w: TensorRef<'_>, need: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
        const OP: &str = "linear backward";
        let (rows, inp) = rows_cols(x, OP)?;
        let (grows, out_f) = rows_cols(g, OP)?;
        let wv = view2(w, OP)?;
        if grows != rows || wv.dim() != (out_f, inp) {
            return Err(g.shape_err(OP, x));
        }
        let gv = ArrayView2::from_shape((rows, out_f), g.as_slice()).map_err(|e| TensorError::Invalid {
            op: OP,
            reason: e.to_string(),
        })?;
        let xv = ArrayView2::from_shape((rows, inp), x.as_slice()).map_err(|e| TensorError::Invalid {
            op: OP,
            reason: e.to_string(),
        })?;
        let dx = if need[0] {
            let mut dx = ndarray::Array2::<f32>::zeros((rows, inp));
            // beta = 1 on a zeroed buffer: BLAS then skips its own pass zeroing C
            gemm(1.0, &gv, &wv, 1.0, &mut dx.view_mut());
            Some(Tensor::from_vec(x.shape(), dx.into_raw_vec_and_offset().0)?)
        } else {
            None
        };
        let dw = if need[1] {
            let mut dw = ndarray::Array2::<f32>::zeros((out_f, inp));
            gemm(1.0, &gv.t(), &xv, 1.0, &mut dw.view_mut());
            Some(Tensor::from_array(dw.into_dyn()))
        } else {
            None
        };
        let db = if need[2] {
            let mut acc = vec![0.0f32; out_f];
            for row in g.as_slice().chunks_exact(out_f.max(1)) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            Some(Tensor::from_vec(&[out_f], acc)?)
        } else {
            None
        };
        Ok([dx, dw, db])
    }

    /// The weight gradient `gᵀ · x` of [`Tensor::linear`] written over `dw` (`[out, in]`, row
    /// major), with the same bits as [`Tensor::linear_backward`]'s.
    pub fn linear_weight_grad_into(g: &Tensor, x: &Tensor, dw: &mut [f32]) -> Result<()> {
        const OP: &str = "linear backward";
        let (rows, inp) = rows_cols(x, OP)?;
        let (grows, out_f) = rows_cols(g, OP)?;
        if grows != rows || dw.len() != out_f * inp {
            return Err(g.shape_err(OP, x));
        }
        let gv = ArrayView2::from_shape((rows, out_f), g.as_slice()).expect("sizes checked above");
        let xv = ArrayView2::from_shape((rows, inp), x.as_slice()).expect("sizes checked above");
        dw.fill(0.0);
        let mut c = ArrayViewMut2::from_shape((out_f, inp), dw).expect("sizes checked above");
        gemm(1.0, &gv.t(), &xv, 1.0, &mut c);
        Ok(())
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

    #[test]
    fn a_product_split_among_threads_gives_the_same_bits() {
        // 2²⁶ multiply-adds (split on two threads) with a transposed left operand, as the
        // weight gradients have, and an odd row count
        let (m, k, n) = (1023, 256, 257);
        let mut rng = crate::random::rng(5);
        let a = crate::random::uniform(&[k, m], -1.0, 1.0, &mut rng);
        let b = crate::random::uniform(&[k, n], -1.0, 1.0, &mut rng);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| a.matmul_t(&b, true, false).unwrap())
        };
        let one = on(1);
        assert_eq!(one.as_slice(), on(2).as_slice());
        assert_eq!(one.as_slice(), on(3).as_slice());
    }

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
    fn linear_equals_matmul_plus_bias_on_any_leading_axes() {
        let mut rng = crate::random::rng(5);
        let x = crate::random::uniform(&[2, 3, 4], -1.0, 1.0, &mut rng);
        let w = crate::random::uniform(&[5, 4], -1.0, 1.0, &mut rng);
        let b = crate::random::uniform(&[5], -1.0, 1.0, &mut rng);
        let y = x.linear(&w, Some((&b).into())).unwrap();
        assert_eq!(y.shape(), &[2, 3, 5]);
        let want = x
            .reshape(&[6, 4])
            .unwrap()
            .matmul_t(&w, false, true)
            .unwrap()
            .add(&b)
            .unwrap();
        for (a, c) in y.as_slice().iter().zip(want.as_slice()) {
            assert!((a - c).abs() < 1e-5);
        }
        assert!(x.linear(&w.t().unwrap(), None).is_err());
    }

    #[test]
    fn mismatched_inner_dimension_names_both_shapes() {
        let a = Tensor::zeros(&[2, 3]);
        let b = Tensor::zeros(&[4, 5]);
        let err = a.matmul(&b).unwrap_err();
        assert_eq!(err.to_string(), "matmul: shapes [2, 3] and [4, 5] are incompatible");
    }
}
