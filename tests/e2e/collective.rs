//! The collective layer across real processes: `ringtrain collective-peer`
//! ranks on 127.0.0.1 (port 0, addresses read from their stdout), real gRPC,
//! a deadline on every wait, children killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::bin;

const TOKEN: &str = "e2e-token";

/// One `collective-peer` process.
struct Peer {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: std::thread::JoinHandle<()>,
    args: Vec<String>,
}

/// A local ring of peer processes, killed when dropped.
struct Ring {
    peers: Vec<Peer>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        for p in &mut self.peers {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Ring {
    /// Start `n` ranks with `args(rank)` and `token(rank)`, wait for every
    /// bound address and hand each rank the peer list.
    fn start(n: usize, args: impl Fn(usize) -> Vec<String>, token: impl Fn(usize) -> String) -> Ring {
        // A job id per ring: a stream that reaches another test's ring (through a
        // port reused after a process exited) is refused instead of joining it.
        static RINGS: AtomicUsize = AtomicUsize::new(0);
        let job = format!("e2e-{}-{}", std::process::id(), RINGS.fetch_add(1, Ordering::Relaxed));
        let mut ring = Ring { peers: Vec::new() };
        for rank in 0..n {
            let mut full = vec![
                "collective-peer".to_owned(),
                "--rank".to_owned(),
                rank.to_string(),
                "--world".to_owned(),
                n.to_string(),
                "--job-id".to_owned(),
                job.clone(),
            ];
            full.extend(args(rank));
            let mut child = Command::new(bin())
                .args(&full)
                .env("RINGTRAIN_TOKEN", token(rank))
                .env("RINGTRAIN_THREADS", "1")
                .env("OPENBLAS_NUM_THREADS", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ringtrain collective-peer");
            let (tx, lines) = mpsc::channel();
            let stdout = child.stdout.take().expect("stdout");
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            let stderr = Arc::new(Mutex::new(String::new()));
            let stderr_reader = crate::util::collect(child.stderr.take().expect("stderr"), stderr.clone());
            ring.peers.push(Peer {
                child,
                lines,
                stderr,
                stderr_reader,
                args: full,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let addrs: Vec<String> = (0..n)
            .map(|r| {
                let v = ring.line(r, deadline, |v| v["event"] == "listening");
                v["addr"].as_str().expect("addr").to_owned()
            })
            .collect();
        for p in &mut ring.peers {
            let mut stdin = p.child.stdin.take().expect("stdin");
            writeln!(stdin, "peers {}", addrs.join(" ")).expect("send the peer list");
        }
        ring
    }

    fn describe(&self, rank: usize) -> String {
        let p = &self.peers[rank];
        let stderr = p.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        format!("rank {rank}: ringtrain {}\n--- stderr\n{stderr}", p.args.join(" "))
    }

    /// Next stdout line of `rank` (JSON) satisfying `want`, before `deadline`.
    fn line(&self, rank: usize, deadline: Instant, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.peers[rank]
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no expected line in time\n{}", self.describe(rank)));
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
            if want(&v) {
                return v;
            }
        }
    }

    /// Exit status and stderr of `rank`, which must exit before `deadline`.
    fn exit(&mut self, rank: usize, deadline: Instant) -> (ExitStatus, String) {
        loop {
            if let Some(status) = self.peers[rank].child.try_wait().expect("try_wait") {
                let reader = std::slice::from_ref(&self.peers[rank].stderr_reader);
                crate::util::drain(reader, deadline);
                let stderr = self.peers[rank].stderr.lock().map(|s| s.clone()).unwrap_or_default();
                return (status, stderr);
            }
            assert!(
                Instant::now() < deadline,
                "rank {rank} did not exit in time\n{}",
                self.describe(rank)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn check_digests(seed: u64) -> Vec<String> {
    let n = 4;
    let mut ring = Ring::start(
        n,
        |_| {
            strings(&[
                "--mode",
                "check",
                "--len",
                "100003",
                "--seed",
                &seed.to_string(),
                "--part-bytes",
                "64KiB",
            ])
        },
        |_| TOKEN.to_owned(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut digests = Vec::new();
    for r in 0..n {
        let v = ring.line(r, deadline, |v| v["event"] == "check");
        assert_eq!(
            v["matches_model"], true,
            "rank {r} differs from the ring-order sum: {v}"
        );
        assert!(v["max_abs_err_vs_f64_sum"].as_f64().expect("err") < 1e-3, "{v}");
        digests.push(v["digest"].as_str().expect("digest").to_owned());
    }
    for r in 0..n {
        let (status, _) = ring.exit(r, deadline);
        assert!(status.success(), "{}", ring.describe(r));
    }
    digests
}

#[test]
fn four_processes_all_reduce_to_the_same_bits_run_after_run() {
    let first = check_digests(7);
    assert!(first.iter().all(|d| d == &first[0]), "ranks differ: {first:?}");
    let second = check_digests(7);
    assert_eq!(first, second, "same inputs and ring order must give the same bits");
}

/// Four ranks reducing `len` values round after round, each failing once it hears nothing
/// for `timeout_ms`; returned once every rank has done 3 rounds, so that a fault injected
/// next hits a ring at work.
fn soaking_ring(len: &str, timeout_ms: u64) -> Ring {
    let n = 4;
    let ring = Ring::start(
        n,
        |_| strings(&["--mode", "soak", "--len", len, "--timeout-ms", &timeout_ms.to_string()]),
        |_| TOKEN.to_owned(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in 0..n {
        ring.line(r, deadline, |v| v["event"] == "round" && v["round"].as_u64() >= Some(3));
    }
    ring
}

/// Ranks 0, 1 and 3 of a [`soaking_ring`] whose rank 2 failed at `failed` must fail too,
/// saying `names_rank_2`, within the timeout and a margin for starting the processes.
fn assert_survivors_name_rank_2(ring: &mut Ring, failed: Instant, timeout_ms: u64, names_rank_2: &str) {
    for r in [0, 1, 3] {
        let (status, stderr) = ring.exit(r, failed + Duration::from_secs(30));
        assert!(!status.success(), "{}", ring.describe(r));
        assert!(stderr.contains(names_rank_2), "rank {r} must name rank 2:\n{stderr}");
    }
    let took = failed.elapsed();
    assert!(
        took < Duration::from_millis(timeout_ms) + Duration::from_secs(8),
        "survivors took {took:?} to fail"
    );
}

#[test]
fn a_killed_rank_is_named_by_the_others_within_the_timeout() {
    let timeout_ms = 2000;
    let mut ring = soaking_ring("1048576", timeout_ms);
    // Kill rank 2 while they reduce.
    ring.peers[2].child.kill().expect("kill rank 2");
    let killed = Instant::now();
    assert_survivors_name_rank_2(&mut ring, killed, timeout_ms, "rank 2");
}

#[test]
fn a_hung_rank_is_named_by_every_other_rank_within_the_timeout() {
    let timeout_ms = 1500;
    let mut ring = soaking_ring("262144", timeout_ms);
    // SIGSTOP: rank 2 stays connected but falls silent (a hung process, not a dead one).
    let pid = ring.peers[2].child.id().to_string();
    let stopped = Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("run kill -STOP");
    assert!(stopped.success());
    let hung = Instant::now();
    assert_survivors_name_rank_2(&mut ring, hung, timeout_ms, "no frame from rank 2");
    // Dropping the ring kills rank 2 (SIGKILL works on a stopped process).
}

#[test]
fn a_rank_with_a_different_layout_fails_every_rank_with_a_mismatch() {
    let n = 3;
    let mut ring = Ring::start(
        n,
        |r| strings(&["--mode", "check", "--len", if r == 1 { "1000" } else { "1024" }]),
        |_| TOKEN.to_owned(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut errors = Vec::new();
    for r in 0..n {
        let (status, stderr) = ring.exit(r, deadline);
        assert!(!status.success(), "{}", ring.describe(r));
        errors.push(stderr);
    }
    // Rank 2 receives from rank 1, the odd one out, and says what differs.
    assert!(
        errors[2].contains("frame from rank 1 has bucket_len = 1000 but rank 2 expects 1024"),
        "{}",
        errors[2]
    );
    assert!(errors[1].contains("bucket_len"), "{}", errors[1]);
    assert!(errors[0].contains("rank"), "{}", errors[0]);
}

#[test]
fn a_peer_with_the_wrong_token_is_refused() {
    let mut ring = Ring::start(
        2,
        |_| strings(&["--mode", "check", "--connect-timeout-ms", "3000"]),
        |r| {
            if r == 1 {
                "not-the-token".to_owned()
            } else {
                TOKEN.to_owned()
            }
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status1, stderr1) = ring.exit(1, deadline);
    let (status0, stderr0) = ring.exit(0, deadline);
    assert!(
        !status0.success() && !status1.success(),
        "neither rank can complete the ring"
    );
    // Each rank's stream carries a token the other does not accept. Whichever is
    // refused first fails (and exits) first, so the other may see it go away
    // instead of its own refusal; at least one of them reports a refusal.
    let refused = |s: &str| s.contains("refused the connection") && s.contains("wrong job token");
    assert!(
        refused(&stderr0) || refused(&stderr1),
        "no refusal reported\n--- rank 0\n{stderr0}\n--- rank 1\n{stderr1}"
    );
}
