//! Which identities a node may obtain: its own agent identity, the service accounts of pods
//! scheduled on it, and the identities of the Gateways of Signet's GatewayClass it serves (all of
//! them, unless a Gateway's `signet.dev/nodes` selector names fewer: `placement`). Nothing
//! else, so a compromised node cannot mint identities for workloads or Gateways served
//! elsewhere.
//!
//! Pods come from the cluster-state directory of ordinary Kubernetes manifests (DESIGN.md,
//! "Cluster state"), parsed with k8s-openapi's `Pod` and re-read when the files change. A
//! directory that fails to parse is reported and the previous state stays in force.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::placement::Placement;
use crate::server::auth::NodeName;
use crate::spiffe::{SpiffeId, TrustDomain};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    #[error("ImpersonatedIdentity `{value}` is not a SPIFFE ID: {reason}")]
    InvalidIdentity { value: String, reason: String },
    #[error("{id} is outside trust domain {trust_domain}; this CA signs only its own trust domain")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error(
        "{id} is not a workload identity (spiffe://<td>/ns/<namespace>/sa/<service-account>) nor a Signet Gateway's (spiffe://<td>/ns/<namespace>/gateway/<name>)"
    )]
    NotWorkload { id: SpiffeId },
    #[error(
        "{id}: no Gateway {namespace}/{name} of a GatewayClass with controllerName {controller}"
    )]
    NoSuchGateway {
        id: SpiffeId,
        namespace: String,
        name: String,
        controller: &'static str,
    },
    #[error("node {node} may not obtain {id}: that Gateway is served by {placement}")]
    GatewayNotOnNode {
        id: SpiffeId,
        node: NodeName,
        placement: String,
    },
    #[error("{id}: that Gateway is served by no node: {reason}")]
    GatewayPlacedNowhere { id: SpiffeId, reason: String },
    #[error(
        "node {node} may not obtain {id}: no pod with service account {namespace}/{service_account} is scheduled on {node}"
    )]
    NotOnNode {
        id: SpiffeId,
        node: NodeName,
        namespace: String,
        service_account: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct StateError {
    pub path: PathBuf,
    pub reason: String,
}

/// One scheduled pod, reduced to what authorisation needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScheduledPod {
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    pub name: String,
}

/// Reads every `*.yaml`/`*.yml` file under `dir` (recursively, in name order) and returns the
/// pods scheduled on a node that are not finished. Other kinds are skipped.
pub fn load_pods(dir: &Path) -> Result<Vec<ScheduledPod>, StateError> {
    let mut pods = Vec::new();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|e| StateError {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        pods_in_file(&file, &text, &mut pods)?;
    }
    pods.sort();
    Ok(pods)
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    let (files, unreadable) = crate::files::manifests(dir);
    match unreadable.into_iter().next() {
        Some((path, e)) => Err(StateError {
            path,
            reason: e.to_string(),
        }),
        None => Ok(files),
    }
}

fn pods_in_file(file: &Path, text: &str, pods: &mut Vec<ScheduledPod>) -> Result<(), StateError> {
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |reason: String| StateError {
            path: file.to_owned(),
            reason: format!("document {}: {reason}", index + 1),
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(e.to_string()))?;
        collect(value, pods).map_err(err)?;
    }
    Ok(())
}

fn collect(value: serde_yaml::Value, pods: &mut Vec<ScheduledPod>) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("Pod") => {
            let pod: Pod = serde_yaml::from_value(value).map_err(|e| format!("Pod: {e}"))?;
            if let Some(p) = scheduled(pod) {
                pods.push(p);
            }
            Ok(())
        }
        Some("List") => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    collect(item, pods)?;
                }
            }
            Ok(())
        }
        Some(_) => Ok(()),
        None => Err("manifest has no `kind`".into()),
    }
}

pub use crate::workload::{NotAWorkload, not_a_workload};

/// A pod as authorisation sees it, if it is scheduled and a mesh workload (`not_a_workload`).
pub fn scheduled(pod: Pod) -> Option<ScheduledPod> {
    if not_a_workload(&pod).is_some() {
        return None;
    }
    let spec = pod.spec?;
    Some(ScheduledPod {
        node: spec.node_name?,
        namespace: pod.metadata.namespace.unwrap_or_else(|| "default".into()),
        service_account: spec.service_account_name?,
        name: pod.metadata.name.unwrap_or_default(),
    })
}

