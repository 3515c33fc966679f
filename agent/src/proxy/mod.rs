//! The node proxy: outbound (captured connections into HBONE tunnels) and inbound (HBONE
//! streams authorised by identity policy and connected to workloads); the Gateway listeners
//! (`crate::gateway::server`) share its context with a connection budget of their own.

pub mod balance;
pub mod coalesce;
pub mod conns;
pub mod forward;
pub mod hbone;
pub mod inbound;
pub mod l7;
pub mod mesh;
pub mod outbound;
pub mod refusal;
pub mod resilience;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use signet_ca::TrustDomain;
use signet_ca::peers::PerSource;
use signet_ca::verify::SvidRoots;
use tokio::sync::Semaphore;

use crate::admin::metrics::{FlowCounters, Metrics};
use crate::certs::CertManager;
use crate::flow::Reporter;
use crate::state::snapshot::Snapshot;

/// What both directions of the proxy share.
#[derive(Clone)]
pub struct ProxyContext {
    /// The snapshot in force; swapped whole when the state changes.
    pub snapshot: Arc<RwLock<Arc<Snapshot>>>,
    pub certs: CertManager,
    pub roots: SvidRoots,
    pub trust_domain: TrustDomain,
    pub hbone: hbone::HboneClient,
    /// `SO_MARK` on connections to workloads, so tc knows they come from the proxy.
    pub proxy_mark: u32,
    /// Port of the inbound HBONE listener on every node.
    pub inbound_port: u16,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<conns::Connections>,
    pub limits: Limits,
    /// Routed (L7) requests' node-wide state: upstream pools, endpoint health, budgets.
    pub l7: Arc<forward::Shared>,
    /// Every task of the proxy starts here, so shutdown reaches it.
    pub drain: crate::drain::Drain,
}

/// Timeouts and caps that keep one misbehaving peer from exhausting the proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A tunnel with no byte either way for this long is closed.
    pub idle: Duration,
    /// TLS handshake (inbound) and connect + handshake (outbound).
    pub handshake: Duration,
    /// TCP connect: to a peer node's HBONE port, and from the inbound side to a workload.
    pub connect: Duration,
    /// Captured workload connections open at once; more are reset.
    pub outbound_slots: Arc<Semaphore>,
    /// ... of which one pod (one source address) may hold this many.
    pub per_pod: Arc<PerSource>,
    /// Inbound mTLS connections open at once; more are closed before the handshake.
    pub inbound_slots: Arc<Semaphore>,
    /// Gateway (edge) connections open at once, a budget of their own: clients outside the
    /// mesh cannot take the mesh's slots, nor the mesh the edge's.
    pub gateway_slots: Arc<Semaphore>,
    /// ... of which one client address may hold this many (`gateway.trustedProxies` excepted).
    pub gateway_per_client: Arc<PerSource>,
}

/// The connection caps (`Limits`): each at least 1.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub mesh: usize,
    pub per_pod: usize,
    pub gateway: usize,
    pub gateway_per_client: usize,
}

impl Limits {
    pub fn new(idle: Duration, handshake: Duration, connect: Duration, caps: Caps) -> Self {
        Self {
            idle,
            handshake,
            connect,
            outbound_slots: Arc::new(Semaphore::new(caps.mesh)),
            per_pod: PerSource::new(caps.per_pod),
            inbound_slots: Arc::new(Semaphore::new(caps.mesh)),
            gateway_slots: Arc::new(Semaphore::new(caps.gateway)),
            gateway_per_client: PerSource::new(caps.gateway_per_client),
        }
    }
}

