//! The proxy's counters, rendered in the Prometheus text format (version 0.0.4).
//!
//! Counters are labelled by reporting direction and by source and destination SPIFFE ID, so the
//! number of series grows with the pairs of identities that actually talk, not with connections.
//! A connection looks its [`FlowCounters`] up once and then only touches atomics. Gauges that
//! describe state owned elsewhere (certificate expiry, open connections, readiness) are read at
//! scrape time through [`Gauges`] rather than copied here.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which side of the proxy reports: the source's node (`outbound`) or the destination's
/// (`inbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Outbound,
    Inbound,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Outbound => "outbound",
            Reporter::Inbound => "inbound",
        }
    }
}

/// Identity label used when one side is not known (a connection refused before it was
/// identified).
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowLabels {
    reporter: Reporter,
    source: String,
    destination: String,
}

/// The counters of one (reporter, source, destination).
#[derive(Debug, Default)]
pub struct FlowCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the source towards the destination.
    pub sent_bytes: AtomicU64,
    /// Bytes from the destination back to the source.
    pub received_bytes: AtomicU64,
    /// Connections admitted by policy (verdict `allow`) and admitted in audit mode (`audit`):
    /// counted here, with the other counters of the flow, so opening a connection takes one
    /// lookup. Refusals are rarer and go to `Metrics::verdict`.
    pub allowed: AtomicU64,
    pub audited: AtomicU64,
}

/// State owned by other parts of the agent, read when Prometheus scrapes.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// (identity, notAfter as Unix seconds) for each certificate in force.
    pub certificate_expiry: Vec<(String, u64)>,
    /// Open connections by reporter.
    pub open_connections: Vec<(Reporter, usize)>,
    /// Open pooled HBONE connections to other nodes.
    pub hbone_pool_connections: usize,
    /// Addresses no pod owns because their claims conflict (`Snapshot::refused_ips`).
    pub refused_addresses: usize,
    pub ready: bool,
}

