//! The datapath under attack: each test crafts what an attacker would send (fragments, IPv6
//! extension headers, ICMP, plaintext to an L7 port, a re-created veth) from raw sockets in the
//! test's own namespaces, and asserts both that the attack fails (no SYN-ACK, no reply, the drop
//! counted under its reason) and that the legitimate flow beside it still works, observed the
//! same way. Needs root; see `common`.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use common::packets::{
    self, ACK, DSTOPTS, FRAGMENT, ICMP, ICMPV6, SYN, TCP, UDP, Watch, dst_opts, echo_request,
    frag6, ipv4, ipv6,
};
use common::tc::{PEER_IDENTITY, PROXY_MARK, Peer, Setup, egress, entry, pod_endpoint, tcp};
use common::{Env, NetEnv};
use signet_agent::datapath::Datapath;
use signet_agent::datapath::loader::KernelDatapath;
use signet_policy::compile::{Action, Compiled, Entry, Key};
use signet_policy::resource::Protocol;
use signet_test_support::{privileged, wait_for};

const WAIT: Duration = Duration::from_millis(1200);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn drops(dp: &KernelDatapath, reason: &str) -> u64 {
    dp.drop_counts()
        .expect("drop counters")
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// A SYN-ACK from `from` port `port` to our source port `sport`.
fn syn_ack(from: IpAddr, port: u16, sport: u16) -> impl Fn(&packets::Seen) -> bool {
    move |s| {
        s.proto == TCP
            && s.src == from
            && s.sport == port
            && s.dport == sport
            && s.tcp_flags & (SYN | ACK) == SYN | ACK
    }
}

/// TCP servers in the pod on `ports`, IPv4 and IPv6, killed on drop.
struct Servers(Vec<std::process::Child>);

impl Servers {
    fn start(net: &NetEnv, ports: &[u16], udp: bool) -> Self {
        let mut all = vec![];
        for &port in ports {
            for addr in [
                format!("{}:{port}", net.pod_ip),
                format!("[{}]:{port}", net.pod_ip6),
            ] {
                all.push(net.serve(&net.pod, &addr, udp, 1000, 30_000));
            }
        }
        Servers(all)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `packets` until `want` is seen, up to three times: the first packet of a path may wait on
/// neighbour discovery. For the legitimate flows; an attack is sent once, after them.
fn answered(
    watch: &Watch,
    ns: &str,
    dst: IpAddr,
    packets: &[Vec<u8>],
    want: impl Fn(&packets::Seen) -> bool,
) -> bool {
    (0..3).any(|_| {
        packets::send(ns, dst, packets);
        watch.saw(WAIT, &want)
    })
}

/// Ingress that admits only the peer, only on `port`, with `action`: the rest of `proto` is
/// default-denied.
fn only_peer_on(proto: Protocol, port: u16, action: Action) -> [(Key, Entry); 2] {
    [
        entry(proto, PEER_IDENTITY, port, action, 3),
        entry(proto, 0, 0, Action::Deny, 0),
    ]
}

/// The datapath for a peer outside the mesh, in permissive mode, with `policy`.
fn permissive(env: &Env, net: &NetEnv, policy: &[(Key, Entry)]) -> KernelDatapath {
    Setup {
        strict: false,
        peer: Peer::Outside,
        policy,
    }
    .load(env, net)
}

fn set_policy(dp: &mut KernelDatapath, policy: &[(Key, Entry)]) {
    let mut compiled = Compiled::default();
    compiled.entries.extend(policy.iter().copied());
    dp.reconcile_policy(&compiled).expect("policy");
}

#[test]
fn a_syn_split_into_tiny_ipv4_fragments_gets_no_syn_ack_while_a_whole_syn_does() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let dp = permissive(
        &env,
        &net,
        &only_peer_on(Protocol::Tcp, 8080, Action::Allow),
    );
    let _servers = Servers::start(&net, &[8080], false);
    let (peer, pod) = (ip(&net.peer_ip), ip(&net.pod_ip));
    let watch = Watch::open(&net.peer);

    let whole = packets::tcp(peer, pod, 40001, 8080, SYN);
    assert!(
        answered(
            &watch,
            &net.peer,
            pod,
            &[ipv4(peer, pod, TCP, 7001, 0, false, &whole)],
            syn_ack(pod, 8080, 40001)
        ),
        "a whole SYN to the allowed port is answered"
    );

    // RFC 1858's tiny fragment: 8 bytes of TCP header, then the other 12 (flags among them).
    let syn = packets::tcp(peer, pod, 40002, 8080, SYN);
    let before = drops(&dp, "unparseable");
    packets::send(
        &net.peer,
        pod,
        &[
            ipv4(peer, pod, TCP, 7002, 0, true, &syn[..8]),
            ipv4(peer, pod, TCP, 7002, 8, false, &syn[8..]),
        ],
    );
    assert!(
        !watch.saw(WAIT, syn_ack(pod, 8080, 40002)),
        "a SYN in tiny fragments must not open a connection"
    );
    assert!(
        drops(&dp, "unparseable") >= before + 2,
        "both fragments are dropped as unclassifiable: {:?}",
        dp.drop_counts()
    );
}

#[test]
fn udp_fragments_follow_their_first_fragments_verdict_and_orphans_are_dropped() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let dp = permissive(
        &env,
        &net,
        &only_peer_on(Protocol::Udp, 5353, Action::Allow),
    );
    let _servers = Servers::start(&net, &[5353, 5354], true);
    let (peer, pod) = (ip(&net.peer_ip), ip(&net.pod_ip));
    let watch = Watch::open(&net.peer);
    let reply = |sport: u16, port: u16| {
        move |s: &packets::Seen| {
            s.proto == UDP && s.src == pod && s.sport == port && s.dport == sport
        }
    };
    let fragmented = |sport: u16, port: u16, id: u16| {
        let d = packets::udp(peer, pod, sport, port, &[b'x'; 40]);
        [
            ipv4(peer, pod, UDP, id, 0, true, &d[..24]),
            ipv4(peer, pod, UDP, id, 24, false, &d[24..]),
        ]
    };

    assert!(
        answered(
            &watch,
            &net.peer,
            pod,
            &fragmented(41001, 5353, 7101),
            reply(41001, 5353)
        ),
        "a fragmented datagram to the allowed port is reassembled and answered"
    );
    packets::send(&net.peer, pod, &fragmented(41002, 5354, 7102));
    assert!(
        !watch.saw(WAIT, reply(41002, 5354)),
        "a fragmented datagram to a denied port is dropped whole"
    );
    // A later fragment with no first fragment: completes nothing, reaches nothing.
    let before = drops(&dp, "fragment-unmatched");
    let [_, orphan] = fragmented(41003, 5353, 7103);
    packets::send(&net.peer, pod, &[orphan]);
    wait_for("the orphan fragment counted as fragment-unmatched", || {
        (drops(&dp, "fragment-unmatched") > before).then_some(())
    });
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_tcp_header() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let dp = permissive(
        &env,
        &net,
        &only_peer_on(Protocol::Tcp, 8080, Action::Allow),
    );
    let _servers = Servers::start(&net, &[8080, 8081], false);
    let (peer, pod) = (ip(&net.peer_ip6), ip(&net.pod_ip6));
    let watch = Watch::open(&net.peer);
    let with_dst_opts = |sport: u16, port: u16, headers: usize| {
        let mut payload = vec![];
        for i in 0..headers {
            payload.extend(dst_opts(if i + 1 == headers { TCP } else { DSTOPTS }));
        }
        payload.extend(packets::tcp(peer, pod, sport, port, SYN));
        ipv6(peer, pod, DSTOPTS, &payload)
    };

    assert!(
        answered(
            &watch,
            &net.peer,
            pod,
            &[with_dst_opts(42001, 8080, 1)],
            syn_ack(pod, 8080, 42001)
        ),
        "a SYN behind a destination-options header reaches the allowed port"
    );
    packets::send(&net.peer, pod, &[with_dst_opts(42002, 8081, 1)]);
    assert!(
        !watch.saw(WAIT, syn_ack(pod, 8081, 42002)),
        "an extension header does not hide a denied port"
    );
    let before = drops(&dp, "unparseable");
    packets::send(&net.peer, pod, &[with_dst_opts(42003, 8080, 9)]);
    assert!(
        !watch.saw(WAIT, syn_ack(pod, 8080, 42003)),
        "a chain longer than the datapath walks is dropped"
    );
    assert!(drops(&dp, "unparseable") > before, "{:?}", dp.drop_counts());

    // The SYN in two IPv6 fragments: 8 bytes of TCP header, then the rest.
    let syn = packets::tcp(peer, pod, 42004, 8080, SYN);
    let mut first = frag6(TCP, 0, true, 0x5167_0001);
    first.extend(&syn[..8]);
    let mut second = frag6(TCP, 8, false, 0x5167_0001);
    second.extend(&syn[8..]);
    packets::send(
        &net.peer,
        pod,
        &[
            ipv6(peer, pod, FRAGMENT, &first),
            ipv6(peer, pod, FRAGMENT, &second),
        ],
    );
    assert!(
        !watch.saw(WAIT, syn_ack(pod, 8080, 42004)),
        "a SYN in tiny IPv6 fragments must not open a connection"
    );
}

#[test]
fn icmp_echo_follows_policy_and_the_pods_own_pings_come_back() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let deny_all = [
        entry(Protocol::Tcp, 0, 0, Action::Deny, 0),
        entry(Protocol::Udp, 0, 0, Action::Deny, 0),
        entry(Protocol::Other, 0, 0, Action::Deny, 0),
    ];
    let mut dp = permissive(&env, &net, &deny_all);
    let echo_reply = |from: IpAddr, id: u16| {
        move |s: &packets::Seen| {
            s.src == from
                && s.dport == id
                && ((s.proto == ICMP && s.icmp_type == 0)
                    || (s.proto == ICMPV6 && s.icmp_type == 129))
        }
    };
    for (pod, peer) in [
        (ip(&net.pod_ip), ip(&net.peer_ip)),
        (ip(&net.pod_ip6), ip(&net.peer_ip6)),
    ] {
        let packet = |src, dst, id| {
            let m = echo_request(src, dst, id);
            if src.is_ipv6() {
                ipv6(src, dst, ICMPV6, &m)
            } else {
                ipv4(src, dst, ICMP, id, 0, false, &m)
            }
        };
        let at_peer = Watch::open(&net.peer);
        let before = drops(&dp, "default-deny");
        packets::send(&net.peer, pod, &[packet(peer, pod, 0x0a01)]);
        assert!(
            !at_peer.saw(WAIT, echo_reply(pod, 0x0a01)),
            "{pod}: a ping into a default-deny pod is not answered"
        );
        assert!(
            drops(&dp, "default-deny") > before,
            "{:?}",
            dp.drop_counts()
        );

        let at_pod = Watch::open(&net.pod);
        assert!(
            answered(
                &at_pod,
                &net.pod,
                peer,
                &[packet(pod, peer, 0x0a02)],
                echo_reply(peer, 0x0a02)
            ),
            "{pod}: the pod's own ping gets its reply through the default deny"
        );

        // A rule without ports admits every protocol, echo included.
        let mut allowed = deny_all.to_vec();
        allowed.push(entry(Protocol::Other, PEER_IDENTITY, 0, Action::Allow, 4));
        set_policy(&mut dp, &allowed);
        assert!(
            answered(
                &at_peer,
                &net.peer,
                pod,
                &[packet(peer, pod, 0x0a03)],
                echo_reply(pod, 0x0a03)
            ),
            "{pod}: an L3 rule for the peer lets its ping in"
        );
        set_policy(&mut dp, &deny_all);
    }
}

