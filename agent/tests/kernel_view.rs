//! What the kernel's ipcache holds for a snapshot (`datapath::translate::ipcache`), without
//! root: pods carry their identity and are captured, a ClusterIP its backends' one identity (or
//! ANY), a contested address is world but captured, this node is host and the others
//! remote-node (neither captured), `cidr:` prefixes their own numbers, and IPv4 as a whole is
//! world unless a policy names it.

use std::net::IpAddr;

use signet_agent::datapath::IpcacheEntry;
use signet_agent::datapath::translate::ipcache;
mod common;

use common::snapshot_of;
use signet_policy::identity::{ANY, HOST, REMOTE_NODE, WORLD};

const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, image: c}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop, labels: {app: api}}
spec: {nodeName: node-b, serviceAccountName: api, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: node-b, serviceAccountName: db, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: twin-0, namespace: shop, labels: {app: twin}}
spec: {nodeName: node-b, serviceAccountName: twin, containers: [{name: c, image: c}]}
status: {podIP: 10.2.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.5, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: api, namespace: shop}
subsets: [{addresses: [{ip: 10.2.0.2}], ports: [{name: http, port: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: shop}
spec: {clusterIP: 10.96.0.6, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: mixed, namespace: shop}
subsets: [{addresses: [{ip: 10.2.0.2}, {ip: 10.1.0.2}], ports: [{name: http, port: 8080}]}]
---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: web-out, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  egress: [{to: [{cidr: 203.0.113.0/24}]}]
";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn entry<'a>(entries: &'a [IpcacheEntry], addr: &str, prefix: u8) -> &'a IpcacheEntry {
    entries
        .iter()
        .find(|e| e.ip == ip(addr) && e.prefix == prefix)
        .unwrap_or_else(|| panic!("no entry for {addr}/{prefix}: {entries:?}"))
}

#[test]
fn the_ipcache_says_who_every_address_is_and_what_is_captured() {
    let snap = snapshot_of(CLUSTER, "node-a");
    let number = |sa: &str| {
        snap.identities
            .iter()
            .find(|(id, _)| id.as_str().ends_with(&format!("/sa/{sa}")))
            .map(|(_, n)| *n)
            .expect("a number")
    };
    let entries = ipcache(&snap, &[ip("10.0.0.1")]);

    let web = entry(&entries, "10.1.0.2", 32);
    assert_eq!(
        (web.identity, web.mesh, web.service),
        (number("web"), true, false)
    );
    let api = entry(&entries, "10.2.0.2", 32);
    assert_eq!((api.identity, api.mesh), (number("api"), true));
    // One backend identity behind a ClusterIP: that one; several: ANY. Both captured.
    let vip = entry(&entries, "10.96.0.5", 32);
    assert_eq!(
        (vip.identity, vip.mesh, vip.service),
        (number("api"), true, true)
    );
    let mixed = entry(&entries, "10.96.0.6", 32);
    assert_eq!((mixed.identity, mixed.service), (ANY, true));
    // Two pods claim 10.2.0.3: world, but captured, so nothing reaches it in plaintext.
    let contested = entry(&entries, "10.2.0.3", 32);
    assert_eq!((contested.identity, contested.mesh), (WORLD, true));
    // This node is the host, the other remote-node; neither captured.
    let me = entry(&entries, "10.0.0.1", 32);
    assert_eq!((me.identity, me.mesh), (HOST, false));
    let other = entry(&entries, "10.0.0.2", 32);
    assert_eq!((other.identity, other.mesh), (REMOTE_NODE, false));
    // A `cidr:` peer's prefix has its own number; IPv4 as a whole is world.
    let prefix = entry(&entries, "203.0.113.0", 24);
    assert!(
        prefix.identity >= signet_policy::cidr::CIDR_IDENTITY_BASE,
        "{prefix:?}"
    );
    assert!(!prefix.mesh);
    assert_eq!(entry(&entries, "0.0.0.0", 0).identity, WORLD);
    // Sorted, one entry per prefix.
    let keys: Vec<(IpAddr, u8)> = entries.iter().map(|e| (e.ip, e.prefix)).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted);

    // On node-b the roles of the node addresses swap.
    let b = snapshot_of(CLUSTER, "node-b");
    let entries = ipcache(&b, &[ip("10.0.0.2")]);
    assert_eq!(entry(&entries, "10.0.0.2", 32).identity, HOST);
    assert_eq!(entry(&entries, "10.0.0.1", 32).identity, REMOTE_NODE);
}

#[test]
fn a_policy_that_names_all_of_ipv4_keeps_its_own_number() {
    let text = CLUSTER.replace("cidr: 203.0.113.0/24", "cidr: 0.0.0.0/0");
    let snap = snapshot_of(&text, "node-a");
    let entries = ipcache(&snap, &[ip("10.0.0.1")]);
    let all = entry(&entries, "0.0.0.0", 0);
    assert!(
        all.identity >= signet_policy::cidr::CIDR_IDENTITY_BASE,
        "{all:?}"
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.ip == ip("0.0.0.0") && e.prefix == 0)
            .count(),
        1
    );
}
