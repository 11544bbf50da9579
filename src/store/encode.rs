//! Encoding of generated RGB images into their file formats.

use std::io::Write;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::image::{ImageFormat, RgbImage};

/// JPEG quality (1-100) of stored images.
const JPEG_QUALITY: u8 = 92;

/// Encode one RGB image into `out` in `format`.
pub fn encode(img: &RgbImage, format: ImageFormat, out: impl Write) -> image::ImageResult<()> {
    let expected = img.width as usize * img.height as usize * 3;
    if img.data.len() != expected {
        return Err(image::ImageError::Parameter(
            image::error::ParameterError::from_kind(
                image::error::ParameterErrorKind::DimensionMismatch,
            ),
        ));
    }
    let (w, h, rgb) = (img.width, img.height, img.data.as_slice());
    match format {
        ImageFormat::Jpeg => JpegEncoder::new_with_quality(out, JPEG_QUALITY).write_image(
            rgb,
            w,
            h,
            ExtendedColorType::Rgb8,
        ),
        ImageFormat::Png => PngEncoder::new(out).write_image(rgb, w, h, ExtendedColorType::Rgb8),
        ImageFormat::Webp => {
            WebPEncoder::new_lossless(out).write_image(rgb, w, h, ExtendedColorType::Rgb8)
        }
    }
}
