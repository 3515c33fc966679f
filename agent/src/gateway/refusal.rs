//! Why the Gateway answered a connection or a request itself instead of a backend, in one type:
//! each refusal gives its metric label, the HTTP status and body the client gets, and the log
//! line, which says what to look at. The mesh's own refusals are `proxy::refusal::Refusal`.

use std::net::SocketAddr;

use http::StatusCode;

use crate::admin::metrics::{Metrics, UNKNOWN};
use crate::flow::Reporter;

/// A connection or request the Gateway did not carry to a backend.
#[derive(Debug)]
pub enum EdgeRefusal {
    /// The Gateway's connection cap (`gateway.maxConnections`) is reached.
    ConnectionLimit,
    /// This client holds its share (`gateway.maxConnectionsPerClient`) of the connections.
    ClientShare { cap: usize },
    /// The port stopped being served while the connection was open.
    ListenerRemoved,
    /// No listener of the port matches the Host.
    NoListener { host: String },
    /// The Host is served with another certificate than the one this connection was opened
    /// for (RFC 9110 §15.5.20).
    Misdirected { host: String, sni: String },
    /// The path is one servers would read differently (encoded separators, dot segments
    /// above the root, ...).
    BadPath { path: String, reason: String },
    /// No route of the listener matches the request.
    NoRoute { host: String, path: String },
    /// The matched rule has no backend it can use (its refs do not resolve).
    NoValidBackend { route: String, why: String },
    /// The backend Service has no ready endpoint.
    NoReadyEndpoint { service: String },
    /// The endpoint picked is no pod the node knows.
    UnknownEndpoint { target: SocketAddr },
    /// The endpoint's node has no known address.
    EndpointNodeUnknown { target: SocketAddr },
    /// The declared request body is over the listener's limit.
    BodyTooLarge { max: u64 },
    /// The route's `timeouts` ran out.
    Timeout { route: String, why: String },
    /// The backend Service's rate limit (its TrafficPolicy).
    RateLimited { route: String, why: String },
    /// A TLS passthrough connection that names no route: no server name, or not TLS at all.
    NotRoutable { why: String },
    /// The backend could not be reached or refused the request (tunnel, policy, connect).
    Backend {
        route: String,
        target: SocketAddr,
        source: String,
        why: String,
    },
}

impl EdgeRefusal {
    /// What the Gateway answers when forwarding a request to `route`'s backend failed.
    pub fn forwarding(f: crate::proxy::forward::Failure, route: String, source: String) -> Self {
        use crate::proxy::forward::Failure as F;
        match f {
            F::NoValidBackend { why, .. } => EdgeRefusal::NoValidBackend { route, why },
            F::NoReadyEndpoint { service } => EdgeRefusal::NoReadyEndpoint { service },
            F::UnknownEndpoint { target } => EdgeRefusal::UnknownEndpoint { target },
            F::EndpointNodeUnknown { target } => EdgeRefusal::EndpointNodeUnknown { target },
            F::Timeout { why } => EdgeRefusal::Timeout { route, why },
            f @ F::RateLimited { .. } => EdgeRefusal::RateLimited {
                route,
                why: f.to_string(),
            },
            F::Refused { target, why } => EdgeRefusal::Backend {
                route,
                target,
                source,
                why,
            },
            F::Denied { why, .. } => EdgeRefusal::NoValidBackend { route, why },
            F::BadBody(why) => EdgeRefusal::BadPath {
                path: String::new(),
                reason: why,
            },
            F::Backend { target, why, .. } => EdgeRefusal::Backend {
                route,
                target,
                source,
                why,
            },
        }
    }

