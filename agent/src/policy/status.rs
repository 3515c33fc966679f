//! Status in Kubernetes mode, written with server-side apply to the status subresources by the
//! one agent holding the status Lease, only when something changed:
//! - `IdentityPolicy`: `Valid` (false with each problem's field path) and `InForce` (false for
//!   an invalid version, whose last valid version agents keep enforcing; one invalid policy
//!   does not hold the others back);
//! - Gateways (conditions, and per listener attached routes, conditions and supported kinds) and
//!   HTTPRoutes (conditions per parent), as `routing::model` computes them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use signet_ca::TrustDomain;
use signet_policy::IdentityPolicy;

use crate::state::snapshot::ClusterObjects;

/// (type, status, reason, message) of one condition, before timestamps.
type Said = (&'static str, bool, &'static str, String);

/// What to say about every policy: `namespace/name` → its two conditions. An invalid policy
/// is refused on its own (`lastgood`): the others stay in force and go on being updated.
pub fn policy_conditions(
    objects: &ClusterObjects,
    td: &TrustDomain,
) -> BTreeMap<(String, String), [Said; 2]> {
    // The valid policies still fail to load together only for a reason beyond any one of them
    // (a namespace or pod problem): then the previous state stays in force for all, as said.
    let mut valid = objects.policy.clone();
    valid
        .policies
        .retain(|p| crate::state::lastgood::policy_problems(p).is_none());
    let together = signet_policy::cluster::state_from_objects(&valid, td).err();
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
            let conditions = match crate::state::lastgood::policy_problems(r) {
                None => [
                    ("Valid", true, "Valid", String::new()),
                    match &together {
                        None => (
                            "InForce",
                            true,
                            "Applied",
                            "part of the cluster state the agents enforce".to_owned(),
                        ),
                        Some(errors) => (
                            "InForce",
                            false,
                            "StateRefused",
                            format!(
                                "the cluster state does not load, so the previous one stays \
                                 in force: {}",
                                errors.first().cloned().unwrap_or_default()
                            ),
                        ),
                    },
                ],
                Some(problems) => [
                    ("Valid", false, "Invalid", problems),
                    (
                        "InForce",
                        false,
                        "LastValidVersion",
                        "this version is refused: agents keep enforcing the last valid version \
                         they saw of this policy, and one that never saw a valid version denies \
                         the directions it declares to the workloads it selects (its whole \
                         namespace if the selector is invalid); every other policy stays in force"
                            .to_owned(),
                    ),
                ],
            };
            (key, conditions)
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

fn k8s_condition(
    c: &crate::routing::model::Condition,
    generation: Option<i64>,
) -> serde_json::Value {
    serde_json::json!({
        "type": c.type_, "status": c.status, "reason": c.reason, "message": c.message,
        "lastTransitionTime": Time(jiff::Timestamp::now()),
        "observedGeneration": generation,
    })
}

/// The status bodies for every Gateway and HTTPRoute: (resource path segment, namespace, name,
/// body). Timestamps aside, equal bodies mean nothing changed.
pub fn gateway_bodies(
    objects: &ClusterObjects,
    status: &crate::routing::model::Status,
) -> Vec<(&'static str, String, String, serde_json::Value)> {
    use crate::routing::model::CONTROLLER;
    let generation =
        |list: Vec<(Option<String>, Option<String>, Option<i64>)>, ns: &str, name: &str| {
            list.into_iter()
                .find(|(n, m, _)| n.as_deref() == Some(ns) && m.as_deref() == Some(name))
                .and_then(|(_, _, g)| g)
        };
    let gens = |metas: Vec<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
        metas
            .into_iter()
            .map(|m| (m.namespace.clone(), m.name.clone(), m.generation))
            .collect::<Vec<_>>()
    };
    let gw_gens = gens(
        objects
            .gateway
            .gateways
            .iter()
            .map(|g| &g.metadata)
            .collect(),
    );
    let route_gens = gens(objects.gateway.routes.iter().map(|r| &r.metadata).collect());
    let mut out = Vec::new();
    // GatewayClasses are cluster-scoped: namespace "".
    let class_gens = gens(
        objects
            .gateway
            .classes
            .iter()
            .map(|c| &c.metadata)
            .collect(),
    );
    for c in &status.gateway_classes {
        let gen_ = class_gens
            .iter()
            .find(|(_, n, _)| n.as_deref() == Some(c.name.as_str()))
            .and_then(|(_, _, g)| *g);
        out.push((
            "gatewayclasses",
            String::new(),
            c.name.clone(),
            serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": {"name": c.name},
                "status": {
                    "conditions": c.conditions.iter().map(|x| k8s_condition(x, gen_)).collect::<Vec<_>>(),
                },
            }),
        ));
    }
    for g in &status.gateways {
        let gen_ = generation(gw_gens.clone(), &g.namespace, &g.name);
        let listeners: Vec<serde_json::Value> = g
            .listeners
            .iter()
            .map(|l| {
                serde_json::json!({
                    "name": l.name,
                    "attachedRoutes": l.attached_routes,
                    "supportedKinds": l.supported_kinds.iter().map(|k| serde_json::json!({"group": "gateway.networking.k8s.io", "kind": k})).collect::<Vec<_>>(),
                    "conditions": l.conditions.iter().map(|c| k8s_condition(c, gen_)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let addresses: Vec<serde_json::Value> = g
            .addresses
            .iter()
            .map(|a| serde_json::json!({"type": "IPAddress", "value": a}))
            .collect();
        out.push((
            "gateways",
            g.namespace.clone(),
            g.name.clone(),
            serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": g.name, "namespace": g.namespace},
                "status": {
                    "addresses": addresses,
                    "conditions": g.conditions.iter().map(|c| k8s_condition(c, gen_)).collect::<Vec<_>>(),
                    "listeners": listeners,
                },
            }),
        ));
    }
    // Services of type LoadBalancer: the addresses they were given, and whether they have all
    // they asked for.
    let svc_gens = gens(objects.services.iter().map(|s| &s.metadata).collect());
    for s in &status.addresses.services {
        let gen_ = generation(svc_gens.clone(), &s.namespace, &s.name);
        out.push((
            "services",
            s.namespace.clone(),
            s.name.clone(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace},
                "status": {
                    "loadBalancer": {"ingress": s.ingress.iter().map(|ip| serde_json::json!({"ip": ip, "ipMode": "VIP"})).collect::<Vec<_>>()},
                    "conditions": [k8s_condition(&s.condition, gen_)],
                },
            }),
        ));
    }
    let traffic_gens = gens(
        objects
            .gateway
            .traffic_policies
            .iter()
            .map(|p| &p.metadata)
            .collect(),
    );
    for p in &status.traffic_policies {
        let gen_ = generation(traffic_gens.clone(), &p.namespace, &p.name);
        out.push((
            "trafficpolicies",
            p.namespace.clone(),
            p.name.clone(),
            serde_json::json!({
                "apiVersion": "signet.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": p.name, "namespace": p.namespace},
                "status": {
                    "conditions": p.conditions.iter().map(|c| k8s_condition(c, gen_)).collect::<Vec<_>>(),
                },
            }),
        ));
    }
    let grpc_gens = gens(
        objects
            .gateway
            .grpc_routes
            .iter()
            .map(|r| &r.metadata)
            .collect(),
    );
    for (plural, kind, routes, gens) in [
        ("httproutes", "HTTPRoute", &status.http_routes, &route_gens),
        ("grpcroutes", "GRPCRoute", &status.grpc_routes, &grpc_gens),
        ("tcproutes", "TCPRoute", &status.tcp_routes, &Vec::new()),
        ("tlsroutes", "TLSRoute", &status.tls_routes, &Vec::new()),
    ] {
        for r in routes {
            let gen_ = generation(gens.clone(), &r.namespace, &r.name);
            let parents: Vec<serde_json::Value> = r
                .parents
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "parentRef": p.parent,
                        "controllerName": CONTROLLER,
                        "conditions": p.conditions.iter().map(|c| k8s_condition(c, gen_)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            out.push((
                plural,
                r.namespace.clone(),
                r.name.clone(),
                serde_json::json!({
                    "apiVersion": if kind == "TCPRoute" { "gateway.networking.k8s.io/v1alpha2" } else { "gateway.networking.k8s.io/v1" },
                    "kind": kind,
                    "metadata": {"name": r.name, "namespace": r.namespace},
                    "status": {"parents": parents},
                }),
            ));
        }
    }
    out
}

