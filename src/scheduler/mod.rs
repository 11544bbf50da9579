//! The batching scheduler: one OS thread per device owns the loaded pipelines and runs batched
//! denoising loops; callers submit jobs through a bounded queue and get results on a oneshot reply.
//!
//! This module is the only way the layers above reach the device. It knows nothing of HTTP.

mod metrics;
pub mod progress;
mod queue;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

pub use self::metrics::Metrics;
pub use self::progress::{Progress, ProgressRx, ProgressTx, MAX_PREVIEWS};
pub use self::queue::{Batchable, Queue};
use self::worker::{Pending, Worker};
use crate::pipeline::{self, GenerateSpec, Guidance};

/// One generation job: `seeds.len()` images of one prompt at one size.
#[derive(Debug, Clone)]
pub struct Job {
    /// Name of the local pipeline (e.g. `z-image-turbo`).
    pub pipeline: String,
    pub prompt: String,
    /// Used only when `guidance_scale > 0`.
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    /// One seed per image; the number of images is `seeds.len()`.
    pub seeds: Vec<u64>,
    /// Model evaluations (denoising steps).
    pub steps: u32,
    pub guidance_scale: f32,
}

/// An 8-bit RGB image, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Why a submitted job produced no images.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("the request was cancelled")]
    Cancelled,
    #[error("generation failed: {0}")]
    Failed(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why a job was not accepted into the queue.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("the generation queue is full")]
    QueueFull,
    #[error("pipeline '{0}' is not loaded")]
    UnknownPipeline(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Shared cancellation flag of one job; set when the caller goes away.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The caller's side of a submitted job. Await [`Ticket::wait`]; dropping the ticket before the
/// result arrives cancels the job at the next step boundary.
#[derive(Debug)]
pub struct Ticket {
    rx: Option<oneshot::Receiver<Result<Vec<Image>, JobError>>>,
    cancel: CancelFlag,
    finished: bool,
}

impl Ticket {
    pub(crate) fn new(
        rx: oneshot::Receiver<Result<Vec<Image>, JobError>>,
        cancel: CancelFlag,
    ) -> Self {
        Self {
            rx: Some(rx),
            cancel,
            finished: false,
        }
    }

    /// Wait for the job's images.
    pub async fn wait(mut self) -> Result<Vec<Image>, JobError> {
        let rx = match self.rx.take() {
            Some(rx) => rx,
            None => return Err(JobError::Cancelled),
        };
        let result = rx.await.unwrap_or(Err(JobError::ShuttingDown));
        // The job is finished: nothing left to cancel.
        self.finished = true;
        result
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
    }
}

/// One local pipeline to load on the device thread.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Name used in [`Job::pipeline`] (e.g. `z-image-turbo`).
    pub name: String,
    /// Weights source: a local directory in the published layout, or `hf:ORG/REPO[@REVISION]`.
    pub source: String,
}

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub pipelines: Vec<PipelineConfig>,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// `f32`, `bf16`, `f16`; `None` picks f32 on CPU and bf16 on a GPU.
    pub dtype: Option<String>,
    /// Jobs waiting at most; a submit beyond this answers [`SubmitError::QueueFull`] at once.
    pub queue_capacity: usize,
    /// Images in one denoising batch at most (1 turns batching off).
    pub max_batch_images: usize,
    /// Run one small generation per pipeline before reporting ready.
    pub warmup: bool,
    /// Keep text encoders in host memory and run them on the CPU (saves device memory).
    pub offload_text_encoder: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            pipelines: Vec::new(),
            device: "cpu".into(),
            dtype: None,
            queue_capacity: 64,
            max_batch_images: 8,
            warmup: true,
            offload_text_encoder: false,
        }
    }
}

/// Why the scheduler could not start (weights unreadable, device missing, warm-up failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// State shared by the handles and the device thread.
pub(crate) struct Shared {
    queue: Mutex<Queue<Pending>>,
    cv: Condvar,
    shutting_down: AtomicBool,
    metrics: Metrics,
}

/// The callers' side of the scheduler. Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    pipelines: Arc<Vec<String>>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for SchedulerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerHandle")
            .field("pipelines", &self.pipelines)
            .finish()
    }
}

/// How many admissions may overtake an incompatible job at the head of the queue.
const MAX_HEAD_OVERTAKES: usize = 8;

