//! Elementwise, broadcasting, reduction and softmax kernels.

use ndarray::{Axis, IxDyn, Zip};

use rayon::prelude::*;

use crate::{Result, Tensor, TensorError, PAR_THRESHOLD};

/// Elements per rayon task: large enough that splitting costs nothing next to the work.
const PAR_CHUNK: usize = 1 << 13;

/// Whether an elementwise pass over `len` values goes to rayon: only when it is large and the
/// pool has more than one thread (a one-thread pool would only add a hand-off to its worker).
fn parallel(len: usize) -> bool {
    len >= PAR_THRESHOLD && rayon::current_num_threads() > 1
}

/// NumPy broadcasting: align shapes on the right; each pair of sizes must be equal or one of
/// them 1.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i < n - a.len() { 1 } else { a[i - (n - a.len())] };
        let db = if i < n - b.len() { 1 } else { b[i - (n - b.len())] };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

impl Tensor {
    /// Applies `f` to every element (on rayon above [`PAR_THRESHOLD`] elements).
    pub fn map(&self, f: impl Fn(f32) -> f32 + Sync + Send) -> Tensor {
        let src = self.as_slice();
        let out: Vec<f32> = if parallel(src.len()) {
            src.par_iter().with_min_len(PAR_CHUNK).map(|&x| f(x)).collect()
        } else {
            crate::simd::fast(
                #[inline(always)]
                || src.iter().map(|&x| f(x)).collect(),
            )
        };
        Tensor::from_vec(self.shape(), out).expect("same length as the source")
    }

