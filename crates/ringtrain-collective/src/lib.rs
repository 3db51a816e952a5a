//! Collectives for data-parallel training: ring all-reduce, broadcast,
//! barrier and all-gather over `&mut [f32]`, through a [`Transport`]: the
//! gRPC one ([`grpc`], tonic over TCP) for real jobs, [`MemoryTransport`] for
//! tests.
//!
//! **Architecture invariant:** this crate never sees a tensor, a model or a
//! config. It reduces flat `f32` buffers; given the same inputs and ring order,
//! every rank ends with bitwise-identical output, run after run.
//!
//! # The ring
//!
//! `N` ranks form a ring in the order of the peer list. Rank `r` hosts a gRPC
//! server that receives from its left neighbour `r-1` and streams to its right
//! neighbour `r+1`, on one long-lived client stream per link:
//!
//! ```text
//!        Push stream           Push stream           Push stream
//!  rank 0 ──────────▶ rank 1 ──────────▶ rank 2 ──────────▶ rank 3
//!    ▲                                                         │
//!    └─────────────────────────────────────────────────────────┘
//! ```
//!
//! # All-reduce = reduce-scatter + all-gather
//!
//! A bucket of `L` elements is cut into `N` chunks whose sizes differ by at
//! most one (larger first). With `L < N` the last `N - L` chunks are empty;
//! with `L = 0` all are. In `2(N-1)` steps each rank sends `2(N-1)/N` of the
//! buffer:
//!
//! ```text
//!  N = 3, chunks a b c. What each rank sends to rank+1 at each step;
//!  "a:01" = rank 0's values of chunk a plus rank 1's, "+r" = plus rank r's own.
//!
//!           reduce-scatter                all-gather
//!           step 0   step 1               step 2               step 3
//!  rank 0   a:0      c:2 +0 = c:20        b:12 +0 = b:120      a:012 (copy)
//!  rank 1   b:1      a:0 +1 = a:01        c:20 +1 = c:201      b:120 (copy)
//!  rank 2   c:2      b:1 +2 = b:12        a:01 +2 = a:012      c:201 (copy)
//!                                         └ final values ┘
//! ```
//!
//! * Reduce-scatter step `s`: rank `r` sends chunk `r-s` and receives chunk
//!   `r-s-1`, adding its own values. After `N-1` steps rank `r` holds the final
//!   value of chunk `r+1`: the sum `((x_c + x_{c+1}) + x_{c+2}) + …` of chunk
//!   `c` is computed by exactly one rank, in ring order starting at rank `c`.
//!   For a mean that rank also divides by `N`.
//! * All-gather step `t`: rank `r` sends chunk `r+1-t` and receives chunk
//!   `r-t`, copying it. Final values are only ever copied, so **every rank gets
//!   the same bits**, and the same inputs in the same ring order give the same
//!   bits in every run.
//!
//! # Compression
//!
//! [`ReduceOp::MeanBf16`] sends every value as bfloat16 (2 bytes instead of
//! 4, rounded to nearest even, sums still formed in f32): each rank's input
//! and each forwarded partial sum is rounded once when it leaves, and the
//! rank that finishes a chunk keeps the rounded mean itself, so the all-gather
//! still copies identical bits to every rank. Error feedback (carrying each
//! rank's own rounding into its next step) is the caller's, which owns the
//! gradient across steps.
//!
//! # Pipelining
//!
//! Each chunk travels as `parts` messages of at most `part_bytes` (the same
//! count for every chunk, at least one: an empty part still carries the header,
//! so even an empty buffer is checked and synchronised). The chunk a rank
//! sends at step `s+1` is the one it received at step `s`, so part `k` of step
//! `s+1` leaves as soon as part `k` of step `s` has arrived and been added: the
//! reduction of one part overlaps the transfer of the next, and the link never
//! waits for a whole chunk. Sends never block (the transport queues them);
//! only receives wait, each with a deadline. Outgoing buffers come from a
//! small pool and are reused; all-gather forwards the received bytes without
//! copying them.
//!
//! Buckets ([`BucketPlan`]) group whole parameter tensors up to a configurable
//! size and are reduced one after another, in the same order on every rank.
//!
//! # Safety of the wire and failure semantics
//!
//! Every frame carries the job id, the collective sequence number, the bucket
//! id, the layout fingerprint, the bucket length, the sender's rank, step and
//! part. The receiver compares each with its own expectation; any difference
//! fails the collective with [`Error::Mismatch`] naming the peer, the field and
//! both values. Streams are authenticated by a shared job token (metadata
//! checked by an interceptor before any frame is read); a stream without it is
//! refused.
//!
//! * A silent neighbour: every receive has a deadline ([`RingOptions::timeout`],
//!   5 s by default); when it passes without any frame from the left
//!   neighbour, [`Error::Timeout`] names it. A rank that has waited a quarter
//!   of the timeout tells its right neighbour it is alive but waiting (a
//!   `Waiting` frame, repeated every quarter timeout), so when one rank hangs only the rank
//!   after it times out; the others receive its abort, which names the hung
//!   rank, instead of each blaming its own live neighbour. A wait is capped
//!   at `world × timeout`.
//! * A dead neighbour: a reset connection or closed stream is reported at once,
//!   by the rank on either side of the link ([`Error::PeerLost`]).
//! * The first rank to fail sends an `Abort` frame to its right neighbour;
//!   each rank that receives it fails with [`Error::Aborted`] (naming the rank
//!   that failed and why) and passes it on, so the whole ring fails within
//!   about one hop per rank instead of waiting for timeouts. A rank whose
//!   right link closes waits up to a second for that abort before reporting
//!   its own lost neighbour: when rank r dies, rank r − 1 fails and exits, and
//!   rank r − 2 would otherwise blame r − 1 instead of r.
//! * The owner can stop a rank from another thread with its [`CancelToken`]
//!   (the worker does when the coordinator ends the job or is lost): the
//!   collective in flight fails within a quarter of the timeout and its abort
//!   goes round the ring like any other failure.
//! * A failed collective poisons the communicator: every later call returns
//!   [`Error::Poisoned`]. Recovery (rebuilding the ring) belongs to the
//!   coordinator.
//! * A rank that finishes and shuts down first must not strand a neighbour
//!   still finishing the same collective: [`Ring::close`] (and dropping a
//!   [`Communicator`]) delivers the frames still queued before closing, and a
//!   cleanly closed link to the right only fails the next send, not a receive.
//!
//! # Using it
//!
//! * Blocking, for a training loop: [`Communicator::connect`] with a
//!   [`GrpcConfig`] (rank, peer addresses in ring order, job id, token,
//!   timeouts) and an already-bound `std::net::TcpListener`; then
//!   `all_reduce_mean`, `all_reduce` (with [`ReduceOp::MeanBf16`] for
//!   compressed gradients), `all_reduce_bucketed`, `broadcast`, `barrier`,
//!   `all_gather_f64` (metrics) and `all_gather_f32` (buffers of agreed
//!   lengths: sparse gradient rows). It owns a small tokio runtime; do not
//!   call it from inside another runtime, but it may be used from another
//!   thread than the one that made it (the worker reduces gradient buckets on
//!   a communication thread while backward runs).
//! * Async: [`connect_ring`] returns a [`Ring`] over a [`GrpcTransport`];
//!   [`Ring::new`] over a [`MemoryTransport`] for tests.
//!
//! # Where the time goes
//!
//! On one machine every byte a rank sends is copied by the reduction kernel
//! (or forwarded without copy in the all-gather), by prost into tonic's encode
//! buffer, by the kernel into the socket, by the kernel out of it, and by tonic
//! into its decode buffer; the payload is then read once more by the add or
//! copy into the caller's buffer. Buffers are reused (a pool for outgoing
//! parts, frame-sized codec buffers), so a steady-state all-reduce allocates
//! almost nothing; what remains is memory bandwidth and scheduling.

mod communicator;
mod error;
pub mod grpc;
mod kernels;
mod layout;
mod ring;
mod transport;

pub use communicator::Communicator;
pub use error::{Direction, Error, LinkError, LinkFailure, Result};
pub use grpc::{connect_ring, connect_ring_cancellable, GrpcConfig, GrpcTransport};
pub use kernels::{from_bf16, to_bf16};
pub use layout::BucketPlan;
pub use ring::{CancelToken, ReduceOp, Ring, RingOptions, DEFAULT_PART_BYTES, DEFAULT_TIMEOUT};
pub use ringtrain_proto::collective::CollectiveOp;
pub(crate) use ringtrain_proto::grpc::error_chain;
pub use ringtrain_proto::tls::{Tls, TlsError, TLS_NAME};
pub use transport::{MemoryTransport, Transport};

/// Deterministic inputs for checking a collective end to end (`ringtrain collective --check`
/// and the tests): rank `rank`'s `len` values, xorshift64* draws of 24 bits scaled to ±100,
/// which every rank can compute for every other rank to know the expected result.
pub fn check_inputs(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut s = seed ^ (rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            (v as f32 / (1u32 << 23) as f32 - 1.0) * 100.0
        })
        .collect()
}
