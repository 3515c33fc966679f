//! `signet-mesh-bench` (root; not a test): the mesh's cost against a direct path, measured in one
//! run over the local topology that `deploy/local/demo.sh up` builds. `deploy/local/bench.sh`
//! runs it; by hand:
//!
//!     signet-mesh-bench run --topology T.json --direct-client NS --direct-server NS:IP [--seconds 5]
//!
//! Two paths between node-a and node-b over the same underlay:
//! - direct (mesh off): two network namespaces that are not pods of the cluster state, so no
//!   eBPF program captures them and no proxy sees their bytes;
//! - through Signet: the pod `web-0` (its cgroup and netns) to the pod `api-0`, so every
//!   connection is captured, tunnelled over HBONE/mTLS and policy-checked on both nodes.
//!
//! For each: single-stream and 4-stream throughput, 1 KiB request/response latency on one
//! connection (p50, p99), and new connections per second (4 clients, connect + 1 byte + close).
//! Then the agents' RSS idle and with 1,000 connections held open through the mesh. Every
//! figure is printed with its ratio to the direct path. With `--signet PATH` (the `signet`
//! binary) the connection test through the mesh runs in three more pairs, without and with
//! `signet observe -f` following every agent, back to back; the medians' ratio is printed with
//! the records the follower streamed and any it was told it lost.
//!
//! Subcommands `serve` and `load` are the halves it runs inside the namespaces.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use signet_tests::{Args, enter, fail};
use socket2::{Domain, SockAddr, Socket, Type};

const MSG: usize = 1024;
/// The servers' ports: throughput sink, 1 KiB echo, one byte then close.
const SINK: u16 = 9100;
const ECHO: u16 = 9101;
const HELLO: u16 = 9102;

fn main() {
    let args = Args::from_env();
    raise_fd_limit();
    match args.command() {
        Some("serve") => serve(&args),
        Some("load") => {
            enter(args.value("--cgroup"), Some(args.need("--netns")));
            let report = load(&args);
            println!("{report}");
        }
        Some("run") => run(&args),
        _ => fail("usage: signet-mesh-bench run|serve|load ... (see the module docs)".into()),
    }
}

/// 1,000 held connections need more than the default 1,024 descriptors on some side.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

// ---- serve: the three servers, a thread per connection ----

