//! Signing: the CA certificate and key that sign SVIDs, the TTL rules, and the chain handed back
//! with every SVID.
//!
//! This module decides *how* to sign; *whether* a caller may have an identity is the server's
//! authorisation, and where keys live is `store`.

use std::time::Duration;

use rcgen::{Issuer, KeyPair, PublicKeyData, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::csr::Csr;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid;

/// Why an SVID could not be issued. `InvalidRequest` variants are the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("requested TTL {requested:?} exceeds the maximum {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("requested TTL {requested:?} is below the minimum {min:?}")]
    TtlTooShort { requested: Duration, min: Duration },
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("the signing CA certificate expired at {not_after}; rotate or replace the CA")]
    SignerExpired { not_after: OffsetDateTime },
    #[error("CSR public key cannot be encoded into a certificate: {0}")]
    PublicKey(rcgen::Error),
    #[error("signing failed: {0}")]
    Signing(rcgen::Error),
}

impl IssueError {
    /// Whether the request was at fault (gRPC `InvalidArgument`) rather than the CA.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::TtlTooLong { .. } | Self::TtlTooShort { .. } | Self::PublicKey(_)
        )
    }
}

/// Why CA material is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CaCertError {
    #[error("{what}: not valid DER X.509: {reason}")]
    Der { what: String, reason: String },
    #[error("{what}: not a CA certificate (basicConstraints cA=true is required)")]
    NotCa { what: String },
    #[error("{what}: key usage does not include keyCertSign")]
    NoKeyCertSign { what: String },
    #[error("{what}: the private key does not match the certificate's public key")]
    KeyMismatch { what: String },
    #[error("{what}: signature does not verify against {issuer}")]
    BrokenChain { what: String, issuer: String },
    #[error("{what}: chain does not end at a trusted root from root-cert.pem")]
    UntrustedChain { what: String },
    #[error("{what}: expired at {not_after}")]
    Expired {
        what: String,
        not_after: OffsetDateTime,
    },
    #[error("{what}: {reason}")]
    Key { what: String, reason: String },
}

/// TTL rules for SVIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when the caller asks for nothing (`validity_duration` 0).
    pub default_ttl: Duration,
    /// Requests above this are refused.
    pub max_ttl: Duration,
    /// Requests below this are refused: certificates shorter than a rotation round-trip churn.
    pub min_ttl: Duration,
    /// `notBefore` is set this far in the past so peers with slightly slow clocks accept it.
    pub backdate: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            min_ttl: Duration::from_secs(60),
            backdate: Duration::from_secs(60),
        }
    }
}

impl TtlPolicy {
    /// Cross-field checks for configured values.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_ttl > self.default_ttl || self.default_ttl > self.max_ttl {
            return Err(format!(
                "TTLs must satisfy min ({:?}) <= default ({:?}) <= max ({:?})",
                self.min_ttl, self.default_ttl, self.max_ttl
            ));
        }
        Ok(())
    }

    /// The TTL to use for a request of `requested` (zero means "the default").
    pub fn resolve(&self, requested: Duration) -> Result<Duration, IssueError> {
        if requested.is_zero() {
            return Ok(self.default_ttl);
        }
        if requested > self.max_ttl {
            return Err(IssueError::TtlTooLong {
                requested,
                max: self.max_ttl,
            });
        }
        if requested < self.min_ttl {
            return Err(IssueError::TtlTooShort {
                requested,
                min: self.min_ttl,
            });
        }
        Ok(requested)
    }
}

/// A certificate issued by the CA, with the chain that proves it.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// Uppercase hex of the serial number.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Leaf first, root last.
    pub chain: Vec<CertificateDer<'static>>,
}

