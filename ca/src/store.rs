//! Where the CA's keys come from and how they are kept: generated on first start and persisted
//! in a state directory (with root rotation), or plugged in from Istio-style `cacerts` files.
//!
//! Files holding keys are written atomically (temp file, fsync, rename, fsync of the directory)
//! with mode 0600, and a key file that others can read is refused rather than used.

use std::fs;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::authority::{CaCertError, Signer, to_pem};
use crate::spiffe::TrustDomain;

/// Why CA material could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: key file is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(transparent)]
    Cert(#[from] CaCertError),
    #[error(
        "{path}: this state directory belongs to trust domain {found}, not {expected}; use another directory"
    )]
    TrustDomainMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("a root rotation is already in progress (root {id} starts signing at {at})")]
    RotationInProgress { id: u32, at: OffsetDateTime },
    #[error("CA material from {0} is managed outside Signet; rotate it by replacing the files")]
    ExternallyManaged(PathBuf),
    #[error("state directory {path} has no usable root: {reason}")]
    NoRoot { path: PathBuf, reason: String },
    #[error("generating a key failed: {0}")]
    KeyGen(rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` atomically (see [`crate::files::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    crate::files::write_atomic(path, data, mode).map_err(|e| StoreError::Io {
        path: e.path,
        source: e.source,
    })
}

/// Reads a private key file, refusing it when group or others may read it.
pub fn read_key_file(path: &Path) -> Result<KeyPair, StoreError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    KeyPair::from_pem(&pem).map_err(|e| StoreError::Parse {
        path: path.to_owned(),
        reason: format!(
            "not a PKCS#8 PEM private key ({e}); convert with `openssl pkcs8 -topk8 -nocrypt`"
        ),
    })
}

/// Reads every certificate in a PEM file, in order.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let blocks = pem::parse_many(&data).map_err(|e| StoreError::Parse {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(StoreError::Parse {
            path: path.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Lifetimes of the CA's own certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootPolicy {
    /// Validity of a generated root.
    pub root_ttl: Duration,
    /// How long a new root sits in the bundle before it signs, so every peer has it first.
    pub overlap: Duration,
    /// The longest SVID the CA issues: an old root stays in the bundle this long after it
    /// stopped signing, so every SVID it signed expires before peers forget it.
    pub max_svid_ttl: Duration,
    /// Give each new root an intermediate that does the signing, so the root key signs only
    /// twice in its life (itself and the intermediate).
    pub intermediate: bool,
}

impl RootPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.overlap + self.max_svid_ttl >= self.root_ttl / 2 {
            return Err(format!(
                "root TTL {:?} must exceed twice the rotation overlap {:?} plus the maximum SVID TTL {:?}",
                self.root_ttl, self.overlap, self.max_svid_ttl
            ));
        }
        Ok(())
    }
}

/// One root as recorded in `ca-state.json`. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RootRecord {
    pub id: u32,
    /// From this time on (and until a newer root's `signing_from`) this root signs.
    pub signing_from: i64,
    /// Set once a newer root signs; the root leaves the bundle at this time.
    pub retire_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StateFile {
    version: u32,
    trust_domain: String,
    sequence: u64,
    roots: Vec<RootRecord>,
}

/// What changed in one `maintain` step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub promoted: Option<u32>,
    pub retired: Vec<u32>,
    pub started_rotation: Option<u32>,
}

impl Maintenance {
    pub fn changed(&self) -> bool {
        self.promoted.is_some() || !self.retired.is_empty() || self.started_rotation.is_some()
    }
}

/// A generated root with its key, loaded from the state directory.
#[derive(Debug)]
struct LoadedRoot {
    record: RootRecord,
    cert: CertificateDer<'static>,
    signer: std::sync::Arc<Signer>,
}

/// The CA's roots in a state directory: generated, persisted, rotated.
#[derive(Debug)]
pub struct RootStore {
    dir: PathBuf,
    trust_domain: TrustDomain,
    policy: RootPolicy,
    sequence: u64,
    roots: Vec<LoadedRoot>,
    /// The state file as this process last read or wrote it.
    last_state: Vec<u8>,
}

