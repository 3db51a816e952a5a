//! `ringtrain-coordinator`: the control plane of a distributed job.
//!
//! [`serve`] runs one job on an already-bound listener until it ends, fails or `shutdown`
//! resolves:
//!
//! 1. **Rendezvous.** Workers call `Register` with the address of their collective server.
//!    Rank = registration order; the ring order is the rank order. Every `Register` call is
//!    answered once the expected number of workers has joined, with the [`Assignment`]: rank,
//!    peer list, job id, the job text and where it came from, which rank writes the run
//!    directory, checkpoint and resume settings, heartbeat and collective timeouts. Not
//!    enough workers before [`CoordinatorConfig::rendezvous_timeout`] fails the job.
//! 2. **Liveness.** Each worker streams heartbeats (epoch, step, last checkpoint). A broken
//!    stream (the process died) fails the job at once; a worker silent for longer than
//!    [`CoordinatorConfig::heartbeat_timeout`] fails it when the timeout passes. Either way
//!    the error names the rank, the worker (host, pid, address), its last epoch and step and
//!    the last checkpoint. When the job fails, every worker still connected is told to stop.
//! 3. **Reports.** The writer rank sends one report per epoch (the engine's metrics as
//!    JSON plus the time spent in all-reduces); every rank ends with `Finish`: a checksum of
//!    its final parameters, or its error. The job succeeds when every rank finished with the
//!    same checksum.
//!
//! **Parallel k-fold.** With [`CoordinatorConfig::parallel_folds`] set to K, the workers are
//! split at the rendezvous into G rings ([`fold_groups`]: G is the largest divisor of the
//! worker count that is at most K). Each assignment then also carries the worker's group:
//! its rank in the group's ring, the group's peers, the folds it trains (`g, g + G, ...`) and
//! a collective job id of its own. Liveness stays per worker, and a failure anywhere stops
//! every group. Ranks must agree on their checksum within their group; the outcome lists each
//! group's summary and `metrics.jsonl` lines ([`GroupOutcome`]) for the caller to merge. The
//! run directory goes to the first rank of the group that trains the last fold, so its saved
//! model is the last fold's, as in sequential k-fold.
//!
//! **Elastic training.** With [`CoordinatorConfig::min_workers`] below the starting count or
//! [`CoordinatorConfig::max_workers`] above it, a lost worker no longer ends the job while at
//! least `min_workers` are left: the coordinator makes a new *generation* of the ring from
//! the workers left, in their old order, and tells each its place with a `Reform` command on
//! its heartbeat stream (the workers abandon the step in flight and level themselves with the
//! last step every one of them completed). A worker registering while the job runs, up to
//! `max_workers`, gets a place at the end of the next generation at once; the others hear of
//! it the same way. A worker keeps its number (`rank` in messages) for the whole job; its
//! place in the ring can change. The writer stays the same worker while it lives, else the
//! new ring's first. Every change is kept ([`MembershipChange`]) with where training went on.
//!
//! A failure a worker reports (typically "lost my neighbour") usually has a cause elsewhere;
//! the coordinator waits [`CoordinatorConfig::failure_grace`] for a lost worker to blame
//! before it reports the worker's own error.
//!
//! Every call must carry the job token (`x-ringtrain-token`); calls without it are refused.
//! The standard `grpc.health.v1.Health` service answers on the same port without a token
//! (for Kubernetes `grpc:` probes): `SERVING` for `""` and [`HEALTH_SERVICE`] while the job
//! runs. With [`CoordinatorConfig::metrics`] set, the job's progress is also kept as
//! Prometheus metrics ([`Metrics`], served over HTTP by [`serve_metrics`]).
//!
//! **Architecture invariant:** no compute crate. The job is text plus a fingerprint; the
//! metrics are JSON strings passed through. No printing, no environment, no process exit:
//! progress goes out as [`Event`]s.

mod error;
mod groups;
mod metrics;
mod server;

use std::sync::Arc;
use std::time::Duration;

pub use error::{CoordinatorError, LastCheckpoint, Result};
pub use groups::{fold_groups, FoldPlan};
pub use metrics::{serve_metrics, JobState, Metrics, METRICS_PATH};
pub use ringtrain_proto::coordinator::Assignment;
pub use server::{describe_change, serve};
use tokio::sync::mpsc;

/// The job as the coordinator hands it out: text, not a parsed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobText {
    /// The job file's TOML text.
    pub toml: String,
    /// Where it was read from (workers resolve relative data paths against its directory).
    pub path: String,
    /// Replaces the job's data path when set.
    pub data_path: Option<String>,
}

