//! `signet echo`: the workload of `signet connectivity test`, both roles, so the suite needs no
//! image beyond Signet's. Each process first joins a cgroup and then a network namespace when
//! told to (a pod's process; `ip netns exec` would remount /sys and hide the cgroup tree).
//!
//! `serve` answers HTTP/1.1 requests with a JSON body naming the pod, the method and the path
//! (keep-alive), echoes any other TCP stream byte for byte, and answers each UDP datagram with
//! `NAME:` and the datagram. It prints `ready` once every port is bound.
//!
//! `client` makes one exchange and prints one JSON line: `ok` (an answer came back), `status`
//! and `pod` for HTTP, `error` saying what happened otherwise (`refused`, `reset`, `timed out`,
//! `eof`, `EPERM`). `--hold` keeps the connection and sends a request every 100 ms after the
//! first answer (printing `{"held":true}`) until it fails or stdin closes; `--repeat-ms` makes a
//! new connection per request the same way and counts failures.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

#[derive(Debug, Subcommand)]
pub enum EchoCommand {
    /// Serve HTTP, a TCP echo and a UDP echo on the given ports until killed.
    Serve(ServeArgs),
    /// One exchange with a server (or a held connection), reported as one JSON line.
    Client(ClientArgs),
    /// Count the frames crossing the interface that holds an address until stdin closes (the
    /// suite's underlay check, run in a node's agent pod), reported as one JSON line.
    Capture(CaptureArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// An address of the interface to watch (the node's own).
    #[arg(long)]
    pub on: std::net::IpAddr,
    /// Text that must not appear in clear in any frame.
    #[arg(long, default_value = "")]
    pub marker: String,
}

/// Where the process puts itself before it does anything else.
#[derive(Debug, Clone, Args)]
pub struct Place {
    /// Join this cgroup (a pod's) first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Then enter this network namespace (a name under /run/netns, or a path).
    #[arg(long)]
    pub netns: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The name answers carry (the pod's).
    #[arg(long)]
    pub name: String,
    #[arg(long = "tcp")]
    pub tcp: Vec<SocketAddr>,
    #[arg(long = "udp")]
    pub udp: Vec<SocketAddr>,
    #[command(flatten)]
    pub place: Place,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    /// Send an HTTP/1.1 request, `METHOD /path`, and report its status.
    #[arg(long)]
    pub http: Option<String>,
    /// A request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// The request's Host (default: the address).
    #[arg(long)]
    pub host: Option<String>,
    /// Without --http: send this many bytes and expect them back.
    #[arg(long, default_value_t = 16)]
    pub bytes: usize,
    /// One UDP datagram instead.
    #[arg(long)]
    pub udp: bool,
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
    /// Keep the connection and go on asking until it fails or stdin closes.
    #[arg(long)]
    pub hold: bool,
    /// A new connection every N ms until stdin closes; reports how many failed.
    #[arg(long)]
    pub repeat_ms: Option<u64>,
    #[command(flatten)]
    pub place: Place,
}

/// What a client prints (and `signet connectivity test` reads).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Exchange {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Who answered (the server's `--name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests answered (held or repeated).
    #[serde(default)]
    pub requests: u64,
    /// Requests that failed (repeated).
    #[serde(default)]
    pub failures: u64,
    /// How a held connection ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    pub ms: u64,
}

pub fn run(cmd: EchoCommand) -> u8 {
    let result = match cmd {
        EchoCommand::Serve(a) => enter(&a.place).and_then(|()| serve(a)),
        EchoCommand::Client(a) => enter(&a.place).map(|()| {
            let report = client(&a);
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }),
        EchoCommand::Capture(a) => {
            super::connectivity::capture::capture_until_stdin_closes(a.on, &a.marker)
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("signet echo: {e}");
            1
        }
    }
}

fn enter(place: &Place) -> Result<(), String> {
    if let Some(cg) = &place.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", procs.display()))?;
    }
    if let Some(ns) = &place.netns {
        let path = if ns.contains('/') {
            PathBuf::from(ns)
        } else {
            PathBuf::from("/run/netns").join(ns)
        };
        let file =
            std::fs::File::open(&path).map_err(|e| format!("netns {}: {e}", path.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering netns {}: {e}", path.display()))?;
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<(), String> {
    if a.tcp.is_empty() && a.udp.is_empty() {
        return Err("give --tcp ADDR:PORT or --udp ADDR:PORT".into());
    }
    let name: Arc<str> = a.name.into();
    let mut threads = vec![];
    for addr in &a.tcp {
        let l = TcpListener::bind(addr).map_err(|e| format!("tcp {addr}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || serve_tcp(conn, &name));
            }
        }));
    }
    for addr in &a.udp {
        let s = UdpSocket::bind(addr).map_err(|e| format!("udp {addr}: {e}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut reply = format!("{name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// An HTTP request line starts with an upper-case token and a space; anything else is echoed.
fn looks_like_http(first: &[u8]) -> bool {
    let token = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    token > 0 && first.get(token) == Some(&b' ')
}

fn serve_tcp(conn: TcpStream, name: &str) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    let Ok(first) = reader.fill_buf() else { return };
    if !looks_like_http(first) {
        let _ = std::io::copy(&mut reader, &mut out);
        let _ = out.shutdown(Shutdown::Write);
        return;
    }
    while let Some((method, path, close, body)) = read_request(&mut reader) {
        let mut skip = vec![0u8; body];
        if reader.read_exact(&mut skip).is_err() {
            return;
        }
        let answer = serde_json::json!({"pod": name, "method": method, "path": path}).to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            answer.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(answer.as_bytes()).is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

/// One request head: method, path, whether the client asked to close, and the body's length.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, String, bool, usize)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if reader.read_until(b'\n', &mut head).ok()? == 0 || head.len() > 16 * 1024 {
            return None;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&head).ok()?;
    let value = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let close = value("connection").is_some_and(|v| v == "close");
    let body = value("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some((req.method?.to_owned(), req.path?.to_owned(), close, body))
}

/// What went wrong, in the words a report uses.
fn describe(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "refused".into(),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "reset".into(),
        K::TimedOut | K::WouldBlock => "timed out".into(),
        K::PermissionDenied => "EPERM".into(),
        K::UnexpectedEof => "eof".into(),
        _ => e.to_string(),
    }
}

fn client(a: &ClientArgs) -> Exchange {
    let start = Instant::now();
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let mut report = if a.udp {
        udp_exchange(a, timeout)
    } else if let Some(every) = a.repeat_ms {
        repeat(a, timeout, Duration::from_millis(every))
    } else {
        match TcpStream::connect_timeout(&a.connect, timeout) {
            Err(e) => failed(format!("connect: {}", describe(&e))),
            Ok(mut conn) => {
                let _ = conn.set_read_timeout(Some(timeout));
                let _ = conn.set_write_timeout(Some(timeout));
                let first = tcp_exchange(a, &mut conn);
                if a.hold && first.ok {
                    hold(a, conn, first)
                } else {
                    first
                }
            }
        }
    };
    report.ms = start.elapsed().as_millis() as u64;
    report
}

fn failed(error: String) -> Exchange {
    Exchange {
        error: Some(error),
        ..Exchange::default()
    }
}

fn tcp_exchange(a: &ClientArgs, conn: &mut TcpStream) -> Exchange {
    match &a.http {
        Some(request) => http_exchange(a, request, conn),
        None => raw_exchange(a.bytes, conn),
    }
}

fn raw_exchange(bytes: usize, conn: &mut TcpStream) -> Exchange {
    let sent: Vec<u8> = (0..bytes).map(|i| b'a' + (i % 26) as u8).collect();
    let writer = conn.try_clone().map(|mut w| {
        std::thread::spawn(move || {
            let r = w.write_all(&sent);
            let _ = w.shutdown(Shutdown::Write);
            r.map(|()| sent)
        })
    });
    let mut got = Vec::new();
    let read = conn.read_to_end(&mut got);
    let sent = match writer {
        Ok(t) => t
            .join()
            .unwrap_or_else(|_| Err(std::io::ErrorKind::Other.into())),
        Err(e) => Err(e),
    };
    match (read, sent) {
        (Err(e), _) | (_, Err(e)) => failed(describe(&e)),
        (Ok(_), Ok(sent)) if got == sent => Exchange {
            ok: true,
            requests: 1,
            ..Exchange::default()
        },
        (Ok(_), Ok(sent)) if got.is_empty() => {
            failed(format!("eof (0 of {} bytes back)", sent.len()))
        }
        (Ok(_), Ok(sent)) => failed(format!(
            "{} bytes came back for {} sent, not the same",
            got.len(),
            sent.len()
        )),
    }
}

fn http_exchange(a: &ClientArgs, request: &str, conn: &mut TcpStream) -> Exchange {
    let (method, path) = request.split_once(' ').unwrap_or((request, "/"));
    let host = a.host.clone().unwrap_or_else(|| a.connect.to_string());
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n");
    for h in &a.headers {
        head += h;
        head += "\r\n";
    }
    head += "\r\n";
    if let Err(e) = conn.write_all(head.as_bytes()) {
        return failed(describe(&e));
    }
    match read_response(conn) {
        Ok((status, body)) => {
            let pod = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["pod"].as_str().map(str::to_owned));
            Exchange {
                ok: true,
                status: Some(status),
                pod,
                requests: 1,
                ..Exchange::default()
            }
        }
        Err(e) => failed(e),
    }
}

/// One response: its status and its body (by Content-Length; a response without one ends the
/// connection and so the body).
fn read_response(conn: &mut TcpStream) -> Result<(u16, Vec<u8>), String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(0) if head.is_empty() => return Err("eof before a response".into()),
            Ok(0) => return Err("eof in the response head".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(describe(&e)),
        }
        if head.len() > 16 * 1024 {
            return Err("response head over 16 KiB".into());
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&head)
        .map_err(|e| format!("unparseable response: {e}"))?;
    let status = resp.code.ok_or("no status in the response")?;
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            conn.read_exact(&mut body).map_err(|e| describe(&e))?;
        }
        None => {
            let _ = conn.read_to_end(&mut body);
        }
    }
    Ok((status, body))
}

/// A held connection: a request every 100 ms until one fails or stdin closes.
fn hold(a: &ClientArgs, mut conn: TcpStream, first: Exchange) -> Exchange {
    println!(
        "{}",
        serde_json::json!({"held": true, "status": first.status})
    );
    let _ = std::io::stdout().flush();
    let stop = stdin_closed();
    let mut report = first;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let next = tcp_exchange(a, &mut conn);
        if !next.ok {
            report.ended = next.error;
            return report;
        }
        report.requests += 1;
    }
    report.ended = Some("stdin closed".into());
    report
}

/// New connections every `every` until stdin closes; `ok` only when none failed.
fn repeat(a: &ClientArgs, timeout: Duration, every: Duration) -> Exchange {
    let stop = stdin_closed();
    let mut report = Exchange {
        ok: true,
        ..Exchange::default()
    };
    while !stop.load(Ordering::SeqCst) {
        let one = match TcpStream::connect_timeout(&a.connect, timeout) {
            Err(e) => failed(format!("connect: {}", describe(&e))),
            Ok(mut conn) => {
                let _ = conn.set_read_timeout(Some(timeout));
                tcp_exchange(a, &mut conn)
            }
        };
        if one.ok && one.status.is_none_or(|s| s == 200) {
            report.requests += 1;
        } else {
            report.failures += 1;
            report.ok = false;
            if report.error.is_none() {
                report.error = one.error.or(one.status.map(|s| format!("HTTP {s}")));
            }
        }
        std::thread::sleep(every);
    }
    report
}

/// Set once stdin reaches its end (the parent closed it, or went away).
fn stdin_closed() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        f.store(true, Ordering::SeqCst);
    });
    flag
}