/// All counters of one agent.
#[derive(Debug, Default)]
pub struct Metrics {
    flows: Mutex<HashMap<FlowLabels, Arc<FlowCounters>>>,
    /// (reporter, source, destination, reason) → connections that failed after being accepted.
    failed: Mutex<BTreeMap<(FlowLabels, &'static str), u64>>,
    /// (reporter, source, destination, verdict) → policy decisions.
    verdicts: Mutex<BTreeMap<(FlowLabels, &'static str), u64>>,
    /// (reporter, reason) → TLS handshakes that did not complete.
    handshake_failures: Mutex<BTreeMap<(Reporter, &'static str), u64>>,
    /// Connections closed because a policy change no longer allowed them.
    closed_by_policy: AtomicU64,
    /// Flows the kernel reported, by what it did and why.
    kernel: Mutex<BTreeMap<KernelLabels, u64>>,
    /// Kernel flow events not logged because the log was over its rate (still counted).
    kernel_unlogged: AtomicU64,
}

/// Labels of a flow the datapath reported: the direction it was decided in, the verdict, the
/// reason, and both sides' identities (SPIFFE IDs, or reserved names such as `world`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelLabels {
    pub direction: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub source: String,
    pub destination: String,
}

impl Metrics {
    /// The counters for this (reporter, source, destination); created on first use.
    pub fn flow(&self, reporter: Reporter, source: &str, destination: &str) -> Arc<FlowCounters> {
        let labels = labels(reporter, source, destination);
        lock(&self.flows).entry(labels).or_default().clone()
    }

    pub fn failed(
        &self,
        reporter: Reporter,
        source: &str,
        destination: &str,
        reason: &'static str,
    ) {
        *lock(&self.failed)
            .entry((labels(reporter, source, destination), reason))
            .or_default() += 1;
    }

    /// One policy decision: `allow`, `deny`, `audit`, `l7_deny` for a refused request, or
    /// `l7_bad_path` for one whose path servers would read differently (400).
    pub fn verdict(
        &self,
        reporter: Reporter,
        source: &str,
        destination: &str,
        verdict: &'static str,
    ) {
        *lock(&self.verdicts)
            .entry((labels(reporter, source, destination), verdict))
            .or_default() += 1;
    }

    pub fn handshake_failed(&self, reporter: Reporter, reason: &'static str) {
        *lock(&self.handshake_failures)
            .entry((reporter, reason))
            .or_default() += 1;
    }

    pub fn closed_by_policy(&self, n: u64) {
        self.closed_by_policy.fetch_add(n, Ordering::Relaxed);
    }

    /// One flow event from the kernel.
    pub fn kernel_flow(&self, labels: KernelLabels) {
        *lock(&self.kernel).entry(labels).or_default() += 1;
    }

    /// Kernel flow events that were counted but not logged.
    pub fn kernel_unlogged(&self, n: u64) {
        self.kernel_unlogged.fetch_add(n, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let mut flows: Vec<(FlowLabels, Arc<FlowCounters>)> = lock(&self.flows)
            .iter()
            .map(|(l, c)| (l.clone(), c.clone()))
            .collect();
        flows.sort_by(|a, b| a.0.cmp(&b.0));
        let counters: [(&str, &str, CounterOf); 4] = [
            (
                "signet_connections_opened_total",
                "Connections the proxy opened (policy allowed, tunnel established).",
                |c| &c.opened,
            ),
            (
                "signet_connections_closed_total",
                "Connections that ended after being opened.",
                |c| &c.closed,
            ),
            (
                "signet_tcp_sent_bytes_total",
                "Bytes from source to destination.",
                |c| &c.sent_bytes,
            ),
            (
                "signet_tcp_received_bytes_total",
                "Bytes from destination back to source.",
                |c| &c.received_bytes,
            ),
        ];
        for (name, help, field) in counters {
            header(&mut out, name, help, "counter");
            for (l, c) in &flows {
                sample(
                    &mut out,
                    name,
                    &flow_labels(l, None),
                    field(c).load(Ordering::Relaxed),
                );
            }
        }
        header(
            &mut out,
            "signet_connections_failed_total",
            "Connections refused or broken after accept, by reason.",
            "counter",
        );
        for ((l, reason), n) in lock(&self.failed).iter() {
            sample(
                &mut out,
                "signet_connections_failed_total",
                &flow_labels(l, Some(("reason", reason))),
                *n,
            );
        }
        header(
            &mut out,
            "signet_policy_verdicts_total",
            "Identity policy decisions, by verdict.",
            "counter",
        );
        let mut verdicts = lock(&self.verdicts).clone();
        for (l, c) in &flows {
            for (verdict, n) in [("allow", &c.allowed), ("audit", &c.audited)] {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    *verdicts.entry((l.clone(), verdict)).or_default() += n;
                }
            }
        }
        for ((l, verdict), n) in &verdicts {
            sample(
                &mut out,
                "signet_policy_verdicts_total",
                &flow_labels(l, Some(("verdict", verdict))),
                *n,
            );
        }
        header(
            &mut out,
            "signet_tls_handshake_failures_total",
            "mTLS handshakes that did not complete, by reason.",
            "counter",
        );
        for ((reporter, reason), n) in lock(&self.handshake_failures).iter() {
            sample(
                &mut out,
                "signet_tls_handshake_failures_total",
                &format!("reporter=\"{}\",reason=\"{}\"", reporter.as_str(), reason),
                *n,
            );
        }
        header(
            &mut out,
            "signet_connections_closed_by_policy_total",
            "Established connections closed because a policy change no longer allowed them.",
            "counter",
        );
        sample(
            &mut out,
            "signet_connections_closed_by_policy_total",
            "",
            self.closed_by_policy.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "signet_datapath_flows_total",
            "Flows the kernel datapath reported (every refusal; allowed ones when sampled), by direction, verdict and reason.",
            "counter",
        );
        for (l, n) in lock(&self.kernel).iter() {
            sample(
                &mut out,
                "signet_datapath_flows_total",
                &format!(
                    "direction=\"{}\",verdict=\"{}\",reason=\"{}\",source=\"{}\",destination=\"{}\"",
                    l.direction,
                    l.verdict,
                    l.reason,
                    escape(&l.source),
                    escape(&l.destination)
                ),
                *n,
            );
        }
        header(
            &mut out,
            "signet_datapath_flow_log_suppressed_total",
            "Kernel flow events counted but not logged: the flow log was over its rate.",
            "counter",
        );
        sample(
            &mut out,
            "signet_datapath_flow_log_suppressed_total",
            "",
            self.kernel_unlogged.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "signet_connections_open",
            "Connections open now.",
            "gauge",
        );
        for (reporter, n) in &gauges.open_connections {
            sample(
                &mut out,
                "signet_connections_open",
                &format!("reporter=\"{}\"", reporter.as_str()),
                *n as u64,
            );
        }
        header(
            &mut out,
            "signet_hbone_pool_connections",
            "Pooled HTTP/2 connections to other nodes' proxies.",
            "gauge",
        );
        sample(
            &mut out,
            "signet_hbone_pool_connections",
            "",
            gauges.hbone_pool_connections as u64,
        );
        header(
            &mut out,
            "signet_refused_addresses",
            "Pod addresses refused until their claims are resolved (two pods, a node's own, outside the node's podCIDRs).",
            "gauge",
        );
        sample(
            &mut out,
            "signet_refused_addresses",
            "",
            gauges.refused_addresses as u64,
        );
        header(
            &mut out,
            "signet_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate in force, per workload identity.",
            "gauge",
        );
        for (id, t) in &gauges.certificate_expiry {
            sample(
                &mut out,
                "signet_certificate_expiry_timestamp_seconds",
                &format!("identity=\"{}\"", escape(id)),
                *t,
            );
        }
        header(
            &mut out,
            "signet_ready",
            "1 when every local workload has a certificate and the datapath is attached.",
            "gauge",
        );
        sample(&mut out, "signet_ready", "", u64::from(gauges.ready));
        out
    }
}

/// Picks one counter out of a flow's.
type CounterOf = fn(&FlowCounters) -> &AtomicU64;

fn labels(reporter: Reporter, source: &str, destination: &str) -> FlowLabels {
    FlowLabels {
        reporter,
        source: source.to_owned(),
        destination: destination.to_owned(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn flow_labels(l: &FlowLabels, extra: Option<(&str, &str)>) -> String {
    let mut s = format!(
        "reporter=\"{}\",source=\"{}\",destination=\"{}\"",
        l.reporter.as_str(),
        escape(&l.source),
        escape(&l.destination)
    );
    if let Some((k, v)) = extra {
        let _ = write!(s, ",{k}=\"{}\"", escape(v));
    }
    s
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_labels_and_escaping() {
        let m = Metrics::default();
        let a = "spiffe://td/ns/shop/sa/web";
        let b = "spiffe://td/ns/pay/sa/api";
        let f = m.flow(Reporter::Outbound, a, b);
        f.opened.fetch_add(2, Ordering::Relaxed);
        f.sent_bytes.fetch_add(100, Ordering::Relaxed);
        // The same labels give the same counters.
        m.flow(Reporter::Outbound, a, b)
            .opened
            .fetch_add(1, Ordering::Relaxed);
        m.verdict(Reporter::Inbound, a, b, "deny");
        m.verdict(Reporter::Inbound, a, b, "deny");
        // Admissions are counted with the flow and render among the verdicts.
        m.flow(Reporter::Inbound, a, b)
            .allowed
            .fetch_add(4, Ordering::Relaxed);
        m.failed(Reporter::Outbound, a, UNKNOWN, "no_pod");
        m.handshake_failed(Reporter::Inbound, "no_client_certificate");
        let text = m.render(&Gauges {
            certificate_expiry: vec![("we\"ird".into(), 1_800_000_000)],
            open_connections: vec![(Reporter::Outbound, 3)],
            hbone_pool_connections: 1,
            refused_addresses: 2,
            ready: true,
        });
        let want = [
            format!(
                "signet_connections_opened_total{{reporter=\"outbound\",source=\"{a}\",destination=\"{b}\"}} 3"
            ),
            format!(
                "signet_tcp_sent_bytes_total{{reporter=\"outbound\",source=\"{a}\",destination=\"{b}\"}} 100"
            ),
            format!(
                "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{a}\",destination=\"{b}\",verdict=\"deny\"}} 2"
            ),
            format!(
                "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{a}\",destination=\"{b}\",verdict=\"allow\"}} 4"
            ),
            format!(
                "signet_connections_failed_total{{reporter=\"outbound\",source=\"{a}\",destination=\"unknown\",reason=\"no_pod\"}} 1"
            ),
            "signet_tls_handshake_failures_total{reporter=\"inbound\",reason=\"no_client_certificate\"} 1".into(),
            "signet_certificate_expiry_timestamp_seconds{identity=\"we\\\"ird\"} 1800000000".into(),
            "signet_connections_open{reporter=\"outbound\"} 3".into(),
            "signet_ready 1".into(),
            "# TYPE signet_connections_opened_total counter".into(),
        ];
        for line in want {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
    }
}
