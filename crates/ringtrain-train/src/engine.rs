//! The training loop, evaluation and the run directory.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ringtrain_autograd::{Graph, ParamGrad, ParamStore};
use ringtrain_config::{EvalScheme, Job, OptimizerName, ScheduleName, SparseEmbeddings};
use ringtrain_data::{
    eval_shard, kfold, shard_indices, stream_batches, stream_part, summarize_folds, train_test_split, ConfusionMatrix,
    Remainder,
};
use ringtrain_nn::{init_store, Loss, Module, Targets};
use ringtrain_optim::{clip_grad_norm, Optimizer, OptimizerKind, Schedule, ScheduleKind};
use serde::Serialize;

use crate::checkpoint::save_safetensors;
use crate::task::{Examples, TargetKind, Task};
use crate::{write_atomic, Result, TrainError};

/// A failure of the gradient synchronisation (network, peer, mismatch).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SyncError(pub String);

/// Takes one complete gradient bucket (see [`GradSync::reduce_buckets`]).
pub type EmitBucket<'a> = dyn FnMut(Vec<f32>) + 'a;
/// Runs a backward pass, handing each gradient bucket over as it completes.
pub type BucketedBackward<'a> = dyn FnMut(&mut EmitBucket<'_>) + 'a;

/// What the engine needs from its peers: the seam between compute and network.
///
/// Every method must leave the same bits on every rank. Single-process training uses
/// [`LocalSync`]; a distributed worker implements it with the ring all-reduce.
pub trait GradSync {
    /// This process's rank in `0..world()`.
    fn rank(&self) -> usize {
        0
    }

    /// Number of ranks training together.
    fn world(&self) -> usize {
        1
    }

    /// Replaces `grads` (the flat gradient buffer) with the mean over all ranks.
    fn all_reduce_mean(&mut self, grads: &mut [f32]) -> Result<(), SyncError>;

    /// Averages one step's gradient, cut into buckets, over all ranks. `backward` runs the
    /// backward pass and hands over each bucket, in order, the moment it is complete; a sync
    /// may reduce it while backward goes on. Returns the averaged buckets in order. The
    /// result must not depend on when buckets arrive. The default reduces each bucket with
    /// [`GradSync::all_reduce_mean`] after backward.
    fn reduce_buckets(&mut self, backward: &mut BucketedBackward<'_>) -> Result<Vec<Vec<f32>>, SyncError> {
        let mut buckets = Vec::new();
        backward(&mut |b| buckets.push(b));
        for b in &mut buckets {
            self.all_reduce_mean(b)?;
        }
        Ok(buckets)
    }

    /// Every rank's `values`, in rank order, where rank r's has `lens[r]` values (the ranks
    /// agreed on the lengths beforehand): the exchange of sparse gradient rows. `layout`
    /// identifies what is gathered (a table), so ranks gathering different things fail.
    fn all_gather_f32(&mut self, values: &[f32], lens: &[usize], _layout: u64) -> Result<Vec<Vec<f32>>, SyncError> {
        match lens {
            [len] if *len == values.len() => Ok(vec![values.to_vec()]),
            _ => Err(SyncError(format!(
                "one rank has {} values, not the lengths {lens:?}",
                values.len()
            ))),
        }
    }

    /// Replaces `values` (small metric sums) with their sum over all ranks.
    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<(), SyncError>;

    /// Makes every rank's parameters equal to rank 0's.
    fn broadcast_params(&mut self, params: &mut [f32]) -> Result<(), SyncError>;

    /// Makes every rank's `values` equal to rank `root`'s (the training state handed on
    /// when a ring re-forms).
    fn broadcast_from(&mut self, values: &mut [f32], root: usize) -> Result<(), SyncError> {
        match root {
            0 => self.broadcast_params(values),
            _ => Err(SyncError(format!("rank {root} is not in this ring of one"))),
        }
    }

    /// Elastic training: whether the membership may change while the job runs.
    fn elastic(&self) -> bool {
        false
    }

    /// Elastic training, after a collective failed: waits until the job has a new membership
    /// and joins its ring (`Ok(true)`: rank and world may have changed), or finds that none
    /// comes (`Ok(false)`: the failure stands).
    fn reform(&mut self) -> Result<bool, SyncError> {
        Ok(false)
    }

    /// This rank joins a job that is already running: it takes the training state from the
    /// others instead of starting from the initialisation.
    fn joining(&self) -> bool {
        false
    }

    /// Whether this rank writes the run directory it was given (with a changing membership
    /// the writer can change).
    fn writes(&self) -> bool {
        true
    }

