//! The compiled entries, looked up the way the datapath does, must give the same action and the
//! same rule as the reference evaluator, for every endpoint, peer, port, protocol and direction
//! of randomly generated clusters and policy sets.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use proptest::prelude::*;
use signet_ca::{SpiffeId, TrustDomain};
use signet_policy::cidr::{Cidr, longest_match};
use signet_policy::cluster::Cluster;
use signet_policy::compile::{self, Action, Compiled, Input};
use signet_policy::eval::{
    Decision, Direction, PeerInfo, Query, Reason, RuleRef, evaluate_direction,
};
use signet_policy::identity::{
    HEALTH, HOST, INGRESS, IdentityAllocator, MemoryAllocator, REMOTE_NODE, UNMANAGED, WORLD,
};
use signet_policy::model::Policy;
use signet_policy::resource::{
    EgressDenyRule, EgressRule, Entity, HttpRule, IdentityPolicy, IdentityPolicySpec,
    IngressDenyRule, IngressRule, Mode, PathMatch, Peer, PortSpec, Protocol,
};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const APPS: [&str; 3] = ["web", "db", "api"];
const SAS: [&str; 2] = ["sa1", "sa2"];
/// `cidr:` peers: nested, overlapping, carved by `except`, IPv4 and IPv6, and all of IPv4.
const CIDRS: [(&str, &[&str]); 6] = [
    ("203.0.113.0/24", &[]),
    ("203.0.113.128/25", &[]),
    ("203.0.113.0/24", &["203.0.113.192/26"]),
    ("198.51.100.0/24", &["198.51.100.0/28"]),
    ("2001:db8::/32", &["2001:db8:1::/48"]),
    ("0.0.0.0/0", &["10.0.0.0/8"]),
];
/// World destinations the datapath knows by address only.
const ADDRESSES: [&str; 9] = [
    "203.0.113.5",
    "203.0.113.130",
    "203.0.113.200",
    "198.51.100.3",
    "198.51.100.77",
    "192.0.2.1",
    "2001:db8::1",
    "2001:db8:1::1",
    "10.1.2.3",
];
const PORTS: [(u16, Protocol); 3] = [
    (80, Protocol::Tcp),
    (443, Protocol::Tcp),
    (53, Protocol::Udp),
];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        prop::sample::select(APPS.to_vec()).prop_map(|app| LabelSelector {
            match_labels: Some(labels(&[("app", app)])),
            ..Default::default()
        }),
        (
            prop::sample::select(vec!["In", "NotIn"]),
            prop::sample::subsequence(APPS.to_vec(), 1..=2)
        )
            .prop_map(|(op, values)| LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app".into(),
                    operator: op.into(),
                    values: Some(values.into_iter().map(str::to_owned).collect()),
                }]),
                ..Default::default()
            }),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    let ns = prop::sample::select(NAMESPACES.to_vec());
    let sa = prop::sample::select(SAS.to_vec());
    prop_oneof![
        (ns.clone(), sa).prop_map(|(ns, sa)| Peer {
            identity: Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")),
            ..Default::default()
        }),
        ns.clone().prop_map(|ns| Peer {
            identity: Some(format!("spiffe://cluster.local/ns/{ns}/sa/*")),
            ..Default::default()
        }),
        Just(Peer {
            identity: Some("spiffe://partner.org/ns/a/sa/sa1".into()),
            ..Default::default()
        }),
        prop::sample::select(vec!["x", "y"]).prop_map(|team| Peer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(labels(&[("team", team)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        Just(Peer {
            namespace_selector: Some(LabelSelector::default()),
            ..Default::default()
        }),
        prop::sample::select(Entity::ALL.to_vec()).prop_map(|e| Peer {
            entity: Some(e),
            ..Default::default()
        }),
        prop::sample::select(CIDRS.to_vec()).prop_map(|(cidr, except)| Peer {
            cidr: Some(cidr.into()),
            except: except.iter().map(|e| (*e).to_owned()).collect(),
            ..Default::default()
        }),
    ]
}

fn ports() -> impl Strategy<Value = Vec<PortSpec>> {
    prop::sample::subsequence(PORTS.to_vec(), 0..=2).prop_map(|v| {
        v.into_iter()
            .map(|(port, protocol)| PortSpec { port, protocol })
            .collect()
    })
}

/// An allow rule: peers, ports, and `http` only where every port is TCP.
fn allow_rule() -> impl Strategy<Value = (Vec<Peer>, Vec<PortSpec>, Option<Vec<HttpRule>>)> {
    (prop::collection::vec(peer(), 1..=3), ports(), any::<bool>()).prop_map(|(peers, ports, l7)| {
        let http_ok = !ports.is_empty() && ports.iter().all(|p| p.protocol == Protocol::Tcp);
        let http = (l7 && http_ok).then(|| {
            vec![HttpRule {
                methods: vec!["GET".into()],
                paths: vec![PathMatch {
                    prefix: Some("/v1".into()),
                    ..Default::default()
                }],
                headers: vec![],
            }]
        });
        (peers, ports, http)
    })
}

fn deny_rule() -> impl Strategy<Value = (Vec<Peer>, Vec<PortSpec>)> {
    (prop::collection::vec(peer(), 1..=2), ports())
}

fn policy(i: usize) -> impl Strategy<Value = IdentityPolicy> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        selector(),
        prop::bool::weighted(0.25),
        prop::option::of(prop::collection::vec(allow_rule(), 0..=3)),
        prop::option::of(prop::collection::vec(allow_rule(), 0..=2)),
        prop::collection::vec(deny_rule(), 0..=1),
        prop::collection::vec(deny_rule(), 0..=1),
    )
        .prop_map(
            move |(ns, selector, audit, ingress, egress, ingress_deny, egress_deny)| {
                IdentityPolicy {
                    metadata: ObjectMeta {
                        name: Some(format!("p{i}")),
                        namespace: Some(ns.into()),
                        ..Default::default()
                    },
                    spec: IdentityPolicySpec {
                        path_normalization: Default::default(),
                        selector,
                        mode: if audit { Mode::Audit } else { Mode::Enforce },
                        ingress: ingress.map(|rules| {
                            rules
                                .into_iter()
                                .map(|(from, ports, http)| IngressRule { from, ports, http })
                                .collect()
                        }),
                        egress: egress.map(|rules| {
                            rules
                                .into_iter()
                                .map(|(to, ports, _)| EgressRule {
                                    to,
                                    ports,
                                    // Egress `http` rules are refused (not enforced).
                                    http: None,
                                })
                                .collect()
                        }),
                        ingress_deny: ingress_deny
                            .into_iter()
                            .map(|(from, ports)| IngressDenyRule { from, ports })
                            .collect(),
                        egress_deny: egress_deny
                            .into_iter()
                            .map(|(to, ports)| EgressDenyRule { to, ports })
                            .collect(),
                    },
                    status: None,
                }
            },
        )
}

fn policies() -> impl Strategy<Value = Vec<IdentityPolicy>> {
    (0usize..=5).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>())
}

