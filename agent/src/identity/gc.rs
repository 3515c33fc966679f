//! Garbage collection of numeric identities in Kubernetes mode: a `SignetIdentity` whose SPIFFE
//! ID no workload or Gateway uses any more is deleted once it has stayed unused for a grace
//! period (a pod being rescheduled keeps its number). Run by the one agent holding the Lease
//! (`lease`), so collectors never race; deletes carry the uid seen, so an object re-created
//! meanwhile is left alone. The highest number is never deleted, unused or not: new numbers are
//! one above the highest that exists, so keeping it means no number is ever issued again to
//! another SPIFFE ID while some agent may still hold its old meaning.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use signet_policy::SignetIdentity;

#[derive(Clone)]
pub struct Collector {
    api: Api<SignetIdentity>,
    grace: Duration,
    /// uid → when it was first seen unused.
    unused_since: HashMap<String, Instant>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Collector {
    pub fn new(client: kube::Client, grace: Duration) -> Self {
        Self {
            api: Api::all(client),
            grace,
            unused_since: HashMap::new(),
        }
    }

    /// One pass: `in_use` are the SPIFFE IDs the cluster needs now. Returns the numbers deleted.
    pub async fn collect(&mut self, in_use: &BTreeSet<String>) -> Result<Vec<u32>, kube::Error> {
        let now = Instant::now();
        let listed = self.api.list(&ListParams::default()).await?;
        let highest = listed
            .items
            .iter()
            .filter_map(|o| o.metadata.name.as_ref()?.parse::<u32>().ok())
            .max();
        let mut seen = BTreeSet::new();
        let mut deleted = Vec::new();
        for o in listed.items {
            let (Some(name), Some(uid)) = (o.metadata.name.clone(), o.metadata.uid.clone()) else {
                continue;
            };
            seen.insert(uid.clone());
            // The high-water mark stays, so the next number is above it.
            if in_use.contains(&o.spec.spiffe_id) || name.parse().ok() == highest {
                self.unused_since.remove(&uid);
                continue;
            }
            let since = *self.unused_since.entry(uid.clone()).or_insert(now);
            if now.duration_since(since) < self.grace {
                continue;
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.api.delete(&name, &params).await {
                Ok(_) => {
                    tracing::info!(number = %name, identity = %o.spec.spiffe_id, "unused numeric identity deleted");
                    self.unused_since.remove(&uid);
                    if let Ok(n) = name.parse() {
                        deleted.push(n);
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        // Forget objects that are gone.
        self.unused_since.retain(|uid, _| seen.contains(uid));
        Ok(deleted)
    }
}
