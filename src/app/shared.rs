//! What this server may share with others: the accounts database (the data directory's SQLite
//! file, which only this server uses, or a Postgres database that others share) with its
//! instance row, heartbeat and the refunds of instances that died; and the image store (the
//! data directory, or a bucket).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::accounts::{redact_url, Accounts, Engine};
use crate::cli::SharedArgs;
use crate::store::{FileStore, ImageStore};

/// The longest presigned URL S3 accepts (SigV4): 7 days.
const MAX_PRESIGN: Duration = Duration::from_secs(7 * 24 * 3600);

/// The data directory's `files/`, or `--store s3://...` (whose bucket must answer now).
pub(super) async fn open_store(data_dir: &Path, args: &SharedArgs) -> anyhow::Result<ImageStore> {
    match args.store.as_deref() {
        None | Some("local") => {
            if args.presign.is_some() {
                bail!("--presign needs an S3 store (--store s3://BUCKET)");
            }
            let store = FileStore::open(data_dir)
                .with_context(|| format!("file store in {}", data_dir.display()))?;
            Ok(store.into())
        }
        Some(location) => {
            let presign = args.presign.map(|a| a.0);
            if presign.is_some_and(|p| p > MAX_PRESIGN) {
                bail!("--presign: at most 7d (the longest a presigned S3 URL may live)");
            }
            let store = ImageStore::s3(location, presign).await?;
            tracing::info!(
                location,
                presigned = presign.is_some(),
                "images go to the bucket"
            );
            Ok(store)
        }
    }
}

/// Open the accounts database and register this server as an instance of it. On the data
/// directory's SQLite file (locked by this process) every reservation left open was made by a
/// previous run of this server, so they are refunded at once; on a shared database only those of
/// instances that stopped heart-beating are, by the heartbeat task.
pub(super) async fn open_accounts(
    data_dir: &Path,
    database_url: Option<&str>,
) -> anyhow::Result<Accounts> {
    let accounts = match database_url {
        Some(url) => Accounts::connect(url)
            .await
            .with_context(|| format!("accounts database {}", redact_url(url)))?,
        None => Accounts::open(data_dir).await?,
    };
    if accounts.engine() == Engine::Sqlite {
        let refunded = accounts.refund_stale_reservations().await?;
        if refunded > 0 {
            tracing::warn!("refunded {refunded} request(s) left unfinished by the previous run");
        }
    }
    let accounts = accounts.register_instance().await?;
    tracing::info!(
        instance = accounts.instance_id().unwrap_or_default(),
        engine = ?accounts.engine(),
        "registered in the accounts database"
    );
    Ok(accounts)
}

/// Heart-beat every quarter of `timeout` (1 to 15 s) and refund the open reservations of the
/// instances silent for longer than `timeout`. Runs until the server stops.
pub(super) async fn heartbeat(accounts: Accounts, timeout: Duration) {
    let every = (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
    let timeout_secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
    loop {
        match accounts.heartbeat().await {
            Ok(true) => {}
            Ok(false) => tracing::error!(
                "this instance was declared dead by another (no heartbeat for over {}s): the \
                 credits of its requests of that time were refunded; registered again",
                timeout.as_secs()
            ),
            Err(e) => tracing::warn!("heartbeat failed: {e}"),
        }
        match accounts.reap_dead_instances(timeout_secs).await {
            Ok(r) if !r.instances.is_empty() => tracing::warn!(
                instances = ?r.instances,
                refunded = r.refunded,
                "refunded the open reservations of instance(s) that stopped heart-beating"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("checking for dead instances failed: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Leave the database: refund what this instance still holds (its scheduler has stopped) and
/// remove its row.
pub(super) async fn leave(accounts: &Accounts) {
    match accounts.deregister().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!("refunded {n} request(s) still open at shutdown"),
        Err(e) => tracing::warn!(
            "leaving the accounts database failed ({e}): another instance, or the next start, \
             refunds what is left"
        ),
    }
}
