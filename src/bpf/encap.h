/* SPDX-License-Identifier: GPL-2.0 */
/* Encapsulation: push an outer IPv4 header (20 bytes: IPv4-in-IPv4) or an
 * outer IPv6 header (40 bytes: IPv4-in-IPv6, IPv6-in-IPv6) between the
 * Ethernet header (with its VLAN tags) and the client's packet, which stays
 * byte for byte as it was.
 */
#ifndef L4LB_ENCAP_H
#define L4LB_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "csum.h"
#include "parse.h"

#define IPV6_FLOW_LABEL_MASK 0xfffff
/* The longest Ethernet header with tags: 14 + 2 x 4. */
#define L2_MAX_LEN 22
/* The tags' length, 0, 4 or 8, fits this mask. */
#define L2_TAGS_MASK 0xc

/* What the outer header copies from the client's packet, read by the caller
 * before the head moves.
 */
struct inner {
	__u32 l3_len;      /* the client's packet, L3 bytes */
	__u32 l2_len;      /* its Ethernet header with VLAN tags: 14, 18 or 22 */
	__u8 tos;          /* TOS / traffic class */
	__be16 df;         /* IPv4 DF bit (network order); 0 for IPv6 */
	__u8 proto;        /* outer protocol / next header: L4LB_IPPROTO_IPIP or _IPV6 */
	__u32 flow_label;  /* the flow's hash: IPv6 outer flow label, for ECMP on the way */
};

/* Copies `len` bytes (even, constant) as 16-bit words: __builtin_memcpy of
 * byte arrays copies byte by byte. Every place this copies from or to is at
 * an even offset from an even address (a frame's start, a map value).
 */
static __always_inline void copy16(__u8 *to, const __u8 *from, const int len)
{
#pragma clang loop unroll(full)
	for (int i = 0; i < len / 2; i++)
		((__u16 *)to)[i] = ((const __u16 *)from)[i];
}

/* After the head moved `moved` bytes forward, writes the new Ethernet header
 * at data from the old one at data + moved: destination `dst` (NULL: the old
 * source, for answers), source the old destination (the balancer's own MAC),
 * the old VLAN tags, EtherType `proto`. Returns the L3 header after it, with
 * `room` bytes bounded, or NULL. moved must exceed L2_MAX_LEN, so that the
 * old header is read before anything is written over it.
 */
static __always_inline void *rewrite_ethernet(struct xdp_md *ctx, __u32 moved, __u32 l2_len,
					      const __u8 *dst, __be16 proto, __u32 room)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *new = data, *old = data + moved;
	void *l3;

	/* 0, 4 or 8 bytes of tags, bounded by the mask itself: the verifier
	 * may not tie a range check on l2_len to the register added below.
	 */
	__u32 tags = (l2_len - ETH_HLEN) & L2_TAGS_MASK;

	if (l2_len != ETH_HLEN + tags || l2_len > L2_MAX_LEN || (void *)(old + L2_MAX_LEN) > data_end)
		return NULL;
	l3 = data + ETH_HLEN + tags;
	if (l3 + room > data_end)
		return NULL;
	copy16(new, dst ? dst : old + ETH_ALEN, ETH_ALEN);
	copy16(new + ETH_ALEN, old, ETH_ALEN);
	/* The tags, whatever their number: 8 bytes from after the MACs (for
	 * fewer tags the rest is overwritten below and by the L3 header).
	 */
	copy16(new + 2 * ETH_ALEN, old + 2 * ETH_ALEN, 8);
	*(__be16 *)(l3 - 2) = proto;
	return l3;
}

/* Outer IPv4: IP-in-IP to an IPv4 backend (the inner packet is IPv4). The
 * header is built as five 32-bit words in registers (as they lie in memory),
 * summed there and stored once: summing it back from the packet would load
 * what was just stored piecewise (a store-forwarding stall per word).
 */
static __always_inline int push_ipv4(struct xdp_md *ctx, const struct l4lb_backend *backend,
				     const struct l4lb_config *config, const struct inner *inner)
{
	__u32 *outer, word[5];

	if (bpf_xdp_adjust_head(ctx, -L4LB_IPIP_OVERHEAD))
		return -1;
	outer = rewrite_ethernet(ctx, L4LB_IPIP_OVERHEAD, inner->l2_len, backend->mac, bpf_htons(ETH_P_IP),
				 L4LB_IPIP_OVERHEAD);
	if (!outer)
		return -1;
	/* version 4, IHL 5; TOS; total length */
	word[0] = bpf_htonl(0x45000000 | ((__u32)inner->tos << 16) | (inner->l3_len + L4LB_IPIP_OVERHEAD));
	/* ID 0; flags (DF as the client's) and offset 0 */
	word[1] = bpf_htonl((__u32)bpf_ntohs(inner->df));
	/* TTL; protocol; checksum 0 for the sum */
	word[2] = bpf_htonl(((__u32)L4LB_OUTER_TTL << 24) | ((__u32)L4LB_IPPROTO_IPIP << 16));
	word[3] = *(const __u32 *)config->src_v4;
	word[4] = *(const __u32 *)backend->addr;
	/* The checksum goes where the sum counted 0: the low half of word 2
	 * in network order, its last two bytes in memory.
	 */
	word[2] |= (__u32)csum_fold64(csum_words32(word, 5)) << 16;
	outer[0] = word[0];
	outer[1] = word[1];
	outer[2] = word[2];
	outer[3] = word[3];
	outer[4] = word[4];
	return 0;
}

/* Outer IPv6: to an IPv6 backend, for IPv4 (next header 4) or IPv6 (41)
 * clients. IPv6 has no header checksum.
 */
static __always_inline int push_ipv6(struct xdp_md *ctx, const struct l4lb_backend *backend,
				     const struct l4lb_config *config, const struct inner *inner)
{
	struct ipv6_header *outer;

	if (bpf_xdp_adjust_head(ctx, -L4LB_IP6_OVERHEAD))
		return -1;
	outer = rewrite_ethernet(ctx, L4LB_IP6_OVERHEAD, inner->l2_len, backend->mac, bpf_htons(ETH_P_IPV6),
				 sizeof(*outer));
	if (!outer)
		return -1;
	outer->vtc_flow = bpf_htonl((6U << 28) | ((__u32)inner->tos << 20) |
				    (inner->flow_label & IPV6_FLOW_LABEL_MASK));
	outer->payload_len = bpf_htons(inner->l3_len);
	outer->nexthdr = inner->proto;
	outer->hop_limit = L4LB_OUTER_TTL;
	__builtin_memcpy(outer->saddr, config->src_v6, 16);
	__builtin_memcpy(outer->daddr, backend->addr, 16);
	return 0;
}

#endif /* L4LB_ENCAP_H */
