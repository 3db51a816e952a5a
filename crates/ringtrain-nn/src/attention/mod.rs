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

mod blocks;
mod layers;
mod models;
#[cfg(test)]
mod tests;

pub use self::blocks::*;
pub use self::layers::*;
pub use self::models::*;

use ringtrain_autograd::{Graph, Var};

use crate::{Linear, Result};

pub(crate) use crate::layer_err;

/// `[B, T, d]` of a value, or an error naming `layer`.
pub(crate) fn btd(g: &Graph<'_>, x: Var, layer: &str, d: usize) -> Result<(usize, usize)> {
    match *g.shape(x) {
        [b, t, w] if w == d => Ok((b, t)),
        ref s => Err(layer_err(layer, format!("expects [batch, time, {d}], got {s:?}"))),
    }
}

/// A [`Linear`] through the fused `x · wᵀ + b` op, on `[..., in]` inputs without reshapes.
pub(crate) fn linear(g: &mut Graph<'_>, l: &Linear, x: Var) -> Result<Var> {
    let w = g.param(&format!("{}.weight", l.name))?;
    let b = if l.bias {
        Some(g.param(&format!("{}.bias", l.name))?)
    } else {
        None
    };
    g.linear(x, w, b).map_err(|e| layer_err(&l.name, e.to_string()))
}
