//! The real transport: tonic (HTTP/2 over TCP), one client stream per ring link.
//!
//! Each rank runs a `ringtrain.v1.Collective` server on a listener it was
//! given (already bound: nothing here picks a port) and one client task that
//! streams to its right neighbour. Inbound frames, and failures of either link,
//! arrive in one bounded inbox that the ring reads with a deadline.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringtrain_proto::collective::Frame;
use ringtrain_proto::grpc::{
    push_service, token_check, InboundError, InboundFrames, PushClient, PushHandler, GENERATION_METADATA_KEY,
    JOB_METADATA_KEY, RANK_METADATA_KEY, TOKEN_METADATA_KEY,
};
use ringtrain_proto::tls::Tls;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Status};

use crate::error::{Direction, Error, LinkError, LinkFailure, Result};
use crate::ring::{CancelToken, Ring, RingOptions, DEFAULT_PART_BYTES, DEFAULT_TIMEOUT};
use crate::transport::Transport;

/// HTTP/2 flow-control window per stream. The default 64 KiB would stall the
/// link after every 64 KiB waiting for a WINDOW_UPDATE.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame the server accepts (fewer frame headers per part).
const MAX_FRAME: u32 = (1 << 24) - 1;
/// Inbound frames buffered between the server and the ring (more wait in
/// the HTTP/2 window; a short queue lets the decoder reuse its buffers).
const INBOX: usize = 8;
/// Room for the header around a part's payload.
const HEADER_SLACK: usize = 4096;
/// Pause between connection attempts while the right neighbour starts.
const RETRY: Duration = Duration::from_millis(50);

/// Where a rank sits in the ring and how it talks to its neighbours.
#[derive(Clone, PartialEq, Eq)]
pub struct GrpcConfig {
    /// This rank's index in `peers`.
    pub rank: usize,
    /// Every rank's address (`host:port`, or a full `http://` URI), in ring order.
    pub peers: Vec<String>,
    /// Job id, carried by every frame and stream.
    pub job_id: String,
    /// Membership generation (elastic training), carried by every frame and stream: a
    /// stream or frame of another generation is refused.
    pub generation: u64,
    /// Shared secret; a stream without it is refused.
    pub token: String,
    /// Deadline of every receive.
    pub timeout: Duration,
    /// How long to keep trying to reach the right neighbour, and how long the
    /// first barrier waits for the whole ring to come up.
    pub connect_timeout: Duration,
    /// Payload bytes per pipelined message.
    pub part_bytes: usize,
    /// Mutual TLS on both links (`None`: plaintext).
    pub tls: Option<Tls>,
}

impl std::fmt::Debug for GrpcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcConfig")
            .field("rank", &self.rank)
            .field("peers", &self.peers)
            .field("job_id", &self.job_id)
            .field("generation", &self.generation)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("part_bytes", &self.part_bytes)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl GrpcConfig {
    /// Defaults: 5 s receive timeout, 30 s connect timeout, 512 KiB parts.
    pub fn new(rank: usize, peers: Vec<String>, job_id: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            rank,
            peers,
            job_id: job_id.into(),
            generation: 0,
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(30),
            part_bytes: DEFAULT_PART_BYTES,
            tls: None,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config { what });
        if self.peers.is_empty() {
            return bad("the peer list is empty".into());
        }
        if self.rank >= self.peers.len() {
            return bad(format!(
                "rank {} is not below the world size {}",
                self.rank,
                self.peers.len()
            ));
        }
        if self.token.is_empty() || !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("the job token must be non-empty printable ASCII without spaces".into());
        }
        if self.job_id.is_empty() || !self.job_id.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("the job id must be non-empty printable ASCII without spaces".into());
        }
        if self.part_bytes < 4 || self.part_bytes > 64 << 20 {
            return bad(format!("part_bytes {} is outside 4 B ..= 64 MiB", self.part_bytes));
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be positive".into());
        }
        Ok(())
    }

    fn ring_options(&self) -> RingOptions {
        RingOptions {
            job_id: self.job_id.clone(),
            generation: self.generation,
            part_bytes: self.part_bytes,
            timeout: self.timeout,
        }
    }
}

/// Something that happened on one of this rank's links.
#[derive(Debug)]
enum Inbound {
    Frame(Frame),
    Failed(LinkError),
}

