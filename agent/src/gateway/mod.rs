//! Gateway API listeners on the node proxy: `model` turns Gateways, HTTPRoutes, ReferenceGrants
//! and TLS Secrets into what this node serves (and their status), `translate` turns HTTPRoute
//! rules into routing rules, `routes` matches requests
//! with the spec's precedence and applies filters, `server` terminates TLS and forwards into the
//! mesh over HBONE with the Gateway's identity; `h1guard` refuses ambiguous HTTP/1 framing
//! before hyper normalises it away.

pub mod h1guard;
pub mod model;
pub mod ports;
pub mod refusal;
pub mod routes;
pub mod server;
pub mod tls;
pub mod translate;
