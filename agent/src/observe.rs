//! What the kernel did, made visible: flow events from the datapath's ring buffer (every
//! refusal, and allowed connections when sampled) become `flow` log lines with
//! `reporter=kernel`, records of the node's flow log (`signet observe`) and
//! `signet_datapath_flows_total` counters, with both sides named by their
//! SPIFFE IDs (or reserved names such as `world`) as the snapshot in force knows them.
//!
//! A flood of refusals (a port scan, a crafted-packet storm) cannot flood the log: lines are
//! rate-limited and what was not logged is counted (`signet_datapath_flow_log_suppressed_total`);
//! the counters see every event the ring held. The ring itself is bounded: when it is full the
//! kernel drops events, never packets' verdicts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use signet_policy::identity::reserved_name;

use crate::admin::metrics::{KernelLabels, Metrics};
use crate::datapath::events::{EventReader, Flow};
use crate::drain::Drain;
use crate::state::snapshot::Snapshot;

/// Log lines per second, with a burst of this many.
const LINES_PER_SECOND: u32 = 50;
const BURST: u32 = 200;

/// Identity numbers → names, rebuilt when the snapshot changes.
#[derive(Debug, Default)]
struct Names {
    of: Option<Arc<Snapshot>>,
    names: HashMap<u32, String>,
}

impl Names {
    fn name(&mut self, snapshot: &Arc<Snapshot>, n: u32) -> String {
        if self.of.as_ref().is_none_or(|s| !Arc::ptr_eq(s, snapshot)) {
            self.names = snapshot
                .identities
                .iter()
                .map(|(id, n)| (*n, id.to_string()))
                .collect();
            self.of = Some(snapshot.clone());
        }
        match (self.names.get(&n), reserved_name(n)) {
            (Some(id), _) => id.clone(),
            (None, Some(r)) => r.to_owned(),
            // A cidr: identity, or a number this snapshot no longer holds.
            (None, None) => format!("identity:{n}"),
        }
    }
}

/// A token bucket for log lines.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    fn new() -> Self {
        Self {
            tokens: f64::from(BURST),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(LINES_PER_SECOND);
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reports every event `reader` yields until the drain stops.
pub async fn follow(
    mut reader: EventReader,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    metrics: Arc<Metrics>,
    drain: Drain,
) {
    let mut names = Names::default();
    let mut budget = Budget::new();
    loop {
        let batch = tokio::select! {
            () = drain.stopping() => return,
            b = reader.next_batch() => b,
        };
        let snap = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut unlogged = 0;
        for flow in &batch {
            let source = names.name(&snap, flow.src_identity);
            let destination = names.name(&snap, flow.dst_identity);
            if budget.take() {
                log(flow, &source, &destination);
            } else {
                unlogged += 1;
            }
            metrics
                .flows()
                .push(entry(flow, &snap, &source, &destination));
            metrics.kernel_flow(KernelLabels {
                direction: flow.direction.name(),
                verdict: flow.verdict.as_str(),
                reason: flow.reason.name(),
                source,
                destination,
            });
        }
        if unlogged > 0 {
            metrics.kernel_unlogged(unlogged);
            tracing::warn!(
                events = unlogged,
                "kernel flow events over the log's rate: counted, not logged"
            );
        }
    }
}

/// The flow log's record of a kernel event.
fn entry(flow: &Flow, snap: &Snapshot, source: &str, destination: &str) -> crate::flow::FlowEntry {
    use crate::datapath::events::Verdict;
    let side = |identity: &str, number: u32, ip: std::net::IpAddr, port: u16| crate::flow::Peer {
        identity: crate::flow::Text::copy(identity),
        number: Some(number),
        address: Some(std::net::SocketAddr::new(ip, port)),
        pod: snap.pod_name_by_ip(ip).map(Into::into),
    };
    crate::flow::FlowEntry {
        reporter: "kernel".into(),
        source: side(source, flow.src_identity, flow.src, flow.src_port),
        destination: side(destination, flow.dst_identity, flow.dst, flow.dst_port),
        protocol: match flow.protocol {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 | 58 => "icmp".into(),
            n => n.to_string().into(),
        },
        direction: Some(flow.direction.name().into()),
        verdict: match flow.verdict {
            Verdict::Deny | Verdict::Unknown(_) => "dropped",
            Verdict::Audit => "audit",
            Verdict::Allow | Verdict::L7 => "forwarded",
        }
        .into(),
        reason: Some(flow.reason.name().into()),
        rule: snap.rules.names.get(&flow.rule_id).map(|n| n.to_string()),
        ..Default::default()
    }
}

fn log(flow: &Flow, source: &str, destination: &str) {
    let src = std::net::SocketAddr::new(flow.src, flow.src_port);
    let dst = std::net::SocketAddr::new(flow.dst, flow.dst_port);
    tracing::info!(
        reporter = "kernel",
        %source,
        %destination,
        %src,
        %dst,
        protocol = flow.protocol,
        direction = flow.direction.name(),
        verdict = flow.verdict.as_str(),
        reason = flow.reason.name(),
        rule = flow.rule_id,
        endpoint = flow.endpoint_id,
        "flow"
    );
}

/// How often the ring is looked at when it is empty.
pub const POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_its_rate() {
        let mut b = Budget::new();
        let burst = (0..1000).filter(|_| b.take()).count();
        assert_eq!(burst, BURST as usize);
        b.last -= Duration::from_secs(1);
        let after = (0..1000).filter(|_| b.take()).count();
        assert!(
            (LINES_PER_SECOND as usize..=LINES_PER_SECOND as usize + 1).contains(&after),
            "{after}"
        );
    }
}
