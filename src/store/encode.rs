//! Image file formats and encoding of generated RGB images.

use std::io::Write;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::scheduler::Image;

/// JPEG quality (1-100) of stored images.
const JPEG_QUALITY: u8 = 92;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    /// Lossless WebP (the encoder available here has no lossy mode).
    Webp,
}

impl ImageFormat {
    /// File extension, as it appears in image URLs.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Webp => "webp",
        }
    }

    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "jpg" => Some(ImageFormat::Jpeg),
            "png" => Some(ImageFormat::Png),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// Encode one RGB image into `out`.
pub fn encode(img: &Image, format: ImageFormat, out: impl Write) -> image::ImageResult<()> {
    let expected = img.width as usize * img.height as usize * 3;
    if img.rgb.len() != expected {
        return Err(image::ImageError::Parameter(
            image::error::ParameterError::from_kind(
                image::error::ParameterErrorKind::DimensionMismatch,
            ),
        ));
    }
    let (w, h, rgb) = (img.width, img.height, img.rgb.as_slice());
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
