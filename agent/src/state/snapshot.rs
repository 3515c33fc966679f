//! One consistent view of the cluster for this node, rebuilt whenever the state directory
//! changes: workloads and policies (via `signet_policy`), Services, node addresses, numeric
//! identities, this node's endpoints and the compiled policy. A directory that fails to load is
//! refused whole and the snapshot in force stays.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use signet_ca::{SpiffeId, TrustDomain};
use signet_policy::cluster::{State, Workload, load_state};
use signet_policy::compile::{self, Compiled, Input};
use signet_policy::identity::IdentityAllocator;
use signet_policy::model::Policy;

use super::services::ServiceTable;

/// Pod annotations the local topology (and a CRI integration) uses to tell the agent where a
/// pod lives on its node.
pub const CGROUP_ANNOTATION: &str = "signet.dev/cgroup";
pub const HOST_INTERFACE_ANNOTATION: &str = "signet.dev/host-interface";

/// A pod of this node, with its datapath id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub id: u32,
    /// Index into `Snapshot::state.cluster.workloads`.
    pub workload: usize,
    /// The pod's cgroup v2 directory, relative to the node's cgroup root.
    pub cgroup: Option<PathBuf>,
    /// Its veth's host-side interface.
    pub host_interface: Option<String>,
}

#[derive(Debug)]
pub struct Snapshot {
    pub state: State,
    pub services: ServiceTable,
    /// Node name → address of its proxy.
    pub nodes: HashMap<String, IpAddr>,
    pub identities: BTreeMap<SpiffeId, u32>,
    pub pods_by_ip: HashMap<IpAddr, usize>,
    pub local: Vec<LocalEndpoint>,
    pub compiled: Compiled,
    /// Gateway API listeners this node serves (every node serves every Signet Gateway).
    pub gateway: crate::gateway::model::GatewayConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cluster state refused:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("identity allocation: {0}")]
    Identities(#[from] signet_policy::identity::AllocError),
    #[error("policy: {0}")]
    Compile(#[from] signet_policy::compile::CompileError),
}

/// Keeps endpoint ids of pods stable across snapshots, so an update rewrites only what changed.
#[derive(Debug, Default)]
pub struct EndpointIds {
    ids: HashMap<String, u32>,
    next: u32,
}

impl EndpointIds {
    fn id(&mut self, key: &str) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        self.next += 1;
        self.ids.insert(key.to_owned(), self.next);
        self.next
    }
}

/// Everything besides Namespaces, Pods and policies that the agent reads from the directory.
#[derive(Default)]
struct Extra {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    endpoints: Vec<k8s_openapi::api::core::v1::Endpoints>,
    gateway: crate::gateway::model::Resources,
    nodes: HashMap<String, IpAddr>,
    annotations: HashMap<String, BTreeMap<String, String>>,
}

