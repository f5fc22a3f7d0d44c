// SPDX-License-Identifier: GPL-2.0
/* The throughput benchmark's programs (`l4lb bench`), not part of the datapath.
 *
 *   bench_gen    traffic generator, the XDP program of the generator's veth:
 *                every frame the balancer's veth sends back comes to it, is
 *                counted, made the next frame of the traffic and sent out
 *                again (XDP_TX). A few frames sent once from a packet socket
 *                keep going round this ring (src/bench/ring.rs).
 *   bench_plain  plain floor on the balancer's veth: count, XDP_TX.
 *   bench_encap  encapsulation floor: count, push the outer IPv4 header with
 *                the balancer's own push_ipv4() (encap.h, csum.h), XDP_TX.
 *   bench_encap6 IPv6 encapsulation floor: count, push a constant outer IPv6
 *                header with the balancer's own push_ipv6() (4in6 or 6in6,
 *                by the frame's EtherType), XDP_TX.
 *   bench_empty  returns XDP_PASS: the baseline of the test_run timing loops.
 *   bv_*         variants for `l4lb bench --variants`: the encapsulation floor
 *                with l4lb's stages added one by one (parse, select, counters,
 *                backend stats, flow table), and l4lb with one thing changed.
 *                They use l4lb's own maps (the host points them at the maps
 *                of the tracked l4lb program it attached, already filled).
 *
 * A frame comes back as the balancer sent it (l4lb pushes an outer header in
 * front), so the generator first gives it the length of the frame it is to
 * send, removing bytes at its head: what stays is the frame's tail, the
 * payload the balancer left as it was. It then rewrites every header byte
 * from a template (the kinds of frame taken in turn), then draws a
 * random client (the last 16 bits of its address, IPv4 or IPv6) and port and
 * fixes the checksums incrementally (IPv4 header, TCP or UDP). The random
 * word is masked first: all ones for a new flow per frame, fewer bits for a
 * bounded set of flows (the TCP ACK row: 16 bits, 65536 flows).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "l4lb.h"
#include "maps.h"
#include "parse.h"
#include "vip.h"
#include "jhash.h"
#include "csum.h"
#include "encap.h"
#include "flows.h"

/* Frames are at least this long (a minimum Ethernet frame without FCS), so
 * the template copy starts with one fixed-size block. */
#define BENCH_MIN_FRAME 60
/* Longer headers: Ethernet + IPv4 with 12 bytes of options + TCP (66), and
 * Ethernet + IPv6 + TCP (74). */
#define BENCH_OPTIONS_HEADER 66
#define BENCH_IPV6_HEADER 74
#define BENCH_TEMPLATE_LEN 80
/* Offsets the generator writes at are masked with this (and bounded). */
#define BENCH_OFFSET_MASK 0x7f

/* The encapsulation floors' constant destinations and outer sources. */
#define BENCH_FLOOR_DST 0xc6130101U /* 198.19.1.1 */
#define BENCH_FLOOR_SRC 0xc0000202U /* 192.0.2.2 */
/* 2001:db8:ff::1 and 2001:db8:ff::2 */
#define BENCH_FLOOR6_DST { 0x20, 0x01, 0x0d, 0xb8, 0x00, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01 }
#define BENCH_FLOOR6_SRC { 0x20, 0x01, 0x0d, 0xb8, 0x00, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02 }

/* Key 0: what the generator writes. Filled by the host before each run
 * (src/bench/frames.rs, GenConfig). */
struct bench_gen_config {
	__u16 header_len;  /* bytes of the template copied: 60, 66 or 74 */
	__u16 addr_off;    /* the client address's last two bytes */
	__u16 port_off;    /* the client port (start of TCP/UDP) */
	__u16 ip_csum_off; /* IPv4 header checksum; 0: none (IPv6) */
	__u16 l4_csum_off; /* TCP or UDP checksum */
	__u16 udp;         /* 1: UDP (a computed 0 is sent as 0xffff) */
	__u32 random_mask; /* ANDed into the random word: the flows drawn from */
	__u16 dst_off;     /* the destination address's last two bytes */
	__u16 dst_mask;    /* 0, or ANDed into a second random word added to them */
	__u16 frame_len;   /* the whole frame's length */
	__u16 pad;
	/* The first bytes of the frame with the address's last two bytes and
	 * the port 0, checksums computed for those zeros. */
	__u8 tmpl[BENCH_TEMPLATE_LEN] __attribute__((aligned(8)));
};

/* The kinds of frame the generator sends, in turn. */
#define BENCH_GEN_KINDS 8

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BENCH_GEN_KINDS);
	__type(key, __u32);
	__type(value, struct bench_gen_config);
} bench_gen_cfg SEC(".maps");

