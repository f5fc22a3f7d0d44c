//! Slots in transition (docs/transitions.md), pure: the slot word the
//! datapath reads, what an apply makes of a slot whose backend changes
//! ([`next_word`]), and what a round of `l4lb settle` does ([`sweep`]).
//! Nothing here touches a map.

use std::collections::{BTreeMap, BTreeSet};

use crate::bpf::consts;

pub const EMPTY: u32 = consts::L4LB_SLOT_EMPTY;
const TRANSITION: u32 = consts::L4LB_SLOT_TRANSITION;
const BACKEND_MASK: u32 = consts::L4LB_SLOT_BACKEND_MASK;
const PREVIOUS_SHIFT: u32 = consts::L4LB_SLOT_PREVIOUS_SHIFT;
const PREVIOUS_MASK: u32 = consts::L4LB_SLOT_PREVIOUS_MASK;

/// One slot of l4lb_tables, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Empty,
    /// Every packet to this backend number.
    Steady(u32),
    /// New flows to `current`, flows from before the change to `previous`
    /// (pins decide for the flows that have one).
    Transition {
        current: u32,
        previous: u32,
    },
}

impl Slot {
    pub fn decode(word: u32) -> Slot {
        if word == EMPTY {
            Slot::Empty
        } else if word & TRANSITION != 0 {
            Slot::Transition { current: word & BACKEND_MASK, previous: (word >> PREVIOUS_SHIFT) & PREVIOUS_MASK }
        } else {
            Slot::Steady(word)
        }
    }

    pub fn encode(self) -> u32 {
        match self {
            Slot::Empty => EMPTY,
            Slot::Steady(n) => n,
            Slot::Transition { current, previous } => current | TRANSITION | (previous << PREVIOUS_SHIFT),
        }
    }

    /// A slot from its current backend number (EMPTY for none) and, in
    /// transition, its previous one: how `state::RunningService` holds it.
    pub fn of(current: u32, previous: Option<u32>) -> Slot {
        match previous {
            _ if current == EMPTY => Slot::Empty,
            Some(previous) => Slot::Transition { current, previous },
            None => Slot::Steady(current),
        }
    }

    /// The backend number new flows get (EMPTY for none).
    pub fn current(self) -> u32 {
        match self {
            Slot::Empty => EMPTY,
            Slot::Steady(n) | Slot::Transition { current: n, .. } => n,
        }
    }

    pub fn previous(self) -> Option<u32> {
        match self {
            Slot::Transition { previous, .. } => Some(previous),
            _ => None,
        }
    }
}

/// A service's table split as `state::RunningService` holds it: the current
/// backend number of every slot, and the slots in transition with their
/// previous backend.
pub fn split(words: &[u32]) -> (Vec<u32>, BTreeMap<u32, u32>) {
    let mut previous = BTreeMap::new();
    let current = words
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let slot = Slot::decode(w);
            if let Some(p) = slot.previous() {
                previous.insert(i as u32, p);
            }
            slot.current()
        })
        .collect();
    (current, previous)
}

/// The words of a table from its current numbers and transitions.
pub fn join(current: &[u32], previous: &BTreeMap<u32, u32>) -> Vec<u32> {
    current.iter().enumerate().map(|(i, &c)| Slot::of(c, previous.get(&(i as u32)).copied()).encode()).collect()
}

/// What an apply makes of a slot of a tracked service: `old` as it was,
/// `current` the backend number the new table gives it, `stays(n)` whether
/// old backend number `n` names a backend that is still in the service
/// after the apply (same address, any weight).
///
/// * steady A, A again: steady.
/// * steady A -> B with A staying: in transition, previous A.
/// * steady A -> B with A gone (or the slot was empty): steady B.
/// * in transition (current B, previous A) -> C: stays in transition (its
///   pins may still be needed), previous the oldest backend still in the
///   service: A, else B, else C itself (then only the pins matter).
/// * no backend now: empty.
pub fn next_slot(old: Slot, current: u32, stays: impl Fn(u32) -> bool) -> Slot {
    if current == EMPTY {
        return Slot::Empty;
    }
    match old {
        Slot::Empty => Slot::Steady(current),
        Slot::Steady(a) if a == current => old,
        Slot::Steady(a) if stays(a) => Slot::Transition { current, previous: a },
        Slot::Steady(_) => Slot::Steady(current),
        Slot::Transition { current: b, previous: a } => {
            let previous = if stays(a) {
                a
            } else if stays(b) {
                b
            } else {
                current
            };
            Slot::Transition { current, previous }
        }
    }
}

