//! Numeric identities in Kubernetes mode (`kube`): one cluster-scoped `SignetIdentity` per
//! number, shared by every node. Standalone mode uses `signet_policy::identity::FileAllocator`.

pub mod kube;
