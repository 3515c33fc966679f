//! The routed mesh path: a workload's captured connection to a Service that HTTPRoutes or
//! GRPCRoutes govern (GAMMA, `routing::mesh`) is served as HTTP here, on the source's node,
//! with no extra hop: HTTP/1.1 or HTTP/2 (h2c, gRPC) as the client speaks it, each request
//! matched by the route engine the Gateway uses, its filters applied, and sent through
//! `forward` to an endpoint of the backend the rule draws, over HBONE with the source
//! workload's SVID. The destination's ingress policy and `http` rules still apply there.
//!
//! Egress policy is checked per request against the endpoint chosen: a denied endpoint, or a
//! request no egress `http` rule allows, is answered 403 at the source, with the rule named.
//! WebSocket and other `Upgrade`s pass through once the route has decided, as byte streams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use signet_ca::SpiffeId;
use tokio::net::TcpStream;

use super::ProxyContext;
use super::forward::{self, Body, Exchange, local_reply};
use super::upstream::Proto;
use crate::flow::Reporter;
use crate::policy::decide::{Verdict, decide};
use crate::routing::routes::{Filter, RequestView, change_path, location, request_host};
use crate::state::snapshot::Snapshot;

/// Where a served connection's requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Service routes govern: each request is routed (`asked` is its ClusterIP:port).
    Routed { asked: SocketAddr },
    /// One endpoint, chosen when the connection was accepted, whose egress policy has `http`
    /// rules: each request is checked against them, then sent there.
    Inspected {
        endpoint: SocketAddr,
        identity: SpiffeId,
    },
}

/// The connection's fixed facts.
struct Conn {
    ctx: ProxyContext,
    client: SocketAddr,
    target: Target,
    source: SpiffeId,
    source_namespace: String,
}

/// Serves HTTP on a captured connection until it ends.
pub async fn serve(
    sock: TcpStream,
    ctx: ProxyContext,
    client: SocketAddr,
    target: Target,
    source: SpiffeId,
    source_namespace: String,
) {
    let drain = ctx.drain.clone();
    let idle = ctx.limits.idle;
    let conn = Arc::new(Conn {
        ctx,
        client,
        target,
        source,
        source_namespace,
    });
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (conn, seen) = (conn.clone(), seen.clone());
        async move {
            let _busy = seen.begin();
            Ok::<_, Infallible>(conn.handle(req).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(drain.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .half_close(true)
        .header_read_timeout(std::time::Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(100));
    let served = builder.serve_connection_with_upgrades(TokioIo::new(sock), service);
    tokio::pin!(served);
    let stop = drain.stop_token();
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "routed mesh connection ended");
                }
                return;
            }
            () = stop.cancelled() => break,
            // A connection with no request for the idle timeout is closed, as a byte stream's is.
            () = tokio::time::sleep(idle / 4) => {
                if activity.idle_for() >= idle {
                    tracing::debug!(?idle, "routed mesh connection idle: closing it");
                    break;
                }
            }
        }
    }
    served.as_mut().graceful_shutdown();
    let _ = served.await;
}

/// Requests in flight on a connection, and when one last began or ended.
#[derive(Debug, Default)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<Option<Instant>>,
}

