use super::*;

fn rule_with(m: Match, tag: &str) -> Rule {
    Rule {
        matches: vec![m],
        filters: vec![],
        backends: vec![Backend {
            namespace: "ns".into(),
            name: tag.into(),
            port: 80,
            weight: 1,
            invalid: None,
            filters: vec![],
        }],
        ..Rule::default()
    }
}

fn route(name: &str, created: i64, hostnames: &[&str], rules: Vec<Rule>) -> Route {
    Route {
        namespace: "ns".into(),
        name: name.into(),
        created,
        hostnames: hostnames.iter().map(ToString::to_string).collect(),
        rules,
    }
}

fn path(p: PathMatch) -> Match {
    Match {
        path: p,
        ..Match::any()
    }
}

fn routed(
    router: &Router,
    host: &str,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let (p, q) = target.split_once('?').unwrap_or((target, ""));
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let req = RequestView {
        host,
        method: &method,
        path: p,
        query: q,
        headers: &map,
    };
    router.route(&req).map(|m| m.rule.backends[0].name.clone())
}

#[test]
fn paths_exact_then_regex_then_longest_prefix() {
    let r = Router::new(vec![route(
        "r",
        0,
        &[],
        vec![
            rule_with(
                path(PathMatch::Regex(Regex::new("^/v1/[0-9]+$").expect("re"))),
                "regex",
            ),
            rule_with(path(PathMatch::Prefix("/".into())), "root"),
            rule_with(path(PathMatch::Prefix("/v1".into())), "v1"),
            rule_with(path(PathMatch::Prefix("/v1/users".into())), "users"),
            rule_with(path(PathMatch::Exact("/v1/users/me".into())), "me"),
        ],
    )]);
    let get = |p: &str| routed(&r, "h", Method::GET, p, &[]);
    assert_eq!(get("/v1/users/me").as_deref(), Some("me"));
    // A regex beats every prefix (else the catch-all `/` would shadow it).
    assert_eq!(get("/v1/42").as_deref(), Some("regex"));
    assert_eq!(get("/v1/users/7").as_deref(), Some("users"));
    assert_eq!(get("/v1/orders").as_deref(), Some("v1"));
    // A prefix matches whole path elements only.
    assert_eq!(get("/v1x").as_deref(), Some("root"));
    assert_eq!(get("/").as_deref(), Some("root"));
}

