//! `signet-ca serve` in Kubernetes mode, the real binary end to end, against an API server fake
//! served over HTTP on loopback and reached through a kubeconfig, so kube-rs's whole client stack
//! (config, connector, lists, watches, creates, updates, server-side apply) is exercised. The
//! fake answers with real Kubernetes objects: Pods, TokenReviews, Secrets, Leases, ConfigMaps.
//!
//! Two replicas: the first generates the keys (root and intermediate) into Secret
//! `signet-ca-keys` and takes Lease `signet-ca-rotation`; the second signs with the same
//! intermediate without creating anything. Agents authenticate with a bound token checked by
//! TokenReview and get SVIDs only for pods on their own node.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
use signet_ca::verify::SvidRoots;

type Reply = Response<UnsyncBoxBody<Bytes, Infallible>>;

const NS: &str = "signet-system";
const AGENT_TOKEN: &str = "agent-on-node-a";

/// What the fake API server holds and saw.
#[derive(Default)]
struct Cluster {
    secrets: BTreeMap<String, (u64, serde_json::Value)>,
    leases: BTreeMap<String, (u64, serde_json::Value)>,
    root_configmap: Option<serde_json::Value>,
    version: u64,
    secret_creates: usize,
    token_reviews: usize,
    unexpected: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn reply(code: StatusCode, v: &serde_json::Value) -> Reply {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("response")
}

fn failure(code: StatusCode, reason: &str) -> Reply {
    reply(
        code,
        &serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": reason, "code": code.as_u16(), "message": reason}),
    )
}

fn list(kind: &str, items: Vec<serde_json::Value>) -> Reply {
    reply(
        StatusCode::OK,
        &serde_json::json!({"apiVersion": "v1", "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

fn pod(name: &str, ns: &str, node: &str, sa: &str, uid: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]}})
}

/// Objects by name with the API server's optimistic concurrency: create fails with 409 when the
/// name exists, update fails with 409 unless it carries the current resourceVersion.
fn crud(
    objects: &mut BTreeMap<String, (u64, serde_json::Value)>,
    version: &mut u64,
    method: &Method,
    name: &str,
    body: &[u8],
) -> Reply {
    let stamp = |v: u64, mut o: serde_json::Value| {
        o["metadata"]["resourceVersion"] = serde_json::json!(v.to_string());
        o
    };
    match *method {
        Method::GET => match objects.get(name) {
            Some((v, o)) => reply(StatusCode::OK, &stamp(*v, o.clone())),
            None => failure(StatusCode::NOT_FOUND, "NotFound"),
        },
        Method::POST => {
            let o: serde_json::Value = serde_json::from_slice(body).expect("object");
            let name = o["metadata"]["name"].as_str().expect("named").to_owned();
            if objects.contains_key(&name) {
                return failure(StatusCode::CONFLICT, "AlreadyExists");
            }
            *version += 1;
            objects.insert(name, (*version, o.clone()));
            reply(StatusCode::CREATED, &stamp(*version, o))
        }
        Method::PUT => {
            let o: serde_json::Value = serde_json::from_slice(body).expect("object");
            let Some((current, _)) = objects.get(name) else {
                return failure(StatusCode::NOT_FOUND, "NotFound");
            };
            if o["metadata"]["resourceVersion"].as_str() != Some(current.to_string().as_str()) {
                return failure(StatusCode::CONFLICT, "Conflict");
            }
            *version += 1;
            objects.insert(name.to_owned(), (*version, o.clone()));
            reply(StatusCode::OK, &stamp(*version, o))
        }
        _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
    }
}

fn review(body: &[u8]) -> Reply {
    let asked: k8s_openapi::api::authentication::v1::TokenReview =
        serde_json::from_slice(body).expect("a TokenReview");
    let spec = asked.spec;
    assert_eq!(
        spec.audiences.as_deref(),
        Some(&["signet-ca".to_owned()][..])
    );
    let status = if spec.token.as_deref() == Some(AGENT_TOKEN) {
        serde_json::json!({"authenticated": true, "audiences": ["signet-ca"],
            "user": {"username": "system:serviceaccount:signet-system:signet-agent",
                "extra": {"authentication.kubernetes.io/pod-name": ["signet-agent-a"],
                          "authentication.kubernetes.io/pod-uid": ["uid-agent-a"],
                          "authentication.kubernetes.io/node-name": ["node-a"]}}})
    } else {
        serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
    };
    reply(
        StatusCode::CREATED,
        &serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {}, "spec": spec, "status": status}),
    )
}

