//! HTTPRoute rules, as the gateway-api crate types them (experimental channel, a superset of
//! the standard one: a field Signet does not serve must be seen to be refused, not dropped by
//! deserialisation), into `routes::Rule`s: matches with the spec's defaults applied, filters,
//! timeouts, retries, and backendRefs checked against the Services (and ReferenceGrants across
//! namespaces).
//!
//! Problems come back in two kinds. A reference that does not resolve is the route's
//! `ResolvedRefs=False` and its rule answers 500, as the spec says. A field or value Signet does
//! not implement makes the route `Accepted=False` with reason `UnsupportedValue` and a message
//! naming the field: a route that would be served differently from what it says is not served
//! at all.

use std::time::Duration;

use gateway_api::experimental::httproutes::{
    HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesBackendRefsFilters,
    HttpRouteRulesBackendRefsFiltersType, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteRulesRetry, HttpRouteRulesTimeouts,
};
use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::model::{Resources, granted};
use super::routes::{
    Backend, Filter, HeaderEdit, Match, Mirror, PathChange, PathMatch, Redirect, Retry, Rewrite,
    Rule, StringMatch, Timeouts,
};

/// A reference that does not resolve: (reason, message) for `ResolvedRefs`.
pub(super) type RefProblem = (&'static str, String);

/// What did not translate.
#[derive(Debug, Default)]
pub(super) struct Problems {
    /// For the route's `ResolvedRefs`.
    pub refs: Vec<RefProblem>,
    /// `rules[i].field: why`, for `Accepted=False/UnsupportedValue`.
    pub unsupported: Vec<String>,
}

/// Translates an HTTPRoute's rules. `kind` names the route kind in backendRef grants.
pub(super) fn rules(res: &Resources, rns: &str, raw: &[HttpRouteRules]) -> (Vec<Rule>, Problems) {
    let mut problems = Problems::default();
    let mut out = vec![];
    for (i, r) in raw.iter().enumerate() {
        let mut unsupported = |field: &str, why: String| {
            problems
                .unsupported
                .push(format!("rules[{i}].{field}: {why}"));
        };
        let matches = matches_of(r.matches.as_deref(), translate_match, &mut unsupported);
        let mut filters = vec![];
        for (j, f) in r.filters.iter().flatten().enumerate() {
            match translate_filter(res, rns, f) {
                Ok((f, problem)) => {
                    filters.push(f);
                    problems.refs.extend(problem);
                }
                Err(e) => unsupported(&format!("filters[{j}]"), e),
            }
        }
        if r.session_persistence.is_some() {
            unsupported(
                "sessionPersistence",
                "session persistence is not supported".into(),
            );
        }
        let timeouts = match r.timeouts.as_ref().map(timeouts).transpose() {
            Ok(t) => t.unwrap_or_default(),
            Err(e) => {
                unsupported("timeouts", e);
                Timeouts::default()
            }
        };
        let retry = match r.retry.as_ref().map(retry).transpose() {
            Ok(r) => r,
            Err(e) => {
                unsupported("retry", e);
                None
            }
        };
        let mut backends = vec![];
        for (j, b) in r.backend_refs.iter().flatten().enumerate() {
            let (mut backend, problem) = backend(res, rns, "HTTPRoute", &BackendRef::of(b));
            if let Some((reason, why)) = problem {
                problems.refs.push((reason, why));
            }
            for (k, f) in b.filters.iter().flatten().enumerate() {
                match translate_backend_filter(f) {
                    Ok(f) => backend.filters.push(f),
                    Err(e) => unsupported(&format!("backendRefs[{j}].filters[{k}]"), e),
                }
            }
            backends.push(backend);
        }
        out.push(Rule {
            matches,
            filters,
            backends,
            timeouts,
            retry,
        });
    }
    (out, problems)
}

/// A rule's `matches`, each translated by `one`; none at all is one that matches everything. One
/// that does not translate is named to `unsupported` (and the route is not served).
fn matches_of<M>(
    list: Option<&[M]>,
    one: impl Fn(&M) -> Result<Match, String>,
    unsupported: &mut impl FnMut(&str, String),
) -> Vec<Match> {
    match list {
        None | Some([]) => vec![Match::any()],
        Some(ms) => ms
            .iter()
            .enumerate()
            .filter_map(|(j, m)| {
                one(m)
                    .inspect_err(|e| unsupported(&format!("matches[{j}]"), e.clone()))
                    .ok()
            })
            .collect(),
    }
}

/// A duration in Gateway API's format (`1h`, `500ms`, `1m30s`).
fn duration(field: &str, text: &str) -> Result<Duration, String> {
    let d: gateway_api::Duration = text
        .parse()
        .map_err(|e| format!("{field} `{text}` is not a Gateway API duration: {e}"))?;
    Ok(Duration::from_nanos(
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
    ))
}

fn timeouts(t: &HttpRouteRulesTimeouts) -> Result<Timeouts, String> {
    let get = |field, v: &Option<String>| {
        v.as_deref()
            .map(|v| duration(field, v))
            .transpose()
            // `0s` means no timeout, as the spec says.
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let out = Timeouts {
        request: get("request", &t.request)?,
        backend_request: get("backendRequest", &t.backend_request)?,
    };
    if let (Some(r), Some(b)) = (out.request, out.backend_request)
        && b > r
    {
        return Err(format!(
            "backendRequest ({b:?}) must not be longer than request ({r:?})"
        ));
    }
    Ok(out)
}

fn retry(r: &HttpRouteRulesRetry) -> Result<Retry, String> {
    let attempts = match r.attempts {
        None => Retry::DEFAULT_ATTEMPTS,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= 10)
            .ok_or_else(|| format!("attempts {n}: 0 to 10"))?,
    };
    let codes = match &r.codes {
        None => vec![StatusCode::SERVICE_UNAVAILABLE],
        Some(codes) => codes
            .iter()
            .map(|c| {
                u16::try_from(*c)
                    .ok()
                    .filter(|c| (400..600).contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| format!("code {c}: a retried code is 400 to 599"))
            })
            .collect::<Result<_, _>>()?,
    };
    let backoff = match &r.backoff {
        None => Retry::DEFAULT_BACKOFF,
        Some(b) => duration("backoff", b)?,
    };
    Ok(Retry {
        attempts,
        codes,
        backoff,
    })
}

/// The fields every kind of route's backendRef has.
pub(super) struct BackendRef<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<i32>,
    pub weight: Option<i32>,
}

