//! Where a local pod lives when no annotation says so (a real Kubernetes node): its cgroup v2
//! directory is found by the pod's UID in the kubelet's naming (systemd driver:
//! `kubepods-<qos>-pod<uid with _>.slice`, cgroupfs driver: `pod<uid>`), and its host-side
//! interface by the node's /32 (or /128) route to the pod's IP, as routed CNIs (Calico, Cilium,
//! the local topology) install. A bridged CNI has no per-pod route: then there is no interface to
//! attach tc to, and ingress policy is enforced by the proxy only.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The cgroup directory under `root` of the pod with `uid`, relative to `root`. Searches at most
/// four levels deep (kubepods / qos / pod).
pub fn pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    let matches = |name: &str| {
        name == dashed
            || name.ends_with(&format!("-{underscored}.slice"))
            || name == format!("{underscored}.slice")
    };
    let mut stack = vec![(root.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            if matches(&e.file_name().to_string_lossy()) {
                return path.strip_prefix(root).ok().map(Path::to_owned);
            }
            if depth < 3 {
                stack.push((path, depth + 1));
            }
        }
    }
    None
}

/// The network namespace of a pod, from the first process found in its cgroup directory or
/// below it (the kubelet puts containers, and the sandbox's pause process, in child cgroups):
/// `/proc/<pid>/ns/net`. `None` when the subtree holds no process.
pub fn pod_netns(cgroup_dir: &Path) -> Option<PathBuf> {
    let mut stack = vec![(cgroup_dir.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
            return Some(PathBuf::from(format!("/proc/{pid}/ns/net")));
        }
        if depth >= 4 {
            continue;
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    None
}

/// The interface of the host route to exactly `ip` (`/proc/net/route` for IPv4,
/// `/proc/net/ipv6_route` for IPv6), in this thread's network namespace.
pub fn pod_interface(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => {
            let table = std::fs::read_to_string("/proc/self/net/route").ok()?;
            route_v4(&table, v4)
        }
        IpAddr::V6(v6) => {
            let table = std::fs::read_to_string("/proc/self/net/ipv6_route").ok()?;
            let want = v6
                .octets()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            table.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 10 && f[0] == want && f[1] == "80").then(|| f[9].to_owned())
            })
        }
    }
}

/// The device of the /32 route to `ip` in a `/proc/net/route` table (little-endian hex).
fn route_v4(table: &str, ip: Ipv4Addr) -> Option<String> {
    let want = u32::from_le_bytes(ip.octets());
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
        let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
        (dest == want && mask == u32::MAX).then(|| f[0].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_found_by_uid_in_both_kubelet_layouts() {
        let root = tempfile::tempdir().expect("tmp");
        let systemd = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice");
        let cgroupfs = root.path().join("kubepods/besteffort/pod5678-ef00");
        std::fs::create_dir_all(&systemd).expect("dirs");
        std::fs::create_dir_all(&cgroupfs).expect("dirs");
        assert_eq!(
            pod_cgroup(root.path(), "1234-abcd"),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd.slice"
            ))
        );
        assert_eq!(
            pod_cgroup(root.path(), "5678-ef00"),
            Some(PathBuf::from("kubepods/besteffort/pod5678-ef00"))
        );
        assert_eq!(pod_cgroup(root.path(), "0000-0000"), None);
    }

    #[test]
    fn a_pods_namespace_comes_from_a_process_in_a_child_cgroup() {
        let root = tempfile::tempdir().expect("tmp");
        let pod = root.path().join("kubepods-burstable-pod1234_abcd.slice");
        let container = pod.join("cri-containerd-0a1b.scope");
        std::fs::create_dir_all(&container).expect("dirs");
        std::fs::write(pod.join("cgroup.procs"), "").expect("procs");
        assert_eq!(pod_netns(&pod), None, "no process yet");
        std::fs::write(container.join("cgroup.procs"), "4242\n").expect("procs");
        assert_eq!(pod_netns(&pod), Some(PathBuf::from("/proc/4242/ns/net")));
    }

    #[test]
    fn pod_interfaces_come_from_host_routes() {
        // 10.1.0.2/32 via cali123; 10.1.0.0/24 via the bridge (not a pod route).
        let table = "Iface\\tDestination\\tGateway\\tFlags\\tRefCnt\\tUse\\tMetric\\tMask\\tMTU\\tWindow\\tIRTT\n\
                     cali123\\t0200010A\\t00000000\\t0005\\t0\\t0\\t0\\tFFFFFFFF\\t0\\t0\\t0\n\
                     cni0\\t0000010A\\t00000000\\t0001\\t0\\t0\\t0\\t00FFFFFF\\t0\\t0\\t0\n"
            .replace("\\t", "\t");
        assert_eq!(
            route_v4(&table, "10.1.0.2".parse().expect("ip")).as_deref(),
            Some("cali123")
        );
        assert_eq!(route_v4(&table, "10.1.0.3".parse().expect("ip")), None);
    }
}
