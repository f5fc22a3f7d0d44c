//! Reading and writing the maps of a loaded l4lb program, found by name among
//! the program's maps (those helpers serve the decap program too). Whole
//! arrays and tables move in batches (bpf_map_lookup_batch /
//! bpf_map_update_batch, one syscall per up to 64 Ki entries), falling back
//! to one entry at a time where the kernel has no batches (offloaded maps).
//! What is written, and in which order, is `apply`'s business: `LbMaps` is
//! its [`apply::Io`].

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

use crate::apply::{self, MapId, Snapshot, VipEntry};
use std::collections::BTreeMap;

use crate::bpf::{
    self, Backend, Config, FlowKey, FlowPin, Traffic, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, TABLE_ENTRY_SLOTS,
    VIP_SLOTS,
};
use crate::discover::AttachedProgram;
use crate::state::Running;

/// The maps of one loaded l4lb program (names in `bpf::MAP_*`).
pub struct LbMaps {
    pub config: MapHandle,
    pub vips: MapHandle,
    pub services: MapHandle,
    pub tables: MapHandle,
    pub backends: MapHandle,
    pub be_stats: MapHandle,
    pub svc_stats: MapHandle,
    pub counters: MapHandle,
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
            let handle =
                MapHandle::from_map_id(id).with_context(|| format!("opening map id {id} of program {program}"))?;
            handles.push(handle);
        }
        Ok(ProgramMaps { program, handles })
    }

    pub fn take(&mut self, name: &str) -> Result<MapHandle> {
        let position = self.handles.iter().position(|h| h.name().to_string_lossy() == name).ok_or_else(|| {
            anyhow!("program {} has no map `{name}`: not an l4lb object of this version", self.program)
        })?;
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
            Ok(lookup_counter(map, index)?.iter().map(|bytes| bpf::value_from::<u64>(bytes).unwrap_or(0)).sum())
        })
        .collect()
}

impl LbMaps {
    /// Opens the program's maps by name and checks their shapes.
    pub fn open(program: &AttachedProgram) -> Result<Self> {
        let mut maps = ProgramMaps::open(program)?;
        let maps = LbMaps {
            config: maps.take(bpf::MAP_CONFIG)?,
            vips: maps.take(bpf::MAP_VIPS)?,
            services: maps.take(bpf::MAP_SERVICES)?,
            tables: maps.take(bpf::MAP_TABLES)?,
            backends: maps.take(bpf::MAP_BACKENDS)?,
            be_stats: maps.take(bpf::MAP_BACKEND_STATS)?,
            svc_stats: maps.take(bpf::MAP_SERVICE_STATS)?,
            counters: maps.take(bpf::MAP_COUNTERS)?,
        };
        maps.check_layout()?;
        Ok(maps)
    }

    /// Refuses maps whose sizes differ from this build's layouts.
    fn check_layout(&self) -> Result<()> {
        check_shape(&self.config, size_of::<Config>(), 1)?;
        check_shape(&self.vips, size_of::<VipEntry>(), VIP_SLOTS)?;
        check_shape(&self.services, size_of::<bpf::Service>(), MAX_SERVICES)?;
        // Offloaded, the tables map is loaded smaller (attach.rs).
        let tables = if self.tables.max_entries() == bpf::table_entries(MAX_SERVICES) {
            MAX_SERVICES
        } else {
            bpf::OFFLOAD_MAX_SERVICES
        };
        check_shape(&self.tables, size_of::<u32>() * TABLE_ENTRY_SLOTS, bpf::table_entries(tables) as usize)?;
        check_shape(&self.backends, size_of::<Backend>(), MAX_BACKENDS)?;
        check_shape(&self.be_stats, size_of::<Traffic>(), MAX_BACKENDS)?;
        check_shape(&self.svc_stats, size_of::<Traffic>(), MAX_SERVICES)?;
        check_shape(&self.counters, size_of::<u64>(), bpf::COUNTER_NAMES.len())
    }

    /// True when the counters are per-CPU (driver and generic mode via `l4lb attach`).
    pub fn per_cpu_counters(&self) -> bool {
        self.counters.map_type() == MapType::PercpuArray
    }

