//! Elastic training through the real binary: workers lost (killed, hung) while the others
//! carry on, replacements that join the running job, too few workers left, and a
//! checkpoint resumed at another world size. Every wait has a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::{iris15_job, iris_job, lenet_job, mnist_subset, pid_of, s, start, start_coordinator};
use crate::util::{error_line, read_json, signal, Proc};

const MINUTE: Duration = Duration::from_secs(60);

/// `launch` of Iris for 2 500 epochs (long enough to stop, kill or cut a worker while it
/// trains) into `dir/run`: `membership` flags before the job, `flags` after its output
/// directory. The launch, and that directory.
fn launch_long_iris(dir: &Path, membership: &[&str], flags: &[&str]) -> (Proc, PathBuf) {
    let job = iris15_job(dir, "long", 2500, &[]);
    let out = dir.join("run");
    let mut args = vec!["launch"];
    args.extend_from_slice(membership);
    args.extend_from_slice(&[s(&job), "--out", s(&out)]);
    args.extend_from_slice(flags);
    (start(&args, "unused"), out)
}

/// Launch's line that the ring re-formed as `generation` with `workers` workers, which must
/// come before `deadline`: it names the workers that left or joined.
fn ring_reformed(launch: &Proc, deadline: Instant, generation: u64, workers: usize) -> String {
    let prefix = format!("ring re-formed as generation {generation} with {workers} workers");
    launch.line(deadline, |l| l.starts_with(&prefix))
}

fn accuracy(dir: &Path) -> f64 {
    read_json(&dir.join("summary.json"))["test_accuracy"]
        .as_f64()
        .expect("accuracy")
}

fn train_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["train_loss"]
                .as_f64()
                .expect("loss")
        })
        .collect()
}

/// LeNet on an MNIST subset with 4 workers: one is killed early in epoch 2, the other three
/// go on within 5 s, `--max-restarts 1` starts a replacement a second later that joins (back
/// to 4), and the job ends bitwise identical on every rank with the accuracy of an
/// uninterrupted run.
#[test]
fn a_killed_worker_leaves_three_that_carry_on_and_its_replacement_joins_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(data) = mnist_subset(tmp.path(), 3840, 1000) else {
        return;
    };
    let job = lenet_job(tmp.path(), "lenet", &[]);
    let (whole, elastic) = (tmp.path().join("whole"), tmp.path().join("elastic"));
    let base = |out: &Path| {
        let args = ["launch", "--workers", "4", s(&job), "--data", s(&data), "--out", s(out)];
        args.map(str::to_owned).to_vec()
    };
    let mut uninterrupted = start(&base(&whole).iter().map(String::as_str).collect::<Vec<_>>(), "unused");
    let (status, _, _) = uninterrupted.finish(5 * MINUTE);
    assert!(status.success(), "{}", uninterrupted.describe());

    let mut args = base(&elastic);
    args.extend(["--min-workers", "3", "--max-restarts", "1"].map(str::to_owned));
    let mut launch = start(&args.iter().map(String::as_str).collect::<Vec<_>>(), "unused");
    let deadline = Instant::now() + 2 * MINUTE;
    let pid = pid_of(&launch, 2, deadline);
    launch.line(deadline, |l| l.starts_with("epoch    1/8"));
    signal("-9", pid);
    let reformed = ring_reformed(&launch, Instant::now() + Duration::from_secs(5), 1, 3);
    assert!(reformed.contains(&format!("worker rank 2 (pid {pid} ")), "{reformed}");
    let resumed = launch.line(deadline, |l| l.starts_with("generation 1 went on from step"));
    assert!(resumed.contains("step(s) of work lost"), "{resumed}");
    let back = ring_reformed(&launch, deadline, 2, 4);
    assert!(back.contains("worker rank 4 joined"), "{back}");
    let (status, out, _) = launch.finish(3 * MINUTE);
    assert!(status.success(), "{}", launch.describe());
    assert!(out.contains("4 workers,") && out.contains("bitwise identical"), "{out}");

    let cluster = read_json(&elastic.join("cluster.json"));
    let changes = cluster["membership"].as_array().expect("membership");
    assert_eq!(changes.len(), 2, "{cluster}");
    assert_eq!(changes[0]["left"][0]["rank"], 2, "{cluster}");
    // A rank behind takes the state of one ahead: no finished step is given up.
    assert_eq!(changes[0]["steps_lost"], 0, "{cluster}");
    assert!(
        changes[0]["resumed_step"].as_u64().is_some_and(|s| s >= 60),
        "{cluster}"
    );
    assert_eq!(changes[1]["joined"], serde_json::json!([4]), "{cluster}");
    let (a, b) = (accuracy(&whole), accuracy(&elastic));
    assert!((a - b).abs() <= 0.005, "uninterrupted {a} vs elastic {b}");
    assert_eq!(train_losses(&elastic).len(), 8, "one metrics line per epoch");
    // The epochs' lines say where the ring re-formed: 3 ranks, then 4 again.
    let worlds: Vec<u64> = std::fs::read_to_string(elastic.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            v["ring_changes"].as_array().cloned().unwrap_or_default()
        })
        .map(|c| c["world"].as_u64().expect("world"))
        .collect();
    assert_eq!(worlds, [3, 4]);
}

