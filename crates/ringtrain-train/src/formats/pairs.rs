//! Sequence-to-sequence pairs (`source<TAB>target` lines) for an encoder–decoder.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringtrain_autograd::ParamStore;
use ringtrain_config::{Job, TokenizerName};
use ringtrain_nn::{Loss, Module, Targets};
use ringtrain_tensor::Tensor;

use super::{vocab_json, vocab_settings, Format, ModelRole, Preprocessing};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::Result;

/// The pairs format.
pub(crate) struct Pairs;

impl Format for Pairs {
    fn role(&self) -> ModelRole {
        ModelRole::Translate
    }

    fn saved_target(&self, _job: &Job, _classes: &[String], vocab: usize) -> TargetKind {
        TargetKind::NextToken { vocab }
    }

    /// Sequence-to-sequence pairs; the vocabulary and the lengths come from the training file.
    fn task(&self, job: &Job) -> Result<Task> {
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
            role: ModelRole::Translate,
            baseline: BTreeMap::new(),
        })
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
    pub fn exact_match(&self, model: &dyn Module, store: &ParamStore, rows: &[usize]) -> Result<f64> {
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

    fn model_input(&self) -> Vec<usize> {
        vec![self.src_len, self.tgt_len]
    }

    fn sequence_accuracy(&self, model: &dyn Module, store: &ParamStore, rows: &[usize]) -> Option<Result<f64>> {
        Some(self.exact_match(model, store, rows))
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

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::TokenPairs {
            src_len: self.src_len,
            tgt_len: self.tgt_len,
            vocab: vocab_json(&self.vocab),
        })
    }
}