    /// Combines two tensors elementwise with broadcasting.
    pub fn zip_map(
        &self,
        other: &Tensor,
        op: &'static str,
        f: impl Fn(f32, f32) -> f32 + Sync + Send,
    ) -> Result<Tensor> {
        if self.shape() == other.shape() {
            // Contiguous slices, not an n-d `Zip`: the dynamic-dimension iterator cost more than
            // the arithmetic (it was a sixth of a transformer step with dropout).
            let (a, b) = (self.as_slice(), other.as_slice());
            let out: Vec<f32> = if parallel(a.len()) {
                a.par_iter()
                    .zip(b.par_iter())
                    .with_min_len(PAR_CHUNK)
                    .map(|(&x, &y)| f(x, y))
                    .collect()
            } else {
                crate::simd::fast(
                    #[inline(always)]
                    || a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect(),
                )
            };
            return Tensor::from_vec(self.shape(), out);
        }
        // Fast path for the common bias case: `other` is exactly the trailing axes of `self`
        // (e.g. [batch, features] + [features]); plain chunked loops, no strided iteration.
        if other.ndim() <= self.ndim() && self.shape().ends_with(other.shape()) && !other.is_empty() {
            let b = other.as_slice();
            let mut out = Vec::with_capacity(self.len());
            for chunk in self.as_slice().chunks(b.len()) {
                out.extend(chunk.iter().zip(b).map(|(&x, &y)| f(x, y)));
            }
            return Tensor::from_vec(self.shape(), out);
        }
        // Per-row factors: `other` is `self`'s shape with a last axis of 1 (masks `[rows, 1]`).
        if let (Some((&1, lead_b)), Some((&cols, lead_a))) = (other.shape().split_last(), self.shape().split_last()) {
            if lead_a == lead_b && cols > 0 {
                let mut out = Vec::with_capacity(self.len());
                for (chunk, &y) in self.as_slice().chunks(cols).zip(other.as_slice()) {
                    out.extend(chunk.iter().map(|&x| f(x, y)));
                }
                return Tensor::from_vec(self.shape(), out);
            }
        }
        let shape = broadcast_shape(self.shape(), other.shape()).ok_or_else(|| self.shape_err(op, other))?;
        let a = self
            .data
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| self.shape_err(op, other))?;
        let b = other
            .data
            .broadcast(IxDyn(&shape))
            .ok_or_else(|| self.shape_err(op, other))?;
        Ok(Tensor::from_array(Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y))))
    }

    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.zip_map(other, "add", |a, b| a + b)
    }

    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.zip_map(other, "sub", |a, b| a - b)
    }

    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.zip_map(other, "mul", |a, b| a * b)
    }

    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.zip_map(other, "div", |a, b| a / b)
    }

    pub fn scale(&self, s: f32) -> Tensor {
        self.map(|x| x * s)
    }

    pub fn add_scalar(&self, s: f32) -> Tensor {
        self.map(|x| x + s)
    }

    /// `self += other` for equal shapes (gradient accumulation).
    pub fn add_assign(&mut self, other: &Tensor) -> Result<()> {
        if self.shape() != other.shape() {
            return Err(self.shape_err("add_assign", other));
        }
        let src = other.as_slice();
        let dst = self.as_mut_slice();
        if parallel(dst.len()) {
            dst.par_chunks_mut(PAR_CHUNK)
                .zip(src.par_chunks(PAR_CHUNK))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, &b)| *a += b));
        } else {
            dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }

    fn check_axis(&self, op: &'static str, axis: usize) -> Result<()> {
        if axis >= self.ndim() {
            return Err(TensorError::Axis {
                op,
                axis,
                shape: self.shape().to_vec(),
            });
        }
        Ok(())
    }

    /// Sum along `axis`; with `keepdim` the axis stays with size 1.
    pub fn sum_axis(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_axis("sum_axis", axis)?;
        let s = self.data.sum_axis(Axis(axis));
        Ok(Tensor::from_array(if keepdim { s.insert_axis(Axis(axis)) } else { s }))
    }

    pub fn mean_axis(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        let n = self.shape().get(axis).copied().unwrap_or(1).max(1);
        Ok(self.sum_axis(axis, keepdim)?.scale(1.0 / n as f32))
    }

    /// Maximum along `axis`.
    pub fn max_axis(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_axis("max_axis", axis)?;
        let m = self.data.map_axis(Axis(axis), |lane| {
            lane.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        });
        Ok(Tensor::from_array(if keepdim { m.insert_axis(Axis(axis)) } else { m }))
    }

    /// Index of the maximum of each row of a 2-D tensor (first index on ties).
    pub fn argmax_rows(&self) -> Result<Vec<usize>> {
        if self.ndim() != 2 {
            return Err(TensorError::Invalid {
                op: "argmax_rows",
                reason: format!("expected a 2-D tensor, got shape {:?}", self.shape()),
            });
        }
        Ok(self
            .data
            .lanes(Axis(1))
            .into_iter()
            .map(|row| {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best
            })
            .collect())
    }

    /// Sum of all elements, accumulated in f64 so long vectors do not lose small terms, in
    /// eight independent lanes: one serial f64 chain ran at one add per four cycles, a quarter
    /// of a small convolution's step.
    pub fn sum_all(&self) -> f32 {
        let mut acc = [0.0f64; 8];
        let chunks = self.as_slice().chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x)).sum();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += f64::from(x);
            }
        }
        (acc.iter().sum::<f64>() + tail) as f32
    }

    /// Reduces a broadcast result back to `shape` by summing the broadcast axes: the adjoint of
    /// broadcasting, used by every broadcasting op's backward rule.
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let err = || TensorError::Shape {
            op: "sum_to_shape",
            lhs: self.shape().to_vec(),
            rhs: shape.to_vec(),
        };
        if shape.len() > self.ndim() {
            return Err(err());
        }
        // Fast path: `shape` is the trailing axes (bias gradients): sum the rows directly.
        if self.shape().ends_with(shape) && !shape.is_empty() {
            let n: usize = shape.iter().product();
            let mut acc = vec![0.0f32; n];
            if n > 0 {
                for chunk in self.as_slice().chunks(n) {
                    for (a, &v) in acc.iter_mut().zip(chunk) {
                        *a += v;
                    }
                }
            }
            return Tensor::from_vec(shape, acc);
        }
        let mut data = self.data.clone();
        for _ in 0..self.ndim() - shape.len() {
            data = data.sum_axis(Axis(0));
        }
        for (i, &d) in shape.iter().enumerate() {
            if d == 1 && data.shape()[i] != 1 {
                data = data.sum_axis(Axis(i)).insert_axis(Axis(i));
            } else if d != data.shape()[i] {
                return Err(err());
            }
        }
        Ok(Tensor::from_array(data))
    }

    /// Softmax along `axis`, computed as exp(x - max) / sum so large logits cannot overflow.
    pub fn softmax(&self, axis: usize) -> Result<Tensor> {
        self.check_axis("softmax", axis)?;
        let mut out = self.data.clone();
        for mut lane in out.lanes_mut(Axis(axis)) {
            let max = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            lane.mapv_inplace(|x| {
                let e = (x - max).exp();
                sum += e;
                e
            });
            lane.mapv_inplace(|e| e / sum);
        }
        Ok(Tensor::from_array(out))
    }

    /// log(softmax(x)) along `axis`, as x - max - log(sum(exp(x - max))).
    pub fn log_softmax(&self, axis: usize) -> Result<Tensor> {
        self.check_axis("log_softmax", axis)?;
        let mut out = self.data.clone();
        for mut lane in out.lanes_mut(Axis(axis)) {
            let max = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + lane.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
            lane.mapv_inplace(|x| x - lse);
        }
        Ok(Tensor::from_array(out))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape, v.to_vec()).unwrap()
    }

    #[test]
    fn broadcasting_follows_numpy_rules() {
        assert_eq!(broadcast_shape(&[2, 3], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2, 1], &[1, 3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[2]), None);
        let a = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        let b = t(&[3], &[10., 20., 30.]);
        assert_eq!(a.add(&b).unwrap().to_vec(), vec![11., 22., 33., 14., 25., 36.]);
        let col = t(&[2, 1], &[1., 2.]);
        assert_eq!(a.mul(&col).unwrap().to_vec(), vec![1., 2., 3., 8., 10., 12.]);
        // the general broadcast path gives the same as the per-row fast path
        let rows = t(&[1, 2, 1], &[1., 2.]);
        assert_eq!(a.mul(&rows).unwrap().to_vec(), vec![1., 2., 3., 8., 10., 12.]);
        assert_eq!(col.sub(&a).unwrap().to_vec(), vec![0., -1., -2., -2., -3., -4.]);
        assert!(a.add(&t(&[2], &[1., 2.])).is_err());
    }

    #[test]
    fn parallel_path_equals_serial_path() {
        let n = PAR_THRESHOLD + 17;
        let a = Tensor::from_vec(&[n], (0..n).map(|i| i as f32 * 0.5).collect()).unwrap();
        let b = a.map(|x| x * 2.0 + 1.0);
        let c = a.add(&a).unwrap().add_scalar(1.0);
        assert_eq!(b, c);
    }

    #[test]
    fn sum_to_shape_undoes_broadcast() {
        let g = Tensor::ones(&[4, 2, 3]);
        assert_eq!(g.sum_to_shape(&[3]).unwrap().to_vec(), vec![8., 8., 8.]);
        assert_eq!(g.sum_to_shape(&[2, 1]).unwrap().to_vec(), vec![12., 12.]);
        assert!(g.sum_to_shape(&[5]).is_err());
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let x = t(&[2, 3], &[1000., 1001., 1002., -5., 0., 5.]);
        let s = x.softmax(1).unwrap();
        assert!(s.as_slice().iter().all(|v| v.is_finite()));
        for row in s.as_slice().chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let ls = x.log_softmax(1).unwrap();
        for (a, b) in ls.as_slice().iter().zip(s.as_slice()) {
            assert!((a.exp() - b).abs() < 1e-5, "{a} {b}");
        }
        // softmax is shift-invariant
        let shifted = x.add_scalar(-1000.0).softmax(1).unwrap();
        for (a, b) in shifted.as_slice().iter().zip(s.as_slice()) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn reductions_along_axes() {
        let a = t(&[2, 3], &[1., 5., 3., 4., 2., 6.]);
        assert_eq!(a.sum_axis(0, false).unwrap().to_vec(), vec![5., 7., 9.]);
        assert_eq!(a.sum_axis(1, true).unwrap().shape(), &[2, 1]);
        assert_eq!(a.max_axis(1, false).unwrap().to_vec(), vec![5., 6.]);
        assert_eq!(a.mean_axis(1, false).unwrap().to_vec(), vec![3., 4.]);
        assert_eq!(a.argmax_rows().unwrap(), vec![1, 2]);
        assert_eq!(a.sum_all(), 21.0);
        assert!(a.sum_axis(2, false).is_err());
    }
}