    fn map(&self, id: MapId) -> &MapHandle {
        match id {
            MapId::Config => &self.config,
            MapId::Vips => &self.vips,
            MapId::Services => &self.services,
            MapId::Tables => &self.tables,
            MapId::Backends => &self.backends,
            MapId::BackendStats => &self.be_stats,
            MapId::ServiceStats => &self.svc_stats,
        }
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

    /// The state as the apply engine sees it: configuration, VIP entries,
    /// services with their backends and the tables of active services.
    pub fn read_snapshot(&self) -> Result<Snapshot> {
        self.read_snapshot_with(|n| self.read_table(n))
    }

    /// Like read_snapshot, with `read_table` giving each active service's table.
    fn read_snapshot_with(&self, read_table: impl FnMut(u32) -> Result<Vec<u32>>) -> Result<Snapshot> {
        let config = self.read_config()?;
        let vips: Vec<VipEntry> = read_array(&self.vips, 0, VIP_SLOTS as u32)?
            .chunks_exact(size_of::<VipEntry>())
            .map(|c| c.try_into().expect("24 bytes"))
            .collect();
        let services: Vec<bpf::Service> = read_array(&self.services, 0, MAX_SERVICES as u32)?
            .chunks_exact(size_of::<bpf::Service>())
            .map(|c| bpf::value_from(c).expect("value size checked"))
            .collect();
        let backends: Vec<Backend> = read_array(&self.backends, 0, MAX_BACKENDS as u32)?
            .chunks_exact(size_of::<Backend>())
            .map(|c| bpf::value_from(c).expect("value size checked"))
            .collect();
        let mut snapshot = apply::decode(config, vips, &services, &backends, read_table)?;
        snapshot.service_tables =
            (self.tables.max_entries() as usize * TABLE_ENTRY_SLOTS / MAGLEV_SIZE).min(MAX_SERVICES);
        snapshot.tick = tick()?;
        Ok(snapshot)
    }

    /// The running state (what `l4lb config` prints, `stats` and `status` show).
    pub fn read_running(&self) -> Result<Running> {
        Ok(self.read_snapshot()?.running)
    }

    /// The running state without the Maglev tables (each `table` is empty):
    /// what `stats` needs every sample, without reading 200 KiB per service.
    pub fn read_running_without_tables(&self) -> Result<Running> {
        Ok(self.read_snapshot_with(|_| Ok(Vec::new()))?.running)
    }

    /// The MAGLEV_SIZE slots of service `number`'s table.
    pub fn read_table(&self, number: u32) -> Result<Vec<u32>> {
        read_table_words(&self.tables, number * MAGLEV_SIZE as u32, MAGLEV_SIZE as u32)
    }

    /// Writes words of l4lb_tables: (index, word).
    pub fn write_slot_words(&self, entries: &[(u32, u32)]) -> Result<()> {
        write_table_words(&self.tables, entries)
    }

    /// Packets and bytes per backend number, summed over CPUs.
    pub fn read_backend_stats(&self) -> Result<Vec<Traffic>> {
        read_traffic(&self.be_stats, MAX_BACKENDS)
    }

    /// Packets and bytes per service number, summed over CPUs.
    pub fn read_service_stats(&self) -> Result<Vec<Traffic>> {
        read_traffic(&self.svc_stats, MAX_SERVICES)
    }

    /// The global counters, indexed like COUNTER_NAMES, summed over CPUs.
    pub fn read_counters(&self) -> Result<Vec<u64>> {
        read_u64_counters(&self.counters, bpf::COUNTER_NAMES.len())
    }

    /// Plans and carries out `wanted` over what the maps hold (the update
    /// lock is the caller's). Returns the plan that was executed.
    pub fn apply(&self, wanted: &crate::config::Model) -> Result<apply::Plan> {
        let now = self.read_snapshot()?;
        let plan = apply::plan(&now, wanted, random_seed()?)?;
        apply::execute(self, &plan)?;
        Ok(plan)
    }

    /// Every byte of every map, in a fixed order: for before/after comparisons.
    pub fn dump(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for map in [&self.config, &self.vips, &self.services, &self.tables, &self.backends] {
            out.extend(read_array(map, 0, map.max_entries())?);
        }
        for map in [&self.be_stats, &self.svc_stats, &self.counters] {
            for index in 0..map.max_entries() {
                out.extend(lookup_counter(map, index)?.concat());
            }
        }
        Ok(out)
    }
}

impl apply::Io for LbMaps {
    fn read(&self, map: MapId, index: u32) -> Result<Vec<u8>> {
        Ok(lookup_counter(self.map(map), index)?.concat())
    }

