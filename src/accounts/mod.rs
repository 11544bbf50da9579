//! Accounts: API keys, credit balances and daily quotas, through sqlx's `Any` driver on one of
//! two engines: an embedded SQLite file (`<data-dir>/accounts.db`, the default: one server per
//! data directory) or Postgres (`--database-url postgres://...`: any number of servers share
//! it). The only module that touches the database.
//!
//! The queries are plain SQL with `$N` parameters that both engines run unchanged; what differs
//! per engine lives in [`Engine`] (the write transaction's `BEGIN`, the database clock, which
//! error codes mean "cannot write now") and in the two migration directories.

mod health;
mod idempotency;
mod instances;
mod keys;
mod ledger;
pub mod quota;
mod write;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

use self::health::WriteHealth;
use self::write::WriteTx;

pub use idempotency::IdempotencyClaim;
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

/// The database engine behind an [`Accounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded file in the data directory: one server at a time.
    Sqlite,
    /// A Postgres server: any number of servers at once.
    Postgres,
}

impl Engine {
    /// The statement that opens a write transaction. SQLite: take the write lock at once, so
    /// concurrent writers wait on the busy timeout instead of failing on a stale read snapshot.
    /// Postgres: read committed; every write is a conditional single-row UPDATE or upsert, which
    /// re-checks its condition on the locked row, and every transaction locks a key's rows in the
    /// same order (daily_usage, api_keys, charges), so none can deadlock another.
    fn begin(self) -> &'static str {
        match self {
            Engine::Sqlite => "BEGIN IMMEDIATE",
            Engine::Postgres => "BEGIN",
        }
    }

    /// The database's clock in unix seconds, as an SQL expression (heartbeats compare with it,
    /// so servers whose clocks disagree still agree on who is dead).
    fn now_sql(self) -> &'static str {
        match self {
            Engine::Sqlite => "CAST(strftime('%s', 'now') AS BIGINT)",
            Engine::Postgres => "CAST(EXTRACT(EPOCH FROM now()) AS BIGINT)",
        }
    }
}

/// Handle to the accounts database (cheap to clone).
#[derive(Debug, Clone)]
pub struct Accounts {
    pool: AnyPool,
    engine: Engine,
    /// Whether the last write reached the disk (what `/health` reports).
    health: Arc<WriteHealth>,
    /// The server instance whose reservations these are (`None` in the `keys` commands).
    instance: Option<Arc<str>>,
}

impl Accounts {
    /// Open (creating if needed) the SQLite database in `data_dir` and apply the migrations. WAL
    /// mode and a busy timeout let the `keys` CLI and the server use it at the same time.
    pub async fn open(data_dir: &Path) -> Result<Self, AccountsError> {
        Self::open_with(data_dir, &[]).await
    }

    /// Open the SQLite database only if it exists (the `keys` commands that read or change keys:
    /// a mistyped `--data-dir` must fail, not create an empty database).
    pub async fn open_existing(data_dir: &Path) -> Result<Self, AccountsError> {
        let path = data_dir.join(DB_FILE);
        if !path.is_file() {
            return Err(AccountsError::NoDatabase(path));
        }
        Self::open_with(data_dir, &[]).await
    }

    /// Connect to a Postgres database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=...]`)
    /// and apply its migrations; several servers may do so at once (the migrations take an
    /// advisory lock).
    pub async fn connect(url: &str) -> Result<Self, AccountsError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(AccountsError::InvalidArgument(format!(
                "--database-url must be a postgres:// URL (got '{}'); without it the SQLite \
                 file in the data directory is used",
                redact_url(url)
            )));
        }
        sqlx::any::install_default_drivers();
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self::with_pool(pool, Engine::Postgres))
    }

    /// [`Accounts::open`] with more pragmas on every connection (tests: a page limit that makes
    /// the database "full").
    pub(crate) async fn open_with(
        data_dir: &Path,
        pragmas: &[(&'static str, &'static str)],
    ) -> Result<Self, AccountsError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AccountsError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        create_private(&path).map_err(|source| AccountsError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        sqlx::any::install_default_drivers();
        // An absolute path: in a URL, the first part of a relative one would read as a host name.
        let absolute = std::fs::canonicalize(&path).map_err(|source| AccountsError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let url = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&absolute)
            .to_url_lossy();
        let options = AnyConnectOptions::from_str(url.as_str())?;
        let setup: Vec<String> = [
            ("journal_mode", "WAL"),
            ("synchronous", "FULL"),
            ("foreign_keys", "ON"),
            ("busy_timeout", "10000"),
        ]
        .iter()
        .chain(pragmas)
        .map(|(k, v)| format!("PRAGMA {k} = {v}"))
        .collect();
        let setup = Arc::new(setup);
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(move |conn, _meta| {
                let setup = setup.clone();
                Box::pin(async move {
                    for pragma in setup.iter() {
                        conn.execute(pragma.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self::with_pool(pool, Engine::Sqlite))
    }

    fn with_pool(pool: AnyPool, engine: Engine) -> Self {
        Self {
            pool,
            engine,
            health: Arc::default(),
            instance: None,
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Close the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction (see [`Engine::begin`]). End it with [`Accounts::finish`].
    async fn begin_write(&self) -> Result<WriteTx, AccountsError> {
        WriteTx::begin(&self.pool, self.engine.begin())
            .await
            .map_err(|e| {
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

/// A database URL as it may be logged: without its password.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".to_string(),
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

    #[test]
    fn database_urls_are_logged_without_their_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.internal:5432/ledger"),
            "postgres://app:***@db.internal:5432/ledger"
        );
        assert_eq!(
            redact_url("postgres://db.internal/ledger"),
            "postgres://db.internal/ledger"
        );
        assert_eq!(redact_url("not a url s3cret"), "(not a URL)");
    }

    #[tokio::test]
    async fn only_postgres_urls_are_taken() {
        let e = Accounts::connect("mysql://u:s3cret@h/db")
            .await
            .unwrap_err();
        let message = e.to_string();
        assert!(message.contains("postgres://"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
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

    /// What keeps a test database alive: a temporary directory, or a Postgres database.
    #[allow(dead_code)] // held, never read
    pub enum Guard {
        Dir(tempfile::TempDir),
        Postgres(crate::test_services::postgres::Database),
    }

    /// A fresh database on each engine this machine has: SQLite always, Postgres when its
    /// binaries are installed (else the test says so loudly, and fails under CI=true).
    pub async fn each_engine() -> Vec<(Guard, Accounts)> {
        let (dir, sqlite) = open_temp().await;
        let mut engines = vec![(Guard::Dir(dir), sqlite)];
        if let Some(db) = crate::test_services::postgres::database("accounts unit tests") {
            let acc = Accounts::connect(&db.url).await.unwrap();
            engines.push((Guard::Postgres(db), acc));
        }
        engines
    }

    /// A key with `credits` and `quota`, authenticated.
    pub async fn key(acc: &Accounts, credits: i64, quota: Option<i64>) -> Account {
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

    /// A database limited to 48 pages on every connection (`PRAGMA max_page_count`): a disk
    /// that fills up, without needing a small file system.
    pub async fn open_small(dir: &Path) -> Accounts {
        Accounts::open_with(dir, &[("max_page_count", "48")])
            .await
            .unwrap()
    }

    /// Fill the database with rows that [`free_space`] deletes, until it is full.
    pub async fn fill_up(acc: &Accounts) {
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (x TEXT NOT NULL)")
            .execute(&acc.pool)
            .await
            .unwrap();
        while sqlx::query("INSERT INTO filler (x) VALUES ($1)")
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