    /// Called once when the job is done, with the final parameters (of the last fold), so a
    /// distributed sync can check that every rank ends with the same bits.
    fn finish(&mut self, _params: &[f32]) -> Result<(), SyncError> {
        Ok(())
    }
}

/// No peers: the local gradient is already the mean.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSync;

impl GradSync for LocalSync {
    fn all_reduce_mean(&mut self, _grads: &mut [f32]) -> Result<(), SyncError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, _values: &mut [f64]) -> Result<(), SyncError> {
        Ok(())
    }

    fn broadcast_params(&mut self, _params: &mut [f32]) -> Result<(), SyncError> {
        Ok(())
    }
}

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
    pub examples_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
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
    sums: [f64; 4],
    grad_norm: Option<f64>,
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

/// Result of one model trained and tested (the whole run, or one fold).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FoldReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fold: Option<usize>,
    pub train_examples: usize,
    pub test_examples: usize,
    pub train_loss: f64,
    pub test: EvalMetrics,
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

/// What a checkpoint says about itself (in the file's safetensors metadata).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub world: usize,
    pub seed: u64,
    pub layout_fingerprint: String,
}

/// Reads the manifest of a checkpoint file.
pub fn read_checkpoint_manifest(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, format!("cannot read checkpoint: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainError::io(path, format!("not a safetensors checkpoint: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("ringtrain.checkpoint"))
        .ok_or_else(|| TrainError::io(path, "not a ringtrain checkpoint (no manifest)"))?;
    serde_json::from_str(json).map_err(|e| TrainError::io(path, format!("bad checkpoint manifest: {e}")))
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
}

/// Global-norm clip applied to recurrent models unless the job sets `clip_grad_norm`.
pub const DEFAULT_RECURRENT_CLIP: f32 = 5.0;

/// Model, parameters and optimizer of one training run.
#[derive(Debug)]
pub struct Trainer {
    model: Box<dyn Module>,
    pub store: ParamStore,
    optimizer: Optimizer,
    schedule: Schedule,
    loss: Loss,
    clip: Option<f32>,
    batch_size: usize,
    seed: u64,
    /// Preallocated flat gradient buffer, reused every step.
    grad: Vec<f32>,
    step: u64,
    /// Truncated BPTT: ordered streams with the recurrent state carried between batches.
    tbptt: bool,
    /// Batches per optimizer step (gradient accumulation).
    accumulate: usize,
    /// Largest gradient bucket, in elements (`distributed.bucket_mb`).
    bucket_elems: usize,
    /// The buckets of a distributed step, fixed at its first backward pass.
    buckets: Option<GradBuckets>,
    /// Embedding tables whose gradient may travel as the rows a step touched, and when.
    sparse: Vec<usize>,
    sparse_mode: SparseEmbeddings,
    /// Elastic training ([`Trainer::rejoin`]): remember where the last epoch's end started,
    /// in case a peer fails to finish it.
    elastic: bool,
    ended_epoch: Option<EpochCursor>,
    /// Where the ring re-formed since the last epoch report.
    ring_changes: Vec<RingChange>,
    /// False for a rank that joined a running job until it received the state.
    has_state: bool,
}

/// A step's gradient cut into buckets for the all-reduce: whole parameters in the order
/// backward finishes them ([`Graph::backward_order`]), a bucket closed once it holds
/// `bucket_elems` elements. Every rank builds the same plan from the same model.
#[derive(Debug)]
struct GradBuckets {
    /// Per parameter of the store: its bucket and its offset there (`None`: reduced apart,
    /// as a sparse table).
    place: Vec<Option<(usize, usize)>>,
    /// Per bucket: its length.
    lens: Vec<usize>,
    /// Per bucket: how many parameters it holds.
    members: Vec<usize>,
    /// Buffers of the last step, reused.
    spare: Vec<Vec<f32>>,
}

impl GradBuckets {
    fn new(order: &[usize], specs: &[ringtrain_autograd::ParamSpec], bucket_elems: usize) -> GradBuckets {
        let mut place = vec![None; specs.len()];
        let (mut lens, mut members) = (Vec::new(), Vec::new());
        for &p in order {
            let len = specs[p].len;
            match lens.last_mut() {
                Some(open) if *open + len <= bucket_elems || *open == 0 => {}
                _ => {
                    lens.push(0);
                    members.push(0);
                }
            }
            let b = lens.len() - 1;
            place[p] = Some((b, lens[b]));
            lens[b] += len;
            members[b] += 1;
        }
        GradBuckets {
            place,
            lens,
            members,
            spare: Vec::new(),
        }
    }

