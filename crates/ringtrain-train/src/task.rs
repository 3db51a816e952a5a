//! From a job to a task: examples, targets, model and loss.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringtrain_config::{
    ActivationName, ColumnRef, DataFormat, FfActivationName, Job, LayerSpec, LossName, ModelConfig, ModelKind,
    NormName, PoolingName, PositionsName, TokenizerName,
};
use ringtrain_data::{read_csv, CsvOptions, LabelColumn, LabelKind, Labels, TabularData};
use ringtrain_nn::{
    zoo, Activation, CellKind, Conv2d, Dropout, Flatten, GlobalAvgPool, Init, Linear, Loss, Module, Pool2d, Pooling,
    RecurrentLm, Residual, SequenceClassifier, SequenceRegressor, Sequential, Targets,
};
use ringtrain_nn::{
    FfActivation, NormPlacement, Positions, Seq2SeqConfig, Seq2SeqTransformer, TransformerClassifier,
    TransformerConfig, TransformerLm,
};
use ringtrain_tensor::Tensor;

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
    /// The preprocessing a prediction must repeat, for `preprocess.json`.
    fn preprocess(&self) -> serde_json::Value {
        serde_json::Value::Null
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
}

/// MNIST-style grey images, scaled to [0, 1] and normalised with MNIST's mean and standard
/// deviation (0.1307, 0.3081), as torchvision's examples do.
#[derive(Debug, Clone)]
pub struct ImageSet {
    images: Arc<ringtrain_data::Images>,
    labels: Arc<Vec<usize>>,
}

const MNIST_MEAN: f32 = 0.1307;
const MNIST_STD: f32 = 0.3081;

impl Examples for ImageSet {
    fn len(&self) -> usize {
        self.images.n
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![1, self.images.rows, self.images.cols]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let (r, c) = (self.images.rows, self.images.cols);
        let mut x = Vec::with_capacity(indices.len() * r * c);
        for &i in indices {
            x.extend(
                self.images
                    .image(i)
                    .iter()
                    .map(|&p| (f32::from(p) / 255.0 - MNIST_MEAN) / MNIST_STD),
            );
        }
        let x = Tensor::from_vec(&[indices.len(), 1, r, c], x).map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Classes(indices.iter().map(|&i| self.labels[i]).collect()),
        })
    }

    fn preprocess(&self) -> serde_json::Value {
        serde_json::json!({ "pixel_scale": 1.0 / 255.0, "mean": MNIST_MEAN, "std": MNIST_STD })
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

/// Token-id sequences with a class each; batches are padded with PAD (0) to the longest
/// sequence in the batch.
#[derive(Debug, Clone)]
pub struct TextSet {
    ids: Arc<Vec<Vec<u32>>>,
    labels: Arc<Vec<usize>>,
    vocab: Arc<ringtrain_data::Vocab>,
    max_len: usize,
}

impl TextSet {
    /// `texts` tokenised with `vocab` and cut to `max_len` tokens.
    pub fn new<'a>(
        texts: impl Iterator<Item = &'a str>,
        labels: Vec<usize>,
        vocab: Arc<ringtrain_data::Vocab>,
        max_len: usize,
    ) -> TextSet {
        let ids = texts
            .map(|t| {
                let mut ids = vocab.encode(t);
                ids.truncate(max_len);
                if ids.is_empty() {
                    // An empty text still needs one step; UNK says "nothing known".
                    ids.push(ringtrain_data::UNK);
                }
                ids
            })
            .collect();
        TextSet {
            ids: Arc::new(ids),
            labels: Arc::new(labels),
            vocab,
            max_len,
        }
    }
}

impl Examples for TextSet {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.max_len]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let seqs: Vec<&[u32]> = indices.iter().map(|&i| self.ids[i].as_slice()).collect();
        let padded = ringtrain_data::pad_batch(&seqs, None);
        let x = Tensor::from_vec(
            &[indices.len(), padded.max_len],
            padded.ids.iter().map(|&i| i as f32).collect(),
        )
        .map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Classes(indices.iter().map(|&i| self.labels[i]).collect()),
        })
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.vocab.len())
    }

    fn preprocess(&self) -> serde_json::Value {
        let vocab = vocab_json(&self.vocab);
        serde_json::json!({ "max_len": self.max_len, "vocab": vocab })
    }
}

