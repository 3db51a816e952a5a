//! [`Membership`]: how the heartbeat task tells the training thread that the ring of an
//! elastic job changes, and how either side stops the ring in use.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ringtrain_collective::CancelToken;
use ringtrain_proto::coordinator::{Reform, Rejoined};

#[derive(Debug, Default)]
struct State {
    /// The newest ring the coordinator announced.
    next: Option<Reform>,
    /// Stops the collectives of the ring in use (a fresh token per ring).
    current: CancelToken,
    /// Why the job stopped (abort, lost coordinator): no ring comes any more.
    stopped: Option<String>,
    /// The ring this worker trains in, and whether it writes the run directory there.
    generation: u64,
    writer: bool,
    /// Where the last re-formed ring went on, for heartbeats.
    rejoined: Option<Rejoined>,
}

/// Shared by the heartbeat task (which hears of new rings and of the job's end) and the
/// training thread (which leaves one ring for the next).
#[derive(Debug, Default)]
pub struct Membership {
    state: Mutex<State>,
    changed: Condvar,
}

impl Membership {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token that stops the ring in use.
    pub fn current(&self) -> CancelToken {
        self.lock().current.clone()
    }

    /// A new ring was announced: the collective in flight on the current one fails at once
    /// (within a quarter of the ring's timeout), so that every rank reaches the new ring.
    pub fn announce(&self, reform: Reform) {
        let mut st = self.lock();
        if st.next.as_ref().is_some_and(|n| n.generation >= reform.generation) {
            return;
        }
        st.current.cancel(format!(
            "the ring re-forms as generation {}: {}",
            reform.generation, reform.reason
        ));
        st.next = Some(reform);
        drop(st);
        self.changed.notify_all();
    }

    /// The job is over for this worker (`reason`): stops the ring in use and every wait.
    pub fn stop(&self, reason: &str) {
        let mut st = self.lock();
        st.current.cancel(reason);
        st.stopped.get_or_insert_with(|| reason.to_owned());
        drop(st);
        self.changed.notify_all();
    }

    /// Waits until a ring newer than `generation` is announced, at most `wait`. Returns it
    /// with a fresh token for it (which the next announcement cancels), or `None` when the
    /// job stopped or none came in time.
    pub fn next_after(&self, generation: u64, wait: Duration) -> Option<(Reform, CancelToken)> {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            if st.stopped.is_some() {
                return None;
            }
            if let Some(next) = st.next.clone().filter(|n| n.generation > generation) {
                st.current = CancelToken::default();
                return Some((next, st.current.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Why the job stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.lock().stopped.clone()
    }

    /// This worker trains in ring `generation` now, as its writer or not.
    pub fn joined(&self, generation: u64, writer: bool) {
        let mut st = self.lock();
        st.generation = generation;
        st.writer = writer;
    }

    /// Whether this worker writes the run directory in its current ring.
    pub fn writer(&self) -> bool {
        self.lock().writer
    }

    /// Records where training went on in the current ring (sent with the next beat).
    pub fn set_rejoined(&self, step: u64, stepped_back: u64) {
        let mut st = self.lock();
        st.rejoined = Some(Rejoined {
            generation: st.generation,
            step,
            stepped_back,
        });
    }

    pub fn rejoined(&self) -> Option<Rejoined> {
        self.lock().rejoined
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reform(generation: u64) -> Reform {
        Reform {
            generation,
            ring_rank: 0,
            peers: vec!["a:1".into()],
            writer_rank: 0,
            reason: "test".into(),
        }
    }

    #[test]
    fn an_announcement_cancels_the_ring_in_use_and_hands_over_a_fresh_token() {
        let m = Membership::default();
        let old = m.current();
        m.announce(reform(1));
        assert!(old.reason().is_some_and(|r| r.contains("generation 1")));
        let (next, token) = m.next_after(0, Duration::ZERO).unwrap();
        assert_eq!(next.generation, 1);
        assert!(token.reason().is_none());
        // Nothing newer than 1 yet: the wait ends empty.
        assert!(m.next_after(1, Duration::from_millis(10)).is_none());
        // An older announcement is ignored.
        m.announce(reform(1));
        assert!(token.reason().is_none());
    }

    #[test]
    fn stopping_ends_a_wait_from_another_thread() {
        let m = std::sync::Arc::new(Membership::default());
        let waiter = {
            let m = m.clone();
            std::thread::spawn(move || m.next_after(0, Duration::from_secs(30)))
        };
        m.stop("aborted");
        assert!(waiter.join().unwrap().is_none());
        assert_eq!(m.stopped().as_deref(), Some("aborted"));
        assert!(m.current().reason().is_some());
    }
}
