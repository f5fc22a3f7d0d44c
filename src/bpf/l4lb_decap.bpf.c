// SPDX-License-Identifier: GPL-2.0
/* l4lb_decap: the backend's half of direct server return, for kernels without
 * the ipip and ip6_tunnel modules.
 *
 * The balancer pushes an outer header in front of the client's packet and
 * sends it to a backend: IPv4 protocol 4 (IPIP) for IPv4 backends; for IPv6
 * backends an IPv6 header with next header 41 (IPv6-in-IPv6, IPv6 clients) or
 * 4 (IPv4-in-IPv6, IPv4 clients), never with extension headers. Attached to
 * the backend's interface, this program strips that outer header when it is
 * addressed to one of the backend's own addresses (the decap_addrs map,
 * filled by `l4lb decap attach`) and passes the client's packet to the stack,
 * which delivers it to the service listening on the VIP and answers the
 * client directly. Everything else passes untouched, an IPv6 outer header
 * with extension headers included. IP-in-IP for a local address that is
 * malformed is dropped, with a counter per reason: the stack could not
 * decapsulate it either (it has no tunnel handler here).
 *
 * Every frame counts once as seen and once by its outcome.
 *
 * IPv6-in-IPv4 (protocol 41 under an IPv4 header) is not taken: the balancer
 * never sends it (an IPv6 client is only balanced to IPv6 backends). It would
 * be one more case of check_inner() let in by decap_ipv4().
 *
 * Offload-friendly apart from the per-CPU counters: the helpers are map
 * lookups and bpf_xdp_adjust_head only, and the code has no loops.
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

static __always_inline int is_local_ipv6(const struct in6_addr *daddr)
{
	struct l4lb_decap_addr key;

	__builtin_memset(&key, 0, sizeof(key));
	key.family = L4LB_DECAP_FAMILY_IPV6;
	__builtin_memcpy(key.addr, daddr, sizeof(key.addr));
	return bpf_map_lookup_elem(&decap_addrs, &key) != NULL;
}

/* The drop counter of a fault in the outer or in the inner IPv4 header. */
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

/* Checks the client's packet at inner, of which the outer packet's payload
 * holds room bytes, under outer protocol / next header proto (4: IPv4 inside,
 * 41: IPv6 inside). Returns L4LB_DECAP_CNT_DECAPSULATED when the packet is of
 * the family proto announces and lies whole inside the outer payload, and
 * sets *h_proto to its EtherType; otherwise the drop counter that says why.
 *
 * The version nibble is looked at first: a packet of the other family is
 * named as such whatever its length. The data_end bounds are the ones the
 * verifier needs; the room bounds are the ones that matter, since bytes
 * behind the outer payload are Ethernet padding, not packet.
 */
static __always_inline enum l4lb_decap_counter check_inner(void *inner, void *data_end, __u32 room, __u8 proto,
							   __be16 *h_proto)
{
	int ipv4 = proto == L4LB_IPPROTO_IPIP;
	__u32 ihl_bytes, len;
	enum ipv4_fault fault;
	__u8 version;

	if (inner + 1 > data_end || room < 1)
		return ipv4 ? L4LB_DECAP_CNT_DROP_SHORT_INNER : L4LB_DECAP_CNT_DROP_SHORT_INNER6;
	version = ip_version(inner);
	if (ipv4) {
		struct iphdr *ip = inner;

		if (version == 6)
			return L4LB_DECAP_CNT_DROP_INNER_FAMILY;
		if (version != 4)
			return L4LB_DECAP_CNT_DROP_INNER_VERSION;
		if ((void *)(ip + 1) > data_end || room < sizeof(*ip))
			return L4LB_DECAP_CNT_DROP_SHORT_INNER;
		fault = ipv4_check(ip, data_end, room, &ihl_bytes, &len);
		if (fault != IPV4_OK)
			return fault_counter(fault, 1);
		*h_proto = bpf_htons(ETH_P_IP);
	} else {
		struct ipv6hdr *ip6 = inner;

		if (version == 4)
			return L4LB_DECAP_CNT_DROP_INNER_FAMILY;
		if (version != 6)
			return L4LB_DECAP_CNT_DROP_INNER6_VERSION;
		if ((void *)(ip6 + 1) > data_end || room < sizeof(*ip6))
			return L4LB_DECAP_CNT_DROP_SHORT_INNER6;
		/* Version and room are settled: only the payload length can fail. */
		if (ipv6_check(ip6, data_end, room, &len) != IPV6_OK)
			return L4LB_DECAP_CNT_DROP_INNER6_PAYLOAD_LEN;
		*h_proto = bpf_htons(ETH_P_IPV6);
	}
	return L4LB_DECAP_CNT_DECAPSULATED;
}

