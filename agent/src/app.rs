//! The agent: wires configuration, datapath, certificates, cluster state and the proxy together,
//! and keeps them in step as the state directory changes.
//!
//! Startup order fails closed: the datapath is loaded and configured before any listener, and a
//! workload's connections cannot be tunnelled before its certificate exists (the outbound side
//! then resets them). A state change that does not load is logged and the snapshot in force stays.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use signet_bpf::maps::EndpointValue;
use signet_ca::client::CaClient;
use signet_ca::verify::SvidRoots;
use signet_policy::identity::{FileAllocator, FixedAllocator};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::metrics::{Gauges, Metrics, Reporter};
use crate::admin::{self, AdminState};
use crate::certs::{BundleFollower, CaEndpoint, CertManager};
use crate::config::{AgentConfig, ClusterSource, MtlsMode};
use crate::datapath::loader::{KernelDatapath, LoaderConfig, MapSizes, OriginalDestinations};
use crate::datapath::{Datapath, DatapathConfig, EndpointKey, netns};
use crate::identity::gc::Collector;
use crate::identity::kube::KubeIdentities;
use crate::proxy::conns::Connections;
use crate::proxy::hbone::HboneClient;
use crate::proxy::{Limits, ProxyContext, inbound, outbound, tls};
use crate::state::discover;
use crate::state::kube::KubeSource;
use crate::state::lastgood::{LastGood, Refused};
use crate::state::snapshot::{self, EndpointIds, Snapshot};
use signet_ca::lease::Elector;

/// A running agent.
pub struct Agent {
    stop: CancellationToken,
    tracker: TaskTracker,
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

struct Reconciler {
    config: AgentConfig,
    datapath: KernelDatapath,
    identities: Identities,
    endpoint_ids: EndpointIds,
    /// The Kubernetes source, in that mode.
    kube: Option<KubeSource>,
    /// The cookie of the node's own network namespace, which is never an endpoint.
    node_netns: Option<u64>,
    /// Kubernetes mode: the last valid version of each object, and what was refused last.
    last_good: LastGood,
    refused: Vec<Refused>,
}

/// Numeric identities: a shared file (standalone) or `SignetIdentity` objects (Kubernetes), the
/// latter read from their reflector before each build, missing ones allocated.
enum Identities {
    File(FileAllocator),
    Kube {
        api: KubeIdentities,
        known: FixedAllocator,
    },
}

impl Reconciler {
    /// Builds a snapshot and writes it into the datapath. On error nothing is written.
    async fn apply(&mut self, previous: Option<&Snapshot>) -> anyhow::Result<Snapshot> {
        let mut objects = self.kube.as_ref().map(KubeSource::objects);
        if let Some(objects) = &mut objects {
            let refused = self.last_good.settle(objects);
            for r in refused.iter().filter(|r| !self.refused.contains(r)) {
                tracing::warn!(object = %r.object, reason = %r.reason, "{} refused: {}", r.object, r.in_force);
            }
            self.refused = refused;
        }
        let source = match (&self.config.source, &objects) {
            (ClusterSource::Dir { state_dir, .. }, _) => snapshot::Source::Dir(state_dir),
            (ClusterSource::Kubernetes, Some(o)) => snapshot::Source::Objects(o),
            (ClusterSource::Kubernetes, None) => {
                anyhow::bail!("the Kubernetes source is not running")
            }
        };
        let loaded = snapshot::load_source(source, &self.config.trust_domain)?;
        let allocator: &dyn signet_policy::identity::IdentityAllocator = match &mut self.identities
        {
            Identities::File(f) => f,
            Identities::Kube { api, known } => {
                // What the SignetIdentity objects say now: a number deleted since the last
                // build no longer stands for its old SPIFFE ID here.
                if let Some(source) = &self.kube {
                    known.0 = source.numbers();
                }
                for id in loaded.identities_needed() {
                    if let std::collections::btree_map::Entry::Vacant(slot) = known.0.entry(id) {
                        let n = api.allocate(slot.key()).await?;
                        slot.insert(n);
                    }
                }
                known
            }
        };
        let snap = snapshot::build_loaded(
            loaded,
            self.config.pod_annotations,
            &self.config.node,
            allocator,
            &mut self.endpoint_ids,
            previous.map(|s| &s.compiled),
            MapSizes::default().policy as usize,
        )?;
        for (ip, why) in &snap.refused_ips {
            if previous.is_none_or(|p| p.refused_ips.get(ip) != Some(why)) {
                tracing::warn!(%ip, "address refused to every pod until one owns it: {why}");
            }
        }
        for pod in &snap.ignored_annotations {
            if previous.is_none_or(|p| !p.ignored_annotations.contains(pod)) {
                tracing::warn!(
                    pod,
                    "placement annotations (signet.dev/cgroup, -netns, -host-interface) ignored: \
                     this agent does not run the local topology (localTopology: true)"
                );
            }
        }
        // Loopback stays out: a pod's own 127.0.0.1 is not this node.
        let local: Vec<std::net::IpAddr> = local_addresses()
            .into_iter()
            .filter(|ip| !ip.is_loopback())
            .collect();
        let ipcache = crate::datapath::translate::ipcache(&snap, &local);
        let mut endpoints = BTreeMap::new();
        let mut interfaces = std::collections::BTreeSet::new();
        let mut namespaces = Vec::new();
        for ep in &snap.local {
            let w = snap.workload(ep.workload);
            let value = EndpointValue {
                endpoint_id: ep.id,
                identity: snap.identities.get(&w.identity).copied().unwrap_or(0),
                flags: 0,
                _pad: 0,
            };
            match self.pod_netns(ep) {
                Some(path) => namespaces.push((w.key(), path, value)),
                None => tracing::warn!(
                    pod = %w.key(),
                    "pod network namespace not found (no annotation, no process in its cgroup): \
                     its connections are not captured until it is"
                ),
            }
            // Annotations (the local topology) first, else the host route to the pod.
            let interface = ep
                .host_interface
                .clone()
                .or_else(|| w.ips.first().and_then(|ip| discover::pod_interface(*ip)));
            if let Some(ifname) = &interface {
                match ifindex(ifname) {
                    Some(i) => {
                        self.datapath
                            .attach_endpoint_interface(ifname)
                            .with_context(|| format!("attaching tc to {ifname}"))?;
                        endpoints.insert(EndpointKey::Ifindex(i), value);
                        interfaces.insert(ifname.clone());
                    }
                    None => {
                        tracing::warn!(pod = %w.key(), interface = %ifname, "pod interface missing")
                    }
                }
            }
        }
        let paths: Vec<_> = namespaces.iter().map(|(_, p, _)| p.clone()).collect();
        for ((pod, path, value), cookie) in namespaces.iter().zip(netns::cookies(&paths)) {
            match cookie {
                // A pod in the node's own namespace (hostNetwork) is the node: capturing it
                // would capture the agent and the kubelet.
                Ok(c) if Some(c) == self.node_netns => tracing::warn!(
                    pod = %pod,
                    netns = %path.display(),
                    "pod shares the node's network namespace: not captured"
                ),
                Ok(c) => {
                    endpoints.insert(EndpointKey::Netns(c), *value);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod, error = %e, "pod network namespace unreadable")
                }
            }
        }
        // Policy first (new entries before the endpoints and identities that use them), then
        // the maps that make traffic reach them.
        self.datapath.reconcile_policy(&snap.compiled)?;
        self.datapath.reconcile_endpoints(&endpoints)?;
        self.datapath.reconcile_ipcache(&ipcache)?;
        self.datapath
            .detach_endpoint_interfaces_except(&interfaces)?;
        Ok(snap)
    }
}

