//! Two nodes, two agents, the CA, and two pods in network namespaces and cgroups: an unmodified
//! client on node A reaches a server on node B (directly and through a Service) over HBONE/mTLS,
//! and identity policy decides at L4 and L7. Also: policy changes close connections, an agent
//! restart keeps enforcement, certificates rotate under traffic. Needs root; see `common`.

mod common;

use std::time::{Duration, Instant};

use common::topology::{Topology, serial, start};
use signet_ca::SpiffeId;
use signet_ca::client::CaClient;
use signet_test_support::netns::in_netns;
use signet_test_support::{Steps, privileged, promtool_accepts, wait_for};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn an_unmodified_client_reaches_a_pod_on_another_node_over_mtls_and_policy_decides() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state("");
    let _running = start(&t, "", "");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));

    let report = t.client(&target);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["peer"], target,
        "the application sees the address it asked for: {report}"
    );
    // The server saw the connection come from node B's proxy, not from the client pod: the
    // bytes travelled through the HBONE tunnel.
    let via = report["reply"].as_str().expect("reply").to_owned();
    assert!(via.starts_with(&format!("hi 10.79.{}.1:", t.n)), "{report}");

    step.to("The Service's ClusterIP reaches the same pod, through the tunnel too");
    // The Service's ClusterIP reaches the same pod, through the tunnel too.
    let vip = format!("{}:80", t.cluster_ip());
    let report = t.client(&vip);
    assert_eq!(report["ok"], true, "ClusterIP: {report}");
    assert_eq!(report["peer"], vip, "{report}");
    assert!(
        report["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("hi 10.79.{}.1:", t.n))),
        "{report}"
    );

    step.to("Both agents count it, by identity, on their admin ports");
    // Both agents count it, by identity, on their admin ports; both are ready.
    let (status, body) = t.admin_get('a', "/metrics");
    assert_eq!(status, 200);
    let opened = format!(
        "signet_connections_opened_total{{reporter=\"outbound\",source=\"{CLIENT}\",destination=\"{SERVER}\"}}"
    );
    assert_eq!(sample(&body, &opened), Some(2.0), "{body}");
    assert!(
        sample(&body, "signet_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/shop/sa/client\"}")
            .is_some_and(|t| t > 1.7e9),
        "{body}"
    );
    let (_, body) = t.admin_get('b', "/metrics");
    let inbound = format!(
        "signet_connections_opened_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\"}}"
    );
    assert_eq!(sample(&body, &inbound), Some(2.0), "{body}");
    promtool_accepts(&body);
    assert_eq!(t.admin_get('b', "/healthz/ready").0, 200);
    // What node B has in force, as /debug/state says: the first snapshot, the server's
    // certificate, nothing refused.
    let debug = |node| -> serde_json::Value {
        serde_json::from_str(&t.admin_get(node, "/debug/state").1).expect("json")
    };
    let state = debug('b');
    assert_eq!(state["node"], "node-b", "{state}");
    assert_eq!(state["generation"], 0, "{state}");
    assert!(state["refused"].is_null(), "{state}");
    let server = state["identities"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["identity"] == SERVER))
        .unwrap_or_else(|| panic!("no {SERVER} in {state}"));
    assert_eq!(server["state"], "available", "{state}");
    assert!(
        server["notAfter"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000),
        "{state}"
    );

    step.to("A state change that does not load is refused by name, and the...");
    // A state change that does not load is refused by name, and the snapshot in force stays.
    t.write_state("apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: broken, namespace: shop}\nspec: {selector: 7}\n");
    t.settle();
    let state = debug('b');
    assert_eq!(state["generation"], 0, "nothing applied: {state}");
    assert!(
        state["refused"]
            .as_str()
            .is_some_and(|r| r.contains("policy.yaml")),
        "the refusal names the file: {state}"
    );
    assert_eq!(
        t.client(&target)["ok"],
        true,
        "the state in force still serves"
    );

    step.to("A policy that lets only another identity in");
    // A policy that lets only another identity in: node B's proxy refuses the stream, and
    // counts the deny.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: only-admin, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: spiffe://cluster.local/ns/shop/sa/admin}]\n",
    );
    t.settle();
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "denied at node B: {report}"
    );
    let (_, body) = t.admin_get('b', "/metrics");
    let denied = format!(
        "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\",verdict=\"deny\"}}"
    );
    assert_eq!(sample(&body, &denied), Some(1.0), "{body}");

    step.to("An egress policy on the client");
    // An egress policy on the client: connect() fails at once with EPERM.
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: no-egress, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: client}}\n  egress: []\n",
    );
    t.settle();
    let report = t.client(&target);
    assert_eq!(report["errno"], 1, "EPERM from connect(): {report}");

    step.to("Plaintext straight from the client pod's namespace, bypassing the...");
    // Plaintext straight from the client pod's namespace, bypassing the proxy (no cgroup), is
    // dropped at node B in strict mode.
    t.write_state("");
    t.settle();
    let report = t.bypassing_client(&target);
    assert_eq!(
        report["ok"], false,
        "plaintext bypassing the proxy is dropped: {report}"
    );
    // Both refusals reach the agents from the kernel's ring buffer: the egress denial on node A
    // and the strict-mode drop on node B, named by identity.
    let kernel = |node: char, labels: &str| {
        let name = format!("signet_datapath_flows_total{{{labels}}}");
        wait_for(&name.clone(), || {
            let (_, body) = t.admin_get(node, "/metrics");
            sample(&body, &name).filter(|n| *n >= 1.0)
        })
    };
    kernel(
        'a',
        &format!(
            "direction=\"egress\",verdict=\"deny\",reason=\"default-deny\",source=\"{CLIENT}\",destination=\"{SERVER}\""
        ),
    );
    kernel(
        'b',
        &format!(
            "direction=\"ingress\",verdict=\"deny\",reason=\"strict-mtls-plaintext\",source=\"{CLIENT}\",destination=\"{SERVER}\""
        ),
    );

    step.to("Node A's agent cannot obtain the server's identity");
    // Node A's agent cannot obtain the server's identity: that pod runs on node B.
    let root_pem = std::fs::read_to_string(t.dir.path().join("root.pem")).expect("root");
    let refused = in_netns(&t.ns("node-a"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut ca = CaClient::connect(
                &format!("{}:15012", t.node_ip('a')),
                "localhost",
                &root_pem,
                "token-a",
            )
            .await
            .expect("CA reachable");
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .expect("csr");
            let server = SpiffeId::parse(SERVER).expect("id");
            ca.create_certificate(&csr, Duration::from_secs(3600), Some(&server))
                .await
                .expect_err("node A may not have the server's identity")
        })
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
}

