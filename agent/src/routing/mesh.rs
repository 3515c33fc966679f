//! The Gateway API mesh profile (GAMMA): HTTPRoutes and GRPCRoutes whose `parentRefs` name a
//! Service govern the requests mesh workloads send to that Service, applied by the source
//! node's outbound proxy with the same route engine (`routes`) and rule translation
//! (`translate`) the Gateway uses.
//!
//! A route in the Service's own namespace is a *producer* route: it applies to every client. A
//! route in another namespace is a *consumer* route: it applies only to clients of its own
//! namespace, and for them it replaces the producer routes (GEP-1426). A parentRef with a
//! `port` governs that Service port only; without one, every port. Route `hostnames` play no
//! part in the mesh: the Service already says where the request goes.
//!
//! Nothing here owns a socket. A Service no route governs is not listed, so its connections
//! stay byte streams (no parsing cost).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::model::{
    Resources, RouteStatus, Status, created, grpc_parents, not_accepted, push_route_status,
    route_parents, translated_conditions,
};
use super::routes::{Route, Router, Rule};
use super::translate::Problems;

/// The routes of one Service port.
#[derive(Debug)]
pub struct MeshService {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    /// Routes in the Service's namespace.
    pub producer: Option<Router>,
    /// Routes of other namespaces, by namespace: for clients of that namespace only.
    pub consumers: BTreeMap<String, Router>,
}

impl MeshService {
    /// The routes that apply to a client in `namespace`, if any do.
    pub fn router_for(&self, namespace: &str) -> Option<&Router> {
        self.consumers.get(namespace).or(self.producer.as_ref())
    }
}

/// Every Service port some route governs.
#[derive(Debug, Default)]
pub struct MeshRoutes {
    services: HashMap<(String, String, u16), Arc<MeshService>>,
}

