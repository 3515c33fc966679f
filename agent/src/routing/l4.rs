//! TCPRoute and TLSRoute at Gateway listeners of protocol `TCP` and `TLS` (mode `Passthrough`):
//! which routes attach to a listener and where their connections go. A TCP listener carries its
//! connections to the backends of its oldest route; a TLS listener reads the ClientHello's server
//! name (the bytes are passed on untouched: the backend terminates TLS with its own
//! certificate) and picks the route whose hostnames match it, exact names before wildcards.

use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::gateways::GatewayListeners;
use gateway_api::tlsroutes::TlsRoute;

use super::model::{
    Condition, ParentRef, Resources, RouteStatus, allowed_namespace, cond, created, granted,
    not_accepted, ns_of, push_route_status,
};

/// One backend of an L4 route: a Service port, with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub weight: u32,
}

/// A TCPRoute or TLSRoute attached to a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Route {
    pub namespace: String,
    pub name: String,
    pub created: i64,
    /// TLSRoute: the server names it serves (lowercase; `*.` wildcards), within the listener's.
    pub hostnames: Vec<String>,
    /// Backends with a weight above 0 that resolve; empty: connections are refused.
    pub backends: Vec<Backend>,
}

/// Which kind of L4 route a listener takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Tls,
}

impl Kind {
    pub fn route_kind(self) -> &'static str {
        match self {
            Kind::Tcp => "TCPRoute",
            Kind::Tls => "TLSRoute",
        }
    }
}

/// A backendRef as written: (group, kind, namespace, name, port, weight).
type RawBackend = (
    String,
    String,
    Option<String>,
    String,
    Option<i32>,
    Option<i32>,
);

/// The fields of a route both kinds have.
struct Raw {
    kind: Kind,
    ns: String,
    name: String,
    created: i64,
    hostnames: Vec<String>,
    parents: Vec<ParentRef>,
    /// Every backendRef of every rule.
    backends: Vec<RawBackend>,
}

/// A TCPRoute or TLSRoute as a [`Raw`]: the generated types differ, the fields do not.
macro_rules! raw {
    ($r:expr, $kind:expr, $hostnames:expr) => {{
        let r = $r;
        let ns = ns_of(&r.metadata);
        Raw {
            kind: $kind,
            name: r.metadata.name.clone().unwrap_or_default(),
            created: created(&r.metadata),
            hostnames: $hostnames,
            parents: r
                .spec
                .parent_refs
                .iter()
                .flatten()
                .map(|p| ParentRef {
                    group: p
                        .group
                        .clone()
                        .unwrap_or_else(|| super::model::GATEWAY_GROUP.into()),
                    kind: p.kind.clone().unwrap_or_else(|| "Gateway".into()),
                    namespace: p.namespace.clone().unwrap_or_else(|| ns.clone()),
                    name: p.name.clone(),
                    section_name: p.section_name.clone(),
                    port: p.port,
                })
                .collect(),
            backends: r
                .spec
                .rules
                .iter()
                .flat_map(|rule| rule.backend_refs.iter())
                .map(|b| {
                    (
                        b.group.clone().unwrap_or_default(),
                        b.kind.clone().unwrap_or_else(|| "Service".into()),
                        b.namespace.clone(),
                        b.name.clone(),
                        b.port,
                        b.weight,
                    )
                })
                .collect(),
            ns,
        }
    }};
}

fn raw_routes(res: &Resources, kind: Kind) -> Vec<Raw> {
    match kind {
        Kind::Tcp => res
            .tcp_routes
            .iter()
            .map(|r: &TcpRoute| raw!(r, Kind::Tcp, vec![]))
            .collect(),
        Kind::Tls => res
            .tls_routes
            .iter()
            .map(|r: &TlsRoute| {
                let names = r
                    .spec
                    .hostnames
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect();
                raw!(r, Kind::Tls, names)
            })
            .collect(),
    }
}

/// Whether server name `name` matches `pattern` (a name or a `*.` wildcard of one label or more).
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|p| p.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => pattern == name,
    }
}

/// The hostnames a TLSRoute serves on a listener: its own, narrowed by the listener's; `None`
/// when they have none in common.
fn on_listener(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(l) = listener else {
        return Some(route.to_vec());
    };
    let common: Vec<String> = route
        .iter()
        .filter_map(|r| {
            if host_matches(l, r) || r == l {
                Some(r.clone())
            } else if host_matches(r, l) || (l.starts_with("*.") && host_matches(r, &l[2..])) {
                Some(l.to_owned())
            } else {
                None
            }
        })
        .collect();
    (!common.is_empty()).then_some(common)
}