#[test]
fn l7_rules_answer_403_and_a_policy_change_closes_connections_it_no_longer_allows() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    // GET under /v1/ on 8080 is allowed to the client; 9090 is plain TCP.
    let l7 = "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 8080}]\n\
         \x20   http: [{methods: [GET], paths: [{prefix: /v1/}]}]\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 9090}]\n";
    t.write_state(l7);
    let running = start(&t, "", "");
    let _http = t.server_with(8080, &["--http"]);
    let _held = t.server_with(9090, &["--hold"]);
    let web = format!("{}:8080", t.pod_ip('b'));

    let ok = t.client_with(&web, &["--request", "GET /v1/items"]);
    assert_eq!(ok["status"], 200, "{ok}");
    assert!(
        ok["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("hi GET /v1/items HTTP/1.1")),
        "{ok}"
    );
    let post = t.client_with(&web, &["--request", "POST /v1/items"]);
    assert_eq!(post["status"], 403, "{post}");
    assert!(
        post["body"]
            .as_str()
            .is_some_and(|b| b.contains("access denied")),
        "{post}"
    );
    let other = t.client_with(&web, &["--request", "GET /admin"]);
    assert_eq!(other["status"], 403, "{other}");
    let denials = running.agent('b').metrics.render(&Default::default());
    let l7_denied = format!(
        "signet_policy_verdicts_total{{reporter=\"inbound\",source=\"{CLIENT}\",destination=\"{SERVER}\",verdict=\"l7_deny\"}}"
    );
    assert_eq!(sample(&denials, &l7_denied), Some(2.0), "{denials}");

    step.to("A connection held open on 9090 while the policy stops allowing it...");
    // A connection held open on 9090 while the policy stops allowing it is closed.
    let mut holder = t
        .client_command(&format!("{}:9090", t.pod_ip('b')), &["--hold-ms", "20000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client");
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stderr.take().expect("stderr")),
        &mut line,
    );
    assert_eq!(line.trim(), "holding", "the connection opened");
    let changed = Instant::now();
    let only_web = l7.split("\x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 9090}]\n").next().expect("policy");
    t.write_state(only_web);
    let out = holder.wait_with_output().expect("client");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        matches!(report["held"]["ended"].as_str(), Some("reset" | "eof")),
        "closed by the proxy, not by the timeout: {report}"
    );
    assert!(
        changed.elapsed() < Duration::from_secs(10),
        "closed soon after the change: {report}"
    );
    let text = running.agent('b').metrics.render(&Default::default());
    assert!(
        sample(&text, "signet_connections_closed_by_policy_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // The still-allowed HTTP port keeps working.
    let ok = t.client_with(&web, &["--request", "GET /v1/items"]);
    assert_eq!(ok["status"], 200, "{ok}");
}

#[test]
fn enforcement_outlives_an_agent_restart_and_new_connections_work_afterwards() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let mut running = start(&t, "", "");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    assert_eq!(t.client(&target)["ok"], true);

    // Node B's agent is gone: the tunnel has nowhere to land, and the datapath it left pinned
    // still drops plaintext that bypasses the proxy.
    running.stop_agent('b');
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "no plaintext fallback while node B's agent is down: {report}"
    );
    assert_eq!(t.bypassing_client(&target)["ok"], false);
    running.start_agent(&t, 'b');
    let report = t.client(&target);
    assert_eq!(report["ok"], true, "after node B's restart: {report}");

    // Node A's agent is gone: captured connections fail closed (nothing listens where they
    // are redirected) instead of leaving in plaintext.
    running.stop_agent('a');
    let report = t.client(&target);
    assert_eq!(
        report["ok"], false,
        "fails closed without node A's proxy: {report}"
    );
    assert_eq!(t.bypassing_client(&target)["ok"], false);
    running.start_agent(&t, 'a');
    let report = t.client(&target);
    assert_eq!(report["ok"], true, "after node A's restart: {report}");
}

