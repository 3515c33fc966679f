//! The certificate manager against the real CA server on loopback: SVIDs for the node's pods
//! and for the agent itself, rotation at half-life with the old certificate kept until the new
//! one arrives, and refusal (with retries, never a certificate) for a pod on another node; and
//! a root rotation followed through the CA's trust bundle.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use signet_agent::certs::{CertManager, fetch};
use signet_agent::clock::Clock;
use signet_agent::drain::Drain;
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
use signet_ca::server::CaServer;
use signet_ca::server::auth::sha256_hex;
use signet_ca::server::config::ServerConfig;
use signet_test_support::wait_until;
use tokio_util::sync::CancellationToken;

const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\nspec:\n  nodeName: node-a\n  serviceAccountName: web\n  containers: [{name: w, image: w}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: shop}\nspec:\n  nodeName: node-b\n  serviceAccountName: db\n  containers: [{name: d, image: d}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: api-0, namespace: shop}\nspec:\n  nodeName: node-a\n  serviceAccountName: api\n  containers: [{name: a, image: a}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: cache-0, namespace: shop}\nspec:\n  nodeName: node-a\n  serviceAccountName: cache\n  containers: [{name: c, image: c}]\n";

struct Ca {
    _dir: tempfile::TempDir,
    addr: String,
    root: String,
    authority: std::sync::Arc<signet_ca::CertificateAuthority>,
    stop: CancellationToken,
}

