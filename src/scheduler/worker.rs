//! A device thread (one per `--device` entry): owns its device's loaded pipelines and runs
//! continuous batched denoising on jobs taken from the shared queue.
//!
//! Each turn of the loop: admit waiting jobs (a new batch, or compatible joiners into the running
//! one), drop cancelled jobs, run one batched step in which every item has its own timestep,
//! then decode and answer the jobs whose items are all done. Failures and panics of one turn
//! fail only the jobs of that batch; the thread goes on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::pipelines::Pipelines;
use super::progress::{Progress, ProgressTx};
use super::queue::{fair_share, Batchable};
use super::{CancelFlag, Job, JobError, Shared};
use crate::pipeline::denoise::{self, DenoiseItem};
use crate::pipeline::{Family, RgbImage};

/// A job waiting in the queue.
pub(crate) struct Pending {
    pub job: Job,
    pub reply: oneshot::Sender<Result<Vec<RgbImage>, JobError>>,
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
    width: usize,
    height: usize,
    cfg: bool,
}

impl Batchable for Pending {
    type Key = BatchKey;
    fn batch_key(&self) -> BatchKey {
        BatchKey {
            pipeline: self.job.pipeline.clone(),
            width: self.job.spec.width,
            height: self.job.spec.height,
            cfg: self.job.spec.guidance.scale > 0.0,
        }
    }
    fn images(&self) -> usize {
        self.job.spec.seeds.len()
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
    /// Position in `--device`; labels metrics and logs.
    pub index: usize,
    pub pipelines: Pipelines,
    pub shared: Arc<Shared>,
    pub max_batch_images: usize,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl Worker {
    pub fn run(mut self) {
        let mut batch: Vec<Active> = Vec::new();
        let mut key: Option<BatchKey> = None;
        let mut running_images = 0u64;
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
            self.drop_if_aborting(&mut batch);
            if batch.is_empty() {
                key = None;
                continue;
            }
            self.step(&mut batch);
            self.finish(&mut batch);
            if batch.is_empty() {
                key = None;
            }
            // Several workers add up in one gauge: each moves it by its own change.
            let images = batch.iter().map(|a| a.items.len()).sum::<usize>() as u64;
            let m = &self.shared.metrics.running_images;
            if images >= running_images {
                m.fetch_add(images - running_images, Ordering::Relaxed);
            } else {
                m.fetch_sub(running_images - images, Ordering::Relaxed);
            }
            running_images = images;
        }
        self.shared
            .metrics
            .running_images
            .fetch_sub(running_images, Ordering::Relaxed);
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
                shared.idle.fetch_add(1, Ordering::SeqCst);
                q = shared.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                shared.idle.fetch_sub(1, Ordering::SeqCst);
            }
            if shared.shutting_down.load(Ordering::SeqCst) {
                drop(q);
                return self.next_jobs(batch, key);
            }
            // Leave the other idle workers their share, so that concurrent jobs start on
            // several devices at once instead of queueing in one device's batch.
            let idle = shared.idle.load(Ordering::SeqCst);
            let budget = fair_share(q.images(), idle + 1, self.max_batch_images);
            let jobs = q.start_batch(budget);
            if !q.is_empty() && idle > 0 {
                shared.cv.notify_one();
            }
            jobs
        } else if shared.idle.load(Ordering::SeqCst) > 0 {
            // Another worker is idle: it starts a waiting job now, sooner than this batch's
            // next step would (and without slowing this batch down).
            Vec::new()
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
        // A new batch may need another pipeline: load it now (the device is idle), unloading
        // least recently used ones to stay within the memory budget. The job waits in the
        // meantime; its queue wait includes the load.
        let name = p.job.pipeline.clone();
        let loaded = {
            let _span =
                tracing::info_span!(parent: &p.span, "load_pipeline", pipeline = %name).entered();
            catch_unwind(AssertUnwindSafe(|| self.pipelines.ensure(&name)))
        };
        match loaded {
            Ok(Ok(Some(r))) => {
                tracing::info!(parent: &p.span, pipeline = %name, seconds = r.seconds, bytes = r.bytes, shared_bytes = r.shared, unloaded = ?r.unloaded, "pipeline loaded for a queued request");
                self.shared
                    .metrics
                    .pipeline_loads
                    .fetch_add(1, Ordering::Relaxed);
                self.shared.metrics.pipeline_load_seconds.observe(r.seconds);
                self.shared.set_loaded(self.index, &self.pipelines);
            }
            Ok(Ok(None)) => {}
            Ok(Err(why)) => {
                self.fail(p, why);
                return None;
            }
            Err(panic) => {
                self.fail(p, panic_message(panic));
                return None;
            }
        }
        let Some(model) = self.pipelines.get(&name) else {
            self.fail(p, format!("pipeline '{name}' is not loaded"));
            return None;
        };
        let spec = p.job.spec.clone();
        let span = tracing::info_span!(parent: &p.span, "text_encode");
        let made = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                let cond = denoise::condition(model, &spec)?;
                denoise::items(model, &spec, &cond)
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

    /// At a step boundary after [`super::Scheduler::abort`]: answer every running job now.
    fn drop_if_aborting(&self, batch: &mut Vec<Active>) {
        if batch.is_empty() || !self.shared.aborting.load(Ordering::SeqCst) {
            return;
        }
        for a in batch.drain(..) {
            tracing::warn!(parent: &a.pending.span, "stopped by the shutdown deadline: refunded");
            let _ = a.pending.reply.send(Err(JobError::ShuttingDown));
        }
    }

    /// One batched step over every item of every job; a failure fails the whole batch.
    fn step(&mut self, batch: &mut Vec<Active>) {
        let Some(name) = batch.first().map(|a| a.pending.job.pipeline.clone()) else {
            return;
        };
        let Some(model) = self.pipelines.get(&name) else {
            let why = format!("pipeline '{name}' is no longer loaded");
            for a in batch.drain(..) {
                self.fail(a.pending, why.clone());
            }
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
                self.report_steps(model, batch);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic_message(panic),
        };
        for a in batch.drain(..) {
            self.fail(a.pending, why.clone());
        }
    }

    /// Tell the jobs that want progress how far they are, and send the previews that are due.
    /// Only a job that asked for previews has any decoded, so the rest of the batch pays for
    /// those decodes (time on this thread) and nothing else; a preview never touches an item's
    /// state, so it never changes an image.
    fn report_steps(&self, model: &dyn Family, batch: &[Active]) {
        for a in batch {
            let (Some(tx), Some(first)) = (&a.pending.progress, a.items.first()) else {
                continue;
            };
            let (done, total) = (first.steps_done(), first.steps_total());
            tx.send(Progress::Step { done, total });
            if tx.preview_due(done, total) && !a.pending.cancel.is_cancelled() {
                self.send_previews(model, a, tx, done, total);
            }
        }
    }

    /// Decode each item's current estimate of the clean image and send it. A failed preview is
    /// logged and skipped: the job goes on.
    fn send_previews(
        &self,
        model: &dyn Family,
        a: &Active,
        tx: &ProgressTx,
        step: usize,
        total: usize,
    ) {
        let started = Instant::now();
        let span = tracing::debug_span!(parent: &a.pending.span, "preview", step);
        let _entered = span.enter();
        for (index, item) in a.items.iter().enumerate() {
            match catch_unwind(AssertUnwindSafe(|| denoise::preview(model, item))) {
                Ok(Ok(Some(image))) => tx.send(Progress::Preview {
                    index,
                    step,
                    total,
                    image,
                }),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(parent: &a.pending.span, error = %e, "preview failed; the job goes on")
                }
                Err(panic) => {
                    tracing::warn!(parent: &a.pending.span, error = %panic_message(panic), "preview failed; the job goes on")
                }
            }
        }
        self.shared
            .metrics
            .preview_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Decode the jobs whose items are all done, in one VAE batch, and answer them.
    fn finish(&mut self, batch: &mut Vec<Active>) {
        let (done, rest): (Vec<Active>, Vec<Active>) = batch.drain(..).partition(|a| a.done());
        *batch = rest;
        if done.is_empty() {
            return;
        }
        let name = done[0].pending.job.pipeline.clone();
        let Some(model) = self.pipelines.get(&name) else {
            let why = format!("pipeline '{name}' is no longer loaded");
            done.into_iter()
                .for_each(|a| self.fail(a.pending, why.clone()));
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
            self.shared
                .metrics
                .add_worker_images(self.index, mine.len() as u64);
            tracing::info!(parent: &a.pending.span, worker = self.index, seconds = latency, images = mine.len(), "generated");
            let _ = a.pending.reply.send(Ok(mine));
        }
    }
}
