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