impl Drop for Ca {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn ca() -> Ca {
    ca_with("").await
}

/// A CA on loopback; `extra` adds configuration lines.
async fn ca_with(extra: &str) -> Ca {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("state")).expect("mkdir");
    std::fs::write(dir.path().join("state/pods.yaml"), PODS).expect("pods");
    let yaml = format!(
        "trustDomain: cluster.local\nlisten: 127.0.0.1:0\nstateDir: ca\nclusterStateDir: state\n\
         svid: {{minTtlSeconds: 2}}\nnodes: [{{name: node-a, tokenSha256: {}}}]\n{extra}",
        sha256_hex("token-a")
    );
    let config =
        ServerConfig::from_yaml(&yaml, &dir.path().join("ca.yaml"), dir.path()).expect("config");
    let server = CaServer::bind(config).await.expect("bind");
    let addr = server.local_addr().expect("addr").to_string();
    let root = server.authority().bundle().to_pem();
    let authority = server.authority();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Ca {
        _dir: dir,
        addr,
        root,
        authority,
        stop,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_this_node_and_the_agent_get_checked_certificates() {
    let ca = ca().await;
    let mut client = CaClient::connect(&ca.addr, "localhost", &ca.root, "token-a")
        .await
        .expect("connect");
    let web = fetch(
        &mut client,
        &id("spiffe://cluster.local/ns/shop/sa/web"),
        true,
        Duration::from_secs(600),
    )
    .await
    .expect("web");
    assert_eq!(web.chain.len(), 1, "leaf only; peers hold the root");
    let lifetime = web.not_after.duration_since(web.not_before).expect("order");
    assert!(
        (Duration::from_secs(600)..=Duration::from_secs(700)).contains(&lifetime),
        "{lifetime:?}"
    );
    let agent = id("spiffe://cluster.local/ns/signet-system/sa/signet-agent");
    fetch(&mut client, &agent, false, Duration::from_secs(600))
        .await
        .expect("agent identity");
    let err = fetch(
        &mut client,
        &id("spiffe://cluster.local/ns/shop/sa/db"),
        true,
        Duration::from_secs(600),
    )
    .await
    .expect_err("db runs on node-b");
    assert!(err.to_string().contains("node-a"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_at_half_life_and_the_old_one_serves_until_then() {
    let ca = ca().await;
    let client = CaClient::connect(&ca.addr, "localhost", &ca.root, "token-a")
        .await
        .expect("connect");
    let agent = id("spiffe://cluster.local/ns/signet-system/sa/signet-agent");
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let db = id("spiffe://cluster.local/ns/shop/sa/db");
    // 600 s certificates, renewed at half their life ±10 %: between 240 s and 360 s. The test
    // moves the manager's clock instead of waiting.
    let clock = Clock::system();
    let mgr = CertManager::new(
        client,
        agent.clone(),
        Duration::from_secs(600),
        Drain::new(),
    )
    .with_clock(clock.clone());
    mgr.set_identities(&[web.clone(), agent.clone(), db.clone()]);
    let serial = |mgr: &CertManager| mgr.get(&web).map(|c| c.serial.clone());
    wait_until("the first certificates", || {
        mgr.ready([&web, &agent]).then_some(())
    })
    .await;
    let mut serials = vec![serial(&mgr).expect("web")];
    for round in 0..2 {
        // Before the earliest renewal time the certificate in force stays (an absence: given
        // a moment in which a renewal would have happened)...
        clock.advance(Duration::from_secs(230));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            serial(&mgr).as_ref(),
            serials.last(),
            "round {round}: renewed before half its life"
        );
        // ...and after the latest one it has been replaced, never leaving a gap.
        clock.advance(Duration::from_secs(131));
        let next = wait_until("a renewed certificate", || {
            serial(&mgr).filter(|s| serials.last() != Some(s))
        })
        .await;
        let now = mgr.get(&web).expect("a certificate is always in force");
        assert!(
            now.not_after > std::time::SystemTime::now(),
            "never an expired one"
        );
        serials.push(next);
    }
    assert!(
        !mgr.ready([&db]),
        "a pod on another node never gets a certificate"
    );
    assert!(mgr.get(&db).is_none());
    // Forgetting an identity drops its certificate.
    mgr.set_identities(std::slice::from_ref(&agent));
    assert!(mgr.get(&web).is_none());
    assert_eq!(mgr.expiries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_reaches_the_agent_through_the_bundle_before_the_new_root_signs() {
    use rustls_pki_types::{CertificateDer, UnixTime};
    use signet_agent::certs::{BundleFollower, CaEndpoint};
    use signet_ca::verify::SvidRoots;
    // The new root signs 2 s after it joins the bundle.
    let ca = ca_with("root: {ttlSeconds: 864000, rotationOverlapSeconds: 2}\n").await;
    let client = CaClient::connect(&ca.addr, "localhost", &ca.root, "token-a")
        .await
        .expect("connect");
    let td = signet_ca::TrustDomain::parse("cluster.local").expect("td");
    let old_root = ca.authority.bundle().roots[0].clone();
    let roots = SvidRoots::new(td.clone(), std::slice::from_ref(&old_root)).expect("roots");
    let agent = id("spiffe://cluster.local/ns/signet-system/sa/signet-agent");
    let certs = CertManager::new(
        client,
        agent.clone(),
        Duration::from_secs(600),
        Drain::new(),
    );
    let follower = BundleFollower::new(
        CaEndpoint {
            address: ca.addr.clone(),
            server_name: "localhost".into(),
            token: "token-a".into(),
            token_file: None,
        },
        certs.clone(),
        roots.clone(),
        td.clone(),
    );
    assert!(
        !follower.refresh().await.expect("refresh"),
        "nothing new yet"
    );

    ca.authority.rotate_root().expect("rotate");
    assert!(follower.refresh().await.expect("refresh"));
    let both = roots.roots();
    assert_eq!(both.len(), 2, "the new root is trusted during the overlap");
    assert_eq!(both[0], old_root);

    // After the overlap the new root signs, and the CA's serving certificate follows it.
    ca.authority
        .maintain(time::OffsetDateTime::now_utc() + Duration::from_millis(2500))
        .expect("promote");
    assert_eq!(ca.authority.signer().root(), &both[1]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A client that knows only the old root can no longer reach the CA...
        if CaClient::connect(&ca.addr, "localhost", &ca.root, "token-a")
            .await
            .is_err()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the serving certificate was not renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...the agent's, reconnected with the bundle, still can; and its peers' new SVIDs verify
    // with the roots it follows, not with the old root alone.
    let mut client = certs.client();
    let cert = fetch(
        &mut client,
        &id("spiffe://cluster.local/ns/shop/sa/web"),
        true,
        Duration::from_secs(600),
    )
    .await
    .expect("an SVID under the new root");
    let leaf: &CertificateDer<'static> = &cert.chain[0];
    let usage = webpki::KeyUsage::client_auth();
    roots
        .verify(leaf, &cert.chain[1..], UnixTime::now(), usage)
        .expect("verifies with the followed bundle");
    SvidRoots::new(td, std::slice::from_ref(&old_root))
        .expect("old")
        .verify(leaf, &cert.chain[1..], UnixTime::now(), usage)
        .expect_err("the old root alone does not verify it");
}

/// A node serving one workload with the agent's own inbound TLS configuration (which resumes
/// sessions), and what it saw of each connection: how the handshake went and what the guard on
/// resumed sessions said, or why the handshake failed.
struct Node {
    client: CaClient,
    roots: signet_ca::verify::SvidRoots,
    addr: std::net::SocketAddr,
    seen:
        tokio::sync::mpsc::UnboundedReceiver<Result<(Option<rustls::HandshakeKind>, bool), String>>,
}

async fn serving_node(ca: &Ca, served: &SpiffeId) -> Node {
    use signet_agent::proxy::inbound::peer_certificate_current;
    use tokio::io::AsyncWriteExt as _;

    let client = CaClient::connect(&ca.addr, "localhost", &ca.root, "token-a")
        .await
        .expect("connect");
    let td = signet_ca::TrustDomain::parse("cluster.local").expect("td");
    let roots =
        signet_ca::verify::SvidRoots::new(td.clone(), &ca.authority.bundle().roots).expect("roots");
    let certs = CertManager::new(
        client.clone(),
        id("spiffe://cluster.local/ns/signet-system/sa/signet-agent"),
        Duration::from_secs(600),
        Drain::new(),
    );
    certs.set_identities(std::slice::from_ref(served));
    wait_until("the served workload's certificate", || {
        certs.ready([served]).then_some(())
    })
    .await;
    let acceptor = tokio_rustls::TlsAcceptor::from(
        signet_agent::proxy::tls::server_config(certs, roots.clone(), td).expect("server config"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            match acceptor.accept(tcp).await {
                Ok(mut tls) => {
                    let conn = tls.get_ref().1;
                    let verdict = (
                        conn.handshake_kind(),
                        peer_certificate_current(conn, std::time::SystemTime::now()),
                    );
                    let _ = seen_tx.send(Ok(verdict));
                    // A byte for the client to read, so it takes the session tickets in.
                    let _ = tls.write_all(b"x").await;
                    let _ = tls.shutdown().await;
                }
                Err(e) => {
                    let _ = seen_tx.send(Err(e.to_string()));
                }
            }
        }
    });
    Node {
        client,
        roots,
        addr,
        seen,
    }
}

/// The attack the inbound guard stops: a client completes a full handshake while its SVID is
/// valid, keeps the session ticket, and after the SVID's notAfter resumes the session, whose
/// certificate nothing verifies again. The agent's own server configuration resumes it; the
/// guard refuses it. Beside it, a client with a current SVID is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_after_the_client_certificate_expired_proves_nothing() {
    use rustls::HandshakeKind;
    use signet_agent::proxy::tls;
    use tokio::io::AsyncReadExt as _;

    let ca = ca().await;
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let agent = id("spiffe://cluster.local/ns/signet-system/sa/signet-agent");
    let Node {
        client,
        roots,
        addr,
        mut seen,
    } = serving_node(&ca, &web).await;
    let client_config = |cert: &signet_agent::certs::WorkloadCert| {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(signet_ca::verify::SpiffeServerVerifier::new(
            roots.clone(),
            web.clone(),
        ))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .expect("client config");
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    };
    let sni = tls::sni_for(&web).expect("sni");
    let dial = |connector: tokio_rustls::TlsConnector| {
        let sni = sni.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let mut tls = connector.connect(sni, tcp).await.expect("handshake");
            let mut byte = [0u8; 1];
            let _ = tls.read(&mut byte).await;
        }
    };

    // The attacker's SVID lives 2 s (the CA's minimum here).
    let mut ca_client = client.clone();
    let short = fetch(&mut ca_client, &agent, false, Duration::from_secs(2))
        .await
        .expect("a short SVID");
    let attacker = client_config(&short);
    dial(attacker.clone()).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Full), true))),
        "while valid, the full handshake proves the identity"
    );
    // Once notAfter has passed, the kept session is resumed: the node's TLS stack accepts it...
    wait_until("the short SVID to expire", || {
        (std::time::SystemTime::now() > short.not_after).then_some(())
    })
    .await;
    dial(attacker).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Resumed), false))),
        "a resumed session past its certificate's notAfter is refused by the guard"
    );
    // ...while a client with a current SVID beside it is admitted.
    let current = fetch(&mut ca_client, &agent, false, Duration::from_secs(600))
        .await
        .expect("a current SVID");
    dial(client_config(&current)).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Full), true)))
    );
}

