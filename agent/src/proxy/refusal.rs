//! Why the proxy refused a connection or a stream, in one type: each refusal gives its metric
//! label, the HBONE status the peer gets, and the log line, which says what to look at.

use std::net::SocketAddr;

use http::StatusCode;
use signet_ca::SpiffeId;

use super::hbone::HboneError;

/// A connection or stream the proxy did not carry.
#[derive(Debug)]
pub enum Refusal {
    /// The direction's connection cap is reached.
    ConnectionLimit,
    /// Outbound: this pod holds its share (`cap`) of the node's connections.
    PodShare { cap: usize },
    /// Outbound: the datapath recorded no original destination for the connection.
    NoOriginalDestination,
    /// Outbound: the client address is not a pod of this node.
    UnknownSource,
    /// The destination address has no single owner (two pods, a node's own, outside the
    /// node's pod CIDRs).
    AddressConflict(String),
    /// Outbound: no pod has the address, or the Service has no ready endpoint.
    NoEndpoint,
    /// This node's policy denied it; the compiled rule (or default) that decided.
    Policy { rule: crate::policy::decide::Rule },
    /// The destination's node refused the stream on policy grounds (HTTP 403).
    PeerPolicy(HboneError),
    /// Outbound: the destination pod's node has no known address.
    UnknownNode { node: Option<String> },
    /// Outbound: the tunnel could not be opened.
    Tunnel(HboneError),
    /// Outbound: opening the tunnel took longer than the handshake timeout.
    TunnelTimeout,
    /// Inbound: the stream's target is not a pod of this node.
    NotLocal(SocketAddr),
    /// Inbound: the target pod is not the identity whose certificate the client asked for.
    WrongDestination {
        target: SocketAddr,
        is: SpiffeId,
        served: SpiffeId,
    },
    /// Inbound: the workload did not accept the connection.
    WorkloadUnreachable {
        target: SocketAddr,
        error: std::io::Error,
    },
}

