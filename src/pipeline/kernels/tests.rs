#![allow(clippy::unwrap_used)]
use super::*;
use candle_core::{DType, Device};
use candle_nn::{Conv2dConfig, VarMap};

/// The largest absolute value in `t`.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b).max(1.0)
}

fn conv(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> candle_nn::Conv2d {
    let cfg = Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, k, cfg, vb).unwrap()
}

/// The fast layers against candle's conv2d / GroupNorm / silu / upsample on random data:
/// odd sizes, channel counts that are not multiples of 8, two batch items.
#[test]
fn fast_layers_match_candle() {
    let dev = Device::Cpu;
    for &(b, cin, cout, h, w, groups) in &[
        (2, 6, 10, 9, 13, 3),
        (1, 32, 32, 16, 16, 32),
        (2, 12, 7, 7, 22, 4),
        (1, 64, 3, 11, 5, 32),
    ] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let c3 = conv(cin, cout, 3, vb.pp("c3"));
        let c1 = conv(cin, cout, 1, vb.pp("c1"));
        // Create the norm's variables, give them non-trivial values, then load them.
        GroupNorm::new(groups, cin, 1e-6, true, vb.pp("norm")).unwrap();
        for (name, v) in map.data().lock().unwrap().iter() {
            if name.starts_with("norm") {
                v.set(&Tensor::randn(0.5f32, 0.5, cin, &dev).unwrap())
                    .unwrap();
            }
        }
        let norm = GroupNorm::new(groups, cin, 1e-6, true, vb.pp("norm")).unwrap();
        let fast3 = Conv2d::new(c3.clone()).unwrap();
        let fast1 = Conv2d::new(c1.clone()).unwrap();
        if fast3.fast.is_none() {
            detect::skipped(
                "pipeline::kernels::tests::fast_layers_match_candle",
                "AVX2 + FMA",
            );
            return;
        }
        assert!(fast1.fast.is_some() && norm.fast.is_some());
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();

        // Plain 3x3 and 1x1.
        let e = max_rel_err(&fast3.forward(&x).unwrap(), &c3.forward(&x).unwrap());
        assert!(e <= 1e-5, "3x3 {b}x{cin}x{h}x{w}->{cout}: {e}");
        let e = max_rel_err(&fast1.forward(&x).unwrap(), &c1.forward(&x).unwrap());
        assert!(e <= 1e-5, "1x1 {b}x{cin}x{h}x{w}->{cout}: {e}");

        // GroupNorm + SiLU alone.
        let want_n = candle_nn::ops::silu(&norm.inner.forward(&x).unwrap()).unwrap();
        let e = max_rel_err(&norm.forward(&x).unwrap(), &want_n);
        assert!(e <= 1e-5, "group norm: {e}");

        // Norm + SiLU + conv + residual, and upsample + conv.
        let res = Tensor::randn(0f32, 1.0, (b, cout, h, w), &dev).unwrap();
        let got = fast3
            .forward_fused(&x, Some(&norm), false, Some(&res))
            .unwrap();
        let want = (&res + c3.forward(&want_n).unwrap()).unwrap();
        let e = max_rel_err(&got, &want);
        assert!(e <= 1e-5, "fused norm conv residual: {e}");
        // The same in the residual's storage.
        let acc = res.copy().unwrap();
        let got = fast3.forward_residual(&x, Some(&norm), acc).unwrap();
        let e = max_rel_err(&got, &want);
        assert!(e <= 1e-5, "fused norm conv residual in place: {e}");
        let got = fast3.forward_fused(&x, None, true, None).unwrap();
        let want = c3
            .forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap())
            .unwrap();
        let e = max_rel_err(&got, &want);
        assert!(e <= 1e-5, "upsample conv: {e}");
    }
}

/// Each item's result must not depend on the batch it is in.
#[test]
fn batch_items_are_independent() {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let c3 = Conv2d::new(conv(8, 8, 3, vb.pp("c3"))).unwrap();
    let norm = GroupNorm::new(4, 8, 1e-6, true, vb.pp("norm")).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 8, 10, 12), &dev).unwrap();
    let all = c3.forward_fused(&x, Some(&norm), true, None).unwrap();
    for i in 0..3 {
        let one = c3
            .forward_fused(&x.narrow(0, i, 1).unwrap(), Some(&norm), true, None)
            .unwrap();
        let d = (all.narrow(0, i, 1).unwrap() - one)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "item {i}");
    }
}

