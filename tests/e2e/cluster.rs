//! Distributed training through the real binary: `launch` (coordinator in process, worker
//! child processes), `coordinator` + `worker`, killed workers and resumption, bad input.
//! Every wait has a deadline; processes are killed when a test fails.
//!
//! Tolerances against single-process `train` (same job, same seed): the ring adds the three
//! ranks' gradients in another order than one process sums its batch, so results agree to
//! rounding, not bitwise: final train loss within 1e-3 relative, test accuracy within one
//! example.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::util::{bin, error_line, read_json, repo, signal, Proc};

/// `ringtrain args` with the job token and one thread.
pub fn start(args: &[&str], token: &str) -> Proc {
    start_with(Command::new(bin()), args, token)
}

/// `command` (the binary, or a wrapper such as `ip netns exec NS ringtrain`) with `args`,
/// the job token and one thread.
pub fn start_with(mut command: Command, args: &[&str], token: &str) -> Proc {
    command
        .args(args)
        .env("RINGTRAIN_TOKEN", token)
        .env("RINGTRAIN_THREADS", "1");
    Proc::spawn(command, &format!("ringtrain {}", args.join(" ")))
}

/// Runs `ringtrain args` to completion within `within`.
fn run(args: &[&str], within: Duration) -> (ExitStatus, String, String) {
    start(args, "e2e-cluster").finish(within)
}

fn run_ok(args: &[&str], within: Duration) -> String {
    let mut p = start(args, "e2e-cluster");
    let (status, out, _) = p.finish(within);
    assert!(status.success(), "{}", p.describe());
    out
}

/// The Iris MLP job with `edits` applied, written to `dir/name.toml` (data path absolute).
pub fn iris_job(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(repo().join("examples/iris-mlp.toml")).expect("iris job");
    let data = repo().join("data/iris/iris.csv");
    text = text.replace(
        "\"../data/iris/iris.csv\"",
        &format!("{:?}", data.display().to_string()),
    );
    write_job(text, dir, name, edits)
}

/// [`iris_job`] for `epochs` epochs in global batches of 15, `edits` besides. Iris's 120
/// training examples make 8 such batches, 5 examples a worker on 3 workers: every global
/// batch is then the one a single process sees.
pub fn iris15_job(dir: &Path, name: &str, epochs: usize, edits: &[(&str, &str)]) -> PathBuf {
    let epochs = format!("epochs = {epochs}");
    let mut all = vec![
        ("batch_size = 16", "batch_size = 15"),
        ("epochs = 100", epochs.as_str()),
    ];
    all.extend_from_slice(edits);
    iris_job(dir, name, &all)
}

/// `text` with `edits` applied, written to `dir/name.toml`. An edit that matches nothing
/// fails the test: the example changed, and the test would silently run another job.
fn write_job(mut text: String, dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} not in the job");
        text = text.replace(from, to);
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write job");
    path
}

/// `launch --workers workers job --out out flags...`, as a list a test can extend to launch
/// the same run again (`--resume`).
fn launch_args<'a>(workers: &'a str, job: &'a Path, out: &'a Path, flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["launch", "--workers", workers, s(job), "--out", s(out)];
    args.extend_from_slice(flags);
    args
}

/// The address a `coordinator` process printed in its `listening` line (within a minute).
pub fn coordinator_addr(coordinator: &Proc) -> String {
    let listening = coordinator.line(Instant::now() + MINUTE, |l| l.contains("\"listening\""));
    let v: serde_json::Value = serde_json::from_str(&listening).expect("json line");
    v["addr"].as_str().expect("addr").to_owned()
}

