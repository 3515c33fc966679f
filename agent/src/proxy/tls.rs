//! TLS for HBONE between node proxies. One node serves many workloads, so the client names the
//! destination workload in SNI (`<sa>.<ns>.sa.signet.invalid`) and the server presents that
//! workload's SVID; both sides verify by SPIFFE ID (`signet_ca::verify`), never by host name.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use signet_ca::verify::{SpiffeClientVerifier, SpiffeServerVerifier, SvidRoots};
use signet_ca::{SpiffeId, TrustDomain};

use crate::certs::CertManager;

const SNI_SUFFIX: &str = ".sa.signet.invalid";

/// The SNI a client sends to reach workload `id` (`spiffe://<td>/ns/<ns>/sa/<sa>` only).
pub fn sni_for(id: &SpiffeId) -> Option<ServerName<'static>> {
    let (ns, sa) = id.namespace_and_service_account()?;
    ServerName::try_from(format!("{sa}.{ns}{SNI_SUFFIX}")).ok()
}

/// The workload an SNI names, in trust domain `td`.
pub fn id_from_sni(sni: &str, td: &TrustDomain) -> Option<SpiffeId> {
    let rest = sni.strip_suffix(SNI_SUFFIX)?;
    let (sa, ns) = rest.split_once('.')?;
    SpiffeId::workload(td, ns, sa).ok()
}

/// One crypto provider for every configuration.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Routes whose configurations are kept; past this the cache starts over.
const MAX_CACHED_CONFIGS: usize = 4096;

/// Client configurations, built once per (source, destination) and source certificate rather
/// than per dial, so the HBONE connections of a route resume TLS sessions (rustls keeps the
/// tickets in the configuration). A renewed certificate gets a new configuration, and with it a
/// fresh session store: nothing resumes across a certificate change. The verifier reads the
/// trust roots in force at each handshake, so a bundle change applies at once.
#[derive(Debug, Clone, Default)]
pub struct ClientConfigs {
    cache: Arc<std::sync::Mutex<ConfigCache>>,
}

type ConfigCache =
    std::collections::HashMap<(SpiffeId, SpiffeId), (String, Arc<rustls::ClientConfig>)>;

impl ClientConfigs {
    /// A configuration presenting `source`'s SVID and requiring `destination` from the server,
    /// and that SVID's notAfter, from the cache when the certificate has not changed; `None`
    /// while the source has no certificate yet (the caller fails closed).
    pub fn get(
        &self,
        certs: &CertManager,
        roots: &SvidRoots,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Option<(Arc<rustls::ClientConfig>, std::time::SystemTime)> {
        let cert = certs.get(source)?;
        // An expired certificate (its renewal failing) gets a full handshake, which the peer
        // refuses, never a resumed session that would carry the old identity on.
        if cert.not_after <= std::time::SystemTime::now() {
            return client_config_for(&cert, roots, destination);
        }
        let key = (source.clone(), destination.clone());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((serial, cfg)) = cache.get(&key)
            && *serial == cert.serial
        {
            return Some((cfg.clone(), cert.not_after));
        }
        let (cfg, not_after) = client_config_for(&cert, roots, destination)?;
        if cache.len() >= MAX_CACHED_CONFIGS {
            cache.clear();
        }
        cache.insert(key, (cert.serial.clone(), cfg.clone()));
        Some((cfg, not_after))
    }
}

/// Presents the SVID of the workload named in SNI; no certificate (handshake fails) when this
/// node has none for it.
#[derive(Debug)]
struct SniResolver {
    certs: CertManager,
    td: TrustDomain,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = id_from_sni(hello.server_name()?, &self.td)?;
        Some(self.certs.get(&id)?.certified.clone())
    }
}

/// The inbound (port 15008) server configuration: TLS 1.3, client certificate required.
pub fn server_config(
    certs: CertManager,
    roots: SvidRoots,
    td: TrustDomain,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(roots))
        .with_cert_resolver(Arc::new(SniResolver { certs, td }));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `cert` and requiring `destination` from the server, and
/// that SVID's notAfter.
fn client_config_for(
    cert: &crate::certs::WorkloadCert,
    roots: &SvidRoots,
    destination: &SpiffeId,
) -> Option<(Arc<rustls::ClientConfig>, std::time::SystemTime)> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            roots.clone(),
            destination.clone(),
        ))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .ok()?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Some((Arc::new(cfg), cert.not_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_workload_identities() {
        let td = TrustDomain::parse("cluster.local").expect("td");
        let id = SpiffeId::workload(&td, "shop", "web").expect("id");
        let sni = sni_for(&id).expect("sni");
        assert_eq!(sni.to_str(), "web.shop.sa.signet.invalid");
        assert_eq!(id_from_sni(&sni.to_str(), &td), Some(id));
        assert_eq!(id_from_sni("web.shop.example.com", &td), None);
        let gw = SpiffeId::parse("spiffe://cluster.local/ns/edge/gateway/public").expect("id");
        assert!(sni_for(&gw).is_none());
    }
}