#[test]
fn an_l7_port_is_reachable_only_through_the_proxy() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let dp = Setup {
        strict: false,
        peer: Peer::Mesh,
        policy: &only_peer_on(Protocol::Tcp, 8080, Action::L7),
    }
    .load(&env, &net);
    let plain = tcp(&net, &net.peer, 8080, &[]);
    assert_eq!(
        plain["ok"], false,
        "plaintext to a port whose requests must be checked bypasses the checks: {plain}"
    );
    assert!(drops(&dp, "l7-bypass") > 0, "{:?}", dp.drop_counts());
    let mark = PROXY_MARK.to_string();
    let proxied = tcp(&net, &net.node, 8080, &["--mark", &mark]);
    assert_eq!(proxied["ok"], true, "the proxy carries it: {proxied}");
}

#[test]
fn a_veth_recreated_under_the_same_name_is_enforced_again_and_detaching_unpins() {
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
    let mark = PROXY_MARK.to_string();
    assert_eq!(
        tcp(&net, &net.peer, 8080, &[])["ok"],
        false,
        "strict drops plaintext"
    );

    net.recreate_pod_veth();
    let ifindex = net.pod_host_ifindex();
    net.in_node(|| {
        dp.attach_endpoint_interface(&net.pod_host_if)
            .expect("attach to the new veth");
        pod_endpoint(&mut dp, ifindex, common::netns_cookie(&net.pod));
    });
    let again = tcp(&net, &net.peer, 8080, &[]);
    assert_eq!(
        again["ok"], false,
        "the new veth of the same name is enforced: {again}"
    );
    let proxied = tcp(&net, &net.node, 8080, &["--mark", &mark]);
    assert_eq!(
        proxied["ok"], true,
        "the proxy still reaches the pod: {proxied}"
    );

    // The endpoint goes away: its pins go with it, and the programs leave the interface.
    net.in_node(|| {
        dp.detach_endpoint_interfaces_except(&Default::default())
            .expect("detach");
    });
    let pins: Vec<String> = std::fs::read_dir(env.pin_dir.join("links"))
        .expect("links")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tc-"))
        .collect();
    assert!(pins.is_empty(), "tc pins left: {pins:?}");
    let attached = net.in_node(|| {
        [TcAttachType::Egress, TcAttachType::Ingress].map(|at| {
            SchedClassifier::query_tcx(&net.pod_host_if, at)
                .map(|(_, progs)| progs.len())
                .expect("query tcx")
        })
    });
    assert_eq!(
        attached,
        [0, 0],
        "programs left on the veth (egress, ingress)"
    );
}

