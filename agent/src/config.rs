//! The agent's configuration file (YAML), parsed into typed settings and checked up front so a
//! mistake is reported before anything is loaded into the kernel.
//!
//! ```yaml
//! node: node-a
//! trustDomain: cluster.local
//! clusterStateDir: /etc/signet/state        # Kubernetes manifests (standalone mode)
//! identityTable: /var/lib/signet/identities.json
//! # addressTable: /var/lib/signet/addresses.json  # LoadBalancerIPPool allocations (standalone;
//! #                                         # default: addresses.json beside identityTable)
//! # kubernetes: true                        # instead of the two above: the API server
//! # kubeconfig: /etc/signet/kubeconfig      # with kubernetes: true, outside a pod
//! # localTopology: true                     # believe signet.dev/cgroup, -netns and
//! #                                         # -host-interface pod annotations (default: only
//! #                                         # with clusterStateDir)
//! ca:
//!   address: 10.77.0.1:15012
//!   serverName: localhost                   # name in the CA's serving certificate
//!   rootCertFile: /etc/signet/ca-root.pem   # trust anchor for the CA and the mesh
//!   tokenFile: /etc/signet/node-a.token     # mode 0600
//!   bundleRefreshSeconds: 60                # the CA's bundle replaces rootCertFile's roots
//! datapath:
//!   cgroupRoot: /sys/fs/cgroup/unified/signet/node-a
//!   bpffsDir: /sys/fs/bpf/signet/node-a     # pins (default: under /sys/fs/bpf, by node name)
//!   proxyMark: 20839                        # SO_MARK (0x5167) of the proxy's connections to pods
//!   excludedPorts: [15020]                  # destination ports never captured
//! listen: {outbound: 10.77.0.2:15001, inbound: 10.77.0.2:15008, admin: 127.0.0.1:15020,
//!          gateway: 10.77.0.2}                # Gateway listeners; default: inbound's IP
//! mtlsMode: strict                          # or permissive
//! svidTtlSeconds: 3600                      # asked of the CA, which may cap it
//! agentNamespace: signet-system             # the agent's own (Leases, its identity)
//! gatewayTlsNamespace: signet-gateway-tls   # where the CA copies Gateway TLS Secrets
//! shutdownGraceSeconds: 10                  # open connections' time to finish on SIGTERM
//! maxStreamsPerConnection: 100              # HBONE streams per pooled connection
//! proxy: {idleTimeoutSeconds: 3600, handshakeTimeoutSeconds: 10, maxConnections: 16384,
//!         connectTimeoutSeconds: 5,        # TCP connect to a peer node or a workload
//!         maxConnectionsPerPod: 4096,      # one pod's share of maxConnections (default 1/4)
//!         workerThreads: 2}
//! gateway: {headerReadTimeoutSeconds: 10, idleTimeoutSeconds: 300, maxHeaderBytes: 65536,
//!           handshakeTimeoutSeconds: 10, maxHeaders: 100, maxConcurrentStreams: 100,
//!           maxConnections: 16384,           # the edge's own budget (default: as the mesh's)
//!           maxConnectionsPerClient: 1024,   # one client address's share (default 1/16)
//!           maxConnectionAgeSeconds: 3600,   # then closed gracefully (GOAWAY)
//!           maxBodyBytes: 10485760,          # no body limit unless set
//!           trustedProxies: [10.0.0.0/8]}    # whose X-Forwarded-For is appended to
//! admin: {headerReadTimeoutSeconds: 10,     # the admin port's clients
//!         metricsRetainIdleSeconds: 600,     # a pair of identities idle this long loses its series
//!         flowLogCapacity: 4096}             # recent flows kept for /flows (signet observe); 0: off
//! identityGc: {graceSeconds: 600, intervalSeconds: 60,  # Kubernetes mode
//!              quarantineSeconds: 1800}       # a deleted number is not issued again before (3 x grace)
//! ```
//! Relative paths are taken relative to the configuration file.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use signet_ca::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// mTLS between workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Plaintext TCP to a mesh workload is dropped, from other workloads and from outside the
    /// mesh alike: only the proxy and this node's host (kubelet probes) reach a workload.
    #[default]
    Strict,
    /// Plaintext is allowed, and policy still applies by the source's ipcache identity.
    Permissive,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    node: String,
    #[serde(default = "default_td")]
    trust_domain: String,
    cluster_state_dir: Option<PathBuf>,
    identity_table: Option<PathBuf>,
    address_table: Option<PathBuf>,
    /// Read the cluster from the Kubernetes API (in-cluster configuration) instead of a directory.
    #[serde(default)]
    kubernetes: bool,
    /// With `kubernetes: true`: a kubeconfig to reach the API with, instead of the in-cluster
    /// service account (an agent run outside a pod).
    kubeconfig: Option<PathBuf>,
    /// The node runs the local topology (the demo's network namespaces), where pod annotations
    /// say where a pod lives. Default: true with a state directory, false with the API.
    local_topology: Option<bool>,
    ca: RawCa,
    datapath: RawDatapath,
    listen: RawListen,
    #[serde(default)]
    mtls_mode: MtlsMode,
    #[serde(default = "default_agent_ns")]
    agent_namespace: String,
    /// Kubernetes mode: where the CA copies the TLS Secrets Gateways reference.
    #[serde(default = "default_tls_ns")]
    gateway_tls_namespace: String,
    #[serde(default = "default_svid_ttl")]
    svid_ttl_seconds: u64,
    #[serde(default = "default_grace")]
    shutdown_grace_seconds: u64,
    #[serde(default = "default_max_streams")]
    max_streams_per_connection: usize,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    gateway: RawGateway,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    identity_gc: RawIdentityGc,
}

