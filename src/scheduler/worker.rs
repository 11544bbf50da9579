//! The device thread: owns the loaded pipelines and runs continuous batched denoising.
//!
//! Each turn of the loop: admit waiting jobs (a new batch, or compatible joiners into the running
//! one), drop cancelled jobs, run one batched step in which every item has its own timestep,
//! then decode and answer the jobs whose items are all done. Failures and panics of one turn
//! fail only the jobs of that batch; the thread goes on.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::progress::{Progress, ProgressTx};
use super::queue::Batchable;
use super::{CancelFlag, Image, Job, JobError, Shared};
use crate::pipeline::denoise::{self, DenoiseItem, GenerateSpec};
use crate::pipeline::{Guidance, RgbImage, ZImage};

/// A job waiting in the queue.
pub(crate) struct Pending {
    pub job: Job,
    pub reply: oneshot::Sender<Result<Vec<Image>, JobError>>,
    pub cancel: CancelFlag,
    pub submitted: Instant,
    pub span: tracing::Span,
    /// Where live progress goes (SSE requests); `None` for plain requests.
    pub progress: Option<ProgressTx>,
}

/// Jobs batch together when they share pipeline, size and CFG on/off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BatchKey {
    pipeline: String,
    width: u32,
    height: u32,
    cfg: bool,
}

impl Batchable for Pending {
    type Key = BatchKey;
    fn batch_key(&self) -> BatchKey {
        BatchKey {
            pipeline: self.job.pipeline.clone(),
            width: self.job.width,
            height: self.job.height,
            cfg: self.job.guidance_scale > 0.0,
        }
    }
    fn images(&self) -> usize {
        self.job.seeds.len()
    }
}

/// A job in the running batch.
struct Active {
    pending: Pending,
    items: Vec<DenoiseItem>,
}

impl Active {
    fn done(&self) -> bool {
        self.items.iter().all(|i| i.is_done())
    }
}

pub(crate) struct Worker {
    pub pipelines: HashMap<String, ZImage>,
    pub shared: Arc<Shared>,
    pub max_batch_images: usize,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn to_images(v: Vec<RgbImage>) -> Vec<Image> {
    v.into_iter()
        .map(|i| Image {
            width: i.width,
            height: i.height,
            rgb: i.data,
        })
        .collect()
}

impl Worker {
    pub fn run(mut self) {
        let mut batch: Vec<Active> = Vec::new();
        let mut key: Option<BatchKey> = None;
        loop {
            let admitted = match self.next_jobs(&batch, key.as_ref()) {
                Some(jobs) => jobs,
                None => break,
            };
            for p in admitted {
                if key.is_none() {
                    key = Some(p.batch_key());
                }
                if let Some(a) = self.admit(p) {
                    batch.push(a);
                }
            }
            self.drop_cancelled(&mut batch);
            if batch.is_empty() {
                key = None;
                continue;
            }
            self.step(&mut batch);
            self.finish(&mut batch);
            if batch.is_empty() {
                key = None;
            }
            let images: usize = batch.iter().map(|a| a.items.len()).sum();
            self.shared
                .metrics
                .running_images
                .store(images as u64, Ordering::Relaxed);
        }
        // Shutdown: the running batch has drained; answer anything left.
        for a in batch {
            let _ = a.pending.reply.send(Err(JobError::ShuttingDown));
        }
    }

    /// Block for a new batch when idle; otherwise take joiners without blocking. `None` when
    /// the scheduler shuts down and nothing is running.
    fn next_jobs(&self, batch: &[Active], key: Option<&BatchKey>) -> Option<Vec<Pending>> {
        let shared = &self.shared;
        let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        for p in q.drain_where(|p| p.cancel.is_cancelled()) {
            shared
                .metrics
                .jobs_cancelled
                .fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(JobError::Cancelled));
        }
        if shared.shutting_down.load(Ordering::SeqCst) {
            for p in q.drain_all() {
                let _ = p.reply.send(Err(JobError::ShuttingDown));
            }
            shared.metrics.queue_depth.store(0, Ordering::Relaxed);
            return if batch.is_empty() {
                None
            } else {
                Some(Vec::new())
            };
        }
        let jobs = if batch.is_empty() {
            while q.is_empty() && !shared.shutting_down.load(Ordering::SeqCst) {
                q = shared.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if shared.shutting_down.load(Ordering::SeqCst) {
                drop(q);
                return self.next_jobs(batch, key);
            }
            q.start_batch(self.max_batch_images)
        } else if let Some(key) = key {
            let running: usize = batch.iter().map(|a| a.items.len()).sum();
            q.join_running(key, self.max_batch_images.saturating_sub(running))
        } else {
            Vec::new()
        };
        shared
            .metrics
            .queue_depth
            .store(q.len() as u64, Ordering::Relaxed);
        Some(jobs)
    }

