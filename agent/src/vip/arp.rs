//! Answering ARP (IPv4) and neighbour solicitations (IPv6, RFC 4861) for the addresses this
//! node holds the lease of, on the interfaces their policies name, and announcing them with
//! gratuitous ARP or an unsolicited neighbour advertisement when it takes them over. Per
//! interface, one thread reads ARP frames and one reads neighbour solicitations (a classic BPF
//! filter on the packet socket keeps every other IPv6 frame out); the kernel itself never
//! answers for these addresses (`routes` delivers them without making them local), so a node
//! whose agent is gone is silent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// One interface's responder.
#[derive(Debug)]
struct Responder {
    addresses: Arc<RwLock<BTreeSet<IpAddr>>>,
    stop: Arc<AtomicBool>,
}

/// The responders, by interface.
#[derive(Debug, Default)]
pub struct Announcer {
    running: Mutex<BTreeMap<String, Responder>>,
}

/// An interface of this namespace: name, MAC, and its IPv4 networks (address, prefix length).
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub mac: [u8; 6],
    pub nets: Vec<(Ipv4Addr, u8)>,
    pub nets6: Vec<(Ipv6Addr, u8)>,
}

/// Every interface with a MAC address.
pub fn interfaces() -> Vec<Interface> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    let mut by_name: BTreeMap<String, Interface> = BTreeMap::new();
    for a in addrs {
        let entry = by_name
            .entry(a.interface_name.clone())
            .or_insert_with(|| Interface {
                name: a.interface_name.clone(),
                mac: [0; 6],
                nets: vec![],
                nets6: vec![],
            });
        if let Some(link) = a.address.as_ref().and_then(|s| s.as_link_addr())
            && let Some(mac) = link.addr()
        {
            entry.mac = mac;
        }
        if let (Some(ip), Some(mask)) = (
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip()),
            a.netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip()),
        ) {
            entry.nets.push((ip, u32::from(mask).count_ones() as u8));
        }
        if let (Some(ip), Some(mask)) = (
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in6())
                .map(|s| s.ip()),
            a.netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in6())
                .map(|s| s.ip()),
        ) {
            entry.nets6.push((ip, u128::from(mask).count_ones() as u8));
        }
    }
    by_name.into_values().filter(|i| i.mac != [0; 6]).collect()
}

