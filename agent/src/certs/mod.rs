//! Workload certificates: for each identity with a workload on this node, an ECDSA P-256 key
//! that never leaves the agent, a CSR, and an X.509-SVID from the CA (`CreateCertificate` with
//! `ImpersonatedIdentity`, as ztunnel asks). The returned SAN and key are checked; certificates
//! rotate at half-life with jitter, failures retry with backoff, and the old certificate stays in
//! use until its replacement arrives.
//!
//! The trust bundle is followed too ([`BundleFollower`]): a root rotation adds the new root to
//! the CA's bundle an overlap window before it signs, and the agent must trust it by then, both
//! for peers' SVIDs and for the CA's own serving certificate.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a key for {id}: {reason}")]
    Key { id: SpiffeId, reason: String },
    #[error("the CA refused {id}: {status}")]
    Refused { id: SpiffeId, status: tonic::Status },
    #[error("the CA's answer for {id} is unusable: {reason}")]
    BadAnswer { id: SpiffeId, reason: String },
}

/// A certificate in force for one identity.
#[derive(Debug, Clone)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first; the root is left out (peers have it).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When it arrived. `not_before` is backdated by the CA for clock skew, so renewal counts
    /// from here.
    pub fetched_at: SystemTime,
    /// Chain and signing key as rustls serves them, built once rather than per handshake.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl WorkloadCert {
    /// When to ask for the next one: half of the lifetime left when it arrived, moved by up to
    /// ±10 % of that lifetime so a node's certificates do not all renew at once.
    pub fn renew_at(&self, jitter: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.fetched_at)
            .unwrap_or_default();
        let half = life / 2;
        let shift = life.mul_f64(0.1 * jitter.clamp(-1.0, 1.0).abs());
        if jitter < 0.0 {
            self.fetched_at + half - shift
        } else {
            self.fetched_at + half + shift
        }
    }
}

/// Asks the CA for one certificate and checks what comes back.
pub async fn fetch(
    client: &mut CaClient,
    id: &SpiffeId,
    impersonate: bool,
    ttl: Duration,
) -> Result<WorkloadCert, CertError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
        CertError::Key {
            id: id.clone(),
            reason: e.to_string(),
        }
    })?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CertError::Key {
            id: id.clone(),
            reason: e.to_string(),
        })?;
    let chain_pem = client
        .create_certificate(&csr, ttl, impersonate.then_some(id))
        .await
        .map_err(|status| CertError::Refused {
            id: id.clone(),
            status,
        })?;
    let bad = |reason: String| CertError::BadAnswer {
        id: id.clone(),
        reason,
    };
    let mut chain = Vec::new();
    for pem in &chain_pem {
        let block = pem::parse(pem).map_err(|e| bad(format!("PEM: {e}")))?;
        chain.push(CertificateDer::from(block.into_contents()));
    }
    let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
    let got = signet_ca::svid::spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
    if &got != id {
        return Err(bad(format!("the certificate is for {got}")));
    }
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| bad(e.to_string()))?;
    if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(bad("the certificate does not carry our public key".into()));
    }
    let to_time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let (not_before, not_after) = (
        to_time(x509.validity().not_before),
        to_time(x509.validity().not_after),
    );
    let serial = x509.raw_serial_as_string();
    if chain.len() > 1 {
        chain.pop(); // the root
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| CertError::Key {
            id: id.clone(),
            reason: e.to_string(),
        })?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain.clone(), signing));
    Ok(WorkloadCert {
        id: id.clone(),
        chain,
        key: Arc::new(key),
        serial,
        not_before,
        not_after,
        fetched_at: SystemTime::now(),
        certified,
    })
}

/// Where one identity's certificate stands.
#[derive(Debug, Clone)]
pub enum CertState {
    /// Asked for, not answered yet.
    Initializing,
    /// In force; `last_error` when the latest renewal failed (the certificate stays in force).
    Available {
        cert: Arc<WorkloadCert>,
        last_error: Option<String>,
    },
    /// Every request so far failed; the latest failure.
    Unavailable(String),
}

/// Keeps a certificate fresh for every identity it is told about.
#[derive(Clone)]
pub struct CertManager {
    /// Replaced when the trust bundle changes (the CA's certificate may chain to a new root).
    client: Arc<RwLock<CaClient>>,
    /// The agent's own identity is asked for without impersonation.
    agent_identity: SpiffeId,
    ttl: Duration,
    certs: Arc<RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>>,
    tasks: Arc<RwLock<HashMap<SpiffeId, CancellationToken>>>,
    /// The last failure of each identity's latest request, until one succeeds.
    errors: Arc<RwLock<HashMap<SpiffeId, String>>>,
    /// Rotation tasks start here; each also ends when the agent stops.
    drain: crate::drain::Drain,
    /// Renewal times are on it.
    clock: Clock,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("agent_identity", &self.agent_identity)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    pub fn new(
        client: CaClient,
        agent_identity: SpiffeId,
        ttl: Duration,
        drain: crate::drain::Drain,
    ) -> Self {
        Self {
            client: Arc::new(RwLock::new(client)),
            agent_identity,
            ttl,
            certs: Arc::default(),
            tasks: Arc::default(),
            errors: Arc::default(),
            drain,
            clock: Clock::system(),
        }
    }

