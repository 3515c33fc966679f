//! From Gateway API resources (gateway-api crate types) to what the node serves: listeners
//! grouped by port, each with its certificates and its router, and the status conditions the
//! spec defines for GatewayClasses, Gateways, listeners and HTTPRoutes.
//!
//! Only Gateways of a GatewayClass whose `controllerName` is [`CONTROLLER`] are served. A
//! missing Secret, an invalid route or a conflicting listener degrades only what it touches and
//! says so in status; the rest is served.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::{Gateway, GatewayListeners, GatewayListenersTlsMode};
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use signet_ca::placement::Placement;
use signet_ca::{SpiffeId, TrustDomain};

use super::routes::{Route, Router, intersect};

/// The `controllerName` of Signet's GatewayClass.
pub use signet_ca::spiffe::GATEWAY_CONTROLLER as CONTROLLER;

/// The resources the gateway reads, as the state directory (or the API server) has them.
#[derive(Debug, Default, Clone)]
pub struct Resources {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
    pub tcp_routes: Vec<gateway_api::experimental::tcproutes::TcpRoute>,
    pub tls_routes: Vec<gateway_api::tlsroutes::TlsRoute>,
    pub traffic_policies: Vec<signet_policy::TrafficPolicy>,
    pub grants: Vec<ReferenceGrant>,
    pub secrets: Vec<Secret>,
    /// `namespace/name` → ports of each Service, to validate backendRefs.
    pub services: HashMap<(String, String), Vec<u16>>,
    /// Namespace → its labels, for listeners whose `allowedRoutes.namespaces.from` is `Selector`.
    pub namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// What the address allocator gave each Gateway (and LoadBalancer Service), computed from
    /// the pools and the record when the snapshot is built.
    pub addresses: super::addresses::Addresses,
    /// Which nodes announce those addresses, where.
    pub l2: Vec<signet_policy::L2AnnouncementPolicy>,
    /// Each node's labels and InternalIP: the addresses a Gateway without one of its own is
    /// reached at (`status.addresses`), on the nodes its placement admits.
    pub node_addresses: Vec<(BTreeMap<String, String>, std::net::IpAddr)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Https,
    /// TCPRoutes: the connection to a backend, as it is.
    Tcp,
    /// TLSRoutes: the connection to the backend the ClientHello's server name picks, not
    /// terminated.
    TlsPassthrough,
}

/// A TLS certificate from a Secret, with the names it is valid for.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub secret: String,
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

/// One listener of one Gateway.
#[derive(Debug)]
pub struct Listener {
    pub gateway_namespace: String,
    pub gateway_name: String,
    /// `spiffe://<td>/ns/<ns>/gateway/<name>`: what backends see.
    pub identity: SpiffeId,
    pub name: String,
    pub hostname: Option<String>,
    pub certificates: Vec<Certificate>,
    pub router: Router,
    /// TCP and TLS listeners: their TCPRoutes or TLSRoutes, oldest first.
    pub l4: Vec<super::l4::L4Route>,
    /// The nodes that serve its Gateway (`signet.dev/nodes`).
    pub placement: Placement,
}

/// The listeners that share one port (distinct hostnames; SNI and Host pick among them).
#[derive(Debug)]
pub struct Port {
    /// The Gateway's own addresses (from a LoadBalancerIPPool) this port is bound on; empty:
    /// the node's Gateway address (`listen.gateway`), shared by every Gateway without one.
    pub addresses: Vec<std::net::IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub listeners: Vec<Listener>,
    /// For HTTPS: certificates of every listener, chosen by SNI.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A condition as Gateway API defines them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

pub(crate) fn cond(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    pub name: String,
    /// The route kinds it takes (`supportedKinds`): none for a protocol Signet does not serve.
    pub supported_kinds: Vec<String>,
    pub attached_routes: i32,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub namespace: String,
    pub name: String,
    /// The addresses it is served on (`status.addresses`), each `IPAddress`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<ListenerStatus>,
}

/// A route's `parentRef` with the defaults applied (the status's `parentRef`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

impl ParentRef {
    /// A Service (GAMMA: the route governs requests from mesh workloads to it).
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }

    pub fn is_gateway(&self) -> bool {
        self.group == GATEWAY_GROUP && self.kind == "Gateway"
    }
}

