//! The image store: generated images under `<data-dir>/files/gen/<request_id>/image_<i>.<ext>`
//! ([`FileStore`], the default), or the same names in an S3-compatible bucket ([`s3::S3Images`]);
//! [`ImageStore`] is either.
//!
//! The only module that writes image files. Files are written to a temporary name in the request's
//! folder and renamed into place, so a reader never sees half a file. Reading goes only through
//! [`FileStore::open_file`], which accepts a request ID and file name in the exact shape they are made in,
//! so no path built from a request can leave the store.

mod encode;
mod id;
pub mod metadata;
mod s3;

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
    #[error("image store: {0}")]
    Config(String),
    #[error("S3 store: {0}")]
    S3(String),
}

/// A stored image, opened for streaming: never read whole into memory.
#[derive(Debug)]
pub struct StoredFile {
    /// Bytes in the file.
    pub len: u64,
    /// Last modification (the image's creation: files are never rewritten).
    pub modified: Option<std::time::SystemTime>,
    pub content_type: &'static str,
    source: Source,
}

#[derive(Debug)]
enum Source {
    File(tokio::fs::File),
    S3 {
        store: s3::S3Images,
        id: String,
        name: String,
    },
}

impl StoredFile {
    /// The image's bytes from `start` on, read as the caller reads (a ranged GET on S3).
    pub async fn read_from(
        self,
        start: u64,
    ) -> std::io::Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>> {
        match self.source {
            Source::File(mut file) => {
                if start > 0 {
                    use tokio::io::AsyncSeekExt;
                    file.seek(std::io::SeekFrom::Start(start)).await?;
                }
                Ok(Box::new(file))
            }
            Source::S3 { store, id, name } => store.read_from(&id, &name, start).await,
        }
    }
}

/// Where images go: the data directory, or a bucket shared by several servers.
#[derive(Debug, Clone)]
pub enum ImageStore {
    Local(FileStore),
    S3 {
        bucket: s3::S3Images,
        /// Image URLs are presigned bucket URLs valid this long (else /files/ URLs).
        presign: Option<std::time::Duration>,
    },
}

impl From<FileStore> for ImageStore {
    fn from(store: FileStore) -> Self {
        ImageStore::Local(store)
    }
}

/// A stored image: its file name, and its URL when that is not the server's own /files/ one.
#[derive(Debug, Clone)]
pub struct Saved {
    pub file_name: String,
    pub url: Option<String>,
}

impl ImageStore {
    /// `s3://BUCKET[/PREFIX]` (checked: the bucket must answer), with presigned URLs or not.
    pub async fn s3(
        location: &str,
        presign: Option<std::time::Duration>,
    ) -> Result<Self, StoreError> {
        let bucket = s3::S3Images::from_env(location)?;
        bucket.check().await?;
        Ok(Self::S3 { bucket, presign })
    }

    /// Encode and store a request's images, in order, each with its provenance embedded when
    /// `provenance` has one per image. On error nothing of this request is left behind.
    pub async fn save(
        &self,
        id: &RequestId,
        images: Vec<RgbImage>,
        encoding: Encoding,
        provenance: Option<Vec<Provenance>>,
    ) -> Result<Vec<Saved>, StoreError> {
        let format = encoding.format;
        match self {
            ImageStore::Local(store) => {
                let (store, id) = (store.clone(), id.clone());
                let names = tokio::task::spawn_blocking(move || {
                    store.save(&id, &images, encoding, provenance.as_deref())
                })
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
                Ok(names
                    .into_iter()
                    .map(|file_name| Saved {
                        file_name,
                        url: None,
                    })
                    .collect())
            }
            ImageStore::S3 { bucket, presign } => {
                let files = tokio::task::spawn_blocking(move || {
                    images
                        .iter()
                        .enumerate()
                        .map(|(i, img)| {
                            let mut bytes = Vec::new();
                            let p = provenance.as_ref().and_then(|p| p.get(i));
                            encode::encode_with(img, encoding, p, &mut bytes)?;
                            Ok((FileStore::file_name(i, format), bytes))
                        })
                        .collect::<Result<Vec<_>, StoreError>>()
                })
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
                let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
                bucket.put(id, files, format.content_type()).await?;
                let mut saved = Vec::with_capacity(names.len());
                for file_name in names {
                    let url = match presign {
                        Some(ttl) => Some(bucket.presign(id.as_str(), &file_name, *ttl).await?),
                        None => None,
                    };
                    saved.push(Saved { file_name, url });
                }
                Ok(saved)
            }
        }
    }

    /// Open a stored image, given the URL's request ID and file name. `None` for anything that
    /// is not exactly a stored image.
    pub async fn open_file(&self, request_id: &str, file_name: &str) -> Option<StoredFile> {
        match self {
            ImageStore::Local(store) => store.open_file(request_id, file_name).await,
            ImageStore::S3 { bucket, .. } => {
                let id = RequestId::parse(request_id)?;
                let (_, format) = parse_file_name(file_name)?;
                let (len, modified) = bucket.head(id.as_str(), file_name).await?;
                Some(StoredFile {
                    len,
                    modified,
                    content_type: format.content_type(),
                    source: Source::S3 {
                        store: bucket.clone(),
                        id: id.as_str().to_string(),
                        name: file_name.to_string(),
                    },
                })
            }
        }
    }

    /// Delete the requests whose images are older than `max_age` (retention); how many.
    pub async fn remove_older_than(
        &self,
        max_age: std::time::Duration,
    ) -> Result<usize, StoreError> {
        match self {
            ImageStore::Local(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.remove_older_than(max_age))
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            }
            ImageStore::S3 { bucket, .. } => bucket.remove_older_than(max_age).await,
        }
    }
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
            len: meta.len(),
            modified: meta.modified().ok(),
            content_type: format.content_type(),
            source: Source::File(file),
        })
    }
}

impl StoredFile {
    /// The image's bytes, read whole (for answers that carry the image inline).
    pub async fn read_all(self) -> Option<Vec<u8>> {
        let mut reader = self.read_from(0).await.ok()?;
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
            .await
            .ok()?;
        Some(bytes)
    }
}

impl FileStore {
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
                let f = store.open_file(id.as_str(), name).await.unwrap();
                assert_eq!(f.content_type, format.content_type());
                let len = f.len;
                let mut bytes = Vec::new();
                let mut reader = f.read_from(0).await.unwrap();
                tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
                    .await
                    .unwrap();
                assert_eq!(bytes.len() as u64, len);
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
        let file = store.open_file(id.as_str(), name).await.unwrap();
        file.read_all().await.unwrap()
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
