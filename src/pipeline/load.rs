//! Weight sources: a local directory in the published layout, or a Hugging Face hub repository
//! (`hf:ORG/REPO[@REVISION]`) fetched through hf-hub's cache. Sharded safetensors are resolved
//! through their `*.index.json` weight map; tensors of any float dtype are cast to the run dtype.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::de::DeserializeOwned;

use super::error::{load_err, PipelineError, Result};
use super::shared_weights::{self, Share, TensorFile};

/// Where a pipeline's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// A directory holding `model_index.json` and the component folders.
    Local(PathBuf),
    /// A hub repository, optionally at a revision (branch, tag or commit).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl FromStr for WeightSource {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, rev)) => (r, Some(rev.to_string())),
                None => (rest, None),
            };
            let valid = repo.split('/').count() == 2
                && repo.split('/').all(|p| !p.is_empty())
                && revision.as_deref().is_none_or(|r| !r.is_empty());
            if !valid {
                return Err(load_err(format!(
                    "bad weights source '{s}': expected hf:ORG/REPO[@REVISION]"
                )));
            }
            Ok(Self::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else if s.is_empty() {
            Err(load_err("empty weights source"))
        } else {
            Ok(Self::Local(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => match revision {
                Some(r) => write!(f, "hf:{repo}@{r}"),
                None => write!(f, "hf:{repo}"),
            },
        }
    }
}

/// Where one component's weights come from when they are not the checkout's own: a GGUF file,
/// local (`PATH.gguf`) or on the hub (`hf:ORG/REPO[@REVISION]/PATH.gguf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentSource {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: Option<String>,
        path: String,
    },
}

impl FromStr for ComponentSource {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            load_err(format!(
                "bad component source '{s}': expected a local FILE.gguf or hf:ORG/REPO[@REVISION]/PATH.gguf"
            ))
        };
        let src = if let Some(rest) = s.strip_prefix("hf:") {
            let mut parts = rest.splitn(3, '/');
            let (Some(org), Some(repo), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let (repo, revision) = match repo.split_once('@') {
                Some((r, rev)) => (r, Some(rev.to_string())),
                None => (repo, None),
            };
            if org.is_empty()
                || repo.is_empty()
                || path.is_empty()
                || path.contains("..")
                || revision.as_deref() == Some("")
            {
                return Err(bad());
            }
            Self::Hub {
                repo: format!("{org}/{repo}"),
                revision,
                path: path.to_string(),
            }
        } else if s.is_empty() {
            return Err(bad());
        } else {
            Self::Local(PathBuf::from(s))
        };
        let name = match &src {
            Self::Local(p) => p.to_string_lossy().into_owned(),
            Self::Hub { path, .. } => path.clone(),
        };
        if !name.to_ascii_lowercase().ends_with(".gguf") {
            return Err(load_err(format!(
                "component source '{s}' is not a .gguf file (a component can come from a GGUF \
                 file; whole checkouts are given as PIPELINE=SOURCE)"
            )));
        }
        Ok(src)
    }
}

impl std::fmt::Display for ComponentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub {
                repo,
                revision,
                path,
            } => match revision {
                Some(r) => write!(f, "hf:{repo}@{r}/{path}"),
                None => write!(f, "hf:{repo}/{path}"),
            },
        }
    }
}

impl ComponentSource {
    /// The local path of the file, downloading it into the hub cache if needed.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            Self::Local(p) => {
                if p.is_file() {
                    Ok(p.clone())
                } else {
                    Err(load_err(format!(
                        "GGUF file {} does not exist",
                        p.display()
                    )))
                }
            }
            Self::Hub {
                repo,
                revision,
                path,
            } => ModelFiles::open(&WeightSource::Hub {
                repo: repo.clone(),
                revision: revision.clone(),
            })?
            .file(path),
        }
    }
}

/// Resolves files of one pipeline checkout, downloading them on first use for hub sources.
pub struct ModelFiles {
    source: WeightSource,
    hub: Option<HubRepo>,
    /// Weights made at random instead of read (`diffusiond bench --synthetic`).
    random: Option<std::sync::Arc<super::synthetic::RandomWeights>>,
}

struct HubRepo {
    repo: Repo,
    cache: Cache,
    /// None when offline (`HF_HUB_OFFLINE=1`): only the cache is used.
    api: Option<ApiRepo>,
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"))
        .unwrap_or(false)
}

