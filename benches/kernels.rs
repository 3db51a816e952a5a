//! Kernel benchmarks: sgemm through our `Tensor::matmul` (ndarray → cblas_sgemm) against a
//! direct `cblas_sgemm` call on the same buffers, at one BLAS thread. Throughput is reported
//! in elements/s where one element is one floating-point operation (2n³ per product), so
//! criterion's `Gelem/s` reads as GFLOP/s.
//!
//! `small_products` puts OpenBLAS and our packed-operand kernels (`ringtrain_tensor::gemm`,
//! packing included in every call) side by side on the products of one training step of the
//! benches' LSTM and MLP, the measurement behind which of the two each product uses.
//!
//! Run: `cargo bench --bench kernels` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringtrain_tensor::gemm::{gemm_gather, Gather, PackedB};
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

/// `op(a) · op(b)` on our kernels: `a` read through offset tables (transposed in place), `b`
/// packed on every call.
fn ours(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Vec<f32> {
    let (&[ar, ac], &[br, bc]) = (a.shape(), b.shape()) else {
        unreachable!("2-D operands")
    };
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let n = if tb { br } else { bc };
    let (rows, cols): (Vec<usize>, Vec<usize>) = if ta {
        ((0..m).collect(), (0..k).map(|kk| kk * ac).collect())
    } else {
        ((0..m).map(|i| i * ac).collect(), (0..k).collect())
    };
    let packed = if tb {
        PackedB::pack_t(b.as_slice(), k, n)
    } else {
        PackedB::pack(b.as_slice(), k, n)
    };
    let mut c = vec![0.0f32; m * n];
    let a = Gather {
        data: a.as_slice(),
        rows: &rows,
        cols: &cols,
    };
    gemm_gather(a, &packed, &mut c, n);
    c
}

fn small_products(c: &mut Criterion) {
    threads::set_blas_threads(1);
    let mut group = c.benchmark_group("small_products_1thread");
    group.measurement_time(std::time::Duration::from_secs(2));
    // (name, m, k, n, transpose a, transpose b) of op(a)[m, k] · op(b)[k, n]
    let shapes = [
        ("lstm_step_h_whh", 32, 128, 512, false, true),
        ("lstm_input_proj", 2048, 64, 512, false, true),
        ("lstm_input_proj_dx", 2048, 512, 64, false, false),
        ("lstm_input_proj_dw", 512, 2048, 64, true, false),
        ("lstm_whh_dw", 512, 2048, 128, true, false),
        ("mlp_fc1", 128, 784, 256, false, true),
        ("mlp_fc1_dw", 256, 128, 784, true, false),
        ("mlp_fc2_dx", 128, 128, 256, false, false),
    ];
    for (name, m, k, n, ta, tb) in shapes {
        let mut rng = random::rng(m as u64 ^ n as u64);
        let a = random::uniform(&if ta { [k, m] } else { [m, k] }, -1.0, 1.0, &mut rng);
        let b = random::uniform(&if tb { [n, k] } else { [k, n] }, -1.0, 1.0, &mut rng);
        group.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        group.bench_function(BenchmarkId::new("openblas", name), |bench| {
            bench.iter(|| a.matmul_t(&b, ta, tb).expect("shapes fit"));
        });
        group.bench_function(BenchmarkId::new("packed", name), |bench| {
            bench.iter(|| ours(&a, &b, ta, tb));
        });
    }
    // The recurrence packs W_hh once per pass and reuses it for every time step.
    let mut rng = random::rng(9);
    let (h, w) = (
        random::uniform(&[32, 128], -1.0, 1.0, &mut rng),
        random::uniform(&[512, 128], -1.0, 1.0, &mut rng),
    );
    let packed = PackedB::pack_t(w.as_slice(), 128, 512);
    let mut out = vec![0.0f32; 32 * 512];
    group.throughput(Throughput::Elements(2 * 32 * 128 * 512));
    group.bench_function(BenchmarkId::new("packed_once", "lstm_step_h_whh"), |bench| {
        bench.iter(|| ringtrain_tensor::gemm::gemm_packed(h.as_slice(), 128, 32, &packed, &mut out, 512));
    });
    group.finish();
}

criterion_group!(benches, sgemm, small_products);
criterion_main!(benches);