/// Next-token windows over a token stream (language modelling).
#[derive(Debug, Clone)]
pub struct CorpusSet {
    seqs: Arc<ringtrain_data::LmSequences>,
    vocab: Arc<ringtrain_data::Vocab>,
}

impl Examples for CorpusSet {
    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.seqs.seq_len()]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let (inputs, targets) = self.seqs.batch(indices);
        let x = Tensor::from_vec(
            &[indices.len(), self.seqs.seq_len()],
            inputs.iter().map(|&i| i as f32).collect(),
        )
        .map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Classes(targets.iter().map(|&t| t as usize).collect()),
        })
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.vocab.len())
    }

    fn preprocess(&self) -> serde_json::Value {
        let vocab = vocab_json(&self.vocab);
        serde_json::json!({ "max_len": self.seqs.seq_len(), "vocab": vocab })
    }
}

/// Source/target pairs for an encoder–decoder. An example's input is
/// `[source ids (PAD-padded to src_len) | START, target ids (PAD-padded to tgt_len)]` and its
/// targets are `target ids, STOP, PAD…` (teacher forcing: position k predicts token k + 1).
#[derive(Debug, Clone)]
pub struct PairSet {
    src: Arc<Vec<Vec<u32>>>,
    tgt: Arc<Vec<Vec<u32>>>,
    vocab: Arc<ringtrain_data::Vocab>,
    src_len: usize,
    tgt_len: usize,
}

impl PairSet {
    /// Fraction of examples at `rows` whose greedy decoding (most likely token at every step,
    /// fed back, until STOP) equals the target exactly.
    pub fn exact_match(
        &self,
        model: &dyn Module,
        store: &ringtrain_autograd::ParamStore,
        rows: &[usize],
    ) -> Result<f64> {
        let (s, t) = (self.src_len, self.tgt_len);
        let mut hits = 0usize;
        for chunk in rows.chunks(256) {
            let n = chunk.len();
            let mut x = vec![0.0f32; n * (s + t)];
            for (r, &i) in chunk.iter().enumerate() {
                for (k, &id) in self.src[i].iter().enumerate() {
                    x[r * (s + t) + k] = id as f32;
                }
                x[r * (s + t) + s] = ringtrain_data::START as f32;
            }
            let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
            let mut done = vec![false; n];
            for step in 0..t {
                let input =
                    Tensor::from_vec(&[n, s + t], x.clone()).map_err(ringtrain_autograd::AutogradError::from)?;
                let mut g = ringtrain_autograd::Graph::inference(store);
                let xv = g.input(input);
                let logits = model.forward(&mut g, xv)?;
                let logits = g.value(logits);
                let v = logits.shape()[1];
                for r in 0..n {
                    if done[r] {
                        continue;
                    }
                    let row = &logits.as_slice()[(r * t + step) * v..(r * t + step + 1) * v];
                    let next = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0) as u32;
                    if next == ringtrain_data::STOP || next == ringtrain_data::PAD {
                        done[r] = true;
                        continue;
                    }
                    out[r].push(next);
                    if step + 1 < t {
                        x[r * (s + t) + s + step + 1] = next as f32;
                    }
                }
                if done.iter().all(|&d| d) {
                    break;
                }
            }
            hits += chunk.iter().zip(&out).filter(|(&i, o)| self.tgt[i] == **o).count();
        }
        Ok(hits as f64 / rows.len().max(1) as f64)
    }
}

impl Examples for PairSet {
    fn len(&self) -> usize {
        self.src.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.src_len + self.tgt_len]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let (s, t) = (self.src_len, self.tgt_len);
        let mut x = vec![0.0f32; indices.len() * (s + t)];
        let mut y = vec![ringtrain_data::PAD as usize; indices.len() * t];
        for (r, &i) in indices.iter().enumerate() {
            let row = &mut x[r * (s + t)..(r + 1) * (s + t)];
            for (k, &id) in self.src[i].iter().enumerate() {
                row[k] = id as f32;
            }
            row[s] = ringtrain_data::START as f32;
            for (k, &id) in self.tgt[i].iter().enumerate() {
                row[s + 1 + k] = id as f32;
                y[r * t + k] = id as usize;
            }
            y[r * t + self.tgt[i].len()] = ringtrain_data::STOP as usize;
        }
        let x = Tensor::from_vec(&[indices.len(), s + t], x).map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Classes(y),
        })
    }

    fn vocab_size(&self) -> Option<usize> {
        Some(self.vocab.len())
    }

    fn preprocess(&self) -> serde_json::Value {
        let vocab = vocab_json(&self.vocab);
        serde_json::json!({ "src_len": self.src_len, "tgt_len": self.tgt_len, "vocab": vocab })
    }
}