impl IssuedSvid {
    /// The chain as PEM strings, leaf first, root last (Istio's `cert_chain`).
    pub fn chain_pem(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|c| to_pem("CERTIFICATE", c))
            .collect()
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

pub(crate) fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A CA certificate and its key, ready to sign SVIDs.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then any intermediates, then the root.
    chain: Vec<CertificateDer<'static>>,
    not_before: OffsetDateTime,
    /// The earliest `notAfter` along the chain: no SVID may outlive any certificate above it.
    not_after: OffsetDateTime,
    name: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// `chain` is the signing certificate first and the root last (the same certificate when
    /// the root signs directly). Checks that it is a CA, that the key matches, and that each
    /// link is signed by the next.
    pub fn new(
        name: &str,
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CaCertError> {
        let what = |i: usize| format!("{name} chain[{i}]");
        let parsed = chain
            .iter()
            .enumerate()
            .map(|(i, c)| {
                X509Certificate::from_der(c.as_ref())
                    .map(|(_, x)| x)
                    .map_err(|e| CaCertError::Der {
                        what: what(i),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(signing) = parsed.first() else {
            return Err(CaCertError::Der {
                what: name.to_owned(),
                reason: "no certificate".into(),
            });
        };
        for (i, cert) in parsed.iter().enumerate() {
            check_ca_cert(&what(i), cert)?;
            let issuer = parsed.get(i + 1).unwrap_or(cert);
            cert.verify_signature(Some(issuer.public_key()))
                .map_err(|_| CaCertError::BrokenChain {
                    what: what(i),
                    issuer: issuer.subject().to_string(),
                })?;
        }
        if key.der_bytes() != signing.public_key().subject_public_key.data.as_ref() {
            return Err(CaCertError::KeyMismatch { what: what(0) });
        }
        let not_before = signing.validity().not_before.to_datetime();
        let not_after = parsed
            .iter()
            .map(|c| c.validity().not_after.to_datetime())
            .min()
            .expect("the chain is not empty");
        let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| CaCertError::Der {
            what: what(0),
            reason: e.to_string(),
        })?;
        Ok(Self {
            issuer,
            chain,
            not_before,
            not_after,
            name: name.to_owned(),
        })
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The root this signer chains to (last in its chain).
    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().expect("the chain is not empty")
    }

    /// Signs an SVID for `id` over the CSR's public key. The identity was authorised by the
    /// caller; the trust domain is checked here as a last line of defence.
    pub fn issue(
        &self,
        trust_domain: &TrustDomain,
        id: &SpiffeId,
        csr: &Csr,
        ttl: Duration,
        backdate: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedSvid, IssueError> {
        if !id.is_member_of(trust_domain) {
            return Err(IssueError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: trust_domain.clone(),
            });
        }
        if now >= self.not_after {
            return Err(IssueError::SignerExpired {
                not_after: self.not_after,
            });
        }
        let not_before = (now - backdate).max(self.not_before);
        let not_after = (now + ttl).min(self.not_after);
        let params = svid::leaf_params(id, not_before, not_after);
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.public_key_der()).map_err(IssueError::PublicKey)?;
        self.sign(id, &params, &public_key)
    }

    /// Signs `params` over `public_key` and returns it with the chain above it.
    fn sign(
        &self,
        id: &SpiffeId,
        params: &rcgen::CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<IssuedSvid, IssueError> {
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex_upper(&s.to_bytes()))
            .unwrap_or_default();
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(IssueError::Signing)?;
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(leaf.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedSvid {
            spiffe_id: id.clone(),
            serial,
            not_before: params.not_before,
            not_after: params.not_after,
            chain,
        })
    }

    /// Signs a serving certificate for the CA's own gRPC endpoint: the SVID profile plus DNS and
    /// IP SANs so ordinary TLS clients (ztunnel, tonic) can check the host name.
    pub fn issue_serving(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        key: &KeyPair,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedSvid, IssueError> {
        let not_before = (now - Duration::from_secs(60)).max(self.not_before);
        let not_after = (now + ttl).min(self.not_after);
        let mut params = svid::leaf_params(id, not_before, not_after);
        for name in dns_names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => {
                    rcgen::SanType::DnsName(name.as_str().try_into().map_err(IssueError::Signing)?)
                }
            };
            params.subject_alt_names.push(san);
        }
        self.sign(id, &params, key)
    }
}

fn check_ca_cert(what: &str, cert: &X509Certificate<'_>) -> Result<(), CaCertError> {
    if !cert.is_ca() {
        return Err(CaCertError::NotCa {
            what: what.to_owned(),
        });
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(CaCertError::NoKeyCertSign {
            what: what.to_owned(),
        }),
        _ => Ok(()),
    }
}

pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::tests::csr_pem_for;
    use crate::store::tests::{intermediate_under, new_root};

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").expect("td")
    }

