//! Accounts: API keys, credit balances and daily quotas in an embedded SQLite database
//! (`<data-dir>/accounts.db`), through sqlx. The only module that touches the database.
//!
//! The queries are plain SQL with no SQLite-only functions, so they can move to Postgres; the one
//! SQLite-specific statement is `BEGIN IMMEDIATE` in [`Accounts::begin_write`].

mod keys;
mod ledger;
pub mod quota;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

pub use keys::{KeyInfo, NewKey};
pub use ledger::Reservation;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "accounts.db";

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("accounts database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("accounts database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key is unknown")]
    UnknownKey,
    #[error("the API key has been revoked")]
    RevokedKey,
    #[error("no key has the ID or value '{0}'")]
    NotFound(String),
    #[error("this request costs {needed} credits but the key's balance is {balance}")]
    InsufficientCredits { needed: i64, balance: i64 },
    #[error("the key's daily quota of {quota} requests is used up")]
    QuotaExceeded { quota: i64, retry_after_secs: u64 },
    #[error("{0}")]
    InvalidArgument(String),
}

/// A key that passed authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    /// Requests per UTC day at most; `None` is unlimited.
    pub daily_quota: Option<i64>,
}

/// Handle to the accounts database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Accounts {
    pool: SqlitePool,
}

impl Accounts {
    /// Open (creating if needed) the database in `data_dir` and apply the migrations. WAL mode and
    /// a busy timeout let the `keys` CLI and the server use it at the same time.
    pub async fn open(data_dir: &Path) -> Result<Self, AccountsError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AccountsError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(data_dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Close the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that takes the write lock at once, so concurrent writers wait on the busy
    /// timeout instead of failing on a stale read snapshot. (Postgres: a plain `BEGIN`; every
    /// write below is a conditional single-row UPDATE, which is atomic there too.)
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }
}

/// Seconds since the Unix epoch, as stored in the database.
fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(test)]
pub(crate) mod test_util {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub async fn open_temp() -> (tempfile::TempDir, Accounts) {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(dir.path()).await.unwrap();
        (dir, accounts)
    }
}
