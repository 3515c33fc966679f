//! Signet's eBPF programs and the Rust side of their maps.
//!
//! The programs are C (`bpf/*.c`, one file per attach point, helpers in `bpf/lib/*.h`), built by
//! `build.rs` with clang and embedded here as one object per attach point. They share their
//! maps by pinning them by name under the agent's bpffs folder. `maps` holds a `#[repr(C)]`
//! mirror of every key and value, checked against the objects' BTF by a test.
//!
//! Loading, pinning and attaching is the agent's job (`agent/src/datapath/`).

pub mod maps;

/// An embedded BPF object.
#[derive(Debug, Clone, Copy)]
pub struct Object {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! object {
    ($name:literal) => {
        Object {
            name: $name,
            bytes: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/", $name, ".o")),
        }
    };
}

/// `cgroup/connect4|6` and `cgroup/sendmsg4|6` (`signet_connect4`, `signet_sendmsg4`, ...).
pub const SOCK_CONNECT: Object = object!("sock_connect");
/// `cgroup/getpeername4` and `cgroup/getpeername6`.
pub const SOCK_GETPEERNAME: Object = object!("sock_getpeername");
/// `sockops` (`signet_sockops`).
pub const SOCKOPS: Object = object!("sockops");
/// tc towards an endpoint (`signet_to_endpoint`).
pub const TC_TO_ENDPOINT: Object = object!("tc_to_endpoint");
/// tc from an endpoint (`signet_from_endpoint`): the UDP connection table.
pub const TC_FROM_ENDPOINT: Object = object!("tc_from_endpoint");

pub const OBJECTS: [Object; 5] = [
    SOCK_CONNECT,
    SOCK_GETPEERNAME,
    SOCKOPS,
    TC_TO_ENDPOINT,
    TC_FROM_ENDPOINT,
];

/// Program names, as in the C sources.
pub mod programs {
    pub const CONNECT4: &str = "signet_connect4";
    pub const CONNECT6: &str = "signet_connect6";
    pub const SENDMSG4: &str = "signet_sendmsg4";
    pub const SENDMSG6: &str = "signet_sendmsg6";
    pub const GETPEERNAME4: &str = "signet_getpeername4";
    pub const GETPEERNAME6: &str = "signet_getpeername6";
    pub const SOCKOPS: &str = "signet_sockops";
    pub const TO_ENDPOINT: &str = "signet_to_endpoint";
    pub const FROM_ENDPOINT: &str = "signet_from_endpoint";
}

/// Map names, as in `bpf/lib/common.h`; also their pin file names.
pub mod map_names {
    pub const IPCACHE: &str = "signet_ipcache";
    pub const EP_NETNS: &str = "signet_ep_netns";
    pub const EP_IFINDEX: &str = "signet_ep_ifindex";
    pub const POLICY: &str = "signet_policy";
    pub const ORIG_BY_COOKIE: &str = "signet_orig_by_cookie";
    pub const ORIG_BY_CLIENT: &str = "signet_orig_by_client";
    pub const CONFIG: &str = "signet_config";
    pub const DROPS: &str = "signet_drops";
    pub const EVENTS: &str = "signet_events";
    pub const CT: &str = "signet_ct";
    pub const FRAGS: &str = "signet_frags";
    pub const EXCLUDED_PORTS: &str = "signet_excluded_ports";
    pub const ALL: [&str; 12] = [
        IPCACHE,
        EP_NETNS,
        EP_IFINDEX,
        POLICY,
        ORIG_BY_COOKIE,
        ORIG_BY_CLIENT,
        CONFIG,
        DROPS,
        EVENTS,
        CT,
        FRAGS,
        EXCLUDED_PORTS,
    ];
}
