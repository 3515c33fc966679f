//! The reference evaluator: DESIGN.md's policy semantics written for obviousness, not speed. It
//! walks the policies for one flow and says what happens and why. The compiler must agree with
//! it on every flow (property tests), and `signet policy explain` prints its reasoning.
//!
//! Per direction (egress against the source's policies, ingress against the destination's):
//! 1. a matching deny rule denies (deny beats allow);
//! 2. a workload no policy selects with allow rules in this direction is allowed (default allow);
//! 3. otherwise a matching allow rule without `http` allows the connection; if every matching
//!    allow rule has `http`, the connection is allowed and each request must match one of them;
//! 4. otherwise the connection is denied (default deny).
//!
//! Audit-mode policies are evaluated too, and where only they deny, the verdict is AUDIT
//! (allowed, reported). Both directions must allow.

use std::fmt;

use signet_ca::SpiffeId;

use crate::cidr::Cidr;
use crate::cluster::{Cluster, Workload};
use crate::identity::{HOST, INGRESS, WORLD};
use crate::model::{PeerMatch, Policy, Request, Rule};
use crate::resource::{Entity, Mode, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Points at one rule of one policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// `namespace/name`.
    pub policy: String,
    pub direction: Direction,
    pub deny: bool,
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match (self.direction, self.deny) {
            (Direction::Ingress, false) => "ingress",
            (Direction::Ingress, true) => "ingressDeny",
            (Direction::Egress, false) => "egress",
            (Direction::Egress, true) => "egressDeny",
        };
        write!(f, "{} {field}[{}]", self.policy, self.index)
    }
}

/// A peer as the datapath knows it: a number, and a SPIFFE ID when it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub number: u32,
    pub id: Option<SpiffeId>,
    /// A world peer known by address or prefix: a `world:IP` destination (its /32 or /128), or
    /// one of the compiler's CIDR identities.
    pub cidr: Option<Cidr>,
}

/// What one direction decided at connection level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Reason),
    Deny(Reason),
    /// Allowed; each request must match one of these rules' `http` lists.
    L7(Vec<RuleRef>),
    /// Allowed, but an audit-mode policy would deny it for this reason.
    Audit(Reason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No policy with allow rules in this direction selects the workload.
    DefaultAllow {
        deny_rules_from: Vec<String>,
    },
    /// Selected by these policies, and no allow rule of this direction matches.
    DefaultDeny {
        selected_by: Vec<String>,
        direction: Direction,
    },
    Rule(RuleRef),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DefaultAllow { deny_rules_from } if deny_rules_from.is_empty() => {
                write!(f, "default allow: no policy selects it for this direction")
            }
            Reason::DefaultAllow { deny_rules_from } => write!(
                f,
                "default allow: only deny rules ({}) select it, and none matches",
                deny_rules_from.join(", ")
            ),
            Reason::DefaultDeny {
                selected_by,
                direction,
            } => write!(
                f,
                "default deny: selected by {}, no {} rule allows",
                selected_by.join(", "),
                direction.name()
            ),
            Reason::Rule(r) => write!(f, "{r}"),
        }
    }
}

