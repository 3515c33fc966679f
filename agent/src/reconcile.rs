//! The agent's control loop. On each change of the cluster state (a new fingerprint of the state
//! directory, or a Kubernetes watch event), it builds the next snapshot (`state::build`), writes
//! it into the kernel (`datapath::sync`), swaps it in for the proxy, and lets the rest follow:
//! the certificates wanted, the connections already open (closed when policy no longer allows
//! them) and the Gateway ports served. A change that does not build, or does not fit the maps,
//! is logged and the snapshot in force stays, in the kernel and in the proxy alike.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::admin::metrics::Metrics;
use crate::certs::CertManager;
use crate::datapath::Datapath;
use crate::datapath::sync::{self, Host};
use crate::drain::Drain;
use crate::gateway::ports::GatewayPorts;
use crate::proxy::conns::Connections;
use crate::state::build::Builder;
use crate::state::kube::KubeSource;
use crate::state::snapshot::Snapshot;

/// Leader-elected loops' Lease duration.
const LEASE_SECONDS: i32 = 30;

/// How often a state directory is looked at.
const DIR_POLL: Duration = Duration::from_millis(500);
/// How long a burst of watch events may take to settle before one build covers them all.
const WATCH_SETTLE: Duration = Duration::from_millis(100);

/// What the control loop has done with the cluster state, for `/debug/state` and for anyone
/// waiting for a change to be applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The revision of the source last looked at, applied or refused: [`dir_revision`] of the
    /// state directory, or `watch:<n>` for the n-th burst of Kubernetes watch events.
    pub revision: String,
    /// Why that revision was refused (the snapshot in force is an older one), if it was.
    pub refused: Option<String>,
    /// Objects refused one by one while the rest was applied (Kubernetes mode).
    pub refused_objects: Vec<String>,
    /// What the kernel holds since the last snapshot written into it.
    pub datapath: Option<DatapathFill>,
}

/// The datapath as the last applied snapshot left it: each map's entries against its capacity,
/// the programs attached, and the pods it could not place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathFill {
    /// (map, entries, capacity).
    pub maps: Vec<(&'static str, usize, usize)>,
    /// Node-wide programs attached (cgroup hooks).
    pub programs: Vec<String>,
    /// Pod interfaces the tc programs are attached to.
    pub interfaces: Vec<String>,
    /// `namespace/name: why` of local pods the kernel does not enforce.
    pub unplaced: Vec<String>,
}

impl DatapathFill {
    fn of(synced: &sync::Synced, programs: Vec<String>) -> Self {
        Self {
            maps: synced.maps.clone(),
            programs,
            interfaces: synced.interfaces.iter().cloned().collect(),
            unplaced: synced
                .unplaced
                .iter()
                .map(|(pod, why)| format!("{pod}: {why}"))
                .collect(),
        }
    }
}

/// A state directory's revision: a digest of its manifests' names, sizes and mtimes (what the
/// loop polls).
pub fn dir_revision(dir: &std::path::Path) -> String {
    revision_of(&signet_ca::files::fingerprint(dir))
}

fn revision_of(fp: &signet_ca::files::Fingerprint) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    fp.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Builds snapshots and writes them into a datapath.
pub struct Reconciler {
    pub builder: Builder,
    pub datapath: Box<dyn Datapath>,
    pub host: Box<dyn Host + Send>,
    pub progress: Arc<RwLock<Progress>>,
    /// The state directory's fingerprint at the last build (standalone mode).
    seen: Option<signet_ca::files::Fingerprint>,
    /// Builds so far (Kubernetes mode's revision).
    builds: u64,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("builder", &self.builder)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    pub fn new(builder: Builder, datapath: Box<dyn Datapath>, host: Box<dyn Host + Send>) -> Self {
        Self {
            builder,
            datapath,
            host,
            progress: Arc::default(),
            seen: None,
            builds: 0,
        }
    }

    /// Whether the source changed since the last build (standalone: the directory's
    /// fingerprint; Kubernetes: always, the watch said so).
    fn changed(&self) -> bool {
        match self.builder.state_dir() {
            Some(dir) => self.seen.as_ref() != Some(&signet_ca::files::fingerprint(dir)),
            None => true,
        }
    }

