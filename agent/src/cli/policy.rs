//! `signet policy validate | explain | compile`.
//!
//! Exit codes: `validate` 0 valid, 1 invalid; `explain` 0 allowed (audit included), 2 denied,
//! 1 bad input; `compile` 0, or 1 on bad input.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use signet_ca::{SpiffeId, TrustDomain};
use signet_policy::cluster::{State, Workload, load_state};
use signet_policy::compile::{self, Compiled, Input};
use signet_policy::eval::{self, Decision, Flow, FlowOutcome, PeerInfo, Verdict};
use signet_policy::identity::{self, IdentityAllocator, MemoryAllocator};
use signet_policy::model::{Policy, Request};
use signet_policy::resource::Protocol;

/// The default policy map size, as the datapath configures it.
pub const DEFAULT_CAPACITY: usize = 65_536;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files; print every error as `file:line:col: reason`.
    Validate {
        /// Files or directories (`*.yaml`, `*.yml`, recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Say whether a flow is allowed, by which policy and rule, in both directions.
    Explain(ExplainArgs),
    /// Print the datapath entries the policies compile to.
    Compile(CompileArgs),
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Cluster-state directory of Kubernetes manifests (Namespaces, Pods, IdentityPolicies).
    #[arg(long)]
    state: PathBuf,
    /// `NS/POD`, a SPIFFE ID, or an entity: host, world, gateway.
    #[arg(long)]
    from: String,
    /// `NS/POD:PORT` or `world:IP:PORT` (IPv6 in brackets), optionally `/tcp`, `/udp` or
    /// `/icmp`.
    #[arg(long)]
    to: String,
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    path: Option<String>,
    /// `NAME=VALUE`, repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

#[derive(Debug, Args)]
pub struct CompileArgs {
    #[arg(long)]
    state: PathBuf,
    /// Only the endpoints (pods) scheduled on this node.
    #[arg(long)]
    node: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Policy map size; more entries is an error.
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    capacity: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Json,
    Table,
}

pub fn run(cmd: PolicyCommand) -> u8 {
    match cmd {
        PolicyCommand::Validate { paths } => validate(&paths),
        PolicyCommand::Explain(args) => match explain(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("signet policy explain: {e}");
                1
            }
        },
        PolicyCommand::Compile(args) => match compile_cmd(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("signet policy compile: {e}");
                1
            }
        },
    }
}

fn validate(paths: &[PathBuf]) -> u8 {
    match signet_policy::parse::load_paths(paths) {
        Ok(policies) => {
            println!("{} IdentityPolicies valid", policies.len());
            0
        }
        Err(diags) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("{} error(s); nothing applied", diags.len());
            1
        }
    }
}

fn load(dir: &std::path::Path, td: &str) -> Result<(TrustDomain, State), String> {
    let td = TrustDomain::parse(td).map_err(|e| format!("--trust-domain `{td}`: {e}"))?;
    let state = load_state(dir, &td).map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        format!(
            "{} is not a valid cluster state:\n{}",
            dir.display(),
            lines.join("\n")
        )
    })?;
    Ok((td, state))
}

/// Numeric identities for a one-shot run: every workload's, in a stable order.
fn identities(state: &State, extra: Option<&SpiffeId>) -> Result<BTreeMap<SpiffeId, u32>, String> {
    let alloc = MemoryAllocator::default();
    let mut ids: Vec<&SpiffeId> = state
        .cluster
        .workloads
        .iter()
        .map(|w| &w.identity)
        .collect();
    ids.extend(extra);
    ids.sort();
    for id in ids {
        alloc.allocate(id).map_err(|e| e.to_string())?;
    }
    alloc.snapshot().map_err(|e| e.to_string())
}

fn find_pod<'a>(state: &'a State, spec: &str) -> Result<&'a Workload, String> {
    let (ns, name) = spec
        .split_once('/')
        .ok_or_else(|| format!("`{spec}` is not NS/POD"))?;
    state
        .cluster
        .workload(ns, name)
        .ok_or_else(|| format!("no pod {ns}/{name} in the cluster state"))
}