    /// Copies the averaged buckets back into the flat gradient and keeps their buffers.
    fn scatter(
        &mut self,
        buckets: Vec<Vec<f32>>,
        specs: &[ringtrain_autograd::ParamSpec],
        flat: &mut [f32],
    ) -> Result<(), SyncError> {
        let got: Vec<usize> = buckets.iter().map(Vec::len).collect();
        if got != self.lens {
            return Err(SyncError(format!(
                "the gradient sync returned buckets of {got:?} elements, the plan has {:?}",
                self.lens
            )));
        }
        for (spec, place) in specs.iter().zip(&self.place) {
            if let Some((b, at)) = *place {
                flat[spec.offset..spec.offset + spec.len].copy_from_slice(&buckets[b][at..at + spec.len]);
            }
        }
        self.spare = buckets;
        Ok(())
    }
}

/// Averages an embedding table's gradient over the ranks into its place in `flat`. Every
/// rank first learns how many distinct rows each touched; when the rows and their indices
/// are fewer bytes than the dense ring all-reduce (`rows × (width + 1) < 2 × table`, the same
/// decision on every rank) or `always` is asked, they are all-gathered and summed in rank
/// order (the same bits on every rank) and divided by the world size; otherwise the table,
/// zero outside those rows, is all-reduced. Rows no rank touched get a zero gradient either
/// way, so the optimizer's dense pass keeps its exact semantics.
fn reduce_table(
    sync: &mut dyn GradSync,
    grad: ParamGrad<'_>,
    spec: &ringtrain_autograd::ParamSpec,
    flat: &mut [f32],
    mode: SparseEmbeddings,
) -> Result<(), SyncError> {
    let dst = &mut flat[spec.offset..spec.offset + spec.len];
    let (rows, values) = match grad {
        ParamGrad::Rows(r) => r.coalesce(),
        ParamGrad::Zero => (Vec::new(), Vec::new()),
        // Used some other way too (every rank alike): the dense all-reduce.
        ParamGrad::Dense(d) => {
            dst.copy_from_slice(d.as_slice());
            return sync.all_reduce_mean(dst);
        }
    };
    let (rank, world) = (sync.rank(), sync.world().max(1));
    let width = spec.shape.get(1).copied().unwrap_or(1).max(1);
    let mut counts = vec![0.0f64; world];
    counts[rank] = rows.len() as f64;
    sync.all_reduce_sum_f64(&mut counts)?;
    let total: f64 = counts.iter().sum();
    let sparse = match mode {
        SparseEmbeddings::Always => true,
        SparseEmbeddings::Never => false,
        SparseEmbeddings::Auto => total * ((width + 1) as f64) < 2.0 * spec.len as f64,
    };
    dst.fill(0.0);
    if !sparse {
        for (k, &row) in rows.iter().enumerate() {
            dst[row * width..(row + 1) * width].copy_from_slice(&values[k * width..(k + 1) * width]);
        }
        return sync.all_reduce_mean(dst);
    }
    // Row indices travel as the bits of an f32: exact, and forwarded as bytes.
    let mut payload: Vec<f32> = rows.iter().map(|&r| f32::from_bits(r as u32)).collect();
    payload.extend_from_slice(&values);
    let lens: Vec<usize> = counts.iter().map(|&c| c as usize * (width + 1)).collect();
    // The table's name and shape, FNV-1a: what the frames' layout fingerprint checks.
    let layout = spec
        .name
        .bytes()
        .chain(spec.shape.iter().flat_map(|d| (*d as u64).to_le_bytes()))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let all = sync.all_gather_f32(&payload, &lens, layout)?;
    let table_rows = spec.len / width;
    for (r, buf) in all.iter().enumerate() {
        let n = buf.len() / (width + 1);
        let (ids, vals) = buf.split_at(n);
        for (k, id) in ids.iter().enumerate() {
            let row = id.to_bits() as usize;
            if row >= table_rows {
                return Err(SyncError(format!(
                    "rank {r} sent a gradient for row {row} of {}, which has {table_rows} rows",
                    spec.name
                )));
            }
            for (d, v) in dst[row * width..(row + 1) * width]
                .iter_mut()
                .zip(&vals[k * width..(k + 1) * width])
            {
                *d += v;
            }
        }
    }
    let n = world as f32;
    for d in dst.iter_mut() {
        *d /= n;
    }
    Ok(())
}

/// Fills the buckets of one step from the gradients backward hands over, and sends each
/// bucket on as soon as it and every bucket before it are complete.
struct BucketFiller<'a> {
    plan: &'a GradBuckets,
    specs: &'a [ringtrain_autograd::ParamSpec],
    /// Gradient accumulation: the earlier micro-batches' weighted sum and this one's share.
    earlier: Option<(&'a [f32], f32)>,
    buffers: Vec<Option<Vec<f32>>>,
    missing: Vec<usize>,
    next: usize,
}

