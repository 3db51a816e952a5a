//! Elastic training: levelling the ranks of a re-formed ring.

use crate::engine::{EpochCursor, Progress, RingChange, Trainer};
use crate::sync::{GradSync, SyncError};
use crate::{Result, TrainError};

impl Trainer {
    /// After the ring re-formed (elastic training): levels every rank with the furthest
    /// point all of them can stand on, then gives the ranks that need it the training state.
    ///
    /// Ranks are at most one *tick* apart (a tick is an optimizer step or an epoch's end),
    /// since none can finish a tick's collectives before every rank has started them. A
    /// rank ahead by a step finished that step's all-reduces, so its update is the full one:
    /// the others take its parameters, optimizer state and position (no work lost). A rank
    /// ahead by an epoch's end goes back to before it (it only evaluated; the report is not
    /// repeated). Ranks that joined take the state of the first rank that has it.
    pub fn rejoin(
        &mut self,
        cursor: &mut EpochCursor,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
        reformed: bool,
    ) -> Result<()> {
        let (rank, world) = (sync.rank(), sync.world().max(1));
        let joining = !self.has_state;
        let step_before = self.step;
        let failed = |reason: String| TrainError::Sync {
            step: step_before,
            source: SyncError(reason),
        };
        let synced = |source| TrainError::Sync {
            step: step_before,
            source,
        };
        // Per rank: its tick, and whether that was an epoch's end; -1 without state.
        let mut ticks = vec![0.0f64; 2 * world];
        if joining {
            ticks[2 * rank] = -1.0;
        } else {
            ticks[2 * rank] = (self.step + cursor.epoch as u64 - 1) as f64;
            ticks[2 * rank + 1] = f64::from(u8::from(self.ended_epoch.is_some()));
        }
        sync.all_reduce_sum_f64(&mut ticks).map_err(synced)?;
        let held: Vec<(usize, f64, bool)> = (0..world)
            .filter(|r| ticks[2 * r] >= 0.0)
            .map(|r| (r, ticks[2 * r], ticks[2 * r + 1] > 0.5))
            .collect();
        let (Some(low), Some(high)) = (
            held.iter().map(|h| h.1).reduce(f64::min),
            held.iter().map(|h| h.1).reduce(f64::max),
        ) else {
            return Err(failed("no rank of the new ring has the training state".into()));
        };
        if high > low + 1.0 {
            return Err(failed(format!(
                "the ranks are {} ticks apart (at most one is possible)",
                high - low
            )));
        }
        let ahead_by_epoch_end = held.iter().any(|h| h.1 == high && h.2);
        let level = if high > low && ahead_by_epoch_end {
            if !joining && ticks[2 * rank] == high {
                match self.ended_epoch.take() {
                    Some(before) => *cursor = before,
                    None => return Err(failed(format!("rank {rank} cannot go back over its epoch's end"))),
                }
            }
            low
        } else {
            high
        };
        // The first rank at the level gives its state to every rank that is not there.
        let root = held.iter().find(|h| h.1 == level).map_or(0, |h| h.0);
        let receives = |r: usize| ticks[2 * r] != level;
        let mut at = [0.0f64; 3];
        if rank == root {
            at = [cursor.epoch as f64, cursor.group as f64, self.step as f64];
        }
        sync.all_reduce_sum_f64(&mut at).map_err(synced)?;
        let (epoch, group, step) = (at[0] as usize, at[1] as usize, at[2] as u64);
        if (0..world).any(receives) {
            // One broadcast: the parameters, then each optimizer slot.
            let n = self.store.num_elements();
            let (slots, steps) = self.optimizer.slots_mut();
            let mut state = Vec::with_capacity(n * (1 + slots.len()));
            state.extend_from_slice(self.store.flat());
            for slot in slots.iter() {
                state.extend_from_slice(slot);
            }
            sync.broadcast_from(&mut state, root).map_err(synced)?;
            if receives(rank) {
                self.store.flat_mut().copy_from_slice(&state[..n]);
                for (i, slot) in slots.iter_mut().enumerate() {
                    slot.copy_from_slice(&state[n * (i + 1)..n * (i + 2)]);
                }
                *steps = step;
                self.step = step;
                // A rank taken forward keeps its sums: the epoch's train loss is then over
                // the examples the ranks counted. A rank that joined has counted none.
                cursor.epoch = epoch;
                cursor.group = group;
                if joining {
                    cursor.sums = [0.0; 4];
                    cursor.grad_norm = None;
                }
            }
        }
        if (cursor.epoch, cursor.group, self.step) != (epoch, group, step) {
            return Err(failed(format!(
                "rank {rank} is at epoch {} step {} and rank {root} at epoch {epoch} step {step}",
                cursor.epoch, self.step
            )));
        }
        self.ended_epoch = None;
        let stepped_back = if joining { 0 } else { step_before.saturating_sub(step) };
        self.has_state = true;
        if reformed || joining {
            self.ring_changes.push(RingChange { step, world });
        }
        observe(Progress::Rejoined {
            rank,
            world,
            epoch,
            step,
            stepped_back,
        });
        Ok(())
    }

    /// [`Trainer::rejoin`], again in the next ring when the membership changes meanwhile.
    /// `reformed`: the ring already changed (else this is the start of an elastic job,
    /// recorded as a change only when it meets a new ring or this rank joins).
    pub fn rejoin_until_level(
        &mut self,
        cursor: &mut EpochCursor,
        sync: &mut dyn GradSync,
        observe: &mut dyn FnMut(Progress),
        mut reformed: bool,
    ) -> Result<()> {
        loop {
            match self.rejoin(cursor, sync, observe, reformed) {
                Err(e @ TrainError::Sync { .. }) => {
                    let step = self.step;
                    if !sync.reform().map_err(|source| TrainError::Sync { step, source })? {
                        return Err(e);
                    }
                    reformed = true;
                }
                done => return done,
            }
        }
    }
}
