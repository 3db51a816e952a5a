//! Text classification: `label<TAB>text` lines or one directory of text files per class,
//! tokenised with a vocabulary built from the training texts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ringtrain_config::{Job, TokenizerName};
use ringtrain_nn::{Loss, Targets};
use ringtrain_tensor::Tensor;

use super::{vocab_json, vocab_settings, Format, ModelRole, Preprocessing};
use crate::inference::{Prediction, SavedModel};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::Result;

/// The text format.
pub(crate) struct Text;

impl Format for Text {
    fn role(&self) -> ModelRole {
        ModelRole::Classify
    }

    fn predict(&self, model: &SavedModel, path: &Path) -> Result<Vec<Prediction>> {
        model.predict_texts(path)
    }

    /// Linear in the length-normalised bag of words: the mean of 16-wide word rows, then a
    /// linear layer, no bigrams; Adagrad, 4 epochs.
    fn linear_baseline(&self, job: &Job) -> Option<Job> {
        let model = serde_json::json!({"kind": "bow", "embedding_dim": 16, "bigram_buckets": 0, "dropout": 0.5});
        super::retrained(job, model, serde_json::json!({"kind": "adagrad", "lr": 0.1}), 4)
    }

    /// `label<TAB>text` files: the vocabulary is built from the training file only, so
    /// nothing of the test texts leaks into the model's inputs.
    fn task(&self, job: &Job) -> Result<Task> {
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
        Ok(Task {
            strata: Some(train.labels.clone()),
            examples: Arc::new(train_set),
            test_examples: test_set.map(|t| Arc::new(t) as Arc<dyn Examples>),
            target: TargetKind::Classes {
                names: train.label_names.clone(),
            },
            loss: Loss::CrossEntropy,
            role: ModelRole::Classify,
            baseline: BTreeMap::new(),
        })
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

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::Tokens {
            max_len: self.max_len,
            vocab: vocab_json(&self.vocab),
        })
    }
}
