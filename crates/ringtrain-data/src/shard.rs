//! Dividing examples among data-parallel ranks.
//!
//! **Training** ([`epoch_batches`], [`batch_share`]): each epoch, the training indices are
//! shuffled with a permutation that depends only on `(seed, epoch)` (ChaCha8 with the seed as
//! key and the epoch as stream), so every rank computes the same permutation without
//! communicating, and cut into global batches of `batch_size` whatever the world size. Rank
//! `r` of `W` takes positions `r, r + W, r + 2W, ...` of each batch, so the shares of a batch
//! partition it and differ by one example at most; the last batch is simply smaller. A batch
//! smaller than `W` leaves some ranks without an example: they compute one with weight zero,
//! so that every rank still takes part in the step's all-reduce. The engine weights each
//! share by its size, so the step's gradient is the mean over the global batch, the same on
//! any number of workers.
//!
//! **Evaluation** ([`eval_shard`]): a contiguous, unshuffled range per rank; the ranges
//! partition `0..n` exactly (no duplicates, so metrics are exact) and their sizes differ by at
//! most one, the first `n % world` ranks holding the extra example.

use std::ops::Range;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::DataError;

fn check_rank(rank: usize, world: usize) -> Result<(), DataError> {
    if world == 0 {
        return Err(DataError::arg("world", "world size must be at least 1"));
    }
    if rank >= world {
        return Err(DataError::arg(
            "rank",
            format!("rank {rank} is not below the world size {world}"),
        ));
    }
    Ok(())
}

/// The permutation of `0..n` used in `epoch`; identical on every rank.
pub fn epoch_permutation(n: usize, epoch: u64, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng);
    perm
}

