//! The generation facade: authenticate -> validate -> reserve credits -> submit -> await ->
//! store -> settle, refunding on any failure. Knows nothing of HTTP.

mod error;
mod idempotency;
mod metrics;
mod refund;
mod validate;

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::accounts::{Account, Accounts};
use crate::catalog::Catalog;
use crate::scheduler::{Job, JobError, ProgressTx, SubmitError, Ticket};
use crate::store::{ImageStore, Provenance, StoredFile};

pub use crate::store::RequestId;
pub use error::{InferError, ValidationError};
pub use idempotency::Idempotent;
pub use metrics::Metrics;
pub use validate::{guidance_doubles_work, validate, RawRequest, ValidRequest};

use refund::{Outstanding, RefundOnDrop};

/// Seconds a client is told to wait after `server_busy`.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// What the device worker is doing, for `GET /health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Taking jobs.
    Ready,
    /// Shut down, or its thread died: no job will run.
    Stopped,
}

/// What runs jobs on the device: the scheduler, or a fake in tests.
pub trait Generator: Send + Sync {
    /// The device worker's state.
    fn worker_state(&self) -> WorkerState;
    /// Queue a job, with live progress sent to `progress`; never blocks (a full queue answers
    /// [`SubmitError::QueueFull`] at once).
    fn submit(&self, job: Job, progress: Option<ProgressTx>) -> Result<Ticket, SubmitError>;
    /// Names of the pipelines whose weights are loaded.
    fn loaded_pipelines(&self) -> Vec<String>;
    /// Prometheus text lines of the generator's own metrics.
    fn metrics_text(&self) -> String;
}

/// Who may generate.
#[derive(Debug, Clone)]
pub enum AuthPolicy {
    /// No key needed; a key sent is ignored.
    Open,
    /// A valid key from this accounts database is needed.
    Keys(Accounts),
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub enum Caller {
    Anonymous,
    Key(Account),
}

/// One stored image of a successful request.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// File name inside the request's folder (`image_<i>.<ext>`).
    pub file_name: String,
    /// The image's URL when it is not this server's /files/ one (a presigned bucket URL).
    pub url: Option<String>,
    pub seed: u64,
}

/// A successful request's result.
#[derive(Debug, Clone)]
pub struct Generated {
    pub request_id: RequestId,
    pub images: Vec<GeneratedImage>,
    pub credits_used: i64,
    pub width: u32,
    pub height: u32,
}

pub struct Facade {
    catalog: Catalog,
    auth: AuthPolicy,
    store: ImageStore,
    generator: Arc<dyn Generator>,
    metrics: Arc<Metrics>,
    outstanding: Outstanding,
    /// Requests admitted at once (waiting or running). Taken before any credit is reserved.
    admission: Arc<Semaphore>,
    /// Write generation parameters into image files.
    metadata: bool,
    /// The accounts database in every auth mode, for `Idempotency-Key` (none: the header is
    /// refused as an internal error, which only a test setup can cause).
    ledger: Option<Accounts>,
}

impl Facade {
    pub fn new(
        catalog: Catalog,
        auth: AuthPolicy,
        store: impl Into<ImageStore>,
        generator: Arc<dyn Generator>,
    ) -> Self {
        Self {
            catalog,
            auth,
            store: store.into(),
            generator,
            metrics: Arc::default(),
            outstanding: Outstanding::default(),
            admission: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            metadata: true,
            ledger: None,
        }
    }

    /// Store images without generation parameters in them (`--no-metadata`).
    pub fn without_metadata(mut self) -> Self {
        self.metadata = false;
        self
    }

    /// Remember `Idempotency-Key`s in this database (in every auth mode).
    pub fn with_idempotency(mut self, accounts: Accounts) -> Self {
        self.ledger = Some(accounts);
        self
    }

    /// Resolves once every credit reservation is settled or refunded, including the refunds of
    /// requests whose futures were dropped (the server waits on it at shutdown).
    pub async fn reservations_resolved(&self) {
        self.outstanding.all_resolved().await;
    }

