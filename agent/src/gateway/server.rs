//! Gateway listeners: TLS termination (certificates chosen by SNI), HTTP/1.1 and HTTP/2 (ALPN),
//! routing by the listener's HTTPRoutes, and forwarding into the mesh over HBONE with the
//! Gateway's own identity, so backends' ingress policy sees `entity: gateway`.
//!
//! The edge is hostile: TLS 1.2 and 1.3 with AEAD suites only (rustls has no renegotiation),
//! header-read, handshake and idle timeouts, limits on header size and count, HTTP/2 stream
//! concurrency and reset limits, and HTTP/1 requests with ambiguous framing (`Content-Length`
//! together with `Transfer-Encoding`, and the like) refused with 400 by `h1guard`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, LOCATION};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::h1guard::{H1Guard, HeadLimits};
use super::refusal::EdgeRefusal;
use crate::config::EdgeLimits;
use crate::proxy::ProxyContext;
use crate::proxy::forward::{self, strip_hop_by_hop};
use crate::proxy::upstream::Proto;
use crate::routing::model::{Listener, Protocol};
use crate::routing::routes::{
    Filter, RequestView, change_path, location, request_host, specificity,
};
use crate::state::snapshot::Snapshot;

type Body = BoxBody<Bytes, hyper::Error>;

