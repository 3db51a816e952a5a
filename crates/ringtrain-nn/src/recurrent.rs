//! Embeddings and recurrent layers (vanilla RNN, GRU, LSTM; stacked, bidirectional, masked).
//!
//! # Layout (PyTorch's, so weights are comparable by name)
//! For layer `k` and direction suffix `s` (`""` forward, `"_reverse"` backward):
//! `weight_ih_l{k}{s}: [G·H, I]`, `weight_hh_l{k}{s}: [G·H, H]`, `bias_ih_l{k}{s}`,
//! `bias_hh_l{k}{s}: [G·H]`, with G = 1 (RNN), 3 (GRU: r, z, n) or 4 (LSTM: i, f, g, o),
//! gates stacked in that order.
//!
//! # Computation
//! The input projection of all time steps is one sgemm (`[B·T, I] · W_ihᵀ`, all gates fused);
//! each step then does one `[B, H] · W_hhᵀ` for all gates. Backpropagation through time is the
//! tape's reverse sweep over the unrolled steps.
//!
//! Padding: a `[B, T]` mask (1 = token, 0 = padding) freezes the state on padded steps,
//! `h_t = m_t·h'_t + (1 − m_t)·h_{t−1}`, so the final state is the state after each
//! sequence's last real token, in both directions (like a packed sequence in PyTorch).

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use crate::conv::dropout;
use crate::{LayerSummary, Module, NnError, Result};

/// A lookup table `[vocab, dim]`; row `padding_idx` starts at zero and never receives a
/// gradient (its outputs are masked), as with PyTorch's `padding_idx`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub vocab: usize,
    pub dim: usize,
    pub padding_idx: Option<usize>,
    /// Fixed one-hot rows instead of a learned table (`dim` is then `vocab`, and there are no
    /// parameters): the textbook input encoding, for small vocabularies such as characters.
    pub one_hot: bool,
}

impl Embedding {
    /// Switches to fixed one-hot rows (`dim` becomes `vocab`).
    pub fn one_hot_input(&mut self) {
        self.one_hot = true;
        self.dim = self.vocab;
    }

    /// # Shapes
    /// `ids: [B, T]` (token ids) → `[B, T, dim]`.
    pub fn lookup(&self, g: &mut Graph<'_>, ids: &[usize], batch: usize, steps: usize) -> Result<Var> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.vocab) {
            return Err(NnError::Layer {
                layer: self.name.clone(),
                reason: format!("token id {bad} is outside the vocabulary of {}", self.vocab),
            });
        }
        if self.one_hot {
            let mut x = vec![0.0f32; ids.len() * self.vocab];
            for (row, &id) in x.chunks_mut(self.vocab).zip(ids) {
                if Some(id) != self.padding_idx {
                    row[id] = 1.0;
                }
            }
            return Ok(g.input(Tensor::from_vec(&[batch, steps, self.vocab], x)?));
        }
        let rows = g.param_rows(&format!("{}.weight", self.name), ids)?;
        let rows = match self.padding_idx {
            Some(p) => {
                let keep: Vec<f32> = ids.iter().map(|&i| if i == p { 0.0 } else { 1.0 }).collect();
                let keep = Tensor::from_vec(&[ids.len(), 1], keep)?;
                g.mul_const(rows, keep)?
            }
            None => rows,
        };
        Ok(g.reshape(rows, &[batch, steps, self.dim])?)
    }

    pub fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        if self.one_hot {
            return;
        }
        let mut w = random::normal(&[self.vocab, self.dim], 1.0, rng);
        if let Some(p) = self.padding_idx.filter(|&p| p < self.vocab) {
            w.as_mut_slice()[p * self.dim..(p + 1) * self.dim].fill(0.0);
        }
        out.insert(format!("{}.weight", self.name), w);
    }
}

/// Which recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellKind {
    /// `h' = tanh(W_ih x + b_ih + W_hh h + b_hh)`.
    Rnn,
    /// PyTorch's GRU: `r, z = σ(·)`, `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`,
    /// `h' = (1 − z) ⊙ n + z ⊙ h`.
    Gru,
    /// `i, f, o = σ(·)`, `g = tanh(·)`, `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`.
    Lstm,
}