/// A body without its timestamps, to tell whether anything changed.
fn fingerprint(body: &serde_json::Value) -> String {
    let mut v = body.clone();
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("lastTransitionTime");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v.to_string()
}

/// Writes Gateway and HTTPRoute status that changed since the last call.
pub async fn write_gateways(
    client: &kube::Client,
    objects: &ClusterObjects,
    td: &TrustDomain,
    written: &mut BTreeMap<(String, String, String), String>,
) -> Result<usize, kube::Error> {
    // The record of addresses first: statuses name only addresses the pools hold.
    let (record, objects) = match crate::state::lbipam::write_pools(client, objects).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "LoadBalancerIPPool allocation not written; Gateway and Service addresses wait");
            return Ok(0);
        }
    };
    let objects = &objects;
    let Ok(status) = crate::state::snapshot::gateway_status_of(objects, &record, td) else {
        return Ok(0); // the same problem is reported on the IdentityPolicies and in the logs
    };
    let mut n = 0;
    for (plural, ns, name, body) in gateway_bodies(objects, &status) {
        let key = (plural.to_owned(), ns.clone(), name.clone());
        let print = fingerprint(&body);
        if written.get(&key) == Some(&print) {
            continue;
        }
        let (group, version, kind) = match plural {
            "services" => ("", "v1", "Service"),
            "gateways" => ("gateway.networking.k8s.io", "v1", "Gateway"),
            "gatewayclasses" => ("gateway.networking.k8s.io", "v1", "GatewayClass"),
            "grpcroutes" => ("gateway.networking.k8s.io", "v1", "GRPCRoute"),
            "tcproutes" => ("gateway.networking.k8s.io", "v1alpha2", "TCPRoute"),
            "tlsroutes" => ("gateway.networking.k8s.io", "v1", "TLSRoute"),
            "trafficpolicies" => ("signet.dev", "v1alpha1", "TrafficPolicy"),
            _ => ("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        };
        let resource = kube::api::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: if group.is_empty() {
                version.into()
            } else {
                format!("{group}/{version}")
            },
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<kube::api::DynamicObject> = if ns.is_empty() {
            Api::all_with(client.clone(), &resource)
        } else {
            Api::namespaced_with(client.clone(), &ns, &resource)
        };
        api.patch_status(
            &name,
            &PatchParams::apply("signet-agent").force(),
            &Patch::Apply(body),
        )
        .await?;
        written.insert(key, print);
        n += 1;
    }
    Ok(n)
}

/// While this agent holds the status Lease, keeps IdentityPolicy, Gateway and HTTPRoute status
/// current.
pub async fn keep_current(
    elector: signet_ca::kubernetes::Elector,
    client: kube::Client,
    source: crate::state::kube::KubeSource,
    td: signet_ca::TrustDomain,
    stop: tokio_util::sync::CancellationToken,
) {
    let (mut written, mut written_gateways) = (BTreeMap::new(), BTreeMap::new());
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
    let mut changes = source.subscribe();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            r = changes.changed() => if r.is_err() { return },
        }
        match elector.try_lead().await {
            Ok(true) => {}
            // Another agent writes; if it stops, this one starts over from nothing.
            Ok(false) => {
                written.clear();
                written_gateways.clear();
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "status Lease");
                continue;
            }
        }
        let objects = source.objects();
        if let Err(e) = write(&client, &objects, &td, &mut written).await {
            tracing::warn!(error = %e, "writing IdentityPolicy status failed; retrying");
        }
        if let Err(e) = write_gateways(&client, &objects, &td, &mut written_gateways).await {
            tracing::warn!(error = %e, "writing Gateway API status failed; retrying");
        }
    }
}
