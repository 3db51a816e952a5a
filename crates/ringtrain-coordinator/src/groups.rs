//! Parallel k-fold: which workers form which ring, and which folds each ring trains.

use std::ops::Range;

/// One ring of a parallel k-fold job, as planned at the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldPlan {
    /// The group's index in `0..G`.
    pub index: usize,
    /// Job-wide ranks of the group's workers (contiguous: registration order decides, as for
    /// ranks); the group's ring order is this order.
    pub ranks: Range<usize>,
    /// Folds the group trains, ascending: `index, index + G, index + 2G, ...`.
    pub folds: Vec<usize>,
}

impl FoldPlan {
    /// Workers in the group's ring.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }
}

/// Splits `workers` workers into `G` equal rings for `folds` folds, where `G` is the largest
/// divisor of `workers` that is at most `folds`: every ring has the same size (so every fold
/// trains with the same global batch split the same way), and no ring is left without a fold.
/// Group `g` takes ranks `g·S..(g+1)·S` (`S = workers / G`) and folds `g, g + G, g + 2G, ...`,
/// so the folds are dealt out round-robin and the group with the most folds has at most one
/// more than the others.
///
/// Examples: 4 workers, 2 folds → 2 groups of 2; 2 workers, 5 folds → 2 groups of 1 (folds
/// 0, 2, 4 and 1, 3); 3 workers, 5 folds → 3 groups of 1; 4 workers, 3 folds → 2 groups of 2
/// (3 does not divide 4). Empty when either count is zero.
pub fn fold_groups(workers: usize, folds: usize) -> Vec<FoldPlan> {
    let Some(count) = (1..=workers.min(folds)).rev().find(|g| workers.is_multiple_of(*g)) else {
        return Vec::new();
    };
    let size = workers / count;
    (0..count)
        .map(|index| FoldPlan {
            index,
            ranks: index * size..(index + 1) * size,
            folds: (index..folds).step_by(count).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(workers: usize, folds: usize) -> Vec<(Range<usize>, Vec<usize>)> {
        fold_groups(workers, folds)
            .into_iter()
            .map(|g| (g.ranks, g.folds))
            .collect()
    }

    #[test]
    fn groups_are_the_largest_divisor_of_the_workers_not_above_the_folds() {
        assert_eq!(shape(4, 2), [(0..2, vec![0]), (2..4, vec![1])]);
        assert_eq!(shape(2, 5), [(0..1, vec![0, 2, 4]), (1..2, vec![1, 3])]);
        assert_eq!(shape(3, 5), [(0..1, vec![0, 3]), (1..2, vec![1, 4]), (2..3, vec![2])]);
        assert_eq!(shape(4, 3), [(0..2, vec![0, 2]), (2..4, vec![1])]);
        assert_eq!(shape(6, 4), [(0..2, vec![0, 3]), (2..4, vec![1]), (4..6, vec![2])]);
        assert_eq!(
            shape(5, 2),
            [(0..5, vec![0, 1])],
            "a prime worker count above K: one ring"
        );
        assert_eq!(shape(1, 5), [(0..1, vec![0, 1, 2, 3, 4])]);
        assert!(fold_groups(0, 5).is_empty() && fold_groups(3, 0).is_empty());
    }

    #[test]
    fn every_worker_and_every_fold_is_in_exactly_one_group() {
        for workers in 1..=12 {
            for folds in 1..=12 {
                let groups = fold_groups(workers, folds);
                let g = groups.len();
                assert!(
                    g >= 1 && g <= folds && workers % g == 0,
                    "{workers} workers, {folds} folds: {g}"
                );
                assert!(
                    (g + 1..=folds.min(workers)).all(|bigger| workers % bigger != 0),
                    "{g} is not the largest divisor"
                );
                let mut ranks: Vec<usize> = groups.iter().flat_map(|p| p.ranks.clone()).collect();
                let mut all: Vec<usize> = groups.iter().flat_map(|p| p.folds.clone()).collect();
                ranks.sort_unstable();
                all.sort_unstable();
                assert_eq!(ranks, (0..workers).collect::<Vec<_>>());
                assert_eq!(all, (0..folds).collect::<Vec<_>>());
                assert!(groups.iter().all(|p| p.size() == workers / g && !p.folds.is_empty()));
            }
        }
    }
}
