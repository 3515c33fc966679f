//! From a snapshot to the kernel: where each local pod is found (its network namespace's cookie
//! for the socket programs, its host-side interface for tc), the tc attachments, and the
//! policy, endpoint and ipcache maps, written over the [`Datapath`] trait.
//!
//! What the node itself knows (its addresses, which interface routes to a pod, which network
//! namespace a pod's processes are in) comes through [`Host`], so the translation is tested
//! with [`super::fake::FakeDatapath`] and a table instead of a kernel.
//!
//! Order: policy first (new entries before the endpoints and identities that use them), then
//! the endpoints that make a pod's traffic reach them, then the ipcache, then detaching the
//! interfaces that are gone. Any map that cannot hold its new contents refuses before anything
//! is written to it, and the error stops the sync: the maps after it keep what they hold.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use signet_bpf::maps::EndpointValue;

use signet_bpf::map_names as names;

use super::{Datapath, DatapathError, EndpointKey, PolicyChanges, discover, fits, netns};
use crate::state::snapshot::{LocalEndpoint, Snapshot};

/// What the node says about itself.
pub trait Host {
    /// Every address configured in the node's network namespace.
    fn local_addresses(&self) -> Vec<IpAddr>;
    /// The network namespace of a local pod (its annotation, else a process in its cgroup).
    fn pod_netns(&self, ep: &LocalEndpoint) -> Option<PathBuf>;
    /// The interface of the node's host route to exactly `ip`.
    fn pod_interface(&self, ip: IpAddr) -> Option<String>;
    /// An interface's index, `None` when it does not exist.
    fn ifindex(&self, name: &str) -> Option<u32>;
    /// The cookies of these network namespaces, in order.
    fn netns_cookies(&self, paths: &[PathBuf]) -> Vec<Result<u64, DatapathError>>;
    /// The cookie of the node's own network namespace, which is never an endpoint.
    fn node_netns(&self) -> Option<u64>;
}

/// The node this process runs on.
#[derive(Debug, Clone)]
pub struct NodeHost {
    /// The cgroup v2 directory whose subtree holds this node's pods.
    pub cgroup_root: PathBuf,
    node_netns: Option<u64>,
}

impl NodeHost {
    /// Reads the node's own network namespace cookie now (the agent's namespace).
    pub fn new(cgroup_root: &Path) -> Self {
        let node_netns = match netns::current_cookie() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's network namespace cookie");
                None
            }
        };
        Self {
            cgroup_root: cgroup_root.to_owned(),
            node_netns,
        }
    }
}

impl Host for NodeHost {
    fn local_addresses(&self) -> Vec<IpAddr> {
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            tracing::warn!("cannot list this node's addresses; they stay world to policy");
            return vec![];
        };
        addrs
            .filter_map(|a| {
                let addr = a.address?;
                if let Some(v4) = addr.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect()
    }

    fn pod_netns(&self, ep: &LocalEndpoint) -> Option<PathBuf> {
        if let Some(ns) = &ep.netns {
            return Some(netns::path_of(ns));
        }
        let cgroup = ep.cgroup.clone().or_else(|| {
            ep.uid
                .as_deref()
                .and_then(|uid| discover::pod_cgroup(&self.cgroup_root, uid))
        })?;
        discover::pod_netns(&self.cgroup_root.join(cgroup))
    }

    fn pod_interface(&self, ip: IpAddr) -> Option<String> {
        discover::pod_interface(ip)
    }

    /// In this thread's network namespace (sysfs would show the namespace that mounted it).
    fn ifindex(&self, name: &str) -> Option<u32> {
        nix::net::if_::if_nametoindex(name).ok()
    }

    fn netns_cookies(&self, paths: &[PathBuf]) -> Vec<Result<u64, DatapathError>> {
        netns::cookies(paths)
    }

    fn node_netns(&self) -> Option<u64> {
        self.node_netns
    }
}

/// Why a local pod is not (fully) enforced in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unplaced {
    /// No network namespace known: its own connections are not captured.
    NoNetns,
    /// Its network namespace is the node's (hostNetwork): capturing it would capture the node.
    NodeNetns(PathBuf),
    /// Its network namespace could not be read.
    NetnsUnreadable(String),
    /// The host-side interface named for it does not exist.
    NoInterface(String),
}

impl std::fmt::Display for Unplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unplaced::NoNetns => f.write_str(
                "pod network namespace not found (no annotation, no process in its cgroup): \
                 its connections are not captured until it is",
            ),
            Unplaced::NodeNetns(p) => write!(
                f,
                "pod shares the node's network namespace ({}): not captured",
                p.display()
            ),
            Unplaced::NetnsUnreadable(e) => write!(f, "pod network namespace unreadable: {e}"),
            Unplaced::NoInterface(i) => write!(f, "pod interface {i} missing"),
        }
    }
}