/// Whether a policy peer matches `peer`.
pub fn peer_matches(m: &PeerMatch, peer: &PeerInfo, cluster: &Cluster) -> bool {
    let td = &cluster.trust_domain;
    match m {
        PeerMatch::Identity(pattern) => peer.id.as_ref().is_some_and(|id| pattern.matches(id)),
        PeerMatch::Gateway { namespace, name } => peer.id.as_ref().is_some_and(|id| {
            id.is_member_of(td)
                && id.namespace_and_gateway() == Some((namespace.as_str(), name.as_str()))
        }),
        PeerMatch::Namespaces(sel) => peer
            .id
            .as_ref()
            .and_then(|id| cluster.namespace_of(id))
            .is_some_and(|ns| sel.matches(&cluster.namespace_labels(ns))),
        PeerMatch::Cidr { .. } => peer.cidr.is_some_and(|p| m.matches_prefix(&p)),
        PeerMatch::Entity(Entity::Any) => true,
        PeerMatch::Entity(Entity::World) => peer.number == WORLD || peer.cidr.is_some(),
        PeerMatch::Entity(Entity::Host) => peer.number == HOST,
        PeerMatch::Entity(Entity::Gateway) => {
            peer.number == INGRESS || peer.id.as_ref().is_some_and(|id| is_gateway(id, td))
        }
        PeerMatch::Entity(Entity::Cluster) => {
            peer.number != WORLD
                && peer.cidr.is_none()
                && peer.id.as_ref().is_none_or(|id| id.is_member_of(td))
        }
    }
}

/// `spiffe://<td>/ns/<ns>/gateway/<name>`.
pub fn is_gateway(id: &SpiffeId, td: &signet_ca::TrustDomain) -> bool {
    id.is_member_of(td) && id.namespace_and_gateway().is_some()
}

pub fn selects(policy: &Policy, w: &Workload) -> bool {
    policy.namespace == w.namespace && policy.selector.matches(&w.labels)
}

fn rule_matches(
    rule: &Rule,
    peer: &PeerInfo,
    port: u16,
    proto: Protocol,
    cluster: &Cluster,
) -> bool {
    rule.covers_port(port, proto) && rule.peers.iter().any(|m| peer_matches(m, peer, cluster))
}

/// A connection seen from one workload: the peer, the destination port and the direction.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub peer: &'a PeerInfo,
    pub port: u16,
    pub proto: Protocol,
    pub dir: Direction,
}

/// One direction for `subject`, counting only enforce-mode policies unless `with_audit`.
/// `policies` must be sorted by namespace and name (rule order decides which rule is named).
fn decide(
    policies: &[&Policy],
    subject: &Workload,
    q: &Query<'_>,
    with_audit: bool,
    cluster: &Cluster,
) -> Decision {
    let (peer, port, proto, dir) = (q.peer, q.port, q.proto, q.dir);
    let selecting: Vec<&Policy> = policies
        .iter()
        .copied()
        .filter(|p| selects(p, subject) && (with_audit || p.mode == Mode::Enforce))
        .collect();
    for p in &selecting {
        let denies = match dir {
            Direction::Ingress => &p.ingress_deny,
            Direction::Egress => &p.egress_deny,
        };
        for (index, rule) in denies.iter().enumerate() {
            if rule_matches(rule, peer, port, proto, cluster) {
                return Decision::Deny(Reason::Rule(RuleRef {
                    policy: p.id(),
                    direction: dir,
                    deny: true,
                    index,
                }));
            }
        }
    }
    let allows = |p: &Policy| match dir {
        Direction::Ingress => p.ingress.clone(),
        Direction::Egress => p.egress.clone(),
    };
    let with_allow_rules: Vec<&&Policy> =
        selecting.iter().filter(|p| allows(p).is_some()).collect();
    if with_allow_rules.is_empty() {
        let deny_rules_from = selecting
            .iter()
            .filter(|p| match dir {
                Direction::Ingress => !p.ingress_deny.is_empty(),
                Direction::Egress => !p.egress_deny.is_empty(),
            })
            .map(|p| p.id())
            .collect();
        return Decision::Allow(Reason::DefaultAllow { deny_rules_from });
    }
    let mut l7 = Vec::new();
    for p in &with_allow_rules {
        for (index, rule) in allows(p).unwrap_or_default().iter().enumerate() {
            if !rule_matches(rule, peer, port, proto, cluster) {
                continue;
            }
            let r = RuleRef {
                policy: p.id(),
                direction: dir,
                deny: false,
                index,
            };
            if rule.http.is_none() {
                return Decision::Allow(Reason::Rule(r));
            }
            l7.push(r);
        }
    }
    if l7.is_empty() {
        Decision::Deny(Reason::DefaultDeny {
            selected_by: with_allow_rules.iter().map(|p| p.id()).collect(),
            direction: dir,
        })
    } else {
        Decision::L7(l7)
    }
}

