//! Domain types and gRPC plumbing of the control plane (`ringtrain.v1.Coordinator`).
//!
//! Wire messages become these types by `TryFrom`, once, on receipt: required
//! fields present, ranks inside the world, durations positive. The server side
//! implements [`CoordinatorHandler`] and wraps it with [`coordinator_service`];
//! workers talk through [`CoordinatorClient`], which adds the job token to every
//! call.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::grpc::TOKEN_METADATA_KEY;
use crate::wire;
use crate::wire::coordinator_client::CoordinatorClient as WireClient;
use crate::wire::coordinator_server::{Coordinator, CoordinatorServer};

/// A control message that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {message}: {field}: {reason}")]
pub struct ControlError {
    pub message: &'static str,
    pub field: &'static str,
    pub reason: String,
}

fn invalid(message: &'static str, field: &'static str, reason: impl Into<String>) -> ControlError {
    ControlError {
        message,
        field,
        reason: reason.into(),
    }
}

fn non_empty(message: &'static str, field: &'static str, value: String) -> Result<String, ControlError> {
    if value.is_empty() {
        Err(invalid(message, field, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn optional(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// A worker asking to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// `host:port` of the worker's collective server, as the other workers reach it.
    pub peer_addr: String,
    pub host: String,
    pub pid: u32,
    /// Where the call came from, as the server saw it (not on the wire; filled in by the
    /// server adapter), so a worker listening on `0.0.0.0` can be reached at the address
    /// it called from.
    pub remote: Option<std::net::SocketAddr>,
}

impl TryFrom<wire::RegisterRequest> for Registration {
    type Error = ControlError;
    fn try_from(w: wire::RegisterRequest) -> Result<Self, ControlError> {
        Ok(Registration {
            peer_addr: non_empty("RegisterRequest", "peer_addr", w.peer_addr)?,
            host: w.host,
            pid: w.pid,
            remote: None,
        })
    }
}

impl From<Registration> for wire::RegisterRequest {
    fn from(r: Registration) -> Self {
        wire::RegisterRequest {
            peer_addr: r.peer_addr,
            host: r.host,
            pid: r.pid,
        }
    }
}

/// What a worker is told once everyone has registered (or, joining a running elastic job,
/// once its place in the next ring is decided).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job_id: String,
    /// The worker's number for the whole job (heartbeats, reports, messages).
    pub rank: usize,
    /// Collective addresses in ring order.
    pub peers: Vec<String>,
    /// This worker's place in `peers` (= `rank` unless the job is elastic).
    pub ring_rank: usize,
    /// Workers may leave and join while the job runs.
    pub elastic: bool,
    /// The membership `peers` belongs to (0 = the first ring).
    pub generation: u64,
    /// This worker joins a running job and takes the training state from the others.
    pub joining: bool,
    pub job_toml: String,
    pub job_path: String,
    pub data_path: Option<String>,
    pub fingerprint: String,
    pub writer_rank: usize,
    pub out_dir: Option<String>,
    pub resume_from: Option<String>,
    pub checkpoint_every: Option<usize>,
    pub heartbeat_interval: Duration,
    pub collective_timeout: Duration,
    /// Parallel k-fold: the ring this worker trains in and its folds; `None` = one ring of
    /// every worker running every fold.
    pub group: Option<FoldGroup>,
}

/// One ring of a parallel k-fold job (`evaluation.parallel_folds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldGroup {
    pub index: usize,
    /// Groups in the job.
    pub count: usize,
    /// This worker's rank in the group's ring.
    pub rank: usize,
    /// The group's collective addresses in ring order; non-empty, `peers[rank]` is this
    /// worker's own address.
    pub peers: Vec<String>,
    /// Folds to train, in order; non-empty.
    pub folds: Vec<usize>,
    /// Job id of the group's collective frames (distinct per group).
    pub ring_id: String,
}

impl FoldGroup {
    fn try_from_wire(w: wire::FoldGroup, own_addr: &str) -> Result<Self, ControlError> {
        const M: &str = "Assignment.group";
        if w.index >= w.count {
            return Err(invalid(
                M,
                "index",
                format!("{} is not below the {} groups", w.index, w.count),
            ));
        }
        if w.rank as usize >= w.peers.len() {
            return Err(invalid(
                M,
                "rank",
                format!("{} is not below the group size {}", w.rank, w.peers.len()),
            ));
        }
        if w.peers[w.rank as usize] != own_addr {
            return Err(invalid(
                M,
                "peers",
                format!(
                    "the group's rank {} is {}, not this worker's address {own_addr}",
                    w.rank, w.peers[w.rank as usize]
                ),
            ));
        }
        if w.folds.is_empty() {
            return Err(invalid(M, "folds", "must not be empty"));
        }
        Ok(FoldGroup {
            index: w.index as usize,
            count: w.count as usize,
            rank: w.rank as usize,
            peers: w.peers,
            folds: w.folds.into_iter().map(|f| f as usize).collect(),
            ring_id: non_empty(M, "ring_id", w.ring_id)?,
        })
    }
}

impl From<FoldGroup> for wire::FoldGroup {
    fn from(g: FoldGroup) -> Self {
        wire::FoldGroup {
            index: g.index as u32,
            count: g.count as u32,
            rank: g.rank as u32,
            peers: g.peers,
            folds: g.folds.into_iter().map(|f| f as u32).collect(),
            ring_id: g.ring_id,
        }
    }
}

impl TryFrom<wire::Assignment> for Assignment {
    type Error = ControlError;
    fn try_from(w: wire::Assignment) -> Result<Self, ControlError> {
        const M: &str = "Assignment";
        let world = w.peers.len();
        if world == 0 {
            return Err(invalid(M, "peers", "must not be empty"));
        }
        if w.peers.iter().any(String::is_empty) {
            return Err(invalid(M, "peers", "an address is empty"));
        }
        if w.ring_rank as usize >= world {
            return Err(invalid(
                M,
                "ring_rank",
                format!("{} is not below the world size {world}", w.ring_rank),
            ));
        }
        if !w.elastic && w.ring_rank != w.rank {
            return Err(invalid(
                M,
                "ring_rank",
                format!(
                    "{} differs from rank {} in a job that is not elastic",
                    w.ring_rank, w.rank
                ),
            ));
        }
        if w.writer_rank as usize >= world {
            return Err(invalid(
                M,
                "writer_rank",
                format!("{} is not below the world size {world}", w.writer_rank),
            ));
        }
        if w.heartbeat_interval_ms == 0 {
            return Err(invalid(M, "heartbeat_interval_ms", "must be positive"));
        }
        if w.collective_timeout_ms == 0 {
            return Err(invalid(M, "collective_timeout_ms", "must be positive"));
        }
        let own_addr = &w.peers[w.ring_rank as usize];
        let group = w.group.map(|g| FoldGroup::try_from_wire(g, own_addr)).transpose()?;
        Ok(Assignment {
            job_id: non_empty(M, "job_id", w.job_id)?,
            rank: w.rank as usize,
            peers: w.peers,
            ring_rank: w.ring_rank as usize,
            elastic: w.elastic,
            generation: w.generation,
            joining: w.joining,
            job_toml: non_empty(M, "job_toml", w.job_toml)?,
            job_path: non_empty(M, "job_path", w.job_path)?,
            data_path: optional(w.data_path),
            fingerprint: w.fingerprint,
            writer_rank: w.writer_rank as usize,
            out_dir: optional(w.out_dir),
            resume_from: optional(w.resume_from),
            checkpoint_every: (w.checkpoint_every > 0).then_some(w.checkpoint_every as usize),
            heartbeat_interval: Duration::from_millis(w.heartbeat_interval_ms),
            collective_timeout: Duration::from_millis(w.collective_timeout_ms),
            group,
        })
    }
}

impl From<Assignment> for wire::Assignment {
    fn from(a: Assignment) -> Self {
        wire::Assignment {
            job_id: a.job_id,
            rank: a.rank as u32,
            peers: a.peers,
            ring_rank: a.ring_rank as u32,
            elastic: a.elastic,
            generation: a.generation,
            joining: a.joining,
            job_toml: a.job_toml,
            job_path: a.job_path,
            data_path: a.data_path.unwrap_or_default(),
            fingerprint: a.fingerprint,
            writer_rank: a.writer_rank as u32,
            out_dir: a.out_dir.unwrap_or_default(),
            resume_from: a.resume_from.unwrap_or_default(),
            checkpoint_every: a.checkpoint_every.unwrap_or(0) as u32,
            heartbeat_interval_ms: a.heartbeat_interval.as_millis() as u64,
            collective_timeout_ms: a.collective_timeout.as_millis() as u64,
            group: a.group.map(wire::FoldGroup::from),
        }
    }
}

/// A worker's heartbeat: where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub job_id: String,
    pub rank: usize,
    pub epoch: u64,
    pub step: u64,
    /// Last epoch with a checkpoint on disk.
    pub checkpoint_epoch: Option<u64>,
    /// Elastic training: the membership the worker trains in since it re-formed.
    pub rejoined: Option<Rejoined>,
    /// Training is done; the final evaluation runs.
    pub finishing: bool,
}

/// Where a worker of an elastic job went on after its ring re-formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejoined {
    pub generation: u64,
    /// The optimizer step training went on from.
    pub step: u64,
    /// Completed steps this worker gave up to be level with the others (0: a worker behind
    /// takes the state of one ahead).
    pub stepped_back: u64,
}

