//! One write transaction on one pooled connection, ended explicitly.
//!
//! sqlx's own `Transaction` rolls back lazily: on drop it queues a `ROLLBACK` that runs when the
//! connection is next used. When SQLite has already rolled the transaction back by itself (it
//! does on `SQLITE_FULL` and some I/O errors), that queued `ROLLBACK` fails, sqlx keeps counting
//! the transaction as open, and the connection goes back to the pool unable to begin another one:
//! every later write on it fails until a restart. Here the transaction is plain SQL (`BEGIN
//! IMMEDIATE` on SQLite, `BEGIN` on Postgres / `COMMIT` / `ROLLBACK`, so sqlx never counts it),
//! every end is awaited, and a connection whose state is not known for certain is closed instead
//! of reused. (On Postgres a failed statement leaves the transaction aborted until `ROLLBACK`,
//! which this sends; a connection lost mid-transaction is closed.)

use std::ops::{Deref, DerefMut};

use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};

/// An open write transaction. End it with [`WriteTx::commit`] or [`WriteTx::rollback`]; dropped
/// unfinished (a cancelled request), its connection is closed, which rolls it back.
pub(super) struct WriteTx {
    conn: Option<PoolConnection<Any>>,
}

impl WriteTx {
    pub async fn begin(pool: &AnyPool, begin: &'static str) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        match sqlx::query(begin).execute(&mut *conn).await {
            Ok(_) => Ok(Self { conn: Some(conn) }),
            Err(e) => {
                // A BEGIN that failed started nothing, but what failed it (I/O) may have left the
                // connection unusable: do not pool it again.
                close(conn).await;
                Err(e)
            }
        }
    }

    /// Commit. On failure the transaction is rolled back (or the connection closed).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                roll_back(conn).await;
                Err(e)
            }
        }
    }

    /// Roll back. Never fails: a connection that cannot be rolled back is closed.
    pub async fn rollback(mut self) {
        if let Some(conn) = self.conn.take() {
            roll_back(conn).await;
        }
    }
}

/// `ROLLBACK`, and the connection goes back to the pool only if that worked: if it failed, either
/// SQLite had already rolled back (fine) or the connection is broken (not fine), and which one
/// is not worth guessing.
async fn roll_back(mut conn: PoolConnection<Any>) {
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
        tracing::warn!("accounts database: ROLLBACK failed ({e}); closing that connection");
        close(conn).await;
    }
}

async fn close(conn: PoolConnection<Any>) {
    if let Err(e) = conn.close().await {
        tracing::warn!("accounts database: closing a connection failed: {e}");
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.conn {
            // Unfinished: closing the connection is what rolls the transaction back.
            conn.close_on_drop();
        }
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match &self.conn {
            Some(conn) => conn,
            // `conn` is taken only by the methods that consume `self`.
            None => unreachable!("WriteTx used after it ended"),
        }
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("WriteTx used after it ended"),
        }
    }
}
