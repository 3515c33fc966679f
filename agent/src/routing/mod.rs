//! The Gateway API read model, below `state` and above nothing but the resource types: `model`
//! turns Gateways, HTTPRoutes, ReferenceGrants and TLS Secrets into what this node serves (and
//! their status), `translate` turns HTTPRoute rules into routing rules, `routes` matches requests
//! with the spec's precedence and applies filters, and `tls` turns the Secrets of a port's
//! listeners into its rustls configuration, which picks a certificate by SNI.
//!
//! Nothing here owns a socket, a task or a metric. `state` builds a snapshot's `GatewayConfig`
//! with it (a served Gateway's identity is numbered with the workloads'), and `gateway` serves
//! that configuration.

pub mod addresses;
pub mod l4;
pub mod mesh;
pub mod model;
pub mod routes;
pub mod tls;
pub mod traffic;
pub mod translate;
