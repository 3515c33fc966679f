//! From a snapshot to what the kernel maps hold: the ipcache (address or prefix → numeric
//! identity, and whether connections to it are captured). Pure: the node's own addresses come
//! in as an argument, so it is tested without root.

use std::net::IpAddr;

use signet_policy::identity::{ANY, HOST, REMOTE_NODE, WORLD};

use super::IpcacheEntry;
use crate::state::snapshot::Snapshot;

/// A /32 or /128 entry.
pub fn host_entry(ip: IpAddr, identity: u32, mesh: bool) -> IpcacheEntry {
    IpcacheEntry {
        ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
        identity,
        mesh,
        service: false,
    }
}

/// Every ipcache entry `snap` calls for on a node whose own addresses are `local` (loopback
/// excluded), sorted by address and prefix, one per prefix.
pub fn ipcache(snap: &Snapshot, local: &[IpAddr]) -> Vec<IpcacheEntry> {
    // Pod addresses carry their workload's identity. A ClusterIP carries its backends' one
    // identity, so what the proxy does not decide (UDP, excluded ports) is checked against
    // it, or ANY when they have several: then only rules for everyone admit it. Both are
    // captured (mesh).
    let number = |w: &signet_policy::cluster::Workload| {
        snap.identities.get(&w.identity).copied().unwrap_or(WORLD)
    };
    let mut ipcache: Vec<IpcacheEntry> = snap
        .state
        .cluster
        .workloads
        .iter()
        .flat_map(|w| w.ips.iter().map(move |ip| host_entry(*ip, number(w), true)))
        .collect();
    for vip in snap.services.cluster_ips() {
        let mut behind: Vec<u32> = snap
            .services
            .endpoint_ips(vip)
            .iter()
            .filter_map(|ip| snap.pod_by_ip(*ip))
            .map(number)
            .collect();
        behind.sort_unstable();
        behind.dedup();
        let identity = match behind.as_slice() {
            [one] => *one,
            _ => ANY,
        };
        ipcache.push(IpcacheEntry {
            service: true,
            ..host_entry(vip, identity, true)
        });
    }
    // An address two pods claim is captured (so nothing reaches it in plaintext) and the
    // proxy refuses it; arriving, it is world, and plaintext from it is strict mode's to drop.
    for ip in snap.refused_ips.keys() {
        if !snap.nodes.values().any(|n| n == ip) {
            ipcache.push(host_entry(*ip, WORLD, true));
        }
    }
    // This node's own addresses are the host (strict mode lets its plaintext probes in);
    // the other nodes are remote-node. Neither is captured.
    let taken: std::collections::HashSet<IpAddr> = ipcache.iter().map(|e| e.ip).collect();
    let nodes = snap
        .nodes
        .values()
        .filter(|ip| !local.contains(ip))
        .map(|ip| (*ip, REMOTE_NODE));
    let host = local.iter().map(|ip| (*ip, HOST));
    for (ip, identity) in host.chain(nodes) {
        if !taken.contains(&ip) {
            ipcache.push(host_entry(ip, identity, false));
        }
    }
    // Prefixes named by `cidr:` peers: an address outside the cluster takes the identity of
    // the longest one containing it (the trie's longest match), pods and nodes being /32s.
    ipcache.extend(snap.compiled.cidrs.iter().map(|(c, n)| IpcacheEntry {
        ip: c.addr(),
        prefix: c.prefix(),
        identity: *n,
        mesh: false,
        service: false,
    }));
    // IPv4 addresses live in the trie as ::ffff:a.b.c.d; a short IPv6 prefix (`::/0`) would
    // cover them too. Unless a policy names all of IPv4 itself, its /96 is world.
    let v4_all = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    if !ipcache.iter().any(|e| e.ip == v4_all && e.prefix == 0) {
        ipcache.push(IpcacheEntry {
            ip: v4_all,
            prefix: 0,
            identity: WORLD,
            mesh: false,
            service: false,
        });
    }
    ipcache.sort_by_key(|e| (e.ip, e.prefix));
    ipcache.dedup_by_key(|e| (e.ip, e.prefix));
    ipcache
}
