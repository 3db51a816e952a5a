//! The crate's single error type.
//!
//! Every variant that comes from reading a file names the file and the place in it (line and
//! column for text formats, byte offset for binary ones), because a user fixing a data file
//! needs exactly that and nothing else.

use std::fmt;
use std::path::PathBuf;

/// A column of a delimited file, as shown in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRef {
    /// 1-based column number, as a spreadsheet or `cut -f` would count it.
    pub number: usize,
    /// The header name, when the file has a header.
    pub name: Option<String>,
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "column {} ({name:?})", self.number),
            None => write!(f, "column {}", self.number),
        }
    }
}

/// Formats `line N` or `line N, column M ("name")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRef {
    /// 1-based physical line number in the (decompressed) file.
    pub line: usize,
    /// The column, when the problem is in one field.
    pub column: Option<ColumnRef>,
}

impl fmt::Display for LineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(column) = &self.column {
            write!(f, ", {column}")?;
        }
        Ok(())
    }
}

/// Errors of `ringtrain-data`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The operating system refused to open or read a file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A text file (CSV, TSV, corpus) is malformed at a given line.
    #[error("{}: {at}: {problem}", path.display())]
    Text {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        at: LineRef,
        /// What is wrong, in words.
        problem: String,
    },
    /// A binary file (IDX, gzip stream) is malformed at a given byte offset.
    #[error("{}: byte {offset}: {problem}", path.display())]
    Binary {
        /// The file.
        path: PathBuf,
        /// Byte offset into the file; for gzip files, into the decompressed stream.
        offset: u64,
        /// What is wrong, in words.
        problem: String,
    },
    /// A file holds no examples at all.
    #[error("{}: {problem}", path.display())]
    Empty {
        /// The file or directory.
        path: PathBuf,
        /// Why nothing was found (e.g. "empty file", "header but no data rows").
        problem: String,
    },
    /// A file parsed, but its content breaks the format's rules (e.g. a vocabulary file whose
    /// special tokens are missing).
    #[error("{}: {problem}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        problem: String,
    },
    /// An argument is out of its documented range (a caller's or configuration mistake, not
    /// a data file's).
    #[error("invalid argument `{name}`: {problem}")]
    InvalidArgument {
        /// The parameter's name.
        name: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// Serialising or deserialising a vocabulary failed.
    #[error("vocabulary JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn text(
        path: impl Into<PathBuf>,
        line: usize,
        column: Option<ColumnRef>,
        problem: impl Into<String>,
    ) -> Self {
        DataError::Text {
            path: path.into(),
            at: LineRef { line, column },
            problem: problem.into(),
        }
    }

    pub(crate) fn binary(path: impl Into<PathBuf>, offset: u64, problem: impl Into<String>) -> Self {
        DataError::Binary {
            path: path.into(),
            offset,
            problem: problem.into(),
        }
    }

    pub(crate) fn empty(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        DataError::Empty {
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn arg(name: &'static str, problem: impl Into<String>) -> Self {
        DataError::InvalidArgument {
            name,
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_error_message_names_file_line_and_column() {
        let err = DataError::text(
            "data/iris.csv",
            7,
            Some(ColumnRef {
                number: 3,
                name: Some("petal_len".into()),
            }),
            "not a number: \"abc\"",
        );
        assert_eq!(
            err.to_string(),
            "data/iris.csv: line 7, column 3 (\"petal_len\"): not a number: \"abc\""
        );
    }

    #[test]
    fn binary_error_message_names_offset() {
        let err = DataError::binary("x.idx", 16, "truncated");
        assert_eq!(err.to_string(), "x.idx: byte 16: truncated");
    }
}
