//! Evaluation metrics: confusion matrix for classification, error statistics for regression,
//! perplexity for language models, and a mean ± standard deviation summary over k folds.
//!
//! Accumulators ([`ConfusionMatrix`], [`RegressionStats`]) hold plain counts and sums so that
//! per-rank or per-batch results can be merged exactly before the ratios are taken.
//!
//! Division by zero follows scikit-learn's `zero_division=0`: a precision, recall or F1 whose
//! denominator is zero is 0.0, and so is the accuracy of an empty matrix.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::DataError;

/// Counts of (true class, predicted class) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    counts: Vec<Vec<u64>>,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl ConfusionMatrix {
    /// An all-zero `n_classes x n_classes` matrix.
    pub fn new(n_classes: usize) -> Self {
        ConfusionMatrix {
            counts: vec![vec![0; n_classes]; n_classes],
        }
    }

    /// A matrix from counts received elsewhere (another rank, a saved report); rows are true
    /// classes. Errors if the rows are not all `counts.len()` long.
    pub fn from_counts(counts: Vec<Vec<u64>>) -> Result<Self, DataError> {
        let n = counts.len();
        if let Some((i, row)) = counts.iter().enumerate().find(|(_, r)| r.len() != n) {
            return Err(DataError::arg(
                "counts",
                format!("row {i} has {} entries, expected {n} (a square matrix)", row.len()),
            ));
        }
        Ok(ConfusionMatrix { counts })
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.counts.len()
    }

    /// Records one example.
    ///
    /// # Panics
    /// If `truth` or `pred` is `>= n_classes` (labels are validated when data is loaded and
    /// predictions come from a model with `n_classes` outputs, so this is a bug).
    pub fn add(&mut self, truth: usize, pred: usize) {
        let n = self.n_classes();
        assert!(
            truth < n && pred < n,
            "class out of range: truth {truth}, pred {pred}, {n} classes"
        );
        self.counts[truth][pred] += 1;
    }

    /// Records many examples.
    ///
    /// # Panics
    /// As [`ConfusionMatrix::add`], or if the slices differ in length.
    pub fn add_all(&mut self, truth: &[usize], pred: &[usize]) {
        assert_eq!(truth.len(), pred.len(), "truth and pred lengths differ");
        for (&t, &p) in truth.iter().zip(pred) {
            self.add(t, p);
        }
    }

    /// Rows are true classes, columns predicted classes.
    pub fn counts(&self) -> &[Vec<u64>] {
        &self.counts
    }

    /// Number of recorded examples.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Fraction of examples on the diagonal.
    pub fn accuracy(&self) -> f64 {
        let correct = (0..self.n_classes()).map(|c| self.counts[c][c]).sum();
        ratio(correct, self.total())
    }

    /// Of the examples predicted as `c`, the fraction that are `c`.
    pub fn precision(&self, c: usize) -> f64 {
        let predicted: u64 = self.counts.iter().map(|row| row[c]).sum();
        ratio(self.counts[c][c], predicted)
    }

    /// Of the examples that are `c`, the fraction predicted as `c`.
    pub fn recall(&self, c: usize) -> f64 {
        let actual: u64 = self.counts[c].iter().sum();
        ratio(self.counts[c][c], actual)
    }

    /// Harmonic mean of precision and recall of class `c`.
    pub fn f1(&self, c: usize) -> f64 {
        // 2TP / (2TP + FP + FN) equals the harmonic mean and needs no special case for 0/0.
        let tp = self.counts[c][c];
        let predicted: u64 = self.counts.iter().map(|row| row[c]).sum();
        let actual: u64 = self.counts[c].iter().sum();
        ratio(2 * tp, predicted + actual)
    }

    fn macro_of(&self, f: impl Fn(usize) -> f64) -> f64 {
        let n = self.n_classes();
        if n == 0 {
            return 0.0;
        }
        (0..n).map(f).sum::<f64>() / n as f64
    }

    /// Unweighted mean of per-class precision.
    pub fn macro_precision(&self) -> f64 {
        self.macro_of(|c| self.precision(c))
    }

    /// Unweighted mean of per-class recall.
    pub fn macro_recall(&self) -> f64 {
        self.macro_of(|c| self.recall(c))
    }

    /// Unweighted mean of per-class F1 (scikit-learn's `f1_score(average="macro")`).
    pub fn macro_f1(&self) -> f64 {
        self.macro_of(|c| self.f1(c))
    }

    /// Adds another matrix's counts (e.g. from another rank or fold).
    ///
    /// # Panics
    /// If the class counts differ.
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        assert_eq!(
            self.n_classes(),
            other.n_classes(),
            "merging confusion matrices of different sizes"
        );
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
    }
}