impl MeshRoutes {
    pub fn get(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<MeshService>> {
        self.services
            .get(&(namespace.to_owned(), name.to_owned(), port))
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Routes gathered for one Service port before their routers are made.
#[derive(Default)]
struct Gathered {
    producer: Vec<Route>,
    consumers: BTreeMap<String, Vec<Route>>,
}

/// One route of either kind, translated.
struct Attach<'a> {
    ns: String,
    name: String,
    created: i64,
    parent: super::model::ParentRef,
    translated: &'a (Vec<Rule>, Problems),
}

/// The mesh routes of `res`, with their status written into `status`.
pub fn build(res: &Resources, status: &mut Status) -> MeshRoutes {
    let mut gathered: BTreeMap<(String, String, u16), Gathered> = BTreeMap::new();
    let http: Vec<_> = res
        .routes
        .iter()
        .map(|r| {
            let ns = super::model::ns_of(&r.metadata);
            super::translate::rules(res, &ns, r.spec.rules.as_deref().unwrap_or_default())
        })
        .collect();
    let grpc: Vec<_> = res
        .grpc_routes
        .iter()
        .map(|r| {
            let ns = super::model::ns_of(&r.metadata);
            super::translate::grpc_rules(res, &ns, r.spec.rules.as_deref().unwrap_or_default())
        })
        .collect();
    let attach_http = route_parents(res)
        .filter(|p| p.parent.is_service())
        .map(|p| Attach {
            created: created(&p.route.metadata),
            translated: &http[p.index],
            ns: p.ns,
            name: p.name,
            parent: p.parent,
        });
    for a in attach_http.collect::<Vec<_>>() {
        attach(res, a, &mut status.http_routes, &mut gathered);
    }
    let attach_grpc = grpc_parents(res)
        .filter(|p| p.parent.is_service())
        .map(|p| Attach {
            created: created(&p.route.metadata),
            translated: &grpc[p.index],
            ns: p.ns,
            name: p.name,
            parent: p.parent,
        });
    for a in attach_grpc.collect::<Vec<_>>() {
        attach(res, a, &mut status.grpc_routes, &mut gathered);
    }
    let services = gathered
        .into_iter()
        .map(|((ns, name, port), g)| {
            let service = MeshService {
                namespace: ns.clone(),
                name: name.clone(),
                port,
                producer: (!g.producer.is_empty()).then(|| Router::new(g.producer)),
                consumers: g
                    .consumers
                    .into_iter()
                    .map(|(ns, routes)| (ns, Router::new(routes)))
                    .collect(),
            };
            ((ns, name, port), Arc::new(service))
        })
        .collect();
    MeshRoutes { services }
}

/// Attaches one route to one Service parent, or says in its status why not.
fn attach(
    res: &Resources,
    a: Attach<'_>,
    route_status: &mut Vec<RouteStatus>,
    gathered: &mut BTreeMap<(String, String, u16), Gathered>,
) {
    let p = &a.parent;
    let refuse = |route_status: &mut Vec<RouteStatus>, reason: &str, why: String| {
        push_route_status(
            route_status,
            &a.ns,
            &a.name,
            a.parent.clone(),
            not_accepted(reason, why),
        );
    };
    let Some(ports) = res.services.get(&(p.namespace.clone(), p.name.clone())) else {
        return refuse(
            route_status,
            "NoMatchingParent",
            format!("Service {}/{} not found", p.namespace, p.name),
        );
    };
    if p.section_name.is_some() {
        return refuse(
            route_status,
            "UnsupportedValue",
            "sectionName on a Service parent is not supported; name the Service port with `port`"
                .into(),
        );
    }
    let ports: Vec<u16> = match p.port {
        None => ports.clone(),
        Some(port) => match u16::try_from(port).ok().filter(|n| ports.contains(n)) {
            Some(n) => vec![n],
            None => {
                return refuse(
                    route_status,
                    "NoMatchingParent",
                    format!("Service {}/{} has no port {port}", p.namespace, p.name),
                );
            }
        },
    };
    let (rules, problems) = a.translated;
    push_route_status(
        route_status,
        &a.ns,
        &a.name,
        a.parent.clone(),
        translated_conditions(problems),
    );
    if !problems.unsupported.is_empty() {
        return;
    }
    for port in ports {
        let route = Route {
            namespace: a.ns.clone(),
            name: a.name.clone(),
            created: a.created,
            hostnames: vec![],
            rules: rules.clone(),
        };
        let g = gathered
            .entry((p.namespace.clone(), p.name.clone(), port))
            .or_default();
        if a.ns == p.namespace {
            g.producer.push(route);
        } else {
            g.consumers.entry(a.ns.clone()).or_default().push(route);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderMap, Method, StatusCode};

    use super::super::model::{Resources, Status, build};
    use super::super::routes::{RequestView, Retry};

    const TD: &str = "cluster.local";

    /// Resources from YAML documents, with Services `shop/api` (ports 80, 81) and `shop/api-v2`
    /// (80) known.
    fn resources(yaml: &str) -> Resources {
        let mut res = Resources::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            match v["kind"].as_str() {
                Some("HTTPRoute") => res.routes.push(serde_json::from_value(v).expect("route")),
                Some("GRPCRoute") => res
                    .grpc_routes
                    .push(serde_json::from_value(v).expect("grpc route")),
                Some("Gateway") => res
                    .gateways
                    .push(serde_json::from_value(v).expect("gateway")),
                Some("GatewayClass") => res.classes.push(serde_json::from_value(v).expect("class")),
                Some("Namespace") => {
                    let labels =
                        serde_json::from_value(v["metadata"]["labels"].clone()).unwrap_or_default();
                    let name = v["metadata"]["name"].as_str().expect("name").to_owned();
                    res.namespace_labels.insert(name, labels);
                }
                other => panic!("unexpected kind {other:?}"),
            }
        }
        res.services = [
            (("shop".into(), "api".into()), vec![80, 81]),
            (("shop".into(), "api-v2".into()), vec![80]),
        ]
        .into();
        res
    }

    fn parents(status: &Status, name: &str) -> Vec<(String, String, String, String)> {
        status
            .http_routes
            .iter()
            .chain(&status.grpc_routes)
            .filter(|r| r.name == name)
            .flat_map(|r| {
                r.parents.iter().flat_map(|p| {
                    p.conditions.iter().map(|c| {
                        (
                            p.parent.to_string(),
                            c.type_.clone(),
                            c.status.clone(),
                            format!("{}: {}", c.reason, c.message),
                        )
                    })
                })
            })
            .collect()
    }

    fn view<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            host: "api.shop",
            method,
            path,
            query: "",
            headers,
        }
    }

