//! The node proxy: outbound (captured connections into HBONE tunnels) and inbound (HBONE
//! streams authorised by identity policy and connected to workloads). Gateway listeners come
//! with issue 6.

pub mod hbone;
pub mod inbound;
pub mod l7;
pub mod outbound;
pub mod tls;

use std::sync::{Arc, RwLock};

use signet_ca::TrustDomain;
use signet_ca::verify::SvidRoots;

use crate::certs::CertManager;
use crate::state::snapshot::Snapshot;

/// What both directions of the proxy share.
#[derive(Clone)]
pub struct ProxyContext {
    /// The snapshot in force; swapped whole when the state changes.
    pub snapshot: Arc<RwLock<Arc<Snapshot>>>,
    pub certs: CertManager,
    pub roots: SvidRoots,
    pub trust_domain: TrustDomain,
    pub hbone: hbone::HboneClient,
    /// `SO_MARK` on connections to workloads, so tc knows they come from the proxy.
    pub proxy_mark: u32,
    /// Port of the inbound HBONE listener on every node.
    pub inbound_port: u16,
}

impl std::fmt::Debug for ProxyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyContext")
            .field("trust_domain", &self.trust_domain)
            .field("inbound_port", &self.inbound_port)
            .finish_non_exhaustive()
    }
}

impl ProxyContext {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
