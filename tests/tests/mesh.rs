//! Two nodes, two agents, the CA, and two pods in network namespaces and cgroups: an unmodified
//! client on node A reaches a server on node B (directly and through a Service) over HBONE/mTLS,
//! and identity policy decides at L4 and L7. Also: policy changes close connections, an agent
//! restart keeps enforcement, certificates rotate under traffic. Needs root; see `common`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use std::sync::Arc;

use common::{in_netns, privileged, unique};
use signet_agent::admin::metrics::Metrics;
use signet_agent::app::Agent;
use signet_agent::certs::CertManager;
use signet_agent::config::AgentConfig;
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
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
    fn cluster_ip(&self) -> String {
        format!("10.96.{}.10", self.n)
    }
    fn cgroup_root(&self, node: char) -> PathBuf {
        self.cgroups[if node == 'a' { 0 } else { 1 }].clone()
    }

    fn new() -> Self {
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
        // A Service in front of the server: ClusterIP port 80 → the pod's 8080.
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: shop}}\n\
             spec: {{clusterIP: {}, selector: {{app: server}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: server-1, namespace: shop, labels: {{kubernetes.io/service-name: server}}}}\n\
             ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{}], conditions: {{ready: true}}}}]\n",
            self.cluster_ip(),
            self.pod_ip('b')
        );
        std::fs::write(state.join("cluster.yaml"), y).expect("state");
        std::fs::write(state.join("policy.yaml"), extra).expect("policy");
    }

    fn agent_config(&self, node: char, ca: &str, root: &Path, extra: &str) -> AgentConfig {
        let token = self.dir.path().join(format!("node-{node}.token"));
        std::fs::write(&token, format!("token-{node}")).expect("token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let ip = self.node_ip(node);
        let yaml = format!(
            "node: node-{node}\nclusterStateDir: state\nidentityTable: identities.json\n\
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

    /// The test client as a process of the client pod (its netns and cgroup).
    fn client_command(&self, target: &str, extra: &[&str]) -> Command {
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
    fn client_with(&self, target: &str, extra: &[&str]) -> serde_json::Value {
        let out = self.client_command(target, extra).output().expect("client");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn client(&self, target: &str) -> serde_json::Value {
        self.client_with(target, &[])
    }

    /// Plaintext from the client pod's namespace but outside its cgroup: bypasses the proxy.
    fn bypassing_client(&self, target: &str) -> serde_json::Value {
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

    fn server(&self, port: u16) -> Server {
        self.server_with(port, &[])
    }

    fn server_with(&self, port: u16, extra: &[&str]) -> Server {
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

/// A server process in pod B, killed on drop.
struct Server(std::process::Child);

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
struct Component {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Component {
    fn stop(&mut self) {
        self.stop.cancel();
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
struct AgentHandle {
    certs: CertManager,
    metrics: Arc<Metrics>,
}

/// The CA and two agents. Agents stop before the CA (field order).
struct Running {
    agents: Vec<(char, Component, AgentHandle)>,
    _ca: Component,
    ca_addr: String,
    root: PathBuf,
    agent_extra: String,
}

impl Running {
    fn agent(&self, node: char) -> &AgentHandle {
        &self
            .agents
            .iter()
            .find(|(n, _, _)| *n == node)
            .expect("agent")
            .2
    }

    fn stop_agent(&mut self, node: char) {
        let i = self
            .agents
            .iter()
            .position(|(n, _, _)| *n == node)
            .expect("agent");
        let (_, mut c, _) = self.agents.remove(i);
        c.stop();
    }

    fn start_agent(&mut self, t: &Topology, node: char) {
        let config = t.agent_config(node, &self.ca_addr, &self.root, &self.agent_extra);
        let (c, h) = start_agent(t, node, config);
        self.agents.push((node, c, h));
    }
}

fn start_agent(t: &Topology, node: char, config: AgentConfig) -> (Component, AgentHandle) {
    let stop = CancellationToken::new();
    let (ns, s) = (t.ns(&format!("node-{node}")), stop.clone());
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
                s.cancelled().await;
                agent.shutdown(Duration::from_secs(2)).await;
            });
        })
    });
    let component = Component {
        stop,
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
fn start(t: &Topology, ca_extra: &str, agent_extra: &str) -> Running {
    let ca_dir = t.dir.path().to_owned();
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: '{ca_addr}'\nstateDir: ca\nclusterStateDir: state\n\
         nodes:\n- {{name: node-a, tokenSha256: {}}}\n- {{name: node-b, tokenSha256: {}}}\n{ca_extra}",
        sha256_hex("token-a"),
        sha256_hex("token-b")
    );
    let config =
        ServerConfig::from_yaml(&yaml, &ca_dir.join("ca.yaml"), &ca_dir).expect("CA config");
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
                let server = CaServer::bind(config).await.expect("CA bind");
                tx.send(server.authority().bundle().to_pem())
                    .expect("send root");
                let _ = server.run(s).await;
            });
        })
    });
    let ca = Component {
        stop,
        thread: Some(thread),
    };
    let root_pem = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("CA started");
    let root = t.dir.path().join("root.pem");
    std::fs::write(&root, root_pem).expect("root");
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

