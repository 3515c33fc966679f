//! IdentityPolicy and Gateway API status in Kubernetes mode, against the shared fake API server:
//! each policy gets `Valid` (with the field path when not) and `InForce` through a
//! server-side-apply patch of its status subresource, which the API server then holds, and
//! nothing is written again until something changes.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;

use signet_agent::policy::status;
use signet_agent::state::snapshot::read_objects;
use signet_ca::TrustDomain;
use signet_test_support::api::FakeApi;

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

/// The status the API server holds for `kind` `namespace/name`.
fn status_of(api: &FakeApi, kind: &str, namespace: &str, name: &str) -> serde_json::Value {
    api.get(kind, namespace, name)
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"))["status"]
        .clone()
}

fn patches(api: &FakeApi) -> usize {
    api.requests().iter().filter(|r| r.verb == "patch").count()
}

#[tokio::test]
async fn policies_get_valid_and_in_force_conditions() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("p.yaml"), POLICIES).expect("write");
    let mut errors = Vec::new();
    let objects = read_objects(dir.path(), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");

    let api = FakeApi::from_yaml(POLICIES);
    let client = api.client();
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

    assert_eq!(patches(&api), 2, "one status patch per policy, then none");
    let of = |name: &str| status_of(&api, "IdentityPolicy", "shop", name)["conditions"].clone();
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
    let api = FakeApi::from_yaml(GATEWAYS);
    let client = api.client();
    let td = TrustDomain::parse("cluster.local").expect("td");
    let mut written = BTreeMap::new();
    let n = status::write_gateways(&client, &objects, &td, &mut written)
        .await
        .expect("write");
    assert_eq!(n, 3, "the GatewayClass, the Gateway and the HTTPRoute");
    assert_eq!(
        status::write_gateways(&client, &objects, &td, &mut written)
            .await
            .expect("write"),
        0,
        "unchanged, not written again"
    );
    assert_eq!(patches(&api), 3);
    let class = status_of(&api, "GatewayClass", "", "signet");
    let class_types: Vec<&str> = class["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter(|c| c["status"] == "True")
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(class_types, ["Accepted", "SupportedVersion"], "{class}");
    let gw = status_of(&api, "Gateway", "edge", "public");
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
    let route = status_of(&api, "HTTPRoute", "shop", "web");
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

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{name: http, port: 80}, {name: grpc, port: 81}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop, generation: 3}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}], retry: {attempts: 2}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 81}]
  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: X, name: x}}], backendRefs: [{name: web, port: 81}]}]
---
apiVersion: signet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: web}]
  loadBalancer: {algorithm: RoundRobin}
---
apiVersion: signet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: broken, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: web}]
  rateLimit: {requestsPerSecond: 0}
";

#[tokio::test]
async fn mesh_routes_and_traffic_policies_get_their_status_through_the_status_subresource() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("m.yaml"), MESH).expect("write");
    let mut errors = Vec::new();
    let objects = read_objects(dir.path(), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let api = FakeApi::from_yaml(MESH);
    let client = api.client();
    let td = TrustDomain::parse("cluster.local").expect("td");
    let mut written = BTreeMap::new();
    let n = status::write_gateways(&client, &objects, &td, &mut written)
        .await
        .expect("write");
    assert_eq!(
        n, 4,
        "the HTTPRoute, the GRPCRoute and both TrafficPolicies"
    );
    let route = status_of(&api, "HTTPRoute", "shop", "web");
    let parent = &route["parents"][0];
    assert_eq!(
        parent["parentRef"],
        serde_json::json!({"group": "", "kind": "Service", "namespace": "shop", "name": "web", "port": 80}),
        "{route}"
    );
    assert_eq!(parent["conditions"][0]["type"], "Accepted");
    assert_eq!(parent["conditions"][0]["status"], "True", "{route}");
    assert_eq!(parent["conditions"][0]["observedGeneration"], 3);
    let rpc = status_of(&api, "GRPCRoute", "shop", "rpc");
    let c = &rpc["parents"][0]["conditions"][0];
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&"False".into(), &"UnsupportedValue".into()),
        "{rpc}"
    );
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("rules[0].filters[0]: filter type ExtensionRef")),
        "{rpc}"
    );
    let good = status_of(&api, "TrafficPolicy", "shop", "web");
    assert_eq!(good["conditions"][0]["status"], "True", "{good}");
    let bad = status_of(&api, "TrafficPolicy", "shop", "broken");
    assert_eq!(bad["conditions"][0]["reason"], "Invalid", "{bad}");
    assert!(
        bad["conditions"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.rateLimit.requestsPerSecond")),
        "{bad}"
    );
}

