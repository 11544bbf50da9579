//! Decoder output -> 8-bit RGB.

use candle_core::{DType, Tensor};

use super::error::Result;

pub use crate::image::RgbImage;

/// `(B, 3, H, W)` in [-1, 1] -> one RGB image per item: `clamp(x/2 + 0.5, 0, 1)`, then
/// `round(x * 255)` with ties to even (numpy's rounding), all in f32.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    let nhwc = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * c;
    Ok((0..b)
        .map(|i| RgbImage {
            width: w as u32,
            height: h as u32,
            data: nhwc[i * per..(i + 1) * per]
                .iter()
                .map(|&x| quantize(x))
                .collect(),
        })
        .collect())
}

fn quantize(x: f32) -> u8 {
    let v = (x / 2.0 + 0.5).clamp(0.0, 1.0);
    round_u8(v * 255.0)
}

/// numpy's `round` (half to even) of a value already in [0, 255].
fn round_u8(scaled: f32) -> u8 {
    scaled.round_ties_even() as u8
}

#[cfg(test)]
mod tests {
    use super::{quantize, round_u8};

    #[test]
    fn clamps_to_the_byte_range() {
        assert_eq!(quantize(-2.0), 0);
        assert_eq!(quantize(3.0), 255);
        assert_eq!(quantize(1.0), 255);
        assert_eq!(quantize(-1.0), 0);
    }

    #[test]
    fn rounds_half_to_even() {
        assert_eq!(round_u8(0.5), 0);
        assert_eq!(round_u8(1.5), 2);
        assert_eq!(round_u8(2.5), 2);
        assert_eq!(round_u8(2.5001), 3);
        assert_eq!(round_u8(254.5), 254);
    }
}
