/* SPDX-License-Identifier: GPL-2.0 */
/* Header parsing: Ethernet -> IPv4 -> TCP/UDP ports, every bound checked once
 * before the bytes behind it are read.
 */
#ifndef L4LB_PARSE_H
#define L4LB_PARSE_H

#include <linux/types.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"

#define IPV4_MF 0x2000
#define IPV4_OFFSET_MASK 0x1fff

/* What the balancer hashes. Fields hold the bytes as they are on the wire,
 * loaded as host-order words (the host's model of the hash does the same).
 */
struct flow {
	__u32 saddr;
	__u32 daddr;
	__u32 ports;  /* source and destination port, one word; 0 for fragments */
	__u32 proto;
};

/* parse_ipv4() returns this when the frame is to be balanced; any other value
 * is the counter of the final verdict (PASS or a DROP_* reason).
 */
#define PARSE_BALANCE L4LB_CNT_MAX

/* Fills *flow and *ip_out for an IPv4 TCP/UDP frame that is whole up to its
 * ports. IPv4 options are skipped, not refused. Fragments are balanced on
 * addresses and protocol alone: only the first fragment carries the ports, and
 * every fragment of a datagram must reach the same destination.
 */
static __always_inline __u32 parse_ipv4(void *data, void *data_end, struct flow *flow,
					struct iphdr **ip_out)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	__u32 ihl_bytes, tot_len;
	__u32 *ports;

	if ((void *)(eth + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_ETH;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return L4LB_CNT_PASS;
	if ((void *)(ip + 1) > data_end)
		return L4LB_CNT_DROP_SHORT_IPV4;
	if (ip->version != 4)
		return L4LB_CNT_DROP_BAD_VERSION;
	if (ip->ihl < 5)
		return L4LB_CNT_DROP_BAD_IHL;
	ihl_bytes = ip->ihl * 4;
	if ((void *)ip + ihl_bytes > data_end)
		return L4LB_CNT_DROP_SHORT_IPV4;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_bytes || (void *)ip + tot_len > data_end)
		return L4LB_CNT_DROP_BAD_TOT_LEN;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return L4LB_CNT_PASS;

	flow->saddr = ip->saddr;
	flow->daddr = ip->daddr;
	flow->proto = ip->protocol;
	flow->ports = 0;
	if (!(ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK))) {
		ports = (void *)ip + ihl_bytes;
		/* The ports must lie inside the datagram, not only the frame. */
		if ((void *)(ports + 1) > data_end || ihl_bytes + sizeof(*ports) > tot_len)
			return L4LB_CNT_DROP_SHORT_L4;
		flow->ports = *ports;
	}
	*ip_out = ip;
	return PARSE_BALANCE;
}

#endif /* L4LB_PARSE_H */