impl TryFrom<wire::Beat> for Beat {
    type Error = ControlError;
    fn try_from(w: wire::Beat) -> Result<Self, ControlError> {
        Ok(Beat {
            job_id: non_empty("Beat", "job_id", w.job_id)?,
            rank: w.rank as usize,
            epoch: w.epoch,
            step: w.step,
            checkpoint_epoch: (w.checkpoint_epoch > 0).then_some(w.checkpoint_epoch),
            rejoined: (w.generation > 0).then_some(Rejoined {
                generation: w.generation,
                step: w.resumed_step,
                stepped_back: u64::from(w.stepped_back),
            }),
            finishing: w.finishing,
        })
    }
}

impl From<Beat> for wire::Beat {
    fn from(b: Beat) -> Self {
        wire::Beat {
            job_id: b.job_id,
            rank: b.rank as u32,
            epoch: b.epoch,
            step: b.step,
            checkpoint_epoch: b.checkpoint_epoch.unwrap_or(0),
            generation: b.rejoined.map_or(0, |r| r.generation),
            resumed_step: b.rejoined.map_or(0, |r| r.step),
            stepped_back: b.rejoined.map_or(0, |r| r.stepped_back as u32),
            finishing: b.finishing,
        }
    }
}

/// The coordinator telling a worker to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub reason: String,
}