impl Refusal {
    /// The `reason` label of `signet_connections_failed_total` (policy refusals are counted as
    /// `signet_policy_verdicts_total{verdict="deny"}` instead).
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PodShare { .. } => "pod_connection_share",
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::UnknownSource => "unknown_source",
            Refusal::AddressConflict(_) => "address_conflict",
            Refusal::NoEndpoint => "no_endpoint",
            Refusal::Policy { .. } | Refusal::PeerPolicy(_) => "policy",
            Refusal::UnknownNode { .. } => "unknown_node",
            Refusal::Tunnel(_) | Refusal::TunnelTimeout => "tunnel_failed",
            Refusal::NotLocal(_) => "no_pod",
            Refusal::WrongDestination { .. } => "wrong_destination",
            Refusal::WorkloadUnreachable { .. } => "workload_unreachable",
        }
    }

    /// A policy decision (here or at the peer), rather than a failure.
    pub fn is_policy(&self) -> bool {
        matches!(self, Refusal::Policy { .. } | Refusal::PeerPolicy(_))
    }

    /// What an HBONE peer is answered.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Policy { .. }
            | Refusal::PeerPolicy(_)
            | Refusal::WrongDestination { .. }
            | Refusal::AddressConflict(_) => StatusCode::FORBIDDEN,
            Refusal::NotLocal(_) | Refusal::NoEndpoint | Refusal::UnknownSource => {
                StatusCode::NOT_FOUND
            }
            Refusal::WorkloadUnreachable { .. }
            | Refusal::ConnectionLimit
            | Refusal::PodShare { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoOriginalDestination
            | Refusal::UnknownNode { .. }
            | Refusal::Tunnel(_)
            | Refusal::TunnelTimeout => StatusCode::BAD_GATEWAY,
        }
    }

    /// A tunnel error, told apart: a 403 from the peer is its policy, not a broken tunnel.
    pub fn from_tunnel(e: HboneError) -> Self {
        if matches!(e, HboneError::Refused { status, .. } if status == StatusCode::FORBIDDEN) {
            Refusal::PeerPolicy(e)
        } else {
            Refusal::Tunnel(e)
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ConnectionLimit => f.write_str(
                "the connection cap is reached (proxy.maxConnections; \
                 signet_connections_open shows what is open)",
            ),
            Refusal::PodShare { cap } => write!(
                f,
                "this pod holds its share of the node's connections ({cap}, \
                 proxy.maxConnectionsPerPod)"
            ),
            Refusal::NoOriginalDestination => f.write_str(
                "no original destination recorded for this connection (was it captured by this \
                 node's datapath? `signet datapath status` shows the programs attached)",
            ),
            Refusal::UnknownSource => f.write_str(
                "the client is not a pod of this node (is its pod in the cluster state, with \
                 its address and this node's name?)",
            ),
            Refusal::AddressConflict(why) => write!(f, "{why}"),
            Refusal::NoEndpoint => {
                f.write_str("no pod has this address, or the Service has no ready endpoint")
            }
            Refusal::Policy { rule } => write!(f, "denied by {rule}"),
            Refusal::PeerPolicy(e) => write!(f, "the destination's node denied it: {e}"),
            Refusal::UnknownNode { node: Some(n) } => write!(
                f,
                "the destination's node {n} has no known address (does its Node object list \
                 an InternalIP?)"
            ),
            Refusal::UnknownNode { node: None } => {
                f.write_str("the destination pod has no node (is it scheduled?)")
            }
            Refusal::Tunnel(e) => write!(f, "{e}"),
            Refusal::TunnelTimeout => f.write_str(
                "timed out opening the tunnel (is the destination node's agent up and its \
                 inbound port reachable?)",
            ),
            Refusal::NotLocal(target) => write!(f, "{target} is not a pod of this node"),
            Refusal::WrongDestination { target, is, served } => write!(
                f,
                "{target} is {is}, but the connection was made to {served}"
            ),
            Refusal::WorkloadUnreachable { target, error } => write!(
                f,
                "{target}: {error} (is the workload listening on that port?)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_403_is_policy_and_other_tunnel_errors_are_failures() {
        let node: SocketAddr = "10.0.0.2:15008".parse().expect("addr");
        let authority: SocketAddr = "10.2.0.2:80".parse().expect("addr");
        let refused = |status| HboneError::Refused {
            node,
            authority,
            status,
        };
        let denied = Refusal::from_tunnel(refused(StatusCode::FORBIDDEN));
        assert!(denied.is_policy());
        assert_eq!(denied.label(), "policy");
        let missing = Refusal::from_tunnel(refused(StatusCode::NOT_FOUND));
        assert!(!missing.is_policy());
        assert_eq!(missing.label(), "tunnel_failed");
        let down = Refusal::from_tunnel(HboneError::Connect {
            node,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        });
        let text = down.to_string();
        assert!(
            text.starts_with("connecting to 10.0.0.2:15008: ")
                && text.contains("is the agent running on that node?"),
            "the port once appeared twice: {text}"
        );
    }

    #[test]
    fn each_refusal_has_the_status_its_kind_calls_for() {
        let target: SocketAddr = "10.2.0.2:80".parse().expect("addr");
        let id = |s: &str| SpiffeId::parse(s).expect("id");
        let cases = [
            (
                Refusal::Policy {
                    rule: "shop/db-in ingress[0]".into(),
                },
                StatusCode::FORBIDDEN,
            ),
            (Refusal::NotLocal(target), StatusCode::NOT_FOUND),
            (
                Refusal::WrongDestination {
                    target,
                    is: id("spiffe://td/ns/a/sa/b"),
                    served: id("spiffe://td/ns/a/sa/c"),
                },
                StatusCode::FORBIDDEN,
            ),
            (
                Refusal::WorkloadUnreachable {
                    target,
                    error: std::io::ErrorKind::ConnectionRefused.into(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (r, status) in cases {
            assert_eq!(r.status(), status, "{r}");
        }
    }
}