    /// Admit at most `limit` requests at once (set it to the scheduler's queue capacity: then
    /// an admitted request always finds room in the queue). A request beyond it is answered 503
    /// `server_busy` before it reserves anything, so a burst never makes the key's other
    /// requests see credits or quota held by requests that are then refused.
    pub fn with_admission_limit(mut self, limit: usize) -> Self {
        self.admission = Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS)));
        self
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn loaded_pipelines(&self) -> Vec<String> {
        self.generator.loaded_pipelines()
    }

    /// `Ok` while every store requests depend on takes writes; else why not (`/health` answers
    /// 503 with it). Only keys mode writes to the accounts database.
    pub async fn check_writable(&self) -> Result<(), String> {
        match &self.auth {
            AuthPolicy::Keys(accounts) => accounts.check_writable().await,
            AuthPolicy::Open => Ok(()),
        }
    }

    pub fn worker_state(&self) -> WorkerState {
        self.generator.worker_state()
    }

    /// Check the `Authorization` header value (`Bearer <key>`) under the auth policy.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, InferError> {
        let AuthPolicy::Keys(accounts) = &self.auth else {
            return Ok(Caller::Anonymous);
        };
        let Some(header) = authorization else {
            return Err(InferError::Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>'".into(),
            ));
        };
        let key = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|key| !key.is_empty())
            .ok_or_else(|| {
                InferError::Unauthorized("the Authorization header must be 'Bearer <key>'".into())
            })?;
        Ok(Caller::Key(accounts.authenticate(key).await?))
    }

    /// Run one generation request end to end. Images are stored before this returns.
    pub async fn generate(
        &self,
        caller: &Caller,
        id: &RequestId,
        raw: RawRequest,
    ) -> Result<Generated, InferError> {
        self.start(caller, id, raw, None).await?.finish().await
    }

    /// The first half of [`Self::generate`]: validate, admit, charge (reserve) and queue the
    /// request, with live progress sent to `progress`. Every refusal (bad field, full queue,
    /// key, quota, credits) comes from here, before anything is streamed. Dropping the
    /// [`Running`] cancels the job and refunds it.
    pub async fn start(
        &self,
        caller: &Caller,
        id: &RequestId,
        raw: RawRequest,
        progress: Option<ProgressTx>,
    ) -> Result<Running, InferError> {
        let valid = validate(&self.catalog, raw)?;
        // Admission before reservation: held until this request is answered (or dropped).
        let Ok(admitted) = self.admission.clone().try_acquire_owned() else {
            let e = busy("the generation queue is full; retry shortly");
            tracing::warn!(request_id = %id, "refused: {e}");
            return Err(e);
        };
        let reservation = match (caller, &self.auth) {
            (Caller::Key(account), AuthPolicy::Keys(accounts)) => {
                let r = accounts
                    .reserve(account, id.as_str(), valid.credits, Utc::now())
                    .await?;
                Some(RefundOnDrop::new(accounts.clone(), r, &self.outstanding))
            }
            _ => None,
        };
        let started = Instant::now();
        let ticket = match self.submit(&valid, progress) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(request_id = %id, "refused: {e}");
                if let Some(r) = reservation {
                    r.refund().await;
                }
                return Err(e);
            }
        };
        Ok(Running {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            metadata: self.metadata,
            id: id.clone(),
            valid,
            reservation,
            ticket,
            started,
            _admitted: admitted,
        })
    }

    fn submit(
        &self,
        valid: &ValidRequest,
        progress: Option<ProgressTx>,
    ) -> Result<Ticket, InferError> {
        self.generator
            .submit(valid.job.clone(), progress)
            .map_err(|e| match e {
                SubmitError::QueueFull => busy("the generation queue is full; retry shortly"),
                SubmitError::ShuttingDown => busy("the server is shutting down"),
                SubmitError::UnknownPipeline(p) => {
                    InferError::Internal(format!("pipeline '{p}' is not loaded"))
                }
            })
    }

    /// The caller's key: (balance, daily quota, used today); `None` in open mode.
    pub async fn balance(
        &self,
        caller: &Caller,
    ) -> Result<Option<(i64, Option<i64>, i64)>, InferError> {
        let (Caller::Key(account), AuthPolicy::Keys(accounts)) = (caller, &self.auth) else {
            return Ok(None);
        };
        let info = accounts.key_info(&account.id).await?;
        Ok(Some((info.balance, info.daily_quota, info.used_today)))
    }

    /// A stored image, opened for streaming, by the request ID and file name of its URL.
    pub async fn file(&self, request_id: &str, file_name: &str) -> Option<StoredFile> {
        self.store.open_file(request_id, file_name).await
    }

    /// A stored image's bytes, whole (to answer it inline as base64).
    pub async fn file_bytes(&self, request_id: &str, file_name: &str) -> Option<Vec<u8>> {
        self.store
            .open_file(request_id, file_name)
            .await?
            .read_all()
            .await
    }

    /// The generator's metrics, then the facade's.
    pub fn render_metrics(&self, out: &mut crate::metrics::Exposition) {
        out.rendered(&self.generator.metrics_text());
        self.metrics.render(out);
    }
}

