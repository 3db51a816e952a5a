//! Padding variable-length token sequences into a rectangular batch.

use crate::vocab::PAD;

/// Sequences padded with [`PAD`] to a common length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Row-major `batch_size x max_len` ids.
    pub ids: Vec<u32>,
    /// The real (unpadded, possibly truncated) length of each row.
    pub lengths: Vec<usize>,
    /// Number of rows.
    pub batch_size: usize,
    /// Columns: the longest row's length.
    pub max_len: usize,
}

impl PaddedBatch {
    /// `batch_size x max_len` mask: 1.0 on real tokens, 0.0 on padding (for masked losses and
    /// attention).
    pub fn mask(&self) -> Vec<f32> {
        let mut mask = vec![0.0; self.batch_size * self.max_len];
        for (row, &len) in self.lengths.iter().enumerate() {
            mask[row * self.max_len..row * self.max_len + len].fill(1.0);
        }
        mask
    }

    /// The ids of row `i`, padding included.
    ///
    /// # Panics
    /// If `i >= batch_size`.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.max_len..(i + 1) * self.max_len]
    }
}

/// Pads `seqs` to the longest one's length, first cutting each to at most `truncate_to` ids
/// (keeping the beginning). A zero-length sequence gives a row of padding with length 0.
pub fn pad_batch<S: AsRef<[u32]>>(seqs: &[S], truncate_to: Option<usize>) -> PaddedBatch {
    let cap = truncate_to.unwrap_or(usize::MAX);
    let lengths: Vec<usize> = seqs.iter().map(|s| s.as_ref().len().min(cap)).collect();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let mut ids = vec![PAD; seqs.len() * max_len];
    for (row, (seq, &len)) in seqs.iter().zip(&lengths).enumerate() {
        ids[row * max_len..row * max_len + len].copy_from_slice(&seq.as_ref()[..len]);
    }
    PaddedBatch {
        ids,
        lengths,
        batch_size: seqs.len(),
        max_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::proptest_config;
    use proptest::prelude::*;

    #[test]
    fn pads_and_masks() {
        let batch = pad_batch(&[vec![5, 6, 7], vec![8], vec![]], None);
        assert_eq!(batch.ids, [5, 6, 7, 8, 0, 0, 0, 0, 0]);
        assert_eq!(batch.lengths, [3, 1, 0]);
        assert_eq!(batch.mask(), [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let cut = pad_batch(&[&[1u32, 2, 3][..], &[4]], Some(2));
        assert_eq!(cut.ids, [1, 2, 4, 0]);
        assert_eq!(cut.row(1), [4, 0]);
        let empty = pad_batch::<Vec<u32>>(&[], None);
        assert_eq!((empty.batch_size, empty.max_len), (0, 0));
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn rows_keep_their_prefix_and_pad_the_rest(
            seqs in prop::collection::vec(prop::collection::vec(1u32..100, 0..20), 0..10),
            cap in prop::option::of(0usize..25),
        ) {
            let batch = pad_batch(&seqs, cap);
            prop_assert_eq!(batch.ids.len(), batch.batch_size * batch.max_len);
            for (i, seq) in seqs.iter().enumerate() {
                let len = batch.lengths[i];
                prop_assert_eq!(len, seq.len().min(cap.unwrap_or(usize::MAX)));
                prop_assert_eq!(&batch.row(i)[..len], &seq[..len]);
                prop_assert!(batch.row(i)[len..].iter().all(|&id| id == PAD));
            }
        }
    }
}
