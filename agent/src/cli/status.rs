//! `signet status [--wait] [--wait-duration 5m] [-o json]`: every agent's health on one screen,
//! from each agent's `/status` (admin port), with a line per agent saying OK, degraded or error
//! and why, and a summary. Exit 0 only when every agent is OK.
//!
//! Where the agents are comes from the local topology's description (`topology.json`, which
//! `deploy/local/demo.sh up` prints and the test beds write): each node's network namespace and
//! admin address. The admin port listens on the node's loopback, so the request is made from
//! inside the node's namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::admin::status::{AgentStatus, Health, Level};

/// Where the demo leaves its topology.
const DEMO_TOPOLOGY: &str = "/tmp/signet-demo/topology.json";

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The local topology's description (default: $SIGNET_TOPOLOGY, else the demo's).
    #[arg(long, conflicts_with = "kubernetes")]
    topology: Option<PathBuf>,
    /// Find the CA and the agents through the Kubernetes API instead (in-cluster, $KUBECONFIG,
    /// or --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Where Signet runs (Kubernetes mode).
    #[arg(long, default_value = "signet-system")]
    namespace: String,
    /// Reach the admin ports through the API server (`pods/portforward`), as from a laptop
    /// that cannot reach pod and node addresses; without it they are asked directly.
    #[arg(long, requires = "kubernetes")]
    port_forward: bool,
    /// Poll until everything is OK or --wait-duration passes, saying what it waits for.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits: `90s`, `5m`, `1h`, or seconds.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    wait_duration: Duration,
    /// `text` (default) or `json`.
    #[arg(short = 'o', long, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `90s`, `5m`, `1h`, `250ms`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (90s, 5m, 1h)"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("`{s}`: unknown unit `{other}` (use ms, s, m or h)")),
    };
    Ok(d)
}

/// What `signet status` needs of the topology's description.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub(crate) nodes: Vec<TopologyNode>,
    /// The CA's admin port, when the topology has one.
    pub(crate) ca: Option<TopologyCa>,
    /// (ready, wanted) CA replicas, when the cluster says (Kubernetes mode).
    #[serde(skip)]
    pub(crate) ca_replicas: Option<(i32, i32)>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyCa {
    /// Its network namespace, when it is not this one's.
    pub(crate) netns: Option<String>,
    pub(crate) admin: SocketAddr,
    /// Its pod (Kubernetes mode).
    #[serde(skip)]
    pub(crate) pod: Option<String>,
    /// How `admin` reaches the pod, when not directly (a port-forward).
    #[serde(skip)]
    pub(crate) via: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopologyNode {
    pub(crate) name: String,
    /// The node's network namespace (a name under /run/netns, or a path), when it is not this
    /// one's.
    pub(crate) netns: Option<String>,
    pub(crate) agent_admin: SocketAddr,
    /// Its pod (Kubernetes mode).
    #[serde(skip)]
    pub(crate) pod: Option<String>,
    /// How `agent_admin` reaches the pod, when not directly (a port-forward).
    #[serde(skip)]
    pub(crate) via: Option<String>,
}

/// One agent as seen from here.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub node: String,
    pub health: Health,
    /// What the agent said, when it answered.
    pub status: Option<AgentStatus>,
}

/// The CA as seen from here.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaReport {
    pub health: Health,
    pub status: Option<signet_ca::status::CaStatus>,
    /// (ready, wanted) replicas, when the cluster says.
    pub replicas: Option<(i32, i32)>,
}

/// Everything `signet status` found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub level: Level,
    /// `None` when the topology names no CA admin port.
    pub ca: Option<CaReport>,
    pub agents: Vec<AgentReport>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.level == Level::Ok
    }

    /// One line per component that is not OK, with its first reason (what `--wait` waits for).
    pub fn waiting_for(&self) -> Vec<String> {
        let first = |h: &Health| h.reasons.first().map_or("?", String::as_str).to_owned();
        self.ca
            .iter()
            .filter(|c| c.health.level != Level::Ok)
            .map(|c| format!("the CA: {}", first(&c.health)))
            .chain(
                self.agents
                    .iter()
                    .filter(|a| a.health.level != Level::Ok)
                    .map(|a| format!("{}: {}", a.node, first(&a.health))),
            )
            .collect()
    }
}

