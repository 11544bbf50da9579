//! Requests whose length is ambiguous are refused (issue 15, finding 7).
//!
//! A request with both `Transfer-Encoding` and `Content-Length` is the raw material of request
//! smuggling (RFC 9112 §6.3: a server ought to treat it as an error). hyper accepts it: it drops
//! `Content-Length`, reads the body as chunked and closes the connection afterwards, so the
//! handlers never see that both were sent. [`Framing`] follows the request stream as it is read
//! from the socket (heads, then bodies by their length or chunks) and, in the head of such a
//! request, adds the header [`CONFLICT_HEADER`] before the head's end. hyper then parses the
//! request as usual, and the guard middleware answers it with 400 in the contract's JSON (with
//! its `X-Request-Id`); hyper closes the connection after that response.
//!
//! Anything the scanner cannot follow (a head hyper will refuse anyway, an upgrade) turns it
//! off for the rest of the connection: it never rejects by itself.

/// The header added to a request that carried both `Transfer-Encoding` and `Content-Length`.
/// A client that sends it itself is refused the same way.
pub const CONFLICT_HEADER: &str = "x-diffusiond-ambiguous-length";

const INSERTED: &[u8] = b"x-diffusiond-ambiguous-length: 1\r\n";

/// The longest request head followed (hyper refuses longer ones).
const MAX_HEAD: usize = super::serve::MAX_BUF_BYTES;
/// The longest chunk-size line (size, extensions) followed.
const MAX_LINE: usize = 4096;

#[derive(Debug)]
enum State {
    /// Reading a request head (bytes so far).
    Head(Vec<u8>),
    /// This many body bytes to pass.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// This many chunk bytes to pass, then the chunk's line end.
    ChunkData(u64),
    /// The line end after a chunk's data (bytes of it seen).
    ChunkEnd(Vec<u8>),
    /// Reading trailer lines after the last chunk (the current line).
    Trailer(Vec<u8>),
    /// Not following this connection any more.
    Off,
}

/// Follows one connection's request stream.
#[derive(Debug)]
pub struct Framing {
    state: State,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            state: State::Head(Vec::new()),
        }
    }
}

/// What a request head says about its body.
enum BodyLength {
    None,
    Fixed(u64),
    Chunked,
    /// Both `Transfer-Encoding` and `Content-Length`.
    Conflict,
    /// Something hyper refuses or handles itself (upgrade, bad length).
    Unfollowable,
}

impl Framing {
    /// Follow `bytes`, just read from the socket. Returns the offset in `bytes` before which
    /// [`INSERTED`] must be placed (the blank line ending a conflicting request's head), if any.
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Off => return None,
                State::Head(head) => {
                    let b = bytes[i];
                    i += 1;
                    if head.is_empty() && (b == b'\r' || b == b'\n') {
                        continue; // blank lines before a request are ignored (RFC 9112 §2.2)
                    }
                    head.push(b);
                    if head.len() > MAX_HEAD {
                        self.state = State::Off;
                        return None;
                    }
                    if b != b'\n' || !(head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n")) {
                        continue;
                    }
                    let blank = if head.ends_with(b"\r\n") { 2 } else { 1 };
                    match body_length(head) {
                        BodyLength::None => self.state = State::Head(Vec::new()),
                        BodyLength::Fixed(0) => self.state = State::Head(Vec::new()),
                        BodyLength::Fixed(n) => self.state = State::Body(n),
                        BodyLength::Chunked => self.state = State::ChunkSize(Vec::new()),
                        BodyLength::Unfollowable => self.state = State::Off,
                        BodyLength::Conflict => {
                            // hyper closes the connection after this request: stop following.
                            self.state = State::Off;
                            // The blank line starts in an earlier read: too late to insert;
                            // then drop the connection instead (see `serve`).
                            return Some(i.checked_sub(blank).unwrap_or(usize::MAX));
                        }
                    }
                }
                State::Body(n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    i += take as usize;
                    *n -= take;
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let b = bytes[i];
                    i += 1;
                    line.push(b);
                    if line.len() > MAX_LINE {
                        self.state = State::Off;
                    } else if b == b'\n' {
                        self.state = match chunk_size(line) {
                            Some(0) => State::Trailer(Vec::new()),
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        };
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    i += take as usize;
                    *n -= take;
                    if *n == 0 {
                        self.state = State::ChunkEnd(Vec::new());
                    }
                }
                State::ChunkEnd(end) => {
                    end.push(bytes[i]);
                    i += 1;
                    if end.as_slice() == b"\n" || end.as_slice() == b"\r\n" {
                        self.state = State::ChunkSize(Vec::new());
                    } else if end.as_slice() != b"\r" {
                        self.state = State::Off;
                    }
                }
                State::Trailer(line) => {
                    let b = bytes[i];
                    i += 1;
                    line.push(b);
                    if line.len() > MAX_HEAD {
                        self.state = State::Off;
                    } else if b == b'\n' {
                        if line.as_slice() == b"\n" || line.as_slice() == b"\r\n" {
                            self.state = State::Head(Vec::new());
                        } else {
                            line.clear();
                        }
                    }
                }
            }
        }
        None
    }

    /// The bytes to place before the blank line of a conflicting request.
    pub fn inserted() -> &'static [u8] {
        INSERTED
    }
}

