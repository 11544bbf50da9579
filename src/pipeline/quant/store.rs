//! A GGUF file seen under our module names: each of our tensor names points at a file tensor
//! and the rows it takes ([`Rows`]). Quantized matrices are handed out as they are stored
//! ([`GgufStore::quantized`]); everything else (1-D tensors, the F32/F16/BF16 tensors the files
//! keep in high precision, and matrices a module needs dense) is dequantized into a dense tensor
//! through the [`SimpleBackend`] that backs the component's `VarBuilder`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::gguf::{byte_size, GgufFile};
use super::names::{NameMap, Rows};
use crate::pipeline::error::{load_err, Result};

/// One of our names: the file tensor it comes from and the row range it takes.
#[derive(Debug, Clone)]
struct Entry {
    src: String,
    /// Row ranges of the source, concatenated in order.
    ranges: Vec<std::ops::Range<usize>>,
    shape: Vec<usize>,
    dtype: GgmlDType,
}

/// Whether a stored type is a float type (kept dense) rather than a block-quantized one.
pub fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

pub struct GgufStore {
    file: GgufFile,
    entries: HashMap<String, Entry>,
    /// What the file is for, in messages (`transformer`, `text_encoder`).
    what: String,
}

impl GgufStore {
    /// Open a file and map its names with `map`.
    pub fn open(path: &Path, what: &str, map: NameMap) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let mut entries = HashMap::new();
        for (name, t) in &file.tensors {
            for (ours, rows) in map(name) {
                let n = t.shape.first().copied().unwrap_or(1);
                let bad = |why: &str| {
                    load_err(format!(
                        "GGUF file {}: tensor '{name}' of shape {:?}: {why}",
                        path.display(),
                        t.shape
                    ))
                };
                let ranges = match rows {
                    Rows::All => std::iter::once(0..n).collect(),
                    Rows::Chunk { index, count } => {
                        if t.shape.is_empty() || !n.is_multiple_of(count) {
                            return Err(bad(&format!("cannot split into {count} equal parts")));
                        }
                        let c = n / count;
                        std::iter::once(index * c..(index + 1) * c).collect()
                    }
                    Rows::SwapHalves => {
                        if !n.is_multiple_of(2) {
                            return Err(bad("cannot swap odd halves"));
                        }
                        vec![n / 2..n, 0..n / 2]
                    }
                };
                let rows: usize = ranges.iter().map(|r| r.len()).sum();
                let mut shape = t.shape.clone();
                if let Some(first) = shape.first_mut() {
                    *first = rows;
                }
                entries.insert(
                    ours,
                    Entry {
                        src: name.clone(),
                        ranges,
                        shape,
                        dtype: t.dtype,
                    },
                );
            }
        }
        Ok(Self {
            file,
            entries,
            what: what.to_string(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn metadata(&self) -> &HashMap<String, super::gguf::MetaValue> {
        &self.file.metadata
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored type of one of our names.
    pub fn dtype(&self, name: &str) -> Option<GgmlDType> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Shape of one of our names.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn missing(&self, name: &str) -> crate::pipeline::PipelineError {
        load_err(format!(
            "{} GGUF file {} has no tensor for '{name}' (is it a file of this model family?)",
            self.what,
            self.path().display()
        ))
    }

    /// Bytes the component takes on the device: quantized tensors as stored, float ones in
    /// `dense` (the run dtype).
    pub fn device_bytes(&self, dense: DType) -> u64 {
        self.file
            .tensors
            .values()
            .map(|t| {
                if is_float(t.dtype) {
                    t.shape.iter().product::<usize>() as u64 * dense.size_in_bytes() as u64
                } else {
                    t.bytes
                }
            })
            .sum()
    }

    /// The rows of `src` listed in `ranges`, as one host QTensor of `rows x cols`.
    fn select(src: &QTensor, ranges: &[std::ops::Range<usize>]) -> Result<QTensor> {
        let dims = src.shape().dims().to_vec();
        let n = dims.first().copied().unwrap_or(1);
        if ranges.len() == 1 && ranges[0] == (0..n) {
            let data = src.data()?;
            let storage = QStorage::from_data(data, &Device::Cpu, src.dtype())?;
            return Ok(QTensor::new(storage, dims)?);
        }
        let cols: usize = dims[1..].iter().product();
        let row_bytes = byte_size(src.dtype(), cols)
            .ok_or_else(|| load_err("rows of a quantized tensor are not whole blocks"))?
            as usize;
        let data = src.data()?;
        let mut out = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum::<usize>() * row_bytes);
        for r in ranges {
            out.extend_from_slice(&data[r.start * row_bytes..r.end * row_bytes]);
        }
        let rows = out.len() / row_bytes.max(1);
        let mut shape = dims;
        shape[0] = rows;
        let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, src.dtype())?;
        Ok(QTensor::new(storage, shape)?)
    }

    /// Our names fused along the rows, each `(out_i, in_dim)`, as host QTensors: one per run
    /// of consecutive names of the same stored type. `None` when any of them is stored in a
    /// float type (it is then loaded dense). Errors name a missing tensor or a wrong shape.
    pub fn quantized(
        &self,
        names: &[String],
        in_dim: usize,
        outs: &[usize],
    ) -> Result<Option<Vec<(QTensor, usize)>>> {
        let mut es = Vec::with_capacity(names.len());
        for (name, &out) in names.iter().zip(outs) {
            let e = self.entries.get(name).ok_or_else(|| self.missing(name))?;
            if e.shape != [out, in_dim] {
                return Err(load_err(format!(
                    "{} GGUF file {}: '{name}' (file tensor '{}') has shape {:?}, the model's \
                     config wants [{out}, {in_dim}]",
                    self.what,
                    self.path().display(),
                    e.src,
                    e.shape
                )));
            }
            if is_float(e.dtype) {
                return Ok(None);
            }
            es.push((e, out));
        }
        let mut cache: HashMap<&str, QTensor> = HashMap::new();
        let mut groups: Vec<(GgmlDType, Vec<u8>, usize)> = Vec::new();
        for (e, out) in es {
            if !cache.contains_key(e.src.as_str()) {
                cache.insert(e.src.as_str(), self.file.read(&e.src)?);
            }
            let src = &cache[e.src.as_str()];
            let part = Self::select(src, &e.ranges)?;
            let bytes = part.data()?.into_owned();
            match groups.last_mut() {
                Some((dt, data, rows)) if *dt == e.dtype => {
                    data.extend_from_slice(&bytes);
                    *rows += out;
                }
                _ => groups.push((e.dtype, bytes, out)),
            }
        }
        groups
            .into_iter()
            .map(|(dt, data, rows)| {
                let storage = QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, dt)?;
                Ok((QTensor::new(storage, (rows, in_dim))?, rows))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// One of our names as a dense f32 host tensor.
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| self.missing(name))?;
        let src = self.file.read(&e.src)?;
        let full = src.dequantize(&Device::Cpu)?;
        let n = src.shape().dims().first().copied().unwrap_or(1);
        if e.ranges.len() == 1 && e.ranges[0] == (0..n) {
            return Ok(full);
        }
        let parts = e
            .ranges
            .iter()
            .map(|r| full.narrow(0, r.start, r.len()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The dense view of a store, for the component's `VarBuilder`.
pub struct DenseBackend(pub std::sync::Arc<GgufStore>);

impl SimpleBackend for DenseBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() == &s {
            return Ok(t);
        }
        // Pad tokens stored as `[dim]` where the model has `[1, dim]`: same elements, unit dims.
        let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
        if t.elem_count() == s.elem_count() && squeeze(t.dims()) == squeeze(s.dims()) {
            return t.reshape(s);
        }
        Err(candle_core::Error::Msg(format!(
            "{} GGUF file {}: '{name}' has shape {:?}, the model's config wants {:?}",
            self.0.what,
            self.0.path().display(),
            t.dims(),
            s.dims()
        )))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .0
            .dense(name)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
