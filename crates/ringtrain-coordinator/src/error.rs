//! The one error type of this crate.

use std::time::Duration;

/// Where the last checkpoint of a job is, as told by the writer rank's heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheckpoint {
    /// Completed epoch the checkpoint holds; `None` when none was written yet.
    pub epoch: Option<u64>,
    /// `out_dir/checkpoint.safetensors` when the job has a run directory.
    pub path: Option<String>,
}

impl std::fmt::Display for LastCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.epoch, &self.path) {
            (Some(e), Some(p)) => write!(f, "last checkpoint: {p} (epoch {e})"),
            (Some(e), None) => write!(f, "last checkpoint: epoch {e}"),
            (None, _) => f.write_str("no checkpoint yet"),
        }
    }
}

/// Why a job did not complete. Every variant that involves a worker names its rank, its
/// address and process, where it was, and the last checkpoint to resume from.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordinatorError {
    /// The configuration cannot run a job.
    #[error("invalid coordinator configuration: {what}")]
    Config { what: String },

    /// The server could not run.
    #[error("coordinator server failed: {reason}")]
    Serve { reason: String },

    /// Not every worker registered before the rendezvous deadline.
    #[error(
        "only {registered} of {expected} workers registered within {timeout:?}; \
         check that every worker can reach this coordinator and uses the same token"
    )]
    Rendezvous {
        registered: usize,
        expected: usize,
        timeout: Duration,
    },

    /// A worker stopped talking: its heartbeat stream broke, or it stayed silent too long.
    #[error("worker rank {rank} ({worker}) lost at epoch {epoch}, step {step}: {reason}; {checkpoint}")]
    WorkerLost {
        rank: usize,
        worker: String,
        epoch: u64,
        step: u64,
        reason: String,
        checkpoint: LastCheckpoint,
    },

    /// Elastic training: workers were lost and too few are left to go on.
    #[error(
        "{lost} lost; {left} workers left, fewer than the {min} needed (min_workers) at epoch {epoch}, \
         step {step}; {checkpoint}"
    )]
    TooFewWorkers {
        /// Who was lost and why ("worker rank 1 (pid …): reason", joined by "; ").
        lost: String,
        left: usize,
        min: usize,
        epoch: u64,
        step: u64,
        checkpoint: LastCheckpoint,
    },

    /// A worker reported that its run failed.
    #[error("worker rank {rank} ({worker}) failed at epoch {epoch}, step {step}: {error}; {checkpoint}")]
    WorkerFailed {
        rank: usize,
        worker: String,
        epoch: u64,
        step: u64,
        error: String,
        /// The job or its input is wrong, as opposed to a runtime failure.
        bad_input: bool,
        checkpoint: LastCheckpoint,
    },

    /// Ranks finished with different parameters: data parallelism is broken.
    #[error("worker rank {rank} ended with parameters {theirs:016x}, rank 0 with {ours:016x}: ranks diverged")]
    ParamsDiffer { rank: usize, ours: u64, theirs: u64 },

    /// Ranks of one parallel k-fold group finished with different parameters.
    #[error(
        "worker rank {rank} ended with parameters {theirs:016x}, rank {first_rank} of the same fold \
         group {group} with {ours:016x}: ranks diverged"
    )]
    GroupParamsDiffer {
        group: usize,
        rank: usize,
        first_rank: usize,
        ours: u64,
        theirs: u64,
    },

    /// The shutdown signal arrived before the job ended.
    #[error("coordinator shut down before the job ended (epoch {epoch}); {checkpoint}")]
    Shutdown { epoch: u64, checkpoint: LastCheckpoint },
}

impl CoordinatorError {
    /// True when the job or its input is wrong (exit code 2 in the CLI).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CoordinatorError::WorkerFailed { bad_input: true, .. } | CoordinatorError::Config { .. }
        )
    }
}

/// Crate-wide result alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
