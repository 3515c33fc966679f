/* Signet datapath: the maps every program shares and the structs stored in them.
 *
 * Every struct here has a #[repr(C)] mirror in bpf/src/maps.rs with a size assertion, and a
 * test compares both against the compiled objects' BTF. Explicit padding, no bool/enum in a
 * map layout. Addresses are stored as 16 bytes: IPv6 as is, IPv4 as ::ffff:a.b.c.d. Ports
 * are in host byte order in keys and values unless a field says otherwise.
 *
 * Maps are pinned by name under the agent's bpffs folder, so every object the agent loads
 * (one per attach point) shares them, and they outlive the agent.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SIGNET_ANY 0
#define SIGNET_HOST 1 /* this node: its addresses, e.g. kubelet probes */
#define SIGNET_WORLD 2

enum signet_direction {
	SIGNET_INGRESS = 0,
	SIGNET_EGRESS = 1,
};

/* Actions, as compiled by signet-policy (`Action::code`). */
enum signet_action {
	SIGNET_ACTION_NONE = 0,
	SIGNET_ACTION_ALLOW = 1,
	SIGNET_ACTION_DENY = 2,
	SIGNET_ACTION_L7 = 3,
	SIGNET_ACTION_AUDIT = 4,
};

/* Drop and event reasons, shared with userspace (`Reason` in bpf/src/maps.rs). */
enum signet_reason {
	SIGNET_REASON_POLICY = 0,
	SIGNET_REASON_DEFAULT_DENY = 1,
	SIGNET_REASON_STRICT_PLAINTEXT = 2,
	SIGNET_REASON_ALLOWED = 3,
	SIGNET_REASON_AUDIT = 4,
	SIGNET_REASON_REDIRECTED = 5,
	SIGNET_REASON_UNPARSEABLE = 6, /* IP (or an unknown ethertype) the parser cannot classify */
	SIGNET_REASON_FRAGMENT = 7,    /* a fragment whose datagram has no admitted first fragment */
	SIGNET_REASON_L7_BYPASS = 8,   /* an L7-governed port reached without the proxy */
	SIGNET_REASON_MAX = 16,
};

/* The policy key's protocol for everything but TCP and UDP (ICMP echo, SCTP, ESP, GRE...): only
 * rules without ports govern them, with port 0. */
#define SIGNET_PROTO_OTHER 0

/* ipcache: LPM trie, address -> identity. */
struct ipcache_key {
	__u32 prefixlen; /* bits of addr that count; IPv4 entries add 96 */
	__u8 addr[16];
};

#define SIGNET_IPCACHE_MESH 1 /* a mesh workload: capture connections to it */
/* A Service ClusterIP: identity is its backends' one identity, or SIGNET_ANY when they have
 * several (or none). Captured TCP to it is decided by the proxy on the endpoint it picks. */
#define SIGNET_IPCACHE_SERVICE 2

struct ipcache_value {
	__u32 identity;
	__u32 flags;
};

/* endpoints: network namespace cookie (connect side: every process of the pod, whatever its
 * cgroup) or host-side ifindex (tc side) -> endpoint. */
struct endpoint_value {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;
	__u32 _pad;
};

/* policy: hash, see signet-policy's compile.rs for the lookup order. */
struct policy_key {
	__u32 endpoint_id;
	__u32 peer_identity; /* 0 = any */
	__u16 dport;         /* 0 = any */
	__u8 protocol;       /* IPPROTO_TCP / IPPROTO_UDP / SIGNET_PROTO_OTHER */
	__u8 direction;      /* enum signet_direction */
};

struct policy_value {
	__u8 action; /* enum signet_action */
	__u8 _pad[3];
	__u32 rule_id; /* 0 = a default decided */
};

/* The destination a captured connection asked for. */
struct orig_dst {
	__u8 addr[16];
	__u16 port;
	__u16 family; /* AF_INET or AF_INET6 */
	__u32 identity;
};

/* orig_by_client: client address and port as the proxy sees them -> original destination. */
struct client_key {
	__u8 addr[16];
	__u16 port;
	__u16 _pad;
};

/* ct: flows a workload took part in, as it sent them (UDP datagrams, TCP SYN and SYN-ACK, ICMP
 * echo requests), so replies and ICMP errors about them pass the ingress check without an
 * ingress rule of their own. ICMP echo: local_port is the echo identifier, remote_port 0. */
struct ct_key {
	__u8 remote[16]; /* the peer the workload sent to: source of the reply */
	__u8 local[16];  /* the workload */
	__u16 remote_port;
	__u16 local_port;
	__u8 protocol;
	__u8 _pad[3];
};

/* frags: the admitted first fragment of a datagram, so its later fragments (which carry no L4
 * header) follow its verdict. Fragments of datagrams not in here are dropped. */
struct frag_key {
	__u8 src[16];
	__u8 dst[16];
	__u32 id; /* IPv4 identification (16 bits) or IPv6 fragment identification */
	__u8 protocol;
	__u8 _pad[3];
};

struct config {
	__u8 proxy_addr4[4];   /* network byte order, as in sockaddr */
	__u8 proxy_addr6[16];
	__u16 proxy_port;      /* host byte order */
	__u8 strict;           /* 1: drop plaintext TCP from other workloads */
	__u8 _pad;
	__u32 proxy_mark;      /* skb->mark of packets the proxy sends to workloads */
	__u32 event_sample;    /* emit allowed-connection events 1 in N (0: never) */
};

/* A flow event in the ring buffer. */
struct flow_event {
	__u64 timestamp_ns;
	__u8 src_addr[16];
	__u8 dst_addr[16];
	__u32 src_identity;
	__u32 dst_identity;
	__u32 endpoint_id;
	__u32 rule_id;
	__u16 src_port;
	__u16 dst_port;
	__u8 protocol;
	__u8 direction;
	__u8 action;
	__u8 reason;
};

#ifndef SIGNET_MAP_SIZES
#define SIGNET_IPCACHE_MAX 65536
#define SIGNET_ENDPOINTS_MAX 4096
#define SIGNET_POLICY_MAX 65536
#define SIGNET_ORIG_MAX 65536
#define SIGNET_CT_MAX 16384
#define SIGNET_FRAGS_MAX 8192
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SIGNET_IPCACHE_MAX);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SIGNET_ENDPOINTS_MAX);
	__type(key, __u64); /* bpf_get_netns_cookie() */
	__type(value, struct endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_ep_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SIGNET_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, struct endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_ep_ifindex SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SIGNET_POLICY_MAX);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SIGNET_ORIG_MAX);
	__type(key, __u64); /* socket cookie */
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SIGNET_ORIG_MAX);
	__type(key, struct client_key);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_orig_by_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SIGNET_CT_MAX);
	__type(key, struct ct_key);
	__type(value, __u64); /* last seen, ns */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SIGNET_FRAGS_MAX);
	__type(key, struct frag_key);
	__type(value, __u64); /* when the first fragment was admitted, ns */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_frags SEC(".maps");

/* Destination ports a workload's connect() to a mesh destination leaves alone (not captured). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_excluded_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SIGNET_REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} signet_events SEC(".maps");
