//! An in-memory datapath with the kernel datapath's semantics (diffs, capacity), so the agent's
//! logic is testable without root.

use std::collections::BTreeMap;

use signet_bpf::maps::{EndpointValue, PolicyValue};
use signet_policy::compile::Compiled;

use super::{
    Datapath, DatapathConfig, DatapathError, EndpointKey, IpcacheEntry, PolicyChanges,
    PolicyKeyOrd, desired_policy,
};

#[derive(Debug, Default, Clone)]
pub struct FakeDatapath {
    pub config: Option<DatapathConfig>,
    pub ipcache: Vec<IpcacheEntry>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub policy: BTreeMap<PolicyKeyOrd, PolicyValue>,
    pub policy_capacity: usize,
    /// Writes and removals so far, to check that reconciliation touches only what changed.
    pub policy_writes: usize,
}

impl FakeDatapath {
    pub fn with_capacity(policy_capacity: usize) -> Self {
        Self {
            policy_capacity,
            ..Self::default()
        }
    }
}

impl Datapath for FakeDatapath {
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        self.config = Some(cfg.clone());
        Ok(())
    }

    fn reconcile_ipcache(&mut self, entries: &[IpcacheEntry]) -> Result<(), DatapathError> {
        let mut e = entries.to_vec();
        e.sort();
        self.ipcache = e;
        Ok(())
    }

    fn reconcile_endpoints(
        &mut self,
        endpoints: &BTreeMap<EndpointKey, EndpointValue>,
    ) -> Result<(), DatapathError> {
        self.endpoints = endpoints.clone();
        Ok(())
    }

    fn reconcile_policy(&mut self, compiled: &Compiled) -> Result<PolicyChanges, DatapathError> {
        let desired = desired_policy(compiled);
        let stale = self
            .policy
            .keys()
            .filter(|k| !desired.contains_key(k))
            .count();
        if desired.len() + stale > self.policy_capacity {
            return Err(DatapathError::Full {
                map: signet_bpf::map_names::POLICY,
                needed: desired.len() + stale,
                capacity: self.policy_capacity,
            });
        }
        let mut changes = PolicyChanges::default();
        for (k, v) in &desired {
            if self.policy.get(k) != Some(v) {
                self.policy.insert(*k, *v);
                changes.written += 1;
            }
        }
        let removed: Vec<PolicyKeyOrd> = self
            .policy
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for k in removed {
            self.policy.remove(&k);
            changes.removed += 1;
        }
        self.policy_writes += changes.written + changes.removed;
        Ok(changes)
    }

    fn policy_entries(&self) -> Result<BTreeMap<PolicyKeyOrd, PolicyValue>, DatapathError> {
        Ok(self.policy.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_policy::compile::{Action, Entry, Key};
    use signet_policy::eval::Direction;
    use signet_policy::resource::Protocol;

    fn compiled(peers: std::ops::Range<u32>, action: Action) -> Compiled {
        let mut c = Compiled::default();
        for peer in peers {
            c.entries.insert(
                Key {
                    endpoint: 1,
                    direction: Direction::Ingress,
                    proto: Protocol::Tcp,
                    peer,
                    port: 80,
                },
                Entry { action, rule: 1 },
            );
        }
        c
    }

    #[test]
    fn reconciliation_touches_only_what_changed_and_a_full_map_keeps_the_old_state() {
        let mut dp = FakeDatapath::with_capacity(10);
        assert_eq!(
            dp.reconcile_policy(&compiled(0..4, Action::Allow))
                .expect("fits")
                .written,
            4
        );
        let changes = dp
            .reconcile_policy(&compiled(2..6, Action::Allow))
            .expect("fits");
        assert_eq!((changes.written, changes.removed), (2, 2));
        // 8 new entries plus 4 that must stay until the new ones are in: 12 > 10.
        let err = dp
            .reconcile_policy(&compiled(100..108, Action::Deny))
            .expect_err("full");
        assert!(err.to_string().contains("kept"), "{err}");
        assert_eq!(dp.policy.len(), 4, "the entries in force stayed");
        assert_eq!(dp.policy_writes, 8);
    }
}