    fn csr() -> Csr {
        let key = KeyPair::generate().expect("key");
        Csr::parse(csr_pem_for(&key).as_bytes()).expect("csr")
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn ttl_rules() {
        let p = TtlPolicy::default();
        assert_eq!(
            p.resolve(Duration::ZERO).expect("default"),
            Duration::from_secs(3600)
        );
        assert_eq!(
            p.resolve(Duration::from_secs(600)).expect("less"),
            Duration::from_secs(600)
        );
        assert!(matches!(
            p.resolve(Duration::from_secs(24 * 3600 + 1)),
            Err(IssueError::TtlTooLong { .. })
        ));
        assert!(matches!(
            p.resolve(Duration::from_secs(5)),
            Err(IssueError::TtlTooShort { .. })
        ));
        let bad = TtlPolicy {
            default_ttl: Duration::from_secs(10),
            ..p
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn issued_chain_is_leaf_then_root_and_times_are_bounded() {
        let (root_key, root) = new_root(&td(), Duration::from_secs(7200));
        let signer = Signer::new("test", root_key, vec![root.clone()]).expect("signer");
        let now = OffsetDateTime::now_utc();
        let svid = signer
            .issue(
                &td(),
                &id("spiffe://cluster.local/ns/a/sa/b"),
                &csr(),
                Duration::from_secs(3600),
                Duration::from_secs(60),
                now,
            )
            .expect("issue");
        assert_eq!(svid.chain.len(), 2);
        assert_eq!(svid.chain[1], root);
        assert_eq!(svid.serial.len(), 32);
        let (_, leaf) = X509Certificate::from_der(svid.leaf().as_ref()).expect("leaf");
        let nb = leaf.validity().not_before.timestamp();
        let na = leaf.validity().not_after.timestamp();
        assert!(
            (now.unix_timestamp() - 61..=now.unix_timestamp() - 59).contains(&nb),
            "backdated 60s"
        );
        assert!((na - (now.unix_timestamp() + 3600)).abs() <= 1);

        // A TTL reaching past the root's notAfter is cut at the root's notAfter.
        let late = signer
            .issue(
                &td(),
                &id("spiffe://cluster.local/ns/a/sa/b"),
                &csr(),
                Duration::from_secs(3 * 3600),
                Duration::ZERO,
                now,
            )
            .expect("issue");
        assert_eq!(late.not_after, signer.not_after());
        let (_, leaf) = X509Certificate::from_der(late.leaf().as_ref()).expect("leaf");
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            signer.not_after().unix_timestamp()
        );
    }

    #[test]
    fn refuses_foreign_trust_domain_and_expired_signer() {
        let (root_key, root) = new_root(&td(), Duration::from_secs(7200));
        let signer = Signer::new("test", root_key, vec![root]).expect("signer");
        let now = OffsetDateTime::now_utc();
        let err = signer
            .issue(
                &td(),
                &id("spiffe://evil.org/ns/a/sa/b"),
                &csr(),
                Duration::from_secs(60),
                Duration::ZERO,
                now,
            )
            .expect_err("foreign");
        assert!(
            matches!(err, IssueError::ForeignTrustDomain { .. }),
            "{err}"
        );
        let err = signer
            .issue(
                &td(),
                &id("spiffe://cluster.local/ns/a/sa/b"),
                &csr(),
                Duration::from_secs(60),
                Duration::ZERO,
                now + time::Duration::hours(3),
            )
            .expect_err("expired");
        assert!(matches!(err, IssueError::SignerExpired { .. }), "{err}");
    }

    #[test]
    fn intermediate_chain_is_checked_and_returned_in_order() {
        let (root_key, root) = new_root(&td(), Duration::from_secs(7200));
        let (int_key, int) = intermediate_under(&root_key, &root);
        let signer = Signer::new("test", int_key, vec![int.clone(), root.clone()]).expect("signer");
        let svid = signer
            .issue(
                &td(),
                &id("spiffe://cluster.local/ns/a/sa/b"),
                &csr(),
                Duration::from_secs(600),
                Duration::ZERO,
                OffsetDateTime::now_utc(),
            )
            .expect("issue");
        assert_eq!(svid.chain[1..], [int.clone(), root.clone()]);

        // The wrong key for the signing certificate is refused.
        let other = KeyPair::generate().expect("key");
        assert!(matches!(
            Signer::new("test", other, vec![int.clone(), root.clone()]),
            Err(CaCertError::KeyMismatch { .. })
        ));
        // A chain whose links do not sign each other is refused.
        let (stranger_key, stranger_root) = new_root(&td(), Duration::from_secs(7200));
        let (int_key, int) = intermediate_under(&stranger_key, &stranger_root);
        assert!(matches!(
            Signer::new("test", int_key, vec![int, root]),
            Err(CaCertError::BrokenChain { .. })
        ));
    }

    #[test]
    fn a_leaf_cannot_be_a_signer() {
        let (root_key, root) = new_root(&td(), Duration::from_secs(7200));
        let signer = Signer::new("test", root_key, vec![root]).expect("signer");
        let key = KeyPair::generate().expect("key");
        let svid = signer
            .issue_serving(
                &id("spiffe://cluster.local/ns/x/sa/y"),
                &["localhost".into()],
                &key,
                Duration::from_secs(600),
                OffsetDateTime::now_utc(),
            )
            .expect("serving");
        assert!(matches!(
            Signer::new("leaf", key, svid.chain[..1].to_vec()),
            Err(CaCertError::NotCa { .. })
        ));
    }
}