    /// The same manager timing renewals on `clock` (tests move it instead of sleeping).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The CA client every request goes through.
    pub fn client(&self) -> CaClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends every request from now on through `client`.
    pub fn set_client(&self, client: CaClient) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    }

    /// The certificate in force for `id`, if one has arrived.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Whether every identity in `ids` has a certificate (readiness).
    pub fn ready<'a>(&self, ids: impl IntoIterator<Item = &'a SpiffeId>) -> bool {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        ids.into_iter().all(|id| certs.contains_key(id))
    }

    /// The identities in `ids` still waiting for a certificate.
    pub fn missing<'a>(&self, ids: impl IntoIterator<Item = &'a SpiffeId>) -> Vec<SpiffeId> {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        ids.into_iter()
            .filter(|id| !certs.contains_key(*id))
            .cloned()
            .collect()
    }

    /// (identity, notAfter in Unix seconds) of every certificate in force, for the metrics.
    pub fn expiries(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| {
                let t = c
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                (c.id.to_string(), t)
            })
            .collect();
        v.sort();
        v
    }

    /// Every managed identity and where its certificate stands, sorted by identity.
    pub fn states(&self) -> Vec<(SpiffeId, CertState)> {
        let tasks = self.tasks.read().unwrap_or_else(|p| p.into_inner());
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        let errors = self.errors.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(SpiffeId, CertState)> = tasks
            .keys()
            .map(|id| {
                let state = match (certs.get(id), errors.get(id)) {
                    (Some(c), error) => CertState::Available {
                        cert: c.clone(),
                        last_error: error.cloned(),
                    },
                    (None, Some(e)) => CertState::Unavailable(e.clone()),
                    (None, None) => CertState::Initializing,
                };
                (id.clone(), state)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Makes the set of managed identities exactly `ids`: starts a rotation task for each new one
    /// and stops (and forgets) the ones no longer wanted.
    pub fn set_identities(&self, ids: &[SpiffeId]) {
        let mut tasks = self.tasks.write().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|id, token| {
            let keep = ids.contains(id);
            if !keep {
                token.cancel();
                self.certs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                self.errors
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
            }
            keep
        });
        for id in ids {
            if tasks.contains_key(id) {
                continue;
            }
            let token = self.drain.stop_token().child_token();
            tasks.insert(id.clone(), token.clone());
            self.drain.spawn(
                "certificate rotation",
                self.clone().rotate(id.clone(), token),
            );
        }
    }

    /// Fetches, stores, sleeps until the renewal time; on failure retries with capped
    /// exponential backoff while the current certificate (if any) stays in force.
    async fn rotate(self, id: SpiffeId, stop: CancellationToken) {
        let impersonate = id != self.agent_identity;
        let mut backoff = Duration::from_millis(500);
        loop {
            let mut client = self.client();
            let wait = match fetch(&mut client, &id, impersonate, self.ttl).await {
                Ok(cert) => {
                    backoff = Duration::from_millis(500);
                    let renew = cert.renew_at(jitter());
                    tracing::info!(identity = %id, serial = %cert.serial, "certificate loaded");
                    self.errors
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    self.certs
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), Arc::new(cert));
                    // How long until then, slept on the manager's clock.
                    renew
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                }
                Err(e) => {
                    tracing::warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate request failed");
                    self.errors
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), e.to_string());
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.clock.sleep(wait) => {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("the CA's trust bundle request failed: {0}")]
    Refused(tonic::Status),
    #[error("the CA sent a bundle for trust domain `{found}`, not `{expected}`")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("the CA's trust bundle is unusable: {0}")]
    Bad(String),
    #[error("reconnecting to the CA with the new bundle: {0}")]
    Reconnect(#[from] signet_ca::client::ClientError),
}

/// How to reach the CA again with other roots.
#[derive(Debug, Clone)]
pub struct CaEndpoint {
    pub address: String,
    pub server_name: String,
    pub token: String,
    pub token_file: Option<std::path::PathBuf>,
}

impl From<&crate::config::CaConfig> for CaEndpoint {
    fn from(ca: &crate::config::CaConfig) -> Self {
        Self {
            address: ca.address.clone(),
            server_name: ca.server_name.clone(),
            token: ca.token.clone(),
            token_file: Some(ca.token_file.clone()),
        }
    }
}

/// The CA connection of the `ca` section, the certificate manager over it, and the configured
/// trust roots.
pub async fn connect(
    config: &crate::config::AgentConfig,
    drain: &crate::drain::Drain,
) -> anyhow::Result<(CertManager, signet_ca::verify::SvidRoots)> {
    use anyhow::Context as _;
    let roots_der: Vec<CertificateDer<'static>> = pem::parse_many(&config.ca.root_pem)
        .context("CA root PEM")?
        .into_iter()
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    let roots = signet_ca::verify::SvidRoots::new(config.trust_domain.clone(), &roots_der)?;
    let ca = CaClient::connect(
        &config.ca.address,
        &config.ca.server_name,
        &config.ca.root_pem,
        &config.ca.token,
    )
    .await
    .context("connecting to the CA")?
    .with_token_file(config.ca.token_file.clone());
    let certs = CertManager::new(
        ca,
        config.agent_identity.clone(),
        config.ca.svid_ttl,
        drain.clone(),
    );
    Ok((certs, roots))
}

/// Keeps the agent's trust roots equal to the CA's bundle. The bundle is fetched over the CA
/// connection, which the roots in force authenticate, so only the CA can change them.
#[derive(Debug, Clone)]
pub struct BundleFollower {
    pub endpoint: CaEndpoint,
    pub certs: CertManager,
    pub roots: signet_ca::verify::SvidRoots,
    pub trust_domain: signet_ca::TrustDomain,
    /// The roots the CA client was last connected with.
    client_roots: Arc<RwLock<Vec<CertificateDer<'static>>>>,
}

impl BundleFollower {
    pub fn new(
        endpoint: CaEndpoint,
        certs: CertManager,
        roots: signet_ca::verify::SvidRoots,
        trust_domain: signet_ca::TrustDomain,
    ) -> Self {
        let client_roots = Arc::new(RwLock::new(roots.roots()));
        Self {
            endpoint,
            certs,
            roots,
            trust_domain,
            client_roots,
        }
    }

    /// Fetches the bundle once and puts it in force: for peers at once, for the CA connection
    /// by reconnecting. Returns whether anything changed. On any error the roots in force stay.
    pub async fn refresh(&self) -> Result<bool, BundleError> {
        let bundle = self
            .certs
            .client()
            .trust_bundle()
            .await
            .map_err(BundleError::Refused)?;
        if bundle.trust_domain != self.trust_domain.as_str() {
            return Err(BundleError::ForeignTrustDomain {
                found: bundle.trust_domain,
                expected: self.trust_domain.to_string(),
            });
        }
        let mut ders = Vec::with_capacity(bundle.roots_pem.len());
        for (i, text) in bundle.roots_pem.iter().enumerate() {
            let block = pem::parse(text).map_err(|e| BundleError::Bad(format!("root {i}: {e}")))?;
            ders.push(CertificateDer::from(block.into_contents()));
        }
        let changed = self
            .roots
            .replace(&ders)
            .map_err(|e| BundleError::Bad(e.to_string()))?;
        if changed {
            tracing::info!(
                sequence = bundle.sequence,
                roots = ders.len(),
                "trust bundle updated"
            );
        }
        let reconnect = *self.client_roots.read().unwrap_or_else(|p| p.into_inner()) != ders;
        if reconnect {
            let e = &self.endpoint;
            let mut client = CaClient::connect(
                &e.address,
                &e.server_name,
                &bundle.roots_pem.concat(),
                &e.token,
            )
            .await?;
            if let Some(path) = &e.token_file {
                client = client.with_token_file(path.clone());
            }
            self.certs.set_client(client);
            *self.client_roots.write().unwrap_or_else(|p| p.into_inner()) = ders;
        }
        Ok(changed || reconnect)
    }

    /// Refreshes every `every` until `stop`.
    pub async fn run(self, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "trust bundle refresh failed; the roots in force stay");
            }
        }
    }
}

/// A value in [-1, 1] from the clock's sub-second noise: enough to spread renewals.
fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 2001) / 1000.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_certified() -> Arc<rustls::sign::CertifiedKey> {
        let key = rcgen::KeyPair::generate().expect("key");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).expect("signing key");
        Arc::new(rustls::sign::CertifiedKey::new(vec![], signing))
    }

    #[test]
    fn renewal_is_at_half_the_remaining_life_with_bounded_jitter() {
        let now = SystemTime::now();
        let cert = WorkloadCert {
            id: SpiffeId::parse("spiffe://td/ns/a/sa/b").expect("id"),
            chain: vec![],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![]))),
            serial: String::new(),
            // Backdated by a minute, as the CA does.
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
            fetched_at: now,
            certified: test_certified(),
        };
        assert_eq!(cert.renew_at(0.0), now + Duration::from_secs(1800));
        assert_eq!(cert.renew_at(1.0), now + Duration::from_secs(1800 + 360));
        assert_eq!(cert.renew_at(-1.0), now + Duration::from_secs(1800 - 360));
        for _ in 0..100 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
    }
}
