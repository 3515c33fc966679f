//! Gateway API listeners end to end: a Gateway of the `signet` class on both nodes, HTTPS with
//! two hostnames and two certificates (one across namespaces by ReferenceGrant), HTTPRoutes with
//! every match type and filter, weighted backends, and the backend pod on node B reached over
//! HBONE with the Gateway's identity. Plain `curl` is the client. Needs root; see `common`.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::topology::{Topology, serial, start};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use signet_test_support::netns::in_netns;
use signet_test_support::{Steps, privileged};

/// A CA for the edge and certificates it issues.
struct EdgeCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl EdgeCa {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("ca").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A `kubernetes.io/tls` Secret for `host`.
    fn secret(&self, ns: &str, name: &str, host: &str) -> String {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![host.to_owned()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("sign");
        let indent = |s: String| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\n\
             stringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
            indent(cert.pem()),
            indent(key.serialize_pem())
        )
    }
}

const GATEWAY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - name: a
    port: 8443
    protocol: HTTPS
    hostname: a.example.test
    tls: {mode: Terminate, certificateRefs: [{name: cert-a}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: b
    port: 8443
    protocol: HTTPS
    hostname: b.example.test
    tls: {certificateRefs: [{name: cert-b, namespace: certs}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: plain
    port: 8000
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: edge-certs, namespace: certs}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: edge}]
  to: [{group: '', kind: Secret}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: public, namespace: edge}]
  hostnames: [a.example.test, b.example.test, plain.example.test]
  rules:
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: server, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-team, value: shop}], remove: [x-secret]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: signet}]}
    backendRefs: [{name: server, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]
    backendRefs: [{name: server, port: 81}]
  - matches:
    - headers: [{name: x-canary, value: '1'}]
    - queryParams: [{name: v, value: '2'}]
    - method: DELETE
    backendRefs: [{name: server, port: 81}]
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: server, port: 80, weight: 3}, {name: server, port: 81, weight: 1}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: nowhere, port: 80}]
  - backendRefs: [{name: server, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: shop}
spec:
  parentRefs: [{name: nonexistent, namespace: edge}]
  rules: [{backendRefs: [{name: server, port: 80}]}]
";

/// What curl saw: status, HTTP version, response headers (lowercased) and body.
#[derive(Debug)]
struct Reply {
    status: u16,
    version: String,
    headers: String,
    body: String,
    exit: i32,
}

/// Runs curl in node A's namespace against node A's Gateway address.
fn curl(t: &Topology, ca: &Path, url: &str, extra: &[&str]) -> Reply {
    curl_from(t, 'a', ca, url, extra)
}

/// Runs curl in node `from`'s namespace against node A's Gateway address.
fn curl_from(t: &Topology, from: char, ca: &Path, url: &str, extra: &[&str]) -> Reply {
    let node = t.node_ip('a');
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("host:port");
    let (name, port) = host.split_once(':').expect("port");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(&format!("node-{from}")),
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args(["--resolve", &format!("{name}:{port}:{node}")])
        .arg("--cacert")
        .arg(ca)
        .args(["-D", "-", "-w", "\n@@%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head_body, meta) = text.rsplit_once("\n@@").unwrap_or((&text, "0 0"));
    let (headers, body) = head_body.split_once("\r\n\r\n").unwrap_or(("", head_body));
    let mut meta = meta.split_whitespace();
    Reply {
        status: meta.next().and_then(|c| c.parse().ok()).unwrap_or(0),
        version: meta.next().unwrap_or("").to_owned(),
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
        exit: out.status.code().unwrap_or(-1),
    }
}

/// A blocking TLS connection to a.example.test on node A's Gateway, trusting `ca_pem`.
fn kept_alive_client(
    node: &str,
    ca_pem: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for block in pem::parse_many(ca_pem).expect("pem") {
        roots
            .add(rustls_pki_types::CertificateDer::from(
                block.into_contents(),
            ))
            .expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("a.example.test").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).expect("tls");
    let tcp = std::net::TcpStream::connect((node, 8443)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// One GET /exact on a kept-alive connection; the response head and body as text.
fn get_on(s: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) -> String {
    s.write_all(b"GET /exact HTTP/1.1\r\nHost: a.example.test\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the whole body (its Content-Length) has arrived.
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The status `signet gateway status` reports for listener `name` of Gateway edge/public.
fn listener_status(
    dir: &Path,
    td: &signet_ca::TrustDomain,
    name: &str,
) -> signet_agent::routing::model::ListenerStatus {
    let status =
        signet_agent::state::snapshot::gateway_status(&dir.join("state"), &Default::default(), td)
            .expect("status");
    let gw = status
        .gateways
        .into_iter()
        .find(|g| g.name == "public")
        .expect("gateway status");
    gw.listeners
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("listener {name}"))
}

/// The state directory with GATEWAY, and cert-a and cert-b from one edge CA; the CA and the
/// file its certificate is in (a client's trust anchor).
fn edge_state(t: &Topology) -> (EdgeCa, PathBuf) {
    t.write_state("");
    let dir = t.dir.path();
    let edge = EdgeCa::new("edge one");
    let pem = dir.join("edge-one.pem");
    std::fs::write(&pem, &edge.pem).expect("ca");
    let secrets = edge.secret("edge", "cert-a", "a.example.test")
        + &edge.secret("certs", "cert-b", "b.example.test");
    write(dir, "secrets.yaml", &secrets);
    write(dir, "gateway.yaml", GATEWAY);
    (edge, pem)
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join("state").join(file), text).expect("write state");
}

#[test]
fn a_gateway_terminates_tls_routes_by_spec_and_enters_the_mesh_as_itself() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state("");
    let dir = t.dir.path().to_owned();
    let (ca_one, ca_two) = (EdgeCa::new("edge one"), EdgeCa::new("edge two"));
    let (pem_one, pem_two): (PathBuf, PathBuf) =
        (dir.join("edge-one.pem"), dir.join("edge-two.pem"));
    std::fs::write(&pem_one, &ca_one.pem).expect("ca");
    std::fs::write(&pem_two, &ca_two.pem).expect("ca");
    let secrets = ca_one.secret("edge", "cert-a", "a.example.test")
        + &ca_one.secret("certs", "cert-b", "b.example.test");
    write(&dir, "secrets.yaml", &secrets);
    write(&dir, "gateway.yaml", GATEWAY);
    let _running = start(
        &t,
        "",
        "gateway: {headerReadTimeoutSeconds: 2, maxBodyBytes: 1024}\n",
    );
    let _main = t.server_with(8080, &["--http"]);
    let _alt = t.server_with(8081, &["--http"]);

    step.to("SNI picks each hostname's certificate");
    // SNI picks each hostname's certificate (curl checks the name), over HTTP/1.1 and HTTP/2;
    // the backend sees the Gateway's tunnel (node B's proxy) and the client in X-Forwarded-For.
    for host in ["a.example.test", "b.example.test"] {
        let r = curl(
            &t,
            &pem_one,
            &format!("https://{host}:8443/exact"),
            &["--http1.1"],
        );
        assert_eq!(r.status, 200, "{host}: {r:?}");
        assert!(r.body.starts_with("hi GET /exact HTTP/1.1 at "), "{r:?}");
        assert!(
            r.body.contains(&format!("from 10.79.{}.1:", t.n)),
            "through node B's proxy: {r:?}"
        );
        assert!(
            r.body
                .contains(&format!("x-forwarded-for: {}", t.node_ip('a'))),
            "{r:?}"
        );
        assert!(r.body.contains("forwarded: for="), "{r:?}");
    }
    let h2 = curl(
        &t,
        &pem_one,
        "https://a.example.test:8443/exact",
        &["--http2"],
    );
    assert_eq!((h2.status, h2.version.as_str()), (200, "2"), "{h2:?}");
    // An unknown SNI gets no certificate for its name.
    let wrong = curl(&t, &pem_one, "https://c.example.test:8443/", &[]);
    assert_ne!(wrong.exit, 0, "{wrong:?}");

    step.to("Matches and precedence");
    // Matches and precedence.
    let a = |path: &str, extra: &[&str]| {
        curl(
            &t,
            &pem_one,
            &format!("https://a.example.test:8443{path}"),
            extra,
        )
    };
    let at = |r: &Reply| {
        r.body
            .split(" at ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .map(|s| s.rsplit(':').next().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let r = a("/exact/more", &[]);
    assert_eq!(
        (r.status, at(&r).as_str()),
        (200, "8080"),
        "PathPrefix / catches what Exact does not: {r:?}"
    );
    let r = a("/items/42", &[]);
    assert_eq!(at(&r), "8081", "RegularExpression: {r:?}");
    let r = a("/items/x", &[]);
    assert_eq!(at(&r), "8080", "a regex is anchored: {r:?}");
    let r = a("/", &["-H", "x-canary: 1"]);
    assert_eq!(at(&r), "8081", "header match: {r:?}");
    let r = a("/?v=2", &[]);
    assert_eq!(at(&r), "8081", "query match: {r:?}");
    let r = a("/", &["-X", "DELETE"]);
    assert_eq!(at(&r), "8081", "method match: {r:?}");
    let r = a("/", &["-X", "POST"]);
    assert_eq!(at(&r), "8080", "{r:?}");

    step.to("Filters");
    // Filters.
    let r = a("/api/orders?id=1", &["-H", "x-secret: s3cret"]);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.starts_with("hi GET /v1/orders?id=1 HTTP/1.1"),
        "URLRewrite: {r:?}"
    );
    assert!(
        r.body.contains("x-team: shop") && !r.body.contains("x-secret"),
        "RequestHeaderModifier: {r:?}"
    );
    assert!(
        r.headers.contains("x-served-by: signet"),
        "ResponseHeaderModifier: {r:?}"
    );
    let r = a("/old/page?x=1", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    assert!(
        r.headers
            .contains("location: https://a.example.test/new/page?x=1"),
        "RequestRedirect: {r:?}"
    );

    step.to("The configured body limit");
    // The configured body limit.
    let big = "x".repeat(2000);
    // (Over HTTP/1.1: over HTTP/2 the early 413 comes with a stream reset, which curl reports
    // as an error when it is still uploading.)
    let r = a("/exact", &["--http1.1", "--data-binary", &big]);
    assert_eq!(r.status, 413, "{r:?}");
    let r = a("/exact", &["--data-binary", "small"]);
    assert_eq!(r.status, 200, "{r:?}");

    step.to("Weights 3");
    // Weights 3:1, within a tolerance.
    let n = 80;
    let alt = (0..n).filter(|_| at(&a("/split", &[])) == "8081").count();
    assert!(
        (8..=35).contains(&alt),
        "about a quarter of {n} to the weight-1 backend, got {alt}"
    );

    step.to("A backendRef to no Service answers 500 and is reported");
    // A backendRef to no Service answers 500 and is reported; everything else keeps serving.
    let r = a("/missing", &[]);
    assert_eq!(r.status, 500, "{r:?}");
    let td = signet_ca::TrustDomain::parse("cluster.local").expect("td");
    let status =
        signet_agent::state::snapshot::gateway_status(&dir.join("state"), &Default::default(), &td)
            .expect("status");
    let web = status
        .http_routes
        .iter()
        .find(|r| r.name == "web")
        .expect("web status");
    let resolved = web.parents[0]
        .conditions
        .iter()
        .find(|c| c.type_ == "ResolvedRefs")
        .expect("ResolvedRefs");
    assert_eq!(
        (resolved.status.as_str(), resolved.reason.as_str()),
        ("False", "BackendNotFound"),
        "{web:?}"
    );
    let orphan = status
        .http_routes
        .iter()
        .find(|r| r.name == "orphan")
        .expect("orphan status");
    assert_eq!(
        orphan.parents[0].conditions[0].reason, "NoMatchingParent",
        "{orphan:?}"
    );
    let gw = status
        .gateways
        .iter()
        .find(|g| g.name == "public")
        .expect("gateway status");
    assert!(
        gw.listeners
            .iter()
            .all(|l| l.conditions.iter().all(|c| c.status == "True")),
        "{gw:?}"
    );
    assert_eq!(gw.listeners[0].attached_routes, 1, "{gw:?}");

    step.to("Without the ReferenceGrant the cross-namespace certificate is...");
    // Without the ReferenceGrant the cross-namespace certificate is refused, and listener `b`
    // (only) stops serving.
    let grant = GATEWAY
        .split("---\n")
        .find(|doc| doc.contains("kind: ReferenceGrant"))
        .expect("grant");
    write(
        &dir,
        "gateway.yaml",
        &GATEWAY.replace(&format!("{grant}---\n"), ""),
    );
    t.settle();
    let b = listener_status(&dir, &td, "b");
    assert!(
        b.conditions.iter().any(|c| c.reason == "RefNotPermitted"),
        "{b:?}"
    );
    assert_ne!(
        curl(&t, &pem_one, "https://b.example.test:8443/", &[]).status,
        200
    );
    assert_eq!(a("/exact", &[]).status, 200, "listener a keeps serving");
    write(&dir, "gateway.yaml", GATEWAY);
    // A missing Secret likewise takes down only its listener, and says so.
    write(
        &dir,
        "secrets.yaml",
        &ca_one.secret("edge", "cert-a", "a.example.test"),
    );
    t.settle();
    let b = listener_status(&dir, &td, "b");
    assert!(
        b.conditions
            .iter()
            .any(|c| c.reason == "InvalidCertificateRef"
                && c.message.contains("certs/cert-b not found")),
        "{b:?}"
    );
    assert_eq!(a("/exact", &[]).status, 200, "listener a keeps serving");

    step.to("Secret rotation");
    // Secret rotation: a kept-alive connection made before it goes on serving, new connections
    // get the new certificate.
    let (opened, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let kept = {
        let (ns, node, pem) = (t.ns("node-a"), t.node_ip('a'), ca_one.pem.clone());
        let (opened, go) = (opened.0, go.1);
        std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut tls = kept_alive_client(&node, &pem);
            let first = get_on(&mut tls);
            opened.send(()).expect("signal");
            go.recv().expect("go");
            (first, get_on(&mut tls))
        })
    };
    opened
        .1
        .recv_timeout(Duration::from_secs(10))
        .expect("kept-alive connection opened");
    write(
        &dir,
        "secrets.yaml",
        &(ca_two.secret("edge", "cert-a", "a.example.test")
            + &ca_one.secret("certs", "cert-b", "b.example.test")),
    );
    t.settle();
    let old_ca = curl(&t, &pem_one, "https://a.example.test:8443/exact", &[]);
    assert_ne!(
        old_ca.exit, 0,
        "the old issuer no longer verifies: {old_ca:?}"
    );
    let new_ca = curl(&t, &pem_two, "https://a.example.test:8443/exact", &[]);
    assert_eq!(new_ca.status, 200, "{new_ca:?}");
    go.0.send(()).expect("go");
    let (first, second) = kept.join().expect("kept-alive client");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the connection from before the rotation still serves: {second}"
    );

    step.to("The plain listener");
    // The plain listener: request smuggling shapes get 400, a slow header is cut off.
    let raw = |req: &[u8], wait: Duration| -> (String, Duration) {
        in_netns(&t.ns("node-a"), || {
            let mut s =
                std::net::TcpStream::connect((t.node_ip('a').as_str(), 8000)).expect("connect");
            s.set_read_timeout(Some(wait)).expect("timeout");
            s.write_all(req).expect("write");
            let started = Instant::now();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            (
                String::from_utf8_lossy(&got).into_owned(),
                started.elapsed(),
            )
        })
    };
    let (smuggled, _) = raw(
        b"POST /exact HTTP/1.1\r\nHost: plain.example.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(smuggled.starts_with("HTTP/1.1 400"), "CL+TE: {smuggled:?}");
    let (double, _) = raw(
        b"POST /exact HTTP/1.1\r\nHost: plain.example.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        Duration::from_secs(5),
    );
    assert!(
        double.starts_with("HTTP/1.1 400"),
        "two Content-Lengths: {double:?}"
    );
    let (slow, took) = raw(
        b"GET /exact HTTP/1.1\r\nHost: plain.example.test\r\n",
        Duration::from_secs(8),
    );
    assert!(
        took < Duration::from_secs(6) && !slow.contains("200 OK"),
        "an unfinished header is cut off after the 2 s header timeout (took {took:?}): {slow:?}"
    );

    step.to("A policy that admits only the client pod refuses the Gateway's...");
    // A policy that admits only the client pod refuses the Gateway's identity at node B.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: clients-only, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n",
    );
    t.settle();
    let denied = curl(&t, &pem_two, "https://a.example.test:8443/exact", &[]);
    assert_eq!(
        denied.status, 502,
        "the backend refuses the gateway: {denied:?}"
    );
    // Naming the gateway (by entity) lets it in again.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: clients-only, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}, {entity: gateway}]\n",
    );
    t.settle();
    let allowed = curl(&t, &pem_two, "https://a.example.test:8443/exact", &[]);
    assert_eq!(allowed.status, 200, "{allowed:?}");
}

#[test]
fn the_gateway_matches_normalised_paths_refuses_misdirected_hosts_and_forged_forwarding() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    let (_edge, pem) = edge_state(&t);
    let _running = start(&t, "", "");
    let _main = t.server_with(8080, &["--http"]);
    let _alt = t.server_with(8081, &["--http"]);
    let a = |path: &str, extra: &[&str]| {
        let mut args = vec!["--path-as-is"];
        args.extend(extra);
        curl(
            &t,
            &pem,
            &format!("https://a.example.test:8443{path}"),
            &args,
        )
    };
    let received = |r: &Reply| r.body.split(' ').nth(2).unwrap_or_default().to_owned();

    // Routes see the normalised path and the backend receives it: `/api/../exact` is `/exact`
    // (Exact route, no rewrite to /v1), however the dots are spelled.
    for attack in [
        "/api/../exact",
        "/api/%2e%2e/exact",
        "/api/.%2E/exact",
        "//api/../exact",
    ] {
        let r = a(attack, &[]);
        assert_eq!(
            (r.status, received(&r).as_str()),
            (200, "/exact"),
            "{attack}: {r:?}"
        );
    }
    // What servers split differently is refused before any route.
    for attack in ["/api/..%2fexact", "/api/..%5Cexact", "/api/caf%C3%A9"] {
        let r = a(attack, &[]);
        assert_eq!(r.status, 400, "{attack}: {r:?}");
    }
    // The legitimate request beside them, oddly spelled, is rewritten from its normal form.
    let r = a("/api//orders/./7", &[]);
    assert_eq!(
        (r.status, received(&r).as_str()),
        (200, "/v1/orders/7"),
        "{r:?}"
    );

    // A request on a.example.test's connection for a host another certificate serves: 421,
    // over HTTP/1.1 and HTTP/2; the same host on its own connection is served.
    for version in ["--http1.1", "--http2"] {
        let r = a("/exact", &[version, "-H", "Host: b.example.test"]);
        assert_eq!(r.status, 421, "{version}: {r:?}");
        let r = a("/exact", &[version, "-H", "Host: a.example.test"]);
        assert_eq!(r.status, 200, "{version}: {r:?}");
    }
    let r = curl(&t, &pem, "https://b.example.test:8443/exact", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    // The Gateway's own answers are counted by reason.
    let (_, metrics) = t.admin_get('a', "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "signet_gateway_requests_refused_total{reason=\"misdirected\"} 2"),
        "two misdirected requests counted:\n{metrics}"
    );

    // Forwarding headers a client writes are replaced by what the Gateway saw.
    let forged = [
        "-H",
        "X-Forwarded-For: 10.0.0.1",
        "-H",
        "Forwarded: for=10.0.0.1;proto=https",
        "-H",
        "X-Real-IP: 10.0.0.1",
        "-H",
        "X-Forwarded-Host: admin.internal",
    ];
    let r = a("/exact", &forged);
    assert_eq!(r.status, 200, "{r:?}");
    let body = r.body.to_ascii_lowercase();
    assert!(
        body.contains(&format!("x-forwarded-for: {}\n", t.node_ip('a'))),
        "{r:?}"
    );
    assert!(
        !body.contains("10.0.0.1"),
        "a forged address reached the backend: {r:?}"
    );
    assert!(!body.contains("admin.internal"), "{r:?}");
}

/// An HTTP/2 connection to a.example.test on node A's Gateway, from node A's namespace: one
/// `GET first`, then `GET /exact` every `every` (if given), until the connection ends or
/// `limit` has passed. Returns the requests answered whole and how long the connection lived.
fn h2_session(
    t: &Topology,
    ca_pem: &str,
    first: &str,
    every: Option<Duration>,
    limit: Duration,
) -> (usize, Duration) {
    let node = t.node_ip('a');
    in_netns(&t.ns("node-a"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut roots = rustls::RootCertStore::empty();
            for block in pem::parse_many(ca_pem).expect("pem") {
                roots
                    .add(rustls_pki_types::CertificateDer::from(
                        block.into_contents(),
                    ))
                    .expect("root");
            }
            let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let tcp = tokio::net::TcpStream::connect((node.as_str(), 8443))
                .await
                .expect("connect");
            let name = rustls_pki_types::ServerName::try_from("a.example.test").expect("name");
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                .connect(name, tcp)
                .await
                .expect("TLS");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (mut send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .expect("HTTP/2 handshake");
            let started = Instant::now();
            let mut conn = tokio::spawn(conn);
            let mut answered = 0;
            while started.elapsed() < limit {
                let path = if answered == 0 { first } else { "/exact" };
                let req = http::Request::get(format!("https://a.example.test:8443{path}"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("request");
                let Ok(resp) = send.send_request(req).await else {
                    break;
                };
                if resp.status() != 200 {
                    break;
                }
                if http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .is_err()
                {
                    break;
                }
                answered += 1;
                let Some(every) = every else { break };
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = &mut conn => return (answered, started.elapsed()),
                }
            }
            let left = limit.saturating_sub(started.elapsed());
            let _ = tokio::time::timeout(left, &mut conn).await;
            (answered, started.elapsed())
        })
    })
}

#[test]
fn the_edge_and_the_mesh_have_their_own_budgets_and_edge_connections_end() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    let (edge, pem) = edge_state(&t);
    let _running = start(
        &t,
        "",
        "proxy: {maxConnections: 8, maxConnectionsPerPod: 2}\n\
         gateway: {maxConnections: 3, maxConnectionsPerClient: 2, idleTimeoutSeconds: 2,\n\
         \x20         maxConnectionAgeSeconds: 5}\n",
    );
    let _http = t.server_with(8080, &["--http"]);
    // /items/N goes to 8081: a backend that takes 3 s to send each body.
    let _slow = t.server_with(8081, &["--http", "--slow-body-ms", "3000"]);
    let _held = t.server_with(9090, &["--hold"]);
    let mesh = format!("{}:9090", t.pod_ip('b'));
    let refusals = |reason: &str| {
        let (_, metrics) = t.admin_get('a', "/metrics");
        metrics
            .lines()
            .filter(|l| l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };

    step.to("The edge's budgets");
    // The edge's budgets: node A's address holds its two (a third is refused, counted); node B
    // beside it is served, until the Gateway's three are taken; the mesh is untouched all along.
    // With one shared budget, or none per client, the refusals would be served.
    let hold = |from: char, n: usize| {
        let (opened, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (ns, node, ca) = (
            t.ns(&format!("node-{from}")),
            t.node_ip('a'),
            edge.pem.clone(),
        );
        let (opened_tx, go_rx) = (opened.0, go.1);
        let holder = std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut held: Vec<_> = (0..n).map(|_| kept_alive_client(&node, &ca)).collect();
            let first: Vec<String> = held.iter_mut().map(get_on).collect();
            opened_tx.send(first).expect("signal");
            go_rx.recv().expect("go");
        });
        let first = opened
            .1
            .recv_timeout(Duration::from_secs(15))
            .expect("Gateway connections held");
        assert!(
            first.iter().all(|r| r.starts_with("HTTP/1.1 200")),
            "{first:?}"
        );
        (holder, go.0)
    };
    let url = "https://a.example.test:8443/exact";
    let (from_a, release_a) = hold('a', 2);
    let third = curl(&t, &pem, url, &[]);
    assert_ne!(
        third.exit, 0,
        "node A's third connection is refused: {third:?}"
    );
    assert!(refusals("gateway_client_share") >= 1);
    let b = curl_from(&t, 'b', &pem, url, &[]);
    assert_eq!(b.status, 200, "another client is served: {b:?}");
    let (from_b, release_b) = hold('b', 1);
    let over = curl_from(&t, 'b', &pem, url, &[]);
    assert_ne!(over.exit, 0, "the Gateway's three are taken: {over:?}");
    assert!(refusals("gateway_connection_limit") >= 1);
    assert_eq!(t.client(&mesh)["ok"], true, "the mesh has its own budget");
    for (holder, release) in [(from_a, release_a), (from_b, release_b)] {
        release.send(()).expect("go");
        holder.join().expect("holder");
    }
    let again = wait_for_status(&t, &pem, 200);
    assert_eq!(
        again.status, 200,
        "served again once a slot is free: {again:?}"
    );

    step.to("One pod's share of the node's outbound slots");
    // One pod's share of the node's outbound slots: two held, a third is reset (counted); once
    // they end the pod connects again.
    let holding: Vec<_> = (0..2)
        .map(|_| {
            t.client_command(&mesh, &["--hold-ms", "4000"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("held client")
        })
        .collect();
    signet_test_support::wait_for("the two held connections to be open", || {
        let (_, body) = t.admin_get('a', "/debug/state");
        let state: serde_json::Value = serde_json::from_str(&body).ok()?;
        let open = state["flows"]
            .as_array()?
            .iter()
            .filter(|f| f["reporter"] == "outbound")
            .count();
        (open >= 2).then_some(())
    });
    let over = t.client(&mesh);
    assert_ne!(
        over["ok"], true,
        "a third connection of one pod is refused: {over}"
    );
    assert!(refusals("pod_connection_share") >= 1);
    for child in holding {
        let out = child.wait_with_output().expect("held client");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            report["ok"], true,
            "the held connections were served: {report}"
        );
    }
    assert_eq!(t.client(&mesh)["ok"], true, "and the pod connects again");

    step.to("HTTP/2 at the edge");
    // HTTP/2 at the edge: an idle connection is closed although it answers every ping, and a
    // busy one is closed at its maximum age.
    let (answered, lived) = h2_session(&t, &edge.pem, "/exact", None, Duration::from_secs(12));
    assert_eq!(answered, 1);
    assert!(
        lived >= Duration::from_millis(1500) && lived < Duration::from_secs(6),
        "an idle HTTP/2 connection lives its idle timeout (2 s), not for ever: {lived:?}"
    );
    // A response still being sent is not idle: the 3 s body arrives whole and the connection
    // serves the requests after it (a GOAWAY at 2 s would refuse them).
    let (answered, lived) = h2_session(
        &t,
        &edge.pem,
        "/items/1",
        Some(Duration::from_millis(100)),
        Duration::from_millis(4000),
    );
    assert!(answered >= 3, "{answered} requests in {lived:?}");
    let (answered, lived) = h2_session(
        &t,
        &edge.pem,
        "/exact",
        Some(Duration::from_millis(400)),
        Duration::from_secs(15),
    );
    assert!(answered >= 5, "{answered} requests");
    assert!(
        lived >= Duration::from_millis(4500) && lived < Duration::from_secs(10),
        "a busy HTTP/2 connection ends at its maximum age (5 s): {lived:?}"
    );
}

/// curl until the Gateway answers `status` (a slot frees when the connection's task ends).
fn wait_for_status(t: &Topology, ca: &Path, status: u16) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = curl(t, ca, "https://a.example.test:8443/exact", &[]);
        if r.status == status || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The demo's edge CA and the certificates it issues (`deploy/local/lib.sh`) satisfy a strict
/// validator (RFC 5280 key usage and basic constraints), and the server certificate cannot act
/// as a CA: a certificate it signs fails the same check.
#[test]
fn the_demo_edge_certificates_pass_strict_x509_verification_and_a_leaf_cannot_sign() {
    let dir = tempfile::tempdir().expect("tmp");
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/lib.sh");
    let run = |script: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(". '{}' && {script}", lib.display()))
            .current_dir(dir.path())
            .output()
            .expect("bash");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run("make_ca ca 'edge CA' && issue_cert ca leaf a.example.test");
    assert!(ok, "making the demo's certificates: {out}");
    let (ok, out) = run("openssl verify -x509_strict -purpose sslserver -CAfile ca.pem leaf.crt");
    assert!(ok && out.contains("leaf.crt: OK"), "{out}");
    let (ok, out) = run("openssl x509 -in leaf.crt -noout -ext keyUsage,extendedKeyUsage");
    assert!(
        ok && out.contains("Digital Signature") && out.contains("TLS Web Server Authentication"),
        "{out}"
    );
    // The attack: the server certificate's key signs another certificate.
    let (ok, out) = run(
        "cp leaf.crt leaf.pem && issue_cert leaf forged b.example.test && \
         openssl verify -x509_strict -CAfile ca.pem -untrusted leaf.crt forged.crt",
    );
    assert!(
        !ok && out.contains("invalid CA certificate"),
        "a certificate signed by a leaf must not verify: {out}"
    );
}

/// Gateways on addresses of their own from a LoadBalancerIPPool, on the shared L2 segment.
fn own_addresses_yaml(t: &Topology) -> String {
    format!(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: signet}}
spec: {{controllerName: signet.dev/gateway-controller}}
---
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {{name: lan}}
spec: {{blocks: [{{start: {first}, stop: {last}}}]}}
---
apiVersion: signet.dev/v1alpha1
kind: LoadBalancerIPPool
metadata: {{name: lan6}}
spec: {{blocks: [{{cidr: '{six}/127'}}], serviceSelector: {{matchLabels: {{signet.dev/name: six}}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: six, namespace: edge}}
spec:
  gatewayClassName: signet
  addresses: [{{type: IPAddress, value: '{six}'}}]
  listeners: [{{name: http, port: 80, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: six, namespace: shop}}
spec:
  parentRefs: [{{name: six, namespace: edge}}]
  rules:
  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-gateway, value: six}}]}}}}]
    backendRefs: [{{name: server, port: 80}}]
