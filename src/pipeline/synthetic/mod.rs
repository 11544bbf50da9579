//! Random weights with a real configuration, for measuring speed and memory without the
//! checkpoint: a synthetic pipeline runs exactly the kernels of the real one, with the same
//! shapes, for the same time. Nothing is downloaded: the configuration files are written into a
//! temporary directory (the family's published configuration, [`published`], or a given
//! directory's files over it) and every weight the loaders ask for is made on the device, in the
//! run dtype, the moment it is asked for ([`RandomWeights`]).
//!
//! The images are noise; only time and memory mean anything.

pub mod published;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::error::{load_err, Result};
use super::family::{Family, LoadOptions};
use super::load::ModelFiles;
use super::registry;

/// The Qwen tokenizer's vocabulary size, used when a configuration leaves it open.
const QWEN_VOCAB: u64 = 151_936;

/// Makes every weight a loader asks for, and counts them per component.
#[derive(Debug, Default)]
pub struct RandomWeights {
    /// Elements made per component, by tensor name (a tensor asked for twice counts once).
    made: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl RandomWeights {
    /// A VarBuilder over random weights of one component.
    pub fn var_builder(
        self: &Arc<Self>,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = Backend {
            component: component.to_string(),
            weights: Arc::clone(self),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Elements made so far for a component: after loading, its parameter count.
    pub fn parameter_count(&self, component: &str) -> u64 {
        self.made
            .lock()
            .map(|m| m.get(component).map_or(0, |t| t.values().sum()))
            .unwrap_or(0)
    }
}

struct Backend {
    component: String,
    weights: Arc<RandomWeights>,
}

/// A weight of this name and shape: norm scales and variances 1, biases and means 0, matrices
/// and kernels normal with standard deviation `1/sqrt(fan_in)` (activations keep their scale
/// through the layers, so nothing overflows in bf16).
fn random(shape: &Shape, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let last = name.rsplit('.').next().unwrap_or(name);
    let dims = shape.dims();
    let t = if last == "running_var" || (dims.len() == 1 && last == "weight") {
        Tensor::ones(shape.clone(), DType::F32, dev)?
    } else if dims.len() <= 1 {
        Tensor::zeros(shape.clone(), DType::F32, dev)?
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let std = 1.0 / (fan_in.max(1) as f32).sqrt();
        Tensor::randn(0f32, std, shape.clone(), dev)?
    };
    t.to_dtype(dtype)
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut made) = self.weights.made.lock() {
            made.entry(self.component.clone())
                .or_default()
                .insert(name.to_string(), s.elem_count() as u64);
        }
        random(&s, name, dtype, dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "synthetic weights: {}.{name} was asked for without a shape",
            self.component
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A tokenizer for synthetic runs: one token per word or punctuation run, the chat template's
/// special tokens, everything else the unknown token. Token ids do not change the time of a
/// run; the count does, and it comes close to the Qwen tokenizer's on English prompts.
fn word_tokenizer() -> serde_json::Value {
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
    ];
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| {
            serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let mut vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(id, s)| (s.to_string(), id.into()))
        .collect();
    for w in ["<unk>", "user", "assistant"] {
        let id = vocab.len();
        vocab.insert(w.into(), id.into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// A synthetic checkout: configuration files in a temporary directory (removed on drop).
pub struct SyntheticCheckout {
    dir: tempfile::TempDir,
    /// Where the configuration came from, for reports.
    pub origin: String,
    pub family: &'static str,
}

impl SyntheticCheckout {
    /// The configuration of `family`: its published one, with every file that `overlay` (a
    /// directory in the diffusers layout, configs only or a whole checkout) holds taken from
    /// there instead. The family is `overlay`'s `model_index.json` class when it has one.
    pub fn new(family: Option<&str>, overlay: Option<&Path>) -> Result<Self> {
        let overlay_family = match overlay {
            Some(dir) if dir.join("model_index.json").is_file() => {
                let files = ModelFiles::open(&super::WeightSource::Local(dir.to_path_buf()))?;
                Some(registry::detect(&files)?.name)
            }
            _ => None,
        };
        let family = match (overlay_family, family) {
            (Some(f), _) => f,
            (None, Some(name)) => registry::family(name)?.name,
            (None, None) => {
                return Err(load_err(format!(
                    "synthetic weights need a family: one of {}",
                    registry::family_names()
                )))
            }
        };
        let base = published::files(family).ok_or_else(|| {
            load_err(format!(
                "no published configuration of family {family} is embedded"
            ))
        })?;
        let dir = tempfile::Builder::new()
            .prefix("diffusiond-synthetic-")
            .tempdir()
            .map_err(|e| load_err(format!("cannot make a temporary directory: {e}")))?;
        let write = |rel: &str, text: &str| -> Result<()> {
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| load_err(format!("cannot write {}: {e}", path.display())))?;
            }
            std::fs::write(&path, text)
                .map_err(|e| load_err(format!("cannot write {}: {e}", path.display())))
        };
        let mut from_overlay = Vec::new();
        for (rel, text) in base
            .iter()
            .map(|(r, t)| (*r, t.to_string()))
            .chain([("tokenizer/tokenizer.json", word_tokenizer().to_string())])
        {
            let theirs = overlay.map(|d| d.join(rel)).filter(|p| p.is_file());
            let text = match &theirs {
                Some(p) => {
                    from_overlay.push(rel);
                    std::fs::read_to_string(p)
                        .map_err(|e| load_err(format!("cannot read {}: {e}", p.display())))?
                }
                None => text,
            };
            let text = if rel == "text_encoder/config.json" {
                with_vocab(&text, rel)?
            } else {
                text
            };
            write(rel, &text)?;
        }
        let origin = match overlay {
            Some(d) if from_overlay.len() == base.len() + 1 => {
                format!("{} (its configuration and tokenizer)", d.display())
            }
            Some(d) if !from_overlay.is_empty() => format!(
                "{} ({}; the rest from {}'s published configuration)",
                d.display(),
                from_overlay.join(", "),
                published::checkpoint(family)
            ),
            Some(d) => {
                return Err(load_err(format!(
                    "{} holds none of model_index.json, */config.json, tokenizer/tokenizer.json",
                    d.display()
                )))
            }
            None => format!(
                "{} (published configuration)",
                published::checkpoint(family)
            ),
        };
        Ok(Self {
            dir,
            origin,
            family,
        })
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Load the pipeline with random weights made on `opts.device`.
    pub fn load(&self, opts: &LoadOptions) -> Result<Box<dyn Family>> {
        let files = ModelFiles::with_random_weights(self.dir())?;
        registry::load(&files, Some(self.family), opts)
    }
}

/// A text-encoder config whose `vocab_size` is null or absent gets the Qwen vocabulary.
fn with_vocab(text: &str, rel: &str) -> Result<String> {
    let mut cfg: serde_json::Value =
        serde_json::from_str(text).map_err(|e| load_err(format!("malformed {rel}: {e}")))?;
    if cfg.get("vocab_size").is_none_or(|v| v.is_null()) {
        cfg["vocab_size"] = QWEN_VOCAB.into();
    }
    Ok(cfg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_their_kind() -> Result<()> {
        let dev = Device::Cpu;
        let norm = random(&Shape::from(8), "layers.0.norm.weight", DType::F32, &dev)?;
        assert_eq!(norm.to_vec1::<f32>()?, vec![1.0; 8]);
        let bias = random(&Shape::from(8), "to_q.bias", DType::F32, &dev)?;
        assert_eq!(bias.to_vec1::<f32>()?, vec![0.0; 8]);
        let var = random(&Shape::from(4), "bn.running_var", DType::F32, &dev)?;
        assert_eq!(var.to_vec1::<f32>()?, vec![1.0; 4]);
        let w = random(&Shape::from((256, 1024)), "to_q.weight", DType::BF16, &dev)?;
        assert_eq!(w.dtype(), DType::BF16);
        let v: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        // 1/sqrt(1024) standard deviation: variance 1/1024, within sampling noise.
        assert!(
            (var * 1024.0 - 1.0).abs() < 0.05,
            "variance x fan_in = {}",
            var * 1024.0
        );
        Ok(())
    }

    #[test]
    fn published_configs_parse_with_their_derived_sizes() -> Result<()> {
        use super::super::{flux2, qwen3, z_image, WeightSource};
        let open = |family| -> Result<(SyntheticCheckout, ModelFiles)> {
            let c = SyntheticCheckout::new(Some(family), None)?;
            let files = ModelFiles::open(&WeightSource::Local(c.dir()))?;
            assert!(c.origin.contains("published"), "{}", c.origin);
            assert_eq!(registry::detect(&files)?.name, family);
            Ok((c, files))
        };
        let (_z, files) = open("z-image")?;
        let tr: z_image::config::TransformerConfig = files.json("transformer/config.json")?;
        tr.validate()?;
        assert_eq!((tr.head_dim(), tr.ffn_hidden()), (128, 10240));
        let te: qwen3::Config = files.json("text_encoder/config.json")?;
        assert_eq!((te.vocab_size, te.head_dim()), (151_936, 128));
        let (_f, files) = open("flux2-klein")?;
        let tr: flux2::config::TransformerConfig = files.json("transformer/config.json")?;
        tr.check()?;
        assert_eq!(
            (tr.dim(), tr.ff_hidden(), tr.joint_attention_dim),
            (3072, 9216, 3 * 2560)
        );
        Ok(())
    }

    #[test]
    fn an_overlay_replaces_the_files_it_has_and_fills_the_vocabulary() -> Result<()> {
        let over = tempfile::tempdir().map_err(|e| load_err(e.to_string()))?;
        std::fs::create_dir_all(over.path().join("text_encoder"))
            .map_err(|e| load_err(e.to_string()))?;
        let te = QWEN3_TEST.replace("\"vocab_size\": 1", "\"vocab_size\": null");
        std::fs::write(over.path().join("text_encoder/config.json"), te)
            .map_err(|e| load_err(e.to_string()))?;
        let c = SyntheticCheckout::new(Some("z-image"), Some(over.path()))?;
        assert!(
            c.origin.contains("text_encoder/config.json"),
            "{}",
            c.origin
        );
        let files = ModelFiles::open(&super::super::WeightSource::Local(c.dir()))?;
        let cfg: super::super::qwen3::Config = files.json("text_encoder/config.json")?;
        assert_eq!((cfg.hidden_size, cfg.vocab_size), (64, QWEN_VOCAB as usize));
        Ok(())
    }

    /// The README's table of the real configurations' FLOPs at 1024x1024 with a 40-token
    /// prompt: Z-Image's text encoder runs 35 layers, FLUX.2's 27 over 512 padded rows.
    #[test]
    fn published_flops_are_the_readme_s() -> Result<()> {
        use super::super::{flops, flux2, qwen3, vae, z_image, WeightSource};
        let near = |got: f64, want: f64| (got / want - 1.0).abs() < 0.005;
        let c = SyntheticCheckout::new(Some("z-image"), None)?;
        let files = ModelFiles::open(&WeightSource::Local(c.dir()))?;
        let tr: z_image::config::TransformerConfig = files.json("transformer/config.json")?;
        let te: qwen3::Config = files.json("text_encoder/config.json")?;
        let vae: vae::VaeConfig = files.json("vae/config.json")?;
        let w = flops::z_image(&tr, &te, 35, &vae, 40, 1024, 1024);
        assert!(near(w.text_encode, 0.33e12), "{w:?}");
        assert!(near(w.step_per_image, 55.56e12), "{w:?}");
        assert!(near(w.decode_per_image, 10.47e12), "{w:?}");
        assert!(near(w.total(1, 8), 455.3e12) && w.sequence == 4160, "{w:?}");
        let c = SyntheticCheckout::new(Some("flux2-klein"), None)?;
        let files = ModelFiles::open(&WeightSource::Local(c.dir()))?;
        let tr: flux2::config::TransformerConfig = files.json("transformer/config.json")?;
        let vae: vae::VaeConfig = files.json("vae/config.json")?;
        let w = flops::flux2(&tr, &te, 27, &vae, 512, 1024, 1024);
        assert!(near(w.text_encode, 2.93e12), "{w:?}");
        assert!(near(w.step_per_image, 34.79e12), "{w:?}");
        assert!(near(w.total(1, 4), 152.6e12) && w.sequence == 4608, "{w:?}");
        Ok(())
    }

    const QWEN3_TEST: &str = r#"{"vocab_size": 1, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 24, "rms_norm_eps": 1e-06, "rope_theta": 1000000}"#;
}
