//! A client connection's byte stream, between the socket and hyper.
//!
//! - Writes fail with `TimedOut` once one has been pending for the write timeout (a client that
//!   stops reading).
//! - Reads are followed by [`Framing`], which marks requests that carry both
//!   `Transfer-Encoding` and `Content-Length` so that the guard refuses them.
//! - The few answers hyper writes by itself, for requests it cannot parse (400 bad request line
//!   or header, 414 URI too long, 431 header section too large), are replaced by the same status
//!   with the contract's JSON error body and an `X-Request-Id`: every other response passes the
//!   request-context middleware and carries that header, so a 4xx head without it can only be
//!   hyper's own. hyper closes the connection after such an answer.
//!
//! The socket is shared (an `Arc`) with the request's [`super::hangup::Hangup`], which looks at
//! it while a generation runs; so reads and writes go through the `&self` readiness API.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::framing::Framing;
use crate::infer::RequestId;

pub(super) struct ClientIo {
    stream: Arc<TcpStream>,
    write_timeout: Duration,
    /// Running while a write is pending; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
    framing: Framing,
    /// Bytes read from the socket (after an inserted header) not yet handed to hyper.
    held: Vec<u8>,
    /// A replacement answer still to be written (see the module doc).
    out: Vec<u8>,
}

impl ClientIo {
    pub(super) fn new(stream: Arc<TcpStream>, write_timeout: Duration) -> Self {
        Self {
            stream,
            write_timeout,
            stalled: None,
            framing: Framing::default(),
            held: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Pass a write-side poll through, timing how long it stays pending.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client has not read the response for the write timeout",
            )));
        }
        Poll::Pending
    }

    fn poll_socket_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_socket_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_socket_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }

    /// Write out the pending replacement answer.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let polled = self.poll_socket_write(cx, &self.out);
            match self.timed(cx, polled) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// If `head` is one of hyper's own error answers, queue its replacement; true if so.
    fn replace_own_answer(&mut self, head: &[u8]) -> bool {
        if !self.out.is_empty() {
            return false;
        }
        match own_answer(head) {
            Some(replacement) => {
                self.out = replacement;
                true
            }
            None => false,
        }
    }
}

/// The contract's version of an answer hyper wrote by itself, if `head` is one.
fn own_answer(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let status_line = text.strip_prefix("HTTP/1.1 ")?;
    if !text.ends_with("\r\n\r\n") || text.to_ascii_lowercase().contains("\r\nx-request-id:") {
        return None;
    }
    let (status, reason, code, message) = match status_line.get(..3)? {
        "400" => (
            400,
            "Bad Request",
            "invalid_request",
            "the request is not valid HTTP/1.1 (request line or a header cannot be parsed)",
        ),
        "414" => (
            414,
            "URI Too Long",
            "request_too_large",
            "the request URI is too long",
        ),
        "431" => (
            431,
            "Request Header Fields Too Large",
            "request_too_large",
            "the request's header section is larger than 64 KiB",
        ),
        _ => return None,
    };
    let id = RequestId::generate();
    tracing::info!(request_id = %id, status, "refused a request hyper could not parse");
    let body = json!({
        "success": false,
        "error": { "code": code, "message": message },
        "request_id": id.as_str(),
    })
    .to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\nconnection: close\r\n\r\n{body}",
            body.len(),
            id.as_str()
        )
        .into_bytes(),
    )
}

/// Move what fits of `held` into `buf`.
fn hand_over(held: &mut Vec<u8>, buf: &mut ReadBuf<'_>) {
    let n = held.len().min(buf.remaining());
    buf.put_slice(&held[..n]);
    held.drain(..n);
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.held.is_empty() {
            hand_over(&mut this.held, buf);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.poll_socket_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let Some(at) = this.framing.scan(&buf.filled()[before..]) else {
            return Poll::Ready(Ok(()));
        };
        let Some(cut) = before.checked_add(at).filter(|c| *c <= buf.filled().len()) else {
            // The head's blank line was handed over already: too late to mark it.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a request with both Transfer-Encoding and Content-Length",
            )));
        };
        let mut held = Framing::inserted().to_vec();
        held.extend_from_slice(&buf.filled()[cut..]);
        buf.set_filled(cut);
        hand_over(&mut held, buf);
        this.held = held;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replace_own_answer(buf) {
            // Written as far as hyper is concerned; flushed by `poll_out`.
            return match self.poll_out(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let polled = self.poll_socket_write(cx, buf);
        self.timed(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // hyper's own answers have no body: their head is one slice.
        if bufs.len() == 1 && self.replace_own_answer(&bufs[0]) {
            return match self.poll_out(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(total)),
            };
        }
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let polled = self.poll_socket_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        // TCP has nothing to flush beyond the pending replacement.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_out(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        // Shutting down the sending side never blocks.
        let shut = socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write);
        Poll::Ready(match shut {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::own_answer;

    #[test]
    fn hypers_own_answers_are_replaced_and_ours_are_not() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 08:00:00 GMT\r\n\r\n";
        let replaced = String::from_utf8(own_answer(hyper).unwrap()).unwrap();
        assert!(replaced.starts_with("HTTP/1.1 431 "), "{replaced}");
        assert!(replaced.contains("\r\nx-request-id: req_"), "{replaced}");
        let body = replaced.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(v["success"], false);
        let len: usize = replaced
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());

        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: req_abc\r\ncontent-length: 0\r\n\r\n";
        assert!(own_answer(ours).is_none());
        assert!(own_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        // Not a whole head: left alone.
        assert!(own_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-").is_none());
    }
}
