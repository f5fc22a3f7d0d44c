/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every layout and constant shared by the l4lb datapath (src/bpf/) and the
 * Rust host. The host reads the struct and enum layouts from the BTF-generated
 * skeleton types, so this header is the single source of truth for both.
 */
#ifndef L4LB_H
#define L4LB_H

#include <linux/types.h>

/* ------------------------------------------------------------------------
 * Services. A packet's (family, protocol, destination port, destination
 * address) is looked up in l4lb_vips: first with its port, then, if any VIP
 * takes every port, with port 0. A packet no VIP takes goes to the catch-all
 * service if one is configured (the seed's mode: every TCP/UDP packet), else
 * to the stack. A zeroed configuration (iproute2 load, nothing applied yet)
 * has neither VIPs nor a catch-all: every packet goes to the stack.
 * A service has a Maglev lookup table of L4LB_MAGLEV_SIZE slots (a range of
 * l4lb_tables) naming backend numbers (entries of l4lb_backends).
 */

/* Services (VIPs, the catch-all included) a balancer holds. */
#define L4LB_MAX_SERVICES 64
/* Offloaded, the host loads l4lb_tables with room for this many services
 * only: 32 x 51203 = 1,638,496 entries. NFP map memory is finite (a design
 * note of the mizar project gives 3,072,000 entries over all maps of a card:
 * not verified here, no card), and 64 tables alone are 3,276,992.
 */
#define L4LB_OFFLOAD_MAX_SERVICES 32
/* Backend entries over all services (a backend in two services has two). */
#define L4LB_MAX_BACKENDS 32768
/* Backends one service may have (Maglev's table size is chosen from it). */
#define L4LB_MAX_SERVICE_BACKENDS 512

/* Slots per service table: the smallest prime >= 100 x
 * L4LB_MAX_SERVICE_BACKENDS. 51203 x 4 bytes = 200 KiB per service, 12.5 MiB
 * for L4LB_MAX_SERVICES. A flow's slot is (hash * SIZE) >> 32: a multiply and
 * a shift (no division, offload-safe), as uniform as a modulo.
 */
#define L4LB_MAGLEV_SIZE 51203

/* l4lb_tables packs L4LB_TABLE_ENTRY_SLOTS slot words into each map entry:
 * an array map rounds every value up to 8 bytes, so a 4-byte word per entry
 * took 8 (a service's table 400 KiB, 8 useful slots per cache line), and the
 * slot load was the datapath's costliest line. Packed, a table is 200 KiB,
 * 16 slots per 64-byte line. Slot g (service * L4LB_MAGLEV_SIZE + slot) is
 * word g % 16 of entry g / 16; tables of neighbouring services may share an
 * entry.
 */
#define L4LB_TABLE_ENTRY_SLOTS 16
#define L4LB_TABLE_ENTRY_SHIFT 4
#define L4LB_TABLE_ENTRY_MASK (L4LB_TABLE_ENTRY_SLOTS - 1)
/* Entries of l4lb_tables for `services` tables. */
#define L4LB_TABLE_ENTRIES(services) (((services) * L4LB_MAGLEV_SIZE + L4LB_TABLE_ENTRY_MASK) >> L4LB_TABLE_ENTRY_SHIFT)

struct l4lb_table_entry {
	__u32 slot[L4LB_TABLE_ENTRY_SLOTS];
};

/* A slot of l4lb_tables is one 32-bit word (docs/transitions.md):
 *   B                                       steady: every packet to backend B
 *   B | L4LB_SLOT_TRANSITION | A << 16      in transition: new flows to B,
 *                                           flows from before the change to A
 *   L4LB_SLOT_EMPTY                         no backend: dropped
 * A steady word is a bare backend number (below L4LB_MAX_BACKENDS), so one
 * bit test tells the steady slot, which touches no per-flow state, from the
 * rest (L4LB_SLOT_EMPTY has the bit too: no backend). Current takes the low
 * 16 bits, previous the 15 above: both below L4LB_MAX_BACKENDS (32768), so
 * no pair of backends spells L4LB_SLOT_EMPTY.
 */
