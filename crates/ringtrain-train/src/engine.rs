//! The training loop, evaluation and the run directory.

use std::collections::BTreeMap;

use ringtrain_autograd::{Graph, ParamStore};
use ringtrain_config::{Job, OptimizerName, ScheduleName, SparseEmbeddings};
use ringtrain_data::{batch_share, epoch_batches, eval_shard, stream_batches, stream_part, ConfusionMatrix};
use ringtrain_nn::{init_store, Loss, Module, Targets};
use ringtrain_optim::{clip_grad_norm, Optimizer, OptimizerKind, Schedule, ScheduleKind};
use serde::Serialize;

use crate::buckets::{reduce_table, BucketFiller, GradBuckets};
use crate::sync::GradSync;
use crate::task::{Examples, TargetKind, Task};
use crate::{Result, TrainError};

/// Metrics of one evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    pub examples: usize,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    /// Language models: exp(mean cross-entropy per token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confusion_matrix: Option<Vec<Vec<u64>>>,
}

impl EvalMetrics {
    /// Scalar metrics by name (for fold summaries).
    pub fn scalars(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("loss".to_string(), self.loss);
        for (k, v) in [
            ("accuracy", self.accuracy),
            ("macro_f1", self.macro_f1),
            ("rmse", self.rmse),
            ("mae", self.mae),
            ("perplexity", self.perplexity),
        ] {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        }
        m
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EpochReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_accuracy: Option<f64>,
    pub test_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_rmse: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_perplexity: Option<f64>,
    /// On the validation part (`evaluation.validation_fraction`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    pub examples_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// An epoch of the refit after early stopping (`training.early_stopping.refit`), which
    /// counts its epochs from 1 again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refit: bool,
    /// Elastic training: where the ring re-formed during this epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ring_changes: Vec<RingChange>,
}

/// The ring re-formed (elastic training): training went on from optimizer step `step` with
/// `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RingChange {
    pub step: u64,
    pub world: usize,
}

/// What the observer is told while a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// An optimizer step finished: `done` of `total` batches in this epoch, `step` steps
    /// in all.
    Batch {
        epoch: usize,
        done: usize,
        total: usize,
        step: u64,
    },
    Epoch(EpochReport),
    /// The checkpoint of `epoch` is on disk (written after that epoch's report, by the rank
    /// that writes the run directory).
    Checkpoint {
        epoch: usize,
    },
    /// The ring re-formed with `world` ranks (elastic training) and this rank goes on as
    /// `rank` from optimizer step `step` of `epoch`; `stepped_back` is how many completed
    /// steps it gave up to be level with the others (0: a rank behind takes the state of one
    /// ahead, so only the step in flight is computed again).
    Rejoined {
        rank: usize,
        world: usize,
        epoch: usize,
        step: u64,
        stepped_back: u64,
    },
}

/// Where training is within an epoch: the optimizer steps of it already taken and this
/// rank's running sums. Kept outside the step loop, so that after a change of membership the
/// epoch goes on from here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochCursor {
    /// The epoch being trained (from 1).
    pub epoch: usize,
    /// Optimizer steps of this epoch already taken.
    pub group: usize,
    /// This rank's loss sum, correct predictions, examples and predictions so far.
    pub(crate) sums: [f64; 4],
    pub(crate) grad_norm: Option<f64>,
}

impl EpochCursor {
    /// The start of `epoch`.
    pub fn at(epoch: usize) -> EpochCursor {
        EpochCursor {
            epoch,
            ..EpochCursor::default()
        }
    }
}

/// The batches of one optimizer step on this rank: for each batch, the rows this rank
/// computes and how many of them count (0 for the stand-in example of a rank that a batch
/// smaller than the world leaves without one); and the rows of the whole step on all ranks.
struct StepPlan {
    shares: Vec<(Vec<usize>, usize)>,
    global_rows: usize,
}

/// Global-norm clip applied to recurrent models unless the job sets `clip_grad_norm`.
pub(crate) const DEFAULT_RECURRENT_CLIP: f32 = 5.0;

