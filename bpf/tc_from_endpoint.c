/* tc on an endpoint's host-side veth, traffic from the pod: egress policy for what the socket
 * programs do not decide, and the connection table.
 *
 * - TCP: connect() already decided (EPERM) and redirected mesh connections to the proxy. A SYN
 *   that reaches here for anywhere but the proxy (a raw socket, a process whose cgroup the
 *   socket programs do not cover) is checked again; later segments pass.
 * - UDP per datagram, and every other protocol at port 0 of SIGNET_PROTO_OTHER: answers to a
 *   flow that came in (the ct table), ICMP errors about flows that came in and IPv6
 *   neighbour discovery pass; the rest goes through the pod's egress entries. A denied datagram
 *   is dropped here: a UDP socket gets no EPERM.
 * - Whatever passes is remembered (UDP datagrams, TCP SYN and SYN-ACK, ICMP echo requests), so
 *   replies and ICMP errors about it pass the ingress check in tc_to_endpoint.c.
 * - Fragments follow their first fragment; what cannot be classified is dropped. */
#include "lib/flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Whether a TCP SYN goes to the node proxy's outbound listener: connect() captured it. */
static __always_inline int to_proxy(const struct config *cfg, const struct l4 *p)
{
	if (p->dport != cfg->proxy_port)
		return 0;
	if (!p->ipv6) {
		__u32 want, got;
		__builtin_memcpy(&want, cfg->proxy_addr4, 4);
		__builtin_memcpy(&got, p->dst + 12, 4);
		return want == got;
	}
	return addr_eq(cfg->proxy_addr6, p->dst);
}

/* What passes without a policy lookup: TCP after its SYN and SYNs connect() sent to the proxy,
 * answers to flows that came in (and later datagrams of flows already admitted), ICMP errors
 * about flows that came in, neighbour discovery. */
static __always_inline int passes_unchecked(struct __sk_buff *skb, const struct config *cfg,
					    const struct l4 *p)
{
	if (p->proto == IPPROTO_TCP)
		return !p->syn || to_proxy(cfg, p);
	return icmp6_is_link_control(p) || ct_is_answer(skb, p);
}

static __always_inline int handle_from_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_value *ep = bpf_map_lookup_elem(&signet_ep_ifindex, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	struct config *cfg = config_get();
	if (!cfg)
		return TC_ACT_SHOT; /* fail closed: not configured */
	struct l4 p = {};
	int parsed = parse(skb, &p);
	if (parsed == PARSE_NOT_IP)
		return TC_ACT_OK; /* ARP */
	if (parsed == PARSE_OK) {
		if (p.frag == FRAG_LATER && frag_admitted(&p))
			return TC_ACT_OK;
		if (p.frag != FRAG_LATER && passes_unchecked(skb, cfg, &p)) {
			if (p.frag == FRAG_FIRST)
				frag_admit(&p);
			if (p.tcp_syn)
				ct_record(&p); /* its connections and the ones it accepted, for ICMP errors */
			return TC_ACT_OK;
		}
	}

	struct ipcache_value *dst = ipcache_lookup(p.dst);
	struct flow_event ev = {
		.src_identity = ep->identity,
		.dst_identity = dst ? dst->identity : SIGNET_WORLD,
		.endpoint_id = ep->endpoint_id,
		.src_port = p.sport,
		.dst_port = p.dport,
		.protocol = p.proto,
		.direction = SIGNET_EGRESS,
	};
	__builtin_memcpy(ev.src_addr, p.src, 16);
	__builtin_memcpy(ev.dst_addr, p.dst, 16);

	if (parsed != PARSE_OK)
		return drop(&ev, SIGNET_REASON_UNPARSEABLE);
	if (p.frag == FRAG_LATER)
		return drop(&ev, SIGNET_REASON_FRAGMENT);
	int verdict = tc_policy(ep, &p, ev.dst_identity, SIGNET_EGRESS, &ev);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (p.frag == FRAG_FIRST)
		frag_admit(&p);
	ct_record(&p);
	return TC_ACT_OK;
}

SEC("classifier")
int signet_from_endpoint(struct __sk_buff *skb)
{
	return handle_from_endpoint(skb);
}
