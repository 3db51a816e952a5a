//! CSV/TSV tables: feature columns and a label column (a class, or a value for regression),
//! standardised per feature on the training split.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ringtrain_config::{ColumnRef, Job, LossName};
use ringtrain_data::{read_csv, CsvOptions, LabelColumn, LabelKind, Labels, TabularData};
use ringtrain_nn::{Loss, Targets};
use ringtrain_tensor::Tensor;

use super::{Format, ModelRole, Preprocessing};
use crate::inference::{Prediction, SavedModel};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::{Result, TrainError};

/// The CSV format.
pub(crate) struct Csv;

impl Format for Csv {
    fn role(&self) -> ModelRole {
        ModelRole::Classify
    }

    fn predict(&self, model: &SavedModel, path: &Path) -> Result<Vec<Prediction>> {
        model.predict_csv(path)
    }

    /// Logistic regression on the standardised features, Adam, as many epochs as the job.
    fn linear_baseline(&self, job: &Job) -> Option<Job> {
        let opt = serde_json::json!({"kind": "adam", "lr": 0.01});
        let mut j = super::retrained(job, serde_json::json!({"kind": "logistic"}), opt, job.training.epochs)?;
        j.data.standardize = true;
        Some(j)
    }

    fn task(&self, job: &Job) -> Result<Task> {
        let opts = csv_options(job)?;
        let data = read_csv(&job.data.path, &opts)?;
        let (target, classes) = match (&data.labels, &job.data.positive_class) {
            (Labels::Class { ids, names }, Some(pos)) => {
                let p = names.iter().position(|n| n == pos).ok_or_else(|| TrainError::Job {
                    field: "data.positive_class",
                    reason: format!("class {pos:?} is not in the label column (classes: {names:?})"),
                })?;
                let binary: Vec<usize> = ids.iter().map(|&i| usize::from(i == p)).collect();
                (
                    TargetKind::Binary {
                        names: [format!("not {pos}"), pos.clone()],
                    },
                    Some(binary),
                )
            }
            (Labels::Class { ids, names }, None) => (TargetKind::Classes { names: names.clone() }, Some(ids.clone())),
            (Labels::Value(_), Some(_)) => {
                return Err(TrainError::Job {
                    field: "data.positive_class",
                    reason: "needs a class label, but the loss is a regression loss".into(),
                })
            }
            (Labels::Value(_), None) => (TargetKind::Regression, None),
        };
        let loss = match (job.training.loss, &target) {
            (Some(l), _) => match l {
                LossName::Mse => Loss::Mse,
                LossName::Mae => Loss::Mae,
                LossName::BinaryCrossEntropy => Loss::BinaryCrossEntropy,
                LossName::CrossEntropy => Loss::CrossEntropy,
            },
            (None, TargetKind::Classes { .. }) => Loss::CrossEntropy,
            (None, TargetKind::Binary { .. }) => Loss::BinaryCrossEntropy,
            (None, TargetKind::Regression) => Loss::Mse,
            (None, TargetKind::NextToken { .. }) => Loss::CrossEntropy,
        };
        let ok = matches!(
            (loss, &target),
            (Loss::CrossEntropy, TargetKind::Classes { .. })
                | (Loss::BinaryCrossEntropy, TargetKind::Binary { .. })
                | (Loss::Mse | Loss::Mae, TargetKind::Regression)
        );
        if !ok {
            return Err(TrainError::Job {
                field: "training.loss",
                reason: format!("{loss:?} does not fit a {target:?} target"),
            });
        }
        let test_examples = match &job.data.test_path {
            Some(path) => Some(Arc::new(read_test_file(
                path,
                &opts,
                &data.labels,
                job.data.positive_class.as_deref(),
            )?) as Arc<dyn Examples>),
            None => None,
        };
        let classes = classes.map(Arc::new);
        Ok(Task {
            strata: classes.as_ref().map(|c| c.to_vec()),
            examples: Arc::new(Tabular::unscaled(data, classes)),
            test_examples,
            target,
            loss,
            role: ModelRole::Classify,
            baseline: BTreeMap::new(),
        })
    }
}

/// A provided test file read like the training file, its labels numbered like the training
/// file's (`train`), or 1 for `positive` and 0 for the rest; a class the training file does
/// not have is an error naming it.
fn read_test_file(path: &Path, opts: &CsvOptions, train: &Labels, positive: Option<&str>) -> Result<Tabular> {
    let data = read_csv(path, opts)?;
    if let (Labels::Class { ids, names }, Labels::Class { names: known, .. }) = (&data.labels, train) {
        let to_train: Vec<usize> = names
            .iter()
            .map(|n| {
                known.iter().position(|k| k == n).ok_or_else(|| TrainError::Job {
                    field: "data.test_path",
                    reason: format!(
                        "{}: class {n:?} is not in the training file (classes: {known:?})",
                        path.display()
                    ),
                })
            })
            .collect::<Result<_>>()?;
        let classes = ids
            .iter()
            .map(|&i| match positive {
                Some(p) => usize::from(known[to_train[i]] == p),
                None => to_train[i],
            })
            .collect();
        return Ok(Tabular::unscaled(data, Some(Arc::new(classes))));
    }
    Ok(Tabular::unscaled(data, None))
}

