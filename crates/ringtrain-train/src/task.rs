//! From a job to a task: examples, targets, model and loss.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringtrain_autograd::ParamStore;
use ringtrain_config::{
    ActivationName, FfActivationName, Job, LayerSpec, ModelConfig, ModelKind, NormName, PoolingName, PositionsName,
};
use ringtrain_nn::{
    zoo, Activation, BagOfNgrams, CellKind, Conv1d, Conv2d, Dropout, Fcn, Flatten, GlobalAvgPool, GlobalAvgPool1d,
    Init, LayerNorm, Linear, Loss, Module, Pool2d, Pooling, RecurrentLm, Residual, SequenceClassifier,
    SequenceRegressor, Sequential, Targets,
};
use ringtrain_nn::{
    FfActivation, NormPlacement, Positions, Seq2SeqConfig, Seq2SeqTransformer, TransformerClassifier,
    TransformerConfig, TransformerLm,
};
use ringtrain_tensor::Tensor;

use crate::formats::{ModelRole, Preprocessing};
use crate::{Result, TrainError};

/// A minibatch: inputs with the batch as first axis, and what they are compared against.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub x: Tensor,
    pub targets: Targets,
}

/// A dataset the engine can draw minibatches from.
pub trait Examples: Send + Sync + std::fmt::Debug {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shape of one input (without the batch axis).
    fn input_shape(&self) -> Vec<usize>;
    /// The examples at `indices`, in that order.
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
    /// A copy whose input normalisation is fitted on `rows` only (the training split), or
    /// `None` when the normalisation is fixed.
    fn fitted_on(&self, _rows: &[usize]) -> Option<Arc<dyn Examples>> {
        None
    }
    /// A copy normalised with `fitted` (what [`Examples::preprocess`] of the examples fitted
    /// on the training split says): a provided test split is normalised like the training
    /// split. `None` when the normalisation is fixed.
    fn normalised_with(&self, _fitted: &Preprocessing) -> Option<Arc<dyn Examples>> {
        None
    }

    /// The preprocessing a prediction must repeat, for `preprocess.json`.
    fn preprocess(&self) -> Option<Preprocessing> {
        None
    }
    /// Size of the token vocabulary, for models that embed token ids.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// Regression targets are standardised for training; errors times this factor are in the
    /// data's own units (RMSE and MAE are reported in them).
    fn target_scale(&self) -> f32 {
        1.0
    }
    /// What the model is built for: the input shape, unless an example is made of parts (an
    /// encoder–decoder's source and target lengths).
    fn model_input(&self) -> Vec<usize> {
        self.input_shape()
    }
    /// Fraction of the examples at `rows` that the model gets exactly right when it decodes
    /// on its own (for sequence outputs), or `None` where teacher-forced metrics say it all.
    fn sequence_accuracy(&self, _model: &dyn Module, _store: &ParamStore, _rows: &[usize]) -> Option<Result<f64>> {
        None
    }
}

/// What the model predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    /// One of several classes; the model outputs one logit per class.
    Classes { names: Vec<String> },
    /// Yes/no; the model outputs one logit (class 1 when positive).
    Binary { names: [String; 2] },
    /// A real value.
    Regression,
    /// The next token at every step of a sequence (language model); one logit per
    /// vocabulary entry and step.
    NextToken { vocab: usize },
}

impl TargetKind {
    pub fn n_classes(&self) -> usize {
        match self {
            TargetKind::Classes { names } => names.len(),
            TargetKind::Binary { .. } => 2,
            TargetKind::NextToken { vocab } => *vocab,
            TargetKind::Regression => 0,
        }
    }

    pub fn class_names(&self) -> Vec<String> {
        match self {
            TargetKind::Classes { names } => names.clone(),
            TargetKind::Binary { names } => names.to_vec(),
            TargetKind::Regression | TargetKind::NextToken { .. } => Vec::new(),
        }
    }

    pub fn outputs(&self) -> usize {
        match self {
            TargetKind::Classes { names } => names.len(),
            TargetKind::NextToken { vocab } => *vocab,
            TargetKind::Binary { .. } | TargetKind::Regression => 1,
        }
    }
}

