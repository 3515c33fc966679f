//! Network namespaces of the test's own.

use crate::{ip, unique};

/// Runs `f` on a thread inside network namespace `/run/netns/<ns>`; sockets it creates stay
/// there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("network namespace {path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace")
    })
}

/// One network namespace with a unique name and its loopback up, deleted on drop (which takes
/// the veths inside it along).
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        let name = format!("signet-t{}", unique());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Adds an address to the namespace's loopback; an IPv6 one without duplicate address
    /// detection, so it can be bound at once.
    pub fn add_addr(&self, cidr: &str) {
        let mut args = vec!["-n", &self.name, "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        ip(&args);
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
