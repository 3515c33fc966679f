//! Compiler behaviour beyond agreement with the evaluator: determinism, stable rule ids, diffs
//! that touch only what changed, and the capacity limit.

use std::collections::BTreeMap;
use std::path::Path;

use signet_ca::TrustDomain;
use signet_policy::cluster::{Cluster, Workload};
use signet_policy::compile::{self, Action, CompileError, Compiled, Input};
use signet_policy::eval::Direction;
use signet_policy::identity::{IdentityAllocator, MemoryAllocator, WORLD};
use signet_policy::model::Policy;
use signet_policy::resource::Protocol;

fn policy(ns: &str, name: &str, app: &str, from_sa: &str, port: u16) -> Policy {
    let yaml = format!(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - from: [{{identity: \"spiffe://cluster.local/ns/{ns}/sa/{from_sa}\"}}]\n    ports: [{{port: {port}}}]\n"
    );
    let (mut p, d) = signet_policy::parse::parse_str(Path::new("t.yaml"), &yaml);
    assert!(d.is_empty(), "{d:?}");
    p.remove(0).policy
}

struct World {
    cluster: Cluster,
    identities: BTreeMap<signet_ca::SpiffeId, u32>,
}

fn world(apps: usize) -> World {
    let mut cluster = Cluster::new(TrustDomain::parse("cluster.local").expect("td"));
    let alloc = MemoryAllocator::default();
    for i in 0..apps {
        let w = cluster
            .add_workload(
                "shop",
                &format!("app{i}-0"),
                [("app".to_owned(), format!("app{i}"))].into(),
                &format!("sa{i}"),
                Some("node-a"),
                vec![],
            )
            .expect("workload")
            .identity
            .clone();
        alloc.allocate(&w).expect("alloc");
    }
    World {
        identities: alloc.snapshot().expect("snapshot"),
        cluster,
    }
}

fn run(
    w: &World,
    policies: &[Policy],
    capacity: usize,
    previous: Option<&Compiled>,
) -> Result<Compiled, CompileError> {
    let sorted = compile::sorted_policies(policies);
    let endpoints: Vec<(u32, &Workload)> = w
        .cluster
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| (i as u32 + 1, w))
        .collect();
    compile::compile(&Input {
        cluster: &w.cluster,
        policies: &sorted,
        identities: &w.identities,
        endpoints: &endpoints,
        capacity,
        previous,
    })
}

#[test]
fn compilation_is_deterministic_and_entries_make_sense() {
    let w = world(3);
    let policies = vec![policy("shop", "p1", "app1", "sa0", 8080)];
    let a = run(&w, &policies, 1000, None).expect("compile");
    let b = run(&w, &policies, 1000, None).expect("compile");
    assert_eq!(a, b);
    // app1 (endpoint 2): ingress from sa0 on 8080/TCP allowed, everything else default-denied.
    let sa0 = w
        .identities
        .values()
        .copied()
        .min()
        .expect("sa0 is allocated first");
    let (_, e) = a
        .lookup(2, Direction::Ingress, sa0, 8080, Protocol::Tcp)
        .expect("entry");
    assert_eq!(e.action, Action::Allow);
    assert_eq!(
        a.rule(e.rule).expect("rule").to_string(),
        "shop/p1 ingress[0]"
    );
    let (_, e) = a
        .lookup(2, Direction::Ingress, sa0, 8081, Protocol::Tcp)
        .expect("entry");
    assert_eq!((e.action, e.rule), (Action::Deny, 0));
    let (_, e) = a
        .lookup(2, Direction::Ingress, WORLD, 8080, Protocol::Tcp)
        .expect("entry");
    assert_eq!(e.action, Action::Deny);
    // Other endpoints and egress have no entries: default allow.
    assert!(
        a.lookup(1, Direction::Ingress, sa0, 8080, Protocol::Tcp)
            .is_none()
    );
    assert!(
        a.lookup(2, Direction::Egress, sa0, 8080, Protocol::Tcp)
            .is_none()
    );
}

#[test]
fn editing_one_policy_touches_only_its_endpoints() {
    let w = world(20);
    let mut policies: Vec<Policy> = (0..20)
        .map(|i| policy("shop", &format!("p{i:02}"), &format!("app{i}"), "sa0", 8080))
        .collect();
    let old = run(&w, &policies, 100_000, None).expect("compile");
    // Change p05: another port, and one more rule (which must not renumber later policies).
    let mut changed = policy("shop", "p05", "app5", "sa0", 9090);
    changed.ingress.as_mut().expect("ingress").push(
        policy("shop", "x", "app5", "sa1", 7070)
            .ingress
            .expect("ingress")
            .remove(0),
    );
    policies[5] = changed;
    let new = run(&w, &policies, 100_000, Some(&old)).expect("compile");
    let d = compile::diff(&old, &new);
    assert!(!d.is_empty());
    let app5 = w
        .cluster
        .workloads
        .iter()
        .position(|x| x.name == "app5-0")
        .expect("app5") as u32
        + 1;
    assert_eq!(
        d.endpoints(),
        [app5].into(),
        "only app5's entries change: {d:?}"
    );
    for (id, r) in &old.rules {
        if r.policy != "shop/p05" {
            assert_eq!(
                new.rules.get(id),
                Some(r),
                "rule ids of untouched policies are kept"
            );
        }
    }
    assert!(compile::diff(&new, &new).is_empty());
}

#[test]
fn exceeding_capacity_names_the_endpoints_and_applies_nothing() {
    let w = world(4);
    let policies: Vec<Policy> = (0..4)
        .map(|i| policy("shop", &format!("p{i}"), &format!("app{i}"), "sa0", 80))
        .collect();
    let needed = run(&w, &policies, usize::MAX, None)
        .expect("compile")
        .entries
        .len();
    let err = run(&w, &policies, needed - 1, None).expect_err("over capacity");
    let CompileError::Capacity {
        needed: n,
        capacity,
        largest,
    } = &err;
    assert_eq!((*n, *capacity), (needed, needed - 1));
    assert!(
        largest
            .iter()
            .all(|(name, count)| name.starts_with("shop/app") && *count > 0),
        "{err}"
    );
    assert!(err.to_string().contains("Nothing was applied"), "{err}");
}
