//! Connection verdicts: what policy says of a connection between a workload of this node and a
//! peer identity on a port, from the snapshot's compiled rules, and the rule that said it. Both
//! proxy directions and the registry's recheck decide here; nothing here moves or counts bytes.

use std::net::IpAddr;
use std::sync::Arc;

use signet_ca::SpiffeId;
use signet_policy::compile::Action;
use signet_policy::eval::Direction;
use signet_policy::resource::Protocol;

use crate::flow::Reporter;
use crate::state::snapshot::{L7Rules, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed, but an audit-mode policy would deny it.
    Audit,
    Deny,
    /// Allowed at L4; every request must match one of these rules (ingress: checked by the
    /// destination's proxy; egress: by the source's, which then parses the connection).
    L7(Arc<L7Rules>),
    /// The local workload is no longer on this node.
    Gone,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Audit => "audit",
            Verdict::Deny | Verdict::Gone => "deny",
            Verdict::L7(_) => "allow_l7",
        }
    }

    /// Whether a connection admitted under `self` may stay open under `now`.
    pub fn still_allows(&self, now: &Verdict) -> bool {
        match now {
            Verdict::Deny | Verdict::Gone => false,
            Verdict::Allow | Verdict::Audit => true,
            Verdict::L7(rules) => matches!(self, Verdict::L7(old) if old == rules),
        }
    }
}

/// A verdict and the rule that gave it (`default allow` / `default deny` when no rule did).
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Rule,
}

/// What decided a connection; named only when a line is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    DefaultAllow,
    DefaultDeny,
    /// Allowed, and an audit-mode policy's default deny would refuse it.
    AuditDefaultDeny,
    /// The local address is not a pod of this node.
    NotLocal(IpAddr),
    /// A compiled rule, by its name (`namespace/name ingress[0]`).
    Named(Arc<str>),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::DefaultAllow => f.write_str("default allow"),
            Rule::DefaultDeny => f.write_str("default deny"),
            Rule::AuditDefaultDeny => f.write_str("default deny (audit mode)"),
            Rule::NotLocal(ip) => write!(f, "{ip} is not a pod of this node"),
            Rule::Named(n) => f.write_str(n),
        }
    }
}

impl From<&str> for Rule {
    fn from(name: &str) -> Self {
        Rule::Named(Arc::from(name))
    }
}

/// Decides a connection between `local` (a workload on this node: the client for `Outbound`,
/// the target for `Inbound`) and the workload identified as `peer`, on destination `port`.
pub fn decide(
    snap: &Snapshot,
    reporter: Reporter,
    local: IpAddr,
    peer: &SpiffeId,
    port: u16,
) -> Decision {
    let Some(ep) = snap.local_by_ip(local) else {
        return Decision {
            verdict: Verdict::Gone,
            rule: Rule::NotLocal(local),
        };
    };
    let direction = match reporter {
        Reporter::Outbound => Direction::Egress,
        Reporter::Inbound => Direction::Ingress,
    };
    let number = snap
        .identities
        .get(peer)
        .copied()
        .unwrap_or(signet_policy::identity::WORLD);
    let found = snap
        .compiled
        .lookup(ep.id, direction, number, port, Protocol::Tcp);
    let rule = match found {
        Some((_, e)) => match (snap.rules.names.get(&e.rule), e.action) {
            (Some(name), _) => Rule::Named(name.clone()),
            (None, Action::Deny) => Rule::DefaultDeny,
            (None, Action::Audit) => Rule::AuditDefaultDeny,
            (None, _) => Rule::DefaultAllow,
        },
        None => Rule::DefaultAllow,
    };
    let verdict = match found.map(|(k, e)| (k, e.action)) {
        None | Some((_, Action::Allow)) => Verdict::Allow,
        Some((_, Action::Deny)) => Verdict::Deny,
        Some((_, Action::Audit)) => Verdict::Audit,
        Some((key, Action::L7)) => {
            Verdict::L7(snap.rules.l7.get(&key).cloned().unwrap_or_default())
        }
    };
    Decision { verdict, rule }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_policy::model::HttpMatch;

    fn rules(path: &str) -> Verdict {
        Verdict::L7(Arc::new(vec![(
            "p/ingress/0".into(),
            vec![HttpMatch {
                methods: vec!["GET".into()],
                paths: vec![signet_policy::model::PathMatcher::Prefix(path.into())],
                headers: vec![],
                normalization: Default::default(),
            }],
        )]))
    }

    #[test]
    fn a_connection_stays_only_while_still_allowed_as_admitted() {
        use Verdict::*;
        assert!(Allow.still_allows(&Allow));
        assert!(Allow.still_allows(&Audit));
        assert!(!Allow.still_allows(&Deny));
        assert!(!Audit.still_allows(&Gone));
        // Raw bytes cannot become inspected requests mid-stream.
        assert!(!Allow.still_allows(&rules("/a")));
        assert!(rules("/a").still_allows(&rules("/a")));
        assert!(!rules("/a").still_allows(&rules("/b")));
        // Fewer restrictions: requests are still checked against the old, stricter rules.
        assert!(rules("/a").still_allows(&Allow));
    }
}
