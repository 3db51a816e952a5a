//! Transformer layers and models: layer norm, multi-head attention, positional encodings,
//! encoder and decoder layers, and three models (sequence classifier, decoder-only language
//! model, encoder–decoder).
//!
//! # Layout (PyTorch's, so weights are comparable by name)
//! - [`MultiHeadAttention`] is `nn.MultiheadAttention`: `in_proj_weight: [3d, d]` (q, k, v
//!   stacked), `in_proj_bias: [3d]`, `out_proj.weight: [d, d]`, `out_proj.bias: [d]`.
//! - [`TransformerBlock`] is `nn.TransformerEncoderLayer` (`self_attn`, `linear1`, `linear2`,
//!   `norm1`, `norm2`); [`TransformerDecoderLayer`] is `nn.TransformerDecoderLayer` (plus
//!   `multihead_attn` and `norm3`). Stacks are `encoder.layers.{i}` / `decoder.layers.{i}` with
//!   a final `encoder.norm` / `decoder.norm` when the layers are pre-norm.
//!
//! # Computation
//! Activations stay batch-first `[B, T, d]` throughout. The packed q/k/v projection is one
//! sgemm over all `B·T` rows, and the fused attention op reads q, k and v as column blocks of
//! its output (no head permutations; see `ringtrain_tensor::attention`).
//!
//! # Token ids
//! Models take token ids as an f32 `[B, T]` tensor with 0 = PAD, like
//! [`SequenceClassifier`](crate::SequenceClassifier). PAD keys are never attended (key padding
//! mask), and PAD positions are left out of pooling.

use std::collections::BTreeMap;

use ringtrain_autograd::{AttentionOpts, Cols, Graph, ParamStore, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use crate::{ids_and_mask, Embedding, Init, LayerSummary, Linear, Module, NnError, Pooling, Result};

fn layer_err(layer: &str, reason: impl Into<String>) -> NnError {
    NnError::Layer {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

/// `[B, T, d]` of a value, or an error naming `layer`.
fn btd(g: &Graph<'_>, x: Var, layer: &str, d: usize) -> Result<(usize, usize)> {
    match *g.shape(x) {
        [b, t, w] if w == d => Ok((b, t)),
        ref s => Err(layer_err(layer, format!("expects [batch, time, {d}], got {s:?}"))),
    }
}

/// A [`Linear`] through the fused `x · wᵀ + b` op, on `[..., in]` inputs without reshapes.
fn linear(g: &mut Graph<'_>, l: &Linear, x: Var) -> Result<Var> {
    let w = g.param(&format!("{}.weight", l.name))?;
    let b = if l.bias {
        Some(g.param(&format!("{}.bias", l.name))?)
    } else {
        None
    };
    g.linear(x, w, b).map_err(|e| layer_err(&l.name, e.to_string()))
}

/// Layer normalisation over the last axis (`nn.LayerNorm(dim)`): `weight` starts at ones,
/// `bias` at zeros, `eps = 1e-5`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub name: String,
    pub dim: usize,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(name: impl Into<String>, dim: usize) -> LayerNorm {
        LayerNorm {
            name: name.into(),
            dim,
            eps: 1e-5,
        }
    }

    fn row(&self, input: &[usize]) -> LayerSummary {
        LayerSummary {
            name: self.name.clone(),
            kind: format!("LayerNorm({})", self.dim),
            output: input.to_vec(),
            params: 2 * self.dim,
            flops: 8 * input.iter().product::<usize>() as u64,
        }
    }
}

impl Module for LayerNorm {
    fn init_params(&self, _rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        out.insert(format!("{}.weight", self.name), Tensor::ones(&[self.dim]));
        out.insert(format!("{}.bias", self.name), Tensor::zeros(&[self.dim]));
    }

    /// # Shapes
    /// `[..., dim] -> [..., dim]`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        if g.shape(x).last() != Some(&self.dim) {
            return Err(layer_err(
                &self.name,
                format!("expects a last axis of {}, got {:?}", self.dim, g.shape(x)),
            ));
        }
        let w = g.param(&format!("{}.weight", self.name))?;
        let b = g.param(&format!("{}.bias", self.name))?;
        Ok(g.layer_norm(x, w, b, self.eps)?)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        if input.last() != Some(&self.dim) {
            return Err(layer_err(
                &self.name,
                format!("expects a last axis of {}, got {input:?}", self.dim),
            ));
        }
        rows.push(self.row(input));
        Ok(input.to_vec())
    }
}

/// The nonlinearity of the position-wise feed-forward network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfActivation {
    Relu,
    /// Exact (erf) GELU.
    Gelu,
}

/// Where a block normalises: after each residual sum (the original transformer, PyTorch's
/// default `norm_first=False`) or before each sublayer (GPT-2 style, easier to train deep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    Post,
    Pre,
}

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Fixed sinusoids (Vaswani et al.), any length.
    Sinusoidal,
    /// A learned `[max_len, d]` table.
    Learned,
    /// No positions: the encoder is then permutation-equivariant.
    None,
}

/// The sinusoidal table of Vaswani et al.: `PE[pos, 2k] = sin(pos·ω_k)`,
/// `PE[pos, 2k+1] = cos(pos·ω_k)` with `ω_k = 1/10000^{2k/d}`.
pub fn sinusoidal_positions(len: usize, dim: usize) -> Tensor {
    let mut v = vec![0.0f32; len * dim];
    for pos in 0..len {
        for k in 0..dim.div_ceil(2) {
            // in f64: pos·ω reaches thousands of radians for long sequences
            let omega = 1.0 / 10000f64.powf(2.0 * k as f64 / dim as f64);
            let angle = pos as f64 * omega;
            v[pos * dim + 2 * k] = angle.sin() as f32;
            if 2 * k + 1 < dim {
                v[pos * dim + 2 * k + 1] = angle.cos() as f32;
            }
        }
    }
    Tensor::from_vec(&[len, dim], v).expect("length matches shape by construction")
}

/// Adds position information to `[B, T, d]` embeddings. A learned table is the bare parameter
/// `name` (`[max_len, d]`, like a ViT/BERT `pos_embedding`).
#[derive(Debug, Clone)]
pub struct PositionalEncoding {
    pub name: String,
    pub kind: Positions,
    pub max_len: usize,
    pub dim: usize,
}

impl PositionalEncoding {
    pub fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        if self.kind == Positions::Learned {
            // BERT/GPT-2: N(0, 0.02²)
            out.insert(self.name.clone(), random::normal(&[self.max_len, self.dim], 0.02, rng));
        }
    }

    fn check_len(&self, t: usize) -> Result<()> {
        if self.kind == Positions::Learned && t > self.max_len {
            return Err(layer_err(
                &self.name,
                format!(
                    "sequence of {t} positions is longer than the learned table ({})",
                    self.max_len
                ),
            ));
        }
        Ok(())
    }

    /// # Shapes
    /// `[B, T, d] -> [B, T, d]`.
    pub fn add(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (_, t) = btd(g, x, &self.name, self.dim)?;
        self.check_len(t)?;
        let table = match self.kind {
            Positions::None => return Ok(x),
            Positions::Sinusoidal => g.input(sinusoidal_positions(t, self.dim)),
            Positions::Learned => {
                let p = g.param(&self.name)?;
                if t == self.max_len {
                    p
                } else {
                    g.slice_axis(p, 0, 0, t)?
                }
            }
        };
        Ok(g.add(x, table)?)
    }

    fn row(&self, t: usize) -> LayerSummary {
        LayerSummary {
            name: self.name.clone(),
            kind: format!("{:?}Positions({})", self.kind, self.dim),
            output: vec![t, self.dim],
            params: if self.kind == Positions::Learned {
                self.max_len * self.dim
            } else {
                0
            },
            flops: (t * self.dim) as u64,
        }
    }
}

/// Multi-head attention with PyTorch's `nn.MultiheadAttention` parameters (see the module
/// docs), usable as self-attention or cross-attention.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub name: String,
    pub dim: usize,
    pub heads: usize,
    /// Dropout on the attention probabilities (training only).
    pub dropout: f64,
}

/// Which keys a query may see.
#[derive(Debug, Clone, Default)]
pub struct AttentionMask {
    /// `[B, Tk]`, 1 = real key, 0 = padding.
    pub key_mask: Option<Tensor>,
    /// Query `t` sees keys `≤ t` only.
    pub causal: bool,
}

impl MultiHeadAttention {
    pub fn new(name: impl Into<String>, dim: usize, heads: usize) -> MultiHeadAttention {
        MultiHeadAttention {
            name: name.into(),
            dim,
            heads,
            dropout: 0.0,
        }
    }

    fn check(&self) -> Result<()> {
        if self.heads == 0 || self.dim % self.heads != 0 {
            return Err(layer_err(
                &self.name,
                format!("d_model {} does not split into {} heads", self.dim, self.heads),
            ));
        }
        Ok(())
    }

