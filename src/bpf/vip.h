/* SPDX-License-Identifier: GPL-2.0 */
/* Finding a packet's service. VIPs live in a direct-mapped array rather than
 * a hash map: on these machines a HASH lookup costs about 25 ns, an ARRAY
 * lookup (inlined by the verifier) 1 to 2 ns. The host places each VIP at
 * most vip_probes - 1 entries after its home entry (the same hash, modelled
 * in src/control/flow_hash.rs) and the key is checked in the value.
 */
#ifndef L4LB_VIP_H
#define L4LB_VIP_H

#include "maps.h"

/* A key as two 64-bit words and one 32-bit word: fewer loads and compares
 * than five 32-bit words. Both keys the datapath reads (the packet's, first
 * in struct packet, and the map value's, first in struct l4lb_vip) are
 * 8-byte aligned. may_alias: the parser writes the key as bytes and 16-bit
 * words, find_service() its port between two lookups; without it clang may
 * take these loads for unrelated to those stores.
 */
struct __attribute__((may_alias)) vip_key_words {
	__u64 addr[2];
	__u32 rest;               /* family, protocol, port */
};

/* The key's five 32-bit words, XORed, spread by a multiplicative hash (the
 * host's placement, src/control/flow_hash.rs, computes the same).
 */
static __always_inline __u32 vip_home(const struct l4lb_vip_key *key)
{
	const struct vip_key_words *k = (const void *)key;
	__u64 addr = k->addr[0] ^ k->addr[1];
	__u32 fold = (__u32)addr ^ (__u32)(addr >> 32) ^ k->rest;

	return (fold * L4LB_VIP_HASH_MUL) >> (32 - L4LB_VIP_BITS);
}

static __always_inline int vip_key_equal(const struct l4lb_vip_key *a, const struct l4lb_vip_key *b)
{
	const struct vip_key_words *x = (const void *)a, *y = (const void *)b;

	return ((x->addr[0] ^ y->addr[0]) | (x->addr[1] ^ y->addr[1]) | (__u64)(x->rest ^ y->rest)) == 0;
}

static __always_inline struct l4lb_vip *vip_lookup(const struct l4lb_vip_key *key, __u32 probes)
{
	struct l4lb_vip *vip, *found = NULL;
	__u32 home = vip_home(key), index;

	/* One exit only, so that clang unrolls it; the checks after a hit or
	 * past `probes` are a compare and a branch each.
	 */
#pragma clang loop unroll(full)
	for (__u32 i = 0; i < L4LB_VIP_MAX_PROBES; i++) {
		if (found || i >= probes)
			continue;
		index = (home + i) & L4LB_VIP_MASK;
		vip = bpf_map_lookup_elem(&l4lb_vips, &index);
		if (vip && vip_key_equal(&vip->key, key))
			found = vip;
	}
	return found;
}

/* The service number for a packet's VIP key: the VIP with its port, then one
 * that takes every port of the address, then the catch-all. A fragment
 * (no ports in all but the first) looks up its address and protocol's
 * fragment entry instead, which the host points at one of its VIPs. Returns
 * 0 when no service takes the packet.
 */
static __always_inline int find_service(const struct l4lb_config *config, struct l4lb_vip_key *key,
					int fragment, __u32 *number)
{
	struct l4lb_vip *vip;

	/* A fragment's port is already 0 (parse.h); its family gets the
	 * fragment bit for the lookup only: the caller reads the family on.
	 */
	if (fragment)
		key->family |= L4LB_FAMILY_FRAGMENT;
	vip = vip_lookup(key, config->vip_probes);
	key->family &= ~L4LB_FAMILY_FRAGMENT;
	if (!vip && !fragment && key->port && (config->flags & L4LB_CONFIG_ANY_PORT)) {
		key->port = 0;
		vip = vip_lookup(key, config->vip_probes);
	}
	if (vip) {
		*number = vip->service;
		return 1;
	}
	if (config->flags & L4LB_CONFIG_CATCH_ALL) {
		*number = config->catch_all;
		return 1;
	}
	return 0;
}

#endif /* L4LB_VIP_H */
