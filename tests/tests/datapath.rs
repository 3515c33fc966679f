//! The eBPF datapath for real: programs loaded into this kernel, attached to a cgroup made for
//! the test, an unmodified client process inside it. Needs root (CI is root); without it the
//! tests fail with a clear message unless `SIGNET_SKIP_PRIVILEGED=1`.
//!
//! Every test works in its own cgroup and pin folder with a unique name, and a guard removes
//! both (and with them every link and map) even when the test fails. Traffic goes to loopback
//! only.

mod common;

use common::Env;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};

use std::process::Command;
use std::time::Duration;

use signet_agent::datapath::events::{EventReader, Verdict};
use signet_agent::datapath::loader::KernelDatapath;
use signet_agent::datapath::{Datapath, DatapathConfig, EndpointKey, IpcacheEntry};
use signet_bpf::maps::{ACTION_DENY, DIRECTION_EGRESS, EndpointValue, Reason};
use signet_policy::compile::{Action, Compiled, Entry, Key};
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;
use signet_test_support::privileged;

/// A stand-in for the node proxy's outbound listener: answers one connection with what the
/// datapath says the client originally asked for.
fn proxy_once(
    listener: TcpListener,
    dp: &KernelDatapath,
) -> (SocketAddr, Option<(SocketAddr, u32)>) {
    // Bounded, so a connection that never arrives fails the test instead of hanging it.
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut s, client) = loop {
        match listener.accept() {
            Ok(a) => break a,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no connection reached the proxy"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).expect("blocking");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let orig = dp.original_destination(client);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read hello");
    let reply = match orig {
        Some((dst, _)) => format!("proxied to {dst}\n"),
        None => "no original destination\n".to_owned(),
    };
    s.write_all(reply.as_bytes()).expect("reply");
    (client, orig)
}

/// A policy with one entry: endpoint 1 may not connect to `peer` on `port` (0: any), rule `rule`.
fn egress_deny(peer: u32, port: u16, rule: u32) -> Compiled {
    let mut c = Compiled::default();
    c.entries.insert(
        Key {
            endpoint: 1,
            direction: Direction::Egress,
            proto: Protocol::Tcp,
            peer,
            port,
        },
        Entry {
            action: Action::Deny,
            rule,
        },
    );
    c
}

/// Makes the network namespace with `cookie` endpoint 1 (identity 300), the only one.
fn endpoint_at(dp: &mut KernelDatapath, cookie: u64) {
    let endpoints = BTreeMap::from([(
        EndpointKey::Netns(cookie),
        EndpointValue {
            endpoint_id: 1,
            identity: 300,
            flags: 0,
            _pad: 0,
        },
    )]);
    dp.reconcile_endpoints(&endpoints).expect("endpoints");
}

fn setup(env: &Env, proxy_port: u16) -> KernelDatapath {
    let mut dp = KernelDatapath::load(&env.loader()).expect("load datapath");
    dp.set_config(&DatapathConfig {
        proxy_v4: "127.0.0.1".parse().expect("ip"),
        proxy_v6: None,
        proxy_port,
        strict: true,
        proxy_mark: 0x5167,
        event_sample: 0,
    })
    .expect("config");
    // The programs run only for the test's cgroup, so the test's own network namespace can stand
    // for a pod's there.
    let here = signet_agent::datapath::netns::current_cookie().expect("netns cookie");
    endpoint_at(&mut dp, here);
    dp.reconcile_ipcache(&[
        IpcacheEntry {
            ip: "127.0.0.2".parse().expect("ip"),
            prefix: 32,
            identity: 301,
            mesh: true,
            service: false,
        },
        IpcacheEntry {
            ip: "127.0.0.3".parse().expect("ip"),
            prefix: 32,
            identity: 302,
            mesh: true,
            service: false,
        },
    ])
    .expect("ipcache");
    dp
}

