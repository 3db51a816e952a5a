//! [`RingSync`]: the engine's gradient synchronisation over the gRPC ring.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtrain_collective::{from_bf16, to_bf16, CancelToken, Communicator, GrpcConfig, ReduceOp};
use ringtrain_train::{BucketedBackward, GradSync, SyncError};

use crate::error::{Result, WorkerError};
use crate::membership::Membership;

/// Time and traffic spent in collectives, shared with whoever reports it (heartbeats,
/// epoch reports) while training runs.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SyncStats {
    /// Seconds spent inside gradient all-reduces, waiting for peers included (on the
    /// communication thread when they overlap backward).
    pub allreduce_secs: f64,
    /// Of those, the seconds training waited for them after backward had finished: what
    /// overlap did not hide.
    pub allreduce_exposed_secs: f64,
    /// Gradient all-reduces done.
    pub allreduces: u64,
    /// Bytes fed into gradient all-reduces as they travel (this rank's buffer size, halved
    /// with bf16 compression, times the count).
    pub allreduce_bytes: u64,
    /// Seconds spent in the other collectives (metric sums, broadcast, final check).
    pub other_secs: f64,
    /// Gradient bytes this rank sent (all-reduces and sparse row exchanges).
    pub grad_wire_bytes: u64,
}

/// [`GradSync`] over a ring of workers. Every method blocks until the collective is done on
/// this rank (bounded by the ring's receive timeout).
#[derive(Debug)]
pub struct RingSync {
    /// The ring in use (`None` only between two rings of an elastic job).
    comm: Option<Communicator>,
    rank: usize,
    world: usize,
    stats: Arc<Mutex<SyncStats>>,
    checksum: Option<u64>,
    /// bf16 compression: per gradient bucket, what rounding took from this rank's
    /// gradient, added back next step (error feedback). `None`: gradients travel as f32.
    residual: Option<Vec<Vec<f32>>>,
    /// Reduce buckets on a communication thread while backward runs.
    overlap: bool,
    /// Elastic training: how to move to the next ring.
    elastic: Option<Elastic>,
}

/// What moving an elastic job's worker from ring to ring takes.
#[derive(Debug)]
pub struct Elastic {
    /// Where the heartbeat task puts the coordinator's new rings.
    pub membership: Arc<Membership>,
    /// The current ring's settings (rank, peers and generation change with each ring).
    pub config: GrpcConfig,
    /// The collective listener, served by every ring in turn.
    pub listener: std::net::TcpListener,
    pub io_threads: usize,
    /// How long a rank whose collective failed waits for the coordinator's new ring: a
    /// lost peer is declared lost within the heartbeat timeout.
    pub wait: Duration,
    /// The ring rank that writes the run directory.
    pub writer: usize,
    /// This worker joins a running job (it has no training state until it meets a ring;
    /// the engine keeps track of that).
    pub joining: bool,
}

impl RingSync {
    /// Joins the ring `config` describes, serving on `listener` (already bound; its address
    /// is `config.peers[config.rank]`). Blocks until every rank is up, at most
    /// `config.connect_timeout`. `stop` stops its collectives from another thread (the job
    /// was aborted elsewhere, or the coordinator was lost): the one in flight fails within a
    /// quarter of the ring's timeout, and so does every later one.
    pub fn connect(
        config: &GrpcConfig,
        listener: std::net::TcpListener,
        io_threads: usize,
        stop: CancelToken,
    ) -> Result<RingSync> {
        let comm = Communicator::connect_cancellable(config, listener, io_threads, stop).map_err(|source| {
            WorkerError::Ring {
                rank: config.rank,
                world: config.peers.len(),
                source: Box::new(source),
            }
        })?;
        Ok(RingSync::on(comm, None))
    }

    /// A sync on a connected ring: f32 gradients, overlapped with backward.
    fn on(comm: Communicator, elastic: Option<Elastic>) -> RingSync {
        RingSync {
            rank: comm.rank(),
            world: comm.world(),
            comm: Some(comm),
            stats: Arc::default(),
            checksum: None,
            residual: None,
            overlap: true,
            elastic,
        }
    }

