//! `#[repr(C)]` mirrors of the structs in `bpf/lib/common.h`, byte for byte. Explicit `_pad`
//! fields, no `bool`/enum/`Option`; addresses are 16 bytes (IPv4 as `::ffff:a.b.c.d`); ports in
//! host byte order except `Config::proxy_addr4`, which is stored as in a sockaddr.
//! `tests/btf_layout.rs` checks every size against the compiled objects' BTF.

use std::net::IpAddr;

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_DENY: u8 = 2;
pub const ACTION_L7: u8 = 3;
pub const ACTION_AUDIT: u8 = 4;

/// `SIGNET_PROTO_OTHER`: the policy key's protocol for everything but TCP and UDP.
pub const PROTO_OTHER: u8 = 0;

/// `ipcache_value.flags`: a mesh workload, whose connections are captured.
pub const IPCACHE_MESH: u32 = 1;
/// `ipcache_value.flags`: a Service ClusterIP (identity: its backends' one identity, or ANY).
pub const IPCACHE_SERVICE: u32 = 2;

/// `enum signet_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Policy,
    DefaultDeny,
    StrictPlaintext,
    Allowed,
    Audit,
    Redirected,
    Unparseable,
    Fragment,
    L7Bypass,
    Unknown(u8),
}

impl Reason {
    /// `SIGNET_REASON_MAX`: the size of the drop-counter array.
    pub const COUNT: usize = 16;

    pub fn from_code(c: u8) -> Self {
        match c {
            0 => Reason::Policy,
            1 => Reason::DefaultDeny,
            2 => Reason::StrictPlaintext,
            3 => Reason::Allowed,
            4 => Reason::Audit,
            5 => Reason::Redirected,
            6 => Reason::Unparseable,
            7 => Reason::Fragment,
            8 => Reason::L7Bypass,
            other => Reason::Unknown(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::Policy => "policy",
            Reason::DefaultDeny => "default-deny",
            Reason::StrictPlaintext => "strict-mtls-plaintext",
            Reason::Allowed => "allowed",
            Reason::Audit => "audit",
            Reason::Redirected => "redirected",
            Reason::Unparseable => "unparseable",
            Reason::Fragment => "fragment-unmatched",
            Reason::L7Bypass => "l7-bypass",
            Reason::Unknown(_) => "unknown",
        }
    }
}

/// An address as the maps store it.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address back from its map form.
pub fn ip_from16(a: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// C `struct ipcache_key` (LPM trie key).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpcacheKey>() == 20);

impl IpcacheKey {
    /// A prefix; IPv4 prefix lengths are shifted by 96 into the mapped space.
    pub fn new(ip: IpAddr, prefix: u8) -> Self {
        let prefixlen = match ip {
            IpAddr::V4(_) => 96 + u32::from(prefix.min(32)),
            IpAddr::V6(_) => u32::from(prefix.min(128)),
        };
        Self {
            prefixlen,
            addr: addr16(ip),
        }
    }
}

/// C `struct ipcache_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<IpcacheValue>() == 8);

/// C `struct endpoint_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointValue {
    pub endpoint_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<EndpointValue>() == 16);

/// C `struct policy_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// C `struct policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyValue {
    pub action: u8,
    pub _pad: [u8; 3],
    pub rule_id: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// C `struct orig_dst`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub identity: u32,
}
const _: () = assert!(size_of::<OrigDst>() == 24);

/// C `struct client_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ClientKey>() == 20);

/// C `struct ct_key`: a flow a workload sent, keyed as it sent it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 40);

/// C `struct frag_key`: a datagram whose first fragment was admitted.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey>() == 40);

/// C `struct config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    pub proxy_addr4: [u8; 4],
    pub proxy_addr6: [u8; 16],
    pub proxy_port: u16,
    pub strict: u8,
    pub _pad: u8,
    pub proxy_mark: u32,
    pub event_sample: u32,
}
const _: () = assert!(size_of::<Config>() == 32);

/// C `struct flow_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_identity: u32,
    pub dst_identity: u32,
    pub endpoint_id: u32,
    pub rule_id: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub action: u8,
    pub reason: u8,
}
const _: () = assert!(size_of::<FlowEvent>() == 64);

impl FlowEvent {
    /// Decodes an event from ring-buffer bytes; `None` if the record is too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < size_of::<Self>() {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let mut src_addr = [0u8; 16];
        let mut dst_addr = [0u8; 16];
        src_addr.copy_from_slice(&b[8..24]);
        dst_addr.copy_from_slice(&b[24..40]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        Some(Self {
            timestamp_ns: u64::from_ne_bytes(ts),
            src_addr,
            dst_addr,
            src_identity: u32_at(40),
            dst_identity: u32_at(44),
            endpoint_id: u32_at(48),
            rule_id: u32_at(52),
            src_port: u16_at(56),
            dst_port: u16_at(58),
            protocol: b[60],
            direction: b[61],
            action: b[62],
            reason: b[63],
        })
    }
}

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays with
// explicit padding fields, so every bit pattern is valid and there is no uninitialised padding.
unsafe impl aya::Pod for IpcacheKey {}
// SAFETY: as above.
unsafe impl aya::Pod for IpcacheValue {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointValue {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyValue {}
// SAFETY: as above.
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
unsafe impl aya::Pod for ClientKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowEvent {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FragKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for ip in ["10.1.2.3", "fd00::7", "::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_from16(addr16(ip)), ip);
        }
        assert_eq!(
            IpcacheKey::new("10.0.0.0".parse().expect("ip"), 8).prefixlen,
            104
        );
    }

    #[test]
    fn events_decode_at_the_c_offsets() {
        let mut b = [0u8; 64];
        b[40..44].copy_from_slice(&300u32.to_ne_bytes());
        b[52..56].copy_from_slice(&7u32.to_ne_bytes());
        b[58..60].copy_from_slice(&8443u16.to_ne_bytes());
        b[62] = ACTION_DENY;
        let e = FlowEvent::from_bytes(&b).expect("event");
        assert_eq!(
            (e.src_identity, e.rule_id, e.dst_port, e.action),
            (300, 7, 8443, ACTION_DENY)
        );
        assert!(FlowEvent::from_bytes(&b[..63]).is_none());
    }
}
