//! Seeded, reproducible ways to divide example indices.
//!
//! All randomness comes from `ChaCha8Rng::seed_from_u64(seed)`, so a split is a pure function
//! of its arguments: the same on every rank, platform and run. Returned index lists are sorted
//! ascending; shuffling for training is the sampler's job ([`crate::shard`](mod@crate::shard)), not the split's.
//!
//! Guarantees (each has a property test below):
//! * Every split's `train` and `test` are disjoint and, except for time-series splits, cover
//!   the indices they were made from.
//! * [`train_test_split`] / [`holdout`]: `test.len() == round(n * fraction)`. Stratified, each
//!   class `c` with `n_c` members gets `t_c` test members where `|t_c - n_c * t / n| < 1`
//!   (largest-remainder apportionment of the `t` test slots).
//! * [`kfold`]: the `k` test folds partition `0..n` and their sizes differ by at most 1.
//!   Stratified, in addition each class's count in any two folds differs by at most 1 (a class
//!   with fewer than `k` members is absent from some folds; that is not an error).
//! * [`time_series_splits`]: never shuffled; every train index is smaller than every test
//!   index (by at least `gap + 1`); test windows are consecutive and the last ends at `n`.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::DataError;

/// One division of example indices into a training and a test (or validation) side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Indices to train on, ascending.
    pub train: Vec<usize>,
    /// Indices to evaluate on, ascending.
    pub test: Vec<usize>,
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn check_fraction(fraction: f64) -> Result<(), DataError> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(DataError::arg(
            "test_fraction",
            format!("must be in [0, 1], got {fraction}"),
        ))
    }
}

fn check_labels(n: usize, labels: Option<&[usize]>) -> Result<(), DataError> {
    match labels {
        Some(l) if l.len() < n => Err(DataError::arg(
            "stratify",
            format!("{} labels for {n} examples", l.len()),
        )),
        _ => Ok(()),
    }
}

/// Splits `0..n` into train and test with `round(n * test_fraction)` test examples.
///
/// With `stratify = Some(labels)` (one class id per example) every class is represented in
/// the test side in proportion; see the module docs for the exact guarantee.
///
/// A `test_fraction` outside `[0, 1]` or fewer than `n` labels is an error (the values may
/// come from an edited job file).
pub fn train_test_split(
    n: usize,
    test_fraction: f64,
    seed: u64,
    stratify: Option<&[usize]>,
) -> Result<Split, DataError> {
    let all: Vec<usize> = (0..n).collect();
    holdout(&all, test_fraction, seed, stratify)
}

/// Carves a hold-out part (validation or test) of `round(indices.len() * fraction)` examples
/// out of `indices`, e.g. a validation set out of a training split. `stratify`, when given,
/// is indexed by the values in `indices` (labels of the whole dataset), not by position.
/// The returned `train` is the rest.
pub fn holdout(indices: &[usize], fraction: f64, seed: u64, stratify: Option<&[usize]>) -> Result<Split, DataError> {
    check_fraction(fraction)?;
    if let Some(labels) = stratify {
        if let Some(&bad) = indices.iter().find(|&&i| i >= labels.len()) {
            return Err(DataError::arg(
                "stratify",
                format!("index {bad} has no label ({} labels)", labels.len()),
            ));
        }
    }
    let n = indices.len();
    let n_test = ((n as f64) * fraction).round() as usize;
    let mut rng = rng(seed);
    let mut test = Vec::with_capacity(n_test);
    let mut train = Vec::with_capacity(n - n_test);
    match stratify {
        None => {
            let mut shuffled = indices.to_vec();
            shuffled.shuffle(&mut rng);
            test.extend_from_slice(&shuffled[..n_test]);
            train.extend_from_slice(&shuffled[n_test..]);
        }
        Some(labels) => {
            let mut groups = class_groups(indices, labels);
            let quotas = apportion(&groups.iter().map(Vec::len).collect::<Vec<_>>(), n_test);
            for (group, quota) in groups.iter_mut().zip(quotas) {
                group.shuffle(&mut rng);
                test.extend_from_slice(&group[..quota]);
                train.extend_from_slice(&group[quota..]);
            }
        }
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok(Split { train, test })
}

/// Members of each class in `indices`, grouped by class id (ascending), in input order.
/// A map rather than a vector indexed by id, so sparse or huge ids cost nothing extra.
fn class_groups(indices: &[usize], labels: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in indices {
        groups.entry(labels[i]).or_default().push(i);
    }
    groups.into_values().collect()
}

/// Largest-remainder apportionment of `total` slots to groups of the given sizes, so that
/// each share is within 1 of `size * total / sum` and the shares add up to `total`.
fn apportion(sizes: &[usize], total: usize) -> Vec<usize> {
    let sum: usize = sizes.iter().sum();
    if sum == 0 {
        return vec![0; sizes.len()];
    }
    // Exact integer arithmetic: share = size * total / sum as quotient + remainder.
    let mut shares: Vec<usize> = sizes.iter().map(|&s| s * total / sum).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i] * total % sum), i));
    let missing = total - shares.iter().sum::<usize>();
    for &i in order.iter().take(missing) {
        shares[i] += 1;
    }
    shares
}