/// A job made concrete: its examples, what they predict, and how training measures error.
#[derive(Debug, Clone)]
pub struct Task {
    pub examples: Arc<dyn Examples>,
    /// The dataset's own test split, when it has one (MNIST).
    pub test_examples: Option<Arc<dyn Examples>>,
    pub target: TargetKind,
    pub loss: Loss,
    /// Class of each example, for stratified splits.
    pub strata: Option<Vec<usize>>,
    /// What the model does with the examples, as the data format says.
    pub role: ModelRole,
    /// Reference scores of trivial predictors on the test split (e.g. the unigram perplexity
    /// of a language model, the naive last-value RMSE of a forecast), for the summary.
    pub baseline: BTreeMap<String, f64>,
}

impl Task {
    /// The job's data read and prepared by its format's module.
    pub fn from_job(job: &Job) -> Result<Task> {
        crate::formats::format(job.data.format).task(job)
    }

    pub fn input_shape(&self) -> Vec<usize> {
        self.examples.input_shape()
    }

    /// The job's model for this task's inputs, outputs and vocabulary, shape-checked.
    pub fn model(&self, cfg: &ModelConfig) -> Result<Box<dyn Module>> {
        build_model_for(
            cfg,
            self.role,
            &self.examples.model_input(),
            self.target.outputs(),
            self.examples.vocab_size(),
        )
    }

    pub fn example_count(&self) -> usize {
        self.examples.len()
    }

    /// Targets for the loss: BCE compares one logit with a 0/1 value.
    pub fn loss_targets(&self, targets: &Targets) -> Result<Targets> {
        Ok(match (self.loss, targets) {
            (Loss::BinaryCrossEntropy, Targets::Classes(c)) => Targets::Values(
                Tensor::from_vec(&[c.len(), 1], c.iter().map(|&v| v as f32).collect())
                    .map_err(ringtrain_autograd::AutogradError::from)?,
            ),
            _ => targets.clone(),
        })
    }
}

/// Builds the job's model for inputs of `input` (one example, no batch axis) and `outputs`
/// outputs, and checks every layer's shapes, so a bad model is refused before training with
/// the layer's name and the shapes.
pub fn build_model(cfg: &ModelConfig, input: &[usize], outputs: usize) -> Result<Box<dyn Module>> {
    build_model_for(cfg, ModelRole::Classify, input, outputs, None)
}

