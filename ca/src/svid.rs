//! The X.509-SVID profile: what a workload certificate contains, and how a peer's SPIFFE ID is
//! read back out of one.
//!
//! Leaf profile (SPIFFE X509-SVID standard, DESIGN.md "Identity"): empty subject, exactly one
//! URI SAN (critical because the subject is empty), `cA=false`, critical key usage with
//! `digitalSignature` only, EKU `serverAuth`+`clientAuth`, subject and authority key
//! identifiers, and a random positive 128-bit serial. Which identity goes in is decided by the
//! caller's authorisation, never here.

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not a usable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER X.509: {0}")]
    Der(String),
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("certificate's URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(SpiffeIdError),
    #[error("certificate is a CA (cA=true); an X.509-SVID leaf must not be")]
    IsCa,
}

/// A random, positive serial of 16 bytes (126 random bits), as RFC 5280 and CA/B practice ask.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG does not fail on Linux once booted");
    // Clear the sign bit (positive) and set the next one (no leading zero byte to trim), so every
    // serial encodes in exactly 16 bytes.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The parameters of a leaf X.509-SVID for `id`, valid from `not_before` to `not_after`.
pub fn leaf_params(
    id: &SpiffeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical, as RFC 5280 requires.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.as_str().try_into().expect(
            "a parsed SPIFFE ID is ASCII and so a valid IA5String",
        ))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

/// Reads the SPIFFE ID of an X.509-SVID leaf: exactly one URI SAN that parses as a SPIFFE ID,
/// and not a CA. Chain validation is the caller's (rustls/webpki) job.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let (_, x509) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| SvidError::Der(e.to_string()))?;
    spiffe_id_of_parsed(&x509)
}

pub(crate) fn spiffe_id_of_parsed(x509: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    if x509.is_ca() {
        return Err(SvidError::IsCa);
    }
    let mut uris = Vec::new();
    for ext in x509.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(SvidError::BadSpiffeId),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{Issuer, KeyPair};
    use x509_parser::extensions::ParsedExtension as P;
    use x509_parser::oid_registry::{
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
    };

    fn issue(id: &str) -> Vec<u8> {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().expect("key");
        let now = OffsetDateTime::now_utc();
        let params = leaf_params(
            &SpiffeId::parse(id).expect("id"),
            now,
            now + time::Duration::hours(1),
        );
        params
            .signed_by(&leaf_key, &issuer)
            .expect("sign")
            .der()
            .to_vec()
    }

    #[test]
    fn leaf_follows_the_x509_svid_profile() {
        let der = issue("spiffe://cluster.local/ns/a/sa/b");
        let (_, cert) = X509Certificate::from_der(&der).expect("parse");
        assert!(cert.subject().iter().next().is_none(), "subject is empty");
        let exts = cert.extensions_map().expect("no duplicate extensions");

        let san = exts[&OID_X509_EXT_SUBJECT_ALT_NAME];
        assert!(san.critical, "SAN is critical because the subject is empty");
        let P::SubjectAlternativeName(names) = san.parsed_extension() else {
            panic!("SAN does not parse")
        };
        assert_eq!(
            names.general_names,
            [GeneralName::URI("spiffe://cluster.local/ns/a/sa/b")],
            "exactly one URI SAN and nothing else"
        );

        let bc = exts[&OID_X509_EXT_BASIC_CONSTRAINTS];
        let P::BasicConstraints(bc) = bc.parsed_extension() else {
            panic!("basicConstraints")
        };
        assert!(!bc.ca, "cA=false");

        let ku = exts[&OID_X509_EXT_KEY_USAGE];
        assert!(ku.critical, "key usage is critical");
        let P::KeyUsage(ku) = ku.parsed_extension() else {
            panic!("key usage")
        };
        assert!(ku.digital_signature());
        assert_eq!(
            ku.flags, 1,
            "digitalSignature only: no keyCertSign, cRLSign or others"
        );

        let P::ExtendedKeyUsage(eku) = exts[&OID_X509_EXT_EXTENDED_KEY_USAGE].parsed_extension()
        else {
            panic!("eku")
        };
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && !eku.email_protection && eku.other.is_empty());

        assert!(exts.contains_key(&OID_X509_EXT_SUBJECT_KEY_IDENTIFIER));
        assert!(exts.contains_key(&OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER));

        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 16);
        assert!(
            serial[0] & 0x80 == 0 && serial[0] != 0,
            "positive, no padding"
        );
        assert_eq!(
            spiffe_id_of(&CertificateDer::from(der.as_slice()))
                .expect("svid")
                .as_str(),
            "spiffe://cluster.local/ns/a/sa/b"
        );
    }

    #[test]
    fn serials_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(random_serial().to_bytes()));
        }
    }

    #[test]
    fn spiffe_id_of_refuses_certs_that_are_not_svids() {
        let key = KeyPair::generate().expect("key");
        let mut two = CertificateParams::default();
        two.subject_alt_names = vec![
            SanType::URI("spiffe://td/a".try_into().expect("ia5")),
            SanType::URI("spiffe://td/b".try_into().expect("ia5")),
        ];
        let cert = two.self_signed(&key).expect("cert");
        assert_eq!(spiffe_id_of(cert.der()), Err(SvidError::UriSanCount(2)));

        let none = CertificateParams::new(vec!["example.com".to_owned()]).expect("params");
        let cert = none.self_signed(&key).expect("cert");
        assert_eq!(spiffe_id_of(cert.der()), Err(SvidError::UriSanCount(0)));

        let mut bad = CertificateParams::default();
        bad.subject_alt_names = vec![SanType::URI("spiffe://td/a/".try_into().expect("ia5"))];
        let cert = bad.self_signed(&key).expect("cert");
        assert_eq!(
            spiffe_id_of(cert.der()),
            Err(SvidError::BadSpiffeId(SpiffeIdError::TrailingSlash))
        );

        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.subject_alt_names = vec![SanType::URI("spiffe://td".try_into().expect("ia5"))];
        let cert = ca.self_signed(&key).expect("cert");
        assert_eq!(spiffe_id_of(cert.der()), Err(SvidError::IsCa));

        assert!(matches!(
            spiffe_id_of(&CertificateDer::from(&b"junk"[..])),
            Err(SvidError::Der(_))
        ));
    }
}