/// One request, counted until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Zero while a request is in flight; else how long since the last one began or ended (or
    /// since the first check, before any request).
    fn idle_for(&self) -> std::time::Duration {
        if self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return std::time::Duration::ZERO;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get_or_insert_with(Instant::now).elapsed()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let snap = self.ctx.snapshot();
        let (resp, info) = match &self.target {
            Target::Routed { asked } => self.route(&snap, *asked, req, grpc).await,
            Target::Inspected { endpoint, identity } => {
                self.inspect(&snap, *endpoint, identity, req, grpc).await
            }
        };
        let status = resp.status();
        let grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.account(&snap, &method, &target, status, grpc_status, &info, started);
        resp
    }

    /// Routes and sends one request; the response and what to account for it.
    async fn route(
        &self,
        snap: &Arc<Snapshot>,
        asked: SocketAddr,
        req: Request<Incoming>,
        grpc: bool,
    ) -> (Response<Body>, Info) {
        let mut info = Info::default();
        let refuse = |info: &mut Info, status, why: String| {
            info.refusal = Some(why.clone());
            local_reply(status, &why, grpc)
        };
        let Some(service) = snap
            .services
            .backend(asked)
            .and_then(|b| b.service.split_once('/'))
            .and_then(|(ns, name)| snap.gateway.mesh.get(ns, name, asked.port()))
            .cloned()
        else {
            let why = format!("{} is no longer a routed Service", asked);
            return (
                refuse(&mut info, StatusCode::SERVICE_UNAVAILABLE, why),
                info,
            );
        };
        info.service = format!("{}/{}", service.namespace, service.name);
        let Some(router) = service.router_for(&self.source_namespace) else {
            let why = format!("no route of Service {} applies", info.service);
            return (refuse(&mut info, StatusCode::NOT_FOUND, why), info);
        };
        let (path, query) = match normalized(&req) {
            Ok(pq) => pq,
            Err(why) => return (refuse(&mut info, StatusCode::BAD_REQUEST, why), info),
        };
        let host = request_host(req.uri(), req.headers());
        let view = RequestView {
            host: &host,
            method: req.method(),
            path: &path,
            query: &query,
            headers: req.headers(),
        };
        let Some(m) = router.route(&view) else {
            let why = format!("no route of Service {} matches {path}", info.service);
            return (refuse(&mut info, StatusCode::NOT_FOUND, why), info);
        };
        info.route = format!("{}/{}", m.route.namespace, m.route.name);
        for f in &m.rule.filters {
            if let Filter::Redirect(r) = f {
                let loc = location(r, &view, "http", asked.port(), &m.matched.path);
                let mut resp = local_reply(r.status.unwrap_or(StatusCode::FOUND), "", false);
                if let Ok(v) = HeaderValue::from_str(&loc) {
                    resp.headers_mut().insert(LOCATION, v);
                }
                return (resp, info);
            }
        }
        let policy_request = policy_request(&req, &path);
        let (mut parts, body) = req.into_parts();
        let mut new_path = path.clone();
        let mut new_host = host.clone();
        for f in &m.rule.filters {
            match f {
                Filter::RequestHeaders(e) => e.apply(&mut parts.headers),
                Filter::Rewrite(r) => {
                    if let Some(h) = &r.hostname {
                        new_host.clone_from(h);
                    }
                    if let Some(c) = &r.path {
                        new_path = change_path(&path, &m.matched.path, c);
                    }
                }
                Filter::ResponseHeaders(_) | Filter::Redirect(_) | Filter::Mirror(_) => {}
            }
        }
        let pq = with_query(&new_path, &query);
        let (proto, client_upgrade) = match prepare(&mut parts, &pq, &new_host) {
            Ok(x) => x,
            Err(why) => {
                return (
                    refuse(&mut info, StatusCode::INTERNAL_SERVER_ERROR, why),
                    info,
                );
            }
        };
        let admit = |snap: &Snapshot, destination: &SpiffeId, target: SocketAddr| {
            self.admit(snap, destination, target, &policy_request)
        };
        let exchange = Exchange {
            snap,
            rule: m.rule,
            route: &info.route,
            source: &self.source,
            proto,
            admit: &admit,
        };
        let body = body.map_err(std::io::Error::other).boxed_unsync();
        let (result, outcome) = forward::send(&self.ctx, exchange, parts, body).await;
        info.endpoint = outcome.endpoint.clone();
        let mut resp = match result {
            Ok(r) => r,
            Err(f) => {
                info.outcome = Some(outcome);
                let mut resp = refuse(&mut info, f.status(), f.to_string());
                if let Some(after) = f.retry_after() {
                    resp.headers_mut().insert(http::header::RETRY_AFTER, after);
                }
                return (resp, info);
            }
        };
        forward::response_headers(&m.rule.filters, resp.headers_mut());
        self.splice(&mut resp, client_upgrade);
        info.outcome = Some(outcome);
        (resp, info)
    }

    /// One request of an inspected connection: the egress `http` rules decide it, then it goes
    /// to the endpoint chosen when the connection was accepted.
    async fn inspect(
        &self,
        snap: &Arc<Snapshot>,
        endpoint: SocketAddr,
        identity: &SpiffeId,
        req: Request<Incoming>,
        grpc: bool,
    ) -> (Response<Body>, Info) {
        let mut info = Info {
            endpoint: Some((endpoint, identity.clone())),
            ..Info::default()
        };
        let refuse = |info: &mut Info, status, why: String| {
            info.refusal = Some(why.clone());
            local_reply(status, &why, grpc)
        };
        let (path, query) = match normalized(&req) {
            Ok(pq) => pq,
            Err(why) => return (refuse(&mut info, StatusCode::BAD_REQUEST, why), info),
        };
        if let Err((status, why)) =
            self.admit(snap, identity, endpoint, &policy_request(&req, &path))
        {
            return (refuse(&mut info, status, why), info);
        }
        let host = request_host(req.uri(), req.headers());
        let (mut parts, body) = req.into_parts();
        let (proto, client_upgrade) = match prepare(&mut parts, &with_query(&path, &query), &host) {
            Ok(x) => x,
            Err(why) => return (refuse(&mut info, StatusCode::BAD_REQUEST, why), info),
        };
        let node = snap
            .pod_by_ip(endpoint.ip())
            .and_then(|p| p.node.as_ref())
            .and_then(|n| snap.nodes.get(n));
        let Some(node) = node else {
            let why = format!("the node of endpoint {endpoint} has no address");
            return (
                refuse(&mut info, StatusCode::SERVICE_UNAVAILABLE, why),
                info,
            );
        };
        let route = super::hbone::Route {
            source: self.source.clone(),
            destination: identity.clone(),
            node: SocketAddr::new(*node, self.ctx.inbound_port),
        };
        let body = body.map_err(std::io::Error::other).boxed_unsync();
        let req = Request::from_parts(parts, body);
        match self
            .ctx
            .l7
            .upstreams
            .send(&self.ctx, &route, endpoint, proto, req)
            .await
        {
            Ok(resp) => {
                let mut resp = resp.map(|b| b.boxed());
                self.splice(&mut resp, client_upgrade);
                (resp, info)
            }
            Err(super::upstream::SendError::Refused(why)) => {
                (refuse(&mut info, StatusCode::FORBIDDEN, why), info)
            }
            Err(e) => (
                refuse(&mut info, StatusCode::BAD_GATEWAY, e.to_string()),
                info,
            ),
        }
    }

    /// Joins both sides of a switched (`101`) connection once the endpoint has said yes.
    fn splice(&self, resp: &mut Response<Body>, client_side: Option<hyper::upgrade::OnUpgrade>) {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let Some(client_side) = client_side else {
            return;
        };
        let server_side = hyper::upgrade::on(resp);
        self.ctx.drain.spawn("upgraded connection", async move {
            if let (Ok(a), Ok(b)) = (client_side.await, server_side.await) {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            }
        });
    }

    /// The address the workload connected to (for flow records without an endpoint).
    fn asked(&self) -> SocketAddr {
        match &self.target {
            Target::Routed { asked } => *asked,
            Target::Inspected { endpoint, .. } => *endpoint,
        }
    }

    /// The egress check for one endpoint: its identity's verdict for this workload, and the
    /// request against the egress `http` rules that verdict carries.
    fn admit(
        &self,
        snap: &Snapshot,
        destination: &SpiffeId,
        target: SocketAddr,
        request: &signet_policy::model::Request,
    ) -> Result<(), (StatusCode, String)> {
        let decision = decide(
            snap,
            Reporter::Outbound,
            self.client.ip(),
            destination,
            target.port(),
        );
        match &decision.verdict {
            Verdict::Deny | Verdict::Gone => Err((
                StatusCode::FORBIDDEN,
                format!(
                    "egress policy denies {destination} on port {}: {}",
                    target.port(),
                    decision.rule
                ),
            )),
            Verdict::L7(rules) => {
                let check = crate::policy::request::check_for(rules.clone());
                check(request).map(|_| ()).map_err(|d| {
                    (
                        StatusCode::FORBIDDEN,
                        format!("egress policy: {}", d.reason),
                    )
                })
            }
            Verdict::Allow | Verdict::Audit => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn account(
        &self,
        snap: &Snapshot,
        method: &http::Method,
        target: &str,
        status: StatusCode,
        grpc_status: Option<String>,
        info: &Info,
        started: Instant,
    ) {
        let destination_id = info.endpoint.as_ref().map(|(_, id)| id);
        let destination = destination_id.map_or(crate::admin::metrics::UNKNOWN, |id| id.as_str());
        let outcome = info.outcome.as_ref();
        self.ctx
            .metrics
            .l7_request(crate::admin::metrics::L7Request {
                source: self.source.as_str(),
                destination,
                service: &info.service,
                route: &info.route,
                backend: outcome.map_or("", |o| o.backend.as_str()),
                method: method.as_str(),
                status: status.as_u16(),
                duration: started.elapsed(),
                retries: outcome.map_or(0, |o| o.retries),
                timed_out: outcome.is_some_and(|o| o.timed_out),
                ejections: outcome.map_or(0, |o| o.ejections),
                rate_limited: outcome.is_some_and(|o| o.rate_limited),
            });
        let flows = self.ctx.metrics.flows();
        if !flows.enabled() && info.refusal.is_none() {
            return;
        }
        let path = target.split('?').next().unwrap_or(target);
        if let Some(why) = &info.refusal {
            tracing::info!(source = %self.source, destination = %destination, service = %info.service, route = %info.route, method = %method, path, status = status.as_u16(), reason = %why, "routed request answered by the proxy");
        }
        if !flows.enabled() {
            return;
        }
        let endpoint = info.endpoint.as_ref().map(|(a, _)| *a);
        flows.push(crate::flow::FlowEntry {
            reporter: Reporter::Outbound.as_str().into(),
            source: super::peer_of(snap, &self.source, Some(self.client)),
            destination: match destination_id {
                Some(id) => super::peer_of(snap, id, endpoint),
                None => super::peer(snap, destination, Some(self.asked())),
            },
            protocol: "tcp".into(),
            verdict: if status == StatusCode::FORBIDDEN && info.refusal.is_some() {
                "l7-denied"
            } else {
                "forwarded"
            }
            .into(),
            reason: info
                .refusal
                .clone()
                .or_else(|| grpc_status.map(|g| format!("grpc-status {g}"))),
            rule: (!info.route.is_empty()).then(|| format!("route {}", info.route)),
            http: Some(crate::flow::HttpInfo {
                method: crate::flow::Text::method(method.as_str()),
                path: path.to_owned(),
                status: status.as_u16(),
            }),
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        });
    }
}

/// What one request's handling found, for metrics and the flow log.
#[derive(Default)]
struct Info {
    service: String,
    route: String,
    endpoint: Option<(SocketAddr, SpiffeId)>,
    refusal: Option<String>,
    outcome: Option<forward::Outcome>,
}

/// The request's path normalised as policy and routes read it, and its query; the reason when
/// servers would read it differently (400).
fn normalized<B>(req: &Request<B>) -> Result<(String, String), String> {
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let normal = signet_policy::path::normalize(raw, Default::default())
        .map_err(|e| format!("request path `{raw}`: {e}"))?;
    Ok(match normal.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (normal.clone(), String::new()),
    })
}

