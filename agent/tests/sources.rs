//! One model, two sources, for the whole agent: a cluster written as manifests in a state
//! directory, and the same resources as typed objects (what the Kubernetes source's reflectors
//! hold), must build the same snapshot — workloads, node addresses, numeric identities, this
//! node's endpoints, Services, compiled policy and Gateway status.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use signet_agent::config::PodAnnotations;
use signet_agent::policy::status;
use signet_agent::state::lastgood::{InForce, LastGood};
use signet_agent::state::snapshot::{self, ClusterObjects, EndpointIds, Snapshot, Source};
use signet_ca::TrustDomain;
use signet_policy::identity::MemoryAllocator;

/// A TLS Secret with a fresh self-signed certificate for `host`.
fn tls_secret(ns: &str, name: &str, host: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let indent = |s: String| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(cert.pem()),
        indent(key.serialize_pem())
    )
}

const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}, annotations: {signet.dev/cgroup: web-0}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop, labels: {app: api}}
spec: {nodeName: node-b, serviceAccountName: api, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: api, namespace: shop}
subsets: [{addresses: [{ip: 10.2.0.2}], ports: [{name: http, port: 8080}]}]
---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  ingress:
  - from: [{identity: spiffe://cluster.local/ns/shop/sa/web}, {entity: gateway}]
    ports: [{port: 8080}]
    http: [{methods: [GET]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec:
  gatewayClassName: signet
  listeners:
  - {name: https, port: 8443, protocol: HTTPS, hostname: shop.example.test, tls: {certificateRefs: [{name: shop-tls}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{name: public}]
  rules: [{backendRefs: [{name: api, port: 80}, {name: missing, port: 80}]}]
---
";

fn objects_of(text: &str) -> ClusterObjects {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("all.yaml"), text).expect("write");
    let mut errors = Vec::new();
    let objects = snapshot::read_objects(dir.path(), &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    objects
}

fn build(source: Source<'_>, node: &str) -> Snapshot {
    build_with(source, PodAnnotations::Trusted, node)
}

fn build_with(source: Source<'_>, annotations: PodAnnotations, node: &str) -> Snapshot {
    snapshot::build_loaded(
        snapshot::load_source(source, &TrustDomain::parse("cluster.local").expect("td"))
            .expect("loads"),
        annotations,
        node,
        &MemoryAllocator::default(),
        &mut EndpointIds::default(),
        None,
        1 << 16,
    )
    .expect("snapshot")
}

#[test]
fn a_state_directory_and_the_same_api_objects_build_the_same_snapshot() {
    let text = format!(
        "{CLUSTER}{}",
        tls_secret("shop", "shop-tls", "shop.example.test")
    );
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("all.yaml"), &text).expect("write");
    // The objects are deserialised independently of the directory the file source reads.
    let objects = objects_of(&text);
    for node in ["node-a", "node-b"] {
        let (a, b) = (
            build(Source::Dir(dir.path()), node),
            build(Source::Objects(&objects), node),
        );
        assert_eq!(a.state.cluster.workloads, b.state.cluster.workloads);
        assert_eq!(a.nodes, b.nodes);
        assert_eq!(a.identities, b.identities);
        assert_eq!(a.local, b.local, "{node}'s endpoints");
        assert_eq!(a.compiled, b.compiled, "{node}'s policy entries");
        assert_eq!(a.services.cluster_ips(), b.services.cluster_ips());
        assert_eq!(
            serde_json::to_value(&a.gateway.status).expect("json"),
            serde_json::to_value(&b.gateway.status).expect("json")
        );
        assert_eq!(a.local_identities(), b.local_identities());
    }
    // And the content is what the manifests say.
    let a = build(Source::Objects(&objects), "node-a");
    assert_eq!(a.local.len(), 1, "web-0 is node-a's only pod");
    let b = build(Source::Objects(&objects), "node-b");
    assert!(
        !b.compiled.entries.is_empty(),
        "api-0 is selected by a policy"
    );
    assert_eq!(
        b.services.pick("10.96.0.5:80".parse().expect("vip")),
        Some("10.2.0.2:8080".parse().expect("endpoint")),
        "the Endpoints object is mirrored"
    );
    assert!(
        b.identities
            .keys()
            .any(|id| id.as_str() == "spiffe://cluster.local/ns/shop/gateway/public"),
        "the gateway has a number"
    );
    let route = &b.gateway.status.http_routes[0].parents[0].conditions;
    assert!(
        route.iter().any(|c| c.reason == "BackendNotFound"),
        "{route:?}"
    );
}

#[test]
fn invalid_api_objects_are_named_and_refused_whole() {
    let mut objects = objects_of(CLUSTER);
    objects.policy.policies[0]
        .spec
        .ingress
        .as_mut()
        .expect("ingress")[0]
        .from[0]
        .identity = Some("not-a-spiffe-id".into());
    objects.nodes[1].status = None;
    let err = snapshot::load_source(
        Source::Objects(&objects),
        &TrustDomain::parse("cluster.local").expect("td"),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("IdentityPolicy shop/api: `spec.ingress[0].from[0].identity`"),
        "{err}"
    );
    assert!(err.contains("Node node-b: needs status.addresses"), "{err}");
}

#[test]
fn a_gateway_is_served_and_its_identity_held_only_where_it_is_placed() {
    use signet_ca::placement::NODES_ANNOTATION;
    let text = format!(
        "{CLUSTER}{}",
        tls_secret("shop", "shop-tls", "shop.example.test")
    );
    let mut objects = objects_of(&text);
    let gw = "spiffe://cluster.local/ns/shop/gateway/public";
    let holds = |snap: &Snapshot| snap.local_identities().iter().any(|i| i.as_str() == gw);
    // Without a placement every node serves it.
    for node in ["node-a", "node-b"] {
        let snap = build(Source::Objects(&objects), node);
        assert!(!snap.gateway.ports.is_empty() && holds(&snap), "{node}");
    }
    objects.nodes[0].metadata.labels = Some(
        [(
            "node-restriction.kubernetes.io/edge".to_owned(),
            "true".to_owned(),
        )]
        .into(),
    );
    let place = |objects: &mut ClusterObjects, selector: &str| {
        objects.gateway.gateways[0].metadata.annotations =
            Some([(NODES_ANNOTATION.to_owned(), selector.to_owned())].into());
    };
    place(&mut objects, "node-restriction.kubernetes.io/edge=true");
    let a = build(Source::Objects(&objects), "node-a");
    let b = build(Source::Objects(&objects), "node-b");
    assert_eq!(a.gateway.ports.len(), 1, "node-a is an edge node");
    assert!(a.gateway.ports[0].tls.is_some());
    assert!(holds(&a));
    assert!(b.gateway.ports.is_empty(), "node-b serves nothing");
    assert!(!holds(&b), "node-b asks for no certificate of the Gateway");
    // Policy on every node can still name it: it has a number everywhere.
    assert!(b.identities.keys().any(|i| i.as_str() == gw));
    let accepted = &a.gateway.status.gateways[0].conditions[0];
    assert!(
        accepted
            .message
            .contains("nodes labelled node-restriction.kubernetes.io/edge=true"),
        "{accepted:?}"
    );
    // A placement that does not parse: served nowhere, and the status says why.
    place(&mut objects, "node-restriction.kubernetes.io/edge!=true");
    for node in ["node-a", "node-b"] {
        let snap = build(Source::Objects(&objects), node);
        assert!(snap.gateway.ports.is_empty() && !holds(&snap), "{node}");
        let accepted = &snap.gateway.status.gateways[0].conditions[0];
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "InvalidParameters")
        );
        assert!(
            accepted
                .message
                .contains("node-restriction.kubernetes.io/edge!=true"),
            "{accepted:?}"
        );
    }
}

/// What `snap` enforces for shop/api: the policy's ingress peers, if it is there at all.
fn api_policy(snap: &Snapshot) -> Option<Vec<String>> {
    snap.state
        .policies
        .iter()
        .find(|p| p.resource.metadata.name.as_deref() == Some("api"))
        .map(|p| {
            p.resource
                .spec
                .ingress
                .iter()
                .flatten()
                .flat_map(|r| r.from.iter())
                .map(|f| {
                    f.identity
                        .clone()
                        .unwrap_or_else(|| format!("{:?}", f.entity))
                })
                .collect()
        })
}

#[test]
fn one_invalid_object_keeps_its_last_valid_version_and_holds_nothing_else_back() {
    let td = TrustDomain::parse("cluster.local").expect("td");
    let settle_and_build = |last_good: &mut LastGood, mut objects: ClusterObjects| {
        // Status speaks of the objects as listed; the snapshot is built from the settled ones.
        let status = status::policy_conditions(&objects, &td);
        let refused = last_good.settle(&mut objects);
        let snap = build(Source::Objects(&objects), "node-b");
        (refused, snap, status)
    };
    let mut last_good = LastGood::default();
    let (refused, before, _) = settle_and_build(&mut last_good, objects_of(CLUSTER));
    assert!(refused.is_empty(), "{refused:?}");
    let enforced = api_policy(&before).expect("shop/api is in force");
    assert_eq!(
        before.nodes.get("node-b"),
        Some(&"10.0.0.2".parse().expect("ip"))
    );

    // The policy gets an invalid peer, node-b loses its InternalIP, and beside them a valid
    // change: a second policy, and a new pod.
    let broken = format!(
        "{CLUSTER}\
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {{name: db, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: db}}}}
  ingress: [{{from: [{{identity: spiffe://cluster.local/ns/shop/sa/api}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: db-0, namespace: shop, labels: {{app: db}}}}
spec: {{nodeName: node-b, serviceAccountName: db, containers: [{{name: c, image: c}}]}}
status: {{podIP: 10.2.0.3}}
"
    );
    let mut objects = objects_of(&broken);
    let api = objects
        .policy
        .policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("api"))
        .expect("api");
    api.spec.ingress.as_mut().expect("ingress")[0].from[0].identity =
        Some("not-a-spiffe-id".into());
    objects
        .nodes
        .iter_mut()
        .find(|n| n.metadata.name.as_deref() == Some("node-b"))
        .expect("node-b")
        .status = None;
    let (refused, after, status) = settle_and_build(&mut last_good, objects.clone());
    let mut names: Vec<_> = refused
        .iter()
        .map(|r| (r.object.as_str(), r.in_force))
        .collect();
    names.sort_by_key(|n| n.0);
    assert_eq!(
        names,
        [
            ("IdentityPolicy shop/api", InForce::Previous),
            ("Node node-b", InForce::Previous)
        ]
    );
    assert!(
        refused[0]
            .reason
            .contains("`spec.ingress[0].from[0].identity`"),
        "{refused:?}"
    );
    // The last valid versions stay in force...
    assert_eq!(api_policy(&after).as_ref(), Some(&enforced));
    assert_eq!(
        after.nodes.get("node-b"),
        Some(&"10.0.0.2".parse().expect("ip"))
    );
    // ...and the valid changes take effect.
    assert!(
        after
            .state
            .policies
            .iter()
            .any(|p| p.resource.metadata.name.as_deref() == Some("db")),
        "the new policy is in force"
    );
    assert_eq!(after.local.len(), 2, "db-0 is node-b's second endpoint");
    // Status says which is which.
    let said = |name: &str| status[&("shop".to_owned(), name.to_owned())].clone();
    assert_eq!(
        (said("api")[1].1, said("api")[1].2),
        (false, "LastValidVersion")
    );
    assert_eq!((said("db")[1].1, said("db")[1].2), (true, "Applied"));

    // An agent that starts with the invalid objects present starts with the others.
    // Never seen valid, the policy fails closed: a deny-all for what it selects and declares
    // (here ingress to app: api); the Node is left out.
    let (refused, fresh, _) = settle_and_build(&mut LastGood::default(), objects.clone());
    let stand_ins: Vec<_> = refused.iter().map(|r| r.in_force).collect();
    assert!(stand_ins.contains(&InForce::DenyAll) && stand_ins.contains(&InForce::Nothing));
    assert_eq!(
        api_policy(&fresh),
        Some(vec![]),
        "never seen valid: deny-all"
    );
    let deny = fresh
        .state
        .policies
        .iter()
        .find(|p| p.resource.metadata.name.as_deref() == Some("api"))
        .expect("stand-in");
    assert!(
        deny.resource.spec.egress.is_none(),
        "only the directions it declares"
    );
    assert_eq!(
        deny.resource.spec.selector.match_labels,
        objects.policy.policies[0].spec.selector.match_labels
    );
    assert!(!fresh.nodes.contains_key("node-b"));
    assert!(fresh.nodes.contains_key("node-a"));
    assert_eq!(fresh.local.len(), 2);

    // Fixed, the object's new version replaces the remembered one; deleted, it is forgotten.
    let (refused, fixed, _) = settle_and_build(&mut last_good, objects_of(&broken));
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(api_policy(&fixed).as_ref(), Some(&enforced));
    let mut gone = objects_of(&broken);
    gone.policy
        .policies
        .retain(|p| p.metadata.name.as_deref() != Some("api"));
    last_good.settle(&mut gone);
    let mut again = objects_of(&broken);
    again
        .policy
        .policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("api"))
        .expect("api")
        .spec
        .ingress
        .as_mut()
        .expect("ingress")[0]
        .from[0]
        .identity = Some("bad".into());
    let (refused, back, _) = settle_and_build(&mut last_good, again.clone());
    assert_eq!(refused.len(), 1);
    assert_eq!(
        refused[0].in_force,
        InForce::DenyAll,
        "a deleted policy's old version does not come back"
    );
    assert_eq!(api_policy(&back), Some(vec![]));
    // A selector that is itself invalid: the whole namespace is denied, not nobody.
    let api = again
        .policy
        .policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("api"))
        .expect("api");
    api.spec.selector.match_labels = Some([("not a key!".to_owned(), "x".to_owned())].into());
    let mut fresh = LastGood::default();
    let (refused, whole, _) = settle_and_build(&mut fresh, again);
    assert_eq!(refused[0].in_force, InForce::DenyAll, "{refused:?}");
    let deny = whole
        .state
        .policies
        .iter()
        .find(|p| p.resource.metadata.name.as_deref() == Some("api"))
        .expect("stand-in");
    assert_eq!(deny.resource.spec.selector, Default::default());
}

#[test]
fn placement_annotations_are_believed_only_in_the_local_topology() {
    let objects = objects_of(CLUSTER);
    let trusted = build_with(Source::Objects(&objects), PodAnnotations::Trusted, "node-a");
    assert_eq!(trusted.local[0].cgroup.as_deref(), Some("web-0".as_ref()));
    assert!(trusted.ignored_annotations.is_empty());
    // In a cluster a tenant writes its pod's annotations: web-0 stays an endpoint, found by its
    // UID, and the annotation naming a cgroup is reported, not followed.
    let cluster = build_with(Source::Objects(&objects), PodAnnotations::Ignored, "node-a");
    assert_eq!(cluster.local.len(), 1);
    assert_eq!(cluster.local[0].cgroup, None);
    assert_eq!(cluster.local[0].host_interface, None);
    assert_eq!(cluster.ignored_annotations, ["shop/web-0"]);
    // The agent's configuration decides: API source without `localTopology` ignores them.
    let dir = tempfile::tempdir().expect("tmp");
    let config = |extra: &str| {
        let root = dir.path().join("root.pem");
        std::fs::write(
            &root,
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        )
        .expect("root");
        let token = dir.path().join("token");
        std::fs::write(&token, "t").expect("token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let text = format!(
            "node: node-a\nkubernetes: true\n{extra}ca: {{address: '127.0.0.1:15012', rootCertFile: {}, tokenFile: {}}}\n\
             datapath: {{cgroupRoot: /sys/fs/cgroup}}\n\
             listen: {{outbound: '127.0.0.1:15001', inbound: '127.0.0.1:15008', admin: '127.0.0.1:15020'}}\n",
            root.display(),
            token.display()
        );
        signet_agent::config::AgentConfig::parse(&text, &dir.path().join("agent.yaml"), dir.path())
            .expect("config")
            .cluster
            .pod_annotations
    };
    assert_eq!(config(""), PodAnnotations::Ignored);
    assert_eq!(config("localTopology: true\n"), PodAnnotations::Trusted);
}

/// Two live pods on one address, a pod on a node's own address, one outside its node's
/// podCIDRs, and a hostNetwork pod beside them.
const CLAIMS: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDRs: [10.1.0.0/24]}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop}
spec: {nodeName: node-b, serviceAccountName: db, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: impostor-0, namespace: evil}
spec: {nodeName: node-b, serviceAccountName: evil, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: thief-0, namespace: evil}
spec: {nodeName: node-a, serviceAccountName: evil, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: node-b-squatter, namespace: evil}
spec: {nodeName: node-b, serviceAccountName: evil, containers: [{name: c, image: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: exporter-a, namespace: monitoring}
spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: exporter, containers: [{name: c, image: c}]}
status: {podIP: 10.0.0.1}
---
";

#[test]
fn an_address_has_one_owner_or_none() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("all.yaml"), CLAIMS).expect("write");
    let objects = objects_of(CLAIMS);
    for snap in [
        build(Source::Dir(dir.path()), "node-a"),
        build(Source::Objects(&objects), "node-a"),
    ] {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        // Two pods on 10.2.0.9: neither gets it, whatever their order.
        assert!(snap.pod_by_ip(ip("10.2.0.9")).is_none());
        assert!(snap.refused_ips[&ip("10.2.0.9")].contains("evil/impostor-0, shop/db-0"));
        // node-a may not hand out an address outside its podCIDRs.
        assert!(snap.pod_by_ip(ip("10.2.0.7")).is_none());
        assert!(snap.refused_ips[&ip("10.2.0.7")].contains("outside node-a's podCIDRs"));
        // No pod is a node.
        assert!(snap.pod_by_ip(ip("10.0.0.2")).is_none());
        assert!(snap.refused_ips[&ip("10.0.0.2")].contains("node node-b's own address"));
        // A hostNetwork pod is the node: no workload, no claim, no identity of its own.
        assert!(snap.pod_by_ip(ip("10.0.0.1")).is_none());
        assert!(!snap.refused_ips.contains_key(&ip("10.0.0.1")));
        assert!(
            !snap
                .identities
                .keys()
                .any(|id| id.as_str().ends_with("/sa/exporter"))
        );
        assert_eq!(
            snap.local.len(),
            2,
            "web-0 and thief-0 are node-a's endpoints"
        );
        // The legitimate pod beside them keeps its address.
        assert_eq!(
            snap.pod_by_ip(ip("10.1.0.2")).map(|w| w.key()).as_deref(),
            Some("shop/web-0")
        );
        assert_eq!(snap.refused_ips.len(), 3, "{:?}", snap.refused_ips);
    }
}

mod kubernetes {
    //! The Kubernetes source against the shared fake API server holding the same manifests (as
    //! real API objects). After the first sync the source holds exactly those objects, and
    //! follows later changes through its watches.

    use signet_agent::state::kube::KubeSource;
    use signet_test_support::api::FakeApi;
    use signet_test_support::wait_until;
    use tokio_util::sync::CancellationToken;

    /// An API server holding the manifests' objects, and the CA's copy of shop/shop-tls in
    /// signet-gateway-tls (see `tls_copies`), stored as the API stores it: base64 `data`.
    fn api_server(manifests: &str) -> FakeApi {
        let api = FakeApi::from_yaml(manifests);
        let mut copy: serde_json::Value = serde_yaml::from_str(
            super::tls_secret(
                "signet-gateway-tls",
                "gateway-tls.shop.shop-tls",
                "shop.example.test",
            )
            .strip_suffix("---\n")
            .expect("one document"),
        )
        .expect("secret");
        copy["metadata"]["annotations"] = serde_json::json!({
            "signet.dev/source-namespace": "shop", "signet.dev/source-name": "shop-tls"});
        let mut data = serde_json::Map::new();
        for (k, v) in copy["stringData"].as_object().expect("stringData") {
            let bytes = v.as_str().expect("text").as_bytes().to_vec();
            data.insert(
                k.clone(),
                serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("b64"),
            );
        }
        copy.as_object_mut().expect("object").remove("stringData");
        copy["data"] = serde_json::Value::Object(data);
        api.put(copy);
        api
    }

    fn names<T: serde::Serialize>(list: &[T]) -> Vec<String> {
        let mut v: Vec<String> = list
            .iter()
            .map(|o| {
                let j = serde_json::to_value(o).expect("json");
                format!("{}/{}", j["metadata"]["namespace"], j["metadata"]["name"])
            })
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn after_its_first_sync_the_kubernetes_source_holds_what_the_manifests_say() {
        let stop = CancellationToken::new();
        let api = api_server(super::CLUSTER);
        let source = KubeSource::start(api.client(), "signet-gateway-tls", &stop);
        tokio::time::timeout(std::time::Duration::from_secs(10), source.synced())
            .await
            .expect("every reflector synced");
        let got = source.objects();
        // What the API serves, as manifests: the cluster, and the Secret the CA's copy stands for.
        let want = super::objects_of(&format!(
            "{}{}",
            super::CLUSTER,
            super::tls_secret("shop", "shop-tls", "shop.example.test")
        ));
        assert_eq!(
            names(&got.policy.namespaces),
            names(&want.policy.namespaces)
        );
        assert_eq!(names(&got.policy.pods), names(&want.policy.pods));
        assert_eq!(names(&got.policy.policies), names(&want.policy.policies));
        assert_eq!(names(&got.services), names(&want.services));
        assert_eq!(names(&got.endpoints), names(&want.endpoints));
        assert_eq!(names(&got.nodes), names(&want.nodes));
        assert_eq!(names(&got.gateway.classes), names(&want.gateway.classes));
        assert_eq!(names(&got.gateway.gateways), names(&want.gateway.gateways));
        assert_eq!(names(&got.gateway.routes), names(&want.gateway.routes));
        assert!(!got.policy.pods.is_empty());
        // The CA's copy in signet-gateway-tls reads as the Secret the Gateway names.
        assert_eq!(names(&got.gateway.secrets), names(&want.gateway.secrets));
        assert_eq!(names(&got.gateway.secrets), ["\"shop\"/\"shop-tls\""]);
        let status = super::build(super::Source::Objects(&got), "node-a")
            .gateway
            .status;
        let listener = &status.gateways[0].listeners[0];
        assert!(
            listener.conditions.iter().all(|c| c.status == "True"),
            "the certificate resolves: {listener:?}"
        );
        // And they build the same snapshot as the manifests.
        for node in ["node-a", "node-b"] {
            let a = super::build(super::Source::Objects(&got), node);
            let b = super::build(super::Source::Objects(&want), node);
            assert_eq!(a.compiled, b.compiled, "{node}");
            // The API server gives every object a uid; the manifests carry none.
            let without_uid = |local: &[signet_agent::state::snapshot::LocalEndpoint]| {
                let mut local = local.to_vec();
                for e in &mut local {
                    e.uid = None;
                }
                local
            };
            assert!(
                a.local.iter().all(|e| e.uid.is_some()),
                "{node}: {:?}",
                a.local
            );
            assert_eq!(without_uid(&a.local), without_uid(&b.local), "{node}");
        }
        // Later changes arrive through the watches: a policy deleted is gone from the source.
        let policy = got.policy.policies.first().expect("a policy");
        let (ns, name) = (
            policy.metadata.namespace.clone().expect("namespaced"),
            policy.metadata.name.clone().expect("named"),
        );
        api.delete("signet.dev/v1alpha1", "IdentityPolicy", &ns, &name);
        wait_until("the deleted policy to leave the source", || {
            let now = source.objects();
            (now.policy.policies.len() + 1 == got.policy.policies.len()).then_some(())
        })
        .await;
        stop.cancel();
    }
}

const POOLS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: edge}
spec: {blocks: [{start: 10.99.100.10, stop: 10.99.100.12}]}
---
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {name: overlapping}
spec: {blocks: [{cidr: 10.99.100.8/29}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: a, namespace: edge, creationTimestamp: '2026-01-01T00:00:00Z'}
spec: {gatewayClassName: signet, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: b, namespace: edge, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  gatewayClassName: signet
  addresses: [{type: IPAddress, value: 10.99.100.12}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: named, namespace: edge}
spec:
  gatewayClassName: signet
  addresses: [{type: Hostname, value: edge.example}]
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, creationTimestamp: '2026-01-02T00:00:00Z', annotations: {signet.dev/lb-ips: 'not-an-ip'}}
spec: {type: LoadBalancer, clusterIP: 10.96.0.9, ports: [{port: 443}]}
";

/// Standalone addresses: every agent of the machine settles the same table under its lock, so
/// two agents racing agree; the record survives restarts; what cannot be given is said.
#[test]
fn standalone_agents_share_one_address_table_and_its_record_survives_restarts() {
    use signet_agent::state::lbipam::AddressTable;
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::write(state.join("pools.yaml"), POOLS).expect("write");
    let mut errors = Vec::new();
    let objects = snapshot::read_objects(&state, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let table = AddressTable::beside(&dir.path().join("identities.json"));
    assert_eq!(table.path(), dir.path().join("addresses.json"));

    // Two agents at once (threads: the lock is a file lock, as between two processes).
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| table.settle(&objects).expect("settle")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(results[0], results[1], "both agents decide the same");
    let record = table.read().expect("read");
    let given: Vec<String> = record
        .iter()
        .map(|(ip, (pool, o))| format!("{ip} {pool} {o}"))
        .collect();
    assert_eq!(
        given,
        [
            "10.99.100.10 edge Gateway edge/a",
            "10.99.100.12 edge Gateway edge/b"
        ]
    );

    let td = TrustDomain::parse("cluster.local").expect("td");
    let status = snapshot::gateway_status(&state, &record, &td).expect("status");
    let gw = |name: &str| status.gateways.iter().find(|g| g.name == name).expect(name);
    let programmed = |name: &str| {
        gw(name)
            .conditions
            .iter()
            .map(|c| format!("{} {} {}", c.type_, c.status, c.reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(gw("a").addresses, ["10.99.100.10"]);
    assert_eq!(gw("b").addresses, ["10.99.100.12"]);
    // Identical listeners on :80, created in the same second: each Gateway is Programmed on
    // its own address (neither conflicts with the other).
    for g in ["a", "b"] {
        assert!(
            programmed(g).contains(&"Programmed True Programmed".to_owned()),
            "{g}: {:?}",
            programmed(g)
        );
    }
    assert_eq!(
        programmed("named"),
        ["Accepted False UnsupportedAddress"],
        "{:?}",
        gw("named").conditions
    );
    let pools = &status.addresses.pools;
    let overlapping = pools
        .iter()
        .find(|p| p.name == "overlapping")
        .expect("pool");
    assert_eq!(
        overlapping.conditions[0].reason, "Conflict",
        "{overlapping:?}"
    );
    let edge = pools.iter().find(|p| p.name == "edge").expect("pool");
    assert_eq!(
        (edge.total.as_str(), edge.used.as_str(), edge.free.as_str()),
        ("3", "2", "1")
    );
    let api = &status.addresses.services[0];
    assert_eq!(
        (
            api.name.as_str(),
            api.condition.status.as_str(),
            api.condition.reason.as_str()
        ),
        ("api", "False", "AddressNotUsable")
    );
    assert!(
        api.condition.message.contains("signet.dev/lb-ips")
            && api.condition.message.contains("not-an-ip"),
        "{api:?}"
    );

    // A restart (a new table handle on the same file) keeps every address; an older Gateway
    // created later does not take one that is given.
    let mut more = POOLS.to_owned();
    more.push_str(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: c, namespace: edge, creationTimestamp: '2025-01-01T00:00:00Z'}\n\
         spec: {gatewayClassName: signet, listeners: [{name: http, port: 80, protocol: HTTP}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: d, namespace: edge, creationTimestamp: '2026-02-01T00:00:00Z'}\n\
         spec: {gatewayClassName: signet, listeners: [{name: http, port: 80, protocol: HTTP}]}\n",
    );
    std::fs::write(state.join("pools.yaml"), more).expect("write");
    let objects = snapshot::read_objects(&state, &mut errors);
    let after = AddressTable::new(table.path())
        .settle(&objects)
        .expect("settle");
    let mine = |o: &str| after.gateway("edge", o);
    use signet_agent::state::lbipam::GatewayAddresses;
    assert_eq!(
        mine("a"),
        GatewayAddresses::Assigned(vec!["10.99.100.10".parse().expect("address")])
    );
    assert_eq!(
        mine("c"),
        GatewayAddresses::Assigned(vec!["10.99.100.11".parse().expect("address")])
    );
    // The pool is used up: the newest Gateway is not served, and says why; nothing is
    // recorded for it.
    match mine("d") {
        GatewayAddresses::Refused {
            condition,
            reason,
            message,
        } => {
            assert_eq!((condition, reason), ("Programmed", "AddressNotAssigned"));
            assert!(message.contains("no free address"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(table.read().expect("read").len(), 3);
    let status =
        snapshot::gateway_status(&state, &table.read().expect("read"), &td).expect("status");
    let d = status.gateways.iter().find(|g| g.name == "d").expect("d");
    assert!(d.addresses.is_empty());

    // A corrupt table is refused with its path named, and nothing is written over it.
    std::fs::write(table.path(), "{not json").expect("write");
    let e = table.settle(&objects).expect_err("corrupt").to_string();
    assert!(
        e.contains("addresses.json") && e.contains("not an address table"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(table.path()).expect("read"),
        "{not json"
    );
}
