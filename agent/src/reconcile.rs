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

/// How often a state directory is looked at.
const DIR_POLL: Duration = Duration::from_millis(500);
/// How long a burst of watch events may take to settle before one build covers them all.
const WATCH_SETTLE: Duration = Duration::from_millis(100);

/// Builds snapshots and writes them into a datapath.
pub struct Reconciler {
    pub builder: Builder,
    pub datapath: Box<dyn Datapath>,
    pub host: Box<dyn Host + Send>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("builder", &self.builder)
            .finish_non_exhaustive()
    }
}

impl Reconciler {
    /// Builds the next snapshot and writes it into the datapath. On error nothing is swapped
    /// in, and no map that could not hold its new contents was written.
    pub async fn apply(&mut self, previous: Option<&Snapshot>) -> anyhow::Result<Snapshot> {
        let capacity = self.datapath.capacity().policy;
        let snap = self.builder.build(previous, capacity).await?;
        sync::sync(&mut *self.datapath, &*self.host, &snap)?;
        Ok(snap)
    }
}

/// What follows each applied snapshot besides the kernel.
#[derive(Debug)]
pub struct Followers {
    pub certs: CertManager,
    pub connections: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    pub gateways: GatewayPorts,
}

impl Followers {
    /// Brings certificates, open connections and Gateway ports in step with `snap`.
    pub fn follow(&mut self, snap: &Arc<Snapshot>) -> usize {
        self.certs.set_identities(&snap.local_identities());
        let closed = self.connections.recheck(snap, &self.metrics);
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
    use signet_ca::server::authz::fingerprint;
    let dir = reconciler
        .builder
        .state_dir()
        .map(std::path::Path::to_owned);
    let mut seen = dir.as_deref().map(fingerprint);
    let mut kube = reconciler.builder.kube().map(KubeSource::subscribe);
    loop {
        match (&dir, &mut kube) {
            // Standalone: poll the directory's fingerprint.
            (Some(dir), _) => {
                tokio::select! {
                    () = drain.stopping() => return,
                    () = tokio::time::sleep(DIR_POLL) => {}
                }
                let now = Some(fingerprint(dir));
                if now == seen {
                    continue;
                }
                seen = now;
            }
            // Kubernetes: wait for a watch event, then let a burst of them settle.
            (None, Some(changes)) => {
                tokio::select! {
                    () = drain.stopping() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(WATCH_SETTLE).await;
            }
            (None, None) => return,
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
