//! Fused scaled dot-product attention, all heads at once, without moving heads into a separate
//! axis.
//!
//! # Layout
//! Queries, keys and values stay in the batch-first layout the projections produce: `[B, T, W]`
//! with head `h` in the columns `offset + h·dh .. offset + (h+1)·dh`. A packed self-attention
//! projection `[B, T, 3D]` is therefore read in place as q (offset 0), k (offset D) and v
//! (offset 2D), and the output `[B, Tq, D]` is written head by head into its columns, ready for
//! the output projection. BLAS reads the column blocks with a leading dimension of `W`, so no
//! `[B, T, H, dh] → [B, H, T, dh]` permutation is ever copied, forward or backward.
//!
//! # Computation, per (batch row, head)
//! `S = scale·Q Kᵀ` (one sgemm) → masks → row softmax `P` (max subtracted) → dropout →
//! `O = P_drop V` (one sgemm). Backward uses only the stored `P`:
//! `dV = P_dropᵀ dO`, `dP = (dO Vᵀ) ⊙ keep/(1−p)`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
//! `dQ = scale·dS K`, `dK = scale·dSᵀ Q`.
//!
//! The dropout mask is not stored separately: a dropped probability is stored with its sign bit
//! set (`-p`, or `-0.0`), so one `[B, H, Tq, Tk]` tensor carries both `P` and the mask.
//!
//! A query row whose keys are all masked (a fully padded sequence) gets all-zero probabilities
//! and a zero output instead of `0/0 = NaN`.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

use crate::fused;
use crate::random::Rng;
use crate::{Result, Tensor, TensorError};

const OP: &str = "attention";

/// One of q, k, v: the columns `offset .. offset + dim` of a `[B, T, W]` tensor.
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a> {
    pub t: &'a Tensor,
    pub offset: usize,
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub q_len: usize,
    pub kv_len: usize,
}

impl AttentionDims {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Shape of the probabilities: `[B, H, Tq, Tk]`.
    pub fn probs_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.q_len, self.kv_len]
    }
}

/// Which (query, key) pairs may attend.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionMask<'a> {
    /// `[B, Tk]`: 1 = a real key, 0 = padding that no query may attend.
    pub key_mask: Option<&'a Tensor>,
    /// `[Tq, Tk]`, added to the scaled scores; `-inf` blocks a pair.
    pub bias: Option<&'a Tensor>,
    /// Query `i` attends keys `j ≤ i` only (PyTorch's `is_causal`, top-left aligned).
    pub causal: bool,
}

fn invalid(reason: String) -> TensorError {
    TensorError::Invalid { op: OP, reason }
}

/// Checks q, k, v against each other and `dim` (= heads · head_dim) and returns the sizes.
pub fn attention_dims(q: Heads<'_>, k: Heads<'_>, v: Heads<'_>, dim: usize, heads: usize) -> Result<AttentionDims> {
    let three = |h: Heads<'_>, what: &str| -> Result<[usize; 3]> {
        let s: [usize; 3] =
            h.t.shape()
                .try_into()
                .map_err(|_| invalid(format!("{what} must be [batch, time, features], got {:?}", h.t.shape())))?;
        if h.offset + dim > s[2] {
            return Err(invalid(format!(
                "{what}: columns {}..{} do not fit its shape {s:?}",
                h.offset,
                h.offset + dim
            )));
        }
        Ok(s)
    };
    let (qs, ks, vs) = (three(q, "q")?, three(k, "k")?, three(v, "v")?);
    if heads == 0 || dim == 0 || !dim.is_multiple_of(heads) {
        return Err(invalid(format!("{dim} features do not split into {heads} heads")));
    }
    if qs[0] != ks[0] || ks[0] != vs[0] || ks[1] != vs[1] {
        return Err(invalid(format!(
            "q {qs:?}, k {ks:?}, v {vs:?}: batch sizes must agree and k, v need the same length"
        )));
    }
    Ok(AttentionDims {
        batch: qs[0],
        heads,
        head_dim: dim / heads,
        q_len: qs[1],
        kv_len: ks[1],
    })
}