impl CellKind {
    pub fn gates(self) -> usize {
        match self {
            CellKind::Rnn => 1,
            CellKind::Gru => 3,
            CellKind::Lstm => 4,
        }
    }
}

/// A (stacked, optionally bidirectional) recurrent layer.
#[derive(Debug, Clone)]
pub struct Recurrent {
    pub name: String,
    pub cell: CellKind,
    pub input_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub bidirectional: bool,
    /// Dropout between stacked layers (training only).
    pub dropout: f64,
}

/// What a recurrent layer returns.
#[derive(Debug, Clone)]
pub struct RecurrentOutput {
    /// The last layer's outputs, per direction (see [`RecurrentOutput::sequence`]).
    steps: Vec<Steps>,
    /// The last layer's final state: `[B, H·directions]` (forward, then backward).
    pub last: Var,
    /// Every layer's and direction's final state, `[B, H]` each, in the order
    /// [`Recurrent::run_from`] takes them back: per layer, per direction, h then (LSTM) c.
    pub states: Vec<Var>,
}

impl RecurrentOutput {
    /// Every step's output of the last layer: `[B, T, H·directions]` (zeros at padding).
    pub fn sequence(&self, g: &mut Graph<'_>) -> Result<Var> {
        Steps::join(g, &self.steps)
    }
}

/// One direction's outputs `[B, T, H]`: a value, or the first T steps of a fused op's output
/// `[B, T + 1 or 2, H]`, cut out only when asked for (a classifier on the final state never
/// reads them).
#[derive(Debug, Clone, Copy)]
enum Steps {
    Value(Var),
    Packed { packed: Var, t: usize },
}

impl Steps {
    fn get(self, g: &mut Graph<'_>) -> Result<Var> {
        match self {
            Steps::Value(v) => Ok(v),
            Steps::Packed { packed, t } => Ok(g.slice_axis(packed, 1, 0, t)?),
        }
    }

    /// One or two directions' outputs side by side: `[B, T, H·directions]`.
    fn join(g: &mut Graph<'_>, directions: &[Steps]) -> Result<Var> {
        match directions {
            [f, r] => {
                let parts = [f.get(g)?, r.get(g)?];
                Ok(g.concat(&parts, 2)?)
            }
            [f] => f.get(g),
            _ => unreachable!("one or two directions"),
        }
    }
}

/// One direction's result: outputs `[B, T, H]`, final state and (LSTM) final cell `[B, H]`.
/// Which direction of which layer runs, from `init` (h, and c for an LSTM) or zeros.
#[derive(Debug, Clone, Copy)]
struct DirectionAt<'a> {
    layer: usize,
    reverse: bool,
    init: Option<(&'a Tensor, Option<&'a Tensor>)>,
}

struct DirectionOutput {
    seq: Steps,
    h: Var,
    c: Option<Var>,
}

impl Recurrent {
    pub fn directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// Tensors in a carried state: per layer and direction, h and (LSTM) c.
    pub fn state_len(&self) -> usize {
        let per = if self.cell == CellKind::Lstm { 2 } else { 1 };
        self.num_layers * self.directions() * per
    }

    fn pname(&self, what: &str, layer: usize, reverse: bool) -> String {
        format!("{}.{what}_l{layer}{}", self.name, if reverse { "_reverse" } else { "" })
    }

    /// Runs the layer over `x: [B, T, I]` with `mask: [B, T]` (1 = real token), from zeros.
    pub fn run(&self, g: &mut Graph<'_>, x: Var, mask: &Tensor) -> Result<RecurrentOutput> {
        self.run_from(g, x, mask, None)
    }