    fn write(&self, map: MapId, index: u32, value: &[u8]) -> Result<()> {
        let handle = self.map(map);
        if handle.map_type() == MapType::PercpuArray {
            let size = handle.value_size() as usize;
            let values: Vec<Vec<u8>> = value.chunks(size).map(<[u8]>::to_vec).collect();
            handle.update_percpu(&key(index), &values, MapFlags::ANY)?;
        } else {
            handle.update(&key(index), value, MapFlags::ANY)?;
        }
        Ok(())
    }

    fn read_slots(&self, start: u32, count: u32) -> Result<Vec<u32>> {
        read_table_words(&self.tables, start, count)
    }

    fn write_slots(&self, entries: &[(u32, u32)]) -> Result<()> {
        write_table_words(&self.tables, entries)
    }

    fn grace(&self) {
        wait_for_datapath_readers()
    }
}

/// The host's tick (l4lb_config.clock): whole seconds of CLOCK_MONOTONIC,
/// the clock the sweep and the applies share.
pub fn tick() -> Result<u32> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).context("reading CLOCK_MONOTONIC")?;
    Ok(now.tv_sec() as u32)
}

pub fn random_seed() -> Result<u32> {
    let mut bytes = [0u8; 4];
    getrandom::getrandom(&mut bytes).map_err(|err| anyhow!("reading a random hash seed: {err}"))?;
    Ok(u32::from_ne_bytes(bytes))
}

/// Returns once every run of the datapath that may have read what was just
/// unpublished has finished, so that entries nothing points to any more can
/// be cleared without a packet in flight still reading them. XDP programs
/// run inside RCU read-side sections, and membarrier(MEMBARRIER_CMD_GLOBAL)
/// waits for an RCU grace period (synchronize_rcu). Where the kernel refuses
/// it (nohz_full), a pause far longer than any program run stands in.
pub fn wait_for_datapath_readers() {
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_membarrier, nix::libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Packets and bytes of the first `count` entries of l4lb_be_stats or
/// l4lb_svc_stats, summed over CPUs: in batches where the kernel has them,
/// else one entry at a time.
fn read_traffic(map: &MapHandle, count: usize) -> Result<Vec<Traffic>> {
    let Ok(values) = lookup_batch_range(map, 0, count as u32) else {
        return (0..count as u32).map(|number| read_traffic_entry(map, number)).collect();
    };
    let stride = batch_value_size(map)?;
    let part = if map.map_type() == MapType::PercpuArray { round_up8(map.value_size() as usize) } else { stride };
    values
        .chunks_exact(stride)
        .enumerate()
        .map(|(number, entry)| sum_traffic(map, number as u32, entry.chunks_exact(part)))
        .collect()
}

/// The packets and bytes of entry `index` of a traffic map: the sum of its
/// per-CPU `parts` (one part when the map is not per-CPU).
fn sum_traffic<'a>(map: &MapHandle, index: u32, parts: impl Iterator<Item = &'a [u8]>) -> Result<Traffic> {
    let mut total = Traffic::default();
    for bytes in parts {
        let part: Traffic = bpf::value_from(bytes).ok_or_else(|| {
            anyhow!("map `{}`: entry {index} is shorter than packets and bytes", map.name().to_string_lossy())
        })?;
        total.packets = total.packets.wrapping_add(part.packets);
        total.bytes = total.bytes.wrapping_add(part.bytes);
    }
    Ok(total)
}

fn round_up8(size: usize) -> usize {
    size.div_ceil(8) * 8
}

/// Bytes a batch read returns per entry: the value, or for a per-CPU array
/// the value rounded up to 8 bytes for every possible CPU.
fn batch_value_size(map: &MapHandle) -> Result<usize> {
    if map.map_type() == MapType::PercpuArray {
        Ok(round_up8(map.value_size() as usize) * libbpf_rs::num_possible_cpus().context("counting possible CPUs")?)
    } else {
        Ok(map.value_size() as usize)
    }
}

