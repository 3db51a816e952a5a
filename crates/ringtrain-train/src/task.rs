//! From a job to a task: examples, targets, model and loss.

use std::sync::Arc;

use ringtrain_config::{ActivationName, ColumnRef, DataFormat, Job, LossName, ModelConfig, ModelKind};
use ringtrain_data::{read_csv, CsvOptions, LabelColumn, LabelKind, Labels, TabularData};
use ringtrain_nn::{zoo, Activation, Loss, Module, Targets};
use ringtrain_tensor::Tensor;

use crate::{Result, TrainError};

/// A minibatch: inputs with the batch as first axis, and what they are compared against.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub x: Tensor,
    pub targets: Targets,
}

/// A dataset the engine can draw minibatches from.
pub trait Examples: Send + Sync + std::fmt::Debug {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shape of one input (without the batch axis).
    fn input_shape(&self) -> Vec<usize>;
    /// The examples at `indices`, in that order.
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
}

/// What the model predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    /// One of several classes; the model outputs one logit per class.
    Classes { names: Vec<String> },
    /// Yes/no; the model outputs one logit (class 1 when positive).
    Binary { names: [String; 2] },
    /// A real value.
    Regression,
}

impl TargetKind {
    pub fn n_classes(&self) -> usize {
        match self {
            TargetKind::Classes { names } => names.len(),
            TargetKind::Binary { .. } => 2,
            TargetKind::Regression => 0,
        }
    }

    pub fn class_names(&self) -> Vec<String> {
        match self {
            TargetKind::Classes { names } => names.clone(),
            TargetKind::Binary { names } => names.to_vec(),
            TargetKind::Regression => Vec::new(),
        }
    }

    pub fn outputs(&self) -> usize {
        match self {
            TargetKind::Classes { names } => names.len(),
            TargetKind::Binary { .. } | TargetKind::Regression => 1,
        }
    }
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

    pub fn normalisation(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.inv_std)
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
            x.extend(self.data.row(i).iter().zip(&self.mean).zip(&self.inv_std).map(|((&v, &m), &s)| (v - m) * s));
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
}

/// A job made concrete: its examples, what they predict, and how training measures error.
#[derive(Debug, Clone)]
pub struct Task {
    pub examples: Tabular,
    pub target: TargetKind,
    pub loss: Loss,
    /// Class of each example, for stratified splits.
    pub strata: Option<Vec<usize>>,
}

impl Task {
    pub fn from_job(job: &Job) -> Result<Task> {
        let DataFormat::Csv = job.data.format;
        let label_kind = if job.training.loss.is_some_and(|l| matches!(l, LossName::Mse | LossName::Mae)) {
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
                ColumnRef::Index(i) => LabelColumn::Index(*i),
                ColumnRef::Name(n) => LabelColumn::Name(n.clone()),
            },
            label_kind,
        };
        let data = read_csv(&job.data.path, &opts)?;
        let (target, classes) = match (&data.labels, &job.data.positive_class) {
            (Labels::Class { ids, names }, Some(pos)) => {
                let p = names.iter().position(|n| n == pos).ok_or_else(|| TrainError::Job {
                    field: "data.positive_class",
                    reason: format!("class {pos:?} is not in the label column (classes: {names:?})"),
                })?;
                let binary: Vec<usize> = ids.iter().map(|&i| usize::from(i == p)).collect();
                (TargetKind::Binary { names: [format!("not {pos}"), pos.clone()] }, Some(binary))
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
        let d = data.n_features;
        let classes = classes.map(Arc::new);
        Ok(Task {
            strata: classes.as_ref().map(|c| c.to_vec()),
            examples: Tabular {
                data: Arc::new(data),
                classes,
                mean: vec![0.0; d],
                inv_std: vec![1.0; d],
            },
            target,
            loss,
        })
    }

    /// Features per example.
    pub fn examples_input_width(&self) -> usize {
        self.examples.input_shape()[0]
    }

    pub fn example_count(&self) -> usize {
        self.examples.len()
    }

    /// Targets for the loss: BCE compares one logit with a 0/1 value.
    pub fn loss_targets(&self, targets: &Targets) -> Result<Targets> {
        Ok(match (self.loss, targets) {
            (Loss::BinaryCrossEntropy, Targets::Classes(c)) => Targets::Values(
                Tensor::from_vec(&[c.len(), 1], c.iter().map(|&v| v as f32).collect())
                    .map_err(ringtrain_autograd::AutogradError::from)?,
            ),
            _ => targets.clone(),
        })
    }
}

/// Builds the job's model for inputs of `inputs` features and `outputs` outputs.
pub fn build_model(cfg: &ModelConfig, inputs: usize, outputs: usize) -> Box<dyn Module> {
    let act = match cfg.activation {
        ActivationName::Relu => Activation::Relu,
        ActivationName::LeakyRelu => Activation::LeakyRelu(0.01),
        ActivationName::Sigmoid => Activation::Sigmoid,
        ActivationName::Tanh => Activation::Tanh,
    };
    match cfg.kind {
        ModelKind::Logistic if outputs == 1 => Box::new(zoo::logistic(inputs)),
        // Multinomial logistic regression: one layer, softmax in the loss.
        ModelKind::Logistic => Box::new(zoo::mlp(inputs, &[], outputs, act)),
        ModelKind::Mlp => Box::new(zoo::mlp(inputs, &cfg.hidden, outputs, act)),
    }
}
