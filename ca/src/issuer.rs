//! The CA as one object: where its material comes from (generated state directory or `cacerts`),
//! the TTL rules, the signer in force and the trust bundle, safe to share between threads.
//!
//! It signs whatever identity it is handed; deciding who may have which identity is the
//! server's job (`server::authz`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use crate::authority::{IssueError, IssuedSvid, Signer, TtlPolicy};
use crate::bundle::TrustBundle;
use crate::csr::Csr;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::{self, Maintenance, RootPolicy, RootStore, StoreError};

/// Where the CA's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Generated on first start and kept in this directory; roots rotate automatically.
    StateDir(PathBuf),
    /// A generated CA's directory that another party rotates: this replica's copy of the
    /// Kubernetes Secret (`server::ca_secret`). Opened and followed without advancing rotation;
    /// only the Lease holder calls [`CertificateAuthority::maintain`].
    SharedStateDir(PathBuf),
    /// Istio-style `cacerts` files, managed by the operator.
    Cacerts(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub trust_domain: TrustDomain,
    pub source: CaSource,
    pub ttl: TtlPolicy,
    pub root_ttl: Duration,
    pub rotation_overlap: Duration,
    /// How often bundle consumers should refresh (`spiffe_refresh_hint`).
    pub refresh_hint: Duration,
    /// Generated roots sign through an intermediate (`RootPolicy::intermediate`).
    pub intermediate: bool,
}

impl CaSettings {
    pub fn new(trust_domain: TrustDomain, source: CaSource) -> Self {
        Self {
            trust_domain,
            source,
            ttl: TtlPolicy::default(),
            root_ttl: Duration::from_secs(365 * 86_400),
            rotation_overlap: Duration::from_secs(7 * 86_400),
            refresh_hint: Duration::from_secs(300),
            intermediate: false,
        }
    }

    pub fn root_policy(&self) -> RootPolicy {
        RootPolicy {
            root_ttl: self.root_ttl,
            overlap: self.rotation_overlap,
            max_svid_ttl: self.ttl.max_ttl,
            intermediate: self.intermediate,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.ttl.validate()?;
        self.root_policy().validate()
    }
}

#[derive(Debug)]
enum Material {
    Generated(Mutex<RootStore>),
    Cacerts {
        roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    },
}

/// The certificate authority: thread-safe, cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct CertificateAuthority {
    settings: CaSettings,
    material: Material,
    /// The signer in force; swapped when a rotation promotes a new root.
    current: RwLock<Arc<Signer>>,
}

impl CertificateAuthority {
    pub fn open(settings: CaSettings) -> Result<Self, StoreError> {
        Self::open_at(settings, OffsetDateTime::now_utc())
    }

