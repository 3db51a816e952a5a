//! The ring algorithms over any [`Transport`]; see the crate docs for the
//! schedule and its failure semantics.

mod collectives;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ringtrain_proto::collective::{Abort, CollectiveOp, DataFrame, DataHeader, Frame, Waiting};

use crate::error::{Direction, Error, LinkError, LinkFailure, Result};
use crate::layout::{plain_fingerprint, BucketPlan};
use crate::transport::Transport;

/// How long a rank whose right link closed waits for an abort from its left
/// naming the rank that failed first (see `Ring::finish`).
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Reduction applied by an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise sum divided by the world size (by the one rank that owns
    /// each chunk, so every rank still gets the same bits).
    Mean,
    /// [`ReduceOp::Mean`] with the values travelling as bfloat16: half the
    /// bytes. Sums are formed in f32 and rounded to bf16 at every hop, and the
    /// result holds bf16 values, the same bits on every rank.
    MeanBf16,
}

impl ReduceOp {
    fn collective(self) -> CollectiveOp {
        match self {
            ReduceOp::Sum => CollectiveOp::AllReduceSum,
            ReduceOp::Mean => CollectiveOp::AllReduceMean,
            ReduceOp::MeanBf16 => CollectiveOp::AllReduceMeanBf16,
        }
    }
}

/// Default size of one pipelined message.
pub const DEFAULT_PART_BYTES: usize = 512 * 1024;
/// Default receive timeout: how long a rank waits for the next frame from its
/// left neighbour before declaring it dead.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings every rank of a ring must agree on (the job id and the part size
/// are checked on every frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingOptions {
    /// Job id carried by every frame.
    pub job_id: String,
    /// Membership generation carried by every frame (elastic training re-forms the ring
    /// under a new one).
    pub generation: u64,
    /// Payload bytes per pipelined message (rounded down to whole values).
    pub part_bytes: usize,
    /// Deadline of every receive.
    pub timeout: Duration,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            job_id: "ringtrain".to_owned(),
            generation: 0,
            part_bytes: DEFAULT_PART_BYTES,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Most send buffers kept for reuse (enough for every part of a 64 MiB
/// step in flight with the default part size).
const POOL: usize = 128;

/// What every frame of the current collective (and bucket) must agree on.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    op: CollectiveOp,
    seq: u64,
    bucket: u32,
    fingerprint: u64,
    /// Elements of the bucket; `None` where ranks may legitimately differ
    /// (all-gather of per-rank values).
    bucket_len: Option<u64>,
    parts: u32,
}

/// A frame the collective acts on (waiting notices are consumed below it).
#[derive(Debug)]
enum Received {
    Data(DataFrame),
    Abort(Abort),
}

/// Stops a rank's collectives from another thread: the one in flight fails at its next
/// wake-up (within a quarter of the receive timeout), and so does every later one, with
/// [`Error::Cancelled`] and the given reason; the abort then travels round the ring as for
/// any failure. Clones share the state.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<Mutex<Option<String>>>);

impl CancelToken {
    /// Cancels with `reason` (the first reason given is kept).
    pub fn cancel(&self, reason: impl Into<String>) {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.get_or_insert(reason.into());
    }

    /// Why it was cancelled, once it was.
    pub fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One rank's endpoint of a ring: runs collectives over a [`Transport`].
///
/// Collectives must be called in the same order, with the same layouts, on
/// every rank; each call takes the next sequence number. After any error the
/// ring is poisoned: every later call fails with [`Error::Poisoned`], and the
/// ring must be rebuilt (by the coordinator, in a full job).
#[derive(Debug)]
pub struct Ring<T: Transport> {
    transport: T,
    rank: usize,
    world: usize,
    opts: RingOptions,
    part_elems: usize,
    seq: u64,
    poisoned: Option<String>,
    pool: VecDeque<BytesMut>,
    cancel: CancelToken,
}

impl<T: Transport> Ring<T> {
    /// Wrap a connected transport.
    pub fn new(transport: T, opts: RingOptions) -> Self {
        let rank = transport.rank();
        let world = transport.world();
        let part_elems = (opts.part_bytes / 4).max(1);
        Self {
            transport,
            rank,
            world,
            opts,
            part_elems,
            seq: 0,
            poisoned: None,
            pool: VecDeque::new(),
            cancel: CancelToken::default(),
        }
    }

