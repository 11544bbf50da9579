//! Peak arithmetic of known devices, for the share-of-peak column: dense (no sparsity) tensor
//! throughput in bf16/f16 with f32 accumulation, and plain f32 (candle's CUDA matmul does not
//! use TF32 unless asked), in TFLOP/s, from the vendors' datasheets and whitepapers. Apple's GPUs
//! have no separate half-precision rate worth counting; their figures are approximate.

/// `(name fragment, bf16/f16 dense TFLOP/s, f32 TFLOP/s)`, most specific first.
const KNOWN: &[(&str, f64, f64)] = &[
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 4080", 97.5, 48.7),
    ("RTX 3090 Ti", 80.0, 40.0),
    ("RTX 3090", 71.0, 35.6),
    ("M1 Ultra", 21.2, 21.2),
    ("M1 Max", 10.6, 10.6),
    ("M1 Pro", 5.3, 5.3),
    ("M1", 2.6, 2.6),
    ("M2 Ultra", 27.2, 27.2),
    ("M2 Max", 13.6, 13.6),
    ("M2 Pro", 6.8, 6.8),
    ("M2", 3.6, 3.6),
    ("M3 Max", 16.4, 16.4),
    ("M3 Pro", 7.4, 7.4),
    ("M3", 4.1, 4.1),
    ("M4 Max", 18.4, 18.4),
    ("M4 Pro", 9.2, 9.2),
    ("M4", 4.3, 4.3),
];

/// The peak TFLOP/s of a device by its name (`NVIDIA H100 80GB HBM3`, `Apple M2 Max`) in a
/// dtype (`bf16`/`f16` take the tensor rate, `f32` the plain one), with the entry matched.
pub fn known_peak(device_name: &str, dtype: &str) -> Option<(f64, &'static str)> {
    let (name, half, full) = KNOWN
        .iter()
        .find(|(frag, _, _)| contains_word(device_name, frag))?;
    Some((if dtype == "f32" { *full } else { *half }, name))
}

/// `frag` occurs in `name` and is not followed by more of a model number (`M1` must not match
/// `M10`, `RTX 3090` must match `RTX 3090` but `RTX 3090 Ti` is listed before it).
fn contains_word(name: &str, frag: &str) -> bool {
    name.match_indices(frag).any(|(i, _)| {
        name[i + frag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_devices_by_name_and_dtype() {
        assert_eq!(
            known_peak("NVIDIA H100 80GB HBM3", "bf16"),
            Some((989.4, "H100"))
        );
        assert_eq!(
            known_peak("NVIDIA H100 PCIe", "f32"),
            Some((51.2, "H100 PCIe"))
        );
        assert_eq!(known_peak("NVIDIA H200", "bf16").map(|p| p.1), Some("H200"));
        assert_eq!(
            known_peak("NVIDIA GeForce RTX 3090 Ti", "f16").map(|p| p.1),
            Some("RTX 3090 Ti")
        );
        assert_eq!(
            known_peak("Apple M2 Max", "f32").map(|p| p.1),
            Some("M2 Max")
        );
        assert_eq!(known_peak("Apple M2", "f32").map(|p| p.1), Some("M2"));
        assert_eq!(known_peak("AMD EPYC 9R14 96-Core Processor", "f32"), None);
    }
}