impl<'a> BackendRef<'a> {
    fn of(b: &'a HttpRouteRulesBackendRefs) -> Self {
        Self {
            group: b.group.as_deref(),
            kind: b.kind.as_deref(),
            name: &b.name,
            namespace: b.namespace.as_deref(),
            port: b.port,
            weight: b.weight,
        }
    }
}

/// The backend, and the (reason, message) of its `ResolvedRefs` problem if it has one.
pub(super) fn backend(
    res: &Resources,
    rns: &str,
    route_kind: &str,
    b: &BackendRef<'_>,
) -> (Backend, Option<RefProblem>) {
    let ns = b.namespace.unwrap_or(rns).to_owned();
    let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
    let port = b.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
    let (group, kind) = (b.group.unwrap_or(""), b.kind.unwrap_or("Service"));
    let problem: Option<RefProblem> = if !group.is_empty() || kind != "Service" {
        Some((
            "InvalidKind",
            format!("backendRef {group}/{kind} {} is not a Service", b.name),
        ))
    } else if ns != rns
        && !granted(
            &res.grants,
            ("gateway.networking.k8s.io", route_kind, rns),
            ("", "Service", &ns, b.name),
        )
    {
        Some((
            "RefNotPermitted",
            format!(
                "Service {ns}/{} is in another namespace and no ReferenceGrant allows it",
                b.name
            ),
        ))
    } else if b.port.is_none() {
        Some((
            "UnsupportedValue",
            format!("backendRef {ns}/{} needs a port", b.name),
        ))
    } else {
        match res.services.get(&(ns.clone(), b.name.to_owned())) {
            None => Some((
                "BackendNotFound",
                format!("Service {ns}/{} not found", b.name),
            )),
            Some(ports) if !ports.contains(&port) => Some((
                "BackendNotFound",
                format!("Service {ns}/{} has no port {port}", b.name),
            )),
            Some(_) => None,
        }
    };
    let backend = Backend {
        namespace: ns,
        name: b.name.to_owned(),
        port,
        weight,
        invalid: problem.as_ref().map(|(_, why)| why.clone()),
        filters: vec![],
    };
    (backend, problem)
}

fn anchored(re: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("regular expression `{re}`: {e}"))
}

