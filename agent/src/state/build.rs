//! Builds each new snapshot from the cluster source: reads it (a state directory, or the
//! Kubernetes reflectors with the last valid version of each object), numbers the identities it
//! names (a shared file, or `SignetIdentity` objects read from their reflector and allocated
//! through the API when missing), and compiles policy against the datapath's capacity.
//!
//! Nothing here touches the kernel; `datapath::sync` writes what this builds.

use std::collections::btree_map::Entry;
use std::path::PathBuf;

use signet_ca::TrustDomain;
use signet_policy::identity::{FileAllocator, FixedAllocator, IdentityAllocator};

use super::kube::KubeSource;
use super::lastgood::{LastGood, Refused};
use super::snapshot::{self, EndpointIds, Snapshot};
use crate::config::PodAnnotations;
use crate::state::identities::KubeIdentities;

/// Where the cluster state comes from.
pub enum Source {
    /// A directory of manifests and the identity table beside it.
    Dir {
        state_dir: PathBuf,
        numbers: FileAllocator,
        addresses: super::lbipam::AddressTable,
    },
    /// The API server.
    Kube(Box<Kube>),
}

/// The Kubernetes source: reflectors, and numbers allocated as `SignetIdentity` objects.
pub struct Kube {
    pub objects: KubeSource,
    pub numbers: KubeIdentities,
    /// What the `SignetIdentity` reflector said at the last build, with what was allocated
    /// since.
    pub known: FixedAllocator,
    /// The last valid version of each object, and what was refused last.
    pub last_good: LastGood,
    pub refused: Vec<Refused>,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

/// How often the agent says it still waits for the first list of Kubernetes resources.
const SYNC_WAIT_REPORT: std::time::Duration = std::time::Duration::from_secs(30);

impl Source {
    /// The source of the `cluster` section; in Kubernetes mode once every resource has been
    /// listed (nothing is applied before), with the API client.
    pub async fn connect(
        config: &crate::config::AgentConfig,
        drain: &crate::drain::Drain,
    ) -> anyhow::Result<(Self, Option<kube::Client>)> {
        use anyhow::Context as _;
        match &config.cluster.source {
            crate::config::ClusterSource::Dir {
                state_dir,
                identity_table,
                address_table,
            } => Ok((
                Self::Dir {
                    state_dir: state_dir.clone(),
                    numbers: FileAllocator::new(identity_table),
                    addresses: super::lbipam::AddressTable::new(address_table),
                },
                None,
            )),
            crate::config::ClusterSource::Kubernetes => {
                let client = signet_ca::kubernetes::client(config.cluster.kubeconfig.as_deref())
                    .await
                    .context("connecting to the Kubernetes API")?;
                let objects = KubeSource::start(
                    client.clone(),
                    &config.cluster.gateway_tls_namespace,
                    &drain.stop_token(),
                );
                wait_for_first_list(&objects).await;
                let source = Kube::new(objects, KubeIdentities::new(client.clone()));
                Ok((Self::Kube(Box::new(source)), Some(client)))
            }
        }
    }
}

async fn wait_for_first_list(source: &KubeSource) {
    let started = std::time::Instant::now();
    let synced = source.synced();
    tokio::pin!(synced);
    loop {
        tokio::select! {
            () = &mut synced => break,
            () = tokio::time::sleep(SYNC_WAIT_REPORT) => tracing::warn!(
                waited_seconds = started.elapsed().as_secs(),
                "still waiting for the first list of Kubernetes resources; not ready"
            ),
        }
    }
    tracing::info!("Kubernetes resources synced");
}

impl Kube {
    pub fn new(objects: KubeSource, numbers: KubeIdentities) -> Self {
        Self {
            objects,
            numbers,
            known: FixedAllocator::default(),
            last_good: LastGood::default(),
            refused: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir { state_dir, .. } => f
                .debug_struct("Dir")
                .field("state_dir", state_dir)
                .finish_non_exhaustive(),
            Source::Kube(k) => k.fmt(f),
        }
    }
}

/// Builds snapshots for one node.
#[derive(Debug)]
pub struct Builder {
    pub source: Source,
    pub trust_domain: TrustDomain,
    pub node: String,
    pub annotations: PodAnnotations,
    endpoint_ids: EndpointIds,
}

impl Builder {
    pub fn new(
        source: Source,
        trust_domain: TrustDomain,
        node: String,
        annotations: PodAnnotations,
    ) -> Self {
        Self {
            source,
            trust_domain,
            node,
            annotations,
            endpoint_ids: EndpointIds::default(),
        }
    }