/// The admin port (metrics, readiness, debug state).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAdmin {
    /// A client that has not sent its request head within this is disconnected.
    #[serde(default = "default_admin_header_read")]
    header_read_timeout_seconds: u64,
    /// A pair of identities with nothing open and nothing new for this long loses its series
    /// (linkerd's `metrics_retain_idle`).
    #[serde(default = "default_retain_idle")]
    metrics_retain_idle_seconds: u64,
    /// Recent flows kept for `/flows` (`signet observe`).
    #[serde(default = "default_flow_log_capacity")]
    flow_log_capacity: usize,
}

/// Flow records an agent keeps for `/flows` unless `admin.flowLogCapacity` says otherwise.
pub const DEFAULT_FLOW_LOG_CAPACITY: usize = 4096;

fn default_flow_log_capacity() -> usize {
    DEFAULT_FLOW_LOG_CAPACITY
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            header_read_timeout_seconds: default_admin_header_read(),
            metrics_retain_idle_seconds: default_retain_idle(),
            flow_log_capacity: default_flow_log_capacity(),
        }
    }
}

fn default_admin_header_read() -> u64 {
    10
}
/// How long a pair of identities with nothing open and nothing new keeps its series, unless
/// `admin.metricsRetainIdleSeconds` says otherwise.
pub const DEFAULT_METRICS_RETAIN_IDLE_SECONDS: u64 = 600;

fn default_retain_idle() -> u64 {
    DEFAULT_METRICS_RETAIN_IDLE_SECONDS
}

/// Limits at the Gateway listeners (the edge); defaults in `EdgeLimits::default`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGateway {
    handshake_timeout_seconds: Option<u64>,
    header_read_timeout_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_body_bytes: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    max_connection_age_seconds: Option<u64>,
    /// Proxies in front of the Gateway (CIDRs) whose `X-Forwarded-For`/`Forwarded` are kept and
    /// appended to; from anyone else they are replaced.
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProxy {
    #[serde(default = "default_idle")]
    idle_timeout_seconds: u64,
    #[serde(default = "default_handshake")]
    handshake_timeout_seconds: u64,
    #[serde(default = "default_connect")]
    connect_timeout_seconds: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    /// Default: a quarter of `max_connections`.
    max_connections_per_pod: Option<usize>,
    #[serde(default = "default_workers")]
    worker_threads: usize,
}

/// Kubernetes mode: when an unused `SignetIdentity` is deleted.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIdentityGc {
    /// How long a number stays unused before it goes (a rescheduled pod keeps its number).
    #[serde(default = "default_gc_grace")]
    grace_seconds: u64,
    /// How often the Lease holder looks for unused numbers.
    #[serde(default = "default_gc_interval")]
    interval_seconds: u64,
    /// How long a deleted number stays quarantined (longer than the grace period).
    quarantine_seconds: Option<u64>,
}

impl Default for RawIdentityGc {
    fn default() -> Self {
        Self {
            grace_seconds: default_gc_grace(),
            interval_seconds: default_gc_interval(),
            quarantine_seconds: None,
        }
    }
}

