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
//! Parameters live outside the tape in a flat [`ParamStore`]; [`Graph::param`] puts a leaf for
//! one on the tape, which ops that only read it (linear layers, LSTMs) read in place in the
//! store, and others copy out the first time they ask for its value. [`Graph::param_grads_into`]
//! writes the gradients back into a buffer with the store's layout.
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
pub use ringtrain_tensor::{Tensor, TensorError, TensorRef};

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
    /// `cols` is the forward pass's im2col matrix when its stride lowers to one (see
    /// `ringtrain_tensor::conv2d`), kept for the weight gradient.
    Conv2d {
        x: Var,
        w: Var,
        b: Option<Var>,
        win: Window2d,
        cols: Option<Tensor>,
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
    /// One direction of an LSTM layer over all steps, input projection included (see
    /// [`Graph::lstm`]); `w` is `[w_ih, b_ih, w_hh, b_hh]`.
    Lstm {
        x: Var,
        w: [Var; 4],
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
    /// Set when the node is pushed, but for a parameter's leaf: that gets one only if an op asks
    /// for it as a tensor ([`Graph::value`]); until then [`Graph::data`] reads the store, so a
    /// step does not copy every weight it reads (memory, and a pass per weight).
    value: std::cell::OnceCell<Tensor>,
    /// The store index of a parameter's leaf.
    param: Option<usize>,
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
    /// Per parameter: its row lookups leave a [`RowGrad`] instead of a dense gradient.
    row_sparse: Vec<bool>,
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
            row_sparse: vec![false; params.specs().len()],
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
            row_sparse: Vec::new(),
            grad_enabled: true,
            training: true,
            rng: None,
        }
    }

    /// Makes the gradient of parameter `param` (its index in the store) from row lookups
    /// (`index_select` on axis 0: an embedding table) a [`RowGrad`]: the rows the batch read
    /// and their gradients, never a dense table. Other uses of the parameter still add a
    /// dense gradient, and the rows are then added into it.
    pub fn set_row_sparse(&mut self, param: usize) {
        if let Some(s) = self.row_sparse.get_mut(param) {
            *s = true;
        }
    }

    /// The gradient of parameter `param` (its index in the store) in `grads`.
    pub fn param_grad<'g>(&self, grads: &'g Gradients, param: usize) -> ParamGrad<'g> {
        self.bound
            .get(param)
            .copied()
            .flatten()
            .map_or(ParamGrad::Zero, |v| grads.param(v))
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
        let node = &self.nodes[v.0];
        node.value.get_or_init(|| {
            let data = self.data(v);
            Tensor::from_vec(data.shape(), data.as_slice().to_vec()).expect("a TensorRef's sizes agree")
        })
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.data(v).shape()
    }

    /// The value of `v` without a copy: a parameter's leaf that no op has asked a tensor of is
    /// read in the store.
    pub fn data(&self, v: Var) -> TensorRef<'_> {
        let node = &self.nodes[v.0];
        match (node.value.get(), node.param, self.params) {
            (Some(t), _, _) => t.into(),
            (None, Some(p), Some(store)) => {
                let spec = &store.specs()[p];
                TensorRef::new(&spec.shape, &store.flat()[spec.offset..][..spec.len]).expect("the store's sizes agree")
            }
            _ => unreachable!("only a parameter's leaf is pushed without a value"),
        }
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
        let value = self.value(v).clone();
        self.leaf(value, false)
    }

    /// The named parameter's leaf (one per parameter and tape), read in the store (see
    /// [`Graph::data`]).
    pub fn param(&mut self, name: &str) -> Result<Var> {
        Ok(self.bind(name)?.0)
    }

    /// The leaf of parameter `name` (bound on first use), the store and the parameter's index.
    fn bind(&mut self, name: &str) -> Result<(Var, &'p ParamStore, usize)> {
        let unknown = || AutogradError::UnknownParam { name: name.to_string() };
        let store = self.params.ok_or_else(unknown)?;
        let idx = store.index_of(name).ok_or_else(unknown)?;
        let v = match self.bound[idx] {
            Some(v) => v,
            None => {
                self.nodes.push(Node {
                    value: std::cell::OnceCell::new(),
                    param: Some(idx),
                    op: Op::Leaf,
                    needs_grad: self.grad_enabled,
                });
                let v = Var(self.nodes.len() - 1);
                self.bound[idx] = Some(v);
                v
            }
        };
        Ok((v, store, idx))
    }

    /// Rows `indices` of parameter `name` (axis 0: an embedding lookup), the same as
    /// `index_select(param(name), 0, indices)` but read straight from the store: a lookup
    /// reads a few rows of a table that can be megabytes, and copying all of it onto the tape
    /// every step cost more than the lookup.
    pub fn param_rows(&mut self, name: &str, indices: &[usize]) -> Result<Var> {
        let (table, store, idx) = self.bind(name)?;
        let spec = &store.specs()[idx];
        let rows = Tensor::select_rows(&store.flat()[spec.offset..][..spec.len], &spec.shape, indices)?;
        let needs = self.nodes[table.0].needs_grad;
        let op = Op::IndexSelect {
            x: table,
            axis: 0,
            indices: indices.to_vec(),
        };
        Ok(self.push(rows, op, needs))
    }

    fn leaf(&mut self, value: Tensor, needs_grad: bool) -> Var {
        self.push(value, Op::Leaf, needs_grad)
    }

    pub(crate) fn push(&mut self, value: Tensor, op: Op, needs_grad: bool) -> Var {
        self.nodes.push(Node {
            value: value.into(),
            param: None,
            op,
            needs_grad,
        });
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
            bound.map_or(ParamGrad::Zero, |v| grads.param(v)).write_into(dst);
        }
        Ok(())
    }

    /// Adds `weight` × d(loss)/d(parameter) into `out` (laid out like the store's flat
    /// buffer), for gradient accumulation over micro-batches. Unused parameters add nothing.
    pub fn add_param_grads(&self, grads: &Gradients, out: &mut [f32], weight: f32) -> Result<()> {
        let store = self.store_for("add_param_grads", out)?;
        for (spec, bound) in store.specs().iter().zip(&self.bound) {
            let dst = &mut out[spec.offset..spec.offset + spec.len];
            match bound.map_or(ParamGrad::Zero, |v| grads.param(v)) {
                ParamGrad::Dense(g) => {
                    for (d, s) in dst.iter_mut().zip(g.as_slice()) {
                        *d += weight * s;
                    }
                }
                ParamGrad::Rows(r) => r.add_into(dst, weight),
                ParamGrad::Zero => {}
            }
        }
        Ok(())
    }
}