fn in_net(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The interfaces `ip` is announced on: those matching one of `patterns` (whole names), or,
/// with none, those with an IPv4 network holding `ip`.
pub fn interfaces_for(ip: IpAddr, patterns: &[String], all: &[Interface]) -> Vec<String> {
    let compiled: Vec<regex::Regex> = patterns
        .iter()
        .filter_map(|p| regex::Regex::new(&format!("^(?:{p})$")).ok())
        .collect();
    all.iter()
        .filter(|i| {
            if compiled.is_empty() {
                match ip {
                    IpAddr::V4(v4) => i.nets.iter().any(|n| in_net(v4, *n)),
                    IpAddr::V6(v6) => i.nets6.iter().any(|(net, len)| {
                        let mask = if *len == 0 {
                            0
                        } else {
                            u128::MAX << (128 - u32::from(*len))
                        };
                        u128::from(v6) & mask == u128::from(*net) & mask
                    }),
                }
            } else {
                compiled.iter().any(|r| r.is_match(&i.name))
            }
        })
        .map(|i| i.name.clone())
        .collect()
}

impl Drop for Announcer {
    /// The responders end with the announcer (with the agent: a killed agent answers nothing).
    fn drop(&mut self) {
        let running = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        for r in running.values() {
            r.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl Announcer {
    /// Answers for exactly `held` (address → interface patterns) from now on; an address new
    /// on an interface is announced there with gratuitous ARP.
    pub fn set(&self, held: BTreeMap<IpAddr, Vec<String>>) {
        let all = interfaces();
        let mut per_iface: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for (ip, patterns) in &held {
            let on = interfaces_for(*ip, patterns, &all);
            if on.is_empty() {
                tracing::warn!(%ip, ?patterns, "no interface to announce it on");
            }
            for i in on {
                per_iface.entry(i).or_default().insert(*ip);
            }
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|name, r| {
            let keep = per_iface.contains_key(name);
            if !keep {
                r.stop.store(true, Ordering::SeqCst);
            }
            keep
        });
        for (name, ips) in per_iface {
            let Some(iface) = all.iter().find(|i| i.name == name) else {
                continue;
            };
            let responder = match running.get(&name) {
                Some(r) => r,
                None => match start(iface) {
                    Ok(r) => running.entry(name.clone()).or_insert(r),
                    Err(e) => {
                        tracing::error!(interface = name, error = %e, "ARP responder not started; its addresses are not announced there");
                        continue;
                    }
                },
            };
            let before = responder
                .addresses
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for ip in ips.difference(&before) {
                if let Err(e) = gratuitous(iface, *ip) {
                    tracing::warn!(interface = name, %ip, error = %e, "announcement not sent");
                } else {
                    let how = if ip.is_ipv4() {
                        "gratuitous ARP"
                    } else {
                        "unsolicited neighbour advertisement"
                    };
                    tracing::info!(interface = name, %ip, "announced ({how})");
                }
            }
            *responder
                .addresses
                .write()
                .unwrap_or_else(|p| p.into_inner()) = ips;
        }
    }
}

fn start(iface: &Interface) -> Result<Responder, String> {
    let arp = crate::net::packet_socket(None, &iface.name, ETH_P_ARP)?;
    let nd = crate::net::packet_socket(None, &iface.name, ETH_P_IPV6)?;
    nd.attach_filter(&solicitations_only())
        .map_err(|e| format!("filtering {}: {e}", iface.name))?;
    let addresses: Arc<RwLock<BTreeSet<IpAddr>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    for (socket, kind) in [(arp, "arp"), (nd, "nd")] {
        let (a, s, mac, name) = (
            addresses.clone(),
            stop.clone(),
            iface.mac,
            iface.name.clone(),
        );
        std::thread::Builder::new()
            .name(format!("{kind}-{name}"))
            .spawn(move || respond(socket, mac, &name, &a, &s))
            .map_err(|e| e.to_string())?;
    }
    Ok(Responder { addresses, stop })
}

/// A classic BPF program passing only ICMPv6 neighbour solicitations (no extension headers,
/// as RFC 4861 senders write them) to the packet socket.
fn solicitations_only() -> [socket2::SockFilter; 8] {
    use socket2::SockFilter as F;
    const LDH: u16 = 0x28;
    const LDB: u16 = 0x30;
    const JEQ: u16 = 0x15;
    const RET: u16 = 0x06;
    [
        F::new(LDH, 0, 0, 12),
        F::new(JEQ, 0, 5, u32::from(ETH_P_IPV6)),
        F::new(LDB, 0, 0, 20),
        F::new(JEQ, 0, 3, u32::from(ICMPV6)),
        F::new(LDB, 0, 0, 54),
        F::new(JEQ, 0, 1, u32::from(NEIGHBOUR_SOLICITATION)),
        F::new(RET, 0, 0, 0xffff),
        F::new(RET, 0, 0, 0),
    ]
}

fn respond(
    mut socket: socket2::Socket,
    mac: [u8; 6],
    name: &str,
    addresses: &RwLock<BTreeSet<IpAddr>>,
    stop: &AtomicBool,
) {
    use std::io::Read as _;
    let mut buf = [0u8; 1514];
    while !stop.load(Ordering::SeqCst) {
        let Ok(n) = socket.read(&mut buf) else {
            continue;
        };
        let frame = &buf[..n];
        let ours = |ip: IpAddr| {
            addresses
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ip)
        };
        let reply = if let Some(req) = parse(frame) {
            if req.op != 1 || req.sha == mac || !ours(IpAddr::V4(req.tpa)) {
                continue;
            }
            frame_arp_reply(&req, mac)
        } else if let Some(ns) = parse_solicitation(frame) {
            if ns.mac == mac || !ours(IpAddr::V6(ns.target)) {
                continue;
            }
            advertisement(mac, ns.target, Some((ns.mac, ns.src)))
        } else {
            continue;
        };
        if let Err(e) = std::io::Write::write_all(&mut socket, &reply) {
            tracing::warn!(interface = name, error = %e, "neighbour answer not sent");
        }
    }
}

fn frame_arp_reply(req: &Arp, mac: [u8; 6]) -> Vec<u8> {
    frame(req.sha, mac, 2, mac, req.tpa, req.sha, req.spa)
}

/// What answering a neighbour solicitation needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Solicitation {
    /// The asker's link-layer address (its option, else the frame's source).
    pub mac: [u8; 6],
    /// The asker's address (`::` for duplicate address detection).
    pub src: Ipv6Addr,
    pub target: Ipv6Addr,
}

pub fn parse_solicitation(f: &[u8]) -> Option<Solicitation> {
    if f.get(12..14)? != ETH_P_IPV6.to_be_bytes() {
        return None;
    }
    let ip = f.get(14..54)?;
    // Version 6, ICMPv6, hop limit 255 (RFC 4861 7.1.1: anything else is not from the link).
    if ip[0] >> 4 != 6 || ip[6] != ICMPV6 || ip[7] != 255 {
        return None;
    }
    let icmp = f.get(54..)?;
    if icmp.len() < 24 || icmp[0] != NEIGHBOUR_SOLICITATION || icmp[1] != 0 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[8..24]).ok()?);
    let mut mac: [u8; 6] = f[6..12].try_into().ok()?;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == 1 && len >= 8 {
            mac = opts[2..8].try_into().ok()?;
        }
        opts = &opts[len..];
    }
    Some(Solicitation { mac, src, target })
}