async fn answer(req: Request<Incoming>, cluster: Shared) -> Result<Reply, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let path = parts.uri.path().to_owned();
    if parts.uri.query().unwrap_or("").contains("watch=true") {
        // Nothing changes while the test runs: an open, quiet watch.
        let quiet = futures::stream::pending::<Result<Frame<Bytes>, Infallible>>();
        return Ok(Response::new(StreamBody::new(quiet).boxed_unsync()));
    }
    let mut c = cluster.lock().expect("cluster");
    let c = &mut *c;
    let secrets = format!("/api/v1/namespaces/{NS}/secrets");
    let leases = format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases");
    Ok(match path.as_str() {
        "/api/v1/pods" => list(
            "Pod",
            vec![
                pod("web-0", "shop", "node-a", "web", "uid-web"),
                pod("db-0", "shop", "node-b", "db", "uid-db"),
                pod(
                    "signet-agent-a",
                    NS,
                    "node-a",
                    "signet-agent",
                    "uid-agent-a",
                ),
            ],
        ),
        // node-a is an edge node; node-b is not.
        "/api/v1/nodes" => list(
            "Node",
            vec![
                serde_json::json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "node-a", "labels": {"node-restriction.kubernetes.io/edge": "true"}}}),
                serde_json::json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": "node-b", "labels": {}}}),
            ],
        ),
        "/apis/gateway.networking.k8s.io/v1/gatewayclasses" => list(
            "GatewayClass",
            vec![serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": {"name": "signet"},
                "spec": {"controllerName": "signet.dev/gateway-controller"}})],
        ),
        // One Gateway on the edge nodes, one on nodes of another role.
        "/apis/gateway.networking.k8s.io/v1/gateways" => list(
            "Gateway",
            [
                ("public", "node-restriction.kubernetes.io/edge=true"),
                ("internal", "node-restriction.kubernetes.io/role=internal"),
            ]
            .iter()
            .map(|(name, nodes)| {
                serde_json::json!({
                        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                        "metadata": {"name": name, "namespace": "edge",
                                     "annotations": {"signet.dev/nodes": nodes}},
                        "spec": {"gatewayClassName": "signet", "listeners": [
                            {"name": "http", "port": 8080, "protocol": "HTTP"}]}})
            })
            .collect(),
        ),
        "/apis/gateway.networking.k8s.io/v1/referencegrants" => list("Dynamic", vec![]),
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            c.token_reviews += 1;
            review(&body)
        }
        p if p == format!("/api/v1/namespaces/{NS}/configmaps/signet-ca-root") => {
            assert_eq!(parts.method, Method::PATCH, "server-side apply");
            let cm: serde_json::Value = serde_json::from_slice(&body).expect("configmap");
            c.root_configmap = Some(cm.clone());
            reply(StatusCode::OK, &cm)
        }
        // The Gateway TLS copies, in their own namespace (the CA never lists its own).
        "/api/v1/namespaces/signet-gateway-tls/secrets" if parts.method == Method::GET => {
            list("Secret", vec![])
        }
        p if p == secrets => {
            c.secret_creates += 1;
            crud(&mut c.secrets, &mut c.version, &parts.method, "", &body)
        }
        p if p.starts_with(&format!("{secrets}/")) => {
            let name = &p[secrets.len() + 1..];
            crud(&mut c.secrets, &mut c.version, &parts.method, name, &body)
        }
        p if p == leases || p.starts_with(&format!("{leases}/")) => {
            let name = p.get(leases.len() + 1..).unwrap_or("");
            crud(&mut c.leases, &mut c.version, &parts.method, name, &body)
        }
        other => {
            c.unexpected.push(format!("{} {other}", parts.method));
            failure(StatusCode::NOT_FOUND, "NotFound")
        }
    })
}