/// `ringtrain coordinator --listen 127.0.0.1:0 args` with the job token, and the address it
/// got: a free port, so that tests running side by side never collide.
pub fn start_coordinator(args: &[&str], token: &str) -> (Proc, String) {
    let mut full = vec!["coordinator", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let coordinator = start(&full, token);
    let addr = coordinator_addr(&coordinator);
    (coordinator, addr)
}

/// The pid of worker `rank` from launch's "worker rank R joined (pid P ..." line: the
/// process a test kills or stops to play a lost or hung worker.
pub fn pid_of(launch: &Proc, rank: usize, deadline: Instant) -> u32 {
    let prefix = format!("worker rank {rank} joined (pid ");
    let line = launch.line(deadline, |l| l.starts_with(&prefix));
    line[prefix.len()..]
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// The `finished` event of a `worker` process, which must exit successfully within 20 s of
/// its coordinator: its parameters' checksum tells whether the ranks ended identical.
fn finished_event(worker: &mut Proc) -> serde_json::Value {
    let (status, out, _) = worker.finish(Duration::from_secs(20));
    assert!(status.success(), "{}", worker.describe());
    let finished = out
        .lines()
        .find(|l| l.contains("\"finished\""))
        .unwrap_or_else(|| panic!("{out}"));
    serde_json::from_str(finished).expect("json line")
}

/// `launch`'s printout of a k-fold run must report each of the `folds` folds.
fn assert_every_fold_reported(out: &str, folds: usize) {
    for fold in 0..folds {
        assert!(
            out.contains(&format!("fold {fold}: test loss")),
            "fold {fold} missing:\n{out}"
        );
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The Iris job's evaluation scheme, which the k-fold tests replace.
const TRAIN_TEST: &str = "scheme = \"train_test\"";

pub const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn three_workers_train_iris_like_one_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris15_job(tmp.path(), "iris15", 30, &[]);
    let (dist, single) = (tmp.path().join("dist"), tmp.path().join("single"));
    let out = run_ok(
        &["launch", "--workers", "3", s(&job), "--out", s(&dist), "--quiet"],
        MINUTE,
    );
    assert!(
        out.contains("final parameters bitwise identical on every rank"),
        "{out}"
    );
    assert!(out.contains("test accuracy:"), "train's summary is printed: {out}");
    run_ok(&["train", s(&job), "--out", s(&single), "--quiet"], MINUTE);

    let metrics = std::fs::read_to_string(dist.join("metrics.jsonl")).expect("metrics.jsonl");
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 30);
    let loss = |i: usize| lines[i]["train_loss"].as_f64().expect("train_loss");
    assert!(
        loss(29) < 0.5 * loss(0),
        "loss must decrease: {} -> {}",
        loss(0),
        loss(29)
    );

    let (d, o) = (
        read_json(&dist.join("summary.json")),
        read_json(&single.join("summary.json")),
    );
    let f = |v: &serde_json::Value, k: &str| v["folds"][0][k].as_f64().expect(k);
    let rel = (f(&d, "train_loss") - f(&o, "train_loss")).abs() / f(&o, "train_loss");
    assert!(
        rel <= 1e-3,
        "train loss {} vs {}",
        f(&d, "train_loss"),
        f(&o, "train_loss")
    );
    let acc = |v: &serde_json::Value| v["test_accuracy"].as_f64().expect("test_accuracy");
    assert!(
        (acc(&d) - acc(&o)).abs() * 30.0 <= 1.0 + 1e-9,
        "accuracy {} vs {}",
        acc(&d),
        acc(&o)
    );
    assert!(acc(&d) >= 0.9, "accuracy {}", acc(&d));
    for file in ["model.safetensors", "job.toml", "preprocess.json"] {
        assert!(dist.join(file).is_file(), "{file} missing from the run directory");
    }
    // Ranks are handed out in registration order, which varies; the result must not.
    let again = tmp.path().join("again");
    run_ok(
        &["launch", "--workers", "3", s(&job), "--out", s(&again), "--quiet"],
        MINUTE,
    );
    for file in ["model.safetensors", "summary.json"] {
        let same = std::fs::read(dist.join(file)).ok() == std::fs::read(again.join(file)).ok();
        assert!(same, "{file} differs between two identical launches");
    }
    let cluster = read_json(&dist.join("cluster.json"));
    assert_eq!(cluster["workers"].as_array().map(Vec::len), Some(3));
    assert_eq!(cluster["epochs"].as_array().map(Vec::len), Some(30));
    assert!(cluster["collective_secs_per_rank"][2].as_f64().is_some_and(|t| t > 0.0));
}

#[test]
fn bf16_compression_keeps_the_ranks_identical_and_learns_like_f32() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plain = iris15_job(tmp.path(), "plain", 30, &[]);
    let bf16 = tmp.path().join("bf16.toml");
    let text = std::fs::read_to_string(&plain).expect("job") + "\n[distributed]\ncompression = \"bf16\"\n";
    std::fs::write(&bf16, text).expect("write job");
    let mut summaries = Vec::new();
    for (job, name) in [(&plain, "plain"), (&bf16, "bf16")] {
        let dir = tmp.path().join(name);
        let out = run_ok(
            &["launch", "--workers", "3", s(job), "--out", s(&dir), "--quiet"],
            MINUTE,
        );
        assert!(
            out.contains("final parameters bitwise identical on every rank"),
            "{out}"
        );
        summaries.push((
            read_json(&dir.join("summary.json")),
            std::fs::read(dir.join("model.safetensors")).expect("model"),
        ));
    }
    let ((f32_summary, f32_model), (bf16_summary, bf16_model)) = (&summaries[0], &summaries[1]);
    assert_ne!(f32_model, bf16_model, "the gradients did not travel as bf16");
    let acc = |v: &serde_json::Value| v["test_accuracy"].as_f64().expect("test_accuracy");
    assert!(acc(bf16_summary) >= 0.9, "bf16 accuracy {}", acc(bf16_summary));
    assert!(
        (acc(bf16_summary) - acc(f32_summary)).abs() * 30.0 <= 2.0 + 1e-9,
        "accuracy {} with bf16 vs {} with f32",
        acc(bf16_summary),
        acc(f32_summary)
    );
}

#[test]
fn overlapping_the_all_reduce_with_backward_gives_the_same_bits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = iris_job(tmp.path(), "base", &[("epochs = 100", "epochs = 10")]);
    let text = std::fs::read_to_string(&base).expect("job");
    for compression in ["none", "bf16"] {
        let mut checksums = Vec::new();
        for overlap in [true, false] {
            let name = format!("{compression}-{overlap}");
            let job = tmp.path().join(format!("{name}.toml"));
            // Buckets of 131 values: the MLP's parameters fall into several.
            let extra =
                format!("\n[distributed]\ncompression = \"{compression}\"\noverlap = {overlap}\nbucket_mb = 0.0005\n");
            std::fs::write(&job, format!("{text}{extra}")).expect("write job");
            let out = run_ok(
                &[
                    "launch",
                    "--workers",
                    "2",
                    s(&job),
                    "--out",
                    s(&tmp.path().join(&name)),
                    "--quiet",
                ],
                MINUTE,
            );
            let at = out.find("(checksum ").unwrap_or_else(|| panic!("{out}"));
            checksums.push(out[at..at + 26].to_owned());
        }
        assert_eq!(
            checksums[0], checksums[1],
            "compression {compression}: overlapped vs after backward"
        );
    }
}

