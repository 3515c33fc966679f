//! The Kubernetes source: kube-rs reflectors on every resource the agent reads, feeding the same
//! `ClusterObjects` the state directory gives (DESIGN.md, "Cluster state: one model, two
//! sources"). Watchers relist and reconnect with kube-runtime's default backoff; `synced` stays
//! false until every reflector has completed its first full list, and readiness waits for it.
//!
//! TLS Secrets are watched only in the agent's own namespace: the agent has no cluster-wide
//! Secret access; the CA copies the Secrets that Gateways reference there (as Cilium does), and
//! each copy is read back as the Secret it copies.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde::de::DeserializeOwned;
use signet_policy::{IdentityPolicy, SignetIdentity};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::snapshot::ClusterObjects;

/// The reflectors' stores, and a signal for every change.
#[derive(Clone)]
pub struct KubeSource {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    policies: Store<IdentityPolicy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
    nodes: Store<Node>,
    classes: Store<GatewayClass>,
    gateways: Store<Gateway>,
    routes: Store<HttpRoute>,
    grpc_routes: Store<GrpcRoute>,
    traffic_policies: Store<signet_policy::TrafficPolicy>,
    grants: Store<ReferenceGrant>,
    secrets: Store<Secret>,
    /// Numeric identities: what each number means is what these say now.
    identities: Store<SignetIdentity>,
    pools: Store<signet_policy::LoadBalancerIPPool>,
    l2: Store<signet_policy::L2AnnouncementPolicy>,
    /// Bumped on every change; each consumer keeps its own receiver, so none misses one.
    changed: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

/// Starts a reflector for `api`; its task ends with `stop`.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<watch::Sender<u64>>,
    stop: &CancellationToken,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let changed = changed.clone();
    signet_ca::kubernetes::drive(
        K::kind(&K::DynamicType::default()).into_owned(),
        watcher(api, config).default_backoff().reflect(writer),
        move || changed.send_modify(|n| *n += 1),
        stop.clone(),
    );
    reader
}

/// A copy made by the CA (`signet_ca::server::tls_copies`) stands for the Secret it copies, so
/// Gateways' `certificateRefs` resolve as written.
fn as_original(mut secret: Secret) -> Secret {
    use signet_ca::kubernetes::{
        TLS_COPY_SOURCE_NAME as SOURCE_NAME, TLS_COPY_SOURCE_NAMESPACE as SOURCE_NAMESPACE,
    };
    let origin = secret.metadata.annotations.as_ref().and_then(|a| {
        Some((
            a.get(SOURCE_NAMESPACE)?.clone(),
            a.get(SOURCE_NAME)?.clone(),
        ))
    });
    if let Some((ns, name)) = origin {
        secret.metadata.namespace = Some(ns);
        secret.metadata.name = Some(name);
    }
    secret
}

impl KubeSource {
    /// Starts every reflector. `tls_namespace` is where the CA copies the TLS Secrets Gateways
    /// use (the only Secrets an agent reads).
    pub fn start(client: kube::Client, tls_namespace: &str, stop: &CancellationToken) -> Self {
        let changed = Arc::new(watch::channel(0u64).0);
        let all = watcher::Config::default();
        let c = &client;
        Self {
            namespaces: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            pods: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            policies: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            services: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            slices: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            endpoints: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            nodes: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            classes: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            gateways: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            routes: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            grpc_routes: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            traffic_policies: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            grants: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            identities: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            pools: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            l2: reflect(Api::all(c.clone()), all.clone(), &changed, stop),
            secrets: reflect(
                Api::namespaced(c.clone(), tls_namespace),
                all.fields("type=kubernetes.io/tls"),
                &changed,
                stop,
            ),
            changed,
        }
    }

    /// SPIFFE ID → number, as the `SignetIdentity` objects say now (deleted ones dropped).
    pub fn numbers(&self) -> std::collections::BTreeMap<signet_ca::SpiffeId, u32> {
        let state = self.identities.state();
        crate::state::identities::numbers(state.iter().map(|o| &**o))
    }

    /// Waits until every reflector has listed its resource once.
    pub async fn synced(&self) {
        let _ = tokio::join!(
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.policies.wait_until_ready(),
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.endpoints.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.classes.wait_until_ready(),
            self.gateways.wait_until_ready(),
            self.routes.wait_until_ready(),
            self.grpc_routes.wait_until_ready(),
            self.traffic_policies.wait_until_ready(),
            self.grants.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.identities.wait_until_ready(),
            self.pools.wait_until_ready(),
            self.l2.wait_until_ready(),
        );
    }

    /// A receiver whose `changed()` completes after each change (changes in between coalesce).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// What the stores hold now.
    pub fn objects(&self) -> ClusterObjects {
        fn all<K: Resource + Clone>(s: &Store<K>) -> Vec<K>
        where
            K::DynamicType: Eq + Hash + Clone,
        {
            s.state().iter().map(|o| (**o).clone()).collect()
        }
        let mut objects = ClusterObjects::default();
        objects.policy.namespaces = all(&self.namespaces);
        objects.policy.pods = all(&self.pods);
        objects.policy.policies = all(&self.policies);
        objects.services = all(&self.services);
        objects.slices = all(&self.slices);
        objects.endpoints = all(&self.endpoints);
        objects.nodes = all(&self.nodes);
        objects.pools = all(&self.pools);
        objects.gateway.l2 = all(&self.l2);
        objects.gateway.classes = all(&self.classes);
        objects.gateway.gateways = all(&self.gateways);
        objects.gateway.routes = all(&self.routes);
        objects.gateway.grpc_routes = all(&self.grpc_routes);
        objects.gateway.traffic_policies = all(&self.traffic_policies);
        objects.gateway.grants = all(&self.grants);
        objects.gateway.secrets = all(&self.secrets).into_iter().map(as_original).collect();
        objects
    }
}
