//! Garbage collection of numeric identities in Kubernetes mode: a `SignetIdentity` whose SPIFFE
//! ID no workload or Gateway uses any more is deleted once it has stayed unused for a grace
//! period (a pod being rescheduled keeps its number). Run by the one agent holding the Lease
//! (`lease`), so collectors never race; deletes carry the uid seen, so an object re-created
//! meanwhile is left alone.
//!
//! A deleted number is quarantined: its finalizer (`state::identities::QUARANTINE`) keeps it, terminating and
//! meaning nothing, so it is not issued again while some node may still hold its old meaning.
//! After `quarantine` (longer than the grace period) the collector lifts the finalizer and the
//! number is gone. A number created without the finalizer (by an older agent) is deleted at
//! once, so the highest of those is kept, as before: the next number is above it.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use signet_policy::SignetIdentity;

use crate::state::identities::QUARANTINE;

#[derive(Clone)]
pub struct Collector {
    api: Api<SignetIdentity>,
    grace: Duration,
    quarantine: Duration,
    /// uid → when it was first seen unused.
    unused_since: HashMap<String, jiff::Timestamp>,
    /// The grace period and the quarantine are measured on it.
    clock: crate::clock::Clock,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("grace", &self.grace)
            .field("quarantine", &self.quarantine)
            .finish_non_exhaustive()
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Numbers deleted: now quarantined (or gone, without the finalizer).
    pub deleted: Vec<u32>,
    /// Numbers whose quarantine ended: gone, free to be issued again.
    pub released: Vec<u32>,
}

impl Collector {
    pub fn new(client: kube::Client, grace: Duration, quarantine: Duration) -> Self {
        Self {
            api: Api::all(client),
            grace,
            quarantine,
            unused_since: HashMap::new(),
            clock: crate::clock::Clock::system(),
        }
    }

    /// The same collector reading time from `clock` (tests move it instead of sleeping).
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// One pass: `in_use` are the SPIFFE IDs the cluster needs now.
    pub async fn collect(&mut self, in_use: &BTreeSet<String>) -> Result<Collected, kube::Error> {
        let now = self.clock.timestamp();
        let listed = self.api.list(&ListParams::default()).await?;
        let quarantined = |o: &SignetIdentity| {
            o.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == QUARANTINE))
        };
        // Without the finalizer a deleted number is free at once: keep the highest of those.
        let highest_bare = listed
            .items
            .iter()
            .filter(|o| !quarantined(o))
            .filter_map(|o| o.metadata.name.as_ref()?.parse::<u32>().ok())
            .max();
        // A SPIFFE ID's number is its lowest (`kube::numbers`): a higher duplicate (a lost race,
        // or an agent's forgery) is no one's and goes like an unused one.
        let lowest = crate::state::identities::numbers(listed.items.iter());
        let mut seen = BTreeSet::new();
        let mut done = Collected::default();
        for o in &listed.items {
            let (Some(name), Some(uid)) = (o.metadata.name.clone(), o.metadata.uid.clone()) else {
                continue;
            };
            seen.insert(uid.clone());
            if let Some(deleted_at) = &o.metadata.deletion_timestamp {
                let waited = now.duration_since(deleted_at.0);
                if quarantined(o)
                    && waited
                        >= jiff::SignedDuration::try_from(self.quarantine)
                            .unwrap_or(jiff::SignedDuration::MAX)
                {
                    self.release(o).await?;
                    done.released.extend(name.parse::<u32>().ok());
                }
                continue;
            }
            let is_its_number = signet_ca::SpiffeId::parse(&o.spec.spiffe_id)
                .ok()
                .and_then(|id| lowest.get(&id).copied())
                == name.parse().ok();
            if (in_use.contains(&o.spec.spiffe_id) && is_its_number)
                || (!quarantined(o) && name.parse().ok() == highest_bare)
            {
                self.unused_since.remove(&uid);
                continue;
            }
            let since = *self.unused_since.entry(uid.clone()).or_insert(now);
            if now.duration_since(since)
                < jiff::SignedDuration::try_from(self.grace).unwrap_or(jiff::SignedDuration::MAX)
            {
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
                    tracing::info!(number = %name, identity = %o.spec.spiffe_id, quarantine_seconds = self.quarantine.as_secs(), "unused numeric identity deleted; quarantined");
                    self.unused_since.remove(&uid);
                    done.deleted.extend(name.parse::<u32>().ok());
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        // Forget objects that are gone.
        self.unused_since.retain(|uid, _| seen.contains(uid));
        Ok(done)
    }

    /// Lifts the quarantine of a number being deleted (only if it is still the version seen).
    async fn release(&self, o: &SignetIdentity) -> Result<(), kube::Error> {
        let name = o.metadata.name.clone().unwrap_or_default();
        let rest: Vec<String> = o
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != QUARANTINE)
            .cloned()
            .collect();
        let patch = serde_json::json!({
            "metadata": {"finalizers": rest, "resourceVersion": o.metadata.resource_version},
        });
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(number = %name, "numeric identity released after its quarantine");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// While this agent holds the Lease, deletes numeric identities unused for the grace period.
pub async fn run(
    elector: signet_ca::kubernetes::Elector,
    mut collector: Collector,
    source: crate::state::kube::KubeSource,
    td: signet_ca::TrustDomain,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    // The Lease is renewed more often than it expires, whatever the collection interval.
    let mut tick = tokio::time::interval(every.min(Duration::from_secs(10)));
    let mut last_collect: Option<std::time::Instant> = None;
    let mut last_good = crate::state::lastgood::LastGood::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match elector.try_lead().await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "identity collector Lease");
                continue;
            }
        }
        if last_collect.is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        last_collect = Some(std::time::Instant::now());
        let mut objects = source.objects();
        // Identities in use are those of workloads and Gateways; policies do not change them.
        // An invalid Node or Pod counts in its last valid version, as the reconciler has it.
        objects.policy.policies.clear();
        last_good.settle(&mut objects);
        let in_use = match crate::state::snapshot::identities_needed(
            crate::state::snapshot::Source::Objects(&objects),
            &td,
        ) {
            Ok(ids) => ids.into_iter().map(|i| i.as_str().to_owned()).collect(),
            // Never collect from a view that does not load: it may be missing live identities.
            Err(e) => {
                tracing::warn!(error = %e, "identity collection skipped: the cluster view does not load");
                continue;
            }
        };
        if let Err(e) = collector.collect(&in_use).await {
            tracing::warn!(error = %e, "identity collection failed");
        }
    }
}
