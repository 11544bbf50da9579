//! Credits and quota per request: reserve (one transaction: quota slot, then credits), then settle
//! on success or refund on any failure. A crash between the two is repaired at the next start by
//! [`Accounts::refund_stale_reservations`].

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::write::WriteTx;
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
        let instance = self.instance.as_deref();
        let outcome = reserve_in(&mut tx, account, request_id, credits, &day, now, instance).await;
        self.finish(tx, outcome).await?;
        Ok(Reservation {
            request_id: request_id.to_string(),
            key_id: account.id.clone(),
            credits,
            day,
        })
    }

    /// The request succeeded: the reserved credits stay spent.
    pub async fn settle(&self, r: &Reservation) -> Result<(), AccountsError> {
        let settled = sqlx::query("UPDATE charges SET status = 'settled', updated_at = $1 WHERE request_id = $2 AND status = 'reserved'")
            .bind(unix_now())
            .bind(&r.request_id)
            .execute(&self.pool)
            .await;
        self.health.note(settled)?;
        Ok(())
    }

    /// The request failed: give back its credits and its quota slot. Refunding twice, or after
    /// settling, changes nothing.
    pub async fn refund(&self, r: &Reservation) -> Result<(), AccountsError> {
        let mut tx = self.begin_write().await?;
        let outcome = refund_in(&mut tx, r).await;
        self.finish(tx, outcome).await.map(drop)
    }

    /// Refund every reservation left open by a server that stopped mid-request. Only for a
    /// database that one server uses alone (the SQLite file of a locked data directory): call at
    /// start, before taking requests. Returns how many were refunded. (A shared database refunds
    /// per dead instance instead: [`Accounts::reap_dead_instances`].)
    pub async fn refund_stale_reservations(&self) -> Result<usize, AccountsError> {
        let rows = sqlx::query(
            "SELECT request_id, key_id, credits, day FROM charges WHERE status = 'reserved'",
        )
        .fetch_all(&self.pool)
        .await?;
        self.refund_rows(&rows).await
    }

    /// Refund the reservations of `rows` (request_id, key_id, credits, day); how many this call
    /// flipped (one refunded by someone else meanwhile is not counted, nor refunded twice).
    pub(super) async fn refund_rows(&self, rows: &[AnyRow]) -> Result<usize, AccountsError> {
        let mut refunded = 0;
        for row in rows {
            let r = Reservation {
                request_id: row.try_get("request_id")?,
                key_id: row.try_get("key_id")?,
                credits: row.try_get("credits")?,
                day: row.try_get("day")?,
            };
            let mut tx = self.begin_write().await?;
            let outcome = refund_in(&mut tx, &r).await;
            if self.finish(tx, outcome).await? {
                refunded += 1;
            }
        }
        Ok(refunded)
    }
}