    fn pname(&self, what: &str) -> String {
        format!("{}.{what}", self.name)
    }

    fn opts(&self, mask: &AttentionMask) -> AttentionOpts {
        AttentionOpts {
            heads: self.heads,
            causal: mask.causal,
            key_mask: mask.key_mask.clone(),
            dropout: self.dropout as f32,
            ..AttentionOpts::default()
        }
    }

    /// Self-attention over `x: [B, T, d]` → `[B, T, d]`; with `keep_probs`, also the attention
    /// probabilities `[B, H, T, T]`.
    pub fn self_attention(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        mask: &AttentionMask,
        keep_probs: bool,
    ) -> Result<(Var, Option<Tensor>)> {
        self.check()?;
        btd(g, x, &self.name, self.dim)?;
        let d = self.dim;
        let w = g.param(&self.pname("in_proj_weight"))?;
        let b = g.param(&self.pname("in_proj_bias"))?;
        // one product for q, k and v of all positions; attention reads its column blocks
        let qkv = g.linear(x, w, Some(b))?;
        let at = |offset| Cols { var: qkv, offset };
        let (o, probs) = g
            .attention_cols(at(0), at(d), at(2 * d), d, &self.opts(mask), keep_probs)
            .map_err(|e| layer_err(&self.name, e.to_string()))?;
        Ok((self.out_proj(g, o)?, probs))
    }

    /// Cross-attention: queries from `x: [B, Tq, d]`, keys and values from
    /// `memory: [B, Tk, d]` → `[B, Tq, d]` (and `[B, H, Tq, Tk]` probabilities with
    /// `keep_probs`). `mask.key_mask` is `[B, Tk]`, over the memory.
    pub fn cross_attention(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        memory: Var,
        mask: &AttentionMask,
        keep_probs: bool,
    ) -> Result<(Var, Option<Tensor>)> {
        self.check()?;
        btd(g, x, &self.name, self.dim)?;
        btd(g, memory, &self.name, self.dim)?;
        let d = self.dim;
        let w = g.param(&self.pname("in_proj_weight"))?;
        let b = g.param(&self.pname("in_proj_bias"))?;
        // rows 0..d of in_proj project the queries, rows d..3d keys and values
        let (wq, bq) = (g.slice_axis(w, 0, 0, d)?, g.slice_axis(b, 0, 0, d)?);
        let (wkv, bkv) = (g.slice_axis(w, 0, d, 3 * d)?, g.slice_axis(b, 0, d, 3 * d)?);
        let q = g.linear(x, wq, Some(bq))?;
        let kv = g.linear(memory, wkv, Some(bkv))?;
        let (o, probs) = g
            .attention_cols(
                Cols { var: q, offset: 0 },
                Cols { var: kv, offset: 0 },
                Cols { var: kv, offset: d },
                d,
                &self.opts(mask),
                keep_probs,
            )
            .map_err(|e| layer_err(&self.name, e.to_string()))?;
        Ok((self.out_proj(g, o)?, probs))
    }

    fn out_proj(&self, g: &mut Graph<'_>, o: Var) -> Result<Var> {
        let w = g.param(&self.pname("out_proj.weight"))?;
        let b = g.param(&self.pname("out_proj.bias"))?;
        Ok(g.linear(o, w, Some(b))?)
    }

    pub fn param_count(&self) -> usize {
        4 * self.dim * self.dim + 4 * self.dim
    }

    /// Multiply-adds ×2 for one example with `tq` queries over `tk` keys.
    fn flops(&self, tq: usize, tk: usize) -> u64 {
        let d = self.dim;
        (2 * (tq * d * d + tk * 2 * d * d) + 4 * tq * tk * d + 2 * tq * d * d) as u64
    }

    fn row(&self, tq: usize, tk: usize) -> Result<LayerSummary> {
        self.check()?;
        Ok(LayerSummary {
            name: self.name.clone(),
            kind: format!("MultiHeadAttention({}, heads {})", self.dim, self.heads),
            output: vec![tq, self.dim],
            params: self.param_count(),
            flops: self.flops(tq, tk),
        })
    }
}

impl Module for MultiHeadAttention {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        let d = self.dim;
        // PyTorch: xavier_uniform_ on the whole [3d, d] in_proj, zero biases, out_proj with
        // Linear's default U(±1/√d).
        out.insert(
            self.pname("in_proj_weight"),
            Init::XavierUniform.sample(&[3 * d, d], d, 3 * d, rng),
        );
        out.insert(self.pname("in_proj_bias"), Tensor::zeros(&[3 * d]));
        out.insert(
            self.pname("out_proj.weight"),
            Init::LecunUniform.sample(&[d, d], d, d, rng),
        );
        out.insert(self.pname("out_proj.bias"), Tensor::zeros(&[d]));
    }

    /// Unmasked self-attention.
    ///
    /// # Shapes
    /// `[B, T, d] -> [B, T, d]`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        Ok(self.self_attention(g, x, &AttentionMask::default(), false)?.0)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        match *input {
            [t, d] if d == self.dim => {
                rows.push(self.row(t, t)?);
                Ok(input.to_vec())
            }
            _ => Err(layer_err(
                &self.name,
                format!("expects [time, {}] per example, got {input:?}", self.dim),
            )),
        }
    }
}

/// Sizes and choices shared by the blocks of one stack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    pub dim: usize,
    pub heads: usize,
    pub ff: usize,
    pub dropout: f64,
    pub activation: FfActivation,
    pub norm: NormPlacement,
}

/// The position-wise feed-forward network `linear2(dropout(act(linear1(x))))`.
#[derive(Debug, Clone)]
struct FeedForward {
    linear1: Linear,
    linear2: Linear,
    activation: FfActivation,
    dropout: f64,
}

impl FeedForward {
    fn new(name: &str, cfg: &BlockConfig) -> FeedForward {
        FeedForward {
            linear1: Linear::new(format!("{name}.linear1"), cfg.dim, cfg.ff),
            linear2: Linear::new(format!("{name}.linear2"), cfg.ff, cfg.dim),
            activation: cfg.activation,
            dropout: cfg.dropout,
        }
    }

    fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.linear1.init_params(rng, out);
        self.linear2.init_params(rng, out);
    }

    fn run(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let h = linear(g, &self.linear1, x)?;
        let h = match self.activation {
            FfActivation::Relu => g.relu(h),
            FfActivation::Gelu => g.gelu(h),
        };
        let h = g.dropout(h, self.dropout)?;
        linear(g, &self.linear2, h)
    }

    fn rows(&self, t: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
        self.linear1.describe(&[t, self.linear1.in_features], rows)?;
        self.linear2.describe(&[t, self.linear2.in_features], rows)?;
        Ok(())
    }
}

/// A residual sublayer: `norm(x + dropout(f(x)))` post-norm, `x + dropout(f(norm(x)))`
/// pre-norm.
fn residual(
    g: &mut Graph<'_>,
    x: Var,
    norm: &LayerNorm,
    placement: NormPlacement,
    dropout: f64,
    f: impl FnOnce(&mut Graph<'_>, Var) -> Result<Var>,
) -> Result<Var> {
    match placement {
        NormPlacement::Post => {
            let y = f(g, x)?;
            let y = g.dropout(y, dropout)?;
            let s = g.add(x, y)?;
            norm.forward(g, s)
        }
        NormPlacement::Pre => {
            let h = norm.forward(g, x)?;
            let y = f(g, h)?;
            let y = g.dropout(y, dropout)?;
            Ok(g.add(x, y)?)
        }
    }
}

/// A transformer encoder layer (`nn.TransformerEncoderLayer`): self-attention and a
/// position-wise feed-forward network, each with a residual connection, dropout and layer norm
/// (pre- or post-norm). With a causal mask it is also the block of a decoder-only model.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    pub name: String,
    pub cfg: BlockConfig,
    pub self_attn: MultiHeadAttention,
    ff: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
}

impl TransformerBlock {
    pub fn new(name: impl Into<String>, cfg: BlockConfig) -> TransformerBlock {
        let name = name.into();
        TransformerBlock {
            self_attn: MultiHeadAttention {
                dropout: cfg.dropout,
                ..MultiHeadAttention::new(format!("{name}.self_attn"), cfg.dim, cfg.heads)
            },
            ff: FeedForward::new(&name, &cfg),
            norm1: LayerNorm::new(format!("{name}.norm1"), cfg.dim),
            norm2: LayerNorm::new(format!("{name}.norm2"), cfg.dim),
            name,
            cfg,
        }
    }