enum Source<'a> {
    Pod(&'a Workload),
    Identity(SpiffeId),
    Reserved(u32, &'static str),
}

fn parse_from<'a>(state: &'a State, from: &str) -> Result<Source<'a>, String> {
    if from.starts_with("spiffe://") {
        return SpiffeId::parse(from)
            .map(Source::Identity)
            .map_err(|e| format!("--from `{from}`: {e}"));
    }
    match from {
        "host" => return Ok(Source::Reserved(identity::HOST, "host")),
        "world" => return Ok(Source::Reserved(identity::WORLD, "world")),
        "gateway" => return Ok(Source::Reserved(identity::INGRESS, "gateway")),
        "cluster" | "any" => {
            return Err(format!(
                "--from `{from}` is a group, not one peer; name a pod, a SPIFFE ID, host, world or gateway"
            ));
        }
        _ => {}
    }
    find_pod(state, from)
        .map(Source::Pod)
        .map_err(|e| format!("--from: {e}"))
}

fn parse_to(to: &str) -> Result<(&str, u16, Protocol), String> {
    let (pod, rest) = to
        .rsplit_once(':')
        .ok_or_else(|| format!("--to `{to}` is not NS/POD:PORT[/tcp|/udp|/icmp]"))?;
    let (port, proto) = match rest.split_once('/') {
        Some((p, proto)) => (p, proto),
        None => (rest, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" | "other" => Protocol::Other,
        other => {
            return Err(format!(
                "--to `{to}`: unknown protocol `{other}`; use tcp, udp or icmp (every protocol \
                 without ports, at port 0)"
            ));
        }
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("--to `{to}`: port `{port}` is not 1-65535"))?;
    Ok((pod, port, proto))
}

fn request(args: &ExplainArgs) -> Result<Option<Request>, String> {
    if args.method.is_none() && args.path.is_none() && args.headers.is_empty() {
        return Ok(None);
    }
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(n, v)| (n.trim().to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--header `{h}` is not NAME=VALUE"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(Request {
        method: args
            .method
            .clone()
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase(),
        path: args.path.clone().unwrap_or_else(|| "/".into()),
        headers,
    }))
}

/// A `world:IP` destination's address.
fn world_address(spec: &str) -> Option<Result<std::net::IpAddr, String>> {
    let addr = spec.strip_prefix("world:")?;
    let bare = addr.trim_start_matches('[').trim_end_matches(']');
    Some(
        bare.parse()
            .map_err(|_| format!("--to `{spec}`: `{addr}` is not an IP address")),
    )
}

/// Egress of a pod to a world address: the destination has no policies of its own.
fn explain_world(
    state: &State,
    source: &Source<'_>,
    ip: std::net::IpAddr,
    port: u16,
    proto: Protocol,
) -> Result<u8, String> {
    let Source::Pod(w) = source else {
        return Err("--to world:...: --from must be a pod (only pods have egress policy)".into());
    };
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let peer = PeerInfo {
        number: identity::WORLD,
        id: None,
        cidr: Some(signet_policy::cidr::Cidr::host(ip)),
    };
    let q = eval::Query {
        peer: &peer,
        port,
        proto,
        dir: eval::Direction::Egress,
    };
    let decision = eval::evaluate_direction(&sorted, w, &q, &state.cluster);
    let (verdict, note) = match &decision {
        Decision::Deny(_) => (Verdict::Deny, None),
        Decision::Audit(_) => (Verdict::Audit, None),
        Decision::Allow(_) => (Verdict::Allow, None),
        Decision::L7(_) => (
            Verdict::Deny,
            Some(
                "the proxy does not carry traffic to the world, so its requests cannot be checked",
            ),
        ),
    };
    let addr = std::net::SocketAddr::new(ip, port);
    println!(
        "{verdict}  {} ({}) -> world:{addr}/{}",
        w.key(),
        w.identity,
        proto.name()
    );
    println!(
        "  egress  (source's policies):      {}",
        describe(&decision)
    );
    if let Some(n) = note {
        println!("  denied: {n}");
    }
    println!("  ingress: not checked: the destination is outside the cluster");
    Ok(if verdict == Verdict::Deny { 2 } else { 0 })
}

