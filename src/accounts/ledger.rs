//! Credits and quota per request: reserve (one transaction: quota slot, then credits), then settle
//! on success or refund on any failure. A crash between the two is repaired at the next start by
//! [`Accounts::refund_stale_reservations`].

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{quota, unix_now, Account, Accounts, AccountsError};

/// Credits and a quota slot taken for one request, until settled or refunded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub request_id: String,
    pub key_id: String,
    pub credits: i64,
    /// UTC day whose quota slot was taken.
    pub day: String,
}

impl Accounts {
    /// Take one request of the key's daily quota and `credits` from its balance, atomically. The
    /// quota is checked first (429 before 402); on either refusal nothing changes.
    pub async fn reserve(
        &self,
        account: &Account,
        request_id: &str,
        credits: i64,
        now: DateTime<Utc>,
    ) -> Result<Reservation, AccountsError> {
        let day = quota::day_of(now);
        let mut tx = self.begin_write().await?;

        // Count the request, unless the quota is used up (the WHERE makes the upsert a no-op).
        const COUNT: &str = "INSERT INTO daily_usage (key_id, day, requests) VALUES (?, ?, 1) \
             ON CONFLICT (key_id, day) DO UPDATE SET requests = daily_usage.requests + 1";
        const COUNT_UNDER_QUOTA: &str =
            "INSERT INTO daily_usage (key_id, day, requests) VALUES (?, ?, 1) \
             ON CONFLICT (key_id, day) DO UPDATE SET requests = daily_usage.requests + 1 \
             WHERE daily_usage.requests < ?";
        let counted = match account.daily_quota {
            Some(quota) => sqlx::query(COUNT_UNDER_QUOTA)
                .bind(&account.id)
                .bind(&day)
                .bind(quota),
            None => sqlx::query(COUNT).bind(&account.id).bind(&day),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if let (0, Some(quota)) = (counted, account.daily_quota) {
            tx.rollback().await?;
            return Err(AccountsError::QuotaExceeded {
                quota,
                retry_after_secs: quota::seconds_until_next_day(now),
            });
        }

        let charged = sqlx::query(
            "UPDATE api_keys SET balance = balance - ? WHERE id = ? AND revoked_at IS NULL AND balance >= ?",
        )
        .bind(credits)
        .bind(&account.id)
        .bind(credits)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if charged == 0 {
            let row = sqlx::query("SELECT balance, revoked_at FROM api_keys WHERE id = ?")
                .bind(&account.id)
                .fetch_optional(&mut *tx)
                .await?;
            tx.rollback().await?;
            let Some(row) = row else {
                return Err(AccountsError::UnknownKey);
            };
            if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
                return Err(AccountsError::RevokedKey);
            }
            return Err(AccountsError::InsufficientCredits {
                needed: credits,
                balance: row.try_get("balance")?,
            });
        }

        let now_secs = unix_now();
        sqlx::query(
            "INSERT INTO charges (request_id, key_id, day, credits, status, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 'reserved', ?, ?)",
        )
        .bind(request_id)
        .bind(&account.id)
        .bind(&day)
        .bind(credits)
        .bind(now_secs)
        .bind(now_secs)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Reservation {
            request_id: request_id.to_string(),
            key_id: account.id.clone(),
            credits,
            day,
        })
    }

    /// The request succeeded: the reserved credits stay spent.
    pub async fn settle(&self, r: &Reservation) -> Result<(), AccountsError> {
        sqlx::query("UPDATE charges SET status = 'settled', updated_at = ? WHERE request_id = ? AND status = 'reserved'")
            .bind(unix_now())
            .bind(&r.request_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The request failed: give back its credits and its quota slot. Refunding twice, or after
    /// settling, changes nothing.
    pub async fn refund(&self, r: &Reservation) -> Result<(), AccountsError> {
        let mut tx = self.begin_write().await?;
        let flipped = sqlx::query(
            "UPDATE charges SET status = 'refunded', updated_at = ? WHERE request_id = ? AND status = 'reserved'",
        )
        .bind(unix_now())
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if flipped == 1 {
            sqlx::query("UPDATE api_keys SET balance = balance + ? WHERE id = ?")
                .bind(r.credits)
                .bind(&r.key_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE daily_usage SET requests = requests - 1 WHERE key_id = ? AND day = ? AND requests > 0")
                .bind(&r.key_id)
                .bind(&r.day)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Refund every reservation left open by a server that stopped mid-request. Call at start,
    /// before taking requests (one server per data directory). Returns how many were refunded.
    pub async fn refund_stale_reservations(&self) -> Result<usize, AccountsError> {
        let rows = sqlx::query(
            "SELECT request_id, key_id, credits, day FROM charges WHERE status = 'reserved'",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &rows {
            let r = Reservation {
                request_id: row.try_get("request_id")?,
                key_id: row.try_get("key_id")?,
                credits: row.try_get("credits")?,
                day: row.try_get("day")?,
            };
            self.refund(&r).await?;
        }
        Ok(rows.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::test_util::open_temp;
    use super::super::NewKey;
    use super::*;

    async fn key(acc: &Accounts, credits: i64, quota: Option<i64>) -> Account {
        let k = acc
            .create_key(NewKey {
                name: String::new(),
                credits,
                daily_quota: quota,
            })
            .await
            .unwrap();
        acc.authenticate(&k.secret).await.unwrap()
    }

    fn noon() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[tokio::test]
    async fn reserve_settle_refund() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 1000, None).await;
        let r1 = acc.reserve(&a, "req_1", 400, noon()).await.unwrap();
        let r2 = acc.reserve(&a, "req_2", 400, noon()).await.unwrap();
        let err = acc.reserve(&a, "req_3", 400, noon()).await.unwrap_err();
        assert!(
            matches!(
                err,
                AccountsError::InsufficientCredits {
                    needed: 400,
                    balance: 200
                }
            ),
            "{err}"
        );
        acc.settle(&r1).await.unwrap();
        acc.refund(&r2).await.unwrap();
        acc.refund(&r2).await.unwrap(); // idempotent
        acc.refund(&r1).await.unwrap(); // settled: no refund
        assert_eq!(acc.key_info(&a.id).await.unwrap().balance, 600);
    }

    #[tokio::test]
    async fn quota_counts_accepted_requests_only() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 100, Some(2)).await;
        let r1 = acc.reserve(&a, "req_1", 10, noon()).await.unwrap();
        // 402 does not use the quota.
        assert!(matches!(
            acc.reserve(&a, "req_x", 1000, noon()).await,
            Err(AccountsError::InsufficientCredits { .. })
        ));
        let _r2 = acc.reserve(&a, "req_2", 10, noon()).await.unwrap();
        let err = acc.reserve(&a, "req_3", 10, noon()).await.unwrap_err();
        assert!(
            matches!(
                err,
                AccountsError::QuotaExceeded {
                    quota: 2,
                    retry_after_secs: 43_200
                }
            ),
            "{err}"
        );
        // A refunded request gives its slot back.
        acc.refund(&r1).await.unwrap();
        acc.reserve(&a, "req_4", 10, noon()).await.unwrap();
        // The next UTC day has a fresh quota.
        let tomorrow = noon() + chrono::Duration::days(1);
        acc.reserve(&a, "req_5", 10, tomorrow).await.unwrap();
        assert_eq!(acc.key_info(&a.id).await.unwrap().balance, 70);
    }

    #[tokio::test]
    async fn quota_is_checked_before_credits() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 10, Some(1)).await;
        acc.reserve(&a, "req_1", 10, noon()).await.unwrap();
        let err = acc.reserve(&a, "req_2", 10, noon()).await.unwrap_err();
        assert!(matches!(err, AccountsError::QuotaExceeded { .. }), "{err}");
    }

    #[tokio::test]
    async fn concurrent_reservations_never_overdraw() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 15 * 250, None).await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (acc, a) = (acc.clone(), a.clone());
                tokio::spawn(async move { acc.reserve(&a, &format!("req_{i}"), 250, noon()).await })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(AccountsError::InsufficientCredits { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(ok, 15);
        assert_eq!(acc.key_info(&a.id).await.unwrap().balance, 0);
    }

    #[tokio::test]
    async fn stale_reservations_are_refunded() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 100, Some(5)).await;
        acc.reserve(&a, "req_1", 60, Utc::now()).await.unwrap();
        assert_eq!(acc.refund_stale_reservations().await.unwrap(), 1);
        let info = acc.key_info(&a.id).await.unwrap();
        assert_eq!((info.balance, info.used_today), (100, 0));
        assert_eq!(acc.refund_stale_reservations().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn revoked_key_cannot_reserve() {
        let (_dir, acc) = open_temp().await;
        let a = key(&acc, 100, None).await;
        acc.revoke(&a.id).await.unwrap();
        assert!(matches!(
            acc.reserve(&a, "req_1", 1, noon()).await,
            Err(AccountsError::RevokedKey)
        ));
    }
}
