//! Pods on the connect side are their network namespaces: one per pod, shared by every process
//! of the pod whatever cgroup it sits in (the kubelet puts each container in its own cgroup
//! below the pod's). The kernel names a namespace by its cookie (`bpf_get_netns_cookie` in the
//! programs, `SO_NETNS_COOKIE` here), which is never reused while the machine runs, unlike an
//! inode number.
//!
//! Reading a cookie means entering the namespace, which is done on a short-lived thread of its
//! own so that no thread of the agent ever leaves the node's namespace.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

use super::DatapathError;

/// `SO_NETNS_COOKIE` (Linux 5.14): not in this libc's constants.
const SO_NETNS_COOKIE: nix::libc::c_int = 71;

/// The cookie of the network namespace this thread is in.
pub fn current_cookie() -> std::io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the descriptor is
    // an open socket owned by `socket` for the whole call.
    let rc = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::addr_of_mut!(cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookies of the namespaces at `paths` (`/run/netns/<name>`, `/proc/<pid>/ns/net`), each
/// read by entering it on one helper thread, in order.
pub fn cookies(paths: &[PathBuf]) -> Vec<Result<u64, DatapathError>> {
    if paths.is_empty() {
        return vec![];
    }
    std::thread::scope(|s| {
        s.spawn(|| paths.iter().map(|p| enter_and_read(p)).collect())
            .join()
            .unwrap_or_else(|_| {
                paths
                    .iter()
                    .map(|p| {
                        Err(DatapathError::Netns {
                            path: p.clone(),
                            reason: "the helper thread panicked".into(),
                        })
                    })
                    .collect()
            })
    })
}

fn enter_and_read(path: &Path) -> Result<u64, DatapathError> {
    let err = |reason: String| DatapathError::Netns {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| err(format!("entering it: {e} (CAP_SYS_ADMIN is needed)")))?;
    current_cookie().map_err(|e| err(format!("reading its cookie: {e} (Linux >= 5.14?)")))
}

/// A TCP connection to `addr` made from inside the network namespace at `path`, within
/// `timeout`. The socket stays in that namespace; the calling thread never leaves its own (a
/// helper thread enters it).
pub fn connect_in(
    path: &Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(path)?;
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                std::io::Error::other(format!(
                    "entering {}: {e} (CAP_SYS_ADMIN is needed)",
                    path.display()
                ))
            })?;
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the helper thread panicked")))
    })
}

/// Where a pod's namespace is: a name under `/run/netns` (the local topology's annotation) or a
/// path as it is.
pub fn path_of(name_or_path: &str) -> PathBuf {
    if name_or_path.starts_with('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/run/netns").join(name_or_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_under_run_netns_and_paths_stay() {
        assert_eq!(path_of("pod-a"), PathBuf::from("/run/netns/pod-a"));
        assert_eq!(path_of("/proc/7/ns/net"), PathBuf::from("/proc/7/ns/net"));
    }

    #[test]
    fn this_namespace_has_a_cookie_and_reading_it_by_path_agrees() {
        let here = current_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(here, 0);
        // Entering one's own namespace again needs CAP_SYS_ADMIN; without it the error names
        // the path.
        let got = cookies(&[PathBuf::from("/proc/self/ns/net")]);
        match &got[0] {
            Ok(c) => assert_eq!(*c, here),
            Err(e) => assert!(e.to_string().contains("/proc/self/ns/net"), "{e}"),
        }
        let missing = cookies(&[PathBuf::from("/run/netns/signet-no-such-namespace")]);
        assert!(missing[0].is_err());
    }
}
