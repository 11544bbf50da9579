//! The model catalog: hosted model IDs -> local pipelines, prices and size limits.
//!
//! The data lives in `models/catalog.toml` (compiled in as the default); this module parses and
//! checks it once at start and answers look-ups.

mod spec;

use std::collections::BTreeMap;
use std::path::Path;

pub use spec::{GUIDANCE_RANGE, STEPS_RANGE};

/// The catalog shipped in the repo.
pub const BUILTIN: &str = include_str!("../../models/catalog.toml");

/// A catalog that could not be read or is malformed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
pub struct CatalogError {
    pub source_name: String,
    pub line: Option<usize>,
    pub message: String,
}

/// A local pipeline the server loads.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub name: String,
    /// `hf:ORG/REPO[@REV]` or a local directory.
    pub weights: String,
    /// Components taken from a GGUF file instead of the checkout: `transformer` /
    /// `text_encoder` -> `FILE.gguf` or `hf:ORG/REPO/PATH.gguf`.
    pub components: BTreeMap<String, String>,
    /// Quantize the full-precision transformer and text encoder at load (`q8_0`, ...).
    pub quantize: Option<String>,
    /// The model family (`z-image`, `flux2-klein`); `None`: read from the checkout's
    /// `model_index.json`.
    pub family: Option<String>,
    /// Prompts are cut at this many tokens; `None`: the family's default.
    pub max_sequence_length: Option<usize>,
    /// Default model evaluations.
    pub steps: u32,
    pub guidance_scale: f32,
}

/// Allowed width/height of a model, and its default (square) size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRule {
    pub min: u32,
    pub max: u32,
    pub step: u32,
    pub default: u32,
}

impl SizeRule {
    pub fn allows(&self, v: u32) -> bool {
        (self.min..=self.max).contains(&v) && v.is_multiple_of(self.step)
    }
}

/// Price by resolution x quality (gpt-image-2).
#[derive(Debug, Clone, PartialEq)]
pub struct Tiered {
    /// Resolution name -> default square size, smallest first.
    pub resolutions: Vec<(String, u32)>,
    /// Quality names, low to high.
    pub qualities: Vec<String>,
    /// resolution -> quality -> credits per image.
    pub prices: BTreeMap<String, BTreeMap<String, i64>>,
    pub default_resolution: String,
    pub default_quality: String,
    /// Steps for a quality, where it differs from the pipeline's default.
    pub quality_steps: BTreeMap<String, u32>,
}

impl Tiered {
    pub fn size_of(&self, resolution: &str) -> Option<u32> {
        self.resolutions
            .iter()
            .find(|(r, _)| r == resolution)
            .map(|(_, s)| *s)
    }
    pub fn price(&self, resolution: &str, quality: &str) -> Option<i64> {
        self.prices.get(resolution)?.get(quality).copied()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Pricing {
    /// Credits per image.
    Flat(i64),
    Tiered(Tiered),
}

impl Pricing {
    /// Credits per image of a request that sets neither resolution nor quality.
    pub fn default_price(&self) -> i64 {
        match self {
            Pricing::Flat(p) => *p,
            Pricing::Tiered(t) => t
                .price(&t.default_resolution, &t.default_quality)
                .unwrap_or(0),
        }
    }
}

/// One hosted model ID.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    /// Name of the local pipeline serving it.
    pub pipeline: String,
    pub sizes: SizeRule,
    pub pricing: Pricing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pipelines: BTreeMap<String, Pipeline>,
    models: Vec<Model>,
}

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn builtin() -> Result<Self, CatalogError> {
        spec::parse("built-in models/catalog.toml", BUILTIN)
    }

    /// Parse catalog text; `name` prefixes error messages.
    pub fn parse(name: &str, text: &str) -> Result<Self, CatalogError> {
        spec::parse(name, text)
    }

