//! A whole run: splits, folds, the summary and the run directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ringtrain_config::{EarlyStopping, EvalScheme, Job, StopMetric};
use ringtrain_data::{holdout, kfold, summarize_folds, train_test_split};
use serde::Serialize;

use crate::checkpoint::save_safetensors;
use crate::engine::{EpochCursor, EpochReport, EvalMetrics, Progress, Trainer};
use crate::formats::{PreprocessFile, PREPROCESS_VERSION};
use crate::sync::{GradSync, LocalSync};
use crate::task::{Examples, TargetKind, Task};
use crate::{write_atomic, Result, TrainError};

/// Result of one model trained and tested (the whole run, or one fold).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FoldReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    pub train_examples: usize,
    pub test_examples: usize,
    pub train_loss: f64,
    pub test: EvalMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<StopReport>,
}

/// How early stopping ended a split's training.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct StopReport {
    /// The validation metric watched (`val_loss`, `val_accuracy`).
    pub metric: String,
    /// The epoch whose weights were kept, and its value of the metric.
    pub best_epoch: usize,
    pub best_value: f64,
    pub epochs_trained: usize,
    /// `"patience"`: no improvement for `patience` epochs; `"epochs"`: all epochs ran.
    pub stopped_by: String,
    /// The model was then trained again on the whole training split for `best_epoch`
    /// epochs (`training.early_stopping.refit`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refit: bool,
}

/// Early stopping's watch over one split: the best epoch so far and its weights.
struct Watch<'a> {
    cfg: &'a EarlyStopping,
    best: Option<(usize, f64)>,
    best_params: Vec<f32>,
    stale: usize,
}

impl<'a> Watch<'a> {
    fn new(cfg: &'a EarlyStopping) -> Watch<'a> {
        Watch {
            cfg,
            best: None,
            best_params: Vec::new(),
            stale: 0,
        }
    }

    fn name(&self) -> &'static str {
        match self.cfg.metric {
            StopMetric::ValLoss => "val_loss",
            StopMetric::ValAccuracy => "val_accuracy",
        }
    }

    /// Takes `epoch`'s validation result; true when training should stop. Every rank sees the
    /// same all-reduced metrics, so every rank decides the same.
    fn update(&mut self, epoch: usize, val: &EvalMetrics, params: &[f32]) -> Result<bool> {
        let (value, higher_is_better) = match self.cfg.metric {
            StopMetric::ValLoss => (val.loss, false),
            StopMetric::ValAccuracy => (
                val.accuracy.ok_or(TrainError::Job {
                    field: "training.early_stopping.metric",
                    reason: "val_accuracy needs a classifier; watch val_loss".into(),
                })?,
                true,
            ),
        };
        let d = self.cfg.min_delta;
        let improved = match self.best {
            None => value.is_finite(),
            Some((_, b)) if higher_is_better => value > b + d,
            Some((_, b)) => value < b - d,
        };
        if improved {
            self.best = Some((epoch, value));
            self.best_params.clear();
            self.best_params.extend_from_slice(params);
            self.stale = 0;
        } else {
            self.stale += 1;
        }
        Ok(self.stale >= self.cfg.patience)
    }
}