    #[test]
    fn a_route_on_a_service_governs_its_ports_producer_for_all_consumer_for_its_namespace() {
        let res = resources(
            "\
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  hostnames: [ignored.example]
  rules:
  - backendRefs: [{name: api, port: 80, weight: 90}, {name: api-v2, port: 80, weight: 10}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 2, codes: [503, 502], backoff: 10ms}
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: mine, namespace: web}
spec:
  parentRefs: [{group: '', kind: Service, name: api, namespace: shop}]
  rules:
  - backendRefs: [{name: api-v2, namespace: shop, port: 80}]
",
        );
        let cfg = build(&res, &TD.parse().expect("td"));
        assert_eq!(
            parents(&cfg.status, "split"),
            [
                (
                    "Service shop/api:80".into(),
                    "Accepted".into(),
                    "True".into(),
                    "Accepted: ".into()
                ),
                (
                    "Service shop/api:80".into(),
                    "ResolvedRefs".into(),
                    "True".into(),
                    "ResolvedRefs: ".into()
                ),
            ]
        );
        // The consumer route's backendRef crosses namespaces without a grant: its rule answers
        // 500, and status says why.
        assert!(
            parents(&cfg.status, "mine")
                .iter()
                .any(|(_, t, s, m)| t == "ResolvedRefs"
                    && s == "False"
                    && m.starts_with("RefNotPermitted")),
            "{:?}",
            parents(&cfg.status, "mine")
        );
        let port80 = cfg.mesh.get("shop", "api", 80).expect("port 80 governed");
        let port81 = cfg
            .mesh
            .get("shop", "api", 81)
            .expect("port 81: the consumer route has no port");
        assert!(port81.producer.is_none());
        assert!(
            port81.router_for("shop").is_none(),
            "no producer route on 81"
        );
        assert!(port81.router_for("web").is_some());
        assert!(
            cfg.mesh.get("shop", "api-v2", 80).is_none(),
            "no route governs api-v2"
        );

