//! A whole LSTM layer direction as one kernel: forward over every time step, and
//! backpropagation through time.
//!
//! Recorded op by op, one step of the cell is about twenty tape nodes, each allocating its
//! `[B, H]` or `[B, 4H]` output, and the recurrent weight's gradient is T small products with
//! an inner dimension of B. Here `W_hh` is packed once per pass ([`PackedB`]), one step is one
//! product against it into the tape plus one fused pass over the gates, and the weight
//! gradient is a single product over all B·T rows at the end (cuDNN and PyTorch's CPU kernel
//! do the same).
//!
//! The input projection of every step is one product too, written straight into the tape over
//! both biases: a separate `x·W_ihᵀ + b_ih` tensor cost a 4 MB copy into the tape and a pass
//! adding `b_hh` in the sentiment LSTM's step, and its bias gradient a second sum over the
//! gates' gradients, equal to `b_hh`'s.
//!
//! Layout and gate order follow PyTorch (`weight_hh_l0: [4H, H]`, gates i, f, g, o):
//! `i, f, o = σ(·)`, `g = tanh(·)`, `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`.
//! A padded step (mask 0) keeps the previous state and outputs zeros; in general
//! `h ← h + m (h' − h)`, `c ← c + m (c' − c)`, output `m h'`.

use std::mem::MaybeUninit;

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::fused::{sigmoid, tanh};
use crate::gemm::{gemm_packed, PackedB};
use crate::{Result, Tensor, TensorError, TensorRef};

/// What backward needs from the forward pass, each in `xp`'s batch-major `[B, T, ·]` layout
/// (row `b·T + t`): backward then writes the gates' gradients straight into `dxp`, and one step's
/// rows are read `T` rows apart.
#[derive(Debug, Clone, Default)]
pub struct LstmTape {
    /// The activated gates i, f, g, o: `[B, T, 4H]`.
    acts: Vec<f32>,
    /// Each step's input, then the state entering the step: `[B, T, I + H]`, so that both
    /// weights' gradients are one product (one pass over the gates' gradients, not two).
    xh: Vec<f32>,
    /// The cell entering each step: `[B, T, H]`.
    c_prev: Vec<f32>,
    /// `tanh(c')` of each step: `[B, T, H]`.
    tanh_c: Vec<f32>,
}

fn invalid(reason: String) -> TensorError {
    TensorError::Invalid { op: "lstm", reason }
}

/// An LSTM direction's parameters in PyTorch's layout: `w_ih: [4H, I]`, `b_ih: [4H]`,
/// `w_hh: [4H, H]`, `b_hh: [4H]`.
#[derive(Debug, Clone, Copy)]
pub struct LstmWeights<'a> {
    pub w_ih: TensorRef<'a>,
    pub b_ih: TensorRef<'a>,
    pub w_hh: TensorRef<'a>,
    pub b_hh: TensorRef<'a>,
}

/// The gradients [`lstm_backward`] returns; `dx` and `w_ih` only when asked for. Both biases'
/// gradients are `b`: each is the sum of the gates' pre-activation gradients.
#[derive(Debug, Clone)]
pub struct LstmGrads {
    pub dx: Option<Tensor>,
    pub w_ih: Option<Tensor>,
    pub b: Tensor,
    pub w_hh: Tensor,
}

/// `(B, T, I, H)` after checking `x: [B, T, I]`, the weights and `mask: [B, T]`.
fn lstm_dims(x: &Tensor, w: LstmWeights<'_>, mask: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (&[b, t, i], &[gw, h]) = (x.shape(), w.w_hh.shape()) else {
        return Err(invalid(format!(
            "needs x [B, T, I] and w_hh [4H, H], got {:?} and {:?}",
            x.shape(),
            w.w_hh.shape()
        )));
    };
    let g4 = 4 * h;
    if gw != g4
        || w.w_ih.shape() != [g4, i]
        || w.b_ih.shape() != [g4]
        || w.b_hh.shape() != [g4]
        || mask.shape() != [b, t]
    {
        return Err(invalid(format!(
            "x {:?}, w_ih {:?}, b_ih {:?}, w_hh {:?}, b_hh {:?} and mask {:?} do not fit hidden size {h}",
            x.shape(),
            w.w_ih.shape(),
            w.b_ih.shape(),
            w.w_hh.shape(),
            w.b_hh.shape(),
            mask.shape()
        )));
    }
    Ok((b, t, i, h))
}

