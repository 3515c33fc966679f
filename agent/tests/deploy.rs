//! The Kubernetes manifests in `deploy/kubernetes/`: least-privilege RBAC (the agent reads no
//! Secret outside its own namespace), and the configurations shipped in the ConfigMaps parse
//! with the real parsers. (Schema validation of every manifest is `tests/validate_manifests.py`.)

use std::path::PathBuf;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};

fn deploy(file: &str) -> String {
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let path = PathBuf::from(dir).join("../deploy/kubernetes").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of `file` of `kind`, as that type.
fn of_kind<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> Vec<T> {
    serde_yaml::Deserializer::from_str(&deploy(file))
        .filter_map(|doc| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            (v.get("kind").and_then(|k| k.as_str()) == Some(kind))
                .then(|| serde_yaml::from_value(v).expect(kind))
        })
        .collect()
}

fn reads_secrets(rule: &PolicyRule) -> bool {
    let any = |list: &Option<Vec<String>>, what: &str| {
        list.iter().flatten().any(|x| x == what || x == "*")
    };
    any(&rule.api_groups, "")
        && rule
            .resources
            .iter()
            .flatten()
            .any(|r| r == "secrets" || r == "*")
        && ["get", "list", "watch"]
            .iter()
            .any(|v| rule.verbs.iter().any(|x| x == v || x == "*"))
}

#[test]
fn the_agent_has_no_cluster_wide_secret_access() {
    let bindings: Vec<ClusterRoleBinding> = of_kind("agent.yaml", "ClusterRoleBinding");
    let roles: Vec<ClusterRole> = of_kind("agent.yaml", "ClusterRole");
    let agent_roles: Vec<&str> = bindings
        .iter()
        .filter(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == "signet-agent"
                    && s.namespace.as_deref() == Some("signet-system")
            })
        })
        .map(|b| b.role_ref.name.as_str())
        .collect();
    assert!(!agent_roles.is_empty(), "the agent has a ClusterRole");
    for name in &agent_roles {
        let role = roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("ClusterRole {name} is bound but not defined"));
        for rule in role.rules.iter().flatten() {
            assert!(
                !reads_secrets(rule),
                "ClusterRole {name} lets the agent read Secrets cluster-wide: {rule:?}"
            );
        }
    }
    // Its TLS Secrets: a Role in its own namespace only.
    let role_bindings: Vec<RoleBinding> = of_kind("agent.yaml", "RoleBinding");
    let ns_roles: Vec<Role> = of_kind("agent.yaml", "Role");
    assert!(
        role_bindings
            .iter()
            .all(|b| b.metadata.namespace.as_deref() == Some("signet-system"))
    );
    assert!(
        ns_roles.iter().any(|r| {
            r.metadata.namespace.as_deref() == Some("signet-system")
                && r.rules.iter().flatten().any(reads_secrets)
        }),
        "the agent reads the copied TLS Secrets in signet-system"
    );
    // The CA may get a Secret by name (to copy a Gateway's certificate), never list or watch
    // them cluster-wide.
    for role in of_kind::<ClusterRole>("ca.yaml", "ClusterRole") {
        for rule in role.rules.iter().flatten() {
            if rule
                .resources
                .iter()
                .flatten()
                .any(|r| r == "secrets" || r == "*")
            {
                assert_eq!(rule.verbs, ["get"], "{rule:?}");
            }
        }
    }
}

#[test]
fn the_shipped_configurations_parse() {
    let dir = tempfile::tempdir().expect("tmp");
    let maps: Vec<ConfigMap> = of_kind("agent.yaml", "ConfigMap");
    let text = maps[0].data.as_ref().expect("data")["agent.yaml"].clone();
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
        config.source,
        signet_agent::config::ClusterSource::Kubernetes
    );
    assert_eq!(config.inbound.to_string(), "10.0.0.7:15008");

    let maps: Vec<ConfigMap> = of_kind("ca.yaml", "ConfigMap");
    let text = &maps[0].data.as_ref().expect("data")["ca.yaml"];
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
    assert!(matches!(
        ca.ca.source,
        signet_ca::CaSource::SharedStateDir(_)
    ));
    assert!(ca.ca.intermediate);
}
