//! IdentityPolicy status in Kubernetes mode, against kube-rs's test service (tower-test): each
//! policy gets `Valid` (with the field path when not) and `InForce` through a server-side-apply
//! patch of its status subresource, and nothing is written again until something changes.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::client::Body;
use signet_agent::state::snapshot::read_objects;
use signet_agent::state::status;
use signet_ca::TrustDomain;

const POLICIES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: good, namespace: shop, generation: 3}
spec:
  selector: {matchLabels: {app: api}}
  ingress: [{from: [{identity: spiffe://cluster.local/ns/shop/sa/web}]}]
---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: bad, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  ingress: [{from: [{identity: not-a-spiffe-id}]}]
";

/// (path, body) of each PATCH.
type Patches = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// Every PATCH the client sends, recorded as (path, body); each is answered with
/// `answer(body)` as the object the API server returns.
fn capture(answer: fn(serde_json::Value) -> serde_json::Value) -> (kube::Client, Patches) {
    let patches = Patches::default();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = patches.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(parts.method, http::Method::PATCH);
            seen.lock()
                .expect("patches")
                .push((parts.uri.path().to_owned(), v.clone()));
            let resp = Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from(answer(v).to_string().into_bytes()))
                .expect("response");
            send.send_response(resp);
        }
    });
    (kube::Client::new(service, "default"), patches)
}

#[tokio::test]
async fn policies_get_valid_and_in_force_conditions() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("p.yaml"), POLICIES).expect("write");
    let mut errors = Vec::new();
    let objects = read_objects(dir.path(), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");

    // The API server answers with the whole object, status applied.
    let (client, patches) = capture(|mut object| {
        object["spec"] = serde_json::json!({"selector": {}});
        object
    });
    let td = TrustDomain::parse("cluster.local").expect("td");
    let mut written = BTreeMap::new();
    assert_eq!(
        status::write(&client, &objects, &td, &mut written)
            .await
            .expect("write"),
        2
    );
    // Nothing changed: nothing is written.
    assert_eq!(
        status::write(&client, &objects, &td, &mut written)
            .await
            .expect("write"),
        0
    );

    let patches = patches.lock().expect("patches");
    let of = |name: &str| {
        patches
            .iter()
            .find(|(p, _)| {
                p == &format!(
                    "/apis/signet.dev/v1alpha1/namespaces/shop/identitypolicies/{name}/status"
                )
            })
            .map(|(_, v)| v["status"]["conditions"].clone())
            .unwrap_or_else(|| panic!("no status for {name}"))
    };
    let cond = |conds: &serde_json::Value, t: &str| {
        conds
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .expect("condition")
    };
    let good = of("good");
    assert_eq!(cond(&good, "Valid")["status"], "True");
    assert_eq!(cond(&good, "Valid")["observedGeneration"], 3);
    // One invalid policy does not hold a valid one back.
    assert_eq!(cond(&good, "InForce")["status"], "True");
    assert_eq!(cond(&good, "InForce")["reason"], "Applied");
    let bad = of("bad");
    assert_eq!(cond(&bad, "InForce")["status"], "False");
    assert_eq!(cond(&bad, "InForce")["reason"], "LastValidVersion");
    assert_eq!(cond(&bad, "Valid")["status"], "False");
    assert!(
        cond(&bad, "Valid")["message"]
            .as_str()
            .is_some_and(|m| m.contains("`spec.ingress[0].from[0].identity`")),
        "{bad}"
    );
}

const GATEWAYS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge, generation: 2}
spec:
  gatewayClassName: signet
  listeners: [{name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: http}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
";

#[tokio::test]
async fn gateways_and_routes_get_their_gateway_api_status() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("g.yaml"), GATEWAYS).expect("write");
    let mut errors = Vec::new();
    let objects = read_objects(dir.path(), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let (client, patches) = capture(|object| object);
    let td = TrustDomain::parse("cluster.local").expect("td");
    let mut written = BTreeMap::new();
    let n = status::write_gateways(&client, &objects, &td, &mut written)
        .await
        .expect("write");
    assert_eq!(n, 2, "the Gateway and the HTTPRoute");
    assert_eq!(
        status::write_gateways(&client, &objects, &td, &mut written)
            .await
            .expect("write"),
        0,
        "unchanged, not written again"
    );
    let patches = patches.lock().expect("patches");
    let body = |path: &str| {
        patches
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, v)| v["status"].clone())
            .unwrap_or_else(|| panic!("no PATCH to {path}: {patches:?}"))
    };
    let gw = body("/apis/gateway.networking.k8s.io/v1/namespaces/edge/gateways/public/status");
    let types = |conds: &serde_json::Value| -> Vec<(String, String)> {
        conds
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or("").to_owned(),
                    c["status"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    assert!(
        types(&gw["conditions"]).contains(&("Programmed".into(), "True".into())),
        "{gw}"
    );
    assert_eq!(gw["conditions"][0]["observedGeneration"], 2);
    assert_eq!(gw["listeners"][0]["attachedRoutes"], 1, "{gw}");
    assert_eq!(gw["listeners"][0]["supportedKinds"][0]["kind"], "HTTPRoute");
    let route = body("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status");
    let parent = &route["parents"][0];
    assert_eq!(parent["controllerName"], "signet.dev/gateway-controller");
    assert_eq!(parent["parentRef"]["name"], "public");
    assert_eq!(parent["parentRef"]["sectionName"], "http");
    assert!(
        types(&parent["conditions"]).contains(&("Accepted".into(), "True".into())),
        "{route}"
    );
    assert!(
        types(&parent["conditions"]).contains(&("ResolvedRefs".into(), "True".into())),
        "{route}"
    );
}
