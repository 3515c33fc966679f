//! Addresses for Gateways and Services of type LoadBalancer, from `LoadBalancerIPPool`s
//! (`signet_policy::lbipam` decides, `routing::addresses` reads the requesters; this module
//! keeps the record). Standalone mode keeps the record in a table file beside the identity
//! table, shared by every agent on the machine and written under a lock; Kubernetes mode keeps
//! it in the pools' status (`write_pools`, with optimistic concurrency).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use signet_policy::LoadBalancerIPPool;
use signet_policy::lbipam::{self, Owner};

use super::snapshot::ClusterObjects;
pub use crate::routing::addresses::{
    AddressStatus, Addresses, GatewayAddresses, LB_CLASS, LB_IPS_ANNOTATION, Record,
    SERVICE_CONDITION,
};

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
        let addresses =
            Addresses::compute(&objects.gateway, &objects.services, &objects.pools, &before);
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
        let addresses =
            Addresses::compute(&objects.gateway, &objects.services, &objects.pools, &record);
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