/// `(B, T, H)` after checking `xp: [B, T, G·H]`, `w_hh: [G·H, H]`, `b_hh: [G·H]` and
/// `mask: [B, T]` for a cell with `gates` gates (shared with the GRU kernel).
pub(crate) fn dims(
    op: &'static str,
    gates: usize,
    xp: &Tensor,
    w_hh: &Tensor,
    b_hh: &Tensor,
    mask: &Tensor,
) -> Result<(usize, usize, usize)> {
    let fail = |reason: String| TensorError::Invalid { op, reason };
    let (&[b, t, gx], &[gw, h]) = (xp.shape(), w_hh.shape()) else {
        return Err(fail(format!(
            "needs xp [B, T, {gates}H] and w_hh [{gates}H, H], got {:?} and {:?}",
            xp.shape(),
            w_hh.shape()
        )));
    };
    if gx != gates * h || gw != gates * h || b_hh.shape() != [gates * h] || mask.shape() != [b, t] {
        return Err(fail(format!(
            "xp {:?}, w_hh {:?}, b_hh {:?} and mask {:?} do not fit hidden size {h}",
            xp.shape(),
            w_hh.shape(),
            b_hh.shape(),
            mask.shape()
        )));
    }
    Ok((b, t, h))
}

/// `(dW_hh, db_hh)` from every step's gate gradients `dpre: [rows, G]` and the states that
/// entered them `h_prev: [rows, H]` (rows in the same order): `dpreᵀ · h_prev` as one product
/// over all rows, and the column sums.
pub(crate) fn recurrent_weight_grads(dpre: &[f32], h_prev: &[f32], gates: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = h_prev.len() / h.max(1);
    let mut dw = vec![0.0f32; gates * h];
    let a = ArrayView2::from_shape((rows, gates), dpre).expect("caller sized dpre");
    let hp = ArrayView2::from_shape((rows, h), h_prev).expect("caller sized h_prev");
    let mut c = ArrayViewMut2::from_shape((gates, h), &mut dw[..]).expect("sized above");
    crate::linalg::gemm(1.0, &a.t(), &hp, 1.0, &mut c);
    let mut db = vec![0.0f32; gates];
    for row in dpre.chunks_exact(gates.max(1)) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
    (dw, db)
}

/// Time index of the `step`-th step processed.
pub(crate) fn time_index(step: usize, t: usize, reverse: bool) -> usize {
    if reverse {
        t - 1 - step
    } else {
        step
    }
}

/// The state `(h, c)`, each `[B, H]`, an LSTM starts from (zeros when `None`): the state a
/// previous window ended with, for truncated backpropagation through time. It is a constant:
/// no gradient flows back into it.
pub type LstmState<'a> = Option<(&'a Tensor, &'a Tensor)>;

