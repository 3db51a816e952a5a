//! Plain-text corpora for language models: next-token windows over one token stream, the tail
//! held out for validation.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringtrain_config::{Job, TokenizerName};
use ringtrain_nn::{Loss, Targets};
use ringtrain_tensor::Tensor;

use super::{vocab_json, vocab_settings, Format, ModelRole, Preprocessing};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::{Result, TrainError};

/// The corpus format.
pub(crate) struct Corpus;

impl Format for Corpus {
    fn role(&self) -> ModelRole {
        ModelRole::LanguageModel
    }

    fn saved_target(&self, _job: &Job, _classes: &[String], vocab: usize) -> TargetKind {
        TargetKind::NextToken { vocab }
    }

    /// A running text: the tail (`evaluation.test_fraction` of it) is the validation text, the
    /// vocabulary comes from the head only.
    fn task(&self, job: &Job) -> Result<Task> {
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
        Ok(Task {
            strata: None,
            examples: Arc::new(train),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::NextToken { vocab: vocab.len() },
            loss: Loss::CrossEntropy,
            role: ModelRole::LanguageModel,
            baseline: BTreeMap::from([("unigram_perplexity".to_string(), unigram)]),
        })
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

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::Tokens {
            max_len: self.seqs.seq_len(),
            vocab: vocab_json(&self.vocab),
        })
    }
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
