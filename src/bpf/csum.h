/* SPDX-License-Identifier: GPL-2.0 */
/* Internet checksums (RFC 1071): the outer IPv4 header's, the check of a
 * client's IPv4 header, the ICMP answers'. bpf_csum_diff() is not among the
 * helpers an offloaded program may call, so the sums are done here,
 * unrolled, over 32-bit words, with the carry folded until none is left.
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

/* The same for a sum of at most 256 32-bit words (half the loads of 16-bit
 * ones; the one's complement sum does not care how the bytes are grouped,
 * RFC 1071). Folding 16 bits at a time keeps the sum modulo 0xffff whatever
 * its width: below 2^40 the first fold leaves less than 2^25, the second at
 * most 0xffff + 0x1ff, the third at most 0xffff. Three folds of four
 * instructions, where folding to 32 bits first took two more.
 */
static __always_inline __u16 csum_fold64(__u64 sum)
{
	__u32 folded = (sum & 0xffff) + (sum >> 16);

	folded = (folded & 0xffff) + (folded >> 16);
	folded = (folded & 0xffff) + (folded >> 16);
	return (__u16)~folded;
}

/* The sum of `words` 32-bit words from start, for csum_fold64(); words is
 * a constant at every call, so the loop unrolls. The caller has bounded
 * the bytes.
 */
static __always_inline __u64 csum_words32(const void *start, const int words)
{
	const __u32 *word = start;
	__u64 sum = 0;

#pragma clang loop unroll(full)
	for (int i = 0; i < words; i++)
		sum += word[i];
	return sum;
}

/* iph->check must be 0 when this is called. */
static __always_inline __u16 ipv4_header_csum(const struct iphdr *iph)
{
	return csum_fold64(csum_words32(iph, sizeof(*iph) / 4));
}

#endif /* L4LB_CSUM_H */
