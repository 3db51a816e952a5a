//! Using a trained model: re-evaluating it and predicting new inputs from its run directory.
//!
//! A run directory holds everything needed: `job.toml` (model and data layout),
//! `model.safetensors` (weights), and `preprocess.json` (the input normalisation fitted on the
//! training split, the input shape and the class names). Predictions repeat that normalisation
//! exactly, in the same f32 arithmetic as training, so evaluating the job's test split
//! reproduces the metrics of `summary.json` bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringtrain_autograd::{Graph, ParamStore};
use ringtrain_config::{EvalScheme, Job, ModelKind};
use ringtrain_data::{kfold, train_test_split, DataError};
use ringtrain_nn::{init_store, Module, Targets};
use ringtrain_tensor::Tensor;

use crate::engine::{EvalMetrics, Trainer};
use crate::formats::{csv_options, standardize_into, ModelRole, PreprocessFile, Preprocessing, TextSet};
use crate::sync::LocalSync;
use crate::task::{build_model_for, Batch, Examples, TargetKind, Task};
use crate::{restore_params, Result, TrainError};

/// One prediction.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// The most probable class, its name, and the probability of every class.
    Class {
        class: usize,
        name: String,
        probabilities: Vec<f32>,
    },
    /// A regression output.
    Value(f32),
}

/// Metrics of a saved model on a set of examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The data file or directory read.
    pub data: PathBuf,
    /// What was evaluated, in words: "test split", "test split of the last fold", "whole file".
    pub scope: String,
    pub metrics: EvalMetrics,
    pub class_names: Vec<String>,
}

/// A trained model loaded from a run directory.
#[derive(Debug)]
pub struct SavedModel {
    run_dir: PathBuf,
    job: Job,
    model: Box<dyn Module>,
    store: ParamStore,
    target: TargetKind,
    input: Preprocessing,
    input_shape: Vec<usize>,
    /// What the model was built for (the input shape, or a pair model's two lengths).
    model_input: Vec<usize>,
    data_path: Option<PathBuf>,
    vocab: Option<Arc<ringtrain_data::Vocab>>,
}

/// What `ringtrain generate` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub prompt: String,
    /// Softmax temperature; 0 picks the most probable token every time.
    pub temperature: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Extend a transformer LM token by token from a key/value cache while the text fits its
    /// window, instead of running the whole window for every token (the same samples).
    pub kv_cache: bool,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    })
}