    pub fn open_at(settings: CaSettings, now: OffsetDateTime) -> Result<Self, StoreError> {
        let (material, signer) = match &settings.source {
            CaSource::StateDir(dir) | CaSource::SharedStateDir(dir) => {
                let mut store = RootStore::open_or_create(
                    dir,
                    &settings.trust_domain,
                    settings.root_policy(),
                    now,
                )?;
                if matches!(settings.source, CaSource::StateDir(_)) {
                    store.maintain(now)?;
                }
                let signer = store.active_signer(now);
                (Material::Generated(Mutex::new(store)), signer)
            }
            CaSource::Cacerts(dir) => {
                let c = store::load_cacerts(dir)?;
                let signer = Arc::new(c.signer);
                (Material::Cacerts { roots: c.roots }, signer)
            }
        };
        Ok(Self {
            settings,
            material,
            current: RwLock::new(signer),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.settings.trust_domain
    }

    /// Whether this instance rotates its own roots (a state directory it owns), as opposed to
    /// following a shared one or using operator-managed `cacerts`.
    pub fn rotates_itself(&self) -> bool {
        matches!(self.settings.source, CaSource::StateDir(_))
    }

    pub fn ttl_policy(&self) -> &TtlPolicy {
        &self.settings.ttl
    }

    pub fn signer(&self) -> Arc<Signer> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Issues an SVID for `id` with the CSR's key. `requested_ttl` zero means the default.
    pub fn issue(
        &self,
        id: &SpiffeId,
        csr: &Csr,
        requested_ttl: Duration,
    ) -> Result<IssuedSvid, IssueError> {
        let ttl = self.settings.ttl.resolve(requested_ttl)?;
        self.signer().issue(
            &self.settings.trust_domain,
            id,
            csr,
            ttl,
            self.settings.ttl.backdate,
            OffsetDateTime::now_utc(),
        )
    }

    pub fn bundle(&self) -> TrustBundle {
        let (roots, sequence) = match &self.material {
            Material::Generated(store) => {
                let store = store.lock().unwrap_or_else(|p| p.into_inner());
                (store.roots(), store.sequence())
            }
            Material::Cacerts { roots, .. } => (roots.clone(), 1),
        };
        TrustBundle {
            trust_domain: self.settings.trust_domain.clone(),
            roots,
            sequence,
            refresh_hint: self.settings.refresh_hint,
        }
    }

    /// Where each root stands at `now`, for the CA's status page.
    pub fn roots_status(&self, now: OffsetDateTime) -> RootsStatus {
        let t = now.unix_timestamp();
        let validity = |der: &rustls_pki_types::CertificateDer<'_>| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, c)| {
                    (
                        c.validity().not_before.timestamp(),
                        c.validity().not_after.timestamp(),
                    )
                })
                .unwrap_or((0, 0))
        };
        match &self.material {
            Material::Generated(store) => {
                let store = store.lock().unwrap_or_else(|p| p.into_inner());
                let records = store.records();
                // The root that signs is the newest whose time has come.
                let signing = records
                    .iter()
                    .filter(|r| r.signing_from <= t)
                    .max_by_key(|r| r.signing_from)
                    .map(|r| r.id);
                let roots: Vec<RootState> = records
                    .iter()
                    .zip(store.roots())
                    .map(|(r, der)| {
                        let (not_before, not_after) = validity(&der);
                        let state = if Some(r.id) == signing {
                            "signing"
                        } else if r.signing_from > t {
                            "pending"
                        } else {
                            "retiring"
                        };
                        RootState {
                            id: Some(r.id),
                            state: state.into(),
                            not_before,
                            not_after,
                            signing_from: Some(r.signing_from),
                            retire_at: r.retire_at,
                        }
                    })
                    .collect();
                let pending = roots.iter().any(|r| r.state == "pending");
                // `maintain` starts the next rotation in the active root's last quarter.
                let quarter = (self.settings.root_policy().root_ttl / 4).as_secs() as i64;
                let next_rotation = roots
                    .iter()
                    .find(|r| r.state == "signing")
                    .filter(|_| !pending && self.rotates_itself())
                    .map(|r| (r.not_after - quarter).max(t));
                RootsStatus {
                    sequence: store.sequence(),
                    managed: if self.rotates_itself() {
                        "generated, rotated by this instance"
                    } else {
                        "generated, rotated by the Lease holder"
                    }
                    .into(),
                    roots,
                    next_rotation,
                }
            }
            Material::Cacerts { roots, .. } => RootsStatus {
                sequence: 1,
                managed: "cacerts, rotated by the operator".into(),
                roots: roots
                    .iter()
                    .map(|der| {
                        let (not_before, not_after) = validity(der);
                        RootState {
                            id: None,
                            state: "trusted".into(),
                            not_before,
                            not_after,
                            signing_from: None,
                            retire_at: None,
                        }
                    })
                    .collect(),
                next_rotation: None,
            },
        }
    }

    /// Starts a root rotation now (generated material only).
    pub fn rotate_root(&self) -> Result<u32, StoreError> {
        match &self.material {
            Material::Generated(store) => store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .rotate(OffsetDateTime::now_utc()),
            Material::Cacerts { .. } => {
                Err(StoreError::ExternallyManaged(match &self.settings.source {
                    CaSource::Cacerts(d) | CaSource::StateDir(d) | CaSource::SharedStateDir(d) => {
                        d.clone()
                    }
                }))
            }
        }
    }

    /// Advances root rotation to `now` and switches the signer when a new root takes over.
    pub fn maintain(&self, now: OffsetDateTime) -> Result<Maintenance, StoreError> {
        let Material::Generated(store) = &self.material else {
            return Ok(Maintenance::default());
        };
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        let m = store.maintain(now)?;
        self.switch_to(store.active_signer(now));
        Ok(m)
    }

    /// Follows rotation without driving it: re-reads the material another instance changed and
    /// switches to the root that signs at `now`. Returns whether the roots changed.
    pub fn refresh(&self, now: OffsetDateTime) -> Result<bool, StoreError> {
        let Material::Generated(store) = &self.material else {
            return Ok(false);
        };
        let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
        let changed = store.reload()?;
        self.switch_to(store.active_signer(now));
        Ok(changed)
    }

    fn switch_to(&self, active: Arc<Signer>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, &active) {
            tracing::info!(signer = ?active, "signing with a new CA certificate");
            *current = active;
        }
    }
}

/// The roots in the bundle and where rotation stands (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootsStatus {
    pub sequence: u64,
    /// Who makes and rotates them.
    pub managed: String,
    /// Oldest first.
    pub roots: Vec<RootState>,
    /// When this instance will start the next rotation, when it rotates and none is under way.
    pub next_rotation: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootState {
    pub id: Option<u32>,
    /// `signing`, `pending` (in the bundle, signs from `signing_from`), `retiring` (leaves the
    /// bundle at `retire_at`) or `trusted` (operator-managed).
    pub state: String,
    pub not_before: i64,
    pub not_after: i64,
    pub signing_from: Option<i64>,
    pub retire_at: Option<i64>,
}
