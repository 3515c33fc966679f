//! Gateway API listeners on the node proxy: `server` terminates TLS (with the per-port
//! configuration `routing::tls` built) and forwards into the mesh over HBONE with the Gateway's
//! identity, `ports` opens and closes the listeners a snapshot asks for, `refusal` is every answer
//! the edge gives itself, and `h1guard` refuses ambiguous HTTP/1 framing before hyper normalises
//! it away. What to serve (listeners, routes, status) is `crate::routing`'s, below `state`.

pub mod h1guard;
pub mod l4;
pub mod ports;
pub mod refusal;
pub mod server;
