//! `ringtrain-worker`: the data plane of a distributed job.
//!
//! * [`RingSync`] implements the training engine's [`ringtrain_train::GradSync`] seam with
//!   the gRPC ring of `ringtrain-collective`: gradients are averaged with the ring
//!   all-reduce, metric sums are all-gathered and added in rank order, initial parameters
//!   are broadcast from rank 0, and at the end every rank's final parameters are compared by
//!   checksum. It also times its collectives ([`SyncStats`]).
//! * [`run_worker`] is one worker's life: connect to the coordinator (retrying until a
//!   deadline), register, receive rank, ring order and job, join the ring, train with
//!   heartbeats streaming (epoch, step, last checkpoint), report every epoch (the writer
//!   rank) and the final result (parameter checksum or error). When the coordinator says
//!   stop, or is lost, the next collective fails and training ends.
//!
//! **Architecture invariant:** every rank ends every step with bitwise-identical parameters.
//! The ring all-reduce gives every rank the same bits; metric sums are added in the same
//! (rank) order everywhere; [`RingSync`]'s `finish` checks it. No printing, no environment
//! reads, no process exit: the binary does those.

mod error;
mod membership;
mod sync;
mod worker;

pub use error::{Result, WorkerError};
pub use membership::Membership;
pub use sync::{param_checksum, Elastic, RingSync, SyncStats};
pub use worker::{run_worker, WorkerEvent, WorkerOptions, WorkerReport};
