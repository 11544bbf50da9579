#![allow(clippy::unwrap_used)]
//! A generator without a model, for tests of the layers above the scheduler.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Generator, WorkerState};
use crate::image::RgbImage;
use crate::scheduler::{CancelFlag, Job, JobError, Progress, ProgressTx, SubmitError, Ticket};

type Reply = oneshot::Sender<Result<Vec<RgbImage>, JobError>>;

/// What the fake does with the next job.
#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Succeed,
    Fail,
    QueueFull,
    /// Keep the job pending until the ticket is dropped.
    Hang,
}

pub struct Fake {
    pub mode: Mutex<Mode>,
    /// Jobs kept pending at most (a queue's capacity); beyond it a submit is `QueueFull`.
    pub capacity: Mutex<usize>,
    pub flags: Mutex<Vec<CancelFlag>>,
    /// What `worker_state` answers (`Ready` at first).
    pub state: Mutex<WorkerState>,
    // Keep the senders of hanging jobs alive.
    pending: Mutex<Vec<Reply>>,
}

impl Fake {
    pub fn new(mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(mode),
            capacity: Mutex::new(usize::MAX),
            flags: Mutex::new(Vec::new()),
            state: Mutex::new(WorkerState::Ready),
            pending: Mutex::new(Vec::new()),
        })
    }
}

impl Generator for Fake {
    fn worker_state(&self) -> WorkerState {
        *self.state.lock().unwrap()
    }
    fn submit(&self, job: Job, progress: Option<ProgressTx>) -> Result<Ticket, SubmitError> {
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::QueueFull
            || self.pending.lock().unwrap().len() >= *self.capacity.lock().unwrap()
        {
            return Err(SubmitError::QueueFull);
        }
        let (tx, rx) = oneshot::channel();
        let flag = CancelFlag::default();
        self.flags.lock().unwrap().push(flag.clone());
        match mode {
            Mode::Succeed => {
                // What the scheduler sends, without a model: queued, started, one event per step.
                if let Some(p) = &progress {
                    p.send(Progress::Queued { position: 1 });
                    p.send(Progress::Started);
                    let total = job.spec.steps;
                    for done in 1..=total {
                        p.send(Progress::Step { done, total });
                    }
                }
                let images = job
                    .spec
                    .seeds
                    .iter()
                    .map(|s| RgbImage {
                        width: job.spec.width as u32,
                        height: job.spec.height as u32,
                        data: vec![(*s % 256) as u8; job.spec.width * job.spec.height * 3],
                    })
                    .collect();
                let _ = tx.send(Ok(images));
            }
            Mode::Fail => {
                let _ = tx.send(Err(JobError::Failed("/secret/path: out of memory".into())));
            }
            _ => self.pending.lock().unwrap().push(tx),
        }
        Ok(Ticket::new(rx, flag))
    }
    fn loaded_pipelines(&self) -> Vec<String> {
        vec!["z-image-turbo".into()]
    }
    fn metrics_text(&self) -> String {
        String::new()
    }
}