impl Reconciler {
    /// Where a local pod's network namespace is: its annotation, else a process in its cgroup
    /// (annotated, or found by UID in the kubelet's layout).
    fn pod_netns(&self, ep: &snapshot::LocalEndpoint) -> Option<std::path::PathBuf> {
        if let Some(ns) = &ep.netns {
            return Some(netns::path_of(ns));
        }
        let cgroup = ep.cgroup.clone().or_else(|| {
            ep.uid
                .as_deref()
                .and_then(|uid| discover::pod_cgroup(&self.config.cgroup_root, uid))
        })?;
        discover::pod_netns(&self.config.cgroup_root.join(cgroup))
    }
}

/// Every address configured in this network namespace (the node's).
fn local_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("cannot list this node's addresses; they stay world to policy");
        return vec![];
    };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// The interface's index in this thread's network namespace (sysfs would show the namespace
/// that mounted it instead).
fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl Agent {
    /// Starts the agent: datapath, certificates, state watcher, listeners.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let mut datapath = KernelDatapath::load(&LoaderConfig {
            pin_dir: config.bpffs_dir.clone(),
            cgroup: config.cgroup_root.clone(),
            sizes: MapSizes::default(),
        })?;
        let (proxy_v4, proxy_v6) = match config.outbound.ip() {
            std::net::IpAddr::V4(v4) => (v4, None),
            std::net::IpAddr::V6(v6) => (std::net::Ipv4Addr::UNSPECIFIED, Some(v6)),
        };
        datapath.set_config(&DatapathConfig {
            proxy_v4,
            proxy_v6,
            proxy_port: config.outbound.port(),
            strict: config.mtls_mode == MtlsMode::Strict,
            proxy_mark: config.proxy_mark,
            event_sample: 0,
        })?;
        datapath.set_excluded_ports(&config.excluded_ports)?;
        let orig = Arc::new(OriginalDestinations::open(&config.bpffs_dir)?);

        let roots_der: Vec<rustls_pki_types::CertificateDer<'static>> =
            pem::parse_many(&config.ca_root_pem)
                .context("CA root PEM")?
                .into_iter()
                .map(|p| rustls_pki_types::CertificateDer::from(p.into_contents()))
                .collect();
        let roots = SvidRoots::new(config.trust_domain.clone(), &roots_der)?;
        let ca = CaClient::connect(
            &config.ca_address,
            &config.ca_server_name,
            &config.ca_root_pem,
            &config.ca_token,
        )
        .await
        .context("connecting to the CA")?
        .with_token_file(config.ca_token_file.clone());
        let certs = CertManager::new(ca, config.agent_identity.clone(), config.svid_ttl);

        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        // The admin port answers from the start, so liveness holds while the agent waits for the
        // API server; readiness says what it waits for until `running` is set.
        let admin_l = TcpListener::bind(config.admin)
            .await
            .with_context(|| format!("binding admin {}", config.admin))?;
        let admin_address = admin_l.local_addr().context("admin address")?;
        let running: Arc<std::sync::OnceLock<AdminState>> = Arc::default();
        // Should starting fail from here on, the tasks already running stop with it.
        let stop_on_error = stop.clone().drop_guard();
        tracker.spawn(admin::serve(
            admin_l,
            AdminState {
                metrics: metrics.clone(),
                gauges: {
                    let running = running.clone();
                    Arc::new(move || running.get().map(|r| (r.gauges)()).unwrap_or_default())
                },
                readiness: {
                    let running = running.clone();
                    Arc::new(move || match running.get() {
                        Some(r) => (r.readiness)(),
                        None => {
                            Err("starting: waiting for the first sync of the cluster state".into())
                        }
                    })
                },
            },
            stop.clone(),
            tracker.clone(),
        ));
        let (identities, kube, kube_client) = match &config.source {
            ClusterSource::Dir { identity_table, .. } => (
                Identities::File(FileAllocator::new(identity_table)),
                None,
                None,
            ),
            ClusterSource::Kubernetes => {
                let client = signet_ca::server::kube::client(config.kubeconfig.as_deref())
                    .await
                    .context("connecting to the Kubernetes API")?;
                let source =
                    KubeSource::start(client.clone(), &config.gateway_tls_namespace, &stop);
                // Not ready, and nothing applied, before every resource has been listed once.
                {
                    let started = std::time::Instant::now();
                    let synced = source.synced();
                    tokio::pin!(synced);
                    loop {
                        tokio::select! {
                            () = &mut synced => break,
                            () = tokio::time::sleep(Duration::from_secs(30)) => tracing::warn!(
                                waited_seconds = started.elapsed().as_secs(),
                                "still waiting for the first list of Kubernetes resources; not ready"
                            ),
                        }
                    }
                }
                tracing::info!("Kubernetes resources synced");
                let identities = Identities::Kube {
                    api: KubeIdentities::new(client.clone()),
                    known: FixedAllocator::default(),
                };
                (identities, Some(source), Some(client))
            }
        };
        let mut reconciler = Reconciler {
            identities,
            datapath,
            endpoint_ids: EndpointIds::default(),
            config: config.clone(),
            kube,
            node_netns: match netns::current_cookie() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this node's network namespace cookie");
                    None
                }
            },
            last_good: LastGood::default(),
            refused: Vec::new(),
        };
        let first = reconciler
            .apply(None)
            .await
            .context("loading the cluster state")?;
        certs.set_identities(&first.local_identities());
        let snapshot = Arc::new(RwLock::new(Arc::new(first)));

        tracker.spawn(
            BundleFollower::new(
                CaEndpoint {
                    address: config.ca_address.clone(),
                    server_name: config.ca_server_name.clone(),
                    token: config.ca_token.clone(),
                    token_file: Some(config.ca_token_file.clone()),
                },
                certs.clone(),
                roots.clone(),
                config.trust_domain.clone(),
            )
            .run(config.bundle_refresh, stop.clone()),
        );
        let connections = Arc::new(Connections::default());
        let ctx = ProxyContext {
            snapshot: snapshot.clone(),
            certs: certs.clone(),
            roots: roots.clone(),
            trust_domain: config.trust_domain.clone(),
            hbone: {
                let (certs, roots) = (certs.clone(), roots.clone());
                HboneClient::new(
                    Arc::new(move |route| {
                        tls::client_config(&certs, &roots, &route.source, &route.destination)
                    }),
                    config.max_streams_per_connection,
                )
            },
            proxy_mark: config.proxy_mark,
            inbound_port: config.inbound.port(),
            metrics: metrics.clone(),
            conns: connections.clone(),
            limits: Limits::new(
                config.idle_timeout,
                config.handshake_timeout,
                crate::proxy::Caps {
                    mesh: config.max_connections,
                    per_pod: config.max_connections_per_pod,
                    gateway: config.gateway_max_connections,
                    gateway_per_client: config.gateway_max_connections_per_client,
                },
            ),
        };
        let out_l = TcpListener::bind(config.outbound)
            .await
            .with_context(|| format!("binding outbound {}", config.outbound))?;
        let in_l = TcpListener::bind(config.inbound)
            .await
            .with_context(|| format!("binding inbound {}", config.inbound))?;
        tracker.spawn(outbound::serve(
            out_l,
            ctx.clone(),
            orig,
            stop.clone(),
            tracker.clone(),
        ));
        if let (Some(client), Some(source)) = (kube_client, reconciler.kube.clone()) {
            tracker.spawn(crate::state::status::keep_current(
                Elector::new(
                    client.clone(),
                    &config.agent_namespace,
                    "signet-status",
                    &config.node,
                    30,
                ),
                client.clone(),
                source.clone(),
                config.trust_domain.clone(),
                stop.clone(),
            ));
            tracker.spawn(crate::identity::gc::run(
                Elector::new(
                    client.clone(),
                    &config.agent_namespace,
                    "signet-identity-gc",
                    &config.node,
                    30,
                ),
                Collector::new(
                    client,
                    config.identity_gc_grace,
                    config.identity_gc_quarantine,
                ),
                source,
                config.trust_domain.clone(),
                config.identity_gc_interval,
                stop.clone(),
            ));
        }
        let hbone = ctx.hbone.clone();
        let mut gateways = crate::gateway::ports::GatewayPorts {
            ip: config.gateway_ip,
            limits: config.gateway_limits.clone(),
            ctx: ctx.clone(),
            running: HashMap::new(),
            stop: stop.clone(),
            tracker: tracker.clone(),
        };
        gateways.sync(&snapshot.read().unwrap_or_else(|p| p.into_inner()).clone());
        tracker.spawn(inbound::serve(in_l, ctx, stop.clone(), tracker.clone()));
        tracker.spawn(watch_state(
            reconciler,
            snapshot.clone(),
            certs.clone(),
            Recheck {
                connections: connections.clone(),
                metrics: metrics.clone(),
                gateways,
            },
            stop.clone(),
        ));
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
        let _ = running.set(AdminState {
            metrics: metrics.clone(),
            gauges,
            readiness,
        });
        stop_on_error.disarm();
        Ok(Self {
            stop,
            tracker,
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
        readiness(&self.snapshot, &self.certs).is_ok()
    }

    /// Stops accepting, lets in-flight connections finish within `grace`, then gives up on them.
    /// The datapath stays pinned and enforcing.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
    }
}

