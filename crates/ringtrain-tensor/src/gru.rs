//! A whole GRU layer direction as one kernel, like [`crate::lstm`]: one sgemm per step into a
//! reused buffer, one fused pass over the gates, and the recurrent weight's gradient as one
//! product over all B·T rows.
//!
//! PyTorch's formulation and layout (`weight_hh_l0: [3H, H]`, gates r, z, n):
//! `r = σ(x_r + h_r)`, `z = σ(x_z + h_z)`, `n = tanh(x_n + r ⊙ h_n)` with `h_· = W_h· h + b_h·`,
//! `h' = (1 − z) ⊙ n + z ⊙ h`. A padded step (mask 0) keeps the state and outputs zeros.

use crate::fused::{sigmoid, tanh};
use crate::gemm::{gemm_packed, PackedB};
use crate::lstm::{dims, lanes, recurrent_weight_grads, time_index};
use crate::{Result, Tensor, TensorError};

/// What backward needs from the forward pass, in `[B, T, ·]` layout (row `b·T + t` is time
/// index `t` of batch row `b`).
#[derive(Debug, Clone, Default)]
pub struct GruTape {
    /// r, z, n and the recurrent candidate term `h_n = W_hn h + b_hn`: `[B, T, 4H]`.
    acts: Vec<f32>,
    /// The state entering each step: `[B, T, H]`.
    h_prev: Vec<f32>,
}

/// Runs one GRU direction over `xp: [B, T, 3H]` (the input projections `x W_ihᵀ + b_ih`), from
/// `h0` (`[B, H]`, a constant; zeros when `None`), right to left when `reverse`.
///
/// Returns `[B, T + 1, H]`: the outputs of the T steps at their time indices, then the final
/// state; and, when `keep_tape`, what [`gru_backward`] needs.
pub fn gru_forward(
    xp: &Tensor,
    w_hh: &Tensor,
    b_hh: &Tensor,
    mask: &Tensor,
    reverse: bool,
    h0: Option<&Tensor>,
    keep_tape: bool,
) -> Result<(Tensor, GruTape)> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let (b, t, h) = dims("gru", 3, xp, w_hh, b_hh, mask)?;
            if h0.is_some_and(|s| s.shape() != [b, h]) {
                return Err(TensorError::Invalid {
                    op: "gru",
                    reason: format!("the initial state must be [{b}, {h}], got {:?}", h0.map(Tensor::shape)),
                });
            }
            let g3 = 3 * h;
            let (xs, ws, bias, ms) = (xp.as_slice(), w_hh.as_slice(), b_hh.as_slice(), mask.as_slice());
            let mut out = vec![0.0f32; b * (t + 1) * h];
            let mut tape = if keep_tape {
                GruTape {
                    acts: vec![0.0; b * t * 4 * h],
                    h_prev: vec![0.0; b * t * h],
                }
            } else {
                GruTape::default()
            };
            let mut hs = h0.map_or_else(|| vec![0.0f32; b * h], Tensor::to_vec);
            let mut hp = vec![0.0f32; b * g3];
            let mut acts = vec![0.0f32; 4 * h];
            let w_t = PackedB::pack_t(ws, h, g3); // W_hhᵀ: [H, 3H]
            for step in 0..t {
                let ti = time_index(step, t, reverse);
                // hp = h · W_hhᵀ + b_hh (the reset gate scales the candidate's recurrent part only)
                for row in hp.chunks_exact_mut(g3) {
                    row.copy_from_slice(bias);
                }
                gemm_packed(&hs, h, b, &w_t, &mut hp, g3);
                for r in 0..b {
                    let row = r * t + ti;
                    let m = ms[row];
                    let x = &xs[row * g3..][..g3];
                    let hpr = &hp[r * g3..][..g3];
                    let hr = &mut hs[r * h..][..h];
                    let (rg, rest) = acts.split_at_mut(h);
                    let (zg, rest) = rest.split_at_mut(h);
                    let (ng, hn) = rest.split_at_mut(h);
                    for j in 0..h {
                        rg[j] = sigmoid(x[j] + hpr[j]);
                    }
                    for j in 0..h {
                        zg[j] = sigmoid(x[h + j] + hpr[h + j]);
                    }
                    hn.copy_from_slice(&hpr[2 * h..]);
                    for j in 0..h {
                        ng[j] = tanh(x[2 * h + j] + rg[j] * hn[j]);
                    }
                    if keep_tape {
                        tape.h_prev[row * h..][..h].copy_from_slice(hr);
                    }
                    let o_row = &mut out[(r * (t + 1) + ti) * h..][..h];
                    for j in 0..h {
                        let h_new = ng[j] + zg[j] * (hr[j] - ng[j]);
                        o_row[j] = m * h_new;
                        // m = 1 (every real token) assigns exactly; h + (h' − h) could round
                        if m == 1.0 {
                            hr[j] = h_new;
                        } else {
                            hr[j] += m * (h_new - hr[j]);
                        }
                    }
                    if keep_tape {
                        tape.acts[row * 4 * h..][..4 * h].copy_from_slice(&acts);
                    }
                }
            }
            for r in 0..b {
                out[(r * (t + 1) + t) * h..][..h].copy_from_slice(&hs[r * h..][..h]);
            }
            Ok((Tensor::from_vec(&[b, t + 1, h], out)?, tape))
        },
    )
}