fn serve(args: &Args) {
    enter(None, Some(args.need("--netns")));
    let ip = args.need("--ip");
    let listeners: Vec<(u16, TcpListener)> = [SINK, ECHO, HELLO]
        .into_iter()
        .map(|port| {
            let addr = format!("{ip}:{port}");
            let l = TcpListener::bind(&addr).unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
            (port, l)
        })
        .collect();
    eprintln!("listening");
    let mut threads = vec![];
    for (port, l) in listeners {
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let _ = conn.set_nodelay(true);
                std::thread::spawn(move || answer(port, conn));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}

fn answer(port: u16, mut conn: TcpStream) {
    match port {
        SINK => {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
        ECHO => {
            let mut buf = [0u8; MSG];
            while conn.read_exact(&mut buf).is_ok() {
                if conn.write_all(&buf).is_err() {
                    break;
                }
            }
        }
        _ => {
            let _ = conn.write_all(b"!");
            let mut rest = [0u8; 1];
            let _ = conn.read(&mut rest);
        }
    }
}

// ---- load: one measurement, printed as JSON ----

fn load(args: &Args) -> serde_json::Value {
    let ip = args.need("--ip").to_owned();
    let seconds = Duration::from_secs(args.number("--seconds", 5));
    let streams = args.number("--streams", 1) as usize;
    match args.need("--kind") {
        "throughput" => throughput(&ip, streams, seconds),
        "latency" => latency(&ip, seconds),
        "connect" => connect_rate(&ip, streams, seconds),
        "hold" => hold(&ip, args.number("--count", 1000) as usize, seconds),
        k => fail(format!("--kind {k}: throughput, latency, connect or hold")),
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}")
        .parse()
        .unwrap_or_else(|_| fail(format!("`{ip}` is not an IP address")))
}

fn throughput(ip: &str, streams: usize, seconds: Duration) -> serde_json::Value {
    let target = addr(ip, SINK);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(target)
                    .unwrap_or_else(|e| fail(format!("connect {target}: {e}")));
                let buf = vec![0x5au8; 128 * 1024];
                while start.elapsed() < seconds {
                    match s.write(&buf) {
                        Ok(n) => sent.fetch_add(n as u64, Ordering::Relaxed),
                        Err(e) => fail(format!("send to {target}: {e}")),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = sent.load(Ordering::Relaxed);
    serde_json::json!({"gbit_per_s": bytes as f64 * 8.0 / secs / 1e9, "bytes": bytes})
}

fn latency(ip: &str, seconds: Duration) -> serde_json::Value {
    let target = addr(ip, ECHO);
    let mut s =
        TcpStream::connect(target).unwrap_or_else(|e| fail(format!("connect {target}: {e}")));
    let _ = s.set_nodelay(true);
    let (req, mut resp) = ([0x42u8; MSG], [0u8; MSG]);
    let mut samples = Vec::with_capacity(100_000);
    let start = Instant::now();
    while start.elapsed() < seconds {
        let t = Instant::now();
        s.write_all(&req)
            .and_then(|()| s.read_exact(&mut resp))
            .unwrap_or_else(|e| fail(format!("echo with {target}: {e}")));
        samples.push(t.elapsed());
    }
    // The first round trips include the tunnel's set-up; they are not the steady state.
    let warm = samples.len() / 100;
    let mut steady = samples.split_off(warm);
    steady.sort_unstable();
    let pct = |p: f64| steady[((steady.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    serde_json::json!({"p50_us": pct(0.50), "p99_us": pct(0.99), "requests": steady.len()})
}

fn connect_rate(ip: &str, clients: usize, seconds: Duration) -> serde_json::Value {
    let target = addr(ip, HELLO);
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            std::thread::spawn(move || {
                while start.elapsed() < seconds {
                    if hello(target).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let secs = start.elapsed().as_secs_f64();
    serde_json::json!({
        "per_s": done.load(Ordering::Relaxed) as f64 / secs,
        "failed": failed.load(Ordering::Relaxed),
    })
}

/// A new connection that gets its byte and closes with RST (no TIME_WAIT to run out of ports).
fn hello(target: SocketAddr) -> std::io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.connect_timeout(&SockAddr::from(target), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s: TcpStream = s.into();
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Opens `count` connections, proves each end to end with one echo, announces `held` on
/// stderr, and keeps them for `seconds`.
fn hold(ip: &str, count: usize, seconds: Duration) -> serde_json::Value {
    let target = addr(ip, ECHO);
    let mut held = Vec::with_capacity(count);
    let mut buf = [0u8; MSG];
    for i in 0..count {
        let mut s = TcpStream::connect(target)
            .unwrap_or_else(|e| fail(format!("connection {i} to {target}: {e}")));
        s.write_all(&[1u8; MSG])
            .and_then(|()| s.read_exact(&mut buf))
            .unwrap_or_else(|e| fail(format!("connection {i} echo: {e}")));
        held.push(s);
    }
    eprintln!("held");
    std::thread::sleep(seconds);
    serde_json::json!({"held": held.len()})
}

// ---- run: both paths, one table ----

struct Path {
    name: &'static str,
    netns: String,
    cgroup: Option<String>,
    server_ip: String,
}

fn run(args: &Args) {
    let topo: serde_json::Value = {
        let path = args.need("--topology");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
        serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("{path}: {e}")))
    };
    let seconds = args.number("--seconds", 5);
    let pod = |name: &str| {
        topo["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| fail(format!("no pod {name} in the topology")))
    };
    let (web, api) = (pod("web-0"), pod("api-0"));
    let (direct_server_ns, direct_server_ip) = args
        .need("--direct-server")
        .split_once(':')
        .unwrap_or_else(|| fail("--direct-server NS:IP".into()));
    let paths = [
        Path {
            name: "direct",
            netns: args.need("--direct-client").to_owned(),
            cgroup: None,
            server_ip: direct_server_ip.to_owned(),
        },
        Path {
            name: "signet",
            netns: text(&web["netns"]),
            cgroup: Some(text(&web["cgroup"])),
            server_ip: text(&api["ip"]),
        },
    ];
    let _servers = [
        spawn_server(direct_server_ns, direct_server_ip),
        spawn_server(&text(&api["netns"]), &text(&api["ip"])),
    ];
    let agents: Vec<(String, u32)> = topo["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let pid = std::fs::read_to_string(n["agentPidFile"].as_str()?).ok()?;
            Some((text(&n["name"]), pid.trim().parse().ok()?))
        })
        .collect();

    let secs = seconds.to_string();
    let mut results: Vec<[serde_json::Value; 2]> = vec![];
    for (kind, streams) in [
        ("throughput", "1"),
        ("throughput", "4"),
        ("latency", "1"),
        ("connect", "4"),
    ] {
        let pair = [0, 1].map(|i| {
            let p = &paths[i];
            let r = load_in(
                p,
                &["--kind", kind, "--streams", streams, "--seconds", &secs],
            );
            eprintln!("{:>6} {kind} x{streams}: {r}", p.name);
            r
        });
        results.push(pair);
    }
    // Observe on and off: the same connection test through the mesh, alternately with and
    // without `signet observe -f` following every agent's flow log (the ring records either
    // way; off means no one reads it). One sample of each, minutes apart, said more about the
    // machine (other tenants' load, the hypervisor's steal) than about observe: three pairs,
    // back to back, and the median of each side.
    const ROUNDS: usize = 3;
    let observed = args.value("--signet").map(|signet| {
        let connect = || {
            let r = load_in(
                &paths[1],
                &["--kind", "connect", "--streams", "4", "--seconds", &secs],
            );
            get_f64(&r, "per_s")
        };
        let (mut off, mut on, mut records, mut lost) = (vec![], vec![], 0u64, 0u64);
        for round in 1..=ROUNDS {
            off.push(connect());
            let mut follower = Command::new(signet)
                .args([
                    "observe",
                    "-f",
                    "-o",
                    "json",
                    "--topology",
                    args.need("--topology"),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| fail(format!("{signet}: {e}")));
            let out = follower
                .stdout
                .take()
                .unwrap_or_else(|| fail("no stdout".into()));
            let counter = std::thread::spawn(move || {
                let (mut records, mut lost) = (0u64, 0u64);
                for line in
                    std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok)
                {
                    match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(v) if v["lost"].is_u64() => lost += v["lost"].as_u64().unwrap_or(0),
                        Ok(_) => records += 1,
                        Err(_) => {}
                    }
                }
                (records, lost)
            });
            std::thread::sleep(Duration::from_millis(500));
            on.push(connect());
            let _ = follower.kill();
            let _ = follower.wait();
            let (r, l) = counter.join().unwrap_or((0, 0));
            records += r;
            lost += l;
            eprintln!(
                "signet connect x4, round {round}: observe off {:.0}/s, on {:.0}/s",
                off[round - 1],
                on[round - 1]
            );
        }
        (median(&mut off), median(&mut on), records, lost)
    });
    let rss_idle: Vec<(String, u64)> = agents
        .iter()
        .map(|(n, p)| (n.clone(), rss_kib(*p)))
        .collect();
    let rss_held = hold_and_measure(&paths[1], &agents);

    println!(
        "\nSignet mesh benchmark: node-a -> node-b, {seconds} s per figure, same run, same underlay"
    );
    println!(
        "{:<34} {:>14} {:>14} {:>10}",
        "", "direct", "through Signet", "ratio"
    );
    let row = |label: &str, d: f64, s: f64, unit: &str| {
        println!(
            "{label:<34} {:>10.2} {unit:<3} {:>10.2} {unit:<3} {:>9.2}x",
            d,
            s,
            s / d
        );
    };
    let get = get_f64;
    row(
        "throughput, 1 stream",
        get(&results[0][0], "gbit_per_s"),
        get(&results[0][1], "gbit_per_s"),
        "Gb/s",
    );
    row(
        "throughput, 4 streams",
        get(&results[1][0], "gbit_per_s"),
        get(&results[1][1], "gbit_per_s"),
        "Gb/s",
    );
    let (d50, s50) = (get(&results[2][0], "p50_us"), get(&results[2][1], "p50_us"));
    row("1 KiB request/response p50", d50, s50, "µs");
    row(
        "1 KiB request/response p99",
        get(&results[2][0], "p99_us"),
        get(&results[2][1], "p99_us"),
        "µs",
    );
    println!(
        "{:<34} {:>+10.1} µs per request at p50",
        "  added by the mesh",
        s50 - d50
    );
    row(
        "new connections/s (4 clients)",
        get(&results[3][0], "per_s"),
        get(&results[3][1], "per_s"),
        "/s",
    );
    if let Some((off, on, records, lost)) = &observed {
        println!(
            "{:<34} {:>10.2} /s  {:>10.2} /s  {:>9.2}x  (observe off / on, median of {ROUNDS} pairs)",
            "  with signet observe -f following",
            off,
            on,
            on / off
        );
        println!(
            "  the follower received {records} flow records during them, {lost} reported lost"
        );
    }
    let failed = get(&results[3][1], "failed");
    if failed > 0.0 {
        println!("  {failed} mesh connections failed during the connection test");
    }
    println!("\nagent memory (VmRSS):");
    for ((node, idle), (_, held)) in rss_idle.iter().zip(&rss_held) {
        println!(
            "  {node}: {:.1} MiB idle, {:.1} MiB with 1,000 connections open through it",
            *idle as f64 / 1024.0,
            *held as f64 / 1024.0
        );
    }
}

fn text(v: &serde_json::Value) -> String {
    v.as_str()
        .unwrap_or_else(|| fail(format!("topology: expected a string, got {v}")))
        .to_owned()
}

fn spawn_server(netns: &str, ip: &str) -> ServerProcess {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(["serve", "--netns", netns, "--ip", ip])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(format!("starting the server in {netns}: {e}")));
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().expect("stderr")),
        &mut line,
    );
    if line.trim() != "listening" {
        fail(format!("server in {netns} did not start: {line}"));
    }
    ServerProcess(child)
}

/// Killed on drop, so a failed run leaves nothing behind.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn load_command(p: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("own path"));
    c.args(["load", "--netns", &p.netns, "--ip", &p.server_ip]);
    if let Some(cg) = &p.cgroup {
        c.args(["--cgroup", cg]);
    }
    c.args(extra);
    c
}

fn get_f64(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// The middle of `xs` (the upper middle of an even count).
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn load_in(p: &Path, extra: &[&str]) -> serde_json::Value {
    let out = load_command(p, extra)
        .output()
        .unwrap_or_else(|e| fail(format!("load: {e}")));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        fail(format!(
            "{} load {extra:?}: {e}: {}",
            p.name,
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// Holds 1,000 connections through the mesh and reads each agent's RSS meanwhile.
fn hold_and_measure(p: &Path, agents: &[(String, u32)]) -> Vec<(String, u64)> {
    let mut child = load_command(p, &["--kind", "hold", "--count", "1000", "--seconds", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(format!("hold: {e}")));
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stderr.take().expect("stderr")),
        &mut line,
    );
    if line.trim() != "held" {
        fail(format!("holding 1,000 connections failed: {line}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss = agents
        .iter()
        .map(|(n, pid)| (n.clone(), rss_kib(*pid)))
        .collect();
    let _ = child.wait();
    rss
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
