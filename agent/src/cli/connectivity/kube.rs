//! The suite's workloads in a cluster (`signet connectivity test --kubernetes`): everything goes
//! through the API server, as `cilium connectivity test` does it.
//!
//! - Namespaces (`NS` and `NS-peer`, labelled `signet.dev/connectivity`), a ServiceAccount per
//!   identity, one single-replica Deployment per pod of `local::PODS`, pinned to its node by
//!   `kubernetes.io/hostname`, running `signet echo serve` from Signet's own image (the agent
//!   DaemonSet's, unless `--image`); a host-network Deployment per node (`host-N`: the node's
//!   own processes, outside every pod; the first one serves `HOST_PORT`); the `echo` Service;
//!   the Gateway and its HTTPRoute. All applied server-side, as `signet-connectivity`.
//! - It waits until every pod runs and every agent reports OK (`signet status --wait`).
//! - Clients run by exec in the pods (`signet echo client`); from outside the cluster they run
//!   where this command runs, when `--outside` names this machine's two addresses that pods can
//!   reach (this command then serves `WORLD_PORT` there too).
//! - Policies are applied as IdentityPolicies; a phase starts once every agent's
//!   `/debug/state` lists exactly the suite's policies with the specs the API server holds.
//! - Flows and debug state come from the agents' admin ports through port-forwards.
//! - Removing deletes both namespaces (and with them everything in them) and the GatewayClass,
//!   and waits until they are gone.
//!
//! - The underlay check runs `signet echo capture` by exec in the node's agent pod (host network,
//!   `CAP_NET_RAW`) on the interface holding the node's address.
//!
//! - An agent restart deletes the node's agent pod and waits for the DaemonSet's replacement
//!   to be OK; the checks made while an agent is down are skipped, since the replacement comes
//!   at once (the local topology keeps an agent down and runs them).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use kube::api::{
    Api, ApiResource, AttachParams, DeleteParams, DynamicObject, GroupVersionKind, ListParams,
    Patch, PatchParams,
};
use serde_json::{Value, json};

use super::local::{Capture, HOST_PORT, Names, PODS, Src, WORLD_PORT};
use super::{Env, NodeInfo, Running, Session, Workloads, poll};
use crate::cli::echo::Exchange;
use crate::cli::kube::Kube;
use crate::cli::status::Topology;
use crate::flow::FlowEntry;

/// The field manager of everything the suite applies.
const MANAGER: &str = "signet-connectivity";

/// What `--kubernetes` adds to the suite's options.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    /// Where Signet runs.
    pub signet_namespace: String,
    /// The image with `signet` in it (default: the agent DaemonSet's).
    pub image: Option<String>,
    /// Two addresses of this machine that pods reach: the machine outside the cluster.
    pub outside: Option<[Ipv4Addr; 2]>,
}

#[derive(Debug, Clone)]
struct PodAt {
    name: String,
    namespace: String,
    ip: Ipv4Addr,
    node: usize,
}

/// The suite in a cluster.
#[derive(Debug)]
pub struct Cluster {
    kube: Arc<Kube>,
    signet_namespace: String,
    names: Names,
    exe: PathBuf,
    /// The agents as last found (their pods change when one is replaced).
    topology: Mutex<Topology>,
    /// Nodes whose agent pod was deleted, with its name, until the replacement is OK.
    restarted: Mutex<BTreeMap<usize, String>>,
    node_names: Vec<String>,
    node_addrs: Vec<Ipv4Addr>,
    pods: BTreeMap<&'static str, PodAt>,
    /// Per node, the host-network pod's name.
    hosts: Vec<String>,
    /// The world server this command runs for `outside`.
    world: Mutex<Option<Child>>,
}

/// The kinds the suite applies: (apiVersion, kind, plural, namespaced).
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "Service", "services", true),
    ("apps/v1", "Deployment", "deployments", true),
    (
        "gateway.networking.k8s.io/v1",
        "GatewayClass",
        "gatewayclasses",
        false,
    ),
    ("gateway.networking.k8s.io/v1", "Gateway", "gateways", true),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "httproutes",
        true,
    ),
    (
        "signet.dev/v1alpha1",
        "IdentityPolicy",
        "identitypolicies",
        true,
    ),
];

fn resource(api_version: &str, kind: &str) -> Result<(ApiResource, bool), String> {
    let (_, _, plural, namespaced) = KINDS
        .iter()
        .find(|(v, k, _, _)| *v == api_version && *k == kind)
        .ok_or_else(|| format!("the suite does not apply {api_version} {kind}"))?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Ok((ApiResource::from_gvk_with_plural(&gvk, plural), *namespaced))
}

