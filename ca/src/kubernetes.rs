//! Kubernetes plumbing the CA and the node agents share: the API client (kubeconfig or
//! in-cluster), the driver that runs one reflector's watch stream, leader election
//! ([`Elector`], a `coordination.k8s.io/v1` Lease), and the names both sides use for the
//! Gateway TLS copies. Nothing here knows what the CA issues or what the agent enforces.

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

pub use crate::lease::Elector;

/// Annotations on a Gateway TLS Secret copy: where the original lives. The CA writes them, the
/// agents read the copy back as the original.
pub const TLS_COPY_SOURCE_NAMESPACE: &str = "signet.dev/source-namespace";
pub const TLS_COPY_SOURCE_NAME: &str = "signet.dev/source-name";

/// A client for the API server: from `kubeconfig` when given (a process outside a pod), else the
/// usual inference (`KUBECONFIG`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, KubeconfigError> {
    let config = match kubeconfig {
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeconfigError(e.to_string()))?,
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeconfigError(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeconfigError(format!("{}: {e}", path.display())))?
        }
    };
    kube::Client::try_from(config).map_err(|e| KubeconfigError(e.to_string()))
}

/// Why no API client could be configured.
#[derive(Debug, thiserror::Error)]
#[error(
    "Kubernetes client configuration: {0} (is KUBECONFIG set, or does the pod have a service account?)"
)]
pub struct KubeconfigError(String);

/// Drives one watch stream (a reflector's) until `stop`, calling `changed` after every event
/// and logging failures, which the stream's backoff then retries. `what` names it in the log.
pub fn drive<S, T, E>(
    what: String,
    stream: S,
    changed: impl Fn() + Send + 'static,
    stop: CancellationToken,
) where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => match event {
                    Some(Ok(_)) => changed(),
                    Some(Err(e)) => tracing::warn!(kind = %what, error = %e, "watch failed; retrying with backoff"),
                    None => return,
                },
            }
        }
    });
}
