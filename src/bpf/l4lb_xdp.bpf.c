// SPDX-License-Identifier: GPL-2.0
/* l4lb: XDP layer-4 load balancer, direct server return over IP-in-IP.
 *
 * For each IPv4 TCP/UDP frame: hash the 5-tuple with the configured seed, take
 * the lookup-table slot it falls in, push an outer IPv4 header addressed to
 * that slot's destination and send the frame back out (XDP_TX). Everything
 * else goes to the stack; malformed frames are dropped. Every frame is counted
 * once as seen and once by its outcome.
 *
 * Loads through the Rust host's skeleton, through iproute2
 * (`ip link set dev DEV xdpdrv obj l4lb_xdp.o sec xdp`) and offloaded:
 * ARRAY maps only, no global variables, atomic adds only, no helper outside
 * the offload list, no subprogram calls.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "l4lb.h"
#include "maps.h"
#include "counters.h"
#include "parse.h"
#include "jhash.h"
#include "encap.h"

/* Finds the destination of a flow; returns its number, or L4LB_SLOT_EMPTY. */
static __always_inline __u32 select_backend(const struct flow *flow, __u32 seed,
					    struct l4lb_backend **backend_out)
{
	__u32 slot = jhash_4words(flow->saddr, flow->daddr, flow->ports, flow->proto, seed) &
		     L4LB_TABLE_MASK;
	struct l4lb_backend *backend;
	__u32 *number;

	number = bpf_map_lookup_elem(&l4lb_slots, &slot);
	if (!number)
		return L4LB_SLOT_EMPTY;
	backend = bpf_map_lookup_elem(&l4lb_backends, number);
	if (!backend || !(backend->flags & L4LB_BACKEND_ACTIVE))
		return L4LB_SLOT_EMPTY;
	*backend_out = backend;
	return *number;
}

static __always_inline int finish(enum l4lb_counter outcome, int action)
{
	count(outcome);
	return action;
}

SEC("xdp")
int l4lb_balance(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l4lb_backend *backend = NULL;
	struct l4lb_config *config;
	struct iphdr *ip = NULL;
	struct flow flow;
	__u32 zero = 0, number, outcome;
	__u16 tot_len;

	count(L4LB_CNT_RX);
	outcome = parse_ipv4(data, data_end, &flow, &ip);
	if (outcome == L4LB_CNT_PASS)
		return finish(L4LB_CNT_PASS, XDP_PASS);
	if (outcome != PARSE_BALANCE || !ip)
		return finish(outcome, XDP_DROP);

	config = bpf_map_lookup_elem(&l4lb_config, &zero);
	if (!config)
		return finish(L4LB_CNT_DROP_NO_BACKEND, XDP_DROP);
	number = select_backend(&flow, config->hash_seed, &backend);
	if (number == L4LB_SLOT_EMPTY || !backend)
		return finish(L4LB_CNT_DROP_NO_BACKEND, XDP_DROP);

	/* mtu 0: not configured yet, no limit to enforce. */
	tot_len = bpf_ntohs(ip->tot_len);
	if (config->mtu && tot_len + L4LB_IPIP_OVERHEAD > config->mtu)
		return finish(L4LB_CNT_DROP_TOO_BIG, XDP_DROP);

	if (push_ipip(ctx, backend, config->src_addr, ip->tos, ip->frag_off & bpf_htons(IPV4_DF),
		      tot_len))
		return finish(L4LB_CNT_DROP_ENCAP_FAILED, XDP_DROP);

	count_backend(number, (long)ctx->data_end - (long)ctx->data);
	return finish(L4LB_CNT_TX, XDP_TX);
}

char LICENSE[] SEC("license") = "GPL";
