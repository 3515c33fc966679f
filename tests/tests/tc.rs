//! Ingress enforcement by the tc program on a pod's host-side veth, over real network
//! namespaces: identities from the ipcache, ports, strict mTLS mode, and the proxy's mark.
//! Needs root; see `common`.

mod common;

use common::tc::{PEER_IDENTITY, POD_IDENTITY, PROXY_MARK, Peer, Setup, entry, tcp};
use common::{Env, NetEnv};
use signet_agent::datapath::{Datapath, IpcacheEntry};
use signet_bpf::maps::{ACTION_DENY, DIRECTION_INGRESS};
use signet_policy::compile::Action;
use signet_policy::resource::Protocol;
use signet_test_support::privileged;

#[test]
fn ingress_allows_and_denies_by_identity_and_port() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let mut dp = Setup {
        strict: false,
        peer: Peer::Outside,
        policy: &[
            entry(Protocol::Tcp, PEER_IDENTITY, 8080, Action::Allow, 3),
            entry(Protocol::Tcp, 0, 0, Action::Deny, 0),
            entry(Protocol::Udp, 0, 0, Action::Deny, 0),
        ],
    }
    .load(&env, &net);
    assert_eq!(
        tcp(&net, &net.peer, 8080, &[])["ok"],
        true,
        "peer 400 may reach 8080"
    );
    let denied = tcp(&net, &net.peer, 8081, &[]);
    assert_eq!(denied["ok"], false, "8081 is default-denied: {denied}");
    // The node itself is not in the ipcache: it is world, and denied.
    assert_eq!(tcp(&net, &net.node, 8080, &[])["ok"], false);
    let events = dp.drain_events();
    assert!(
        events.iter().any(|e| e.dst_port == 8081
            && e.src_identity == PEER_IDENTITY
            && e.action == ACTION_DENY
            && e.direction == DIRECTION_INGRESS),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.dst_port == 8080 && e.src_identity == 2),
        "world is identity 2: {events:?}"
    );
}

#[test]
fn strict_mode_drops_plaintext_from_mesh_workloads_but_passes_the_proxy() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let mut dp = Setup {
        strict: true,
        peer: Peer::Mesh,
        policy: &[entry(Protocol::Tcp, 0, 0, Action::Allow, 0)],
    }
    .load(&env, &net);
    let plain = tcp(&net, &net.peer, 8080, &[]);
    assert_eq!(
        plain["ok"], false,
        "plaintext from a mesh workload is dropped in strict mode: {plain}"
    );
    let mark = PROXY_MARK.to_string();
    let proxied = tcp(&net, &net.node, 8080, &["--mark", &mark]);
    assert_eq!(
        proxied["ok"], true,
        "the proxy's marked connection passes: {proxied}"
    );
    let events = dp.drain_events();
    assert!(
        events
            .iter()
            .any(|e| e.reason == 2 && e.src_identity == PEER_IDENTITY),
        "strict-mode drop event: {events:?}"
    );
}

#[test]
fn strict_mode_drops_plaintext_from_outside_the_mesh_but_not_from_the_host() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    // The peer is not a mesh workload, and policy allows everything.
    let mut dp = Setup {
        strict: true,
        peer: Peer::Outside,
        policy: &[entry(Protocol::Tcp, 0, 0, Action::Allow, 0)],
    }
    .load(&env, &net);
    let plain = tcp(&net, &net.peer, 8080, &[]);
    assert_eq!(
        plain["ok"], false,
        "plaintext from outside the mesh is dropped in strict mode: {plain}"
    );
    // The node's own address (kubelet probes come from it) is the host identity, which passes.
    let ip = |s: &str| s.parse().expect("ip");
    net.in_node(|| {
        dp.reconcile_ipcache(&[
            IpcacheEntry {
                ip: ip(&net.pod_ip),
                prefix: 32,
                identity: POD_IDENTITY,
                mesh: true,
                service: false,
            },
            IpcacheEntry {
                ip: ip(&net.node_pod_side_ip),
                prefix: 32,
                identity: signet_policy::identity::HOST,
                mesh: false,
                service: false,
            },
        ])
        .expect("ipcache");
    });
    let probe = tcp(&net, &net.node, 8080, &[]);
    assert_eq!(
        probe["ok"], true,
        "the host's unmarked probe passes: {probe}"
    );
    let events = dp.drain_events();
    assert!(
        events
            .iter()
            .any(|e| e.reason == 2 && e.src_identity == PEER_IDENTITY),
        "strict-mode drop event for the peer outside the mesh: {events:?}"
    );
}

#[test]
fn permissive_mode_applies_policy_by_ipcache_identity() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let _dp = Setup {
        strict: false,
        peer: Peer::Mesh,
        policy: &[
            entry(Protocol::Tcp, PEER_IDENTITY, 0, Action::Allow, 5),
            entry(Protocol::Tcp, 0, 0, Action::Deny, 0),
        ],
    }
    .load(&env, &net);
    assert_eq!(
        tcp(&net, &net.peer, 8080, &[])["ok"],
        true,
        "mesh peer allowed in plaintext when permissive"
    );
    assert_eq!(
        tcp(&net, &net.node, 8080, &[])["ok"],
        false,
        "world still denied"
    );
}

#[test]
fn udp_follows_the_policy_entries() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let _dp = Setup {
        strict: false,
        peer: Peer::Outside,
        policy: &[
            entry(Protocol::Udp, PEER_IDENTITY, 5353, Action::Deny, 8),
            entry(Protocol::Udp, 0, 0, Action::Allow, 0),
        ],
    }
    .load(&env, &net);
    for (port, ok) in [(5354u16, true), (5353, false)] {
        let mut server = net.serve(&net.pod, &format!("{}:{port}", net.pod_ip), true, 1, 3000);
        let report = net.client(
            &net.peer,
            &format!("{}:{port}", net.pod_ip),
            &["--udp", "--timeout-ms", "800"],
        );
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!(report["ok"], ok, "UDP {port}: {report}");
    }
}

#[test]
fn replies_to_udp_flows_the_pod_started_pass_a_default_deny() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let _dp = Setup {
        strict: false,
        peer: Peer::Outside,
        policy: &[
            entry(Protocol::Tcp, 0, 0, Action::Deny, 0),
            entry(Protocol::Udp, 0, 0, Action::Deny, 0),
        ],
    }
    .load(&env, &net);
    // Unsolicited UDP to the pod is denied...
    let mut server = net.serve(&net.pod, &format!("{}:5400", net.pod_ip), true, 1, 3000);
    let report = net.client(
        &net.peer,
        &format!("{}:5400", net.pod_ip),
        &["--udp", "--timeout-ms", "800"],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(report["ok"], false, "{report}");
    // ...but the reply to a query the pod sent comes back.
    let mut server = net.serve(&net.peer, &format!("{}:5300", net.peer_ip), true, 1, 3000);
    let report = net.client(
        &net.pod,
        &format!("{}:5300", net.peer_ip),
        &["--udp", "--timeout-ms", "2000"],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        report["ok"], true,
        "the reply passed through the connection table: {report}"
    );
}
