//! What the address allocator (`signet_policy::lbipam`) decides for Gateways and Services of
//! type LoadBalancer, read from the resources: who asks for what, where each Gateway is served,
//! and the status pools and Services get. The record it is decided against is kept by
//! `state::lbipam`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use signet_policy::lbipam::{self, Outcome, Owner, Requester, Want};

/// Address → (pool, owner): what was given out.
pub type Record = BTreeMap<IpAddr, (String, Owner)>;

/// The `loadBalancerClass` of Services Signet serves (besides those that name none).
pub const LB_CLASS: &str = "signet.dev/lb";
/// Addresses a Service asks for, comma-separated (preferred over the deprecated
/// `spec.loadBalancerIP`).
pub const LB_IPS_ANNOTATION: &str = "signet.dev/lb-ips";
/// The condition written on Services (Kubernetes has no standard one).
pub const SERVICE_CONDITION: &str = "signet.dev/IPAMRequestSatisfied";

/// Where a Gateway is served, as far as its addresses go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAddresses {
    /// No pool selects it and it asks for no address: served on its nodes' own addresses.
    Nodes,
    /// These, from the pools.
    Assigned(Vec<IpAddr>),
    /// It cannot be served: (condition, reason, message), e.g. `Programmed`/`AddressNotAssigned`.
    Refused {
        condition: &'static str,
        reason: &'static str,
        message: String,
    },
}

/// What the allocator decided for the cluster, and what could not even be asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub outcome: Outcome,
    /// Requesters refused before allocation (an address that is not one, a type Signet does
    /// not assign): (condition, reason, message).
    pub invalid: BTreeMap<Owner, (&'static str, &'static str, String)>,
    /// Gateways that name addresses in `spec.addresses` (they are never served on nodes'
    /// addresses instead).
    pub asked: std::collections::BTreeSet<Owner>,
    /// Every requester's labels (with the names pools select on), for announcement policies.
    pub labels: BTreeMap<Owner, signet_policy::resource::Labels>,
}

