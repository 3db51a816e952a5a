//! `ringtrain-autograd`: reverse-mode automatic differentiation on a define-by-run tape.
//!
//! # Design
//! A [`Graph`] is built fresh for every forward pass. Each op appends a [`Node`] holding its
//! output value and an [`Op`] naming its inputs by [`Var`] (an index into the tape). Because
//! nodes are appended in evaluation order, the tape is already topologically sorted, and
//! [`Graph::backward`] is one reverse sweep: no reference counting, no cycles, no hashing.
//! We chose a tape over a static graph because the models we train (RNNs over variable
//! lengths, masked attention) decide their shape at run time, and a per-step tape costs only
//! a `Vec` of nodes.
//!
//! Parameters live outside the tape in a flat [`ParamStore`]; [`Graph::param`] copies one into
//! the tape the first time a forward pass asks for it, and [`Graph::param_grads_into`] writes
//! the gradients back into a buffer with the store's layout.
//!
//! The whole derivative table is in `backward.rs`, one arm per op, so it can be audited in one
//! place; every arm is checked against central finite differences ([`gradcheck`]).
//!
//! Gradients of a tensor used several times accumulate (sum over uses). In inference mode
//! ([`Graph::inference`]) nothing is recorded for backward, and [`Graph::detach`] cuts a value
//! out of the graph.

mod backward;
pub mod gradcheck;
mod ops;
mod params;

pub use params::{ParamSpec, ParamStore};
pub use ringtrain_tensor::conv::Window2d;
pub use ringtrain_tensor::{Tensor, TensorError};

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// Errors of graph construction and differentiation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AutogradError {
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("unknown parameter `{name}`")]
    UnknownParam { name: String },
    #[error("parameter `{name}`: expected shape {expected:?}, got {got:?}")]
    ParamShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("backward needs a one-element loss, got shape {shape:?}")]
    NotScalar { shape: Vec<usize> },
    #[error("{op}: {reason}")]
    Invalid { op: &'static str, reason: String },
}

pub type Result<T, E = AutogradError> = std::result::Result<T, E>;

/// What produced a node; inputs are earlier nodes.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Leaf,
    Add(Var, Var),
    Sub(Var, Var),
    Mul(Var, Var),
    Div(Var, Var),
    Neg(Var),
    Scale(Var, f32),
    AddScalar(Var),
    MatMul {
        a: Var,
        b: Var,
        ta: bool,
        tb: bool,
    },
    Reshape(Var),
    Permute(Var, Vec<usize>),
    Relu(Var),
    LeakyRelu(Var, f32),
    Sigmoid(Var),
    Tanh(Var),
    Exp(Var),
    Log(Var),
    Abs(Var),
    Sqrt(Var),
    Square(Var),
    Sum(Var),
    Mean(Var),
    SumAxis {
        x: Var,
        axis: usize,
        keepdim: bool,
    },
    MeanAxis {
        x: Var,
        axis: usize,
        keepdim: bool,
    },
    Softmax {
        x: Var,
        axis: usize,
    },
    LogSoftmax {
        x: Var,
        axis: usize,
    },
    SliceAxis {
        x: Var,
        axis: usize,
        start: usize,
    },
    Concat {
        parts: Vec<Var>,
        axis: usize,
    },
    IndexSelect {
        x: Var,
        axis: usize,
        indices: Vec<usize>,
    },
    MulConst {
        x: Var,
        factor: Tensor,
    },
    /// `cols` is the forward pass's im2col matrix, kept for the weight gradient.
    Conv2d {
        x: Var,
        w: Var,
        b: Option<Var>,
        win: Window2d,
        cols: Tensor,
    },
    MaxPool2d {
        x: Var,
        argmax: Vec<u32>,
    },
    AvgPool2d {
        x: Var,
        win: Window2d,
    },
    BceWithLogits {
        logits: Var,
        targets: Tensor,
    },
    CrossEntropy {
        logits: Var,
        targets: Vec<usize>,
    },
    /// `x · wᵀ + b` over the last axis of `x`.
    Linear {
        x: Var,
        w: Var,
        b: Option<Var>,
    },
    /// `stats` holds each row's `(mean, 1/std)` from the forward pass.
    LayerNorm {
        x: Var,
        w: Var,
        b: Var,
        stats: Vec<[f32; 2]>,
    },
    Gelu(Var),
    /// `argmax[b·D + d]` is the flat index into `x` of the maximum, `u32::MAX` for a row
    /// without real steps (its output is 0 and gets no gradient).
    MaskedMax {
        x: Var,
        argmax: Vec<u32>,
    },
    /// One direction of a GRU layer over all steps (see [`Graph::gru`]).
    Gru {
        xp: Var,
        w_hh: Var,
        b_hh: Var,
        mask: Tensor,
        reverse: bool,
        tape: ringtrain_tensor::gru::GruTape,
    },
    /// One direction of an LSTM layer over all steps (see [`Graph::lstm`]).
    Lstm {
        xp: Var,
        w_hh: Var,
        b_hh: Var,
        mask: Tensor,
        reverse: bool,
        tape: ringtrain_tensor::lstm::LstmTape,
    },
    /// `probs` is the forward's `[B, H, Tq, Tk]`, dropped entries marked by their sign bit;
    /// nothing else is kept for backward.
    Attention {
        q: Cols,
        k: Cols,
        v: Cols,
        heads: usize,
        dim: usize,
        scale: f32,
        dropout: f32,
        probs: Tensor,
    },
}

