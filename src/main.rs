//! The `ringtrain` binary: a thin shell over the library crates.
//!
//! Exit codes: 0 success, 1 a run failed (retryable: I/O, a peer, divergence),
//! 2 the job or its input is bad (fix it before retrying).
#![allow(clippy::print_stdout)] // reason: printing results is this binary's job

mod certs_cmd;
mod cluster;
mod collective_cmd;
mod progress;
mod use_model;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringtrain_config::Job;
use ringtrain_train::{Progress, RunSummary};

// Training allocates and frees multi-megabyte activations every step; glibc's allocator
// returns them to the kernel each time (page faults dominated `sys` time), mimalloc reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "ringtrain",
    version,
    about = "Distributed data-parallel deep-learning training"
)]
struct Cli {
    /// Threads for BLAS and for the rayon pool of this process (default: all cores).
    #[arg(long, global = true, env = "RINGTRAIN_THREADS")]
    threads: Option<usize>,
    /// The widest vector kernels to use: `avx512`, `avx2` or `scalar` (default: what the CPU
    /// has). Every choice gives the same bits; with OPENBLAS_CORETYPE=Haswell pinning OpenBLAS's
    /// kernel too, a run here reproduces an AVX2 machine's bit for bit.
    #[arg(long, global = true, env = "RINGTRAIN_ISA", value_parser = parse_isa)]
    isa: Option<ringtrain_tensor::simd::Isa>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a job in this process.
    Train {
        /// The job file (TOML).
        job: PathBuf,
        /// Run directory for metrics, summary and weights.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override the evaluation scheme: `train-test` or `kfold:K`.
        #[arg(long)]
        eval: Option<String>,
        /// Override the job's data path (file or directory).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print only the final summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Check a job file (syntax, values, data file, model shapes) without training.
    Validate {
        job: PathBuf,
        /// Override the job's data path.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Print the model's layers, output shapes, parameter counts and FLOPs per example.
    Inspect {
        job: PathBuf,
        /// Override the job's data path.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Recompute the metrics of a run's saved model on the job's test split (or on --data).
    Evaluate(use_model::EvaluateArgs),
    /// Predict the rows of a CSV file (the images of an IDX file, the lines of a text file) with a run's saved model.
    Predict(use_model::PredictArgs),
    /// Sample text from a run's language model (data.format = "corpus").
    Generate(use_model::GenerateArgs),
    /// Print what each head of a transformer text classifier attends to for one text (JSON).
    Attention(use_model::AttentionArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// One rank of a local collective ring (started by `bench allreduce` and the tests).
    #[command(hide = true)]
    CollectivePeer(collective_cmd::PeerArgs),
    /// Train a job on N local worker processes (coordinator in this process).
    Launch(cluster::LaunchArgs),
    /// Coordinate a distributed job whose workers run elsewhere (`ringtrain worker`).
    Coordinator(cluster::CoordinatorArgs),
    /// Join a distributed job as one worker.
    Worker(cluster::WorkerArgs),
    /// Make a cluster CA and certificates signed by it, for mutual TLS (--tls-* flags).
    Certs(certs_cmd::CertsArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Ring all-reduce over gRPC between N local processes: time, algbw, busbw per size.
    Allreduce(collective_cmd::BenchAllreduceArgs),
}

/// An error that means "the job or its input is wrong", as opposed to a failed run.
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn parse_isa(s: &str) -> Result<ringtrain_tensor::simd::Isa, String> {
    use ringtrain_tensor::simd::Isa;
    let isa = match s {
        "avx512" => Isa::Avx512,
        "avx2" => Isa::Avx2,
        "scalar" => Isa::Scalar,
        _ => return Err(format!("`{s}` is not one of avx512, avx2, scalar")),
    };
    if isa.available() {
        Ok(isa)
    } else {
        Err(format!("this CPU cannot run {s} code"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("RINGTRAIN_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    ringtrain_tensor::threads::configure(ringtrain_tensor::threads::ThreadConfig {
        blas: threads,
        rayon: threads,
    });
    if let Some(isa) = cli.isa {
        ringtrain_tensor::simd::Isa::limit(isa);
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let bad_input = e.chain().any(|c| c.is::<BadInput>());
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// The error and its causes on one line, each cause said once: our library errors already
/// write their source into their message, so a cause the line holds already is left out.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bench(BenchCommand::Allreduce(args)) => collective_cmd::run_bench_allreduce(args),
        Command::CollectivePeer(args) => collective_cmd::run_peer(args),
        Command::Launch(args) => cluster::run_launch(args),
        Command::Coordinator(args) => cluster::run_coordinator(args),
        Command::Worker(args) => cluster::run_worker_cmd(args),
        Command::Certs(args) => certs_cmd::run_certs(args),
        Command::Evaluate(args) => use_model::evaluate(args),
        Command::Predict(args) => use_model::predict(args),
        Command::Generate(args) => use_model::generate(args),
        Command::Attention(args) => use_model::attention(args),
        Command::Train {
            job,
            out,
            eval,
            data,
            quiet,
        } => {
            let (mut spec, text) = load_job_with_data(&job, data.as_deref())?;
            if let Some(e) = eval {
                apply_eval_override(&mut spec, &e)?;
            }
            train(&spec, &text, out.as_deref(), quiet)
        }
        Command::Validate { job, data } => {
            let (spec, _) = load_job_with_data(&job, data.as_deref())?;
            let task = check_data_and_model(&spec)?;
            println!("{}: ok ({} examples)", job.display(), task.example_count());
            Ok(())
        }
        Command::Inspect { job, data } => {
            let (spec, _) = load_job_with_data(&job, data.as_deref())?;
            let task = ringtrain_train::Task::from_job(&spec).map_err(classify)?;
            let input = task.input_shape();
            let model = task.model(&spec.model).map_err(classify)?;
            let mut rows = Vec::new();
            model.describe(&input, &mut rows).map_err(bad_input)?;
            println!(
                "{:<22} {:<26} {:>14} {:>10} {:>12}",
                "layer", "kind", "output", "params", "FLOPs"
            );
            println!("{:<22} {:<26} {:>14}", "input", "", format!("{input:?}"));
            for r in &rows {
                println!(
                    "{:<22} {:<26} {:>14} {:>10} {:>12}",
                    r.name,
                    r.kind,
                    format!("{:?}", r.output),
                    r.params,
                    r.flops
                );
            }
            let params: usize = rows.iter().map(|r| r.params).sum();
            let flops: u64 = rows.iter().map(|r| r.flops).sum();
            println!("total: {params} parameters, {flops} forward FLOPs per example");
            Ok(())
        }
    }
}

fn bad_input(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(e.to_string()))
}

/// Splits training failures into bad input (data, job, model shape) and failed runs.
fn classify(e: ringtrain_train::TrainError) -> anyhow::Error {
    use ringtrain_train::TrainError as E;
    match e {
        E::Data(_) | E::Job { .. } | E::Model(_) => bad_input(e),
        other => anyhow::Error::new(other).context("training failed"),
    }
}

/// Reads the job's data and builds its model for it: the checks that need the data (the
/// model's shapes against the examples'), before anything trains or any ring forms.
pub(crate) fn check_data_and_model(job: &Job) -> anyhow::Result<ringtrain_train::Task> {
    let task = ringtrain_train::Task::from_job(job).map_err(classify)?;
    task.model(&job.model).map_err(classify)?;
    Ok(task)
}

/// Loads a job; `data` replaces its data path (relative to the current directory).
pub(crate) fn load_job_with_data(path: &Path, data: Option<&Path>) -> anyhow::Result<(Job, String)> {
    Job::load_with_data(path, data).map_err(bad_input)
}

fn apply_eval_override(job: &mut Job, eval: &str) -> anyhow::Result<()> {
    use ringtrain_config::EvalScheme;
    match eval.split_once(':') {
        Some(("kfold", k)) => {
            let k: usize = k
                .parse()
                .ok()
                .filter(|&k| k >= 2)
                .ok_or_else(|| bad_input(format!("--eval kfold:K needs an integer K >= 2, got {k:?}")))?;
            job.evaluation.scheme = EvalScheme::Kfold;
            job.evaluation.folds = k;
        }
        None if eval == "train-test" => job.evaluation.scheme = EvalScheme::TrainTest,
        _ => {
            return Err(bad_input(format!(
                "--eval must be `train-test` or `kfold:K`, got {eval:?}"
            )))
        }
    }
    Ok(())
}

fn train(job: &Job, text: &str, out: Option<&Path>, quiet: bool) -> anyhow::Result<()> {
    let mut progress = progress::TrainProgress::new(job, quiet);
    let mut observe = |p: Progress| progress.observe(p);
    let summary = ringtrain_train::run_job(job, text, out, &mut observe);
    progress.finish();
    let summary = summary.map_err(classify)?;
    print_summary(&summary);
    if let Some(dir) = out {
        println!("run directory: {}", dir.display());
    }
    Ok(())
}

/// The baselines, and a warning when the model's accuracy (the k-fold mean) is below the
/// linear baseline's.
fn print_baselines(s: &RunSummary, accuracy: Option<f64>) {
    for (name, value) in &s.baseline {
        println!("baseline {}: {value:.4}", name.replace('_', " "));
    }
    if let (Some(a), Some(&linear)) = (accuracy, s.baseline.get("linear_accuracy")) {
        if a < linear {
            println!(
                "warning: test accuracy {a:.4} is below the linear baseline's {linear:.4}: this model does not earn \
                 its place on this data"
            );
        }
    }
}

fn print_summary(s: &RunSummary) {
    println!(
        "== {} ({} parameters, {} epochs, seed {})",
        s.job, s.parameters, s.epochs, s.seed
    );
    if !s.kfold.is_empty() {
        for f in &s.folds {
            let acc = f
                .test
                .accuracy
                .map(|a| format!("  accuracy {a:.4}"))
                .unwrap_or_default();
            let rmse = f.test.rmse.map(|a| format!("  rmse {a:.4}")).unwrap_or_default();
            println!("fold {}: test loss {:.4}{acc}{rmse}", f.fold.unwrap_or(0), f.test.loss);
        }
        for (name, st) in &s.kfold {
            println!("{name:>10}: {:.4} ± {:.4}", st.mean, st.std);
        }
        print_baselines(s, s.kfold.get("accuracy").map(|st| st.mean));
        return;
    }
    if let Some(f) = s.folds.first() {
        println!("test examples: {}  test loss: {:.4}", f.test_examples, f.test.loss);
        match (f.test.accuracy, f.test.macro_f1) {
            (Some(a), Some(f1)) => println!("test accuracy: {a:.4}  macro F1: {f1:.4}"),
            (Some(a), None) => println!("test token accuracy: {a:.4}"),
            _ => {}
        }
        if let Some(r) = f.test.rmse {
            println!("test RMSE: {r:.4}  MAE: {:.4}", f.test.mae.unwrap_or(f64::NAN));
        }
        if let Some(p) = f.test.perplexity {
            println!("test perplexity: {p:.4}");
        }
    }
    if let Some(a) = s.test_sequence_accuracy {
        println!("test exact-sequence accuracy (greedy decoding): {a:.4}");
    }
    print_baselines(s, s.test_accuracy);
    if let Some(e) = &s.early_stopping {
        println!(
            "early stopping: kept epoch {} of {} ({} {:.4}); stopped by {}",
            e.best_epoch, e.epochs_trained, e.metric, e.best_value, e.stopped_by
        );
    }
    if let Some(cm) = &s.confusion_matrix {
        let width = s.class_names.iter().map(String::len).max().unwrap_or(4).max(6);
        println!("confusion matrix (rows: true class, columns: predicted)");
        print!("{:width$}", "");
        for n in &s.class_names {
            print!(" {n:>width$}");
        }
        println!();
        for (n, row) in s.class_names.iter().zip(cm) {
            print!("{n:>width$}");
            for c in row {
                print!(" {c:>width$}");
            }
            println!();
        }
    }
}
