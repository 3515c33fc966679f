//! Request-smuggling guard for HTTP/1.x at the edge. hyper follows RFC 9112 by letting
//! `Transfer-Encoding` override `Content-Length` and dropping the latter, so the service never
//! sees that a request carried both; the edge should refuse such a request outright (RFC 9112
//! §6.1 allows it, and it is what nginx and Go do for the ambiguous shapes).
//!
//! The guard sits between the client's byte stream and hyper. It follows HTTP/1.1 framing
//! (heads, `Content-Length` bodies, chunked bodies with trailers) so it sees every request head
//! on a keep-alive connection, and holds each head back until it is complete. A head with both
//! framing headers, several `Transfer-Encoding`s, a coding other than a final `chunked`, or
//! conflicting `Content-Length`s is replaced by a request hyper itself refuses with
//! `400 Bad Request` (an unparsable `Content-Length`), followed by end of stream: the client gets
//! a 400 and the connection closes, and nothing of the ambiguous request is forwarded. Anything
//! the guard cannot parse (HTTP/2 prior knowledge, garbage) is passed through for hyper to judge.
//!
//! Because it holds heads back, it also owns the slow-client timeouts hyper would otherwise
//! apply: a head must complete within `header_read` of its first byte (slowloris), and a
//! keep-alive connection may sit between requests for `idle` at most. Either ends the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use std::future::Future as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper gets instead of an ambiguous request: it answers 400 and closes.
const REFUSED: &[u8] = b"POST / HTTP/1.1\r\nHost: refused\r\nContent-Length: ambiguous\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Idle,
    HeaderRead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Body bytes left.
    Fixed(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Chunk data left, then CRLF.
    ChunkData(u64),
    /// Trailer lines until an empty one.
    Trailers,
    /// Not (or no longer) HTTP/1.1 framing we follow: bytes pass as they are.
    Passthrough,
    /// Refused: after `REFUSED`, end of stream.
    Closed,
}

/// The limits the guard enforces while it waits for a head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_bytes: usize,
    pub header_read: Duration,
    pub idle: Duration,
}

#[derive(Debug)]
pub struct H1Guard<S> {
    inner: S,
    limits: HeadLimits,
    /// Runs while waiting for a head: `idle` before its first byte, `header_read` after.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Heads passed so far (a new one restarts the clock).
    heads: u64,
    state: State,
    /// Read from the client, not yet released.
    pending: BytesMut,
    /// Released, not yet read by hyper.
    ready: BytesMut,
    eof: bool,
}

impl<S> H1Guard<S> {
    pub fn new(inner: S, limits: HeadLimits) -> Self {
        Self {
            inner,
            limits,
            timer: Box::pin(tokio::time::sleep(limits.idle)),
            heads: 0,
            state: State::Head,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            eof: false,
        }
    }

    /// What the clock should count now: `idle` while no byte of the next head has arrived,
    /// `header_read` once one has; nothing inside a body.
    fn wait(&self) -> Option<Wait> {
        match self.state {
            State::Head if self.pending.is_empty() => Some(Wait::Idle),
            State::Head => Some(Wait::HeaderRead),
            _ => None,
        }
    }

    /// Restarts the clock when a head completed or the kind of wait changed.
    fn rearm(&mut self, heads_before: u64, wait_before: Option<Wait>) {
        let wait = self.wait();
        if self.heads != heads_before || wait != wait_before {
            let d = match wait {
                Some(Wait::Idle) => self.limits.idle,
                Some(Wait::HeaderRead) => self.limits.header_read,
                None => return,
            };
            self.timer.as_mut().reset(tokio::time::Instant::now() + d);
        }
    }

