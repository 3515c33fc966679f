//! The Kubernetes manifests in `deploy/kubernetes/`, as the kustomization installs them:
//! least-privilege RBAC, evaluated the way the API server authorizes a request (no agent verb
//! reaches the CA's keys or its rotation Lease), and the configurations shipped in the
//! ConfigMaps parse with the real parsers. (`tests/validate_manifests.py` renders the
//! kustomization with a real kustomize and validates it against the schemas.)

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};

fn deploy_dir() -> PathBuf {
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(dir).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document the kustomization in `dir` installs: its `resources` and `bases`, files or
/// directories with their own kustomization, in order.
fn kustomize(dir: &Path) -> Vec<serde_yaml::Value> {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&read(&dir.join("kustomization.yaml"))).expect("kustomization");
    let mut docs = Vec::new();
    for field in ["bases", "resources"] {
        for entry in k
            .get(field)
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let path = dir.join(entry.as_str().expect("a path"));
            if path.is_dir() {
                docs.extend(kustomize(&path));
            } else {
                for doc in serde_yaml::Deserializer::from_str(&read(&path)) {
                    let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
                    if !v.is_null() {
                        docs.push(v);
                    }
                }
            }
        }
    }
    docs
}

fn installed() -> Vec<serde_yaml::Value> {
    kustomize(&deploy_dir().join("kubernetes"))
}

/// Every installed object of `kind`, as that type.
fn of_kind<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    installed()
        .into_iter()
        .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some(kind))
        .map(|v| serde_yaml::from_value(v).expect(kind))
        .collect()
}

const VERBS: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// A request as the API server authorizes it.
struct Request<'a> {
    verb: &'a str,
    group: &'a str,
    resource: &'a str,
    /// None for a cluster-scoped resource, or a request across all namespaces.
    namespace: Option<&'a str>,
    /// None for create, list, watch and deletecollection: RBAC's `resourceNames` cannot grant
    /// those.
    name: Option<&'a str>,
}

/// The shipped RBAC, evaluated as Kubernetes' RBAC authorizer does: a request is allowed when a
/// binding whose subjects include the service account points at a role with a matching rule.
struct Rbac {
    cluster_roles: Vec<ClusterRole>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    bindings: Vec<RoleBinding>,
}

fn covers(list: &[String], what: &str) -> bool {
    list.iter().any(|x| x == what || x == "*")
}

fn rule_allows(rule: &PolicyRule, r: &Request) -> bool {
    let names = rule.resource_names.as_deref().unwrap_or_default();
    covers(rule.api_groups.as_deref().unwrap_or_default(), r.group)
        && covers(rule.resources.as_deref().unwrap_or_default(), r.resource)
        && covers(&rule.verbs, r.verb)
        && (names.is_empty() || r.name.is_some_and(|n| names.iter().any(|x| x == n)))
}

fn is_subject(s: &Subject, binding_ns: Option<&str>, (ns, sa): (&str, &str)) -> bool {
    match s.kind.as_str() {
        "ServiceAccount" => s.name == sa && s.namespace.as_deref().or(binding_ns) == Some(ns),
        "User" => s.name == format!("system:serviceaccount:{ns}:{sa}"),
        "Group" => [
            "system:authenticated".to_owned(),
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{ns}"),
        ]
        .contains(&s.name),
        _ => false,
    }
}

impl Rbac {
    fn shipped() -> Self {
        Self {
            cluster_roles: of_kind("ClusterRole"),
            cluster_bindings: of_kind("ClusterRoleBinding"),
            roles: of_kind("Role"),
            bindings: of_kind("RoleBinding"),
        }
    }

    fn cluster_role(&self, name: &str) -> &ClusterRole {
        self.cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("ClusterRole {name} is bound but not shipped"))
    }

    fn allows(&self, who: (&str, &str), r: &Request) -> bool {
        let any =
            |rules: &Option<Vec<PolicyRule>>| rules.iter().flatten().any(|x| rule_allows(x, r));
        let cluster_wide = self.cluster_bindings.iter().any(|b| {
            b.subjects
                .iter()
                .flatten()
                .any(|s| is_subject(s, None, who))
                && any(&self.cluster_role(&b.role_ref.name).rules)
        });
        let in_namespace = r.namespace.is_some_and(|ns| {
            self.bindings.iter().any(|b| {
                let bns = b.metadata.namespace.as_deref();
                bns == Some(ns)
                    && b.subjects.iter().flatten().any(|s| is_subject(s, bns, who))
                    && match b.role_ref.kind.as_str() {
                        "ClusterRole" => any(&self.cluster_role(&b.role_ref.name).rules),
                        _ => self
                            .roles
                            .iter()
                            .find(|role| {
                                role.metadata.name.as_deref() == Some(&b.role_ref.name)
                                    && role.metadata.namespace.as_deref() == Some(ns)
                            })
                            .is_some_and(|role| any(&role.rules)),
                    }
            })
        });
        cluster_wide || in_namespace
    }

    /// Every verb `who` holds on `resource` `name` (and on the collection) in `namespace`.
    fn verbs(
        &self,
        who: (&str, &str),
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Vec<String> {
        let mut held = Vec::new();
        for verb in VERBS {
            for name in [Some(name), None] {
                let r = Request {
                    verb,
                    group,
                    resource,
                    namespace,
                    name,
                };
                if self.allows(who, &r) && !held.iter().any(|h| h == verb) {
                    held.push(verb.to_owned());
                }
            }
        }
        held
    }
}

