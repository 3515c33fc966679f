//! Allocating numeric identities through the Kubernetes API. Each number is a cluster-scoped
//! `SignetIdentity` named by the number; creating one fails with 409 when the name exists, which
//! is the optimistic concurrency that keeps two agents from taking one number for two SPIFFE IDs.
//! Two agents racing for the same SPIFFE ID may each create a number for it; both then see both
//! and settle on the lower one (`signet_policy::identity::next_claim`), and each deletes the
//! higher one it created itself.
//!
//! What a number means is what the `SignetIdentity` objects say now: agents read it from a
//! reflector (`numbers`, through `state::kube::KubeSource`), so a number the collector
//! (`identity::gc`) deleted stops meaning its old SPIFFE ID on every node as soon as the deletion
//! is seen. And a
//! number is not issued again while any node may still hold its old meaning: every number is
//! created with the finalizer [`QUARANTINE`], so a deleted one stays, terminating and meaning
//! nothing, until the collector lifts the finalizer after its quarantine; new numbers are one
//! above the highest that exists, terminating ones included.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use signet_ca::SpiffeId;
use signet_policy::identity::{Claim, next_claim};
use signet_policy::{SignetIdentity, SignetIdentitySpec};

#[derive(Debug, thiserror::Error)]
pub enum KubeIdentityError {
    #[error("Kubernetes API, {what}: {source}")]
    Api {
        what: &'static str,
        source: kube::Error,
    },
    #[error("no number for {id} after {attempts} attempts: other agents keep taking them")]
    Contended { id: SpiffeId, attempts: usize },
    #[error(transparent)]
    Numbers(#[from] signet_policy::identity::AllocError),
}

/// The finalizer every number is created with: it keeps a deleted number from being issued
/// again until the collector lifts it (`identity::gc`).
pub const QUARANTINE: &str = "signet.dev/quarantine";

/// SPIFFE ID → number, the lowest where a race left several; names that are no number and
/// SPIFFE IDs that do not parse mean nothing.
fn lowest(listed: impl IntoIterator<Item = (u32, String)>) -> BTreeMap<SpiffeId, u32> {
    let mut out = BTreeMap::new();
    for (n, id) in listed {
        if let Ok(id) = SpiffeId::parse(&id) {
            let e = out.entry(id).or_insert(n);
            *e = (*e).min(n);
        }
    }
    out
}

/// What `objects` (a reflector's view) say each SPIFFE ID's number is. An object being deleted
/// already means nothing.
pub fn numbers<'a>(
    objects: impl IntoIterator<Item = &'a SignetIdentity>,
) -> BTreeMap<SpiffeId, u32> {
    lowest(objects.into_iter().filter_map(|o| {
        if o.metadata.deletion_timestamp.is_some() {
            return None;
        }
        Some((
            o.metadata.name.as_ref()?.parse().ok()?,
            o.spec.spiffe_id.clone(),
        ))
    }))
}

/// Numeric identities kept as `SignetIdentity` objects.
#[derive(Clone)]
pub struct KubeIdentities {
    api: Api<SignetIdentity>,
}

impl std::fmt::Debug for KubeIdentities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeIdentities").finish_non_exhaustive()
    }
}

/// Tries before giving up: each failed try means another agent created a number meanwhile.
const ATTEMPTS: usize = 16;

impl KubeIdentities {
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// Every allocated identity (the lowest number wins where a race left two).
    pub async fn snapshot(&self) -> Result<BTreeMap<SpiffeId, u32>, KubeIdentityError> {
        Ok(lowest(self.list().await?))
    }

    /// The number of `id`, creating one if it has none.
    pub async fn allocate(&self, id: &SpiffeId) -> Result<u32, KubeIdentityError> {
        let mut created: Vec<(u32, String)> = Vec::new();
        for _ in 0..ATTEMPTS {
            let listed = self.list().await?;
            match next_claim(&listed, id)? {
                Claim::Have(n) => {
                    // Ours lost a race to a lower number for the same identity: remove it.
                    for (mine, uid) in created.iter().filter(|(m, _)| *m != n) {
                        self.delete(*mine, uid).await?;
                    }
                    return Ok(n);
                }
                Claim::Create(n) => {
                    let object = SignetIdentity {
                        metadata: ObjectMeta {
                            name: Some(n.to_string()),
                            finalizers: Some(vec![QUARANTINE.to_owned()]),
                            ..ObjectMeta::default()
                        },
                        spec: SignetIdentitySpec {
                            spiffe_id: id.as_str().to_owned(),
                        },
                    };
                    match self.api.create(&PostParams::default(), &object).await {
                        Ok(made) => {
                            tracing::info!(identity = %id, number = n, "numeric identity created");
                            created.push((n, made.metadata.uid.unwrap_or_default()));
                        }
                        // Someone else took `n` first: look again.
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(source) => {
                            return Err(KubeIdentityError::Api {
                                what: "creating a SignetIdentity",
                                source,
                            });
                        }
                    }
                }
            }
        }
        Err(KubeIdentityError::Contended {
            id: id.clone(),
            attempts: ATTEMPTS,
        })
    }

    async fn list(&self) -> Result<Vec<(u32, String)>, KubeIdentityError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|source| KubeIdentityError::Api {
                what: "listing SignetIdentities",
                source,
            })?;
        // A number being deleted is taken (no one may create it) but stands for no one.
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| {
                let id = match o.metadata.deletion_timestamp {
                    Some(_) => String::new(),
                    None => o.spec.spiffe_id,
                };
                Some((o.metadata.name?.parse().ok()?, id))
            })
            .collect())
    }

    /// Deletes number `n` only if it is still the object we created (same uid).
    async fn delete(&self, n: u32, uid: &str) -> Result<(), KubeIdentityError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&n.to_string(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(source) => Err(KubeIdentityError::Api {
                what: "deleting a duplicate SignetIdentity",
                source,
            }),
        }
    }
}
