//! 1x1 convolution on CPU f32: a `(Cout, Cin) x (Cin, HW)` GEMM on the shared micro-kernel,
//! parallel over chunks of pixels (each chunk's input is packed into 16-pixel panels first).

use pulp::x86::V3;
use rayon::prelude::*;

use super::{microkernel_dyn, pack_weight_blocks, run, with_scratch, CONV_MR, CONV_NR};

/// Pixels per parallel task.
const CHUNK: usize = 16 * CONV_NR;

#[derive(Debug)]
pub(crate) struct Pointwise {
    pub cin: usize,
    pub cout: usize,
    w: Vec<f32>,
    bias: Vec<f32>,
}

impl Pointwise {
    /// `w` is `(cout, cin)` row-major (a `(cout, cin, 1, 1)` kernel).
    pub fn new(w: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize) -> Self {
        Self {
            cin,
            cout,
            w: pack_weight_blocks(w, cout, cin),
            bias: bias.map_or_else(|| vec![0.0; cout], <[f32]>::to_vec),
        }
    }

    /// One item: `x` `(cin, hw)` -> `out` `(cout, hw)`.
    pub fn forward(&self, s: V3, x: &[f32], hw: usize, out: &mut [f32]) {
        if hw == 0 {
            return;
        }
        let nchunk = hw.div_ceil(CHUNK);
        let mut per_task: Vec<Vec<&mut [f32]>> = (0..nchunk).map(|_| Vec::new()).collect();
        for plane in out.chunks_mut(hw) {
            for (t, seg) in plane.chunks_mut(CHUNK).enumerate() {
                per_task[t].push(seg);
            }
        }
        let cin = self.cin;
        per_task
            .into_par_iter()
            .enumerate()
            .for_each(|(t, mut segs)| {
                with_scratch(CHUNK * cin, |panel| {
                    run(
                        s,
                        #[inline(always)]
                        || self.chunk(s, x, hw, t * CHUNK, panel, &mut segs),
                    )
                })
            });
    }

    #[inline(always)]
    fn chunk(
        &self,
        s: V3,
        x: &[f32],
        hw: usize,
        p0: usize,
        panel: &mut [f32],
        segs: &mut [&mut [f32]],
    ) {
        let cin = self.cin;
        let n = CHUNK.min(hw - p0);
        let npanel = n.div_ceil(CONV_NR);
        // panel[p][ci][16] = x[ci][p0 + 16 p ..], zero past the end; read x row by row.
        for ci in 0..cin {
            let row = &x[ci * hw + p0..ci * hw + p0 + n];
            for (p, src) in row.chunks(CONV_NR).enumerate() {
                let dst = &mut panel[(p * cin + ci) * CONV_NR..(p * cin + ci + 1) * CONV_NR];
                match (
                    dst.first_chunk_mut::<CONV_NR>(),
                    src.first_chunk::<CONV_NR>(),
                ) {
                    (Some(d), Some(v)) => *d = *v,
                    _ => {
                        dst[..src.len()].copy_from_slice(src);
                        dst[src.len()..].fill(0.0);
                    }
                }
            }
        }
        for b0 in (0..self.cout).step_by(CONV_MR) {
            let cb = CONV_MR.min(self.cout - b0);
            let a = &self.w[b0 * cin..(b0 + cb) * cin];
            for p in 0..npanel {
                let b = &panel[p * cin * CONV_NR..(p + 1) * cin * CONV_NR];
                let len = CONV_NR.min(n - p * CONV_NR);
                microkernel_dyn(
                    s,
                    cb,
                    a,
                    b,
                    cin,
                    #[inline(always)]
                    |c, vals| {
                        let bias = self.bias[b0 + c];
                        let dst = &mut segs[b0 + c][p * CONV_NR..p * CONV_NR + len];
                        match dst.first_chunk_mut::<CONV_NR>() {
                            Some(d) => *d = vals.map(|v| v + bias),
                            None => {
                                for (d, v) in dst.iter_mut().zip(vals) {
                                    *d = v + bias;
                                }
                            }
                        }
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx2::token_for_test;

    #[test]
    fn matches_matmul() {
        let Some(s) = token_for_test("pipeline::kernels::avx2::pointwise::tests::matches_matmul")
        else {
            return;
        };
        for &(cin, cout, hw) in &[(5, 3, 7), (64, 32, 1000), (13, 11, CHUNK + 17)] {
            let x: Vec<f32> = (0..cin * hw)
                .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
                .collect();
            let w: Vec<f32> = (0..cout * cin)
                .map(|i| ((i * 3) % 5) as f32 * 0.2 - 0.4)
                .collect();
            let b: Vec<f32> = (0..cout).map(|i| i as f32 * 0.01).collect();
            let conv = Pointwise::new(&w, Some(&b), cout, cin);
            let mut out = vec![f32::NAN; cout * hw];
            conv.forward(s, &x, hw, &mut out);
            for co in 0..cout {
                for p in 0..hw {
                    let want: f64 = b[co] as f64
                        + (0..cin)
                            .map(|ci| w[co * cin + ci] as f64 * x[ci * hw + p] as f64)
                            .sum::<f64>();
                    let got = out[co * hw + p] as f64;
                    assert!((got - want).abs() < 1e-5, "co {co} p {p}: {got} vs {want}");
                }
            }
        }
    }
}
