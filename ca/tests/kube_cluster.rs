//! The CA's Kubernetes view against kube-rs's test service (tower-test): Pods, GatewayClasses
//! and Gateways listed as real API objects feed the authoriser, so a node may obtain exactly the
//! identities of its own pods and of Signet's Gateways.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use kube::client::Body;
use signet_ca::server::auth::NodeName;
use signet_ca::server::authz::NodeAuthorizer;
use signet_ca::server::kube::watch_cluster;
use signet_ca::{SpiffeId, TrustDomain};
use tokio_util::sync::CancellationToken;

type Reply = UnsyncBoxBody<Bytes, Infallible>;

fn lists(path: &str) -> serde_json::Value {
    let items = match path {
        "/api/v1/pods" => serde_json::json!([
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "web-0", "namespace": "shop"},
             "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "c"}]}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "db-0", "namespace": "shop"},
             "spec": {"nodeName": "node-b", "serviceAccountName": "db", "containers": [{"name": "c"}]}},
        ]),
        "/apis/gateway.networking.k8s.io/v1/gatewayclasses" => serde_json::json!([
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
             "metadata": {"name": "signet"}, "spec": {"controllerName": "signet.dev/gateway-controller"}},
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
             "metadata": {"name": "other"}, "spec": {"controllerName": "example.com/other"}},
        ]),
        "/apis/gateway.networking.k8s.io/v1/gateways" => serde_json::json!([
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "metadata": {"name": "public", "namespace": "edge"},
             "spec": {"gatewayClassName": "signet", "listeners": []}},
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
             "metadata": {"name": "theirs", "namespace": "edge"},
             "spec": {"gatewayClassName": "other", "listeners": []}},
        ]),
        _ => serde_json::json!([]),
    };
    serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "3"}, "items": items})
}

fn api_server() -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Reply>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            if req.uri().query().unwrap_or("").contains("watch=true") {
                let quiet = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
                send.send_response(Response::new(StreamBody::new(quiet).boxed_unsync()));
                continue;
            }
            let body = lists(req.uri().path()).to_string();
            send.send_response(Response::new(
                http_body_util::Full::new(Bytes::from(body)).boxed_unsync(),
            ));
        }
    });
    kube::Client::new(service, "default")
}

#[tokio::test]
async fn nodes_get_their_own_pods_and_signets_gateways_from_the_api() {
    let td = TrustDomain::parse("cluster.local").expect("td");
    let agent = SpiffeId::workload(&td, "signet-system", "signet-agent").expect("id");
    let authz = std::sync::Arc::new(NodeAuthorizer::from_api(td, agent));
    let node_a = NodeName("node-a".into());
    let web = Some("spiffe://cluster.local/ns/shop/sa/web");
    assert!(
        authz.authorize(&node_a, web).is_err(),
        "nothing before the first sync"
    );
    let stop = CancellationToken::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        watch_cluster(
            api_server(),
            authz.clone(),
            "signet-system".into(),
            stop.clone(),
        ),
    )
    .await
    .expect("synced");
    assert!(authz.authorize(&node_a, web).is_ok());
    assert!(
        authz
            .authorize(&node_a, Some("spiffe://cluster.local/ns/shop/sa/db"))
            .is_err(),
        "db-0 runs on node-b"
    );
    assert!(
        authz
            .authorize(
                &node_a,
                Some("spiffe://cluster.local/ns/edge/gateway/public")
            )
            .is_ok()
    );
    assert!(
        authz
            .authorize(
                &node_a,
                Some("spiffe://cluster.local/ns/edge/gateway/theirs")
            )
            .is_err()
    );
    stop.cancel();
}
