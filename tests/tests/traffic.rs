//! L7 traffic management in the node proxy, end to end over the two-node topology: a Service
//! `api` with three endpoints across both nodes, governed by HTTPRoutes and a GRPCRoute whose
//! parent is the Service (the Gateway API mesh profile), and backends that can be told to fail
//! or stall. The client is an unmodified HTTP client in the client pod on node A; its node's
//! proxy routes each request. Needs root; see `common`.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::topology::{ExtraPod, Topology, serial, start};
use signet_test_support::{Steps, privileged, wait_for};

/// A `signet-test-http` process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `signet-test-http serve` in `netns` on `addr`, answering as `name`, told what to do by
/// `mode_file`.
fn backend(netns: &str, name: &str, addr: &str, mode_file: &std::path::Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_signet-test-http"))
        .args(["serve", "--netns", netns, "--name", name, "--listen", addr])
        .arg("--mode-file")
        .arg(mode_file)
        .arg("--log")
        .arg(mode_file.with_file_name(format!("{name}.log")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("backend");
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    );
    assert_eq!(line.trim(), "ready", "backend {name} on {addr}");
    Proc(child)
}

/// Runs `signet-test-http` as a process of the client pod and returns its report.
fn client(t: &Topology, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_signet-test-http"))
        .arg(args[0])
        .arg("--cgroup")
        .arg(t.cgroup_root('a').join("pod"))
        .args(["--netns", &t.ns("pod-a")])
        .args(&args[1..])
        .output()
        .expect("client");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `count` requests to `path` on the Service over one kept-alive connection.
fn load(t: &Topology, path: &str, count: u32, extra: &[&str]) -> serde_json::Value {
    let url = format!("http://{}:80{path}", vip(t));
    let count = count.to_string();
    let mut args = vec!["load", "--url", &url, "--count", &count];
    args.extend_from_slice(extra);
    client(t, &args)
}

fn vip(t: &Topology) -> String {
    format!("10.96.{}.20", t.n)
}

fn counts(report: &serde_json::Value, key: &str) -> BTreeMap<String, u64> {
    report[key]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the metric sample that starts with `prefix`, summed over its series.
fn metric(t: &Topology, node: char, prefix: &str) -> f64 {
    let (_, body) = t.admin_get(node, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

const ROUTES: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /canary}}]
    backendRefs: [{name: api, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {attempts: 2, codes: [503], backoff: 5ms}
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /stall}}]
    timeouts: {request: 1s}
    backendRefs: [{name: api, port: 80}]
  - matches: [{headers: [{name: x-version, value: v2}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-routed, value: by-header}]}
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {statusCode: 308, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - backendRefs: [{name: api, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-grpc, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 81}]
  rules:
  - matches: [{method: {service: test.Echo, method: Stream}}]
    backendRefs: [{name: api-v2, port: 80}]
  - backendRefs: [{name: api, port: 81}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api-v2}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api, port: 80}}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ['https://example.com']}}]
    backendRefs: [{name: api-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: copy, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api-v2}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api, port: 80}}}]
    backendRefs: [{name: api-v2, port: 80}]
";

/// Round robin and a quicker ejection for `api`, a rate limit for `api-v2`, and one policy
/// that targets something that is no Service.
const TRAFFIC: &str = "\
apiVersion: signet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: api}]
  loadBalancer: {algorithm: RoundRobin}
  outlierDetection: {consecutiveFailures: 5, baseEjectionTime: 1s, maxEjectionTime: 10s}
---
apiVersion: signet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: api-v2, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: api-v2}]
  rateLimit: {requestsPerSecond: 2, burst: 5}
---
apiVersion: signet.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: wrong, namespace: shop}
spec:
  targetRefs: [{group: apps, kind: Deployment, name: api}]
";

