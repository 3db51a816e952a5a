//! `ringtrain-tensor`: the f32 n-dimensional tensor every other compute crate builds on.
//!
//! A [`Tensor`] is an owned `ndarray::ArrayD<f32>` that is **always in standard (row-major,
//! contiguous) layout**, so [`Tensor::as_slice`] never fails and a tensor can be flattened into
//! a gradient bucket or a safetensors file without a copy of its shape logic.
//!
//! Kernels:
//! - matrix products go through BLAS `sgemm` (OpenBLAS via `blas-src`); transposed operands are
//!   passed to BLAS as transposed views, never copied ([`Tensor::matmul`]);
//! - elementwise ops broadcast like NumPy; same-shape ops above [`PAR_THRESHOLD`] elements run
//!   on rayon;
//! - softmax/log-softmax subtract the row maximum first (no overflow for large logits).
//!
//! # Architecture invariant
//! This crate does no I/O, no async and no graph tracking; it never reads environment
//! variables. Thread counts are set explicitly by the binary through [`threads`].

// Linking OpenBLAS: ndarray's `blas` feature only declares the cblas symbols.
use blas_src as _;

pub mod attention;
pub mod conv;
pub mod conv2d;
mod error;
pub mod fused;
pub mod gemm;
pub mod gru;
mod linalg;
pub mod lstm;
mod ops;
pub mod random;
mod shape;
pub mod simd;
pub mod threads;

pub use error::TensorError;
pub use ndarray;

use ndarray::{ArrayD, IxDyn};

/// Same-shape elementwise ops on at least this many elements run on the rayon pool.
/// Below it the fork/join overhead costs more than it saves.
pub const PAR_THRESHOLD: usize = 1 << 15;

pub type Result<T, E = TensorError> = std::result::Result<T, E>;

/// A borrowed tensor: a shape and its row-major data. Kernels that only read an operand take
/// one, so a parameter can be read in place from a flat store instead of copied into a
/// [`Tensor`] every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorRef<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl<'a> TensorRef<'a> {
    /// `data` seen as `shape`; their sizes must agree.
    pub fn new(shape: &'a [usize], data: &'a [f32]) -> Result<TensorRef<'a>> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(TensorError::Invalid {
                op: "tensor view",
                reason: format!(
                    "shape {shape:?} needs {} elements, got {}",
                    shape.iter().product::<usize>(),
                    data.len()
                ),
            });
        }
        Ok(TensorRef { shape, data })
    }

    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }
}

impl<'a> From<&'a Tensor> for TensorRef<'a> {
    fn from(t: &'a Tensor) -> TensorRef<'a> {
        TensorRef {
            shape: t.shape(),
            data: t.as_slice(),
        }
    }
}

/// An owned f32 tensor in standard layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    data: ArrayD<f32>,
}

impl Tensor {
    /// Wraps an array, converting it to standard layout if it is not already.
    pub fn from_array(data: ArrayD<f32>) -> Tensor {
        if data.is_standard_layout() {
            Tensor { data }
        } else {
            Tensor {
                data: data.as_standard_layout().into_owned(),
            }
        }
    }

    pub fn from_vec(shape: &[usize], values: Vec<f32>) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != values.len() {
            return Err(TensorError::DataLength {
                shape: shape.to_vec(),
                expected,
                got: values.len(),
            });
        }
        let data = ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|_| TensorError::DataLength {
            shape: shape.to_vec(),
            expected,
            got: expected,
        })?;
        Ok(Tensor { data })
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            data: ArrayD::zeros(IxDyn(shape)),
        }
    }

    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor {
            data: ArrayD::from_elem(IxDyn(shape), value),
        }
    }

    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// A 0-dimensional tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::full(&[], value)
    }

    pub fn shape(&self) -> &[usize] {
        self.data.shape()
    }

    pub fn ndim(&self) -> usize {
        self.data.ndim()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn array(&self) -> &ArrayD<f32> {
        &self.data
    }

    pub fn into_array(self) -> ArrayD<f32> {
        self.data
    }

    pub fn as_slice(&self) -> &[f32] {
        self.data
            .as_slice()
            .expect("invariant: Tensor is always in standard layout")
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.data
            .as_slice_mut()
            .expect("invariant: Tensor is always in standard layout")
    }

    pub fn to_vec(&self) -> Vec<f32> {
        self.as_slice().to_vec()
    }

    /// The value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        match self.as_slice() {
            [v] => Ok(*v),
            _ => Err(TensorError::Invalid {
                op: "item",
                reason: format!("tensor of shape {:?} has more than one element", self.shape()),
            }),
        }
    }
}
