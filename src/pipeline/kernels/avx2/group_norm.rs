//! GroupNorm on CPU f32, split in two so a convolution can fuse the second half:
//! [`channel_affine`] reduces each group to mean and 1/std (two passes, f32 vector partial sums
//! flushed into f64 every few hundred elements) and folds them with gamma/beta into a per-channel
//! `y = x * scale + shift` (torch's `native_group_norm` formulation); [`apply`] or a
//! convolution's input staging then applies it, optionally followed by SiLU.

use pulp::{x86::V3, Simd};
use rayon::prelude::*;

use super::{affine_act, load, run, LANES};

/// Elements summed in f32 lanes before the partial sums move to f64.
const FLUSH: usize = 4 * LANES * 32;

/// Per-channel `y = act(x * scale + shift)` for one batch item.
#[derive(Debug, Clone)]
pub(crate) struct ChannelAffine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub silu: bool,
}

/// GroupNorm parameters (gamma, beta as f32 vectors).
#[derive(Debug, Clone)]
pub(crate) struct GroupNormParams {
    pub groups: usize,
    pub eps: f64,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub silu: bool,
}

#[inline(always)]
fn sum_f64(s: V3, x: &[f32], center: f32) -> (f64, f64) {
    // Returns (sum(x - center), sum((x - center)^2)).
    let c = s.splat_f32x8(center);
    let mut tot1 = 0f64;
    let mut tot2 = 0f64;
    for blk in x.chunks(FLUSH) {
        let z = s.splat_f32x8(0.0);
        let (mut a1, mut a2) = ([z; 4], [z; 4]);
        let full = blk.len() / (4 * LANES) * (4 * LANES);
        for q in blk[..full].chunks_exact(4 * LANES) {
            for j in 0..4 {
                let d = s.sub_f32s(load(s, q, j * LANES), c);
                a1[j] = s.add_f32s(a1[j], d);
                a2[j] = s.mul_add_f32x8(d, d, a2[j]);
            }
        }
        for j in 0..4 {
            let l1: [f32; LANES] = pulp::cast(a1[j]);
            let l2: [f32; LANES] = pulp::cast(a2[j]);
            tot1 += l1.iter().map(|&v| v as f64).sum::<f64>();
            tot2 += l2.iter().map(|&v| v as f64).sum::<f64>();
        }
        for &v in &blk[full..] {
            let d = (v - center) as f64;
            tot1 += d;
            tot2 += d * d;
        }
    }
    (tot1, tot2)
}

/// Mean and biased variance of one group: a first pass for the mean, a second for the
/// squared deviations from it (the rounded mean's error is corrected by the first moment).
pub(crate) fn mean_var(s: V3, x: &[f32]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    let mean = run(
        s,
        #[inline(always)]
        || sum_f64(s, x, 0.0),
    )
    .0 / n;
    let m32 = mean as f32;
    let (d1, d2) = run(
        s,
        #[inline(always)]
        || sum_f64(s, x, m32),
    );
    let dm = d1 / n;
    let var = (d2 / n - dm * dm).max(0.0);
    (m32 as f64 + dm, var)
}

/// Fold group statistics of one item `(C, HW)` with gamma/beta into per-channel scale/shift.
pub(crate) fn channel_affine(
    s: V3,
    x: &[f32],
    channels: usize,
    p: &GroupNormParams,
) -> ChannelAffine {
    let cg = channels / p.groups;
    let group_len = x.len() / p.groups;
    let stats: Vec<(f64, f64)> = x
        .par_chunks(group_len.max(1))
        .map(|g| mean_var(s, g))
        .collect();
    let mut scale = vec![0f32; channels];
    let mut shift = vec![0f32; channels];
    for c in 0..channels {
        let (mean, var) = stats[c / cg];
        let rstd = 1.0 / (var + p.eps).sqrt();
        let sc = rstd * p.gamma[c] as f64;
        scale[c] = sc as f32;
        shift[c] = (p.beta[c] as f64 - mean * sc) as f32;
    }
    ChannelAffine {
        scale,
        shift,
        silu: p.silu,
    }
}

