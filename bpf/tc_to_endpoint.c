/* tc on an endpoint's host-side veth, traffic towards the pod: ingress policy for traffic that
 * did not come through the proxy. Source identity from the ipcache (unknown: world).
 *
 * What is decided where:
 * - TCP on the connection-opening SYN; later segments of an admitted connection pass. In strict
 *   mode plaintext TCP is dropped whoever sends it: only the proxy (marked) and this node's own
 *   host (kubelet probes) reach the pod. A port whose rules inspect requests (L7) is dropped for
 *   everyone but the proxy, which alone can check them.
 * - UDP per datagram; replies to flows the pod started pass (the ct table).
 * - Every other protocol (ICMP echo, SCTP, ESP...) by the rules without ports (port 0 of
 *   SIGNET_PROTO_OTHER). ICMP errors about a flow the pod took part in, echo replies to its own
 *   pings and IPv6 neighbour discovery pass.
 * - Fragments: the first must carry the whole L4 header and is decided like an unfragmented
 *   packet; later fragments follow its verdict, and are dropped when it is not known.
 * - IP the parser cannot classify, and ethertypes other than IPv4, IPv6 and ARP, are dropped. */
#include "lib/flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* What passes without a policy lookup: later segments of TCP connections (decided on their
 * SYN), replies and ICMP errors for flows the pod took part in, neighbour discovery. */
static __always_inline int passes_unchecked(struct __sk_buff *skb, const struct l4 *p)
{
	return (p->proto == IPPROTO_TCP && !p->syn) || icmp6_is_link_control(p) ||
	       ct_is_reply(skb, p);
}

static __always_inline int decide(const struct endpoint_value *ep, const struct config *cfg,
				  const struct l4 *p, struct flow_event *ev)
{
	if (p->proto == IPPROTO_TCP && cfg->strict && ev->src_identity != SIGNET_HOST)
		return drop(ev, SIGNET_REASON_STRICT_PLAINTEXT);
	return tc_policy(ep, p, ev->src_identity, SIGNET_INGRESS, ev);
}

static __always_inline int handle_to_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_value *ep = bpf_map_lookup_elem(&signet_ep_ifindex, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	struct config *cfg = config_get();
	if (!cfg)
		return TC_ACT_SHOT; /* fail closed: not configured */
	if (cfg->proxy_mark && skb->mark == cfg->proxy_mark)
		return TC_ACT_OK; /* the proxy already authorised it */
	struct l4 p = {};
	int parsed = parse(skb, &p);
	if (parsed == PARSE_NOT_IP)
		return TC_ACT_OK; /* ARP */
	if (parsed == PARSE_OK) {
		if (p.frag == FRAG_LATER && frag_admitted(&p))
			return TC_ACT_OK;
		if (p.frag != FRAG_LATER && passes_unchecked(skb, &p)) {
			if (p.frag == FRAG_FIRST)
				frag_admit(&p);
			return TC_ACT_OK;
		}
	}

	struct ipcache_value *src = ipcache_lookup(p.src);
	struct flow_event ev = {
		.src_identity = src ? src->identity : SIGNET_WORLD,
		.dst_identity = ep->identity,
		.endpoint_id = ep->endpoint_id,
		.src_port = p.sport,
		.dst_port = p.dport,
		.protocol = p.proto,
		.direction = SIGNET_INGRESS,
	};
	__builtin_memcpy(ev.src_addr, p.src, 16);
	__builtin_memcpy(ev.dst_addr, p.dst, 16);

	if (parsed != PARSE_OK)
		return drop(&ev, SIGNET_REASON_UNPARSEABLE);
	if (p.frag == FRAG_LATER)
		return drop(&ev, SIGNET_REASON_FRAGMENT);
	int verdict = decide(ep, cfg, &p, &ev);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (p.frag == FRAG_FIRST)
		frag_admit(&p);
	ct_record_inbound(&p); /* so the pod's answers pass its egress check */
	return TC_ACT_OK;
}

SEC("classifier")
int signet_to_endpoint(struct __sk_buff *skb)
{
	return handle_to_endpoint(skb);
}
