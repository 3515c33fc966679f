//! bpffs: pins live on it. It is not mounted by default on this kind of machine; mount it when
//! absent, and only then.

use std::path::Path;

use super::DatapathError;

pub const BPFFS: &str = "/sys/fs/bpf";

/// Whether a bpf filesystem is mounted at `/sys/fs/bpf`.
pub fn is_mounted() -> Result<bool, DatapathError> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| DatapathError::Io {
            path: "/proc/self/mounts".into(),
            source,
        })?;
    Ok(mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mount_point, fstype) = (f.next(), f.next(), f.next());
        mount_point == Some(BPFFS) && fstype == Some("bpf")
    }))
}

/// Mounts bpffs at `/sys/fs/bpf` if it is not there.
pub fn ensure_mounted() -> Result<(), DatapathError> {
    if is_mounted()? {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|source| DatapathError::Io {
        path: Path::new(BPFFS).to_owned(),
        source,
    })?;
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|source| DatapathError::Io {
            path: "mount".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(DatapathError::Bpffs(format!(
            "mounting bpffs at {BPFFS} failed: {} (is this root?)",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