fn default_connect() -> u64 {
    5
}
fn default_gc_grace() -> u64 {
    600
}
fn default_gc_interval() -> u64 {
    60
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: default_idle(),
            handshake_timeout_seconds: default_handshake(),
            connect_timeout_seconds: default_connect(),
            max_connections: default_max_connections(),
            max_connections_per_pod: None,
            worker_threads: default_workers(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCa {
    address: String,
    #[serde(default = "default_server_name")]
    server_name: String,
    root_cert_file: PathBuf,
    token_file: PathBuf,
    /// How often the CA's trust bundle is fetched (a root rotation's overlap must be longer).
    #[serde(default = "default_bundle_refresh")]
    bundle_refresh_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDatapath {
    cgroup_root: PathBuf,
    bpffs_dir: Option<PathBuf>,
    #[serde(default = "default_mark")]
    proxy_mark: u32,
    #[serde(default)]
    excluded_ports: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawListen {
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    /// Where Gateway listeners bind (their ports come from the Gateways); the inbound address's
    /// IP when absent.
    gateway: Option<std::net::IpAddr>,
}

fn default_td() -> String {
    "cluster.local".into()
}
fn default_agent_ns() -> String {
    "signet-system".into()
}
fn default_tls_ns() -> String {
    "signet-gateway-tls".into()
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_bundle_refresh() -> u64 {
    60
}
fn default_svid_ttl() -> u64 {
    3600
}
fn default_grace() -> u64 {
    10
}
fn default_max_streams() -> usize {
    100
}
fn default_idle() -> u64 {
    3600
}
fn default_handshake() -> u64 {
    10
}
fn default_max_connections() -> usize {
    16384
}
/// ztunnel's default too: the proxy is I/O bound and should leave the node's cores to its pods.
fn default_workers() -> usize {
    2
}
fn default_mark() -> u32 {
    0x5167
}

/// Where the cluster's resources come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// Standalone: a directory of manifests, numeric identities in a shared file.
    Dir {
        state_dir: PathBuf,
        identity_table: PathBuf,
        /// The addresses pools gave out (`state::lbipam::AddressTable`), shared like the
        /// identity table.
        address_table: PathBuf,
    },
    /// The API server (in-cluster configuration, or `AgentConfig::kubeconfig`); numeric
    /// identities as `SignetIdentity`s.
    Kubernetes,
}

/// The agent's settings, by the component each section builds.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub trust_domain: TrustDomain,
    pub agent_identity: SpiffeId,
    /// The agent's namespace (its service account and Leases).
    pub agent_namespace: String,
    /// Open connections' time to finish on SIGTERM.
    pub shutdown_grace: Duration,
    pub cluster: ClusterConfig,
    pub ca: CaConfig,
    pub datapath: DatapathSettings,
    pub listen: ListenConfig,
    pub proxy: ProxyConfig,
    pub gateway: GatewaySettings,
    pub admin: AdminConfig,
    pub identity_gc: IdentityGcConfig,
}

/// The admin port's limits and the metrics' retention.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub header_read: Duration,
    pub metrics_retain_idle: Duration,
    pub flow_log_capacity: usize,
}

/// Where the cluster state comes from.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub source: ClusterSource,
    /// Whether pods' placement annotations are believed (`localTopology`).
    pub pod_annotations: PodAnnotations,
    /// How to reach the API server when not in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Where the CA copies Gateway TLS Secrets (the only Secrets an agent reads).
    pub gateway_tls_namespace: String,
}

/// The CA and the certificates asked of it.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub address: String,
    pub server_name: String,
    /// The trust anchor, PEM.
    pub root_pem: String,
    pub token: String,
    /// Where the token is: re-read for every certificate request (projected tokens rotate).
    pub token_file: PathBuf,
    /// How often the trust bundle is fetched from the CA.
    pub bundle_refresh: Duration,
    pub svid_ttl: Duration,
}

/// The kernel side.
#[derive(Debug, Clone)]
pub struct DatapathSettings {
    pub cgroup_root: PathBuf,
    pub bpffs_dir: PathBuf,
    pub proxy_mark: u32,
    pub excluded_ports: Vec<u16>,
    pub mtls_mode: MtlsMode,
}

/// Where the agent listens.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// The address Gateway listeners bind to.
    pub gateway_ip: std::net::IpAddr,
}

/// The mesh proxy's limits.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// A tunnel idle this long is closed.
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    /// TCP connect to a peer node's HBONE port, and from inbound to a workload.
    pub connect_timeout: Duration,
    /// Per direction.
    pub max_connections: usize,
    /// One source address's share of the outbound connections.
    pub max_connections_per_pod: usize,
    pub max_streams_per_connection: usize,
    /// Threads of the agent's runtime.
    pub worker_threads: usize,
}

/// The Gateway listeners' limits and budget.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub limits: EdgeLimits,
    /// The listeners' own connection budget.
    pub max_connections: usize,
    /// One client address's share of it.
    pub max_connections_per_client: usize,
}

