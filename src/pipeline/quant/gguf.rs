//! A GGUF file's header: metadata, tensor names, shapes, types and where each tensor's bytes lie.
//! Tensors are read one at a time when a module asks for them, so a 6 GB file is never held in
//! memory twice. Every problem is one error naming the file and, where it is about a tensor, the
//! tensor: not GGUF, an unsupported type (the IQ types, which candle cannot run), a tensor that
//! runs past the end of the file (truncated download), an element count that does not fit its
//! type's blocks.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::pipeline::error::{load_err, Result};

/// A metadata value, reduced to what loaders read.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    /// Arrays are skipped (tokenizer vocabularies); only their length is kept.
    Array(usize),
}

impl MetaValue {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Int(i) => Some(*i as f64),
            MetaValue::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: GgmlDType,
    /// Row-major, outermost first (GGUF stores the reverse).
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub bytes: u64,
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: HashMap<String, TensorEntry>,
}

/// The GGML type name of a type code, for messages (`IQ4_XS`, `Q4_K`, ...).
pub fn type_name(code: u32) -> String {
    let name = match code {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("type {code}"),
    };
    name.to_string()
}

/// The types this build runs (candle's): everything else is refused by name.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

fn dtype_of(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Bytes of `elems` elements of `dtype`, `None` when they are not whole blocks.
pub fn byte_size(dtype: GgmlDType, elems: usize) -> Option<u64> {
    let bs = dtype.block_size();
    elems
        .is_multiple_of(bs)
        .then(|| (elems / bs * dtype.type_size()) as u64)
}

/// A little-endian reader that turns short reads into one "truncated" error.
struct Header<R> {
    r: R,
}

impl<R: Read> Header<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self, limit: u64) -> std::io::Result<String> {
        let len = self.u64()?;
        if len > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a string of {len} bytes is not plausible"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v)?;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
    fn value(&mut self, ty: u32, limit: u64) -> std::io::Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Int(self.bytes::<1>()?[0] as i128),
            1 => MetaValue::Int(self.bytes::<1>()?[0] as i8 as i128),
            2 => MetaValue::Int(u16::from_le_bytes(self.bytes()?) as i128),
            3 => MetaValue::Int(i16::from_le_bytes(self.bytes()?) as i128),
            4 => MetaValue::Int(self.u32()? as i128),
            5 => MetaValue::Int(i32::from_le_bytes(self.bytes()?) as i128),
            6 => MetaValue::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => MetaValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => MetaValue::Str(self.string(limit)?),
            9 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                if n > limit {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("an array of {n} values is not plausible"),
                    ));
                }
                for _ in 0..n {
                    self.value(elem, limit)?;
                }
                MetaValue::Array(n as usize)
            }
            10 => MetaValue::Int(self.u64()? as i128),
            11 => MetaValue::Int(i64::from_le_bytes(self.bytes()?) as i128),
            12 => MetaValue::Float(f64::from_le_bytes(self.bytes()?)),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown metadata value type {ty}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Read and check the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |why: String| load_err(format!("GGUF file {}: {why}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| bad(format!("cannot stat: {e}")))?
            .len();
        let mut h = Header {
            r: std::io::BufReader::new(file),
        };
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("the header is cut short (truncated file?)".into())
            } else {
                bad(format!("malformed header: {e}"))
            }
        };
        let magic = h.u32().map_err(io)?;
        if magic != 0x4655_4747 {
            return Err(bad("not a GGUF file (bad magic)".into()));
        }
        let version = h.u32().map_err(io)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = h.u64().map_err(io)?;
        let n_kv = h.u64().map_err(io)?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(bad("implausible tensor or metadata count".into()));
        }
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = h.string(1 << 16).map_err(io)?;
            let ty = h.u32().map_err(io)?;
            let value = h.value(ty, file_len).map_err(io)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = h.string(1 << 16).map_err(io)?;
            let n_dims = h.u32().map_err(io)?;
            if n_dims > 8 {
                return Err(bad(format!("tensor '{name}' has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(h.u64().map_err(io)? as usize);
            }
            dims.reverse();
            let code = h.u32().map_err(io)?;
            let offset = h.u64().map_err(io)?;
            infos.push((name, dims, code, offset));
        }
        let pos = h.r.stream_position().map_err(io)?;
        let alignment = metadata
            .get("general.alignment")
            .and_then(|v| v.as_f64())
            .map(|a| a as u64)
            .filter(|a| *a > 0)
            .unwrap_or(32);
        let data_start = pos.div_ceil(alignment) * alignment;
        let mut tensors = HashMap::with_capacity(infos.len());
        for (name, shape, code, rel) in infos {
            let Some(dtype) = dtype_of(code) else {
                return Err(bad(format!(
                    "tensor '{name}' is stored as {}, which this build cannot run (candle has no \
                     kernels for the IQ/TQ types); supported: {SUPPORTED}. Use a file of one of \
                     those types (e.g. Q4_K_M or Q8_0) or --quantize on the full-precision weights",
                    type_name(code)
                )));
            };
            let elems: usize = shape.iter().product();
            let Some(bytes) = byte_size(dtype, elems) else {
                return Err(bad(format!(
                    "tensor '{name}' of shape {shape:?} is not a whole number of {} blocks",
                    type_name(code)
                )));
            };
            let offset = data_start + rel;
            if offset + bytes > file_len {
                return Err(bad(format!(
                    "tensor '{name}' ends at byte {} but the file has {file_len} bytes \
                     (truncated download?)",
                    offset + bytes
                )));
            }
            tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    offset,
                    bytes,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read one tensor into host memory.
    pub fn read(&self, name: &str) -> Result<QTensor> {
        let e = self.tensors.get(name).ok_or_else(|| {
            load_err(format!(
                "GGUF file {} has no tensor '{name}'",
                self.path.display()
            ))
        })?;
        let bad = |why: String| {
            load_err(format!(
                "GGUF file {}: tensor '{name}': {why}",
                self.path.display()
            ))
        };
        let mut f = std::fs::File::open(&self.path).map_err(|e| bad(e.to_string()))?;
        f.seek(SeekFrom::Start(e.offset))
            .map_err(|e| bad(e.to_string()))?;
        let mut data = vec![0u8; e.bytes as usize];
        f.read_exact(&mut data).map_err(|e| bad(e.to_string()))?;
        let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, e.dtype)?;
        Ok(QTensor::new(storage, e.shape.as_slice())?)
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes).sum()
    }
}