pub use crate::files::{Fingerprint, fingerprint};

pub use crate::spiffe::GATEWAY_CONTROLLER;

/// Node name → its labels.
pub type NodeLabels = HashMap<String, BTreeMap<String, String>>;

/// What may be issued: `(node, namespace, service account)` triples, and the Signet Gateways
/// with the nodes that serve them (by the nodes' labels).
#[derive(Debug, Default)]
struct Index {
    pods: HashSet<(String, String, String)>,
    gateways: HashMap<(String, String), Result<Placement, String>>,
    node_labels: NodeLabels,
}

/// A Gateway of Signet's GatewayClass and where it is served (an error when its
/// `signet.dev/nodes` annotation does not parse: nowhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedGateway {
    pub namespace: String,
    pub name: String,
    pub placement: Result<Placement, String>,
}

/// What the CA authorises from: scheduled pods, Signet Gateways, and each Node's labels.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub pods: Vec<ScheduledPod>,
    pub gateways: Vec<PlacedGateway>,
    pub node_labels: NodeLabels,
}

/// Every Gateway whose GatewayClass is Signet's, and every Node's labels, from the manifests
/// under `dir`.
fn load_gateways_and_nodes(dir: &Path) -> Result<(Vec<PlacedGateway>, NodeLabels), StateError> {
    let (mut classes, mut gateways) = (HashSet::new(), Vec::new());
    let mut node_labels = HashMap::new();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|e| StateError {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(v) = serde_yaml::Value::deserialize(doc) else {
                continue; // `load_pods` reports syntax errors
            };
            let s = |v: &serde_yaml::Value, path: &[&str]| {
                path.iter()
                    .try_fold(v, |v, k| v.get(k))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            let strings = |v: &serde_yaml::Value, path: &[&str]| -> BTreeMap<String, String> {
                path.iter()
                    .try_fold(v, |v, k| v.get(k))
                    .and_then(|m| serde_yaml::from_value(m.clone()).ok())
                    .unwrap_or_default()
            };
            match s(&v, &["kind"]).as_deref() {
                Some("GatewayClass")
                    if s(&v, &["spec", "controllerName"]).as_deref()
                        == Some(GATEWAY_CONTROLLER) =>
                {
                    classes.extend(s(&v, &["metadata", "name"]));
                }
                Some("Gateway") => {
                    if let (Some(name), Some(class)) = (
                        s(&v, &["metadata", "name"]),
                        s(&v, &["spec", "gatewayClassName"]),
                    ) {
                        let ns =
                            s(&v, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
                        let annotations = strings(&v, &["metadata", "annotations"]);
                        gateways.push((
                            class,
                            PlacedGateway {
                                namespace: ns,
                                name,
                                placement: Placement::of(Some(&annotations)),
                            },
                        ));
                    }
                }
                Some("Node") => {
                    if let Some(name) = s(&v, &["metadata", "name"]) {
                        node_labels.insert(name, strings(&v, &["metadata", "labels"]));
                    }
                }
                _ => {}
            }
        }
    }
    let gateways = gateways
        .into_iter()
        .filter(|(class, _)| classes.contains(class))
        .map(|(_, g)| g)
        .collect();
    Ok((gateways, node_labels))
}

fn load_view(dir: &Path) -> Result<ClusterView, StateError> {
    let pods = load_pods(dir)?;
    let (gateways, node_labels) = load_gateways_and_nodes(dir)?;
    Ok(ClusterView {
        pods,
        gateways,
        node_labels,
    })
}

/// Decides which identity a node may obtain.
#[derive(Debug)]
pub struct NodeAuthorizer {
    trust_domain: TrustDomain,
    agent_identity: SpiffeId,
    /// `None` when the API server feeds it (`replace`).
    dir: Option<PathBuf>,
    index: RwLock<Arc<Index>>,
    seen: Mutex<Fingerprint>,
}

impl NodeAuthorizer {
    /// Loads the directory once; a broken directory at start-up is an error (nothing in force).
    pub fn new(
        trust_domain: TrustDomain,
        agent_identity: SpiffeId,
        dir: &Path,
    ) -> Result<Self, StateError> {
        let seen = fingerprint(dir);
        let view = load_view(dir)?;
        Ok(Self {
            trust_domain,
            agent_identity,
            dir: Some(dir.to_owned()),
            index: RwLock::new(Arc::new(index(view))),
            seen: Mutex::new(seen),
        })
    }

    /// Empty until `replace` gives it the cluster (Kubernetes mode): until then every workload
    /// identity is refused, which is the safe way to be wrong.
    pub fn from_api(trust_domain: TrustDomain, agent_identity: SpiffeId) -> Self {
        Self {
            trust_domain,
            agent_identity,
            dir: None,
            index: RwLock::new(Arc::default()),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Puts a new view of the cluster in force.
    pub fn replace(&self, view: ClusterView) {
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index(view));
    }

    /// Re-reads the directory if any file changed. On a parse error the previous pods stay in
    /// force and the error is returned for logging. `Ok(true)` means new state was loaded.
    pub fn refresh(&self) -> Result<bool, StateError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let now = fingerprint(dir);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return Ok(false);
        }
        // Remember the fingerprint even on failure, so a broken file is reported once per change.
        *seen = now;
        let view = load_view(dir)?;
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(index(view));
        Ok(true)
    }

    /// The identity `node` gets for a request naming `requested` (ztunnel's
    /// `ImpersonatedIdentity`), or its own agent identity when it names none.
    pub fn authorize(
        &self,
        node: &NodeName,
        requested: Option<&str>,
    ) -> Result<SpiffeId, AuthzError> {
        let Some(value) = requested else {
            return Ok(self.agent_identity.clone());
        };
        let id = SpiffeId::parse(value).map_err(|e| AuthzError::InvalidIdentity {
            value: value.chars().take(256).collect(),
            reason: e.to_string(),
        })?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(AuthzError::ForeignTrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
            });
        }
        if id == self.agent_identity {
            return Ok(id);
        }
        let index = self.index.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((ns, name)) = id.namespace_and_gateway() {
            let (namespace, name) = (ns.to_owned(), name.to_owned());
            return match index.gateways.get(&(namespace.clone(), name.clone())) {
                None => Err(AuthzError::NoSuchGateway {
                    namespace,
                    name,
                    controller: GATEWAY_CONTROLLER,
                    id: id.clone(),
                }),
                Some(Err(reason)) => Err(AuthzError::GatewayPlacedNowhere {
                    id: id.clone(),
                    reason: reason.clone(),
                }),
                Some(Ok(p))
                    if p.everywhere()
                        || index.node_labels.get(&node.0).is_some_and(|l| p.admits(l)) =>
                {
                    Ok(id.clone())
                }
                Some(Ok(p)) => Err(AuthzError::GatewayNotOnNode {
                    id: id.clone(),
                    node: node.clone(),
                    placement: p.to_string(),
                }),
            };
        }
        let Some((ns, sa)) = id.namespace_and_service_account() else {
            return Err(AuthzError::NotWorkload { id });
        };
        if index
            .pods
            .contains(&(node.0.clone(), ns.to_owned(), sa.to_owned()))
        {
            Ok(id)
        } else {
            Err(AuthzError::NotOnNode {
                node: node.clone(),
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
                id,
            })
        }
    }
}

