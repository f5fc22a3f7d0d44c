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

/* One frame of `bytes` sent for entry `index` of a traffic map
 * (l4lb_be_stats or l4lb_svc_stats).
 */
static __always_inline void count_traffic(void *traffic_map, __u32 index, __u64 bytes)
{
	struct l4lb_traffic *traffic = bpf_map_lookup_elem(traffic_map, &index);

	if (!traffic)
		return;
	__sync_fetch_and_add(&traffic->packets, 1);
	__sync_fetch_and_add(&traffic->bytes, bytes);
}

#endif /* L4LB_COUNTERS_H */
