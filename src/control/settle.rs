//! `l4lb settle`: one round of the sweep that ends transitions
//! (docs/transitions.md), against the kernel's maps. What to do is decided
//! by `transition::sweep` (pure); this module reads the maps, writes the
//! slots that become steady, deletes pins and advances the tick.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle};

use crate::bpf::{self, MAGLEV_SIZE};
use crate::maps::{self, LbMaps};
use crate::transition::{self, PinView, ServiceClock};

/// A tick older than this many seconds was not advanced by a running sweep:
/// pins carry old ticks, idleness cannot be judged from them, and the round
/// only advances the tick.
pub const STALE_TICK: u32 = 10;

/// What a round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// The tick written (seconds of CLOCK_MONOTONIC).
    pub tick: u32,
    /// The tick found, by which idleness was judged; None when it was stale.
    pub judged_at: Option<u32>,
    /// Slots whose transition ended, per service (display name).
    pub ended: BTreeMap<String, usize>,
    /// Slots still in transition afterwards, per service.
    pub open: BTreeMap<String, usize>,
    pub pins_seen: usize,
    pub pins_idle: usize,
    pub pins_stale: usize,
    /// Pins deleted with the transition of their slot.
    pub pins_ended: usize,
    /// How long the walk over the flow table took (without the update
    /// lock), and how long the round then held the lock.
    pub walked: Duration,
    pub locked: Duration,
}

impl fmt::Display for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ended: usize = self.ended.values().sum();
        let open: usize = self.open.values().sum();
        match self.judged_at {
            Some(t) => write!(f, "tick {} (judged at {t}): ", self.tick)?,
            None => write!(f, "tick {} (the tick was stale: nothing judged this round): ", self.tick)?,
        }
        write!(
            f,
            "{ended} slots left their transition, {open} still in transition; pins: {} seen, {} idle and {} stale deleted, {} deleted with their transition",
            self.pins_seen, self.pins_idle, self.pins_stale, self.pins_ended
        )?;
        write!(
            f,
            "; walked in {} ms, then held the update lock {} ms",
            self.walked.as_millis(),
            self.locked.as_millis()
        )?;
        for (service, n) in &self.open {
            write!(f, "\n  {service}: {n} slots in transition")?;
        }
        Ok(())
    }
}

/// One round over `maps` and `flows`. `lock` takes the update lock, which
/// the round holds only to judge and write: the walk over the flow table
/// comes first, without it (in an unoptimized build under the lab's flood a
/// walk took about a second, and every `l4lb apply` meanwhile would wait for
/// it). Judging pins walked a moment before the lock is as safe as judging
/// them under it (the datapath writes pins regardless of the lock): a pin
/// written after the walk belongs to a flow that was silent until then, and
/// a slot an apply changed in between carries that apply's change time in
/// the snapshot read under the lock, so it is not judged idle.
pub fn round<Guard>(maps: &LbMaps, flows: &MapHandle, lock: impl FnOnce() -> Result<Guard>) -> Result<Round> {
    let started = Instant::now();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut pins: Vec<PinView> = Vec::new();
    maps::walk_flows(flows, |key, pin| {
        keys.push(bpf::value_bytes(key).to_vec());
        pins.push(PinView { slot: pin.slot, backend: pin.backend, seen: pin.seen });
    })
    .with_context(|| format!("walking map `{}`", bpf::MAP_FLOWS))?;
    let walked = started.elapsed();
    let _guard = lock()?;
    let locked_at = Instant::now();
    let snapshot = maps.read_snapshot()?;
    let now = snapshot.tick;
    let found = snapshot.config.clock;
    let judged_at = (now.wrapping_sub(found) <= STALE_TICK).then_some(found);
    let mut out = Round { tick: now, judged_at, walked, ..Round::default() };

    let mut slots: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    let mut services: BTreeMap<u32, ServiceClock> = BTreeMap::new();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for s in &snapshot.running.services {
        services.insert(s.number, ServiceClock { changed: s.changed, idle_timeout: s.idle_timeout });
        names.insert(s.number, s.key.to_string());
        let base = s.number * MAGLEV_SIZE as u32;
        for &slot in s.transitions.keys() {
            slots.insert(base + slot, (s.number, s.table[slot as usize]));
        }
    }
    out.pins_seen = pins.len();

    if let Some(at) = judged_at {
        let sweep = transition::sweep(at, &slots, &services, &pins);
        // Steady first: a packet after this write needs no pin.
        let steady: Vec<(u32, u32)> = sweep.end.iter().map(|&index| (index, slots[&index].1)).collect();
        maps.write_slot_words(&steady)?;
        for &index in &sweep.end {
            *out.ended.entry(names[&slots[&index].0].clone()).or_default() += 1;
            slots.remove(&index);
        }
        for &i in &sweep.delete {
            match flows.delete(&keys[i]) {
                Ok(()) => {}
                // The LRU evicted it, or a packet's update raced: gone either way.
                Err(err) if err.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(err) => return Err(err).with_context(|| format!("deleting a pin from map `{}`", bpf::MAP_FLOWS)),
            }
        }
        out.pins_idle = sweep.idle;
        out.pins_stale = sweep.stale;
        out.pins_ended = sweep.delete.len() - sweep.idle - sweep.stale;
    }
    for (service, _) in slots.values() {
        *out.open.entry(names[service].clone()).or_default() += 1;
    }
    // The configuration as the snapshot read it (the update lock is held).
    let mut config = snapshot.config;
    config.clock = now;
    maps.write_config(&config)?;
    out.locked = locked_at.elapsed();
    Ok(out)
}