impl<'a> BucketFiller<'a> {
    fn new(
        plan: &'a mut GradBuckets,
        specs: &'a [ringtrain_autograd::ParamSpec],
        earlier: Option<(&'a [f32], f32)>,
    ) -> BucketFiller<'a> {
        let mut spare = std::mem::take(&mut plan.spare);
        spare.reverse();
        let buffers = plan
            .lens
            .iter()
            .map(|&len| {
                // Every element is written before the bucket leaves, so old values can stay.
                let mut b = spare.pop().unwrap_or_default();
                b.resize(len, 0.0);
                Some(b)
            })
            .collect();
        BucketFiller {
            missing: plan.members.clone(),
            plan,
            specs,
            earlier,
            buffers,
            next: 0,
        }
    }

    fn put(&mut self, p: usize, grad: ParamGrad<'_>, emit: &mut dyn FnMut(Vec<f32>)) {
        let Some((b, at)) = self.plan.place[p] else {
            return;
        };
        let spec = &self.specs[p];
        let Some(dst) = self.buffers[b].as_mut().map(|buf| &mut buf[at..at + spec.len]) else {
            return;
        };
        // This parameter's share of the earlier micro-batches' sum, if accumulating.
        let earlier = self
            .earlier
            .map(|(acc, share)| (&acc[spec.offset..spec.offset + spec.len], share));
        // The same arithmetic as `Graph::param_grads_into` and `Graph::add_param_grads`, so
        // the bits do not depend on the path.
        match (grad, earlier) {
            (ParamGrad::Dense(g), None) => dst.copy_from_slice(g.as_slice()),
            (ParamGrad::Dense(g), Some((acc, share))) => {
                for ((d, a), s) in dst.iter_mut().zip(acc).zip(g.as_slice()) {
                    *d = a + share * s;
                }
            }
            (ParamGrad::Rows(r), earlier) => {
                match earlier {
                    None => dst.fill(0.0),
                    Some((acc, _)) => dst.copy_from_slice(acc),
                }
                r.add_into(dst, earlier.map_or(1.0, |(_, share)| share));
            }
            (ParamGrad::Zero, None) => dst.fill(0.0),
            (ParamGrad::Zero, Some((acc, _))) => dst.copy_from_slice(acc),
        }
        self.missing[b] -= 1;
        while self.next < self.buffers.len() && self.missing[self.next] == 0 {
            if let Some(done) = self.buffers[self.next].take() {
                emit(done);
            }
            self.next += 1;
        }
    }
}