/* Key 0: whether the ring runs, and how many kinds of bench_gen_cfg it
 * sends. Stopped, the generator drops what comes back: the ring empties. */
struct bench_gen_ctl {
	__u32 running;
	__u32 kinds;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_gen_ctl);
} bench_gen_ctl SEC(".maps");

/* Frames the generator sent (per CPU); also which kind goes next. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_gen_cnt SEC(".maps");

/* Frames that came back to the generator's veth (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_back_cnt SEC(".maps");

/* Frames the floors sent back (per CPU). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_floor_cnt SEC(".maps");

/* A per-CPU counter needs no atomic add: no other CPU writes this copy. */
static __always_inline void count_one(void *map)
{
	__u32 zero = 0;
	__u64 *value = bpf_map_lookup_elem(map, &zero);

	if (value)
		*value += 1;
}

/* Adds 16-bit words to a checksum field and folds: RFC 1624 incremental update
 * for fields that were 0 when the checksum was computed. */
static __always_inline __u16 csum_add2(__u16 check, __u32 a, __u32 b)
{
	__u32 sum = (__u16)~check;

	sum += a + b;
	return csum_fold(sum);
}

/* The 16-bit field at `off` of the frame, or NULL past its end. */
static __always_inline __u16 *field16(void *data, void *data_end, __u32 off)
{
	__u16 *field = data + (off & BENCH_OFFSET_MASK);

	if ((void *)(field + 1) > data_end)
		return NULL;
	return field;
}

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	void *data, *data_end;
	struct bench_gen_config *cfg;
	struct bench_gen_ctl *ctl;
	__u32 zero = 0, key = 0, rnd, lo, sport, i, dst_add = 0;
	__u16 *addr, *port, *check, *dst;
	__u64 *sent;
	int delta;

	count_one(&bench_back_cnt);
	ctl = bpf_map_lookup_elem(&bench_gen_ctl, &zero);
	sent = bpf_map_lookup_elem(&bench_gen_cnt, &zero);
	if (!ctl || !sent)
		return XDP_ABORTED;
	if (!ctl->running)
		return XDP_DROP;
	if (ctl->kinds > 1)
		key = *sent % ctl->kinds;
	cfg = bpf_map_lookup_elem(&bench_gen_cfg, &key);
	if (!cfg)
		return XDP_ABORTED;
	delta = (int)(ctx->data_end - ctx->data) - cfg->frame_len;
	if (delta && bpf_xdp_adjust_head(ctx, delta))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + BENCH_MIN_FRAME > data_end)
		return XDP_ABORTED;
	/* 7 x 8 + 4 bytes: every header byte of the 60-byte frames. */
#pragma clang loop unroll(full)
	for (i = 0; i < 7; i++)
		((__u64 *)data)[i] = ((__u64 *)cfg->tmpl)[i];
	((__u32 *)data)[14] = ((__u32 *)cfg->tmpl)[14];
	if (cfg->header_len >= BENCH_OPTIONS_HEADER) {
		if (data + BENCH_OPTIONS_HEADER > data_end)
			return XDP_ABORTED;
		*(__u32 *)(data + 60) = *(__u32 *)(cfg->tmpl + 60);
		*(__u16 *)(data + 64) = *(__u16 *)(cfg->tmpl + 64);
	}
	if (cfg->header_len >= BENCH_IPV6_HEADER) {
		if (data + BENCH_IPV6_HEADER > data_end)
			return XDP_ABORTED;
		*(__u16 *)(data + 66) = *(__u16 *)(cfg->tmpl + 66);
		*(__u32 *)(data + 68) = *(__u32 *)(cfg->tmpl + 68);
		*(__u16 *)(data + 72) = *(__u16 *)(cfg->tmpl + 72);
	}

	addr = field16(data, data_end, cfg->addr_off);
	port = field16(data, data_end, cfg->port_off);
	check = field16(data, data_end, cfg->l4_csum_off);
	if (!addr || !port || !check)
		return XDP_ABORTED;
	rnd = bpf_get_prandom_u32() & cfg->random_mask;
	lo = bpf_htons(rnd & 0xffff);
	sport = bpf_htons((rnd >> 16) | 0x8000);
	*addr = lo;
	*port = sport;
	/* The 64-services row: the destination's last byte gets a number below
	 * 64 added (the template's byte is 128: no carry), the checksums too. */
	if (cfg->dst_mask) {
		dst = field16(data, data_end, cfg->dst_off);
		if (!dst)
			return XDP_ABORTED;
		dst_add = bpf_htons(bpf_get_prandom_u32() & cfg->dst_mask);
		*dst += dst_add;
	}
	if (cfg->ip_csum_off) {
		__u16 *ip_check = field16(data, data_end, cfg->ip_csum_off);

		if (!ip_check)
			return XDP_ABORTED;
		*ip_check = csum_add2(*ip_check, lo, dst_add);
	}
	*check = csum_add2(*check, lo + dst_add, sport);
	if (cfg->udp && *check == 0)
		*check = 0xffff; /* 0 means "no checksum" in UDP */
	*sent += 1;
	return XDP_TX;
}