        let headers = HeaderMap::new();
        let get = Method::GET;
        let for_shop = port80.router_for("shop").expect("producer");
        let m = for_shop.route(&view(&get, "/x", &headers)).expect("match");
        assert_eq!(m.route.name, "split", "hostnames play no part in the mesh");
        assert_eq!(m.rule.timeouts.request, Some(Duration::from_secs(2)));
        assert_eq!(
            m.rule.timeouts.backend_request,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            m.rule.retry,
            Some(Retry {
                attempts: 2,
                codes: vec![StatusCode::SERVICE_UNAVAILABLE, StatusCode::BAD_GATEWAY],
                backoff: Duration::from_millis(10),
            })
        );
        let picks: Vec<String> = (0..100)
            .map(|i| {
                m.rule
                    .pick_backend(f64::from(i) / 100.0)
                    .expect("pick")
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(picks.iter().filter(|n| *n == "api-v2").count(), 10);
        // For clients in `web`, their own route replaces the producer's.
        let for_web = port80.router_for("web").expect("consumer");
        assert_eq!(
            for_web
                .route(&view(&get, "/x", &headers))
                .expect("m")
                .route
                .name,
            "mine"
        );
    }

    #[test]
    fn a_field_signet_does_not_serve_refuses_the_route_by_name_and_is_not_served() {
        let res = resources(
            "\
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: mirror, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules:
  - filters:
    - type: CORS
      cors: {allowOrigins: ['https://example.com']}
    backendRefs: [{name: api, port: 80}]
  - sessionPersistence: {sessionName: s}
    backendRefs: [{name: api, port: 80}]
  - timeouts: {request: 1s, backendRequest: 2s}
    backendRefs:
    - name: api
      port: 80
      filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: lost, namespace: shop}
spec:
  parentRefs:
  - {group: '', kind: Service, name: nowhere}
  - {group: '', kind: Service, name: api, port: 9999}
  - {group: '', kind: Service, name: api, sectionName: http}
  - {group: example.com, kind: Mesh, name: m}
  rules: [{backendRefs: [{name: api, port: 80}]}]
",
        );
        let cfg = build(&res, &TD.parse().expect("td"));
        let refused = parents(&cfg.status, "mirror");
        // Accepted=False, and ResolvedRefs as the spec wants it on every parent status.
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert_eq!(
            (refused[1].1.as_str(), refused[1].2.as_str()),
            ("ResolvedRefs", "True")
        );
        let (_, type_, status, message) = &refused[0];
        assert_eq!((type_.as_str(), status.as_str()), ("Accepted", "False"));
        for named in [
            "UnsupportedValue: ",
            "rules[0].filters[0]: filter type CORS is not supported",
            "rules[1].sessionPersistence",
            "rules[2].timeouts: backendRequest (2s) must not be longer than request (1s)",
            "rules[2].backendRefs[0].filters[0]",
        ] {
            assert!(message.contains(named), "{named:?} in {message}");
        }
        assert!(cfg.mesh.is_empty(), "a refused route governs nothing");
        let lost = parents(&cfg.status, "lost");
        let reason = |parent: &str| {
            let (_, _, _, m) = lost
                .iter()
                .find(|(p, ..)| p == parent)
                .unwrap_or_else(|| panic!("{parent} in {lost:?}"));
            m.clone()
        };
        assert_eq!(
            reason("Service shop/nowhere"),
            "NoMatchingParent: Service shop/nowhere not found"
        );
        assert!(reason("Service shop/api:9999").ends_with("has no port 9999"));
        assert!(reason("Service shop/api/http").starts_with("UnsupportedValue: sectionName"));
        assert!(reason("Mesh shop/m").starts_with("NoMatchingParent"));
    }