fn translate_match(m: &HttpRouteRulesMatches) -> Result<Match, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            match p
                .r#type
                .as_ref()
                .unwrap_or(&HttpRouteRulesMatchesPathType::PathPrefix)
            {
                HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(v),
                HttpRouteRulesMatchesPathType::PathPrefix => PathMatch::Prefix(v),
                HttpRouteRulesMatchesPathType::RegularExpression => PathMatch::Regex(anchored(&v)?),
            }
        }
    };
    let method = m
        .method
        .as_ref()
        .map(|m| {
            let text = serde_json::to_value(m)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Method::from_bytes(text.as_bytes()).map_err(|e| format!("method `{text}`: {e}"))
        })
        .transpose()?;
    let mut headers = vec![];
    for h in m.headers.iter().flatten() {
        let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("header `{}`: {e}", h.name))?;
        let value = match h
            .r#type
            .as_ref()
            .unwrap_or(&HttpRouteRulesMatchesHeadersType::Exact)
        {
            HttpRouteRulesMatchesHeadersType::Exact => StringMatch::Exact(h.value.clone()),
            HttpRouteRulesMatchesHeadersType::RegularExpression => {
                StringMatch::Regex(anchored(&h.value)?)
            }
        };
        headers.push((name, value));
    }
    let mut query = vec![];
    for q in m.query_params.iter().flatten() {
        let value = match q
            .r#type
            .as_ref()
            .unwrap_or(&HttpRouteRulesMatchesQueryParamsType::Exact)
        {
            HttpRouteRulesMatchesQueryParamsType::Exact => StringMatch::Exact(q.value.clone()),
            HttpRouteRulesMatchesQueryParamsType::RegularExpression => {
                StringMatch::Regex(anchored(&q.value)?)
            }
        };
        query.push((q.name.clone(), value));
    }
    Ok(Match {
        path,
        method,
        headers,
        query,
    })
}

fn header_pairs<T>(
    list: Option<&Vec<T>>,
    get: impl Fn(&T) -> (&str, &str),
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    list.into_iter()
        .flatten()
        .map(|h| {
            let (n, v) = get(h);
            Ok((
                HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                    .map_err(|e| format!("header `{n}`: {e}"))?,
                HeaderValue::from_str(v).map_err(|e| format!("header `{n}` value: {e}"))?,
            ))
        })
        .collect()
}

fn names(list: Option<&Vec<String>>) -> Result<Vec<HeaderName>, String> {
    list.into_iter()
        .flatten()
        .map(|n| {
            HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
                .map_err(|e| format!("header `{n}`: {e}"))
        })
        .collect()
}

/// A `HeaderEdit` from a request or response header modifier: the generated types differ, the
/// fields (`set`, `add`: name and value; `remove`: names) do not.
macro_rules! header_edit {
    ($m:expr) => {
        HeaderEdit {
            set: header_pairs($m.set.as_ref(), |h| (&h.name, &h.value))?,
            add: header_pairs($m.add.as_ref(), |h| (&h.name, &h.value))?,
            remove: names($m.remove.as_ref())?,
        }
    };
}

/// A header-modifier filter of any filter type (rule or backendRef, HTTPRoute or GRPCRoute: the
/// generated types differ, the fields do not): `Some` for those two filter types, `None` for the
/// others.
macro_rules! header_filter {
    ($f:expr, $t:ident) => {
        match $f.r#type {
            $t::RequestHeaderModifier => Some(match $f.request_header_modifier.as_ref() {
                Some(m) => (|| Ok::<_, String>(Filter::RequestHeaders(header_edit!(m))))(),
                None => Err("RequestHeaderModifier without requestHeaderModifier".to_owned()),
            }),
            $t::ResponseHeaderModifier => Some(match $f.response_header_modifier.as_ref() {
                Some(m) => (|| Ok::<_, String>(Filter::ResponseHeaders(header_edit!(m))))(),
                None => Err("ResponseHeaderModifier without responseHeaderModifier".to_owned()),
            }),
            _ => None,
        }
    };
}

