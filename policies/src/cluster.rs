//! The cluster as policy sees it: namespaces with labels, workloads (pods) with labels, service
//! account, node, addresses and SPIFFE ID. Read from a state directory of ordinary Kubernetes
//! manifests (k8s-openapi `Namespace` and `Pod`), the same files the agent watches.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use signet_ca::{SpiffeId, TrustDomain};

use crate::parse::{self, Diagnostic, Located};
use crate::resource::Labels;
use crate::yaml::{self, Node, Pos};

/// The label Kubernetes puts on every namespace, so selectors can name one.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("no valid SPIFFE ID: {0}")]
    Identity(#[from] signet_ca::SpiffeIdError),
    #[error("pod {0} is defined twice")]
    Duplicate(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub service_account: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    pub identity: SpiffeId,
}

impl Workload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub trust_domain: TrustDomain,
    namespaces: BTreeMap<String, Labels>,
    /// Sorted by namespace and name.
    pub workloads: Vec<Workload>,
}

impl Cluster {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            namespaces: BTreeMap::new(),
            workloads: Vec::new(),
        }
    }

    pub fn add_namespace(&mut self, name: &str, labels: Labels) {
        self.namespaces.insert(name.to_owned(), labels);
    }

    /// Adds a pod; its identity is `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn add_workload(
        &mut self,
        namespace: &str,
        name: &str,
        labels: Labels,
        service_account: &str,
        node: Option<&str>,
        ips: Vec<IpAddr>,
    ) -> Result<&Workload, ClusterError> {
        let identity = SpiffeId::workload(&self.trust_domain, namespace, service_account)?;
        let w = Workload {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels,
            service_account: service_account.to_owned(),
            node: node.map(str::to_owned),
            ips,
            identity,
        };
        let at = self
            .workloads
            .partition_point(|x| (&x.namespace, &x.name) < (&w.namespace, &w.name));
        if self
            .workloads
            .get(at)
            .is_some_and(|x| x.namespace == w.namespace && x.name == w.name)
        {
            return Err(ClusterError::Duplicate(w.key()));
        }
        self.workloads.insert(at, w);
        Ok(&self.workloads[at])
    }

    /// A namespace's labels, with the implicit `kubernetes.io/metadata.name`. Namespaces without a
    /// manifest still have that one label.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The namespace of a workload identity of this trust domain (`/ns/<ns>/sa/<sa>`).
    pub fn namespace_of<'a>(&self, id: &'a SpiffeId) -> Option<&'a str> {
        if !id.is_member_of(&self.trust_domain) {
            return None;
        }
        id.namespace_and_service_account().map(|(ns, _)| ns)
    }
}

/// Everything a state directory holds: the cluster and its policies.
#[derive(Debug, Clone)]
pub struct State {
    pub cluster: Cluster,
    pub policies: Vec<Located>,
}

/// Reads Namespaces, Pods and IdentityPolicies from every YAML file under `dir`. Any error makes
/// the whole load fail, reported with `file:line:col`.
pub fn load_state(dir: &Path, trust_domain: &TrustDomain) -> Result<State, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let files = parse::expand(&[dir.to_owned()], &mut diags);
    let mut cluster = Cluster::new(trust_domain.clone());
    let mut policies = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                diags.push(diag(&file, Pos::default(), format!("cannot read: {e}")));
                continue;
            }
        };
        let (p, d) = parse::parse_str(&file, &text);
        policies.extend(p);
        diags.extend(d);
        // Syntax errors were reported by `parse_str`.
        if let Ok(docs) = yaml::parse_documents(&text) {
            for doc in &docs {
                if let Err(e) = add_document(&mut cluster, doc) {
                    diags.push(diag(&file, doc.pos, e));
                }
            }
        }
    }
    if diags.is_empty() {
        Ok(State { cluster, policies })
    } else {
        diags.sort();
        Err(diags)
    }
}

fn diag(file: &Path, pos: Pos, message: String) -> Diagnostic {
    Diagnostic {
        file: PathBuf::from(file),
        pos,
        message,
    }
}