fn read_extra(dir: &Path, errors: &mut Vec<String>) -> Extra {
    let mut extra = Extra::default();
    let mut diags = Vec::new();
    for file in signet_policy::parse::expand(&[dir.to_owned()], &mut diags) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let Ok(value) = serde::Deserialize::deserialize(doc).map(|v: serde_json::Value| v)
            else {
                continue; // syntax errors are reported by `load_state`
            };
            let at = |e: serde_json::Error| format!("{}: document {}: {e}", file.display(), i + 1);
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => match serde_json::from_value(value) {
                    Ok(s) => extra.services.push(s),
                    Err(e) => errors.push(at(e)),
                },
                Some("EndpointSlice") => match serde_json::from_value(value) {
                    Ok(s) => extra.slices.push(s),
                    Err(e) => errors.push(at(e)),
                },
                Some("Endpoints") => match serde_json::from_value(value) {
                    Ok(e) => extra.endpoints.push(e),
                    Err(e) => errors.push(at(e)),
                },
                Some("GatewayClass") => match serde_json::from_value(value) {
                    Ok(v) => extra.gateway.classes.push(v),
                    Err(e) => errors.push(at(e)),
                },
                Some("Gateway") => match serde_json::from_value(value) {
                    Ok(v) => extra.gateway.gateways.push(v),
                    Err(e) => errors.push(at(e)),
                },
                Some("HTTPRoute") => match serde_json::from_value(value) {
                    Ok(v) => extra.gateway.routes.push(v),
                    Err(e) => errors.push(at(e)),
                },
                Some("ReferenceGrant") => match serde_json::from_value(value) {
                    Ok(v) => extra.gateway.grants.push(v),
                    Err(e) => errors.push(at(e)),
                },
                Some("Secret") => {
                    match serde_json::from_value::<k8s_openapi::api::core::v1::Secret>(value) {
                        // Only TLS Secrets concern the gateway; others are not kept in memory.
                        Ok(v) if v.type_.as_deref() == Some("kubernetes.io/tls") => {
                            extra.gateway.secrets.push(v)
                        }
                        Ok(_) => {}
                        Err(e) => errors.push(at(e)),
                    }
                }
                Some("Node") => match serde_json::from_value::<Node>(value) {
                    Ok(n) => {
                        let ip = n
                            .status
                            .and_then(|s| s.addresses)
                            .into_iter()
                            .flatten()
                            .find(|a| a.type_ == "InternalIP")
                            .and_then(|a| a.address.parse().ok());
                        match (n.metadata.name, ip) {
                            (Some(name), Some(ip)) => {
                                extra.nodes.insert(name, ip);
                            }
                            (name, _) => errors.push(format!(
                                "{}: Node {}: needs status.addresses with an InternalIP",
                                file.display(),
                                name.unwrap_or_default()
                            )),
                        }
                    }
                    Err(e) => errors.push(at(e)),
                },
                Some("Pod") => {
                    if let Ok(p) = serde_json::from_value::<Pod>(value) {
                        let key = format!(
                            "{}/{}",
                            p.metadata.namespace.unwrap_or_else(|| "default".into()),
                            p.metadata.name.unwrap_or_default()
                        );
                        extra
                            .annotations
                            .insert(key, p.metadata.annotations.unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
    }
    extra
}

/// The Gateway API status the state directory's resources get (what `signet gateway status`
/// prints).
pub fn gateway_status(
    dir: &Path,
    td: &TrustDomain,
) -> Result<crate::gateway::model::Status, SnapshotError> {
    let mut errors = Vec::new();
    let mut extra = read_extra(dir, &mut errors);
    if !errors.is_empty() {
        return Err(SnapshotError::Invalid(errors));
    }
    Ok(services_and_gateway(&mut extra, td).1.status)
}

/// The Service table and the Gateway configuration (which validates backendRefs against the
/// Services), taken out of `extra`.
fn services_and_gateway(
    extra: &mut Extra,
    td: &TrustDomain,
) -> (ServiceTable, crate::gateway::model::GatewayConfig) {
    let mut slices = std::mem::take(&mut extra.slices);
    slices.extend(super::services::mirror_endpoints(&extra.endpoints, &slices));
    let services = ServiceTable::build(&extra.services, &slices);
    let mut resources = std::mem::take(&mut extra.gateway);
    resources.services = services.ports_by_service();
    let gateway = crate::gateway::model::build(&resources, td);
    (services, gateway)
}

/// Builds the snapshot for `node` from the state directory.
pub fn build(
    dir: &Path,
    td: &TrustDomain,
    node: &str,
    allocator: &dyn IdentityAllocator,
    endpoint_ids: &mut EndpointIds,
    previous: Option<&Compiled>,
    capacity: usize,
) -> Result<Snapshot, SnapshotError> {
    let state = load_state(dir, td)
        .map_err(|d| SnapshotError::Invalid(d.iter().map(ToString::to_string).collect()))?;
    let mut errors = Vec::new();
    let mut extra = read_extra(dir, &mut errors);
    if !errors.is_empty() {
        return Err(SnapshotError::Invalid(errors));
    }
    let (services, gateway) = services_and_gateway(&mut extra, td);
    for w in &state.cluster.workloads {
        allocator.allocate(&w.identity)?;
    }
    // Gateways are peers too: policy can name them (`entity: gateway` or their SPIFFE ID).
    for id in gateway.identities() {
        allocator.allocate(&id)?;
    }
    let identities = allocator.snapshot()?;
    let mut pods_by_ip = HashMap::new();
    let mut local = Vec::new();
    for (i, w) in state.cluster.workloads.iter().enumerate() {
        for ip in &w.ips {
            pods_by_ip.insert(*ip, i);
        }
        if w.node.as_deref() == Some(node) {
            let ann = extra.annotations.get(&w.key());
            local.push(LocalEndpoint {
                id: endpoint_ids.id(&w.key()),
                workload: i,
                cgroup: ann
                    .and_then(|a| a.get(CGROUP_ANNOTATION))
                    .map(PathBuf::from),
                host_interface: ann.and_then(|a| a.get(HOST_INTERFACE_ANNOTATION)).cloned(),
            });
        }
    }
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let endpoints: Vec<(u32, &Workload)> = local
        .iter()
        .map(|e| (e.id, &state.cluster.workloads[e.workload]))
        .collect();
    let compiled = compile::compile(&Input {
        cluster: &state.cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity,
        previous,
    })?;
    Ok(Snapshot {
        services,
        gateway,
        nodes: extra.nodes,
        identities,
        pods_by_ip,
        local,
        compiled,
        state,
    })
}

impl Snapshot {
    pub fn workload(&self, i: usize) -> &Workload {
        &self.state.cluster.workloads[i]
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.pods_by_ip.get(&ip).map(|i| self.workload(*i))
    }

    pub fn local_by_ip(&self, ip: IpAddr) -> Option<&LocalEndpoint> {
        let i = *self.pods_by_ip.get(&ip)?;
        self.local.iter().find(|e| e.workload == i)
    }

    /// Identities with a workload on this node, and the Gateways it serves: the certificates
    /// to keep.
    pub fn local_identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .local
            .iter()
            .map(|e| self.workload(e.workload).identity.clone())
            .chain(self.gateway.identities())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}