/// A new ring for the workers of an elastic job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reform {
    pub generation: u64,
    /// This worker's place in `peers`.
    pub ring_rank: usize,
    /// Every member's collective address, in ring order.
    pub peers: Vec<String>,
    /// The ring rank that writes the run directory (`peers.len()`: none of this ring).
    pub writer_rank: usize,
    /// What changed.
    pub reason: String,
}

/// What the coordinator sends on a heartbeat stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A sign of life, answering a beat.
    Alive,
    /// Stop: the job failed elsewhere.
    Abort(Abort),
    /// The membership changed: leave the step in flight and join this ring.
    Reform(Reform),
}

impl TryFrom<wire::Command> for Command {
    type Error = ControlError;
    fn try_from(c: wire::Command) -> Result<Command, ControlError> {
        const M: &str = "Command.reform";
        if let Some(r) = c.reform {
            let world = r.peers.len();
            // The writer's place may be the world size: nobody in this ring writes (the
            // writer already finished).
            if r.ring_rank as usize >= world || r.writer_rank as usize > world {
                return Err(invalid(
                    M,
                    "ring_rank",
                    format!(
                        "ring rank {} must be below, writer rank {} at most, the world size {world}",
                        r.ring_rank, r.writer_rank
                    ),
                ));
            }
            if r.peers.iter().any(String::is_empty) {
                return Err(invalid(M, "peers", "an address is empty"));
            }
            return Ok(Command::Reform(Reform {
                generation: r.generation,
                ring_rank: r.ring_rank as usize,
                peers: r.peers,
                writer_rank: r.writer_rank as usize,
                reason: r.reason,
            }));
        }
        Ok(if c.alive && c.abort_reason.is_empty() {
            Command::Alive
        } else {
            Command::Abort(Abort { reason: c.abort_reason })
        })
    }
}

