//! `signet-tc-bench` (root; not a test): what the tc programs cost per packet.
//!
//! A node namespace and a pod namespace joined by a veth, the tc programs on its node side as
//! the agent puts them (towards the pod: TCX egress; from the pod: TCX ingress), the pod an
//! enforced endpoint with a policy that admits the traffic. Rounds interleave sending UDP
//! datagrams node → pod and pod → node with the programs attached and detached (the
//! unprogrammed path), and report the sender's time per datagram both ways and the programs' own
//! run time per packet from the kernel's BPF statistics.
//!
//!     cargo build --release -p signet-tests --bin signet-tc-bench
//!     sudo $CARGO_TARGET_DIR/release/signet-tc-bench [--rounds 10] [--per-round 20000] [--objects DIR]
//!
//! `--objects DIR` loads `tc_to_endpoint.o` and `tc_from_endpoint.o` from DIR instead of the
//! embedded ones: an older build's, for a before/after comparison on one machine (the maps this
//! uses, ipcache, endpoints by ifindex, policy and config, keep their layout).
//!
//! All traffic stays inside the two namespaces it creates; they, the veth and the pin folder are
//! removed at the end, also when it fails (failures panic, so the guard's drop runs).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use aya::programs::links::FdLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use signet_bpf::maps::{
    ACTION_ALLOW, ACTION_DENY, Config, DIRECTION_EGRESS, DIRECTION_INGRESS, EndpointValue,
    IPCACHE_MESH, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue,
};
use signet_bpf::{map_names, programs};
use signet_tests::{Args, fail};

