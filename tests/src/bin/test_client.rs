//! `signet-test-client`: an unmodified client for the datapath tests. It moves itself into a
//! cgroup (as a pod's process would be), makes a plain `connect()`, says hello, and prints one
//! JSON line: what it connected to according to `getpeername`, or the errno it got.
//!
//!     signet-test-client --cgroup /sys/fs/cgroup/unified/<test> --connect 127.0.0.2:9999

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(cgroup), Some(target)) = (arg("--cgroup"), arg("--connect")) else {
        eprintln!("usage: signet-test-client --cgroup DIR --connect ADDR:PORT");
        std::process::exit(2);
    };
    let procs = format!("{cgroup}/cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        eprintln!("joining {procs}: {e}");
        std::process::exit(2);
    }
    let Ok(addr) = target.parse::<SocketAddr>() else {
        eprintln!("--connect `{target}` is not ADDR:PORT");
        std::process::exit(2);
    };
    let result = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(mut s) => {
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let local = s.local_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"hello\n");
            let mut reply = String::new();
            let _ = BufReader::new(&s).read_line(&mut reply);
            serde_json::json!({"ok": true, "peer": peer, "local": local, "reply": reply.trim_end()})
        }
        Err(e) => {
            serde_json::json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
        }
    };
    println!("{result}");
}