impl From<Command> for wire::Command {
    fn from(c: Command) -> wire::Command {
        match c {
            Command::Alive => wire::Command {
                abort_reason: String::new(),
                alive: true,
                reform: None,
            },
            Command::Abort(a) => wire::Command {
                abort_reason: a.reason,
                alive: false,
                reform: None,
            },
            Command::Reform(r) => wire::Command {
                abort_reason: String::new(),
                alive: false,
                reform: Some(wire::Reform {
                    generation: r.generation,
                    ring_rank: r.ring_rank as u32,
                    peers: r.peers,
                    writer_rank: r.writer_rank as u32,
                    reason: r.reason,
                }),
            },
        }
    }
}

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochUpdate {
    pub job_id: String,
    pub rank: usize,
    pub epoch: u64,
    /// One line of `metrics.jsonl`.
    pub metrics_json: String,
    pub comm_secs: f64,
    pub epoch_secs: f64,
    /// Operator metrics (typed copies of fields of `metrics_json`); NaN when not measured.
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: Option<f64>,
    pub examples_per_sec: f64,
    /// Bytes this rank fed into gradient all-reduces during the epoch.
    pub allreduce_bytes: u64,
}

fn seconds(message: &'static str, field: &'static str, v: f64) -> Result<f64, ControlError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(invalid(message, field, format!("{v} is not a duration in seconds")))
    }
}

impl TryFrom<wire::EpochReport> for EpochUpdate {
    type Error = ControlError;
    fn try_from(w: wire::EpochReport) -> Result<Self, ControlError> {
        const M: &str = "EpochReport";
        Ok(EpochUpdate {
            job_id: non_empty(M, "job_id", w.job_id)?,
            rank: w.rank as usize,
            epoch: w.epoch,
            metrics_json: w.metrics_json,
            comm_secs: seconds(M, "comm_secs", w.comm_secs)?,
            epoch_secs: seconds(M, "epoch_secs", w.epoch_secs)?,
            // Losses may legitimately be NaN (a diverged run is worth exporting as such).
            train_loss: w.train_loss,
            test_loss: w.test_loss,
            test_accuracy: w.test_accuracy,
            examples_per_sec: w.examples_per_sec,
            allreduce_bytes: w.allreduce_bytes,
        })
    }
}

impl From<EpochUpdate> for wire::EpochReport {
    fn from(e: EpochUpdate) -> Self {
        wire::EpochReport {
            job_id: e.job_id,
            rank: e.rank as u32,
            epoch: e.epoch,
            metrics_json: e.metrics_json,
            comm_secs: e.comm_secs,
            epoch_secs: e.epoch_secs,
            train_loss: e.train_loss,
            test_loss: e.test_loss,
            test_accuracy: e.test_accuracy,
            examples_per_sec: e.examples_per_sec,
            allreduce_bytes: e.allreduce_bytes,
        }
    }
}

