//! The generated image as every layer sees it, and the file formats it can be written in.
//! Plain data: the pipeline makes [`RgbImage`]s, the scheduler carries them, the store and
//! `generate` encode them (`store::encode`).

/// An 8-bit RGB image, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

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

    /// A format by name as requests and file names spell it: `jpeg`/`jpg`, `png`, `webp`
    /// (any case).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "jpeg" | "jpg" => Some(ImageFormat::Jpeg),
            "png" => Some(ImageFormat::Png),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    /// A format by the exact extension of a stored file (as [`Self::extension`] writes it).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_extensions() {
        assert_eq!(ImageFormat::parse("JPEG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::parse("jpg"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::parse("webp"), Some(ImageFormat::Webp));
        assert_eq!(ImageFormat::parse("gif"), None);
        assert_eq!(ImageFormat::from_extension("jpeg"), None);
        for f in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Webp] {
            assert_eq!(ImageFormat::from_extension(f.extension()), Some(f));
        }
    }
}