/// Limits at the edge.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    pub handshake: Duration,
    pub header_read: Duration,
    /// A connection with no request started for this long is closed (HTTP/2 included, whose
    /// pings would otherwise keep it open for ever).
    pub idle: Duration,
    /// A connection this old is closed, gracefully: requests in flight get `drain` to finish.
    pub max_age: Duration,
    /// How long requests in flight may take to finish once a connection closes for its age or
    /// idleness (when the agent stops, its grace period applies instead).
    pub drain: Duration,
    /// An HTTP/2 client that does not answer a PING within this is disconnected.
    pub ping_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_streams: u32,
    /// Request bodies larger than this get 413; `None`: no limit.
    pub max_body_bytes: Option<u64>,
    /// Peers whose forwarding headers are believed and appended to; from every other peer
    /// `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are replaced with what the Gateway saw.
    pub trusted_proxies: Vec<signet_policy::cidr::Cidr>,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
            drain: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_streams: 100,
            max_body_bytes: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Whether the placement annotations (`state::snapshot::CGROUP_ANNOTATION` and its
/// siblings) are believed. Only the local topology (an admin's
/// state directory, or a test bed whose agent configuration says `localTopology: true`) may use
/// them: in a cluster anyone who can create a Pod writes its annotations, and could point
/// enforcement at the node's uplink or at another pod's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodAnnotations {
    Trusted,
    Ignored,
}

/// Kubernetes mode: how long an unused numeric identity is kept, how often to look, and how long
/// a deleted number stays quarantined.
#[derive(Debug, Clone)]
pub struct IdentityGcConfig {
    pub grace: Duration,
    pub interval: Duration,
    pub quarantine: Duration,
}