pub fn run(args: StatusArgs) -> u8 {
    let within = if args.wait {
        args.wait_duration
    } else {
        Duration::ZERO
    };
    let say = |now: &[String]| {
        for line in now {
            eprintln!("waiting for {line}");
        }
    };
    let report = if args.kubernetes {
        match super::kube::Kube::connect(args.kubeconfig.as_deref()) {
            Ok(kube) => {
                let find = || {
                    if args.port_forward {
                        kube.forwarded_topology(&args.namespace)
                    } else {
                        kube.block_on(discover(&kube.client, &args.namespace))
                    }
                };
                wait_with(find, within, say)
            }
            Err(e) => Err(e),
        }
    } else {
        match topology_path(args.topology.as_deref()) {
            Ok(path) => wait(&path, within, say),
            Err(e) => Err(e),
        }
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("signet status: {e}");
            return 2;
        }
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("signet status: {e}");
                return 2;
            }
        },
        Output::Text => print!("{}", render(&report, std::time::SystemTime::now())),
    }
    if report.ok() { 0 } else { 1 }
}

/// Asks every agent of the topology at `path` once.
pub fn check(path: &Path) -> Result<Report, String> {
    Ok(collect(&read_topology(path)?))
}

/// Asks every agent until all are OK or `within` has passed (at once for zero), and returns the
/// last answer. `waiting` hears what is still awaited each time that changes.
pub fn wait(
    path: &Path,
    within: Duration,
    waiting: impl FnMut(&[String]),
) -> Result<Report, String> {
    let topology = read_topology(path)?;
    wait_with(|| Ok(topology.clone()), within, waiting)
}

