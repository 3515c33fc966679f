//! The CA's view of the cluster in Kubernetes mode: reflectors on Pods (who runs where), Nodes
//! (their labels place Gateways) and on Gateways and GatewayClasses (whose identities nodes may
//! obtain), rebuilt into the
//! authoriser's index on every change; and the copies of the Gateways' TLS Secrets
//! (`tls_copies`). Gateway API objects are read as dynamic objects: the CA needs a few fields of
//! them, not the gateway-api crate.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::placement::Placement;
use crate::server::authz::{
    ClusterView, GATEWAY_CONTROLLER, NodeAuthorizer, PlacedGateway, scheduled,
};
use crate::server::tls_copies;

pub use crate::kubernetes::{KubeconfigError, client, drive};

fn gateway_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        kind,
    ))
}

/// Every Gateway whose class names Signet's controller.
fn signet_gateways(
    classes: &Store<DynamicObject>,
    gateways: &Store<DynamicObject>,
) -> Vec<DynamicObject> {
    let ours: Vec<String> = classes
        .state()
        .iter()
        .filter(|c| c.data["spec"]["controllerName"].as_str() == Some(GATEWAY_CONTROLLER))
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    gateways
        .state()
        .iter()
        .filter(|g| {
            g.data["spec"]["gatewayClassName"]
                .as_str()
                .is_some_and(|c| ours.iter().any(|o| o == c))
        })
        .map(|g| (**g).clone())
        .collect()
}

/// Watches the cluster and keeps `authz` current, and the Gateways' TLS Secrets copied into
/// `copy_ns` (`tls_copies`). Returns once every resource has been listed, with the first view in
/// force; the watch goes on until `stop`.
pub async fn watch_cluster(
    client: kube::Client,
    authz: Arc<NodeAuthorizer>,
    copy_ns: String,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let config = watcher::Config::default();
    let (pods, w) = reflector::store::<Pod>();
    let notify = |changed: &Arc<Notify>| {
        let changed = changed.clone();
        move || changed.notify_one()
    };
    drive(
        "Pod".into(),
        watcher(Api::<Pod>::all(client.clone()), config.clone())
            .default_backoff()
            .reflect(w),
        notify(&changed),
        stop.clone(),
    );
    let (nodes, w) = reflector::store::<Node>();
    drive(
        "Node".into(),
        watcher(Api::<Node>::all(client.clone()), config.clone())
            .default_backoff()
            .reflect(w),
        notify(&changed),
        stop.clone(),
    );
    let mut dynamic = Vec::new();
    for kind in ["GatewayClass", "Gateway", "ReferenceGrant"] {
        let resource = gateway_resource(kind);
        let w = reflector::store::Writer::<DynamicObject>::new(resource.clone());
        let store = w.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        drive(
            kind.into(),
            watcher(api, config.clone()).default_backoff().reflect(w),
            notify(&changed),
            stop.clone(),
        );
        dynamic.push(store);
    }
    let (classes, gateways, grants) = (dynamic[0].clone(), dynamic[1].clone(), dynamic[2].clone());
    let _ = tokio::join!(
        pods.wait_until_ready(),
        nodes.wait_until_ready(),
        classes.wait_until_ready(),
        gateways.wait_until_ready(),
        grants.wait_until_ready(),
    );
    let apply = move || {
        let scheduled: Vec<_> = pods
            .state()
            .iter()
            .filter_map(|p| scheduled((**p).clone()))
            .collect();
        let ours = signet_gateways(&classes, &gateways);
        let placed = ours
            .iter()
            .filter_map(|g| {
                Some(PlacedGateway {
                    namespace: g.metadata.namespace.clone()?,
                    name: g.metadata.name.clone()?,
                    placement: Placement::of(g.metadata.annotations.as_ref()),
                })
            })
            .collect();
        let node_labels = nodes
            .state()
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let n = scheduled.len();
        authz.replace(ClusterView {
            pods: scheduled,
            gateways: placed,
            node_labels,
        });
        let grants: Vec<DynamicObject> = grants.state().iter().map(|g| (**g).clone()).collect();
        (n, tls_copies::wanted(&ours, &grants))
    };
    let (n, wanted) = apply();
    tracing::info!(pods = n, "cluster view loaded from the Kubernetes API");
    copy(&client, &copy_ns, &wanted).await;
    tokio::spawn(async move {
        // Secrets are not watched (that would need every Secret in the cluster): referenced
        // ones are re-read on every change and every 30 s, so a rotation lands within that.
        let mut resync = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = changed.notified() => {}
                _ = resync.tick() => {}
            }
            let (_, wanted) = apply();
            copy(&client, &copy_ns, &wanted).await;
        }
    });
}

async fn copy(
    client: &kube::Client,
    copy_ns: &str,
    wanted: &std::collections::BTreeSet<(String, String)>,
) {
    match tls_copies::sync(client, copy_ns, wanted).await {
        Ok(n) => tracing::debug!(copies = n, "Gateway TLS Secrets copied"),
        Err(e) => tracing::warn!(error = %e, "copying Gateway TLS Secrets failed; retrying"),
    }
}
