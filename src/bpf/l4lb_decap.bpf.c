// SPDX-License-Identifier: GPL-2.0
/* l4lb_decap: the backend's half of direct server return, for kernels without
 * the ipip module.
 *
 * The balancer pushes an outer IPv4 header (protocol 4, IPIP) in front of the
 * client's packet and sends it to a backend. Attached to the backend's
 * interface, this program strips that outer header when it is addressed to
 * one of the backend's own addresses (the decap_addrs map, filled by
 * `l4lb decap attach`) and passes the client's packet to the stack, which
 * delivers it to the service listening on the VIP and answers the client
 * directly. Everything else passes untouched. IPIP for a local address that
 * is malformed is dropped, with a counter per reason: the stack could not
 * decapsulate it either (it has no ipip handler here).
 *
 * Every frame counts once as seen and once by its outcome.
 *
 * Only IPv4 outer and inner headers are handled now. The parse is laid out so
 * that the others slot in: an IPv6 outer header is a second EtherType branch
 * in l4lb_decap() (its key goes into decap_addrs with L4LB_DECAP_FAMILY_IPV6),
 * and IPv6-in-IPv4 (protocol 41) a second inner branch after the outer checks.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "parse.h"
#include "ipv6.h"

/* The backend's own addresses: IP-in-IP is stripped only for these, so a host
 * that also forwards or runs tunnels of its own keeps them untouched. A hash
 * map: the set is small and sparse; the value is reserved (0).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4LB_DECAP_MAX_ADDRS);
	__type(key, struct l4lb_decap_addr);
	__type(value, __u32);
} decap_addrs SEC(".maps");

/* Indexed by enum l4lb_decap_counter. Per-CPU: every CPU adds to its own
 * line, and the host sums them. This program is never offloaded, so per-CPU
 * maps (which offload does not accept) are fine.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, L4LB_DECAP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_counters SEC(".maps");

static __always_inline void count(enum l4lb_decap_counter which)
{
	__u32 key = which;
	__u64 *value = bpf_map_lookup_elem(&decap_counters, &key);

	/* A per-CPU slot has one writer at a time: no atomic add needed. */
	if (value)
		*value += 1;
}

static __always_inline int finish(enum l4lb_decap_counter outcome, int action)
{
	count(outcome);
	return action;
}

static __always_inline int is_local_ipv4(__be32 daddr)
{
	struct l4lb_decap_addr key;

	/* The padding and the unused 12 address bytes are part of the hashed
	 * key. memset rather than `= { ... }`: clang copies such an
	 * initialiser from .rodata, an extra map.
	 */
	__builtin_memset(&key, 0, sizeof(key));
	key.family = L4LB_DECAP_FAMILY_IPV4;
	__builtin_memcpy(key.addr, &daddr, sizeof(daddr));
	return bpf_map_lookup_elem(&decap_addrs, &key) != NULL;
}

/* The drop counter of a fault in the outer or in the inner header. */
static __always_inline enum l4lb_decap_counter fault_counter(enum ipv4_fault fault, int inner)
{
	switch (fault) {
	case IPV4_BAD_VERSION:
		return inner ? L4LB_DECAP_CNT_DROP_INNER_VERSION : L4LB_DECAP_CNT_DROP_BAD_VERSION;
	case IPV4_BAD_IHL:
		return inner ? L4LB_DECAP_CNT_DROP_INNER_IHL : L4LB_DECAP_CNT_DROP_BAD_IHL;
	case IPV4_SHORT:
		return inner ? L4LB_DECAP_CNT_DROP_SHORT_INNER : L4LB_DECAP_CNT_DROP_SHORT_OUTER;
	default:
		return inner ? L4LB_DECAP_CNT_DROP_INNER_TOT_LEN : L4LB_DECAP_CNT_DROP_BAD_TOT_LEN;
	}
}

