//! The HTTP server loop: hyper's HTTP/1 with the limits `axum::serve` does not offer.
//!
//! - At most `max_connections` connections at once; beyond that the listener is not accepted
//!   from (clients wait in the kernel's backlog), so file descriptors cannot run out.
//! - A connection must deliver a request's complete headers within `header_read_timeout` of
//!   opening or of its previous response (hyper's timer starts when the connection goes idle, so
//!   this is also the idle timeout of keep-alive connections).
//! - A response write that makes no progress for `write_timeout` closes the connection (a client
//!   that stops reading).
//! - At most [`MAX_BUF_BYTES`] of a response are buffered per connection: bodies are polled only
//!   as the socket drains, so a slow reader holds that much, not the whole file.
//! - A client may half-close its connection after its request and still gets its response
//!   (see [`super::hangup`] for how generations tell that from a client that went away).
//! - A request with both `Transfer-Encoding` and `Content-Length` is refused, and the answers
//!   hyper writes itself (requests it cannot parse) are in the contract's JSON (see
//!   [`super::client_io`]).

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use super::client_io::ClientIo;
use super::hangup::Hangup;

/// Bytes hyper buffers per connection, each way (the largest request head, too).
pub const MAX_BUF_BYTES: usize = 64 * 1024;

/// The connection limits of [`serve`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
}

/// Serve `router` on `listener` until `shutdown` resolves, then stop accepting, let requests in
/// flight finish (idle connections close at once) and return when every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_BYTES)
        // max_buf_size alone lets a larger head through when it arrives in one read.
        .max_header_size(MAX_BUF_BYTES)
        // A client may shut down its sending side after its request and still get the
        // response (generations tell the two apart themselves: see `hangup`).
        .half_close(true)
        .keep_alive(true);
    let mut shutdown = pin!(shutdown);

    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        let hangup = Hangup::new(stream.clone());
        let io = TokioIo::new(ClientIo::new(stream, limits.write_timeout));
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(hangup.clone());
            router.clone().oneshot(req)
        });
        let conn = builder.serve_connection(io, service);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            let stopping = async move {
                // Drop the watch guard before returning (it must not live across an await).
                let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
            };
            let outcome = tokio::select! {
                outcome = conn.as_mut() => outcome,
                () = stopping => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = outcome {
                tracing::debug!("connection closed: {e}");
            }
            drop(slot);
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    // Every slot back = every connection closed.
    let _ = slots
        .acquire_many(u32::try_from(max).unwrap_or(u32::MAX))
        .await;
    Ok(())
}
