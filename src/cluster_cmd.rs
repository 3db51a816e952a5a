//! `ringtrain launch | coordinator | worker`: distributed data-parallel training.
//!
//! * `launch` runs the coordinator in this process on 127.0.0.1 (port 0) and N copies of this
//!   binary as `worker` children, each with cores / N threads. Children are killed when
//!   anything fails, and every wait has a deadline. In an elastic job (`--min-workers`,
//!   `--max-workers`) a child's death is the coordinator's to judge, and `--max-restarts`
//!   starts replacements that join the running job.
//! * `coordinator` and `worker` are the two halves for multi-node runs; their settings also
//!   come from `RINGTRAIN_*` environment variables.
//!
//! Each process prints its bound address as one JSON line
//! (`{"event":"listening","role":"coordinator","addr":"HOST:PORT"}`). The job token travels in
//! `RINGTRAIN_TOKEN`, never on a command line.
#![allow(clippy::print_stdout)] // reason: printing progress and results is this module's job

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::builder::BoolishValueParser;
use clap::Args;
use ringtrain_config::EvalScheme;
use ringtrain_coordinator::{
    fold_groups, serve, serve_metrics, CoordinatorConfig, CoordinatorError, Event, GroupOutcome, JobOutcome, JobText,
    Metrics,
};
use ringtrain_train::{EpochReport, Progress, RunSummary};
use ringtrain_worker::{run_worker, WorkerEvent, WorkerOptions};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::certs_cmd::{Throwaway, TlsArgs};
use crate::collective_cmd::TOKEN_ENV;

/// Pause of a `--rejoin` worker between two jobs.
const REJOIN_PAUSE: Duration = Duration::from_secs(1);
/// How long `launch` waits for its workers to exit after a successful job.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// A failed child makes `launch` give up this long after its exit unless the coordinator
/// has already explained the failure (its own grace period is shorter).
const CHILD_FAILURE_GRACE: Duration = Duration::from_millis(1500);

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

/// A job checked here, before any worker sees it.
struct Prepared {
    spec: JobText,
    epochs: usize,
    resume_from: Option<String>,
    /// `--resume-latest` found the run already complete: nothing to train.
    finished: bool,
    /// Parallel k-fold: the number of folds the worker groups share.
    parallel_folds: Option<usize>,
}

