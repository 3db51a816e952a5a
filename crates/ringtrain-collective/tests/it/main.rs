//! Integration tests of ringtrain-collective: the ring over the in-memory
//! transport (properties, faults) and over real gRPC on 127.0.0.1.

mod grpc;
mod ring;

use std::future::Future;
use std::time::Duration;

/// Deterministic pseudo-random inputs: rank `r`'s buffer of `len` values.
pub fn inputs(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut s = seed ^ (rank as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            // xorshift64*
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
            (v as f32 / (1u32 << 23) as f32 - 1.0) * 100.0
        })
        .collect()
}

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    rt.block_on(async {
        tokio::time::timeout(limit, fut)
            .await
            .expect("test exceeded its deadline")
    })
}

/// Like [`run`] on a multi-threaded runtime (for the gRPC tests).
pub fn run_mt<F: Future>(limit: Duration, fut: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    rt.block_on(async {
        tokio::time::timeout(limit, fut)
            .await
            .expect("test exceeded its deadline")
    })
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
