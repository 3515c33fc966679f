//! Cgroups of the test's own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::unique;

/// Where cgroup v2 is mounted on these machines (a hybrid layout).
pub const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// A cgroup with a unique name under [`CGROUP2`], removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `signet-test-<unique>`.
    pub fn new() -> Self {
        let path = PathBuf::from(CGROUP2).join(format!("signet-test-{}", unique()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// The last element of its path, unique to it.
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a cgroup name")
    }
}

impl std::ops::Deref for Cgroup {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Cgroup {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for Cgroup {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes have exited; the kernel may take a moment to let the cgroup go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}
