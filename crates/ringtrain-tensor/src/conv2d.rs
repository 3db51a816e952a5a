//! 2-D convolution forward and backward on NCHW tensors.
//!
//! Stride 1 (LeNet's, resnet_mini's and most CNNs' convolutions) runs direct: each image's
//! product reads its windows in place through the offset tables of [`crate::gemm::Gather`]
//! (`rows` = an output pixel's top-left input position, `cols` = a kernel tap's offset), against
//! the kernel packed once per call, with no `[C·KH·KW, N·OH·OW]` im2col matrix to fill, write
//! and read back. The input gradient is the same kind of product (the output gradient, padded,
//! against the flipped kernel) and the weight gradient one more, with rows and columns swapped.
//! Other strides lower to im2col and one sgemm over the whole batch.
//!
//! The direct products give the same bits on every CPU ([`crate::gemm`]) and for any number of
//! threads: images run in parallel for the output and the input gradient, and the weight
//! gradient is split by its rows, each summed over the images in order.

use crate::conv::{col2im, for_each_chunk, im2col, Window2d};
use crate::gemm::{gemm_gather, gemm_runs, Gather, PackedB, Runs};
use crate::{Result, Tensor, TensorError};

fn invalid(reason: String) -> TensorError {
    TensorError::Invalid { op: "conv2d", reason }
}

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
}

impl Dims {
    fn of(x: &[usize], w: &[usize], win: &Window2d) -> Result<Dims> {
        let (&[n, c, h, wd], &[o, wc, kh, kw]) = (x, w) else {
            return Err(invalid(format!(
                "need x [N,C,H,W] and w [O,C,KH,KW], got {x:?} and {w:?}"
            )));
        };
        if c != wc || win.kernel != (kh, kw) {
            return Err(invalid(format!(
                "input {x:?} and kernel {w:?} do not fit (window {win:?})"
            )));
        }
        let (oh, ow) = win.output_hw(h, wd).ok_or_else(|| {
            invalid(format!(
                "kernel {kh}x{kw} does not fit input {h}x{wd} with padding {} (stride {})",
                win.padding, win.stride
            ))
        })?;
        Ok(Dims {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            oh,
            ow,
        })
    }

    fn taps(&self) -> usize {
        self.c * self.kh * self.kw
    }
}

/// Whether `win` runs on the direct kernels: stride 1, and padding smaller than the kernel (so
/// the input gradient's padding `K − 1 − p` is not negative).
fn direct(win: &Window2d) -> bool {
    win.stride == 1 && win.padding < win.kernel.0.min(win.kernel.1)
}

/// `planes` planes of `h × w` with `ph` zero rows above and below and `pw` zero columns left and
/// right; `src` itself when there is no padding.
fn padded(src: &[f32], planes: usize, (h, w): (usize, usize), (ph, pw): (usize, usize)) -> std::borrow::Cow<'_, [f32]> {
    if ph == 0 && pw == 0 {
        return std::borrow::Cow::Borrowed(src);
    }
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let mut out = vec![0.0f32; planes * hp * wp];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(hp * wp)) {
        for (row, line) in plane.chunks_exact(w).enumerate() {
            dst[(row + ph) * wp + pw..][..w].copy_from_slice(line);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The offsets of an `oh × ow` grid's positions in a plane `wp` wide.
fn grid(oh: usize, ow: usize, wp: usize) -> Vec<usize> {
    (0..oh).flat_map(|y| (0..ow).map(move |x| y * wp + x)).collect()
}

/// The offsets of a `planes × kh × kw` window's taps in planes of `hp × wp`.
fn window(planes: usize, (kh, kw): (usize, usize), (hp, wp): (usize, usize)) -> Vec<usize> {
    (0..planes)
        .flat_map(|ch| (0..kh).flat_map(move |i| (0..kw).map(move |j| ch * hp * wp + i * wp + j)))
        .collect()
}

/// From planes of `span` positions counted across a padded width `wp`, the first `w` of each
/// row, into `dst`'s planes of whole rows.
fn keep_rows(src: &[f32], span: usize, wp: usize, w: usize, dst: &mut [f32]) {
    let plane = dst.len() / (src.len() / span).max(1);
    for (out, wide) in dst.chunks_exact_mut(plane).zip(src.chunks_exact(span)) {
        for (row, line) in out.chunks_exact_mut(w).enumerate() {
            line.copy_from_slice(&wide[row * wp..][..w]);
        }
    }
}

/// `dst[j][i] = src[i][j]` for `src: [rows, cols]`.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for (i, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            dst[j * rows + i] = v;
        }
    }
}

