/* SPDX-License-Identifier: GPL-2.0 */
/* Counter updates. Offloaded maps may only be changed by atomic adds, so
 * every update here is one; in per-CPU maps the add stays on a local line.
 */
#ifndef L4LB_COUNTERS_H
#define L4LB_COUNTERS_H

#include "maps.h"

static __always_inline void count(enum l4lb_counter which)
{
	__u32 key = which;
	__u64 *value = bpf_map_lookup_elem(&l4lb_counters, &key);

	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline void count_backend(__u32 backend, __u64 bytes)
{
	struct l4lb_backend_stats *stats = bpf_map_lookup_elem(&l4lb_be_stats, &backend);

	if (!stats)
		return;
	__sync_fetch_and_add(&stats->packets, 1);
	__sync_fetch_and_add(&stats->bytes, bytes);
}

#endif /* L4LB_COUNTERS_H */
