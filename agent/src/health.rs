//! What the agent reports about itself on the admin port: readiness (every local workload has a
//! certificate), the gauges read at scrape time, `/status` and `/debug/state`, assembled from the parts
//! that own the facts (snapshot, reconciler progress, certificates, connection registry). The
//! admin server itself (`admin`) knows none of these types.

use std::sync::{Arc, OnceLock, RwLock};

use anyhow::Context as _;

use crate::admin::debug::{DebugState, IdentityState, OpenFlow, PolicyInForce};
use crate::admin::metrics::{Gauges, Metrics};
use crate::admin::status::{self as status_page, AgentStatus};
use crate::admin::{self, AdminState};
use crate::certs::{CertManager, CertState};
use crate::config::AgentConfig;
use crate::drain::Drain;
use crate::flow::Reporter;
use crate::proxy::conns::Connections;
use crate::proxy::hbone::HboneClient;
use crate::reconcile::Progress;
use crate::state::snapshot::Snapshot;

/// Starts the admin port. Until the returned cell is set, readiness reports that the agent is
/// starting and the gauges are empty.
pub async fn serve_admin(
    config: &AgentConfig,
    metrics: &Arc<Metrics>,
    drain: &Drain,
) -> anyhow::Result<(std::net::SocketAddr, Arc<OnceLock<AdminState>>)> {
    let listener = tokio::net::TcpListener::bind(config.listen.admin)
        .await
        .with_context(|| format!("binding admin {}", config.listen.admin))?;
    let address = listener.local_addr().context("admin address")?;
    let running: Arc<OnceLock<AdminState>> = Arc::default();
    let (gauges, readiness, debug) = (running.clone(), running.clone(), running.clone());
    let status = running.clone();
    let node = config.node.clone();
    let status_node = node.clone();
    let state = AdminState {
        metrics: metrics.clone(),
        gauges: Arc::new(move || gauges.get().map(|r| (r.gauges)()).unwrap_or_default()),
        readiness: Arc::new(move || match readiness.get() {
            Some(r) => (r.readiness)(),
            None => Err("starting: waiting for the first sync of the cluster state".into()),
        }),
        debug: Arc::new(move || match debug.get() {
            Some(r) => (r.debug)(),
            None => DebugState {
                node: node.clone(),
                ..DebugState::default()
            },
        }),
        status: Arc::new(move || match status.get() {
            Some(r) => (r.status)(),
            None => AgentStatus {
                node: status_node.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                not_ready: Some("starting: waiting for the first sync of the cluster state".into()),
                ..AgentStatus::default()
            },
        }),
    };
    let header_read = config.admin.header_read;
    drain.spawn(
        "admin",
        admin::serve(listener, state, header_read, drain.clone()),
    );
    Ok((address, running))
}

/// What `/status` and `/debug/state` read, shared by both.
#[derive(Clone)]
struct Parts {
    node: String,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    progress: Arc<RwLock<Progress>>,
    certs: CertManager,
    connections: Arc<Connections>,
}

