//! The pipelines of one device: loaded when a job first needs them, and unloaded least
//! recently used first when loading the next would exceed the device's memory budget. Only
//! the device thread touches this; the names of what is loaded are mirrored into
//! [`super::Shared`] for `/health` and `/v1/models`.

use std::time::Instant;

use crate::catalog::Pipeline;
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
}

/// What a load did, for logs and metrics.
pub(crate) struct LoadReport {
    pub seconds: f64,
    pub bytes: u64,
    pub unloaded: Vec<String>,
}

impl Pipelines {
    pub fn new(known: Vec<Pipeline>, opts: LoadOptions, budget: u64) -> Self {
        Self {
            known,
            opts,
            budget,
            loaded: Vec::new(),
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

    fn used_bytes(&self) -> u64 {
        self.loaded.iter().map(|l| l.model.weight_bytes()).sum()
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
        let mut unloaded = Vec::new();
        while self.used_bytes() + need > self.budget && !self.loaded.is_empty() {
            let lru = self
                .loaded
                .iter()
                .enumerate()
                .min_by_key(|(_, l)| l.last_used)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let gone = self.loaded.swap_remove(lru);
            tracing::info!(pipeline = %gone.name, bytes = gone.model.weight_bytes(), "unloaded (least recently used) to make room");
            unloaded.push(gone.name);
        }
        let model = pipeline::registry::load(&files, p.family.as_deref(), &opts)
            .map_err(|e| format!("pipeline {name}: {e}"))?;
        let bytes = model.weight_bytes();
        self.loaded.push(Loaded {
            name: name.to_string(),
            model,
            last_used: Instant::now(),
        });
        Ok(Some(LoadReport {
            seconds: t.elapsed().as_secs_f64(),
            bytes,
            unloaded,
        }))
    }
}

/// Bytes for people (`12.3 GiB`).
pub(crate) fn gib(bytes: u64) -> String {
    pipeline::registry::human_bytes(bytes)
}
