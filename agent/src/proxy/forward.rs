//! One routed request, from the rule that matched it to a response: the backend Service drawn
//! by weight, an endpoint of it chosen by the balancer, the egress check for that endpoint
//! (the caller's), attempts over pooled upstream connections with the rule's `backendRequest`
//! timeout each, retries (the rule's codes, connect failures and refused streams; never a body
//! already streamed; within the retry budget; to endpoints not yet tried), all within the
//! rule's `request` timeout. The Gateway and the routed mesh path both send through here.
//!
//! What Signet answers itself names its reason in the body (and for gRPC clients in
//! `grpc-status`/`grpc-message`), so a client sees why, not only that.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use signet_ca::SpiffeId;

use super::ProxyContext;
use super::balance::{Algorithm, Balancer, Change, Outlier};
use super::hbone::Route as HboneRoute;
use super::resilience::{RateLimiter, RetryBudget};
use super::upstream::{Body as UpstreamBody, Proto, SendError, Upstreams};
use crate::routing::routes::{Backend, Filter, Mirror, Rule};
use crate::state::snapshot::Snapshot;

/// A response body as answered downstream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Bodies up to this size are kept so a failed attempt can be sent again.
pub const MAX_REPLAY: u64 = 64 * 1024;

/// Node-wide state of routed requests.
#[derive(Debug, Default)]
pub struct Shared {
    pub upstreams: Upstreams,
    pub balancer: Balancer,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    limiters: Mutex<HashMap<String, Arc<RateLimiter>>>,
}

impl Shared {
    /// The retry budget of `service` (20 % of its requests plus 10 a second).
    fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(service.to_owned())
            .or_insert_with(|| Arc::new(RetryBudget::new(0.2, 10, Instant::now())))
            .clone()
    }

    /// The rate limiter of `service` with `limit`; made again when the limit changes.
    pub fn limiter(&self, service: &str, limit: super::resilience::Limit) -> Arc<RateLimiter> {
        let mut all = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        let entry = all
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(RateLimiter::new(limit)));
        if entry.limit() != limit {
            *entry = Arc::new(RateLimiter::new(limit));
        }
        entry.clone()
    }
}

/// How a Service's endpoints are used (its TrafficPolicy, or the defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServicePolicy {
    pub algorithm: Algorithm,
    pub outlier: Outlier,
    /// (limit, one bucket per source identity?)
    pub rate_limit: Option<(super::resilience::Limit, bool)>,
}

impl From<&signet_policy::traffic::Checked> for ServicePolicy {
    fn from(c: &signet_policy::traffic::Checked) -> Self {
        use signet_policy::traffic::{Algorithm as A, RateLimitKey};
        Self {
            algorithm: match c.algorithm {
                A::PeakEwma => Algorithm::PeakEwma,
                A::RoundRobin => Algorithm::RoundRobin,
            },
            outlier: Outlier {
                consecutive_failures: c.consecutive_failures,
                base_ejection: c.base_ejection,
                max_ejection: c.max_ejection,
                max_ejected_share: c.max_ejected_share,
            },
            rate_limit: c.rate_limit.map(|(rps, burst, key)| {
                (
                    super::resilience::Limit {
                        per_second: f64::from(rps),
                        burst,
                    },
                    key == RateLimitKey::Source,
                )
            }),
        }
    }
}

/// What the caller checks of each endpoint before an attempt goes to it (egress policy at
/// the source): `Err` answers the request with that status and reason.
pub type Admit<'a> = &'a (
        dyn Fn(&Snapshot, &SpiffeId, SocketAddr) -> Result<(), (StatusCode, String)> + Send + Sync
    );

/// One request to send.
#[allow(missing_debug_implementations)]
pub struct Exchange<'a> {
    pub snap: &'a Snapshot,
    pub rule: &'a Rule,
    /// `namespace/name` of the route, for lines and metrics.
    pub route: &'a str,
    /// Whom upstream connections present (the source workload, or the Gateway).
    pub source: &'a SpiffeId,
    pub proto: Proto,
    pub admit: Admit<'a>,
}

