//! One training step (forward + backward + optimizer) of the models in the issues' benches,
//! on synthetic inputs, in examples/s (criterion's `elem/s`). Peer figures (PyTorch 2.x eager,
//! same shapes) are in `../shared/design/peers.md`; compare ratios measured on one machine.
//!
//! Run: `cargo bench --profile dev --bench train_step` (`RINGTRAIN_BENCH_THREADS=2` for two
//! threads; default one; `RINGTRAIN_BENCH_CLOCK=cpu` to time by this thread's CPU time on a
//! busy machine).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringtrain_autograd::{Graph, ParamStore, Tensor};
use ringtrain_nn::{
    init_store, zoo, Activation, CellKind, Loss, Module, SequenceClassifier, Targets, TransformerClassifier,
    TransformerConfig,
};
use ringtrain_optim::{Optimizer, OptimizerKind};
use ringtrain_tensor::{random, threads};

// As in the `ringtrain` binary: glibc's allocator hands multi-megabyte activations back to the
// kernel every step and the page faults of refilling them dominated the profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Step {
    model: Box<dyn Module>,
    store: ParamStore,
    opt: Optimizer,
    grad: Vec<f32>,
    x: Tensor,
    targets: Targets,
}

impl Step {
    fn new(model: Box<dyn Module>, opt: OptimizerKind, input: &[usize], classes: usize) -> Step {
        let store = init_store(model.as_ref(), 0);
        let n = store.num_elements();
        let mut rng = random::rng(1);
        let x = random::uniform(input, -1.0, 1.0, &mut rng);
        let targets = Targets::Classes((0..input[0]).map(|i| i % classes).collect());
        Step {
            model,
            opt: Optimizer::new(opt, n),
            grad: vec![0.0; n],
            store,
            x,
            targets,
        }
    }

    /// A step on token ids `[batch, seq]` drawn uniformly from `1..vocab` (no padding), with
    /// `classes` balanced labels.
    fn tokens(model: Box<dyn Module>, vocab: usize, batch: usize, seq: usize, classes: usize) -> Step {
        let mut step = Step::new(model, OptimizerKind::adam(0.0), &[batch, seq], classes);
        let u = random::uniform(&[batch, seq], 1.0, vocab as f32, &mut random::rng(3));
        step.x = u.map(|v| v.floor().min(vocab as f32 - 1.0));
        step
    }

    fn run(&mut self) {
        {
            let mut g = Graph::new(&self.store);
            // as the trainer does: embedding tables' gradients as rows (same bits as dense)
            for p in ringtrain_nn::lookup_tables(&self.store) {
                g.set_row_sparse(p);
            }
            let x = g.input(self.x.clone());
            let out = self.model.forward(&mut g, x).expect("forward");
            let loss = Loss::CrossEntropy.compute(&mut g, out, &self.targets).expect("loss");
            g.backward_into(loss, &mut self.grad).expect("backward");
        }
        self.opt.step(self.store.flat_mut(), &self.grad, 1e-3).expect("step");
    }
}

/// `RINGTRAIN_BENCH_CLOCK=cpu` times steps by the benchmarking thread's CPU time instead of the
/// wall clock: on a machine shared with other builds, wall time mostly measures the neighbours.
/// Valid with one BLAS thread and one rayon thread (all work then runs on this thread).
fn cpu_clock() -> bool {
    std::env::var("RINGTRAIN_BENCH_CLOCK").is_ok_and(|v| v == "cpu") && cpu_time::ThreadTime::try_now().is_ok()
}

/// Times `step` by the wall clock, or by this thread's CPU time under
/// `RINGTRAIN_BENCH_CLOCK=cpu`.
fn bench_step<M: criterion::measurement::Measurement<Value = std::time::Duration>, R>(
    group: &mut criterion::BenchmarkGroup<'_, M>,
    name: &str,
    step: &mut dyn FnMut() -> R,
) {
    if cpu_clock() {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t0 = cpu_time::ThreadTime::now();
                for _ in 0..iters {
                    std::hint::black_box(step());
                }
                t0.elapsed()
            })
        });
    } else {
        group.bench_function(name, |b| b.iter(&mut *step));
    }
}

