//! HTTPRoute matching for one listener, with Gateway API's precedence rules, and the filters a
//! matched rule applies (header modifiers, redirects, rewrites).
//!
//! Precedence, as the spec orders it: the route whose matching hostname is the most specific
//! (a longer exact name beats a shorter one, any exact name beats a wildcard); then an `Exact`
//! path; then a `RegularExpression` path, whose place the spec leaves to implementations (here,
//! as in Istio, before prefixes: otherwise a catch-all `/` would shadow every regex); then the
//! longest `PathPrefix`; then a method match; then the most header matches; then the most
//! query-parameter matches; then the oldest route, then `namespace/name` alphabetically, then
//! rule and match order.
//!
//! This module owns no sockets: `server` asks it what to do with a request.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

/// How a header, query parameter or path value is compared.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    /// Anchored: the whole value must match.
    Regex(Regex),
}

impl StringMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => e == v,
            StringMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/v1` matches `/v1` and `/v1/x`, not `/v1x`.
    Prefix(String),
    /// Anchored.
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(e) => path == e,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }

    /// (kind, length): Exact 3, Regex 2, Prefix 1; longer first within a kind.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(e) => (3, e.len()),
            PathMatch::Regex(r) => (2, r.as_str().len()),
            PathMatch::Prefix(p) => (1, p.len()),
        }
    }
}

/// One entry of an HTTPRoute rule's `matches` (the spec's defaults already applied: no path
/// means `PathPrefix /`).
#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, StringMatch)>,
    pub query: Vec<(String, StringMatch)>,
}

impl Match {
    pub fn any() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            method: None,
            headers: vec![],
            query: vec![],
        }
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, m)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
            && self.query.iter().all(|(name, m)| {
                // The first value of a repeated parameter decides, as the spec suggests.
                query_pairs(req.query)
                    .find(|(k, _)| k == name)
                    .is_some_and(|(_, v)| m.matches(&v))
            })
    }

    /// Larger is more specific.
    fn rank(&self) -> ((u8, usize), bool, usize, usize) {
        (
            self.path.rank(),
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

fn query_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), decode(v))
    })
}

/// Percent-decoding for query keys and values (`+` is a space in forms).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Header changes of `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdit {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdit {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// How a redirect or rewrite changes the path.
#[derive(Debug, Clone)]
pub enum PathChange {
    Full(String),
    /// Replaces the part the rule's `PathPrefix` matched.
    Prefix(String),
}

#[derive(Debug, Clone, Default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: Option<StatusCode>,
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
}

/// `RequestMirror`: a copy of `fraction` of the requests goes to `backend`, whose answers are
/// dropped.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub backend: Backend,
    /// In [0, 1].
    pub fraction: f64,
}

#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderEdit),
    ResponseHeaders(HeaderEdit),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

/// A `backendRef` resolved against the state: a Service port, or the reason it is unusable
/// (requests that land on it get 500, as the spec says).
#[derive(Debug, Clone)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub weight: u32,
    pub invalid: Option<String>,
    /// Filters of this backendRef only (header modifiers), applied after the rule's.
    pub filters: Vec<Filter>,
}

/// `timeouts` of a rule. `request` bounds the whole exchange up to the response's headers,
/// retries included; `backend_request` bounds each attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

/// `retry` of a rule (Gateway API's `HTTPRouteRetry`): how many times a failed attempt is tried
/// again, on which response codes, and the least wait between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Attempts after the first.
    pub attempts: u32,
    /// Response codes that are retried (besides connect failures and refused streams, which
    /// always are).
    pub codes: Vec<StatusCode>,
    pub backoff: Duration,
}

impl Retry {
    /// What a rule with `retry: {}` gets: Linkerd's and Envoy's habit of one more attempt, on
    /// 503 (the spec leaves the defaults to the implementation).
    pub const DEFAULT_ATTEMPTS: u32 = 1;
    pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
}

#[derive(Debug, Clone, Default)]
pub struct Rule {
    /// Never empty (no `matches` means one that matches everything).
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

impl Rule {
    /// A backend drawn by weight (`draw` in `[0, 1)`), or why none can serve.
    pub fn pick_backend(&self, draw: f64) -> Result<&Backend, String> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return Err(match self.backends.first() {
                None => "the rule has no backendRefs".into(),
                Some(_) => "every backendRef has weight 0".into(),
            });
        }
        let mut point = (draw.clamp(0.0, 0.999_999) * total as f64) as u64;
        for b in &self.backends {
            if point < u64::from(b.weight) {
                return match &b.invalid {
                    None => Ok(b),
                    Some(why) => Err(why.clone()),
                };
            }
            point -= u64::from(b.weight);
        }
        Err("no backend".into())
    }
}