/// `train` less a validation part of `fraction`: the ordered tail when `ordered`, else a
/// seeded (stratified) draw. Returns (the rows to train on, the validation rows).
fn carve_validation(
    train: Vec<usize>,
    fraction: Option<f64>,
    seed: u64,
    ordered: bool,
    strata: Option<&[usize]>,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let Some(f) = fraction else {
        return Ok((train, Vec::new()));
    };
    let n_val = ((train.len() as f64) * f).round() as usize;
    if n_val == 0 || n_val >= train.len() {
        return Err(TrainError::Job {
            field: "evaluation.validation_fraction",
            reason: format!(
                "{f} of {} training examples leaves no validation or no training part",
                train.len()
            ),
        });
    }
    if ordered {
        let mut fit = train;
        let val = fit.split_off(fit.len() - n_val);
        return Ok((fit, val));
    }
    let s = holdout(&train, f, seed ^ 0x7661_6c69_6461_7465, strata)?;
    Ok((s.train, s.test))
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RunSummary {
    pub job: String,
    pub seed: u64,
    pub epochs: usize,
    pub parameters: usize,
    pub class_names: Vec<String>,
    /// The final metrics of a train/test run (absent for k-fold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Regression: in the data's units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_rmse: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_perplexity: Option<f64>,
    /// Pairs: fraction of test examples whose greedy decoding equals the target exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_sequence_accuracy: Option<f64>,
    /// Scores of trivial predictors on the same test split, for comparison.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baseline: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion_matrix: Option<Vec<Vec<u64>>>,
    /// A train/test run with early stopping: the epoch kept and why training stopped (each
    /// fold's is in `folds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<StopReport>,
    pub folds: Vec<FoldReport>,
    /// Per metric: mean, sample standard deviation and per-fold values (k-fold only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kfold: BTreeMap<String, FoldStat>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FoldStat {
    pub mean: f64,
    pub std: f64,
    pub values: Vec<f64>,
}

/// Per test metric of `folds`: mean, sample standard deviation and per-fold values (the
/// `kfold` of `summary.json`, for sequential and parallel k-fold alike).
pub fn kfold_summary(folds: &[FoldReport]) -> Result<BTreeMap<String, FoldStat>> {
    let per_fold: Vec<BTreeMap<String, f64>> = folds.iter().map(|f| f.test.scalars()).collect();
    Ok(summarize_folds(&per_fold)?
        .into_iter()
        .map(|(k, s)| {
            let stat = FoldStat {
                mean: s.mean,
                std: s.std,
                values: s.values,
            };
            (k, stat)
        })
        .collect())
}

/// Where a run writes and how it checkpoints and resumes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// Run directory for metrics, summary, weights and checkpoints (only one rank gets one).
    pub out: Option<&'a Path>,
    /// Save `checkpoint.safetensors` in `out` every this many epochs (and after the last).
    pub checkpoint_every: Option<usize>,
    /// Continue from this checkpoint (every rank reads it).
    pub resume_from: Option<&'a Path>,
    /// k-fold only: train just these folds (one group of a parallel k-fold run), with the
    /// same splits and seeds as when every fold runs; the summary then covers these folds.
    pub folds: Option<&'a [usize]>,
    /// Leave out the classification baselines (a baseline's own run; parallel k-fold, whose
    /// groups each see only some folds, leaves them out too).
    pub skip_baselines: bool,
}

/// The class of every example when the job stratifies its splits.
fn stratified<'a>(job: &Job, task: &'a Task) -> Option<&'a [usize]> {
    task.strata.as_deref().filter(|_| job.evaluation.stratify)
}

/// One planned training: fold, training rows, test rows, and whether the test rows are of the
/// dataset's provided test split.
type Planned = (Option<usize>, Vec<usize>, Vec<usize>, bool);