/// Running sums for regression errors; merge across ranks, then read the statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RegressionStats {
    count: u64,
    sum_sq: f64,
    sum_abs: f64,
}

impl RegressionStats {
    /// No examples yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one prediction.
    pub fn add(&mut self, truth: f32, pred: f32) {
        let err = f64::from(pred) - f64::from(truth);
        self.count += 1;
        self.sum_sq += err * err;
        self.sum_abs += err.abs();
    }

    /// Records many predictions.
    ///
    /// # Panics
    /// If the slices differ in length.
    pub fn add_all(&mut self, truth: &[f32], pred: &[f32]) {
        assert_eq!(truth.len(), pred.len(), "truth and pred lengths differ");
        for (&t, &p) in truth.iter().zip(pred) {
            self.add(t, p);
        }
    }

    /// Adds another accumulator's sums.
    pub fn merge(&mut self, other: &RegressionStats) {
        self.count += other.count;
        self.sum_sq += other.sum_sq;
        self.sum_abs += other.sum_abs;
    }

    /// Number of recorded predictions.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean squared error (0.0 when empty).
    pub fn mse(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_sq / self.count as f64
        }
    }

    /// Root mean squared error.
    pub fn rmse(&self) -> f64 {
        self.mse().sqrt()
    }

    /// Mean absolute error (0.0 when empty).
    pub fn mae(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_abs / self.count as f64
        }
    }
}

/// Perplexity from the mean per-token cross-entropy in nats: `exp(mean_ce)`.
pub fn perplexity(mean_cross_entropy: f64) -> f64 {
    mean_cross_entropy.exp()
}

/// One metric over k folds.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Arithmetic mean of the fold values.
    pub mean: f64,
    /// Sample standard deviation (divisor `k - 1`); NaN for fewer than two folds, where it is
    /// undefined.
    pub std: f64,
    /// Each fold's value, in fold order.
    pub values: Vec<f64>,
}

impl Summary {
    /// Mean and sample standard deviation of `values`.
    pub fn of(values: &[f64]) -> Summary {
        let k = values.len();
        let mean = if k == 0 {
            f64::NAN
        } else {
            values.iter().sum::<f64>() / k as f64
        };
        let std = if k < 2 {
            f64::NAN
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (k - 1) as f64).sqrt()
        };
        Summary {
            mean,
            std,
            values: values.to_vec(),
        }
    }
}

impl fmt::Display for Summary {
    /// `0.9533 ± 0.0163 (folds: 0.9333, 0.9667, ...)`; the precision applies to all numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = f.precision().unwrap_or(4);
        write!(f, "{:.p$} ± {:.p$} (folds:", self.mean, self.std)?;
        for (i, v) in self.values.iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{v:.p$}")?;
        }
        write!(f, ")")
    }
}

