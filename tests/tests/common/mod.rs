//! Shared harness for the privileged suites: the root check, and guards that own a cgroup, a
//! pin folder and network namespaces with unique names and remove them on drop, also when a
//! test fails.
#![allow(dead_code)] // each suite uses part of it

pub mod kubelet;
pub mod packets;
pub mod tc;
pub mod topology;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use signet_agent::datapath::loader::{LoaderConfig, MapSizes, cleanup};

/// Subnets of the `NetEnv`s of this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

pub use signet_test_support::cgroup::Cgroup;
pub use signet_test_support::netns::in_netns;
use signet_test_support::{ip, unique};

/// A cgroup and a pin folder of our own, removed on drop.
pub struct Env {
    pub cgroup: Cgroup,
    pub pin_dir: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let cgroup = Cgroup::new();
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(cgroup.name()),
            cgroup,
        }
    }

    pub fn loader(&self) -> LoaderConfig {
        LoaderConfig {
            pin_dir: self.pin_dir.clone(),
            cgroup: self.cgroup.path.clone(),
            sizes: MapSizes {
                policy: 1024,
                ..MapSizes::default()
            },
        }
    }

    /// Runs the test client inside the cgroup; returns its JSON report.
    pub fn connect(&self, target: &str) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .args(["--connect", target])
            .output()
            .expect("run signet-test-client");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("client prints JSON")
    }

    /// Programs attached to our cgroup, by name, as the kernel reports them.
    pub fn attached(&self) -> BTreeMap<String, usize> {
        let out = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&self.cgroup.path)
            .output()
            .expect("bpftool (apt-get install bpftool)");
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut counts = BTreeMap::new();
        for p in list.as_array().into_iter().flatten() {
            if let Some(name) = p["name"].as_str() {
                *counts.entry(name.to_owned()).or_default() += 1;
            }
        }
        counts
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Before the cgroup goes (its own drop): the links pinned here hold it.
        let _ = cleanup(&self.pin_dir);
    }
}

/// Three network namespaces: a node, a pod joined to it by a veth, and a peer (another
/// workload, or the outside) joined by another veth, routed through the node. Addresses are
/// private to these namespaces. Deleting the namespaces on drop removes the veths with them.
pub struct NetEnv {
    pub node: String,
    pub pod: String,
    pub peer: String,
    /// Host-side veth of the pod, in the node namespace (where the tc program goes).
    pub pod_host_if: String,
    pub pod_ip: String,
    pub peer_ip: String,
    pub node_pod_side_ip: String,
    /// IPv6 addresses beside the IPv4 ones, so both paths are proven.
    pub pod_ip6: String,
    pub peer_ip6: String,
    /// The pod's veth name inside the pod namespace.
    pod_inner_if: String,
    /// The third octet of this environment's subnets.
    n: u32,
}

