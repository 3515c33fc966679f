//! Crafted packets for the attack suites: IPv4 and IPv6 headers (fragments, extension headers),
//! TCP, UDP and ICMP built byte by byte with correct checksums, sent from a raw socket inside a
//! test's own namespace, and a packet socket that watches what comes back.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::in_netns;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const DSTOPTS: u8 = 60;
pub const FRAGMENT: u8 = 44;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn ones_complement(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = [s.octets(), d.octets()].concat();
            p.extend([0, proto]);
            p.extend((len as u16).to_be_bytes());
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = [s.octets(), d.octets()].concat();
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, proto]);
            p
        }
        _ => panic!("mixed address families"),
    }
}

/// A TCP segment (20-byte header, no options, no payload) with its checksum.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = ones_complement(&[&pseudo_header(src, dst, TCP, h.len()), &h]);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// A UDP datagram with its checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend(sport.to_be_bytes());
    d.extend(dport.to_be_bytes());
    d.extend((len as u16).to_be_bytes());
    d.extend([0, 0]);
    d.extend(payload);
    let sum = ones_complement(&[&pseudo_header(src, dst, UDP, len), &d]);
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

/// An ICMP (IPv4) or ICMPv6 echo request.
pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(1u16.to_be_bytes());
    m.extend(b"signet-echo!");
    let sum = if v6 {
        ones_complement(&[&pseudo_header(src, dst, ICMPV6, m.len()), &m])
    } else {
        ones_complement(&[&m])
    };
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An ICMP (IPv4) destination-unreachable (port unreachable) error about `inner`: its IP header
/// and the first 8 bytes after it.
pub fn port_unreachable(inner: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
    m.extend(&inner[..inner.len().min(28)]);
    let sum = ones_complement(&[&m]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// An IPv4 header and payload. `offset` is the fragment offset in bytes (a multiple of 8),
/// `more` the MF flag. The kernel fills in the header checksum.
pub fn ipv4(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("ipv4 with IPv6 addresses")
    };
    let mut h = vec![0x45, 0];
    h.extend(((20 + payload.len()) as u16).to_be_bytes());
    h.extend(id.to_be_bytes());
    h.extend(((offset / 8) | if more { 0x2000 } else { 0 }).to_be_bytes());
    h.extend([64, proto, 0, 0]);
    h.extend(s.octets());
    h.extend(d.octets());
    h.extend(payload);
    h
}

/// An IPv6 header (hop limit 64) and payload; `next` is the first next-header value.
pub fn ipv6(src: IpAddr, dst: IpAddr, next: u8, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        panic!("ipv6 with IPv4 addresses")
    };
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend(s.octets());
    h.extend(d.octets());
    h.extend(payload);
    h
}

/// An 8-byte destination-options header (one PadN option) followed by `next`.
pub fn dst_opts(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header: `offset` in bytes (a multiple of 8), `more` the M flag.
pub fn frag6(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend((offset | u16::from(more)).to_be_bytes());
    h.extend(id.to_be_bytes());
    h
}

/// Sends fully built IP packets from a raw socket inside `ns`.
pub fn send(ns: &str, dst: IpAddr, packets: &[Vec<u8>]) {
    in_netns(ns, || {
        let domain = if dst.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let s = Socket::new(domain, Type::RAW, Some(Protocol::from(255))).expect("raw socket");
        if dst.is_ipv6() {
            s.set_header_included_v6(true).expect("IPV6_HDRINCL");
        }
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        for p in packets {
            s.send_to(p, &to).expect("send a crafted packet");
        }
    })
}

/// A packet seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
}

/// Every frame arriving in a namespace, read from a packet socket opened there.
pub struct Watch(Socket);

impl Watch {
    pub fn open(ns: &str) -> Self {
        in_netns(ns, || {
            let all = Protocol::from(i32::from(0x0003u16.to_be()));
            let s = Socket::new(Domain::PACKET, Type::RAW, Some(all)).expect("packet socket");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            Watch(s)
        })
    }

    /// Whether a packet matching `want` arrives within `wait`.
    pub fn saw(&self, wait: Duration, want: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let Ok(n) = std::io::Read::read(&mut &self.0, &mut buf) else {
                continue;
            };
            if parse(&buf[..n]).is_some_and(|seen| want(&seen)) {
                return true;
            }
        }
        false
    }
}

fn parse(frame: &[u8]) -> Option<Seen> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let hl = usize::from(ip.first()? & 0x0f) * 4;
            let s: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), *ip.get(9)?, ip.get(hl..)?)
        }
        0x86dd => {
            let s: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), *ip.get(6)?, ip.get(40..)?)
        }
        _ => return None,
    };
    let port = |o: usize| Some(u16::from_be_bytes([*l4.get(o)?, *l4.get(o + 1)?]));
    let (sport, dport, tcp_flags, icmp_type) = match proto {
        TCP => (port(0)?, port(2)?, *l4.get(13)?, 0),
        UDP => (port(0)?, port(2)?, 0, 0),
        ICMP | ICMPV6 => (0, port(4)?, 0, *l4.first()?),
        _ => (0, 0, 0, 0),
    };
    Some(Seen {
        src,
        dst,
        proto,
        sport,
        dport,
        tcp_flags,
        icmp_type,
    })
}
