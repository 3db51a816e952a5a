//! Layer norm, positional encodings and multi-head attention.

use std::collections::BTreeMap;

use ringtrain_autograd::{AttentionOpts, Cols, Graph, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use super::*;
use crate::{Init, LayerSummary, Module, Result};

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

    pub(super) fn row(&self, input: &[usize]) -> LayerSummary {
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

/// One attention layer's keys and values of the positions generated so far.
#[derive(Debug, Clone, Default)]
pub struct KvLayer {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
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

    pub(super) fn check_len(&self, t: usize) -> Result<()> {
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
    /// Adds the encoding of position `at` to one position `x: [B, 1, d]` (generation with a
    /// key/value cache).
    pub fn add_at(&self, g: &mut Graph<'_>, x: Var, at: usize) -> Result<Var> {
        btd(g, x, &self.name, self.dim)?;
        self.check_len(at + 1)?;
        let row = match self.kind {
            Positions::None => return Ok(x),
            Positions::Sinusoidal => {
                let table = sinusoidal_positions(at + 1, self.dim);
                g.input(Tensor::from_vec(
                    &[1, self.dim],
                    table.as_slice()[at * self.dim..].to_vec(),
                )?)
            }
            Positions::Learned => {
                let p = g.param(&self.name)?;
                g.slice_axis(p, 0, at, at + 1)?
            }
        };
        Ok(g.add(x, row)?)
    }

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

    pub(super) fn row(&self, t: usize) -> LayerSummary {
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
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
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
        let d = self.dim;
        let qkv = self.in_proj(g, x)?;
        let at = |offset| Cols { var: qkv, offset };
        let (o, probs) = g
            .attention_cols(at(0), at(d), at(2 * d), d, &self.opts(mask), keep_probs)
            .map_err(|e| layer_err(&self.name, e.to_string()))?;
        Ok((self.out_proj(g, o)?, probs))
    }

    /// q, k and v of every position of `x: [B, T, d]` side by side, `[B, T, 3d]`: one product.
    fn in_proj(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        self.check()?;
        btd(g, x, &self.name, self.dim)?;
        let w = g.param(&self.pname("in_proj_weight"))?;
        let b = g.param(&self.pname("in_proj_bias"))?;
        Ok(g.linear(x, w, Some(b))?)
    }

    /// Causal self-attention of one new position `x: [1, 1, d]` over the keys and values of
    /// the positions before it, which `cache` holds (`[t·d]` each, row-major) and to which this
    /// position's are appended: the last row of [`MultiHeadAttention::self_attention`] with a
    /// causal mask, without recomputing the others.
    pub fn self_attention_cached(&self, g: &mut Graph<'_>, x: Var, cache: &mut KvLayer) -> Result<Var> {
        let d = self.dim;
        let qkv = self.in_proj(g, x)?;
        let row = g.value(qkv).as_slice();
        cache.keys.extend_from_slice(&row[d..2 * d]);
        cache.values.extend_from_slice(&row[2 * d..3 * d]);
        let t = cache.keys.len() / d;
        let q = g.slice_axis(qkv, 2, 0, d)?;
        let k = g.input(Tensor::from_vec(&[1, t, d], cache.keys.clone())?);
        let v = g.input(Tensor::from_vec(&[1, t, d], cache.values.clone())?);
        // Every cached key is at or before this position: nothing to mask.
        let o = g
            .attention(q, k, v, &self.opts(&AttentionMask::default()))
            .map_err(|e| layer_err(&self.name, e.to_string()))?;
        self.out_proj(g, o)
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

    pub(super) fn row(&self, tq: usize, tk: usize) -> Result<LayerSummary> {
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
