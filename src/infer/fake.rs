#![allow(clippy::unwrap_used)]
//! A generator without a model, for tests of the layers above the scheduler.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::Generator;
use crate::scheduler::{
    CancelFlag, Image, Job, JobError, Progress, ProgressTx, SubmitError, Ticket,
};

type Reply = oneshot::Sender<Result<Vec<Image>, JobError>>;

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
    pub flags: Mutex<Vec<CancelFlag>>,
    // Keep the senders of hanging jobs alive.
    pending: Mutex<Vec<Reply>>,
}

impl Fake {
    pub fn new(mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(mode),
            flags: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
        })
    }
}

impl Generator for Fake {
    fn submit(&self, job: Job, progress: Option<ProgressTx>) -> Result<Ticket, SubmitError> {
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::QueueFull {
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
                    let total = job.steps as usize;
                    for done in 1..=total {
                        p.send(Progress::Step { done, total });
                    }
                }
                let images = job
                    .seeds
                    .iter()
                    .map(|s| Image {
                        width: job.width,
                        height: job.height,
                        rgb: vec![(*s % 256) as u8; (job.width * job.height * 3) as usize],
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
