//! Composition root: catalog -> data dir -> accounts + store -> scheduler (load + warm-up) ->
//! HTTP server, and graceful shutdown. Also the `keys` admin commands.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

mod shared;

use crate::accounts::{Accounts, KeyInfo, NewKey};
use crate::catalog::{Catalog, Pipeline};
use crate::cli::{AuthMode, KeysArgs, KeysCommand, ServeArgs, WeightsOverride};
use crate::http::{self, AppState, PublicUrl};
use crate::infer::{AuthPolicy, Facade, Generator, WorkerState};
use crate::scheduler::{
    self, Job, ProgressTx, SchedulerConfig, SchedulerHandle, SubmitError, Ticket,
};
use crate::store::ImageStore;

/// The scheduler as the facade's generator, with the state `GET /health` reports: `Stopped` from
/// the shutdown signal on or once the device thread is gone, `Ready` otherwise. (HTTP is served
/// only after the first pipeline is loaded and warm, so there is no loading state to report.)
struct DeviceWorker {
    scheduler: SchedulerHandle,
    stopping: AtomicBool,
}

impl Generator for DeviceWorker {
    fn worker_state(&self) -> WorkerState {
        if self.stopping.load(Ordering::SeqCst) || !self.scheduler.is_running() {
            WorkerState::Stopped
        } else {
            WorkerState::Ready
        }
    }
    fn submit(&self, job: Job, progress: Option<ProgressTx>) -> Result<Ticket, SubmitError> {
        self.scheduler.submit_with_progress(job, progress)
    }
    fn loaded_pipelines(&self) -> Vec<String> {
        self.scheduler.loaded_pipelines()
    }
    fn metrics_text(&self) -> String {
        self.scheduler.metrics_text()
    }
}

/// How long shutdown waits for outstanding refunds to reach the database.
const REFUND_WAIT: Duration = Duration::from_secs(10);

/// `--data-dir`, or the per-user data directory.
fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir),
        None => dirs::data_dir()
            .map(|d| d.join("diffusiond"))
            .context("no per-user data directory on this system: pass --data-dir"),
    }
}

pub fn load_catalog(path: Option<&std::path::Path>) -> anyhow::Result<Catalog> {
    Ok(match path {
        Some(p) => Catalog::from_file(p)?,
        None => Catalog::builtin()?,
    })
}

/// The pipelines the catalog uses, in the order its models first name them (the first is the
/// one loaded at start), with `--weights NAME=SOURCE` overriding their sources.
pub fn pipeline_configs(
    catalog: &Catalog,
    overrides: &[WeightsOverride],
) -> anyhow::Result<Vec<Pipeline>> {
    let mut configs: Vec<Pipeline> = Vec::new();
    for m in catalog.models() {
        if configs.iter().all(|c| c.name != m.pipeline) {
            if let Some(p) = catalog.pipeline(&m.pipeline) {
                configs.push(p.clone());
            }
        }
    }
    for o in overrides {
        let Some(c) = configs.iter_mut().find(|c| c.name == o.pipeline) else {
            let known: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "--weights '{}={}': no model of the catalog uses pipeline '{}' (pipelines: {})",
                o.pipeline,
                o.source,
                o.pipeline,
                known.join(", ")
            );
        };
        match &o.component {
            Some(component) => {
                c.components.insert(component.clone(), o.source.clone());
            }
            None => c.weights = o.source.clone(),
        }
    }
    Ok(configs)
}