#[test]
fn a_captured_connect_reaches_the_proxy_which_finds_the_original_destination() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let dp = setup(&env, port);
    let proxy = std::thread::scope(|s| {
        let h = s.spawn(|| proxy_once(listener, &dp));
        let report = env.connect("127.0.0.2:9999");
        (h.join().expect("proxy thread"), report)
    });
    let ((client, orig), report) = proxy;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["peer"], "127.0.0.2:9999",
        "getpeername shows the original destination: {report}"
    );
    assert_eq!(report["local"], client.to_string());
    assert_eq!(orig, Some(("127.0.0.2:9999".parse().expect("addr"), 301)));
    assert_eq!(report["reply"], "proxied to 127.0.0.2:9999");
}

#[test]
fn an_egress_deny_fails_connect_with_eperm_and_emits_an_event() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut dp = setup(&env, 1);
    let compiled = egress_deny(302, 9999, 7);
    let changes = dp.reconcile_policy(&compiled).expect("policy");
    assert_eq!(changes.written, 1);
    dp.drain_events();
    let report = env.connect("127.0.0.3:9999");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["errno"], 1, "EPERM: {report}");
    let events = dp.drain_events();
    let e = events
        .iter()
        .find(|e| e.dst_port == 9999 && e.action == ACTION_DENY)
        .unwrap_or_else(|| panic!("no deny event in {events:?}"));
    assert_eq!(
        (e.src_identity, e.dst_identity, e.rule_id, e.direction),
        (300, 302, 7, DIRECTION_EGRESS)
    );
    // Reconciling the same set again writes nothing.
    assert_eq!(dp.reconcile_policy(&compiled).expect("policy").written, 0);
}

#[test]
fn a_restart_keeps_enforcing_and_never_attaches_twice() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut dp = setup(&env, 1);
    let compiled = egress_deny(302, 0, 9);
    dp.reconcile_policy(&compiled).expect("policy");
    let before = env.attached();
    assert_eq!(before.get("signet_connect4"), Some(&1), "{before:?}");
    drop(dp); // the agent stops

    let report = env.connect("127.0.0.3:80");
    assert_eq!(
        report["errno"], 1,
        "still enforced while the agent is down: {report}"
    );

    let mut again = KernelDatapath::load(&env.loader()).expect("reload");
    assert_eq!(env.attached(), before, "no second copy of any program");
    let entries = again.policy_entries().expect("entries");
    assert_eq!(entries.len(), 1, "the pinned policy survived");
    assert_eq!(
        again.reconcile_policy(&compiled).expect("policy").written,
        0,
        "reconciled by diff, nothing rewritten"
    );
    assert_eq!(env.connect("127.0.0.3:80")["errno"], 1);
}

#[test]
fn a_full_policy_map_is_refused_and_the_entries_in_force_stay() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut dp = setup(&env, 1);
    let small = egress_deny(302, 0, 1);
    dp.reconcile_policy(&small).expect("policy");
    let mut huge = Compiled::default();
    for peer in 0..2000u32 {
        huge.entries.insert(
            Key {
                endpoint: 1,
                direction: Direction::Ingress,
                proto: Protocol::Tcp,
                peer: 1000 + peer,
                port: 80,
            },
            Entry {
                action: Action::Allow,
                rule: 2,
            },
        );
    }
    let err = dp.reconcile_policy(&huge).expect_err("1024-entry map");
    assert!(
        err.to_string().contains("entries in force were kept"),
        "{err}"
    );
    assert_eq!(dp.policy_entries().expect("entries").len(), 1);
    assert_eq!(
        env.connect("127.0.0.3:80")["errno"],
        1,
        "the old policy still holds"
    );
}

#[test]
fn flow_events_reach_an_async_reader_and_drops_are_counted() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut dp = setup(&env, 1);
    let compiled = egress_deny(302, 0, 11);
    dp.reconcile_policy(&compiled).expect("policy");
    let mut reader = EventReader::open(&env.pin_dir, Duration::from_millis(20)).expect("reader");
    reader.drain();
    assert_eq!(env.connect("127.0.0.3:443")["errno"], 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let batch = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), reader.next_batch()).await })
        .expect("an event within 5 s");
    let flow = batch
        .iter()
        .find(|f| f.dst_port == 443)
        .unwrap_or_else(|| panic!("{batch:?}"));
    assert_eq!(flow.verdict, Verdict::Deny);
    assert_eq!(flow.reason, Reason::Policy);
    assert_eq!(
        (flow.rule_id, flow.src_identity, flow.dst_identity),
        (11, 300, 302)
    );
    assert_eq!(flow.direction, Direction::Egress);
    assert_eq!(
        flow.dst,
        "127.0.0.3".parse::<std::net::IpAddr>().expect("ip")
    );
    assert_eq!(dp.drop_counts().expect("drops").get("policy"), Some(&1));
}