#[test]
fn certificates_rotate_under_continuous_traffic_with_a_30_second_ttl() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let running = start(&t, "svid: {minTtlSeconds: 10}\n", "svidTtlSeconds: 30\n");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    let client_id = SpiffeId::parse(CLIENT).expect("id");
    let server_id = SpiffeId::parse(SERVER).expect("id");
    let serial_of = |node: char, id: &SpiffeId| {
        running
            .agent(node)
            .certs
            .get(id)
            .map(|c| c.serial.clone())
            .expect("certificate")
    };
    let first = (serial_of('a', &client_id), serial_of('b', &server_id));
    // Past the first renewal (about 15 s) and past the first certificates' expiry (30 s).
    let until = Instant::now() + Duration::from_secs(40);
    let (mut ok, mut failed) = (0, vec![]);
    while Instant::now() < until {
        let report = t.client(&target);
        if report["ok"] == true && report["reply"] != "" {
            ok += 1;
        } else {
            failed.push(report);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = (serial_of('a', &client_id), serial_of('b', &server_id));
    assert!(
        last.0 != first.0 && last.1 != first.1,
        "both sides rotated: {first:?} → {last:?}"
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 100, "continuous traffic: {ok} requests");
}

#[test]
fn egress_policy_governs_every_destination_kind() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.add_world_address("203.0.113.7");
    t.add_world_address("203.0.113.200");
    // The client may reach the server over the mesh and 203.0.113.0/24 but its upper half on
    // port 9000; nothing else: not the world, not either node (the Gateway and the proxy listen
    // there), not UDP.
    t.write_state(&format!(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: client-egress, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: client}}}}\n  egress:\n\
         \x20 - to: [{{identity: {SERVER}}}]\n    ports: [{{port: 8080}}]\n\
         \x20 - to: [{{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]\n    ports: [{{port: 9000}}]\n"
    ));
    let _running = start(&t, "", "");
    let _server = t.server(8080);
    let mut world = [
        t.node_b_server("203.0.113.7:9000", false),
        t.node_b_server("203.0.113.200:9000", false),
        t.node_b_server("203.0.113.7:9001", true),
    ];

    let mesh = t.client(&format!("{}:8080", t.pod_ip('b')));
    assert_eq!(mesh["ok"], true, "the mesh rule still tunnels: {mesh}");
    let allowed = t.client("203.0.113.7:9000");
    assert_eq!(allowed["ok"], true, "inside the CIDR: {allowed}");
    assert!(
        allowed["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("hi {}:", t.pod_ip('a')))),
        "a world destination is reached directly, not through the proxy: {allowed}"
    );
    for refused in [
        "203.0.113.200:9000".to_owned(),
        format!("{}:15008", t.node_ip('b')),
        format!("{}:15001", t.node_ip('a')),
        format!("{}:8443", t.node_ip('a')),
    ] {
        let r = t.client(&refused);
        assert_eq!(r["errno"], 1, "{refused} is refused at connect(): {r}");
    }
    let udp = t.client_with("203.0.113.7:9001", &["--udp"]);
    assert_eq!(udp["ok"], false, "UDP has no rule: {udp}");
    for s in &mut world {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn a_process_in_a_child_cgroup_of_the_pod_is_tunnelled() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let _running = start(&t, "", "");
    let _server = t.server(8080);
    // A container's cgroup below the pod's, as the kubelet makes them; removed before the
    // topology removes the pod's.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let child = Dir(t
        .cgroup_root('a')
        .join("pod")
        .join("cri-containerd-0a1b.scope"));
    std::fs::create_dir(&child.0).expect("child cgroup");
    let target = format!("{}:8080", t.pod_ip('b'));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_signet-test-client"))
        .arg("--cgroup")
        .arg(&child.0)
        .args([
            "--netns",
            &t.ns("pod-a"),
            "--connect",
            &target,
            "--timeout-ms",
            "3000",
        ])
        .output()
        .expect("client");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["ok"], true, "{report}");
    assert!(
        report["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("hi 10.79.{}.1:", t.n))),
        "it arrived through node B's proxy, over HBONE: {report}"
    );
}