/// The splits the job's evaluation scheme makes of `task`, restricted to `only` (one group of
/// a parallel k-fold).
fn plan_splits(job: &Job, task: &Task, only: Option<&[usize]>) -> Result<Vec<Planned>> {
    let n = task.examples.len();
    let strata = stratified(job, task);
    let splits: Vec<Planned> = match job.evaluation.scheme {
        EvalScheme::TrainTest => {
            let s = train_test_split(n, job.evaluation.test_fraction, job.job.seed, strata)?;
            vec![(None, s.train, s.test, false)]
        }
        EvalScheme::Kfold => kfold(n, job.evaluation.folds, job.job.seed, strata)?
            .into_iter()
            .enumerate()
            .map(|(i, s)| (Some(i), s.train, s.test, false))
            .collect(),
        // Ordered data: a task that cuts its own tail (series, corpus) brings it as the test
        // split; otherwise the rows' own order is cut.
        EvalScheme::TimeSeries => match &task.test_examples {
            Some(test) => vec![(None, (0..n).collect(), (0..test.len()).collect(), true)],
            None => {
                let cut = n - ((n as f64) * job.evaluation.test_fraction).round() as usize;
                vec![(None, (0..cut).collect(), (cut..n).collect(), false)]
            }
        },
        EvalScheme::Provided => {
            let test = task.test_examples.as_ref().ok_or(TrainError::Job {
                field: "evaluation.scheme",
                reason: "this dataset has no provided test split".into(),
            })?;
            vec![(None, (0..n).collect(), (0..test.len()).collect(), true)]
        }
    };
    // The filter runs after the split so that fold k is the same examples whatever it keeps.
    Ok(match only {
        None => splits,
        Some(only) => {
            if job.evaluation.scheme != EvalScheme::Kfold || only.iter().any(|&f| f >= splits.len()) {
                return Err(TrainError::Job {
                    field: "evaluation.parallel_folds",
                    reason: format!(
                        "folds {only:?} were asked for, but this job has {} k-fold splits",
                        if job.evaluation.scheme == EvalScheme::Kfold {
                            splits.len()
                        } else {
                            0
                        }
                    ),
                });
            }
            splits
                .into_iter()
                .filter(|(fold, ..)| fold.is_some_and(|f| only.contains(&f)))
                .collect()
        }
    })
}

/// The run directory's files at the end of a run: metrics, summary, weights, what a
/// prediction must repeat, and the plots.
fn write_run_dir(
    dir: &Path,
    job: &Job,
    task: &Task,
    trainer: &Trainer,
    examples: &dyn Examples,
    metrics_lines: &str,
    summary: &RunSummary,
) -> Result<()> {
    write_atomic(&dir.join("metrics.jsonl"), metrics_lines.as_bytes())?;
    let json = serde_json::to_string_pretty(summary).map_err(|e| TrainError::io("summary.json", e))?;
    write_atomic(&dir.join("summary.json"), json.as_bytes())?;
    let tensors: Vec<_> = trainer.store.named_tensors().map(|(n, t)| (n.to_string(), t)).collect();
    // One metadata key only: safetensors writes the map in hash order, and a second key
    // would make identical runs produce different bytes.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join("model.safetensors"), &tensors, meta)?;
    let input = examples.preprocess().ok_or_else(|| TrainError::Job {
        field: "data.format",
        reason: "its examples record no preprocessing".into(),
    })?;
    let pre = PreprocessFile {
        version: PREPROCESS_VERSION,
        input,
        input_shape: examples.input_shape(),
        class_names: task.target.class_names(),
        // Where the data was, so `ringtrain evaluate RUN_DIR` finds the test split again.
        data_path: Some(std::path::absolute(&job.data.path).unwrap_or_else(|_| job.data.path.clone())),
    };
    let pre = serde_json::to_string(&pre).map_err(|e| TrainError::io("preprocess.json", e))?;
    write_atomic(&dir.join("preprocess.json"), pre.as_bytes())?;
    crate::plots::write_plots(dir, metrics_lines, summary)?;
    Ok(())
}

/// An epoch's training loss, training accuracy and gradient norm.
type EpochTotals = (f64, Option<f64>, Option<f64>);

/// One split trained and tested.
struct FoldDone {
    report: FoldReport,
    trainer: Trainer,
    /// The examples as fitted on its training rows.
    examples: Arc<dyn Examples>,
    test_rows: Vec<usize>,
}

