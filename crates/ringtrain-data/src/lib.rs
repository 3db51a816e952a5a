//! Data loading, splitting, sharding and evaluation metrics for ringtrain.
//!
//! # Map
//! * Readers: [`csv`] (CSV/TSV tables, and scikit-learn's bundled layout via
//!   [`read_sklearn_csv`], whose first line holds counts and class names instead of a header),
//!   [`idx`] (MNIST's IDX format), [`text`] (`label<TAB>text` lines or one directory per
//!   class), [`corpus`] (plain text for language modelling), [`pairs`] (`source<TAB>target` lines for sequence-to-sequence), [`timeseries`] (CSV columns into
//!   window → next-value examples). All accept plain or gzip files, recognised by content.
//! * [`vocab`]: character/word tokenizers and vocabularies with PAD/UNK/START/STOP, built from
//!   training text only and saved as JSON; [`batch`]: padding with lengths and masks.
//! * [`split`]: train/test, hold-out, (stratified) k-fold and time-series splits;
//!   [`mod@shard`]: per-rank training and evaluation shards; [`metrics`]: confusion matrix,
//!   regression errors, perplexity, k-fold summaries.
//!
//! # Invariants
//! * **Readers validate once, at the boundary.** Every reader returns either well-formed data
//!   or a [`DataError`] that names the file and the place (line and column for text formats,
//!   byte offset for binary ones). Corrupt input never panics. Missing values are refused
//!   unless the caller explicitly asks to drop or interpolate them ([`Missing`]).
//! * **Determinism.** Every random choice (splits, shuffles, sharding) takes an explicit `u64`
//!   seed and uses `ChaCha8Rng`; the same arguments give the same result on every rank and
//!   platform. Nothing here reads the environment or prints.
//! * **No leakage.** Vocabularies are built from the texts they are given, and the API expects
//!   the training split only; class-name lists of a training file are passed to the test
//!   reader so ids agree.
//! * **Splits** are disjoint and covering, with the size guarantees stated in [`split`].
//! * **Sharding** gives every rank the same number of training examples per epoch (needed by
//!   synchronous all-reduce) and evaluation shards that cover the data exactly once; see
//!   [`mod@shard`].
//! * Metrics accumulate counts and sums that merge exactly across ranks and folds.

pub mod batch;
pub mod corpus;
pub mod csv;
pub mod error;
pub mod idx;
pub mod metrics;
pub mod pairs;
pub mod shard;
mod source;
pub mod split;
#[cfg(test)]
mod testutil;
pub mod text;
pub mod timeseries;
pub mod vocab;

pub use crate::batch::{pad_batch, PaddedBatch};
pub use crate::corpus::{read_text, split_text_tail, LmSequences};
pub use crate::csv::{
    read_csv, read_feature_rows, read_sklearn_csv, CsvOptions, LabelColumn, LabelKind, Labels, TabularData,
};
pub use crate::error::{ColumnRef, DataError, LineRef};
pub use crate::idx::{
    load_mnist, load_mnist_split, read_idx, read_idx_images, read_idx_labels, IdxArray, IdxData, Images, Mnist,
    MnistSplit,
};
pub use crate::metrics::{perplexity, summarize_folds, ConfusionMatrix, RegressionStats, Summary};
pub use crate::pairs::read_pairs;
pub use crate::shard::{batch_share, epoch_batches, epoch_permutation, eval_shard, stream_batches, stream_part};
pub use crate::split::{holdout, kfold, time_series_splits, train_test_split, Split, Window};
pub use crate::text::{read_class_dirs, read_labeled_lines, TextDataset};
pub use crate::timeseries::{make_windows, read_series_csv, Missing, Series, Windows};
pub use crate::vocab::{Tokenizer, Vocab, VocabOptions, PAD, SPECIAL_TOKENS, START, STOP, UNK};
