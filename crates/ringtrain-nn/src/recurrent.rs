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
        let w = g.param(&format!("{}.weight", self.name))?;
        let rows = g.index_select(w, 0, ids)?;
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
    /// Every step's output of the last layer: `[B, T, H·directions]` (zeros at padding).
    pub sequence: Var,
    /// The last layer's final state: `[B, H·directions]` (forward, then backward).
    pub last: Var,
    /// Every layer's and direction's final state, `[B, H]` each, in the order
    /// [`Recurrent::run_from`] takes them back: per layer, per direction, h then (LSTM) c.
    pub states: Vec<Var>,
}

/// One direction's result: outputs `[B, T, H]`, final state and (LSTM) final cell `[B, H]`.
struct DirectionOutput {
    seq: Var,
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
        let mut last = x;
        let mut states = Vec::with_capacity(self.state_len());
        for layer in 0..self.num_layers {
            if layer > 0 && self.dropout > 0.0 && g.is_training() {
                let shape = g.shape(input).to_vec();
                let keep = 1.0 - self.dropout;
                let m = random::bernoulli(&shape, keep, g.rng()).scale((1.0 / keep) as f32);
                input = g.mul_const(input, m)?;
            }
            let mut outs = Vec::with_capacity(2);
            for reverse in [false, true].into_iter().take(self.directions()) {
                let start = init.as_mut().map(|it| {
                    let h0 = it.next().expect("length checked above");
                    let c0 = (self.cell == CellKind::Lstm).then(|| it.next().expect("length checked above"));
                    (h0, c0)
                });
                let out = self.direction(g, input, mask, layer, reverse, start)?;
                states.push(out.h);
                states.extend(out.c);
                outs.push(out);
            }
            (input, last) = match outs.as_slice() {
                [f, r] => (g.concat(&[f.seq, r.seq], 2)?, g.concat(&[f.h, r.h], 1)?),
                [f] => (f.seq, f.h),
                _ => unreachable!("one or two directions"),
            };
        }
        Ok(RecurrentOutput {
            sequence: input,
            last,
            states,
        })
    }

    /// One direction of one layer, from `init` (h, and c for an LSTM) or zeros.
    ///
    /// LSTM and GRU run as one fused op over all steps ([`Graph::lstm`], [`Graph::gru`]); the
    /// RNN cell is recorded step by step ([`Recurrent::direction_steps`]).
    fn direction(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        mask: &Tensor,
        layer: usize,
        reverse: bool,
        init: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<DirectionOutput> {
        let (b, t) = (g.shape(x)[0], g.shape(x)[1]);
        if self.cell == CellKind::Rnn || t == 0 {
            return self.direction_steps(g, x, mask, layer, reverse, init);
        }
        let h = self.hidden_size;
        let xp = self.input_projection(g, x, layer, reverse)?;
        let w_hh = g.param(&self.pname("weight_hh", layer, reverse))?;
        let b_hh = g.param(&self.pname("bias_hh", layer, reverse))?;
        // The fused ops return [B, T + 1, H] (GRU: steps, final h) or [B, T + 2, H] (LSTM:
        // steps, final h, final c).
        let packed = if self.cell == CellKind::Gru {
            g.gru(xp, w_hh, b_hh, mask, reverse, init.map(|(h0, _)| h0))?
        } else {
            let start = init.and_then(|(h0, c0)| Some((h0, c0?)));
            g.lstm(xp, w_hh, b_hh, mask, reverse, start)?
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
            seq: g.slice_axis(packed, 1, 0, t)?,
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
        layer: usize,
        reverse: bool,
        init: Option<(&Tensor, Option<&Tensor>)>,
    ) -> Result<DirectionOutput> {
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
            seq,
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
    pub embedding: Embedding,
    pub rnn: Recurrent,
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
        let hidden_size = hidden.first().copied().unwrap_or(64);
        let rnn = Recurrent {
            name: "rnn".into(),
            cell,
            input_size: embed,
            hidden_size,
            num_layers: hidden.len().max(1),
            bidirectional,
            dropout,
        };
        let head =
            crate::Linear::new("head", hidden_size * rnn.directions(), classes).with_init(crate::Init::XavierUniform);
        SequenceClassifier {
            embedding: Embedding {
                name: "embedding".into(),
                vocab,
                dim: embed,
                padding_idx: Some(0),
                one_hot: false,
            },
            rnn,
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
        self.embedding.one_hot_input();
        self.rnn.input_size = self.embedding.dim;
        self
    }
}

/// Inverted dropout (training only), as in [`crate::Dropout`].
fn dropout(g: &mut Graph<'_>, x: Var, p: f64) -> Result<Var> {
    if p <= 0.0 || !g.is_training() {
        return Ok(x);
    }
    let shape = g.shape(x).to_vec();
    let keep = 1.0 - p;
    let m = random::bernoulli(&shape, keep, g.rng()).scale((1.0 / keep) as f32);
    Ok(g.mul_const(x, m)?)
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
        self.embedding.init(rng, out);
        self.rnn.init(rng, out);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (ids, mask, b, t) = ids_and_mask(g.value(x))?;
        let emb = self.embedding.lookup(g, &ids, b, t)?;
        let emb = dropout(g, emb, self.embedding_dropout)?;
        let out = self.rnn.run(g, emb, &mask)?;
        let pooled = match self.pooling {
            Pooling::Last => out.last,
            Pooling::Mean => masked_mean(g, out.sequence, &mask)?,
            Pooling::Max => g.masked_max(out.sequence, &mask)?,
        };
        self.head.forward(g, pooled)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = input.first().copied().unwrap_or(0);
        describe_embedding_and_rnn(&self.embedding, &self.rnn, t, rows);
        let r = &self.rnn;
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
    pub embedding: Embedding,
    pub rnn: Recurrent,
    pub head: crate::Linear,
    /// Dropout on the recurrent outputs before the head (and between stacked layers).
    pub dropout: f64,
}

impl RecurrentLm {
    pub fn new(cell: CellKind, vocab: usize, embed: usize, hidden: &[usize], dropout: f64) -> Self {
        let hidden_size = hidden.first().copied().unwrap_or(128);
        RecurrentLm {
            embedding: Embedding {
                name: "embedding".into(),
                vocab,
                dim: embed,
                padding_idx: Some(0),
                one_hot: false,
            },
            rnn: Recurrent {
                name: "rnn".into(),
                cell,
                input_size: embed,
                hidden_size,
                num_layers: hidden.len().max(1),
                bidirectional: false,
                dropout,
            },
            head: crate::Linear::new("head", hidden_size, vocab).with_init(crate::Init::XavierUniform),
            dropout,
        }
    }

    /// One-hot token inputs instead of a learned embedding.
    pub fn with_one_hot(mut self) -> Self {
        self.embedding.one_hot_input();
        self.rnn.input_size = self.embedding.dim;
        self
    }
}

impl Module for RecurrentLm {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.embedding.init(rng, out);
        self.rnn.init(rng, out);
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
        let (ids, mask, b, t) = ids_and_mask(g.value(x))?;
        let emb = self.embedding.lookup(g, &ids, b, t)?;
        let out = self.rnn.run_from(g, emb, &mask, state)?;
        let seq = dropout(g, out.sequence, self.dropout)?;
        let flat = g.reshape(seq, &[b * t, self.rnn.hidden_size])?;
        Ok((self.head.forward(g, flat)?, out.states))
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = input.first().copied().unwrap_or(0);
        describe_embedding_and_rnn(&self.embedding, &self.rnn, t, rows);
        let per_step = self.head.describe(&[self.rnn.hidden_size], rows)?;
        if let Some(r) = rows.last_mut() {
            r.output = vec![t, self.embedding.vocab];
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

fn describe_embedding_and_rnn(e: &Embedding, r: &Recurrent, t: usize, rows: &mut Vec<LayerSummary>) {
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
    describe_rnn(r, t, rows);
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::init_store;
    use ringtrain_autograd::ParamStore;

    /// Central differences over every parameter and every input element, against backward.
    /// Loss = Σ w ⊙ output with fixed weights, so every output element matters.
    fn check_all(run: &dyn Fn(&mut Graph<'_>, Var) -> Var, store: &ParamStore, x: &Tensor) {
        let eval = |store: &ParamStore, x: &Tensor, grads: bool| {
            let mut g = Graph::new(store);
            let xv = g.variable(x.clone());
            let out = run(&mut g, xv);
            let w = random::uniform(g.shape(out), 0.5, 1.5, &mut random::rng(11));
            let w = g.input(w);
            let p = g.mul(out, w).unwrap();
            let loss = g.sum(p);
            let value = f64::from(g.value(loss).item().unwrap());
            if !grads {
                return (value, Vec::new(), None);
            }
            let gr = g.backward(loss).unwrap();
            let mut flat = vec![0.0; store.num_elements()];
            g.param_grads_into(&gr, &mut flat).unwrap();
            (value, flat, gr.get(xv).cloned())
        };
        let (_, analytic, dx) = eval(store, x, true);
        let eps = 1e-2f32;
        let mut s = store.clone();
        for k in 0..s.num_elements() {
            let orig = s.flat()[k];
            s.flat_mut()[k] = orig + eps;
            let plus = eval(&s, x, false).0;
            s.flat_mut()[k] = orig - eps;
            let minus = eval(&s, x, false).0;
            s.flat_mut()[k] = orig;
            let numeric = ((plus - minus) / (2.0 * f64::from(eps))) as f32;
            let name = &store.specs().iter().rfind(|p| p.offset <= k).unwrap().name;
            assert!(
                (analytic[k] - numeric).abs() <= 1e-2 + 1e-2 * numeric.abs(),
                "{name}[{k}]: {} vs {numeric}",
                analytic[k]
            );
        }
        let dx = dx.unwrap();
        let mut xs = x.clone();
        for k in 0..x.len() {
            let orig = xs.as_slice()[k];
            xs.as_mut_slice()[k] = orig + eps;
            let plus = eval(store, &xs, false).0;
            xs.as_mut_slice()[k] = orig - eps;
            let minus = eval(store, &xs, false).0;
            xs.as_mut_slice()[k] = orig;
            let numeric = ((plus - minus) / (2.0 * f64::from(eps))) as f32;
            assert!(
                (dx.as_slice()[k] - numeric).abs() <= 1e-2 + 1e-2 * numeric.abs(),
                "x[{k}]"
            );
        }
    }

    fn rnn(cell: CellKind, layers: usize, bidirectional: bool) -> Recurrent {
        Recurrent {
            name: "rnn".into(),
            cell,
            input_size: 3,
            hidden_size: 2,
            num_layers: layers,
            bidirectional,
            dropout: 0.0,
        }
    }

    #[test]
    fn every_cell_passes_gradcheck_through_time_with_a_mask() {
        let x = random::uniform(&[2, 4, 3], -1.0, 1.0, &mut random::rng(3));
        // second sequence has two padded steps at the end
        let mask = Tensor::from_vec(&[2, 4], vec![1., 1., 1., 1., 1., 1., 0., 0.]).unwrap();
        for cell in [CellKind::Rnn, CellKind::Gru, CellKind::Lstm] {
            for (layers, bi) in [(1, false), (2, true)] {
                let r = rnn(cell, layers, bi);
                let mut named = BTreeMap::new();
                r.init(&mut random::rng(5), &mut named);
                let store = ParamStore::from_named(named);
                assert_eq!(store.num_elements(), r.param_count());
                let run = |g: &mut Graph<'_>, x: Var| {
                    let out = r.run(g, x, &mask).unwrap();
                    let a = g.reshape(out.sequence, &[2, 4 * 2 * r.directions()]).unwrap();
                    g.concat(&[a, out.last], 1).unwrap()
                };
                check_all(&run, &store, &x);
            }
        }
    }

    #[test]
    fn fused_lstm_and_gru_equal_the_step_by_step_tape() {
        for cell in [CellKind::Lstm, CellKind::Gru] {
            fused_equals_steps(cell);
        }
    }

    fn fused_equals_steps(cell: CellKind) {
        let r = Recurrent {
            hidden_size: 5,
            // bidirectional for the reverse direction's parameters; each direction is run alone
            ..rnn(cell, 1, true)
        };
        let mut named = BTreeMap::new();
        r.init(&mut random::rng(2), &mut named);
        let store = ParamStore::from_named(named);
        let x = random::uniform(&[3, 6, 3], -1.0, 1.0, &mut random::rng(4));
        // row 1 has a gap, row 2 trailing padding
        let mask = Tensor::from_vec(
            &[3, 6],
            vec![1., 1., 1., 1., 1., 1., 1., 1., 0., 1., 1., 1., 1., 1., 1., 1., 0., 0.],
        )
        .unwrap();
        for reverse in [false, true] {
            let run = |fused: bool| {
                let mut g = Graph::new(&store);
                let xv = g.variable(x.clone());
                // from a carried state, so that the initial state's path is compared too
                let (h0, c0) = (Tensor::full(&[3, 5], 0.3), Tensor::full(&[3, 5], -0.2));
                let start = Some((&h0, (cell == CellKind::Lstm).then_some(&c0)));
                let out = if fused {
                    r.direction(&mut g, xv, &mask, 0, reverse, start).unwrap()
                } else {
                    r.direction_steps(&mut g, xv, &mask, 0, reverse, start).unwrap()
                };
                let (seq, last) = (out.seq, out.h);
                let cell = out.c.unwrap_or(last);
                let w = g.input(random::uniform(&[3, 6, 5], 0.5, 1.5, &mut random::rng(9)));
                let ws = g.mul(seq, w).unwrap();
                let (a, b) = (g.sum(ws), g.sum(last));
                let ab = g.add(a, b).unwrap();
                let c = g.sum(cell);
                let loss = g.add(ab, c).unwrap();
                let grads = g.backward(loss).unwrap();
                let mut flat = vec![0.0; store.num_elements()];
                g.param_grads_into(&grads, &mut flat).unwrap();
                let mut values = g.value(seq).to_vec();
                values.extend(g.value(last).to_vec());
                values.extend(g.value(cell).to_vec());
                (values, flat, grads.get(xv).unwrap().to_vec())
            };
            let (fused, steps) = (run(true), run(false));
            for (what, a, b) in [
                ("outputs", &fused.0, &steps.0),
                ("params", &fused.1, &steps.1),
                ("x", &fused.2, &steps.2),
            ] {
                for (k, (u, v)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (u - v).abs() <= 1e-5 * (1.0 + v.abs()),
                        "reverse {reverse} {what}[{k}]: {u} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_carried_state_continues_the_sequence_exactly() {
        // two windows with the state carried equal one run over the joined sequence
        for cell in [CellKind::Lstm, CellKind::Gru] {
            let lm = RecurrentLm::new(cell, 9, 4, &[5, 3], 0.0);
            let store = init_store(&lm, 3);
            let ids = |v: &[usize]| Tensor::from_vec(&[2, v.len() / 2], v.iter().map(|&i| i as f32).collect()).unwrap();
            let (a, b) = ([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]);
            let joined: Vec<usize> = [&a[..4], &b[..4], &a[4..], &b[4..]].concat();
            let mut g = Graph::inference(&store);
            let (xa, xb, xj) = (g.input(ids(&a)), g.input(ids(&b)), g.input(ids(&joined)));
            let (_, state) = lm.forward_carry(&mut g, xa, None).unwrap();
            assert_eq!(state.len(), lm.rnn.state_len());
            let carried: Vec<Tensor> = state.iter().map(|&v| g.value(v).clone()).collect();
            let (second, _) = lm.forward_carry(&mut g, xb, Some(&carried)).unwrap();
            let whole = lm.forward(&mut g, xj).unwrap();
            // logits rows are (batch row, step): the second window is steps 4..8 of each row
            let (sv, wv) = (g.value(second).to_vec(), g.value(whole).to_vec());
            for row in 0..2 {
                for step in 0..4 {
                    let got = &sv[(row * 4 + step) * 9..][..9];
                    let want = &wv[(row * 8 + 4 + step) * 9..][..9];
                    for (x, y) in got.iter().zip(want) {
                        assert!(
                            (x - y).abs() < 1e-5,
                            "{cell:?} row {row} step {step}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
            let fresh = lm.forward(&mut g, xb).unwrap();
            assert_ne!(
                g.value(fresh).to_vec(),
                sv,
                "{cell:?}: the carried state changed nothing"
            );
        }
    }

    /// Outputs, final states and every gradient of a 2-layer bidirectional RNN, GRU and LSTM
    /// against PyTorch with the same weights (`fixtures/pytorch_rnn.py` made the values).
    #[test]
    fn matches_pytorch_rnn_gru_and_lstm() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!("fixtures/pytorch_rnn.json")).unwrap();
        for (key, cell) in [("rnn", CellKind::Rnn), ("gru", CellKind::Gru), ("lstm", CellKind::Lstm)] {
            let case = &fixture[key];
            let r = Recurrent {
                input_size: 3,
                hidden_size: 4,
                ..rnn(cell, 2, true)
            };
            let named = crate::pytorch_fixture::params(case);
            let store = ParamStore::from_named(named);
            assert_eq!(store.num_elements(), r.param_count(), "{key}: parameter count");
            let x = crate::pytorch_fixture::tensor(&case["x"]);
            let mut g = Graph::new(&store);
            let xv = g.variable(x);
            let out = r.run(&mut g, xv, &Tensor::ones(&[2, 5])).unwrap();
            crate::pytorch_fixture::assert_close(
                &format!("{key} output"),
                g.value(out.sequence).as_slice(),
                crate::pytorch_fixture::tensor(&case["output"]).as_slice(),
                2e-5,
            );
            // states: per layer and direction, h then (LSTM) c; PyTorch stacks h_n and c_n apart
            let per = if cell == CellKind::Lstm { 2 } else { 1 };
            let h: Vec<Var> = out.states.iter().step_by(per).copied().collect();
            let h_values: Vec<f32> = h.iter().flat_map(|&v| g.value(v).to_vec()).collect();
            crate::pytorch_fixture::assert_close(
                &format!("{key} h_n"),
                &h_values,
                crate::pytorch_fixture::tensor(&case["h_n"]).as_slice(),
                2e-5,
            );
            if cell == CellKind::Lstm {
                let c: Vec<f32> = out
                    .states
                    .iter()
                    .skip(1)
                    .step_by(2)
                    .flat_map(|&v| g.value(v).to_vec())
                    .collect();
                crate::pytorch_fixture::assert_close(
                    "lstm c_n",
                    &c,
                    crate::pytorch_fixture::tensor(&case["c_n"]).as_slice(),
                    2e-5,
                );
            }
            let w = g.input(crate::pytorch_fixture::tensor(&case["w"]));
            let weighted = g.mul(out.sequence, w).unwrap();
            let mut loss = g.sum(weighted);
            for v in h {
                let s = g.sum(v);
                loss = g.add(loss, s).unwrap();
            }
            let grads = g.backward(loss).unwrap();
            crate::pytorch_fixture::assert_close(
                &format!("{key} dx"),
                grads.get(xv).unwrap().as_slice(),
                crate::pytorch_fixture::tensor(&case["dx"]).as_slice(),
                2e-5,
            );
            let mut flat = vec![0.0; store.num_elements()];
            g.param_grads_into(&grads, &mut flat).unwrap();
            crate::pytorch_fixture::assert_param_grads(key, case, &store, &flat, 2e-5);
        }
    }

    #[test]
    fn padded_steps_do_not_change_the_final_state() {
        let r = rnn(CellKind::Lstm, 1, true);
        let mut named = BTreeMap::new();
        r.init(&mut random::rng(5), &mut named);
        let store = ParamStore::from_named(named);
        let x = random::uniform(&[1, 3, 3], -1.0, 1.0, &mut random::rng(3));
        let mut g = Graph::inference(&store);
        let xv = g.input(x.clone());
        let short = r.run(&mut g, xv, &Tensor::ones(&[1, 3])).unwrap();
        // same sequence with two padding steps appended (garbage values under the mask)
        let padded = Tensor::concat(1, &[&x, &Tensor::full(&[1, 2, 3], 7.0)]).unwrap();
        let pv = g.input(padded);
        let mask = Tensor::from_vec(&[1, 5], vec![1., 1., 1., 0., 0.]).unwrap();
        let long = r.run(&mut g, pv, &mask).unwrap();
        let (a, b) = (g.value(short.last).to_vec(), g.value(long.last).to_vec());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bidirectional_equals_two_unidirectional_layers_one_on_reversed_input() {
        for cell in [CellKind::Gru, CellKind::Lstm] {
            bidirectional_is_two_directions(cell);
        }
    }

    fn bidirectional_is_two_directions(cell: CellKind) {
        let bi = rnn(cell, 1, true);
        let mut named = BTreeMap::new();
        bi.init(&mut random::rng(8), &mut named);
        let store = ParamStore::from_named(named.clone());
        // a forward-only layer whose weights are the reverse direction's
        let rev_named: BTreeMap<String, Tensor> = named
            .iter()
            .filter_map(|(k, v)| k.strip_suffix("_reverse").map(|k| (k.to_string(), v.clone())))
            .collect();
        let rev_store = ParamStore::from_named(rev_named);
        let uni = rnn(cell, 1, false);
        let x = random::uniform(&[2, 5, 3], -1.0, 1.0, &mut random::rng(1));
        let ones = Tensor::ones(&[2, 5]);
        let mut g = Graph::inference(&store);
        let xv = g.input(x.clone());
        let both = bi.run(&mut g, xv, &ones).unwrap();
        let fwd = uni.run(&mut g, xv, &ones).unwrap();
        let reversed = Tensor::concat(
            1,
            &(0..5)
                .rev()
                .map(|t| x.slice_axis(1, t, t + 1).unwrap())
                .collect::<Vec<_>>()
                .iter()
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut h = Graph::inference(&rev_store);
        let rv = h.input(reversed);
        let bwd = uni.run(&mut h, rv, &ones).unwrap();
        let both_last = g.value(both.last).to_vec();
        let mut want = Vec::new();
        for row in 0..2 {
            want.extend_from_slice(&g.value(fwd.last).as_slice()[row * 2..row * 2 + 2]);
            want.extend_from_slice(&h.value(bwd.last).as_slice()[row * 2..row * 2 + 2]);
        }
        assert_eq!(both_last, want);
        // per-step outputs: backward direction's output at t is the reversed run's at T-1-t
        let seq = g.value(both.sequence);
        let rseq = h.value(bwd.sequence);
        for t in 0..5 {
            for k in 0..2 {
                assert_eq!(seq.as_slice()[t * 4 + 2 + k], rseq.as_slice()[(4 - t) * 2 + k]);
            }
        }
    }

    #[test]
    fn classifier_runs_on_padded_ids_and_names_params_like_pytorch() {
        let m = SequenceClassifier::new(CellKind::Lstm, 20, 4, &[5], true, 0.0, 2);
        let store = init_store(&m, 1);
        for name in [
            "embedding.weight",
            "rnn.weight_ih_l0",
            "rnn.weight_hh_l0_reverse",
            "rnn.bias_hh_l0",
            "head.weight",
        ] {
            assert!(store.spec(name).is_some(), "{name}");
        }
        assert_eq!(store.spec("rnn.weight_ih_l0").unwrap().shape, vec![20, 4]);
        let ids = Tensor::from_vec(&[2, 3], vec![5., 6., 7., 8., 0., 0.]).unwrap();
        let mut g = Graph::new(&store);
        let x = g.input(ids);
        let y = m.forward(&mut g, x).unwrap();
        assert_eq!(g.shape(y), &[2, 2]);
        let loss = g.cross_entropy(y, &[0, 1]).unwrap();
        let grads = g.backward(loss).unwrap();
        let mut flat = vec![0.0; store.num_elements()];
        g.param_grads_into(&grads, &mut flat).unwrap();
        // the padding row of the embedding gets no gradient
        let e = store.spec("embedding.weight").unwrap();
        assert!(flat[e.offset..e.offset + 4].iter().all(|&v| v == 0.0));
        assert!(flat[e.offset + 5 * 4..e.offset + 6 * 4].iter().any(|&v| v != 0.0));
        let mut rows = Vec::new();
        assert_eq!(m.describe(&[3], &mut rows).unwrap(), vec![2]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    }

    #[test]
    fn language_model_logits_depend_only_on_the_past() {
        let m = RecurrentLm::new(CellKind::Gru, 12, 4, &[6], 0.0);
        let store = init_store(&m, 3);
        let logits = |ids: Vec<f32>| {
            let mut g = Graph::inference(&store);
            let x = g.input(Tensor::from_vec(&[1, 5], ids).unwrap());
            let y = m.forward(&mut g, x).unwrap();
            assert_eq!(g.shape(y), &[5, 12]);
            g.value(y).as_slice().to_vec()
        };
        let a = logits(vec![2., 5., 6., 7., 8.]);
        let b = logits(vec![2., 5., 6., 9., 10.]);
        // Positions 0..=2 saw the same prefix; position 3 saw another token.
        assert_eq!(a[..3 * 12], b[..3 * 12]);
        assert_ne!(a[3 * 12..4 * 12], b[3 * 12..4 * 12]);
        let mut rows = Vec::new();
        assert_eq!(m.describe(&[5], &mut rows).unwrap(), vec![5, 12]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    }

    #[test]
    fn regressor_maps_a_window_to_one_value_and_passes_gradcheck() {
        let m = SequenceRegressor::new(CellKind::Lstm, &[3], 0.0, 1);
        let store = init_store(&m, 4);
        let x = random::uniform(&[2, 4], -1.0, 1.0, &mut random::rng(5));
        check_all(&|g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap(), &store, &x);
        let mut rows = Vec::new();
        assert_eq!(m.describe(&[4], &mut rows).unwrap(), vec![1]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
    }
}