#[test]
fn a_header_rule_holds_against_a_second_value_an_opaque_one_and_an_underscore_spelling() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 8080}]\n\
         \x20   http: [{methods: [GET], headers: [{name: x-tenant, value: acme}]}]\n",
    );
    let _running = start(&t, "", "");
    let _http = t.server_with(8080, &["--http"]);
    let web = format!("{}:8080", t.pod_ip('b'));
    let get = |headers: &[&str]| {
        let mut args = vec!["--request", "GET /v1/items"];
        for h in headers {
            args.extend(["--header", h]);
        }
        t.client_with(&web, &args)["status"].clone()
    };
    assert_eq!(get(&["X-Tenant: acme"]), 200, "the tenant's request passes");
    assert_eq!(get(&[]), 403, "the header is required");
    for attack in [
        &["x-tenant: acme", "x-tenant: evil"][..],
        &["x-tenant: evil", "x-tenant: acme"],
        &["x-tenant: acme", "x_tenant: evil"],
        &["x-tenant: acme", "x-tenant: \\xffevil"],
    ] {
        assert_eq!(get(attack), 403, "{attack:?} must not pass the header rule");
    }
}

#[test]
fn an_address_two_pods_claim_belongs_to_neither_until_one_is_gone() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    t.write_state("");
    let _running = start(&t, "", "");
    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    assert_eq!(t.client(&target)["ok"], true, "before the claim");

    // A second live pod (another tenant's, on node B) claims the server's address: neither the
    // proxy nor the kernel takes it for either pod, and node A refuses the connection rather
    // than send it anywhere in plaintext.
    let impostor = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: impostor-0, namespace: evil, labels: {{app: server}}}}\n\
         spec: {{nodeName: node-b, serviceAccountName: evil, containers: [{{name: c, image: c}}]}}\n\
         status: {{podIP: {}}}\n",
        t.pod_ip('b')
    );
    t.write_state(&impostor);
    t.settle();
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "an address with two owners is refused: {report}"
    );
    let (_, body) = t.admin_get('a', "/metrics");
    assert_eq!(
        sample(&body, "signet_refused_addresses"),
        Some(1.0),
        "{body}"
    );
    let refused = format!(
        "signet_connections_failed_total{{reporter=\"outbound\",source=\"{CLIENT}\",destination=\"unknown\",reason=\"address_conflict\"}}"
    );
    assert_eq!(sample(&body, &refused), Some(1.0), "{body}");
    let (_, body) = t.admin_get('b', "/metrics");
    assert_eq!(
        sample(&body, "signet_refused_addresses"),
        Some(1.0),
        "{body}"
    );
    // Plaintext from outside the proxy does not get through either.
    assert_eq!(t.bypassing_client(&target)["ok"], false);

    // Once the claim is gone the address is the server's again.
    t.write_state("");
    t.settle();
    assert_eq!(
        t.client(&target)["ok"],
        true,
        "after the claim is withdrawn"
    );
    let (_, body) = t.admin_get('a', "/metrics");
    assert_eq!(
        sample(&body, "signet_refused_addresses"),
        Some(0.0),
        "{body}"
    );
}

