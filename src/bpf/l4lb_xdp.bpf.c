// SPDX-License-Identifier: GPL-2.0
/* l4lb: XDP layer-4 load balancer, direct server return over IP-in-IP.
 *
 * For each IPv4 or IPv6 TCP/UDP frame (up to two VLAN tags in front): find
 * its service (a VIP by address, protocol and port, else the catch-all, else
 * the stack), hash the flow with the configured seed, take the backend the
 * flow is pinned to (services that track flows) or else the one in the slot
 * it falls in in the service's Maglev table, push an outer header addressed
 * to that backend (IPv4 or IPv6, by the backend's family) and send the frame
 * back out (XDP_TX). ICMP errors about a balanced flow go to that flow's
 * backend; packets too big once encapsulated get an ICMP answer. Everything
 * else goes to the stack; malformed frames are dropped. Every frame is
 * counted once as seen and once by its outcome.
 *
 * Loads through the Rust host's skeleton, through iproute2
 * (`ip link set dev DEV xdpdrv obj l4lb_xdp.o sec xdp`) and offloaded:
 * ARRAY and HASH maps only, no global variables, atomic adds only, no helper
 * outside the offload list, no subprogram calls, no division. (The loop
 * in vip.h is unrolled.)
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "l4lb.h"
#include "maps.h"
#include "counters.h"
#include "parse.h"
#include "vip.h"
#include "jhash.h"
#include "flows.h"
#include "encap.h"
#include "icmp.h"

/* The ports the flow is told apart by. TCP always has its ports; UDP unless
 * the service says otherwise (then all of a client's datagrams go to one
 * backend); fragments never (only the first one carries ports: parse.h left
 * them 0).
 */
static __always_inline __u32 flow_ports(const struct packet *pkt, const struct l4lb_service *service)
{
	if (pkt->vip.proto == IPPROTO_UDP && !(service->flags & L4LB_SERVICE_HASH_PORTS))
		return 0;
	return pkt->ports;
}

/* The flow's hash. The protocol goes into the initval: a fourth word would
 * cost a whole mixing round, and it only tells TCP from UDP in the catch-all.
 */
static __always_inline __u32 flow_hash(const struct packet *pkt, __u32 ports, __u32 seed)
{
	return jhash_3words(pkt->saddr, pkt->daddr, ports, seed + pkt->vip.proto);
}

/* The flow's slot in the service's table: (hash * SIZE) >> 32 spreads the
 * hash over the slots like a modulo, without a division.
 */
static __always_inline __u32 slot_index(__u32 service, __u32 hash)
{
	return service * L4LB_MAGLEV_SIZE + (((__u64)hash * L4LB_MAGLEV_SIZE) >> 32);
}

