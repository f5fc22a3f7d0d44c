/* SPDX-License-Identifier: GPL-2.0 */
/* Encapsulation: push an outer IPv4 header (20 bytes: IPv4-in-IPv4) or an
 * outer IPv6 header (40 bytes: IPv4-in-IPv6, IPv6-in-IPv6) between the
 * Ethernet header and the client's packet, which stays byte for byte as it
 * was.
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

/* What the outer header copies from the client's packet, read by the caller
 * before the head moves.
 */
struct inner {
	__u32 l3_len;      /* the client's packet, L3 bytes */
	__u8 tos;          /* TOS / traffic class */
	__be16 df;         /* IPv4 DF bit (network order); 0 for IPv6 */
	__u8 proto;        /* outer protocol / next header: L4LB_IPPROTO_IPIP or _IPV6 */
	__u32 flow_label;  /* the flow's hash: IPv6 outer flow label, for ECMP on the way */
};

/* Moves the head `overhead` bytes forward and writes the new Ethernet header:
 * destination the next hop, source the MAC the frame was sent to (the
 * balancer's own), EtherType `proto`. Returns the outer L3 header, with
 * `overhead` bytes bounded, or NULL when the frame has no headroom.
 */
static __always_inline void *push_ethernet(struct xdp_md *ctx, int overhead, const __u8 *next_hop,
					   __be16 proto)
{
	struct ethhdr *eth, *old_eth;
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, -overhead))
		return NULL;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	old_eth = data + overhead;
	if ((void *)(old_eth + 1) > data_end)
		return NULL;
	/* The old Ethernet header lies where the outer IP header goes: read its
	 * destination before the caller writes that header.
	 */
	__builtin_memcpy(eth->h_source, old_eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, next_hop, ETH_ALEN);
	eth->h_proto = proto;
	return eth + 1;
}

/* Outer IPv4: IP-in-IP to an IPv4 backend (the inner packet is IPv4). */
static __always_inline int push_ipv4(struct xdp_md *ctx, const struct l4lb_backend *backend,
				     const struct l4lb_config *config, const struct inner *inner)
{
	struct iphdr *outer = push_ethernet(ctx, L4LB_IPIP_OVERHEAD, backend->mac, bpf_htons(ETH_P_IP));

	if (!outer)
		return -1;
	outer->version = 4;
	outer->ihl = sizeof(*outer) / 4;
	outer->tos = inner->tos;
	outer->tot_len = bpf_htons(inner->l3_len + L4LB_IPIP_OVERHEAD);
	outer->id = 0;
	outer->frag_off = inner->df;
	outer->ttl = L4LB_OUTER_TTL;
	outer->protocol = L4LB_IPPROTO_IPIP;
	outer->check = 0;
	__builtin_memcpy(&outer->saddr, config->src_v4, 4);
	__builtin_memcpy(&outer->daddr, backend->addr, 4);
	outer->check = ipv4_header_csum(outer);
	return 0;
}

/* Outer IPv6: to an IPv6 backend, for IPv4 (next header 4) or IPv6 (41)
 * clients. IPv6 has no header checksum.
 */
static __always_inline int push_ipv6(struct xdp_md *ctx, const struct l4lb_backend *backend,
				     const struct l4lb_config *config, const struct inner *inner)
{
	struct ipv6_header *outer = push_ethernet(ctx, L4LB_IP6_OVERHEAD, backend->mac,
						  bpf_htons(ETH_P_IPV6));

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
