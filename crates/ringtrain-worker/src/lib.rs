//! `ringtrain-worker`: the data plane of a distributed job.
//!
//! [`RingSync`] implements the training engine's [`ringtrain_train::GradSync`] seam with the
//! gRPC ring of `ringtrain-collective`: gradients are averaged with the ring all-reduce,
//! metric sums are all-gathered and added in rank order, initial parameters are broadcast
//! from rank 0, and at the end every rank's final parameters are compared by checksum.
//!
//! **Architecture invariant:** every rank ends every step with bitwise-identical parameters.
//! The ring all-reduce gives every rank the same bits; metric sums are added in the same
//! (rank) order everywhere; [`RingSync::finish`](ringtrain_train::GradSync::finish) checks it.
//! No printing, no environment reads, no process exit.

mod error;
mod sync;

pub use error::{Result, WorkerError};
pub use sync::{param_checksum, AbortHandle, RingSync, SyncStats};