/// A hung worker (SIGSTOP) is dropped after the heartbeat timeout and the others go on;
/// resumed (SIGCONT), it is told it was dropped and stops, without touching the new ring.
#[test]
fn a_hung_worker_is_dropped_and_refused_when_it_wakes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut launch, out) = launch_long_iris(
        tmp.path(),
        &["--workers", "3", "--min-workers", "2"],
        &["--heartbeat-timeout-ms", "1500"],
    );
    let deadline = Instant::now() + MINUTE;
    let pid = pid_of(&launch, 1, deadline);
    launch.line(deadline, |l| l.starts_with("epoch "));
    signal("-STOP", pid);
    let reformed = ring_reformed(&launch, Instant::now() + Duration::from_secs(10), 1, 2);
    assert!(
        reformed.contains(&format!("worker rank 1 (pid {pid} ")) && reformed.contains("left: no heartbeat"),
        "{reformed}"
    );
    signal("-CONT", pid);
    let (status, printed, _) = launch.finish(2 * MINUTE);
    assert!(status.success(), "{}", launch.describe());
    assert!(
        printed.contains("2 workers,") && printed.contains("bitwise identical"),
        "{printed}"
    );
    // It stopped by itself once awake, told by the coordinator, not killed at the end.
    let note = printed
        .lines()
        .find(|l| l.starts_with(&format!("worker pid {pid} left the job early (exit status: 1)")))
        .unwrap_or_else(|| panic!("no note on pid {pid}: {printed}"));
    // Told it was dropped, or finding its own silence first (its timers ran out while it was
    // stopped): either way it leaves without a frame into the new ring.
    assert!(
        note.contains("was dropped from the job") || note.contains("no sign of life"),
        "{note}"
    );
    let cluster = read_json(&out.join("cluster.json"));
    assert_eq!(cluster["membership"].as_array().map(Vec::len), Some(1), "{cluster}");
}

/// Two workers that both must stay (min 2): losing one stops the job with exit code 1, the
/// lost rank named, and the checkpoint to resume from.
#[test]
fn below_min_workers_the_job_stops_with_a_checkpoint_naming_the_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut launch, out) = launch_long_iris(
        tmp.path(),
        &["--workers", "2", "--min-workers", "2", "--max-workers", "3"],
        &["--checkpoint-every", "1"],
    );
    let deadline = Instant::now() + MINUTE;
    let pid = pid_of(&launch, 1, deadline);
    while !out.join("checkpoint.safetensors").is_file() {
        assert!(Instant::now() < deadline, "no checkpoint\n{}", launch.describe());
        std::thread::sleep(Duration::from_millis(10));
    }
    signal("-9", pid);
    let (status, _, err) = launch.finish(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", launch.describe());
    let line = error_line(&err);
    assert!(line.contains(&format!("worker rank 1 (pid {pid}")), "{line}");
    assert!(
        line.contains("1 workers left, fewer than the 2 needed (min_workers)"),
        "{line}"
    );
    assert!(line.contains("checkpoint.safetensors (epoch "), "{line}");
}

