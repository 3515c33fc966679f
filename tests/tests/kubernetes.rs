//! Kubernetes mode end to end on the two-node topology: the CA and both agents read the cluster
//! from an API server (the in-memory fake of `signet_test_support::api`, served over HTTP inside node
//! A's namespace and reached through a kubeconfig) instead of a state directory. Real eBPF, real
//! namespaces, real mTLS; only the API server is a stand-in.
//!
//! It checks what only the API source does: keys generated into a Secret, agents admitted by
//! TokenReview, an agent live but not ready until its first full list, numeric identities
//! allocated as SignetIdentity objects, collected when unused and never issued twice, the Lease
//! holders, IdentityPolicy and Gateway status written back (one invalid policy holding nothing
//! else back), policy changes made through the API reaching the datapath on both nodes (also
//! after every watch was cut), and a Gateway served with the TLS Secret the CA copied into
//! signet-gateway-tls.

mod common;

use common::topology::{Topology, serial, start_agent, start_ca_in_cluster};
use serde_json::{Value, json};
use signet_test_support::api::FakeApi;
use signet_test_support::netns::in_netns;
use signet_test_support::{Steps, privileged, wait_for};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn policy(name: &str, from: &str) -> Value {
    json!({"apiVersion": "signet.dev/v1alpha1", "kind": "IdentityPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"identity": from}], "ports": [{"port": 8080}]}]}})
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[test]
fn agents_and_ca_read_the_cluster_from_the_api_server() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let t = Topology::new();
    let mut cluster = objects(&t.cluster_yaml());
    cluster.push(policy("server-from-client", CLIENT));
    let api = FakeApi::new(cluster);
    api.agent_token("token-a", "node-a");
    api.agent_token("token-b", "node-b");
    let api_addr = format!("{}:6443", t.node_ip('a'));
    api.serve(in_netns(&t.ns("node-a"), || {
        std::net::TcpListener::bind(&api_addr).expect("bind the API server")
    }));
    let kubeconfig = kubeconfig(&t, "kubeconfig", &format!("http://{api_addr}"));

    let (_ca, root) = start_ca_in_cluster(&t, &kubeconfig);
    let secrets = api.objects("Secret");
    assert_eq!(secrets.len(), 1, "the CA generated its keys into a Secret");
    assert!(
        secrets[0]["data"]["roots.1.intermediate-key.pem"].is_string(),
        "with an intermediate"
    );
    let holder = |name: &str| {
        api.objects("Lease")
            .into_iter()
            .find(|l| l["metadata"]["name"] == name)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
    };
    // Taken in the background once the CA serves; under load that may be a moment later.
    let rotation = wait_for("the CA's rotation Lease", || holder("signet-ca-rotation"));
    assert_eq!(rotation, "signet-ca-0");
    // The local topology: its pods are network namespaces the annotations name.
    let source = format!(
        "kubernetes: true\nkubeconfig: {}\nlocalTopology: true\n",
        kubeconfig.display()
    );
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    // Unused numeric identities go after 2 s (600 by default), looked for every second.
    let gc = "identityGc: {graceSeconds: 2, intervalSeconds: 1}\n";
    let config = |node| t.agent_config_from(node, &source, &ca_addr, &root, gc);

    step.to("Until its first full list, an agent is alive but not ready, and...");
    // Until its first full list, an agent is alive but not ready, and says why.
    api.hold_lists(true);
    let (agent_a, waited) = std::thread::scope(|s| {
        let starting = s.spawn(|| start_agent(&t, 'a', config('a')));
        let waited = wait_for("the admin port while the API is held", || {
            let (live, _) = t.admin_get('a', "/healthz/live");
            let (ready, why) = t.admin_get('a', "/healthz/ready");
            (live == 200 && ready == 503).then_some(why)
        });
        api.hold_lists(false);
        (starting.join().expect("agent a"), waited)
    });
    assert!(waited.contains("waiting for the first sync"), "{waited}");
    // Each start returns once the agent is ready: synced, and certificates (from a CA that
    // admitted it by TokenReview) for its pods.
    let _agents = [agent_a, start_agent(&t, 'b', config('b'))];

    step.to("One agent holds each cluster-wide chore");
    // One agent holds each cluster-wide chore.
    for lease in ["signet-status", "signet-identity-gc"] {
        let h = wait_for(lease, || holder(lease));
        assert!(h == "node-a" || h == "node-b", "{lease}: {h}");
    }

    step.to("Numbers for both identities, one SignetIdentity each, shared by...");
    // Numbers for both identities, one SignetIdentity each, shared by both nodes.
    let identities = api.objects("SignetIdentity");
    for id in [CLIENT, SERVER] {
        let of_id: Vec<_> = identities
            .iter()
            .filter(|o| o["spec"]["spiffeId"] == id)
            .collect();
        assert_eq!(of_id.len(), 1, "{id}: {identities:?}");
        let number: u32 = of_id[0]["metadata"]["name"]
            .as_str()
            .and_then(|n| n.parse().ok())
            .expect("named by its number");
        assert!(number >= 256, "{id} got {number}");
    }

    let _server = t.server(8080);
    let target = format!("{}:8080", t.pod_ip('b'));
    let report = t.client(&target);
    assert_eq!(
        report["ok"], true,
        "the policy from the API allows it: {report}"
    );

    step.to("The status writer reports the policy valid and in force");
    // The status writer reports the policy valid and in force.
    wait_for("IdentityPolicy status", || {
        let p = api
            .objects("IdentityPolicy")
            .into_iter()
            .find(|p| p["metadata"]["name"] == "server-from-client")?;
        let in_force = condition(&p, "InForce")?;
        (condition(&p, "Valid")?["status"] == "True" && in_force["status"] == "True").then_some(())
    });

    step.to("A change made through the API reaches both datapaths, also after...");
    // A change made through the API reaches both datapaths, also after every watch was cut:
    // the agents watch again.
    let watched = api.watch_requests();
    api.end_watches();
    // Every reflector of both agents and of the CA watches again.
    wait_for("the watches to resume", || {
        (api.watch_requests() >= 2 * watched).then_some(())
    });
    api.put(policy(
        "server-from-client",
        "spiffe://cluster.local/ns/shop/sa/admin",
    ));
    wait_for("the denial to take effect", || {
        let report = t.client(&target);
        (report["ok"] == false || report["reply"] == "").then_some(())
    });

    step.to("signet observe --kubernetes reads both agents' flows through port-forwards");
    observe_through_the_api(&t, &api, &target);
    api.delete(
        "signet.dev/v1alpha1",
        "IdentityPolicy",
        "shop",
        "server-from-client",
    );
    wait_for("no policy: allowed again", || {
        (t.client(&target)["ok"] == true).then_some(())
    });

    step.to("A Gateway through the API");
    // A Gateway through the API: the CA copies its TLS Secret into signet-gateway-tls (agents may
    // read no other Secret), the agents serve it, and its status is written back.
    let (cert_pem, gateway) = gateway_objects();
    for o in gateway {
        api.put(o);
    }
    let _http = t.server_with(8081, &["--http"]);
    let ca_file = t.dir.path().join("gateway-ca.pem");
    std::fs::write(&ca_file, &cert_pem).expect("gateway CA");
    // The Gateway over HTTPS at `node`'s address, from node A's namespace: the body, if any.
    let https = |node: char| {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.ns("node-a"),
                "curl",
                "-sS",
                "--max-time",
                "5",
            ])
            .args([
                "--resolve",
                &format!("shop.example.test:8443:{}", t.node_ip(node)),
            ])
            .arg("--cacert")
            .arg(&ca_file)
            .arg("https://shop.example.test:8443/hello")
            .output()
            .expect("curl");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let answer = wait_for("the Gateway to answer over HTTPS", || https('a'));
    assert!(
        https('b').is_some(),
        "without a placement every node serves it"
    );
    assert!(answer.contains("/hello"), "the backend answered: {answer}");
    let copies: Vec<Value> = api
        .objects("Secret")
        .into_iter()
        .filter(|s| {
            s["metadata"]["namespace"] == "signet-gateway-tls" && s["type"] == "kubernetes.io/tls"
        })
        .collect();
    assert_eq!(copies.len(), 1, "one copy of shop/shop-tls: {copies:?}");
    wait_for("Gateway status", || {
        let gw = api.objects("Gateway").into_iter().next()?;
        (condition(&gw, "Programmed")?["status"] == "True").then_some(())
    });
    // Placed on edge nodes (node-a), node-b stops serving it: only a node serving a Gateway
    // holds its identity (the CA refuses others; its unit and API tests show the refusal).
    let mut node_a = objects(&t.cluster_yaml())
        .into_iter()
        .find(|o| o["kind"] == "Node" && o["metadata"]["name"] == "node-a")
        .expect("node-a");
    node_a["metadata"]["labels"] = json!({"node-restriction.kubernetes.io/edge": "true"});
    api.put(node_a);
    let mut gw = api
        .objects("Gateway")
        .into_iter()
        .next()
        .expect("the Gateway");
    gw["metadata"]["annotations"] =
        json!({"signet.dev/nodes": "node-restriction.kubernetes.io/edge=true"});
    api.put(gw);
    wait_for("node-b to stop serving the Gateway", || {
        https('b').is_none().then_some(())
    });
    assert!(
        https('a').is_some_and(|a| a.contains("/hello")),
        "node-a serves it"
    );

    step.to("An invalid policy is refused by name with its field path");
    // An invalid policy is refused by name with its field path. Never seen valid, it fails
    // closed: the server it selects is denied ingress, not left open.
    let mut bad = policy("broken", CLIENT);
    bad["spec"]["ingress"][0]["ports"][0]["port"] = json!(0);
    api.put(bad.clone());
    let refused = wait_for("the broken policy's status", || {
        let p = api
            .objects("IdentityPolicy")
            .into_iter()
            .find(|p| p["metadata"]["name"] == "broken")?;
        condition(&p, "Valid")
            .filter(|c| c["status"] == "False")
            .cloned()
    });
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("port")),
        "{refused}"
    );
    wait_for("the broken policy to deny what it selects", || {
        let report = t.client(&target);
        (report["ok"] == false || report["reply"] == "").then_some(())
    });
    // Still broken, but selecting pods that do not exist: the server is free again.
    bad["spec"]["selector"]["matchLabels"]["app"] = json!("nothing-here");
    api.put(bad);
    wait_for("the broken policy to select nothing", || {
        (t.client(&target)["ok"] == true).then_some(())
    });
    // It holds nothing else back: a valid change made beside it takes effect...
    api.put(policy("gate", "spiffe://cluster.local/ns/shop/sa/admin"));
    wait_for(
        "a valid policy beside the broken one to take effect",
        || {
            let report = t.client(&target);
            (report["ok"] == false || report["reply"] == "").then_some(())
        },
    );
    // ...and a policy updated to an invalid version keeps its last valid one in force (the
    // client stays denied; dropping the policy would let it in), its status saying so.
    let mut gate = policy("gate", "spiffe://cluster.local/ns/shop/sa/admin");
    gate["spec"]["ingress"][0]["from"][0]["identity"] = json!("not-a-spiffe-id");
    api.put(gate);
    let kept = wait_for("the broken gate's status", || {
        let p = api
            .objects("IdentityPolicy")
            .into_iter()
            .find(|p| p["metadata"]["name"] == "gate")?;
        condition(&p, "InForce")
            .filter(|c| c["reason"] == "LastValidVersion")
            .cloned()
    });
    assert_eq!(kept["status"], "False", "{kept}");
    let report = t.client(&target);
    assert!(
        report["ok"] == false || report["reply"] == "",
        "the last valid version of gate still denies: {report}"
    );
    api.delete("signet.dev/v1alpha1", "IdentityPolicy", "shop", "gate");
    wait_for("gate deleted: allowed again", || {
        (t.client(&target)["ok"] == true).then_some(())
    });

    step.to("A pod gone for longer than the grace period gives its number back");
    // A pod gone for longer than the grace period gives its number back; the others keep theirs.
    // (A number being deleted is quarantined: it stays, terminating, and means nothing.)
    let numbered = |id: &str| {
        api.objects("SignetIdentity")
            .iter()
            .any(|o| o["spec"]["spiffeId"] == id && o["metadata"]["deletionTimestamp"].is_null())
    };
    let number_of = |id: &str| -> Option<u32> {
        api.objects("SignetIdentity")
            .iter()
            .find(|o| o["spec"]["spiffeId"] == id)
            .and_then(|o| o["metadata"]["name"].as_str()?.parse().ok())
    };
    let quarantined = |n: u32| {
        api.objects("SignetIdentity").iter().any(|o| {
            o["metadata"]["name"]
                .as_str()
                .and_then(|s| s.parse::<u32>().ok())
                == Some(n)
                && !o["metadata"]["deletionTimestamp"].is_null()
        })
    };
    let collected = number_of(CLIENT).expect("the client's number");
    // (Also while the broken policy is there.)
    api.delete("v1", "Pod", "shop", "client-0");
    wait_for("the client's identity to be collected", || {
        (!numbered(CLIENT)).then_some(())
    });
    assert!(numbered(SERVER), "the server still runs");
    assert!(numbered("spiffe://cluster.local/ns/shop/gateway/public"));

    step.to("A number is never issued to a second identity");
    // A number is never issued to a second identity. `old` runs in the client's pod, the only
    // one a policy admits; its pod goes for longer than the grace period; `intruder` takes the
    // pod's place and gets a number old's rule does not admit, on either node.
    const OLD: &str = "spiffe://cluster.local/ns/shop/sa/old";
    const INTRUDER: &str = "spiffe://cluster.local/ns/shop/sa/intruder";
    let client_pod = |sa: &str| {
        let mut pod = objects(&t.cluster_yaml())
            .into_iter()
            .find(|o| o["kind"] == "Pod" && o["metadata"]["name"] == "client-0")
            .expect("client-0");
        pod["spec"]["serviceAccountName"] = json!(sa);
        pod
    };
    api.put(policy("server-from-old", OLD));
    api.put(client_pod("old"));
    wait_for("old to be admitted", || {
        (t.client(&target)["ok"] == true).then_some(())
    });
    let old_number = number_of(OLD).expect("old has a number");
    api.delete("v1", "Pod", "shop", "client-0");
    // Grace 2 s, a pass every second: old's number is deleted, and quarantined (60 s) rather
    // than freed, although it is the highest.
    wait_for("old's number to be quarantined", || {
        quarantined(old_number).then_some(())
    });
    // To know the intruder's pod is up (certificate and all) before judging the denial, a
    // second policy admits it for a moment.
    api.put(policy("probe", INTRUDER));
    api.put(client_pod("intruder"));
    wait_for("the intruder's pod to be up", || {
        (t.client(&target)["ok"] == true).then_some(())
    });
    let intruder_number = number_of(INTRUDER).expect("intruder has a number");
    assert_ne!(
        intruder_number, collected,
        "the collected number is not issued again"
    );
    assert!(quarantined(old_number), "still in quarantine");
    assert!(
        intruder_number > old_number,
        "{intruder_number} after {old_number}"
    );
    api.delete("signet.dev/v1alpha1", "IdentityPolicy", "shop", "probe");
    wait_for("old's rule not to admit the intruder", || {
        let report = t.client(&target);
        (report["ok"] == false || report["reply"] == "").then_some(())
    });
}