fn readiness(snapshot: &RwLock<Arc<Snapshot>>, certs: &CertManager) -> Result<(), String> {
    let snap = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
    let missing = certs.missing(snap.local_identities().iter());
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Err(format!("no certificate yet for {}", names.join(", ")))
}

/// What a state change re-examines besides the datapath: the connections already open, and
/// the Gateway ports to listen on.
struct Recheck {
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
    gateways: crate::gateway::ports::GatewayPorts,
}

async fn watch_state(
    mut reconciler: Reconciler,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    certs: CertManager,
    mut recheck: Recheck,
    stop: CancellationToken,
) {
    use signet_ca::server::authz::fingerprint;
    let dir = match &reconciler.config.source {
        ClusterSource::Dir { state_dir, .. } => Some(state_dir.clone()),
        ClusterSource::Kubernetes => None,
    };
    let mut seen = dir.as_deref().map(fingerprint);
    let mut kube = reconciler.kube.as_ref().map(KubeSource::subscribe);
    loop {
        match (&dir, &mut kube) {
            // Standalone: poll the directory's fingerprint.
            (Some(dir), _) => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
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
                    () = stop.cancelled() => return,
                    r = changes.changed() => if r.is_err() { return },
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (None, None) => return,
        }
        let previous = snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
        let result = reconciler.apply(Some(&previous)).await;
        match result {
            Ok(next) => {
                certs.set_identities(&next.local_identities());
                let next = Arc::new(next);
                *snapshot.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
                let closed = recheck.connections.recheck(&next, &recheck.metrics);
                recheck.gateways.sync(&next);
                tracing::info!(connections_closed = closed, "cluster state applied");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cluster state change refused; the state in force stays")
            }
        }
    }
}
