//! Addresses for Gateways and Services of type LoadBalancer, from `LoadBalancerIPPool`s
//! (`signet_policy::lbipam` decides; this module reads the requesters out of the cluster objects
//! and keeps the record). Standalone mode keeps the record in a table file beside the identity
//! table, shared by every agent on the machine and written under a lock; Kubernetes mode keeps
//! it in the pools' status (`write_pools`, with optimistic concurrency).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use signet_policy::LoadBalancerIPPool;
use signet_policy::lbipam::{self, Outcome, Owner, Requester, Want};

use super::snapshot::ClusterObjects;

/// The `loadBalancerClass` of Services Signet serves (besides those that name none).
pub const LB_CLASS: &str = "signet.dev/lb";
/// Addresses a Service asks for, comma-separated (preferred over the deprecated
/// `spec.loadBalancerIP`).
pub const LB_IPS_ANNOTATION: &str = "signet.dev/lb-ips";
/// The condition written on Services (Kubernetes has no standard one).
pub const SERVICE_CONDITION: &str = "signet.dev/IPAMRequestSatisfied";

pub type Record = BTreeMap<IpAddr, (String, Owner)>;

/// Where a Gateway is served, as far as its addresses go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAddresses {
    /// No pool selects it and it asks for no address: served on its nodes' own addresses.
    Nodes,
    /// These, from the pools.
    Assigned(Vec<IpAddr>),
    /// It cannot be served: (condition, reason, message), e.g. `Programmed`/`AddressNotAssigned`.
    Refused {
        condition: &'static str,
        reason: &'static str,
        message: String,
    },
}

/// What the allocator decided for the cluster, and what could not even be asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    pub outcome: Outcome,
    /// Requesters refused before allocation (an address that is not one, a type Signet does
    /// not assign): (condition, reason, message).
    pub invalid: BTreeMap<Owner, (&'static str, &'static str, String)>,
    /// Gateways that name addresses in `spec.addresses` (they are never served on nodes'
    /// addresses instead).
    pub asked: std::collections::BTreeSet<Owner>,
    /// Every requester's labels (with the names pools select on), for announcement policies.
    pub labels: BTreeMap<Owner, signet_policy::resource::Labels>,
}

