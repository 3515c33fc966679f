//! `signet-gateway-bench` (root; not a test): the halves `deploy/local/gateway-bench.sh` runs to
//! compare Signet's Gateway with nginx as TLS-terminating reverse proxies to one backend.
//!
//!     signet-gateway-bench backend --netns NS --addr IP:PORT
//!     signet-gateway-bench load --netns NS --target IP:PORT --host NAME --ca PEM [--path /]
//!                               [--connections 16] [--seconds 5] [--new-connections]
//!
//! `backend` is a small HTTP/1.1 server (hyper) answering every request with 64 bytes.
//! `load` runs `connections` clients for `seconds`, each sending GET requests over HTTPS
//! (rustls, HTTP/1.1) one after another, on one kept-alive connection or on a new TLS connection
//! per request, and prints requests/s and latency percentiles as JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use signet_tests::{Args, enter, fail};

fn main() {
    let args = Args::from_env();
    // Before any runtime thread exists, so they all live in the namespace.
    enter(None, Some(args.need("--netns")));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    match args.command() {
        Some("backend") => rt.block_on(backend(args.need("--addr"))),
        Some("load") => {
            let report = rt.block_on(load(&args));
            println!("{report}");
        }
        _ => fail("usage: signet-gateway-bench backend|load ... (see the module docs)".into()),
    }
}

async fn backend(addr: &str) {
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|_| fail(format!("`{addr}` is not IP:PORT")));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
    eprintln!("listening");
    let body = Bytes::from(vec![b'x'; 64]);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), service)
                .await;
        });
    }
}

async fn load(args: &Args) -> serde_json::Value {
    let target: SocketAddr = args
        .need("--target")
        .parse()
        .unwrap_or_else(|_| fail("--target IP:PORT".into()));
    let host = args.need("--host").to_owned();
    let path = args.value("--path").unwrap_or("/").to_owned();
    let ca = args.need("--ca");
    let connections: usize = args
        .value("--connections")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let seconds = Duration::from_secs(
        args.value("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    let fresh = args.flag("--new-connections");
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap_or_else(|e| fail(format!("{ca}: {e}")));
    for block in pem::parse_many(&pem).unwrap_or_else(|e| fail(format!("{ca}: {e}"))) {
        roots
            .add(rustls_pki_types::CertificateDer::from(
                block.into_contents(),
            ))
            .unwrap_or_else(|e| fail(format!("{ca}: {e}")));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A new connection per request means a full handshake per request, as a client without
    // session resumption does.
    cfg.resumption = rustls::client::Resumption::disabled();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (tls, host, path) = (tls.clone(), host.clone(), path.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            let mut sender = None;
            while start.elapsed() < seconds {
                let t = Instant::now();
                if sender.is_none() || fresh {
                    sender = connect(&tls, target, &host).await.ok();
                }
                let Some(s) = sender.as_mut() else {
                    errors += 1;
                    continue;
                };
                let req = http::Request::get(path.as_str())
                    .header(http::header::HOST, &host)
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                match s.send_request(req).await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        samples.push(t.elapsed());
                    }
                    _ => {
                        errors += 1;
                        sender = None;
                    }
                }
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((s, e)) = w.await {
            all.extend(s);
            errors += e;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len().max(1) - 1) as f64 * p) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    serde_json::json!({
        "requests_per_s": all.len() as f64 / secs,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "requests": all.len(),
        "errors": errors,
    })
}

async fn connect(
    tls: &tokio_rustls::TlsConnector,
    target: SocketAddr,
    host: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name =
        rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