/// Packets and bytes of entry `index` of l4lb_be_stats or l4lb_svc_stats,
/// summed over CPUs when the map is per-CPU.
pub fn read_traffic_entry(map: &MapHandle, index: u32) -> Result<Traffic> {
    let parts = lookup_counter(map, index)?;
    sum_traffic(map, index, parts.iter().map(Vec::as_slice))
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

/// Entries per batch syscall.
const BATCH: u32 = 1 << 16;

/// `count` consecutive entries of a (not per-CPU) array from `start`, their
/// values concatenated: in batches where the kernel has them, else one by one.
/// (lookup_batch_range also reads per-CPU arrays: `read_traffic`.)
pub fn read_array(map: &MapHandle, start: u32, count: u32) -> Result<Vec<u8>> {
    let size = map.value_size() as usize;
    match lookup_batch_range(map, start, count) {
        Ok(values) => Ok(values),
        Err(_) => {
            let mut out = Vec::with_capacity(count as usize * size);
            for index in start..start + count {
                out.extend(lookup(map, index)?);
            }
            Ok(out)
        }
    }
}

fn lookup_batch_range(map: &MapHandle, start: u32, count: u32) -> Result<Vec<u8>> {
    use std::os::fd::{AsFd, AsRawFd};
    let size = batch_value_size(map)?;
    let mut values = vec![0u8; count as usize * size];
    let mut keys = vec![0u32; count as usize];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    let mut done = 0u32;
    // The batch token of an array is the last key read: reading goes on from the next.
    let mut token: u32 = start.wrapping_sub(1);
    while done < count {
        let mut n = (count - done).min(BATCH);
        let mut out_token: u32 = 0;
        let in_token: *mut std::ffi::c_void =
            if start == 0 && done == 0 { std::ptr::null_mut() } else { (&mut token as *mut u32).cast() };
        // SAFETY: keys and values have room for n more entries of their sizes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_token,
                (&mut out_token as *mut u32).cast(),
                keys.as_mut_ptr().add(done as usize).cast(),
                values.as_mut_ptr().add(done as usize * size).cast(),
                &mut n,
                &opts,
            )
        };
        let end = rc == -nix::libc::ENOENT;
        if rc != 0 && !end {
            bail!("batch read of map `{}`: {}", map.name().to_string_lossy(), std::io::Error::from_raw_os_error(-rc));
        }
        for (i, k) in keys[done as usize..(done + n) as usize].iter().enumerate() {
            if *k != start + done + i as u32 {
                bail!("batch read of map `{}`: keys out of order", map.name().to_string_lossy());
            }
        }
        done += n;
        token = out_token;
        if end || n == 0 {
            break;
        }
    }
    if done != count {
        bail!("batch read of map `{}`: {done} of {count} entries", map.name().to_string_lossy());
    }
    Ok(values)
}

