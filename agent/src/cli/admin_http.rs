//! The one HTTP/1.1 client the command line uses for admin ports (the agents' and the CA's):
//! connect (from inside a node's network namespace when the topology names one), send a `GET`,
//! check for 200, and read the body as it comes, plain or chunked, line by line.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// How long connecting may take.
const CONNECT: Duration = Duration::from_secs(3);

/// A 200 answer whose body has not been read yet.
pub struct Body {
    reader: BufReader<TcpStream>,
    chunked: bool,
}

/// `GET path` at `addr` (from inside the namespace at `netns`, when given). `read_timeout`
/// bounds each read; `None` for a stream that may stay quiet (`/flows?follow=1`).
pub fn get(
    netns: Option<&Path>,
    addr: SocketAddr,
    path: &str,
    read_timeout: Option<Duration>,
) -> Result<Body, String> {
    let mut tcp = match netns {
        Some(ns) => crate::datapath::netns::connect_in(ns, addr, CONNECT),
        None => TcpStream::connect_timeout(&addr, CONNECT),
    }
    .map_err(|e| e.to_string())?;
    tcp.set_read_timeout(read_timeout)
        .map_err(|e| e.to_string())?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: signet-admin\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(tcp);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(|e| e.to_string())?;
    if !status.contains(" 200 ") {
        let status = status.trim();
        return Err(if status.is_empty() {
            format!("{path}: no HTTP response")
        } else {
            format!("{path} answered `{status}`")
        });
    }
    let mut chunked = false;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).map_err(|e| e.to_string())?;
        let h = h.trim();
        if h.is_empty() {
            break;
        }
        chunked |= h
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    Ok(Body { reader, chunked })
}

impl Body {
    /// Calls `each` with every line of the body (without its newline) until the body ends or
    /// `each` returns false.
    pub fn lines(mut self, mut each: impl FnMut(&str) -> bool) -> Result<(), String> {
        let mut pending = String::new();
        let mut feed = |text: &str, pending: &mut String| -> bool {
            pending.push_str(text);
            while let Some(i) = pending.find('\n') {
                let line: String = pending.drain(..=i).collect();
                if !each(line.trim_end_matches(['\r', '\n'])) {
                    return false;
                }
            }
            true
        };
        if !self.chunked {
            let mut body = String::new();
            self.reader
                .read_to_string(&mut body)
                .map_err(|e| e.to_string())?;
            if feed(&body, &mut pending) && !pending.is_empty() {
                each(&pending);
            }
            return Ok(());
        }
        loop {
            let mut size = String::new();
            if self
                .reader
                .read_line(&mut size)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Ok(());
            }
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| format!("a bad chunk size `{}`", size.trim()))?;
            if n == 0 {
                return Ok(());
            }
            let mut data = vec![0; n + 2];
            self.reader
                .read_exact(&mut data)
                .map_err(|e| e.to_string())?;
            data.truncate(n);
            if !feed(&String::from_utf8_lossy(&data), &mut pending) {
                return Ok(());
            }
        }
    }

    /// The whole body.
    pub fn text(self) -> Result<String, String> {
        let mut out = String::new();
        self.lines(|l| {
            out.push_str(l);
            out.push('\n');
            true
        })?;
        Ok(out)
    }
}
