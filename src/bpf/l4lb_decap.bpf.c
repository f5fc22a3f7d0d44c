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
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "parse.h"

/* The backend's own addresses: IPIP is stripped only for these, so a host
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

/* Removes outer_len bytes behind the Ethernet header: the Ethernet header is
 * saved, the frame's start moves forward over the outer header, and the
 * header is written back in front of the inner packet. Its MACs are the ones
 * the frame arrived with and its EtherType stays IPv4 (the inner packet is
 * IPv4). Returns 0, or -1 when the head cannot move.
 */
static __always_inline int strip_outer(struct xdp_md *ctx, const struct ethhdr *eth, __u32 outer_len)
{
	struct ethhdr saved;
	void *data, *data_end;

	__builtin_memcpy(&saved, eth, sizeof(saved));
	if (bpf_xdp_adjust_head(ctx, outer_len))
		return -1;
	/* adjust_head invalidates every packet pointer: bound the new start again. */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(saved) > data_end)
		return -1;
	__builtin_memcpy(data, &saved, sizeof(saved));
	return 0;
}

SEC("xdp")
int l4lb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = data + sizeof(*eth);
	struct iphdr *inner;
	__u32 outer_len, outer_tot_len, inner_len, inner_tot_len, room;
	enum ipv4_fault fault;

	count(L4LB_DECAP_CNT_SEEN);
	/* Identifying a frame takes its Ethernet header and the fixed part of
	 * an IPv4 header (protocol, destination). Shorter frames cannot be
	 * IPIP for us: they are the stack's business, like every non-IPv4
	 * frame. (An IPv6 outer header would be a branch on ETH_P_IPV6 here.)
	 */
	if ((void *)(outer + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);
	/* Someone else's tunnel or plain traffic: not ours to touch.
	 * (IPv6-in-IPv4, protocol 41, would be let in here too, with its own
	 * inner check below instead of the IPv4 one.)
	 */
	if (outer->protocol != L4LB_IPPROTO_IPIP || !is_local_ipv4(outer->daddr))
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);

	/* From here on the frame is IPIP for this backend: anything wrong with
	 * it is dropped and named.
	 */
	fault = ipv4_check(outer, data_end, IPV4_MAX_TOT_LEN, &outer_len, &outer_tot_len);
	if (fault != IPV4_OK)
		return finish(fault_counter(fault, 0), XDP_DROP);
	/* A fragment carries part of the inner packet only, and XDP sees one
	 * frame at a time. The balancer never fragments (it drops what would
	 * exceed the MTU), so these come from elsewhere.
	 */
	if (outer->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK))
		return finish(L4LB_DECAP_CNT_DROP_FRAGMENT, XDP_DROP);

	/* The inner header must lie whole inside the outer packet (room), not
	 * only inside the frame: bytes behind tot_len are Ethernet padding.
	 * The data_end bound is the one the verifier needs to read it.
	 */
	inner = (void *)outer + outer_len;
	room = outer_tot_len - outer_len;
	if ((void *)(inner + 1) > data_end || room < sizeof(*inner))
		return finish(L4LB_DECAP_CNT_DROP_SHORT_INNER, XDP_DROP);
	fault = ipv4_check(inner, data_end, room, &inner_len, &inner_tot_len);
	if (fault != IPV4_OK)
		return finish(fault_counter(fault, 1), XDP_DROP);

	/* The outer checksum is not verified: the frame check sequence has
	 * covered the frame on the wire, and the stack checks the inner
	 * header's checksum, the one the client's packet depends on.
	 * Bytes behind the inner packet (padding) are trimmed by the stack
	 * from the inner tot_len.
	 */
	if (strip_outer(ctx, eth, outer_len))
		return finish(L4LB_DECAP_CNT_DROP_DECAP_FAILED, XDP_DROP);
	return finish(L4LB_DECAP_CNT_DECAPSULATED, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
