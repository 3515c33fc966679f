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