    /// Runs the block on `x: [B, T, d]` with `mask` → `[B, T, d]`. When `probs` is given, the
    /// self-attention probabilities `[B, H, T, T]` are pushed onto it.
    pub fn run(&self, g: &mut Graph<'_>, x: Var, mask: &AttentionMask, probs: Option<&mut Vec<Tensor>>) -> Result<Var> {
        btd(g, x, &self.name, self.cfg.dim)?;
        let keep = probs.is_some();
        let mut seen = None;
        let x = residual(g, x, &self.norm1, self.cfg.norm, self.cfg.dropout, |g, h| {
            let (y, p) = self.self_attn.self_attention(g, h, mask, keep)?;
            seen = p;
            Ok(y)
        })?;
        if let (Some(out), Some(p)) = (probs, seen) {
            out.push(p);
        }
        residual(g, x, &self.norm2, self.cfg.norm, self.cfg.dropout, |g, h| {
            self.ff.run(g, h)
        })
    }

    pub fn param_count(&self) -> usize {
        let BlockConfig { dim: d, ff, .. } = self.cfg;
        self.self_attn.param_count() + 2 * d * ff + ff + d + 4 * d
    }

    fn rows(&self, t: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
        rows.push(self.self_attn.row(t, t)?);
        rows.push(self.norm1.row(&[t, self.cfg.dim]));
        self.ff.rows(t, rows)?;
        rows.push(self.norm2.row(&[t, self.cfg.dim]));
        Ok(())
    }
}

impl Module for TransformerBlock {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.self_attn.init_params(rng, out);
        self.ff.init(rng, out);
        self.norm1.init_params(rng, out);
        self.norm2.init_params(rng, out);
    }

    /// Unmasked, non-causal.
    ///
    /// # Shapes
    /// `[B, T, d] -> [B, T, d]`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        self.run(g, x, &AttentionMask::default(), None)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        match *input {
            [t, d] if d == self.cfg.dim => {
                self.rows(t, rows)?;
                Ok(input.to_vec())
            }
            _ => Err(layer_err(
                &self.name,
                format!("expects [time, {}] per example, got {input:?}", self.cfg.dim),
            )),
        }
    }
}

/// A transformer decoder layer (`nn.TransformerDecoderLayer`): causal self-attention,
/// cross-attention over the encoder's memory, feed-forward; residuals, dropout, layer norms.
#[derive(Debug, Clone)]
pub struct TransformerDecoderLayer {
    pub name: String,
    pub cfg: BlockConfig,
    pub self_attn: MultiHeadAttention,
    pub multihead_attn: MultiHeadAttention,
    ff: FeedForward,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
}

impl TransformerDecoderLayer {
    pub fn new(name: impl Into<String>, cfg: BlockConfig) -> TransformerDecoderLayer {
        let name = name.into();
        let mha = |what: &str| MultiHeadAttention {
            dropout: cfg.dropout,
            ..MultiHeadAttention::new(format!("{name}.{what}"), cfg.dim, cfg.heads)
        };
        TransformerDecoderLayer {
            self_attn: mha("self_attn"),
            multihead_attn: mha("multihead_attn"),
            ff: FeedForward::new(&name, &cfg),
            norm1: LayerNorm::new(format!("{name}.norm1"), cfg.dim),
            norm2: LayerNorm::new(format!("{name}.norm2"), cfg.dim),
            norm3: LayerNorm::new(format!("{name}.norm3"), cfg.dim),
            name,
            cfg,
        }
    }

    /// # Shapes
    /// `x: [B, Tt, d]` (decoder inputs), `memory: [B, Ts, d]` → `[B, Tt, d]`;
    /// `tgt_mask: [B, Tt]`, `memory_mask: [B, Ts]` (1 = real token). Self-attention is causal.
    pub fn run(
        &self,
        g: &mut Graph<'_>,
        x: Var,
        memory: Var,
        tgt_mask: Option<&Tensor>,
        memory_mask: Option<&Tensor>,
    ) -> Result<Var> {
        btd(g, x, &self.name, self.cfg.dim)?;
        let self_mask = AttentionMask {
            key_mask: tgt_mask.cloned(),
            causal: true,
        };
        let cross_mask = AttentionMask {
            key_mask: memory_mask.cloned(),
            causal: false,
        };
        let (norm, p) = (self.cfg.norm, self.cfg.dropout);
        let x = residual(g, x, &self.norm1, norm, p, |g, h| {
            Ok(self.self_attn.self_attention(g, h, &self_mask, false)?.0)
        })?;
        let x = residual(g, x, &self.norm2, norm, p, |g, h| {
            Ok(self.multihead_attn.cross_attention(g, h, memory, &cross_mask, false)?.0)
        })?;
        residual(g, x, &self.norm3, norm, p, |g, h| self.ff.run(g, h))
    }

    pub fn param_count(&self) -> usize {
        let BlockConfig { dim: d, ff, .. } = self.cfg;
        2 * self.self_attn.param_count() + 2 * d * ff + ff + d + 6 * d
    }

    fn rows(&self, t: usize, src: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
        let d = self.cfg.dim;
        rows.push(self.self_attn.row(t, t)?);
        rows.push(self.norm1.row(&[t, d]));
        rows.push(self.multihead_attn.row(t, src)?);
        rows.push(self.norm2.row(&[t, d]));
        self.ff.rows(t, rows)?;
        rows.push(self.norm3.row(&[t, d]));
        Ok(())
    }
}

impl TransformerDecoderLayer {
    pub fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.self_attn.init_params(rng, out);
        self.multihead_attn.init_params(rng, out);
        self.ff.init(rng, out);
        for n in [&self.norm1, &self.norm2, &self.norm3] {
            n.init_params(rng, out);
        }
    }
}

/// The shape of a transformer model; defaults follow PyTorch's `nn.Transformer*` layers
/// (post-norm, ReLU, dropout 0.1) with sinusoidal positions.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    /// Width of the feed-forward network.
    pub ff: usize,
    /// Longest sequence a learned position table covers.
    pub max_len: usize,
    pub dropout: f64,
    pub activation: FfActivation,
    pub norm: NormPlacement,
    pub positions: Positions,
    /// Multiply token embeddings by √d (Vaswani et al.); the table then starts at
    /// N(0, 1/d) so the scaled embeddings have unit variance, instead of N(0, 1).
    pub scale_embedding: bool,
}

impl TransformerConfig {
    pub fn new(vocab: usize, d_model: usize, heads: usize, layers: usize, ff: usize) -> TransformerConfig {
        TransformerConfig {
            vocab,
            d_model,
            heads,
            layers,
            ff,
            max_len: 512,
            dropout: 0.1,
            activation: FfActivation::Relu,
            norm: NormPlacement::Post,
            positions: Positions::Sinusoidal,
            scale_embedding: false,
        }
    }

    fn block(&self) -> BlockConfig {
        BlockConfig {
            dim: self.d_model,
            heads: self.heads,
            ff: self.ff,
            dropout: self.dropout,
            activation: self.activation,
            norm: self.norm,
        }
    }
}

/// Token embedding (+ optional √d scale) + positions + dropout: the input of every stack.
#[derive(Debug, Clone)]
struct TokenInput {
    embedding: Embedding,
    positions: PositionalEncoding,
    scale: bool,
    dropout: f64,
}

impl TokenInput {
    fn new(prefix: &str, vocab: usize, dim: usize, positions: Positions, max_len: usize, scale: bool, p: f64) -> Self {
        TokenInput {
            embedding: Embedding {
                name: format!("{prefix}embedding"),
                vocab,
                dim,
                padding_idx: Some(0),
                one_hot: false,
            },
            positions: PositionalEncoding {
                name: format!("{prefix}pos_embedding"),
                kind: positions,
                max_len,
                dim,
            },
            scale,
            dropout: p,
        }
    }

    fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        if self.scale {
            let e = &self.embedding;
            let mut w = random::normal(&[e.vocab, e.dim], 1.0 / (e.dim.max(1) as f32).sqrt(), rng);
            w.as_mut_slice()[..e.dim.min(e.vocab * e.dim)].fill(0.0); // PAD row
            out.insert(format!("{}.weight", e.name), w);
        } else {
            self.embedding.init(rng, out);
        }
        self.positions.init(rng, out);
    }

    /// `ids` (row-major `[b, t]`) → `[b, t, d]`.
    fn run(&self, g: &mut Graph<'_>, ids: &[usize], b: usize, t: usize) -> Result<Var> {
        self.positions.check_len(t)?;
        let mut h = self.embedding.lookup(g, ids, b, t)?;
        if self.scale {
            h = g.scale(h, (self.embedding.dim as f32).sqrt());
        }
        let h = self.positions.add(g, h)?;
        Ok(g.dropout(h, self.dropout)?)
    }

    fn rows(&self, t: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
        self.positions.check_len(t)?;
        let e = &self.embedding;
        rows.push(LayerSummary {
            name: e.name.clone(),
            kind: format!("Embedding({}, {})", e.vocab, e.dim),
            output: vec![t, e.dim],
            params: e.vocab * e.dim,
            flops: 0,
        });
        if self.positions.kind != Positions::None {
            rows.push(self.positions.row(t));
        }
        Ok(())
    }
}

