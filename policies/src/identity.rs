//! Numeric identities: the `u32` the datapath keys on, one per SPIFFE ID, stable across restarts
//! and identical on every node. Reserved numbers follow Cilium; allocated ones start at 256 and
//! are never reused, so a stale datapath entry can never point at someone else.
//!
//! Standalone mode keeps the table in a JSON file shared by the node agents of one host, guarded
//! by a file lock and re-read before every allocation. The Kubernetes mode (a cluster-scoped
//! `SignetIdentity` per number) implements the same trait.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use signet_ca::SpiffeId;

/// Wildcard in policy keys: any peer.
pub const ANY: u32 = 0;
pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const REMOTE_NODE: u32 = 6;
/// Signet's gateways as a group (`entity: gateway`).
pub const INGRESS: u32 = 8;
pub const FIRST_ALLOCATED: u32 = 256;
/// The last number a workload or Gateway may get: CIDR identities start above it.
pub const LAST_ALLOCATED: u32 = crate::cidr::CIDR_IDENTITY_BASE - 1;

/// Reserved identities that are part of the cluster (`entity: cluster`), i.e. all but world.
pub const RESERVED_IN_CLUSTER: [u32; 5] = [HOST, UNMANAGED, HEALTH, REMOTE_NODE, INGRESS];

/// The name of a reserved number, for messages.
pub fn reserved_name(n: u32) -> Option<&'static str> {
    Some(match n {
        ANY => "any",
        HOST => "host",
        WORLD => "world",
        UNMANAGED => "unmanaged",
        HEALTH => "health",
        REMOTE_NODE => "remote-node",
        INGRESS => "ingress",
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an identity table: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "identity numbers exhausted: every number from {FIRST_ALLOCATED} to {LAST_ALLOCATED} \
         has been issued (numbers are never re-issued)"
    )]
    Exhausted,
    #[error("no number has been allocated for {0} yet")]
    NotAllocated(SpiffeId),
    #[error("{0}")]
    Write(#[from] signet_ca::files::WriteError),
}