/// `signet status` over the two nodes: every agent OK on a healthy mesh; the policy map's fill
/// follows a large policy; an agent that is down is an error naming the node, and `--wait`
/// returns once it is back.
#[test]
fn signet_status_reports_each_agent_the_map_fill_and_an_agent_that_is_down() {
    use signet_agent::admin::status::Level;
    use signet_agent::cli::status::{check, render, wait};
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state("");
    let mut running = start(&t, "", "");
    let topology = t.write_topology_json();

    step.to("A healthy mesh is OK on every node");
    let report = wait(&topology, Duration::from_secs(30), |_| {}).expect("report");
    let screen = render(&report, std::time::SystemTime::now());
    assert_eq!(report.level, Level::Ok, "{screen}");
    assert!(
        screen.contains("Agents: 2/2 OK, 0 degraded, 0 error"),
        "{screen}"
    );
    let ca = report.ca.as_ref().expect("the topology names the CA");
    let roots = &ca.status.as_ref().expect("the CA answered").roots;
    assert_eq!(roots.roots.len(), 1, "{screen}");
    assert_eq!(roots.roots[0].state, "signing");
    assert!(
        roots.next_rotation.is_some(),
        "a CA that rotates itself plans the next one"
    );
    assert!(
        screen.contains("CA: OK") && screen.contains("1 signing (expires in "),
        "{screen}"
    );
    let policy_fill = |report: &signet_agent::cli::status::Report, node: &str| {
        let a = report.agents.iter().find(|a| a.node == node).expect("node");
        let s = a.status.as_ref().expect("answered");
        let m = s
            .datapath
            .maps
            .iter()
            .find(|m| m.name == "signet_policy")
            .expect("policy map");
        (
            m.entries,
            m.capacity,
            s.policies.in_force,
            s.datapath.programs.len(),
        )
    };
    let (before, capacity, in_force, programs) = policy_fill(&report, "node-b");
    assert_eq!(in_force, 0);
    assert!(programs >= 7, "the cgroup hooks are attached: {programs}");
    assert!(capacity > 0);

    step.to("A large policy shows in node B's policy map fill");
    let ports: Vec<String> = (10_000..10_400).map(|p| format!("{{port: {p}}}")).collect();
    t.write_state(&format!(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: many-ports, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{identity: {CLIENT}}}]\n    ports: [{}]\n",
        ports.join(", ")
    ));
    t.settle();
    let report = check(&topology).expect("report");
    let (after, _, in_force, _) = policy_fill(&report, "node-b");
    assert_eq!(in_force, 1);
    assert!(
        after >= before + 400,
        "400 ports for one peer are 400 entries at least: {before} -> {after}"
    );
    assert!(
        render(&report, std::time::SystemTime::now())
            .contains(&format!("policy {after}/{capacity}")),
        "the screen shows the fill"
    );

    step.to("An agent that is down is an error that names its node");
    running.stop_agent('b');
    let report = check(&topology).expect("report");
    let screen = render(&report, std::time::SystemTime::now());
    assert_eq!(report.level, Level::Error, "{screen}");
    let b = report
        .agents
        .iter()
        .find(|a| a.node == "node-b")
        .expect("b");
    assert_eq!(b.health.level, Level::Error);
    assert!(
        b.health.reasons[0].contains("is signet-agent running on node-b?"),
        "{screen}"
    );
    let a = report
        .agents
        .iter()
        .find(|a| a.node == "node-a")
        .expect("a");
    assert_eq!(a.health.level, Level::Ok, "node A is not blamed: {screen}");
    assert!(
        screen.contains("Agents: 1/2 OK, 0 degraded, 1 error"),
        "{screen}"
    );

    step.to("--wait returns once the agent is back");
    running.start_agent(&t, 'b');
    let report = wait(&topology, Duration::from_secs(30), |_| {}).expect("report");
    assert_eq!(
        report.level,
        Level::Ok,
        "{}",
        render(&report, std::time::SystemTime::now())
    );
}

