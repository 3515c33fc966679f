//! The CA's admin port (`admin:` in its configuration; off unless set), plain HTTP/1.1:
//! - `GET /healthz/ready`: 200 while the CA serves;
//! - `GET /status`: JSON ([`CaStatus`], in `crate::status`): trust domain, version, the gRPC address, where pods
//!   come from, each root in the bundle with its validity and rotation state, and when the next
//!   rotation starts. What `signet status` shows for the CA. Nothing secret: no key, no token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::issuer::CertificateAuthority;
use crate::status::CaStatus;

/// Serves the admin port on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    status: Arc<dyn Fn() -> CaStatus + Send + Sync>,
    stop: CancellationToken,
) {
    use hyper_util::rt::TokioIo;
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let resp = route(req.method(), req.uri().path(), &status);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

fn route(
    method: &http::Method,
    path: &str,
    status: &Arc<dyn Fn() -> CaStatus + Send + Sync>,
) -> http::Response<Body> {
    let respond = |code: http::StatusCode, kind: &str, body: String| {
        http::Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, kind)
            .body(Body::from(body))
            .expect("static headers are valid")
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != http::Method::GET && method != http::Method::HEAD {
        return respond(
            http::StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET only\n".into(),
        );
    }
    match path {
        "/healthz/ready" => respond(http::StatusCode::OK, TEXT, "ready\n".into()),
        "/status" => match serde_json::to_string_pretty(&status()) {
            Ok(j) => respond(http::StatusCode::OK, "application/json", j + "\n"),
            Err(e) => respond(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("{e}\n"),
            ),
        },
        _ => respond(
            http::StatusCode::NOT_FOUND,
            TEXT,
            "try /healthz/ready or /status\n".into(),
        ),
    }
}

/// The status closure for a CA serving on `serving`.
pub fn status_of(
    ca: Arc<CertificateAuthority>,
    serving: SocketAddr,
    cluster_source: &'static str,
) -> Arc<dyn Fn() -> CaStatus + Send + Sync> {
    Arc::new(move || CaStatus {
        trust_domain: ca.trust_domain().to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        serving: serving.to_string(),
        cluster_source: cluster_source.into(),
        roots: ca.roots_status(time::OffsetDateTime::now_utc()),
    })
}
