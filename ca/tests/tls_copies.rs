//! The Gateway TLS Secret copier against kube-rs's test service (tower-test): only Secrets a
//! Signet Gateway may use are copied (its namespace, or a ReferenceGrant), the copy keeps the
//! certificate and names its origin, and copies no longer referenced are deleted.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::api::DynamicObject;
use kube::client::Body;
use signet_ca::server::tls_copies::{SOURCE_NAME, SOURCE_NAMESPACE, copy_name, sync, wanted};

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

type Calls = Arc<Mutex<Vec<(Method, String, serde_json::Value)>>>;

fn json(code: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string().into_bytes()))
        .expect("response")
}

async fn answer(req: Request<Body>, calls: &Calls) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body: Bytes = body.collect().await.expect("body").to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let path = parts.uri.path().to_owned();
    calls
        .lock()
        .expect("calls")
        .push((parts.method.clone(), path.clone(), value.clone()));
    let not_found = || {
        json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    };
    match (parts.method, path.as_str()) {
        (Method::GET, "/api/v1/namespaces/edge/secrets/shop-tls") => json(
            StatusCode::OK,
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "shop-tls", "namespace": "edge"},
                "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}}),
        ),
        (Method::PATCH, p) if p.starts_with("/api/v1/namespaces/signet-system/secrets/") => {
            json(StatusCode::OK, value)
        }
        (Method::GET, "/api/v1/namespaces/signet-system/secrets") => json(
            StatusCode::OK,
            serde_json::json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {},
            "items": [
              {"metadata": {"name": copy_name("edge", "shop-tls"), "namespace": "signet-system"}},
              {"metadata": {"name": copy_name("old", "gone"), "namespace": "signet-system"}},
            ]}),
        ),
        (Method::DELETE, _) => json(
            StatusCode::OK,
            serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
        ),
        _ => not_found(),
    }
}

#[tokio::test]
async fn copies_follow_the_references() {
    let calls = Calls::default();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let recorded = calls.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(req, &recorded).await);
        }
    });
    let client = kube::Client::new(service, "default");
    let (gws, grants) = gateways_and_grants();
    let copied = sync(&client, "signet-system", &wanted(&gws, &grants))
        .await
        .expect("sync");
    assert_eq!(
        copied, 1,
        "certs/far does not exist, so only edge/shop-tls is copied"
    );
    let calls = calls.lock().expect("calls");
    let patch = calls
        .iter()
        .find(|(m, _, _)| *m == Method::PATCH)
        .expect("a copy was applied");
    assert!(
        patch.1.ends_with(&copy_name("edge", "shop-tls")),
        "{}",
        patch.1
    );
    assert_eq!(patch.2["type"], "kubernetes.io/tls");
    assert_eq!(patch.2["data"]["tls.crt"], "Y2VydA==");
    assert_eq!(patch.2["metadata"]["annotations"][SOURCE_NAMESPACE], "edge");
    assert_eq!(patch.2["metadata"]["annotations"][SOURCE_NAME], "shop-tls");
    let deleted: Vec<&String> = calls
        .iter()
        .filter(|(m, _, _)| *m == Method::DELETE)
        .map(|(_, p, _)| p)
        .collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert!(deleted[0].ends_with(&copy_name("old", "gone")));
    assert!(
        !calls
            .iter()
            .any(|(_, p, _)| p.contains("/namespaces/other/")),
        "a Secret no grant allows is never even read"
    );
}
