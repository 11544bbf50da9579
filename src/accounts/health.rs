//! Whether the database takes writes, as the last write found it: what `/health` reports.

use std::sync::Mutex;

use super::write::WriteTx;
use super::AccountsError;

/// SQLite's primary result codes that mean "the database cannot be written now" (as opposed to a
/// refused row): BUSY, LOCKED, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
const STORAGE_CODES: [i64; 9] = [5, 6, 8, 10, 11, 13, 14, 15, 26];

/// Bytes the health probe writes (and deletes in the same transaction): two pages' worth, so it
/// fails while the database cannot grow.
const PROBE_BYTES: usize = 8192;

#[derive(Debug, Default)]
pub(super) struct WriteHealth {
    /// Why the last write failed; `None` after a write that committed.
    failure: Mutex<Option<String>>,
}

impl WriteHealth {
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().map(|f| f.clone()).unwrap_or(None)
    }

    /// Record the outcome of a write (a commit, or a begin).
    pub fn note<T>(&self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        match &result {
            Ok(_) => self.set(None),
            Err(e) => self.note_error(e),
        }
        result
    }

    /// Record a failed write, if it failed for a reason of the database rather than of the row.
    pub fn note_error(&self, e: &sqlx::Error) {
        if is_storage_failure(e) {
            tracing::error!("the accounts database cannot be written: {e}");
            self.set(Some(format!(
                "the accounts database cannot be written: {e}"
            )));
        }
    }

    fn set(&self, value: Option<String>) {
        if let Ok(mut f) = self.failure.lock() {
            *f = value;
        }
    }
}

/// Postgres SQLSTATE classes (and codes) that mean "the database cannot be written now":
/// connection exception, insufficient resources (disk full, out of memory, too many
/// connections), operator intervention (shutdown), system error (I/O), internal error, and a
/// read-only transaction (a standby, or `default_transaction_read_only`).
const PG_STORAGE_PREFIXES: [&str; 6] = ["08", "53", "57", "58", "XX", "25006"];

fn is_storage_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else {
                return false;
            };
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                PG_STORAGE_PREFIXES.iter().any(|p| code.starts_with(p))
            } else {
                code.parse::<i64>()
                    .is_ok_and(|code| STORAGE_CODES.contains(&(code & 0xff)))
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// A write that needs fresh pages and leaves nothing behind (the caller commits it).
pub(super) async fn probe(tx: &mut WriteTx) -> Result<(), AccountsError> {
    sqlx::query("INSERT INTO write_probe (id, filler) VALUES (1, $1)")
        .bind("x".repeat(PROBE_BYTES))
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM write_probe")
        .execute(&mut **tx)
        .await?;
    Ok(())
}
