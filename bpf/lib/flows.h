/* The small flow tables of the tc programs: the connection table (flows a workload took part in,
 * so replies and ICMP errors about them come back in) and the fragment table (later fragments
 * follow their first fragment's verdict). */
#pragma once

#include "packet.h"

/* The ct key of a packet as the workload sent it. */
static __always_inline void ct_key_sent(struct ct_key *k, const struct l4 *p)
{
	__builtin_memcpy(k->remote, p->dst, 16);
	__builtin_memcpy(k->local, p->src, 16);
	k->protocol = p->proto;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		k->remote_port = 0;
		k->local_port = p->dport; /* the echo identifier */
	} else {
		k->remote_port = p->dport;
		k->local_port = p->sport;
	}
}

/* Drops a packet: counted under its reason and reported. */
static __always_inline int drop(struct flow_event *ev, __u8 reason)
{
	ev->reason = reason;
	ev->action = SIGNET_ACTION_DENY;
	count_drop(reason);
	emit(ev);
	return TC_ACT_SHOT;
}

/* The policy verdict on a packet tc must decide: `peer` on the far side, the packet's port and
 * protocol as the policy keys them. Traffic for an L7 port is dropped: only the proxy, which
 * checks its requests, may carry it. */
static __always_inline int tc_policy(const struct endpoint_value *ep, const struct l4 *p,
				     __u32 peer, __u8 direction, struct flow_event *ev)
{
	int ported = p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
	__u8 key_proto = ported ? p->proto : SIGNET_PROTO_OTHER;
	__u16 dport = ported ? p->dport : 0;
	struct policy_value *pv = policy_lookup(ep->endpoint_id, peer, dport, key_proto, direction);
	if (!pv)
		return TC_ACT_OK;
	ev->rule_id = pv->rule_id;
	if (pv->action == SIGNET_ACTION_L7)
		return drop(ev, SIGNET_REASON_L7_BYPASS);
	if (pv->action == SIGNET_ACTION_DENY)
		return drop(ev, pv->rule_id ? SIGNET_REASON_POLICY : SIGNET_REASON_DEFAULT_DENY);
	if (pv->action == SIGNET_ACTION_AUDIT) {
		ev->action = SIGNET_ACTION_AUDIT;
		ev->reason = SIGNET_REASON_AUDIT;
		emit(ev);
	}
	return TC_ACT_OK;
}

/* A flow not seen for this long no longer lets replies in (the LRU forgets the rest). */
#define SIGNET_CT_IDLE_NS (120ULL * 1000000000ULL)
/* How stale a last-seen time may get before it is written again. */
#define SIGNET_CT_REFRESH_NS (1000000000ULL)

/* Whether the flow was seen within the idle time; a live flow's last-seen time is refreshed in
 * place (at most once a second), so its packets cost a lookup, not a map update. */
static __always_inline int ct_fresh(const struct ct_key *k)
{
	__u64 *seen = bpf_map_lookup_elem(&signet_ct, k);
	if (!seen)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 age = now - *seen;
	if (age >= SIGNET_CT_IDLE_NS)
		return 0;
	if (age > SIGNET_CT_REFRESH_NS)
		*seen = now;
	return 1;
}

static __always_inline void ct_put(const struct ct_key *k)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *seen = bpf_map_lookup_elem(&signet_ct, k);
	if (seen) {
		if (now - *seen > SIGNET_CT_REFRESH_NS)
			*seen = now;
		return;
	}
	bpf_map_update_elem(&signet_ct, k, &now, BPF_ANY);
}

/* An inbound UDP datagram or ICMP echo request was admitted: the workload's answers to it are
 * part of that flow, recorded as the workload will send them. */
static __always_inline void ct_record_inbound(const struct l4 *p)
{
	int echo = (p->proto == IPPROTO_ICMP && !p->ipv6 && p->icmp_type == ICMP_ECHO) ||
		   (p->proto == IPPROTO_ICMPV6 && p->ipv6 && p->icmp_type == ICMPV6_ECHO_REQUEST);
	if (p->proto != IPPROTO_UDP && !echo)
		return;
	struct ct_key k = { .protocol = p->proto };
	__builtin_memcpy(k.remote, p->src, 16);
	__builtin_memcpy(k.local, p->dst, 16);
	if (echo) {
		k.local_port = p->dport; /* the echo identifier */
	} else {
		k.remote_port = p->sport;
		k.local_port = p->dport;
	}
	ct_put(&k);
	if (p->proto == IPPROTO_UDP) {
		/* Again without the pod's address, for sendmsg() on a wildcard-bound socket. */
		__builtin_memset(k.local, 0, 16);
		ct_put(&k);
	}
}

