//! TLS at the Gateway's HTTPS ports: `kubernetes.io/tls` Secrets as certified keys, and one
//! rustls configuration per port, built when the state changes, choosing among the listeners'
//! certificates by SNI. TLS 1.3 and 1.2 with the ring
//! provider's suites, which are all AEAD with ECDHE; ALPN `h2` and `http/1.1`. rustls does not
//! renegotiate.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::model::{Certificate, Listener, Port, Resources, ns_of};
use super::routes::specificity;

/// A certificate's DNS names and its key.
type NamedKey = (Vec<String>, Arc<CertifiedKey>);

/// Picks the certificate for an SNI among a port's listeners: the most specific listener
/// hostname that covers the name, then a certificate valid for it (or that listener's first).
#[derive(Debug)]
struct SniResolver {
    /// (listener hostname, its certificates).
    listeners: Vec<(Option<String>, Vec<NamedKey>)>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        pick(
            self.listeners
                .iter()
                .map(|(host, certs)| (host.as_deref(), certs.as_slice())),
            sni.as_deref(),
        )
    }
}

/// The certificate a name selects among `(listener hostname, certificates)`: the most specific
/// listener hostname that covers it, then a certificate valid for it (or that listener's first).
fn pick<'a>(
    listeners: impl Iterator<Item = (Option<&'a str>, &'a [NamedKey])>,
    name: Option<&str>,
) -> Option<Arc<CertifiedKey>> {
    let mut listeners = listeners.peekable();
    let certs = match name {
        None => listeners.next()?.1,
        Some(name) => {
            listeners
                .filter_map(|l| Some((specificity(l.0, name)?, l)))
                .max_by_key(|(score, _)| *score)?
                .1
                .1
        }
    };
    name.and_then(|name| {
        certs
            .iter()
            .find(|(names, _)| names.iter().any(|n| specificity(Some(n), name).is_some()))
    })
    .or_else(|| certs.first())
    .map(|(_, k)| k.clone())
}

/// The certificate the TLS handshake would present for `name` on a port with these listeners.
pub fn certificate_for(listeners: &[Listener], name: Option<&str>) -> Option<Arc<CertifiedKey>> {
    let named: Vec<(Option<&str>, Vec<NamedKey>)> = listeners
        .iter()
        .map(|l| {
            let keys = l
                .certificates
                .iter()
                .map(|c| (c.names.clone(), c.key.clone()))
                .collect();
            (l.hostname.as_deref(), keys)
        })
        .collect();
    pick(named.iter().map(|(h, k)| (*h, k.as_slice())), name)
}

/// The TLS configuration of an HTTPS port.
pub fn config(port: &Port) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let resolver = SniResolver {
        listeners: port
            .listeners
            .iter()
            .map(|l| {
                (
                    l.hostname.clone(),
                    l.certificates
                        .iter()
                        .map(|c| (c.names.clone(), c.key.clone()))
                        .collect(),
                )
            })
            .collect(),
    };
    // ring's default suites are all AEAD (AES-GCM, ChaCha20-Poly1305) with ECDHE.
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A `kubernetes.io/tls` Secret as a rustls certified key.
pub(super) fn certificate(res: &Resources, ns: &str, name: &str) -> Result<Certificate, String> {
    let secret = res
        .secrets
        .iter()
        .find(|s| ns_of(&s.metadata) == ns && s.metadata.name.as_deref() == Some(name))
        .ok_or_else(|| format!("Secret {ns}/{name} not found"))?;
    let field = |key: &str| -> Result<Vec<u8>, String> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.as_bytes().to_vec())
            })
            .ok_or_else(|| format!("Secret {ns}/{name} has no {key}"))
    };
    let (crt, key) = (field("tls.crt")?, field("tls.key")?);
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> = pem::parse_many(&crt)
        .map_err(|e| format!("Secret {ns}/{name}: tls.crt: {e}"))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| rustls_pki_types::CertificateDer::from(p.into_contents()))
        .collect();
    let leaf = chain
        .first()
        .ok_or_else(|| format!("Secret {ns}/{name}: tls.crt holds no certificate"))?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(
        pem::parse(&key)
            .map_err(|e| format!("Secret {ns}/{name}: tls.key: {e}"))?
            .into_contents(),
    )
    .map_err(|e| format!("Secret {ns}/{name}: tls.key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("Secret {ns}/{name}: tls.key: {e}"))?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified
        .keys_match()
        .map_err(|e| format!("Secret {ns}/{name}: tls.key does not match tls.crt: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("Secret {ns}/{name}: tls.crt: {e}"))?;
    let names = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Certificate {
        secret: format!("{ns}/{name}"),
        names,
        key: Arc::new(certified),
    })
}