/// A rule's filter, and the `ResolvedRefs` problem of the backend it names (a mirror's).
fn translate_filter(
    res: &Resources,
    rns: &str,
    f: &HttpRouteRulesFilters,
) -> Result<(Filter, Option<RefProblem>), String> {
    use HttpRouteRulesFiltersType as T;
    let filter = match &f.r#type {
        T::RequestHeaderModifier => {
            let m = f
                .request_header_modifier
                .as_ref()
                .ok_or("RequestHeaderModifier without requestHeaderModifier")?;
            Filter::RequestHeaders(header_edit!(m))
        }
        T::ResponseHeaderModifier => {
            let m = f
                .response_header_modifier
                .as_ref()
                .ok_or("ResponseHeaderModifier without responseHeaderModifier")?;
            Filter::ResponseHeaders(header_edit!(m))
        }
        T::RequestRedirect => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or("RequestRedirect without requestRedirect")?;
            let path = r.path.as_ref().map(|p| match p.r#type {
                HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath => {
                    PathChange::Full(p.replace_full_path.clone().unwrap_or_else(|| "/".into()))
                }
                HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch => {
                    PathChange::Prefix(p.replace_prefix_match.clone().unwrap_or_else(|| "/".into()))
                }
            });
            let code = r.status_code.unwrap_or(302);
            let status = match code {
                301 | 302 | 303 | 307 | 308 => u16::try_from(code)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or("redirect statusCode")?,
                other => {
                    return Err(format!(
                        "redirect statusCode {other}: 301, 302, 303, 307 or 308"
                    ));
                }
            };
            Filter::Redirect(Redirect {
                scheme: r.scheme.as_ref().map(|s| match s {
                    HttpRouteRulesFiltersRequestRedirectScheme::Http => "http".to_owned(),
                    HttpRouteRulesFiltersRequestRedirectScheme::Https => "https".to_owned(),
                }),
                hostname: r.hostname.clone(),
                port: r.port.and_then(|p| u16::try_from(p).ok()),
                path,
                status: Some(status),
            })
        }
        T::UrlRewrite => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or("URLRewrite without urlRewrite")?;
            Filter::Rewrite(Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(|p| match p.r#type {
                    HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath => {
                        PathChange::Full(p.replace_full_path.clone().unwrap_or_else(|| "/".into()))
                    }
                    HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch => {
                        PathChange::Prefix(
                            p.replace_prefix_match.clone().unwrap_or_else(|| "/".into()),
                        )
                    }
                }),
            })
        }
        T::RequestMirror => return mirror(res, rns, f),
        T::ExtensionRef => return Err(not_yet("ExtensionRef")),
        T::Cors => return Err(not_yet("CORS")),
        T::ExternalAuth => return Err(not_yet("ExternalAuth")),
    };
    Ok((filter, None))
}

/// `RequestMirror`, with the `ResolvedRefs` problem of its backend if it has one.
fn mirror(
    res: &Resources,
    rns: &str,
    f: &HttpRouteRulesFilters,
) -> Result<(Filter, Option<RefProblem>), String> {
    let m = f
        .request_mirror
        .as_ref()
        .ok_or("RequestMirror without requestMirror")?;
    let fraction = match (&m.fraction, m.percent) {
        (Some(_), Some(_)) => return Err("a mirror takes fraction or percent, not both".into()),
        (Some(fr), None) => {
            let d = fr.denominator.unwrap_or(100);
            if d <= 0 || fr.numerator < 0 || fr.numerator > d {
                return Err(format!(
                    "mirror fraction {}/{d}: 0 <= numerator <= denominator, denominator > 0",
                    fr.numerator
                ));
            }
            f64::from(fr.numerator) / f64::from(d)
        }
        (None, Some(p)) if (0..=100).contains(&p) => f64::from(p) / 100.0,
        (None, Some(p)) => return Err(format!("mirror percent {p}: 0 to 100")),
        (None, None) => 1.0,
    };
    let b = &m.backend_ref;
    let reference = BackendRef {
        group: b.group.as_deref(),
        kind: b.kind.as_deref(),
        name: &b.name,
        namespace: b.namespace.as_deref(),
        port: b.port,
        weight: Some(1),
    };
    let (backend, problem) = backend(res, rns, "HTTPRoute", &reference);
    Ok((Filter::Mirror(Mirror { backend, fraction }), problem))
}

fn not_yet(filter: &str) -> String {
    format!("filter type {filter} is not supported")
}

/// A backendRef's own filter: header modifiers, applied to the requests sent to that backend
/// and the responses that come from it.
fn translate_backend_filter(f: &HttpRouteRulesBackendRefsFilters) -> Result<Filter, String> {
    use HttpRouteRulesBackendRefsFiltersType as T;
    header_filter!(f, T).unwrap_or_else(|| {
        Err(format!(
            "filter type {:?} is not supported on a backendRef (header modifiers are)",
            f.r#type
        ))
    })
}