/// `signet observe` over the two nodes: an L7 denial and a kernel drop appear with what decided
/// them, an allowed request beside them is forwarded, filters pick each out, and a reader that
/// comes back after the ring has wrapped is told how many records it lost (and the agent counts
/// them).
#[test]
fn signet_observe_shows_kernel_drops_and_l7_denials_with_their_rules_and_counts_losses() {
    use signet_agent::cli::observe::{Filter, Line, collect};
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: api, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n\
         \x20 - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]\n    ports: [{port: 8080}]\n\
         \x20   http: [{methods: [GET], paths: [{prefix: /v1/}]}]\n",
    );
    let _running = start(&t, "", "admin: {flowLogCapacity: 16}\n");
    let _http = t.server_with(8080, &["--http"]);
    let topology = signet_agent::cli::status::read_topology(&t.write_topology_json())
        .expect("the topology file");
    let web = format!("{}:8080", t.pod_ip('b'));

    step.to("An allowed request, an L7 denial and a kernel drop");
    assert_eq!(
        t.client_with(&web, &["--request", "GET /v1/items"])["status"],
        200
    );
    assert_eq!(
        t.client_with(&web, &["--request", "POST /v1/items"])["status"],
        403
    );
    assert_eq!(t.bypassing_client(&web)["ok"], false);
    let flows = |filter: Filter| -> Vec<signet_agent::flow::FlowEntry> {
        let (lines, unreachable) = collect(&topology, 0, &filter).expect("flows");
        assert!(unreachable.is_empty(), "{unreachable:?}");
        lines
            .into_iter()
            .filter_map(|l| match l {
                Line::Flow(e) => Some(*e),
                Line::Lost { .. } => None,
            })
            .collect()
    };
    let denied = wait_for("the L7 denial in the flow log", || {
        let f = flows(Filter {
            verdict: Some("l7-denied".into()),
            ..Default::default()
        });
        (!f.is_empty()).then_some(f)
    });
    let d = &denied[0];
    assert_eq!(d.node, "node-b");
    assert_eq!(d.source.identity, CLIENT);
    assert_eq!(d.destination.pod.as_deref(), Some("shop/server-0"));
    let http = d.http.as_ref().expect("the request");
    assert_eq!(
        (http.method.as_str(), http.path.as_str(), http.status),
        ("POST", "/v1/items", 403)
    );
    assert!(
        d.reason.as_deref().is_some_and(|r| r.contains("shop/api")),
        "the rules it was checked against: {d:?}"
    );
    let dropped = wait_for("the kernel drop in the flow log", || {
        let f = flows(Filter {
            verdict: Some("dropped".into()),
            to_pod: Some("shop/server-0".into()),
            ..Default::default()
        });
        let kernel: Vec<_> = f.into_iter().filter(|e| e.reporter == "kernel").collect();
        (!kernel.is_empty()).then_some(kernel)
    });
    assert_eq!(dropped[0].node, "node-b");
    assert_eq!(dropped[0].reason.as_deref(), Some("strict-mtls-plaintext"));
    assert_eq!(dropped[0].direction.as_deref(), Some("ingress"));
    let forwarded = flows(Filter {
        verdict: Some("forwarded".into()),
        port: Some(8080),
        from_pod: Some("shop/client-0".into()),
        ..Default::default()
    });
    assert!(
        forwarded
            .iter()
            .any(|e| e.node == "node-a" && e.reporter == "outbound" && e.sent > 0),
        "the allowed request beside them: {forwarded:?}"
    );

    step.to("A reader that comes back after the ring wrapped is told what it lost");
    let (_, before) = t.admin_get('b', "/flows");
    let last_seen: u64 = before
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .expect("records");
    for _ in 0..20 {
        let _ = t.client_with(&web, &["--request", "GET /v1/items"]);
    }
    // The inbound side records a flow when its connection ends, which can be just after the
    // client has its answer; a plain read (it loses nothing) waits for all twenty.
    wait_for("the twenty flows on node-b", || {
        let (_, all) = t.admin_get('b', "/flows");
        let newest = all
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["seq"].as_u64())
            .max()?;
        (newest >= last_seen + 20).then_some(())
    });
    let (status, body) = t.admin_get('b', &format!("/flows?after={last_seen}"));
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_str(body.lines().next().expect("a line")).expect("json");
    let lost = first["lost"].as_u64().expect("a lost line first");
    assert!(lost >= 4, "20 flows through a ring of 16: {body}");
    let (_, metrics) = t.admin_get('b', "/metrics");
    assert_eq!(
        sample(&metrics, "signet_flow_records_lost_total"),
        Some(lost as f64),
        "{metrics}"
    );
}

