//! Small matrix products against a right-hand matrix packed once and reused.
//!
//! A recurrent layer multiplies the same `W_hh` by a `[B, H]` state at every time step, and a
//! convolution the same kernel by every image's windows. OpenBLAS repacks both operands on every
//! call, which at these sizes (32×128 by 128×512) costs as much as the arithmetic. Here the
//! right-hand matrix is packed into 16-column panels once ([`PackedB`]) and a register-blocked
//! kernel streams the left-hand rows past it.
//!
//! The left-hand matrix is read through offset tables, `A[i][k] = data[rows[i] + cols[k]]`
//! ([`Gather`]): a plain row-major matrix is `rows[i] = i·lda`, `cols[k] = k`, and the windows
//! of a stride-1 convolution are `rows[p]` = the output pixel's top-left input position,
//! `cols[k]` = the offset of kernel tap `k` — a direct convolution with no im2col buffer.
//!
//! # Same bits on every CPU
//! Every output element is one fused multiply-add chain over `k` in increasing order, starting
//! from the value already in `C`: `c = fma(a[i][k], b[k][j], c)`. Vector width decides only how
//! many such chains run side by side, so the AVX-512 kernel, the AVX2 kernel and the scalar
//! fallback (`f32::mul_add`) give identical results (tested).

pub use crate::simd::Isa;

/// Columns per packed panel: one AVX-512 register, two AVX2 registers.
const NR: usize = 16;

/// `B: [K, N]` packed as `ceil(N / 16)` panels, each `K` rows of 16 consecutive columns (the
/// last panel zero-padded), so a kernel reads one panel row per `k` with one aligned stride.
#[derive(Debug, Clone, Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `B[k][j] = at(k, j)` for `k < rows`, `j < cols`.
    pub fn from_fn(rows: usize, cols: usize, at: impl Fn(usize, usize) -> f32) -> PackedB {
        let panels = cols.div_ceil(NR);
        let mut data = vec![0.0f32; panels * rows * NR];
        for (p, panel) in data.chunks_exact_mut((rows * NR).max(1)).enumerate().take(panels) {
            let width = (cols - p * NR).min(NR);
            for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, v) in row[..width].iter_mut().enumerate() {
                    *v = at(kk, p * NR + j);
                }
            }
        }
        PackedB { k: rows, n: cols, data }
    }

    /// Packs the row-major `[rows, cols]` matrix `b`.
    pub fn pack(b: &[f32], rows: usize, cols: usize) -> PackedB {
        assert_eq!(b.len(), rows * cols, "PackedB::pack: b is not [{rows}, {cols}]");
        PackedB::from_fn(rows, cols, |kk, j| b[kk * cols + j])
    }

    /// Packs `bᵀ`, where `b` is the row-major `[cols, rows]` matrix.
    pub fn pack_t(b: &[f32], rows: usize, cols: usize) -> PackedB {
        assert_eq!(b.len(), rows * cols, "PackedB::pack_t: b is not [{cols}, {rows}]");
        let mut data = vec![0.0f32; cols.div_ceil(NR) * rows * NR];
        // b's rows are B's columns: each read once, in order, into its lane of its panel (the
        // transposed read of `from_fn` cost more than a small convolution's products)
        for (j, col) in b.chunks_exact(rows.max(1)).enumerate().take(cols) {
            let panel = &mut data[(j / NR) * rows * NR..][..rows * NR];
            for (dst, &v) in panel.iter_mut().skip(j % NR).step_by(NR).zip(col) {
                *dst = v;
            }
        }
        PackedB { k: rows, n: cols, data }
    }

    /// `(K, N)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.k * NR..][..self.k * NR]
    }
}

/// The left-hand matrix `A[i][k] = data[rows[i] + cols[k]]`, `i < rows.len()`, `k < cols.len()`.
#[derive(Debug, Clone, Copy)]
pub struct Gather<'a> {
    pub data: &'a [f32],
    pub rows: &'a [usize],
    pub cols: &'a [usize],
}

