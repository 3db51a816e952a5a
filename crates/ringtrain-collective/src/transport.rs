//! The [`Transport`] seam between the ring algorithm and the network, and the
//! in-memory transport used by unit tests.

use std::future::Future;
use std::time::Duration;

use ringtrain_proto::collective::Frame;
use tokio::sync::mpsc;

use crate::error::{Direction, LinkError, LinkFailure};

/// One rank's two links of the ring: frames go to the right neighbour
/// (`rank + 1 mod world`) and come from the left one (`rank - 1 mod world`),
/// in order.
pub trait Transport: Send {
    /// This rank's index in the ring.
    fn rank(&self) -> usize;
    /// Number of ranks in the ring.
    fn world(&self) -> usize;
    /// Human-readable address of `rank`, for error messages.
    fn peer_addr(&self, rank: usize) -> String;
    /// Queue a frame for the right neighbour without waiting for it to be
    /// sent. The queue is unbounded: the ring algorithm never has more than one
    /// collective's worth of frames outstanding, and it must never block on a
    /// send while its left neighbour waits for it (that would deadlock the ring).
    /// Fails if the link is already known to be broken.
    fn send(&mut self, frame: Frame) -> Result<(), LinkError>;
    /// Next frame from the left neighbour, waiting at most `timeout`. Also
    /// reports a broken link to the right neighbour as soon as it is known, so
    /// that a rank blocked here learns of it without waiting for the timeout.
    fn recv(&mut self, timeout: Duration) -> impl Future<Output = Result<Frame, LinkError>> + Send;
    /// Deliver every queued frame, then close the link to the right neighbour
    /// (bounded by a deadline). Call before dropping a transport whose last
    /// frames must still reach the neighbour, e.g. before a process exits.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// In-process transport over tokio channels, for tests and single-machine
/// experiments. Frames are moved, not serialised.
#[derive(Debug)]
pub struct MemoryTransport {
    rank: usize,
    world: usize,
    to_right: mpsc::UnboundedSender<Frame>,
    from_left: mpsc::UnboundedReceiver<Frame>,
}

impl MemoryTransport {
    /// A ring of `world` connected transports, index = rank.
    pub fn ring(world: usize) -> Vec<MemoryTransport> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| mpsc::unbounded_channel()).unzip();
        // Channel i delivers to rank i; rank r sends on channel r + 1.
        let mut receivers: Vec<Option<_>> = receivers.into_iter().map(Some).collect();
        (0..world)
            .map(|rank| MemoryTransport {
                rank,
                world,
                to_right: senders[(rank + 1) % world].clone(),
                from_left: receivers[rank].take().unwrap_or_else(|| unreachable!("taken once")),
            })
            .collect()
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }
}

impl Transport for MemoryTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn peer_addr(&self, rank: usize) -> String {
        format!("memory:{rank}")
    }

    fn send(&mut self, frame: Frame) -> Result<(), LinkError> {
        self.to_right.send(frame).map_err(|_| LinkError {
            peer: (self.rank + 1) % self.world,
            direction: Direction::ToRight,
            failure: LinkFailure::Closed("in-memory peer dropped".into()),
        })
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Frame, LinkError> {
        let left = self.left();
        match tokio::time::timeout(timeout, self.from_left.recv()).await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(LinkError {
                peer: left,
                direction: Direction::FromLeft,
                failure: LinkFailure::Closed("in-memory peer dropped".into()),
            }),
            Err(_) => Err(LinkError {
                peer: left,
                direction: Direction::FromLeft,
                failure: LinkFailure::Timeout(timeout),
            }),
        }
    }
}