/// A `RowNorm` of `dim` with a non-trivial weight.
fn row_norm(dim: usize, seed: u64, dev: &Device) -> RowNorm {
    let w = (Tensor::randn(1f32, 0.3, dim, dev).unwrap() + 0.01 * seed as f64).unwrap();
    let vb = VarBuilder::from_tensors([("weight".to_string(), w)].into(), DType::F32, dev);
    RowNorm::new(dim, 1e-5, vb).unwrap()
}

/// The fused RMSNorm ops (norm x adaLN scale; residual + gate x norm) against candle's RmsNorm
/// and plain tensor arithmetic, with and without the per-item factors.
#[test]
fn row_norm_ops_match_candle() {
    let dev = Device::Cpu;
    let (b, s, d) = (2, 37, 40);
    let norm = row_norm(d, 1, &dev);
    let x = Tensor::randn(0f32, 1.0, (b, s, d), &dev).unwrap();
    let h = Tensor::randn(0f32, 2.0, (b, s, d), &dev).unwrap();
    let per_item = Tensor::randn(0f32, 1.0, (b, 1, d), &dev).unwrap();
    let factors = per_item.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let Some(plain) = norm.try_norm_scale(&x, None).unwrap() else {
        detect::skipped(
            "pipeline::kernels::tests::row_norm_ops_match_candle",
            "AVX2 + FMA",
        );
        return;
    };
    let want = norm.forward(&x).unwrap();
    assert!(max_abs_diff(&plain, &want) < 1e-5);
    let scaled = norm.try_norm_scale(&x, Some(&factors)).unwrap().unwrap();
    let want_scaled = want.broadcast_mul(&per_item).unwrap();
    assert!(max_abs_diff(&scaled, &want_scaled) < 1e-5);

    let res = norm.try_residual(&x, &h, None).unwrap().unwrap();
    let want_res = (&x + norm.forward(&h).unwrap()).unwrap();
    assert!(max_abs_diff(&res, &want_res) < 1e-5);
    let gated = norm.try_residual(&x, &h, Some(&factors)).unwrap().unwrap();
    let want_gated = (&x + norm.forward(&h).unwrap().broadcast_mul(&per_item).unwrap()).unwrap();
    assert!(max_abs_diff(&gated, &want_gated) < 1e-5);

    // Inputs off the fused path (not f32) are declined, not misread.
    let x16 = x.to_dtype(DType::F16).unwrap();
    assert!(norm.try_norm_scale(&x16, None).unwrap().is_none());
    assert!(norm.try_residual(&x16, &h, None).unwrap().is_none());
}

/// The one-pass q/k/v preparation against its definition in candle's ops: split the fused
/// projection, RMSNorm q and k per head, rotate pairs (`rope_i`) and move heads before rows.
#[test]
fn qkv_norm_rope_matches_split_norm_rope() {
    let dev = Device::Cpu;
    // Grouped-query heads, a head size that is not a multiple of 8, per-item rotary tables.
    let (b, s, h, hkv, d) = (2, 13, 4, 2, 22);
    let (nq, nk) = (row_norm(d, 2, &dev), row_norm(d, 3, &dev));
    let qkv = Tensor::randn(0f32, 1.0, (b, s, (h + 2 * hkv) * d), &dev).unwrap();
    let angles = Tensor::randn(0f32, 3.0, (b, s, d / 2), &dev).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let Some((q, k, v)) = qkv_norm_rope(&qkv, &nq, &nk, (&cos, &sin), (h, hkv, d)).unwrap() else {
        detect::skipped(
            "pipeline::kernels::tests::qkv_norm_rope_matches_split_norm_rope",
            "AVX2 + FMA",
        );
        return;
    };
    let part = |start: usize, heads: usize| {
        qkv.narrow(2, start * d, heads * d)
            .unwrap()
            .reshape((b, s, heads, d))
            .unwrap()
    };
    let rot = |t: Tensor| {
        let t = t.transpose(1, 2).unwrap().contiguous().unwrap();
        candle_nn::rotary_emb::rope_i(&t, &cos, &sin).unwrap()
    };
    let want_q = rot(nq.forward(&part(0, h)).unwrap());
    let want_k = rot(nk.forward(&part(h, hkv)).unwrap());
    let want_v = part(h + hkv, hkv).transpose(1, 2).unwrap();
    assert_eq!(q.dims(), &[b, h, s, d]);
    assert_eq!(k.dims(), &[b, hkv, s, d]);
    assert_eq!(v.dims(), &[b, hkv, s, d]);
    assert!(q.is_contiguous() && k.is_contiguous() && v.is_contiguous());
    assert!(max_abs_diff(&q, &want_q) < 1e-5, "q");
    assert!(max_abs_diff(&k, &want_k) < 1e-5, "k");
    assert_eq!(max_abs_diff(&v, &want_v), 0.0, "v is a copy");
}

