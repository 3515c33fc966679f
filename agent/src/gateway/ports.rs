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
    pub running: HashMap<u16, CancellationToken>,
}

impl std::fmt::Debug for GatewayPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ports: Vec<&u16> = self.running.keys().collect();
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
        let wanted: Vec<u16> = snap.gateway.ports.iter().map(|p| p.port).collect();
        self.running.retain(|port, token| {
            let keep = wanted.contains(port);
            if !keep {
                tracing::info!(port, "gateway port no longer served");
                token.cancel();
            }
            keep
        });
        for port in wanted {
            if self.running.contains_key(&port) {
                continue;
            }
            let addr = std::net::SocketAddr::new(self.ip, port);
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%addr, error = %e, "gateway port cannot be bound; its listeners are not served");
                    continue;
                }
            };
            tracing::info!(%addr, "gateway port served");
            let token = self.ctx.drain.stop_token().child_token();
            self.running.insert(port, token.clone());
            self.ctx.drain.spawn(
                "gateway port",
                super::server::serve_port(
                    listener,
                    port,
                    self.ctx.clone(),
                    self.limits.clone(),
                    token,
                ),
            );
        }
    }
}
