//! Credit reservations that cannot be forgotten: a [`RefundOnDrop`] settles or refunds its
//! reservation, refunding it from a spawned task if the request's future is dropped (the client
//! went away), and [`Outstanding`] counts the ones not yet resolved so that shutdown can wait for
//! their refunds instead of guessing how long they take.

use std::sync::Arc;

use tokio::sync::watch;

use crate::accounts::{Accounts, Reservation};

/// How many reservations are not yet settled or refunded.
#[derive(Debug, Clone)]
pub(super) struct Outstanding(Arc<watch::Sender<usize>>);

impl Default for Outstanding {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Outstanding {
    fn enter(&self) -> Pending {
        self.0.send_modify(|n| *n += 1);
        Pending(self.clone())
    }

    /// Resolves when none is outstanding.
    pub(super) async fn all_resolved(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One outstanding reservation; resolved when dropped.
#[derive(Debug)]
struct Pending(Outstanding);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0 .0.send_modify(|n| *n -= 1);
    }
}

/// A reservation that is refunded if the request's future is dropped (client went away) before
/// it was settled or refunded explicitly.
pub(super) struct RefundOnDrop {
    accounts: Accounts,
    reservation: Option<(Reservation, Pending)>,
}

impl RefundOnDrop {
    pub(super) fn new(accounts: Accounts, reservation: Reservation, count: &Outstanding) -> Self {
        Self {
            accounts,
            reservation: Some((reservation, count.enter())),
        }
    }

    pub(super) async fn settle(mut self) {
        if let Some((r, _pending)) = self.reservation.take() {
            if let Err(e) = self.accounts.settle(&r).await {
                tracing::error!(request_id = %r.request_id, "settling the charge failed: {e}");
            }
        }
    }

    pub(super) async fn refund(mut self) {
        if let Some((r, _pending)) = self.reservation.take() {
            refund(&self.accounts, &r).await;
        }
    }
}

async fn refund(accounts: &Accounts, r: &Reservation) {
    if let Err(e) = accounts.refund(r).await {
        tracing::error!(request_id = %r.request_id, "refund failed (retried at next start): {e}");
    }
}

impl Drop for RefundOnDrop {
    fn drop(&mut self) {
        let Some((r, pending)) = self.reservation.take() else {
            return;
        };
        let accounts = self.accounts.clone();
        // Without a runtime (process exit) the next start refunds it.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                refund(&accounts, &r).await;
                drop(pending);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Outstanding;

    #[tokio::test]
    async fn waits_until_every_reservation_is_resolved() {
        let count = Outstanding::default();
        count.all_resolved().await; // none outstanding: at once
        let (a, b) = (count.enter(), count.enter());
        let waiter = tokio::spawn({
            let count = count.clone();
            async move { count.all_resolved().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "one reservation is still outstanding"
        );
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("resolved once the last one is dropped")
            .expect("waiter task");
    }
}
