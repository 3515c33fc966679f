/* tc on an endpoint's host-side veth, traffic from the pod: remembers the flows a workload takes
 * part in (UDP datagrams, TCP SYN and SYN-ACK, ICMP echo requests), so their replies and the
 * ICMP errors about them pass the ingress check in tc_to_endpoint.c. Never drops: egress policy
 * is enforced at connect() and sendmsg() and by the proxy. */
#include "lib/flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

static __always_inline int handle_from_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	if (!bpf_map_lookup_elem(&signet_ep_ifindex, &ifindex))
		return TC_ACT_OK;
	struct l4 p = {};
	if (parse(skb, &p) != PARSE_OK || p.frag == FRAG_LATER)
		return TC_ACT_OK;
	ct_record(&p);
	return TC_ACT_OK;
}

SEC("classifier")
int signet_from_endpoint(struct __sk_buff *skb)
{
	return handle_from_endpoint(skb);
}
