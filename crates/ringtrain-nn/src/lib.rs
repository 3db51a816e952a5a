//! `ringtrain-nn`: layers, losses, seeded initialisers and the model zoo.
//!
//! A [`Module`] holds only its configuration and the dotted names of its parameters
//! (`layers.0.weight`); the values live in a [`ParamStore`](ringtrain_autograd::ParamStore).
//! This keeps modules immutable and shareable, makes "parameters ordered by name" a property of
//! the store, and lets the same module run on any rank's copy of the parameters.
//!
//! Parameter names and layouts follow PyTorch (`Linear.weight` is `[out, in]`,
//! `nn.Sequential` numbers every child, activations included), so weights saved by
//! ringtrain load into the equivalent PyTorch model by name.

mod attention;
mod bow;
mod conv;
mod conv1d;
#[cfg(test)]
mod gradcheck;
mod init;
mod layers;
mod loss;
#[cfg(test)]
mod pytorch_fixture;
mod recurrent;
pub mod zoo;

pub use attention::{
    sinusoidal_positions, AttentionMask, BlockConfig, FfActivation, KvLayer, LayerNorm, MultiHeadAttention,
    NormPlacement, PositionalEncoding, Positions, Seq2SeqConfig, Seq2SeqTransformer, TransformerBlock,
    TransformerClassifier, TransformerConfig, TransformerDecoderLayer, TransformerLm,
};
pub use bow::BagOfNgrams;
pub use conv::{Conv2d, Dropout, Flatten, GlobalAvgPool, Pool2d, Residual};
pub use conv1d::{Conv1d, Fcn, GlobalAvgPool1d};
pub use init::Init;
pub use layers::{Activation, Linear, Sequential};
pub use loss::{Loss, Targets};
pub use recurrent::{
    ids_and_mask, CellKind, Embedding, Pooling, Recurrent, RecurrentLm, RecurrentOutput, SequenceClassifier,
    SequenceRegressor, TokenRnn,
};

/// A layer's error: its name and what is wrong.
pub(crate) fn layer_err(layer: &str, reason: impl Into<String>) -> NnError {
    NnError::Layer {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

use std::collections::BTreeMap;

use ringtrain_autograd::{AutogradError, Graph, Tensor, Var};
use ringtrain_tensor::random::Rng;

/// Errors of model construction and forward passes; `layer` is the module's dotted name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NnError {
    #[error("layer `{layer}`: {reason}")]
    Layer { layer: String, reason: String },
    #[error(transparent)]
    Autograd(#[from] AutogradError),
}

impl From<ringtrain_tensor::TensorError> for NnError {
    fn from(e: ringtrain_tensor::TensorError) -> Self {
        NnError::Autograd(e.into())
    }
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

/// One row of a model summary (`ringtrain inspect`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSummary {
    pub name: String,
    pub kind: String,
    /// Output shape of one example (without the batch axis).
    pub output: Vec<usize>,
    pub params: usize,
    /// Multiply-adds ×2 of the forward pass for one example.
    pub flops: u64,
}

/// A differentiable function with named parameters.
pub trait Module: std::fmt::Debug + Send + Sync {
    /// Adds this module's parameters, under their full dotted names, with initial values drawn
    /// from `rng`.
    fn init_params(&self, rng: &mut Rng, out: &mut BTreeMap<String, Tensor>);

    /// Runs the module on a batch. Shapes are documented per module; the first axis is
    /// always the batch.
    fn forward(&self, g: &mut Graph<'_>, x: Var) -> Result<Var>;

    /// Whether [`Module::forward_carry`] carries a recurrent state from batch to batch
    /// (recurrent language models), which truncated backpropagation through time needs.
    fn carries_state(&self) -> bool {
        false
    }

    /// [`Module::forward`] from the state a previous batch ended with (`None`: from zeros),
    /// also returning the state this batch ends with, to carry into the next. Modules without
    /// a state return an empty one.
    fn forward_carry(&self, g: &mut Graph<'_>, x: Var, state: Option<&[Tensor]>) -> Result<(Var, Vec<Var>)> {
        let _ = state;
        Ok((self.forward(g, x)?, Vec::new()))
    }

    /// Checks that the module accepts one example of shape `input` (no batch axis), appends its
    /// summary rows and returns the output shape. Errors name the layer and the shapes, so a
    /// job is refused at validation time instead of failing mid-run.
    fn describe(&self, input: &[usize], rows: &mut Vec<LayerSummary>) -> Result<Vec<usize>>;

    /// A language model that extends a sequence one token at a time from cached state, for
    /// generation; `None` for the others.
    fn as_cached_lm(&self) -> Option<&dyn CachedLm> {
        None
    }
}

/// A language model that generates from a key/value cache: each call runs only the new token
/// through the model, attending to the keys and values `cache` keeps of the ones before it
/// (one [`KvLayer`] per attention layer).
pub trait CachedLm {
    /// The longest sequence its positions cover.
    fn max_len(&self) -> usize;

    /// Logits `[1, vocab]` for the token after `token`, which is appended to the sequence
    /// `cache` holds (empty: `token` is the first).
    fn next_logits(
        &self,
        params: &ringtrain_autograd::ParamStore,
        cache: &mut Vec<KvLayer>,
        token: usize,
    ) -> Result<Tensor>;
}

/// The store indices of the embedding lookup tables (not learned positions): parameters whose
/// gradient is the rows a batch read ([`ringtrain_autograd::Graph::set_row_sparse`]).
pub fn lookup_tables(store: &ringtrain_autograd::ParamStore) -> Vec<usize> {
    let table = |s: &ringtrain_autograd::ParamSpec| {
        s.name.ends_with("embedding.weight") && !s.name.ends_with("pos_embedding.weight") && s.shape.len() == 2
    };
    store
        .specs()
        .iter()
        .enumerate()
        .filter(|(_, s)| table(s))
        .map(|(p, _)| p)
        .collect()
}

/// Initial parameters of `module` as a flat store (ordered by name).
pub fn init_store(module: &dyn Module, seed: u64) -> ringtrain_autograd::ParamStore {
    let mut named = BTreeMap::new();
    module.init_params(&mut ringtrain_tensor::random::rng(seed), &mut named);
    ringtrain_autograd::ParamStore::from_named(named)
}