fn owner(kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Owner {
    Owner {
        kind: kind.into(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// Whether Signet gives `svc` an address: type LoadBalancer, and no other implementation's
/// `loadBalancerClass`.
pub fn is_signet_lb(svc: &k8s_openapi::api::core::v1::Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer")
            && s.load_balancer_class
                .as_deref()
                .is_none_or(|c| c == LB_CLASS)
    })
}

/// Every Signet Gateway and Signet LoadBalancer Service, as the allocator sees them.
pub fn requesters(objects: &ClusterObjects) -> (Vec<Requester>, Addresses) {
    let mut out = Vec::new();
    let mut refused = Addresses::default();
    let ours: Vec<&str> = objects
        .gateway
        .classes
        .iter()
        .filter(|c| c.spec.controller_name == crate::routing::model::CONTROLLER)
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    for g in &objects.gateway.gateways {
        if !ours.contains(&g.spec.gateway_class_name.as_str()) {
            continue;
        }
        let o = owner("Gateway", &g.metadata);
        if g.spec.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
            refused.asked.insert(o.clone());
        }
        let mut requested = Vec::new();
        let mut wants = Vec::new();
        let mut problem = None;
        for (i, a) in g.spec.addresses.iter().flatten().enumerate() {
            match (a.r#type.as_deref().unwrap_or("IPAddress"), &a.value) {
                ("IPAddress", None) => wants.push((Want::Any, true)),
                ("IPAddress", Some(v)) => match v.parse::<IpAddr>() {
                    Ok(ip) => requested.push(ip),
                    Err(e) => {
                        problem = Some((
                            "Programmed",
                            "AddressNotUsable",
                            format!("spec.addresses[{i}].value `{v}`: {e}"),
                        ))
                    }
                },
                (t, _) => {
                    problem = Some((
                        "Accepted",
                        "UnsupportedAddress",
                        format!(
                            "spec.addresses[{i}]: type `{t}` is not supported; Signet assigns IPAddress"
                        ),
                    ))
                }
            }
        }
        if let Some(p) = problem {
            refused.invalid.insert(o, p);
            continue;
        }
        if !requested.is_empty() && !wants.is_empty() {
            refused.invalid.insert(
                o,
                (
                    "Programmed",
                    "AddressNotUsable",
                    "spec.addresses mixes addresses by value with ones to assign; Signet does one or the other".into(),
                ),
            );
            continue;
        }
        if wants.is_empty() {
            wants.push((Want::Any, true));
        }
        refused.labels.insert(
            o.clone(),
            Requester::labels_with_names(&o, g.metadata.labels.as_ref()),
        );
        out.push(Requester {
            labels: Requester::labels_with_names(&o, g.metadata.labels.as_ref()),
            owner: o,
            requested,
            wants,
            created: created(&g.metadata),
        });
    }
    for s in objects.services.iter().filter(|s| is_signet_lb(s)) {
        let o = owner("Service", &s.metadata);
        let spec = s.spec.as_ref().expect("is_signet_lb saw a spec");
        let asked = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LB_IPS_ANNOTATION))
            .map(|v| {
                (
                    format!("metadata.annotations[{LB_IPS_ANNOTATION}]"),
                    v.clone(),
                )
            })
            .or_else(|| {
                spec.load_balancer_ip
                    .clone()
                    .filter(|v| !v.is_empty())
                    .map(|v| ("spec.loadBalancerIP".to_owned(), v))
            });
        let mut requested = Vec::new();
        if let Some((field, value)) = asked {
            for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                match v.parse::<IpAddr>() {
                    Ok(ip) => requested.push(ip),
                    Err(e) => {
                        refused.invalid.insert(
                            o.clone(),
                            ("Ready", "AddressNotUsable", format!("{field} `{v}`: {e}")),
                        );
                    }
                }
            }
        }
        if refused.invalid.contains_key(&o) {
            continue;
        }
        let families = spec
            .ip_families
            .clone()
            .unwrap_or_else(|| vec!["IPv4".into()]);
        let dual_required = spec.ip_family_policy.as_deref() == Some("RequireDualStack");
        let dual_preferred = spec.ip_family_policy.as_deref() == Some("PreferDualStack");
        let wants = families
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == 0 || dual_required || dual_preferred)
            .map(|(i, f)| {
                let w = if f == "IPv6" { Want::V6 } else { Want::V4 };
                (w, i == 0 || dual_required)
            })
            .collect();
        refused.labels.insert(
            o.clone(),
            Requester::labels_with_names(&o, s.metadata.labels.as_ref()),
        );
        out.push(Requester {
            labels: Requester::labels_with_names(&o, s.metadata.labels.as_ref()),
            owner: o,
            requested,
            wants,
            created: created(&s.metadata),
        });
    }
    (out, refused)
}

impl Addresses {
    /// The allocator run on `objects` against `record`.
    pub fn compute(objects: &ClusterObjects, record: &Record) -> Self {
        let (requesters, mut out) = requesters(objects);
        out.outcome = lbipam::allocate(&objects.pools, &requesters, record);
        out
    }

    /// Where Gateway `ns/name` is served.
    pub fn gateway(&self, ns: &str, name: &str) -> GatewayAddresses {
        let o = Owner {
            kind: "Gateway".into(),
            namespace: ns.into(),
            name: name.into(),
        };
        if let Some((condition, reason, message)) = self.invalid.get(&o) {
            return GatewayAddresses::Refused {
                condition,
                reason,
                message: message.clone(),
            };
        }
        match self.outcome.assigned.get(&o) {
            Some(Ok(ips)) => GatewayAddresses::Assigned(ips.iter().map(|(ip, _)| *ip).collect()),
            // A Gateway that no pool selects and that asks for nothing keeps today's serving.
            Some(Err(r)) if r.reason == "NoPool" && !self.asked_for_addresses(&o) => {
                GatewayAddresses::Nodes
            }
            Some(Err(r)) => GatewayAddresses::Refused {
                condition: "Programmed",
                reason: "AddressNotAssigned",
                message: r.message.clone(),
            },
            None => GatewayAddresses::Nodes,
        }
    }

    fn asked_for_addresses(&self, o: &Owner) -> bool {
        self.asked.contains(o)
    }
}

