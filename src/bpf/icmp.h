/* SPDX-License-Identifier: GPL-2.0 */
/* Answers to packets too big to encapsulate: ICMP "fragmentation needed"
 * (IPv4 with DF) and ICMPv6 "packet too big", built in place of the client's
 * frame and sent back out (XDP_TX), so that the client lowers its path MTU
 * instead of losing the packet. They advertise the MTU minus the outer
 * header and quote the start of the client's packet (L4LB_ICMP4_QUOTE,
 * L4LB_ICMP6_QUOTE bytes).
 *
 * The quote stays where it is: the head moves back by exactly the new IP
 * and ICMP headers, so the client's packet already follows them, and the
 * tail is cut after the quote.
 */
#ifndef L4LB_ICMP_H
#define L4LB_ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "csum.h"
#include "parse.h"
#include "encap.h"

#define ICMP_FRAG_NEEDED 4
#define ICMP4_ANSWER_HEADERS (sizeof(struct iphdr) + sizeof(struct icmp_header))
#define ICMP6_ANSWER_HEADERS (sizeof(struct ipv6_header) + sizeof(struct icmp_header))

/* Cuts the frame after the client's L2 header and `quote` bytes of its
 * packet, then moves the head back by `headers`. Returns -1 if the packet is
 * shorter than the quote or a helper refuses.
 */
static __always_inline int make_room(struct xdp_md *ctx, const struct packet *pkt, __u32 quote, __u32 headers)
{
	long len = (long)ctx->data_end - (long)ctx->data;

	/* Taken whole: clang would subtract only the low halves (a 32-bit
	 * operation on packet pointers, which the verifier refuses) for an int.
	 */
	barrier_var(len);
	if (pkt->l3_len < quote)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, (int)((long)(pkt->l2_len + quote) - len)))
		return -1;
	return bpf_xdp_adjust_head(ctx, -(int)headers) ? -1 : 0;
}

/* ICMP "fragmentation needed" for an IPv4 packet with DF set. */
static __always_inline int answer_too_big4(struct xdp_md *ctx, const struct packet *pkt, __u32 mtu)
{
	struct icmp_header *icmp;
	struct iphdr *ip, *quoted;
	void *data_end;

	if (make_room(ctx, pkt, L4LB_ICMP4_QUOTE, ICMP4_ANSWER_HEADERS))
		return -1;
	ip = rewrite_ethernet(ctx, ICMP4_ANSWER_HEADERS, pkt->l2_len, NULL, bpf_htons(ETH_P_IP),
			      ICMP4_ANSWER_HEADERS + L4LB_ICMP4_QUOTE);
	if (!ip)
		return -1;
	data_end = (void *)(long)ctx->data_end;
	icmp = (void *)(ip + 1);
	quoted = (void *)(icmp + 1);

	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tos = 0;
	ip->tot_len = bpf_htons(ICMP4_ANSWER_HEADERS + L4LB_ICMP4_QUOTE);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = L4LB_ICMP_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = quoted->daddr;   /* from the VIP ... */
	ip->daddr = quoted->saddr;   /* ... to the client */
	ip->check = ipv4_header_csum(ip);

	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->rest = bpf_htonl(mtu & 0xffff);  /* unused 16 bits, next-hop MTU */
	if ((void *)icmp + sizeof(*icmp) + L4LB_ICMP4_QUOTE > data_end)
		return -1;
	icmp->checksum = csum_fold64(csum_words32(icmp, (sizeof(*icmp) + L4LB_ICMP4_QUOTE) / 4));
	return 0;
}

/* ICMPv6 "packet too big" for an IPv6 packet. Its checksum covers a
 * pseudo-header of the addresses, the length and the next header.
 */
static __always_inline int answer_too_big6(struct xdp_md *ctx, const struct packet *pkt, __u32 mtu)
{
	struct ipv6_header *ip6, *quoted;
	struct icmp_header *icmp;
	void *data_end;
	__u64 sum;

	if (make_room(ctx, pkt, L4LB_ICMP6_QUOTE, ICMP6_ANSWER_HEADERS))
		return -1;
	ip6 = rewrite_ethernet(ctx, ICMP6_ANSWER_HEADERS, pkt->l2_len, NULL, bpf_htons(ETH_P_IPV6),
			       ICMP6_ANSWER_HEADERS + L4LB_ICMP6_QUOTE);
	if (!ip6)
		return -1;
	data_end = (void *)(long)ctx->data_end;
	icmp = (void *)(ip6 + 1);
	quoted = (void *)(icmp + 1);
	if ((void *)icmp + sizeof(*icmp) + L4LB_ICMP6_QUOTE > data_end)
		return -1;

	ip6->vtc_flow = bpf_htonl(6U << 28);
	ip6->payload_len = bpf_htons(sizeof(*icmp) + L4LB_ICMP6_QUOTE);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = L4LB_ICMP_TTL;
	__builtin_memcpy(ip6->saddr, quoted->daddr, 16);
	__builtin_memcpy(ip6->daddr, quoted->saddr, 16);

	icmp->type = ICMPV6_PKT_TOOBIG;
	icmp->code = 0;
	icmp->checksum = 0;
	icmp->rest = bpf_htonl(mtu);
	/* Pseudo-header: both addresses (the 32 bytes before the ICMPv6 header),
	 * upper-layer length and next header as 32-bit words.
	 */
	sum = bpf_htonl(sizeof(*icmp) + L4LB_ICMP6_QUOTE) + bpf_htonl(IPPROTO_ICMPV6);
	sum += csum_words32(ip6->saddr, 8);
	sum += csum_words32(icmp, (sizeof(*icmp) + L4LB_ICMP6_QUOTE) / 4);
	icmp->checksum = csum_fold64(sum);
	return 0;
}

#endif /* L4LB_ICMP_H */
