//! The CA's view of the cluster in Kubernetes mode: reflectors on Pods (who runs where) and on
//! Gateways and GatewayClasses (whose identities nodes may obtain), rebuilt into the
//! authoriser's index on every change. Gateway API objects are read as dynamic objects: the CA
//! needs three fields of them, not the gateway-api crate.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::server::authz::{GATEWAY_CONTROLLER, NodeAuthorizer, scheduled};

fn gateway_resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "gateway.networking.k8s.io",
        "v1",
        kind,
    ))
}

/// Drives one reflector, signalling every change.
fn drive<S, T, E>(stream: S, changed: Arc<Notify>, stop: CancellationToken)
where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => match event {
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(e)) => tracing::warn!(error = %e, "watch failed; retrying with backoff"),
                    None => return,
                },
            }
        }
    });
}

/// `(namespace, name)` of every Gateway whose class names Signet's controller.
fn signet_gateways(
    classes: &Store<DynamicObject>,
    gateways: &Store<DynamicObject>,
) -> Vec<(String, String)> {
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
        .filter_map(|g| Some((g.metadata.namespace.clone()?, g.metadata.name.clone()?)))
        .collect()
}

/// Watches the cluster and keeps `authz` current. Returns once every resource has been listed,
/// with the first view in force; the watch goes on until `stop`.
pub async fn watch_cluster(
    client: kube::Client,
    authz: Arc<NodeAuthorizer>,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let config = watcher::Config::default();
    let (pods, w) = reflector::store::<Pod>();
    drive(
        watcher(Api::<Pod>::all(client.clone()), config.clone())
            .default_backoff()
            .reflect(w),
        changed.clone(),
        stop.clone(),
    );
    let mut dynamic = Vec::new();
    for kind in ["GatewayClass", "Gateway"] {
        let resource = gateway_resource(kind);
        let w = reflector::store::Writer::<DynamicObject>::new(resource.clone());
        let store = w.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        drive(
            watcher(api, config.clone()).default_backoff().reflect(w),
            changed.clone(),
            stop.clone(),
        );
        dynamic.push(store);
    }
    let (classes, gateways) = (dynamic[0].clone(), dynamic[1].clone());
    let _ = tokio::join!(
        pods.wait_until_ready(),
        classes.wait_until_ready(),
        gateways.wait_until_ready()
    );
    let apply = move || {
        let scheduled: Vec<_> = pods
            .state()
            .iter()
            .filter_map(|p| scheduled((**p).clone()))
            .collect();
        authz.replace(&scheduled, signet_gateways(&classes, &gateways));
        scheduled.len()
    };
    let n = apply();
    tracing::info!(pods = n, "cluster view loaded from the Kubernetes API");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = changed.notified() => {}
            }
            apply();
        }
    });
}