/// As [`wait`], with the CA and agents found anew by `find` each time (Kubernetes mode: pods
/// come and go while it waits).
pub fn wait_with(
    mut find: impl FnMut() -> Result<Topology, String>,
    within: Duration,
    mut waiting: impl FnMut(&[String]),
) -> Result<Report, String> {
    let deadline = Instant::now() + within;
    let mut said = Vec::new();
    loop {
        let topology = match find() {
            Ok(t) => t,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                let now = vec![e];
                if now != said {
                    waiting(&now);
                    said = now;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let report = collect(&topology);
        if report.ok() || Instant::now() >= deadline {
            return Ok(report);
        }
        let now = report.waiting_for();
        if now != said {
            waiting(&now);
            said = now;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub(crate) fn topology_path(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os("SIGNET_TOPOLOGY") {
        return Ok(PathBuf::from(p));
    }
    if Path::new(DEMO_TOPOLOGY).exists() {
        return Ok(PathBuf::from(DEMO_TOPOLOGY));
    }
    Err(format!(
        "no topology to read: give --topology FILE or set SIGNET_TOPOLOGY (`deploy/local/demo.sh up` \
         prints the path of its topology.json; it is {DEMO_TOPOLOGY} when the demo runs)"
    ))
}

pub fn read_topology(path: &Path) -> Result<Topology, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("topology {}: {e}", path.display()))?;
    let t: Topology =
        serde_json::from_str(&text).map_err(|e| format!("topology {}: {e}", path.display()))?;
    if t.nodes.is_empty() {
        return Err(format!("topology {}: no nodes in it", path.display()));
    }
    Ok(t)
}

/// Asks the CA and every agent, one thread each.
fn collect(topology: &Topology) -> Report {
    let (ca, agents): (Option<CaReport>, Vec<AgentReport>) = std::thread::scope(|s| {
        let replicas = topology.ca_replicas;
        let ca = topology
            .ca
            .as_ref()
            .map(|c| s.spawn(move || ask_ca(c, replicas)));
        let asks: Vec<_> = topology
            .nodes
            .iter()
            .map(|n| s.spawn(move || ask(n)))
            .collect();
        let agents = asks
            .into_iter()
            .zip(&topology.nodes)
            .map(|(h, n)| {
                h.join().unwrap_or_else(|_| AgentReport {
                    node: n.name.clone(),
                    health: error("the request thread panicked".into()),
                    status: None,
                })
            })
            .collect();
        let ca = ca.map(|h| {
            h.join().unwrap_or_else(|_| CaReport {
                health: error("the request thread panicked".into()),
                status: None,
                replicas: topology.ca_replicas,
            })
        });
        (ca, agents)
    });
    let level = agents
        .iter()
        .map(|a| a.health.level)
        .chain(ca.iter().map(|c| c.health.level))
        .max()
        .unwrap_or(Level::Error);
    Report { level, ca, agents }
}

fn ask_ca(ca: &TopologyCa, replicas: Option<(i32, i32)>) -> CaReport {
    let netns = ca.netns.as_deref().map(crate::datapath::netns::path_of);
    let body = match get(netns.as_deref(), ca.admin, "/status") {
        Ok(b) => b,
        Err(e) => {
            let at = ca
                .via
                .clone()
                .unwrap_or_else(|| format!("at {}{}", ca.admin, where_(ca.netns.as_deref())));
            return CaReport {
                health: error(format!(
                    "CA unreachable {at}: {e} (is signet-ca running with its admin port?)"
                )),
                status: None,
                replicas,
            };
        }
    };
    match serde_json::from_str::<signet_ca::status::CaStatus>(&body) {
        Ok(status) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let mut reasons = status.problems(now);
            if let Some((ready, wanted)) = replicas
                && ready < wanted
            {
                reasons.push(format!("{ready} of {wanted} CA replicas ready"));
            }
            CaReport {
                health: Health {
                    level: if reasons.is_empty() {
                        Level::Ok
                    } else {
                        Level::Degraded
                    },
                    reasons,
                },
                status: Some(status),
                replicas,
            }
        }
        Err(e) => CaReport {
            health: error(format!("the CA's /status did not parse: {e}")),
            status: None,
            replicas,
        },
    }
}

impl TopologyNode {
    /// Why this node's agent could not be asked, and what to look at.
    pub(crate) fn unreachable(&self, why: &str) -> String {
        let at = self
            .via
            .clone()
            .unwrap_or_else(|| format!("at {}{}", self.agent_admin, where_(self.netns.as_deref())));
        format!(
            "agent unreachable {at}: {why} (is signet-agent running on {}?)",
            self.name
        )
    }
}

/// ` in network namespace N`, or nothing for this one.
fn where_(netns: Option<&str>) -> String {
    netns.map_or(String::new(), |n| format!(" in network namespace {n}"))
}

/// The agents (pods of the `signet-agent` DaemonSet) and the CA (pods and Deployment
/// `signet-ca`) in `namespace`, as the API server lists them: each at its pod address and the
/// port its container names `admin` (15020 and 15014 when none does). Agents run on the host
/// network, so their admin port is on the node's address; from a laptop that cannot reach the
/// nodes, `--port-forward` reaches each through the API server instead (`cli::kube`).
pub async fn discover(client: &kube::Client, namespace: &str) -> Result<Topology, String> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = |app: &'static str| {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/name={app}")))
                .await
                .map(|l| l.items)
                .map_err(|e| format!("listing the {app} pods in {namespace}: {e}"))
        }
    };
    let admin = |pod: &Pod, default: u16| -> Option<SocketAddr> {
        let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
        let port = pod
            .spec
            .as_ref()
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some("admin"))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .unwrap_or(default);
        Some(SocketAddr::new(ip, port))
    };
    let mut nodes = Vec::new();
    for pod in list("signet-agent").await? {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| pod_name.clone());
        nodes.push(match admin(&pod, 15020) {
            Some(agent_admin) => TopologyNode {
                name,
                netns: None,
                agent_admin,
                pod: Some(pod_name),
                via: None,
            },
            // Nothing listens on the discard port of loopback: reported unreachable, by name.
            None => TopologyNode {
                name: format!("{name} (pod {pod_name} has no address yet)"),
                netns: None,
                agent_admin: SocketAddr::from(([127, 0, 0, 1], 9)),
                pod: None,
                via: None,
            },
        });
    }
    if nodes.is_empty() {
        return Err(format!(
            "no signet-agent pods in namespace {namespace} (is Signet installed? `kubectl apply -k deploy/kubernetes`)"
        ));
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let ca_pods = list("signet-ca").await?;
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let ca = ca_pods
        .iter()
        .filter(|p| ready(p))
        .chain(ca_pods.iter())
        .find_map(|p| Some((admin(p, 15014)?, p.metadata.name.clone())))
        .map(|(admin, pod)| TopologyCa {
            netns: None,
            admin,
            pod,
            via: None,
        });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let ca_replicas = match deployments.get_opt("signet-ca").await {
        Ok(Some(d)) => Some((
            d.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        )),
        Ok(None) => None,
        Err(e) => return Err(format!("reading Deployment {namespace}/signet-ca: {e}")),
    };
    Ok(Topology {
        nodes,
        ca,
        ca_replicas,
    })
}

