//! MNIST-layout IDX directories: grey images and their labels, with the t10k files as the
//! provided test split.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ringtrain_config::Job;
use ringtrain_nn::{Loss, Targets};
use ringtrain_tensor::Tensor;

use super::{Format, ModelRole, Preprocessing};
use crate::inference::{Prediction, SavedModel};
use crate::task::{Batch, Examples, TargetKind, Task};
use crate::Result;

/// The IDX format.
pub(crate) struct Idx;

impl Format for Idx {
    fn role(&self) -> ModelRole {
        ModelRole::Classify
    }

    fn predict(&self, model: &SavedModel, path: &Path) -> Result<Vec<Prediction>> {
        model.predict_idx(path)
    }

    /// Multinomial logistic regression on the pixels, Adam, 3 epochs.
    fn linear_baseline(&self, job: &Job) -> Option<Job> {
        super::retrained(
            job,
            serde_json::json!({"kind": "logistic"}),
            serde_json::json!({"kind": "adam", "lr": 0.001}),
            3,
        )
    }

    /// MNIST-layout IDX directory: training images for training (and k-fold), the t10k files as
    /// the provided test split.
    fn task(&self, job: &Job) -> Result<Task> {
        let mnist = ringtrain_data::load_mnist(&job.data.path)?;
        let to_set = |split: ringtrain_data::MnistSplit| ImageSet {
            labels: Arc::new(split.labels.iter().map(|&l| usize::from(l)).collect()),
            images: Arc::new(split.images),
        };
        let train = to_set(mnist.train);
        let test = to_set(mnist.test);
        let classes = train.labels.iter().chain(test.labels.iter()).max().map_or(0, |m| m + 1);
        Ok(Task {
            strata: Some(train.labels.to_vec()),
            examples: Arc::new(train),
            test_examples: Some(Arc::new(test)),
            target: TargetKind::Classes {
                names: (0..classes).map(|c| c.to_string()).collect(),
            },
            loss: Loss::CrossEntropy,
            role: ModelRole::Classify,
            baseline: BTreeMap::new(),
        })
    }
}

/// MNIST-style grey images, scaled to [0, 1] and normalised with MNIST's mean and standard
/// deviation (0.1307, 0.3081), as torchvision's examples do.
#[derive(Debug, Clone)]
pub struct ImageSet {
    images: Arc<ringtrain_data::Images>,
    labels: Arc<Vec<usize>>,
}

const MNIST_MEAN: f32 = 0.1307;
const MNIST_STD: f32 = 0.3081;

impl Examples for ImageSet {
    fn len(&self) -> usize {
        self.images.n
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![1, self.images.rows, self.images.cols]
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let (r, c) = (self.images.rows, self.images.cols);
        let mut x = Vec::with_capacity(indices.len() * r * c);
        for &i in indices {
            x.extend(
                self.images
                    .image(i)
                    .iter()
                    .map(|&p| (f32::from(p) / 255.0 - MNIST_MEAN) / MNIST_STD),
            );
        }
        let x = Tensor::from_vec(&[indices.len(), 1, r, c], x).map_err(ringtrain_autograd::AutogradError::from)?;
        Ok(Batch {
            x,
            targets: Targets::Classes(indices.iter().map(|&i| self.labels[i]).collect()),
        })
    }

    fn preprocess(&self) -> Option<Preprocessing> {
        Some(Preprocessing::Pixels {
            pixel_scale: 1.0 / 255.0,
            mean: MNIST_MEAN,
            std: MNIST_STD,
        })
    }
}
