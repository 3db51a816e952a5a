//! Fused row kernels of the transformer: layer normalisation over the last axis and the exact
//! (erf) GELU, each with its backward. One pass per row instead of a chain of broadcasting ops
//! (mean, sub, square, mean, add, sqrt, div, mul, add) saves eight temporaries per call.

use crate::{Result, Tensor, TensorError};

/// Per-row statistics a layer-norm forward keeps for its backward: `(mean, 1/√(var + eps))`.
pub type RowStats = Vec<[f32; 2]>;

fn last_axis(x: &Tensor, op: &'static str) -> Result<usize> {
    match x.shape().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(TensorError::Invalid {
            op,
            reason: format!("needs a non-empty last axis, got shape {:?}", x.shape()),
        }),
    }
}

/// Layer normalisation over the last axis with PyTorch's semantics (`nn.LayerNorm`): biased
/// variance, `eps` inside the square root, then `· weight + bias`.
///
/// # Shapes
/// `x: [..., d]`, `weight, bias: [d]` → `y: [..., d]` and one `(mean, rstd)` per row.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<(Tensor, RowStats)> {
    crate::simd::fast(
        #[inline(always)]
        || layer_norm_impl(x, weight, bias, eps),
    )
}

#[inline(always)]
fn layer_norm_impl(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<(Tensor, RowStats)> {
    let d = last_axis(x, "layer_norm")?;
    if weight.shape() != [d] || bias.shape() != [d] {
        return Err(TensorError::Invalid {
            op: "layer_norm",
            reason: format!(
                "weight and bias must be [{d}] for input {:?}, got {:?} and {:?}",
                x.shape(),
                weight.shape(),
                bias.shape()
            ),
        });
    }
    let (w, b) = (weight.as_slice(), bias.as_slice());
    let mut y = vec![0.0f32; x.len()];
    let mut stats = Vec::with_capacity(x.len() / d);
    for (row, out) in x.as_slice().chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        // Two passes (mean, then squared deviations): no cancellation for rows with a large
        // mean, which the one-pass E[x²] − E[x]² formula suffers from in f32.
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &wi), &bi) in out.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * rstd * wi + bi;
        }
        stats.push([mean, rstd]);
    }
    Ok((Tensor::from_vec(x.shape(), y)?, stats))
}

/// Gradients of [`layer_norm`]: `(dx, dweight, dbias)`.
///
/// With `x̂ = (x − μ)·r` and `ĝ = g ⊙ w`: `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))`,
/// `dw = Σ_rows g ⊙ x̂`, `db = Σ_rows g`.
pub fn layer_norm_backward(g: &Tensor, x: &Tensor, weight: &Tensor, stats: &[[f32; 2]]) -> Result<[Tensor; 3]> {
    crate::simd::fast(
        #[inline(always)]
        || layer_norm_backward_impl(g, x, weight, stats),
    )
}

#[inline(always)]
fn layer_norm_backward_impl(g: &Tensor, x: &Tensor, weight: &Tensor, stats: &[[f32; 2]]) -> Result<[Tensor; 3]> {
    let d = last_axis(x, "layer_norm_backward")?;
    if g.shape() != x.shape() || weight.shape() != [d] || stats.len() * d != x.len() {
        return Err(g.shape_err("layer_norm_backward", x));
    }
    let w = weight.as_slice();
    let mut dx = vec![0.0f32; x.len()];
    let mut dw = vec![0.0f32; d];
    let mut db = vec![0.0f32; d];
    let mut xhat = vec![0.0f32; d];
    let rows = x.as_slice().chunks_exact(d).zip(g.as_slice().chunks_exact(d));
    for (((row, grow), out), &[mean, rstd]) in rows.zip(dx.chunks_exact_mut(d)).zip(stats) {
        let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
        for j in 0..d {
            xhat[j] = (row[j] - mean) * rstd;
            let gh = grow[j] * w[j];
            sum_g += gh;
            sum_gx += gh * xhat[j];
            dw[j] += grow[j] * xhat[j];
            db[j] += grow[j];
        }
        let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
        for j in 0..d {
            out[j] = rstd * (grow[j] * w[j] - mg - xhat[j] * mgx);
        }
    }
    Ok([
        Tensor::from_vec(x.shape(), dx)?,
        Tensor::from_vec(&[d], dw)?,
        Tensor::from_vec(&[d], db)?,
    ])
}

/// The error function, to about 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), which is below
/// f32's resolution of `1 + erf(x)` in GELU. std's `erf` is not stable Rust yet.
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    let y = 1.0 - poly * (-ax * ax).exp();
    y.copysign(x)
}

/// `eˣ` for `x ≤ 0` (softmax after subtracting the row maximum; `-inf` gives 0), to about
/// 1 ulp: Cephes' `expf` (range reduction by ln 2 in two parts, degree-6 polynomial), written
/// without calls so row loops vectorise, where libm's `expf` is one call per element.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer
    const ROUND: f32 = 12_582_912.0;
    let small = x < -87.0; // below e⁻⁸⁷ the result is subnormal: flush to 0
    let xc = if small { 0.0 } else { x };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from its exponent bits, n ∈ [-126, 0]: t's low mantissa bits hold n (two's
    // complement), so integer ops give the exponent without a float→int conversion
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if small {
        0.0
    } else {
        y * two_n
    }
}