/// A `label<TAB>text` file, or a directory with one subdirectory of text files per class (the
/// IMDb layout; its `unsup/` directory of unlabelled reviews is left out).
fn read_text_examples(path: &std::path::Path, classes: Option<&[String]>) -> Result<ringtrain_data::TextDataset> {
    if !path.is_dir() {
        return Ok(ringtrain_data::read_labeled_lines(path, classes)?);
    }
    let labelled: Option<Vec<String>> = match classes {
        Some(c) => Some(c.to_vec()),
        None if path.join("unsup").is_dir() => {
            let mut names: Vec<String> = std::fs::read_dir(path)
                .map_err(|source| ringtrain_data::DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir() && e.file_name() != "unsup")
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Some(names)
        }
        None => None,
    };
    Ok(ringtrain_data::read_class_dirs(path, labelled.as_deref())?)
}

/// Forecasting examples: `seq_len` standardised past values → the next value.
#[derive(Debug, Clone)]
pub struct SeriesSet {
    /// The whole series, standardised with the training part's mean and deviation.
    values: Arc<Vec<f32>>,
    /// First step of each example's input window.
    starts: Vec<usize>,
    seq_len: usize,
    mean: f32,
    std: f32,
}

impl SeriesSet {
    /// RMSE, in the data's units, of the naive forecast "the next value equals the last one".
    pub fn naive_rmse(&self) -> f64 {
        let sq: f64 = self
            .starts
            .iter()
            .map(|&s| {
                let e = f64::from(self.values[s + self.seq_len] - self.values[s + self.seq_len - 1]);
                e * e
            })
            .sum();
        (sq / self.starts.len().max(1) as f64).sqrt() * f64::from(self.std)
    }
}

impl Examples for SeriesSet {
    fn len(&self) -> usize {
        self.starts.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.seq_len]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let t = self.seq_len;
        let mut x = Vec::with_capacity(indices.len() * t);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let s = self.starts[i];
            x.extend_from_slice(&self.values[s..s + t]);
            y.push(self.values[s + t]);
        }
        let n = indices.len();
        let x = Tensor::from_vec(&[n, t], x).map_err(ringtrain_autograd::AutogradError::from)?;
        let y = Tensor::from_vec(&[n, 1], y).map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Values(y),
        })
    }

    fn target_scale(&self) -> f32 {
        self.std
    }

    fn preprocess(&self) -> serde_json::Value {
        serde_json::json!({ "series_mean": self.mean, "series_std": self.std, "seq_len": self.seq_len })
    }
}

