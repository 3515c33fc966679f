//! Two nodes, two agents, the CA, and two pods in network namespaces and cgroups: an unmodified
//! client on node A reaches a server on node B through HBONE/mTLS, and identity policy decides.
//! Needs root; see `common`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{in_netns, privileged, unique};
use signet_agent::app::Agent;
use signet_agent::config::AgentConfig;
use signet_ca::server::CaServer;
use signet_ca::server::auth::sha256_hex;
use signet_ca::server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

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
struct Topology {
    n: u32,
    nss: Vec<String>,
    cgroups: Vec<PathBuf>,
    pins: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Topology {
    fn ns(&self, which: &str) -> String {
        format!("sgm{}-{which}", self.n)
    }
    fn node_ip(&self, node: char) -> String {
        format!("10.77.{}.{}", self.n, if node == 'a' { 1 } else { 2 })
    }
    fn pod_ip(&self, node: char) -> String {
        format!("10.{}.{}.2", if node == 'a' { 78 } else { 79 }, self.n)
    }
    fn cgroup_root(&self, node: char) -> PathBuf {
        self.cgroups[if node == 'a' { 0 } else { 1 }].clone()
    }

    fn new() -> Self {
        let n = (std::process::id() % 200) + (unique().len() as u32 % 50);
        let name = unique();
        let mut t = Self {
            n,
            nss: vec![],
            cgroups: vec![],
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

    fn write_state(&self, extra: &str) {
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let n = self.n;
        let mut y = String::new();
        for (node, ip) in [('a', self.node_ip('a')), ('b', self.node_ip('b'))] {
            y += &format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{node}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n---\n"
            );
        }
        y += "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n";
        for (node, pod, sa) in [('a', "client-0", "client"), ('b', "server-0", "server")] {
            y += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: shop\n  labels: {{app: {sa}}}\n  annotations: {{signet.dev/cgroup: pod, signet.dev/host-interface: sgh{n}{node}}}\n\
                 spec: {{nodeName: node-{node}, serviceAccountName: {sa}, containers: [{{name: c, image: c}}]}}\nstatus: {{podIP: {}}}\n---\n",
                self.pod_ip(node)
            );
        }
        std::fs::write(state.join("cluster.yaml"), y).expect("state");
        std::fs::write(state.join("policy.yaml"), extra).expect("policy");
    }

    fn agent_config(&self, node: char, ca: &str, root: &Path) -> AgentConfig {
        let token = self.dir.path().join(format!("node-{node}.token"));
        std::fs::write(&token, format!("token-{node}")).expect("token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let ip = self.node_ip(node);
        let yaml = format!(
            "node: node-{node}\nclusterStateDir: state\nidentityTable: identities.json\n\
             ca: {{address: '{ca}', rootCertFile: {}, tokenFile: {}}}\n\
             datapath: {{cgroupRoot: {}, bpffsDir: {}}}\n\
             listen: {{outbound: '{ip}:15001', inbound: '{ip}:15008', admin: '127.0.0.1:15020'}}\n",
            root.display(),
            token.display(),
            self.cgroup_root(node).display(),
            self.pins[if node == 'a' { 0 } else { 1 }].display()
        );
        AgentConfig::parse(&yaml, &self.dir.path().join("agent.yaml"), self.dir.path())
            .expect("agent config")
    }

    /// Runs the test client in the client pod (its netns and cgroup).
    fn client(&self, target: &str) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
            .arg("--cgroup")
            .arg(self.cgroup_root('a').join("pod"))
            .args([
                "--netns",
                &self.ns("pod-a"),
                "--connect",
                target,
                "--timeout-ms",
                "3000",
            ])
            .output()
            .expect("client");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn server(&self, port: u16) -> std::process::Child {
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
                "100",
                "--timeout-ms",
                "60000",
            ])
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
        child
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

/// A CA and two agents, each in its node's namespace on a runtime of its own.
struct Running {
    stops: Vec<CancellationToken>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for s in &self.stops {
            s.cancel();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn start(t: &Topology) -> Running {
    let mut running = Running {
        stops: vec![],
        threads: vec![],
    };
    // The CA, in node A's namespace.
    let ca_dir = t.dir.path().to_owned();
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: '{ca_addr}'\nstateDir: ca\nclusterStateDir: state\n\
         nodes:\n- {{name: node-a, tokenSha256: {}}}\n- {{name: node-b, tokenSha256: {}}}\n",
        sha256_hex("token-a"),
        sha256_hex("token-b")
    );
    let config =
        ServerConfig::from_yaml(&yaml, &ca_dir.join("ca.yaml"), &ca_dir).expect("CA config");
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let (node_a, s) = (t.ns("node-a"), stop.clone());
    running.threads.push(std::thread::spawn(move || {
        in_netns(&node_a, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async move {
                let server = CaServer::bind(config).await.expect("CA bind");
                tx.send(server.authority().bundle().to_pem())
                    .expect("send root");
                let _ = server.run(s).await;
            });
        })
    }));
    running.stops.push(stop);
    let root_pem = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("CA started");
    let root = t.dir.path().join("root.pem");
    std::fs::write(&root, root_pem).expect("root");

    for node in ['a', 'b'] {
        let config = t.agent_config(node, &ca_addr, &root);
        let stop = CancellationToken::new();
        let (ns, s) = (t.ns(&format!("node-{node}")), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        running.threads.push(std::thread::spawn(move || {
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
                    let _ = tx.send(Ok(agent.ready()));
                    s.cancelled().await;
                    agent.shutdown(Duration::from_secs(2)).await;
                });
            })
        }));
        running.stops.push(stop);
        match rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agent reported")
        {
            Ok(ready) => assert!(ready, "agent on node-{node} got its certificates"),
            Err(e) => panic!("agent on node-{node} failed to start: {e}"),
        }
    }
    running
}

#[test]
fn an_unmodified_client_reaches_a_pod_on_another_node_over_mtls_and_policy_decides() {
    if !privileged() {
        return;
    }
    let t = Topology::new();
    t.write_state("");
    let _running = start(&t);
    let mut server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));

    let report = t.client(&target);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["peer"], target,
        "the application sees the address it asked for: {report}"
    );
    // The server saw the connection come from node B's proxy, not from the client pod: the
    // bytes travelled through the HBONE tunnel.
    let via = report["reply"].as_str().expect("reply").to_owned();
    assert!(via.starts_with(&format!("hi 10.79.{}.1:", t.n)), "{report}");

    // A policy that lets only another identity in: node B's proxy refuses the stream.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: only-admin, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: spiffe://cluster.local/ns/shop/sa/admin}]\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "denied at node B: {report}"
    );

    // An egress policy on the client: connect() fails at once with EPERM.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: no-egress, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: client}}\n  egress: []\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = t.client(&target);
    assert_eq!(report["errno"], 1, "EPERM from connect(): {report}");

    // Plaintext straight from the client pod's namespace, bypassing the proxy (no cgroup), is
    // dropped at node B in strict mode.
    t.write_state("");
    std::thread::sleep(Duration::from_secs(2));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("pod-a"),
            env!("CARGO_BIN_EXE_signet-test-client"),
        ])
        .args(["--connect", &target, "--timeout-ms", "1000"])
        .output()
        .expect("client");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        report["ok"], false,
        "plaintext bypassing the proxy is dropped: {report}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
