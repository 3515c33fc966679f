//! Services: a connect to a ClusterIP and port goes to one ready endpoint, spread round-robin.
//! Built from k8s-openapi `Service` and `EndpointSlice` objects (`discovery.k8s.io/v1`), matched
//! by the `kubernetes.io/service-name` label and by port name, as kube-proxy does; legacy
//! `v1/Endpoints` are mirrored into slices first, as Kubernetes itself does.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One service port's ready endpoints.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/name`.
    pub service: String,
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

/// ClusterIP:port → backends.
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_vip: HashMap<SocketAddr, Backend>,
    /// (namespace, name, port) → its endpoints, for every Service, headless ones (no ClusterIP)
    /// and those with hand-written EndpointSlices included: what routes' backendRefs use.
    named: HashMap<(String, String, u16), Backend>,
}

impl ServiceTable {
    pub fn build(services: &[Service], slices: &[EndpointSlice]) -> Self {
        let mut by_vip = HashMap::new();
        let mut named = HashMap::new();
        for svc in services {
            let ns = svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let Some(name) = svc.metadata.name.clone() else {
                continue;
            };
            let Some(spec) = &svc.spec else { continue };
            let ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            let mine: Vec<&EndpointSlice> = slices
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref().unwrap_or("default") == ns
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            == Some(&name)
                })
                .collect();
            for sp in spec.ports.iter().flatten() {
                if sp.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let endpoints = ready_endpoints(&mine, sp.name.as_deref());
                named
                    .entry((
                        ns.clone(),
                        name.clone(),
                        u16::try_from(sp.port).unwrap_or(0),
                    ))
                    .or_insert_with(|| Backend {
                        service: format!("{ns}/{name}"),
                        endpoints: endpoints.clone(),
                        next: AtomicUsize::new(0),
                    });
                for ip in &ips {
                    let vip = SocketAddr::new(*ip, u16::try_from(sp.port).unwrap_or(0));
                    by_vip.entry(vip).or_insert_with(|| Backend {
                        service: format!("{ns}/{name}"),
                        endpoints: endpoints.clone(),
                        next: AtomicUsize::new(0),
                    });
                }
            }
        }
        Self { by_vip, named }
    }

    /// The endpoints of Service `namespace/name` on `port`, by name: also for headless Services
    /// and Services whose EndpointSlices were written by hand.
    pub fn named(&self, namespace: &str, name: &str, port: u16) -> Option<&Backend> {
        self.named
            .get(&(namespace.to_owned(), name.to_owned(), port))
    }

    /// A ready endpoint of Service `namespace/name` on `port`, round-robin.
    pub fn pick_named(&self, namespace: &str, name: &str, port: u16) -> Option<SocketAddr> {
        let b = self.named(namespace, name, port)?;
        if b.endpoints.is_empty() {
            return None;
        }
        let i = b.next.fetch_add(1, Ordering::Relaxed) % b.endpoints.len();
        Some(b.endpoints[i])
    }

    /// `namespace/name` → the Service's ports, for validating Gateway backendRefs.
    pub fn ports_by_service(&self) -> HashMap<(String, String), Vec<u16>> {
        let mut out: HashMap<(String, String), Vec<u16>> = HashMap::new();
        for (ns, name, port) in self.named.keys() {
            out.entry((ns.clone(), name.clone()))
                .or_default()
                .push(*port);
        }
        out
    }

    /// A ready endpoint for a connection to `vip`, round-robin; `None` if `vip` is no service
    /// or has no ready endpoint.
    pub fn pick(&self, vip: SocketAddr) -> Option<SocketAddr> {
        let b = self.by_vip.get(&vip)?;
        if b.endpoints.is_empty() {
            return None;
        }
        let i = b.next.fetch_add(1, Ordering::Relaxed) % b.endpoints.len();
        Some(b.endpoints[i])
    }

    pub fn backend(&self, vip: SocketAddr) -> Option<&Backend> {
        self.by_vip.get(&vip)
    }

    /// The ready endpoint addresses behind a ClusterIP, over all its ports.
    pub fn endpoint_ips(&self, vip: IpAddr) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .by_vip
            .iter()
            .filter(|(addr, _)| addr.ip() == vip)
            .flat_map(|(_, b)| b.endpoints.iter().map(SocketAddr::ip))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Every ClusterIP (for the ipcache, so connects to them are captured).
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.by_vip.keys().map(SocketAddr::ip).collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

/// Legacy `v1/Endpoints` as the EndpointSlices Kubernetes' mirroring controller would make of
/// them: one slice per subset, `notReadyAddresses` as not ready. Only for Services that have no
/// EndpointSlice of their own.
pub fn mirror_endpoints(endpoints: &[Endpoints], slices: &[EndpointSlice]) -> Vec<EndpointSlice> {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    let has_slice = |ns: &str, name: &str| {
        slices.iter().any(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == ns
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|n| n == name)
        })
    };
    let mut out = Vec::new();
    for e in endpoints {
        let ns = e.metadata.namespace.as_deref().unwrap_or("default");
        let Some(name) = e.metadata.name.as_deref() else {
            continue;
        };
        if has_slice(ns, name) {
            continue;
        }
        for (i, subset) in e.subsets.iter().flatten().enumerate() {
            let endpoint = |ip: &str, ready: bool| Endpoint {
                addresses: vec![ip.to_owned()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let ready = subset
                .addresses
                .iter()
                .flatten()
                .map(|a| endpoint(&a.ip, true));
            let not_ready = subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| endpoint(&a.ip, false));
            out.push(EndpointSlice {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(format!("{name}-mirror-{i}")),
                    namespace: Some(ns.to_owned()),
                    labels: Some([(SERVICE_NAME_LABEL.to_owned(), name.to_owned())].into()),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: ready.chain(not_ready).collect(),
                ports: Some(
                    subset
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| EndpointPort {
                            name: p.name.clone(),
                            port: Some(p.port),
                            protocol: p.protocol.clone(),
                            ..Default::default()
                        })
                        .collect(),
                ),
            });
        }
    }
    out
}