impl JobText {
    /// FNV-1a 64 of the text and the data override, as 16 hex digits.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let data = self.data_path.as_deref().unwrap_or("");
        for b in self.toml.bytes().chain([0u8]).chain(data.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// Everything [`serve`] needs to run one job.
#[derive(Clone)]
pub struct CoordinatorConfig {
    /// Number of workers in the ring.
    pub workers: usize,
    pub job: JobText,
    /// Identifies the run on every call and every collective frame (printable ASCII).
    pub job_id: String,
    /// Shared secret every call must carry.
    pub token: String,
    /// Run directory of the writer rank.
    pub out_dir: Option<String>,
    pub writer_rank: usize,
    /// Checkpoint every rank resumes from.
    pub resume_from: Option<String>,
    /// Save a checkpoint every this many epochs.
    pub checkpoint_every: Option<usize>,
    /// How long to wait for all workers to register.
    pub rendezvous_timeout: Duration,
    /// How often workers beat.
    pub heartbeat_interval: Duration,
    /// A worker silent for longer than this fails the job.
    pub heartbeat_timeout: Duration,
    /// Receive deadline of the workers' collectives.
    pub collective_timeout: Duration,
    /// How long a failure reported by a worker waits for a lost worker to blame instead.
    pub failure_grace: Duration,
    /// Progress of the job, if someone listens.
    pub events: Option<mpsc::UnboundedSender<Event>>,
    /// Operator metrics to keep up to date, if someone serves them.
    pub metrics: Option<Arc<Metrics>>,
    /// Parallel k-fold with this many folds: the workers form [`fold_groups`] rings, each
    /// training its share of the folds. `None`: one ring of every worker.
    pub parallel_folds: Option<usize>,
    /// Elastic training: the job goes on while at least this many workers are left
    /// (`None`: it needs every worker).
    pub min_workers: Option<usize>,
    /// Elastic training: workers may join the running job up to this many (`None`: no
    /// more than `workers`).
    pub max_workers: Option<usize>,
    /// Mutual TLS: only clients with a certificate signed by the cluster's CA get in.
    pub tls: Option<ringtrain_proto::tls::Tls>,
}

/// Name under which the health service reports the coordinator (besides `""`).
pub const HEALTH_SERVICE: &str = "ringtrain.v1.Coordinator";

impl std::fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorConfig")
            .field("workers", &self.workers)
            .field("job_path", &self.job.path)
            .field("job_id", &self.job_id)
            .field("token", &"<redacted>")
            .field("out_dir", &self.out_dir)
            .field("writer_rank", &self.writer_rank)
            .field("resume_from", &self.resume_from)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("rendezvous_timeout", &self.rendezvous_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("collective_timeout", &self.collective_timeout)
            .field("parallel_folds", &self.parallel_folds)
            .field("min_workers", &self.min_workers)
            .field("max_workers", &self.max_workers)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl CoordinatorConfig {
    /// Defaults: writer rank 0, 60 s rendezvous, beats every 250 ms, 5 s heartbeat and
    /// collective timeouts, 1 s failure grace, no run directory, no checkpoints.
    pub fn new(workers: usize, job: JobText, job_id: impl Into<String>, token: impl Into<String>) -> Self {
        CoordinatorConfig {
            workers,
            job,
            job_id: job_id.into(),
            token: token.into(),
            out_dir: None,
            writer_rank: 0,
            resume_from: None,
            checkpoint_every: None,
            rendezvous_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(250),
            heartbeat_timeout: Duration::from_secs(5),
            collective_timeout: Duration::from_secs(5),
            failure_grace: Duration::from_secs(1),
            events: None,
            metrics: None,
            parallel_folds: None,
            min_workers: None,
            max_workers: None,
            tls: None,
        }
    }

    /// Whether workers may leave or join while the job runs.
    pub fn elastic(&self) -> bool {
        self.min_workers.is_some_and(|m| m < self.workers) || self.max_workers.is_some_and(|m| m > self.workers)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(CoordinatorError::Config { what });
        if self.workers == 0 {
            return bad("at least one worker is needed".into());
        }
        if self.writer_rank >= self.workers {
            return bad(format!(
                "writer rank {} is not below the {} workers",
                self.writer_rank, self.workers
            ));
        }
        let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&self.token) {
            return bad("the token must be non-empty printable ASCII without spaces".into());
        }
        if !printable(&self.job_id) {
            return bad("the job id must be non-empty printable ASCII without spaces".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(format!(
                "the heartbeat timeout ({:?}) must exceed the interval ({:?})",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.rendezvous_timeout.is_zero() || self.collective_timeout.is_zero() {
            return bad("timeouts must be positive".into());
        }
        if self.parallel_folds == Some(0) {
            return bad("parallel k-fold needs at least one fold".into());
        }
        if let Some(min) = self.min_workers {
            if min == 0 || min > self.workers {
                return bad(format!(
                    "min_workers {min} must be between 1 and the {} workers",
                    self.workers
                ));
            }
        }
        if let Some(max) = self.max_workers {
            if max < self.workers {
                return bad(format!(
                    "max_workers {max} is below the {} starting workers",
                    self.workers
                ));
            }
        }
        if self.elastic() && self.parallel_folds.is_some() {
            return bad("parallel k-fold rings cannot change membership: drop min_workers/max_workers".into());
        }
        Ok(())
    }
}

/// One registered worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub rank: usize,
    /// Its collective server's address.
    pub peer_addr: String,
    pub host: String,
    pub pid: u32,
}

impl std::fmt::Display for WorkerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}, peer {}", self.pid, self.host, self.peer_addr)
    }
}

/// The metrics of one epoch, as the writer rank reported them.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub rank: usize,
    pub epoch: u64,
    /// The engine's epoch report (one line of `metrics.jsonl`).
    pub metrics_json: String,
    /// Seconds spent in gradient all-reduces during the epoch.
    pub comm_secs: f64,
    pub epoch_secs: f64,
}

/// What happens while a job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Registered(WorkerInfo),
    /// Everyone registered; peers in ring order.
    RingFormed {
        peers: Vec<String>,
    },
    /// Parallel k-fold: the rings formed at the rendezvous (after [`Event::RingFormed`]).
    FoldGroups {
        groups: Vec<FoldPlan>,
    },
    Epoch(EpochRecord),
    /// A rank reported success.
    Finished {
        rank: usize,
    },
    /// The job failed; workers are being told to stop.
    Failing {
        error: String,
    },
    /// Elastic training: the ring re-formed.
    Reformed(MembershipChange),
    /// Elastic training: the workers of generation `generation` went on from `step`,
    /// having given up `steps_lost` completed steps (0 unless something went wrong: a worker
    /// behind takes the state of one ahead).
    Resumed {
        generation: u64,
        step: u64,
        steps_lost: u64,
    },
}