#define L4LB_SLOT_EMPTY 0xffffffffU
#define L4LB_SLOT_BACKEND_MASK 0xffffU
#define L4LB_SLOT_TRANSITION 0x80000000U
#define L4LB_SLOT_PREVIOUS_SHIFT 16
#define L4LB_SLOT_PREVIOUS_MASK 0x7fffU

/* The VIP table is direct-mapped: a VIP's home entry is
 * (fold(key) * L4LB_VIP_HASH_MUL) >> (32 - L4LB_VIP_BITS); the host places a
 * VIP at most L4LB_VIP_MAX_PROBES - 1 entries after its home (wrapping) and
 * tells the datapath how far it looks (l4lb_config.vip_probes). With 64 VIPs
 * in 1024 entries a VIP almost always sits at home: one array lookup.
 */
#define L4LB_VIP_BITS 10
#define L4LB_VIP_SLOTS (1U << L4LB_VIP_BITS)
#define L4LB_VIP_MASK (L4LB_VIP_SLOTS - 1)
#define L4LB_VIP_MAX_PROBES 4
#define L4LB_VIP_HASH_MUL 0x9e3779b1U

/* Address families (l4lb_vip_key.family, l4lb_backend.family). */
#define L4LB_FAMILY_IPV4 4
#define L4LB_FAMILY_IPV6 6
/* Or'ed into a VIP key's family: the entry fragments of that (address,
 * protocol) look up. Fragments carry no ports (only the first one does), so
 * every fragment of a datagram looks up (address, family | FRAGMENT,
 * protocol, port 0); the host points that entry at the address's port-0 VIP
 * for the protocol if there is one, else at its VIP with the lowest port.
 */
#define L4LB_FAMILY_FRAGMENT 0x80

/* Outer headers. */
#define L4LB_IPIP_OVERHEAD 20      /* outer IPv4 header */
#define L4LB_IP6_OVERHEAD 40       /* outer IPv6 header */
#define L4LB_OUTER_TTL 64          /* outer TTL and hop limit */
#define L4LB_IPPROTO_IPIP 4        /* outer protocol / next header for an IPv4 inner packet */
#define L4LB_IPPROTO_IPV6 41       /* ... for an IPv6 inner packet */

/* IPv6 extension headers skipped before the transport header (hop-by-hop,
 * routing, destination options, fragment); a packet with more is dropped.
 */
#define L4LB_MAX_EXT_HEADERS 4

/* 802.1Q / 802.1ad tags before the IP header: up to two (QinQ), kept on the
 * encapsulated frame and on ICMP answers.
 */
#define L4LB_MAX_VLAN_TAGS 2

/* ICMP "fragmentation needed" (IPv4, DF set) and "packet too big" (IPv6)
 * answers built by the datapath quote this many bytes of the client's
 * packet: the IPv4 header with the longest options plus 8 bytes (RFC 792),
 * the IPv6 header plus 40 bytes (its TCP/UDP ports and some extension
 * headers). The host refuses MTUs below L4LB_MIN_MTU (the IPv4 minimum
 * datagram every host takes, RFC 791) and, with IPv6 backends, below
 * L4LB_MIN_MTU6 + L4LB_IP6_OVERHEAD (so that no answer advertises less than
 * the IPv6 minimum link MTU, RFC 8200).
 */
#define L4LB_ICMP4_QUOTE 68
#define L4LB_ICMP6_QUOTE 80
#define L4LB_MIN_MTU 576
#define L4LB_MIN_MTU6 1280
/* TTL / hop limit of the ICMP answers. */
#define L4LB_ICMP_TTL 64

