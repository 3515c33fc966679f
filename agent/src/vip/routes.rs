//! Delivering a Gateway's own address to this node without the kernel announcing it: a policy
//! rule sends TCP and UDP (only those: ARP and neighbour discovery never match) to table
//! [`TABLE`], where each address served here is a `local` route. Packets to the address are then
//! delivered to the transparent listeners bound on it, while the kernel neither answers ARP or
//! neighbour solicitations for it nor uses it as a source; announcing is `arp`'s, on the node
//! elected for the address. Routes carry protocol [`PROTO`], so only Signet's are ever removed.
//!
//! Spoken over rtnetlink directly (no `ip` binary on the node is assumed).

use std::io::{Read as _, Write as _};
use std::net::IpAddr;

/// The routing table of served addresses.
pub const TABLE: u32 = 20839;
/// The rules' priority: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 20839;
/// `rtm_protocol` / `FRA_PROTOCOL` of what Signet adds.
pub const PROTO: u8 = 199;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const F_REQUEST: u16 = 0x1;
const F_ACK: u16 = 0x4;
const F_DUMP: u16 = 0x300;
const F_REPLACE: u16 = 0x100;
const F_EXCL: u16 = 0x200;
const F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FRA_IP_PROTO: u16 = 22;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const FR_ACT_TO_TBL: u8 = 1;

/// An rtnetlink socket of the current network namespace.
#[derive(Debug)]
pub struct Rtnl {
    sock: socket2::Socket,
    seq: u32,
}

