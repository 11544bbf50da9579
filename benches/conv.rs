//! Per-layer times of the VAE decoder's 3x3 convolutions (`kernels::Conv2d`: Winograd on CPUs
//! with AVX2 + FMA, candle's conv2d elsewhere) at the bench model's decoder shapes, with the
//! GroupNorm + SiLU fused before the convolution, or the nearest 2x upsample of its input.
//! Process CPU time as well as wall time, so the figures mean something on a busy machine.
//! No model needed.
//!
//!     cargo bench --bench conv [-- --reps 10]

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use diffusiond::pipeline::kernels::{Conv2d, GroupNorm};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// User + system CPU seconds of this process (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) / 100.0)
}

fn main() {
    diffusiond::pipeline::device::init_cpu_runtime();
    let mut reps = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => {
                reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N");
            }
            "--bench" => {}
            other => panic!("unknown argument {other:?} (takes --reps N)"),
        }
    }
    let dev = Device::Cpu;
    let mut total = 0.0;
    // (in, out, h, w, upsample, how many such layers the decoder has)
    for &(cin, cout, h, w, up, count) in &[
        (128usize, 128usize, 32usize, 32usize, false, 10usize),
        (128, 128, 32, 32, true, 1),
        (128, 128, 64, 64, false, 6),
        (128, 128, 64, 64, true, 1),
        (128, 64, 128, 128, false, 1),
        (64, 64, 128, 128, false, 5),
        (64, 64, 128, 128, true, 1),
        (64, 32, 256, 256, false, 1),
        (32, 32, 256, 256, false, 5),
        (32, 3, 256, 256, false, 1),
    ] {
        let weight = Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &dev).expect("weight");
        let bias = Tensor::randn(0f32, 0.1, cout, &dev).expect("bias");
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::new(candle_nn::Conv2d::new(weight, Some(bias), cfg)).expect("conv");
        let norm_vars: HashMap<String, Tensor> = [
            (
                "weight".to_string(),
                Tensor::ones(cin, DType::F32, &dev).expect("gamma"),
            ),
            (
                "bias".to_string(),
                Tensor::zeros(cin, DType::F32, &dev).expect("beta"),
            ),
        ]
        .into();
        let vb = VarBuilder::from_tensors(norm_vars, DType::F32, &dev);
        let norm = GroupNorm::new(32.min(cin), cin, 1e-6, true, vb).expect("norm");
        let pre = (!up).then_some(&norm);
        let x = Tensor::randn(0f32, 1.0, (1, cin, h, w), &dev).expect("x");
        let y = conv.forward_fused(&x, pre, up, None).expect("conv");
        let (hu, wu) = if up { (2 * h, 2 * w) } else { (h, w) };
        assert_eq!(y.dims(), &[1, cout, hu, wu], "output shape");
        let (c0, t0) = (cpu_seconds(), Instant::now());
        for _ in 0..reps {
            conv.forward_fused(&x, pre, up, None).expect("conv");
        }
        let cpu = (cpu_seconds() - c0) / reps as f64;
        let wall = t0.elapsed().as_secs_f64() / reps as f64;
        let gf = 2.0 * 9.0 * (cin * cout * hu * wu) as f64 / 1e9;
        total += cpu * count as f64;
        println!(
            "{cin:>3}->{cout:>3} {hu:>3}x{wu:<3} up {up:<5}: cpu {:6.2} ms wall {:6.2} ms ({:5.0} direct-GF/s per cpu-s) x{count}",
            cpu * 1e3,
            wall * 1e3,
            gf / cpu.max(1e-9)
        );
    }
    println!("total cpu {:.1} ms", total * 1e3);
}
