//! Reading and writing the maps of a loaded l4lb program, found by name among
//! the program's maps (those helpers serve the decap program too). Updates are
//! ordered so that traffic never meets a slot that leads nowhere (entries are
//! cleared only after an RCU grace period), and are rolled back if the kernel
//! refuses a write.

use std::net::Ipv4Addr;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::bpf::{self, Backend, BackendStats, Config, MAX_BACKENDS};
use crate::destinations::Destination;
use crate::discover::AttachedProgram;
use crate::table::{Plan, TableState};

/// The maps of one loaded l4lb program.
pub struct LbMaps {
    config: MapHandle,
    backends: MapHandle,
    slots: MapHandle,
    backend_stats: MapHandle,
    counters: MapHandle,
}

fn key(index: u32) -> [u8; 4] {
    index.to_ne_bytes()
}

/// The maps of one loaded program, to be taken by name (the kernel keeps up
/// to 15 characters of a name).
pub struct ProgramMaps<'a> {
    program: &'a AttachedProgram,
    handles: Vec<MapHandle>,
}

impl<'a> ProgramMaps<'a> {
    pub fn open(program: &'a AttachedProgram) -> Result<Self> {
        let mut handles = Vec::new();
        for &id in &program.map_ids {
            let handle = MapHandle::from_map_id(id).with_context(|| format!("opening map id {id} of program {program}"))?;
            handles.push(handle);
        }
        Ok(ProgramMaps { program, handles })
    }

    pub fn take(&mut self, name: &str) -> Result<MapHandle> {
        let position = self
            .handles
            .iter()
            .position(|h| h.name().to_string_lossy() == name)
            .ok_or_else(|| anyhow!("program {} has no map `{name}`: not an l4lb object of this version", self.program))?;
        Ok(self.handles.swap_remove(position))
    }
}

/// Refuses a map whose value size or entry count differs from this build's.
pub fn check_shape(map: &MapHandle, value_size: usize, entries: usize) -> Result<()> {
    if map.value_size() as usize != value_size || map.max_entries() as usize != entries {
        bail!(
            "map `{}` has value size {} and {} entries, this l4lb expects {value_size} and {entries}: object and binary are from different versions",
            map.name().to_string_lossy(), map.value_size(), map.max_entries()
        );
    }
    Ok(())
}

/// The first `count` entries of an array of u64 counters, summed over CPUs
/// when it is per-CPU.
pub fn read_u64_counters(map: &MapHandle, count: usize) -> Result<Vec<u64>> {
    (0..count as u32)
        .map(|index| {
            Ok(lookup_counter(map, index)?
                .iter()
                .map(|bytes| bpf::value_from::<u64>(bytes).unwrap_or(0))
                .sum())
        })
        .collect()
}

impl LbMaps {
    /// Opens the program's maps by name.
    pub fn open(program: &AttachedProgram) -> Result<Self> {
        let mut maps = ProgramMaps::open(program)?;
        let maps = LbMaps {
            config: maps.take(bpf::MAP_CONFIG)?,
            backends: maps.take(bpf::MAP_BACKENDS)?,
            slots: maps.take(bpf::MAP_SLOTS)?,
            backend_stats: maps.take(bpf::MAP_BACKEND_STATS)?,
            counters: maps.take(bpf::MAP_COUNTERS)?,
        };
        maps.check_layout()?;
        Ok(maps)
    }

    /// Refuses maps whose sizes differ from this build's layouts.
    fn check_layout(&self) -> Result<()> {
        check_shape(&self.config, size_of::<Config>(), 1)?;
        check_shape(&self.backends, size_of::<Backend>(), MAX_BACKENDS)?;
        check_shape(&self.slots, size_of::<u32>(), bpf::TABLE_SIZE)?;
        check_shape(&self.backend_stats, size_of::<BackendStats>(), MAX_BACKENDS)?;
        check_shape(&self.counters, size_of::<u64>(), bpf::COUNTER_NAMES.len())
    }

    /// True when the counters are per-CPU (driver and generic mode via `l4lb attach`).
    pub fn per_cpu_counters(&self) -> bool {
        self.counters.map_type() == MapType::PercpuArray
    }

    pub fn read_config(&self) -> Result<Config> {
        let bytes = lookup(&self.config, 0)?;
        bpf::value_from(&bytes).ok_or_else(|| anyhow!("map `{}`: short value", bpf::MAP_CONFIG))
    }

    pub fn write_config(&self, config: &Config) -> Result<()> {
        self.config
            .update(&key(0), bpf::value_bytes(config), MapFlags::ANY)
            .with_context(|| format!("writing map `{}`", bpf::MAP_CONFIG))
    }

