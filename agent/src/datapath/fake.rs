//! An in-memory datapath with the kernel datapath's semantics (diffs, capacity), so the agent's
//! logic is testable without root.

use std::collections::{BTreeMap, BTreeSet};

use signet_bpf::maps::{EndpointValue, PolicyValue};
use signet_policy::compile::Compiled;

use super::{
    Capacity, Datapath, DatapathConfig, DatapathError, EndpointKey, IpcacheEntry, PolicyChanges,
    PolicyKeyOrd, desired_policy, fits,
};

#[derive(Debug, Clone)]
pub struct FakeDatapath {
    pub config: Option<DatapathConfig>,
    pub ipcache: Vec<IpcacheEntry>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub policy: BTreeMap<PolicyKeyOrd, PolicyValue>,
    /// Interfaces with the tc programs attached.
    pub interfaces: BTreeSet<String>,
    pub capacity: Capacity,
    /// Writes and removals so far, to check that reconciliation touches only what changed.
    pub policy_writes: usize,
    /// Attachments so far (an attach of an attached interface does not count).
    pub attaches: usize,
    /// Interfaces whose attachment fails, as the kernel's does for one that vanished.
    pub broken_interfaces: BTreeSet<String>,
}

impl Default for FakeDatapath {
    /// The kernel datapath's default sizes.
    fn default() -> Self {
        let sizes = super::loader::MapSizes::default();
        Self::with_capacity(Capacity {
            ipcache: sizes.ipcache as usize,
            endpoints: sizes.endpoints as usize,
            policy: sizes.policy as usize,
        })
    }
}

impl FakeDatapath {
    pub fn with_capacity(capacity: Capacity) -> Self {
        Self {
            config: None,
            ipcache: Vec::new(),
            endpoints: BTreeMap::new(),
            policy: BTreeMap::new(),
            interfaces: BTreeSet::new(),
            capacity,
            policy_writes: 0,
            attaches: 0,
            broken_interfaces: BTreeSet::new(),
        }
    }

    /// A datapath whose policy map holds `policy` entries (the others as by default).
    pub fn with_policy_capacity(policy: usize) -> Self {
        let mut dp = Self::default();
        dp.capacity.policy = policy;
        dp
    }
}

impl Datapath for FakeDatapath {
    fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), DatapathError> {
        self.config = Some(cfg.clone());
        Ok(())
    }

    fn reconcile_ipcache(&mut self, entries: &[IpcacheEntry]) -> Result<(), DatapathError> {
        let key = |e: &IpcacheEntry| (e.ip, e.prefix);
        let wanted: BTreeSet<_> = entries.iter().map(key).collect();
        let stale = self
            .ipcache
            .iter()
            .filter(|e| !wanted.contains(&key(e)))
            .count();
        fits(
            signet_bpf::map_names::IPCACHE,
            wanted.len() + stale,
            self.capacity.ipcache,
        )?;
        let mut e = entries.to_vec();
        e.sort();
        self.ipcache = e;
        Ok(())
    }

    fn reconcile_endpoints(
        &mut self,
        endpoints: &BTreeMap<EndpointKey, EndpointValue>,
    ) -> Result<(), DatapathError> {
        let netns = |k: &EndpointKey| matches!(k, EndpointKey::Netns(_));
        for (map, of_kind) in [
            (signet_bpf::map_names::EP_NETNS, true),
            (signet_bpf::map_names::EP_IFINDEX, false),
        ] {
            let wanted = endpoints.keys().filter(|k| netns(k) == of_kind).count();
            let stale = self
                .endpoints
                .keys()
                .filter(|k| netns(k) == of_kind && !endpoints.contains_key(k))
                .count();
            fits(map, wanted + stale, self.capacity.endpoints)?;
        }
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
        fits(
            signet_bpf::map_names::POLICY,
            desired.len() + stale,
            self.capacity.policy,
        )?;
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

    fn capacity(&self) -> Capacity {
        self.capacity
    }

    fn attached_programs(&self) -> Vec<String> {
        // What a loaded kernel datapath attaches to the node's cgroup.
        use signet_bpf::programs as p;
        [
            p::CONNECT4,
            p::CONNECT6,
            p::GETPEERNAME4,
            p::GETPEERNAME6,
            p::SENDMSG4,
            p::SENDMSG6,
            p::SOCKOPS,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn attach_endpoint_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if self.broken_interfaces.contains(ifname) {
            return Err(DatapathError::Attach {
                program: signet_bpf::programs::TO_ENDPOINT,
                target: ifname.to_owned(),
                reason: "No such device (os error 19)".into(),
            });
        }
        if self.interfaces.insert(ifname.to_owned()) {
            self.attaches += 1;
        }
        Ok(())
    }

    fn detach_endpoint_interfaces_except(
        &mut self,
        keep: &BTreeSet<String>,
    ) -> Result<(), DatapathError> {
        self.interfaces.retain(|i| keep.contains(i));
        Ok(())
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
        let mut dp = FakeDatapath::with_policy_capacity(10);
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
