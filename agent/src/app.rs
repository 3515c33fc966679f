//! The agent's wiring: each component is built from its configuration section by its own module
//! and started under one [`Drain`]. What the components do lives in their modules; the control
//! loop that keeps them in step with the cluster state is `reconcile`.
//!
//! Startup order fails closed: the datapath is loaded and configured before any listener, and a
//! workload's connections cannot be tunnelled before its certificate exists (the outbound side
//! then resets them). The admin port answers from the start, so liveness holds while the agent
//! waits for the API server; readiness says what it waits for.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::admin::metrics::Metrics;
use crate::certs::{self, BundleFollower, CaEndpoint, CertManager};
use crate::config::AgentConfig;
use crate::datapath::events::EventReader;
use crate::datapath::loader::{KernelDatapath, OriginalDestinations};
use crate::datapath::sync::NodeHost;
use crate::drain::Drain;
use crate::gateway::ports::GatewayPorts;
use crate::health;
use crate::proxy::conns::Connections;
use crate::proxy::{ProxyContext, inbound, outbound};
use crate::reconcile::{self, Followers, Reconciler};
use crate::state::build::{Builder, Source};
use crate::state::snapshot::Snapshot;

/// A running agent.
pub struct Agent {
    drain: Drain,
    pub certs: CertManager,
    pub snapshot: Arc<RwLock<Arc<Snapshot>>>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    /// Where the admin port listens (the configured one, or the one the OS chose for port 0).
    pub admin_address: std::net::SocketAddr,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts the agent: datapath, certificates, cluster state, listeners.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let drain = Drain::new();
        // Should starting fail from here on, the tasks already running stop with it.
        let stop_on_error = drain.stop_token().drop_guard();
        let datapath = KernelDatapath::for_agent(&config)?;
        let orig = Arc::new(OriginalDestinations::open(&config.datapath.bpffs_dir)?);
        let events = EventReader::open(&config.datapath.bpffs_dir, crate::observe::POLL)?;
        let (certs, roots) = certs::connect(&config, &drain).await?;
        let metrics = Arc::new(Metrics::new(
            config.admin.metrics_retain_idle,
            config.admin.flow_log_capacity,
        ));
        metrics.flows().set_node(&config.node);
        let (admin_address, running) = health::serve_admin(&config, &metrics, &drain).await?;

        let (source, kube_client) = Source::connect(&config, &drain).await?;
        let builder = Builder::new(
            source,
            config.trust_domain.clone(),
            config.node.clone(),
            config.cluster.pod_annotations,
        );
        let host = NodeHost::new(&config.datapath.cgroup_root);
        let mut reconciler = Reconciler::new(builder, Box::new(datapath), Box::new(host));
        let first = reconciler
            .apply(None)
            .await
            .context("loading the cluster state")?;
        certs.set_identities(&first.local_identities());
        let snapshot = Arc::new(RwLock::new(Arc::new(first)));
        let follower = BundleFollower::new(
            CaEndpoint::from(&config.ca),
            certs.clone(),
            roots.clone(),
            config.trust_domain.clone(),
        );
        drain.spawn(
            "bundle follower",
            follower.run(config.ca.bundle_refresh, drain.stop_token()),
        );
        let flows =
            crate::observe::follow(events, snapshot.clone(), metrics.clone(), drain.clone());
        drain.spawn("kernel flows", flows);

        let connections = Arc::new(Connections::default());
        let ctx = ProxyContext::new(
            &config,
            &snapshot,
            &certs,
            &roots,
            &metrics,
            &connections,
            &drain,
        );
        let outbound_listener = bind(config.listen.outbound, "outbound").await?;
        let inbound_listener = bind(config.listen.inbound, "inbound").await?;
        drain.spawn(
            "outbound",
            outbound::serve(outbound_listener, ctx.clone(), orig),
        );
        if let (Some(client), Some(source)) = (kube_client, reconciler.builder.kube().cloned()) {
            reconcile::spawn_leader_loops(&config, client, source, &drain);
        }
        // Own addresses are routed here before their listeners open.
        let leases = match &config.cluster.source {
            crate::config::ClusterSource::Dir { address_table, .. } => Some(
                crate::vip::lease::LeaseTable::new(&address_table.with_file_name("l2-leases.json")),
            ),
            crate::config::ClusterSource::Kubernetes => None,
        };
        let mut vips = crate::vip::Vips::new(&config.node, leases);
        vips.follow(&ctx.snapshot().vips, &drain);
        let mut gateways = GatewayPorts::new(&config, ctx.clone());
        gateways.sync(&ctx.snapshot());
        let hbone = ctx.hbone.clone();
        drain.spawn("inbound", inbound::serve(inbound_listener, ctx));

        let progress = reconciler.progress.clone();
        let followers = Followers {
            certs: certs.clone(),
            connections: connections.clone(),
            metrics: metrics.clone(),
            gateways,
            vips,
            drain: drain.clone(),
        };
        let control = reconcile::run(reconciler, snapshot.clone(), followers, drain.clone());
        drain.spawn("reconciler", control);
        let admin = health::running_state(
            &config,
            &snapshot,
            &progress,
            &certs,
            &connections,
            hbone,
            &metrics,
        );
        let _ = running.set(admin);
        stop_on_error.disarm();
        Ok(Self {
            drain,
            certs,
            snapshot,
            metrics,
            connections,
            admin_address,
        })
    }

    /// Whether every local workload has a certificate (the datapath is attached before `start`
    /// returns).
    pub fn ready(&self) -> bool {
        health::readiness(&self.snapshot, &self.certs).is_ok()
    }

    /// Stops accepting, lets in-flight connections finish within `grace`, then closes them.
    /// The datapath stays pinned and enforcing.
    pub async fn shutdown(self, grace: Duration) {
        self.drain.shutdown(grace).await;
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}