/// Model, parameters and optimizer of one training run.
#[derive(Debug)]
pub struct Trainer {
    model: Box<dyn Module>,
    pub store: ParamStore,
    pub(crate) optimizer: Optimizer,
    pub(crate) schedule: Schedule,
    loss: Loss,
    clip: Option<f32>,
    batch_size: usize,
    pub(crate) seed: u64,
    /// Preallocated flat gradient buffer, reused every step.
    grad: Vec<f32>,
    pub(crate) step: u64,
    /// Truncated BPTT: ordered streams with the recurrent state carried between batches.
    tbptt: bool,
    /// Batches per optimizer step (gradient accumulation).
    accumulate: usize,
    /// Largest gradient bucket, in elements (`distributed.bucket_mb`).
    bucket_elems: usize,
    /// The buckets of a distributed step, fixed at its first backward pass.
    buckets: Option<GradBuckets>,
    /// Embedding tables (store indices).
    tables: Vec<usize>,
    /// Embedding tables whose gradient may travel as the rows a step touched, and when.
    sparse: Vec<usize>,
    sparse_mode: SparseEmbeddings,
    /// Elastic training ([`Trainer::rejoin`]): remember where the last epoch's end started,
    /// in case a peer fails to finish it.
    pub(crate) elastic: bool,
    pub(crate) ended_epoch: Option<EpochCursor>,
    /// Where the ring re-formed since the last epoch report.
    pub(crate) ring_changes: Vec<RingChange>,
    /// False for a rank that joined a running job until it received the state.
    pub(crate) has_state: bool,
}

impl Trainer {
    pub fn new(job: &Job, model: Box<dyn Module>, loss: Loss, train_examples: usize) -> Trainer {
        let store = init_store(model.as_ref(), job.job.seed);
        let tables = ringtrain_nn::lookup_tables(&store);
        // Accumulated micro-batches sum them densely, so they travel dense then.
        let sparse =
            if job.distributed.sparse_embeddings == SparseEmbeddings::Never || job.training.accumulate_steps > 1 {
                Vec::new()
            } else {
                tables.clone()
            };
        let o = &job.optimizer;
        let wd = o.weight_decay as f32;
        let kind = match o.kind {
            OptimizerName::Sgd => OptimizerKind::sgd(o.momentum.unwrap_or(0.0) as f32, o.nesterov.unwrap_or(false), wd),
            OptimizerName::Adagrad => OptimizerKind::Adagrad {
                lr_decay: 0.0,
                eps: o.eps.unwrap_or(1e-10) as f32,
                weight_decay: wd,
            },
            OptimizerName::Rmsprop => OptimizerKind::RmsProp {
                alpha: 0.99,
                eps: o.eps.unwrap_or(1e-8) as f32,
                momentum: o.momentum.unwrap_or(0.0) as f32,
                weight_decay: wd,
            },
            OptimizerName::Adam | OptimizerName::Adamw => {
                let [b1, b2] = o.betas.unwrap_or([0.9, 0.999]);
                OptimizerKind::Adam {
                    beta1: b1 as f32,
                    beta2: b2 as f32,
                    eps: o.eps.unwrap_or(1e-8) as f32,
                    weight_decay: wd,
                    decoupled: o.kind == OptimizerName::Adamw,
                }
            }
        };
        let accumulate = job.training.accumulate_steps.max(1);
        let steps_per_epoch = train_examples
            .div_ceil(job.training.batch_size)
            .div_ceil(accumulate)
            .max(1) as u64;
        let schedule = Schedule {
            base_lr: o.lr as f32,
            warmup_steps: o.warmup_steps,
            total_steps: steps_per_epoch * job.training.epochs as u64,
            kind: match o.schedule {
                ScheduleName::Constant => ScheduleKind::Constant,
                ScheduleName::Step => ScheduleKind::Step {
                    every: o.step_epochs.unwrap_or(1) * steps_per_epoch,
                    gamma: o.gamma.unwrap_or(1.0) as f32,
                },
                ScheduleName::Cosine => ScheduleKind::Cosine {
                    min_lr: o.min_lr as f32,
                },
            },
        };
        Trainer {
            optimizer: Optimizer::new(kind, store.num_elements()),
            grad: vec![0.0; store.num_elements()],
            model,
            store,
            schedule,
            loss,
            // Recurrent nets clip by default: gradients through many steps can explode.
            clip: job.training.clip_grad_norm.map(|c| c as f32).or(job
                .model
                .kind
                .is_recurrent()
                .then_some(DEFAULT_RECURRENT_CLIP)),
            batch_size: job.training.batch_size,
            seed: job.job.seed,
            step: 0,
            tbptt: job.training.tbptt,
            accumulate,
            bucket_elems: ((job.distributed.bucket_mb * f64::from(1u32 << 20)) as usize / 4).max(1),
            buckets: None,
            tables,
            sparse,
            sparse_mode: job.distributed.sparse_embeddings,
            elastic: false,
            ended_epoch: None,
            ring_changes: Vec::new(),
            has_state: true,
        }
    }

