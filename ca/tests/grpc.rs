//! End to end: the real CA server on loopback, real gRPC/TLS clients acting as two nodes, and an
//! mTLS handshake between the SVIDs it issued, each side checking the other's SPIFFE ID.

use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use signet_ca::client::CaClient;
use signet_ca::proto::istio::IstioCertificateRequest;
use signet_ca::proto::istio::istio_certificate_service_client::IstioCertificateServiceClient;
use signet_ca::server::CaServer;
use signet_ca::server::auth::sha256_hex;
use signet_ca::server::config::ServerConfig;
use signet_ca::verify::{SpiffeClientVerifier, SpiffeServerVerifier, SvidRoots, peer_spiffe_id};
use signet_ca::{SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, image: web}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec:
  nodeName: node-b
  serviceAccountName: db
  containers: [{name: db, image: db}]
"#;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

struct Ca {
    _dir: tempfile::TempDir,
    addr: String,
    root_pem: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), signet_ca::server::ServerError>>,
}

impl Ca {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("cluster")).expect("mkdir");
        std::fs::write(dir.path().join("cluster/pods.yaml"), PODS).expect("write pods");
        let yaml = format!(
            "trustDomain: cluster.local\nlisten: 127.0.0.1:0\nstateDir: ca\nclusterStateDir: cluster\n\
             nodes:\n- {{name: node-a, tokenSha256: {}}}\n- {{name: node-b, tokenSha256: {}}}\n",
            sha256_hex("token-a"),
            sha256_hex("token-b")
        );
        let config = ServerConfig::from_yaml(&yaml, &dir.path().join("ca.yaml"), dir.path())
            .expect("config");
        let server = CaServer::bind(config).await.expect("bind");
        let addr = server.local_addr().expect("addr").to_string();
        let root_pem = server.authority().bundle().to_pem();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            _dir: dir,
            addr,
            root_pem,
            shutdown,
            task,
        }
    }

    async fn client(&self, token: &str) -> CaClient {
        CaClient::connect(&self.addr, "localhost", &self.root_pem, token)
            .await
            .expect("connect")
    }

    /// A plain tonic client that sends whatever metadata the test gives it.
    async fn raw_client(&self) -> IstioCertificateServiceClient<tonic::transport::Channel> {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.root_pem))
            .domain_name("localhost");
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", self.addr))
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        IstioCertificateServiceClient::new(channel)
    }

    fn roots(&self) -> SvidRoots {
        let roots = pem::parse_many(&self.root_pem)
            .expect("pem")
            .into_iter()
            .map(|p| CertificateDer::from(p.into_contents()))
            .collect::<Vec<_>>();
        SvidRoots::new(TrustDomain::parse("cluster.local").expect("td"), &roots).expect("roots")
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("id")
}

fn csr(key: &KeyPair) -> String {
    // The CSR asks for a name the CA must ignore.
    let params =
        rcgen::CertificateParams::new(vec!["admin.evil.example".to_owned()]).expect("params");
    params
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}

struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

