//! The batching scheduler: one OS thread per device owns the loaded pipelines and runs batched
//! denoising loops; callers submit jobs through a bounded queue and get results on a oneshot reply.
//!
//! This module is the only way the layers above reach the device. It knows nothing of HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

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
        }
    }
}

/// Why the scheduler could not start (weights unreadable, device missing, warm-up failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);