/// A checkpoint written by 4 workers resumed by 2 and by 3: training goes on from the
/// checkpointed step, and the loss curve goes on like the 4-worker run's (same global batch).
#[test]
fn a_four_worker_checkpoint_resumes_with_two_and_with_three() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(data) = mnist_subset(tmp.path(), 1920, 600) else {
        return;
    };
    // A constant rate, so that stopping after 2 of 4 epochs changes nothing but the stop.
    let edits = |epochs: &'static str| {
        [
            ("epochs = 8", epochs),
            ("schedule = \"cosine\"\nmin_lr = 0.0001", "schedule = \"constant\""),
        ]
    };
    let four = lenet_job(tmp.path(), "four", &edits("epochs = 4"));
    let two = lenet_job(tmp.path(), "two", &edits("epochs = 2"));
    let launch = |job: &Path, workers: &str, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "launch",
            "--workers",
            workers,
            s(job),
            "--data",
            s(&data),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--checkpoint-every", "1", "--quiet"]);
        let mut p = start(&args, "unused");
        let (status, out, _) = p.finish(3 * MINUTE);
        assert!(status.success(), "{}", p.describe());
        out
    };
    let reference = tmp.path().join("reference");
    launch(&four, "4", &reference, &[]);
    let expected = train_losses(&reference);
    for workers in ["2", "3"] {
        let dir = tmp.path().join(format!("resumed-{workers}"));
        launch(&two, "4", &dir, &[]);
        let out = launch(&four, workers, &dir, &["--resume"]);
        assert!(out.contains(&format!("{workers} workers,")), "{out}");
        let losses = train_losses(&dir);
        assert_eq!(losses.len(), 4, "{losses:?}");
        for (e, (got, want)) in losses.iter().zip(&expected).enumerate() {
            let rel = (got - want).abs() / want.abs();
            assert!(rel < 1e-3, "{workers} workers, epoch {}: {got} vs {want}", e + 1);
        }
        let cluster = read_json(&dir.join("cluster.json"));
        assert_eq!(
            cluster["steps"],
            read_json(&reference.join("cluster.json"))["steps"],
            "{cluster}"
        );
    }
}

/// Three workers started together for a job of two with room for three: the third joins
/// while the other two are still starting, and all three train to the same bits.
#[test]
fn a_worker_that_joins_as_the_job_starts_trains_with_the_others() {
    let token = "elastic-start";
    let tmp = tempfile::tempdir().expect("tempdir");
    let job = iris_job(tmp.path(), "join", &[("epochs = 100", "epochs = 300")]);
    let out = tmp.path().join("run");
    let (mut coordinator, addr) = start_coordinator(
        &["--workers", "2", "--max-workers", "3", s(&job), "--out", s(&out)],
        token,
    );
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| start(&["worker", "--coordinator", &addr, "--peer-addr", "127.0.0.1:0"], token))
        .collect();
    let (status, printed, _) = coordinator.finish(2 * MINUTE);
    assert!(status.success(), "{}", coordinator.describe());
    assert!(
        printed.contains("3 workers,") && printed.contains("bitwise identical"),
        "{printed}"
    );
    assert!(
        printed.contains("ring re-formed as generation 1 with 3 workers"),
        "{printed}"
    );
    for w in &mut workers {
        let (status, _, _) = w.finish(MINUTE);
        assert!(status.success(), "{}", w.describe());
    }
}