/// `diffusiond serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let catalog = load_catalog(args.catalog.as_deref())?;
    let pipelines = pipeline_configs(&catalog, &args.weights)?;
    let data_dir = data_dir(args.data_dir.clone())?;

    // Bind first: a busy port fails before minutes of weight loading.
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    let mode = args.auth.unwrap_or(if bound.ip().is_loopback() {
        AuthMode::Open
    } else {
        AuthMode::Keys
    });

    // The lock first: no other server may be migrating or repairing the same database.
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let accounts = shared::open_accounts(&data_dir, args.shared.database_url.as_deref()).await?;
    let heartbeat = tokio::spawn(shared::heartbeat(
        accounts.clone(),
        args.shared.instance_timeout.0,
    ));
    let store = shared::open_store(&data_dir, &args.shared).await?;
    if let Some(age) = args.retention {
        tokio::spawn(retention(store.clone(), age.0));
    }

    let config = SchedulerConfig {
        pipelines,
        run: args.device.run_options(),
        devices: args.device.device.clone(),
        queue_capacity: args.queue_capacity,
        max_batch_images: args.max_batch_images,
        warmup: true,
        memory_budget: args.device.memory_budget.map(|b| b.0),
    };
    let names: Vec<&str> = config.pipelines.iter().map(|p| p.name.as_str()).collect();
    let devices: Vec<String> = config.devices.iter().map(|d| d.to_string()).collect();
    tracing::info!(pipelines = ?names, devices = ?devices, "loading the first pipeline and warming up on each device");
    let scheduler = tokio::task::spawn_blocking(move || scheduler::start(config)).await??;

    let policy = match mode {
        AuthMode::Open => AuthPolicy::Open,
        AuthMode::Keys => AuthPolicy::Keys(accounts.clone()),
    };
    let worker = Arc::new(DeviceWorker {
        scheduler: scheduler.clone(),
        stopping: AtomicBool::new(false),
    });
    let mut facade = Facade::new(catalog, policy, store, worker.clone())
        .with_admission_limit(args.queue_capacity)
        .with_idempotency(accounts.clone());
    if args.no_metadata {
        facade = facade.without_metadata();
    }
    let facade = Arc::new(facade);
    let web = web_policy(&args, mode, bound);
    let state = AppState::new(
        facade.clone(),
        PublicUrl::new(args.public_url.as_deref(), bound),
    )
    .with_web_policy(web)
    .with_metrics_auth(args.metrics_auth);
    let auth = match mode {
        AuthMode::Open => "open",
        AuthMode::Keys => "keys",
    };
    // Tests and scripts wait for this line (the port, when --listen ends in :0).
    println!(
        "diffusiond listening on http://{bound} (auth: {auth}, data dir: {})",
        data_dir.display()
    );
    tracing::info!(%bound, auth, data_dir = %data_dir.display(), "ready");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = http::Limits {
        max_connections: args.max_connections,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        write_timeout: Duration::from_secs(args.write_timeout),
    };
    let server = http::serve(listener, http::router(state), limits, async move {
        shutdown_signal().await;
        worker.stopping.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: finishing requests in flight");
        let _ = stop_tx.send(true);
    });
    let grace = Duration::from_secs(args.shutdown_timeout);
    let deadline = async move {
        if stop_rx.wait_for(|stop| *stop).await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let timed_out = tokio::select! {
        served = server => {
            served.context("HTTP server")?;
            false
        }
        () = deadline => {
            tracing::warn!("requests still in flight after {}s: stopping them at the next step (their credits are refunded)", grace.as_secs());
            true
        }
    };

    let s = scheduler.clone();
    if timed_out {
        tokio::task::spawn_blocking(move || s.abort()).await?;
    } else {
        tokio::task::spawn_blocking(move || s.shutdown()).await?;
    }
    // Wait for the refunds of the requests that failed or were dropped to reach the database;
    // the next start repairs any that do not within the limit.
    if tokio::time::timeout(REFUND_WAIT, facade.reservations_resolved())
        .await
        .is_err()
    {
        tracing::warn!(
            "refunds still pending after {}s: the next start makes them",
            REFUND_WAIT.as_secs()
        );
    }
    heartbeat.abort();
    shared::leave(&accounts).await;
    accounts.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Delete stored images older than `max_age`, checking every `max_age / 4` (1 s to 5 min).
async fn retention(store: ImageStore, max_age: Duration) {
    let every = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    tracing::info!(
        max_age_s = max_age.as_secs(),
        "retention on: older images are deleted"
    );
    loop {
        match store.remove_older_than(max_age).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(requests = n, "retention: deleted old images"),
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Host names are checked in open mode on a loopback address (what a DNS-rebinding page
/// reaches); cross-origin callers are refused in every mode unless `--cors-origin` lists them.
fn web_policy(args: &ServeArgs, mode: AuthMode, bound: std::net::SocketAddr) -> http::WebPolicy {
    let allowed_hosts = (mode == AuthMode::Open && bound.ip().is_loopback()).then(|| {
        let listen = match bound.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|h| h.to_string())
            .chain([listen])
            .chain(
                args.allowed_hosts
                    .iter()
                    .map(|h| http::WebPolicy::host_name(h)),
            )
            .collect();
        if let Some(url) = &args.public_url {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or(rest);
            hosts.push(http::WebPolicy::host_name(authority));
        }
        hosts
    });
    http::WebPolicy {
        allowed_hosts,
        cors_origins: args
            .cors_origin
            .iter()
            .map(|o| o.trim_end_matches('/').to_string())
            .collect(),
    }
}

/// Hold an OS lock (flock) on the data directory itself for the server's lifetime: at start a
/// server refunds reservations left open, which is only right if no other server is using the
/// same data directory. The directory is locked rather than a `serve.lock` file in it, so that
/// deleting a file cannot let a second server in; the lock goes with the process, however it
/// ends. (The `keys` commands do not take it.)
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let handle = std::fs::File::open(dir)
        .with_context(|| format!("cannot open the data directory {}", dir.display()))?;
    match handle.try_lock() {
        Ok(()) => Ok(handle),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `diffusiond serve` is using the data directory {}",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", dir.display()))
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `diffusiond keys ...`.
pub async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let dir = data_dir(args.data_dir)?;
    // Only `create` may start a database; the others on a mistyped --data-dir must fail, not
    // create an empty one there.
    let accounts = match (&args.database_url, &args.command) {
        (Some(url), _) => Accounts::connect(url)
            .await
            .with_context(|| format!("accounts database {}", crate::accounts::redact_url(url)))?,
        (None, KeysCommand::Create { .. }) => Accounts::open(&dir).await?,
        (None, _) => Accounts::open_existing(&dir).await?,
    };
    let result = run_keys(&accounts, args.command).await;
    accounts.close().await;
    result
}

async fn run_keys(accounts: &Accounts, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            credits,
            daily_quota,
            name,
        } => {
            let created = accounts
                .create_key(NewKey {
                    name,
                    credits,
                    daily_quota,
                })
                .await?;
            println!("{}", describe(&created.info));
            println!("This key is shown only once; only its hash is stored:");
            println!("{}", created.secret);
        }
        KeysCommand::List => {
            let keys = accounts.list_keys().await?;
            println!(
                "{:<17} {:<11} {:>12} {:>12} {:>10} {:<8} name",
                "id", "key", "balance", "daily_quota", "used_today", "status"
            );
            for k in &keys {
                let quota = k.daily_quota.map_or("-".to_string(), |q| q.to_string());
                let status = if k.revoked { "revoked" } else { "active" };
                println!(
                    "{:<17} {:<11} {:>12} {:>12} {:>10} {:<8} {}",
                    k.id,
                    format!("{}...", k.prefix),
                    k.balance,
                    quota,
                    k.used_today,
                    status,
                    k.name.escape_debug()
                );
            }
        }
        KeysCommand::Revoke { key } => {
            let info = accounts.revoke(&key).await?;
            println!("revoked {}", describe(&info));
        }
        KeysCommand::AddCredits { key, credits } => {
            let info = accounts.add_credits(&key, credits).await?;
            println!("added {credits} credits: {}", describe(&info));
        }
    }
    Ok(())
}

fn describe(k: &KeyInfo) -> String {
    let quota = k
        .daily_quota
        .map_or("no daily quota".to_string(), |q| format!("daily quota {q}"));
    let name = if k.name.is_empty() {
        String::new()
    } else {
        format!(" '{}'", k.name.escape_debug())
    };
    let revoked = if k.revoked { ", revoked" } else { "" };
    format!(
        "key {}{name} ({}...): balance {} credits, {quota}{revoked}",
        k.id, k.prefix, k.balance
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Issue 15, finding 7: the lock was a `serve.lock` file; with it deleted, a second server
    /// created a new one, locked that, and ran beside the first on the same data directory.
    #[test]
    fn the_data_dir_lock_survives_deleting_files() {
        let dir = tempfile::tempdir().unwrap();
        let held = super::lock_data_dir(dir.path()).unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        let second = super::lock_data_dir(dir.path());
        let message = format!("{:#}", second.unwrap_err());
        assert!(message.contains("another `diffusiond serve`"), "{message}");
        drop(held);
        super::lock_data_dir(dir.path()).unwrap();
    }
}
