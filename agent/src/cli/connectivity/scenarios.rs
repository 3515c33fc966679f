//! The scenarios, phase by phase. Pods (see `local::PODS`): `client`, `client2` and `echo-same`
//! on the first node, `echo-other` and `peer-client` (in the peer namespace) on the second;
//! `echo` is a Service in front of `echo-other`, reached from outside through the suite's
//! Gateway; `outside` is a machine that is not in the mesh, with two addresses, serving on
//! `WORLD_PORT`; the first node's host serves on `HOST_PORT`. Servers answer HTTP and echo TCP on
//! 8080 and 8081 and UDP on 9000.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::local::{HOST_PORT, Names, PODS, Src, WORLD_PORT};
use super::{Check, Env, Failure, Mode, Phase, Policies, Scenario, poll};
use crate::cli::echo::Exchange;

/// Where a probe goes.
#[derive(Debug, Clone, Copy)]
enum To {
    Pod(&'static str, u16),
    /// The `echo` Service's ClusterIP, port 80.
    Service,
    /// One of the outside machine's two addresses.
    World(usize),
    /// The first node's own address.
    Host,
    /// The suite's Gateway on the first node, with its hostname.
    Gateway,
}

impl To {
    fn addr(self, env: &Env) -> SocketAddr {
        match self {
            To::Pod(p, port) => SocketAddr::from((env.pod_ip(p), port)),
            To::Service => SocketAddr::from((env.service_ip, 80)),
            To::World(i) => SocketAddr::from((
                env.outside
                    .map_or(std::net::Ipv4Addr::UNSPECIFIED, |o| o[i]),
                WORLD_PORT,
            )),
            To::Host => SocketAddr::from((env.nodes[0].address, HOST_PORT)),
            To::Gateway => SocketAddr::from((env.nodes[0].address, env.gateway_port)),
        }
    }
    /// Who answers when it works.
    fn answerer(self) -> &'static str {
        match self {
            To::Pod(p, _) => p,
            To::Service | To::Gateway => "echo-other",
            To::World(_) => "outside",
            To::Host => "host",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum How {
    Http(&'static str, &'static str, Option<&'static str>),
    /// A TCP stream of this many bytes, echoed.
    Stream(usize),
    Udp,
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Status(u16),
    /// Echoed byte for byte (a stream or a datagram).
    Echo,
    /// No answer: dropped, reset or refused at connect.
    Refused,
    /// The Gateway answers itself with a 5xx: the backend refused it.
    GatewayRefused,
}

fn get(path: &'static str) -> How {
    How::Http("GET", path, None)
}

/// Whether a failed exchange failed the way a refusal does (dropped, reset, refused, EPERM, or
/// closed before an answer), not because the client itself could not run.
fn refused_by_the_network(e: &Exchange) -> bool {
    const SEEN: [&str; 7] = [
        "connect: ",
        "send: ",
        "reset",
        "timed out",
        "eof",
        "EPERM",
        "refused",
    ];
    e.error
        .as_deref()
        .is_some_and(|err| SEEN.iter().any(|s| err.starts_with(s)))
}

/// What an exchange came to, in a few words.
fn seen(e: &Exchange) -> String {
    match (e.ok, e.status, &e.error) {
        (true, Some(s), _) => match &e.pod {
            Some(p) => format!("HTTP {s} from {p}"),
            None => format!("HTTP {s}"),
        },
        (true, None, _) => match &e.pod {
            Some(p) => format!("echoed by {p}"),
            None => "echoed".into(),
        },
        (false, _, Some(err)) => err.clone(),
        (false, _, None) => "no answer".into(),
    }
}

fn probe(from: Src<'static>, to: To, how: How, want: Want) -> Check {
    Box::new(move |env| {
        if env.outside.is_none() && (matches!(from, Src::Outside) || matches!(to, To::World(_))) {
            return Err(Failure::Skipped(
                "no machine outside the cluster to run it from or to (give --outside ADDR,ADDR)"
                    .into(),
            ));
        }
        let mut args: Vec<String> = vec!["--connect".into(), to.addr(env).to_string()];
        match how {
            How::Http(method, path, header) => {
                args.extend(["--http".into(), format!("{method} {path}")]);
                if let Some(h) = header {
                    args.extend(["--header".into(), h.into()]);
                }
                if matches!(to, To::Gateway) {
                    args.extend(["--host".into(), env.names.gateway_host()]);
                }
            }
            How::Stream(n) => args.extend(["--bytes".into(), n.to_string()]),
            How::Udp => args.push("--udp".into()),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = env.client(from, &args);
        let what = seen(&e);
        let right_pod = e.pod.as_deref().is_none_or(|p| p == to.answerer());
        match want {
            Want::Status(s) if e.ok && e.status == Some(s) && right_pod => Ok(what),
            Want::Status(s) => Err(Failure::Failed(format!(
                "expected HTTP {s} from {}, got {what}",
                to.answerer()
            ))),
            Want::Echo if e.ok && right_pod => Ok(what),
            Want::Echo => Err(Failure::Failed(format!(
                "expected an echo from {}, got {what}",
                to.answerer()
            ))),
            Want::Refused if !e.ok && refused_by_the_network(&e) => Ok(format!("refused ({what})")),
            Want::Refused => Err(Failure::Failed(format!("expected refused, got {what}"))),
            Want::GatewayRefused if e.status.is_some_and(|s| (500..=504).contains(&s)) => Ok(
                format!("the Gateway answered {what}: the backend refused it"),
            ),
            Want::GatewayRefused => Err(Failure::Failed(format!(
                "expected the Gateway's 5xx (its identity refused), got {what}"
            ))),
        }
    })
}

/// `check`, where `node` runs strict mTLS (plaintext from outside the mesh is dropped only
/// there).
fn strict_only(node: usize, check: Check) -> Check {
    Box::new(move |env| {
        if !env.strict.get(node).copied().unwrap_or(false) {
            return Err(Failure::Skipped(format!(
                "{} runs permissive mTLS: plaintext is let in there",
                env.nodes[node].name
            )));
        }
        check(env)
    })
}

/// `check`, where an uncaptured process can run in a pod's own network namespace (the local
/// topology). In a cluster it is a process of the node's host network, which may reach its own
/// node's pods in plaintext (the kubelet's probes do).
fn in_pod_namespace(check: Check) -> Check {
    Box::new(move |env| {
        if !env.uncaptured_in_pod {
            return Err(Failure::Skipped(
                "no process can run in a pod's namespace outside its cgroup here; the node's own \
                 processes may reach its pods (the kubelet's probes)"
                    .into(),
            ));
        }
        check(env)
    })
}

fn s(phase: &str, name: &str, check: Check) -> Scenario {
    Scenario {
        name: format!("{phase}/{name}"),
        check,
    }
}

/// An IdentityPolicy of the suite: `spec` holds the lines after `selector` (two-space indent).
fn policy(ns: &str, name: &str, app: &str, spec: &str) -> String {
    format!(
        "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n{spec}---\n"
    )
}

fn none() -> Policies {
    Box::new(|_| String::new())
}

fn fixed(text: String) -> Policies {
    Box::new(move |_| text.clone())
}

fn unique(what: &str) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("/{what}-{t:x}")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Makes a request with a unique path, then waits for a node's flow log to show it with
/// `verdict`; passes with the flow's rule, which must contain `rule_says` when given.
fn flow_shows(
    from: &'static str,
    method: &'static str,
    answer: u16,
    verdict: &'static str,
    rule_says: Option<&'static str>,
) -> Check {
    Box::new(move |env| {
        let path = unique("flow");
        let (since, addr) = (
            now_ms().saturating_sub(1000),
            To::Pod("echo-other", 8080).addr(env).to_string(),
        );
        let request = format!("{method} {path}");
        let e = env.client(Src::Pod(from), &["--connect", &addr, "--http", &request]);
        if e.status != Some(answer) {
            return Err(Failure::Failed(format!(
                "the request for the flow got {}, not HTTP {answer}",
                seen(&e)
            )));
        }
        // The inbound side knows the source by its identity; the outbound side by its pod.
        let want_src = env.pod_ref(from);
        let want_id = PODS
            .iter()
            .find(|p| p.name == from)
            .map(|p| env.names.id(p.sa))
            .unwrap_or_default();
        let want_dst = env.pod_ref("echo-other");
        let mut last = String::from("no flow from it");
        let found = poll(Duration::from_secs(5), || {
            for node in 0..env.nodes.len() {
                let flows = match env.flows(node, since) {
                    Ok(f) => f,
                    Err(err) => {
                        last = err;
                        continue;
                    }
                };
                let hit = flows.iter().find(|f| {
                    f.verdict == verdict
                        && (f.source.pod.as_deref() == Some(want_src.as_str())
                            || f.source.identity == want_id)
                        && f.destination.pod.as_deref() == Some(want_dst.as_str())
                        && f.http.as_ref().is_none_or(|h| h.path == path)
                        && (verdict != "forwarded" || f.reporter == "inbound")
                });
                if let Some(f) = hit {
                    return Some((env.nodes[node].name.clone(), f.clone()));
                }
            }
            None
        });
        match found {
            Some((node, f))
                if rule_says
                    .is_some_and(|r| !f.rule.as_deref().is_some_and(|got| got.contains(r))) =>
            {
                Err(Failure::Failed(format!(
                    "{node} recorded the {verdict} flow with rule {:?}, expected one naming `{}`",
                    f.rule,
                    rule_says.unwrap_or_default()
                )))
            }
            Some((node, f)) => Ok(format!(
                "{node} recorded it: {} → {} {verdict}{}",
                f.source.identity,
                f.destination
                    .pod
                    .as_deref()
                    .unwrap_or(&f.destination.identity),
                f.rule.map(|r| format!(" by {r}")).unwrap_or_default()
            )),
            None => Err(Failure::Failed(format!(
                "no {verdict} flow from {want_src} for {path} within 5 s (the request got {}; {last})",
                seen(&e)
            ))),
        }
    })
}

/// Traffic between the nodes while a pod makes a request with a unique path: the path never
/// shows on the underlay, and the HBONE port carries it.
fn underlay_tls_only() -> Check {
    Box::new(|env| {
        let path = unique("underlay");
        let addr = To::Pod("echo-other", 8080).addr(env).to_string();
        let mut got = None;
        let capture = env
            .capture_underlay(1, path.as_bytes(), || {
                let request = format!("GET {path}");
                got = Some(env.client(
                    Src::Pod("client"),
                    &["--connect", &addr, "--http", &request],
                ));
            })
            .map_err(Failure::Skipped)?;
        let got = got.map(|e| seen(&e)).unwrap_or_default();
        if capture.marker_seen {
            return Err(Failure::Failed(format!(
                "the request's path was seen in plaintext on {}'s underlay ({got})",
                env.nodes[1].name
            )));
        }
        if capture.hbone == 0 || !got.starts_with("HTTP 200") {
            return Err(Failure::Failed(format!(
                "expected the request over HBONE (port 15008), saw {} frames, {} on 15008; the request got {got}",
                capture.frames, capture.hbone
            )));
        }
        Ok(format!(
            "{got}; {} frames on the underlay, {} on 15008, none with the path in clear",
            capture.frames, capture.hbone
        ))
    })
}

/// A connection held across a policy change that no longer allows it.
fn held_connection_closed(closing: String) -> Check {
    Box::new(move |env| {
        let addr = To::Pod("echo-other", 8080).addr(env).to_string();
        let mut held = env
            .spawn_client(
                Src::Pod("client"),
                &["--connect", &addr, "--http", "GET /held", "--hold"],
            )
            .map_err(Failure::Failed)?;
        let first = held.next_line().map_err(Failure::Failed)?;
        if first["held"] != true {
            return Err(Failure::Failed(format!(
                "the connection was not made: {first}"
            )));
        }
        env.apply_policies(&closing).map_err(Failure::Failed)?;
        if !held.ended_within(Duration::from_secs(10)) {
            return Err(Failure::Failed(
                "the held connection was still answered 10 s after the policy stopped allowing it"
                    .into(),
            ));
        }
        let last = held.finish().map_err(Failure::Failed)?;
        Ok(format!(
            "closed after {} answered requests ({})",
            last.requests,
            last.ended.unwrap_or_default()
        ))
    })
}

/// The serial of `id`'s certificate on `node`, and its notAfter.
fn serial(env: &Env, node: usize, id: &str) -> Option<(String, u64)> {
    let state = env.debug_state(node).ok()?;
    let entry = state["identities"]
        .as_array()?
        .iter()
        .find(|i| i["identity"] == id)?
        .clone();
    Some((
        entry["serial"].as_str()?.to_owned(),
        entry["notAfter"].as_u64()?,
    ))
}

/// New connections every 100 ms between two pods of their own while both sides' certificates
/// are renewed; none may fail.
fn rotation_under_traffic() -> Check {
    Box::new(|env| {
        let (client_id, server_id) = (env.names.id("rot-client"), env.names.id("rot-echo"));
        let (cn, sn) = (env.pod_node("rot-client"), env.pod_node("rot-echo"));
        let first = poll(Duration::from_secs(10), || {
            Some((serial(env, cn, &client_id)?, serial(env, sn, &server_id)?))
        })
        .ok_or_else(|| Failure::Failed("the rotation pods hold no certificates".into()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = first.0.1.max(first.1.1).saturating_sub(now);
        if left > 150 {
            return Err(Failure::Skipped(format!(
                "the certificates here live {left} s more; renewal (at half-life) would take minutes \
                 (the demo's agents ask for 60 s SVIDs)"
            )));
        }
        let addr = To::Pod("rot-echo", 8080).addr(env).to_string();
        let traffic = env
            .spawn_client(
                Src::Pod("rot-client"),
                &[
                    "--connect",
                    &addr,
                    "--http",
                    "GET /rotation",
                    "--repeat-ms",
                    "100",
                ],
            )
            .map_err(Failure::Failed)?;
        let rotated = poll(Duration::from_secs(left + 15), || {
            let now = (serial(env, cn, &client_id)?, serial(env, sn, &server_id)?);
            (now.0.0 != first.0.0 && now.1.0 != first.1.0).then_some(now)
        });
        let report = traffic.finish().map_err(Failure::Failed)?;
        let Some(now) = rotated else {
            return Err(Failure::Failed(format!(
                "both certificates were not renewed within {} s",
                left + 15
            )));
        };
        if !report.ok || report.requests < 10 {
            return Err(Failure::Failed(format!(
                "{} of {} requests failed during the rotation (first: {})",
                report.failures,
                report.requests + report.failures,
                report.error.unwrap_or_default()
            )));
        }
        Ok(format!(
            "{} requests, none failed, while {} went {} → {} and {} went {} → {}",
            report.requests, client_id, first.0.0, now.0.0, server_id, first.1.0, now.1.0
        ))
    })
}

pub fn phases(n: &Names) -> Vec<Phase> {
    use Src::{Outside, Pod, Uncaptured};
    use Want::{Echo, GatewayRefused, Refused, Status};
    let (ns, peer) = (n.ns.as_str(), n.peer_ns.as_str());
    let ok = Status(200);
    let other = To::Pod("echo-other", 8080);
    let same = To::Pod("echo-same", 8080);
    let from_ids = |ids: &[&str]| {
        ids.iter()
            .map(|sa| format!("{{identity: {}}}", n.id(sa)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let allow_on_other = |ids: &[&str]| {
        policy(
            ns,
            "echo-other",
            "echo-other",
            &format!(
                "  ingress:\n  - from: [{}]\n    ports: [{{port: 8080}}]\n",
                from_ids(ids)
            ),
        )
    };

    let p = "no-policy";
    let no_policy = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: none(),
        scenarios: vec![
            s(
                p,
                "pod-to-pod-same-node",
                probe(Pod("client"), same, get("/"), ok),
            ),
            s(
                p,
                "pod-to-pod-cross-node",
                probe(Pod("client"), other, get("/"), ok),
            ),
            s(
                p,
                "pod-to-service",
                probe(Pod("client"), To::Service, get("/"), ok),
            ),
            s(
                p,
                "tcp-stream-byte-exact",
                probe(
                    Pod("client"),
                    To::Pod("echo-other", 8081),
                    How::Stream(256 * 1024),
                    Echo,
                ),
            ),
            s(
                p,
                "udp-cross-node",
                probe(Pod("client"), To::Pod("echo-other", 9000), How::Udp, Echo),
            ),
            s(
                p,
                "udp-same-node",
                probe(Pod("client"), To::Pod("echo-same", 9000), How::Udp, Echo),
            ),
            s(
                p,
                "pod-to-world",
                probe(Pod("client"), To::World(0), get("/"), ok),
            ),
            s(
                p,
                "pod-to-host",
                probe(Pod("client"), To::Host, get("/"), ok),
            ),
            s(
                p,
                "peer-namespace-cross-node",
                probe(Pod("peer-client"), same, get("/"), ok),
            ),
            s(
                p,
                "outside-to-gateway",
                probe(Outside, To::Gateway, get("/"), ok),
            ),
            s(p, "underlay-carries-tls-only", underlay_tls_only()),
            s(
                p,
                "strict-drops-plaintext-from-outside",
                strict_only(1, probe(Outside, other, get("/"), Refused)),
            ),
            s(
                p,
                "strict-drops-plaintext-from-an-uncaptured-process",
                strict_only(1, probe(Uncaptured("client"), other, get("/"), Refused)),
            ),
            s(
                p,
                "strict-drops-plaintext-from-an-uncaptured-process-same-node",
                in_pod_namespace(strict_only(
                    0,
                    probe(Uncaptured("client"), same, get("/"), Refused),
                )),
            ),
            s(
                p,
                "flow-recorded",
                flow_shows("client", "GET", 200, "forwarded", Some("default allow")),
            ),
        ],
    };

    let p = "allow-all";
    let allow_all = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(
            policy(
                ns,
                "echo-other",
                "echo-other",
                "  ingress:\n  - from: [{entity: any}]\n",
            ) + &policy(
                ns,
                "client",
                "client",
                "  egress:\n  - to: [{entity: any}]\n",
            ),
        ),
        scenarios: vec![
            s(
                p,
                "pod-to-pod-cross-node",
                probe(Pod("client"), other, get("/"), ok),
            ),
            s(
                p,
                "other-identity",
                probe(Pod("client2"), other, get("/"), ok),
            ),
            s(
                p,
                "pod-to-world",
                probe(Pod("client"), To::World(0), get("/"), ok),
            ),
        ],
    };

    let p = "default-deny-ingress";
    let deny_ingress = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(ns, "echo-other", "echo-other", "  ingress: []\n")),
        scenarios: vec![
            s(
                p,
                "pod-to-pod-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "pod-to-service-refused",
                probe(Pod("client"), To::Service, get("/"), Refused),
            ),
            s(
                p,
                "udp-refused",
                probe(
                    Pod("client"),
                    To::Pod("echo-other", 9000),
                    How::Udp,
                    Refused,
                ),
            ),
            s(
                p,
                "gateway-refused",
                probe(Outside, To::Gateway, get("/"), GatewayRefused),
            ),
            s(
                p,
                "unselected-pod-reachable",
                probe(Pod("client"), same, get("/"), ok),
            ),
        ],
    };

    let p = "default-deny-egress";
    let deny_egress = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(ns, "client", "client", "  egress: []\n")),
        scenarios: vec![
            s(
                p,
                "to-pod-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "to-service-refused",
                probe(Pod("client"), To::Service, get("/"), Refused),
            ),
            s(
                p,
                "to-world-refused",
                probe(Pod("client"), To::World(0), get("/"), Refused),
            ),
            s(
                p,
                "udp-refused",
                probe(
                    Pod("client"),
                    To::Pod("echo-other", 9000),
                    How::Udp,
                    Refused,
                ),
            ),
            s(
                p,
                "unselected-pod-unaffected",
                probe(Pod("client2"), other, get("/"), ok),
            ),
        ],
    };

    let p = "allow-by-identity";
    let by_identity = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(
            allow_on_other(&["client"])
                + &policy(
                    ns,
                    "echo-same",
                    "echo-same",
                    &format!(
                        "  ingress:\n  - from: [{{identity: 'spiffe://{}/ns/{ns}/sa/*'}}]\n",
                        n.td
                    ),
                ),
        ),
        scenarios: vec![
            s(
                p,
                "named-identity-allowed",
                probe(Pod("client"), other, get("/"), ok),
            ),
            s(
                p,
                "other-identity-refused",
                probe(Pod("client2"), other, get("/"), Refused),
            ),
            s(
                p,
                "other-port-refused",
                probe(
                    Pod("client"),
                    To::Pod("echo-other", 8081),
                    How::Stream(16),
                    Refused,
                ),
            ),
            s(
                p,
                "wildcard-same-namespace-allowed",
                probe(Pod("client2"), same, get("/"), ok),
            ),
            s(
                p,
                "wildcard-other-namespace-refused",
                probe(Pod("peer-client"), same, get("/"), Refused),
            ),
            s(
                p,
                "gateway-refused-until-named",
                probe(Outside, To::Gateway, get("/"), GatewayRefused),
            ),
        ],
    };

    let p = "allow-gateway-by-name";
    let gateway_named = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(
            ns,
            "echo-other",
            "echo-other",
            &format!(
                "  ingress:\n  - from: [{}, {{gateway: {{namespace: {ns}, name: echo}}}}]\n    ports: [{{port: 8080}}]\n",
                from_ids(&["client"])
            ),
        )),
        scenarios: vec![
            s(
                p,
                "named-gateway-allowed",
                probe(Outside, To::Gateway, get("/"), ok),
            ),
            s(
                p,
                "other-identity-still-refused",
                probe(Pod("client2"), other, get("/"), Refused),
            ),
        ],
    };