#[test]
fn distributed_kfold_prints_each_fold_and_mean_std() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris15_job(tmp.path(), "kfold", 8, &[(TRAIN_TEST, "scheme = \"kfold\"\nfolds = 5")]);
    let out_dir = tmp.path().join("run");
    let out = run_ok(
        &["launch", "--workers", "3", s(&job), "--out", s(&out_dir), "--quiet"],
        MINUTE,
    );
    assert_every_fold_reported(&out, 5);
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("accuracy:") && l.contains('±')),
        "{out}"
    );
    let summary = read_json(&out_dir.join("summary.json"));
    assert_eq!(summary["kfold"]["accuracy"]["values"].as_array().map(Vec::len), Some(5));
}

#[test]
fn a_killed_worker_is_named_and_a_fresh_launch_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let epochs = 150;
    let job = iris15_job(tmp.path(), "long", epochs, &[]);
    let dir = tmp.path().join("run");
    let args = launch_args("3", &job, &dir, &["--checkpoint-every", "1"]);
    let mut launch = start(&args, "unused");
    let deadline = Instant::now() + MINUTE;
    let pid = pid_of(&launch, 1, deadline);
    // Kill rank 1 mid-run, once a checkpoint exists and the coordinator has recorded three
    // epochs: the writer's heartbeat naming the checkpoint leaves as soon as it is written, so
    // it is long in by then.
    let ckpt = dir.join("checkpoint.safetensors");
    let epochs_recorded = || {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .map(|m| m.lines().count())
            .unwrap_or(0)
    };
    while !ckpt.is_file() || epochs_recorded() < 3 {
        assert!(Instant::now() < deadline, "no checkpoint\n{}", launch.describe());
        std::thread::sleep(Duration::from_millis(10));
    }
    signal("-9", pid);
    let at = Instant::now();
    let (status, _, err) = launch.finish(Duration::from_secs(15));
    assert!(
        at.elapsed() < Duration::from_secs(7),
        "took {:?} to notice",
        at.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{}", launch.describe());
    let line = error_line(&err);
    assert!(
        line.contains("worker rank 1") && line.contains(&format!("pid {pid}")),
        "{line}"
    );
    assert!(
        line.contains("last checkpoint:") && line.contains("checkpoint.safetensors (epoch "),
        "{line}"
    );
    let done = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .count();
    assert!(done < epochs, "the run must have stopped early ({done} epochs)");

    let mut resume = args.clone();
    resume.push("--resume");
    resume.push("--quiet");
    let out = run_ok(&resume, MINUTE);
    assert!(out.contains("bitwise identical"), "{out}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    assert_eq!(metrics.lines().count(), epochs, "one line per epoch over both launches");
    assert!(read_json(&dir.join("summary.json"))["test_accuracy"]
        .as_f64()
        .is_some_and(|a| a >= 0.9));
}

#[test]
fn a_coordinator_and_workers_configured_from_the_environment_train_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(tmp.path(), "pair", &[("epochs = 100", "epochs = 5")]);
    let dir = tmp.path().join("run");
    let (mut coordinator, addr) =
        start_coordinator(&["--workers", "2", s(&job), "--out", s(&dir), "--quiet"], "pair-token");
    // Everything but the command itself comes from RINGTRAIN_* variables.
    let mut workers: Vec<Proc> = (0..2)
        .map(|_| {
            let mut child = Command::new(bin());
            child
                .arg("worker")
                .env("RINGTRAIN_COORDINATOR", &addr)
                .env("RINGTRAIN_TOKEN", "pair-token")
                .env("RINGTRAIN_PEER_ADDR", "127.0.0.1:0")
                .env("RINGTRAIN_THREADS", "1");
            Proc::spawn(child, "ringtrain worker")
        })
        .collect();
    let (status, out, _) = coordinator.finish(MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    assert!(out.contains("2 workers,") && out.contains("bitwise identical"), "{out}");
    let mut checksums = Vec::new();
    for w in &mut workers {
        let v = finished_event(w);
        checksums.push(v["params_checksum"].as_str().expect("checksum").to_owned());
    }
    assert_eq!(checksums[0], checksums[1]);
    assert!(dir.join("summary.json").is_file() && dir.join("model.safetensors").is_file());
}

#[test]
fn a_hung_worker_is_named_when_its_heartbeats_stop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris15_job(tmp.path(), "hang", 2000, &[]);
    let dir = tmp.path().join("run");
    let args = launch_args("3", &job, &dir, &["--heartbeat-timeout-ms", "2500"]);
    let mut launch = start(&args, "unused");
    let pid = pid_of(&launch, 2, Instant::now() + MINUTE);
    launch.line(Instant::now() + MINUTE, |l| l.starts_with("epoch"));
    // Stopped, not dead: its connections stay open, only its heartbeats stop.
    signal("-STOP", pid);
    let at = Instant::now();
    let (status, _, err) = launch.finish(Duration::from_secs(20));
    // The launcher kills its children on failure; SIGKILL also ends a stopped process.
    let _ = Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    assert!(at.elapsed() < Duration::from_secs(8), "took {:?}", at.elapsed());
    assert_eq!(status.code(), Some(1), "{}", launch.describe());
    let line = error_line(&err);
    assert!(
        line.contains("worker rank 2") && line.contains(&format!("pid {pid}")),
        "{line}"
    );
}