impl NetEnv {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) % 250;
        let id = format!("{}{n}", std::process::id() % 100_000);
        let env = Self {
            node: format!("signet-t{id}-node"),
            pod: format!("signet-t{id}-pod"),
            peer: format!("signet-t{id}-peer"),
            pod_host_if: format!("sgh{id}"),
            pod_ip: format!("10.250.{n}.2"),
            peer_ip: format!("10.251.{n}.2"),
            node_pod_side_ip: format!("10.250.{n}.1"),
            pod_ip6: format!("fd00:250:{n}::2"),
            peer_ip6: format!("fd00:251:{n}::2"),
            pod_inner_if: format!("sgp{id}"),
            n,
        };
        for ns in [&env.node, &env.pod, &env.peer] {
            ip(&["netns", "add", ns]);
        }
        let peer_host_if = format!("sgq{id}");
        env.link(&env.pod, &env.pod_host_if, &env.pod_inner_if, 250);
        env.link(&env.peer, &peer_host_if, &format!("sgr{id}"), 251);
        ip(&["-n", &env.node, "link", "set", "lo", "up"]);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &env.node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ])
            .output()
            .expect("sysctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }

    /// A veth from the node to `ns` on subnets `10.<net>.<n>.0/24` and `fd00:<net>:<n>::/64`
    /// (node `.1`/`::1`, far side `.2`/`::2`), the node being the far side's default route.
    fn link(&self, ns: &str, host_if: &str, inner_if: &str, net: u32) {
        let n = self.n;
        let node = self.node.as_str();
        ip(&[
            "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", inner_if, "netns",
            ns,
        ]);
        for (side, dev, host) in [(node, host_if, 1), (ns, inner_if, 2)] {
            ip(&[
                "-n",
                side,
                "addr",
                "add",
                &format!("10.{net}.{n}.{host}/24"),
                "dev",
                dev,
            ]);
            let v6 = format!("fd00:{net}:{n}::{host}/64");
            ip(&["-n", side, "addr", "add", &v6, "dev", dev, "nodad"]);
            ip(&["-n", side, "link", "set", dev, "up"]);
        }
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{net}.{n}.1"),
        ]);
        let via6 = format!("fd00:{net}:{n}::1");
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &via6]);
    }

    /// Deletes the pod's veth and makes a new one under the same names, as a pod re-created
    /// under its old name gets (Calico names host veths after the pod).
    pub fn recreate_pod_veth(&self) {
        ip(&["-n", &self.node, "link", "del", &self.pod_host_if]);
        self.link(&self.pod, &self.pod_host_if, &self.pod_inner_if, 250);
    }

    /// Runs `signet-test-client` as a process of the pod: in `cgroup` (where the connect
    /// programs are attached), then in the pod's namespace.
    pub fn pod_client(
        &self,
        cgroup: &std::path::Path,
        target: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--netns", &self.pod, "--connect", target])
            .args(extra)
            .output()
            .expect("client");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// The ifindex of the pod's host-side veth in the node namespace.
    pub fn pod_host_ifindex(&self) -> u32 {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.node,
                "-j",
                "link",
                "show",
                "dev",
                &self.pod_host_if,
            ])
            .output()
            .expect("ip");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        v[0]["ifindex"].as_u64().expect("ifindex") as u32
    }

    /// Runs `f` on a thread inside the node namespace (for attaching tc programs there).
    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.node, f)
    }

    /// Starts `signet-test-client` as a server in `ns`; it exits after `count` requests or the
    /// timeout and prints what it served.
    pub fn serve(
        &self,
        ns: &str,
        addr: &str,
        udp: bool,
        count: usize,
        timeout_ms: u64,
    ) -> std::process::Child {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_signet-test-client"),
        ]);
        spawn_server(cmd, addr, udp, count, timeout_ms)
    }

    /// Starts `signet-test-client` as a server that is a process of the pod: in `cgroup` (where
    /// the socket programs are attached), then in the pod's namespace.
    pub fn serve_in_pod(
        &self,
        cgroup: &std::path::Path,
        addr: &str,
        udp: bool,
        count: usize,
    ) -> std::process::Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_signet-test-client"));
        cmd.arg("--cgroup").arg(cgroup).args(["--netns", &self.pod]);
        spawn_server(cmd, addr, udp, count, 3000)
    }

    /// Runs `signet-test-client` as a client in `ns`.
    pub fn client(&self, ns: &str, target: &str, extra: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_signet-test-client"),
                "--connect",
                target,
            ])
            .args(extra)
            .output()
            .expect("client");
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("client JSON")
    }
}

impl Drop for NetEnv {
    fn drop(&mut self) {
        for ns in [&self.peer, &self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Starts the server `cmd` (a `signet-test-client` invocation) on `addr` and waits until it
/// listens.
pub fn spawn_server(
    mut cmd: Command,
    addr: &str,
    udp: bool,
    count: usize,
    timeout_ms: u64,
) -> std::process::Child {
    cmd.args(["--listen", addr])
        .args(["--count", &count.to_string()])
        .args(["--timeout-ms", &timeout_ms.to_string()]);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut err, &mut line);
    assert_eq!(line.trim(), "listening", "server did not start: {line}");
    child
}

/// The cookie of network namespace `/run/netns/<name>`, as the connect programs see it.
pub fn netns_cookie(name: &str) -> u64 {
    let path = signet_agent::datapath::netns::path_of(name);
    signet_agent::datapath::netns::cookies(&[path])
        .remove(0)
        .expect("netns cookie")
}