/// The in-process agents of a [`Topology`], stopped and started for the suite's disturbing
/// scenarios as a test restarts them.
struct InProcessAgents<'a> {
    t: &'a Topology,
    running: std::sync::Mutex<&'a mut common::topology::Running>,
}

impl std::fmt::Debug for InProcessAgents<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessAgents")
    }
}

impl signet_agent::cli::connectivity::AgentControl for InProcessAgents<'_> {
    fn stop(&self, node: &signet_agent::cli::connectivity::local::Node) -> Result<(), String> {
        let c = node.name.chars().last().ok_or("a node without a name")?;
        self.running.lock().map_err(|_| "poisoned")?.stop_agent(c);
        Ok(())
    }
    fn start(&self, node: &signet_agent::cli::connectivity::local::Node) -> Result<(), String> {
        let c = node.name.chars().last().ok_or("a node without a name")?;
        self.running
            .lock()
            .map_err(|_| "poisoned")?
            .start_agent(self.t, c);
        Ok(())
    }
}

fn suite_leftovers(t: &Topology) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir(t.dir.path().join("state"))
        .expect("state")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sct"))
        .collect();
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    left.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("sct"))
            .map(str::to_owned),
    );
    for node in ['a', 'b'] {
        left.extend(
            std::fs::read_dir(t.cgroup_root(node))
                .expect("cgroup root")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("sct")),
        );
    }
    left
}

