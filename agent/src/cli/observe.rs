//! `signet observe [-f] [--since 5m] [filters] [-o compact|json]`: the flows of every node,
//! merged. Each agent keeps its recent flows (`/flows` on its admin port: what the proxy
//! forwarded and refused, requests the L7 check refused, what the kernel dropped); this asks
//! every node of the topology from inside its network namespace, merges by time, filters, and
//! prints one line per flow (or one JSON object). With `-f` it follows all nodes until
//! interrupted. Records a node overwrote before they were read are reported, never skipped in
//! silence.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::status::{Topology, TopologyNode, parse_duration, read_topology, topology_path};
use crate::flow::FlowEntry;

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// The local topology's description (default: $SIGNET_TOPOLOGY, else the demo's).
    #[arg(long, conflicts_with = "kubernetes")]
    topology: Option<PathBuf>,
    /// Find the agents through the Kubernetes API (in-cluster, $KUBECONFIG, or --kubeconfig)
    /// and read each one's flows through a port-forward to its pod.
    #[arg(long)]
    kubernetes: bool,
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Where Signet runs (Kubernetes mode).
    #[arg(long, default_value = "signet-system", requires = "kubernetes")]
    signet_namespace: String,
    /// Follow: print flows as they happen, until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only flows this recent: `90s`, `5m`, `1h`.
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    #[command(flatten)]
    filter: Filter,
    /// `compact` (one line per flow, default) or `json` (one object per line).
    #[arg(short = 'o', long, default_value = "compact")]
    output: Output,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    Compact,
    Json,
}

/// Which flows to show; every given condition must hold.
#[derive(Debug, Clone, Default, Args)]
pub struct Filter {
    /// The source pod, `namespace/name`.
    #[arg(long)]
    pub from_pod: Option<String>,
    /// The destination pod, `namespace/name`.
    #[arg(long)]
    pub to_pod: Option<String>,
    /// Either side in this namespace (by pod, or by SPIFFE ID).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Either side with this identity (a SPIFFE ID; a trailing `*` matches a prefix).
    #[arg(long)]
    pub identity: Option<String>,
    /// `forwarded`, `audit`, `dropped` or `l7-denied`.
    #[arg(long)]
    pub verdict: Option<String>,
    /// `tcp`, `udp`, `icmp`.
    #[arg(long)]
    pub protocol: Option<String>,
    /// The destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// The HTTP status an L7 decision answered.
    #[arg(long)]
    pub http_status: Option<u16>,
}

impl Filter {
    pub fn admits(&self, e: &FlowEntry) -> bool {
        let in_ns = |ns: &str, p: &crate::flow::Peer| {
            p.pod
                .as_deref()
                .is_some_and(|pod| pod.split('/').next() == Some(ns))
                || p.identity.contains(&format!("/ns/{ns}/"))
        };
        let is = |want: &str, id: &str| match want.strip_suffix('*') {
            Some(prefix) => id.starts_with(prefix),
            None => id == want,
        };
        let port = e.destination.address.map(|a| a.port());
        self.from_pod
            .as_ref()
            .is_none_or(|p| e.source.pod.as_ref().is_some_and(|s| s == p))
            && self
                .to_pod
                .as_ref()
                .is_none_or(|p| e.destination.pod.as_ref().is_some_and(|s| s == p))
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| in_ns(ns, &e.source) || in_ns(ns, &e.destination))
            && self
                .identity
                .as_ref()
                .is_none_or(|id| is(id, &e.source.identity) || is(id, &e.destination.identity))
            && self.verdict.as_ref().is_none_or(|v| &e.verdict == v)
            && self.protocol.as_ref().is_none_or(|p| &e.protocol == p)
            && self.port.is_none_or(|p| port == Some(p))
            && self
                .http_status
                .is_none_or(|s| e.http.as_ref().is_some_and(|h| h.status == s))
    }
}

/// One line of a node's `/flows`: a record, or records it lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Line {
    Flow(Box<FlowEntry>),
    Lost { node: String, lost: u64 },
}

fn parse_line(node: &str, line: &str) -> Option<Line> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(n) = v.get("lost").and_then(serde_json::Value::as_u64) {
        return Some(Line::Lost {
            node: node.to_owned(),
            lost: n,
        });
    }
    serde_json::from_value(v)
        .ok()
        .map(|e| Line::Flow(Box::new(e)))
}

