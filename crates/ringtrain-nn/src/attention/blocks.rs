//! Encoder and decoder layers: attention and feed-forward with residuals and norms.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, Tensor, Var};
use ringtrain_tensor::random::Rng;

use super::*;
use crate::{LayerSummary, Linear, Module, Result};

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

    /// [`TransformerBlock::run`] with a causal mask for one new position `x: [1, 1, d]`,
    /// from the keys and values `cache` holds of the positions before it.
    pub fn run_cached(&self, g: &mut Graph<'_>, x: Var, cache: &mut KvLayer) -> Result<Var> {
        let x = residual(g, x, &self.norm1, self.cfg.norm, self.cfg.dropout, |g, h| {
            self.self_attn.self_attention_cached(g, h, cache)
        })?;
        residual(g, x, &self.norm2, self.cfg.norm, self.cfg.dropout, |g, h| {
            self.ff.run(g, h)
        })
    }

    pub fn param_count(&self) -> usize {
        let BlockConfig { dim: d, ff, .. } = self.cfg;
        self.self_attn.param_count() + 2 * d * ff + ff + d + 4 * d
    }

    pub(super) fn rows(&self, t: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
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

    pub(super) fn rows(&self, t: usize, src: usize, rows: &mut Vec<LayerSummary>) -> Result<()> {
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