async fn obtain(client: &mut CaClient, who: &str) -> Svid {
    let key = KeyPair::generate().expect("key");
    let chain = client
        .create_certificate(&csr(&key), Duration::from_secs(600), Some(&id(who)))
        .await
        .unwrap_or_else(|s| panic!("{who}: {s}"));
    assert_eq!(chain.len(), 2, "leaf and root");
    let chain = chain
        .iter()
        .map(|p| CertificateDer::from(pem::parse(p).expect("pem").into_contents()))
        .collect::<Vec<_>>();
    assert_eq!(
        signet_ca::svid::spiffe_id_of(&chain[0])
            .expect("svid")
            .as_str(),
        who
    );
    Svid {
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Runs one mTLS exchange: `client` connects expecting `expect_server`; returns what the
/// server saw as the client's identity, or the client's handshake error.
async fn mtls(
    roots: &SvidRoots,
    client: &Svid,
    server: &Svid,
    expect_server: &str,
) -> Result<SpiffeId, String> {
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(SpiffeClientVerifier::new(roots.clone()))
        .with_single_cert(server.chain.clone(), server.key.clone_key())
        .expect("server config");
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            roots.clone(),
            id(expect_server),
        ))
        .with_client_auth_cert(client.chain.clone(), client.key.clone_key())
        .expect("client config");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer =
            peer_spiffe_id(tls.get_ref().1.peer_certificates()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.ok();
        Ok::<_, String>(peer)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("ignored.invalid").expect("name");
    let client_result = async {
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(())
    }
    .await;
    let server_result = server_task.await.expect("server task");
    client_result?;
    server_result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_get_svids_and_complete_mtls() {
    let ca = Ca::start().await;
    let mut node_a = ca.client("token-a").await;
    let mut node_b = ca.client("token-b").await;
    let web = obtain(&mut node_a, WEB).await;
    let db = obtain(&mut node_b, DB).await;

    // The CSR asked for a DNS name; the certificate carries only the authorised URI SAN.
    let (_, leaf) = x509_parser::parse_x509_certificate(web.chain[0].as_ref()).expect("leaf");
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    assert_eq!(san.value.general_names.len(), 1);

    let roots = ca.roots();
    let seen = mtls(&roots, &web, &db, DB)
        .await
        .expect("web -> db handshake");
    assert_eq!(
        seen.as_str(),
        WEB,
        "server authenticated the client's SPIFFE ID"
    );
    let seen = mtls(&roots, &db, &web, WEB)
        .await
        .expect("db -> web handshake");
    assert_eq!(seen.as_str(), DB);

    // A client expecting a different server identity refuses the handshake.
    let err = mtls(&roots, &web, &db, WEB)
        .await
        .expect_err("wrong server identity");
    assert!(err.contains(DB) && err.contains(WEB), "{err}");

    // The node agent may also obtain its own identity (no ImpersonatedIdentity).
    let key = KeyPair::generate().expect("key");
    let chain = node_a
        .create_certificate(&csr(&key), Duration::ZERO, None)
        .await
        .expect("agent identity");
    let leaf = CertificateDer::from(pem::parse(&chain[0]).expect("pem").into_contents());
    assert_eq!(
        signet_ca::svid::spiffe_id_of(&leaf).expect("svid").as_str(),
        "spiffe://cluster.local/ns/signet-system/sa/signet-agent"
    );

    let bundle = node_a.trust_bundle().await.expect("bundle");
    assert_eq!(bundle.trust_domain, "cluster.local");
    assert_eq!(bundle.roots_pem.concat(), ca.root_pem);
    assert!(bundle.spiffe_bundle_json.contains("\"x509-svid\""));

    ca.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), ca.task)
        .await
        .expect("drains within the grace period")
        .expect("task")
        .expect("server exits cleanly");
}

fn assert_status(result: Result<Vec<String>, tonic::Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "`{}` lacks `{n}`",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_the_server_keeps_serving() {
    let ca = Ca::start().await;
    let mut node_a = ca.client("token-a").await;
    let key = KeyPair::generate().expect("key");
    let good = csr(&key);
    let ttl = Duration::from_secs(600);

    // A node asking for a pod that runs on another node.
    assert_status(
        node_a.create_certificate(&good, ttl, Some(&id(DB))).await,
        Code::PermissionDenied,
        &[DB, "node-a"],
    );
    // An identity in a foreign trust domain.
    assert_status(
        node_a
            .create_certificate(&good, ttl, Some(&id("spiffe://evil.org/ns/shop/sa/web")))
            .await,
        Code::PermissionDenied,
        &["evil.org", "outside trust domain"],
    );
    // A bad token, and no token at all.
    let mut intruder = ca.client("not-a-token").await;
    assert_status(
        intruder
            .create_certificate(&good, ttl, Some(&id(WEB)))
            .await,
        Code::Unauthenticated,
        &["token"],
    );
    let mut raw = ca.raw_client().await;
    let status = raw
        .create_certificate(IstioCertificateRequest {
            csr: good.clone(),
            validity_duration: 600,
            metadata: None,
        })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("authorization"), "{status:?}");
    // A tampered CSR: one byte of the requested name changed after signing.
    let mut der = pem::parse(&good).expect("pem").into_contents();
    let at = der
        .windows(5)
        .position(|w| w == b"admin")
        .expect("name in CSR");
    der[at] = b'A';
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    assert_status(
        node_a
            .create_certificate(&tampered, ttl, Some(&id(WEB)))
            .await,
        Code::InvalidArgument,
        &["csr", "signature"],
    );
    // A TTL over the maximum (24 h).
    assert_status(
        node_a
            .create_certificate(&good, Duration::from_secs(25 * 3600), Some(&id(WEB)))
            .await,
        Code::InvalidArgument,
        &["exceeds the maximum"],
    );
    // An oversized CSR (over 64 KiB, under the 128 KiB message limit).
    let big = format!("{}{}", good, "A".repeat(70 * 1024));
    assert_status(
        node_a.create_certificate(&big, ttl, Some(&id(WEB))).await,
        Code::InvalidArgument,
        &["limit is 65536"],
    );
    // A message over the gRPC size limit is refused before it is decoded.
    let huge = "A".repeat(300 * 1024);
    let status = node_a
        .create_certificate(&huge, ttl, Some(&id(WEB)))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    // Garbage instead of a CSR.
    assert_status(
        node_a
            .create_certificate("hello", ttl, Some(&id(WEB)))
            .await,
        Code::InvalidArgument,
        &["csr"],
    );
    // An ImpersonatedIdentity that is not a SPIFFE ID.
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: good.clone(),
        validity_duration: 600,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "spiffe://cluster.local/ns/shop/sa/web/".into(),
                    )),
                },
            )]
            .into(),
        }),
    });
    req.metadata_mut()
        .insert("authorization", "Bearer token-a".parse().expect("ascii"));
    let status = raw.create_certificate(req).await.expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("must not end with `/`"),
        "{status:?}"
    );

    // After all of that the server still serves the same client.
    let ok = node_a
        .create_certificate(&good, ttl, Some(&id(WEB)))
        .await
        .expect("still serving");
    assert_eq!(ok.len(), 2);
    ca.shutdown.cancel();
}