/// The state directory's record of its roots and their schedule.
pub const STATE_FILE: &str = "ca-state.json";

impl RootStore {
    /// Opens the state directory, creating the CA (one root, signing at once) if it is new.
    pub fn open_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
        policy: RootPolicy,
        now: OffsetDateTime,
    ) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        let mut store = Self {
            dir: dir.to_owned(),
            trust_domain: trust_domain.clone(),
            policy,
            sequence: 0,
            roots: Vec::new(),
            last_state: Vec::new(),
        };
        let _lock = store.lock()?;
        if store.dir.join(STATE_FILE).exists() {
            store.sync_from_disk()?;
        } else {
            store.add_root(now.unix_timestamp(), now)?;
            store.save()?;
        }
        Ok(store)
    }

    /// Serialises changes between processes sharing the directory (the server and
    /// `signet-ca rotate-root`, say). Released when the returned file is dropped.
    fn lock(&self) -> Result<fs::File, StoreError> {
        let lock_path = self.dir.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        Ok(lock)
    }

    /// Re-reads the state file if another process changed it since this one last read or
    /// wrote it. Called under the lock before every change, so no process overwrites another's.
    fn sync_from_disk(&mut self) -> Result<(), StoreError> {
        let state_path = self.dir.join(STATE_FILE);
        let bytes = fs::read(&state_path).map_err(io_err(&state_path))?;
        if bytes != self.last_state {
            self.load(&state_path, &bytes)?;
        }
        Ok(())
    }

    fn load(&mut self, state_path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let state: StateFile = serde_json::from_slice(bytes).map_err(|e| StoreError::Parse {
            path: state_path.to_owned(),
            reason: e.to_string(),
        })?;
        if state.trust_domain != self.trust_domain.as_str() {
            return Err(StoreError::TrustDomainMismatch {
                path: self.dir.clone(),
                found: state.trust_domain,
                expected: self.trust_domain.to_string(),
            });
        }
        let mut roots = Vec::with_capacity(state.roots.len());
        for record in state.roots {
            let dir = self.root_dir(record.id);
            let cert = read_certs(&dir.join(ROOT_CERT))?.remove(0);
            // Keep the signer already in use for an unchanged root, so `Arc::ptr_eq` on the
            // active signer still means "same root".
            let signer = match self
                .roots
                .iter()
                .find(|r| r.record.id == record.id && r.cert == cert)
            {
                Some(known) => known.signer.clone(),
                None => std::sync::Arc::new(load_signer(&dir, record.id, &cert)?),
            };
            roots.push(LoadedRoot {
                record,
                cert,
                signer,
            });
        }
        if roots.is_empty() {
            return Err(StoreError::NoRoot {
                path: self.dir.clone(),
                reason: format!("{STATE_FILE} lists no roots"),
            });
        }
        self.roots = roots;
        self.sequence = state.sequence;
        self.last_state = bytes.to_vec();
        Ok(())
    }

    fn root_dir(&self, id: u32) -> PathBuf {
        self.dir.join("roots").join(id.to_string())
    }

    fn add_root(&mut self, signing_from: i64, now: OffsetDateTime) -> Result<u32, StoreError> {
        let id = self.roots.iter().map(|r| r.record.id).max().unwrap_or(0) + 1;
        let (key, cert) = generate_root(&self.trust_domain, id, self.policy.root_ttl, now)?;
        let dir = self.root_dir(id);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        if self.policy.intermediate {
            let (int_key, int_cert) = generate_intermediate(
                &self.trust_domain,
                id,
                (&key, &cert),
                self.policy.root_ttl,
                now,
            )?;
            write_atomic(
                &dir.join(INTERMEDIATE_KEY),
                int_key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_atomic(
                &dir.join(INTERMEDIATE_CERT),
                to_pem("CERTIFICATE", &int_cert).as_bytes(),
                0o644,
            )?;
        }
        write_atomic(&dir.join(ROOT_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(
            &dir.join(ROOT_CERT),
            to_pem("CERTIFICATE", &cert).as_bytes(),
            0o644,
        )?;
        let signer = load_signer(&dir, id, &cert)?;
        self.roots.push(LoadedRoot {
            record: RootRecord {
                id,
                signing_from,
                retire_at: None,
            },
            cert,
            signer: std::sync::Arc::new(signer),
        });
        self.sequence += 1;
        Ok(id)
    }

    fn save(&mut self) -> Result<(), StoreError> {
        let state = StateFile {
            version: 1,
            trust_domain: self.trust_domain.to_string(),
            sequence: self.sequence,
            roots: self.roots.iter().map(|r| r.record.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&state).expect("state always serialises");
        write_atomic(&self.dir.join(STATE_FILE), &json, 0o600)?;
        self.last_state = json;
        Ok(())
    }

    /// Picks up what another writer (the CLI, or the Kubernetes Secret's copy) changed on disk,
    /// without changing anything itself. Returns whether something changed.
    ///
    /// Reads every root, not just the state file: a copy replaced by another replica's may
    /// record the same schedule for different keys.
    pub fn reload(&mut self) -> Result<bool, StoreError> {
        let _lock = self.lock()?;
        let (state, roots) = (self.last_state.clone(), self.roots());
        let state_path = self.dir.join(STATE_FILE);
        let bytes = fs::read(&state_path).map_err(io_err(&state_path))?;
        self.load(&state_path, &bytes)?;
        Ok(state != self.last_state || roots != self.roots())
    }

    /// The root that signs at `now`: the newest whose `signing_from` has come.
    pub fn active_signer(&self, now: OffsetDateTime) -> std::sync::Arc<Signer> {
        let t = now.unix_timestamp();
        self.roots
            .iter()
            .filter(|r| r.record.signing_from <= t)
            .max_by_key(|r| r.record.signing_from)
            .or_else(|| self.roots.iter().min_by_key(|r| r.record.signing_from))
            .map(|r| r.signer.clone())
            .expect("a loaded store has at least one root")
    }

    /// Every root in the bundle, oldest first.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.iter().map(|r| r.cert.clone()).collect()
    }

    pub fn records(&self) -> Vec<RootRecord> {
        self.roots.iter().map(|r| r.record.clone()).collect()
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Starts a root rotation: a new root joins the bundle now and signs after the overlap.
    pub fn rotate(&mut self, now: OffsetDateTime) -> Result<u32, StoreError> {
        let _lock = self.lock()?;
        self.sync_from_disk()?;
        let t = now.unix_timestamp();
        if let Some(p) = self.roots.iter().find(|r| r.record.signing_from > t) {
            return Err(StoreError::RotationInProgress {
                id: p.record.id,
                at: OffsetDateTime::from_unix_timestamp(p.record.signing_from)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            });
        }
        let id = self.add_root(t + self.policy.overlap.as_secs() as i64, now)?;
        self.save()?;
        Ok(id)
    }

    /// Advances rotation to `now`: marks superseded roots for retirement, drops retired ones,
    /// and starts a rotation when the active root is in the last quarter of its life.
    pub fn maintain(&mut self, now: OffsetDateTime) -> Result<Maintenance, StoreError> {
        let _lock = self.lock()?;
        self.sync_from_disk()?;
        let t = now.unix_timestamp();
        let mut m = Maintenance::default();
        let active = self.active_signer(now);
        let active_from = self
            .roots
            .iter()
            .find(|r| std::sync::Arc::ptr_eq(&r.signer, &active))
            .map(|r| (r.record.id, r.record.signing_from))
            .expect("the active signer is one of the roots");
        let keep = self.policy.max_svid_ttl.as_secs() as i64;
        for r in &mut self.roots {
            if r.record.signing_from < active_from.1 && r.record.retire_at.is_none() {
                r.record.retire_at = Some(active_from.1 + keep);
                m.promoted = Some(active_from.0);
            }
        }
        let before = self.roots.len();
        let mut retired = Vec::new();
        self.roots.retain(|r| match r.record.retire_at {
            Some(at) if at <= t => {
                retired.push(r.record.id);
                false
            }
            _ => true,
        });
        if self.roots.len() != before {
            self.sequence += 1;
            for id in &retired {
                let dir = self.root_dir(*id);
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        m.retired = retired;
        let pending = self.roots.iter().any(|r| r.record.signing_from > t);
        let remaining = active.not_after() - now;
        if !pending && remaining < self.policy.root_ttl / 4 {
            m.started_rotation =
                Some(self.add_root(t + self.policy.overlap.as_secs() as i64, now)?);
        }
        if m.changed() {
            self.save()?;
        }
        Ok(m)
    }
}

/// The files of one generated root in `roots/<id>/`; the intermediate's exist when the policy
/// asked for one when the root was made.
pub const ROOT_KEY: &str = "root-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
pub const INTERMEDIATE_CERT: &str = "intermediate-cert.pem";

/// The signer of the root in `dir`: its intermediate when it has one, else the root itself.
fn load_signer(dir: &Path, id: u32, root: &CertificateDer<'static>) -> Result<Signer, StoreError> {
    let int_cert = dir.join(INTERMEDIATE_CERT);
    if int_cert.exists() {
        let key = read_key_file(&dir.join(INTERMEDIATE_KEY))?;
        let cert = read_certs(&int_cert)?.remove(0);
        Ok(Signer::new(
            &format!("root {id} intermediate"),
            key,
            vec![cert, root.clone()],
        )?)
    } else {
        let key = read_key_file(&dir.join(ROOT_KEY))?;
        Ok(Signer::new(&format!("root {id}"), key, vec![root.clone()])?)
    }
}

/// Generates an ECDSA P-256 intermediate under `root`, living as long as the root, allowed to
/// sign only end-entity certificates (pathLen 0).
fn generate_intermediate(
    td: &TrustDomain,
    id: u32,
    (root_key, root): (&KeyPair, &CertificateDer<'static>),
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(KeyPair, CertificateDer<'static>), StoreError> {
    let issuer = rcgen::Issuer::from_ca_cert_der(root, root_key).map_err(StoreError::KeyGen)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(StoreError::KeyGen)?;
    let params = ca_params(
        td,
        format!("Signet intermediate CA {id}"),
        BasicConstraints::Constrained(0),
        ttl,
        now,
    )?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(StoreError::KeyGen)?;
    Ok((key, cert.der().clone()))
}

/// Generates a self-signed ECDSA P-256 root for `td`.
fn generate_root(
    td: &TrustDomain,
    id: u32,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<(KeyPair, CertificateDer<'static>), StoreError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(StoreError::KeyGen)?;
    let params = ca_params(
        td,
        format!("Signet root CA {id}"),
        BasicConstraints::Unconstrained,
        ttl,
        now,
    )?;
    let cert = params.self_signed(&key).map_err(StoreError::KeyGen)?;
    Ok((key, cert.der().clone()))
}

/// What the CA's own certificates share: the trust domain as organisation and as URI SAN,
/// CA key usages, a random serial, validity from a minute ago for `ttl`.
fn ca_params(
    td: &TrustDomain,
    common_name: String,
    constraints: BasicConstraints,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<CertificateParams, StoreError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // SPIFFE signing certificates may carry the trust domain's own ID.
    params.subject_alt_names = vec![SanType::URI(
        td.id_string().try_into().map_err(StoreError::KeyGen)?,
    )];
    params.serial_number = Some(crate::svid::random_serial());
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + ttl;
    Ok(params)
}

/// CA material plugged in from an Istio-style `cacerts` directory.
#[derive(Debug)]
pub struct Cacerts {
    pub signer: Signer,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Loads `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem` and `root-cert.pem` as Istio names them:
/// the signing certificate and key, the chain from the signing certificate up (the root may or
/// may not be included), and the roots to trust.
pub fn load_cacerts(dir: &Path) -> Result<Cacerts, StoreError> {
    let key = read_key_file(&dir.join("ca-key.pem"))?;
    let ca_cert = read_certs(&dir.join("ca-cert.pem"))?.remove(0);
    let roots = read_certs(&dir.join("root-cert.pem"))?;
    let chain_path = dir.join("cert-chain.pem");
    let mut chain = if chain_path.exists() {
        read_certs(&chain_path)?
    } else {
        vec![ca_cert.clone()]
    };
    if chain[0] != ca_cert {
        chain.insert(0, ca_cert);
    }
    // Finish the chain at a trusted root: the one that signed its last certificate.
    let last = chain.last().expect("not empty").clone();
    if !roots.contains(&last) {
        let root = roots.iter().find(|r| signed_by(&last, r)).ok_or_else(|| {
            CaCertError::UntrustedChain {
                what: chain_path.display().to_string(),
            }
        })?;
        chain.push(root.clone());
    }
    let signer = Signer::new(&dir.display().to_string(), key, chain)?;
    if !roots.contains(signer.root()) {
        return Err(CaCertError::UntrustedChain {
            what: chain_path.display().to_string(),
        }
        .into());
    }
    Ok(Cacerts { signer, roots })
}

fn signed_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    match (
        X509Certificate::from_der(cert.as_ref()),
        X509Certificate::from_der(issuer.as_ref()),
    ) {
        (Ok((_, c)), Ok((_, i))) => c.verify_signature(Some(i.public_key())).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn new_root(td: &TrustDomain, ttl: Duration) -> (KeyPair, CertificateDer<'static>) {
        generate_root(td, 1, ttl, OffsetDateTime::now_utc()).expect("root")
    }

    pub(crate) fn intermediate_under(
        root_key: &KeyPair,
        root: &CertificateDer<'static>,
    ) -> (KeyPair, CertificateDer<'static>) {
        let issuer = rcgen::Issuer::from_ca_cert_der(root, root_key).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name
            .push(DnType::CommonName, "intermediate");
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(3600);
        let cert = p.signed_by(&key, &issuer).expect("sign");
        (key, cert.der().clone())
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").expect("td")
    }

    const DAY: u64 = 86_400;

    fn policy() -> RootPolicy {
        RootPolicy {
            root_ttl: Duration::from_secs(365 * DAY),
            overlap: Duration::from_secs(DAY),
            max_svid_ttl: Duration::from_secs(DAY),
            intermediate: false,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn generated_ca_persists_and_reloads_the_same_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let now = OffsetDateTime::now_utc();
        let first = RootStore::open_or_create(dir.path(), &td(), policy(), now).expect("create");
        let key_path = dir.path().join("roots/1/root-key.pem");
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(&dir.path().join("ca-state.json")), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
        drop(first);
        let again = RootStore::open_or_create(dir.path(), &td(), policy(), now).expect("reload");
        assert_eq!(again.roots().len(), 1);
        assert_eq!(again.sequence(), 1);
        let direct = read_certs(&dir.path().join("roots/1/root-cert.pem")).expect("cert");
        assert_eq!(again.roots(), direct);
        assert_eq!(again.active_signer(now).root(), &direct[0]);
    }

    #[test]
    fn refuses_a_key_readable_by_others_and_a_foreign_state_dir() {
        let dir = tempfile::tempdir().expect("tmp");
        let now = OffsetDateTime::now_utc();
        RootStore::open_or_create(dir.path(), &td(), policy(), now).expect("create");
        let key_path = dir.path().join("roots/1/root-key.pem");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = RootStore::open_or_create(dir.path(), &td(), policy(), now).expect_err("0644");
        assert!(
            matches!(err, StoreError::KeyPermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let other = TrustDomain::parse("example.org").expect("td");
        let err = RootStore::open_or_create(dir.path(), &other, policy(), now).expect_err("td");
        assert!(
            matches!(err, StoreError::TrustDomainMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn root_rotation_overlaps_then_switches_then_retires() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = OffsetDateTime::now_utc();
        let mut store = RootStore::open_or_create(dir.path(), &td(), policy(), t0).expect("create");
        let old_root = store.roots()[0].clone();

        let new_id = store.rotate(t0).expect("rotate");
        assert_eq!(new_id, 2);
        assert_eq!(
            store.roots().len(),
            2,
            "the new root joins the bundle at once"
        );
        assert_eq!(store.sequence(), 2);
        assert_eq!(
            store.active_signer(t0).root(),
            &old_root,
            "but does not sign yet"
        );
        assert!(matches!(
            store.rotate(t0),
            Err(StoreError::RotationInProgress { id: 2, .. })
        ));

        let t1 = t0 + Duration::from_secs(DAY + 1);
        let m = store.maintain(t1).expect("maintain");
        assert_eq!(m.promoted, Some(2));
        assert!(m.retired.is_empty());
        assert_ne!(
            store.active_signer(t1).root(),
            &old_root,
            "after the overlap the new root signs"
        );
        assert_eq!(
            store.roots().len(),
            2,
            "the old root stays while its SVIDs live"
        );

        // A restart in the middle keeps the schedule.
        drop(store);
        let mut store = RootStore::open_or_create(dir.path(), &td(), policy(), t1).expect("reload");
        assert_eq!(
            store.records()[0].retire_at,
            Some(t0.unix_timestamp() + 2 * DAY as i64)
        );

        let t2 = t0 + Duration::from_secs(2 * DAY + 1);
        let m = store.maintain(t2).expect("maintain");
        assert_eq!(m.retired, vec![1]);
        assert_eq!(store.roots().len(), 1);
        assert_eq!(store.sequence(), 3);
        assert!(
            !dir.path().join("roots/1").exists(),
            "the retired key is deleted"
        );
    }

    #[test]
    fn two_processes_sharing_a_directory_see_each_others_changes() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = OffsetDateTime::now_utc();
        let mut server =
            RootStore::open_or_create(dir.path(), &td(), policy(), t0).expect("create");
        let mut cli = RootStore::open_or_create(dir.path(), &td(), policy(), t0).expect("open");
        cli.rotate(t0).expect("rotate from the CLI");
        // The server's next step picks the new root up instead of overwriting the state.
        server.maintain(t0).expect("maintain");
        assert_eq!(server.roots().len(), 2);
        assert_eq!(server.sequence(), 2);
        assert!(matches!(
            server.rotate(t0),
            Err(StoreError::RotationInProgress { id: 2, .. })
        ));
        let t1 = t0 + Duration::from_secs(DAY + 1);
        server.maintain(t1).expect("maintain");
        let reread = RootStore::open_or_create(dir.path(), &td(), policy(), t1).expect("open");
        assert_eq!(reread.records(), server.records());
    }

    #[test]
    fn an_ageing_root_starts_its_own_rotation() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = OffsetDateTime::now_utc();
        let mut store = RootStore::open_or_create(dir.path(), &td(), policy(), t0).expect("create");
        assert!(!store.maintain(t0).expect("maintain").changed());
        let late = t0 + Duration::from_secs(300 * DAY);
        let m = store.maintain(late).expect("maintain");
        assert_eq!(m.started_rotation, Some(2));
        assert_eq!(store.roots().len(), 2);
    }

    #[test]
    fn an_intermediate_signs_and_survives_reload_and_rotation() {
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = OffsetDateTime::now_utc();
        let policy = RootPolicy {
            intermediate: true,
            ..policy()
        };
        let mut store = RootStore::open_or_create(dir.path(), &td(), policy, t0).expect("create");
        assert_eq!(
            mode(&dir.path().join("roots/1").join(INTERMEDIATE_KEY)),
            0o600
        );
        let key = KeyPair::generate().expect("key");
        let csr =
            crate::csr::Csr::parse(crate::csr::tests::csr_pem_for(&key).as_bytes()).expect("csr");
        let id = crate::spiffe::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").expect("id");
        let issue = |signer: &Signer, now| {
            signer
                .issue(
                    &td(),
                    &id,
                    &csr,
                    Duration::from_secs(600),
                    Duration::ZERO,
                    now,
                )
                .expect("issue")
        };
        let svid = issue(&store.active_signer(t0), t0);
        assert_eq!(svid.chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(svid.chain[2], store.roots()[0]);
        let roots = crate::verify::SvidRoots::new(td(), &store.roots()).expect("roots");
        let verified = roots
            .verify(
                &svid.chain[0],
                &svid.chain[1..2],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .expect("the chain through the intermediate verifies");
        assert_eq!(verified, id);
        // The root's key signed nothing else: the leaf's issuer is the intermediate.
        assert!(signed_by(&svid.chain[0], &svid.chain[1]));
        assert!(!signed_by(&svid.chain[0], &svid.chain[2]));

        let reopened = RootStore::open_or_create(dir.path(), &td(), policy, t0).expect("reopen");
        assert_eq!(
            issue(&reopened.active_signer(t0), t0).chain[1],
            svid.chain[1],
            "reloaded with its intermediate"
        );
        store.rotate(t0).expect("rotate");
        let t1 = t0 + Duration::from_secs(DAY + 1);
        store.maintain(t1).expect("maintain");
        let next = issue(&store.active_signer(t1), t1);
        assert_eq!(next.chain.len(), 3);
        assert_eq!(
            next.chain[2],
            store.roots()[1],
            "the new root's intermediate signs"
        );
    }

    #[test]
    fn root_policy_is_validated() {
        let bad = RootPolicy {
            root_ttl: Duration::from_secs(2 * DAY),
            ..policy()
        };
        assert!(bad.validate().is_err());
        policy().validate().expect("defaults are sane");
    }

    fn write_cacerts(
        dir: &Path,
        with_chain: bool,
    ) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let (root_key, root) = new_root(&td(), Duration::from_secs(7200));
        let (int_key, int) = intermediate_under(&root_key, &root);
        let pem = |c: &CertificateDer<'_>| to_pem("CERTIFICATE", c);
        write_atomic(
            &dir.join("ca-key.pem"),
            int_key.serialize_pem().as_bytes(),
            0o600,
        )
        .expect("w");
        write_atomic(&dir.join("ca-cert.pem"), pem(&int).as_bytes(), 0o644).expect("w");
        write_atomic(&dir.join("root-cert.pem"), pem(&root).as_bytes(), 0o644).expect("w");
        if with_chain {
            write_atomic(&dir.join("cert-chain.pem"), pem(&int).as_bytes(), 0o644).expect("w");
        }
        (int, root)
    }

    #[test]
    fn cacerts_with_an_intermediate() {
        for with_chain in [true, false] {
            let dir = tempfile::tempdir().expect("tmp");
            let (int, root) = write_cacerts(dir.path(), with_chain);
            let ca = load_cacerts(dir.path()).expect("cacerts");
            assert_eq!(ca.roots, vec![root.clone()]);
            assert_eq!(ca.signer.root(), &root);
            let key = KeyPair::generate().expect("key");
            let csr = crate::csr::Csr::parse(crate::csr::tests::csr_pem_for(&key).as_bytes())
                .expect("csr");
            let id =
                crate::spiffe::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").expect("id");
            let svid = ca
                .signer
                .issue(
                    &td(),
                    &id,
                    &csr,
                    Duration::from_secs(600),
                    Duration::ZERO,
                    OffsetDateTime::now_utc(),
                )
                .expect("issue");
            assert_eq!(svid.chain[1..], [int, root]);
        }
    }

    #[test]
    fn cacerts_with_an_untrusted_chain_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        write_cacerts(dir.path(), true);
        let (_, stranger) = new_root(&td(), Duration::from_secs(7200));
        write_atomic(
            &dir.path().join("root-cert.pem"),
            to_pem("CERTIFICATE", &stranger).as_bytes(),
            0o644,
        )
        .expect("w");
        let err = load_cacerts(dir.path()).expect_err("untrusted");
        assert!(
            matches!(err, StoreError::Cert(CaCertError::UntrustedChain { .. })),
            "{err}"
        );
    }
}
