//! Fewer, larger writes on a connection many tasks feed (an HBONE connection's HTTP/2 driver).
//!
//! When a stream queues a frame, the connection's task is woken and, by tokio's scheduling, runs
//! next: it writes that one frame (one TLS record, one `writev`) before the other tasks that are
//! ready in the same turn have queued theirs. [`Coalesced`] makes the first write of each flush
//! wait one turn of the scheduler (the task goes to the back of the run queue, behind the tasks
//! already ready), so what those tasks queue goes out with it. A connection with nothing else
//! ready pays one extra poll, not a timer: nothing waits for time to pass.
//!
//! What this does not do: buffer bytes itself, or hold a write back beyond that one turn.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io` whose first write after each flush is deferred by one scheduler turn.
#[derive(Debug)]
pub struct Coalesced<T> {
    io: T,
    /// This flush cycle has already waited its turn.
    waited: bool,
}

impl<T> Coalesced<T> {
    pub fn new(io: T) -> Self {
        Self { io, waited: false }
    }

    /// `Pending` once per flush cycle, with the task rescheduled at once: a task that wakes
    /// itself while it runs is queued behind the tasks already ready, not ahead of them.
    fn wait_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waited {
            return Poll::Ready(());
        }
        self.waited = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.wait_turn(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.wait_turn(cx));
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if flushed.is_ready() {
            self.waited = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_first_write_of_each_flush_waits_one_turn_and_nothing_is_lost() {
        let mut c = Coalesced::new(Counting::default());
        // First write of a cycle: pending once, and the task is woken again at once.
        struct Wakes(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Wakes {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let wakes = std::sync::Arc::new(Wakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"a").is_pending());
        assert_eq!(c.io.writes, 0);
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Then writes go through without waiting until the cycle ends with a flush.
        c.write_all(b"abc").await.expect("in-memory I/O");
        c.write_all(b"def").await.expect("in-memory I/O");
        assert_eq!(c.io.writes, 2);
        c.flush().await.expect("in-memory I/O");
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"g").is_pending());
        c.write_all(b"g").await.expect("in-memory I/O");
        assert_eq!(c.io.bytes, b"abcdefg");
    }

    #[tokio::test]
    async fn reads_pass_straight_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalesced::new(a);
        b.write_all(b"hello").await.expect("in-memory I/O");
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.expect("in-memory I/O");
        assert_eq!(&got, b"hello");
        c.write_all(b"back").await.expect("in-memory I/O");
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.expect("in-memory I/O");
        assert_eq!(&got, b"back");
    }
}