#[test]
fn a_wrong_token_is_refused_and_the_rendezvous_times_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(tmp.path(), "one", &[("epochs = 100", "epochs = 1")]);
    let dir = tmp.path().join("run");
    let (mut coordinator, addr) = start_coordinator(
        &[
            "--workers",
            "1",
            s(&job),
            "--out",
            s(&dir),
            "--rendezvous-timeout-ms",
            "3000",
        ],
        "right-token",
    );

    let mut worker = start(
        &["worker", "--coordinator", &addr, "--peer-addr", "127.0.0.1:0"],
        "wrong-token",
    );
    let (status, _, err) = worker.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", worker.describe());
    assert!(err.contains("wrong job token"), "{err}");

    let (status, _, err) = coordinator.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", coordinator.describe());
    assert!(err.contains("only 0 of 1 workers registered"), "{err}");
}

#[test]
fn a_coordinator_that_does_not_answer_is_reported_within_the_deadline() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr").to_string();
    drop(free);
    let started = Instant::now();
    let (status, _, err) = run(
        &[
            "worker",
            "--coordinator",
            &addr,
            "--peer-addr",
            "127.0.0.1:0",
            "--connect-timeout-ms",
            "1000",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(err.contains(&addr) && err.contains("no connection within"), "{err}");
}

#[test]
fn an_elastic_job_that_cannot_change_membership_is_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(tmp.path(), "kfold", &[(TRAIN_TEST, "scheme = \"kfold\"\nfolds = 3")]);
    let (status, _, err) = run(
        &[
            "launch",
            "--workers",
            "3",
            "--min-workers",
            "2",
            s(&job),
            "--out",
            "/nonexistent/never-written",
        ],
        MINUTE,
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot change membership here: evaluation.scheme = \"kfold\""),
        "{err}"
    );
}

