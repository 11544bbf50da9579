//! `Idempotency-Key`: one row per (API key, idempotency key) for 24 hours. The first request
//! claims the row and runs; a repeat with the same body gets the stored response, or waits while
//! the first still runs (on any instance sharing the database); a repeat with another body is
//! refused. A request that fails gives its row up, so a retry runs again (its credits were
//! refunded, so the key still pays once). The rows of an instance found dead are given up with
//! its reservations.

use sqlx::Row;

use super::{unix_now, Accounts, AccountsError};

/// How long a key is remembered.
pub const IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

/// The first response to a request with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub request_id: String,
    /// The response body as it was sent (JSON).
    pub body: String,
}

/// What a request with an idempotency key should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// It is the first: run it, then [`Accounts::complete_idempotency`] or
    /// [`Accounts::abandon_idempotency`].
    Run,
    /// The first one succeeded: answer its response.
    Done(StoredResponse),
    /// The first one is still running: ask again shortly.
    Running,
    /// The key was used with a different request body.
    Mismatch,
}

impl Accounts {
    /// Claim `idem_key` for `owner` (an API key's ID, or "" in open mode).
    pub async fn claim_idempotency(
        &self,
        owner: &str,
        idem_key: &str,
        body_hash: &str,
        request_id: &str,
    ) -> Result<IdempotencyClaim, AccountsError> {
        let now = unix_now();
        // An expired row is forgotten before the key is claimed again.
        sqlx::query(
            "DELETE FROM idempotency WHERE owner = $1 AND idem_key = $2 AND created_at < $3",
        )
        .bind(owner)
        .bind(idem_key)
        .bind(now - IDEMPOTENCY_TTL_SECS)
        .execute(&self.pool)
        .await?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency \
             (owner, idem_key, body_hash, request_id, instance_id, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6) ON CONFLICT (owner, idem_key) DO NOTHING",
        )
        .bind(owner)
        .bind(idem_key)
        .bind(body_hash)
        .bind(request_id)
        .bind(self.instance.as_deref().unwrap_or(""))
        .bind(now)
        .execute(&self.pool)
        .await;
        if self.health.note(claimed)?.rows_affected() == 1 {
            return Ok(IdempotencyClaim::Run);
        }
        let row = sqlx::query(
            "SELECT body_hash, request_id, status, response FROM idempotency \
             WHERE owner = $1 AND idem_key = $2",
        )
        .bind(owner)
        .bind(idem_key)
        .fetch_optional(&self.pool)
        .await?;
        // Given up between the insert and the select: the caller asks again.
        let Some(row) = row else {
            return Ok(IdempotencyClaim::Running);
        };
        if row.try_get::<String, _>("body_hash")? != body_hash {
            return Ok(IdempotencyClaim::Mismatch);
        }
        match row.try_get::<Option<String>, _>("response")? {
            Some(body) if row.try_get::<String, _>("status")? == "done" => {
                Ok(IdempotencyClaim::Done(StoredResponse {
                    request_id: row.try_get("request_id")?,
                    body,
                }))
            }
            _ => Ok(IdempotencyClaim::Running),
        }
    }

    /// The claimed request succeeded: keep its response for the repeats.
    pub async fn complete_idempotency(
        &self,
        owner: &str,
        idem_key: &str,
        response: &str,
    ) -> Result<(), AccountsError> {
        let done = sqlx::query(
            "UPDATE idempotency SET status = 'done', response = $1 \
             WHERE owner = $2 AND idem_key = $3 AND status = 'running'",
        )
        .bind(response)
        .bind(owner)
        .bind(idem_key)
        .execute(&self.pool)
        .await;
        self.health.note(done)?;
        Ok(())
    }

    /// The claimed request failed: forget the key, so that a retry runs again.
    pub async fn abandon_idempotency(
        &self,
        owner: &str,
        idem_key: &str,
    ) -> Result<(), AccountsError> {
        sqlx::query(
            "DELETE FROM idempotency WHERE owner = $1 AND idem_key = $2 AND status = 'running'",
        )
        .bind(owner)
        .bind(idem_key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Give up the running claims of an instance found dead.
    pub(super) async fn abandon_instance_idempotency(&self, id: &str) -> Result<(), AccountsError> {
        sqlx::query("DELETE FROM idempotency WHERE instance_id = $1 AND status = 'running'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::test_util::each_engine;
    use super::*;

    #[tokio::test]
    async fn first_runs_repeats_get_its_response_other_bodies_are_refused() {
        for (_guard, acc) in each_engine().await {
            let acc = acc.register_instance().await.unwrap();
            let claim = |key: &'static str, hash: &'static str, req: &'static str| {
                let acc = acc.clone();
                async move {
                    acc.claim_idempotency("key_a", key, hash, req)
                        .await
                        .unwrap()
                }
            };
            assert_eq!(claim("k1", "h1", "req_1").await, IdempotencyClaim::Run);
            assert_eq!(claim("k1", "h1", "req_2").await, IdempotencyClaim::Running);
            assert_eq!(claim("k1", "h2", "req_3").await, IdempotencyClaim::Mismatch);
            // Another API key's k1 is its own.
            let other = acc
                .claim_idempotency("key_b", "k1", "h9", "req_4")
                .await
                .unwrap();
            assert_eq!(other, IdempotencyClaim::Run);
            acc.complete_idempotency("key_a", "k1", "{\"ok\":1}")
                .await
                .unwrap();
            assert_eq!(
                claim("k1", "h1", "req_5").await,
                IdempotencyClaim::Done(StoredResponse {
                    request_id: "req_1".into(),
                    body: "{\"ok\":1}".into()
                })
            );
            // A failed first request gives the key up; the retry runs.
            assert_eq!(claim("k2", "h1", "req_6").await, IdempotencyClaim::Run);
            acc.abandon_idempotency("key_a", "k2").await.unwrap();
            assert_eq!(claim("k2", "h1", "req_7").await, IdempotencyClaim::Run);
            // After 24 h the key is forgotten.
            sqlx::query("UPDATE idempotency SET created_at = created_at - $1")
                .bind(IDEMPOTENCY_TTL_SECS + 1)
                .execute(&acc.pool)
                .await
                .unwrap();
            assert_eq!(claim("k1", "h2", "req_8").await, IdempotencyClaim::Run);
        }
    }
}