fn ready_endpoints(slices: &[&EndpointSlice], port_name: Option<&str>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name.unwrap_or(""))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &s.endpoints {
            // Kubernetes: a nil `ready` means ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_yaml<T: serde::de::DeserializeOwned>(y: &str) -> T {
        serde_yaml::from_str(y).expect("manifest")
    }

    #[test]
    fn legacy_endpoints_are_mirrored_unless_the_service_has_slices() {
        let svc: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec:\n  clusterIP: 10.96.0.11\n  ports: [{name: sql, port: 5432}]\n",
        );
        let eps: Endpoints = from_yaml(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: db, namespace: shop}\n\
             subsets:\n- addresses: [{ip: 10.0.1.8}]\n  notReadyAddresses: [{ip: 10.0.1.9}]\n  ports: [{name: sql, port: 5432}]\n",
        );
        let mirrored = mirror_endpoints(std::slice::from_ref(&eps), &[]);
        let t = ServiceTable::build(&[svc], &mirrored);
        let vip: SocketAddr = "10.96.0.11:5432".parse().expect("addr");
        for _ in 0..3 {
            assert_eq!(t.pick(vip), Some("10.0.1.8:5432".parse().expect("addr")));
        }
        // With an EndpointSlice for the same Service, the Endpoints object is ignored.
        let slice: EndpointSlice = from_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\n\
             ports: [{name: sql, port: 5432}]\nendpoints: [{addresses: [10.0.2.1]}]\n",
        );
        assert!(mirror_endpoints(&[eps], &[slice]).is_empty());
    }

    #[test]
    fn headless_services_and_hand_written_slices_resolve_by_name() {
        let headless: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: None, selector: {app: db}, ports: [{name: sql, port: 5432}]}\n",
        );
        // No selector: its endpoints are whatever EndpointSlice says it is theirs.
        let manual: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}\n",
        );
        let slices: Vec<EndpointSlice> = [
            "metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\n\
             ports: [{name: sql, port: 5432}]\nendpoints: [{addresses: [10.0.1.8]}, {addresses: [10.0.1.9], conditions: {ready: false}}]\n",
            "metadata: {name: ext-1, namespace: shop, labels: {kubernetes.io/service-name: ext}}\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.2.1]}]\n",
        ]
        .iter()
        .map(|y| from_yaml(&format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n{y}")))
        .collect();
        let t = ServiceTable::build(&[headless, manual], &slices);
        for _ in 0..3 {
            assert_eq!(
                t.pick_named("shop", "db", 5432),
                Some("10.0.1.8:5432".parse().expect("addr"))
            );
        }
        assert_eq!(
            t.pick_named("shop", "ext", 80),
            Some("10.0.2.1:8080".parse().expect("addr"))
        );
        assert_eq!(t.pick_named("shop", "db", 80), None, "no such port");
        // A headless Service has no ClusterIP to capture, but its port is a valid backendRef.
        assert_eq!(
            t.cluster_ips(),
            ["10.96.0.12".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            t.ports_by_service()[&("shop".to_owned(), "db".to_owned())],
            [5432]
        );
    }

    #[test]
    fn a_cluster_ip_spreads_over_ready_endpoints_by_port_name() {
        let svc: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\n\
             spec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]\n",
        );
        let slice: EndpointSlice = from_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {name: api-1, namespace: shop, labels: {kubernetes.io/service-name: api}}\n\
             ports: [{name: http, port: 8080}, {name: admin, port: 9001}]\n\
             endpoints:\n- addresses: [10.0.1.5]\n  conditions: {ready: true}\n- addresses: [10.0.2.7]\n- addresses: [10.0.3.9]\n  conditions: {ready: false}\n",
        );
        let other: EndpointSlice = from_yaml(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {name: x, namespace: other, labels: {kubernetes.io/service-name: api}}\n\
             ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.9.9.9]}]\n",
        );
        let t = ServiceTable::build(&[svc], &[slice, other]);
        let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
        let picks: Vec<SocketAddr> = (0..4).filter_map(|_| t.pick(vip)).collect();
        let a: SocketAddr = "10.0.1.5:8080".parse().expect("addr");
        let b: SocketAddr = "10.0.2.7:8080".parse().expect("addr");
        assert_eq!(
            picks,
            [a, b, a, b],
            "round-robin over ready endpoints only, same namespace only"
        );
        assert_eq!(
            t.pick("10.96.0.10:9000".parse().expect("addr")),
            Some("10.0.1.5:9001".parse().expect("addr"))
        );
        assert_eq!(t.pick("10.96.0.10:81".parse().expect("addr")), None);
        assert_eq!(t.backend(vip).expect("backend").service, "shop/api");
        assert_eq!(
            t.cluster_ips(),
            ["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn headless_services_and_services_without_endpoints() {
        let headless: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: h, namespace: shop}\nspec: {clusterIP: None, ports: [{port: 80}]}\n",
        );
        let empty: Service = from_yaml(
            "apiVersion: v1\nkind: Service\nmetadata: {name: e, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n",
        );
        let t = ServiceTable::build(&[headless, empty], &[]);
        assert_eq!(
            t.cluster_ips(),
            ["10.96.0.11".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            t.pick("10.96.0.11:80".parse().expect("addr")),
            None,
            "no ready endpoint: refuse, do not guess"
        );
    }
}
