//! The `IdentityPolicy` custom resource (`signet.dev/v1alpha1`, namespaced) exactly as users
//! write it. These types are the CRD's source of truth (`deploy/crds/` is generated from them)
//! and what the Kubernetes source deserialises; the standalone YAML parser (`parse`) produces
//! the same types with a position for every error.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Who may talk to the selected workloads, and whom they may talk to.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "signet.dev",
    version = "v1alpha1",
    kind = "IdentityPolicy",
    plural = "identitypolicies",
    shortname = "idp",
    namespaced,
    status = "IdentityPolicyStatus",
    doc = "Identity-based L3-L7 policy for the workloads selected in this namespace."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityPolicySpec {
    /// The workloads (pods of this namespace) the policy protects. `{}` selects all of them.
    pub selector: LabelSelector,
    /// `enforce` (default) denies; `audit` denies nothing and reports what it would deny.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: Mode,
    /// Allowed sources. Present (even empty) makes ingress default-deny for selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Allowed destinations. Present (even empty) makes egress default-deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// Denied sources; deny beats allow. Deny rules alone do not make a direction default-deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_deny: Vec<IngressDenyRule>,
    /// Denied destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<EgressDenyRule>,
    /// Request paths are normalised before `http` rules match them (dot segments, merged
    /// slashes, decoded unreserved escapes), and paths servers read differently (an encoded `/`
    /// or `\`, non-ASCII) are refused with 400. These opt out of the refusals, for this
    /// policy's `http` rules; where several policies' rules apply, all must opt out.
    #[serde(default, skip_serializing_if = "is_default")]
    pub path_normalization: crate::path::PathNormalization,
}

/// What Signet says of a policy: `Valid` (with the field path of each problem when not) and
/// `InForce` (the cluster state it belongs to loaded; one invalid resource keeps the previous
/// state in force for everything).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// An allow rule for traffic into the selected workloads.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Sources; a rule without `from` matches no one.
    #[serde(default)]
    pub from: Vec<Peer>,
    /// Destination ports; none means every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// HTTP requests allowed on these ports; present makes the ports L7-inspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
}

/// An allow rule for traffic from the selected workloads.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default)]
    pub to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Refused: the destination's ingress `http` rules are what is enforced. (Kept in the schema
    /// so that a policy carrying it is refused by name rather than pruned into a broader rule.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
}

/// A deny rule for traffic into the selected workloads (L3/L4 only).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressDenyRule {
    #[serde(default)]
    pub from: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// A deny rule for traffic from the selected workloads (L3/L4 only).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressDenyRule {
    #[serde(default)]
    pub to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
}

/// One peer: exactly one of `identity`, `gateway`, `namespaceSelector`, `entity` or `cidr`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    /// A SPIFFE ID, or one with a trailing `*` segment (`spiffe://td/ns/ops/sa/*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// One Signet Gateway by name (its identity is `spiffe://<td>/ns/<namespace>/gateway/<name>`);
    /// `entity: gateway` is any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayRef>,
    /// Workloads in namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// World addresses in this prefix (`203.0.113.0/24`, `2001:db8::/32`), as Cilium's
    /// `toCIDRSet`. Never matches the cluster's own pods and nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// With `cidr`: prefixes inside it that the peer does not include.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A Gateway API `Gateway` of Signet's class.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayRef {
    pub namespace: String,
    pub name: String,
}

/// Peers that are not named by identity.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// The node itself.
    Host,
    /// Anything outside the mesh.
    World,
    /// Signet's Gateway API listeners.
    Gateway,
    /// Every workload of the cluster, the host and remote nodes.
    Cluster,
    /// Everything.
    Any,
}

impl Entity {
    pub const ALL: [Entity; 5] = [
        Entity::Host,
        Entity::World,
        Entity::Gateway,
        Entity::Cluster,
        Entity::Any,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Entity::Host => "host",
            Entity::World => "world",
            Entity::Gateway => "gateway",
            Entity::Cluster => "cluster",
            Entity::Any => "any",
        }
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    /// Every IP protocol but TCP and UDP (ICMP echo, SCTP, ESP...), which has no ports: only
    /// rules without `ports` govern it. Not a value a policy can name; it exists so that
    /// compiled entries, the evaluator and `policy explain` can speak of such traffic.
    #[serde(skip)]
    #[schemars(skip)]
    Other,
}

impl Protocol {
    /// Every protocol the datapath keys separately, in key order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Other];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Other => "other",
        }
    }

    /// The IP protocol number as the datapath keys it; 0 (`SIGNET_PROTO_OTHER`) for the rest.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Other => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSpec {
    /// 1-65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Requests that pass on an L7-inspected port: every listed field must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRule {
    /// Allowed methods; none means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Allowed paths; none means any. A request matches if any entry matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    /// Required headers; all must be present with these values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// Exactly one of `exact`, `prefix` or `regex` (RE2 syntax, whole path).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub name: String,
    /// Exact value.
    pub value: String,
}

/// Labels as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;
