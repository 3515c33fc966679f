//! Validated policies: what an `IdentityPolicy` means once every field has been checked.
//! Converting a resource reports every problem with its field path (`spec.ingress[0].from[1]`);
//! the YAML parser maps paths to `line:col`, the Kubernetes source to status conditions.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use signet_ca::SpiffeId;

use crate::cidr::Cidr;
use crate::resource::{Entity, HttpRule, IdentityPolicy, Labels, Mode, Peer, PortSpec, Protocol};

/// Regexes are compiled with this size limit; the engine is linear-time (no backtracking).
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// A problem with one field of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// A validated IdentityPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub mode: Mode,
    pub selector: Selector,
    /// `Some` (even empty) makes ingress default-deny for the selected workloads.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    pub ingress_deny: Vec<Rule>,
    pub egress_deny: Vec<Rule>,
}

/// One rule: who (peers), where (ports; empty means every port and protocol) and, for allow
/// rules, which HTTP requests (`None`: not L7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<PeerMatch>,
    pub ports: Vec<PortSpec>,
    pub http: Option<Vec<HttpMatch>>,
}

impl Rule {
    pub fn covers_port(&self, port: u16, protocol: Protocol) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|p| p.port == port && p.protocol == protocol)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    Identity(SpiffePattern),
    /// One Signet Gateway: `spiffe://<cluster trust domain>/ns/<namespace>/gateway/<name>`.
    Gateway {
        namespace: String,
        name: String,
    },
    Namespaces(Selector),
    Entity(Entity),
    /// World addresses in `net` but in none of `except` (each inside `net`).
    Cidr {
        net: Cidr,
        except: Vec<Cidr>,
    },
}

impl PeerMatch {
    /// Whether this matches a peer known by its prefix (an address is its /32 or /128): the
    /// prefix lies in `net` and in no `except`.
    pub fn matches_prefix(&self, p: &Cidr) -> bool {
        match self {
            PeerMatch::Cidr { net, except } => p.within(net) && !except.iter().any(|e| p.within(e)),
            _ => false,
        }
    }

    /// The prefixes this peer names (its `cidr` and `except`s).
    pub fn prefixes(&self) -> impl Iterator<Item = &Cidr> {
        let (net, except): (Option<&Cidr>, &[Cidr]) = match self {
            PeerMatch::Cidr { net, except } => (Some(net), except),
            _ => (None, &[]),
        };
        net.into_iter().chain(except)
    }
}

/// An exact SPIFFE ID, or a prefix ending in one wildcard segment (`spiffe://td/ns/ops/sa/*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffePattern {
    Exact(SpiffeId),
    /// Everything after `prefix` (which ends in `/`) must be exactly one segment.
    OneSegment {
        prefix: String,
    },
}