#[test]
fn signet_connectivity_test_passes_on_a_healthy_mesh_and_names_the_scenario_a_wrong_policy_breaks()
{
    use signet_agent::cli::connectivity::{Options, Verdict, run_suite};
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    t.write_state("");
    // 30 s certificates: the rotation scenario sees both sides renewed within the run.
    let mut running = start(&t, "svid: {minTtlSeconds: 10}\n", "svidTtlSeconds: 30\n");
    let topology = t.write_topology_json();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_signet-tests-cli"));

    step.to("Every scenario passes on a healthy mesh, and the suite leaves nothing behind");
    let agents = InProcessAgents {
        t: &t,
        running: std::sync::Mutex::new(&mut running),
    };
    let options = Options {
        namespace: "cnt".into(),
        exe: exe.clone(),
        filter: None,
        keep: false,
    };
    let report =
        run_suite(&topology, &options, &agents, &mut |l| eprintln!("{l}")).expect("the suite runs");
    let failed: Vec<String> = report
        .results
        .iter()
        .filter(|o| o.verdict != Verdict::Pass)
        .map(|o| o.line())
        .collect();
    assert!(
        failed.is_empty(),
        "{}\n{}",
        failed.join("\n"),
        report.summary()
    );
    assert!(report.passed >= 40, "{}", report.summary());
    assert_eq!(suite_leftovers(&t), Vec::<String>::new());

    step.to("A deliberately wrong policy (the echo server refuses everyone) fails the scenarios it breaks, by name, and not the others");
    t.write_state(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: wrong, namespace: cnt}\n\
         spec:\n  selector: {matchLabels: {app: echo-other}}\n  ingress: []\n",
    );
    let json = t.dir.path().join("connectivity.json");
    let out = std::process::Command::new(&exe)
        .args([
            "connectivity",
            "test",
            "--namespace",
            "cnt",
            "--keep",
            "--test",
            "^no-policy/pod-to-(pod|service)",
        ])
        .arg("--topology")
        .arg(&topology)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("signet connectivity test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("--json")).expect("json");
    let verdict = |name: &str| {
        report["results"]
            .as_array()
            .expect("results")
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    for broken in [
        "no-policy/pod-to-pod-cross-node",
        "no-policy/pod-to-service",
    ] {
        let r = verdict(broken);
        assert_eq!(r["verdict"], "fail", "{r}");
        assert!(
            r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("expected HTTP 200 from echo-other")),
            "the reason says what was expected and what came: {r}"
        );
        assert!(
            stdout.contains(&format!("❌ {broken}: expected HTTP 200")),
            "{stdout}"
        );
    }
    assert_eq!(verdict("no-policy/pod-to-pod-same-node")["verdict"], "pass");
    assert_eq!(report["failed"], 2, "{report}");
    assert!(
        stdout.contains("❌ 2/3 tests failed (0 skipped)")
            && stdout.contains("no-policy/pod-to-pod-cross-node, no-policy/pod-to-service"),
        "{stdout}"
    );

    step.to("--keep leaves the workloads; signet connectivity cleanup removes them all");
    assert!(
        !suite_leftovers(&t).is_empty(),
        "--keep kept nothing: {stdout}"
    );
    let host: std::net::SocketAddr = format!("{}:18090", t.node_ip('a')).parse().expect("addr");
    let host_serves = || {
        in_netns(&t.ns("node-a"), || {
            std::net::TcpStream::connect_timeout(&host, Duration::from_secs(1)).is_ok()
        })
    };
    assert!(host_serves(), "the kept host server");
    let again = std::process::Command::new(&exe)
        .args(["connectivity", "test", "--namespace", "cnt", "--topology"])
        .arg(&topology)
        .output()
        .expect("signet connectivity test");
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("another run's workloads are in place"),
        "a second run on kept workloads is refused: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let out = std::process::Command::new(&exe)
        .args(["connectivity", "cleanup", "--topology"])
        .arg(&topology)
        .output()
        .expect("signet connectivity cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(suite_leftovers(&t), Vec::<String>::new());
    wait_for("the host server to be gone", || {
        (!host_serves()).then_some(())
    });
}