    /// The Kubernetes source, in that mode.
    pub fn kube(&self) -> Option<&KubeSource> {
        match &self.source {
            Source::Kube(k) => Some(&k.objects),
            Source::Dir { .. } => None,
        }
    }

    /// The objects refused at the last build, each with why and what stands in for it
    /// (Kubernetes mode; a state directory is refused or taken whole).
    pub fn refused(&self) -> Vec<String> {
        match &self.source {
            Source::Kube(k) => k
                .refused
                .iter()
                .map(|r| format!("{}: {} ({})", r.object, r.reason, r.in_force))
                .collect(),
            Source::Dir { .. } => Vec::new(),
        }
    }

    /// The state directory, in standalone mode.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        match &self.source {
            Source::Dir { state_dir, .. } => Some(state_dir),
            Source::Kube(_) => None,
        }
    }

    /// The next snapshot, whose policy fits `policy_capacity` entries. `previous` is the one in
    /// force: its compiled policy is the base of the new one, and only what changed since it
    /// is logged.
    pub async fn build(
        &mut self,
        previous: Option<&Snapshot>,
        policy_capacity: usize,
    ) -> anyhow::Result<Snapshot> {
        let td = &self.trust_domain;
        let (loaded, allocator): (_, &dyn IdentityAllocator) = match &mut self.source {
            Source::Dir {
                state_dir,
                numbers,
                addresses,
            } => {
                // Addresses are given out under the table's lock, then the snapshot is built
                // with the record as written (a directory that does not read is refused below
                // with its errors, and nothing is given out for it).
                let mut errors = Vec::new();
                let objects = snapshot::read_objects(state_dir, &mut errors);
                let record = if errors.is_empty() {
                    addresses.settle(&objects)?.outcome.record
                } else {
                    addresses.read()?
                };
                (
                    snapshot::load_source(snapshot::Source::DirWith(state_dir, &record), td)?,
                    numbers,
                )
            }
            Source::Kube(k) => {
                let Kube {
                    objects,
                    numbers,
                    known,
                    last_good,
                    refused,
                } = &mut **k;
                let mut current = objects.objects();
                let now = last_good.settle(&mut current);
                for r in now.iter().filter(|r| !refused.contains(r)) {
                    tracing::warn!(object = %r.object, reason = %r.reason, "{} refused: {}", r.object, r.in_force);
                }
                *refused = now;
                let loaded = snapshot::load_source(snapshot::Source::Objects(&current), td)?;
                // What the SignetIdentity objects say now: a number deleted since the last
                // build no longer stands for its old SPIFFE ID here.
                known.0 = objects.numbers();
                for id in loaded.identities_needed() {
                    if let Entry::Vacant(slot) = known.0.entry(id) {
                        let n = numbers.allocate(slot.key()).await?;
                        slot.insert(n);
                    }
                }
                (loaded, &*known)
            }
        };
        let snap = snapshot::build_loaded(
            loaded,
            self.annotations,
            &self.node,
            allocator,
            &mut self.endpoint_ids,
            previous,
            policy_capacity,
        )?;
        for (ip, why) in &snap.refused_ips {
            if previous.is_none_or(|p| p.refused_ips.get(ip) != Some(why)) {
                tracing::warn!(%ip, "address refused to every pod until one owns it: {why}");
            }
        }
        for pod in &snap.ignored_annotations {
            if previous.is_none_or(|p| !p.ignored_annotations.contains(pod)) {
                tracing::warn!(
                    pod,
                    "placement annotations (signet.dev/cgroup, -netns, -host-interface) ignored: \
                     this agent does not run the local topology (localTopology: true)"
                );
            }
        }
        Ok(snap)
    }
}
