//! The CA server's own TLS: a serving certificate the CA issues to itself (SVID profile plus the
//! configured DNS names and IPs), renewed at half-life or when a new root takes over, without
//! restarting the listener. The key never touches disk.

use std::sync::{Arc, RwLock};

use rcgen::KeyPair;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::authority::IssueError;
use crate::issuer::CertificateAuthority;
use crate::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error("generating the serving key failed: {0}")]
    Key(rcgen::Error),
    #[error("issuing the serving certificate failed: {0}")]
    Issue(#[from] IssueError),
    #[error("loading the serving key into rustls failed: {0}")]
    Rustls(rustls::Error),
}

struct Current {
    key: Arc<CertifiedKey>,
    renew_at: OffsetDateTime,
    root: rustls_pki_types::CertificateDer<'static>,
}

/// Resolves every handshake to the current serving certificate.
pub struct ServingCert {
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    names: Vec<String>,
    current: RwLock<Current>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("identity", &self.identity)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        identity: SpiffeId,
        names: Vec<String>,
    ) -> Result<Arc<Self>, ServingCertError> {
        let current = issue(&ca, &identity, &names)?;
        Ok(Arc::new(Self {
            ca,
            identity,
            names,
            current: RwLock::new(current),
        }))
    }

    /// Renews when half the lifetime has passed or the signing root changed. Returns whether
    /// it renewed.
    pub fn renew_if_due(&self, now: OffsetDateTime) -> Result<bool, ServingCertError> {
        let due = {
            let c = self.current.read().unwrap_or_else(|p| p.into_inner());
            now >= c.renew_at || c.root != *self.ca.signer().root()
        };
        if !due {
            return Ok(false);
        }
        let next = issue(&self.ca, &self.identity, &self.names)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(true)
    }
}

fn issue(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    names: &[String],
) -> Result<Current, ServingCertError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ServingCertError::Key)?;
    let signer = ca.signer();
    let now = OffsetDateTime::now_utc();
    let svid = signer.issue_serving(identity, names, &key, ca.ttl_policy().max_ttl, now)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(ServingCertError::Rustls)?;
    // Send the leaf and any intermediates; peers already hold the root.
    let mut chain = svid.chain.clone();
    if chain.len() > 1 {
        chain.pop();
    }
    let lifetime = svid.not_after - svid.not_before;
    let renew_at = svid.not_before + lifetime / 2;
    Ok(Current {
        key: Arc::new(CertifiedKey::new(chain, signing_key)),
        renew_at,
        root: signer.root().clone(),
    })
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .key
                .clone(),
        )
    }
}

/// A TLS 1.3 server configuration (ALPN `h2`) that serves the rotating certificate.
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
