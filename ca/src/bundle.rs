//! The trust bundle: the roots a peer must trust to verify SVIDs of this trust domain, as PEM
//! and as a SPIFFE bundle (a JWKS with `spiffe_sequence` and `spiffe_refresh_hint`, per the
//! SPIFFE Trust Domain and Bundle standard).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::authority::to_pem;
use crate::spiffe::TrustDomain;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("root {index} is not valid DER X.509: {reason}")]
    Der { index: usize, reason: String },
    #[error("root {index} has a key type a JWK cannot describe here: {kind}")]
    UnsupportedKey { index: usize, kind: String },
}

/// The roots of one trust domain at one point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// Oldest first. During a root rotation this holds both roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Increases every time `roots` changes.
    pub sequence: u64,
    /// How often consumers should poll for a new bundle.
    pub refresh_hint: Duration,
}

impl TrustBundle {
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| to_pem("CERTIFICATE", r))
            .collect()
    }

    pub fn roots_pem(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|r| to_pem("CERTIFICATE", r))
            .collect()
    }

    /// The SPIFFE bundle: one `x509-svid` JWK per root, each carrying the root in `x5c`.
    pub fn to_spiffe_json(&self) -> Result<String, BundleError> {
        let keys = self
            .roots
            .iter()
            .enumerate()
            .map(|(index, der)| jwk(index, der))
            .collect::<Result<Vec<_>, _>>()?;
        let doc = serde_json::json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint.as_secs(),
        });
        Ok(serde_json::to_string_pretty(&doc).expect("a JSON value always serialises"))
    }
}

fn jwk(index: usize, der: &CertificateDer<'_>) -> Result<serde_json::Value, BundleError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| BundleError::Der {
        index,
        reason: e.to_string(),
    })?;
    let spki = cert.public_key();
    let unsupported = |kind: String| BundleError::UnsupportedKey { index, kind };
    let x5c = [STANDARD.encode(der.as_ref())];
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let (crv, len) = match curve {
                Some(c) if c == OID_EC_P256 => ("P-256", 32),
                Some(c) if c == OID_NIST_EC_P384 => ("P-384", 48),
                other => return Err(unsupported(format!("EC curve {other:?}"))),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(unsupported("compressed or malformed EC point".into()));
            }
            Ok(serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&data[1..=len]),
                "y": URL_SAFE_NO_PAD.encode(&data[1 + len..]),
                "x5c": x5c,
            }))
        }
        Ok(PublicKey::RSA(rsa)) => Ok(serde_json::json!({
            "use": "x509-svid",
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(strip_zeros(rsa.modulus)),
            "e": URL_SAFE_NO_PAD.encode(strip_zeros(rsa.exponent)),
            "x5c": x5c,
        })),
        Ok(_) => Err(unsupported(spki.algorithm.algorithm.to_id_string())),
        Err(e) => Err(unsupported(e.to_string())),
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::new_root;

    #[test]
    fn spiffe_bundle_has_one_x509_svid_jwk_per_root() {
        let td = TrustDomain::parse("cluster.local").expect("td");
        let (key, root) = new_root(&td, Duration::from_secs(3600));
        let (_, root2) = new_root(&td, Duration::from_secs(3600));
        let bundle = TrustBundle {
            trust_domain: td,
            roots: vec![root.clone(), root2],
            sequence: 7,
            refresh_hint: Duration::from_secs(300),
        };
        let doc: serde_json::Value =
            serde_json::from_str(&bundle.to_spiffe_json().expect("json")).expect("parse");
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2);
        let k = &keys[0];
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        let x = URL_SAFE_NO_PAD
            .decode(k["x"].as_str().expect("x"))
            .expect("b64");
        let y = URL_SAFE_NO_PAD
            .decode(k["y"].as_str().expect("y"))
            .expect("b64");
        let raw = rcgen::PublicKeyData::der_bytes(&key).to_vec();
        assert_eq!(
            [&[4u8][..], &x, &y].concat(),
            raw,
            "x and y are the root's key"
        );
        let x5c = STANDARD
            .decode(k["x5c"][0].as_str().expect("x5c"))
            .expect("b64");
        assert_eq!(x5c, root.as_ref());
        assert_eq!(bundle.to_pem().matches("BEGIN CERTIFICATE").count(), 2);
    }
}