    /// [`Recurrent::run`] from the states `init` (as [`RecurrentOutput::states`] lists them,
    /// `[B, H]` each) instead of zeros: truncated backpropagation through time carries the
    /// state one window ended with into the next. The states are constants; no gradient flows
    /// back across the cut.
    pub fn run_from(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        mask: &Tensor,
        init: Option<&[Tensor]>,
    ) -> Result<RecurrentOutput> {
        let shape = g.shape(x).to_vec();
        let &[b, t, i] = shape.as_slice() else {
            return Err(self.err(format!("expects [batch, time, features], got {shape:?}")));
        };
        if i != self.input_size || mask.shape() != [b, t] {
            return Err(self.err(format!(
                "expects input size {} and a [{b}, {t}] mask, got {shape:?} and {:?}",
                self.input_size,
                mask.shape()
            )));
        }
        if let Some(init) = init {
            let h = self.hidden_size;
            if init.len() != self.state_len() || init.iter().any(|s| s.shape() != [b, h]) {
                return Err(self.err(format!(
                    "a carried state is {} tensors of [{b}, {h}], got {:?}",
                    self.state_len(),
                    init.iter().map(|s| s.shape().to_vec()).collect::<Vec<_>>()
                )));
            }
        }
        let mut init = init.map(|s| s.iter());
        let mut input = x;
        let mut steps = Vec::new();
        let mut last = x;
        let mut states = Vec::with_capacity(self.state_len());
        for layer in 0..self.num_layers {
            if layer > 0 {
                let seq = Steps::join(g, &steps)?;
                input = dropout(g, seq, self.dropout)?;
            }
            let mut outs = Vec::with_capacity(2);
            for reverse in [false, true].into_iter().take(self.directions()) {
                let start = init.as_mut().map(|it| {
                    let h0 = it.next().expect("length checked above");
                    let c0 = (self.cell == CellKind::Lstm).then(|| it.next().expect("length checked above"));
                    (h0, c0)
                });
                let at = DirectionAt {
                    layer,
                    reverse,
                    init: start,
                };
                let out = self.direction(g, input, mask, at)?;
                states.push(out.h);
                states.extend(out.c);
                outs.push(out);
            }
            last = match outs.as_slice() {
                [f, r] => g.concat(&[f.h, r.h], 1)?,
                [f] => f.h,
                _ => unreachable!("one or two directions"),
            };
            steps = outs.iter().map(|o| o.seq).collect();
        }
        Ok(RecurrentOutput { steps, last, states })
    }