/// One direction, enforce and audit combined.
pub fn evaluate_direction(
    policies: &[&Policy],
    subject: &Workload,
    q: &Query<'_>,
    cluster: &Cluster,
) -> Decision {
    let enforced = decide(policies, subject, q, false, cluster);
    match enforced {
        Decision::Allow(reason) => match decide(policies, subject, q, true, cluster) {
            Decision::Deny(audit_reason) => Decision::Audit(audit_reason),
            _ => Decision::Allow(reason),
        },
        other => other,
    }
}

/// The `http` list of the allow rule `r` points at.
pub fn http_rules<'a>(
    policies: &[&'a Policy],
    r: &RuleRef,
) -> Option<&'a [crate::model::HttpMatch]> {
    let p = policies.iter().find(|p| p.id() == r.policy)?;
    let list = match r.direction {
        Direction::Ingress => p.ingress.as_ref(),
        Direction::Egress => p.egress.as_ref(),
    }?;
    list.get(r.index)?.http.as_deref()
}

/// Whether `req` passes the `http` lists of `rules`.
pub fn request_allowed(policies: &[&Policy], rules: &[RuleRef], req: &Request) -> Option<RuleRef> {
    rules.iter().find_map(|r| {
        let http = http_rules(policies, r)?;
        http.iter().any(|h| h.matches(req)).then(|| r.clone())
    })
}

/// The final verdict of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::Audit => "AUDIT",
        })
    }
}

/// A whole flow: egress at the source (when it is a workload), ingress at the destination, and
/// the request when one is given.
#[derive(Debug, Clone)]
pub struct FlowOutcome {
    pub verdict: Verdict,
    pub egress: Option<Decision>,
    pub ingress: Decision,
    /// For an L7 connection with a request: the rule that allowed it, or `None` (HTTP 403).
    pub request: Option<(Direction, Option<RuleRef>)>,
}

/// A flow to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// The source when it is a workload of the cluster (its egress is checked).
    pub source: Option<&'a Workload>,
    /// The source as a peer of the destination.
    pub source_peer: &'a PeerInfo,
    pub destination: &'a Workload,
    /// The destination as a peer of the source.
    pub destination_peer: &'a PeerInfo,
    pub port: u16,
    pub proto: Protocol,
    pub request: Option<&'a Request>,
}