fn with_query(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// The request as egress `http` rules see it: every header value, opaque ones lossily (one the
/// rules cannot read must not slip past a header rule while the endpoint still gets it).
fn policy_request<B>(req: &Request<B>, path: &str) -> signet_policy::model::Request {
    signet_policy::model::Request {
        method: req.method().as_str().to_owned(),
        path: path.to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// Makes `parts` what the endpoint gets: `path_and_query` (what policy and routes matched),
/// `host`, no hop-by-hop headers (an upgrade keeps its own). Returns the protocol to speak to
/// the endpoint and, for an upgrade, the client side's half of it.
fn prepare(
    parts: &mut http::request::Parts,
    path_and_query: &str,
    host: &str,
) -> Result<(Proto, Option<hyper::upgrade::OnUpgrade>), String> {
    let proto = if parts.version == http::Version::HTTP_2 {
        Proto::Http2
    } else {
        Proto::Http1
    };
    let upgrade = proto == Proto::Http1 && parts.headers.contains_key(http::header::UPGRADE);
    parts.uri = path_and_query
        .parse()
        .map_err(|_| format!("the path `{path_and_query}` is not a URI"))?;
    if proto == Proto::Http1 {
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if let Ok(h) = HeaderValue::from_str(host) {
            parts.headers.insert(HOST, h);
        }
    } else if let Ok(authority) = host.parse::<http::uri::Authority>() {
        // HTTP/2 carries the host as `:authority`.
        let mut u = parts.uri.clone().into_parts();
        u.scheme = Some(http::uri::Scheme::HTTP);
        u.authority = Some(authority);
        if let Ok(uri) = http::Uri::from_parts(u) {
            parts.uri = uri;
        }
        parts.headers.remove(HOST);
    }
    let client_upgrade = upgrade
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    Ok((proto, client_upgrade))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1); an upgrade keeps `Connection: upgrade` and
/// `Upgrade`, which the endpoint needs to switch.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    let kept_upgrade = upgrade
        .then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten();
    forward::strip_hop_by_hop(headers);
    if let Some(u) = kept_upgrade {
        headers.insert(http::header::UPGRADE, u);
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
}
