/* tc on an endpoint's host-side veth, traffic from the pod: remembers the UDP flows a workload
 * starts, so their replies pass the ingress check in tc_to_endpoint.c (the small LRU
 * connection table DESIGN.md asks for). Never drops: egress policy is enforced at connect()
 * and by the proxy. */
#include "lib/packet.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int handle_from_endpoint(struct __sk_buff *skb)
{
	struct l4 p = {};
	if (parse(skb, &p) != 0 || p.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	if (!bpf_map_lookup_elem(&signet_ep_ifindex, &ifindex))
		return TC_ACT_OK;
	struct udp_ct_key ct = { .remote_port = p.dport, .local_port = p.sport };
	__builtin_memcpy(ct.remote, p.dst, 16);
	__builtin_memcpy(ct.local, p.src, 16);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&signet_udp_ct, &ct, &now, BPF_ANY);
	return TC_ACT_OK;
}

SEC("classifier")
int signet_from_endpoint(struct __sk_buff *skb)
{
	return handle_from_endpoint(skb);
}
