//! The local topology for end-to-end suites: node-a and node-b joined by an underlay veth, a
//! client pod on node A and a server pod on node B (each with its veth and cgroup), the CA and
//! one agent per node, each on a runtime of its own in its node's namespace. Everything is
//! removed on drop, and names carry a number unique to the run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use signet_agent::admin::metrics::Metrics;
use signet_agent::app::Agent;
use signet_agent::certs::CertManager;
use signet_agent::config::AgentConfig;
use signet_ca::server::CaServer;
use signet_ca::server::auth::sha256_hex;
use signet_ca::server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

use super::{in_netns, unique};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// node-a and node-b joined by an underlay veth; a client pod on node A and a server pod on
/// node B, each with its veth and cgroup. Everything is removed on drop.
pub struct Topology {
    pub n: u32,
    nss: Vec<String>,
    cgroups: Vec<PathBuf>,
    /// Cgroups of pods added with `add_pod` (removed before their nodes').
    pod_cgroups: Vec<PathBuf>,
    pins: Vec<PathBuf>,
    pub dir: tempfile::TempDir,
}

impl Topology {
    pub fn ns(&self, which: &str) -> String {
        format!("sgm{}-{which}", self.n)
    }
    pub fn node_ip(&self, node: char) -> String {
        format!("10.77.{}.{}", self.n, if node == 'a' { 1 } else { 2 })
    }
    pub fn pod_ip(&self, node: char) -> String {
        format!("10.{}.{}.2", if node == 'a' { 78 } else { 79 }, self.n)
    }
    pub fn cluster_ip(&self) -> String {
        format!("10.96.{}.10", self.n)
    }
    pub fn cgroup_root(&self, node: char) -> PathBuf {
        self.cgroups[if node == 'a' { 0 } else { 1 }].clone()
    }