/// Runs one LSTM direction over `x: [B, T, I]` from `init`, right to left when `reverse`.
///
/// Returns `[B, T + 2, H]`: the outputs of the T steps at their time indices, then the final
/// state h and the final cell c; and, when `keep_tape`, what [`lstm_backward`] needs.
///
/// Batch rows never meet in a recurrence, so with several rayon threads each takes a block of
/// rows through all T steps on its own (no synchronisation per step); every row's arithmetic is
/// the same for any split, so are the bits.
pub fn lstm_forward(
    x: &Tensor,
    w: LstmWeights<'_>,
    mask: &Tensor,
    reverse: bool,
    init: LstmState<'_>,
    keep_tape: bool,
) -> Result<(Tensor, LstmTape)> {
    let (b, t, i, h) = lstm_dims(x, w, mask)?;
    if let Some((h0, c0)) = init {
        if h0.shape() != [b, h] || c0.shape() != [b, h] {
            return Err(invalid(format!(
                "the initial state must be [{b}, {h}] twice, got {:?} and {:?}",
                h0.shape(),
                c0.shape()
            )));
        }
    }
    let g4 = 4 * h;
    let rows = rows_per_part(b);
    // The gates' pre-activations: both biases, then every step's input projection added in
    // place; each step then adds its recurrent product and activates them in place.
    let bias: Vec<f32> = w
        .b_ih
        .as_slice()
        .iter()
        .zip(w.b_hh.as_slice())
        .map(|(a, c)| a + c)
        .collect();
    #[allow(unsafe_code)] // reason: the fill writes its whole block
    // SAFETY: every block is whole rows of 4H, each written from `bias`.
    let mut acts = unsafe {
        par_init(b * t * g4, rows * t * g4, |_, dst| {
            for d in dst.chunks_exact_mut(g4) {
                for (d, &v) in d.iter_mut().zip(&bias) {
                    d.write(v);
                }
            }
        })
    };
    {
        let xv = ArrayView2::from_shape((b * t, i), x.as_slice()).map_err(|e| invalid(e.to_string()))?;
        let wv = ArrayView2::from_shape((g4, i), w.w_ih.as_slice()).map_err(|e| invalid(e.to_string()))?;
        let mut c = ArrayViewMut2::from_shape((b * t, g4), &mut acts[..]).map_err(|e| invalid(e.to_string()))?;
        crate::linalg::gemm(1.0, &xv, &wv.t(), 1.0, &mut c);
    }
    let zeros = |width: usize| par_zeros(b * width, rows * width);
    let mut out = zeros((t + 2) * h);
    let ih = i + h;
    let (mut xh, mut c_prev, mut tanh_c) = if keep_tape {
        let xs = x.as_slice();
        #[allow(unsafe_code)] // reason: the fill writes its whole block
        // SAFETY: every block is whole rows of I + H, the input's row then zeros.
        let xh = unsafe {
            par_init(b * t * ih, rows * t * ih, |k, dst| {
                for (r, d) in dst.chunks_exact_mut(ih).enumerate() {
                    let (dx, dh) = d.split_at_mut(i);
                    let src = &xs[(k * rows * t + r) * i..][..i];
                    dx.iter_mut().zip(src).for_each(|(d, &v)| {
                        d.write(v);
                    });
                    dh.fill(MaybeUninit::new(0.0));
                }
            })
        };
        (xh, zeros(t * h), zeros(t * h))
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let (mut hs, mut cs) = match init {
        Some((h0, c0)) => (h0.to_vec(), c0.to_vec()),
        None => (vec![0.0f32; b * h], vec![0.0f32; b * h]),
    };
    let step = Step {
        mask: mask.as_slice(),
        w: PackedB::pack_t(w.w_hh.as_slice(), h, g4), // W_hhᵀ: [H, 4H]
        t,
        i,
        h,
        reverse,
    };
    let parts = parts(&mut out, rows * (t + 2) * h, b, rows)
        .zip(parts(&mut acts, rows * t * g4, b, rows))
        .zip(parts(&mut xh, rows * t * ih, b, rows).zip(parts(&mut c_prev, rows * t * h, b, rows)))
        .zip(parts(&mut tanh_c, rows * t * h, b, rows))
        .zip(hs.chunks_mut(rows * h).zip(cs.chunks_mut(rows * h)))
        .enumerate()
        .map(|(k, ((((out, acts), (xh, c_prev)), tanh_c), (hs, cs)))| ForwardPart {
            r0: k * rows,
            out,
            acts,
            xh,
            c_prev,
            tanh_c,
            hs,
            cs,
        });
    run_parts(parts.collect(), |part| step.forward(part));
    let tape = if keep_tape {
        LstmTape {
            acts,
            xh,
            c_prev,
            tanh_c,
        }
    } else {
        LstmTape::default()
    };
    Ok((Tensor::from_vec(&[b, t + 2, h], out)?, tape))
}

/// A vector of `n` elements written in blocks of `block` on the rayon threads, block `i` by
/// `fill(i, block)`: the tapes' megabytes written by the threads that use them, where a zeroed
/// `vec!` is written once more, by one thread, first.
///
/// # Safety
/// `fill` must write every element of the block it is given.
#[allow(unsafe_code)] // reason: the caller's fill initialises what set_len exposes
pub(crate) unsafe fn par_init(
    n: usize,
    block: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(n);
    let spare = &mut v.spare_capacity_mut()[..n];
    if n > block && rayon::current_num_threads() > 1 {
        spare
            .par_chunks_mut(block.max(1))
            .enumerate()
            .for_each(|(i, d)| fill(i, d));
    } else {
        spare.chunks_mut(block.max(1)).enumerate().for_each(|(i, d)| fill(i, d));
    }
    // SAFETY: the chunks covered elements 0..n, and the caller's `fill` wrote each one.
    unsafe {
        v.set_len(n);
    }
    v
}

/// [`par_init`] with zeros.
pub(crate) fn par_zeros(n: usize, block: usize) -> Vec<f32> {
    #[allow(unsafe_code)] // reason: the fill writes its whole block
    // SAFETY: `fill` writes every element of its block.
    unsafe {
        par_init(n, block, |_, d| d.fill(MaybeUninit::new(0.0)))
    }
}

/// Batch rows per block: all of them on one thread, an even share on several.
fn rows_per_part(b: usize) -> usize {
    b.div_ceil(rayon::current_num_threads().clamp(1, b.max(1))).max(1)
}

/// `v` in blocks of `len` (one per `rows` of `b` batch rows), or as many empty blocks when `v` is
/// empty (no tape).
fn parts(v: &mut [f32], len: usize, b: usize, rows: usize) -> impl Iterator<Item = &mut [f32]> {
    v.chunks_mut(len.max(1))
        .chain(std::iter::repeat_with(|| &mut [][..]))
        .take(b.div_ceil(rows))
}

/// Runs `f` on every part, on the rayon pool when it has more than one thread.
fn run_parts<P: Send>(parts: Vec<P>, f: impl Fn(P) + Sync + Send) {
    if parts.len() > 1 {
        use rayon::prelude::*;
        parts.into_par_iter().for_each(f);
    } else {
        parts.into_iter().for_each(f);
    }
}

/// What every block of batch rows shares: the mask and the packed recurrent weight.
struct Step<'a> {
    mask: &'a [f32],
    w: PackedB,
    t: usize,
    /// The input's width `I`.
    i: usize,
    h: usize,
    reverse: bool,
}

