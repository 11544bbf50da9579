//! Tiled VAE decoding for large images: the latent is cut into overlapping tiles, each decoded
//! alone, and neighbours are cross-faded over the overlap (the scheme of diffusers'
//! `AutoencoderKL.tiled_decode`). Peak memory then follows the tile, not the image: 2048x2048
//! decodes in the memory of 512x512 tiles. Used only above a size threshold, because tiles see
//! their own GroupNorm statistics and attention context, so results differ slightly from a
//! whole-image decode.

use candle_core::{Device, Tensor};

use crate::pipeline::error::Result;

/// Tiling geometry in latent cells.
#[derive(Debug, Clone, Copy)]
pub struct Tiling {
    /// Latents with more cells than this (h * w) are decoded in tiles.
    pub threshold_cells: usize,
    /// Tile side in latent cells.
    pub tile: usize,
    /// Overlap between neighbouring tiles in latent cells.
    pub overlap: usize,
}

impl Default for Tiling {
    /// Above 1024x1024 pixels (128x128 latent cells): 512-pixel tiles, 128 pixels cross-faded.
    fn default() -> Self {
        Self {
            threshold_cells: 128 * 128,
            tile: 64,
            overlap: 16,
        }
    }
}

impl Tiling {
    pub fn applies(&self, h: usize, w: usize) -> bool {
        h * w > self.threshold_cells && (h > self.tile || w > self.tile)
    }
}

/// Linear ramp weights `(1, 1, n, 1)` or `(1, 1, 1, n)` from ~0 to ~1 over `n` pixels.
fn ramp(n: usize, vertical: bool, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let t = Tensor::from_vec(v, n, dev)?;
    Ok(if vertical {
        t.reshape((1, 1, n, 1))?
    } else {
        t.reshape((1, 1, 1, n))?
    })
}

/// Cross-fade `b`'s first `n` rows (or columns) with `a`'s last `n`.
fn blend(a: &Tensor, b: &Tensor, n: usize, vertical: bool) -> Result<Tensor> {
    let dim = if vertical { 2 } else { 3 };
    let n = n.min(a.dim(dim)?).min(b.dim(dim)?);
    if n == 0 {
        return Ok(b.clone());
    }
    let w = ramp(n, vertical, b.device())?;
    let a_tail = a.narrow(dim, a.dim(dim)? - n, n)?;
    let b_head = b.narrow(dim, 0, n)?;
    let mixed = (a_tail.broadcast_mul(&(1.0 - &w)?)? + b_head.broadcast_mul(&w)?)?;
    let rest = b.narrow(dim, n, b.dim(dim)? - n)?;
    Ok(Tensor::cat(&[&mixed, &rest], dim)?)
}

/// Decode `latents (B, C, h, w)` tile by tile with `decode` (latent tile -> pixels), each tile
/// `tiling.tile` cells with `tiling.overlap` cells shared with its neighbours; `factor` pixels per
/// cell.
pub fn decode_tiled(
    latents: &Tensor,
    tiling: Tiling,
    factor: usize,
    decode: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = latents.dims4()?;
    let stride = tiling.tile.saturating_sub(tiling.overlap).max(1);
    let blend_px = tiling.overlap * factor;
    let keep_px = stride * factor;
    let starts = |n: usize| -> Vec<usize> { (0..n).step_by(stride).collect() };
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for &i in &starts(h) {
        let mut row = Vec::new();
        for &j in &starts(w) {
            let th = tiling.tile.min(h - i);
            let tw = tiling.tile.min(w - j);
            row.push(decode(&latents.narrow(2, i, th)?.narrow(3, j, tw)?)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for ri in 0..rows.len() {
        let mut pieces = Vec::with_capacity(rows[ri].len());
        for ci in 0..rows[ri].len() {
            let mut tile = rows[ri][ci].clone();
            if ri > 0 {
                tile = blend(&rows[ri - 1][ci], &tile, blend_px, true)?;
            }
            if ci > 0 {
                tile = blend(&rows[ri][ci - 1], &tile, blend_px, false)?;
            }
            let kh = keep_px.min(tile.dim(2)?);
            let kw = keep_px.min(tile.dim(3)?);
            pieces.push(tile.narrow(2, 0, kh)?.narrow(3, 0, kw)?);
        }
        out_rows.push(Tensor::cat(&pieces, 3)?);
    }
    let out = Tensor::cat(&out_rows, 2)?;
    Ok(out.narrow(2, 0, h * factor)?.narrow(3, 0, w * factor)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "decoder" that upsamples by repetition: tiling must rebuild the same image exactly
    /// (blending equal values gives the same values), whatever the tile and overlap.
    #[test]
    fn tiles_reassemble_a_position_independent_decode() -> Result<()> {
        let dev = Device::Cpu;
        let lat = Tensor::randn(0f32, 1.0, (2, 3, 37, 29), &dev)?;
        let up = |t: &Tensor| -> Result<Tensor> {
            let (_, _, h, w) = t.dims4()?;
            Ok(t.upsample_nearest2d(h * 4, w * 4)?)
        };
        let whole = up(&lat)?;
        for (tile, overlap) in [(8, 2), (16, 4), (10, 3), (64, 16)] {
            let t = Tiling {
                threshold_cells: 0,
                tile,
                overlap,
            };
            let got = decode_tiled(&lat, t, 4, up)?;
            assert_eq!(got.dims(), whole.dims());
            let err = (got - &whole)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "tile {tile} overlap {overlap}: {err}");
        }
        Ok(())
    }
}
