/* Packet parsing for the tc programs: Ethernet, IPv4 (fragments), IPv6 (extension headers and
 * fragments), then TCP, UDP or ICMP/ICMPv6. Every header is read with bpf_skb_load_bytes, so a
 * non-linear packet is classified like a linear one instead of being waved through.
 *
 * The parser says what it could not classify instead of guessing: PARSE_BAD for an IP packet
 * that is truncated, inconsistent, has an unknown or too long IPv6 extension chain, or is a first
 * fragment that does not carry its whole L4 header (RFC 1858); the callers drop it. */
#pragma once

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include "helpers.h"

/* ICMP and ICMPv6 types (linux/icmp.h would pull in libc headers). */
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IP = 1, /* ARP: passes */
	PARSE_BAD = 2,    /* IP (or an unknown ethertype) that cannot be classified: dropped */
};

enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST = 1, /* offset 0, more fragments follow: carries the L4 header */
	FRAG_LATER = 2, /* offset > 0: no L4 header, decided by the first fragment's verdict */
};

/* Extension headers walked before giving up on an IPv6 packet. */
#define SIGNET_IPV6_MAX_EXT 8

struct l4 {
	__u8 src[16];
	__u8 dst[16];
	__u16 sport;  /* TCP/UDP; ICMP echo: 0 */
	__u16 dport;  /* TCP/UDP; ICMP echo: the echo identifier */
	__u8 proto;   /* the real L4 protocol, after IPv6 extension headers */
	__u8 syn;     /* TCP: a connection-opening SYN (not SYN-ACK) */
	__u8 tcp_syn; /* TCP: SYN set, with or without ACK */
	__u8 frag;    /* enum frag_kind */
	__u8 ipv6;
	__u8 icmp_type;
	__u8 hop_limit; /* IPv6 only */
	__u8 _pad;
	__u32 frag_id; /* IPv4 identification or IPv6 fragment identification */
	__u32 l4_off;  /* where the L4 header starts */
	__u32 l4_len;  /* bytes of L4 header and payload in this packet (or fragment) */
};

/* RFC 1858: a TCP fragment at offset 8 or 16 could overwrite the header the first fragment was
 * judged by (flags sit at byte 13). Such fragments are never legitimate. */
#define SIGNET_TCP_MIN_FRAG_OFFSET 24

static __always_inline int parse_ip4(const struct iphdr *hdr, struct l4 *out)
{
	struct iphdr ip = *hdr;
	__u32 hl = ip.ihl * 4;
	__u32 total = bpf_ntohs(ip.tot_len);
	if (ip.version != 4 || hl < sizeof(ip) || total < hl)
		return PARSE_BAD;
	addr_from_ip4(out->src, ip.saddr);
	addr_from_ip4(out->dst, ip.daddr);
	out->proto = ip.protocol;
	out->l4_off = ETH_HLEN + hl;
	out->l4_len = total - hl;
	__u16 fo = bpf_ntohs(ip.frag_off);
	__u32 offset = (fo & 0x1fff) * 8;
	out->frag_id = bpf_ntohs(ip.id);
	if (offset) {
		out->frag = FRAG_LATER;
		if (ip.protocol == IPPROTO_TCP && offset < SIGNET_TCP_MIN_FRAG_OFFSET)
			return PARSE_BAD;
	} else if (fo & 0x2000) {
		out->frag = FRAG_FIRST;
	}
	return PARSE_OK;
}

