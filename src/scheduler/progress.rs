//! Live progress of one job, sent by the scheduler to whoever submitted it (SSE routes).
//!
//! Sending never blocks the device thread: the channel is unbounded and a receiver that went away
//! is ignored (the job's [`super::CancelFlag`] is what stops work). A job without a progress
//! sender costs nothing here.

use tokio::sync::mpsc;

use crate::image::RgbImage;

/// Most partial images a job may ask for (OpenAI's `partial_images` 0..3).
pub const MAX_PREVIEWS: usize = 3;

/// One progress event of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Accepted into the queue; `position` 1 = next to start (jobs waiting ahead + 1).
    Queued { position: usize },
    /// Admitted to a running batch (its prompt is encoded).
    Started,
    /// `done` of `total` denoising steps are complete (all images of a job step together).
    Step { done: usize, total: usize },
    /// The decoded estimate of the clean image of image `index` after step `step`: the model's
    /// current prediction of the final image, made from the intermediate denoising state.
    Preview {
        index: usize,
        step: usize,
        total: usize,
        image: RgbImage,
    },
}

/// The sending side a job carries.
#[derive(Debug, Clone)]
pub struct ProgressTx {
    tx: mpsc::UnboundedSender<Progress>,
    previews: usize,
}

/// Receives a job's progress events; ends when the job is answered.
pub type ProgressRx = mpsc::UnboundedReceiver<Progress>;

impl ProgressTx {
    /// A channel for one job that also wants `previews` (0..=[`MAX_PREVIEWS`], clamped) partial
    /// images.
    pub fn channel(previews: usize) -> (Self, ProgressRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx,
                previews: previews.min(MAX_PREVIEWS),
            },
            rx,
        )
    }

    pub fn send(&self, event: Progress) {
        let _ = self.tx.send(event);
    }

    /// Whether a preview is due after `done` of `total` steps: the `previews` requested are spread
    /// evenly over the run, never at the last step (the final image follows it).
    pub fn preview_due(&self, done: usize, total: usize) -> bool {
        preview_steps(self.previews, total).contains(&done)
    }
}

/// Steps after which previews are made: `k * total / (previews + 1)` for k = 1..=previews,
/// rounded, kept within 1..total and distinct (fewer when the run has too few steps).
pub fn preview_steps(previews: usize, total: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (1..=previews)
        .map(|k| ((k * total) as f64 / (previews + 1) as f64).round() as usize)
        .map(|s| s.max(1))
        .filter(|&s| s < total)
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_spread_over_the_run_and_skip_the_last_step() {
        assert_eq!(preview_steps(0, 8), Vec::<usize>::new());
        assert_eq!(preview_steps(1, 8), vec![4]);
        assert_eq!(preview_steps(2, 8), vec![3, 5]);
        assert_eq!(preview_steps(3, 8), vec![2, 4, 6]);
        assert_eq!(preview_steps(3, 2), vec![1]);
        assert_eq!(preview_steps(2, 1), Vec::<usize>::new());
    }

    #[test]
    fn channel_clamps_and_delivers() {
        let (tx, mut rx) = ProgressTx::channel(7);
        assert_eq!(tx.previews, MAX_PREVIEWS);
        assert!(tx.preview_due(2, 8));
        assert!(!tx.preview_due(3, 8));
        tx.send(Progress::Started);
        assert_eq!(rx.try_recv().ok(), Some(Progress::Started));
        drop(rx);
        tx.send(Progress::Started); // a receiver that went away is ignored
    }
}
