//! Integration tests of ringtrain-collective: the ring over the in-memory
//! transport (properties, faults) and over real gRPC on 127.0.0.1.

mod grpc;
mod ring;

use std::future::Future;
use std::time::Duration;

pub use ringtrain_collective::check_inputs as inputs;

/// Split `len` into `pieces` ranges differing by at most one, larger first:
/// the chunking the crate documents.
pub fn even_range(len: usize, pieces: usize, i: usize) -> std::ops::Range<usize> {
    let base = len / pieces;
    let extra = len % pieces;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// What the documented ring order computes: chunk `c` is summed starting at
/// rank `c`, then `c+1`, ... and divided by `n` for a mean.
pub fn ring_model(xs: &[Vec<f32>], mean: bool) -> Vec<f32> {
    let n = xs.len();
    let len = xs[0].len();
    let mut out = vec![0.0f32; len];
    for c in 0..n {
        for i in even_range(len, n, c) {
            let mut acc = xs[c][i];
            for j in 1..n {
                acc += xs[(c + j) % n][i];
            }
            out[i] = if mean { acc / n as f32 } else { acc };
        }
    }
    out
}

/// Run a future on a fresh single-threaded runtime with an overall deadline.
pub fn run<F: Future>(limit: Duration, fut: F) -> F::Output {
    block_on(tokio::runtime::Builder::new_current_thread(), limit, fut)
}

/// Like [`run`] on a multi-threaded runtime (for the gRPC tests).
pub fn run_mt<F: Future>(limit: Duration, fut: F) -> F::Output {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2);
    block_on(builder, limit, fut)
}

/// A hung test fails at its deadline instead of stalling the whole binary.
fn block_on<F: Future>(mut builder: tokio::runtime::Builder, limit: Duration, fut: F) -> F::Output {
    let rt = builder.enable_all().build().expect("build a tokio runtime");
    rt.block_on(async {
        tokio::time::timeout(limit, fut)
            .await
            .expect("test exceeded its deadline")
    })
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