fn prepare(args: &JobArgs) -> anyhow::Result<Prepared> {
    if args.workers == 0 {
        return Err(crate::bad_input("--workers must be at least 1"));
    }
    let (job, text) = crate::load_job_with_data(&args.job, args.data.as_deref())?;
    let parallel_folds =
        (job.evaluation.parallel_folds && job.evaluation.scheme == EvalScheme::Kfold).then_some(job.evaluation.folds);
    if let Some(k) = parallel_folds.filter(|_| job.training.tbptt) {
        // Each group is a ring of its own: the streams split over the group, not the job.
        let groups = fold_groups(args.workers, k);
        let size = args.workers / groups.len().max(1);
        if job.training.batch_size % size != 0 {
            return Err(crate::bad_input(format!(
                "{}: training.batch_size {} must divide evenly by the group size {size} \
                 (evaluation.parallel_folds: {} workers form {} groups of {size} for {k} folds; \
                 truncated BPTT gives each worker of a group batch / group size streams)",
                args.job.display(),
                job.training.batch_size,
                args.workers,
                groups.len()
            )));
        }
    } else if job.training.tbptt && job.training.batch_size % args.workers != 0 {
        return Err(crate::bad_input(format!(
            "{}: training.batch_size {} must divide evenly by --workers {} (truncated BPTT gives each worker \
             batch / workers streams)",
            args.job.display(),
            job.training.batch_size,
            args.workers
        )));
    }
    let elastic =
        args.min_workers.is_some_and(|m| m < args.workers) || args.max_workers.is_some_and(|m| m > args.workers);
    if let Some(min) = args.min_workers.filter(|&m| m == 0 || m > args.workers) {
        return Err(crate::bad_input(format!(
            "--min-workers {min} must be between 1 and --workers {}",
            args.workers
        )));
    }
    if let Some(max) = args.max_workers.filter(|&m| m < args.workers) {
        return Err(crate::bad_input(format!(
            "--max-workers {max} is below --workers {}",
            args.workers
        )));
    }
    if elastic {
        let why = if job.training.tbptt {
            Some("training.tbptt cuts the text into streams per worker")
        } else if job.evaluation.scheme == EvalScheme::Kfold {
            Some("evaluation.scheme = \"kfold\" trains several models in turn")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(crate::bad_input(format!(
                "{}: an elastic job (--min-workers/--max-workers) cannot change membership here: {why}",
                args.job.display()
            )));
        }
    }
    if args.checkpoint_every == Some(0) {
        return Err(crate::bad_input("--checkpoint-every must be at least 1"));
    }
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let ckpt = absolute(&args.out.join("checkpoint.safetensors"));
    let resume_from = if args.resume {
        if !ckpt.is_file() {
            return Err(crate::bad_input(format!(
                "--resume: no checkpoint at {} (run with --checkpoint-every K first)",
                ckpt.display()
            )));
        }
        Some(ckpt.display().to_string())
    } else if args.resume_latest && ckpt.is_file() {
        Some(ckpt.display().to_string())
    } else {
        None
    };
    // A supervisor restarting a coordinator whose job completed (e.g. the pod was lost after
    // the last report) must not train the finished run again: the last-epoch checkpoint and
    // the summary are the proof it ended.
    let mut finished = false;
    if let (true, Some(path)) = (args.resume_latest, &resume_from) {
        let manifest = ringtrain_train::read_checkpoint_manifest(Path::new(path))
            .map_err(|e| crate::bad_input(format!("--resume-latest: {e} (delete it to start the run over)")))?;
        finished = manifest.epoch >= job.training.epochs && args.out.join("summary.json").is_file();
    }
    Ok(Prepared {
        spec: JobText {
            toml: text,
            path: absolute(&args.job).display().to_string(),
            data_path: args.data.as_deref().map(|d| absolute(d).display().to_string()),
        },
        epochs: job.training.epochs,
        resume_from,
        finished,
        parallel_folds,
    })
}

fn coordinator_config(args: &JobArgs, prepared: &Prepared, token: &str) -> CoordinatorConfig {
    let job_id = format!("run-{}-{}", &prepared.spec.fingerprint()[..8], unix_millis());
    let mut config = CoordinatorConfig::new(args.workers, prepared.spec.clone(), job_id, token);
    let out = std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone());
    config.out_dir = Some(out.display().to_string());
    config.resume_from = prepared.resume_from.clone();
    config.checkpoint_every = args.checkpoint_every;
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms.max(500));
    config.rendezvous_timeout = Duration::from_millis(args.rendezvous_timeout_ms.max(1));
    config.parallel_folds = prepared.parallel_folds;
    config.min_workers = args.min_workers;
    config.max_workers = args.max_workers;
    config
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// A fresh secret for one launch: OS-seeded hash of time and pid (never used for numerics).
fn fresh_token() -> String {
    let state = std::collections::hash_map::RandomState::new();
    let word = |salt: u64| {
        let mut h = state.build_hasher();
        h.write_u128(unix_millis());
        h.write_u32(std::process::id());
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", word(1), word(2))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ringtrain-coordinator")
        .enable_all()
        .build()
        .context("start the coordinator runtime")
}

fn listening(role: &str, addr: &str) {
    println!("{}", json!({"event": "listening", "role": role, "addr": addr}));
}

/// Prints the coordinator's events while it runs; returns the rank of each worker pid.
struct EventPrinter {
    quiet: bool,
    epochs: usize,
    every: usize,
    ranks_by_pid: HashMap<u32, usize>,
}