impl SpiffePattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(base) = s.strip_suffix("/*") {
            if base.contains('*') {
                return Err("`*` is allowed only as the whole last segment".into());
            }
            SpiffeId::parse(base).map_err(|e| format!("`{s}` is not a SPIFFE ID pattern: {e}"))?;
            return Ok(Self::OneSegment {
                prefix: format!("{base}/"),
            });
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` is allowed only as the whole last segment (`.../sa/*`)"
            ));
        }
        SpiffeId::parse(s)
            .map(Self::Exact)
            .map_err(|e| format!("`{s}` is not a SPIFFE ID: {e}"))
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(x) => x == id,
            Self::OneSegment { prefix } => id
                .as_str()
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/')),
        }
    }
}

impl std::fmt::Display for SpiffePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::OneSegment { prefix } => write!(f, "{prefix}*"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A Kubernetes label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub expressions: Vec<(String, Operator, BTreeSet<String>)>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(k, op, values)| match op {
                Operator::In => labels.get(k).is_some_and(|v| values.contains(v)),
                Operator::NotIn => labels.get(k).is_none_or(|v| !values.contains(v)),
                Operator::Exists => labels.contains_key(k),
                Operator::DoesNotExist => !labels.contains_key(k),
            })
    }

    pub fn from_k8s(sel: &LabelSelector, path: &str, errs: &mut Vec<FieldError>) -> Self {
        let mut out = Selector::default();
        for (k, v) in sel.match_labels.iter().flatten() {
            if let Err(m) = check_label_key(k) {
                errs.push(err(&format!("{path}.matchLabels"), m));
            }
            if let Err(m) = check_label_value(v) {
                errs.push(err(
                    &format!("{path}.matchLabels"),
                    format!("label `{k}`: {m}"),
                ));
            }
            out.match_labels.insert(k.clone(), v.clone());
        }
        for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            if let Err(m) = check_label_key(&req.key) {
                errs.push(err(&format!("{p}.key"), m));
            }
            let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
            let op = match req.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    errs.push(err(
                        &format!("{p}.operator"),
                        format!(
                            "unknown operator `{other}`; expected In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                    continue;
                }
            };
            match op {
                Operator::In | Operator::NotIn if values.is_empty() => errs.push(err(
                    &format!("{p}.values"),
                    format!("operator {} needs at least one value", req.operator),
                )),
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => errs.push(err(
                    &format!("{p}.values"),
                    format!("operator {} takes no values", req.operator),
                )),
                _ => {}
            }
            for v in &values {
                if let Err(m) = check_label_value(v) {
                    errs.push(err(&format!("{p}.values"), m));
                }
            }
            out.expressions.push((req.key.clone(), op, values));
        }
        out
    }
}

/// A matcher for HTTP requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMatch {
    /// Uppercase; empty means any.
    pub methods: Vec<String>,
    /// Empty means any.
    pub paths: Vec<PathMatcher>,
    /// Lowercase names, exact values.
    pub headers: Vec<(String, String)>,
    /// The owning policy's `pathNormalization`: what the proxy refuses before matching.
    pub normalization: crate::path::PathNormalization,
}

#[derive(Debug, Clone)]
pub enum PathMatcher {
    Exact(String),
    Prefix(String),
    /// Anchored: the whole path must match.
    Regex(regex::Regex),
}

/// Regexes compare by their source text: the same pattern is the same matcher.
impl PartialEq for PathMatcher {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for PathMatcher {}

/// An HTTP request as the proxy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names in any case.
    pub headers: Vec<(String, String)>,
}

impl HttpMatch {
    pub fn matches(&self, req: &Request) -> bool {
        let path = req.path.split('?').next().unwrap_or_default();
        (self.methods.is_empty() || self.methods.contains(&req.method))
            && (self.paths.is_empty()
                || self.paths.iter().any(|p| match p {
                    PathMatcher::Exact(e) => path == e,
                    PathMatcher::Prefix(pre) => path_has_prefix(path, pre),
                    PathMatcher::Regex(r) => r.is_match(path),
                }))
            && self
                .headers
                .iter()
                .all(|(name, value)| header_matches(req, name, value))
    }
}

/// A header rule holds when the request carries the header and every value of it is the one
/// named: a second `x-tenant: evil` beside `x-tenant: acme` does not pass. A `_` spelling of the
/// name (`x_tenant`), which some servers and CGI gateways read as the same header, fails the rule
/// whatever its value, so it cannot smuggle a second value past it.
fn header_matches(req: &Request, name: &str, value: &str) -> bool {
    let mut seen = false;
    for (n, v) in &req.headers {
        if n.eq_ignore_ascii_case(name) {
            if v != value {
                return false;
            }
            seen = true;
        } else if n.len() == name.len()
            && n.bytes().zip(name.bytes()).all(|(a, b)| {
                a.eq_ignore_ascii_case(&b) || (a == b'_' && b == b'-') || (a == b'-' && b == b'_')
            })
        {
            return false;
        }
    }
    seen
}

/// `/v1/charges` is a prefix of `/v1/charges` and `/v1/charges/7`, not of `/v1/chargesX`
/// (Gateway API PathPrefix semantics); a prefix ending in `/` matches anything below it.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn err(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_owned(),
        message: message.into(),
    }
}

pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_label_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(is_dns_label))
    {
        return Err(format!(
            "label key `{k}`: prefix `{p}` must be a DNS subdomain"
        ));
    }
    if !is_label_name(name) {
        return Err(format!(
            "label key `{k}`: name must be 1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`, starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(format!(
            "label value `{v}` must be empty or 1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`, starting and ending alphanumeric"
        ))
    }
}

fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Policy {
    /// Validates a resource, reporting every problem with its field path.
    pub fn from_resource(r: &IdentityPolicy) -> Result<Self, Vec<FieldError>> {
        let mut errs = Vec::new();
        let name = r.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            errs.push(err("metadata.name", "missing `metadata.name`"));
        }
        let namespace = r
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let spec = &r.spec;
        let selector = Selector::from_k8s(&spec.selector, "spec.selector", &mut errs);
        let ingress = spec.ingress.as_ref().map(|list| {
            rules(list, "spec.ingress", "from", &mut errs, |r| {
                (&r.from, &r.ports, r.http.as_deref())
            })
        });
        let mut ingress = ingress;
        for h in ingress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.http.iter_mut().flatten())
        {
            h.normalization = spec.path_normalization;
        }
        // Egress `http` rules are enforced by the source's proxy, which parses the requests of
        // every connection they cover (the datapath refuses such a connect when it cannot be
        // captured).
        let mut egress = spec.egress.as_ref().map(|list| {
            rules(list, "spec.egress", "to", &mut errs, |r| {
                (&r.to, &r.ports, r.http.as_deref())
            })
        });
        for h in egress
            .iter_mut()
            .flatten()
            .flat_map(|r| r.http.iter_mut().flatten())
        {
            h.normalization = spec.path_normalization;
        }
        let ingress_deny = rules(
            &spec.ingress_deny,
            "spec.ingressDeny",
            "from",
            &mut errs,
            |r| (&r.from, &r.ports, None),
        );
        let egress_deny = rules(&spec.egress_deny, "spec.egressDeny", "to", &mut errs, |r| {
            (&r.to, &r.ports, None)
        });
        if errs.is_empty() {
            Ok(Self {
                namespace,
                name,
                mode: spec.mode,
                selector,
                ingress,
                egress,
                ingress_deny,
                egress_deny,
            })
        } else {
            Err(errs)
        }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Validates one list of rules; `parts` picks peers, ports and `http` out of the list's type.
fn rules<T>(
    list: &[T],
    field: &str,
    peers_field: &str,
    errs: &mut Vec<FieldError>,
    parts: impl Fn(&T) -> (&[Peer], &[PortSpec], Option<&[HttpRule]>),
) -> Vec<Rule> {
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let (peers, ports, http) = parts(r);
            rule(
                peers,
                ports,
                http,
                &format!("{field}[{i}]"),
                peers_field,
                errs,
            )
        })
        .collect()
}

fn rule(
    peers: &[Peer],
    ports: &[PortSpec],
    http: Option<&[HttpRule]>,
    path: &str,
    peers_field: &str,
    errs: &mut Vec<FieldError>,
) -> Rule {
    if peers.is_empty() {
        errs.push(err(
            path,
            format!("a rule needs `{peers_field}`; it matches no one without it (use `entity: any` for everyone)"),
        ));
    }
    let peers = peers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| peer(p, &format!("{path}.{peers_field}[{i}]"), errs))
        .collect();
    for (i, p) in ports.iter().enumerate() {
        if p.port == 0 {
            errs.push(err(
                &format!("{path}.ports[{i}].port"),
                "port 0 is out of range 1-65535",
            ));
        }
    }
    let http = http.map(|rules| {
        if ports.is_empty() {
            errs.push(err(
                &format!("{path}.http"),
                "`http` rules need explicit TCP `ports` to inspect",
            ));
        }
        for (i, p) in ports.iter().enumerate() {
            if p.protocol == Protocol::Udp {
                errs.push(err(
                    &format!("{path}.ports[{i}]"),
                    format!(
                        "port {}/UDP cannot carry `http` rules; they apply only to TCP ports",
                        p.port
                    ),
                ));
            }
        }
        rules
            .iter()
            .enumerate()
            .map(|(i, h)| http_match(h, &format!("{path}.http[{i}]"), errs))
            .collect()
    });
    Rule {
        peers,
        ports: ports.to_vec(),
        http,
    }
}

fn peer(p: &Peer, path: &str, errs: &mut Vec<FieldError>) -> Option<PeerMatch> {
    let set = usize::from(p.identity.is_some())
        + usize::from(p.gateway.is_some())
        + usize::from(p.namespace_selector.is_some())
        + usize::from(p.entity.is_some())
        + usize::from(p.cidr.is_some());
    if set != 1 {
        errs.push(err(
            path,
            format!(
                "a peer needs exactly one of `identity`, `gateway`, `namespaceSelector`, `entity` or `cidr`; found {set}"
            ),
        ));
        return None;
    }
    if let Some(g) = &p.gateway {
        let mut ok = true;
        // A namespace is an RFC 1123 label; a Gateway's name a DNS subdomain (dots allowed).
        let subdomain = |v: &str| v.len() <= 253 && v.split('.').all(is_dns_label);
        for (field, value, valid, what) in [
            (
                "namespace",
                &g.namespace,
                is_dns_label(&g.namespace),
                "an RFC 1123 label",
            ),
            ("name", &g.name, subdomain(&g.name), "an RFC 1123 subdomain"),
        ] {
            if !valid {
                errs.push(err(
                    &format!("{path}.gateway.{field}"),
                    format!("`{value}` is not a Kubernetes name ({what})"),
                ));
                ok = false;
            }
        }
        return ok.then(|| PeerMatch::Gateway {
            namespace: g.namespace.clone(),
            name: g.name.clone(),
        });
    }
    if p.cidr.is_none() && !p.except.is_empty() {
        errs.push(err(
            &format!("{path}.except"),
            "`except` needs a `cidr` to carve from",
        ));
        return None;
    }
    if let Some(c) = &p.cidr {
        return cidr_peer(c, &p.except, path, errs);
    }
    if let Some(id) = &p.identity {
        return match SpiffePattern::parse(id) {
            Ok(pat) => Some(PeerMatch::Identity(pat)),
            Err(m) => {
                errs.push(err(&format!("{path}.identity"), m));
                None
            }
        };
    }
    if let Some(sel) = &p.namespace_selector {
        return Some(PeerMatch::Namespaces(Selector::from_k8s(
            sel,
            &format!("{path}.namespaceSelector"),
            errs,
        )));
    }
    p.entity.map(PeerMatch::Entity)
}

fn cidr_peer(
    cidr: &str,
    except: &[String],
    path: &str,
    errs: &mut Vec<FieldError>,
) -> Option<PeerMatch> {
    let net = match Cidr::parse(cidr) {
        Ok(n) => n,
        Err(m) => {
            errs.push(err(&format!("{path}.cidr"), m));
            return None;
        }
    };
    let mut carved = Vec::new();
    for (i, e) in except.iter().enumerate() {
        let at = format!("{path}.except[{i}]");
        match Cidr::parse(e) {
            Ok(c) if c.within(&net) => carved.push(c),
            Ok(c) => errs.push(err(&at, format!("{c} is not inside {net}"))),
            Err(m) => errs.push(err(&at, m)),
        }
    }
    (carved.len() == except.len()).then_some(PeerMatch::Cidr {
        net,
        except: carved,
    })
}

fn http_match(h: &HttpRule, path: &str, errs: &mut Vec<FieldError>) -> HttpMatch {
    let mut methods = Vec::new();
    for (i, m) in h.methods.iter().enumerate() {
        if is_http_token(m) {
            methods.push(m.to_ascii_uppercase());
        } else {
            errs.push(err(
                &format!("{path}.methods[{i}]"),
                format!("`{m}` is not an HTTP method"),
            ));
        }
    }
    let mut paths = Vec::new();
    for (i, p) in h.paths.iter().enumerate() {
        let at = format!("{path}.paths[{i}]");
        let set = [&p.exact, &p.prefix, &p.regex]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if set != 1 {
            errs.push(err(
                &at,
                format!("a path needs exactly one of `exact`, `prefix` or `regex`; found {set}"),
            ));
            continue;
        }
        if let Some(e) = &p.exact {
            check_path(e, &format!("{at}.exact"), errs);
            paths.push(PathMatcher::Exact(e.clone()));
        } else if let Some(pre) = &p.prefix {
            check_path(pre, &format!("{at}.prefix"), errs);
            paths.push(PathMatcher::Prefix(pre.clone()));
        } else if let Some(re) = &p.regex {
            match regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                Ok(r) => paths.push(PathMatcher::Regex(r)),
                Err(e) => errs.push(err(
                    &format!("{at}.regex"),
                    format!("regex does not compile: {}", first_line(&e.to_string())),
                )),
            }
        }
    }
    let mut headers = Vec::new();
    for (i, hm) in h.headers.iter().enumerate() {
        if is_http_token(&hm.name) {
            headers.push((hm.name.to_ascii_lowercase(), hm.value.clone()));
        } else {
            errs.push(err(
                &format!("{path}.headers[{i}].name"),
                format!("`{}` is not a valid header name", hm.name),
            ));
        }
    }
    HttpMatch {
        methods,
        paths,
        headers,
        normalization: crate::path::PathNormalization::default(),
    }
}

/// A rule's path is written as requests are matched: normalised, so `/a/../b` cannot be a rule
/// no request can meet.
fn check_path(p: &str, path: &str, errs: &mut Vec<FieldError>) {
    if !p.starts_with('/') {
        errs.push(err(path, format!("path `{p}` must start with `/`")));
        return;
    }
    match crate::path::normalize(p, crate::path::PathNormalization::KEEP_ALL) {
        Ok(n) if n == p => {}
        Ok(n) => errs.push(err(
            path,
            format!("path `{p}` is not in normal form: requests are matched as `{n}`"),
        )),
        Err(e) => errs.push(err(path, format!("path `{p}`: {e}"))),
    }
}

/// The regex crate's message ends with `error: <reason>` after a caret diagram.
fn first_line(s: &str) -> String {
    s.rsplit("error: ").next().unwrap_or(s).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn spiffe_patterns() {
        let p = SpiffePattern::parse("spiffe://cluster.local/ns/ops/sa/*").expect("pattern");
        assert!(p.matches(&id("spiffe://cluster.local/ns/ops/sa/deployer")));
        assert!(
            !p.matches(&id("spiffe://cluster.local/ns/ops/sa/a/b")),
            "exactly one segment"
        );
        assert!(!p.matches(&id("spiffe://cluster.local/ns/ops/sa")));
        assert!(
            !p.matches(&id("spiffe://other.org/ns/ops/sa/deployer")),
            "other trust domain"
        );
        assert!(SpiffePattern::parse("spiffe://cluster.local/ns/*/sa/x").is_err());
        assert!(SpiffePattern::parse("spiffe://cluster.local/ns/ops/sa/d*").is_err());
        assert!(SpiffePattern::parse("spiffe://Cluster.local/ns/a").is_err());
        let exact = SpiffePattern::parse("spiffe://cluster.local/ns/a/sa/b").expect("exact");
        assert!(exact.matches(&id("spiffe://cluster.local/ns/a/sa/b")));
        assert!(!exact.matches(&id("spiffe://cluster.local/ns/a/sa/bb")));
    }

    #[test]
    fn selectors() {
        let labels: Labels = [
            ("app".into(), "web".into()),
            ("tier".into(), "front".into()),
        ]
        .into();
        let sel = Selector {
            match_labels: [("app".into(), "web".into())].into(),
            expressions: vec![
                (
                    "tier".into(),
                    Operator::In,
                    ["front".into(), "edge".into()].into(),
                ),
                ("legacy".into(), Operator::DoesNotExist, BTreeSet::new()),
                ("env".into(), Operator::NotIn, ["prod".into()].into()),
            ],
        };
        assert!(sel.matches(&labels));
        assert!(
            Selector::default().matches(&Labels::new()),
            "empty selects all"
        );
        let mut other = labels.clone();
        other.insert("legacy".into(), "yes".into());
        assert!(!sel.matches(&other));
    }

    #[test]
    fn egress_http_rules_need_ports_and_unnormalised_rule_paths_are_refused() {
        let p = |spec: &str| {
            let r: IdentityPolicy = serde_yaml::from_str(&format!(
                "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
            ))
            .expect("yaml");
            Policy::from_resource(&r)
        };
        let errs = p(
            "  selector: {}\n  egress:\n  - to: [{entity: world}]\n    http: [{methods: [GET]}]\n",
        )
        .expect_err("egress http without ports is refused");
        assert!(errs[0].path.starts_with("spec.egress[0]"), "{errs:?}");
        let ok = p(
            "  selector: {}\n  egress:\n  - to: [{entity: any}]\n    ports: [{port: 80}]\n    http: [{methods: [GET]}]\n",
        )
        .expect("egress http rules are enforced by the source's proxy");
        assert!(ok.egress.as_ref().is_some_and(|e| e[0].http.is_some()));
        let errs = p("  selector: {}\n  ingress:\n  - from: [{entity: any}]\n    ports: [{port: 80}]\n    http: [{paths: [{prefix: /a/../b}]}]\n")
            .expect_err("a rule path no normalised request can meet");
        assert_eq!(errs[0].path, "spec.ingress[0].http[0].paths[0].prefix");
        assert!(errs[0].message.contains("matched as `/b`"), "{errs:?}");
        // The opt-out is carried to every http rule of the policy.
        let ok = p("  selector: {}\n  pathNormalization: {escapedSlashes: Keep}\n  ingress:\n  - from: [{entity: any}]\n    ports: [{port: 80}]\n    http: [{methods: [GET]}]\n")
            .expect("valid");
        let ingress = ok.ingress.expect("ingress");
        let h = &ingress[0].http.as_ref().expect("http")[0];
        assert_eq!(h.normalization.escaped_slashes, crate::path::Spelling::Keep);
        assert_eq!(h.normalization.non_ascii, crate::path::Spelling::Reject);
    }

    #[test]
    fn a_gateway_peer_names_one_gateway_by_kubernetes_names() {
        let p = |peer: &str| {
            let r: IdentityPolicy = serde_yaml::from_str(&format!(
                "apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {{name: p, namespace: shop}}\n\
                 spec:\n  selector: {{}}\n  ingress:\n  - from: [{peer}]\n"
            ))
            .expect("yaml");
            Policy::from_resource(&r)
        };
        let ok = p("{gateway: {namespace: edge, name: public}}").expect("valid");
        assert!(matches!(
            &ok.ingress.expect("ingress")[0].peers[0],
            PeerMatch::Gateway { namespace, name } if namespace == "edge" && name == "public"
        ));
        let errs = p("{gateway: {namespace: edge, name: Public/x}}").expect_err("not a name");
        assert_eq!(errs[0].path, "spec.ingress[0].from[0].gateway.name");
        // Gateway names are DNS subdomains; namespaces are labels.
        p("{gateway: {namespace: edge, name: public.example}}").expect("a dotted name");
        for bad in [
            "{gateway: {namespace: edge.x, name: public}}",
            "{gateway: {namespace: edge, name: a..b}}",
        ] {
            p(bad).expect_err(bad);
        }
        let errs = p("{gateway: {namespace: edge, name: public}, entity: gateway}")
            .expect_err("two kinds of peer");
        assert!(errs[0].message.contains("exactly one"), "{errs:?}");
    }

    #[test]
    fn http_matching() {
        let m = HttpMatch {
            methods: vec!["GET".into()],
            paths: vec![
                PathMatcher::Prefix("/v1/charges".into()),
                PathMatcher::Regex(regex::Regex::new("^(?:/v1/refunds/[0-9]+)$").expect("re")),
            ],
            headers: vec![("x-tenant".into(), "acme".into())],
            normalization: Default::default(),
        };
        let req = |method: &str, path: &str, tenant: &str| Request {
            method: method.into(),
            path: path.into(),
            headers: vec![("X-Tenant".into(), tenant.into())],
        };
        assert!(m.matches(&req("GET", "/v1/charges", "acme")));
        assert!(m.matches(&req("GET", "/v1/charges/9?x=1", "acme")));
        assert!(!m.matches(&req("GET", "/v1/chargesX", "acme")));
        assert!(m.matches(&req("GET", "/v1/refunds/42", "acme")));
        assert!(!m.matches(&req("GET", "/v1/refunds/42/x", "acme")));
        assert!(!m.matches(&req("POST", "/v1/charges", "acme")));
        assert!(!m.matches(&req("GET", "/v1/charges", "evil")));
    }

    #[test]
    fn a_header_rule_needs_every_value_and_refuses_underscore_spellings() {
        let m = HttpMatch {
            methods: vec![],
            paths: vec![],
            headers: vec![("x-tenant".into(), "acme".into())],
            normalization: Default::default(),
        };
        let req = |headers: &[(&str, &str)]| Request {
            method: "GET".into(),
            path: "/".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        };
        assert!(m.matches(&req(&[("X-TENANT", "acme")])));
        assert!(m.matches(&req(&[("x-tenant", "acme"), ("x-tenant", "acme")])));
        assert!(!m.matches(&req(&[])), "the header is required");
        assert!(
            !m.matches(&req(&[("x-tenant", "acme"), ("x-tenant", "evil")])),
            "a second value must match too"
        );
        assert!(
            !m.matches(&req(&[("x-tenant", "evil"), ("X-Tenant", "acme")])),
            "whichever comes first"
        );
        assert!(
            !m.matches(&req(&[("x-tenant", "acme"), ("x_tenant", "evil")])),
            "an underscore spelling is refused"
        );
        assert!(!m.matches(&req(&[("x-tenant", "acme, evil")])));
    }
}