/// The mesh tests share two cores; one at a time keeps their timing meaningful.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// Waits for the agents to apply a state change (they poll every 500 ms).
fn settle() {
    std::thread::sleep(Duration::from_millis(1500));
}

/// GET `path` on the agent's admin port, from inside node `node`'s namespace.
fn admin_get(t: &Topology, node: char, path: &str) -> (u16, String) {
    in_netns(&t.ns(&format!("node-{node}")), || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:15020").expect("admin port");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
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

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn an_unmodified_client_reaches_a_pod_on_another_node_over_mtls_and_policy_decides() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let _running = start(&t, "", "");
    let _server = t.server(8080);
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

    // The Service's ClusterIP reaches the same pod, through the tunnel too.
    let vip = format!("{}:80", t.cluster_ip());
    let report = t.client(&vip);
    assert_eq!(report["ok"], true, "ClusterIP: {report}");
    assert_eq!(report["peer"], vip, "{report}");
    assert!(
        report["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("hi 10.79.{}.1:", t.n))),
        "{report}"
    );

    // Both agents count it, by identity, on their admin ports; both are ready.
    let (status, body) = admin_get(&t, 'a', "/metrics");
    assert_eq!(status, 200);
    let opened = format!(
        "signet_connections_opened_total{{reporter=\"outbound\",source=\"{CLIENT}\",destination=\"{SERVER}\"}}"
    );
    assert_eq!(sample(&body, &opened), Some(2.0), "{body}");
    assert!(
        sample(&body, "signet_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/client\"}")
            .is_some_and(|t| t > 1.7e9),
        "{body}"
    );
    let (_, body) = admin_get(&t, 'b', "/metrics");
    let inbound = format!(
        "signet_connections_opened_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\"}}"
    );
    assert_eq!(sample(&body, &inbound), Some(2.0), "{body}");
    assert_eq!(admin_get(&t, 'b', "/healthz/ready").0, 200);

    // A policy that lets only another identity in: node B's proxy refuses the stream, and
    // counts the deny.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: only-admin, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: spiffe://cluster.local/ns/shop/sa/admin}]\n",
    );
    settle();
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "denied at node B: {report}"
    );
    let (_, body) = admin_get(&t, 'b', "/metrics");
    let denied = format!(
        "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\",verdict=\"deny\"}}"
    );
    assert_eq!(sample(&body, &denied), Some(1.0), "{body}");

    // An egress policy on the client: connect() fails at once with EPERM.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: no-egress, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: client}}\n  egress: []\n",
    );
    settle();
    let report = t.client(&target);
    assert_eq!(report["errno"], 1, "EPERM from connect(): {report}");

    // Plaintext straight from the client pod's namespace, bypassing the proxy (no cgroup), is
    // dropped at node B in strict mode.
    t.write_state("");
    settle();
    let report = t.bypassing_client(&target);
    assert_eq!(
        report["ok"], false,
        "plaintext bypassing the proxy is dropped: {report}"
    );

    // Node A's agent cannot obtain the server's identity: that pod runs on node B.
    let root_pem = std::fs::read_to_string(t.dir.path().join("root.pem")).expect("root");
    let refused = in_netns(&t.ns("node-a"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut ca = CaClient::connect(
                &format!("{}:15012", t.node_ip('a')),
                "localhost",
                &root_pem,
                "token-a",
            )
            .await
            .expect("CA reachable");
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .expect("csr");
            let server = SpiffeId::parse(SERVER).expect("id");
            ca.create_certificate(&csr, Duration::from_secs(3600), Some(&server))
                .await
                .expect_err("node A may not have the server's identity")
        })
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
}

