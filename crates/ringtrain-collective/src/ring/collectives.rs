//! The collectives' bodies over the ring's framing: reduce-scatter + all-gather of a bucket,
//! broadcast, and the all-gathers.

use bytes::Bytes;
use ringtrain_proto::collective::CollectiveOp;

use super::*;
use crate::error::{Error, Result};
use crate::kernels::{self, Wire};
use crate::layout::{even_range, plain_fingerprint, Cut};
use crate::transport::Transport;

impl<T: Transport> Ring<T> {
    /// Reduce-scatter then all-gather of one bucket (see the crate docs).
    pub(super) async fn reduce_bucket(
        &mut self,
        buf: &mut [f32],
        op: CollectiveOp,
        seq: u64,
        bucket: u32,
        fingerprint: u64,
    ) -> Result<()> {
        let n = self.world;
        let r = self.rank;
        let cut = Cut::new(buf.len(), n, self.part_elems);
        let ctx = Ctx {
            op,
            seq,
            bucket,
            fingerprint,
            bucket_len: Some(buf.len() as u64),
            parts: cut.parts as u32,
        };
        if n == 1 {
            return Ok(());
        }
        let divisor = matches!(op, CollectiveOp::AllReduceMean | CollectiveOp::AllReduceMeanBf16).then_some(n as f32);
        let wire = if op == CollectiveOp::AllReduceMeanBf16 {
            Wire::Bf16
        } else {
            Wire::F32
        };
        // Step 0: send our own chunk r.
        for k in 0..cut.parts {
            let range = cut.part(r, k);
            let mut out = self.take(range.len() * op.value_bytes());
            wire.encode(&buf[range], &mut out);
            let payload = self.give(out);
            self.send(&ctx, 0, k, 0, payload)?;
        }
        let steps = 2 * (n - 1);
        for s in 0..steps {
            // Chunk arriving at step s: r-s-1 during reduce-scatter, r-t during
            // all-gather step t = s-(n-1). It is the chunk we send at step s+1.
            let chunk = if s < n - 1 {
                (r + 2 * n - s - 1) % n
            } else {
                (r + 2 * n - (s - (n - 1))) % n
            };
            for k in 0..cut.parts {
                let range = cut.part(chunk, k);
                let payload = self.recv(&ctx, s, k, 0, Some(range.len())).await?;
                if s + 2 < n {
                    // Intermediate reduce-scatter: forward the partial sum.
                    let mut out = self.take(payload.len());
                    wire.add(&buf[range], &payload, &mut out);
                    let out = self.give(out);
                    self.send(&ctx, s + 1, k, 0, out)?;
                } else if s + 2 == n {
                    // Last reduce-scatter step: this rank owns the final value.
                    let mut out = self.take(payload.len());
                    wire.add_finish(&mut buf[range], &payload, divisor, &mut out);
                    let out = self.give(out);
                    self.send(&ctx, s + 1, k, 0, out)?;
                } else {
                    // All-gather: copy, and forward the very same bytes.
                    wire.copy(&mut buf[range], &payload);
                    if s + 1 < steps {
                        self.send(&ctx, s + 1, k, 0, payload)?;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) async fn broadcast_inner(&mut self, buf: &mut [f32], root: usize, seq: u64) -> Result<()> {
        let n = self.world;
        let op = CollectiveOp::Broadcast;
        if root >= n {
            return Err(Error::InvalidArgument {
                op,
                rank: self.rank,
                what: format!("root {root} is not a rank of a world of {n}"),
            });
        }
        let parts = buf.len().div_ceil(self.part_elems).max(1);
        let ctx = Ctx {
            op,
            seq,
            bucket: 0,
            fingerprint: plain_fingerprint(buf.len()),
            bucket_len: Some(buf.len() as u64),
            parts: parts as u32,
        };
        if n == 1 {
            return Ok(());
        }
        // Hops from the root: the root sends step 0, rank at distance d
        // receives step d-1 and forwards it as step d; the last rank (d = n-1)
        // answers the root with one empty frame at step n-1.
        let d = (self.rank + n - root) % n;
        if d == 0 {
            for k in 0..parts {
                let range = even_range(buf.len(), parts, k);
                let mut out = self.take(range.len() * 4);
                kernels::encode(&buf[range], &mut out);
                let out = self.give(out);
                self.send(&ctx, 0, k, root, out)?;
            }
            self.recv(&ctx, n - 1, 0, root, Some(0)).await?;
        } else {
            for k in 0..parts {
                let range = even_range(buf.len(), parts, k);
                let payload = self.recv(&ctx, d - 1, k, root, Some(range.len())).await?;
                kernels::copy(&mut buf[range], &payload);
                if d + 1 < n {
                    self.send(&ctx, d, k, root, payload)?;
                }
            }
            if d + 1 == n {
                self.send(&ctx, n - 1, 0, root, Bytes::new())?;
            }
        }
        Ok(())
    }

    pub(super) async fn all_gather_f32_inner(
        &mut self,
        values: &[f32],
        lens: &[usize],
        seq: u64,
        fingerprint: u64,
    ) -> Result<Vec<Vec<f32>>> {
        let (n, r, pe) = (self.world, self.rank, self.part_elems);
        let op = CollectiveOp::AllGatherF32;
        if lens.len() != n || lens[r] != values.len() {
            return Err(Error::InvalidArgument {
                op,
                rank: r,
                what: format!(
                    "{} lengths for {n} ranks, this rank's {:?} for {} values",
                    lens.len(),
                    lens.get(r),
                    values.len()
                ),
            });
        }
        let ctx_of = |origin: usize| Ctx {
            op,
            seq,
            bucket: 0,
            fingerprint,
            bucket_len: Some(lens[origin] as u64),
            parts: u32::try_from(lens[origin].div_ceil(pe).max(1)).unwrap_or(u32::MAX),
        };
        let part = |len: usize, k: usize| (k * pe).min(len)..((k + 1) * pe).min(len);
        let mut out = vec![Vec::new(); n];
        out[r] = values.to_vec();
        if n == 1 {
            return Ok(out);
        }
        let ctx = ctx_of(r);
        for k in 0..ctx.parts as usize {
            let range = part(values.len(), k);
            let mut buf = self.take(range.len() * 4);
            kernels::encode(&values[range], &mut buf);
            let payload = self.give(buf);
            self.send(&ctx, 0, k, r, payload)?;
        }
        for t in 0..n - 1 {
            let origin = (r + 2 * n - t - 1) % n;
            let ctx = ctx_of(origin);
            let mut got = vec![0.0f32; lens[origin]];
            for k in 0..ctx.parts as usize {
                let range = part(lens[origin], k);
                let payload = self.recv(&ctx, t, k, origin, Some(range.len())).await?;
                kernels::copy(&mut got[range], &payload);
                if t + 2 < n {
                    self.send(&ctx, t + 1, k, origin, payload)?;
                }
            }
            out[origin] = got;
        }
        Ok(out)
    }

    pub(super) async fn all_gather_inner(&mut self, values: &[f64], seq: u64) -> Result<Vec<Vec<f64>>> {
        let n = self.world;
        let r = self.rank;
        let op = CollectiveOp::AllGather;
        if values.len() * 8 > self.part_elems * 4 {
            return Err(Error::InvalidArgument {
                op,
                rank: r,
                what: format!(
                    "{} values exceed the all-gather limit of part_bytes = {} bytes",
                    values.len(),
                    self.part_elems * 4
                ),
            });
        }
        let ctx = Ctx {
            op,
            seq,
            bucket: 0,
            fingerprint: 0,
            bucket_len: None,
            parts: 1,
        };
        let mut out = vec![Vec::new(); n];
        out[r] = values.to_vec();
        if n == 1 {
            return Ok(out);
        }
        let own: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.send(&ctx, 0, 0, r, Bytes::from(own))?;
        for t in 0..n - 1 {
            let origin = (r + 2 * n - t - 1) % n;
            let payload = self.recv(&ctx, t, 0, origin, None).await?;
            out[origin] = payload
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect();
            if t + 2 < n {
                self.send(&ctx, t + 1, 0, origin, payload)?;
            }
        }
        Ok(out)
    }
}
