//! Blocking facade for a training loop that is not async.

use std::net::SocketAddr;

use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::grpc::{connect_ring_cancellable, GrpcConfig, GrpcTransport};
use crate::layout::BucketPlan;
use crate::ring::{CancelToken, ReduceOp, Ring};

/// One rank of a gRPC ring, with its own small tokio runtime: every method
/// blocks the calling thread until the collective is done on this rank.
///
/// The reduction work runs on the calling thread; the runtime's threads
/// (`io_threads`) move bytes.
#[derive(Debug)]
pub struct Communicator {
    ring: Ring<GrpcTransport>,
    local_addr: SocketAddr,
    _shutdown: oneshot::Sender<()>,
    // Dropped last: the ring's tasks live on it.
    runtime: Runtime,
}

impl Communicator {
    /// Join the ring described by `config`, serving on `listener` (already
    /// bound; its address must be `config.peers[config.rank]` as the others
    /// see it). Blocks until every rank is up (a barrier), at most
    /// `config.connect_timeout`. `io_threads` runtime threads move bytes (1 or
    /// 2 is plenty).
    pub fn connect(config: &GrpcConfig, listener: std::net::TcpListener, io_threads: usize) -> Result<Self> {
        Self::connect_cancellable(config, listener, io_threads, CancelToken::default())
    }

    /// [`Communicator::connect`] whose wait for the ring, and every later collective, `cancel`
    /// stops (the job was aborted, or its membership changed again meanwhile).
    pub fn connect_cancellable(
        config: &GrpcConfig,
        listener: std::net::TcpListener,
        io_threads: usize,
        cancel: CancelToken,
    ) -> Result<Self> {
        let io = |what: &str, e: std::io::Error| Error::Config {
            what: format!("{what}: {e}"),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads.max(1))
            .thread_name("ringtrain-collective")
            .enable_all()
            .build()
            .map_err(|e| io("cannot start the collective runtime", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("cannot make the listener non-blocking", e))?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|e| io("cannot register the listener", e))?
        };
        let local_addr = listener
            .local_addr()
            .map_err(|e| io("listener has no local address", e))?;
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = shutdown_rx.await;
        };
        let ring = runtime.block_on(connect_ring_cancellable(config, listener, shutdown, cancel))?;
        Ok(Self {
            ring,
            local_addr,
            _shutdown: shutdown_tx,
            runtime,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.ring.rank()
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.ring.world()
    }

    /// Address this rank's server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Makes `token` (e.g. one made before the ring) the one that stops this rank.
    pub fn set_cancel_token(&mut self, token: CancelToken) {
        self.ring.set_cancel_token(token);
    }

    /// The async ring underneath.
    pub fn ring(&mut self) -> &mut Ring<GrpcTransport> {
        &mut self.ring
    }

    /// In-place all-reduce; see [`Ring::all_reduce`].
    pub fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.runtime.block_on(self.ring.all_reduce(buf, op))
    }

    /// In-place mean over ranks, the gradient synchronisation of data-parallel SGD.
    pub fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf, ReduceOp::Mean)
    }

    /// In-place bucketed all-reduce; see [`Ring::all_reduce_bucketed`].
    pub fn all_reduce_bucketed(&mut self, buf: &mut [f32], plan: &BucketPlan, op: ReduceOp) -> Result<()> {
        self.runtime.block_on(self.ring.all_reduce_bucketed(buf, plan, op))
    }

    /// Copy `root`'s buffer to every rank; see [`Ring::broadcast`].
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.runtime.block_on(self.ring.broadcast(buf, root))
    }

    /// Wait for every rank; see [`Ring::barrier`].
    pub fn barrier(&mut self) -> Result<()> {
        self.runtime.block_on(self.ring.barrier())
    }

    /// Gather every rank's buffer of known length; see [`Ring::all_gather_f32`].
    pub fn all_gather_f32(&mut self, values: &[f32], lens: &[usize], fingerprint: u64) -> Result<Vec<Vec<f32>>> {
        self.runtime
            .block_on(self.ring.all_gather_f32(values, lens, fingerprint))
    }

    /// Gather a few values per rank; see [`Ring::all_gather_f64`].
    pub fn all_gather_f64(&mut self, values: &[f64]) -> Result<Vec<Vec<f64>>> {
        self.runtime.block_on(self.ring.all_gather_f64(values))
    }
}

impl Drop for Communicator {
    /// Delivers this rank's last frames before the runtime stops (bounded by
    /// the receive timeout), so neighbours still finishing the last
    /// collective get everything they need.
    fn drop(&mut self) {
        self.runtime.block_on(self.ring.close());
    }
}