fn read_u32s(map: &MapHandle, start: u32, count: u32) -> Result<Vec<u32>> {
    Ok(read_array(map, start, count)?
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// Slot words `start .. start + count` of l4lb_tables, whose entries hold
/// TABLE_ENTRY_SLOTS words each (include/l4lb.h).
fn read_table_words(map: &MapHandle, start: u32, count: u32) -> Result<Vec<u32>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let per = TABLE_ENTRY_SLOTS as u32;
    let (first, last) = (start / per, (start + count - 1) / per);
    let words = read_u32s(map, first, last - first + 1)?;
    let from = (start - first * per) as usize;
    Ok(words[from..from + count as usize].to_vec())
}

/// Writes (slot, word) pairs of l4lb_tables: each entry they fall in is read,
/// changed in those words and written back whole (batched where possible).
/// A packet reads any word of an entry being written either old or new, never
/// torn (the kernel copies values in aligned 8-byte pieces at least).
fn write_table_words(map: &MapHandle, writes: &[(u32, u32)]) -> Result<()> {
    let per = TABLE_ENTRY_SLOTS as u32;
    let mut by_entry: BTreeMap<u32, Vec<(usize, u32)>> = BTreeMap::new();
    for &(slot, word) in writes {
        by_entry.entry(slot / per).or_default().push(((slot % per) as usize, word));
    }
    let (Some(&first), Some(&last)) = (by_entry.keys().next(), by_entry.keys().next_back()) else {
        return Ok(());
    };
    let mut words = read_u32s(map, first, last - first + 1)?;
    let mut entries: Vec<(u32, Vec<u8>)> = Vec::with_capacity(by_entry.len());
    for (&entry, lanes) in &by_entry {
        let base = ((entry - first) * per) as usize;
        for &(lane, word) in lanes {
            words[base + lane] = word;
        }
        entries.push((entry, words[base..base + per as usize].iter().flat_map(|w| w.to_ne_bytes()).collect()));
    }
    for chunk in entries.chunks(BATCH as usize) {
        let keys: Vec<u8> = chunk.iter().flat_map(|(k, _)| k.to_ne_bytes()).collect();
        let values: Vec<u8> = chunk.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        if map.update_batch(&keys, &values, chunk.len() as u32, MapFlags::ANY, MapFlags::ANY).is_ok() {
            continue;
        }
        for (index, value) in chunk {
            map.update(&key(*index), value, MapFlags::ANY)
                .with_context(|| format!("writing entry {index} of map `{}`", map.name().to_string_lossy()))?;
        }
    }
    Ok(())
}

/// The flow table (`l4lb_flows`) of a loaded program: a hash or LRU hash of
/// this build's key and value layouts.
pub fn open_flows(program: &AttachedProgram) -> Result<MapHandle> {
    let map = ProgramMaps::open(program)?.take(bpf::MAP_FLOWS)?;
    if !matches!(map.map_type(), MapType::Hash | MapType::LruHash) {
        bail!("map `{}` is a {:?} map, this l4lb expects a hash or an LRU hash", bpf::MAP_FLOWS, map.map_type());
    }
    if map.key_size() as usize != size_of::<FlowKey>() || map.value_size() as usize != size_of::<FlowPin>() {
        bail!(
            "map `{}` has keys of {} and values of {} bytes, this l4lb expects {} and {}: object and binary are from different versions",
            bpf::MAP_FLOWS,
            map.key_size(),
            map.value_size(),
            size_of::<FlowKey>(),
            size_of::<FlowPin>()
        );
    }
    Ok(map)
}

/// Entries per batch of a flow table walk (64 bytes each: 512 KiB of buffers).
const FLOW_BATCH: u32 = 8192;

/// Calls `each` on every entry of the flow table, which the datapath may be
/// changing meanwhile: an entry added or removed during the walk may or may
/// not be seen, none is seen twice. In batches (bpf_map_lookup_batch, which
/// walks the hash table bucket by bucket under each bucket's lock), else, where
/// the kernel has no batches (offloaded maps), key by key. Returns the
/// number of entries seen.
pub fn walk_flows(map: &MapHandle, mut each: impl FnMut(&FlowKey, &FlowPin)) -> Result<usize> {
    let mut parse = |key: &[u8], value: &[u8]| {
        let key: FlowKey = bpf::value_from(key).expect("key size checked");
        let pin: FlowPin = bpf::value_from(value).expect("value size checked");
        each(&key, &pin);
    };
    match walk_batches(map, &mut parse)? {
        Some(seen) => Ok(seen),
        None => walk_keys(
            |previous| next_key(map, previous),
            |key| {
                map.lookup(key, MapFlags::ANY).with_context(|| format!("reading an entry of map `{}`", bpf::MAP_FLOWS))
            },
            2 * map.max_entries() as usize + 1024,
            &mut parse,
        ),
    }
}

/// The batch walk of a hash map; None when the kernel has no batch
/// operations for the map (and nothing was seen).
fn walk_batches(map: &MapHandle, each: &mut impl FnMut(&[u8], &[u8])) -> Result<Option<usize>> {
    use std::os::fd::{AsFd, AsRawFd};
    let (key_size, value_size) = (map.key_size() as usize, map.value_size() as usize);
    let mut capacity = FLOW_BATCH;
    let mut keys = vec![0u8; capacity as usize * key_size];
    let mut values = vec![0u8; capacity as usize * value_size];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        elem_flags: 0,
        flags: 0,
    };
    // The token of a hash map batch is a bucket index: the next batch starts there.
    let mut token: u32 = 0;
    let mut first = true;
    let mut seen = 0usize;
    loop {
        let mut n = capacity;
        let mut out_token: u32 = 0;
        let in_token: *mut std::ffi::c_void =
            if first { std::ptr::null_mut() } else { (&mut token as *mut u32).cast() };
        // SAFETY: keys and values have room for `capacity` entries of their sizes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_token,
                (&mut out_token as *mut u32).cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut n,
                &opts,
            )
        };
        let errno = if rc < 0 { -rc } else { 0 };
        match errno {
            0 | nix::libc::ENOENT => {
                for i in 0..n as usize {
                    each(&keys[i * key_size..][..key_size], &values[i * value_size..][..value_size]);
                }
                seen += n as usize;
                if errno == nix::libc::ENOENT {
                    return Ok(Some(seen));
                }
                token = out_token;
                first = false;
            }
            nix::libc::EINTR => {}
            // A bucket holds more entries than the batch has room for.
            nix::libc::ENOSPC if capacity < 1 << 20 => {
                capacity *= 2;
                keys.resize(capacity as usize * key_size, 0);
                values.resize(capacity as usize * value_size, 0);
            }
            // ENOTSUPP (524, kernel-internal) from offloaded maps, EINVAL from kernels without batches.
            nix::libc::EOPNOTSUPP | nix::libc::EINVAL | 524 if first => return Ok(None),
            _ => bail!(
                "batch read of map `{}` ({seen} entries read): {}",
                bpf::MAP_FLOWS,
                std::io::Error::from_raw_os_error(errno)
            ),
        }
    }
}