/// The model of `cfg` in `role`: the same recurrent kind classifies texts, models a corpus or
/// forecasts a series depending on the data. To translate, `input` is
/// `[source length, decoder length]` (an example is both, concatenated).
pub fn build_model_for(
    cfg: &ModelConfig,
    role: ModelRole,
    input: &[usize],
    outputs: usize,
    vocab: Option<usize>,
) -> Result<Box<dyn Module>> {
    let act = activation(cfg.activation);
    let flat: usize = input.iter().product();
    let model: Box<dyn Module> = match cfg.kind {
        ModelKind::Logistic | ModelKind::Mlp if input.len() > 1 => {
            // Images into a dense model: flatten first.
            let mut s = Sequential::new("layers");
            let n = s.next_name();
            s.push(Flatten { name: n });
            let hidden = if cfg.kind == ModelKind::Mlp {
                cfg.hidden.as_slice()
            } else {
                &[]
            };
            let mut width = flat;
            for &h in hidden {
                let n = s.next_name();
                s.push(Linear::new(n, width, h).with_init(act.preferred_init()));
                s.push_activation(act);
                width = h;
            }
            let n = s.next_name();
            s.push(Linear::new(n, width, outputs));
            Box::new(s)
        }
        ModelKind::Logistic if outputs == 1 => Box::new(zoo::logistic(flat)),
        // Multinomial logistic regression: one layer, softmax in the loss.
        ModelKind::Logistic => Box::new(zoo::mlp(flat, &[], outputs, act)),
        ModelKind::Mlp => Box::new(zoo::mlp(flat, &cfg.hidden, outputs, act)),
        ModelKind::Lenet5 => Box::new(zoo::lenet5(input.first().copied().unwrap_or(1), outputs)),
        ModelKind::ResnetMini => Box::new(zoo::resnet_mini(input.first().copied().unwrap_or(1), outputs)),
        ModelKind::Layers => Box::new(from_layer_list(&cfg.layers, input, outputs)?),
        ModelKind::Transformer => {
            let vocab = vocab.ok_or(TrainError::Job {
                field: "model.kind",
                reason: "a transformer needs token data (text or corpus)".into(),
            })?;
            let t = transformer_config(cfg, vocab, input.first().copied().unwrap_or(1));
            match role {
                ModelRole::LanguageModel => Box::new(TransformerLm::new(t)),
                ModelRole::Translate => {
                    let &[src_len, tgt_len] = input else {
                        return Err(TrainError::Job {
                            field: "data.format",
                            reason: format!("an encoder–decoder needs [source, target] lengths, got {input:?}"),
                        });
                    };
                    let c = Seq2SeqConfig::from_transformer(&t, src_len, tgt_len);
                    Box::new(Seq2SeqTransformer::new(c))
                }
                _ => Box::new(
                    TransformerClassifier::new(t, outputs)
                        .with_pooling(pooling(cfg.pooling.unwrap_or(PoolingName::Mean)))
                        .map_err(|e| TrainError::Job {
                            field: "model.pooling",
                            reason: e.to_string(),
                        })?
                        .with_token_dropout(cfg.token_dropout),
                ),
            }
        }
        ModelKind::Fcn => Box::new(Fcn::new(outputs)),
        ModelKind::Bow => {
            let vocab = vocab.ok_or(TrainError::Job {
                field: "model.kind",
                reason: "a bag of n-grams needs text data".into(),
            })?;
            Box::new(BagOfNgrams::new(
                vocab,
                cfg.bigram_buckets(),
                cfg.embedding_dim(),
                outputs,
                cfg.dropout,
            ))
        }
        ModelKind::Rnn | ModelKind::Gru | ModelKind::Lstm => {
            let cell = match cfg.kind {
                ModelKind::Rnn => CellKind::Rnn,
                ModelKind::Gru => CellKind::Gru,
                _ => CellKind::Lstm,
            };
            let hidden = if cfg.hidden.is_empty() {
                vec![if role == ModelRole::Forecast { 32 } else { 128 }]
            } else {
                cfg.hidden.clone()
            };
            let embed = cfg.embedding_dim();
            match (role, vocab) {
                (ModelRole::Forecast, _) => Box::new(SequenceRegressor::new(cell, &hidden, cfg.dropout, outputs)),
                (ModelRole::LanguageModel, Some(v)) => {
                    let lm = RecurrentLm::new(cell, v, embed, &hidden, cfg.dropout);
                    Box::new(if cfg.one_hot { lm.with_one_hot() } else { lm })
                }
                (_, Some(v)) => {
                    let c = SequenceClassifier::new(cell, v, embed, &hidden, cfg.bidirectional, cfg.dropout, outputs)
                        .with_pooling(pooling(cfg.pooling.unwrap_or(PoolingName::Last)))
                        .with_embedding_dropout(cfg.embedding_dropout);
                    Box::new(if cfg.one_hot { c.with_one_hot() } else { c })
                }
                (_, None) => {
                    return Err(TrainError::Job {
                        field: "model.kind",
                        reason: "recurrent models need token data (text, corpus) or a series".into(),
                    })
                }
            }
        }
    };
    let one_example = match (role, input) {
        (ModelRole::Translate, &[s, t]) => vec![s + t],
        _ => input.to_vec(),
    };
    model.describe(&one_example, &mut Vec::new())?;
    Ok(model)
}

fn pooling(name: PoolingName) -> Pooling {
    match name {
        PoolingName::Last => Pooling::Last,
        PoolingName::Mean => Pooling::Mean,
        PoolingName::Max => Pooling::Max,
    }
}

/// The job's transformer shape; positions cover the longest sequence the data can give.
pub(crate) fn transformer_config(cfg: &ModelConfig, vocab: usize, max_len: usize) -> TransformerConfig {
    let mut t = TransformerConfig::new(vocab, cfg.embedding_dim(), cfg.heads(), cfg.blocks(), cfg.ff_dim());
    t.max_len = max_len.max(1);
    t.dropout = cfg.dropout;
    t.activation = match cfg.ff_activation {
        FfActivationName::Relu => FfActivation::Relu,
        FfActivationName::Gelu => FfActivation::Gelu,
    };
    t.norm = match cfg.norm {
        NormName::Post => NormPlacement::Post,
        NormName::Pre => NormPlacement::Pre,
    };
    t.positions = match cfg.positions {
        PositionsName::Sinusoidal => Positions::Sinusoidal,
        PositionsName::Learned => Positions::Learned,
        PositionsName::None => Positions::None,
    };
    t
}