/// A `rows × cols` view with row stride `ld`, starting at `start`.
fn view(data: &[f32], start: usize, rows: usize, cols: usize, ld: usize) -> Result<ArrayView2<'_, f32>> {
    let tail = data.get(start..).unwrap_or(&[]);
    ArrayView2::from_shape((rows, cols).strides((ld, 1)), tail)
        .map_err(|e| invalid(format!("view {rows}x{cols} (ld {ld}) at {start}: {e}")))
}

fn view_mut(data: &mut [f32], start: usize, rows: usize, cols: usize, ld: usize) -> Result<ArrayViewMut2<'_, f32>> {
    let tail = data.get_mut(start..).unwrap_or(&mut []);
    ArrayViewMut2::from_shape((rows, cols).strides((ld, 1)), tail)
        .map_err(|e| invalid(format!("view {rows}x{cols} (ld {ld}) at {start}: {e}")))
}

/// The head block of `h` for batch row `b`, head `head`: `[T, dh]` with leading dimension `W`.
fn block<'a>(h: Heads<'a>, dims: &AttentionDims, b: usize, head: usize) -> Result<ArrayView2<'a, f32>> {
    let (t, w) = (h.t.shape()[1], h.t.shape()[2]);
    let start = b * t * w + h.offset + head * dims.head_dim;
    view(h.t.as_slice(), start, t, dims.head_dim, w)
}

/// Attention forward.
///
/// # Shapes
/// q: `[B, Tq, Wq]`, k: `[B, Tk, Wk]`, v: `[B, Tk, Wv]` (heads in columns, see the module
/// docs) → `(out [B, Tq, H·dh], probs [B, H, Tq, Tk])`. `dropout` is `(p, rng)` in training.
pub fn attention_forward(
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    dims: &AttentionDims,
    scale: f32,
    mask: &AttentionMask<'_>,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<(Tensor, Tensor)> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let (bsz, heads, tq, tk) = (dims.batch, dims.heads, dims.q_len, dims.kv_len);
            let d = dims.dim();
            if let Some(km) = mask.key_mask {
                if km.shape() != [bsz, tk] {
                    return Err(invalid(format!("key mask must be [{bsz}, {tk}], got {:?}", km.shape())));
                }
            }
            if let Some(bias) = mask.bias {
                if bias.shape() != [tq, tk] {
                    return Err(invalid(format!(
                        "attention bias must be [{tq}, {tk}], got {:?}",
                        bias.shape()
                    )));
                }
            }
            let (p_drop, mut rng) = match dropout {
                Some((p, rng)) if p > 0.0 => {
                    if p >= 1.0 {
                        return Err(invalid(format!("dropout must be in [0, 1), got {p}")));
                    }
                    (p, Some(rng))
                }
                _ => (0.0, None),
            };
            let keep = 1.0 - p_drop;
            let inv_keep = 1.0 / keep;
            let sampler = crate::random::KeepSampler::new(f64::from(keep));

            let mut out = vec![0.0f32; bsz * tq * d];
            let mut probs = vec![0.0f32; bsz * heads * tq * tk];
            // The dropped-out probabilities of one head, for the `P_drop V` product.
            let mut scratch = if rng.is_some() {
                vec![0.0f32; tq * tk]
            } else {
                Vec::new()
            };
            let key_mask = mask.key_mask.map(Tensor::as_slice);
            let bias = mask.bias.map(Tensor::as_slice);
            for b in 0..bsz {
                let keys = key_mask.map(|m| &m[b * tk..(b + 1) * tk]);
                for head in 0..heads {
                    let base = (b * heads + head) * tq * tk;
                    let qb = block(q, dims, b, head)?;
                    let kb = block(k, dims, b, head)?;
                    {
                        let mut s = view_mut(&mut probs, base, tq, tk, tk)?;
                        // beta = 1 on the zeroed buffers: BLAS then skips its own pass zeroing C
                        general_mat_mul(scale, &qb, &kb.t(), 1.0, &mut s);
                    }
                    for i in 0..tq {
                        let row = &mut probs[base + i * tk..base + (i + 1) * tk];
                        if let Some(bias) = bias {
                            row.iter_mut()
                                .zip(&bias[i * tk..(i + 1) * tk])
                                .for_each(|(x, &bv)| *x += bv);
                        }
                        // keys past the diagonal do not exist for a causal query
                        let visible = if mask.causal { (i + 1).min(tk) } else { tk };
                        row[visible..].fill(f32::NEG_INFINITY);
                        if let Some(keys) = keys {
                            for (x, &m) in row[..visible].iter_mut().zip(keys) {
                                *x = if m == 0.0 { f32::NEG_INFINITY } else { *x };
                            }
                        }
                        let max = fused::max_lanes(&row[..visible]);
                        if max == f32::NEG_INFINITY {
                            // every key masked: attend to nothing rather than divide 0 by 0
                            row.fill(0.0);
                        } else {
                            for x in row[..visible].iter_mut() {
                                *x = fused::exp_nonpositive(*x - max);
                            }
                            let sum = fused::sum_lanes(&row[..visible]);
                            let inv = 1.0 / sum;
                            row[..visible].iter_mut().for_each(|x| *x *= inv);
                            row[visible..].fill(0.0);
                        }
                        if let Some(rng) = rng.as_deref_mut() {
                            let dropped = &mut scratch[i * tk..(i + 1) * tk];
                            sampler.decide(rng, tk, |j, keep| {
                                let x = row[j];
                                dropped[j] = if keep { x * inv_keep } else { 0.0 };
                                // sign bit = dropped (see the module docs); -(+0.0) is -0.0
                                row[j] = if keep { x } else { -x };
                            });
                        }
                    }
                    let vb = block(v, dims, b, head)?;
                    let pd = if rng.is_some() {
                        view(&scratch, 0, tq, tk, tk)?
                    } else {
                        view(&probs, base, tq, tk, tk)?
                    };
                    let mut ob = view_mut(&mut out, b * tq * d + head * dims.head_dim, tq, dims.head_dim, d)?;
                    general_mat_mul(1.0, &pd, &vb, 1.0, &mut ob);
                }
            }
            Ok((
                Tensor::from_vec(&[bsz, tq, d], out)?,
                Tensor::from_vec(&dims.probs_shape(), probs)?,
            ))
        },
    )
}

