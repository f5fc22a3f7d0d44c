/* SPDX-License-Identifier: GPL-2.0 */
/* Header parsing: Ethernet -> IPv4 -> TCP/UDP ports, every bound checked once
 * before the bytes behind it are read. ipv4_check() is shared with the
 * backend's decapsulation (l4lb_decap.bpf.c), which checks an outer and an
 * inner header with it.
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