/// Evaluates a flow: egress at the source, ingress at the destination, then the request.
pub fn evaluate(cluster: &Cluster, policies: &[&Policy], flow: &Flow<'_>) -> FlowOutcome {
    let (port, proto, request) = (flow.port, flow.proto, flow.request);
    let egress = flow.source.map(|s| {
        let q = Query {
            peer: flow.destination_peer,
            port,
            proto,
            dir: Direction::Egress,
        };
        evaluate_direction(policies, s, &q, cluster)
    });
    let q = Query {
        peer: flow.source_peer,
        port,
        proto,
        dir: Direction::Ingress,
    };
    let ingress = evaluate_direction(policies, flow.destination, &q, cluster);
    let mut verdict = Verdict::Allow;
    let mut req_outcome = None;
    for (dir, d) in [
        (Direction::Egress, egress.as_ref()),
        (Direction::Ingress, Some(&ingress)),
    ] {
        match d {
            Some(Decision::Deny(_)) => verdict = Verdict::Deny,
            Some(Decision::Audit(_)) if verdict == Verdict::Allow => verdict = Verdict::Audit,
            Some(Decision::L7(rules)) => {
                if let Some(req) = request {
                    let ok = request_allowed(policies, rules, req);
                    if ok.is_none() {
                        verdict = Verdict::Deny;
                    }
                    req_outcome = Some((dir, ok));
                }
            }
            _ => {}
        }
    }
    FlowOutcome {
        verdict,
        egress,
        ingress,
        request: req_outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Selector, SpiffePattern};
    use signet_ca::TrustDomain;

    fn cluster() -> Cluster {
        let mut c = Cluster::new(TrustDomain::parse("cluster.local").expect("td"));
        c.add_namespace("shop", [("team".to_owned(), "x".to_owned())].into());
        c
    }

    fn peer(number: u32, id: Option<&str>) -> PeerInfo {
        PeerInfo {
            number,
            id: id.map(|s| SpiffeId::parse(s).expect("id")),
            cidr: None,
        }
    }

    #[test]
    fn foreign_trust_domains_match_only_patterns_naming_them() {
        let c = cluster();
        let foreign = peer(300, Some("spiffe://partner.org/ns/shop/sa/web"));
        let ours = peer(301, Some("spiffe://cluster.local/ns/shop/sa/web"));
        let all_namespaces = PeerMatch::Namespaces(Selector::default());
        assert!(peer_matches(&all_namespaces, &ours, &c));
        assert!(
            !peer_matches(&all_namespaces, &foreign, &c),
            "namespaceSelector is this trust domain's"
        );
        assert!(!peer_matches(
            &PeerMatch::Entity(Entity::Cluster),
            &foreign,
            &c
        ));
        assert!(peer_matches(&PeerMatch::Entity(Entity::Cluster), &ours, &c));
        assert!(peer_matches(&PeerMatch::Entity(Entity::Any), &foreign, &c));
        let theirs = PeerMatch::Identity(
            SpiffePattern::parse("spiffe://partner.org/ns/shop/sa/*").expect("pattern"),
        );
        assert!(peer_matches(&theirs, &foreign, &c));
        assert!(!peer_matches(&theirs, &ours, &c));
    }

    #[test]
    fn entities() {
        let c = cluster();
        let gw = peer(310, Some("spiffe://cluster.local/ns/edge/gateway/public"));
        assert!(peer_matches(&PeerMatch::Entity(Entity::Gateway), &gw, &c));
        assert!(peer_matches(
            &PeerMatch::Entity(Entity::Gateway),
            &peer(INGRESS, None),
            &c
        ));
        assert!(!peer_matches(
            &PeerMatch::Entity(Entity::Gateway),
            &peer(HOST, None),
            &c
        ));
        assert!(
            !peer_matches(&PeerMatch::Namespaces(Selector::default()), &gw, &c),
            "gateways are not workloads"
        );
        // `gateway: {namespace, name}` is that Gateway only: not another, not one of the same
        // name in a foreign trust domain, not a workload whose service account spells it, not
        // the group number.
        let public = PeerMatch::Gateway {
            namespace: "edge".into(),
            name: "public".into(),
        };
        assert!(peer_matches(&public, &gw, &c));
        for other in [
            "spiffe://cluster.local/ns/edge/gateway/internal",
            "spiffe://cluster.local/ns/shop/gateway/public",
            "spiffe://partner.org/ns/edge/gateway/public",
            "spiffe://cluster.local/ns/edge/sa/public",
            "spiffe://cluster.local/ns/edge/gateway/public/x",
        ] {
            assert!(
                !peer_matches(&public, &peer(311, Some(other)), &c),
                "{other}"
            );
        }
        assert!(!peer_matches(&public, &peer(INGRESS, None), &c));
        assert!(peer_matches(
            &PeerMatch::Entity(Entity::World),
            &peer(WORLD, None),
            &c
        ));
        assert!(!peer_matches(
            &PeerMatch::Entity(Entity::Cluster),
            &peer(WORLD, None),
            &c
        ));
        assert!(peer_matches(
            &PeerMatch::Entity(Entity::Cluster),
            &peer(HOST, None),
            &c
        ));
    }
}