#[test]
fn l7_rules_answer_403_and_a_policy_change_closes_connections_it_no_longer_allows() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    // GET under /v1/ on 8080 is allowed to the client; 9090 is plain TCP.
    let l7 = "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 8080}]\n\
         \x20   http: [{methods: [GET], paths: [{prefix: /v1/}]}]\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 9090}]\n";
    t.write_state(l7);
    let running = start(&t, "", "");
    let _http = t.server_with(8080, &["--http"]);
    let _held = t.server_with(9090, &["--hold"]);
    let web = format!("{}:8080", t.pod_ip('b'));

    let ok = t.client_with(&web, &["--request", "GET /v1/items"]);
    assert_eq!(ok["status"], 200, "{ok}");
    assert!(
        ok["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("hi GET /v1/items HTTP/1.1")),
        "{ok}"
    );
    let post = t.client_with(&web, &["--request", "POST /v1/items"]);
    assert_eq!(post["status"], 403, "{post}");
    assert!(
        post["body"]
            .as_str()
            .is_some_and(|b| b.contains("access denied")),
        "{post}"
    );
    let other = t.client_with(&web, &["--request", "GET /admin"]);
    assert_eq!(other["status"], 403, "{other}");
    let denials = running.agent('b').metrics.render(&Default::default());
    let l7_denied = format!(
        "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\",verdict=\"l7_deny\"}}"
    );
    assert_eq!(sample(&denials, &l7_denied), Some(2.0), "{denials}");

    // A connection held open on 9090 while the policy stops allowing it is closed.
    let mut holder = t
        .client_command(&format!("{}:9090", t.pod_ip('b')), &["--hold-ms", "20000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stderr.take().expect("stderr")),
        &mut line,
    );
    assert_eq!(line.trim(), "holding", "the connection opened");
    let changed = Instant::now();
    let only_web = l7.split("\x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 9090}]\n").next().expect("policy");
    t.write_state(only_web);
    let out = holder.wait_with_output().expect("client");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        matches!(report["held"]["ended"].as_str(), Some("reset" | "eof")),
        "closed by the proxy, not by the timeout: {report}"
    );
    assert!(
        changed.elapsed() < Duration::from_secs(10),
        "closed soon after the change: {report}"
    );
    let text = running.agent('b').metrics.render(&Default::default());
    assert!(
        sample(&text, "signet_connections_closed_by_policy_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // The still-allowed HTTP port keeps working.
    let ok = t.client_with(&web, &["--request", "GET /v1/items"]);
    assert_eq!(ok["status"], 200, "{ok}");
}

#[test]
fn enforcement_outlives_an_agent_restart_and_new_connections_work_afterwards() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let mut running = start(&t, "", "");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    assert_eq!(t.client(&target)["ok"], true);

    // Node B's agent is gone: the tunnel has nowhere to land, and the datapath it left pinned
    // still drops plaintext that bypasses the proxy.
    running.stop_agent('b');
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "no plaintext fallback while node B's agent is down: {report}"
    );
    assert_eq!(t.bypassing_client(&target)["ok"], false);
    running.start_agent(&t, 'b');
    let report = t.client(&target);
    assert_eq!(report["ok"], true, "after node B's restart: {report}");

    // Node A's agent is gone: captured connections fail closed (nothing listens where they
    // are redirected) instead of leaving in plaintext.
    running.stop_agent('a');
    let report = t.client(&target);
    assert_eq!(
        report["ok"], false,
        "fails closed without node A's proxy: {report}"
    );
    assert_eq!(t.bypassing_client(&target)["ok"], false);
    running.start_agent(&t, 'a');
    let report = t.client(&target);
    assert_eq!(report["ok"], true, "after node A's restart: {report}");
}

#[test]
fn certificates_rotate_under_continuous_traffic_with_a_30_second_ttl() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let running = start(&t, "svid: {minTtlSeconds: 10}\n", "svidTtlSeconds: 30\n");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    let client_id = SpiffeId::parse(CLIENT).expect("id");
    let server_id = SpiffeId::parse(SERVER).expect("id");
    let serial_of = |node: char, id: &SpiffeId| {
        running
            .agent(node)
            .certs
            .get(id)
            .map(|c| c.serial.clone())
            .expect("certificate")
    };
    let first = (serial_of('a', &client_id), serial_of('b', &server_id));
    // Past the first renewal (about 15 s) and past the first certificates' expiry (30 s).
    let until = Instant::now() + Duration::from_secs(40);
    let (mut ok, mut failed) = (0, vec![]);
    while Instant::now() < until {
        let report = t.client(&target);
        if report["ok"] == true && report["reply"] != "" {
            ok += 1;
        } else {
            failed.push(report);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = (serial_of('a', &client_id), serial_of('b', &server_id));
    assert!(
        last.0 != first.0 && last.1 != first.1,
        "both sides rotated: {first:?} → {last:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 100, "continuous traffic: {ok} requests");
}
