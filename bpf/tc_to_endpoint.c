/* tc on an endpoint's host-side veth, traffic towards the pod: ingress policy for traffic that
 * did not come through the proxy. Source identity from the ipcache (unknown: world). TCP is
 * decided on the connection-opening SYN; later segments of an admitted connection pass. In
 * strict mode plaintext TCP from another mesh workload is dropped: it must come over mTLS. */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include "lib/helpers.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct l4 {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 syn; /* a connection-opening SYN (not SYN-ACK) */
};

static __always_inline int parse(struct __sk_buff *skb, struct l4 *out)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	void *l4p;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return -1;
		addr_from_ip4(out->src, ip->saddr);
		addr_from_ip4(out->dst, ip->daddr);
		out->proto = ip->protocol;
		l4p = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(out->src, &ip6->saddr, 16);
		__builtin_memcpy(out->dst, &ip6->daddr, 16);
		out->proto = ip6->nexthdr; /* extension headers: treated as other protocols */
		l4p = (void *)(ip6 + 1);
	} else {
		return -1;
	}
	if (out->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4p;
		if ((void *)(tcp + 1) > end)
			return -1;
		out->sport = bpf_ntohs(tcp->source);
		out->dport = bpf_ntohs(tcp->dest);
		out->syn = tcp->syn && !tcp->ack;
	} else if (out->proto == IPPROTO_UDP) {
		struct udphdr *udp = l4p;
		if ((void *)(udp + 1) > end)
			return -1;
		out->sport = bpf_ntohs(udp->source);
		out->dport = bpf_ntohs(udp->dest);
	}
	return 0;
}

static __always_inline int drop(struct flow_event *ev, __u8 reason)
{
	ev->reason = reason;
	ev->action = SIGNET_ACTION_DENY;
	count_drop(reason);
	emit(ev);
	return TC_ACT_SHOT;
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
	if (parse(skb, &p) != 0)
		return TC_ACT_OK; /* ARP, ICMP errors and other non-IP traffic */
	if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	if (p.proto == IPPROTO_TCP && !p.syn)
		return TC_ACT_OK; /* decided on the SYN */

	struct ipcache_value *src = ipcache_lookup(p.src);
	__u32 src_id = src ? src->identity : SIGNET_WORLD;
	struct flow_event ev = {
		.timestamp_ns = bpf_ktime_get_ns(),
		.src_identity = src_id,
		.dst_identity = ep->identity,
		.endpoint_id = ep->endpoint_id,
		.src_port = p.sport,
		.dst_port = p.dport,
		.protocol = p.proto,
		.direction = SIGNET_INGRESS,
	};
	__builtin_memcpy(ev.src_addr, p.src, 16);
	__builtin_memcpy(ev.dst_addr, p.dst, 16);

	if (p.proto == IPPROTO_TCP && cfg->strict && src && (src->flags & SIGNET_IPCACHE_MESH))
		return drop(&ev, SIGNET_REASON_STRICT_PLAINTEXT);

	struct policy_value *pv = policy_lookup(ep->endpoint_id, src_id, p.dport, p.proto, SIGNET_INGRESS);
	if (!pv)
		return TC_ACT_OK;
	ev.rule_id = pv->rule_id;
	if (pv->action == SIGNET_ACTION_DENY)
		return drop(&ev, pv->rule_id ? SIGNET_REASON_POLICY : SIGNET_REASON_DEFAULT_DENY);
	if (pv->action == SIGNET_ACTION_AUDIT) {
		ev.action = SIGNET_ACTION_AUDIT;
		ev.reason = SIGNET_REASON_AUDIT;
		emit(&ev);
	}
	return TC_ACT_OK;
}

SEC("classifier")
int signet_to_endpoint(struct __sk_buff *skb)
{
	return handle_to_endpoint(skb);
}
