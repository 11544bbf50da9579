//! The file store: generated images under `<data-dir>/files/gen/<request_id>/image_<i>.<ext>`.
//!
//! The only module that writes image files. Files are written to a temporary name in the request's
//! folder and renamed into place, so a reader never sees half a file. Reading goes only through
//! [`FileStore::open_file`], which accepts a request ID and file name in the exact shape they are made in,
//! so no path built from a request can leave the store.

mod encode;
mod id;
pub mod metadata;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub use crate::image::ImageFormat;
pub use encode::{encode, encode_with, Encoding};
pub use id::RequestId;
pub use metadata::Provenance;

use crate::image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("file store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("image encoding: {0}")]
    Encode(#[from] image::ImageError),
}

/// A stored image, opened for streaming: never read whole into memory.
#[derive(Debug)]
pub struct StoredFile {
    pub file: tokio::fs::File,
    /// Bytes in the file.
    pub len: u64,
    /// Last modification (the image's creation: files are never rewritten).
    pub modified: Option<std::time::SystemTime>,
    pub content_type: &'static str,
}

#[derive(Debug, Clone)]
pub struct FileStore {
    gen_dir: PathBuf,
}

impl FileStore {
    /// Open (and create) the store under a data directory.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let gen_dir = data_dir.join("files").join("gen");
        std::fs::create_dir_all(&gen_dir)?;
        Ok(Self { gen_dir })
    }

    /// File name of image `index` of a request.
    pub fn file_name(index: usize, format: ImageFormat) -> String {
        format!("image_{index}.{}", format.extension())
    }

    /// Encode and write a request's images (blocking: call from a blocking thread), each with its
    /// provenance embedded when `provenance` has one per image. Returns the file names in order.
    /// On error nothing of this request is left behind.
    pub fn save(
        &self,
        id: &RequestId,
        images: &[RgbImage],
        encoding: impl Into<Encoding>,
        provenance: Option<&[Provenance]>,
    ) -> Result<Vec<String>, StoreError> {
        let encoding = encoding.into();
        let format = encoding.format;
        let dir = self.gen_dir.join(id.as_str());
        std::fs::create_dir_all(&dir)?;
        let written = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let name = Self::file_name(i, format);
                let p = provenance.and_then(|p| p.get(i));
                write_atomically(&dir, &name, img, encoding, p).map(|()| name)
            })
            .collect::<Result<Vec<_>, _>>();
        if written.is_err() {
            // Best effort: the request failed, its folder must not look like a result.
            let _ = std::fs::remove_dir_all(&dir);
        }
        written
    }

    /// Open a stored image, given the URL's request ID and file name. `None` for anything that
    /// is not exactly a stored image.
    pub async fn open_file(&self, request_id: &str, file_name: &str) -> Option<StoredFile> {
        let id = RequestId::parse(request_id)?;
        let (_, format) = parse_file_name(file_name)?;
        // Neither the request's directory nor the file may be a symlink (or anything but what
        // save writes): a link planted under the store must not lead the server elsewhere.
        let request_dir = self.gen_dir.join(id.as_str());
        let dir_meta = tokio::fs::symlink_metadata(&request_dir).await.ok()?;
        if !dir_meta.is_dir() {
            return None;
        }
        let path = request_dir.join(file_name);
        let meta = tokio::fs::symlink_metadata(&path).await.ok()?;
        if !meta.is_file() {
            return None;
        }
        let file = tokio::fs::File::open(&path).await.ok()?;
        let meta = file.metadata().await.ok()?;
        Some(StoredFile {
            file,
            len: meta.len(),
            modified: meta.modified().ok(),
            content_type: format.content_type(),
        })
    }
}