fn error(reason: String) -> Health {
    Health {
        level: Level::Error,
        reasons: vec![reason],
    }
}

fn ask(node: &TopologyNode) -> AgentReport {
    let unreachable = |why: String| AgentReport {
        node: node.name.clone(),
        health: error(node.unreachable(&why)),
        status: None,
    };
    let netns = node.netns.as_deref().map(crate::datapath::netns::path_of);
    let body = match get(netns.as_deref(), node.agent_admin, "/status") {
        Ok(b) => b,
        Err(e) => return unreachable(e),
    };
    match serde_json::from_str::<AgentStatus>(&body) {
        Ok(status) => AgentReport {
            node: node.name.clone(),
            health: status.health(),
            status: Some(status),
        },
        Err(e) => AgentReport {
            node: node.name.clone(),
            health: error(format!("its /status did not parse: {e}")),
            status: None,
        },
    }
}

/// `GET path` on the admin port at `addr` (from inside the namespace at `netns`, when given):
/// the body of a 200.
fn get(netns: Option<&Path>, addr: SocketAddr, path: &str) -> Result<String, String> {
    super::admin_http::get(netns, addr, path, Some(Duration::from_secs(3)))?.text()
}

fn ago_or_in(t: u64, now: std::time::SystemTime) -> String {
    let now = now
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let human = |s: u64| match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if t >= now {
        format!("in {}", human(t - now))
    } else {
        format!("{} ago (expired)", human(now - t))
    }
}

