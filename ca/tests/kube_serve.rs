//! `signet-ca serve` in Kubernetes mode, the real binary end to end, against an API server fake
//! served over HTTP on loopback and reached through a kubeconfig, so kube-rs's whole client stack
//! (config, connector, lists, watches, creates, updates, server-side apply) is exercised. The
//! fake answers with real Kubernetes objects: Pods, TokenReviews, Secrets, Leases, ConfigMaps.
//!
//! Two replicas: the first generates the keys (root and intermediate) into Secret
//! `signet-ca-keys` and takes Lease `signet-ca-rotation`; the second signs with the same
//! intermediate without creating anything. Agents authenticate with a bound token checked by
//! TokenReview and get SVIDs only for pods on their own node.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
use signet_ca::verify::SvidRoots;
use signet_test_support::api::FakeApi;
use signet_test_support::wait_until;

const NS: &str = "signet-system";
const AGENT_TOKEN: &str = "agent-on-node-a";

fn pod(name: &str, ns: &str, node: &str, sa: &str, uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]}})
}

/// The cluster the CA reads: pods on two nodes (node-a is an edge node, node-b is not), the
/// agent's pod, Signet's GatewayClass, and one Gateway on the edge nodes beside one on nodes of
/// another role. The agent's token is bound to its pod on node-a.
fn cluster() -> FakeApi {
    let gateway = |name: &str, nodes: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": "edge", "annotations": {"signet.dev/nodes": nodes}},
            "spec": {"gatewayClassName": "signet", "listeners": [
                {"name": "http", "port": 8080, "protocol": "HTTP"}]}})
    };
    let api = FakeApi::new(vec![
        pod("web-0", "shop", "node-a", "web", "uid-web"),
        pod("db-0", "shop", "node-b", "db", "uid-db"),
        pod(
            "signet-agent-node-a",
            NS,
            "node-a",
            "signet-agent",
            "uid-agent-node-a",
        ),
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"node-restriction.kubernetes.io/edge": "true"}}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b", "labels": {}}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "signet"},
            "spec": {"controllerName": "signet.dev/gateway-controller"}}),
        gateway("public", "node-restriction.kubernetes.io/edge=true"),
        gateway("internal", "node-restriction.kubernetes.io/role=internal"),
    ]);
    api.agent_token(AGENT_TOKEN, "node-a");
    api
}

fn token_reviews(api: &FakeApi) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.path.ends_with("/tokenreviews"))
        .count()
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

fn published_root(api: &FakeApi) -> Option<String> {
    let root = api.get("ConfigMap", NS, "signet-ca-root")?;
    Some(root["data"]["root-cert.pem"].as_str()?.to_owned())
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

fn lease_holder(api: &FakeApi) -> Option<String> {
    let lease = api.get("Lease", NS, "signet-ca-rotation")?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_secrets_keys_and_serve_agents_checked_by_tokenreview() {
    let dir = tempfile::tempdir().expect("tmp");
    let api = cluster();
    let url = api.serve_loopback();

    let mut a = start(dir.path(), &url, "signet-ca-a");
    let root = wait_until("the published root", || published_root(&api)).await;
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
        token_reviews(&api),
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
    assert!(token_reviews(&api) >= 2);
    wait_until("replica a to hold the rotation Lease", || {
        lease_holder(&api).filter(|h| h == "signet-ca-a")
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
    let requests = api.requests();
    let secret_creates = requests
        .iter()
        .filter(|r| r.verb == "create" && r.path.ends_with("/secrets"))
        .count();
    assert_eq!(api.objects("Secret").len(), 1);
    assert_eq!(secret_creates, 1, "replica b created nothing");
    let unexpected: Vec<String> = requests
        .iter()
        .filter(|r| r.code == 404 && r.verb != "get")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        unexpected.is_empty(),
        "requests for what the API does not serve: {unexpected:?}"
    );
    assert_eq!(
        lease_holder(&api).as_deref(),
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