impl EventPrinter {
    fn new(quiet: bool, epochs: usize) -> Self {
        EventPrinter {
            quiet,
            epochs,
            every: (epochs / 10).max(1),
            ranks_by_pid: HashMap::new(),
        }
    }

    fn show(&mut self, event: Event) {
        match event {
            Event::Registered(w) => {
                self.ranks_by_pid.insert(w.pid, w.rank);
                if !self.quiet {
                    println!("worker rank {} joined ({w})", w.rank);
                }
            }
            Event::RingFormed { peers } if !self.quiet => {
                println!("ring formed: {}", peers.join(" -> "));
            }
            Event::FoldGroups { groups } if !self.quiet => {
                for g in groups {
                    let folds: Vec<String> = g.folds.iter().map(ToString::to_string).collect();
                    println!(
                        "fold group {}: ranks {}..{}, folds {}",
                        g.index,
                        g.ranks.start,
                        g.ranks.end,
                        folds.join(", ")
                    );
                }
            }
            Event::Reformed(c) if !self.quiet => {
                let members: Vec<String> = c.members.iter().map(ToString::to_string).collect();
                println!(
                    "ring re-formed as generation {} with {} workers (ranks {}): {}",
                    c.generation,
                    c.members.len(),
                    members.join(", "),
                    ringtrain_coordinator::describe_change(&c)
                );
            }
            Event::Resumed {
                generation,
                step,
                steps_lost,
            } if !self.quiet => {
                println!("generation {generation} went on from step {step} ({steps_lost} step(s) of work lost)");
            }
            Event::Epoch(e) => {
                let Ok(r) = serde_json::from_str::<EpochReport>(&e.metrics_json) else {
                    return;
                };
                if self.quiet || !(r.epoch % self.every == 0 || r.epoch == 1 || r.epoch == self.epochs) {
                    return;
                }
                let fold = r.fold.map(|f| format!("fold {f} ")).unwrap_or_default();
                let acc = r.test_accuracy.map(|a| format!(" test_acc {a:.4}")).unwrap_or_default();
                let rmse = r.test_rmse.map(|a| format!(" test_rmse {a:.4}")).unwrap_or_default();
                let share = 100.0 * e.comm_secs / e.epoch_secs.max(1e-9);
                println!(
                    "{fold}epoch {:>4}/{}  train_loss {:.4}  test_loss {:.4}{acc}{rmse}  {:.0} ex/s  all-reduce {:.3} s ({share:.0}%)",
                    r.epoch, self.epochs, r.train_loss, r.test_loss, r.examples_per_sec, e.comm_secs
                );
            }
            _ => {}
        }
    }
}

/// Runs the coordinator until the job ends, printing its events.
fn coordinate(
    rt: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    mut config: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    printer: &mut EventPrinter,
) -> Result<JobOutcome, CoordinatorError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    config.events = Some(tx);
    rt.block_on(async {
        let mut job = tokio::spawn(serve(listener, shutdown, config));
        let result = loop {
            tokio::select! {
                Some(event) = rx.recv() => printer.show(event),
                ended = &mut job => break ended,
            }
        };
        while let Ok(event) = rx.try_recv() {
            printer.show(event);
        }
        result.unwrap_or_else(|e| {
            Err(CoordinatorError::Serve {
                reason: format!("the coordinator task failed: {e}"),
            })
        })
    })
}

fn job_failed(e: CoordinatorError) -> anyhow::Error {
    if e.is_bad_input() {
        crate::bad_input(e)
    } else {
        anyhow::Error::new(e).context("distributed job failed")
    }
}