#[test]
fn then_method_then_more_headers_then_more_query_params() {
    let m = |method: Option<Method>, headers: usize, query: usize| Match {
        path: PathMatch::Prefix("/".into()),
        method,
        headers: (0..headers)
            .map(|i| {
                (
                    HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("h"),
                    StringMatch::Exact("1".into()),
                )
            })
            .collect(),
        query: (0..query)
            .map(|i| (format!("q{i}"), StringMatch::Exact("1".into())))
            .collect(),
    };
    let r = Router::new(vec![route(
        "r",
        0,
        &[],
        vec![
            rule_with(m(None, 0, 0), "plain"),
            rule_with(m(None, 0, 2), "two-query"),
            rule_with(m(None, 1, 0), "one-header"),
            rule_with(m(None, 2, 0), "two-headers"),
            rule_with(m(Some(Method::POST), 0, 0), "post"),
        ],
    )]);
    let h = [("x-0", "1"), ("x-1", "1")];
    assert_eq!(
        routed(&r, "h", Method::POST, "/?q0=1&q1=1", &h).as_deref(),
        Some("post")
    );
    assert_eq!(
        routed(&r, "h", Method::GET, "/?q0=1&q1=1", &h).as_deref(),
        Some("two-headers")
    );
    assert_eq!(
        routed(&r, "h", Method::GET, "/?q0=1&q1=1", &h[..1]).as_deref(),
        Some("one-header")
    );
    assert_eq!(
        routed(&r, "h", Method::GET, "/?q0=1&q1=1", &[]).as_deref(),
        Some("two-query")
    );
    assert_eq!(
        routed(&r, "h", Method::GET, "/?q0=1", &[]).as_deref(),
        Some("plain")
    );
    // Percent-encoded query values are compared decoded.
    assert_eq!(
        routed(&r, "h", Method::GET, "/?q%30=%31&q1=1", &[]).as_deref(),
        Some("two-query")
    );
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name() {
    let any = || vec![rule_with(Match::any(), "")];
    let mut a = route("a", 200, &[], any());
    a.rules[0].backends[0].name = "a".into();
    let mut b = route("b", 100, &[], any());
    b.rules[0].backends[0].name = "b".into();
    let mut c = route("c", 100, &[], any());
    c.rules[0].backends[0].name = "c".into();
    let r = Router::new(vec![a, c, b]);
    assert_eq!(routed(&r, "h", Method::GET, "/", &[]).as_deref(), Some("b"));
}

#[test]
fn the_most_specific_hostname_wins_before_path_precedence() {
    let r = Router::new(vec![
        route(
            "wild",
            0,
            &["*.example.com"],
            vec![rule_with(path(PathMatch::Exact("/x".into())), "wild")],
        ),
        route(
            "exact",
            0,
            &["api.example.com"],
            vec![rule_with(Match::any(), "exact")],
        ),
        route(
            "none",
            0,
            &[],
            vec![rule_with(path(PathMatch::Exact("/x".into())), "none")],
        ),
    ]);
    assert_eq!(
        routed(&r, "api.example.com", Method::GET, "/x", &[]).as_deref(),
        Some("exact")
    );
    assert_eq!(
        routed(&r, "a.b.example.com", Method::GET, "/x", &[]).as_deref(),
        Some("wild")
    );
    assert_eq!(
        routed(&r, "example.com", Method::GET, "/x", &[]).as_deref(),
        Some("none")
    );
    assert_eq!(routed(&r, "example.com", Method::GET, "/y", &[]), None);
}

#[test]
fn hostnames_intersect_as_the_spec_says() {
    assert_eq!(
        intersect("*.example.com", "api.example.com").as_deref(),
        Some("api.example.com")
    );
    assert_eq!(
        intersect("api.example.com", "*.example.com").as_deref(),
        Some("api.example.com")
    );
    assert_eq!(
        intersect("*.example.com", "*.example.com").as_deref(),
        Some("*.example.com")
    );
    assert_eq!(intersect("*.example.com", "example.com"), None);
    assert_eq!(intersect("a.example.com", "b.example.com"), None);
}

#[test]
fn prefix_replacement_and_redirect_locations() {
    let m = PathMatch::Prefix("/old".into());
    let prefix = |to: &str| PathChange::Prefix(to.into());
    assert_eq!(change_path("/old/a/b", &m, &prefix("/new")), "/new/a/b");
    assert_eq!(change_path("/old", &m, &prefix("/new")), "/new");
    assert_eq!(change_path("/old/a", &m, &prefix("/")), "/a");
    assert_eq!(change_path("/old", &m, &prefix("/")), "/");
    assert_eq!(
        change_path("/old/a", &m, &PathChange::Full("/x".into())),
        "/x"
    );

    let headers = HeaderMap::new();
    let req = RequestView {
        host: "shop.example.com",
        method: &Method::GET,
        path: "/old/a",
        query: "x=1",
        headers: &headers,
    };
    let to_https = Redirect {
        scheme: Some("https".into()),
        ..Redirect::default()
    };
    assert_eq!(
        location(&to_https, &req, "http", 8080, &m),
        "https://shop.example.com/old/a?x=1"
    );
    let moved = Redirect {
        hostname: Some("new.example.com".into()),
        path: Some(prefix("/new")),
        ..Redirect::default()
    };
    // No scheme given: the listener's port is kept.
    assert_eq!(
        location(&moved, &req, "http", 8080, &m),
        "http://new.example.com:8080/new/a?x=1"
    );
    let port = Redirect {
        port: Some(8443),
        scheme: Some("https".into()),
        ..Redirect::default()
    };
    assert_eq!(
        location(&port, &req, "http", 80, &m),
        "https://shop.example.com:8443/old/a?x=1"
    );
}

#[test]
fn backends_are_drawn_by_weight_and_invalid_ones_answer_with_why() {
    let b = |name: &str, weight: u32, invalid: Option<&str>| Backend {
        namespace: "ns".into(),
        name: name.into(),
        port: 80,
        weight,
        invalid: invalid.map(Into::into),
        filters: vec![],
    };
    let rule = Rule {
        matches: vec![Match::any()],
        backends: vec![
            b("a", 3, None),
            b("b", 1, None),
            b("gone", 0, Some("no Service")),
        ],
        ..Rule::default()
    };
    let picks: Vec<&str> = (0..100)
        .map(|i| {
            rule.pick_backend(f64::from(i) / 100.0)
                .expect("pick")
                .name
                .as_str()
        })
        .collect();
    assert_eq!(picks.iter().filter(|n| **n == "a").count(), 75);
    assert_eq!(picks.iter().filter(|n| **n == "b").count(), 25);
    let broken = Rule {
        backends: vec![b("gone", 1, Some("Service ns/gone not found"))],
        ..rule.clone()
    };
    assert_eq!(
        broken.pick_backend(0.5).expect_err("invalid"),
        "Service ns/gone not found"
    );
    let none = Rule {
        backends: vec![],
        ..rule
    };
    assert!(none.pick_backend(0.1).is_err());
}