fn bench_threads() -> usize {
    std::env::var("RINGTRAIN_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn train_steps(c: &mut Criterion) {
    let t = bench_threads();
    threads::configure(threads::ThreadConfig { blas: t, rayon: t });
    let mut group = c.benchmark_group(format!("train_step_{t}thread"));
    group.measurement_time(std::time::Duration::from_secs(5));

    group.throughput(Throughput::Elements(128));
    let mut mlp = Step::new(
        Box::new(zoo::mlp(784, &[256, 128], 10, Activation::Relu)),
        OptimizerKind::sgd(0.9, false, 0.0),
        &[128, 784],
        10,
    );
    bench_step(&mut group, "mlp_784_256_128_10_b128_sgd", &mut || mlp.run());

    group.throughput(Throughput::Elements(64));
    let mut lenet = Step::new(
        Box::new(zoo::lenet5(1, 10)),
        OptimizerKind::adam(0.0),
        &[64, 1, 28, 28],
        10,
    );
    bench_step(&mut group, "lenet5_b64_adam", &mut || lenet.run());
    group.finish();
}

/// The two sequence models of `peers.md`, same shapes as PyTorch's figures: vocabulary 10 000,
/// sequences of 64 tokens, batch 32, Adam, 2 classes.
fn sequence_steps(c: &mut Criterion) {
    let t = bench_threads();
    threads::configure(threads::ThreadConfig { blas: t, rayon: t });
    let mut group = c.benchmark_group(format!("train_step_{t}thread"));
    group.measurement_time(std::time::Duration::from_secs(8));
    group.sample_size(20);
    group.throughput(Throughput::Elements(32));

    let lstm = SequenceClassifier::new(CellKind::Lstm, 10_000, 64, &[128], false, 0.0, 2);
    let mut lstm = Step::tokens(Box::new(lstm), 10_000, 32, 64, 2);
    bench_step(&mut group, "lstm_v10000_e64_h128_t64_b32_adam", &mut || lstm.run());
    let gru = SequenceClassifier::new(CellKind::Gru, 10_000, 64, &[128], false, 0.0, 2);
    let mut gru = Step::tokens(Box::new(gru), 10_000, 32, 64, 2);
    bench_step(&mut group, "gru_v10000_e64_h128_t64_b32_adam", &mut || gru.run());

    // PyTorch's nn.TransformerEncoderLayer defaults: post-norm, ReLU, dropout 0.1.
    let cfg = TransformerConfig {
        max_len: 64,
        ..TransformerConfig::new(10_000, 64, 4, 2, 256)
    };
    let mut tf = Step::tokens(Box::new(TransformerClassifier::new(cfg.clone(), 2)), 10_000, 32, 64, 2);
    bench_step(
        &mut group,
        "transformer_v10000_d64_h4_l2_ff256_t64_b32_adam",
        &mut || tf.run(),
    );
    let no_dropout = TransformerConfig { dropout: 0.0, ..cfg };
    let mut tf0 = Step::tokens(Box::new(TransformerClassifier::new(no_dropout, 2)), 10_000, 32, 64, 2);
    bench_step(
        &mut group,
        "transformer_v10000_d64_h4_l2_ff256_t64_b32_adam_nodropout",
        &mut || tf0.run(),
    );
    group.finish();
}

/// conv2d forward + backward alone: LeNet's second convolution (6→16, 5×5) on a batch of 64.
fn conv2d(c: &mut Criterion) {
    let t = bench_threads();
    threads::configure(threads::ThreadConfig { blas: t, rayon: t });
    let mut rng = random::rng(2);
    let x = random::uniform(&[64, 6, 14, 14], -1.0, 1.0, &mut rng);
    let w = random::uniform(&[16, 6, 5, 5], -0.2, 0.2, &mut rng);
    let mut group = c.benchmark_group(format!("conv2d_{t}thread"));
    // 2·O·C·K²·OH·OW per example forward, ×3 with backward
    group.throughput(Throughput::Elements(3 * 2 * 16 * 6 * 25 * 10 * 10 * 64));
    bench_step(&mut group, "conv2d_6to16_k5_b64_fwd_bwd_flops", &mut || {
        let mut g = Graph::standalone();
        let xv = g.variable(x.clone());
        let wv = g.variable(w.clone());
        let y = g.conv2d(xv, wv, None, 1, 0).expect("conv");
        let s = g.sum(y);
        g.backward(s).expect("backward")
    });
    group.finish();
}

criterion_group!(benches, train_steps, sequence_steps, conv2d);
criterion_main!(benches);
