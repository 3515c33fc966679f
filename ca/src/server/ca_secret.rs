//! The CA's keys in Kubernetes mode when the admin gives no `cacerts`: the generated CA's state
//! directory (`ca-state.json`, every root and its intermediate) kept in one Secret, so all
//! replicas sign with the same keys and rotation outlives any pod.
//!
//! - First start: every replica races to create the Secret. The create fails with 409 for all but
//!   one; the others read what the winner stored.
//! - Each replica works on a private copy of the directory (0700, keys 0600) that the CA opens as
//!   a [`CaSource::SharedStateDir`](crate::CaSource::SharedStateDir).
//! - Rotation: the holder of Lease `signet-ca-rotation` advances rotation on its copy and writes
//!   the copy back with the resourceVersion it last read, a compare-and-swap. The other replicas
//!   re-read the Secret and follow; a write that loses the race is discarded and redone from the
//!   Secret, which is always the truth.
//! - Every root of the bundle is published to ConfigMap `signet-ca-root`, which agents start from.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::CaSettings;
use crate::bundle::TrustBundle;
use crate::issuer::CertificateAuthority;
use crate::lease::Elector;
use crate::store::{
    INTERMEDIATE_CERT, INTERMEDIATE_KEY, ROOT_CERT, ROOT_KEY, RootStore, STATE_FILE, StoreError,
    write_atomic,
};

/// The ConfigMap agents read the trust anchor from (the DaemonSet mounts it).
pub const ROOT_CONFIGMAP: &str = "signet-ca-root";
/// The Lease whose holder drives root rotation.
pub const ROTATION_LEASE: &str = "signet-ca-rotation";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Kubernetes API, {kind} {namespace}/{name}: {source}")]
    Api {
        kind: &'static str,
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("Secret {namespace}/{name} is not a Signet CA: it lacks `{STATE_FILE}`")]
    Incomplete { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name}: unexpected key `{key}` (a Signet CA holds `{STATE_FILE}` and `roots.<id>.<file>.pem`)"
    )]
    UnexpectedKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files one root keeps in `roots/<id>/`.
const ROOT_FILES: [&str; 4] = [ROOT_KEY, ROOT_CERT, INTERMEDIATE_KEY, INTERMEDIATE_CERT];

/// The Secret key of a file in the state directory: `ca-state.json`, or `roots.<id>.<file>`
/// (Secret keys cannot hold `/`).
fn secret_key(id: Option<u32>, file: &str) -> String {
    match id {
        None => file.to_owned(),
        Some(id) => format!("roots.{id}.{file}"),
    }
}

