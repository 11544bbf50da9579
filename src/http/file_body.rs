//! Streaming a stored file: the body that reads it in small chunks as the client takes them, and
//! the `Range` / `ETag` rules of a static file server.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read from disk per chunk. hyper polls for the next chunk only once the socket has taken
/// the buffered ones, so a connection holds a few of these at most, whatever the file's size.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// `remaining` bytes of `file` (a file on disk, or an object streamed from a bucket), from where
/// it is positioned, in chunks of [`CHUNK_BYTES`].
pub struct FileBody {
    file: Box<dyn AsyncRead + Send + Unpin>,
    remaining: u64,
    /// The chunk being read (kept across a pending read).
    buf: Vec<u8>,
}

impl FileBody {
    pub fn new(file: Box<dyn AsyncRead + Send + Unpin>, remaining: u64) -> Self {
        Self {
            file,
            remaining,
            buf: Vec::new(),
        }
    }
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.remaining)
            .unwrap_or(usize::MAX)
            .min(CHUNK_BYTES);
        if this.buf.len() != want {
            this.buf = vec![0; want];
        }
        let mut read = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file is shorter than when it was opened",
                    ))));
                }
                this.remaining -= n as u64;
                let mut chunk = std::mem::take(&mut this.buf);
                chunk.truncate(n);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A strong validator from what identifies a version of a file that is never rewritten: its
/// size and modification time.
pub fn etag(len: u64, modified: Option<SystemTime>) -> String {
    let nanos = modified
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{len:x}-{nanos:x}\"")
}

/// Whether an `If-None-Match` value matches `etag` (`*`, or one of a list; weak comparison, as
/// RFC 9110 asks for this header).
pub fn none_match(header: &str, etag: &str) -> bool {
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let ours = bare(etag);
    header
        .split(',')
        .any(|t| t.trim() == "*" || bare(t) == ours)
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send the whole file (also for forms this server does not serve, such as
    /// several ranges, which RFC 9110 lets a server ignore).
    Full,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// A well-formed single range that lies outside the file: 416.
    Unsatisfiable,
}

/// Parse `bytes=A-B`, `bytes=A-` and `bytes=-N`.
pub fn parse_range(header: &str, len: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if first.is_empty() {
        // bytes=-N: the last N bytes.
        return match number(last) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        };
    }
    let Some(start) = number(first) else {
        return RangeRequest::Full;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(end) if end >= start => end,
            _ => return RangeRequest::Full,
        }
    };
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part {
        start,
        end: end.min(len - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::{Full, Part, Unsatisfiable};
        let len = 1000;
        for (header, want) in [
            ("bytes=0-99", Part { start: 0, end: 99 }),
            (
                "bytes=900-",
                Part {
                    start: 900,
                    end: 999,
                },
            ),
            (
                "bytes=900-5000",
                Part {
                    start: 900,
                    end: 999,
                },
            ),
            (
                "bytes=-100",
                Part {
                    start: 900,
                    end: 999,
                },
            ),
            ("bytes=-5000", Part { start: 0, end: 999 }),
            (
                "bytes=999-999",
                Part {
                    start: 999,
                    end: 999,
                },
            ),
            ("bytes=1000-", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=5-1", Full),
            ("bytes=0-1,5-6", Full),
            ("items=0-1", Full),
            ("bytes=a-b", Full),
            ("bytes=+1-2", Full),
            ("bytes=-", Full),
            ("bytes=18446744073709551616-", Full),
        ] {
            assert_eq!(parse_range(header, len), want, "{header}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
    }

    #[test]
    fn etags_match() {
        let t = etag(12, Some(UNIX_EPOCH + std::time::Duration::from_nanos(255)));
        assert_eq!(t, "\"c-ff\"");
        assert!(none_match(&t, &t));
        assert!(none_match("*", &t));
        assert!(none_match(&format!("\"x\", W/{t}"), &t));
        assert!(!none_match("\"c-fe\"", &t));
        assert!(!none_match("", &t));
    }
}