pub(crate) fn format_error(path: &Path, problem: impl Into<String>) -> TrainError {
    DataError::Format {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
    .into()
}

impl SavedModel {
    /// Loads `job.toml`, `preprocess.json` and `model.safetensors` from `run_dir`.
    pub fn load(run_dir: &Path) -> Result<SavedModel> {
        if !run_dir.is_dir() {
            return Err(format_error(run_dir, "not a run directory (no such directory)"));
        }
        let job_path = run_dir.join("job.toml");
        let text = read_text(&job_path)?;
        let job_error = |e: ringtrain_config::ConfigError| TrainError::Job {
            field: "job.toml",
            reason: e.to_string(),
        };
        let mut job = Job::parse(&text, &job_path).map_err(job_error)?;
        // An edited job.toml meets the checks of a job about to train, but for its data files:
        // they may have moved (evaluation can be pointed at them).
        job.validate_settings(&text, &job_path).map_err(job_error)?;
        // `train --eval kfold:K` overrides the scheme without changing the job text; the
        // summary's folds tell what was run, and the saved model is the last fold's.
        let summary_path = run_dir.join("summary.json");
        let summary: serde_json::Value = serde_json::from_str(&read_text(&summary_path)?)
            .map_err(|e| format_error(&summary_path, format!("not JSON: {e}")))?;
        let folds = summary["folds"].as_array().map_or(0, Vec::len);
        if folds > 1 {
            job.evaluation.scheme = EvalScheme::Kfold;
            job.evaluation.folds = folds;
        } else if job.evaluation.scheme == EvalScheme::Kfold {
            job.evaluation.scheme = EvalScheme::TrainTest;
        }
        let pre_path = run_dir.join("preprocess.json");
        let pre = PreprocessFile::read(&pre_path, &read_text(&pre_path)?)?;
        let vocab = match &pre.input {
            Preprocessing::Tokens { vocab, .. } | Preprocessing::TokenPairs { vocab, .. } => Some(Arc::new(
                ringtrain_data::Vocab::from_json(&vocab.to_string())
                    .map_err(|e| format_error(&pre_path, format!("vocabulary: {e}")))?,
            )),
            _ => None,
        };
        let target = crate::formats::format(job.data.format).saved_target(
            &job,
            &pre.class_names,
            vocab.as_ref().map_or(0, |v| v.len()),
        );
        let model_input = match &pre.input {
            Preprocessing::TokenPairs { src_len, tgt_len, .. } => vec![*src_len, *tgt_len],
            _ => pre.input_shape.clone(),
        };
        let model = build_model_for(
            &job.model,
            crate::formats::format(job.data.format).role(),
            &model_input,
            target.outputs(),
            vocab.as_ref().map(|v| v.len()),
        )?;
        let mut store = init_store(model.as_ref(), job.job.seed);
        let weights = run_dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(format_error(&weights, "missing: the run did not finish"));
        }
        restore_params(&weights, &mut store).map_err(|e| format_error(&weights, e.to_string()))?;
        Ok(SavedModel {
            run_dir: run_dir.to_path_buf(),
            job,
            model,
            store,
            target,
            input: pre.input,
            input_shape: pre.input_shape,
            model_input,
            data_path: pre.data_path,
            vocab,
        })
    }

    /// Samples a continuation of `prompt` from a language model: the context is START, the
    /// prompt's tokens and what was generated so far (its last `seq_len` tokens, the window the
    /// model was trained on); sampling stops at STOP or after `max_tokens` tokens. Returns the
    /// prompt followed by the generated text.
    pub fn generate(&self, opts: &GenerateOptions) -> Result<String> {
        let (TargetKind::NextToken { vocab: v }, Some(vocab)) = (&self.target, &self.vocab) else {
            return Err(format_error(
                &self.run_dir,
                "not a language model (train a job with data.format = \"corpus\")",
            ));
        };
        let window = self.input_shape.first().copied().unwrap_or(1).max(1);
        let mut ids = vec![ringtrain_data::START];
        ids.extend(vocab.encode(&opts.prompt));
        let mut rng = ringtrain_tensor::random::rng(opts.seed);
        let mut generated = Vec::new();
        let cached = self.model.as_cached_lm().filter(|_| opts.kv_cache);
        let (mut cache, mut fed) = (Vec::new(), 0);
        for _ in 0..opts.max_tokens {
            let logits = match cached {
                // The cache holds every id so far while they fit the window. Past it the window
                // slides, every position shifts, and the whole window is computed again.
                Some(lm) if ids.len() <= window => {
                    let mut last = None;
                    for &id in &ids[fed..] {
                        last = Some(lm.next_logits(&self.store, &mut cache, id as usize)?);
                    }
                    fed = ids.len();
                    last.ok_or_else(|| format_error(&self.run_dir, "nothing to continue"))?
                }
                _ => {
                    let context = &ids[ids.len().saturating_sub(window)..];
                    let x = Tensor::from_vec(&[1, context.len()], context.iter().map(|&i| i as f32).collect())
                        .map_err(ringtrain_autograd::AutogradError::from)?;
                    let mut g = Graph::inference(&self.store);
                    let input = g.input(x);
                    let logits = self.model.forward(&mut g, input)?;
                    g.value(logits).clone()
                }
            };
            let all = logits.as_slice();
            let last = &all[all.len() - v..];
            let next = sample(last, opts.temperature, &mut rng);
            if next == ringtrain_data::STOP {
                break;
            }
            ids.push(next);
            generated.push(next);
        }
        let sep = match vocab.tokenizer() {
            ringtrain_data::Tokenizer::Char => "",
            ringtrain_data::Tokenizer::Word { .. } => " ",
        };
        let continuation = vocab.decode(&generated);
        Ok(if opts.prompt.is_empty() || continuation.is_empty() {
            format!("{}{continuation}", opts.prompt)
        } else {
            format!("{}{sep}{continuation}", opts.prompt)
        })
    }

    /// Class names, in the order of the model's outputs (empty for regression).
    /// What the model does, as its data format says.
    fn role(&self) -> ModelRole {
        crate::formats::format(self.job.data.format).role()
    }

    pub fn class_names(&self) -> Vec<String> {
        self.target.class_names()
    }

    /// The job the model was trained with.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Loss and metrics on the job's test split (recomputed with the job's seed; for k-fold
    /// runs, the last fold, whose model is the one saved), or on every example of `data`.
    pub fn evaluate(&self, data: Option<&Path>) -> Result<Evaluation> {
        let mut job = self.job.clone();
        job.data.path = match data {
            Some(d) => d.to_path_buf(),
            None => self.training_data()?,
        };
        let mut task = Task::from_job(&job)?;
        if task.input_shape() != self.input_shape {
            return Err(format_error(
                &job.data.path,
                format!(
                    "examples have shape {:?}, the model was trained on {:?}",
                    task.input_shape(),
                    self.input_shape
                ),
            ));
        }
        let class_map = self.class_map(&task.target, &job.data.path)?;
        task.target = self.target.clone();
        let (examples, rows, scope) = match (data, &task.test_examples) {
            // An IDX directory: its provided test split is the held-out data.
            (_, Some(test)) => (
                test.clone(),
                (0..test.len()).collect(),
                "provided test split".to_string(),
            ),
            (Some(_), None) => (
                task.examples.clone(),
                (0..task.examples.len()).collect(),
                "whole file".to_string(),
            ),
            (None, None) => {
                let n = task.examples.len();
                let strata = job.evaluation.stratify.then_some(task.strata.as_deref()).flatten();
                match job.evaluation.scheme {
                    EvalScheme::Kfold => {
                        let last = kfold(n, job.evaluation.folds, job.job.seed, strata)?.pop();
                        let test = last.map(|s| s.test).unwrap_or_default();
                        (task.examples.clone(), test, "test split of the last fold".to_string())
                    }
                    _ => {
                        let s = train_test_split(n, job.evaluation.test_fraction, job.job.seed, strata)?;
                        (task.examples.clone(), s.test, "test split".to_string())
                    }
                }
            }
        };
        let prepared = Prepared {
            inner: examples,
            input: self.input.clone(),
            class_map,
        };
        let model = build_model_for(
            &job.model,
            task.role,
            &self.model_input,
            self.target.outputs(),
            self.vocab.as_ref().map(|v| v.len()),
        )?;
        let mut trainer = Trainer::new(&job, model, task.loss, rows.len());
        trainer.store = self.store.clone();
        let metrics = trainer.evaluate(&task, &prepared, &rows, &mut LocalSync)?;
        Ok(Evaluation {
            data: job.data.path,
            scope,
            metrics,
            class_names: self.class_names(),
        })
    }

    /// Where the training data is: as recorded in `preprocess.json`, else the job's path
    /// resolved against the run directory.
    fn training_data(&self) -> Result<PathBuf> {
        let candidates = [self.data_path.clone(), Some(self.run_dir.join(&self.job.data.path))];
        candidates.into_iter().flatten().find(|p| p.exists()).ok_or_else(|| {
            format_error(
                &self.job.data.path,
                "the job's data is not where the run found it; pass it with --data",
            )
        })
    }

    /// For every class id of `data`'s labels, the model's class id (`None` when they agree).
    fn class_map(&self, data_target: &TargetKind, path: &Path) -> Result<Option<Vec<usize>>> {
        let (TargetKind::Classes { names: data }, TargetKind::Classes { names: model }) = (data_target, &self.target)
        else {
            return Ok(None);
        };
        if data == model {
            return Ok(None);
        }
        data.iter()
            .map(|name| {
                model.iter().position(|m| m == name).ok_or_else(|| {
                    format_error(
                        path,
                        format!("class {name:?} is not one the model knows ({})", model.join(", ")),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Predictions for every row of a delimited file laid out like the training data: the
    /// feature columns, with or without the label column, with a header line when the job's
    /// data has one.
    pub fn predict_csv(&self, path: &Path) -> Result<Vec<Prediction>> {
        let Preprocessing::Features {
            feature_mean,
            feature_inv_std,
        } = &self.input
        else {
            return Err(format_error(path, "this model takes images: give an IDX image file"));
        };
        let d = self.input_shape.iter().product::<usize>();
        let rows = ringtrain_data::read_feature_rows(path, &csv_options(&self.job)?, d)?;
        let mut x = Vec::with_capacity(rows.len() * d);
        for row in &rows {
            standardize_into(&mut x, row, feature_mean, feature_inv_std);
        }
        self.predict_tensor(Tensor::from_vec(&[rows.len(), d], x).map_err(ringtrain_autograd::AutogradError::from)?)
    }

    /// Predictions for every image of an IDX image file (`idx3`, u8, plain or gzip).
    pub fn predict_idx(&self, path: &Path) -> Result<Vec<Prediction>> {
        let Preprocessing::Pixels { pixel_scale, mean, std } = self.input else {
            return Err(format_error(path, "this model takes feature rows: give a CSV file"));
        };
        let images = ringtrain_data::read_idx_images(path)?;
        let want = &self.input_shape[1..];
        if [images.rows, images.cols] != want {
            return Err(format_error(
                path,
                format!("images are {}x{}, the model takes {want:?}", images.rows, images.cols),
            ));
        }
        // Division by 255 (not multiplication by 1/255), as training computed it.
        let divisor = (1.0 / pixel_scale) as f32;
        let x: Vec<f32> = images
            .pixels
            .iter()
            .map(|&p| (f32::from(p) / divisor - mean) / std)
            .collect();
        let x = Tensor::from_vec(&[images.n, 1, images.rows, images.cols], x)
            .map_err(ringtrain_autograd::AutogradError::from)?;
        self.predict_tensor(x)
    }

    /// What each head of a transformer text classifier attends to for one text: the tokens
    /// and, per layer, the attention probabilities `[heads, T, T]` (row = query token).
    pub fn attention_maps(&self, text: &str) -> Result<(Vec<String>, Vec<Tensor>)> {
        let vocab = self
            .vocab
            .as_ref()
            .filter(|_| self.role() == ModelRole::Classify && self.job.model.kind == ModelKind::Transformer)
            .ok_or_else(|| format_error(&self.run_dir, "not a transformer text classifier"))?;
        let max_len = self.input_shape.first().copied().unwrap_or(1).max(1);
        let mut ids = vocab.encode(text);
        ids.truncate(max_len);
        if ids.is_empty() {
            return Err(format_error(&self.run_dir, "the text has no tokens"));
        }
        let tokens = ids
            .iter()
            .map(|&i| vocab.token(i).unwrap_or("<unk>").to_string())
            .collect();
        let cfg = crate::task::transformer_config(&self.job.model, vocab.len(), max_len);
        let model = ringtrain_nn::TransformerClassifier::new(cfg, self.target.outputs());
        let x = Tensor::from_vec(&[1, ids.len()], ids.iter().map(|&i| i as f32).collect())
            .map_err(ringtrain_autograd::AutogradError::from)?;
        let maps = model.attention_maps(&self.store, &x)?;
        // One example: drop the batch axis.
        let maps = maps
            .into_iter()
            .map(|m| {
                let shape = m.shape()[1..].to_vec();
                m.reshape(&shape)
                    .map_err(|e| ringtrain_autograd::AutogradError::from(e).into())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((tokens, maps))
    }

    /// Predictions for a text classifier: one text per non-empty line (a `label<TAB>` prefix,
    /// as in the training file, is dropped), tokenised with the saved vocabulary and cut to the
    /// trained length.
    pub fn predict_texts(&self, path: &Path) -> Result<Vec<Prediction>> {
        let Some(vocab) = self.vocab.as_ref().filter(|_| self.role() == ModelRole::Classify) else {
            return Err(format_error(path, "this model does not classify texts"));
        };
        let max_len = self.input_shape.first().copied().unwrap_or(1).max(1);
        let text = ringtrain_data::read_text(path)?;
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_once('\t').map_or(l, |(_, t)| t))
            .collect();
        if lines.is_empty() {
            return Err(format_error(path, "no text lines"));
        }
        let n = lines.len();
        // The same encoding and padding as training; the labels are placeholders.
        let set = TextSet::new(lines.into_iter(), vec![0; n], vocab.clone(), max_len);
        self.predict_tensor(set.batch(&(0..n).collect::<Vec<_>>())?.x)
    }

    /// Predicts a file of the job's data format: CSV for tabular jobs, IDX images for image
    /// jobs, text lines for text classifiers.
    pub fn predict_file(&self, path: &Path) -> Result<Vec<Prediction>> {
        crate::formats::format(self.job.data.format).predict(self, path)
    }

    fn predict_tensor(&self, x: Tensor) -> Result<Vec<Prediction>> {
        let n = x.shape().first().copied().unwrap_or(0);
        let per_example: usize = x.shape()[1..].iter().product();
        let names = self.class_names();
        let mut out = Vec::with_capacity(n);
        // Batches bound the memory of image models; a tabular file is usually one batch.
        for start in (0..n).step_by(256) {
            let end = (start + 256).min(n);
            let mut shape = x.shape().to_vec();
            shape[0] = end - start;
            let chunk = Tensor::from_vec(&shape, x.as_slice()[start * per_example..end * per_example].to_vec())
                .map_err(ringtrain_autograd::AutogradError::from)?;
            let mut g = Graph::inference(&self.store);
            let input = g.input(chunk);
            let logits = self.model.forward(&mut g, input)?;
            let logits = g.value(logits);
            match &self.target {
                TargetKind::Regression => out.extend(logits.as_slice().iter().map(|&v| Prediction::Value(v))),
                TargetKind::Binary { .. } => out.extend(logits.as_slice().iter().map(|&z| {
                    let p = 1.0 / (1.0 + (-z).exp());
                    let class = usize::from(z > 0.0);
                    Prediction::Class {
                        class,
                        name: names[class].clone(),
                        probabilities: vec![1.0 - p, p],
                    }
                })),
                TargetKind::Classes { .. } | TargetKind::NextToken { .. } => {
                    let probs = logits.softmax(1).map_err(ringtrain_autograd::AutogradError::from)?;
                    let classes = logits.argmax_rows().map_err(ringtrain_autograd::AutogradError::from)?;
                    for (row, class) in probs.as_slice().chunks(names.len().max(1)).zip(classes) {
                        out.push(Prediction::Class {
                            class,
                            name: names.get(class).cloned().unwrap_or_else(|| class.to_string()),
                            probabilities: row.to_vec(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Draws a token id from `softmax(logits / temperature)`; temperature 0 (or below) is the
/// arg-max. PAD and UNK are never drawn: they carry no text.
fn sample(logits: &[f32], temperature: f32, rng: &mut ringtrain_tensor::random::Rng) -> u32 {
    let allowed = |i: usize| i as u32 != ringtrain_data::PAD && i as u32 != ringtrain_data::UNK;
    let best = (0..logits.len())
        .filter(|&i| allowed(i))
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap_or(0);
    if temperature <= 0.0 {
        return best as u32;
    }
    let weights: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| {
            if allowed(i) {
                (f64::from(z - logits[best]) / f64::from(temperature)).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let draw = ringtrain_tensor::random::uniform(&[1], 0.0, 1.0, rng);
    let mut u = f64::from(draw.as_slice()[0]) * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    best as u32
}

/// The examples of a dataset with the saved normalisation applied and class ids mapped onto
/// the model's.
#[derive(Debug)]
struct Prepared {
    inner: Arc<dyn Examples>,
    input: Preprocessing,
    class_map: Option<Vec<usize>>,
}

impl Examples for Prepared {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        self.inner.input_shape()
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        // Task::from_job builds tabular examples with the identity normalisation (mean 0,
        // scale 1), so `x` holds the raw values and the saved statistics apply as in training.
        let mut batch = self.inner.batch(indices)?;
        if let Preprocessing::Features {
            feature_mean,
            feature_inv_std,
        } = &self.input
        {
            let d = feature_mean.len().max(1);
            let mut x = Vec::with_capacity(batch.x.len());
            for row in batch.x.as_slice().chunks(d) {
                standardize_into(&mut x, row, feature_mean, feature_inv_std);
            }
            batch.x = Tensor::from_vec(batch.x.shape(), x).map_err(ringtrain_autograd::AutogradError::from)?;
        }
        if let (Some(map), Targets::Classes(ids)) = (&self.class_map, &mut batch.targets) {
            for id in ids.iter_mut() {
                *id = map[*id];
            }
        }
        Ok(batch)
    }
}