---
apiVersion: signet.dev/v1alpha1
kind: L2AnnouncementPolicy
metadata: {{name: lan}}
spec: {{interfaces: ['sgl[0-9]+[ab]'], loadBalancerIPs: true}}
---
{gateways}",
        first = t.lan_ip(200),
        six = t.lan_ip6(200),
        last = t.lan_ip(201),
        gateways = ["one", "two", "three"]
            .iter()
            .enumerate()
            .map(|(i, g)| format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                 metadata: {{name: {g}, namespace: edge, creationTimestamp: '2026-01-01T00:00:0{i}Z'}}\n\
                 spec: {{gatewayClassName: signet, listeners: [{{name: http, port: 80, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}]}}\n---\n\
                 apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {g}, namespace: shop}}\n\
                 spec:\n  parentRefs: [{{name: {g}, namespace: edge}}]\n  rules:\n  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-gateway, value: {g}}}]}}}}]\n    backendRefs: [{{name: server, port: 80}}]\n---\n"
            ))
            .collect::<String>()
    )
}

/// `curl http://<addr>/` from the `out` namespace: status and the x-gateway header.
fn from_outside(t: &Topology, addr: &str) -> (u16, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("out"),
            "curl",
            "-sS",
            "--max-time",
            "2",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .arg(format!("http://{addr}/"))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let gateway = head
        .lines()
        .find_map(|l| l.strip_prefix("x-gateway: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    (status, gateway)
}

/// The MAC of `dev` in namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC for {dev} in {ns}: {text}"))
        .to_owned()
}

/// Who answers an ARP request for `target` sent from `out`'s eth0: the sender MAC of every
/// reply within 700 ms.
fn arp_answers(t: &Topology, target: &str) -> Vec<String> {
    use signet_agent::vip::arp::{frame, parse};
    let me: [u8; 6] = {
        let m = mac_of(&t.ns("out"), "eth0");
        let b: Vec<u8> = m
            .split(':')
            .map(|x| u8::from_str_radix(x, 16).expect("hex"))
            .collect();
        b.try_into().expect("6 bytes")
    };
    let (sip, tip) = (
        t.lan_ip(100).parse().expect("ip"),
        target.parse().expect("ip"),
    );
    in_netns(&t.ns("out"), move || {
        let mut s = signet_agent::net::packet_socket(None, "eth0", 0x0806).expect("packet socket");
        s.write_all(&frame([0xff; 6], me, 1, me, sip, [0; 6], tip))
            .expect("send");
        let mut seen = Vec::new();
        let start = Instant::now();
        let mut buf = [0u8; 1514];
        while start.elapsed() < Duration::from_millis(700) {
            let Ok(n) = s.read(&mut buf) else { continue };
            if let Some(a) = parse(&buf[..n])
                && a.op == 2
                && a.spa == tip
            {
                seen.push(
                    a.sha
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                );
            }
        }
        seen
    })
}

#[test]
fn gateways_share_a_port_on_their_own_addresses_announced_by_one_node_that_fails_over() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let mut t = Topology::new();
    t.add_lan();
    t.write_state("");
    write(t.dir.path(), "gateways.yaml", &own_addresses_yaml(&t));
    let mut running = start(&t, "", "");
    let _server = t.server_with(8080, &["--http"]);

    step.to("two Gateways get the pool's two addresses, the third is refused and says why; an IPv6 one gets the address it asks for");
    let table =
        signet_agent::state::lbipam::AddressTable::new(&t.dir.path().join("addresses.json"));
    let record = signet_test_support::wait_for("three addresses given", || {
        table.read().ok().filter(|r| r.len() == 3)
    });
    let addr_of = |g: &str| {
        record
            .iter()
            .find(|(_, (_, o))| o.name == g)
            .map(|(ip, _)| ip.to_string())
            .unwrap_or_else(|| panic!("{g} has no address: {record:?}"))
    };
    let (one, two) = (addr_of("one"), addr_of("two"));
    assert_eq!(
        (one.as_str(), two.as_str()),
        (t.lan_ip(200).as_str(), t.lan_ip(201).as_str())
    );
    let td = signet_ca::TrustDomain::parse("cluster.local").expect("td");
    let status =
        signet_agent::state::snapshot::gateway_status(&t.dir.path().join("state"), &record, &td)
            .expect("status");
    let three = status
        .gateways
        .iter()
        .find(|g| g.name == "three")
        .expect("three");
    let programmed = three
        .conditions
        .iter()
        .find(|c| c.type_ == "Programmed")
        .expect("Programmed");
    assert_eq!(
        (programmed.status.as_str(), programmed.reason.as_str()),
        ("False", "AddressNotAssigned"),
        "{three:?}"
    );

    step.to("from outside, each address reaches its own Gateway on port 80");
    for (addr, g) in [(&one, "one"), (&two, "two")] {
        let got = signet_test_support::wait_for(&format!("{addr} to answer"), || {
            let r = from_outside(&t, addr);
            (r.0 == 200).then_some(r)
        });
        assert_eq!(got, (200, g.to_owned()), "{addr}");
    }

    let six = addr_of("six");
    assert_eq!(six, t.lan_ip6(200));

    step.to("exactly one node answers ARP for each address: the lease holder");
    let leases = signet_agent::vip::lease::LeaseTable::new(&t.dir.path().join("l2-leases.json"))
        .read()
        .expect("leases");
    let holder = |addr: &str| leases[&addr.parse().expect("ip")].holder_identity.clone();
    let leader = holder(&one);
    let node_char = |name: &str| name.chars().last().expect("node letter");
    let mac = |node: char| mac_of(&t.ns(&format!("node-{node}")), &format!("sgl{}{node}", t.n));
    for addr in [&one, &two] {
        let answers = arp_answers(&t, addr);
        assert_eq!(
            answers,
            [mac(node_char(&holder(addr)))],
            "{addr}: only {} answers",
            holder(addr)
        );
    }
    let neigh = Command::new("ip")
        .args(["-n", &t.ns("out"), "neigh", "show", &one])
        .output()
        .expect("neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    assert!(
        neigh.contains(&mac(node_char(&leader))),
        "outside resolved {one} to the leader {leader}: {neigh}"
    );

    step.to("IPv6: neighbour discovery resolves the Gateway's address to its lease holder");
    let bracketed = format!("[{six}]");
    let got = signet_test_support::wait_for(&format!("{six} to answer"), || {
        let r = from_outside(&t, &bracketed);
        (r.0 == 200).then_some(r)
    });
    assert_eq!(got, (200, "six".to_owned()));
    let neigh6 = Command::new("ip")
        .args(["-6", "-n", &t.ns("out"), "neigh", "show", &six])
        .output()
        .expect("neigh");
    let neigh6 = String::from_utf8_lossy(&neigh6.stdout).into_owned();
    assert!(
        neigh6.contains(&mac(node_char(&holder(&six)))),
        "outside resolved {six} to {}: {neigh6}",
        holder(&six)
    );

    step.to(
        "the leader's agent dies: the other node announces within 3 s and new connections work",
    );
    std::thread::sleep(Duration::from_millis(1200)); // past the neighbour entry's lock time
    let survivor = if node_char(&leader) == 'a' { 'b' } else { 'a' };
    let started = Instant::now();
    running.crash_agent(node_char(&leader));
    let announced = loop {
        let n = Command::new("ip")
            .args(["-n", &t.ns("out"), "neigh", "show", &one])
            .output()
            .expect("neigh");
        if String::from_utf8_lossy(&n.stdout).contains(&mac(survivor)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no failover to node-{survivor}"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let served = loop {
        if from_outside(&t, &one) == (200, "one".to_owned()) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{one} not served after failover"
        );
    };
    println!(
        "failover: node-{survivor} announced {one} {} ms after node-{} died; first new request answered at {} ms",
        announced.as_millis(),
        node_char(&leader),
        served.as_millis()
    );
    assert!(
        announced <= Duration::from_secs(3),
        "announced after {announced:?}"
    );
    // The dead node's kernel stays silent: every answer is the survivor's, one per request.
    let after: Vec<Vec<String>> = (0..3).map(|_| arp_answers(&t, &one)).collect();
    println!("ARP answers after failover, three requests: {after:?}");
    for answers in &after {
        assert!(
            answers.iter().all(|m| *m == mac(survivor)) && answers.len() <= 1,
            "{after:?}"
        );
    }
    assert!(
        after.iter().any(|a| !a.is_empty()),
        "the survivor answers: {after:?}"
    );
    assert_eq!(from_outside(&t, &two), (200, "two".to_owned()));
}