/// One change of an elastic job's membership.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipChange {
    /// The new ring's generation (the first ring is 0).
    pub generation: u64,
    /// Seconds since the coordinator started.
    pub at_secs: f64,
    /// Workers that left, and why.
    pub left: Vec<Departure>,
    /// Workers that joined (their numbers).
    pub joined: Vec<usize>,
    /// Workers in the new ring, by number, in ring order.
    pub members: Vec<usize>,
    /// The optimizer step the new ring went on from, and the completed steps a worker gave
    /// up to get there, once the workers report it. Only the step in flight when the ring
    /// broke is computed again.
    pub resumed_step: Option<u64>,
    pub steps_lost: Option<u64>,
}

/// A worker that left an elastic job.
#[derive(Debug, Clone, PartialEq)]
pub struct Departure {
    pub rank: usize,
    /// "pid … on host, peer …".
    pub worker: String,
    pub reason: String,
}

/// A job that completed on every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub job_id: String,
    pub workers: Vec<WorkerInfo>,
    pub epochs: Vec<EpochRecord>,
    /// The writer rank's run summary (JSON).
    pub summary_json: String,
    /// The final parameters' checksum, equal on every rank.
    pub params_checksum: u64,
    /// Per rank: seconds spent in collectives.
    pub comm_secs: Vec<f64>,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Parallel k-fold: one entry per group, by index (empty otherwise). `summary_json`,
    /// `params_checksum` and `steps` above are then those of the group that wrote the run
    /// directory (the one that trained the last fold).
    pub groups: Vec<GroupOutcome>,
    /// Elastic training: every change of membership, in order (empty otherwise).
    pub membership: Vec<MembershipChange>,
}

/// What one ring of a parallel k-fold job reported.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOutcome {
    pub plan: FoldPlan,
    /// The group's run summary (JSON), covering only its folds.
    pub summary_json: String,
    /// The group's `metrics.jsonl` lines (each names its fold).
    pub metrics_jsonl: String,
    /// The final parameters' checksum (of the group's last fold), equal on the group's ranks.
    pub params_checksum: u64,
    pub steps: u64,
}