#[test]
fn cleanup_detaches_everything_and_enforcement_stops() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let mut dp = setup(&env, 1);
    let compiled = egress_deny(302, 0, 1);
    dp.reconcile_policy(&compiled).expect("policy");
    assert_eq!(env.connect("127.0.0.3:7")["errno"], 1);
    drop(dp);
    signet_agent::datapath::loader::cleanup(&env.pin_dir).expect("cleanup");
    assert!(!env.pin_dir.exists());
    assert!(
        env.attached().is_empty(),
        "nothing attached: {:?}",
        env.attached()
    );
    let report = env.connect("127.0.0.3:7");
    assert_ne!(
        report["errno"], 1,
        "no longer enforced after cleanup: {report}"
    );
}

#[test]
fn ipv6_connects_are_captured_too() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let ns = signet_test_support::netns::NetNs::new();
    ns.add_addr("fd00:5167::1/128");
    ns.add_addr("fd00:5167::2/128");
    // The proxy listens inside the namespace; the client runs there, in the test cgroup.
    let listener = common::in_netns(&ns.name, || {
        TcpListener::bind("[fd00:5167::1]:0").expect("bind")
    });
    let port = listener.local_addr().expect("addr").port();
    let mut dp = setup(&env, port);
    dp.set_config(&DatapathConfig {
        proxy_v4: "127.0.0.1".parse().expect("ip"),
        proxy_v6: Some("fd00:5167::1".parse().expect("ip")),
        proxy_port: port,
        strict: true,
        proxy_mark: 0x5167,
        event_sample: 0,
    })
    .expect("config");
    endpoint_at(&mut dp, common::netns_cookie(&ns.name));
    dp.reconcile_ipcache(&[IpcacheEntry {
        ip: "fd00:5167::2".parse().expect("ip"),
        prefix: 128,
        identity: 303,
        mesh: true,
        service: false,
    }])
    .expect("ipcache");
    let ((_, orig), report) = std::thread::scope(|s| {
        let h = s.spawn(|| proxy_once(listener, &dp));
        let out = Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
            .arg("--cgroup")
            .arg(&env.cgroup)
            .args(["--netns", &ns.name, "--connect", "[fd00:5167::2]:9999"])
            .output()
            .expect("client");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (h.join().expect("proxy"), report)
    });
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["peer"], "[fd00:5167::2]:9999", "{report}");
    assert_eq!(
        orig,
        Some(("[fd00:5167::2]:9999".parse().expect("addr"), 303))
    );
}

#[test]
fn excluded_ports_are_not_captured() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut dp = setup(&env, proxy.local_addr().expect("addr").port());
    // A real listener on the mesh address itself answers "direct".
    let direct = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let port = direct.local_addr().expect("addr").port();
    dp.set_excluded_ports(&[port]).expect("excluded ports");
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            let (mut c, _) = direct.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&c).read_line(&mut line).expect("hello");
            c.write_all(b"direct\n").expect("reply");
        });
        env.connect(&format!("127.0.0.2:{port}"))
    });
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["reply"], "direct",
        "not redirected to the proxy: {report}"
    );
}

/// Cgroup directories made below the test's cgroup (the node's root), removed deepest first.
struct PodCgroups(Vec<std::path::PathBuf>);

