//! HTTPRoute rules, as the gateway-api crate types them, into `routes::Rule`s: matches with the
//! spec's defaults applied, filters, and backendRefs checked against the Services (and
//! ReferenceGrants across namespaces). Problems come back as (reason, message) for the route's
//! `ResolvedRefs` condition; a rule keeps what translated.

use gateway_api::httproutes::{
    HttpRouteRules, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::model::{Resources, granted};
use super::routes::{
    Backend, Filter, HeaderEdit, Match, PathChange, PathMatch, Redirect, Rewrite, Rule, StringMatch,
};

/// Translates the rules; problems are (reason, message) for the route's ResolvedRefs.
pub(super) fn rules(
    res: &Resources,
    rns: &str,
    raw: &[HttpRouteRules],
) -> (Vec<Rule>, Vec<(&'static str, String)>) {
    let mut problems = vec![];
    let mut out = vec![];
    for r in raw {
        let matches: Vec<Match> = match r.matches.as_deref() {
            None | Some([]) => vec![Match::any()],
            Some(ms) => ms
                .iter()
                .filter_map(|m| match translate_match(m) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        problems.push(("UnsupportedValue", e));
                        None
                    }
                })
                .collect(),
        };
        if matches.is_empty() {
            continue;
        }
        let mut filters = vec![];
        for f in r.filters.iter().flatten() {
            match translate_filter(f) {
                Ok(Some(f)) => filters.push(f),
                Ok(None) => {}
                Err(e) => problems.push(("UnsupportedValue", e)),
            }
        }
        let backends = r
            .backend_refs
            .iter()
            .flatten()
            .map(|b| {
                let backend = backend(res, rns, b);
                if let Some(why) = &backend.1 {
                    problems.push((backend.2, why.clone()));
                }
                backend.0
            })
            .collect();
        out.push(Rule {
            matches,
            filters,
            backends,
        });
    }
    (out, problems)
}

fn backend(
    res: &Resources,
    rns: &str,
    b: &HttpRouteRulesBackendRefs,
) -> (Backend, Option<String>, &'static str) {
    let ns = b.namespace.clone().unwrap_or_else(|| rns.to_owned());
    let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
    let port = b.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0);
    let (group, kind) = (
        b.group.as_deref().unwrap_or(""),
        b.kind.as_deref().unwrap_or("Service"),
    );
    let problem: Option<(&'static str, String)> = if !group.is_empty() || kind != "Service" {
        Some((
            "InvalidKind",
            format!("backendRef {group}/{kind} {} is not a Service", b.name),
        ))
    } else if ns != rns
        && !granted(
            &res.grants,
            ("gateway.networking.k8s.io", "HTTPRoute", rns),
            ("", "Service", &ns, &b.name),
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
        match res.services.get(&(ns.clone(), b.name.clone())) {
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
    let (invalid, reason) = match problem {
        Some((reason, why)) => (Some(why), reason),
        None => (None, ""),
    };
    (
        Backend {
            namespace: ns,
            name: b.name.clone(),
            port,
            weight,
            invalid: invalid.clone(),
        },
        invalid,
        reason,
    )
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

fn translate_filter(f: &HttpRouteRulesFilters) -> Result<Option<Filter>, String> {
    Ok(Some(match &f.r#type {
        HttpRouteRulesFiltersType::RequestHeaderModifier => {
            let m = f
                .request_header_modifier
                .as_ref()
                .ok_or("RequestHeaderModifier without requestHeaderModifier")?;
            Filter::RequestHeaders(header_edit!(m))
        }
        HttpRouteRulesFiltersType::ResponseHeaderModifier => {
            let m = f
                .response_header_modifier
                .as_ref()
                .ok_or("ResponseHeaderModifier without responseHeaderModifier")?;
            Filter::ResponseHeaders(header_edit!(m))
        }
        HttpRouteRulesFiltersType::RequestRedirect => {
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
            let status = match r.status_code.unwrap_or(302) {
                301 => StatusCode::MOVED_PERMANENTLY,
                302 => StatusCode::FOUND,
                other => return Err(format!("redirect statusCode {other}: 301 or 302")),
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
        HttpRouteRulesFiltersType::UrlRewrite => {
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
        other => return Err(format!("filter {other:?} is not supported")),
    }))
}