    /// Makes `token` (e.g. one made before the ring) the one that stops this ring.
    pub fn set_cancel_token(&mut self, token: CancelToken) {
        self.cancel = token;
    }

    /// This rank's index.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sequence number the next collective will carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Change the receive deadline (e.g. a long one for the first barrier,
    /// while peers are still starting).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.opts.timeout = timeout;
    }

    /// Current receive deadline.
    pub fn timeout(&self) -> Duration {
        self.opts.timeout
    }

    /// Deliver the frames still queued for the right neighbour and close the
    /// link; see [`Transport::close`].
    pub async fn close(&mut self) {
        if self.poisoned.is_some() {
            // After a failure only the abort is left to deliver, which takes milliseconds on
            // a live link; a dead one (a host cut off) would hold this rank for the whole
            // timeout.
            let _ = tokio::time::timeout(ABORT_GRACE.min(self.opts.timeout), self.transport.close()).await;
        } else {
            self.transport.close().await;
        }
    }

    /// The transport, e.g. to read its bound address.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Reduce `buf` over all ranks in place: afterwards every rank holds the
    /// same bits, the sum (or mean) in ring order.
    pub async fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let cop = op.collective();
        let seq = self.begin(cop)?;
        let fingerprint = plain_fingerprint(buf.len());
        let result = self.reduce_bucket(buf, cop, seq, 0, fingerprint).await;
        self.finish(cop, seq, result).await
    }

    /// All-reduce a flat buffer bucket by bucket, in the plan's order. The
    /// plan's fingerprint travels in every frame.
    pub async fn all_reduce_bucketed(&mut self, buf: &mut [f32], plan: &BucketPlan, op: ReduceOp) -> Result<()> {
        let cop = op.collective();
        let seq = self.begin(cop)?;
        let result = if buf.len() != plan.total_len() {
            Err(Error::InvalidArgument {
                op: cop,
                rank: self.rank,
                what: format!(
                    "buffer has {} elements but its bucket plan covers {}",
                    buf.len(),
                    plan.total_len()
                ),
            })
        } else {
            let mut result = Ok(());
            for (id, range) in plan.buckets().iter().enumerate() {
                let bucket = u32::try_from(id).unwrap_or(u32::MAX);
                result = self
                    .reduce_bucket(&mut buf[range.clone()], cop, seq, bucket, plan.fingerprint())
                    .await;
                if result.is_err() {
                    break;
                }
            }
            result
        };
        self.finish(cop, seq, result).await
    }

    /// Copy `root`'s buffer into every rank's `buf` (pipelined along the ring).
    /// Returns on the root once the last rank has received everything.
    pub async fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let cop = CollectiveOp::Broadcast;
        let seq = self.begin(cop)?;
        let result = self.broadcast_inner(buf, root, seq).await;
        self.finish(cop, seq, result).await
    }

    /// Return once every rank has entered the barrier.
    pub async fn barrier(&mut self) -> Result<()> {
        let cop = CollectiveOp::Barrier;
        let seq = self.begin(cop)?;
        let result = self.reduce_bucket(&mut [], cop, seq, 0, 0).await;
        self.finish(cop, seq, result).await
    }

    /// Gather every rank's buffer, whatever its length: `result[r]` is rank
    /// `r`'s `values`, and `lens[r]` its length, which every rank must know
    /// beforehand (e.g. from an [`Ring::all_gather_f64`] of the counts). Each
    /// buffer travels the ring in parts of `part_bytes`, forwarded as
    /// received, so every rank gets the same bits. For sparse gradients;
    /// `fingerprint` (e.g. of the table's name and shape) travels in every
    /// frame like a bucket plan's, so two ranks gathering different tables fail.
    pub async fn all_gather_f32(&mut self, values: &[f32], lens: &[usize], fingerprint: u64) -> Result<Vec<Vec<f32>>> {
        let cop = CollectiveOp::AllGatherF32;
        let seq = self.begin(cop)?;
        let result = self.all_gather_f32_inner(values, lens, seq, fingerprint).await;
        self.finish(cop, seq, result).await
    }

    /// Gather a few values from every rank: `result[r]` is rank `r`'s
    /// `values`. Meant for metrics; at most `part_bytes` per rank.
    pub async fn all_gather_f64(&mut self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        let cop = CollectiveOp::AllGather;
        let seq = self.begin(cop)?;
        let result = self.all_gather_inner(values, seq).await;
        self.finish(cop, seq, result).await
    }

    fn begin(&mut self, op: CollectiveOp) -> Result<u64> {
        if let Some(first) = &self.poisoned {
            return Err(Error::Poisoned {
                rank: self.rank,
                first: first.clone(),
            });
        }
        if let Some(reason) = self.cancel.reason() {
            let err = Error::Cancelled {
                op,
                rank: self.rank,
                seq: self.seq,
                reason,
            };
            // Between collectives too, the neighbours must hear why this rank stops before
            // they see its links close.
            self.fail(op, self.seq, &err);
            return Err(err);
        }
        let seq = self.seq;
        self.seq += 1;
        Ok(seq)
    }

    /// On failure: poison the ring and tell the right neighbour, so the abort
    /// travels around the ring and every rank fails fast.
    ///
    /// A lost right neighbour is often not the cause: when rank r dies, its left
    /// neighbour fails and exits too, and the rank before that may notice its
    /// own right link closing before the abort naming r has come round from
    /// the left. So after a send failure this rank waits briefly for that abort
    /// and reports it instead, naming the rank that actually failed.
    async fn finish<R>(&mut self, op: CollectiveOp, seq: u64, result: Result<R>) -> Result<R> {
        let result = match result {
            Err(Error::PeerLost {
                direction: Direction::ToRight,
                ..
            }) if self.world > 2 => {
                let lost = result.err().expect("matched an error");
                Err(self.abort_from_left(op, seq).await.unwrap_or(lost))
            }
            other => other,
        };
        if let Err(err) = &result {
            self.fail(op, seq, err);
        }
        result
    }

    /// Poisons the ring and passes the abort to the right neighbour.
    fn fail(&mut self, op: CollectiveOp, seq: u64, err: &Error) {
        self.poisoned = Some(err.to_string());
        let right = (self.rank + 1) % self.world;
        let (origin, reason) = match err {
            Error::Aborted { origin, reason, .. } => (*origin, reason.clone()),
            other => (self.rank, other.to_string()),
        };
        if self.world > 1 && origin != right {
            tracing::debug!(rank = self.rank, %op, seq, origin, "forwarding abort");
            // Best effort: the link to the right may be what failed.
            let _ = self.transport.send(Frame::Abort(Abort {
                job_id: self.opts.job_id.clone(),
                seq,
                origin_rank: u32::try_from(origin).unwrap_or(u32::MAX),
                reason,
                generation: self.opts.generation,
            }));
        }
    }

    /// An abort arriving from the left within [`ABORT_GRACE`] (capped at the
    /// timeout), as this rank's error; `None` if the left link stays quiet or fails.
    async fn abort_from_left(&mut self, op: CollectiveOp, seq: u64) -> Option<Error> {
        let grace = ABORT_GRACE.min(self.opts.timeout);
        let until = tokio::time::Instant::now() + grace;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.transport.recv(left).await {
                Ok(Frame::Abort(a)) => {
                    return Some(Error::Aborted {
                        op,
                        rank: self.rank,
                        seq,
                        origin: a.origin_rank as usize,
                        reason: a.reason,
                    })
                }
                // data or waiting notices of the collective that failed: skip
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// A pooled buffer with room for `bytes`: the oldest pooled buffer if
    /// the transport has released its last payload, else a new one. The pool
    /// keeps up to [`POOL`] buffers, so once it has grown to the number of
    /// parts in flight the hot path stops allocating (fresh pages cost far
    /// more than the copy; see peers.md).
    fn take(&mut self, bytes: usize) -> BytesMut {
        if let Some(mut buf) = self.pool.pop_front() {
            buf.clear();
            if buf.try_reclaim(bytes) {
                return buf;
            }
            // Still in flight: keep it for later, at the back of the queue.
            self.pool.push_back(buf);
        }
        BytesMut::with_capacity(bytes.max(self.part_elems * 4))
    }

    /// Freeze the filled buffer into a payload and keep the allocation.
    fn give(&mut self, mut buf: BytesMut) -> Bytes {
        let payload = buf.split().freeze();
        if self.pool.len() < POOL {
            self.pool.push_back(buf);
        }
        payload
    }

    fn send(&mut self, ctx: &Ctx, step: usize, part: usize, origin: usize, payload: Bytes) -> Result<()> {
        let value_bytes = ctx.op.value_bytes();
        let header = DataHeader {
            job_id: self.opts.job_id.clone(),
            seq: ctx.seq,
            op: ctx.op,
            bucket_id: ctx.bucket,
            layout_fingerprint: ctx.fingerprint,
            bucket_len: ctx.bucket_len.unwrap_or((payload.len() / value_bytes) as u64),
            sender_rank: self.rank as u32,
            world_size: self.world as u32,
            step: step as u32,
            part: part as u32,
            parts: ctx.parts,
            origin_rank: origin as u32,
            generation: self.opts.generation,
        };
        self.transport
            .send(Frame::Data(DataFrame { header, payload }))
            .map_err(|e| self.link_error(ctx, e))
    }

    fn link_error(&self, ctx: &Ctx, e: LinkError) -> Error {
        let addr = self.transport.peer_addr(e.peer);
        match e.failure {
            LinkFailure::Timeout(timeout) => Error::Timeout {
                op: ctx.op,
                rank: self.rank,
                seq: ctx.seq,
                peer: e.peer,
                addr,
                timeout,
            },
            LinkFailure::Closed(reason) => Error::PeerLost {
                op: ctx.op,
                rank: self.rank,
                seq: ctx.seq,
                peer: e.peer,
                addr,
                direction: e.direction,
                reason,
            },
            LinkFailure::Refused(reason) => Error::Refused {
                rank: self.rank,
                peer: e.peer,
                addr,
                reason,
            },
        }
    }

    /// The next data or abort frame from the left neighbour.
    ///
    /// The left neighbour is declared dead or hung after `timeout` without any
    /// frame from it. While waiting, this rank tells its right neighbour every
    /// `timeout / 4` that it is alive but waiting ([`Waiting`]), and treats such
    /// notices from its left as signs of life. So when one rank hangs, only
    /// its right neighbour times out (naming it) and the others keep waiting
    /// for the abort that follows, instead of all timing out together and
    /// each blaming its own live neighbour. The total wait is capped at
    /// `world × timeout`.
    async fn next_frame(&mut self, ctx: &Ctx) -> Result<Received> {
        let timeout = self.opts.timeout;
        // A quarter, not a half: a notice delayed by a loaded machine by up to
        // three quarters of the timeout still arrives before the right neighbour
        // gives up on this live rank (with half, a 2-core CI machine running the
        // whole suite occasionally let one slip).
        let slice = (timeout / 4).max(Duration::from_millis(1));
        let started = tokio::time::Instant::now();
        let cap = timeout * u32::try_from(self.world).unwrap_or(u32::MAX);
        let mut last_alive = started;
        loop {
            if let Some(reason) = self.cancel.reason() {
                return Err(Error::Cancelled {
                    op: ctx.op,
                    rank: self.rank,
                    seq: ctx.seq,
                    reason,
                });
            }
            match self.transport.recv(slice).await {
                Ok(Frame::Waiting(w)) => {
                    tracing::trace!(
                        rank = self.rank,
                        left = w.rank,
                        on = w.waiting_on,
                        "left neighbour is waiting"
                    );
                    last_alive = tokio::time::Instant::now();
                }
                Ok(Frame::Data(d)) => return Ok(Received::Data(d)),
                Ok(Frame::Abort(a)) if a.generation != self.opts.generation => {
                    tracing::debug!(
                        rank = self.rank,
                        generation = a.generation,
                        "abort of another ring ignored"
                    );
                }
                Ok(Frame::Abort(a)) => return Ok(Received::Abort(a)),
                Err(LinkError {
                    failure: LinkFailure::Timeout(_),
                    peer,
                    direction,
                }) => {
                    let now = tokio::time::Instant::now();
                    if now - last_alive >= timeout || now - started >= cap {
                        return Err(self.link_error(
                            ctx,
                            LinkError {
                                peer,
                                direction,
                                failure: LinkFailure::Timeout(timeout),
                            },
                        ));
                    }
                    if self.world > 1 {
                        // Best effort: a broken right link is reported by the next send.
                        let _ = self.transport.send(Frame::Waiting(Waiting {
                            job_id: self.opts.job_id.clone(),
                            seq: ctx.seq,
                            rank: self.rank as u32,
                            waiting_on: self.left() as u32,
                            generation: self.opts.generation,
                        }));
                    }
                }
                Err(e) => return Err(self.link_error(ctx, e)),
            }
        }
    }

    /// Receive the next frame, which must be data for `(step, part)` of the
    /// current collective from `origin`, with `values` values (if given).
    async fn recv(
        &mut self,
        ctx: &Ctx,
        step: usize,
        part: usize,
        origin: usize,
        values: Option<usize>,
    ) -> Result<Bytes> {
        match self.next_frame(ctx).await? {
            Received::Abort(a) => Err(Error::Aborted {
                op: ctx.op,
                rank: self.rank,
                seq: ctx.seq,
                origin: a.origin_rank as usize,
                reason: a.reason,
            }),
            Received::Data(d) => {
                self.check(ctx, &d.header, step, part, origin)?;
                if let Some(values) = values {
                    let expected = values * ctx.op.value_bytes();
                    if d.payload.len() != expected {
                        return Err(self.mismatch(
                            ctx,
                            "payload bytes",
                            expected,
                            d.payload.len(),
                            "ranks cut the buffer differently: protocol bug or corrupted stream",
                        ));
                    }
                }
                Ok(d.payload)
            }
        }
    }

    fn mismatch(
        &self,
        ctx: &Ctx,
        field: &'static str,
        ours: impl ToString,
        theirs: impl ToString,
        hint: &'static str,
    ) -> Error {
        Error::Mismatch {
            op: ctx.op,
            rank: self.rank,
            seq: ctx.seq,
            bucket: ctx.bucket,
            peer: self.left(),
            field,
            ours: ours.to_string(),
            theirs: theirs.to_string(),
            hint,
        }
    }

    /// Compare a header with what this rank expects, most telling field first.
    fn check(&self, ctx: &Ctx, h: &DataHeader, step: usize, part: usize, origin: usize) -> Result<()> {
        const LAYOUT: &str = "the ranks have different buffer layouts: different model, parameter order or bucket size";
        if h.job_id != self.opts.job_id {
            return Err(self.mismatch(
                ctx,
                "job_id",
                &self.opts.job_id,
                &h.job_id,
                "the peer belongs to another job",
            ));
        }
        if h.generation != self.opts.generation {
            return Err(self.mismatch(
                ctx,
                "generation",
                self.opts.generation,
                h.generation,
                "the frame belongs to another ring of this job (the membership changed)",
            ));
        }
        if h.world_size as usize != self.world {
            return Err(self.mismatch(
                ctx,
                "world_size",
                self.world,
                h.world_size,
                "the ranks disagree on the ring",
            ));
        }
        if h.sender_rank as usize != self.left() {
            return Err(self.mismatch(
                ctx,
                "sender_rank",
                self.left(),
                h.sender_rank,
                "the ranks disagree on the ring order",
            ));
        }
        if h.seq != ctx.seq {
            return Err(self.mismatch(ctx, "seq", ctx.seq, h.seq, "a rank skipped or repeated a collective"));
        }
        if h.op != ctx.op {
            return Err(self.mismatch(ctx, "op", ctx.op, h.op, "the ranks called different collectives"));
        }
        if h.bucket_id != ctx.bucket {
            return Err(self.mismatch(ctx, "bucket_id", ctx.bucket, h.bucket_id, LAYOUT));
        }
        if let Some(len) = ctx.bucket_len {
            if h.bucket_len != len {
                return Err(self.mismatch(ctx, "bucket_len", len, h.bucket_len, LAYOUT));
            }
        }
        if h.layout_fingerprint != ctx.fingerprint {
            return Err(self.mismatch(
                ctx,
                "layout_fingerprint",
                format!("{:#018x}", ctx.fingerprint),
                format!("{:#018x}", h.layout_fingerprint),
                LAYOUT,
            ));
        }
        if h.parts != ctx.parts {
            return Err(self.mismatch(
                ctx,
                "parts",
                ctx.parts,
                h.parts,
                "the ranks use different part_bytes settings",
            ));
        }
        if h.origin_rank as usize != origin {
            return Err(self.mismatch(
                ctx,
                "origin_rank",
                origin,
                h.origin_rank,
                "the ranks disagree on the root",
            ));
        }
        if h.step as usize != step || h.part as usize != part {
            return Err(self.mismatch(
                ctx,
                "step/part",
                format!("{step}/{part}"),
                format!("{}/{}", h.step, h.part),
                "frames out of order: protocol bug",
            ));
        }
        Ok(())
    }
}