SEC("xdp")
int bench_plain(struct xdp_md *ctx)
{
	(void)ctx;
	count_one(&bench_floor_cnt);
	return XDP_TX;
}

/* The encapsulation floors' constant backend and settings. */
static __always_inline void floor_setup(struct l4lb_backend *backend, struct l4lb_config *config)
{
	const __u8 mac[ETH_ALEN] = { 0x02, 0x00, 0x00, 0x00, 0x01, 0x01 };
	__be32 src = bpf_htonl(BENCH_FLOOR_SRC), dst = bpf_htonl(BENCH_FLOOR_DST);

	__builtin_memset(backend, 0, sizeof(*backend));
	__builtin_memset(config, 0, sizeof(*config));
	__builtin_memcpy(backend->addr, &dst, 4);
	__builtin_memcpy(backend->mac, mac, ETH_ALEN);
	backend->family = L4LB_FAMILY_IPV4;
	backend->flags = L4LB_BACKEND_ACTIVE;
	__builtin_memcpy(config->src_v4, &src, 4);
}

SEC("xdp")
int bench_encap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct l4lb_backend backend;
	struct l4lb_config config;
	struct inner inner = {};

	if ((void *)(ip + 1) > data_end)
		return XDP_DROP;
	floor_setup(&backend, &config);
	inner.l3_len = bpf_ntohs(ip->tot_len);
	inner.l2_len = sizeof(struct ethhdr);
	inner.tos = ip->tos;
	inner.df = ip->frag_off & bpf_htons(IPV4_DF);
	inner.proto = L4LB_IPPROTO_IPIP;
	if (push_ipv4(ctx, &backend, &config, &inner))
		return XDP_DROP;
	count_one(&bench_floor_cnt);
	return XDP_TX;
}

/* The IPv6 encapsulation floor's constant backend and settings. */
static __always_inline void floor_setup6(struct l4lb_backend *backend, struct l4lb_config *config)
{
	const __u8 mac[ETH_ALEN] = { 0x02, 0x00, 0x00, 0x00, 0x01, 0x06 };
	const __u8 src[16] = BENCH_FLOOR6_SRC, dst[16] = BENCH_FLOOR6_DST;

	__builtin_memset(backend, 0, sizeof(*backend));
	__builtin_memset(config, 0, sizeof(*config));
	__builtin_memcpy(backend->addr, dst, 16);
	__builtin_memcpy(backend->mac, mac, ETH_ALEN);
	backend->family = L4LB_FAMILY_IPV6;
	backend->flags = L4LB_BACKEND_ACTIVE;
	__builtin_memcpy(config->src_v6, src, 16);
}

/* What any IPv6-encapsulating balancer must at least do: read the inner
 * length and traffic class, push a constant outer IPv6 header. */
SEC("xdp")
int bench_encap6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct l4lb_backend backend;
	struct l4lb_config config;
	struct inner inner = {};

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6_header *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return XDP_DROP;
		inner.l3_len = IPV6_HDR_LEN + bpf_ntohs(ip6->payload_len);
		inner.l2_len = sizeof(struct ethhdr);
		inner.tos = bpf_ntohl(ip6->vtc_flow) >> 20;
		inner.proto = L4LB_IPPROTO_IPV6;
	} else {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return XDP_DROP;
		inner.l3_len = bpf_ntohs(ip->tot_len);
		inner.l2_len = sizeof(struct ethhdr);
		inner.tos = ip->tos;
		inner.proto = L4LB_IPPROTO_IPIP;
	}
	floor_setup6(&backend, &config);
	if (push_ipv6(ctx, &backend, &config, &inner))
		return XDP_DROP;
	count_one(&bench_floor_cnt);
	return XDP_TX;
}

SEC("xdp")
int bench_empty(struct xdp_md *ctx)
{
	(void)ctx;
	return XDP_PASS;
}

