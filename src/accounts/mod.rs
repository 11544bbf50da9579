//! Accounts: API keys, credit balances and daily quotas in an embedded SQLite database
//! (`<data-dir>/accounts.db`), through sqlx. The only module that touches the database.
//!
//! The queries are plain SQL with no SQLite-only functions, so they can move to Postgres; the one
//! SQLite-specific statement is `BEGIN IMMEDIATE` in [`write::WriteTx`].

mod health;
mod keys;
mod ledger;
pub mod quota;
mod write;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use self::health::WriteHealth;
use self::write::WriteTx;

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
    #[error("no accounts database at {0} (check --data-dir: the server creates it when it first starts)")]
    NoDatabase(PathBuf),
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
    /// Whether the last write reached the disk (what `/health` reports).
    health: Arc<WriteHealth>,
}

impl Accounts {
    /// Open (creating if needed) the database in `data_dir` and apply the migrations. WAL mode and
    /// a busy timeout let the `keys` CLI and the server use it at the same time.
    pub async fn open(data_dir: &Path) -> Result<Self, AccountsError> {
        Self::open_with(data_dir, |o| o).await
    }

    /// Open the database only if it exists (the `keys` commands that read or change keys: a
    /// mistyped `--data-dir` must fail, not create an empty database).
    pub async fn open_existing(data_dir: &Path) -> Result<Self, AccountsError> {
        let path = data_dir.join(DB_FILE);
        if !path.is_file() {
            return Err(AccountsError::NoDatabase(path));
        }
        Self::open_with(data_dir, |o| o.create_if_missing(false)).await
    }

    /// [`Accounts::open`] with the connection options adjusted (tests: a page limit that makes
    /// the database "full").
    pub(crate) async fn open_with(
        data_dir: &Path,
        adjust: impl FnOnce(SqliteConnectOptions) -> SqliteConnectOptions,
    ) -> Result<Self, AccountsError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AccountsError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        create_private(&data_dir.join(DB_FILE)).map_err(|source| AccountsError::DataDir {
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
            .connect_with(adjust(options))
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self {
            pool,
            health: Arc::default(),
        })
    }

    /// Close the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that takes the write lock at once, so concurrent writers wait on the busy
    /// timeout instead of failing on a stale read snapshot. (Postgres: a plain `BEGIN`; every
    /// write below is a conditional single-row UPDATE, which is atomic there too.) End it with
    /// [`Accounts::finish`].
    async fn begin_write(&self) -> Result<WriteTx, AccountsError> {
        WriteTx::begin(&self.pool).await.map_err(|e| {
            self.health.note_error(&e);
            AccountsError::Db(e)
        })
    }

    /// Commit `tx` if `outcome` is a success, else roll it back; a connection whose state is then
    /// unknown is closed, never returned to the pool. A failure to write is recorded for
    /// `/health`, a commit clears it.
    async fn finish<T>(
        &self,
        tx: WriteTx,
        outcome: Result<T, AccountsError>,
    ) -> Result<T, AccountsError> {
        match outcome {
            Ok(value) => {
                self.health.note(tx.commit().await)?;
                Ok(value)
            }
            Err(e) => {
                tx.rollback().await;
                if let AccountsError::Db(db) = &e {
                    self.health.note_error(db);
                }
                Err(e)
            }
        }
    }

    /// `Ok` while the database takes writes; else why not. Once a write has failed, each call
    /// tries a small real write (one that needs fresh pages) until one succeeds, so freeing space
    /// is noticed without waiting for a request.
    pub async fn check_writable(&self) -> Result<(), String> {
        if self.health.failure().is_none() {
            return Ok(());
        }
        let probe = async {
            let mut tx = self.begin_write().await?;
            let outcome = health::probe(&mut tx).await;
            self.finish(tx, outcome).await
        };
        match probe.await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.health.failure().unwrap_or_else(|| e.to_string())),
        }
    }
}

/// Create an empty database file readable by its owner only (0600), unless it exists: it holds
/// the key hashes and balances. SQLite gives its -wal and -shm files the same mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Seconds since the Unix epoch, as stored in the database.
fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Finding 5 of issue 15: the database was created with the umask's mode (0644).
    #[tokio::test]
    async fn the_database_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let acc = Accounts::open(dir.path()).await.unwrap();
        acc.create_key(NewKey {
            name: String::new(),
            credits: 1,
            daily_quota: None,
        })
        .await
        .unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{:?}", entry.file_name());
        }
    }

    #[tokio::test]
    async fn open_existing_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = Accounts::open_existing(dir.path()).await.unwrap_err();
        assert!(matches!(e, AccountsError::NoDatabase(_)), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        Accounts::open(dir.path()).await.unwrap().close().await;
        Accounts::open_existing(dir.path()).await.unwrap();
    }
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

    /// A database limited to 48 pages on every connection (`PRAGMA max_page_count`): a disk
    /// that fills up, without needing a small file system.
    pub async fn open_small(dir: &Path) -> Accounts {
        Accounts::open_with(dir, |o| o.pragma("max_page_count", "48"))
            .await
            .unwrap()
    }

    /// Fill the database with rows that [`free_space`] deletes, until it is full.
    pub async fn fill_up(acc: &Accounts) {
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (x TEXT NOT NULL)")
            .execute(&acc.pool)
            .await
            .unwrap();
        while sqlx::query("INSERT INTO filler (x) VALUES (?)")
            .bind("f".repeat(2000))
            .execute(&acc.pool)
            .await
            .is_ok()
        {}
    }

    pub async fn free_space(acc: &Accounts) {
        sqlx::query("DELETE FROM filler")
            .execute(&acc.pool)
            .await
            .unwrap();
    }
}
