//! Helpers for running the real `ringtrain` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}