const AGENT: (&str, &str) = ("signet-system", "signet-agent");
const CA: (&str, &str) = ("signet-system", "signet-ca");

fn config_of(kind_file: &str, name: &str) -> serde_yaml::Value {
    let maps: Vec<ConfigMap> = of_kind("ConfigMap");
    let map = maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("ConfigMap {name}"));
    serde_yaml::from_str(&map.data.as_ref().expect("data")[kind_file]).expect("config yaml")
}

#[test]
fn no_agent_verb_reaches_the_ca_keys_or_any_secret_but_the_gateway_copies() {
    let rbac = Rbac::shipped();
    let ca_config = config_of("ca.yaml", "signet-ca");
    let key_secret = ca_config["caSecret"].as_str().expect("caSecret");
    let copies = ca_config["gatewayTlsNamespace"]
        .as_str()
        .expect("gatewayTlsNamespace");
    assert_eq!(
        config_of("agent.yaml", "signet-agent")["gatewayTlsNamespace"].as_str(),
        Some(copies),
        "the agents read the copies where the CA writes them"
    );
    assert_ne!(
        copies, "signet-system",
        "the copies are not beside the CA's keys"
    );
    // The CA's keys, by name, by collection, cluster-wide: nothing.
    for ns in [Some("signet-system"), None] {
        let held = rbac.verbs(AGENT, "", "secrets", ns, key_secret);
        assert!(
            held.is_empty(),
            "the agent holds {held:?} on Secret {key_secret} ({ns:?})"
        );
    }
    // No other Secret anywhere either, but the copies, read-only.
    for ns in ["shop", "kube-system", "default"] {
        let held = rbac.verbs(AGENT, "", "secrets", Some(ns), "any");
        assert!(
            held.is_empty(),
            "the agent holds {held:?} on Secrets in {ns}"
        );
    }
    assert_eq!(
        rbac.verbs(AGENT, "", "secrets", Some(copies), "edge.shop-tls"),
        ["get", "list", "watch"]
    );
    // The CA itself reads and rewrites its keys (by name) and creates them once.
    let ca_held = rbac.verbs(CA, "", "secrets", Some("signet-system"), key_secret);
    for verb in ["get", "update", "create"] {
        assert!(
            ca_held.iter().any(|v| v == verb),
            "the CA needs {verb} on its keys: {ca_held:?}"
        );
    }
    // ... and gets other Secrets only one by one, never listing or watching them cluster-wide.
    let ca_elsewhere = rbac.verbs(CA, "", "secrets", Some("shop"), "shop-tls");
    assert_eq!(ca_elsewhere, ["get"]);
    // Node labels place Gateways, so the CA's authoriser reflects Nodes.
    let ca_nodes = rbac.verbs(CA, "", "nodes", None, "");
    assert!(
        ["list", "watch"]
            .iter()
            .all(|v| ca_nodes.iter().any(|h| h == v)),
        "the CA reflects Nodes: {ca_nodes:?}"
    );
    // Nothing else lives in the copies' namespace: no workload, no ConfigMap, no other Secret.
    for doc in installed() {
        let ns = doc["metadata"]["namespace"].as_str();
        let kind = doc["kind"].as_str().unwrap_or_default();
        if ns == Some(copies) {
            assert!(matches!(kind, "Role" | "RoleBinding"), "{kind} in {copies}");
        }
    }
    assert!(
        installed()
            .iter()
            .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == copies)
    );
}