/// Prints the result like `train` does, plus what only a cluster knows (ranks, checksum,
/// time in collectives per rank and per epoch), which also goes to OUT/cluster.json.
fn report(outcome: &JobOutcome, out: &Path) -> anyhow::Result<()> {
    let summary: RunSummary = if outcome.groups.is_empty() {
        serde_json::from_str(&outcome.summary_json).context("read the run summary reported by rank 0")?
    } else {
        write_merged_folds(&outcome.groups, out)?
    };
    crate::print_summary(&summary);
    // The ring at the end (an elastic job may have lost or gained workers on the way).
    let world = outcome.comm_secs.len();
    let comm: Vec<String> = outcome.comm_secs.iter().map(|s| format!("{s:.3}")).collect();
    if outcome.groups.is_empty() {
        println!(
            "{world} workers, {} steps, final parameters bitwise identical on every rank (checksum {:016x}); seconds in collectives per rank: {}",
            outcome.steps,
            outcome.params_checksum,
            comm.join(" ")
        );
    } else {
        let checksums: Vec<String> = outcome
            .groups
            .iter()
            .map(|g| format!("group {} {:016x}", g.plan.index, g.params_checksum))
            .collect();
        println!(
            "{world} workers in {} fold groups of {}, final parameters bitwise identical within each group ({}); seconds in collectives per rank: {}",
            outcome.groups.len(),
            world / outcome.groups.len(),
            checksums.join(", "),
            comm.join(" ")
        );
    }
    let cluster = json!({
        "job_id": outcome.job_id,
        "workers": outcome.workers.iter().map(|w| json!({
            "rank": w.rank, "peer": w.peer_addr, "host": w.host, "pid": w.pid,
        })).collect::<Vec<_>>(),
        "params_checksum": format!("{:016x}", outcome.params_checksum),
        "steps": outcome.steps,
        "collective_secs_per_rank": outcome.comm_secs,
        "epochs": outcome.epochs.iter().map(|e| json!({
            "epoch": e.epoch, "allreduce_secs": e.comm_secs, "epoch_secs": e.epoch_secs,
        })).collect::<Vec<_>>(),
        "fold_groups": outcome.groups.iter().map(|g| json!({
            "group": g.plan.index, "ranks": g.plan.ranks.clone().collect::<Vec<_>>(), "folds": g.plan.folds,
            "params_checksum": format!("{:016x}", g.params_checksum), "steps": g.steps,
        })).collect::<Vec<_>>(),
        "membership": outcome.membership.iter().map(|c| json!({
            "generation": c.generation, "at_secs": c.at_secs, "members": c.members,
            "left": c.left.iter().map(|d| json!({"rank": d.rank, "worker": d.worker, "reason": d.reason})).collect::<Vec<_>>(),
            "joined": c.joined, "resumed_step": c.resumed_step, "steps_lost": c.steps_lost,
        })).collect::<Vec<_>>(),
    });
    // On a multi-node run the run directory lives on rank 0's machine; this file is only a
    // by-product, so failing to write it does not fail a finished job.
    let path = out.join("cluster.json");
    let written = serde_json::to_string_pretty(&cluster)
        .map_err(|e| e.to_string())
        .and_then(|text| {
            std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
            ringtrain_train::write_atomic(&path, text.as_bytes()).map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        eprintln!("warning: cannot write {}: {e}", path.display());
    }
    println!("run directory: {}", out.display());
    Ok(())
}

/// Parallel k-fold: joins the groups' results into the run directory the last fold's group
/// wrote (its model, preprocessing and job copy stay): `summary.json` with every fold in fold
/// order and the mean ± std over all of them, `metrics.jsonl` with every fold's lines, the
/// plots redrawn. Written here, by the coordinator, after every group finished, so a
/// multi-node run needs OUT to be the same directory for the coordinator and that rank.
fn write_merged_folds(groups: &[GroupOutcome], out: &Path) -> anyhow::Result<RunSummary> {
    let mut parts = Vec::with_capacity(groups.len());
    let mut lines: Vec<((Option<usize>, usize), &str)> = Vec::new();
    for g in groups {
        let part: RunSummary = serde_json::from_str(&g.summary_json)
            .with_context(|| format!("read the run summary of fold group {}", g.plan.index))?;
        parts.push(part);
        for line in g.metrics_jsonl.lines().filter(|l| !l.trim().is_empty()) {
            let r: EpochReport = serde_json::from_str(line)
                .with_context(|| format!("read a metrics line of fold group {}: {line}", g.plan.index))?;
            lines.push(((r.fold, r.epoch), line));
        }
    }
    // Sequential k-fold writes fold after fold, epochs in order; the sort is stable.
    lines.sort_by_key(|(key, _)| *key);
    let mut metrics = String::new();
    for (_, line) in &lines {
        metrics.push_str(line);
        metrics.push('\n');
    }
    let mut folds: Vec<_> = parts.iter().flat_map(|p| p.folds.iter().cloned()).collect();
    folds.sort_by_key(|f| f.fold);
    let got: Vec<Option<usize>> = folds.iter().map(|f| f.fold).collect();
    if got != (0..folds.len()).map(Some).collect::<Vec<_>>() {
        anyhow::bail!("the fold groups reported folds {got:?}, not each fold once");
    }
    let per_fold: Vec<_> = folds.iter().map(|f| f.test.scalars()).collect();
    let stats = ringtrain_data::summarize_folds(&per_fold).context("summarise the folds")?;
    let first = parts.into_iter().next().context("no fold group reported")?;
    // The fields of a single train/test split stay empty, as in sequential k-fold (a group
    // that trained one fold filled them in for that fold).
    let merged = RunSummary {
        test_accuracy: None,
        test_loss: None,
        test_rmse: None,
        test_perplexity: None,
        test_sequence_accuracy: None,
        confusion_matrix: None,
        folds,
        kfold: Default::default(),
        ..first
    };
    // `FoldStat` is not exported: the stats go in through the summary's own JSON form.
    let mut value = serde_json::to_value(&merged).context("serialise the merged summary")?;
    value["kfold"] = stats
        .into_iter()
        .map(|(k, s)| (k, json!({"mean": s.mean, "std": s.std, "values": s.values})))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let merged: RunSummary = serde_json::from_value(value).context("build the merged summary")?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let text = serde_json::to_string_pretty(&merged).context("serialise the merged summary")?;
    ringtrain_train::write_atomic(&out.join("summary.json"), text.as_bytes()).context("write summary.json")?;
    ringtrain_train::write_atomic(&out.join("metrics.jsonl"), metrics.as_bytes()).context("write metrics.jsonl")?;
    ringtrain_train::write_plots(out, &metrics, &merged).context("draw the plots of every fold")?;
    Ok(merged)
}

/// `ringtrain coordinator`: runs one job and exits with its result (0 done, 1 failed and
/// worth retrying, 2 bad job), so a supervisor (a Kubernetes Job) can tell them apart.
pub fn run_coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let prepared = prepare(&args.job)?;
    if prepared.finished {
        println!(
            "{}: already finished (last-epoch checkpoint and summary.json present); nothing to do",
            args.job.out.display()
        );
        return Ok(());
    }
    let mut config = coordinator_config(&args.job, &prepared, &args.token);
    config.tls = args.tls.load()?;
    let rt = runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&args.listen))
        .with_context(|| format!("bind {}", args.listen))?;
    let addr = listener.local_addr().context("read the bound address")?;
    listening("coordinator", &addr.to_string());
    let metrics_server = match &args.metrics_listen {
        Some(metrics_addr) => {
            let listener = rt
                .block_on(tokio::net::TcpListener::bind(metrics_addr))
                .with_context(|| format!("bind the metrics server on {metrics_addr}"))?;
            let bound = listener.local_addr().context("read the metrics address")?;
            listening("metrics", &bound.to_string());
            let metrics = Arc::new(Metrics::new());
            config.metrics = Some(metrics.clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let stopped = async {
                let _ = stopped.await;
            };
            Some((stop, rt.spawn(serve_metrics(listener, stopped, metrics))))
        }
        None => None,
    };
    if let (Some(from), false) = (&prepared.resume_from, args.job.quiet) {
        println!("resuming from {from}");
    }
    let mut printer = EventPrinter::new(args.job.quiet, prepared.epochs);
    let outcome = coordinate(&rt, listener, config, shutdown_signal(), &mut printer);
    let result = outcome.map_err(job_failed).and_then(|o| report(&o, &args.job.out));
    if let Some((stop, server)) = metrics_server {
        // The final state (succeeded/failed, last epoch) stays scrapeable for a while; the
        // result is already printed, only the exit waits.
        std::thread::sleep(Duration::from_millis(args.metrics_linger_ms));
        let _ = stop.send(());
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), server).await });
    }
    result
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends before killing a pod), so the
/// workers are told to stop and the last checkpoint is named.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if r.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ = term => {}
    }
}

