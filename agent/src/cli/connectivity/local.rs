//! The suite's workloads in the local topology, wired as the demo wires its pods: for each pod a
//! network namespace joined to its node's namespace by a veth (`eth0` inside, a /24 of the
//! topology's `connectivity.subnets` with the node at .1), routed from the other node over the
//! underlay, a cgroup under the node's cgroup root, and a `Pod` manifest in the cluster state
//! directory naming all three. `outside` is a namespace wired to the first node like a pod but in
//! no manifest and no cgroup: a machine that is not in the mesh.
//!
//! Every name the suite makes in the kernel starts with `sct` and four hex digits of the run
//! (namespaces `sctXXXX-<pod>`, veths `sctXXXXp<i>`, cgroups `sctXXXX-<pod>`, state files
//! `sctXXXX-*.yaml`): [`cleanup_all`] finds what a killed or `--keep` run left by that shape.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

pub use super::capture::Capture;
use super::capture::{packet_socket, read_frames};
use super::{Env, NodeInfo, Running, Session, Workloads, poll};
use crate::cli::echo::Exchange;
use crate::flow::FlowEntry;

/// The topology file as the suite reads it (the demo writes it; `signet status` reads a part).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Described {
    nodes: Vec<Node>,
    /// The cluster state directory the agents read (manifests and policies go there).
    state_dir: Option<PathBuf>,
    #[serde(default = "cluster_local")]
    trust_domain: String,
    connectivity: Option<Pool>,
}

fn cluster_local() -> String {
    "cluster.local".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub agent_admin: SocketAddr,
    pub cgroup_root: Option<PathBuf>,
    /// The node's interface to the other nodes (where traffic between nodes can be seen).
    pub underlay: Option<String>,
    /// The agent's process, when it runs as one (to stop and start it).
    pub agent_pid_file: Option<PathBuf>,
}

/// What the suite may take for its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Pool {
    /// A prefix of /24 or shorter: one /24 per pod.
    subnets: String,
    /// The ClusterIP of the suite's Service.
    #[serde(rename = "serviceIP")]
    service_ip: Ipv4Addr,
    /// The port of the suite's Gateway listener (HTTP, on every node's address).
    gateway_port: u16,
}

/// The suite's names: namespaces, identities, the Gateway.
#[derive(Debug, Clone)]
pub struct Names {
    pub ns: String,
    pub peer_ns: String,
    pub td: String,
}

impl Names {
    pub fn new(ns: &str, td: &str) -> Self {
        Self {
            ns: ns.into(),
            peer_ns: format!("{ns}-peer"),
            td: td.into(),
        }
    }
    /// The SPIFFE ID of a service account in the suite's namespace.
    pub fn id(&self, sa: &str) -> String {
        format!("spiffe://{}/ns/{}/sa/{sa}", self.td, self.ns)
    }
    pub fn gateway_host(&self) -> String {
        format!("echo.{}.connectivity.test", self.ns)
    }
}

/// One of the suite's pods.
#[derive(Debug)]
pub struct PodSpec {
    pub name: &'static str,
    /// Index into the topology's nodes.
    pub node: usize,
    /// In the peer namespace instead of the main one.
    pub peer: bool,
    pub sa: &'static str,
    /// Runs `signet echo serve` (HTTP and TCP echo on 8080 and 8081, UDP echo on 9000).
    pub serves: bool,
}

pub const PODS: &[PodSpec] = &[
    PodSpec {
        name: "client",
        node: 0,
        peer: false,
        sa: "client",
        serves: false,
    },
    PodSpec {
        name: "client2",
        node: 0,
        peer: false,
        sa: "client2",
        serves: false,
    },
    PodSpec {
        name: "echo-same",
        node: 0,
        peer: false,
        sa: "echo",
        serves: true,
    },
    PodSpec {
        name: "echo-other",
        node: 1,
        peer: false,
        sa: "echo",
        serves: true,
    },
    PodSpec {
        name: "peer-client",
        node: 1,
        peer: true,
        sa: "client",
        serves: false,
    },
    PodSpec {
        name: "rot-client",
        node: 0,
        peer: false,
        sa: "rot-client",
        serves: false,
    },
    PodSpec {
        name: "rot-echo",
        node: 1,
        peer: false,
        sa: "rot-echo",
        serves: true,
    },
];

/// The port `outside` serves on, and the first node's host (its namespace, no cgroup).
pub const WORLD_PORT: u16 = 18080;
pub const HOST_PORT: u16 = 18090;