const ADDRESSES: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: edge, creationTimestamp: '2026-01-01T00:00:00Z'}
spec: {blocks: [{cidr: 10.99.100.0/30}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: old, namespace: edge, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  gatewayClassName: signet
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, creationTimestamp: '2026-01-02T00:00:00Z'}
spec: {type: LoadBalancer, clusterIP: 10.96.0.9, ports: [{port: 443}]}
---
apiVersion: v1
kind: Service
metadata: {name: theirs, namespace: shop}
spec: {type: LoadBalancer, loadBalancerClass: other.example/lb, clusterIP: 10.96.0.10, ports: [{port: 443}]}
";

/// What an agent's reflectors would hold: the fake's objects of the kinds addresses concern.
fn view(api: &FakeApi, skip: &[&str]) -> signet_agent::state::snapshot::ClusterObjects {
    fn of<T: serde::de::DeserializeOwned>(api: &FakeApi, kind: &str, skip: &[&str]) -> Vec<T> {
        api.objects(kind)
            .into_iter()
            .filter(|o| !skip.contains(&o["metadata"]["name"].as_str().unwrap_or_default()))
            .map(|o| serde_json::from_value(o).expect(kind))
            .collect()
    }
    let mut o = signet_agent::state::snapshot::ClusterObjects {
        pools: of(api, "LoadBalancerIPPool", skip),
        services: of(api, "Service", skip),
        ..Default::default()
    };
    o.gateway.classes = of(api, "GatewayClass", skip);
    o.gateway.gateways = of(api, "Gateway", skip);
    o
}

fn record(api: &FakeApi) -> Vec<(String, String)> {
    status_of(api, "LoadBalancerIPPool", "", "edge")["allocations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let o = &x["owner"];
                    (
                        x["address"].as_str().unwrap_or_default().to_owned(),
                        format!(
                            "{} {}/{}",
                            o["kind"].as_str().unwrap_or_default(),
                            o["namespace"].as_str().unwrap_or_default(),
                            o["name"].as_str().unwrap_or_default()
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

#[tokio::test]
async fn addresses_are_recorded_in_pool_status_with_optimistic_concurrency_and_a_lagging_writer_keeps_what_others_own()
 {
    let api = FakeApi::from_yaml(ADDRESSES);
    let client = api.client();
    let td = TrustDomain::parse("cluster.local").expect("td");

    // Writer X sees the Gateway but not yet the Service.
    let x_view = view(&api, &["api"]);
    // Writer Y read the pool before X wrote it, and has not seen the Gateway (its reflector
    // lags): alone, it would give the Gateway's address to the Service.
    let y_view = view(&api, &["old"]);
    status::write_gateways(&client, &x_view, &td, &mut BTreeMap::new())
        .await
        .expect("X writes");
    assert_eq!(record(&api), [pair("10.99.100.1", "Gateway edge/old")]);
    let gw = status_of(&api, "Gateway", "edge", "old");
    assert_eq!(
        gw["addresses"],
        serde_json::json!([{"type": "IPAddress", "value": "10.99.100.1"}]),
        "{gw}"
    );

    status::write_gateways(&client, &y_view, &td, &mut BTreeMap::new())
        .await
        .expect("Y writes");
    let conflicts = api
        .requests()
        .iter()
        .filter(|r| r.path.contains("loadbalancerippools") && r.code == 409)
        .count();
    assert_eq!(
        conflicts, 1,
        "Y's write on the stale resourceVersion was refused once"
    );
    assert_eq!(
        record(&api),
        [
            pair("10.99.100.1", "Gateway edge/old"),
            pair("10.99.100.2", "Service shop/api")
        ],
        "the Gateway keeps its address: Y asked the API whether its owner still exists"
    );
    let svc = status_of(&api, "Service", "shop", "api");
    assert_eq!(
        svc["loadBalancer"]["ingress"][0]["ip"], "10.99.100.2",
        "{svc}"
    );
    assert_eq!(
        svc["conditions"][0]["type"],
        "signet.dev/IPAMRequestSatisfied"
    );
    assert_eq!(svc["conditions"][0]["status"], "True", "{svc}");
    assert_eq!(
        status_of(&api, "Service", "shop", "theirs"),
        serde_json::Value::Null,
        "another loadBalancerClass is not Signet's to write"
    );
    let pool = status_of(&api, "LoadBalancerIPPool", "", "edge");
    assert_eq!(
        (
            pool["total"].as_str(),
            pool["used"].as_str(),
            pool["free"].as_str()
        ),
        (Some("2"), Some("2"), Some("0")),
        "{pool}"
    );

    // A third requester: the pool is exhausted, said on the pool and on the Service, and
    // nothing is recorded for it.
    api.put(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "third", "namespace": "shop", "creationTimestamp": "2026-01-03T00:00:00Z"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.11", "ports": [{"port": 80}]},
    }));
    status::write_gateways(&client, &view(&api, &[]), &td, &mut BTreeMap::new())
        .await
        .expect("write");
    assert_eq!(record(&api).len(), 2);
    let third = status_of(&api, "Service", "shop", "third");
    assert_eq!(third["conditions"][0]["status"], "False", "{third}");
    assert_eq!(third["conditions"][0]["reason"], "Exhausted", "{third}");
    assert_eq!(
        third["loadBalancer"]["ingress"],
        serde_json::json!([]),
        "{third}"
    );
    let exhausted = status_of(&api, "LoadBalancerIPPool", "", "edge")["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Exhausted")
        .cloned()
        .expect("Exhausted");
    assert_eq!(exhausted["status"], "True");
    assert!(
        exhausted["message"]
            .as_str()
            .is_some_and(|m| m.contains("Service shop/third")),
        "{exhausted}"
    );

    // A restarted writer (nothing remembered) finds everything in place and writes no pool.
    let puts = |api: &FakeApi| {
        api.requests()
            .iter()
            .filter(|r| r.path.contains("loadbalancerippools") && r.verb == "update")
            .count()
    };
    let before = puts(&api);
    status::write_gateways(&client, &view(&api, &[]), &td, &mut BTreeMap::new())
        .await
        .expect("write");
    assert_eq!(
        puts(&api),
        before,
        "nothing changed, so no pool was written"
    );

    // The Gateway goes: its address is released and the waiting Service gets it.
    api.delete("gateway.networking.k8s.io/v1", "Gateway", "edge", "old");
    status::write_gateways(&client, &view(&api, &[]), &td, &mut BTreeMap::new())
        .await
        .expect("write");
    assert_eq!(
        record(&api),
        [
            pair("10.99.100.1", "Service shop/third"),
            pair("10.99.100.2", "Service shop/api")
        ]
    );
}