/// Trains and tests one split (the whole run, or one fold): a fresh model, the checkpoint to
/// resume from, the epochs with their reports (appended to `metrics_lines`, written and
/// checkpointed by the writing rank), and the test at the end.
#[allow(clippy::too_many_arguments, reason = "one split's whole context, passed once")]
fn train_fold(
    job: &Job,
    task: &Task,
    opts: &RunOptions<'_>,
    (fold, train, test_rows, provided): Planned,
    (last_fold, refit): (bool, bool),
    metrics_lines: &mut String,
    sync: &mut dyn GradSync,
    observe: &mut dyn FnMut(Progress),
) -> Result<FoldDone> {
    let out = opts.out;
    let ordered = job.evaluation.scheme == EvalScheme::TimeSeries
        || matches!(
            task.role,
            crate::formats::ModelRole::LanguageModel | crate::formats::ModelRole::Forecast
        );
    let strata = stratified(job, task);
    let (train, val_rows) = carve_validation(train, job.evaluation.validation_fraction, job.job.seed, ordered, strata)?;
    let mut watch = job.training.early_stopping.as_ref().map(Watch::new);
    // The last epoch to train: the job's, or the one early stopping ends with.
    let mut end = job.training.epochs;
    let examples = match job.data.standardize.then(|| task.examples.fitted_on(&train)).flatten() {
        Some(fitted) => fitted,
        None => task.examples.clone(),
    };
    let test_set: Arc<dyn Examples> = match (&task.test_examples, provided) {
        (Some(t), true) => examples
            .preprocess()
            .and_then(|fitted| t.normalised_with(&fitted))
            .unwrap_or_else(|| t.clone()),
        _ => examples.clone(),
    };
    let model = task.model(&job.model)?;
    if job.training.tbptt && !model.carries_state() {
        return Err(TrainError::Job {
            field: "training.tbptt",
            reason: "truncated BPTT needs a recurrent language model (data.format = \"corpus\", model.kind = \"rnn\", \"gru\" or \"lstm\")".into(),
        });
    }
    let mut trainer = Trainer::new(job, model, task.loss, train.len());
    trainer.elastic = sync.elastic();
    let joining = sync.joining();
    let mut train_loss = f64::NAN;
    let mut first_epoch = 1;
    if !trainer.elastic {
        sync.broadcast_params(trainer.store.flat_mut())
            .map_err(|source| TrainError::Sync { step: 0, source })?;
    }
    if !joining {
        if let Some(ckpt) = opts.resume_from {
            let done = trainer.load_checkpoint(ckpt)?;
            first_epoch = done + 1;
            if let Some(dir) = out {
                // Keep the metrics of the epochs before the checkpoint.
                let old = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
                for line in old.lines().take(done) {
                    metrics_lines.push_str(line);
                    metrics_lines.push('\n');
                    // A checkpoint of the last epoch leaves nothing to train: the summary's
                    // train loss is then the last recorded one.
                    if let Ok(r) = serde_json::from_str::<EpochReport>(line) {
                        train_loss = r.train_loss;
                    }
                }
            }
        }
    }
    let mut cursor = EpochCursor::at(first_epoch);
    if trainer.elastic {
        // The first collective of an elastic job is the levelling every re-formed ring
        // does, so a worker that joins (or is lost) while the others start is met the same
        // way as later. The seeded start is the same bits on every rank.
        trainer.has_state = !joining;
        trainer.rejoin_until_level(&mut cursor, sync, observe, false)?;
        if let Some(dir) = out.filter(|_| joining) {
            // The lines of the epochs before this worker joined, should it become the
            // writer (the run directory of an elastic job is shared).
            let old = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
            for line in old.lines() {
                if serde_json::from_str::<EpochReport>(line).is_ok_and(|r| r.epoch < cursor.epoch) {
                    metrics_lines.push_str(line);
                    metrics_lines.push('\n');
                }
            }
        }
    }
    // Epochs whose report went out: after stepping back over an epoch's end, it is
    // evaluated again but reported once.
    let mut reported = cursor.epoch - 1;
    let mut started = Instant::now();
    let test = loop {
        if cursor.group == 0 {
            started = Instant::now();
        }
        let epoch = cursor.epoch;
        let attempt = (|| -> Result<(EpochTotals, EvalMetrics, Option<EvalMetrics>)> {
            if epoch > end {
                if let Some(best) = watch.as_ref().map(|w| &w.best_params).filter(|p| !p.is_empty()) {
                    trainer.store.flat_mut().copy_from_slice(best);
                }
                let test = trainer.evaluate(task, test_set.as_ref(), &test_rows, sync)?;
                if last_fold {
                    sync.finish(trainer.store.flat()).map_err(|source| TrainError::Sync {
                        step: trainer.step,
                        source,
                    })?;
                }
                return Ok(((f64::NAN, None, None), test, None));
            }
            trainer.train_from(task, examples.as_ref(), &train, &mut cursor, sync, observe)?;
            let totals = trainer.epoch_totals(task, &cursor, sync)?;
            let test = trainer.evaluate(task, test_set.as_ref(), &test_rows, sync)?;
            let val = if val_rows.is_empty() {
                None
            } else {
                Some(trainer.evaluate(task, examples.as_ref(), &val_rows, sync)?)
            };
            Ok((totals, test, val))
        })();
        let ((loss, acc, grad_norm), test, val) = match attempt {
            Ok(done) => done,
            Err(e @ TrainError::Sync { .. }) => {
                let step = trainer.step;
                if sync.reform().map_err(|source| TrainError::Sync { step, source })? {
                    trainer.rejoin_until_level(&mut cursor, sync, observe, true)?;
                    continue;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if epoch > end {
            break test;
        }
        let secs = started.elapsed().as_secs_f64();
        train_loss = loss;
        if epoch > reported {
            reported = epoch;
            let report = EpochReport {
                fold,
                epoch,
                lr: f64::from(trainer.schedule.lr_at(trainer.step - cursor.group as u64)),
                train_loss: loss,
                train_accuracy: acc,
                test_loss: test.loss,
                test_accuracy: test.accuracy,
                test_rmse: test.rmse,
                test_perplexity: test.perplexity,
                val_loss: val.as_ref().map(|v| v.loss),
                val_accuracy: val.as_ref().and_then(|v| v.accuracy),
                examples_per_sec: train.len() as f64 / secs.max(1e-9),
                refit,
                grad_norm,
                ring_changes: std::mem::take(&mut trainer.ring_changes),
            };
            metrics_lines.push_str(&serde_json::to_string(&report).map_err(|e| TrainError::io("metrics.jsonl", e))?);
            metrics_lines.push('\n');
            observe(Progress::Epoch(report));
            if let (Some(w), Some(v)) = (watch.as_mut(), &val) {
                if w.update(epoch, v, trainer.store.flat())? {
                    end = epoch;
                }
            }
            if let Some(dir) = out.filter(|_| sync.writes()) {
                write_atomic(&dir.join("metrics.jsonl"), metrics_lines.as_bytes())?;
                let due = opts
                    .checkpoint_every
                    .is_some_and(|k| epoch.is_multiple_of(k.max(1)) || epoch == job.training.epochs);
                if due && fold.is_none() {
                    trainer.save_checkpoint(&dir.join("checkpoint.safetensors"), epoch, sync.world())?;
                    observe(Progress::Checkpoint { epoch });
                }
            }
        }
        if trainer.elastic {
            trainer.ended_epoch = Some(cursor.clone());
        }
        cursor = EpochCursor::at(epoch + 1);
    };
    let early_stopping = watch.and_then(|w| {
        let (best_epoch, best_value) = w.best?;
        Some(StopReport {
            metric: w.name().to_string(),
            best_epoch,
            best_value,
            epochs_trained: end,
            stopped_by: if end < job.training.epochs {
                "patience"
            } else {
                "epochs"
            }
            .to_string(),
            refit: false,
        })
    });
    let report = FoldReport {
        fold,
        train_examples: train.len(),
        test_examples: test_rows.len(),
        train_loss,
        test,
        early_stopping,
    };
    Ok(FoldDone {
        report,
        trainer,
        examples,
        test_rows,
    })
}

/// Trains the job single-process: a train/test run or k-fold cross-validation. When `out` is
/// given, writes `metrics.jsonl`, `summary.json`, `model.safetensors`, `preprocess.json`
/// and a copy of the job there.
pub fn run_job(job: &Job, job_text: &str, out: Option<&Path>, observe: &mut dyn FnMut(Progress)) -> Result<RunSummary> {
    run_job_with(job, job_text, out, &mut LocalSync, observe)
}

/// [`run_job`] on one rank of a data-parallel group: `sync` connects the ranks. Every rank
/// runs this with the same job; only the rank given an `out` directory writes files.
pub fn run_job_with(
    job: &Job,
    job_text: &str,
    out: Option<&Path>,
    sync: &mut dyn GradSync,
    observe: &mut dyn FnMut(Progress),
) -> Result<RunSummary> {
    run_job_opts(
        job,
        job_text,
        &RunOptions {
            out,
            ..RunOptions::default()
        },
        sync,
        observe,
    )
}

/// [`run_job_with`] with checkpointing and resumption.
pub fn run_job_opts(
    job: &Job,
    job_text: &str,
    opts: &RunOptions<'_>,
    sync: &mut dyn GradSync,
    observe: &mut dyn FnMut(Progress),
) -> Result<RunSummary> {
    run_task(job, &Task::from_job(job)?, job_text, opts, sync, observe)
}

/// [`run_job_opts`] on `task`, the job's data as read already.
fn run_task(
    job: &Job,
    task: &Task,
    job_text: &str,
    opts: &RunOptions<'_>,
    sync: &mut dyn GradSync,
    observe: &mut dyn FnMut(Progress),
) -> Result<RunSummary> {
    let out = opts.out;
    let splits = plan_splits(job, task, opts.folds)?;
    if let Some(dir) = out.filter(|_| sync.writes()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, format!("cannot create run directory: {e}")))?;
        write_atomic(&dir.join("job.toml"), job_text.as_bytes())?;
    }
    let mut metrics_lines = String::new();
    if opts.resume_from.is_some() && job.training.early_stopping.is_some() {
        return Err(TrainError::Job {
            field: "training.early_stopping",
            reason:
                "a run with early stopping cannot resume from a checkpoint (the best epoch's weights are not in it)"
                    .into(),
        });
    }
    if opts.resume_from.is_some() && splits.len() > 1 {
        return Err(TrainError::Job {
            field: "evaluation.scheme",
            reason: "resuming is supported for train_test and provided splits, not k-fold".into(),
        });
    }
    let mut folds = Vec::new();
    // The parameters every rank must end with the same bits of are the last fold's.
    let last_fold_index = splits.last().map(|(fold, ..)| *fold);
    let mut last: Option<(Trainer, Arc<dyn Examples>)> = None;
    let mut last_test_rows = Vec::new();
    for (fold, train, test_rows, provided) in splits {
        let last_fold = last_fold_index == Some(fold);
        let refit = job.training.early_stopping.as_ref().is_some_and(|e| e.refit);
        let planned = (fold, train, test_rows, provided);
        let again = refit.then(|| planned.clone());
        let lines = &mut metrics_lines;
        let mut done = train_fold(
            job,
            task,
            opts,
            planned,
            (last_fold && !refit, false),
            lines,
            sync,
            observe,
        )?;
        if let Some(planned) = again {
            // Every rank has the same best epoch (from all-reduced metrics).
            let stop = done.report.early_stopping.take().ok_or(TrainError::Job {
                field: "training.early_stopping.refit",
                reason: "no epoch had a finite validation metric to refit for".into(),
            })?;
            let mut whole = job.clone();
            whole.training.epochs = stop.best_epoch;
            whole.training.early_stopping = None;
            whole.evaluation.validation_fraction = None;
            done = train_fold(&whole, task, opts, planned, (last_fold, true), lines, sync, observe)?;
            done.report.early_stopping = Some(StopReport { refit: true, ..stop });
        }
        folds.push(done.report);
        last = Some((done.trainer, done.examples));
        last_test_rows = done.test_rows;
    }
    let (trainer, examples) = last.ok_or(TrainError::Job {
        field: "evaluation",
        reason: "no split to train on".into(),
    })?;
    let kfold_stats = if folds.len() > 1 {
        kfold_summary(&folds)?
    } else {
        BTreeMap::new()
    };
    // Encoder–decoder: what matters is the whole decoded sequence, not teacher-forced tokens.
    let sequence_accuracy = if folds.len() == 1 {
        let (set, rows) = match &task.test_examples {
            Some(test) if job.evaluation.scheme == EvalScheme::Provided => (test, (0..test.len()).collect()),
            _ => (&task.examples, last_test_rows),
        };
        set.sequence_accuracy(trainer.model(), &trainer.store, &rows)
            .transpose()?
    } else {
        None
    };
    let single = (folds.len() == 1).then(|| &folds[0].test);
    let mut summary = RunSummary {
        job: job.job.name.clone(),
        seed: job.job.seed,
        epochs: job.training.epochs,
        parameters: trainer.store.num_elements(),
        class_names: task.target.class_names(),
        test_accuracy: single.and_then(|t| t.accuracy),
        test_loss: single.map(|t| t.loss),
        test_rmse: single.and_then(|t| t.rmse),
        test_perplexity: single.and_then(|t| t.perplexity),
        test_sequence_accuracy: sequence_accuracy,
        baseline: task.baseline.clone(),
        confusion_matrix: single.and_then(|t| t.confusion_matrix.clone()),
        early_stopping: folds
            .first()
            .filter(|_| folds.len() == 1)
            .and_then(|f| f.early_stopping.clone()),
        folds,
        kfold: kfold_stats,
    };
    if sync.writes() && !opts.skip_baselines && opts.folds.is_none() {
        summary.baseline.extend(baselines_of(job, task, &summary.folds)?);
    }
    if let Some(dir) = out.filter(|_| sync.writes()) {
        write_run_dir(dir, job, task, &trainer, examples.as_ref(), &metrics_lines, &summary)?;
    }
    Ok(summary)
}

/// The most frequent class among `rows` (the smallest id of a tie).
fn majority_class(classes: &[usize], rows: &[usize]) -> usize {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &r in rows {
        *counts.entry(classes[r]).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(c, _)| c)
}

/// What a classifier is measured against, on the splits of its run (`folds`, averaged over
/// k folds): `majority_accuracy`, always predicting the training split's most frequent class,
/// and `linear_accuracy`, the data format's linear model trained by this engine,
/// single-process. Empty for other tasks. Reads the job's data again.
pub fn classification_baselines(job: &Job, folds: &[FoldReport]) -> Result<BTreeMap<String, f64>> {
    baselines_of(job, &Task::from_job(job)?, folds)
}

fn baselines_of(job: &Job, task: &Task, folds: &[FoldReport]) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let (TargetKind::Classes { .. } | TargetKind::Binary { .. }, Some(classes)) = (&task.target, &task.strata) else {
        return Ok(out);
    };
    let splits = plan_splits(job, task, None)?;
    // The confusion matrix's rows are the true classes of the test examples.
    let majority: Option<Vec<f64>> = folds
        .iter()
        .map(|f| {
            let (_, train, _, _) = splits.iter().find(|s| s.0 == f.fold)?;
            let rows = f.test.confusion_matrix.as_ref()?;
            let total: u64 = rows.iter().flatten().sum();
            let hits: u64 = rows.get(majority_class(classes, train))?.iter().sum();
            Some(hits as f64 / total.max(1) as f64)
        })
        .collect();
    if let Some(m) = majority.filter(|m| !m.is_empty()) {
        out.insert("majority_accuracy".to_string(), m.iter().sum::<f64>() / m.len() as f64);
    }
    if let Some(linear) = crate::formats::format(job.data.format).linear_baseline(job) {
        let opts = RunOptions {
            skip_baselines: true,
            ..RunOptions::default()
        };
        // The same data (a linear baseline changes the model and how it trains, not what is
        // read), so the task is shared.
        let run = run_task(&linear, task, "", &opts, &mut LocalSync, &mut |_| {})?;
        let accuracies: Vec<f64> = run.folds.iter().filter_map(|f| f.test.accuracy).collect();
        if !accuracies.is_empty() {
            let mean = accuracies.iter().sum::<f64>() / accuracies.len() as f64;
            out.insert("linear_accuracy".to_string(), mean);
        }
    }
    Ok(out)
}