/* Removes outer_len bytes behind the Ethernet header: the Ethernet header is
 * saved, the frame's start moves forward over the outer header, and the
 * header is written back in front of the inner packet. Its MACs are the ones
 * the frame arrived with; its EtherType becomes h_proto, the inner packet's.
 * Returns 0, or -1 when the head cannot move.
 */
static __always_inline int strip_outer(struct xdp_md *ctx, const struct ethhdr *eth, __u32 outer_len,
				       __be16 h_proto)
{
	struct ethhdr saved;
	void *data, *data_end;

	__builtin_memcpy(&saved, eth, sizeof(saved));
	saved.h_proto = h_proto;
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

/* Strips the inner packet's checked outer header and counts the outcome. */
static __always_inline int decapsulate(struct xdp_md *ctx, const struct ethhdr *eth, __u32 outer_len,
				       __be16 h_proto)
{
	/* The outer checksum (IPv4) is not verified: the frame check sequence
	 * has covered the frame on the wire, and the stack checks the inner
	 * packet's checksums, the ones the client's packet depends on. Bytes
	 * behind the inner packet (padding) are trimmed by the stack from the
	 * inner tot_len / payload_len.
	 */
	if (strip_outer(ctx, eth, outer_len, h_proto))
		return finish(L4LB_DECAP_CNT_DROP_DECAP_FAILED, XDP_DROP);
	return finish(L4LB_DECAP_CNT_DECAPSULATED, XDP_PASS);
}

/* EtherType IPv4: IPIP (protocol 4) for a local address is decapsulated. */
static __always_inline int decap_ipv4(struct xdp_md *ctx, struct ethhdr *eth, void *data_end)
{
	struct iphdr *outer = (void *)(eth + 1);
	__u32 outer_len, outer_tot_len;
	enum l4lb_decap_counter verdict;
	enum ipv4_fault fault;
	__be16 h_proto;

	/* Identifying a frame takes the fixed part of an IPv4 header
	 * (protocol, destination). Shorter frames cannot be IPIP for us: they
	 * are the stack's business.
	 */
	if ((void *)(outer + 1) > data_end)
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);
	/* Someone else's tunnel or plain traffic: not ours to touch. */
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

	verdict = check_inner((void *)outer + outer_len, data_end, outer_tot_len - outer_len, L4LB_IPPROTO_IPIP,
			      &h_proto);
	if (verdict != L4LB_DECAP_CNT_DECAPSULATED)
		return finish(verdict, XDP_DROP);
	return decapsulate(ctx, eth, outer_len, h_proto);
}

/* EtherType IPv6: next header 4 or 41 directly behind the fixed header, for a
 * local address, is decapsulated. The balancer never adds extension headers,
 * so an outer header with any (hop-by-hop, routing, fragment, ...) is someone
 * else's and passes, like every other next header. Without a fragment header
 * an IPv6 packet is never a fragment.
 */
static __always_inline int decap_ipv6(struct xdp_md *ctx, struct ethhdr *eth, void *data_end)
{
	struct ipv6hdr *outer = (void *)(eth + 1);
	enum l4lb_decap_counter verdict;
	__u32 outer_len;
	__be16 h_proto;

	if ((void *)(outer + 1) > data_end)
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);
	if ((outer->nexthdr != L4LB_IPPROTO_IPIP && outer->nexthdr != L4LB_IPPROTO_IPV6) ||
	    !is_local_ipv6(&outer->daddr))
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);

	/* IP-in-IPv6 for this backend: faults are dropped and named. */
	switch (ipv6_check(outer, data_end, IPV6_MAX_LEN, &outer_len)) {
	case IPV6_OK:
		break;
	case IPV6_BAD_VERSION:
		return finish(L4LB_DECAP_CNT_DROP_BAD_VERSION6, XDP_DROP);
	default:
		return finish(L4LB_DECAP_CNT_DROP_BAD_PAYLOAD_LEN, XDP_DROP);
	}

	verdict = check_inner(outer + 1, data_end, outer_len - sizeof(*outer), outer->nexthdr, &h_proto);
	if (verdict != L4LB_DECAP_CNT_DECAPSULATED)
		return finish(verdict, XDP_DROP);
	return decapsulate(ctx, eth, sizeof(*outer), h_proto);
}

SEC("xdp")
int l4lb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	count(L4LB_DECAP_CNT_SEEN);
	/* Every EtherType but IPv4 and IPv6 (ARP, VLAN tags, ...) is the stack's. */
	if ((void *)(eth + 1) > data_end)
		return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return decap_ipv4(ctx, eth, data_end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return decap_ipv6(ctx, eth, data_end);
	return finish(L4LB_DECAP_CNT_PASSED, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
