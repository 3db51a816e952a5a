//! Convolution and pooling kernels on NCHW tensors.
//!
//! Convolution is lowered to one sgemm over the whole batch: `im2col` lays every receptive field
//! out as a column of a `[C·KH·KW, N·OH·OW]` matrix, so `W[O, C·KH·KW] · cols` computes all
//! output pixels of all images at once (one large product instead of N small ones, which is
//! where BLAS is fast). `col2im` is its adjoint, used by the backward pass.

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

/// `[N, C, H, W] -> [C·KH·KW, N·OH·OW]`, zero where the window reaches into the padding.
pub fn im2col(x: &Tensor, win: &Window2d) -> Result<Tensor> {
    let [n, c, h, w] = dims4(x, "im2col")?;
    let (kh, kw) = win.kernel;
    let (oh, ow) = out_hw(win, h, w, "im2col")?;
    let l = oh * ow;
    let xs = x.as_slice();
    let mut cols = vec![0.0f32; c * kh * kw * n * l];
    let (s, p) = (win.stride as isize, win.padding as isize);
    // One row per (channel, ki, kj); rows are independent, so they fill in parallel.
    cols.par_chunks_mut((n * l).max(1)).enumerate().for_each(|(row, out)| {
        let (ch, ki, kj) = (row / (kh * kw), (row / kw) % kh, row % kw);
        for img in 0..n {
            let plane = &xs[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            for oy in 0..oh {
                let iy = oy as isize * s + ki as isize - p;
                let dst = &mut out[img * l + oy * ow..img * l + (oy + 1) * ow];
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                for (ox, d) in dst.iter_mut().enumerate() {
                    let ix = ox as isize * s + kj as isize - p;
                    if ix >= 0 && ix < w as isize {
                        *d = src[ix as usize];
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
    let (s, p) = (win.stride as isize, win.padding as isize);
    // Each image writes only its own slice of x: parallel over images, no races.
    x.par_chunks_mut((c * h * w).max(1)).enumerate().for_each(|(img, xi)| {
        for row in 0..c * kh * kw {
            let (ch, ki, kj) = (row / (kh * kw), (row / kw) % kh, row % kw);
            let src = &cs[row * n * l + img * l..row * n * l + (img + 1) * l];
            let plane = &mut xi[ch * h * w..(ch + 1) * h * w];
            for oy in 0..oh {
                let iy = oy as isize * s + ki as isize - p;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for ox in 0..ow {
                    let ix = ox as isize * s + kj as isize - p;
                    if ix >= 0 && ix < w as isize {
                        plane[iy as usize * w + ix as usize] += src[oy * ow + ox];
                    }
                }
            }
        }
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
    out.par_chunks_mut((oh * ow).max(1))
        .zip(arg.par_chunks_mut((oh * ow).max(1)))
        .enumerate()
        .for_each(|(plane, (o, a))| {
            let base = plane * h * w;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best = f32::NEG_INFINITY;
                    let mut best_i = usize::MAX;
                    for ki in 0..win.kernel.0 {
                        let iy = (oy * win.stride + ki) as isize - win.padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kj in 0..win.kernel.1 {
                            let ix = (ox * win.stride + kj) as isize - win.padding as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let i = base + iy as usize * w + ix as usize;
                            if xs[i] > best || best_i == usize::MAX {
                                best = xs[i];
                                best_i = i;
                            }
                        }
                    }
                    o[oy * ow + ox] = best;
                    a[oy * ow + ox] = best_i as u32;
                }
            }
        });
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
