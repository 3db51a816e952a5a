//! One CSV column as a time series: windows of past values → the next value, the tail held
//! out for testing.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringtrain_config::{ColumnRef, Job, LossName};
use ringtrain_nn::{Loss, Targets};
use ringtrain_tensor::Tensor;

use super::{Format, ModelRole, Preprocessing};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::{Result, TrainError};

/// The series format.
pub(crate) struct Series;

impl Format for Series {
    fn role(&self) -> ModelRole {
        ModelRole::Forecast
    }

    fn saved_target(&self, _job: &Job, _classes: &[String], _vocab: usize) -> TargetKind {
        TargetKind::Regression
    }

    /// One column of a CSV file in time order. The last `evaluation.test_fraction` of the
    /// targets are the test examples (their input windows may reach back into the training
    /// part: those values are known when forecasting); training windows end before the cut.
    fn task(&self, job: &Job) -> Result<Task> {
        let column = match &job.data.label {
            Some(ColumnRef::Name(n)) => n.clone(),
            _ => {
                return Err(TrainError::Job {
                    field: "data.label",
                    reason: "series data needs the name of the column to forecast".into(),
                })
            }
        };
        let delimiter = u8::try_from(job.data.delimiter).map_err(|_| TrainError::Job {
            field: "data.delimiter",
            reason: format!("must be an ASCII character, got {:?}", job.data.delimiter),
        })?;
        let series = ringtrain_data::read_series_csv(
            &job.data.path,
            delimiter,
            &[column.as_str()],
            ringtrain_data::Missing::Refuse,
        )?;
        let raw = series.column(0);
        let seq_len = job.data.seq_len.unwrap_or(12);
        let n_examples = raw.len().saturating_sub(seq_len);
        let n_test = ((n_examples as f64) * job.evaluation.test_fraction).round() as usize;
        if n_test == 0 || n_test >= n_examples {
            return Err(TrainError::Job {
                field: "data.seq_len",
                reason: format!(
                    "{} values give {n_examples} windows of {seq_len}, too few for a train/test cut at {}",
                    raw.len(),
                    job.evaluation.test_fraction
                ),
            });
        }
        let n_train = n_examples - n_test;
        // Statistics of the values the training windows see (inputs and targets), nothing later.
        let seen = &raw[..n_train + seq_len];
        let mean = seen.iter().map(|&v| f64::from(v)).sum::<f64>() / seen.len() as f64;
        let var = seen.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / seen.len() as f64;
        let std = var.sqrt().max(1e-12);
        let values: Arc<Vec<f32>> = Arc::new(raw.iter().map(|&v| ((f64::from(v) - mean) / std) as f32).collect());
        let set = |starts: std::ops::Range<usize>| SeriesSet {
            values: values.clone(),
            starts: starts.collect(),
            seq_len,
            mean: mean as f32,
            std: std as f32,
        };
        let test = set(n_train..n_examples);
        let loss = match job.training.loss {
            None | Some(LossName::Mse) => Loss::Mse,
            Some(LossName::Mae) => Loss::Mae,
            Some(other) => {
                return Err(TrainError::Job {
                    field: "training.loss",
                    reason: format!("forecasting is regression: use mse or mae, not {other:?}"),
                })
            }
        };
        Ok(Task {
            strata: None,
            baseline: BTreeMap::from([("naive_last_value_rmse".to_string(), test.naive_rmse())]),
            examples: Arc::new(set(0..n_train)),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::Regression,
            loss,
            role: ModelRole::Forecast,
        })
    }
}

/// Forecasting examples: `seq_len` standardised past values → the next value.
#[derive(Debug, Clone)]
pub struct SeriesSet {
    /// The whole series, standardised with the training part's mean and deviation.
    values: Arc<Vec<f32>>,
    /// First step of each example's input window.
    starts: Vec<usize>,
    seq_len: usize,
    mean: f32,
    std: f32,
}

impl SeriesSet {
    /// RMSE, in the data's units, of the naive forecast "the next value equals the last one".
    pub fn naive_rmse(&self) -> f64 {
        let sq: f64 = self
            .starts
            .iter()
            .map(|&s| {
                let e = f64::from(self.values[s + self.seq_len] - self.values[s + self.seq_len - 1]);
                e * e
            })
            .sum();
        (sq / self.starts.len().max(1) as f64).sqrt() * f64::from(self.std)
    }
}

impl Examples for SeriesSet {
    fn len(&self) -> usize {
        self.starts.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.seq_len]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let t = self.seq_len;
        let mut x = Vec::with_capacity(indices.len() * t);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            let s = self.starts[i];
            x.extend_from_slice(&self.values[s..s + t]);
            y.push(self.values[s + t]);
        }
        let n = indices.len();
        let x = Tensor::from_vec(&[n, t], x).map_err(ringtrain_autograd::AutogradError::from)?;
        let y = Tensor::from_vec(&[n, 1], y).map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Values(y),
        })
    }

    fn target_scale(&self) -> f32 {
        self.std
    }

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::Series {
            series_mean: self.mean,
            series_std: self.std,
            seq_len: self.seq_len,
        })
    }
}
