//! Copies the TLS Secrets that Signet's Gateways reference into the agents' namespace, so node
//! agents can serve them without cluster-wide Secret access (Cilium does the same). A Secret is
//! copied only when the Gateway may use it: in the Gateway's namespace, or allowed by a
//! ReferenceGrant (`from` Gateway in that namespace, `to` Secret). Copies carry their origin in
//! annotations, the agent reads them back as the original; copies no longer referenced are
//! deleted. The CA runs this because it is the one cluster-level Signet component.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams};

/// Annotations naming a copy's origin, and the label that marks copies.
pub use crate::kubernetes::{
    TLS_COPY_SOURCE_NAME as SOURCE_NAME, TLS_COPY_SOURCE_NAMESPACE as SOURCE_NAMESPACE,
};
pub const COPY_LABEL: &str = "signet.dev/gateway-tls-copy";

/// The copy's name for Secret `ns/name` (both DNS labels or subdomains, so the result is one).
pub fn copy_name(ns: &str, name: &str) -> String {
    format!("gateway-tls.{ns}.{name}")
}

/// `(namespace, name)` of every Secret a Signet Gateway may use: each HTTPS listener's
/// `certificateRefs` to core Secrets, in the Gateway's namespace or granted by a ReferenceGrant.
pub fn wanted(gateways: &[DynamicObject], grants: &[DynamicObject]) -> BTreeSet<(String, String)> {
    let granted = |from_ns: &str, to_ns: &str, name: &str| {
        grants.iter().any(|g| {
            g.metadata.namespace.as_deref() == Some(to_ns)
                && g.data["spec"]["from"].as_array().is_some_and(|f| {
                    f.iter().any(|f| {
                        f["group"] == "gateway.networking.k8s.io"
                            && f["kind"] == "Gateway"
                            && f["namespace"] == from_ns
                    })
                })
                && g.data["spec"]["to"].as_array().is_some_and(|t| {
                    t.iter().any(|t| {
                        t["group"] == ""
                            && t["kind"] == "Secret"
                            && t["name"].as_str().is_none_or(|n| n == name)
                    })
                })
        })
    };
    let mut out = BTreeSet::new();
    for gw in gateways {
        let Some(gns) = gw.metadata.namespace.as_deref() else {
            continue;
        };
        for listener in gw.data["spec"]["listeners"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for r in listener["tls"]["certificateRefs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let (group, kind) = (
                    r["group"].as_str().unwrap_or(""),
                    r["kind"].as_str().unwrap_or("Secret"),
                );
                let Some(name) = r["name"].as_str() else {
                    continue;
                };
                let ns = r["namespace"].as_str().unwrap_or(gns);
                if group.is_empty() && kind == "Secret" && (ns == gns || granted(gns, ns, name)) {
                    out.insert((ns.to_owned(), name.to_owned()));
                }
            }
        }
    }
    out
}

/// Makes the copies in `copy_ns` exactly the TLS Secrets in `wanted` (that exist).
pub async fn sync(
    client: &kube::Client,
    copy_ns: &str,
    wanted: &BTreeSet<(String, String)>,
) -> Result<usize, kube::Error> {
    let copies: Api<Secret> = Api::namespaced(client.clone(), copy_ns);
    let mut kept = BTreeSet::new();
    for (ns, name) in wanted {
        let source: Api<Secret> = Api::namespaced(client.clone(), ns);
        let Some(secret) = source.get_opt(name).await? else {
            continue; // the Gateway's status says the reference does not resolve
        };
        if secret.type_.as_deref() != Some("kubernetes.io/tls") {
            continue;
        }
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(copy_name(ns, name)),
                namespace: Some(copy_ns.to_owned()),
                labels: Some(BTreeMap::from([(COPY_LABEL.to_owned(), "true".to_owned())])),
                annotations: Some(BTreeMap::from([
                    (SOURCE_NAMESPACE.to_owned(), ns.clone()),
                    (SOURCE_NAME.to_owned(), name.clone()),
                ])),
                ..ObjectMeta::default()
            },
            type_: secret.type_.clone(),
            data: secret.data.clone(),
            ..Secret::default()
        };
        let mut body = serde_json::to_value(&copy).map_err(kube::Error::SerdeError)?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "Secret".into();
        copies
            .patch(
                &copy_name(ns, name),
                &PatchParams::apply("signet-ca").force(),
                &Patch::Apply(body),
            )
            .await?;
        kept.insert(copy_name(ns, name));
    }
    let existing = copies
        .list(&ListParams::default().labels(&format!("{COPY_LABEL}=true")))
        .await?;
    for old in existing.items {
        if let Some(name) = old.metadata.name
            && !kept.contains(&name)
        {
            copies.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(kept.len())
}
