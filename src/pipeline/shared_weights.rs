//! Weights that two pipelines of one device read from byte-identical files (the same sha256,
//! e.g. one text encoder published in two checkouts, or two catalog entries on one checkout)
//! are held on the device once.
//!
//! Sharing is per tensor: a tensor is the same when its file's sha256, its name, its dtype and
//! its device are. So a Qwen3 encoder that one family reads to layer 27 and another to layer
//! 35 shares its first 27 layers. Only the text encoder and the VAE share ([`SHAREABLE`]:
//! their modules keep the tensors as read), and only their full-precision tensors: quantized
//! matrices (GGUF files, `--quantize`) and random weights never do.
//!
//! The device thread owns one [`SharedWeights`] per device. Each pipeline loads under its
//! own name (the owner); a tensor stays cached while some owner uses it, and
//! [`SharedWeights::release`] drops an unloaded pipeline's claims so the memory is freed
//! once nobody holds the tensor.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use super::error::{load_err, Result};

/// A file as it was hashed: its path, length and modification time.
type Stamp = (PathBuf, u64, SystemTime);

/// The components whose modules keep the tensors as they are read (candle's `Linear`,
/// `Embedding`, `RmsNorm`, `Conv2d`; the CPU's fast convolutions keep a transformed copy beside
/// the original): sharing their tensors shares their memory. The transformers fuse, transpose
/// (and on the CPU pack) their matrices at load, so a cached tensor as read would sit beside
/// each pipeline's own copy and double the memory: they are never shared.
pub const SHAREABLE: &[&str] = &["text_encoder", "vae"];

/// One cached tensor and the pipelines that use it.
struct Entry {
    tensor: Tensor,
    bytes: u64,
    users: BTreeSet<String>,
}

/// The tensors of one device that pipelines share.
#[derive(Default)]
pub struct SharedWeights {
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for SharedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedWeights({} bytes)", self.total_bytes())
    }
}

/// A pipeline loading through a [`SharedWeights`] under its name.
#[derive(Debug, Clone)]
pub struct Share {
    pub weights: Arc<SharedWeights>,
    pub owner: String,
}

/// What identifies a tensor's bytes on a device.
fn key(digest: &str, name: &str, dtype: DType, device: &Device) -> String {
    format!("{digest}/{name}/{dtype:?}/{:?}", device.location())
}

impl SharedWeights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of every cached tensor, each once.
    pub fn total_bytes(&self) -> u64 {
        self.lock().values().map(|e| e.bytes).sum()
    }

    /// Bytes of the cached tensors `owner` uses.
    pub fn bytes_of(&self, owner: &str) -> u64 {
        self.lock()
            .values()
            .filter(|e| e.users.contains(owner))
            .map(|e| e.bytes)
            .sum()
    }

    /// Bytes of the cached tensors among `tensors` (`(file digest, name, elements)`) as they
    /// would be loaded in `dtype` on `device`: what a load would not need again.
    pub fn cached_bytes(&self, tensors: &[TensorFile], dtype: DType, device: &Device) -> u64 {
        let entries = self.lock();
        tensors
            .iter()
            .filter(|t| entries.contains_key(&key(&t.digest, &t.name, dtype, device)))
            .map(|t| t.elements * dtype.size_in_bytes() as u64)
            .sum()
    }

    /// `owner` no longer uses anything: tensors nobody else uses leave the cache (and the
    /// device, once the unloaded pipeline's own handles are dropped).
    pub fn release(&self, owner: &str) {
        self.lock().retain(|_, e| {
            e.users.remove(owner);
            !e.users.is_empty()
        });
    }

    fn get_or_load(
        &self,
        key: String,
        owner: &str,
        load: impl FnOnce() -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.lock().get_mut(&key) {
            e.users.insert(owner.to_string());
            return Ok(e.tensor.clone());
        }
        let tensor = load()?;
        let bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        let users = BTreeSet::from([owner.to_string()]);
        self.lock().insert(
            key,
            Entry {
                tensor: tensor.clone(),
                bytes,
                users,
            },
        );
        Ok(tensor)
    }
}

/// One tensor of a safetensors file: its name, its element count, its file's sha256.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub name: String,
    pub elements: u64,
    pub digest: Arc<str>,
}

