//! What several of the agent's test files share: building snapshots from YAML the way the
//! agent does, with stable endpoint ids and numbers across builds.

#![allow(dead_code)]

use signet_agent::config::PodAnnotations;
use signet_agent::state::snapshot::{self, EndpointIds, Snapshot, Source};
use signet_ca::TrustDomain;
use signet_policy::identity::MemoryAllocator;

/// Builds snapshots for one node from manifests.
pub struct Snapshots {
    pub node: String,
    numbers: MemoryAllocator,
    ids: EndpointIds,
}

impl Snapshots {
    pub fn for_node(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            numbers: MemoryAllocator::default(),
            ids: EndpointIds::default(),
        }
    }

    /// The snapshot of `text` (a state directory holding it), compiled on `previous`'s policy.
    pub fn build(&mut self, text: &str, previous: Option<&Snapshot>) -> Snapshot {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("all.yaml"), text).expect("write");
        let mut snap = snapshot::build_loaded(
            snapshot::load_source(
                Source::Dir(dir.path()),
                &TrustDomain::parse("cluster.local").expect("td"),
            )
            .expect("loads"),
            PodAnnotations::Trusted,
            &self.node,
            &self.numbers,
            &mut self.ids,
            previous,
            1 << 16,
        )
        .expect("snapshot");
        snap.generation = previous.map_or(0, |p| p.generation + 1);
        snap
    }
}

/// One snapshot of `text` for `node`.
pub fn snapshot_of(text: &str, node: &str) -> Snapshot {
    Snapshots::for_node(node).build(text, None)
}