fn index(view: ClusterView) -> Index {
    Index {
        pods: view
            .pods
            .iter()
            .map(|p| {
                (
                    p.node.clone(),
                    p.namespace.clone(),
                    p.service_account.clone(),
                )
            })
            .collect(),
        gateways: view
            .gateways
            .into_iter()
            .map(|g| ((g.namespace, g.name), g.placement))
            .collect(),
        node_labels: view.node_labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, image: web}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop}
spec:
  nodeName: node-b
  serviceAccountName: db
  containers: [{name: db, image: db}]
---
apiVersion: v1
kind: Pod
metadata: {name: job-1, namespace: shop}
spec:
  nodeName: node-a
  serviceAccountName: batch
  containers: [{name: job, image: job}]
status: {phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec:
  serviceAccountName: unscheduled
  containers: [{name: p, image: p}]
"#;

    fn authorizer(dir: &Path) -> NodeAuthorizer {
        let td = TrustDomain::parse("cluster.local").expect("td");
        let agent = SpiffeId::workload(&td, "signet-system", "signet-agent").expect("id");
        NodeAuthorizer::new(td, agent, dir).expect("load")
    }

    fn node(n: &str) -> NodeName {
        NodeName(n.into())
    }

    #[test]
    fn no_identity_for_host_network_static_or_unnamed_pods() {
        let dir = tempfile::tempdir().expect("tmp");
        let extra = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: probe, namespace: shop}\n\
             spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: probe, containers: []}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: bare, namespace: shop}\n\
             spec: {nodeName: node-a, containers: []}\n\
             ---\napiVersion: v1\nkind: Pod\n\
             metadata: {name: static, namespace: shop, annotations: {kubernetes.io/config.mirror: x}}\n\
             spec: {nodeName: node-a, serviceAccountName: static, containers: []}\n";
        std::fs::write(dir.path().join("pods.yaml"), format!("{PODS}{extra}")).expect("write");
        let a = authorizer(dir.path());
        let td = TrustDomain::parse("cluster.local").expect("td");
        for sa in ["probe", "default", "static"] {
            let id = SpiffeId::workload(&td, "shop", sa).expect("id");
            assert!(
                a.authorize(&node("node-a"), Some(id.as_str())).is_err(),
                "node-a got {id} for a pod that is not a workload"
            );
        }
        let web = SpiffeId::workload(&td, "shop", "web").expect("id");
        assert!(
            a.authorize(&node("node-a"), Some(web.as_str())).is_ok(),
            "the workload beside them"
        );
    }

    #[test]
    fn loads_only_scheduled_running_pods() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("pods.yaml"), PODS).expect("write");
        let pods = load_pods(dir.path()).expect("load");
        let names: Vec<_> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web-1", "db-1"]);
    }

    #[test]
    fn a_node_gets_only_its_own_pods_and_the_agent_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("pods.yaml"), PODS).expect("write");
        let a = authorizer(dir.path());
        assert_eq!(
            a.authorize(
                &node("node-a"),
                Some("spiffe://cluster.local/ns/shop/sa/web")
            )
            .expect("own pod")
            .as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            a.authorize(&node("node-a"), None).expect("itself").as_str(),
            "spiffe://cluster.local/ns/signet-system/sa/signet-agent"
        );
        let e = a
            .authorize(
                &node("node-a"),
                Some("spiffe://cluster.local/ns/shop/sa/db"),
            )
            .expect_err("other node");
        assert!(matches!(e, AuthzError::NotOnNode { .. }));
        assert!(
            e.to_string().contains("node-a") && e.to_string().contains("shop/sa/db"),
            "{e}"
        );
        let e = a
            .authorize(
                &node("node-a"),
                Some("spiffe://cluster.local/ns/shop/sa/batch"),
            )
            .expect_err("finished pod");
        assert!(matches!(e, AuthzError::NotOnNode { .. }));
        let e = a
            .authorize(&node("node-a"), Some("spiffe://evil.org/ns/shop/sa/web"))
            .expect_err("foreign");
        assert!(matches!(e, AuthzError::ForeignTrustDomain { .. }));
        let e = a
            .authorize(&node("node-a"), Some("spiffe://cluster.local/admin"))
            .expect_err("not workload");
        assert!(matches!(e, AuthzError::NotWorkload { .. }));
        let e = a
            .authorize(&node("node-a"), Some("https://x"))
            .expect_err("garbage");
        assert!(matches!(e, AuthzError::InvalidIdentity { .. }));
    }

    #[test]
    fn gateways_of_signets_class_only() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("pods.yaml"), PODS).expect("write");
        std::fs::write(
            dir.path().join("gw.yaml"),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: signet}\n\
             spec: {controllerName: signet.dev/gateway-controller}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: other}\n\
             spec: {controllerName: example.com/other}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: public, namespace: edge}\n\
             spec: {gatewayClassName: signet, listeners: [{name: http, port: 80, protocol: HTTP}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: theirs, namespace: edge}\n\
             spec: {gatewayClassName: other, listeners: [{name: http, port: 80, protocol: HTTP}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: pinned, namespace: edge, annotations: {signet.dev/nodes: node-restriction.kubernetes.io/edge=true}}\n\
             spec: {gatewayClassName: signet, listeners: [{name: http, port: 81, protocol: HTTP}]}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: broken, namespace: edge, annotations: {signet.dev/nodes: 'zone!=a'}}\n\
             spec: {gatewayClassName: signet, listeners: [{name: http, port: 82, protocol: HTTP}]}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {node-restriction.kubernetes.io/edge: 'true'}}\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: node-b, labels: {node-restriction.kubernetes.io/edge: 'false'}}\n",
        )
        .expect("write");
        let a = authorizer(dir.path());
        let ok = a
            .authorize(
                &node("node-b"),
                Some("spiffe://cluster.local/ns/edge/gateway/public"),
            )
            .expect("without a placement every node serves a Signet Gateway");
        assert_eq!(ok.as_str(), "spiffe://cluster.local/ns/edge/gateway/public");
        // A Gateway placed on edge nodes: node-a's identity to hold, not node-b's, nor that of
        // a node the CA knows no labels of.
        let pinned = Some("spiffe://cluster.local/ns/edge/gateway/pinned");
        a.authorize(&node("node-a"), pinned)
            .expect("node-a is an edge node");
        for other in ["node-b", "node-c"] {
            let e = a
                .authorize(&node(other), pinned)
                .expect_err("not an edge node");
            assert!(matches!(e, AuthzError::GatewayNotOnNode { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("served by nodes labelled node-restriction.kubernetes.io/edge=true"),
                "{e}"
            );
        }
        // A placement that does not parse places it nowhere.
        let e = a
            .authorize(
                &node("node-a"),
                Some("spiffe://cluster.local/ns/edge/gateway/broken"),
            )
            .expect_err("nowhere");
        assert!(matches!(e, AuthzError::GatewayPlacedNowhere { .. }), "{e}");
        assert!(e.to_string().contains("zone!=a"), "{e}");
        for refused in ["theirs", "missing"] {
            let e = a
                .authorize(
                    &node("node-a"),
                    Some(&format!("spiffe://cluster.local/ns/edge/gateway/{refused}")),
                )
                .expect_err("not a Signet Gateway");
            assert!(matches!(e, AuthzError::NoSuchGateway { .. }), "{e}");
        }
    }

    #[test]
    fn changes_are_picked_up_and_broken_files_keep_the_old_state() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("pods.yaml");
        std::fs::write(&file, PODS).expect("write");
        let a = authorizer(dir.path());
        let db = Some("spiffe://cluster.local/ns/shop/sa/db");
        assert!(a.authorize(&node("node-a"), db).is_err());
        assert!(!a.refresh().expect("unchanged"));

        // The db pod moves to node-a.
        std::fs::write(&file, PODS.replace("nodeName: node-b", "nodeName: node-a")).expect("write");
        assert!(a.refresh().expect("reloaded"));
        assert!(a.authorize(&node("node-a"), db).is_ok());

        // A broken edit is reported with the file and document, and changes nothing.
        std::fs::write(
            dir.path().join("zz-broken.yaml"),
            "kind: Pod\nmetadata: [\n",
        )
        .expect("write");
        let e = a.refresh().expect_err("broken");
        assert!(
            e.path.ends_with("zz-broken.yaml") && e.reason.contains("document 1"),
            "{e}"
        );
        assert!(
            a.authorize(&node("node-a"), db).is_ok(),
            "previous state stays in force"
        );
    }

    #[test]
    fn wrong_types_are_reported() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("p.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: 5}\n",
        )
        .expect("write");
        let e = load_pods(dir.path()).expect_err("bad type");
        assert!(e.reason.contains("Pod"), "{e}");
        std::fs::write(dir.path().join("p.yaml"), "metadata: {name: x}\n").expect("write");
        assert!(
            load_pods(dir.path())
                .expect_err("no kind")
                .reason
                .contains("kind")
        );
    }
}