    pub fn new() -> Self {
        // Unique among this run's topologies (the counter) and, very likely, among concurrent
        // runs (the process id); the names and subnets below carry it.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = (std::process::id() % 40) * 6
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 6
            + 1;
        let name = unique();
        let mut t = Self {
            n,
            nss: vec![],
            cgroups: vec![],
            pod_cgroups: vec![],
            pins: vec![],
            dir: tempfile::tempdir().expect("tmp"),
        };
        for w in ["node-a", "node-b", "pod-a", "pod-b"] {
            let ns = t.ns(w);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            t.nss.push(ns);
        }
        let (na, nb) = (t.ns("node-a"), t.ns("node-b"));
        ip(&[
            "-n",
            &na,
            "link",
            "add",
            &format!("sgu{n}a"),
            "type",
            "veth",
            "peer",
            "name",
            &format!("sgu{n}b"),
            "netns",
            &nb,
        ]);
        ip(&[
            "-n",
            &na,
            "addr",
            "add",
            &format!("{}/24", t.node_ip('a')),
            "dev",
            &format!("sgu{n}a"),
        ]);
        ip(&[
            "-n",
            &nb,
            "addr",
            "add",
            &format!("{}/24", t.node_ip('b')),
            "dev",
            &format!("sgu{n}b"),
        ]);
        ip(&["-n", &na, "link", "set", &format!("sgu{n}a"), "up"]);
        ip(&["-n", &nb, "link", "set", &format!("sgu{n}b"), "up"]);
        for (node, pod, net) in [('a', t.ns("pod-a"), 78), ('b', t.ns("pod-b"), 79)] {
            let node_ns = t.ns(&format!("node-{node}"));
            let host_if = format!("sgh{n}{node}");
            ip(&[
                "-n", &node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pod,
            ]);
            ip(&[
                "-n",
                &node_ns,
                "addr",
                "add",
                &format!("10.{net}.{n}.1/24"),
                "dev",
                &host_if,
            ]);
            ip(&["-n", &node_ns, "link", "set", &host_if, "up"]);
            ip(&[
                "-n",
                &pod,
                "addr",
                "add",
                &format!("10.{net}.{n}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &pod, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &pod,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{net}.{n}.1"),
            ]);
            let other = if node == 'a' { 79 } else { 78 };
            let peer_node = t.node_ip(if node == 'a' { 'b' } else { 'a' });
            ip(&[
                "-n",
                &node_ns,
                "route",
                "add",
                &format!("10.{other}.{n}.0/24"),
                "via",
                &peer_node,
            ]);
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &node_ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ])
                .output()
                .expect("sysctl");
            assert!(out.status.success());
            let cg = PathBuf::from("/sys/fs/cgroup/unified")
                .join(format!("signet-mesh-{name}-node-{node}"));
            std::fs::create_dir(&cg).expect("node cgroup");
            std::fs::create_dir(cg.join("pod")).expect("pod cgroup");
            t.cgroups.push(cg);
            t.pins
                .push(PathBuf::from("/sys/fs/bpf").join(format!("signet-mesh-{name}-node-{node}")));
        }
        t
    }

    /// Another pod on `node`, numbered `k` (1 to 99): its network namespace `ns(name)`, a veth
    /// whose node side answers ARP for the node (proxy ARP) with a /32 route to the pod, and a
    /// cgroup `name` under the node's. Its address is in the node's pod subnet (reachable from
    /// the other node), and everything goes with the topology.
    pub fn add_pod(&mut self, node: char, name: &str, k: u8) -> ExtraPod {
        assert!((1..100).contains(&k), "pod number {k}");
        let n = self.n;
        let net = if node == 'a' { 78 } else { 79 };
        let address = format!("10.{net}.{n}.{}", 10 + u32::from(k));
        let netns = self.ns(name);
        let node_ns = self.ns(&format!("node-{node}"));
        let host_if = format!("sgp{n}x{k}");
        ip(&["netns", "add", &netns]);
        self.nss.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ]);
        ip(&["-n", &node_ns, "link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{address}/32"),
            "dev",
            &host_if,
        ]);
        let out = Command::new("ip")
            .args(["netns", "exec", &node_ns, "sysctl", "-qw"])
            .arg(format!("net.ipv4.conf.{host_if}.proxy_arp=1"))
            .output()
            .expect("sysctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        let gateway = format!("10.{net}.{n}.1");
        ip(&["-n", &netns, "route", "add", &gateway, "dev", "eth0"]);
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway]);
        let cgroup = self.cgroup_root(node).join(name);
        std::fs::create_dir(&cgroup).expect("pod cgroup");
        self.pod_cgroups.push(cgroup.clone());
        ExtraPod {
            name: name.to_owned(),
            node,
            address,
            netns,
            host_if,
            cgroup,
        }
    }

    /// A shared L2 segment: a bridge in a namespace of its own (`ns("lan")`) joining both
    /// nodes (`sgl{n}a`, `sgl{n}b` on their side, [`Topology::lan_ip`] `.1` and `.2`) and a
    /// client outside the cluster (`ns("out")`, eth0 `.100`), so ARP between them is real.
    pub fn add_lan(&mut self) {
        let n = self.n;
        let (lan, out) = (self.ns("lan"), self.ns("out"));
        for ns in [&lan, &out] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            self.nss.push(ns.clone());
        }
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan, "link", "set", "br0", "up"]);
        for (who, ns, dev, host) in [
            ('a', self.ns("node-a"), format!("sgl{n}a"), 1),
            ('b', self.ns("node-b"), format!("sgl{n}b"), 2),
            ('o', out.clone(), "eth0".to_owned(), 100),
        ] {
            let port = format!("port-{who}");
            ip(&[
                "-n", &ns, "link", "add", &dev, "type", "veth", "peer", "name", &port, "netns",
                &lan,
            ]);
            ip(&["-n", &lan, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &lan, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.lan_ip(host)),
                "dev",
                &dev,
            ]);
            let v6 = format!("{}/64", self.lan_ip6(host));
            ip(&["-n", &ns, "addr", "add", &v6, "dev", &dev, "nodad"]);
            ip(&["-n", &ns, "link", "set", &dev, "up"]);
        }
    }

    /// `fd76:<n>::<host>`: an IPv6 address on the shared L2 segment.
    pub fn lan_ip6(&self, host: u8) -> String {
        format!("fd76:{}::{host}", self.n)
    }

    /// `10.76.<n>.<host>`: an address on the shared L2 segment.
    pub fn lan_ip(&self, host: u8) -> String {
        format!("10.76.{}.{host}", self.n)
    }

    /// An address outside the cluster (no pod, no node): on node B's loopback, routed to from
    /// node A over the underlay. The namespaces are the test's own.
    pub fn add_world_address(&self, addr: &str) {
        let (na, nb) = (self.ns("node-a"), self.ns("node-b"));
        ip(&["-n", &nb, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        ip(&[
            "-n",
            &na,
            "route",
            "add",
            &format!("{addr}/32"),
            "via",
            &self.node_ip('b'),
        ]);
    }

    /// `signet-test-client` as a server in node B's namespace, on one of its addresses.
    pub fn node_b_server(&self, addr: &str, udp: bool) -> std::process::Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns("node-b")])
            .arg(env!("CARGO_BIN_EXE_signet-test-client"));
        super::spawn_server(c, addr, udp, 1000, 60_000)
    }

    /// The topology's description as `signet status` and `signet connectivity test` read it
    /// (the demo writes the same shape): each node's network namespace, agent admin address,
    /// cgroup root and underlay interface, the CA, the state directory, and what the suite may
    /// take for its pods (a /20 of this topology's own). Returns its path.
    pub fn write_topology_json(&self) -> PathBuf {
        let n = self.n;
        let nodes: Vec<serde_json::Value> = ['a', 'b']
            .iter()
            .map(|node| {
                serde_json::json!({
                    "name": format!("node-{node}"),
                    "netns": self.ns(&format!("node-{node}")),
                    "address": self.node_ip(*node),
                    "agentAdmin": "127.0.0.1:15020",
                    "cgroupRoot": self.cgroup_root(*node),
                    "underlay": format!("sgu{n}{node}"),
                })
            })
            .collect();
        let ca = serde_json::json!({"netns": self.ns("node-a"), "admin": CA_ADMIN});
        let connectivity = serde_json::json!({
            "subnets": format!("10.{}.{}.0/20", 100 + n / 16, (n % 16) * 16),
            "serviceIP": format!("10.96.{n}.250"),
            "gatewayPort": 18000,
        });
        let path = self.dir.path().join("topology.json");
        std::fs::write(
            &path,
            serde_json::json!({
                "nodes": nodes,
                "ca": ca,
                "stateDir": self.dir.path().join("state"),
                "trustDomain": "cluster.local",
                "connectivity": connectivity,
            })
            .to_string(),
        )
        .expect("topology.json");
        path
    }

    pub fn write_state(&self, extra: &str) {
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::write(state.join("cluster.yaml"), self.cluster_yaml()).expect("state");
        std::fs::write(state.join("policy.yaml"), extra).expect("policy");
    }

    /// The topology's Nodes, Namespace, Pods, Service and EndpointSlice as Kubernetes YAML.
    pub fn cluster_yaml(&self) -> String {
        let n = self.n;
        let mut y = String::new();
        for (node, ip) in [('a', self.node_ip('a')), ('b', self.node_ip('b'))] {
            y += &format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{node}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n---\n"
            );
        }
        y += "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n";
        for (node, pod, sa) in [('a', "client-0", "client"), ('b', "server-0", "server")] {
            let netns = self.ns(&format!("pod-{node}"));
            y += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: shop\n  labels: {{app: {sa}}}\n  annotations: {{signet.dev/cgroup: pod, signet.dev/netns: {netns}, signet.dev/host-interface: sgh{n}{node}}}\n\
                 spec: {{nodeName: node-{node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: {}}}\n---\n",
                self.pod_ip(node)
            );
        }
        // A Service in front of the server: ClusterIP port 80 → the pod's 8080, 81 → 8081.
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: shop}}\n\
             spec: {{clusterIP: {}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: alt, port: 81, targetPort: 8081}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: server-1, namespace: shop, labels: {{kubernetes.io/service-name: server}}}}\n\
             ports: [{{name: http, port: 8080}}, {{name: alt, port: 8081}}]\nendpoints: [{{addresses: [{}], conditions: {{ready: true}}}}]\n",
            self.cluster_ip(),
            self.pod_ip('b')
        );
        y
    }

    pub fn agent_config(&self, node: char, ca: &str, root: &Path, extra: &str) -> AgentConfig {
        let source = "clusterStateDir: state\nidentityTable: identities.json\n";
        self.agent_config_from(node, source, ca, root, extra)
    }

    /// An agent configuration reading the cluster as `source` says (a state directory, or the
    /// API server).
    pub fn agent_config_from(
        &self,
        node: char,
        source: &str,
        ca: &str,
        root: &Path,
        extra: &str,
    ) -> AgentConfig {
        let token = self.dir.path().join(format!("node-{node}.token"));
        std::fs::write(&token, format!("token-{node}")).expect("token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let ip = self.node_ip(node);
        let yaml = format!(
            "node: node-{node}\n{source}\
             ca: {{address: '{ca}', rootCertFile: {}, tokenFile: {}}}\n\
             datapath: {{cgroupRoot: {}, bpffsDir: {}}}\n\
             listen: {{outbound: '{ip}:15001', inbound: '{ip}:15008', admin: '127.0.0.1:15020'}}\n{extra}",
            root.display(),
            token.display(),
            self.cgroup_root(node).display(),
            self.pins[if node == 'a' { 0 } else { 1 }].display()
        );
        AgentConfig::parse(&yaml, &self.dir.path().join("agent.yaml"), self.dir.path())
            .expect("agent config")
    }

    /// GET `path` on node `node`'s agent admin port, from inside the node's namespace: the
    /// status code (0 when nothing answers) and the body.
    /// Waits until both agents have looked at the state directory as it is now (applied, or
    /// refused with the snapshot in force kept), by the revision their `/debug/state` reports.
    pub fn settle(&self) {
        let dir = self.dir.path().join("state");
        let want = signet_agent::reconcile::dir_revision(&dir);
        for node in ['a', 'b'] {
            signet_test_support::wait_for(
                &format!("node-{node} to apply state revision {want}"),
                || {
                    let (status, body) = self.admin_get(node, "/debug/state");
                    let state: serde_json::Value = serde_json::from_str(&body).ok()?;
                    (status == 200 && state["revision"] == want.as_str()).then_some(())
                },
            );
        }
    }

    pub fn admin_get(&self, node: char, path: &str) -> (u16, String) {
        in_netns(&self.ns(&format!("node-{node}")), || {
            use std::io::{Read as _, Write as _};
            let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:15020") else {
                return (0, String::new());
            };
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
            let mut text = String::new();
            if s.write_all(request.as_bytes()).is_err() || s.read_to_string(&mut text).is_err() {
                return (0, String::new());
            }
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = text
                .split_once("\r\n\r\n")
                .map_or("", |(_, b)| b)
                .to_owned();
            (status, body)
        })
    }

    /// The test client as a process of the client pod (its netns and cgroup).
    pub fn client_command(&self, target: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_signet-test-client"));
        c.arg("--cgroup")
            .arg(self.cgroup_root('a').join("pod"))
            .args([
                "--netns",
                &self.ns("pod-a"),
                "--connect",
                target,
                "--timeout-ms",
                "3000",
            ])
            .args(extra);
        c
    }

    /// Runs the test client in the client pod and returns its report.
    pub fn client_with(&self, target: &str, extra: &[&str]) -> serde_json::Value {
        let out = self.client_command(target, extra).output().expect("client");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    pub fn client(&self, target: &str) -> serde_json::Value {
        self.client_with(target, &[])
    }

    /// Plaintext from the client pod's namespace by a process outside the node's cgroup subtree,
    /// where the connect programs do not run: it bypasses the proxy, and only tc stands in the
    /// way. (Every process under the node's subtree, in any cgroup, is captured.)
    pub fn bypassing_client(&self, target: &str) -> serde_json::Value {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("pod-a"),
                env!("CARGO_BIN_EXE_signet-test-client"),
            ])
            .args(["--connect", target, "--timeout-ms", "1000"])
            .output()
            .expect("client");
        serde_json::from_slice(&out.stdout).expect("json")
    }

    pub fn server(&self, port: u16) -> Server {
        self.server_with(port, &[])
    }

    pub fn server_with(&self, port: u16, extra: &[&str]) -> Server {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("pod-b"),
                env!("CARGO_BIN_EXE_signet-test-client"),
            ])
            .args([
                "--listen",
                &format!("{}:{port}", self.pod_ip('b')),
                "--count",
                "100000",
                "--timeout-ms",
                "300000",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("server");
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stderr.take().expect("stderr")),
            &mut line,
        );
        assert_eq!(line.trim(), "listening");
        Server(child)
    }
}