/// How a worker's run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerOutcome {
    Finished {
        params_checksum: u64,
        /// The run summary as JSON (the writer rank's; may be empty on others).
        summary_json: String,
        comm_secs: f64,
        steps: u64,
        /// Parallel k-fold: the group's `metrics.jsonl` lines (from its rank 0), else empty.
        metrics_jsonl: String,
    },
    Failed {
        error: String,
        /// The job or its input is wrong (as opposed to a runtime failure).
        bad_input: bool,
    },
}

/// A worker's final report.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishReport {
    pub job_id: String,
    pub rank: usize,
    pub outcome: WorkerOutcome,
}

impl TryFrom<wire::FinishReport> for FinishReport {
    type Error = ControlError;
    fn try_from(w: wire::FinishReport) -> Result<Self, ControlError> {
        const M: &str = "FinishReport";
        let outcome = match w.outcome {
            Some(wire::finish_report::Outcome::Finished(f)) => WorkerOutcome::Finished {
                params_checksum: f.params_checksum,
                summary_json: f.summary_json,
                comm_secs: seconds(M, "finished.comm_secs", f.comm_secs)?,
                steps: f.steps,
                metrics_jsonl: f.metrics_jsonl,
            },
            Some(wire::finish_report::Outcome::Failed(f)) => WorkerOutcome::Failed {
                error: non_empty(M, "failed.error", f.error)?,
                bad_input: f.bad_input,
            },
            None => return Err(invalid(M, "outcome", "neither finished nor failed")),
        };
        Ok(FinishReport {
            job_id: non_empty(M, "job_id", w.job_id)?,
            rank: w.rank as usize,
            outcome,
        })
    }
}

impl From<FinishReport> for wire::FinishReport {
    fn from(r: FinishReport) -> Self {
        let outcome = match r.outcome {
            WorkerOutcome::Finished {
                params_checksum,
                summary_json,
                comm_secs,
                steps,
                metrics_jsonl,
            } => wire::finish_report::Outcome::Finished(wire::Finished {
                params_checksum,
                summary_json,
                comm_secs,
                steps,
                metrics_jsonl,
            }),
            WorkerOutcome::Failed { error, bad_input } => {
                wire::finish_report::Outcome::Failed(wire::Failed { error, bad_input })
            }
        };
        wire::FinishReport {
            job_id: r.job_id,
            rank: r.rank as u32,
            outcome: Some(outcome),
        }
    }
}

