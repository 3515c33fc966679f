//! Reading `IdentityPolicy` manifests from YAML files and directories, reporting every error in a
//! file as `file:line:col: reason`.
//!
//! Three passes per document, each reporting everything it finds:
//! 1. syntax (yaml-rust2, with positions);
//! 2. structure against the CRD's own OpenAPI schema (unknown fields, wrong types, missing
//!    fields, enums, ranges), so the CRD and this parser cannot disagree;
//! 3. meaning (`model::Policy::from_resource`: SPIFFE patterns, selectors, regexes, `http` on deny
//!    rules or UDP ports), whose field paths are mapped back to positions.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kube::CustomResourceExt as _;
use serde_json::Value as Json;

use crate::model::{FieldError, Policy};
use crate::resource::IdentityPolicy;
use crate::yaml::{self, Node, Pos, Value};

pub const API_VERSION: &str = "signet.dev/v1alpha1";
pub const KIND: &str = "IdentityPolicy";

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.pos, self.message)
    }
}

/// A policy read from a file, with where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    pub policy: Policy,
    pub resource: IdentityPolicy,
    pub file: PathBuf,
    pub pos: Pos,
}

/// Parses every `IdentityPolicy` document in `text`. Documents of other kinds are skipped
/// (a state directory mixes Pods, Namespaces and policies). Returns all diagnostics.
pub fn parse_str(file: &Path, text: &str) -> (Vec<Located>, Vec<Diagnostic>) {
    let mut out = Vec::new();
    let mut diags = Vec::new();
    let docs = match yaml::parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            diags.push(Diagnostic {
                file: file.to_owned(),
                pos: e.pos,
                message: format!("YAML syntax error: {}", e.message),
            });
            return (out, diags);
        }
    };
    for doc in &docs {
        let mut errs = Vec::new();
        if let Some((policy, resource)) = parse_document(doc, &mut errs) {
            out.push(Located {
                policy,
                resource,
                file: file.to_owned(),
                pos: doc.pos,
            });
        }
        diags.extend(errs.into_iter().map(|(pos, message)| Diagnostic {
            file: file.to_owned(),
            pos,
            message,
        }));
    }
    (out, diags)
}

/// Reads files and directories (recursively, `*.yaml`/`*.yml`, in name order). The whole set is
/// returned only if there is not a single error anywhere: a policy set applies whole or not at all.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Located>, Vec<Diagnostic>> {
    let mut policies = Vec::new();
    let mut diags = Vec::new();
    for file in expand(paths, &mut diags) {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let (p, d) = parse_str(&file, &text);
                policies.extend(p);
                diags.extend(d);
            }
            Err(e) => diags.push(Diagnostic {
                file: file.clone(),
                pos: Pos::default(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    check_unique(&policies, &mut diags);
    if diags.is_empty() {
        Ok(policies)
    } else {
        diags.sort();
        Err(diags)
    }
}

/// The YAML files named by `paths`, directories expanded (`signet_ca::files::manifests`).
pub fn expand(paths: &[PathBuf], diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let (found, unreadable) = signet_ca::files::manifests(p);
            for (dir, e) in unreadable {
                diags.push(Diagnostic {
                    file: dir,
                    pos: Pos::default(),
                    message: format!("cannot read directory: {e}"),
                });
            }
            files.extend(found);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            diags.push(Diagnostic {
                file: p.clone(),
                pos: Pos::default(),
                message: "no such file or directory".into(),
            });
        }
    }
    files
}

fn check_unique(policies: &[Located], diags: &mut Vec<Diagnostic>) {
    let mut seen = std::collections::BTreeMap::new();
    for p in policies {
        let key = (p.policy.namespace.clone(), p.policy.name.clone());
        if let Some((file, pos)) = seen.insert(key, (p.file.clone(), p.pos)) {
            diags.push(Diagnostic {
                file: p.file.clone(),
                pos: p.pos,
                message: format!(
                    "IdentityPolicy {}/{} is defined twice (first at {}:{})",
                    p.policy.namespace,
                    p.policy.name,
                    file.display(),
                    pos
                ),
            });
        }
    }
}