fn activation(name: ActivationName) -> Activation {
    match name {
        ActivationName::Relu => Activation::Relu,
        ActivationName::LeakyRelu => Activation::LeakyRelu(0.01),
        ActivationName::Sigmoid => Activation::Sigmoid,
        ActivationName::Tanh => Activation::Tanh,
    }
}

/// A `Sequential` from `model.layers`, inferring each layer's input size from the shape the
/// previous one produces. A final linear layer to `outputs` is appended when the list does not
/// already end with one of that size.
fn from_layer_list(specs: &[LayerSpec], input: &[usize], outputs: usize) -> Result<Sequential> {
    let mut s = Sequential::new("layers");
    let mut shape = input.to_vec();
    let mut rows = Vec::new();
    for spec in specs {
        let name = s.next_name();
        let channels = shape.first().copied().unwrap_or(0);
        match *spec {
            LayerSpec::Conv2d {
                out_channels,
                kernel,
                stride,
                padding,
            } => {
                s.push(
                    Conv2d::new(name, channels, out_channels, kernel)
                        .stride(stride)
                        .padding(padding),
                );
            }
            LayerSpec::MaxPool2d { kernel, stride } => {
                s.push(Pool2d::max(name, kernel, stride.unwrap_or(kernel)));
            }
            LayerSpec::AvgPool2d { kernel, stride } => {
                s.push(Pool2d::avg(name, kernel, stride.unwrap_or(kernel)));
            }
            LayerSpec::GlobalAvgPool => {
                s.push(GlobalAvgPool { name });
            }
            LayerSpec::Flatten => {
                s.push(Flatten { name });
            }
            LayerSpec::Conv1d {
                out_channels,
                kernel,
                stride,
                padding,
                dilation,
            } => {
                // A series is [time, channels]; a csv row, [time], is one channel.
                let in_channels = if shape.len() == 2 { shape[1] } else { 1 };
                let same = Conv1d::same(name.clone(), in_channels, out_channels, kernel);
                let padding = match padding {
                    Some(p) => (p, p),
                    None if stride == 1 && dilation == 1 => same.padding,
                    None => {
                        return Err(TrainError::Job {
                            field: "model.layers",
                            reason: format!("{name}: conv1d with stride or dilation above 1 needs its padding"),
                        })
                    }
                };
                s.push(Conv1d {
                    stride,
                    padding,
                    dilation,
                    ..same
                });
            }
            LayerSpec::LayerNorm => {
                s.push(LayerNorm::new(name, shape.last().copied().unwrap_or(0)));
            }
            LayerSpec::GlobalAvgPool1d => {
                s.push(GlobalAvgPool1d { name });
            }
            LayerSpec::Linear { out } => {
                let width = shape.last().copied().unwrap_or(0);
                s.push(Linear::new(name, width, out).with_init(Init::HeNormal));
            }
            LayerSpec::Residual { out_channels, stride } => {
                s.push(Residual::new(name, channels, out_channels, stride));
            }
            LayerSpec::Dropout { p } => {
                s.push(Dropout { name, p });
            }
            LayerSpec::Relu => {
                s.push_activation(Activation::Relu);
            }
            LayerSpec::LeakyRelu => {
                s.push_activation(Activation::LeakyRelu(0.01));
            }
            LayerSpec::Sigmoid => {
                s.push_activation(Activation::Sigmoid);
            }
            LayerSpec::Tanh => {
                s.push_activation(Activation::Tanh);
            }
        }
        rows.clear();
        shape = s.describe(input, &mut rows)?;
    }
    if shape != [outputs] {
        let name = s.next_name();
        if shape.len() != 1 {
            return Err(ringtrain_nn::NnError::Layer {
                layer: name,
                reason: format!(
                    "the layers end with shape {shape:?}; add a flatten (or global_avg_pool) before the classifier"
                ),
            }
            .into());
        }
        s.push(Linear::new(name, shape[0], outputs).with_init(Init::XavierUniform));
    }
    Ok(s)
}