impl hbone::ByteCounter for FlowCounters {
    fn add(&self, forward: bool, n: u64) {
        let counter = if forward {
            &self.sent_bytes
        } else {
            &self.received_bytes
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One side of a flow as the node's flow log names it: the identity, its number in `snap`, the
/// address and the pod there.
pub fn peer(snap: &Snapshot, identity: &str, address: Option<SocketAddr>) -> crate::flow::Peer {
    match signet_ca::SpiffeId::parse(identity) {
        Ok(id) => peer_of(snap, &id, address),
        Err(_) => named_peer(snap, crate::flow::Text::copy(identity), None, address),
    }
}

/// [`peer`] of an identity already parsed.
pub fn peer_of(
    snap: &Snapshot,
    identity: &signet_ca::SpiffeId,
    address: Option<SocketAddr>,
) -> crate::flow::Peer {
    let number = snap.identities.get(identity).copied();
    named_peer(snap, identity.shared().into(), number, address)
}

fn named_peer(
    snap: &Snapshot,
    identity: crate::flow::Text,
    number: Option<u32>,
    address: Option<SocketAddr>,
) -> crate::flow::Peer {
    crate::flow::Peer {
        identity,
        number,
        address,
        pod: address
            .and_then(|a| snap.pod_name_by_ip(a.ip()))
            .map(Into::into),
    }
}

/// One proxied connection, counted when it opens and logged as one `flow` line (and one record
/// of the node's flow log) when it ends.
#[derive(Debug)]
pub struct FlowRecord {
    pub reporter: Reporter,
    pub source: String,
    pub destination: String,
    pub target: SocketAddr,
    pub verdict: &'static str,
    pub rule: crate::policy::decide::Rule,
    started: Instant,
    counters: Arc<FlowCounters>,
    /// Both sides as the flow log names them, and the log.
    peers: (crate::flow::Peer, crate::flow::Peer),
    flows: Arc<crate::flow::FlowLog>,
}

impl FlowRecord {
    /// Counts the connection as opened.
    pub fn open(
        metrics: &Metrics,
        reporter: Reporter,
        source: String,
        destination: String,
        target: SocketAddr,
        decision: &crate::policy::decide::Decision,
    ) -> Self {
        let counters = metrics.flow(reporter, &source, &destination);
        counters.opened.fetch_add(1, Ordering::Relaxed);
        // Named fully by `described`; nothing to name when the flow log is off.
        let peers = if metrics.flows().enabled() {
            (
                crate::flow::Peer {
                    identity: crate::flow::Text::copy(&source),
                    ..Default::default()
                },
                crate::flow::Peer {
                    identity: crate::flow::Text::copy(&destination),
                    address: Some(target),
                    ..Default::default()
                },
            )
        } else {
            Default::default()
        };
        match decision.verdict {
            crate::policy::decide::Verdict::Audit => &counters.audited,
            _ => &counters.allowed,
        }
        .fetch_add(1, Ordering::Relaxed);
        Self {
            reporter,
            source,
            destination,
            target,
            verdict: decision.verdict.as_str(),
            rule: decision.rule.clone(),
            started: Instant::now(),
            counters,
            peers,
            flows: metrics.flows().clone(),
        }
    }

    /// Names both sides fully in the flow log: numbers and pods from `snap`, and the source's
    /// address when this node saw it (outbound).
    pub fn described(mut self, snap: &Snapshot, source_address: Option<SocketAddr>) -> Self {
        if !self.flows.enabled() {
            return self;
        }
        self.peers = (
            peer(snap, &self.source, source_address),
            peer(snap, &self.destination, Some(self.target)),
        );
        self
    }

    /// A meter that adds this flow's bytes to its counters as they move.
    pub fn meter(&self) -> hbone::Meter {
        hbone::Meter::for_flow(self.counters.clone(), self.reporter == Reporter::Outbound)
    }

    pub fn finish(&self, meter: &hbone::Meter, error: Option<&std::io::Error>) {
        let end = match error {
            None => "closed".into(),
            Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                format!("idle timeout ({e})").into()
            }
            Some(e) => format!("error: {e}").into(),
        };
        self.log(meter, end);
    }

    pub fn finish_closed_by_policy(&self, meter: &hbone::Meter) {
        self.log(meter, "closed by a policy change".into());
    }

    fn log(&self, meter: &hbone::Meter, end: crate::flow::Text) {
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        let (to_h2, from_h2) = (
            meter.to_h2.load(Ordering::Relaxed),
            meter.from_h2.load(Ordering::Relaxed),
        );
        let (sent, received) = match self.reporter {
            Reporter::Outbound => (to_h2, from_h2),
            Reporter::Inbound => (from_h2, to_h2),
        };
        let duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(
            reporter = self.reporter.as_str(),
            source = %self.source,
            destination = %self.destination,
            dst = %self.target,
            verdict = self.verdict,
            rule = %self.rule,
            sent,
            received,
            duration_ms,
            end = end.as_str(),
            "flow"
        );
        if !self.flows.enabled() {
            return;
        }
        self.flows.push(crate::flow::FlowEntry {
            reporter: self.reporter.as_str().into(),
            source: self.peers.0.clone(),
            destination: self.peers.1.clone(),
            protocol: "tcp".into(),
            verdict: if self.verdict == "audit" {
                "audit"
            } else {
                "forwarded"
            }
            .into(),
            rule: Some(self.rule.to_string()),
            sent,
            received,
            duration_ms,
            end: Some(end),
            ..Default::default()
        });
    }
}

/// Logs, counts and records in the flow log a connection refused by policy or for want of what
/// it needs. `peers` names both sides for the flow log.
pub fn refuse(
    metrics: &Metrics,
    reporter: Reporter,
    peers: (crate::flow::Peer, crate::flow::Peer),
    target: SocketAddr,
    why: &refusal::Refusal,
) {
    let (source, destination) = (peers.0.identity.as_str(), peers.1.identity.as_str());
    if why.is_policy() {
        metrics.verdict(reporter, source, destination, "deny");
    } else {
        metrics.failed(reporter, source, destination, why.label());
    }
    tracing::info!(
        reporter = reporter.as_str(),
        %source,
        %destination,
        dst = %target,
        verdict = "deny",
        reason = why.label(),
        detail = %why,
        "flow"
    );
    let rule = match why {
        refusal::Refusal::Policy { rule } => Some(rule.to_string()),
        _ => None,
    };
    metrics.flows().push(crate::flow::FlowEntry {
        reporter: reporter.as_str().into(),
        protocol: "tcp".into(),
        verdict: "dropped".into(),
        reason: Some(format!("{}: {why}", why.label())),
        rule,
        end: Some("refused".into()),
        source: peers.0,
        destination: peers.1,
        ..Default::default()
    });
}

/// Logs and counts a connection refused before anything was known of it but its peer.
pub fn refuse_unidentified(
    metrics: &Metrics,
    reporter: Reporter,
    peer: SocketAddr,
    why: &refusal::Refusal,
) {
    metrics.failed(
        reporter,
        crate::admin::metrics::UNKNOWN,
        crate::admin::metrics::UNKNOWN,
        why.label(),
    );
    tracing::warn!(
        reporter = reporter.as_str(),
        %peer,
        reason = why.label(),
        "connection refused: {why}"
    );
    metrics.flows().push(crate::flow::FlowEntry {
        reporter: reporter.as_str().into(),
        protocol: "tcp".into(),
        verdict: "dropped".into(),
        reason: Some(format!("{}: {why}", why.label())),
        end: Some("refused".into()),
        source: crate::flow::Peer {
            identity: crate::admin::metrics::UNKNOWN.into(),
            address: Some(peer),
            ..Default::default()
        },
        destination: crate::flow::Peer {
            identity: crate::admin::metrics::UNKNOWN.into(),
            ..Default::default()
        },
        ..Default::default()
    });
}

impl std::fmt::Debug for ProxyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyContext")
            .field("trust_domain", &self.trust_domain)
            .field("inbound_port", &self.inbound_port)
            .finish_non_exhaustive()
    }
}

