//! One consistent view of the cluster for this node, rebuilt whenever the state directory
//! changes: workloads and policies (via `signet_policy`), Services, node addresses, numeric
//! identities, this node's endpoints and the compiled policy. A directory that fails to load is
//! refused whole and the snapshot in force stays.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use signet_ca::{SpiffeId, TrustDomain};
use signet_policy::cidr::Cidr;
use signet_policy::cluster::{Cluster, State, Workload, load_state, state_from_objects};
use signet_policy::compile::{self, Compiled, Input};
use signet_policy::identity::IdentityAllocator;
use signet_policy::model::Policy;

use super::services::ServiceTable;

/// Pod annotations the local topology (and a CRI integration) uses to tell the agent where a
/// pod lives on its node.
pub const CGROUP_ANNOTATION: &str = "signet.dev/cgroup";
pub const HOST_INTERFACE_ANNOTATION: &str = "signet.dev/host-interface";
/// The pod's network namespace: a name under `/run/netns` or a path.
pub const NETNS_ANNOTATION: &str = "signet.dev/netns";

use crate::config::PodAnnotations;

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
    /// Its network namespace (a name under `/run/netns` or a path), when an annotation says;
    /// otherwise it is found from a process in the pod's cgroup.
    pub netns: Option<String>,
    /// The pod's UID, to find its cgroup when no annotation names it (`discover`).
    pub uid: Option<String>,
}