fn api_for(client: &kube::Client, object: &Value) -> Result<(Api<DynamicObject>, String), String> {
    let (v, k) = (
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    );
    let (ar, namespaced) = resource(v, k)?;
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or_else(|| format!("a {k} without a name"))?
        .to_owned();
    let api = match (namespaced, object["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        (true, None) => return Err(format!("{k} {name} names no namespace")),
        (false, _) => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

/// Applies `object` server-side; the object as the API server now holds it.
async fn apply(client: &kube::Client, object: &Value) -> Result<DynamicObject, String> {
    let (api, name) = api_for(client, object)?;
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|e| {
        format!(
            "applying {} {name}: {e}",
            object["kind"].as_str().unwrap_or("?")
        )
    })
}

fn documents(yaml: &str) -> Result<Vec<Value>, String> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).map_err(|e| format!("the suite's YAML: {e}")))
        .filter(|v: &Result<Value, String>| v.as_ref().map_or(true, |v| !v.is_null()))
        .collect()
}

/// Builds the suite in the cluster and waits until it runs and every agent reports OK.
pub fn deploy<'a>(
    namespace: &str,
    exe: &std::path::Path,
    options: &KubeOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Env<'a>, String> {
    let kube = Arc::new(Kube::connect(options.kubeconfig.as_deref())?);
    let topology = kube.forwarded_topology(&options.signet_namespace)?;
    if topology.nodes.len() < 2 {
        return Err(format!(
            "the suite needs two nodes with a Signet agent, found {}",
            topology.nodes.len()
        ));
    }
    let client = kube.client.clone();
    let nodes_api: Api<KubeNode> = Api::all(client.clone());
    let mut nodes = vec![];
    for n in &topology.nodes[..2] {
        let node = kube
            .block_on(nodes_api.get(&n.name))
            .map_err(|e| format!("Node {}: {e}", n.name))?;
        let address = node
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .find(|a| a.type_ == "InternalIP")
            .and_then(|a| a.address.parse().ok())
            .ok_or_else(|| format!("Node {} has no IPv4 InternalIP", n.name))?;
        nodes.push(NodeInfo {
            name: n.name.clone(),
            address,
        });
    }
    let trust_domain = trust_domain(&topology);
    let names = Names::new(namespace, &trust_domain);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for ns in [&names.ns, &names.peer_ns] {
        if kube
            .block_on(namespaces.get_opt(ns))
            .map_err(|e| format!("Namespace {ns}: {e}"))?
            .is_some()
        {
            return Err(format!(
                "namespace {ns} exists: another run's workloads are in place; wait for it to end, or \
                 remove them with `signet connectivity cleanup --kubernetes`"
            ));
        }
    }
    let image = match &options.image {
        Some(i) => i.clone(),
        None => agent_image(&kube, &options.signet_namespace)?,
    };
    let mut cluster = Cluster {
        kube: kube.clone(),
        signet_namespace: options.signet_namespace.clone(),
        names: names.clone(),
        exe: exe.to_owned(),
        topology: Mutex::new(topology),
        restarted: Mutex::default(),
        node_names: nodes.iter().map(|n| n.name.clone()).collect(),
        node_addrs: nodes.iter().map(|n| n.address).collect(),
        pods: BTreeMap::new(),
        hosts: (0..nodes.len()).map(|i| format!("host-{i}")).collect(),
        world: Mutex::new(None),
    };
    say(&format!(
        "deploying {} Deployments in namespaces {} and {} with image {image}",
        PODS.len() + nodes.len(),
        names.ns,
        names.peer_ns
    ));
    if let Err(e) = cluster.build(&nodes, &image, options) {
        let _ = cluster.remove();
        return Err(e);
    }
    let service_ip = match cluster.service_ip() {
        Ok(ip) => ip,
        Err(e) => {
            let _ = cluster.remove();
            return Err(e);
        }
    };
    say("waiting for every pod to run and every agent to report OK (signet status --wait)");
    let report = match cluster.wait_ok(Duration::from_secs(120)) {
        Ok(r) => r,
        Err(e) => {
            let _ = cluster.remove();
            return Err(e);
        }
    };
    // Ready pods are not yet known everywhere: wait, as `cilium connectivity test` does, until
    // the Service has its endpoint and the mesh's paths answer before the first policy.
    say("waiting for the Service's endpoints and the first answers across the mesh");
    if let Err(e) = cluster.converge(&nodes, service_ip, options.outside.is_some()) {
        let _ = cluster.remove();
        return Err(e);
    }
    let strict = nodes
        .iter()
        .map(|n| {
            report.agents.iter().any(|a| {
                a.node == n.name && a.status.as_ref().is_some_and(|s| s.mtls_mode == "strict")
            })
        })
        .collect();
    Ok(Env {
        names,
        nodes,
        outside: options.outside,
        service_ip,
        gateway_port: GATEWAY_PORT,
        strict,
        uncaptured_in_pod: false,
        agent_stays_down: false,
        workloads: Box::new(cluster),
    })
}