/* ---------------------------------------------------------------- variants
 *
 * variant(ctx, what) is the encapsulation floor with the stages of
 * l4lb_balance (l4lb_xdp.bpf.c) that `what` selects; with every stage it is
 * l4lb_balance's work on IPv4, done in the same order with the same headers.
 */
#define V_PARSE 0x1        /* parse_packet(): every check, the 5-tuple */
#define V_SELECT 0x2       /* config lookup, VIP lookup, service, jhash, table and backend lookups, MTU check */
#define V_NO_VIP 0x200     /* no VIP lookup: the catch-all's service number instead */
#define V_VIP_HOME 0x400   /* VIP lookup at the home entry only (one probe, no port-0 retry) */
#define V_COUNT 0x4        /* rx and tx counters in l4lb_counters */
#define V_BE_STATS 0x8     /* per-backend and per-service packets and bytes */
#define V_ATOMIC_ADD 0x10  /* counters with atomic adds (the portable object's) instead of plain ones */
#define V_SMALL_TABLE 0x20 /* slot within the table's first 256 entries: 1 KiB, stays in L1 */
#define V_TABLE_4K 0x40    /* slot within the first 4096 entries: 16 KiB */
#define V_TABLE_32K 0x80   /* slot within the first 32768 entries: 128 KiB */
#define V_CHEAP_HASH 0x100 /* two multiplications instead of jhash */
#define V_FLOWS 0x800      /* flow table (flows.h): 40-byte key, l4lb_flows lookup, pin as l4lb does */
#define V_L4LB (V_PARSE | V_SELECT | V_COUNT | V_BE_STATS | V_FLOWS)

/* Plain adds, as the driver build counts (`l4lb attach` in driver and
 * generic mode, and the bench's l4lbs): the host gives the variants counter
 * maps of the type l4lb's are, per-CPU there. V_ATOMIC_ADD counts as
 * l4lb_xdp.o does (iproute2, offload).
 */
static __always_inline void v_add(__u64 *value, __u64 n, const __u32 what)
{
	if (what & V_ATOMIC_ADD)
		__sync_fetch_and_add(value, n);
	else
		*value += n;
}

static __always_inline void v_count(__u32 which, const __u32 what)
{
	__u64 *value = bpf_map_lookup_elem(&l4lb_counters, &which);

	if (value)
		v_add(value, 1, what);
}

static __always_inline void v_traffic(void *map, __u32 index, __u64 bytes, const __u32 what)
{
	struct l4lb_traffic *traffic = bpf_map_lookup_elem(map, &index);

	if (traffic) {
		v_add(&traffic->packets, 1, what);
		v_add(&traffic->bytes, bytes, what);
	}
}