#[derive(Debug)]
pub struct Snapshot {
    /// How many snapshots were applied before this one (the first is 0).
    pub generation: u64,
    pub state: State,
    pub services: ServiceTable,
    /// Node name → address of its proxy.
    pub nodes: HashMap<String, IpAddr>,
    pub identities: BTreeMap<SpiffeId, u32>,
    pub pods_by_ip: HashMap<IpAddr, usize>,
    /// `namespace/name` of each workload (by its index), made once for the records that name
    /// pods (one per connection and per routed request).
    pod_names: Vec<std::sync::Arc<str>>,
    /// Addresses no pod owns until their claims are resolved (`resolve_claims`), and why. The
    /// proxy refuses them; the kernel captures them and the proxy refuses them there too.
    pub refused_ips: BTreeMap<IpAddr, String>,
    /// This node's pods whose placement annotations were ignored (`PodAnnotations::Ignored`).
    pub ignored_annotations: Vec<String>,
    pub local: Vec<LocalEndpoint>,
    /// Workload index → index into `local`: finding the local endpoint of an address is two
    /// lookups per connection, not a scan of the node's pods.
    local_by_workload: HashMap<usize, usize>,
    pub compiled: Compiled,
    /// The compiled rules as connections use them.
    pub rules: RuleIndex,
    /// Gateway API listeners this node serves: those of the Signet Gateways placed on it
    /// (`signet.dev/nodes`; all of them without).
    pub gateway: crate::routing::model::GatewayConfig,
    /// Own addresses this node routes to itself and may announce.
    pub vips: crate::routing::addresses::Plan,
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

/// Every resource the agent reads, as typed Kubernetes objects: what the standalone source parses
/// from the state directory and what the Kubernetes source's reflectors hold. One model, two
/// sources (DESIGN.md, "Cluster state").
#[derive(Debug, Clone, Default)]
pub struct ClusterObjects {
    /// Namespaces, Pods and IdentityPolicies.
    pub policy: signet_policy::cluster::Objects,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub endpoints: Vec<k8s_openapi::api::core::v1::Endpoints>,
    pub nodes: Vec<Node>,
    /// Where Gateways and LoadBalancer Services get their addresses (with, in Kubernetes
    /// mode, the record of what each pool gave in its status).
    pub pools: Vec<signet_policy::LoadBalancerIPPool>,
    /// Gateway API resources and TLS Secrets (`services` is filled when the snapshot is built).
    pub gateway: crate::routing::model::Resources,
}

/// Where a snapshot's resources come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A directory of manifests; policy errors are reported as `file:line:col`.
    Dir(&'a Path),
    /// The same, with the record of the addresses given out so far (standalone mode's table;
    /// `Dir` alone allocates as if nothing had been given out).
    DirWith(&'a Path, &'a super::lbipam::Record),
    /// Objects from the API server; errors are reported as `Kind namespace/name: field.path`.
    /// The address record is the pools' status.
    Objects(&'a ClusterObjects),
}

/// What the agent reads besides what policy reads.
#[derive(Default)]
struct Extra {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    endpoints: Vec<k8s_openapi::api::core::v1::Endpoints>,
    gateway: crate::routing::model::Resources,
    nodes: HashMap<String, IpAddr>,
    /// Node name → its labels (they place Gateways: `signet.dev/nodes`).
    node_labels: HashMap<String, BTreeMap<String, String>>,
    /// Node name → the prefixes its pods' addresses come from (`spec.podCIDRs`), when set.
    pod_cidrs: HashMap<String, Vec<Cidr>>,
    annotations: HashMap<String, BTreeMap<String, String>>,
    uids: HashMap<String, String>,
}

/// Every manifest under `dir` as a typed object. A document that does not deserialise as its
/// kind is an error naming file and document; syntax errors are `load_state`'s to report.
pub fn read_objects(dir: &Path, errors: &mut Vec<String>) -> ClusterObjects {
    let mut objects = ClusterObjects::default();
    let mut diags = Vec::new();
    for file in signet_policy::parse::expand(&[dir.to_owned()], &mut diags) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let Ok(value) = serde::Deserialize::deserialize(doc).map(|v: serde_json::Value| v)
            else {
                continue;
            };
            let at = |e: serde_json::Error| format!("{}: document {}: {e}", file.display(), i + 1);
            fn push<T: serde::de::DeserializeOwned>(
                value: serde_json::Value,
                to: &mut Vec<T>,
                errors: &mut Vec<String>,
                at: impl Fn(serde_json::Error) -> String,
            ) {
                match serde_json::from_value(value) {
                    Ok(v) => to.push(v),
                    Err(e) => errors.push(at(e)),
                }
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .map(str::to_owned);
            let o = &mut objects;
            match kind.as_deref() {
                Some("Namespace") => push(value, &mut o.policy.namespaces, errors, at),
                Some("Pod") => push(value, &mut o.policy.pods, errors, at),
                // Read with positions by `load_state`; kept here for the objects view.
                Some("IdentityPolicy") => {
                    if let Ok(p) = serde_json::from_value(value) {
                        o.policy.policies.push(p);
                    }
                }
                Some("Service") => push(value, &mut o.services, errors, at),
                Some("EndpointSlice") => push(value, &mut o.slices, errors, at),
                Some("Endpoints") => push(value, &mut o.endpoints, errors, at),
                Some("Node") => push(value, &mut o.nodes, errors, at),
                Some("LoadBalancerIPPool") => push(value, &mut o.pools, errors, at),
                Some("L2AnnouncementPolicy") => push(value, &mut o.gateway.l2, errors, at),
                Some("GatewayClass") => push(value, &mut o.gateway.classes, errors, at),
                Some("Gateway") => push(value, &mut o.gateway.gateways, errors, at),
                Some("HTTPRoute") => push(value, &mut o.gateway.routes, errors, at),
                Some("GRPCRoute") => push(value, &mut o.gateway.grpc_routes, errors, at),
                Some("TCPRoute") => push(value, &mut o.gateway.tcp_routes, errors, at),
                Some("TLSRoute") => push(value, &mut o.gateway.tls_routes, errors, at),
                Some("TrafficPolicy") => push(value, &mut o.gateway.traffic_policies, errors, at),
                Some("ReferenceGrant") => push(value, &mut o.gateway.grants, errors, at),
                Some("Secret") => {
                    match serde_json::from_value::<k8s_openapi::api::core::v1::Secret>(value) {
                        // Only TLS Secrets concern the gateway; others are not kept in memory.
                        Ok(v) if v.type_.as_deref() == Some("kubernetes.io/tls") => {
                            o.gateway.secrets.push(v)
                        }
                        Ok(_) => {}
                        Err(e) => errors.push(at(e)),
                    }
                }
                _ => {}
            }
        }
    }
    objects
}

/// A Node's `InternalIP`, as written.
pub(super) fn internal_ip(n: &Node) -> Option<&str> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

/// A Node's `spec.podCIDRs` (and the older `spec.podCIDR`), as written.
pub(super) fn pod_cidrs_of(n: &Node) -> impl Iterator<Item = String> + '_ {
    let spec = n.spec.as_ref();
    spec.and_then(|s| s.pod_cidrs.clone())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.clone()))
}