/// The client side of the same guard: the agent's own SVID for a workload has expired (its
/// renewal keeps failing), and the HBONE client must then make a full handshake, which the peer
/// refuses, never resume the session its cached configuration holds, which a node without the
/// inbound guard would take as the workload's identity.
#[tokio::test]
async fn our_own_expired_svid_never_resumes_a_kept_session() {
    use rustls::HandshakeKind;
    use signet_agent::proxy::tls::{self, ClientConfigs};
    use tokio::io::AsyncReadExt as _;

    let ca = ca().await;
    let agent = id("spiffe://cluster.local/ns/signet-system/sa/signet-agent");
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let api = id("spiffe://cluster.local/ns/shop/sa/api");
    // The peer node serves api.
    let Node {
        client,
        roots,
        addr,
        mut seen,
    } = serving_node(&ca, &api).await;

    // This node's certificates for web live 2 s; once the first has arrived, every renewal is
    // refused (the CA no longer takes the node's token), so the expired one stays in force.
    let certs = CertManager::new(
        client.clone(),
        agent.clone(),
        Duration::from_secs(2),
        Drain::new(),
    );
    certs.set_identities(std::slice::from_ref(&web));
    wait_until("web's certificate", || certs.ready([&web]).then_some(())).await;
    let refused = CaClient::connect(&ca.addr, "localhost", &ca.root, "not-a-node-token")
        .await
        .expect("connect");
    certs.set_client(refused);
    let first = certs.get(&web).expect("web's certificate");

    let configs = ClientConfigs::default();
    let sni = tls::sni_for(&api).expect("sni");
    let dial = |cfg: Arc<rustls::ClientConfig>| {
        let sni = sni.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            if let Ok(mut tls) = tokio_rustls::TlsConnector::from(cfg)
                .connect(sni, tcp)
                .await
            {
                // Read the byte, so the session tickets are taken in.
                let _ = tls.read(&mut [0u8; 1]).await;
            }
        }
    };
    let (valid, _) = configs.get(&certs, &roots, &web, &api).expect("a config");
    dial(valid.clone()).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Full), true)))
    );
    // While the SVID is valid, the kept configuration resumes: the cache does what it is for.
    let (again, _) = configs.get(&certs, &roots, &web, &api).expect("a config");
    assert!(Arc::ptr_eq(&valid, &again), "one configuration per route");
    dial(again).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Resumed), true)))
    );

    // notAfter is inclusive and verifiers compare whole seconds: a second past it, every
    // verifier calls the certificate expired.
    wait_until("web's SVID to expire", || {
        (std::time::SystemTime::now() > first.not_after + Duration::from_secs(1)).then_some(())
    })
    .await;
    let held = certs
        .get(&web)
        .expect("the expired certificate stays in force");
    assert_eq!(held.serial, first.serial, "no renewal got through");
    let (expired, _) = configs.get(&certs, &roots, &web, &api).expect("a config");
    assert!(
        !Arc::ptr_eq(&valid, &expired),
        "an expired SVID gets a configuration without the kept sessions"
    );
    dial(expired).await;
    match seen.recv().await {
        Some(Err(e)) => assert!(e.contains("xpired"), "refused for its notAfter: {e}"),
        other => panic!("the peer must refuse the expired SVID, saw {other:?}"),
    }
    // Another workload of the same node with a current SVID still gets through.
    let cache = id("spiffe://cluster.local/ns/shop/sa/cache");
    let current = CertManager::new(client, agent, Duration::from_secs(600), Drain::new());
    current.set_identities(std::slice::from_ref(&cache));
    wait_until("cache's certificate", || {
        current.ready([&cache]).then_some(())
    })
    .await;
    let (ok, _) = configs
        .get(&current, &roots, &cache, &api)
        .expect("a config");
    dial(ok).await;
    assert_eq!(
        seen.recv().await,
        Some(Ok((Some(HandshakeKind::Full), true)))
    );
}