/// [`Transport`] over gRPC; see the module docs.
#[derive(Debug)]
pub struct GrpcTransport {
    rank: usize,
    world: usize,
    peers: Vec<String>,
    local_addr: SocketAddr,
    inbox: mpsc::Receiver<Inbound>,
    out: Option<mpsc::UnboundedSender<Frame>>,
    /// Set by the client task when the link to the right ends; checked by `send`.
    right_failed: Arc<Mutex<Option<LinkError>>>,
    /// Why this rank gave up, if it did; told to the left neighbour as the
    /// status of its stream.
    abort_reason: Arc<Mutex<Option<String>>>,
    close_timeout: Duration,
    server: JoinHandle<()>,
    client: Option<JoinHandle<()>>,
    /// The queue to the right neighbour (shared with its client task).
    queue: Option<Arc<Mutex<FrameQueue>>>,
}

impl GrpcTransport {
    /// Serve on `listener` until `shutdown` resolves (or this value is
    /// dropped) and start streaming to the right neighbour, retrying until
    /// `connect_timeout`. Returns at once; link failures, including a refused
    /// or unreachable neighbour, surface from the ring's next receive. Must be
    /// called inside a tokio runtime (it spawns the server and client tasks).
    pub fn start<F>(config: &GrpcConfig, listener: TcpListener, shutdown: F) -> Result<Self>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        config.validate()?;
        let rank = config.rank;
        let world = config.peers.len();
        let left = (rank + world - 1) % world;
        let right = (rank + 1) % world;
        let local_addr = listener.local_addr().map_err(|e| Error::Config {
            what: format!("listener has no local address: {e}"),
        })?;
        let max_message = config.part_bytes + HEADER_SLACK;
        let (inbox_tx, inbox) = mpsc::channel(INBOX);

        let abort_reason = Arc::new(Mutex::new(None));
        let handler = InboxHandler {
            inbox: inbox_tx.clone(),
            abort_reason: abort_reason.clone(),
            left,
            rank,
            job_id: config.job_id.clone(),
            generation: config.generation,
            busy: Arc::new(AtomicBool::new(false)),
        };
        let service = InterceptedService::new(push_service(handler, max_message), token_check(&config.token));
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = Server::builder();
        if let Some(tls) = &config.tls {
            builder = builder.tls_config(tls.server()).map_err(|e| Error::Config {
                what: format!("unusable TLS certificate or key: {}", crate::error_chain(&e)),
            })?;
        }
        let server = tokio::spawn(async move {
            let served = builder
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            if let Err(e) = served {
                tracing::warn!(rank, error = %e, "collective server stopped");
            }
        });
        let right_failed = Arc::new(Mutex::new(None));
        let mut out = None;
        let mut client = None;
        let mut queue = None;
        if world > 1 {
            let (out_tx, out_rx) = mpsc::unbounded_channel();
            out = Some(out_tx);
            let frames = Arc::new(Mutex::new(FrameQueue {
                rx: out_rx,
                replay: VecDeque::new(),
                sent: Some(Vec::new()),
                attempt: 0,
            }));
            queue = Some(frames.clone());
            let link = RightLink {
                rank,
                right,
                addr: config.peers[right].clone(),
                tls: config.tls.clone(),
                metadata: stream_metadata(config)?,
                connect_timeout: config.connect_timeout,
                keepalive: config.timeout,
                max_message,
                inbox: inbox_tx,
                failed: right_failed.clone(),
            };
            client = Some(tokio::spawn(link.run(frames)));
        }
        Ok(Self {
            rank,
            world,
            peers: config.peers.clone(),
            local_addr,
            inbox,
            out,
            right_failed,
            abort_reason,
            close_timeout: config.timeout,
            server,
            client,
            queue,
        })
    }

    /// The ring is up (its first barrier passed): frames sent from now on are never offered
    /// again, so they need not be kept.
    fn settled(&self) {
        if let Some(q) = &self.queue {
            if let Ok(mut q) = q.lock() {
                q.sent = None;
            }
        }
    }

    /// Address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for GrpcTransport {
    /// Stops accepting; frames already queued for the right neighbour are
    /// still delivered by the client task (which ends the stream cleanly) as
    /// long as the runtime runs. Use [`Transport::close`] to wait for that.
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Transport for GrpcTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn peer_addr(&self, rank: usize) -> String {
        self.peers.get(rank).cloned().unwrap_or_else(|| "?".into())
    }

    fn send(&mut self, frame: Frame) -> Result<(), LinkError> {
        if let Frame::Abort(abort) = &frame {
            if let Ok(mut slot) = self.abort_reason.lock() {
                slot.get_or_insert_with(|| format!("rank {} failed: {}", abort.origin_rank, abort.reason));
            }
        }
        if let Some(e) = self.right_failed.lock().ok().and_then(|f| f.clone()) {
            return Err(e);
        }
        let right = (self.rank + 1) % self.world;
        let closed = || LinkError {
            peer: right,
            direction: Direction::ToRight,
            failure: LinkFailure::Closed("the stream to it has ended".into()),
        };
        match &self.out {
            Some(out) => out.send(frame).map_err(|_| closed()),
            None => Err(closed()),
        }
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError> {
        let left = (self.rank + self.world - 1) % self.world;
        match tokio::time::timeout(timeout, self.inbox.recv()).await {
            Ok(Some(Inbound::Frame(frame))) => Ok(frame),
            Ok(Some(Inbound::Failed(e))) => Err(e),
            Ok(None) => Err(LinkError {
                peer: left,
                direction: Direction::FromLeft,
                failure: LinkFailure::Closed("this rank's server has stopped".into()),
            }),
            Err(_) => Err(LinkError {
                peer: left,
                direction: Direction::FromLeft,
                failure: LinkFailure::Timeout(timeout),
            }),
        }
    }

    /// End the stream to the right neighbour after every queued frame, and
    /// wait (at most the receive timeout) until it has acknowledged them.
    async fn close(&mut self) {
        self.out = None;
        if let Some(client) = self.client.take() {
            if tokio::time::timeout(self.close_timeout, client).await.is_err() {
                tracing::warn!(
                    rank = self.rank,
                    "right neighbour did not acknowledge the end of the stream"
                );
            }
        }
        self.server.abort();
    }
}

