//! Helpers for running the real `ringtrain` binary.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringtrain"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `ringtrain args...` with one BLAS/rayon thread (tests run in parallel on 2 cores).
pub fn ringtrain(args: &[&str]) -> Output {
    let out = Command::new(bin())
        .args(args)
        .env("RINGTRAIN_THREADS", "1")
        .current_dir(repo())
        .output()
        .expect("spawn ringtrain");
    out
}

/// Describes a finished command for assertion messages: command, status, stdout, stderr.
pub fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "ringtrain {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and asserts success.
pub fn ok(args: &[&str]) -> Output {
    let out = ringtrain(args);
    assert!(out.status.success(), "{}", describe(args, &out));
    out
}

/// The first `error:` line of a failed command's stderr: where it says what went wrong.
pub fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
}

/// Sends `sig` (e.g. `-9`, `-STOP`) to `pid` with kill(1): a test's way to lose or hang a worker.
pub fn signal(sig: &str, pid: u32) {
    let sent = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {sig} {pid}");
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A running process with its output collected (stdout also line by line); killed when dropped.
pub struct Proc {
    pub child: Child,
    what: String,
    lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends what `pipe` carries to `sink` until it closes, on a thread of its own.
pub fn collect(mut pipe: impl std::io::Read + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
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
    })
}

/// Waits until the reader threads have seen their pipes close (a process that exited has
/// closed its ends), so its output is whole; at most until `until`, since a grandchild that
/// outlives it may hold a pipe open.
pub fn drain(readers: &[JoinHandle<()>], until: Instant) {
    while readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Proc {
    /// Starts `command` in the repository root; `what` names it in failure messages.
    pub fn spawn(mut command: Command, what: &str) -> Proc {
        let mut child = command
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringtrain");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let sink = stdout.clone();
        let lines_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = collect(child.stderr.take().expect("stderr"), stderr.clone());
        Proc {
            child,
            readers: vec![lines_reader, stderr_reader],
            what: what.to_owned(),
            lines,
            stdout,
            stderr,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.stdout(),
            self.stderr()
        )
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The next stdout line satisfying `want`, before `deadline`.
    pub fn line(&self, deadline: Instant, want: impl Fn(&str) -> bool) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("no expected line in time\n{}", self.describe()),
            }
        }
    }

    /// Waits for the exit, at most `within`.
    pub fn wait(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                drain(&self.readers, Instant::now() + Duration::from_secs(5));
                return s;
            }
            assert!(
                Instant::now() < until,
                "still running after {within:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit, at most `within`; returns status, stdout, stderr.
    pub fn finish(&mut self, within: Duration) -> (ExitStatus, String, String) {
        let status = self.wait(within);
        (status, self.stdout(), self.stderr())
    }
}

/// Writes MNIST-style IDX files into `dir`: for each `(set, n)`, `{set}-images-idx3-ubyte` with
/// `n` images of `side × side` pixels `pixel(i)` (i counting over all of the set's bytes) and
/// `{set}-labels-idx1-ubyte` with labels `label(i)`.
pub fn write_idx(dir: &Path, sets: &[(&str, u32)], side: u32, pixel: impl Fn(u32) -> u8, label: impl Fn(u32) -> u8) {
    let idx = |magic: u32, dims: &[u32], body: Vec<u8>| {
        let mut bytes: Vec<u8> = magic.to_be_bytes().to_vec();
        bytes.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
        bytes.extend(body);
        bytes
    };
    for &(set, n) in sets {
        let images = idx(0x803, &[n, side, side], (0..n * side * side).map(&pixel).collect());
        std::fs::write(dir.join(format!("{set}-images-idx3-ubyte")), images).expect("write images");
        let labels = idx(0x801, &[n], (0..n).map(&label).collect());
        std::fs::write(dir.join(format!("{set}-labels-idx1-ubyte")), labels).expect("write labels");
    }
}