/// The probabilities as a user sees them: dropout's sign marks removed.
pub fn decode_probs(probs: &Tensor) -> Tensor {
    probs.map(f32::abs)
}

/// Where the gradient of q, k or v goes: columns `offset ..` of `grads[index]`, or nowhere.
#[derive(Debug, Clone, Copy)]
pub struct GradSlot {
    pub index: usize,
    pub offset: usize,
    pub needed: bool,
}

/// Attention backward: adds dq, dk, dv into the column blocks `slots` of `grads` (which may be
/// one tensor for a packed projection). `probs` is the forward's, dropout signs included.
pub fn attention_backward(
    g: &Tensor,
    q: Heads<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    dims: &AttentionDims,
    scale: f32,
    dropout: f32,
    probs: &Tensor,
    grads: &mut [Tensor],
    slots: [GradSlot; 3],
) -> Result<()> {
    crate::simd::fast(
        #[inline(always)]
        || {
            let AttentionDims {
                batch: bsz,
                heads,
                head_dim: dh,
                q_len: tq,
                kv_len: tk,
            } = *dims;
            let d = dims.dim();
            if g.shape() != [bsz, tq, d] || probs.shape() != dims.probs_shape() {
                return Err(invalid(format!(
                    "backward got gradient {:?} and probabilities {:?} for {dims:?}",
                    g.shape(),
                    probs.shape()
                )));
            }
            for (slot, h) in slots.iter().zip([q, k, v]) {
                if slot.needed && grads.get(slot.index).map(Tensor::shape) != Some(h.t.shape()) {
                    return Err(invalid(format!(
                        "gradient slot {slot:?} does not match its input {:?}",
                        h.t.shape()
                    )));
                }
            }
            let inv_keep = 1.0 / (1.0 - dropout);
            let with_dropout = dropout > 0.0;
            let ps = probs.as_slice();
            // dropped-out probabilities of one head (with dropout), then dP/dS of one head
            let mut pd = if with_dropout {
                vec![0.0f32; tq * tk]
            } else {
                Vec::new()
            };
            let mut ds = vec![0.0f32; tq * tk];
            let need_qk = slots[0].needed || slots[1].needed;
            for b in 0..bsz {
                for head in 0..heads {
                    let base = (b * heads + head) * tq * tk;
                    let p = &ps[base..base + tq * tk];
                    if with_dropout {
                        for (o, &x) in pd.iter_mut().zip(p) {
                            *o = if x.is_sign_negative() { 0.0 } else { x * inv_keep };
                        }
                    }
                    let pdv = if with_dropout {
                        view(&pd, 0, tq, tk, tk)?
                    } else {
                        view(ps, base, tq, tk, tk)?
                    };
                    let gb = view(g.as_slice(), b * tq * d + head * dh, tq, dh, d)?;
                    if slots[2].needed {
                        let mut dv = block_mut(&mut grads[slots[2].index], slots[2].offset, dims, b, head)?;
                        general_mat_mul(1.0, &pdv.t(), &gb, 1.0, &mut dv);
                    }
                    if !need_qk {
                        continue;
                    }
                    let vb = block(v, dims, b, head)?;
                    {
                        let mut dsv = view_mut(&mut ds, 0, tq, tk, tk)?;
                        general_mat_mul(1.0, &gb, &vb.t(), 0.0, &mut dsv);
                    }
                    for (drow, prow) in ds.chunks_exact_mut(tk.max(1)).zip(p.chunks_exact(tk.max(1))) {
                        // dP = dP_drop ⊙ mask/keep, then dS = P ⊙ (dP − Σ dP ⊙ P)
                        let mut r = 0.0f32;
                        for (dv, &x) in drow.iter_mut().zip(prow) {
                            if with_dropout {
                                *dv = if x.is_sign_negative() { 0.0 } else { *dv * inv_keep };
                            }
                            r += *dv * x.abs();
                        }
                        for (dv, &x) in drow.iter_mut().zip(prow) {
                            *dv = x.abs() * (*dv - r);
                        }
                    }
                    let dsv = view(&ds, 0, tq, tk, tk)?;
                    if slots[0].needed {
                        let kb = block(k, dims, b, head)?;
                        let mut dq = block_mut(&mut grads[slots[0].index], slots[0].offset, dims, b, head)?;
                        general_mat_mul(scale, &dsv, &kb, 1.0, &mut dq);
                    }
                    if slots[1].needed {
                        let qb = block(q, dims, b, head)?;
                        let mut dk = block_mut(&mut grads[slots[1].index], slots[1].offset, dims, b, head)?;
                        general_mat_mul(scale, &dsv.t(), &qb, 1.0, &mut dk);
                    }
                }
            }
            Ok(())
        },
    )
}

