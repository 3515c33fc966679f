//! From a snapshot to the kernel maps and attachments (`datapath::sync`), without root: the
//! in-memory datapath stands for the kernel's maps and a table for what the node knows of its
//! pods. Local pods are found by their network namespace's cookie and their host interface; a
//! pod in the node's own namespace, one with no namespace found and one whose interface is gone
//! are reported and not entered; a second sync of the same snapshot writes nothing; a pod that
//! leaves takes its entries and its tc attachment with it; and a set a map cannot hold is refused
//! before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

mod common;

use common::Snapshots;

use signet_agent::datapath::fake::FakeDatapath;
use signet_agent::datapath::sync::{Host, Unplaced, sync};
use signet_agent::datapath::{DatapathError, EndpointKey, desired_policy};
use signet_agent::state::snapshot::{LocalEndpoint, Snapshot};

/// What the node knows, as a table.
#[derive(Default)]
struct TableHost {
    addresses: Vec<IpAddr>,
    /// Network namespace annotation → cookie.
    cookies: BTreeMap<PathBuf, u64>,
    /// Interface name → index.
    interfaces: BTreeMap<String, u32>,
    node: Option<u64>,
}

impl Host for TableHost {
    fn local_addresses(&self) -> Vec<IpAddr> {
        self.addresses.clone()
    }
    fn pod_netns(&self, ep: &LocalEndpoint) -> Option<PathBuf> {
        ep.netns.as_ref().map(PathBuf::from)
    }
    fn pod_interface(&self, _ip: IpAddr) -> Option<String> {
        None
    }
    fn ifindex(&self, name: &str) -> Option<u32> {
        self.interfaces.get(name).copied()
    }
    fn netns_cookies(&self, paths: &[PathBuf]) -> Vec<Result<u64, DatapathError>> {
        paths
            .iter()
            .map(|p| {
                self.cookies
                    .get(p)
                    .copied()
                    .ok_or_else(|| DatapathError::Netns {
                        path: p.clone(),
                        reason: "No such file or directory (os error 2)".into(),
                    })
            })
            .collect()
    }
    fn node_netns(&self) -> Option<u64> {
        self.node
    }
}

fn pod(name: &str, ip: &str, netns: &str, host_if: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: {name}}}
  annotations: {{signet.dev/netns: /run/netns/{netns}, signet.dev/host-interface: {host_if}}}
spec: {{nodeName: node-a, serviceAccountName: {name}, containers: [{{name: c, image: c}}]}}
status: {{podIP: {ip}}}
"
    )
}

const BASE: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: web-in, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  ingress: [{from: [{identity: spiffe://cluster.local/ns/shop/sa/api}], ports: [{port: 8080}]}]
";

fn cluster(pods: &[String]) -> String {
    let mut text = BASE.to_owned();
    for p in pods {
        text.push_str("---\n");
        text.push_str(p);
    }
    text
}

fn host() -> TableHost {
    TableHost {
        addresses: vec![
            "10.0.0.1".parse().expect("ip"),
            "127.0.0.1".parse().expect("ip"),
        ],
        cookies: [
            (PathBuf::from("/run/netns/web"), 0x1001),
            (PathBuf::from("/run/netns/api"), 0x1002),
            (PathBuf::from("/run/netns/node"), 0x1),
        ]
        .into(),
        interfaces: [("veth-web".to_owned(), 11), ("veth-api".to_owned(), 12)].into(),
        node: Some(0x1),
    }
}

fn local<'a>(snap: &'a Snapshot, name: &str) -> &'a LocalEndpoint {
    snap.local
        .iter()
        .find(|ep| snap.workload(ep.workload).key() == format!("shop/{name}"))
        .unwrap_or_else(|| panic!("{name} is not local"))
}

#[test]
fn local_pods_are_found_by_namespace_and_interface_with_their_endpoint_and_identity() {
    let mut b = Snapshots::for_node("node-a");
    let snap = b.build(
        &cluster(&[
            pod("web", "10.1.0.2", "web", "veth-web"),
            pod("api", "10.1.0.3", "api", "veth-api"),
        ]),
        None,
    );
    let mut dp = FakeDatapath::default();
    let synced = sync(&mut dp, &host(), &snap).expect("syncs");
    assert!(synced.unplaced.is_empty(), "{:?}", synced.unplaced);
    for (name, cookie, ifindex) in [("web", 0x1001, 11), ("api", 0x1002, 12)] {
        let ep = local(&snap, name);
        let identity = snap.identities[&snap.workload(ep.workload).identity];
        for key in [EndpointKey::Netns(cookie), EndpointKey::Ifindex(ifindex)] {
            let v = dp
                .endpoints
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: {key:?}"));
            assert_eq!((v.endpoint_id, v.identity), (ep.id, identity), "{name}");
        }
    }
    assert_eq!(dp.endpoints.len(), 4);
    assert_eq!(
        dp.interfaces,
        BTreeSet::from(["veth-api".to_owned(), "veth-web".to_owned()])
    );
    // The policy map holds what the snapshot compiled, and the ipcache names both pods; the
    // node's loopback is not the node.
    assert_eq!(dp.policy, desired_policy(&snap.compiled));
    assert!(!dp.policy.is_empty());
    assert!(dp.ipcache.iter().any(|e| e.ip.to_string() == "10.1.0.2"));
    assert!(!dp.ipcache.iter().any(|e| e.ip.is_loopback()));

    // The same snapshot again writes nothing and attaches nothing.
    let (writes, attaches) = (dp.policy_writes, dp.attaches);
    let again = sync(&mut dp, &host(), &snap).expect("syncs");
    assert_eq!((again.policy.written, again.policy.removed), (0, 0));
    assert_eq!((dp.policy_writes, dp.attaches), (writes, attaches));
}

#[test]
fn pods_that_cannot_be_placed_are_reported_and_never_entered() {
    let mut b = Snapshots::for_node("node-a");
    let snap = b.build(
        &cluster(&[
            // hostNetwork-like: its namespace is the node's.
            pod("web", "10.1.0.2", "node", "veth-web"),
            // Its namespace does not exist, and its interface is gone.
            pod("api", "10.1.0.3", "gone", "veth-gone"),
        ]),
        None,
    );
    let mut dp = FakeDatapath::default();
    let synced = sync(&mut dp, &host(), &snap).expect("syncs");
    let reasons: Vec<(&str, &Unplaced)> = synced
        .unplaced
        .iter()
        .map(|(pod, why)| (pod.as_str(), why))
        .collect();
    assert!(
        reasons.contains(&("shop/web", &Unplaced::NodeNetns("/run/netns/node".into()))),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("shop/api", &Unplaced::NoInterface("veth-gone".into()))),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(pod, why)| *pod == "shop/api" && matches!(why, Unplaced::NetnsUnreadable(_))),
        "{reasons:?}"
    );
    // The node's own namespace is never an endpoint: capturing it would capture the agent.
    assert!(!dp.endpoints.contains_key(&EndpointKey::Netns(0x1)));
    // web's interface exists, so tc still enforces ingress to it.
    assert_eq!(dp.endpoints.len(), 1, "{:?}", dp.endpoints);
    assert!(dp.endpoints.contains_key(&EndpointKey::Ifindex(11)));
    assert_eq!(dp.interfaces, BTreeSet::from(["veth-web".to_owned()]));
}

