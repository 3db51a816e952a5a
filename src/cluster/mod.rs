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
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ringtrain_config::EvalScheme;
use ringtrain_coordinator::{
    fold_groups, serve, serve_metrics, CoordinatorConfig, CoordinatorError, Event, JobOutcome, JobText, Metrics,
};
use ringtrain_train::{EpochReport, Progress, RunSummary};
use ringtrain_worker::{run_worker, WorkerEvent, WorkerOptions};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::certs_cmd::Throwaway;

mod args;
mod folds;
mod launch;

pub use self::args::{CoordinatorArgs, JobArgs, LaunchArgs, WorkerArgs};
use self::folds::write_merged_folds;
pub use self::launch::run_launch;

/// Pause of a `--rejoin` worker between two jobs.
const REJOIN_PAUSE: Duration = Duration::from_secs(1);
/// How long `launch` waits for its workers to exit after a successful job.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// A failed child makes `launch` give up this long after its exit unless the coordinator
/// has already explained the failure (its own grace period is shorter).
const CHILD_FAILURE_GRACE: Duration = Duration::from_millis(1500);

/// A job checked here, before any worker sees it.
struct Prepared {
    job: ringtrain_config::Job,
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
        } else if job.training.early_stopping.is_some() {
            Some("training.early_stopping keeps the best epoch's weights, which a joining worker does not have")
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
    // The workers read the data again; reading it here too refuses a model that does not fit
    // it before any worker starts.
    crate::check_data_and_model(&job)?;
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
        // A run that stopped early has no last-epoch checkpoint, and cannot resume.
        let done = manifest.epoch >= job.training.epochs || job.training.early_stopping.is_some();
        finished = done && args.out.join("summary.json").is_file();
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
        job,
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
fn report(outcome: &JobOutcome, out: &Path, job: &ringtrain_config::Job) -> anyhow::Result<()> {
    let summary: RunSummary = if outcome.groups.is_empty() {
        serde_json::from_str(&outcome.summary_json).context("read the run summary reported by rank 0")?
    } else {
        write_merged_folds(&outcome.groups, out, job)?
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
    let result = outcome
        .map_err(job_failed)
        .and_then(|o| report(&o, &args.job.out, &prepared.job));
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