/// Serves the fake on 127.0.0.1; returns its URL.
async fn api_server(cluster: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, cluster.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

/// One `signet-ca serve` process; killed when dropped.
struct Replica {
    child: Child,
    addr: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn start(dir: &Path, url: &str, pod_name: &str) -> Replica {
    let home = dir.join(pod_name);
    std::fs::create_dir_all(home.join("tmp")).expect("mkdir");
    let kubeconfig = home.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: ca, user: {{token: ca-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: ca, namespace: {NS}}}}}]\n"
        ),
    )
    .expect("kubeconfig");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = home.join("ca.yaml");
    std::fs::write(
        &config,
        format!(
            "trustDomain: cluster.local\nlisten: {addr}\ncaSecret: signet-ca-keys\n\
             kubernetes: true\nservingNames: [localhost]\n"
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_signet-ca"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env("TMPDIR", home.join("tmp"))
        .env("POD_NAME", pod_name)
        .env("SIGNET_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("signet-ca starts");
    Replica { child, addr }
}

fn published_root(cluster: &Shared) -> Option<String> {
    let c = cluster.lock().expect("cluster");
    Some(
        c.root_configmap.as_ref()?["data"]["root-cert.pem"]
            .as_str()?
            .to_owned(),
    )
}

/// Connects as the agent on node-a once the replica serves.
async fn connect(replica: &mut Replica, root: &str, token: &str) -> CaClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = CaClient::connect(&replica.addr, "localhost", root, token).await {
            return client;
        }
        if let Ok(Some(status)) = replica.child.try_wait() {
            panic!("signet-ca exited early: {status}");
        }
        assert!(Instant::now() < deadline, "signet-ca did not serve");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .expect("csr")
}

fn lease_holder(cluster: &Shared) -> Option<String> {
    let c = cluster.lock().expect("cluster");
    let (_, lease) = c.leases.get("signet-ca-rotation")?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_secrets_keys_and_serve_agents_checked_by_tokenreview() {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster = Shared::default();
    let url = api_server(cluster.clone()).await;

    let mut a = start(dir.path(), &url, "signet-ca-a");
    let root = wait_for("the published root", || published_root(&cluster)).await;
    let mut client = connect(&mut a, &root, AGENT_TOKEN).await;
    let web = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").expect("id");
    let chain = client
        .create_certificate(&csr(), Duration::from_secs(600), Some(&web))
        .await
        .expect("web-0 runs on node-a");
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let ders: Vec<_> = chain
        .iter()
        .map(|p| {
            rustls_pki_types::CertificateDer::from(pem::parse(p).expect("pem").into_contents())
        })
        .collect();
    let roots = SvidRoots::new(
        signet_ca::TrustDomain::parse("cluster.local").expect("td"),
        &ders[2..],
    )
    .expect("roots");
    assert_eq!(
        roots
            .verify(
                &ders[0],
                &ders[1..2],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .expect("verifies"),
        web
    );
    let db = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").expect("id");
    let refused = client
        .create_certificate(&csr(), Duration::from_secs(600), Some(&db))
        .await
        .expect_err("db-0 runs on node-b");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    // A Gateway's identity goes only to a node that serves it.
    let public = SpiffeId::parse("spiffe://cluster.local/ns/edge/gateway/public").expect("id");
    client
        .create_certificate(&csr(), Duration::from_secs(600), Some(&public))
        .await
        .expect("node-a is an edge node: it serves edge/public");
    let internal = SpiffeId::parse("spiffe://cluster.local/ns/edge/gateway/internal").expect("id");
    let refused = client
        .create_certificate(&csr(), Duration::from_secs(600), Some(&internal))
        .await
        .expect_err("edge/internal is served by other nodes");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(
        refused
            .message()
            .contains("served by nodes labelled node-restriction.kubernetes.io/role=internal"),
        "{refused}"
    );
    // One token costs one TokenReview, however many requests carry it.
    assert_eq!(
        cluster.lock().expect("cluster").token_reviews,
        1,
        "four requests, one review of the agent's token"
    );
    // A pod flooding the CA with half-open connections (from 127.0.0.2) takes only its own
    // share of them: the agent connecting beside it is served.
    let ca_addr: std::net::SocketAddr = a.addr.parse().expect("addr");
    let flood: Vec<socket2::Socket> = (0..300)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
                .expect("bind 127.0.0.2");
            s.connect(&ca_addr.into()).expect("connect");
            s
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Once, not retried: with one budget for everyone this connection would be dropped.
    let mut beside = tokio::time::timeout(
        Duration::from_secs(3),
        CaClient::connect(&a.addr, "localhost", &root, AGENT_TOKEN),
    )
    .await
    .expect("connected in time beside the flood")
    .expect("connected beside the flood");
    tokio::time::timeout(
        Duration::from_secs(5),
        beside.create_certificate(&csr(), Duration::from_secs(600), Some(&web)),
    )
    .await
    .expect("served in time beside the flood")
    .expect("served beside the flood");
    drop(flood);
    let mut stranger = connect(&mut a, &root, "not-a-token").await;
    let refused = stranger
        .create_certificate(&csr(), Duration::from_secs(600), Some(&web))
        .await
        .expect_err("unknown token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(cluster.lock().expect("cluster").token_reviews >= 2);
    wait_for("replica a to hold the rotation Lease", || {
        lease_holder(&cluster).filter(|h| h == "signet-ca-a")
    })
    .await;

    // The second replica finds the keys and signs with the same intermediate.
    let mut b = start(dir.path(), &url, "signet-ca-b");
    let mut client_b = connect(&mut b, &root, AGENT_TOKEN).await;
    let chain_b = client_b
        .create_certificate(&csr(), Duration::from_secs(600), Some(&web))
        .await
        .expect("replica b issues");
    assert_eq!(chain_b[1..], chain[1..], "same intermediate and root");
    {
        let c = cluster.lock().expect("cluster");
        assert_eq!(c.secrets.len(), 1);
        assert_eq!(c.secret_creates, 1, "replica b created nothing");
        assert!(
            c.unexpected.is_empty(),
            "unexpected requests: {:?}",
            c.unexpected
        );
    }
    assert_eq!(
        lease_holder(&cluster).as_deref(),
        Some("signet-ca-a"),
        "one holder"
    );

    // A replica stops cleanly on SIGTERM.
    nix_term(&b.child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = b.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "replica b did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}

fn nix_term(child: &Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // Through kill(1): the CA crate has no signal-sending dependency and no unsafe code.
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}