    /// One direction of one layer, from `init` (h, and c for an LSTM) or zeros.
    ///
    /// LSTM and GRU run as one fused op over all steps ([`Graph::lstm`], [`Graph::gru`]); the
    /// RNN cell is recorded step by step ([`Recurrent::direction_steps`]).
    fn direction(&self, g: &mut Graph<'_>, x: Var, mask: &Tensor, at: DirectionAt<'_>) -> Result<DirectionOutput> {
        let DirectionAt { layer, reverse, init } = at;
        let (b, t) = (g.shape(x)[0], g.shape(x)[1]);
        if self.cell == CellKind::Rnn || t == 0 {
            return self.direction_steps(g, x, mask, at);
        }
        let h = self.hidden_size;
        // The fused ops return [B, T + 1, H] (GRU: steps, final h) or [B, T + 2, H] (LSTM:
        // steps, final h, final c).
        let packed = if self.cell == CellKind::Gru {
            let xp = self.input_projection(g, x, layer, reverse)?;
            let w_hh = g.param(&self.pname("weight_hh", layer, reverse))?;
            let b_hh = g.param(&self.pname("bias_hh", layer, reverse))?;
            g.gru([xp, w_hh, b_hh], mask, reverse, init.map(|(h0, _)| h0))?
        } else {
            let p = |g: &mut Graph<'_>, what| g.param(&self.pname(what, layer, reverse));
            let w = [
                p(g, "weight_ih")?,
                p(g, "bias_ih")?,
                p(g, "weight_hh")?,
                p(g, "bias_hh")?,
            ];
            let start = init.and_then(|(h0, c0)| Some((h0, c0?)));
            g.lstm(x, w, mask, reverse, start)?
        };
        let row = |g: &mut Graph<'_>, at: usize| -> Result<Var> {
            let v = g.slice_axis(packed, 1, at, at + 1)?;
            Ok(g.reshape(v, &[b, h])?)
        };
        let (h_last, c_last) = (
            row(g, t)?,
            (self.cell == CellKind::Lstm).then(|| row(g, t + 1)).transpose()?,
        );
        Ok(DirectionOutput {
            seq: Steps::Packed { packed, t },
            h: h_last,
            c: c_last,
        })
    }

    /// `x · W_ihᵀ + b_ih` for all time steps and gates in one product: `[B, T, gates·H]`.
    fn input_projection(&self, g: &mut Graph<'_>, x: Var, layer: usize, reverse: bool) -> Result<Var> {
        let w_ih = g.param(&self.pname("weight_ih", layer, reverse))?;
        let b_ih = g.param(&self.pname("bias_ih", layer, reverse))?;
        Ok(g.linear(x, w_ih, Some(b_ih))?)
    }

    /// [`Recurrent::direction`] recorded one tape op at a time, for every cell: the
    /// definition the fused LSTM is tested against.
    fn direction_steps(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        mask: &Tensor,
        at: DirectionAt<'_>,
    ) -> Result<DirectionOutput> {
        let DirectionAt { layer, reverse, init } = at;
        let (b, t) = (g.shape(x)[0], g.shape(x)[1]);
        let h = self.hidden_size;
        let gh = self.cell.gates() * h;
        let xp = self.input_projection(g, x, layer, reverse)?;
        let w_hh = g.param(&self.pname("weight_hh", layer, reverse))?;
        let b_hh = g.param(&self.pname("bias_hh", layer, reverse))?;
        let mut state = g.input(init.map_or_else(|| Tensor::zeros(&[b, h]), |(h0, _)| h0.clone()));
        let mut cell = g.input(
            init.and_then(|(_, c0)| c0.cloned())
                .unwrap_or_else(|| Tensor::zeros(&[b, h])),
        );
        let mut outputs = vec![state; t];
        let order: Vec<usize> = if reverse {
            (0..t).rev().collect()
        } else {
            (0..t).collect()
        };
        for step in order {
            let xt = g.slice_axis(xp, 1, step, step + 1)?;
            let xt = g.reshape(xt, &[b, gh])?;
            let hp = g.matmul_t(state, w_hh, false, true)?;
            let hp = g.add(hp, b_hh)?;
            let (new_h, new_c) = match self.cell {
                CellKind::Rnn => {
                    let s = g.add(xt, hp)?;
                    (g.tanh(s), None)
                }
                CellKind::Lstm => {
                    let s = g.add(xt, hp)?;
                    let gate = |g: &mut Graph<'_>, k: usize| g.slice_axis(s, 1, k * h, (k + 1) * h);
                    let (ig, fg, gg, og) = (gate(g, 0)?, gate(g, 1)?, gate(g, 2)?, gate(g, 3)?);
                    let (ig, fg, gg, og) = (g.sigmoid(ig), g.sigmoid(fg), g.tanh(gg), g.sigmoid(og));
                    let fc = g.mul(fg, cell)?;
                    let ic = g.mul(ig, gg)?;
                    let c = g.add(fc, ic)?;
                    let tc = g.tanh(c);
                    (g.mul(og, tc)?, Some(c))
                }
                CellKind::Gru => {
                    let part = |g: &mut Graph<'_>, v: Var, k: usize| g.slice_axis(v, 1, k * h, (k + 1) * h);
                    let (xr, xz, xn) = (part(g, xt, 0)?, part(g, xt, 1)?, part(g, xt, 2)?);
                    let (hr, hz, hn) = (part(g, hp, 0)?, part(g, hp, 1)?, part(g, hp, 2)?);
                    let r = g.add(xr, hr)?;
                    let r = g.sigmoid(r);
                    let z = g.add(xz, hz)?;
                    let z = g.sigmoid(z);
                    let rh = g.mul(r, hn)?;
                    let n = g.add(xn, rh)?;
                    let n = g.tanh(n);
                    // h' = n + z ⊙ (h − n)  ==  (1 − z) ⊙ n + z ⊙ h
                    let d = g.sub(state, n)?;
                    let zd = g.mul(z, d)?;
                    (g.add(n, zd)?, None)
                }
            };
            // Padded steps keep the previous state: h = h_prev + m ⊙ (h' − h_prev). A step
            // without padding in any row (most steps; all of them in a language model or a
            // series) skips the three masking ops per state.
            let m = mask.slice_axis(1, step, step + 1)?;
            let out = if m.as_slice().iter().all(|&v| v == 1.0) {
                state = new_h;
                if let Some(c) = new_c {
                    cell = c;
                }
                new_h
            } else {
                let dh = g.sub(new_h, state)?;
                let dh = g.mul_const(dh, m.clone())?;
                state = g.add(state, dh)?;
                if let Some(c) = new_c {
                    let dc = g.sub(c, cell)?;
                    let dc = g.mul_const(dc, m.clone())?;
                    cell = g.add(cell, dc)?;
                }
                g.mul_const(new_h, m)?
            };
            outputs[step] = g.reshape(out, &[b, 1, h])?;
        }
        let seq = if t == 0 {
            g.input(Tensor::zeros(&[b, 0, h]))
        } else {
            g.concat(&outputs, 1)?
        };
        Ok(DirectionOutput {
            seq: Steps::Value(seq),
            h: state,
            c: (self.cell == CellKind::Lstm).then_some(cell),
        })
    }

    fn err(&self, reason: String) -> NnError {
        NnError::Layer {
            layer: self.name.clone(),
            reason,
        }
    }

    pub fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        // PyTorch: every weight and bias ~ U(±1/√H).
        let a = 1.0 / (self.hidden_size.max(1) as f32).sqrt();
        let gh = self.cell.gates() * self.hidden_size;
        for layer in 0..self.num_layers {
            let input = if layer == 0 {
                self.input_size
            } else {
                self.hidden_size * self.directions()
            };
            for reverse in [false, true].into_iter().take(self.directions()) {
                for (what, shape) in [
                    ("weight_ih", vec![gh, input]),
                    ("weight_hh", vec![gh, self.hidden_size]),
                    ("bias_ih", vec![gh]),
                    ("bias_hh", vec![gh]),
                ] {
                    out.insert(self.pname(what, layer, reverse), random::uniform(&shape, -a, a, rng));
                }
            }
        }
    }

    pub fn param_count(&self) -> usize {
        let gh = self.cell.gates() * self.hidden_size;
        (0..self.num_layers)
            .map(|l| {
                let input = if l == 0 {
                    self.input_size
                } else {
                    self.hidden_size * self.directions()
                };
                self.directions() * (gh * input + gh * self.hidden_size + 2 * gh)
            })
            .sum()
    }
}