/// Write a GGUF file (version 2, 32-byte alignment) with candle's writer: tests and tools make
/// their files with it. Tensors are `(name, shape, row-major f32 values, type)`; metadata
/// values are strings or f32.
pub fn write(
    path: &Path,
    metadata: &[(&str, MetaValue)],
    tensors: &[(String, Vec<usize>, Vec<f32>, GgmlDType)],
) -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    let meta: Vec<(&str, Value)> = metadata
        .iter()
        .map(|(k, v)| {
            let v = match v {
                MetaValue::Str(s) => Value::String(s.clone()),
                MetaValue::Float(f) => Value::F32(*f as f32),
                MetaValue::Int(i) => Value::U32(*i as u32),
                MetaValue::Bool(b) => Value::Bool(*b),
                MetaValue::Array(_) => Value::Array(Vec::new()),
            };
            (*k, v)
        })
        .collect();
    let mut qs = Vec::with_capacity(tensors.len());
    for (name, shape, values, dtype) in tensors {
        let t = candle_core::Tensor::from_slice(values, shape.as_slice(), &Device::Cpu)?;
        let q = QTensor::quantize(&t, *dtype)
            .map_err(|e| load_err(format!("cannot quantize {name} to {dtype:?}: {e}")))?;
        qs.push((name.as_str(), q));
    }
    let mut f = std::fs::File::create(path)
        .map_err(|e| load_err(format!("cannot create {}: {e}", path.display())))?;
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (*n, q)).collect();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &q_refs)?;
    Ok(())
}
