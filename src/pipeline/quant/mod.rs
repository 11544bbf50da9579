//! Quantized weights: GGUF files in the naming people download ([`names`], [`gguf`],
//! [`store`]), `--quantize` of full-precision weights at load, and the matrix product over
//! block-quantized weights ([`matmul`]).
//!
//! A component's weights reach its modules through [`Weights`]: a `VarBuilder` for every dense
//! tensor (norms, biases, embedders, and whatever a file keeps in F32/F16/BF16, converted to the
//! run dtype), plus, for the big matrices of the transformer blocks and the text encoder layers,
//! [`Weights::quantized`], which hands out the block-quantized matrix when there is one. Modules
//! that get `None` load the dense matrix as before, so the fast f32 CPU path is untouched for
//! unquantized weights.

pub mod gguf;
pub mod matmul;
pub mod names;
pub mod store;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use self::matmul::{QuantMatrix, QuantParts};
use self::store::GgufStore;
use crate::pipeline::error::{load_err, PipelineError, Result};

/// A block-quantized type `--quantize` can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantType(GgmlDType);

impl QuantType {
    pub const ALL: &'static str = "q8_0, q6_k, q5_k, q4_k, q4_0";

    pub(crate) fn ggml(self) -> GgmlDType {
        self.0
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        (self.0.block_size(), self.0.type_size())
    }

    /// Bytes of `elems` weights of this type (whole blocks).
    pub fn bytes(self, elems: u64) -> u64 {
        let (b, s) = self.block();
        elems.div_ceil(b as u64) * s as u64
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q6K => "q6_k",
            GgmlDType::Q5K => "q5_k",
            GgmlDType::Q4K => "q4_k",
            GgmlDType::Q4_0 => "q4_0",
            _ => "?",
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        let t = match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" => GgmlDType::Q8_0,
            "q6_k" => GgmlDType::Q6K,
            "q5_k" => GgmlDType::Q5K,
            "q4_k" => GgmlDType::Q4K,
            "q4_0" => GgmlDType::Q4_0,
            other => {
                return Err(load_err(format!(
                    "unknown quantization '{other}': supported: {}",
                    Self::ALL
                )))
            }
        };
        Ok(Self(t))
    }
}

/// Which matrices `--quantize` keeps in the run dtype, by their full name: the same mix as
/// the published files (embedders, refiners, modulations, the final layer and every 1-D
/// tensor stay high precision; only the big block matrices are quantized).
pub type KeepPolicy = fn(&str) -> bool;

#[derive(Clone)]
enum Mode {
    Dense,
    Gguf(Arc<GgufStore>),
    Quantize { ty: QuantType, keep: KeepPolicy },
}

/// A component's weights, at one module prefix.
#[derive(Clone)]
pub struct Weights {
    vb: VarBuilder<'static>,
    mode: Mode,
}

impl Weights {
    /// Full-precision weights (safetensors), used as they are.
    pub fn dense(vb: VarBuilder<'static>) -> Self {
        Self {
            vb,
            mode: Mode::Dense,
        }
    }

    /// Full-precision weights whose block matrices are quantized to `ty` at load, except the
    /// ones `keep` names.
    pub fn quantize(vb: VarBuilder<'static>, ty: QuantType, keep: KeepPolicy) -> Self {
        Self {
            vb,
            mode: Mode::Quantize { ty, keep },
        }
    }

    /// A GGUF file's tensors: quantized matrices as stored, everything else dense in `dtype`.
    pub fn gguf(store: Arc<GgufStore>, dtype: DType, device: &Device) -> Self {
        let vb = VarBuilder::from_backend(
            Box::new(store::DenseBackend(store.clone())),
            dtype,
            device.clone(),
        );
        Self {
            vb,
            mode: Mode::Gguf(store),
        }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            mode: self.mode.clone(),
        }
    }

    /// The dense view (norms, biases, embedders, ...).
    pub fn vb(&self) -> &VarBuilder<'static> {
        &self.vb
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// A numeric metadata value of the GGUF file these weights come from.
    pub fn gguf_number(&self, key: &str) -> Option<f64> {
        match &self.mode {
            Mode::Gguf(store) => store.metadata().get(key).and_then(|v| v.as_f64()),
            _ => None,
        }
    }

    fn full(&self, name: &str) -> String {
        let p = self.vb.prefix();
        if p.is_empty() {
            format!("{name}.weight")
        } else {
            format!("{p}.{name}.weight")
        }
    }

    /// `{name}.weight` of each name, `(out_i, in_dim)`, fused along the output as quantized
    /// matrices on the device; `None` when they are to be loaded dense (full-precision
    /// weights, a kept layer, a file that stores them in a float type, or rows that are not
    /// whole blocks of the type).
    pub fn quantized(
        &self,
        names: &[&str],
        in_dim: usize,
        outs: &[usize],
    ) -> Result<Option<QuantParts>> {
        let full: Vec<String> = names.iter().map(|n| self.full(n)).collect();
        let host = match &self.mode {
            Mode::Dense => return Ok(None),
            Mode::Gguf(store) => match store.quantized(&full, in_dim, outs)? {
                Some(parts) => parts,
                None => return Ok(None),
            },
            Mode::Quantize { ty, keep } => {
                if full.iter().any(|n| keep(n)) || !in_dim.is_multiple_of(ty.block().0) {
                    return Ok(None);
                }
                let vb = self.vb.clone().set_dtype(DType::F32);
                let mut ws = Vec::with_capacity(names.len());
                for (name, &out) in names.iter().zip(outs) {
                    ws.push(
                        vb.get((out, in_dim), &format!("{name}.weight"))?
                            .to_device(&Device::Cpu)?,
                    );
                }
                let w = Tensor::cat(&ws, 0)?;
                vec![(QTensor::quantize(&w, ty.ggml())?, outs.iter().sum())]
            }
        };
        let parts = host
            .into_iter()
            .map(|(q, out)| QuantMatrix::new(q, out, self.device()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(QuantParts::new(parts)))
    }
}