/// The standalone record: a JSON table shared by the agents of one machine.
#[derive(Debug, Clone)]
pub struct AddressTable {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an address table: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}")]
    Write(#[from] signet_ca::files::WriteError),
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TableFile {
    version: u32,
    allocations: Vec<TableEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TableEntry {
    address: IpAddr,
    pool: String,
    owner: Owner,
}

impl AddressTable {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The table beside an identity table (`addresses.json` in the same folder).
    pub fn beside(identity_table: &Path) -> Self {
        Self::new(&identity_table.with_file_name("addresses.json"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record as it is (empty when there is no table yet).
    pub fn read(&self) -> Result<Record, TableError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let t: TableFile =
                    serde_json::from_slice(&bytes).map_err(|e| TableError::Corrupt {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    })?;
                let mut out = Record::new();
                for e in t.allocations {
                    if let Some((_, other)) = out.insert(e.address, (e.pool, e.owner.clone())) {
                        return Err(TableError::Corrupt {
                            path: self.path.clone(),
                            reason: format!(
                                "{} is recorded for both {other} and {}",
                                e.address, e.owner
                            ),
                        });
                    }
                }
                Ok(out)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::new()),
            Err(source) => Err(TableError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Runs the allocator on `objects` under the table's lock and keeps its record.
    pub fn settle(&self, objects: &ClusterObjects) -> Result<Addresses, TableError> {
        let io = |source| TableError::Io {
            path: self.path.with_extension("lock"),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.with_extension("lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let before = self.read()?;
        let addresses = Addresses::compute(objects, &before);
        if addresses.outcome.record != before {
            let file = TableFile {
                version: 1,
                allocations: addresses
                    .outcome
                    .record
                    .iter()
                    .map(|(ip, (pool, owner))| TableEntry {
                        address: *ip,
                        pool: pool.clone(),
                        owner: owner.clone(),
                    })
                    .collect(),
            };
            let json = serde_json::to_vec_pretty(&file).expect("the table serialises");
            signet_ca::files::write_atomic(&self.path, &json, 0o644)?;
        }
        Ok(addresses)
    }
}

/// What `signet gateway status` prints under `addresses`, and what Kubernetes mode writes to
/// pools and Services.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    pub name: String,
    pub total: String,
    pub used: String,
    pub free: String,
    pub conditions: Vec<lbipam::PoolCondition>,
    /// `address: Kind namespace/name`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// Its `status.loadBalancer.ingress` addresses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<String>,
    /// [`SERVICE_CONDITION`]: True when it has every address it needs.
    pub condition: crate::routing::model::Condition,
}

impl AddressStatus {
    pub fn of(a: &Addresses) -> Self {
        use crate::routing::model::cond;
        let pools = a
            .outcome
            .pools
            .iter()
            .map(|(name, s)| PoolView {
                name: name.clone(),
                total: s.total.clone(),
                used: s.used.clone(),
                free: s.free.clone(),
                conditions: s.conditions.clone(),
                allocations: s
                    .allocations
                    .iter()
                    .map(|x| format!("{}: {}", x.address, x.owner))
                    .collect(),
            })
            .collect();
        let mut services = Vec::new();
        let service = |o: &Owner| o.kind == "Service";
        for (o, result) in a.outcome.assigned.iter().filter(|(o, _)| service(o)) {
            let (ingress, condition) = match result {
                Ok(ips) => (
                    ips.iter().map(|(ip, _)| ip.to_string()).collect(),
                    cond(SERVICE_CONDITION, true, "Assigned", {
                        let pools: std::collections::BTreeSet<&str> =
                            ips.iter().map(|(_, p)| p.as_str()).collect();
                        format!("from {}", pools.into_iter().collect::<Vec<_>>().join(", "))
                    }),
                ),
                Err(r) => (
                    vec![],
                    cond(SERVICE_CONDITION, false, r.reason, r.message.clone()),
                ),
            };
            services.push(ServiceView {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                ingress,
                condition,
            });
        }
        for (o, (_, reason, message)) in a.invalid.iter().filter(|(o, _)| service(o)) {
            services.push(ServiceView {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                ingress: vec![],
                condition: cond(SERVICE_CONDITION, false, reason, message.clone()),
            });
        }
        services.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        Self { pools, services }
    }
}

/// How many times a pool write that lost to another writer is retried with fresh pools.
const WRITE_ATTEMPTS: usize = 5;

/// Kubernetes mode: runs the allocator and writes each pool's status (its share of the record)
/// where it changed, each write conditional on the pool's `resourceVersion`. A writer that
/// lost to another re-reads the pools and runs again, so two agents never give one address to
/// two owners. Returns the record as written, and `objects` with the owners it names that the
/// view lacked (statuses are computed from both, so they agree with the pools).
pub async fn write_pools(
    client: &kube::Client,
    objects: &ClusterObjects,
) -> Result<(Record, ClusterObjects), PoolWriteError> {
    use kube::api::{Api, ListParams, PostParams};
    let api: Api<LoadBalancerIPPool> = Api::all(client.clone());
    let mut objects = objects.clone();
    for _ in 0..WRITE_ATTEMPTS {
        let record = lbipam::record_of(&objects.pools);
        see_owners(client, &mut objects, &record).await?;
        let addresses = Addresses::compute(&objects, &record);
        let mut lost = false;
        for pool in &objects.pools {
            let name = pool.metadata.name.clone().unwrap_or_default();
            let Some(want) = addresses.outcome.pools.get(&name) else {
                continue;
            };
            let Some(next) = next_status(pool.status.as_ref(), want, pool.metadata.generation)
            else {
                continue;
            };
            let mut body = pool.clone();
            body.status = Some(next);
            match api
                .replace_status(&name, &PostParams::default(), &body)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    lost = true;
                    break;
                }
                Err(source) => return Err(PoolWriteError::Api { pool: name, source }),
            }
        }
        if !lost {
            return Ok((addresses.outcome.record, objects));
        }
        tracing::debug!("a LoadBalancerIPPool changed under this writer; reading them again");
        objects.pools = api
            .list(&ListParams::default())
            .await
            .map_err(|source| PoolWriteError::Api {
                pool: "(list)".into(),
                source,
            })?
            .items;
    }
    Err(PoolWriteError::Contended(WRITE_ATTEMPTS))
}

/// Adds to `objects` the owners `record` names that `objects` lacks but the API still has: a
/// writer whose view lags (a reflector behind, or a Lease just taken over) must not release
/// an address whose owner still exists. Only an owner the API says is gone is let go.
async fn see_owners(
    client: &kube::Client,
    objects: &mut ClusterObjects,
    record: &Record,
) -> Result<(), PoolWriteError> {
    use gateway_api::apis::standard::gateways::Gateway;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::Api;
    let has = |o: &Owner, m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.name.as_deref() == Some(o.name.as_str())
            && m.namespace.as_deref().unwrap_or("default") == o.namespace
    };
    let owners: std::collections::BTreeSet<&Owner> = record.values().map(|(_, o)| o).collect();
    for o in owners {
        let err = |source| PoolWriteError::Api {
            pool: format!("(reading {o})"),
            source,
        };
        match o.kind.as_str() {
            "Gateway" if !objects.gateway.gateways.iter().any(|g| has(o, &g.metadata)) => {
                let api: Api<Gateway> = Api::namespaced(client.clone(), &o.namespace);
                if let Some(g) = api.get_opt(&o.name).await.map_err(err)? {
                    objects.gateway.gateways.push(g);
                }
            }
            "Service" if !objects.services.iter().any(|s| has(o, &s.metadata)) => {
                let api: Api<Service> = Api::namespaced(client.clone(), &o.namespace);
                if let Some(s) = api.get_opt(&o.name).await.map_err(err)? {
                    objects.services.push(s);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PoolWriteError {
    #[error("writing LoadBalancerIPPool {pool} status: {source}")]
    Api { pool: String, source: kube::Error },
    #[error("LoadBalancerIPPools kept changing under this writer ({0} attempts); retrying later")]
    Contended(usize),
}

/// The status to write, if it differs from `current` other than in timestamps; conditions keep
/// their `lastTransitionTime` while their status stays.
fn next_status(
    current: Option<&lbipam::PoolStatus>,
    want: &lbipam::PoolStatus,
    generation: Option<i64>,
) -> Option<lbipam::PoolStatus> {
    let now = jiff::Timestamp::now().to_string();
    let mut next = want.clone();
    for c in &mut next.conditions {
        c.observed_generation = generation;
        c.last_transition_time = current
            .and_then(|s| s.conditions.iter().find(|o| o.type_ == c.type_))
            .filter(|o| o.status == c.status)
            .and_then(|o| o.last_transition_time.clone())
            .or_else(|| Some(now.clone()));
    }
    (current != Some(&next)).then_some(next)
}