/// A GatewayClass of Signet's, an HTTPS Gateway in `shop` with a self-signed certificate in a
/// `kubernetes.io/tls` Secret, and an HTTPRoute to the server's port 81 (the pod's 8081).
/// Returns the certificate (the client's trust anchor) with the objects.
fn gateway_objects() -> (String, Vec<Value>) {
    use base64::Engine as _;
    let certified =
        rcgen::generate_simple_self_signed(vec!["shop.example.test".to_owned()]).expect("cert");
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let cert_pem = certified.cert.pem();
    let objects = vec![
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "shop-tls", "namespace": "shop"},
            "data": {"tls.crt": b64(cert_pem.clone()),
                     "tls.key": b64(certified.signing_key.serialize_pem())}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": "signet"},
            "spec": {"controllerName": "signet.dev/gateway-controller"}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "public", "namespace": "shop"},
            "spec": {"gatewayClassName": "signet", "listeners": [
                {"name": "https", "port": 8443, "protocol": "HTTPS",
                 "hostname": "shop.example.test",
                 "tls": {"mode": "Terminate", "certificateRefs": [{"name": "shop-tls"}]}}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"parentRefs": [{"name": "public"}],
                     "rules": [{"backendRefs": [{"name": "server", "port": 81}]}]}}),
    ];
    (cert_pem, objects)
}

