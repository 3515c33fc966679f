//! The tc fixture: a datapath loaded for a [`NetEnv`], its programs on the pod's host-side veth,
//! the pod as endpoint 1 (identity 300) and the peer as identity 400, IPv4 and IPv6.

use std::collections::BTreeMap;

use signet_agent::datapath::loader::KernelDatapath;
use signet_agent::datapath::{Datapath, DatapathConfig, EndpointKey, IpcacheEntry};
use signet_bpf::maps::EndpointValue;
use signet_policy::compile::{Action, Compiled, Entry, Key};
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;

use super::{Env, NetEnv};

pub const PROXY_MARK: u32 = 0x5167;
pub const POD_IDENTITY: u32 = 300;
pub const PEER_IDENTITY: u32 = 400;

/// An ingress entry of endpoint 1.
pub fn entry(proto: Protocol, peer: u32, port: u16, action: Action, rule: u32) -> (Key, Entry) {
    directed(Direction::Ingress, proto, peer, port, action, rule)
}

/// An egress entry of endpoint 1.
pub fn egress(proto: Protocol, peer: u32, port: u16, action: Action, rule: u32) -> (Key, Entry) {
    directed(Direction::Egress, proto, peer, port, action, rule)
}

fn directed(
    direction: Direction,
    proto: Protocol,
    peer: u32,
    port: u16,
    action: Action,
    rule: u32,
) -> (Key, Entry) {
    (
        Key {
            endpoint: 1,
            direction,
            proto,
            peer,
            port,
        },
        Entry { action, rule },
    )
}

/// What the peer namespace is to the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A mesh workload, identity 400.
    Mesh,
    /// Known to the ipcache as identity 400, not in the mesh.
    Outside,
    /// Not in the ipcache at all: world.
    World,
}

/// How the datapath is set up for a test.
#[derive(Debug)]
pub struct Setup<'a> {
    /// Strict mTLS: plaintext TCP from anyone but the proxy and the host is dropped.
    pub strict: bool,
    pub peer: Peer,
    pub policy: &'a [(Key, Entry)],
}

impl Setup<'_> {
    /// Loads the datapath, attaches tc to the pod's veth inside the node namespace and fills
    /// the maps.
    pub fn load(&self, env: &Env, net: &NetEnv) -> KernelDatapath {
        let ifindex = net.pod_host_ifindex();
        net.in_node(|| {
            let mut dp = KernelDatapath::load(&env.loader()).expect("load");
            dp.attach_endpoint_interface(&net.pod_host_if)
                .expect("attach tc");
            dp.set_config(&DatapathConfig {
                proxy_v4: net.node_pod_side_ip.parse().expect("ip"),
                proxy_v6: None,
                proxy_port: 15001,
                strict: self.strict,
                proxy_mark: PROXY_MARK,
                event_sample: 0,
            })
            .expect("config");
            pod_endpoint(&mut dp, ifindex, super::netns_cookie(&net.pod));
            dp.reconcile_ipcache(&self.ipcache(net)).expect("ipcache");
            let mut compiled = Compiled::default();
            compiled.entries.extend(self.policy.iter().copied());
            dp.reconcile_policy(&compiled).expect("policy");
            dp
        })
    }

    fn ipcache(&self, net: &NetEnv) -> Vec<IpcacheEntry> {
        let host = |ip: &str, prefix, identity, mesh| IpcacheEntry {
            ip: ip.parse().expect("ip"),
            prefix,
            identity,
            mesh,
            service: false,
        };
        let mut entries = vec![
            host(&net.pod_ip, 32, POD_IDENTITY, true),
            host(&net.pod_ip6, 128, POD_IDENTITY, true),
        ];
        if self.peer != Peer::World {
            let mesh = self.peer == Peer::Mesh;
            entries.push(host(&net.peer_ip, 32, PEER_IDENTITY, mesh));
            entries.push(host(&net.peer_ip6, 128, PEER_IDENTITY, mesh));
        }
        entries
    }
}

/// Makes the pod endpoint 1, the only one: its host-side interface `ifindex` (tc) and its
/// network namespace (connect).
pub fn pod_endpoint(dp: &mut KernelDatapath, ifindex: u32, netns: u64) {
    let value = EndpointValue {
        endpoint_id: 1,
        identity: POD_IDENTITY,
        flags: 0,
        _pad: 0,
    };
    dp.reconcile_endpoints(&BTreeMap::from([
        (EndpointKey::Ifindex(ifindex), value),
        (EndpointKey::Netns(netns), value),
    ]))
    .expect("endpoints");
}

/// A plaintext TCP hello from `from_ns` to the pod's IPv4 address, with a server on `port` for
/// the occasion.
pub fn tcp(net: &NetEnv, from_ns: &str, port: u16, extra: &[&str]) -> serde_json::Value {
    let mut server = net.serve(&net.pod, &format!("{}:{port}", net.pod_ip), false, 1, 3000);
    let mut args = vec!["--timeout-ms", "800"];
    args.extend_from_slice(extra);
    let report = net.client(from_ns, &format!("{}:{port}", net.pod_ip), &args);
    let _ = server.kill();
    let _ = server.wait();
    report
}
