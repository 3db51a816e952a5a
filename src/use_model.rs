//! `ringtrain evaluate` and `ringtrain predict`: using the model a run saved.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ringtrain_train::{GenerateOptions, Prediction, SavedModel};

use crate::bad_input;

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// A run directory written by `ringtrain train --out`.
    run_dir: PathBuf,
    /// Evaluate on every example of this file (or IDX directory) instead of the job's test split.
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// A run directory written by `ringtrain train --out`.
    run_dir: PathBuf,
    /// Rows to predict: a CSV laid out like the training data (the label column may be left
    /// out), an IDX image file for image models, or one text per line for text classifiers.
    input: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A run directory of a language-model job.
    run_dir: PathBuf,
    /// Text to continue (the model sees START, then this).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Sampling temperature: below 1 is more conservative, 0 always takes the likeliest token.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Stop after this many tokens if the model has not produced STOP.
    #[arg(long, default_value_t = 400)]
    max_tokens: usize,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the whole context window for every token, even where a transformer could extend
    /// its key/value cache (the same text, slower; for comparison).
    #[arg(long)]
    no_kv_cache: bool,
}

#[derive(clap::Args, Debug)]
pub struct AttentionArgs {
    /// A run directory of a transformer text classifier.
    run_dir: PathBuf,
    /// The text to look at.
    #[arg(long)]
    text: String,
}

/// Every failure here is about the run directory or the input the user named: exit code 2.
fn load(run_dir: &Path) -> anyhow::Result<SavedModel> {
    SavedModel::load(run_dir).map_err(bad_input)
}

pub fn evaluate(args: EvaluateArgs) -> anyhow::Result<()> {
    let model = load(&args.run_dir)?;
    let eval = model.evaluate(args.data.as_deref()).map_err(bad_input)?;
    let m = &eval.metrics;
    println!(
        "{}: {} ({}, {} examples)",
        args.run_dir.display(),
        eval.data.display(),
        eval.scope,
        m.examples
    );
    println!("loss: {}", m.loss);
    // Full precision, so the numbers compare exactly with summary.json.
    if let Some(a) = m.accuracy {
        println!("accuracy: {a}");
    }
    if let Some(f) = m.macro_f1 {
        println!("macro F1: {f}");
    }
    if let Some(r) = m.rmse {
        println!("RMSE: {r}");
    }
    if let Some(a) = m.mae {
        println!("MAE: {a}");
    }
    if let Some(p) = m.perplexity {
        println!("perplexity: {p}");
    }
    if let Some(cm) = &m.confusion_matrix {
        print_confusion(&eval.class_names, cm);
    }
    Ok(())
}

fn print_confusion(names: &[String], cm: &[Vec<u64>]) {
    let width = names.iter().map(String::len).max().unwrap_or(4).max(6);
    println!("confusion matrix (rows: true class, columns: predicted)");
    let mut line = format!("{:width$}", "");
    for n in names {
        line.push_str(&format!(" {n:>width$}"));
    }
    println!("{line}");
    for (n, row) in names.iter().zip(cm) {
        let mut line = format!("{n:>width$}");
        for c in row {
            line.push_str(&format!(" {c:>width$}"));
        }
        println!("{line}");
    }
}

/// Prints one tab-separated line per input row: the row number (1-based, data rows only), the
/// prediction, and for classifiers the probability of each class.
pub fn predict(args: PredictArgs) -> anyhow::Result<()> {
    let model = load(&args.run_dir)?;
    let predictions = model.predict_file(&args.input).map_err(bad_input)?;
    let names = model.class_names();
    let write = || -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut header = vec!["row".to_string(), "prediction".to_string()];
        header.extend(names.iter().map(|n| format!("p({n})")));
        writeln!(out, "{}", header.join("\t"))?;
        for (i, p) in predictions.iter().enumerate() {
            match p {
                Prediction::Class {
                    name, probabilities, ..
                } => {
                    let probs: Vec<String> = probabilities.iter().map(|p| format!("{p:.4}")).collect();
                    writeln!(out, "{}\t{name}\t{}", i + 1, probs.join("\t"))?;
                }
                Prediction::Value(v) => writeln!(out, "{}\t{v}", i + 1)?,
            }
        }
        out.flush()
    };
    match write() {
        // `predict ... | head` closes the pipe early: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("write predictions to stdout")?),
    }
}

/// Prints the prompt and its sampled continuation.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(bad_input(format!(
            "--temperature must be a number >= 0, got {}",
            args.temperature
        )));
    }
    let model = load(&args.run_dir)?;
    let text = model
        .generate(&GenerateOptions {
            prompt: args.prompt,
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            seed: args.seed,
            kv_cache: !args.no_kv_cache,
        })
        .map_err(bad_input)?;
    println!("{text}");
    Ok(())
}

/// Prints, per layer and head, each token's attention over the text as one JSON object:
/// `{"tokens": [...], "layers": [[[[p, ...] per key] per query] per head] per layer}`.
pub fn attention(args: AttentionArgs) -> anyhow::Result<()> {
    let model = load(&args.run_dir)?;
    let (tokens, maps) = model.attention_maps(&args.text).map_err(bad_input)?;
    let layers: Vec<serde_json::Value> = maps
        .iter()
        .map(|m| {
            let (h, t) = (m.shape()[0], m.shape()[1]);
            let heads: Vec<Vec<Vec<f32>>> = (0..h)
                .map(|k| {
                    m.as_slice()[k * t * t..(k + 1) * t * t]
                        .chunks(t)
                        .map(<[f32]>::to_vec)
                        .collect()
                })
                .collect();
            serde_json::json!(heads)
        })
        .collect();
    println!("{}", serde_json::json!({ "tokens": tokens, "layers": layers }));
    Ok(())
}
