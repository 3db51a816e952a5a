//! Watching a running job: heartbeats, deadlines, membership changes and the outcome.

use super::*;

pub(super) async fn supervise(
    shared: &Shared,
    shutdown: impl Future<Output = ()>,
    server: &mut tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
) -> Result<JobOutcome> {
    tokio::pin!(shutdown);
    loop {
        if let Some(done) = check(shared, Instant::now()) {
            return done;
        }
        tokio::select! {
            _ = &mut shutdown => {
                let st = shared.lock();
                return Err(CoordinatorError::Shutdown {
                    epoch: st.slots.iter().map(|s| s.epoch).max().unwrap_or(0),
                    checkpoint: shared.checkpoint(&st),
                });
            }
            ended = &mut *server => {
                let reason = match ended {
                    Ok(Ok(())) => "the server stopped".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(CoordinatorError::Serve { reason });
            }
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// The job's state at `now`: `None` while it runs.
pub(super) fn check(shared: &Shared, now: Instant) -> Option<Result<JobOutcome>> {
    let config = &shared.config;
    let mut st = shared.lock();
    if let Some(m) = &config.metrics {
        observe(m, shared, &st);
    }
    if !st.formed {
        if now >= shared.rendezvous_deadline {
            return Some(Err(CoordinatorError::Rendezvous {
                registered: st.slots.len(),
                expected: config.workers,
                timeout: config.rendezvous_timeout,
            }));
        }
        return None;
    }
    for slot in &mut st.slots {
        let silent = now.saturating_duration_since(slot.last_beat);
        if slot.outcome.is_none() && slot.lost.is_none() && silent > config.heartbeat_timeout {
            slot.lost = Some((
                now,
                format!(
                    "no heartbeat for {:.1} s (timeout {:?}): the process is hung, stopped or unreachable",
                    silent.as_secs_f64(),
                    config.heartbeat_timeout
                ),
            ));
        }
    }
    // Only the ring's members matter: a worker an elastic job already went on without is
    // no longer waited for.
    let mut lost: Vec<(Instant, usize)> = st
        .members
        .iter()
        .filter_map(|&m| st.slots[m].lost.as_ref().map(|(at, _)| (*at, m)))
        .collect();
    lost.sort_unstable();
    if let Some(&(_, first)) = lost.first() {
        if !config.elastic() {
            let slot = &st.slots[first];
            return Some(Err(CoordinatorError::WorkerLost {
                rank: first,
                worker: slot.info.to_string(),
                epoch: slot.epoch,
                step: slot.step,
                reason: slot.lost.as_ref().map(|(_, why)| why.clone()).unwrap_or_default(),
                checkpoint: shared.checkpoint(&st),
            }));
        }
        let left: Vec<Departure> = lost
            .iter()
            .map(|&(_, m)| Departure {
                rank: m,
                worker: st.slots[m].info.to_string(),
                reason: st.slots[m]
                    .lost
                    .as_ref()
                    .map(|(_, why)| why.clone())
                    .unwrap_or_default(),
            })
            .collect();
        st.members.retain(|m| lost.iter().all(|&(_, l)| l != *m));
        let min = config.min_workers.unwrap_or(config.workers);
        if st.members.len() < min {
            let (epoch, step) = st
                .slots
                .iter()
                .map(|s| (s.epoch, s.step))
                .max_by_key(|&(_, step)| step)
                .unwrap_or((0, 0));
            // Everyone the job lost, earlier departures first.
            let earlier = st.changes.iter().flat_map(|c| c.left.iter());
            return Some(Err(CoordinatorError::TooFewWorkers {
                lost: earlier
                    .chain(&left)
                    .map(|d| format!("worker rank {} ({}) lost: {}", d.rank, d.worker, d.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
                left: st.members.len(),
                min,
                epoch,
                step,
                checkpoint: shared.checkpoint(&st),
            }));
        }
        // Members that already finished keep their result; the others go on in a new ring.
        if !st.ring().is_empty() {
            shared.reform(&mut st, left, Vec::new());
        }
    }
    if let Some((at, failure)) = &st.reported {
        if failure.is_bad_input() || now.saturating_duration_since(*at) >= config.failure_grace {
            return Some(Err(failure.clone()));
        }
        return None;
    }
    let mut finished = Vec::with_capacity(st.members.len());
    for &m in &st.members {
        match &st.slots[m].outcome {
            Some(WorkerOutcome::Finished {
                params_checksum,
                summary_json,
                comm_secs,
                steps,
                metrics_jsonl,
            }) => finished.push((*params_checksum, summary_json, *comm_secs, *steps, metrics_jsonl)),
            _ => return None,
        }
    }
    // Parallel k-fold jobs are never elastic: the members are every worker, by number.
    let mut groups = Vec::with_capacity(shared.groups.len());
    for plan in &shared.groups {
        let first = plan.ranks.start;
        let ours = finished[first].0;
        if let Some(rank) = plan.ranks.clone().find(|&r| finished[r].0 != ours) {
            return Some(Err(CoordinatorError::GroupParamsDiffer {
                group: plan.index,
                rank,
                first_rank: first,
                ours,
                theirs: finished[rank].0,
            }));
        }
        groups.push(GroupOutcome {
            plan: plan.clone(),
            summary_json: finished[first].1.clone(),
            metrics_jsonl: finished[first].4.clone(),
            params_checksum: ours,
            steps: finished[first].3,
        });
    }
    let writer = st.members.iter().position(|&m| m == st.writer).unwrap_or(0);
    let ours = finished[writer].0;
    if groups.is_empty() {
        if let Some((i, theirs)) = finished.iter().enumerate().find(|(_, f)| f.0 != ours) {
            return Some(Err(CoordinatorError::ParamsDiffer {
                rank: st.members[i],
                ours,
                theirs: theirs.0,
            }));
        }
    }
    Some(Ok(JobOutcome {
        job_id: config.job_id.clone(),
        workers: st.slots.iter().map(|s| s.info.clone()).collect(),
        epochs: st.epochs.clone(),
        summary_json: finished[writer].1.clone(),
        params_checksum: ours,
        comm_secs: finished.iter().map(|f| f.2).collect(),
        steps: finished[writer].3,
        groups,
        membership: st.changes.clone(),
    }))
}

/// Copies what the slots know into the metrics.
pub(super) fn observe(m: &crate::Metrics, shared: &Shared, st: &State) {
    let alive = |s: &Slot| s.lost.is_none() && !matches!(s.outcome, Some(WorkerOutcome::Failed { .. }));
    // Once the ring formed only its members count (an elastic job goes on without some).
    let live = if st.formed {
        st.members.iter().filter(|&&r| alive(&st.slots[r])).count()
    } else {
        st.slots.iter().filter(|s| alive(s)).count()
    };
    m.set_workers(shared.config.workers, st.slots.len(), live);
    let step = st.slots.iter().map(|s| s.step).max().unwrap_or(0);
    m.set_progress(step, st.last_checkpoint());
    if st.formed {
        m.set_state(JobState::Running);
    }
}

/// Tells every connected worker why the job failed and waits (briefly) until each has
/// reported or is gone, so none keeps training against a dead ring.
pub(super) async fn tell_everyone_to_stop(shared: &Shared, error: &CoordinatorError) {
    let reason = error.to_string();
    shared.emit(Event::Failing { error: reason.clone() });
    let senders: Vec<_> = {
        let mut st = shared.lock();
        st.abort_reason = Some(reason.clone());
        st.slots.iter().filter_map(|s| s.commands.clone()).collect()
    };
    for tx in senders {
        let _ = tx.try_send(Ok(Command::Abort(Abort { reason: reason.clone() })));
    }
    let deadline = Instant::now() + LINGER;
    while Instant::now() < deadline {
        let settled = shared
            .lock()
            .slots
            .iter()
            .all(|s| s.outcome.is_some() || s.lost.is_some());
        if settled {
            break;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}