#[derive(Debug)]
struct Pod {
    ip: Ipv4Addr,
    node: usize,
    netns: String,
    cgroup: PathBuf,
}

/// Where a client runs.
#[derive(Debug, Clone, Copy)]
pub enum Src<'a> {
    /// A process of the pod: its cgroup and its namespace.
    Pod(&'a str),
    /// A process in the pod's network namespace but outside every cgroup the node captures.
    Uncaptured(&'a str),
    /// The machine outside the mesh.
    Outside,
}

/// Stops and starts a node's agent (the disturbing scenarios).
pub trait AgentControl: Sync + std::fmt::Debug {
    fn stop(&self, node: &Node) -> Result<(), String>;
    fn start(&self, node: &Node) -> Result<(), String>;
}

/// Agents that run as processes with a pid file (the demo's): stopped with SIGTERM, started
/// again with the command line, directory and log they had.
#[derive(Debug, Default)]
pub struct ProcessAgents {
    stopped: Mutex<BTreeMap<String, Started>>,
}

#[derive(Debug)]
struct Started {
    argv: Vec<String>,
    cwd: PathBuf,
    log: Option<PathBuf>,
}

impl AgentControl for ProcessAgents {
    fn stop(&self, node: &Node) -> Result<(), String> {
        let file = node
            .agent_pid_file
            .as_ref()
            .ok_or_else(|| format!("the topology names no agentPidFile for {}", node.name))?;
        let pid: i32 = std::fs::read_to_string(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .trim()
            .parse()
            .map_err(|_| format!("{}: not a pid", file.display()))?;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let argv: Vec<String> = std::fs::read(proc.join("cmdline"))
            .map_err(|e| format!("agent {pid} of {}: {e}", node.name))?
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cwd = std::fs::read_link(proc.join("cwd")).map_err(|e| e.to_string())?;
        let log = std::fs::read_link(proc.join("fd/2"))
            .ok()
            .filter(|p| p.is_absolute() && p.exists());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| format!("SIGTERM to agent {pid}: {e}"))?;
        if poll(Duration::from_secs(30), || (!proc.exists()).then_some(())).is_none() {
            return Err(format!(
                "agent {pid} of {} did not exit within 30 s",
                node.name
            ));
        }
        self.stopped
            .lock()
            .map_err(|_| "poisoned")?
            .insert(node.name.clone(), Started { argv, cwd, log });
        Ok(())
    }

    fn start(&self, node: &Node) -> Result<(), String> {
        let started = self
            .stopped
            .lock()
            .map_err(|_| "poisoned")?
            .remove(&node.name)
            .ok_or_else(|| format!("{}'s agent was not stopped here", node.name))?;
        let (program, args) = started.argv.split_first().ok_or("an empty command line")?;
        let mut c = Command::new(program);
        c.args(args).current_dir(&started.cwd).stdin(Stdio::null());
        // Its own process group: a ^C to this command does not reach the agent.
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        if let Some(log) = &started.log {
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(log)
                .map_err(|e| format!("{}: {e}", log.display()))?;
            c.stdout(f.try_clone().map_err(|e| e.to_string())?)
                .stderr(f);
        }
        let child = c.spawn().map_err(|e| format!("starting {program}: {e}"))?;
        if let Some(file) = &node.agent_pid_file {
            std::fs::write(file, format!("{}\n", child.id()))
                .map_err(|e| format!("{}: {e}", file.display()))?;
        }
        Ok(())
    }
}

/// What the suite made, to remove.
#[derive(Debug, Default)]
struct Made {
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    /// (node namespace, prefix) routes added on a node.
    routes: Vec<(String, String)>,
    files: Vec<PathBuf>,
    children: Vec<Child>,
    /// Nodes whose agent a scenario stopped (started again before the suite ends).
    down: Vec<usize>,
}

/// The deployed suite: its pods, servers and the topology they live in.
#[derive(Debug)]
pub struct Local<'a> {
    pub names: Names,
    pub nodes: Vec<Node>,
    topology: PathBuf,
    state_dir: PathBuf,
    prefix: String,
    exe: PathBuf,
    pods: BTreeMap<&'static str, Pod>,
    outside_netns: String,
    /// The outside machine's two addresses (a CIDR rule can name one and not the other).
    pub outside: [Ipv4Addr; 2],
    pub service_ip: Ipv4Addr,
    pub gateway_port: u16,
    /// Per node: whether it runs strict mTLS.
    pub strict: Vec<bool>,
    agents: &'a dyn AgentControl,
    made: Mutex<Made>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The `i`-th /24 of `pool` (`10.99.64.0/18`): its first three octets.
fn subnet(pool: &str, i: usize) -> Result<[u8; 3], String> {
    let (base, len) = pool
        .split_once('/')
        .ok_or_else(|| format!("connectivity.subnets `{pool}`: not a prefix"))?;
    let base: Ipv4Addr = base
        .parse()
        .map_err(|_| format!("connectivity.subnets `{pool}`: not an IPv4 prefix"))?;
    let len: u32 =
        len.parse().ok().filter(|l| *l <= 24).ok_or_else(|| {
            format!("connectivity.subnets `{pool}`: the length must be 24 or less")
        })?;
    if i >= 1usize << (24 - len) {
        return Err(format!(
            "connectivity.subnets `{pool}`: too small for {} pods",
            i + 1
        ));
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let o = ((u32::from(base) & mask) + ((i as u32) << 8)).to_be_bytes();
    Ok([o[0], o[1], o[2]])
}

/// Builds the suite's pods, `outside`, its Service and Gateway on the local topology, starts the
/// servers, and waits until every agent has applied them and reports OK.
pub fn deploy<'a>(
    topology: &Path,
    namespace: &str,
    exe: &Path,
    agents: &'a dyn AgentControl,
    say: &mut dyn FnMut(&str),
) -> Result<Env<'a>, String> {
    let local = Local::deploy(topology, namespace, exe, agents, say)?;
    Ok(Env {
        names: local.names.clone(),
        nodes: local
            .nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name.clone(),
                address: n.address,
            })
            .collect(),
        outside: Some(local.outside),
        service_ip: local.service_ip,
        gateway_port: local.gateway_port,
        strict: local.strict.clone(),
        uncaptured_in_pod: true,
        agent_stays_down: true,
        workloads: Box::new(local),
    })
}