/// Load every pipeline on a new device thread, warm each up, and return once ready.
/// Blocking: call it from `spawn_blocking` in async code.
pub fn start(config: SchedulerConfig) -> Result<SchedulerHandle, StartError> {
    if config.pipelines.is_empty() {
        return Err(StartError("no pipeline to load".into()));
    }
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::new(config.queue_capacity, MAX_HEAD_OVERTAKES)),
        cv: Condvar::new(),
        shutting_down: AtomicBool::new(false),
        metrics: Metrics::default(),
    });
    let names: Vec<String> = config.pipelines.iter().map(|p| p.name.clone()).collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("diffusiond-device".into())
        .spawn(move || {
            let loaded = load_all(&config);
            match loaded {
                Ok(pipelines) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker {
                        pipelines,
                        shared: thread_shared,
                        max_batch_images: config.max_batch_images.max(1),
                    }
                    .run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| StartError(format!("cannot start the device thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(SchedulerHandle {
            shared,
            pipelines: Arc::new(names),
            thread: Arc::new(Mutex::new(Some(thread))),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(StartError(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(StartError("the device thread died while loading".into()))
        }
    }
}

/// Load (and warm up) every configured pipeline on the device thread.
fn load_all(config: &SchedulerConfig) -> Result<HashMap<String, pipeline::ZImage>, String> {
    let mut out = HashMap::new();
    for p in &config.pipelines {
        let t = Instant::now();
        let opts = pipeline::RunOptions {
            device: config.device.clone(),
            dtype: config.dtype.clone(),
            offload_text_encoder: config.offload_text_encoder,
        };
        let model = pipeline::load_z_image_with(&p.source, &opts)
            .map_err(|e| format!("pipeline {}: {e}", p.name))?;
        tracing::info!(pipeline = %p.name, source = %p.source, seconds = t.elapsed().as_secs_f64(), "pipeline loaded");
        if config.warmup {
            let t = Instant::now();
            let m = model.size_multiple();
            let spec = GenerateSpec {
                prompt: "warm-up".into(),
                negative_prompt: String::new(),
                width: 4 * m,
                height: 4 * m,
                seeds: vec![0],
                steps: 2,
                guidance: Guidance::none(),
            };
            model
                .generate(&spec, |_, _| {})
                .map_err(|e| format!("pipeline {}: warm-up failed: {e}", p.name))?;
            tracing::info!(pipeline = %p.name, seconds = t.elapsed().as_secs_f64(), "warm-up done");
        }
        out.insert(p.name.clone(), model);
    }
    Ok(out)
}

impl SchedulerHandle {
    /// Queue a job. Never blocks: a full queue answers [`SubmitError::QueueFull`] at once.
    /// The current tracing span becomes the parent of the job's spans on the device thread.
    pub fn submit(&self, job: Job) -> Result<Ticket, SubmitError> {
        self.submit_with_progress(job, None)
    }

    /// [`Self::submit`], with live progress (queue position, start, steps, previews) sent to
    /// `progress`.
    pub fn submit_with_progress(
        &self,
        job: Job,
        progress: Option<ProgressTx>,
    ) -> Result<Ticket, SubmitError> {
        if self.shared.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if !self.pipelines.contains(&job.pipeline) {
            return Err(SubmitError::UnknownPipeline(job.pipeline));
        }
        let (tx, rx) = oneshot::channel();
        let cancel = CancelFlag::default();
        let queued = progress.clone();
        let pending = Pending {
            job,
            reply: tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
            span: tracing::Span::current(),
            progress,
        };
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.push(pending).is_err() {
            self.shared
                .metrics
                .jobs_rejected_busy
                .fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull);
        }
        let position = q.len();
        // Sent under the lock, so that it comes before the worker's `Started`.
        if let Some(p) = &queued {
            p.send(Progress::Queued { position });
        }
        self.shared
            .metrics
            .queue_depth
            .store(position as u64, Ordering::Relaxed);
        drop(q);
        self.shared.cv.notify_one();
        Ok(Ticket::new(rx, cancel))
    }

    /// Jobs waiting (not yet admitted to a batch).
    pub fn queue_depth(&self) -> usize {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Names of the loaded pipelines.
    pub fn loaded_pipelines(&self) -> Vec<String> {
        self.pipelines.as_ref().clone()
    }

    /// Scheduler metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Stop accepting jobs, answer waiting ones with [`JobError::ShuttingDown`], let the running
    /// batch finish, and join the device thread. Blocking.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}