/// What a sync wrote, and which pods it could not place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub interfaces: BTreeSet<String>,
    pub policy: PolicyChanges,
    /// (map, entries, capacity) of each map after the sync: the counts checked against the
    /// capacities before anything was written.
    pub maps: Vec<(&'static str, usize, usize)>,
    /// (pod `namespace/name`, why), in snapshot order.
    pub unplaced: Vec<(String, Unplaced)>,
}

/// Where the local pods are found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    /// Host-side interfaces to attach tc to.
    pub interfaces: BTreeSet<String>,
    /// (pod `namespace/name`, why), in snapshot order.
    pub unplaced: Vec<(String, Unplaced)>,
}

/// The endpoint entries and tc interfaces `snap` calls for on this node.
pub fn endpoints(snap: &Snapshot, host: &dyn Host) -> Placement {
    let mut endpoints = BTreeMap::new();
    let mut interfaces = BTreeSet::new();
    let mut unplaced = Vec::new();
    let mut namespaces = Vec::new();
    for ep in &snap.local {
        let w = snap.workload(ep.workload);
        let value = EndpointValue {
            endpoint_id: ep.id,
            identity: snap.identities.get(&w.identity).copied().unwrap_or(0),
            flags: 0,
            _pad: 0,
        };
        match host.pod_netns(ep) {
            Some(path) => namespaces.push((w.key(), path, value)),
            None => unplaced.push((w.key(), Unplaced::NoNetns)),
        }
        // Annotations (the local topology) first, else the host route to the pod.
        let interface = ep
            .host_interface
            .clone()
            .or_else(|| w.ips.first().and_then(|ip| host.pod_interface(*ip)));
        if let Some(ifname) = interface {
            match host.ifindex(&ifname) {
                Some(i) => {
                    endpoints.insert(EndpointKey::Ifindex(i), value);
                    interfaces.insert(ifname);
                }
                None => unplaced.push((w.key(), Unplaced::NoInterface(ifname))),
            }
        }
    }
    let paths: Vec<PathBuf> = namespaces.iter().map(|(_, p, _)| p.clone()).collect();
    for ((pod, path, value), cookie) in namespaces.into_iter().zip(host.netns_cookies(&paths)) {
        match cookie {
            // A pod in the node's own namespace (hostNetwork) is the node: capturing it would
            // capture the agent and the kubelet.
            Ok(c) if Some(c) == host.node_netns() => {
                unplaced.push((pod, Unplaced::NodeNetns(path)));
            }
            Ok(c) => {
                endpoints.insert(EndpointKey::Netns(c), value);
            }
            Err(e) => unplaced.push((pod, Unplaced::NetnsUnreadable(e.to_string()))),
        }
    }
    Placement {
        endpoints,
        interfaces,
        unplaced,
    }
}

/// Makes the kernel hold what `snap` calls for. Unplaced pods are logged (each time: their
/// traffic is not enforced in the kernel while they stay so) and reported.
pub fn sync(
    dp: &mut dyn Datapath,
    host: &dyn Host,
    snap: &Snapshot,
) -> Result<Synced, DatapathError> {
    // Loopback stays out: a pod's own 127.0.0.1 is not this node.
    let local: Vec<IpAddr> = host
        .local_addresses()
        .into_iter()
        .filter(|ip| !ip.is_loopback())
        .collect();
    let ipcache = super::translate::ipcache(snap, &local);
    let Placement {
        endpoints,
        interfaces,
        unplaced,
    } = endpoints(snap, host);
    for (pod, why) in &unplaced {
        tracing::warn!(pod = %pod, "{why}");
    }
    // A set that cannot fit is refused before any map is written or any interface attached.
    let capacity = dp.capacity();
    let by_netns = endpoints
        .keys()
        .filter(|k| matches!(k, EndpointKey::Netns(_)))
        .count();
    let maps = vec![
        (names::IPCACHE, ipcache.len(), capacity.ipcache),
        (names::EP_NETNS, by_netns, capacity.endpoints),
        (
            names::EP_IFINDEX,
            endpoints.len() - by_netns,
            capacity.endpoints,
        ),
        (names::POLICY, snap.compiled.entries.len(), capacity.policy),
    ];
    for &(map, needed, capacity) in &maps {
        fits(map, needed, capacity)?;
    }
    for ifname in &interfaces {
        dp.attach_endpoint_interface(ifname)?;
    }
    let policy = dp.reconcile_policy(&snap.compiled)?;
    dp.reconcile_endpoints(&endpoints)?;
    dp.reconcile_ipcache(&ipcache)?;
    dp.detach_endpoint_interfaces_except(&interfaces)?;
    Ok(Synced {
        endpoints,
        interfaces,
        policy,
        maps,
        unplaced,
    })
}
