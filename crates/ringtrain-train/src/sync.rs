//! The seam between training and the network: `GradSync`, and `LocalSync` for one process.

use crate::Result;

/// A failure of the gradient synchronisation (network, peer, mismatch).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SyncError(pub String);

/// Takes one complete gradient bucket (see [`GradSync::reduce_buckets`]).
pub type EmitBucket<'a> = dyn FnMut(Vec<f32>) + 'a;
/// Runs a backward pass, handing each gradient bucket over as it completes.
pub type BucketedBackward<'a> = dyn FnMut(&mut EmitBucket<'_>) + 'a;

/// What the engine needs from its peers: the seam between compute and network.
///
/// Every method must leave the same bits on every rank. Single-process training uses
/// [`LocalSync`]; a distributed worker implements it with the ring all-reduce.
pub trait GradSync {
    /// This process's rank in `0..world()`.
    fn rank(&self) -> usize {
        0
    }

    /// Number of ranks training together.
    fn world(&self) -> usize {
        1
    }

    /// Replaces `grads` (the flat gradient buffer) with the mean over all ranks.
    fn all_reduce_mean(&mut self, grads: &mut [f32]) -> Result<(), SyncError>;

    /// Averages one step's gradient, cut into buckets, over all ranks. `backward` runs the
    /// backward pass and hands over each bucket, in order, the moment it is complete; a sync
    /// may reduce it while backward goes on. Returns the averaged buckets in order. The
    /// result must not depend on when buckets arrive. The default reduces each bucket with
    /// [`GradSync::all_reduce_mean`] after backward.
    fn reduce_buckets(&mut self, backward: &mut BucketedBackward<'_>) -> Result<Vec<Vec<f32>>, SyncError> {
        let mut buckets = Vec::new();
        backward(&mut |b| buckets.push(b));
        for b in &mut buckets {
            self.all_reduce_mean(b)?;
        }
        Ok(buckets)
    }

    /// Every rank's `values`, in rank order, where rank r's has `lens[r]` values (the ranks
    /// agreed on the lengths beforehand): the exchange of sparse gradient rows. `layout`
    /// identifies what is gathered (a table), so ranks gathering different things fail.
    fn all_gather_f32(&mut self, values: &[f32], lens: &[usize], _layout: u64) -> Result<Vec<Vec<f32>>, SyncError> {
        match lens {
            [len] if *len == values.len() => Ok(vec![values.to_vec()]),
            _ => Err(SyncError(format!(
                "one rank has {} values, not the lengths {lens:?}",
                values.len()
            ))),
        }
    }

    /// Replaces `values` (small metric sums) with their sum over all ranks.
    fn all_reduce_sum_f64(&mut self, values: &mut [f64]) -> Result<(), SyncError>;

    /// Makes every rank's parameters equal to rank 0's.
    fn broadcast_params(&mut self, params: &mut [f32]) -> Result<(), SyncError>;

    /// Makes every rank's `values` equal to rank `root`'s (the training state handed on
    /// when a ring re-forms).
    fn broadcast_from(&mut self, values: &mut [f32], root: usize) -> Result<(), SyncError> {
        match root {
            0 => self.broadcast_params(values),
            _ => Err(SyncError(format!("rank {root} is not in this ring of one"))),
        }
    }

    /// Elastic training: whether the membership may change while the job runs.
    fn elastic(&self) -> bool {
        false
    }

    /// Elastic training, after a collective failed: waits until the job has a new membership
    /// and joins its ring (`Ok(true)`: rank and world may have changed), or finds that none
    /// comes (`Ok(false)`: the failure stands).
    fn reform(&mut self) -> Result<bool, SyncError> {
        Ok(false)
    }

    /// This rank joins a job that is already running: it takes the training state from the
    /// others instead of starting from the initialisation.
    fn joining(&self) -> bool {
        false
    }

    /// Whether this rank writes the run directory it was given (with a changing membership
    /// the writer can change).
    fn writes(&self) -> bool {
        true
    }

    /// Called once when the job is done, with the final parameters (of the last fold), so a
    /// distributed sync can check that every rank ends with the same bits.
    fn finish(&mut self, _params: &[f32]) -> Result<(), SyncError> {
        Ok(())
    }
}

/// No peers: the local gradient is already the mean.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalSync;

impl GradSync for LocalSync {
    fn all_reduce_mean(&mut self, _grads: &mut [f32]) -> Result<(), SyncError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, _values: &mut [f64]) -> Result<(), SyncError> {
        Ok(())
    }

    fn broadcast_params(&mut self, _params: &mut [f32]) -> Result<(), SyncError> {
        Ok(())
    }
}