/// `[B, T]` ids of one example shape `[T]`, or an error naming `layer`.
fn seq_len(input: &[usize], layer: &str) -> Result<usize> {
    match *input {
        [t] if t > 0 => Ok(t),
        _ => Err(layer_err(
            layer,
            format!("expects token ids [time] per example, got {input:?}"),
        )),
    }
}

/// Encoder-only sequence classifier: embedding + positions → N encoder blocks (key padding
/// mask) → (final layer norm when pre-norm) → masked mean (or max) over the real tokens →
/// linear.
///
/// Parameters: `embedding.weight`, `pos_embedding` (learned positions), `encoder.layers.{i}.*`,
/// `encoder.norm.*` (pre-norm), `head.weight`, `head.bias`.
#[derive(Debug, Clone)]
pub struct TransformerClassifier {
    pub cfg: TransformerConfig,
    pub classes: usize,
    input: TokenInput,
    pub blocks: Vec<TransformerBlock>,
    pub final_norm: Option<LayerNorm>,
    pub head: Linear,
    /// `Mean` (default) or `Max` over the real tokens.
    pub pooling: Pooling,
    /// Training only: the probability that a real token is left out of attention and pooling
    /// (word dropout; at least one token per text is kept).
    pub token_dropout: f64,
}

impl TransformerClassifier {
    pub fn new(cfg: TransformerConfig, classes: usize) -> TransformerClassifier {
        let d = cfg.d_model;
        let input = TokenInput::new(
            "",
            cfg.vocab,
            d,
            cfg.positions,
            cfg.max_len,
            cfg.scale_embedding,
            cfg.dropout,
        );
        let blocks = (0..cfg.layers)
            .map(|i| TransformerBlock::new(format!("encoder.layers.{i}"), cfg.block()))
            .collect();
        let final_norm = (cfg.norm == NormPlacement::Pre).then(|| LayerNorm::new("encoder.norm", d));
        TransformerClassifier {
            head: Linear::new("head", d, classes).with_init(Init::XavierUniform),
            classes,
            input,
            blocks,
            final_norm,
            pooling: Pooling::Mean,
            token_dropout: 0.0,
            cfg,
        }
    }

    /// Word dropout in training: each real token is left out with probability `p`.
    pub fn with_token_dropout(mut self, p: f64) -> Self {
        self.token_dropout = p;
        self
    }

    /// Pools by `Mean` or `Max` over the real tokens (an encoder has no final state, so
    /// `Last` is refused).
    pub fn with_pooling(mut self, pooling: Pooling) -> Result<Self> {
        if pooling == Pooling::Last {
            return Err(layer_err(
                "pool",
                "a transformer classifier pools by mean or max (it has no final state)".to_string(),
            ));
        }
        self.pooling = pooling;
        Ok(self)
    }

    fn pooled(&self, g: &mut Graph<'_>, x: Var, probs: Option<&mut Vec<Tensor>>) -> Result<Var> {
        let (ids, mut mask, b, t) = ids_and_mask(g.value(x))?;
        if self.token_dropout > 0.0 && g.is_training() {
            let keep = random::bernoulli(&[b, t], 1.0 - self.token_dropout, g.rng());
            for (row, kept) in mask
                .as_mut_slice()
                .chunks_mut(t.max(1))
                .zip(keep.as_slice().chunks(t.max(1)))
            {
                // a text whose every token drew "drop" keeps its first real token
                let first = row.iter().position(|&m| m > 0.0);
                row.iter_mut().zip(kept).for_each(|(m, &k)| *m *= k);
                if let (Some(i), true) = (first, row.iter().all(|&m| m == 0.0)) {
                    row[i] = 1.0;
                }
            }
        }
        let mut h = self.input.run(g, &ids, b, t)?;
        let amask = AttentionMask {
            key_mask: Some(mask.clone()),
            causal: false,
        };
        let mut probs = probs;
        for block in &self.blocks {
            h = block.run(g, h, &amask, probs.as_deref_mut())?;
        }
        if let Some(n) = &self.final_norm {
            h = n.forward(g, h)?;
        }
        if self.pooling == Pooling::Max {
            return Ok(g.masked_max(h, &mask)?);
        }
        // Masked mean as one batched product: [B, 1, T] weights (1/count on real tokens,
        // 0 on PAD; an all-PAD row pools to zeros) · [B, T, d].
        let mut w = mask;
        for row in w.as_mut_slice().chunks_mut(t.max(1)) {
            let n = row.iter().sum::<f32>();
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            row.iter_mut().for_each(|v| *v *= inv);
        }
        let w = g.input(w.reshape(&[b, 1, t])?);
        let pooled = g.matmul(w, h)?;
        Ok(g.reshape(pooled, &[b, self.cfg.d_model])?)
    }

    /// The self-attention probabilities of every layer for one inference pass over `ids`
    /// (`[B, T]`, 0 = PAD): one `[B, H, T, T]` tensor per layer, for looking at what each head
    /// attends to.
    pub fn attention_maps(&self, params: &ParamStore, ids: &Tensor) -> Result<Vec<Tensor>> {
        let mut g = Graph::inference(params);
        let x = g.input(ids.clone());
        let mut maps = Vec::with_capacity(self.blocks.len());
        self.pooled(&mut g, x, Some(&mut maps))?;
        Ok(maps)
    }
}

impl Module for TransformerClassifier {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.input.init(rng, out);
        for b in &self.blocks {
            b.init_params(rng, out);
        }
        if let Some(n) = &self.final_norm {
            n.init_params(rng, out);
        }
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids (f32, 0 = PAD) → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let pooled = self.pooled(g, x, None)?;
        linear(g, &self.head, pooled)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = seq_len(input, &self.input.embedding.name)?;
        self.input.rows(t, rows)?;
        for b in &self.blocks {
            b.rows(t, rows)?;
        }
        rows.push(LayerSummary {
            name: "pool".into(),
            kind: "MaskedMean".into(),
            output: vec![self.cfg.d_model],
            params: 0,
            flops: (t * self.cfg.d_model) as u64,
        });
        if let Some(n) = &self.final_norm {
            rows.push(n.row(&[t, self.cfg.d_model]));
        }
        self.head.describe(&[self.cfg.d_model], rows)
    }
}

/// Decoder-only (GPT-style) language model: embedding + positions → N causal blocks →
/// (final norm when pre-norm) → linear to the vocabulary at every position.
///
/// Parameters: `embedding.weight`, `pos_embedding` (learned), `layers.{i}.*`, `norm.*`
/// (pre-norm), `head.weight`, `head.bias`.
#[derive(Debug, Clone)]
pub struct TransformerLm {
    pub cfg: TransformerConfig,
    input: TokenInput,
    pub blocks: Vec<TransformerBlock>,
    pub final_norm: Option<LayerNorm>,
    pub head: Linear,
}

impl TransformerLm {
    pub fn new(cfg: TransformerConfig) -> TransformerLm {
        let d = cfg.d_model;
        let input = TokenInput::new(
            "",
            cfg.vocab,
            d,
            cfg.positions,
            cfg.max_len,
            cfg.scale_embedding,
            cfg.dropout,
        );
        let blocks = (0..cfg.layers)
            .map(|i| TransformerBlock::new(format!("layers.{i}"), cfg.block()))
            .collect();
        TransformerLm {
            final_norm: (cfg.norm == NormPlacement::Pre).then(|| LayerNorm::new("norm", d)),
            head: Linear::new("head", d, cfg.vocab),
            input,
            blocks,
            cfg,
        }
    }

    /// Hidden states `[B·T, d]` (row `b·T + t`) of ids `x: [B, T]`.
    fn hidden(&self, g: &mut Graph<'_>, x: Var) -> Result<(Var, usize, usize)> {
        let (ids, mask, b, t) = ids_and_mask(g.value(x))?;
        let mut h = self.input.run(g, &ids, b, t)?;
        // PAD keys are masked too, so left-padded prompts work; with right padding the causal
        // mask already hides them from every real position.
        let amask = AttentionMask {
            key_mask: Some(mask),
            causal: true,
        };
        for block in &self.blocks {
            h = block.run(g, h, &amask, None)?;
        }
        if let Some(n) = &self.final_norm {
            h = n.forward(g, h)?;
        }
        Ok((g.reshape(h, &[b * t, self.cfg.d_model])?, b, t))
    }

