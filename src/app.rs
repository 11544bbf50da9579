//! Composition root: catalog -> data dir -> accounts + store -> scheduler (load + warm-up) ->
//! HTTP server, and graceful shutdown. Also the `keys` admin commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::accounts::{Accounts, KeyInfo, NewKey};
use crate::catalog::Catalog;
use crate::cli::{AuthMode, KeysArgs, KeysCommand, ServeArgs};
use crate::http::{self, AppState, PublicUrl};
use crate::infer::{AuthPolicy, Facade, Generator};
use crate::scheduler::{
    self, Job, PipelineConfig, ProgressTx, SchedulerConfig, SchedulerHandle, SubmitError, Ticket,
};
use crate::store::FileStore;

impl Generator for SchedulerHandle {
    fn submit(&self, job: Job, progress: Option<ProgressTx>) -> Result<Ticket, SubmitError> {
        SchedulerHandle::submit_with_progress(self, job, progress)
    }
    fn loaded_pipelines(&self) -> Vec<String> {
        SchedulerHandle::loaded_pipelines(self)
    }
    fn metrics_text(&self) -> String {
        SchedulerHandle::metrics_text(self)
    }
}

/// `--data-dir`, or the per-user data directory.
fn data_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir),
        None => dirs::data_dir()
            .map(|d| d.join("diffusiond"))
            .context("no per-user data directory on this system: pass --data-dir"),
    }
}

fn load_catalog(path: Option<&std::path::Path>) -> anyhow::Result<Catalog> {
    Ok(match path {
        Some(p) => Catalog::from_file(p)?,
        None => Catalog::builtin()?,
    })
}

/// The pipelines the catalog uses, with `--weights NAME=SOURCE` overriding their sources.
fn pipeline_configs(
    catalog: &Catalog,
    overrides: &[String],
) -> anyhow::Result<Vec<PipelineConfig>> {
    let mut configs: Vec<PipelineConfig> = catalog
        .used_pipelines()
        .into_iter()
        .map(|p| PipelineConfig {
            name: p.name.clone(),
            source: p.weights.clone(),
        })
        .collect();
    for o in overrides {
        let Some((name, source)) = o.split_once('=') else {
            bail!("--weights '{o}': expected PIPELINE=SOURCE");
        };
        let Some(c) = configs.iter_mut().find(|c| c.name == name) else {
            let known: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
            bail!(
                "--weights '{o}': no model of the catalog uses pipeline '{name}' (pipelines: {})",
                known.join(", ")
            );
        };
        c.source = source.to_string();
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

    let accounts = Accounts::open(&data_dir).await?;
    let _lock = lock_data_dir(&data_dir)?;
    let refunded = accounts.refund_stale_reservations().await?;
    if refunded > 0 {
        tracing::warn!("refunded {refunded} request(s) left unfinished by the previous run");
    }
    let store = FileStore::open(&data_dir)
        .with_context(|| format!("file store in {}", data_dir.display()))?;

    let config = SchedulerConfig {
        pipelines,
        device: args.device.device.clone(),
        dtype: args.device.dtype.clone(),
        queue_capacity: args.queue_capacity.max(1),
        max_batch_images: args.max_batch_images.max(1),
        warmup: true,
        offload_text_encoder: args.device.offload_text_encoder,
    };
    tracing::info!(pipelines = ?config.pipelines, device = %config.device, "loading pipelines and warming up");
    let scheduler = tokio::task::spawn_blocking(move || scheduler::start(config)).await??;

    let policy = match mode {
        AuthMode::Open => AuthPolicy::Open,
        AuthMode::Keys => AuthPolicy::Keys(accounts.clone()),
    };
    let mut facade = Facade::new(catalog, policy, store, Arc::new(scheduler.clone()));
    if args.no_metadata {
        facade = facade.without_metadata();
    }
    let state = AppState::new(
        Arc::new(facade),
        PublicUrl::new(args.public_url.as_deref(), bound),
    );
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
    let server = axum::serve(listener, http::router(state)).with_graceful_shutdown(async move {
        shutdown_signal().await;
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
    tokio::select! {
        served = server => served.context("HTTP server")?,
        () = deadline => tracing::warn!("requests still in flight after {}s: dropping them (their credits are refunded)", grace.as_secs()),
    }

    let s = scheduler.clone();
    tokio::task::spawn_blocking(move || s.shutdown()).await?;
    // Let refunds spawned by dropped requests reach the database; the next start repairs any that
    // do not.
    tokio::time::sleep(Duration::from_millis(200)).await;
    accounts.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Hold `<data-dir>/serve.lock` for the server's lifetime: at start a server refunds reservations
/// left open, which is only right if no other server is using the same data directory. (The
/// `keys` commands do not take it.)
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `diffusiond serve` is using the data directory {}",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
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
    let accounts = Accounts::open(&dir).await?;
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
                    k.name
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
        format!(" '{}'", k.name)
    };
    let revoked = if k.revoked { ", revoked" } else { "" };
    format!(
        "key {}{name} ({}...): balance {} credits, {quota}{revoked}",
        k.id, k.prefix, k.balance
    )
}