/// The inverse of [`secret_key`]: `None` for anything that is not a file of a Signet CA, so a
/// key like `roots.1.../x` can never name a path outside the directory.
fn file_of(key: &str) -> Option<(Option<u32>, &'static str)> {
    if key == STATE_FILE {
        return Some((None, STATE_FILE));
    }
    let mut parts = key.splitn(3, '.');
    let (Some("roots"), Some(id), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let id: u32 = id
        .parse()
        .ok()
        .filter(|_| id.bytes().all(|b| b.is_ascii_digit()))?;
    ROOT_FILES
        .iter()
        .find(|f| **f == file)
        .map(|f| (Some(id), *f))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaSecretError + '_ {
    move |source| CaSecretError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The state directory as Secret data.
fn read_dir(dir: &Path) -> Result<BTreeMap<String, ByteString>, CaSecretError> {
    let mut data = BTreeMap::new();
    let state = dir.join(STATE_FILE);
    data.insert(
        secret_key(None, STATE_FILE),
        ByteString(std::fs::read(&state).map_err(io(&state))?),
    );
    let roots = dir.join("roots");
    for entry in std::fs::read_dir(&roots).map_err(io(&roots))? {
        let entry = entry.map_err(io(&roots))?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        for file in ROOT_FILES {
            let path = entry.path().join(file);
            if path.exists() {
                data.insert(
                    secret_key(Some(id), file),
                    ByteString(std::fs::read(&path).map_err(io(&path))?),
                );
            }
        }
    }
    Ok(data)
}

/// One replica's link between its copy of the state directory and the Secret.
pub struct KeySecret {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    namespace: String,
    name: String,
    dir: PathBuf,
    /// The resourceVersion the copy was last made from or written as; `None` forces a re-read.
    version: Option<String>,
}

impl std::fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl KeySecret {
    /// Makes sure Secret `namespace/name` holds a CA, generating one (with intermediates when
    /// `settings` asks) if none exists, and copies it to `dir`. Returns whether this call created
    /// it.
    pub async fn ensure(
        client: &kube::Client,
        namespace: &str,
        name: &str,
        settings: &CaSettings,
        dir: &Path,
    ) -> Result<(Self, bool), CaSecretError> {
        let mut keys = Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            dir: dir.to_owned(),
            version: None,
        };
        if let Some(secret) = keys.secrets.get_opt(name).await.map_err(keys.api_err())? {
            keys.copy_from(&secret)?;
            return Ok((keys, false));
        }
        // Generate in the directory itself; if another replica wins the race, its Secret
        // overwrites this copy.
        RootStore::open_or_create(
            dir,
            &settings.trust_domain,
            settings.root_policy(),
            OffsetDateTime::now_utc(),
        )?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(read_dir(dir)?),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        match keys.secrets.create(&PostParams::default(), &secret).await {
            Ok(stored) => {
                tracing::info!(namespace, name, "CA generated and stored");
                keys.version = stored.metadata.resource_version;
                Ok((keys, true))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let stored = keys.secrets.get(name).await.map_err(keys.api_err())?;
                keys.copy_from(&stored)?;
                Ok((keys, false))
            }
            Err(e) => Err(keys.api_err()(e)),
        }
    }

    fn api_err(&self) -> impl FnOnce(kube::Error) -> CaSecretError + '_ {
        |source| CaSecretError::Api {
            kind: "Secret",
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// Makes the directory exactly what `secret` holds: root files first, then the state file
    /// that names them, then roots the Secret no longer has are removed.
    fn copy_from(&mut self, secret: &Secret) -> Result<(), CaSecretError> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let mut files = Vec::with_capacity(data.len());
        for (key, value) in data {
            let file = file_of(key).ok_or_else(|| CaSecretError::UnexpectedKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                key: key.clone(),
            })?;
            files.push((file, value));
        }
        let Some(state) = data.get(STATE_FILE) else {
            return Err(CaSecretError::Incomplete {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            });
        };
        let dir = &self.dir;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let mut ids = std::collections::BTreeSet::new();
        for ((id, file), value) in files {
            let Some(id) = id else { continue };
            ids.insert(id);
            let root_dir = dir.join("roots").join(id.to_string());
            std::fs::create_dir_all(&root_dir).map_err(io(&root_dir))?;
            write_atomic(&root_dir.join(file), &value.0, 0o600)?;
        }
        // A file the Secret does not have for a root it does have (an intermediate from this
        // replica's own lost attempt, say) must not be mistaken for part of that root.
        for id in &ids {
            for file in ROOT_FILES {
                let path = dir.join("roots").join(id.to_string()).join(file);
                if !data.contains_key(&secret_key(Some(*id), file)) && path.exists() {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
            }
        }
        write_atomic(&dir.join(STATE_FILE), &state.0, 0o600)?;
        let roots = dir.join("roots");
        for entry in std::fs::read_dir(&roots).map_err(io(&roots))? {
            let entry = entry.map_err(io(&roots))?;
            let stale = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|id| !ids.contains(&id));
            if stale {
                std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            }
        }
        self.version = secret.metadata.resource_version.clone();
        Ok(())
    }

    /// Re-reads the Secret and refreshes the copy when it changed. Returns whether it did.
    pub async fn pull(&mut self) -> Result<bool, CaSecretError> {
        let secret = self.secrets.get(&self.name).await.map_err(self.api_err())?;
        if secret.metadata.resource_version.is_some()
            && secret.metadata.resource_version == self.version
        {
            return Ok(false);
        }
        self.copy_from(&secret)?;
        Ok(true)
    }

    /// Writes the copy back, only over the version it was made from. `Ok(false)` when another
    /// replica wrote first; the caller then pulls. Any failure leaves the copy marked stale, so
    /// the next pull replaces an unsaved change rather than keeping it locally.
    pub async fn push(&mut self) -> Result<bool, CaSecretError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: self.version.take(),
                ..ObjectMeta::default()
            },
            data: Some(read_dir(&self.dir)?),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        };
        match self
            .secrets
            .replace(&self.name, &PostParams::default(), &secret)
            .await
        {
            Ok(stored) => {
                self.version = stored.metadata.resource_version;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_err()(e)),
        }
    }

    /// Publishes every root of `bundle` in ConfigMap `signet-ca-root` (server-side apply).
    pub async fn publish_bundle(&self, bundle: &TrustBundle) -> Result<(), CaSecretError> {
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CONFIGMAP, "namespace": self.namespace},
            "data": {"root-cert.pem": bundle.to_pem()},
        });
        self.config_maps
            .patch(
                ROOT_CONFIGMAP,
                &PatchParams::apply("signet-ca").force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|source| CaSecretError::Api {
                kind: "ConfigMap",
                namespace: self.namespace.clone(),
                name: ROOT_CONFIGMAP.to_owned(),
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// One round: follow the Secret; when `leading`, advance rotation to `now` and store the
    /// result. Returns whether this replica's roots or signer may have changed.
    pub async fn step(
        &mut self,
        ca: &CertificateAuthority,
        leading: bool,
        now: OffsetDateTime,
    ) -> Result<bool, CaSecretError> {
        let pulled = self.pull().await?;
        // Promotion is a matter of time: follow it even when nothing was written.
        ca.refresh(now)?;
        if !leading {
            return Ok(pulled);
        }
        let m = ca.maintain(now)?;
        if !m.changed() {
            return Ok(pulled);
        }
        if self.push().await? {
            tracing::info!(promoted = ?m.promoted, retired = ?m.retired, started = ?m.started_rotation, "root rotation advanced and stored");
        } else {
            tracing::info!("another replica changed the CA keys first; following it");
            self.pull().await?;
            ca.refresh(now)?;
        }
        self.publish_bundle(&ca.bundle()).await?;
        Ok(true)
    }
}

/// Keeps this replica's CA in step with the Secret, driving rotation while it holds the Lease.
pub async fn follow(
    mut keys: KeySecret,
    ca: Arc<CertificateAuthority>,
    elector: Elector,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leading = match elector.try_lead().await {
            Ok(leading) => leading,
            Err(e) => {
                tracing::warn!(error = %e, lease = ROTATION_LEASE, "cannot reach the Lease; following only");
                false
            }
        };
        if let Err(e) = keys.step(&ca, leading, OffsetDateTime::now_utc()).await {
            // The keys in force stay in force; the next round retries.
            tracing::error!(error = %e, "CA key upkeep failed; will retry");
        }
    }
}
