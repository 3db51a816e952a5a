//! `ringtrain-train`: the single-process training engine.
//!
//! It turns a validated [`Job`] into a task (data, model, loss), runs epochs of minibatch
//! steps, evaluates, and writes the run directory (`metrics.jsonl`, `summary.json`,
//! `model.safetensors`, `job.toml`).
//!
//! # The seam between compute and network
//! Between backward and the optimizer step the engine hands the flat gradient buffer to a
//! [`GradSync`]. [`LocalSync`] (single process) leaves it as it is; a distributed worker
//! supplies the ring all-reduce. Everything else — batching, clipping, the optimizer — is the
//! same code on every rank, which is what keeps ranks bitwise identical.
//!
//! # Architecture invariant
//! No printing, no environment, no process exit: progress is reported through an observer
//! callback and the binary decides what to show.

mod buckets;
mod checkpoint;
mod engine;
mod formats;
mod inference;
mod plots;
mod rejoin;
mod run;
mod sync;
mod task;

pub use checkpoint::{
    load_safetensors, read_checkpoint_manifest, restore_params, save_safetensors, write_atomic, Checkpoint,
};
pub use engine::{EpochCursor, EpochReport, EvalMetrics, Progress, RingChange, Trainer};
pub use formats::{ModelRole, Preprocessing};
pub use inference::{Evaluation, GenerateOptions, Prediction, SavedModel};
pub use plots::write_plots;
pub use run::{
    classification_baselines, kfold_summary, run_job, run_job_opts, run_job_with, FoldReport, FoldStat, RunOptions,
    RunSummary, StopReport,
};
pub use sync::{BucketedBackward, EmitBucket, GradSync, LocalSync, SyncError};
pub use task::{build_model, build_model_for, Batch, Examples, TargetKind, Task};

use std::path::PathBuf;

/// Everything that can stop a training run, with the context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] ringtrain_data::DataError),
    #[error(transparent)]
    Model(#[from] ringtrain_nn::NnError),
    #[error(transparent)]
    Autograd(#[from] ringtrain_autograd::AutogradError),
    #[error(transparent)]
    Optim(#[from] ringtrain_optim::OptimError),
    #[error("gradient sync failed at step {step}: {source}")]
    Sync {
        step: u64,
        #[source]
        source: SyncError,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("job `{field}`: {reason}")]
    Job { field: &'static str, reason: String },
    #[error("loss became {value} at epoch {epoch}, step {step}: lower the learning rate or clip gradients")]
    Diverged { epoch: usize, step: u64, value: f32 },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> TrainError {
        TrainError::File {
            path: path.into(),
            reason: e.to_string(),
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
