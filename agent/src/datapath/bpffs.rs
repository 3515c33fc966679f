//! bpffs: pins live on it. It is not mounted by default on this kind of machine; mount it when
//! absent, and only then.
//!
//! Several agents (the local topology starts one per node at the same moment) may find it missing
//! together. Checking and mounting happen under one exclusive lock, and the check is repeated
//! once the lock is held, so exactly one of them mounts and the others see its mount: a second
//! bpffs stacked on the first would hide every pin made before it.

use nix::fcntl::{Flock, FlockArg};
use nix::mount::MsFlags;

use super::DatapathError;

pub const BPFFS: &str = "/sys/fs/bpf";

/// What the lock is taken on: the parent of the mount point. It is never a mount point itself,
/// so every process of one mount namespace locks the same inode whether or not bpffs is there
/// yet (the mount point itself resolves to a different inode once mounted).
const LOCK_DIR: &str = "/sys/fs";

/// Whether a bpf filesystem is mounted at `/sys/fs/bpf`.
pub fn is_mounted() -> Result<bool, DatapathError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| DatapathError::Io {
            path: "/proc/self/mounts".into(),
            source,
        })?;
    Ok(mounts_bpffs(&mounts))
}

fn mounts_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mount_point, fstype) = (f.next(), f.next(), f.next());
        mount_point == Some(BPFFS) && fstype == Some("bpf")
    })
}

/// Mounts bpffs at `/sys/fs/bpf` if it is not there, race-free against other agents doing the
/// same in this mount namespace.
pub fn ensure_mounted() -> Result<(), DatapathError> {
    if is_mounted()? {
        return Ok(());
    }
    let dir = std::fs::File::open(LOCK_DIR).map_err(|source| DatapathError::Io {
        path: LOCK_DIR.into(),
        source,
    })?;
    let _lock = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, errno)| {
        DatapathError::Bpffs(format!(
            "locking {LOCK_DIR} before mounting bpffs: {errno}; mount it beforehand with \
             `mount -t bpf bpf {BPFFS}`"
        ))
    })?;
    // Whoever held the lock before us may have mounted it.
    if is_mounted()? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|errno| {
        DatapathError::Bpffs(format!(
            "mounting bpffs at {BPFFS} failed: {errno}. The agent needs CAP_SYS_ADMIN to mount \
             it; otherwise mount it before starting the agent (`mount -t bpf bpf {BPFFS}`, or in \
             Kubernetes a hostPath volume of {BPFFS} with Bidirectional propagation)"
        ))
    })?;
    tracing::info!(path = BPFFS, "mounted bpffs");
    // The lock is released here, when `_lock` drops: after the mount, so the next holder's
    // check sees it.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bpf_filesystem_at_the_mount_point_counts() {
        let bpffs = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(mounts_bpffs(bpffs));
        let other = "tmpfs /sys/fs/bpf tmpfs rw 0 0\nbpf /mnt/bpf bpf rw 0 0\n";
        assert!(!mounts_bpffs(other));
    }
}