const L4: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: l4, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - {name: tcp, port: 9000, protocol: TCP, allowedRoutes: {namespaces: {from: All}}}
  - {name: tls, port: 9443, protocol: TLS, hostname: '*.example.test', tls: {mode: Passthrough}, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: edge}
spec:
  gatewayClassName: signet
  listeners: [{name: tcp, port: 9001, protocol: TCP, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: plain, namespace: shop}
spec:
  parentRefs: [{name: l4, namespace: edge, sectionName: tcp}, {name: other, namespace: edge}]
  rules: [{backendRefs: [{name: server, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: TLSRoute
metadata: {name: db, namespace: shop}
spec:
  parentRefs: [{name: l4, namespace: edge, sectionName: tls}]
  hostnames: [db.example.test]
  rules: [{backendRefs: [{name: server-tls, port: 443}]}]
---
apiVersion: v1
kind: Service
metadata: {name: server-tls, namespace: shop}
spec: {clusterIP: CLUSTER_IP, selector: {app: server}, ports: [{name: tls, port: 443, targetPort: 8443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
addressType: IPv4
metadata: {name: server-tls-1, namespace: shop, labels: {kubernetes.io/service-name: server-tls}}
ports: [{name: tls, port: 8443}]
endpoints: [{addresses: [POD_IP], conditions: {ready: true}}]
---
# The backend admits the Gateway edge/l4 only: edge/other's TCPRoute reaches nothing.
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: server, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  ingress: [{from: [{gateway: {namespace: edge, name: l4}}], ports: [{port: 8080}, {port: 8443}]}]
";

/// curl from node B's namespace to node A's address: the exit code and what it printed.
fn curl_b(t: &Topology, args: &[&str]) -> (i32, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("node-b"),
            "curl",
            "-sS",
            "--max-time",
            "5",
        ])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn tcp_and_tls_passthrough_routes_carry_bytes_untouched_and_refuse_what_they_cannot_route() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state("");
    let dir = t.dir.path().to_owned();
    let manifests = L4
        .replace("CLUSTER_IP", &format!("10.96.{}.11", t.n))
        .replace("POD_IP", &t.pod_ip('b'));
    write(&dir, "l4.yaml", &manifests);
    // The backend's own certificate, from a CA only the client trusts: the Gateway has none.
    let backend_ca = EdgeCa::new("backend CA");
    let secret = backend_ca.secret("x", "x", "db.example.test");
    let pem_of = |tag: &str| {
        let start = secret.find(&format!("-----BEGIN {tag}")).expect("begin");
        let end_tag = format!("-----END {tag}-----");
        let end = secret[start..].find(&end_tag).expect("end") + start + end_tag.len();
        secret[start..end]
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    std::fs::write(dir.join("backend.crt"), pem_of("CERTIFICATE")).expect("crt");
    std::fs::write(dir.join("backend.key"), pem_of("PRIVATE KEY")).expect("key");
    std::fs::write(dir.join("backend-ca.pem"), &backend_ca.pem).expect("ca");
    let _running = start(&t, "", "");
    let _http = t.server_with(8080, &["--http"]);
    let mut tls_server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns("pod-b"),
            "openssl",
            "s_server",
            "-quiet",
            "-www",
        ])
        .args(["-accept", &format!("{}:8443", t.pod_ip('b'))])
        .arg("-cert")
        .arg(dir.join("backend.crt"))
        .arg("-key")
        .arg(dir.join("backend.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _tls_server = Kill(&mut tls_server);
    let a = t.node_ip('a');

    step.to("status: each listener takes its route kind, and the routes attach");
    let status = signet_agent::state::snapshot::gateway_status(
        &dir.join("state"),
        &Default::default(),
        &signet_ca::TrustDomain::parse("cluster.local").expect("td"),
    )
    .expect("status");
    let l4 = status.gateways.iter().find(|g| g.name == "l4").expect("l4");
    let kinds: Vec<(String, Vec<String>, i32)> = l4
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.supported_kinds.clone(), l.attached_routes))
        .collect();
    assert_eq!(
        kinds,
        [
            ("tcp".to_owned(), vec!["TCPRoute".to_owned()], 1),
            ("tls".to_owned(), vec!["TLSRoute".to_owned()], 1)
        ]
    );
    let other = status
        .gateways
        .iter()
        .find(|g| g.name == "other")
        .expect("other");
    assert_eq!(
        other.listeners[0].attached_routes, 1,
        "edge/other carries the TCPRoute too: only policy stops it"
    );
    let tls_route = status
        .tls_routes
        .iter()
        .find(|r| r.name == "db")
        .expect("db");
    assert!(
        tls_route.parents[0]
            .conditions
            .iter()
            .all(|c| c.status == "True"),
        "{tls_route:?}"
    );

    step.to("TCP: the bytes reach the backend through the Gateway's tunnel");
    let (code, out) = signet_test_support::wait_for("the TCP listener", || {
        let r = curl_b(&t, &[&format!("http://{a}:9000/tcp")]);
        (r.0 == 0).then_some(r)
    });
    assert_eq!(code, 0);
    assert!(out.starts_with("hi GET /tcp HTTP/1.1 at "), "{out}");

    step.to("TLS passthrough: the backend's own certificate reaches the client");
    let ca = dir.join("backend-ca.pem");
    let resolve = format!("db.example.test:9443:{a}");
    let (code, out) = signet_test_support::wait_for("the TLS listener", || {
        let r = curl_b(
            &t,
            &[
                "--resolve",
                &resolve,
                "--cacert",
                ca.to_str().expect("path"),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{ssl_verify_result}",
                "https://db.example.test:9443/",
            ],
        );
        (r.0 == 0).then_some(r)
    });
    assert_eq!(
        (code, out.as_str()),
        (0, "200 0"),
        "curl verified the backend's certificate for db.example.test"
    );

    step.to("what cannot be routed is refused, and the routed flows beside it keep working");
    // Plaintext on the TLS port, a server name no route has, no server name at all.
    let (code, _) = curl_b(&t, &[&format!("http://{a}:9443/")]);
    assert_ne!(code, 0, "plaintext on a TLS passthrough port is refused");
    let other = format!("nope.example.test:9443:{a}");
    let (code, out) = curl_b(
        &t,
        &["-k", "--resolve", &other, "https://nope.example.test:9443/"],
    );
    assert_ne!(code, 0, "an unrouted server name is refused: {out}");
    let (code, out) = curl_b(&t, &["-k", &format!("https://{a}:9443/")]);
    assert_ne!(code, 0, "no server name is refused: {out}");
    // edge/other's TCPRoute reaches the same backend, whose policy admits only edge/l4.
    let (code, out) = curl_b(&t, &[&format!("http://{a}:9001/")]);
    assert_ne!(
        code, 0,
        "the backend's ingress policy refuses Gateway edge/other: {out}"
    );
    let (code, out) = curl_b(&t, &[&format!("http://{a}:9000/still")]);
    assert!(code == 0 && out.starts_with("hi GET /still"), "{out}");
    let (code, out) = curl_b(
        &t,
        &[
            "--resolve",
            &resolve,
            "--cacert",
            ca.to_str().expect("path"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://db.example.test:9443/",
        ],
    );
    assert_eq!((code, out.as_str()), (0, "200"));
}
