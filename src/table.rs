//! Lookup-table computation: which backend number each destination gets and
//! which backend each slot points to. Pure functions: the map writes that
//! carry a plan out live in `maps.rs`.
//!
//! The fill is even (slot counts differ by at most one) and moves as few slots
//! as it can: a destination that stays keeps its backend number (so its
//! counters keep counting) and keeps its slots up to its new share, so only
//! the flows that must move do.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::bpf::{MAX_BACKENDS, SLOT_EMPTY};
use crate::destinations::Destination;

/// What the maps hold now, as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// Indexed by backend number; None where the entry is not active.
    pub backends: Vec<Option<Destination>>,
    /// Backend number per slot (SLOT_EMPTY or an inactive number: unset).
    pub slots: Vec<u32>,
}

/// The writes that turn one TableState into another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Backend entries to write (new destinations, or changed MACs).
    pub backend_writes: Vec<(u32, Destination)>,
    /// Backend numbers taken by a new destination: their counters start at 0.
    pub fresh_backends: Vec<u32>,
    /// Slots whose backend changes.
    pub slot_writes: Vec<(u32, u32)>,
    /// Backend entries no slot points to any more: cleared last.
    pub backend_clears: Vec<u32>,
    /// The state once every write is done.
    pub target: TableState,
}

impl TableState {
    pub fn empty(table_size: usize) -> Self {
        TableState { backends: vec![None; MAX_BACKENDS], slots: vec![SLOT_EMPTY; table_size] }
    }

    /// The active destination a slot points to, if any.
    pub fn slot_backend(&self, slot: usize) -> Option<(u32, &Destination)> {
        let number = *self.slots.get(slot)?;
        let destination = self.backends.get(number as usize)?.as_ref()?;
        Some((number, destination))
    }

    /// Slots per backend number (only slots pointing to active entries).
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.backends.len()];
        for slot in 0..self.slots.len() {
            if let Some((number, _)) = self.slot_backend(slot) {
                counts[number as usize] += 1;
            }
        }
        counts
    }

    /// Slots that lead to no active destination.
    pub fn unset_slots(&self) -> usize {
        (0..self.slots.len()).filter(|&slot| self.slot_backend(slot).is_none()).count()
    }
}

/// Plans the update from `current` to the destinations `wanted` (at most
/// MAX_BACKENDS, addresses unique: `destinations::parse` guarantees both).
pub fn plan(current: &TableState, wanted: &[Destination]) -> Plan {
    assert!(!wanted.is_empty() && wanted.len() <= current.backends.len());
    let numbers = assign_numbers(current, wanted);

    let mut target_backends = vec![None; current.backends.len()];
    let mut backend_writes = Vec::new();
    let mut fresh_backends = Vec::new();
    for (destination, &number) in wanted.iter().zip(&numbers) {
        target_backends[number as usize] = Some(*destination);
        match &current.backends[number as usize] {
            Some(old) if old.addr == destination.addr => {
                if old.mac != destination.mac {
                    backend_writes.push((number, *destination));
                }
            }
            _ => {
                backend_writes.push((number, *destination));
                fresh_backends.push(number);
            }
        }
    }

    let target_slots = fill_slots(current, &numbers);
    let slot_writes = target_slots
        .iter()
        .enumerate()
        .filter(|&(slot, &number)| current.slots[slot] != number)
        .map(|(slot, &number)| (slot as u32, number))
        .collect();
    let backend_clears = (0..current.backends.len() as u32)
        .filter(|&n| current.backends[n as usize].is_some() && target_backends[n as usize].is_none())
        .collect();

    Plan {
        backend_writes,
        fresh_backends,
        slot_writes,
        backend_clears,
        target: TableState { backends: target_backends, slots: target_slots },
    }
}