fn owner(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Owner {
    Owner {
        kind: kind.into(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Whether Signet gives `svc` an address: type LoadBalancer, and no other implementation's
/// `loadBalancerClass`.
pub fn is_signet_lb(svc: &k8s_openapi::api::core::v1::Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer")
            && s.load_balancer_class
                .as_deref()
                .is_none_or(|c| c == LB_CLASS)
    })
}

/// Every Signet Gateway and Signet LoadBalancer Service, as the allocator sees them.
pub fn requesters(
    gateway: &super::model::Resources,
    services: &[k8s_openapi::api::core::v1::Service],
) -> (Vec<Requester>, Addresses) {
    let mut out = Vec::new();
    let mut refused = Addresses::default();
    let ours: Vec<&str> = gateway
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == super::model::CONTROLLER)
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    for g in &gateway.gateways {
        if !ours.contains(&g.spec.gateway_class_name.as_str()) {
            continue;
        }
        let o = owner("Gateway", &g.metadata);
        if g.spec.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
            refused.asked.insert(o.clone());
        }
        let mut requested = Vec::new();
        let mut wants = Vec::new();
        let mut problem = None;
        for (i, a) in g.spec.addresses.iter().flatten().enumerate() {
            match (a.r#type.as_deref().unwrap_or("IPAddress"), &a.value) {
                ("IPAddress", None) => wants.push((Want::Any, true)),
                ("IPAddress", Some(v)) => match v.parse::<IpAddr>() {
                    Ok(ip) => requested.push(ip),
                    Err(e) => {
                        problem = Some((
                            "Programmed",
                            "AddressNotUsable",
                            format!("spec.addresses[{i}].value `{v}`: {e}"),
                        ))
                    }
                },
                (t, _) => {
                    problem = Some((
                        "Accepted",
                        "UnsupportedAddress",
                        format!(
                            "spec.addresses[{i}]: type `{t}` is not supported; Signet assigns IPAddress"
                        ),
                    ))
                }
            }
        }
        if let Some(p) = problem {
            refused.invalid.insert(o, p);
            continue;
        }
        if !requested.is_empty() && !wants.is_empty() {
            refused.invalid.insert(
                o,
                (
                    "Programmed",
                    "AddressNotUsable",
                    "spec.addresses mixes addresses by value with ones to assign; Signet does one or the other".into(),
                ),
            );
            continue;
        }
        if wants.is_empty() {
            wants.push((Want::Any, true));
        }
        refused.labels.insert(
            o.clone(),
            Requester::labels_with_names(&o, g.metadata.labels.as_ref()),
        );
        out.push(Requester {
            labels: Requester::labels_with_names(&o, g.metadata.labels.as_ref()),
            owner: o,
            requested,
            wants,
            created: created(&g.metadata),
        });
    }
    for s in services.iter().filter(|s| is_signet_lb(s)) {
        let o = owner("Service", &s.metadata);
        let spec = s.spec.as_ref().expect("is_signet_lb saw a spec");
        let asked = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_IPS_ANNOTATION))
            .map(|v| {
                (
                    format!("metadata.annotations[{LB_IPS_ANNOTATION}]"),
                    v.clone(),
                )
            })
            .or_else(|| {
                spec.load_balancer_ip
                    .clone()
                    .filter(|v| !v.is_empty())
                    .map(|v| ("spec.loadBalancerIP".to_owned(), v))
            });
        let mut requested = Vec::new();
        if let Some((field, value)) = asked {
            for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                match v.parse::<IpAddr>() {
                    Ok(ip) => requested.push(ip),
                    Err(e) => {
                        refused.invalid.insert(
                            o.clone(),
                            ("Ready", "AddressNotUsable", format!("{field} `{v}`: {e}")),
                        );
                    }
                }
            }
        }
        if refused.invalid.contains_key(&o) {
            continue;
        }
        let families = spec
            .ip_families
            .clone()
            .unwrap_or_else(|| vec!["IPv4".into()]);
        let dual_required = spec.ip_family_policy.as_deref() == Some("RequireDualStack");
        let dual_preferred = spec.ip_family_policy.as_deref() == Some("PreferDualStack");
        let wants = families
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || dual_required || dual_preferred)
            .map(|(i, f)| {
                let w = if f == "IPv6" { Want::V6 } else { Want::V4 };
                (w, i == 0 || dual_required)
            })
            .collect();
        refused.labels.insert(
            o.clone(),
            Requester::labels_with_names(&o, s.metadata.labels.as_ref()),
        );
        out.push(Requester {
            labels: Requester::labels_with_names(&o, s.metadata.labels.as_ref()),
            owner: o,
            requested,
            wants,
            created: created(&s.metadata),
        });
    }
    (out, refused)
}

impl Addresses {
    /// The allocator run on the Gateways and Services against `record`.
    pub fn compute(
        gateway: &super::model::Resources,
        services: &[k8s_openapi::api::core::v1::Service],
        pools: &[signet_policy::LoadBalancerIPPool],
        record: &Record,
    ) -> Self {
        let (requesters, mut out) = requesters(gateway, services);
        out.outcome = lbipam::allocate(pools, &requesters, record);
        out
    }

    /// Where Gateway `ns/name` is served.
    pub fn gateway(&self, ns: &str, name: &str) -> GatewayAddresses {
        let o = Owner {
            kind: "Gateway".into(),
            namespace: ns.into(),
            name: name.into(),
        };
        if let Some((condition, reason, message)) = self.invalid.get(&o) {
            return GatewayAddresses::Refused {
                condition,
                reason,
                message: message.clone(),
            };
        }
        match self.outcome.assigned.get(&o) {
            Some(Ok(ips)) => GatewayAddresses::Assigned(ips.iter().map(|(ip, _)| *ip).collect()),
            // A Gateway that no pool selects and that asks for nothing keeps today's serving.
            Some(Err(r)) if r.reason == "NoPool" && !self.asked_for_addresses(&o) => {
                GatewayAddresses::Nodes
            }
            Some(Err(r)) => GatewayAddresses::Refused {
                condition: "Programmed",
                reason: "AddressNotAssigned",
                message: r.message.clone(),
            },
            None => GatewayAddresses::Nodes,
        }
    }

    fn asked_for_addresses(&self, o: &Owner) -> bool {
        self.asked.contains(o)
    }
}

/// What `signet gateway status` prints under `addresses`, and what Kubernetes mode writes to
/// pools and Services.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub name: String,
    pub total: String,
    pub used: String,
    pub free: String,
    pub conditions: Vec<lbipam::PoolCondition>,
    /// `address: Kind namespace/name`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// Its `status.loadBalancer.ingress` addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<String>,
    /// [`SERVICE_CONDITION`]: True when it has every address it needs.
    pub condition: super::model::Condition,
}

