//! Which pods are mesh workloads: the one answer the CA (what it issues), the policy model (who
//! owns an address) and the agent (what it captures) share.

use k8s_openapi::api::core::v1::Pod;

/// Why a pod is not a mesh workload: it holds no identity of its own, the CA issues it nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAWorkload {
    /// It shares the node's addresses and is the node (`host`/`remote-node`).
    #[error("it runs in the node's network namespace (hostNetwork)")]
    HostNetwork,
    /// A kubelet's static pod: no service account can be named for it.
    #[error("it is the mirror of a static pod")]
    Mirror,
    /// Nothing says whose it is; `sa/default` would be a guess anyone's pod could match.
    #[error("it names no serviceAccountName")]
    NoServiceAccount,
    /// Phase Succeeded or Failed: its address may already be another pod's.
    #[error("it has finished")]
    Finished,
}

/// Why `pod` is not a mesh workload, if it is not one.
pub fn not_a_workload(pod: &Pod) -> Option<NotAWorkload> {
    let spec = pod.spec.as_ref()?;
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if spec.host_network == Some(true) {
        Some(NotAWorkload::HostNetwork)
    } else if mirror {
        Some(NotAWorkload::Mirror)
    } else if spec
        .service_account_name
        .as_deref()
        .is_none_or(str::is_empty)
    {
        Some(NotAWorkload::NoServiceAccount)
    } else if matches!(phase, Some("Succeeded" | "Failed")) {
        Some(NotAWorkload::Finished)
    } else {
        None
    }
}
