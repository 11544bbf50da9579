//! Serving the router on a bound socket until a shutdown future resolves.

use std::future::Future;

use super::{router, AppState};

/// Serve [`router`] on `listener`; after `shutdown` resolves, stop accepting connections and
/// return once the requests in flight have finished.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
