//! Plain-text corpora for language modelling: next-token prediction over fixed-length
//! windows of one long id sequence.
//!
//! Validation text should be held out **before** the vocabulary is built (see
//! [`split_text_tail`]), so that the vocabulary sees training text only.

use std::path::Path;

use crate::error::DataError;
use crate::source::Source;

/// Reads a whole UTF-8 text file, plain or gzip; an empty file is refused.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    let text = Source::open(path)?.read_to_string()?;
    if text.is_empty() {
        return Err(DataError::empty(path, "empty file"));
    }
    Ok(text)
}

/// Splits `text` into (head, tail) with the tail holding about `tail_fraction` of its bytes,
/// cut at the nearest character boundary at or after that point (e.g. the last 10 % of a
/// corpus for validation). Never shuffled: language-model validation text must follow the
/// training text, not be interleaved with it.
pub fn split_text_tail(text: &str, tail_fraction: f64) -> Result<(&str, &str), DataError> {
    if !(0.0..=1.0).contains(&tail_fraction) {
        return Err(DataError::arg(
            "tail_fraction",
            format!("must be in [0, 1], got {tail_fraction}"),
        ));
    }
    let mut cut = text.len() - ((text.len() as f64) * tail_fraction).round() as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    Ok(text.split_at(cut))
}

/// Fixed-length next-token examples over one token sequence.
///
/// Example `i` starts at `s = i * stride`; its input is `ids[s..s + seq_len]` and its target
/// `ids[s + 1..s + seq_len + 1]` (the input shifted by one). Only windows whose target fits
/// are made, so with `n` ids there are `(n - seq_len - 1) / stride + 1` examples when
/// `n > seq_len`, else none. `stride = seq_len` gives non-overlapping windows; a smaller
/// stride overlaps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmSequences {
    ids: Vec<u32>,
    seq_len: usize,
    stride: usize,
    len: usize,
}

impl LmSequences {
    /// Windows over `ids`. Errors if `seq_len` or `stride` is 0.
    pub fn new(ids: Vec<u32>, seq_len: usize, stride: usize) -> Result<Self, DataError> {
        if seq_len == 0 {
            return Err(DataError::arg("seq_len", "must be at least 1"));
        }
        if stride == 0 {
            return Err(DataError::arg("stride", "must be at least 1"));
        }
        let len = if ids.len() > seq_len {
            (ids.len() - seq_len - 1) / stride + 1
        } else {
            0
        };
        Ok(LmSequences {
            ids,
            seq_len,
            stride,
            len,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no examples (the sequence is not longer than `seq_len`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per example.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The whole id sequence.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// (input, target) of example `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn get(&self, i: usize) -> (&[u32], &[u32]) {
        assert!(i < self.len, "example {i} of {}", self.len);
        let s = i * self.stride;
        (&self.ids[s..s + self.seq_len], &self.ids[s + 1..s + self.seq_len + 1])
    }

    /// Inputs and targets of the examples at `indices`, each row-major
    /// `indices.len() x seq_len`.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn batch(&self, indices: &[usize]) -> (Vec<u32>, Vec<u32>) {
        let mut inputs = Vec::with_capacity(indices.len() * self.seq_len);
        let mut targets = Vec::with_capacity(indices.len() * self.seq_len);
        for &i in indices {
            let (x, y) = self.get(i);
            inputs.extend_from_slice(x);
            targets.extend_from_slice(y);
        }
        (inputs, targets)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::proptest_config;
    use proptest::prelude::*;

    #[test]
    fn windows_shift_targets_by_one() {
        let seqs = LmSequences::new((0..10).collect(), 3, 3).unwrap();
        assert_eq!(seqs.len(), 3);
        assert_eq!(seqs.get(0), (&[0, 1, 2][..], &[1, 2, 3][..]));
        assert_eq!(seqs.get(2), (&[6, 7, 8][..], &[7, 8, 9][..]));
        let (x, y) = seqs.batch(&[1, 0]);
        assert_eq!(x, [3, 4, 5, 0, 1, 2]);
        assert_eq!(y, [4, 5, 6, 1, 2, 3]);
        assert!(LmSequences::new(vec![1, 2, 3], 3, 1).unwrap().is_empty());
        assert!(LmSequences::new(vec![1], 0, 1).is_err());
        assert!(LmSequences::new(vec![1], 1, 0).is_err());
    }

    #[test]
    fn read_text_refuses_empty_and_non_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.txt");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(read_text(&path).unwrap_err(), DataError::Empty { .. }));
        std::fs::write(&path, b"ok\xff").unwrap();
        let err = read_text(&path).unwrap_err();
        assert!(err.to_string().ends_with("byte 2: not valid UTF-8"), "{err}");
    }

    #[test]
    fn tail_split_respects_char_boundaries() {
        let (head, tail) = split_text_tail("abcdefghi£", 0.1).unwrap();
        assert_eq!((head, tail), ("abcdefghi£", ""));
        let (head, tail) = split_text_tail("abcdefghij", 0.3).unwrap();
        assert_eq!((head, tail), ("abcdefg", "hij"));
        let (head, tail) = split_text_tail("ab££", 0.4).unwrap();
        assert_eq!(head.len() + tail.len(), 6);
        assert!(split_text_tail("x", 1.5).is_err());
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn every_window_is_in_bounds_and_stride_apart(
            n in 0usize..200, seq_len in 1usize..20, stride in 1usize..20,
        ) {
            let seqs = LmSequences::new((0..n as u32).collect(), seq_len, stride).unwrap();
            for i in 0..seqs.len() {
                let (x, y) = seqs.get(i);
                prop_assert_eq!(x[0] as usize, i * stride);
                prop_assert_eq!(&x[1..], &y[..seq_len - 1]);
            }
            // No further window would fit.
            let next_start = seqs.len() * stride;
            prop_assert!(next_start + seq_len + 1 > n);
        }
    }
}