/// A pod made by `Topology::add_pod`.
#[derive(Debug, Clone)]
pub struct ExtraPod {
    pub name: String,
    pub node: char,
    pub address: String,
    pub netns: String,
    pub host_if: String,
    pub cgroup: PathBuf,
}

impl ExtraPod {
    /// Its Pod manifest (namespace `shop`, service account `sa`, label `app: <app>`), with the
    /// placement annotations the local topology trusts.
    pub fn manifest(&self, app: &str, sa: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}}}\n  \
             annotations: {{signet.dev/cgroup: {name}, signet.dev/netns: {netns}, signet.dev/host-interface: {host_if}}}\n\
             spec: {{nodeName: node-{node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: {ip}}}\n---\n",
            name = self.name,
            netns = self.netns,
            host_if = self.host_if,
            node = self.node,
            ip = self.address,
        )
    }
}

/// A server process in pod B, killed on drop.
pub struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for p in &self.pins {
            let _ = signet_agent::datapath::loader::cleanup(p);
        }
        for ns in &self.nss {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for cg in &self.pod_cgroups {
            for _ in 0..50 {
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for cg in &self.cgroups {
            for _ in 0..50 {
                let _ = std::fs::remove_dir(cg.join("pod"));
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One component (the CA or an agent) on a runtime of its own in a node's namespace.
pub struct Component {
    stop: CancellationToken,
    /// Cancelled: the component's runtime is dropped without shutting it down, as when its
    /// process is killed (what it left in the kernel and on disk stays).
    crash: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Component {
    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn crash(&mut self) {
        self.crash.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a running agent shares with the test.
#[derive(Clone)]
pub struct AgentHandle {
    pub certs: CertManager,
    pub metrics: Arc<Metrics>,
}

/// The CA and two agents. Agents stop before the CA (field order).
pub struct Running {
    agents: Vec<(char, Component, AgentHandle)>,
    _ca: Component,
    pub ca_addr: String,
    pub root: PathBuf,
    agent_extra: String,
}

impl Running {
    pub fn agent(&self, node: char) -> &AgentHandle {
        &self
            .agents
            .iter()
            .find(|(n, _, _)| *n == node)
            .expect("agent")
            .2
    }

    pub fn stop_agent(&mut self, node: char) {
        let i = self
            .agents
            .iter()
            .position(|(n, _, _)| *n == node)
            .expect("agent");
        let (_, mut c, _) = self.agents.remove(i);
        c.stop();
    }

    /// Kills node `node`'s agent: no shutdown, no cleanup.
    pub fn crash_agent(&mut self, node: char) {
        let i = self
            .agents
            .iter()
            .position(|(n, _, _)| *n == node)
            .expect("agent");
        let (_, mut c, _) = self.agents.remove(i);
        c.crash();
    }

    pub fn start_agent(&mut self, t: &Topology, node: char) {
        let config = t.agent_config(node, &self.ca_addr, &self.root, &self.agent_extra);
        let (c, h) = start_agent(t, node, config);
        self.agents.push((node, c, h));
    }
}

pub fn start_agent(t: &Topology, node: char, config: AgentConfig) -> (Component, AgentHandle) {
    let (stop, crash) = (CancellationToken::new(), CancellationToken::new());
    let (ns, s, k) = (t.ns(&format!("node-{node}")), stop.clone(), crash.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                let agent = match Agent::start(config).await {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(20);
                while !agent.ready() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let handle = AgentHandle {
                    certs: agent.certs.clone(),
                    metrics: agent.metrics.clone(),
                };
                let _ = tx.send(Ok((agent.ready(), handle)));
                tokio::select! {
                    () = s.cancelled() => agent.shutdown(Duration::from_secs(2)).await,
                    // Dropping the runtime below ends every task where it stands.
                    () = k.cancelled() => std::mem::forget(agent),
                }
            });
            rt.shutdown_background();
        })
    });
    let component = Component {
        stop,
        crash,
        thread: Some(thread),
    };
    match rx
        .recv_timeout(Duration::from_secs(30))
        .expect("agent reported")
    {
        Ok((ready, handle)) => {
            assert!(ready, "agent on node-{node} got its certificates");
            (component, handle)
        }
        Err(e) => panic!("agent on node-{node} failed to start: {e}"),
    }
}

/// Starts the CA in node A's namespace (`ca_extra` is added to its configuration) and one
/// agent per node (`agent_extra` likewise).
/// The CA's admin port, on node A's loopback.
pub const CA_ADMIN: &str = "127.0.0.1:15014";

pub fn start(t: &Topology, ca_extra: &str, agent_extra: &str) -> Running {
    let ca_dir = t.dir.path().to_owned();
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: '{ca_addr}'\nadmin: '{CA_ADMIN}'\nstateDir: ca\nclusterStateDir: state\n\
         nodes:\n- {{name: node-a, tokenSha256: {}}}\n- {{name: node-b, tokenSha256: {}}}\n{ca_extra}",
        sha256_hex("token-a"),
        sha256_hex("token-b")
    );
    let config =
        ServerConfig::from_yaml(&yaml, &ca_dir.join("ca.yaml"), &ca_dir).expect("CA config");
    let (ca, root) = run_ca(t, move |_| {
        Box::pin(async move { CaServer::bind(config).await.expect("CA bind") })
    });
    let mut running = Running {
        agents: vec![],
        _ca: ca,
        ca_addr,
        root,
        agent_extra: agent_extra.to_owned(),
    };
    for node in ['a', 'b'] {
        running.start_agent(t, node);
    }
    running
}

/// Starts the CA in node A's namespace in Kubernetes mode, reaching the API through
/// `kubeconfig`: keys in Secret signet-ca-keys (its copy under the topology's directory),
/// agents checked by TokenReview. Returns it with the published root's file.
pub fn start_ca_in_cluster(t: &Topology, kubeconfig: &Path) -> (Component, PathBuf) {
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: '{ca_addr}'\ncaSecret: signet-ca-keys\n\
         kubernetes: true\nservingNames: [localhost]\n"
    );
    let dir = t.dir.path().to_owned();
    let mut config = ServerConfig::from_yaml(&yaml, &dir.join("ca.yaml"), &dir).expect("config");
    config.ca.source = signet_ca::CaSource::SharedStateDir(dir.join("ca-keys"));
    let kubeconfig = kubeconfig.to_owned();
    run_ca(t, move |stop| {
        Box::pin(async move {
            let client = signet_ca::kubernetes::client(Some(&kubeconfig))
                .await
                .expect("client");
            CaServer::start_in_cluster(config, client, "signet-ca-0", stop)
                .await
                .expect("CA in cluster")
        })
    })
}

type Starting = std::pin::Pin<Box<dyn std::future::Future<Output = CaServer> + Send>>;

/// Runs the CA that `start` makes in node A's namespace, on a runtime of its own, and writes
/// its root where agents read it. Returns it with that file.
fn run_ca(
    t: &Topology,
    start: impl FnOnce(CancellationToken) -> Starting + Send + 'static,
) -> (Component, PathBuf) {
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let (node_a, s) = (t.ns("node-a"), stop.clone());
    let thread = std::thread::spawn(move || {
        in_netns(&node_a, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                let server = start(s.clone()).await;
                tx.send(server.authority().bundle().to_pem())
                    .expect("send root");
                let _ = server.run(s).await;
            });
        })
    });
    let root_pem = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("CA started");
    let root = t.dir.path().join("root.pem");
    std::fs::write(&root, root_pem).expect("root");
    let ca = Component {
        stop,
        crash: CancellationToken::new(),
        thread: Some(thread),
    };
    (ca, root)
}

/// The mesh tests share two cores; one at a time keeps their timing meaningful.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
