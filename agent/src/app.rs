//! The agent's wiring: each component is built from its configuration and started under one
//! [`Drain`]. What the components do lives in their modules; the control loop that keeps them in
//! step with the cluster state is `reconcile`.
//!
//! Startup order fails closed: the datapath is loaded and configured before any listener, and a
//! workload's connections cannot be tunnelled before its certificate exists (the outbound side
//! then resets them). The admin port answers from the start, so liveness holds while the agent
//! waits for the API server; readiness says what it waits for.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use signet_ca::client::CaClient;
use signet_ca::kubernetes::Elector;
use signet_ca::verify::SvidRoots;
use signet_policy::identity::FileAllocator;
use tokio::net::TcpListener;

use crate::admin::metrics::Metrics;
use crate::certs::{BundleFollower, CaEndpoint, CertManager};
use crate::config::{AgentConfig, ClusterSource, MtlsMode};
use crate::datapath::events::EventReader;
use crate::datapath::loader::{KernelDatapath, LoaderConfig, MapSizes, OriginalDestinations};
use crate::datapath::sync::NodeHost;
use crate::datapath::{Datapath, DatapathConfig};
use crate::drain::Drain;
use crate::gateway::ports::GatewayPorts;
use crate::health;
use crate::identity::gc::Collector;
use crate::identity::kube::KubeIdentities;
use crate::proxy::conns::Connections;
use crate::proxy::hbone::HboneClient;
use crate::proxy::{Caps, Limits, ProxyContext, inbound, outbound, tls};
use crate::reconcile::{Followers, Reconciler};
use crate::state::build::{Builder, Kube, Source};
use crate::state::kube::KubeSource;
use crate::state::snapshot::Snapshot;

/// How often the agent says it still waits for the first list of Kubernetes resources.
const SYNC_WAIT_REPORT: Duration = Duration::from_secs(30);
/// Leader-elected loops' Lease duration.
const LEASE_SECONDS: i32 = 30;

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
        let datapath = load_datapath(&config)?;
        let orig = Arc::new(OriginalDestinations::open(&config.datapath.bpffs_dir)?);
        let events = EventReader::open(&config.datapath.bpffs_dir, crate::observe::POLL)?;
        let (certs, roots) = connect_ca(&config, &drain).await?;
        let metrics = Arc::new(Metrics::default());
        let (admin_address, running) = health::serve_admin(&config, &metrics, &drain).await?;

        let (source, kube_client) = cluster_source(&config, &drain).await?;
        let mut reconciler = Reconciler::new(
            Builder::new(
                source,
                config.trust_domain.clone(),
                config.node.clone(),
                config.cluster.pod_annotations,
            ),
            Box::new(datapath),
            Box::new(NodeHost::new(&config.datapath.cgroup_root)),
        );
        let progress = reconciler.progress.clone();
        let first = reconciler
            .apply(None)
            .await
            .context("loading the cluster state")?;
        certs.set_identities(&first.local_identities());
        let snapshot = Arc::new(RwLock::new(Arc::new(first)));
        drain.spawn(
            "kernel flows",
            crate::observe::follow(events, snapshot.clone(), metrics.clone(), drain.clone()),
        );

        drain.spawn(
            "bundle follower",
            BundleFollower::new(
                CaEndpoint {
                    address: config.ca.address.clone(),
                    server_name: config.ca.server_name.clone(),
                    token: config.ca.token.clone(),
                    token_file: Some(config.ca.token_file.clone()),
                },
                certs.clone(),
                roots.clone(),
                config.trust_domain.clone(),
            )
            .run(config.ca.bundle_refresh, drain.stop_token()),
        );
        let connections = Arc::new(Connections::default());
        let ctx = proxy_context(
            &config,
            &snapshot,
            &certs,
            &roots,
            &metrics,
            &connections,
            &drain,
        );
        let out_l = bind(config.listen.outbound, "outbound").await?;
        let in_l = bind(config.listen.inbound, "inbound").await?;
        drain.spawn("outbound", outbound::serve(out_l, ctx.clone(), orig));
        if let (Some(client), Some(source)) = (kube_client, reconciler.builder.kube().cloned()) {
            start_leader_loops(&config, client, source, &drain);
        }
        let mut gateways = GatewayPorts {
            ip: config.listen.gateway_ip,
            limits: config.gateway.limits.clone(),
            ctx: ctx.clone(),
            running: HashMap::new(),
        };
        gateways.sync(&snapshot.read().unwrap_or_else(|p| p.into_inner()).clone());
        let hbone = ctx.hbone.clone();
        drain.spawn("inbound", inbound::serve(in_l, ctx));
        drain.spawn(
            "reconciler",
            crate::reconcile::run(
                reconciler,
                snapshot.clone(),
                Followers {
                    certs: certs.clone(),
                    connections: connections.clone(),
                    metrics: metrics.clone(),
                    gateways,
                },
                drain.clone(),
            ),
        );
        let _ = running.set(health::running_state(
            &config.node,
            &snapshot,
            &progress,
            &certs,
            &connections,
            hbone,
            &metrics,
        ));
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

