//! The per-element work of the ring, between `&[f32]` and little-endian bytes.
//!
//! Reads from the wire go element by element with unaligned little-endian
//! loads (a payload sits at any offset of the receive buffer), which the
//! compiler vectorises. Writes to the wire view the `f32` values as bytes
//! (`bytemuck`) and copy them with one `memcpy` on little-endian hosts.
//!
//! The same four steps exist for bfloat16 on the wire ([`Wire::Bf16`]): the
//! sums are still formed in f32, and every value is rounded to bf16 (nearest,
//! ties to even) when it leaves; the rank that finishes a chunk keeps the
//! rounded value itself, so all ranks still end with the same bits.

use bytes::BytesMut;

const BLOCK: usize = 1024;

#[inline]
fn le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Append `values` to `out` as little-endian bytes.
#[inline]
fn put(out: &mut BytesMut, values: &[f32]) {
    #[cfg(target_endian = "little")]
    out.extend_from_slice(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// `out ← bytes(local)`.
pub(crate) fn encode(local: &[f32], out: &mut BytesMut) {
    put(out, local);
}

/// `out ← bytes(local + wire)`, leaving `local` untouched (intermediate
/// reduce-scatter step: the partial sum is only forwarded).
pub(crate) fn add(local: &[f32], wire: &[u8], out: &mut BytesMut) {
    debug_assert_eq!(local.len() * 4, wire.len());
    let mut block = [0f32; BLOCK];
    for (l, w) in local.chunks(BLOCK).zip(wire.chunks(BLOCK * 4)) {
        let block = &mut block[..l.len()];
        for ((o, a), b) in block.iter_mut().zip(l).zip(w.chunks_exact(4)) {
            *o = a + le(b);
        }
        put(out, block);
    }
}

/// `local ← (local + wire) / divisor; out ← bytes(local)` (last reduce-scatter
/// step: this rank owns the chunk's final value).
pub(crate) fn add_finish(local: &mut [f32], wire: &[u8], divisor: Option<f32>, out: &mut BytesMut) {
    debug_assert_eq!(local.len() * 4, wire.len());
    match divisor {
        None => {
            for (a, b) in local.iter_mut().zip(wire.chunks_exact(4)) {
                *a += le(b);
            }
        }
        Some(d) => {
            for (a, b) in local.iter_mut().zip(wire.chunks_exact(4)) {
                *a = (*a + le(b)) / d;
            }
        }
    }
    put(out, local);
}

/// `local ← wire` (all-gather and broadcast).
pub(crate) fn copy(local: &mut [f32], wire: &[u8]) {
    debug_assert_eq!(local.len() * 4, wire.len());
    #[cfg(target_endian = "little")]
    bytemuck::cast_slice_mut::<f32, u8>(local).copy_from_slice(wire);
    #[cfg(not(target_endian = "little"))]
    for (a, b) in local.iter_mut().zip(wire.chunks_exact(4)) {
        *a = le(b);
    }
}

/// How values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    F32,
    Bf16,
}

/// f32 → bfloat16, rounded to nearest with ties to even; NaN stays NaN.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        // Keep the sign and force a quiet NaN (the top mantissa bit).
        return ((b >> 16) | 0x40) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern is 0xff80_0000 (-inf).
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bfloat16 → f32 (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

#[inline]
fn le16(b: &[u8]) -> f32 {
    from_bf16(u16::from_le_bytes([b[0], b[1]]))
}

fn put16(out: &mut BytesMut, values: impl Iterator<Item = f32>) {
    for v in values {
        out.extend_from_slice(&to_bf16(v).to_le_bytes());
    }
}

impl Wire {
    pub(crate) fn encode(self, local: &[f32], out: &mut BytesMut) {
        match self {
            Wire::F32 => encode(local, out),
            Wire::Bf16 => put16(out, local.iter().copied()),
        }
    }

    pub(crate) fn add(self, local: &[f32], wire: &[u8], out: &mut BytesMut) {
        match self {
            Wire::F32 => add(local, wire, out),
            Wire::Bf16 => put16(out, local.iter().zip(wire.chunks_exact(2)).map(|(a, b)| a + le16(b))),
        }
    }

    pub(crate) fn add_finish(self, local: &mut [f32], wire: &[u8], divisor: Option<f32>, out: &mut BytesMut) {
        match self {
            Wire::F32 => add_finish(local, wire, divisor, out),
            Wire::Bf16 => {
                let d = divisor.unwrap_or(1.0);
                for (a, b) in local.iter_mut().zip(wire.chunks_exact(2)) {
                    // The owner keeps the value as it travels, so every rank has these bits.
                    *a = from_bf16(to_bf16((*a + le16(b)) / d));
                }
                put16(out, local.iter().copied());
            }
        }
    }

    pub(crate) fn copy(self, local: &mut [f32], wire: &[u8]) {
        match self {
            Wire::F32 => copy(local, wire),
            Wire::Bf16 => {
                for (a, b) in local.iter_mut().zip(wire.chunks_exact(2)) {
                    *a = le16(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one, 1.
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.5 / 256.0)), 1.0 + 1.0 / 128.0);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(-0.0)).to_bits(), (-0.0f32).to_bits());
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(
            from_bf16(to_bf16(f32::from_bits(0x7f80_0001))).is_nan(),
            "a NaN must not round to inf"
        );
        // Every bf16 value survives the round trip.
        for h in (0..=u16::MAX).filter(|h| !from_bf16(*h).is_nan()) {
            assert_eq!(to_bf16(from_bf16(h)), h);
        }
    }

    #[test]
    fn bf16_kernels_sum_in_f32_and_round_once_on_the_way_out() {
        let a = [1.0f32, 0.1, -3.0, 1e-3];
        let b = [2.0f32, 0.2, 1.0, -1e-3];
        let wire: Vec<u8> = b.iter().flat_map(|x| to_bf16(*x).to_le_bytes()).collect();
        let mut out = BytesMut::new();
        Wire::Bf16.add(&a, &wire, &mut out);
        let sent: Vec<f32> = out.chunks_exact(2).map(le16).collect();
        let expect: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| from_bf16(to_bf16(x + from_bf16(to_bf16(*y)))))
            .collect();
        assert_eq!(sent, expect);
        let mut local = a;
        let mut out = BytesMut::new();
        Wire::Bf16.add_finish(&mut local, &wire, Some(2.0), &mut out);
        let kept: Vec<f32> = out.chunks_exact(2).map(le16).collect();
        assert_eq!(kept, local, "the owner keeps exactly what it sends");
        let mut copied = [0.0f32; 4];
        Wire::Bf16.copy(&mut copied, &out);
        assert_eq!(copied, local);
    }

    fn bytes_of(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn kernels_match_scalar_definitions_across_block_boundaries() {
        let n = BLOCK * 2 + 3;
        let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1.25).collect();
        let wire = bytes_of(&b);

        let mut out = BytesMut::new();
        encode(&a, &mut out);
        assert_eq!(&out[..], &bytes_of(&a)[..]);

        let mut out = BytesMut::new();
        add(&a, &wire, &mut out);
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(&out[..], &bytes_of(&sum)[..]);

        let mut local = a.clone();
        let mut out = BytesMut::new();
        add_finish(&mut local, &wire, Some(3.0), &mut out);
        let mean: Vec<f32> = sum.iter().map(|s| s / 3.0).collect();
        assert_eq!(local, mean);
        assert_eq!(&out[..], &bytes_of(&mean)[..]);

        let mut local = vec![0.0; n];
        copy(&mut local, &wire);
        assert_eq!(local, b);
    }
}
