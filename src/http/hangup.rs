//! Telling a client that went away from one that only half-closed (issue 15, finding 7).
//!
//! The server supports half-closed connections: a client may shut down its sending side after
//! its request and still gets the response (hyper's `half_close`). TCP cannot tell that apart
//! from a client that hung up: both arrive as the end of the client's stream. Most routes answer
//! in milliseconds, so they simply answer. A generation runs for seconds to minutes on the
//! device and reserves credits, so its handler races the work against [`Hangup::closed`]: the
//! end of the client's stream cancels the job at the next step boundary and refunds it, as
//! nginx (499) and Go's request context do. A client that half-closes before its images are
//! ready is therefore told (if it still reads) that its request was cancelled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::error::ApiError;

/// How often a connection with a further request already waiting is looked at again.
const PIPELINED_POLL: Duration = Duration::from_millis(250);

/// The request's connection, as a request extension set by the server loop.
#[derive(Debug, Clone)]
pub struct Hangup(Arc<TcpStream>);

impl Hangup {
    pub(super) fn new(stream: Arc<TcpStream>) -> Self {
        Self(stream)
    }

    /// Resolves when the client's side of the connection has ended (or failed).
    pub async fn closed(&self) {
        let mut probe = [0u8; 1];
        loop {
            match self.0.peek(&mut probe).await {
                Ok(0) | Err(_) => return,
                // A pipelined request waits its turn: look again later.
                Ok(_) => tokio::time::sleep(PIPELINED_POLL).await,
            }
        }
    }
}

/// Run `work` unless the client's stream ends first; then `work` is dropped (which cancels a
/// generation and refunds it). Without a connection (tests calling the router directly) `work`
/// just runs.
pub async fn unless_closed<F: Future>(
    hangup: Option<&Hangup>,
    work: F,
) -> Result<F::Output, ApiError> {
    let Some(hangup) = hangup else {
        return Ok(work.await);
    };
    tokio::select! {
        out = work => Ok(out),
        () = hangup.closed() => Err(ApiError::ClientClosed),
    }
}
