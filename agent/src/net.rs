//! Sockets as every listener and dialler of the agent uses them: the accept loop that stops with
//! the drain and survives a failed accept, and the marked connect the datapath recognises.
//! Below every component (the admin port, the proxy and the Gateway use it); imports nothing of
//! the crate.

use std::net::SocketAddr;
use std::time::Duration;

/// The next connection on `listener`, or `None` once `stop` fires. A failed accept (out of
/// descriptors, say) is logged and retried after a pause rather than in a tight loop.
pub async fn accept_next(
    listener: &tokio::net::TcpListener,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Connects to a workload with `SO_MARK`, so the tc program knows the proxy authorised it.
pub async fn connect_marked(
    target: SocketAddr,
    mark: u32,
    within: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let stream = tokio::time::timeout(within, sock.connect(target))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A packet socket on `iface` for frames of `protocol` (an `ETH_P_*`), of the namespace at
/// `netns` when given (the calling thread enters it); reads time out after 200 ms.
pub fn packet_socket(
    netns: Option<&std::path::Path>,
    iface: &str,
    protocol: u16,
) -> Result<socket2::Socket, String> {
    if let Some(netns) = netns {
        let file = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {}: {e}", netns.display()))?;
    }
    let index = nix::net::if_::if_nametoindex(iface).map_err(|e| format!("{iface}: {e}"))?;
    let all = protocol.to_be();
    let socket = socket2::Socket::new(
        socket2::Domain::PACKET,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(i32::from(all))),
    )
    .map_err(|e| format!("a packet socket: {e}"))?;
    let mut sll: nix::libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = nix::libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = index as i32;
    // SAFETY: `sll` is a valid, initialised sockaddr_ll and the length given is its size; the
    // descriptor is the socket's, open for the whole call.
    let rc = unsafe {
        nix::libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            std::ptr::addr_of!(sll).cast(),
            size_of::<nix::libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!(
            "binding to {iface}: {}",
            std::io::Error::last_os_error()
        ));
    }
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}