/// `ringtrain worker`: one job, or with `--rejoin` one job after another.
pub fn run_worker_cmd(args: WorkerArgs) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(&args.peer_addr).with_context(|| format!("bind {}", args.peer_addr))?;
    let bound = listener.local_addr().context("read the bound address")?;
    listening("worker", &bound.to_string());
    let tls = args.tls.load()?;
    let mut observe = |e: WorkerEvent| match e {
        WorkerEvent::Assigned {
            rank,
            world,
            job_id,
            group,
        } => println!(
            "{}",
            json!({"event": "assigned", "rank": rank, "world": world, "job_id": job_id, "group": group})
        ),
        WorkerEvent::Progress(Progress::Rejoined {
            rank,
            world,
            epoch,
            step,
            stepped_back,
        }) => println!(
            "{}",
            json!({"event": "ring_reformed", "rank": rank, "world": world, "epoch": epoch, "step": step, "stepped_back": stepped_back})
        ),
        WorkerEvent::Progress(_) => {}
    };
    loop {
        // Every job serves its ring on the same socket, so the advertised port never changes.
        let ring_listener = listener.try_clone().context("reuse the collective listener")?;
        let opts = WorkerOptions {
            coordinator: args.coordinator.clone(),
            token: args.token.clone(),
            listener: ring_listener,
            advertise: args.advertise.clone().unwrap_or_else(|| bound.to_string()),
            host: host_name(),
            pid: std::process::id(),
            io_threads: args.io_threads,
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            rendezvous_timeout: Duration::from_millis(args.rendezvous_timeout_ms),
            coordinator_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            tls: tls.clone(),
        };
        match run_worker(opts, &mut observe) {
            Ok(r) => {
                println!(
                    "{}",
                    json!({
                        "event": "finished", "rank": r.rank, "world": r.world, "group": r.group,
                        "params_checksum": format!("{:016x}", r.params_checksum),
                        "allreduce_secs": r.stats.allreduce_secs, "allreduces": r.stats.allreduces,
                        "allreduce_exposed_secs": r.stats.allreduce_exposed_secs,
                        "allreduce_bytes": r.stats.allreduce_bytes,
                        "grad_wire_bytes": r.stats.grad_wire_bytes,
                    })
                );
                if !args.rejoin {
                    return Ok(());
                }
            }
            Err(e) if !args.rejoin && e.is_bad_input() => return Err(crate::bad_input(e)),
            Err(e) if !args.rejoin => return Err(anyhow::Error::new(e).context("worker failed")),
            // The coordinator reports the job's failure; here it is only why this worker is
            // between jobs.
            Err(e) => println!("{}", json!({"event": "between_jobs", "reason": e.to_string()})),
        }
        // The coordinator that just ended may still hold its port for a moment; a worker
        // that registered there again would only be refused.
        std::thread::sleep(REJOIN_PAUSE);
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// One worker child of `launch`.
struct Worker {
    child: Child,
    stderr: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

/// How `launch` starts a worker child.
#[derive(Debug, Clone)]
struct Spawner {
    exe: PathBuf,
    coordinator: String,
    token: String,
    threads: usize,
    heartbeat_timeout_ms: u64,
    /// `RINGTRAIN_TLS_*` pointing at the run's throw-away certificates (empty: plaintext).
    tls_env: Vec<(&'static str, PathBuf)>,
}

impl Spawner {
    fn start(&self, i: usize) -> anyhow::Result<Worker> {
        let mut child = Command::new(&self.exe)
            .args([
                "worker",
                "--coordinator",
                &self.coordinator,
                "--peer-addr",
                "127.0.0.1:0",
            ])
            .args(["--threads", &self.threads.to_string()])
            .args(["--heartbeat-timeout-ms", &self.heartbeat_timeout_ms.to_string()])
            .env(TOKEN_ENV, &self.token)
            .envs(self.tls_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start worker {i} ({})", self.exe.display()))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = pipe.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..k]));
                    }
                }
            });
        }
        Ok(Worker {
            child,
            stderr,
            exit: None,
        })
    }
}

