//! [`run_worker`]: one worker process's life, from registration to the final report.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtrain_collective::{GrpcConfig, Tls};
use ringtrain_config::{Compression, Job};
use ringtrain_proto::coordinator::{
    Assignment, Beat, ClientError, Command, CoordinatorClient, EpochUpdate, FinishReport, Registration, WorkerOutcome,
};
use ringtrain_train::{read_checkpoint_manifest, run_job_opts, Progress, RunOptions, RunSummary, TrainError};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::error::{Result, WorkerError};
use crate::membership::Membership;
use crate::sync::{Elastic, RingSync, SyncStats};

/// Said where a connection failed in a way a TLS mismatch explains.
const TLS_HINT: &str =
    " (with TLS, both sides need --tls-ca/--tls-cert/--tls-key and certificates signed by the same CA)";

/// Deadline of every unary call to the coordinator (registration waits longer).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to reach a coordinator that is not up yet.
const RETRY: Duration = Duration::from_millis(100);

/// How a worker finds its coordinator and its place in the ring.
#[derive(Debug)]
pub struct WorkerOptions {
    /// The coordinator's address (`host:port` or `http://host:port`).
    pub coordinator: String,
    /// Shared job token.
    pub token: String,
    /// Already-bound listener of this worker's collective server.
    pub listener: std::net::TcpListener,
    /// The listener's address as the other workers reach it.
    pub advertise: String,
    /// Host name and process id, for the coordinator's messages.
    pub host: String,
    pub pid: u32,
    /// Runtime threads moving collective bytes.
    pub io_threads: usize,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// How long to wait for the other workers to register.
    pub rendezvous_timeout: Duration,
    /// How long the coordinator may stay silent (no sign of life answering this worker's
    /// beats) before this worker stops training: the coordinator's heartbeat timeout,
    /// mirrored. At least four beat intervals are always allowed.
    pub coordinator_timeout: Duration,
    /// Mutual TLS to the coordinator and on both ring links (`None`: plaintext).
    pub tls: Option<Tls>,
}

/// What happened on the way: rank assigned, epochs done. Given to the observer.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// Registration answered: this worker's place in the job. `world` is the size of the ring
    /// it trains in: the whole job, or its group of a parallel k-fold run (`group`).
    Assigned {
        rank: usize,
        world: usize,
        job_id: String,
        group: Option<usize>,
    },
    /// The engine's progress.
    Progress(Progress),
}

/// A worker's successful run.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerReport {
    pub rank: usize,
    pub world: usize,
    /// Parallel k-fold: the group this worker trained in.
    pub group: Option<usize>,
    pub summary: RunSummary,
    /// Checksum of the final parameters, checked equal on every rank.
    pub params_checksum: u64,
    pub stats: SyncStats,
}

/// Where training is, for heartbeats.
#[derive(Debug, Default, Clone, Copy)]
struct Position {
    epoch: u64,
    step: u64,
    /// Last epoch whose checkpoint is on disk.
    checkpoint_epoch: Option<u64>,
    /// The last epoch was reported: the final evaluation runs.
    finishing: bool,
}

struct Control {
    runtime: Runtime,
    client: CoordinatorClient,
    addr: String,
}

impl Control {
    fn err(&self, what: &'static str, reason: impl std::fmt::Display) -> WorkerError {
        WorkerError::Coordinator {
            addr: self.addr.clone(),
            what,
            reason: reason.to_string(),
        }
    }

    fn call<T, F>(&self, what: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, ringtrain_proto::coordinator::ClientError>>,
    {
        // The timer must be created inside the runtime.
        let answer = self.runtime.block_on(async { tokio::time::timeout(timeout, f).await });
        self.answered(what, timeout, answer)
    }

    /// A call's answer, or why there was none within `timeout`.
    fn answered<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        answer: Result<Result<T, ClientError>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        match answer {
            Ok(Ok(v)) => Ok(v),
            // A TLS server drops a plaintext client (and the other way round) without a word:
            // the call fails in the transport.
            Ok(Err(ClientError::Status(s)))
                if matches!(
                    s.code(),
                    tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Unavailable
                ) =>
            {
                Err(self.err(what, format!("{}{TLS_HINT}", ClientError::Status(s))))
            }
            Ok(Err(e)) => Err(self.err(what, e)),
            Err(_) => Err(self.err(what, format!("no answer within {timeout:?}"))),
        }
    }