fn parse_document(doc: &Node, errs: &mut Vec<(Pos, String)>) -> Option<(Policy, IdentityPolicy)> {
    if doc.value == Value::Null {
        return None;
    }
    let Value::Map(_) = &doc.value else {
        errs.push((
            doc.pos,
            format!("a manifest must be a mapping, found {}", doc.kind_name()),
        ));
        return None;
    };
    let kind = doc.get("kind").and_then(Node::as_str);
    let api_version = doc.get("apiVersion").and_then(Node::as_str);
    match (api_version, kind) {
        (_, None) => {
            errs.push((doc.pos, "manifest has no `kind`".into()));
            return None;
        }
        (_, Some(k)) if k != KIND => return None,
        (Some(API_VERSION), Some(_)) => {}
        (other, Some(_)) => {
            let pos = doc.get("apiVersion").map_or(doc.pos, |n| n.pos);
            errs.push((
                pos,
                format!(
                    "IdentityPolicy apiVersion must be `{API_VERSION}`, found {:?}",
                    other.unwrap_or("nothing")
                ),
            ));
            return None;
        }
    }
    let before = errs.len();
    check_schema(doc, schema(), "", errs);
    check_metadata(doc, errs);
    if errs.len() > before {
        return None;
    }
    let json = to_json(doc);
    let resource: IdentityPolicy = match serde_json::from_value(json) {
        Ok(r) => r,
        Err(e) => {
            errs.push((doc.pos, format!("IdentityPolicy: {e}")));
            return None;
        }
    };
    match Policy::from_resource(&resource) {
        Ok(policy) => Some((policy, resource)),
        Err(field_errors) => {
            for FieldError { path, message } in field_errors {
                errs.push((locate(doc, &path), message));
            }
            None
        }
    }
}

fn check_metadata(doc: &Node, errs: &mut Vec<(Pos, String)>) {
    let Some(meta) = doc.get("metadata") else {
        errs.push((doc.pos, "missing `metadata` (with at least `name`)".into()));
        return;
    };
    match meta.get("name") {
        None => errs.push((meta.pos, "missing `metadata.name`".into())),
        Some(n) => match n.as_str() {
            Some(name) if is_dns_subdomain(name) => {}
            _ => errs.push((
                n.pos,
                "`metadata.name` must be a DNS subdomain (lowercase a-z, 0-9, `-`, `.`, at most 253)".into(),
            )),
        },
    }
    if let Some(ns) = meta.get("namespace") {
        match ns.as_str() {
            Some(s) if crate::model::is_dns_label(s) => {}
            _ => errs.push((
                ns.pos,
                "`metadata.namespace` must be a DNS label (lowercase a-z, 0-9, `-`, at most 63)"
                    .into(),
            )),
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::model::is_dns_label)
}

/// The CRD's OpenAPI v3 schema, generated once from the Rust types.
fn schema() -> &'static Json {
    static SCHEMA: OnceLock<Json> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = serde_json::to_value(IdentityPolicy::crd()).expect("the CRD serialises");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks `node` against an OpenAPI v3 schema, reporting everything that does not fit.
fn check_schema(node: &Node, schema: &Json, path: &str, errs: &mut Vec<(Pos, String)>) {
    if node.value == Value::Null {
        // Absent and null are the same to Kubernetes for optional fields; required ones are
        // reported by the parent.
        return;
    }
    let ty = schema.get("type").and_then(Json::as_str);
    let at = if path.is_empty() {
        "document".to_owned()
    } else {
        format!("`{path}`")
    };
    match ty {
        Some("object") => check_object(node, schema, path, &at, errs),
        Some("array") => match &node.value {
            Value::Seq(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        check_schema(item, item_schema, &format!("{path}[{i}]"), errs);
                    }
                }
            }
            _ => errs.push((
                node.pos,
                format!("{at} must be a list, found {}", node.kind_name()),
            )),
        },
        Some("string") => match node.kind_name() {
            "a string" => {
                if let Some(allowed) = schema.get("enum").and_then(Json::as_array) {
                    let text = node.as_str().unwrap_or_default();
                    if !allowed.iter().any(|a| a.as_str() == Some(text)) {
                        let names: Vec<_> = allowed.iter().filter_map(Json::as_str).collect();
                        errs.push((
                            node.pos,
                            format!(
                                "{at}: unknown value `{text}`; expected one of {}",
                                names.join(", ")
                            ),
                        ));
                    }
                }
            }
            other => errs.push((
                node.pos,
                format!("{at} must be a string, found {other} (quote it if you mean text)"),
            )),
        },
        Some("integer") => match (
            node.kind_name(),
            node.as_str().and_then(|s| s.parse::<i64>().ok()),
        ) {
            ("an integer", Some(v)) => {
                let min = schema.get("minimum").and_then(Json::as_f64);
                let max = schema.get("maximum").and_then(Json::as_f64);
                if min.is_some_and(|m| (v as f64) < m) || max.is_some_and(|m| (v as f64) > m) {
                    errs.push((
                        node.pos,
                        format!(
                            "{at}: {v} is out of range {}-{}",
                            min.unwrap_or(f64::MIN),
                            max.unwrap_or(f64::MAX)
                        ),
                    ));
                }
            }
            (other, _) => errs.push((node.pos, format!("{at} must be an integer, found {other}"))),
        },
        Some("boolean") if node.kind_name() != "a boolean" => {
            errs.push((
                node.pos,
                format!("{at} must be true or false, found {}", node.kind_name()),
            ));
        }
        _ => {}
    }
}