/// Adds a Pod object as a workload (the same for manifests and for API objects).
fn add_pod(cluster: &mut Cluster, pod: &Pod) -> Result<(), String> {
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or("Pod without metadata.name")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    // hostNetwork, static and mirror pods, and pods naming no service account, are not
    // workloads. Finished pods stay selectable (their labels still name them) but own no
    // address: the kubelet may already have given it to a new pod, which must not be taken for
    // the old one.
    use signet_ca::workload::{NotAWorkload, not_a_workload};
    let finished = match not_a_workload(pod) {
        None => false,
        Some(NotAWorkload::Finished) => true,
        Some(_) => return Ok(()),
    };
    let Some(service_account) = spec.service_account_name.as_deref() else {
        return Ok(());
    };
    let mut ips = Vec::new();
    for ip in status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .chain(status.pod_ip.clone())
        .filter(|_| !finished)
    {
        let parsed: IpAddr = ip.parse().map_err(|_| {
            format!("Pod {namespace}/{name}: status.podIP `{ip}` is not an IP address")
        })?;
        if !ips.contains(&parsed) {
            ips.push(parsed);
        }
    }
    cluster
        .add_workload(
            &namespace,
            &name,
            pod.metadata.labels.clone().unwrap_or_default(),
            service_account,
            spec.node_name.as_deref(),
            ips,
        )
        .map_err(|e| format!("Pod {namespace}/{name}: {e}"))?;
    Ok(())
}

/// The resources policy reads, as typed objects (what the Kubernetes source's reflectors hold).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<crate::resource::IdentityPolicy>,
}

/// The same `State` `load_state` builds from manifests, from typed objects. Every problem is
/// reported as `Kind namespace/name: field.path: reason`; any makes the whole build fail, so the
/// state in force stays.
pub fn state_from_objects(
    objects: &Objects,
    trust_domain: &TrustDomain,
) -> Result<State, Vec<String>> {
    let mut errors = Vec::new();
    let mut cluster = Cluster::new(trust_domain.clone());
    for ns in &objects.namespaces {
        match &ns.metadata.name {
            Some(name) => {
                cluster.add_namespace(name, ns.metadata.labels.clone().unwrap_or_default())
            }
            None => errors.push("Namespace without metadata.name".to_owned()),
        }
    }
    for pod in &objects.pods {
        if let Err(e) = add_pod(&mut cluster, pod) {
            errors.push(e);
        }
    }
    let mut policies = Vec::new();
    for r in &objects.policies {
        let key = format!(
            "{}/{}",
            r.metadata.namespace.as_deref().unwrap_or("default"),
            r.metadata.name.as_deref().unwrap_or("")
        );
        match crate::model::Policy::from_resource(r) {
            Ok(policy) => policies.push(Located {
                policy,
                resource: r.clone(),
                file: PathBuf::from(format!("IdentityPolicy {key}")),
                pos: Pos::default(),
            }),
            Err(fields) => errors.extend(
                fields
                    .into_iter()
                    .map(|f| format!("IdentityPolicy {key}: `{}`: {}", f.path, f.message)),
            ),
        }
    }
    if errors.is_empty() {
        Ok(State { cluster, policies })
    } else {
        errors.sort();
        Err(errors)
    }
}