    #[test]
    fn a_mirror_takes_a_fraction_and_its_backend_is_checked_like_any_other() {
        use super::super::routes::Filter;
        let res = resources(
            "\
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: copy, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: api-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: gone, port: 80}}
    backendRefs: [{name: api, port: 80}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: both, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api-v2}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: api, port: 80}, percent: 10, fraction: {numerator: 1}}
    backendRefs: [{name: api-v2, port: 80}]
",
        );
        let cfg = build(&res, &TD.parse().expect("td"));
        let copy = parents(&cfg.status, "copy");
        assert!(
            copy.iter().any(|(_, t, s, m)| t == "ResolvedRefs"
                && s == "False"
                && m.contains("Service shop/gone not found")),
            "{copy:?}"
        );
        let rule = &cfg
            .mesh
            .get("shop", "api", 80)
            .expect("governed")
            .producer
            .as_ref()
            .expect("r")
            .routes()[0]
            .rules[0];
        let mirrors: Vec<_> = rule
            .filters
            .iter()
            .filter_map(|f| match f {
                Filter::Mirror(m) => Some((
                    m.backend.name.clone(),
                    m.fraction,
                    m.backend.invalid.is_some(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            mirrors,
            [
                ("api-v2".to_owned(), 0.25, false),
                ("gone".to_owned(), 1.0, true)
            ]
        );
        let both = parents(&cfg.status, "both");
        assert!(
            both[0].3.contains("fraction or percent, not both"),
            "{both:?}"
        );
    }

    #[test]
    fn grpc_methods_are_paths_and_route_by_service_and_method() {
        let res = resources(
            "\
kind: GRPCRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 81}]
  rules:
  - matches: [{method: {service: test.Echo, method: Stream}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{method: {method: Health}}]
    backendRefs: [{name: api, port: 81}]
  - matches: [{method: {type: RegularExpression, service: 'test\\..*'}}]
    backendRefs: [{name: api, port: 80}]
---
kind: GRPCRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: at-the-edge, namespace: shop}
spec:
  parentRefs: [{name: public}]
",
        );
        let cfg = build(&res, &TD.parse().expect("td"));
        let svc = cfg.mesh.get("shop", "api", 81).expect("governed");
        let router = svc.router_for("shop").expect("producer");
        let headers = HeaderMap::new();
        let post = Method::POST;
        let to = |path: &str| {
            router
                .route(&view(&post, path, &headers))
                .map(|m| format!("{}:{}", m.rule.backends[0].name, m.rule.backends[0].port))
        };
        assert_eq!(to("/test.Echo/Stream").as_deref(), Some("api-v2:80"));
        assert_eq!(
            to("/grpc.health.v1.Health/Health").as_deref(),
            Some("api:81")
        );
        assert_eq!(to("/test.Echo/Unary").as_deref(), Some("api:80"));
        assert_eq!(to("/other.Svc/Unary"), None);
        let edge = parents(&cfg.status, "at-the-edge");
        assert!(edge[0].3.starts_with("NotAllowedByListeners"), "{edge:?}");
    }

    #[test]
    fn listener_selectors_admit_routes_by_namespace_labels_and_every_parent_ref_gets_a_status() {
        let res = resources(
            "\
kind: GatewayClass
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: public, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - name: teams
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector:
          matchLabels: {expose: 'yes'}
          matchExpressions: [{key: tier, operator: NotIn, values: [internal]}]
  - name: by-name
    port: 8080
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector: {matchLabels: {kubernetes.io/metadata.name: shop}}
  - name: broken
    port: 8081
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector: {matchExpressions: [{key: expose, operator: Near}]}
  - name: unset
    port: 8082
    protocol: HTTP
    allowedRoutes: {namespaces: {from: Selector}}
---
kind: Namespace
apiVersion: v1
metadata: {name: shop, labels: {expose: 'yes'}}
---
kind: Namespace
apiVersion: v1
metadata: {name: web, labels: {expose: 'yes', tier: internal}}
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: shop-route, namespace: shop}
spec:
  parentRefs:
  - {name: public, namespace: edge, sectionName: teams}
  - {name: public, namespace: edge, sectionName: by-name}
  - {name: public, namespace: edge, sectionName: broken}
  - {name: public, namespace: edge, sectionName: unset}
  rules: [{backendRefs: [{name: api, port: 80}]}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: web-route, namespace: web}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: teams}]
  rules: [{backendRefs: [{name: api, namespace: shop, port: 80}]}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: stray-route, namespace: stray}
spec:
  parentRefs: [{name: public, namespace: edge, sectionName: by-name}]
  rules: [{backendRefs: [{name: api, namespace: shop, port: 80}]}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: lost-route, namespace: edge}
spec:
  parentRefs: [{name: public, sectionName: nope}, {name: public, port: 9999}]
  rules: [{backendRefs: [{name: api, namespace: shop, port: 80}]}]
",
        );
        let cfg = build(&res, &TD.parse().expect("td"));
        let accepted = |name: &str, section: &str| {
            parents(&cfg.status, name)
                .into_iter()
                .filter(|(p, t, _, _)| p.contains(section) && t == "Accepted")
                .map(|(_, _, status, why)| (status, why))
                .collect::<Vec<_>>()
        };
        let all = parents(&cfg.status, "shop-route");
        // A labelled namespace attaches through the selector and by its own name label.
        let on = |section: &str| {
            all.iter().any(|(p, t, s, _)| {
                p.ends_with(&format!("/{section}")) && t == "Accepted" && s == "True"
            })
        };
        assert!(on("teams") && on("by-name"), "{all:?}");
        // Its routes never attach through a listener whose selector is malformed or missing;
        // each says why.
        let refused: Vec<&String> = all
            .iter()
            .filter(|(_, t, s, _)| t == "Accepted" && s == "False")
            .map(|(_, _, _, why)| why)
            .collect();
        assert!(
            refused.iter().any(|w| w.contains("broken")
                && w.contains("selector.matchExpressions[0].operator")
                && w.contains("Near")),
            "{all:?}"
        );
        assert!(
            refused.iter().any(|w| w.contains("unset")
                && w.contains("allowedRoutes.namespaces.selector is required")),
            "{all:?}"
        );
        // The attack: a namespace that carries the wanted label but also the excluded tier, and
        // one with no labels at all, cannot attach.
        let web = accepted("web-route", "teams");
        assert!(
            web.len() == 1 && web[0].0 == "False" && web[0].1.starts_with("NotAllowedByListeners"),
            "{web:?}"
        );
        // Every parent status carries ResolvedRefs, accepted or not (the spec's rule); the
        // refused web-route's backendRef crosses namespaces without a ReferenceGrant.
        // A parentRef whose sectionName or port names no listener is answered, not ignored.
        let lost = parents(&cfg.status, "lost-route");
        let lost_accepted: Vec<_> = lost.iter().filter(|(_, t, ..)| t == "Accepted").collect();
        assert!(
            lost_accepted.len() == 2
                && lost_accepted
                    .iter()
                    .all(|(_, _, s, why)| s == "False" && why.starts_with("NoMatchingParent")),
            "{lost:?}"
        );
        for name in ["shop-route", "web-route", "stray-route", "lost-route"] {
            let ps = parents(&cfg.status, name);
            for (parent, ..) in &ps {
                assert!(
                    ps.iter()
                        .any(|(p, t, ..)| p == parent && t == "ResolvedRefs"),
                    "{name} {parent}: {ps:?}"
                );
            }
        }
        let web_refs: Vec<_> = parents(&cfg.status, "web-route")
            .into_iter()
            .filter(|(_, t, ..)| t == "ResolvedRefs")
            .collect();
        assert!(
            web_refs.len() == 1
                && web_refs[0].2 == "False"
                && web_refs[0].3.starts_with("RefNotPermitted"),
            "{web_refs:?}"
        );
        let stray = accepted("stray-route", "by-name");
        assert!(stray.len() == 1 && stray[0].0 == "False", "{stray:?}");
    }

    #[test]
    fn gateway_acceptance_follows_its_listeners_and_route_kinds_are_checked() {
        let res = resources(
            "\
kind: GatewayClass
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: some, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - {name: ok, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: HTTPRoute}, {kind: TCPRoute}]}}
  - {name: udp, port: 53, protocol: UDP}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: none, namespace: edge}
