//! The agent's side of the eBPF datapath: loading and pinning the programs and maps of
//! `signet-bpf`, attaching them to the node's cgroup subtree and endpoint interfaces, and
//! writing identities, endpoints and compiled policy into the maps by diff.
//!
//! Only this module (with `signet-bpf`) touches aya. Everything above it talks to the
//! [`Datapath`] trait, which [`fake::FakeDatapath`] implements in memory for tests without root.

pub mod bpffs;
pub mod discover;
pub mod events;
pub mod fake;
pub mod loader;
pub mod netns;
pub mod sync;
pub mod translate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use signet_bpf::maps::{EndpointValue, PolicyKey, PolicyValue};
use signet_policy::compile::{Compiled, Entry, Key};
use signet_policy::eval::Direction;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading BPF object {object}: {reason}")]
    Load {
        object: &'static str,
        reason: String,
    },
    #[error("program {program}: {reason}")]
    Program {
        program: &'static str,
        reason: String,
    },
    #[error("attaching {program} to {target}: {reason}")]
    Attach {
        program: &'static str,
        target: String,
        reason: String,
    },
    #[error("map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error(
        "map {map} holds {capacity} entries but {needed} are needed; the entries in force were kept"
    )]
    Full {
        map: &'static str,
        needed: usize,
        capacity: usize,
    },
    #[error("network namespace {path}: {reason}")]
    Netns { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the programs need to know about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// The proxy's outbound listener, reachable from pods (IPv4 and optionally IPv6).
    pub proxy_v4: std::net::Ipv4Addr,
    pub proxy_v6: Option<std::net::Ipv6Addr>,
    pub proxy_port: u16,
    /// Drop plaintext TCP from other mesh workloads.
    pub strict: bool,
    /// `SO_MARK` of the proxy's connections to workloads.
    pub proxy_mark: u32,
    /// Report 1 in N allowed connections as events (0: none).
    pub event_sample: u32,
}

/// An address or prefix and the identity behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpcacheEntry {
    pub ip: IpAddr,
    pub prefix: u8,
    pub identity: u32,
    /// A mesh workload or Service: connections to it are captured.
    pub mesh: bool,
    /// A Service ClusterIP: `identity` is its backends' one identity, or ANY when they have
    /// several or none; captured TCP to it is decided by the proxy.
    pub service: bool,
}

/// Where an endpoint is found: its network namespace's cookie (connect side: every process of
/// the pod, whatever its cgroup) and/or its host-side interface (tc side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndpointKey {
    Netns(u64),
    Ifindex(u32),
}

/// The datapath as the rest of the agent sees it.
pub trait Datapath: Send {
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError>;
    /// Makes the ipcache hold exactly `entries`, touching only what differs.
    fn reconcile_ipcache(&mut self, entries: &[IpcacheEntry]) -> Result<(), DatapathError>;
    /// Makes the endpoint maps hold exactly `endpoints`, touching only what differs.
    fn reconcile_endpoints(
        &mut self,
        endpoints: &BTreeMap<EndpointKey, EndpointValue>,
    ) -> Result<(), DatapathError>;
    /// Makes the policy map hold exactly `compiled`'s entries: adds and changes first, then
    /// removals, so no lookup ever sees neither the old nor the new entry. A set larger than the
    /// map is refused before anything is written.
    fn reconcile_policy(&mut self, compiled: &Compiled) -> Result<PolicyChanges, DatapathError>;
    /// The policy entries in force.
    fn policy_entries(&self) -> Result<BTreeMap<PolicyKeyOrd, PolicyValue>, DatapathError>;
    /// How many entries each map holds at most (as created: pinned maps keep their size).
    fn capacity(&self) -> Capacity;
    /// The node-wide programs attached (the cgroup hooks), by name, as their links stand now.
    fn attached_programs(&self) -> Vec<String>;
    /// Attaches the tc programs to an endpoint's host-side interface (a no-op when ours are
    /// attached already).
    fn attach_endpoint_interface(&mut self, ifname: &str) -> Result<(), DatapathError>;
    /// Detaches the tc programs from every interface not in `keep`.
    fn detach_endpoint_interfaces_except(
        &mut self,
        keep: &BTreeSet<String>,
    ) -> Result<(), DatapathError>;
}

/// Refuses a set of `needed` entries for a map of `capacity`, before anything is written.
pub fn fits(map: &'static str, needed: usize, capacity: usize) -> Result<(), DatapathError> {
    if needed > capacity {
        return Err(DatapathError::Full {
            map,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// Map capacities, read from the maps themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub ipcache: usize,
    /// Each of the two endpoint maps (by network namespace, by interface).
    pub endpoints: usize,
    pub policy: usize,
}

/// What a policy reconciliation wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    pub written: usize,
    pub removed: usize,
}

/// The map form of a compiled entry.
pub fn policy_entry(k: &Key, e: &Entry) -> (PolicyKey, PolicyValue) {
    (
        PolicyKey {
            endpoint_id: k.endpoint,
            peer_identity: k.peer,
            dport: k.port,
            protocol: k.proto.number(),
            direction: match k.direction {
                Direction::Ingress => signet_bpf::maps::DIRECTION_INGRESS,
                Direction::Egress => signet_bpf::maps::DIRECTION_EGRESS,
            },
        },
        PolicyValue {
            action: e.action.code(),
            _pad: [0; 3],
            rule_id: e.rule,
        },
    )
}

/// The desired policy map contents for `compiled`.
pub fn desired_policy(compiled: &Compiled) -> BTreeMap<PolicyKeyOrd, PolicyValue> {
    compiled
        .entries
        .iter()
        .map(|(k, e)| {
            let (k, v) = policy_entry(k, e);
            (PolicyKeyOrd(k), v)
        })
        .collect()
}

/// `PolicyKey` ordered by its fields, for deterministic writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyKeyOrd(pub PolicyKey);

impl PolicyKeyOrd {
    fn tuple(&self) -> (u32, u8, u8, u32, u16) {
        let k = &self.0;
        (
            k.endpoint_id,
            k.direction,
            k.protocol,
            k.peer_identity,
            k.dport,
        )
    }
}

impl PartialOrd for PolicyKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PolicyKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}