    /// Logits `[n, vocab]` for the token after each of `n` prefixes (of any lengths ≥ 1, ids
    /// without PAD), from one inference pass over the right-padded batch: the input of
    /// sampling or greedy generation.
    pub fn last_logits(&self, params: &ParamStore, prefixes: &[Vec<usize>]) -> Result<Tensor> {
        let t = prefixes.iter().map(Vec::len).max().unwrap_or(0);
        if prefixes.is_empty() || prefixes.iter().any(Vec::is_empty) {
            return Err(layer_err(
                &self.input.embedding.name,
                "every prefix needs at least one token",
            ));
        }
        let b = prefixes.len();
        let mut ids = vec![0.0f32; b * t];
        for (row, p) in ids.chunks_mut(t).zip(prefixes) {
            for (slot, &id) in row.iter_mut().zip(p) {
                *slot = id as f32;
            }
        }
        let mut g = Graph::inference(params);
        let x = g.input(Tensor::from_vec(&[b, t], ids)?);
        let (h, _, _) = self.hidden(&mut g, x)?;
        let last: Vec<usize> = prefixes.iter().enumerate().map(|(i, p)| i * t + p.len() - 1).collect();
        let h = g.index_select(h, 0, &last)?;
        let logits = linear(&mut g, &self.head, h)?;
        Ok(g.value(logits).clone())
    }
}

impl Module for TransformerLm {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.input.init(rng, out);
        for b in &self.blocks {
            b.init_params(rng, out);
        }
        if let Some(n) = &self.final_norm {
            n.init_params(rng, out);
        }
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids (f32, 0 = PAD) → `[B·T, vocab]` logits; row `b·T + t` predicts the
    /// token at position `t + 1` of sequence `b`, so `cross_entropy` applies to the targets
    /// flattened the same way.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (h, _, _) = self.hidden(g, x)?;
        linear(g, &self.head, h)
    }

    /// Output per example: `[T, vocab]` (the forward pass stacks them to `[B·T, vocab]`).
    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let t = seq_len(input, &self.input.embedding.name)?;
        self.input.rows(t, rows)?;
        for b in &self.blocks {
            b.rows(t, rows)?;
        }
        if let Some(n) = &self.final_norm {
            rows.push(n.row(&[t, self.cfg.d_model]));
        }
        self.head.describe(&[t, self.cfg.d_model], rows)
    }
}

/// The shape of an encoder–decoder transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2SeqConfig {
    /// One vocabulary for source and target (0 = PAD).
    pub vocab: usize,
    /// Source ids per example (padded with 0).
    pub src_len: usize,
    /// Decoder inputs per example (START first, padded with 0); also the number of outputs.
    pub tgt_len: usize,
    pub d_model: usize,
    pub heads: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub ff: usize,
    pub dropout: f64,
    pub activation: FfActivation,
    pub norm: NormPlacement,
    pub positions: Positions,
    pub scale_embedding: bool,
}

impl Seq2SeqConfig {
    /// PyTorch-like defaults at a small size: d 64, 4 heads, 2 + 2 layers, FF 256, dropout 0.1,
    /// post-norm, ReLU, sinusoidal positions.
    pub fn new(vocab: usize, src_len: usize, tgt_len: usize) -> Seq2SeqConfig {
        Seq2SeqConfig {
            vocab,
            src_len,
            tgt_len,
            d_model: 64,
            heads: 4,
            encoder_layers: 2,
            decoder_layers: 2,
            ff: 256,
            dropout: 0.1,
            activation: FfActivation::Relu,
            norm: NormPlacement::Post,
            positions: Positions::Sinusoidal,
            scale_embedding: false,
        }
    }

    fn block(&self) -> BlockConfig {
        BlockConfig {
            dim: self.d_model,
            heads: self.heads,
            ff: self.ff,
            dropout: self.dropout,
            activation: self.activation,
            norm: self.norm,
        }
    }
}

/// The original encoder–decoder transformer, trained with teacher forcing.
///
/// Parameters: `src_embedding.weight`, `tgt_embedding.weight`, `src_pos_embedding` /
/// `tgt_pos_embedding` (learned), `encoder.layers.{i}.*`, `decoder.layers.{i}.*`,
/// `encoder.norm.*` / `decoder.norm.*` (pre-norm), `head.weight`, `head.bias`.
#[derive(Debug, Clone)]
pub struct Seq2SeqTransformer {
    pub cfg: Seq2SeqConfig,
    src_input: TokenInput,
    tgt_input: TokenInput,
    pub encoder: Vec<TransformerBlock>,
    pub decoder: Vec<TransformerDecoderLayer>,
    pub encoder_norm: Option<LayerNorm>,
    pub decoder_norm: Option<LayerNorm>,
    pub head: Linear,
}

impl Seq2SeqTransformer {
    pub fn new(cfg: Seq2SeqConfig) -> Seq2SeqTransformer {
        let d = cfg.d_model;
        let io = |prefix: &str, len: usize| {
            TokenInput::new(
                prefix,
                cfg.vocab,
                d,
                cfg.positions,
                len,
                cfg.scale_embedding,
                cfg.dropout,
            )
        };
        let pre = cfg.norm == NormPlacement::Pre;
        Seq2SeqTransformer {
            src_input: io("src_", cfg.src_len),
            tgt_input: io("tgt_", cfg.tgt_len),
            encoder: (0..cfg.encoder_layers)
                .map(|i| TransformerBlock::new(format!("encoder.layers.{i}"), cfg.block()))
                .collect(),
            decoder: (0..cfg.decoder_layers)
                .map(|i| TransformerDecoderLayer::new(format!("decoder.layers.{i}"), cfg.block()))
                .collect(),
            encoder_norm: pre.then(|| LayerNorm::new("encoder.norm", d)),
            decoder_norm: pre.then(|| LayerNorm::new("decoder.norm", d)),
            head: Linear::new("head", d, cfg.vocab),
            cfg,
        }
    }

    /// Encoder memory `[B, S, d]` and the source mask `[B, S]` of source ids `[B, S]`.
    fn encode(&self, g: &mut Graph<'_>, src: &Tensor) -> Result<(Var, Tensor)> {
        let (ids, mask, b, s) = ids_and_mask(src)?;
        let mut h = self.src_input.run(g, &ids, b, s)?;
        let amask = AttentionMask {
            key_mask: Some(mask.clone()),
            causal: false,
        };
        for block in &self.encoder {
            h = block.run(g, h, &amask, None)?;
        }
        if let Some(n) = &self.encoder_norm {
            h = n.forward(g, h)?;
        }
        Ok((h, mask))
    }

    /// Decoder hidden states `[B·T, d]` for decoder input ids `tgt: [B, T]`.
    fn decode(&self, g: &mut Graph<'_>, memory: Var, src_mask: &Tensor, tgt: &Tensor) -> Result<Var> {
        let (ids, mask, b, t) = ids_and_mask(tgt)?;
        let mut h = self.tgt_input.run(g, &ids, b, t)?;
        for layer in &self.decoder {
            h = layer.run(g, h, memory, Some(&mask), Some(src_mask))?;
        }
        if let Some(n) = &self.decoder_norm {
            h = n.forward(g, h)?;
        }
        Ok(g.reshape(h, &[b * t, self.cfg.d_model])?)
    }

    /// Greedy autoregressive decoding in inference mode: encode `src` (`[B, S]` ids, 0 = PAD)
    /// once, then repeatedly run the decoder on `[start_id, generated...]` and append each
    /// row's most likely next token, until every row produced `stop_id` or `max_len` tokens.
    ///
    /// Returns the generated ids per row, without `start_id` and without `stop_id`.
    pub fn greedy_decode(
        &self,
        params: &ParamStore,
        src: &Tensor,
        start_id: usize,
        stop_id: usize,
        max_len: usize,
    ) -> Result<Vec<Vec<usize>>> {
        let tgt_name = &self.tgt_input.embedding.name;
        if start_id >= self.cfg.vocab || stop_id >= self.cfg.vocab {
            return Err(layer_err(
                tgt_name,
                format!(
                    "start id {start_id} / stop id {stop_id} outside the vocabulary of {}",
                    self.cfg.vocab
                ),
            ));
        }
        // the decoder sees at most max_len inputs (START + max_len − 1 generated tokens)
        self.tgt_input.positions.check_len(max_len)?;
        let mut enc = Graph::inference(params);
        let (memory, src_mask) = self.encode(&mut enc, src)?;
        let memory = enc.value(memory).clone();
        drop(enc);
        let b = src.shape()[0];
        let mut seqs: Vec<Vec<usize>> = vec![vec![start_id]; b];
        let mut done = vec![false; b];
        for step in 1..=max_len {
            if done.iter().all(|&d| d) {
                break;
            }
            // Recompute the whole prefix each step (no key/value cache): O(max_len²) decoder
            // work, negligible at the lengths this is used for, and exactly the training graph.
            let mut g = Graph::inference(params);
            let mem = g.input(memory.clone());
            let ids: Vec<f32> = seqs
                .iter()
                .flat_map(|s| (0..step).map(move |i| s.get(i).map_or(0.0, |&v| v as f32)))
                .collect();
            let tgt = Tensor::from_vec(&[b, step], ids)?;
            let h = self.decode(&mut g, mem, &src_mask, &tgt)?;
            let last: Vec<usize> = (0..b).map(|i| i * step + step - 1).collect();
            let h = g.index_select(h, 0, &last)?;
            let logits = linear(&mut g, &self.head, h)?;
            let next = g.value(logits).argmax_rows()?;
            for (i, &tok) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if tok == stop_id {
                    done[i] = true;
                } else {
                    seqs[i].push(tok);
                }
            }
        }
        Ok(seqs.into_iter().map(|s| s[1..].to_vec()).collect())
    }

    fn split_input(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, t) = (self.cfg.src_len, self.cfg.tgt_len);
        match *x.shape() {
            [_, w] if w == s + t => Ok((x.slice_axis(1, 0, s)?, x.slice_axis(1, s, s + t)?)),
            _ => Err(layer_err(
                &self.src_input.embedding.name,
                format!(
                    "expects [batch, src_len + tgt_len = {s} + {t}] ids (source, then decoder inputs), got {:?}",
                    x.shape()
                ),
            )),
        }
    }
}