/// `y = x ⋆ w + b`: `x: [N, C, H, W]`, `w: [O, C, KH, KW]`, `b: [O]` → `[N, O, OH, OW]`. Also
/// returns what [`conv2d_backward`] needs besides the inputs: the im2col matrix, when this window
/// lowers to one.
pub fn conv2d_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: &Window2d) -> Result<(Tensor, Option<Tensor>)> {
    let d = Dims::of(x.shape(), w.shape(), win)?;
    if let Some(b) = b.filter(|b| b.shape() != [d.o]) {
        return Err(invalid(format!("bias must be [{}], got {:?}", d.o, b.shape())));
    }
    let bias = b.map_or_else(|| vec![0.0; d.o], Tensor::to_vec);
    let l = d.oh * d.ow;
    if !direct(win) {
        let cols = im2col(x, win)?;
        // [O, CKK] · [CKK, N·L] = [O, N·L], then one pass to [N, O, OH, OW] adding the bias.
        let prod = w.reshape(&[d.o, d.taps()])?.matmul(&cols)?;
        let ps = prod.as_slice();
        let mut y = Vec::with_capacity(d.n * d.o * l);
        for img in 0..d.n {
            for (ch, &bv) in bias.iter().enumerate() {
                y.extend(ps[(ch * d.n + img) * l..][..l].iter().map(|&v| v + bv));
            }
        }
        return Ok((Tensor::from_vec(&[d.n, d.o, d.oh, d.ow], y)?, Some(cols)));
    }
    let p = win.padding;
    let (hp, wp) = (d.h + 2 * p, d.w + 2 * p);
    let taps = window(d.c, (d.kh, d.kw), (hp, wp));
    let xs = x.as_slice();
    let image = |img: usize| padded(&xs[img * d.c * d.h * d.w..][..d.c * d.h * d.w], d.c, (d.h, d.w), (p, p));
    let mut y = vec![0.0f32; d.n * d.o * l];
    // The vector lanes run over the output channels or over the positions of a row, whichever
    // fills more of them (LeNet's first convolution has 6 channels but rows 28 wide of 32).
    let lanes_on_channels = d.o as f32 / (16 * d.o.div_ceil(16)) as f32;
    if lanes_on_channels >= d.ow as f32 / wp as f32 {
        let pixels = grid(d.oh, d.ow, wp);
        let wt = PackedB::pack_t(w.as_slice(), d.taps(), d.o); // wᵀ: [CKK, O]
        for_each_chunk(&mut y, d.o * l, |img, yi| {
            let xi = image(img);
            // yᵀ for this image, [L, O], starting from the bias
            let mut yt = Vec::with_capacity(l * d.o);
            for _ in 0..l {
                yt.extend_from_slice(&bias);
            }
            let a = Gather {
                data: &xi,
                rows: &pixels,
                cols: &taps,
            };
            gemm_gather(a, &wt, &mut yt, d.o);
            transpose_into(&yt, l, d.o, yi);
        });
    } else {
        // positions counted across the padded width, up to the last kept one
        let span = (d.oh - 1) * wp + d.ow;
        for_each_chunk(&mut y, d.o * l, |img, yi| {
            let xi = image(img);
            let mut wide = Vec::with_capacity(d.o * span);
            for &b in &bias {
                wide.resize(wide.len() + span, b);
            }
            let runs = Runs {
                data: &xi,
                starts: &taps,
                len: span,
            };
            gemm_runs(w.as_slice(), d.taps(), d.o, runs, &mut wide, span);
            keep_rows(&wide, span, wp, d.ow, yi);
        });
    }
    Ok((Tensor::from_vec(&[d.n, d.o, d.oh, d.ow], y)?, None))
}

