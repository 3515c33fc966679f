//! Compile benchmark (not a test): 1,000 policies over 5,000 pods and 2,000 identities, then one
//! policy edited and recompiled incrementally with its diff.
//!
//!     cargo bench -p signet-policy --bench compile
//!
//! Prints times, entry counts and the ratio of the incremental update to the full compile
//! measured in the same run.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use signet_ca::TrustDomain;
use signet_policy::cluster::{Cluster, Workload};
use signet_policy::compile::{self, Input};
use signet_policy::identity::{IdentityAllocator, MemoryAllocator};
use signet_policy::model::Policy;
use signet_policy::resource::{
    Entity, HttpRule, IdentityPolicy, IdentityPolicySpec, IngressDenyRule, IngressRule, Mode,
    PathMatch, Peer, PortSpec, Protocol,
};

const NAMESPACES: usize = 50;
const PODS: usize = 5_000;
const SERVICE_ACCOUNTS: usize = 2_000;
const POLICIES: usize = 1_000;
const APPS_PER_NS: usize = 20;

/// A small deterministic generator, so every run measures the same input.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn labels(k: &str, v: String) -> BTreeMap<String, String> {
    [(k.to_owned(), v)].into()
}

fn policy(i: usize, rng: &mut Lcg, port_shift: u16) -> Policy {
    let ns = i % NAMESPACES;
    let app = (i / NAMESPACES) % APPS_PER_NS;
    let mut from = Vec::new();
    for _ in 0..1 + rng.next(3) {
        let peer = match rng.next(10) {
            0 => Peer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(labels("team", format!("t{}", rng.next(10)))),
                    ..Default::default()
                }),
                ..Default::default()
            },
            1 => Peer {
                entity: Some(Entity::Gateway),
                ..Default::default()
            },
            2 => Peer {
                identity: Some(format!(
                    "spiffe://cluster.local/ns/ns{}/sa/*",
                    rng.next(NAMESPACES)
                )),
                ..Default::default()
            },
            _ => {
                let sa = rng.next(SERVICE_ACCOUNTS);
                Peer {
                    identity: Some(format!(
                        "spiffe://cluster.local/ns/ns{}/sa/sa{sa}",
                        sa % NAMESPACES
                    )),
                    ..Default::default()
                }
            }
        };
        from.push(peer);
    }
    let port = 8000 + rng.next(20) as u16 + port_shift;
    let http = (rng.next(5) == 0).then(|| {
        vec![HttpRule {
            methods: vec!["GET".into()],
            paths: vec![PathMatch {
                prefix: Some("/api".into()),
                ..Default::default()
            }],
            headers: vec![],
        }]
    });
    let resource = IdentityPolicy {
        metadata: ObjectMeta {
            name: Some(format!("p{i}")),
            namespace: Some(format!("ns{ns}")),
            ..Default::default()
        },
        spec: IdentityPolicySpec {
            selector: LabelSelector {
                match_labels: Some(labels("app", format!("a{app}"))),
                ..Default::default()
            },
            mode: if rng.next(20) == 0 {
                Mode::Audit
            } else {
                Mode::Enforce
            },
            ingress: Some(vec![IngressRule {
                from,
                ports: vec![PortSpec {
                    port,
                    protocol: Protocol::Tcp,
                }],
                http,
            }]),
            egress: None,
            path_normalization: Default::default(),
            ingress_deny: if rng.next(10) == 0 {
                vec![IngressDenyRule {
                    from: vec![Peer {
                        entity: Some(Entity::World),
                        ..Default::default()
                    }],
                    ports: vec![],
                }]
            } else {
                vec![]
            },
            egress_deny: vec![],
        },
        status: None,
    };
    Policy::from_resource(&resource).expect("generated policies are valid")
}

fn main() {
    let mut rng = Lcg(7);
    let mut cluster = Cluster::new(TrustDomain::parse("cluster.local").expect("td"));
    for ns in 0..NAMESPACES {
        cluster.add_namespace(&format!("ns{ns}"), labels("team", format!("t{}", ns % 10)));
    }
    let alloc = MemoryAllocator::default();
    for i in 0..PODS {
        let ns = i % NAMESPACES;
        let app = (i / NAMESPACES) % APPS_PER_NS;
        // Service accounts are spread so every one of the 2,000 has pods.
        let sa = (i % SERVICE_ACCOUNTS) / NAMESPACES * NAMESPACES + ns;
        let w = cluster
            .add_workload(
                &format!("ns{ns}"),
                &format!("pod{i}"),
                labels("app", format!("a{app}")),
                &format!("sa{sa}"),
                Some("node-a"),
                vec![],
            )
            .expect("workload");
        let id = w.identity.clone();
        alloc.allocate(&id).expect("alloc");
    }
    let identities = alloc.snapshot().expect("snapshot");
    let mut policies: Vec<Policy> = (0..POLICIES).map(|i| policy(i, &mut rng, 0)).collect();
    let endpoints: Vec<(u32, &Workload)> = cluster
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (i as u32 + 1, w))
        .collect();
    println!(
        "input: {} policies, {} pods, {} identities, {} namespaces",
        policies.len(),
        endpoints.len(),
        identities.len(),
        NAMESPACES
    );

    let sorted = compile::sorted_policies(&policies);
    let t = Instant::now();
    let full = compile::compile(&Input {
        cluster: &cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity: usize::MAX,
        previous: None,
    })
    .expect("compile");
    let full_time = t.elapsed();
    println!(
        "full compile:        {:>9.1} ms   {} entries, {} L7 tables, {} rules",
        full_time.as_secs_f64() * 1e3,
        full.entries.len(),
        full.l7.len(),
        full.rules.len()
    );

    // Edit one policy: new port. Recompile only what it selects (before or after).
    let edited = 123;
    let old_policy = policies[edited].clone();
    policies[edited] = policy(edited, &mut Lcg(99), 1000);
    let sorted = compile::sorted_policies(&policies);
    let mut current = full.clone();
    let t = Instant::now();
    let affected = compile::affected_endpoints(&endpoints, &[&old_policy, &policies[edited]]);
    let diff = compile::update(
        &mut current,
        &Input {
            cluster: &cluster,
            policies: &sorted,
            identities: &identities,
            endpoints: &endpoints,
            capacity: usize::MAX,
            previous: None,
        },
        &affected,
    )
    .expect("update");
    let update_time = t.elapsed();
    println!(
        "one-policy update:   {:>9.3} ms   {} endpoints recompiled, diff {} (+{} ~{} -{}) touching {} endpoints",
        update_time.as_secs_f64() * 1e3,
        affected.len(),
        diff.len(),
        diff.added.len(),
        diff.changed.len(),
        diff.removed.len(),
        diff.endpoints().len()
    );

    // The incremental result must equal a full recompile of the edited set.
    let t = Instant::now();
    let again = compile::compile(&Input {
        cluster: &cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity: usize::MAX,
        previous: Some(&full),
    })
    .expect("compile");
    let again_time = t.elapsed();
    assert_eq!(
        again.entries, current.entries,
        "incremental update equals a full recompile"
    );
    let full_diff = compile::diff(&full, &again);
    println!(
        "full recompile+diff: {:>9.1} ms   diff {} entries (same as the update's: {})",
        again_time.as_secs_f64() * 1e3 + 0.0,
        full_diff.len(),
        full_diff == diff
    );
    println!(
        "update / full compile: {:.4}x",
        update_time.as_secs_f64() / full_time.as_secs_f64()
    );
}