/// `eˣ` for any `x` (overflow gives `inf`, underflow 0), the same polynomial as
/// [`exp_nonpositive`]; for sigmoid and tanh, which ran through libm's `expf`/`tanhf` one call
/// per element (a fifth of an LSTM step).
#[inline]
pub fn exp_fast(x: f32) -> f32 {
    if x > 88.0 {
        f32::INFINITY
    } else if x > 0.0 {
        // e^x = 1 / e^-x keeps the exponent arithmetic in exp_nonpositive's range
        1.0 / exp_nonpositive(-x)
    } else {
        exp_nonpositive(x)
    }
}

/// `1 / (1 + e⁻ˣ)`, without overflow for large `|x|`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    // e = e^{-|x|} ≤ 1: 1/(1+e) for x ≥ 0, e/(1+e) for x < 0 (no cancellation in 1 − s)
    let e = exp_nonpositive(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { e };
    num / (1.0 + e)
}

/// `tanh(x)`: Cephes' `tanhf` (odd polynomial below |x| = 0.625, `1 − 2/(e^{2|x|} + 1)` above),
/// both branches computed and one selected so loops vectorise.
#[inline]
pub fn tanh(x: f32) -> f32 {
    let ax = x.abs();
    let z = x * x;
    let small = ((((-5.704_988_7e-3 * z + 2.063_908_8e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
        - 3.333_328e-1)
        * z
        * x
        + x;
    let e = exp_nonpositive(-2.0 * ax);
    // 1 − 2/(e^{2a} + 1) = (1 − e^{−2a}) / (1 + e^{−2a})
    let large = ((1.0 - e) / (1.0 + e)).copysign(x);
    if ax < 0.625 {
        small
    } else {
        large
    }
}

/// Sum of a row in eight independent lanes: one serial accumulator would keep the loop scalar
/// (f32 addition is not associative, so the compiler may not reorder it).
#[inline]
pub fn sum_lanes(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum of a row (`-inf` when empty) in eight lanes, as [`sum_lanes`].
#[inline]
pub fn max_lanes(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().fold(rest, |m, &x| if x > m { x } else { m })
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Exact GELU (PyTorch's default `approximate="none"`): `x·Φ(x) = ½x(1 + erf(x/√2))`.
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `d gelu/dx = Φ(x) + x·φ(x)`.
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf values from tables (Abramowitz & Stegun, table 7.1).
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.1, 0.112_462_9),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (3.0, 0.999_977_9),
        ] {
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 3e-7);
        }
        // PyTorch: torch.nn.functional.gelu(torch.tensor([-1., 0.5, 2.])) = [-0.1587, 0.3457, 1.9545]
        for (x, want) in [(-1.0f32, -0.158_655_3), (0.5, 0.345_731_1), (2.0, 1.954_499_7)] {
            assert!((gelu(x) - want).abs() < 1e-6, "gelu({x}) = {}", gelu(x));
        }
        for x in [-3.0f32, -0.7, 0.0, 0.3, 1.9] {
            let h = 1e-2;
            let numeric = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            assert!((gelu_grad(x) - numeric).abs() < 1e-3, "{x}");
        }
    }

    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_nonpositive(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
    }

    #[test]
    fn fast_sigmoid_tanh_exp_match_libm() {
        let (mut ws, mut wt, mut we) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..=400_000 {
            let x = -40.0 + 80.0 * i as f32 / 400_000.0;
            let s_ref = 1.0 / (1.0 + (-x).exp());
            ws = ws.max((sigmoid(x) - s_ref).abs() / s_ref.max(1e-30));
            wt = wt.max((tanh(x) - x.tanh()).abs() / x.tanh().abs().max(1e-30));
            we = we.max((exp_fast(x) - x.exp()).abs() / x.exp());
        }
        assert!(ws < 1e-6 && wt < 1e-6 && we < 1e-6, "sigmoid {ws}, tanh {wt}, exp {we}");
        assert_eq!(sigmoid(100.0), 1.0);
        assert_eq!(sigmoid(-100.0), 0.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
    }

    #[test]
    fn lane_reductions() {
        let v: Vec<f32> = (0..21).map(|i| (i as f32 * 7.3).sin()).collect();
        for n in [0, 1, 7, 8, 9, 21] {
            let s: f32 = v[..n].iter().sum();
            assert!((sum_lanes(&v[..n]) - s).abs() < 1e-5);
            let m = v[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_lanes(&v[..n]), m);
        }
    }

    #[test]
    fn layer_norm_matches_the_definition() {
        let x = Tensor::from_vec(&[2, 4], vec![1., 2., 3., 4., 1000., 1001., 1002., 1003.]).unwrap();
        let w = Tensor::from_vec(&[4], vec![1., 2., 1., 0.5]).unwrap();
        let b = Tensor::from_vec(&[4], vec![0., 0., 1., 0.]).unwrap();
        let (y, stats) = layer_norm(&x, &w, &b, 1e-5).unwrap();
        // var = 1.25 for both rows: shifting by 999 must not change the result
        let r = 1.0 / (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 * r, -0.5 * r * 2.0, 0.5 * r + 1.0, 1.5 * r * 0.5];
        for row in y.as_slice().chunks(4) {
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "{row:?}");
            }
        }
        assert_eq!(stats[1][0], 1001.5);
        assert!(layer_norm(&x, &Tensor::ones(&[3]), &b, 1e-5).is_err());
    }
}
