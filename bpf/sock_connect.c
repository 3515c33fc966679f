/* cgroup/connect4 and cgroup/connect6: capture a workload's TCP connect() to a mesh
 * destination. Egress policy is decided here, before any packet leaves: deny fails connect()
 * with EPERM; allow rewrites the destination to the node proxy's outbound listener and records
 * the original destination under the socket's cookie (sockops re-keys it by client address). */
#include "lib/helpers.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Ring-buffer records have no map type to carry them into BTF; this read-only global does, so
 * the layout test can check `struct flow_event` against its Rust mirror. */
const volatile struct flow_event signet_flow_event_layout = {};

#define SYS_REJECT 0
#define SYS_PROCEED 1

static __always_inline int handle_connect(struct bpf_sock_addr *ctx, const __u8 dst[16], __u16 dport,
					  __u16 family)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SYS_PROCEED;
	/* The socket's network namespace is the pod: every process in it, whatever its cgroup.
	 * The node's own namespace (the agent, the kubelet) is never an endpoint. */
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct endpoint_value *ep = bpf_map_lookup_elem(&signet_ep_netns, &netns);
	if (!ep)
		return SYS_PROCEED; /* not a mesh workload */
	struct ipcache_value *peer = ipcache_lookup(dst);
	if (!peer || !(peer->flags & SIGNET_IPCACHE_MESH))
		return SYS_PROCEED; /* not a mesh destination: untouched */
	if (bpf_map_lookup_elem(&signet_excluded_ports, &dport))
		return SYS_PROCEED; /* an excluded port: untouched */
	struct config *cfg = config_get();
	if (!cfg || cfg->proxy_port == 0)
		return SYS_REJECT; /* fail closed: no proxy configured */

	struct flow_event ev = {
		.timestamp_ns = bpf_ktime_get_ns(),
		.src_identity = ep->identity,
		.dst_identity = peer->identity,
		.endpoint_id = ep->endpoint_id,
		.dst_port = dport,
		.protocol = IPPROTO_TCP,
		.direction = SIGNET_EGRESS,
	};
	__builtin_memcpy(ev.dst_addr, dst, 16);

	/* A Service ClusterIP has no identity of its own (SIGNET_ANY): the proxy picks the
	 * endpoint and checks egress against that endpoint's identity, so only a real peer is
	 * checked here. */
	struct policy_value *pv = peer->identity == SIGNET_ANY
					  ? NULL
					  : policy_lookup(ep->endpoint_id, peer->identity, dport,
							  IPPROTO_TCP, SIGNET_EGRESS);
	__u8 action = pv ? pv->action : SIGNET_ACTION_ALLOW;
	ev.action = action;
	ev.rule_id = pv ? pv->rule_id : 0;
	if (action == SIGNET_ACTION_DENY) {
		ev.reason = ev.rule_id ? SIGNET_REASON_POLICY : SIGNET_REASON_DEFAULT_DENY;
		count_drop(ev.reason);
		emit(&ev);
		return SYS_REJECT;
	}

	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst orig = { .port = dport, .family = family, .identity = peer->identity };
	__builtin_memcpy(orig.addr, dst, 16);
	if (bpf_map_update_elem(&signet_orig_by_cookie, &cookie, &orig, BPF_ANY) != 0)
		return SYS_REJECT; /* fail closed: the proxy could not find the destination */

	if (family == 2 /* AF_INET */) {
		__u32 proxy4;
		__builtin_memcpy(&proxy4, cfg->proxy_addr4, 4);
		ctx->user_ip4 = proxy4;
	} else {
		__u32 w[4];
		__builtin_memcpy(w, cfg->proxy_addr6, 16);
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
	}
	ctx->user_port = bpf_htons(cfg->proxy_port);

	if (action == SIGNET_ACTION_AUDIT) {
		ev.reason = SIGNET_REASON_AUDIT;
		emit(&ev);
	} else if (cfg->event_sample && (bpf_get_prandom_u32() % cfg->event_sample) == 0) {
		ev.reason = SIGNET_REASON_REDIRECTED;
		emit(&ev);
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int signet_connect4(struct bpf_sock_addr *ctx)
{
	__u8 dst[16];
	addr_from_ip4(dst, ctx->user_ip4);
	return handle_connect(ctx, dst, bpf_ntohs((__u16)ctx->user_port), 2);
}

SEC("cgroup/connect6")
int signet_connect6(struct bpf_sock_addr *ctx)
{
	__u8 dst[16];
	__u32 w[4];
	w[0] = *(volatile __u32 *)&ctx->user_ip6[0];
	w[1] = *(volatile __u32 *)&ctx->user_ip6[1];
	w[2] = *(volatile __u32 *)&ctx->user_ip6[2];
	w[3] = *(volatile __u32 *)&ctx->user_ip6[3];
	__builtin_memcpy(dst, w, 16);
	return handle_connect(ctx, dst, bpf_ntohs((__u16)ctx->user_port), 10);
}