/// The packed dense op against candle's matmul on shapes that do not fill the tiles (k and n
/// not multiples of the panel, one row, zero rows), with and without a bias, and its SwiGLU form.
#[test]
fn packed_dense_matches_matmul() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.2, (5, 7), &dev).unwrap();
    if PackedDense::prepare(&w, None).unwrap().is_none() {
        detect::skipped(
            "pipeline::kernels::tests::packed_dense_matches_matmul",
            "AVX-512",
        );
        return;
    }
    for &(m, k, n) in &[(0, 5, 7), (1, 33, 49), (9, 47, 95), (16, 48, 48), (3, 1, 1)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (k, n), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        for with_bias in [false, true] {
            let p = PackedDense::prepare(&w, with_bias.then_some(&bias))
                .unwrap()
                .unwrap();
            assert_eq!(p.out_dim(), n);
            let got = p.try_forward(&x).unwrap().unwrap();
            assert_eq!(got.dims(), &[m, n], "{m}x{k}x{n}");
            if m == 0 {
                continue;
            }
            let mut want = x.matmul(&w).unwrap();
            if with_bias {
                want = want.broadcast_add(&bias).unwrap();
            }
            let e = max_rel_err(&got, &want);
            assert!(e < 1e-5, "{m}x{k}x{n} bias {with_bias}: {e}");
        }
    }
    let (m, k, hidden) = (5, 29, 31);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let w1 = Tensor::randn(0f32, 0.3, (k, hidden), &dev).unwrap();
    let w3 = Tensor::randn(0f32, 0.3, (k, hidden), &dev).unwrap();
    let p = PackedDense::prepare_swiglu(&w1, &w3).unwrap().unwrap();
    assert_eq!(p.out_dim(), hidden);
    let got = p.try_forward(&x).unwrap().unwrap();
    let want =
        (candle_nn::ops::silu(&x.matmul(&w1).unwrap()).unwrap() * x.matmul(&w3).unwrap()).unwrap();
    assert!(max_rel_err(&got, &want) < 1e-5);
    // A mismatched width or a non-f32 input is declined.
    assert!(p
        .try_forward(&x.narrow(1, 0, k - 1).unwrap())
        .unwrap()
        .is_none());
    assert!(p
        .try_forward(&x.to_dtype(DType::F16).unwrap())
        .unwrap()
        .is_none());
}

/// The stand-ins used off x86-64 never offer a fast path (compiled and run here so that they
/// keep up with `ops.rs`).
#[test]
fn portable_ops_decline_everything() {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let c3 = conv(4, 4, 3, vb.pp("c3"));
    let w = Tensor::ones(4, DType::F32, &dev).unwrap();
    let wt = Tensor::ones((4, 4), DType::F32, &dev).unwrap();
    assert!(portable::FastConv::prepare(&c3).unwrap().is_none());
    assert!(portable::FastNorm::prepare(&w, &w, 2, 1e-6, true)
        .unwrap()
        .is_none());
    assert!(portable::PackedDense::prepare(&wt, None).unwrap().is_none());
    assert!(portable::PackedDense::prepare_swiglu(&wt, &wt)
        .unwrap()
        .is_none());
    assert!(portable::HostWeight::prepare(&w).unwrap().is_none());
}

/// With `DIFFUSIOND_DISABLE_SIMD` set no layer prepares a fast form: the whole library runs
/// candle's ops, as on a CPU without AVX2/AVX-512.
#[test]
fn disabling_simd_leaves_only_candle_ops() {
    if !detect::simd_disabled() {
        // Checked by the run with the variable set (`.ci/run`).
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "not run: kernels::tests::disabling_simd_leaves_only_candle_ops needs {}=1",
            detect::DISABLE_SIMD_VAR
        );
        return;
    }
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    assert!(Conv2d::new(conv(4, 4, 3, vb.pp("c3")))
        .unwrap()
        .fast
        .is_none());
    assert!(GroupNorm::new(2, 4, 1e-6, true, vb.pp("n"))
        .unwrap()
        .fast
        .is_none());
    assert!(RowNorm::new(4, 1e-6, vb.pp("r")).unwrap().host.is_none());
    let wt = Tensor::ones((4, 4), DType::F32, &dev).unwrap();
    assert!(PackedDense::prepare(&wt, None).unwrap().is_none());
}
