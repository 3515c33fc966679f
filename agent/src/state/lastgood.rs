//! One invalid object does not freeze the cluster state (Kubernetes mode). Each IdentityPolicy,
//! Node and Pod is checked on its own before the snapshot is built: a valid one is remembered; an
//! invalid one is replaced by the last valid version this agent saw of it (an agent that starts
//! with an invalid object present starts with the others). Without one, it fails closed: an
//! invalid policy becomes a deny-all for the directions it declares, of the workloads its
//! selector picks (the whole namespace when the selector itself is invalid); an invalid Node or
//! Pod is left out (its addresses own no identity, so no rule admits them). Everything else goes
//! on being updated. What was refused is returned, so it is logged, and the object's status says
//! why (`status::policy_conditions`).

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use signet_policy::IdentityPolicy;
use signet_policy::model::Policy;

use super::snapshot::{self, ClusterObjects};

/// One object refused this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `IdentityPolicy shop/api`, `Node node-b`, `Pod shop/web-0`.
    pub object: String,
    pub reason: String,
    pub in_force: InForce,
}

/// What stands in for a refused object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InForce {
    /// Its last valid version.
    Previous,
    /// A policy never seen valid: deny-all for what it would have governed.
    DenyAll,
    /// Nothing (a Node or Pod never seen valid).
    Nothing,
}

impl std::fmt::Display for InForce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InForce::Previous => "its last valid version stays in force",
            InForce::DenyAll => {
                "never seen valid: its workloads are denied the directions it declares until it is fixed"
            }
            InForce::Nothing => "left out (no valid version seen)",
        })
    }
}

/// The last valid version of each object, by kind and `namespace/name`.
#[derive(Debug, Default)]
pub struct LastGood {
    policies: HashMap<String, IdentityPolicy>,
    nodes: HashMap<String, Node>,
    pods: HashMap<String, Pod>,
}

fn key(ns: Option<&str>, name: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("{ns}/{}", name.unwrap_or_default()),
        None => name.unwrap_or_default().to_owned(),
    }
}

/// Why a policy is refused, as its status says it (`field`: reason; ...).
pub fn policy_problems(p: &IdentityPolicy) -> Option<String> {
    Policy::from_resource(p).err().map(|fields| {
        fields
            .iter()
            .map(|f| format!("`{}`: {}", f.path, f.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn node_problems(n: &Node) -> Option<String> {
    match snapshot::internal_ip(n) {
        None => Some("needs status.addresses with an InternalIP".into()),
        Some(a) if a.parse::<IpAddr>().is_err() => Some(format!(
            "status.addresses InternalIP `{a}` is not an IP address"
        )),
        Some(_) => snapshot::pod_cidrs_of(n).find_map(|c| {
            signet_policy::cidr::Cidr::parse(&c)
                .err()
                .map(|e| format!("spec.podCIDRs `{c}`: {e}"))
        }),
    }
}

fn pod_problems(p: &Pod) -> Option<String> {
    let status = p.status.as_ref()?;
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|i| i.ip.clone())
        .chain(status.pod_ip.clone())
        .find(|ip| ip.parse::<IpAddr>().is_err())
        .map(|ip| format!("status.podIP `{ip}` is not an IP address"))
}

/// Keeps the valid objects of `list` (remembering them in `store`), puts the last valid version
/// in place of an invalid one (or what `fallback` makes of it), and forgets objects no longer
/// listed.
fn settle<T: Clone>(
    kind: &str,
    list: &mut Vec<T>,
    store: &mut HashMap<String, T>,
    key_of: impl Fn(&T) -> String,
    problems: impl Fn(&T) -> Option<String>,
    fallback: impl Fn(&T) -> Option<T>,
    refused: &mut Vec<Refused>,
) {
    let listed: std::collections::HashSet<String> = list.iter().map(&key_of).collect();
    store.retain(|k, _| listed.contains(k));
    let mut out = Vec::with_capacity(list.len());
    for obj in list.drain(..) {
        let k = key_of(&obj);
        match problems(&obj) {
            None => {
                store.insert(k, obj.clone());
                out.push(obj);
            }
            Some(reason) => {
                let (stand_in, in_force) = match store.get(&k) {
                    Some(previous) => (Some(previous.clone()), InForce::Previous),
                    None => match fallback(&obj) {
                        Some(f) => (Some(f), InForce::DenyAll),
                        None => (None, InForce::Nothing),
                    },
                };
                refused.push(Refused {
                    object: format!("{kind} {k}"),
                    reason,
                    in_force,
                });
                out.extend(stand_in);
            }
        }
    }
    *list = out;
}

/// What an invalid policy never seen valid is enforced as: its selector (the whole namespace
/// when that is what is invalid) denied every direction it declares, in its mode.
fn deny_all(p: &IdentityPolicy) -> Option<IdentityPolicy> {
    let mut deny = IdentityPolicy {
        metadata: p.metadata.clone(),
        spec: signet_policy::resource::IdentityPolicySpec {
            selector: p.spec.selector.clone(),
            mode: p.spec.mode,
            // A direction it allows or denies anything in is denied whole.
            ingress: (p.spec.ingress.is_some() || !p.spec.ingress_deny.is_empty()).then(Vec::new),
            egress: (p.spec.egress.is_some() || !p.spec.egress_deny.is_empty()).then(Vec::new),
            ..Default::default()
        },
        status: None,
    };
    if policy_problems(&deny).is_some() {
        deny.spec.selector = Default::default();
    }
    policy_problems(&deny).is_none().then_some(deny)
}

impl LastGood {
    /// Settles every checked kind of `objects` in place; returns what was refused.
    pub fn settle(&mut self, objects: &mut ClusterObjects) -> Vec<Refused> {
        let mut refused = Vec::new();
        settle(
            "IdentityPolicy",
            &mut objects.policy.policies,
            &mut self.policies,
            |p| key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()),
            policy_problems,
            deny_all,
            &mut refused,
        );
        settle(
            "Node",
            &mut objects.nodes,
            &mut self.nodes,
            |n| key(None, n.metadata.name.as_deref()),
            node_problems,
            |_| None,
            &mut refused,
        );
        settle(
            "Pod",
            &mut objects.policy.pods,
            &mut self.pods,
            |p| key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()),
            pod_problems,
            |_| None,
            &mut refused,
        );
        refused
    }
}
