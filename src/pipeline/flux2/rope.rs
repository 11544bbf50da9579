//! FLUX.2's 4-axis RoPE over the joint sequence `[text; image]`: positions `(t, h, w, l)` are
//! `(0, 0, 0, s)` for text token s and `(0, i, j, 0)` for image token (i, j); per axis of width
//! d the frequencies are `theta^(-2k/d)`, angles in f64, cos/sin cast to f32. Applied to
//! interleaved pairs `(x[2k], x[2k+1])` after the q/k norms.

use candle_core::{DType, Device, Tensor};

use crate::pipeline::error::Result;

/// Position ids of the joint sequence: `text_len` text tokens, then an `h x w` image grid.
pub fn positions(text_len: usize, h: usize, w: usize) -> Vec<[usize; 4]> {
    let mut ids = Vec::with_capacity(text_len + h * w);
    ids.extend((0..text_len).map(|s| [0, 0, 0, s]));
    for i in 0..h {
        ids.extend((0..w).map(|j| [0, i, j, 0]));
    }
    ids
}

/// Per-pair tables `(L, head_dim / 2)`: `cos` and `sin` of each pair's angle, f32.
pub fn tables(
    ids: &[[usize; 4]],
    axes: &[usize],
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half: usize = axes.iter().sum::<usize>() / 2;
    let freqs: Vec<(usize, f64)> = axes
        .iter()
        .enumerate()
        .flat_map(|(a, &d)| {
            (0..d / 2).map(move |k| (a, 1.0 / theta.powf((2 * k) as f64 / d as f64)))
        })
        .collect();
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for id in ids {
        for &(a, f) in &freqs {
            let angle = id[a] as f32 as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let n = ids.len();
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// Rotate interleaved pairs of `x` `(B, H, L, head_dim)` with f32 tables `(L, head_dim / 2)`;
/// computed in f32 whatever x's dtype, as the reference does, and returned in x's dtype.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::rotary_emb::rope_i(&xf, cos, sin)?.to_dtype(dt)?)
}

/// The tables widened to `(L, head_dim)` (each value twice), the reference's layout.
pub fn widen(t: &Tensor) -> Result<Tensor> {
    let (l, half) = t.dims2()?;
    Ok(t.unsqueeze(2)?
        .expand((l, half, 2))?
        .reshape((l, half * 2))?
        .to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_interleaved_pairs() -> Result<()> {
        let dev = Device::Cpu;
        let ids = positions(1, 1, 2);
        let (cos, sin) = tables(&ids, &[2, 2, 2, 2], 2000.0, &dev)?;
        // Image token (0, 1) has w = 1: axis 2 rotates its pair by 1 radian.
        let x = Tensor::from_vec(vec![1f32; 3 * 8], (1, 1, 3, 8), &dev)?;
        let y = apply(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
        let (c, s) = (1f64.cos() as f32, 1f64.sin() as f32);
        assert_eq!(&y[16..24], &[1.0, 1.0, 1.0, 1.0, c - s, c + s, 1.0, 1.0]);
        assert_eq!(&y[..8], &[1f32; 8]);
        Ok(())
    }
}