/* The one entry of the l4lb_config map (key 0). Written by the host only. */
struct l4lb_config {
	__u32 hash_seed;      /* flow hash seed; random unless set explicitly */
	__u32 flags;          /* L4LB_CONFIG_* */
	__u32 mtu;            /* largest packet after encapsulation (L3 bytes); 0 = no limit */
	__u32 catch_all;      /* service number of the catch-all, if L4LB_CONFIG_CATCH_ALL */
	__u32 vip_probes;     /* entries the VIP lookup looks at: 0 (no VIP) .. MAX_PROBES */
	__u8 src_v4[4];       /* outer IPv4 source (network order) */
	__u8 src_v6[16];      /* outer IPv6 source */
	__u8 gateway_mac[6];  /* next hop of backends without their own MAC */
	__u8 pad[2];
	__u32 clock;          /* the tick: seconds of the host's monotonic clock, written by
			       * every apply and every `l4lb settle` round (pins' last-seen time) */
};

/* l4lb_config.flags */
#define L4LB_CONFIG_SEED_SET 0x1U     /* hash_seed has been chosen (random or fixed) */
#define L4LB_CONFIG_SEED_FIXED 0x2U   /* ... and was given by the operator */
#define L4LB_CONFIG_SRC_SET 0x4U      /* src_v4 has been configured */
#define L4LB_CONFIG_SRC6_SET 0x8U     /* src_v6 has been configured */
#define L4LB_CONFIG_GATEWAY_SET 0x10U /* gateway_mac has been configured */
#define L4LB_CONFIG_ANY_PORT 0x20U    /* some VIP has port 0: look up port 0 too */
#define L4LB_CONFIG_CATCH_ALL 0x40U   /* catch_all names the catch-all service */

/* What a VIP answers for. An IPv4 address takes addr[0..3]; the rest is 0.
 * family 0 marks a free entry (no packet has family 0).
 */
struct l4lb_vip_key {
	__u8 addr[16];
	__u8 family;          /* L4LB_FAMILY_*, 0 = free */
	__u8 proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__be16 port;          /* destination port, network order; 0 = every port */
};

/* An entry of l4lb_vips. */
struct l4lb_vip {
	struct l4lb_vip_key key;
	__u32 service;        /* service number */
};

/* An entry of l4lb_services, indexed by service number. */
struct l4lb_service {
	__u32 flags;          /* L4LB_SERVICE_* */
	__u32 changed;        /* the tick (l4lb_config.clock) of the last apply that put slots in transition */
	__u32 udp_grace;      /* seconds after `changed` during which unknown UDP flows are old ones */
	__u32 idle_timeout;   /* seconds a pin may stay unseen before `l4lb settle` drops it */
};

/* l4lb_service.flags */
#define L4LB_SERVICE_ACTIVE 0x1U      /* the service's table is filled */
#define L4LB_SERVICE_HASH_PORTS 0x2U  /* UDP flows hash their ports (TCP always does) */
#define L4LB_SERVICE_IPV4_BACKENDS 0x4U /* some backend is IPv4: IPv6 packets are not taken */
#define L4LB_SERVICE_TRACK_FLOWS 0x8U /* table changes put slots in transition (host only) */

/* Defaults of the per-service settings (seconds). */
#define L4LB_IDLE_TIMEOUT_DEFAULT 300
#define L4LB_UDP_GRACE_DEFAULT 30

/* One backend (entry of l4lb_backends, indexed by backend number). */
struct l4lb_backend {
	__u8 addr[16];        /* outer destination; IPv4 in addr[0..3] */
	__u8 mac[6];          /* next-hop Ethernet destination (the gateway's, if the backend has none) */
	__u8 family;          /* L4LB_FAMILY_* */
	__u8 flags;           /* L4LB_BACKEND_* */
	__u32 service;        /* owning service number (host bookkeeping) */
	__u32 weight;         /* Maglev weight (host bookkeeping); 0 = draining */
};

/* Health probes (l4lb_probe.bpf.c, `l4lb serve`). The agent probes a
 * backend the way clients reach it: a TCP connection to the VIP, from a
 * socket marked L4LB_PROBE_MARK | target number. Marked packets are routed
 * to the agent's probe device, whose TC egress program encapsulates them to
 * the target's backend as the balancer would (same outer header, same next
 * hop) and sends them out of the balancer's device. The backend answers the
 * balancer's address directly (direct server return), which the stack
 * delivers to the probing socket.
 */