/// `C += A · B` with `A: [m, K]` (rows `lda` apart), `B` packed `[K, N]` and `C: [m, N]` (rows
/// `ldc` apart), on the widest kernel this CPU has.
pub fn gemm_packed(a: &[f32], lda: usize, m: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let rows: Vec<usize> = (0..m).map(|i| i * lda).collect();
    let cols: Vec<usize> = (0..b.k).collect();
    gemm_gather_on(
        Isa::detect(),
        Gather {
            data: a,
            rows: &rows,
            cols: &cols,
        },
        b,
        c,
        ldc,
    );
}

/// `C += A · B` for a gathered `A: [rows.len(), cols.len()]`, on the widest kernel this CPU has.
pub fn gemm_gather(a: Gather<'_>, b: &PackedB, c: &mut [f32], ldc: usize) {
    gemm_gather_on(Isa::detect(), a, b, c, ldc);
}

/// [`gemm_gather`] on a chosen kernel (tests compare them).
///
/// # Panics
/// When the offsets or `C` do not fit the shapes, or `isa` is not [`Isa::available`].
pub fn gemm_gather_on(isa: Isa, a: Gather<'_>, b: &PackedB, c: &mut [f32], ldc: usize) {
    let (k, n) = b.dims();
    let m = a.rows.len();
    if m == 0 || n == 0 {
        return;
    }
    assert_eq!(a.cols.len(), k, "gemm: A has {} columns, B {k} rows", a.cols.len());
    let reach = a.rows.iter().max().copied().unwrap_or(0) + a.cols.iter().max().copied().unwrap_or(0);
    assert!(
        k == 0 || reach < a.data.len(),
        "gemm: A's offsets reach {reach}, past its {} values",
        a.data.len()
    );
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: C is not [{m}, {n}] with stride {ldc}"
    );
    assert!(isa.available(), "gemm: this CPU cannot run {isa:?}");
    match isa {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)] // reason: calling a target-feature kernel after checking the CPU has it
        // SAFETY: `available` checked the CPU features; the asserts above bound every access.
        Isa::Avx512 => unsafe { x86::gemm_avx512(a, b, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)] // reason: as above
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::gemm_avx2(a, b, c, ldc) },
        _ => scalar(a, b, c, ldc),
    }
}

/// The right-hand matrix `B[k][j] = data[starts[k] + j]`, `j < len`: every row a contiguous run
/// of `data` (one kernel tap across consecutive output positions of a direct convolution), read
/// in place with no packing.
#[derive(Debug, Clone, Copy)]
pub struct Runs<'a> {
    pub data: &'a [f32],
    pub starts: &'a [usize],
    pub len: usize,
}

/// `C += A · B` with `A: [m, K]` row-major (rows `lda` apart), `B` read as [`Runs`] and
/// `C: [m, len]` (rows `ldc` apart), on the widest kernel this CPU has.
pub fn gemm_runs(a: &[f32], lda: usize, m: usize, b: Runs<'_>, c: &mut [f32], ldc: usize) {
    gemm_runs_on(Isa::detect(), a, lda, m, b, c, ldc);
}

/// [`gemm_runs`] on a chosen kernel (tests compare them).
///
/// # Panics
/// When a run or `C` does not fit its slice, or `isa` is not [`Isa::available`].
pub fn gemm_runs_on(isa: Isa, a: &[f32], lda: usize, m: usize, b: Runs<'_>, c: &mut [f32], ldc: usize) {
    let (k, n) = (b.starts.len(), b.len);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        lda >= k && a.len() >= (m - 1) * lda + k,
        "gemm: A is not [{m}, {k}] with stride {lda}"
    );
    let reach = b.starts.iter().max().copied().unwrap_or(0) + n;
    assert!(
        k == 0 || reach <= b.data.len(),
        "gemm: B's runs reach {reach}, past its {} values",
        b.data.len()
    );
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: C is not [{m}, {n}] with stride {ldc}"
    );
    assert!(isa.available(), "gemm: this CPU cannot run {isa:?}");
    match isa {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)] // reason: calling a target-feature kernel after checking the CPU has it
        // SAFETY: `available` checked the CPU features; the asserts above bound every access.
        Isa::Avx512 => unsafe { x86::runs_avx512(a, lda, m, b, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)] // reason: as above
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::runs_avx2(a, lda, m, b, c, ldc) },
        _ => {
            for i in 0..m {
                let a_row = &a[i * lda..][..k];
                for (j, cv) in c[i * ldc..][..n].iter_mut().enumerate() {
                    for (&av, &start) in a_row.iter().zip(b.starts) {
                        *cv = av.mul_add(b.data[start + j], *cv);
                    }
                }
            }
        }
    }
}

