/* Helpers shared by the attach points: addresses, the ipcache, the policy lookup in the order
 * signet-policy compiles for, drop counters and flow events. */
#pragma once

#include "common.h"

static __always_inline void addr_from_ip4(__u8 out[16], __u32 ip4_be)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &ip4_be, 4);
}

static __always_inline int addr_eq(const __u8 a[16], const __u8 b[16])
{
	__u32 x[4], y[4];
	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* 127.0.0.0/8 (as ::ffff:127.x.y.z) or ::1: traffic that never leaves the pod. */
static __always_inline int addr_is_loopback(const __u8 a[16])
{
	__u32 w[4];
	__builtin_memcpy(w, a, 16);
	if (w[0] || w[1])
		return 0;
	if (w[2] == bpf_htonl(0xffff))
		return a[12] == 127;
	return !w[2] && w[3] == bpf_htonl(1);
}

static __always_inline struct ipcache_value *ipcache_lookup(const __u8 addr[16])
{
	struct ipcache_key key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, addr, 16);
	return bpf_map_lookup_elem(&signet_ipcache, &key);
}

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&signet_config, &zero);
}

/* (peer, port), (peer, any), (any, port), (any, any); NULL means no policy selects the endpoint
 * in this direction: default allow. */
static __always_inline struct policy_value *policy_lookup(__u32 endpoint, __u32 peer, __u16 dport,
							   __u8 proto, __u8 direction)
{
	struct policy_key key = {
		.endpoint_id = endpoint,
		.peer_identity = peer,
		.dport = dport,
		.protocol = proto,
		.direction = direction,
	};
	struct policy_value *v = bpf_map_lookup_elem(&signet_policy, &key);
	if (v)
		return v;
	key.dport = 0;
	v = bpf_map_lookup_elem(&signet_policy, &key);
	if (v)
		return v;
	key.peer_identity = SIGNET_ANY;
	key.dport = dport;
	v = bpf_map_lookup_elem(&signet_policy, &key);
	if (v)
		return v;
	key.dport = 0;
	return bpf_map_lookup_elem(&signet_policy, &key);
}

static __always_inline void count_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&signet_drops, &reason);
	if (n)
		*n += 1;
}

/* Events never wake the reader: a wake-up per connect costs ~10 us. The agent polls the ring
 * on a timer and whenever it is woken for another reason. */
static __always_inline void emit(const struct flow_event *ev)
{
	struct flow_event *slot = bpf_ringbuf_reserve(&signet_events, sizeof(*slot), 0);
	if (!slot)
		return;
	__builtin_memcpy(slot, ev, sizeof(*slot));
	slot->timestamp_ns = bpf_ktime_get_ns(); /* taken here: most packets never emit */
	bpf_ringbuf_submit(slot, BPF_RB_NO_WAKEUP);
}
