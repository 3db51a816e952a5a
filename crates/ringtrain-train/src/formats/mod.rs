//! One module per data format. Each owns how its files are read into examples, what it fits
//! on the training split (and writes to `preprocess.json`), its target, what a model does with
//! its input ([`ModelRole`]), and how a saved model predicts a file of it. [`format`] is the
//! registry: the only place that matches on the data format.
//!
//! Adding a format: a module here implementing [`Format`], its line in [`format`], and its
//! variant in `ringtrain_config::DataFormat` with the checks `Job::validate` makes of it.

use std::path::Path;

use ringtrain_config::{DataFormat, Job, LossName, TokenizerName};

use crate::inference::{Prediction, SavedModel};
use crate::task::{TargetKind, Task};
use crate::Result;

mod corpus;
mod csv;
mod idx;
mod pairs;
mod preprocess;
mod series;
mod text;

pub(crate) use self::csv::{csv_options, standardize_into};
pub use self::preprocess::Preprocessing;
pub(crate) use self::preprocess::{PreprocessFile, VERSION as PREPROCESS_VERSION};
pub(crate) use self::text::TextSet;

/// The module of `format`.
pub(crate) fn format(format: DataFormat) -> &'static dyn Format {
    match format {
        DataFormat::Csv => &csv::Csv,
        DataFormat::Idx => &idx::Idx,
        DataFormat::Text => &text::Text,
        DataFormat::Corpus => &corpus::Corpus,
        DataFormat::Series => &series::Series,
        DataFormat::Pairs => &pairs::Pairs,
    }
}

/// What a model does with its input; the data format decides it, the model kind how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRole {
    /// One prediction per example (a class, or a value for tabular regression).
    Classify,
    /// The next token at every position of a running text.
    LanguageModel,
    /// A target sequence from a source sequence (encoder–decoder).
    Translate,
    /// The next value of a series from a window of past values.
    Forecast,
}

/// A data format; see the module docs.
pub(crate) trait Format: Sync {
    /// The job's data read and prepared: examples (and the format's own test split), target,
    /// loss, baselines.
    fn task(&self, job: &Job) -> Result<Task>;

    /// What a model does with examples of this format.
    fn role(&self) -> ModelRole;

    /// The target of a model saved from a job of this format: `classes` as recorded in
    /// `preprocess.json`, `vocab` the size of its vocabulary (0 without one).
    fn saved_target(&self, job: &Job, classes: &[String], _vocab: usize) -> TargetKind {
        if let Some(pos) = &job.data.positive_class {
            TargetKind::Binary {
                names: [format!("not {pos}"), pos.clone()],
            }
        } else if job
            .training
            .loss
            .is_some_and(|l| matches!(l, LossName::Mse | LossName::Mae))
        {
            TargetKind::Regression
        } else {
            TargetKind::Classes {
                names: classes.to_vec(),
            }
        }
    }

    /// The linear model a classifier of this format is measured against
    /// (`baseline.linear_accuracy`): the job with its model, optimizer and epochs replaced;
    /// `None` where the format has none.
    fn linear_baseline(&self, _job: &Job) -> Option<Job> {
        None
    }

    /// A saved model's predictions for a file of this format.
    fn predict(&self, model: &SavedModel, path: &Path) -> Result<Vec<Prediction>> {
        Err(crate::inference::format_error(
            path,
            format!(
                "predict takes tabular, image or text-classification models; this one was trained on {:?} \
                 data (use `evaluate`, or `generate` for a language model)",
                model.job().data.format
            ),
        ))
    }
}

/// `job` training `model` with `optimizer` for `epochs` instead (both given as their TOML
/// tables would be, in JSON), for the baselines.
fn retrained(job: &Job, model: serde_json::Value, optimizer: serde_json::Value, epochs: usize) -> Option<Job> {
    let mut j = job.clone();
    j.model = serde_json::from_value(model).ok()?;
    j.optimizer = serde_json::from_value(optimizer).ok()?;
    j.training.epochs = epochs;
    j.training.clip_grad_norm = None;
    Some(j)
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
fn vocab_json(vocab: &ringtrain_data::Vocab) -> serde_json::Value {
    vocab
        .to_json()
        .ok()
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default()
}
