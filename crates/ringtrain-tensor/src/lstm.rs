//! A whole LSTM layer direction as one kernel: forward over every time step, and
//! backpropagation through time.
//!
//! Recorded op by op, one step of the cell is about twenty tape nodes, each allocating its
//! `[B, H]` or `[B, 4H]` output, and the recurrent weight's gradient is T small products with
//! an inner dimension of B. Here one step is one sgemm into a reused buffer plus one fused pass
//! over the gates, and the weight gradient is a single product over all B·T rows at the end
//! (cuDNN and PyTorch's CPU kernel do the same).
//!
//! Layout and gate order follow PyTorch (`weight_hh_l0: [4H, H]`, gates i, f, g, o):
//! `i, f, o = σ(·)`, `g = tanh(·)`, `c' = f ⊙ c + i ⊙ g`, `h' = o ⊙ tanh(c')`.
//! A padded step (mask 0) keeps the previous state and outputs zeros; in general
//! `h ← h + m (h' − h)`, `c ← c + m (c' − c)`, output `m h'`.

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2};

use crate::fused::{sigmoid, tanh};
use crate::{Result, Tensor, TensorError};

/// What backward needs from the forward pass, each in time-major `[T, B, ·]` layout (row
/// `t·B + b` is time index `t` of batch row `b`, whatever the direction), so that one step's
/// rows are one contiguous block.
#[derive(Debug, Clone, Default)]
pub struct LstmTape {
    /// The activated gates i, f, g, o: `[T, B, 4H]`.
    acts: Vec<f32>,
    /// The state entering each step: `[T, B, H]`.
    h_prev: Vec<f32>,
    /// The cell entering each step: `[T, B, H]`.
    c_prev: Vec<f32>,
    /// `tanh(c')` of each step: `[T, B, H]`.
    tanh_c: Vec<f32>,
}

