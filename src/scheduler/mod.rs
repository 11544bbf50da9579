//! The batching scheduler: one OS thread per device owns that device's loaded pipelines and runs
//! batched denoising loops; callers submit jobs through one bounded queue that every device
//! thread takes from, and get results on a oneshot reply.
//!
//! This module is the only way the layers above reach the device. It knows nothing of HTTP.

mod metrics;
mod pipelines;
pub mod progress;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;

pub use self::metrics::Metrics;
use self::pipelines::Pipelines;
pub use self::progress::{Progress, ProgressRx, ProgressTx, MAX_PREVIEWS};
pub use self::queue::{Batchable, Queue};
use self::worker::{Pending, Worker};
use crate::catalog::Pipeline;
use crate::image::RgbImage;
use crate::pipeline::{self, denoise, DeviceSpec, GenerateSpec, Guidance, RunOptions};

/// One generation job: what to generate ([`GenerateSpec`], the pipeline layer's own type:
/// `spec.seeds.len()` images of one prompt at one size) and which local pipeline runs it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Name of the local pipeline (e.g. `z-image-turbo`).
    pub pipeline: String,
    pub spec: GenerateSpec,
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
    rx: Option<oneshot::Receiver<Result<Vec<RgbImage>, JobError>>>,
    cancel: CancelFlag,
    finished: bool,
}

impl Ticket {
    pub(crate) fn new(
        rx: oneshot::Receiver<Result<Vec<RgbImage>, JobError>>,
        cancel: CancelFlag,
    ) -> Self {
        Self {
            rx: Some(rx),
            cancel,
            finished: false,
        }
    }

    /// Wait for the job's images.
    pub async fn wait(mut self) -> Result<Vec<RgbImage>, JobError> {
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

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The pipelines jobs may name; the first is loaded (and warmed up) at start, the others
    /// when a job first needs them.
    pub pipelines: Vec<Pipeline>,
    /// Device, dtype, text-encoder offload.
    pub run: RunOptions,
    /// One worker (device thread with its own pipelines) per entry; empty: `run.device` alone.
    /// Jobs share one queue: a worker with a compatible running batch takes them at its next
    /// step, an idle worker starts a batch with its fair share of what waits.
    pub devices: Vec<DeviceSpec>,
    /// Jobs waiting at most; a submit beyond this answers [`SubmitError::QueueFull`] at once.
    pub queue_capacity: usize,
    /// Images in one denoising batch at most (1 turns batching off).
    pub max_batch_images: usize,
    /// Run one small generation of the first pipeline before reporting ready.
    pub warmup: bool,
    /// Bytes of weights the device may hold at once; `None`: the device's memory less
    /// [`MEMORY_HEADROOM`] (no limit where the device does not say).
    pub memory_budget: Option<u64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            pipelines: Vec::new(),
            run: RunOptions::default(),
            devices: Vec::new(),
            queue_capacity: 64,
            max_batch_images: 8,
            warmup: true,
            memory_budget: None,
        }
    }
}

/// Memory kept free for activations, the runtime and allocator slack when the budget is the
/// device's own size.
pub const MEMORY_HEADROOM: u64 = 3 << 30;

/// Why the scheduler could not start (weights unreadable, device missing, warm-up failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// State shared by the handles and the device thread.
pub(crate) struct Shared {
    queue: Mutex<Queue<Pending>>,
    cv: Condvar,
    shutting_down: AtomicBool,
    /// Set by [`Scheduler::abort`]: running batches stop at the next step boundary.
    aborting: AtomicBool,
    metrics: Metrics,
    /// Per worker: names of its loaded pipelines, most recently used first (written by the
    /// worker's thread).
    loaded: Mutex<Vec<Vec<String>>>,
    /// Workers waiting for a job now (an idle worker starting a batch leaves the others a share).
    idle: AtomicUsize,
}

impl Shared {
    /// Publish what a worker's device holds, for `/health`, `/v1/models` and the metrics.
    fn set_loaded(&self, worker: usize, pipelines: &Pipelines) {
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = l.get_mut(worker) {
            *slot = pipelines.loaded_names();
        }
        self.metrics
            .set_worker_weight_bytes(worker, pipelines.used_bytes());
    }
}

/// The callers' side of the scheduler. Cheap to clone.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    pipelines: Arc<Vec<String>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
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