const POD_ID: u32 = 300;
const NODE_ID: u32 = 400;
const TO_POD_PORT: u16 = 5000;
const FROM_POD_PORT: u16 = 5001;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    if !out.status.success() {
        panic!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The namespaces, veth and pins, removed on drop.
struct Net {
    node: String,
    pod: String,
    host_if: String,
    pin_dir: PathBuf,
}

impl Net {
    fn new() -> Self {
        let id = std::process::id();
        let net = Self {
            node: format!("sgtb{id}-node"),
            pod: format!("sgtb{id}-pod"),
            host_if: format!("sgtbh{}", id % 100_000),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(format!("signet-tc-bench-{id}")),
        };
        for ns in [&net.node, &net.pod] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let inner = format!("sgtbp{}", id % 100_000);
        ip(&[
            "-n",
            &net.node,
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            &net.pod,
        ]);
        for (ns, dev, addr) in [
            (&net.node, &net.host_if, "10.253.0.1/24"),
            (&net.pod, &inner, "10.253.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn load(objects: Option<&Path>, name: &str, embedded: &'static [u8], pins: &Path) -> Ebpf {
    let bytes = match objects {
        Some(dir) => std::fs::read(dir.join(format!("{name}.o")))
            .unwrap_or_else(|e| panic!("{}/{name}.o: {e}", dir.display())),
        None => embedded.to_vec(),
    };
    EbpfLoader::new()
        .default_map_pin_directory(pins)
        .load(&bytes)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn map(pins: &Path, name: &str) -> MapData {
    MapData::from_pin(pins.join(name)).unwrap_or_else(|e| panic!("map {name}: {e}"))
}

/// Fills the maps: the pod is endpoint 1 behind `ifindex`; the node (identity 400) may send to
/// the pod's UDP port and the pod to the node's; every other UDP is denied both ways.
fn program_maps(pins: &Path, ifindex: u32) {
    let mut config: Array<MapData, Config> =
        Array::try_from(aya::maps::Map::Array(map(pins, map_names::CONFIG))).expect("config");
    config
        .set(
            0,
            Config {
                proxy_addr4: [10, 253, 0, 1],
                proxy_port: 15001,
                ..Config::default()
            },
            0,
        )
        .expect("config");
    let mut eps: HashMap<MapData, u32, EndpointValue> =
        HashMap::try_from(aya::maps::Map::HashMap(map(pins, map_names::EP_IFINDEX))).expect("eps");
    let ep = EndpointValue {
        endpoint_id: 1,
        identity: POD_ID,
        flags: 0,
        _pad: 0,
    };
    eps.insert(ifindex, ep, 0).expect("endpoint");
    let mut ipcache: LpmTrie<MapData, [u8; 16], IpcacheValue> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(map(pins, map_names::IPCACHE))).expect("ipcache");
    for (addr, identity) in [("10.253.0.2", POD_ID), ("10.253.0.1", NODE_ID)] {
        let k = IpcacheKey::new(addr.parse().expect("ip"), 32);
        let v = IpcacheValue {
            identity,
            flags: if identity == POD_ID { IPCACHE_MESH } else { 0 },
        };
        ipcache
            .insert(&LpmKey::new(k.prefixlen, k.addr), v, 0)
            .expect("ipcache");
    }
    let mut policy: HashMap<MapData, PolicyKey, PolicyValue> =
        HashMap::try_from(aya::maps::Map::HashMap(map(pins, map_names::POLICY))).expect("policy");
    for (direction, peer, port, action) in [
        (DIRECTION_INGRESS, NODE_ID, TO_POD_PORT, ACTION_ALLOW),
        (DIRECTION_INGRESS, 0, 0, ACTION_DENY),
        (DIRECTION_EGRESS, NODE_ID, FROM_POD_PORT, ACTION_ALLOW),
        (DIRECTION_EGRESS, 0, 0, ACTION_DENY),
    ] {
        let k = PolicyKey {
            endpoint_id: 1,
            peer_identity: peer,
            dport: port,
            protocol: 17,
            direction,
        };
        policy
            .insert(
                k,
                PolicyValue {
                    action,
                    _pad: [0; 3],
                    rule_id: 1,
                },
                0,
            )
            .expect("policy");
    }
}

fn attach(obj: &mut Ebpf, name: &str, ifname: &str, at: TcAttachType) -> FdLink {
    let prog: &mut SchedClassifier = obj
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("{name} not in the object"));
    if prog.fd().is_err() {
        prog.load().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let id = prog
        .attach(ifname, at)
        .unwrap_or_else(|e| panic!("attach {name}: {e}"));
    prog.take_link(id)
        .expect("link")
        .try_into()
        .unwrap_or_else(|_| panic!("not a TCX link (kernel >= 6.6?)"))
}

fn run_stats(obj: &Ebpf, name: &str) -> (Duration, u64) {
    let prog: &SchedClassifier = obj
        .program(name)
        .and_then(|p| p.try_into().ok())
        .expect("program");
    let info = prog.info().expect("program info");
    (info.run_time(), info.run_count())
}

/// Sends `n` datagrams from `from` to `to`; the time per datagram.
fn blast(from: &UdpSocket, to: SocketAddr, n: usize) -> Duration {
    let payload = [0u8; 64];
    let t = Instant::now();
    for _ in 0..n {
        let _ = from.send_to(&payload, to);
    }
    t.elapsed() / n as u32
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let args = Args::from_env();
    let rounds = args.number("--rounds", 10) as usize;
    let per_round = args.number("--per-round", 20_000) as usize;
    let objects = args.value("--objects").map(PathBuf::from);
    if let Err(e) = signet_agent::datapath::bpffs::ensure_mounted() {
        fail(e.to_string());
    }
    let net = Net::new();
    std::fs::create_dir_all(&net.pin_dir).expect("pin dir");
    let mut to = load(
        objects.as_deref(),
        "tc_to_endpoint",
        signet_bpf::TC_TO_ENDPOINT.bytes,
        &net.pin_dir,
    );
    let mut from = load(
        objects.as_deref(),
        "tc_from_endpoint",
        signet_bpf::TC_FROM_ENDPOINT.bytes,
        &net.pin_dir,
    );

    // The pod's sockets are made in its namespace; the rest of the run is in the node's.
    let (pod_rx, pod_tx) = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&net.pod);
            let rx = UdpSocket::bind(("10.253.0.2", TO_POD_PORT)).expect("pod rx");
            let tx = UdpSocket::bind("10.253.0.2:0").expect("pod tx");
            (rx, tx)
        })
        .join()
        .expect("pod sockets")
    });
    enter(&net.node);
    let ifindex = nix::net::if_::if_nametoindex(net.host_if.as_str()).expect("ifindex");
    program_maps(&net.pin_dir, ifindex);
    let node_rx = UdpSocket::bind(("10.253.0.1", FROM_POD_PORT)).expect("node rx");
    let node_tx = UdpSocket::bind("10.253.0.1:0").expect("node tx");
    for s in [&pod_rx, &node_rx] {
        s.set_nonblocking(true).expect("nonblocking");
    }
    let drain = |s: &UdpSocket| {
        let mut buf = [0u8; 128];
        while s.recv(&mut buf).is_ok() {}
    };
    let to_pod: SocketAddr = ([10, 253, 0, 2], TO_POD_PORT).into();
    let to_node: SocketAddr = ([10, 253, 0, 1], FROM_POD_PORT).into();

    let _stats: OwnedFd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .unwrap_or_else(|e| panic!("BPF_ENABLE_STATS: {e}"));
    let (mut with_in, mut without_in, mut with_out, mut without_out) =
        (vec![], vec![], vec![], vec![]);
    let (mut prog_to, mut prog_from) = ((Duration::ZERO, 0u64), (Duration::ZERO, 0u64));
    for _ in 0..rounds {
        let links = [
            attach(
                &mut to,
                programs::TO_ENDPOINT,
                &net.host_if,
                TcAttachType::Egress,
            ),
            attach(
                &mut from,
                programs::FROM_ENDPOINT,
                &net.host_if,
                TcAttachType::Ingress,
            ),
        ];
        let (t0, f0) = (
            run_stats(&to, programs::TO_ENDPOINT),
            run_stats(&from, programs::FROM_ENDPOINT),
        );
        with_in.push(blast(&node_tx, to_pod, per_round));
        with_out.push(blast(&pod_tx, to_node, per_round));
        let (t1, f1) = (
            run_stats(&to, programs::TO_ENDPOINT),
            run_stats(&from, programs::FROM_ENDPOINT),
        );
        prog_to = (prog_to.0 + (t1.0 - t0.0), prog_to.1 + (t1.1 - t0.1));
        prog_from = (prog_from.0 + (f1.0 - f0.0), prog_from.1 + (f1.1 - f0.1));
        drop(links);
        drain(&pod_rx);
        drain(&node_rx);
        without_in.push(blast(&node_tx, to_pod, per_round));
        without_out.push(blast(&pod_tx, to_node, per_round));
        drain(&pod_rx);
        drain(&node_rx);
    }
    let ns = |d: Duration| d.as_secs_f64() * 1e9;
    let per = |(t, n): (Duration, u64)| if n == 0 { 0.0 } else { ns(t) / n as f64 };
    println!(
        "tc per packet, {} rounds of {} 64-byte UDP datagrams each way ({} objects):",
        rounds,
        per_round,
        objects
            .as_deref()
            .map_or("embedded".to_owned(), |d| d.display().to_string())
    );
    for (what, with, without, prog) in [
        (
            "node -> pod (tc towards the pod)",
            &mut with_in,
            &mut without_in,
            prog_to,
        ),
        (
            "pod -> node (tc from the pod)   ",
            &mut with_out,
            &mut without_out,
            prog_from,
        ),
    ] {
        let (w, wo) = (median(with), median(without));
        println!(
            "  {what}: send {:>7.1} ns with programs, {:>7.1} ns without -> {:.3}x; program {:>6.1} ns/packet over {} runs",
            ns(w),
            ns(wo),
            w.as_secs_f64() / wo.as_secs_f64(),
            per(prog),
            prog.1
        );
    }
    drop((to, from));
    drop(net);
}