fn invalid(reason: String) -> TensorError {
    TensorError::Invalid { op: "lstm", reason }
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

/// `c += a · bᵀ` (`trans_b`) or `c += a · b` on row-major slices, through BLAS.
pub(crate) fn gemm_acc(
    a: &[f32],
    (m, k): (usize, usize),
    b: &[f32],
    (bm, bn): (usize, usize),
    trans_b: bool,
    c: &mut [f32],
) {
    let a = ArrayView2::from_shape((m, k), a).expect("caller sized a");
    let b = ArrayView2::from_shape((bm, bn), b).expect("caller sized b");
    let b = if trans_b { b.t() } else { b };
    let mut c = ArrayViewMut2::from_shape((m, b.ncols()), c).expect("caller sized c");
    general_mat_mul(1.0, &a, &b, 1.0, &mut c);
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
    general_mat_mul(1.0, &a.t(), &hp, 1.0, &mut c);
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

/// Runs one LSTM direction over `xp: [B, T, 4H]` (the input projections `x Wᵢₕᵀ + bᵢₕ` of every
/// step, all gates), from `init`, right to left when `reverse`.
///
/// Returns `[B, T + 2, H]`: the outputs of the T steps at their time indices, then the final
/// state h and the final cell c; and, when `keep_tape`, what [`lstm_backward`] needs.
pub fn lstm_forward(
    xp: &Tensor,
    w_hh: &Tensor,
    b_hh: &Tensor,
    mask: &Tensor,
    reverse: bool,
    init: LstmState<'_>,
    keep_tape: bool,
) -> Result<(Tensor, LstmTape)> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let (b, t, h) = dims("lstm", 4, xp, w_hh, b_hh, mask)?;
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
            let (xs, ws, bias, ms) = (xp.as_slice(), w_hh.as_slice(), b_hh.as_slice(), mask.as_slice());
            let mut out = vec![0.0f32; b * (t + 2) * h];
            let mut tape = if keep_tape {
                LstmTape {
                    acts: vec![0.0; b * t * g4],
                    h_prev: vec![0.0; b * t * h],
                    c_prev: vec![0.0; b * t * h],
                    tanh_c: vec![0.0; b * t * h],
                }
            } else {
                LstmTape::default()
            };
            let (mut hs, mut cs) = match init {
                Some((h0, c0)) => (h0.to_vec(), c0.to_vec()),
                None => (vec![0.0f32; b * h], vec![0.0f32; b * h]),
            };
            // Without a tape, one step's gates and tanh(c') live in scratch buffers; with one, they
            // are computed in place in the tape's block for that step (time-major, so a step's rows
            // are contiguous and the sgemm writes straight into them).
            let mut scratch = if keep_tape { Vec::new() } else { vec![0.0f32; b * g4] };
            let mut scratch_tc = if keep_tape { Vec::new() } else { vec![0.0f32; b * h] };
            let mut c_new = vec![0.0f32; h];
            for step in 0..t {
                let ti = time_index(step, t, reverse);
                let (pre, tcs) = if keep_tape {
                    tape.h_prev[ti * b * h..][..b * h].copy_from_slice(&hs);
                    tape.c_prev[ti * b * h..][..b * h].copy_from_slice(&cs);
                    (
                        &mut tape.acts[ti * b * g4..][..b * g4],
                        &mut tape.tanh_c[ti * b * h..][..b * h],
                    )
                } else {
                    (&mut scratch[..], &mut scratch_tc[..])
                };
                for r in 0..b {
                    let src = &xs[(r * t + ti) * g4..][..g4];
                    for ((p, &x), &bv) in pre[r * g4..][..g4].iter_mut().zip(src).zip(bias) {
                        *p = x + bv;
                    }
                }
                gemm_acc(&hs, (b, h), ws, (g4, h), true, pre);
                for r in 0..b {
                    let m = ms[r * t + ti];
                    let (hr, cr) = (&mut hs[r * h..][..h], &mut cs[r * h..][..h]);
                    // Activate in place, one gate block at a time: plain slice maps vectorise.
                    let p = &mut pre[r * g4..][..g4];
                    let (if_gates, rest) = p.split_at_mut(2 * h);
                    let (g_gate, o_gate) = rest.split_at_mut(h);
                    if_gates.iter_mut().for_each(|v| *v = sigmoid(*v));
                    g_gate.iter_mut().for_each(|v| *v = tanh(*v));
                    o_gate.iter_mut().for_each(|v| *v = sigmoid(*v));
                    let (i_gate, f_gate) = if_gates.split_at(h);
                    for ((((cn, &i), &f), &g), &cp) in c_new
                        .iter_mut()
                        .zip(i_gate)
                        .zip(f_gate)
                        .zip(g_gate.iter())
                        .zip(cr.iter())
                    {
                        *cn = f * cp + i * g;
                    }
                    let tanh_c = &mut tcs[r * h..][..h];
                    for (tc, &cn) in tanh_c.iter_mut().zip(&c_new) {
                        *tc = tanh(cn);
                    }
                    let o_row = &mut out[(r * (t + 2) + ti) * h..][..h];
                    for ((((o, hv), cv), (&og, &tc)), &cn) in o_row
                        .iter_mut()
                        .zip(hr.iter_mut())
                        .zip(cr.iter_mut())
                        .zip(o_gate.iter().zip(tanh_c.iter()))
                        .zip(&c_new)
                    {
                        let h_new = og * tc;
                        *o = m * h_new;
                        // m = 1 (every real token) assigns exactly; h + (h' − h) could round
                        if m == 1.0 {
                            (*hv, *cv) = (h_new, cn);
                        } else {
                            *hv += m * (h_new - *hv);
                            *cv += m * (cn - *cv);
                        }
                    }
                }
            }
            for r in 0..b {
                out[(r * (t + 2) + t) * h..][..h].copy_from_slice(&hs[r * h..][..h]);
                out[(r * (t + 2) + t + 1) * h..][..h].copy_from_slice(&cs[r * h..][..h]);
            }
            Ok((Tensor::from_vec(&[b, t + 2, h], out)?, tape))
        },
    )
}