/// Appends `row` standardised, `(x - mean) * inv_std` per feature: the one standardisation
/// of training, evaluation and prediction, so all three give the same bits.
pub(crate) fn standardize_into(out: &mut Vec<f32>, row: &[f32], mean: &[f32], inv_std: &[f32]) {
    out.extend(row.iter().zip(mean).zip(inv_std).map(|((&v, &m), &s)| (v - m) * s));
}

/// How the job's CSV files are read (training, test and prediction files alike).
pub(crate) fn csv_options(job: &Job) -> Result<CsvOptions> {
    let label_kind = if job
        .training
        .loss
        .is_some_and(|l| matches!(l, LossName::Mse | LossName::Mae))
    {
        LabelKind::Value
    } else {
        LabelKind::Class
    };
    let delimiter = u8::try_from(job.data.delimiter).map_err(|_| TrainError::Job {
        field: "data.delimiter",
        reason: format!("must be an ASCII character, got {:?}", job.data.delimiter),
    })?;
    let opts = CsvOptions {
        delimiter,
        has_header: job.data.header,
        label: match &job.data.label {
            Some(ColumnRef::Index(i)) => LabelColumn::Index(*i),
            Some(ColumnRef::Name(n)) => LabelColumn::Name(n.clone()),
            None => {
                return Err(TrainError::Job {
                    field: "data.label",
                    reason: "csv data needs the label column".into(),
                })
            }
        },
        label_kind,
    };
    Ok(opts)
}

/// Feature rows with per-feature affine normalisation `(x - mean) * inv_std`.
#[derive(Debug, Clone)]
pub struct Tabular {
    data: Arc<TabularData>,
    /// Class id (or 0/1) per row for classification; `None` for regression.
    classes: Option<Arc<Vec<usize>>>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Tabular {
    /// `data` as read, not standardised yet.
    fn unscaled(data: TabularData, classes: Option<Arc<Vec<usize>>>) -> Tabular {
        let d = data.n_features;
        Tabular {
            data: Arc::new(data),
            classes,
            mean: vec![0.0; d],
            inv_std: vec![1.0; d],
        }
    }

    /// Mean and standard deviation of each feature over `rows` (the training split only, so
    /// nothing about the test rows leaks into training).
    pub fn standardized_on(&self, rows: &[usize]) -> Tabular {
        let d = self.data.n_features;
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0.0f64; d];
        let mut sq = vec![0.0f64; d];
        for &r in rows {
            for (j, &v) in self.data.row(r).iter().enumerate() {
                mean[j] += f64::from(v);
                sq[j] += f64::from(v) * f64::from(v);
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let inv_std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                // A constant feature stays constant (0) instead of dividing by zero.
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Tabular {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std,
            ..self.clone()
        }
    }
}

impl Examples for Tabular {
    fn len(&self) -> usize {
        self.data.n_rows
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.data.n_features]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let d = self.data.n_features;
        let mut x = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            standardize_into(&mut x, self.data.row(i), &self.mean, &self.inv_std);
        }
        let x = Tensor::from_vec(&[indices.len(), d], x).map_err(ringtrain_autograd::AutogradError::from)?;
        let targets = match (&self.classes, &self.data.labels) {
            (Some(c), _) => Targets::Classes(indices.iter().map(|&i| c[i]).collect()),
            (None, Labels::Value(v)) => Targets::Values(
                Tensor::from_vec(&[indices.len(), 1], indices.iter().map(|&i| v[i]).collect())
                    .map_err(ringtrain_autograd::AutogradError::from)?,
            ),
            (None, Labels::Class { .. }) => unreachable!("class labels always come with class ids"),
        };
        Ok(Batch { x, targets })
    }

    fn fitted_on(&self, rows: &[usize]) -> Option<Arc<dyn Examples>> {
        Some(Arc::new(self.standardized_on(rows)))
    }

    fn normalised_with(&self, fitted: &Preprocessing) -> Option<Arc<dyn Examples>> {
        let Preprocessing::Features {
            feature_mean,
            feature_inv_std,
        } = fitted
        else {
            return None;
        };
        Some(Arc::new(Tabular {
            mean: feature_mean.clone(),
            inv_std: feature_inv_std.clone(),
            ..self.clone()
        }))
    }

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::Features {
            feature_mean: self.mean.clone(),
            feature_inv_std: self.inv_std.clone(),
        })
    }
}