/// Readiness, gauges, status and debug state of a started agent.
#[allow(clippy::too_many_arguments)]
pub fn running_state(
    config: &AgentConfig,
    snapshot: &Arc<RwLock<Arc<Snapshot>>>,
    progress: &Arc<RwLock<Progress>>,
    certs: &CertManager,
    connections: &Arc<Connections>,
    hbone: HboneClient,
    metrics: &Arc<Metrics>,
) -> AdminState {
    let parts = Parts {
        node: config.node.clone(),
        snapshot: snapshot.clone(),
        progress: progress.clone(),
        certs: certs.clone(),
        connections: connections.clone(),
    };
    let status = {
        let p = parts.clone();
        let mtls = match config.datapath.mtls_mode {
            crate::config::MtlsMode::Strict => "strict",
            crate::config::MtlsMode::Permissive => "permissive",
        };
        Arc::new(move || {
            agent_status(
                &p.node,
                mtls,
                &p.snapshot,
                &p.progress,
                &p.certs,
                &p.connections,
            )
        })
    };
    let debug = {
        let p = parts;
        Arc::new(move || debug_state(&p.node, &p.snapshot, &p.progress, &p.certs, &p.connections))
    };
    let readiness = {
        let (snapshot, certs) = (snapshot.clone(), certs.clone());
        Arc::new(move || readiness(&snapshot, &certs))
    };
    let gauges = {
        let (connections, certs, readiness, snapshot) = (
            connections.clone(),
            certs.clone(),
            readiness.clone(),
            snapshot.clone(),
        );
        Arc::new(move || Gauges {
            refused_addresses: snapshot
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .refused_ips
                .len(),
            certificate_expiry: certs.expiries(),
            open_connections: [Reporter::Outbound, Reporter::Inbound]
                .into_iter()
                .map(|r| (r, connections.count(r)))
                .collect(),
            hbone_pool_connections: hbone.connections(),
            ready: readiness().is_ok(),
        })
    };
    AdminState {
        metrics: metrics.clone(),
        gauges,
        readiness,
        debug,
        status,
    }
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `/status` says: each part as the component that owns it reports it.
fn agent_status(
    node: &str,
    mtls: &str,
    snapshot: &RwLock<Arc<Snapshot>>,
    progress: &RwLock<Progress>,
    certs: &CertManager,
    connections: &Connections,
) -> AgentStatus {
    let snap = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let progress = progress.read().unwrap_or_else(|p| p.into_inner()).clone();
    let ready = readiness(snapshot, certs);
    let mut certificates = status_page::CertificatesStatus::default();
    for (id, state) in certs.states() {
        match state {
            CertState::Initializing => certificates.waiting.push(id.to_string()),
            CertState::Unavailable(_) => {
                certificates.waiting.push(id.to_string());
                certificates.failing.push(id.to_string());
            }
            CertState::Available { cert, last_error } => {
                certificates.held += 1;
                let t = unix(cert.not_after);
                certificates.earliest_expiry =
                    Some(certificates.earliest_expiry.map_or(t, |e| e.min(t)));
                if last_error.is_some() {
                    certificates.failing.push(id.to_string());
                }
            }
        }
    }
    let policies = &snap.state.policies;
    let fill = progress.datapath.unwrap_or_default();
    AgentStatus {
        node: node.to_owned(),
        version: env!("CARGO_PKG_VERSION").into(),
        ready: ready.is_ok(),
        not_ready: ready.err(),
        mtls_mode: mtls.to_owned(),
        generation: snap.generation,
        refused: progress.refused,
        refused_objects: progress.refused_objects,
        datapath: status_page::DatapathStatus {
            programs: fill.programs,
            interfaces: fill.interfaces,
            maps: fill
                .maps
                .into_iter()
                .map(|(name, entries, capacity)| status_page::MapFill {
                    name: name.to_owned(),
                    entries,
                    capacity,
                })
                .collect(),
            unplaced: fill.unplaced,
        },
        certificates,
        connections: status_page::ConnectionsStatus {
            outbound: connections.count(Reporter::Outbound),
            inbound: connections.count(Reporter::Inbound),
        },
        policies: status_page::PoliciesStatus {
            in_force: policies.len(),
            audit: policies
                .iter()
                .filter(|p| p.policy.mode == signet_policy::resource::Mode::Audit)
                .count(),
        },
        gateways: snap
            .gateway
            .status
            .gateways
            .iter()
            .map(|g| {
                let programmed = g.conditions.iter().find(|c| c.type_ == "Programmed");
                let ok = programmed.is_some_and(|c| c.status == "True");
                status_page::GatewayStatus {
                    namespace: g.namespace.clone(),
                    name: g.name.clone(),
                    programmed: ok,
                    reason: (!ok).then(|| match programmed {
                        Some(c) => format!("{}: {}", c.reason, c.message),
                        None => "no Programmed condition".into(),
                    }),
                    addresses: g.addresses.clone(),
                }
            })
            .collect(),
    }
}

fn debug_state(
    node: &str,
    snapshot: &RwLock<Arc<Snapshot>>,
    progress: &RwLock<Progress>,
    certs: &CertManager,
    connections: &Connections,
) -> DebugState {
    let snap = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let generation = snap.generation;
    let policies = snap
        .state
        .policies
        .iter()
        .map(|l| PolicyInForce {
            name: format!(
                "{}/{}",
                l.resource
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or("default"),
                l.resource.metadata.name.as_deref().unwrap_or_default()
            ),
            digest: crate::admin::debug::policy_digest(&l.resource),
        })
        .collect();
    let progress = progress.read().unwrap_or_else(|p| p.into_inner()).clone();
    let identities = certs
        .states()
        .into_iter()
        .map(|(id, state)| {
            let (state, serial, not_after, error) = match state {
                CertState::Initializing => ("initializing", None, None, None),
                CertState::Available { cert, last_error } => (
                    "available",
                    Some(cert.serial.clone()),
                    Some(unix(cert.not_after)),
                    last_error,
                ),
                CertState::Unavailable(e) => ("unavailable", None, None, Some(e)),
            };
            IdentityState {
                identity: id.to_string(),
                state,
                serial,
                not_after,
                error,
            }
        })
        .collect();
    let flows = connections
        .open_flows()
        .into_iter()
        .map(|(reporter, source, destination, port, verdict)| OpenFlow {
            reporter: reporter.as_str(),
            source,
            destination,
            port,
            verdict,
        })
        .collect();
    DebugState {
        node: node.to_owned(),
        generation,
        revision: progress.revision,
        refused: progress.refused,
        identities,
        flows,
        policies,
    }
}

pub fn readiness(snapshot: &RwLock<Arc<Snapshot>>, certs: &CertManager) -> Result<(), String> {
    let snap = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let missing = certs.missing(snap.local_identities().iter());
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Err(format!("no certificate yet for {}", names.join(", ")))
}