/// Why a request got no response from an endpoint: what Signet answers instead.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("route {route}: {why}")]
    NoValidBackend { route: String, why: String },
    #[error("Service {service} has no ready endpoint")]
    NoReadyEndpoint { service: String },
    #[error("endpoint {target} is no known pod")]
    UnknownEndpoint { target: SocketAddr },
    #[error("the node of endpoint {target} has no address")]
    EndpointNodeUnknown { target: SocketAddr },
    /// The caller's check of the endpoint refused it (egress policy).
    #[error("{why}")]
    Denied { status: StatusCode, why: String },
    #[error("{0}")]
    BadBody(String),
    /// The endpoint's node refused the tunnel (its ingress policy).
    #[error("{target} refused the request: {why}")]
    Refused { target: SocketAddr, why: String },
    #[error("{why}")]
    Timeout { why: String },
    /// The Service's rate limit: come back after `retry_after`.
    #[error(
        "rate limit of Service {service} reached ({per_second}/s, burst {burst}); retry in {retry_after:?}"
    )]
    RateLimited {
        service: String,
        per_second: f64,
        burst: u32,
        retry_after: Duration,
    },
    #[error("{why}")]
    Backend {
        target: SocketAddr,
        status: StatusCode,
        why: String,
    },
}

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::NoValidBackend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Failure::NoReadyEndpoint { .. }
            | Failure::UnknownEndpoint { .. }
            | Failure::EndpointNodeUnknown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Denied { status, .. } | Failure::Backend { status, .. } => *status,
            Failure::BadBody(_) => StatusCode::BAD_REQUEST,
            Failure::Refused { .. } => StatusCode::FORBIDDEN,
            Failure::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Failure::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `Retry-After` a refusal carries (whole seconds, rounded up).
    pub fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            Failure::RateLimited { retry_after, .. } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                Some(HeaderValue::from(secs.max(1)))
            }
            _ => None,
        }
    }
}

/// What happened to a request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `namespace/name` of the backend Service the rule drew.
    pub backend: String,
    /// The endpoint of the last attempt, and its identity.
    pub endpoint: Option<(SocketAddr, SpiffeId)>,
    pub attempts: u32,
    pub retries: u32,
    pub timed_out: bool,
    pub ejections: u32,
    pub rate_limited: bool,
}

/// A response Signet makes itself, with the reason in the body; for gRPC, as a trailers-only
/// response with the matching status code.
pub fn local_reply(status: StatusCode, reason: &str, grpc: bool) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if grpc {
        // gRPC: UNAVAILABLE 14, DEADLINE_EXCEEDED 4, PERMISSION_DENIED 7, RESOURCE_EXHAUSTED
        // 8, UNIMPLEMENTED 12, INTERNAL 13.
        let code = match status {
            StatusCode::GATEWAY_TIMEOUT => 4,
            StatusCode::FORBIDDEN => 7,
            StatusCode::TOO_MANY_REQUESTS => 8,
            StatusCode::NOT_FOUND => 12,
            StatusCode::INTERNAL_SERVER_ERROR => 13,
            _ => 14,
        };
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(code));
        let msg: String = reason
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .collect();
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
    }
    resp
}

/// A request body kept for replay, or streamed once.
enum Payload {
    Kept(Bytes),
    Streamed(Option<UpstreamBody>),
}

impl Payload {
    fn replayable(&self) -> bool {
        matches!(self, Payload::Kept(_))
    }

    /// The body for the next attempt; `None` once a streamed body has gone.
    fn next(&mut self) -> Option<UpstreamBody> {
        match self {
            Payload::Kept(b) => Some(
                Full::new(b.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Payload::Streamed(b) => b.take(),
        }
    }

    /// A body handed back by an attempt that never sent it.
    fn put_back(&mut self, body: UpstreamBody) {
        if let Payload::Streamed(slot) = self {
            *slot = Some(body);
        }
    }
}

/// A number in [0, 1) for draws that need spread, not secrecy: a per-thread xorshift seeded
/// from the process's random hasher keys and the time.
pub fn draw() -> f64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher as _, Hasher as _};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            );
            h.finish() | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Applies the request side of `filters` (header modifiers) to `headers`.
pub fn request_headers(filters: &[Filter], headers: &mut http::HeaderMap) {
    for f in filters {
        if let Filter::RequestHeaders(e) = f {
            e.apply(headers);
        }
    }
}