    /// Joins the first ring of an elastic job (`elastic.config`), or, when the membership
    /// changes again before that ring is up, the newest one.
    pub fn connect_elastic(mut elastic: Elastic) -> Result<RingSync> {
        let listener = |e: &Elastic| {
            e.listener.try_clone().map_err(|err| WorkerError::Setup {
                reason: format!("cannot use the collective listener: {err}"),
            })
        };
        let mut token = elastic.membership.current();
        loop {
            let config = &elastic.config;
            match Communicator::connect_cancellable(config, listener(&elastic)?, elastic.io_threads, token) {
                Ok(comm) => {
                    elastic
                        .membership
                        .joined(config.generation, elastic.writer == config.rank);
                    return Ok(RingSync::on(comm, Some(elastic)));
                }
                Err(source) => {
                    let failed = WorkerError::Ring {
                        rank: config.rank,
                        world: config.peers.len(),
                        source: Box::new(source),
                    };
                    // A member of this ring may be gone: the coordinator then announces the
                    // next one within its heartbeat timeout.
                    let Some((next, fresh)) = elastic.membership.next_after(config.generation, elastic.wait) else {
                        return Err(failed);
                    };
                    elastic.enter(next);
                    token = fresh;
                }
            }
        }
    }

    /// Sends gradient buckets as bfloat16 (half the bytes) with error feedback: each rank
    /// rounds its gradient plus the residual its last rounding left, and keeps the new
    /// residual, per bucket. The all-reduce still gives every rank the same bits. Sparse
    /// embedding rows, and tables that go dense, travel as f32.
    pub fn with_bf16_compression(mut self) -> RingSync {
        self.residual = Some(Vec::new());
        self
    }

    /// Reduces the gradient buckets only after backward (`false`), or while it runs
    /// (`true`, the default). The result has the same bits either way.
    pub fn with_overlap(mut self, overlap: bool) -> RingSync {
        self.overlap = overlap;
        self
    }

    /// Collective time so far; the handle stays valid while training runs.
    pub fn stats(&self) -> Arc<Mutex<SyncStats>> {
        self.stats.clone()
    }

    /// Checksum of the final parameters ([`param_checksum`]), once the job has finished and
    /// every rank was found to agree.
    pub fn final_checksum(&self) -> Option<u64> {
        self.checksum
    }

    fn comm(&mut self) -> Result<&mut Communicator, SyncError> {
        self.comm
            .as_mut()
            .ok_or_else(|| SyncError(format!("rank {}: no ring (re-forming it failed)", self.rank)))
    }

    fn timed<T>(
        &mut self,
        grad_bytes: Option<u64>,
        f: impl FnOnce(&mut Communicator) -> ringtrain_collective::Result<T>,
    ) -> Result<T, SyncError> {
        let started = Instant::now();
        let out = f(self.comm()?).map_err(|e| SyncError(e.to_string()));
        let secs = started.elapsed().as_secs_f64();
        if let Ok(mut s) = self.stats.lock() {
            if let Some(bytes) = grad_bytes {
                s.allreduce_secs += secs;
                s.allreduce_exposed_secs += secs;
                s.allreduces += 1;
                s.allreduce_bytes += bytes;
                s.grad_wire_bytes += self.ring_share(bytes);
            } else {
                s.other_secs += secs;
            }
        }
        out
    }

    /// What a ring all-reduce of `bytes` makes this rank send: 2(N-1)/N of it.
    fn ring_share(&self, bytes: u64) -> u64 {
        let n = self.world as u64;
        2 * (n - 1) * bytes / n.max(1)
    }

    /// Bytes a gradient of `values` values puts on the wire.
    fn wire_bytes(&self, values: usize) -> u64 {
        let per_value = if self.residual.is_some() { 2 } else { 4 };
        (values * per_value) as u64
    }
}

/// The error-feedback residual of bucket `id`, when compressing.
fn residual_of(residual: &mut Option<Vec<Vec<f32>>>, id: usize) -> Option<&mut Vec<f32>> {
    let all = residual.as_mut()?;
    if all.len() <= id {
        all.resize_with(id + 1, Vec::new);
    }
    Some(&mut all[id])
}

/// Mean all-reduce of one gradient bucket; through bf16 with error feedback when given a
/// residual (the rank's gradient plus its last rounding error is rounded, and what this
/// rounding leaves becomes the new residual).
fn reduce_bucket(
    comm: &mut Communicator,
    buf: &mut [f32],
    residual: Option<&mut Vec<f32>>,
) -> ringtrain_collective::Result<()> {
    let Some(residual) = residual else {
        return comm.all_reduce_mean(buf);
    };
    if residual.len() != buf.len() {
        *residual = vec![0.0; buf.len()];
    }
    for (g, e) in buf.iter_mut().zip(residual.iter_mut()) {
        let wanted = *g + *e;
        let sent = from_bf16(to_bf16(wanted));
        *e = wanted - sent;
        *g = sent;
    }
    comm.all_reduce(buf, ReduceOp::MeanBf16)
}