#[test]
fn agents_cannot_create_leases_or_take_the_ca_rotation_lease() {
    let rbac = Rbac::shipped();
    let group = "coordination.k8s.io";
    for lease in ["signet-status", "signet-identity-gc"] {
        assert_eq!(
            rbac.verbs(AGENT, group, "leases", Some("signet-system"), lease),
            ["get", "update"],
            "{lease}"
        );
    }
    let rotation = signet_ca::server::ca_secret::ROTATION_LEASE;
    let held = rbac.verbs(AGENT, group, "leases", Some("signet-system"), rotation);
    assert!(
        held.is_empty(),
        "the agent holds {held:?} on Lease {rotation}"
    );
    assert_eq!(
        rbac.verbs(CA, group, "leases", Some("signet-system"), rotation),
        ["get", "update"]
    );
    // Nobody needs create: every Lease an elector takes ships with the manifests.
    let shipped: Vec<String> = installed()
        .iter()
        .filter(|d| d["kind"] == "Lease" && d["metadata"]["namespace"] == "signet-system")
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    for lease in ["signet-status", "signet-identity-gc", rotation] {
        assert!(
            shipped.iter().any(|s| s == lease),
            "Lease {lease} is not shipped: {shipped:?}"
        );
    }
    // Agents may write SignetIdentities (create, delete) and nothing else outside status.
    let held = rbac.verbs(AGENT, "signet.dev", "signetidentities", None, "300");
    assert_eq!(held, ["get", "list", "watch", "create", "delete"]);
}

#[test]
fn the_evaluator_sees_what_the_old_rbac_granted() {
    // The evaluator must be able to fail: a Role like the one shipped before (Secrets readable in
    // signet-system, Leases creatable) is caught.
    let mut rbac = Rbac::shipped();
    let old: Role = serde_yaml::from_str(
        "metadata: {name: old, namespace: signet-system}\n\
         rules:\n\
         - {apiGroups: [''], resources: [secrets], verbs: [get, list, watch]}\n\
         - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update]}\n",
    )
    .expect("role");
    let binding: RoleBinding = serde_yaml::from_str(
        "metadata: {name: old, namespace: signet-system}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: old}\n\
         subjects: [{kind: ServiceAccount, name: signet-agent, namespace: signet-system}]\n",
    )
    .expect("binding");
    rbac.roles.push(old);
    rbac.bindings.push(binding);
    assert_eq!(
        rbac.verbs(
            AGENT,
            "",
            "secrets",
            Some("signet-system"),
            "signet-ca-keys"
        ),
        ["get", "list", "watch"]
    );
    assert_eq!(
        rbac.verbs(
            AGENT,
            "coordination.k8s.io",
            "leases",
            Some("signet-system"),
            "signet-ca-rotation"
        ),
        ["get", "create", "update"]
    );
}

#[test]
fn the_shipped_configurations_parse() {
    let dir = tempfile::tempdir().expect("tmp");
    let maps: Vec<ConfigMap> = of_kind("ConfigMap");
    let agent = maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some("signet-agent"))
        .expect("agent ConfigMap");
    let text = agent.data.as_ref().expect("data")["agent.yaml"].clone();
    // The files the config names exist in the pod; here, stand-ins.
    let root = dir.path().join("root-cert.pem");
    std::fs::write(
        &root,
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    )
    .expect("root");
    let token = dir.path().join("token");
    std::fs::write(&token, "t").expect("token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        .expect("chmod");
    let text = text
        .replace("/etc/signet/ca/root-cert.pem", &root.display().to_string())
        .replace(
            "/var/run/secrets/signet/token",
            &token.display().to_string(),
        );
    let config =
        signet_agent::config::AgentConfig::parse(&text, &dir.path().join("agent.yaml"), dir.path())
            .expect("the agent's ConfigMap parses")
            .for_node(Some("worker-1"), Some("10.0.0.7".parse().expect("ip")))
            .expect("per node");
    assert_eq!(
        config.cluster.source,
        signet_agent::config::ClusterSource::Kubernetes
    );
    assert_eq!(config.listen.inbound.to_string(), "10.0.0.7:15008");
    assert_eq!(config.cluster.gateway_tls_namespace, "signet-gateway-tls");

    let ca_map = maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some("signet-ca"))
        .expect("CA ConfigMap");
    let text = &ca_map.data.as_ref().expect("data")["ca.yaml"];
    let ca = signet_ca::server::config::ServerConfig::from_yaml(
        text,
        &dir.path().join("ca.yaml"),
        dir.path(),
    )
    .expect("the CA's ConfigMap parses");
    assert_eq!(ca.cluster, signet_ca::server::config::CaCluster::Kubernetes);
    // Keys from the Secret: followed by every replica, rotated by the Lease holder, signing
    // through an intermediate.
    assert_eq!(ca.ca_secret.as_deref(), Some("signet-ca-keys"));
    assert_eq!(
        ca.gateway_tls_namespace,
        config.cluster.gateway_tls_namespace
    );
    assert!(matches!(
        ca.ca.source,
        signet_ca::CaSource::SharedStateDir(_)
    ));
    assert!(ca.ca.intermediate);
}