/// Backpropagation through time for [`gru_forward`]: given the gradient `g: [B, T + 1, H]` of
/// its output, returns the gradients of `xp` (`[B, T, 3H]`), `w_hh` and `b_hh`.
pub fn gru_backward(
    g: &Tensor,
    xp_shape: &[usize],
    w_hh: &Tensor,
    mask: &Tensor,
    reverse: bool,
    tape: &GruTape,
) -> Result<[Tensor; 3]> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let &[b, t, g3] = xp_shape else {
                return Err(TensorError::Invalid {
                    op: "gru",
                    reason: format!("xp must be [B, T, 3H], got {xp_shape:?}"),
                });
            };
            let h = g3 / 3;
            if g.shape() != [b, t + 1, h] || tape.acts.len() != b * t * 4 * h || w_hh.shape() != [g3, h] {
                return Err(TensorError::Invalid {
                    op: "gru",
                    reason: format!(
                        "backward got gradient {:?} and w_hh {:?} for xp {xp_shape:?} (was the forward run with keep_tape?)",
                        g.shape(),
                        w_hh.shape()
                    ),
                });
            }
            let (gs, ws, ms) = (g.as_slice(), w_hh.as_slice(), mask.as_slice());
            // dxp: the gates' pre-activation gradients on the input side; dhp: on the recurrent side
            // (they differ in the candidate, whose recurrent part is scaled by r).
            let mut dxp = vec![0.0f32; b * t * g3];
            let mut dhp_all = vec![0.0f32; b * t * g3];
            let mut dh = vec![0.0f32; b * h];
            for r in 0..b {
                dh[r * h..][..h].copy_from_slice(&gs[(r * (t + 1) + t) * h..][..h]);
            }
            let w = PackedB::pack(ws, g3, h);
            for step in (0..t).rev() {
                let ti = time_index(step, t, reverse);
                for r in 0..b {
                    let row = r * t + ti;
                    let m = ms[row];
                    let acts = &tape.acts[row * 4 * h..][..4 * h];
                    let (rg, zg, ng, hn) = (&acts[..h], &acts[h..2 * h], &acts[2 * h..3 * h], &acts[3 * h..4 * h]);
                    let hp = &tape.h_prev[row * h..][..h];
                    let gout = &gs[(r * (t + 1) + ti) * h..][..h];
                    let dhr = &mut dh[r * h..][..h];
                    let (dxr, rest) = dxp[row * g3..][..g3].split_at_mut(h);
                    let (dxz, dxn) = rest.split_at_mut(h);
                    let (dhr_gate, rest) = dhp_all[row * g3..][..g3].split_at_mut(h);
                    let (dhz_gate, dhn_gate) = rest.split_at_mut(h);
                    lanes(
                        [rg, zg, ng, hn, hp, gout],
                        [dxr, dxz, dxn, dhr_gate, dhz_gate, dhn_gate, dhr],
                        #[inline(always)]
                        |[rv, zv, nv, hnv, hpv, go], [_, _, _, _, _, _, dhv]| {
                            let dh_new = m * (dhv + go);
                            let da_n = dh_new * (1.0 - zv) * (1.0 - nv * nv);
                            let da_z = dh_new * (hpv - nv) * zv * (1.0 - zv);
                            let da_r = da_n * hnv * rv * (1.0 - rv);
                            // dh: what flows to h_prev besides the product with W_hh below
                            [da_r, da_z, da_n, da_r, da_z, da_n * rv, dh_new * zv + (1.0 - m) * dhv]
                        },
                    );
                }
                // dh_prev += (this step's rows of dhp_all, T·3H apart) · W_hh
                gemm_packed(&dhp_all[ti * g3..], t * g3, b, &w, &mut dh, h);
            }
            let (dw, db) = recurrent_weight_grads(&dhp_all, &tape.h_prev, g3, h);
            Ok([
                Tensor::from_vec(xp_shape, dxp)?,
                Tensor::from_vec(&[g3, h], dw)?,
                Tensor::from_vec(&[g3], db)?,
            ])
        },
    )
}
