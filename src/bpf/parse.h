/* SPDX-License-Identifier: GPL-2.0 */
/* Header parsing: Ethernet (up to two VLAN tags) -> IPv4 or IPv6 (extension
 * headers skipped) -> TCP/UDP ports, or the packet an ICMP error quotes;
 * every bound checked once before the bytes behind it are read.
 * ipv4_check() is shared with the backend's decapsulation
 * (l4lb_decap.bpf.c), which checks an outer and an inner header with it.
 */
#ifndef L4LB_PARSE_H
#define L4LB_PARSE_H

#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "csum.h"
#include "ipv6.h"

#define IPV4_DF 0x4000
#define IPV4_MF 0x2000
#define IPV4_OFFSET_MASK 0x1fff
#define IPV4_MAX_TOT_LEN 0xffff

/* What is wrong with an IPv4 header, if anything. Each program turns these
 * into its own counters.
 */
enum ipv4_fault {
	IPV4_OK = 0,
	IPV4_BAD_VERSION,   /* version field not 4 */
	IPV4_BAD_IHL,       /* IHL below 5 words */
	IPV4_SHORT,         /* options cut off */
	IPV4_BAD_TOT_LEN,   /* tot_len below the header or beyond what it may take */
};

/* Checks the IPv4 header at ip, whose fixed 20 bytes the caller has already
 * bounded against data_end (it needs them to decide whether to look at all).
 * data_end bounds what the frame holds; limit bounds what the packet may take
 * from ip on when it sits inside another one (an IPIP inner header): pass
 * IPV4_MAX_TOT_LEN when only the frame bounds it, and that comparison folds
 * away. The options are bounded, not read.
 */
static __always_inline enum ipv4_fault ipv4_check(const struct iphdr *ip, void *data_end, __u32 limit,
						  __u32 *ihl_bytes_out, __u32 *tot_len_out)
{
	__u32 ihl_bytes, tot_len;

	if (ip->version != 4)
		return IPV4_BAD_VERSION;
	if (ip->ihl < 5)
		return IPV4_BAD_IHL;
	ihl_bytes = ip->ihl * 4;
	if ((void *)ip + ihl_bytes > data_end || ihl_bytes > limit)
		return IPV4_SHORT;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_bytes || (void *)ip + tot_len > data_end || tot_len > limit)
		return IPV4_BAD_TOT_LEN;
	*ihl_bytes_out = ihl_bytes;
	*tot_len_out = tot_len;
	return IPV4_OK;
}

/* What the balancer needs from a client's packet, read before the outer
 * header moves the head. Address and port words hold the bytes as they are
 * on the wire, loaded as host-order words (the host's model of the hash,
 * src/control/flow_hash.rs, does the same). For an ICMP error, the flow is the one
 * the quoted packet belongs to, seen from the client.
 */
struct packet {
	struct l4lb_vip_key vip;  /* destination address, family, protocol, port */
	struct l4lb_flow_key *flow; /* where parsing writes the client's address (flow->saddr) */
	__u32 saddr;              /* source address word (IPv6: the XOR of its four words) */
	__u32 daddr;              /* destination address word, likewise */
	__u32 ports;              /* source and destination port, one word; 0 for fragments */
	__u32 l3_len;             /* the client's packet: IPv4 tot_len, or 40 + IPv6 payload length */
	__u32 l2_len;             /* Ethernet header with its VLAN tags: 14, 18 or 22 bytes */
	__u8 tos;                 /* IPv4 TOS / IPv6 traffic class, copied to the outer header */
	__u8 fragment;            /* 1 for any fragment of a datagram */
	__u8 icmp_error;          /* 1 for an ICMP error about a balanced flow */
	__u8 syn;                 /* 1 for a TCP segment with SYN and without ACK: a new connection */
	__be16 df;                /* IPv4 DF bit as on the wire (network order); 0 for IPv6 */
};

/* parse_packet() returns this when the frame is to be balanced; any other
 * value is the counter of the final verdict (PASS or a DROP_* reason).
 */
#define PARSE_BALANCE L4LB_CNT_MAX