impl GradSync for RingSync {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn elastic(&self) -> bool {
        self.elastic.is_some()
    }

    fn joining(&self) -> bool {
        self.elastic.as_ref().is_some_and(|e| e.joining)
    }

    fn writes(&self) -> bool {
        self.elastic.as_ref().is_none_or(|e| e.writer == self.rank)
    }

    /// Waits for the coordinator's next ring, leaves the current one and joins it. A ring
    /// that cannot be joined because the membership changed again meanwhile gives way to the
    /// newest.
    fn reform(&mut self) -> Result<bool, SyncError> {
        let Some(elastic) = self.elastic.as_mut() else {
            return Ok(false);
        };
        let deadline = Instant::now() + elastic.wait;
        let mut failed = None;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let Some((next, token)) = elastic.membership.next_after(elastic.config.generation, wait) else {
                // Stopped (dropped from the job, aborted, the coordinator lost): say why, not
                // how the collective in flight happened to fail.
                if let Some(why) = elastic.membership.stopped() {
                    return Err(SyncError(why));
                }
                return failed.map_or(Ok(false), Err);
            };
            // Leave the old ring first: its server must let go of the listener.
            self.comm = None;
            elastic.enter(next);
            let listener = elastic
                .listener
                .try_clone()
                .map_err(|e| SyncError(format!("cannot use the collective listener: {e}")))?;
            match Communicator::connect_cancellable(&elastic.config, listener, elastic.io_threads, token) {
                Ok(comm) => {
                    (self.rank, self.world) = (comm.rank(), comm.world());
                    self.comm = Some(comm);
                    elastic
                        .membership
                        .joined(elastic.config.generation, elastic.writer == self.rank);
                    return Ok(true);
                }
                Err(e) => {
                    // Only a newer ring can help now (a member of this one may be gone: the
                    // coordinator announces the next within its heartbeat timeout).
                    failed = Some(SyncError(format!(
                        "rank {} could not join ring generation {}: {e}",
                        elastic.config.rank, elastic.config.generation
                    )));
                }
            }
        }
    }

    /// Always in f32: the engine sends its buckets through [`GradSync::reduce_buckets`], and
    /// what comes here whole (an embedding table that went dense this step) has no bucket
    /// whose residual could carry its rounding to the next step.
    fn all_reduce_mean(&mut self, grads: &mut [f32]) -> Result<(), SyncError> {
        let bytes = std::mem::size_of_val(grads) as u64;
        self.timed(Some(bytes), |c| c.all_reduce_mean(grads))
    }

    /// With overlap, a communication thread reduces each bucket the moment backward hands
    /// it over, one after another in bucket order (the same order on every rank), while
    /// backward computes the rest; without, the same reductions run after backward. Each
    /// bucket is its own all-reduce either way, so the bits are the same.
    fn reduce_buckets(&mut self, backward: &mut BucketedBackward<'_>) -> Result<Vec<Vec<f32>>, SyncError> {
        let comm = self
            .comm
            .as_mut()
            .ok_or_else(|| SyncError(format!("rank {}: no ring (re-forming it failed)", self.rank)))?;
        let residual = &mut self.residual;
        let reduce_all = |comm: &mut Communicator,
                          residual: &mut Option<Vec<Vec<f32>>>,
                          buckets: &mut dyn Iterator<Item = Vec<f32>>| {
            let (mut out, mut busy) = (Vec::new(), 0.0);
            for (id, mut b) in buckets.enumerate() {
                let started = Instant::now();
                let done = reduce_bucket(comm, &mut b, residual_of(residual, id));
                busy += started.elapsed().as_secs_f64();
                if let Err(e) = done {
                    return (Err(SyncError(e.to_string())), busy);
                }
                out.push(b);
            }
            (Ok(out), busy)
        };
        let (reduced, busy, backward_done) = if self.overlap {
            let (tx, rx) = std::sync::mpsc::channel::<Vec<f32>>();
            std::thread::scope(|s| {
                let worker = s.spawn(move || reduce_all(comm, residual, &mut rx.into_iter()));
                // A failed reduction drops the receiver; backward then runs to its end.
                backward(&mut |b| {
                    let _ = tx.send(b);
                });
                drop(tx);
                let backward_done = Instant::now();
                let (reduced, busy) = worker
                    .join()
                    .unwrap_or_else(|_| (Err(SyncError("the communication thread panicked".into())), 0.0));
                (reduced, busy, backward_done)
            })
        } else {
            let mut buckets = Vec::new();
            backward(&mut |b| buckets.push(b));
            let backward_done = Instant::now();
            let (reduced, busy) = reduce_all(comm, residual, &mut buckets.into_iter());
            (reduced, busy, backward_done)
        };
        let exposed = backward_done.elapsed().as_secs_f64();
        let values = reduced.as_ref().map_or(0, |r| r.iter().map(Vec::len).sum());
        let bytes = self.wire_bytes(values);
        let sent = self.ring_share(bytes);
        if let Ok(mut s) = self.stats.lock() {
            s.allreduce_secs += busy;
            s.allreduce_exposed_secs += exposed;
            s.allreduces += 1;
            s.allreduce_bytes += bytes;
            s.grad_wire_bytes += sent;
        }
        reduced
    }

    /// The ring all-gather: each rank forwards every buffer but its right neighbour's.
    fn all_gather_f32(&mut self, values: &[f32], lens: &[usize], layout: u64) -> Result<Vec<Vec<f32>>, SyncError> {
        let (rank, world) = (self.rank, self.world);
        let started = Instant::now();
        let out = self
            .comm()?
            .all_gather_f32(values, lens, layout)
            .map_err(|e| SyncError(e.to_string()));
        let secs = started.elapsed().as_secs_f64();
        let sent: usize = (0..lens.len())
            .filter(|&o| world > 1 && o != (rank + 1) % world)
            .map(|o| lens[o] * 4)
            .sum();
        if let Ok(mut s) = self.stats.lock() {
            s.allreduce_secs += secs;
            s.allreduce_exposed_secs += secs;
            s.grad_wire_bytes += sent as u64;
        }
        out
    }

    /// All-gathers the values and adds them in rank order, so every rank computes the same
    /// floating-point sum.
    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<(), SyncError> {
        let rank = self.rank;
        let gathered = self.timed(None, |c| c.all_gather_f64(values))?;
        for (r, v) in gathered.iter().enumerate() {
            if v.len() != values.len() {
                return Err(SyncError(format!(
                    "rank {rank}: rank {r} summed {} metric values, this rank {}",
                    v.len(),
                    values.len()
                )));
            }
        }
        for (i, out) in values.iter_mut().enumerate() {
            *out = gathered.iter().fold(0.0, |acc, v| acc + v[i]);
        }
        Ok(())
    }

    /// Called as a model starts training (each fold of a k-fold run): the residual of the
    /// last model's rounding does not belong to the new one.
    fn broadcast_params(&mut self, params: &mut [f32]) -> Result<(), SyncError> {
        if let Some(residual) = &mut self.residual {
            residual.clear();
        }
        self.timed(None, |c| c.broadcast(params, 0))
    }

    fn broadcast_from(&mut self, values: &mut [f32], root: usize) -> Result<(), SyncError> {
        self.timed(None, |c| c.broadcast(values, root))
    }

    /// Gathers every rank's [`param_checksum`] and fails unless all are equal.
    fn finish(&mut self, params: &[f32]) -> Result<(), SyncError> {
        let rank = self.rank;
        let mine = param_checksum(params);
        // Two exact 32-bit halves: every u32 is representable as an f64.
        let halves = [(mine >> 32) as f64, (mine & 0xffff_ffff) as f64];
        let gathered = self.timed(None, |c| c.all_gather_f64(&halves))?;
        for (r, h) in gathered.iter().enumerate() {
            let theirs = match h.as_slice() {
                [hi, lo] => ((*hi as u64) << 32) | (*lo as u64),
                _ => return Err(SyncError(format!("rank {rank}: rank {r} sent a malformed checksum"))),
            };
            if theirs != mine {
                return Err(SyncError(format!(
                    "rank {rank}: final parameters differ from rank {r}'s (checksum {mine:016x} vs {theirs:016x})"
                )));
            }
        }
        self.checksum = Some(mine);
        Ok(())
    }
}

impl Elastic {
    /// Takes the settings of ring `next` (the job's collective id stays).
    fn enter(&mut self, next: ringtrain_proto::coordinator::Reform) {
        self.config.rank = next.ring_rank;
        self.config.peers = next.peers;
        self.config.generation = next.generation;
        self.writer = next.writer_rank;
    }
}

/// FNV-1a (64 bit) over the parameters' bit patterns: equal exactly when the bits are equal
/// (up to hash collisions), and cheap next to a training step.
pub fn param_checksum(params: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in params {
        for b in p.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_every_bit() {
        let a = [1.0f32, -0.0, 3.5];
        let mut b = a;
        assert_eq!(param_checksum(&a), param_checksum(&b));
        b[1] = 0.0; // -0.0 and 0.0 compare equal but differ in bits
        assert_ne!(param_checksum(&a), param_checksum(&b));
    }
}