/// Many-to-one sequence classifier: embedding → recurrent layer → linear on the final state.
///
/// Its input is a `[B, T]` tensor of token ids (as f32, exact below 2²⁴); id 0 is padding
/// and is masked out.
#[derive(Debug, Clone)]
pub struct SequenceClassifier {
    pub body: TokenRnn,
    pub head: crate::Linear,
    pub pooling: Pooling,
    /// Dropout on the embedded tokens (training only): short texts overfit a fresh embedding
    /// table quickly, and this is the cheapest regulariser for it.
    pub embedding_dropout: f64,
}

/// How a sequence classifier turns the per-step outputs into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The final state of each direction (after the last real token).
    #[default]
    Last,
    /// The mean of the outputs over the real (non-padding) steps.
    Mean,
    /// The element-wise maximum of the outputs over the real steps (max-over-time pooling, as
    /// in Kim's 2014 sentence CNN).
    Max,
}

impl SequenceClassifier {
    pub fn new(
        cell: CellKind,
        vocab: usize,
        embed: usize,
        hidden: &[usize],
        bidirectional: bool,
        dropout: f64,
        classes: usize,
    ) -> Self {
        let body = TokenRnn::new(
            cell,
            (vocab, embed),
            hidden.first().copied().unwrap_or(64),
            hidden.len(),
            bidirectional,
            dropout,
        );
        let r = &body.rnn;
        let head =
            crate::Linear::new("head", r.hidden_size * r.directions(), classes).with_init(crate::Init::XavierUniform);
        SequenceClassifier {
            body,
            head,
            pooling: Pooling::Last,
            embedding_dropout: 0.0,
        }
    }

    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    pub fn with_embedding_dropout(mut self, p: f64) -> Self {
        self.embedding_dropout = p;
        self
    }

    /// One-hot token inputs instead of a learned embedding.
    pub fn with_one_hot(mut self) -> Self {
        self.body.one_hot();
        self
    }
}

/// Token ids → embedding → recurrent stack: the body of the classifier and the language model.
#[derive(Debug, Clone)]
pub struct TokenRnn {
    pub embedding: Embedding,
    pub rnn: Recurrent,
}

