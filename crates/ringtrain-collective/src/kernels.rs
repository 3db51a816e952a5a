//! The per-element work of the ring, between `&[f32]` and little-endian bytes.
//!
//! Reads from the wire go element by element with unaligned little-endian
//! loads (a payload sits at any offset of the receive buffer), which the
//! compiler vectorises. Writes to the wire view the `f32` values as bytes
//! (`bytemuck`) and copy them with one `memcpy` on little-endian hosts.

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

#[cfg(test)]
mod tests {
    use super::*;

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