/// A neighbour advertisement of `target` at `mac`: solicited (to the asker, flags S and O), or
/// unsolicited to all nodes (`to` is `None`, or the asker was doing duplicate address
/// detection), flag O.
pub fn advertisement(mac: [u8; 6], target: Ipv6Addr, to: Option<([u8; 6], Ipv6Addr)>) -> Vec<u8> {
    let all_nodes: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let (dst_mac, dst, solicited) = match to {
        Some((m, src)) if !src.is_unspecified() => (m, src, true),
        _ => ([0x33, 0x33, 0, 0, 0, 1], all_nodes, false),
    };
    let mut icmp = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0];
    icmp.extend_from_slice(&[if solicited { 0x60 } else { 0x20 }, 0, 0, 0]);
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let sum = icmpv6_checksum(&target, &dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[ICMPV6, 255]);
    f.extend_from_slice(&target.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) from `src` to `dst` (RFC 4443 2.3).
pub fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The fields of an Ethernet ARP frame for IPv4 that answering needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: Ipv4Addr,
    pub tpa: Ipv4Addr,
}

pub fn parse(f: &[u8]) -> Option<Arp> {
    if f.get(12..14)? != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = f.get(14..42)?;
    // Ethernet (1), IPv4 (0x0800), 6- and 4-byte addresses.
    if a[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sha: a[8..14].try_into().ok()?,
        spa: Ipv4Addr::new(a[14], a[15], a[16], a[17]),
        tpa: Ipv4Addr::new(a[24], a[25], a[26], a[27]),
    })
}

