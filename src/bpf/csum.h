/* SPDX-License-Identifier: GPL-2.0 */
/* Internet checksum of an IPv4 header without options. bpf_csum_diff() is not
 * among the helpers an offloaded program may call, so the sum is done here,
 * unrolled, with the carry folded until none is left.
 */
#ifndef L4LB_CSUM_H
#define L4LB_CSUM_H

#include <linux/types.h>
#include <linux/ip.h>

static __always_inline __u16 csum_fold(__u32 sum)
{
	/* Two folds suffice: the first leaves at most 0xffff + 0xffff. */
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* The same for a sum of 32-bit words (half the loads of 16-bit ones; the
 * one's complement sum does not care how the bytes are grouped, RFC 1071).
 */
static __always_inline __u16 csum_fold64(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return csum_fold((__u32)(sum & 0xffff) + (__u32)(sum >> 16));
}

/* iph->check must be 0 when this is called. */
static __always_inline __u16 ipv4_header_csum(const struct iphdr *iph)
{
	const __u16 *word = (const __u16 *)iph;
	__u32 sum = 0;

#pragma clang loop unroll(full)
	for (int i = 0; i < (int)(sizeof(*iph) / 2); i++)
		sum += word[i];
	return csum_fold(sum);
}

#endif /* L4LB_CSUM_H */
