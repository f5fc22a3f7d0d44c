/* SPDX-License-Identifier: GPL-2.0 */
/* Bob Jenkins' lookup3 hash (the kernel's jhash) on three 32-bit words. The
 * host has a bit-exact model of the flow hash in src/control/flow_hash.rs.
 */
#ifndef L4LB_JHASH_H
#define L4LB_JHASH_H

#include <linux/types.h>

#define JHASH_INITVAL 0xdeadbeefU

static __always_inline __u32 rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

#define __jhash_final(a, b, c)            \
	{                                 \
		c ^= b; c -= rol32(b, 14); \
		a ^= c; a -= rol32(c, 11); \
		b ^= a; b -= rol32(a, 25); \
		c ^= b; c -= rol32(b, 16); \
		a ^= c; a -= rol32(c, 4);  \
		b ^= a; b -= rol32(a, 14); \
		c ^= b; c -= rol32(b, 24); \
	}

/* The kernel's jhash_3words(): three words and an initval, one final mix
 * (no mixing round), what the kernel hashes its socket lookups with.
 */
static __always_inline __u32 jhash_3words(__u32 w0, __u32 w1, __u32 w2, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = JHASH_INITVAL + (3 << 2) + initval;
	a += w0;
	b += w1;
	c += w2;
	__jhash_final(a, b, c);
	return c;
}

#endif /* L4LB_JHASH_H */