/// Node addresses and pod annotations, and the rest as it is.
fn extra_from(
    objects: &ClusterObjects,
    record: &super::lbipam::Record,
    errors: &mut Vec<String>,
) -> Extra {
    let mut nodes = HashMap::new();
    let mut pod_cidrs = HashMap::new();
    let mut node_labels = HashMap::new();
    for n in &objects.nodes {
        if let Some(name) = &n.metadata.name {
            node_labels.insert(name.clone(), n.metadata.labels.clone().unwrap_or_default());
        }
        let cidrs: Vec<Cidr> = pod_cidrs_of(n)
            .filter_map(|c| match Cidr::parse(&c) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(format!(
                        "Node {}: spec.podCIDRs `{c}`: {e}",
                        n.metadata.name.as_deref().unwrap_or_default()
                    ));
                    None
                }
            })
            .collect();
        if let (Some(name), false) = (&n.metadata.name, cidrs.is_empty()) {
            pod_cidrs.insert(name.clone(), cidrs);
        }
        let ip = internal_ip(n).and_then(|a| a.parse().ok());
        match (&n.metadata.name, ip) {
            (Some(name), Some(ip)) => {
                nodes.insert(name.clone(), ip);
            }
            (name, _) => errors.push(format!(
                "Node {}: needs status.addresses with an InternalIP",
                name.clone().unwrap_or_default()
            )),
        }
    }
    let annotations = objects
        .policy
        .pods
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or_default()
                ),
                p.metadata.annotations.clone().unwrap_or_default(),
            )
        })
        .collect();
    let uids = objects
        .policy
        .pods
        .iter()
        .filter_map(|p| {
            Some((
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref()?
                ),
                p.metadata.uid.clone()?,
            ))
        })
        .collect();
    Extra {
        uids,
        services: objects.services.clone(),
        slices: objects.slices.clone(),
        endpoints: objects.endpoints.clone(),
        gateway: crate::routing::model::Resources {
            namespace_labels: objects
                .policy
                .namespaces
                .iter()
                .filter_map(|n| {
                    let labels = n.metadata.labels.clone().unwrap_or_default();
                    Some((n.metadata.name.clone()?, labels))
                })
                .collect(),
            node_addresses: nodes
                .iter()
                .map(|(name, ip)| (node_labels.get(name).cloned().unwrap_or_default(), *ip))
                .collect(),
            addresses: super::lbipam::Addresses::compute(
                &objects.gateway,
                &objects.services,
                &objects.pools,
                record,
            ),
            ..objects.gateway.clone()
        },
        nodes,
        node_labels,
        pod_cidrs,
        annotations,
    }
}

