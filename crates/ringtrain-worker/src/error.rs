//! The one error type of this crate.

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
}

/// Crate-wide result alias.
pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