    /// Read and parse a catalog file.
    pub fn from_file(path: &Path) -> Result<Self, CatalogError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError {
            source_name: name.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        spec::parse(&name, &text)
    }

    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    /// Models in catalog order.
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.get(name)
    }

    /// Pipelines that at least one model uses (the ones to load).
    pub fn used_pipelines(&self) -> Vec<&Pipeline> {
        self.pipelines
            .values()
            .filter(|p| self.models.iter().any(|m| m.pipeline == p.name))
            .collect()
    }

    /// Model IDs, comma-separated, for error messages.
    pub fn ids(&self) -> String {
        self.models
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn builtin_has_every_hosted_model_with_its_price() {
        let c = Catalog::builtin().unwrap();
        let expected = [
            ("z-image-turbo", 100),
            ("artsyn-light", 240),
            ("flux-2-pro", 250),
            ("seedream-v4", 200),
            ("seedream-v4.5", 800),
            ("nano-banana-pro", 800),
            ("nano-banana-pro-ultra", 1000),
        ];
        for (id, price) in expected {
            let m = c.model(id).unwrap();
            assert_eq!(m.pricing, Pricing::Flat(price), "{id}");
            let want = if id == "flux-2-pro" {
                "flux2-klein"
            } else {
                "z-image-turbo"
            };
            assert_eq!(m.pipeline, want, "{id}");
            assert_eq!(m.sizes.default, 1024);
            assert_eq!(m.sizes.step, 16);
        }
        assert_eq!(c.models().len(), 8);
        let p = c.pipeline("z-image-turbo").unwrap();
        assert_eq!(p.weights, "hf:Tongyi-MAI/Z-Image-Turbo");
        assert_eq!(p.steps, 8);
        assert_eq!(p.guidance_scale, 0.0);
        assert_eq!(c.used_pipelines().len(), 2);
        let f = c.pipeline("flux2-klein").unwrap();
        assert_eq!(f.weights, "hf:black-forest-labs/FLUX.2-klein-4B");
        assert_eq!(f.family.as_deref(), Some("flux2-klein"));
        assert_eq!(f.steps, 4);
    }

    #[test]
    fn builtin_gpt_image_2_table() {
        let c = Catalog::builtin().unwrap();
        let m = c.model("gpt-image-2").unwrap();
        let Pricing::Tiered(t) = &m.pricing else {
            panic!("gpt-image-2 is not tiered");
        };
        let table = [
            ("1k", [50, 200, 800]),
            ("2k", [100, 400, 1600]),
            ("4k", [200, 800, 3200]),
        ];
        for (res, prices) in table {
            for (q, p) in ["low", "medium", "high"].iter().zip(prices) {
                assert_eq!(t.price(res, q), Some(p), "{res} {q}");
            }
        }
        assert_eq!(t.size_of("1k"), Some(1024));
        assert_eq!(t.size_of("2k"), Some(2048));
        assert_eq!(t.size_of("4k"), Some(4096));
        assert_eq!(m.sizes.default, 1024);
        assert_eq!(m.pricing.default_price(), 200);
        assert_eq!(t.qualities, ["low", "medium", "high"]);
    }

    #[test]
    fn quantized_variants_and_their_checks() {
        let c = Catalog::builtin().unwrap();
        let q = c.pipeline("z-image-turbo-q8").unwrap();
        assert_eq!(q.quantize.as_deref(), Some("q8_0"));
        assert!(c.pipeline("z-image-turbo").unwrap().quantize.is_none());
        let model = "\n[[models]]\nid = \"m\"\npipeline = \"p\"\nprice = 1\nmin_size = 64\n\
                     max_size = 64\nsize_step = 16\ndefault_size = 64\n";
        let with = |extra: &str| {
            format!(
                "[pipelines.p]\nweights = \"/m\"\nsteps = 8\nguidance_scale = 0.0\n{extra}\n{model}"
            )
        };
        let ok = Catalog::parse("t", &with("transformer = \"hf:a/b/sub/z-Q8_0.gguf\"")).unwrap();
        assert_eq!(
            ok.pipeline("p").unwrap().components["transformer"],
            "hf:a/b/sub/z-Q8_0.gguf"
        );
        let e = Catalog::parse("t", &with("quantize = \"q3_xs\"")).unwrap_err();
        assert!(e.message.contains("q3_xs") && e.line == Some(1), "{e}");
        let e = Catalog::parse("t", &with("text_encoder = \"/m/te.safetensors\"")).unwrap_err();
        assert!(
            e.message.contains("text_encoder") && e.message.contains(".gguf"),
            "{e}"
        );
    }

    #[test]
    fn error_display_names_file_and_line() {
        let e = CatalogError {
            source_name: "x.toml".into(),
            line: Some(3),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "x.toml, line 3: bad");
    }
}
