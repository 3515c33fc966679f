//! Status for `IdentityPolicy` resources in Kubernetes mode: `Valid` (false with each problem's
//! field path) and `InForce` (whether the cluster state it belongs to loaded: one invalid
//! resource keeps the previous state in force for everything, and says so). Written with
//! server-side apply to the status subresource by the one agent holding the status Lease, only
//! when something changed.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use signet_ca::TrustDomain;
use signet_policy::IdentityPolicy;
use signet_policy::model::Policy;

use super::snapshot::ClusterObjects;

/// (type, status, reason, message) of one condition, before timestamps.
type Said = (&'static str, bool, &'static str, String);

/// What to say about every policy: `namespace/name` → its two conditions.
pub fn policy_conditions(
    objects: &ClusterObjects,
    td: &TrustDomain,
) -> BTreeMap<(String, String), [Said; 2]> {
    let state = signet_policy::cluster::state_from_objects(&objects.policy, td);
    let in_force = match &state {
        Ok(_) => (
            "InForce",
            true,
            "Applied",
            "part of the cluster state the agents enforce".to_owned(),
        ),
        Err(errors) => (
            "InForce",
            false,
            "StateRefused",
            format!(
                "the cluster state does not load, so the previous one stays in force: {}",
                errors.first().cloned().unwrap_or_default()
            ),
        ),
    };
    objects
        .policy
        .policies
        .iter()
        .map(|r| {
            let key = (
                r.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                r.metadata.name.clone().unwrap_or_default(),
            );
            let valid = match Policy::from_resource(r) {
                Ok(_) => ("Valid", true, "Valid", String::new()),
                Err(fields) => (
                    "Valid",
                    false,
                    "Invalid",
                    fields
                        .iter()
                        .map(|f| format!("`{}`: {}", f.path, f.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            };
            (key, [valid, in_force.clone()])
        })
        .collect()
}

/// Writes the conditions that changed since the last call (`written` remembers).
pub async fn write(
    client: &kube::Client,
    objects: &ClusterObjects,
    td: &TrustDomain,
    written: &mut BTreeMap<(String, String), [Said; 2]>,
) -> Result<usize, kube::Error> {
    let mut n = 0;
    let generations: BTreeMap<(String, String), Option<i64>> = objects
        .policy
        .policies
        .iter()
        .map(|r| {
            (
                (
                    r.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    r.metadata.name.clone().unwrap_or_default(),
                ),
                r.metadata.generation,
            )
        })
        .collect();
    for (key, said) in policy_conditions(objects, td) {
        if written.get(&key) == Some(&said) {
            continue;
        }
        let now = Time(jiff::Timestamp::now());
        let conditions: Vec<Condition> = said
            .iter()
            .map(|(t, ok, reason, message)| Condition {
                type_: (*t).to_owned(),
                status: if *ok { "True" } else { "False" }.to_owned(),
                reason: (*reason).to_owned(),
                message: message.clone(),
                last_transition_time: now.clone(),
                observed_generation: generations.get(&key).copied().flatten(),
            })
            .collect();
        let body = serde_json::json!({
            "apiVersion": "signet.dev/v1alpha1",
            "kind": "IdentityPolicy",
            "metadata": {"name": key.1, "namespace": key.0},
            "status": {"conditions": conditions},
        });
        Api::<IdentityPolicy>::namespaced(client.clone(), &key.0)
            .patch_status(
                &key.1,
                &PatchParams::apply("signet-agent").force(),
                &Patch::Apply(body),
            )
            .await?;
        written.insert(key, said);
        n += 1;
    }
    Ok(n)
}
