//! The waiting queue and its admission policy, as a plain struct (no threads, no device).
//!
//! Policy (FIFO with bounded overtaking):
//! - Jobs wait in arrival order, whoever sent them. A full queue refuses at once.
//! - A new batch starts with the oldest job, whatever its size, then takes the following jobs
//!   that are compatible with it (same pipeline, size and CFG on/off) in arrival order while
//!   they fit the batch's image budget.
//! - While a batch runs, compatible jobs join it at step boundaries, again in arrival order and
//!   only while they fit. A job may overtake an incompatible older job only by joining a batch
//!   that is already running, and not at all once the oldest job has waited longer than
//!   `max_head_wait_batches` admissions: then nothing joins, the batch drains and the oldest
//!   job starts the next one. So one key's stream of large or odd-sized requests cannot starve
//!   anybody: every job starts within a bounded number of batches of reaching the head.

use std::collections::VecDeque;

/// What the queue needs to know about a job.
pub trait Batchable {
    /// Jobs batch together only when their keys are equal.
    type Key: PartialEq + Clone;
    fn batch_key(&self) -> Self::Key;
    /// Images the job adds to a batch.
    fn images(&self) -> usize;
}

#[derive(Debug)]
pub struct Queue<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// Admissions that overtook the current head.
    head_overtaken: usize,
    max_head_overtakes: usize,
}