fn body_length(head: &[u8]) -> BodyLength {
    let Ok(text) = std::str::from_utf8(head) else {
        return BodyLength::Unfollowable;
    };
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or("");
    if !request_line.ends_with("HTTP/1.1") && !request_line.ends_with("HTTP/1.0") {
        return BodyLength::Unfollowable;
    }
    let (mut te, mut cl, mut upgrade) = (None::<String>, None::<u64>, false);
    let mut cl_seen = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => {
                let all = te.map_or(value.to_string(), |t| format!("{t}, {value}"));
                te = Some(all);
            }
            "content-length" => {
                cl_seen = true;
                cl = value.parse().ok();
            }
            "upgrade" => upgrade = true,
            _ => {}
        }
    }
    if upgrade || request_line.starts_with("CONNECT ") {
        return BodyLength::Unfollowable;
    }
    match (te, cl_seen) {
        (Some(_), true) => BodyLength::Conflict,
        (Some(te), false) => {
            let last = te.rsplit(',').next().unwrap_or("").trim();
            if last.eq_ignore_ascii_case("chunked") {
                BodyLength::Chunked
            } else {
                BodyLength::Unfollowable
            }
        }
        (None, true) => cl.map_or(BodyLength::Unfollowable, BodyLength::Fixed),
        (None, false) => BodyLength::None,
    }
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let size = text.split(';').next()?.trim();
    u64::from_str_radix(size, 16).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Framing;

    /// Feed `stream` in pieces of `piece` bytes; the absolute offsets where a header is inserted
    /// (`None`: found, but the blank line began in an earlier piece, so it cannot be marked).
    fn scan_in_pieces(stream: &[u8], piece: usize) -> Vec<Option<usize>> {
        let mut f = Framing::default();
        let mut found = Vec::new();
        for (k, chunk) in stream.chunks(piece).enumerate() {
            if let Some(at) = f.scan(chunk) {
                found.push((at <= chunk.len()).then(|| k * piece + at));
            }
        }
        found
    }

    #[test]
    fn a_conflicting_head_is_marked_before_its_blank_line() {
        let req = b"POST /v1/generate HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let blank = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        assert_eq!(scan_in_pieces(req, req.len()), vec![Some(blank)]);
        // Split inside the head: found all the same.
        assert_eq!(scan_in_pieces(req, 7), vec![Some(blank)]);
    }

    #[test]
    fn bodies_are_skipped_so_later_heads_are_followed() {
        // Bodies whose bytes look like a conflicting head are not taken for one.
        let lookalike = "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let first = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{lookalike}",
            lookalike.len()
        );
        let chunked = format!(
            "POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};x=y\r\n{lookalike}\r\n0\r\nTrailer: 1\r\n\r\n",
            lookalike.len()
        );
        let bad = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(first.as_bytes());
        stream.extend_from_slice(chunked.as_bytes());
        stream.extend_from_slice(b"GET /d HTTP/1.1\r\n\r\n");
        let at = stream.len() + bad.len() - 2;
        stream.extend_from_slice(bad);
        for piece in [1, 3, 16, stream.len()] {
            let found = scan_in_pieces(&stream, piece);
            // With one-byte pieces the blank line always began in the piece before.
            let expected = if piece == 1 { None } else { Some(at) };
            assert_eq!(found, vec![expected], "piece {piece}");
        }
    }

    #[test]
    fn ordinary_requests_are_left_alone() {
        let stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /y HTTP/1.1\n\n";
        assert!(scan_in_pieces(stream, 1).is_empty());
        assert!(scan_in_pieces(stream, stream.len()).is_empty());
    }

    #[test]
    fn a_blank_line_that_began_in_an_earlier_read_cannot_be_marked() {
        let req = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut f = Framing::default();
        assert_eq!(f.scan(&req[..req.len() - 1]), None);
        assert_eq!(f.scan(&req[req.len() - 1..]), Some(usize::MAX));
    }
}