    /// The `reason` label: of `signet_connections_failed_total` for connection refusals, of
    /// `signet_gateway_requests_refused_total` for requests.
    pub fn label(&self) -> &'static str {
        match self {
            EdgeRefusal::ConnectionLimit => "gateway_connection_limit",
            EdgeRefusal::ClientShare { .. } => "gateway_client_share",
            EdgeRefusal::ListenerRemoved => "listener_removed",
            EdgeRefusal::NoListener { .. } => "no_listener",
            EdgeRefusal::Misdirected { .. } => "misdirected",
            EdgeRefusal::BadPath { .. } => "bad_path",
            EdgeRefusal::NoRoute { .. } => "no_route",
            EdgeRefusal::NoValidBackend { .. } => "no_valid_backend",
            EdgeRefusal::NoReadyEndpoint { .. } => "no_ready_endpoint",
            EdgeRefusal::UnknownEndpoint { .. } => "unknown_endpoint",
            EdgeRefusal::EndpointNodeUnknown { .. } => "unknown_node",
            EdgeRefusal::BodyTooLarge { .. } => "body_too_large",
            EdgeRefusal::Timeout { .. } => "timeout",
            EdgeRefusal::RateLimited { .. } => "rate_limited",
            EdgeRefusal::Backend { .. } => "backend_failed",
            EdgeRefusal::NotRoutable { .. } => "not_routable",
        }
    }

    /// What the client is answered (connection refusals close the connection instead).
    pub fn status(&self) -> StatusCode {
        match self {
            EdgeRefusal::ConnectionLimit | EdgeRefusal::ClientShare { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EdgeRefusal::ListenerRemoved
            | EdgeRefusal::NoReadyEndpoint { .. }
            | EdgeRefusal::UnknownEndpoint { .. }
            | EdgeRefusal::EndpointNodeUnknown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            EdgeRefusal::NoListener { .. } | EdgeRefusal::NoRoute { .. } => StatusCode::NOT_FOUND,
            EdgeRefusal::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            EdgeRefusal::BadPath { .. } => StatusCode::BAD_REQUEST,
            // The Gateway API asks for a 500 when a rule's backends are all invalid.
            EdgeRefusal::NoValidBackend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            EdgeRefusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EdgeRefusal::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            EdgeRefusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            EdgeRefusal::Backend { .. } => StatusCode::BAD_GATEWAY,
            EdgeRefusal::NotRoutable { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The response body: one line for the client.
    pub fn body(&self) -> String {
        match self {
            EdgeRefusal::ConnectionLimit | EdgeRefusal::ClientShare { .. } => {
                "too many connections\n".into()
            }
            EdgeRefusal::ListenerRemoved => "listener removed\n".into(),
            EdgeRefusal::NoListener { host } => format!("no listener for host {host}\n"),
            EdgeRefusal::Misdirected { host, sni } => {
                format!("{host} is not served on a connection for {sni}\n")
            }
            EdgeRefusal::BadPath { reason, .. } => format!("bad request path: {reason}\n"),
            EdgeRefusal::NoRoute { .. } => "no route\n".into(),
            EdgeRefusal::NoValidBackend { why, .. } => format!("no valid backend: {why}\n"),
            EdgeRefusal::NoReadyEndpoint { service } => {
                format!("Service {service} has no ready endpoint\n")
            }
            EdgeRefusal::UnknownEndpoint { target } => {
                format!("endpoint {target} is no known pod\n")
            }
            EdgeRefusal::EndpointNodeUnknown { target } => {
                format!("endpoint {target}'s node has no address\n")
            }
            EdgeRefusal::BodyTooLarge { max } => format!("request body over {max} bytes\n"),
            EdgeRefusal::Timeout { why, .. }
            | EdgeRefusal::RateLimited { why, .. }
            | EdgeRefusal::Backend { why, .. }
            | EdgeRefusal::NotRoutable { why } => {
                format!("{why}\n")
            }
        }
    }

    /// Logs it (what to look at included), and counts it.
    pub fn report(&self, metrics: &Metrics) {
        match self {
            EdgeRefusal::ConnectionLimit => tracing::warn!(
                reason = self.label(),
                "gateway connection refused: the Gateway's connection cap is reached (gateway.maxConnections)"
            ),
            EdgeRefusal::ClientShare { cap } => tracing::warn!(
                reason = self.label(),
                cap,
                "gateway connection refused: this client holds its share of the Gateway's connections (gateway.maxConnectionsPerClient)"
            ),
            EdgeRefusal::NoListener { host } => tracing::info!(
                reason = self.label(),
                %host,
                "gateway: no listener for the host; check the Gateway's listener hostnames"
            ),
            EdgeRefusal::Misdirected { host, sni } => tracing::info!(
                reason = self.label(),
                %host,
                %sni,
                "gateway: misdirected request"
            ),
            EdgeRefusal::BadPath { path, reason } => tracing::info!(
                reason = self.label(),
                %path,
                why = %reason,
                "gateway: bad request path"
            ),
            EdgeRefusal::NoRoute { host, path } => tracing::info!(
                reason = self.label(),
                %host,
                %path,
                "gateway: no route; check the HTTPRoutes attached to the listener and their status"
            ),
            EdgeRefusal::NoValidBackend { route, why } => tracing::info!(
                reason = self.label(),
                %route,
                why = %why,
                "gateway: no valid backend; see the route's ResolvedRefs condition"
            ),
            EdgeRefusal::NoReadyEndpoint { service } => tracing::info!(
                reason = self.label(),
                %service,
                "gateway: the backend Service has no ready endpoint"
            ),
            EdgeRefusal::UnknownEndpoint { target }
            | EdgeRefusal::EndpointNodeUnknown { target } => {
                tracing::info!(
                    reason = self.label(),
                    backend = %target,
                    "gateway: the backend endpoint cannot be placed; is the agent running on its node?"
                )
            }
            EdgeRefusal::Backend {
                route,
                target,
                source,
                why,
            } => tracing::info!(
                reason = self.label(),
                %route,
                backend = %target,
                %source,
                why = %why,
                "gateway: backend refused"
            ),
            EdgeRefusal::Timeout { route, why } | EdgeRefusal::RateLimited { route, why } => {
                tracing::info!(reason = self.label(), %route, why = %why, "gateway: request not answered by a backend")
            }
            EdgeRefusal::NotRoutable { why } => tracing::info!(
                reason = self.label(),
                why = %why,
                "gateway: TLS passthrough connection closed: it names no route"
            ),
            EdgeRefusal::ListenerRemoved | EdgeRefusal::BodyTooLarge { .. } => {
                tracing::debug!(reason = self.label(), "gateway: request refused")
            }
        }
        match self {
            EdgeRefusal::ConnectionLimit | EdgeRefusal::ClientShare { .. } => {
                metrics.failed(Reporter::Inbound, UNKNOWN, UNKNOWN, self.label());
            }
            _ => metrics.gateway_refused(self.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_own_label_and_an_error_status() {
        let target: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let all = [
            EdgeRefusal::ConnectionLimit,
            EdgeRefusal::ClientShare { cap: 1 },
            EdgeRefusal::ListenerRemoved,
            EdgeRefusal::NoListener { host: "h".into() },
            EdgeRefusal::Misdirected {
                host: "h".into(),
                sni: "s".into(),
            },
            EdgeRefusal::BadPath {
                path: "/%2e%2e".into(),
                reason: "r".into(),
            },
            EdgeRefusal::NoRoute {
                host: "h".into(),
                path: "/".into(),
            },
            EdgeRefusal::NoValidBackend {
                route: "r".into(),
                why: "w".into(),
            },
            EdgeRefusal::NoReadyEndpoint {
                service: "s/n".into(),
            },
            EdgeRefusal::UnknownEndpoint { target },
            EdgeRefusal::EndpointNodeUnknown { target },
            EdgeRefusal::BodyTooLarge { max: 1 },
            EdgeRefusal::Timeout {
                route: "r".into(),
                why: "w".into(),
            },
            EdgeRefusal::RateLimited {
                route: "r".into(),
                why: "w".into(),
            },
            EdgeRefusal::Backend {
                route: "r".into(),
                target,
                source: "id".into(),
                why: "w".into(),
            },
            EdgeRefusal::NotRoutable { why: "w".into() },
        ];
        let mut labels: Vec<&str> = all.iter().map(EdgeRefusal::label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len(), "labels are distinct");
        for r in &all {
            assert!(
                r.status().is_client_error() || r.status().is_server_error(),
                "{r:?}"
            );
            assert!(r.body().ends_with('\n'), "{r:?}");
        }
        let m = Metrics::default();
        EdgeRefusal::NoRoute {
            host: "h".into(),
            path: "/".into(),
        }
        .report(&m);
        EdgeRefusal::ConnectionLimit.report(&m);
        let text = m.render(&Default::default());
        assert!(
            text.contains("signet_gateway_requests_refused_total{reason=\"no_route\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("reason=\"gateway_connection_limit\"} 1"),
            "{text}"
        );
    }
}