fn add_document(cluster: &mut Cluster, doc: &Node) -> Result<(), String> {
    match doc.get("kind").and_then(Node::as_str) {
        Some("Namespace") => {
            let ns: Namespace = serde_json::from_value(parse::to_json(doc))
                .map_err(|e| format!("Namespace: {e}"))?;
            let name = ns.metadata.name.ok_or("Namespace without metadata.name")?;
            cluster.add_namespace(&name, ns.metadata.labels.unwrap_or_default());
        }
        Some("Pod") => {
            let pod: Pod =
                serde_json::from_value(parse::to_json(doc)).map_err(|e| format!("Pod: {e}"))?;
            add_pod(cluster, &pod)?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").expect("td")
    }

    #[test]
    fn a_finished_pod_owns_no_address() {
        let dir = tempfile::tempdir().expect("tmp");
        let pod = |name: &str, phase: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{nodeName: node-a, serviceAccountName: {name}, containers: []}}\n\
                 status: {{phase: {phase}, podIP: 10.0.0.7}}\n---\n"
            )
        };
        let yaml = [
            pod("job-0", "Succeeded"),
            pod("crashed-0", "Failed"),
            pod("web-0", "Running"),
        ];
        std::fs::write(dir.path().join("pods.yaml"), yaml.concat()).expect("write");
        let state = load_state(dir.path(), &td()).expect("valid state");
        let ips = |name: &str| {
            state
                .cluster
                .workload("shop", name)
                .expect("pod")
                .ips
                .clone()
        };
        assert!(ips("job-0").is_empty() && ips("crashed-0").is_empty());
        assert_eq!(
            ips("web-0"),
            vec!["10.0.0.7".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn host_network_static_and_unnamed_pods_are_not_workloads() {
        let dir = tempfile::tempdir().expect("tmp");
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: probe-0, namespace: kube-system}\n\
             spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: probe, containers: []}\n\
             status: {phase: Running, podIP: 10.0.0.1}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: etcd-node-a, namespace: kube-system, annotations: {kubernetes.io/config.mirror: abc}}\n\
             spec: {nodeName: node-a, serviceAccountName: etcd, containers: []}\n\
             status: {phase: Running, podIP: 10.0.0.9}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: bare-0, namespace: shop}\n\
             spec: {nodeName: node-a, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.8}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\n\
             spec: {nodeName: node-a, serviceAccountName: web, containers: []}\n\
             status: {phase: Running, podIP: 10.0.0.7}\n";
        std::fs::write(dir.path().join("pods.yaml"), yaml).expect("write");
        let state = load_state(dir.path(), &td()).expect("valid state");
        let names: Vec<String> = state.cluster.workloads.iter().map(Workload::key).collect();
        // The node's own address (hostNetwork) and a pod naming no account are not taken for a
        // workload, and nothing became `sa/default`.
        assert_eq!(names, ["shop/web-0"]);
        assert!(
            state
                .cluster
                .workloads
                .iter()
                .all(|w| w.service_account != "default")
        );
    }

    #[test]
    fn loads_namespaces_pods_and_policies_from_one_directory() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("all.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: x}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\n\
             spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: w, image: w}]}\n\
             status: {podIP: 10.0.0.5, podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]}\n---\n\
             apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: p, namespace: shop}\nspec: {selector: {}, ingress: []}\n",
        )
        .expect("write");
        let state = load_state(dir.path(), &td()).expect("valid state");
        let w = state.cluster.workload("shop", "web-0").expect("pod");
        assert_eq!(w.identity.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(w.ips.len(), 2);
        assert_eq!(w.node.as_deref(), Some("node-a"));
        let labels = state.cluster.namespace_labels("shop");
        assert_eq!(labels.get("team").map(String::as_str), Some("x"));
        assert_eq!(
            labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("shop")
        );
        assert_eq!(
            state.cluster.namespace_labels("none").len(),
            1,
            "implicit name label only"
        );
        assert_eq!(state.policies.len(), 1);
    }

    #[test]
    fn bad_pods_are_reported_with_file_and_position() {
        let dir = tempfile::tempdir().expect("tmp");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop}\nspec: {serviceAccountName: web, containers: []}\n";
        std::fs::write(dir.path().join("a.yaml"), format!("{pod}---\n{pod}")).expect("write");
        let d = load_state(dir.path(), &td()).expect_err("duplicate pod");
        assert!(
            d[0].to_string()
                .contains("a.yaml:6:1: Pod shop/web-0: pod shop/web-0 is defined twice"),
            "{d:?}"
        );
        std::fs::write(
            dir.path().join("a.yaml"),
            pod.replace(
                "spec: {serviceAccountName: web, containers: []}",
                "spec: {serviceAccountName: web, containers: []}\nstatus: {podIP: not-an-ip}",
            ),
        )
        .expect("write");
        let d = load_state(dir.path(), &td()).expect_err("bad ip");
        assert!(d[0].message.contains("not-an-ip"), "{d:?}");
    }
}
