//! Answering ARP for the addresses this node holds the lease of, on the interfaces their
//! policies name, and announcing them with gratuitous ARP when it takes them over. One thread
//! per interface reads ARP frames from a packet socket; the kernel itself never answers for
//! these addresses (`routes` delivers them without making them local), so a node whose agent
//! is gone is silent.
//!
//! IPv6 addresses are routed and served but not yet announced (neighbour advertisements are
//! to come); they are logged as such.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const ETH_P_ARP: u16 = 0x0806;

/// One interface's responder.
#[derive(Debug)]
struct Responder {
    addresses: Arc<RwLock<BTreeSet<Ipv4Addr>>>,
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
pub fn interfaces_for(ip: Ipv4Addr, patterns: &[String], all: &[Interface]) -> Vec<String> {
    let compiled: Vec<regex::Regex> = patterns
        .iter()
        .filter_map(|p| regex::Regex::new(&format!("^(?:{p})$")).ok())
        .collect();
    all.iter()
        .filter(|i| {
            if compiled.is_empty() {
                i.nets.iter().any(|n| in_net(ip, *n))
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
        let mut per_iface: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for (ip, patterns) in &held {
            let IpAddr::V4(v4) = ip else {
                tracing::debug!(%ip, "IPv6 addresses are not announced yet");
                continue;
            };
            let on = interfaces_for(*v4, patterns, &all);
            if on.is_empty() {
                tracing::warn!(%ip, ?patterns, "no interface to announce it on");
            }
            for i in on {
                per_iface.entry(i).or_default().insert(*v4);
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
                    tracing::warn!(interface = name, %ip, error = %e, "gratuitous ARP not sent");
                } else {
                    tracing::info!(interface = name, %ip, "announced (gratuitous ARP)");
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
    let socket = crate::net::packet_socket(None, &iface.name, ETH_P_ARP)?;
    let addresses: Arc<RwLock<BTreeSet<Ipv4Addr>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (a, s, mac, name) = (
        addresses.clone(),
        stop.clone(),
        iface.mac,
        iface.name.clone(),
    );
    std::thread::Builder::new()
        .name(format!("arp-{name}"))
        .spawn(move || respond(socket, mac, &name, &a, &s))
        .map_err(|e| e.to_string())?;
    Ok(Responder { addresses, stop })
}

fn respond(
    mut socket: socket2::Socket,
    mac: [u8; 6],
    name: &str,
    addresses: &RwLock<BTreeSet<Ipv4Addr>>,
    stop: &AtomicBool,
) {
    use std::io::Read as _;
    let mut buf = [0u8; 1514];
    while !stop.load(Ordering::SeqCst) {
        let Ok(n) = socket.read(&mut buf) else {
            continue;
        };
        let Some(req) = parse(&buf[..n]) else {
            continue;
        };
        if req.op != 1 || req.sha == mac {
            continue;
        }
        let ours = addresses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&req.tpa);
        if !ours {
            continue;
        }
        let reply = frame(req.sha, mac, 2, mac, req.tpa, req.sha, req.spa);
        if let Err(e) = std::io::Write::write_all(&mut socket, &reply) {
            tracing::warn!(interface = name, error = %e, "ARP reply not sent");
        }
    }
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

/// Gratuitous ARP for `ip` from `iface`: a broadcast request and a broadcast reply, each with
/// `ip` as sender and target, so every neighbour updates its cache.
fn gratuitous(iface: &Interface, ip: Ipv4Addr) -> Result<(), String> {
    let mut socket = crate::net::packet_socket(None, &iface.name, ETH_P_ARP)?;
    let bcast = [0xff; 6];
    for op in [1u16, 2] {
        let f = frame(bcast, iface.mac, op, iface.mac, ip, [0; 6], ip);
        std::io::Write::write_all(&mut socket, &f).map_err(|e| e.to_string())?;
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
}