fn udp_exchange(a: &ClientArgs, timeout: Duration) -> Exchange {
    let bind: SocketAddr = if a.connect.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return failed(format!("bind: {}", describe(&e))),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let payload = b"signet-connectivity";
    if let Err(e) = s.send_to(payload, a.connect) {
        return failed(format!("send: {}", describe(&e)));
    }
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => {
            let reply = &buf[..n];
            match reply.iter().position(|b| *b == b':') {
                Some(i) if &reply[i + 1..] == payload => Exchange {
                    ok: true,
                    pod: Some(String::from_utf8_lossy(&reply[..i]).into_owned()),
                    requests: 1,
                    ..Exchange::default()
                },
                _ => failed("an answer that is not the datagram's echo".into()),
            }
        }
        Err(e) => failed(describe(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_a_raw_stream_by_its_request_line() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"POST /x"));
        assert!(!looks_like_http(b"abcdefgh"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
        assert!(!looks_like_http(b" GET"));
    }

    #[test]
    fn a_server_answers_http_echoes_bytes_and_a_client_reports_both() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || serve_tcp(c, "echo-0"));
            }
        });
        let args = |http: Option<&str>, bytes| ClientArgs {
            connect: addr,
            http: http.map(str::to_owned),
            headers: vec!["X-Test: 1".into()],
            host: None,
            bytes,
            udp: false,
            timeout_ms: 2000,
            hold: false,
            repeat_ms: None,
            place: Place {
                cgroup: None,
                netns: None,
            },
        };
        let r = client(&args(Some("POST /a/b"), 0));
        assert!(r.ok, "{r:?}");
        assert_eq!((r.status, r.pod.as_deref()), (Some(200), Some("echo-0")));
        let r = client(&args(None, 100_000));
        assert!(r.ok, "{r:?}");
        let refused = TcpListener::bind("127.0.0.1:0").expect("bind");
        let gone = refused.local_addr().expect("addr");
        drop(refused);
        let mut a = args(None, 10);
        a.connect = gone;
        let r = client(&a);
        assert!(!r.ok);
        assert_eq!(r.error.as_deref(), Some("connect: refused"));
    }
}