/// Start a gRPC ring member and wait (up to `connect_timeout`) until the
/// whole ring is up, with a barrier. The server runs until `shutdown` resolves
/// or the returned ring is dropped.
pub async fn connect_ring<F>(config: &GrpcConfig, listener: TcpListener, shutdown: F) -> Result<Ring<GrpcTransport>>
where
    F: Future<Output = ()> + Send + 'static,
{
    connect_ring_cancellable(config, listener, shutdown, CancelToken::default()).await
}

/// [`connect_ring`] whose first barrier, and every later collective, `cancel` stops.
pub async fn connect_ring_cancellable<F>(
    config: &GrpcConfig,
    listener: TcpListener,
    shutdown: F,
    cancel: CancelToken,
) -> Result<Ring<GrpcTransport>>
where
    F: Future<Output = ()> + Send + 'static,
{
    let transport = GrpcTransport::start(config, listener, shutdown)?;
    let mut ring = Ring::new(transport, config.ring_options());
    ring.set_cancel_token(cancel);
    ring.set_timeout(config.connect_timeout);
    ring.barrier().await?;
    ring.transport().settled();
    ring.set_timeout(config.timeout);
    Ok(ring)
}

fn stream_metadata(config: &GrpcConfig) -> Result<MetadataMap> {
    let value = |s: &str| {
        MetadataValue::try_from(s).map_err(|e| Error::Config {
            what: format!("cannot put {s:?} in gRPC metadata: {e}"),
        })
    };
    let mut md = MetadataMap::new();
    md.insert(TOKEN_METADATA_KEY, value(&config.token)?);
    md.insert(RANK_METADATA_KEY, value(&config.rank.to_string())?);
    md.insert(JOB_METADATA_KEY, value(&config.job_id)?);
    md.insert(GENERATION_METADATA_KEY, value(&config.generation.to_string())?);
    Ok(md)
}

/// Server side: accepts the one stream from the left neighbour and feeds its
/// frames into the inbox.
#[derive(Debug)]
struct InboxHandler {
    inbox: mpsc::Sender<Inbound>,
    abort_reason: Arc<Mutex<Option<String>>>,
    left: usize,
    rank: usize,
    job_id: String,
    generation: u64,
    busy: Arc<AtomicBool>,
}

/// Clears the busy flag when a stream ends, however it ends.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl InboxHandler {
    /// Status for the left neighbour once this rank's ring is gone.
    fn gone(&self, received: u64) -> Result<u64, Status> {
        match self.abort_reason.lock().ok().and_then(|r| r.clone()) {
            Some(reason) => Err(Status::aborted(format!("rank {} gave up: {reason}", self.rank))),
            None => Ok(received),
        }
    }

    fn fail(&self, reason: String) -> Inbound {
        Inbound::Failed(LinkError {
            peer: self.left,
            direction: Direction::FromLeft,
            failure: LinkFailure::Closed(reason),
        })
    }
}