/// The global batches of `epoch`: `indices` in the epoch's permutation, cut every
/// `batch_size` (at least 1).
pub fn epoch_batches(indices: &[usize], batch_size: usize, epoch: u64, seed: u64) -> Vec<Vec<usize>> {
    let order: Vec<usize> = epoch_permutation(indices.len(), epoch, seed)
        .into_iter()
        .map(|p| indices[p])
        .collect();
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

/// Rank `rank`'s share of a non-empty global batch and how many of its examples count: the
/// positions `rank, rank + world, ...`, or, when there are none, one stand-in example that
/// counts zero times.
pub fn batch_share(batch: &[usize], rank: usize, world: usize) -> Result<(Vec<usize>, usize), DataError> {
    check_rank(rank, world)?;
    if batch.is_empty() {
        return Err(DataError::arg("batch", "a global batch needs at least one example"));
    }
    let mine: Vec<usize> = batch.iter().skip(rank).step_by(world).copied().collect();
    Ok(match mine.len() {
        0 => (vec![batch[rank % batch.len()]], 0),
        n => (mine, n),
    })
}

/// This rank's contiguous evaluation range of `0..n`.
pub fn eval_shard(n: usize, rank: usize, world: usize) -> Result<Range<usize>, DataError> {
    check_rank(rank, world)?;
    let base = n / world;
    let extra = n % world;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    Ok(start..start + len)
}

/// Batches for truncated backpropagation through time over consecutive windows of a text
/// (PyTorch's `batchify` + `bptt` loop): `windows`, in text order, are cut into `streams`
/// contiguous streams of ⌈len/streams⌉ windows, and batch k holds window k of every stream
/// that has one. Row j of consecutive batches therefore continues the same text, and the state
/// a batch ends with is the right start for the next; only the last streams can run out, so
/// rows leave from the end.
pub fn stream_batches(windows: &[usize], streams: usize) -> Vec<Vec<usize>> {
    if windows.is_empty() {
        return Vec::new();
    }
    let per_stream = windows.len().div_ceil(streams.max(1));
    (0..per_stream)
        .map(|k| windows.chunks(per_stream).filter_map(|s| s.get(k).copied()).collect())
        .collect()
}

/// This rank's part of `windows` for [`stream_batches`]: `len / world` consecutive windows
/// (the last `len % world` are left out), so that every rank takes the same number of steps.
pub fn stream_part(windows: &[usize], rank: usize, world: usize) -> Result<&[usize], DataError> {
    check_rank(rank, world)?;
    let part = windows.len() / world;
    Ok(&windows[rank * part..(rank + 1) * part])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::proptest_config;
    use proptest::prelude::*;

    #[test]
    fn epochs_reshuffle_and_seeds_are_reproducible() {
        let indices: Vec<usize> = (0..100).collect();
        let a = epoch_batches(&indices, 10, 0, 42);
        assert_eq!(a, epoch_batches(&indices, 10, 0, 42));
        assert_ne!(a, epoch_batches(&indices, 10, 1, 42));
        assert_ne!(a, epoch_batches(&indices, 10, 0, 43));
    }

    #[test]
    fn a_rank_without_an_example_gets_a_stand_in_that_counts_zero_times() {
        assert_eq!(batch_share(&[7, 8], 0, 3).unwrap(), (vec![7], 1));
        assert_eq!(batch_share(&[7, 8], 2, 3).unwrap(), (vec![7], 0));
    }

    #[test]
    fn bad_rank_world_or_batch_is_an_error() {
        assert!(batch_share(&[1, 2], 2, 2).is_err());
        assert!(batch_share(&[1, 2], 0, 0).is_err());
        assert!(batch_share(&[], 0, 1).is_err());
        assert!(eval_shard(10, 2, 3).is_ok());
        assert!(eval_shard(10, 3, 3).is_err());
        assert!(eval_shard(10, 0, 0).is_err());
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn batches_cover_the_epoch_once_and_shares_partition_each_batch(
            n in 0usize..200, batch in 1usize..40, world in 1usize..9, epoch in 0u64..4, seed: u64,
        ) {
            let indices: Vec<usize> = (0..n).map(|i| i * 3 + 1).collect();
            let batches = epoch_batches(&indices, batch, epoch, seed);
            let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
            all.sort_unstable();
            prop_assert_eq!(&all, &indices);
            for (k, b) in batches.iter().enumerate() {
                prop_assert!(b.len() == batch || k + 1 == batches.len());
                let shares: Vec<(Vec<usize>, usize)> =
                    (0..world).map(|r| batch_share(b, r, world).unwrap()).collect();
                let mut counted: Vec<usize> =
                    shares.iter().filter(|s| s.1 > 0).flat_map(|s| s.0.clone()).collect();
                counted.sort_unstable();
                let mut whole = b.clone();
                whole.sort_unstable();
                prop_assert_eq!(counted, whole);
                let real: Vec<usize> = shares.iter().map(|s| s.1).collect();
                prop_assert!(real.iter().max().unwrap() - real.iter().min().unwrap() <= 1);
            }
        }

        #[test]
        fn stream_batches_continue_each_stream_and_cover_every_window(n in 0usize..300, streams in 1usize..40) {
            let windows: Vec<usize> = (0..n).map(|i| i * 2).collect();
            let batches = stream_batches(&windows, streams);
            let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
            all.sort_unstable();
            prop_assert_eq!(&all, &windows);
            for pair in batches.windows(2) {
                // rows only leave from the end, and row j of the next batch is the next window
                prop_assert!(pair[1].len() <= pair[0].len() && pair[0].len() <= streams);
                for (a, b) in pair[0].iter().zip(&pair[1]) {
                    prop_assert_eq!(*b, *a + 2);
                }
            }
        }

        #[test]
        fn stream_parts_are_equal_and_disjoint(n in 0usize..300, world in 1usize..9) {
            let windows: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = (0..world).map(|r| stream_part(&windows, r, world).unwrap()).collect();
            prop_assert!(parts.iter().all(|p| p.len() == n / world));
            prop_assert_eq!(parts.concat(), (0..n - n % world).collect::<Vec<_>>());
        }

        #[test]
        fn eval_shards_partition_contiguously(n in 0usize..500, world in 1usize..17) {
            let ranges: Vec<Range<usize>> =
                (0..world).map(|r| eval_shard(n, r, world).unwrap()).collect();
            prop_assert_eq!(ranges[0].start, 0);
            prop_assert_eq!(ranges[world - 1].end, n);
            for w in ranges.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            let lens: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            prop_assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }
}
