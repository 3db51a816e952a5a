//! The one error type of this crate.

use std::time::Duration;

use ringtrain_proto::collective::CollectiveOp;

/// Which way a failed link pointed, seen from the rank reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Receiving from the left neighbour (rank − 1).
    FromLeft,
    /// Sending to the right neighbour (rank + 1).
    ToRight,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::FromLeft => "left neighbour",
            Direction::ToRight => "right neighbour",
        })
    }
}

/// What went wrong on a link, as reported by a [`crate::Transport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFailure {
    /// Nothing arrived from the left neighbour within the receive timeout.
    Timeout(Duration),
    /// The link broke or was closed (peer exited, connection reset, stream ended).
    Closed(String),
    /// The peer refused us (wrong or missing job token, not its left neighbour).
    Refused(String),
}

/// A failure of one link of the ring, before the collective adds its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkError {
    /// Rank at the other end of the link.
    pub peer: usize,
    pub direction: Direction,
    pub failure: LinkFailure,
}

/// Errors of the collective layer. Every variant says which rank saw it and,
/// where one is involved, which peer; collective failures also carry the op and
/// the collective sequence number.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The caller asked for something impossible (bad root, buffer that does
    /// not match its bucket plan, too large an all-gather...).
    #[error("{op} on rank {rank}: invalid argument: {what}")]
    InvalidArgument {
        op: CollectiveOp,
        rank: usize,
        what: String,
    },

    /// The communicator cannot be built from this configuration.
    #[error("invalid collective configuration: {what}")]
    Config { what: String },

    /// A silent neighbour: nothing arrived within the receive timeout.
    #[error(
        "{op} seq {seq} on rank {rank}: no frame from rank {peer} ({addr}), its left neighbour, \
         within {timeout:?}; rank {peer} is dead, stalled or not in this collective"
    )]
    Timeout {
        op: CollectiveOp,
        rank: usize,
        seq: u64,
        peer: usize,
        addr: String,
        timeout: Duration,
    },

    /// A broken link: the neighbour disconnected, reset the connection or
    /// closed its stream.
    #[error("{op} seq {seq} on rank {rank}: link to rank {peer} ({addr}), its {direction}, failed: {reason}")]
    PeerLost {
        op: CollectiveOp,
        rank: usize,
        seq: u64,
        peer: usize,
        addr: String,
        direction: Direction,
        reason: String,
    },

    /// The right neighbour refused our stream (token, job or ring order).
    #[error("rank {rank}: rank {peer} ({addr}) refused the connection: {reason}")]
    Refused {
        rank: usize,
        peer: usize,
        addr: String,
        reason: String,
    },

    /// A frame from the left neighbour disagrees with this rank about the
    /// collective: different job, skipped step, different buffer layout...
    #[error(
        "{op} seq {seq} bucket {bucket} on rank {rank}: frame from rank {peer} has {field} = {theirs} \
         but rank {rank} expects {ours} ({hint})"
    )]
    Mismatch {
        op: CollectiveOp,
        rank: usize,
        seq: u64,
        bucket: u32,
        peer: usize,
        field: &'static str,
        ours: String,
        theirs: String,
        hint: &'static str,
    },

    /// Another rank failed this collective and told the ring.
    #[error("{op} seq {seq} on rank {rank}: aborted because rank {origin} failed: {reason}")]
    Aborted {
        op: CollectiveOp,
        rank: usize,
        seq: u64,
        origin: usize,
        reason: String,
    },

    /// The owner stopped the collective through its [`crate::CancelToken`] (e.g. the
    /// coordinator ended the job, or was lost).
    #[error("{op} seq {seq} on rank {rank}: stopped: {reason}")]
    Cancelled {
        op: CollectiveOp,
        rank: usize,
        seq: u64,
        reason: String,
    },

    /// An earlier collective failed; the ring must be rebuilt.
    #[error("rank {rank}: communicator unusable after an earlier failure: {first}")]
    Poisoned { rank: usize, first: String },
}

/// Crate-wide result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