impl TokenRnn {
    /// `embedding` and `rnn`, `layers` (at least 1) of `hidden` units.
    fn new(
        cell: CellKind,
        (vocab, dim): (usize, usize),
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        dropout: f64,
    ) -> Self {
        TokenRnn {
            embedding: Embedding {
                name: "embedding".into(),
                vocab,
                dim,
                padding_idx: Some(0),
                one_hot: false,
            },
            rnn: Recurrent {
                name: "rnn".into(),
                cell,
                input_size: dim,
                hidden_size: hidden,
                num_layers: layers.max(1),
                bidirectional,
                dropout,
            },
        }
    }

    fn one_hot(&mut self) {
        self.embedding.one_hot_input();
        self.rnn.input_size = self.embedding.dim;
    }

    fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.embedding.init(rng, out);
        self.rnn.init(rng, out);
    }

    /// The embedded ids `x: [B, T]` (with `p` dropout on the embeddings) through the stack
    /// from `state`, the mask of real tokens, `B` and `T`.
    fn run(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        p: f64,
        state: Option<&[Tensor]>,
    ) -> Result<(RecurrentOutput, Tensor, usize, usize)> {
        let (ids, mask, b, t) = ids_and_mask(g.value(x))?;
        let emb = self.embedding.lookup(g, &ids, b, t)?;
        let emb = dropout(g, emb, p)?;
        let out = self.rnn.run_from(g, emb, &mask, state)?;
        Ok((out, mask, b, t))
    }

    fn describe(&self, t: usize, rows: &mut Vec<LayerSummary>) {
        let e = &self.embedding;
        rows.push(LayerSummary {
            name: e.name.clone(),
            kind: if e.one_hot {
                format!("OneHot({})", e.vocab)
            } else {
                format!("Embedding({}, {})", e.vocab, e.dim)
            },
            output: vec![t, e.dim],
            params: if e.one_hot { 0 } else { e.vocab * e.dim },
            flops: 0,
        });
        describe_rnn(&self.rnn, t, rows);
    }
}

/// Mean of `seq: [B, T, D]` over the steps where `mask: [B, T]` is 1. The recurrent layer
/// already zeroes padded outputs, so the masked sum is a plain sum.
fn masked_mean(g: &mut Graph<'_>, seq: Var, mask: &Tensor) -> Result<Var> {
    let sum = g.sum_axis(seq, 1, false)?;
    let b = mask.shape()[0];
    let t = mask.shape()[1];
    let inv: Vec<f32> = mask
        .as_slice()
        .chunks(t.max(1))
        .map(|row| 1.0 / row.iter().sum::<f32>().max(1.0))
        .collect();
    Ok(g.mul_const(sum, Tensor::from_vec(&[b, 1], inv)?)?)
}

/// Token ids and padding mask of an id batch `[B, T]`.
pub fn ids_and_mask(t: &Tensor) -> Result<(Vec<usize>, Tensor, usize, usize)> {
    let &[b, steps] = t.shape() else {
        return Err(NnError::Layer {
            layer: "embedding".into(),
            reason: format!("expects token ids [batch, time], got {:?}", t.shape()),
        });
    };
    let ids: Vec<usize> = t.as_slice().iter().map(|&v| v as usize).collect();
    let mask = Tensor::from_vec(
        &[b, steps],
        ids.iter().map(|&i| if i == 0 { 0.0 } else { 1.0 }).collect(),
    )?;
    Ok((ids, mask, b, steps))
}

impl Module for SequenceClassifier {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.body.init(rng, out);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (out, mask, _, _) = self.body.run(g, x, self.embedding_dropout, None)?;
        let pooled = match self.pooling {
            Pooling::Last => out.last,
            Pooling::Mean => {
                let seq = out.sequence(g)?;
                masked_mean(g, seq, &mask)?
            }
            Pooling::Max => {
                let seq = out.sequence(g)?;
                g.masked_max(seq, &mask)?
            }
        };
        self.head.forward(g, pooled)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = input.first().copied().unwrap_or(0);
        self.body.describe(t, rows);
        let r = &self.body.rnn;
        self.head.describe(&[r.hidden_size * r.directions()], rows)
    }
}

/// Next-token language model: embedding → unidirectional recurrent stack → one linear layer
/// to the vocabulary at every step.
///
/// Input `[B, T]` token ids; output `[B·T, vocab]` logits, row `b·T + t` predicting token
/// `t + 1` of sequence `b`, so the ordinary cross-entropy applies to the flattened targets.
#[derive(Debug, Clone)]
pub struct RecurrentLm {
    pub body: TokenRnn,
    pub head: crate::Linear,
    /// Dropout on the recurrent outputs before the head (and between stacked layers).
    pub dropout: f64,
}

