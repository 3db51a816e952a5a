//! Kernel benchmarks: sgemm through our `Tensor::matmul` (ndarray → cblas_sgemm) against a
//! direct `cblas_sgemm` call on the same buffers, at one BLAS thread. Throughput is reported
//! in elements/s where one element is one floating-point operation (2n³ per product), so
//! criterion's `Gelem/s` reads as GFLOP/s.
//!
//! Run: `cargo bench --bench kernels` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringtrain_tensor::{random, threads, Tensor};

#[allow(unsafe_code)] // reason: the reference is the raw C call our path must match
fn raw_sgemm(a: &[f32], b: &[f32], c: &mut [f32], n: usize) {
    let n = i32::try_from(n).expect("bench sizes fit in i32");
    // SAFETY: a, b, c are n×n row-major buffers of exactly n*n elements (checked by callers).
    unsafe {
        cblas_sys::cblas_sgemm(
            cblas_sys::CBLAS_LAYOUT::CblasRowMajor,
            cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
            cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
            n,
            n,
            n,
            1.0,
            a.as_ptr(),
            n,
            b.as_ptr(),
            n,
            0.0,
            c.as_mut_ptr(),
            n,
        );
    }
}

fn sgemm(c: &mut Criterion) {
    threads::set_blas_threads(1);
    let mut group = c.benchmark_group("sgemm_1thread");
    group.measurement_time(std::time::Duration::from_secs(3));
    for n in [128usize, 256, 512, 1024] {
        let mut rng = random::rng(n as u64);
        let a = random::uniform(&[n, n], -1.0, 1.0, &mut rng);
        let b = random::uniform(&[n, n], -1.0, 1.0, &mut rng);
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.bench_with_input(BenchmarkId::new("ringtrain_matmul", n), &n, |bench, _| {
            bench.iter(|| a.matmul(&b).expect("square shapes"));
        });
        group.bench_with_input(BenchmarkId::new("ringtrain_matmul_bt", n), &n, |bench, _| {
            bench.iter(|| a.matmul_t(&b, false, true).expect("square shapes"));
        });
        let mut out = Tensor::zeros(&[n, n]);
        group.bench_with_input(BenchmarkId::new("cblas_sgemm_direct", n), &n, |bench, _| {
            bench.iter(|| raw_sgemm(a.as_slice(), b.as_slice(), out.as_mut_slice(), n));
        });
    }
    group.finish();
}

criterion_group!(benches, sgemm);
criterion_main!(benches);