/* Whether a packet from the workload answers a flow that came in: a UDP reply, an ICMP echo
 * reply, or an ICMP error about a packet sent to the workload. */
static __always_inline int ct_is_answer(struct __sk_buff *skb, const struct l4 *p)
{
	if (p->proto == IPPROTO_UDP) {
		struct ct_key k = {};
		ct_key_sent(&k, p);
		return ct_fresh(&k);
	}
	if (p->proto != IPPROTO_ICMP && p->proto != IPPROTO_ICMPV6)
		return 0;
	int echo_reply = p->ipv6 ? p->icmp_type == ICMPV6_ECHO_REPLY : p->icmp_type == ICMP_ECHOREPLY;
	if (echo_reply) {
		struct ct_key k = {};
		ct_key_sent(&k, p);
		return ct_fresh(&k);
	}
	if (!icmp_is_error(p))
		return 0;
	struct l4 inner = {};
	return parse_icmp_inner(skb, p, &inner) == PARSE_OK && addr_eq(inner.dst, p->src);
}

/* Remembers a flow the workload is sending: every UDP datagram, TCP SYN and SYN-ACK (its own
 * connections and the ones it accepted), ICMP echo requests. */
static __always_inline void ct_record(const struct l4 *p)
{
	int icmp_echo = (p->proto == IPPROTO_ICMP && !p->ipv6 && p->icmp_type == ICMP_ECHO) ||
			(p->proto == IPPROTO_ICMPV6 && p->ipv6 && p->icmp_type == ICMPV6_ECHO_REQUEST);
	if (p->proto != IPPROTO_UDP && !(p->proto == IPPROTO_TCP && p->tcp_syn) && !icmp_echo)
		return;
	struct ct_key k = {};
	ct_key_sent(&k, p);
	ct_put(&k);
}

/* Whether a packet towards the workload answers a flow it started: a UDP reply, an ICMP echo
 * reply, or an ICMP error about a packet it sent (checked on the packet inside the error). */
static __always_inline int ct_is_reply(struct __sk_buff *skb, const struct l4 *p)
{
	struct ct_key k = {};
	if (p->proto == IPPROTO_UDP) {
		__builtin_memcpy(k.remote, p->src, 16);
		__builtin_memcpy(k.local, p->dst, 16);
		k.remote_port = p->sport;
		k.local_port = p->dport;
		k.protocol = IPPROTO_UDP;
		return ct_fresh(&k);
	}
	if (p->proto != IPPROTO_ICMP && p->proto != IPPROTO_ICMPV6)
		return 0;
	int echo_reply = p->ipv6 ? p->icmp_type == ICMPV6_ECHO_REPLY : p->icmp_type == ICMP_ECHOREPLY;
	if (echo_reply) {
		__builtin_memcpy(k.remote, p->src, 16);
		__builtin_memcpy(k.local, p->dst, 16);
		k.local_port = p->dport;
		k.protocol = p->proto;
		return ct_fresh(&k);
	}
	if (!icmp_is_error(p))
		return 0;
	struct l4 inner = {};
	if (parse_icmp_inner(skb, p, &inner) != PARSE_OK)
		return 0;
	/* The error must be about a packet this workload sent. */
	if (!addr_eq(inner.src, p->dst))
		return 0;
	ct_key_sent(&k, &inner);
	return ct_fresh(&k);
}

static __always_inline void frag_key_of(struct frag_key *k, const struct l4 *p)
{
	__builtin_memcpy(k->src, p->src, 16);
	__builtin_memcpy(k->dst, p->dst, 16);
	k->id = p->frag_id;
	k->protocol = p->proto;
}

/* The first fragment of a datagram was admitted: its later fragments may follow. */
static __always_inline void frag_admit(const struct l4 *p)
{
	struct frag_key k = {};
	frag_key_of(&k, p);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&signet_frags, &k, &now, BPF_ANY);
}

static __always_inline int frag_admitted(const struct l4 *p)
{
	struct frag_key k = {};
	frag_key_of(&k, p);
	return bpf_map_lookup_elem(&signet_frags, &k) != NULL;
}
