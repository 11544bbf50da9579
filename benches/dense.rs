//! GFLOPS of the dense-layer GEMM on the bench model's shapes (283 tokens = 256 image + 27
//! caption; 4 images = 1132): our packed AVX-512 GEMM vs candle's matmul (the gemm crate), same
//! inputs, same threads. Prints one line per shape and the ratio.
//!
//! Also CPU f32 attention (`pipeline::attention::attention`, which runs the AVX-512 kernel) at
//! the bench model's shape (8 heads of 66, 288 tokens).
//!
//!     cargo bench --bench dense [-- --reps 50]

use std::time::Instant;

use candle_core::{Device, Tensor};
use diffusiond::pipeline::attention::attention;
use diffusiond::pipeline::kernels::PackedDense;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() {
    diffusiond::pipeline::device::init_cpu_runtime();
    let reps = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dev = Device::Cpu;
    for &m in &[283usize, 1132] {
        for &(k, n) in &[(528usize, 1584usize), (528, 528), (528, 2816), (1408, 528)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).expect("x");
            let w = Tensor::randn(0f32, 0.05, (k, n), &dev).expect("w");
            let Some(p) = PackedDense::prepare(&w, None).expect("pack") else {
                println!("no AVX-512 on this CPU: nothing to compare");
                return;
            };
            let ours = time(reps, || {
                p.try_forward(&x).expect("ours").expect("fast path");
            });
            let theirs = time(reps, || {
                x.matmul(&w).expect("candle");
            });
            let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
            println!(
                "m={m:<5} k={k:<5} n={n:<5} packed {:7.1} GFLOPS  candle/gemm {:7.1} GFLOPS  ratio {:.2}",
                gf(ours),
                gf(theirs),
                ours / theirs
            );
        }
    }
    for &(b, s) in &[(1usize, 288usize), (4, 288)] {
        let (h, d) = (8, 66);
        let q = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).expect("q");
        let k = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).expect("k");
        let v = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).expect("v");
        let lens = vec![s; b];
        let t = time(reps, || {
            attention(&q, &k, &v, Some(&lens)).expect("attention");
        });
        let flops = 4.0 * (b * h * s * s * d) as f64;
        println!(
            "attention b={b} heads={h}x{d} S={s}: {:.3} ms, {:.1} GFLOPS",
            t * 1e3,
            flops / t / 1e9
        );
    }
}