/// Applies the response side of `filters` to `headers`.
pub fn response_headers(filters: &[Filter], headers: &mut http::HeaderMap) {
    for f in filters {
        if let Filter::ResponseHeaders(e) = f {
            e.apply(headers);
        }
    }
}

/// Sends `parts` and `body` as `ex` says; the rule's own filters were applied by the caller,
/// the backend's are applied here.
pub async fn send(
    ctx: &ProxyContext,
    ex: Exchange<'_>,
    mut parts: http::request::Parts,
    body: UpstreamBody,
) -> (Result<Response<Body>, Failure>, Outcome) {
    let started = Instant::now();
    let mut out = Outcome::default();
    let backend: &Backend = match ex.rule.pick_backend(draw()) {
        Ok(b) => b,
        Err(why) => {
            let route = ex.route.to_owned();
            return (Err(Failure::NoValidBackend { route, why }), out);
        }
    };
    request_headers(&backend.filters, &mut parts.headers);
    let service = format!("{}/{}", backend.namespace, backend.name);
    out.backend.clone_from(&service);
    let endpoints: &[SocketAddr] = ex
        .snap
        .services
        .named(&backend.namespace, &backend.name, backend.port)
        .map_or(&[], |b| b.endpoints.as_slice());
    if endpoints.is_empty() {
        return (Err(Failure::NoReadyEndpoint { service }), out);
    }
    let policy: ServicePolicy = ex
        .snap
        .gateway
        .traffic
        .get(&backend.namespace, &backend.name)
        .map(|c| ServicePolicy::from(&**c))
        .unwrap_or_default();
    if let Some((limit, per_source)) = policy.rate_limit {
        let key = if per_source { ex.source.as_str() } else { "*" };
        if let Err(retry_after) = ctx.l7.limiter(&service, limit).take(key, started) {
            out.rate_limited = true;
            let f = Failure::RateLimited {
                service,
                per_second: limit.per_second,
                burst: limit.burst,
                retry_after,
            };
            return (Err(f), out);
        }
    }
    let deadline = ex.rule.timeouts.request.map(|d| started + d);
    let retry = ex.rule.retry.as_ref();
    let mirrors: Vec<&Mirror> = ex
        .rule
        .filters
        .iter()
        .filter_map(|f| match f {
            Filter::Mirror(m) if m.backend.invalid.is_none() && draw() < m.fraction => Some(m),
            _ => None,
        })
        .collect();
    let keep = retry.is_some() || !mirrors.is_empty();
    let mut payload = match keep_for_replay(keep, &parts, body, deadline).await {
        Ok(p) => p,
        Err(why) => return (Err(Failure::BadBody(why)), out),
    };
    for m in mirrors {
        match &payload {
            Payload::Kept(body) => mirror(ctx, &ex, m, &parts, body.clone()),
            Payload::Streamed(_) => tracing::debug!(
                route = ex.route,
                "request not mirrored: its body is streamed, not kept"
            ),
        }
    }
    let budget = ctx.l7.budget(&service);
    budget.deposit(started);
    let mut tried: Vec<SocketAddr> = vec![];
    loop {
        out.attempts += 1;
        let Some(target) = ctx.l7.balancer.pick(
            &service,
            endpoints,
            &tried,
            policy.algorithm,
            Instant::now(),
            &mut draw,
        ) else {
            return (Err(Failure::NoReadyEndpoint { service }), out);
        };
        tried.push(target);
        // An address two pods claim belongs to neither: no request goes there.
        let pod = ex
            .snap
            .pod_by_ip(target.ip())
            .filter(|_| !ex.snap.refused_ips.contains_key(&target.ip()));
        let Some(pod) = pod else {
            return (Err(Failure::UnknownEndpoint { target }), out);
        };
        out.endpoint = Some((target, pod.identity.clone()));
        if let Err((status, why)) = (ex.admit)(ex.snap, &pod.identity, target) {
            return (Err(Failure::Denied { status, why }), out);
        }
        let Some(node_ip) = pod.node.as_ref().and_then(|n| ex.snap.nodes.get(n)) else {
            return (Err(Failure::EndpointNodeUnknown { target }), out);
        };
        let route = HboneRoute {
            source: ex.source.clone(),
            destination: pod.identity.clone(),
            node: SocketAddr::new(*node_ip, ctx.inbound_port),
        };
        let Some(body) = payload.next() else {
            let why = "the request body was already sent to an endpoint that failed".to_owned();
            let status = StatusCode::BAD_GATEWAY;
            return (
                Err(Failure::Backend {
                    target,
                    status,
                    why,
                }),
                out,
            );
        };
        let mut req = Request::from_parts(parts.clone(), body);
        *req.extensions_mut() = http::Extensions::new();
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (ex.rule.timeouts.backend_request, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let in_flight = ctx.l7.balancer.start(target);
        let attempt_start = Instant::now();
        let sent = ctx.l7.upstreams.send(ctx, &route, target, ex.proto, req);
        let result = match limit {
            Some(l) => tokio::time::timeout(l, sent).await.ok(),
            None => Some(sent.await),
        };
        drop(in_flight);
        let latency = attempt_start.elapsed();
        // (endpoint healthy?, retriable?, what to answer if not retried)
        let (healthy, retriable, answer): (bool, bool, Result<Response<Body>, Failure>) =
            match result {
                None => {
                    let why = format!(
                        "{target} of {service} did not answer within {:?}",
                        limit.unwrap_or_default()
                    );
                    (false, payload.replayable(), Err(Failure::Timeout { why }))
                }
                Some(Ok(resp)) => {
                    let status = resp.status();
                    let retriable = retry.is_some_and(|r| r.codes.contains(&status));
                    (
                        !status.is_server_error(),
                        retriable && payload.replayable(),
                        Ok(resp.map(|b| b.boxed())),
                    )
                }
                Some(Err(SendError::Unsent {
                    why,
                    request,
                    connect,
                })) => {
                    if let Some(r) = request {
                        payload.put_back(r.into_body());
                    }
                    let status = StatusCode::SERVICE_UNAVAILABLE;
                    (
                        !connect,
                        true,
                        Err(Failure::Backend {
                            target,
                            status,
                            why,
                        }),
                    )
                }
                Some(Err(SendError::Refused(why))) => {
                    (true, false, Err(Failure::Refused { target, why }))
                }
                Some(Err(SendError::Failed(why))) => {
                    let status = StatusCode::BAD_GATEWAY;
                    (
                        false,
                        payload.replayable(),
                        Err(Failure::Backend {
                            target,
                            status,
                            why,
                        }),
                    )
                }
            };
        let measured = answer.as_ref().is_ok_and(|r| {
            r.extensions()
                .get::<super::upstream::FreshConnection>()
                .is_none()
        });
        let change = ctx.l7.balancer.record(
            target,
            endpoints,
            healthy,
            measured.then_some(latency),
            &policy.outlier,
            Instant::now(),
            draw(),
        );
        if let Some(Change::Ejected(d)) = change {
            out.ejections += 1;
            tracing::info!(endpoint = %target, service = %service, backoff = ?d, "endpoint ejected after consecutive failures");
        }
        let again = retriable
            && retry.is_some_and(|r| out.retries < r.attempts)
            && deadline.is_none_or(|d| Instant::now() < d);
        if again && budget.withdraw(Instant::now()) {
            out.retries += 1;
            let backoff = retry.map_or(Duration::ZERO, |r| r.backoff);
            let wait = match deadline {
                Some(d) => backoff.min(d.saturating_duration_since(Instant::now())),
                None => backoff,
            };
            tokio::time::sleep(wait).await;
            if deadline.is_none_or(|d| Instant::now() < d) {
                continue;
            }
        }
        return match answer {
            Ok(mut resp) => {
                response_headers(&backend.filters, resp.headers_mut());
                (Ok(resp), out)
            }
            // Whatever went wrong, past the request timeout the answer is that timeout.
            Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                out.timed_out = true;
                let why = format!(
                    "route {} timed out after {:?} ({} attempts)",
                    ex.route,
                    ex.rule.timeouts.request.unwrap_or_default(),
                    out.attempts
                );
                (Err(Failure::Timeout { why }), out)
            }
            Err(f) => {
                // Counted as a timeout only when that is the answer, not when a retry saved it.
                out.timed_out = matches!(f, Failure::Timeout { .. });
                (Err(f), out)
            }
        };
    }
}

