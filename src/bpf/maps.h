/* SPDX-License-Identifier: GPL-2.0 */
/* The datapath's maps. Only ARRAY and HASH maps with flags 0: the subset that
 * XDP hardware offload (NFP) accepts. The host may switch the three traffic and
 * counter maps to per-CPU arrays before loading in driver or generic mode, so
 * that counters do not bounce cache lines between CPUs; the source stays the
 * same. Layouts and sizes: include/l4lb.h.
 */
#ifndef L4LB_MAPS_H
#define L4LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "l4lb.h"

/* Key 0: struct l4lb_config. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4lb_config);
} l4lb_config SEC(".maps");

/* VIPs, direct-mapped by a hash of their key (vip.h); the host places them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_VIP_SLOTS);
	__type(key, __u32);
	__type(value, struct l4lb_vip);
} l4lb_vips SEC(".maps");

/* Services, indexed by service number. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct l4lb_service);
} l4lb_services SEC(".maps");

/* Every service's Maglev table, one after the other: slot word
 * g = service * L4LB_MAGLEV_SIZE + slot is word g % 16 of entry g / 16
 * (include/l4lb.h, "l4lb_tables packs").
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_TABLE_ENTRIES(L4LB_MAX_SERVICES));
	__type(key, __u32);
	__type(value, struct l4lb_table_entry);
} l4lb_tables SEC(".maps");

/* Backends, indexed by backend number. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct l4lb_backend);
} l4lb_backends SEC(".maps");

/* Per-backend packets and bytes sent, same index as l4lb_backends. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct l4lb_traffic);
} l4lb_be_stats SEC(".maps");

/* Per-service packets and bytes sent, same index as l4lb_services. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct l4lb_traffic);
} l4lb_svc_stats SEC(".maps");

/* Pinned flows (flows.h): struct l4lb_flow_key -> struct l4lb_flow. A HASH
 * map here (offload takes no LRU map); `l4lb attach` makes it an LRU hash in
 * driver and generic mode and sizes it (--flow-entries).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4LB_FLOW_ENTRIES);
	__type(key, struct l4lb_flow_key);
	__type(value, struct l4lb_flow);
} l4lb_flows SEC(".maps");

/* Global counters, indexed by enum l4lb_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} l4lb_counters SEC(".maps");

#endif /* L4LB_MAPS_H */