impl<'a> Local<'a> {
    fn deploy(
        topology: &Path,
        namespace: &str,
        exe: &Path,
        agents: &'a dyn AgentControl,
        say: &mut dyn FnMut(&str),
    ) -> Result<Self, String> {
        let text = std::fs::read_to_string(topology)
            .map_err(|e| format!("topology {}: {e}", topology.display()))?;
        let d: Described = serde_json::from_str(&text)
            .map_err(|e| format!("topology {}: {e}", topology.display()))?;
        let missing = |what: &str| {
            format!(
                "topology {}: no {what}; the suite needs it to place its pods (the demo's topology.json has it)",
                topology.display()
            )
        };
        if d.nodes.len() < 2 {
            return Err(format!(
                "topology {}: the suite needs two nodes, it has {}",
                topology.display(),
                d.nodes.len()
            ));
        }
        let state_dir = d.state_dir.clone().ok_or_else(|| missing("stateDir"))?;
        let pool = d
            .connectivity
            .clone()
            .ok_or_else(|| missing("connectivity"))?;
        for n in &d.nodes[..2] {
            if n.cgroup_root.is_none() {
                return Err(missing(&format!("cgroupRoot for {}", n.name)));
            }
        }
        // One run per topology: a second would take the same subnets and pod names.
        if let Some(other) = std::fs::read_dir(&state_dir)
            .map_err(|e| format!("stateDir {}: {e}", state_dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| suite_name(n) && n.ends_with("-cluster.yaml"))
        {
            return Err(format!(
                "another run's workloads are in place ({}/{other}): wait for it to end, or remove                  them with `signet connectivity cleanup`",
                state_dir.display()
            ));
        }
        let id = format!("{:04x}", std::process::id() & 0xffff);
        let prefix = format!("sct{id}");
        let names = Names::new(namespace, &d.trust_domain);
        let mut env = Local {
            names,
            nodes: d.nodes,
            topology: topology.to_owned(),
            state_dir,
            prefix,
            exe: exe.to_owned(),
            pods: BTreeMap::new(),
            outside_netns: String::new(),
            outside: [Ipv4Addr::UNSPECIFIED; 2],
            service_ip: pool.service_ip,
            gateway_port: pool.gateway_port,
            strict: vec![],
            agents,
            made: Mutex::new(Made::default()),
        };
        say(&format!(
            "deploying {} pods in namespaces {} and {} (kernel names {}-*)",
            PODS.len(),
            env.names.ns,
            env.names.peer_ns,
            env.prefix
        ));
        if let Err(e) = env.build(&pool.subnets) {
            let _ = env.remove();
            return Err(e);
        }
        say("waiting for every agent to apply them and report OK (signet status --wait)");
        match env.wait_ok(Duration::from_secs(90)) {
            Ok(report) => {
                env.strict = env
                    .nodes
                    .iter()
                    .map(|n| {
                        report.agents.iter().any(|a| {
                            a.node == n.name
                                && a.status.as_ref().is_some_and(|s| s.mtls_mode == "strict")
                        })
                    })
                    .collect();
                Ok(env)
            }
            Err(e) => {
                let _ = env.remove();
                Err(e)
            }
        }
    }

    fn build(&mut self, pool: &str) -> Result<(), String> {
        let mut manifests = String::new();
        for (ns, role) in [(&self.names.ns, "main"), (&self.names.peer_ns, "peer")] {
            manifests += &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{signet.dev/connectivity: {role}}}}}\n---\n"
            );
        }
        for (i, spec) in PODS.iter().enumerate() {
            let [a, b, c] = subnet(pool, i)?;
            let pod_ip = Ipv4Addr::new(a, b, c, 2);
            let netns = format!("{}-{}", self.prefix, spec.name);
            let host_if = format!("{}p{i}", self.prefix);
            self.attach(&netns, spec.node, &host_if, &[pod_ip])?;
            let node = &self.nodes[spec.node];
            let cg_name = format!("{}-{}", self.prefix, spec.name);
            let cgroup = node.cgroup_root.clone().unwrap_or_default().join(&cg_name);
            std::fs::create_dir(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
            self.made().cgroups.push(cgroup.clone());
            let ns = if spec.peer {
                &self.names.peer_ns
            } else {
                &self.names.ns
            };
            manifests += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}}}\n  \
                 annotations: {{signet.dev/cgroup: {cg_name}, signet.dev/netns: {netns}, signet.dev/host-interface: {host_if}}}\n\
                 spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: echo, image: signet, ports: [{{containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: {pod_ip}}}\n---\n",
                name = spec.name,
                node = node.name,
                sa = spec.sa,
            );
            self.pods.insert(
                spec.name,
                Pod {
                    ip: pod_ip,
                    node: spec.node,
                    netns,
                    cgroup,
                },
            );
        }
        let [a, b, c] = subnet(pool, PODS.len())?;
        self.outside = [Ipv4Addr::new(a, b, c, 2), Ipv4Addr::new(a, b, c, 3)];
        self.outside_netns = format!("{}-outside", self.prefix);
        let (netns, host_if, outside) = (
            self.outside_netns.clone(),
            format!("{}o", self.prefix),
            self.outside,
        );
        self.attach(&netns, 0, &host_if, &outside)?;
        let echo = &self.pods["echo-other"];
        let (ns, vip, echo_ip, echo_node) = (
            &self.names.ns,
            self.service_ip,
            echo.ip,
            &self.nodes[echo.node].name,
        );
        manifests += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: {ns}}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: echo-other}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: echo-1, namespace: {ns}, labels: {{kubernetes.io/service-name: echo}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [{echo_ip}], conditions: {{ready: true}}, nodeName: {echo_node}}}]\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {ns}}}\n\
             spec: {{controllerName: signet.dev/gateway-controller}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: echo, namespace: {ns}}}\n\
             spec:\n  gatewayClassName: {ns}\n  listeners:\n  - {{name: http, port: {port}, protocol: HTTP, hostname: {host}}}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo, namespace: {ns}}}\n\
             spec:\n  parentRefs: [{{name: echo}}]\n  hostnames: [{host}]\n  rules:\n  - backendRefs: [{{name: echo, port: 80}}]\n",
            port = self.gateway_port,
            host = self.names.gateway_host(),
        );
        self.start_servers()?;
        let file = self.state_file("cluster");
        std::fs::write(&file, manifests).map_err(|e| format!("{}: {e}", file.display()))?;
        self.made().files.push(file);
        self.settle()
    }

    /// A namespace wired to node `node` by a veth, with `addrs` (all in one /24) on its eth0 and
    /// the node's side at .1; the other nodes route the /24 over the underlay.
    fn attach(
        &self,
        netns: &str,
        node: usize,
        host_if: &str,
        addrs: &[Ipv4Addr],
    ) -> Result<(), String> {
        let o = addrs[0].octets();
        let (net, gw) = (
            format!("{}.{}.{}.0/24", o[0], o[1], o[2]),
            format!("{}.{}.{}.1", o[0], o[1], o[2]),
        );
        let node_ns = self.nodes[node].netns.clone();
        ip(&["netns", "add", netns])?;
        self.made().netns.push(netns.into());
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &node_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
            "netns", netns,
        ])?;
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            host_if,
        ])?;
        ip(&["-n", &node_ns, "link", "set", host_if, "up"])?;
        for a in addrs {
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "eth0",
            ])?;
        }
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "route", "add", "default", "via", &gw])?;
        let via = self.nodes[node].address.to_string();
        for (i, other) in self.nodes.iter().enumerate() {
            if i != node {
                ip(&["-n", &other.netns, "route", "add", &net, "via", &via])?;
                self.made().routes.push((other.netns.clone(), net.clone()));
            }
        }
        Ok(())
    }

    fn start_servers(&self) -> Result<(), String> {
        let mut servers: Vec<(String, Vec<String>)> = vec![];
        for spec in PODS.iter().filter(|p| p.serves) {
            let pod = &self.pods[spec.name];
            servers.push((
                spec.name.to_string(),
                vec![
                    "--cgroup".into(),
                    pod.cgroup.display().to_string(),
                    "--netns".into(),
                    pod.netns.clone(),
                    "--tcp".into(),
                    "0.0.0.0:8080".into(),
                    "--tcp".into(),
                    "0.0.0.0:8081".into(),
                    "--udp".into(),
                    "0.0.0.0:9000".into(),
                ],
            ));
        }
        servers.push((
            "outside".into(),
            vec![
                "--netns".into(),
                self.outside_netns.clone(),
                "--tcp".into(),
                format!("0.0.0.0:{WORLD_PORT}"),
            ],
        ));
        servers.push((
            "host".into(),
            vec![
                "--netns".into(),
                self.nodes[0].netns.clone(),
                "--tcp".into(),
                format!("{}:{HOST_PORT}", self.nodes[0].address),
            ],
        ));
        for (name, args) in servers {
            let mut child = Command::new(&self.exe)
                .args(["echo", "serve", "--name", &name])
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{}: {e}", self.exe.display()))?;
            let mut line = String::new();
            let read = child
                .stdout
                .take()
                .map(|o| BufReader::new(o).read_line(&mut line));
            if line.trim() != "ready" {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the {name} server did not start: {} {read:?}",
                    err.trim()
                ));
            }
            self.made().children.push(child);
        }
        Ok(())
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state_file(&self, what: &str) -> PathBuf {
        self.state_dir.join(format!("{}-{what}.yaml", self.prefix))
    }

    pub fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[pod].ip
    }

    pub fn pod_node(&self, pod: &str) -> usize {
        self.pods[pod].node
    }

    /// Puts `yaml` (the suite's policies; empty for none) in force: written to the state
    /// directory, applied by every agent, refused by none.
    pub fn apply_policies(&self, yaml: &str) -> Result<(), String> {
        let file = self.state_file("policies");
        if yaml.trim().is_empty() {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", file.display())),
            }
        } else {
            std::fs::write(&file, yaml).map_err(|e| format!("{}: {e}", file.display()))?;
            let mut made = self.made();
            if !made.files.contains(&file) {
                made.files.push(file);
            }
        }
        self.settle()
    }

    /// Waits until every agent has looked at the state directory as it is now, and says why
    /// when one refused it.
    pub fn settle(&self) -> Result<(), String> {
        let want = crate::reconcile::dir_revision(&self.state_dir);
        for node in &self.nodes {
            let mut last = String::from("no answer");
            let seen = poll(Duration::from_secs(30), || {
                match self.admin(node, "/debug/state") {
                    Ok(body) => {
                        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                        if v["revision"] != want.as_str() {
                            last = format!("at revision {}", v["revision"]);
                            return None;
                        }
                        Some(v["refused"].as_str().map(str::to_owned))
                    }
                    Err(e) => {
                        last = e;
                        None
                    }
                }
            });
            match seen {
                None => {
                    return Err(format!(
                        "{} did not apply revision {want} within 30 s ({last})",
                        node.name
                    ));
                }
                Some(Some(refused)) => return Err(format!("{} refused it: {refused}", node.name)),
                Some(None) => {}
            }
        }
        Ok(())
    }

    /// `signet status --wait`: every agent (and the CA) OK.
    pub fn wait_ok(&self, within: Duration) -> Result<crate::cli::status::Report, String> {
        super::all_ok(
            crate::cli::status::wait(&self.topology, within, |_| {}),
            within,
        )
    }

    fn admin(&self, node: &Node, path: &str) -> Result<String, String> {
        let netns = crate::datapath::netns::path_of(&node.netns);
        super::super::admin_http::get(
            Some(&netns),
            node.agent_admin,
            path,
            Some(Duration::from_secs(5)),
        )?
        .text()
    }

    /// The flows `node` recorded since `since_ms` (Unix milliseconds).
    pub fn flows(&self, node: usize, since_ms: u64) -> Result<Vec<FlowEntry>, String> {
        let text = self.admin(&self.nodes[node], &format!("/flows?since_ms={since_ms}"))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<FlowEntry>(l).ok())
            .collect())
    }

    /// What `node`'s agent has in force (`/debug/state`).
    pub fn debug_state(&self, node: usize) -> Result<serde_json::Value, String> {
        let body = self.admin(&self.nodes[node], "/debug/state")?;
        serde_json::from_str(&body).map_err(|e| format!("/debug/state: {e}"))
    }

    fn client_command(&self, from: Src<'_>, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(["echo", "client"]);
        match from {
            Src::Pod(p) => {
                let pod = &self.pods[p];
                c.arg("--cgroup")
                    .arg(&pod.cgroup)
                    .args(["--netns", &pod.netns]);
            }
            Src::Uncaptured(p) => {
                c.args(["--netns", &self.pods[p].netns]);
            }
            Src::Outside => {
                c.args(["--netns", &self.outside_netns]);
            }
        }
        c.args(args);
        c
    }

    /// One exchange from `from` (`signet echo client` with `args`).
    pub fn client(&self, from: Src<'_>, args: &[&str]) -> Exchange {
        match self
            .client_command(from, args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|e| Exchange {
                error: Some(format!(
                    "the client said nothing readable ({e}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                ..Exchange::default()
            }),
            Err(e) => Exchange {
                error: Some(format!("{}: {e}", self.exe.display())),
                ..Exchange::default()
            },
        }
    }

    /// A client that goes on (`--hold`, `--repeat-ms`) until its stdin is closed.
    pub fn spawn_client(&self, from: Src<'_>, args: &[&str]) -> Result<Running, String> {
        let mut child = self
            .client_command(from, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.exe.display()))?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Running::new(ProcessClient { child, stdout }))
    }

    /// Stops `node`'s agent (the topology's [`AgentControl`] says how).
    pub fn stop_agent(&self, node: usize) -> Result<(), String> {
        self.agents.stop(&self.nodes[node])?;
        self.made().down.push(node);
        Ok(())
    }

    pub fn agent_down(&self, node: usize) -> bool {
        self.made().down.contains(&node)
    }

    /// Starts `node`'s stopped agent again and waits until everything is OK.
    pub fn start_agent(&self, node: usize) -> Result<(), String> {
        self.agents.start(&self.nodes[node])?;
        self.made().down.retain(|n| *n != node);
        self.wait_ok(Duration::from_secs(60)).map(drop)
    }

    /// Frames on `node`'s underlay while `during` runs: how many, how many to or from the HBONE
    /// port, and whether `marker` appeared in any.
    pub fn capture_underlay(
        &self,
        node: usize,
        marker: &[u8],
        during: &mut dyn FnMut(),
    ) -> Result<Capture, String> {
        let n = &self.nodes[node];
        let iface = n
            .underlay
            .clone()
            .ok_or_else(|| format!("the topology names no underlay interface for {}", n.name))?;
        let netns = crate::datapath::netns::path_of(&n.netns);
        let socket = std::thread::scope(|s| {
            s.spawn(|| packet_socket(Some(&netns), &iface))
                .join()
                .unwrap_or_else(|_| Err("the capture thread panicked".into()))
        })?;
        let marker = marker.to_vec();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || read_frames(socket, &marker, &stop))
        };
        during();
        // What `during` sent may still be on its way.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let capture = reader.join().map_err(|_| "the capture panicked")?;
        Ok(capture)
    }

    /// Leaves everything in place (the caller said --keep).
    pub fn keep(&self) {
        let mut made = self.made();
        for c in &mut made.children {
            // Servers go on running: detach them by forgetting the handles.
            let _ = c.stdout.take();
        }
        made.children.clear();
        made.files.clear();
        made.netns.clear();
        made.cgroups.clear();
        made.routes.clear();
    }

    /// Removes everything the suite made, in reverse: servers, state files (and waits for the
    /// agents to forget the pods), routes, namespaces, cgroups.
    pub fn remove(&self) -> Result<(), String> {
        let mut errors = vec![];
        let down = self.made().down.clone();
        for node in down {
            if let Err(e) = self.start_agent(node) {
                errors.push(format!(
                    "starting {}'s agent again: {e}",
                    self.nodes[node].name
                ));
            }
        }
        let mut made = self.made();
        for c in &mut made.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        made.children.clear();
        for f in made.files.drain(..) {
            if let Err(e) = std::fs::remove_file(&f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(format!("{}: {e}", f.display()));
            }
        }
        drop(made);
        if let Err(e) = self.settle() {
            errors.push(e);
        }
        let mut made = self.made();
        for (ns, net) in made.routes.drain(..) {
            let _ = ip(&["-n", &ns, "route", "del", &net]);
        }
        for ns in made.netns.drain(..).rev() {
            kill_netns_pids(&ns);
            if let Err(e) = ip(&["netns", "del", &ns]) {
                errors.push(e);
            }
        }
        for cg in made.cgroups.drain(..).rev() {
            if let Err(e) = remove_cgroup(&cg) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Workloads for Local<'_> {
    fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        Local::pod_ip(self, pod)
    }
    fn pod_node(&self, pod: &str) -> usize {
        Local::pod_node(self, pod)
    }
    fn pod_ref(&self, pod: &str) -> String {
        let peer = PODS.iter().any(|p| p.name == pod && p.peer);
        let ns = if peer {
            &self.names.peer_ns
        } else {
            &self.names.ns
        };
        format!("{ns}/{pod}")
    }
    fn apply_policies(&self, yaml: &str) -> Result<(), String> {
        Local::apply_policies(self, yaml)
    }
    fn flows(&self, node: usize, since_ms: u64) -> Result<Vec<FlowEntry>, String> {
        Local::flows(self, node, since_ms)
    }
    fn debug_state(&self, node: usize) -> Result<serde_json::Value, String> {
        Local::debug_state(self, node)
    }
    fn client(&self, from: Src<'_>, args: &[&str]) -> Exchange {
        Local::client(self, from, args)
    }
    fn spawn_client(&self, from: Src<'_>, args: &[&str]) -> Result<Running, String> {
        Local::spawn_client(self, from, args)
    }
    fn capture_underlay(
        &self,
        node: usize,
        marker: &[u8],
        during: &mut dyn FnMut(),
    ) -> Result<Capture, String> {
        Local::capture_underlay(self, node, marker, during)
    }
    fn stop_agent(&self, node: usize) -> Result<(), String> {
        Local::stop_agent(self, node)
    }
    fn agent_down(&self, node: usize) -> bool {
        Local::agent_down(self, node)
    }
    fn start_agent(&self, node: usize) -> Result<(), String> {
        Local::start_agent(self, node)
    }
    fn keep(&self) {
        Local::keep(self)
    }
    fn remove(&self) -> Result<(), String> {
        Local::remove(self)
    }
}