/// A kubeconfig in the test's directory for the API server at `url`.
fn kubeconfig(t: &Topology, file: &str, url: &str) -> std::path::PathBuf {
    let path = t.dir.path().join(file);
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: '{url}'}}}}]\n\
             users: [{{name: signet, user: {{token: not-checked}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: signet}}}}]\n"
        ),
    )
    .expect("kubeconfig");
    path
}

/// The agents' pods as the DaemonSet makes them (host network, the admin port named).
fn agent_pods(t: &Topology, api: &FakeApi) {
    for node in ['a', 'b'] {
        agent_pod(t, api, node, &format!("signet-agent-node-{node}"));
    }
}

fn agent_pod(t: &Topology, api: &FakeApi, node: char, name: &str) {
    api.put(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "signet-system",
                     "labels": {"app.kubernetes.io/name": "signet-agent"}},
        "spec": {"nodeName": format!("node-{node}"), "hostNetwork": true,
                 "containers": [{"name": "signet-agent", "image": "ghcr.io/signet-dev/signet-agent:test",
                                 "ports": [{"name": "admin", "containerPort": 15020}]}]},
        "status": {"phase": "Running", "podIP": t.node_ip(node)}}));
}

/// `signet observe --kubernetes`, run where no node's address or loopback is reachable (this
/// test's own namespace, the API server on its loopback): every flow it shows came through a
/// port-forward. Both nodes' records are there: the kernel's drop of plaintext that bypassed
/// the proxy and the policy's refusal, each with its reason; without the right to create
/// `pods/portforward`, it says so and shows nothing.
fn observe_through_the_api(t: &Topology, api: &FakeApi, target: &str) {
    agent_pods(t, api);
    // Nothing to run here; it does the kubelet's side of the port-forwards.
    let _kubelet =
        common::kubelet::Kubelet::start(t, api, env!("CARGO_BIN_EXE_signet-tests-cli").into());
    assert_eq!(
        t.bypassing_client(target)["ok"],
        false,
        "strict mode drops it"
    );
    let kubeconfig = kubeconfig(t, "kubeconfig-loopback", &api.serve_loopback());
    let observe = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_signet-tests-cli"))
            .args(["observe", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(extra)
            .output()
            .expect("signet observe");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let seen = wait_for("both kinds of drop in signet observe --kubernetes", || {
        let (code, stdout, stderr) = observe(&["-o", "json", "--to-pod", "shop/server-0"]);
        assert_eq!(code, Some(0), "{stderr}");
        let flows: Vec<Value> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let kernel = flows.iter().any(|f| {
            f["node"] == "node-b"
                && f["reporter"] == "kernel"
                && f["reason"] == "strict-mtls-plaintext"
        });
        let refused = flows.iter().any(|f| {
            f["node"] == "node-b"
                && f["reporter"] == "inbound"
                && f["verdict"] == "dropped"
                && f["rule"] == "default deny"
        });
        (kernel && refused).then_some(flows)
    });
    let nodes: std::collections::BTreeSet<&str> =
        seen.iter().filter_map(|f| f["node"].as_str()).collect();
    assert!(nodes.contains("node-b"), "{seen:?}");
    let forwards = api
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/portforward") && r.code == 101)
        .count();
    assert!(
        forwards >= 2,
        "each agent read through a port-forward ({forwards})"
    );
    let (code, compact, _) = observe(&["--to-pod", "shop/server-0", "--verdict", "dropped"]);
    assert_eq!(code, Some(0));
    assert!(
        compact.contains("kernel") && compact.contains("reason=strict-mtls-plaintext"),
        "{compact}"
    );

    // `signet status --port-forward` reaches the agents the same way.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_signet-tests-cli"))
        .args([
            "status",
            "--kubernetes",
            "--port-forward",
            "-o",
            "json",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .output()
        .expect("signet status");
    let report: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let agents: Vec<(&str, &str)> = report["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap_or_default(),
                a["health"]["level"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(agents, [("node-a", "ok"), ("node-b", "ok")], "{report}");
    assert_eq!(out.status.code(), Some(0), "{report}");

    // Without the right to port-forward in signet-system, nothing is shown, and the refusal is.
    api.forbid("create", "pods/portforward");
    let (code, stdout, stderr) = observe(&[]);
    assert_ne!(code, Some(0), "{stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("403 Forbidden") && stderr.contains("`create` on `pods/portforward`"),
        "the refusal is named: {stderr}"
    );
}

/// `signet connectivity test --kubernetes` against the fake API server with a kubelet of the
/// test's (`common::kubelet`): the suite's Deployments become pods on both nodes, the clients
/// run by exec, policies go in as IdentityPolicies and the flows come through port-forwards.
/// The command runs on a machine outside the cluster (a namespace wired to node A with two
/// addresses) that reaches only the API server and the nodes' addresses. The test plays the
/// agents' DaemonSet too: node-b's agent pod, deleted by the suite, is replaced by a new agent.
/// Every scenario passes but those that need a process in a pod's namespace outside its cgroup
/// or an agent held down, which say so; and afterwards nothing of the suite is left, in the API
/// or in the kernel.
#[test]
fn signet_connectivity_test_runs_through_the_api() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let t = Topology::new();
    let api = FakeApi::new(objects(&t.cluster_yaml()));
    api.agent_token("token-a", "node-a");
    api.agent_token("token-b", "node-b");
    api.allocate_cluster_ips(&format!("10.96.{}.", t.n));
    agent_pods(&t, &api);
    let api_addr = format!("{}:6443", t.node_ip('a'));
    api.serve(in_netns(&t.ns("node-a"), || {
        std::net::TcpListener::bind(&api_addr).expect("bind the API server")
    }));
    let kubeconfig = kubeconfig(&t, "kubeconfig", &format!("http://{api_addr}"));
    let (_ca, root) = start_ca_in_cluster(&t, &kubeconfig);
    let source = format!(
        "kubernetes: true\nkubeconfig: {}\nlocalTopology: true\n",
        kubeconfig.display()
    );
    let ca_addr = format!("{}:15012", t.node_ip('a'));
    // 60 s certificates, renewed at half-life: the rotation scenario sees both renewed.
    let config = |node| t.agent_config_from(node, &source, &ca_addr, &root, "svidTtlSeconds: 60\n");
    let agents = std::sync::Mutex::new(vec![
        start_agent(&t, 'a', config('a')),
        start_agent(&t, 'b', config('b')),
    ]);
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_signet-tests-cli"));
    let kubelet = common::kubelet::Kubelet::start(&t, &api, exe.clone());

    // The machine outside: a veth to node A, two addresses; node B routes to it through A.
    let outside = signet_test_support::netns::NetNs::new();
    let n = t.n;
    let (node_a, node_b) = (t.ns("node-a"), t.ns("node-b"));
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let host_if = format!("sgo{n}");
    ip(&[
        "-n",
        &node_a,
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &outside.name,
    ]);
    ip(&[
        "-n",
        &node_a,
        "addr",
        "add",
        &format!("10.80.{n}.1/24"),
        "dev",
        &host_if,
    ]);
    ip(&["-n", &node_a, "link", "set", &host_if, "up"]);
    for a in [2, 3] {
        ip(&[
            "-n",
            &outside.name,
            "addr",
            "add",
            &format!("10.80.{n}.{a}/24"),
            "dev",
            "eth0",
        ]);
    }
    ip(&["-n", &outside.name, "link", "set", "eth0", "up"]);
    ip(&[
        "-n",
        &outside.name,
        "route",
        "add",
        "default",
        "via",
        &format!("10.80.{n}.1"),
    ]);
    ip(&[
        "-n",
        &node_b,
        "route",
        "add",
        &format!("10.80.{n}.0/24"),
        "via",
        &t.node_ip('a'),
    ]);

    let json_file = t.dir.path().join("connectivity.json");
    // The agents' DaemonSet: an agent pod deleted is replaced (the agent stops, a new one
    // starts on the node and its pod appears under a new name).
    let running = std::sync::atomic::AtomicBool::new(true);
    let replaced = std::sync::atomic::AtomicUsize::new(0);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                for (i, node) in ['a', 'b'].into_iter().enumerate() {
                    let present = api.objects("Pod").iter().any(|p| {
                        p["metadata"]["namespace"] == "signet-system"
                            && p["spec"]["nodeName"] == format!("node-{node}")
                    });
                    if present {
                        continue;
                    }
                    let mut agents = agents.lock().expect("agents");
                    agents[i].0.stop();
                    agents[i] = start_agent(&t, node, config(node));
                    let k = replaced.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    agent_pod(&t, &api, node, &format!("signet-agent-node-{node}-{k}"));
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &outside.name])
            .arg(&exe)
            .args(["connectivity", "test", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--outside", &format!("10.80.{n}.2,10.80.{n}.3"), "--json"])
            .arg(&json_file)
            .output()
            .expect("signet connectivity test");
        running.store(false, std::sync::atomic::Ordering::SeqCst);
        out
    });
    assert_eq!(
        replaced.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "node-b's agent pod was deleted once and replaced"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The suite's own report, shown when this test fails.
    eprintln!("{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).expect("the JSON report"))
            .expect("JSON");
    let results = report["results"].as_array().expect("results");
    let failed: Vec<&Value> = results.iter().filter(|r| r["verdict"] == "fail").collect();
    assert!(failed.is_empty(), "failed: {failed:#?}");
    let skipped: Vec<&str> = results
        .iter()
        .filter(|r| r["verdict"] == "skip")
        .filter_map(|r| r["name"].as_str())
        .collect();
    // What needs a node's own hands, and nothing else.
    assert_eq!(
        skipped,
        [
            "no-policy/strict-drops-plaintext-from-an-uncaptured-process-same-node",
            "agent-restart/kernel-drops-plaintext-while-down",
            "agent-restart/outside-plaintext-dropped-while-down",
            "agent-restart/mesh-fails-closed-while-down",
        ],
        "{stdout}"
    );
    assert!(
        report["passed"].as_u64().unwrap_or(0) >= 60,
        "{}",
        report["passed"]
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("tests successful"), "{stdout}");

    // Gone: the namespaces and what was in them, and the pods' kernel objects.
    for ns in ["signet-connectivity", "signet-connectivity-peer"] {
        assert!(api.get("Namespace", "", ns).is_none(), "{ns} is left");
    }
    assert!(api.objects("Deployment").is_empty());
    wait_for("the kubelet to remove the pods", || {
        (kubelet.running() == 0).then_some(())
    });
    drop(kubelet);
}
