//! Row-wise passes of the transformer block, each fused into one read and one write of its rows
//! (candle would make three to five passes, each with its own output tensor):
//!
//! - [`norm_scale`]: `RMSNorm(x) * w * scale` (the pre-norm and its adaLN scale),
//! - [`residual`]: `x + gate * RMSNorm(h) * w` (the post-norm, its tanh gate and the residual),
//! - [`qk_norm_rope`]: one head's q or k RMSNorm followed by the interleaved rotary embedding.
//!
//! The order of operations is the reference's (`x * rsqrt(mean(x^2) + eps) * w`, then the
//! modulation); the sum of squares uses 8 partial sums. Each row depends only on itself.

use pulp::{f32x8, x86::V3};

use super::{load, store, LANES};

/// `1 / sqrt(mean(x^2) + eps)`.
#[inline(always)]
pub(crate) fn rms_inv(s: V3, x: &[f32], eps: f32) -> f32 {
    let mut acc = s.splat_f32x8(0.0);
    let mut i = 0;
    while i + LANES <= x.len() {
        let v = load(s, x, i);
        acc = s.mul_add_f32x8(v, v, acc);
        i += LANES;
    }
    let lanes: [f32; LANES] = pulp::cast(acc);
    let mut sum: f32 = lanes.iter().sum();
    for &v in &x[i..] {
        sum += v * v;
    }
    1.0 / (sum / x.len() as f32 + eps).sqrt()
}

/// `out = x * r * w (* scale)` with `r = rms_inv(x)`.
#[inline(always)]
pub(crate) fn norm_scale(
    s: V3,
    x: &[f32],
    w: &[f32],
    scale: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    let r = rms_inv(s, x, eps);
    let rv = s.splat_f32x8(r);
    let n = x.len();
    let mut i = 0;
    while i + LANES <= n {
        let mut v = s.mul_f32x8(s.mul_f32x8(load(s, x, i), rv), load(s, w, i));
        if let Some(sc) = scale {
            v = s.mul_f32x8(v, load(s, sc, i));
        }
        store(out, i, v);
        i += LANES;
    }
    for j in i..n {
        let mut v = x[j] * r * w[j];
        if let Some(sc) = scale {
            v *= sc[j];
        }
        out[j] = v;
    }
}

/// `out = x + gate * (h * r * w)` with `r = rms_inv(h)` (no gate: `x + h * r * w`).
#[inline(always)]
pub(crate) fn residual(
    s: V3,
    x: &[f32],
    h: &[f32],
    w: &[f32],
    gate: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) {
    let r = rms_inv(s, h, eps);
    let rv = s.splat_f32x8(r);
    let n = x.len();
    let mut i = 0;
    while i + LANES <= n {
        let mut v: f32x8 = s.mul_f32x8(s.mul_f32x8(load(s, h, i), rv), load(s, w, i));
        if let Some(g) = gate {
            v = s.mul_f32x8(v, load(s, g, i));
        }
        store(out, i, s.add_f32x8(load(s, x, i), v));
        i += LANES;
    }
    for j in i..n {
        let mut v = h[j] * r * w[j];
        if let Some(g) = gate {
            v *= g[j];
        }
        out[j] = x[j] + v;
    }
}

/// The rotary tables of one position spread over a head's `d` values, for [`qk_norm_rope`]:
/// `cos2[2i] = cos2[2i+1] = cos[i]`, `sin2[2i] = -sin[i]`, `sin2[2i+1] = sin[i]`.
pub(crate) fn expand_rope(cos: &[f32], sin: &[f32], cos2: &mut [f32], sin2: &mut [f32]) {
    for (i, (&c, &sn)) in cos.iter().zip(sin).enumerate() {
        cos2[2 * i] = c;
        cos2[2 * i + 1] = c;
        sin2[2 * i] = -sn;
        sin2[2 * i + 1] = sn;
    }
}

/// One head vector: RMSNorm with weight `w`, then rotate pairs `(2i, 2i+1)` by the angle whose
/// cosine and sine are spread in `cos2`, `sin2` ([`expand_rope`]): `out = n cos2 + swap(n) sin2`
/// with `swap` exchanging the two values of each pair (candle's `rope_i`, the reference's
/// complex product).
#[inline(always)]
pub(crate) fn qk_norm_rope(
    s: V3,
    x: &[f32],
    w: &[f32],
    cos2: &[f32],
    sin2: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let r = rms_inv(s, x, eps);
    let rv = s.splat_f32x8(r);
    let d = x.len();
    let mut i = 0;
    while i + LANES <= d {
        let n = s.mul_f32x8(s.mul_f32x8(load(s, x, i), rv), load(s, w, i));
        let swapped: f32x8 = pulp::cast(s.avx._mm256_permute_ps::<0b10_11_00_01>(pulp::cast(n)));
        let v = s.mul_add_f32x8(swapped, load(s, sin2, i), s.mul_f32x8(n, load(s, cos2, i)));
        store(out, i, v);
        i += LANES;
    }
    while i + 1 < d {
        let a = x[i] * r * w[i];
        let b = x[i + 1] * r * w[i + 1];
        out[i] = a * cos2[i] + b * sin2[i];
        out[i + 1] = b * cos2[i + 1] + a * sin2[i + 1];
        i += 2;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx2::{run, token_for_test};

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() < 1e-5 * (1.0 + b.abs())
    }

    #[test]
    fn fused_rows_match_the_formulas() {
        let Some(s) =
            token_for_test("pipeline::kernels::avx2::rows::tests::fused_rows_match_the_formulas")
        else {
            return;
        };
        let n = 37;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let h: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / n as f32).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).tanh()).collect();
        let rms = |v: &[f32]| {
            let m = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / n as f64;
            1.0 / (m + 1e-5).sqrt()
        };
        let mut out = vec![0f32; n];
        run(s, || norm_scale(s, &x, &w, Some(&g), 1e-5, &mut out));
        for i in 0..n {
            assert!(close(
                out[i],
                x[i] as f64 * rms(&x) * w[i] as f64 * g[i] as f64
            ));
        }
        run(s, || residual(s, &x, &h, &w, Some(&g), 1e-5, &mut out));
        for i in 0..n {
            let want = x[i] as f64 + g[i] as f64 * h[i] as f64 * rms(&h) * w[i] as f64;
            assert!(close(out[i], want), "{i}: {} vs {want}", out[i]);
        }
        let d = 36;
        let cos: Vec<f32> = (0..d / 2).map(|i| (i as f32).cos()).collect();
        let sin: Vec<f32> = (0..d / 2).map(|i| (i as f32).sin()).collect();
        let (mut cos2, mut sin2) = (vec![0f32; d], vec![0f32; d]);
        expand_rope(&cos, &sin, &mut cos2, &mut sin2);
        run(s, || {
            qk_norm_rope(s, &x[..d], &w[..d], &cos2, &sin2, 1e-5, &mut out[..d])
        });
        let r = {
            let m = x[..d].iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / d as f64;
            1.0 / (m + 1e-5).sqrt()
        };
        for i in 0..d / 2 {
            let a = x[2 * i] as f64 * r * w[2 * i] as f64;
            let b = x[2 * i + 1] as f64 * r * w[2 * i + 1] as f64;
            assert!(close(out[2 * i], a * cos[i] as f64 - b * sin[i] as f64));
            assert!(close(out[2 * i + 1], a * sin[i] as f64 + b * cos[i] as f64));
        }
    }
}
