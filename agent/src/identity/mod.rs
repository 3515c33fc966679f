//! Numeric identities in Kubernetes mode (`kube`): one cluster-scoped `SignetIdentity` per
//! number, shared by every node (`kube`), collected when unused (`gc`) by the holder of a Lease
//! (`signet_ca::lease`). Standalone mode uses `signet_policy::identity::FileAllocator`.

pub mod gc;
pub mod kube;