/// The key after `previous` (the first key without one); None at the end.
fn next_key(map: &MapHandle, previous: Option<&[u8]>) -> Result<Option<Vec<u8>>> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut next = vec![0u8; map.key_size() as usize];
    let previous = previous.map_or(std::ptr::null(), <[u8]>::as_ptr);
    // SAFETY: previous is null or a key of the map's key size, next has room for one.
    let rc =
        unsafe { libbpf_sys::bpf_map_get_next_key(map.as_fd().as_raw_fd(), previous.cast(), next.as_mut_ptr().cast()) };
    match -rc {
        0 => Ok(Some(next)),
        nix::libc::ENOENT => Ok(None),
        errno => bail!("walking the keys of map `{}`: {}", bpf::MAP_FLOWS, std::io::Error::from_raw_os_error(errno)),
    }
}

/// A walk of a hash map key by key (bpf_map_get_next_key). When the key
/// just seen is deleted before the next step, the kernel starts over from
/// the first key: keys seen before are skipped (not counted twice), and the
/// walk gives up after `limit` steps (a table changing faster than it is
/// walked).
fn walk_keys(
    mut next_key: impl FnMut(Option<&[u8]>) -> Result<Option<Vec<u8>>>,
    mut lookup: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>>,
    limit: usize,
    each: &mut impl FnMut(&[u8], &[u8]),
) -> Result<usize> {
    let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let mut previous: Option<Vec<u8>> = None;
    for _ in 0..limit {
        let Some(key) = next_key(previous.as_deref())? else {
            return Ok(seen.len());
        };
        if !seen.contains(&key) {
            // Deleted since its key was read: not there any more.
            if let Some(value) = lookup(&key)? {
                each(&key, &value);
                seen.insert(key.clone());
            }
        }
        previous = Some(key);
    }
    bail!(
        "walking the keys of map `{}`: still going after {limit} steps ({} entries seen): entries come and go faster than the walk",
        bpf::MAP_FLOWS,
        seen.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash map as bpf_map_get_next_key sees it: keys in bucket order;
    /// the key after one that is not there is the first key.
    struct FakeMap {
        keys: Vec<u8>,
    }

    impl FakeMap {
        fn next(&self, previous: Option<&[u8]>) -> Option<Vec<u8>> {
            let at = match previous {
                None => 0,
                Some(p) => match self.keys.iter().position(|k| *k == p[0]) {
                    Some(i) => i + 1,
                    None => 0,
                },
            };
            self.keys.get(at).map(|k| vec![*k])
        }
    }

    #[test]
    fn a_key_walk_counts_each_entry_once_when_the_kernel_starts_over() {
        let map = std::cell::RefCell::new(FakeMap { keys: vec![1, 2, 3, 4, 5] });
        let mut seen = Vec::new();
        let count = walk_keys(
            |previous| {
                let next = map.borrow().next(previous);
                // The datapath deletes key 3 just after the walk read it,
                // and adds 6: the walk starts over from key 1.
                if next == Some(vec![3]) {
                    map.borrow_mut().keys = vec![1, 2, 4, 5, 6];
                }
                Ok(next)
            },
            |key| Ok(map.borrow().keys.contains(&key[0]).then(|| vec![key[0] * 10])),
            100,
            &mut |key: &[u8], value: &[u8]| seen.push((key[0], value[0])),
        )
        .unwrap();
        // 3 was gone by the time its value was read.
        assert_eq!(seen, [(1, 10), (2, 20), (4, 40), (5, 50), (6, 60)]);
        assert_eq!(count, 5);
    }

    #[test]
    fn a_key_walk_gives_up_on_a_table_that_never_settles() {
        let mut n = 0u8;
        let err = walk_keys(
            |_| {
                n = n.wrapping_add(1);
                Ok(Some(vec![n % 3]))
            },
            |key| Ok(Some(key.to_vec())),
            50,
            &mut |_: &[u8], _: &[u8]| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("l4lb_flows") && err.to_string().contains("50 steps"), "{err}");
    }
}
