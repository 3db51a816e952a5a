//! Domain types of the collective data plane (`ringtrain.v1.Collective`).
//!
//! [`Frame`] is what travels between ring neighbours. Conversion from the wire
//! checks everything that can be checked without knowing the receiver's state
//! (known op, payload aligned to whole values, rank inside the world); the
//! receiver then compares the header against what it expects.

use bytes::Bytes;

use crate::wire;

/// Which collective a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CollectiveOp {
    AllReduceSum,
    AllReduceMean,
    /// Mean with bfloat16 values on the wire.
    AllReduceMeanBf16,
    Broadcast,
    Barrier,
    AllGather,
    /// Variable-length f32 buffers, one per rank.
    AllGatherF32,
}

impl CollectiveOp {
    /// Stable lower-case name, used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveOp::AllReduceSum => "all_reduce_sum",
            CollectiveOp::AllReduceMean => "all_reduce_mean",
            CollectiveOp::AllReduceMeanBf16 => "all_reduce_mean_bf16",
            CollectiveOp::Broadcast => "broadcast",
            CollectiveOp::Barrier => "barrier",
            CollectiveOp::AllGather => "all_gather",
            CollectiveOp::AllGatherF32 => "all_gather_f32",
        }
    }

    /// Size in bytes of one payload value for this op (f64 for all-gather, bf16 for the
    /// compressed mean, f32 otherwise).
    pub fn value_bytes(self) -> usize {
        match self {
            CollectiveOp::AllGather => 8,
            CollectiveOp::AllReduceMeanBf16 => 2,
            _ => 4,
        }
    }
}

impl std::fmt::Display for CollectiveOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl From<CollectiveOp> for wire::CollectiveOp {
    fn from(op: CollectiveOp) -> Self {
        match op {
            CollectiveOp::AllReduceSum => wire::CollectiveOp::AllReduceSum,
            CollectiveOp::AllReduceMean => wire::CollectiveOp::AllReduceMean,
            CollectiveOp::AllReduceMeanBf16 => wire::CollectiveOp::AllReduceMeanBf16,
            CollectiveOp::Broadcast => wire::CollectiveOp::Broadcast,
            CollectiveOp::Barrier => wire::CollectiveOp::Barrier,
            CollectiveOp::AllGather => wire::CollectiveOp::AllGather,
            CollectiveOp::AllGatherF32 => wire::CollectiveOp::AllGatherF32,
        }
    }
}

/// A wire message that cannot be turned into a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame has no body (neither data nor abort)")]
    EmptyFrame,
    #[error("unknown or unspecified collective op {0}")]
    UnknownOp(i32),
    #[error("{op} payload of {len} bytes is not a whole number of {value_bytes}-byte values")]
    UnalignedPayload {
        op: CollectiveOp,
        len: usize,
        value_bytes: usize,
    },
    #[error("sender rank {rank} is outside world size {world}")]
    RankOutOfRange { rank: u32, world: u32 },
    #[error("origin rank {rank} is outside world size {world}")]
    OriginOutOfRange { rank: u32, world: u32 },
    #[error("part {part} is not below the part count {parts}")]
    PartOutOfRange { part: u32, parts: u32 },
}

/// Everything a data frame says about itself, apart from its payload.
///
/// The receiver compares every field with its own expectation; see
/// `ringtrain-collective` for the order of the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataHeader {
    pub job_id: String,
    /// Collective sequence number: how many collectives the sender started before this one.
    pub seq: u64,
    pub op: CollectiveOp,
    pub bucket_id: u32,
    pub layout_fingerprint: u64,
    /// Elements in this bucket on the sender.
    pub bucket_len: u64,
    pub sender_rank: u32,
    pub world_size: u32,
    pub step: u32,
    pub part: u32,
    pub parts: u32,
    pub origin_rank: u32,
    /// Membership generation of the sender's ring.
    pub generation: u64,
}

/// One pipelined part of a chunk: header plus little-endian values.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFrame {
    pub header: DataHeader,
    /// Little-endian `f32` values (`f64` for [`CollectiveOp::AllGather`]).
    pub payload: Bytes,
}

/// The first rank that fails a collective sends this around the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub job_id: String,
    pub seq: u64,
    pub origin_rank: u32,
    pub reason: String,
    pub generation: u64,
}

