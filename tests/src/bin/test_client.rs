//! `signet-test-client`: an unmodified client and server for the datapath tests. It prints one
//! JSON line describing what happened.
//!
//!     signet-test-client [--cgroup DIR] [--netns NAME] --connect ADDR:PORT [--udp] [--mark N]
//!                        [--timeout-ms N] [--request "METHOD /path" [--header "Name: value"]...]
//!                        [--hold-ms N]
//!     signet-test-client --listen ADDR:PORT [--udp] [--count N] [--timeout-ms N] [--http]
//!                        [--slow-body-ms N] [--hold]
//!
//! With `--cgroup` it first moves itself into that cgroup, as a pod's process would be, then
//! with `--netns` into that network namespace (`ip netns exec` would hide the cgroup tree). A client
//! says hello and reports the reply; `getpeername` is what it reports as `peer`. A server answers
//! `count` hellos (then exits), or reports a timeout.
//!
//! `--request` makes the client send one HTTP/1.1 request instead and report the status and
//! body; `--http` makes the server answer HTTP requests (`--slow-body-ms` sends each body in ten
//! pieces spread over that long). `--hold-ms` keeps the client's connection
//! open after the reply and reports how it ended (`eof`, `reset`, `timeout`) and when; `--hold`
//! makes the server keep each connection open until the client closes it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use signet_tests::{Args, enter, fail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| fail(format!("`{s}` is not ADDR:PORT")))
}

fn main() {
    let args = Args::from_env();
    let timeout = Duration::from_millis(
        args.value("--timeout-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000),
    );
    enter(args.value("--cgroup"), args.value("--netns"));
    let udp = args.flag("--udp");
    let report = if let Some(target) = args.value("--connect") {
        let mark = args.value("--mark").and_then(|m| m.parse().ok());
        let hold = args
            .value("--hold-ms")
            .and_then(|m| m.parse().ok())
            .map(Duration::from_millis);
        if udp {
            udp_client(addr(target), timeout)
        } else if let Some(request) = args.value("--request") {
            let headers: Vec<String> = args
                .0
                .windows(2)
                .filter(|w| w[0] == "--header")
                .map(|w| w[1].clone())
                .collect();
            http_client(addr(target), request, &headers, timeout)
        } else {
            tcp_client(addr(target), mark, timeout, hold)
        }
    } else if let Some(local) = args.value("--listen") {
        let count = args
            .value("--count")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        if udp {
            udp_server(addr(local), count, timeout)
        } else {
            let mode = Mode {
                http: args.flag("--http"),
                hold: args.flag("--hold"),
                slow_body: args
                    .value("--slow-body-ms")
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis),
            };
            tcp_server(addr(local), count, timeout, mode)
        }
    } else {
        fail("give --connect ADDR:PORT or --listen ADDR:PORT".into())
    };
    println!("{report}");
}

fn connect(
    target: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.connect_timeout(&SockAddr::from(target), timeout)?;
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn error_report(e: &std::io::Error) -> serde_json::Value {
    serde_json::json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
}

fn tcp_client(
    target: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
    hold: Option<Duration>,
) -> serde_json::Value {
    let result = (|| {
        let mut s = connect(target, mark, timeout)?;
        let peer = s.peer_addr()?.to_string();
        let local = s.local_addr()?.to_string();
        s.write_all(b"hello\n")?;
        let mut reader = BufReader::new(&s);
        let mut reply = String::new();
        reader.read_line(&mut reply)?;
        let mut report = serde_json::json!({"ok": true, "peer": peer, "local": local, "reply": reply.trim_end()});
        if let Some(hold) = hold {
            // Announce, so a test can change something while the connection is open.
            eprintln!("holding");
            let start = Instant::now();
            s.set_read_timeout(Some(hold))?;
            let mut rest = String::new();
            let ended = match std::io::Read::read_to_string(&mut reader, &mut rest) {
                Ok(_) => "eof",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    "timeout"
                }
                Err(_) => "error",
            };
            report["held"] = serde_json::json!({
                "ended": ended,
                "after_ms": start.elapsed().as_millis() as u64,
            });
        }
        Ok::<_, std::io::Error>(report)
    })();
    result.unwrap_or_else(|e| error_report(&e))
}