fn workloads() -> impl Strategy<Value = Vec<(&'static str, &'static str, &'static str)>> {
    prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            prop::sample::select(APPS.to_vec()),
            prop::sample::select(SAS.to_vec()),
        ),
        1..=6,
    )
}

fn expected(d: &Decision, ids: &BTreeMap<RuleRef, u32>) -> (Action, u32, Vec<u32>) {
    let id = |r: &Reason| match r {
        Reason::Rule(r) => ids[r],
        _ => 0,
    };
    match d {
        Decision::Allow(r) => (Action::Allow, id(r), vec![]),
        Decision::Deny(r) => (Action::Deny, id(r), vec![]),
        Decision::Audit(r) => (Action::Audit, id(r), vec![]),
        Decision::L7(rules) => (
            Action::L7,
            ids[&rules[0]],
            rules.iter().map(|r| ids[r]).collect(),
        ),
    }
}

/// The cluster of `pods` with its allocated identities.
fn world(pods: &[(&str, &str, &str)], team_b: &str) -> (Cluster, BTreeMap<SpiffeId, u32>) {
    let td = TrustDomain::parse("cluster.local").expect("td");
    let mut cluster = Cluster::new(td);
    cluster.add_namespace("a", labels(&[("team", "x")]));
    cluster.add_namespace("b", labels(&[("team", team_b)]));
    for (i, (ns, app, sa)) in pods.iter().enumerate() {
        cluster
            .add_workload(
                ns,
                &format!("pod{i}"),
                labels(&[("app", app)]),
                sa,
                Some("node-a"),
                vec![],
            )
            .expect("workload");
    }
    let alloc = MemoryAllocator::default();
    for w in &cluster.workloads {
        alloc.allocate(&w.identity).expect("alloc");
    }
    for extra in [
        "spiffe://partner.org/ns/a/sa/sa1",
        "spiffe://cluster.local/ns/c/gateway/edge",
        "spiffe://cluster.local/ns/b/sa/remote-only",
    ] {
        alloc
            .allocate(&SpiffeId::parse(extra).expect("id"))
            .expect("alloc");
    }
    (cluster, alloc.snapshot().expect("snapshot"))
}