/// Gradients of [`conv2d_forward`] for the parts asked for by `need` (`x`, `w`, `b`), given the
/// output's gradient `g` and the forward's `cols`.
pub fn conv2d_backward(
    g: &Tensor,
    x: &Tensor,
    w: &Tensor,
    cols: Option<&Tensor>,
    win: &Window2d,
    need: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let d = Dims::of(x.shape(), w.shape(), win)?;
    let l = d.oh * d.ow;
    if g.shape() != [d.n, d.o, d.oh, d.ow] {
        return Err(invalid(format!(
            "gradient {:?} is not the output's shape [{}, {}, {}, {}]",
            g.shape(),
            d.n,
            d.o,
            d.oh,
            d.ow
        )));
    }
    let gs = g.as_slice();
    let db = need[2].then(|| {
        // each channel's sum over images, then positions, in order; the channels' chains
        // interleaved, as one chain at a time waited on every add's latency
        let mut sums = vec![0.0f32; d.o];
        for gi in gs.chunks_exact((d.o * l).max(1)) {
            for pos in 0..l {
                for (ch, s) in sums.iter_mut().enumerate() {
                    *s += gi[ch * l + pos];
                }
            }
        }
        Tensor::from_vec(&[d.o], sums)
    });
    let db = db.transpose()?;
    let (dx, dw) = match (direct(win), cols) {
        (true, _) => (
            need[0].then(|| input_grad(gs, w.as_slice(), d, win)).transpose()?,
            need[1].then(|| weight_grad(gs, x.as_slice(), d, win)).transpose()?,
        ),
        (false, Some(cols)) => {
            // g: [N, O, OH, OW] → [O, N·L], the layout of the forward product.
            let mut gmv = Vec::with_capacity(g.len());
            for ch in 0..d.o {
                for img in 0..d.n {
                    gmv.extend_from_slice(&gs[(img * d.o + ch) * l..][..l]);
                }
            }
            let gm = Tensor::from_vec(&[d.o, d.n * l], gmv)?;
            let dw = need[1]
                .then(|| gm.matmul_t(cols, false, true)?.reshape(w.shape()))
                .transpose()?;
            // The first layer's input needs no gradient: no dcols product, no col2im.
            let dx = need[0]
                .then(|| {
                    let dcols = w.reshape(&[d.o, d.taps()])?.matmul_t(&gm, true, false)?;
                    col2im(&dcols, [d.n, d.c, d.h, d.w], win)
                })
                .transpose()?;
            (dx, dw)
        }
        (false, None) => {
            return Err(invalid(
                "backward needs the forward's im2col matrix for this stride".into(),
            ))
        }
    };
    Ok([dx, dw, db])
}

/// `dx`: the output gradient, padded by `K − 1 − p`, correlated with the kernel flipped in both
/// axes and with its channel axes swapped. The input channels are the rows of the product and the
/// positions its columns, counted across the padded width (`gw`, of which the first `W` of each
/// row are kept): one kernel tap then reads one contiguous run of the padded gradient.
fn input_grad(gs: &[f32], ws: &[f32], d: Dims, win: &Window2d) -> Result<Tensor> {
    let (qh, qw) = (d.kh - 1 - win.padding, d.kw - 1 - win.padding);
    let (gh, gw) = (d.oh + 2 * qh, d.ow + 2 * qw);
    let taps = window(d.o, (d.kh, d.kw), (gh, gw));
    let (kk, hw, l) = (d.kh * d.kw, d.h * d.w, d.oh * d.ow);
    // flipped[ch][(o, a, b)] = w[o, ch, KH−1−a, KW−1−b]
    let flipped: Vec<f32> = (0..d.c)
        .flat_map(|ch| {
            (0..d.o * kk).map(move |k| {
                let (oc, a, b) = (k / kk, (k / d.kw) % d.kh, k % d.kw);
                ws[((oc * d.c + ch) * d.kh + d.kh - 1 - a) * d.kw + d.kw - 1 - b]
            })
        })
        .collect();
    // positions up to the last kept one; the last row's padding columns would run past the end
    let span = (d.h - 1) * gw + d.w;
    let mut dx = vec![0.0f32; d.n * d.c * hw];
    for_each_chunk(&mut dx, d.c * hw, |img, dxi| {
        let gi = padded(&gs[img * d.o * l..][..d.o * l], d.o, (d.oh, d.ow), (qh, qw));
        let mut wide = vec![0.0f32; d.c * span];
        let runs = Runs {
            data: &gi,
            starts: &taps,
            len: span,
        };
        gemm_runs(&flipped, d.o * kk, d.c, runs, &mut wide, span);
        keep_rows(&wide, span, gw, d.w, dxi);
    });
    Tensor::from_vec(&[d.n, d.c, d.h, d.w], dx)
}

