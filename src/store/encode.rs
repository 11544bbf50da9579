//! Encoding of generated RGB images into their file formats: the only image encoder.

use std::io::Write;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder};

use super::metadata::{self, Provenance};
use crate::image::{ImageFormat, RgbImage};

/// JPEG quality (1-100) of stored images.
const JPEG_QUALITY: u8 = 92;

/// How to encode a request's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    pub format: ImageFormat,
    /// JPEG quality 1-100 (default 92); PNG and lossless WebP ignore it.
    pub quality: Option<u8>,
}

impl From<ImageFormat> for Encoding {
    fn from(format: ImageFormat) -> Self {
        Self {
            format,
            quality: None,
        }
    }
}

/// Encode one RGB image into `out` in `format`, at the default quality, without metadata.
pub fn encode(img: &RgbImage, format: ImageFormat, out: impl Write) -> image::ImageResult<()> {
    encode_with(img, format.into(), None, out)
}

/// Encode one RGB image into `out`, with its provenance embedded when given.
pub fn encode_with(
    img: &RgbImage,
    encoding: Encoding,
    provenance: Option<&Provenance>,
    mut out: impl Write,
) -> image::ImageResult<()> {
    let expected = img.width as usize * img.height as usize * 3;
    if img.data.len() != expected {
        return Err(image::ImageError::Parameter(
            image::error::ParameterError::from_kind(
                image::error::ParameterErrorKind::DimensionMismatch,
            ),
        ));
    }
    let (w, h, rgb) = (img.width, img.height, img.data.as_slice());
    let mut buf = Vec::new();
    match (encoding.format, provenance) {
        (ImageFormat::Jpeg, _) => JpegEncoder::new_with_quality(
            &mut buf,
            encoding.quality.unwrap_or(JPEG_QUALITY).clamp(1, 100),
        )
        .write_image(rgb, w, h, ExtendedColorType::Rgb8)?,
        (ImageFormat::Png, None) => {
            PngEncoder::new(&mut buf).write_image(rgb, w, h, ExtendedColorType::Rgb8)?
        }
        (ImageFormat::Png, Some(p)) => png_with_text(&mut buf, img, p).map_err(|e| {
            image::ImageError::Encoding(image::error::EncodingError::new(
                image::error::ImageFormatHint::Exact(image::ImageFormat::Png),
                e,
            ))
        })?,
        (ImageFormat::Webp, _) => {
            WebPEncoder::new_lossless(&mut buf).write_image(rgb, w, h, ExtendedColorType::Rgb8)?
        }
    }
    if let Some(p) = provenance {
        let xmp = p.xmp();
        let with = match encoding.format {
            ImageFormat::Png => None,
            ImageFormat::Jpeg => metadata::jpeg_with_xmp(&buf, &xmp),
            ImageFormat::Webp => metadata::webp_with_xmp(&buf, w, h, &xmp),
        };
        match with {
            Some(b) => buf = b,
            None if encoding.format != ImageFormat::Png => {
                tracing::warn!("generation metadata too large for the image file; left out")
            }
            None => {}
        }
    }
    out.write_all(&buf)?;
    Ok(())
}

/// A PNG with the XMP packet, the `parameters` text and `Software` in text chunks before the
/// image data.
fn png_with_text(
    out: &mut Vec<u8>,
    img: &RgbImage,
    p: &Provenance,
) -> Result<(), png::EncodingError> {
    let mut enc = png::Encoder::new(out, img.width, img.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk("Software".into(), p.software.clone())?;
    enc.add_itxt_chunk("parameters".into(), p.parameters_text())?;
    enc.add_itxt_chunk("XML:com.adobe.xmp".into(), p.xmp())?;
    let mut writer = enc.write_header()?;
    writer.write_image_data(&img.data)?;
    writer.finish()
}