    let p = "allow-by-namespace";
    let by_namespace = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(
            ns,
            "echo-other",
            "echo-other",
            "  ingress:\n  - from: [{namespaceSelector: {matchLabels: {signet.dev/connectivity: peer}}}]\n",
        )),
        scenarios: vec![
            s(
                p,
                "matching-namespace-allowed",
                probe(Pod("peer-client"), other, get("/"), ok),
            ),
            s(
                p,
                "other-namespace-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
        ],
    };

    let p = "egress-entities";
    let egress_entities = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(
            policy(
                ns,
                "client",
                "client",
                "  egress:\n  - to: [{entity: host}]\n",
            ) + &policy(
                ns,
                "client2",
                "client2",
                "  egress:\n  - to: [{entity: world}]\n",
            ) + &policy(
                peer,
                "peer-client",
                "peer-client",
                "  egress:\n  - to: [{entity: cluster}]\n",
            ),
        ),
        scenarios: vec![
            s(
                p,
                "host-allowed",
                probe(Pod("client"), To::Host, get("/"), ok),
            ),
            s(
                p,
                "host-rule-refuses-world",
                probe(Pod("client"), To::World(0), get("/"), Refused),
            ),
            s(
                p,
                "host-rule-refuses-pods",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "world-allowed",
                probe(Pod("client2"), To::World(0), get("/"), ok),
            ),
            s(
                p,
                "world-rule-refuses-pods",
                probe(Pod("client2"), other, get("/"), Refused),
            ),
            s(
                p,
                "cluster-allowed",
                probe(Pod("peer-client"), same, get("/"), ok),
            ),
            s(
                p,
                "cluster-rule-refuses-world",
                probe(Pod("peer-client"), To::World(0), get("/"), Refused),
            ),
        ],
    };

    let p = "ingress-entities";
    let ingress_entities = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(
            policy(
                ns,
                "echo-other",
                "echo-other",
                "  ingress:\n  - from: [{entity: gateway}]\n",
            ) + &policy(
                ns,
                "echo-same",
                "echo-same",
                "  ingress:\n  - from: [{entity: cluster}]\n",
            ),
        ),
        scenarios: vec![
            s(
                p,
                "gateway-entity-allowed",
                probe(Outside, To::Gateway, get("/"), ok),
            ),
            s(
                p,
                "gateway-entity-refuses-pods",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "cluster-entity-allowed",
                probe(Pod("peer-client"), same, get("/"), ok),
            ),
        ],
    };

    let p = "deny-wins";
    let deny_wins = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(
            allow_on_other(&["client", "client2"])
                + &policy(
                    ns,
                    "echo-other-deny",
                    "echo-other",
                    &format!("  ingressDeny:\n  - from: [{}]\n", from_ids(&["client"])),
                ),
        ),
        scenarios: vec![
            s(
                p,
                "denied-identity-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "allowed-identity-passes",
                probe(Pod("client2"), other, get("/"), ok),
            ),
        ],
    };

    let p = "l7";
    let l7 = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(
            ns,
            "echo-other",
            "echo-other",
            &format!(
                "  ingress:\n  - from: [{}]\n    ports: [{{port: 8080}}]\n    http:\n\
                 \x20   - {{methods: [GET], paths: [{{prefix: /public}}]}}\n\
                 \x20   - {{methods: [GET], paths: [{{exact: /private}}], headers: [{{name: x-connectivity, value: let-me-in}}]}}\n",
                from_ids(&["client"])
            ),
        )),
        scenarios: vec![
            s(
                p,
                "method-and-path-allowed",
                probe(Pod("client"), other, get("/public/a"), ok),
            ),
            s(
                p,
                "method-refused-403",
                probe(
                    Pod("client"),
                    other,
                    How::Http("POST", "/public/a", None),
                    Status(403),
                ),
            ),
            s(
                p,
                "path-refused-403",
                probe(Pod("client"), other, get("/elsewhere"), Status(403)),
            ),
            s(
                p,
                "header-allowed",
                probe(
                    Pod("client"),
                    other,
                    How::Http("GET", "/private", Some("x-connectivity: let-me-in")),
                    ok,
                ),
            ),
            s(
                p,
                "header-missing-403",
                probe(Pod("client"), other, get("/private"), Status(403)),
            ),
            s(
                p,
                "header-wrong-value-403",
                probe(
                    Pod("client"),
                    other,
                    How::Http("GET", "/private", Some("x-connectivity: nope")),
                    Status(403),
                ),
            ),
            s(
                p,
                "dot-segments-do-not-escape-403",
                probe(Pod("client"), other, get("/public/../private"), Status(403)),
            ),
            s(
                p,
                "denial-in-flow-log",
                flow_shows(
                    "client",
                    "POST",
                    403,
                    "l7-denied",
                    Some("echo-other ingress[0]"),
                ),
            ),
        ],
    };

    let p = "audit";
    let audit = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(
            ns,
            "echo-other",
            "echo-other",
            &format!(
                "  mode: audit\n  ingress:\n  - from: [{}]\n    ports: [{{port: 8080}}]\n",
                from_ids(&["client"])
            ),
        )),
        scenarios: vec![
            s(
                p,
                "would-be-refused-is-allowed",
                probe(Pod("client2"), other, get("/"), ok),
            ),
            s(
                p,
                "reported-as-audit",
                flow_shows(
                    "client2",
                    "GET",
                    200,
                    "audit",
                    Some("default deny (audit mode)"),
                ),
            ),
        ],
    };

    let p = "cidr-egress";
    let cidr = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: {
            let ns = ns.to_owned();
            Box::new(move |env: &Env| {
                policy(
                    &ns,
                    "client",
                    "client",
                    &format!(
                        "  egress:\n  - to: [{{cidr: {}/32}}]\n    ports: [{{port: {WORLD_PORT}}}]\n",
                        env.outside
                            .map_or(std::net::Ipv4Addr::UNSPECIFIED, |o| o[0])
                    ),
                )
            })
        },
        scenarios: vec![
            s(
                p,
                "listed-prefix-allowed",
                probe(Pod("client"), To::World(0), get("/"), ok),
            ),
            s(
                p,
                "other-world-address-refused",
                probe(Pod("client"), To::World(1), get("/"), Refused),
            ),
            s(
                p,
                "cluster-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
        ],
    };

    let p = "udp";
    let udp = Phase {
        name: p,
        mode: Mode::Concurrent,
        policies: fixed(policy(
            ns,
            "echo-other",
            "echo-other",
            &format!(
                "  ingress:\n  - from: [{}]\n    ports: [{{port: 9000, protocol: UDP}}]\n  - from: [{}]\n    ports: [{{port: 8080}}]\n",
                from_ids(&["client"]),
                from_ids(&["client2"])
            ),
        )),
        scenarios: vec![
            s(
                p,
                "allowed-identity",
                probe(Pod("client"), To::Pod("echo-other", 9000), How::Udp, Echo),
            ),
            s(
                p,
                "other-identity-refused",
                probe(
                    Pod("client2"),
                    To::Pod("echo-other", 9000),
                    How::Udp,
                    Refused,
                ),
            ),
            s(
                p,
                "udp-rule-does-not-open-tcp",
                probe(Pod("client"), other, get("/"), Refused),
            ),
        ],
    };

    let p = "policy-change";
    let policy_change = Phase {
        name: p,
        mode: Mode::Serial,
        policies: fixed(allow_on_other(&["client", "client2"])),
        scenarios: vec![
            s(
                p,
                "held-connection-closed",
                held_connection_closed(allow_on_other(&["client2"])),
            ),
            s(
                p,
                "new-connection-refused",
                probe(Pod("client"), other, get("/"), Refused),
            ),
            s(
                p,
                "identity-still-allowed-passes",
                probe(Pod("client2"), other, get("/"), ok),
            ),
        ],
    };

    let p = "agent-restart";
    let down = |check: Check| -> Check {
        Box::new(move |env| {
            if !env.agent_stays_down {
                return Err(Failure::Skipped(
                    "its DaemonSet replaces a deleted agent pod at once: there is no window while it is down"
                        .into(),
                ));
            }
            if !env.agent_down(1) {
                return Err(Failure::Skipped(format!(
                    "{}'s agent is not down",
                    env.nodes[1].name
                )));
            }
            check(env)
        })
    };
    let agent_restart = Phase {
        name: p,
        mode: Mode::Disturbing,
        policies: fixed(allow_on_other(&["client"])),
        scenarios: vec![
            s(
                p,
                "agent-stopped",
                Box::new(|env| {
                    env.stop_agent(1).map_err(Failure::Skipped)?;
                    Ok(format!("{}'s agent stopped", env.nodes[1].name))
                }),
            ),
            s(
                p,
                "kernel-drops-plaintext-while-down",
                down(strict_only(
                    1,
                    probe(Uncaptured("client"), other, get("/"), Refused),
                )),
            ),
            s(
                p,
                "outside-plaintext-dropped-while-down",
                down(strict_only(1, probe(Outside, other, get("/"), Refused))),
            ),
            s(
                p,
                "mesh-fails-closed-while-down",
                down(probe(Pod("client"), other, get("/"), Refused)),
            ),
            s(
                p,
                "agent-back-and-ok",
                Box::new(|env| {
                    if !env.agent_down(1) {
                        return Err(Failure::Skipped("it was not stopped".into()));
                    }
                    env.start_agent(1).map_err(Failure::Failed)?;
                    Ok(format!(
                        "{}'s agent started; signet status OK",
                        env.nodes[1].name
                    ))
                }),
            ),
            s(
                p,
                "allowed-after-restart",
                probe(Pod("client"), other, get("/"), ok),
            ),
            s(
                p,
                "refused-after-restart",
                probe(Pod("client2"), other, get("/"), Refused),
            ),
        ],
    };

    let p = "certificate-rotation";
    let rotation = Phase {
        name: p,
        mode: Mode::Background,
        policies: none(),
        scenarios: vec![s(p, "under-traffic", rotation_under_traffic())],
    };

    vec![
        rotation,
        no_policy,
        allow_all,
        deny_ingress,
        deny_egress,
        by_identity,
        gateway_named,
        by_namespace,
        egress_entities,
        ingress_entities,
        deny_wins,
        l7,
        audit,
        cidr,
        udp,
        policy_change,
        agent_restart,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_by_the_network_passes_for_refused() {
        let e = |error: &str| Exchange {
            error: Some(error.into()),
            ..Exchange::default()
        };
        for refused in [
            "connect: timed out",
            "reset",
            "send: EPERM",
            "eof before a response",
        ] {
            assert!(refused_by_the_network(&e(refused)), "{refused}");
        }
        for broken in [
            "the client said nothing readable (EOF): netns x: No such file",
            "/bin/signet: No such file or directory",
            "bind: EPERM",
        ] {
            assert!(!refused_by_the_network(&e(broken)), "{broken}");
        }
        assert!(!refused_by_the_network(&Exchange::default()));
    }
}