fn bad_request(e: ControlError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The beats of one inbound heartbeat stream, validated one by one.
#[derive(Debug)]
pub struct InboundBeats {
    inner: Streaming<wire::Beat>,
}

impl InboundBeats {
    /// Next beat; `Ok(None)` when the worker closed the stream cleanly, `Err` when the
    /// stream broke (worker gone, connection reset) or a beat is invalid.
    pub async fn next(&mut self) -> Result<Option<Beat>, Status> {
        match self.inner.message().await? {
            Some(b) => Beat::try_from(b).map(Some).map_err(bad_request),
            None => Ok(None),
        }
    }
}

/// Commands sent back on a heartbeat stream.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send + 'static>>;

/// Server side of the control plane, in domain types.
pub trait CoordinatorHandler: Send + Sync + 'static {
    fn register(&self, request: Registration) -> impl Future<Output = Result<Assignment, Status>> + Send;
    fn heartbeat(&self, beats: InboundBeats) -> impl Future<Output = Result<CommandStream, Status>> + Send;
    fn report_epoch(&self, report: EpochUpdate) -> impl Future<Output = Result<(), Status>> + Send;
    fn finish(&self, report: FinishReport) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Adapts a [`CoordinatorHandler`] to the generated tonic service trait.
#[derive(Debug)]
pub struct CoordinatorAdapter<H>(H);

type WireCommands = Pin<Box<dyn Stream<Item = Result<wire::Command, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<H: CoordinatorHandler> Coordinator for CoordinatorAdapter<H> {
    async fn register(&self, request: Request<wire::RegisterRequest>) -> Result<Response<wire::Assignment>, Status> {
        let remote = request.remote_addr();
        let mut r = Registration::try_from(request.into_inner()).map_err(bad_request)?;
        r.remote = remote;
        Ok(Response::new(self.0.register(r).await?.into()))
    }

    type HeartbeatStream = WireCommands;

    async fn heartbeat(
        &self,
        request: Request<Streaming<wire::Beat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let beats = InboundBeats {
            inner: request.into_inner(),
        };
        let commands = self.0.heartbeat(beats).await?;
        let wire: WireCommands = Box::pin(commands.map(|c| c.map(wire::Command::from)));
        Ok(Response::new(wire))
    }

    async fn report_epoch(&self, request: Request<wire::EpochReport>) -> Result<Response<wire::Ack>, Status> {
        let r = EpochUpdate::try_from(request.into_inner()).map_err(bad_request)?;
        self.0.report_epoch(r).await?;
        Ok(Response::new(wire::Ack {}))
    }

    async fn finish(&self, request: Request<wire::FinishReport>) -> Result<Response<wire::Ack>, Status> {
        let r = FinishReport::try_from(request.into_inner()).map_err(bad_request)?;
        self.0.finish(r).await?;
        Ok(Response::new(wire::Ack {}))
    }
}

/// The tonic service for `ringtrain.v1.Coordinator`.
pub fn coordinator_service<H: CoordinatorHandler>(handler: H) -> CoordinatorServer<CoordinatorAdapter<H>> {
    CoordinatorServer::new(CoordinatorAdapter(handler))
}

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with an error status (or the connection failed).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The coordinator's answer is not valid.
    #[error(transparent)]
    Invalid(#[from] ControlError),
}

/// Commands arriving on a heartbeat stream.
#[derive(Debug)]
pub struct InboundCommands {
    inner: Streaming<wire::Command>,
}

impl InboundCommands {
    /// Next command; `Ok(None)` when the coordinator closed the stream.
    pub async fn next(&mut self) -> Result<Option<Command>, Status> {
        self.inner
            .message()
            .await?
            .map(Command::try_from)
            .transpose()
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// Client of the coordinator; every call carries the job token.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    inner: WireClient<Channel>,
    token: AsciiMetadataValue,
}

impl CoordinatorClient {
    /// Wrap an established channel. Fails when the token cannot travel as metadata
    /// (it must be printable ASCII).
    pub fn new(channel: Channel, token: &str) -> Result<Self, ControlError> {
        let token: AsciiMetadataValue =
            MetadataValue::try_from(token).map_err(|_| invalid("token", "token", "must be printable ASCII"))?;
        Ok(Self {
            inner: WireClient::new(channel),
            token,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut().insert(TOKEN_METADATA_KEY, self.token.clone());
        r
    }

    /// Join; answers after the rendezvous.
    pub async fn register(&mut self, r: Registration) -> Result<Assignment, ClientError> {
        let request = self.request(wire::RegisterRequest::from(r));
        let a = self.inner.register(request).await.map_err(ClientError::Status)?;
        Ok(Assignment::try_from(a.into_inner())?)
    }

    /// Stream `beats`; returns the coordinator's commands.
    pub async fn heartbeat<S>(&mut self, beats: S) -> Result<InboundCommands, ClientError>
    where
        S: Stream<Item = Beat> + Send + 'static,
    {
        let request = self.request(beats.map(wire::Beat::from));
        let response = self.inner.heartbeat(request).await.map_err(ClientError::Status)?;
        Ok(InboundCommands {
            inner: response.into_inner(),
        })
    }

    pub async fn report_epoch(&mut self, e: EpochUpdate) -> Result<(), ClientError> {
        let request = self.request(wire::EpochReport::from(e));
        self.inner.report_epoch(request).await.map_err(ClientError::Status)?;
        Ok(())
    }

    pub async fn finish(&mut self, r: FinishReport) -> Result<(), ClientError> {
        let request = self.request(wire::FinishReport::from(r));
        self.inner.finish(request).await.map_err(ClientError::Status)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
