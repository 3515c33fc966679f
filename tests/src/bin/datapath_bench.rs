//! `signet-datapath-bench` (root; not a test): what the eBPF datapath costs.
//!
//! - `connect()` latency in a cgroup with Signet's programs attached vs an identical cgroup
//!   without, interleaved round by round in one run, for a non-mesh destination (programs look
//!   and pass) and for a mesh destination (redirected to a proxy listener, against a direct
//!   connect to that listener from the plain cgroup).
//! - Policy map update rate for a 10,000-entry change (insert, change, remove).
//!
//! Run:
//!
//!     cargo build --release -p signet-tests --bin signet-datapath-bench
//!     sudo $CARGO_TARGET_DIR/release/signet-datapath-bench [--rounds 20] [--per-round 200]
//!
//! All traffic is on loopback. It makes its own cgroups and pin folder and removes them.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use signet_agent::datapath::loader::{KernelDatapath, LoaderConfig, MapSizes, cleanup};
use signet_agent::datapath::{Datapath, DatapathConfig, EndpointKey, IpcacheEntry};
use signet_bpf::maps::EndpointValue;
use signet_policy::compile::{Action, Compiled, Entry, Key};
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;
use socket2::{Domain, SockAddr, Socket, Type};

const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Accepts and drops connections forever (the process exits at the end).
fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    addr
}

fn join(cgroup: &Path) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("join cgroup");
}

/// One connect() to `addr`, closed with RST so no TIME_WAIT piles up.
fn connect_once(addr: SocketAddr) -> Duration {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let t = Instant::now();
    s.connect(&SockAddr::from(addr)).expect("connect");
    let d = t.elapsed();
    let _ = s.set_linger(Some(Duration::ZERO));
    d
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

struct Cleanup {
    cgroups: Vec<PathBuf>,
    pin_dir: PathBuf,
    home: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        join(&self.home);
        let _ = cleanup(&self.pin_dir);
        for c in &self.cgroups {
            let _ = std::fs::remove_dir(c);
        }
    }
}

fn main() {
    let rounds = arg("--rounds", 20);
    let per_round = arg("--per-round", 200);
    let home = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .map(|p| PathBuf::from(CGROUP2).join(p.trim_start_matches('/')))
        .expect("this process's cgroup v2 path");
    let name = format!("signet-bench-{}", std::process::id());
    let with = PathBuf::from(CGROUP2).join(format!("{name}-with"));
    let without = PathBuf::from(CGROUP2).join(format!("{name}-without"));
    std::fs::create_dir(&with).expect("cgroup");
    std::fs::create_dir(&without).expect("cgroup");
    let guard = Cleanup {
        cgroups: vec![with.clone(), without.clone()],
        pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
        home,
    };

    let target = sink();
    let proxy = sink();
    let mut dp = KernelDatapath::load(&LoaderConfig {
        pin_dir: guard.pin_dir.clone(),
        cgroup: with.clone(),
        sizes: MapSizes::default(),
    })
    .expect("load datapath");
    dp.set_config(&DatapathConfig {
        proxy_v4: "127.0.0.1".parse().expect("ip"),
        proxy_v6: None,
        proxy_port: proxy.port(),
        strict: true,
        proxy_mark: 1,
        event_sample: 0,
    })
    .expect("config");
    // The programs run only for the "with" cgroup, so this process's own network namespace can
    // stand for a pod's there.
    let netns = signet_agent::datapath::netns::current_cookie().expect("netns cookie");
    dp.reconcile_endpoints(&BTreeMap::from([(
        EndpointKey::Netns(netns),
        EndpointValue {
            endpoint_id: 1,
            identity: 300,
            flags: 0,
            _pad: 0,
        },
    )]))
    .expect("endpoints");
    dp.reconcile_ipcache(&[IpcacheEntry {
        ip: "127.0.0.2".parse().expect("ip"),
        prefix: 32,
        identity: 301,
        mesh: true,
        service: false,
    }])
    .expect("ipcache");
    let mesh: SocketAddr = "127.0.0.2:9999".parse().expect("addr");

    let (mut plain_with, mut plain_without, mut redirected, mut direct) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        join(&with);
        for _ in 0..per_round {
            plain_with.push(connect_once(target));
            redirected.push(connect_once(mesh));
        }
        join(&without);
        for _ in 0..per_round {
            plain_without.push(connect_once(target));
            direct.push(connect_once(proxy));
        }
    }
    join(&guard.home);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (pw, pwo) = (median(&mut plain_with), median(&mut plain_without));
    let (rd, dd) = (median(&mut redirected), median(&mut direct));
    println!(
        "connect() latency, median of {} per case ({} rounds interleaved):",
        rounds * per_round,
        rounds
    );
    println!(
        "  non-mesh destination: {:>7.2} µs with programs, {:>7.2} µs without  -> {:.3}x   (p99 {:.2} vs {:.2} µs)",
        us(pw),
        us(pwo),
        pw.as_secs_f64() / pwo.as_secs_f64(),
        us(p99(&mut plain_with)),
        us(p99(&mut plain_without))
    );
    println!(
        "  mesh destination:     {:>7.2} µs redirected, {:>7.2} µs direct to the same listener -> {:+.2} µs ({:.3}x)",
        us(rd),
        us(dd),
        us(rd) - us(dd),
        rd.as_secs_f64() / dd.as_secs_f64()
    );

    // Policy map: a 10,000-entry change.
    let n = 10_000u32;
    let build = |action: Action| {
        let mut c = Compiled::default();
        for i in 0..n {
            c.entries.insert(
                Key {
                    endpoint: 1 + i / 1000,
                    direction: Direction::Ingress,
                    proto: Protocol::Tcp,
                    peer: 1000 + i % 1000,
                    port: 80,
                },
                Entry { action, rule: 1 },
            );
        }
        c
    };
    let (allow, deny) = (build(Action::Allow), build(Action::Deny));
    for (what, target) in [
        ("insert", &allow),
        ("change", &deny),
        ("remove", &Compiled::default()),
    ] {
        let t = Instant::now();
        let changes = dp.reconcile_policy(target).expect("reconcile");
        let d = t.elapsed();
        let ops = changes.written + changes.removed;
        println!(
            "policy map {what:<6} {ops:>6} entries in {:>7.2} ms -> {:>9.0} updates/s (reconcile incl. reading the map)",
            d.as_secs_f64() * 1e3,
            ops as f64 / d.as_secs_f64()
        );
    }
    drop(dp);
    drop(guard);
}