/// Feature rows with per-feature affine normalisation `(x - mean) * inv_std`.
#[derive(Debug, Clone)]
pub struct Tabular {
    data: Arc<TabularData>,
    /// Class id (or 0/1) per row for classification; `None` for regression.
    classes: Option<Arc<Vec<usize>>>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Tabular {
    /// Mean and standard deviation of each feature over `rows` (the training split only, so
    /// nothing about the test rows leaks into training).
    pub fn standardized_on(&self, rows: &[usize]) -> Tabular {
        let d = self.data.n_features;
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for &r in rows {
            for (j, &v) in self.data.row(r).iter().enumerate() {
                mean[j] += f64::from(v);
                sq[j] += f64::from(v) * f64::from(v);
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let inv_std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                // A constant feature stays constant (0) instead of dividing by zero.
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Tabular {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std,
            ..self.clone()
        }
    }
}

impl Examples for Tabular {
    fn len(&self) -> usize {
        self.data.n_rows
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.data.n_features]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let d = self.data.n_features;
        let mut x = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            x.extend(
                self.data
                    .row(i)
                    .iter()
                    .zip(&self.mean)
                    .zip(&self.inv_std)
                    .map(|((&v, &m), &s)| (v - m) * s),
            );
        }
        let x = Tensor::from_vec(&[indices.len(), d], x).map_err(ringtrain_autograd::AutogradError::from)?;
        let targets = match (&self.classes, &self.data.labels) {
            (Some(c), _) => Targets::Classes(indices.iter().map(|&i| c[i]).collect()),
            (None, Labels::Value(v)) => Targets::Values(
                Tensor::from_vec(&[indices.len(), 1], indices.iter().map(|&i| v[i]).collect())
                    .map_err(ringtrain_autograd::AutogradError::from)?,
            ),
            (None, Labels::Class { .. }) => unreachable!("class labels always come with class ids"),
        };
        Ok(Batch { x, targets })
    }

    fn fitted_on(&self, rows: &[usize]) -> Option<Arc<dyn Examples>> {
        Some(Arc::new(self.standardized_on(rows)))
    }

    fn preprocess(&self) -> serde_json::Value {
        serde_json::json!({ "feature_mean": self.mean, "feature_inv_std": self.inv_std })
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
    pub format: DataFormat,
    /// Reference scores of trivial predictors on the test split (e.g. the unigram perplexity
    /// of a language model, the naive last-value RMSE of a forecast), for the summary.
    pub baseline: BTreeMap<String, f64>,
    /// Pairs data: the training and provided test sets, for exact-match decoding.
    pub pairs: Option<Arc<PairSet>>,
    pub pair_test: Option<Arc<PairSet>>,
}

impl Task {
    pub fn from_job(job: &Job) -> Result<Task> {
        match job.data.format {
            DataFormat::Idx => return Task::from_idx(job),
            DataFormat::Text => return Task::from_text(job),
            DataFormat::Corpus => return Task::from_corpus(job),
            DataFormat::Series => return Task::from_series(job),
            DataFormat::Pairs => return Task::from_pairs(job),
            DataFormat::Csv => {}
        }
        let label_kind = if job
            .training
            .loss
            .is_some_and(|l| matches!(l, LossName::Mse | LossName::Mae))
        {
            LabelKind::Value
        } else {
            LabelKind::Class
        };
        let delimiter = u8::try_from(job.data.delimiter).map_err(|_| TrainError::Job {
            field: "data.delimiter",
            reason: format!("must be an ASCII character, got {:?}", job.data.delimiter),
        })?;
        let opts = CsvOptions {
            delimiter,
            has_header: job.data.header,
            label: match &job.data.label {
                Some(ColumnRef::Index(i)) => LabelColumn::Index(*i),
                Some(ColumnRef::Name(n)) => LabelColumn::Name(n.clone()),
                None => {
                    return Err(TrainError::Job {
                        field: "data.label",
                        reason: "csv data needs the label column".into(),
                    })
                }
            },
            label_kind,
        };
        let data = read_csv(&job.data.path, &opts)?;
        let (target, classes) = match (&data.labels, &job.data.positive_class) {
            (Labels::Class { ids, names }, Some(pos)) => {
                let p = names.iter().position(|n| n == pos).ok_or_else(|| TrainError::Job {
                    field: "data.positive_class",
                    reason: format!("class {pos:?} is not in the label column (classes: {names:?})"),
                })?;
                let binary: Vec<usize> = ids.iter().map(|&i| usize::from(i == p)).collect();
                (
                    TargetKind::Binary {
                        names: [format!("not {pos}"), pos.clone()],
                    },
                    Some(binary),
                )
            }
            (Labels::Class { ids, names }, None) => (TargetKind::Classes { names: names.clone() }, Some(ids.clone())),
            (Labels::Value(_), Some(_)) => {
                return Err(TrainError::Job {
                    field: "data.positive_class",
                    reason: "needs a class label, but the loss is a regression loss".into(),
                })
            }
            (Labels::Value(_), None) => (TargetKind::Regression, None),
        };
        let loss = match (job.training.loss, &target) {
            (Some(l), _) => match l {
                LossName::Mse => Loss::Mse,
                LossName::Mae => Loss::Mae,
                LossName::BinaryCrossEntropy => Loss::BinaryCrossEntropy,
                LossName::CrossEntropy => Loss::CrossEntropy,
            },
            (None, TargetKind::Classes { .. }) => Loss::CrossEntropy,
            (None, TargetKind::Binary { .. }) => Loss::BinaryCrossEntropy,
            (None, TargetKind::Regression) => Loss::Mse,
            (None, TargetKind::NextToken { .. }) => Loss::CrossEntropy,
        };
        let ok = matches!(
            (loss, &target),
            (Loss::CrossEntropy, TargetKind::Classes { .. })
                | (Loss::BinaryCrossEntropy, TargetKind::Binary { .. })
                | (Loss::Mse | Loss::Mae, TargetKind::Regression)
        );
        if !ok {
            return Err(TrainError::Job {
                field: "training.loss",
                reason: format!("{loss:?} does not fit a {target:?} target"),
            });
        }
        let d = data.n_features;
        let classes = classes.map(Arc::new);
        Ok(Task {
            strata: classes.as_ref().map(|c| c.to_vec()),
            examples: Arc::new(Tabular {
                data: Arc::new(data),
                classes,
                mean: vec![0.0; d],
                inv_std: vec![1.0; d],
            }),
            test_examples: None,
            target,
            loss,
            format: job.data.format,
            baseline: BTreeMap::new(),
            pairs: None,
            pair_test: None,
        })
    }

    /// `label<TAB>text` files: the vocabulary is built from the training file only, so
    /// nothing of the test texts leaks into the model's inputs.
    fn from_text(job: &Job) -> Result<Task> {
        let train = read_text_examples(&job.data.path, None)?;
        let test = match &job.data.test_path {
            Some(p) => Some(read_text_examples(p, Some(&train.label_names))?),
            None => None,
        };
        let (tokenizer, opts) = vocab_settings(job, TokenizerName::Word);
        let vocab = Arc::new(ringtrain_data::Vocab::build(
            tokenizer,
            train.texts.iter().map(String::as_str),
            &opts,
        )?);
        let max_len = job.data.max_len.unwrap_or(256);
        let encode = |d: &ringtrain_data::TextDataset| {
            TextSet::new(
                d.texts.iter().map(String::as_str),
                d.labels.clone(),
                vocab.clone(),
                max_len,
            )
        };
        let train_set = encode(&train);
        let test_set = test.as_ref().map(encode);
        if job.training.loss.is_some_and(|l| l != LossName::CrossEntropy) {
            return Err(TrainError::Job {
                field: "training.loss",
                reason: "text classification trains with cross_entropy".into(),
            });
        }
        Ok(Task {
            strata: Some(train.labels.clone()),
            examples: Arc::new(train_set),
            test_examples: test_set.map(|t| Arc::new(t) as Arc<dyn Examples>),
            target: TargetKind::Classes {
                names: train.label_names.clone(),
            },
            loss: Loss::CrossEntropy,
            format: job.data.format,
            baseline: BTreeMap::new(),
            pairs: None,
            pair_test: None,
        })
    }

    /// MNIST-layout IDX directory: training images for training (and k-fold), the t10k files as
    /// the provided test split.
    fn from_idx(job: &Job) -> Result<Task> {
        let mnist = ringtrain_data::load_mnist(&job.data.path)?;
        let to_set = |split: ringtrain_data::MnistSplit| ImageSet {
            labels: Arc::new(split.labels.iter().map(|&l| usize::from(l)).collect()),
            images: Arc::new(split.images),
        };
        let train = to_set(mnist.train);
        let test = to_set(mnist.test);
        let classes = train.labels.iter().chain(test.labels.iter()).max().map_or(0, |m| m + 1);
        if job.training.loss.is_some_and(|l| l != LossName::CrossEntropy) {
            return Err(TrainError::Job {
                field: "training.loss",
                reason: "image classification trains with cross_entropy".into(),
            });
        }
        Ok(Task {
            strata: Some(train.labels.to_vec()),
            examples: Arc::new(train),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::Classes {
                names: (0..classes).map(|c| c.to_string()).collect(),
            },
            loss: Loss::CrossEntropy,
            format: job.data.format,
            baseline: BTreeMap::new(),
            pairs: None,
            pair_test: None,
        })
    }

    /// A running text: the tail (`evaluation.test_fraction` of it) is the validation text, the
    /// vocabulary comes from the head only.
    fn from_corpus(job: &Job) -> Result<Task> {
        let text = ringtrain_data::read_text(&job.data.path)?;
        let (head, tail) = ringtrain_data::split_text_tail(&text, job.evaluation.test_fraction)?;
        let (tokenizer, opts) = vocab_settings(job, TokenizerName::Char);
        let vocab = Arc::new(ringtrain_data::Vocab::build(tokenizer, paragraphs(head), &opts)?);
        let seq_len = job.data.seq_len.unwrap_or(128);
        let stream = |t: &str| -> Vec<u32> { paragraphs(t).flat_map(|p| vocab.encode_with_bounds(p)).collect() };
        let (train_ids, test_ids) = (stream(head), stream(tail));
        let windows = |ids: Vec<u32>, part: &str| -> Result<ringtrain_data::LmSequences> {
            let n = ids.len();
            let seqs = ringtrain_data::LmSequences::new(ids, seq_len, seq_len)?;
            if seqs.is_empty() {
                return Err(TrainError::Job {
                    field: "data.seq_len",
                    reason: format!("the {part} text has {n} tokens, too few for one window of {seq_len}"),
                });
            }
            Ok(seqs)
        };
        let unigram = unigram_perplexity(&train_ids, &test_ids, vocab.len());
        let train = CorpusSet {
            seqs: Arc::new(windows(train_ids, "training")?),
            vocab: vocab.clone(),
        };
        let test = CorpusSet {
            seqs: Arc::new(windows(test_ids, "validation")?),
            vocab: vocab.clone(),
        };
        if job.training.loss.is_some_and(|l| l != LossName::CrossEntropy) {
            return Err(TrainError::Job {
                field: "training.loss",
                reason: "language models train with cross_entropy".into(),
            });
        }
        Ok(Task {
            strata: None,
            examples: Arc::new(train),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::NextToken { vocab: vocab.len() },
            loss: Loss::CrossEntropy,
            format: job.data.format,
            baseline: BTreeMap::from([("unigram_perplexity".to_string(), unigram)]),
            pairs: None,
            pair_test: None,
        })
    }

    /// Sequence-to-sequence pairs; the vocabulary and the lengths come from the training file.
    fn from_pairs(job: &Job) -> Result<Task> {
        let train = ringtrain_data::read_pairs(&job.data.path)?;
        let test = match &job.data.test_path {
            Some(p) => Some(ringtrain_data::read_pairs(p)?),
            None => None,
        };
        let (tokenizer, opts) = vocab_settings(job, TokenizerName::Char);
        let vocab = Arc::new(ringtrain_data::Vocab::build(
            tokenizer,
            train.iter().flat_map(|(a, b)| [a.as_str(), b.as_str()]),
            &opts,
        )?);
        let cap = job.data.max_len.unwrap_or(usize::MAX);
        let encode = |t: &str| {
            let mut ids = vocab.encode(t);
            ids.truncate(cap);
            ids
        };
        let longest =
            |side: fn(&(String, String)) -> &str| train.iter().map(|p| encode(side(p)).len()).max().unwrap_or(0);
        let src_len = longest(|p| &p.0).max(1);
        // One more for START (inputs) and STOP (targets).
        let tgt_len = longest(|p| &p.1) + 1;
        let set = |pairs: &[(String, String)]| PairSet {
            src: Arc::new(
                pairs
                    .iter()
                    .map(|p| {
                        let mut v = encode(&p.0);
                        v.truncate(src_len);
                        v
                    })
                    .collect(),
            ),
            tgt: Arc::new(
                pairs
                    .iter()
                    .map(|p| {
                        let mut v = encode(&p.1);
                        v.truncate(tgt_len - 1);
                        v
                    })
                    .collect(),
            ),
            vocab: vocab.clone(),
            src_len,
            tgt_len,
        };
        let train_set = Arc::new(set(&train));
        let test_set = test.as_deref().map(|t| Arc::new(set(t)));
        Ok(Task {
            strata: None,
            examples: train_set.clone(),
            test_examples: test_set.clone().map(|t| t as Arc<dyn Examples>),
            target: TargetKind::NextToken { vocab: vocab.len() },
            loss: Loss::CrossEntropy,
            format: job.data.format,
            baseline: BTreeMap::new(),
            pairs: Some(train_set),
            pair_test: test_set,
        })
    }

    /// One column of a CSV file in time order. The last `evaluation.test_fraction` of the
    /// targets are the test examples (their input windows may reach back into the training
    /// part: those values are known when forecasting); training windows end before the cut.
    fn from_series(job: &Job) -> Result<Task> {
        let column = match &job.data.label {
            Some(ColumnRef::Name(n)) => n.clone(),
            _ => {
                return Err(TrainError::Job {
                    field: "data.label",
                    reason: "series data needs the name of the column to forecast".into(),
                })
            }
        };
        let delimiter = u8::try_from(job.data.delimiter).map_err(|_| TrainError::Job {
            field: "data.delimiter",
            reason: format!("must be an ASCII character, got {:?}", job.data.delimiter),
        })?;
        let series = ringtrain_data::read_series_csv(
            &job.data.path,
            delimiter,
            &[column.as_str()],
            ringtrain_data::Missing::Refuse,
        )?;
        let raw = series.column(0);
        let seq_len = job.data.seq_len.unwrap_or(12);
        let n_examples = raw.len().saturating_sub(seq_len);
        let n_test = ((n_examples as f64) * job.evaluation.test_fraction).round() as usize;
        if n_test == 0 || n_test >= n_examples {
            return Err(TrainError::Job {
                field: "data.seq_len",
                reason: format!(
                    "{} values give {n_examples} windows of {seq_len}, too few for a train/test cut at {}",
                    raw.len(),
                    job.evaluation.test_fraction
                ),
            });
        }
        let n_train = n_examples - n_test;
        // Statistics of the values the training windows see (inputs and targets), nothing later.
        let seen = &raw[..n_train + seq_len];
        let mean = seen.iter().map(|&v| f64::from(v)).sum::<f64>() / seen.len() as f64;
        let var = seen.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / seen.len() as f64;
        let std = var.sqrt().max(1e-12);
        let values: Arc<Vec<f32>> = Arc::new(raw.iter().map(|&v| ((f64::from(v) - mean) / std) as f32).collect());
        let set = |starts: std::ops::Range<usize>| SeriesSet {
            values: values.clone(),
            starts: starts.collect(),
            seq_len,
            mean: mean as f32,
            std: std as f32,
        };
        let test = set(n_train..n_examples);
        let loss = match job.training.loss {
            None | Some(LossName::Mse) => Loss::Mse,
            Some(LossName::Mae) => Loss::Mae,
            Some(other) => {
                return Err(TrainError::Job {
                    field: "training.loss",
                    reason: format!("forecasting is regression: use mse or mae, not {other:?}"),
                })
            }
        };
        Ok(Task {
            strata: None,
            baseline: BTreeMap::from([("naive_last_value_rmse".to_string(), test.naive_rmse())]),
            examples: Arc::new(set(0..n_train)),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::Regression,
            loss,
            format: job.data.format,
            pairs: None,
            pair_test: None,
        })
    }

    pub fn input_shape(&self) -> Vec<usize> {
        self.examples.input_shape()
    }

    /// The job's model for this task's inputs, outputs and vocabulary, shape-checked.
    pub fn model(&self, cfg: &ModelConfig) -> Result<Box<dyn Module>> {
        let input = match &self.pairs {
            Some(p) => vec![p.src_len, p.tgt_len],
            None => self.examples.input_shape(),
        };
        build_model_for(
            cfg,
            self.format,
            &input,
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
    build_model_with_vocab(cfg, input, outputs, None)
}

/// [`build_model`] for models that embed tokens from a vocabulary of `vocab` entries.
pub fn build_model_with_vocab(
    cfg: &ModelConfig,
    input: &[usize],
    outputs: usize,
    vocab: Option<usize>,
) -> Result<Box<dyn Module>> {
    let format = if vocab.is_some() {
        DataFormat::Text
    } else {
        DataFormat::Csv
    };
    build_model_for(cfg, format, input, outputs, vocab)
}

/// The model of `cfg` for data of `format`: the same recurrent kind classifies texts, models a
/// corpus or forecasts a series depending on the data. For pairs, `input` is
/// `[source length, decoder length]` (an example is both, concatenated).
pub fn build_model_for(
    cfg: &ModelConfig,
    format: DataFormat,
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
            match format {
                DataFormat::Corpus => Box::new(TransformerLm::new(t)),
                DataFormat::Pairs => {
                    let &[src_len, tgt_len] = input else {
                        return Err(TrainError::Job {
                            field: "data.format",
                            reason: format!("pairs need [source, target] lengths, got {input:?}"),
                        });
                    };
                    let mut c = Seq2SeqConfig::new(vocab, src_len, tgt_len);
                    c.d_model = t.d_model;
                    c.heads = t.heads;
                    c.encoder_layers = t.layers;
                    c.decoder_layers = t.layers;
                    c.ff = t.ff;
                    c.dropout = t.dropout;
                    c.activation = t.activation;
                    c.norm = t.norm;
                    c.positions = t.positions;
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
        ModelKind::Rnn | ModelKind::Gru | ModelKind::Lstm => {
            let cell = match cfg.kind {
                ModelKind::Rnn => CellKind::Rnn,
                ModelKind::Gru => CellKind::Gru,
                _ => CellKind::Lstm,
            };
            let hidden = if cfg.hidden.is_empty() {
                vec![if format == DataFormat::Series { 32 } else { 128 }]
            } else {
                cfg.hidden.clone()
            };
            let embed = cfg.embedding_dim.unwrap_or(64);
            match (format, vocab) {
                (DataFormat::Series, _) => Box::new(SequenceRegressor::new(cell, &hidden, cfg.dropout, outputs)),
                (DataFormat::Corpus, Some(v)) => {
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
    let one_example = match (format, input) {
        (DataFormat::Pairs, &[s, t]) => vec![s + t],
        _ => input.to_vec(),
    };
    model.describe(&one_example, &mut Vec::new())?;
    Ok(model)
}

/// The job's tokenizer (or `default`) and vocabulary limits.
fn vocab_settings(job: &Job, default: TokenizerName) -> (ringtrain_data::Tokenizer, ringtrain_data::VocabOptions) {
    let tokenizer = match job.data.tokenizer.unwrap_or(default) {
        TokenizerName::Word => ringtrain_data::Tokenizer::Word { lowercase: true },
        TokenizerName::Char => ringtrain_data::Tokenizer::Char,
    };
    let opts = ringtrain_data::VocabOptions {
        max_size: job.data.vocab_size,
        min_freq: job.data.min_freq,
    };
    (tokenizer, opts)
}

/// A vocabulary as JSON for `preprocess.json` (what `generate` and `evaluate` rebuild it from).
fn vocab_json(vocab: &ringtrain_data::Vocab) -> Option<serde_json::Value> {
    vocab.to_json().ok().and_then(|j| serde_json::from_str(&j).ok())
}

/// The paragraphs (blocks between blank lines) of a text, each trimmed of surrounding
/// newlines; they become START … STOP documents.
fn paragraphs(text: &str) -> impl Iterator<Item = &str> {
    text.split("\n\n")
        .map(|p| p.trim_matches('\n'))
        .filter(|p| !p.trim().is_empty())
}

/// Perplexity of an add-one-smoothed unigram model fitted on `train`, on `test`: what a
/// language model must clearly beat to have learnt anything about context.
fn unigram_perplexity(train: &[u32], test: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = test
        .iter()
        .map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln())
        .sum();
    (nll / test.len().max(1) as f64).exp()
}

/// The job's transformer shape; positions cover the longest sequence the data can give.
fn pooling(name: PoolingName) -> Pooling {
    match name {
        PoolingName::Last => Pooling::Last,
        PoolingName::Mean => Pooling::Mean,
        PoolingName::Max => Pooling::Max,
    }
}

pub(crate) fn transformer_config(cfg: &ModelConfig, vocab: usize, max_len: usize) -> TransformerConfig {
    let d = cfg.embedding_dim.unwrap_or(64);
    let mut t = TransformerConfig::new(
        vocab,
        d,
        cfg.heads.unwrap_or(4),
        cfg.blocks.unwrap_or(2),
        cfg.ff_dim.unwrap_or(4 * d),
    );
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