/// One owner per address. An address is refused (taken from every pod claiming it, so neither
/// the proxy nor the kernel takes it for anyone) while two live pods claim it, while it is a
/// node's own, or when it lies outside its node's `podCIDRs`: a kubelet writes only its own
/// pods' status, so this is how a node would claim another node's pod. Returns address → why.
fn resolve_claims(cluster: &mut Cluster, extra: &Extra) -> BTreeMap<IpAddr, String> {
    let mut claims: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    let mut refused = BTreeMap::new();
    for w in &cluster.workloads {
        for ip in &w.ips {
            claims.entry(*ip).or_default().push(w.key());
            let node = w.node.as_deref().unwrap_or_default();
            if let Some(cidrs) = extra.pod_cidrs.get(node)
                && !cidrs.iter().any(|c| c.contains(*ip))
            {
                refused.insert(
                    *ip,
                    format!(
                        "pod {} on {node} claims {ip}, outside {node}'s podCIDRs",
                        w.key()
                    ),
                );
            }
        }
    }
    for (ip, pods) in &claims {
        if pods.len() > 1 {
            refused.insert(
                *ip,
                format!("{} pods claim {ip}: {}", pods.len(), pods.join(", ")),
            );
        }
        if let Some((node, _)) = extra.nodes.iter().find(|(_, n)| *n == ip) {
            refused.insert(
                *ip,
                format!(
                    "pod {} claims {ip}, node {node}'s own address",
                    pods.join(", ")
                ),
            );
        }
    }
    for w in &mut cluster.workloads {
        w.ips.retain(|ip| !refused.contains_key(ip));
    }
    refused
}

/// The state policy sees, and the rest, from either source.
fn load(source: Source<'_>, td: &TrustDomain) -> Result<(State, Extra), SnapshotError> {
    let mut errors = Vec::new();
    let (state, extra) = match source {
        Source::Dir(dir) | Source::DirWith(dir, _) => {
            let state = load_state(dir, td)
                .map_err(|d| SnapshotError::Invalid(d.iter().map(ToString::to_string).collect()))?;
            let objects = read_objects(dir, &mut errors);
            let empty = super::lbipam::Record::new();
            let record = match source {
                Source::DirWith(_, r) => r,
                _ => &empty,
            };
            (Some(state), extra_from(&objects, record, &mut errors))
        }
        Source::Objects(objects) => {
            let state = match state_from_objects(&objects.policy, td) {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.extend(e);
                    None
                }
            };
            let record = signet_policy::lbipam::record_of(&objects.pools);
            (state, extra_from(objects, &record, &mut errors))
        }
    };
    match state {
        Some(state) if errors.is_empty() => Ok((state, extra)),
        _ => Err(SnapshotError::Invalid(errors)),
    }
}

/// The Gateway API status the state directory's resources get (what `signet gateway status`
/// prints).
/// `record` is the standalone address table's.
pub fn gateway_status(
    dir: &Path,
    record: &super::lbipam::Record,
    td: &TrustDomain,
) -> Result<crate::routing::model::Status, SnapshotError> {
    let mut errors = Vec::new();
    let objects = read_objects(dir, &mut errors);
    if !errors.is_empty() {
        return Err(SnapshotError::Invalid(errors));
    }
    gateway_status_of(&objects, record, td)
}

/// The Gateway API status of `objects` (what the Kubernetes mode writes to the resources),
/// with the addresses `record` holds.
pub fn gateway_status_of(
    objects: &ClusterObjects,
    record: &super::lbipam::Record,
    td: &TrustDomain,
) -> Result<crate::routing::model::Status, SnapshotError> {
    let mut errors = Vec::new();
    let mut extra = extra_from(objects, record, &mut errors);
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
) -> (ServiceTable, crate::routing::model::GatewayConfig) {
    let mut slices = std::mem::take(&mut extra.slices);
    slices.extend(super::services::mirror_endpoints(&extra.endpoints, &slices));
    let services = ServiceTable::build(&extra.services, &slices);
    let mut resources = std::mem::take(&mut extra.gateway);
    resources.services = services.ports_by_service();
    let mut gateway = crate::routing::model::build(&resources, td);
    gateway.status.addresses = super::lbipam::AddressStatus::of(&resources.addresses);
    gateway.addresses = std::mem::take(&mut resources.addresses);
    gateway.l2 = std::mem::take(&mut resources.l2);
    (services, gateway)
}