#define IPV6_FRAG_OFFSET_MF 0xfff9  /* fragment offset and M bit of frag_off */
#define TCP_FLAGS_OFFSET 13          /* the TCP header's flags byte */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define ICMP_DEST_UNREACH 3          /* IPv4: every code, 4 = fragmentation needed */
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

struct ipv6_header {
	__be32 vtc_flow;          /* version 4 bits, traffic class 8, flow label 20 */
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* The common start of hop-by-hop, routing and destination options headers. */
struct ipv6_ext_header {
	__u8 nexthdr;
	__u8 len;                 /* in 8-byte units, not counting the first 8 bytes */
};

struct ipv6_frag_header {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;          /* offset << 3 | M bit */
	__be32 id;
};

/* The first 8 bytes of ICMP and ICMPv6 messages; errors quote the packet
 * that caused them right after.
 */
struct icmp_header {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be32 rest;              /* unused, or the next-hop MTU */
};

struct vlan_tag {
	__be16 tci;
	__be16 proto;             /* EtherType of what follows */
};

static __always_inline __u32 words_xor(const __u8 *addr)
{
	const __u32 *word = (const __u32 *)addr;

	return word[0] ^ word[1] ^ word[2] ^ word[3];
}

/* Whether two 16-byte addresses are the same, compared as 32-bit words (like
 * words_xor(), loads the verifier allows unaligned in packet memory).
 */
static __always_inline int addr16_equal(const __u8 *x, const __u8 *y)
{
	const __u32 *a = (const __u32 *)x, *b = (const __u32 *)y;

	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

/* Copies a 16-byte address as 32-bit words: __builtin_memcpy of byte arrays
 * would copy byte by byte (and spill more).
 */
static __always_inline void addr16_copy(__u8 *to, const __u8 *from)
{
	__u32 *a = (__u32 *)to;
	const __u32 *b = (const __u32 *)from;

	a[0] = b[0];
	a[1] = b[1];
	a[2] = b[2];
	a[3] = b[3];
}

/* An IPv4 address as a 16-byte one: in the first 4 bytes, the rest 0. */
static __always_inline void addr4_widen(__u8 *to, __be32 addr)
{
	__u32 *a = (__u32 *)to;

	a[0] = addr;
	a[1] = 0;
	a[2] = 0;
	a[3] = 0;
}

/* The two 16-bit halves of a ports word swapped: an ICMP error quotes the
 * VIP's answer (VIP port, client port), the flow is (client port, VIP port).
 */
static __always_inline __u32 swap_ports(__u32 ports)
{
	return (ports >> 16) | (ports << 16);
}

/* Reads the ports at l4 unless the packet is a fragment. They must lie inside
 * the datagram (l3_end), not only inside the frame.
 */
static __always_inline __u32 read_ports(struct packet *pkt, void *l4, void *l3_end, void *data_end)
{
	__u32 *ports = l4;
	__u8 *tcp_flags = l4 + TCP_FLAGS_OFFSET;

	pkt->ports = 0;
	pkt->vip.port = 0;
	pkt->syn = 0;
	if (pkt->fragment)
		return PARSE_BALANCE;
	if ((void *)(ports + 1) > data_end || (void *)(ports + 1) > l3_end)
		return L4LB_CNT_DROP_SHORT_L4;
	pkt->ports = *ports;
	pkt->vip.port = ((__be16 *)ports)[1];
	/* A segment cut before its flags is balanced like any other, unpinned
	 * only in that it is not taken for a SYN.
	 */
	if (pkt->vip.proto == IPPROTO_TCP && (void *)(tcp_flags + 1) <= data_end &&
	    (void *)(tcp_flags + 1) <= l3_end)
		pkt->syn = (*tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	return PARSE_BALANCE;
}

/* Whether the header checksum of the IPv4 header at ip (ihl_bytes long,
 * within the frame: ipv4_check() said so) is right. The fixed 20 bytes are
 * summed unrolled; options, rare, word by word.
 */
static __always_inline int ipv4_csum_ok(const struct iphdr *ip, __u32 ihl_bytes, void *data_end)
{
	const __u32 *word = (const __u32 *)ip;
	__u64 sum = csum_words32(ip, sizeof(*ip) / 4);

	if (ihl_bytes > sizeof(*ip)) {
#pragma clang loop unroll(full)
		for (int i = 5; i < 15; i++) {
			if ((void *)(word + i + 1) <= data_end && (__u32)i * 4 < ihl_bytes)
				sum += word[i];
		}
	}
	/* A right header sums to 0xffff: its complement is 0. */
	return csum_fold64(sum) == 0;
}

/* An IPv4 ICMP error addressed to a VIP: takes the flow of the packet it
 * quotes (the VIP's answer to a client: source the VIP). Anything else ICMP
 * (echo requests included) is for the stack.
 */
static __always_inline __u32 parse_icmp4_error(struct iphdr *ip, __u32 ihl_bytes, __u32 tot_len,
					       void *data_end, struct packet *pkt)
{
	struct icmp_header *icmp = (void *)ip + ihl_bytes;
	struct iphdr *quoted = (void *)(icmp + 1);
	__u32 quoted_ihl, *ports;

	if ((void *)(quoted + 1) > data_end || ihl_bytes + sizeof(*icmp) + sizeof(*quoted) > tot_len)
		return L4LB_CNT_PASS;
	if (icmp->type != ICMP_DEST_UNREACH || (ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK)))
		return L4LB_CNT_PASS;
	if (quoted->version != 4 || quoted->ihl < 5 ||
	    (quoted->protocol != IPPROTO_TCP && quoted->protocol != IPPROTO_UDP) ||
	    (quoted->frag_off & bpf_htons(IPV4_OFFSET_MASK)) || quoted->saddr != ip->daddr)
		return L4LB_CNT_PASS;
	quoted_ihl = quoted->ihl * 4;
	ports = (void *)quoted + quoted_ihl;
	if ((void *)(ports + 1) > data_end || ihl_bytes + sizeof(*icmp) + quoted_ihl + sizeof(*ports) > tot_len)
		return L4LB_CNT_PASS;

	__builtin_memset(&pkt->vip, 0, sizeof(pkt->vip));
	__builtin_memcpy(pkt->vip.addr, &quoted->saddr, 4);
	pkt->vip.family = L4LB_FAMILY_IPV4;
	pkt->vip.proto = quoted->protocol;
	pkt->vip.port = ((__be16 *)ports)[0];
	addr4_widen(pkt->flow->saddr, quoted->daddr);
	pkt->saddr = quoted->daddr;
	pkt->daddr = quoted->saddr;
	pkt->ports = swap_ports(*ports);
	pkt->fragment = 0;
	pkt->syn = 0;
	pkt->icmp_error = 1;
	return PARSE_BALANCE;
}

/* IPv4: options are skipped, not refused. Fragments are balanced on
 * addresses and protocol alone: only the first fragment carries the ports,
 * and every fragment of a datagram must reach the same backend. TTL 1 is
 * balanced: the VIP is the packet's destination, not a hop on its way.
 */
static __always_inline __u32 parse_ipv4(struct iphdr *ip, void *data_end, struct packet *pkt)
{
	__u32 ihl_bytes, tot_len;

	if ((void *)(ip + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_IPV4;
	switch (ipv4_check(ip, data_end, IPV4_MAX_TOT_LEN, &ihl_bytes, &tot_len)) {
	case IPV4_OK:
		break;
	case IPV4_BAD_VERSION:
		return L4LB_CNT_DROP_BAD_VERSION;
	case IPV4_BAD_IHL:
		return L4LB_CNT_DROP_BAD_IHL;
	case IPV4_SHORT:
		return L4LB_CNT_DROP_SHORT_IPV4;
	default:
		return L4LB_CNT_DROP_BAD_TOT_LEN;
	}
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_ICMP)
		return L4LB_CNT_PASS;
	if (!ipv4_csum_ok(ip, ihl_bytes, data_end))
		return L4LB_CNT_DROP_BAD_CSUM;
	if (ip->ttl == 0)
		return L4LB_CNT_DROP_TTL_ZERO;

	pkt->l3_len = tot_len;
	pkt->tos = ip->tos;
	pkt->df = ip->frag_off & bpf_htons(IPV4_DF);
	pkt->icmp_error = 0;
	if (ip->protocol == IPPROTO_ICMP)
		return parse_icmp4_error(ip, ihl_bytes, tot_len, data_end, pkt);

	__builtin_memset(&pkt->vip, 0, sizeof(pkt->vip));
	__builtin_memcpy(pkt->vip.addr, &ip->daddr, 4);
	pkt->vip.family = L4LB_FAMILY_IPV4;
	pkt->vip.proto = ip->protocol;
	addr4_widen(pkt->flow->saddr, ip->saddr);
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->fragment = !!(ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK));
	return read_ports(pkt, (void *)ip + ihl_bytes, (void *)ip + tot_len, data_end);
}

/* An ICMPv6 destination unreachable or packet too big addressed to a VIP:
 * takes the flow of the packet it quotes, which must be IPv6 with TCP or UDP
 * right after its fixed header (the VIP's answers carry no extension
 * headers) and come from the address the error is sent to.
 */
static __always_inline __u32 parse_icmp6_error(struct ipv6_header *ip6, void *icmp_start, void *l3_end,
					       void *data_end, struct packet *pkt)
{
	struct icmp_header *icmp = icmp_start;
	struct ipv6_header *quoted = (void *)(icmp + 1);
	__u32 *ports = (void *)(quoted + 1);

	if ((void *)(ports + 1) > data_end || (void *)(ports + 1) > l3_end)
		return L4LB_CNT_PASS;
	if ((icmp->type != ICMPV6_DEST_UNREACH && icmp->type != ICMPV6_PKT_TOOBIG) || pkt->fragment)
		return L4LB_CNT_PASS;
	if (ip_version(quoted) != 6 ||
	    (quoted->nexthdr != IPPROTO_TCP && quoted->nexthdr != IPPROTO_UDP))
		return L4LB_CNT_PASS;
	if (!addr16_equal(quoted->saddr, ip6->daddr))
		return L4LB_CNT_PASS;

	__builtin_memcpy(pkt->vip.addr, quoted->saddr, 16);
	pkt->vip.family = L4LB_FAMILY_IPV6;
	pkt->vip.proto = quoted->nexthdr;
	pkt->vip.port = ((__be16 *)ports)[0];
	addr16_copy(pkt->flow->saddr, quoted->daddr);
	pkt->saddr = words_xor(quoted->daddr);
	pkt->daddr = words_xor(quoted->saddr);
	pkt->ports = swap_ports(*ports);
	pkt->syn = 0;
	pkt->icmp_error = 1;
	return PARSE_BALANCE;
}

/* IPv6: up to L4LB_MAX_EXT_HEADERS extension headers (hop-by-hop, routing,
 * destination options, fragment) are skipped on the way to TCP, UDP or
 * ICMPv6. A fragment header's next header is the upper protocol for every
 * fragment, so all fragments of a datagram hash alike (ports 0). An atomic
 * fragment (offset 0, no M bit) is a whole packet and keeps its ports.
 */
static __always_inline __u32 parse_ipv6(struct ipv6_header *ip6, void *data_end, struct packet *pkt)
{
	struct ipv6_ext_header *ext;
	struct ipv6_frag_header *frag;
	void *cursor, *l3_end;
	__u32 payload_len;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_IPV6;
	if (ip_version(ip6) != 6)
		return L4LB_CNT_DROP_BAD_VERSION;
	/* 0 would announce a jumbogram, which no XDP frame can hold. */
	payload_len = bpf_ntohs(ip6->payload_len);
	l3_end = (void *)(ip6 + 1) + payload_len;
	if (payload_len == 0 || l3_end > data_end)
		return L4LB_CNT_DROP_BAD_PAYLOAD_LEN;

	pkt->fragment = 0;
	nexthdr = ip6->nexthdr;
	cursor = ip6 + 1;
#pragma clang loop unroll(full)
	for (int i = 0; i < L4LB_MAX_EXT_HEADERS; i++) {
		if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP || nexthdr == IPPROTO_ICMPV6)
			break;
		if (nexthdr == IPPROTO_FRAGMENT) {
			frag = cursor;
			if ((void *)(frag + 1) > data_end || (void *)(frag + 1) > l3_end)
				return L4LB_CNT_DROP_SHORT_IPV6;
			nexthdr = frag->nexthdr;
			pkt->fragment |= !!(frag->frag_off & bpf_htons(IPV6_FRAG_OFFSET_MF));
			cursor = frag + 1;
		} else if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
			   nexthdr == IPPROTO_DSTOPTS) {
			ext = cursor;
			if ((void *)(ext + 1) > data_end)
				return L4LB_CNT_DROP_SHORT_IPV6;
			nexthdr = ext->nexthdr;
			cursor += (ext->len + 1) * 8;
			if (cursor > l3_end)
				return L4LB_CNT_DROP_SHORT_IPV6;
		} else {
			return L4LB_CNT_PASS;
		}
	}
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP && nexthdr != IPPROTO_ICMPV6) {
		if (nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_HOPOPTS ||
		    nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS)
			return L4LB_CNT_DROP_EXT_HEADERS;
		return L4LB_CNT_PASS;
	}
	if (ip6->hop_limit == 0)
		return L4LB_CNT_DROP_TTL_ZERO;

	pkt->l3_len = IPV6_HDR_LEN + payload_len;
	pkt->tos = bpf_ntohl(ip6->vtc_flow) >> 20;
	pkt->df = 0;
	pkt->icmp_error = 0;
	if (nexthdr == IPPROTO_ICMPV6)
		return parse_icmp6_error(ip6, cursor, l3_end, data_end, pkt);

	__builtin_memcpy(pkt->vip.addr, ip6->daddr, 16);
	pkt->vip.family = L4LB_FAMILY_IPV6;
	pkt->vip.proto = nexthdr;
	addr16_copy(pkt->flow->saddr, ip6->saddr);
	pkt->saddr = words_xor(ip6->saddr);
	pkt->daddr = words_xor(ip6->daddr);
	return read_ports(pkt, cursor, l3_end, data_end);
}