/// Backend number per wanted destination: its current number if it stays,
/// else the lowest number not in use. Numbers of destinations being removed
/// are reused only when no never-used number is left, because until the slots
/// move, traffic still reaches those numbers.
fn assign_numbers(current: &TableState, wanted: &[Destination]) -> Vec<u32> {
    let current_number: HashMap<Ipv4Addr, u32> = current
        .backends
        .iter()
        .enumerate()
        .filter_map(|(n, b)| b.map(|b| (b.addr, n as u32)))
        .collect();
    let staying: Vec<Option<u32>> = wanted.iter().map(|d| current_number.get(&d.addr).copied()).collect();
    let mut taken = vec![false; current.backends.len()];
    for number in staying.iter().flatten() {
        taken[*number as usize] = true;
    }
    let unused = (0..current.backends.len()).filter(|&n| current.backends[n].is_none());
    let removed = (0..current.backends.len()).filter(|&n| current.backends[n].is_some());
    let mut free = unused.chain(removed).filter(|&n| !taken[n]);
    staying
        .into_iter()
        .map(|number| number.unwrap_or_else(|| free.next().expect("fewer destinations than backend entries") as u32))
        .collect()
}

/// Even fill: every number gets `table / n` slots, and `table % n` of them
/// one more (those that hold the most slots now, so fewer slots move).
/// Slots keep their number while it stays and is under its share; the freed
/// slots are dealt round robin to the numbers still short.
fn fill_slots(current: &TableState, numbers: &[u32]) -> Vec<u32> {
    let table = current.slots.len();
    let n = numbers.len();
    let held = current.slot_counts();
    let mut by_holding: Vec<usize> = (0..n).collect();
    by_holding.sort_by_key(|&i| std::cmp::Reverse(held[numbers[i] as usize]));
    let mut share = vec![table / n; current.backends.len()];
    for &i in by_holding.iter().take(table % n) {
        share[numbers[i] as usize] += 1;
    }
    let mut wanted = vec![false; current.backends.len()];
    for &number in numbers {
        wanted[number as usize] = true;
    }

    let mut slots = vec![SLOT_EMPTY; table];
    let mut kept = vec![0usize; current.backends.len()];
    for (slot, &number) in current.slots.iter().enumerate() {
        let is_live = current.slot_backend(slot).is_some();
        if is_live && wanted[number as usize] && kept[number as usize] < share[number as usize] {
            kept[number as usize] += 1;
            slots[slot] = number;
        }
    }

    let mut short: Vec<u32> = numbers.iter().copied().filter(|&nb| kept[nb as usize] < share[nb as usize]).collect();
    let mut turn = 0;
    for slot in slots.iter_mut().filter(|s| **s == SLOT_EMPTY) {
        while kept[short[turn] as usize] >= share[short[turn] as usize] {
            short.remove(turn);
            if turn >= short.len() {
                turn = 0;
            }
        }
        let number = short[turn];
        *slot = number;
        kept[number as usize] += 1;
        turn = (turn + 1) % short.len();
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(i: u32) -> Destination {
        let [a, b, c, d] = (0x0a00_0000u32 + i).to_be_bytes();
        Destination { addr: Ipv4Addr::new(a, b, c, d), mac: [2, 0, 0, 0, b ^ c, d] }
    }

    fn apply(state: &TableState, wanted: &[Destination]) -> (Plan, TableState) {
        let plan = plan(state, wanted);
        let mut next = state.clone();
        for (n, d) in &plan.backend_writes {
            next.backends[*n as usize] = Some(*d);
        }
        for (slot, n) in &plan.slot_writes {
            next.slots[*slot as usize] = *n;
        }
        for n in &plan.backend_clears {
            next.backends[*n as usize] = None;
        }
        assert_eq!(next, plan.target, "the writes reach the planned state");
        (plan, next)
    }

    fn assert_even(state: &TableState, n: usize) {
        let counts: Vec<usize> = state.slot_counts().into_iter().filter(|&c| c > 0).collect();
        assert_eq!(counts.len(), n);
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "slot counts {min}..{max}");
        assert_eq!(state.unset_slots(), 0);
    }

    #[test]
    fn fills_an_empty_table_round_robin() {
        let wanted: Vec<_> = (0..3).map(dest).collect();
        let (plan, state) = apply(&TableState::empty(8), &wanted);
        assert_eq!(state.slots, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        assert_eq!(plan.fresh_backends, vec![0, 1, 2]);
        assert!(plan.backend_clears.is_empty());
    }

    #[test]
    fn uneven_counts_differ_by_at_most_one() {
        for n in [1, 3, 32, 100, 127, 512] {
            let wanted: Vec<_> = (0..n).map(dest).collect();
            let (_, state) = apply(&TableState::empty(65536), &wanted);
            assert_even(&state, n as usize);
        }
    }

    #[test]
    fn removing_one_destination_moves_only_its_slots() {
        let table = 65536;
        let all: Vec<_> = (0..32).map(dest).collect();
        let (_, before) = apply(&TableState::empty(table), &all);
        let fewer: Vec<_> = all.iter().copied().filter(|d| *d != dest(7)).collect();
        let (plan, after) = apply(&before, &fewer);
        assert_even(&after, 31);
        assert_eq!(plan.slot_writes.len(), table / 32, "only the removed destination's slots move");
        assert_eq!(plan.backend_clears, vec![7]);
        assert!(plan.backend_writes.is_empty());
        for d in &fewer {
            let number = before.backends.iter().position(|b| b.as_ref() == Some(d)).unwrap();
            assert_eq!(after.backends[number], Some(*d), "{d} keeps its number and counters");
        }
    }

    #[test]
    fn adding_one_destination_moves_only_its_share() {
        let table = 65536;
        let all: Vec<_> = (0..32).map(dest).collect();
        let (_, before) = apply(&TableState::empty(table), &all);
        let mut more = all.clone();
        more.push(dest(99));
        let (plan, after) = apply(&before, &more);
        assert_even(&after, 33);
        let share = after.slot_counts()[32];
        assert_eq!(plan.slot_writes.len(), share, "only the new destination's share moves");
        assert_eq!(plan.fresh_backends, vec![32]);
    }

    #[test]
    fn same_file_again_writes_nothing() {
        let all: Vec<_> = (0..100).map(dest).collect();
        let (_, state) = apply(&TableState::empty(65536), &all);
        let plan = plan(&state, &all);
        assert!(plan.backend_writes.is_empty() && plan.slot_writes.is_empty() && plan.backend_clears.is_empty());
    }

    #[test]
    fn mac_change_rewrites_the_entry_in_place() {
        let all: Vec<_> = (0..4).map(dest).collect();
        let (_, state) = apply(&TableState::empty(64), &all);
        let mut changed = all.clone();
        changed[2].mac = [2, 9, 9, 9, 9, 9];
        let (plan, _) = apply(&state, &changed);
        assert_eq!(plan.backend_writes, vec![(2, changed[2])]);
        assert!(plan.fresh_backends.is_empty() && plan.slot_writes.is_empty());
    }

    #[test]
    fn replacing_every_destination_reuses_numbers_only_when_needed() {
        let first: Vec<_> = (0..MAX_BACKENDS as u32).map(dest).collect();
        let (_, state) = apply(&TableState::empty(65536), &first);
        let second: Vec<_> = (1000..1000 + MAX_BACKENDS as u32).map(dest).collect();
        let (plan, after) = apply(&state, &second);
        assert_even(&after, MAX_BACKENDS);
        assert_eq!(plan.fresh_backends.len(), MAX_BACKENDS);
        assert!(plan.backend_clears.is_empty(), "every number was reused");

        let (_, small) = apply(&TableState::empty(64), &[dest(1), dest(2)]);
        let (plan, _) = apply(&small, &[dest(3)]);
        assert_eq!(plan.fresh_backends, vec![2], "a never-used number is preferred");
        assert_eq!(plan.backend_clears, vec![0, 1]);
    }
}