impl PushHandler for InboxHandler {
    async fn push(&self, metadata: MetadataMap, mut frames: InboundFrames) -> Result<u64, Status> {
        let job = metadata.get(JOB_METADATA_KEY).and_then(|v| v.to_str().ok());
        if job != Some(self.job_id.as_str()) {
            return Err(Status::permission_denied(format!(
                "rank {} belongs to job {:?}, not {job:?}",
                self.rank, self.job_id
            )));
        }
        // Before the rank: in another generation the ranks are other workers.
        let generation = metadata
            .get(GENERATION_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if generation != self.generation {
            return Err(Status::failed_precondition(format!(
                "rank {} is in generation {} of the ring, not {generation}: the membership changed",
                self.rank, self.generation
            )));
        }
        let sender = metadata
            .get(RANK_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if sender != Some(self.left) {
            return Err(Status::permission_denied(format!(
                "rank {} accepts frames only from its left neighbour rank {}, not from {sender:?}",
                self.rank, self.left
            )));
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(Status::already_exists(format!(
                "rank {} already has a stream from rank {}",
                self.rank, self.left
            )));
        }
        let _busy = Busy(self.busy.clone());
        let mut received = 0u64;
        loop {
            let next = tokio::select! {
                next = frames.next() => next,
                // The ring went away (failed or shut down): tell the left
                // neighbour why, as the status of its stream.
                () = self.inbox.closed() => return self.gone(received),
            };
            let (event, result) = match next {
                Ok(Some(frame)) => {
                    received += 1;
                    if self.inbox.send(Inbound::Frame(frame)).await.is_err() {
                        return self.gone(received);
                    }
                    continue;
                }
                Ok(None) => (
                    self.fail("it closed its stream (shut down or gave up)".into()),
                    Ok(received),
                ),
                Err(InboundError::Transport(status)) => (
                    self.fail(format!("connection lost: {}", describe(&status))),
                    Err(status),
                ),
                Err(InboundError::Invalid(e)) => (
                    self.fail(format!("it sent an invalid frame: {e}")),
                    Err(Status::invalid_argument(e.to_string())),
                ),
                Err(InboundError::Undecodable(status)) => (
                    self.fail(format!("it sent an invalid frame: {}", status.message())),
                    Err(Status::invalid_argument(status.message().to_string())),
                ),
            };
            let _ = self.inbox.send(event).await;
            return result;
        }
    }
}

fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// The frames queued for the right neighbour. Until the ring is up, the frames a stream
/// took are kept, so that a stream the neighbour refused unread (its server still belongs
/// to the previous ring of an elastic job) can offer them again; only the first barrier's
/// frames exist then, since no collective completes before every link works.
#[derive(Debug)]
struct FrameQueue {
    rx: mpsc::UnboundedReceiver<Frame>,
    /// Frames to offer again before the queue's.
    replay: VecDeque<Frame>,
    /// Frames taken so far (`None` once the ring is up).
    sent: Option<Vec<Frame>>,
    /// Which stream may take frames: a failed one that hyper still polls must not take
    /// the frames offered to the next.
    attempt: u64,
}

impl FrameQueue {
    /// Offers every frame taken so far again; `false` when they were not kept.
    fn rewind(&mut self) -> bool {
        let Some(sent) = self.sent.as_mut() else {
            return false;
        };
        for frame in sent.drain(..).rev() {
            self.replay.push_front(frame);
        }
        self.attempt += 1;
        true
    }
}

/// The outgoing queue as the request stream of one `Push` call (attempt `.1`).
struct SharedFrames(Arc<Mutex<FrameQueue>>, u64);

impl Stream for SharedFrames {
    type Item = Frame;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Frame>> {
        let Ok(mut q) = self.0.lock() else {
            return std::task::Poll::Ready(None);
        };
        if q.attempt != self.1 {
            return std::task::Poll::Ready(None);
        }
        let next = match q.replay.pop_front() {
            Some(frame) => std::task::Poll::Ready(Some(frame)),
            None => q.rx.poll_recv(cx),
        };
        if let (std::task::Poll::Ready(Some(frame)), Some(sent)) = (&next, q.sent.as_mut()) {
            sent.push(frame.clone());
        }
        next
    }
}

/// Client side: connects to the right neighbour and streams every queued frame.
struct RightLink {
    rank: usize,
    right: usize,
    addr: String,
    tls: Option<Tls>,
    metadata: MetadataMap,
    connect_timeout: Duration,
    keepalive: Duration,
    max_message: usize,
    inbox: mpsc::Sender<Inbound>,
    failed: Arc<Mutex<Option<LinkError>>>,
}

impl RightLink {
    /// Stream until the link ends, then record why. A refusal or a failed
    /// connection is also pushed into the inbox, so that the ring fails at
    /// once. A stream that ends later is only recorded (the next send fails):
    /// a neighbour that finished the last collective and shut down is not an
    /// error for a rank still receiving its own last frames, and if it died
    /// mid-collective the ranks downstream of it report it and their abort
    /// reaches this rank from the left.
    async fn run(self, frames: Arc<Mutex<FrameQueue>>) {
        // tonic drops the request stream as soon as the call fails; sharing the
        // receiver keeps the queue open until the failure is recorded below, so
        // a concurrent `send` reports why the link ended, not just that it did.
        let (failure, urgent) = match self.stream(&frames).await {
            Ok(()) => (LinkFailure::Closed("it ended our stream".into()), false),
            Err((failure, urgent)) => (failure, urgent),
        };
        tracing::debug!(
            rank = self.rank,
            right = self.right,
            ?failure,
            "link to right neighbour ended"
        );
        let error = LinkError {
            peer: self.right,
            direction: Direction::ToRight,
            failure,
        };
        if let Ok(mut slot) = self.failed.lock() {
            slot.get_or_insert(error.clone());
        }
        if urgent {
            let _ = self.inbox.send(Inbound::Failed(error)).await;
        }
    }

    /// `Err((failure, urgent))` where `urgent` marks failures before any frame was accepted.
    async fn stream(&self, frames: &Arc<Mutex<FrameQueue>>) -> Result<(), (LinkFailure, bool)> {
        let uri = match self.addr.split_once("://") {
            Some((_, rest)) => format!("{}://{rest}", Tls::scheme(self.tls.as_ref())),
            None => format!("{}://{}", Tls::scheme(self.tls.as_ref()), self.addr),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| (LinkFailure::Closed(format!("bad address {:?}: {e}", self.addr)), true))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.client()).map_err(|e| {
                (
                    LinkFailure::Closed(format!("unusable TLS settings: {}", crate::error_chain(&e))),
                    true,
                )
            })?;
        }
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(self.keepalive);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            let channel = loop {
                match endpoint.connect().await {
                    Ok(channel) => break channel,
                    Err(e) if tokio::time::Instant::now() + RETRY < deadline => {
                        tracing::trace!(rank = self.rank, error = %e, "right neighbour not reachable yet");
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(e) => {
                        return Err((
                            LinkFailure::Closed(format!(
                                "could not connect within {:?}: {}",
                                self.connect_timeout,
                                crate::error_chain(&e)
                            )),
                            true,
                        ))
                    }
                }
            };
            let mut client = PushClient::new(channel, self.max_message);
            let attempt = frames.lock().map_or(0, |q| q.attempt);
            let status = match client
                .push(self.metadata.clone(), SharedFrames(frames.clone(), attempt))
                .await
            {
                Ok(_) => return Ok(()),
                Err(status) => status,
            };
            // Until the ring is up, a stream that failed for any reason but a refusal of
            // this rank is tried again with the same frames: in an elastic job the neighbour
            // may still serve the previous ring (which refuses the stream unread, or drops it
            // as it shuts down), and none of this ring's frames can have been taken by then.
            let refused = matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied | Code::Aborted | Code::InvalidArgument
            );
            let retry = !refused
                && tokio::time::Instant::now() + RETRY < deadline
                && frames.lock().is_ok_and(|mut q| q.rewind());
            if retry {
                tracing::trace!(rank = self.rank, status = %describe(&status), "right neighbour not in this ring yet");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            return Err(match status.code() {
                Code::Unauthenticated | Code::PermissionDenied | Code::AlreadyExists => {
                    (LinkFailure::Refused(describe(&status)), true)
                }
                // The neighbour failed the collective and says why.
                Code::Aborted => (LinkFailure::Closed(status.message().to_owned()), true),
                _ => (
                    LinkFailure::Closed(format!("stream failed: {}", describe(&status))),
                    false,
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated_and_token_redacted() {
        let ok = GrpcConfig::new(0, vec!["127.0.0.1:1".into()], "job", "secret");
        assert!(ok.validate().is_ok());
        assert!(!format!("{ok:?}").contains("secret"));
        let mut bad = ok.clone();
        bad.rank = 1;
        assert!(matches!(bad.validate(), Err(Error::Config { .. })));
        let mut bad = ok.clone();
        bad.token = "has space".into();
        assert!(matches!(bad.validate(), Err(Error::Config { .. })));
        let mut bad = ok;
        bad.peers.clear();
        assert!(matches!(bad.validate(), Err(Error::Config { .. })));
    }
}