/// Whether a full-precision tensor is quantized by `--quantize`: the 2-D weights of the
/// transformer blocks and text-encoder layers (`layers.N`, `*blocks.N`), not their modulation
/// layers; embedders, refiners (`noise_refiner`, `context_refiner`), the final layer and 1-D
/// tensors keep the run dtype, as in the published files.
pub fn quantized_by_default(name: &str) -> bool {
    let in_blocks =
        name.starts_with("layers.") || name.contains(".layers.") || name.contains("blocks.");
    in_blocks && !name.contains("modulation") && name.ends_with(".weight")
}

fn keep_high_precision(name: &str) -> bool {
    !quantized_by_default(name)
}

/// A component's weights as its loader gets them, and what they take on the device.
pub struct Component {
    pub weights: Weights,
    pub bytes: u64,
    /// `gguf FILE`, `q8_0 at load` or `dense`, for logs and `/v1/models`.
    pub describe: String,
}

/// Open a component (`transformer`, `text_encoder`): from its GGUF file when `opts` names one
/// (names mapped with `map`), else the checkout's safetensors, quantized at load when `opts`
/// asks.
pub fn component(
    files: &crate::pipeline::ModelFiles,
    opts: &crate::pipeline::LoadOptions,
    component: &str,
    stem: &str,
    dtype: DType,
    device: &Device,
    map: names::NameMap,
) -> Result<Component> {
    if let Some(src) = opts.components.get(component) {
        let path = src.resolve()?;
        let store = Arc::new(GgufStore::open(&path, component, map)?);
        let bytes = store.device_bytes(dtype);
        tracing::info!(component, source = %src, bytes, "weights from a GGUF file");
        return Ok(Component {
            weights: Weights::gguf(store, dtype, device),
            bytes,
            describe: format!("gguf {src}"),
        });
    }
    match opts.quantize.get(component) {
        Some(&ty) => Ok(Component {
            weights: Weights::quantize(
                files.var_builder(component, stem, dtype, device)?,
                ty,
                keep_high_precision,
            ),
            bytes: quantized_bytes(files, component, stem, dtype, ty)?,
            describe: format!("{ty} at load"),
        }),
        None => Ok(Component {
            weights: Weights::dense(files.dense_var_builder(
                component,
                stem,
                dtype,
                device,
                opts.share_for(component, device),
            )?),
            bytes: files.parameter_count(component, stem)? * dtype.size_in_bytes() as u64,
            describe: "dense".into(),
        }),
    }
}

/// Bytes of a safetensors component after `--quantize ty` (from its headers; rows are assumed
/// whole blocks, as in the real models).
pub fn quantized_bytes(
    files: &crate::pipeline::ModelFiles,
    component: &str,
    stem: &str,
    dtype: DType,
    ty: QuantType,
) -> Result<u64> {
    Ok(files
        .tensor_elements(component, stem)?
        .iter()
        .map(|(name, elems, rank)| {
            if *rank == 2 && quantized_by_default(name) {
                ty.bytes(*elems)
            } else {
                elems * dtype.size_in_bytes() as u64
            }
        })
        .sum())
}

/// Bytes a component will take, without loading it: its GGUF file's tensors, its quantized
/// size, or its parameters in `dtype`.
pub fn estimate_bytes(
    files: &crate::pipeline::ModelFiles,
    opts: &crate::pipeline::LoadOptions,
    component: &str,
    stem: &str,
    dtype: DType,
) -> Result<u64> {
    if let Some(src) = opts.components.get(component) {
        let file = gguf::GgufFile::open(&src.resolve()?)?;
        return Ok(file
            .tensors
            .values()
            .map(|t| {
                if store::is_float(t.dtype) {
                    t.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64
                } else {
                    t.bytes
                }
            })
            .sum());
    }
    match opts.quantize.get(component) {
        Some(&ty) => quantized_bytes(files, component, stem, dtype, ty),
        None => Ok(files.parameter_count(component, stem)? * dtype.size_in_bytes() as u64),
    }
}
