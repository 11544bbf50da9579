//! A throwaway Postgres cluster (Debian's `postgresql` package: `/usr/lib/postgresql/*/bin`, or
//! `DIFFUSIOND_PG_BIN`), one per test process, on a free loopback port; a fresh database per
//! test. Postgres refuses to run as root, so as root it runs as the `postgres` user.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use super::{free_port, missing, running_as_root, wait_until, Keepalive};

struct Cluster {
    bin: PathBuf,
    port: u16,
    as_root: bool,
    _keepalive: Keepalive,
}

/// One database of the test cluster.
pub struct Database {
    /// `postgres://postgres@127.0.0.1:PORT/NAME`
    pub url: String,
    pub name: String,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// A fresh, empty database, or `None` (said loudly; a panic under CI) without Postgres.
pub fn database(test: &str) -> Option<Database> {
    let cluster = match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(why) => return missing(test, why),
    };
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    cluster.psql(&format!("CREATE DATABASE {name}")).unwrap();
    Some(Database {
        url: format!("postgres://postgres@127.0.0.1:{}/{name}", cluster.port),
        name,
    })
}

/// Run SQL in a test database with `psql` (what a test checks the ledger with).
pub fn query(db: &Database, sql: &str) -> String {
    let cluster = CLUSTER.get().unwrap().as_ref().unwrap();
    let out = cluster
        .command("psql")
        .args(["-h", "127.0.0.1", "-p", &cluster.port.to_string()])
        .args(["-U", "postgres", "-d", &db.name, "-At", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Run SQL in the cluster's `postgres` database (what changes a test database's settings).
pub fn admin(sql: &str) -> String {
    let cluster = CLUSTER.get().unwrap().as_ref().unwrap();
    cluster
        .psql(sql)
        .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DIFFUSIOND_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn start() -> Result<Cluster, String> {
    let bin = find_bin().ok_or(
        "no Postgres (apt-get install postgresql, or DIFFUSIOND_PG_BIN=DIR of initdb/postgres)",
    )?;
    let as_root = running_as_root();
    let dir = tempfile::Builder::new()
        .prefix("diffusiond-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let data = dir.join("data");
    let port = free_port();
    let cluster_cmd = |program: &str| {
        let mut c = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        } else {
            Command::new(bin.join(program))
        };
        c.env("LC_ALL", "C");
        c
    };
    if as_root {
        let chown = Command::new("chown").arg("postgres").arg(&dir).status();
        if !chown.is_ok_and(|s| s.success()) {
            return Err("cannot chown the cluster's directory to the postgres user".into());
        }
    }
    let init = cluster_cmd("initdb")
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !init.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    let mut runner = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        Command::new("env")
    };
    runner.env("LC_ALL", "C");
    let script = format!(
        "'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
         -c fsync=off -c max_connections=300 >'{dir}/postgres.log' 2>&1",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let cleanup = format!("rm -rf '{}'", dir.display());
    let keepalive = Keepalive::spawn(runner, &script, "INT", &cleanup);
    let cluster = Cluster {
        bin,
        port,
        as_root,
        _keepalive: keepalive,
    };
    if !wait_until(Duration::from_secs(60), || cluster.psql("SELECT 1").is_ok()) {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        return Err(format!("Postgres did not start on port {port}: {log}"));
    }
    Ok(cluster)
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.env("LC_ALL", "C").env_remove("PGPASSWORD");
        c
    }

    fn psql(&self, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-At", "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}