static __always_inline int parse_ip6(struct __sk_buff *skb, struct l4 *out)
{
	struct ipv6hdr ip6;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) != 0 || ip6.version != 6)
		return PARSE_BAD;
	__builtin_memcpy(out->src, &ip6.saddr, 16);
	__builtin_memcpy(out->dst, &ip6.daddr, 16);
	out->ipv6 = 1;
	out->hop_limit = ip6.hop_limit;
	__u32 end = ETH_HLEN + sizeof(ip6) + bpf_ntohs(ip6.payload_len);
	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 nh = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < SIGNET_IPV6_MAX_EXT; i++) {
		if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
		    nh == IPPROTO_AH) {
			__u8 h[2];
			if (bpf_skb_load_bytes(skb, off, h, 2) != 0)
				return PARSE_BAD;
			off += nh == IPPROTO_AH ? ((__u32)h[1] + 2) * 4 : ((__u32)h[1] + 1) * 8;
			nh = h[0];
		} else if (nh == IPPROTO_FRAGMENT) {
			struct frag_hdr {
				__u8 nexthdr;
				__u8 reserved;
				__be16 frag_off;
				__be32 identification;
			} fh;
			if (bpf_skb_load_bytes(skb, off, &fh, sizeof(fh)) != 0)
				return PARSE_BAD;
			off += sizeof(fh);
			nh = fh.nexthdr;
			__u16 fo = bpf_ntohs(fh.frag_off);
			out->frag_id = bpf_ntohl(fh.identification);
			if (fo & 0xfff8) {
				/* A later fragment: what follows is payload, not a header. */
				out->frag = FRAG_LATER;
				out->proto = nh;
				out->l4_off = off;
				if (nh == IPPROTO_TCP && (fo & 0xfff8) < SIGNET_TCP_MIN_FRAG_OFFSET)
					return PARSE_BAD;
				return off <= end ? PARSE_OK : PARSE_BAD;
			}
			if (fo & 1)
				out->frag = FRAG_FIRST;
		} else {
			break;
		}
	}
	if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	    nh == IPPROTO_AH || nh == IPPROTO_FRAGMENT)
		return PARSE_BAD; /* a chain longer than we walk */
	if (off > end)
		return PARSE_BAD;
	out->proto = nh;
	out->l4_off = off;
	out->l4_len = end - off;
	return PARSE_OK;
}

/* Reads the L4 header at out->l4_off. A header that is not all there (truncated, or a first
 * fragment that split it) is PARSE_BAD. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct l4 *out)
{
	if (out->proto == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (out->l4_len < sizeof(tcp) ||
		    bpf_skb_load_bytes(skb, out->l4_off, &tcp, sizeof(tcp)) != 0)
			return PARSE_BAD;
		if (tcp.doff < 5 || out->l4_len < (__u32)tcp.doff * 4)
			return PARSE_BAD;
		out->sport = bpf_ntohs(tcp.source);
		out->dport = bpf_ntohs(tcp.dest);
		out->tcp_syn = tcp.syn;
		out->syn = tcp.syn && !tcp.ack;
	} else if (out->proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (out->l4_len < sizeof(udp) ||
		    bpf_skb_load_bytes(skb, out->l4_off, &udp, sizeof(udp)) != 0)
			return PARSE_BAD;
		out->sport = bpf_ntohs(udp.source);
		out->dport = bpf_ntohs(udp.dest);
	} else if ((out->proto == IPPROTO_ICMP && !out->ipv6) ||
		   (out->proto == IPPROTO_ICMPV6 && out->ipv6)) {
		/* type, code, checksum, then the echo identifier (or the error's unused word). */
		__u8 h[8];
		if (out->l4_len < sizeof(h) || bpf_skb_load_bytes(skb, out->l4_off, h, sizeof(h)) != 0)
			return PARSE_BAD;
		out->icmp_type = h[0];
		out->dport = ((__u16)h[4] << 8) | h[5];
	}
	return PARSE_OK;
}

/* Parses the packet at the start of skb (Ethernet). */
static __always_inline int parse(struct __sk_buff *skb, struct l4 *out)
{
	/* Ethernet and an IPv4 header in one read: the common case costs one helper call less. */
	__u8 h[ETH_HLEN + sizeof(struct iphdr)];
	struct iphdr ip4 = {};
	__be16 proto;
	if (bpf_skb_load_bytes(skb, 0, h, sizeof(h)) == 0) {
		__builtin_memcpy(&proto, h + offsetof(struct ethhdr, h_proto), sizeof(proto));
		__builtin_memcpy(&ip4, h + ETH_HLEN, sizeof(ip4));
	} else {
		if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) != 0)
			return PARSE_BAD;
		if (proto == bpf_htons(ETH_P_IP))
			return PARSE_BAD; /* shorter than an IPv4 header */
	}
	int r;
	if (proto == bpf_htons(ETH_P_IP))
		r = parse_ip4(&ip4, out);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = parse_ip6(skb, out);
	else if (proto == bpf_htons(ETH_P_ARP))
		return PARSE_NOT_IP;
	else
		return PARSE_BAD;
	if (r != PARSE_OK || out->frag == FRAG_LATER)
		return r;
	return parse_l4(skb, out);
}