fn check_object(node: &Node, schema: &Json, path: &str, at: &str, errs: &mut Vec<(Pos, String)>) {
    let Value::Map(entries) = &node.value else {
        errs.push((
            node.pos,
            format!("{at} must be a mapping, found {}", node.kind_name()),
        ));
        return;
    };
    let props = schema.get("properties").and_then(Json::as_object);
    let extra = schema.get("additionalProperties");
    let mut seen = std::collections::HashSet::new();
    for (k, v) in entries {
        let Some(key) = k.as_str() else {
            errs.push((
                k.pos,
                format!("{at}: keys must be strings, found {}", k.kind_name()),
            ));
            continue;
        };
        if !seen.insert(key) {
            errs.push((k.pos, format!("{at}: `{key}` appears twice")));
            continue;
        }
        let child = join(path, key);
        if let Some(s) = props.and_then(|p| p.get(key)) {
            check_schema(v, s, &child, errs);
        } else if let Some(s) = extra.filter(|e| e.is_object()) {
            check_schema(v, s, &child, errs);
        } else if path.is_empty() && matches!(key, "apiVersion" | "kind" | "metadata" | "status") {
            // Checked by `parse_document` and `check_metadata`.
        } else if key == "http" && path.contains("Deny[") {
            errs.push((
                k.pos,
                format!("{at}: deny rules cannot be L7 (`http`): a deny applies to whole connections; put `http` on an allow rule"),
            ));
        } else if props.is_some() && !is_open(path) {
            let mut names: Vec<_> = props
                .into_iter()
                .flat_map(|p| p.keys())
                .map(String::as_str)
                .collect();
            names.sort_unstable();
            errs.push((
                k.pos,
                format!(
                    "{at}: unknown field `{key}`; expected one of {}",
                    names.join(", ")
                ),
            ));
        }
    }
    if let Some(required) = schema.get("required").and_then(Json::as_array) {
        for r in required.iter().filter_map(Json::as_str) {
            if !seen.contains(r) {
                errs.push((node.pos, format!("{at}: missing required field `{r}`")));
            }
        }
    }
}

/// Objects whose unknown fields Kubernetes keeps (metadata, status).
fn is_open(path: &str) -> bool {
    path == "metadata" || path == "status"
}

/// Converts a node to JSON the way a YAML 1.2 core-schema reader would.
pub(crate) fn to_json(node: &Node) -> Json {
    match &node.value {
        Value::Null => Json::Null,
        Value::Scalar { text, plain: false } => Json::String(text.clone()),
        Value::Scalar { text, plain: true } => match node.kind_name() {
            "a boolean" => Json::Bool(text.eq_ignore_ascii_case("true")),
            "an integer" => text
                .parse::<i64>()
                .map(Json::from)
                .unwrap_or_else(|_| Json::String(text.clone())),
            "a number" => text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Json::Number)
                .unwrap_or_else(|| Json::String(text.clone())),
            _ => Json::String(text.clone()),
        },
        Value::Seq(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), to_json(v))))
                .collect(),
        ),
    }
}