/// A client process that goes on until told to stop.
#[derive(Debug)]
struct ProcessClient {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Session for ProcessClient {
    /// The next line it printed, as JSON. A client prints its first line within its own
    /// timeout (after the first exchange, or when that failed and it exits).
    fn next_line(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("the client exited without a word".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("`{}`: {e}", line.trim())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether it has finished on its own within `within` (a held connection that ended).
    fn ended_within(&mut self, within: Duration) -> bool {
        poll(within, || self.child.try_wait().ok().flatten()).is_some()
    }

    /// Closes its stdin and reads its last report.
    fn finish(mut self: Box<Self>) -> Result<Exchange, String> {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        let _ = self.child.wait();
        let last = rest.lines().last().unwrap_or_default();
        serde_json::from_str(last).map_err(|e| format!("the client's last report `{last}`: {e}"))
    }
}

impl Drop for ProcessClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigkill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn kill_netns_pids(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            sigkill(pid);
        }
    }
}

/// Removes a cgroup the suite made, once the processes in it (killed) are gone.
fn remove_cgroup(cg: &Path) -> Result<(), String> {
    if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            sigkill(pid);
        }
    }
    let gone = poll(Duration::from_secs(5), || match std::fs::remove_dir(cg) {
        Ok(()) => Some(Ok(())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Ok(())),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => None,
        Err(e) => Some(Err(e)),
    });
    match gone {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("{}: {e}", cg.display())),
        None => Err(format!("{}: still busy after 5 s", cg.display())),
    }
}