/// Sends a copy of the request to an endpoint of the mirror's backend, in its own task; its
/// answer is read and dropped. The egress check holds for the copy as for the request.
fn mirror(
    ctx: &ProxyContext,
    ex: &Exchange<'_>,
    m: &Mirror,
    parts: &http::request::Parts,
    body: Bytes,
) {
    let b = &m.backend;
    let service = format!("{}/{}", b.namespace, b.name);
    let endpoints: Vec<SocketAddr> = ex
        .snap
        .services
        .named(&b.namespace, &b.name, b.port)
        .map(|b| b.endpoints.clone())
        .unwrap_or_default();
    let now = Instant::now();
    let Some(target) = ctx.l7.balancer.pick(
        &service,
        &endpoints,
        &[],
        Algorithm::RoundRobin,
        now,
        &mut draw,
    ) else {
        tracing::debug!(%service, "request not mirrored: no ready endpoint");
        return;
    };
    let Some(pod) = ex.snap.pod_by_ip(target.ip()) else {
        return;
    };
    if let Err((_, why)) = (ex.admit)(ex.snap, &pod.identity, target) {
        tracing::info!(%service, endpoint = %target, %why, "request not mirrored");
        return;
    }
    let Some(node_ip) = pod.node.as_ref().and_then(|n| ex.snap.nodes.get(n)) else {
        return;
    };
    let route = HboneRoute {
        source: ex.source.clone(),
        destination: pod.identity.clone(),
        node: SocketAddr::new(*node_ip, ctx.inbound_port),
    };
    let mut req = Request::from_parts(
        parts.clone(),
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *req.extensions_mut() = http::Extensions::new();
    let (ctx2, proto, limit) = (ctx.clone(), ex.proto, ex.rule.timeouts.request);
    ctx.drain.spawn("mirrored request", async move {
        let sent = ctx2.l7.upstreams.send(&ctx2, &route, target, proto, req);
        let limit = limit.unwrap_or(Duration::from_secs(30));
        if let Ok(Ok(resp)) = tokio::time::timeout(limit, sent).await {
            let _ = tokio::time::timeout(limit, resp.into_body().collect()).await;
        }
    });
}

/// Reads the body now when it may need sending again (a retry policy, and a body small
/// enough); otherwise leaves it to be streamed once.
async fn keep_for_replay(
    retry: bool,
    parts: &http::request::Parts,
    body: UpstreamBody,
    deadline: Option<Instant>,
) -> Result<Payload, String> {
    use hyper::body::Body as _;
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let small = body.is_end_stream() || declared.is_some_and(|n| n <= MAX_REPLAY);
    if !retry || !small {
        return Ok(Payload::Streamed(Some(body)));
    }
    let collect = http_body_util::Limited::new(body, MAX_REPLAY as usize).collect();
    let collected = match deadline {
        Some(d) => tokio::time::timeout(d.saturating_duration_since(Instant::now()), collect)
            .await
            .map_err(|_| "the request body did not arrive within the request timeout".to_owned())?,
        None => collect.await,
    };
    collected
        .map(|c| Payload::Kept(c.to_bytes()))
        .map_err(|e| format!("reading the request body: {e}"))
}

/// Removes the headers that describe one hop's connection (RFC 9110 §7.6.1), including those the
/// `Connection` header names: a backend's `Connection: close` must not close the client's
/// connection, nor a client's `Upgrade` reach the backend.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    static KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");
    if headers.contains_key(CONNECTION) {
        let named: Vec<http::HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(CONNECTION);
    }
    for n in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ] {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_fall_in_the_unit_interval_and_spread_over_it() {
        let mut tenths = [0u32; 10];
        for _ in 0..10_000 {
            let d = draw();
            assert!((0.0..1.0).contains(&d), "{d}");
            tenths[(d * 10.0) as usize] += 1;
        }
        // 1,000 expected in each tenth; a generator stuck in a corner fails this.
        assert!(
            tenths.iter().all(|&n| (800..1200).contains(&n)),
            "{tenths:?}"
        );
    }

    #[test]
    fn hop_by_hop_headers_go_and_so_do_those_connection_names() {
        let mut h = http::HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-hop"),
            ("connection", "X-Other"),
            ("x-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "grpc-status"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "kept"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
        // Without a Connection header, the fixed list still goes.
        let mut h = http::HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("host", HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["host"]);
    }
}