impl EdgeLimits {
    fn head(&self) -> HeadLimits {
        HeadLimits {
            max_bytes: self.max_header_bytes,
            header_read: self.header_read,
            idle: self.idle,
        }
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let body = Full::new(Bytes::from(msg.into()))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// Serves one port until `stop`. The port's configuration is read from the snapshot for each
/// connection, so route and certificate changes apply to new connections without a restart.
pub async fn serve_port(
    listener: TcpListener,
    bound: Option<std::net::IpAddr>,
    port: u16,
    ctx: ProxyContext,
    limits: EdgeLimits,
    stop: CancellationToken,
) {
    loop {
        let Some((tcp, peer)) = crate::net::accept_next(&listener, &stop, "gateway").await else {
            return;
        };
        // Refusals before anything is known of the connection: logged and counted, closed.
        let refuse = |r: EdgeRefusal| {
            let _span = tracing::info_span!("gateway", %peer, port).entered();
            r.report(&ctx.metrics);
        };
        let Ok(slot) = ctx.limits.gateway_slots.clone().try_acquire_owned() else {
            refuse(EdgeRefusal::ConnectionLimit);
            continue;
        };
        // One client may not take the whole edge; proxies in front of it (trusted) may.
        let trusted = limits.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
        let share = if trusted {
            None
        } else {
            match ctx.limits.gateway_per_client.try_take(peer.ip()) {
                Some(s) => Some(s),
                None => {
                    refuse(EdgeRefusal::ClientShare {
                        cap: ctx.limits.gateway_per_client.cap(),
                    });
                    continue;
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let (ctx, limits, stop) = (ctx.clone(), limits.clone(), stop.clone());
        let span = tracing::info_span!("gateway", %peer, port);
        let drain = ctx.drain.clone();
        drain.spawn(
            "gateway connection",
            async move {
                let _slots = (slot, share);
                let snap = ctx.snapshot();
                let Some(cfg) = snap.gateway.port(bound, port) else {
                    return;
                };
                let protocol = cfg.protocol;
                let tls = match (protocol, &cfg.tls) {
                    (Protocol::Http, _) => None,
                    (Protocol::Https, Some(tls)) => Some(tls.clone()),
                    (Protocol::Https, None) => return,
                    (Protocol::Tcp | Protocol::TlsPassthrough, _) => {
                        drop(snap);
                        return super::l4::serve(tcp, peer, bound, port, ctx, limits).await;
                    }
                };
                drop(snap);
                let mut handler = Handler {
                    ctx,
                    max_body: limits.max_body_bytes,
                    bound,
                    port,
                    peer,
                    scheme: if tls.is_some() { "https" } else { "http" },
                    sni: None,
                    trusted_peer: trusted,
                };
                match tls {
                    None => {
                        let guarded = H1Guard::new(tcp, limits.head());
                        serve_http(TokioIo::new(guarded), handler, &limits, stop).await
                    }
                    Some(tls) => {
                        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
                        let accepted = tokio::time::timeout(limits.handshake, accept).await;
                        if let Ok(Ok(s)) = &accepted {
                            handler.sni = s.get_ref().1.server_name().map(str::to_ascii_lowercase);
                        }
                        match accepted {
                            // HTTP/2 frames carry their own lengths; only HTTP/1 needs the guard.
                            Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                serve_http(TokioIo::new(s), handler, &limits, stop).await
                            }
                            Ok(Ok(s)) => {
                                let guarded = H1Guard::new(s, limits.head());
                                serve_http(TokioIo::new(guarded), handler, &limits, stop).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "gateway TLS handshake failed")
                            }
                            Err(_) => tracing::debug!("gateway TLS handshake timed out"),
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    handler: Handler,
    limits: &EdgeLimits,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let drain = handler.ctx.drain.clone();
    let handler = Arc::new(handler);
    let activity = Arc::new(Activity::new());
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let busy = seen.begin();
        async move {
            // Busy until the response body has been sent (or dropped), not just produced.
            let response = handler.handle(req).await.map(|body| {
                Tracked {
                    inner: body,
                    _busy: busy,
                }
                .boxed()
            });
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(drain.clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(100))
        .keep_alive_interval(Some(limits.idle / 2))
        .keep_alive_timeout(limits.ping_timeout);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let why = loop {
        let age = activity.opened.elapsed();
        let idle_left = if activity.in_flight() > 0 {
            limits.idle
        } else {
            limits.idle.saturating_sub(activity.quiet_for())
        };
        let wake = idle_left
            .min(limits.max_age.saturating_sub(age))
            .max(Duration::from_millis(50));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "gateway connection ended");
                }
                return;
            }
            () = stop.cancelled() => break "the agent is stopping",
            () = tokio::time::sleep(wake) => {
                if activity.opened.elapsed() >= limits.max_age {
                    break "it reached its maximum age";
                }
                // Idle: no request in flight (read, answered or its body still being sent),
                // and none begun or ended for `idle`.
                if activity.in_flight() == 0 && activity.quiet_for() >= limits.idle {
                    break "it was idle";
                }
            }
        }
    };
    tracing::debug!("gateway connection closing: {why}");
    // GOAWAY (HTTP/2), or close once the response in flight is sent (HTTP/1). When the agent
    // stops, requests in flight have until the drain's force deadline; otherwise `drain`.
    conn.as_mut().graceful_shutdown();
    if drain.is_stopping() {
        let _ = conn.await;
    } else {
        let _ = tokio::time::timeout(limits.drain, conn).await;
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a connection is doing: requests in flight, and when one last began or ended.
struct Activity {
    opened: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds from `opened` to the last request's start or end.
    last: std::sync::atomic::AtomicU64,
}

/// One request in a handler, until dropped.
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            opened: std::time::Instant::now(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(std::sync::atomic::Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
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

struct Handler {
    ctx: ProxyContext,
    max_body: Option<u64>,
    /// The Gateway's own address the connection came in on (`None`: the node's).
    bound: Option<std::net::IpAddr>,
    port: u16,
    peer: SocketAddr,
    scheme: &'static str,
    /// The TLS connection's server name, lowercase.
    sni: Option<String>,
    /// The peer is a proxy the configuration trusts (`trustedProxies`).
    trusted_peer: bool,
}

impl Handler {
    /// Answers the request itself: logged, counted, and the refusal's status and line.
    fn refuse(&self, r: EdgeRefusal) -> Response<Body> {
        r.report(&self.ctx.metrics);
        text(r.status(), r.body())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let host = request_host(req.uri(), req.headers());
        let snap = self.ctx.snapshot();
        let Some(port) = snap.gateway.port(self.bound, self.port) else {
            return self.refuse(EdgeRefusal::ListenerRemoved);
        };
        let Some(listener) = pick_listener(&port.listeners, &host) else {
            return self.refuse(EdgeRefusal::NoListener { host });
        };
        // A connection is for the name its certificate was chosen by: a request for a host that
        // another certificate serves goes to a new connection (RFC 9110 section 15.5.20).
        if let Some(sni) = self.sni.as_deref().filter(|s| *s != host) {
            let for_sni = crate::routing::tls::certificate_for(&port.listeners, Some(sni));
            let for_host = crate::routing::tls::certificate_for(&port.listeners, Some(&host));
            if let (Some(a), Some(b)) = (for_sni, for_host)
                && !Arc::ptr_eq(&a, &b)
            {
                return self.refuse(EdgeRefusal::Misdirected {
                    host,
                    sni: sni.to_owned(),
                });
            }
        }
        // Routes match the normalised path, and the backend receives it.
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let normal = match signet_policy::path::normalize(target, Default::default()) {
            Ok(n) => n,
            Err(e) => {
                return self.refuse(EdgeRefusal::BadPath {
                    path: target.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        let (path, query) = match normal.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (normal.clone(), String::new()),
        };
        let view = RequestView {
            host: &host,
            method: req.method(),
            path: &path,
            query: &query,
            headers: req.headers(),
        };
        let Some(m) = listener.router.route(&view) else {
            return self.refuse(EdgeRefusal::NoRoute { host, path });
        };
        let route_name = format!("{}/{}", m.route.namespace, m.route.name);
        for f in &m.rule.filters {
            if let Filter::Redirect(r) = f {
                let loc = location(r, &view, self.scheme, self.port, &m.matched.path);
                let mut resp = text(r.status.unwrap_or(StatusCode::FOUND), "");
                if let Ok(v) = HeaderValue::from_str(&loc) {
                    resp.headers_mut().insert(LOCATION, v);
                }
                return resp;
            }
        }
        let (mut parts, body) = req.into_parts();
        let mut new_path = path.clone();
        let mut new_host = host.clone();
        let mut response_edits = vec![];
        for f in &m.rule.filters {
            match f {
                Filter::RequestHeaders(e) => e.apply(&mut parts.headers),
                Filter::ResponseHeaders(e) => response_edits.push(e.clone()),
                Filter::Rewrite(r) => {
                    if let Some(h) = &r.hostname {
                        new_host.clone_from(h);
                    }
                    if let Some(c) = &r.path {
                        new_path = change_path(&path, &m.matched.path, c);
                    }
                }
                Filter::Redirect(_) | Filter::Mirror(_) => {}
            }
        }
        let identity = listener.identity.clone();

        // What the backend sees: the rewritten host and path, who the client was.
        let pq = if query.is_empty() {
            new_path.clone()
        } else {
            format!("{new_path}?{query}")
        };
        parts.uri = pq.parse().unwrap_or_default();
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(h) = HeaderValue::from_str(&new_host) {
            parts.headers.insert(HOST, h);
        }
        forwarding_headers(
            &mut parts.headers,
            self.peer.ip(),
            self.trusted_peer,
            self.scheme,
            &host,
        );
        // A declared length over the limit is refused up front; a chunked body is cut off when
        // it crosses the limit (the backend sees an aborted request).
        let body = match self.max_body {
            Some(max) => {
                let declared = parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if declared.is_some_and(|n| n > max) {
                    return self.refuse(EdgeRefusal::BodyTooLarge { max });
                }
                http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .boxed_unsync()
            }
            None => body.map_err(std::io::Error::other).boxed_unsync(),
        };
        // The Gateway is no workload: no egress policy of its own to check.
        let admit = |_: &Snapshot, _: &signet_ca::SpiffeId, _: SocketAddr| Ok(());
        let exchange = forward::Exchange {
            snap: &snap,
            rule: m.rule,
            route: &route_name,
            source: &identity,
            proto: Proto::Http1,
            admit: &admit,
        };
        let (result, outcome) = forward::send(&self.ctx, exchange, parts, body).await;
        match result {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                for e in &response_edits {
                    e.apply(resp.headers_mut());
                }
                let backend = outcome.endpoint.map(|(a, _)| a);
                tracing::debug!(route = %route_name, backend = ?backend, status = %resp.status(), retries = outcome.retries, "gateway request");
                resp
            }
            Err(f) => {
                let after = f.retry_after();
                let mut resp =
                    self.refuse(EdgeRefusal::forwarding(f, route_name, identity.to_string()));
                if let Some(after) = after {
                    resp.headers_mut().insert(http::header::RETRY_AFTER, after);
                }
                resp
            }
        }
    }
}

/// `for=` of the Forwarded header: IPv6 addresses quoted and bracketed (RFC 7239).
fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// What the backend learns of the client. From a trusted proxy the chain it sent is kept and
/// this hop appended; from anyone else every forwarding header the client wrote is dropped, so
/// a client cannot pose as someone it is not (`X-Forwarded-For: 10.0.0.1` to an allowlist).
fn forwarding_headers(
    headers: &mut http::HeaderMap,
    peer: std::net::IpAddr,
    trusted: bool,
    scheme: &str,
    host: &str,
) {
    const SET_BY_US: [&str; 6] = [
        "x-forwarded-for",
        "forwarded",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
    ];
    let joined = |headers: &http::HeaderMap, name: &str| {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let (xff_before, forwarded_before) = if trusted {
        (
            joined(headers, "x-forwarded-for"),
            joined(headers, "forwarded"),
        )
    } else {
        (None, None)
    };
    for name in SET_BY_US {
        if !trusted || name == "x-forwarded-for" || name == "forwarded" {
            headers.remove(name);
        }
    }
    let client = peer.to_string();
    let xff = match xff_before {
        Some(prev) => format!("{prev}, {client}"),
        None => client,
    };
    let this_hop = format!("for={};proto={scheme};host={host}", forwarded_for(peer));
    let forwarded = match forwarded_before {
        Some(prev) => format!("{prev}, {this_hop}"),
        None => this_hop,
    };
    for (name, value) in [
        ("x-forwarded-for", xff.as_str()),
        ("forwarded", forwarded.as_str()),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    }
    if !headers.contains_key("x-forwarded-proto")
        && let Ok(v) = HeaderValue::from_str(scheme)
    {
        headers.insert("x-forwarded-proto", v);
    }
}

/// The listener for `host` on a shared port: the most specific hostname that covers it.
fn pick_listener<'a>(listeners: &'a [Listener], host: &str) -> Option<&'a Listener> {
    listeners
        .iter()
        .filter_map(|l| Some((specificity(l.hostname.as_deref(), host)?, l)))
        .max_by_key(|(score, _)| *score)
        .map(|(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::forwarding_headers;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn a_clients_forwarding_headers_are_replaced_a_trusted_proxys_appended_to() {
        let sent = [
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-proto", "http"),
        ];
        let peer = "192.0.2.7".parse().expect("ip");
        let mut h = headers(&sent);
        forwarding_headers(&mut h, peer, false, "https", "a.example.test");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=a.example.test"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("x-real-ip"));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);

        let mut h = headers(&sent);
        forwarding_headers(&mut h, peer, true, "https", "a.example.test");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.1, for=192.0.2.7;proto=https;host=a.example.test"
        );
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "the proxy in front saw the client's scheme"
        );
        assert_eq!(h["x-real-ip"], "10.0.0.1");
    }
}
