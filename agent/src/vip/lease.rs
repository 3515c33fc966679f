//! Standalone leases for L2 announcements: one JSON table shared by the agents of one machine
//! (beside the address table), read and written under a file lock. An entry is an address, its
//! holder and when the holder last renewed; a holder that has not renewed within the lease's
//! duration has lost it, and the next candidate to look takes it. The same shape as a
//! `coordination.k8s.io` Lease (holderIdentity, renewTime, leaseDurationSeconds,
//! leaseTransitions).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct LeaseTable {
    path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub holder_identity: String,
    /// Milliseconds since the Unix epoch.
    pub renew_time_ms: u64,
    pub lease_duration_ms: u64,
    pub lease_transitions: u32,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LeaseTable {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table as it is.
    pub fn read(&self) -> std::io::Result<BTreeMap<IpAddr, Lease>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: not a lease table: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", self.path.display()),
            )),
        }
    }

    /// One round for `node`: renews or takes (when free or expired) the lease of each of
    /// `candidates`, lets go of those it holds and no longer wants. Returns what it holds.
    pub fn round(
        &self,
        node: &str,
        candidates: &BTreeSet<IpAddr>,
        duration: Duration,
    ) -> std::io::Result<BTreeSet<IpAddr>> {
        let lock_path = self.path.with_extension("lock");
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        lock.lock()?;
        let mut table = self.read()?;
        let before = table.clone();
        let now = now_ms();
        let mut held = BTreeSet::new();
        table.retain(|ip, l| l.holder_identity != node || candidates.contains(ip));
        for ip in candidates {
            let fresh = |transitions| Lease {
                holder_identity: node.to_owned(),
                renew_time_ms: now,
                lease_duration_ms: duration.as_millis() as u64,
                lease_transitions: transitions,
            };
            match table.get_mut(ip) {
                Some(l) if l.holder_identity == node => {
                    l.renew_time_ms = now;
                    held.insert(*ip);
                }
                Some(l) if now.saturating_sub(l.renew_time_ms) > l.lease_duration_ms => {
                    let t = l.lease_transitions + 1;
                    *l = fresh(t);
                    held.insert(*ip);
                }
                Some(_) => {}
                None => {
                    table.insert(*ip, fresh(0));
                    held.insert(*ip);
                }
            }
        }
        if table != before {
            let json = serde_json::to_vec_pretty(&table).expect("leases serialise");
            signet_ca::files::write_atomic(&self.path, &json, 0o644)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_per_address_and_an_expired_one_is_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = LeaseTable::new(&dir.path().join("leases.json"));
        let ip: IpAddr = "10.99.250.200".parse().expect("ip");
        let both = BTreeSet::from([ip]);
        let d = Duration::from_millis(300);
        assert_eq!(t.round("node-a", &both, d).expect("a"), both);
        assert!(
            t.round("node-b", &both, d).expect("b").is_empty(),
            "a holds it"
        );
        assert_eq!(t.round("node-a", &both, d).expect("a renews"), both);
        std::thread::sleep(Duration::from_millis(400));
        // node-a stopped renewing: node-b takes it, and node-a, back, does not.
        assert_eq!(t.round("node-b", &both, d).expect("b"), both);
        assert!(t.round("node-a", &both, d).expect("a").is_empty());
        assert_eq!(t.read().expect("read")[&ip].lease_transitions, 1);
        // Let go when no longer a candidate: the other takes it at once.
        assert!(
            t.round("node-b", &BTreeSet::new(), d)
                .expect("b")
                .is_empty()
        );
        assert_eq!(t.round("node-a", &both, d).expect("a"), both);
    }
}
