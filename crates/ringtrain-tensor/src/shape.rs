//! Shape manipulation: reshape, permute, slice, concat, gather (index_select) and its adjoint.

use ndarray::{Axis, IxDyn};

use crate::{Result, Tensor, TensorError};

impl Tensor {
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(TensorError::Shape {
                op: "reshape",
                lhs: self.shape().to_vec(),
                rhs: shape.to_vec(),
            });
        }
        Tensor::from_vec(shape, self.to_vec())
    }

    /// Reorders the axes (`axes[i]` is the source axis of output axis `i`); the result is
    /// copied into standard layout.
    pub fn permute(&self, axes: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.ndim()];
        if axes.len() != self.ndim()
            || axes
                .iter()
                .any(|&a| a >= self.ndim() || std::mem::replace(&mut seen[a], true))
        {
            return Err(TensorError::Invalid {
                op: "permute",
                reason: format!("{axes:?} is not a permutation of the axes of shape {:?}", self.shape()),
            });
        }
        Ok(Tensor::from_array(
            self.data.view().permuted_axes(IxDyn(axes)).to_owned(),
        ))
    }

    /// Transpose of a 2-D tensor.
    pub fn t(&self) -> Result<Tensor> {
        if self.ndim() != 2 {
            return Err(TensorError::Invalid {
                op: "transpose",
                reason: format!("expected a 2-D tensor, got shape {:?}", self.shape()),
            });
        }
        self.permute(&[1, 0])
    }

    /// Elements `start..end` along `axis`.
    pub fn slice_axis(&self, axis: usize, start: usize, end: usize) -> Result<Tensor> {
        let len = *self.shape().get(axis).ok_or_else(|| TensorError::Axis {
            op: "slice_axis",
            axis,
            shape: self.shape().to_vec(),
        })?;
        if start > end || end > len {
            return Err(TensorError::Invalid {
                op: "slice_axis",
                reason: format!(
                    "range {start}..{end} out of bounds for axis {axis} of shape {:?}",
                    self.shape()
                ),
            });
        }
        // (outer, len·inner) blocks: each kept block is one contiguous copy, where the n-d
        // strided iterator visited element by element (LSTM gates and time steps)
        let inner: usize = self.shape()[axis + 1..].iter().product();
        let (src_block, dst_block) = (len * inner, (end - start) * inner);
        let mut out = Vec::with_capacity(self.len() / len.max(1) * (end - start));
        if src_block > 0 {
            for block in self.as_slice().chunks_exact(src_block) {
                out.extend_from_slice(&block[start * inner..start * inner + dst_block]);
            }
        }
        let mut shape = self.shape().to_vec();
        shape[axis] = end - start;
        Tensor::from_vec(&shape, out)
    }

    /// Adds `src` into the elements `start..start + src.shape()[axis]` along `axis` (the adjoint
    /// of [`Tensor::slice_axis`]).
    pub fn slice_axis_add(&mut self, axis: usize, start: usize, src: &Tensor) -> Result<()> {
        let (lhs, rhs) = (self.shape().to_vec(), src.shape().to_vec());
        let bad = || TensorError::Shape {
            op: "slice_axis_add",
            lhs: lhs.clone(),
            rhs: rhs.clone(),
        };
        if axis >= self.ndim() || src.ndim() != self.ndim() || start + src.shape()[axis] > self.shape()[axis] {
            return Err(bad());
        }
        let same_other_axes = (0..self.ndim()).all(|a| a == axis || self.shape()[a] == src.shape()[a]);
        if !same_other_axes {
            return Err(bad());
        }
        let inner: usize = self.shape()[axis + 1..].iter().product();
        let (dst_block, src_block) = (self.shape()[axis] * inner, src.shape()[axis] * inner);
        if dst_block == 0 || src_block == 0 {
            return Ok(());
        }
        for (d, s) in self
            .as_mut_slice()
            .chunks_exact_mut(dst_block)
            .zip(src.as_slice().chunks_exact(src_block))
        {
            d[start * inner..start * inner + src_block]
                .iter_mut()
                .zip(s)
                .for_each(|(a, &b)| *a += b);
        }
        Ok(())
    }

    /// Joins tensors along `axis`; all other axes must agree.
    pub fn concat(axis: usize, parts: &[&Tensor]) -> Result<Tensor> {
        if parts.is_empty() {
            return Err(TensorError::Invalid {
                op: "concat",
                reason: "no tensors to concatenate".into(),
            });
        }
        let views: Vec<_> = parts.iter().map(|t| t.data.view()).collect();
        ndarray::concatenate(Axis(axis), &views)
            .map(Tensor::from_array)
            .map_err(|_| TensorError::Invalid {
                op: "concat",
                reason: format!(
                    "cannot join shapes {:?} along axis {axis}",
                    parts.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>()
                ),
            })
    }

    /// Picks entries `indices` along `axis` (rows of an embedding table, a minibatch of rows).
    pub fn index_select(&self, axis: usize, indices: &[usize]) -> Result<Tensor> {
        let len = *self.shape().get(axis).ok_or_else(|| TensorError::Axis {
            op: "index_select",
            axis,
            shape: self.shape().to_vec(),
        })?;
        if axis == 0 {
            // checks the indices itself
            return Tensor::select_rows(self.as_slice(), self.shape(), indices);
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(TensorError::Invalid {
                op: "index_select",
                reason: format!("index {bad} out of range for axis {axis} of length {len}"),
            });
        }
        Ok(Tensor::from_array(self.data.select(Axis(axis), indices)))
    }

    /// `index_select(0, indices)` of the tensor of `shape` whose elements are `src`, read in
    /// place: an embedding lookup straight from a parameter store. Rows are copied as slices
    /// (ndarray's `select` goes element by element).
    pub fn select_rows(src: &[f32], shape: &[usize], indices: &[usize]) -> Result<Tensor> {
        let len = shape.first().copied().unwrap_or(0);
        if shape.is_empty() || shape.iter().product::<usize>() != src.len() {
            return Err(TensorError::Invalid {
                op: "select_rows",
                reason: format!("{} elements cannot be a tensor of shape {shape:?}", src.len()),
            });
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
            return Err(TensorError::Invalid {
                op: "index_select",
                reason: format!("index {bad} out of range for axis 0 of length {len}"),
            });
        }
        let row = src.len() / len.max(1);
        let mut out = Vec::with_capacity(indices.len() * row);
        for &i in indices {
            out.extend_from_slice(&src[i * row..][..row]);
        }
        let mut shape = shape.to_vec();
        shape[0] = indices.len();
        Tensor::from_vec(&shape, out)
    }

    /// The adjoint of [`Tensor::index_select`]: adds `src`'s entries into a zero tensor of
    /// `shape` at `indices` along `axis`; repeated indices accumulate.
    pub fn index_add(shape: &[usize], axis: usize, indices: &[usize], src: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(shape);
        let bad = || TensorError::Shape {
            op: "index_add",
            lhs: shape.to_vec(),
            rhs: src.shape().to_vec(),
        };
        if axis >= shape.len() || src.ndim() != shape.len() || src.shape()[axis] != indices.len() {
            return Err(bad());
        }
        if let Some(&i) = indices.iter().find(|&&i| i >= shape[axis]) {
            return Err(TensorError::Invalid {
                op: "index_add",
                reason: format!("index {i} out of range for axis {axis} of length {}", shape[axis]),
            });
        }
        if axis == 0 && src.shape()[1..] == shape[1..] {
            let row = src.len() / indices.len().max(1);
            let dst = out.as_mut_slice();
            for (&i, from) in indices.iter().zip(src.as_slice().chunks_exact(row.max(1))) {
                for (d, &v) in dst[i * row..][..row].iter_mut().zip(from) {
                    *d += v;
                }
            }
            return Ok(out);
        }
        for (k, &i) in indices.iter().enumerate() {
            let mut dst = out.data.index_axis_mut(Axis(axis), i);
            let from = src.data.index_axis(Axis(axis), k);
            if dst.shape() != from.shape() {
                return Err(bad());
            }
            dst += &from;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_vec(shape, (0..n).map(|i| i as f32).collect()).unwrap()
    }

    #[test]
    fn permute_and_transpose() {
        let a = iota(&[2, 3]);
        assert_eq!(a.t().unwrap().to_vec(), vec![0., 3., 1., 4., 2., 5.]);
        let b = iota(&[2, 3, 4]).permute(&[2, 0, 1]).unwrap();
        assert_eq!(b.shape(), &[4, 2, 3]);
        assert_eq!(b.as_slice()[1], 4.0);
        assert!(a.permute(&[0, 0]).is_err());
    }

    #[test]
    fn slice_and_its_adjoint_on_a_middle_axis() {
        let a = iota(&[2, 3, 2]);
        let s = a.slice_axis(1, 1, 3).unwrap();
        assert_eq!(s.shape(), &[2, 2, 2]);
        assert_eq!(s.to_vec(), vec![2., 3., 4., 5., 8., 9., 10., 11.]);
        let mut z = Tensor::zeros(&[2, 3, 2]);
        z.slice_axis_add(1, 1, &s).unwrap();
        z.slice_axis_add(1, 1, &s).unwrap();
        assert_eq!(z.to_vec(), vec![0., 0., 4., 6., 8., 10., 0., 0., 16., 18., 20., 22.]);
        assert!(z.slice_axis_add(1, 2, &s).is_err());
        assert!(z.slice_axis_add(0, 0, &iota(&[1, 2, 2])).is_err());
        assert_eq!(a.slice_axis(2, 1, 1).unwrap().shape(), &[2, 3, 0]);
    }

    #[test]
    fn slice_concat_round_trip() {
        let a = iota(&[4, 3]);
        let top = a.slice_axis(0, 0, 1).unwrap();
        let rest = a.slice_axis(0, 1, 4).unwrap();
        assert_eq!(Tensor::concat(0, &[&top, &rest]).unwrap(), a);
        assert!(a.slice_axis(1, 2, 5).is_err());
        assert!(Tensor::concat(0, &[&a, &iota(&[2, 2])]).is_err());
    }

    #[test]
    fn index_select_and_its_adjoint() {
        let a = iota(&[3, 2]);
        let g = a.index_select(0, &[2, 0, 2]).unwrap();
        assert_eq!(g.to_vec(), vec![4., 5., 0., 1., 4., 5.]);
        let back = Tensor::index_add(&[3, 2], 0, &[2, 0, 2], &Tensor::ones(&[3, 2])).unwrap();
        assert_eq!(back.to_vec(), vec![1., 1., 0., 0., 2., 2.]);
        assert!(a.index_select(0, &[3]).is_err());
        // along another axis (element by element, not whole rows)
        let cols = iota(&[2, 3]).index_select(1, &[2, 0]).unwrap();
        assert_eq!(cols.to_vec(), vec![2., 0., 5., 3.]);
        let back = Tensor::index_add(&[2, 3], 1, &[2, 0], &Tensor::ones(&[2, 2])).unwrap();
        assert_eq!(back.to_vec(), vec![1., 0., 1., 1., 0., 1.]);
        assert!(Tensor::index_add(&[3, 2], 0, &[3], &Tensor::ones(&[1, 2])).is_err());
    }

    #[test]
    fn reshape_checks_element_count() {
        assert_eq!(iota(&[2, 3]).reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
        assert!(iota(&[2, 3]).reshape(&[4]).is_err());
    }
}