/// One block of batch rows, from `r0`, of the forward's outputs, gates (their pre-activations
/// on entry), tape (empty without one) and running state.
struct ForwardPart<'a> {
    r0: usize,
    out: &'a mut [f32],
    acts: &'a mut [f32],
    xh: &'a mut [f32],
    c_prev: &'a mut [f32],
    tanh_c: &'a mut [f32],
    hs: &'a mut [f32],
    cs: &'a mut [f32],
}

impl Step<'_> {
    /// Runs one block of batch rows through every step.
    fn forward(&self, p: ForwardPart<'_>) {
        crate::simd::fast(
            #[inline(always)]
            || {
                let (t, h, g4) = (self.t, self.h, 4 * self.h);
                let b = p.hs.len() / h;
                let keep_tape = !p.xh.is_empty();
                let ih = self.i + h;
                let mut scratch_tc = if keep_tape { Vec::new() } else { vec![0.0f32; h] };
                // the gates are computed in place, one step's rows `T·4H` apart
                let ld = t * g4;
                for step in 0..t {
                    let ti = time_index(step, t, self.reverse);
                    let pre = &mut p.acts[ti * g4..];
                    gemm_packed(p.hs, h, b, &self.w, pre, ld);
                    for r in 0..b {
                        let row = r * t + ti; // in this block's tape
                        let m = self.mask[(p.r0 + r) * t + ti];
                        let (hr, cr) = (&mut p.hs[r * h..][..h], &mut p.cs[r * h..][..h]);
                        let tanh_c = if keep_tape {
                            p.xh[row * ih + self.i..][..h].copy_from_slice(hr);
                            p.c_prev[row * h..][..h].copy_from_slice(cr);
                            &mut p.tanh_c[row * h..][..h]
                        } else {
                            &mut scratch_tc[..]
                        };
                        let gates = &mut pre[r * ld..][..g4];
                        let (pi, rest) = gates.split_at_mut(h);
                        let (pf, rest) = rest.split_at_mut(h);
                        let (pg, po) = rest.split_at_mut(h);
                        let o_row = &mut p.out[(r * (t + 2) + ti) * h..][..h];
                        lanes(
                            [],
                            [pi, pf, pg, po, tanh_c, o_row, hr, cr],
                            #[inline(always)]
                            |[], [pi, pf, pg, po, _, _, h, c]| cell(m, [pi, pf, pg, po], h, c),
                        );
                    }
                }
                for r in 0..b {
                    p.out[(r * (t + 2) + t) * h..][..h].copy_from_slice(&p.hs[r * h..][..h]);
                    p.out[(r * (t + 2) + t + 1) * h..][..h].copy_from_slice(&p.cs[r * h..][..h]);
                }
            },
        );
    }

    /// Backpropagates one block of batch rows through every step: `g` is the whole output's
    /// gradient, `tape` the whole tape.
    fn backward(&self, g: &[f32], tape: &LstmTape, p: BackwardPart<'_>) {
        crate::simd::fast(
            #[inline(always)]
            || {
                let (t, h, g4) = (self.t, self.h, 4 * self.h);
                let b = p.dh.len() / h;
                for r in 0..b {
                    let at = (p.r0 + r) * (t + 2) * h;
                    p.dh[r * h..][..h].copy_from_slice(&g[at + t * h..][..h]);
                    p.dc[r * h..][..h].copy_from_slice(&g[at + (t + 1) * h..][..h]);
                }
                // The gates' gradients are written straight into dxp: one step's rows (T·4H apart)
                // are the left operand of that step's product with W_hh.
                for step in (0..t).rev() {
                    let ti = time_index(step, t, self.reverse);
                    for r in 0..b {
                        let row = (p.r0 + r) * t + ti;
                        let m = self.mask[row];
                        let acts = &tape.acts[row * g4..][..g4];
                        let (tcs, cps) = (&tape.tanh_c[row * h..][..h], &tape.c_prev[row * h..][..h]);
                        let gout = &g[((p.r0 + r) * (t + 2) + ti) * h..][..h];
                        let (dhr, dcr) = (&mut p.dh[r * h..][..h], &mut p.dc[r * h..][..h]);
                        let (dpi, rest) = p.dxp[(r * t + ti) * g4..][..g4].split_at_mut(h);
                        let (dpf, rest) = rest.split_at_mut(h);
                        let (dpg, dpo) = rest.split_at_mut(h);
                        let (ai, af, ag, ao) = (&acts[..h], &acts[h..2 * h], &acts[2 * h..3 * h], &acts[3 * h..]);
                        lanes(
                            [ai, af, ag, ao, tcs, cps, gout],
                            [dpi, dpf, dpg, dpo, dhr, dcr],
                            #[inline(always)]
                            |[i, f, g, o, tc, cp, go], [_, _, _, _, dh, dc]| bptt(m, i, f, g, o, tc, cp, go, dh, dc),
                        );
                    }
                    // dh_prev += (this step's rows of dxp) · W_hh
                    gemm_packed(&p.dxp[ti * g4..], t * g4, b, &self.w, p.dh, h);
                }
            },
        );
    }
}