/// Every workload of `cluster` as an endpoint, numbered from 1.
fn endpoints_of(cluster: &Cluster) -> Vec<(u32, &signet_policy::cluster::Workload)> {
    cluster
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (i as u32 + 1, w))
        .collect()
}

fn models(resources: &[IdentityPolicy]) -> Result<Vec<Policy>, TestCaseError> {
    resources
        .iter()
        .map(|r| Policy::from_resource(r).map_err(|e| TestCaseError::fail(format!("{e:?}"))))
        .collect()
}

/// A compilation with rule ids replaced by the rules they stand for, and `cidr:` identity
/// numbers by the prefixes they stand for: two compilations that number rules or prefixes
/// differently but decide alike compare equal.
type Normalized = (
    BTreeMap<(u32, String, String, u16, PeerKey), (Action, Option<RuleRef>)>,
    BTreeMap<(u32, String, String, u16, PeerKey), Vec<Option<RuleRef>>>,
    Vec<Cidr>,
);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Number(u32),
    Prefix(Cidr),
}

fn normalized(c: &Compiled) -> Normalized {
    let rule = |id: u32| c.rules.get(&id).cloned();
    let prefixes: BTreeMap<u32, Cidr> = c.cidrs.iter().map(|(p, n)| (*n, *p)).collect();
    let key = |k: &compile::Key| {
        let peer = prefixes
            .get(&k.peer)
            .map_or(PeerKey::Number(k.peer), |p| PeerKey::Prefix(*p));
        (
            k.endpoint,
            k.direction.name().to_owned(),
            k.proto.name().to_owned(),
            k.port,
            peer,
        )
    };
    (
        c.entries
            .iter()
            .map(|(k, e)| (key(k), (e.action, rule(e.rule))))
            .collect(),
        c.l7.iter()
            .map(|(k, ids)| (key(k), ids.iter().map(|id| rule(*id)).collect()))
            .collect(),
        c.cidrs.keys().copied().collect(),
    )
}

