//! `GET /debug/state`: what the agent has in force, as JSON, for operators and for tests that
//! wait for a change to be applied instead of sleeping. The agent fills it in (`app.rs`); this
//! module only says its shape.

use serde::Serialize;

/// The agent's state.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DebugState {
    pub node: String,
    /// Snapshots applied before the one in force (the first is 0).
    pub generation: u64,
    /// The cluster state's revision last looked at, applied or not.
    pub revision: String,
    /// Why that revision was refused, when it was (the snapshot in force is older).
    pub refused: Option<String>,
    pub identities: Vec<IdentityState>,
    pub flows: Vec<OpenFlow>,
    /// The IdentityPolicies in force, each with the digest of its spec: a client that applied
    /// a policy can tell when this agent enforces that very version (`policy_digest`).
    pub policies: Vec<PolicyInForce>,
}

/// One IdentityPolicy in force.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInForce {
    /// `namespace/name`.
    pub name: String,
    pub digest: String,
}

/// The first 16 hex digits of the SHA-256 of a policy's spec as JSON.
pub fn policy_digest(policy: &signet_policy::IdentityPolicy) -> String {
    let json = serde_json::to_vec(&policy.spec).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &json);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One workload identity's certificate.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityState {
    pub identity: String,
    /// `initializing`, `available` or `unavailable`.
    pub state: &'static str,
    pub serial: Option<String>,
    /// Unix seconds.
    pub not_after: Option<u64>,
    /// The latest request's failure (the certificate, if any, stays in force).
    pub error: Option<String>,
}

/// One open proxied connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenFlow {
    pub reporter: &'static str,
    pub source: String,
    pub destination: String,
    pub port: u16,
    pub verdict: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> signet_policy::IdentityPolicy {
        serde_yaml::from_str(yaml).expect("an IdentityPolicy")
    }

    #[test]
    fn the_digest_follows_the_spec_and_nothing_else() {
        let a = "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: p, namespace: n}\n\
                 spec: {selector: {matchLabels: {app: x, tier: y}}, ingress: [{from: [{identity: 'spiffe://td/ns/n/sa/c'}]}]}\n";
        // The same spec written otherwise, with other metadata (as the API server returns it).
        let b = "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\n\
                 metadata: {name: p, namespace: n, resourceVersion: '7', uid: u}\n\
                 spec:\n  ingress:\n  - from:\n    - identity: spiffe://td/ns/n/sa/c\n  selector:\n    matchLabels: {tier: y, app: x}\n";
        let c = a.replace("sa/c", "sa/d");
        assert_eq!(policy_digest(&policy(a)), policy_digest(&policy(b)));
        assert_ne!(policy_digest(&policy(a)), policy_digest(&policy(&c)));
        assert_eq!(policy_digest(&policy(a)).len(), 16);
    }
}
