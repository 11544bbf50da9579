//! FLUX.2's latent layouts: the patchified latent `(128, h', w')` of one image (noise is drawn
//! in it), the packed token sequence `(h' w', 128)` the transformer reads (token `i w' + j`),
//! and the VAE latent `(32, 2h', 2w')` where patchified channel `c*4 + py*2 + px` holds pixel
//! `(c, 2i + py, 2j + px)` (channel-major). Plus the batch-norm de-normalisation, done in the
//! patchified space before unpatchifying.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::pipeline::error::Result;

/// `(C, h, w)` -> `(h w, C)`.
pub fn pack(latent: &Tensor) -> Result<Tensor> {
    let (c, h, w) = latent.dims3()?;
    Ok(latent.reshape((c, h * w))?.t()?.contiguous()?)
}

/// `(h w, C)` -> `(C, h, w)`.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, c) = tokens.dims2()?;
    Ok(tokens.t()?.contiguous()?.reshape((c, h, w))?)
}

/// `(B, 4C, h, w)` -> `(B, C, 2h, 2w)`.
pub fn unpatchify(x: &Tensor) -> Result<Tensor> {
    let (b, c4, h, w) = x.dims4()?;
    let c = c4 / 4;
    Ok(x.reshape((b, c, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// The VAE's `bn` running statistics, as `z * sqrt(var + eps) + mean` per patchified channel.
pub struct BatchNormStats {
    std: Tensor,
    mean: Tensor,
}

impl BatchNormStats {
    /// `bn.running_mean`, `bn.running_var` (`channels` each) of the VAE, kept in f32.
    pub fn load(vb: &VarBuilder, channels: usize, eps: f64) -> Result<Self> {
        let vb = vb.pp("bn").set_dtype(DType::F32);
        let mean = vb.get(channels, "running_mean")?;
        let var = vb.get(channels, "running_var")?;
        Ok(Self {
            std: (var + eps)?.sqrt()?.reshape((1, channels, 1, 1))?,
            mean: mean.reshape((1, channels, 1, 1))?,
        })
    }

    /// De-normalise patchified latents `(B, 4C, h, w)` (f32).
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layouts_round_trip_and_patch_order_is_channel_major() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 8.0 * 6.0, &dev)?.reshape((8, 2, 3))?;
        let packed = pack(&x)?;
        assert_eq!(packed.dims(), &[6, 8]);
        // Token 4 is (i, j) = (1, 1): its vector is the 8 channels there.
        let t4 = packed.get(4)?.to_vec1::<f32>()?;
        assert_eq!(t4, (0..8).map(|c| (c * 6 + 4) as f32).collect::<Vec<_>>());
        assert_eq!(
            unpack(&packed, 2, 3)?.to_vec3::<f32>()?,
            x.to_vec3::<f32>()?
        );
        // Patchified channel c*4 + py*2 + px of (i, j) lands at (c, 2i + py, 2j + px).
        let u = unpatchify(&x.unsqueeze(0)?)?.squeeze(0)?;
        assert_eq!(u.dims(), &[2, 4, 6]);
        for (c, py, px, i, j) in [(1usize, 0usize, 1usize, 1usize, 2usize), (0, 1, 0, 0, 1)] {
            let want = x
                .get(c * 4 + py * 2 + px)?
                .get(i)?
                .get(j)?
                .to_scalar::<f32>()?;
            let got = u
                .get(c)?
                .get(2 * i + py)?
                .get(2 * j + px)?
                .to_scalar::<f32>()?;
            assert_eq!(got, want);
        }
        Ok(())
    }
}
