//! The Gateway TLS Secret copier against the shared fake API server: only Secrets a
//! Signet Gateway may use are copied (its namespace, or a ReferenceGrant), the copy keeps the
//! certificate and names its origin, and copies no longer referenced are deleted.

use kube::api::DynamicObject;
use serde_json::{Value, json};
use signet_ca::server::tls_copies::{
    COPY_LABEL, SOURCE_NAME, SOURCE_NAMESPACE, copy_name, sync, wanted,
};
use signet_test_support::api::FakeApi;

fn dynamic(v: serde_json::Value) -> DynamicObject {
    serde_json::from_value(v).expect("object")
}

fn gateways_and_grants() -> (Vec<DynamicObject>, Vec<DynamicObject>) {
    let gw = dynamic(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "public", "namespace": "edge"},
        "spec": {"gatewayClassName": "signet", "listeners": [
            {"name": "a", "port": 443, "protocol": "HTTPS",
             "tls": {"certificateRefs": [{"name": "shop-tls"}, {"name": "far", "namespace": "certs"},
                                         {"name": "denied", "namespace": "other"},
                                         {"name": "cm", "kind": "ConfigMap"}]}},
            {"name": "plain", "port": 80, "protocol": "HTTP"},
        ]},
    }));
    let grant = dynamic(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant",
        "metadata": {"name": "edge", "namespace": "certs"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "edge"}],
                 "to": [{"group": "", "kind": "Secret"}]},
    }));
    (vec![gw], vec![grant])
}

#[test]
fn only_secrets_a_gateway_may_use_are_wanted() {
    let (gws, grants) = gateways_and_grants();
    let w: Vec<(String, String)> = wanted(&gws, &grants).into_iter().collect();
    assert_eq!(
        w,
        [
            ("certs".to_owned(), "far".to_owned()),
            ("edge".to_owned(), "shop-tls".to_owned())
        ]
    );
    assert!(
        wanted(&gws, &[]).iter().all(|(ns, _)| ns == "edge"),
        "no grant, no copy"
    );
}

fn secret(ns: &str, name: &str, labels: Value, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns, "labels": labels}, "data": data})
}

#[tokio::test]
async fn copies_follow_the_references() {
    let copy_label = json!({ COPY_LABEL: "true" });
    let api = FakeApi::new(vec![
        secret(
            "edge",
            "shop-tls",
            json!({}),
            json!({"tls.crt": "Y2VydA==", "tls.key": "a2V5"}),
        ),
        secret("other", "denied", json!({}), json!({"tls.crt": "eA=="})),
        // A copy whose source no Gateway names any more, and a Secret of the copy namespace
        // that is not a copy at all.
        secret(
            "signet-system",
            &copy_name("old", "gone"),
            copy_label.clone(),
            json!({"tls.crt": "b2xk"}),
        ),
        secret(
            "signet-system",
            "unrelated",
            json!({}),
            json!({"tls.crt": "dQ=="}),
        ),
    ]);
    let (gws, grants) = gateways_and_grants();
    let copied = sync(&api.client(), "signet-system", &wanted(&gws, &grants))
        .await
        .expect("sync");
    assert_eq!(
        copied, 1,
        "certs/far does not exist, so only edge/shop-tls is copied"
    );
    let copy = api
        .get("Secret", "signet-system", &copy_name("edge", "shop-tls"))
        .expect("a copy of edge/shop-tls");
    assert_eq!(copy["type"], "kubernetes.io/tls");
    assert_eq!(copy["data"]["tls.crt"], "Y2VydA==");
    assert_eq!(copy["data"]["tls.key"], "a2V5");
    assert_eq!(copy["metadata"]["labels"][COPY_LABEL], "true");
    assert_eq!(copy["metadata"]["annotations"][SOURCE_NAMESPACE], "edge");
    assert_eq!(copy["metadata"]["annotations"][SOURCE_NAME], "shop-tls");
    assert!(
        api.get("Secret", "signet-system", &copy_name("old", "gone"))
            .is_none(),
        "the stale copy is deleted"
    );
    assert!(
        api.get("Secret", "signet-system", "unrelated").is_some(),
        "a Secret that is not a copy stays"
    );
    let requests = api.requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.path.contains("/namespaces/other/")),
        "a Secret no grant allows is never even read: {requests:?}"
    );

    // Run again with nothing changed: the copy is applied again, nothing else is deleted.
    let before = api.requests().len();
    sync(&api.client(), "signet-system", &wanted(&gws, &grants))
        .await
        .expect("sync again");
    assert!(
        !api.requests()[before..].iter().any(|r| r.verb == "delete"),
        "nothing to delete the second time"
    );
    assert!(
        api.get("Secret", "signet-system", &copy_name("edge", "shop-tls"))
            .is_some()
    );
}