impl AddressStatus {
    pub fn of(a: &Addresses) -> Self {
        use super::model::cond;
        let pools = a
            .outcome
            .pools
            .iter()
            .map(|(name, s)| PoolView {
                name: name.clone(),
                total: s.total.clone(),
                used: s.used.clone(),
                free: s.free.clone(),
                conditions: s.conditions.clone(),
                allocations: s
                    .allocations
                    .iter()
                    .map(|x| format!("{}: {}", x.address, x.owner))
                    .collect(),
            })
            .collect();
        let mut services = Vec::new();
        let service = |o: &Owner| o.kind == "Service";
        for (o, result) in a.outcome.assigned.iter().filter(|(o, _)| service(o)) {
            let (ingress, condition) = match result {
                Ok(ips) => (
                    ips.iter().map(|(ip, _)| ip.to_string()).collect(),
                    cond(SERVICE_CONDITION, true, "Assigned", {
                        let pools: std::collections::BTreeSet<&str> =
                            ips.iter().map(|(_, p)| p.as_str()).collect();
                        format!("from {}", pools.into_iter().collect::<Vec<_>>().join(", "))
                    }),
                ),
                Err(r) => (
                    vec![],
                    cond(SERVICE_CONDITION, false, r.reason, r.message.clone()),
                ),
            };
            services.push(ServiceView {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                ingress,
                condition,
            });
        }
        for (o, (_, reason, message)) in a.invalid.iter().filter(|(o, _)| service(o)) {
            services.push(ServiceView {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                ingress: vec![],
                condition: cond(SERVICE_CONDITION, false, reason, message.clone()),
            });
        }
        services.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        Self { pools, services }
    }
}

/// What this node does with own addresses, decided with each snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Delivered here: the own addresses of the Gateways this node serves.
    pub routed: Vec<IpAddr>,
    /// Those of them this node may announce, each with the interface patterns of the policies
    /// that select it (empty: the interfaces whose subnet holds the address).
    pub announce: BTreeMap<IpAddr, Vec<String>>,
    /// Policies refused (an invalid selector or pattern), and why.
    pub refused: Vec<String>,
}

/// The plan for a node with `labels` that serves `routed`.
pub fn plan(
    routed: Vec<IpAddr>,
    addresses: &Addresses,
    policies: &[signet_policy::L2AnnouncementPolicy],
    labels: &BTreeMap<String, String>,
) -> Plan {
    use signet_policy::model::Selector;
    let mut out = Plan {
        routed,
        ..Plan::default()
    };
    for p in policies {
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut errs = Vec::new();
        let nodes = p
            .spec
            .node_selector
            .as_ref()
            .map(|s| Selector::from_k8s(s, "spec.nodeSelector", &mut errs));
        let services = p
            .spec
            .service_selector
            .as_ref()
            .map(|s| Selector::from_k8s(s, "spec.serviceSelector", &mut errs));
        for (i, pattern) in p.spec.interfaces.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&format!("^(?:{pattern})$")) {
                errs.push(signet_policy::model::FieldError {
                    path: format!("spec.interfaces[{i}]"),
                    message: e.to_string(),
                });
            }
        }
        if !errs.is_empty() {
            let why: Vec<String> = errs
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect();
            out.refused
                .push(format!("L2AnnouncementPolicy {name}: {}", why.join("; ")));
            continue;
        }
        if !p.spec.load_balancer_ips || nodes.is_some_and(|s| !s.matches(labels)) {
            continue;
        }
        for (owner, result) in &addresses.outcome.assigned {
            let Ok(ips) = result else { continue };
            let owner_labels = addresses.labels.get(owner).cloned().unwrap_or_default();
            if services.as_ref().is_some_and(|s| !s.matches(&owner_labels)) {
                continue;
            }
            for (ip, _) in ips.iter().filter(|(ip, _)| out.routed.contains(ip)) {
                let patterns = out.announce.entry(*ip).or_default();
                patterns.extend(p.spec.interfaces.iter().cloned());
                patterns.sort();
                patterns.dedup();
            }
        }
    }
    out
}
