/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every layout and constant shared by the l4lb datapath (src/bpf/) and the
 * Rust host. The host reads the struct and enum layouts from the BTF-generated
 * skeleton types, so this header is the single source of truth for both.
 */
#ifndef L4LB_H
#define L4LB_H

#include <linux/types.h>

/* Lookup table: a power of two, so the slot is `hash & L4LB_TABLE_MASK` (no
 * divisor, offload-safe). 65536 slots keep the weights of up to
 * L4LB_MAX_BACKENDS destinations even to within 1/128 (128 or 129 slots each
 * at 512 destinations, versus the seed's 512-slot table where 100
 * destinations got 5 or 6 slots: a 6:5 ratio).
 */
#define L4LB_TABLE_SIZE 65536
#define L4LB_TABLE_MASK (L4LB_TABLE_SIZE - 1)

/* Destinations a balancer holds (the seed's limit). */
#define L4LB_MAX_BACKENDS 512

/* Slot value meaning "no destination": traffic hashing here is dropped. */
#define L4LB_SLOT_EMPTY 0xffffffffU

/* Outer header pushed in front of the client's IPv4 packet (IPIP). */
#define L4LB_IPIP_OVERHEAD 20
#define L4LB_OUTER_TTL 64
#define L4LB_IPPROTO_IPIP 4

/* The one entry of the l4lb_config map (key 0). Written by the host only. */
struct l4lb_config {
	__u32 hash_seed;   /* jhash initval; random unless set explicitly */
	__be32 src_addr;   /* outer IPv4 source address, network order */
	__u32 mtu;         /* largest IPv4 packet after encapsulation (L3 bytes) */
	__u32 flags;       /* L4LB_CONFIG_* */
};

/* l4lb_config.flags */
#define L4LB_CONFIG_SEED_SET 0x1U     /* hash_seed has been chosen (random or fixed) */
#define L4LB_CONFIG_SEED_FIXED 0x2U   /* ... and was given by the operator */
#define L4LB_CONFIG_SRC_SET 0x4U      /* src_addr has been configured */

/* One destination (slot of l4lb_backends, indexed by backend number). */
struct l4lb_backend {
	__be32 addr;       /* outer IPv4 destination, network order */
	__u8 mac[6];       /* next-hop Ethernet destination */
	__u16 flags;       /* L4LB_BACKEND_* */
};

/* l4lb_backend.flags */
#define L4LB_BACKEND_ACTIVE 0x1U      /* entry is filled; others are never selected */

/* Per-destination traffic (l4lb_backend_stats, same index as l4lb_backends).
 * bytes counts the frame as sent: Ethernet + outer IPv4 + inner packet.
 */
struct l4lb_backend_stats {
	__u64 packets;
	__u64 bytes;
};

/* Global counters (l4lb_counters, one __u64 per entry). Every frame seen
 * (L4LB_CNT_RX) ends in exactly one of TX, PASS or a DROP_* counter.
 */
enum l4lb_counter {
	L4LB_CNT_RX = 0,            /* frames seen by the program */
	L4LB_CNT_TX,                /* encapsulated and sent back out (XDP_TX) */
	L4LB_CNT_PASS,              /* handed to the stack: not IPv4 TCP/UDP */
	L4LB_CNT_DROP_SHORT_ETH,    /* frame shorter than an Ethernet header */
	L4LB_CNT_DROP_SHORT_IPV4,   /* IPv4 header cut off */
	L4LB_CNT_DROP_BAD_VERSION,  /* EtherType IPv4 but version field not 4 */
	L4LB_CNT_DROP_BAD_IHL,      /* IHL below 5 words */
	L4LB_CNT_DROP_BAD_TOT_LEN,  /* tot_len beyond the frame or below the header */
	L4LB_CNT_DROP_SHORT_L4,     /* TCP/UDP ports cut off */
	L4LB_CNT_DROP_NO_BACKEND,   /* slot empty or its destination not active */
	L4LB_CNT_DROP_TOO_BIG,      /* encapsulated packet would exceed the MTU */
	L4LB_CNT_DROP_ENCAP_FAILED, /* no headroom for the outer header */
	L4LB_CNT_MAX,
};

/* ------------------------------------------------------------------------
 * Backend side: l4lb_decap (src/bpf/l4lb_decap.bpf.c) strips the outer header
 * the balancer pushed, for the backend's own addresses, and passes the
 * client's packet to the stack.
 */

/* Addresses a backend decapsulates for (entries of the decap_addrs map). */
#define L4LB_DECAP_MAX_ADDRS 64

/* l4lb_decap_addr.family: the IP version of the address. */
#define L4LB_DECAP_FAMILY_IPV4 4
#define L4LB_DECAP_FAMILY_IPV6 6   /* reserved: IPv6 outer headers are not handled yet */

/* Key of decap_addrs: one of the backend's addresses, as outer destination.
 * Room for an IPv6 address so that IPv6 outer headers can be added without
 * changing the map; an IPv4 address takes addr[0..3] (network order) and the
 * rest stays zero. No implicit padding: the key is hashed byte for byte.
 */
struct l4lb_decap_addr {
	__u8 family;       /* L4LB_DECAP_FAMILY_* */
	__u8 pad[3];       /* zero */
	__u8 addr[16];
};

/* Decap counters (decap_counters, one per-CPU __u64 per entry). Every frame
 * seen ends in exactly one of DECAPSULATED, PASSED or a DROP_* counter. Drops
 * happen only to IPIP addressed to one of the backend's addresses.
 */
enum l4lb_decap_counter {
	L4LB_DECAP_CNT_SEEN = 0,             /* frames seen by the program */
	L4LB_DECAP_CNT_DECAPSULATED,         /* outer header stripped, client's packet passed on */
	L4LB_DECAP_CNT_PASSED,               /* not IPIP for a local address: passed untouched */
	/* Faults of the outer, then of the inner header (enum ipv4_fault). */
	L4LB_DECAP_CNT_DROP_BAD_VERSION,     /* outer version field not 4 */
	L4LB_DECAP_CNT_DROP_BAD_IHL,         /* outer IHL below 5 words */
	L4LB_DECAP_CNT_DROP_SHORT_OUTER,     /* outer options cut off by the frame's end */
	L4LB_DECAP_CNT_DROP_BAD_TOT_LEN,     /* outer tot_len beyond the frame or below the header */
	L4LB_DECAP_CNT_DROP_INNER_VERSION,   /* inner version field not 4 */
	L4LB_DECAP_CNT_DROP_INNER_IHL,       /* inner IHL below 5 words */
	L4LB_DECAP_CNT_DROP_SHORT_INNER,     /* inner header (with options) not whole in the outer packet */
	L4LB_DECAP_CNT_DROP_INNER_TOT_LEN,   /* inner tot_len beyond the outer packet or below its header */
	L4LB_DECAP_CNT_DROP_FRAGMENT,        /* outer packet is a fragment: XDP cannot reassemble */
	L4LB_DECAP_CNT_DROP_DECAP_FAILED,    /* bpf_xdp_adjust_head refused to strip the outer header */
	L4LB_DECAP_CNT_MAX,
};

#endif /* L4LB_H */
