//! L7 enforcement on inbound streams whose port has `http` rules: each HTTP/1.1 or HTTP/2
//! request is parsed (hyper), its path normalised (`signet_policy::path`; 400 for a path servers
//! would read differently), checked against the rules, and either forwarded to the workload
//! with the normalised path or answered with 403. Nothing reaches the workload unchecked, and
//! what it receives is what the rules matched.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use signet_policy::model::Request as PolicyRequest;
use signet_policy::path::{PathNormalization, normalize};

use crate::policy::request::RequestCheck;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// What an inspected stream enforces, and whom it reports denials about.
#[derive(Clone)]
pub struct L7Flow {
    pub check: RequestCheck,
    /// The opt-outs every rule on this port takes (`normalization_for`).
    pub paths: PathNormalization,
    pub source: String,
    pub destination: String,
    pub metrics: Option<Arc<crate::admin::metrics::Metrics>>,
    /// Both sides as the flow log names them (denials are recorded there with `metrics`).
    pub peers: (crate::flow::Peer, crate::flow::Peer),
}

impl L7Flow {
    /// Records a refused request in the node's flow log.
    fn record_denial(
        &self,
        method: &str,
        path: &str,
        status: u16,
        reason: &str,
        rule: Option<&str>,
    ) {
        let Some(m) = &self.metrics else { return };
        m.flows().push(crate::flow::FlowEntry {
            reporter: crate::flow::Reporter::Inbound.as_str().into(),
            source: self.peers.0.clone(),
            destination: self.peers.1.clone(),
            protocol: "tcp".into(),
            verdict: "l7-denied".into(),
            reason: Some(reason.to_owned()),
            rule: rule.map(str::to_owned),
            http: Some(crate::flow::HttpInfo {
                method: crate::flow::Text::method(method),
                path: path.to_owned(),
                status,
            }),
            ..Default::default()
        });
    }
}

impl std::fmt::Debug for L7Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L7Flow")
            .field("source", &self.source)
            .field("destination", &self.destination)
            .finish_non_exhaustive()
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn bad_request(reason: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("bad request path: {reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp
}

fn forbidden(reason: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("RBAC: access denied: {reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp
}

fn bad_gateway(reason: String) -> Response<Body> {
    let body = Full::new(Bytes::from(reason))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

/// Serves HTTP (1.1 or 2, detected) on `downstream`, forwarding allowed requests over one
/// HTTP/1.1 connection to the workload.
pub async fn serve<S>(downstream: S, upstream: TcpStream, flow: L7Flow, drain: crate::drain::Drain)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(error = %e, "workload did not speak HTTP/1.1");
            return;
        }
    };
    // Driven in its own task; it ends once the server (which holds its sender) is done.
    drain.spawn("l7 upstream", async move {
        let _ = conn.await;
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let (flow, sender) = (flow.clone(), sender.clone());
        async move {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let path = match normalize(target, flow.paths) {
                Ok(path) => path,
                Err(e) => {
                    let reason = e.to_string();
                    tracing::info!(source = %flow.source, destination = %flow.destination, method = %req.method(), path = %target, %reason, verdict = "deny", "http request refused: its path is ambiguous");
                    if let Some(m) = &flow.metrics {
                        m.verdict(
                            crate::flow::Reporter::Inbound,
                            &flow.source,
                            &flow.destination,
                            "l7_bad_path",
                        );
                    }
                    flow.record_denial(req.method().as_str(), target, 400, &reason, None);
                    return Ok(bad_request(&reason));
                }
            };
            let policy_req = PolicyRequest {
                method: req.method().as_str().to_owned(),
                path,
                // Every value, opaque ones too (lossily): dropping one the policy cannot read
                // would let it past a header rule while the workload still receives it.
                headers: req
                    .headers()
                    .iter()
                    .map(|(n, v)| {
                        let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                        (n.as_str().to_owned(), value)
                    })
                    .collect(),
            };
            match (flow.check)(&policy_req) {
                Err(denial) => {
                    let reason = &denial.reason;
                    tracing::info!(source = %flow.source, destination = %flow.destination, method = %policy_req.method, path = %policy_req.path, %reason, rule = %denial.rules, verdict = "deny", "http request");
                    if let Some(m) = &flow.metrics {
                        m.verdict(
                            crate::flow::Reporter::Inbound,
                            &flow.source,
                            &flow.destination,
                            "l7_deny",
                        );
                    }
                    flow.record_denial(
                        &policy_req.method,
                        &policy_req.path,
                        403,
                        reason,
                        Some(&denial.rules),
                    );
                    Ok::<_, hyper::Error>(forbidden(reason))
                }
                Ok(rule) => {
                    tracing::debug!(source = %flow.source, destination = %flow.destination, method = %policy_req.method, path = %policy_req.path, %rule, verdict = "allow", "http request");
                    let (mut parts, body) = req.into_parts();
                    // HTTP/2 requests carry the authority in the URI; HTTP/1.1 wants a Host.
                    if !parts.headers.contains_key(http::header::HOST)
                        && let Some(host) =
                            parts.uri.authority().and_then(|a| a.as_str().parse().ok())
                    {
                        parts.headers.insert(http::header::HOST, host);
                    }
                    parts.version = http::Version::HTTP_11;
                    // The workload gets the path the rules matched, not the spelling that came.
                    match policy_req.path.parse() {
                        Ok(uri) => parts.uri = uri,
                        Err(_) => return Ok(bad_request("the normalised path is not a URI")),
                    }
                    let upstream_req = http::Request::from_parts(parts, body);
                    let mut sender = sender.lock().await;
                    match sender.send_request(upstream_req).await {
                        Ok(resp) => Ok(resp.map(|b| b.boxed())),
                        Err(e) => Ok(bad_gateway(format!("workload: {e}\n"))),
                    }
                }
            }
        }
    });
    let mut server = hyper_util::server::conn::auto::Builder::new(drain.clone());
    // A client that half-closes after its request still gets the response.
    server.http1().half_close(true);
    if let Err(e) = server
        .serve_connection(TokioIo::new(downstream), service)
        .await
    {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}