/// A client in the pod's namespace outside every hooked cgroup (`ip netns exec` from the test's
/// own cgroup): connect() is not seen by the socket programs, only by tc.
fn unhooked_client(net: &NetEnv, target: &str, extra: &[&str]) -> serde_json::Value {
    net.client(&net.pod, target, extra)
}

#[test]
fn egress_default_deny_refuses_tcp_to_the_world_and_a_world_rule_admits_it() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let deny = [egress(Protocol::Tcp, 0, 0, Action::Deny, 0)];
    let mut dp = Setup {
        strict: false,
        peer: Peer::World,
        policy: &deny,
    }
    .load(&env, &net);
    let target = format!("{}:8080", net.peer_ip);
    let mut server = net.serve(&net.peer, &target, false, 10, 20_000);
    let quick = ["--timeout-ms", "800"];

    let refused = net.pod_client(&env.cgroup, &target, &quick);
    assert_eq!(
        refused["errno"], 1,
        "connect() to the world is EPERM: {refused}"
    );
    assert!(drops(&dp, "default-deny") > 0, "{:?}", dp.drop_counts());
    let unhooked = unhooked_client(&net, &target, &quick);
    assert_eq!(
        unhooked["ok"], false,
        "a process of the pod the socket programs do not see is stopped by tc: {unhooked}"
    );

    let world = signet_policy::identity::WORLD;
    set_policy(
        &mut dp,
        &[
            egress(Protocol::Tcp, world, 8080, Action::Allow, 5),
            egress(Protocol::Tcp, 0, 0, Action::Deny, 0),
        ],
    );
    let allowed = net.pod_client(&env.cgroup, &target, &quick);
    assert_eq!(allowed["ok"], true, "a world rule admits it: {allowed}");
    assert_eq!(unhooked_client(&net, &target, &quick)["ok"], true);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_raw_syn_from_the_pod_is_checked_like_a_connect() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let deny = [egress(Protocol::Tcp, 0, 0, Action::Deny, 0)];
    let mut dp = Setup {
        strict: false,
        peer: Peer::World,
        policy: &deny,
    }
    .load(&env, &net);
    let (pod, peer) = (ip(&net.pod_ip), ip(&net.peer_ip));
    let mut server = net.serve(&net.peer, &format!("{peer}:8080"), false, 10, 20_000);
    let watch = Watch::open(&net.pod);
    let syn = |sport| {
        ipv4(
            pod,
            peer,
            TCP,
            sport,
            0,
            false,
            &packets::tcp(pod, peer, sport, 8080, SYN),
        )
    };

    packets::send(&net.pod, peer, &[syn(43001)]);
    assert!(
        !watch.saw(WAIT, syn_ack(peer, 8080, 43001)),
        "a crafted SYN does not get around the egress deny"
    );
    set_policy(
        &mut dp,
        &[egress(
            Protocol::Tcp,
            signet_policy::identity::WORLD,
            8080,
            Action::Allow,
            5,
        )],
    );
    assert!(
        answered(
            &watch,
            &net.pod,
            peer,
            &[syn(43002)],
            syn_ack(peer, 8080, 43002)
        ),
        "allowed, the same SYN is answered"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn udp_and_icmp_from_a_default_deny_pod_are_dropped_but_answers_to_admitted_flows_pass() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let deny_all = [
        egress(Protocol::Tcp, 0, 0, Action::Deny, 0),
        egress(Protocol::Udp, 0, 0, Action::Deny, 0),
        egress(Protocol::Other, 0, 0, Action::Deny, 0),
    ];
    let mut dp = permissive(&env, &net, &deny_all);
    let udp_query = |from_ns: &str, to: &str| {
        let mut server = net.serve(
            if from_ns == net.pod {
                &net.peer
            } else {
                &net.pod
            },
            to,
            true,
            1,
            3000,
        );
        let report = net.client(from_ns, to, &["--udp", "--timeout-ms", "800"]);
        let _ = server.kill();
        let _ = server.wait();
        report
    };
    let to_peer = format!("{}:5353", net.peer_ip);
    let before = drops(&dp, "default-deny");
    assert_eq!(
        udp_query(&net.pod, &to_peer)["ok"],
        false,
        "a datagram from a default-deny pod is dropped"
    );
    assert!(
        drops(&dp, "default-deny") > before,
        "{:?}",
        dp.drop_counts()
    );
    let to_pod = format!("{}:5300", net.pod_ip);
    assert_eq!(
        udp_query(&net.peer, &to_pod)["ok"],
        true,
        "the pod still answers a query ingress admits"
    );

    let (pod, peer) = (ip(&net.pod_ip), ip(&net.peer_ip));
    let echo = |src, dst, id| ipv4(src, dst, ICMP, id, 0, false, &echo_request(src, dst, id));
    let echo_reply = |from: IpAddr, id: u16| {
        move |s: &packets::Seen| {
            s.src == from && s.proto == ICMP && s.icmp_type == 0 && s.dport == id
        }
    };
    let at_pod = Watch::open(&net.pod);
    packets::send(&net.pod, peer, &[echo(pod, peer, 0x0b01)]);
    assert!(
        !at_pod.saw(WAIT, echo_reply(peer, 0x0b01)),
        "the pod's ping does not get out"
    );
    let at_peer = Watch::open(&net.peer);
    assert!(
        answered(
            &at_peer,
            &net.peer,
            pod,
            &[echo(peer, pod, 0x0b02)],
            echo_reply(pod, 0x0b02)
        ),
        "the pod answers a ping ingress admits"
    );

    let mut dns = deny_all.to_vec();
    dns.push(egress(Protocol::Udp, PEER_IDENTITY, 5353, Action::Allow, 6));
    set_policy(&mut dp, &dns);
    assert_eq!(
        udp_query(&net.pod, &to_peer)["ok"],
        true,
        "a rule for the resolver lets queries out"
    );
}

