//! The Gateway's HTTP/1 smuggling guard on attacker bytes. The guard is compiled from its own
//! source file (it depends on nothing else of the agent), so the target builds without the
//! agent's eBPF objects.
//!
//! Input: one byte choosing how the stream is cut into reads, then the client's bytes. What must
//! hold for every input:
//! - no panic, and the stream ends;
//! - what the guard releases is the client's bytes unchanged, up to where it refuses, then
//!   (only then) the refusal request hyper answers with 400, then nothing: nothing after a
//!   refused head is ever forwarded;
//! - the verdict does not depend on how the bytes arrive (one read, or reads of any size);
//! - a refusal follows a complete head in the client's bytes: the guard refuses what it judged,
//!   never a half-read head.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};

#[allow(dead_code)]
#[path = "../../src/gateway/h1guard.rs"]
mod h1guard;

use h1guard::{H1Guard, HeadLimits};

const REFUSED: &[u8] = b"POST / HTTP/1.1\r\nHost: refused\r\nContent-Length: ambiguous\r\n\r\n";

/// The client: `data` in reads of `step` bytes (the last shorter), then end of stream.
struct Client<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fn through(rt: &tokio::runtime::Runtime, data: &[u8], step: usize) -> Vec<u8> {
    rt.block_on(async {
        let limits = HeadLimits {
            max_bytes: 1 << 20,
            header_read: Duration::from_secs(60),
            idle: Duration::from_secs(60),
        };
        let mut guard = H1Guard::new(Client { data, step }, limits);
        let mut out = Vec::new();
        guard.read_to_end(&mut out).await.expect("in-memory reads do not fail");
        out
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let whole = through(&rt, data, usize::MAX);
    let step = usize::from(cut % 64) + 1;
    let pieces = through(&rt, data, step);

    for out in [&whole, &pieces] {
        if out.as_slice() == data {
            continue;
        }
        let kept = out
            .strip_suffix(REFUSED)
            .unwrap_or_else(|| panic!("changed bytes without refusing: {out:?}"));
        assert!(
            data.starts_with(kept),
            "released bytes are not the client's: {kept:?}"
        );
        // Refused only for a head it read whole: the refused head follows what was kept.
        assert!(
            data[kept.len()..].windows(4).any(|w| w == b"\r\n\r\n"),
            "refused without a complete head after {} bytes",
            kept.len()
        );
    }
    // Long lines decide by buffer size (a head or chunk line longer than the guard's limits is
    // passed for hyper to judge); below them, the cut must not matter.
    let longest_line = data
        .split(|&b| b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    if longest_line < 1000 {
        assert_eq!(whole, pieces, "the verdict depends on how the bytes arrived (reads of {step})");
    }
});
