/* Packet parsing for the tc programs: Ethernet, IPv4/IPv6, TCP/UDP ports. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include "helpers.h"

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

