/* The small flow tables of the tc programs: the connection table (flows a workload took part in,
 * so replies and ICMP errors about them come back in) and the fragment table (later fragments
 * follow their first fragment's verdict). */
#pragma once

#include "packet.h"

/* The ct key of a packet the workload sent, and of one it received: either way the flow's key,
 * remote being the workload's peer. ICMP echo: local_port is the identifier, remote_port 0. */
static __always_inline void ct_key_of(struct ct_key *k, const struct l4 *p, int sent)
{
	__builtin_memcpy(k->remote, sent ? p->dst : p->src, 16);
	__builtin_memcpy(k->local, sent ? p->src : p->dst, 16);
	k->protocol = p->proto;
	if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		k->remote_port = 0;
		k->local_port = p->dport; /* the echo identifier */
	} else {
		k->remote_port = sent ? p->dport : p->sport;
		k->local_port = sent ? p->sport : p->dport;
	}
}

#define CT_SENT 1
#define CT_RECEIVED 0

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
static __always_inline void ct_refresh(__u64 *seen, __u64 now)
{
	if (now - *seen > SIGNET_CT_REFRESH_NS)
		*seen = now;
}

static __always_inline int ct_fresh(const struct ct_key *k)
{
	__u64 *seen = bpf_map_lookup_elem(&signet_ct, k);
	if (!seen)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (now - *seen >= SIGNET_CT_IDLE_NS)
		return 0;
	ct_refresh(seen, now);
	return 1;
}

static __always_inline void ct_put(const struct ct_key *k)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *seen = bpf_map_lookup_elem(&signet_ct, k);
	if (seen)
		ct_refresh(seen, now);
	else
		bpf_map_update_elem(&signet_ct, k, &now, BPF_ANY);
}

/* An inbound UDP datagram or ICMP echo request was admitted: the workload's answers to it are
 * part of that flow. */
static __always_inline void ct_record_inbound(const struct l4 *p)
{
	if (p->proto != IPPROTO_UDP && !icmp_is_echo_request(p))
		return;
	struct ct_key k = {};
	ct_key_of(&k, p, CT_RECEIVED);
	ct_put(&k);
	if (p->proto == IPPROTO_UDP) {
		/* Again without the pod's address, for sendmsg() on a wildcard-bound socket. */
		__builtin_memset(k.local, 0, 16);
		ct_put(&k);
	}
}

/* Remembers a flow the workload is sending: every UDP datagram, TCP SYN and SYN-ACK (its own
 * connections and the ones it accepted), ICMP echo requests. */
static __always_inline void ct_record(const struct l4 *p)
{
	if (p->proto != IPPROTO_UDP && !(p->proto == IPPROTO_TCP && p->tcp_syn) &&
	    !icmp_is_echo_request(p))
		return;
	struct ct_key k = {};
	ct_key_of(&k, p, CT_SENT);
	ct_put(&k);
}

/* Whether an ICMP error is about a flow the workload took part in, and that flow is in the
 * table: an error naming any other flow could carry anything anywhere.
 * - Towards the workload: the inner packet is one it sent (any router on the path may report
 *   it, so only the inner source is checked against the workload).
 * - From the workload: the inner packet is one it received, and the error goes back to that
 *   packet's sender. */
static __always_inline int ct_icmp_error_known(struct __sk_buff *skb, const struct l4 *p,
					       int towards)
{
	struct l4 inner = {};
	if (!icmp_is_error(p) || parse_icmp_inner(skb, p, &inner) != PARSE_OK)
		return 0;
	if (towards ? !addr_eq(inner.src, p->dst)
		    : !addr_eq(inner.dst, p->src) || !addr_eq(inner.src, p->dst))
		return 0;
	struct ct_key k = {};
	ct_key_of(&k, &inner, towards ? CT_SENT : CT_RECEIVED);
	return ct_fresh(&k);
}

/* Whether a packet towards the workload answers a flow it started: a UDP reply, an ICMP echo
 * reply, or an ICMP error about a packet it sent. */
static __always_inline int ct_is_reply(struct __sk_buff *skb, const struct l4 *p)
{
	if (p->proto == IPPROTO_UDP || icmp_is_echo_reply(p)) {
		struct ct_key k = {};
		ct_key_of(&k, p, CT_RECEIVED);
		return ct_fresh(&k);
	}
	return ct_icmp_error_known(skb, p, 1);
}

/* Whether a packet from the workload answers a flow that came in (or continues one already
 * admitted): a UDP datagram, an ICMP echo reply, or an ICMP error about a packet it received. */
static __always_inline int ct_is_answer(struct __sk_buff *skb, const struct l4 *p)
{
	if (p->proto == IPPROTO_UDP || icmp_is_echo_reply(p)) {
		struct ct_key k = {};
		ct_key_of(&k, p, CT_SENT);
		return ct_fresh(&k);
	}
	return ct_icmp_error_known(skb, p, 0);
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
