/* cgroup/connect4|6 and cgroup/sendmsg4|6: a workload's TCP connect(), and its UDP connect() and
 * sendmsg(), to any destination. Egress
 * policy is decided here, before any packet leaves: deny fails connect() with EPERM. An allowed
 * connect to a mesh destination is rewritten to the node proxy's outbound listener, its original
 * destination recorded under the socket's cookie (sockops re-keys it by client address); one to
 * anywhere else (world, this node, other nodes) goes out untouched. */
#include "lib/flows.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Ring-buffer records have no map type to carry them into BTF; this read-only global does, so
 * the layout test can check `struct flow_event` against its Rust mirror. */
const volatile struct flow_event signet_flow_event_layout = {};

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* UDP connect() and sendmsg() to an address: the pod's egress entries, refused with EPERM.
 * Answers to a flow that came in pass: tc_to_endpoint recorded it without the pod's own address,
 * which a socket bound to the wildcard address does not have yet. tc_from_endpoint checks the
 * datagram again on the wire (it alone sees raw sockets and unhooked processes). */
static __always_inline int handle_udp(struct bpf_sock_addr *ctx, const __u8 dst[16], __u16 dport)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct endpoint_value *ep = bpf_map_lookup_elem(&signet_ep_netns, &netns);
	if (!ep)
		return SYS_PROCEED;
	struct ipcache_value *peer = ipcache_lookup(dst);
	if (addr_is_loopback(dst) && !(peer && (peer->flags & SIGNET_IPCACHE_MESH)))
		return SYS_PROCEED; /* within the pod */
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		struct ct_key k = { .remote_port = dport,
				    .local_port = (__u16)sk->src_port,
				    .protocol = IPPROTO_UDP };
		__builtin_memcpy(k.remote, dst, 16);
		if (ct_fresh(&k))
			return SYS_PROCEED;
	}
	__u32 identity = peer ? peer->identity : SIGNET_WORLD;
	struct policy_value *pv =
		policy_lookup(ep->endpoint_id, identity, dport, IPPROTO_UDP, SIGNET_EGRESS);
	if (!pv || pv->action == SIGNET_ACTION_ALLOW)
		return SYS_PROCEED;
	struct flow_event ev = {
		.src_identity = ep->identity,
		.dst_identity = identity,
		.endpoint_id = ep->endpoint_id,
		.rule_id = pv->rule_id,
		.dst_port = dport,
		.protocol = IPPROTO_UDP,
		.direction = SIGNET_EGRESS,
		.action = pv->action,
	};
	__builtin_memcpy(ev.dst_addr, dst, 16);
	if (pv->action == SIGNET_ACTION_AUDIT) {
		ev.reason = SIGNET_REASON_AUDIT;
		emit(&ev);
		return SYS_PROCEED;
	}
	ev.action = SIGNET_ACTION_DENY;
	ev.reason = pv->rule_id ? SIGNET_REASON_POLICY : SIGNET_REASON_DEFAULT_DENY;
	count_drop(ev.reason);
	emit(&ev);
	return SYS_REJECT;
}

static __always_inline int handle_connect(struct bpf_sock_addr *ctx, const __u8 dst[16], __u16 dport,
					  __u16 family)
{
	if (ctx->protocol == IPPROTO_UDP)
		return handle_udp(ctx, dst, dport);
	if (ctx->protocol != IPPROTO_TCP)
		return SYS_PROCEED; /* the rest: egress is decided by tc_from_endpoint */
	/* The socket's network namespace is the pod: every process in it, whatever its cgroup.
	 * The node's own namespace (the agent, the kubelet) is never an endpoint. */
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct endpoint_value *ep = bpf_map_lookup_elem(&signet_ep_netns, &netns);
	if (!ep)
		return SYS_PROCEED; /* not a mesh workload */
	struct config *cfg = config_get();
	if (!cfg)
		return SYS_REJECT; /* fail closed: not configured */
	/* Every destination has an identity: the ipcache's (mesh pods, Services, this node, other
	 * nodes, CIDRs named by policy), else world. */
	struct ipcache_value *peer = ipcache_lookup(dst);
	if (addr_is_loopback(dst) && !(peer && (peer->flags & SIGNET_IPCACHE_MESH)))
		return SYS_PROCEED; /* within the pod (whatever prefix covers it) */
	__u32 identity = peer ? peer->identity : SIGNET_WORLD;
	__u32 flags = peer ? peer->flags : 0;
	int capture = (flags & SIGNET_IPCACHE_MESH) &&
		      !bpf_map_lookup_elem(&signet_excluded_ports, &dport);

	struct flow_event ev = {
		.src_identity = ep->identity,
		.dst_identity = identity,
		.endpoint_id = ep->endpoint_id,
		.dst_port = dport,
		.protocol = IPPROTO_TCP,
		.direction = SIGNET_EGRESS,
	};
	__builtin_memcpy(ev.dst_addr, dst, 16);

	/* A captured connection to a Service is checked by the proxy against the endpoint it
	 * picks; everything else is checked here, before a packet leaves. */
	struct policy_value *pv = capture && (flags & SIGNET_IPCACHE_SERVICE)
					  ? NULL
					  : policy_lookup(ep->endpoint_id, identity, dport, IPPROTO_TCP,
							  SIGNET_EGRESS);
	__u8 action = pv ? pv->action : SIGNET_ACTION_ALLOW;
	ev.action = action;
	ev.rule_id = pv ? pv->rule_id : 0;
	if (action == SIGNET_ACTION_L7 && !capture)
		action = SIGNET_ACTION_DENY; /* requests to check, and no proxy to check them */
	if (action == SIGNET_ACTION_DENY) {
		ev.action = SIGNET_ACTION_DENY;
		ev.reason = ev.rule_id ? SIGNET_REASON_POLICY : SIGNET_REASON_DEFAULT_DENY;
		if (pv && pv->action == SIGNET_ACTION_L7)
			ev.reason = SIGNET_REASON_L7_BYPASS;
		count_drop(ev.reason);
		emit(&ev);
		return SYS_REJECT;
	}
	if (action == SIGNET_ACTION_AUDIT) {
		ev.reason = SIGNET_REASON_AUDIT;
		emit(&ev);
	}
	if (!capture)
		return SYS_PROCEED; /* allowed, and not for the mesh: untouched */
	if (cfg->proxy_port == 0)
		return SYS_REJECT; /* fail closed: no proxy configured */

	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst orig = { .port = dport,
				 .family = family,
				 .identity = (flags & SIGNET_IPCACHE_SERVICE) ? SIGNET_ANY : identity };
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

	if (action != SIGNET_ACTION_AUDIT && cfg->event_sample &&
	    (bpf_get_prandom_u32() % cfg->event_sample) == 0) {
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

SEC("cgroup/sendmsg4")
int signet_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u8 dst[16];
	addr_from_ip4(dst, ctx->user_ip4);
	return handle_udp(ctx, dst, bpf_ntohs((__u16)ctx->user_port));
}

SEC("cgroup/sendmsg6")
int signet_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u8 dst[16];
	__u32 w[4];
	w[0] = *(volatile __u32 *)&ctx->user_ip6[0];
	w[1] = *(volatile __u32 *)&ctx->user_ip6[1];
	w[2] = *(volatile __u32 *)&ctx->user_ip6[2];
	w[3] = *(volatile __u32 *)&ctx->user_ip6[3];
	__builtin_memcpy(dst, w, 16);
	return handle_udp(ctx, dst, bpf_ntohs((__u16)ctx->user_port));
}