/// One pin of l4lb_flows as the sweep sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinView {
    /// Index in l4lb_tables of the slot it was made in.
    pub slot: u32,
    /// Backend number it names.
    pub backend: u32,
    /// Tick of its last packet.
    pub seen: u32,
}

/// A service's transition settings and clock, as the sweep needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceClock {
    /// Tick of the last apply that put slots of it in transition.
    pub changed: u32,
    pub idle_timeout: u32,
}

/// What one round of the sweep decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Slots (index in l4lb_tables) whose transition ends: written steady.
    pub end: BTreeSet<u32>,
    /// Pins to delete, by their position in the input.
    pub delete: Vec<usize>,
    /// Of those: idle longer than their service's idle timeout.
    pub idle: usize,
    /// Of those: made in a slot that is not (or no longer) in transition.
    pub stale: usize,
}

/// A round of `l4lb settle`, judged at tick `tick`: the tick the previous
/// round (or apply) wrote, which every pin seen since carries. `slots`:
/// every slot in transition (index in l4lb_tables -> (service number,
/// current backend)); `services` by number; `pins` the flow table.
///
/// A pin is idle when `tick - seen >= idle_timeout`. A slot's transition
/// ends when its service changed at least `idle_timeout` ago and none of
/// its pins that name another backend than the current one is still alive:
/// then its remaining pins go with it. Pins of slots not in transition are
/// stale (left over from a transition that ended while a packet wrote one).
pub fn sweep(
    tick: u32,
    slots: &BTreeMap<u32, (u32, u32)>,
    services: &BTreeMap<u32, ServiceClock>,
    pins: &[PinView],
) -> Sweep {
    let mut out = Sweep::default();
    let mut held: BTreeSet<u32> = BTreeSet::new();
    let mut alive: Vec<usize> = Vec::new();
    for (i, pin) in pins.iter().enumerate() {
        let Some(&(service, current)) = slots.get(&pin.slot) else {
            out.delete.push(i);
            out.stale += 1;
            continue;
        };
        let idle_timeout = services.get(&service).map_or(0, |s| s.idle_timeout);
        if tick.wrapping_sub(pin.seen) as i32 >= idle_timeout as i32 {
            out.delete.push(i);
            out.idle += 1;
            continue;
        }
        if pin.backend != current {
            held.insert(pin.slot);
        }
        alive.push(i);
    }
    for (&slot, &(service, _)) in slots {
        let Some(clock) = services.get(&service) else { continue };
        let quiet = tick.wrapping_sub(clock.changed) as i32 >= clock.idle_timeout as i32;
        if quiet && !held.contains(&slot) {
            out.end.insert(slot);
        }
    }
    out.delete.extend(alive.into_iter().filter(|&i| out.end.contains(&pins[i].slot)));
    out.delete.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_steady_words_are_bare_numbers() {
        for slot in [
            Slot::Empty,
            Slot::Steady(0),
            Slot::Steady(32767),
            Slot::Transition { current: 7, previous: 32767 },
            Slot::Transition { current: 32767, previous: 0 },
        ] {
            assert_eq!(Slot::decode(slot.encode()), slot);
        }
        assert_eq!(Slot::Steady(12).encode(), 12);
        assert!(Slot::Transition { current: 32767, previous: 32767 }.encode() != EMPTY);
        let words = [3, Slot::Transition { current: 1, previous: 3 }.encode(), EMPTY];
        let (current, previous) = split(&words);
        assert_eq!(current, [3, 1, EMPTY]);
        assert_eq!(previous, BTreeMap::from([(1, 3)]));
        assert_eq!(join(&current, &previous), words);
    }

    #[test]
    fn a_change_puts_a_slot_in_transition_only_while_its_old_backend_stays() {
        let all = |_: u32| true;
        let none = |_: u32| false;
        assert_eq!(next_slot(Slot::Steady(1), 1, all), Slot::Steady(1));
        assert_eq!(next_slot(Slot::Steady(1), 2, all), Slot::Transition { current: 2, previous: 1 });
        assert_eq!(next_slot(Slot::Steady(1), 2, none), Slot::Steady(2));
        assert_eq!(next_slot(Slot::Empty, 2, all), Slot::Steady(2));
        assert_eq!(next_slot(Slot::Steady(1), EMPTY, all), Slot::Empty);
    }

    #[test]
    fn a_slot_changed_again_keeps_the_oldest_backend_still_in_the_service() {
        let t = |current, previous| Slot::Transition { current, previous };
        // A=1 -> B=2 -> C=3: A stays the previous one while it is in the service.
        assert_eq!(next_slot(t(2, 1), 3, |_| true), t(3, 1));
        // ... back to A: still in transition (pins to B).
        assert_eq!(next_slot(t(2, 1), 1, |_| true), t(1, 1));
        // A gone: B, whose connections are pinned, becomes the previous one.
        assert_eq!(next_slot(t(2, 1), 3, |n| n != 1), t(3, 2));
        // Both gone: only pins matter.
        assert_eq!(next_slot(t(2, 1), 3, |n| n == 3), t(3, 3));
        // Nothing changed.
        assert_eq!(next_slot(t(2, 1), 2, |_| true), t(2, 1));
    }

    fn pin(slot: u32, backend: u32, seen: u32) -> PinView {
        PinView { slot, backend, seen }
    }

    #[test]
    fn a_transition_ends_once_its_pins_to_other_backends_are_idle() {
        // Service 0 changed at tick 100, idle timeout 30; slots 5 and 6 in
        // transition, current backends 2 and 3.
        let slots = BTreeMap::from([(5, (0, 2)), (6, (0, 3))]);
        let services = BTreeMap::from([(0, ServiceClock { changed: 100, idle_timeout: 30 })]);
        let pins = [pin(5, 1, 125), pin(6, 3, 125), pin(6, 1, 101), pin(9, 1, 125)];
        // Too early: nothing ends; pin 3 is stale (slot 9 not in transition).
        let early = sweep(120, &slots, &services, &pins);
        assert_eq!((early.end.len(), early.delete.clone(), early.stale, early.idle), (0, vec![3], 1, 0));
        // At 131: the service is quiet; slot 5's pin to backend 1 is alive,
        // slot 6's pin to 1 is idle and its other pin names the current
        // backend: slot 6 ends, with its pins.
        let later = sweep(131, &slots, &services, &pins);
        assert_eq!(later.end, BTreeSet::from([6]));
        assert_eq!(later.delete, vec![1, 2, 3]);
        assert_eq!((later.idle, later.stale), (1, 1));
        // At 155 slot 5's pin is idle too.
        assert_eq!(sweep(155, &slots, &services, &pins).end, BTreeSet::from([5, 6]));
    }

    #[test]
    fn the_tick_may_wrap() {
        // Changed 10 s before the tick wrapped, idle timeout 30.
        let slots = BTreeMap::from([(5, (0, 2)), (6, (0, 2))]);
        let services = BTreeMap::from([(0, ServiceClock { changed: u32::MAX - 9, idle_timeout: 30 })]);
        let pins = [pin(5, 1, u32::MAX - 4), pin(6, 1, u32::MAX - 9)];
        // 15 s after the change: too early.
        let early = sweep(5, &slots, &services, &pins);
        assert_eq!((early.end.len(), early.delete.len()), (0, 0));
        // 30 s after: slot 6's pin (seen at the change) is idle, slot 5's
        // (seen 5 s later) is not.
        let later = sweep(20, &slots, &services, &pins);
        assert_eq!((later.end, later.delete, later.idle), (BTreeSet::from([6]), vec![1], 1));
        assert_eq!(sweep(25, &slots, &services, &pins).end, BTreeSet::from([5, 6]));
    }

    #[test]
    fn pins_to_the_current_backend_do_not_hold_a_transition() {
        // Slot 5: current 2, previous 1. Its pins to 2 (new connections)
        // are fresh, yet the transition ends with them once the service is
        // quiet: they are where the steady slot sends them anyway.
        let slots = BTreeMap::from([(5, (0, 2))]);
        let services = BTreeMap::from([(0, ServiceClock { changed: 100, idle_timeout: 30 })]);
        let pins = [pin(5, 2, 139), pin(5, 2, 140)];
        let s = sweep(140, &slots, &services, &pins);
        assert_eq!((s.end, s.delete, s.idle, s.stale), (BTreeSet::from([5]), vec![0, 1], 0, 0));
        // A service changed again later is not quiet: nothing ends.
        let again = BTreeMap::from([(0, ServiceClock { changed: 120, idle_timeout: 30 })]);
        assert!(sweep(140, &slots, &again, &pins).end.is_empty());
    }

    #[test]
    fn pins_ahead_of_the_tick_are_not_idle() {
        let slots = BTreeMap::from([(5, (0, 2))]);
        let services = BTreeMap::from([(0, ServiceClock { changed: 100, idle_timeout: 30 })]);
        // Two CPUs raced: seen is ahead of the tick the sweep judges at.
        let s = sweep(140, &slots, &services, &[pin(5, 1, 150)]);
        assert!(s.end.is_empty() && s.delete.is_empty());
    }
}
