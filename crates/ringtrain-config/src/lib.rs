//! `ringtrain-config`: the job file.
//!
//! A job is TOML with the sections `[job]`, `[data]`, `[model]`, `[optimizer]`,
//! `[training]` and `[evaluation]` (see `examples/` and the README). Parsing is strict:
//! every table denies unknown fields, so a misspelled `learnig_rate` stops the job with the
//! field's name and line instead of being ignored. [`Job::load`] parses and then
//! [`Job::validate`]s once; code after it trusts the values.
//!
//! Relative paths in a job are relative to the job file's directory, so a job runs the same
//! from any working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod validate;

/// A job file that could not be used; `Display` is one line naming the file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read job file: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}:{line}: `{field}`: {reason}", line = line.map_or_else(|| "?".to_string(), |l| l.to_string()))]
    Invalid {
        path: PathBuf,
        field: String,
        line: Option<usize>,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub job: JobMeta,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub training: TrainingConfig,
    #[serde(default)]
    pub evaluation: EvaluationConfig,
    #[serde(default)]
    pub distributed: DistributedConfig,
}

/// How gradients cross the network in a distributed run; a single process ignores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Gradient buckets on the wire: `none` (f32) or `bf16` (half the bytes; each rank
    /// carries its rounding error into its next step, so nothing is lost for good). Embedding
    /// tables' rows travel as f32.
    #[serde(default)]
    pub compression: Compression,
    /// Gradients are all-reduced in buckets of about this many MiB (whole parameters, in
    /// the order backward finishes them).
    #[serde(default = "bucket_mb")]
    pub bucket_mb: f64,
    /// Start a bucket's all-reduce while backward still computes the rest (DDP's overlap);
    /// off: all buckets after backward. Either way the result has the same bits.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Embedding tables' gradients: `auto` sends only the rows a step touched (an all-gather
    /// of rows and their indices) when that is fewer bytes than the dense all-reduce, decided
    /// per step from every rank's count; `always` or `never` forces one way.
    #[serde(default)]
    pub sparse_embeddings: SparseEmbeddings,
}

/// See [`DistributedConfig::sparse_embeddings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SparseEmbeddings {
    #[default]
    Auto,
    Always,
    Never,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            compression: Compression::None,
            bucket_mb: bucket_mb(),
            overlap: true,
            sparse_embeddings: SparseEmbeddings::Auto,
        }
    }
}

fn bucket_mb() -> f64 {
    1.0
}

