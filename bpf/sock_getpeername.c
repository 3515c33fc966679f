/* cgroup/getpeername4 and getpeername6: a captured socket reports the destination the
 * application asked for, not the proxy. */
#include "lib/helpers.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup/getpeername4")
int signet_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&signet_orig_by_cookie, &cookie);
	if (o && o->family == 2) {
		__u32 ip4;
		__builtin_memcpy(&ip4, o->addr + 12, 4);
		ctx->user_ip4 = ip4;
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

SEC("cgroup/getpeername6")
int signet_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&signet_orig_by_cookie, &cookie);
	if (o && o->family == 10) {
		__u32 w[4];
		__builtin_memcpy(w, o->addr, 16);
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}
