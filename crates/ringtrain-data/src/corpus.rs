//! Plain-text corpora for language modelling.

use std::path::Path;

use crate::error::DataError;
use crate::source::Source;

/// Reads a whole UTF-8 text file, plain or gzip.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    Source::open(path)?.read_to_string()
}