/// The position of a field path such as `spec.ingress[0].from[1].identity`; the deepest node
/// that exists when the path goes further than the document.
fn locate(doc: &Node, path: &str) -> Pos {
    let mut node = doc;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            match node.get(key) {
                Some(n) => node = n,
                None => return node.pos,
            }
        }
        for idx in indexes.split('[').filter(|s| !s.is_empty()) {
            let Ok(i) = idx.trim_end_matches(']').parse::<usize>() else {
                return node.pos;
            };
            match &node.value {
                Value::Seq(items) if i < items.len() => node = &items[i],
                _ => return node.pos,
            }
        }
    }
    node.pos
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {matchLabels: {app: payments-api}}
  mode: enforce
  ingress:
  - from:
    - identity: spiffe://cluster.local/ns/checkout/sa/checkout
    - identity: spiffe://cluster.local/ns/ops/sa/*
    - namespaceSelector: {matchLabels: {team: payments}}
    - entity: gateway
    ports: [{port: 8443, protocol: TCP}]
    http:
    - methods: [GET, POST]
      paths: [{prefix: /v1/charges}, {exact: /healthz}, {regex: "^/v1/refunds/[0-9]+$"}]
      headers: [{name: x-tenant, value: acme}]
  ingressDeny:
  - from: [{entity: world}]