impl std::fmt::Display for ParentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.is_gateway() {
            write!(f, "{} ", self.kind)?;
        }
        write!(f, "{}/{}", self.namespace, self.name)?;
        if let Some(s) = &self.section_name {
            write!(f, "/{s}")?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent: ParentRef,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassStatus {
    pub name: String,
    pub conditions: Vec<Condition>,
}

/// Status of everything, as `signet gateway status` prints it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub gateway_classes: Vec<ClassStatus>,
    pub gateways: Vec<GatewayStatus>,
    pub http_routes: Vec<RouteStatus>,
    pub grpc_routes: Vec<RouteStatus>,
    pub tcp_routes: Vec<RouteStatus>,
    pub tls_routes: Vec<RouteStatus>,
    pub traffic_policies: Vec<super::traffic::PolicyStatus>,
    /// LoadBalancerIPPools and Services of type LoadBalancer: what the address allocator
    /// decided (`signet gateway status` prints it as `addresses`).
    #[serde(rename = "addresses")]
    pub addresses: super::addresses::AddressStatus,
}

/// What a node serves, and the status that goes with it.
#[derive(Debug, Default)]
pub struct GatewayConfig {
    pub ports: Vec<Port>,
    /// Routes whose parent is a Service: what the outbound proxy applies (every node serves
    /// them, for its own workloads).
    pub mesh: super::mesh::MeshRoutes,
    /// How each Service's endpoints are used (its TrafficPolicy).
    pub traffic: super::traffic::ServicePolicies,
    pub status: Status,
    /// What the address allocator decided (from `Resources::addresses`).
    pub addresses: super::addresses::Addresses,
    /// The L2 announcement policies (from `Resources::l2`).
    pub l2: Vec<signet_policy::L2AnnouncementPolicy>,
}

impl GatewayConfig {
    /// The port a connection accepted on `port` of `bound` (one of a Gateway's own addresses,
    /// or `None` for the node's Gateway address) belongs to.
    pub fn port(&self, bound: Option<std::net::IpAddr>, port: u16) -> Option<&Port> {
        self.ports.iter().find(|p| {
            p.port == port
                && match bound {
                    None => p.addresses.is_empty(),
                    Some(ip) => p.addresses.contains(&ip),
                }
        })
    }