/// The routes of `kind` that attach to listener `l` of Gateway `gns/gname`, with each parent's
/// status pushed to `status` (Accepted, ResolvedRefs).
pub fn attach(
    res: &Resources,
    l: &GatewayListeners,
    gns: &str,
    gname: &str,
    kind: Kind,
    status: &mut Vec<RouteStatus>,
) -> Vec<L4Route> {
    let listener_host = l.hostname.as_deref().map(str::to_ascii_lowercase);
    let mut out = Vec::new();
    for r in raw_routes(res, kind) {
        for parent in &r.parents {
            if !parent.is_gateway()
                || parent.namespace != gns
                || parent.name != gname
                || parent.section_name.as_ref().is_some_and(|s| *s != l.name)
                || parent.port.is_some_and(|p| p != l.port)
            {
                continue;
            }
            let refusal = match allowed_namespace(l, gns, &r.ns, &res.namespace_labels) {
                Ok(true) => None,
                Ok(false) => Some(format!(
                    "listener {} does not allow routes from namespace {}",
                    l.name, r.ns
                )),
                Err(why) => Some(format!("listener {}: {why}", l.name)),
            };
            if let Some(why) = refusal {
                push_route_status(
                    status,
                    &r.ns,
                    &r.name,
                    parent.clone(),
                    not_accepted("NotAllowedByListeners", why),
                );
                continue;
            }
            // Routes of the listener's kinds only (`allowedRoutes.kinds`, when given).
            let kinds: Vec<&str> = l
                .allowed_routes
                .as_ref()
                .and_then(|a| a.kinds.as_ref())
                .map(|k| k.iter().map(|k| k.kind.as_str()).collect())
                .unwrap_or_default();
            if !kinds.is_empty() && !kinds.contains(&kind.route_kind()) {
                let why = format!("listener {} does not allow {}s", l.name, kind.route_kind());
                push_route_status(
                    status,
                    &r.ns,
                    &r.name,
                    parent.clone(),
                    not_accepted("NotAllowedByListeners", why),
                );
                continue;
            }
            let hostnames = match kind {
                Kind::Tcp => vec![],
                Kind::Tls => match on_listener(listener_host.as_deref(), &r.hostnames) {
                    Some(h) => h,
                    None => {
                        let why = format!("no hostname in common with listener {}", l.name);
                        push_route_status(
                            status,
                            &r.ns,
                            &r.name,
                            parent.clone(),
                            not_accepted("NoMatchingListenerHostname", why),
                        );
                        continue;
                    }
                },
            };
            let (backends, resolved) = backends(res, &r);
            push_route_status(
                status,
                &r.ns,
                &r.name,
                parent.clone(),
                vec![cond("Accepted", true, "Accepted", ""), resolved],
            );
            out.push(L4Route {
                namespace: r.ns.clone(),
                name: r.name.clone(),
                created: r.created,
                hostnames,
                backends,
            });
        }
    }
    out.sort_by(|a, b| (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name)));
    out.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
    out
}

/// The backends of a route that resolve, and its ResolvedRefs condition.
fn backends(res: &Resources, r: &Raw) -> (Vec<Backend>, Condition) {
    let mut out = Vec::new();
    let mut resolved = cond("ResolvedRefs", true, "ResolvedRefs", "");
    for (group, kind, namespace, name, port, weight) in &r.backends {
        let ns = namespace.clone().unwrap_or_else(|| r.ns.clone());
        if !group.is_empty() || kind != "Service" {
            resolved = cond(
                "ResolvedRefs",
                false,
                "InvalidKind",
                format!("{group}/{kind} {name} is not a Service"),
            );
            continue;
        }
        let route_kind = r.kind.route_kind();
        if ns != r.ns
            && !granted(
                &res.grants,
                (super::model::GATEWAY_GROUP, route_kind, &r.ns),
                ("", "Service", &ns, name),
            )
        {
            resolved = cond(
                "ResolvedRefs",
                false,
                "RefNotPermitted",
                format!(
                    "Service {ns}/{name} is in another namespace and no ReferenceGrant allows it"
                ),
            );
            continue;
        }
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
            resolved = cond(
                "ResolvedRefs",
                false,
                "UnsupportedValue",
                format!("backendRef {ns}/{name} needs a port"),
            );
            continue;
        };
        let known = res
            .services
            .get(&(ns.clone(), name.clone()))
            .is_some_and(|ports| ports.contains(&port));
        if !known {
            resolved = cond(
                "ResolvedRefs",
                false,
                "BackendNotFound",
                format!("Service {ns}/{name} has no port {port}"),
            );
            continue;
        }
        let weight = weight.map_or(1, |w| w.max(0) as u32);
        if weight > 0 {
            out.push(Backend {
                namespace: ns,
                name: name.clone(),
                port,
                weight,
            });
        }
    }
    (out, resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_label_or_more_and_listener_names_narrow_routes() {
        assert!(host_matches("*.example.test", "a.example.test"));
        assert!(host_matches("*.example.test", "a.b.example.test"));
        assert!(!host_matches("*.example.test", "example.test"));
        assert!(!host_matches("*.example.test", "aexample.test"));
        assert!(host_matches("db.example.test", "db.example.test"));
        let routes = ["db.example.test".to_owned(), "*.other.test".to_owned()];
        assert_eq!(
            on_listener(Some("*.example.test"), &routes),
            Some(vec!["db.example.test".to_owned()])
        );
        assert_eq!(
            on_listener(Some("x.other.test"), &routes),
            Some(vec!["x.other.test".to_owned()])
        );
        assert_eq!(on_listener(Some("nothing.test"), &routes), None);
        assert_eq!(on_listener(None, &routes), Some(routes.to_vec()));
    }
}
