/* tc on an endpoint's host-side veth, traffic towards the pod: ingress policy for traffic that
 * did not come through the proxy. Source identity from the ipcache (unknown: world). TCP is
 * decided on the connection-opening SYN; later segments of an admitted connection pass. In
 * strict mode plaintext TCP is dropped whoever sends it (another workload or a client outside
 * the mesh): only the proxy (marked) and this node's own host (kubelet probes) reach the pod. */
#include "lib/packet.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

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
	if (p.proto == IPPROTO_UDP) {
		struct udp_ct_key ct = { .remote_port = p.sport, .local_port = p.dport };
		__builtin_memcpy(ct.remote, p.src, 16);
		__builtin_memcpy(ct.local, p.dst, 16);
		if (bpf_map_lookup_elem(&signet_udp_ct, &ct))
			return TC_ACT_OK; /* a reply to a flow the workload started */
	}

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

	if (p.proto == IPPROTO_TCP && cfg->strict && src_id != SIGNET_HOST)
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
