//! The registry of open proxied connections.
//!
//! Both directions decide through `policy::decide`; each connection it lets through is
//! registered with the verdict that admitted it. When the state changes, [`Connections::recheck`] decides
//! every open connection again against the new snapshot and closes (resets) the ones the new
//! policy no longer allows: a deny, a workload that left the node, or HTTP rules that differ
//! from the ones the connection is being checked against. What this module does not do: move
//! bytes (that is `hbone::pump`) or count them (`admin::metrics`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use signet_ca::SpiffeId;
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::Metrics;
use crate::flow::Reporter;
use crate::policy::decide::{Verdict, decide};
use crate::state::snapshot::Snapshot;

/// One open connection, as policy sees it.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The generation of the snapshot the verdict was decided under.
    pub generation: u64,
    pub reporter: Reporter,
    /// The workload on this node.
    pub local: IpAddr,
    /// The other workload's identity.
    pub peer: SpiffeId,
    /// Destination port.
    pub port: u16,
    pub verdict: Verdict,
    /// For the log line when it is closed.
    pub source: String,
    pub destination: String,
}

/// The open connections of one agent. The lock is held only to add, remove or copy out
/// entries: deciding them again after a policy change happens outside it, so a recheck does
/// not stall accepts and closes; the open counts are atomics, so a scrape takes no lock.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    outbound: AtomicUsize,
    inbound: AtomicUsize,
    /// The snapshot the last recheck decided under: a connection registered after that
    /// recheck copied the entries, but decided under an older snapshot, is decided again here.
    latest: Mutex<Option<Arc<Snapshot>>>,
}

type Entry = (Arc<Tracked>, CancellationToken);

/// Keeps a connection registered while alive; `closed()` fires when policy closes it.
#[derive(Debug)]
pub struct Registration {
    conns: Arc<Connections>,
    id: u64,
    reporter: Reporter,
    stop: CancellationToken,
}

impl Registration {
    /// Completes when a policy change has closed this connection.
    pub async fn closed(&self) {
        self.stop.cancelled().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
        self.conns
            .counter(self.reporter)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counter(&self, reporter: Reporter) -> &AtomicUsize {
        match reporter {
            Reporter::Outbound => &self.outbound,
            Reporter::Inbound => &self.inbound,
        }
    }

    pub fn register(self: &Arc<Self>, tracked: Tracked) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        let reporter = tracked.reporter;
        let tracked = Arc::new(tracked);
        self.counter(reporter).fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (tracked.clone(), stop.clone()));
        let registration = Registration {
            conns: self.clone(),
            id,
            reporter,
            stop,
        };
        // Either the recheck's copy held this entry, or the recheck's snapshot is here.
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(snap) = latest.filter(|s| s.generation > tracked.generation) {
            let now = decide(&snap, reporter, tracked.local, &tracked.peer, tracked.port);
            if !tracked.verdict.still_allows(&now.verdict) {
                tracing::info!(
                    reporter = reporter.as_str(),
                    source = %tracked.source,
                    destination = %tracked.destination,
                    port = tracked.port,
                    rule = %now.rule,
                    "flow closed: decided under a policy replaced while it opened"
                );
                registration.stop.cancel();
            }
        }
        registration
    }

    /// Open connections reported by `reporter`.
    pub fn count(&self, reporter: Reporter) -> usize {
        self.counter(reporter).load(Ordering::Relaxed)
    }

    /// (reporter, source, destination, port, verdict) of every open connection, sorted.
    pub fn open_flows(&self) -> Vec<(Reporter, String, String, u16, &'static str)> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|(t, _)| {
                (
                    t.reporter,
                    t.source.clone(),
                    t.destination.clone(),
                    t.port,
                    t.verdict.as_str(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Decides every open connection again under `snap` and closes the ones no longer allowed.
    /// Returns how many were closed.
    pub fn recheck(&self, snap: &Arc<Snapshot>, metrics: &Metrics) -> usize {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
        let open: Vec<Entry> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for (t, stop) in &open {
            let now = decide(snap, t.reporter, t.local, &t.peer, t.port);
            if t.verdict.still_allows(&now.verdict) {
                continue;
            }
            tracing::info!(
                reporter = t.reporter.as_str(),
                source = %t.source,
                destination = %t.destination,
                port = t.port,
                rule = %now.rule,
                verdict = now.verdict.as_str(),
                "flow closed: the policy now in force does not allow it"
            );
            metrics.verdict(t.reporter, &t.source, &t.destination, "deny");
            stop.cancel();
            closed += 1;
        }
        metrics.closed_by_policy(closed as u64);
        closed
    }
}