/// The statements of [`Accounts::reserve`], inside its transaction.
async fn reserve_in(
    tx: &mut WriteTx,
    account: &Account,
    request_id: &str,
    credits: i64,
    day: &str,
    now: DateTime<Utc>,
    instance: Option<&str>,
) -> Result<(), AccountsError> {
    // Count the request, unless the quota is used up (the WHERE makes the upsert a no-op).
    const COUNT: &str = "INSERT INTO daily_usage (key_id, day, requests) VALUES ($1, $2, 1) \
         ON CONFLICT (key_id, day) DO UPDATE SET requests = daily_usage.requests + 1";
    const COUNT_UNDER_QUOTA: &str =
        "INSERT INTO daily_usage (key_id, day, requests) VALUES ($1, $2, 1) \
         ON CONFLICT (key_id, day) DO UPDATE SET requests = daily_usage.requests + 1 \
         WHERE daily_usage.requests < $3";
    let counted = match account.daily_quota {
        Some(quota) => sqlx::query(COUNT_UNDER_QUOTA)
            .bind(&account.id)
            .bind(day)
            .bind(quota),
        None => sqlx::query(COUNT).bind(&account.id).bind(day),
    }
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if let (0, Some(quota)) = (counted, account.daily_quota) {
        return Err(AccountsError::QuotaExceeded {
            quota,
            retry_after_secs: quota::seconds_until_next_day(now),
        });
    }

    let charged = sqlx::query(
        "UPDATE api_keys SET balance = balance - $1 WHERE id = $2 AND revoked_at IS NULL AND balance >= $1",
    )
    .bind(credits)
    .bind(&account.id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if charged == 0 {
        let row = sqlx::query("SELECT balance, revoked_at FROM api_keys WHERE id = $1")
            .bind(&account.id)
            .fetch_optional(&mut **tx)
            .await?;
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
        "INSERT INTO charges \
         (request_id, key_id, day, credits, status, created_at, updated_at, instance_id) \
         VALUES ($1, $2, $3, $4, 'reserved', $5, $5, $6)",
    )
    .bind(request_id)
    .bind(&account.id)
    .bind(day)
    .bind(credits)
    .bind(now_secs)
    .bind(instance)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The statements of [`Accounts::refund`], inside its transaction; whether this refunded it
/// (false: it was settled or refunded already). The flip of the charge's status is what makes a
/// refund happen once, however many servers try it at the same moment. The key's rows are
/// locked in the order reserve locks them (daily_usage, then api_keys), so on Postgres a refund
/// and a reservation of one key never deadlock.
async fn refund_in(tx: &mut WriteTx, r: &Reservation) -> Result<bool, AccountsError> {
    let flipped = sqlx::query(
        "UPDATE charges SET status = 'refunded', updated_at = $1 WHERE request_id = $2 AND status = 'reserved'",
    )
    .bind(unix_now())
    .bind(&r.request_id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if flipped == 1 {
        sqlx::query("UPDATE daily_usage SET requests = requests - 1 WHERE key_id = $1 AND day = $2 AND requests > 0")
            .bind(&r.key_id)
            .bind(&r.day)
            .execute(&mut **tx)
            .await?;
        sqlx::query("UPDATE api_keys SET balance = balance + $1 WHERE id = $2")
            .bind(r.credits)
            .bind(&r.key_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(flipped == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::test_util::{each_engine, fill_up, free_space, key, open_small, open_temp};
    use super::*;

    fn noon() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[tokio::test]
    async fn reserve_settle_refund() {
        for (_guard, acc) in each_engine().await {
            reserve_settle_refund_on(acc).await;
        }
    }

    async fn reserve_settle_refund_on(acc: Accounts) {
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
        for (_guard, acc) in each_engine().await {
            quota_counts_accepted_requests_only_on(acc).await;
        }
    }

    async fn quota_counts_accepted_requests_only_on(acc: Accounts) {
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

    /// Reservations, refunds and settlements of one key at once: never an overdraft, never a
    /// deadlock (Postgres locks rows; the statements take them in one order), an exact ledger.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_overdraw() {
        for (_guard, acc) in each_engine().await {
            // Reservations only: exactly 15 of 20 fit.
            let b = key(&acc, 15 * 250, None).await;
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let (acc, b) = (acc.clone(), b.clone());
                    tokio::spawn(
                        async move { acc.reserve(&b, &format!("b_{i}"), 250, noon()).await },
                    )
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => ok += 1,
                    Err(AccountsError::InsufficientCredits { .. }) => {}
                    Err(e) => panic!("{:?}: {e}", acc.engine()),
                }
            }
            assert_eq!(ok, 15, "{:?}", acc.engine());
            assert_eq!(acc.key_info(&b.id).await.unwrap().balance, 0);

            let a = key(&acc, 15 * 250, Some(1000)).await;
            let tasks: Vec<_> = (0..40)
                .map(|i| {
                    let (acc, a) = (acc.clone(), a.clone());
                    tokio::spawn(async move {
                        let r = acc
                            .reserve(&a, &format!("req_{i}"), 250, Utc::now())
                            .await?;
                        // Every third one fails and is refunded, at once, while others reserve.
                        if i % 3 == 0 {
                            acc.refund(&r).await?;
                            Ok(false)
                        } else {
                            acc.settle(&r).await?;
                            Ok(true)
                        }
                    })
                })
                .collect();
            let mut kept = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(true) => kept += 1,
                    Ok(false) | Err(AccountsError::InsufficientCredits { .. }) => {}
                    Err(e) => panic!("{:?}: {e}", acc.engine()),
                }
            }
            // Refunded credits may come back after the others gave up: at most 15 are kept.
            assert!((1..=15).contains(&kept), "{:?}: {kept}", acc.engine());
            let info = acc.key_info(&a.id).await.unwrap();
            let expected = (15 * 250 - 250 * kept, kept);
            assert_eq!(
                (info.balance, info.used_today),
                expected,
                "{:?}",
                acc.engine()
            );
        }
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

    /// Finding 1 of issue 15: a write that fails with SQLITE_FULL (SQLite rolls the transaction
    /// back by itself) must not leave a pooled connection that can never begin again; once space
    /// is freed the next reservations succeed and the ledger is exact.
    #[tokio::test]
    async fn a_full_database_does_not_poison_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let acc = open_small(dir.path()).await;
        let a = key(&acc, 1_000_000, Some(1_000_000)).await;
        // Take most of the space with rows the test can delete later.
        fill_up(&acc).await;
        // Reserve until the database is full.
        let mut reserved = 0i64;
        let err = loop {
            match acc.reserve(&a, &format!("req_{reserved}"), 3, noon()).await {
                Ok(_) => reserved += 1,
                Err(e) => break e,
            }
            assert!(reserved < 100_000, "the database never filled up");
        };
        assert!(matches!(err, AccountsError::Db(_)), "{err}");
        assert!(err.to_string().contains("full"), "{err}");
        let reason = acc.check_writable().await.unwrap_err();
        assert!(reason.contains("full"), "{reason}");
        // Still full: every attempt fails the same way, none is charged.
        for i in 0..3 {
            let e = acc.reserve(&a, &format!("full_{i}"), 3, noon()).await;
            assert!(matches!(e, Err(AccountsError::Db(_))), "{e:?}");
        }

        // Free space: the next requests succeed on every pooled connection.
        free_space(&acc).await;
        acc.check_writable().await.unwrap();
        for i in 0..20 {
            let r = acc.reserve(&a, &format!("after_{i}"), 3, noon()).await;
            let r = r.unwrap_or_else(|e| panic!("reserve {i} after freeing space: {e}"));
            if i % 2 == 0 {
                acc.refund(&r).await.unwrap();
            } else {
                acc.settle(&r).await.unwrap();
            }
        }
        let kept = reserved + 10;
        let info = acc.key_info(&a.id).await.unwrap();
        assert_eq!(info.balance, 1_000_000 - 3 * kept);
        let day = quota::day_of(noon());
        let used: i64 =
            sqlx::query_scalar("SELECT requests FROM daily_usage WHERE key_id = $1 AND day = $2")
                .bind(&a.id)
                .bind(&day)
                .fetch_one(&acc.pool)
                .await
                .unwrap();
        assert_eq!(used, kept);
        let charged: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM charges WHERE status != 'refunded'",
        )
        .fetch_one(&acc.pool)
        .await
        .unwrap();
        assert_eq!(charged, 3 * kept);
    }

    /// The Postgres side of the same guarantee: while the database refuses writes (here made
    /// read-only, with every connection cut) reservations fail without a charge and /health's
    /// check reports why; once it takes writes again the pool recovers and the ledger is exact.
    #[tokio::test]
    async fn postgres_that_refuses_writes_then_recovers() {
        use crate::test_services::postgres;
        let Some(db) = postgres::database("postgres_that_refuses_writes_then_recovers") else {
            return;
        };
        let acc = Accounts::connect(&db.url).await.unwrap();
        let a = key(&acc, 1000, None).await;
        acc.reserve(&a, "req_before", 10, noon()).await.unwrap();
        let cut = format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            db.name
        );
        postgres::admin(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ));
        postgres::admin(&cut);
        for i in 0..3 {
            let e = acc.reserve(&a, &format!("req_ro_{i}"), 10, noon()).await;
            assert!(matches!(e, Err(AccountsError::Db(_))), "{e:?}");
        }
        let reason = acc.check_writable().await.unwrap_err();
        assert!(reason.contains("cannot be written"), "{reason}");
        postgres::admin(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = off",
            db.name
        ));
        postgres::admin(&cut);
        acc.check_writable().await.unwrap();
        for i in 0..10 {
            acc.reserve(&a, &format!("req_after_{i}"), 10, noon())
                .await
                .unwrap_or_else(|e| panic!("reserve {i} after recovery: {e}"));
        }
        assert_eq!(acc.key_info(&a.id).await.unwrap().balance, 1000 - 11 * 10);
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
