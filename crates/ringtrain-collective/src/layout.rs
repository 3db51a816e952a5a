//! How a buffer is cut: buckets (groups of whole tensors), chunks (one per
//! rank) and parts (pipelined messages).

use std::ops::Range;

/// Split `len` items into `pieces` contiguous ranges whose sizes differ by at
/// most one, larger ones first; returns the range of piece `index`.
///
/// With `len < pieces` the last `pieces - len` ranges are empty; with
/// `len == 0` all are.
pub(crate) fn even_range(len: usize, pieces: usize, index: usize) -> Range<usize> {
    debug_assert!(pieces > 0 && index < pieces);
    let base = len / pieces;
    let extra = len % pieces;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

/// The cutting of one bucket for a ring of `world` ranks: `world` chunks, each
/// sent as `parts` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    pub len: usize,
    pub world: usize,
    /// Messages per chunk: the same for every chunk, at least one (an empty
    /// part still carries the header, so that even an empty buffer is checked
    /// and synchronised).
    pub parts: usize,
}

impl Cut {
    pub fn new(len: usize, world: usize, part_elems: usize) -> Self {
        let max_chunk = len.div_ceil(world);
        let parts = max_chunk.div_ceil(part_elems.max(1)).max(1);
        Self { len, world, parts }
    }

    pub fn chunk(&self, chunk: usize) -> Range<usize> {
        even_range(self.len, self.world, chunk)
    }

    /// Range (in the whole bucket) of part `part` of chunk `chunk`.
    pub fn part(&self, chunk: usize, part: usize) -> Range<usize> {
        let c = self.chunk(chunk);
        let p = even_range(c.len(), self.parts, part);
        c.start + p.start..c.start + p.end
    }
}

/// 64-bit FNV-1a, a stable hash for layout fingerprints (not for security).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn bytes(mut self, data: &[u8]) -> Self {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// Fingerprint of a plain buffer of `len` elements (no tensor names).
pub(crate) fn plain_fingerprint(len: usize) -> u64 {
    Fnv::new().bytes(b"plain").u64(len as u64).finish()
}

/// Many parameter tensors fused into buckets of about `bucket_bytes`.
///
/// The flat buffer holds the tensors back to back in the given order (the
/// training engine orders them by their dotted names). Buckets are contiguous
/// ranges of whole tensors: a bucket is closed as soon as it holds at least
/// `bucket_bytes`, so a tensor larger than the cap gets a bucket of its own.
/// Buckets are reduced one after another in index order on every rank.
///
/// The [`fingerprint`](Self::fingerprint) hashes every name, every size and the
/// bucket cap; it travels in every frame, so two ranks with different models
/// (or different bucket sizes) fail with a mismatch instead of summing garbage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    buckets: Vec<Range<usize>>,
    total: usize,
    fingerprint: u64,
}

impl BucketPlan {
    /// Plan for tensors given as `(name, number of elements)` in buffer order.
    pub fn new<'a, I>(tensors: I, bucket_bytes: usize) -> Self
    where
        I: IntoIterator<Item = (&'a str, usize)>,
    {
        let cap_elems = (bucket_bytes / 4).max(1);
        let mut hash = Fnv::new().bytes(b"buckets").u64(bucket_bytes as u64);
        let mut buckets = Vec::new();
        let mut start = 0;
        let mut end = 0;
        for (name, numel) in tensors {
            hash = hash.u64(name.len() as u64).bytes(name.as_bytes()).u64(numel as u64);
            end += numel;
            if end - start >= cap_elems {
                buckets.push(start..end);
                start = end;
            }
        }
        if end > start || buckets.is_empty() {
            buckets.push(start..end);
        }
        Self {
            buckets,
            total: end,
            fingerprint: hash.finish(),
        }
    }

    /// A plan for an anonymous buffer of `len` elements in buckets of about
    /// `bucket_bytes`.
    pub fn flat(len: usize, bucket_bytes: usize) -> Self {
        let cap = (bucket_bytes / 4).max(1);
        let pieces = len.div_ceil(cap).max(1);
        let buckets: Vec<_> = (0..pieces).map(|i| even_range(len, pieces, i)).collect();
        Self {
            buckets,
            total: len,
            fingerprint: Fnv::new()
                .bytes(b"flat")
                .u64(len as u64)
                .u64(bucket_bytes as u64)
                .finish(),
        }
    }

    /// Element ranges of the buckets, in reduction order.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Total number of elements the flat buffer must have.
    pub fn total_len(&self) -> usize {
        self.total
    }

    /// Stable hash of the layout (names, sizes, bucket cap).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_tile_the_buffer_and_differ_by_at_most_one() {
        for len in 0..40 {
            for pieces in 1..9 {
                let mut next = 0;
                for i in 0..pieces {
                    let r = even_range(len, pieces, i);
                    assert_eq!(r.start, next);
                    assert!(r.len() == len / pieces || r.len() == len / pieces + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn cut_parts_tile_each_chunk() {
        let cut = Cut::new(103, 4, 7);
        assert_eq!(cut.parts, 4); // chunks of 26,26,26,25 elements in parts of at most 7
        for c in 0..4 {
            let chunk = cut.chunk(c);
            let mut next = chunk.start;
            for p in 0..cut.parts {
                let r = cut.part(c, p);
                assert_eq!(r.start, next);
                assert!(r.len() <= 7);
                next = r.end;
            }
            assert_eq!(next, chunk.end);
        }
        // Fewer elements than ranks: some chunks are empty, every chunk has one part.
        let small = Cut::new(2, 5, 1024);
        assert_eq!(small.parts, 1);
        assert_eq!(small.chunk(0), 0..1);
        assert_eq!(small.chunk(1), 1..2);
        assert_eq!(small.chunk(4), 2..2);
        assert_eq!(Cut::new(0, 3, 16).part(2, 0), 0..0);
    }

    #[test]
    fn buckets_hold_whole_tensors_in_order() {
        let plan = BucketPlan::new([("a", 3), ("b", 2), ("c", 10), ("d", 1)], 16);
        assert_eq!(plan.buckets(), &[0..5, 5..15, 15..16]);
        assert_eq!(plan.total_len(), 16);
        let empty = BucketPlan::new(std::iter::empty::<(&str, usize)>(), 16);
        assert_eq!(empty.buckets().to_vec(), vec![std::ops::Range { start: 0, end: 0 }]);
    }

    #[test]
    fn fingerprint_changes_with_names_sizes_and_cap() {
        let fp = |t: &[(&str, usize)], cap| BucketPlan::new(t.iter().copied(), cap).fingerprint();
        let base = fp(&[("w", 4), ("b", 2)], 64);
        assert_eq!(base, fp(&[("w", 4), ("b", 2)], 64));
        assert_ne!(base, fp(&[("w", 4), ("c", 2)], 64));
        assert_ne!(base, fp(&[("w", 2), ("b", 4)], 64));
        assert_ne!(base, fp(&[("w", 4), ("b", 2)], 128));
        assert_ne!(fp(&[("ab", 1)], 64), fp(&[("a", 1), ("b", 0)], 64));
    }

    #[test]
    fn flat_plan_covers_the_buffer() {
        let plan = BucketPlan::flat(10, 16);
        assert_eq!(plan.buckets(), &[0..4, 4..7, 7..10]);
        assert_eq!(
            BucketPlan::flat(0, 16).buckets().to_vec(),
            vec![std::ops::Range { start: 0, end: 0 }]
        );
    }
}
