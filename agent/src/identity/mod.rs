//! Collecting numeric identities in Kubernetes mode (`gc`): the holder of a Lease
//! (`signet_ca::lease`) deletes the `SignetIdentity` numbers no workload or Gateway uses any more.
//! Allocating and reading them is the read model's (`state::identities`); standalone mode uses
//! `signet_policy::identity::FileAllocator`.

pub mod gc;