/// The sha256 of a weights file, hex. A file of the Hugging Face cache is a link to
/// `blobs/<sha256>` (large files are stored under their LFS sha256), so its name is used as it
/// is; other files are hashed once per process (remembered by path, length and mtime).
pub fn file_digest(path: &Path) -> Result<Arc<str>> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| load_err(format!("cannot resolve {}: {e}", path.display())))?;
    if let Some(name) = hub_blob_sha256(&real) {
        return Ok(name.into());
    }
    let meta = std::fs::metadata(&real)
        .map_err(|e| load_err(format!("cannot stat {}: {e}", real.display())))?;
    let stamp = (
        real.clone(),
        meta.len(),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    );
    static KNOWN: OnceLock<Mutex<HashMap<Stamp, Arc<str>>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    if let Some(d) = known.lock().unwrap_or_else(|e| e.into_inner()).get(&stamp) {
        return Ok(d.clone());
    }
    let t = std::time::Instant::now();
    let digest: Arc<str> = sha256_file(&real)?.into();
    tracing::debug!(file = %real.display(), seconds = t.elapsed().as_secs_f64(), "hashed weights file");
    known
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(stamp, digest.clone());
    Ok(digest)
}

/// `Some(sha256)` when `real` is `.../blobs/<64 hex digits>` (the hub cache's layout).
fn hub_blob_sha256(real: &Path) -> Option<String> {
    let name = real.file_name()?.to_str()?;
    let in_blobs = real.parent()?.file_name()? == "blobs";
    (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| load_err(format!("cannot open {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A VarBuilder backend over memory-mapped safetensors whose tensors come from (and go to)
/// a [`SharedWeights`].
struct SharingBackend {
    inner: MmapedSafetensors,
    /// Tensor name -> its file's sha256.
    digests: HashMap<String, Arc<str>>,
    share: Share,
}

impl SimpleBackend for SharingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.digests.contains_key(name) {
            return SimpleBackend::get(&self.inner, s, name, h, dtype, dev);
        }
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let read = || SimpleBackend::get_unchecked(&self.inner, name, dtype, dev);
        match self.digests.get(name) {
            Some(digest) => self.share.weights.get_or_load(
                key(digest, name, dtype, dev),
                &self.share.owner,
                read,
            ),
            None => read(),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.inner, name)
    }
}

/// A VarBuilder over safetensors `files` whose tensors are shared through `share`.
#[allow(unsafe_code)]
pub fn var_builder(
    files: &[PathBuf],
    tensors: Vec<TensorFile>,
    dtype: DType,
    device: &Device,
    share: Share,
) -> Result<VarBuilder<'static>> {
    // SAFETY: as `load::mmap_var_builder`: the files are opened read-only and must not change
    // while the pipeline loads; tensors are copied out of the map when read.
    let inner = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
        let names: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
        load_err(format!("cannot read safetensors {}: {e}", names.join(", ")))
    })?;
    let digests = tensors.into_iter().map(|t| (t.name, t.digest)).collect();
    let backend = SharingBackend {
        inner,
        digests,
        share,
    };
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_blob_is_named_by_its_sha256_and_other_files_are_hashed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A blob whose name is a sha256 that is not its content's: the name is trusted.
        let fake = "ab".repeat(32);
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(blobs.join(&fake), b"weights").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            file_digest(&blobs.join(&fake)).ok().as_deref(),
            Some(fake.as_str())
        );
        // Anywhere else the content is hashed (the FIPS 180-2 test vector for "abc").
        let plain = dir.path().join("model.safetensors");
        std::fs::write(&plain, b"abc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            file_digest(&plain).ok().as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        // A second file with the same bytes has the same digest; other bytes another.
        let twin = dir.path().join("twin.safetensors");
        std::fs::write(&twin, b"abc").unwrap_or_else(|e| panic!("{e}"));
        let other = dir.path().join("other.safetensors");
        std::fs::write(&other, b"abd").unwrap_or_else(|e| panic!("{e}"));
        let d = |p: &Path| file_digest(p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d(&plain), d(&twin));
        assert_ne!(d(&plain), d(&other));
    }

    #[test]
    fn a_tensor_stays_cached_while_some_pipeline_uses_it() {
        let shared = SharedWeights::default();
        let load = || Tensor::zeros((4, 4), DType::F32, &Device::Cpu);
        let t1 = shared
            .get_or_load("k".into(), "a", load)
            .unwrap_or_else(|e| panic!("{e}"));
        let t2 = shared
            .get_or_load("k".into(), "b", || {
                panic!("a cached tensor is not read again")
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t1.id(), t2.id(), "the same tensor, not a copy");
        assert_eq!(shared.total_bytes(), 64);
        assert_eq!(shared.bytes_of("a"), 64);
        assert_eq!(shared.bytes_of("b"), 64);
        shared.release("a");
        assert_eq!(shared.total_bytes(), 64, "b still uses it");
        assert_eq!(shared.bytes_of("a"), 0);
        shared.release("b");
        assert_eq!(shared.total_bytes(), 0);
    }
}