fn scalar(a: Gather<'_>, b: &PackedB, c: &mut [f32], ldc: usize) {
    let n = b.n;
    for p in 0..n.div_ceil(NR) {
        let panel = b.panel(p);
        let width = (n - p * NR).min(NR);
        for (i, &row) in a.rows.iter().enumerate() {
            let c_row = &mut c[i * ldc + p * NR..][..width];
            for (j, cv) in c_row.iter_mut().enumerate() {
                let mut acc = *cv;
                for (kk, &col) in a.cols.iter().enumerate() {
                    acc = a.data[row + col].mul_add(panel[kk * NR + j], acc);
                }
                *cv = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // reason: SIMD intrinsics and raw-pointer tiles; bounds are checked by gemm_gather_on
mod x86 {
    use super::{Gather, PackedB, Runs, NR};
    use std::arch::x86_64::*;

    /// Calls `$tile::<MR, ..>` for the runtime row count `$mr`.
    macro_rules! by_rows {
        ($mr:expr, $tile:ident, $p:literal, $args:expr, [$($n:literal)*]) => {
            match $mr {
                $($n => $tile::<$n, $p>($args),)*
                _ => unreachable!("row block larger than the kernel's"),
            }
        };
    }

    /// AVX-512: 8 rows × 32 columns (two panels) per tile, or 14 rows × 16 columns when `B` is one
    /// panel wide (a convolution's few output channels); up to 16 accumulators.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm_avx512(a: Gather<'_>, b: &PackedB, c: &mut [f32], ldc: usize) {
        let (k, n) = b.dims();
        let m = a.rows.len();
        let (data, cols, cp) = (a.data.as_ptr(), a.cols.as_ptr(), c.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let block = if panels == 1 { 14 } else { 8 };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(block);
            let rows = &a.rows[i..i + mr];
            let mut p = 0;
            while p < panels {
                let width = (n - p * NR).min(2 * NR);
                let b0 = b.panel(p).as_ptr();
                let b1 = if p + 1 < panels { b.panel(p + 1).as_ptr() } else { b0 };
                // SAFETY: rows i..i+mr and columns p·16..p·16+width lie inside A and C.
                unsafe {
                    let ct = cp.add(i * ldc + p * NR);
                    if panels == 1 {
                        let args = (data, rows, cols, k, [b0], ct, ldc, width);
                        by_rows!(mr, tile512, 1, args, [1 2 3 4 5 6 7 8 9 10 11 12 13 14]);
                    } else {
                        let args = (data, rows, cols, k, [b0, b1], ct, ldc, width);
                        by_rows!(mr, tile512, 2, args, [1 2 3 4 5 6 7 8]);
                    }
                }
                p += 2;
            }
            i += mr;
        }
    }

    /// The masks of a tile's `P` vectors per row, for its first `width` columns.
    fn masks512<const P: usize>(width: usize) -> [__mmask16; P] {
        std::array::from_fn(|q| mask16(width.saturating_sub(q * NR)))
    }

    /// A tile of `C`, `MR` rows of `P` vectors, masked to the valid columns.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load512<const MR: usize, const P: usize>(
        c: *const f32,
        ldc: usize,
        masks: &[__mmask16; P],
    ) -> [[__m512; P]; MR] {
        // SAFETY: the caller guarantees MR rows of C, ldc apart, valid where the masks are set.
        std::array::from_fn(|r| {
            std::array::from_fn(|q| unsafe { _mm512_maskz_loadu_ps(masks[q], c.add(r * ldc + q * NR)) })
        })
    }

    /// Stores what [`load512`] loaded.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store512<const MR: usize, const P: usize>(
        c: *mut f32,
        ldc: usize,
        masks: &[__mmask16; P],
        acc: &[[__m512; P]; MR],
    ) {
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                // SAFETY: as in load512.
                unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + q * NR), masks[q], *v) };
            }
        }
    }

    fn masks256<const P: usize>(width: usize) -> [__m256i; P] {
        std::array::from_fn(|q| mask8(width.saturating_sub(q * 8)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load256<const MR: usize, const P: usize>(
        c: *const f32,
        ldc: usize,
        masks: &[__m256i; P],
    ) -> [[__m256; P]; MR] {
        // SAFETY: as in load512.
        std::array::from_fn(|r| {
            std::array::from_fn(|q| unsafe { _mm256_maskload_ps(c.add(r * ldc + q * 8), masks[q]) })
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store256<const MR: usize, const P: usize>(
        c: *mut f32,
        ldc: usize,
        masks: &[__m256i; P],
        acc: &[[__m256; P]; MR],
    ) {
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                // SAFETY: as in load512.
                unsafe { _mm256_maskstore_ps(c.add(r * ldc + q * 8), masks[q], *v) };
            }
        }
    }

    fn mask16(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const MR: usize, const P: usize>(
        (data, rows, cols, k, bp, c, ldc, width): (
            *const f32,
            &[usize],
            *const usize,
            usize,
            [*const f32; P],
            *mut f32,
            usize,
            usize,
        ),
    ) {
        let masks = masks512::<P>(width);
        // SAFETY (whole body): the caller guarantees MR rows of A (every offset in bounds), of C
        // (width wide) and P panels of k·16 floats; masked loads and stores touch only the
        // valid columns.
        unsafe {
            let mut acc = load512::<MR, P>(c, ldc, &masks);
            let a: [*const f32; MR] = std::array::from_fn(|r| data.add(rows[r]));
            for kk in 0..k {
                let col = *cols.add(kk);
                let v: [__m512; P] = std::array::from_fn(|q| _mm512_loadu_ps(bp[q].add(kk * NR)));
                for r in 0..MR {
                    let av = _mm512_set1_ps(*a[r].add(col));
                    for q in 0..P {
                        acc[r][q] = _mm512_fmadd_ps(av, v[q], acc[r][q]);
                    }
                }
            }
            store512(c, ldc, &masks, &acc);
        }
    }

    /// AVX2 + FMA: 6 rows × 16 columns (one panel) per tile, 12 accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_avx2(a: Gather<'_>, b: &PackedB, c: &mut [f32], ldc: usize) {
        let (k, n) = b.dims();
        let m = a.rows.len();
        let (data, cols, cp) = (a.data.as_ptr(), a.cols.as_ptr(), c.as_mut_ptr());
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(6);
            let rows = &a.rows[i..i + mr];
            for p in 0..n.div_ceil(NR) {
                let width = (n - p * NR).min(NR);
                let bp = b.panel(p).as_ptr();
                // SAFETY: rows i..i+mr and columns p·16..p·16+width lie inside A and C.
                unsafe {
                    let args = (data, rows, cols, k, bp, cp.add(i * ldc + p * NR), ldc, width);
                    by_rows!(mr, tile256, 2, args, [1 2 3 4 5 6]);
                }
            }
            i += mr;
        }
    }

    fn mask8(cols: usize) -> __m256i {
        let lanes: [i32; 8] = std::array::from_fn(|j| if j < cols { -1 } else { 0 });
        // SAFETY: reading 8 i32 from a local array.
        unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
    }

    /// `P` eight-lane halves of one panel.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const MR: usize, const P: usize>(
        (data, rows, cols, k, bp, c, ldc, width): (
            *const f32,
            &[usize],
            *const usize,
            usize,
            *const f32,
            *mut f32,
            usize,
            usize,
        ),
    ) {
        let masks = masks256::<P>(width);
        // SAFETY (whole body): as in tile512, with one panel.
        unsafe {
            let mut acc = load256::<MR, P>(c, ldc, &masks);
            let a: [*const f32; MR] = std::array::from_fn(|r| data.add(rows[r]));
            for kk in 0..k {
                let col = *cols.add(kk);
                let v: [__m256; P] = std::array::from_fn(|q| _mm256_loadu_ps(bp.add(kk * NR + q * 8)));
                for r in 0..MR {
                    let av = _mm256_set1_ps(*a[r].add(col));
                    for q in 0..P {
                        acc[r][q] = _mm256_fmadd_ps(av, v[q], acc[r][q]);
                    }
                }
            }
            store256(c, ldc, &masks, &acc);
        }
    }

    /// AVX-512 for [`Runs`]: 8 rows × 32 columns per tile, the two vectors of `B` loaded straight
    /// from each run (masked past its end).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn runs_avx512(a: &[f32], lda: usize, m: usize, b: Runs<'_>, c: &mut [f32], ldc: usize) {
        let (ap, cp, bp) = (a.as_ptr(), c.as_mut_ptr(), b.data.as_ptr());
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(8);
            let mut j = 0;
            while j < b.len {
                let width = (b.len - j).min(2 * NR);
                // SAFETY: rows i..i+mr of A and C, columns j..j+width of C and of every run.
                unsafe {
                    let args = (
                        ap.add(i * lda),
                        lda,
                        b.starts,
                        bp.add(j),
                        cp.add(i * ldc + j),
                        ldc,
                        width,
                    );
                    by_rows!(mr, runs512, 2, args, [1 2 3 4 5 6 7 8]);
                }
                j += 2 * NR;
            }
            i += mr;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn runs512<const MR: usize, const P: usize>(
        (a, lda, starts, bp, c, ldc, width): (*const f32, usize, &[usize], *const f32, *mut f32, usize, usize),
    ) {
        let masks = masks512::<P>(width);
        // SAFETY (whole body): the caller guarantees MR rows of A (starts.len() wide) and of C
        // (width wide), and width values after bp + start for every start; masked loads and
        // stores touch only those.
        unsafe {
            let mut acc = load512::<MR, P>(c, ldc, &masks);
            for (kk, &start) in starts.iter().enumerate() {
                let run = bp.add(start);
                let v: [__m512; P] = std::array::from_fn(|q| _mm512_maskz_loadu_ps(masks[q], run.add(q * NR)));
                for r in 0..MR {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    for q in 0..P {
                        acc[r][q] = _mm512_fmadd_ps(av, v[q], acc[r][q]);
                    }
                }
            }
            store512(c, ldc, &masks, &acc);
        }
    }

    /// AVX2 + FMA for [`Runs`]: 6 rows × 16 columns per tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn runs_avx2(a: &[f32], lda: usize, m: usize, b: Runs<'_>, c: &mut [f32], ldc: usize) {
        let (ap, cp, bp) = (a.as_ptr(), c.as_mut_ptr(), b.data.as_ptr());
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(6);
            let mut j = 0;
            while j < b.len {
                let width = (b.len - j).min(NR);
                // SAFETY: as in runs_avx512.
                unsafe {
                    let args = (
                        ap.add(i * lda),
                        lda,
                        b.starts,
                        bp.add(j),
                        cp.add(i * ldc + j),
                        ldc,
                        width,
                    );
                    by_rows!(mr, runs256, 2, args, [1 2 3 4 5 6]);
                }
                j += NR;
            }
            i += mr;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn runs256<const MR: usize, const P: usize>(
        (a, lda, starts, bp, c, ldc, width): (*const f32, usize, &[usize], *const f32, *mut f32, usize, usize),
    ) {
        let masks = masks256::<P>(width);
        // SAFETY (whole body): as in runs512.
        unsafe {
            let mut acc = load256::<MR, P>(c, ldc, &masks);
            for (kk, &start) in starts.iter().enumerate() {
                let run = bp.add(start);
                let v: [__m256; P] = std::array::from_fn(|q| _mm256_maskload_ps(run.add(q * 8), masks[q]));
                for r in 0..MR {
                    let av = _mm256_set1_ps(*a.add(r * lda + kk));
                    for q in 0..P {
                        acc[r][q] = _mm256_fmadd_ps(av, v[q], acc[r][q]);
                    }
                }
            }
            store256(c, ldc, &masks, &acc);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::random::rng(seed);
        crate::random::uniform(&[len], -1.0, 1.0, &mut rng).to_vec()
    }

    proptest! {
        /// Every kernel the CPU has gives the scalar chain's bits, and those are within rounding
        /// of an f64 product.
        #[test]
        fn kernels_agree_bitwise_and_with_f64(m in 1usize..20, k in 1usize..40, n in 1usize..70, pad in 0usize..3, seed: u64) {
            let (lda, ldc) = (k + pad, n + pad);
            let a = data(m * lda, seed);
            let braw = data(k * n, seed ^ 1);
            let c0 = data(m * ldc, seed ^ 2);
            let b = PackedB::pack(&braw, k, n);
            let mut want = c0.clone();
            let (rows, cols): (Vec<usize>, Vec<usize>) = ((0..m).map(|i| i * lda).collect(), (0..k).collect());
            gemm_gather_on(Isa::Scalar, Gather { data: &a, rows: &rows, cols: &cols }, &b, &mut want, ldc);
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = f64::from(c0[i * ldc + j])
                        + (0..k).map(|kk| f64::from(a[i * lda + kk]) * f64::from(braw[kk * n + j])).sum::<f64>();
                    prop_assert!((f64::from(want[i * ldc + j]) - exact).abs() < 1e-4);
                }
                // the padding between rows is never written
                prop_assert_eq!(&want[i * ldc + n..i * ldc + ldc], &c0[i * ldc + n..i * ldc + ldc]);
            }
            let rows: Vec<usize> = (0..m).map(|i| i * lda).collect();
            let cols: Vec<usize> = (0..k).collect();
            for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()) {
                let mut got = c0.clone();
                gemm_gather_on(isa, Gather { data: &a, rows: &rows, cols: &cols }, &b, &mut got, ldc);
                prop_assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{isa:?} differs");
            }
        }
    }

    #[test]
    fn pack_t_packs_the_transpose() {
        let bt = data(5 * 21, 3); // [21, 5], so B = btᵀ is [5, 21]
        let b = PackedB::pack_t(&bt, 5, 21);
        let direct = PackedB::from_fn(5, 21, |kk, j| bt[j * 5 + kk]);
        assert_eq!(b.data, direct.data);
        assert_eq!(b.dims(), (5, 21));
    }

    proptest! {
        /// The run-reading kernels give the scalar chain's bits, and those are a plain product.
        #[test]
        fn runs_kernels_agree_bitwise(m in 1usize..12, k in 1usize..30, n in 1usize..70, seed: u64) {
            let runs = data(k * 3 + n + 5, seed);
            let starts: Vec<usize> = (0..k).map(|kk| (kk * 3 + seed as usize % 5) % (runs.len() - n + 1)).collect();
            let a = data(m * k, seed ^ 7);
            let c0 = data(m * n, seed ^ 8);
            let b = Runs { data: &runs, starts: &starts, len: n };
            let mut want = c0.clone();
            gemm_runs_on(Isa::Scalar, &a, k, m, b, &mut want, n);
            let bp = PackedB::from_fn(k, n, |kk, j| runs[starts[kk] + j]);
            let mut plain = c0.clone();
            gemm_packed(&a, k, m, &bp, &mut plain, n);
            prop_assert!(plain.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
            for isa in [Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()) {
                let mut got = c0.clone();
                gemm_runs_on(isa, &a, k, m, b, &mut got, n);
                prop_assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{isa:?} differs");
            }
        }
    }
}