impl FileStore {
    /// A stored image's bytes, read whole (for answers that carry the image inline), through
    /// the same checks as [`Self::open_file`].
    pub async fn read_all(&self, request_id: &str, file_name: &str) -> Option<Vec<u8>> {
        let file = self
            .open_file(request_id, file_name)
            .await?
            .file
            .into_std()
            .await;
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut bytes = Vec::new();
            (&file).read_to_end(&mut bytes).ok().map(|_| bytes)
        })
        .await
        .ok()
        .flatten()
    }

    /// Delete the requests whose folder is older than `max_age` (retention). Blocking: call
    /// from a blocking thread. Returns how many requests' images were deleted. A folder is
    /// removed whole, so a URL either still answers or answers 404.
    pub fn remove_older_than(&self, max_age: std::time::Duration) -> Result<usize, StoreError> {
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.gen_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            // Only what the store made: request folders, never anything else in the dir.
            if name.to_str().and_then(RequestId::parse).is_none() {
                continue;
            }
            let meta = entry.metadata()?;
            if !meta.is_dir() {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age > max_age {
                std::fs::remove_dir_all(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn write_atomically(
    dir: &Path,
    name: &str,
    img: &RgbImage,
    encoding: Encoding,
    provenance: Option<&Provenance>,
) -> Result<(), StoreError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-");
    // Images are public by URL; let a front proxy or a backup job read them too.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let tmp = builder.tempfile_in(dir)?;
    let mut out = BufWriter::new(tmp.as_file());
    encode::encode_with(img, encoding, provenance, &mut out)?;
    out.flush()?;
    drop(out);
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

/// `image_<i>.<ext>` with `i` a plain decimal (no sign, no leading zero) and a known extension.
fn parse_file_name(name: &str) -> Option<(usize, ImageFormat)> {
    let rest = name.strip_prefix("image_")?;
    let (index, ext) = rest.split_once('.')?;
    let plain = !index.is_empty()
        && index.len() <= 3
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if !plain {
        return None;
    }
    Some((index.parse().ok()?, ImageFormat::from_extension(ext)?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn img(w: u32, h: u32) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn file_names_parse_strictly() {
        assert_eq!(parse_file_name("image_0.jpg"), Some((0, ImageFormat::Jpeg)));
        assert_eq!(
            parse_file_name("image_3.webp"),
            Some((3, ImageFormat::Webp))
        );
        assert_eq!(
            parse_file_name("image_12.png"),
            Some((12, ImageFormat::Png))
        );
        for bad in [
            "image_01.jpg",
            "image_-1.jpg",
            "image_+1.jpg",
            "image_.jpg",
            "image_0.jpeg",
            "image_0.JPG",
            "image_0.jpg.png",
            "image_0",
            "image_0.",
            ".tmp-abc",
            "../image_0.jpg",
            "image_0.jpg/..",
            "image_1000.jpg",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn save_then_read_each_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Webp] {
            let id = RequestId::generate();
            let names = store
                .save(&id, &[img(32, 16), img(16, 32)], format, None)
                .unwrap();
            assert_eq!(names.len(), 2);
            for (i, name) in names.iter().enumerate() {
                let mut f = store.open_file(id.as_str(), name).await.unwrap();
                assert_eq!(f.content_type, format.content_type());
                let mut bytes = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut f.file, &mut bytes)
                    .await
                    .unwrap();
                assert_eq!(bytes.len() as u64, f.len);
                let decoded = image::load_from_memory(&bytes).unwrap();
                let (w, h) = if i == 0 { (32, 16) } else { (16, 32) };
                assert_eq!((decoded.width(), decoded.height()), (w, h));
            }
            // No temporary files left behind.
            let left: Vec<_> = std::fs::read_dir(dir.path().join("files/gen").join(id.as_str()))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(left.iter().all(|n| n.starts_with("image_")), "{left:?}");
        }
    }

    #[tokio::test]
    async fn read_refuses_other_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("secret.txt"), b"x").unwrap();
        let id = RequestId::generate();
        store
            .save(&id, &[img(16, 16)], ImageFormat::Png, None)
            .unwrap();
        assert!(store.open_file(id.as_str(), "image_0.png").await.is_some());
        assert!(store.open_file(id.as_str(), "image_0.jpg").await.is_none());
        assert!(store.open_file(id.as_str(), "image_1.png").await.is_none());
        assert!(store.open_file("..", "secret.txt").await.is_none());
        assert!(store
            .open_file("req_../../..", "image_0.png")
            .await
            .is_none());
        assert!(store
            .open_file(&RequestId::generate().to_string(), "image_0.png")
            .await
            .is_none());
    }

    /// Issue 15, finding 7: a directory symlink planted as a request's directory was followed,
    /// serving whatever `image_0.png` the link's target held.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_planted_directory_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let real = RequestId::generate();
        store
            .save(&real, &[img(16, 16)], ImageFormat::Png, None)
            .unwrap();
        let gen = dir.path().join("files/gen");
        let planted = RequestId::generate();
        std::os::unix::fs::symlink(gen.join(real.as_str()), gen.join(planted.as_str())).unwrap();
        assert!(store
            .open_file(real.as_str(), "image_0.png")
            .await
            .is_some());
        assert!(store
            .open_file(planted.as_str(), "image_0.png")
            .await
            .is_none());
        // A symlinked file is refused as before.
        let linked = RequestId::generate();
        std::fs::create_dir(gen.join(linked.as_str())).unwrap();
        std::os::unix::fs::symlink(
            gen.join(real.as_str()).join("image_0.png"),
            gen.join(linked.as_str()).join("image_0.png"),
        )
        .unwrap();
        assert!(store
            .open_file(linked.as_str(), "image_0.png")
            .await
            .is_none());
    }

    #[tokio::test]
    async fn retention_removes_only_old_request_folders() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let old = RequestId::generate();
        store
            .save(&old, &[img(16, 16)], ImageFormat::Png, None)
            .unwrap();
        std::fs::write(dir.path().join("files/gen/keep.txt"), b"x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1200));
        let new = RequestId::generate();
        store
            .save(&new, &[img(16, 16)], ImageFormat::Png, None)
            .unwrap();
        let removed = store
            .remove_older_than(std::time::Duration::from_millis(600))
            .unwrap();
        assert_eq!(removed, 1);
        assert!(store.open_file(old.as_str(), "image_0.png").await.is_none());
        assert!(store.open_file(new.as_str(), "image_0.png").await.is_some());
        assert!(dir.path().join("files/gen/keep.txt").exists());
    }

    #[test]
    fn save_rejects_wrong_buffer_size_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let id = RequestId::generate();
        let bad = RgbImage {
            width: 4,
            height: 4,
            data: vec![0; 5],
        };
        assert!(store.save(&id, &[bad], ImageFormat::Png, None).is_err());
        assert!(!dir.path().join("files/gen").join(id.as_str()).exists());
    }

    async fn read_back(store: &FileStore, id: &RequestId, name: &str) -> Vec<u8> {
        store.read_all(id.as_str(), name).await.unwrap()
    }

    #[tokio::test]
    async fn provenance_reads_back_from_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let p = Provenance {
            prompt: "a red fox & \"snow\" 🦊".into(),
            negative_prompt: String::new(),
            model: "flux-2-pro".into(),
            pipeline: "z-image-turbo".into(),
            seed: 42,
            steps: 8,
            guidance_scale: 0.0,
            width: 32,
            height: 16,
            software: Provenance::software_name(),
        };
        let second = Provenance {
            seed: 43,
            ..p.clone()
        };
        let both = [p.clone(), second];
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Webp] {
            let id = RequestId::generate();
            let names = store
                .save(&id, &[img(32, 16), img(32, 16)], format, Some(&both))
                .unwrap();
            for (i, name) in names.iter().enumerate() {
                let bytes = read_back(&store, &id, name).await;
                // Still a valid image of the right size.
                let decoded = image::load_from_memory(&bytes).unwrap();
                assert_eq!((decoded.width(), decoded.height()), (32, 16), "{format:?}");
                let xmp = match format {
                    ImageFormat::Jpeg => metadata::jpeg_xmp(&bytes),
                    ImageFormat::Webp => metadata::webp_xmp(&bytes),
                    ImageFormat::Png => {
                        let texts = metadata::png_texts(&bytes).unwrap();
                        let get = |k: &str| {
                            texts
                                .iter()
                                .find(|(key, _)| key == k)
                                .map(|(_, t)| t.clone())
                        };
                        assert_eq!(get("Software"), Some(p.software.clone()));
                        let params = get("parameters").unwrap();
                        assert!(
                            params.starts_with("a red fox & \"snow\" 🦊\nSteps: 8"),
                            "{params}"
                        );
                        assert!(params.contains(&format!("Seed: {}", 42 + i)), "{params}");
                        get("XML:com.adobe.xmp")
                    }
                }
                .unwrap_or_else(|| panic!("no XMP in the {format:?} file"));
                assert!(xmp.contains(metadata::DIGITAL_SOURCE_TYPE), "{xmp}");
                assert!(xmp.contains("a red fox &amp; &quot;snow&quot; 🦊"), "{xmp}");
                for field in [
                    format!("diffusiond:seed=\"{}\"", 42 + i),
                    "diffusiond:model=\"flux-2-pro\"".into(),
                    "diffusiond:pipeline=\"z-image-turbo\"".into(),
                    "diffusiond:steps=\"8\"".into(),
                    "diffusiond:guidance_scale=\"0\"".into(),
                    "diffusiond:width=\"32\"".into(),
                    "diffusiond:height=\"16\"".into(),
                    format!(
                        "xmp:CreatorTool=\"diffusiond {}\"",
                        env!("CARGO_PKG_VERSION")
                    ),
                ] {
                    assert!(xmp.contains(&field), "{format:?} lacks {field}: {xmp}");
                }
            }
        }
        // Without provenance, nothing is embedded.
        let id = RequestId::generate();
        store
            .save(&id, &[img(8, 8)], ImageFormat::Jpeg, None)
            .unwrap();
        let bytes = read_back(&store, &id, "image_0.jpg").await;
        assert_eq!(metadata::jpeg_xmp(&bytes), None);
    }

    #[test]
    fn jpeg_quality_changes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let size = |q: u8| {
            let id = RequestId::generate();
            let enc = Encoding {
                format: ImageFormat::Jpeg,
                quality: Some(q),
            };
            store.save(&id, &[img(64, 64)], enc, None).unwrap();
            std::fs::metadata(
                dir.path()
                    .join("files/gen")
                    .join(id.as_str())
                    .join("image_0.jpg"),
            )
            .unwrap()
            .len()
        };
        assert!(size(20) < size(100));
    }
}