/// One of the queries, keys or values of [`Graph::attention_cols`]: the columns
/// `offset .. offset + dim` of a `[B, T, W]` value, head `h` in `offset + h·dh ..`.
///
/// A packed projection `[B, T, 3D]` is used in place as q = `Cols { var, offset: 0 }`,
/// k = `offset: D`, v = `offset: 2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cols {
    pub var: Var,
    pub offset: usize,
}

/// Options of the fused attention ops ([`Graph::attention`] and friends).
#[derive(Debug, Clone, Default)]
pub struct AttentionOpts {
    /// Number of heads; the feature count must divide by it.
    pub heads: usize,
    /// Query `i` attends keys `j ≤ i` only (top-left aligned, as PyTorch's `is_causal`).
    pub causal: bool,
    /// `[B, Tk]`, 1 = a real key, 0 = padding no query attends (the crate-wide mask
    /// convention; PyTorch's `key_padding_mask` is its negation).
    pub key_mask: Option<Tensor>,
    /// Additive `[Tq, Tk]` mask (`-inf` blocks a pair), as PyTorch's float `attn_mask`.
    pub bias: Option<Tensor>,
    /// Dropout on the attention probabilities, in training mode only.
    pub dropout: f32,
    /// Score scale; `None` means `1/√head_dim`.
    pub scale: Option<f32>,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) value: Tensor,
    pub(crate) op: Op,
    pub(crate) needs_grad: bool,
}

/// The tape of one forward pass.
#[derive(Debug)]
pub struct Graph<'p> {
    pub(crate) nodes: Vec<Node>,
    params: Option<&'p ParamStore>,
    /// Per parameter (store order): its leaf on this tape, once bound.
    bound: Vec<Option<Var>>,
    grad_enabled: bool,
    training: bool,
    /// Randomness of the forward pass (dropout masks), seeded by the caller per step.
    rng: Option<ringtrain_tensor::random::Rng>,
}