/// The first `train` training and `test` test images of `../shared/data/mnist`, written as
/// plain IDX files in `dir` (MNIST's names), or `None` when the data is not there.
pub fn mnist_subset(dir: &Path, train: usize, test: usize) -> Option<PathBuf> {
    let src = ringtrain_testkit::shared_data(&repo(), "mnist")?;
    let mnist = ringtrain_data::load_mnist(&src).expect("read MNIST");
    let out = dir.join("mnist");
    std::fs::create_dir_all(&out).expect("mkdir");
    for (prefix, split, n) in [("train", &mnist.train, train), ("t10k", &mnist.test, test)] {
        let (r, c) = (split.images.rows, split.images.cols);
        let mut images = Vec::with_capacity(16 + n * r * c);
        for v in [2051u32, n as u32, r as u32, c as u32] {
            images.extend_from_slice(&v.to_be_bytes());
        }
        images.extend_from_slice(&split.images.pixels[..n * r * c]);
        std::fs::write(out.join(format!("{prefix}-images-idx3-ubyte")), images).expect("write images");
        let mut labels = Vec::with_capacity(8 + n);
        for v in [2049u32, n as u32] {
            labels.extend_from_slice(&v.to_be_bytes());
        }
        labels.extend_from_slice(&split.labels[..n]);
        std::fs::write(out.join(format!("{prefix}-labels-idx1-ubyte")), labels).expect("write labels");
    }
    Some(out)
}

/// The LeNet-5 job with `edits`, written to `dir/name.toml`.
pub fn lenet_job(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/mnist-lenet.toml")).expect("lenet job");
    write_job(text, dir, name, edits)
}

/// The k-fold CNN tests' job in `dir`, its data and the run directory to write (`None`
/// without MNIST): LeNet-5 for one epoch in 2 folds of a 960-image subset, the folds
/// trained one after the other or, with `parallel_folds`, side by side.
fn lenet_kfold_job(dir: &Path, name: &str, parallel_folds: bool) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let data = mnist_subset(dir, 960, 10)?;
    let mut scheme = "scheme = \"kfold\"\nfolds = 2".to_owned();
    if parallel_folds {
        scheme.push_str("\nparallel_folds = true");
    }
    let job = lenet_job(
        dir,
        name,
        &[
            ("epochs = 8", "epochs = 1"),
            ("batch_size = 64", "batch_size = 32"),
            ("scheme = \"provided\"", &scheme),
        ],
    );
    Some((job, data, dir.join("run")))
}

/// The summary of a [`lenet_kfold_job`] run: the two test folds are disjoint and cover the
/// 960 images (each example tested once, trained on in the other fold), each with its accuracy.
fn assert_two_folds_split_the_subset(summary: &serde_json::Value) {
    let folds = summary["folds"].as_array().expect("folds");
    assert_eq!(folds.len(), 2);
    let tested: u64 = folds.iter().map(|f| f["test_examples"].as_u64().expect("n")).sum();
    let trained: Vec<u64> = folds.iter().map(|f| f["train_examples"].as_u64().expect("n")).collect();
    assert_eq!(tested, 960, "disjoint and covering");
    assert_eq!(trained, vec![480, 480]);
    assert_eq!(summary["kfold"]["accuracy"]["values"].as_array().map(Vec::len), Some(2));
}

/// `ringtrain launch` of a LeNet job on `workers` workers, one BLAS thread each so that
/// several fit on the test machine's cores; its printout.
fn launch_lenet(workers: &str, job: &Path, data: &Path, out: &Path) -> String {
    run_ok(
        &[
            "launch",
            "--workers",
            workers,
            s(job),
            "--data",
            s(data),
            "--out",
            s(out),
            "--quiet",
            "--threads",
            "1",
        ],
        5 * MINUTE,
    )
}

