//! Which nodes serve a Gateway: the Gateway's `signet.dev/nodes` annotation, a Kubernetes
//! equality-based label selector on Nodes (`node-restriction.kubernetes.io/edge=true`, or a bare
//! key for "has this label"). Without it every node serves the Gateway. The CA issues a
//! Gateway's identity only to a node the selector admits, and an agent serves (and asks for)
//! only the Gateways placed on its node, so a node that serves no Gateway can hold no Gateway's
//! identity (past the TTL of one it was issued before).
//!
//! Only labels under `node-restriction.kubernetes.io/` may place a Gateway: the NodeRestriction
//! admission plugin keeps a kubelet from setting those on its own Node, while it may set most
//! others, so a compromised node could label itself into any other selector.
//!
//! An annotation that does not parse places the Gateway nowhere: it is not served, its status
//! says why, and no node may hold its identity.

use std::collections::BTreeMap;

/// The annotation on a Gateway naming the nodes that serve it.
pub const NODES_ANNOTATION: &str = "signet.dev/nodes";

/// The label prefix kubelets cannot set on their own Node (NodeRestriction).
pub const TRUSTED_PREFIX: &str = "node-restriction.kubernetes.io/";

/// One requirement: the label exists (`None`) or has this value.
type Term = (String, Option<String>);

/// The nodes a Gateway is served by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// All must hold; none means every node.
    terms: Vec<Term>,
}

impl Placement {
    /// The placement a Gateway's annotations ask for.
    pub fn of(annotations: Option<&BTreeMap<String, String>>) -> Result<Self, String> {
        match annotations.and_then(|a| a.get(NODES_ANNOTATION)) {
            None => Ok(Self::default()),
            Some(selector) => Self::parse(selector)
                .map_err(|reason| format!("annotation {NODES_ANNOTATION} `{selector}`: {reason}")),
        }
    }

    fn parse(selector: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in selector.split(',').map(str::trim) {
            if term.contains("!=") || term.contains(" in ") || term.contains(" notin ") {
                return Err(format!(
                    "`{term}`: only `key=value` and `key` terms are supported"
                ));
            }
            let (key, value) = match term.split_once('=') {
                Some((k, v)) => {
                    let v = v.strip_prefix('=').unwrap_or(v).trim();
                    if !is_label_value(v) {
                        return Err(format!("`{v}` is not a label value"));
                    }
                    (k.trim(), Some(v.to_owned()))
                }
                None => (term, None),
            };
            if !is_label_key(key) {
                return Err(format!("`{key}` is not a label key"));
            }
            if !key.starts_with(TRUSTED_PREFIX) {
                return Err(format!(
                    "`{key}`: a node may set that label on itself; place Gateways by labels under \
                     {TRUSTED_PREFIX}, which only administrators can set"
                ));
            }
            terms.push((key.to_owned(), value));
        }
        Ok(Self { terms })
    }

    /// Whether a node with `labels` serves the Gateway.
    pub fn admits(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|(k, v)| match (labels.get(k), v) {
            (Some(_), None) => true,
            (Some(have), Some(want)) => have == want,
            (None, _) => false,
        })
    }

    /// Whether every node serves it.
    pub fn everywhere(&self) -> bool {
        self.terms.is_empty()
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("every node");
        }
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        write!(f, "nodes labelled {}", terms.join(","))
    }
}

/// `[prefix/]name`: the prefix a DNS subdomain, the name 1-63 alphanumerics, `-`, `_`, `.`,
/// starting and ending alphanumeric.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    }) && !name.is_empty()
        && is_label_value(name)
}

/// Empty, or 1-63 alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn placement(selector: &str) -> Result<Placement, String> {
        Placement::of(Some(&labels(&[(NODES_ANNOTATION, selector)])))
    }

    const EDGE: &str = "node-restriction.kubernetes.io/edge";
    const ZONE: &str = "node-restriction.kubernetes.io/zone";

    #[test]
    fn a_selector_admits_the_nodes_whose_labels_match_it() {
        let edge = labels(&[(EDGE, "true"), (ZONE, "a")]);
        let worker = labels(&[(ZONE, "a")]);
        assert!(
            Placement::of(None).expect("none").admits(&worker),
            "no annotation: every node"
        );
        let p = placement(&format!("{EDGE}=true, {ZONE}==a")).expect("parses");
        assert!(p.admits(&edge));
        assert!(!p.admits(&worker));
        assert!(!p.admits(&labels(&[(EDGE, "false"), (ZONE, "a")])));
        let exists = placement(EDGE).expect("parses");
        assert!(exists.admits(&edge) && !exists.admits(&worker));
        assert_eq!(
            p.to_string(),
            format!("nodes labelled {EDGE}=true,{ZONE}=a")
        );
    }

    #[test]
    fn a_selector_that_does_not_parse_or_trusts_a_nodes_own_labels_is_an_error() {
        // Labels a kubelet may set on its own Node cannot place a Gateway.
        for bad in [
            "signet.dev/edge=true",
            "kubernetes.io/hostname=node-a",
            "zone",
        ] {
            let e = placement(bad).expect_err(bad);
            assert!(e.contains(TRUSTED_PREFIX) && e.contains(bad), "{e}");
        }
        for bad in [
            "",
            "zone!=a",
            "zone in (a)",
            "-x=1",
            "a=b c",
            "UPPER.example/x=1",
        ] {
            let e = placement(bad).expect_err(bad);
            assert!(e.contains(NODES_ANNOTATION) && e.contains(bad), "{e}");
        }
        let e = placement(&format!("{EDGE}=-v")).expect_err("value");
        assert!(e.contains("not a label value"), "{e}");
    }
}