/// See [`DistributedConfig::compression`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMeta {
    pub name: String,
    /// Seeds everything: initial weights, splits, shuffling, dropout.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Numeric feature columns plus a label column.
    Csv,
    /// A directory of IDX files in MNIST's naming (`train-images-idx3-ubyte[.gz]`,
    /// `train-labels-idx1-ubyte[.gz]`, `t10k-...`): 28×28 grey images with their test split.
    Idx,
    /// Text classification: one example per line, `label<TAB>text` (plain or .gz).
    Text,
    /// Language modelling: one running text (plain or .gz). Paragraphs (blocks separated by
    /// blank lines) become documents wrapped in START … STOP, so a model learns where a
    /// passage ends; training windows of `seq_len` tokens predict the next token at every step.
    Corpus,
    /// Sequence to sequence: one pair per line, `source<TAB>target` (plain or .gz), with one
    /// vocabulary for both sides; models a transformer encoder–decoder.
    Pairs,
    /// Forecasting: one numeric column (`label`) of a CSV file with a header, in time order;
    /// each example is `seq_len` past values and the next value is its target.
    Series,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerName {
    Word,
    Char,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ColumnRef {
    Index(usize),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// The data file (csv) or directory (idx), relative to the job file.
    pub path: PathBuf,
    /// The label column (csv): a header name or a 0-based index.
    #[serde(default)]
    pub label: Option<ColumnRef>,
    #[serde(default = "yes")]
    pub header: bool,
    #[serde(default = "comma")]
    pub delimiter: char,
    /// Turns a multi-class label into a binary one: 1 for this class, 0 for the rest.
    #[serde(default)]
    pub positive_class: Option<String>,
    /// Standardise each feature with the training split's mean and standard deviation.
    #[serde(default = "yes")]
    pub standardize: bool,
    /// A separate test file (text), used by `evaluation.scheme = "provided"`.
    #[serde(default)]
    pub test_path: Option<PathBuf>,
    /// Text: how to cut text into tokens (default "word", lowercased).
    #[serde(default)]
    pub tokenizer: Option<TokenizerName>,
    /// Text: vocabulary size including the 4 special tokens (PAD, UNK, START, STOP).
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Text: tokens seen fewer times in the training split become UNK.
    #[serde(default = "one")]
    pub min_freq: usize,
    /// Text: keep at most this many tokens per example.
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Corpus: tokens per training window; series: past values per example.
    #[serde(default)]
    pub seq_len: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// One neuron: logistic regression (binary) or linear regression.
    Logistic,
    /// Multi-layer perceptron.
    Mlp,
    /// LeNet-5 (LeCun et al., 1998) for 28×28 images.
    Lenet5,
    /// A small residual network for 28×28 images.
    ResnetMini,
    /// The layers listed in `model.layers`, in order.
    Layers,
    /// Embedding → vanilla RNN → linear (sequence classification).
    Rnn,
    /// Embedding → GRU → linear.
    Gru,
    /// Embedding → LSTM → linear.
    Lstm,
    /// Token embedding + positions → `blocks` self-attention blocks: a classifier on text data
    /// (key-padding masks, mean pooling), a causal decoder (GPT-style) on a corpus, the
    /// original encoder–decoder on pairs.
    Transformer,
    /// fastText-style text classifier: the mean of word and hashed word-bigram embeddings,
    /// then one linear layer.
    Bow,
    /// Fully convolutional network for series classification (Wang et al., 2017): three
    /// 1-D convolution blocks, the average over time, a linear layer. Each CSV row is a
    /// series (`data.format = "csv"`, the other columns in order).
    Fcn,
}

/// One entry of `model.layers`; input sizes (channels, features) are inferred from the
/// previous layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    Conv2d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        padding: usize,
    },
    MaxPool2d {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    AvgPool2d {
        kernel: usize,
        #[serde(default)]
        stride: Option<usize>,
    },
    GlobalAvgPool,
    /// Over a series `[time, channels]` (a csv row is `[time]`, one channel).
    Conv1d {
        out_channels: usize,
        kernel: usize,
        #[serde(default = "one")]
        stride: usize,
        /// Zeros on each side; `None`: "same" (the output as long as the input; stride 1).
        #[serde(default)]
        padding: Option<usize>,
        #[serde(default = "one")]
        dilation: usize,
    },
    /// Normalisation over the last axis (a series' channels, a vector's features).
    LayerNorm,
    /// The mean over time of a series `[time, channels]` → `[channels]`.
    GlobalAvgPool1d,
    Flatten,
    Linear {
        out: usize,
    },
    Residual {
        out_channels: usize,
        #[serde(default = "one")]
        stride: usize,
    },
    Dropout {
        p: f64,
    },
    Relu,
    LeakyRelu,
    Sigmoid,
    Tanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationName {
    Relu,
    LeakyRelu,
    Sigmoid,
    Tanh,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Hidden layer widths (MLP).
    #[serde(default)]
    pub hidden: Vec<usize>,
    #[serde(default = "relu")]
    pub activation: ActivationName,
    /// For `kind = "layers"`.
    #[serde(default)]
    pub layers: Vec<LayerSpec>,
    /// Token models: embedding width (transformers: d_model).
    #[serde(default)]
    pub embedding_dim: Option<usize>,
    /// Transformers: attention heads (divides embedding_dim; default 4).
    #[serde(default)]
    pub heads: Option<usize>,
    /// Transformers: number of attention blocks (default 2).
    #[serde(default)]
    pub blocks: Option<usize>,
    /// Transformers: width of the position-wise feed-forward network (default 4·d_model).
    #[serde(default)]
    pub ff_dim: Option<usize>,
    /// Transformers: "relu" (default) or "gelu" in the feed-forward network.
    #[serde(default)]
    pub ff_activation: FfActivationName,
    /// Transformers: "post" (default, the original) or "pre" layer normalisation.
    #[serde(default)]
    pub norm: NormName,
    /// Transformers: "sinusoidal" (default), "learned" or "none".
    #[serde(default)]
    pub positions: PositionsName,
    /// Recurrent models: a backward direction as well.
    #[serde(default)]
    pub bidirectional: bool,
    /// Recurrent models: dropout between stacked layers (and, for language models, before
    /// the output layer); bag of n-grams: on the mean vector.
    #[serde(default)]
    pub dropout: f64,
    /// Text classifiers: dropout on the embedded tokens.
    #[serde(default)]
    pub embedding_dropout: f64,
    /// Transformer classifiers: in training, each real token is left out (of attention and
    /// pooling) with this probability, at least one kept per text ("word dropout").
    #[serde(default)]
    pub token_dropout: f64,
    /// Recurrent token models: fixed one-hot inputs instead of a learned embedding (small
    /// vocabularies, e.g. characters).
    #[serde(default)]
    pub one_hot: bool,
    /// Text classifiers: how the per-token outputs become one vector (recurrent default
    /// `last`, transformer default `mean`; a transformer has no `last`).
    #[serde(default)]
    pub pooling: Option<PoolingName>,
    /// Bag of n-grams (`kind = "bow"`): hash buckets for word bigrams (default 262 144; 0 =
    /// words only). Fewer buckets share more rows between bigrams.
    #[serde(default)]
    pub bigram_buckets: Option<usize>,
}

impl ModelConfig {
    /// `embedding_dim`, or its default: 64.
    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim.unwrap_or(64)
    }

    /// `bigram_buckets`, or its default: 262 144.
    pub fn bigram_buckets(&self) -> usize {
        self.bigram_buckets.unwrap_or(1 << 18)
    }

    /// `heads`, or its default: 4.
    pub fn heads(&self) -> usize {
        self.heads.unwrap_or(4)
    }

    /// `blocks`, or its default: 2.
    pub fn blocks(&self) -> usize {
        self.blocks.unwrap_or(2)
    }

    /// `ff_dim`, or its default: four times the embedding width.
    pub fn ff_dim(&self) -> usize {
        self.ff_dim.unwrap_or(4 * self.embedding_dim())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfActivationName {
    #[default]
    Relu,
    Gelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormName {
    #[default]
    Post,
    Pre,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionsName {
    #[default]
    Sinusoidal,
    Learned,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingName {
    /// The final state (after the last real token) of each direction.
    #[default]
    Last,
    /// The mean of the outputs over the real tokens.
    Mean,
    /// The element-wise maximum of the outputs over the real tokens (max-over-time).
    Max,
}

impl ModelKind {
    pub fn is_recurrent(self) -> bool {
        matches!(self, ModelKind::Rnn | ModelKind::Gru | ModelKind::Lstm)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Sgd,
    Adagrad,
    Rmsprop,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    Constant,
    Step,
    Cosine,
}

/// Optimizer and learning-rate schedule. Hyper-parameters a given optimizer does not use are
/// refused, so a `momentum` meant for SGD is not silently ignored by Adam.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerName,
    pub lr: f64,
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub nesterov: Option<bool>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub betas: Option<[f64; 2]>,
    #[serde(default)]
    pub eps: Option<f64>,
    #[serde(default = "constant")]
    pub schedule: ScheduleName,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Step schedule: decay every this many epochs.
    #[serde(default)]
    pub step_epochs: Option<u64>,
    /// Step schedule: decay factor.
    #[serde(default)]
    pub gamma: Option<f64>,
    /// Cosine schedule: final learning rate.
    #[serde(default)]
    pub min_lr: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossName {
    Mse,
    Mae,
    BinaryCrossEntropy,
    CrossEntropy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Defaults to cross-entropy for classes, binary cross-entropy for a binary label.
    #[serde(default)]
    pub loss: Option<LossName>,
    /// Clip gradients to this global L2 norm.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Recurrent language models: truncated backpropagation through time over the text as
    /// `batch_size` parallel streams, in order, carrying the recurrent state from one window
    /// to the next (gradients stop at the window boundary). Off: shuffled windows, each from a
    /// zero state.
    #[serde(default)]
    pub tbptt: bool,
    /// Gradient accumulation (PyTorch's `no_sync`): each optimizer step takes this many
    /// batches of `batch_size`, weights their gradients by their example counts and
    /// synchronises once, as one batch of `accumulate_steps × batch_size` would.
    #[serde(default = "one")]
    pub accumulate_steps: usize,
    /// Stop when the validation metric has not improved for `patience` epochs, and keep the
    /// best epoch's weights (needs `evaluation.validation_fraction`).
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

/// `training.early_stopping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// What is watched on the validation part.
    #[serde(default)]
    pub metric: StopMetric,
    /// Epochs without an improvement of more than `min_delta` before training stops.
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
    /// Then train again from the start on the whole training split (validation part
    /// included) for the best epoch's number of epochs, and keep that model: the choice of
    /// epochs costs no training data.
    #[serde(default)]
    pub refit: bool,
}

/// A validation metric early stopping watches: losses and errors must fall, accuracy rise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    #[default]
    ValLoss,
    ValAccuracy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalScheme {
    /// One seeded (stratified) train/test split.
    TrainTest,
    /// The dataset's own test split (e.g. MNIST's 10 000 test images).
    Provided,
    /// K-fold cross-validation: K models, each tested on one fold.
    Kfold,
    /// Ordered hold-out: train on the first `1 - test_fraction` of the data in its order and
    /// test on the rest, nothing shuffled across the cut (series and language-model corpora).
    TimeSeries,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    #[serde(default = "train_test")]
    pub scheme: EvalScheme,
    #[serde(default = "test_fraction")]
    pub test_fraction: f64,
    #[serde(default = "yes")]
    pub stratify: bool,
    #[serde(default = "five")]
    pub folds: usize,
    /// k-fold on a cluster: train the folds in parallel on groups of workers, each group its
    /// own ring (G groups, G the largest divisor of the worker count that is at most `folds`),
    /// instead of one after another on the whole ring. Same splits and seeds either way.
    #[serde(default)]
    pub parallel_folds: bool,
    /// A validation part carved from each training split (stratified for classes; the
    /// ordered tail for corpora and series), evaluated after every epoch: what early stopping
    /// watches. The model trains on the rest.
    #[serde(default)]
    pub validation_fraction: Option<f64>,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        EvaluationConfig {
            scheme: EvalScheme::TrainTest,
            test_fraction: test_fraction(),
            stratify: true,
            folds: five(),
            parallel_folds: false,
            validation_fraction: None,
        }
    }
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn comma() -> char {
    ','
}
fn relu() -> ActivationName {
    ActivationName::Relu
}
fn constant() -> ScheduleName {
    ScheduleName::Constant
}
fn train_test() -> EvalScheme {
    EvalScheme::TrainTest
}
fn test_fraction() -> f64 {
    0.2
}
fn five() -> usize {
    5
}

impl Job {
    /// Reads, parses and validates a job file; relative paths are resolved against its
    /// directory.
    pub fn load(path: &Path) -> Result<Job, ConfigError> {
        Job::load_with_data(path, None).map(|(job, _)| job)
    }

    /// [`Job::load`], with `data` (relative to the current directory, as `--data` gives it)
    /// in place of the data path. Returns the job and its text. Every command that reads a
    /// job file goes through here.
    pub fn load_with_data(path: &Path, data: Option<&Path>) -> Result<(Job, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let job = Job::from_text(&text, path, data)?;
        Ok((job, text))
    }

    /// A job's text as read from `path` (or as the coordinator sent it, with the path it was
    /// read from): parsed, relative paths resolved against `path`'s directory, `data` in place
    /// of the data path, validated.
    pub fn from_text(text: &str, path: &Path, data: Option<&Path>) -> Result<Job, ConfigError> {
        let mut job = Job::parse(text, path)?;
        job.resolve_paths(path);
        if let Some(d) = data {
            job.data.path = d.to_path_buf();
        }
        job.validate(text, path)?;
        Ok(job)
    }

    /// Makes the data paths relative to the job file's directory absolute-ish (joined to it).
    pub fn resolve_paths(&mut self, job_file: &Path) {
        let base = job_file.parent().unwrap_or(Path::new("."));
        if self.data.path.is_relative() {
            self.data.path = base.join(&self.data.path);
        }
        if let Some(t) = self.data.test_path.as_mut().filter(|t| t.is_relative()) {
            *t = base.join(&*t);
        }
    }

    /// Parses TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Job, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })
    }
}

/// 1-based line and column of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Line of `section.key` in a job file: the first `key =` line inside `[section]`.
/// A plain scan suffices because job files are flat two-level tables.
fn locate(text: &str, field: &str) -> Option<usize> {
    let (section, key) = field.split_once('.')?;
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            in_section = name.trim() == section;
        } else if in_section && t.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[job]
name = "t"
seed = 1

[data]
format = "csv"
path = "Cargo.toml"
label = "species"

[model]
kind = "mlp"
hidden = [8]

[optimizer]
kind = "adam"
lr = 0.01

[training]
epochs = 3
batch_size = 4
"#;

    fn check(text: &str) -> Result<Job, ConfigError> {
        let p = Path::new("job.toml");
        let job = Job::parse(text, p)?;
        job.validate(text, p)?;
        Ok(job)
    }

    #[test]
    fn a_good_job_parses_with_defaults() {
        let job = check(GOOD).unwrap();
        assert_eq!(job.data.label, Some(ColumnRef::Name("species".into())));
        assert_eq!(job.evaluation.scheme, EvalScheme::TrainTest);
        assert!(job.data.standardize);
        let by_index = check(&GOOD.replace("label = \"species\"", "label = 4")).unwrap();
        assert_eq!(by_index.data.label, Some(ColumnRef::Index(4)));
    }

    #[test]
    fn misspelled_key_names_field_and_line() {
        let bad = GOOD.replace("lr = 0.01", "learnig_rate = 0.01");
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.starts_with("job.toml:17:1: unknown field `learnig_rate`"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn missing_field_is_named() {
        let bad = GOOD.replace("epochs = 3\n", "");
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.contains("missing field `epochs`"), "{err}");
    }

    #[test]
    fn negative_learning_rate_names_field_and_line() {
        let err = check(&GOOD.replace("lr = 0.01", "lr = -0.1")).unwrap_err().to_string();
        assert_eq!(err, "job.toml:17: `optimizer.lr`: must be a positive number, got -0.1");
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let err = check(&GOOD.replace("lr = 0.01", "lr = 0.01\nmomentum = 0.9"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`optimizer.momentum`: is not used by Adam"), "{err}");
        let err = check(&GOOD.replace("path = \"Cargo.toml\"", "path = \"nope.csv\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`data.path`: not found: nope.csv"), "{err}");
        let err = check(&GOOD.replace("kind = \"mlp\"", "kind = \"transformr\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `transformr`"), "{err}");
        assert!(check(&GOOD.replace("batch_size = 4", "batch_size = 0")).is_err());
    }

    #[test]
    fn stacked_recurrent_layers_need_one_hidden_size() {
        let lstm = GOOD
            .replace("format = \"csv\"", "format = \"text\"")
            .replace("label = \"species\"\n", "")
            .replace("kind = \"mlp\"", "kind = \"lstm\"");
        assert!(check(&lstm.replace("[8]", "[8, 8]")).is_ok());
        let err = check(&lstm.replace("[8]", "[8, 4]")).unwrap_err().to_string();
        assert!(
            err.contains("`model.hidden`: stacked recurrent layers share one hidden size of at least 1, got [8, 4]"),
            "{err}"
        );
    }

    #[test]
    fn early_stopping_needs_a_validation_part() {
        let stop = GOOD.replace("batch_size = 4", "batch_size = 4\nearly_stopping = { patience = 3 }");
        let err = check(&stop).unwrap_err().to_string();
        assert!(
            err.contains("`training.early_stopping`: watches a validation part"),
            "{err}"
        );
        let job = check(&format!("{stop}\n[evaluation]\nvalidation_fraction = 0.2\n")).unwrap();
        assert_eq!(job.training.early_stopping.map(|e| e.metric), Some(StopMetric::ValLoss));
        let err = check(&format!("{GOOD}\n[evaluation]\nvalidation_fraction = 1.5\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`evaluation.validation_fraction`: must be in (0, 1), got 1.5"),
            "{err}"
        );
    }

    #[test]
    fn a_bag_of_ngrams_takes_text_and_only_it_takes_bigram_buckets() {
        let text = GOOD
            .replace("format = \"csv\"", "format = \"text\"")
            .replace("label = \"species\"\n", "")
            .replace("kind = \"mlp\"\nhidden = [8]", "kind = \"bow\"\nbigram_buckets = 1024");
        assert_eq!(check(&text).unwrap().model.bigram_buckets(), 1024);
        let err = check(&text.replace("format = \"text\"", "format = \"csv\"\nlabel = \"species\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`model.kind`: bow does not fit csv data"), "{err}");
        let err = check(&text.replace("kind = \"bow\"", "kind = \"lstm\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`model.bigram_buckets`: belongs to kind = \"bow\""),
            "{err}"
        );
    }

    #[test]
    fn a_loss_that_does_not_fit_the_data_format_is_refused() {
        let text = GOOD
            .replace("format = \"csv\"", "format = \"text\"")
            .replace("label = \"species\"\n", "")
            .replace("kind = \"mlp\"", "kind = \"lstm\"");
        assert!(check(&text.replace("batch_size = 4", "batch_size = 4\nloss = \"cross_entropy\"")).is_ok());
        let err = check(&text.replace("batch_size = 4", "batch_size = 4\nloss = \"mse\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`training.loss`: text data trains with cross_entropy"),
            "{err}"
        );
    }

    #[test]
    fn parallel_folds_need_kfold() {
        let kfold = format!("{GOOD}\n[evaluation]\nscheme = \"kfold\"\nfolds = 3\nparallel_folds = true\n");
        assert!(check(&kfold).unwrap().evaluation.parallel_folds);
        assert!(!check(GOOD).unwrap().evaluation.parallel_folds, "off by default");
        let err = check(&kfold.replace("scheme = \"kfold\"", "scheme = \"train_test\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":26: `evaluation.parallel_folds`: runs the folds"),
            "{err}"
        );
    }

    #[test]
    fn layer_lists_parse_strictly() {
        let job = GOOD.replace(
            "kind = \"mlp\"\nhidden = [8]",
            "kind = \"layers\"\nlayers = [{ type = \"conv2d\", out_channels = 4, kernel = 3 }, { type = \"relu\" }, { type = \"flatten\" }]",
        );
        let parsed = check(&job).unwrap();
        assert_eq!(
            parsed.model.layers[0],
            LayerSpec::Conv2d {
                out_channels: 4,
                kernel: 3,
                stride: 1,
                padding: 0
            }
        );
        let bad = job.replace("kernel = 3", "kernal = 3");
        let err = check(&bad).unwrap_err().to_string();
        assert!(err.contains("kernal"), "{err}");
    }
}