pub fn run(args: ObserveArgs) -> u8 {
    // In Kubernetes mode the forwards live as long as this command.
    let mut kube = None;
    let topology = if args.kubernetes {
        super::kube::Kube::connect(args.kubeconfig.as_deref()).and_then(|k| {
            let t = k.forwarded_topology(&args.signet_namespace);
            kube = Some(k);
            t
        })
    } else {
        topology_path(args.topology.as_deref()).and_then(|p| read_topology(&p))
    };
    let topology = match topology {
        Ok(t) => t,
        Err(e) => {
            eprintln!("signet observe: {e}");
            return 2;
        }
    };
    let since_ms = args.since.map_or(0, |d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as u64);
        now.saturating_sub(d.as_millis() as u64)
    });
    // Lines are written as a batch and flushed when no more are waiting: one write per batch,
    // not per record, when flows come by the thousand.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut print = |line: Option<&Line>| {
        let Some(line) = line else {
            return out.flush().is_ok();
        };
        let written = match (args.output, line) {
            (Output::Json, l) => serde_json::to_writer(&mut out, l).map_err(std::io::Error::from),
            (Output::Compact, Line::Flow(e)) => out.write_all(compact(e).as_bytes()),
            (Output::Compact, Line::Lost { node, lost }) => write!(
                out,
                "!! {node}: {lost} flow records lost (this reader was slower than they came)"
            ),
        };
        written.is_ok() && out.write_all(b"\n").is_ok()
    };
    if args.follow {
        return match follow(&topology, since_ms, &args.filter, &mut print) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("signet observe: {e}");
                2
            }
        };
    }
    let collected = collect(&topology, since_ms, &args.filter);
    drop(kube);
    match collected {
        Ok((lines, unreachable)) => {
            for l in &lines {
                if !print(Some(l)) {
                    break;
                }
            }
            print(None);
            for e in &unreachable {
                eprintln!("signet observe: {e}");
            }
            u8::from(!unreachable.is_empty())
        }
        Err(e) => {
            eprintln!("signet observe: {e}");
            2
        }
    }
}

/// Every node's flows since `since_ms` that `filter` admits, merged by time; and the nodes that
/// could not be read, with why.
pub fn collect(
    topology: &Topology,
    since_ms: u64,
    filter: &Filter,
) -> Result<(Vec<Line>, Vec<String>), String> {
    let query = format!("/flows?since_ms={since_ms}");
    let answers: Vec<(String, Result<Vec<Line>, String>)> = std::thread::scope(|s| {
        let asks: Vec<_> = topology
            .nodes
            .iter()
            .map(|n| {
                let query = &query;
                s.spawn(move || {
                    let mut lines = Vec::new();
                    let r = stream(n, query, false, |l| {
                        lines.push(l);
                        true
                    });
                    (n.name.clone(), r.map(|()| lines))
                })
            })
            .collect();
        asks.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err("a reader thread panicked".into())))
            })
            .collect()
    });
    let mut lines = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(l) => lines.extend(l),
            Err(e) => unreachable.push(format!("{node}: {e}")),
        }
    }
    lines.retain(|l| match l {
        Line::Flow(e) => filter.admits(e),
        Line::Lost { .. } => true,
    });
    lines.sort_by_key(|l| match l {
        Line::Flow(e) => (e.time_ms, e.node.to_string(), e.seq),
        Line::Lost { node, .. } => (0, node.clone(), 0),
    });
    Ok((lines, unreachable))
}

