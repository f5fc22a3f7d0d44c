/* SPDX-License-Identifier: GPL-2.0 */
/* IPv6 header checks, the counterpart of parse.h's ipv4_check(). Used by the
 * backend's decapsulation (l4lb_decap.bpf.c) for an outer IPv6 header and for
 * an IPv6 client packet inside one; the balancer's parse.h takes
 * IPV6_HDR_LEN and ip_version() from here. Nothing here depends on either
 * program's maps or counters.
 */
#ifndef L4LB_IPV6_H
#define L4LB_IPV6_H

#include <linux/types.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>

/* The fixed IPv6 header. */
#define IPV6_HDR_LEN 40
/* The largest IPv6 packet without a jumbo payload option: header + payload_len. */
#define IPV6_MAX_LEN (IPV6_HDR_LEN + 0xffff)

/* The version nibble of an IP header's first byte. */
static __always_inline __u8 ip_version(const void *ip)
{
	return *(const __u8 *)ip >> 4;
}

/* What is wrong with an IPv6 header, if anything. Each program turns these
 * into its own counters.
 */
enum ipv6_fault {
	IPV6_OK = 0,
	IPV6_BAD_VERSION,     /* version field not 6 */
	IPV6_SHORT,           /* the fixed header does not fit in limit */
	IPV6_BAD_PAYLOAD_LEN, /* 40 + payload_len beyond the frame or beyond limit */
};

/* Checks the IPv6 header at ip6, whose fixed 40 bytes the caller has already
 * bounded against data_end. data_end bounds what the frame holds; limit
 * bounds what the packet may take from ip6 on when it sits inside another one
 * (the outer packet's payload): pass IPV6_MAX_LEN when only the frame bounds
 * it, and those comparisons fold away. payload_len 0 is accepted (a packet
 * with no payload, or a jumbogram whose hop-by-hop option the stack judges).
 * Extension headers are not looked at. *len_out = 40 + payload_len.
 */
static __always_inline enum ipv6_fault ipv6_check(const struct ipv6hdr *ip6, void *data_end, __u32 limit,
						  __u32 *len_out)
{
	__u32 len;

	if (ip_version(ip6) != 6)
		return IPV6_BAD_VERSION;
	if (IPV6_HDR_LEN > limit)
		return IPV6_SHORT;
	len = IPV6_HDR_LEN + bpf_ntohs(ip6->payload_len);
	if ((void *)ip6 + len > data_end || len > limit)
		return IPV6_BAD_PAYLOAD_LEN;
	*len_out = len;
	return IPV6_OK;
}

#endif /* L4LB_IPV6_H */
