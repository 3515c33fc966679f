//! The committed CRD must be exactly what the Rust types generate.
//! Regenerate with `SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd`.

use kube::CustomResourceExt as _;

/// Compares (or, with `SIGNET_UPDATE_CRDS` set, rewrites) one committed CRD.
fn check(file: &str, source: &str, crd: &impl serde::Serialize) {
    let generated = format!(
        "# Generated from {source}; do not edit.\n# Regenerate: SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd\n{}",
        serde_yaml::to_string(crd).expect("CRD serialises")
    );
    // Where the crate is now (cargo sets it when running tests), not where it was compiled.
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let path = &format!("{dir}/../deploy/crds/{file}");
    if std::env::var_os("SIGNET_UPDATE_CRDS").is_some() {
        std::fs::write(path, &generated).expect("write CRD");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} drifted from the types in {source}; regenerate it with \
         SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd"
    );
}

#[test]
fn committed_crds_match_the_types() {
    check(
        "identitypolicies.signet.dev.yaml",
        "policies/src/resource.rs",
        &signet_policy::IdentityPolicy::crd(),
    );
    check(
        "signetidentities.signet.dev.yaml",
        "policies/src/identity.rs",
        &signet_policy::SignetIdentity::crd(),
    );
    check(
        "trafficpolicies.signet.dev.yaml",
        "policies/src/traffic.rs",
        &signet_policy::TrafficPolicy::crd(),
    );
    check(
        "loadbalancerippools.signet.dev.yaml",
        "policies/src/lbipam.rs",
        &signet_policy::LoadBalancerIPPool::crd(),
    );
    check(
        "l2announcementpolicies.signet.dev.yaml",
        "policies/src/lbipam.rs",
        &signet_policy::L2AnnouncementPolicy::crd(),
    );
}
