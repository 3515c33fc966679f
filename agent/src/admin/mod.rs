//! The admin port: Prometheus metrics and health for the kubelet and for operators.
//!
//! - `GET /metrics` (also `/stats/prometheus`, where Istio's scrapers look): the text format.
//! - `GET /healthz/ready`: 200 once every local workload has a certificate and the datapath is
//!   attached; 503 with the reason otherwise.
//! - `GET /healthz/live`: 200 while the process serves.
//! - `GET /status`: JSON ([`status::AgentStatus`]): readiness, datapath programs and map fill,
//!   certificates, connections, policies and Gateways, what `signet status` reads.
//! - `GET /flows[?after=SEQ&since_ms=T&follow=1]`: the node's recent flows, one JSON record per
//!   line (`flows`), from this node's loopback only; what `signet observe` reads.
//! - `GET /debug/state`: JSON ([`debug::DebugState`]): the snapshot generation in force, the
//!   cluster state's revision last looked at and why it was refused, each identity's
//!   certificate, the open connections, the IdentityPolicies in force with a digest of each
//!   spec (what `signet connectivity test --kubernetes` waits on).
//!
//! It binds where the configuration says (loopback by default); it reads state and changes none.

pub mod debug;
pub mod flows;
pub mod metrics;
pub mod status;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use metrics::{Gauges, Metrics};

/// What the admin port reads.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Current gauges; `ready` among them.
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    /// `Err(reason)` while the agent is not ready.
    pub readiness: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    /// What `/debug/state` shows.
    pub debug: Arc<dyn Fn() -> debug::DebugState + Send + Sync>,
    /// What `/status` shows.
    pub status: Arc<dyn Fn() -> status::AgentStatus + Send + Sync>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

/// Whether a scraper asked for OpenMetrics (Prometheus itself does, listing it first).
fn wants_openmetrics(accept: Option<&http::HeaderValue>) -> bool {
    accept
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Who asked: the request's `Accept` header, and whether it came from this node (loopback).
#[derive(Debug, Clone, Copy)]
struct Asker<'a> {
    accept: Option<&'a http::HeaderValue>,
    local: bool,
}

fn route(
    state: &AdminState,
    method: &Method,
    path: &str,
    asker: Asker<'_>,
) -> Response<Full<Bytes>> {
    let accept = asker.accept;
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match path {
        "/metrics" | "/stats/prometheus" if wants_openmetrics(accept) => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.render_openmetrics(&(state.gauges)()),
        ),
        "/metrics" | "/stats/prometheus" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(&(state.gauges)()),
        ),
        "/healthz/ready" => match (state.readiness)() {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n".into()),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        "/healthz/live" => respond(StatusCode::OK, TEXT, "live\n".into()),
        "/status" => match serde_json::to_string_pretty(&(state.status)()) {
            Ok(json) => respond(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        // Open flows and certificate serials are for this node's operators: the port may be
        // reachable from the network (probes, scrapers), these pages are not.
        "/flows" => respond(
            StatusCode::FORBIDDEN,
            TEXT,
            "/flows answers only GET on this node's loopback\n".into(),
        ),
        "/debug/state" if !asker.local => respond(
            StatusCode::FORBIDDEN,
            TEXT,
            "/debug/state answers only on this node's loopback\n".into(),
        ),
        "/debug/state" => match serde_json::to_string_pretty(&(state.debug)()) {
            Ok(json) => respond(StatusCode::OK, "application/json", json + "\n"),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz/ready, /healthz/live, /status, /flows or /debug/state\n".into(),
        ),
    }
}

/// Serves until the drain stops. A client that has not sent its request head within
/// `header_read` is disconnected.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    header_read: std::time::Duration,
    drain: crate::drain::Drain,
) {
    let stop = drain.stop_token();
    loop {
        let Some((sock, peer)) = crate::net::accept_next(&listener, &stop, "admin").await else {
            return;
        };
        let state = state.clone();
        let stopping = drain.stop_token();
        drain.spawn("admin connection", async move {
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                use http_body_util::BodyExt as _;
                let local = peer.ip().to_canonical().is_loopback();
                let resp = if req.uri().path() == "/flows" && local && req.method() == Method::GET {
                    match flows::Query::parse(req.uri().query()) {
                        Ok(q) => flows::respond(state.metrics.flows().clone(), q, stopping.clone()),
                        Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", e + "\n")
                            .map(|b| b.boxed()),
                    }
                } else {
                    let asker = Asker {
                        accept: req.headers().get(http::header::ACCEPT),
                        local,
                    };
                    route(&state, req.method(), req.uri().path(), asker).map(|b| b.boxed())
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(header_read)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ready: bool) -> AdminState {
        AdminState {
            metrics: Arc::default(),
            gauges: Arc::new(move || Gauges {
                ready,
                ..Gauges::default()
            }),
            readiness: Arc::new(move || {
                if ready {
                    Ok(())
                } else {
                    Err("no certificate yet for spiffe://td/ns/a/sa/b".into())
                }
            }),
            debug: Arc::new(|| debug::DebugState {
                node: "node-a".into(),
                generation: 3,
                ..Default::default()
            }),
            status: Arc::new(|| status::AgentStatus {
                node: "node-a".into(),
                generation: 3,
                ..Default::default()
            }),
        }
    }

    const LOCAL: Asker<'static> = Asker {
        accept: None,
        local: true,
    };

    #[test]
    fn routes() {
        let r = route(&state(true), &Method::GET, "/metrics", LOCAL);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            route(&state(true), &Method::GET, "/healthz/ready", LOCAL).status(),
            StatusCode::OK
        );
        let r = route(&state(false), &Method::GET, "/healthz/ready", LOCAL);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            route(&state(false), &Method::POST, "/metrics", LOCAL).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&state(false), &Method::GET, "/nope", LOCAL).status(),
            StatusCode::NOT_FOUND
        );
        let om = http::HeaderValue::from_static(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        );
        let r = route(
            &state(true),
            &Method::GET,
            "/metrics",
            Asker {
                accept: Some(&om),
                local: true,
            },
        );
        assert!(
            r.headers()[http::header::CONTENT_TYPE]
                .to_str()
                .is_ok_and(|t| t.starts_with("application/openmetrics-text")),
            "{r:?}"
        );
        let remote = Asker {
            accept: None,
            local: false,
        };
        assert_eq!(
            route(&state(true), &Method::GET, "/debug/state", remote).status(),
            StatusCode::FORBIDDEN,
            "not from another machine"
        );
        assert_eq!(
            route(&state(true), &Method::GET, "/metrics", remote).status(),
            StatusCode::OK,
            "scrapers elsewhere still get the metrics"
        );
        let r = route(&state(true), &Method::GET, "/status", remote);
        assert_eq!(r.status(), StatusCode::OK, "signet status reads every node");
        assert_eq!(r.headers()[http::header::CONTENT_TYPE], "application/json");
        let r = route(&state(true), &Method::GET, "/debug/state", LOCAL);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[http::header::CONTENT_TYPE], "application/json");
    }
}