/// LeNet-5 on a 1 920-image MNIST subset: three workers against one process with the same
/// global batch. Loss falls, every rank ends bitwise identical, and the results agree.
#[test]
fn lenet_with_three_workers_matches_one_process_on_an_mnist_subset() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(data) = mnist_subset(tmp.path(), 1920, 600) else {
        return;
    };
    let job = lenet_job(
        tmp.path(),
        "lenet",
        &[("epochs = 8", "epochs = 2"), ("batch_size = 64", "batch_size = 48")],
    );
    let one = tmp.path().join("one");
    let three = tmp.path().join("three");
    let status = crate::util::ringtrain(&["train", s(&job), "--data", s(&data), "--out", s(&one), "--quiet"]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let out = launch_lenet("3", &job, &data, &three);
    assert!(out.contains("bitwise identical"), "{out}");
    let epochs = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let (m1, m3) = (epochs(&one), epochs(&three));
    let loss = |m: &[serde_json::Value], e: usize| m[e]["train_loss"].as_f64().expect("train_loss");
    assert!(loss(&m3, 1) < loss(&m3, 0), "train loss did not fall: {m3:?}");
    let rel = (loss(&m3, 1) - loss(&m1, 1)).abs() / loss(&m1, 1);
    assert!(rel < 1e-3, "3 workers {} vs 1 process {}", loss(&m3, 1), loss(&m1, 1));
    let acc = |dir: &Path| {
        read_json(&dir.join("summary.json"))["test_accuracy"]
            .as_f64()
            .expect("accuracy")
    };
    assert!(
        (acc(&one) - acc(&three)).abs() <= 1.0 / 600.0 + 1e-12,
        "{} vs {}",
        acc(&one),
        acc(&three)
    );
    assert!(acc(&three) > 0.8, "accuracy {}", acc(&three));
}

/// K = 2 cross-validation of a CNN on two workers: per-fold metrics, mean ± std, and the two
/// test folds are disjoint and cover the data.
#[test]
fn distributed_kfold_of_a_cnn() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some((job, data, dir)) = lenet_kfold_job(tmp.path(), "lenet-kfold", false) else {
        return;
    };
    let out = launch_lenet("2", &job, &data, &dir);
    assert_every_fold_reported(&out, 2);
    let summary = read_json(&dir.join("summary.json"));
    assert_two_folds_split_the_subset(&summary);
    assert!(summary["kfold"]["accuracy"]["std"].as_f64().is_some());
}

/// `metrics.jsonl` as JSON values without the wall-clock field (the only one timing sets).
fn metric_lines_without_speed(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v.as_object_mut().expect("object").remove("examples_per_sec");
            v
        })
        .collect()
}

/// Parallel k-fold, K = 5 on 2 workers: two rings of one worker (folds 0, 2, 4 and 1, 3).
/// One worker per ring trains exactly like a one-worker sequential run, so every fold's
/// result, the mean ± std, the summary file and the saved model (the last fold's) are
/// bitwise the sequential run's, and metrics.jsonl has the same lines in the same order.
#[test]
fn parallel_kfold_on_two_workers_matches_the_sequential_folds_bitwise() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let kfold = [
        ("epochs = 100", "epochs = 20"),
        (TRAIN_TEST, "scheme = \"kfold\"\nfolds = 5"),
    ];
    let sequential = iris_job(tmp.path(), "sequential", &kfold);
    let mut edits = kfold.to_vec();
    edits[1].1 = "scheme = \"kfold\"\nfolds = 5\nparallel_folds = true";
    let parallel = iris_job(tmp.path(), "parallel", &edits);
    let (par, seq) = (tmp.path().join("par"), tmp.path().join("seq"));
    let out = run_ok(&["launch", "--workers", "2", s(&parallel), "--out", s(&par)], MINUTE);
    assert!(out.contains("fold group 0: ranks 0..1, folds 0, 2, 4"), "{out}");
    assert!(out.contains("fold group 1: ranks 1..2, folds 1, 3"), "{out}");
    assert_every_fold_reported(&out, 5);
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("accuracy:") && l.contains('±')),
        "{out}"
    );
    assert!(
        out.contains("2 workers in 2 fold groups of 1, final parameters bitwise identical within each group"),
        "{out}"
    );
    run_ok(
        &["launch", "--workers", "1", s(&sequential), "--out", s(&seq), "--quiet"],
        MINUTE,
    );

    let summary = read_json(&par.join("summary.json"));
    let folds: Vec<u64> = summary["folds"]
        .as_array()
        .expect("folds")
        .iter()
        .map(|f| f["fold"].as_u64().expect("fold"))
        .collect();
    assert_eq!(folds, [0, 1, 2, 3, 4], "every fold, in fold order");
    assert_eq!(summary["kfold"]["accuracy"]["values"].as_array().map(Vec::len), Some(5));
    assert!(
        summary["kfold"]["accuracy"]["mean"].as_f64().is_some_and(|m| m > 0.8),
        "{summary}"
    );
    assert!(
        summary.get("test_accuracy").is_none(),
        "no single-split fields: {summary}"
    );
    for file in ["summary.json", "model.safetensors"] {
        let same = std::fs::read(par.join(file)).ok() == std::fs::read(seq.join(file)).ok();
        assert!(same, "{file} differs between parallel and sequential k-fold");
    }
    let (p, q) = (metric_lines_without_speed(&par), metric_lines_without_speed(&seq));
    assert_eq!(p.len(), 5 * 20);
    assert_eq!(p, q, "metrics.jsonl: same lines, same order");
    let cluster = read_json(&par.join("cluster.json"));
    assert_eq!(cluster["fold_groups"].as_array().map(Vec::len), Some(2));
}