    /// Builds the next snapshot and writes it into the datapath. On error nothing is swapped
    /// in, and no map that could not hold its new contents was written.
    pub async fn apply(&mut self, previous: Option<&Snapshot>) -> anyhow::Result<Snapshot> {
        // The revision is taken before reading, so a change written meanwhile is seen next time.
        self.builds += 1;
        let revision = match self.builder.state_dir() {
            Some(dir) => {
                let fp = signet_ca::files::fingerprint(dir);
                let r = revision_of(&fp);
                self.seen = Some(fp);
                r
            }
            None => format!("watch:{}", self.builds),
        };
        let result = self.build_and_sync(previous).await;
        let mut progress = self.progress.write().unwrap_or_else(|p| p.into_inner());
        progress.revision = revision;
        progress.refused_objects = self.builder.refused();
        match result {
            Ok((snap, fill)) => {
                progress.refused = None;
                progress.datapath = Some(fill);
                Ok(snap)
            }
            // What the kernel holds is still the last applied snapshot's.
            Err(e) => {
                progress.refused = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    async fn build_and_sync(
        &mut self,
        previous: Option<&Snapshot>,
    ) -> anyhow::Result<(Snapshot, DatapathFill)> {
        let capacity = self.datapath.capacity().policy;
        let mut snap = self.builder.build(previous, capacity).await?;
        snap.generation = previous.map_or(0, |p| p.generation + 1);
        let synced = sync::sync(&mut *self.datapath, &*self.host, &snap)?;
        let fill = DatapathFill::of(&synced, self.datapath.attached_programs());
        Ok((snap, fill))
    }
}

/// What follows each applied snapshot besides the kernel.
#[derive(Debug)]
pub struct Followers {
    pub certs: CertManager,
    pub connections: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    pub gateways: GatewayPorts,
    pub vips: crate::vip::Vips,
    pub drain: Drain,
}

impl Followers {
    /// Brings certificates, open connections and Gateway ports in step with `snap`.
    pub fn follow(&mut self, snap: &Arc<Snapshot>) -> usize {
        self.certs.set_identities(&snap.local_identities());
        let closed = self.connections.recheck(snap, &self.metrics);
        self.vips.follow(&snap.vips, &self.drain);
        self.gateways.sync(snap);
        closed
    }
}

/// Applies every change of the cluster state until the drain stops.
pub async fn run(
    mut reconciler: Reconciler,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    mut followers: Followers,
    drain: Drain,
) {
    let standalone = reconciler.builder.state_dir().is_some();
    let mut kube = reconciler.builder.kube().map(KubeSource::subscribe);
    loop {
        match (standalone, &mut kube) {
            // Standalone: poll the directory's fingerprint.
            (true, _) => {
                tokio::select! {
                    () = drain.stopping() => return followers.vips.shutdown(),
                    () = tokio::time::sleep(DIR_POLL) => {}
                }
                if !reconciler.changed() {
                    continue;
                }
            }
            (false, Some(changes)) => {
                tokio::select! {
                    () = drain.stopping() => return followers.vips.shutdown(),
                    r = changes.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(WATCH_SETTLE).await;
            }
            (false, None) => return followers.vips.shutdown(),
        }
        let previous = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
        match reconciler.apply(Some(&previous)).await {
            Ok(next) => {
                let next = Arc::new(next);
                *snapshot.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
                let closed = followers.follow(&next);
                tracing::info!(connections_closed = closed, "cluster state applied");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cluster state change refused; the state in force stays")
            }
        }
    }
}

/// The loops one agent of the cluster runs at a time (Kubernetes mode), each under its own
/// Lease: IdentityPolicy and Gateway API status, and collecting numeric identities nobody uses.
pub fn spawn_leader_loops(
    config: &crate::config::AgentConfig,
    client: kube::Client,
    source: KubeSource,
    drain: &Drain,
) {
    let lease = |name: &str| {
        signet_ca::kubernetes::Elector::new(
            client.clone(),
            &config.agent_namespace,
            name,
            &config.node,
            LEASE_SECONDS,
        )
    };
    drain.spawn(
        "policy status",
        crate::policy::status::keep_current(
            lease("signet-status"),
            client.clone(),
            source.clone(),
            config.trust_domain.clone(),
            drain.stop_token(),
        ),
    );
    drain.spawn(
        "identity collector",
        crate::identity::gc::run(
            lease("signet-identity-gc"),
            crate::identity::gc::Collector::new(
                client.clone(),
                config.identity_gc.grace,
                config.identity_gc.quarantine,
            ),
            source,
            config.trust_domain.clone(),
            config.identity_gc.interval,
            drain.stop_token(),
        ),
    );
}