/// K-fold cross-validation splits of `0..n`; fold `i`'s test side is the `i`-th fold.
///
/// Unstratified: a seeded permutation cut into `k` contiguous pieces. Stratified: each class's
/// members are shuffled, the classes are laid end to end (class 0 first) and dealt round-robin
/// to the folds, continuing where the previous class stopped; this keeps both the total fold
/// sizes and every class's per-fold counts within 1 of each other.
///
/// Errors if `k < 2`, `k > n`, or `stratify` has fewer than `n` labels.
pub fn kfold(n: usize, k: usize, seed: u64, stratify: Option<&[usize]>) -> Result<Vec<Split>, DataError> {
    if k < 2 || k > n {
        return Err(DataError::arg(
            "k",
            format!("need 2 <= k <= n, got k = {k} for n = {n}"),
        ));
    }
    check_labels(n, stratify)?;
    let mut rng = rng(seed);
    let mut fold_of = vec![0usize; n];
    match stratify {
        None => {
            let mut perm: Vec<usize> = (0..n).collect();
            perm.shuffle(&mut rng);
            for fold in 0..k {
                for &i in &perm[fold * n / k..(fold + 1) * n / k] {
                    fold_of[i] = fold;
                }
            }
        }
        Some(labels) => {
            let all: Vec<usize> = (0..n).collect();
            let mut position = 0usize;
            for mut group in class_groups(&all, labels) {
                group.shuffle(&mut rng);
                for i in group {
                    fold_of[i] = position % k;
                    position += 1;
                }
            }
        }
    }
    Ok((0..k)
        .map(|fold| {
            let (test, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| fold_of[i] == fold);
            Split { train, test }
        })
        .collect())
}

/// How the training window of a time-series split grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Train on everything before the test window (minus the gap).
    Expanding,
    /// Train on at most this many most recent steps before the test window (minus the gap).
    Sliding(usize),
}

