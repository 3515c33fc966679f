//! rustls certificate verifiers that authenticate peers by SPIFFE ID instead of host name.
//!
//! Both sides check the chain against the trust bundle with webpki (signatures, validity, EKU),
//! then read the peer's SPIFFE ID from its X.509-SVID: a server must present exactly the identity
//! the client expects; a client must belong to the trust domain. This is what ztunnel does for
//! HBONE, and what the integration tests and the agent's proxy use.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, spiffe_id_of};

/// Why a peer's certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("trust bundle root {index} is unusable: {reason}")]
    BadRoot { index: usize, reason: String },
    #[error("peer certificate chain does not verify against the trust bundle: {0}")]
    Chain(webpki::Error),
    #[error("peer certificate is not an X.509-SVID: {0}")]
    NotSvid(#[from] SvidError),
    #[error("peer is {found}, expected {expected}")]
    WrongIdentity { found: SpiffeId, expected: SpiffeId },
    #[error("peer {found} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        found: SpiffeId,
        trust_domain: TrustDomain,
    },
}

/// The roots of a trust domain, ready for chain verification. Clones share one set of roots, so
/// a bundle update ([`replace`](Self::replace)) reaches every verifier built from them.
#[derive(Debug, Clone)]
pub struct SvidRoots {
    trust_domain: TrustDomain,
    current: Arc<std::sync::RwLock<Arc<Anchors>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
struct Anchors {
    ders: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Anchors {
    fn new(roots: &[CertificateDer<'static>]) -> Result<Self, PeerError> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, r)| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| PeerError::BadRoot {
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(PeerError::BadRoot {
                index: 0,
                reason: "the trust bundle is empty".into(),
            });
        }
        Ok(Self {
            ders: roots.to_vec(),
            anchors,
        })
    }
}

impl SvidRoots {
    pub fn new(
        trust_domain: TrustDomain,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, PeerError> {
        Ok(Self {
            trust_domain,
            current: Arc::new(std::sync::RwLock::new(Arc::new(Anchors::new(roots)?))),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    fn anchors(&self) -> Arc<Anchors> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The roots in force.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.anchors().ders.clone()
    }

    /// Puts a new bundle in force for every clone. A bundle that does not parse, or is empty, is
    /// refused and the roots in force stay. Returns whether the roots changed.
    pub fn replace(&self, roots: &[CertificateDer<'static>]) -> Result<bool, PeerError> {
        if self.anchors().ders == roots {
            return Ok(false);
        }
        let next = Arc::new(Anchors::new(roots)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(true)
    }

    /// Verifies the chain for `usage` and returns the peer's SPIFFE ID, which must be in this
    /// trust domain.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, PeerError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(PeerError::Chain)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors().anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(PeerError::Chain)?;
        let id = spiffe_id_of(end_entity)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(PeerError::ForeignTrustDomain {
                found: id,
                trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(id)
    }
}

impl SvidRoots {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn to_rustls(e: PeerError) -> rustls::Error {
    use rustls::CertificateError as C;
    match e {
        PeerError::Chain(webpki::Error::CertExpired { .. }) => C::Expired.into(),
        PeerError::Chain(webpki::Error::CertNotValidYet { .. }) => C::NotValidYet.into(),
        PeerError::Chain(webpki::Error::UnknownIssuer) => C::UnknownIssuer.into(),
        PeerError::Chain(webpki::Error::InvalidSignatureForPublicKey) => C::BadSignature.into(),
        PeerError::WrongIdentity { .. } | PeerError::ForeignTrustDomain { .. } => {
            C::Other(rustls::OtherError(Arc::new(e))).into()
        }
        other => C::Other(rustls::OtherError(Arc::new(other))).into(),
    }
}

/// Client side: the server must present exactly `expected`.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: SvidRoots,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    pub fn new(roots: SvidRoots, expected: SpiffeId) -> Arc<Self> {
        Arc::new(Self { roots, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .roots
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map_err(to_rustls)?;
        if id != self.expected {
            return Err(to_rustls(PeerError::WrongIdentity {
                found: id,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots.algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is required and must be an SVID of the trust domain. The
/// server reads the authenticated identity with [`peer_spiffe_id`] after the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    roots: SvidRoots,
}

impl SpiffeClientVerifier {
    pub fn new(roots: SvidRoots) -> Arc<Self> {
        Arc::new(Self { roots })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.roots
            .verify(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.roots.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.roots.algorithms.supported_schemes()
    }
}

/// The SPIFFE ID of the peer of an established connection whose certificate a Spiffe verifier
/// already checked.
pub fn peer_spiffe_id(
    peer_certificates: Option<&[CertificateDer<'_>]>,
) -> Result<SpiffeId, SvidError> {
    match peer_certificates.and_then(|c| c.first()) {
        Some(leaf) => spiffe_id_of(leaf),
        None => Err(SvidError::UriSanCount(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_update_reaches_every_clone_and_a_bad_one_changes_nothing() {
        let td = TrustDomain::parse("cluster.local").expect("td");
        let ttl = std::time::Duration::from_secs(3600);
        let (_, first) = crate::store::tests::new_root(&td, ttl);
        let (_, second) = crate::store::tests::new_root(&td, ttl);
        let roots = SvidRoots::new(td, std::slice::from_ref(&first)).expect("roots");
        let verifier_copy = roots.clone();
        let both = vec![first.clone(), second];
        assert!(roots.replace(&both).expect("replace"));
        assert!(!roots.replace(&both).expect("same again"), "no change");
        assert_eq!(verifier_copy.roots(), both);
        assert!(roots.replace(&[]).is_err(), "an empty bundle is refused");
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(
            roots.replace(&[garbage]).is_err(),
            "so is one that does not parse"
        );
        assert_eq!(verifier_copy.roots(), both, "the roots in force stay");
    }
}