    /// Every (address, port) to listen on: `None` is the node's Gateway address.
    pub fn bindings(&self) -> Vec<(Option<std::net::IpAddr>, u16)> {
        let mut out: Vec<_> = self
            .ports
            .iter()
            .flat_map(|p| {
                let addrs: Vec<Option<std::net::IpAddr>> = if p.addresses.is_empty() {
                    vec![None]
                } else {
                    p.addresses.iter().copied().map(Some).collect()
                };
                addrs.into_iter().map(move |a| (a, p.port))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The Gateways' own addresses this node serves.
    pub fn own_addresses(&self) -> Vec<std::net::IpAddr> {
        let mut out: Vec<_> = self
            .ports
            .iter()
            .flat_map(|p| p.addresses.iter().copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Keeps what a node with `labels` serves: the listeners of Gateways placed on it (status
    /// stays the cluster's). HTTPS ports whose listeners changed get their TLS configuration
    /// again.
    pub fn place_on(&mut self, labels: &BTreeMap<String, String>) {
        for p in &mut self.ports {
            let before = p.listeners.len();
            p.listeners.retain(|l| l.placement.admits(labels));
            if p.listeners.len() != before
                && p.protocol == Protocol::Https
                && !p.listeners.is_empty()
            {
                p.tls = super::tls::config(p)
                    .inspect_err(|e| {
                        tracing::error!(port = p.port, error = %e, "gateway TLS configuration");
                    })
                    .ok();
            }
        }
        self.ports.retain(|p| !p.listeners.is_empty());
    }

    /// Identities of every Gateway served (the certificates the node needs).
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .ports
            .iter()
            .flat_map(|p| p.listeners.iter().map(|l| l.identity.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// The identity of Gateway `ns/name`.
pub fn gateway_identity(td: &TrustDomain, ns: &str, name: &str) -> Option<SpiffeId> {
    SpiffeId::gateway(td, ns, name).ok()
}

pub(super) fn ns_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

pub(super) fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

/// One side of a reference: (group, kind, namespace), plus the name on the target side.
pub(super) type From<'a> = (&'a str, &'a str, &'a str);
pub(super) type To<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Whether a ReferenceGrant in the target's namespace lets `from` refer to `to`.
pub(super) fn granted(grants: &[ReferenceGrant], from: From<'_>, to: To<'_>) -> bool {
    let (from_group, from_kind, from_ns) = from;
    let (to_group, to_kind, to_ns, to_name) = to;
    grants.iter().any(|g| {
        ns_of(&g.metadata) == to_ns
            && g.spec
                .from
                .iter()
                .any(|f| f.group == from_group && f.kind == from_kind && f.namespace == from_ns)
            && g.spec.to.iter().any(|t| {
                t.group == to_group
                    && t.kind == to_kind
                    && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    })
}

/// Builds the configuration and status from `res`.
pub fn build(res: &Resources, td: &TrustDomain) -> GatewayConfig {
    let mut status = Status::default();
    let ours: Vec<String> = res
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == CONTROLLER)
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    for c in &res.classes {
        if c.spec.controller_name == CONTROLLER {
            status.gateway_classes.push(ClassStatus {
                name: c.metadata.name.clone().unwrap_or_default(),
                conditions: vec![
                    cond("Accepted", true, "Accepted", "handled by Signet"),
                    cond(
                        "SupportedVersion",
                        true,
                        "SupportedVersion",
                        "the Gateway API version of the installed CRDs is the one Signet reads",
                    ),
                ],
            });
        }
    }
    let mut gateways: Vec<&Gateway> = res
        .gateways
        .iter()
        .filter(|g| ours.contains(&g.spec.gateway_class_name))
        .collect();
    gateways.sort_by_key(|g| {
        (
            created(&g.metadata),
            ns_of(&g.metadata),
            g.metadata.name.clone(),
        )
    });

    // Keyed by (addresses, port): Gateways on addresses of their own never share a port with
    // another Gateway; those on the node's address share it (by hostname).
    let mut ports: BTreeMap<(Vec<std::net::IpAddr>, u16), Port> = BTreeMap::new();
    for gw in gateways {
        let (gns, gname) = (
            ns_of(&gw.metadata),
            gw.metadata.name.clone().unwrap_or_default(),
        );
        // A Gateway refused whole: not Accepted, and why.
        let mut refuse = |reason: &str, message: String| {
            status.gateways.push(GatewayStatus {
                namespace: gns.clone(),
                name: gname.clone(),
                addresses: vec![],
                conditions: vec![cond("Accepted", false, reason, message)],
                listeners: vec![],
            });
        };
        let Some(identity) = gateway_identity(td, &gns, &gname) else {
            refuse("Invalid", "the name makes no valid SPIFFE ID".into());
            continue;
        };
        let placement = match Placement::of(gw.metadata.annotations.as_ref()) {
            Ok(p) => p,
            Err(reason) => {
                refuse("InvalidParameters", format!("served by no node: {reason}"));
                continue;
            }
        };
        if let Some(p) = gw
            .spec
            .infrastructure
            .as_ref()
            .and_then(|i| i.parameters_ref.as_ref())
        {
            refuse(
                "InvalidParameters",
                format!(
                    "spec.infrastructure.parametersRef {}/{} {}: Signet's Gateways take no parameters",
                    p.group, p.kind, p.name
                ),
            );
            continue;
        }
        use super::addresses::GatewayAddresses;
        let addresses = res.addresses.gateway(&gns, &gname);
        if let GatewayAddresses::Refused {
            condition: "Accepted",
            reason,
            message,
        } = &addresses
        {
            refuse(reason, message.clone());
            continue;
        }
        let bound: Vec<std::net::IpAddr> = match &addresses {
            GatewayAddresses::Assigned(ips) => ips.clone(),
            _ => vec![],
        };
        let mut listener_status = Vec::new();
        let mut all_programmed = true;
        for l in &gw.spec.listeners {
            let (ls, served) = listener(
                res,
                l,
                &identity,
                &gns,
                &gname,
                &mut status,
                Served {
                    ports: &ports,
                    bound: &bound,
                },
            );
            all_programmed &= ls
                .conditions
                .iter()
                .any(|c| c.type_ == "Programmed" && c.status == "True");
            listener_status.push(ls);
            // A Gateway without the address it needs is served nowhere.
            let served = served.filter(|_| !matches!(addresses, GatewayAddresses::Refused { .. }));
            if let Some((port, protocol, mut listener)) = served {
                listener.placement = placement.clone();
                ports
                    .entry((bound.clone(), port))
                    .or_insert_with(|| Port {
                        addresses: bound.clone(),
                        port,
                        protocol,
                        listeners: vec![],
                        tls: None,
                    })
                    .listeners
                    .push(listener);
            }
        }
        // Accepted as the spec has it: False/ListenersNotValid when no listener is valid, True
        // with that reason when some are not.
        let invalid: Vec<&str> = listener_status
            .iter()
            .filter(|l| {
                !l.conditions
                    .iter()
                    .any(|c| c.type_ == "Accepted" && c.status == "True")
            })
            .map(|l| l.name.as_str())
            .collect();
        let accepted = if invalid.is_empty() {
            cond(
                "Accepted",
                true,
                "Accepted",
                format!("handled by Signet, on {placement}"),
            )
        } else if invalid.len() == listener_status.len() {
            cond(
                "Accepted",
                false,
                "ListenersNotValid",
                format!(
                    "no listener is valid ({}); see their conditions",
                    invalid.join(", ")
                ),
            )
        } else {
            cond(
                "Accepted",
                true,
                "ListenersNotValid",
                format!(
                    "handled by Signet, on {placement}; listeners {} are not valid",
                    invalid.join(", ")
                ),
            )
        };
        status.gateways.push(GatewayStatus {
            namespace: gns,
            name: gname,
            addresses: match &addresses {
                GatewayAddresses::Assigned(ips) => ips.iter().map(ToString::to_string).collect(),
                GatewayAddresses::Nodes => {
                    let mut ips: Vec<std::net::IpAddr> = res
                        .node_addresses
                        .iter()
                        .filter(|(labels, _)| placement.admits(labels))
                        .map(|(_, ip)| *ip)
                        .collect();
                    ips.sort();
                    ips.dedup();
                    ips.iter().map(ToString::to_string).collect()
                }
                GatewayAddresses::Refused { .. } => vec![],
            },
            conditions: vec![
                accepted,
                if let GatewayAddresses::Refused {
                    reason, message, ..
                } = &addresses
                {
                    cond("Programmed", false, reason, message)
                } else if all_programmed {
                    cond("Programmed", true, "Programmed", "every listener is served")
                } else {
                    cond(
                        "Programmed",
                        false,
                        "Invalid",
                        "a listener is not served; see its conditions",
                    )
                },
            ],
            listeners: listener_status,
        });
    }
    // Routes whose parents are not served Gateways, or no kind of parent Signet serves.
    for RouteParent {
        ns: rns,
        name: rname,
        parent,
        ..
    } in route_parents(res)
    {
        if parent.is_service() {
            continue;
        }
        let gateway = status.gateways.iter().find(|g| {
            parent.is_gateway() && g.namespace == parent.namespace && g.name == parent.name
        });
        let why = match gateway {
            // Served, but no listener took up this parentRef (each one that matches says
            // something): its sectionName or port names none, or the Gateway was refused.
            Some(g) => {
                let answered = status.http_routes.iter().any(|r| {
                    r.namespace == rns
                        && r.name == rname
                        && r.parents.iter().any(|p| p.parent == parent)
                });
                match (answered, g.listeners.is_empty()) {
                    (true, _) => None,
                    (false, true) => Some(format!(
                        "Gateway {}/{} is not accepted",
                        g.namespace, g.name
                    )),
                    (false, false) => Some(format!(
                        "{parent}: no listener of the Gateway has that sectionName and port"
                    )),
                }
            }
            None if parent.is_gateway() => Some(format!(
                "no Gateway {}/{} of a Signet GatewayClass",
                parent.namespace, parent.name
            )),
            None => Some(format!("{parent}: a parent is a Gateway or a Service")),
        };
        if let Some(why) = why {
            push_route_status(
                &mut status.http_routes,
                &rns,
                &rname,
                parent,
                not_accepted("NoMatchingParent", why),
            );
        }
    }
    for RouteParent {
        ns: rns,
        name: rname,
        parent,
        ..
    } in grpc_parents(res)
    {
        if parent.is_service() {
            continue;
        }
        let why = if parent.is_gateway() {
            "Signet's Gateway listeners take HTTPRoutes; a GRPCRoute is served with a Service \
             as its parent (the mesh)"
                .to_owned()
        } else {
            format!("{parent}: a GRPCRoute's parent is a Service")
        };
        let reason = if parent.is_gateway() {
            "NotAllowedByListeners"
        } else {
            "NoMatchingParent"
        };
        push_route_status(
            &mut status.grpc_routes,
            &rns,
            &rname,
            parent,
            not_accepted(reason, why),
        );
    }
    let mesh = super::mesh::build(res, &mut status);
    add_resolved_refs(res, &mut status);
    let (traffic, traffic_status) = super::traffic::build(res);
    status.traffic_policies = traffic_status;
    let mut ports: Vec<Port> = ports.into_values().collect();
    for p in &mut ports {
        if p.protocol == Protocol::Https {
            match super::tls::config(p) {
                Ok(c) => p.tls = Some(c),
                Err(e) => tracing::error!(port = p.port, error = %e, "gateway TLS configuration"),
            }
        }
    }
    GatewayConfig {
        ports,
        mesh,
        traffic,
        status,
        addresses: Default::default(),
        l2: vec![],
    }
}

/// A route a parent does not accept, and why.
pub(super) fn not_accepted(reason: &str, message: String) -> Vec<Condition> {
    vec![cond("Accepted", false, reason, message)]
}

/// One parent reference of one route, with the defaults applied.
pub(super) struct RouteParent<'a, R> {
    pub route: &'a R,
    /// The route's place in its list of `Resources`.
    pub index: usize,
    pub ns: String,
    pub name: String,
    pub parent: ParentRef,
}

/// The fields of a `parentRef`, any route kind's.
struct RawParent<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    namespace: Option<&'a str>,
    name: &'a str,
    section_name: Option<&'a str>,
    port: Option<i32>,
}

impl RawParent<'_> {
    fn resolve(&self, route_ns: &str) -> ParentRef {
        ParentRef {
            group: self.group.unwrap_or(GATEWAY_GROUP).to_owned(),
            kind: self.kind.unwrap_or("Gateway").to_owned(),
            namespace: self.namespace.unwrap_or(route_ns).to_owned(),
            name: self.name.to_owned(),
            section_name: self.section_name.map(str::to_owned),
            port: self.port,
        }
    }
}

/// The parent references of a list of routes of one kind: the generated types differ, the
/// fields (`group`, `kind`, `namespace`, `name`, `sectionName`, `port`) do not.
macro_rules! parents_of {
    ($routes:expr) => {
        $routes.iter().enumerate().flat_map(|(index, route)| {
            let ns = ns_of(&route.metadata);
            let name = route.metadata.name.clone().unwrap_or_default();
            route
                .spec
                .parent_refs
                .iter()
                .flatten()
                .map(move |p| RouteParent {
                    route,
                    index,
                    parent: RawParent {
                        group: p.group.as_deref(),
                        kind: p.kind.as_deref(),
                        namespace: p.namespace.as_deref(),
                        name: &p.name,
                        section_name: p.section_name.as_deref(),
                        port: p.port,
                    }
                    .resolve(&ns),
                    ns: ns.clone(),
                    name: name.clone(),
                })
        })
    };
}

/// Every parent reference of every HTTPRoute.
pub(super) fn route_parents(res: &Resources) -> impl Iterator<Item = RouteParent<'_, HttpRoute>> {
    parents_of!(res.routes)
}

/// Every parent reference of every GRPCRoute.
pub(super) fn grpc_parents(res: &Resources) -> impl Iterator<Item = RouteParent<'_, GrpcRoute>> {
    parents_of!(res.grpc_routes)
}

pub(super) fn push_route_status(
    all: &mut Vec<RouteStatus>,
    ns: &str,
    name: &str,
    parent: ParentRef,
    conditions: Vec<Condition>,
) {
    let i = match all.iter().position(|r| r.namespace == ns && r.name == name) {
        Some(i) => i,
        None => {
            all.push(RouteStatus {
                namespace: ns.into(),
                name: name.into(),
                parents: vec![],
            });
            all.len() - 1
        }
    };
    let parents = &mut all[i].parents;
    match parents.iter_mut().find(|p| p.parent == parent) {
        // A route attached to several listeners of one Gateway: accepted if any accepts it.
        Some(existing) => {
            let accepted = |c: &[Condition]| {
                c.iter()
                    .any(|c| c.type_ == "Accepted" && c.status == "True")
            };
            if !accepted(&existing.conditions) && accepted(&conditions) {
                existing.conditions = conditions;
            }
        }
        None => parents.push(RouteParentStatus { parent, conditions }),
    }
}

/// The conditions of a route a parent takes, from what its rules' translation found: not
/// Accepted when a field is not supported (naming it), else Accepted and `ResolvedRefs`.
pub(super) fn translated_conditions(problems: &super::translate::Problems) -> Vec<Condition> {
    if !problems.unsupported.is_empty() {
        return not_accepted("UnsupportedValue", problems.unsupported.join("; "));
    }
    vec![
        cond("Accepted", true, "Accepted", ""),
        resolved_refs(problems),
    ]
}

/// A route's `ResolvedRefs`: whether every backendRef of its rules resolved.
fn resolved_refs(problems: &super::translate::Problems) -> Condition {
    match problems.refs.first() {
        None => cond("ResolvedRefs", true, "ResolvedRefs", ""),
        Some((reason, why)) => cond("ResolvedRefs", false, reason, why.clone()),
    }
}

/// The spec wants `ResolvedRefs` on every parent status of a route, whether that parent accepted
/// it or not: a parent status without one gets the route's own.
fn add_resolved_refs(res: &Resources, status: &mut Status) {
    let missing = |r: &RouteStatus| {
        r.parents
            .iter()
            .any(|p| !p.conditions.iter().any(|c| c.type_ == "ResolvedRefs"))
    };
    let fill = |r: &mut RouteStatus, resolved: Condition| {
        for p in &mut r.parents {
            if !p.conditions.iter().any(|c| c.type_ == "ResolvedRefs") {
                p.conditions.push(resolved.clone());
            }
        }
    };
    let named = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                 r: &RouteStatus| {
        ns_of(meta) == r.namespace && meta.name.as_deref() == Some(r.name.as_str())
    };
    for r in status.http_routes.iter_mut().filter(|r| missing(r)) {
        if let Some(route) = res.routes.iter().find(|x| named(&x.metadata, r)) {
            let raw = route.spec.rules.as_deref().unwrap_or_default();
            let (_, problems) = super::translate::rules(res, &r.namespace, raw);
            fill(r, resolved_refs(&problems));
        }
    }
    for r in status.grpc_routes.iter_mut().filter(|r| missing(r)) {
        if let Some(route) = res.grpc_routes.iter().find(|x| named(&x.metadata, r)) {
            let raw = route.spec.rules.as_deref().unwrap_or_default();
            let (_, problems) = super::translate::grpc_rules(res, &r.namespace, raw);
            fill(r, resolved_refs(&problems));
        }
    }
}

/// The ports served so far, and the addresses the Gateway being built is bound on: where a
/// listener's port may conflict.
#[derive(Clone, Copy)]
struct Served<'a> {
    ports: &'a BTreeMap<(Vec<std::net::IpAddr>, u16), Port>,
    bound: &'a [std::net::IpAddr],
}

fn listener(
    res: &Resources,
    l: &GatewayListeners,
    identity: &SpiffeId,
    gns: &str,
    gname: &str,
    status: &mut Status,
    served: Served<'_>,
) -> (ListenerStatus, Option<(u16, Protocol, Listener)>) {
    let mut ls = ListenerStatus {
        name: l.name.clone(),
        supported_kinds: vec![],
        attached_routes: 0,
        conditions: vec![],
    };
    let fail = |mut ls: ListenerStatus, accepted: Condition, resolved: Condition| {
        ls.conditions = vec![
            accepted,
            resolved,
            cond("Programmed", false, "Invalid", "not served"),
        ];
        (ls, None)
    };
    let passthrough =
        l.tls.as_ref().and_then(|t| t.mode.as_ref()) == Some(&GatewayListenersTlsMode::Passthrough);
    let protocol = match l.protocol.as_str() {
        "HTTP" => Protocol::Http,
        "HTTPS" => Protocol::Https,
        "TCP" => Protocol::Tcp,
        "TLS" if passthrough => Protocol::TlsPassthrough,
        "TLS" => {
            return fail(
                ls,
                cond(
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    "TLS listeners are served in mode Passthrough; terminate TLS with HTTPS",
                ),
                cond("ResolvedRefs", true, "ResolvedRefs", ""),
            );
        }
        other => {
            return fail(
                ls,
                cond(
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    format!(
                        "protocol {other} is not served; HTTP, HTTPS, TCP and TLS (Passthrough) are"
                    ),
                ),
                cond("ResolvedRefs", true, "ResolvedRefs", ""),
            );
        }
    };
    let served_kinds: &[&str] = match protocol {
        Protocol::Http | Protocol::Https => &["HTTPRoute", "GRPCRoute"],
        Protocol::Tcp => &["TCPRoute"],
        Protocol::TlsPassthrough => &["TLSRoute"],
    };
    // `allowedRoutes.kinds` narrows them; a kind the protocol does not take is refused by name.
    let asked = l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref());
    let mut bad_kinds = Vec::new();
    ls.supported_kinds = match asked.filter(|k| !k.is_empty()) {
        None => served_kinds.iter().map(|k| (*k).to_owned()).collect(),
        Some(kinds) => kinds
            .iter()
            .filter_map(|k| {
                let group = k.group.as_deref().unwrap_or(GATEWAY_GROUP);
                if group == GATEWAY_GROUP && served_kinds.contains(&k.kind.as_str()) {
                    Some(k.kind.clone())
                } else {
                    bad_kinds.push(format!("{group}/{}", k.kind));
                    None
                }
            })
            .collect(),
    };
    let kinds_resolved = if bad_kinds.is_empty() {
        cond("ResolvedRefs", true, "ResolvedRefs", "")
    } else {
        cond(
            "ResolvedRefs",
            false,
            "InvalidRouteKinds",
            format!(
                "allowedRoutes.kinds {} are not served on a {} listener",
                bad_kinds.join(", "),
                l.protocol
            ),
        )
    };
    let Ok(port) = u16::try_from(l.port) else {
        return fail(
            ls,
            cond(
                "Accepted",
                false,
                "PortUnavailable",
                format!("port {} is out of range", l.port),
            ),
            cond("ResolvedRefs", true, "ResolvedRefs", ""),
        );
    };
    let hostname = l.hostname.clone().map(|h| h.to_ascii_lowercase());
    if let Some(existing) = served.ports.get(&(served.bound.to_vec(), port)) {
        let conflict = if existing.protocol != protocol {
            Some((
                "ProtocolConflict",
                "another listener serves this port with another protocol",
            ))
        } else if existing.listeners.iter().any(|o| o.hostname == hostname) {
            Some((
                "HostnameConflict",
                "another listener serves this port and hostname",
            ))
        } else {
            None
        };
        if let Some((reason, message)) = conflict {
            let (mut ls, served) = fail(
                ls,
                cond(
                    "Accepted",
                    false,
                    "PortUnavailable",
                    format!("port {port}: {message}"),
                ),
                cond("ResolvedRefs", true, "ResolvedRefs", ""),
            );
            ls.conditions
                .push(cond("Conflicted", true, reason, message));
            return (ls, served);
        }
    }
    let l4 = match protocol {
        Protocol::Tcp => Some(super::l4::Kind::Tcp),
        Protocol::TlsPassthrough => Some(super::l4::Kind::Tls),
        Protocol::Http | Protocol::Https => None,
    };
    if let Some(kind) = l4 {
        let routes_status = match kind {
            super::l4::Kind::Tcp => &mut status.tcp_routes,
            super::l4::Kind::Tls => &mut status.tls_routes,
        };
        let routes = if ls.supported_kinds.is_empty() {
            vec![]
        } else {
            super::l4::attach(res, l, gns, gname, kind, routes_status)
        };
        ls.attached_routes = routes.len() as i32;
        ls.conditions = vec![
            cond("Accepted", true, "Accepted", ""),
            kinds_resolved,
            cond("Programmed", true, "Programmed", ""),
        ];
        return (
            ls,
            Some((
                port,
                protocol,
                Listener {
                    gateway_namespace: gns.to_owned(),
                    gateway_name: gname.to_owned(),
                    identity: identity.clone(),
                    name: l.name.clone(),
                    hostname,
                    certificates: vec![],
                    router: Router::new(vec![]),
                    l4: routes,
                    placement: Placement::default(),
                },
            )),
        );
    }
    let route_status = &mut status.http_routes;
    let mut certificates = vec![];
    let mut resolved = kinds_resolved;
    // An HTTPS listener whose certificates do not resolve is not served, but routes still attach
    // to it (counted, with their status), as the spec has it.
    let mut unservable = false;
    if protocol == Protocol::Https {
        let tls = l.tls.as_ref();
        if tls.and_then(|t| t.mode.as_ref()) == Some(&GatewayListenersTlsMode::Passthrough) {
            return fail(
                ls,
                cond(
                    "Accepted",
                    false,
                    "UnsupportedProtocol",
                    "TLS passthrough is not served; use mode Terminate",
                ),
                cond("ResolvedRefs", true, "ResolvedRefs", ""),
            );
        }
        for r in tls
            .and_then(|t| t.certificate_refs.as_ref())
            .into_iter()
            .flatten()
        {
            let kind = r.kind.as_deref().unwrap_or("Secret");
            let group = r.group.as_deref().unwrap_or("");
            let sns = r.namespace.clone().unwrap_or_else(|| gns.to_owned());
            if kind != "Secret" || !group.is_empty() {
                resolved = cond(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    format!("{group}/{kind} {} is not a Secret", r.name),
                );
                continue;
            }
            if sns != gns
                && !granted(
                    &res.grants,
                    ("gateway.networking.k8s.io", "Gateway", gns),
                    ("", "Secret", &sns, &r.name),
                )
            {
                resolved = cond(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "Secret {sns}/{} is in another namespace and no ReferenceGrant allows it",
                        r.name
                    ),
                );
                continue;
            }
            match super::tls::certificate(res, &sns, &r.name) {
                Ok(c) => certificates.push(c),
                Err(why) => {
                    resolved = cond("ResolvedRefs", false, "InvalidCertificateRef", why);
                }
            }
        }
        if certificates.is_empty() {
            if resolved.status == "True" {
                resolved = cond(
                    "ResolvedRefs",
                    false,
                    "InvalidCertificateRef",
                    "an HTTPS listener needs tls.certificateRefs",
                );
            }
            unservable = true;
        }
    }
    // Routes that attach to this listener.
    let mut routes = vec![];
    for RouteParent {
        route: r,
        ns: rns,
        name: rname,
        parent,
        ..
    } in route_parents(res)
    {
        if !parent.is_gateway()
            || parent.namespace != gns
            || parent.name != gname
            || parent.section_name.as_ref().is_some_and(|s| *s != l.name)
            || parent.port.is_some_and(|pp| pp != l.port)
        {
            continue;
        }
        let refusal = match allowed_namespace(l, gns, &rns, &res.namespace_labels) {
            Ok(true) if !ls.supported_kinds.iter().any(|k| k == "HTTPRoute") => {
                Some(format!("listener {} does not allow HTTPRoutes", l.name))
            }
            Ok(true) => None,
            Ok(false) => Some(format!(
                "listener {} does not allow routes from namespace {rns}",
                l.name
            )),
            Err(why) => Some(format!("listener {}: {why}", l.name)),
        };
        if let Some(why) = refusal {
            push_route_status(
                route_status,
                &rns,
                &rname,
                parent,
                not_accepted("NotAllowedByListeners", why),
            );
            continue;
        }
        let hostnames = match effective_hostnames(
            hostname.as_deref(),
            r.spec.hostnames.as_deref().unwrap_or_default(),
        ) {
            Some(h) => h,
            None => {
                push_route_status(
                    route_status,
                    &rns,
                    &rname,
                    parent,
                    not_accepted(
                        "NoMatchingListenerHostname",
                        format!("no hostname in common with listener {}", l.name),
                    ),
                );
                continue;
            }
        };
        let (rules, problems) =
            super::translate::rules(res, &rns, r.spec.rules.as_deref().unwrap_or_default());
        let conditions = translated_conditions(&problems);
        push_route_status(route_status, &rns, &rname, parent, conditions);
        if !problems.unsupported.is_empty() {
            continue;
        }
        ls.attached_routes += 1;
        routes.push(Route {
            namespace: rns.clone(),
            name: rname.clone(),
            created: created(&r.metadata),
            hostnames,
            rules,
        });
    }
    if unservable {
        ls.conditions = vec![
            cond("Accepted", true, "Accepted", ""),
            resolved,
            cond(
                "Programmed",
                false,
                "Invalid",
                "not served: its certificates do not resolve",
            ),
        ];
        return (ls, None);
    }
    ls.conditions = vec![
        cond("Accepted", true, "Accepted", ""),
        resolved,
        cond("Programmed", true, "Programmed", ""),
    ];
    (
        ls,
        Some((
            port,
            protocol,
            Listener {
                gateway_namespace: gns.to_owned(),
                gateway_name: gname.to_owned(),
                identity: identity.clone(),
                name: l.name.clone(),
                hostname,
                certificates,
                router: Router::new(routes),
                l4: vec![],
                placement: Placement::default(),
            },
        )),
    )
}

/// Whether routes in namespace `rns` may attach to listener `l` of a Gateway in `gns`; `Err` names
/// what is wrong with the listener's selector (no route attaches through it).
pub(super) fn allowed_namespace(
    l: &GatewayListeners,
    gns: &str,
    rns: &str,
    namespace_labels: &HashMap<String, BTreeMap<String, String>>,
) -> Result<bool, String> {
    use gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesFrom as From;
    let namespaces = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match namespaces.and_then(|n| n.from.as_ref()) {
        None | Some(From::Same) => Ok(gns == rns),
        Some(From::All) => Ok(true),
        Some(From::Selector) => {
            let path = "allowedRoutes.namespaces.selector";
            let Some(sel) = namespaces.and_then(|n| n.selector.as_ref()) else {
                return Err(format!("{path} is required when `from` is Selector"));
            };
            let k8s = LabelSelector {
                match_labels: sel.match_labels.clone(),
                match_expressions: sel.match_expressions.as_ref().map(|all| {
                    all.iter()
                        .map(|e| LabelSelectorRequirement {
                            key: e.key.clone(),
                            operator: e.operator.clone(),
                            values: e.values.clone(),
                        })
                        .collect()
                }),
            };
            let mut errs = vec![];
            let selector = signet_policy::model::Selector::from_k8s(&k8s, path, &mut errs);
            if !errs.is_empty() {
                let why: Vec<String> = errs
                    .iter()
                    .map(|e| format!("{}: {}", e.path, e.message))
                    .collect();
                return Err(why.join("; "));
            }
            // As the API server does, every namespace carries its own name as a label.
            let mut labels = namespace_labels.get(rns).cloned().unwrap_or_default();
            labels
                .entry("kubernetes.io/metadata.name".to_owned())
                .or_insert_with(|| rns.to_owned());
            Ok(selector.matches(&labels))
        }
    }
}

/// The route's hostnames as this listener serves them; `None` when they have none in common.
fn effective_hostnames(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let route: Vec<String> = route.iter().map(|h| h.to_ascii_lowercase()).collect();
    match (listener, route.is_empty()) {
        (None, _) => Some(route),
        (Some(l), true) => Some(vec![l.to_owned()]),
        (Some(l), false) => {
            let both: Vec<String> = route.iter().filter_map(|h| intersect(l, h)).collect();
            (!both.is_empty()).then_some(both)
        }
    }
}
