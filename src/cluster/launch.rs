//! `launch`: the coordinator in this process and its workers as child processes, supervised.

use super::*;
use crate::collective_cmd::TOKEN_ENV;

/// One worker child of `launch`.
struct Worker {
    child: Child,
    /// The last non-empty line the child wrote to stderr (its error, when it fails).
    last_err: Arc<Mutex<String>>,
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
        let last_err = Arc::new(Mutex::new(String::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = last_err.clone();
            std::thread::spawn(move || {
                let lines = std::io::BufReader::new(pipe).lines().map_while(Result::ok);
                for line in lines.filter(|l| !l.trim().is_empty()) {
                    if let Ok(mut last) = sink.lock() {
                        *last = line;
                    }
                }
            });
        }
        Ok(Worker {
            child,
            last_err,
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
                let last = w.last_err.lock().map(|s| s.clone()).unwrap_or_default();
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
            report(&outcome, &args.out, &prepared.job)
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