fn block_mut<'a>(
    t: &'a mut Tensor,
    offset: usize,
    dims: &AttentionDims,
    b: usize,
    head: usize,
) -> Result<ArrayViewMut2<'a, f32>> {
    let (rows, w) = (t.shape()[1], t.shape()[2]);
    let start = b * rows * w + offset + head * dims.head_dim;
    view_mut(t.as_mut_slice(), start, rows, dims.head_dim, w)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::random;

    /// Attention by the definition, in f64, on q/k/v given as `[B, T, H·dh]`.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, key_mask: Option<&Tensor>, causal: bool) -> Vec<f32> {
        let [bsz, tq, d] = q.shape().try_into().unwrap();
        let tk = k.shape()[1];
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let mut out = vec![0.0f32; bsz * tq * d];
        for b in 0..bsz {
            for h in 0..heads {
                for i in 0..tq {
                    let ok = |j: usize| key_mask.is_none_or(|m| m.as_slice()[b * tk + j] != 0.0) && !(causal && j > i);
                    let scores: Vec<f64> = (0..tk)
                        .map(|j| {
                            (0..dh)
                                .map(|c| {
                                    f64::from(q.as_slice()[(b * tq + i) * d + h * dh + c])
                                        * f64::from(k.as_slice()[(b * tk + j) * d + h * dh + c])
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = (0..tk)
                        .filter(|&j| ok(j))
                        .map(|j| scores[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = (0..tk)
                        .map(|j| if ok(j) { (scores[j] - max).exp() } else { 0.0 })
                        .collect();
                    let sum: f64 = w.iter().sum();
                    for c in 0..dh {
                        let o: f64 = (0..tk)
                            .map(|j| if sum > 0.0 { w[j] / sum } else { 0.0 } * f64::from(v.as_slice()[(b * tk + j) * d + h * dh + c]))
                            .sum();
                        out[(b * tq + i) * d + h * dh + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    fn at(t: &Tensor, offset: usize) -> Heads<'_> {
        Heads { t, offset }
    }

    #[test]
    fn packed_and_separate_inputs_match_the_definition() {
        let mut rng = random::rng(3);
        let (bsz, t, heads, dh) = (2, 5, 2, 3);
        let d = heads * dh;
        let qkv = random::uniform(&[bsz, t, 3 * d], -1.0, 1.0, &mut rng);
        let q = qkv.slice_axis(2, 0, d).unwrap();
        let k = qkv.slice_axis(2, d, 2 * d).unwrap();
        let v = qkv.slice_axis(2, 2 * d, 3 * d).unwrap();
        // second row: last two keys are padding
        let km = Tensor::from_vec(&[bsz, t], vec![1., 1., 1., 1., 1., 1., 1., 1., 0., 0.]).unwrap();
        for causal in [false, true] {
            let mask = AttentionMask {
                key_mask: Some(&km),
                bias: None,
                causal,
            };
            let want = naive(&q, &k, &v, heads, Some(&km), causal);
            let dims = attention_dims(at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), d, heads).unwrap();
            let scale = 1.0 / (dh as f32).sqrt();
            let (packed, probs) =
                attention_forward(at(&qkv, 0), at(&qkv, d), at(&qkv, 2 * d), &dims, scale, &mask, None).unwrap();
            let (sep, _) = attention_forward(at(&q, 0), at(&k, 0), at(&v, 0), &dims, scale, &mask, None).unwrap();
            for (a, b) in packed.as_slice().iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            assert_eq!(packed, sep);
            for row in probs.as_slice().chunks(t) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn fully_masked_rows_give_zeros_and_dropout_keeps_expectation() {
        let mut rng = random::rng(4);
        let x = random::uniform(&[1, 4, 4], -1.0, 1.0, &mut rng);
        let km = Tensor::zeros(&[1, 4]);
        let h = Heads { t: &x, offset: 0 };
        let dims = attention_dims(h, h, h, 4, 2).unwrap();
        let mask = AttentionMask {
            key_mask: Some(&km),
            ..AttentionMask::default()
        };
        let (out, probs) = attention_forward(h, h, h, &dims, 0.5, &mask, None).unwrap();
        assert!(out.as_slice().iter().chain(probs.as_slice()).all(|&v| v == 0.0));

        // Dropout: the stored probabilities decode to the undropped ones; about p of them are
        // marked dropped.
        let x = random::uniform(&[4, 32, 8], -1.0, 1.0, &mut rng);
        let h = Heads { t: &x, offset: 0 };
        let dims = attention_dims(h, h, h, 8, 2).unwrap();
        let none = AttentionMask::default();
        let (_, plain) = attention_forward(h, h, h, &dims, 0.5, &none, None).unwrap();
        let mut drng = random::rng(9);
        let (_, marked) = attention_forward(h, h, h, &dims, 0.5, &none, Some((0.25, &mut drng))).unwrap();
        assert_eq!(decode_probs(&marked), plain);
        let dropped = marked.as_slice().iter().filter(|v| v.is_sign_negative()).count();
        let frac = dropped as f64 / marked.len() as f64;
        assert!((frac - 0.25).abs() < 0.02, "{frac}");
    }
}
