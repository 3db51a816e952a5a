//! The one error type of this crate.

use ringtrain_train::TrainError;

/// What can stop a worker, with the rank and the peer or coordinator involved.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Joining the ring failed (bad peer list, a peer that never came up).
    #[error("rank {rank}: cannot join the ring of {world} workers: {source}")]
    Ring {
        rank: usize,
        world: usize,
        #[source]
        source: Box<ringtrain_collective::Error>,
    },

    /// The coordinator could not be reached, refused us, or answered nonsense.
    #[error("coordinator {addr}: {what}: {reason}")]
    Coordinator {
        addr: String,
        what: &'static str,
        reason: String,
    },

    /// The job the coordinator sent cannot run here (bad TOML, missing data file).
    #[error("rank {rank}: bad job {path}: {reason}")]
    Job { rank: usize, path: String, reason: String },

    /// Training stopped on this rank.
    #[error("rank {rank}: {source}")]
    Train {
        rank: usize,
        #[source]
        source: Box<TrainError>,
    },

    /// The worker could not set itself up (runtime, listener).
    #[error("worker setup: {reason}")]
    Setup { reason: String },
}

impl WorkerError {
    /// True when the job or its input is wrong rather than the run.
    pub fn is_bad_input(&self) -> bool {
        match self {
            WorkerError::Job { .. } => true,
            WorkerError::Train { source, .. } => {
                matches!(
                    **source,
                    TrainError::Data(_) | TrainError::Job { .. } | TrainError::Model(_)
                )
            }
            _ => false,
        }
    }
}

/// Crate-wide result alias.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