spec:
  gatewayClassName: signet
  listeners: [{name: udp, port: 53, protocol: UDP}]
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: params, namespace: edge}
spec:
  gatewayClassName: signet
  infrastructure: {parametersRef: {group: example.test, kind: Config, name: c}}
  listeners: [{name: http, port: 8080, protocol: HTTP}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: r, namespace: edge}
spec:
  parentRefs: [{name: some, sectionName: ok}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
",
        );
        let td = signet_ca::TrustDomain::parse(TD).expect("td");
        let status = build(&res, &td).status;
        let gw = |n: &str| status.gateways.iter().find(|g| g.name == n).expect(n);
        let accepted = |n: &str| {
            let c = gw(n)
                .conditions
                .iter()
                .find(|c| c.type_ == "Accepted")
                .expect("Accepted");
            (c.status.clone(), c.reason.clone())
        };
        assert_eq!(
            accepted("some"),
            ("True".into(), "ListenersNotValid".into())
        );
        assert_eq!(
            accepted("none"),
            ("False".into(), "ListenersNotValid".into())
        );
        assert_eq!(
            accepted("params"),
            ("False".into(), "InvalidParameters".into())
        );
        let ok = &gw("some").listeners[0];
        assert_eq!(ok.supported_kinds, ["HTTPRoute"]);
        let resolved = ok
            .conditions
            .iter()
            .find(|c| c.type_ == "ResolvedRefs")
            .expect("ResolvedRefs");
        assert_eq!(
            (resolved.status.as_str(), resolved.reason.as_str()),
            ("False", "InvalidRouteKinds")
        );
        assert!(
            resolved
                .message
                .contains("gateway.networking.k8s.io/TCPRoute"),
            "{resolved:?}"
        );
        // The route still attaches to the valid kind.
        assert_eq!(ok.attached_routes, 1);
        assert!(
            gw("some").listeners[1].supported_kinds.is_empty(),
            "UDP is not served"
        );
        let class = &status.gateway_classes[0];
        assert!(
            class
                .conditions
                .iter()
                .any(|c| c.type_ == "SupportedVersion" && c.status == "True")
        );
    }

    #[test]
    fn routes_attach_to_a_listener_whose_certificates_do_not_resolve_and_it_is_not_served() {
        let res = resources(
            "\
kind: GatewayClass
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: tls, namespace: edge}
spec:
  gatewayClassName: signet
  listeners:
  - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: missing}]}}
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: r, namespace: edge}
spec:
  parentRefs: [{name: tls}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
",
        );
        let td = signet_ca::TrustDomain::parse(TD).expect("td");
        let config = build(&res, &td);
        assert!(
            config.ports.is_empty(),
            "nothing is served without a certificate"
        );
        let l = &config.status.gateways[0].listeners[0];
        assert_eq!(l.attached_routes, 1);
        let get = |t: &str| l.conditions.iter().find(|c| c.type_ == t).expect(t);
        assert_eq!(get("Accepted").status, "True");
        assert_eq!(get("ResolvedRefs").reason, "InvalidCertificateRef");
        assert_eq!(get("Programmed").status, "False");
        let route = &config.status.http_routes[0].parents[0];
        assert!(
            route
                .conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "True"),
            "{route:?}"
        );
    }

    #[test]
    fn a_gateway_on_the_nodes_addresses_lists_the_nodes_its_placement_admits() {
        let mut res = resources(
            "\
kind: GatewayClass
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: signet}
spec: {controllerName: signet.dev/gateway-controller}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: all, namespace: edge}
spec: {gatewayClassName: signet, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
kind: Gateway
apiVersion: gateway.networking.k8s.io/v1
metadata:
  name: edge-only
  namespace: edge
  annotations: {signet.dev/nodes: node-restriction.kubernetes.io/edge=true}
spec: {gatewayClassName: signet, listeners: [{name: http, port: 81, protocol: HTTP}]}
",
        );
        let edge = [(
            "node-restriction.kubernetes.io/edge".to_owned(),
            "true".to_owned(),
        )];
        res.node_addresses = vec![
            (
                std::collections::BTreeMap::new(),
                "10.0.0.2".parse().expect("ip"),
            ),
            (edge.into_iter().collect(), "10.0.0.1".parse().expect("ip")),
        ];
        let td = signet_ca::TrustDomain::parse(TD).expect("td");
        let status = build(&res, &td).status;
        let addrs = |n: &str| {
            status
                .gateways
                .iter()
                .find(|g| g.name == n)
                .expect(n)
                .addresses
                .clone()
        };
        assert_eq!(addrs("all"), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(addrs("edge-only"), ["10.0.0.1"]);
    }
}