static __always_inline int variant(struct xdp_md *ctx, const __u32 what)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct l4lb_backend floor_backend, *backend = &floor_backend;
	struct l4lb_config floor_config, *config = &floor_config;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct l4lb_service *service;
	struct l4lb_flow_key key;
	struct packet pkt = {};
	struct inner inner = {};
	__u32 zero = 0, slot, index, entry_index, number = 0, service_number = 0, hash, event = L4LB_CNT_MAX;
	struct l4lb_table_entry *table_entry;
	__u64 bytes;

	pkt.flow = &key;
	floor_setup(&floor_backend, &floor_config);
	if (what & V_COUNT)
		v_count(L4LB_CNT_RX, what);
	if (what & V_PARSE) {
		if (parse_packet(data, data_end, &pkt) != PARSE_BALANCE || pkt.vip.family != L4LB_FAMILY_IPV4)
			return XDP_DROP;
	} else {
		if ((void *)(ip + 1) > data_end)
			return XDP_DROP;
		pkt.l3_len = bpf_ntohs(ip->tot_len);
		pkt.l2_len = sizeof(struct ethhdr);
		pkt.tos = ip->tos;
		pkt.df = ip->frag_off & bpf_htons(IPV4_DF);
	}
	if (what & V_SELECT) {
		config = bpf_map_lookup_elem(&l4lb_config, &zero);
		if (!config)
			return XDP_DROP;
		if (what & V_NO_VIP) {
			service_number = config->catch_all;
		} else if (what & V_VIP_HOME) {
			__u32 home = vip_home(&pkt.vip);
			struct l4lb_vip *vip = bpf_map_lookup_elem(&l4lb_vips, &home);

			if (!vip || !vip_key_equal(&vip->key, &pkt.vip))
				return XDP_DROP;
			service_number = vip->service;
		} else if (!find_service(config, &pkt.vip, pkt.fragment, &service_number)) {
			return XDP_DROP;
		}
		service = bpf_map_lookup_elem(&l4lb_services, &service_number);
		if (!service || !(service->flags & L4LB_SERVICE_ACTIVE))
			return XDP_DROP;
		if (what & V_CHEAP_HASH) {
			hash = (pkt.saddr ^ config->hash_seed) * 0x9e3779b1U ^ pkt.daddr;
			hash = (hash ^ pkt.ports ^ pkt.vip.proto) * 0x85ebca6bU;
			hash ^= hash >> 16;
		} else {
			hash = jhash_3words(pkt.saddr, pkt.daddr, pkt.ports, config->hash_seed + pkt.vip.proto);
		}
		slot = ((__u64)hash * L4LB_MAGLEV_SIZE) >> 32;
		if (what & V_SMALL_TABLE)
			slot &= 0xff;
		else if (what & V_TABLE_4K)
			slot &= 0xfff;
		else if (what & V_TABLE_32K)
			slot &= 0x7fff;
		index = service_number * L4LB_MAGLEV_SIZE + slot;
		entry_index = index >> L4LB_TABLE_ENTRY_SHIFT;
		table_entry = bpf_map_lookup_elem(&l4lb_tables, &entry_index);
		if (!table_entry)
			return XDP_DROP;
		number = table_entry->slot[index & L4LB_TABLE_ENTRY_MASK];
		/* l4lb_balance's slots in transition, with flows.h's rules
		 * (the bench's services hash ports: the key's ports are the
		 * packet's). Without V_FLOWS a word in transition names no
		 * backend and the frame is dropped.
		 */
		if ((what & V_FLOWS) && (number & L4LB_SLOT_TRANSITION) && number != L4LB_SLOT_EMPTY) {
			flow_key(&key, &pkt, pkt.ports);
			number = transition_backend(&key, &pkt, service, service_number, config, index, number, &event);
			if ((what & V_COUNT) && event != L4LB_CNT_MAX)
				v_count(event, what);
		}
		backend = bpf_map_lookup_elem(&l4lb_backends, &number);
		if (!backend || !(backend->flags & L4LB_BACKEND_ACTIVE))
			return XDP_DROP;
		if (backend->family != L4LB_FAMILY_IPV4)
			return XDP_DROP;
		if (config->mtu && pkt.l3_len + L4LB_IPIP_OVERHEAD > config->mtu)
			return XDP_DROP;
	}
	inner.l3_len = pkt.l3_len;
	inner.l2_len = pkt.l2_len;
	inner.tos = pkt.tos;
	inner.df = pkt.df;
	inner.proto = L4LB_IPPROTO_IPIP;
	if (push_ipv4(ctx, backend, config, &inner))
		return XDP_DROP;
	if (what & V_BE_STATS) {
		bytes = (long)ctx->data_end - (long)ctx->data;
		v_traffic(&l4lb_be_stats, number, bytes, what);
		v_traffic(&l4lb_svc_stats, service_number, bytes, what);
	}
	if (what & V_COUNT)
		v_count(L4LB_CNT_TX, what);
	else
		count_one(&bench_floor_cnt);
	return XDP_TX;
}

SEC("xdp")
int bv_parse(struct xdp_md *ctx)
{
	return variant(ctx, V_PARSE);
}

SEC("xdp")
int bv_select_hot(struct xdp_md *ctx)
{
	return variant(ctx, V_PARSE | V_SELECT | V_SMALL_TABLE);
}

SEC("xdp")
int bv_select(struct xdp_md *ctx)
{
	return variant(ctx, V_PARSE | V_SELECT);
}

SEC("xdp")
int bv_count(struct xdp_md *ctx)
{
	return variant(ctx, V_PARSE | V_SELECT | V_COUNT);
}

SEC("xdp")
int bv_be_stats(struct xdp_md *ctx)
{
	return variant(ctx, V_PARSE | V_SELECT | V_COUNT | V_BE_STATS);
}

SEC("xdp")
int bv_l4lb(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB);
}

SEC("xdp")
int bv_no_vip(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_NO_VIP);
}

SEC("xdp")
int bv_vip_home(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_VIP_HOME);
}

SEC("xdp")
int bv_atomic_add(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_ATOMIC_ADD);
}

SEC("xdp")
int bv_cheap_hash(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_CHEAP_HASH);
}

SEC("xdp")
int bv_table_32k(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_TABLE_32K);
}

SEC("xdp")
int bv_table_4k(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_TABLE_4K);
}

SEC("xdp")
int bv_small_table(struct xdp_md *ctx)
{
	return variant(ctx, V_L4LB | V_SMALL_TABLE);
}

char LICENSE[] SEC("license") = "GPL";