#[test]
fn a_pod_that_leaves_takes_its_entries_and_its_attachment_with_it() {
    let mut b = Snapshots::for_node("node-a");
    let both = b.build(
        &cluster(&[
            pod("web", "10.1.0.2", "web", "veth-web"),
            pod("api", "10.1.0.3", "api", "veth-api"),
        ]),
        None,
    );
    let mut dp = FakeDatapath::default();
    sync(&mut dp, &host(), &both).expect("syncs");
    let web_id = local(&both, "web").id;
    let one = b.build(
        &cluster(&[pod("web", "10.1.0.2", "web", "veth-web")]),
        Some(&both),
    );
    assert_eq!(local(&one, "web").id, web_id, "endpoint ids are stable");
    sync(&mut dp, &host(), &one).expect("syncs");
    assert_eq!(
        dp.endpoints.keys().copied().collect::<Vec<_>>(),
        vec![EndpointKey::Netns(0x1001), EndpointKey::Ifindex(11)]
    );
    assert_eq!(dp.interfaces, BTreeSet::from(["veth-web".to_owned()]));
    assert!(!dp.ipcache.iter().any(|e| e.ip.to_string() == "10.1.0.3"));
    assert_eq!(dp.policy, desired_policy(&one.compiled));
}

#[test]
fn a_set_a_map_cannot_hold_is_refused_before_anything_is_written() {
    let mut b = Snapshots::for_node("node-a");
    let one = b.build(&cluster(&[pod("web", "10.1.0.2", "web", "veth-web")]), None);
    let both = b.build(
        &cluster(&[
            pod("web", "10.1.0.2", "web", "veth-web"),
            pod("api", "10.1.0.3", "api", "veth-api"),
        ]),
        Some(&one),
    );
    for map in ["endpoints", "ipcache", "policy"] {
        let mut dp = FakeDatapath::default();
        sync(&mut dp, &host(), &one).expect("the first fits");
        let before = dp.clone();
        // Room for what is in force and no more (policy: one entry less).
        match map {
            "endpoints" => dp.capacity.endpoints = 1,
            "ipcache" => dp.capacity.ipcache = dp.ipcache.len(),
            _ => dp.capacity.policy = dp.policy.len() - 1,
        }
        let err = sync(&mut dp, &host(), &both).expect_err("does not fit");
        assert!(
            matches!(err, DatapathError::Full { .. }) && err.to_string().contains("kept"),
            "{map}: {err}"
        );
        assert_eq!(dp.endpoints, before.endpoints, "{map}: endpoints kept");
        assert_eq!(dp.ipcache, before.ipcache, "{map}: ipcache kept");
        assert_eq!(dp.policy, before.policy, "{map}: policy kept");
        assert_eq!(dp.interfaces, before.interfaces, "{map}: attachments kept");
    }
}