impl<T: Batchable> Queue<T> {
    pub fn new(capacity: usize, max_head_overtakes: usize) -> Self {
        Self {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            head_overtaken: 0,
            max_head_overtakes,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Images of every waiting job.
    pub fn images(&self) -> usize {
        self.items.iter().map(|j| j.images()).sum()
    }

    /// Add a job at the back; gives it back when the queue is full.
    pub fn push(&mut self, job: T) -> Result<(), T> {
        if self.items.len() >= self.capacity {
            return Err(job);
        }
        self.items.push_back(job);
        Ok(())
    }

    /// Start a new batch: the head job, then compatible followers within `budget` images.
    pub fn start_batch(&mut self, budget: usize) -> Vec<T> {
        let Some(head) = self.items.pop_front() else {
            return Vec::new();
        };
        self.head_overtaken = 0;
        let key = head.batch_key();
        let left = budget.saturating_sub(head.images());
        let mut batch = vec![head];
        batch.extend(self.take_compatible(&key, left, false));
        batch
    }

    /// Jobs that may join a running batch of `key` with `budget` images free.
    pub fn join_running(&mut self, key: &T::Key, budget: usize) -> Vec<T> {
        self.take_compatible(key, budget, true)
    }

    fn take_compatible(&mut self, key: &T::Key, mut budget: usize, running: bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.items.len() && budget > 0 {
            let job = &self.items[i];
            if job.batch_key() != *key {
                // The head is incompatible: jobs behind it overtake it only so often.
                if i == 0 && running && self.head_overtaken >= self.max_head_overtakes {
                    break;
                }
                i += 1;
                continue;
            }
            if job.images() > budget {
                // Keep arrival order among compatible jobs: nobody passes a job that waits for room.
                break;
            }
            budget -= job.images();
            if let Some(job) = self.items.remove(i) {
                if running && i > 0 {
                    self.head_overtaken += 1;
                }
                out.push(job);
            }
        }
        out
    }

    /// Remove jobs for which `drop_it` is true (e.g. cancelled while waiting).
    pub fn drain_where(&mut self, mut drop_it: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut kept = VecDeque::with_capacity(self.items.len());
        let mut dropped = Vec::new();
        for job in self.items.drain(..) {
            if drop_it(&job) {
                dropped.push(job);
            } else {
                kept.push_back(job);
            }
        }
        self.items = kept;
        dropped
    }

    /// Take every waiting job (shutdown).
    pub fn drain_all(&mut self) -> Vec<T> {
        self.items.drain(..).collect()
    }
}

/// Image budget of a batch that an idle worker starts while `idle_workers` (itself included)
/// are idle and `waiting` images wait: an even share, rounded up, at least 1 and at most
/// `max_batch`. With one worker this is the whole budget.
pub fn fair_share(waiting: usize, idle_workers: usize, max_batch: usize) -> usize {
    let max_batch = max_batch.max(1);
    if idle_workers <= 1 {
        return max_batch;
    }
    waiting.div_ceil(idle_workers).clamp(1, max_batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct J {
        id: u32,
        key: &'static str,
        n: usize,
    }
    impl Batchable for J {
        type Key = &'static str;
        fn batch_key(&self) -> &'static str {
            self.key
        }
        fn images(&self) -> usize {
            self.n
        }
    }
    fn j(id: u32, key: &'static str, n: usize) -> J {
        J { id, key, n }
    }
    fn ids(v: &[J]) -> Vec<u32> {
        v.iter().map(|j| j.id).collect()
    }

    #[test]
    fn full_queue_refuses() {
        let mut q = Queue::new(2, 4);
        assert!(q.push(j(1, "a", 1)).is_ok());
        assert!(q.push(j(2, "a", 1)).is_ok());
        assert_eq!(q.push(j(3, "a", 1)).err().map(|j| j.id), Some(3));
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn batch_starts_with_head_and_takes_compatible_within_budget() {
        let mut q = Queue::new(10, 4);
        for job in [j(1, "a", 2), j(2, "b", 1), j(3, "a", 4), j(4, "a", 1)] {
            assert!(q.push(job).is_ok());
        }
        // budget 4: head (2) + job 3 (4) does not fit; arrival order among compatible jobs is kept.
        let b = q.start_batch(4);
        assert_eq!(ids(&b), vec![1]);
        let b = q.start_batch(8);
        assert_eq!(ids(&b), vec![2]);
        let b = q.start_batch(8);
        assert_eq!(ids(&b), vec![3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_oversized_head_still_starts() {
        let mut q = Queue::new(10, 4);
        assert!(q.push(j(1, "a", 6)).is_ok());
        assert_eq!(ids(&q.start_batch(4)), vec![1]);
    }

    #[test]
    fn joiners_overtake_an_incompatible_head_only_boundedly() {
        let mut q = Queue::new(100, 2);
        assert!(q.push(j(1, "big", 4)).is_ok());
        for id in 2..10 {
            assert!(q.push(j(id, "small", 1)).is_ok());
        }
        assert_eq!(ids(&q.join_running(&"small", 1)), vec![2]);
        assert_eq!(ids(&q.join_running(&"small", 1)), vec![3]);
        // The head has been passed twice: nothing else joins until it has started.
        assert!(q.join_running(&"small", 1).is_empty());
        assert_eq!(ids(&q.start_batch(4)), vec![1]);
        assert_eq!(ids(&q.join_running(&"small", 8)), vec![4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn idle_workers_split_waiting_jobs() {
        assert_eq!(fair_share(2, 1, 8), 8);
        assert_eq!(fair_share(2, 2, 8), 1);
        assert_eq!(fair_share(5, 2, 8), 3);
        assert_eq!(fair_share(40, 2, 8), 8);
        assert_eq!(fair_share(0, 3, 8), 1);
        let mut q = Queue::new(10, 4);
        for id in 1..=4 {
            assert!(q.push(j(id, "a", 1)).is_ok());
        }
        assert_eq!(q.images(), 4);
        // Two idle workers: the first takes half, the second the rest.
        assert_eq!(
            ids(&q.start_batch(fair_share(q.images(), 2, 8))),
            vec![1, 2]
        );
        assert_eq!(
            ids(&q.start_batch(fair_share(q.images(), 1, 8))),
            vec![3, 4]
        );
    }

    #[test]
    fn cancelled_jobs_leave_the_queue() {
        let mut q = Queue::new(10, 4);
        for id in 1..5 {
            assert!(q.push(j(id, "a", 1)).is_ok());
        }
        let gone = q.drain_where(|j| j.id % 2 == 0);
        assert_eq!(ids(&gone), vec![2, 4]);
        assert_eq!(ids(&q.drain_all()), vec![1, 3]);
    }
}