/// Loads (or finds after a restart) the datapath and configures it for this node.
fn load_datapath(config: &AgentConfig) -> anyhow::Result<KernelDatapath> {
    let mut datapath = KernelDatapath::load(&LoaderConfig {
        pin_dir: config.datapath.bpffs_dir.clone(),
        cgroup: config.datapath.cgroup_root.clone(),
        sizes: MapSizes::default(),
    })?;
    let (proxy_v4, proxy_v6) = match config.listen.outbound.ip() {
        std::net::IpAddr::V4(v4) => (v4, None),
        std::net::IpAddr::V6(v6) => (std::net::Ipv4Addr::UNSPECIFIED, Some(v6)),
    };
    datapath.set_config(&DatapathConfig {
        proxy_v4,
        proxy_v6,
        proxy_port: config.listen.outbound.port(),
        strict: config.datapath.mtls_mode == MtlsMode::Strict,
        proxy_mark: config.datapath.proxy_mark,
        event_sample: 0,
    })?;
    datapath.set_excluded_ports(&config.datapath.excluded_ports)?;
    Ok(datapath)
}

/// The CA connection and the certificate manager, with the configured trust roots.
async fn connect_ca(
    config: &AgentConfig,
    drain: &Drain,
) -> anyhow::Result<(CertManager, SvidRoots)> {
    let roots_der: Vec<rustls_pki_types::CertificateDer<'static>> =
        pem::parse_many(&config.ca.root_pem)
            .context("CA root PEM")?
            .into_iter()
            .map(|p| rustls_pki_types::CertificateDer::from(p.into_contents()))
            .collect();
    let roots = SvidRoots::new(config.trust_domain.clone(), &roots_der)?;
    let ca = CaClient::connect(
        &config.ca.address,
        &config.ca.server_name,
        &config.ca.root_pem,
        &config.ca.token,
    )
    .await
    .context("connecting to the CA")?
    .with_token_file(config.ca.token_file.clone());
    let certs = CertManager::new(
        ca,
        config.agent_identity.clone(),
        config.ca.svid_ttl,
        drain.clone(),
    );
    Ok((certs, roots))
}

/// The cluster source of the configured mode; in Kubernetes mode, once every resource has been
/// listed (nothing is applied before), with the API client.
async fn cluster_source(
    config: &AgentConfig,
    drain: &Drain,
) -> anyhow::Result<(Source, Option<kube::Client>)> {
    let (state_dir, identity_table) = match &config.cluster.source {
        ClusterSource::Dir {
            state_dir,
            identity_table,
        } => (state_dir, identity_table),
        ClusterSource::Kubernetes => {
            let client = signet_ca::kubernetes::client(config.cluster.kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            let objects = KubeSource::start(
                client.clone(),
                &config.cluster.gateway_tls_namespace,
                &drain.stop_token(),
            );
            wait_for_first_list(&objects).await;
            let source = Source::Kube(Box::new(Kube::new(
                objects,
                KubeIdentities::new(client.clone()),
            )));
            return Ok((source, Some(client)));
        }
    };
    let source = Source::Dir {
        state_dir: state_dir.clone(),
        numbers: FileAllocator::new(identity_table),
    };
    Ok((source, None))
}

async fn wait_for_first_list(source: &KubeSource) {
    let started = std::time::Instant::now();
    let synced = source.synced();
    tokio::pin!(synced);
    loop {
        tokio::select! {
            () = &mut synced => break,
            () = tokio::time::sleep(SYNC_WAIT_REPORT) => tracing::warn!(
                waited_seconds = started.elapsed().as_secs(),
                "still waiting for the first list of Kubernetes resources; not ready"
            ),
        }
    }
    tracing::info!("Kubernetes resources synced");
}

/// What both directions of the proxy and the Gateway share.
fn proxy_context(
    config: &AgentConfig,
    snapshot: &Arc<RwLock<Arc<Snapshot>>>,
    certs: &CertManager,
    roots: &SvidRoots,
    metrics: &Arc<Metrics>,
    connections: &Arc<Connections>,
    drain: &Drain,
) -> ProxyContext {
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
        HboneClient::new(
            Arc::new(move |route| configs.get(&certs, &roots, &route.source, &route.destination)),
            config.proxy.max_streams_per_connection,
            limits.connect,
            drain.clone(),
        )
    };
    ProxyContext {
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
        drain: drain.clone(),
    }
}

/// The loops one agent of the cluster runs at a time (Kubernetes mode): IdentityPolicy status,
/// and collecting numeric identities nobody uses.
fn start_leader_loops(
    config: &AgentConfig,
    client: kube::Client,
    source: KubeSource,
    drain: &Drain,
) {
    let lease = |name: &str| {
        Elector::new(
            client.clone(),
            &config.agent_namespace,
            name,
            &config.node,
            LEASE_SECONDS,
        )
    };
    drain.spawn(
        "policy status",
        crate::state::status::keep_current(
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
            Collector::new(
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

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}