    /// Encode a job's prompt and make its items; a failure answers the job at once.
    fn admit(&mut self, p: Pending) -> Option<Active> {
        if p.cancel.is_cancelled() {
            self.shared
                .metrics
                .jobs_cancelled
                .fetch_add(1, Ordering::Relaxed);
            let _ = p.reply.send(Err(JobError::Cancelled));
            return None;
        }
        let wait = p.submitted.elapsed();
        self.shared.metrics.queue_wait.observe(wait.as_secs_f64());
        tracing::debug!(parent: &p.span, queue_wait_ms = wait.as_millis() as u64, "admitted to a batch");
        let Some(model) = self.pipelines.get(&p.job.pipeline) else {
            let _ = p.reply.send(Err(JobError::Failed(format!(
                "pipeline '{}' is not loaded",
                p.job.pipeline
            ))));
            return None;
        };
        let spec = GenerateSpec {
            prompt: p.job.prompt.clone(),
            negative_prompt: p.job.negative_prompt.clone(),
            width: p.job.width as usize,
            height: p.job.height as usize,
            seeds: p.job.seeds.clone(),
            steps: p.job.steps as usize,
            guidance: Guidance {
                scale: p.job.guidance_scale,
                ..Guidance::none()
            },
        };
        let span = tracing::info_span!(parent: &p.span, "text_encode");
        let made = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let cond = model.condition(&spec)?;
                model.items(&spec, &cond)
            }))
        });
        match made {
            Ok(Ok(items)) => {
                if let Some(tx) = &p.progress {
                    tx.send(Progress::Started);
                }
                Some(Active { pending: p, items })
            }
            Ok(Err(e)) => {
                self.fail(p, e.to_string());
                None
            }
            Err(panic) => {
                self.fail(p, panic_message(panic));
                None
            }
        }
    }

    fn fail(&self, p: Pending, why: String) {
        tracing::error!(parent: &p.span, error = %why, "generation failed");
        self.shared
            .metrics
            .jobs_failed
            .fetch_add(1, Ordering::Relaxed);
        let _ = p.reply.send(Err(JobError::Failed(why)));
    }

    fn drop_cancelled(&self, batch: &mut Vec<Active>) {
        let mut i = 0;
        while i < batch.len() {
            if batch[i].pending.cancel.is_cancelled() {
                let a = batch.swap_remove(i);
                tracing::info!(parent: &a.pending.span, "cancelled: client went away");
                self.shared
                    .metrics
                    .jobs_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                let _ = a.pending.reply.send(Err(JobError::Cancelled));
            } else {
                i += 1;
            }
        }
    }

    /// One batched step over every item of every job; a failure fails the whole batch.
    fn step(&mut self, batch: &mut Vec<Active>) {
        let Some(model) = batch
            .first()
            .and_then(|a| self.pipelines.get(&a.pending.job.pipeline))
        else {
            return;
        };
        let started = Instant::now();
        let n: usize = batch.iter().map(|a| a.items.len()).sum();
        let span = tracing::debug_span!("denoise_step", images = n);
        let result = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let mut refs: Vec<&mut DenoiseItem> =
                    batch.iter_mut().flat_map(|a| a.items.iter_mut()).collect();
                denoise::step(model, &mut refs)
            }))
        });
        self.shared.metrics.batch_size.observe(n as f64);
        self.shared
            .metrics
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
        let why = match result {
            Ok(Ok(())) => {
                self.report_steps(batch);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic_message(panic),
        };
        for a in batch.drain(..) {
            self.fail(a.pending, why.clone());
        }
    }

    /// Tell the jobs that want progress how far they are.
    fn report_steps(&self, batch: &[Active]) {
        for a in batch {
            let (Some(tx), Some(first)) = (&a.pending.progress, a.items.first()) else {
                continue;
            };
            tx.send(Progress::Step {
                done: first.steps_done(),
                total: first.steps_total(),
            });
        }
    }

    /// Decode the jobs whose items are all done, in one VAE batch, and answer them.
    fn finish(&mut self, batch: &mut Vec<Active>) {
        let (done, rest): (Vec<Active>, Vec<Active>) = batch.drain(..).partition(|a| a.done());
        *batch = rest;
        if done.is_empty() {
            return;
        }
        let Some(model) = self.pipelines.get(&done[0].pending.job.pipeline) else {
            return;
        };
        let span = tracing::debug_span!("decode", jobs = done.len());
        let decoded = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let refs: Vec<&DenoiseItem> = done.iter().flat_map(|a| a.items.iter()).collect();
                denoise::decode(model, &refs)
            }))
        });
        let images = match decoded {
            Ok(Ok(images)) => images,
            Ok(Err(e)) => {
                let why = e.to_string();
                done.into_iter()
                    .for_each(|a| self.fail(a.pending, why.clone()));
                return;
            }
            Err(panic) => {
                let why = panic_message(panic);
                done.into_iter()
                    .for_each(|a| self.fail(a.pending, why.clone()));
                return;
            }
        };
        let mut images = images.into_iter();
        for a in done {
            let mine: Vec<RgbImage> = images.by_ref().take(a.items.len()).collect();
            let latency = a.pending.submitted.elapsed().as_secs_f64();
            for _ in &mine {
                self.shared.metrics.image_latency.observe(latency);
            }
            self.shared
                .metrics
                .images_generated
                .fetch_add(mine.len() as u64, Ordering::Relaxed);
            tracing::info!(parent: &a.pending.span, seconds = latency, images = mine.len(), "generated");
            let _ = a.pending.reply.send(Ok(to_images(mine)));
        }
    }
}
