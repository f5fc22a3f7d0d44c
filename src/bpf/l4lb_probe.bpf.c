// SPDX-License-Identifier: GPL-2.0
/* l4lb_probe: the health probes' path to a backend, through the backend's
 * decapsulation, as clients' packets take it.
 *
 * `l4lb serve` opens each probe connection to the service's VIP from a socket
 * marked L4LB_PROBE_MARK | target number. A policy rule routes marked packets
 * to the agent's probe device (one end of a veth pair, ARP off, so that no
 * neighbour is ever resolved for a VIP), and this program, on that device's
 * TC egress, pushes the outer header the balancer would push for that backend
 * (IPv4 protocol 4 to an IPv4 backend; IPv6 next header 4 or 41 to an IPv6
 * backend), writes the backend's next hop and the balancer device's MAC, and
 * redirects the frame out of the balancer's device. A backend whose
 * decapsulation or VIP binding is broken does not answer the probe, as it
 * would not answer a client.
 *
 * The inner packet is left as the stack built it; the kernel finishes a
 * checksum left to offload as it would for any tunnel (adjust_room's ENCAP
 * flags record the inner headers). Anything on the device that is not a
 * marked probe with a known target is dropped and counted: nothing else
 * belongs there.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "csum.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_PROBE_TARGETS);
	__type(key, __u32);
	__type(value, struct l4lb_probe_target);
} l4lb_probe_targets SEC(".maps");

/* Frames by outcome (enum l4lb_probe_counter). Probes are few: one shared
 * array with atomic adds.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_PROBE_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} l4lb_probe_counters SEC(".maps");

static __always_inline int count(__u32 which, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&l4lb_probe_counters, &which);

	if (n)
		__sync_fetch_and_add(n, 1);
	return verdict;
}

/* Writes the outer IPv4 header at ip (20 bytes, bounds checked by the
 * caller) for an inner packet of `inner_len` bytes and protocol `proto`.
 */
static __always_inline void write_ipv4(struct iphdr *ip, const struct l4lb_probe_target *t, __u32 inner_len,
				       __u8 proto)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(*ip) + inner_len);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = L4LB_PROBE_TTL;
	ip->protocol = proto;
	ip->check = 0;
	__builtin_memcpy(&ip->saddr, t->src, 4);
	__builtin_memcpy(&ip->daddr, t->dst, 4);
	ip->check = ipv4_header_csum(ip);
}

/* Writes the outer IPv6 header at ip6 (40 bytes, bounds checked). */
static __always_inline void write_ipv6(struct ipv6hdr *ip6, const struct l4lb_probe_target *t, __u32 inner_len,
				       __u8 proto)
{
	ip6->version = 6;
	ip6->priority = 0;
	ip6->flow_lbl[0] = 0;
	ip6->flow_lbl[1] = 0;
	ip6->flow_lbl[2] = 0;
	ip6->payload_len = bpf_htons(inner_len);
	ip6->nexthdr = proto;
	ip6->hop_limit = L4LB_PROBE_TTL;
	__builtin_memcpy(&ip6->saddr, t->src, 16);
	__builtin_memcpy(&ip6->daddr, t->dst, 16);
}

SEC("tc")
int l4lb_probe_encap(struct __sk_buff *skb)
{
	const struct l4lb_probe_target *t;
	__u32 target, inner_len, outer_len;
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	struct ethhdr *eth;
	void *data, *data_end;
	__u16 outer_proto;
	__u8 proto;

	if ((skb->mark & L4LB_PROBE_MARK_MASK) != L4LB_PROBE_MARK)
		return count(L4LB_PROBE_CNT_DROP_UNMARKED, TC_ACT_SHOT);
	target = skb->mark & ~L4LB_PROBE_MARK_MASK;
	t = bpf_map_lookup_elem(&l4lb_probe_targets, &target);
	if (!t || (t->family != L4LB_FAMILY_IPV4 && t->family != L4LB_FAMILY_IPV6))
		return count(L4LB_PROBE_CNT_DROP_NO_TARGET, TC_ACT_SHOT);
	if (skb->protocol == bpf_htons(ETH_P_IP))
		proto = IPPROTO_IPIP;
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		proto = IPPROTO_IPV6;
	else
		return count(L4LB_PROBE_CNT_DROP_NOT_IP, TC_ACT_SHOT);

	inner_len = skb->len - sizeof(*eth);
	if (t->family == L4LB_FAMILY_IPV4) {
		outer_len = sizeof(struct iphdr);
		outer_proto = bpf_htons(ETH_P_IP);
		flags |= BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	} else {
		outer_len = sizeof(struct ipv6hdr);
		outer_proto = bpf_htons(ETH_P_IPV6);
		flags |= BPF_F_ADJ_ROOM_ENCAP_L3_IPV6;
	}
	if (bpf_skb_adjust_room(skb, outer_len, BPF_ADJ_ROOM_MAC, flags))
		return count(L4LB_PROBE_CNT_DROP_NO_ROOM, TC_ACT_SHOT);

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) + sizeof(struct ipv6hdr) > data_end)
		return count(L4LB_PROBE_CNT_DROP_NO_ROOM, TC_ACT_SHOT);
	__builtin_memcpy(eth->h_dest, t->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, t->src_mac, ETH_ALEN);
	eth->h_proto = outer_proto;
	if (t->family == L4LB_FAMILY_IPV4)
		write_ipv4((void *)(eth + 1), t, inner_len, proto);
	else
		write_ipv6((void *)(eth + 1), t, inner_len, proto);
	count(L4LB_PROBE_CNT_SENT, 0);
	return bpf_redirect(t->ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