#define L4LB_PROBE_MARK 0x4c340000U      /* "L4" in the upper 16 bits */
#define L4LB_PROBE_MARK_MASK 0xffff0000U
#define L4LB_PROBE_TARGETS 4096          /* entries of l4lb_probe_targets */
#define L4LB_PROBE_TTL 64

/* Where the probes of one target go (l4lb_probe_targets, by target number). */
struct l4lb_probe_target {
	__u8 dst[16];         /* outer destination: the backend; IPv4 in dst[0..3] */
	__u8 src[16];         /* outer source: the balancer's source_v4 / source_v6 */
	__u8 dst_mac[6];      /* the backend's next hop */
	__u8 src_mac[6];      /* the balancer's device */
	__u8 family;          /* L4LB_FAMILY_* of dst and src; 0 = unused entry */
	__u8 pad[3];
	__u32 ifindex;        /* the balancer's device, where the frame leaves */
};

/* l4lb_probe_counters: what the probe device's program did with a frame. */
enum l4lb_probe_counter {
	L4LB_PROBE_CNT_SENT = 0,          /* encapsulated and sent out of the balancer's device */
	L4LB_PROBE_CNT_DROP_UNMARKED,     /* no probe mark: nothing else belongs on the probe device */
	L4LB_PROBE_CNT_DROP_NO_TARGET,    /* marked for a target number the agent has not filled */
	L4LB_PROBE_CNT_DROP_NOT_IP,       /* neither IPv4 nor IPv6 */
	L4LB_PROBE_CNT_DROP_NO_ROOM,      /* bpf_skb_adjust_room refused the outer header */
	L4LB_PROBE_CNT_MAX,
};

/* l4lb_backend.flags */
#define L4LB_BACKEND_ACTIVE 0x1U      /* entry is filled; others are never selected */
#define L4LB_BACKEND_GATEWAY_MAC 0x2U /* mac is the gateway's (the backend has none of its own) */

/* ------------------------------------------------------------------------
 * Connection tracking (docs/transitions.md). Only slots in transition keep
 * per-flow state: l4lb_flows pins a flow of such a slot to the backend it
 * went to. In a slot in transition: a TCP SYN goes to the current backend
 * and pins there; a flow with a pin that holds follows it; any other TCP
 * packet, and UDP during the service's grace, is from before the change:
 * the previous backend (while it is in the service), pinned there; UDP after
 * the grace goes to the current backend, pinned there. ICMP errors follow
 * the same rules and never pin. `l4lb settle` drops idle pins and ends
 * transitions.
 *
 * The object declares a HASH map of L4LB_FLOW_ENTRIES (what iproute2 and
 * offload load: a full HASH map pins no new flow, counted); `l4lb attach`
 * loads it in driver or generic mode as an LRU hash of --flow-entries
 * entries (default L4LB_FLOW_ENTRIES_DEFAULT), which evicts the least
 * recently used pins.
 */
#define L4LB_FLOW_ENTRIES 65536
#define L4LB_FLOW_ENTRIES_DEFAULT 262144

/* Key of l4lb_flows: the flow as it is hashed (ports 0 for fragments and for
 * UDP services that do not hash ports). Addresses as in l4lb_vip_key. No
 * implicit padding: the key is hashed byte for byte.
 */
struct l4lb_flow_key {
	__u8 saddr[16];       /* client address */
	__u8 daddr[16];       /* VIP address */
	__u32 ports;          /* source and destination port as on the wire */
	__u8 family;          /* L4LB_FAMILY_* */
	__u8 proto;           /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad[2];          /* zero */
};

/* Value of l4lb_flows: the backend the flow is pinned to, with what that
 * backend number held when it was pinned (a number freed and given to
 * another backend must not take the flow with it), the slot it was pinned
 * in and when it was last seen.
 */
