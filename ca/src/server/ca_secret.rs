//! The CA's own keys in Kubernetes mode, when the admin gives no `cacerts`: a root generated once
//! and kept in a Secret (Istio's `cacerts` layout). Every replica races to create it; the create
//! fails with 409 for all but one, and the others read what the winner stored, so all replicas
//! sign with the same root. The Secret is written to a private directory (0700, keys 0600) that
//! the CA then opens like a `cacerts` directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::TrustDomain;

/// The files a `cacerts` directory holds.
pub const FILES: [&str; 4] = [
    "ca-key.pem",
    "ca-cert.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Kubernetes API, Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} lacks {file}")]
    Incomplete {
        namespace: String,
        name: String,
        file: &'static str,
    },
    #[error("generating the root: {0}")]
    Generate(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Makes sure Secret `namespace/name` holds a CA, creating one if none exists, and writes it to
/// `dir` as a `cacerts` directory. Returns whether this call created it.
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    td: &TrustDomain,
    root_ttl: Duration,
    dir: &Path,
) -> Result<bool, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let err = |source| CaSecretError::Api {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let (secret, created) = match api.get_opt(name).await.map_err(err)? {
        Some(s) => (s, false),
        None => {
            let data: BTreeMap<String, ByteString> = crate::store::new_cacerts(td, root_ttl)?
                .into_iter()
                .map(|(f, pem)| (f.to_owned(), ByteString(pem.into_bytes())))
                .collect();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                type_: Some("Opaque".to_owned()),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(s) => {
                    tracing::info!(namespace, name, "CA root generated and stored");
                    (s, true)
                }
                // Another replica stored one first: use that.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    (api.get(name).await.map_err(err)?, false)
                }
                Err(e) => return Err(err(e)),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaSecretError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    for file in FILES {
        let bytes = data.get(file).ok_or(CaSecretError::Incomplete {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            file,
        })?;
        let path = dir.join(file);
        std::fs::write(&path, &bytes.0).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
    }
    publish_root(client, namespace, &data).await?;
    Ok(created)
}

/// The ConfigMap agents read the trust anchor from (the DaemonSet mounts it).
pub const ROOT_CONFIGMAP: &str = "signet-ca-root";

/// Publishes `root-cert.pem` in ConfigMap `namespace/signet-ca-root` (server-side apply).
async fn publish_root(
    client: &kube::Client,
    namespace: &str,
    data: &BTreeMap<String, ByteString>,
) -> Result<(), CaSecretError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let root = data
        .get("root-cert.pem")
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default();
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace},
        "data": {"root-cert.pem": root},
    });
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            ROOT_CONFIGMAP,
            &PatchParams::apply("signet-ca").force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| CaSecretError::Api {
            namespace: namespace.to_owned(),
            name: ROOT_CONFIGMAP.to_owned(),
            source,
        })?;
    Ok(())
}
