//! Policy decisions for proxied connections, and the registry of open ones.
//!
//! Both directions decide through [`decide`]; each connection it lets through is registered
//! with the verdict that admitted it. When the state changes, [`Connections::recheck`] decides
//! every open connection again against the new snapshot and closes (resets) the ones the new
//! policy no longer allows: a deny, a workload that left the node, or HTTP rules that differ
//! from the ones the connection is being checked against. What this module does not do: move
//! bytes (that is `hbone::pump`) or count them (`admin::metrics`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use signet_ca::SpiffeId;
use signet_policy::compile::Action;
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;
use tokio_util::sync::CancellationToken;

use crate::admin::metrics::Metrics;
use crate::flow::Reporter;
use crate::state::snapshot::Snapshot;

pub use crate::state::snapshot::L7Rules;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed, but an audit-mode policy would deny it.
    Audit,
    Deny,
    /// Allowed at L4; every request must match one of these rules.
    L7(Arc<L7Rules>),
    /// The local workload is no longer on this node.
    Gone,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Audit => "audit",
            Verdict::Deny | Verdict::Gone => "deny",
            Verdict::L7(_) => "allow_l7",
        }
    }

    /// Whether a connection admitted under `self` may stay open under `now`.
    fn still_allows(&self, now: &Verdict) -> bool {
        match now {
            Verdict::Deny | Verdict::Gone => false,
            Verdict::Allow | Verdict::Audit => true,
            Verdict::L7(rules) => matches!(self, Verdict::L7(old) if old == rules),
        }
    }
}

/// A verdict and the rule that gave it (`default allow` / `default deny` when no rule did).
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Rule,
}

/// What decided a connection; named only when a line is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    DefaultAllow,
    DefaultDeny,
    /// The local address is not a pod of this node.
    NotLocal(IpAddr),
    /// A compiled rule, by its name (`namespace/name ingress[0]`).
    Named(Arc<str>),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::DefaultAllow => f.write_str("default allow"),
            Rule::DefaultDeny => f.write_str("default deny"),
            Rule::NotLocal(ip) => write!(f, "{ip} is not a pod of this node"),
            Rule::Named(n) => f.write_str(n),
        }
    }
}

impl From<&str> for Rule {
    fn from(name: &str) -> Self {
        Rule::Named(Arc::from(name))
    }
}

/// Decides a connection between `local` (a workload on this node: the client for `Outbound`,
/// the target for `Inbound`) and the workload identified as `peer`, on destination `port`.
pub fn decide(
    snap: &Snapshot,
    reporter: Reporter,
    local: IpAddr,
    peer: &SpiffeId,
    port: u16,
) -> Decision {
    let Some(ep) = snap.local_by_ip(local) else {
        return Decision {
            verdict: Verdict::Gone,
            rule: Rule::NotLocal(local),
        };
    };
    let direction = match reporter {
        Reporter::Outbound => Direction::Egress,
        Reporter::Inbound => Direction::Ingress,
    };
    let number = snap
        .identities
        .get(peer)
        .copied()
        .unwrap_or(signet_policy::identity::WORLD);
    let found = snap
        .compiled
        .lookup(ep.id, direction, number, port, Protocol::Tcp);
    let rule = match found {
        Some((_, e)) => match (snap.rules.names.get(&e.rule), e.action) {
            (Some(name), _) => Rule::Named(name.clone()),
            (None, Action::Deny) => Rule::DefaultDeny,
            (None, _) => Rule::DefaultAllow,
        },
        None => Rule::DefaultAllow,
    };
    let verdict = match found.map(|(k, e)| (k, e.action)) {
        None | Some((_, Action::Allow)) => Verdict::Allow,
        Some((_, Action::Deny)) => Verdict::Deny,
        Some((_, Action::Audit)) => Verdict::Audit,
        // Egress `http` rules are not enforced by the source's proxy (the destination's
        // ingress rules are); at L4 the connection is allowed.
        Some((_, Action::L7)) if reporter == Reporter::Outbound => Verdict::Allow,
        Some((key, Action::L7)) => {
            Verdict::L7(snap.rules.l7.get(&key).cloned().unwrap_or_default())
        }
    };
    Decision { verdict, rule }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use signet_policy::model::HttpMatch;

    fn rules(path: &str) -> Verdict {
        Verdict::L7(Arc::new(vec![(
            "p/ingress/0".into(),
            vec![HttpMatch {
                methods: vec!["GET".into()],
                paths: vec![signet_policy::model::PathMatcher::Prefix(path.into())],
                headers: vec![],
                normalization: Default::default(),
            }],
        )]))
    }

    #[test]
    fn a_connection_stays_only_while_still_allowed_as_admitted() {
        use Verdict::*;
        assert!(Allow.still_allows(&Allow));
        assert!(Allow.still_allows(&Audit));
        assert!(!Allow.still_allows(&Deny));
        assert!(!Audit.still_allows(&Gone));
        // Raw bytes cannot become inspected requests mid-stream.
        assert!(!Allow.still_allows(&rules("/a")));
        assert!(rules("/a").still_allows(&rules("/a")));
        assert!(!rules("/a").still_allows(&rules("/b")));
        // Fewer restrictions: requests are still checked against the old, stricter rules.
        assert!(rules("/a").still_allows(&Allow));
    }
}
