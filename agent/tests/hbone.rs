//! HBONE over loopback with SVIDs from a real in-process CA: tunnels carry bytes both ways with
//! half-close, connections are pooled with a stream cap, the server authorises by the peer's
//! SPIFFE ID, and a client refuses a server that is not the destination it expects.

// Test servers and clients run as bare tasks; the agent's own tasks go through its drain.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use signet_agent::admin::metrics::Metrics;
use signet_agent::drain::Drain;
use signet_agent::flow::Reporter;
use signet_agent::policy::decide::{Decision, Verdict};
use signet_agent::proxy::FlowRecord;
use signet_agent::proxy::hbone::{
    Admission, HboneClient, HboneError, Inbound, Keepalive, Meter, Route, pump, serve_connection,
};
use signet_agent::proxy::inbound::Admitted;
use signet_agent::proxy::l7::L7Flow;
use signet_ca::verify::{SpiffeClientVerifier, SpiffeServerVerifier, SvidRoots, peer_spiffe_id};
use signet_ca::{CaSettings, CaSource, CertificateAuthority, Csr, SpiffeId, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("id")
}

/// The flow an admitted test stream is counted and logged as.
fn record(peer: &SpiffeId, target: SocketAddr) -> FlowRecord {
    let decision = Decision {
        verdict: Verdict::Allow,
        rule: "test".into(),
    };
    FlowRecord::open(
        &Metrics::default(),
        Reporter::Inbound,
        peer.to_string(),
        DB.into(),
        target,
        &decision,
    )
}

struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let td = TrustDomain::parse("cluster.local").expect("td");
        let ca = CertificateAuthority::open(CaSettings::new(
            td,
            CaSource::StateDir(dir.path().join("ca")),
        ))
        .expect("ca");
        Self { _dir: dir, ca }
    }

    fn svid(&self, who: &str) -> Svid {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let svid = self
            .ca
            .issue(
                &id(who),
                &Csr::parse(csr.as_bytes()).expect("csr"),
                Duration::from_secs(600),
            )
            .expect("issue");
        Svid {
            chain: svid.chain[..svid.chain.len() - 1].to_vec(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    fn roots(&self) -> SvidRoots {
        SvidRoots::new(self.ca.trust_domain().clone(), &self.ca.bundle().roots).expect("roots")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An echo server: copies back until EOF, then closes.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server presenting `server`'s SVID that admits only WEB to `allowed`. Counts TLS
/// connections.
async fn hbone_server(
    pki: &Pki,
    server: Svid,
    allowed: SocketAddr,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(SpiffeClientVerifier::new(pki.roots()))
        .with_single_cert(server.chain, server.key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let inbound: Inbound = Arc::new(move |peer: SpiffeId, target: SocketAddr| {
        Box::pin(async move {
            if peer.as_str() != WEB || target != allowed {
                return Admission::Refuse(
                    StatusCode::FORBIDDEN,
                    format!("{peer} may not reach {target}"),
                );
            }
            match TcpStream::connect(target).await {
                Ok(s) => {
                    Admitted::tcp(s, record(&peer, target), Duration::from_secs(3600)).admission()
                }
                Err(e) => Admission::Refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        })
    });
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, inbound, counter) = (acceptor.clone(), inbound.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let peer =
                    peer_spiffe_id(tls.get_ref().1.peer_certificates()).expect("verified peer");
                let _ = serve_connection(tls, peer, inbound, &Drain::new()).await;
            });
        }
    });
    (addr, conns)
}

fn client(pki: &Pki, max_streams: usize) -> HboneClient {
    client_in(pki, max_streams, Drain::new())
}

fn client_in(pki: &Pki, max_streams: usize, drain: Drain) -> HboneClient {
    let roots = pki.roots();
    let svids: std::collections::HashMap<
        String,
        (Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>),
    > = [WEB, OTHER]
        .into_iter()
        .map(|w| {
            let s = pki.svid(w);
            (w.to_owned(), (s.chain, Arc::new(s.key)))
        })
        .collect();
    HboneClient::new(
        Arc::new(move |route: &Route| {
            let (chain, key) = svids.get(route.source.as_str())?;
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .ok()?
                .dangerous()
                .with_custom_certificate_verifier(SpiffeServerVerifier::new(
                    roots.clone(),
                    route.destination.clone(),
                ))
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .ok()?;
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            Some((
                Arc::new(cfg),
                std::time::SystemTime::now() + Duration::from_secs(3600),
            ))
        }),
        max_streams,
        Duration::from_secs(5),
        drain,
    )
}

/// WEB's streams to DB through `node`.
fn web_to_db(node: SocketAddr) -> Route {
    Route {
        source: id(WEB),
        destination: id(DB),
        node,
    }
}

async fn round_trip(
    c: &HboneClient,
    route: &Route,
    target: SocketAddr,
    msg: &[u8],
) -> Result<Vec<u8>, HboneError> {
    let mut t = c.open(route, target).await?;
    t.send
        .send_data(Bytes::copy_from_slice(msg), true)
        .expect("send");
    let mut got = Vec::new();
    while let Some(chunk) = t.recv.data().await {
        let chunk = chunk.expect("data");
        let _ = t.recv.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    Ok(got)
}

/// As the outbound proxy does it: an application's TCP connection pumped into a tunnel.
async fn through_pump(c: &HboneClient, route: &Route, target: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = app.local_addr().expect("addr");
    let (c, route) = (c.clone(), route.clone());
    tokio::spawn(async move {
        let (sock, _) = app.accept().await.expect("accept");
        let t = c.open(&route, target).await.expect("open");
        pump(
            sock,
            t.send,
            t.recv,
            Duration::from_secs(60),
            &Meter::default(),
        )
        .await
        .expect("pump");
    });
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.split();
    let writer = async {
        w.write_all(msg).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut got = Vec::new();
    let reader = r.read_to_end(&mut got);
    let ((), n) = tokio::join!(writer, reader);
    n.expect("read");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_bytes_both_ways_with_half_close() {
    let pki = Pki::new();
    let target = echo().await;
    let (node, _) = hbone_server(&pki, pki.svid(DB), target).await;
    let c = client(&pki, 8);
    let route = web_to_db(node);
    // The client ends its side after the message; the echo server answers and closes.
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    assert_eq!(through_pump(&c, &route, target, &big).await, big);
    assert_eq!(
        round_trip(&c, &route, target, &big).await.expect("tunnel"),
        big
    );
    assert_eq!(
        round_trip(&c, &route, target, b"hello")
            .await
            .expect("tunnel"),
        b"hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_with_a_stream_cap() {
    let pki = Pki::new();
    let target = echo().await;
    let (node, accepted) = hbone_server(&pki, pki.svid(DB), target).await;
    let c = client(&pki, 2);
    let route = web_to_db(node);
    // Three streams open at once with a cap of two per connection: two connections.
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(c.open(&route, target).await.expect("open"));
    }
    assert_eq!(c.connections(), 2);
    drop(tunnels);
    // Freed slots are reused: no new connection.
    for _ in 0..4 {
        assert_eq!(
            round_trip(&c, &route, target, b"x").await.expect("tunnel"),
            b"x"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_streams_to_a_route_share_one_new_connection() {
    let pki = Pki::new();
    let target = echo().await;
    let (node, accepted) = hbone_server(&pki, pki.svid(DB), target).await;
    let c = client(&pki, 100);
    let route = web_to_db(node);
    // Sixteen streams asked for at once on an empty pool: one dial, the others wait for it.
    let opens = (0..16).map(|_| {
        let (c, route) = (c.clone(), route.clone());
        tokio::spawn(async move { round_trip(&c, &route, target, b"x").await })
    });
    for r in futures::future::join_all(opens).await {
        assert_eq!(r.expect("joined").expect("tunnel"), b"x");
    }
    assert_eq!(c.dials(), 1, "one dial for sixteen first streams");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

/// A TCP relay to `to` whose open connections can be frozen: bytes stop moving both ways but
/// the sockets stay open, as when a peer node dies without a FIN or RST.
async fn freezable_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let flag = flag.clone();
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(to).await else {
                    return;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let copy = |mut r: tokio::net::tcp::OwnedReadHalf,
                            mut w: tokio::net::tcp::OwnedWriteHalf,
                            flag: Arc<std::sync::atomic::AtomicBool>| async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(n) = r.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        if flag.load(Ordering::SeqCst) {
                            // Frozen: swallow, answer nothing, keep the socket.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::join!(copy(dr, uw, flag.clone()), copy(ur, dw, flag));
            });
        }
    });
    (addr, frozen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_to_a_peer_that_stops_answering_leaves_the_pool_in_seconds() {
    let pki = Pki::new();
    let target = echo().await;
    let (server, _) = hbone_server(&pki, pki.svid(DB), target).await;
    let (node, frozen) = freezable_relay(server).await;
    let c = client(&pki, 100).with_keepalive(Keepalive {
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(500),
    });
    let route = web_to_db(node);
    assert_eq!(
        round_trip(&c, &route, target, b"x").await.expect("tunnel"),
        b"x"
    );
    // PINGs are answered while the path works: the connection stays.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(c.connections(), 1, "an answering peer keeps its connection");
    frozen.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    while c.connections() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a silent peer's connection is still pooled after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New streams dial a new connection (the relay forwards new connections again).
    frozen.store(false, Ordering::SeqCst);
    assert_eq!(
        round_trip(&c, &route, target, b"y").await.expect("tunnel"),
        b"y"
    );
    assert_eq!(c.dials(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_do_not_hold_up_shutdown() {
    let pki = Pki::new();
    let target = echo().await;
    let (node, _) = hbone_server(&pki, pki.svid(DB), target).await;
    let drain = Drain::new();
    let c = client_in(&pki, 8, drain.clone());
    let route = web_to_db(node);
    assert_eq!(
        round_trip(&c, &route, target, b"x").await.expect("tunnel"),
        b"x"
    );
    assert_eq!(c.connections(), 1, "pooled and idle");
    let started = std::time::Instant::now();
    let dropped = drain.shutdown(Duration::from_secs(5)).await;
    assert_eq!(dropped, 0, "the idle connection ended by itself");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for an idle pooled connection",
        started.elapsed()
    );
    assert_eq!(c.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_authorises_by_the_peer_identity() {
    let pki = Pki::new();
    let target = echo().await;
    let (node, _) = hbone_server(&pki, pki.svid(DB), target).await;
    let c = client(&pki, 8);
    let as_other = Route {
        source: id(OTHER),
        destination: id(DB),
        node,
    };
    match round_trip(&c, &as_other, target, b"x").await {
        Err(HboneError::Refused { status, .. }) => assert_eq!(status, StatusCode::FORBIDDEN),
        other => panic!("expected 403, got {other:?}"),
    }
    let elsewhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let as_web = web_to_db(node);
    assert!(matches!(
        round_trip(&c, &as_web, elsewhere, b"x").await,
        Err(HboneError::Refused { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_server_that_is_not_the_expected_destination() {
    let pki = Pki::new();
    let target = echo().await;
    // The node presents OTHER's certificate, the client expects DB.
    let (node, _) = hbone_server(&pki, pki.svid(OTHER), target).await;
    let c = client(&pki, 8);
    let route = web_to_db(node);
    match c.open(&route, target).await {
        Err(HboneError::Tls { source, .. }) => {
            assert!(source.to_string().contains(OTHER), "{source}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

/// A plain HTTP/1.1 origin on loopback answering "hello <path>".
async fn http_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = http_body_util::Full::new(Bytes::from(format!(
                            "hello {}",
                            req.uri().path()
                        )));
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_streams_check_every_request_and_answer_403() {
    let pki = Pki::new();
    let origin = http_origin().await;
    let db = pki.svid(DB);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(SpiffeClientVerifier::new(pki.roots()))
        .with_single_cert(db.chain, db.key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    // Only GET under /v1/ passes.
    let inbound: Inbound = Arc::new(move |peer: SpiffeId, target: SocketAddr| {
        Box::pin(async move {
            let check: signet_agent::policy::request::RequestCheck = Arc::new(|req| {
                if req.method == "GET" && req.path.starts_with("/v1/") {
                    Ok("test rule".into())
                } else {
                    Err(signet_agent::policy::request::Denial {
                        rules: "test rule".into(),
                        reason: format!("{} {} is not allowed", req.method, req.path),
                    })
                }
            });
            let tcp = TcpStream::connect(target).await.expect("origin");
            let mut accepted = Admitted::tcp(tcp, record(&peer, target), Duration::from_secs(3600));
            accepted.l7 = Some(L7Flow {
                check,
                paths: Default::default(),
                source: peer.to_string(),
                destination: DB.into(),
                metrics: None,
                peers: Default::default(),
            });
            accepted.admission()
        })
    });
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, inbound) = (acceptor.clone(), inbound.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = peer_spiffe_id(tls.get_ref().1.peer_certificates()).expect("peer");
                let _ = serve_connection(tls, peer, inbound, &Drain::new()).await;
            });
        }
    });
    let c = client(&pki, 8);
    let route = web_to_db(node);
    let get = |path: &str, method: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let ok = String::from_utf8(through_pump(&c, &route, origin, &get("/v1/charges", "GET")).await)
        .expect("utf8");
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("hello /v1/charges"),
        "{ok}"
    );
    let denied =
        String::from_utf8(through_pump(&c, &route, origin, &get("/v1/charges", "POST")).await)
            .expect("utf8");
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(
        denied.contains("POST /v1/charges is not allowed"),
        "{denied}"
    );
    let other = String::from_utf8(through_pump(&c, &route, origin, &get("/admin", "GET")).await)
        .expect("utf8");
    assert!(other.starts_with("HTTP/1.1 403"), "{other}");
    // Spellings of a path outside /v1/ are that path, and are refused; what servers would split
    // differently is a 400; an odd spelling of an allowed path reaches the workload normalised.
    for attack in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/.%2E/admin",
        "//v1/../../admin",
    ] {
        let r = String::from_utf8(through_pump(&c, &route, origin, &get(attack, "GET")).await)
            .expect("utf8");
        assert!(r.starts_with("HTTP/1.1 403"), "{attack}: {r}");
    }
    for attack in [
        "/v1%2f..%2fadmin",
        "/v1/..%5Cadmin",
        "/v1/caf%C3%A9",
        "/v1/%00",
    ] {
        let r = String::from_utf8(through_pump(&c, &route, origin, &get(attack, "GET")).await)
            .expect("utf8");
        assert!(r.starts_with("HTTP/1.1 400"), "{attack}: {r}");
    }
    let odd = String::from_utf8(
        through_pump(&c, &route, origin, &get("/v1//charges/./%7e7?x=..", "GET")).await,
    )
    .expect("utf8");
    assert!(
        odd.starts_with("HTTP/1.1 200") && odd.ends_with("hello /v1/charges/~7"),
        "{odd}"
    );
    // Two requests on one keep-alive connection: each is checked on its own.
    let two = b"GET /v1/a HTTP/1.1\r\nHost: db\r\n\r\nDELETE /v1/a HTTP/1.1\r\nHost: db\r\n\r\n";
    let both = String::from_utf8(through_pump(&c, &route, origin, two).await).expect("utf8");
    let (allowed, refused) = (both.find("HTTP/1.1 200"), both.find("HTTP/1.1 403"));
    assert!(
        allowed.is_some() && refused.is_some() && allowed < refused,
        "{both}"
    );
}