/// An HTTPRoute as one listener serves it: hostnames already intersected with the listener's.
#[derive(Debug, Clone)]
pub struct Route {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` in seconds; older routes win ties.
    pub created: i64,
    /// Empty: every host the listener accepts.
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

/// The parts of a request routing looks at.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Lowercase, without port.
    pub host: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
}

/// How specifically a hostname names the request's host (see `specificity`).
pub type HostScore = (u8, usize);
/// (route, rule, match) indices.
type Position = (usize, usize, usize);

/// Every match of every route of a listener, most specific first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// (route, rule, match) in precedence order, hostnames aside.
    order: Vec<Position>,
}

/// What routing decided.
#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub rule: &'a Rule,
    pub matched: &'a Match,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut order: Vec<Position> = routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| {
                route
                    .rules
                    .iter()
                    .enumerate()
                    .flat_map(move |(u, rule)| (0..rule.matches.len()).map(move |m| (r, u, m)))
            })
            .collect();
        order.sort_by(|a, b| {
            let (ra, rb) = (&routes[a.0], &routes[b.0]);
            let (ma, mb) = (&ra.rules[a.1].matches[a.2], &rb.rules[b.1].matches[b.2]);
            mb.rank()
                .cmp(&ma.rank())
                .then(ra.created.cmp(&rb.created))
                .then((&ra.namespace, &ra.name).cmp(&(&rb.namespace, &rb.name)))
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        Self { routes, order }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The rule for this request, or `None` (404).
    pub fn route(&self, req: &RequestView<'_>) -> Option<Matched<'_>> {
        let mut best: Option<(HostScore, Position)> = None;
        for &(r, u, m) in &self.order {
            let route = &self.routes[r];
            let Some(score) = host_score(&route.hostnames, req.host) else {
                continue;
            };
            if best.as_ref().is_some_and(|(s, _)| *s >= score) {
                continue;
            }
            if route.rules[u].matches[m].matches(req) {
                best = Some((score, (r, u, m)));
            }
        }
        best.map(|(_, (r, u, m))| {
            let route = &self.routes[r];
            Matched {
                route,
                rule: &route.rules[u],
                matched: &route.rules[u].matches[m],
            }
        })
    }
}

/// How specifically `pattern` names `host`: (2, len) for the exact name, (1, len) for a wildcard
/// covering it (`*.example.com` covers one or more labels before `.example.com`), (0, 0) for no
/// pattern at all; `None` when it does not cover `host`.
pub fn specificity(pattern: Option<&str>, host: &str) -> Option<HostScore> {
    let Some(p) = pattern else {
        return Some((0, 0));
    };
    match p.strip_prefix('*') {
        Some(suffix) => {
            (host.len() > suffix.len() && host.ends_with(suffix)).then_some((1, p.len()))
        }
        None => (p == host).then_some((2, p.len())),
    }
}

/// How specifically a route's `hostnames` name `host` (a route without any covers every host).
fn host_score(hostnames: &[String], host: &str) -> Option<HostScore> {
    if hostnames.is_empty() {
        return Some((0, 0));
    }
    hostnames
        .iter()
        .filter_map(|h| specificity(Some(h), host))
        .max()
}

/// Whether hostname `a` (maybe a wildcard) and `b` (maybe a wildcard) have a name in common,
/// and the narrower of the two if so (the intersection the spec defines).
pub fn intersect(a: &str, b: &str) -> Option<String> {
    let covers = |wild: &str, name: &str| {
        wild.strip_prefix('*')
            .is_some_and(|suffix| name.len() > suffix.len() && name.ends_with(suffix))
    };
    if a == b {
        return Some(a.to_owned());
    }
    if covers(a, b) {
        return Some(b.to_owned());
    }
    if covers(b, a) {
        return Some(a.to_owned());
    }
    None
}

/// The host a request names, as routes match it: the URI's authority (HTTP/2, absolute form)
/// or `Host`, without a port, lowercase; empty when it names none.
pub fn request_host(uri: &http::Uri, headers: &HeaderMap) -> String {
    uri.host()
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| {
                    h.rsplit_once(':')
                        .map_or(h, |(n, p)| {
                            if p.chars().all(|c| c.is_ascii_digit()) {
                                n
                            } else {
                                h
                            }
                        })
                        .to_owned()
                })
        })
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// The new path for `path` when `matched` matched it and `change` applies.
pub fn change_path(path: &str, matched: &PathMatch, change: &PathChange) -> String {
    match change {
        PathChange::Full(p) => p.clone(),
        PathChange::Prefix(replacement) => {
            let prefix = match matched {
                PathMatch::Prefix(p) => p.trim_end_matches('/'),
                _ => "",
            };
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = format!("{replacement}{rest}");
            if joined.is_empty() {
                "/".into()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

/// The `Location` of a redirect for a request that arrived as `scheme://host:port/path?query`
/// on a listener of port `listener_port`.
pub fn location(
    redirect: &Redirect,
    req: &RequestView<'_>,
    scheme: &str,
    listener_port: u16,
    matched: &PathMatch,
) -> String {
    let new_scheme = redirect.scheme.as_deref().unwrap_or(scheme);
    let host = redirect.hostname.as_deref().unwrap_or(req.host);
    // Without a port: the scheme's well-known port when the scheme is set, else the listener's.
    let port = redirect.port.unwrap_or(match redirect.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => listener_port,
    });
    let default_port = matches!((new_scheme, port), ("http", 80) | ("https", 443));
    let path = redirect.path.as_ref().map_or_else(
        || req.path.to_owned(),
        |c| change_path(req.path, matched, c),
    );
    let mut loc = if default_port {
        format!("{new_scheme}://{host}{path}")
    } else {
        format!("{new_scheme}://{host}:{port}{path}")
    };
    if !req.query.is_empty() {
        loc.push('?');
        loc.push_str(req.query);
    }
    loc
}

#[cfg(test)]
mod tests;