/// Backpropagation through time for [`lstm_forward`]: given the gradient `g: [B, T + 2, H]` of
/// its output, returns the gradients of `xp` (`[B, T, 4H]`, also that of the pre-activations),
/// `w_hh` and `b_hh`.
pub fn lstm_backward(
    g: &Tensor,
    xp_shape: &[usize],
    w_hh: &Tensor,
    mask: &Tensor,
    reverse: bool,
    tape: &LstmTape,
) -> Result<[Tensor; 3]> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let &[b, t, g4] = xp_shape else {
                return Err(invalid(format!("xp must be [B, T, 4H], got {xp_shape:?}")));
            };
            let h = g4 / 4;
            if g.shape() != [b, t + 2, h] || tape.acts.len() != b * t * g4 || w_hh.shape() != [g4, h] {
                return Err(invalid(format!(
                    "backward got gradient {:?} and w_hh {:?} for xp {xp_shape:?} (was the forward run with keep_tape?)",
                    g.shape(),
                    w_hh.shape()
                )));
            }
            let (gs, ws, ms) = (g.as_slice(), w_hh.as_slice(), mask.as_slice());
            let mut dxp = vec![0.0f32; b * t * g4];
            let mut dh = vec![0.0f32; b * h];
            let mut dc = vec![0.0f32; b * h];
            for r in 0..b {
                dh[r * h..][..h].copy_from_slice(&gs[(r * (t + 2) + t) * h..][..h]);
                dc[r * h..][..h].copy_from_slice(&gs[(r * (t + 2) + t + 1) * h..][..h]);
            }
            // The gates' gradients in the tape's time-major order: a step's rows are one block, the
            // left operand of that step's product with W_hh, and all of them of the weight gradient's.
            let mut dpre = vec![0.0f32; b * t * g4];
            for step in (0..t).rev() {
                let ti = time_index(step, t, reverse);
                for r in 0..b {
                    let row = r * t + ti;
                    let m = ms[row];
                    let tm = ti * b + r; // the tape's time-major row
                    let acts = &tape.acts[tm * g4..][..g4];
                    let (tcs, cps) = (&tape.tanh_c[tm * h..][..h], &tape.c_prev[tm * h..][..h]);
                    let gout = &gs[(r * (t + 2) + ti) * h..][..h];
                    let (dhr, dcr) = (&mut dh[r * h..][..h], &mut dc[r * h..][..h]);
                    let dp = &mut dpre[tm * g4..][..g4];
                    // Equal-length slices let the compiler drop the bounds checks and vectorise.
                    let (ai, af, ag, ao) = (&acts[..h], &acts[h..2 * h], &acts[2 * h..3 * h], &acts[3 * h..]);
                    let (dpi, rest) = dp.split_at_mut(h);
                    let (dpf, rest) = rest.split_at_mut(h);
                    let (dpg, dpo) = rest.split_at_mut(h);
                    let (tcs, cps, gout, dhr, dcr) = (&tcs[..h], &cps[..h], &gout[..h], &mut dhr[..h], &mut dcr[..h]);
                    for j in 0..h {
                        let (i, f, gg, o, tc) = (ai[j], af[j], ag[j], ao[j], tcs[j]);
                        let dh_new = m * (dhr[j] + gout[j]);
                        let dc_new = m * dcr[j] + dh_new * o * (1.0 - tc * tc);
                        dpi[j] = dc_new * gg * i * (1.0 - i);
                        dpf[j] = dc_new * cps[j] * f * (1.0 - f);
                        dpg[j] = dc_new * i * (1.0 - gg * gg);
                        dpo[j] = dh_new * tc * o * (1.0 - o);
                        dcr[j] = dc_new * f + (1.0 - m) * dcr[j];
                        dhr[j] *= 1.0 - m;
                    }
                    dxp[row * g4..][..g4].copy_from_slice(dp);
                }
                // dh_prev += dpre · W_hh
                gemm_acc(&dpre[ti * b * g4..][..b * g4], (b, g4), ws, (g4, h), false, &mut dh);
            }
            let (dw, db) = recurrent_weight_grads(&dpre, &tape.h_prev, g4, h);
            Ok([
                Tensor::from_vec(xp_shape, dxp)?,
                Tensor::from_vec(&[g4, h], dw)?,
                Tensor::from_vec(&[g4], db)?,
            ])
        },
    )
}
