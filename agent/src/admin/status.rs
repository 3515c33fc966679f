//! `GET /status`: one agent's health as JSON, what `signet status` reads from every node. It
//! holds no secrets and no flows (those are `/debug/state`'s, for this node only), so it is
//! served to whoever reaches the admin port, like readiness.
//!
//! The shape is a documented interface (README, "Operating Signet"): fields are added, never
//! renamed. [`AgentStatus::health`] is the one place that says what is OK, degraded or an error,
//! for the agent's own page and for the command line alike.

use serde::{Deserialize, Serialize};

/// A map at or above this share of its capacity is reported as degraded.
pub const MAP_WARN_PERCENT: usize = 90;

/// One agent, as its admin port reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    /// Ready (every local workload has a certificate); `not_ready` says why not.
    pub ready: bool,
    pub not_ready: Option<String>,
    /// `strict` or `permissive`.
    pub mtls_mode: String,
    /// Snapshots applied before the one in force.
    pub generation: u64,
    /// Why the latest cluster state was refused (an older one stays in force), when it was.
    pub refused: Option<String>,
    /// Objects refused one by one while the rest is in force (Kubernetes mode).
    pub refused_objects: Vec<String>,
    pub datapath: DatapathStatus,
    pub certificates: CertificatesStatus,
    pub connections: ConnectionsStatus,
    pub policies: PoliciesStatus,
    pub gateways: Vec<GatewayStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    /// Node-wide programs attached (cgroup hooks), as their links stand.
    pub programs: Vec<String>,
    /// Pod interfaces with the tc programs attached.
    pub interfaces: Vec<String>,
    pub maps: Vec<MapFill>,
    /// Local pods the kernel does not enforce, and why.
    pub unplaced: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: usize,
}

impl MapFill {
    /// Entries as a whole percentage of capacity (100 for a map of no capacity).
    pub fn percent(&self) -> usize {
        (self.entries * 100)
            .checked_div(self.capacity)
            .unwrap_or(100)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesStatus {
    /// Identities with a certificate in force.
    pub held: usize,
    /// Identities still waiting for their first certificate.
    pub waiting: Vec<String>,
    /// Identities whose latest request failed (their certificate, if any, stays in force).
    pub failing: Vec<String>,
    /// The earliest notAfter among those held, in Unix seconds.
    pub earliest_expiry: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsStatus {
    pub outbound: usize,
    pub inbound: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoliciesStatus {
    /// IdentityPolicies in force.
    pub in_force: usize,
    /// Of those, in audit mode.
    pub audit: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub namespace: String,
    pub name: String,
    pub programmed: bool,
    /// The `Programmed` condition's reason and message when it is not true.
    pub reason: Option<String>,
    /// Its own addresses (from a LoadBalancerIPPool); none: the nodes' addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// OK, degraded (serving, with something to look at) or an error (not doing its job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Degraded,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Degraded => "degraded",
            Level::Error => "error",
        }
    }
}

/// A verdict and what made it so, one line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub level: Level,
    pub reasons: Vec<String>,
}

impl AgentStatus {
    /// What is wrong, worst first: not ready is an error; a refused state, a refused object, a
    /// pod the kernel does not enforce, a map at [`MAP_WARN_PERCENT`] or more, a failing
    /// certificate request or a Gateway not programmed is degraded.
    pub fn health(&self) -> Health {
        let mut errors = Vec::new();
        let mut degraded = Vec::new();
        if !self.ready {
            errors.push(format!(
                "not ready: {}",
                self.not_ready.as_deref().unwrap_or("no reason given")
            ));
        }
        if self.datapath.programs.is_empty() {
            errors.push("no datapath program attached".into());
        }
        if let Some(why) = &self.refused {
            degraded.push(format!("latest cluster state refused: {why}"));
        }
        for o in &self.refused_objects {
            degraded.push(format!("refused {o}"));
        }
        for p in &self.datapath.unplaced {
            degraded.push(format!("not enforced in the kernel: {p}"));
        }
        for m in &self.datapath.maps {
            if m.percent() >= MAP_WARN_PERCENT {
                degraded.push(format!(
                    "map {} is {}% full ({}/{})",
                    m.name,
                    m.percent(),
                    m.entries,
                    m.capacity
                ));
            }
        }
        for id in &self.certificates.failing {
            degraded.push(format!("certificate requests failing for {id}"));
        }
        for g in self.gateways.iter().filter(|g| !g.programmed) {
            degraded.push(format!(
                "Gateway {}/{} not programmed: {}",
                g.namespace,
                g.name,
                g.reason.as_deref().unwrap_or("no reason given")
            ));
        }
        let level = if !errors.is_empty() {
            Level::Error
        } else if !degraded.is_empty() {
            Level::Degraded
        } else {
            Level::Ok
        };
        errors.extend(degraded);
        Health {
            level,
            reasons: errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> AgentStatus {
        AgentStatus {
            node: "node-a".into(),
            ready: true,
            datapath: DatapathStatus {
                programs: vec!["signet_connect4".into()],
                maps: vec![MapFill {
                    name: "signet_policy".into(),
                    entries: 10,
                    capacity: 100,
                }],
                ..DatapathStatus::default()
            },
            ..AgentStatus::default()
        }
    }

    #[test]
    fn health_names_what_is_wrong_worst_first() {
        assert_eq!(healthy().health().level, Level::Ok);
        let mut s = healthy();
        s.datapath.maps[0].entries = 95;
        let h = s.health();
        assert_eq!(h.level, Level::Degraded);
        assert_eq!(h.reasons, ["map signet_policy is 95% full (95/100)"]);
        s.ready = false;
        s.not_ready = Some("no certificate yet for spiffe://cluster.local/ns/a/sa/b".into());
        let h = s.health();
        assert_eq!(h.level, Level::Error);
        assert!(
            h.reasons[0].starts_with("not ready: no certificate yet"),
            "{h:?}"
        );
        assert_eq!(h.reasons.len(), 2);
    }

    #[test]
    fn the_shape_round_trips_in_camel_case() {
        let s = healthy();
        let json = serde_json::to_value(&s).expect("json");
        assert!(json["datapath"]["maps"][0]["capacity"].is_number());
        assert!(json.get("mtlsMode").is_some() && json.get("refusedObjects").is_some());
        assert_eq!(
            serde_json::from_value::<AgentStatus>(json).expect("back"),
            s
        );
    }
}