/// Summarises per-fold metrics (`folds[i]` maps metric name to fold `i`'s value).
///
/// Errors if the folds do not all report the same metric names, since a mean over a subset of
/// folds would be silently wrong.
pub fn summarize_folds(folds: &[BTreeMap<String, f64>]) -> Result<BTreeMap<String, Summary>, DataError> {
    let Some(first) = folds.first() else {
        return Ok(BTreeMap::new());
    };
    for (i, fold) in folds.iter().enumerate() {
        if fold.keys().ne(first.keys()) {
            return Err(DataError::arg(
                "folds",
                format!(
                    "fold {i} reports metrics {:?}, fold 0 reports {:?}",
                    fold.keys().collect::<Vec<_>>(),
                    first.keys().collect::<Vec<_>>()
                ),
            ));
        }
    }
    Ok(first
        .keys()
        .map(|name| {
            let values: Vec<f64> = folds.iter().map(|f| f[name]).collect();
            (name.clone(), Summary::of(&values))
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn matches_scikit_learn_on_a_small_example() {
        // y_true = [0,0,1,1,2,2,2], y_pred = [0,1,1,1,2,0,2]; sklearn gives
        // precision [0.5, 2/3, 1.0], recall [0.5, 1.0, 2/3], macro F1 = 0.7111...
        let mut cm = ConfusionMatrix::new(3);
        cm.add_all(&[0, 0, 1, 1, 2, 2, 2], &[0, 1, 1, 1, 2, 0, 2]);
        assert_eq!(cm.counts(), [vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 2]]);
        assert!(close(cm.accuracy(), 5.0 / 7.0));
        assert!(close(cm.precision(0), 0.5));
        assert!(close(cm.precision(1), 2.0 / 3.0));
        assert!(close(cm.recall(2), 2.0 / 3.0));
        assert!(close(cm.f1(1), 0.8));
        let want_macro = (0.5 + 0.8 + 0.8) / 3.0;
        assert!(close(cm.macro_f1(), want_macro));
        assert!(close(cm.macro_precision(), (0.5 + 2.0 / 3.0 + 1.0) / 3.0));
        assert!(close(cm.macro_recall(), (0.5 + 1.0 + 2.0 / 3.0) / 3.0));
    }

    #[test]
    fn zero_division_gives_zero() {
        let mut cm = ConfusionMatrix::new(2);
        assert_eq!(cm.accuracy(), 0.0);
        cm.add(0, 0);
        assert_eq!(cm.precision(1), 0.0);
        assert_eq!(cm.recall(1), 0.0);
        assert_eq!(cm.f1(1), 0.0);
        assert_eq!(cm.f1(0), 1.0);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = ConfusionMatrix::new(2);
        a.add(0, 1);
        let mut b = ConfusionMatrix::new(2);
        b.add(0, 1);
        b.add(1, 1);
        a.merge(&b);
        assert_eq!(a.counts(), [vec![0, 2], vec![0, 1]]);
        assert_eq!(a.total(), 3);
        let back = ConfusionMatrix::from_counts(a.counts().to_vec()).unwrap();
        assert_eq!(back, a);
        assert!(ConfusionMatrix::from_counts(vec![vec![1, 2], vec![3]]).is_err());
    }

    #[test]
    #[should_panic(expected = "class out of range")]
    fn out_of_range_class_panics() {
        ConfusionMatrix::new(2).add(2, 0);
    }

    #[test]
    fn regression_errors() {
        let mut s = RegressionStats::new();
        s.add_all(&[1.0, 2.0, 3.0], &[1.0, 4.0, 2.0]);
        assert!(close(s.mse(), 5.0 / 3.0));
        assert!(close(s.rmse(), (5.0f64 / 3.0).sqrt()));
        assert!(close(s.mae(), 1.0));
        let mut t = RegressionStats::new();
        t.add(0.0, 3.0);
        s.merge(&t);
        assert_eq!(s.count(), 4);
        assert!(close(s.mse(), 14.0 / 4.0));
        assert_eq!(RegressionStats::new().mse(), 0.0);
    }

    #[test]
    fn perplexity_of_uniform_guess_is_vocab_size() {
        assert!((perplexity((65f64).ln()) - 65.0).abs() < 1e-9);
    }

    #[test]
    fn fold_summary_uses_sample_std() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!(close(s.mean, 2.5));
        assert!(close(s.std, (5.0f64 / 3.0).sqrt()));
        assert_eq!(format!("{s:.2}"), "2.50 ± 1.29 (folds: 1.00, 2.00, 3.00, 4.00)");
        assert!(Summary::of(&[1.0]).std.is_nan());

        let fold = |acc: f64, f1: f64| BTreeMap::from([("accuracy".to_string(), acc), ("macro_f1".to_string(), f1)]);
        let sums = summarize_folds(&[fold(0.9, 0.8), fold(1.0, 0.6)]).unwrap();
        assert!(close(sums["accuracy"].mean, 0.95));
        assert_eq!(sums["macro_f1"].values, [0.8, 0.6]);
        let bad = [fold(0.9, 0.8), BTreeMap::from([("accuracy".to_string(), 1.0)])];
        assert!(summarize_folds(&bad).is_err());
    }
}