/// Gradients of one backward pass, for the leaves that needed them.
#[derive(Debug)]
pub struct Gradients {
    pub(crate) grads: Vec<Option<Tensor>>,
    /// Row gradients of row-sparse parameters (see [`Graph::set_row_sparse`]).
    pub(crate) rows: Vec<Option<RowGrad>>,
}

impl Gradients {
    /// The dense gradient of `v` (`None` for a row-sparse parameter; see [`Gradients::param`]).
    pub fn get(&self, v: Var) -> Option<&Tensor> {
        self.grads.get(v.0).and_then(Option::as_ref)
    }

    /// The gradient of parameter leaf `v`, dense or as rows.
    pub fn param(&self, v: Var) -> ParamGrad<'_> {
        match (self.get(v), self.rows.get(v.0).and_then(Option::as_ref)) {
            (Some(d), _) => ParamGrad::Dense(d),
            (None, Some(r)) => ParamGrad::Rows(r),
            (None, None) => ParamGrad::Zero,
        }
    }
}

/// A parameter's gradient as backward hands it over.
#[derive(Debug, Clone, Copy)]
pub enum ParamGrad<'a> {
    /// The parameter did not reach the loss.
    Zero,
    Dense(&'a Tensor),
    /// Zero but for the rows a row-sparse lookup read.
    Rows(&'a RowGrad),
}

impl ParamGrad<'_> {
    /// Writes the gradient over `dst`, the parameter's place in a flat buffer.
    pub fn write_into(self, dst: &mut [f32]) {
        match self {
            ParamGrad::Dense(g) => dst.copy_from_slice(g.as_slice()),
            ParamGrad::Rows(r) => {
                dst.fill(0.0);
                r.add_into(dst, 1.0);
            }
            ParamGrad::Zero => dst.fill(0.0),
        }
    }
}

/// The gradient of a table whose rows were looked up: zero except that row `rows[k]` gets
/// `values[k·width .. (k+1)·width]` added (a row read twice appears twice, in reading order).
#[derive(Debug, Clone, PartialEq)]
pub struct RowGrad {
    pub rows: Vec<usize>,
    pub width: usize,
    pub values: Vec<f32>,
}

impl RowGrad {
    /// `dst[row·width ..] += weight × values`, row by row in order (`dst` is the table).
    pub fn add_into(&self, dst: &mut [f32], weight: f32) {
        for (&row, v) in self.rows.iter().zip(self.values.chunks_exact(self.width.max(1))) {
            let d = &mut dst[row * self.width..(row + 1) * self.width];
            for (d, v) in d.iter_mut().zip(v) {
                *d += weight * v;
            }
        }
    }

    /// The distinct rows in increasing order, each with the sum of its gradients (added in
    /// reading order, so every run gives the same bits).
    pub fn coalesce(&self) -> (Vec<usize>, Vec<f32>) {
        let w = self.width.max(1);
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&k| self.rows[k]);
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        for k in order {
            let v = &self.values[k * w..(k + 1) * w];
            if rows.last() == Some(&self.rows[k]) {
                let at = values.len() - w;
                for (d, s) in values[at..].iter_mut().zip(v) {
                    *d += s;
                }
            } else {
                rows.push(self.rows[k]);
                values.extend_from_slice(v);
            }
        }
        (rows, values)
    }
}