fn explain(args: &ExplainArgs) -> Result<u8, String> {
    let (_, state) = load(&args.state, &args.trust_domain)?;
    let source = parse_from(&state, &args.from)?;
    let (dst_spec, port, proto) = parse_to(&args.to)?;
    if let Some(ip) = world_address(dst_spec) {
        return explain_world(&state, &source, ip?, port, proto);
    }
    let dst = find_pod(&state, dst_spec).map_err(|e| format!("--to: {e}"))?;
    let req = request(args)?;
    let extra = match &source {
        Source::Identity(id) => Some(id.clone()),
        _ => None,
    };
    let ids = identities(&state, extra.as_ref())?;
    let peer_of = |id: &SpiffeId| PeerInfo {
        number: ids.get(id).copied().unwrap_or(identity::WORLD),
        id: Some(id.clone()),
        cidr: None,
    };
    let (source_workload, source_peer, source_name) = match &source {
        Source::Pod(w) => (
            Some(*w),
            peer_of(&w.identity),
            format!("{} ({})", w.key(), w.identity),
        ),
        Source::Identity(id) => (None, peer_of(id), id.to_string()),
        Source::Reserved(n, name) => (
            None,
            PeerInfo {
                number: *n,
                id: None,
                cidr: None,
            },
            (*name).to_owned(),
        ),
    };
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let dst_peer = peer_of(&dst.identity);
    let outcome = eval::evaluate(
        &state.cluster,
        &sorted,
        &Flow {
            source: source_workload,
            source_peer: &source_peer,
            destination: dst,
            destination_peer: &dst_peer,
            port,
            proto,
            request: req.as_ref(),
        },
    );
    print_outcome(&outcome, &source_name, dst, port, proto, req.as_ref());
    Ok(match outcome.verdict {
        Verdict::Allow | Verdict::Audit => 0,
        Verdict::Deny => 2,
    })
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Allow(r) => format!("allow: {r}"),
        Decision::Deny(r) => format!("deny: {r}"),
        Decision::Audit(r) => format!("allow, audited: would be denied by {r}"),
        Decision::L7(rules) => format!(
            "allow to the proxy; requests must match the `http` rules of {}",
            rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn print_outcome(
    o: &FlowOutcome,
    source: &str,
    dst: &Workload,
    port: u16,
    proto: Protocol,
    req: Option<&Request>,
) {
    println!(
        "{}  {source} -> {}:{port}/{}",
        o.verdict,
        dst.key(),
        proto.name()
    );
    match &o.egress {
        Some(d) => println!("  egress  (source's policies):      {}", describe(d)),
        None => println!(
            "  egress  (source's policies):      not checked: the source is not a pod of this cluster"
        ),
    }
    println!(
        "  ingress (destination's policies): {}",
        describe(&o.ingress)
    );
    match (req, &o.request) {
        (Some(r), Some((dir, Some(rule)))) => {
            println!(
                "  request {} {}: allowed by {rule} ({})",
                r.method,
                r.path,
                dir.name()
            )
        }
        (Some(r), Some((dir, None))) => println!(
            "  request {} {}: denied with HTTP 403: no `http` rule of the {} rules matches",
            r.method,
            r.path,
            dir.name()
        ),
        (Some(_), None) => {
            println!("  request: not inspected (no L7 rule applies to this connection)")
        }
        (None, _) if has_l7(o) => {
            println!("  requests: checked one by one; pass --method/--path/--header to explain one")
        }
        (None, _) => {}
    }
}

fn has_l7(o: &FlowOutcome) -> bool {
    matches!(o.ingress, Decision::L7(_)) || matches!(o.egress, Some(Decision::L7(_)))
}

fn compile_cmd(args: &CompileArgs) -> Result<(), String> {
    let (_, state) = load(&args.state, &args.trust_domain)?;
    let ids = identities(&state, None)?;
    let models: Vec<Policy> = state.policies.iter().map(|l| l.policy.clone()).collect();
    let sorted = compile::sorted_policies(&models);
    let endpoints: Vec<(u32, &Workload)> = state
        .cluster
        .workloads
        .iter()
        .filter(|w| {
            args.node
                .as_ref()
                .is_none_or(|n| w.node.as_ref() == Some(n))
        })
        .enumerate()
        .map(|(i, w)| (i as u32 + 1, w))
        .collect();
    let compiled = compile::compile(&Input {
        cluster: &state.cluster,
        policies: &sorted,
        identities: &ids,
        endpoints: &endpoints,
        capacity: args.capacity,
        previous: None,
    })
    .map_err(|e| e.to_string())?;
    let names: BTreeMap<u32, String> = ids.iter().map(|(id, n)| (*n, id.to_string())).collect();
    match args.format {
        Format::Table => print_table(&compiled, &names),
        Format::Json => println!("{}", to_json(&compiled, &names)),
    }
    Ok(())
}

fn peer_name(n: u32, names: &BTreeMap<u32, String>) -> String {
    identity::reserved_name(n)
        .map(str::to_owned)
        .or_else(|| names.get(&n).cloned())
        .unwrap_or_else(|| format!("#{n}"))
}

fn rule_name(c: &Compiled, id: u32) -> String {
    c.rule(id)
        .map_or_else(|| "default".to_owned(), ToString::to_string)
}

fn print_table(c: &Compiled, names: &BTreeMap<u32, String>) {
    println!(
        "{:<4} {:<28} {:<8} {:<5} {:<46} {:<6} {:<6} RULE",
        "EP", "WORKLOAD", "DIR", "PROTO", "PEER", "PORT", "ACTION"
    );
    for (k, e) in &c.entries {
        let port = if k.port == 0 {
            "*".to_owned()
        } else {
            k.port.to_string()
        };
        println!(
            "{:<4} {:<28} {:<8} {:<5} {:<46} {:<6} {:<6} {}",
            k.endpoint,
            c.endpoints.get(&k.endpoint).map_or("", String::as_str),
            k.direction.name(),
            k.proto.name(),
            format!("{} ({})", peer_name(k.peer, names), k.peer),
            port,
            e.action.name(),
            rule_name(c, e.rule)
        );
    }
    println!(
        "{} entries for {} endpoints",
        c.entries.len(),
        c.endpoints.len()
    );
}

fn to_json(c: &Compiled, names: &BTreeMap<u32, String>) -> String {
    let entries: Vec<serde_json::Value> = c
        .entries
        .iter()
        .map(|(k, e)| {
            serde_json::json!({
                "endpoint": k.endpoint,
                "workload": c.endpoints.get(&k.endpoint),
                "direction": k.direction.name(),
                "protocol": k.proto.number(),
                "peer": k.peer,
                "peerName": peer_name(k.peer, names),
                "port": k.port,
                "action": e.action.name(),
                "rule": e.rule,
                "ruleName": rule_name(c, e.rule),
                "l7Rules": c.l7.get(k),
            })
        })
        .collect();
    let rules: BTreeMap<String, String> = c
        .rules
        .iter()
        .map(|(id, r)| (id.to_string(), r.to_string()))
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "entries": entries,
        "rules": rules,
        "endpoints": c.endpoints,
    }))
    .expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_parsing() {
        assert_eq!(
            parse_to("ns/pod:80").expect("ok"),
            ("ns/pod", 80, Protocol::Tcp)
        );
        assert_eq!(
            parse_to("ns/pod:53/udp").expect("ok"),
            ("ns/pod", 53, Protocol::Udp)
        );
        assert!(parse_to("ns/pod").is_err());
        assert!(parse_to("ns/pod:0").is_err());
        assert!(parse_to("ns/pod:80/sctp").is_err());
    }
}
