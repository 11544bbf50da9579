//! The pipelines of one device: loaded when a job first needs them, and unloaded least
//! recently used first when loading the next would exceed the device's memory budget.
//! Full-precision tensors that two pipelines read from byte-identical files are held once
//! ([`SharedWeights`]) and counted once against the budget. Only
//! the device thread touches this; the names of what is loaded are mirrored into
//! [`super::Shared`] for `/health` and `/v1/models`.

use std::sync::Arc;
use std::time::Instant;

use crate::catalog::Pipeline;
use crate::pipeline::shared_weights::{Share, SharedWeights};
use crate::pipeline::{self, Family, LoadOptions, ModelFiles, WeightSource};

/// One loaded pipeline.
struct Loaded {
    name: String,
    model: Box<dyn Family>,
    last_used: Instant,
}

pub(crate) struct Pipelines {
    known: Vec<Pipeline>,
    opts: LoadOptions,
    /// Bytes of weights the device may hold at once (`u64::MAX`: no limit known).
    budget: u64,
    loaded: Vec<Loaded>,
    shared: Arc<SharedWeights>,
}

/// What a load did, for logs and metrics.
pub(crate) struct LoadReport {
    pub seconds: f64,
    pub bytes: u64,
    /// Bytes of `bytes` already on the device for other pipelines, reused.
    pub shared: u64,
    pub unloaded: Vec<String>,
}

impl Pipelines {
    pub fn new(known: Vec<Pipeline>, opts: LoadOptions, budget: u64) -> Self {
        Self {
            known,
            opts,
            budget,
            loaded: Vec::new(),
            shared: Arc::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&dyn Family> {
        self.loaded
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.model.as_ref())
    }

    /// Names of the loaded pipelines, most recently used first.
    pub fn loaded_names(&self) -> Vec<String> {
        let mut l: Vec<&Loaded> = self.loaded.iter().collect();
        l.sort_by_key(|l| std::cmp::Reverse(l.last_used));
        l.into_iter().map(|l| l.name.clone()).collect()
    }

    /// Mark a pipeline used now (LRU order).
    pub fn touch(&mut self, name: &str) {
        if let Some(l) = self.loaded.iter_mut().find(|l| l.name == name) {
            l.last_used = Instant::now();
        }
    }

    /// Bytes of weights the loaded pipelines hold on the device, shared tensors once.
    pub fn used_bytes(&self) -> u64 {
        let own: u64 = self
            .loaded
            .iter()
            .map(|l| {
                l.model
                    .weight_bytes()
                    .saturating_sub(self.shared.bytes_of(&l.name))
            })
            .sum();
        own + self.shared.total_bytes()
    }

    /// Unload the least recently used pipeline; its name, or `None` when none is loaded.
    fn unload_lru(&mut self) -> Option<String> {
        let lru = self
            .loaded
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.last_used)
            .map(|(i, _)| i)?;
        let gone = self.loaded.swap_remove(lru);
        self.shared.release(&gone.name);
        tracing::info!(pipeline = %gone.name, bytes = gone.model.weight_bytes(), "unloaded (least recently used) to make room");
        Some(gone.name)
    }

    /// Make `name` loaded, unloading the least recently used others while the budget needs
    /// room. `Ok(None)` when it already was. Nothing else may be running on the device.
    pub fn ensure(&mut self, name: &str) -> Result<Option<LoadReport>, String> {
        if self.get(name).is_some() {
            self.touch(name);
            return Ok(None);
        }
        let Some(p) = self.known.iter().find(|p| p.name == name).cloned() else {
            return Err(format!("pipeline '{name}' is not configured"));
        };
        let t = Instant::now();
        let source: WeightSource = p
            .weights
            .parse()
            .map_err(|e| format!("pipeline {name}: {e}"))?;
        let files = ModelFiles::open(&source).map_err(|e| format!("pipeline {name}: {e}"))?;
        let mut opts = self
            .opts
            .for_pipeline(&p.components, p.quantize.as_deref())
            .map_err(|e| format!("pipeline {name}: {e}"))?;
        opts.max_sequence_length = p.max_sequence_length;
        // Sharing needs every weights file's sha256 (hashed once per process unless the hub
        // cache names it): only worth it when another pipeline could share.
        opts.share = (self.known.len() > 1).then(|| Share {
            weights: self.shared.clone(),
            owner: name.to_string(),
        });
        let need = pipeline::registry::estimate_weight_bytes(&files, &opts)
            .map_err(|e| format!("pipeline {name}: {e}"))?;
        if need > self.budget {
            return Err(format!(
                "pipeline {name} needs {} of weights in {:?}, more than the memory budget of {}; \
                 what would fit: {}",
                gib(need),
                opts.dtype,
                gib(self.budget),
                pipeline::registry::what_fits(&files, &opts, self.budget)
            ));
        }
        // What the device already holds for others is not loaded again; an unload may
        // release some of it, so the need is counted again after each.
        let shared_bytes = |opts: &LoadOptions| {
            pipeline::registry::estimate_shared_bytes(&files, opts)
                .map_err(|e| format!("pipeline {name}: {e}"))
        };
        let mut unloaded = Vec::new();
        let mut shared = shared_bytes(&opts)?;
        while self.used_bytes() + need.saturating_sub(shared) > self.budget {
            match self.unload_lru() {
                Some(gone) => unloaded.push(gone),
                None => break,
            }
            shared = shared_bytes(&opts)?;
        }
        let model = match pipeline::registry::load(&files, p.family.as_deref(), &opts) {
            Ok(model) => model,
            Err(e) => {
                self.shared.release(name);
                return Err(format!("pipeline {name}: {e}"));
            }
        };
        let bytes = model.weight_bytes();
        self.loaded.push(Loaded {
            name: name.to_string(),
            model,
            last_used: Instant::now(),
        });
        Ok(Some(LoadReport {
            seconds: t.elapsed().as_secs_f64(),
            bytes,
            shared,
            unloaded,
        }))
    }
}

/// Bytes for people (`12.3 GiB`).
pub(crate) fn gib(bytes: u64) -> String {
    pipeline::registry::human_bytes(bytes)
}