/// Start one device thread per device, load (and warm up) the first pipeline on each, and
/// return once all are ready. Blocking: call it from `spawn_blocking` in async code.
pub fn start(config: SchedulerConfig) -> Result<SchedulerHandle, StartError> {
    if config.pipelines.is_empty() {
        return Err(StartError("no pipeline to load".into()));
    }
    let devices = if config.devices.is_empty() {
        vec![config.run.device]
    } else {
        config.devices.clone()
    };
    let metrics = Metrics::default();
    metrics.set_workers(devices.iter().map(|d| d.to_string()).collect());
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::new(config.queue_capacity, MAX_HEAD_OVERTAKES)),
        cv: Condvar::new(),
        shutting_down: AtomicBool::new(false),
        aborting: AtomicBool::new(false),
        metrics,
        loaded: Mutex::new(vec![Vec::new(); devices.len()]),
        idle: AtomicUsize::new(0),
    });
    let names: Vec<String> = config.pipelines.iter().map(|p| p.name.clone()).collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    let mut spawn_error = None;
    for (index, &device) in devices.iter().enumerate() {
        let mut config = config.clone();
        config.run.device = device;
        let thread_shared = shared.clone();
        let ready_tx = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("diffusiond-device-{index}"))
            .spawn(move || match prepare(&config, &thread_shared, index) {
                Ok(pipelines) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker {
                        index,
                        pipelines,
                        shared: thread_shared,
                        max_batch_images: config.max_batch_images.max(1),
                    }
                    .run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("device {index} ({device}): {e}")));
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                spawn_error = Some(format!("cannot start a device thread: {e}"));
                break;
            }
        }
    }
    drop(ready_tx);
    let mut failure = spawn_error;
    for _ in 0..threads.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert_with(|| "a device thread died while loading".into());
                break;
            }
        }
    }
    let handle = SchedulerHandle {
        shared,
        pipelines: Arc::new(names),
        threads: Arc::new(Mutex::new(threads)),
    };
    match failure {
        None => Ok(handle),
        Some(e) => {
            handle.shutdown();
            Err(StartError(e))
        }
    }
}

/// On the device thread: open the device, settle the memory budget, load and warm up the
/// first pipeline.
fn prepare(config: &SchedulerConfig, shared: &Shared, worker: usize) -> Result<Pipelines, String> {
    let opts = config.run.open().map_err(|e| e.to_string())?;
    let budget = config.memory_budget.unwrap_or_else(|| {
        pipeline::device::total_memory(&opts.device)
            .map_or(u64::MAX, |m| m.saturating_sub(MEMORY_HEADROOM))
    });
    tracing::info!(
        worker,
        device = %pipeline::device::describe(&opts.device),
        dtype = ?opts.dtype,
        memory_budget = %pipelines::gib(budget),
        "device ready"
    );
    let mut pipelines = Pipelines::new(config.pipelines.clone(), opts, budget);
    let first = &config.pipelines[0];
    if let Some(r) = pipelines.ensure(&first.name)? {
        tracing::info!(pipeline = %first.name, source = %first.weights, seconds = r.seconds, bytes = r.bytes, shared_bytes = r.shared, "pipeline loaded");
    }
    shared.set_loaded(worker, &pipelines);
    if config.warmup {
        let t = Instant::now();
        if let Some(model) = pipelines.get(&first.name) {
            let m = model.info().size_multiple;
            let spec = GenerateSpec {
                prompt: "warm-up".into(),
                negative_prompt: String::new(),
                width: 4 * m,
                height: 4 * m,
                seeds: vec![0],
                steps: 2,
                guidance: Guidance::none(),
            };
            denoise::generate(model, &spec, |_, _| {})
                .map_err(|e| format!("pipeline {}: warm-up failed: {e}", first.name))?;
        }
        tracing::info!(pipeline = %first.name, seconds = t.elapsed().as_secs_f64(), "warm-up done");
    }
    Ok(pipelines)
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

    /// Whether every device thread is still running (false once one stopped or died).
    pub fn is_running(&self) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        !threads.is_empty() && threads.iter().all(|t| !t.is_finished())
    }

    /// Names of the pipelines jobs may name.
    pub fn known_pipelines(&self) -> Vec<String> {
        self.pipelines.as_ref().clone()
    }

    /// Names of the pipelines loaded on some device now, most recently used first (per device,
    /// the first device's first).
    pub fn loaded_pipelines(&self) -> Vec<String> {
        let per_worker = self
            .shared
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out: Vec<String> = Vec::new();
        for name in per_worker.into_iter().flatten() {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// Scheduler metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Like [`Scheduler::shutdown`], but the running batches stop at their next step boundary
    /// and their jobs are answered with [`JobError::ShuttingDown`] at once (so their requests are
    /// refunded now instead of finishing past the shutdown deadline). Blocking.
    pub fn abort(&self) {
        self.shared.aborting.store(true, Ordering::SeqCst);
        self.shutdown();
    }

    /// Stop accepting jobs, answer waiting ones with [`JobError::ShuttingDown`], let the running
    /// batches finish, and join the device threads. Blocking.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}