/// A rank that has had no frame for a while says it is alive and whom it is
/// waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub job_id: String,
    pub seq: u64,
    pub rank: u32,
    pub waiting_on: u32,
    pub generation: u64,
}

/// A validated message between ring neighbours.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Data(DataFrame),
    Abort(Abort),
    Waiting(Waiting),
}

impl TryFrom<wire::Frame> for Frame {
    type Error = WireError;

    fn try_from(frame: wire::Frame) -> Result<Self, Self::Error> {
        match frame.kind {
            None => Err(WireError::EmptyFrame),
            Some(wire::frame::Kind::Abort(a)) => Ok(Frame::Abort(Abort {
                job_id: a.job_id,
                seq: a.seq,
                origin_rank: a.origin_rank,
                reason: a.reason,
                generation: a.generation,
            })),
            Some(wire::frame::Kind::Data(d)) => DataFrame::try_from(d).map(Frame::Data),
            Some(wire::frame::Kind::Waiting(w)) => Ok(Frame::Waiting(Waiting {
                job_id: w.job_id,
                seq: w.seq,
                rank: w.rank,
                waiting_on: w.waiting_on,
                generation: w.generation,
            })),
        }
    }
}

impl TryFrom<wire::DataFrame> for DataFrame {
    type Error = WireError;

    fn try_from(d: wire::DataFrame) -> Result<Self, Self::Error> {
        let op = match wire::CollectiveOp::try_from(d.op) {
            Ok(wire::CollectiveOp::AllReduceSum) => CollectiveOp::AllReduceSum,
            Ok(wire::CollectiveOp::AllReduceMean) => CollectiveOp::AllReduceMean,
            Ok(wire::CollectiveOp::AllReduceMeanBf16) => CollectiveOp::AllReduceMeanBf16,
            Ok(wire::CollectiveOp::Broadcast) => CollectiveOp::Broadcast,
            Ok(wire::CollectiveOp::Barrier) => CollectiveOp::Barrier,
            Ok(wire::CollectiveOp::AllGather) => CollectiveOp::AllGather,
            Ok(wire::CollectiveOp::AllGatherF32) => CollectiveOp::AllGatherF32,
            Ok(wire::CollectiveOp::Unspecified) | Err(_) => return Err(WireError::UnknownOp(d.op)),
        };
        if d.sender_rank >= d.world_size {
            return Err(WireError::RankOutOfRange {
                rank: d.sender_rank,
                world: d.world_size,
            });
        }
        if d.origin_rank >= d.world_size {
            return Err(WireError::OriginOutOfRange {
                rank: d.origin_rank,
                world: d.world_size,
            });
        }
        if d.part >= d.parts {
            return Err(WireError::PartOutOfRange {
                part: d.part,
                parts: d.parts,
            });
        }
        let value_bytes = op.value_bytes();
        if !d.payload.len().is_multiple_of(value_bytes) {
            return Err(WireError::UnalignedPayload {
                op,
                len: d.payload.len(),
                value_bytes,
            });
        }
        Ok(DataFrame {
            header: DataHeader {
                job_id: d.job_id,
                seq: d.seq,
                op,
                bucket_id: d.bucket_id,
                layout_fingerprint: d.layout_fingerprint,
                bucket_len: d.bucket_len,
                sender_rank: d.sender_rank,
                world_size: d.world_size,
                step: d.step,
                part: d.part,
                parts: d.parts,
                origin_rank: d.origin_rank,
                generation: d.generation,
            },
            payload: d.payload,
        })
    }
}

