//! Whole models: the sequence classifier, the decoder-only language model and the
//! encoder–decoder.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, ParamStore, Tensor, Var};
use ringtrain_tensor::random::{self, Rng};

use super::*;
use crate::{ids_and_mask, Embedding, Init, LayerSummary, Linear, Module, Pooling, Result};

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
pub(super) struct TokenInput {
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

    /// One token at position `at` → `[1, 1, d]`.
    fn run_at(&self, g: &mut Graph<'_>, token: usize, at: usize) -> Result<Var> {
        let mut h = self.embedding.lookup(g, &[token], 1, 1)?;
        if self.scale {
            h = g.scale(h, (self.embedding.dim as f32).sqrt());
        }
        let h = self.positions.add_at(g, h, at)?;
        Ok(g.dropout(h, self.dropout)?)
    }

    /// `ids` (row-major `[b, t]`) → `[b, t, d]`.
    pub(super) fn run(&self, g: &mut Graph<'_>, ids: &[usize], b: usize, t: usize) -> Result<Var> {
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

/// Token input → blocks → final norm (pre-norm only): the body of the classifier and the LM.
#[derive(Debug, Clone)]
pub(super) struct Stack {
    pub(super) input: TokenInput,
    pub(super) blocks: Vec<TransformerBlock>,
    final_norm: Option<LayerNorm>,
    d_model: usize,
}

impl Stack {
    /// Blocks `{prefix}layers.{i}` and the final norm `{prefix}norm`.
    fn new(cfg: &TransformerConfig, prefix: &str) -> Stack {
        let d = cfg.d_model;
        Stack {
            input: TokenInput::new(
                "",
                cfg.vocab,
                d,
                cfg.positions,
                cfg.max_len,
                cfg.scale_embedding,
                cfg.dropout,
            ),
            blocks: (0..cfg.layers)
                .map(|i| TransformerBlock::new(format!("{prefix}layers.{i}"), cfg.block()))
                .collect(),
            final_norm: (cfg.norm == NormPlacement::Pre).then(|| LayerNorm::new(format!("{prefix}norm"), d)),
            d_model: d,
        }
    }

    fn init(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.input.init(rng, out);
        for b in &self.blocks {
            b.init_params(rng, out);
        }
        if let Some(n) = &self.final_norm {
            n.init_params(rng, out);
        }
    }

    /// `ids` (row-major `[b, t]`) → `[b, t, d]`; each block's attention probabilities are
    /// pushed to `probs` when given.
    fn run(
        &self,
        g: &mut Graph<'_>,
        (ids, b, t): (&[usize], usize, usize),
        mask: &AttentionMask,
        mut probs: Option<&mut Vec<Tensor>>,
    ) -> Result<Var> {
        let mut h = self.input.run(g, ids, b, t)?;
        for block in &self.blocks {
            h = block.run(g, h, mask, probs.as_deref_mut())?;
        }
        match &self.final_norm {
            Some(n) => n.forward(g, h),
            None => Ok(h),
        }
    }

    /// The rows of an example of shape `input` (`[T]`), through the final norm; returns `T`.
    fn rows(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<usize> {
        let t = seq_len(input, &self.input.embedding.name)?;
        self.input.rows(t, rows)?;
        for b in &self.blocks {
            b.rows(t, rows)?;
        }
        if let Some(n) = &self.final_norm {
            rows.push(n.row(&[t, self.d_model]));
        }
        Ok(t)
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
    pub(super) stack: Stack,
    pub head: Linear,
    /// `Mean` (default) or `Max` over the real tokens.
    pub pooling: Pooling,
    /// Training only: the probability that a real token is left out of attention and pooling
    /// (word dropout; at least one token per text is kept).
    pub token_dropout: f64,
}

impl TransformerClassifier {
    pub fn new(cfg: TransformerConfig, classes: usize) -> TransformerClassifier {
        TransformerClassifier {
            head: Linear::new("head", cfg.d_model, classes).with_init(Init::XavierUniform),
            classes,
            stack: Stack::new(&cfg, "encoder."),
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
        let amask = AttentionMask {
            key_mask: Some(mask.clone()),
            causal: false,
        };
        let h = self.stack.run(g, (&ids, b, t), &amask, probs)?;
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
        let mut maps = Vec::with_capacity(self.stack.blocks.len());
        self.pooled(&mut g, x, Some(&mut maps))?;
        Ok(maps)
    }
}

impl Module for TransformerClassifier {
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.stack.init(rng, out);
        self.head.init_params(rng, out);
    }

    /// # Shapes
    /// `[B, T]` token ids (f32, 0 = PAD) → `[B, classes]` logits.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var> {
        let pooled = self.pooled(g, x, None)?;
        linear(g, &self.head, pooled)
    }

    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>> {
        // In forward order: the final norm acts on every position, then the pooling.
        let t = self.stack.rows(input, rows)?;
        rows.push(LayerSummary {
            name: "pool".into(),
            kind: format!("Masked{:?}", self.pooling),
            output: vec![self.cfg.d_model],
            params: 0,
            flops: (t * self.cfg.d_model) as u64,
        });
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
    stack: Stack,
    pub head: Linear,
}

impl TransformerLm {
    pub fn new(cfg: TransformerConfig) -> TransformerLm {
        TransformerLm {
            head: Linear::new("head", cfg.d_model, cfg.vocab),
            stack: Stack::new(&cfg, ""),
            cfg,
        }
    }

    /// Hidden states `[B·T, d]` (row `b·T + t`) of ids `x: [B, T]`.
    fn hidden(&self, g: &mut Graph<'_>, x: Var) -> Result<(Var, usize, usize)> {
        let (ids, mask, b, t) = ids_and_mask(g.value(x))?;
        // PAD keys are masked too, so left-padded prompts work; with right padding the causal
        // mask already hides them from every real position.
        let amask = AttentionMask {
            key_mask: Some(mask),
            causal: true,
        };
        let h = self.stack.run(g, (&ids, b, t), &amask, None)?;
        Ok((g.reshape(h, &[b * t, self.cfg.d_model])?, b, t))
    }

    /// Logits `[n, vocab]` for the token after each of `n` prefixes (of any lengths ≥ 1, ids
    /// without PAD), from one inference pass over the right-padded batch: the input of
    /// sampling or greedy generation.
    pub fn last_logits(&self, params: &ParamStore, prefixes: &[Vec<usize>]) -> Result<Tensor> {
        let t = prefixes.iter().map(Vec::len).max().unwrap_or(0);
        if prefixes.is_empty() || prefixes.iter().any(Vec::is_empty) {
            return Err(layer_err(
                &self.stack.input.embedding.name,
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

impl crate::CachedLm for TransformerLm {
    fn max_len(&self) -> usize {
        self.cfg.max_len
    }

    fn next_logits(&self, params: &ParamStore, cache: &mut Vec<KvLayer>, token: usize) -> Result<Tensor> {
        let s = &self.stack;
        cache.resize_with(s.blocks.len(), KvLayer::default);
        let at = cache.first().map_or(0, |c| c.keys.len() / self.cfg.d_model.max(1));
        let mut g = Graph::inference(params);
        let mut h = s.input.run_at(&mut g, token, at)?;
        for (block, layer) in s.blocks.iter().zip(cache.iter_mut()) {
            h = block.run_cached(&mut g, h, layer)?;
        }
        if let Some(n) = &s.final_norm {
            h = n.forward(&mut g, h)?;
        }
        let h = g.reshape(h, &[1, self.cfg.d_model])?;
        let logits = linear(&mut g, &self.head, h)?;
        Ok(g.value(logits).clone())
    }
}

impl Module for TransformerLm {
    fn as_cached_lm(&self) -> Option<&dyn crate::CachedLm> {
        Some(self)
    }

    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>) {
        self.stack.init(rng, out);
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
        let t = self.stack.rows(input, rows)?;
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

    /// An encoder–decoder with the shape of `t`: its width, heads, feed-forward, dropout,
    /// activation, norm placement and positions, and `t.layers` layers on each side.
    pub fn from_transformer(t: &TransformerConfig, src_len: usize, tgt_len: usize) -> Seq2SeqConfig {
        Seq2SeqConfig {
            vocab: t.vocab,
            src_len,
            tgt_len,
            d_model: t.d_model,
            heads: t.heads,
            encoder_layers: t.layers,
            decoder_layers: t.layers,
            ff: t.ff,
            dropout: t.dropout,
            activation: t.activation,
            norm: t.norm,
            positions: t.positions,
            scale_embedding: t.scale_embedding,
        }
    }

    /// The layers' shape, as a decoder-only or encoder-only transformer of this width has it.
    fn block(&self) -> BlockConfig {
        let mut t = TransformerConfig::new(self.vocab, self.d_model, self.heads, self.encoder_layers, self.ff);
        t.dropout = self.dropout;
        t.activation = self.activation;
        t.norm = self.norm;
        t.block()
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