/* Everything between parsing and XDP_TX; returns the frame's outcome counter. */
static __always_inline __u32 balance(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l4lb_service *service;
	struct l4lb_backend *backend;
	struct l4lb_config *config;
	struct l4lb_flow_key key;
	struct packet pkt;
	struct inner inner;
	__u32 zero = 0, outcome, service_number, number, ports, hash, overhead, slot, entry_index;
	struct l4lb_table_entry *entry;
	__u32 event = L4LB_CNT_MAX;
	__u64 bytes;
	int err;

	pkt.flow = &key;
	outcome = parse_packet(data, data_end, &pkt);
	if (outcome != PARSE_BALANCE)
		return outcome;
	/* pkt stays one struct on the stack, each field written once by the
	 * parser: left to itself clang splits it into registers and carries
	 * each field through every parser exit and join (spills and copies on
	 * the path of every packet).
	 */
	asm volatile("" : : "r"(&pkt) : "memory");

	config = bpf_map_lookup_elem(&l4lb_config, &zero);
	if (!config || !find_service(config, &pkt.vip, pkt.fragment, &service_number))
		return L4LB_CNT_PASS_NO_SERVICE;
	/* Out of range numbers find no entry: service_number < MAX_SERVICES below. */
	service = bpf_map_lookup_elem(&l4lb_services, &service_number);
	if (!service || !(service->flags & L4LB_SERVICE_ACTIVE))
		return L4LB_CNT_DROP_NO_BACKEND;
	/* Only a catch-all with IPv4 backends has this: it cannot carry IPv6. */
	if (pkt.vip.family == L4LB_FAMILY_IPV6 && (service->flags & L4LB_SERVICE_IPV4_BACKENDS))
		return L4LB_CNT_PASS_NO_SERVICE;

	ports = flow_ports(&pkt, service);
	hash = flow_hash(&pkt, ports, config->hash_seed);
	slot = slot_index(service_number, hash);
	entry_index = slot >> L4LB_TABLE_ENTRY_SHIFT;
	entry = bpf_map_lookup_elem(&l4lb_tables, &entry_index);
	if (!entry)
		return L4LB_CNT_DROP_NO_BACKEND;
	number = entry->slot[slot & L4LB_TABLE_ENTRY_MASK];
	/* A steady slot is a bare backend number: no per-flow state. */
	if (number & L4LB_SLOT_TRANSITION) {
		if (number == L4LB_SLOT_EMPTY)
			return L4LB_CNT_DROP_NO_BACKEND;
		flow_key(&key, &pkt, ports);
		number = transition_backend(&key, &pkt, service, service_number, config, slot, number, &event);
		if (event != L4LB_CNT_MAX)
			count(event);
	}
	backend = bpf_map_lookup_elem(&l4lb_backends, &number);
	if (!backend || !(backend->flags & L4LB_BACKEND_ACTIVE))
		return L4LB_CNT_DROP_NO_BACKEND;

	inner.l3_len = pkt.l3_len;
	inner.l2_len = pkt.l2_len;
	inner.tos = pkt.tos;
	inner.df = pkt.df;
	inner.flow_label = hash;
	if (backend->family == L4LB_FAMILY_IPV6) {
		overhead = L4LB_IP6_OVERHEAD;
		inner.proto = pkt.vip.family == L4LB_FAMILY_IPV4 ? L4LB_IPPROTO_IPIP : L4LB_IPPROTO_IPV6;
	} else if (backend->family == L4LB_FAMILY_IPV4 && pkt.vip.family == L4LB_FAMILY_IPV4) {
		overhead = L4LB_IPIP_OVERHEAD;
		inner.proto = L4LB_IPPROTO_IPIP;
	} else {
		/* IPv6 in IPv4 is not offered: the host never configures it. */
		return L4LB_CNT_DROP_NO_BACKEND;
	}
	/* mtu 0: not configured, no limit to enforce. Too big: tell the client
	 * (IPv4 with DF, every IPv6 packet) what fits once encapsulated; never
	 * answer an ICMP error with one.
	 */
	if (config->mtu && pkt.l3_len + overhead > config->mtu) {
		if (pkt.icmp_error || config->mtu <= overhead ||
		    (pkt.vip.family == L4LB_FAMILY_IPV4 && !pkt.df))
			return L4LB_CNT_DROP_TOO_BIG;
		if (pkt.vip.family == L4LB_FAMILY_IPV4)
			err = answer_too_big4(ctx, &pkt, config->mtu - overhead);
		else
			err = answer_too_big6(ctx, &pkt, config->mtu - overhead);
		return err ? L4LB_CNT_DROP_TOO_BIG : L4LB_CNT_TX_TOO_BIG;
	}

	if (overhead == L4LB_IP6_OVERHEAD)
		err = push_ipv6(ctx, backend, config, &inner);
	else
		err = push_ipv4(ctx, backend, config, &inner);
	if (err)
		return L4LB_CNT_DROP_ENCAP_FAILED;

	bytes = (long)ctx->data_end - (long)ctx->data;
	count_traffic(&l4lb_be_stats, number, bytes);
	count_traffic(&l4lb_svc_stats, service_number, bytes);
	return L4LB_CNT_TX;
}

SEC("xdp")
int l4lb_balance(struct xdp_md *ctx)
{
	__u32 outcome = balance(ctx);

	/* Opaque from here: without it clang threads the verdict below back
	 * into each of balance()'s returns, and every check on the way then
	 * carries the verdict's flags into the exit (five instructions more per
	 * check, taken or not).
	 */
	barrier_var(outcome);
	/* Counted in one place: one copy of the counter update in the program. */
	count(L4LB_CNT_RX);
	count(outcome);
	if (outcome == L4LB_CNT_TX || outcome == L4LB_CNT_TX_TOO_BIG)
		return XDP_TX;
	if (outcome == L4LB_CNT_PASS || outcome == L4LB_CNT_PASS_NO_SERVICE)
		return XDP_PASS;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