---
apiVersion: v1
kind: Namespace
metadata: {name: payments}
"#;

    fn diags(text: &str) -> Vec<String> {
        let (_, d) = parse_str(Path::new("p.yaml"), text);
        d.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_the_design_example_and_skips_other_kinds() {
        let (p, d) = parse_str(Path::new("p.yaml"), GOOD);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(p.len(), 1);
        let policy = &p[0].policy;
        assert_eq!(policy.id(), "payments/payments-api");
        let ingress = policy.ingress.as_ref().expect("ingress");
        assert_eq!(ingress[0].peers.len(), 4);
        assert_eq!(ingress[0].http.as_ref().expect("http")[0].paths.len(), 3);
        assert_eq!(policy.ingress_deny.len(), 1);
        assert!(policy.egress.is_none());
    }

    #[test]
    fn every_error_in_a_file_is_reported_with_its_position() {
        let bad = r#"apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: bad, namespace: payments}
spec:
  selector: {matchLabels: {app: x}}
  colour: blue
  ingress:
  - from:
    - entity: everyone
    - identity: spiffe://cluster.local/ns/a/sa/b/
    ports: [{port: 70000}, {port: 53, protocol: SCTP}, {port: "80"}]
  ingressDeny:
  - from: [{entity: world}]
    http: [{methods: [GET]}]
"#;
        let d = diags(bad);
        let expect = [
            "p.yaml:6:3: `spec`: unknown field `colour`",
            "p.yaml:9:15: `spec.ingress[0].from[0].entity`: unknown value `everyone`; expected one of host, world, gateway, cluster, any",
            "p.yaml:11:20: `spec.ingress[0].ports[0].port`: 70000 is out of range 1-65535",
            "p.yaml:11:49: `spec.ingress[0].ports[1].protocol`: unknown value `SCTP`; expected one of TCP, UDP",
            "p.yaml:11:63: `spec.ingress[0].ports[2].port` must be an integer, found a string",
            "p.yaml:14:5: `spec.ingressDeny[0]`: deny rules cannot be L7",
        ];
        for e in expect {
            assert!(
                d.iter().any(|x| x.starts_with(e)),
                "missing `{e}` in {d:#?}"
            );
        }
        assert_eq!(d.len(), expect.len(), "{d:#?}");
    }

    #[test]
    fn meaning_errors_point_at_the_field() {
        let bad = r#"apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: bad}
spec:
  selector:
    matchExpressions: [{key: app, operator: Near, values: [x]}]
  ingress:
  - from:
    - identity: spiffe://cluster.local/ns/a/sa/b/
    - {entity: host, identity: "spiffe://td/x"}
    ports: [{port: 53, protocol: UDP}]
    http: [{paths: [{regex: "(unclosed"}, {prefix: nope}]}]
  - ports: [{port: 1}]
"#;
        let d = diags(bad);
        let expect = [
            "p.yaml:6:45: unknown operator `Near`",
            "p.yaml:9:17: `spiffe://cluster.local/ns/a/sa/b/` is not a SPIFFE ID: SPIFFE ID must not end with `/`",
            "p.yaml:10:7: a peer needs exactly one of",
            "p.yaml:11:13: port 53/UDP cannot carry `http` rules",
            "p.yaml:12:29: regex does not compile: unclosed group",
            "p.yaml:12:52: path `nope` must start with `/`",
            "p.yaml:13:5: a rule needs `from`",
        ];
        for e in expect {
            assert!(
                d.iter().any(|x| x.starts_with(e)),
                "missing `{e}` in {d:#?}"
            );
        }
        assert_eq!(d.len(), expect.len(), "{d:#?}");
    }

    #[test]
    fn cidr_peers_are_checked_where_they_are_written() {
        let bad = r#"apiVersion: signet.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: bad}
spec:
  selector: {}
  egress:
  - to:
    - {cidr: 203.0.113.9/24}
    - {cidr: 198.51.100.0/24, except: [198.51.101.0/28, nope]}
    - {entity: world, except: [10.0.0.0/8]}
    - {cidr: 2001:db8::/32, except: ["2001:db8:1::/48"]}
"#;
        let d = diags(bad);
        let expect = [
            "p.yaml:8:14: `203.0.113.9/24` has host bits set; the network is 203.0.113.0/24",
            "p.yaml:9:40: 198.51.101.0/28 is not inside 198.51.100.0/24",
            "p.yaml:9:57: `nope` is not a CIDR",
            "p.yaml:10:31: `except` needs a `cidr`",
        ];
        for e in expect {
            assert!(
                d.iter().any(|x| x.starts_with(e)),
                "missing `{e}` in {d:#?}"
            );
        }
        assert_eq!(d.len(), expect.len(), "{d:#?}");
    }

    #[test]
    fn syntax_errors_and_bad_documents() {
        let d = diags("apiVersion: signet.dev/v1alpha1\nkind: IdentityPolicy\nspec: [\n");
        assert_eq!(d.len(), 1);
        assert!(
            d[0].starts_with("p.yaml:") && d[0].contains("YAML syntax error"),
            "{d:?}"
        );
        let d = diags("apiVersion: signet.dev/v1\nkind: IdentityPolicy\nmetadata: {name: x}\n");
        assert!(
            d[0].starts_with("p.yaml:1:13: IdentityPolicy apiVersion must be"),
            "{d:?}"
        );
        let d = diags(
            "kind: IdentityPolicy\napiVersion: signet.dev/v1alpha1\nmetadata: {name: Bad_Name}\nspec: {selector: {}}\n",
        );
        assert!(
            d[0].starts_with("p.yaml:3:18: `metadata.name` must be a DNS subdomain"),
            "{d:?}"
        );
        let d = diags(
            "kind: IdentityPolicy\napiVersion: signet.dev/v1alpha1\nmetadata: {name: x}\nspec: {}\n",
        );
        assert!(
            d[0].starts_with("p.yaml:4:7: `spec`: missing required field `selector`"),
            "{d:?}"
        );
        let d = diags("- just a list\n");
        assert!(d[0].contains("must be a mapping"), "{d:?}");
    }

    #[test]
    fn a_set_with_one_error_is_rejected_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("a.yaml"), GOOD).expect("write");
        assert_eq!(
            load_paths(&[dir.path().to_owned()]).expect("valid").len(),
            1
        );
        std::fs::write(dir.path().join("b.yaml"), GOOD.replace("8443", "0")).expect("write");
        let d = load_paths(&[dir.path().to_owned()]).expect_err("one bad file");
        assert!(d.iter().any(|x| x.file.ends_with("b.yaml")), "{d:?}");
        std::fs::write(dir.path().join("b.yaml"), GOOD).expect("write");
        let d = load_paths(&[dir.path().to_owned()]).expect_err("duplicate");
        assert!(d[0].message.contains("defined twice"), "{d:?}");
    }
}
