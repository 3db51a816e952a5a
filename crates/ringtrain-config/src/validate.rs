//! `Job::validate`: what the types alone cannot say (ranges, combinations, files), each failure
//! naming its field and line.

use std::path::Path;

use crate::*;

impl Job {
    /// Checks values that the types alone cannot (ranges, combinations), then that the data
    /// files exist.
    pub fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        self.validate_settings(text, path)?;
        self.check_data_files(text, path)
    }

    /// The data paths name existing files (or a directory, for IDX and class directories).
    fn check_data_files(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let fail = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            line: locate(text, field),
            reason,
        };
        let found = match self.data.format {
            DataFormat::Idx => self.data.path.is_dir(),
            DataFormat::Text => self.data.path.exists(),
            _ => self.data.path.is_file(),
        };
        if !found {
            return Err(fail("data.path", format!("not found: {}", self.data.path.display())));
        }
        if let Some(t) = self.data.test_path.as_ref().filter(|t| !t.exists()) {
            return Err(fail("data.test_path", format!("not found: {}", t.display())));
        }
        Ok(())
    }

    /// [`Job::validate`] but for the data files: what a saved run's `job.toml` must pass, whose
    /// data may since have moved (evaluation can be pointed at it).
    pub fn validate_settings(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let fail = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            line: locate(text, field),
            reason,
        };
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(fail("optimizer.lr", format!("must be a positive number, got {}", o.lr)));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(fail(
                "optimizer.weight_decay",
                format!("must be >= 0, got {}", o.weight_decay),
            ));
        }
        let uses_momentum = matches!(o.kind, OptimizerName::Sgd | OptimizerName::Rmsprop);
        if o.momentum.is_some() && !uses_momentum {
            return Err(fail("optimizer.momentum", format!("is not used by {:?}", o.kind)));
        }
        if let Some(m) = o.momentum {
            if !(0.0..1.0).contains(&m) {
                return Err(fail("optimizer.momentum", format!("must be in [0, 1), got {m}")));
            }
        }
        if o.nesterov == Some(true) && (o.kind != OptimizerName::Sgd || o.momentum.unwrap_or(0.0) == 0.0) {
            return Err(fail(
                "optimizer.nesterov",
                "needs kind = \"sgd\" with momentum > 0".into(),
            ));
        }
        if let Some([b1, b2]) = o.betas {
            if !matches!(o.kind, OptimizerName::Adam | OptimizerName::Adamw) {
                return Err(fail("optimizer.betas", format!("is not used by {:?}", o.kind)));
            }
            if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
                return Err(fail(
                    "optimizer.betas",
                    format!("must both be in [0, 1), got [{b1}, {b2}]"),
                ));
            }
        }
        if let Some(eps) = o.eps {
            if !(eps.is_finite() && eps > 0.0) {
                return Err(fail("optimizer.eps", format!("must be positive, got {eps}")));
            }
        }
        match o.schedule {
            ScheduleName::Step if o.step_epochs.unwrap_or(0) == 0 || o.gamma.is_none() => {
                return Err(fail(
                    "optimizer.schedule",
                    "\"step\" needs step_epochs > 0 and gamma".into(),
                ));
            }
            _ => {}
        }
        if self.training.epochs == 0 {
            return Err(fail("training.epochs", "must be at least 1".into()));
        }
        if self.training.batch_size == 0 {
            return Err(fail("training.batch_size", "must be at least 1".into()));
        }
        if self.training.accumulate_steps == 0 {
            return Err(fail("training.accumulate_steps", "must be at least 1".into()));
        }
        let mb = self.distributed.bucket_mb;
        if !(mb.is_finite() && mb > 0.0 && mb <= 1024.0) {
            return Err(fail(
                "distributed.bucket_mb",
                format!("must be above 0 and at most 1024, got {mb}"),
            ));
        }
        if let Some(c) = self.training.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(fail("training.clip_grad_norm", format!("must be positive, got {c}")));
            }
        }
        let e = &self.evaluation;
        if !(e.test_fraction > 0.0 && e.test_fraction < 1.0) {
            return Err(fail(
                "evaluation.test_fraction",
                format!("must be in (0, 1), got {}", e.test_fraction),
            ));
        }
        if let Some(v) = e.validation_fraction.filter(|v| !(*v > 0.0 && *v < 1.0)) {
            return Err(fail(
                "evaluation.validation_fraction",
                format!("must be in (0, 1), got {v}"),
            ));
        }
        if let Some(stop) = &self.training.early_stopping {
            if e.validation_fraction.is_none() {
                return Err(fail(
                    "training.early_stopping",
                    "watches a validation part: set evaluation.validation_fraction too".into(),
                ));
            }
            if stop.patience == 0 {
                return Err(fail("training.early_stopping.patience", "must be at least 1".into()));
            }
            if !(stop.min_delta.is_finite() && stop.min_delta >= 0.0) {
                return Err(fail(
                    "training.early_stopping.min_delta",
                    format!("must be 0 or more, got {}", stop.min_delta),
                ));
            }
        }
        if e.scheme == EvalScheme::Kfold && e.folds < 2 {
            return Err(fail(
                "evaluation.folds",
                format!("k-fold needs at least 2 folds, got {}", e.folds),
            ));
        }
        if e.parallel_folds && e.scheme != EvalScheme::Kfold {
            return Err(fail(
                "evaluation.parallel_folds",
                "runs the folds of scheme = \"kfold\" in parallel; this job has no folds".into(),
            ));
        }
        if self.model.kind == ModelKind::Mlp && self.model.hidden.contains(&0) {
            return Err(fail("model.hidden", "layer widths must be at least 1".into()));
        }
        let hidden = &self.model.hidden;
        if self.model.kind.is_recurrent() && hidden.iter().any(|&h| h == 0 || h != hidden[0]) {
            return Err(fail(
                "model.hidden",
                format!("stacked recurrent layers share one hidden size of at least 1, got {hidden:?}"),
            ));
        }
        if self.data.format == DataFormat::Csv && self.data.label.is_none() {
            return Err(fail(
                "data.label",
                "csv data needs the label column (a name or an index)".into(),
            ));
        }
        let has_test_split = self.data.format == DataFormat::Idx
            || (matches!(self.data.format, DataFormat::Text | DataFormat::Pairs | DataFormat::Csv)
                && self.data.test_path.is_some());
        if e.scheme == EvalScheme::Provided && !has_test_split {
            return Err(fail(
                "evaluation.scheme",
                "\"provided\" needs a dataset with its own test split (idx, or csv, text or pairs with data.test_path)"
                    .into(),
            ));
        }
        // Every format but CSV (whose labels say) fixes what its models are trained to lower.
        if let Some(loss) = self.training.loss {
            let (fits, wanted) = match self.data.format {
                DataFormat::Csv => (true, ""),
                DataFormat::Series => (
                    matches!(loss, LossName::Mse | LossName::Mae),
                    "mse or mae (forecasting is regression)",
                ),
                _ => (loss == LossName::CrossEntropy, "cross_entropy"),
            };
            if !fits {
                return Err(fail(
                    "training.loss",
                    format!(
                        "{} data trains with {wanted}",
                        format!("{:?}", self.data.format).to_lowercase()
                    ),
                ));
            }
        }
        let ordered = matches!(self.data.format, DataFormat::Corpus | DataFormat::Series);
        if ordered && e.scheme != EvalScheme::TimeSeries {
            return Err(fail(
                "evaluation.scheme",
                format!(
                    "{:?} data is ordered in time: use scheme = \"time_series\" (test on the tail, nothing shuffled)",
                    self.data.format
                )
                .to_lowercase(),
            ));
        }
        if self.data.seq_len == Some(0) {
            return Err(fail("data.seq_len", "must be at least 1".into()));
        }
        let sequence_model = self.model.kind.is_recurrent() || self.model.kind == ModelKind::Transformer;
        let fits = match self.data.format {
            DataFormat::Text => sequence_model || self.model.kind == ModelKind::Bow,
            DataFormat::Corpus => sequence_model,
            DataFormat::Pairs => self.model.kind == ModelKind::Transformer,
            DataFormat::Series => sequence_model || matches!(self.model.kind, ModelKind::Mlp | ModelKind::Logistic),
            DataFormat::Csv => !sequence_model && self.model.kind != ModelKind::Bow,
            DataFormat::Idx => !sequence_model && !matches!(self.model.kind, ModelKind::Bow | ModelKind::Fcn),
        };
        if !fits {
            return Err(fail(
                "model.kind",
                format!(
                    "{:?} does not fit {:?} data: token data (text, corpus) needs rnn, gru, lstm or transformer \
                     (text also bow); series take those or mlp; sequence models need token or series data; \
                     fcn classifies csv rows as series",
                    self.model.kind, self.data.format
                )
                .to_lowercase(),
            ));
        }
        if self.data.format == DataFormat::Corpus && self.model.bidirectional {
            return Err(fail(
                "model.bidirectional",
                "a language model predicts the next token and may not read ahead".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return Err(fail(
                "model.dropout",
                format!("must be in [0, 1), got {}", self.model.dropout),
            ));
        }
        if self.model.kind == ModelKind::Transformer {
            let d = self.model.embedding_dim();
            let h = self.model.heads();
            if h == 0 || !d.is_multiple_of(h) {
                return Err(fail(
                    "model.heads",
                    format!("must divide embedding_dim (d_model) {d}, got {h}"),
                ));
            }
            if self.model.blocks == Some(0) {
                return Err(fail("model.blocks", "must be at least 1".into()));
            }
        }
        if self.model.one_hot && (!self.model.kind.is_recurrent() || self.model.embedding_dim.is_some()) {
            return Err(fail(
                "model.one_hot",
                "replaces the learned embedding of a recurrent token model: use it with rnn, gru or lstm, without \
                 embedding_dim"
                    .into(),
            ));
        }
        if self.training.tbptt && (self.data.format != DataFormat::Corpus || !self.model.kind.is_recurrent()) {
            return Err(fail(
                "training.tbptt",
                "carries a recurrent state through a running text: use it with data.format = \"corpus\" and model.kind \
                 rnn, gru or lstm"
                    .into(),
            ));
        }
        if self.model.embedding_dropout > 0.0 && !self.model.kind.is_recurrent() {
            return Err(fail(
                "model.embedding_dropout",
                "applies to recurrent text models; a transformer's dropout (model.dropout) covers its embeddings"
                    .into(),
            ));
        }
        if !(0.0..1.0).contains(&self.model.token_dropout) {
            return Err(fail(
                "model.token_dropout",
                format!("must be in [0, 1), got {}", self.model.token_dropout),
            ));
        }
        if self.model.token_dropout > 0.0
            && (self.model.kind != ModelKind::Transformer || self.data.format != DataFormat::Text)
        {
            return Err(fail(
                "model.token_dropout",
                "leaves tokens out of a transformer text classifier's attention and pooling (data.format = \"text\"); \
                 recurrent models have embedding_dropout"
                    .into(),
            ));
        }
        if !(0.0..1.0).contains(&self.model.embedding_dropout) {
            return Err(fail(
                "model.embedding_dropout",
                format!("must be in [0, 1), got {}", self.model.embedding_dropout),
            ));
        }
        if self.model.bigram_buckets.is_some() && self.model.kind != ModelKind::Bow {
            return Err(fail("model.bigram_buckets", "belongs to kind = \"bow\"".into()));
        }
        if (self.model.kind == ModelKind::Layers) == self.model.layers.is_empty() {
            return Err(fail(
                "model.layers",
                "is required by kind = \"layers\" and only allowed there".into(),
            ));
        }
        Ok(())
    }
}
