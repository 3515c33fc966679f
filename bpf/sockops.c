/* sockops: when a captured socket sends its SYN its source address and port are known; key the
 * original destination by them, which is what the proxy sees on accept(). */
#include "lib/helpers.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("sockops")
int signet_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *o = bpf_map_lookup_elem(&signet_orig_by_cookie, &cookie);
	if (!o)
		return 1;
	struct client_key key = { .port = (__u16)skops->local_port };
	if (skops->family == 2) {
		addr_from_ip4(key.addr, skops->local_ip4);
	} else {
		/* One 32-bit load per word: the verifier refuses the 64-bit loads clang would merge
		 * them into. */
		__u32 w[4];
		w[0] = *(volatile __u32 *)&skops->local_ip6[0];
		w[1] = *(volatile __u32 *)&skops->local_ip6[1];
		w[2] = *(volatile __u32 *)&skops->local_ip6[2];
		w[3] = *(volatile __u32 *)&skops->local_ip6[3];
		__builtin_memcpy(key.addr, w, 16);
	}
	struct orig_dst copy = *o;
	bpf_map_update_elem(&signet_orig_by_client, &key, &copy, BPF_ANY);
	return 1;
}