/// The screen: the CA, one block per agent, then the summary.
pub fn render(report: &Report, now: std::time::SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(ca) = &report.ca {
        let _ = write!(out, "CA {:<17} {:<9}", "", ca.health.level.as_str());
        match &ca.status {
            Some(s) => {
                let _ = writeln!(
                    out,
                    " v{}, {}, serving {} ({})",
                    s.version, s.trust_domain, s.serving, s.cluster_source
                );
                let roots: Vec<String> = s
                    .roots
                    .roots
                    .iter()
                    .map(|r| {
                        let id = r.id.map_or(String::new(), |i| format!("{i} "));
                        let until = ago_or_in(r.not_after.max(0) as u64, now);
                        match (r.state.as_str(), r.signing_from, r.retire_at) {
                            ("pending", Some(from), _) => format!(
                                "{id}pending (signs {}, expires {until})",
                                ago_or_in(from.max(0) as u64, now)
                            ),
                            ("retiring", _, Some(at)) => format!(
                                "{id}retiring (leaves the bundle {}, expires {until})",
                                ago_or_in(at.max(0) as u64, now)
                            ),
                            (state, _, _) => format!("{id}{state} (expires {until})"),
                        }
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "  roots          {} ({}, bundle sequence {})",
                    roots.join(", "),
                    s.roots.managed,
                    s.roots.sequence
                );
                let next = s
                    .roots
                    .next_rotation
                    .map_or("none planned here".into(), |t| {
                        ago_or_in(t.max(0) as u64, now)
                    });
                let _ = writeln!(out, "  next rotation  {next}");
                if let Some((ready, wanted)) = ca.replicas {
                    let _ = writeln!(out, "  replicas       {ready}/{wanted} ready");
                }
            }
            None => out.push('\n'),
        }
        for r in &ca.health.reasons {
            let _ = writeln!(out, "  ! {r}");
        }
    }
    for a in &report.agents {
        let _ = write!(out, "Agent {:<14} {:<9}", a.node, a.health.level.as_str());
        match &a.status {
            Some(s) => {
                let _ = writeln!(
                    out,
                    " v{}, generation {}, mTLS {}",
                    s.version, s.generation, s.mtls_mode
                );
                let d = &s.datapath;
                let _ = writeln!(
                    out,
                    "  datapath       {} programs attached, tc on {} interfaces",
                    d.programs.len(),
                    d.interfaces.len()
                );
                let maps: Vec<String> = d
                    .maps
                    .iter()
                    .map(|m| {
                        format!(
                            "{} {}/{} ({}%)",
                            m.name.trim_start_matches("signet_"),
                            m.entries,
                            m.capacity,
                            m.percent()
                        )
                    })
                    .collect();
                let _ = writeln!(out, "  maps           {}", maps.join(", "));
                let c = &s.certificates;
                let expiry = c.earliest_expiry.map_or(String::new(), |t| {
                    format!(", earliest expiry {}", ago_or_in(t, now))
                });
                let _ = writeln!(
                    out,
                    "  certificates   {} held, {} waiting{expiry}",
                    c.held,
                    c.waiting.len()
                );
                let _ = writeln!(
                    out,
                    "  connections    {} outbound, {} inbound",
                    s.connections.outbound, s.connections.inbound
                );
                let _ = writeln!(
                    out,
                    "  policies       {} in force ({} audit)",
                    s.policies.in_force, s.policies.audit
                );
                if !s.gateways.is_empty() {
                    let gws: Vec<String> = s
                        .gateways
                        .iter()
                        .map(|g| {
                            let state = if g.programmed {
                                "programmed"
                            } else {
                                "not programmed"
                            };
                            match g.addresses.as_slice() {
                                [] => format!("{}/{} {state}", g.namespace, g.name),
                                a => {
                                    format!("{}/{} {state} on {}", g.namespace, g.name, a.join(" "))
                                }
                            }
                        })
                        .collect();
                    let _ = writeln!(out, "  gateways       {}", gws.join(", "));
                }
            }
            None => out.push('\n'),
        }
        for r in &a.health.reasons {
            let _ = writeln!(out, "  ! {r}");
        }
    }
    if let Some(ca) = &report.ca {
        let _ = writeln!(out, "\nCA: {}", ca.health.level.as_str());
    }
    let count = |l: Level| report.agents.iter().filter(|a| a.health.level == l).count();
    let _ = writeln!(
        out,
        "{}Agents: {}/{} OK, {} degraded, {} error",
        if report.ca.is_some() { "" } else { "\n" },
        count(Level::Ok),
        report.agents.len(),
        count(Level::Degraded),
        count(Level::Error)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("5 minutes").is_err_and(|e| e.contains("unknown unit")));
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn the_screen_says_what_is_wrong_and_the_summary_counts() {
        let healthy = AgentStatus {
            node: "node-a".into(),
            version: "0.1.0".into(),
            ready: true,
            mtls_mode: "strict".into(),
            datapath: crate::admin::status::DatapathStatus {
                programs: vec!["signet_connect4".into()],
                maps: vec![crate::admin::status::MapFill {
                    name: "signet_policy".into(),
                    entries: 40,
                    capacity: 65536,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let report = Report {
            level: Level::Error,
            ca: None,
            agents: vec![
                AgentReport {
                    node: "node-a".into(),
                    health: healthy.health(),
                    status: Some(healthy),
                },
                AgentReport {
                    node: "node-b".into(),
                    health: error("agent unreachable at 127.0.0.1:15021".into()),
                    status: None,
                },
            ],
        };
        let screen = render(&report, std::time::SystemTime::now());
        assert!(screen.contains("Agent node-a         OK"), "{screen}");
        assert!(screen.contains("policy 40/65536 (0%)"), "{screen}");
        assert!(screen.contains("Agent node-b         error"), "{screen}");
        assert!(
            screen.contains("  ! agent unreachable at 127.0.0.1:15021"),
            "{screen}"
        );
        assert!(
            screen.ends_with("Agents: 1/2 OK, 0 degraded, 1 error\n"),
            "{screen}"
        );
        assert_eq!(
            report.waiting_for(),
            ["node-b: agent unreachable at 127.0.0.1:15021"]
        );
    }
}