    /// [`Control::call`], given up the moment the coordinator is found lost: waiting out
    /// the deadline would only keep this process alive after its job is over.
    fn call_unless_lost<T, F>(&self, what: &'static str, lost: &watch::Receiver<bool>, f: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<T, ringtrain_proto::coordinator::ClientError>>,
    {
        let mut lost = lost.clone();
        let answer = self.runtime.block_on(async {
            tokio::select! {
                r = tokio::time::timeout(CALL_TIMEOUT, f) => Some(r),
                () = until_lost(&mut lost) => None,
            }
        });
        match answer {
            Some(answer) => self.answered(what, CALL_TIMEOUT, answer),
            None => Err(self.err(what, "the coordinator was lost during the job")),
        }
    }
}

/// Resolves once the heartbeat task has found the coordinator lost (never if it ended
/// otherwise).
async fn until_lost(lost: &mut watch::Receiver<bool>) {
    if lost.wait_for(|l| *l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn connect(opts: &WorkerOptions) -> Result<Control> {
    let setup = |e: std::io::Error| WorkerError::Setup {
        reason: format!("cannot start the control runtime: {e}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ringtrain-control")
        .enable_all()
        .build()
        .map_err(setup)?;
    let addr = opts.coordinator.clone();
    let scheme = Tls::scheme(opts.tls.as_ref());
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{addr}"),
    };
    let bad = |what: &'static str, reason: String| WorkerError::Coordinator {
        addr: addr.clone(),
        what,
        reason,
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| bad("bad address", e.to_string()))?;
    if let Some(tls) = &opts.tls {
        endpoint = endpoint
            .tls_config(tls.client())
            .map_err(|e| bad("unusable TLS settings", e.to_string()))?;
    }
    let endpoint = endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    let channel = runtime.block_on(async {
        loop {
            let attempt = tokio::time::timeout_at(deadline, endpoint.connect()).await;
            match attempt {
                Ok(Ok(channel)) => return Ok(channel),
                Ok(Err(_)) if tokio::time::Instant::now() + RETRY < deadline => {
                    tokio::time::sleep(RETRY).await;
                }
                Ok(Err(e)) => {
                    let mut reason = ringtrain_proto::grpc::error_chain(&e);
                    if reason.contains("certificate") || reason.contains("tls") || reason.contains("TLS") {
                        reason.push_str(TLS_HINT);
                    }
                    return Err(bad(
                        "unreachable",
                        format!("no connection within {:?} ({reason})", opts.connect_timeout),
                    ));
                }
                Err(_) => {
                    return Err(bad(
                        "unreachable",
                        format!("no connection within {:?}", opts.connect_timeout),
                    ))
                }
            }
        }
    })?;
    let client = CoordinatorClient::new(channel, &opts.token).map_err(|e| bad("bad token", e.to_string()))?;
    Ok(Control { runtime, client, addr })
}

/// Loads the job the coordinator sent, resolving its data paths like `Job::load` does.
fn load_job(a: &Assignment) -> std::result::Result<Job, String> {
    let data = a.data_path.as_deref().map(Path::new);
    Job::from_text(&a.job_toml, Path::new(&a.job_path), data).map_err(|e| e.to_string())
}

/// Runs one worker: connects to the coordinator (retrying until `connect_timeout`),
/// registers, joins the ring, trains its shard with heartbeats running, reports every epoch
/// (writer rank) and its result. Blocks until done; every wait has a deadline. `observe`
/// sees the assignment and the engine's progress.
pub fn run_worker(opts: WorkerOptions, observe: &mut dyn FnMut(WorkerEvent)) -> Result<WorkerReport> {
    let mut control = connect(&opts)?;
    let registration = Registration {
        peer_addr: opts.advertise.clone(),
        host: opts.host.clone(),
        pid: opts.pid,
        remote: None,
    };
    let mut client = control.client.clone();
    let a = control.call(
        "registration",
        opts.rendezvous_timeout + CALL_TIMEOUT,
        client.register(registration),
    )?;
    let rank = a.rank;
    let world = a.group.as_ref().map_or(a.peers.len(), |g| g.peers.len());
    let group = a.group.as_ref().map(|g| g.index);
    observe(WorkerEvent::Assigned {
        rank: a.group.as_ref().map_or(a.ring_rank, |g| g.rank),
        world,
        job_id: a.job_id.clone(),
        group,
    });

    // Heartbeats start at once: the coordinator watches us from the rendezvous on.
    let position = Arc::new(Mutex::new(Position::default()));
    let nudge = Arc::new(Notify::new());
    let membership = Arc::new(Membership::default());
    let (lost_tx, lost) = watch::channel(false);
    let beats = start_heartbeats(
        &mut control,
        (&a, opts.coordinator_timeout),
        position.clone(),
        nudge.clone(),
        membership.clone(),
        lost_tx,
    )?;

    let result = train(&control, &a, &opts, (position, nudge), (&membership, &lost), observe);
    let outcome = match &result {
        Ok(t) => WorkerOutcome::Finished {
            params_checksum: t.checksum,
            summary_json: serde_json::to_string(&t.summary).unwrap_or_default(),
            comm_secs: t.stats.allreduce_secs + t.stats.other_secs,
            steps: t.steps,
            metrics_jsonl: t.metrics_jsonl.clone(),
        },
        Err(e) => WorkerOutcome::Failed {
            error: e.to_string(),
            bad_input: e.is_bad_input(),
        },
    };
    let mut client = control.client.clone();
    let finished = control.call_unless_lost(
        "final report",
        &lost,
        client.finish(FinishReport {
            job_id: a.job_id.clone(),
            rank,
            outcome,
        }),
    );
    // Only now stop beating: a stream that ends before the final report reads as a crash.
    beats.abort();
    let trained = result?;
    finished?;
    Ok(WorkerReport {
        rank,
        world,
        group,
        summary: trained.summary,
        params_checksum: trained.checksum,
        stats: trained.stats,
    })
}

/// Streams beats from a task, every interval and whenever `nudge` is notified (an epoch
/// ended, a checkpoint landed, the ring re-formed); an abort command (or losing the
/// coordinator) stops `membership`, and losing the coordinator also sets `lost`; a new ring
/// is announced to `membership`. The coordinator answers beats with signs of life; `silent`
/// without one means it is gone, even when no reset arrives (its host was cut off the
/// network).
fn start_heartbeats(
    control: &mut Control,
    (a, silent): (&Assignment, Duration),
    position: Arc<Mutex<Position>>,
    nudge: Arc<Notify>,
    membership: Arc<Membership>,
    lost: watch::Sender<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<Beat>(4);
    let (job_id, rank, every) = (a.job_id.clone(), a.rank, a.heartbeat_interval);
    // Signs of life answer beats: a timeout shorter than a few intervals would misfire.
    let silent = silent.max(every * 4);
    let beat_membership = membership.clone();
    let ticker = control.runtime.spawn(async move {
        let mut interval = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = nudge.notified() => {}
            }
            let p = position.lock().map(|p| *p).unwrap_or_default();
            let beat = Beat {
                job_id: job_id.clone(),
                rank,
                epoch: p.epoch,
                step: p.step,
                checkpoint_epoch: p.checkpoint_epoch,
                rejoined: beat_membership.rejoined(),
                finishing: p.finishing,
            };
            if tx.send(beat).await.is_err() {
                break;
            }
        }
    });
    let mut client = control.client.clone();
    let mut commands = control.call("heartbeat", CALL_TIMEOUT, client.heartbeat(ReceiverStream::new(rx)))?;
    let addr = control.addr.clone();
    let listener = control.runtime.spawn(async move {
        let why = loop {
            match tokio::time::timeout(silent, commands.next()).await {
                Ok(Ok(Some(Command::Alive))) => {}
                Ok(Ok(Some(Command::Reform(r)))) => membership.announce(r),
                Ok(Ok(Some(Command::Abort(a)))) => {
                    membership.stop(&format!("the coordinator stopped the job: {}", a.reason));
                    return;
                }
                Ok(Ok(None)) => break format!("the coordinator at {addr} closed the heartbeat stream"),
                Ok(Err(status)) => break format!("lost the coordinator at {addr}: {}", status.message()),
                Err(_) => {
                    break format!(
                        "lost the coordinator at {addr}: no sign of life for {silent:?} (unreachable or hung)"
                    )
                }
            }
        };
        lost.send_replace(true);
        membership.stop(&why);
    });
    Ok(control.runtime.spawn(async move {
        // Dropping either ends the stream: cancel both together.
        let _guard = (AbortOnDrop(ticker), AbortOnDrop(listener));
        std::future::pending::<()>().await;
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Trained {
    summary: RunSummary,
    checksum: u64,
    stats: SyncStats,
    steps: u64,
    /// Parallel k-fold, the group's rank 0: its `metrics.jsonl` lines for the coordinator.
    metrics_jsonl: String,
}

fn train(
    control: &Control,
    a: &Assignment,
    opts: &WorkerOptions,
    (position, nudge): (Arc<Mutex<Position>>, Arc<Notify>),
    (membership, lost): (&Arc<Membership>, &watch::Receiver<bool>),
    observe: &mut dyn FnMut(WorkerEvent),
) -> Result<Trained> {
    let rank = a.rank;
    let job = load_job(a).map_err(|reason| WorkerError::Job {
        rank,
        path: a.job_path.clone(),
        reason,
    })?;
    // A worker that joins a running job takes the state from the others, not the checkpoint.
    let resume = a.resume_from.as_deref().map(Path::new).filter(|_| !a.joining);
    if let Some(path) = resume {
        let manifest = read_checkpoint_manifest(path).map_err(|e| WorkerError::Train {
            rank,
            source: Box::new(e),
        })?;
        if let Ok(mut p) = position.lock() {
            p.step = manifest.step;
            p.epoch = manifest.epoch as u64;
            p.checkpoint_epoch = Some(manifest.epoch as u64);
        }
    }
    // A parallel k-fold group trains in a ring of its own, under its own collective job id.
    let mut config = match &a.group {
        Some(g) => GrpcConfig::new(g.rank, g.peers.clone(), g.ring_id.clone(), opts.token.clone()),
        None => GrpcConfig::new(a.ring_rank, a.peers.clone(), a.job_id.clone(), opts.token.clone()),
    };
    config.timeout = a.collective_timeout;
    config.connect_timeout = opts.connect_timeout.max(Duration::from_secs(5));
    config.generation = a.generation;
    config.tls = opts.tls.clone();
    let listener = opts.listener.try_clone().map_err(|e| WorkerError::Setup {
        reason: format!("cannot use the collective listener: {e}"),
    })?;
    let mut sync = if a.elastic {
        RingSync::connect_elastic(Elastic {
            membership: membership.clone(),
            config,
            listener,
            io_threads: opts.io_threads,
            // The coordinator declares a silent peer lost after its heartbeat timeout
            // (mirrored here); a broken connection it sees at once.
            wait: opts.coordinator_timeout + a.heartbeat_interval * 4 + a.collective_timeout,
            writer: a.writer_rank,
            joining: a.joining,
        })?
    } else {
        RingSync::connect(&config, listener, opts.io_threads, membership.current())?
    };
    if job.distributed.compression == Compression::Bf16 {
        sync = sync.with_bf16_compression();
    }
    sync = sync.with_overlap(job.distributed.overlap);
    let stats = sync.stats();

    let out = a.out_dir.as_deref().map(Path::new);
    let run = RunOptions {
        out,
        checkpoint_every: a.checkpoint_every.filter(|_| out.is_some()),
        resume_from: resume,
        folds: a.group.as_ref().map(|g| g.folds.as_slice()),
        skip_baselines: false,
    };
    // Every group reports its own epochs (and lines) through its first rank.
    let writer = match &a.group {
        Some(g) => g.rank == 0,
        None => rank == a.writer_rank,
    };
    let mut metrics_jsonl = String::new();
    let keep_lines = writer && a.group.is_some();
    let epochs = job.training.epochs as u64;
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel::<EpochUpdate>();
    let mut client = control.client.clone();
    let reporter = control.runtime.spawn(async move {
        while let Some(update) = updates_rx.recv().await {
            // Metrics are best effort: a slow coordinator must not stall training.
            let _ = tokio::time::timeout(CALL_TIMEOUT, client.report_epoch(update)).await;
        }
    });
    let (mut comm_mark, mut bytes_mark, mut epoch_mark) = (0.0f64, 0u64, Instant::now());
    let mut on_progress = |p: Progress| {
        if let Ok(mut pos) = position.lock() {
            match &p {
                Progress::Rejoined {
                    epoch,
                    step,
                    stepped_back,
                    ..
                } => {
                    pos.epoch = *epoch as u64;
                    pos.step = *step;
                    membership.set_rejoined(*step, *stepped_back);
                    nudge.notify_one();
                }
                Progress::Batch { epoch, step, .. } => {
                    pos.epoch = *epoch as u64;
                    pos.step = *step;
                }
                Progress::Epoch(r) => {
                    pos.finishing = r.epoch as u64 == epochs && r.fold.is_none();
                    nudge.notify_one();
                }
                Progress::Checkpoint { epoch } => {
                    pos.checkpoint_epoch = Some(*epoch as u64);
                    nudge.notify_one();
                }
            }
        }
        if let (true, Progress::Epoch(r)) = (keep_lines, &p) {
            // The same serialisation as the engine's metrics.jsonl lines.
            if let Ok(line) = serde_json::to_string(r) {
                metrics_jsonl.push_str(&line);
                metrics_jsonl.push('\n');
            }
        }
        let writer = if a.elastic { membership.writer() } else { writer };
        if let (true, Progress::Epoch(r)) = (writer, &p) {
            let (comm, bytes) = stats
                .lock()
                .map(|s| (s.allreduce_secs, s.allreduce_bytes))
                .unwrap_or((0.0, 0));
            let now = Instant::now();
            let _ = updates_tx.send(EpochUpdate {
                job_id: a.job_id.clone(),
                rank,
                epoch: r.epoch as u64,
                metrics_json: serde_json::to_string(r).unwrap_or_default(),
                comm_secs: comm - comm_mark,
                epoch_secs: now.duration_since(epoch_mark).as_secs_f64(),
                train_loss: r.train_loss,
                test_loss: r.test_loss,
                test_accuracy: r.test_accuracy,
                examples_per_sec: r.examples_per_sec,
                allreduce_bytes: bytes.saturating_sub(bytes_mark),
            });
            comm_mark = comm;
            bytes_mark = bytes;
            epoch_mark = now;
        }
        observe(WorkerEvent::Progress(p));
    };
    let result = run_job_opts(&job, &a.job_toml, &run, &mut sync, &mut on_progress);
    drop(updates_tx);
    // Deliver the epoch reports before the final one (bounded by their own deadlines), unless
    // the coordinator is gone.
    let mut gone = lost.clone();
    control.runtime.block_on(async {
        tokio::select! {
            _ = tokio::time::timeout(CALL_TIMEOUT, reporter) => {}
            () = until_lost(&mut gone) => {}
        }
    });
    let summary = result.map_err(|e: TrainError| WorkerError::Train {
        rank,
        source: Box::new(e),
    })?;
    let pos = position.lock().map(|p| *p).unwrap_or_default();
    let checksum = sync.final_checksum().unwrap_or(0);
    let final_stats = stats.lock().map(|s| *s).unwrap_or_default();
    Ok(Trained {
        summary,
        checksum,
        stats: final_stats,
        steps: pos.step,
        metrics_jsonl,
    })
}
