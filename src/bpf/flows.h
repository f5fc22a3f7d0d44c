/* SPDX-License-Identifier: GPL-2.0 */
/* Slots in transition (docs/transitions.md): the only place per-flow state
 * is read or written. A steady slot never comes here. In a slot in
 * transition a new connection goes to the slot's current backend, one from
 * before the change to its previous backend, and each is pinned in
 * l4lb_flows so that it stays there; include/l4lb.h has the rules in short.
 */
#ifndef L4LB_FLOWS_H
#define L4LB_FLOWS_H

#include "maps.h"
#include "parse.h"

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

/* Whether backend number `number` is a backend of service `service`:
 * numbers above L4LB_MAX_BACKENDS find no entry.
 */
static __always_inline struct l4lb_backend *service_backend(__u32 number, __u32 service)
{
	struct l4lb_backend *backend = bpf_map_lookup_elem(&l4lb_backends, &number);

	if (!backend || !(backend->flags & L4LB_BACKEND_ACTIVE) || backend->service != service)
		return NULL;
	return backend;
}

/* Whether a pin still holds: made in this slot, and its backend number
 * still names the backend it was pinned to (backend numbers are reused: a
 * removed backend's flows must not follow its number).
 */
static __always_inline int pin_holds(const struct l4lb_flow *pin, __u32 service, __u32 slot)
{
	struct l4lb_backend *backend;

	if (pin->slot != slot)
		return 0;
	backend = service_backend(pin->backend, service);
	return backend && backend->family == pin->family && addr16_equal(backend->addr, pin->addr);
}

/* Whether a packet without a pin belongs to a flow from before the slot's
 * change: any TCP packet but a SYN, and UDP while the service's grace lasts
 * (UDP has no handshake to tell a new flow by).
 */
static __always_inline int from_before_change(const struct packet *pkt, const struct l4lb_service *service,
					      const struct l4lb_config *config)
{
	if (pkt->syn)
		return 0;
	if (pkt->vip.proto != IPPROTO_UDP)
		return 1;
	/* Signed: a tick behind the change (no sweep since) is inside the grace. */
	return (__s32)(config->clock - service->changed) < (__s32)service->udp_grace;
}

/* Pins the flow to `backend` (number `number`); returns the event's
 * counter. The value is built on the stack and handed to the update helper:
 * offload takes no plain store into a map value.
 */
static __always_inline __u32 pin_flow(const struct l4lb_flow_key *key, const struct l4lb_backend *backend,
				      __u32 number, __u32 slot, __u32 clock, int had_entry)
{
	struct l4lb_flow pin = {};

	addr16_copy(pin.addr, backend->addr);
	pin.backend = number;
	pin.slot = slot;
	pin.seen = clock;
	pin.family = backend->family;
	if (bpf_map_update_elem(&l4lb_flows, key, &pin, BPF_ANY))
		return L4LB_CNT_FLOW_TABLE_FULL;
	return had_entry ? L4LB_CNT_FLOW_REPINNED : L4LB_CNT_FLOW_PINNED;
}

/* The backend number for a packet in a slot in transition (`word`, at
 * index `slot` of l4lb_tables). *event is set to the FLOW_* counter of a pin
 * written, or left alone.
 */
static __always_inline __u32 transition_backend(const struct l4lb_flow_key *key, const struct packet *pkt,
						const struct l4lb_service *service, __u32 service_number,
						const struct l4lb_config *config, __u32 slot, __u32 word,
						__u32 *event)
{
	__u32 current = word & L4LB_SLOT_BACKEND_MASK;
	__u32 previous = (word >> L4LB_SLOT_PREVIOUS_SHIFT) & L4LB_SLOT_PREVIOUS_MASK;
	__u32 target = current, clock = config->clock;
	struct l4lb_flow *pin = bpf_map_lookup_elem(&l4lb_flows, key);
	struct l4lb_backend *backend;

	if (pin && !pkt->syn && pin_holds(pin, service_number, slot)) {
		/* Read before the pin is written again: a preallocated hash map
		 * reuses a replaced element at once.
		 */
		target = pin->backend;
		/* Once per tick. The driver build stores it; the object offload
		 * loads writes the pin again (the NFP takes no plain store into
		 * a map value, and a word it reads it may not also add to).
		 */
		if (pin->seen != clock) {
#ifdef L4LB_DRIVER_BUILD
			pin->seen = clock;
#else
			struct l4lb_flow fresh = *pin;

			fresh.seen = clock;
			bpf_map_update_elem(&l4lb_flows, key, &fresh, BPF_EXIST);
#endif
		}
		return target;
	}
	if (from_before_change(pkt, service, config) && service_backend(previous, service_number))
		target = previous;
	/* Pinned only to a backend the packet can go to. */
	backend = service_backend(target, service_number);
	if (backend && !pkt->icmp_error)
		*event = pin_flow(key, backend, target, slot, clock, pin != NULL);
	return target;
}

#endif /* L4LB_FLOWS_H */