    /// One epoch over `indices`; see [`Trainer::train_from`].
    pub fn train_epoch(
        &mut self,
        task: &Task,
        examples: &dyn Examples,
        indices: &[usize],
        epoch: usize,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
    ) -> Result<(f64, Option<f64>, Option<f64>)> {
        let mut cursor = EpochCursor::at(epoch);
        self.train_from(task, examples, indices, &mut cursor, sync, observe)?;
        self.epoch_totals(task, &cursor, sync)
    }

    /// The optimizer steps of `cursor.epoch` from `cursor.group` on, over `indices` shuffled
    /// with the epoch's seeded permutation. Global batch k is positions k·B .. (k+1)·B of the
    /// permutation (B = `batch_size`), whatever the world size; rank r of W takes the
    /// batch's positions r, r + W, r + 2W, ..., so shares differ by one example at most and
    /// the last batch is simply smaller. Each rank's mean gradient is weighted by its share
    /// of the batch (W·n_r / B), so the averaged gradient is exactly the mean over the global
    /// batch; a rank left without an example (a batch smaller than W) computes one with
    /// weight zero. With gradient accumulation every optimizer step takes `accumulate_steps`
    /// consecutive batches, weighted the same way and synchronised once. `cursor` advances
    /// with every step, so a run interrupted by a change of membership goes on from it.
    pub fn train_from(
        &mut self,
        task: &Task,
        examples: &dyn Examples,
        indices: &[usize],
        cursor: &mut EpochCursor,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let epoch = cursor.epoch;
        let (rank, world) = (sync.rank(), sync.world().max(1));
        let mut groups: Vec<StepPlan> = Vec::new();
        if self.tbptt {
            if !self.batch_size.is_multiple_of(world) {
                return Err(TrainError::Job {
                    field: "training.batch_size",
                    reason: format!(
                        "with truncated BPTT the {} streams must divide evenly by the {world} workers",
                        self.batch_size
                    ),
                });
            }
            // Windows in text order, one stream per batch row; the same number of steps on
            // every rank.
            let mut windows = indices.to_vec();
            windows.sort_unstable();
            let part = stream_part(&windows, rank, world)?;
            if part.is_empty() {
                return Err(TrainError::Job {
                    field: "training.tbptt",
                    reason: format!("{} training windows are too few for {world} workers", windows.len()),
                });
            }
            for group in stream_batches(part, self.batch_size / world).chunks(self.accumulate) {
                let rows: usize = group.iter().map(Vec::len).sum();
                groups.push(StepPlan {
                    shares: group.iter().map(|b| (b.clone(), b.len())).collect(),
                    global_rows: rows * world,
                });
            }
        } else {
            let batches = epoch_batches(indices, self.batch_size, epoch as u64, self.seed);
            for group in batches.chunks(self.accumulate) {
                groups.push(StepPlan {
                    shares: group
                        .iter()
                        .map(|b| batch_share(b, rank, world))
                        .collect::<Result<_, _>>()?,
                    global_rows: group.iter().map(|b| b.len()).sum(),
                });
            }
        }
        let total: usize = groups.iter().map(|g| g.shares.len()).sum();
        let [mut loss_sum, mut correct, mut seen, mut targets_seen] = cursor.sums;
        // The recurrent state the previous batch ended with (truncated BPTT; reset per epoch).
        let mut carried: Option<Vec<ringtrain_tensor::Tensor>> = None;
        let mut done: usize = groups[..cursor.group.min(groups.len())]
            .iter()
            .map(|g| g.shares.len())
            .sum();
        for StepPlan {
            shares: group,
            global_rows: group_rows,
        } in groups.iter().skip(cursor.group)
        {
            let lr = self.schedule.lr_at(self.step);
            for (m, (chunk, real)) in group.iter().enumerate() {
                // This batch's weight in the step: its rows' share of the global rows, times W
                // because the all-reduce divides by W. Exactly 1 when one batch splits evenly.
                let weight = (real * world) as f32 / *group_rows as f32;
                let share = (group.len() > 1).then_some(weight);
                let loss_scale = (group.len() == 1 && weight != 1.0).then_some(weight);
                let batch = examples.batch(chunk)?;
                let targets = task.loss_targets(&batch.targets)?;
                let loss_value = {
                    let mut g = Graph::new(&self.store);
                    // Dropout masks: a fresh, reproducible stream per step (and micro-batch).
                    g.seed_rng(
                        self.seed
                            ^ self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            ^ (rank as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
                            ^ (m as u64).wrapping_mul(0x94d0_49bb_1331_11eb),
                    );
                    let x = g.input(batch.x);
                    let out = self.forward(&mut g, x, &mut carried, chunk.len())?;
                    if *real > 0 {
                        correct += count_correct(&task.target, g.value(out), &batch.targets)? as f64;
                        if let Targets::Classes(c) = &batch.targets {
                            targets_seen += c.len() as f64;
                        }
                    }
                    let loss = self.loss.compute(&mut g, out, &targets)?;
                    let value = g.value(loss).item().map_err(ringtrain_autograd::AutogradError::from)?;
                    // One batch: its mean gradient, scaled when the shares are uneven. Several:
                    // the weighted sum of their means.
                    let loss = match loss_scale {
                        Some(w) => g.scale(loss, w),
                        None => loss,
                    };
                    if m + 1 == group.len() && world > 1 {
                        // The step's gradient leaves in buckets as backward completes them;
                        // embedding tables as the rows the batch read, after backward.
                        for &p in &self.sparse {
                            g.set_row_sparse(p);
                        }
                        let specs = self.store.specs();
                        let sparse = &self.sparse;
                        let plan = self.buckets.get_or_insert_with(|| {
                            let mut order = g.backward_order(loss);
                            order.retain(|p| !sparse.contains(p));
                            GradBuckets::new(&order, specs, self.bucket_elems)
                        });
                        let (mut failed, mut produced) = (None, None);
                        let earlier = share.map(|w| (self.grad.as_slice(), w));
                        let reduced = sync.reduce_buckets(&mut |emit| {
                            let mut filler = BucketFiller::new(plan, specs, earlier);
                            match g.backward_with(loss, &mut |p, grad| filler.put(p, grad, emit)) {
                                Ok(grads) => produced = Some(grads),
                                Err(e) => failed = Some(e),
                            }
                        });
                        if let Some(e) = failed {
                            return Err(e.into());
                        }
                        let step = self.step;
                        let sync_err = |source| TrainError::Sync { step, source };
                        reduced
                            .and_then(|r| plan.scatter(r, specs, &mut self.grad))
                            .map_err(sync_err)?;
                        if let Some(grads) = &produced {
                            for &p in sparse {
                                reduce_table(
                                    sync,
                                    g.param_grad(grads, p),
                                    &specs[p],
                                    &mut self.grad,
                                    self.sparse_mode,
                                )
                                .map_err(sync_err)?;
                            }
                        }
                    } else {
                        if share.is_none() {
                            // The rows, added into the zeroed flat gradient, give a dense
                            // table's bits without a table-sized gradient on the tape.
                            for &p in &self.tables {
                                g.set_row_sparse(p);
                            }
                        }
                        match share {
                            None => {
                                g.backward_into(loss, &mut self.grad)?;
                            }
                            Some(w) => {
                                let grads = g.backward(loss)?;
                                if m == 0 {
                                    self.grad.fill(0.0);
                                }
                                g.add_param_grads(&grads, &mut self.grad, w)?;
                            }
                        }
                    }
                    value
                };
                if !loss_value.is_finite() {
                    return Err(TrainError::Diverged {
                        epoch,
                        step: self.step,
                        value: loss_value,
                    });
                }
                loss_sum += f64::from(loss_value) * *real as f64;
                seen += *real as f64;
            }
            if world == 1 {
                sync.all_reduce_mean(&mut self.grad)
                    .map_err(|source| TrainError::Sync {
                        step: self.step,
                        source,
                    })?;
            }
            if let Some(max) = self.clip {
                cursor.grad_norm = Some(f64::from(clip_grad_norm(&mut self.grad, max)));
            }
            self.optimizer.step(self.store.flat_mut(), &self.grad, lr)?;
            self.step += 1;
            self.ended_epoch = None;
            cursor.group += 1;
            cursor.sums = [loss_sum, correct, seen, targets_seen];
            done += group.len();
            observe(Progress::Batch {
                epoch,
                done,
                total,
                step: self.step,
            });
        }
        Ok(())
    }

    /// The epoch's mean train loss, train accuracy (classification) and last gradient norm,
    /// over every rank's examples.
    pub fn epoch_totals(
        &mut self,
        task: &Task,
        cursor: &EpochCursor,
        sync: &mut dyn GradSync,
    ) -> Result<(f64, Option<f64>, Option<f64>)> {
        let mut sums = cursor.sums;
        sync.all_reduce_sum_f64(&mut sums).map_err(|source| TrainError::Sync {
            step: self.step,
            source,
        })?;
        let [loss_sum, correct, seen, targets_seen] = sums;
        let acc = (task.target.n_classes() > 0).then(|| correct / targets_seen.max(1.0));
        Ok((loss_sum / seen.max(1.0), acc, cursor.grad_norm))
    }

    /// Loss and metrics of the current parameters on `indices` (inference mode, no tape).
    /// Each rank evaluates a contiguous, disjoint part of `indices` and the sums are combined,
    /// so every example counts exactly once whatever the world size.
    pub fn evaluate(
        &self,
        task: &Task,
        examples: &dyn Examples,
        indices: &[usize],
        sync: &mut dyn GradSync,
    ) -> Result<EvalMetrics> {
        let n_classes = task.target.n_classes();
        // A language model's "classes" are its vocabulary: count hits, not a V×V matrix.
        let tokens = matches!(task.target, TargetKind::NextToken { .. });
        let mut confusion = ConfusionMatrix::new(if tokens { 1 } else { n_classes.max(1) });
        let (mut loss_sum, mut sq_sum, mut abs_sum) = (0.0f64, 0.0f64, 0.0f64);
        let (mut token_hits, mut token_count) = (0.0f64, 0.0f64);
        let scale = f64::from(examples.target_scale());
        let mine = &indices[eval_shard(indices.len(), sync.rank(), sync.world().max(1))?];
        let batches: Vec<Vec<usize>> = if self.tbptt {
            // The validation text as streams too, so each window starts from its context.
            let mut windows = mine.to_vec();
            windows.sort_unstable();
            stream_batches(&windows, self.batch_size)
        } else {
            mine.chunks(self.batch_size.max(256)).map(<[usize]>::to_vec).collect()
        };
        let mut carried: Option<Vec<ringtrain_tensor::Tensor>> = None;
        for chunk in &batches {
            let batch = examples.batch(chunk)?;
            let targets = task.loss_targets(&batch.targets)?;
            let mut g = Graph::inference(&self.store);
            let x = g.input(batch.x);
            let out = self.forward(&mut g, x, &mut carried, chunk.len())?;
            let loss = self.loss.compute(&mut g, out, &targets)?;
            loss_sum +=
                f64::from(g.value(loss).item().map_err(ringtrain_autograd::AutogradError::from)?) * chunk.len() as f64;
            match (&batch.targets, &task.target) {
                (Targets::Classes(truth), kind) if tokens => {
                    let pred = predict_classes(kind, g.value(out))?;
                    token_hits += pred.iter().zip(truth).filter(|(p, t)| p == t).count() as f64;
                    token_count += truth.len() as f64;
                }
                (Targets::Classes(truth), kind) => {
                    let pred = predict_classes(kind, g.value(out))?;
                    confusion.add_all(truth, &pred);
                }
                (Targets::Values(t), _) => {
                    for (&y, &p) in t.as_slice().iter().zip(g.value(out).as_slice()) {
                        let e = (f64::from(p) - f64::from(y)) * scale;
                        sq_sum += e * e;
                        abs_sum += e.abs();
                    }
                }
            }
        }
        // One vector of sums for one all-reduce: loss, squared and absolute errors, counts.
        let k = confusion.counts().len();
        let mut sums = vec![loss_sum, sq_sum, abs_sum, token_hits, token_count];
        sums.extend(confusion.counts().iter().flatten().map(|&c| c as f64));
        sync.all_reduce_sum_f64(&mut sums).map_err(|source| TrainError::Sync {
            step: self.step,
            source,
        })?;
        let counts: Vec<Vec<u64>> = sums[5..]
            .chunks(k)
            .map(|r| r.iter().map(|&c| c.round() as u64).collect())
            .collect();
        let confusion = ConfusionMatrix::from_counts(counts)?;
        let n = indices.len().max(1) as f64;
        let classification = n_classes > 0 && !tokens;
        let regression = n_classes == 0;
        Ok(EvalMetrics {
            examples: indices.len(),
            loss: sums[0] / n,
            accuracy: if tokens {
                Some(sums[3] / sums[4].max(1.0))
            } else {
                classification.then(|| confusion.accuracy())
            },
            macro_f1: classification.then(|| confusion.macro_f1()),
            rmse: regression.then(|| (sums[1] / n).sqrt()),
            mae: regression.then(|| sums[2] / n),
            perplexity: tokens.then(|| (sums[0] / n).exp()),
            confusion_matrix: classification.then(|| confusion.counts().to_vec()),
        })
    }

    /// The model on one batch of `rows` examples; with truncated BPTT from the state the
    /// previous batch left in `carried`, which then holds this batch's final state.
    fn forward(
        &self,
        g: &mut Graph<'_>,
        x: ringtrain_autograd::Var,
        carried: &mut Option<Vec<ringtrain_tensor::Tensor>>,
        rows: usize,
    ) -> Result<ringtrain_autograd::Var> {
        if !self.tbptt {
            return Ok(self.model.forward(g, x)?);
        }
        let state = carried.take().map(|s| keep_rows(s, rows)).transpose()?;
        let (out, next) = self.model.forward_carry(g, x, state.as_deref())?;
        *carried = Some(next.iter().map(|&v| g.value(v).clone()).collect());
        Ok(out)
    }

    pub fn learning_rate(&self) -> f32 {
        self.schedule.lr_at(self.step)
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn model(&self) -> &dyn Module {
        self.model.as_ref()
    }
}

/// Class predictions from model outputs: arg-max of logits, or logit > 0 for one output.
/// The first `rows` rows of each carried state: at the end of an epoch the last streams run
/// out of windows and leave the batch.
fn keep_rows(state: Vec<ringtrain_tensor::Tensor>, rows: usize) -> Result<Vec<ringtrain_tensor::Tensor>> {
    state
        .into_iter()
        .map(|t| {
            if t.shape().first() == Some(&rows) {
                Ok(t)
            } else {
                t.slice_axis(0, 0, rows)
                    .map_err(|e| ringtrain_autograd::AutogradError::from(e).into())
            }
        })
        .collect()
}

fn predict_classes(kind: &TargetKind, out: &ringtrain_tensor::Tensor) -> Result<Vec<usize>> {
    Ok(match kind {
        TargetKind::Binary { .. } => out.as_slice().iter().map(|&z| usize::from(z > 0.0)).collect(),
        _ => out.argmax_rows().map_err(ringtrain_autograd::AutogradError::from)?,
    })
}

fn count_correct(kind: &TargetKind, out: &ringtrain_tensor::Tensor, targets: &Targets) -> Result<usize> {
    match targets {
        Targets::Classes(truth) => {
            let pred = predict_classes(kind, out)?;
            Ok(pred.iter().zip(truth).filter(|(p, t)| p == t).count())
        }
        Targets::Values(_) => Ok(0),
    }
}

#[cfg(test)]
mod tests;