/// The agent's path: the compilation of `before`, then `compile::next` to `after`, which must
/// decide exactly as a full compilation of `after` does.
fn check_incremental(
    before: &[IdentityPolicy],
    after: &[IdentityPolicy],
    pods: &[(&str, &str, &str)],
    team_b: &str,
) -> Result<(), TestCaseError> {
    let (cluster, identities) = world(pods, team_b);
    let endpoints = endpoints_of(&cluster);
    let (old, new) = (models(before)?, models(after)?);
    let (old_sorted, new_sorted) = (
        compile::sorted_policies(&old),
        compile::sorted_policies(&new),
    );
    let input = |policies| Input {
        cluster: &cluster,
        policies,
        identities: &identities,
        endpoints: &endpoints,
        capacity: usize::MAX,
        previous: None,
    };
    let first =
        compile::compile(&input(&old_sorted)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let made = compile::Made {
        compiled: &first,
        input: input(&old_sorted),
    };
    let incremental = compile::next(Some(made), &input(&new_sorted))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let full =
        compile::compile(&input(&new_sorted)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(normalized(&incremental), normalized(&full));
    Ok(())
}

fn check(
    resources: &[IdentityPolicy],
    pods: &[(&str, &str, &str)],
    team_b: &str,
) -> Result<usize, TestCaseError> {
    let (cluster, identities) = world(pods, team_b);
    let models = models(resources)?;
    let sorted = compile::sorted_policies(&models);
    let endpoints = endpoints_of(&cluster);
    let compiled: Compiled = compile::compile(&Input {
        cluster: &cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity: usize::MAX,
        previous: None,
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let ids: BTreeMap<RuleRef, u32> = compiled
        .rules
        .iter()
        .map(|(id, r)| (r.clone(), *id))
        .collect();

    let mut peers: Vec<PeerInfo> = [HOST, WORLD, UNMANAGED, HEALTH, REMOTE_NODE, INGRESS]
        .into_iter()
        .map(|number| PeerInfo {
            number,
            id: None,
            cidr: None,
        })
        .collect();
    peers.extend(identities.iter().map(|(id, n)| PeerInfo {
        number: *n,
        id: Some(id.clone()),
        cidr: None,
    }));
    // What the datapath looks up (the number) and what the evaluator is asked about (the peer):
    // the same for identities; for a world address, the identity of the longest compiled prefix
    // containing it against the address itself.
    let mut queries: Vec<(u32, PeerInfo)> = peers.into_iter().map(|p| (p.number, p)).collect();
    for addr in ADDRESSES {
        let ip: std::net::IpAddr = addr.parse().expect("ip");
        let number = longest_match(compiled.cidrs.keys(), ip).map_or(WORLD, |c| compiled.cidrs[c]);
        let asked = PeerInfo {
            number: WORLD,
            id: None,
            cidr: Some(Cidr::host(ip)),
        };
        queries.push((number, asked));
    }
    let mut flows = 0;
    for (endpoint, w) in &endpoints {
        for (number, peer) in &queries {
            // Protocols without ports (ICMP echo and the rest) are looked up at port 0.
            let cells = [80u16, 443, 53, 8080]
                .into_iter()
                .flat_map(|port| [(port, Protocol::Tcp), (port, Protocol::Udp)])
                .chain([(0, Protocol::Other)]);
            for (port, proto) in cells {
                {
                    for dir in [Direction::Ingress, Direction::Egress] {
                        let q = Query {
                            peer,
                            port,
                            proto,
                            dir,
                        };
                        let want = expected(&evaluate_direction(&sorted, w, &q, &cluster), &ids);
                        let got = match compiled.lookup(*endpoint, dir, *number, port, proto) {
                            Some((key, e)) => (
                                e.action,
                                e.rule,
                                compiled.l7.get(&key).cloned().unwrap_or_default(),
                            ),
                            None => (Action::Allow, 0, vec![]),
                        };
                        prop_assert_eq!(
                            &got,
                            &want,
                            "{} {} peer {} ({:?} {:?}) port {}/{}",
                            w.key(),
                            dir.name(),
                            number,
                            peer.id,
                            peer.cidr,
                            port,
                            proto.name()
                        );
                        flows += 1;
                    }
                }
            }
        }
    }
    Ok(flows)
}

/// The case the property test found: an `http` rule added or dropped beside one that still
/// decides the entry. The map entry keeps its action and rule, so only the L7 list changes; the
/// incremental path once kept the old list, which, for a dropped rule, went on admitting what
/// that rule allowed.
#[test]
fn an_http_rule_added_or_dropped_beside_an_unchanged_one_reaches_the_incremental_compilation() {
    let policy = |name: &str, path: &str| -> IdentityPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\n\
             metadata: {{name: {name}, namespace: c}}\n\
             spec:\n  selector: {{matchLabels: {{app: web}}}}\n  ingress:\n\
             \x20 - from: [{{entity: any}}]\n    ports: [{{port: 80}}]\n    http: [{{methods: [GET], paths: [{{prefix: {path}}}]}}]\n"
        ))
        .expect("policy")
    };
    let (p0, p1) = (policy("p0", "/a/"), policy("p1", "/b/"));
    let pods = [("c", "web", "sa1")];
    check_incremental(
        std::slice::from_ref(&p0),
        &[p0.clone(), p1.clone()],
        &pods,
        "x",
    )
    .expect("added");
    check_incremental(&[p0.clone(), p1], &[p0], &pods, "x").expect("dropped");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_incremental_path_decides_as_a_full_compilation(
        before in policies(),
        after in policies(),
        keep in prop::collection::vec(any::<bool>(), 8),
        pods in workloads(),
        team_b in prop::sample::select(vec!["x", "y"]),
    ) {
        // Edits as they come: some policies kept as they were, others replaced or gone.
        let after: Vec<IdentityPolicy> = after
            .into_iter()
            .enumerate()
            .map(|(i, p)| match (keep.get(i), before.get(i)) {
                (Some(true), Some(b)) => b.clone(),
                _ => p,
            })
            .collect();
        check_incremental(&before, &after, &pods, team_b)?;
    }

    #[test]
    fn compiled_lookups_agree_with_the_evaluator(
        resources in policies(),
        pods in workloads(),
        team_b in prop::sample::select(vec!["x", "y"]),
    ) {
        check(&resources, &pods, team_b)?;
    }
}
