//! `signet-test-client`: an unmodified client and server for the datapath tests. It prints one
//! JSON line describing what happened.
//!
//!     signet-test-client [--cgroup DIR] [--netns NAME] --connect ADDR:PORT [--udp] [--mark N] [--timeout-ms N]
//!     signet-test-client --listen ADDR:PORT [--udp] [--count N] [--timeout-ms N]
//!
//! With `--cgroup` it first moves itself into that cgroup, as a pod's process would be, then
//! with `--netns` into that network namespace (`ip netns exec` would hide the cgroup tree). A client
//! says hello and reports the reply; `getpeername` is what it reports as `peer`. A server answers
//! `count` hellos (then exits), or reports a timeout.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

struct Args(Vec<String>);

impl Args {
    fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }
}

fn fail(msg: String) -> ! {
    eprintln!("signet-test-client: {msg}");
    std::process::exit(2)
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| fail(format!("`{s}` is not ADDR:PORT")))
}

fn main() {
    let args = Args(std::env::args().collect());
    let timeout = Duration::from_millis(
        args.value("--timeout-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000),
    );
    if let Some(cgroup) = args.value("--cgroup") {
        let procs = format!("{cgroup}/cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            fail(format!("joining {procs}: {e}"));
        }
    }
    if let Some(ns) = args.value("--netns") {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
        if let Err(e) = nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET) {
            fail(format!("entering {ns}: {e}"));
        }
    }
    let udp = args.flag("--udp");
    let report = if let Some(target) = args.value("--connect") {
        let mark = args.value("--mark").and_then(|m| m.parse().ok());
        if udp {
            udp_client(addr(target), timeout)
        } else {
            tcp_client(addr(target), mark, timeout)
        }
    } else if let Some(local) = args.value("--listen") {
        let count = args
            .value("--count")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        if udp {
            udp_server(addr(local), count, timeout)
        } else {
            tcp_server(addr(local), count, timeout)
        }
    } else {
        fail("give --connect ADDR:PORT or --listen ADDR:PORT".into())
    };
    println!("{report}");
}

fn tcp_client(target: SocketAddr, mark: Option<u32>, timeout: Duration) -> serde_json::Value {
    let result = (|| {
        let s = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        if let Some(m) = mark {
            s.set_mark(m)?;
        }
        s.connect_timeout(&SockAddr::from(target), timeout)?;
        let mut s: std::net::TcpStream = s.into();
        let peer = s.peer_addr()?.to_string();
        let local = s.local_addr()?.to_string();
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"hello\n")?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        Ok::<_, std::io::Error>((peer, local, reply))
    })();
    match result {
        Ok((peer, local, reply)) => {
            serde_json::json!({"ok": true, "peer": peer, "local": local, "reply": reply.trim_end()})
        }
        Err(e) => {
            serde_json::json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
        }
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

fn tcp_server(local: SocketAddr, count: usize, timeout: Duration) -> serde_json::Value {
    let listener = TcpListener::bind(local).unwrap_or_else(|e| fail(format!("bind {local}: {e}")));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| fail(format!("nonblocking: {e}")));
    // Tell the test we are listening.
    eprintln!("listening");
    let deadline = Instant::now() + timeout;
    let mut served = Vec::new();
    while served.len() < count && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let _ = s.write_all(format!("hi {peer}\n").as_bytes());
                served.push(peer.to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => fail(format!("accept: {e}")),
        }
    }
    serde_json::json!({"served": served})
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