static __always_inline int icmp_is_echo_request(const struct l4 *p)
{
	return (p->proto == IPPROTO_ICMP && !p->ipv6 && p->icmp_type == ICMP_ECHO) ||
	       (p->proto == IPPROTO_ICMPV6 && p->ipv6 && p->icmp_type == ICMPV6_ECHO_REQUEST);
}

static __always_inline int icmp_is_echo_reply(const struct l4 *p)
{
	return (p->proto == IPPROTO_ICMP && !p->ipv6 && p->icmp_type == ICMP_ECHOREPLY) ||
	       (p->proto == IPPROTO_ICMPV6 && p->ipv6 && p->icmp_type == ICMPV6_ECHO_REPLY);
}

/* ICMP errors carry the start of the packet they are about. */
static __always_inline int icmp_is_error(const struct l4 *p)
{
	if (p->ipv6)
		return p->icmp_type >= ICMPV6_DEST_UNREACH && p->icmp_type <= ICMPV6_PARAMPROB;
	return p->icmp_type == ICMP_DEST_UNREACH || p->icmp_type == ICMP_TIME_EXCEEDED ||
	       p->icmp_type == ICMP_PARAMETERPROB;
}

/* Neighbour discovery (router/neighbour solicitation and advertisement, redirect) and MLD: the
 * link needs them. RFC 4861: a genuine ND message has hop limit 255, so it cannot come from
 * beyond the link. */
static __always_inline int icmp6_is_link_control(const struct l4 *p)
{
	if (!p->ipv6 || p->proto != IPPROTO_ICMPV6)
		return 0;
	if (p->icmp_type >= 133 && p->icmp_type <= 137)
		return p->hop_limit == 255;
	return p->icmp_type == 130 || p->icmp_type == 131 || p->icmp_type == 132 ||
	       p->icmp_type == 143;
}

/* The flow an ICMP error is about, as the packet inside it shows it: the inner packet went from
 * inner->src to inner->dst. Returns PARSE_OK when the inner headers are readable. */
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, const struct l4 *outer,
					    struct l4 *inner)
{
	__u32 off = outer->l4_off + 8;
	if (!outer->ipv6) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) != 0 || ip.version != 4 ||
		    ip.ihl < 5)
			return PARSE_BAD;
		addr_from_ip4(inner->src, ip.saddr);
		addr_from_ip4(inner->dst, ip.daddr);
		inner->proto = ip.protocol;
		off += ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) != 0 || ip6.version != 6)
			return PARSE_BAD;
		__builtin_memcpy(inner->src, &ip6.saddr, 16);
		__builtin_memcpy(inner->dst, &ip6.daddr, 16);
		inner->proto = ip6.nexthdr;
		inner->ipv6 = 1;
		off += sizeof(ip6);
	}
	if (inner->proto == IPPROTO_TCP || inner->proto == IPPROTO_UDP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) != 0)
			return PARSE_BAD;
		inner->sport = bpf_ntohs(ports[0]);
		inner->dport = bpf_ntohs(ports[1]);
		return PARSE_OK;
	}
	if (inner->proto == IPPROTO_ICMP || inner->proto == IPPROTO_ICMPV6) {
		__u8 h[8];
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) != 0)
			return PARSE_BAD;
		inner->icmp_type = h[0];
		inner->dport = ((__u16)h[4] << 8) | h[5];
		return PARSE_OK;
	}
	return PARSE_BAD;
}