struct l4lb_flow {
	__u8 addr[16];        /* the backend's address (l4lb_backend.addr) */
	__u32 backend;        /* backend number */
	__u32 slot;           /* index in l4lb_tables of the slot the pin was made in */
	__u32 seen;           /* the tick (l4lb_config.clock) of its last packet */
	__u8 family;          /* the backend's family */
	__u8 pad[3];          /* zero */
};

/* Traffic of a backend (l4lb_be_stats, same index as l4lb_backends) or a
 * service (l4lb_svc_stats, by service number). bytes counts the frame as
 * sent: Ethernet + outer header + inner packet.
 */
struct l4lb_traffic {
	__u64 packets;
	__u64 bytes;
};

/* Global counters (l4lb_counters, one __u64 per entry). Every frame seen
 * (L4LB_CNT_RX) ends in exactly one of TX, TX_TOO_BIG, PASS, PASS_NO_SERVICE or a DROP_*
 * counter (the outcomes, TX .. DROP_ENCAP_FAILED); the FLOW_* counters after
 * them count connection-tracking events.
 */
enum l4lb_counter {
	L4LB_CNT_RX = 0,            /* frames seen by the program */
	L4LB_CNT_TX,                /* encapsulated and sent back out (XDP_TX) */
	L4LB_CNT_TX_TOO_BIG,        /* too big with DF / IPv6: answered with ICMP (XDP_TX) */
	L4LB_CNT_PASS,              /* handed to the stack: not IPv4/IPv6 TCP/UDP */
	L4LB_CNT_PASS_NO_SERVICE,   /* handed to the stack: TCP/UDP that no service takes */
	L4LB_CNT_DROP_SHORT_ETH,    /* frame shorter than an Ethernet header */
	L4LB_CNT_DROP_SHORT_VLAN,   /* an 802.1Q / 802.1ad tag cut off */
	L4LB_CNT_DROP_SHORT_IPV4,   /* IPv4 header cut off */
	L4LB_CNT_DROP_BAD_VERSION,  /* EtherType IPv4/IPv6 but another version field */
	L4LB_CNT_DROP_BAD_IHL,      /* IHL below 5 words */
	L4LB_CNT_DROP_BAD_TOT_LEN,  /* tot_len beyond the frame or below the header */
	L4LB_CNT_DROP_BAD_CSUM,     /* IPv4 header checksum wrong */
	L4LB_CNT_DROP_TTL_ZERO,     /* TTL / hop limit 0: no router forwards that */
	L4LB_CNT_DROP_SHORT_IPV6,   /* IPv6 header or an extension header cut off */
	L4LB_CNT_DROP_BAD_PAYLOAD_LEN, /* IPv6 payload length beyond the frame (or 0: jumbogram) */
	L4LB_CNT_DROP_EXT_HEADERS,  /* more than L4LB_MAX_EXT_HEADERS IPv6 extension headers */
	L4LB_CNT_DROP_SHORT_L4,     /* TCP/UDP ports cut off */
	L4LB_CNT_DROP_NO_BACKEND,   /* slot empty or its backend not active */
	L4LB_CNT_DROP_TOO_BIG,      /* too big once encapsulated: IPv4 without DF, or an ICMP error */
	L4LB_CNT_DROP_ENCAP_FAILED, /* no headroom for the outer header */
	/* Connection-tracking events: not outcomes, a frame counts at most one. */
	L4LB_CNT_FLOW_PINNED,       /* a flow of a slot in transition pinned */
	L4LB_CNT_FLOW_REPINNED,     /* a pin that no longer held (or a SYN's reused 4-tuple) pinned again */
	L4LB_CNT_FLOW_TABLE_FULL,   /* a pin the flow table refused (HASH map full): balanced unpinned */
	L4LB_CNT_MAX,
};