/// `out = act(x * scale + shift)` per channel for one item `(C, HW)`.
pub(crate) fn apply(s: V3, x: &[f32], out: &mut [f32], hw: usize, a: &ChannelAffine) {
    out.par_chunks_mut(hw.max(1))
        .zip(x.par_chunks(hw.max(1)))
        .enumerate()
        .for_each(|(c, (o, xc))| {
            run(
                s,
                #[inline(always)]
                || affine_act(s, xc, o, a.scale[c], a.shift[c], a.silu),
            );
        });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx2::token_for_test;
    use candle_core::{Device, Module, Tensor};

    /// The largest difference from candle's GroupNorm (+ SiLU) on random data.
    fn max_err(
        s: V3,
        (b, c, h, w): (usize, usize, usize, usize),
        groups: usize,
        silu: bool,
    ) -> f32 {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (b, c, h, w), &dev).unwrap();
        let gamma = Tensor::randn(1f32, 0.3f32, c, &dev).unwrap();
        let beta = Tensor::randn(0f32, 0.3f32, c, &dev).unwrap();
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6).unwrap();
        let mut want = gn.forward(&x).unwrap();
        if silu {
            want = candle_nn::ops::silu(&want).unwrap();
        }
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = GroupNormParams {
            groups,
            eps: 1e-6,
            gamma: gamma.to_vec1().unwrap(),
            beta: beta.to_vec1().unwrap(),
            silu,
        };
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let item = c * h * w;
        let mut got = vec![0f32; xs.len()];
        for i in 0..b {
            let a = channel_affine(s, &xs[i * item..(i + 1) * item], c, &p);
            apply(
                s,
                &xs[i * item..(i + 1) * item],
                &mut got[i * item..(i + 1) * item],
                h * w,
                &a,
            );
        }
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn matches_candle_group_norm() {
        let Some(s) =
            token_for_test("pipeline::kernels::avx2::group_norm::tests::matches_candle_group_norm")
        else {
            return;
        };
        for &(b, c, h, w, g) in &[(2, 6, 5, 7, 3), (1, 32, 17, 9, 32), (2, 64, 33, 20, 32)] {
            for silu in [false, true] {
                let e = max_err(s, (b, c, h, w), g, silu);
                assert!(e <= 1e-5, "b{b} c{c} {h}x{w} g{g} silu {silu}: max err {e}");
            }
        }
    }

    #[test]
    fn offset_data_stays_accurate() {
        // A large common offset: the variance must not cancel catastrophically. Reference in f64.
        let Some(s) = token_for_test(
            "pipeline::kernels::avx2::group_norm::tests::offset_data_stays_accurate",
        ) else {
            return;
        };
        let (c, hw, groups) = (8, 64 * 64, 4);
        let x: Vec<f32> = Tensor::randn(30f32, 1f32, c * hw, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let p = GroupNormParams {
            groups,
            eps: 1e-6,
            gamma: vec![1.0; c],
            beta: vec![0.0; c],
            silu: false,
        };
        let a = channel_affine(s, &x, c, &p);
        let mut got = vec![0f32; x.len()];
        apply(s, &x, &mut got, hw, &a);
        let glen = x.len() / groups;
        let mut worst = 0f64;
        for (g, xs) in x.chunks(glen).enumerate() {
            let n = glen as f64;
            let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            for (i, &v) in xs.iter().enumerate() {
                let want = (v as f64 - mean) / (var + 1e-6).sqrt();
                worst = worst.max((got[g * glen + i] as f64 - want).abs());
            }
        }
        // x * scale + shift loses about |mean * scale| * 2^-24 to rounding: ~30 * 6e-8.
        assert!(worst <= 1e-5, "max err {worst}");
    }
}
