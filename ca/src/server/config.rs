//! The CA server's configuration file (YAML), parsed into typed settings and checked once.
//!
//! ```yaml
//! trustDomain: cluster.local
//! listen: 127.0.0.1:15012
//! admin: 127.0.0.1:15014              # /healthz/ready and /status (JSON); off unless set
//! stateDir: /var/lib/signet-ca        # or `cacertsDir:` for operator-managed keys, or (with
//!                                     # `kubernetes: true`) `caSecret: signet-ca-keys`
//! root: {ttlSeconds: 31536000, rotationOverlapSeconds: 604800, intermediate: false}
//! clusterStateDir: /etc/signet/state  # Kubernetes manifests: which pod runs on which node
//! agentNamespace: signet-system
//! gatewayTlsNamespace: signet-gateway-tls # Kubernetes mode: where Gateway TLS Secrets are copied
//! servingNames: [localhost, 127.0.0.1]
//! svid: {defaultTtlSeconds: 3600, maxTtlSeconds: 86400}
//! nodes:
//! - {name: node-a, tokenSha256: "<hex of sha256(token)>"}
//! ```
//! Relative paths are taken relative to the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::authority::TtlPolicy;
use crate::issuer::{CaSettings, CaSource};
use crate::spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    trust_domain: TrustDomain,
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    /// The admin port (readiness and status), none unless set.
    admin: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    cacerts_dir: Option<PathBuf>,
    /// Kubernetes mode: keep a generated CA in this Secret (in `agentNamespace`).
    ca_secret: Option<String>,
    cluster_state_dir: Option<PathBuf>,
    /// In a cluster: agents authenticate with TokenReview, pods and Gateways come from the API.
    #[serde(default)]
    kubernetes: bool,
    #[serde(default = "default_agent_namespace")]
    agent_namespace: String,
    /// Kubernetes mode: the namespace the Gateway TLS copies go to. It holds nothing else, so
    /// the agents' read access there reaches no other Secret (the CA's keys stay in
    /// `agentNamespace`, where agents read no Secret).
    #[serde(default = "default_tls_namespace")]
    gateway_tls_namespace: String,
    #[serde(default = "default_serving_names")]
    serving_names: Vec<String>,
    #[serde(default)]
    svid: RawSvid,
    #[serde(default)]
    root: RawRoot,
    #[serde(default)]
    nodes: Vec<NodeToken>,
    #[serde(default)]
    limits: Limits,
    #[serde(default = "default_grace")]
    shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSvid {
    #[serde(default = "default_ttl")]
    default_ttl_seconds: u64,
    #[serde(default = "max_ttl")]
    max_ttl_seconds: u64,
    #[serde(default = "min_ttl")]
    min_ttl_seconds: u64,
    #[serde(default = "backdate")]
    backdate_seconds: u64,
}