impl Module for Seq2SeqTransformer {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.src_input.init(rng, out);
        self.tgt_input.init(rng, out);
        for b in &self.encoder {
            b.init_params(rng, out);
        }
        for l in &self.decoder {
            l.init(rng, out);
        }
        for n in self.encoder_norm.iter().chain(&self.decoder_norm) {
            n.init_params(rng, out);
        }
        self.head.init_params(rng, out);
    }

    /// Teacher forcing.
    ///
    /// # Shapes
    /// `[B, src_len + tgt_len]` ids (f32, 0 = PAD): the source, then the decoder inputs
    /// (`START, y_0, …, y_{tgt_len−2}`) → `[B·tgt_len, vocab]` logits; row `b·tgt_len + t`
    /// predicts `y_t`.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let (src, tgt) = self.split_input(g.value(x))?;
        let (memory, src_mask) = self.encode(g, &src)?;
        let h = self.decode(g, memory, &src_mask, &tgt)?;
        linear(g, &self.head, h)
    }

    /// Output per example: `[tgt_len, vocab]`.
    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        let (s, t) = (self.cfg.src_len, self.cfg.tgt_len);
        if input != [s + t] || s == 0 || t == 0 {
            return Err(layer_err(
                &self.src_input.embedding.name,
                format!("expects [src_len + tgt_len = {s} + {t}] ids per example, got {input:?}"),
            ));
        }
        let d = self.cfg.d_model;
        self.src_input.rows(s, rows)?;
        for b in &self.encoder {
            b.rows(s, rows)?;
        }
        if let Some(n) = &self.encoder_norm {
            rows.push(n.row(&[s, d]));
        }
        self.tgt_input.rows(t, rows)?;
        for l in &self.decoder {
            l.rows(t, s, rows)?;
        }
        if let Some(n) = &self.decoder_norm {
            rows.push(n.row(&[t, d]));
        }
        self.head.describe(&[t, d], rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::init_store;

    /// Central differences over every parameter (and the input, when it is real-valued)
    /// against backward, for `loss = Σ w ⊙ run(x)` with fixed weights `w`.
    fn check_all(run: &dyn Fn(&mut Graph<'_>, Var) -> Var, store: &ParamStore, x: &Tensor, input_grad: bool) {
        let eval = |store: &ParamStore, x: &Tensor, grads: bool| {
            let mut g = Graph::new(store);
            let xv = if input_grad {
                g.variable(x.clone())
            } else {
                g.input(x.clone())
            };
            let out = run(&mut g, xv);
            let w = random::uniform(g.shape(out), 0.5, 1.5, &mut random::rng(11));
            let w = g.input(w);
            let p = g.mul(out, w).unwrap();
            let loss = g.sum(p);
            let value = g.value(loss).item().unwrap();
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
        let close = |a: f32, n: f32| (a - n).abs() <= 1e-2 + 1e-2 * n.abs();
        let mut s = store.clone();
        for k in 0..s.num_elements() {
            let orig = s.flat()[k];
            s.flat_mut()[k] = orig + eps;
            let plus = eval(&s, x, false).0;
            s.flat_mut()[k] = orig - eps;
            let minus = eval(&s, x, false).0;
            s.flat_mut()[k] = orig;
            let numeric = (plus - minus) / (2.0 * eps);
            let name = &store.specs().iter().rfind(|p| p.offset <= k).unwrap().name;
            assert!(close(analytic[k], numeric), "{name}[{k}]: {} vs {numeric}", analytic[k]);
        }
        if input_grad {
            let dx = dx.unwrap();
            let mut xs = x.clone();
            for k in 0..x.len() {
                let orig = xs.as_slice()[k];
                xs.as_mut_slice()[k] = orig + eps;
                let plus = eval(store, &xs, false).0;
                xs.as_mut_slice()[k] = orig - eps;
                let minus = eval(store, &xs, false).0;
                xs.as_mut_slice()[k] = orig;
                let numeric = (plus - minus) / (2.0 * eps);
                assert!(
                    close(dx.as_slice()[k], numeric),
                    "x[{k}]: {} vs {numeric}",
                    dx.as_slice()[k]
                );
            }
        }
    }

    fn store_of(init: impl Fn(&mut Rng, &mut BTreeMap<String, Tensor>)) -> ParamStore {
        let mut named = BTreeMap::new();
        init(&mut random::rng(5), &mut named);
        ParamStore::from_named(named)
    }

    /// Random `[.., d]` values whose rows are well spread (column `c` near `0.8·c − 1.2`): a
    /// row with a tiny standard deviation makes layer norm so curved that ±eps differences
    /// no longer approximate its derivative.
    fn spread(shape: &[usize], seed: u64) -> Tensor {
        let d = *shape.last().unwrap();
        let jitter = random::uniform(shape, -0.3, 0.3, &mut random::rng(seed));
        let vals = jitter
            .as_slice()
            .iter()
            .enumerate()
            .map(|(i, &v)| v + 0.8 * (i % d) as f32 - 1.2)
            .collect();
        Tensor::from_vec(shape, vals).unwrap()
    }

    fn padded_mask() -> Tensor {
        // second sequence: last two positions are padding
        Tensor::from_vec(&[2, 4], vec![1., 1., 1., 1., 1., 1., 0., 0.]).unwrap()
    }

    #[test]
    fn attention_passes_gradcheck_with_padding_and_causal_masks() {
        let mha = MultiHeadAttention::new("attn", 4, 2);
        let store = store_of(|r, o| mha.init_params(r, o));
        let x = random::uniform(&[2, 4, 4], -1.0, 1.0, &mut random::rng(3));
        for causal in [false, true] {
            let mask = AttentionMask {
                key_mask: Some(padded_mask()),
                causal,
            };
            let run = |g: &mut Graph<'_>, x: Var| mha.self_attention(g, x, &mask, false).unwrap().0;
            check_all(&run, &store, &x, true);
        }
        // cross-attention: 3 queries over the 4-step memory of x
        let q = random::uniform(&[2, 3, 4], -1.0, 1.0, &mut random::rng(4));
        let mask = AttentionMask {
            key_mask: Some(padded_mask()),
            causal: false,
        };
        let run = |g: &mut Graph<'_>, x: Var| {
            let mem = g.input(x_mem(&x));
            mha.cross_attention(g, x, mem, &mask, false).unwrap().0
        };
        fn x_mem(_: &Var) -> Tensor {
            random::uniform(&[2, 4, 4], -1.0, 1.0, &mut random::rng(3))
        }
        check_all(&run, &store, &q, true);
    }

    #[test]
    fn layer_norm_passes_gradcheck_and_matches_pytorch_layout() {
        let ln = LayerNorm::new("norm", 3);
        let mut store = store_of(|r, o| ln.init_params(r, o));
        assert_eq!(store.get("norm.weight").unwrap().to_vec(), vec![1.0; 3]);
        // non-trivial affine parameters for the check
        store
            .set("norm.weight", &Tensor::from_vec(&[3], vec![0.5, -1.0, 2.0]).unwrap())
            .unwrap();
        store
            .set("norm.bias", &Tensor::from_vec(&[3], vec![0.1, 0.2, -0.3]).unwrap())
            .unwrap();
        // columns near 0, 1, 2: well separated, so std is far from 0
        let x = Tensor::from_vec(
            &[2, 2, 3],
            vec![0.1, 1.2, 1.9, -0.2, 0.9, 2.3, 0.0, 1.0, 2.0, 0.3, 0.8, 2.1],
        )
        .unwrap();
        let run = |g: &mut Graph<'_>, x: Var| ln.forward(g, x).unwrap();
        check_all(&run, &store, &x, true);
    }

    #[test]
    fn whole_blocks_pass_gradcheck() {
        // GELU in both: ReLU's kink breaks central differences when a hidden unit sits within
        // eps of 0 (its rule is checked on its own in the autograd tests)
        let x = spread(&[2, 4, 4], 3);
        for (norm, activation, dropout) in [
            (NormPlacement::Post, FfActivation::Gelu, 0.0),
            (NormPlacement::Pre, FfActivation::Gelu, 0.2),
        ] {
            let cfg = BlockConfig {
                dim: 4,
                heads: 2,
                ff: 6,
                dropout,
                activation,
                norm,
            };
            let block = TransformerBlock::new("block", cfg);
            let store = store_of(|r, o| block.init_params(r, o));
            let mask = AttentionMask {
                key_mask: Some(padded_mask()),
                causal: false,
            };
            // each evaluation builds a fresh tape whose generator starts from the same seed,
            // so the dropout masks are the same in every evaluation
            let run = |g: &mut Graph<'_>, x: Var| block.run(g, x, &mask, None).unwrap();
            check_all(&run, &store, &x, true);

            let dec = TransformerDecoderLayer::new("dec", cfg);
            let store = store_of(|r, o| dec.init(r, o));
            let tgt_mask = Tensor::from_vec(&[2, 3], vec![1., 1., 1., 1., 1., 0.]).unwrap();
            let y = spread(&[2, 3, 4], 7);
            let run = |g: &mut Graph<'_>, y: Var| {
                let mem = g.input(x.clone());
                dec.run(g, y, mem, Some(&tgt_mask), Some(&padded_mask())).unwrap()
            };
            check_all(&run, &store, &y, true);
        }
    }

    fn small(positions: Positions, norm: NormPlacement) -> TransformerConfig {
        TransformerConfig {
            max_len: 8,
            dropout: 0.0,
            positions,
            norm,
            ..TransformerConfig::new(12, 8, 2, 2, 16)
        }
    }

    fn ids(b: usize, t: usize, v: &[usize]) -> Tensor {
        Tensor::from_vec(&[b, t], v.iter().map(|&i| i as f32).collect()).unwrap()
    }

    fn infer(m: &dyn Module, store: &ParamStore, x: &Tensor) -> Tensor {
        let mut g = Graph::inference(store);
        let xv = g.input(x.clone());
        let y = m.forward(&mut g, xv).unwrap();
        g.value(y).clone()
    }

    #[test]
    fn classifier_gradcheck_over_all_parameters() {
        let cfg = TransformerConfig {
            layers: 1,
            scale_embedding: true,
            activation: FfActivation::Gelu,
            ..small(Positions::Learned, NormPlacement::Pre)
        };
        let m = TransformerClassifier::new(cfg, 3);
        let store = init_store(&m, 2);
        let x = ids(2, 3, &[3, 4, 5, 6, 0, 0]);
        let run = |g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap();
        check_all(&run, &store, &x, false);
    }

    #[test]
    fn self_attention_without_positions_is_permutation_equivariant() {
        let tokens = [3usize, 7, 4, 9, 5];
        let perm = [2usize, 0, 4, 1, 3];
        let permuted: Vec<usize> = perm.iter().map(|&p| tokens[p]).collect();
        for (positions, equivariant) in [(Positions::None, true), (Positions::Sinusoidal, false)] {
            let m = TransformerClassifier::new(small(positions, NormPlacement::Post), 3);
            let store = init_store(&m, 1);
            // block level: the encoder states of a permuted sequence are the permuted states
            let states = |seq: &[usize]| {
                let mut g = Graph::inference(&store);
                let x = m.input.run(&mut g, seq, 1, 5).unwrap();
                let y = m.blocks[0].run(&mut g, x, &AttentionMask::default(), None).unwrap();
                g.value(y).to_vec()
            };
            let (a, b) = (states(&tokens), states(&permuted));
            let d = 8;
            let mut max_diff = 0.0f32;
            for (i, &p) in perm.iter().enumerate() {
                for c in 0..d {
                    max_diff = max_diff.max((b[i * d + c] - a[p * d + c]).abs());
                }
            }
            assert_eq!(max_diff < 1e-5, equivariant, "{positions:?}: {max_diff}");
            // model level: mean pooling makes the classifier permutation-invariant
            let ya = infer(&m, &store, &ids(1, 5, &tokens));
            let yb = infer(&m, &store, &ids(1, 5, &permuted));
            let diff = ya.sub(&yb).unwrap().map(f32::abs).sum_all();
            assert_eq!(diff < 1e-5, equivariant, "{positions:?}: {diff}");
        }
    }

    #[test]
    fn causal_lm_position_t_ignores_later_tokens_and_last_logits_agree() {
        for norm in [NormPlacement::Post, NormPlacement::Pre] {
            let m = TransformerLm::new(small(Positions::Learned, norm));
            let store = init_store(&m, 3);
            let a = infer(&m, &store, &ids(1, 6, &[3, 4, 5, 6, 7, 8]));
            let b = infer(&m, &store, &ids(1, 6, &[3, 4, 5, 11, 2, 0]));
            assert_eq!(a.shape(), &[6, 12]);
            let v = 12;
            for t in 0..6 {
                let diff: f32 = (0..v)
                    .map(|c| (a.as_slice()[t * v + c] - b.as_slice()[t * v + c]).abs())
                    .sum();
                assert_eq!(diff < 1e-5, t < 3, "position {t}: {diff}");
            }
            // the last position of each prefix equals the full forward's row at that position
            let last = m.last_logits(&store, &[vec![3, 4, 5, 6, 7, 8], vec![3, 4, 5]]).unwrap();
            assert_eq!(last.shape(), &[2, 12]);
            for c in 0..v {
                assert!((last.as_slice()[c] - a.as_slice()[5 * v + c]).abs() < 1e-5);
                assert!((last.as_slice()[v + c] - a.as_slice()[2 * v + c]).abs() < 1e-5);
            }
            assert!(m.last_logits(&store, &[vec![]]).is_err());
        }
    }

    #[test]
    fn fully_padded_rows_give_finite_outputs_and_gradients() {
        let m = TransformerClassifier::new(small(Positions::Sinusoidal, NormPlacement::Pre), 2);
        let store = init_store(&m, 4);
        let mut g = Graph::new(&store);
        let x = g.input(ids(2, 4, &[3, 4, 0, 0, 0, 0, 0, 0]));
        let y = m.forward(&mut g, x).unwrap();
        assert!(g.value(y).as_slice().iter().all(|v| v.is_finite()));
        let loss = g.cross_entropy(y, &[0, 1]).unwrap();
        let grads = g.backward(loss).unwrap();
        let mut flat = vec![0.0; store.num_elements()];
        g.param_grads_into(&grads, &mut flat).unwrap();
        assert!(flat.iter().all(|v| v.is_finite()));
        // PAD keys do not influence real tokens: appending padding leaves the logits unchanged
        let short = infer(&m, &store, &ids(1, 2, &[3, 4]));
        let long = infer(&m, &store, &ids(1, 4, &[3, 4, 0, 0]));
        for (a, b) in short.as_slice().iter().zip(long.as_slice()) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn token_dropout_leaves_tokens_out_in_training_only_and_keeps_one() {
        let base = TransformerConfig {
            dropout: 0.0,
            ..small(Positions::Learned, NormPlacement::Pre)
        };
        let plain = TransformerClassifier::new(base.clone(), 2);
        let dropped = TransformerClassifier::new(base, 2).with_token_dropout(0.999);
        let store = init_store(&plain, 5);
        let x = ids(2, 4, &[3, 4, 5, 6, 7, 0, 0, 0]);
        // evaluation ignores it
        assert_eq!(infer(&plain, &store, &x), infer(&dropped, &store, &x));
        let train = |m: &TransformerClassifier| {
            let mut g = Graph::new(&store);
            g.seed_rng(1);
            let xv = g.input(x.clone());
            let y = m.forward(&mut g, xv).unwrap();
            g.value(y).clone()
        };
        let (a, b) = (train(&plain), train(&dropped));
        assert_ne!(a, b, "token dropout changed nothing in training");
        // nearly every token drawn out: each text still keeps one, so the output is finite
        assert!(b.as_slice().iter().all(|v| v.is_finite()), "{b:?}");
        // with only the first token kept, row 1 (a single real token) is unchanged
        assert_eq!(a.as_slice()[2..], b.as_slice()[2..]);
    }

    #[test]
    fn max_pooling_takes_the_largest_feature_over_real_tokens() {
        let cfg = small(Positions::Learned, NormPlacement::Pre);
        let m = TransformerClassifier::new(cfg.clone(), 2)
            .with_pooling(Pooling::Max)
            .unwrap();
        let store = init_store(&m, 6);
        let x = ids(2, 3, &[3, 4, 5, 6, 0, 0]);
        let run = |g: &mut Graph<'_>, x: Var| m.forward(g, x).unwrap();
        check_all(&run, &store, &x, false);
        assert!(TransformerClassifier::new(cfg, 2).with_pooling(Pooling::Last).is_err());
    }

    /// An encoder block equals PyTorch's `nn.TransformerEncoderLayer` with the same weights,
    /// post-norm/ReLU and pre-norm/GELU, with padded keys: outputs at the real tokens and every
    /// gradient (`fixtures/pytorch_transformer.py` made the values).
    #[test]
    fn encoder_block_matches_pytorch() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("fixtures/pytorch_transformer.json")).unwrap();
        for (key, norm, activation) in [
            ("post_relu", NormPlacement::Post, FfActivation::Relu),
            ("pre_gelu", NormPlacement::Pre, FfActivation::Gelu),
        ] {
            let case = &fixture[key];
            let block = TransformerBlock::new(
                "block",
                BlockConfig {
                    dim: 8,
                    heads: 2,
                    ff: 16,
                    dropout: 0.0,
                    activation,
                    norm,
                },
            );
            let named = crate::pytorch_fixture::params(case);
            let mut ours = BTreeMap::new();
            block.init_params(&mut random::rng(0), &mut ours);
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                named.keys().collect::<Vec<_>>(),
                "{key}: parameter names"
            );
            let store = ParamStore::from_named(named);
            let mask = crate::pytorch_fixture::tensor(&case["mask"]);
            let mut g = Graph::new(&store);
            let xv = g.variable(crate::pytorch_fixture::tensor(&case["x"]));
            let amask = AttentionMask {
                key_mask: Some(mask.clone()),
                causal: false,
            };
            let y = block.run(&mut g, xv, &amask, None).unwrap();
            // outputs at real tokens only (the fixture zeroes the padded ones)
            let real = g.input(mask.reshape(&[2, 5, 1]).unwrap());
            let shown = g.mul(y, real).unwrap();
            crate::pytorch_fixture::assert_close(
                &format!("{key} output"),
                g.value(shown).as_slice(),
                crate::pytorch_fixture::tensor(&case["output"]).as_slice(),
                5e-5,
            );
            let w = g.input(crate::pytorch_fixture::tensor(&case["w"]));
            let weighted = g.mul(y, w).unwrap();
            let loss = g.sum(weighted);
            let grads = g.backward(loss).unwrap();
            crate::pytorch_fixture::assert_close(
                &format!("{key} dx"),
                grads.get(xv).unwrap().as_slice(),
                crate::pytorch_fixture::tensor(&case["dx"]).as_slice(),
                5e-5,
            );
            let mut flat = vec![0.0; store.num_elements()];
            g.param_grads_into(&grads, &mut flat).unwrap();
            crate::pytorch_fixture::assert_param_grads(key, case, &store, &flat, 5e-5);
        }
    }

    #[test]
    fn names_and_shapes_follow_pytorch_and_describe_counts_every_parameter() {
        let m = TransformerClassifier::new(small(Positions::Learned, NormPlacement::Pre), 3);
        let store = init_store(&m, 1);
        for (name, shape) in [
            ("embedding.weight", vec![12, 8]),
            ("pos_embedding", vec![8, 8]),
            ("encoder.layers.0.self_attn.in_proj_weight", vec![24, 8]),
            ("encoder.layers.0.self_attn.in_proj_bias", vec![24]),
            ("encoder.layers.1.self_attn.out_proj.weight", vec![8, 8]),
            ("encoder.layers.1.self_attn.out_proj.bias", vec![8]),
            ("encoder.layers.0.linear1.weight", vec![16, 8]),
            ("encoder.layers.0.linear2.weight", vec![8, 16]),
            ("encoder.layers.0.norm1.weight", vec![8]),
            ("encoder.layers.0.norm2.bias", vec![8]),
            ("encoder.norm.weight", vec![8]),
            ("head.weight", vec![3, 8]),
        ] {
            assert_eq!(store.spec(name).map(|s| s.shape.clone()), Some(shape), "{name}");
        }
        let mut rows = Vec::new();
        assert_eq!(m.describe(&[6], &mut rows).unwrap(), vec![3]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
        // errors name the layer
        let err = m.describe(&[9], &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("pos_embedding") && err.contains("9"), "{err}");
        let bad = TransformerClassifier::new(
            TransformerConfig {
                heads: 3,
                ..small(Positions::None, NormPlacement::Post)
            },
            2,
        );
        let err = bad.describe(&[4], &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("encoder.layers.0.self_attn"), "{err}");

        let lm = TransformerLm::new(small(Positions::Sinusoidal, NormPlacement::Pre));
        let store = init_store(&lm, 1);
        let mut rows = Vec::new();
        assert_eq!(lm.describe(&[5], &mut rows).unwrap(), vec![5, 12]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
        assert!(store.spec("layers.1.self_attn.in_proj_weight").is_some());
        assert!(store.spec("norm.weight").is_some());

        let s2s = Seq2SeqTransformer::new(Seq2SeqConfig {
            d_model: 8,
            heads: 2,
            ff: 16,
            positions: Positions::Learned,
            norm: NormPlacement::Pre,
            ..Seq2SeqConfig::new(12, 5, 4)
        });
        let store = init_store(&s2s, 1);
        let mut rows = Vec::new();
        assert_eq!(s2s.describe(&[9], &mut rows).unwrap(), vec![4, 12]);
        assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), store.num_elements());
        for name in [
            "decoder.layers.1.multihead_attn.in_proj_weight",
            "decoder.layers.0.norm3.weight",
            "encoder.norm.bias",
            "decoder.norm.bias",
            "src_pos_embedding",
            "tgt_embedding.weight",
        ] {
            assert!(store.spec(name).is_some(), "{name}");
        }
        assert!(s2s.describe(&[8], &mut Vec::new()).is_err());
    }

    /// Adam on the flat buffer, as in `ringtrain-optim` (kept local: nn does not depend on it).
    fn adam_steps(m: &dyn Module, store: &mut ParamStore, batch: &Tensor, targets: &[usize], steps: usize) -> f32 {
        let n = store.num_elements();
        let (mut m1, mut m2, mut grad) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        let mut loss_value = f32::NAN;
        for step in 1..=steps {
            let mut g = Graph::new(store);
            g.seed_rng(step as u64);
            let x = g.input(batch.clone());
            let y = m.forward(&mut g, x).unwrap();
            let loss = g.cross_entropy(y, targets).unwrap();
            loss_value = g.value(loss).item().unwrap();
            let grads = g.backward(loss).unwrap();
            g.param_grads_into(&grads, &mut grad).unwrap();
            let (b1, b2, lr) = (0.9f32, 0.999f32, 1e-2f32);
            let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for (((p, g), a), b) in store.flat_mut().iter_mut().zip(&grad).zip(&mut m1).zip(&mut m2) {
                *a = b1 * *a + (1.0 - b1) * g;
                *b = b2 * *b + (1.0 - b2) * g * g;
                *p -= lr * (*a / c1) / ((*b / c2).sqrt() + 1e-8);
            }
        }
        loss_value
    }

    #[test]
    fn seq2seq_learns_to_reverse_and_greedy_decode_reproduces_it() {
        // ids: 0 PAD, 1 START, 2 STOP, 3..9 tokens; target = source reversed, then STOP
        let (start, stop, len) = (1usize, 2usize, 4usize);
        let cfg = Seq2SeqConfig {
            d_model: 32,
            heads: 4,
            ff: 64,
            encoder_layers: 1,
            decoder_layers: 1,
            dropout: 0.0,
            norm: NormPlacement::Pre,
            ..Seq2SeqConfig::new(10, len, len + 1)
        };
        let m = Seq2SeqTransformer::new(cfg);
        let mut store = init_store(&m, 7);
        let mut rng = random::rng(8);
        let srcs: Vec<Vec<usize>> = (0..48)
            .map(|_| {
                let u = random::uniform(&[len], 3.0, 10.0, &mut rng);
                u.as_slice().iter().map(|&v| v as usize).collect()
            })
            .collect();
        let mut x = Vec::new();
        let mut targets = Vec::new();
        for s in &srcs {
            let rev: Vec<usize> = s.iter().rev().copied().collect();
            x.extend(s.iter().map(|&v| v as f32));
            x.push(start as f32);
            x.extend(rev.iter().map(|&v| v as f32));
            targets.extend(rev.iter().copied().chain([stop]));
        }
        let x = Tensor::from_vec(&[srcs.len(), 2 * len + 1], x).unwrap();
        let loss = adam_steps(&m, &mut store, &x, &targets, 150);
        assert!(loss < 0.05, "training loss {loss}");
        let src = ids(srcs.len(), len, &srcs.concat());
        let out = m.greedy_decode(&store, &src, start, stop, len + 2).unwrap();
        let correct = out
            .iter()
            .zip(&srcs)
            .filter(|(o, s)| o.iter().eq(s.iter().rev()))
            .count();
        assert!(correct >= srcs.len() - 2, "{correct}/{} reversed exactly", srcs.len());
        assert!(m.greedy_decode(&store, &src, 99, stop, 3).is_err());
    }
}