impl Trainer {
    pub fn new(job: &Job, model: Box<dyn Module>, loss: Loss, train_examples: usize) -> Trainer {
        let store = init_store(model.as_ref(), job.job.seed);
        // Lookup tables (not learned positions) whose gradient is the rows a batch read;
        // accumulated micro-batches sum them densely, so they go dense then.
        let sparse =
            if job.distributed.sparse_embeddings == SparseEmbeddings::Never || job.training.accumulate_steps > 1 {
                Vec::new()
            } else {
                store
                    .specs()
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.name.ends_with("embedding.weight")
                            && !s.name.ends_with("pos_embedding.weight")
                            && s.shape.len() == 2
                    })
                    .map(|(p, _)| p)
                    .collect()
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
            if self.batch_size % world != 0 {
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
            let order = shard_indices(indices, 0, 1, epoch as u64, self.seed, Remainder::Pad)?;
            let batches: Vec<&[usize]> = order.chunks(self.batch_size.max(1)).collect();
            for group in batches.chunks(self.accumulate) {
                let shares = group
                    .iter()
                    .map(|b| {
                        let mine: Vec<usize> = b.iter().skip(rank).step_by(world).copied().collect();
                        match mine.len() {
                            0 => (vec![b[rank % b.len()]], 0),
                            n => (mine, n),
                        }
                    })
                    .collect();
                groups.push(StepPlan {
                    shares,
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
                        let grads = g.backward(loss)?;
                        match share {
                            None => g.param_grads_into(&grads, &mut self.grad)?,
                            Some(w) => {
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

    /// After the ring re-formed (elastic training): levels every rank with the furthest
    /// point all of them can stand on, then gives the ranks that need it the training state.
    ///
    /// Ranks are at most one *tick* apart (a tick is an optimizer step or an epoch's end),
    /// since none can finish a tick's collectives before every rank has started them. A
    /// rank ahead by a step finished that step's all-reduces, so its update is the full one:
    /// the others take its parameters, optimizer state and position (no work lost). A rank
    /// ahead by an epoch's end goes back to before it (it only evaluated; the report is not
    /// repeated). Ranks that joined take the state of the first rank that has it.
    pub fn rejoin(
        &mut self,
        cursor: &mut EpochCursor,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
        reformed: bool,
    ) -> Result<()> {
        let (rank, world) = (sync.rank(), sync.world().max(1));
        let joining = !self.has_state;
        let step_before = self.step;
        let failed = |reason: String| TrainError::Sync {
            step: step_before,
            source: SyncError(reason),
        };
        let synced = |source| TrainError::Sync {
            step: step_before,
            source,
        };
        // Per rank: its tick, and whether that was an epoch's end; -1 without state.
        let mut ticks = vec![0.0f64; 2 * world];
        if joining {
            ticks[2 * rank] = -1.0;
        } else {
            ticks[2 * rank] = (self.step + cursor.epoch as u64 - 1) as f64;
            ticks[2 * rank + 1] = f64::from(u8::from(self.ended_epoch.is_some()));
        }
        sync.all_reduce_sum_f64(&mut ticks).map_err(synced)?;
        let held: Vec<(usize, f64, bool)> = (0..world)
            .filter(|r| ticks[2 * r] >= 0.0)
            .map(|r| (r, ticks[2 * r], ticks[2 * r + 1] > 0.5))
            .collect();
        let (Some(low), Some(high)) = (
            held.iter().map(|h| h.1).reduce(f64::min),
            held.iter().map(|h| h.1).reduce(f64::max),
        ) else {
            return Err(failed("no rank of the new ring has the training state".into()));
        };
        if high > low + 1.0 {
            return Err(failed(format!(
                "the ranks are {} ticks apart (at most one is possible)",
                high - low
            )));
        }
        let ahead_by_epoch_end = held.iter().any(|h| h.1 == high && h.2);
        let level = if high > low && ahead_by_epoch_end {
            if !joining && ticks[2 * rank] == high {
                match self.ended_epoch.take() {
                    Some(before) => *cursor = before,
                    None => return Err(failed(format!("rank {rank} cannot go back over its epoch's end"))),
                }
            }
            low
        } else {
            high
        };
        // The first rank at the level gives its state to every rank that is not there.
        let root = held.iter().find(|h| h.1 == level).map_or(0, |h| h.0);
        let receives = |r: usize| ticks[2 * r] != level;
        let mut at = [0.0f64; 3];
        if rank == root {
            at = [cursor.epoch as f64, cursor.group as f64, self.step as f64];
        }
        sync.all_reduce_sum_f64(&mut at).map_err(synced)?;
        let (epoch, group, step) = (at[0] as usize, at[1] as usize, at[2] as u64);
        if (0..world).any(receives) {
            // One broadcast: the parameters, then each optimizer slot.
            let n = self.store.num_elements();
            let (slots, steps) = self.optimizer.slots_mut();
            let mut state = Vec::with_capacity(n * (1 + slots.len()));
            state.extend_from_slice(self.store.flat());
            for slot in slots.iter() {
                state.extend_from_slice(slot);
            }
            sync.broadcast_from(&mut state, root).map_err(synced)?;
            if receives(rank) {
                self.store.flat_mut().copy_from_slice(&state[..n]);
                for (i, slot) in slots.iter_mut().enumerate() {
                    slot.copy_from_slice(&state[n * (i + 1)..n * (i + 2)]);
                }
                *steps = step;
                self.step = step;
                // A rank taken forward keeps its sums: the epoch's train loss is then over
                // the examples the ranks counted. A rank that joined has counted none.
                cursor.epoch = epoch;
                cursor.group = group;
                if joining {
                    cursor.sums = [0.0; 4];
                    cursor.grad_norm = None;
                }
            }
        }
        if (cursor.epoch, cursor.group, self.step) != (epoch, group, step) {
            return Err(failed(format!(
                "rank {rank} is at epoch {} step {} and rank {root} at epoch {epoch} step {step}",
                cursor.epoch, self.step
            )));
        }
        self.ended_epoch = None;
        let stepped_back = if joining { 0 } else { step_before.saturating_sub(step) };
        self.has_state = true;
        if reformed || joining {
            self.ring_changes.push(RingChange { step, world });
        }
        observe(Progress::Rejoined {
            rank,
            world,
            epoch,
            step,
            stepped_back,
        });
        Ok(())
    }

    /// [`Trainer::rejoin`], again in the next ring when the membership changes meanwhile.
    /// `reformed`: the ring already changed (else this is the start of an elastic job,
    /// recorded as a change only when it meets a new ring or this rank joins).
    pub fn rejoin_until_level(
        &mut self,
        cursor: &mut EpochCursor,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
        mut reformed: bool,
    ) -> Result<()> {
        loop {
            match self.rejoin(cursor, sync, observe, reformed) {
                Err(e @ TrainError::Sync { .. }) => {
                    let step = self.step;
                    if !sync.reform().map_err(|source| TrainError::Sync { step, source })? {
                        return Err(e);
                    }
                    reformed = true;
                }
                done => return done,
            }
        }
    }

    pub fn learning_rate(&self) -> f32 {
        self.schedule.lr_at(self.step)
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Saves parameters, optimizer state and position (completed `epoch`, step) as one
    /// safetensors file, atomically, so a crash leaves the previous checkpoint intact. The data
    /// cursor is the epoch boundary and every random stream is derived from (seed, step, rank),
    /// so this is all a resumed run needs to continue exactly.
    pub fn save_checkpoint(&self, path: &Path, epoch: usize, world: usize) -> Result<()> {
        let mut tensors: Vec<(String, ringtrain_tensor::Tensor)> = self
            .store
            .named_tensors()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        tensors.extend(
            self.optimizer
                .state_tensors(self.store.specs())
                .into_iter()
                .map(|(n, t)| (format!("optimizer.{n}"), t)),
        );
        let manifest = Checkpoint {
            epoch,
            step: self.step,
            world,
            seed: self.seed,
            layout_fingerprint: format!("{:016x}", self.store.layout_fingerprint()),
        };
        let json = serde_json::to_string(&manifest).map_err(|e| TrainError::io(path, e))?;
        save_safetensors(
            path,
            &tensors,
            HashMap::from([("ringtrain.checkpoint".to_string(), json)]),
        )
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]; returns the completed
    /// epoch. Refuses a checkpoint of another model or seed. The world size may differ: a
    /// global batch is the same examples whatever the number of ranks.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<usize> {
        let manifest = read_checkpoint_manifest(path)?;
        let fingerprint = format!("{:016x}", self.store.layout_fingerprint());
        if manifest.layout_fingerprint != fingerprint || manifest.seed != self.seed {
            return Err(TrainError::io(
                path,
                format!(
                    "checkpoint is for model {} / seed {}, this run is model {fingerprint} / seed {}",
                    manifest.layout_fingerprint, manifest.seed, self.seed
                ),
            ));
        }
        let saved = crate::load_safetensors(path)?;
        let names: Vec<String> = self.store.specs().iter().map(|s| s.name.clone()).collect();
        for name in names {
            let t = saved
                .get(&format!("model.{name}"))
                .ok_or_else(|| TrainError::io(path, format!("missing parameter `{name}`")))?;
            self.store.set(&name, t)?;
        }
        self.optimizer.load_state(self.store.specs(), manifest.step, |k| {
            saved.get(&format!("optimizer.{k}")).map(|t| t.to_vec())
        })?;
        self.step = manifest.step;
        Ok(manifest.epoch)
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
    let out = opts.out;
    let task = Task::from_job(job)?;
    let n = task.examples.len();
    let strata = if job.evaluation.stratify {
        task.strata.as_deref()
    } else {
        None
    };
    // (fold, train indices, test indices, test on the provided test split?)
    type Planned = (Option<usize>, Vec<usize>, Vec<usize>, bool);
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
    let splits = match opts.folds {
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
    };
    if let Some(dir) = out.filter(|_| sync.writes()) {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, format!("cannot create run directory: {e}")))?;
        write_atomic(&dir.join("job.toml"), job_text.as_bytes())?;
    }
    let mut metrics_lines = String::new();
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
        let examples = match job.data.standardize.then(|| task.examples.fitted_on(&train)).flatten() {
            Some(fitted) => fitted,
            None => task.examples.clone(),
        };
        let test_set: Arc<dyn Examples> = match (&task.test_examples, provided) {
            (Some(t), true) => t.clone(),
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
        let last_fold = last_fold_index == Some(fold);
        let test = loop {
            if cursor.group == 0 {
                started = Instant::now();
            }
            let epoch = cursor.epoch;
            let attempt = (|| -> Result<(f64, Option<f64>, Option<f64>, EvalMetrics)> {
                if epoch > job.training.epochs {
                    let test = trainer.evaluate(&task, test_set.as_ref(), &test_rows, sync)?;
                    if last_fold {
                        sync.finish(trainer.store.flat()).map_err(|source| TrainError::Sync {
                            step: trainer.step,
                            source,
                        })?;
                    }
                    return Ok((f64::NAN, None, None, test));
                }
                trainer.train_from(&task, examples.as_ref(), &train, &mut cursor, sync, observe)?;
                let (loss, acc, grad_norm) = trainer.epoch_totals(&task, &cursor, sync)?;
                let test = trainer.evaluate(&task, test_set.as_ref(), &test_rows, sync)?;
                Ok((loss, acc, grad_norm, test))
            })();
            let (loss, acc, grad_norm, test) = match attempt {
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
            if epoch > job.training.epochs {
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
                    examples_per_sec: train.len() as f64 / secs.max(1e-9),
                    grad_norm,
                    ring_changes: std::mem::take(&mut trainer.ring_changes),
                };
                metrics_lines
                    .push_str(&serde_json::to_string(&report).map_err(|e| TrainError::io("metrics.jsonl", e))?);
                metrics_lines.push('\n');
                observe(Progress::Epoch(report));
                if let Some(dir) = out.filter(|_| sync.writes()) {
                    write_atomic(&dir.join("metrics.jsonl"), metrics_lines.as_bytes())?;
                    let due = opts
                        .checkpoint_every
                        .is_some_and(|k| epoch % k.max(1) == 0 || epoch == job.training.epochs);
                    if due && fold.is_none() {
                        trainer.save_checkpoint(&dir.join("checkpoint.safetensors"), epoch, sync.world())?;
                    }
                }
            }
            if trainer.elastic {
                trainer.ended_epoch = Some(cursor.clone());
            }
            cursor = EpochCursor::at(epoch + 1);
        };
        folds.push(FoldReport {
            fold,
            train_examples: train.len(),
            test_examples: test_rows.len(),
            train_loss,
            test,
        });
        last = Some((trainer, examples));
        last_test_rows = test_rows;
    }
    let (trainer, examples) = last.ok_or(TrainError::Job {
        field: "evaluation",
        reason: "no split to train on".into(),
    })?;
    let kfold_stats = if folds.len() > 1 {
        let per_fold: Vec<BTreeMap<String, f64>> = folds.iter().map(|f| f.test.scalars()).collect();
        summarize_folds(&per_fold)?
            .into_iter()
            .map(|(k, s)| {
                (
                    k,
                    FoldStat {
                        mean: s.mean,
                        std: s.std,
                        values: s.values,
                    },
                )
            })
            .collect()
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
    let summary = RunSummary {
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
        folds,
        kfold: kfold_stats,
    };
    if let Some(dir) = out.filter(|_| sync.writes()) {
        write_atomic(&dir.join("metrics.jsonl"), metrics_lines.as_bytes())?;
        let json = serde_json::to_string_pretty(&summary).map_err(|e| TrainError::io("summary.json", e))?;
        write_atomic(&dir.join("summary.json"), json.as_bytes())?;
        let tensors: Vec<_> = trainer.store.named_tensors().map(|(n, t)| (n.to_string(), t)).collect();
        // One metadata key only: safetensors writes the map in hash order, and a second key
        // would make identical runs produce different bytes.
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&dir.join("model.safetensors"), &tensors, meta)?;
        let pre = serde_json::json!({
            "input": examples.preprocess(),
            "input_shape": examples.input_shape(),
            "class_names": task.target.class_names(),
            // Where the data was, so `ringtrain evaluate RUN_DIR` finds the test split again.
            "data_path": std::path::absolute(&job.data.path).unwrap_or_else(|_| job.data.path.clone()),
        });
        write_atomic(&dir.join("preprocess.json"), pre.to_string().as_bytes())?;
        crate::plots::write_plots(dir, &metrics_lines, &summary)?;
    }
    Ok(summary)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::checkpoint::load_safetensors;

    fn iris_job(epochs: usize) -> (Job, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/iris-mlp.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut job = Job::load(&path).unwrap();
        job.training.epochs = epochs;
        (job, text)
    }

    #[test]
    fn resuming_from_a_checkpoint_ends_with_the_same_parameters() {
        let (job, text) = iris_job(6);
        let straight = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            out: Some(straight.path()),
            ..RunOptions::default()
        };
        run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();

        // Interrupted after 3 epochs (checkpoint every epoch), then resumed to 6.
        let resumed = tempfile::tempdir().unwrap();
        let (short, _) = iris_job(3);
        let opts = RunOptions {
            out: Some(resumed.path()),
            checkpoint_every: Some(1),
            resume_from: None,
            folds: None,
        };
        run_job_opts(&short, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
        let ckpt = resumed.path().join("checkpoint.safetensors");
        assert_eq!(read_checkpoint_manifest(&ckpt).unwrap().epoch, 3);
        let copy = resumed.path().join("from.safetensors");
        std::fs::copy(&ckpt, &copy).unwrap();
        let opts = RunOptions {
            out: Some(resumed.path()),
            checkpoint_every: Some(1),
            resume_from: Some(&copy),
            folds: None,
        };
        run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();

        let a = std::fs::read(straight.path().join("model.safetensors")).unwrap();
        let b = std::fs::read(resumed.path().join("model.safetensors")).unwrap();
        assert!(a == b, "resumed run must end with bitwise-identical weights");
        let lines = std::fs::read_to_string(resumed.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 6);
        let s1 = std::fs::read(straight.path().join("summary.json")).unwrap();
        let s2 = std::fs::read(resumed.path().join("summary.json")).unwrap();
        assert_eq!(s1, s2);
    }

    /// Final parameters of the Iris job with `edit` applied.
    fn iris_params(epochs: usize, edit: impl FnOnce(&mut Job)) -> Vec<f32> {
        let (mut job, text) = iris_job(epochs);
        edit(&mut job);
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            out: Some(dir.path()),
            ..RunOptions::default()
        };
        run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
        let mut tensors: Vec<_> = load_safetensors(&dir.path().join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors.iter().flat_map(|(_, t)| t.as_slice().to_vec()).collect()
    }

    #[test]
    fn buckets_take_whole_parameters_in_backward_order_up_to_the_size() {
        let spec = |name: &str, offset, len| ringtrain_autograd::ParamSpec {
            name: name.into(),
            shape: vec![len],
            offset,
            len,
        };
        let specs = [spec("a", 0, 3), spec("b", 3, 10), spec("c", 13, 2), spec("d", 15, 4)];
        // Backward finishes d, c, b, a; buckets of at most 6 values, b alone being larger.
        let plan = GradBuckets::new(&[3, 2, 1, 0], &specs, 6);
        assert_eq!(plan.lens, vec![6, 10, 3]);
        assert_eq!(plan.members, vec![2, 1, 1]);
        assert_eq!(plan.place, vec![Some((2, 0)), Some((1, 0)), Some((0, 4)), Some((0, 0))]);

        // Filled in that order, each bucket leaves once it and those before it are complete.
        let mut plan = plan;
        let flat: Vec<f32> = (0..19).map(|v| v as f32).collect();
        let mut sent = Vec::new();
        {
            let mut filler = BucketFiller::new(&mut plan, &specs, None);
            for p in [3, 2, 1, 0] {
                let s = &specs[p];
                let grad =
                    ringtrain_tensor::Tensor::from_vec(&[s.len], flat[s.offset..s.offset + s.len].to_vec()).unwrap();
                filler.put(p, ParamGrad::Dense(&grad), &mut |b| sent.push(b));
            }
        }
        assert_eq!(
            sent,
            vec![
                vec![15.0, 16.0, 17.0, 18.0, 13.0, 14.0],
                (3..13).map(|v| v as f32).collect(),
                vec![0.0, 1.0, 2.0]
            ]
        );
        let mut back = vec![f32::NAN; 19];
        plan.scatter(sent, &specs, &mut back).unwrap();
        assert_eq!(back, flat);
    }

    #[test]
    fn accumulating_batches_equals_one_batch_as_large() {
        // 120 training rows. Batches of 16 in pairs against batches of 32: the last pair is
        // 16 + 8 rows against one batch of 24, so the weights by example count matter.
        // Batches of 20 in fours against 80: the last group has two batches only.
        for (small, k, large) in [(16, 2, 32), (20, 4, 80)] {
            let accumulated = iris_params(4, |j| {
                j.training.batch_size = small;
                j.training.accumulate_steps = k;
            });
            let one = iris_params(4, |j| j.training.batch_size = large);
            let worst = accumulated
                .iter()
                .zip(&one)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "batch {small} x {k} vs {large}: relative difference {worst}"
            );
        }
        // One batch per step is the plain path, bit for bit.
        assert_eq!(
            iris_params(2, |j| j.training.accumulate_steps = 1),
            iris_params(2, |_| {})
        );
    }

    #[test]
    fn a_checkpoint_of_another_model_is_refused() {
        let (job, text) = iris_job(1);
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            out: Some(dir.path()),
            checkpoint_every: Some(1),
            resume_from: None,
            folds: None,
        };
        run_job_opts(&job, &text, &opts, &mut LocalSync, &mut |_| {}).unwrap();
        let mut other = job.clone();
        other.model.hidden = vec![8];
        let ckpt = dir.path().join("checkpoint.safetensors");
        let opts = RunOptions {
            out: None,
            checkpoint_every: None,
            resume_from: Some(&ckpt),
            folds: None,
        };
        let err = run_job_opts(&other, &text, &opts, &mut LocalSync, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("checkpoint is for model"), "{err}");
    }
}