#[test]
fn udp_from_a_hooked_process_is_refused_with_eperm_and_its_answers_pass() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let mut dp = permissive(&env, &net, &[egress(Protocol::Udp, 0, 0, Action::Deny, 0)]);
    let to_peer = format!("{}:5353", net.peer_ip);
    let mut server = net.serve(&net.peer, &to_peer, true, 10, 10_000);
    let query = || net.pod_client(&env.cgroup, &to_peer, &["--udp", "--timeout-ms", "800"]);
    let refused = query();
    assert_eq!(
        refused["errno"], 1,
        "sendmsg() from a default-deny pod is EPERM: {refused}"
    );

    // The pod serving a query ingress admits answers it, from the same default deny.
    let to_pod = format!("{}:5300", net.pod_ip);
    let mut pod_server = net.serve_in_pod(&env.cgroup, &to_pod, true, 1);
    let answered = net.client(&net.peer, &to_pod, &["--udp", "--timeout-ms", "2000"]);
    let _ = pod_server.kill();
    let _ = pod_server.wait();
    assert_eq!(
        answered["ok"], true,
        "its answer is not a new flow: {answered}"
    );

    set_policy(
        &mut dp,
        &[
            egress(Protocol::Udp, PEER_IDENTITY, 5353, Action::Allow, 6),
            egress(Protocol::Udp, 0, 0, Action::Deny, 0),
        ],
    );
    assert_eq!(query()["ok"], true, "a rule for the resolver lets it query");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn an_icmp_error_about_no_known_flow_does_not_leave_a_default_deny_pod() {
    if !privileged() {
        return;
    }
    let (env, net) = (Env::new(), NetEnv::new());
    let dp = permissive(
        &env,
        &net,
        &[
            egress(Protocol::Udp, 0, 0, Action::Deny, 0),
            egress(Protocol::Other, 0, 0, Action::Deny, 0),
        ],
    );
    let (pod, peer) = (ip(&net.pod_ip), ip(&net.peer_ip));
    let at_peer = Watch::open(&net.peer);
    let unreachable_from_pod =
        |s: &packets::Seen| s.src == pod && s.proto == ICMP && s.icmp_type == 3;

    // A raw socket in the pod forges an error about a datagram the pod never received: its
    // payload would be a channel out of the egress lockdown.
    let forged_inner = ipv4(
        peer,
        pod,
        UDP,
        7301,
        0,
        false,
        &packets::udp(peer, pod, 7777, 8888, b"x"),
    );
    let forged = ipv4(
        pod,
        peer,
        ICMP,
        7302,
        0,
        false,
        &packets::port_unreachable(&forged_inner),
    );
    let before = drops(&dp, "default-deny");
    packets::send(&net.pod, peer, &[forged]);
    assert!(
        !at_peer.saw(WAIT, unreachable_from_pod),
        "a forged ICMP error must not get out"
    );
    assert!(
        drops(&dp, "default-deny") > before,
        "{:?}",
        dp.drop_counts()
    );

    // The pod's own kernel answering a datagram to a closed port (ingress admits it) does.
    let probe = ipv4(
        peer,
        pod,
        UDP,
        7303,
        0,
        false,
        &packets::udp(peer, pod, 7778, 5999, b"y"),
    );
    assert!(
        answered(&at_peer, &net.peer, pod, &[probe], unreachable_from_pod),
        "the pod's port-unreachable about an admitted datagram reaches its sender"
    );
}
