//! Signet's end-to-end suites (in `tests/tests/`: `datapath.rs` and `tc.rs` for the eBPF
//! programs, `mesh.rs` for two nodes with agents and the CA, `gateway.rs` for Gateway API
//! listeners; the two-node topology is `tests/tests/common/topology.rs`) and their helper
//! binaries (`signet-test-client`, the datapath, mesh and gateway benchmarks).
//!
//! This library is what the binaries share: command-line lookup and entering a pod (its cgroup,
//! then its network namespace). The CA's own end-to-end test lives in `ca/tests/`.

/// The arguments, looked up by flag name (`--name value`).
#[derive(Debug)]
pub struct Args(pub Vec<String>);

impl Args {
    pub fn from_env() -> Self {
        Self(std::env::args().collect())
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The value of a required flag; exits with a message when it is missing.
    pub fn need(&self, name: &str) -> &str {
        self.value(name)
            .unwrap_or_else(|| fail(format!("{name} is required")))
    }

    /// A numeric flag, `default` when absent; exits when it is not a number.
    pub fn number(&self, name: &str, default: u64) -> u64 {
        self.value(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| fail(format!("{name} `{v}` is not a number")))
        })
    }

    /// The subcommand (first argument).
    pub fn command(&self) -> Option<&str> {
        self.0.get(1).map(String::as_str)
    }
}

/// Prints `msg` with the program's name and exits with status 2.
pub fn fail(msg: String) -> ! {
    let me = std::env::args()
        .next()
        .and_then(|p| p.rsplit('/').next().map(str::to_owned))
        .unwrap_or_default();
    eprintln!("{me}: {msg}");
    std::process::exit(2)
}

/// Joins a pod's cgroup (so the datapath captures this process), then enters a network namespace
/// (`/run/netns/NAME`) with setns: `ip netns exec` would remount /sys and hide the cgroup tree.
/// Call before starting threads that must share the namespace.
pub fn enter(cgroup: Option<&str>, netns: Option<&str>) {
    if let Some(cg) = cgroup {
        let procs = format!("{cg}/cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            fail(format!("joining {procs}: {e}"));
        }
    }
    if let Some(ns) = netns {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
        if let Err(e) = nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET) {
            fail(format!("entering {ns}: {e}"));
        }
    }
}
