//! `serve` options for several servers sharing state: the accounts database, the image store,
//! and how long a silent instance counts as alive.

use clap::Args;

use super::Age;

#[derive(Debug, Clone, Args)]
pub struct SharedArgs {
    /// Accounts database shared by several servers: `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// (any number of `serve` processes on any machines may use one). Default: the SQLite file
    /// in the data directory, for one server.
    #[arg(long, env = "DIFFUSIOND_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where images are stored: `s3://BUCKET[/PREFIX]` (any S3-compatible service; endpoint,
    /// region and credentials from the standard AWS_* variables: AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP=true for a plain
    /// http endpoint). Default: the data directory's `files/`.
    #[arg(long, env = "DIFFUSIOND_STORE")]
    pub store: Option<String>,
    /// With an S3 store, image URLs are presigned GET URLs of the bucket valid this long
    /// (`15m`, `1h`, at most `7d`) instead of /files/ URLs served by whichever server is asked.
    #[arg(long, env = "DIFFUSIOND_PRESIGN")]
    pub presign: Option<Age>,
    /// An instance that has not heart-beat in the database for this long counts as dead: any
    /// live instance refunds the credits its unfinished requests reserved. Heartbeats are sent
    /// every quarter of it (1 to 15 s). Shorter: crashed requests are refunded sooner; too short
    /// for a database that stalls, and a live instance's requests may be refunded (then they
    /// are not charged).
    #[arg(long, env = "DIFFUSIOND_INSTANCE_TIMEOUT", default_value = "30s")]
    pub instance_timeout: Age,
}