/* Skips one 802.1Q / 802.1ad tag at *l3 if *proto announces one. */
static __always_inline __u32 skip_vlan_tag(void **l3, __be16 *proto, void *data_end, struct packet *pkt)
{
	struct vlan_tag *tag = *l3;

	if (*proto != bpf_htons(ETH_P_8021Q) && *proto != bpf_htons(ETH_P_8021AD))
		return PARSE_BALANCE;
	if ((void *)(tag + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_VLAN;
	*proto = tag->proto;
	*l3 = tag + 1;
	pkt->l2_len += sizeof(*tag);
	return PARSE_BALANCE;
}

/* Fills *pkt for an IPv4 or IPv6 TCP/UDP frame that is whole up to its
 * ports, or an ICMP error about such a flow. Up to two VLAN tags
 * (L4LB_MAX_VLAN_TAGS) may come first; a third is not ours.
 */
static __always_inline __u32 parse_packet(void *data, void *data_end, struct packet *pkt)
{
	struct ethhdr *eth = data;
	void *l3 = eth + 1;
	__be16 proto;
	__u32 outcome;

	if ((void *)(eth + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_ETH;
	/* struct ethhdr is packed: through it clang reads the EtherType byte by
	 * byte. It is 2-byte aligned like the frame.
	 */
	proto = *(__be16 *)(data + offsetof(struct ethhdr, h_proto));
	pkt->l2_len = sizeof(*eth);
	outcome = skip_vlan_tag(&l3, &proto, data_end, pkt);
	if (outcome != PARSE_BALANCE)
		return outcome;
	outcome = skip_vlan_tag(&l3, &proto, data_end, pkt);
	if (outcome != PARSE_BALANCE)
		return outcome;
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(l3, data_end, pkt);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(l3, data_end, pkt);
	return L4LB_CNT_PASS;
}

#endif /* L4LB_PARSE_H */