/// An Ethernet ARP frame.
pub fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// Announces `ip` from `iface`: for IPv4, a broadcast gratuitous ARP request and reply, each
/// with `ip` as sender and target; for IPv6, an unsolicited neighbour advertisement to all
/// nodes. Every neighbour holding an entry for `ip` updates it.
fn gratuitous(iface: &Interface, ip: IpAddr) -> Result<(), String> {
    match ip {
        IpAddr::V4(ip) => {
            let mut socket = crate::net::packet_socket(None, &iface.name, ETH_P_ARP)?;
            let bcast = [0xff; 6];
            for op in [1u16, 2] {
                let f = frame(bcast, iface.mac, op, iface.mac, ip, [0; 6], ip);
                std::io::Write::write_all(&mut socket, &f).map_err(|e| e.to_string())?;
            }
        }
        IpAddr::V6(ip) => {
            let mut socket = crate::net::packet_socket(None, &iface.name, ETH_P_IPV6)?;
            let f = advertisement(iface.mac, ip, None);
            std::io::Write::write_all(&mut socket, &f).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_answers_the_request_it_is_for() {
        let asker = [2, 0, 0, 0, 0, 1];
        let me = [2, 0, 0, 0, 0, 2];
        let req = frame(
            [0xff; 6],
            asker,
            1,
            asker,
            Ipv4Addr::new(10, 0, 0, 9),
            [0; 6],
            Ipv4Addr::new(10, 0, 0, 200),
        );
        let parsed = parse(&req).expect("ARP");
        assert_eq!(parsed.op, 1);
        assert_eq!(parsed.tpa, Ipv4Addr::new(10, 0, 0, 200));
        let reply = frame(parsed.sha, me, 2, me, parsed.tpa, parsed.sha, parsed.spa);
        let r = parse(&reply).expect("ARP");
        assert_eq!(
            (r.op, r.sha, r.spa, r.tpa),
            (
                2,
                me,
                Ipv4Addr::new(10, 0, 0, 200),
                Ipv4Addr::new(10, 0, 0, 9)
            )
        );
        assert_eq!(&reply[..6], &asker);
        // Not ARP, or ARP of another hardware type: ignored.
        assert!(parse(&req[..30]).is_none());
        let mut other = req.clone();
        other[15] = 6;
        assert!(parse(&other).is_none());
        let net = (Ipv4Addr::new(10, 0, 0, 1), 24);
        assert!(in_net(Ipv4Addr::new(10, 0, 0, 200), net));
        assert!(!in_net(Ipv4Addr::new(10, 0, 1, 200), net));
    }

    #[test]
    fn a_solicitation_is_answered_with_a_checksummed_advertisement() {
        let asker = [2, 0, 0, 0, 0, 1];
        let me = [2, 0, 0, 0, 0, 2];
        let src: Ipv6Addr = "fd76::100".parse().expect("ip");
        let target: Ipv6Addr = "fd76::200".parse().expect("ip");
        let solicited_node: Ipv6Addr = "ff02::1:ff00:200".parse().expect("ip");
        // A solicitation as Linux sends it, with the source link-layer option.
        let mut icmp = vec![NEIGHBOUR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(&[1, 1]);
        icmp.extend_from_slice(&asker);
        let sum = icmpv6_checksum(&src, &solicited_node, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = vec![0x33, 0x33, 0xff, 0, 2, 0];
        f.extend_from_slice(&asker);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, icmp.len() as u8, ICMPV6, 255]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&solicited_node.octets());
        f.extend_from_slice(&icmp);
        let ns = parse_solicitation(&f).expect("solicitation");
        assert_eq!(
            ns,
            Solicitation {
                mac: asker,
                src,
                target
            }
        );
        let na = advertisement(me, ns.target, Some((ns.mac, ns.src)));
        assert_eq!(&na[..6], &asker, "unicast to the asker");
        let body = &na[54..];
        assert_eq!(
            (body[0], body[4]),
            (NEIGHBOUR_ADVERTISEMENT, 0x60),
            "solicited, override"
        );
        // A correct checksum sums the message (with it) to zero.
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&na[38..54]).expect("16"));
        assert_eq!(dst, src);
        assert_eq!(icmpv6_checksum(&target, &dst, body), 0);
        assert_eq!(&body[26..32], &me, "target link-layer address");
        // Hop limit below 255 is not from the link: ignored.
        let mut far = f.clone();
        far[21] = 64;
        assert!(parse_solicitation(&far).is_none());
        // Unsolicited: to all nodes, override only.
        let u = advertisement(me, target, None);
        assert_eq!(&u[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(u[54 + 4], 0x20);
    }
}
