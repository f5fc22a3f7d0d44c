/* SPDX-License-Identifier: GPL-2.0 */
/* IP-in-IP encapsulation: push a 20-byte outer IPv4 header between the
 * Ethernet header and the client's packet, which stays byte for byte as it was.
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

#define IPV4_DF 0x4000

/* Returns 0, or -1 when the frame has no headroom for the outer header.
 * inner_tos, inner_df and inner_tot_len are read by the caller before the
 * head moves; they are copied into the outer header.
 */
static __always_inline int push_ipip(struct xdp_md *ctx, const struct l4lb_backend *backend,
				     __be32 src_addr, __u8 inner_tos, __be16 inner_df,
				     __u16 inner_tot_len)
{
	struct ethhdr *eth, *old_eth;
	struct iphdr *outer;
	void *data, *data_end;

	if (bpf_xdp_adjust_head(ctx, -L4LB_IPIP_OVERHEAD))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	outer = data + sizeof(*eth);
	old_eth = data + L4LB_IPIP_OVERHEAD;
	if ((void *)(outer + 1) > data_end)
		return -1;

	/* The new source is the MAC the frame was sent to: the balancer's own.
	 * Copy it before the new header overwrites the old one (they overlap).
	 */
	__builtin_memcpy(eth->h_source, old_eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, backend->mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	outer->version = 4;
	outer->ihl = sizeof(*outer) / 4;
	outer->tos = inner_tos;
	outer->tot_len = bpf_htons(inner_tot_len + L4LB_IPIP_OVERHEAD);
	outer->id = 0;
	outer->frag_off = inner_df;
	outer->ttl = L4LB_OUTER_TTL;
	outer->protocol = L4LB_IPPROTO_IPIP;
	outer->check = 0;
	outer->saddr = src_addr;
	outer->daddr = backend->addr;
	outer->check = ipv4_header_csum(outer);
	return 0;
}

#endif /* L4LB_ENCAP_H */