/// The workers of one launch; killed (and reaped) when dropped.
struct Workers(Arc<Mutex<Vec<Worker>>>);

impl Drop for Workers {
    fn drop(&mut self) {
        let mut ws = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for w in ws.iter_mut() {
            if w.exit.is_none() {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
    }
}

impl Workers {
    fn spawn(spawner: &Spawner, n: usize) -> anyhow::Result<Workers> {
        let workers = Workers(Arc::new(Mutex::new(Vec::with_capacity(n))));
        for i in 0..n {
            let w = spawner.start(i)?;
            workers.lock().push(w);
        }
        Ok(workers)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Polls the children. Without `elastic`, the first one to exit unsuccessfully fires
    /// `failed`; with it, the coordinator judges a death, and up to `restarts` dead children
    /// are replaced by new workers that join the running job.
    fn watch(&self, failed: oneshot::Sender<()>, elastic: bool, restarts: (usize, Duration), spawner: Spawner) {
        let ws = self.0.clone();
        let (mut restarts, delay) = restarts;
        std::thread::spawn(move || {
            let mut failed = Some(failed);
            // When each replacement is due.
            let mut due: Vec<Instant> = Vec::new();
            loop {
                let all_done = {
                    let mut ws = ws.lock().unwrap_or_else(|p| p.into_inner());
                    for w in ws.iter_mut().filter(|w| w.exit.is_none()) {
                        if let Ok(Some(status)) = w.child.try_wait() {
                            w.exit = Some(status);
                            if !status.success() {
                                if let (false, Some(tx)) = (elastic, failed.take()) {
                                    let _ = tx.send(());
                                }
                                if elastic && restarts > 0 {
                                    restarts -= 1;
                                    due.push(Instant::now() + delay);
                                }
                            }
                        }
                    }
                    let now = Instant::now();
                    let ready = due.iter().filter(|t| **t <= now).count();
                    due.retain(|t| *t > now);
                    for _ in 0..ready {
                        let i = ws.len();
                        match spawner.start(i) {
                            Ok(w) => ws.push(w),
                            Err(e) => eprintln!("warning: cannot start a replacement worker: {e:#}"),
                        }
                    }
                    ws.iter().all(|w| w.exit.is_some()) && due.is_empty()
                };
                if all_done || Arc::strong_count(&ws) == 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }

    /// Waits until every child exited, at most `deadline`; kills the rest.
    fn wait_all(&self, deadline: Duration) -> Vec<(u32, Option<ExitStatus>)> {
        let until = Instant::now() + deadline;
        loop {
            let done = self.lock().iter_mut().all(|w| {
                if w.exit.is_none() {
                    if let Ok(Some(s)) = w.child.try_wait() {
                        w.exit = Some(s);
                    }
                }
                w.exit.is_some()
            });
            if done || Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut ws = self.lock();
        for w in ws.iter_mut().filter(|w| w.exit.is_none()) {
            let _ = w.child.kill();
            w.exit = w.child.wait().ok();
        }
        ws.iter().map(|w| (w.child.id(), w.exit)).collect()
    }

    /// The children that exited unsuccessfully: pid, status, last stderr line.
    fn failures(&self) -> Vec<(u32, ExitStatus, String)> {
        self.lock()
            .iter()
            .filter_map(|w| {
                let status = w.exit.filter(|s| !s.success())?;
                let err = w.stderr.lock().map(|s| s.clone()).unwrap_or_default();
                let last = err
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .to_owned();
                Some((w.child.id(), status, last))
            })
            .collect()
    }
}

/// `ringtrain launch`.
pub fn run_launch(launch: LaunchArgs) -> anyhow::Result<()> {
    let args = &launch.job;
    let prepared = prepare(args)?;
    if prepared.finished {
        println!(
            "{}: already finished (last-epoch checkpoint and summary.json present); nothing to do",
            args.out.display()
        );
        return Ok(());
    }
    let token = fresh_token();
    let mut config = coordinator_config(args, &prepared, &token);
    // Owned here, so the files go when this function returns, however it returns (a thread
    // watching the children may outlive it).
    let tls = if launch.plaintext {
        None
    } else {
        Some(Throwaway::new().context("make the run's TLS certificates")?)
    };
    config.tls = tls.as_ref().map(|t| t.tls.clone());
    let rt = runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("bind the coordinator on 127.0.0.1")?;
    let addr = listener.local_addr().context("read the bound address")?.to_string();
    listening("coordinator", &addr);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.workers).max(1);
    let spawner = Spawner {
        exe: std::env::current_exe().context("find this executable")?,
        coordinator: addr.clone(),
        token: token.clone(),
        threads,
        heartbeat_timeout_ms: args.heartbeat_timeout_ms,
        tls_env: tls.as_ref().map(|t| t.env().to_vec()).unwrap_or_default(),
    };
    let elastic = config.elastic();
    let workers = Workers::spawn(&spawner, args.workers)?;
    let (failed_tx, failed_rx) = oneshot::channel();
    let restarts = (launch.max_restarts, Duration::from_millis(launch.restart_delay_ms));
    workers.watch(failed_tx, elastic, restarts, spawner);
    // A dead child usually breaks its heartbeat stream first, and the coordinator names it
    // with its rank and step; this only decides when the coordinator cannot (e.g. a worker
    // that died before registering).
    let shutdown = async move {
        if failed_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(CHILD_FAILURE_GRACE).await;
    };
    let mut printer = EventPrinter::new(args.quiet, prepared.epochs);
    let result = coordinate(&rt, listener, config, shutdown, &mut printer);
    match result {
        Ok(outcome) => {
            let exits = workers.wait_all(EXIT_DEADLINE);
            if let Some((pid, status)) = exits.iter().find(|(_, s)| !s.is_some_and(|s| s.success())) {
                if !elastic {
                    anyhow::bail!("the job finished but worker pid {pid} exited with {status:?}");
                }
            }
            // An elastic job went on without the workers it lost: say how each ended.
            for (pid, status, last) in workers.failures() {
                println!("worker pid {pid} left the job early ({status}): {last}");
            }
            report(&outcome, &args.out)
        }
        Err(e) => {
            // Give the children a moment to exit on their own, then kill the rest.
            let _ = workers.wait_all(Duration::from_millis(500));
            match (&e, workers.failures().into_iter().next()) {
                (CoordinatorError::Shutdown { checkpoint, .. }, Some((pid, status, last))) => {
                    let rank = printer
                        .ranks_by_pid
                        .get(&pid)
                        .map_or("(not yet registered)".to_owned(), |r| format!("rank {r}"));
                    Err(anyhow::anyhow!(
                        "worker pid {pid} {rank} exited with {status}: {last}; {checkpoint}"
                    ))
                    .context("distributed job failed")
                }
                _ => Err(job_failed(e)),
            }
        }
    }
}
