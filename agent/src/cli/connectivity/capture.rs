//! Counting what crosses a node's underlay: an `AF_PACKET` socket on the interface, every
//! frame counted, those to or from the HBONE port apart, and whether a marker (a request's
//! unique path) appears in any in clear. The local suite opens it from the node's namespace;
//! in a cluster, `signet echo capture` runs it by exec in the node's agent pod (host network).

use std::io::Read as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the underlay carried.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    pub frames: usize,
    pub hbone: usize,
    pub marker_seen: bool,
}

/// A packet socket for every frame on `iface` (of the namespace at `netns`, when given).
pub(crate) fn packet_socket(netns: Option<&Path>, iface: &str) -> Result<socket2::Socket, String> {
    crate::net::packet_socket(netns, iface, nix::libc::ETH_P_ALL as u16)
}

/// Reads frames until told to stop (at most 30 s).
pub(crate) fn read_frames(
    mut socket: socket2::Socket,
    marker: &[u8],
    stop: &std::sync::atomic::AtomicBool,
) -> Capture {
    let mut capture = Capture::default();
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30)
        && !stop.load(std::sync::atomic::Ordering::SeqCst)
    {
        let Ok(n) = socket.read(&mut buf) else {
            continue;
        };
        let frame = &buf[..n];
        capture.frames += 1;
        if !marker.is_empty() && frame.windows(marker.len()).any(|w| w == marker) {
            capture.marker_seen = true;
        }
        if tcp_ports(frame).is_some_and(|(s, d)| s == 15008 || d == 15008) {
            capture.hbone += 1;
        }
    }
    capture
}

/// The TCP ports of an Ethernet frame carrying IPv4 TCP.
fn tcp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let tcp = ip.get(ihl..ihl + 4)?;
    Some((
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    ))
}

/// The interface that holds `addr` in this namespace.
pub(crate) fn interface_of(addr: IpAddr) -> Result<String, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    for a in addrs {
        let held = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if held == Some(addr) {
            return Ok(a.interface_name);
        }
    }
    Err(format!("no interface here holds {addr}"))
}

/// `signet echo capture --on ADDR [--marker TEXT]`: prints `{"ready": true}` once the socket is
/// open, counts until its input closes (30 s at most), then prints the [`Capture`] as JSON.
pub fn capture_until_stdin_closes(on: IpAddr, marker: &str) -> Result<(), String> {
    let iface = interface_of(on)?;
    let socket = packet_socket(None, &iface)?;
    println!("{}", serde_json::json!({"ready": true, "interface": iface}));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, marker) = (stop.clone(), marker.as_bytes().to_vec());
        std::thread::spawn(move || read_frames(socket, &marker, &stop))
    };
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let capture = reader.join().map_err(|_| "the capture panicked")?;
    println!(
        "{}",
        serde_json::to_string(&capture).map_err(|e| e.to_string())?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ports_are_read_from_an_ipv4_frame_only() {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[34..36].copy_from_slice(&15008u16.to_be_bytes());
        f[36..38].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(tcp_ports(&f), Some((15008, 443)));
        f[14 + 9] = 17;
        assert_eq!(tcp_ports(&f), None);
        assert_eq!(tcp_ports(&f[..10]), None);
    }
}
