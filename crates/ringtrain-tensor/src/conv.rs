//! Window geometry, im2col/col2im and pooling on NCHW tensors.
//!
//! `im2col` lays every receptive field out as a column of a `[C·KH·KW, N·OH·OW]` matrix, so
//! `W[O, C·KH·KW] · cols` computes all output pixels of all images in one sgemm; `col2im` is
//! its adjoint. [`crate::conv2d`] lowers strided convolutions this way (stride 1 runs direct)
//! and average pooling uses it too.

use rayon::prelude::*;

use crate::{Result, Tensor, TensorError};

/// Geometry of a 2-D sliding window (convolution or pooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window2d {
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: usize,
}

impl Window2d {
    /// Output size along one axis: ⌊(input + 2·padding − kernel) / stride⌋ + 1, or `None` when
    /// the kernel does not fit in the padded input.
    pub fn out_len(&self, input: usize, kernel: usize) -> Option<usize> {
        let padded = input + 2 * self.padding;
        (kernel <= padded && self.stride > 0).then(|| (padded - kernel) / self.stride + 1)
    }

    /// `(OH, OW)` for an `(H, W)` input.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        Some((self.out_len(h, self.kernel.0)?, self.out_len(w, self.kernel.1)?))
    }
}

/// The output positions `o` whose input position `o·stride + k − padding` lies in `0..len`,
/// as a range: inner loops then run branch-free over it.
fn valid_range(out_len: usize, len: usize, k: usize, stride: usize, padding: usize) -> std::ops::Range<usize> {
    // first o with o·s + k ≥ p
    let lo = if k >= padding {
        0
    } else {
        (padding - k).div_ceil(stride)
    };
    // last o with o·s + k − p ≤ len − 1
    let hi = if len + padding <= k {
        0
    } else {
        ((len - 1 + padding - k) / stride + 1).min(out_len)
    };
    lo.min(hi)..hi
}

fn dims4(t: &Tensor, op: &'static str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t.shape()).map_err(|_| TensorError::Invalid {
        op,
        reason: format!("expected an NCHW tensor, got shape {:?}", t.shape()),
    })
}

fn out_hw(win: &Window2d, h: usize, w: usize, op: &'static str) -> Result<(usize, usize)> {
    win.output_hw(h, w).ok_or_else(|| TensorError::Invalid {
        op,
        reason: format!(
            "kernel {:?} does not fit input {h}x{w} with padding {} (stride {})",
            win.kernel, win.padding, win.stride
        ),
    })
}

/// Runs `f(i, piece)` over the `chunk`-sized pieces of `out`, on rayon only when the pool has
/// more than one thread: with one thread, a hand-off to its worker only adds latency.
pub(crate) fn for_each_chunk(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let chunk = chunk.max(1);
    if rayon::current_num_threads() > 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, piece)| f(i, piece));
    } else {
        out.chunks_mut(chunk).enumerate().for_each(|(i, piece)| f(i, piece));
    }
}