/// Ordered splits for forecasting, in the manner of scikit-learn's `TimeSeriesSplit`.
///
/// Split `i` (of `n_splits`) tests on `test_size` consecutive steps; the test windows are
/// back to back and the last ends at `n`. Train is everything (or, with
/// [`Window::Sliding`], the most recent steps) that ends `gap` steps before the test window.
/// Nothing is shuffled. `test_size = None` uses `n / (n_splits + 1)`.
///
/// Errors if a split would have an empty train or test side.
pub fn time_series_splits(
    n: usize,
    n_splits: usize,
    test_size: Option<usize>,
    gap: usize,
    window: Window,
) -> Result<Vec<Split>, DataError> {
    if n_splits == 0 {
        return Err(DataError::arg("n_splits", "must be at least 1"));
    }
    let test_size = test_size.unwrap_or(n / (n_splits + 1));
    if test_size == 0 {
        return Err(DataError::arg(
            "test_size",
            format!("test windows would be empty ({n} steps, {n_splits} splits)"),
        ));
    }
    if let Window::Sliding(0) = window {
        return Err(DataError::arg("window", "a sliding window needs at least 1 step"));
    }
    let tests_total = n_splits.checked_mul(test_size).filter(|&t| t < n);
    let Some(tests_total) = tests_total else {
        return Err(DataError::arg(
            "test_size",
            format!("{n_splits} test windows of {test_size} leave no training data in {n} steps"),
        ));
    };
    let first_test = n - tests_total;
    if first_test <= gap {
        return Err(DataError::arg(
            "gap",
            format!("a gap of {gap} leaves the first split no training data (it starts at {first_test})"),
        ));
    }
    Ok((0..n_splits)
        .map(|i| {
            let test_start = first_test + i * test_size;
            let train_end = test_start - gap;
            let train_start = match window {
                Window::Expanding => 0,
                Window::Sliding(len) => train_end.saturating_sub(len),
            };
            Split {
                train: (train_start..train_end).collect(),
                test: (test_start..test_start + test_size).collect(),
            }
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::proptest_config;
    use proptest::prelude::*;

    fn assert_partition(split: &Split, of: &[usize]) {
        let mut all: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
        all.sort_unstable();
        let mut want = of.to_vec();
        want.sort_unstable();
        assert_eq!(all, want, "train and test must be disjoint and cover the input");
        assert!(split.train.windows(2).all(|w| w[0] < w[1]));
        assert!(split.test.windows(2).all(|w| w[0] < w[1]));
    }

    /// Every fold partitions `0..n`, every example is tested in exactly one fold, and the
    /// test folds' sizes differ by one at most.
    fn assert_folds(folds: &[Split], n: usize) {
        let all: Vec<usize> = (0..n).collect();
        let mut seen = vec![0usize; n];
        for fold in folds {
            assert_partition(fold, &all);
            for &i in &fold.test {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "every example tested once: {seen:?}");
        let sizes: Vec<usize> = folds.iter().map(|f| f.test.len()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    fn count(labels: &[usize], idx: &[usize], c: usize) -> usize {
        idx.iter().filter(|&&i| labels[i] == c).count()
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let a = train_test_split(100, 0.2, 7, None).unwrap();
        assert_eq!(a, train_test_split(100, 0.2, 7, None).unwrap());
        assert_ne!(a, train_test_split(100, 0.2, 8, None).unwrap());
        assert_eq!(a.test.len(), 20);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(train_test_split(10, 1.5, 0, None).is_err());
        assert!(train_test_split(10, f64::NAN, 0, None).is_err());
        assert!(train_test_split(10, 0.5, 0, Some(&[0, 1])).is_err());
        assert!(kfold(10, 1, 0, None).is_err());
        assert!(kfold(3, 4, 0, None).is_err());
        assert!(kfold(4, 2, 0, Some(&[0])).is_err());
        assert!(time_series_splits(10, 0, None, 0, Window::Expanding).is_err());
        assert!(time_series_splits(10, 5, Some(2), 0, Window::Expanding).is_err());
        assert!(time_series_splits(10, 2, Some(2), 6, Window::Expanding).is_err());
        assert!(time_series_splits(10, 2, Some(2), 0, Window::Sliding(0)).is_err());
    }

    #[test]
    fn train_test_split_refuses_a_bad_fraction() {
        let e = train_test_split(10, -0.1, 0, None).unwrap_err();
        assert!(e.to_string().contains("test_fraction"), "{e}");
    }

    #[test]
    fn stratified_kfold_on_iris_like_labels_is_exactly_balanced() {
        let labels: Vec<usize> = (0..150).map(|i| i / 50).collect();
        let folds = kfold(150, 5, 3, Some(&labels)).unwrap();
        for fold in &folds {
            assert_eq!(fold.test.len(), 30);
            for c in 0..3 {
                assert_eq!(count(&labels, &fold.test, c), 10);
            }
        }
    }

    #[test]
    fn time_series_split_matches_scikit_learn() {
        // sklearn: TimeSeriesSplit(n_splits=3).split(range(8)) gives train/test
        // [0,1]/[2,3], [0..4]/[4,5], [0..6]/[6,7].
        let splits = time_series_splits(8, 3, None, 0, Window::Expanding).unwrap();
        let got: Vec<(Vec<usize>, Vec<usize>)> = splits.into_iter().map(|s| (s.train, s.test)).collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 1], vec![2, 3]),
                (vec![0, 1, 2, 3], vec![4, 5]),
                (vec![0, 1, 2, 3, 4, 5], vec![6, 7]),
            ]
        );
        let sliding = time_series_splits(8, 3, None, 1, Window::Sliding(2)).unwrap();
        assert_eq!(sliding[2].train, [3, 4]);
        assert_eq!(sliding[2].test, [6, 7]);
        assert_eq!(sliding[1].train, [1, 2]);
        assert_eq!(sliding[0].train, [0]);
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn train_test_split_partitions_with_exact_test_size(
            n in 0usize..300, frac in 0.0f64..=1.0, seed: u64,
        ) {
            let split = train_test_split(n, frac, seed, None).unwrap();
            assert_partition(&split, &(0..n).collect::<Vec<_>>());
            prop_assert_eq!(split.test.len(), ((n as f64) * frac).round() as usize);
        }

        #[test]
        fn sparse_class_ids_stratify_like_dense_ones(
            labels in prop::collection::vec(0usize..3, 1..100), seed: u64,
        ) {
            let sparse: Vec<usize> = labels.iter().map(|&l| l * 1_000_000_007).collect();
            let n = labels.len();
            prop_assert_eq!(
                train_test_split(n, 0.25, seed, Some(&labels)).unwrap(),
                train_test_split(n, 0.25, seed, Some(&sparse)).unwrap()
            );
        }

        #[test]
        fn stratified_split_keeps_class_proportions(
            labels in prop::collection::vec(0usize..5, 1..300), frac in 0.0f64..=1.0, seed: u64,
        ) {
            let n = labels.len();
            let split = train_test_split(n, frac, seed, Some(&labels)).unwrap();
            assert_partition(&split, &(0..n).collect::<Vec<_>>());
            let t = ((n as f64) * frac).round() as usize;
            prop_assert_eq!(split.test.len(), t);
            for c in 0..5 {
                let n_c = count(&labels, &(0..n).collect::<Vec<_>>(), c) as f64;
                let t_c = count(&labels, &split.test, c) as f64;
                prop_assert!((t_c - n_c * t as f64 / n as f64).abs() < 1.0);
            }
        }

        #[test]
        fn holdout_carves_from_the_given_indices(
            n in 1usize..200, frac in 0.0f64..=1.0, seed: u64, stratified: bool,
        ) {
            let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
            let outer = train_test_split(n, 0.3, seed, Some(&labels)).unwrap();
            let inner = holdout(&outer.train, frac, seed ^ 1, stratified.then_some(&labels[..]))
                .unwrap();
            assert_partition(&inner, &outer.train);
            prop_assert_eq!(
                inner.test.len(),
                ((outer.train.len() as f64) * frac).round() as usize
            );
        }

        #[test]
        fn kfold_folds_partition_and_balance(
            n in 2usize..300, k in 2usize..12, seed: u64,
        ) {
            prop_assume!(k <= n);
            let folds = kfold(n, k, seed, None).unwrap();
            prop_assert_eq!(folds.len(), k);
            assert_folds(&folds, n);
        }

        #[test]
        fn stratified_kfold_balances_sizes_and_every_class(
            labels in prop::collection::vec(0usize..4, 2..300), k in 2usize..12, seed: u64,
        ) {
            let n = labels.len();
            prop_assume!(k <= n);
            let folds = kfold(n, k, seed, Some(&labels)).unwrap();
            assert_folds(&folds, n);
            for c in 0..4 {
                let per: Vec<usize> = folds.iter().map(|f| count(&labels, &f.test, c)).collect();
                prop_assert!(per.iter().max().unwrap() - per.iter().min().unwrap() <= 1);
            }
        }

        #[test]
        fn time_series_splits_are_ordered(
            n in 2usize..300, n_splits in 1usize..8, gap in 0usize..5, sliding in prop::option::of(1usize..50),
        ) {
            let window = sliding.map_or(Window::Expanding, Window::Sliding);
            let Ok(splits) = time_series_splits(n, n_splits, None, gap, window) else {
                return Ok(());
            };
            prop_assert_eq!(splits.len(), n_splits);
            prop_assert_eq!(*splits.last().unwrap().test.last().unwrap(), n - 1);
            for (i, s) in splits.iter().enumerate() {
                prop_assert!(!s.train.is_empty() && !s.test.is_empty());
                prop_assert!(s.train.last().unwrap() + gap < s.test[0]);
                prop_assert!(s.test.windows(2).all(|w| w[1] == w[0] + 1));
                prop_assert!(s.train.windows(2).all(|w| w[1] == w[0] + 1));
                if let Some(len) = sliding {
                    prop_assert!(s.train.len() <= len);
                } else {
                    prop_assert_eq!(s.train[0], 0);
                }
                if i > 0 {
                    prop_assert_eq!(splits[i - 1].test.last().unwrap() + 1, s.test[0]);
                }
            }
        }
    }
}
