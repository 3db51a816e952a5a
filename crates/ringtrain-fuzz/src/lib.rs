//! Entry points that feed untrusted bytes to ringtrain's readers and decoders. The cargo-fuzz
//! targets in `fuzz/` call them, and `tests/replay.rs` feeds every file of their corpora
//! (`fuzz/corpus/TARGET/`) to the same function on the stable toolchain, so a crash once
//! found stays fixed. Each must return for any input (an error is an answer); a panic, an
//! abort or a huge allocation is a bug.
//!
//! **Architecture invariant:** dev only; no product crate depends on it.

use std::path::{Path, PathBuf};

/// One entry point: bytes in, an answer (or an error) out.
pub type Entry = fn(&[u8]);

/// The fuzz targets, by name: what `fuzz/fuzz_targets/NAME.rs` runs.
pub const TARGETS: [(&str, Entry); 5] = [
    ("frame", frame),
    ("control", control),
    ("job", job),
    ("idx", idx),
    ("csv", csv),
];

/// A collective frame off the wire, decoded and validated.
pub fn frame(bytes: &[u8]) {
    let _ = ringtrain_proto::decode::frame(bytes);
}

/// A coordinator message (the first byte picks the kind).
pub fn control(bytes: &[u8]) {
    if let Some((&kind, rest)) = bytes.split_first() {
        let _ = ringtrain_proto::decode::control(kind, rest);
    }
}

/// A job file: parsed, then validated.
pub fn job(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let path = Path::new("fuzz/job.toml");
    if let Ok(job) = ringtrain_config::Job::parse(text, path) {
        let _ = job.validate(text, path);
    }
}

/// The bytes written to a file of this process's own, which the readers take.
fn as_file(name: &str, bytes: &[u8]) -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!("ringtrain-fuzz-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}

/// An IDX file (MNIST's format), plain or gzip.
pub fn idx(bytes: &[u8]) {
    if let Some(path) = as_file("idx", bytes) {
        let _ = ringtrain_data::read_idx(&path);
    }
}

/// A CSV file with a header and a class label column.
pub fn csv(bytes: &[u8]) {
    if let Some(path) = as_file("csv", bytes) {
        let opts = ringtrain_data::CsvOptions::classification("label");
        let _ = ringtrain_data::read_csv(&path, &opts);
    }
}
