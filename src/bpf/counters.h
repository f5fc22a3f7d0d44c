/* SPDX-License-Identifier: GPL-2.0 */
/* Counter updates. Offloaded maps may only be changed by atomic adds, and
 * through iproute2 the counter maps are arrays shared by every CPU, so the
 * object `make` builds (l4lb_xdp.o) adds atomically. `l4lb attach` loads, in
 * driver and generic mode, the same source built with
 * -DL4LB_DRIVER_BUILD (the driver build) and its counter maps switched to per-CPU arrays:
 * each CPU adds to its own value, where a plain add is exact and an atomic
 * one only costs (a locked instruction per add, a quarter of the path's
 * time on these machines).
 */
#ifndef L4LB_COUNTERS_H
#define L4LB_COUNTERS_H

#include "maps.h"

#ifdef L4LB_DRIVER_BUILD
#define counter_add(place, amount) (*(place) += (amount))
#else
#define counter_add(place, amount) __sync_fetch_and_add(place, amount)
#endif

static __always_inline void count(enum l4lb_counter which)
{
	__u32 key = which;
	__u64 *value = bpf_map_lookup_elem(&l4lb_counters, &key);

	if (value)
		counter_add(value, 1);
}

/* One frame of `bytes` sent for entry `index` of a traffic map
 * (l4lb_be_stats or l4lb_svc_stats).
 */
static __always_inline void count_traffic(void *traffic_map, __u32 index, __u64 bytes)
{
	struct l4lb_traffic *traffic = bpf_map_lookup_elem(traffic_map, &index);

	if (!traffic)
		return;
	counter_add(&traffic->packets, 1);
	counter_add(&traffic->bytes, bytes);
}

#endif /* L4LB_COUNTERS_H */