/// Follows every node until `each` returns false or every stream has ended; a node whose
/// stream breaks is asked again from the last record seen. `each` gets every line the filter
/// admits, then `None` whenever no more are waiting (the moment to flush what it wrote).
pub fn follow(
    topology: &Topology,
    since_ms: u64,
    filter: &Filter,
    mut each: impl FnMut(Option<&Line>) -> bool,
) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel::<Line>();
    for n in topology.nodes.clone() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut after = 0u64;
            loop {
                let query = format!("/flows?follow=1&since_ms={since_ms}&after={after}");
                let r = stream(&n, &query, true, |l| {
                    if let Line::Flow(e) = &l {
                        after = e.seq;
                    }
                    tx.send(l).is_ok()
                });
                if let Err(e) = r {
                    eprintln!("signet observe: {}: {e}; asking again", n.name);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    }
    drop(tx);
    while let Ok(first) = rx.recv() {
        for line in std::iter::once(first).chain(rx.try_iter()) {
            let shown = match &line {
                Line::Flow(e) => filter.admits(e),
                Line::Lost { .. } => true,
            };
            if shown && !each(Some(&line)) {
                return Ok(());
            }
        }
        if !each(None) {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads a node's `/flows` answer line by line, until it ends or `each` returns false. A
/// follower's reads wait as long as the node is quiet.
fn stream(
    node: &TopologyNode,
    query: &str,
    follow: bool,
    mut each: impl FnMut(Line) -> bool,
) -> Result<(), String> {
    let netns = node.netns.as_deref().map(crate::datapath::netns::path_of);
    let timeout = (!follow).then_some(Duration::from_secs(10));
    super::admin_http::get(netns.as_deref(), node.agent_admin, query, timeout)
        .map_err(|e| node.unreachable(&e))?
        .lines(|line| parse_line(&node.name, line.trim()).is_none_or(&mut each))
}

/// One flow on one line: time, node, reporter, verdict, both sides, protocol, and why.
pub fn compact(e: &FlowEntry) -> String {
    let time = jiff::Timestamp::from_millisecond(e.time_ms as i64)
        .map(|t| t.strftime("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let side = |p: &crate::flow::Peer| {
        let who = p.pod.clone().unwrap_or_else(|| p.identity.clone());
        match &p.address {
            Some(a) => format!("{who} ({a})"),
            None => who.to_string(),
        }
    };
    let mut line = format!(
        "{time} {:<8} {:<8} {:<9} {} -> {} {}",
        e.node,
        e.reporter,
        e.verdict,
        side(&e.source),
        side(&e.destination),
        e.protocol
    );
    if let Some(d) = &e.direction {
        line += &format!("/{d}");
    }
    if let Some(h) = &e.http {
        line += &format!(" {} {} {}", h.method, h.path, h.status);
    }
    if let Some(r) = &e.rule {
        line += &format!(" rule={r}");
    }
    if let Some(r) = &e.reason {
        line += &format!(" reason={r}");
    }
    if e.verdict == "forwarded" || e.verdict == "audit" {
        line += &format!(
            " sent={} received={} {}ms",
            e.sent, e.received, e.duration_ms
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{HttpInfo, Peer};

    fn entry() -> FlowEntry {
        FlowEntry {
            node: "node-b".into(),
            reporter: "inbound".into(),
            source: Peer {
                identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                pod: Some("shop/web-0".into()),
                ..Default::default()
            },
            destination: Peer {
                identity: "spiffe://cluster.local/ns/payments/sa/api".into(),
                address: Some(([10, 99, 21, 2], 8080).into()),
                pod: Some("payments/api-0".into()),
                ..Default::default()
            },
            protocol: "tcp".into(),
            verdict: "l7-denied".into(),
            http: Some(HttpInfo {
                method: "POST".into(),
                path: "/".into(),
                status: 403,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_given_condition_must_hold() {
        let e = entry();
        assert!(Filter::default().admits(&e));
        let f = |f: Filter| f.admits(&e);
        assert!(f(Filter {
            from_pod: Some("shop/web-0".into()),
            to_pod: Some("payments/api-0".into()),
            port: Some(8080),
            http_status: Some(403),
            verdict: Some("l7-denied".into()),
            ..Default::default()
        }));
        assert!(f(Filter {
            namespace: Some("payments".into()),
            identity: Some("spiffe://cluster.local/ns/shop/*".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            from_pod: Some("payments/api-0".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            port: Some(80),
            ..Default::default()
        }));
        assert!(!f(Filter {
            verdict: Some("dropped".into()),
            ..Default::default()
        }));
        assert!(!f(Filter {
            namespace: Some("ops".into()),
            ..Default::default()
        }));
    }

    #[test]
    fn lines_are_records_or_losses() {
        assert_eq!(
            parse_line("node-a", "{\"lost\":3}"),
            Some(Line::Lost {
                node: "node-a".into(),
                lost: 3
            })
        );
        let json = serde_json::to_string(&entry()).expect("json");
        assert_eq!(
            parse_line("node-b", &json),
            Some(Line::Flow(Box::new(entry())))
        );
        assert_eq!(parse_line("node-b", "not json"), None);
        let line = compact(&entry());
        assert!(
            line.contains("node-b   inbound  l7-denied shop/web-0 -> payments/api-0 (10.99.21.2:8080) tcp POST / 403"),
            "{line}"
        );
    }
}