impl PodCgroups {
    fn make(env: &Env, layouts: &[&str]) -> Self {
        let mut made = vec![];
        for layout in layouts {
            let mut dir = env.cgroup.to_path_buf();
            for part in layout.split('/') {
                dir.push(part);
                if !dir.exists() {
                    std::fs::create_dir(&dir)
                        .unwrap_or_else(|e| panic!("cgroup {}: {e}", dir.display()));
                    made.push(dir.clone());
                }
            }
        }
        Self(made)
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

const POD_UID: &str = "5167aaaa-0000-4000-8000-000000000001";

/// Where a pod's processes live: its own directory, a child and a grandchild of it, and both
/// kubelet layouts (systemd driver with a containerd scope, cgroupfs driver).
const LAYOUTS: [&str; 5] = [
    "pod",
    "pod/child",
    "pod/child/grandchild",
    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5167aaaa_0000_4000_8000_000000000001.slice/cri-containerd-0a1b2c.scope",
    "kubepods/burstable/pod5167aaaa-0000-4000-8000-000000000001/0a1b2c",
];

fn client_in(
    env: &Env,
    cgroup: &str,
    ns: &signet_test_support::netns::NetNs,
    target: &str,
) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
        .arg("--cgroup")
        .arg(env.cgroup.join(cgroup))
        .args([
            "--netns",
            &ns.name,
            "--connect",
            target,
            "--timeout-ms",
            "2000",
        ])
        .output()
        .expect("client");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_process_of_a_pod_is_captured_whatever_its_cgroup() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let _cgroups = PodCgroups::make(&env, &LAYOUTS);
    let ns = signet_test_support::netns::NetNs::new();
    let listener = common::in_netns(&ns.name, || TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = listener.local_addr().expect("addr").port();
    let mut dp = setup(&env, port);
    // The pod is its network namespace; the test's own namespace is now nobody's.
    endpoint_at(&mut dp, common::netns_cookie(&ns.name));

    dp.reconcile_policy(&egress_deny(302, 0, 7))
        .expect("policy");
    for layout in LAYOUTS {
        let report = client_in(&env, layout, &ns, "127.0.0.3:9999");
        assert_eq!(
            report["errno"], 1,
            "a process in {layout} is the pod: its egress deny is EPERM: {report}"
        );
    }
    // The node's own traffic (the agent's, the kubelet's) is never captured, even from inside
    // the node's cgroup subtree: the test's namespace is not an endpoint any more.
    let node = env.connect("127.0.0.3:9");
    assert_ne!(node["errno"], 1, "the node's connect is untouched: {node}");

    dp.reconcile_policy(&Compiled::default()).expect("policy");
    for layout in LAYOUTS {
        let listener = listener.try_clone().expect("listener");
        let ((_, orig), report) = std::thread::scope(|s| {
            let h = s.spawn(|| proxy_once(listener, &dp));
            let report = client_in(&env, layout, &ns, "127.0.0.2:9999");
            (h.join().expect("proxy"), report)
        });
        assert_eq!(
            report["reply"], "proxied to 127.0.0.2:9999",
            "{layout}: {report}"
        );
        assert_eq!(orig, Some(("127.0.0.2:9999".parse().expect("addr"), 301)));
    }
}

#[test]
fn the_agent_finds_a_pods_namespace_from_a_process_in_the_kubelets_layout() {
    if !privileged() {
        return;
    }
    let env = Env::new();
    let ns = signet_test_support::netns::NetNs::new();
    for layout in &LAYOUTS[3..] {
        // One kubelet layout at a time, as a node has.
        let _cgroups = PodCgroups::make(&env, &[layout]);
        // A container's process: in its scope cgroup, inside the pod's namespace.
        let scope = env.cgroup.join(layout);
        let mut holder = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" sleep 30"#)
            .args(["sh", &scope.display().to_string(), &ns.name])
            .spawn()
            .expect("holder");
        let found = (0..50).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let pod = signet_agent::datapath::discover::pod_cgroup(&env.cgroup, POD_UID)?;
            let path = signet_agent::datapath::discover::pod_netns(&env.cgroup.join(pod))?;
            let cookie = signet_agent::datapath::netns::cookies(std::slice::from_ref(&path))
                .remove(0)
                .ok()?;
            (cookie == common::netns_cookie(&ns.name)).then_some(path)
        });
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(
            found.is_some(),
            "{layout}: the pod's namespace is found from its container's process"
        );
    }
}
