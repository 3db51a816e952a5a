//! What `ringtrain train` shows while a job runs: a progress bar on a terminal, plain
//! per-epoch lines otherwise (logs and CI output stay readable and greppable).

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressStyle};
use ringtrain_config::{EvalScheme, Job};
use ringtrain_train::{EpochReport, Progress};

#[derive(Debug)]
pub struct TrainProgress {
    /// Present only when stderr is a terminal and output is not `--quiet`.
    bar: Option<ProgressBar>,
    quiet: bool,
    epochs: usize,
    /// Print one epoch line in `every` (and the first and last).
    every: usize,
    /// Models trained one after the other: the folds of k-fold, else one.
    runs: usize,
    /// Epochs finished so far, over all folds.
    finished: usize,
}

impl TrainProgress {
    pub fn new(job: &Job, quiet: bool) -> TrainProgress {
        let epochs = job.training.epochs;
        let runs = if job.evaluation.scheme == EvalScheme::Kfold {
            job.evaluation.folds
        } else {
            1
        };
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            // The template is a constant; should indicatif ever refuse it, the default style stays.
            if let Ok(style) = ProgressStyle::with_template(
                // Fits 80 columns with the message, so the bar never collapses.
                "{spinner} {elapsed_precise} {bar:20} {percent:>3}% ETA {eta:<4} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        TrainProgress {
            bar,
            quiet,
            epochs,
            every: (epochs / 10).max(1),
            runs,
            finished: 0,
        }
    }

    pub fn observe(&mut self, p: Progress) {
        match p {
            Progress::Batch { done, total, .. } => {
                if let Some(bar) = &self.bar {
                    // Progress counts batches over the whole job, so the ETA covers every fold.
                    bar.set_length((total * self.epochs * self.runs) as u64);
                    bar.set_position((self.finished * total + done) as u64);
                }
            }
            // One process has no ring to re-form; the checkpoint's epoch line says enough.
            Progress::Rejoined { .. } | Progress::Checkpoint { .. } => {}
            Progress::Epoch(r) => {
                self.finished += 1;
                if let Some(bar) = &self.bar {
                    let fold = r.fold.map(|f| format!("fold {f} ")).unwrap_or_default();
                    let metric = match (r.test_accuracy, r.test_rmse) {
                        (Some(a), _) => format!("acc {a:.3}"),
                        (None, Some(e)) => format!("rmse {e:.3}"),
                        (None, None) => format!("loss {:.3}", r.test_loss),
                    };
                    bar.set_message(format!(
                        "{fold}epoch {}/{}  {metric}  {:.0} ex/s",
                        r.epoch, self.epochs, r.examples_per_sec
                    ));
                }
                if self.quiet || !(r.epoch % self.every == 0 || r.epoch == 1 || r.epoch == self.epochs) {
                    return;
                }
                let line = format!("{}  {:.0} ex/s", Self::status(&r, self.epochs), r.examples_per_sec);
                match &self.bar {
                    // Printed above the bar, which redraws below it.
                    Some(bar) => bar.suspend(|| println!("{line}")),
                    None => println!("{line}"),
                }
            }
        }
    }

    fn status(r: &EpochReport, epochs: usize) -> String {
        let fold = r.fold.map(|f| format!("fold {f} ")).unwrap_or_default();
        let acc = r.test_accuracy.map(|a| format!(" test_acc {a:.4}")).unwrap_or_default();
        let rmse = r.test_rmse.map(|a| format!(" test_rmse {a:.4}")).unwrap_or_default();
        let ppl = r
            .test_perplexity
            .map(|p| format!(" test_ppl {p:.3}"))
            .unwrap_or_default();
        let norm = r.grad_norm.map(|n| format!(" grad_norm {n:.3}")).unwrap_or_default();
        format!(
            "{fold}epoch {:>4}/{epochs}  train_loss {:.4}  test_loss {:.4}{acc}{rmse}{ppl}{norm}",
            r.epoch, r.train_loss, r.test_loss
        )
    }

    /// Removes the bar so the summary prints on a clean line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
