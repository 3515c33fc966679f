//! PKCS#10 certificate signing requests, reduced to the one thing the CA takes from them: a
//! public key whose owner proved possession by signing the request.
//!
//! Everything else a CSR can ask for (subject, SANs, extensions, attributes) is ignored on
//! purpose: the identity comes from the caller's authorisation, never from the request.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;

/// Requests larger than this are refused before any parsing.
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is empty")]
    Empty,
    #[error("CSR is {len} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge { len: usize },
    #[error("CSR PEM is malformed: {0}")]
    Pem(String),
    #[error("PEM block is `{found}`; expected `CERTIFICATE REQUEST`")]
    WrongPemLabel { found: String },
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Der(String),
    #[error("CSR has {0} trailing bytes after the request")]
    TrailingBytes(usize),
    #[error(
        "CSR self-signature does not verify ({0}): the request was altered or not signed by its key"
    )]
    BadSignature(String),
    #[error("CSR key type {0} is not accepted; use ECDSA P-256, P-384 or RSA >= 2048 bits")]
    UnsupportedKey(String),
    #[error("CSR RSA key is {bits} bits; at least {MIN_RSA_BITS} are required")]
    RsaTooSmall { bits: usize },
}

/// The kind of key a CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa { bits: usize },
}

/// A verified CSR: the subject public key and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Csr {
    spki_der: Vec<u8>,
    kind: KeyKind,
}

impl Csr {
    /// Parses a PEM (`CERTIFICATE REQUEST`) or DER PKCS#10 request and verifies its self-signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, CsrError> {
        if bytes.is_empty() {
            return Err(CsrError::Empty);
        }
        if bytes.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge { len: bytes.len() });
        }
        if looks_like_pem(bytes) {
            let block = pem::parse(bytes).map_err(|e| CsrError::Pem(e.to_string()))?;
            // OpenSSL's older label is accepted too.
            if !matches!(
                block.tag(),
                "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
            ) {
                return Err(CsrError::WrongPemLabel {
                    found: block.tag().to_owned(),
                });
            }
            Self::from_der(block.contents())
        } else {
            Self::from_der(bytes)
        }
    }

    fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.is_empty() {
            return Err(CsrError::Empty);
        }
        let (rest, req) =
            X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingBytes(rest.len()));
        }
        let spki = &req.certification_request_info.subject_pki;
        let kind = key_kind(spki)?;
        req.verify_signature()
            .map_err(|e| CsrError::BadSignature(e.to_string()))?;
        Ok(Self {
            spki_der: spki.raw.to_vec(),
            kind,
        })
    }

    /// The DER SubjectPublicKeyInfo to certify.
    pub fn public_key_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    bytes[start..].starts_with(b"-----BEGIN")
}

fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC without a named curve".into()))?;
        if curve == OID_EC_P256 {
            Ok(KeyKind::EcdsaP256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(KeyKind::EcdsaP384)
        } else {
            Err(CsrError::UnsupportedKey(format!("EC curve {curve}")))
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = spki
            .parsed()
            .map_err(|e| CsrError::Der(format!("RSA public key: {e}")))?
            .key_size();
        if bits < MIN_RSA_BITS {
            Err(CsrError::RsaTooSmall { bits })
        } else {
            Ok(KeyKind::Rsa { bits })
        }
    } else {
        let name = x509_parser::oid_registry::OidRegistry::default()
            .with_all_crypto()
            .get(alg)
            .map(|e| e.sn().to_owned())
            .unwrap_or_else(|| alg.to_id_string());
        Err(CsrError::UnsupportedKey(name))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    pub(crate) fn csr_pem_for(key: &KeyPair) -> String {
        CertificateParams::new(vec!["ignored.example.com".to_owned()])
            .expect("params")
            .serialize_request(key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    /// Built into the test binary, so it does not depend on where the source tree was when it
    /// was compiled.
    fn fixture(name: &str) -> &'static [u8] {
        match name {
            "rsa2048.csr" => include_bytes!("../tests/fixtures/rsa2048.csr"),
            "rsa1024.csr" => include_bytes!("../tests/fixtures/rsa1024.csr"),
            "secp256k1.csr" => include_bytes!("../tests/fixtures/secp256k1.csr"),
            other => panic!("no fixture {other}"),
        }
    }

    #[test]
    fn accepts_p256_pem_and_der_and_keeps_only_the_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let pem = csr_pem_for(&key);
        let csr = Csr::parse(pem.as_bytes()).expect("valid P-256 CSR");
        assert_eq!(csr.key_kind(), KeyKind::EcdsaP256);
        assert_eq!(
            csr.public_key_der(),
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        let der = pem::parse(&pem).expect("pem").into_contents();
        let from_der = Csr::parse(&der).expect("valid DER CSR");
        assert_eq!(from_der.public_key_der(), csr.public_key_der());
    }

    #[test]
    fn accepts_p384() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let csr = Csr::parse(csr_pem_for(&key).as_bytes()).expect("valid P-384 CSR");
        assert_eq!(csr.key_kind(), KeyKind::EcdsaP384);
    }

    #[test]
    fn accepts_rsa_2048_and_refuses_rsa_1024() {
        let csr = Csr::parse(fixture("rsa2048.csr")).expect("valid RSA-2048 CSR");
        assert_eq!(csr.key_kind(), KeyKind::Rsa { bits: 2048 });
        let err = Csr::parse(fixture("rsa1024.csr")).expect_err("RSA-1024 is too small");
        assert_eq!(err, CsrError::RsaTooSmall { bits: 1024 });
    }

    #[test]
    fn refuses_ed25519_and_other_curves() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let err = Csr::parse(csr_pem_for(&key).as_bytes()).expect_err("ed25519");
        assert!(
            matches!(err, CsrError::UnsupportedKey(ref k) if k.contains("ED25519") || k.contains("1.3.101.112")),
            "{err}"
        );
        let err = Csr::parse(fixture("secp256k1.csr")).expect_err("secp256k1");
        assert!(
            matches!(err, CsrError::UnsupportedKey(ref k) if k.starts_with("EC curve")),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_tampered_request() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut der = pem::parse(csr_pem_for(&key)).expect("pem").into_contents();
        // Change one byte of the requested SAN ("ignored.example.com") so the signature no
        // longer covers what is there.
        let at = der
            .windows(7)
            .position(|w| w == b"ignored")
            .expect("SAN bytes are in the request");
        der[at] = b'J';
        let err = Csr::parse(&der).expect_err("tampered");
        assert!(matches!(err, CsrError::BadSignature(_)), "{err}");
    }

    #[test]
    fn refuses_a_request_signed_by_another_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut der = pem::parse(csr_pem_for(&key)).expect("pem").into_contents();
        // Swap the public key for another of the same length: the signature no longer matches.
        let (mine, theirs) = (
            key.public_key_raw().to_vec(),
            other.public_key_raw().to_vec(),
        );
        let at = der
            .windows(mine.len())
            .position(|w| w == mine)
            .expect("key in CSR");
        der[at..at + mine.len()].copy_from_slice(&theirs);
        assert!(matches!(Csr::parse(&der), Err(CsrError::BadSignature(_))));
    }

    #[test]
    fn refuses_oversized_empty_and_garbage() {
        assert_eq!(
            Csr::parse(&vec![b'A'; MAX_CSR_BYTES + 1]),
            Err(CsrError::TooLarge {
                len: MAX_CSR_BYTES + 1
            })
        );
        assert_eq!(Csr::parse(b""), Err(CsrError::Empty));
        assert!(matches!(Csr::parse(b"hello, CA"), Err(CsrError::Der(_))));
        assert!(matches!(
            Csr::parse(
                b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(CsrError::Pem(_))
        ));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = CertificateParams::default()
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            Csr::parse(cert.pem().as_bytes()).expect_err("a certificate is not a CSR"),
            CsrError::WrongPemLabel {
                found: "CERTIFICATE".into()
            }
        );
        let mut der = pem::parse(csr_pem_for(&key)).expect("pem").into_contents();
        der.extend_from_slice(b"xx");
        assert_eq!(Csr::parse(&der), Err(CsrError::TrailingBytes(2)));
    }
}
