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

#[derive(Debug, Clone)]
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
    ) -> Result<&Workload, signet_ca::SpiffeIdError> {
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
            let spec = pod.spec.unwrap_or_default();
            let status = pod.status.unwrap_or_default();
            let mut ips = Vec::new();
            for ip in status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.clone())
                .chain(status.pod_ip.clone())
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
                    pod.metadata.labels.unwrap_or_default(),
                    spec.service_account_name.as_deref().unwrap_or("default"),
                    spec.node_name.as_deref(),
                    ips,
                )
                .map_err(|e| format!("Pod {namespace}/{name}: no valid SPIFFE ID: {e}"))?;
        }
        _ => {}
    }
    Ok(())
}