impl RecurrentLm {
    pub fn new(cell: CellKind, vocab: usize, embed: usize, hidden: &[usize], dropout: f64) -> Self {
        let hidden_size = hidden.first().copied().unwrap_or(128);
        RecurrentLm {
            body: TokenRnn::new(cell, (vocab, embed), hidden_size, hidden.len(), false, dropout),
            head: crate::Linear::new("head", hidden_size, vocab).with_init(crate::Init::XavierUniform),
            dropout,
        }
    }

    /// One-hot token inputs instead of a learned embedding.
    pub fn with_one_hot(mut self) -> Self {
        self.body.one_hot();
        self
    }
}

impl Module for RecurrentLm {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.body.init(rng, out);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids → `[B·T, vocab]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        Ok(self.forward_carry(g, x, None)?.0)
    }

    fn carries_state(&self) -> bool {
        true
    }

    fn forward_carry(&self, g: &mut Graph<'_>, x: Var, state: Option<&[Tensor]>) -> Result<(Var, Vec<Var>)> {
        let (out, _, b, t) = self.body.run(g, x, 0.0, state)?;
        let seq = out.sequence(g)?;
        let seq = dropout(g, seq, self.dropout)?;
        let flat = g.reshape(seq, &[b * t, self.body.rnn.hidden_size])?;
        Ok((self.head.forward(g, flat)?, out.states))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = input.first().copied().unwrap_or(0);
        self.body.describe(t, rows);
        let per_step = self.head.describe(&[self.body.rnn.hidden_size], rows)?;
        if let Some(r) = rows.last_mut() {
            r.output = vec![t, self.body.embedding.vocab];
            r.flops *= t as u64;
        }
        Ok(vec![t, per_step.first().copied().unwrap_or(0)])
    }
}

/// Many-to-one regression over real-valued sequences (forecasting): `[B, T]` values (one
/// variable) → recurrent layer → linear on the final state → `[B, outputs]`.
#[derive(Debug, Clone)]
pub struct SequenceRegressor {
    pub rnn: Recurrent,
    pub head: crate::Linear,
}

impl SequenceRegressor {
    pub fn new(cell: CellKind, hidden: &[usize], dropout: f64, outputs: usize) -> Self {
        let hidden_size = hidden.first().copied().unwrap_or(32);
        SequenceRegressor {
            rnn: Recurrent {
                name: "rnn".into(),
                cell,
                input_size: 1,
                hidden_size,
                num_layers: hidden.len().max(1),
                bidirectional: false,
                dropout,
            },
            head: crate::Linear::new("head", hidden_size, outputs).with_init(crate::Init::XavierUniform),
        }
    }
}

impl Module for SequenceRegressor {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.rnn.init(rng, out);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` values → `[B, outputs]`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let &[b, t] = g.shape(x) else {
            return Err(self
                .rnn
                .err(format!("expects values [batch, time], got {:?}", g.shape(x))));
        };
        let x3 = g.reshape(x, &[b, t, 1])?;
        let mask = Tensor::ones(&[b, t]);
        let out = self.rnn.run(g, x3, &mask)?;
        self.head.forward(g, out.last)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let &[t] = input else {
            return Err(self
                .rnn
                .err(format!("expects one value per step [time], got {input:?}")));
        };
        describe_rnn(&self.rnn, t, rows);
        self.head.describe(&[self.rnn.hidden_size], rows)
    }
}

fn describe_rnn(r: &Recurrent, t: usize, rows: &mut Vec<LayerSummary>) {
    let gh = r.cell.gates() * r.hidden_size;
    rows.push(LayerSummary {
        name: r.name.clone(),
        kind: format!(
            "{:?}({} -> {}, layers {}, {})",
            r.cell,
            r.input_size,
            r.hidden_size,
            r.num_layers,
            if r.bidirectional { "bidirectional" } else { "forward" }
        ),
        output: vec![r.hidden_size * r.directions()],
        params: r.param_count(),
        flops: (2 * t * r.directions() * gh * (r.input_size + r.hidden_size) * r.num_layers) as u64,
    });
}

#[cfg(test)]
mod tests;
