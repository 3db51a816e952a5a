//! Parallel k-fold: the fold groups' results merged into one run directory.

use std::path::Path;

use anyhow::Context as _;
use ringtrain_coordinator::GroupOutcome;
use ringtrain_train::{EpochReport, RunSummary};

/// Parallel k-fold: joins the groups' results into the run directory the last fold's group
/// wrote (its model, preprocessing and job copy stay): `summary.json` with every fold in fold
/// order and the mean ± std over all of them, `metrics.jsonl` with every fold's lines, the
/// plots redrawn. Written here, by the coordinator, after every group finished, so a
/// multi-node run needs OUT to be the same directory for the coordinator and that rank.
pub(super) fn write_merged_folds(
    groups: &[GroupOutcome],
    out: &Path,
    job: &ringtrain_config::Job,
) -> anyhow::Result<RunSummary> {
    let mut parts = Vec::with_capacity(groups.len());
    let mut lines: Vec<((Option<usize>, usize), &str)> = Vec::new();
    for g in groups {
        let part: RunSummary = serde_json::from_str(&g.summary_json)
            .with_context(|| format!("read the run summary of fold group {}", g.plan.index))?;
        parts.push(part);
        for line in g.metrics_jsonl.lines().filter(|l| !l.trim().is_empty()) {
            let r: EpochReport = serde_json::from_str(line)
                .with_context(|| format!("read a metrics line of fold group {}: {line}", g.plan.index))?;
            lines.push(((r.fold, r.epoch), line));
        }
    }
    // Sequential k-fold writes fold after fold, epochs in order; the sort is stable.
    lines.sort_by_key(|(key, _)| *key);
    let mut metrics = String::new();
    for (_, line) in &lines {
        metrics.push_str(line);
        metrics.push('\n');
    }
    let mut folds: Vec<_> = parts.iter().flat_map(|p| p.folds.iter().cloned()).collect();
    folds.sort_by_key(|f| f.fold);
    let got: Vec<Option<usize>> = folds.iter().map(|f| f.fold).collect();
    if got != (0..folds.len()).map(Some).collect::<Vec<_>>() {
        anyhow::bail!("the fold groups reported folds {got:?}, not each fold once");
    }
    let kfold = ringtrain_train::kfold_summary(&folds).context("summarise the folds")?;
    let first = parts.into_iter().next().context("no fold group reported")?;
    // The fields of a single train/test split stay empty, as in sequential k-fold (a group
    // that trained one fold filled them in for that fold).
    let mut merged = RunSummary {
        test_accuracy: None,
        test_loss: None,
        test_rmse: None,
        test_perplexity: None,
        test_sequence_accuracy: None,
        confusion_matrix: None,
        early_stopping: None,
        folds,
        kfold,
        ..first
    };
    // The groups each saw only their folds; the baselines are computed here, over all of them,
    // as sequential k-fold computes them.
    let baselines = ringtrain_train::classification_baselines(job, &merged.folds).context("compute the baselines")?;
    merged.baseline.extend(baselines);
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let text = serde_json::to_string_pretty(&merged).context("serialise the merged summary")?;
    ringtrain_train::write_atomic(&out.join("summary.json"), text.as_bytes()).context("write summary.json")?;
    ringtrain_train::write_atomic(&out.join("metrics.jsonl"), metrics.as_bytes()).context("write metrics.jsonl")?;
    ringtrain_train::write_plots(out, &metrics, &merged).context("draw the plots of every fold")?;
    Ok(merged)
}