    /// Backends and lookup table as the datapath sees them.
    pub fn read_table(&self) -> Result<TableState> {
        Ok(TableState { backends: self.read_backends()?, slots: read_u32_array(&self.slots)? })
    }

    /// Destination per backend number (None where the entry is not active).
    pub fn read_backends(&self) -> Result<Vec<Option<Destination>>> {
        (0..MAX_BACKENDS as u32)
            .map(|number| {
                let backend: Backend = bpf::value_from(&lookup(&self.backends, number)?)
                    .ok_or_else(|| anyhow!("map `{}`: short value", bpf::MAP_BACKENDS))?;
                Ok(backend_destination(&backend))
            })
            .collect()
    }

    /// Carries out a plan: fresh counters, then backend entries, then slots,
    /// then the entries no slot uses. Each step leaves every slot leading to
    /// an active destination. If the kernel refuses a write, what was written
    /// is put back as it was and the error returned.
    pub fn apply(&self, current: &TableState, plan: &Plan) -> Result<()> {
        let result = self.apply_steps(plan);
        if let Err(err) = result {
            let restore = self.restore(current, plan);
            return match restore {
                Ok(()) => Err(err.context("the update was rolled back; the maps are as they were")),
                Err(restore_err) => Err(err.context(format!("rolling back failed too: {restore_err:#}"))),
            };
        }
        Ok(())
    }

    fn apply_steps(&self, plan: &Plan) -> Result<()> {
        for &number in &plan.fresh_backends {
            self.zero_backend_stats(number)?;
        }
        for (number, destination) in &plan.backend_writes {
            self.write_backend(*number, Some(destination))?;
        }
        write_u32_entries(&self.slots, &plan.slot_writes)?;
        if !plan.backend_clears.is_empty() {
            wait_for_datapath_readers();
        }
        for &number in &plan.backend_clears {
            self.write_backend(number, None)?;
            self.zero_backend_stats(number)?;
        }
        Ok(())
    }

    fn restore(&self, current: &TableState, plan: &Plan) -> Result<()> {
        let slots: Vec<(u32, u32)> = plan.slot_writes.iter().map(|&(slot, _)| (slot, current.slots[slot as usize])).collect();
        // Entries a restored slot may point to must be active before the slot moves back.
        for number in plan.backend_writes.iter().map(|w| w.0).chain(plan.backend_clears.iter().copied()) {
            if let Some(destination) = &current.backends[number as usize] {
                self.write_backend(number, Some(destination))?;
            }
        }
        write_u32_entries(&self.slots, &slots)?;
        wait_for_datapath_readers();
        for (number, _) in &plan.backend_writes {
            if current.backends[*number as usize].is_none() {
                self.write_backend(*number, None)?;
            }
        }
        Ok(())
    }

    fn write_backend(&self, number: u32, destination: Option<&Destination>) -> Result<()> {
        let backend = match destination {
            Some(d) => Backend {
                addr: u32::from_ne_bytes(d.addr.octets()),
                mac: d.mac,
                flags: bpf::consts::L4LB_BACKEND_ACTIVE as u16,
            },
            None => Backend::default(),
        };
        self.backends
            .update(&key(number), bpf::value_bytes(&backend), MapFlags::ANY)
            .with_context(|| format!("writing entry {number} of map `{}`", bpf::MAP_BACKENDS))
    }

    fn zero_backend_stats(&self, number: u32) -> Result<()> {
        let zero = vec![0u8; size_of::<BackendStats>()];
        update_counter(&self.backend_stats, number, &zero)
    }

    /// Packets and bytes per backend number, summed over CPUs.
    pub fn read_backend_stats(&self) -> Result<Vec<BackendStats>> {
        (0..MAX_BACKENDS as u32)
            .map(|number| {
                let mut total = BackendStats::default();
                for bytes in lookup_counter(&self.backend_stats, number)? {
                    let part: BackendStats = bpf::value_from(&bytes).unwrap_or_default();
                    total.packets += part.packets;
                    total.bytes += part.bytes;
                }
                Ok(total)
            })
            .collect()
    }

    /// The global counters, indexed like COUNTER_NAMES, summed over CPUs.
    pub fn read_counters(&self) -> Result<Vec<u64>> {
        read_u64_counters(&self.counters, bpf::COUNTER_NAMES.len())
    }

