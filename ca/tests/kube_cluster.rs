//! The CA's Kubernetes view against the shared fake API server: Pods, GatewayClasses and
//! Gateways listed as real API objects feed the authoriser, so a node may obtain exactly the
//! identities of its own pods and of Signet's Gateways, and what changes later reaches it
//! through the watch.

use serde_json::{Value, json};
use signet_ca::server::auth::NodeName;
use signet_ca::server::authz::NodeAuthorizer;
use signet_ca::server::kube::watch_cluster;
use signet_ca::{SpiffeId, TrustDomain};
use signet_test_support::api::FakeApi;
use signet_test_support::wait_until;
use tokio_util::sync::CancellationToken;

fn pod(name: &str, node: &str, sa: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]}})
}

fn cluster() -> Vec<Value> {
    let gateway_class = |name: &str, controller: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": name}, "spec": {"controllerName": controller}})
    };
    let gateway = |name: &str, class: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": "edge"},
            "spec": {"gatewayClassName": class, "listeners": []}})
    };
    vec![
        pod("web-0", "node-a", "web"),
        pod("db-0", "node-b", "db"),
        gateway_class("signet", "signet.dev/gateway-controller"),
        gateway_class("other", "example.com/other"),
        gateway("public", "signet"),
        gateway("theirs", "other"),
    ]
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
    let api = FakeApi::new(cluster());
    let stop = CancellationToken::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        watch_cluster(
            api.client(),
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
    // Followed through the watch: a db pod scheduled on node-a gives node-a db's identity.
    api.put(pod("db-1", "node-a", "db"));
    wait_until("node-a to hold db's identity", || {
        authz
            .authorize(&node_a, Some("spiffe://cluster.local/ns/shop/sa/db"))
            .ok()
    })
    .await;
    stop.cancel();
}
