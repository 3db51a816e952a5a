//! The command-line arguments of `launch`, `coordinator` and `worker`.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Args;

use crate::certs_cmd::TlsArgs;
use crate::collective_cmd::TOKEN_ENV;

/// Options shared by `launch` and `coordinator`.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Number of workers.
    #[arg(long, env = "RINGTRAIN_WORKERS")]
    pub workers: usize,
    /// The job file (TOML).
    #[arg(env = "RINGTRAIN_JOB")]
    pub job: PathBuf,
    /// Run directory (written by rank 0): metrics, summary, weights, checkpoints.
    #[arg(long, env = "RINGTRAIN_OUT")]
    pub out: PathBuf,
    /// Continue from OUT/checkpoint.safetensors (the same job; any number of workers).
    #[arg(long, conflicts_with = "resume_latest")]
    pub resume: bool,
    /// Continue from OUT/checkpoint.safetensors when it exists, else start afresh; a run
    /// whose summary and last-epoch checkpoint are already there is not repeated (for
    /// restarts by a supervisor such as a Kubernetes Job).
    #[arg(long, env = "RINGTRAIN_RESUME_LATEST", value_parser = BoolishValueParser::new())]
    pub resume_latest: bool,
    /// Save OUT/checkpoint.safetensors every K epochs (and after the last).
    #[arg(long, value_name = "K", env = "RINGTRAIN_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<usize>,
    /// Override the job's data path (file or directory; must exist on every worker).
    #[arg(long, env = "RINGTRAIN_DATA")]
    pub data: Option<PathBuf>,
    /// A worker silent for this long fails the job.
    #[arg(long, default_value_t = 5000, env = "RINGTRAIN_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: u64,
    /// How long to wait for every worker to register.
    #[arg(long, default_value_t = 60_000, env = "RINGTRAIN_RENDEZVOUS_TIMEOUT_MS")]
    pub rendezvous_timeout_ms: u64,
    /// Elastic training: go on while at least this many workers are left (default: all
    /// --workers are needed). The global batch stays the job's batch_size.
    #[arg(long, value_name = "N", env = "RINGTRAIN_MIN_WORKERS")]
    pub min_workers: Option<usize>,
    /// Elastic training: let workers join the running job up to this many (default: no more
    /// than --workers).
    #[arg(long, value_name = "N", env = "RINGTRAIN_MAX_WORKERS")]
    pub max_workers: Option<usize>,
    /// Print only the final summary.
    #[arg(long, env = "RINGTRAIN_QUIET", value_parser = BoolishValueParser::new())]
    pub quiet: bool,
}

/// `ringtrain launch`: coordinator in process, N local worker processes.
#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Elastic jobs: start a new worker in place of one that died, up to this many times
    /// in all; it joins the running job (like torchrun's --max-restarts, without restarting
    /// the others).
    #[arg(long, value_name = "N", default_value_t = 0, env = "RINGTRAIN_MAX_RESTARTS")]
    pub max_restarts: usize,
    /// How long after a worker died its replacement starts (a worker that dies at once
    /// again must not spin).
    #[arg(long, value_name = "MS", default_value_t = 1000, env = "RINGTRAIN_RESTART_DELAY_MS")]
    pub restart_delay_ms: u64,
    /// Run without TLS. By default every connection of the run uses mutual TLS with a CA
    /// made for the run (and removed after it).
    #[arg(long, env = "RINGTRAIN_PLAINTEXT", value_parser = BoolishValueParser::new())]
    pub plaintext: bool,
}

/// `ringtrain coordinator`: the control plane of a multi-node run.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, env = "RINGTRAIN_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: String,
    /// Shared job token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub token: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port; the bound
    /// address is printed).
    #[arg(long, value_name = "ADDR", env = "RINGTRAIN_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// After the job ends, keep serving /metrics this long so a scraper sees the final state.
    #[arg(long, default_value_t = 0, env = "RINGTRAIN_METRICS_LINGER_MS")]
    pub metrics_linger_ms: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub job: JobArgs,
}

/// `ringtrain worker`: one rank of a distributed run.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The coordinator's address (HOST:PORT).
    #[arg(long, env = "RINGTRAIN_COORDINATOR")]
    pub coordinator: String,
    /// Shared job token.
    #[arg(long, env = TOKEN_ENV, hide_env_values = true)]
    pub token: String,
    /// Address of this worker's collective server (port 0: any free port). On 0.0.0.0 the
    /// other workers reach it at the IP this worker called the coordinator from.
    #[arg(long, env = "RINGTRAIN_PEER_ADDR", default_value = "0.0.0.0:0")]
    pub peer_addr: String,
    /// Address the other workers should use instead (e.g. a stable DNS name and port).
    #[arg(long, env = "RINGTRAIN_ADVERTISE_ADDR")]
    pub advertise: Option<String>,
    /// How long to keep trying to reach the coordinator.
    #[arg(long, default_value_t = 30_000, env = "RINGTRAIN_CONNECT_TIMEOUT_MS")]
    pub connect_timeout_ms: u64,
    /// How long to wait for the other workers to register.
    #[arg(long, default_value_t = 120_000, env = "RINGTRAIN_RENDEZVOUS_TIMEOUT_MS")]
    pub rendezvous_timeout_ms: u64,
    /// A coordinator unreachable for this long (its connection answers no ping) stops this
    /// worker; the coordinator's own setting of the same name, mirrored.
    #[arg(long, default_value_t = 5000, env = "RINGTRAIN_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: u64,
    /// Runtime threads moving collective bytes.
    #[arg(long, default_value_t = 1, env = "RINGTRAIN_IO_THREADS")]
    pub io_threads: usize,
    /// After a job ends (finished or failed), join the next one instead of exiting; a
    /// missing coordinator is waited for. For workers kept alive by a supervisor (a
    /// Kubernetes StatefulSet), so a restarted coordinator finds them again.
    #[arg(long, env = "RINGTRAIN_REJOIN", value_parser = BoolishValueParser::new())]
    pub rejoin: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}