/* ------------------------------------------------------------------------
 * Backend side: l4lb_decap (src/bpf/l4lb_decap.bpf.c) strips the outer header
 * the balancer pushed (IPv4 protocol 4, IPv6 next header 4 or 41), for the
 * backend's own addresses, and passes the client's packet to the stack.
 */

/* Addresses a backend decapsulates for (entries of the decap_addrs map). */
#define L4LB_DECAP_MAX_ADDRS 64

/* l4lb_decap_addr.family: the IP version of the address. */
#define L4LB_DECAP_FAMILY_IPV4 4
#define L4LB_DECAP_FAMILY_IPV6 6

/* Key of decap_addrs: one of the backend's addresses, as outer destination.
 * An IPv6 address takes all 16 bytes; an IPv4 address takes addr[0..3]
 * (network order) and the rest stays zero. No implicit padding: the key is
 * hashed byte for byte.
 */
struct l4lb_decap_addr {
	__u8 family;       /* L4LB_DECAP_FAMILY_* */
	__u8 pad[3];       /* zero */
	__u8 addr[16];
};

/* Decap counters (decap_counters, one per-CPU __u64 per entry). Every frame
 * seen ends in exactly one of DECAPSULATED, PASSED or a DROP_* counter. Drops
 * happen only to IP-in-IP addressed to one of the backend's addresses.
 */
enum l4lb_decap_counter {
	L4LB_DECAP_CNT_SEEN = 0,             /* frames seen by the program */
	L4LB_DECAP_CNT_DECAPSULATED,         /* outer header stripped, client's packet passed on */
	L4LB_DECAP_CNT_PASSED,               /* not IP-in-IP for a local address: passed untouched */
	/* Faults of the outer IPv4, then of an inner IPv4 header (enum ipv4_fault). */
	L4LB_DECAP_CNT_DROP_BAD_VERSION,     /* outer version field not 4 (EtherType IPv4) */
	L4LB_DECAP_CNT_DROP_BAD_IHL,         /* outer IHL below 5 words */
	L4LB_DECAP_CNT_DROP_SHORT_OUTER,     /* outer options cut off by the frame's end */
	L4LB_DECAP_CNT_DROP_BAD_TOT_LEN,     /* outer tot_len beyond the frame or below the header */
	L4LB_DECAP_CNT_DROP_INNER_VERSION,   /* inner version field neither 4 nor 6 under protocol 4 */
	L4LB_DECAP_CNT_DROP_INNER_IHL,       /* inner IHL below 5 words */
	L4LB_DECAP_CNT_DROP_SHORT_INNER,     /* inner IPv4 header (with options) not whole in the outer packet */
	L4LB_DECAP_CNT_DROP_INNER_TOT_LEN,   /* inner tot_len beyond the outer packet or below its header */
	L4LB_DECAP_CNT_DROP_FRAGMENT,        /* outer IPv4 packet is a fragment: XDP cannot reassemble */
	L4LB_DECAP_CNT_DROP_DECAP_FAILED,    /* bpf_xdp_adjust_head refused to strip the outer header */
	/* Faults of the outer IPv6, then of an inner IPv6 header (enum ipv6_fault). */
	L4LB_DECAP_CNT_DROP_BAD_VERSION6,    /* outer version field not 6 (EtherType IPv6) */
	L4LB_DECAP_CNT_DROP_BAD_PAYLOAD_LEN, /* outer 40 + payload_len beyond the frame */
	L4LB_DECAP_CNT_DROP_INNER6_VERSION,  /* inner version field neither 6 nor 4 under next header 41 */
	L4LB_DECAP_CNT_DROP_SHORT_INNER6,    /* inner IPv6 header (40 bytes) not whole in the outer packet */
	L4LB_DECAP_CNT_DROP_INNER6_PAYLOAD_LEN, /* inner 40 + payload_len beyond the outer packet */
	L4LB_DECAP_CNT_DROP_INNER_FAMILY,    /* inner version 6 under protocol 4, or 4 under next header 41 */
	L4LB_DECAP_CNT_MAX,
};

#endif /* L4LB_H */