fn family(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => nix::libc::AF_INET as u8,
        IpAddr::V6(_) => nix::libc::AF_INET6 as u8,
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

impl Rtnl {
    pub fn open() -> std::io::Result<Self> {
        let sock = socket2::Socket::new(
            socket2::Domain::from(nix::libc::AF_NETLINK),
            socket2::Type::RAW,
            Some(socket2::Protocol::from(nix::libc::NETLINK_ROUTE)),
        )?;
        sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement; `Ok(false)` when the kernel said
    /// `tolerated` (EEXIST for an add, ESRCH/ENOENT for a delete).
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
        tolerated: &[i32],
    ) -> std::io::Result<bool> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | F_REQUEST | F_ACK).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        self.sock.write_all(&msg)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.sock.read(&mut buf)?;
            for (t, seq, payload) in messages(&buf[..n]) {
                if seq != self.seq || t != NLMSG_ERROR {
                    continue;
                }
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(-nix::libc::EINVAL);
                return match -code {
                    0 => Ok(true),
                    e if tolerated.contains(&e) => Ok(false),
                    e => Err(std::io::Error::from_raw_os_error(e)),
                };
            }
        }
    }

    /// The rules sending TCP and UDP of `family`'s addresses to [`TABLE`] (idempotent).
    pub fn ensure_rules(&mut self, v6: bool) -> std::io::Result<()> {
        for proto in [nix::libc::IPPROTO_TCP as u8, nix::libc::IPPROTO_UDP as u8] {
            let body = rule(v6, proto);
            self.request(RTM_NEWRULE, F_CREATE | F_EXCL, &body, &[nix::libc::EEXIST])?;
        }
        Ok(())
    }

    /// Removes the rules (with nothing left in the table they would be inert, but they go).
    pub fn remove_rules(&mut self, v6: bool) -> std::io::Result<()> {
        for proto in [nix::libc::IPPROTO_TCP as u8, nix::libc::IPPROTO_UDP as u8] {
            let body = rule(v6, proto);
            self.request(
                RTM_DELRULE,
                0,
                &body,
                &[nix::libc::ENOENT, nix::libc::ESRCH],
            )?;
        }
        Ok(())
    }

    /// `local <ip> dev lo table TABLE proto PROTO`.
    pub fn add_local(&mut self, ip: IpAddr) -> std::io::Result<()> {
        let body = route(ip)?;
        self.request(RTM_NEWROUTE, F_CREATE | F_REPLACE, &body, &[])?;
        Ok(())
    }

    pub fn remove_local(&mut self, ip: IpAddr) -> std::io::Result<()> {
        let body = route(ip)?;
        self.request(
            RTM_DELROUTE,
            0,
            &body,
            &[nix::libc::ESRCH, nix::libc::ENOENT],
        )?;
        Ok(())
    }

    /// Every address Signet routes locally in [`TABLE`] (left by an earlier run, too).
    pub fn locals(&mut self) -> std::io::Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            self.seq += 1;
            let mut msg = Vec::new();
            let mut body = vec![0u8; 12];
            body[0] = if v6 {
                nix::libc::AF_INET6
            } else {
                nix::libc::AF_INET
            } as u8;
            msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
            msg.extend_from_slice(&(F_REQUEST | F_DUMP).to_ne_bytes());
            msg.extend_from_slice(&self.seq.to_ne_bytes());
            msg.extend_from_slice(&0u32.to_ne_bytes());
            msg.extend_from_slice(&body);
            self.sock.write_all(&msg)?;
            let mut buf = vec![0u8; 65536];
            'dump: loop {
                let n = self.sock.read(&mut buf)?;
                for (t, seq, payload) in messages(&buf[..n]) {
                    if seq != self.seq {
                        continue;
                    }
                    match t {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(0);
                            if code != 0 {
                                return Err(std::io::Error::from_raw_os_error(-code));
                            }
                            break 'dump;
                        }
                        RTM_NEWROUTE => {
                            if let Some(ip) = our_local(payload) {
                                out.push(ip);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

fn rule(v6: bool, proto: u8) -> Vec<u8> {
    let mut body = vec![0u8; 12];
    body[0] = if v6 {
        nix::libc::AF_INET6
    } else {
        nix::libc::AF_INET
    } as u8;
    body[7] = FR_ACT_TO_TBL;
    attr(&mut body, FRA_TABLE, &TABLE.to_ne_bytes());
    attr(&mut body, FRA_PRIORITY, &RULE_PRIORITY.to_ne_bytes());
    attr(&mut body, FRA_IP_PROTO, &[proto]);
    attr(&mut body, FRA_PROTOCOL, &[PROTO]);
    body
}

fn route(ip: IpAddr) -> std::io::Result<Vec<u8>> {
    let lo = nix::net::if_::if_nametoindex("lo").map_err(std::io::Error::from)?;
    let mut body = vec![0u8; 12];
    body[0] = family(&ip);
    body[1] = if ip.is_ipv4() { 32 } else { 128 };
    body[5] = PROTO;
    body[6] = RT_SCOPE_HOST;
    body[7] = RTN_LOCAL;
    attr(&mut body, RTA_DST, &octets(&ip));
    attr(&mut body, RTA_OIF, &lo.to_ne_bytes());
    attr(&mut body, RTA_TABLE, &TABLE.to_ne_bytes());
    Ok(body)
}

/// The destination of a dumped route, if it is one of Signet's local routes in [`TABLE`].
fn our_local(rtmsg: &[u8]) -> Option<IpAddr> {
    let head = rtmsg.get(..12)?;
    let (fam, proto, kind) = (head[0], head[5], head[7]);
    if proto != PROTO || kind != RTN_LOCAL {
        return None;
    }
    let mut table = u32::from(head[4]);
    let mut dst = None;
    let mut rest = rtmsg.get(12..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        let payload = &rest[4..len];
        match kind {
            RTA_TABLE if payload.len() == 4 => {
                table = u32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
            }
            RTA_DST => {
                dst = match (fam as i32, payload.len()) {
                    (nix::libc::AF_INET, 4) => {
                        Some(IpAddr::from(<[u8; 4]>::try_from(payload).ok()?))
                    }
                    (nix::libc::AF_INET6, 16) => {
                        Some(IpAddr::from(<[u8; 16]>::try_from(payload).ok()?))
                    }
                    _ => None,
                };
            }
            _ => {}
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    (table == TABLE).then_some(dst).flatten()
}

/// (type, seq, payload) of each message in a netlink datagram.
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        out.push((kind, seq, &rest[16..len]));
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}