impl ProxyContext {
    /// What the `proxy`, `gateway` and `listen` sections make of the shared parts.
    pub fn new(
        config: &crate::config::AgentConfig,
        snapshot: &Arc<RwLock<Arc<Snapshot>>>,
        certs: &CertManager,
        roots: &SvidRoots,
        metrics: &Arc<Metrics>,
        connections: &Arc<conns::Connections>,
        drain: &crate::drain::Drain,
    ) -> Self {
        let limits = Limits::new(
            config.proxy.idle_timeout,
            config.proxy.handshake_timeout,
            config.proxy.connect_timeout,
            Caps {
                mesh: config.proxy.max_connections,
                per_pod: config.proxy.max_connections_per_pod,
                gateway: config.gateway.max_connections,
                gateway_per_client: config.gateway.max_connections_per_client,
            },
        );
        let hbone = {
            let (certs, roots) = (certs.clone(), roots.clone());
            let configs = tls::ClientConfigs::default();
            hbone::HboneClient::new(
                Arc::new(move |route| {
                    configs.get(&certs, &roots, &route.source, &route.destination)
                }),
                config.proxy.max_streams_per_connection,
                limits.connect,
                drain.clone(),
            )
        };
        Self {
            snapshot: snapshot.clone(),
            certs: certs.clone(),
            roots: roots.clone(),
            trust_domain: config.trust_domain.clone(),
            hbone,
            proxy_mark: config.datapath.proxy_mark,
            inbound_port: config.listen.inbound.port(),
            metrics: metrics.clone(),
            conns: connections.clone(),
            limits,
            l7: Arc::default(),
            drain: drain.clone(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