impl Raw {
    /// Every check that needs no file: values that cannot work are refused with the field's
    /// name, none is silently raised or lowered.
    fn validate(&self) -> Result<(), String> {
        let listens = [self.listen.outbound, self.listen.inbound, self.listen.admin];
        for (i, a) in listens.iter().enumerate() {
            if listens[..i].contains(a) {
                return Err(format!("listen: {a} is used twice"));
            }
        }
        // The CA enforces its own minimum; this only catches values that cannot work at all.
        if self.svid_ttl_seconds < 10 {
            return Err("svidTtlSeconds must be at least 10".into());
        }
        if self.proxy.idle_timeout_seconds == 0
            || self.proxy.handshake_timeout_seconds == 0
            || self.proxy.connect_timeout_seconds == 0
        {
            return Err(
                "proxy.idleTimeoutSeconds, proxy.handshakeTimeoutSeconds and \
                 proxy.connectTimeoutSeconds must be above 0"
                    .into(),
            );
        }
        let gc = &self.identity_gc;
        if gc.quarantine_seconds.is_some_and(|q| q <= gc.grace_seconds) {
            return Err(
                "identityGc.quarantineSeconds must be longer than identityGc.graceSeconds".into(),
            );
        }
        if self.proxy.max_connections == 0 {
            return Err("proxy.maxConnections must be above 0".into());
        }
        if self
            .proxy
            .max_connections_per_pod
            .is_some_and(|n| n == 0 || n > self.proxy.max_connections)
        {
            return Err(
                "proxy.maxConnectionsPerPod must be above 0 and at most proxy.maxConnections"
                    .into(),
            );
        }
        if self.gateway.max_connections == Some(0)
            || self.gateway.max_connections_per_client == Some(0)
            || self.gateway.max_connection_age_seconds == Some(0)
        {
            return Err(
                "gateway.maxConnections, maxConnectionsPerClient and maxConnectionAgeSeconds must be above 0".into(),
            );
        }
        let g = &self.gateway;
        if [
            g.handshake_timeout_seconds,
            g.header_read_timeout_seconds,
            g.idle_timeout_seconds,
        ]
        .contains(&Some(0))
            || g.max_headers == Some(0)
            || g.max_concurrent_streams == Some(0)
            || g.max_header_bytes.is_some_and(|b| b < 1024)
        {
            return Err(
                "gateway: timeouts, maxHeaders and maxConcurrentStreams must be above 0, maxHeaderBytes at least 1024".into(),
            );
        }
        if !(1..=64).contains(&self.proxy.worker_threads) {
            return Err("proxy.workerThreads must be between 1 and 64".into());
        }
        if self.datapath.proxy_mark == 0 {
            return Err("datapath.proxyMark must not be 0 (unmarked traffic)".into());
        }
        if self.kubeconfig.is_some() && !self.kubernetes {
            return Err("kubeconfig is used only with kubernetes: true".into());
        }
        // Zero is refused, never raised to something that works.
        if self.ca.bundle_refresh_seconds == 0 {
            return Err("ca.bundleRefreshSeconds must be above 0".into());
        }
        if self.identity_gc.interval_seconds == 0 {
            return Err("identityGc.intervalSeconds must be above 0".into());
        }
        if self.max_streams_per_connection == 0 {
            return Err("maxStreamsPerConnection must be above 0".into());
        }
        if self.admin.header_read_timeout_seconds == 0
            || self.admin.metrics_retain_idle_seconds == 0
        {
            return Err(
                "admin.headerReadTimeoutSeconds and admin.metricsRetainIdleSeconds must be above 0"
                    .into(),
            );
        }
        // 0 is valid: observe is off.
        if self.admin.flow_log_capacity > 1 << 20 {
            return Err("admin.flowLogCapacity must be at most 1048576 (0 turns it off)".into());
        }
        Ok(())
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let raw: Raw = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        if !signet_policy::model::is_dns_label(&raw.node) {
            return Err(invalid(format!("node `{}` must be a DNS label", raw.node)));
        }
        let trust_domain = TrustDomain::parse(&raw.trust_domain)
            .map_err(|e| invalid(format!("trustDomain `{}`: {e}", raw.trust_domain)))?;
        let agent_identity =
            SpiffeId::workload(&trust_domain, &raw.agent_namespace, "signet-agent")
                .map_err(|e| invalid(format!("agentNamespace `{}`: {e}", raw.agent_namespace)))?;
        // Everything that needs no file is checked first; files are read once it holds.
        raw.validate().map_err(invalid)?;
        let root_file = resolve(&raw.ca.root_cert_file);
        let ca_root_pem = std::fs::read_to_string(&root_file)
            .map_err(|e| invalid(format!("ca.rootCertFile {}: {e}", root_file.display())))?;
        let roots = pem::parse_many(&ca_root_pem).unwrap_or_default();
        if !roots.iter().any(|p| p.tag() == "CERTIFICATE") {
            return Err(invalid(format!(
                "ca.rootCertFile {}: no CERTIFICATE in it",
                root_file.display()
            )));
        }
        let token_file = resolve(&raw.ca.token_file);
        let ca_token = read_secret(&token_file).map_err(invalid)?;
        let source = match (raw.kubernetes, &raw.cluster_state_dir, &raw.identity_table) {
            (true, None, None) if raw.address_table.is_none() => ClusterSource::Kubernetes,
            (true, _, _) => {
                return Err(invalid(
                    "kubernetes: true reads the cluster from the API; leave out clusterStateDir, identityTable and addressTable".into(),
                ));
            }
            (false, Some(dir), Some(table)) => ClusterSource::Dir {
                state_dir: resolve(dir),
                identity_table: resolve(table),
                address_table: raw
                    .address_table
                    .as_deref()
                    .map_or_else(|| resolve(table).with_file_name("addresses.json"), &resolve),
            },
            (false, _, _) => {
                return Err(invalid(
                    "give clusterStateDir and identityTable (standalone), or kubernetes: true"
                        .into(),
                ));
            }
        };
        let bpffs_dir = raw
            .datapath
            .bpffs_dir
            .map(|d| resolve(&d))
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/signet").join(&raw.node));
        let trusted_proxies = raw
            .gateway
            .trusted_proxies
            .iter()
            .map(|c| {
                signet_policy::cidr::Cidr::parse(c)
                    .map_err(|e| invalid(format!("gateway.trustedProxies `{c}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let proxy_max = raw.proxy.max_connections;
        let gateway_max = raw.gateway.max_connections.unwrap_or(proxy_max);
        Ok(Self {
            trust_domain,
            agent_identity,
            agent_namespace: raw.agent_namespace.clone(),
            shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds),
            cluster: ClusterConfig {
                source,
                pod_annotations: if raw.local_topology.unwrap_or(!raw.kubernetes) {
                    PodAnnotations::Trusted
                } else {
                    PodAnnotations::Ignored
                },
                kubeconfig: raw.kubeconfig.as_deref().map(&resolve),
                gateway_tls_namespace: raw.gateway_tls_namespace.clone(),
            },
            ca: CaConfig {
                address: raw.ca.address,
                server_name: raw.ca.server_name,
                root_pem: ca_root_pem,
                token: ca_token,
                token_file,
                bundle_refresh: Duration::from_secs(raw.ca.bundle_refresh_seconds),
                svid_ttl: Duration::from_secs(raw.svid_ttl_seconds),
            },
            admin: AdminConfig {
                header_read: Duration::from_secs(raw.admin.header_read_timeout_seconds),
                metrics_retain_idle: Duration::from_secs(raw.admin.metrics_retain_idle_seconds),
                flow_log_capacity: raw.admin.flow_log_capacity,
            },
            identity_gc: IdentityGcConfig {
                grace: Duration::from_secs(raw.identity_gc.grace_seconds),
                interval: Duration::from_secs(raw.identity_gc.interval_seconds),
                // Derived default: three grace periods, at least a minute.
                quarantine: Duration::from_secs(
                    raw.identity_gc
                        .quarantine_seconds
                        .unwrap_or((raw.identity_gc.grace_seconds * 3).max(60)),
                ),
            },
            datapath: DatapathSettings {
                cgroup_root: resolve(&raw.datapath.cgroup_root),
                bpffs_dir,
                proxy_mark: raw.datapath.proxy_mark,
                excluded_ports: raw.datapath.excluded_ports,
                mtls_mode: raw.mtls_mode,
            },
            listen: ListenConfig {
                outbound: raw.listen.outbound,
                inbound: raw.listen.inbound,
                admin: raw.listen.admin,
                gateway_ip: raw.listen.gateway.unwrap_or(raw.listen.inbound.ip()),
            },
            proxy: ProxyConfig {
                idle_timeout: Duration::from_secs(raw.proxy.idle_timeout_seconds),
                handshake_timeout: Duration::from_secs(raw.proxy.handshake_timeout_seconds),
                connect_timeout: Duration::from_secs(raw.proxy.connect_timeout_seconds),
                max_connections: proxy_max,
                // Derived default: a quarter of the node's, at least 1.
                max_connections_per_pod: raw
                    .proxy
                    .max_connections_per_pod
                    .unwrap_or((proxy_max / 4).max(1)),
                max_streams_per_connection: raw.max_streams_per_connection,
                worker_threads: raw.proxy.worker_threads,
            },
            gateway: GatewaySettings {
                limits: {
                    let d = EdgeLimits::default();
                    let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
                    EdgeLimits {
                        handshake: secs(raw.gateway.handshake_timeout_seconds, d.handshake),
                        header_read: secs(raw.gateway.header_read_timeout_seconds, d.header_read),
                        idle: secs(raw.gateway.idle_timeout_seconds, d.idle),
                        max_age: secs(raw.gateway.max_connection_age_seconds, d.max_age),
                        max_header_bytes: raw
                            .gateway
                            .max_header_bytes
                            .unwrap_or(d.max_header_bytes),
                        max_headers: raw.gateway.max_headers.unwrap_or(d.max_headers),
                        max_streams: raw.gateway.max_concurrent_streams.unwrap_or(d.max_streams),
                        max_body_bytes: raw.gateway.max_body_bytes,
                        trusted_proxies: trusted_proxies.clone(),
                        ..d
                    }
                },
                max_connections: gateway_max,
                // Derived default: a sixteenth of the edge's budget, at least 1.
                max_connections_per_client: raw
                    .gateway
                    .max_connections_per_client
                    .unwrap_or((gateway_max / 16).max(1)),
            },
            node: raw.node,
        })
    }
}

impl AgentConfig {
    /// The same configuration for a given node name and address (one file for a whole
    /// DaemonSet). The default bpffs folder follows the name.
    pub fn for_node(
        mut self,
        node: Option<&str>,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Self, ConfigError> {
        if let Some(node) = node {
            if !signet_policy::model::is_dns_label(node) {
                return Err(ConfigError::Invalid {
                    path: PathBuf::from("--node"),
                    reason: format!("`{node}` must be a DNS label"),
                });
            }
            if self.datapath.bpffs_dir == PathBuf::from("/sys/fs/bpf/signet").join(&self.node) {
                self.datapath.bpffs_dir = PathBuf::from("/sys/fs/bpf/signet").join(node);
            }
            node.clone_into(&mut self.node);
        }
        if let Some(ip) = ip {
            self.listen.outbound.set_ip(ip);
            self.listen.inbound.set_ip(ip);
            self.listen.gateway_ip = ip;
        }
        Ok(self)
    }
}

/// Reads a token file, refusing one that group or others can read.
fn read_secret(path: &Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("ca.tokenFile {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "ca.tokenFile {} is readable by group or others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("ca.tokenFile {}: {e}", path.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(format!("ca.tokenFile {} is empty", path.display()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {

    /// Every field the parser accepts, at every level, is in the module documentation's example
    /// (commented or not), so a new setting cannot land undocumented. The fields are what serde
    /// itself lists when it meets an unknown one.
    #[test]
    fn every_configuration_field_is_documented() {
        let doc: String = include_str!("config.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        let accepted = |yaml: &str| -> Vec<String> {
            let e = serde_yaml::from_str::<Raw>(yaml)
                .expect_err("an unknown field")
                .to_string();
            // serde says "expected one of `a`, `b`, `c`", "expected `a` or `b`" or "expected `a`".
            let list = e.split("expected ").nth(1).unwrap_or_else(|| panic!("{e}"));
            let list = list.strip_prefix("one of ").unwrap_or(list);
            let list = list.split(" at line ").next().unwrap_or(list);
            list.split(", ")
                .flat_map(|f| f.split(" or "))
                .map(|f| {
                    f.trim_matches(|c: char| c == '`' || !c.is_ascii_alphanumeric())
                        .to_owned()
                })
                .filter(|f| !f.is_empty())
                .collect()
        };
        let mut missing = Vec::new();
        for (section, yaml) in [
            ("", "zzUnknown: 1"),
            ("ca", "ca: {zzUnknown: 1}"),
            ("datapath", "datapath: {zzUnknown: 1}"),
            ("listen", "listen: {zzUnknown: 1}"),
            ("proxy", "proxy: {zzUnknown: 1}"),
            ("gateway", "gateway: {zzUnknown: 1}"),
            ("admin", "admin: {zzUnknown: 1}"),
            ("identityGc", "identityGc: {zzUnknown: 1}"),
        ] {
            let fields = accepted(yaml);
            assert!(fields.len() > 1, "{section}: {fields:?}");
            for f in fields {
                if !doc.contains(&format!("{f}:")) {
                    missing.push(format!("{section}.{f}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented configuration fields: {missing:?}"
        );
        // And the example itself is a configuration the parser takes, field for field.
        let example: String = doc
            .lines()
            .skip_while(|l| !l.contains("```yaml"))
            .skip(1)
            .take_while(|l| !l.contains("```"))
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .map(|l| format!("{}\n", l.split(" #").next().unwrap_or(l)))
            .collect();
        serde_yaml::from_str::<Raw>(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    }

    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("root.pem"), ROOT).expect("root");
        let token = dir.path().join("node.token");
        std::fs::write(&token, "secret\n").expect("token");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        dir
    }

    fn yaml(extra: &str) -> String {
        format!(
            "node: node-a\nclusterStateDir: state\nidentityTable: ids.json\n\
             ca: {{address: '127.0.0.1:15012', rootCertFile: root.pem, tokenFile: node.token}}\n\
             datapath: {{cgroupRoot: /sys/fs/cgroup/unified/x}}\n\
             listen: {{outbound: '127.0.0.1:15001', inbound: '127.0.0.1:15008', admin: '127.0.0.1:15020'}}\n{extra}"
        )
    }

    fn parse(dir: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, &dir.join("agent.yaml"), dir)
    }

    #[test]
    fn zero_is_refused_by_name_never_raised() {
        let dir = setup();
        for (extra, field) in [
            (
                "ca: {address: '127.0.0.1:15012', rootCertFile: root.pem, tokenFile: node.token, bundleRefreshSeconds: 0}\n",
                "ca.bundleRefreshSeconds",
            ),
            (
                "identityGc: {intervalSeconds: 0}\n",
                "identityGc.intervalSeconds",
            ),
            ("maxStreamsPerConnection: 0\n", "maxStreamsPerConnection"),
            (
                "proxy: {connectTimeoutSeconds: 0}\n",
                "proxy.connectTimeoutSeconds",
            ),
            (
                "admin: {headerReadTimeoutSeconds: 0}\n",
                "admin.headerReadTimeoutSeconds",
            ),
            (
                "admin: {metricsRetainIdleSeconds: 0}\n",
                "admin.metricsRetainIdleSeconds",
            ),
            (
                "gateway: {maxConnectionsPerClient: 0}\n",
                "maxConnectionsPerClient",
            ),
        ] {
            // A later `ca:` replaces the first one in YAML maps: drop the default for that case.
            let text = if extra.starts_with("ca:") {
                yaml("").replace(
                    "ca: {address: '127.0.0.1:15012', rootCertFile: root.pem, tokenFile: node.token}\n",
                    extra,
                )
            } else {
                yaml(extra)
            };
            let err = parse(dir.path(), &text).expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn the_admin_section_sets_its_timeout_and_the_metrics_retention() {
        let dir = setup();
        let defaults = parse(dir.path(), &yaml("")).expect("defaults");
        assert_eq!(defaults.admin.header_read, Duration::from_secs(10));
        assert_eq!(defaults.admin.metrics_retain_idle, Duration::from_secs(600));
        let set = parse(
            dir.path(),
            &yaml("admin: {headerReadTimeoutSeconds: 3, metricsRetainIdleSeconds: 120}\n"),
        )
        .expect("set");
        assert_eq!(set.admin.header_read, Duration::from_secs(3));
        assert_eq!(set.admin.metrics_retain_idle, Duration::from_secs(120));
        assert_eq!(defaults.admin.flow_log_capacity, 4096);
        let off = parse(dir.path(), &yaml("admin: {flowLogCapacity: 0}\n")).expect("off");
        assert_eq!(off.admin.flow_log_capacity, 0, "0 is valid: observe is off");
        let err = parse(dir.path(), &yaml("admin: {flowLogCapacity: 2000000}\n"))
            .expect_err("too large")
            .to_string();
        assert!(err.contains("admin.flowLogCapacity"), "{err}");
    }

    #[test]
    fn values_are_checked_before_any_file_is_read() {
        // No root or token file exists: the bad value is what the error names.
        let dir = tempfile::tempdir().expect("tmp");
        let err = parse(dir.path(), &yaml("maxStreamsPerConnection: 0\n"))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("maxStreamsPerConnection"), "{err}");
        let err = parse(dir.path(), &yaml(""))
            .expect_err("no root file")
            .to_string();
        assert!(err.contains("ca.rootCertFile"), "{err}");
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let dir = setup();
        let c = parse(dir.path(), &yaml("")).expect("valid");
        assert_eq!(c.datapath.mtls_mode, MtlsMode::Strict);
        assert_eq!(c.ca.token, "secret");
        assert_eq!(
            c.datapath.bpffs_dir,
            PathBuf::from("/sys/fs/bpf/signet/node-a")
        );
        assert_eq!(
            c.cluster.source,
            ClusterSource::Dir {
                state_dir: dir.path().join("state"),
                identity_table: dir.path().join("ids.json"),
                address_table: dir.path().join("addresses.json"),
            }
        );
        assert_eq!(
            c.agent_identity.as_str(),
            "spiffe://cluster.local/ns/signet-system/sa/signet-agent"
        );
        assert_eq!(
            parse(dir.path(), &yaml("mtlsMode: permissive\n"))
                .expect("valid")
                .datapath
                .mtls_mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn one_file_serves_every_node_of_a_daemonset() {
        let dir = setup();
        let c = parse(dir.path(), &yaml(""))
            .expect("valid")
            .for_node(Some("worker-7"), Some("10.0.3.7".parse().expect("ip")))
            .expect("node");
        assert_eq!(c.node, "worker-7");
        assert_eq!(
            c.datapath.bpffs_dir,
            PathBuf::from("/sys/fs/bpf/signet/worker-7")
        );
        assert_eq!(c.listen.outbound.to_string(), "10.0.3.7:15001");
        assert_eq!(c.listen.inbound.to_string(), "10.0.3.7:15008");
        assert_eq!(c.listen.gateway_ip.to_string(), "10.0.3.7");
        assert!(
            parse(dir.path(), &yaml(""))
                .expect("valid")
                .for_node(Some("Not_A_Label"), None)
                .is_err()
        );
    }

    #[test]
    fn mistakes_are_named() {
        let dir = setup();
        let both = yaml("kubernetes: true\n");
        let e = parse(dir.path(), &both)
            .expect_err("both sources")
            .to_string();
        assert!(e.contains("leave out clusterStateDir"), "{e}");
        let k8s = yaml("kubernetes: true\n")
            .replace("clusterStateDir: state\n", "")
            .replace("identityTable: ids.json\n", "");
        assert_eq!(
            parse(dir.path(), &k8s).expect("kubernetes").cluster.source,
            ClusterSource::Kubernetes
        );
        let e = parse(dir.path(), &yaml("mtlsMode: loose\n"))
            .expect_err("bad mode")
            .to_string();
        assert!(e.contains("agent.yaml") && e.contains("loose"), "{e}");
        let e = parse(dir.path(), &yaml("colour: red\n"))
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = parse(dir.path(), &yaml("").replace("15008", "15001"))
            .expect_err("dup")
            .to_string();
        assert!(e.contains("used twice"), "{e}");
        std::fs::set_permissions(
            dir.path().join("node.token"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let e = parse(dir.path(), &yaml(""))
            .expect_err("token mode")
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(
            dir.path().join("node.token"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::write(dir.path().join("root.pem"), "nothing").expect("write");
        let e = parse(dir.path(), &yaml("")).expect_err("root").to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }
}