/// One block of batch rows, from `r0`, of backward's `dxp` and running `dh`, `dc`.
struct BackwardPart<'a> {
    r0: usize,
    dxp: &'a mut [f32],
    dh: &'a mut [f32],
    dc: &'a mut [f32],
}

/// One element of one forward step: from mask `m`, the gates' pre-activations i, f, g, o and
/// the state `(h, c)` entering the step, the activated gates, `tanh(c')`, the output and the
/// state leaving the step (a padded step, `m = 0`, keeps the state and outputs zero).
#[inline(always)]
fn cell(m: f32, [pi, pf, pg, po]: [f32; 4], h: f32, c: f32) -> [f32; 8] {
    let (i, f, g, o) = (sigmoid(pi), sigmoid(pf), tanh(pg), sigmoid(po));
    let c_new = f * c + i * g;
    let tc = tanh(c_new);
    let h_new = o * tc;
    // m = 1 (every real token) assigns exactly; h + (h' − h) could round
    let (h, c) = if m == 1.0 {
        (h_new, c_new)
    } else {
        (h + m * (h_new - h), c + m * (c_new - c))
    };
    [i, f, g, o, tc, m * h_new, h, c]
}

/// One element of one step of backpropagation through time: from mask `m`, the activated gates
/// i, f, g, o, `tanh(c')`, `c_prev`, the output's gradient and the running `dh` and `dc`, the
/// four gates' pre-activation gradients and the new `dh` and `dc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bptt(m: f32, i: f32, f: f32, gg: f32, o: f32, tc: f32, cp: f32, gout: f32, dh: f32, dc: f32) -> [f32; 6] {
    let dh_new = m * (dh + gout);
    let dc_new = m * dc + dh_new * o * (1.0 - tc * tc);
    [
        dc_new * gg * i * (1.0 - i),
        dc_new * cp * f * (1.0 - f),
        dc_new * i * (1.0 - gg * gg),
        dh_new * tc * o * (1.0 - o),
        dh * (1.0 - m),
        dc_new * f + (1.0 - m) * dc,
    ]
}