/// The admin port: readiness, and a status that follows a root rotation (the new root is
/// pending beside the signing one, and no next rotation is planned while one is under way).
/// An admin address equal to the gRPC one is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_reports_the_roots_and_their_rotation() {
    use signet_ca::status::CaStatus;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("cluster")).expect("mkdir");
    std::fs::write(dir.path().join("cluster/pods.yaml"), PODS).expect("write pods");
    let yaml = "trustDomain: cluster.local\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstateDir: ca\n\
                clusterStateDir: cluster\nnodes: []\n";
    let config =
        ServerConfig::from_yaml(yaml, &dir.path().join("ca.yaml"), dir.path()).expect("config");
    let server = CaServer::bind(config).await.expect("bind");
    let admin = server.admin_addr().expect("an admin port");
    let authority = server.authority();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(admin)
            .await
            .expect("connect");
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    };
    let (line, _) = get("/healthz/ready").await;
    assert!(line.contains(" 200 "), "{line}");
    let (line, body) = get("/status").await;
    assert!(line.contains(" 200 "), "{line}");
    let status: CaStatus = serde_json::from_str(&body).expect("a CaStatus");
    assert_eq!(status.trust_domain, "cluster.local");
    assert_eq!(status.cluster_source, "standalone");
    assert_eq!(status.roots.roots.len(), 1);
    assert_eq!(status.roots.roots[0].state, "signing");
    let next = status.roots.next_rotation.expect("planned");
    assert!(next > status.roots.roots[0].not_before && next < status.roots.roots[0].not_after);

    let new = authority.rotate_root().expect("rotate");
    let (_, body) = get("/status").await;
    let status: CaStatus = serde_json::from_str(&body).expect("a CaStatus");
    let states: Vec<(Option<u32>, &str)> = status
        .roots
        .roots
        .iter()
        .map(|r| (r.id, r.state.as_str()))
        .collect();
    assert_eq!(states, [(Some(1), "signing"), (Some(new), "pending")]);
    assert_eq!(status.roots.next_rotation, None, "one rotation at a time");
    assert_eq!(status.roots.sequence, 2);
    let (line, _) = get("/nope").await;
    assert!(line.contains(" 404 "), "{line}");
    shutdown.cancel();

    let clash = "trustDomain: cluster.local\nlisten: 127.0.0.1:15999\nadmin: 127.0.0.1:15999\n\
                 stateDir: ca\nclusterStateDir: cluster\n";
    let err = ServerConfig::from_yaml(clash, &dir.path().join("ca.yaml"), dir.path())
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("admin 127.0.0.1:15999 is the gRPC listen address too"),
        "{err}"
    );
}