impl Default for RawSvid {
    fn default() -> Self {
        Self {
            default_ttl_seconds: default_ttl(),
            max_ttl_seconds: max_ttl(),
            min_ttl_seconds: min_ttl(),
            backdate_seconds: backdate(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRoot {
    #[serde(default = "root_ttl")]
    ttl_seconds: u64,
    #[serde(default = "overlap")]
    rotation_overlap_seconds: u64,
    /// New roots get an intermediate that signs (always so with `caSecret`).
    #[serde(default)]
    intermediate: bool,
}

impl Default for RawRoot {
    fn default() -> Self {
        Self {
            ttl_seconds: root_ttl(),
            rotation_overlap_seconds: overlap(),
            intermediate: false,
        }
    }
}

/// A node allowed to ask for SVIDs, identified by a bearer token stored only as its SHA-256.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeToken {
    pub name: String,
    /// Lowercase or uppercase hex of SHA-256 of the token (`signet-ca hash-token`).
    pub token_sha256: String,
}

/// Limits that keep one client from starving the others.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Requests being served at once; more wait up to `queueTimeoutSeconds`, then fail with
    /// `ResourceExhausted`.
    #[serde(default = "max_concurrent")]
    pub max_concurrent_requests: usize,
    #[serde(default = "queue_timeout")]
    pub queue_timeout_seconds: u64,
    /// Largest gRPC message accepted (a CSR is at most 64 KiB).
    #[serde(default = "max_request_bytes")]
    pub max_request_bytes: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[serde(default = "max_streams")]
    pub max_streams_per_connection: u32,
    #[serde(default = "handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    #[serde(default = "request_timeout")]
    pub request_timeout_seconds: u64,
    /// Connections (handshaking or open) one peer address may hold.
    #[serde(default = "per_peer_connections")]
    pub max_connections_per_peer: usize,
    /// Token checks (TokenReviews) one peer address may run at once.
    #[serde(default = "per_peer_checks")]
    pub max_auth_checks_per_peer: usize,
    /// Failed authentications one peer address may have per minute; then it is refused with
    /// `ResourceExhausted` until the minute ends.
    #[serde(default = "per_peer_failures")]
    pub max_auth_failures_per_peer: u32,
    /// How long an accepted token's verdict is kept (one token costs one TokenReview).
    #[serde(default = "token_cache")]
    pub token_cache_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: max_concurrent(),
            queue_timeout_seconds: queue_timeout(),
            max_request_bytes: max_request_bytes(),
            max_streams_per_connection: max_streams(),
            handshake_timeout_seconds: handshake_timeout(),
            request_timeout_seconds: request_timeout(),
            max_connections_per_peer: per_peer_connections(),
            max_auth_checks_per_peer: per_peer_checks(),
            max_auth_failures_per_peer: per_peer_failures(),
            token_cache_seconds: token_cache(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15012))
}
fn default_agent_namespace() -> String {
    "signet-system".into()
}
fn default_tls_namespace() -> String {
    "signet-gateway-tls".into()
}
fn default_serving_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_ttl() -> u64 {
    3600
}
fn max_ttl() -> u64 {
    24 * 3600
}
fn min_ttl() -> u64 {
    60
}
fn backdate() -> u64 {
    60
}
fn root_ttl() -> u64 {
    365 * 86_400
}
fn overlap() -> u64 {
    7 * 86_400
}
fn default_grace() -> u64 {
    10
}
fn per_peer_connections() -> usize {
    32
}
fn per_peer_checks() -> usize {
    8
}
fn per_peer_failures() -> u32 {
    30
}
fn token_cache() -> u64 {
    30
}
fn max_concurrent() -> usize {
    512
}
fn queue_timeout() -> u64 {
    5
}
fn max_request_bytes() -> usize {
    128 * 1024
}
fn max_streams() -> u32 {
    128
}
fn handshake_timeout() -> u64 {
    10
}
fn request_timeout() -> u64 {
    15
}

/// Where the CA learns which pods run on which node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCluster {
    /// A directory of manifests; agents authenticate with the per-node tokens in `nodes`.
    Dir(PathBuf),
    /// The API server: TokenReview for agents, Pods and Gateways watched.
    Kubernetes,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub ca: CaSettings,
    pub listen: SocketAddr,
    /// Where `/healthz/ready` and `/status` are served, if anywhere.
    pub admin: Option<SocketAddr>,
    /// Where pods (who runs where) and Gateways come from.
    pub cluster: CaCluster,
    /// The namespace of the agents' (and the CA's) service accounts.
    pub agent_namespace: String,
    /// The Secret (in `agent_namespace`) that holds a generated CA, in Kubernetes mode.
    pub ca_secret: Option<String>,
    /// Where the TLS Secrets Signet's Gateways reference are copied for the agents.
    pub gateway_tls_namespace: String,
    /// Every node agent's own identity: `spiffe://<td>/ns/<agentNamespace>/sa/signet-agent`.
    pub agent_identity: SpiffeId,
    /// The CA server's identity in its serving certificate.
    pub server_identity: SpiffeId,
    pub serving_names: Vec<String>,
    pub nodes: Vec<NodeToken>,
    pub limits: Limits,
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&text, path, base)
    }

    pub fn from_yaml(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let source = match (&raw.state_dir, &raw.cacerts_dir, &raw.ca_secret) {
            (Some(d), None, None) => CaSource::StateDir(resolve(d)),
            (None, Some(d), None) => CaSource::Cacerts(resolve(d)),
            // Copied there from the Secret before the CA opens it (`ca_secret::KeySecret`).
            (None, None, Some(_)) if raw.kubernetes => {
                CaSource::SharedStateDir(std::env::temp_dir().join("signet-ca-keys"))
            }
            (None, None, Some(_)) => {
                return Err(invalid("`caSecret` needs `kubernetes: true`".into()));
            }
            _ => {
                return Err(invalid(
                    "set exactly one of `stateDir`, `cacertsDir` and `caSecret`".into(),
                ));
            }
        };
        let mut ca = CaSettings::new(raw.trust_domain.clone(), source);
        ca.ttl = TtlPolicy {
            default_ttl: Duration::from_secs(raw.svid.default_ttl_seconds),
            max_ttl: Duration::from_secs(raw.svid.max_ttl_seconds),
            min_ttl: Duration::from_secs(raw.svid.min_ttl_seconds),
            backdate: Duration::from_secs(raw.svid.backdate_seconds),
        };
        ca.root_ttl = Duration::from_secs(raw.root.ttl_seconds);
        ca.rotation_overlap = Duration::from_secs(raw.root.rotation_overlap_seconds);
        // Keys kept in a Secret sign through an intermediate; elsewhere it is the admin's choice.
        ca.intermediate = raw.root.intermediate || raw.ca_secret.is_some();
        ca.validate().map_err(invalid)?;
        let agent_identity =
            SpiffeId::workload(&raw.trust_domain, &raw.agent_namespace, "signet-agent")
                .map_err(|e| invalid(format!("agentNamespace `{}`: {e}", raw.agent_namespace)))?;
        let server_identity =
            SpiffeId::workload(&raw.trust_domain, &raw.agent_namespace, "signet-ca")
                .map_err(|e| invalid(format!("agentNamespace `{}`: {e}", raw.agent_namespace)))?;
        let mut seen = std::collections::HashSet::new();
        for n in &raw.nodes {
            if !seen.insert(n.name.as_str()) {
                return Err(invalid(format!("node `{}` is listed twice", n.name)));
            }
            if crate::server::auth::parse_sha256_hex(&n.token_sha256).is_none() {
                return Err(invalid(format!(
                    "node `{}`: tokenSha256 must be 64 hex digits (use `signet-ca hash-token`)",
                    n.name
                )));
            }
        }
        let cluster = match (&raw.cluster_state_dir, raw.kubernetes) {
            (Some(dir), false) => CaCluster::Dir(resolve(dir)),
            (None, true) if raw.nodes.is_empty() => CaCluster::Kubernetes,
            (None, true) => {
                return Err(invalid(
                    "kubernetes: true authenticates agents with TokenReview; leave out `nodes`"
                        .into(),
                ));
            }
            _ => {
                return Err(invalid(
                    "set exactly one of `clusterStateDir` and `kubernetes: true`".into(),
                ));
            }
        };
        if raw.serving_names.is_empty() {
            return Err(invalid("servingNames must name at least one host".into()));
        }
        // Port 0 lets the system choose each: two different ports.
        if raw.admin == Some(raw.listen) && raw.listen.port() != 0 {
            return Err(invalid(format!(
                "admin {} is the gRPC listen address too; give it a port of its own",
                raw.listen
            )));
        }
        let l = &raw.limits;
        if l.max_concurrent_requests == 0
            || l.max_streams_per_connection == 0
            || l.max_connections_per_peer == 0
            || l.max_auth_checks_per_peer == 0
            || l.max_auth_failures_per_peer == 0
        {
            return Err(invalid("limits must be positive".into()));
        }
        Ok(Self {
            ca,
            listen: raw.listen,
            admin: raw.admin,
            cluster,
            agent_namespace: raw.agent_namespace.clone(),
            ca_secret: raw.ca_secret.clone(),
            gateway_tls_namespace: raw.gateway_tls_namespace.clone(),
            agent_identity,
            server_identity,
            serving_names: raw.serving_names,
            nodes: raw.nodes,
            limits: raw.limits,
            shutdown_grace: Duration::from_secs(raw.shutdown_grace_seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::from_yaml(yaml, Path::new("ca.yaml"), Path::new("/etc/signet"))
    }

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_paths() {
        let c = parse(&format!(
            "trustDomain: cluster.local\nstateDir: ca\nclusterStateDir: /state\nnodes: [{{name: node-a, tokenSha256: {HASH}}}]\n"
        ))
        .expect("valid");
        assert_eq!(c.listen.port(), 15012);
        assert_eq!(c.ca.source, CaSource::StateDir("/etc/signet/ca".into()));
        assert_eq!(c.cluster, CaCluster::Dir(PathBuf::from("/state")));
        assert_eq!(
            c.agent_identity.as_str(),
            "spiffe://cluster.local/ns/signet-system/sa/signet-agent"
        );
        assert_eq!(c.ca.ttl.default_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = parse("trustDomain: Cluster.local\nstateDir: x\nclusterStateDir: y\n")
            .expect_err("uppercase");
        assert!(
            e.to_string().starts_with("ca.yaml:") && e.to_string().contains("lowercase"),
            "{e}"
        );
        let e = parse("trustDomain: td\nclusterStateDir: y\n").expect_err("no source");
        assert!(
            e.to_string()
                .contains("exactly one of `stateDir`, `cacertsDir` and `caSecret`"),
            "{e}"
        );
        let e = parse("trustDomain: td\nstateDir: x\nclusterStateDir: y\nbogus: 1\n")
            .expect_err("unknown");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = parse("trustDomain: td\nstateDir: x\nclusterStateDir: y\nnodes: [{name: a, tokenSha256: nothex}]\n")
            .expect_err("bad hash");
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let e = parse(
            "trustDomain: td\nstateDir: x\nclusterStateDir: y\nsvid: {defaultTtlSeconds: 100000}\n",
        )
        .expect_err("default above max");
        assert!(e.to_string().contains("default"), "{e}");
    }

    #[test]
    fn kubernetes_mode_replaces_the_directory_and_the_node_tokens() {
        let c = parse(
            "trustDomain: td
cacertsDir: /etc/cacerts
kubernetes: true
",
        )
        .expect("kubernetes");
        assert_eq!(c.cluster, CaCluster::Kubernetes);
        assert_eq!(c.agent_namespace, "signet-system");
        let e = parse(
            "trustDomain: td
stateDir: x
kubernetes: true
clusterStateDir: y
",
        )
        .expect_err("both");
        assert!(
            e.to_string().contains("exactly one of `clusterStateDir`"),
            "{e}"
        );
        let e = parse(&format!(
            "trustDomain: td\nstateDir: x\nkubernetes: true\nnodes: [{{name: a, tokenSha256: {HASH}}}]\n"
        ))
        .expect_err("tokens in kubernetes mode");
        assert!(e.to_string().contains("leave out `nodes`"), "{e}");
    }
}