/// A GRPCRoute filter (of a rule or a backendRef: the generated types differ, the fields do not):
/// header modifiers, or why not.
macro_rules! grpc_filter {
    ($f:expr, $t:ident) => {
        header_filter!($f, $t).unwrap_or_else(|| Err(not_yet(&format!("{:?}", $f.r#type))))
    };
}

/// GRPCRoute rules into the same `Rule`s: a gRPC method is the path `/<service>/<method>` of an
/// HTTP/2 POST, so a method match is a path match and one engine serves both kinds.
pub(super) fn grpc_rules(
    res: &Resources,
    rns: &str,
    raw: &[gateway_api::experimental::grpcroutes::GrpcRouteRules],
) -> (Vec<Rule>, Problems) {
    use gateway_api::experimental::grpcroutes::{
        GrpcRouteRulesBackendRefsFiltersType as BT, GrpcRouteRulesFiltersType as T,
    };
    let mut problems = Problems::default();
    let mut out = vec![];
    for (i, r) in raw.iter().enumerate() {
        let mut unsupported = |field: &str, why: String| {
            problems
                .unsupported
                .push(format!("rules[{i}].{field}: {why}"));
        };
        let matches = matches_of(r.matches.as_deref(), grpc_match, &mut unsupported);
        let mut filters = vec![];
        for (j, f) in r.filters.iter().flatten().enumerate() {
            let f = grpc_filter!(f, T);
            match f {
                Ok(f) => filters.push(f),
                Err(e) => unsupported(&format!("filters[{j}]"), e),
            }
        }
        if r.session_persistence.is_some() {
            unsupported(
                "sessionPersistence",
                "session persistence is not supported".into(),
            );
        }
        let mut backends = vec![];
        for (j, b) in r.backend_refs.iter().flatten().enumerate() {
            let reference = BackendRef {
                group: b.group.as_deref(),
                kind: b.kind.as_deref(),
                name: &b.name,
                namespace: b.namespace.as_deref(),
                port: b.port,
                weight: b.weight,
            };
            let (mut backend, problem) = backend(res, rns, "GRPCRoute", &reference);
            if let Some(p) = problem {
                problems.refs.push(p);
            }
            for (k, f) in b.filters.iter().flatten().enumerate() {
                let f = grpc_filter!(f, BT);
                match f {
                    Ok(f) => backend.filters.push(f),
                    Err(e) => unsupported(&format!("backendRefs[{j}].filters[{k}]"), e),
                }
            }
            backends.push(backend);
        }
        out.push(Rule {
            matches,
            filters,
            backends,
            ..Rule::default()
        });
    }
    (out, problems)
}

/// A GRPCRoute match as a path (and header) match. `Exact` with both parts is the exact path;
/// with the service only, every method of it; with the method only, that method of any
/// service. `RegularExpression` parts are anchored within their path segment.
fn grpc_match(
    m: &gateway_api::experimental::grpcroutes::GrpcRouteRulesMatches,
) -> Result<Match, String> {
    use gateway_api::experimental::grpcroutes::{
        GrpcRouteRulesMatchesHeadersType as H, GrpcRouteRulesMatchesMethodType as M,
    };
    let path = match &m.method {
        None => PathMatch::Prefix("/".into()),
        Some(method) => {
            let (service, name) = (method.service.as_deref(), method.method.as_deref());
            match method.r#type.as_ref().unwrap_or(&M::Exact) {
                M::Exact => {
                    let plain = |s: &str| !s.is_empty() && !s.contains('/');
                    if !service.is_none_or(plain) || !name.is_none_or(plain) {
                        return Err("a service or method name must not be empty or hold `/`".into());
                    }
                    match (service, name) {
                        (Some(s), Some(n)) => PathMatch::Exact(format!("/{s}/{n}")),
                        (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                        (None, Some(n)) => {
                            PathMatch::Regex(anchored(&format!("/[^/]+/{}", regex::escape(n)))?)
                        }
                        (None, None) => {
                            return Err("a method match needs a service or a method".into());
                        }
                    }
                }
                M::RegularExpression => {
                    let s = service.unwrap_or("[^/]+");
                    let n = name.unwrap_or("[^/]+");
                    // Each part is checked on its own first, so a bad one is named.
                    anchored(s)?;
                    anchored(n)?;
                    PathMatch::Regex(anchored(&format!("/(?:{s})/(?:{n})"))?)
                }
            }
        }
    };
    let mut headers = vec![];
    for h in m.headers.iter().flatten() {
        let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("header `{}`: {e}", h.name))?;
        let value = match h.r#type.as_ref().unwrap_or(&H::Exact) {
            H::Exact => StringMatch::Exact(h.value.clone()),
            H::RegularExpression => StringMatch::Regex(anchored(&h.value)?),
        };
        headers.push((name, value));
    }
    Ok(Match {
        path,
        method: None,
        headers,
        query: vec![],
    })
}
