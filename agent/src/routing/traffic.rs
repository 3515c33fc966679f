//! `TrafficPolicy` attachment: each policy's `targetRefs` name Services of its namespace; a
//! Service gets the one policy that targets it (the oldest, then by name, as Gateway API
//! resolves conflicting policies) and the others are told so in their status. A policy with an
//! invalid field is refused whole, naming the field, and the Service keeps the defaults.
//!
//! Nothing here owns a socket: the proxy reads the result per request (`forward`).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use signet_policy::traffic::Checked;

use super::model::{Condition, Resources, cond, created, ns_of};

/// Status of one TrafficPolicy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub namespace: String,
    pub name: String,
    pub conditions: Vec<Condition>,
}

/// (namespace, Service name) → the policy in force for it.
#[derive(Debug, Default)]
pub struct ServicePolicies(HashMap<(String, String), Arc<Checked>>);

impl ServicePolicies {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<Checked>> {
        self.0.get(&(namespace.to_owned(), name.to_owned()))
    }
}

/// Attaches every policy of `res`, with its status.
pub fn build(res: &Resources) -> (ServicePolicies, Vec<PolicyStatus>) {
    let mut policies: Vec<_> = res.traffic_policies.iter().collect();
    policies.sort_by_key(|p| {
        (
            created(&p.metadata),
            ns_of(&p.metadata),
            p.metadata.name.clone().unwrap_or_default(),
        )
    });
    let mut attached: HashMap<(String, String), (String, Arc<Checked>)> = HashMap::new();
    let mut status = vec![];
    for p in policies {
        let ns = ns_of(&p.metadata);
        let name = p.metadata.name.clone().unwrap_or_default();
        let conditions = match p.spec.check() {
            Err(problems) => vec![cond("Accepted", false, "Invalid", problems.join("; "))],
            Ok(checked) => {
                let checked = Arc::new(checked);
                let mut missing = vec![];
                let mut conflicts = vec![];
                for t in &p.spec.target_refs {
                    let key = (ns.clone(), t.name.clone());
                    if !res.services.contains_key(&key) {
                        missing.push(format!("Service {ns}/{}", t.name));
                    } else if let Some((holder, _)) = attached.get(&key) {
                        conflicts.push(format!(
                            "Service {ns}/{} already has TrafficPolicy {holder}",
                            t.name
                        ));
                    } else {
                        attached.insert(key, (format!("{ns}/{name}"), checked.clone()));
                    }
                }
                if !conflicts.is_empty() {
                    vec![cond("Accepted", false, "Conflicted", conflicts.join("; "))]
                } else if !missing.is_empty() {
                    vec![cond(
                        "Accepted",
                        false,
                        "TargetNotFound",
                        format!("{} not found", missing.join(", ")),
                    )]
                } else {
                    vec![cond("Accepted", true, "Accepted", "")]
                }
            }
        };
        status.push(PolicyStatus {
            namespace: ns,
            name,
            conditions,
        });
    }
    let policies = attached.into_iter().map(|(k, (_, c))| (k, c)).collect();
    (ServicePolicies(policies), status)
}