/// A request accepted into the queue. [`Running::finish`] waits for it; dropping it (a client
/// that went away) cancels the job and refunds the reservation.
pub struct Running {
    store: ImageStore,
    metrics: Arc<Metrics>,
    metadata: bool,
    id: RequestId,
    valid: ValidRequest,
    reservation: Option<RefundOnDrop>,
    ticket: Ticket,
    started: Instant,
    /// The admission permit, released when the request is answered or dropped.
    _admitted: OwnedSemaphorePermit,
}

impl Running {
    /// The validated request (model, size, seeds, format).
    pub fn request(&self) -> &ValidRequest {
        &self.valid
    }

    /// Wait for the images, store them, and settle (or refund) the charge.
    pub async fn finish(self) -> Result<Generated, InferError> {
        let Running {
            store,
            metrics,
            metadata,
            id,
            valid,
            reservation,
            ticket,
            started,
            _admitted,
        } = self;
        let result = Self::wait_and_store(store, metadata, &id, &valid, ticket).await;
        match (&result, reservation) {
            (Ok(_), Some(r)) => r.settle().await,
            (Err(_), Some(r)) => r.refund().await,
            (_, None) => {}
        }
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(g) => {
                tracing::info!(request_id = %id, model = %valid.model, images = g.images.len(),
                    width = g.width, height = g.height, credits = g.credits_used, seconds, "generated");
                metrics.success(g.images.len(), g.credits_used, started.elapsed());
            }
            Err(e @ InferError::Busy { .. }) => tracing::warn!(request_id = %id, "refused: {e}"),
            Err(e) => {
                tracing::warn!(request_id = %id, model = %valid.model, seconds, "failed: {e}");
                metrics.failure();
            }
        }
        result
    }

    async fn wait_and_store(
        store: ImageStore,
        metadata: bool,
        id: &RequestId,
        valid: &ValidRequest,
        ticket: Ticket,
    ) -> Result<Generated, InferError> {
        let images = ticket.wait().await.map_err(|e| match e {
            JobError::ShuttingDown => busy("the server is shutting down"),
            JobError::Failed(why) => {
                tracing::error!(request_id = %id, "generation failed: {why}");
                InferError::GenerationFailed
            }
            JobError::Cancelled => {
                tracing::warn!(request_id = %id, "generation cancelled");
                InferError::GenerationFailed
            }
        })?;
        let job = &valid.job.spec;
        if images.len() != job.seeds.len()
            || images
                .iter()
                .any(|i| (i.width as usize, i.height as usize) != (job.width, job.height))
        {
            tracing::error!(request_id = %id, "the pipeline returned {} images, not {} of {}x{}", images.len(), job.seeds.len(), job.width, job.height);
            return Err(InferError::GenerationFailed);
        }
        let provenance = metadata.then(|| provenance(valid));
        let saved = store
            .save(id, images, valid.encoding, provenance)
            .await
            .map_err(|e| {
                tracing::error!(request_id = %id, "storing images failed: {e}");
                InferError::GenerationFailed
            })?;
        Ok(Generated {
            request_id: id.clone(),
            images: saved
                .into_iter()
                .zip(&job.seeds)
                .map(|(s, seed)| GeneratedImage {
                    file_name: s.file_name,
                    url: s.url,
                    seed: *seed,
                })
                .collect(),
            credits_used: valid.credits,
            width: job.width as u32,
            height: job.height as u32,
        })
    }
}

/// What is written into each image of a request (one entry per image).
fn provenance(valid: &ValidRequest) -> Vec<Provenance> {
    let job = &valid.job.spec;
    job.seeds
        .iter()
        .map(|&seed| Provenance {
            prompt: job.prompt.clone(),
            negative_prompt: if job.guidance.scale > 0.0 {
                job.negative_prompt.clone()
            } else {
                String::new()
            },
            model: valid.model.clone(),
            pipeline: valid.job.pipeline.clone(),
            seed,
            steps: job.steps as u32,
            guidance_scale: job.guidance.scale,
            width: job.width as u32,
            height: job.height as u32,
            software: Provenance::software_name(),
        })
        .collect()
}

fn busy(message: &'static str) -> InferError {
    InferError::Busy {
        message,
        retry_after_secs: BUSY_RETRY_AFTER_SECS,
    }
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
