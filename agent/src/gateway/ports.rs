//! The Gateway's ports: one accept loop per port the snapshot serves, started and stopped as
//! Gateways come and go.

use std::collections::HashMap;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::ProxyContext;
use crate::state::snapshot::Snapshot;

/// One accept loop per Gateway port, started and stopped as Gateways come and go.
pub struct GatewayPorts {
    pub ip: std::net::IpAddr,
    pub limits: crate::config::EdgeLimits,
    pub ctx: ProxyContext,
    /// (a Gateway's own address, or `None` for `ip`; port) → its accept loop.
    pub running: HashMap<(Option<std::net::IpAddr>, u16), CancellationToken>,
}

impl std::fmt::Debug for GatewayPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ports: Vec<_> = self.running.keys().collect();
        ports.sort();
        f.debug_struct("GatewayPorts")
            .field("ip", &self.ip)
            .field("ports", &ports)
            .finish_non_exhaustive()
    }
}

impl GatewayPorts {
    /// No port yet: the first [`GatewayPorts::sync`] opens what the snapshot serves, on
    /// `listen.gatewayIp` with the `gateway` section's limits.
    pub fn new(config: &crate::config::AgentConfig, ctx: ProxyContext) -> Self {
        Self {
            ip: config.listen.gateway_ip,
            limits: config.gateway.limits.clone(),
            ctx,
            running: HashMap::new(),
        }
    }

    /// Listens on the ports `snap` serves, and stops listening on the others.
    pub fn sync(&mut self, snap: &Snapshot) {
        let wanted = snap.gateway.bindings();
        self.running.retain(|key, token| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(address = ?key.0, port = key.1, "gateway port no longer served");
                token.cancel();
            }
            keep
        });
        for key in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let (bound, port) = key;
            let addr = std::net::SocketAddr::new(bound.unwrap_or(self.ip), port);
            let listener = match bind(addr, bound.is_some()).and_then(TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "gateway port cannot be bound; its listeners are not served");
                    continue;
                }
            };
            tracing::info!(%addr, "gateway port served");
            let token = self.ctx.drain.stop_token().child_token();
            self.running.insert(key, token.clone());
            self.ctx.drain.spawn(
                "gateway port",
                super::server::serve_port(
                    listener,
                    bound,
                    port,
                    self.ctx.clone(),
                    self.limits.clone(),
                    token,
                ),
            );
        }
    }
}

/// A listening socket on `addr`. A Gateway's own address is bound transparently: it need not
/// be configured on any interface (`crate::vip` routes it here on the nodes that serve it), and
/// every node that serves the Gateway listens, ready for the address to be announced from it.
fn bind(addr: std::net::SocketAddr, own: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if own {
        match addr {
            std::net::SocketAddr::V4(_) => {
                sock.set_ip_transparent_v4(true)?;
                sock.set_freebind_v4(true)?;
            }
            std::net::SocketAddr::V6(_) => {
                sock.set_ip_transparent_v6(true)?;
                sock.set_freebind_v6(true)?;
            }
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}
