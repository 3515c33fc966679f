//! One model, two sources: the example cluster read from manifests (`load_state`, the standalone
//! file source) and the same manifests as typed Kubernetes objects (`state_from_objects`, what
//! the Kubernetes source's reflectors hold) must be the same state: the same workloads, the
//! same namespace labels, and the same compiled datapath entries for every node.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use signet_ca::TrustDomain;
use signet_policy::cluster::{Objects, State, Workload, load_state, state_from_objects};
use signet_policy::compile::{self, Compiled, Input};
use signet_policy::identity::{IdentityAllocator, MemoryAllocator};
use signet_policy::model::Policy;

fn examples() -> PathBuf {
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(dir).join("examples")
}

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").expect("td")
}

/// Every document of the examples, deserialised into the types the API server would send.
fn objects() -> Objects {
    let mut objects = Objects::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples())
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("Namespace") => objects
                    .namespaces
                    .push(serde_yaml::from_value::<Namespace>(value).expect("Namespace")),
                Some("Pod") => objects
                    .pods
                    .push(serde_yaml::from_value::<Pod>(value).expect("Pod")),
                Some("IdentityPolicy") => objects
                    .policies
                    .push(serde_yaml::from_value(value).expect("IdentityPolicy")),
                _ => {}
            }
        }
    }
    objects
}

/// Compiles `state` for the pods of `node`.
fn compile_for(state: &State, node: &str) -> Compiled {
    let alloc = MemoryAllocator::default();
    for w in &state.cluster.workloads {
        alloc.allocate(&w.identity).expect("allocate");
    }
    let identities = alloc.snapshot().expect("snapshot");
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let endpoints: Vec<(u32, &Workload)> = state
        .cluster
        .workloads
        .iter()
        .enumerate()
        .filter(|(_, w)| w.node.as_deref() == Some(node))
        .map(|(i, w)| (i as u32 + 1, w))
        .collect();
    compile::compile(&Input {
        cluster: &state.cluster,
        policies: &sorted,
        identities: &identities,
        endpoints: &endpoints,
        capacity: 1 << 20,
        previous: None,
    })
    .expect("compiles")
}

#[test]
fn manifests_and_api_objects_give_the_same_state() {
    let from_files = load_state(&examples(), &td()).expect("the examples load");
    let objects = objects();
    let from_api = state_from_objects(&objects, &td()).expect("the objects load");

    assert!(!from_files.cluster.workloads.is_empty());
    assert_eq!(from_files.cluster.workloads, from_api.cluster.workloads);
    for ns in &objects.namespaces {
        let name = ns.metadata.name.as_deref().expect("named");
        assert_eq!(
            from_files.cluster.namespace_labels(name),
            from_api.cluster.namespace_labels(name),
            "namespace {name}"
        );
    }
    let names = |s: &State| -> Vec<String> { s.policies.iter().map(|l| l.policy.id()).collect() };
    assert_eq!(names(&from_files), names(&from_api));
    assert_eq!(from_files.policies.len(), objects.policies.len());

    let nodes: BTreeMap<String, ()> = from_files
        .cluster
        .workloads
        .iter()
        .filter_map(|w| Some((w.node.clone()?, ())))
        .collect();
    assert!(!nodes.is_empty());
    for node in nodes.keys() {
        let (a, b) = (compile_for(&from_files, node), compile_for(&from_api, node));
        assert!(!a.entries.is_empty(), "{node} has entries");
        assert_eq!(a, b, "compiled entries for {node}");
    }
}

#[test]
fn an_invalid_api_object_is_named_with_its_field_path_and_nothing_loads() {
    let mut objects = objects();
    let mut bad = objects.policies[0].clone();
    bad.metadata.name = Some("broken".into());
    bad.spec.ingress = Some(vec![signet_policy::resource::IngressRule {
        from: vec![signet_policy::resource::Peer {
            identity: Some("not-a-spiffe-id".into()),
            ..Default::default()
        }],
        ..Default::default()
    }]);
    objects.policies.push(bad);
    let errors = state_from_objects(&objects, &td()).expect_err("refused whole");
    let ns = objects.policies[0]
        .metadata
        .namespace
        .clone()
        .unwrap_or_default();
    assert!(
        errors.iter().any(|e| e.starts_with(&format!(
            "IdentityPolicy {ns}/broken: `spec.ingress[0].from[0].identity`"
        ))),
        "{errors:?}"
    );
}