/// The processes that are a suite's host server (`echo serve --name host --netns NODE`) on
/// one of `nodes`.
fn host_servers(nodes: &[Node]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let has = |pair: [&str; 2]| {
                argv.windows(2)
                    .any(|w| w[0] == pair[0].as_bytes() && w[1] == pair[1].as_bytes())
            };
            let host = has(["echo", "serve"])
                && has(["--name", "host"])
                && nodes.iter().any(|n| has(["--netns", &n.netns]));
            host.then_some(pid)
        })
        .collect()
}

/// Whether `name` is one the suite makes: `sct`, four hex digits, then `-` or `p`/`o`.
fn suite_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 7
        && name.starts_with("sct")
        && b[3..7].iter().all(u8::is_ascii_hexdigit)
        && matches!(b[7], b'-' | b'p' | b'o')
}

/// Removes what any run of the suite left in this topology: its state files (then waits for
/// the agents), the processes in its namespaces, its routes, namespaces and cgroups.
pub fn cleanup_all(topology: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(topology)
        .map_err(|e| format!("topology {}: {e}", topology.display()))?;
    let d: Described =
        serde_json::from_str(&text).map_err(|e| format!("topology {}: {e}", topology.display()))?;
    let mut removed = vec![];
    if let Some(dir) = &d.state_dir {
        for entry in std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if suite_name(&name)
                && name.ends_with(".yaml")
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed.push(entry.path().display().to_string());
            }
        }
    }
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    let netns: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| suite_name(n))
        .map(str::to_owned)
        .collect();
    // Routes to the suite's /24s go via a node address; the /24 is the one on a suite veth.
    let mut nets = vec![];
    for node in &d.nodes {
        let out = Command::new("ip")
            .args(["-n", &node.netns, "-4", "-o", "addr", "show"])
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 3
                && suite_name(f[1])
                && let Some((a, _)) = f[3].split_once('/')
                && let Ok(a) = a.parse::<Ipv4Addr>()
            {
                let o = a.octets();
                nets.push(format!("{}.{}.{}.0/24", o[0], o[1], o[2]));
            }
        }
    }
    for node in &d.nodes {
        for net in &nets {
            if ip(&["-n", &node.netns, "route", "del", net]).is_ok() {
                removed.push(format!("route {net} on {}", node.name));
            }
        }
    }
    for ns in netns {
        kill_netns_pids(&ns);
        if ip(&["netns", "del", &ns]).is_ok() {
            removed.push(format!("netns {ns}"));
        }
    }
    // The server on the first node's own address lives in the node's namespace, which is not
    // the suite's: it is found by its command line.
    for pid in host_servers(&d.nodes[..1]) {
        sigkill(pid);
        removed.push(format!("host server {pid}"));
    }
    for node in &d.nodes {
        let Some(root) = &node.cgroup_root else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            if suite_name(&e.file_name().to_string_lossy()) && remove_cgroup(&e.path()).is_ok() {
                removed.push(e.path().display().to_string());
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_taken_in_order_from_the_pool_and_a_small_pool_says_so() {
        assert_eq!(subnet("10.99.64.0/18", 0), Ok([10, 99, 64]));
        assert_eq!(subnet("10.99.64.0/18", 7), Ok([10, 99, 71]));
        assert!(
            subnet("10.99.64.0/24", 1)
                .expect_err("refused")
                .contains("too small")
        );
        assert!(
            subnet("10.99.64.0/25", 0)
                .expect_err("refused")
                .contains("24 or less")
        );
        assert!(subnet("nope", 0).is_err());
    }

    #[test]
    fn only_the_suites_own_names_are_taken_for_its_own() {
        assert!(suite_name("sct1a2b-client"));
        assert!(suite_name("sct1a2bp3"));
        assert!(suite_name("sct00ffo"));
        assert!(!suite_name("sct1a2"));
        assert!(!suite_name("sctzzzz-client"));
        assert!(!suite_name("signet-demo-web-0"));
    }
}