/// `dw`: `dwᵀ [C·KH·KW, O] = Σ_images windowsᵀ · gᵀ`, the forward's offset tables swapped.
fn weight_grad(gs: &[f32], xs: &[f32], d: Dims, win: &Window2d) -> Result<Tensor> {
    let p = win.padding;
    let (hp, wp) = (d.h + 2 * p, d.w + 2 * p);
    let (pixels, taps) = (grid(d.oh, d.ow, wp), window(d.c, (d.kh, d.kw), (hp, wp)));
    let (l, ckk) = (d.oh * d.ow, d.taps());
    // every image's padded input and packed gradient, prepared in parallel
    let prepare = |img: usize| {
        (
            padded(&xs[img * d.c * d.h * d.w..][..d.c * d.h * d.w], d.c, (d.h, d.w), (p, p)),
            PackedB::pack_t(&gs[img * d.o * l..][..d.o * l], l, d.o),
        )
    };
    let (images, grads): (Vec<_>, Vec<_>) = if rayon::current_num_threads() > 1 {
        use rayon::prelude::*;
        (0..d.n).into_par_iter().map(prepare).unzip()
    } else {
        (0..d.n).map(prepare).unzip()
    };
    let mut dwt = vec![0.0f32; ckk * d.o];
    // Split by rows of dwᵀ, each summed over every image in order: the same bits for any split.
    let rows_per = ckk.div_ceil(rayon::current_num_threads()).max(1);
    for_each_chunk(&mut dwt, rows_per * d.o, |part, out| {
        let rows = &taps[part * rows_per..][..out.len() / d.o];
        for (xi, gi) in images.iter().zip(&grads) {
            let a = Gather {
                data: xi,
                rows,
                cols: &pixels,
            };
            gemm_gather(a, gi, out, d.o);
        }
    });
    let mut dw = vec![0.0f32; d.o * ckk];
    transpose_into(&dwt, ckk, d.o, &mut dw);
    Tensor::from_vec(&[d.o, d.c, d.kh, d.kw], dw)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::random;

    /// `y[b, o, oy, ox] = bias[o] + Σ x[b, c, oy·s + i − p, ox·s + j − p] · w[o, c, i, j]` in f64.
    fn naive(x: &Tensor, w: &Tensor, bias: &[f32], win: &Window2d) -> Vec<f32> {
        let d = Dims::of(x.shape(), w.shape(), win).unwrap();
        let (xs, ws, p) = (x.as_slice(), w.as_slice(), win.padding as isize);
        let mut out = Vec::new();
        for b in 0..d.n {
            for o in 0..d.o {
                for oy in 0..d.oh {
                    for ox in 0..d.ow {
                        let mut acc = f64::from(bias[o]);
                        for (c, i, j) in
                            (0..d.c).flat_map(|c| (0..d.kh).flat_map(move |i| (0..d.kw).map(move |j| (c, i, j))))
                        {
                            let iy = (oy * win.stride + i) as isize - p;
                            let ix = (ox * win.stride + j) as isize - p;
                            if (0..d.h as isize).contains(&iy) && (0..d.w as isize).contains(&ix) {
                                acc += f64::from(xs[((b * d.c + c) * d.h + iy as usize) * d.w + ix as usize])
                                    * f64::from(ws[((o * d.c + c) * d.kh + i) * d.kw + j]);
                            }
                        }
                        out.push(acc as f32);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn direct_and_lowered_match_the_definition() {
        let mut rng = random::rng(7);
        // LeNet's two convolutions, a padded 3x3, stride 2 (im2col) and padding ≥ kernel (im2col)
        for (n, c, h, o, k, stride, padding) in [
            (2, 1, 12, 6, 5, 1, 2),
            (3, 6, 14, 16, 5, 1, 0),
            (2, 3, 7, 5, 3, 1, 1),
            (2, 2, 9, 3, 3, 2, 1),
            (1, 2, 5, 2, 2, 1, 2),
        ] {
            let win = Window2d {
                kernel: (k, k),
                stride,
                padding,
            };
            let x = random::uniform(&[n, c, h, h + 1], -1.0, 1.0, &mut rng);
            let w = random::uniform(&[o, c, k, k], -1.0, 1.0, &mut rng);
            let b = random::uniform(&[o], -1.0, 1.0, &mut rng);
            let (y, cols) = conv2d_forward(&x, &w, Some(&b), &win).unwrap();
            assert_eq!(cols.is_none(), direct(&win));
            for (got, want) in y.as_slice().iter().zip(naive(&x, &w, b.as_slice(), &win)) {
                assert!((got - want).abs() < 1e-4, "{win:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn gradients_have_the_same_bits_on_one_thread_and_two() {
        let mut rng = random::rng(3);
        let x = random::uniform(&[5, 6, 14, 14], -1.0, 1.0, &mut rng);
        let w = random::uniform(&[16, 6, 5, 5], -1.0, 1.0, &mut rng);
        let g = random::uniform(&[5, 16, 10, 10], -1.0, 1.0, &mut rng);
        let win = Window2d {
            kernel: (5, 5),
            stride: 1,
            padding: 0,
        };
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| conv2d_backward(&g, &x, &w, None, &win, [true; 3]).unwrap())
        };
        let (one, two) = (run(1), run(2));
        for (a, b) in one.iter().zip(&two) {
            assert_eq!(a.as_ref().unwrap().as_slice(), b.as_ref().unwrap().as_slice());
        }
    }
}