/// Runs `f` over the positions of `H`-long rows: `f(ins[·][j], outs[·][j])` gives the new
/// `outs[·][j]`. Sixteen positions at a time go through local arrays: over slices of shared
/// buffers the compiler needed more runtime overlap checks than it makes, and the cell loops
/// ran scalar.
#[inline(always)]
pub(crate) fn lanes<const I: usize, const O: usize>(
    ins: [&[f32]; I],
    mut outs: [&mut [f32]; O],
    f: impl Fn([f32; I], [f32; O]) -> [f32; O],
) {
    const L: usize = 16;
    let n = outs.first().map_or(0, |o| o.len());
    let mut j = 0;
    while j + L <= n {
        let mut a = [[0.0f32; L]; I];
        for (d, s) in a.iter_mut().zip(&ins) {
            d.copy_from_slice(&s[j..j + L]);
        }
        let mut b = [[0.0f32; L]; O];
        for (d, s) in b.iter_mut().zip(&outs) {
            d.copy_from_slice(&s[j..j + L]);
        }
        for l in 0..L {
            let r = f(std::array::from_fn(|q| a[q][l]), std::array::from_fn(|q| b[q][l]));
            for (d, v) in b.iter_mut().zip(r) {
                d[l] = v;
            }
        }
        for (d, s) in outs.iter_mut().zip(&b) {
            d[j..j + L].copy_from_slice(s);
        }
        j += L;
    }
    for j in j..n {
        let r = f(std::array::from_fn(|q| ins[q][j]), std::array::from_fn(|q| outs[q][j]));
        for (d, v) in outs.iter_mut().zip(r) {
            d[j] = v;
        }
    }
}