impl ModelFiles {
    /// Open a source. Local directories must exist; hub sources only build the client here.
    pub fn open(source: &WeightSource) -> Result<Self> {
        let hub = match source {
            WeightSource::Local(dir) => {
                if !dir.is_dir() {
                    return Err(load_err(format!(
                        "weights directory {} does not exist or is not a directory",
                        dir.display()
                    )));
                }
                None
            }
            WeightSource::Hub { repo, revision } => {
                let repo = match revision {
                    Some(rev) => Repo::with_revision(repo.clone(), RepoType::Model, rev.clone()),
                    None => Repo::new(repo.clone(), RepoType::Model),
                };
                let cache = Cache::from_env();
                let api = if hub_offline() {
                    None
                } else {
                    let token = std::env::var("HF_TOKEN")
                        .ok()
                        .filter(|t| !t.trim().is_empty())
                        .or_else(|| cache.token());
                    let api = ApiBuilder::from_env()
                        .with_token(token)
                        .with_progress(true)
                        .with_retries(2)
                        .build()
                        .map_err(|e| load_err(format!("cannot set up the hub client: {e}")))?;
                    Some(api.repo(repo.clone()))
                };
                Some(HubRepo { repo, cache, api })
            }
        };
        Ok(Self {
            source: source.clone(),
            hub,
            random: None,
        })
    }

    /// A directory of configuration files (and a tokenizer) whose weights are made at random
    /// on the device as the loaders ask for them (see [`super::synthetic`]).
    pub fn with_random_weights(dir: PathBuf) -> Result<Self> {
        let mut files = Self::open(&WeightSource::Local(dir))?;
        files.random = Some(Default::default());
        Ok(files)
    }

    pub fn source(&self) -> &WeightSource {
        &self.source
    }

    /// Path of a file of the checkout (e.g. `vae/config.json`), downloading it if needed.
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        match (&self.source, &self.hub) {
            (WeightSource::Local(dir), _) => {
                let p = dir.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(load_err(format!("missing weights file {}", p.display())))
                }
            }
            (WeightSource::Hub { .. }, Some(hub)) => {
                if let Some(p) = hub.cache.repo(hub.repo.clone()).get(rel) {
                    return Ok(p);
                }
                match &hub.api {
                    None => Err(load_err(format!(
                        "{rel} of {} is not in the hub cache ({}) and HF_HUB_OFFLINE is set",
                        self.source,
                        hub.cache.path().display()
                    ))),
                    Some(api) => api.get(rel).map_err(|e| {
                        load_err(format!(
                            "cannot fetch {rel} from {}: {e} (check the network, HF_TOKEN for gated repos, or use a local directory)",
                            self.source
                        ))
                    }),
                }
            }
            (WeightSource::Hub { .. }, None) => Err(load_err("hub client missing")),
        }
    }

    /// Whether a file exists (locally, in the cache, or on the hub).
    fn try_file(&self, rel: &str) -> Option<PathBuf> {
        self.file(rel).ok()
    }

    /// Read and parse a JSON file of the checkout.
    pub fn json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let path = self.file(rel)?;
        read_json(&path)
    }

    /// The safetensors files of a component: through `{stem}.safetensors.index.json` when the
    /// component is sharded, else the single `{stem}.safetensors`.
    pub fn safetensors(&self, component: &str, stem: &str) -> Result<Vec<PathBuf>> {
        let index_rel = format!("{component}/{stem}.safetensors.index.json");
        if let Some(index_path) = self.try_file(&index_rel) {
            let index: serde_json::Value = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| load_err(format!("{} has no weight_map", index_path.display())))?;
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            if files.is_empty() {
                return Err(load_err(format!("{} lists no files", index_path.display())));
            }
            return files
                .into_iter()
                .map(|f| {
                    if f.contains("..") || f.contains('/') || f.contains('\\') {
                        return Err(load_err(format!(
                            "{} names an unsafe file '{f}'",
                            index_path.display()
                        )));
                    }
                    self.file(&format!("{component}/{f}"))
                })
                .collect();
        }
        Ok(vec![self.file(&format!("{component}/{stem}.safetensors"))?])
    }

    /// Number of parameters (elements of all tensors) of a component, from the safetensors
    /// headers alone (nothing is loaded): what sizes the pipeline in memory.
    pub fn parameter_count(&self, component: &str, stem: &str) -> Result<u64> {
        if let Some(random) = &self.random {
            return Ok(random.parameter_count(component));
        }
        let mut total = 0u64;
        for path in self.safetensors(component, stem)? {
            total += safetensors_elements(&path)?;
        }
        Ok(total)
    }

    /// Every tensor of a component: its name, element count and rank, from the safetensors
    /// headers alone.
    pub fn tensor_elements(
        &self,
        component: &str,
        stem: &str,
    ) -> Result<Vec<(String, u64, usize)>> {
        let mut out = Vec::new();
        for path in self.safetensors(component, stem)? {
            out.extend(safetensors_tensors(&path)?);
        }
        Ok(out)
    }

    /// Every tensor of a component with its file's sha256 ([`shared_weights::file_digest`]):
    /// what identifies its bytes for sharing between pipelines.
    pub fn tensor_files(&self, component: &str, stem: &str) -> Result<Vec<TensorFile>> {
        if self.random.is_some() {
            return Ok(Vec::new());
        }
        tensor_files(&self.safetensors(component, stem)?)
    }

    /// As [`Self::var_builder`], with the tensors shared with the other pipelines of the device
    /// when `share` is given (random weights never are).
    pub fn dense_var_builder(
        &self,
        component: &str,
        stem: &str,
        dtype: DType,
        device: &Device,
        share: Option<&Share>,
    ) -> Result<VarBuilder<'static>> {
        match share {
            Some(share) if self.random.is_none() => {
                let files = self.safetensors(component, stem)?;
                let tensors = tensor_files(&files)?;
                shared_weights::var_builder(&files, tensors, dtype, device, share.clone())
            }
            _ => self.var_builder(component, stem, dtype, device),
        }
    }

    /// A VarBuilder over a component's weights in `dtype` on `device`.
    pub fn var_builder(
        &self,
        component: &str,
        stem: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        if let Some(random) = &self.random {
            return Ok(random.var_builder(component, dtype, device));
        }
        let files = self.safetensors(component, stem)?;
        mmap_var_builder(&files, dtype, device)
    }
}