/// The suite's Gateway listener port in a cluster.
const GATEWAY_PORT: u16 = 18000;

/// The trust domain of the agents' identities (cluster.local when none holds one yet).
fn trust_domain(topology: &Topology) -> String {
    topology
        .nodes
        .iter()
        .find_map(|n| {
            let body = crate::cli::admin_http::get(
                None,
                n.agent_admin,
                "/debug/state",
                Some(Duration::from_secs(5)),
            )
            .ok()?
            .text()
            .ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            let id = v["identities"].as_array()?.first()?["identity"].as_str()?;
            Some(id.strip_prefix("spiffe://")?.split('/').next()?.to_owned())
        })
        .unwrap_or_else(|| "cluster.local".into())
}

/// The image of the agent DaemonSet's pods: it has `signet` in it.
fn agent_image(kube: &Kube, namespace: &str) -> Result<String, String> {
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), namespace);
    let list = kube
        .block_on(pods.list(&ListParams::default().labels("app.kubernetes.io/name=signet-agent")))
        .map_err(|e| format!("listing the agent pods: {e}"))?;
    list.items
        .iter()
        .find_map(|p| p.spec.as_ref()?.containers.first()?.image.clone())
        .ok_or_else(|| "no agent pod names its image; give --image".into())
}

impl Cluster {
    fn manifests(&self, nodes: &[NodeInfo], image: &str) -> Vec<Value> {
        let names = &self.names;
        let mut out = vec![];
        for (ns, role) in [(&names.ns, "main"), (&names.peer_ns, "peer")] {
            out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"signet.dev/connectivity": role}}}));
        }
        let mut accounts: Vec<(&str, &str)> = PODS
            .iter()
            .map(|p| {
                (
                    if p.peer {
                        names.peer_ns.as_str()
                    } else {
                        names.ns.as_str()
                    },
                    p.sa,
                )
            })
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        for (ns, sa) in accounts {
            out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns}}));
        }
        let deployment =
            |name: &str, ns: &str, node: &str, sa: Option<&str>, host: bool, args: Vec<String>| {
                // The first node's host answers as `host`, as the local topology's does.
                let serves_as = if name == self.hosts[0] { "host" } else { name };
                let mut command = vec![
                    "signet".to_owned(),
                    "echo".into(),
                    "serve".into(),
                    "--name".into(),
                    serves_as.to_owned(),
                ];
                command.extend(args);
                let mut spec = json!({
                "nodeSelector": {"kubernetes.io/hostname": node},
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "echo", "image": image, "command": command,
                                "ports": [{"containerPort": 8080}]}]});
                if let Some(sa) = sa {
                    spec["serviceAccountName"] = json!(sa);
                }
                if host {
                    spec["hostNetwork"] = json!(true);
                }
                json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": spec}}})
            };
        for p in PODS {
            let ns = if p.peer { &names.peer_ns } else { &names.ns };
            let args: Vec<String> = if p.serves {
                [
                    "--tcp",
                    "0.0.0.0:8080",
                    "--tcp",
                    "0.0.0.0:8081",
                    "--udp",
                    "0.0.0.0:9000",
                ]
                .map(str::to_owned)
                .into()
            } else {
                // A client pod only needs to stay up; it answers nothing beyond its loopback.
                vec!["--tcp".into(), "127.0.0.1:8080".into()]
            };
            out.push(deployment(
                p.name,
                ns,
                &nodes[p.node].name,
                Some(p.sa),
                false,
                args,
            ));
        }
        for (i, n) in nodes.iter().enumerate() {
            let listen = if i == 0 {
                format!("{}:{HOST_PORT}", n.address)
            } else {
                "127.0.0.1:18091".into()
            };
            out.push(deployment(
                &self.hosts[i],
                &names.ns,
                &n.name,
                None,
                true,
                vec!["--tcp".into(), listen],
            ));
        }
        let (ns, host) = (&names.ns, names.gateway_host());
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": ns},
            "spec": {"selector": {"app": "echo-other"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
        out.push(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": ns}, "spec": {"controllerName": "signet.dev/gateway-controller"}}),
        );
        out.push(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "echo", "namespace": ns},
            "spec": {"gatewayClassName": ns, "listeners": [
                {"name": "http", "port": GATEWAY_PORT, "protocol": "HTTP", "hostname": host}]}}),
        );
        out.push(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "echo", "namespace": ns},
            "spec": {"parentRefs": [{"name": "echo"}], "hostnames": [host],
                     "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}}),
        );
        out
    }

    fn build(
        &mut self,
        nodes: &[NodeInfo],
        image: &str,
        options: &KubeOptions,
    ) -> Result<(), String> {
        for object in self.manifests(nodes, image) {
            self.kube.block_on(apply(&self.kube.client, &object))?;
        }
        if let Some(outside) = options.outside {
            let mut child = Command::new(&self.exe)
                .args(["echo", "serve", "--name", "outside", "--tcp"])
                .arg(format!("0.0.0.0:{WORLD_PORT}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("the world server at {outside:?}: {e}"))?;
            // It says `ready` once it listens.
            let mut line = String::new();
            if let Some(out) = child.stdout.take() {
                let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
            }
            let ready = line.trim() == "ready";
            *self.world.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
            if !ready {
                return Err(format!(
                    "the world server on port {WORLD_PORT} did not start: {line:?}"
                ));
            }
        }
        // Every pod running, ready and with its address.
        let pods: Vec<(&'static str, String)> = PODS
            .iter()
            .map(|p| {
                (
                    p.name,
                    if p.peer {
                        self.names.peer_ns.clone()
                    } else {
                        self.names.ns.clone()
                    },
                )
            })
            .chain(
                self.hosts
                    .iter()
                    .map(|h| ("", format!("{}/{h}", self.names.ns))),
            )
            .collect();
        let mut last = String::new();
        let found = poll(Duration::from_secs(120), || {
            let mut found = BTreeMap::new();
            for (name, ns) in &pods {
                let (ns, app) = match ns.split_once('/') {
                    Some((ns, host)) => (ns.to_owned(), host.to_owned()),
                    None => (ns.clone(), (*name).to_owned()),
                };
                let api: Api<Pod> = Api::namespaced(self.kube.client.clone(), &ns);
                let list = match self
                    .kube
                    .block_on(api.list(&ListParams::default().labels(&format!("app={app}"))))
                {
                    Ok(l) => l.items,
                    Err(e) => {
                        last = format!("listing pods in {ns}: {e}");
                        return None;
                    }
                };
                let running = list.iter().find(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().is_some_and(|s| {
                            s.phase.as_deref() == Some("Running")
                                && s.conditions
                                    .iter()
                                    .flatten()
                                    .any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                });
                let Some(pod) = running else {
                    last = format!("pod app={app} in {ns} is not running and ready yet");
                    return None;
                };
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|a| a.parse().ok());
                let node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .and_then(|n| self.node_names.iter().position(|m| m == n));
                let (Some(ip), Some(node)) = (ip, node) else {
                    last = format!(
                        "pod {} has no address or node yet",
                        pod.metadata.name.clone().unwrap_or_default()
                    );
                    return None;
                };
                found.insert(
                    app,
                    PodAt {
                        name: pod.metadata.name.clone().unwrap_or_default(),
                        namespace: ns,
                        ip,
                        node,
                    },
                );
            }
            Some(found)
        })
        .ok_or_else(|| format!("the suite's pods did not all run within 120 s: {last}"))?;
        for (app, at) in found {
            if let Some(spec) = PODS.iter().find(|p| p.name == app) {
                self.pods.insert(spec.name, at);
            } else if let Some(i) = self.hosts.iter().position(|h| *h == app) {
                self.hosts[i] = at.name;
            }
        }
        Ok(())
    }

    /// Until the `echo` Service's EndpointSlices list its pod and the suite's paths (pod to
    /// pod on both nodes and both namespaces, to the Service, to the Gateway from outside)
    /// answer once; names the first that does not within 60 s.
    fn converge(
        &self,
        nodes: &[NodeInfo],
        service_ip: Ipv4Addr,
        outside: bool,
    ) -> Result<(), String> {
        let slices: Api<DynamicObject> = Api::namespaced_with(
            self.kube.client.clone(),
            &self.names.ns,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("discovery.k8s.io", "v1", "EndpointSlice"),
                "endpointslices",
            ),
        );
        let echo = self.pod_ip("echo-other").to_string();
        poll(Duration::from_secs(60), || {
            let list = self
                .kube
                .block_on(
                    slices.list(&ListParams::default().labels("kubernetes.io/service-name=echo")),
                )
                .ok()?;
            list.items
                .iter()
                .any(|s| {
                    s.data["endpoints"]
                        .to_string()
                        .contains(&format!("\"{echo}\""))
                })
                .then_some(())
        })
        .ok_or("the echo Service has no endpoint for echo-other after 60 s")?;
        let to = |pod: &str| format!("{}:8080", self.pod_ip(pod));
        let mut paths = vec![
            (Src::Pod("client"), to("echo-same"), None),
            (Src::Pod("client"), to("echo-other"), None),
            (Src::Pod("peer-client"), to("echo-same"), None),
            (Src::Pod("client"), format!("{service_ip}:80"), None),
        ];
        if outside {
            paths.push((
                Src::Outside,
                format!("{}:{GATEWAY_PORT}", nodes[0].address),
                Some(self.names.gateway_host()),
            ));
        }
        for (from, addr, host) in paths {
            let mut args = vec![
                "--connect",
                addr.as_str(),
                "--http",
                "GET /",
                "--timeout-ms",
                "1000",
            ];
            if let Some(h) = &host {
                args.extend(["--host", h.as_str()]);
            }
            let mut last = String::new();
            poll(Duration::from_secs(60), || {
                let e = self.client(from, &args);
                if e.ok && e.status == Some(200) {
                    return Some(());
                }
                last = e.error.unwrap_or_else(|| format!("{:?}", e.status));
                None
            })
            .ok_or_else(|| format!("{from:?} → {addr} did not answer within 60 s: {last}"))?;
        }
        Ok(())
    }

    fn service_ip(&self) -> Result<Ipv4Addr, String> {
        let api: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(self.kube.client.clone(), &self.names.ns);
        let svc = self
            .kube
            .block_on(api.get("echo"))
            .map_err(|e| format!("Service echo: {e}"))?;
        svc.spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| "Service echo has no IPv4 ClusterIP".into())
    }

    fn wait_ok(&self, within: Duration) -> Result<crate::cli::status::Report, String> {
        super::all_ok(
            crate::cli::status::wait_with(
                || self.kube.forwarded_topology(&self.signet_namespace),
                within,
                |_| {},
            ),
            within,
        )
    }

    fn admin(&self, node: usize, path: &str) -> Result<String, String> {
        let n = self
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nodes[node]
            .clone();
        crate::cli::admin_http::get(None, n.agent_admin, path, Some(Duration::from_secs(5)))
            .map_err(|e| n.unreachable(&e))?
            .text()
    }

    /// Where a client runs: (namespace, pod) for exec, or `None` for this machine.
    fn place(&self, from: Src<'_>) -> Option<(String, String)> {
        match from {
            Src::Pod(p) => self
                .pods
                .get(p)
                .map(|at| (at.namespace.clone(), at.name.clone())),
            Src::Uncaptured(p) => {
                let node = self.pods.get(p).map_or(0, |at| at.node);
                Some((self.names.ns.clone(), self.hosts[node].clone()))
            }
            Src::Outside => None,
        }
    }

    fn command(args: &[&str]) -> Vec<String> {
        ["signet", "echo", "client"]
            .iter()
            .chain(args)
            .map(|s| (*s).to_owned())
            .collect()
    }

    /// Settled when every agent enforces exactly `want` of the suite's namespaces' policies.
    fn settle(&self, want: &BTreeMap<String, String>) -> Result<(), String> {
        let ours = |name: &str| {
            let ns = name.split('/').next().unwrap_or_default();
            ns == self.names.ns || ns == self.names.peer_ns
        };
        let mut refused = None;
        for node in 0..self.node_names.len() {
            let mut last = String::from("no answer");
            let done = poll(Duration::from_secs(30), || {
                if let Some(why) = self.refusal(want) {
                    refused = Some(why);
                    return Some(());
                }
                let body = match self.admin(node, "/debug/state") {
                    Ok(b) => b,
                    Err(e) => {
                        last = e;
                        return None;
                    }
                };
                let v: Value = serde_json::from_str(&body).ok()?;
                let has: BTreeMap<String, String> = v["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| {
                        Some((
                            p["name"].as_str()?.to_owned(),
                            p["digest"].as_str()?.to_owned(),
                        ))
                    })
                    .filter(|(n, _)| ours(n))
                    .collect();
                if has == *want {
                    return Some(());
                }
                last = format!(
                    "it enforces {:?}{}",
                    has.keys().collect::<Vec<_>>(),
                    v["refused"]
                        .as_str()
                        .map(|r| format!("; refused: {r}"))
                        .unwrap_or_default()
                );
                None
            });
            if let Some(why) = refused.take() {
                return Err(why);
            }
            if done.is_none() {
                return Err(format!(
                    "{} did not enforce the phase's policies {:?} within 30 s ({last})",
                    self.node_names[node],
                    want.keys().collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }

    /// `command` by exec in `pod`, its output read line by line as it comes, its input held
    /// open until the session is finished.
    fn spawn_exec(&self, ns: &str, pod: &str, command: Vec<String>) -> Result<ExecClient, String> {
        let api: Api<Pod> = Api::namespaced(self.kube.client.clone(), ns);
        let mut process = self
            .kube
            .block_on(api.exec(
                pod,
                command,
                &AttachParams::default().stdin(true).stderr(false),
            ))
            .map_err(|e| format!("exec in pod {ns}/{pod}: {e}"))?;
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stdin = process.stdin();
        let stdout = process.stdout();
        let done = ended.clone();
        self.kube.spawn("exec session", async move {
            use tokio::io::AsyncBufReadExt as _;
            let hold_stdin = async move {
                let _ = closed.await;
                drop(stdin);
                std::future::pending::<()>().await;
            };
            let read = async {
                if let Some(stdout) = stdout {
                    let mut lines = tokio::io::BufReader::new(stdout).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if lines_tx.send(l).is_err() {
                            break;
                        }
                    }
                }
            };
            tokio::select! {
                () = hold_stdin => {}
                () = read => {}
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(lines_tx);
            let _ = process.join().await;
        });
        Ok(ExecClient {
            lines,
            close: Some(close),
            ended,
        })
    }

    /// A policy of `want` whose status says it is not valid, with the status's message.
    fn refusal(&self, want: &BTreeMap<String, String>) -> Option<String> {
        let (ar, _) = resource("signet.dev/v1alpha1", "IdentityPolicy").ok()?;
        want.keys().find_map(|key| {
            let (ns, name) = key.split_once('/')?;
            let api: Api<DynamicObject> = Api::namespaced_with(self.kube.client.clone(), ns, &ar);
            let o = self.kube.block_on(api.get(name)).ok()?;
            let valid = o.data["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Valid")?
                .clone();
            // A condition about an older version of the same policy says nothing of this one.
            let current = valid["observedGeneration"]
                .as_i64()
                .is_none_or(|g| Some(g) == o.metadata.generation);
            (current && valid["status"] == "False").then(|| {
                format!(
                    "IdentityPolicy {key} refused: {}",
                    valid["message"].as_str().unwrap_or_default()
                )
            })
        })
    }

    fn suite_policies(&self) -> Result<Vec<(String, String)>, String> {
        let (ar, _) = resource("signet.dev/v1alpha1", "IdentityPolicy")?;
        let mut out = vec![];
        for ns in [&self.names.ns, &self.names.peer_ns] {
            let api: Api<DynamicObject> = Api::namespaced_with(self.kube.client.clone(), ns, &ar);
            let list = self
                .kube
                .block_on(api.list(&ListParams::default()))
                .map_err(|e| format!("listing IdentityPolicies in {ns}: {e}"))?;
            out.extend(
                list.items
                    .into_iter()
                    .filter_map(|o| Some((ns.clone(), o.metadata.name?))),
            );
        }
        Ok(out)
    }
}

impl Workloads for Cluster {
    fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        self.pods.get(pod).map_or(Ipv4Addr::UNSPECIFIED, |p| p.ip)
    }

    fn pod_node(&self, pod: &str) -> usize {
        self.pods.get(pod).map_or(0, |p| p.node)
    }

    fn pod_ref(&self, pod: &str) -> String {
        self.pods
            .get(pod)
            .map_or_else(|| pod.to_owned(), |p| format!("{}/{}", p.namespace, p.name))
    }

    fn apply_policies(&self, yaml: &str) -> Result<(), String> {
        let docs = documents(yaml)?;
        let mut want = BTreeMap::new();
        let mut wanted = vec![];
        for doc in &docs {
            let applied = self.kube.block_on(apply(&self.kube.client, doc))?;
            let ns = applied.metadata.namespace.clone().unwrap_or_default();
            let name = applied.metadata.name.clone().unwrap_or_default();
            let typed: signet_policy::IdentityPolicy =
                serde_json::from_value(serde_json::to_value(&applied).map_err(|e| e.to_string())?)
                    .map_err(|e| {
                        format!("IdentityPolicy {ns}/{name} as the API server holds it: {e}")
                    })?;
            want.insert(
                format!("{ns}/{name}"),
                crate::admin::debug::policy_digest(&typed),
            );
            wanted.push((ns, name));
        }
        let (ar, _) = resource("signet.dev/v1alpha1", "IdentityPolicy")?;
        for (ns, name) in self.suite_policies()? {
            if !wanted.contains(&(ns.clone(), name.clone())) {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.kube.client.clone(), &ns, &ar);
                self.kube
                    .block_on(api.delete(&name, &DeleteParams::default()))
                    .map_err(|e| format!("deleting IdentityPolicy {ns}/{name}: {e}"))?;
            }
        }
        self.settle(&want)
    }

    fn flows(&self, node: usize, since_ms: u64) -> Result<Vec<FlowEntry>, String> {
        let text = self.admin(node, &format!("/flows?since_ms={since_ms}"))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<FlowEntry>(l).ok())
            .collect())
    }

    fn debug_state(&self, node: usize) -> Result<Value, String> {
        let body = self.admin(node, "/debug/state")?;
        serde_json::from_str(&body).map_err(|e| format!("/debug/state: {e}"))
    }

    fn client(&self, from: Src<'_>, args: &[&str]) -> Exchange {
        let broken = |error: String| Exchange {
            error: Some(error),
            ..Exchange::default()
        };
        let Some((ns, pod)) = self.place(from) else {
            return match Command::new(&self.exe)
                .args(["echo", "client"])
                .args(args)
                .stdin(Stdio::null())
                .output()
            {
                Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    broken(format!(
                        "the client said nothing readable ({e}): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }),
                Err(e) => broken(format!("{}: {e}", self.exe.display())),
            };
        };
        let command = Self::command(args);
        let api: Api<Pod> = Api::namespaced(self.kube.client.clone(), &ns);
        let ran = self.kube.block_on(async {
            use tokio::io::AsyncReadExt as _;
            let mut process = api
                .exec(
                    &pod,
                    command,
                    &AttachParams::default().stdin(false).stderr(true),
                )
                .await
                .map_err(|e| format!("exec in pod {ns}/{pod}: {e}"))?;
            let (mut out, mut err) = (String::new(), String::new());
            if let Some(mut stdout) = process.stdout() {
                let _ = stdout.read_to_string(&mut out).await;
            }
            if let Some(mut stderr) = process.stderr() {
                let _ = stderr.read_to_string(&mut err).await;
            }
            let _ = process.join().await;
            Ok::<_, String>((out, err))
        });
        match ran {
            Ok((out, err)) => serde_json::from_str(&out).unwrap_or_else(|e| {
                broken(format!(
                    "the client in pod {ns}/{pod} said nothing readable ({e}): {}",
                    err.trim()
                ))
            }),
            Err(e) => broken(e),
        }
    }

    fn spawn_client(&self, from: Src<'_>, args: &[&str]) -> Result<Running, String> {
        let (ns, pod) = self
            .place(from)
            .ok_or("a held client outside the cluster is not part of the suite")?;
        Ok(Running::new(self.spawn_exec(
            &ns,
            &pod,
            Self::command(args),
        )?))
    }

    /// By exec in the node's agent pod (on the host network): `signet echo capture` on the
    /// interface holding the node's address.
    fn capture_underlay(
        &self,
        node: usize,
        marker: &[u8],
        during: &mut dyn FnMut(),
    ) -> Result<Capture, String> {
        let pod = self
            .topology
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .nodes[node]
            .pod
            .clone()
            .ok_or_else(|| format!("no agent pod on {}", self.node_names[node]))?;
        let command = vec![
            "signet".to_owned(),
            "echo".into(),
            "capture".into(),
            "--on".into(),
            self.node_addrs[node].to_string(),
            "--marker".into(),
            String::from_utf8_lossy(marker).into_owned(),
        ];
        let mut exec = self.spawn_exec(&self.signet_namespace, &pod, command)?;
        let ready = exec.next_line()?;
        if ready["ready"] != true {
            return Err(format!("the capture in pod {pod} did not start: {ready}"));
        }
        during();
        // What `during` sent may still be on its way.
        std::thread::sleep(Duration::from_millis(300));
        let last = exec.finish_raw()?;
        serde_json::from_str(&last).map_err(|e| format!("the capture's report `{last}`: {e}"))
    }

    /// Deletes the node's agent pod, as `kubectl delete pod` does; its DaemonSet replaces it.
    fn stop_agent(&self, node: usize) -> Result<(), String> {
        let topology = self.kube.block_on(crate::cli::status::discover(
            &self.kube.client,
            &self.signet_namespace,
        ))?;
        let name = &self.node_names[node];
        let pod = topology
            .nodes
            .iter()
            .find(|n| n.name == *name)
            .and_then(|n| n.pod.clone())
            .ok_or_else(|| format!("no agent pod on {name}"))?;
        let api: Api<Pod> = Api::namespaced(self.kube.client.clone(), &self.signet_namespace);
        self.kube
            .block_on(api.delete(&pod, &DeleteParams::default()))
            .map_err(|e| format!("deleting agent pod {pod}: {e}"))?;
        self.restarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, pod);
        Ok(())
    }

    fn agent_down(&self, node: usize) -> bool {
        self.restarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&node)
    }

    /// Waits for the pod that replaces the deleted one and for every agent to be OK.
    fn start_agent(&self, node: usize) -> Result<(), String> {
        let Some(old) = self
            .restarted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node)
        else {
            return Ok(());
        };
        let name = &self.node_names[node];
        let mut last = String::new();
        let replaced = poll(Duration::from_secs(120), || {
            match self.kube.forwarded_topology(&self.signet_namespace) {
                Ok(t) => {
                    let pod = t.nodes.iter().find(|n| n.name == *name)?.pod.clone()?;
                    if pod == old {
                        last = format!("{old} is still there");
                        return None;
                    }
                    Some(t)
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        })
        .ok_or_else(|| format!("no agent pod replaced {old} on {name} within 120 s ({last})"))?;
        *self.topology.lock().unwrap_or_else(|p| p.into_inner()) = replaced;
        self.wait_ok(Duration::from_secs(90)).map(drop)
    }

    fn keep(&self) {
        if let Some(mut c) = self.world.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn remove(&self) -> Result<(), String> {
        self.keep();
        remove_all(&self.kube, &self.names)
    }
}

/// Deletes the suite's namespaces and GatewayClass, and waits until they are gone.
fn remove_all(kube: &Kube, names: &Names) -> Result<(), String> {
    let mut errors = vec![];
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.client.clone());
    let classes = resource("gateway.networking.k8s.io/v1", "GatewayClass")
        .map(|(ar, _)| Api::<DynamicObject>::all_with(kube.client.clone(), &ar));
    kube.block_on(async {
        for ns in [&names.ns, &names.peer_ns] {
            match namespaces.delete(ns, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => errors.push(format!("deleting namespace {ns}: {e}")),
            }
        }
        if let Ok(classes) = &classes {
            match classes.delete(&names.ns, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => errors.push(format!("deleting GatewayClass {}: {e}", names.ns)),
            }
        }
    });
    let gone = poll(Duration::from_secs(120), || {
        [&names.ns, &names.peer_ns]
            .iter()
            .all(|ns| matches!(kube.block_on(namespaces.get_opt(ns)), Ok(None)))
            .then_some(())
    });
    if gone.is_none() {
        errors.push(format!(
            "namespaces {} and {} were not gone within 120 s",
            names.ns, names.peer_ns
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// `signet connectivity cleanup --kubernetes`: what a killed or `--keep` run left.
pub fn cleanup(options: &KubeOptions, namespace: &str) -> Result<Vec<String>, String> {
    let kube = Kube::connect(options.kubeconfig.as_deref())?;
    let names = Names::new(namespace, "cluster.local");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.client.clone());
    let mut present = vec![];
    for ns in [&names.ns, &names.peer_ns] {
        if kube
            .block_on(namespaces.get_opt(ns))
            .map_err(|e| format!("Namespace {ns}: {e}"))?
            .is_some()
        {
            present.push(format!("namespace {ns}"));
        }
    }
    remove_all(&kube, &names)?;
    Ok(present)
}

/// A client running by exec in a pod.
#[derive(Debug)]
struct ExecClient {
    lines: std::sync::mpsc::Receiver<String>,
    close: Option<tokio::sync::oneshot::Sender<()>>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl ExecClient {
    /// Closes its input and returns the last line it printed.
    fn finish_raw(mut self) -> Result<String, String> {
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
        let mut last = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(30)) {
            last = l;
        }
        Ok(last)
    }
}

impl Session for ExecClient {
    fn next_line(&mut self) -> Result<Value, String> {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => serde_json::from_str(&line).map_err(|e| format!("`{}`: {e}", line.trim())),
            Err(_) => Err("the client exited without a word".into()),
        }
    }

    fn ended_within(&mut self, within: Duration) -> bool {
        poll(within, || {
            self.ended
                .load(std::sync::atomic::Ordering::SeqCst)
                .then_some(())
        })
        .is_some()
    }

    fn finish(self: Box<Self>) -> Result<Exchange, String> {
        let last = (*self).finish_raw()?;
        serde_json::from_str(&last).map_err(|e| format!("the client's last report `{last}`: {e}"))
    }
}

impl Drop for ExecClient {
    fn drop(&mut self) {
        if let Some(c) = self.close.take() {
            let _ = c.send(());
        }
    }
}