/// Backpropagation through time for [`lstm_forward`]: given the gradient `g: [B, T + 2, H]` of
/// its output, the gradients of the input (when `need[0]`), of `w_ih` (when `need[1]`), of the
/// biases and of `w_hh`.
pub fn lstm_backward(
    g: &Tensor,
    x: &Tensor,
    w: LstmWeights<'_>,
    mask: &Tensor,
    reverse: bool,
    tape: &LstmTape,
    need: [bool; 2],
) -> Result<LstmGrads> {
    let (b, t, i, h) = lstm_dims(x, w, mask)?;
    let g4 = 4 * h;
    if g.shape() != [b, t + 2, h] || tape.acts.len() != b * t * g4 {
        return Err(invalid(format!(
            "backward got gradient {:?} for x {:?} and hidden size {h} (was the forward run with keep_tape?)",
            g.shape(),
            x.shape()
        )));
    }
    let step = Step {
        mask: mask.as_slice(),
        w: PackedB::pack(w.w_hh.as_slice(), g4, h),
        t,
        i,
        h,
        reverse,
    };
    let rows = rows_per_part(b);
    let mut dxp = par_zeros(b * t * g4, rows * t * g4);
    let (mut dh, mut dc) = (vec![0.0f32; b * h], vec![0.0f32; b * h]);
    let parts = dxp
        .chunks_mut(rows * t * g4)
        .zip(dh.chunks_mut(rows * h).zip(dc.chunks_mut(rows * h)))
        .enumerate()
        .map(|(i, (dxp, (dh, dc)))| BackwardPart {
            r0: i * rows,
            dxp,
            dh,
            dc,
        });
    run_parts(parts.collect(), |part| step.backward(g.as_slice(), tape, part));
    // both weights' gradients, [dW_ih | dW_hh] = dxpᵀ · [x | h_prev]: one product over all rows,
    // in the tape's order
    let (dw, db) = recurrent_weight_grads(&dxp, &tape.xh, g4, i + h);
    let (mut dw_ih, mut dw_hh) = (Vec::with_capacity(g4 * i), Vec::with_capacity(g4 * h));
    for row in dw.chunks_exact(i + h) {
        dw_ih.extend_from_slice(&row[..i]);
        dw_hh.extend_from_slice(&row[i..]);
    }
    // `dxp` is also the gradient of the input projection's output
    let dxp = Tensor::from_vec(&[b, t, g4], dxp)?;
    let [dx, _, _] = Tensor::linear_backward(&dxp, x, w.w_ih, [need[0], false, false])?;
    Ok(LstmGrads {
        dx,
        w_ih: need[1].then(|| Tensor::from_vec(&[g4, i], dw_ih)).transpose()?,
        b: Tensor::from_vec(&[g4], db)?,
        w_hh: Tensor::from_vec(&[g4, h], dw_hh)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::random;

    /// Forward and backward, on a pool of `threads` threads.
    fn run(threads: usize, reverse: bool) -> Vec<Vec<f32>> {
        let (b, t, i, h) = (5, 7, 3, 12);
        let mut rng = random::rng(11);
        let x = random::uniform(&[b, t, i], -1.0, 1.0, &mut rng);
        let w_ih = random::uniform(&[4 * h, i], -0.5, 0.5, &mut rng);
        let b_ih = random::uniform(&[4 * h], -0.5, 0.5, &mut rng);
        let w_hh = random::uniform(&[4 * h, h], -0.5, 0.5, &mut rng);
        let b_hh = random::uniform(&[4 * h], -0.5, 0.5, &mut rng);
        let w = LstmWeights {
            w_ih: (&w_ih).into(),
            b_ih: (&b_ih).into(),
            w_hh: (&w_hh).into(),
            b_hh: (&b_hh).into(),
        };
        // the last two rows end early (padding keeps the state)
        let mask = Tensor::from_vec(&[b, t], (0..b * t).map(|i| f32::from(i % t < t - i / t / 3)).collect()).unwrap();
        let g = random::uniform(&[b, t + 2, h], -1.0, 1.0, &mut rng);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (y, tape) = lstm_forward(&x, w, &mask, reverse, None, true).unwrap();
            let (y_no_tape, _) = lstm_forward(&x, w, &mask, reverse, None, false).unwrap();
            assert_eq!(y, y_no_tape);
            let d = lstm_backward(&g, &x, w, &mask, reverse, &tape, [true, true]).unwrap();
            [y, d.dx.unwrap(), d.w_ih.unwrap(), d.b, d.w_hh]
                .iter()
                .map(Tensor::to_vec)
                .collect()
        })
    }

    #[test]
    fn blocks_of_batch_rows_on_several_threads_give_the_same_bits() {
        for reverse in [false, true] {
            let one = run(1, reverse);
            for threads in [2, 3] {
                assert_eq!(run(threads, reverse), one, "{threads} threads, reverse {reverse}");
            }
        }
    }
}