/// Memory-map safetensors files into a VarBuilder; tensors are cast to `dtype` when read.
#[allow(unsafe_code)]
fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // SAFETY: the files are opened read-only and must not be modified while the pipeline is
    // loading; weights are copied into device tensors when read, so the map is not kept.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        let names: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
        load_err(format!("cannot read safetensors {}: {e}", names.join(", ")))
    })
}

/// Every tensor of these safetensors files with its file's sha256.
fn tensor_files(paths: &[PathBuf]) -> Result<Vec<TensorFile>> {
    let mut out = Vec::new();
    for path in paths {
        let digest = shared_weights::file_digest(path)?;
        out.extend(
            safetensors_tensors(path)?
                .into_iter()
                .map(|(name, elements, _)| TensorFile {
                    name,
                    elements,
                    digest: digest.clone(),
                }),
        );
    }
    Ok(out)
}

/// Elements of every tensor in one safetensors file, read from its JSON header.
fn safetensors_elements(path: &Path) -> Result<u64> {
    Ok(safetensors_tensors(path)?.iter().map(|t| t.1).sum())
}

/// Name, element count and rank of every tensor in one safetensors file, from its header.
fn safetensors_tensors(path: &Path) -> Result<Vec<(String, u64, usize)>> {
    use std::io::Read;
    let bad = |why: String| load_err(format!("{}: {why}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes is not plausible")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("malformed header: {e}")))?;
    Ok(header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(k, v)| Some((k, v.get("shape")?.as_array().cloned()?)))
        .map(|(k, shape)| {
            let elems = shape.iter().filter_map(|d| d.as_u64()).product::<u64>();
            (k.clone(), elems, shape.len())
        })
        .collect())
}

/// Read and parse a JSON file, naming it in the error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| load_err(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| load_err(format!("malformed {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "hf:Tongyi-MAI/Z-Image-Turbo".parse::<WeightSource>().ok(),
            Some(WeightSource::Hub {
                repo: "Tongyi-MAI/Z-Image-Turbo".into(),
                revision: None
            })
        );
        assert_eq!(
            "hf:a/b@v1".parse::<WeightSource>().ok(),
            Some(WeightSource::Hub {
                repo: "a/b".into(),
                revision: Some("v1".into())
            })
        );
        assert!("hf:nope".parse::<WeightSource>().is_err());
        assert!("hf:a/b@".parse::<WeightSource>().is_err());
        assert_eq!(
            "/x/y".parse::<WeightSource>().ok(),
            Some(WeightSource::Local("/x/y".into()))
        );
    }

    #[test]
    fn parses_component_sources() {
        assert_eq!(
            "hf:jayn7/Z-Image-Turbo-GGUF/z_image_turbo-Q8_0.gguf"
                .parse::<ComponentSource>()
                .ok(),
            Some(ComponentSource::Hub {
                repo: "jayn7/Z-Image-Turbo-GGUF".into(),
                revision: None,
                path: "z_image_turbo-Q8_0.gguf".into()
            })
        );
        assert_eq!(
            "hf:a/b@main/sub/x.gguf".parse::<ComponentSource>().ok(),
            Some(ComponentSource::Hub {
                repo: "a/b".into(),
                revision: Some("main".into()),
                path: "sub/x.gguf".into()
            })
        );
        assert!("hf:a/b".parse::<ComponentSource>().is_err());
        assert!("hf:a/b/model.safetensors"
            .parse::<ComponentSource>()
            .is_err());
        assert!("/m/x.safetensors".parse::<ComponentSource>().is_err());
        assert_eq!(
            "/m/x.GGUF".parse::<ComponentSource>().ok(),
            Some(ComponentSource::Local("/m/x.GGUF".into()))
        );
    }
}
