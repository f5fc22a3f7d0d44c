/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: pinning a flow to the backend it went to, so that a
 * change of its service's Maglev table does not move it (include/l4lb.h says
 * which packets pin and when a pin holds). One HASH lookup per packet of a
 * tracked service; an update only when a flow is new or its pin went stale.
 */
#ifndef L4LB_FLOWS_H
#define L4LB_FLOWS_H

#include "maps.h"
#include "parse.h"

enum pin_state {
	PIN_NONE,   /* the flow has no entry */
	PIN_HELD,   /* its entry names a backend that is still the same one */
	PIN_STALE,  /* its entry names a backend number that now holds another, or none */
};

/* The flow as it is hashed: `ports` is what flow_hash() took (0 for
 * fragments and for UDP services that do not hash ports). The client's
 * address is already there: parsing wrote it (pkt->flow).
 */
static __always_inline void flow_key(struct l4lb_flow_key *key, const struct packet *pkt, __u32 ports)
{
	addr16_copy(key->daddr, pkt->vip.addr);
	key->ports = ports;
	key->family = pkt->vip.family;
	key->proto = pkt->vip.proto;
	key->pad[0] = 0;
	key->pad[1] = 0;
}

/* The backend the flow is pinned to, while its number still names the
 * backend it was pinned to (active, in this service, same address): backend
 * numbers are reused, a removed backend's flows must not follow its number.
 */
static __always_inline struct l4lb_backend *pinned_backend(const struct l4lb_flow_key *key, __u32 service,
							   __u32 *number, enum pin_state *state)
{
	struct l4lb_backend *backend;
	struct l4lb_flow *pin;

	*state = PIN_NONE;
	pin = bpf_map_lookup_elem(&l4lb_flows, key);
	if (!pin)
		return NULL;
	*state = PIN_STALE;
	backend = bpf_map_lookup_elem(&l4lb_backends, &pin->backend);
	if (!backend || !(backend->flags & L4LB_BACKEND_ACTIVE) || backend->service != service ||
	    backend->family != pin->family || !addr16_equal(backend->addr, pin->addr))
		return NULL;
	*state = PIN_HELD;
	*number = pin->backend;
	return backend;
}

/* The backend a packet of a tracked service keeps: its flow's pin, while
 * the pin holds. A SYN starts a new connection and keeps none: it takes its
 * slot's backend (the entry is still read: pins_flow() rewrites a reused
 * 4-tuple's).
 */
static __always_inline struct l4lb_backend *kept_backend(const struct l4lb_flow_key *key, const struct packet *pkt,
							 __u32 service, __u32 *number, enum pin_state *state)
{
	struct l4lb_backend *backend = pinned_backend(key, service, number, state);

	return pkt->syn ? NULL : backend;
}

/* Whether a packet that took its slot's backend pins its flow there. Not an
 * ICMP error (it follows pins, never makes one), and not a SYN of a flow
 * without an entry, so that a flood of SYNs from spoofed sources creates no
 * entries: the connection's next segment pins it.
 */
static __always_inline int pins_flow(const struct packet *pkt, enum pin_state state)
{
	return !pkt->icmp_error && (!pkt->syn || state != PIN_NONE);
}

/* Pins the flow to backend `number` (a new entry, or over the one it had);
 * returns the event's counter. The value is built on the stack and handed
 * to the update helper: offload takes no plain store into a map value.
 */
static __always_inline __u32 pin_flow(const struct l4lb_flow_key *key, const struct l4lb_backend *backend,
				      __u32 number, enum pin_state state)
{
	struct l4lb_flow pin = {};

	addr16_copy(pin.addr, backend->addr);
	pin.backend = number;
	pin.family = backend->family;
	if (bpf_map_update_elem(&l4lb_flows, key, &pin, BPF_ANY))
		return L4LB_CNT_FLOW_TABLE_FULL;
	return state == PIN_NONE ? L4LB_CNT_FLOW_PINNED : L4LB_CNT_FLOW_REPINNED;
}

#endif /* L4LB_FLOWS_H */