/// Services `api` (three endpoints: server-0 on node B, api-a1 on node A, api-b2 on node B;
/// port 80 for HTTP, 81 for gRPC) and `api-v2` (one endpoint: a second server in api-a1),
/// the two extra pods, the routes, and `policy`.
fn state(t: &Topology, pods: &[ExtraPod], policy: &str) -> String {
    let n = t.n;
    let ips: Vec<String> = std::iter::once(t.pod_ip('b'))
        .chain(pods.iter().map(|p| p.address.clone()))
        .collect();
    let endpoints = ips
        .iter()
        .map(|ip| format!("{{addresses: [{ip}], conditions: {{ready: true}}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut y: String = pods.iter().map(|p| p.manifest("api", "api")).collect();
    y += &format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.{n}.20, ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: grpc, port: 81, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
         ports: [{{name: http, port: 8080}}, {{name: grpc, port: 8080}}]\nendpoints: [{endpoints}]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: api-v2, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.{n}.21, ports: [{{name: http, port: 80, targetPort: 8081}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: api-v2-1, namespace: shop, labels: {{kubernetes.io/service-name: api-v2}}}}\n\
         ports: [{{name: http, port: 8081}}]\nendpoints: [{{addresses: [{}], conditions: {{ready: true}}}}]\n---\n",
        pods[0].address
    );
    y += ROUTES;
    if !policy.is_empty() {
        y += "---\n";
        y += policy;
    }
    y
}

fn set_mode(file: &std::path::Path, mode: &str) {
    std::fs::write(file, mode).expect("mode file");
}

#[test]
fn routes_on_a_service_balance_split_retry_time_out_eject_and_enforce_egress_at_the_source() {
    if !privileged() {
        return;
    }
    let _serial = serial();
    let mut step = Steps::default();
    let mut t = Topology::new();
    let pods = vec![t.add_pod('a', "api-a1", 1), t.add_pod('b', "api-b2", 2)];
    t.write_state(&state(&t, &pods, ""));
    // A short idle timeout: idle connections (a client's, the pooled upstream ones) go.
    let _running = start(&t, "", "proxy: {idleTimeoutSeconds: 2}\n");
    let modes = t.dir.path().join("modes");
    std::fs::create_dir_all(&modes).expect("modes");
    let mode = |name: &str| modes.join(name);
    let _backends = [
        backend(
            &t.ns("pod-b"),
            "server-0",
            &format!("{}:8080", t.pod_ip('b')),
            &mode("server-0"),
        ),
        backend(
            &pods[0].netns,
            "api-a1",
            &format!("{}:8080", pods[0].address),
            &mode("api-a1"),
        ),
        backend(
            &pods[1].netns,
            "api-b2",
            &format!("{}:8080", pods[1].address),
            &mode("api-b2"),
        ),
        backend(
            &pods[0].netns,
            "v2",
            &format!("{}:8081", pods[0].address),
            &mode("v2"),
        ),
    ];
    t.settle();

    step.to("Requests on one connection spread over the three endpoints, on both nodes");
    let r = wait_for("the routes to apply", || {
        let r = load(&t, "/", 90, &[]);
        (counts(&r, "statuses").get("200") == Some(&90)).then_some(r)
    });
    // Peak-EWMA P2C: each endpoint is drawn, the quicker (node A's own) more often.
    let pods_seen = counts(&r, "pods");
    for name in ["server-0", "api-a1", "api-b2"] {
        let n = pods_seen.get(name).copied().unwrap_or(0);
        assert!(n >= 3, "{name} served {n} of 90 on one connection: {r}");
    }
    assert_eq!(r["sample"]["proto"], "HTTP/1.1", "{r}");

    step.to("A routed connection with no request for the idle timeout is closed by the proxy");
    let url = format!("http://{}:80/idle", vip(&t));
    let r = client(&t, &["load", "--url", &url, "--hold-idle-ms", "6000"]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["closed"], true, "{r}");
    let after = r["after_ms"].as_u64().unwrap_or(0);
    assert!(
        (1500..=4500).contains(&after),
        "closed after {after} ms of 2 s idle: {r}"
    );

    step.to("The same over HTTP/2 (h2c): the endpoint is spoken to in HTTP/2");
    let r = load(&t, "/h2", 30, &["--h2"]);
    assert_eq!(counts(&r, "statuses").get("200"), Some(&30), "{r}");
    assert_eq!(r["sample"]["proto"], "HTTP/2.0", "{r}");
    assert!(counts(&r, "pods").len() >= 2, "{r}");

    step.to("A 90/10 canary lands within tolerance");
    let r = load(&t, "/canary", 400, &[]);
    let canary = counts(&r, "pods").get("v2").copied().unwrap_or(0);
    assert_eq!(counts(&r, "statuses").get("200"), Some(&400), "{r}");
    assert!(
        (16..=72).contains(&canary),
        "10% of 400 is 40; got {canary}: {r}"
    );

    step.to("A header match routes to v2 and its filter sets a header; a redirect is answered");
    let r = load(&t, "/any", 5, &["--header", "x-version: v2"]);
    assert_eq!(counts(&r, "pods").get("v2"), Some(&5), "{r}");
    assert_eq!(r["sample"]["headers"]["x-routed"], "by-header", "{r}");
    let r = load(&t, "/old/page?q=1", 1, &[]);
    assert_eq!(counts(&r, "statuses").get("308"), Some(&1), "{r}");

    step.to("A stalled backend hits the route's 1 s timeout: 504, and the client is not held");
    let started = Instant::now();
    let r = load(&t, "/stall", 1, &[]);
    let took = started.elapsed();
    assert_eq!(counts(&r, "statuses").get("504"), Some(&1), "{r}");
    assert!(took < Duration::from_secs(3), "held {took:?}: {r}");
    assert_eq!(
        metric(&t, 'a', "signet_http_timeouts_total{service=\"shop/api\"}"),
        1.0,
        "counted once"
    );
    assert!(
        r["sample"]
            .as_str()
            .is_some_and(|s| s.contains("timed out") || s.contains("did not answer")),
        "the answer says why: {r}"
    );

    step.to("gRPC: a unary call goes to `api`, a streaming call routed by method to v2");
    let grpc_target = format!("{}:81", vip(&t));
    let unary = client(
        &t,
        &["grpc", "--addr", &grpc_target, "--path", "/test.Echo/Unary"],
    );
    assert_eq!(unary["grpc_status"], "0", "{unary}");
    let reply = unary["replies"][0].as_str().unwrap_or_default();
    assert!(
        ["server-0:m0", "api-a1:m0", "api-b2:m0"].contains(&reply),
        "{unary}"
    );
    let stream = client(
        &t,
        &[
            "grpc",
            "--addr",
            &grpc_target,
            "--path",
            "/test.Echo/Stream",
            "--messages",
            "3",
        ],
    );
    assert_eq!(stream["grpc_status"], "0", "{stream}");
    assert_eq!(
        stream["replies"],
        serde_json::json!(["v2:m0", "v2:m1", "v2:m2"]),
        "each message answered as it came, by v2: {stream}"
    );

    step.to("A WebSocket upgrade passes after the route decision and carries bytes");
    let ws = client(
        &t,
        &["ws", "--addr", &format!("{}:80", vip(&t)), "--path", "/ws"],
    );
    assert_eq!(
        ws,
        serde_json::json!({"status": 101, "accepted": true, "echoed": true})
    );

    step.to("A mirror sends a copy to another Service; the client gets the primary's answer");
    let r = client(
        &t,
        &[
            "load",
            "--url",
            &format!("http://10.96.{}.21:80/copied/once", t.n),
            "--count",
            "1",
        ],
    );
    assert_eq!(counts(&r, "pods").get("v2"), Some(&1), "{r}");
    let logs: Vec<_> = ["server-0", "api-a1", "api-b2"]
        .iter()
        .map(|name| modes.join(format!("{name}.log")))
        .collect();
    wait_for("the mirrored copy to reach an endpoint of `api`", || {
        logs.iter()
            .any(|l| std::fs::read_to_string(l).is_ok_and(|t| t.contains("GET /copied/once")))
            .then_some(())
    });

    step.to("A route with a field Signet does not serve is refused in status, naming it");
    let status = Command::new(env!("CARGO_BIN_EXE_signet-tests-cli"))
        .args(["gateway", "status", "--state"])
        .arg(t.dir.path().join("state"))
        .output()
        .expect("signet gateway status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("rules[1].filters[0]: filter type CORS is not supported"),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let r = client(
        &t,
        &[
            "load",
            "--url",
            &format!("http://10.96.{}.21:80/", t.n),
            "--count",
            "3",
        ],
    );
    assert_eq!(
        counts(&r, "statuses").get("200"),
        Some(&3),
        "the refused route governs nothing; `copy` still governs api-v2: {r}"
    );

    step.to("TrafficPolicies attach to their Services; one that targets no Service is refused");
    t.write_state(&state(&t, &pods, TRAFFIC));
    t.settle();
    let status = Command::new(env!("CARGO_BIN_EXE_signet-tests-cli"))
        .args(["gateway", "status", "--state"])
        .arg(t.dir.path().join("state"))
        .output()
        .expect("signet gateway status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("spec.targetRefs[0]: apps/Deployment api is not a Service"),
        "{text}"
    );

    step.to("A rate limit answers 429 past its burst, saying when to come back");
    let r = load(&t, "/limited", 12, &["--header", "x-version: v2"]);
    let statuses = counts(&r, "statuses");
    let (ok, limited) = (
        statuses.get("200").copied().unwrap_or(0),
        statuses.get("429").copied().unwrap_or(0),
    );
    assert_eq!(ok + limited, 12, "{r}");
    assert!((5..=6).contains(&ok), "a burst of 5 (and 2/s): {r}");
    assert!(
        r["sample"]
            .as_str()
            .is_some_and(|s| s.contains("rate limit of Service shop/api-v2")),
        "{r}"
    );
    assert!(
        metric(
            &t,
            'a',
            "signet_http_rate_limited_total{service=\"shop/api-v2\"}"
        ) >= 6.0
    );

    step.to("A failing endpoint is ejected after 5 failures (round robin); the others carry on");
    set_mode(&mode("server-0"), "fail");
    let r = load(&t, "/", 120, &[]);
    let failed = counts(&r, "statuses").get("503").copied().unwrap_or(0);
    assert_eq!(failed, 5, "5 consecutive failures eject: {r}");
    assert_eq!(counts(&r, "pods").get("server-0"), Some(&5), "{r}");
    assert!(
        metric(
            &t,
            'a',
            "signet_http_endpoint_ejections_total{service=\"shop/api\"}"
        ) >= 1.0
    );

    step.to("Fixed, it comes back after its backoff");
    set_mode(&mode("server-0"), "ok");
    let fixed_at = Instant::now();
    let back = wait_for("server-0 to serve again after its backoff", || {
        let r = load(&t, "/", 30, &[]);
        assert_eq!(counts(&r, "statuses").get("200"), Some(&30), "{r}");
        counts(&r, "pods")
            .contains_key("server-0")
            .then(|| fixed_at.elapsed())
    });
    assert!(back < Duration::from_secs(3), "back after {back:?}");

    step.to("A 503 is retried onto another endpoint: the client sees 200");
    // The endpoint on the client's own node, the quickest, is the one drawn most: it fails.
    set_mode(&mode("api-a1"), "fail");
    let retries = |t: &Topology| metric(t, 'a', "signet_http_retries_total{service=\"shop/api\"}");
    let before = retries(&t);
    let r = load(&t, "/retry", 60, &[]);
    assert_eq!(counts(&r, "statuses").get("200"), Some(&60), "{r}");
    assert!(!counts(&r, "pods").contains_key("api-a1"), "{r}");
    assert!(
        retries(&t) > before,
        "retried: {} then {}",
        before,
        retries(&t)
    );
    set_mode(&mode("api-a1"), "ok");

    step.to("An egress `http` rule answers 403 at the source; what it allows passes");
    let policy = "\
apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: client-egress, namespace: shop}
spec:
  selector: {matchLabels: {app: client}}
  egress:
  - to: [{identity: spiffe://cluster.local/ns/shop/sa/server}, {identity: spiffe://cluster.local/ns/shop/sa/api}]
    ports: [{port: 8080, protocol: TCP}, {port: 8081, protocol: TCP}]
    http: [{methods: [GET], paths: [{prefix: /public}]}]
";
    t.write_state(&state(&t, &pods, &format!("{TRAFFIC}---\n{policy}")));
    t.settle();
    let r = load(&t, "/public/x", 10, &[]);
    assert_eq!(counts(&r, "statuses").get("200"), Some(&10), "{r}");
    let r = load(&t, "/private", 3, &[]);
    assert_eq!(counts(&r, "statuses").get("403"), Some(&3), "{r}");
    assert!(
        r["sample"]
            .as_str()
            .is_some_and(|s| s.contains("egress policy")),
        "the refusal names the egress policy: {r}"
    );
    let r = load(&t, "/public/x", 3, &["--method", "POST"]);
    assert_eq!(counts(&r, "statuses").get("403"), Some(&3), "{r}");

    step.to("The same rules hold on a connection to a pod no route governs: it is parsed too");
    let direct = format!("http://{}:8080", t.pod_ip('b'));
    let r = client(
        &t,
        &[
            "load",
            "--url",
            &format!("{direct}/public/ok"),
            "--count",
            "3",
        ],
    );
    assert_eq!(counts(&r, "statuses").get("200"), Some(&3), "{r}");
    let r = client(
        &t,
        &[
            "load",
            "--url",
            &format!("{direct}/private"),
            "--count",
            "2",
        ],
    );
    assert_eq!(counts(&r, "statuses").get("403"), Some(&2), "{r}");
    for attack in ["/public/../private", "/public%2F..%2Fprivate", "//private"] {
        let r = client(
            &t,
            &[
                "load",
                "--url",
                &format!("{direct}{attack}"),
                "--count",
                "1",
            ],
        );
        assert!(
            !counts(&r, "statuses").contains_key("200"),
            "{attack} must not pass the egress rule: {r}"
        );
    }
    // Bytes that are no HTTP cannot be checked: the source's proxy answers 400, the pod never
    // sees them.
    let raw = t.client(&format!("{}:8080", t.pod_ip('b')));
    assert!(
        raw["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.1 400")),
        "a raw stream is not let past an egress `http` rule: {raw}"
    );

    step.to("The requests are counted by route, method and code, and logged with their path");
    let ok = metric(
        &t,
        'a',
        "signet_http_requests_total{source=\"spiffe://cluster.local/ns/shop/sa/client\"",
    );
    assert!(ok >= 700.0, "{ok}");
    let (_, flows) = t.admin_get('a', "/flows");
    assert!(
        flows.contains("\"path\":\"/private\"") && flows.contains("\"status\":403"),
        "{flows}"
    );
}