    /// Every byte of every map, in a fixed order: for before/after comparisons.
    pub fn dump(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for map in [&self.config, &self.backends, &self.slots] {
            for index in 0..map.max_entries() {
                out.extend(lookup(map, index)?);
            }
        }
        for map in [&self.backend_stats, &self.counters] {
            for index in 0..map.max_entries() {
                out.extend(lookup_counter(map, index)?.concat());
            }
        }
        Ok(out)
    }
}

/// Returns once every run of the datapath that may have read a slot before
/// the last slot writes has finished, so that a backend entry no slot points
/// to any more can be cleared without a packet in flight still reading it.
/// XDP programs run inside RCU read-side sections, and
/// membarrier(MEMBARRIER_CMD_GLOBAL) waits for an RCU grace period
/// (synchronize_rcu). Where the kernel refuses it (nohz_full), a pause far
/// longer than any program run stands in.
fn wait_for_datapath_readers() {
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_membarrier, nix::libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The destination an active backend entry holds.
fn backend_destination(backend: &Backend) -> Option<Destination> {
    (u32::from(backend.flags) & bpf::consts::L4LB_BACKEND_ACTIVE != 0).then(|| Destination {
        addr: Ipv4Addr::from(backend.addr.to_ne_bytes()),
        mac: backend.mac,
    })
}

fn lookup(map: &MapHandle, index: u32) -> Result<Vec<u8>> {
    map.lookup(&key(index), MapFlags::ANY)
        .with_context(|| format!("reading entry {index} of map `{}`", map.name().to_string_lossy()))?
        .ok_or_else(|| anyhow!("map `{}` has no entry {index}", map.name().to_string_lossy()))
}

/// A counter entry: one value per CPU for per-CPU maps, else a single value.
fn lookup_counter(map: &MapHandle, index: u32) -> Result<Vec<Vec<u8>>> {
    if map.map_type() == MapType::PercpuArray {
        map.lookup_percpu(&key(index), MapFlags::ANY)
            .with_context(|| format!("reading entry {index} of map `{}`", map.name().to_string_lossy()))?
            .ok_or_else(|| anyhow!("map `{}` has no entry {index}", map.name().to_string_lossy()))
    } else {
        Ok(vec![lookup(map, index)?])
    }
}

fn update_counter(map: &MapHandle, index: u32, value: &[u8]) -> Result<()> {
    let result = if map.map_type() == MapType::PercpuArray {
        let cpus = libbpf_rs::num_possible_cpus().context("counting possible CPUs")?;
        map.update_percpu(&key(index), &vec![value.to_vec(); cpus], MapFlags::ANY)
    } else {
        map.update(&key(index), value, MapFlags::ANY)
    };
    result.with_context(|| format!("writing entry {index} of map `{}`", map.name().to_string_lossy()))
}

/// A whole u32 array, in one batch where the kernel allows (not offloaded maps).
fn read_u32_array(map: &MapHandle) -> Result<Vec<u32>> {
    let entries = map.max_entries() as usize;
    if let Ok(batches) = map.lookup_batch(entries as u32, MapFlags::ANY, MapFlags::ANY) {
        let mut values = vec![0u32; entries];
        let mut seen = 0;
        for (k, v) in batches {
            let (Ok(k), Ok(v)) = (<[u8; 4]>::try_from(k.as_slice()), <[u8; 4]>::try_from(v.as_slice())) else { break };
            if let Some(slot) = values.get_mut(u32::from_ne_bytes(k) as usize) {
                *slot = u32::from_ne_bytes(v);
                seen += 1;
            }
        }
        if seen == entries {
            return Ok(values);
        }
    }
    (0..entries as u32)
        .map(|index| {
            let bytes = lookup(map, index)?;
            Ok(u32::from_ne_bytes(bytes[..4].try_into().context("short value")?))
        })
        .collect()
}

/// Writes (index, value) pairs of a u32 array, batched where possible. A
/// batch is one syscall, not one transaction; each entry changes atomically.
fn write_u32_entries(map: &MapHandle, entries: &[(u32, u32)]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<u8> = entries.iter().flat_map(|(k, _)| k.to_ne_bytes()).collect();
    let values: Vec<u8> = entries.iter().flat_map(|(_, v)| v.to_ne_bytes()).collect();
    if map.update_batch(&keys, &values, entries.len() as u32, MapFlags::ANY, MapFlags::ANY).is_ok() {
        return Ok(());
    }
    for (index, value) in entries {
        map.update(&key(*index), &value.to_ne_bytes(), MapFlags::ANY)
            .with_context(|| format!("writing entry {index} of map `{}`", map.name().to_string_lossy()))?;
    }
    Ok(())
}