/// `[N, C, H, W] -> [C·KH·KW, N·OH·OW]`, zero where the window reaches into the padding.
pub fn im2col(x: &Tensor, win: &Window2d) -> Result<Tensor> {
    let [n, c, h, w] = dims4(x, "im2col")?;
    let (kh, kw) = win.kernel;
    let (oh, ow) = out_hw(win, h, w, "im2col")?;
    let l = oh * ow;
    let xs = x.as_slice();
    let mut cols = vec![0.0f32; c * kh * kw * n * l];
    let st = win.stride;
    // One row per (channel, ki, kj); rows are independent, so they fill in parallel.
    for_each_chunk(&mut cols, n * l, |row, out| {
        let (ch, ki, kj) = (row / (kh * kw), (row / kw) % kh, row % kw);
        let ys = valid_range(oh, h, ki, st, win.padding);
        let xs_range = valid_range(ow, w, kj, st, win.padding);
        for img in 0..n {
            let plane = &xs[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            for oy in ys.clone() {
                let iy = oy * st + ki - win.padding;
                let dst = &mut out[img * l + oy * ow..img * l + (oy + 1) * ow];
                let src = &plane[iy * w..(iy + 1) * w];
                let x0 = xs_range.start * st + kj - win.padding;
                if st == 1 {
                    dst[xs_range.clone()].copy_from_slice(&src[x0..x0 + xs_range.len()]);
                } else {
                    for (d, &v) in dst[xs_range.clone()].iter_mut().zip(src[x0..].iter().step_by(st)) {
                        *d = v;
                    }
                }
            }
        }
    });
    Tensor::from_vec(&[c * kh * kw, n * l], cols)
}

/// The adjoint of [`im2col`]: sums each column entry back into the input pixel it came from.
pub fn col2im(cols: &Tensor, shape: [usize; 4], win: &Window2d) -> Result<Tensor> {
    let [n, c, h, w] = shape;
    let (kh, kw) = win.kernel;
    let (oh, ow) = out_hw(win, h, w, "col2im")?;
    let l = oh * ow;
    if cols.shape() != [c * kh * kw, n * l] {
        return Err(TensorError::Shape {
            op: "col2im",
            lhs: cols.shape().to_vec(),
            rhs: vec![c * kh * kw, n * l],
        });
    }
    let cs = cols.as_slice();
    let mut x = vec![0.0f32; n * c * h * w];
    let (st, p) = (win.stride, win.padding);
    // Each row's window geometry, computed once rather than once per image.
    let rows: Vec<_> = (0..c * kh * kw)
        .map(|row| {
            let (ch, ki, kj) = (row / (kh * kw), (row / kw) % kh, row % kw);
            let ys = valid_range(oh, h, ki, st, p);
            let xs = valid_range(ow, w, kj, st, p);
            // first valid input column of the window; rows iy = oy·st + ki − p for oy in ys
            (
                ys.clone(),
                xs.clone(),
                ch * h * w,
                ki,
                (xs.start * st + kj).saturating_sub(p),
            )
        })
        .collect();
    // Each image writes only its own slice of x: parallel over images, no races.
    for_each_chunk(&mut x, c * h * w, |img, xi| {
        crate::simd::fast(
            #[inline(always)]
            || {
                for (row, (ys, xs, plane, ki, ix0)) in rows.iter().enumerate() {
                    let src = &cs[row * n * l + img * l..][..l];
                    let len = xs.len();
                    for oy in ys.clone() {
                        let from = &src[oy * ow + xs.start..][..len];
                        let d0 = plane + (oy * st + ki - p) * w + ix0;
                        if st == 1 {
                            // contiguous on both sides: the compiler vectorises this add
                            for (d, &v) in xi[d0..d0 + len].iter_mut().zip(from) {
                                *d += v;
                            }
                        } else {
                            for (d, &v) in xi[d0..].iter_mut().step_by(st).zip(from) {
                                *d += v;
                            }
                        }
                    }
                }
            },
        )
    });
    Tensor::from_vec(&shape, x)
}

/// Max pooling; also returns, for each output, the flat index of its arg-max in the input
/// (first maximum on ties), which routes the gradient in the backward pass.
pub fn max_pool2d(x: &Tensor, win: &Window2d) -> Result<(Tensor, Vec<u32>)> {
    let [n, c, h, w] = dims4(x, "max_pool2d")?;
    let (oh, ow) = out_hw(win, h, w, "max_pool2d")?;
    if n * c * h * w > u32::MAX as usize {
        return Err(TensorError::Invalid {
            op: "max_pool2d",
            reason: "input too large for 32-bit arg-max indices".into(),
        });
    }
    let xs = x.as_slice();
    let mut out = vec![0.0f32; n * c * oh * ow];
    let mut arg = vec![0u32; n * c * oh * ow];
    let pool_plane = |plane: usize, o: &mut [f32], a: &mut [u32]| {
        let base = plane * h * w;
        let (st, p) = (win.stride, win.padding);
        if win.kernel == (2, 2) && st == 2 && p == 0 {
            // LeNet's and most CNNs' pooling: two input rows give one output row.
            for oy in 0..oh {
                let r0 = base + 2 * oy * w;
                let r1 = r0 + w;
                for ox in 0..ow {
                    let i = 2 * ox;
                    let (mut best, mut best_i) = (xs[r0 + i], r0 + i);
                    for j in [r0 + i + 1, r1 + i, r1 + i + 1] {
                        if xs[j] > best {
                            best = xs[j];
                            best_i = j;
                        }
                    }
                    o[oy * ow + ox] = best;
                    a[oy * ow + ox] = best_i as u32;
                }
            }
            return;
        }
        for oy in 0..oh {
            let y_lo = (oy * st).saturating_sub(p);
            let y_hi = (oy * st + win.kernel.0).saturating_sub(p).min(h);
            for ox in 0..ow {
                let x_lo = (ox * st).saturating_sub(p);
                let x_hi = (ox * st + win.kernel.1).saturating_sub(p).min(w);
                let mut best = f32::NEG_INFINITY;
                let mut best_i = base + y_lo * w + x_lo;
                for iy in y_lo..y_hi {
                    let row = base + iy * w;
                    for (ix, &v) in xs[row + x_lo..row + x_hi].iter().enumerate() {
                        if v > best {
                            best = v;
                            best_i = row + x_lo + ix;
                        }
                    }
                }
                o[oy * ow + ox] = best;
                a[oy * ow + ox] = best_i as u32;
            }
        }
    };
    let plane_len = (oh * ow).max(1);
    if rayon::current_num_threads() > 1 {
        out.par_chunks_mut(plane_len)
            .zip(arg.par_chunks_mut(plane_len))
            .enumerate()
            .for_each(|(i, (o, a))| pool_plane(i, o, a));
    } else {
        for (i, (o, a)) in out.chunks_mut(plane_len).zip(arg.chunks_mut(plane_len)).enumerate() {
            pool_plane(i, o, a);
        }
    }
    Ok((Tensor::from_vec(&[n, c, oh, ow], out)?, arg))
}

/// Average pooling over windows inside the input (padding counts as zeros, divisor is the full
/// window as in PyTorch's default `count_include_pad=True`).
pub fn avg_pool2d(x: &Tensor, win: &Window2d) -> Result<Tensor> {
    let [n, c, h, w] = dims4(x, "avg_pool2d")?;
    let (oh, ow) = out_hw(win, h, w, "avg_pool2d")?;
    let cols = im2col(&x.reshape(&[n * c, 1, h, w])?, win)?;
    // cols: [KH·KW, N·C·OH·OW]; the mean over rows is the pooled value.
    let mean = cols.mean_axis(0, false)?;
    mean.reshape(&[n, c, oh, ow])
}

/// The adjoint of [`avg_pool2d`].
pub fn avg_pool2d_backward(g: &Tensor, shape: [usize; 4], win: &Window2d) -> Result<Tensor> {
    let [n, c, h, w] = shape;
    let k = win.kernel.0 * win.kernel.1;
    let flat = g.reshape(&[1, g.len()])?.scale(1.0 / k as f32);
    let cols = Tensor::zeros(&[k, g.len()]).add(&flat)?;
    col2im(&cols, [n * c, 1, h, w], win)?.reshape(&shape)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::random;

    /// Direct 7-loop convolution, the reference for the im2col + sgemm path.
    fn naive_conv(x: &Tensor, wt: &Tensor, win: &Window2d) -> Vec<f32> {
        let [n, c, h, w] = dims4(x, "").unwrap();
        let [o, _, kh, kw] = dims4(wt, "").unwrap();
        let (oh, ow) = win.output_hw(h, w).unwrap();
        let (xs, ws) = (x.as_slice(), wt.as_slice());
        let mut out = vec![0.0f32; n * o * oh * ow];
        for b in 0..n {
            for oc in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = 0.0f64;
                        for ic in 0..c {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let iy = (oy * win.stride + ki) as isize - win.padding as isize;
                                    let ix = (ox * win.stride + kj) as isize - win.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        acc += f64::from(xs[((b * c + ic) * h + iy as usize) * w + ix as usize])
                                            * f64::from(ws[((oc * c + ic) * kh + ki) * kw + kj]);
                                    }
                                }
                            }
                        }
                        out[((b * o + oc) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn im2col_gemm_equals_direct_convolution() {
        for (stride, padding, k) in [(1, 0, 3), (2, 1, 3), (1, 2, 5), (3, 0, 2)] {
            let mut rng = random::rng(stride as u64 * 10 + padding as u64);
            let x = random::uniform(&[2, 3, 9, 8], -1.0, 1.0, &mut rng);
            let wt = random::uniform(&[4, 3, k, k], -1.0, 1.0, &mut rng);
            let win = Window2d {
                kernel: (k, k),
                stride,
                padding,
            };
            let cols = im2col(&x, &win).unwrap();
            let prod = wt.reshape(&[4, 3 * k * k]).unwrap().matmul(&cols).unwrap();
            let (oh, ow) = win.output_hw(9, 8).unwrap();
            let y = prod.reshape(&[4, 2, oh, ow]).unwrap().permute(&[1, 0, 2, 3]).unwrap();
            for (a, b) in y.as_slice().iter().zip(naive_conv(&x, &wt, &win)) {
                assert!((a - b).abs() < 1e-4, "stride {stride} padding {padding}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn im2col_is_the_same_on_one_thread_and_on_several() {
        // for_each_chunk's two paths: in turn on one thread, on rayon with several
        let pool = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (stride, padding, k) in [(1, 0, 3), (2, 1, 3), (1, 2, 5), (3, 0, 2), (1, 3, 2)] {
            let x = random::uniform(&[3, 2, 7, 6], -1.0, 1.0, &mut random::rng(k as u64));
            let win = Window2d {
                kernel: (k, k),
                stride,
                padding,
            };
            let one = pool(1).install(|| im2col(&x, &win).unwrap());
            let two = pool(2).install(|| im2col(&x, &win).unwrap());
            assert_eq!(one, two, "stride {stride} padding {padding} kernel {k}");
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), c> == <x, col2im(c)> for random x, c
        let mut rng = random::rng(5);
        let win = Window2d {
            kernel: (3, 2),
            stride: 2,
            padding: 1,
        };
        let x = random::uniform(&[2, 2, 5, 6], -1.0, 1.0, &mut rng);
        let cols = im2col(&x, &win).unwrap();
        let c = random::uniform(cols.shape(), -1.0, 1.0, &mut rng);
        let lhs: f32 = cols.mul(&c).unwrap().sum_all();
        let rhs: f32 = x.mul(&col2im(&c, [2, 2, 5, 6], &win).unwrap()).unwrap().sum_all();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }

    #[test]
    fn valid_range_matches_brute_force() {
        for out_len in 0..8 {
            for len in 1..8 {
                for k in 0..5 {
                    for stride in 1..4 {
                        for padding in 0..4 {
                            let want: Vec<usize> = (0..out_len)
                                .filter(|&o| {
                                    let i = (o * stride + k) as isize - padding as isize;
                                    i >= 0 && i < len as isize
                                })
                                .collect();
                            let got: Vec<usize> = valid_range(out_len, len, k, stride, padding).collect();
                            assert_eq!(got, want, "out {out_len} len {len} k {k} s {stride} p {padding}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pooling_values() {
        let x = Tensor::from_vec(&[1, 1, 2, 4], vec![1., 5., 2., 0., 3., 4., 8., 7.]).unwrap();
        let win = Window2d {
            kernel: (2, 2),
            stride: 2,
            padding: 0,
        };
        let (m, arg) = max_pool2d(&x, &win).unwrap();
        assert_eq!(m.to_vec(), vec![5., 8.]);
        assert_eq!(arg, vec![1, 6]);
        assert_eq!(avg_pool2d(&x, &win).unwrap().to_vec(), vec![3.25, 4.25]);
    }

    #[test]
    fn max_pool_equals_a_brute_force_reference() {
        // 2×2/2 takes the specialised path; the others the general one. Odd sizes leave a
        // border row/column out, as PyTorch does.
        for (k, stride, padding, h, w) in [(2, 2, 0, 7, 6), (2, 2, 0, 4, 4), (3, 2, 1, 7, 5), (3, 1, 0, 5, 6)] {
            let win = Window2d {
                kernel: (k, k),
                stride,
                padding,
            };
            let mut rng = random::rng(k as u64 + h as u64);
            // a coarse grid of values makes ties common: the first maximum must win
            let x = random::uniform(&[2, 3, h, w], 0.0, 4.0, &mut rng).map(f32::floor);
            let (y, arg) = max_pool2d(&x, &win).unwrap();
            let (oh, ow) = win.output_hw(h, w).unwrap();
            let xs = x.as_slice();
            for plane in 0..6 {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut best = (f32::NEG_INFINITY, 0);
                        for i in 0..k {
                            for j in 0..k {
                                let (iy, ix) = (
                                    (oy * stride + i) as isize - padding as isize,
                                    (ox * stride + j) as isize - padding as isize,
                                );
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    let at = plane * h * w + iy as usize * w + ix as usize;
                                    if xs[at] > best.0 {
                                        best = (xs[at], at);
                                    }
                                }
                            }
                        }
                        let o = (plane * oh + oy) * ow + ox;
                        assert_eq!(
                            (y.as_slice()[o], arg[o] as usize),
                            best,
                            "k {k} s {stride} p {padding} at {o}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn window_that_does_not_fit_is_an_error() {
        let win = Window2d {
            kernel: (7, 7),
            stride: 1,
            padding: 0,
        };
        assert_eq!(win.output_hw(5, 5), None);
        assert!(im2col(&Tensor::zeros(&[1, 1, 5, 5]), &win).is_err());
        // output size formula: floor((2P + input - K) / S) + 1
        let w = Window2d {
            kernel: (5, 5),
            stride: 2,
            padding: 2,
        };
        assert_eq!(w.output_hw(28, 27), Some((14, 14)));
    }
}