/// The cluster-wide record of one number in Kubernetes mode: cluster-scoped, named by the number
/// in decimal, its spec the SPIFFE ID. Agents create these with optimistic concurrency (a create
/// fails if the name exists), so two agents racing for one number cannot both win.
#[derive(
    kube::CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[kube(
    group = "signet.dev",
    version = "v1alpha1",
    kind = "SignetIdentity",
    plural = "signetidentities",
    doc = "The numeric identity (the object's name) of one SPIFFE ID, shared by every node."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignetIdentitySpec {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` (or a gateway's).
    pub spiffe_id: String,
}

/// What an agent does next to get a number for an identity, given every `SignetIdentity` it
/// just listed as (number, SPIFFE ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It has one: the lowest number carrying it (when a race left several, every agent picks
    /// the same one, and the others are deleted by whoever created them).
    Have(u32),
    /// Create this number (one above the highest in use, so numbers are not reused while any
    /// record of them exists).
    Create(u32),
}

pub fn next_claim(existing: &[(u32, String)], id: &SpiffeId) -> Result<Claim, AllocError> {
    if let Some(n) = existing
        .iter()
        .filter(|(_, s)| s == id.as_str())
        .map(|(n, _)| *n)
        .min()
    {
        return Ok(Claim::Have(n));
    }
    let highest = existing.iter().map(|(n, _)| *n).max().unwrap_or(0);
    let next = highest
        .checked_add(1)
        .filter(|n| *n <= LAST_ALLOCATED)
        .ok_or(AllocError::Exhausted)?
        .max(FIRST_ALLOCATED);
    Ok(Claim::Create(next))
}

/// SPIFFE ID ↔ number.
pub trait IdentityAllocator: Send + Sync {
    /// The number of `id`, allocating one if it has none.
    fn allocate(&self, id: &SpiffeId) -> Result<u32, AllocError>;
    /// Every allocated identity.
    fn snapshot(&self) -> Result<BTreeMap<SpiffeId, u32>, AllocError>;
}

/// Numbers decided elsewhere (the Kubernetes API), looked up; asking for an identity without one
/// is an error, not an allocation.
#[derive(Debug, Default, Clone)]
pub struct FixedAllocator(pub BTreeMap<SpiffeId, u32>);

impl IdentityAllocator for FixedAllocator {
    fn allocate(&self, id: &SpiffeId) -> Result<u32, AllocError> {
        self.0
            .get(id)
            .copied()
            .ok_or_else(|| AllocError::NotAllocated(id.clone()))
    }
    fn snapshot(&self) -> Result<BTreeMap<SpiffeId, u32>, AllocError> {
        Ok(self.0.clone())
    }
}

/// Allocation in memory, for tests, benchmarks and one-shot CLI runs.
#[derive(Debug, Default)]
pub struct MemoryAllocator {
    table: Mutex<BTreeMap<SpiffeId, u32>>,
}

impl IdentityAllocator for MemoryAllocator {
    fn allocate(&self, id: &SpiffeId) -> Result<u32, AllocError> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        next_number(&mut t, id)
    }

    fn snapshot(&self) -> Result<BTreeMap<SpiffeId, u32>, AllocError> {
        Ok(self.table.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn next_number(t: &mut BTreeMap<SpiffeId, u32>, id: &SpiffeId) -> Result<u32, AllocError> {
    if let Some(n) = t.get(id) {
        return Ok(*n);
    }
    let n = t
        .values()
        .max()
        .map_or(Some(FIRST_ALLOCATED), |m| m.checked_add(1))
        .filter(|n| *n <= LAST_ALLOCATED)
        .ok_or(AllocError::Exhausted)?;
    t.insert(id.clone(), n);
    Ok(n)
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    version: u32,
    identities: BTreeMap<SpiffeId, u32>,
}

/// The persisted standalone allocator.
#[derive(Debug)]
pub struct FileAllocator {
    path: PathBuf,
}

impl FileAllocator {
    /// Uses (and creates on first allocation) the table at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    fn lock(&self) -> Result<fs::File, AllocError> {
        let lock_path = self.path.with_extension("lock");
        if let Some(dir) = lock_path.parent() {
            fs::create_dir_all(dir).map_err(|source| AllocError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&lock_path)
            .map_err(|source| AllocError::Io {
                path: lock_path.clone(),
                source,
            })?;
        f.lock().map_err(|source| AllocError::Io {
            path: lock_path,
            source,
        })?;
        Ok(f)
    }

    fn read(&self) -> Result<BTreeMap<SpiffeId, u32>, AllocError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let t: TableFile =
                    serde_json::from_slice(&bytes).map_err(|e| AllocError::Corrupt {
                        path: self.path.clone(),
                        reason: e.to_string(),
                    })?;
                if let Some((id, n)) = t.identities.iter().find(|(_, n)| **n < FIRST_ALLOCATED) {
                    return Err(AllocError::Corrupt {
                        path: self.path.clone(),
                        reason: format!("{id} has reserved number {n}"),
                    });
                }
                Ok(t.identities)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(AllocError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

impl IdentityAllocator for FileAllocator {
    fn allocate(&self, id: &SpiffeId) -> Result<u32, AllocError> {
        let _lock = self.lock()?;
        // Re-read under the lock: another agent may have allocated since.
        let mut table = self.read()?;
        if let Some(n) = table.get(id) {
            return Ok(*n);
        }
        let n = next_number(&mut table, id)?;
        let json = serde_json::to_vec_pretty(&TableFile {
            version: 1,
            identities: table,
        })
        .expect("the table serialises");
        signet_ca::files::write_atomic(&self.path, &json, 0o644)?;
        Ok(n)
    }

    fn snapshot(&self) -> Result<BTreeMap<SpiffeId, u32>, AllocError> {
        let _lock = self.lock()?;
        self.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_pick_the_lowest_existing_number_or_one_above_the_highest() {
        let id = |s: &str| SpiffeId::parse(s).expect("id");
        let web = id("spiffe://td/ns/shop/sa/web");
        assert_eq!(
            next_claim(&[], &web).expect("claim"),
            Claim::Create(FIRST_ALLOCATED)
        );
        let db = "spiffe://td/ns/shop/sa/db".to_owned();
        let listed = vec![
            (300, web.as_str().to_owned()),
            (256, db.clone()),
            (299, web.as_str().to_owned()),
        ];
        // A race left web with two numbers: everyone settles on the lower.
        assert_eq!(next_claim(&listed, &web).expect("claim"), Claim::Have(299));
        assert_eq!(
            next_claim(&listed, &id("spiffe://td/ns/x/sa/y")).expect("claim"),
            Claim::Create(301)
        );
        // Numbers stop below the CIDR identities, which start at 2^24.
        assert_eq!(
            next_claim(&[(LAST_ALLOCATED - 1, db.clone())], &web).expect("claim"),
            Claim::Create(LAST_ALLOCATED)
        );
        assert!(
            next_claim(&[(LAST_ALLOCATED, db.clone())], &web).is_err(),
            "exhausted"
        );
        assert!(next_claim(&[(u32::MAX, db)], &web).is_err(), "exhausted");
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn numbers_start_at_256_and_are_stable_across_restarts() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("identities.json");
        let a = FileAllocator::new(&path);
        assert_eq!(
            a.allocate(&id("spiffe://td/ns/a/sa/x")).expect("alloc"),
            256
        );
        assert_eq!(
            a.allocate(&id("spiffe://td/ns/a/sa/y")).expect("alloc"),
            257
        );
        assert_eq!(
            a.allocate(&id("spiffe://td/ns/a/sa/x")).expect("alloc"),
            256
        );
        drop(a);
        let b = FileAllocator::new(&path);
        assert_eq!(
            b.allocate(&id("spiffe://td/ns/a/sa/y")).expect("alloc"),
            257
        );
        assert_eq!(b.snapshot().expect("snapshot").len(), 2);
    }

    #[test]
    fn concurrent_writers_never_share_a_number() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("identities.json");
        let results: Vec<(SpiffeId, u32)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let path = path.clone();
                    s.spawn(move || {
                        // Each "agent" has its own allocator over the same file.
                        let a = FileAllocator::new(&path);
                        (0..25)
                            .map(|i| {
                                // Half the IDs are shared between writers.
                                let who = if i % 2 == 0 {
                                    format!("shared{i}")
                                } else {
                                    format!("t{t}-{i}")
                                };
                                let sid = id(&format!("spiffe://td/ns/n/sa/{who}"));
                                let n = a.allocate(&sid).expect("alloc");
                                (sid, n)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        let table = FileAllocator::new(&path).snapshot().expect("snapshot");
        for (sid, n) in &results {
            assert_eq!(
                table.get(sid),
                Some(n),
                "every writer saw the persisted number"
            );
        }
        let mut numbers: Vec<u32> = table.values().copied().collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), table.len(), "no number given twice");
        assert_eq!(table.len(), 13 + 4 * 12);
    }

    #[test]
    fn a_corrupt_table_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("identities.json");
        std::fs::write(
            &path,
            "{\"version\":1,\"identities\":{\"spiffe://td/a\":3}}",
        )
        .expect("write");
        let e = FileAllocator::new(&path)
            .allocate(&id("spiffe://td/b"))
            .expect_err("reserved");
        assert!(e.to_string().contains("reserved number 3"), "{e}");
        std::fs::write(&path, "garbage").expect("write");
        assert!(matches!(
            FileAllocator::new(&path).snapshot(),
            Err(AllocError::Corrupt { .. })
        ));
    }
}