impl<'p> Graph<'p> {
    /// A tape that records for backward, in training mode.
    pub fn new(params: &'p ParamStore) -> Graph<'p> {
        Graph {
            nodes: Vec::new(),
            bound: vec![None; params.specs().len()],
            params: Some(params),
            grad_enabled: true,
            training: true,
            rng: None,
        }
    }

    /// A tape for evaluation: nothing is recorded for backward (no_grad) and layers such as
    /// dropout behave as at test time.
    pub fn inference(params: &'p ParamStore) -> Graph<'p> {
        Graph {
            grad_enabled: false,
            training: false,
            ..Graph::new(params)
        }
    }

    /// A tape without parameters (for tests and free-standing computations).
    pub fn standalone() -> Graph<'static> {
        Graph {
            nodes: Vec::new(),
            params: None,
            bound: Vec::new(),
            grad_enabled: true,
            training: true,
            rng: None,
        }
    }

    /// Seeds the randomness of this forward pass (dropout). The trainer derives the seed from
    /// (job seed, step, rank) so runs are reproducible.
    pub fn seed_rng(&mut self, seed: u64) {
        self.rng = Some(ringtrain_tensor::random::rng(seed));
    }

    /// The forward pass's generator; seeded with 0 if the caller never chose a seed.
    pub fn rng(&mut self) -> &mut ringtrain_tensor::random::Rng {
        self.rng.get_or_insert_with(|| ringtrain_tensor::random::rng(0))
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    /// A constant input: no gradient flows into it.
    pub fn input(&mut self, value: Tensor) -> Var {
        self.leaf(value, false)
    }

    /// A free variable that receives a gradient (for tests and gradient checks).
    pub fn variable(&mut self, value: Tensor) -> Var {
        let needs = self.grad_enabled;
        self.leaf(value, needs)
    }

    /// The same value as `v`, cut off from the graph: no gradient flows back through it.
    pub fn detach(&mut self, v: Var) -> Var {
        let value = self.nodes[v.0].value.clone();
        self.leaf(value, false)
    }

    /// The named parameter, copied onto the tape the first time it is asked for.
    pub fn param(&mut self, name: &str) -> Result<Var> {
        let store = self
            .params
            .ok_or_else(|| AutogradError::UnknownParam { name: name.to_string() })?;
        let idx = store
            .index_of(name)
            .ok_or_else(|| AutogradError::UnknownParam { name: name.to_string() })?;
        if let Some(v) = self.bound[idx] {
            return Ok(v);
        }
        let value = store.get(name)?;
        let needs = self.grad_enabled;
        let v = self.leaf(value, needs);
        self.bound[idx] = Some(v);
        Ok(v)
    }

    fn leaf(&mut self, value: Tensor, needs_grad: bool) -> Var {
        self.push(value, Op::Leaf, needs_grad)
    }

    pub(crate) fn push(&mut self, value: Tensor, op: Op, needs_grad: bool) -> Var {
        self.nodes.push(Node { value, op, needs_grad });
        Var(self.nodes.len() - 1)
    }

    /// Records an op whose inputs are `inputs`: it needs a gradient if any input does.
    pub(crate) fn record(&mut self, value: Tensor, op: Op, inputs: &[Var]) -> Var {
        let needs = self.grad_enabled && inputs.iter().any(|v| self.nodes[v.0].needs_grad);
        if needs {
            self.push(value, op, true)
        } else {
            self.push(value, Op::Leaf, false)
        }
    }

    /// The parameter store, once `out` is checked to be laid out like its flat buffer.
    fn store_for(&self, op: &'static str, out: &[f32]) -> Result<&ParamStore> {
        let store = self.params.ok_or(AutogradError::Invalid {
            op,
            reason: "graph has no parameter store".into(),
        })?;
        if out.len() != store.num_elements() {
            return Err(AutogradError::Invalid {
                op,
                reason: format!("buffer has {} elements, parameters {}", out.len(), store.num_elements()),
            });
        }
        Ok(store)
    }

    /// Writes d(loss)/d(parameter) into `out`, laid out like the store's flat buffer.
    /// Parameters the forward pass never used get zero gradient.
    pub fn param_grads_into(&self, grads: &Gradients, out: &mut [f32]) -> Result<()> {
        let store = self.store_for("param_grads_into", out)?;
        for (spec, bound) in store.specs().iter().zip(&self.bound) {
            let dst = &mut out[spec.offset..spec.offset + spec.len];
            match bound.and_then(|v| grads.get(v)) {
                Some(g) => dst.copy_from_slice(g.as_slice()),
                None => dst.fill(0.0),
            }
        }
        Ok(())
    }

    /// Adds `weight` × d(loss)/d(parameter) into `out` (laid out like the store's flat
    /// buffer), for gradient accumulation over micro-batches. Unused parameters add nothing.
    pub fn add_param_grads(&self, grads: &Gradients, out: &mut [f32], weight: f32) -> Result<()> {
        let store = self.store_for("add_param_grads", out)?;
        for (spec, bound) in store.specs().iter().zip(&self.bound) {
            if let Some(g) = bound.and_then(|v| grads.get(v)) {
                let dst = &mut out[spec.offset..spec.offset + spec.len];
                for (d, s) in dst.iter_mut().zip(g.as_slice()) {
                    *d += weight * s;
                }
            }
        }
        Ok(())
    }
}

/// Gradients of one backward pass, for the leaves that needed them.
#[derive(Debug)]
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(Option::as_ref)
    }
}