/// One HTTP/1.1 request (`METHOD /path`), `Connection: close`; reports status and body.
fn http_client(
    target: SocketAddr,
    request: &str,
    headers: &[String],
    timeout: Duration,
) -> serde_json::Value {
    let (method, path) = request
        .split_once(' ')
        .unwrap_or_else(|| fail(format!("--request `{request}`: give `METHOD /path`")));
    let result = (|| {
        let mut s = connect(target, None, timeout)?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
        for h in headers {
            // `\xff` in a value stands for that byte, so a test can send an opaque value.
            head.extend(h.replace("\\xff", "\u{ff}").chars().map(|c| c as u8));
            head.extend(b"\r\n");
        }
        head.extend(b"Content-Length: 0\r\nConnection: close\r\n\r\n");
        s.write_all(&head)?;
        let mut response = String::new();
        std::io::Read::read_to_string(&mut s, &mut response)?;
        Ok::<_, std::io::Error>(response)
    })();
    match result {
        Ok(response) => {
            let status: u16 = response
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = response
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .trim_end();
            serde_json::json!({"ok": status != 0, "status": status, "body": body})
        }
        Err(e) => error_report(&e),
    }
}

fn udp_client(target: SocketAddr, timeout: Duration) -> serde_json::Value {
    let result = (|| {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .expect("literal");
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(b"hello\n", target)?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok::<_, std::io::Error>((
            from.to_string(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ))
    })();
    match result {
        Ok((peer, reply)) => {
            serde_json::json!({"ok": true, "peer": peer, "reply": reply.trim_end()})
        }
        Err(e) => {
            serde_json::json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    http: bool,
    hold: bool,
    slow_body: Option<Duration>,
}

fn tcp_server(local: SocketAddr, count: usize, timeout: Duration, mode: Mode) -> serde_json::Value {
    let listener = TcpListener::bind(local).unwrap_or_else(|e| fail(format!("bind {local}: {e}")));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| fail(format!("nonblocking: {e}")));
    // Tell the test we are listening.
    eprintln!("listening");
    let deadline = Instant::now() + timeout;
    let mut served = Vec::new();
    let mut answering = Vec::new();
    while served.len() < count && Instant::now() < deadline {
        match listener.accept() {
            Ok((s, peer)) => {
                answering.push(std::thread::spawn(move || answer(s, peer, mode)));
                served.push(peer.to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => fail(format!("accept: {e}")),
        }
    }
    for a in answering {
        let _ = a.join();
    }
    serde_json::json!({"served": served})
}

/// Answers one connection: a hello line, or HTTP requests until the client closes.
fn answer(mut s: std::net::TcpStream, peer: SocketAddr, mode: Mode) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(if mode.hold { 600 } else { 5 })));
    let Ok(clone) = s.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    if mode.http {
        // The reply names the request, where it arrived and from whom, then echoes the
        // headers (lowercased names); the body is empty in every request the tests send.
        let request = line.trim_end().to_owned();
        let mut headers = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((name, value)) = h.trim_end().split_once(':') {
                headers += &format!("{}: {}\n", name.to_ascii_lowercase(), value.trim());
            }
        }
        let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let body = format!("hi {request} at {local} from {peer}\n{headers}");
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        match mode.slow_body {
            None => {
                let _ = s.write_all(body.as_bytes());
            }
            Some(over) => {
                let piece = body.len().div_ceil(10);
                for chunk in body.as_bytes().chunks(piece) {
                    std::thread::sleep(over / 10);
                    let _ = s.write_all(chunk);
                    let _ = s.flush();
                }
            }
        }
        return;
    }
    let _ = s.write_all(format!("hi {peer}\n").as_bytes());
    if mode.hold {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    }
}

fn udp_server(local: SocketAddr, count: usize, timeout: Duration) -> serde_json::Value {
    let s = UdpSocket::bind(local).unwrap_or_else(|e| fail(format!("bind {local}: {e}")));
    eprintln!("listening");
    let deadline = Instant::now() + timeout;
    let mut served = Vec::new();
    let mut buf = [0u8; 512];
    while served.len() < count && Instant::now() < deadline {
        let _ = s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ));
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(format!("hi {from}\n").as_bytes(), from);
            served.push(from.to_string());
        }
    }
    serde_json::json!({"served": served})
}