impl From<Frame> for wire::Frame {
    fn from(frame: Frame) -> Self {
        let kind = match frame {
            Frame::Data(DataFrame { header: h, payload }) => wire::frame::Kind::Data(wire::DataFrame {
                job_id: h.job_id,
                seq: h.seq,
                op: wire::CollectiveOp::from(h.op).into(),
                bucket_id: h.bucket_id,
                layout_fingerprint: h.layout_fingerprint,
                bucket_len: h.bucket_len,
                sender_rank: h.sender_rank,
                world_size: h.world_size,
                step: h.step,
                part: h.part,
                parts: h.parts,
                origin_rank: h.origin_rank,
                generation: h.generation,
                payload,
            }),
            Frame::Abort(a) => wire::frame::Kind::Abort(wire::Abort {
                job_id: a.job_id,
                seq: a.seq,
                origin_rank: a.origin_rank,
                reason: a.reason,
                generation: a.generation,
            }),
            Frame::Waiting(w) => wire::frame::Kind::Waiting(wire::Waiting {
                job_id: w.job_id,
                seq: w.seq,
                rank: w.rank,
                waiting_on: w.waiting_on,
                generation: w.generation,
            }),
        };
        wire::Frame { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn header() -> DataHeader {
        DataHeader {
            job_id: "job".into(),
            seq: 7,
            op: CollectiveOp::AllReduceMean,
            bucket_id: 2,
            layout_fingerprint: 0xdead_beef_0123_4567,
            bucket_len: 10,
            sender_rank: 1,
            world_size: 4,
            step: 3,
            part: 0,
            parts: 2,
            origin_rank: 0,
            generation: 3,
        }
    }

    #[test]
    fn data_frame_round_trips_through_protobuf_bytes() {
        let frame = Frame::Data(DataFrame {
            header: header(),
            payload: Bytes::from(vec![0u8; 16]),
        });
        let encoded = wire::Frame::from(frame.clone()).encode_to_vec();
        let decoded = wire::Frame::decode(encoded.as_slice()).expect("decodes");
        assert_eq!(Frame::try_from(decoded), Ok(frame));
    }

    #[test]
    fn waiting_round_trips() {
        let frame = Frame::Waiting(Waiting {
            job_id: "j".into(),
            seq: 4,
            rank: 1,
            waiting_on: 0,
            generation: 1,
        });
        assert_eq!(Frame::try_from(wire::Frame::from(frame.clone())), Ok(frame));
    }

    #[test]
    fn abort_round_trips() {
        let frame = Frame::Abort(Abort {
            job_id: "j".into(),
            seq: 3,
            origin_rank: 2,
            reason: "boom".into(),
            generation: 2,
        });
        assert_eq!(Frame::try_from(wire::Frame::from(frame.clone())), Ok(frame));
    }

    fn wire_data(edit: impl FnOnce(&mut wire::DataFrame)) -> wire::Frame {
        let mut w = wire::Frame::from(Frame::Data(DataFrame {
            header: header(),
            payload: Bytes::from(vec![0u8; 8]),
        }));
        if let Some(wire::frame::Kind::Data(d)) = w.kind.as_mut() {
            edit(d);
        }
        w
    }

    #[test]
    fn invalid_frames_are_rejected_on_receipt() {
        assert_eq!(Frame::try_from(wire::Frame { kind: None }), Err(WireError::EmptyFrame));
        assert_eq!(Frame::try_from(wire_data(|d| d.op = 0)), Err(WireError::UnknownOp(0)));
        assert_eq!(Frame::try_from(wire_data(|d| d.op = 99)), Err(WireError::UnknownOp(99)));
        assert_eq!(
            Frame::try_from(wire_data(|d| d.payload = Bytes::from_static(&[1, 2, 3]))),
            Err(WireError::UnalignedPayload {
                op: CollectiveOp::AllReduceMean,
                len: 3,
                value_bytes: 4
            })
        );
        assert_eq!(
            Frame::try_from(wire_data(|d| {
                d.op = wire::CollectiveOp::AllGather.into();
                d.payload = Bytes::from_static(&[0; 12]);
            })),
            Err(WireError::UnalignedPayload {
                op: CollectiveOp::AllGather,
                len: 12,
                value_bytes: 8
            })
        );
        assert_eq!(
            Frame::try_from(wire_data(|d| d.sender_rank = 4)),
            Err(WireError::RankOutOfRange { rank: 4, world: 4 })
        );
        assert_eq!(
            Frame::try_from(wire_data(|d| d.origin_rank = 9)),
            Err(WireError::OriginOutOfRange { rank: 9, world: 4 })
        );
        assert_eq!(
            Frame::try_from(wire_data(|d| d.part = 2)),
            Err(WireError::PartOutOfRange { part: 2, parts: 2 })
        );
    }
}
