//! Servers sharing one database: each is an instance with an ID and a heartbeat row, every
//! reservation names the instance that made it, and a live instance refunds the open
//! reservations of one whose heartbeat is older than the timeout (killed, machine lost). The
//! refund flips each charge from `reserved` once ([`super::ledger`]), so two instances reaping
//! the same dead one at once refund each reservation exactly once; an instance that is alive
//! heart-beats, so nothing it is still generating is refunded. Heartbeats use the database's
//! clock, so servers whose clocks disagree still agree on who is dead.

use rand::distr::{Alphanumeric, SampleString};
use sqlx::Row;

use super::{Accounts, AccountsError};

const INSTANCE_PREFIX: &str = "inst_";

/// What one pass of [`Accounts::reap_dead_instances`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Instances found dead (and removed).
    pub instances: Vec<String>,
    /// Reservations of theirs this pass refunded.
    pub refunded: usize,
}

impl Accounts {
    /// Register a new instance (a fresh ID and a heartbeat now); later reservations made through
    /// the returned handle name it.
    pub async fn register_instance(&self) -> Result<Accounts, AccountsError> {
        let id = format!(
            "{INSTANCE_PREFIX}{}",
            Alphanumeric.sample_string(&mut rand::rng(), 12)
        );
        let now = self.engine.now_sql();
        sqlx::query(&format!(
            "INSERT INTO instances (id, started_at, heartbeat_at) VALUES ($1, {now}, {now})"
        ))
        .bind(&id)
        .execute(&self.pool)
        .await?;
        let mut handle = self.clone();
        handle.instance = Some(id.into());
        Ok(handle)
    }

    /// This handle's instance ID, if it is a registered instance.
    pub fn instance_id(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// Mark this instance alive now. If another instance has already declared it dead (its
    /// heartbeat was older than the timeout: a stalled process, a database it could not reach),
    /// its reservations of that time were refunded; it registers again under the same ID and
    /// says so (`Ok(false)`).
    pub async fn heartbeat(&self) -> Result<bool, AccountsError> {
        let Some(id) = self.instance.as_deref() else {
            return Ok(true);
        };
        let now = self.engine.now_sql();
        let beat = sqlx::query(&format!(
            "UPDATE instances SET heartbeat_at = {now} WHERE id = $1"
        ))
        .bind(id)
        .execute(&self.pool)
        .await;
        if self.health.note(beat)?.rows_affected() == 1 {
            return Ok(true);
        }
        sqlx::query(&format!(
            "INSERT INTO instances (id, started_at, heartbeat_at) VALUES ($1, {now}, {now})"
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(false)
    }

    /// Refund the open reservations of every instance whose heartbeat is more than
    /// `timeout_secs` old, then remove it. Safe to run from every instance at once.
    pub async fn reap_dead_instances(&self, timeout_secs: i64) -> Result<Reaped, AccountsError> {
        let now = self.engine.now_sql();
        let dead: Vec<String> = sqlx::query(&format!(
            "SELECT id FROM instances WHERE heartbeat_at < {now} - $1 ORDER BY id"
        ))
        .bind(timeout_secs)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<Result<_, _>>()?;
        let mut reaped = Reaped::default();
        for id in dead {
            if self.instance.as_deref() == Some(id.as_str()) {
                continue; // ourselves, stalled: the next heartbeat fixes it
            }
            reaped.refunded += self.refund_instance(&id).await?;
            self.abandon_instance_idempotency(&id).await?;
            // Removed only if still dead: one that heart-beat meanwhile keeps its row.
            sqlx::query(&format!(
                "DELETE FROM instances WHERE id = $1 AND heartbeat_at < {now} - $2"
            ))
            .bind(&id)
            .bind(timeout_secs)
            .execute(&self.pool)
            .await?;
            reaped.instances.push(id);
        }
        Ok(reaped)
    }

    /// Leave: refund what this instance still holds (called after its scheduler has stopped,
    /// so nothing of it runs any more) and remove its row. If the refunds fail the row stays,
    /// goes stale, and another instance (or this one's next start, on SQLite) refunds them.
    pub async fn deregister(&self) -> Result<usize, AccountsError> {
        let Some(id) = self.instance.as_deref() else {
            return Ok(0);
        };
        let refunded = self.refund_instance(id).await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(refunded)
    }

    async fn refund_instance(&self, id: &str) -> Result<usize, AccountsError> {
        let rows = sqlx::query(
            "SELECT request_id, key_id, credits, day FROM charges \
             WHERE instance_id = $1 AND status = 'reserved'",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        self.refund_rows(&rows).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use chrono::Utc;

    use super::super::test_util::{each_engine, key};
    use super::*;

    #[tokio::test]
    async fn a_dead_instance_is_refunded_once_and_a_live_one_never() {
        for (_guard, acc) in each_engine().await {
            let a = key(&acc, 1000, Some(10)).await;
            let dead = acc.register_instance().await.unwrap();
            let live = acc.register_instance().await.unwrap();
            dead.reserve(&a, "req_dead", 100, Utc::now()).await.unwrap();
            live.reserve(&a, "req_live", 100, Utc::now()).await.unwrap();
            // Within the timeout nobody is dead.
            assert_eq!(
                live.reap_dead_instances(60).await.unwrap(),
                Reaped::default()
            );
            // The dead one stops heart-beating; the live one keeps going.
            tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
            live.heartbeat().await.unwrap();
            // Two live reapers at once: each reservation is refunded exactly once.
            let other = acc.register_instance().await.unwrap();
            let (r1, r2) = tokio::join!(live.reap_dead_instances(1), other.reap_dead_instances(1));
            let (r1, r2) = (r1.unwrap(), r2.unwrap());
            assert_eq!(r1.refunded + r2.refunded, 1, "{r1:?} {r2:?}");
            let dead_id = dead.instance_id().unwrap().to_string();
            assert!(r1.instances.contains(&dead_id) || r2.instances.contains(&dead_id));
            assert!(!r1
                .instances
                .contains(&live.instance_id().unwrap().to_string()));
            let info = acc.key_info(&a.id).await.unwrap();
            assert_eq!(
                (info.balance, info.used_today),
                (900, 1),
                "only the dead one refunded"
            );
            assert_eq!(live.reap_dead_instances(1).await.unwrap().refunded, 0);

            // A declared-dead instance that comes back registers again and says so.
            assert!(!dead.heartbeat().await.unwrap());
            assert!(dead.heartbeat().await.unwrap());

            // Leaving refunds what the instance still holds.
            assert_eq!(live.deregister().await.unwrap(), 1);
            let info = acc.key_info(&a.id).await.unwrap();
            assert_eq!((info.balance, info.used_today), (1000, 0));
        }
    }
}