/// Parallel K = 2 cross-validation of a CNN on 4 workers, a coordinator and worker processes:
/// two rings of two. The folds are disjoint and cover the data, both report, and each ring's
/// two ranks end bitwise identical (the rings differ: they trained different folds).
#[test]
fn parallel_kfold_of_a_cnn_on_four_workers_in_two_rings() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some((job, data, dir)) = lenet_kfold_job(tmp.path(), "lenet-parallel-kfold", true) else {
        return;
    };
    let (mut coordinator, addr) = start_coordinator(
        &["--workers", "4", s(&job), "--data", s(&data), "--out", s(&dir)],
        "folds-token",
    );
    let mut workers: Vec<Proc> = (0..4)
        .map(|_| {
            start(
                &["worker", "--coordinator", &addr, "--peer-addr", "127.0.0.1:0"],
                "folds-token",
            )
        })
        .collect();
    let (status, out, _) = coordinator.finish(3 * MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    assert!(out.contains("fold group 0: ranks 0..2, folds 0"), "{out}");
    assert!(out.contains("fold group 1: ranks 2..4, folds 1"), "{out}");
    assert!(out.contains("4 workers in 2 fold groups of 2"), "{out}");
    assert_every_fold_reported(&out, 2);
    let mut by_group: Vec<Vec<String>> = vec![Vec::new(); 2];
    for w in &mut workers {
        let v = finished_event(w);
        assert_eq!(v["world"].as_u64(), Some(2), "a ring of two: {v}");
        let group = v["group"].as_u64().expect("group") as usize;
        by_group[group].push(v["params_checksum"].as_str().expect("checksum").to_owned());
    }
    for (g, sums) in by_group.iter().enumerate() {
        assert_eq!(sums.len(), 2, "group {g}: {by_group:?}");
        assert_eq!(sums[0], sums[1], "group {g}'s ranks must end bitwise identical");
    }
    assert_ne!(by_group[0][0], by_group[1][0], "the groups trained different folds");

    assert_two_folds_split_the_subset(&read_json(&dir.join("summary.json")));
    let lines = metric_lines_without_speed(&dir);
    let folds_of_lines: Vec<u64> = lines.iter().map(|l| l["fold"].as_u64().expect("fold")).collect();
    assert_eq!(folds_of_lines, [0, 1], "one epoch per fold, in fold order");
    assert!(dir.join("model.safetensors").is_file());
}

#[test]
fn a_batch_a_fold_group_cannot_split_evenly_still_trains_bitwise_identical_rings() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 4 workers, 2 folds: two groups of 2 that take shares of 8 and 7 of each batch of 15.
    let job = iris15_job(
        tmp.path(),
        "odd",
        20,
        &[(TRAIN_TEST, "scheme = \"kfold\"\nfolds = 2\nparallel_folds = true")],
    );
    let dir = tmp.path().join("run");
    let out = run_ok(
        &["launch", "--workers", "4", s(&job), "--out", s(&dir), "--quiet"],
        MINUTE,
    );
    assert!(out.contains("bitwise identical within each group"), "{out}");
}