    /// Moves what framing allows from `pending` to `ready`.
    fn advance(&mut self) {
        loop {
            match self.state {
                State::Closed => {
                    self.pending.clear();
                    return;
                }
                State::Passthrough => {
                    let all = self.pending.split();
                    self.ready.extend_from_slice(&all);
                    return;
                }
                State::Head => {
                    let Some(end) = find(&self.pending, b"\r\n\r\n") else {
                        if self.pending.len() > self.limits.max_bytes {
                            // Too big for us to judge: hyper refuses it by its own limit.
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let head = self.pending.split_to(end + 4);
                    self.heads += 1;
                    match judge(&head) {
                        Verdict::Refuse => {
                            self.ready.extend_from_slice(REFUSED);
                            self.state = State::Closed;
                        }
                        Verdict::Unknown => {
                            self.ready.extend_from_slice(&head);
                            self.state = State::Passthrough;
                        }
                        Verdict::Body(next) => {
                            self.ready.extend_from_slice(&head);
                            self.state = next;
                        }
                    }
                }
                State::Fixed(left) => {
                    let n = (self.pending.len() as u64).min(left) as usize;
                    let part = self.pending.split_to(n);
                    self.ready.extend_from_slice(&part);
                    self.state = if left == n as u64 {
                        State::Head
                    } else {
                        State::Fixed(left - n as u64)
                    };
                    if self.state != State::Head {
                        return;
                    }
                }
                State::ChunkSize => {
                    let Some(end) = find(&self.pending, b"\r\n") else {
                        if self.pending.len() > 1024 {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let line = self.pending.split_to(end + 2);
                    self.ready.extend_from_slice(&line);
                    // Hex digits only (`from_str_radix` also takes a sign); a size it cannot
                    // follow, or one too large to add the CRLF to, is passed for hyper to judge.
                    let size = std::str::from_utf8(&line[..end])
                        .ok()
                        .map(|l| l.split(';').next().unwrap_or("").trim())
                        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
                        .and_then(|h| u64::from_str_radix(h, 16).ok());
                    self.state = match size {
                        None => State::Passthrough,
                        Some(0) => State::Trailers,
                        Some(n) => n
                            .checked_add(2)
                            .map_or(State::Passthrough, State::ChunkData),
                    };
                }
                State::ChunkData(left) => {
                    let n = (self.pending.len() as u64).min(left) as usize;
                    let part = self.pending.split_to(n);
                    self.ready.extend_from_slice(&part);
                    if left == n as u64 {
                        self.state = State::ChunkSize;
                    } else {
                        self.state = State::ChunkData(left - n as u64);
                        return;
                    }
                }
                State::Trailers => {
                    let Some(end) = find(&self.pending, b"\r\n") else {
                        return;
                    };
                    let line = self.pending.split_to(end + 2);
                    self.ready.extend_from_slice(&line);
                    if end == 0 {
                        self.state = State::Head;
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Verdict {
    Refuse,
    Unknown,
    Body(State),
}

/// Judges one complete request head.
fn judge(head: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Verdict::Unknown,
    }
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_ascii_lowercase();
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.push(value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if !codings.is_empty() && !lengths.is_empty() {
        return Verdict::Refuse;
    }
    if codings.len() > 1 || codings.first().is_some_and(|c| c != "chunked") {
        return Verdict::Refuse;
    }
    if lengths.iter().any(|l| *l != lengths[0]) {
        return Verdict::Refuse;
    }
    if upgrade {
        // An upgraded connection stops being HTTP/1.1 after the response.
        return Verdict::Body(State::Passthrough);
    }
    if !codings.is_empty() {
        return Verdict::Body(State::ChunkSize);
    }
    match lengths.first().map(|l| l.parse::<u64>()) {
        None | Some(Ok(0)) => Verdict::Body(State::Head),
        Some(Ok(n)) => Verdict::Body(State::Fixed(n)),
        // Not a number: hyper answers 400 on its own.
        Some(Err(_)) => Verdict::Unknown,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.state == State::Closed {
                return Poll::Ready(Ok(()));
            }
            if this.wait().is_some() && this.timer.as_mut().poll(cx).is_ready() {
                // Too slow: end the stream; hyper drops the half-read head.
                tracing::debug!(
                    wait = ?this.wait(),
                    "closing an HTTP/1 connection that sent no complete request in time"
                );
                this.state = State::Closed;
                this.pending.clear();
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if buf.filled().is_empty() {
                        // Whatever is held back goes to hyper, which judges a truncated head.
                        this.eof = true;
                        let rest = this.pending.split();
                        this.ready.extend_from_slice(&rest);
                    } else {
                        let (heads, wait) = (this.heads, this.wait());
                        this.pending.extend_from_slice(buf.filled());
                        this.advance();
                        this.rearm(heads, wait);
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn through(input: &[u8]) -> Vec<u8> {
        let mut g = H1Guard::new(
            input,
            HeadLimits {
                max_bytes: 64 * 1024,
                header_read: Duration::from_secs(5),
                idle: Duration::from_secs(5),
            },
        );
        let mut out = Vec::new();
        g.read_to_end(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn well_framed_keep_alive_requests_pass_unchanged() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(through(input).await, input);
    }

    #[tokio::test]
    async fn ambiguous_framing_anywhere_on_the_connection_is_refused() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(through(bad).await, REFUSED, "{}", String::from_utf8_lossy(bad));
        }
        // Smuggled behind a well-framed first request: the first passes, the second is refused.
        let first = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let second = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = through(&[first.clone(), second.to_vec()].concat()).await;
        assert_eq!(out, [first, REFUSED.to_vec()].concat());
    }

    #[tokio::test]
    async fn what_it_cannot_parse_passes_for_hyper_to_judge() {
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04";
        assert_eq!(through(preface).await, preface);
        // Chunk sizes it cannot follow: the largest u64 (adding the CRLF to it overflowed), one
        // beyond u64, signed ones, an empty one. Passed unchanged, no panic.
        for size in ["ffffffffffffffff", "fffffffffffffffff", "+5", "-0", ""] {
            let input = format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
            );
            assert_eq!(
                through(input.as_bytes()).await,
                input.as_bytes(),
                "{size:?}"
            );
        }
    }
}
