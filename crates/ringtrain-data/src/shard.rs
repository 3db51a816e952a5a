//! Dividing examples among data-parallel ranks.
//!
//! **Training** ([`shard()`]): each epoch, the indices are shuffled with a permutation that
//! depends only on `(seed, epoch)` (ChaCha8 with the seed as key and the epoch as stream), so
//! every rank computes the same permutation without communicating. Rank `r` takes positions
//! `r, r + world, r + 2*world, ...` of it (as torch's `DistributedSampler` does). Every rank
//! gets exactly the same number of examples, which synchronous all-reduce needs; the two
//! [`Remainder`] policies say what happens when `n` is not a multiple of `world`:
//! * [`Remainder::Pad`]: the permutation is extended by repeating it from its start until its
//!   length is `ceil(n / world) * world`; each rank gets `ceil(n / world)` examples. Every
//!   example is seen at least once per epoch across ranks, and exactly once except for the
//!   `ceil(n/world)*world - n` repeated ones (which land on the last ranks).
//! * [`Remainder::Drop`]: the permutation is cut to `floor(n / world) * world`; each rank gets
//!   `floor(n / world)`. Every example is seen at most once per epoch; the `n % world` dropped
//!   ones change from epoch to epoch because the permutation does.
//!
//! **Evaluation** ([`eval_shard`]): a contiguous, unshuffled range per rank; the ranges
//! partition `0..n` exactly (no duplicates, so metrics are exact) and their sizes differ by at
//! most one, the first `n % world` ranks holding the extra example.

use std::ops::Range;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::DataError;

/// What to do with the examples left over when `n` is not a multiple of the world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remainder {
    /// Repeat examples from the start of the epoch's permutation to fill up the last ranks.
    Pad,
    /// Leave the tail of the epoch's permutation out.
    Drop,
}

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

/// Number of training examples every rank gets per epoch.
pub fn shard_len(n: usize, world: usize, remainder: Remainder) -> usize {
    if world == 0 {
        return 0;
    }
    match remainder {
        Remainder::Pad => n.div_ceil(world),
        Remainder::Drop => n / world,
    }
}

/// This rank's training examples (positions into `0..n`) for `epoch`, in the order to visit
/// them. See the module docs for the guarantees.
pub fn shard(
    n: usize,
    rank: usize,
    world: usize,
    epoch: u64,
    seed: u64,
    remainder: Remainder,
) -> Result<Vec<usize>, DataError> {
    check_rank(rank, world)?;
    let perm = epoch_permutation(n, epoch, seed);
    let len = shard_len(n, world, remainder);
    Ok((0..len)
        // Position p of the padded permutation is perm[p % n]: repeating from the start.
        .map(|j| perm[(rank + j * world) % n])
        .collect())
}

/// [`shard()`] over an explicit list of example indices (e.g. a [`crate::Split`]'s `train`):
/// the returned values are elements of `indices`.
pub fn shard_indices(
    indices: &[usize],
    rank: usize,
    world: usize,
    epoch: u64,
    seed: u64,
    remainder: Remainder,
) -> Result<Vec<usize>, DataError> {
    Ok(shard(indices.len(), rank, world, epoch, seed, remainder)?
        .into_iter()
        .map(|p| indices[p])
        .collect())
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

/// Number of batches in a shard of `len` examples.
pub fn num_batches(len: usize, batch_size: usize, drop_last: bool) -> usize {
    if batch_size == 0 {
        return 0;
    }
    if drop_last {
        len / batch_size
    } else {
        len.div_ceil(batch_size)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::proptest_config;
    use proptest::prelude::*;

    #[test]
    fn epochs_reshuffle_and_seeds_are_reproducible() {
        let a = shard(100, 0, 2, 0, 42, Remainder::Drop).unwrap();
        assert_eq!(a, shard(100, 0, 2, 0, 42, Remainder::Drop).unwrap());
        assert_ne!(a, shard(100, 0, 2, 1, 42, Remainder::Drop).unwrap());
        assert_ne!(a, shard(100, 0, 2, 0, 43, Remainder::Drop).unwrap());
    }

    #[test]
    fn pad_repeats_from_the_start_onto_the_last_ranks() {
        let perm = epoch_permutation(5, 3, 9);
        let shards: Vec<Vec<usize>> = (0..3).map(|r| shard(5, r, 3, 3, 9, Remainder::Pad).unwrap()).collect();
        assert_eq!(shards[0], [perm[0], perm[3]]);
        assert_eq!(shards[1], [perm[1], perm[4]]);
        assert_eq!(shards[2], [perm[2], perm[0]]);
    }

    #[test]
    fn bad_rank_or_world_is_an_error() {
        assert!(shard(10, 2, 2, 0, 0, Remainder::Pad).is_err());
        assert!(shard(10, 0, 0, 0, 0, Remainder::Pad).is_err());
        assert!(eval_shard(10, 2, 3).is_ok());
        assert!(eval_shard(10, 3, 3).is_err());
        assert!(eval_shard(10, 0, 0).is_err());
    }

    #[test]
    fn batch_counts() {
        assert_eq!(num_batches(10, 3, false), 4);
        assert_eq!(num_batches(10, 3, true), 3);
        assert_eq!(num_batches(10, 0, true), 0);
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn training_shards_are_equal_and_cover_each_epoch(
            n in 0usize..200, world in 1usize..9, epoch in 0u64..4, seed: u64, pad: bool,
        ) {
            let remainder = if pad { Remainder::Pad } else { Remainder::Drop };
            let shards: Vec<Vec<usize>> = (0..world)
                .map(|r| shard(n, r, world, epoch, seed, remainder).unwrap())
                .collect();
            let len = shard_len(n, world, remainder);
            prop_assert!(shards.iter().all(|s| s.len() == len));
            let mut seen = vec![0usize; n];
            for &i in shards.iter().flatten() {
                seen[i] += 1;
            }
            if pad {
                prop_assert_eq!(len, n.div_ceil(world));
                // Every example at least once; repeats spread evenly (the padded list cycles).
                if n > 0 {
                    let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
                    prop_assert!(*lo >= 1 && hi - lo <= 1);
                }
            } else {
                prop_assert_eq!(len, n / world);
                prop_assert!(seen.iter().all(|&s| s <= 1));
                prop_assert_eq!(seen.iter().sum::<usize>(), n - n % world);
            }
        }

        #[test]
        fn shard_indices_maps_through_the_list(
            n in 0usize..100, world in 1usize..5, seed: u64,
        ) {
            let indices: Vec<usize> = (0..n).map(|i| i * 3 + 1).collect();
            for r in 0..world {
                let direct = shard(n, r, world, 1, seed, Remainder::Pad).unwrap();
                let mapped = shard_indices(&indices, r, world, 1, seed, Remainder::Pad).unwrap();
                prop_assert_eq!(mapped, direct.iter().map(|&p| indices[p]).collect::<Vec<_>>());
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