/// A source read and checked, before numbers are given out: what `build_loaded` turns into a
/// snapshot. The Kubernetes mode reads it once, allocates what `identities_needed` lists through
/// the API, then builds.
pub struct Loaded {
    state: State,
    extra: Extra,
    refused: BTreeMap<IpAddr, String>,
    services: ServiceTable,
    gateway: crate::routing::model::GatewayConfig,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

impl Loaded {
    /// The identities the snapshot numbers: every workload's and every served Gateway's.
    pub fn identities_needed(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .state
            .cluster
            .workloads
            .iter()
            .map(|w| w.identity.clone())
            .chain(self.gateway.identities())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Reads and checks `source`.
pub fn load_source(source: Source<'_>, td: &TrustDomain) -> Result<Loaded, SnapshotError> {
    let (mut state, mut extra) = load(source, td)?;
    let refused = resolve_claims(&mut state.cluster, &extra);
    let (services, gateway) = services_and_gateway(&mut extra, td);
    Ok(Loaded {
        state,
        extra,
        refused,
        services,
        gateway,
    })
}

/// The identities a snapshot of `source` numbers (see `Loaded::identities_needed`).
pub fn identities_needed(
    source: Source<'_>,
    td: &TrustDomain,
) -> Result<Vec<SpiffeId>, SnapshotError> {
    Ok(load_source(source, td)?.identities_needed())
}

/// Builds the snapshot for `node` from a loaded source.
pub fn build_loaded(
    loaded: Loaded,
    annotations: PodAnnotations,
    node: &str,
    allocator: &dyn IdentityAllocator,
    endpoint_ids: &mut EndpointIds,
    previous: Option<&Snapshot>,
    capacity: usize,
) -> Result<Snapshot, SnapshotError> {
    // Gateways are peers too: policy can name them (`entity: gateway` or their SPIFFE ID).
    for id in loaded.identities_needed() {
        allocator.allocate(&id)?;
    }
    let Loaded {
        state,
        extra,
        refused,
        services,
        mut gateway,
    } = loaded;
    // Numbers go to every Gateway (policy names them); this node serves those placed on it.
    let labels = extra.node_labels.get(node).cloned().unwrap_or_default();
    gateway.place_on(&labels);
    let vips = crate::routing::addresses::plan(
        gateway.own_addresses(),
        &gateway.addresses,
        &gateway.l2,
        &labels,
    );
    let identities = allocator.snapshot()?;
    let mut pods_by_ip = HashMap::new();
    let mut local = Vec::new();
    let mut ignored_annotations = Vec::new();
    for (i, w) in state.cluster.workloads.iter().enumerate() {
        for ip in &w.ips {
            pods_by_ip.insert(*ip, i);
        }
        if w.node.as_deref() == Some(node) {
            let placed = extra.annotations.get(&w.key()).filter(|a| {
                [
                    CGROUP_ANNOTATION,
                    HOST_INTERFACE_ANNOTATION,
                    NETNS_ANNOTATION,
                ]
                .iter()
                .any(|k| a.contains_key(*k))
            });
            let ann = match annotations {
                PodAnnotations::Trusted => placed,
                PodAnnotations::Ignored => {
                    if placed.is_some() {
                        ignored_annotations.push(w.key());
                    }
                    None
                }
            };
            local.push(LocalEndpoint {
                id: endpoint_ids.id(&w.key()),
                workload: i,
                cgroup: ann
                    .and_then(|a| a.get(CGROUP_ANNOTATION))
                    .map(PathBuf::from),
                host_interface: ann.and_then(|a| a.get(HOST_INTERFACE_ANNOTATION)).cloned(),
                netns: ann.and_then(|a| a.get(NETNS_ANNOTATION)).cloned(),
                uid: extra.uids.get(&w.key()).cloned(),
            });
        }
    }
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let endpoints: Vec<(u32, &Workload)> = local
        .iter()
        .map(|e| (e.id, &state.cluster.workloads[e.workload]))
        .collect();
    let input = Input {
        cluster: &state.cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity,
        previous: None,
    };
    // What the snapshot in force was compiled from: when only policies changed, only the
    // endpoints they select are compiled again.
    let previous_models: Vec<Policy> = previous
        .map(|p| p.state.policies.iter().map(|l| l.policy.clone()).collect())
        .unwrap_or_default();
    let previous_sorted = compile::sorted_policies(&previous_models);
    let previous_endpoints: Vec<(u32, &Workload)> = previous
        .map(|p| {
            p.local
                .iter()
                .map(|e| (e.id, &p.state.cluster.workloads[e.workload]))
                .collect()
        })
        .unwrap_or_default();
    let made = previous.map(|p| compile::Made {
        compiled: &p.compiled,
        input: Input {
            cluster: &p.state.cluster,
            policies: &previous_sorted,
            identities: &p.identities,
            endpoints: &previous_endpoints,
            capacity,
            previous: None,
        },
    });
    let compiled = compile::next(made, &input)?;
    let rules = RuleIndex::new(&compiled, &models);
    let local_by_workload = local
        .iter()
        .enumerate()
        .map(|(i, ep)| (ep.workload, i))
        .collect();
    let pod_names = state
        .cluster
        .workloads
        .iter()
        .map(|w| w.key().into())
        .collect();
    Ok(Snapshot {
        generation: 0,
        local_by_workload,
        rules,
        services,
        gateway,
        vips,
        nodes: extra.nodes,
        identities,
        pods_by_ip,
        pod_names,
        refused_ips: refused,
        ignored_annotations,
        local,
        compiled,
        state,
    })
}

/// The `http` rules a connection's requests are checked against: (rule name, matchers).
pub type L7Rules = Vec<(String, Vec<signet_policy::model::HttpMatch>)>;

/// Compiled rules in the form connections use them, made once per snapshot rather than per
/// connection: each rule's name (for flow lines, shared, never formatted per connection), and
/// the `http` rules of each L7 key, shared by every connection that key admits.
#[derive(Debug, Default)]
pub struct RuleIndex {
    pub names: HashMap<u32, std::sync::Arc<str>>,
    pub l7: HashMap<compile::Key, std::sync::Arc<L7Rules>>,
}

impl RuleIndex {
    fn new(compiled: &Compiled, policies: &[Policy]) -> Self {
        let names = compiled
            .rules
            .iter()
            .map(|(id, r)| (*id, std::sync::Arc::from(r.to_string())))
            .collect();
        let refs: Vec<&Policy> = policies.iter().collect();
        let l7 = compiled
            .l7
            .iter()
            .map(|(key, ids)| {
                let rules: L7Rules = ids
                    .iter()
                    .filter_map(|id| compiled.rule(*id))
                    .filter_map(|r| {
                        Some((
                            r.to_string(),
                            signet_policy::eval::http_rules(&refs, r)?.to_vec(),
                        ))
                    })
                    .collect();
                (*key, std::sync::Arc::new(rules))
            })
            .collect();
        Self { names, l7 }
    }
}

impl Snapshot {
    pub fn workload(&self, i: usize) -> &Workload {
        &self.state.cluster.workloads[i]
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.pods_by_ip.get(&ip).map(|i| self.workload(*i))
    }

    /// `namespace/name` of the pod at `ip`, shared.
    pub fn pod_name_by_ip(&self, ip: IpAddr) -> Option<std::sync::Arc<str>> {
        self.pods_by_ip.get(&ip).map(|i| self.pod_names[*i].clone())
    }

    pub fn local_by_ip(&self, ip: IpAddr) -> Option<&LocalEndpoint> {
        let w = self.pods_by_ip.get(&ip)?;
        self.local_by_workload.get(w).map(|i| &self.local[*i])
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
