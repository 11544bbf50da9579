//! `x W^T` over a block-quantized `W`.
//!
//! On the CPU candle's quantized matmul quantizes each activation row (to Q8_K / Q8_0) and
//! takes dot products with the weight blocks: the result differs from the product with the
//! dequantized weight by the activation rounding (compare with a tolerance), and each row's
//! result depends on that row alone, so batching stays bit-exact.
//!
//! On CUDA and Metal candle's fast kernels (MMQ/MMVQ) were measured by mold to return inf/NaN
//! on Z-Image's `feed_forward.w2` (large activations). So the fast kernel is used on a device
//! only after a self-check passes there: the first matrix of each quantized type loaded onto a
//! device is multiplied both ways with activations of ordinary and of large magnitude; if the
//! fast result is not finite or not within 1% of the dequantized product, every matrix of that
//! type on that device takes the dequantize path instead: the weight is dequantized to the run
//! dtype for each product (it stays quantized in memory; the cost is one dequantize kernel per
//! layer and step, and a transient dense copy of one layer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::pipeline::error::Result;

/// How products over one matrix run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// candle's quantized kernel.
    Quantized,
    /// Dequantize to the activation dtype, then a dense matmul.
    Dequantize,
}

/// One quantized matrix `(out, in)` on its device.
pub struct QuantMatrix {
    w: Arc<QTensor>,
    mm: QMatMul,
    out: usize,
    path: Path,
}

/// Self-check verdicts per (device, type): `true` when the fast kernel may be used.
fn verdicts() -> &'static Mutex<HashMap<(String, GgmlDType), bool>> {
    static V: OnceLock<Mutex<HashMap<(String, GgmlDType), bool>>> = OnceLock::new();
    V.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether `DIFFUSIOND_QUANT_DEQUANTIZE=1` forces the dequantize path everywhere.
fn forced_dequantize() -> bool {
    std::env::var("DIFFUSIOND_QUANT_DEQUANTIZE").is_ok_and(|v| v == "1")
}

/// Max |a - b| and max |b| over two tensors of one shape (f32 on the host).
fn diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32, bool)> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let finite = a.iter().all(|v| v.is_finite());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    Ok((d, m, finite))
}

/// Run the self-check of the fast kernel for `w` on its device: products of `x` (64 rows of
/// N(0,1), and the same times 1000) both ways.
pub fn self_check(w: &Arc<QTensor>, device: &Device) -> Result<bool> {
    let (_, k) = w.shape().dims2()?;
    let mm = QMatMul::QTensor(w.clone());
    let dense = w.dequantize(device)?;
    for scale in [1.0f64, 1000.0] {
        let x = (Tensor::randn(0f32, 1.0, (64, k), device)? * scale)?;
        let fast = mm.forward(&x)?;
        let slow = x.matmul(&dense.t()?)?;
        let (d, m, finite) = diff(&fast, &slow)?;
        if !finite || d > 1e-2 * m.max(1e-6) {
            tracing::warn!(
                device = ?device.location(), dtype = ?w.dtype(), max_diff = d, max_abs = m, finite,
                "the quantized matmul kernel failed its self-check on this device: \
                 dequantizing these weights per product instead"
            );
            return Ok(false);
        }
    }
    Ok(true)
}

impl QuantMatrix {
    /// Move a host matrix onto `device`; off the CPU, decide the path by the self-check.
    pub fn new(host: QTensor, out: usize, device: &Device) -> Result<Self> {
        let w = if device.is_cpu() {
            Arc::new(host)
        } else {
            let storage =
                candle_core::quantized::QStorage::from_data(host.data()?, device, host.dtype())?;
            Arc::new(QTensor::new(storage, host.shape().clone())?)
        };
        let path = if forced_dequantize() {
            Path::Dequantize
        } else if device.is_cpu() {
            Path::Quantized
        } else {
            let key = (format!("{:?}", device.location()), w.dtype());
            let known = verdicts()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            let ok = match known {
                Some(ok) => ok,
                None => {
                    let ok = self_check(&w, device)?;
                    verdicts()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, ok);
                    ok
                }
            };
            if ok {
                Path::Quantized
            } else {
                Path::Dequantize
            }
        };
        Ok(Self {
            mm: QMatMul::QTensor(w.clone()),
            w,
            out,
            path,
        })
    }

    pub fn out(&self) -> usize {
        self.out
    }

    /// Bytes of the stored matrix.
    pub fn bytes(&self) -> usize {
        self.w.storage_size_in_bytes()
    }

    /// `(rows, in)` -> `(rows, out)` in the input's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.contiguous()?;
        match self.path {
            Path::Quantized if x.device().is_cpu() => Ok(self.mm.forward(&x)?),
            Path::Quantized => Ok(self.mm.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt)?),
            Path::Dequantize => {
                let w = self.w.dequantize(x.device())?.to_dtype(dt)?;
                Ok(x.matmul(&w.t()?)?)
            }
        }
    }
}

/// Quantized matrices fused along the output (one per stored type).
pub struct QuantParts {
    parts: Vec<QuantMatrix>,
}

impl QuantParts {
    pub fn new(parts: Vec<QuantMatrix>) -> Self {
        Self { parts }
    }

    /// `(rows, in)` -> `(rows, sum of outs)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let [one] = self.parts.as_slice() {
            return one.forward(x);
        }
        let ys = self
            .parts
            .iter()
            .map(|p| p.forward(x))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&ys, D::Minus1)?)
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.bytes()).sum()
    }
}
