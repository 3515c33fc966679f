//! The committed CRD must be exactly what the Rust types generate.
//! Regenerate with `SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd`.

use kube::CustomResourceExt as _;

#[test]
fn committed_crd_matches_the_types() {
    let generated = format!(
        "# Generated from policies/src/resource.rs; do not edit.\n# Regenerate: SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd\n{}",
        serde_yaml::to_string(&signet_policy::IdentityPolicy::crd()).expect("CRD serialises")
    );
    // Where the crate is now (cargo sets it when running tests), not where it was compiled.
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let path = &format!("{dir}/../deploy/crds/identitypolicies.signet.dev.yaml");
    if std::env::var_os("SIGNET_UPDATE_CRDS").is_some() {
        std::fs::write(path, &generated).expect("write CRD");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} drifted from the IdentityPolicy types; regenerate it with \
         SIGNET_UPDATE_CRDS=1 cargo test -p signet-policy --test crd"
    );
}
