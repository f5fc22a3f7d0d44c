//! The apply engine: from the running state (read back from the maps) and a
//! wanted configuration model to an ordered list of map writes ([`plan`],
//! pure), and the execution of that list with a journal, so that a refused
//! write puts every map back byte for byte ([`execute`], through the [`Io`]
//! trait: the kernel's maps in `maps`, an in-memory fake in the tests).
//!
//! # Numbers
//!
//! A service that stays keeps its number, and a backend (service key,
//! address) that stays keeps its number, so their counters keep counting.
//! New ones take the lowest numbers no running service or backend holds;
//! only when none is left do they reuse numbers of what this apply removes
//! (a service number reused this way is unpublished, and an RCU grace
//! period waited for, before its new table is written).
//!
//! # VIP entries
//!
//! l4lb_vips is direct-mapped: a VIP's home entry is `flow_hash::vip_home`
//! of its key; it sits at most L4LB_VIP_MAX_PROBES - 1 entries after it
//! (wrapping). A VIP that stays keeps its entry; a new one takes the first
//! free entry from its home on (entries of VIPs removed by the same apply
//! count as taken: packets may still read them). `vip_probes` is 1 + the
//! largest displacement in use (0 without VIPs). A new entry is written in
//! two steps that each change what a packet can see at once: first every
//! byte but the family (the entry stays free: family 0), then the family.
//! Unpublishing writes family 0 only; the rest is zeroed after a grace
//! period.
//!
//! # Fragment entries
//!
//! Fragments carry no ports (only the first one does): the datapath looks
//! every fragment up by (address, family | L4LB_FAMILY_FRAGMENT, protocol,
//! port 0). For every (address, protocol) of the VIPs (the catch-all aside)
//! the plan keeps one such entry, naming the service of that address's
//! port-0 VIP for the protocol if there is one, else of its VIP with the
//! lowest port ([`fragment_targets`]). It is placed like a VIP entry (same
//! home hash over its 20 key bytes, same probe bound, counted in
//! vip_probes), published (staged with family 0, then the family byte)
//! only once its target service is published, unpublished before its target
//! is, and cleared after the grace period. When its target changes (the
//! lowest-port VIP removed or a lower one added) only its service number is
//! rewritten, in place, while both services are published. That write
//! cannot be seen torn: the kernel copies the whole 24-byte value, only the
//! 4-byte service field differs, and two service numbers (below
//! L4LB_MAX_SERVICES = 64) differ in their low byte only, so a packet reads
//! either the old number or the new one, both published services. An entry
//! whose service number is reused by a new service of the same apply (or
//! names no running service) is re-pointed or unpublished before the grace
//! period that precedes the new table.
//!
//! # Order of the writes
//!
//! No packet sees a half-written service:
//! (a) counters of new backend numbers zeroed, new and changed backend
//!     entries (a gateway MAC change rewrites the entries that use it), the
//!     outer sources and gateway new services need;
//! (b) each new service: counters zeroed, its whole table, its entry; then
//!     the configuration with vip_probes raised to cover old and new VIPs,
//!     ANY_PORT and (new catch-all) CATCH_ALL; then the VIP entries; then
//!     the new fragment entries and the re-pointed ones;
//! (c) each changed service: only the slots that change, then its entry
//!     (flags, transition settings and the tick of its last change);
//! (d) fragment entries no VIP calls for any more unpublished, then removed
//!     services unpublished (VIP entries freed); then the final
//!     configuration: vip_probes lowered, catch-all cleared, (e) the seed;
//! (f) an RCU grace period (membarrier), if anything is to be cleared;
//! (g) entries of removed VIPs, services and backends cleared. Tables of
//!     removed services are left as they are (never read: a service's table
//!     is written whole before the service is published again).
//! The MTU (`[global] mtu`; None keeps the running one) is written with the
//! first configuration write, (a). A wanted model equal to the running one
//! gives no step at all.
//!
//! # Slots in transition
//!
//! In a service that tracks flows, a slot whose backend changes while the
//! old one stays in the service goes into transition (`transition::next_slot`,
//! docs/transitions.md): its word keeps the previous backend. An apply that
//! puts slots in transition stamps the service's `changed` with the
//! snapshot's tick and writes that tick to l4lb_config.clock in (a), so that
//! the datapath's pins and UDP grace count from it. A service that stops
//! tracking flows gets every slot steady.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context, Result};

use crate::bpf::{self, consts, Config, MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, VIP_MASK, VIP_MAX_PROBES, VIP_SLOTS};
use crate::config::{self, Backend, Model, Protocol, ServiceKey};
use crate::flow_hash::vip_home;
use crate::maglev;
use crate::state::{Running, RunningBackend, RunningFragment, RunningService};
use crate::transition;

// ---------------------------------------------------------------------------
// The state the planner works on

/// Bytes of one l4lb_vips entry: key (address 16, family, protocol, port in
/// network order) and the service number (native order).
pub type VipEntry = [u8; 24];

/// What the maps hold, as far as the apply engine is concerned: the running
/// model with its numbers and tables, plus the raw configuration and VIP
/// entries (where each VIP sits).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub running: Running,
    pub config: Config,
    /// All VIP_SLOTS entries of l4lb_vips.
    pub vips: Vec<VipEntry>,
    /// Services whose tables l4lb_tables has room for: MAX_SERVICES, fewer
    /// when the program was loaded with a smaller map (offload).
    pub service_tables: usize,
    /// The host's tick when the snapshot was read (`maps::tick`): what an
    /// apply from it stamps changed services with. Not a map's content.
    pub tick: u32,
}

impl Snapshot {
    /// A freshly attached balancer: nothing configured.
    pub fn empty() -> Self {
        Snapshot {
            running: Running::default(),
            config: Config::default(),
            vips: vec![[0; 24]; VIP_SLOTS],
            service_tables: MAX_SERVICES,
            tick: 0,
        }
    }

    /// Entry index per published VIP key bytes.
    fn vip_positions(&self) -> HashMap<[u8; 20], u32> {
        self.vips
            .iter()
            .enumerate()
            .filter(|(_, e)| e[16] != 0)
            .map(|(i, e)| (e[..20].try_into().expect("20 bytes"), i as u32))
            .collect()
    }
}

/// The maps the engine writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapId {
    Config,
    Vips,
    Services,
    Tables,
    Backends,
    BackendStats,
    ServiceStats,
}

impl MapId {
    pub fn name(self) -> &'static str {
        match self {
            MapId::Config => bpf::MAP_CONFIG,
            MapId::Vips => bpf::MAP_VIPS,
            MapId::Services => bpf::MAP_SERVICES,
            MapId::Tables => bpf::MAP_TABLES,
            MapId::Backends => bpf::MAP_BACKENDS,
            MapId::BackendStats => bpf::MAP_BACKEND_STATS,
            MapId::ServiceStats => bpf::MAP_SERVICE_STATS,
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding and decoding map values

fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, bpf::FAMILY_IPV4)
        }
        IpAddr::V6(a) => (a.octets(), bpf::FAMILY_IPV6),
    }
}

fn addr_from(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        bpf::FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        bpf::FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// The 20 key bytes of a VIP (None for the catch-all).
pub fn vip_key_bytes(key: &ServiceKey) -> Option<[u8; 20]> {
    let ServiceKey::Vip { addr, protocol, port } = *key else { return None };
    let (bytes, family) = addr_bytes(addr);
    let mut out = [0u8; 20];
    out[..16].copy_from_slice(&bytes);
    out[16] = family;
    out[17] = match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    };
    out[18..].copy_from_slice(&port.to_be_bytes());
    Some(out)
}

/// Or'ed into the family byte of a fragment entry's key.
pub const FAMILY_FRAGMENT: u8 = consts::L4LB_FAMILY_FRAGMENT as u8;

/// The 20 key bytes of the fragment entry of (addr, protocol).
pub fn fragment_key_bytes(addr: IpAddr, protocol: Protocol) -> [u8; 20] {
    let mut kb = vip_key_bytes(&ServiceKey::Vip { addr, protocol, port: 0 }).expect("a VIP");
    kb[16] |= FAMILY_FRAGMENT;
    kb
}

/// (address, protocol) of a fragment entry; None for VIP and free entries.
fn fragment_from(entry: &VipEntry) -> Option<(IpAddr, Protocol)> {
    if entry[16] & FAMILY_FRAGMENT == 0 || entry[18..20] != [0, 0] {
        return None;
    }
    let addr = addr_from(entry[..16].try_into().expect("16 bytes"), entry[16] & !FAMILY_FRAGMENT)?;
    let protocol = match entry[17] {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some((addr, protocol))
}

/// The fragment entries among `vips`, sorted by (address, protocol).
pub fn fragments_of(vips: &[VipEntry]) -> Vec<RunningFragment> {
    let mut out: Vec<RunningFragment> = vips
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let (addr, protocol) = fragment_from(e)?;
            Some(RunningFragment { addr, protocol, service: vip_service(e), entry: i as u32 })
        })
        .collect();
    out.sort();
    out
}

/// The fragment entries `services` call for: per (address, protocol) of
/// the VIPs (key bytes of [`fragment_key_bytes`]), the VIP its fragments go
/// to: the port-0 VIP if there is one, else the one with the lowest port.
pub fn fragment_targets(services: &[config::Service]) -> BTreeMap<[u8; 20], ServiceKey> {
    let mut out: BTreeMap<[u8; 20], ServiceKey> = BTreeMap::new();
    for s in services {
        let ServiceKey::Vip { addr, protocol, port } = s.key else { continue };
        let target = out.entry(fragment_key_bytes(addr, protocol)).or_insert(s.key);
        if matches!(*target, ServiceKey::Vip { port: p, .. } if port < p) {
            *target = s.key;
        }
    }
    out
}

fn vip_key_from(entry: &VipEntry) -> Option<ServiceKey> {
    if entry[16] & FAMILY_FRAGMENT != 0 {
        return None;
    }
    let addr = addr_from(entry[..16].try_into().expect("16 bytes"), entry[16])?;
    let protocol = match entry[17] {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        _ => return None,
    };
    Some(ServiceKey::Vip { addr, protocol, port: u16::from_be_bytes([entry[18], entry[19]]) })
}

fn vip_entry(key: &[u8; 20], service: u32) -> VipEntry {
    let mut e = [0u8; 24];
    e[..20].copy_from_slice(key);
    e[20..].copy_from_slice(&service.to_ne_bytes());
    e
}

fn vip_service(entry: &VipEntry) -> u32 {
    u32::from_ne_bytes(entry[20..].try_into().expect("4 bytes"))
}

/// The l4lb_backends entry of a backend of service `service`.
pub fn backend_entry(b: &Backend, service: u32, gateway: Option<[u8; 6]>) -> bpf::Backend {
    let (addr, family) = addr_bytes(b.addr);
    let mut flags = consts::L4LB_BACKEND_ACTIVE as u8;
    let mac = match b.mac {
        Some(mac) => mac,
        None => {
            flags |= consts::L4LB_BACKEND_GATEWAY_MAC as u8;
            gateway.unwrap_or_default()
        }
    };
    bpf::Backend { addr, mac, family, flags, service, weight: b.weight }
}

/// The l4lb_services entry of a service last changed at tick `changed`.
pub fn service_entry(s: &config::Service, changed: u32) -> bpf::Service {
    bpf::Service { flags: service_flags(s), changed, udp_grace: s.udp_grace, idle_timeout: s.idle_timeout }
}

fn service_flags(s: &config::Service) -> u32 {
    let mut flags = consts::L4LB_SERVICE_ACTIVE;
    if s.hash_ports {
        flags |= consts::L4LB_SERVICE_HASH_PORTS;
    }
    if s.track_flows {
        flags |= consts::L4LB_SERVICE_TRACK_FLOWS;
    }
    if s.backends.iter().any(|b| b.addr.is_ipv4()) {
        flags |= consts::L4LB_SERVICE_IPV4_BACKENDS;
    }
    flags
}

fn bytes_of<T: plain::Plain>(value: &T) -> Vec<u8> {
    bpf::value_bytes(value).to_vec()
}

/// Rebuilds the state from the raw maps: `services` are every l4lb_services
/// entry, `backends` every l4lb_backends entry, `table` reads the words of
/// the table of an active service. Entries nothing publishes are left out.
pub fn decode(
    config: Config,
    vips: Vec<VipEntry>,
    services: &[bpf::Service],
    backends: &[bpf::Backend],
    mut table: impl FnMut(u32) -> Result<Vec<u32>>,
) -> Result<Snapshot> {
    let flag = |bit: u32| config.flags & bit != 0;
    let global = config::Global {
        source_v4: flag(consts::L4LB_CONFIG_SRC_SET).then(|| Ipv4Addr::from(config.src_v4)),
        source_v6: flag(consts::L4LB_CONFIG_SRC6_SET).then(|| Ipv6Addr::from(config.src_v6)),
        gateway_mac: flag(consts::L4LB_CONFIG_GATEWAY_SET).then_some(config.gateway_mac),
        hash_seed: flag(consts::L4LB_CONFIG_SEED_SET).then_some(config.hash_seed),
        mtu: (config.mtu != 0).then_some(config.mtu),
    };
    let active = |n: u32| services.get(n as usize).is_some_and(|s| s.flags & consts::L4LB_SERVICE_ACTIVE != 0);
    let mut keys: BTreeMap<u32, ServiceKey> = BTreeMap::new();
    if flag(consts::L4LB_CONFIG_CATCH_ALL) && active(config.catch_all) {
        keys.insert(config.catch_all, ServiceKey::CatchAll);
    }
    for entry in &vips {
        if let Some(key) = vip_key_from(entry) {
            let n = vip_service(entry);
            if active(n) {
                keys.entry(n).or_insert(key);
            }
        }
    }
    // Active backend entries by owning service, in one pass over the 32,768.
    let mut by_service: BTreeMap<u32, Vec<RunningBackend>> = BTreeMap::new();
    for (i, b) in backends.iter().enumerate() {
        if u32::from(b.flags) & consts::L4LB_BACKEND_ACTIVE == 0 || !keys.contains_key(&b.service) {
            continue;
        }
        let Some(addr) = addr_from(&b.addr, b.family) else { continue };
        let mac = (u32::from(b.flags) & consts::L4LB_BACKEND_GATEWAY_MAC == 0).then_some(b.mac);
        by_service
            .entry(b.service)
            .or_default()
            .push(RunningBackend { number: i as u32, backend: Backend { addr, mac, weight: b.weight } });
    }
    let mut out = Vec::new();
    for (&number, &key) in &keys {
        let mut members = by_service.remove(&number).unwrap_or_default();
        members.sort_by_key(|m| m.backend.addr);
        let entry = services[number as usize];
        let flags = entry.flags;
        let (table, transitions) = transition::split(&table(number)?);
        out.push(RunningService {
            number,
            key,
            hash_ports: flags & consts::L4LB_SERVICE_HASH_PORTS != 0,
            track_flows: flags & consts::L4LB_SERVICE_TRACK_FLOWS != 0,
            idle_timeout: entry.idle_timeout,
            udp_grace: entry.udp_grace,
            changed: entry.changed,
            backends: members,
            table,
            transitions,
        });
    }
    out.sort_by_key(|s| s.key);
    let fragments = fragments_of(&vips);
    let running = Running { global, seed_fixed: flag(consts::L4LB_CONFIG_SEED_FIXED), services: out, fragments };
    Ok(Snapshot { running, config, vips, service_tables: MAX_SERVICES, tick: 0 })
}

// ---------------------------------------------------------------------------
// The plan

/// One write (or wait) of an apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Entry `key` of `map` becomes `value` (skipped when it already is).
    Write { map: MapId, key: u32, value: Vec<u8> },
    /// Entry `key` of a counter map becomes zero on every CPU.
    Zero { map: MapId, key: u32 },
    /// Slots of service `service`'s table: (slot, word: `transition::Slot`).
    Slots { service: u32, writes: Vec<(u32, u32)> },
    /// An RCU grace period: every packet that may have read what was
    /// unpublished before has left the program.
    Grace,
}

/// The steps of an apply and the state they lead to.
#[derive(Debug, Clone)]
pub struct Plan {
    pub diff: config::Diff,
    pub steps: Vec<Step>,
    /// The state once every step is done (what reading the maps gives).
    pub after: Snapshot,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Table slots written (all services).
    pub fn slots_written(&self) -> usize {
        self.steps.iter().map(|s| if let Step::Slots { writes, .. } = s { writes.len() } else { 0 }).sum()
    }

    /// Map writes, a slot counting as one.
    pub fn writes(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Write { .. } | Step::Zero { .. } => 1,
                Step::Slots { writes, .. } => writes.len(),
                Step::Grace => 0,
            })
            .sum()
    }
}

/// Checks the limits of the datapath (a model from `config::parse` always
/// passes; `l4lb map` builds models by hand).
pub fn check_limits(wanted: &Model) -> Result<()> {
    if wanted.services.len() > MAX_SERVICES {
        bail!("{} services: at most MAX_SERVICES = {MAX_SERVICES}", wanted.services.len());
    }
    for s in &wanted.services {
        if s.backends.len() > config::MAX_BACKENDS_PER_SERVICE {
            bail!(
                "service {} has {} backends: at most MAX_BACKENDS_PER_SERVICE = {}",
                s.key,
                s.backends.len(),
                config::MAX_BACKENDS_PER_SERVICE
            );
        }
        if s.backends.is_empty() {
            bail!("service {} has no backends", s.key);
        }
        if s.key == ServiceKey::CatchAll
            && s.backends.iter().any(|b| b.addr.is_ipv4())
            && s.backends.iter().any(|b| b.addr.is_ipv6())
        {
            bail!("the catch-all service may not mix IPv4 and IPv6 backends");
        }
    }
    Ok(())
}

/// Lowest numbers below `limit` not in `used`, then (only when those run
/// out) numbers of `reusable`, each handed out once.
struct Numbers {
    /// The next number to try, below `limit`, and the numbers in use, in
    /// order: fresh numbers are found walking both (a plan takes a few of
    /// 32,768 backend numbers; listing every free one cost a set lookup each).
    next: u32,
    limit: u32,
    used: Vec<u32>,
    used_at: usize,
    reusable: std::vec::IntoIter<u32>,
}

impl Numbers {
    fn new(limit: usize, used: &BTreeSet<u32>, reusable: Vec<u32>) -> Self {
        Numbers {
            next: 0,
            limit: limit as u32,
            used: used.iter().copied().collect(),
            used_at: 0,
            reusable: reusable.into_iter(),
        }
    }

    /// (number, reused).
    fn take(&mut self) -> Option<(u32, bool)> {
        while self.next < self.limit {
            let n = self.next;
            self.next += 1;
            while self.used.get(self.used_at).is_some_and(|&u| u < n) {
                self.used_at += 1;
            }
            if self.used.get(self.used_at) != Some(&n) {
                return Some((n, false));
            }
        }
        self.reusable.next().map(|n| (n, true))
    }
}

/// Refuses an MTU the datapath cannot work with: `wanted`'s own (checked
/// like the file's `[global] mtu`), else the running one `running_mtu`
/// (0 = no limit) against `wanted`'s backends (IPv6 backends need at least
/// MIN_MTU_IPV6_BACKENDS).
pub fn check_mtu(wanted: &Model, running_mtu: u32) -> Result<()> {
    let ipv6 = wanted
        .services
        .iter()
        .find_map(|s| s.backends.iter().find(|b| b.addr.is_ipv6()).map(|b| format!("{} of {}", b.addr, s.key)));
    let problem = match wanted.global.mtu {
        // The running MTU printed back by `l4lb config` is held to the IPv6 rule only.
        Some(mtu) if mtu != running_mtu => config::mtu_problem("mtu", i64::from(mtu), ipv6.as_deref()),
        _ if running_mtu != 0 && ipv6.is_some() && running_mtu < config::MIN_MTU_IPV6_BACKENDS => {
            config::mtu_problem("the running MTU", i64::from(running_mtu), ipv6.as_deref())
                .map(|p| format!("{p}; raise it with [global] mtu (or `l4lb attach --mtu`)"))
        }
        _ => None,
    };
    match problem {
        Some(p) => Err(anyhow!(p)),
        None => Ok(()),
    }
}

/// (slot, backend number) writes into one service's table.
type SlotWrites = Vec<(u32, u32)>;

/// Plans the apply of `wanted` over `now`. `fresh_seed` becomes the hash
/// seed when neither the maps nor `wanted` have one; `wanted.global.mtu` of
/// None keeps the running MTU (callers put the device's there when the
/// running one is 0).
pub fn plan(now: &Snapshot, wanted: &Model, fresh_seed: u32) -> Result<Plan> {
    check_capacity(now, wanted)?;
    let diff = config::diff(&now.running.model(), wanted);
    let numbers = ServiceNumbers::assign(now, wanted)?;
    let services = plan_services(now, wanted, &numbers)?;
    let mut vips = place_vips(now, wanted, &numbers)?;
    let fragments = plan_fragments(now, wanted, &numbers, &mut vips)?;
    let configs = plan_configs(now, wanted, &numbers, vips.probes_needed, services.stamped, fresh_seed);
    let steps = order_steps(now, &numbers, &services, &vips, &fragments, &configs);
    let after = snapshot_after(now, &wanted.global, services.after, vips.after, configs.fin);
    Ok(Plan { diff, steps, after })
}

/// The limits of the datapath and of this program's maps.
fn check_capacity(now: &Snapshot, wanted: &Model) -> Result<()> {
    check_limits(wanted)?;
    check_mtu(wanted, now.config.mtu)?;
    if wanted.services.len() > now.service_tables {
        bail!(
            "{} services: this program's l4lb_tables holds {} service tables (an offloaded program gets L4LB_OFFLOAD_MAX_SERVICES = {})",
            wanted.services.len(),
            now.service_tables,
            consts::L4LB_OFFLOAD_MAX_SERVICES
        );
    }
    Ok(())
}

/// The service numbers of an apply: a running service keeps its number, a
/// new one takes a fresh number, or (only when none is left) one of a
/// service this apply removes.
struct ServiceNumbers<'a> {
    number_of: BTreeMap<ServiceKey, u32>,
    /// Running services the wanted model drops.
    removed: Vec<&'a RunningService>,
    /// Numbers of removed services that new services take.
    reused: BTreeSet<u32>,
}

impl<'a> ServiceNumbers<'a> {
    fn assign(now: &'a Snapshot, wanted: &Model) -> Result<Self> {
        let running = &now.running;
        let wanted_keys: BTreeSet<ServiceKey> = wanted.services.iter().map(|s| s.key).collect();
        let removed: Vec<&RunningService> = running.services.iter().filter(|s| !wanted_keys.contains(&s.key)).collect();
        let used: BTreeSet<u32> = running.services.iter().map(|s| s.number).collect();
        let mut free = Numbers::new(now.service_tables, &used, removed.iter().map(|s| s.number).collect());
        let mut number_of = BTreeMap::new();
        let mut reused = BTreeSet::new();
        for s in &wanted.services {
            let n = match running.service(&s.key) {
                Some(r) => r.number,
                None => {
                    let (n, was_used) = free.take().ok_or_else(|| anyhow!("no free service number for {}", s.key))?;
                    if was_used {
                        reused.insert(n);
                    }
                    n
                }
            };
            number_of.insert(s.key, n);
        }
        Ok(ServiceNumbers { number_of, removed, reused })
    }

    /// Whether a running service keeps its number (it stays).
    fn staying(&self, now: &Snapshot) -> BTreeSet<u32> {
        let removed: BTreeSet<u32> = self.removed.iter().map(|r| r.number).collect();
        now.running.services.iter().map(|s| s.number).filter(|n| !removed.contains(n)).collect()
    }
}

/// A new service: its number, its whole table, its entry and its VIP key.
type NewService = (u32, SlotWrites, bpf::Service, Option<[u8; 20]>);

/// What the services and their backends need written.
struct ServicePlan {
    /// Backend numbers new in this apply (their counters are zeroed first).
    fresh_backends: Vec<u32>,
    /// New and changed backend entries.
    backend_writes: Vec<(u32, bpf::Backend)>,
    /// Numbers of running backends the wanted model drops.
    removed_backends: Vec<u32>,
    /// Backend numbers of the wanted model.
    in_use_backends: BTreeSet<u32>,
    new_services: Vec<NewService>,
    /// (number, slot writes, entry) of each service whose table or entry changes.
    changed_services: Vec<(u32, SlotWrites, bpf::Service)>,
    /// Some slot went into transition (or changed in one): the tick is stamped.
    stamped: bool,
    /// The running services after the apply, in the wanted model's order.
    after: Vec<RunningService>,
}

fn plan_services(now: &Snapshot, wanted: &Model, numbers: &ServiceNumbers) -> Result<ServicePlan> {
    let running = &now.running;
    let running_backends: HashMap<(ServiceKey, IpAddr), &RunningBackend> =
        running.services.iter().flat_map(|s| s.backends.iter().map(move |b| ((s.key, b.backend.addr), b))).collect();
    let wanted_backends: BTreeSet<(ServiceKey, IpAddr)> =
        wanted.services.iter().flat_map(|s| s.backends.iter().map(move |b| (s.key, b.addr))).collect();
    let used: BTreeSet<u32> = running_backends.values().map(|b| b.number).collect();
    let removed_backends: Vec<u32> = running_backends
        .iter()
        .filter(|(k, _)| !wanted_backends.contains(k))
        .map(|(_, b)| b.number)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut backends = BackendNumbers {
        running: running_backends,
        free: Numbers::new(MAX_BACKENDS, &used, removed_backends.clone()),
        old_gateway: running.global.gateway_mac,
        new_gateway: wanted.global.gateway_mac,
    };
    let mut plan = ServicePlan {
        fresh_backends: Vec::new(),
        backend_writes: Vec::new(),
        removed_backends,
        in_use_backends: BTreeSet::new(),
        new_services: Vec::new(),
        changed_services: Vec::new(),
        stamped: false,
        after: Vec::new(),
    };
    for s in &wanted.services {
        let number = numbers.number_of[&s.key];
        let members = plan_members(s, number, &mut backends, &mut plan)?;
        plan_table(now, s, number, members, &mut plan)?;
    }
    Ok(plan)
}

/// How backends get their numbers and entries: the running ones by
/// (service, address), fresh ones from `free`; the gateway MAC before and
/// after the apply (an entry without its own MAC takes the gateway's).
struct BackendNumbers<'a> {
    running: HashMap<(ServiceKey, IpAddr), &'a RunningBackend>,
    free: Numbers,
    old_gateway: Option<[u8; 6]>,
    new_gateway: Option<[u8; 6]>,
}

/// Service `s`'s backends with their numbers (kept, or fresh), recording
/// the backend entries to write.
fn plan_members(
    s: &config::Service,
    number: u32,
    backends: &mut BackendNumbers,
    plan: &mut ServicePlan,
) -> Result<Vec<RunningBackend>> {
    let mut members = Vec::with_capacity(s.backends.len());
    for b in &s.backends {
        let (n, entry_before) = match backends.running.get(&(s.key, b.addr)) {
            Some(r) => (r.number, Some(backend_entry(&r.backend, number, backends.old_gateway))),
            None => {
                let (n, _) = backends
                    .free
                    .take()
                    .ok_or_else(|| anyhow!("no free backend number for {} of {}", b.addr, s.key))?;
                plan.fresh_backends.push(n);
                (n, None)
            }
        };
        let entry = backend_entry(b, number, backends.new_gateway);
        if entry_before.is_none_or(|e| bytes_of(&e) != bytes_of(&entry)) {
            plan.backend_writes.push((n, entry));
        }
        plan.in_use_backends.insert(n);
        members.push(RunningBackend { number: n, backend: *b });
    }
    Ok(members)
}

/// Service `s`'s table, its slots in transition and its entry: recorded as a
/// new service, or as the slot writes and entry of a changed one.
fn plan_table(
    now: &Snapshot,
    s: &config::Service,
    number: u32,
    members: Vec<RunningBackend>,
    plan: &mut ServicePlan,
) -> Result<()> {
    let old = now.running.service(&s.key);
    // Any difference (backends or settings) recomputes the table; a
    // settings change alone then writes no slot, only the flags word.
    let unchanged = old.is_some_and(|o| o.model() == *s);
    let table = match old {
        Some(o) if unchanged => o.table.clone(),
        _ => {
            let identities: Vec<maglev::Backend> =
                s.backends.iter().map(|b| maglev::Backend::from_addr(b.addr, b.weight)).collect();
            let indices = maglev::populate(&identities, MAGLEV_SIZE).map_err(|e| anyhow!("service {}: {e}", s.key))?;
            let numbers: Vec<u32> = members.iter().map(|m| m.number).collect();
            maglev::to_numbers(&indices, &numbers)
        }
    };
    let (transitions, changed) = match old {
        None => (BTreeMap::new(), 0),
        Some(o) if unchanged => (o.transitions.clone(), o.changed),
        Some(o) if s.track_flows => {
            let (transitions, started) = next_transitions(o, &table, &members);
            plan.stamped |= started;
            (transitions, if started { now.tick } else { o.changed })
        }
        // Untracked: every slot steady.
        Some(o) => (BTreeMap::new(), o.changed),
    };
    let entry = service_entry(s, changed);
    let words = transition::join(&table, &transitions);
    match old {
        None => {
            let writes = words.iter().enumerate().map(|(i, &n)| (i as u32, n)).collect();
            plan.new_services.push((number, writes, entry, vip_key_bytes(&s.key)));
        }
        Some(o) => {
            let old_entry = service_entry(&o.model(), o.changed);
            let writes =
                if unchanged { Vec::new() } else { maglev::diff(&transition::join(&o.table, &o.transitions), &words) };
            if !writes.is_empty() || bytes_of(&old_entry) != bytes_of(&entry) {
                plan.changed_services.push((number, writes, entry));
            }
        }
    }
    plan.after.push(RunningService {
        number,
        key: s.key,
        hash_ports: s.hash_ports,
        track_flows: s.track_flows,
        idle_timeout: s.idle_timeout,
        udp_grace: s.udp_grace,
        changed,
        backends: members,
        table,
        transitions,
    });
    Ok(())
}

/// Where the VIPs sit in l4lb_vips after the apply.
struct VipPlan {
    /// Entries of the running VIPs (and fragment entries), by key.
    positions: HashMap<[u8; 20], u32>,
    /// Entries taken, running or new.
    taken: BTreeSet<u32>,
    /// l4lb_vips after the apply.
    after: Vec<VipEntry>,
    /// (entry, key, service number) of each new VIP.
    new_entries: Vec<(u32, [u8; 20], u32)>,
    /// Entries of removed VIPs, cleared after the grace period.
    removed_entries: Vec<u32>,
    /// How far past its home entry the farthest entry sits, plus one.
    probes_needed: u32,
}

/// The first free entry within VIP_MAX_PROBES of `home`.
fn free_vip_entry(home: u32, taken: &BTreeSet<u32>) -> Option<u32> {
    (0..VIP_MAX_PROBES).map(|i| (home + i) & VIP_MASK).find(|e| !taken.contains(e))
}

/// How many probes reach entry `e` from `home`.
fn probes_to(e: u32, home: u32) -> u32 {
    ((e.wrapping_sub(home)) & VIP_MASK) + 1
}

fn place_vips(now: &Snapshot, wanted: &Model, numbers: &ServiceNumbers) -> Result<VipPlan> {
    let positions = now.vip_positions();
    let mut vips = VipPlan {
        taken: positions.values().copied().collect(),
        positions,
        after: now.vips.clone(),
        new_entries: Vec::new(),
        removed_entries: Vec::new(),
        probes_needed: 0,
    };
    for r in &numbers.removed {
        if let Some(&e) = vip_key_bytes(&r.key).and_then(|kb| vips.positions.get(&kb)) {
            vips.removed_entries.push(e);
            vips.after[e as usize] = [0; 24];
        }
    }
    for s in &wanted.services {
        let Some(kb) = vip_key_bytes(&s.key) else { continue };
        let home = vip_home(&kb);
        let entry = match vips.positions.get(&kb) {
            Some(&e) if now.running.service(&s.key).is_some() => e,
            _ => {
                let e = free_vip_entry(home, &vips.taken).ok_or_else(|| {
                    anyhow!(
                        "VIP {}: no free entry in l4lb_vips within L4LB_VIP_MAX_PROBES = {VIP_MAX_PROBES} entries of its home entry {home}",
                        s.key
                    )
                })?;
                let n = numbers.number_of[&s.key];
                vips.taken.insert(e);
                vips.new_entries.push((e, kb, n));
                vips.after[e as usize] = vip_entry(&kb, n);
                e
            }
        };
        vips.probes_needed = vips.probes_needed.max(probes_to(entry, home));
    }
    Ok(vips)
}

/// Fragment entries: (entry, key bytes, service number) to publish in (b)
/// (staged, then the family byte); (entry, value) to re-point in (b), to
/// unpublish or re-point before the first grace period ("early": the entry
/// names a number a new service reuses, or no running service), to
/// unpublish in (d); entries to clear in (g).
struct FragmentPlan {
    publish: Vec<(u32, [u8; 20], u32)>,
    repoint: Vec<(u32, VipEntry)>,
    early: Vec<(u32, VipEntry)>,
    unpublish: Vec<(u32, VipEntry)>,
    clear: Vec<u32>,
}

fn plan_fragments(
    now: &Snapshot,
    wanted: &Model,
    numbers: &ServiceNumbers,
    vips: &mut VipPlan,
) -> Result<FragmentPlan> {
    let running = &now.running;
    let old_fragments: BTreeMap<[u8; 20], (u32, u32)> = now
        .vips
        .iter()
        .enumerate()
        .filter(|(_, e)| fragment_from(e).is_some())
        .map(|(i, e)| (e[..20].try_into().expect("20 bytes"), (i as u32, vip_service(e))))
        .collect();
    let wanted_fragments = fragment_targets(&wanted.services);
    let staying = numbers.staying(now);
    let mut plan = FragmentPlan {
        publish: Vec::new(),
        repoint: Vec::new(),
        early: Vec::new(),
        unpublish: Vec::new(),
        clear: Vec::new(),
    };
    for (kb, &(e, was)) in &old_fragments {
        let mut off = now.vips[e as usize];
        off[16] = 0;
        let early = numbers.reused.contains(&was) || running.services.iter().all(|s| s.number != was);
        match wanted_fragments.get(kb).map(|t| numbers.number_of[t]) {
            None => {
                if early {
                    plan.early.push((e, off));
                } else {
                    plan.unpublish.push((e, off));
                }
                plan.clear.push(e);
                vips.after[e as usize] = [0; 24];
            }
            Some(n) => {
                vips.probes_needed = vips.probes_needed.max(probes_to(e, vip_home(kb)));
                if n == was && staying.contains(&was) {
                    continue;
                }
                let entry = vip_entry(kb, n);
                vips.after[e as usize] = entry;
                if !early {
                    plan.repoint.push((e, entry));
                } else if staying.contains(&n) {
                    plan.early.push((e, entry));
                } else {
                    plan.early.push((e, off));
                    plan.publish.push((e, *kb, n));
                }
            }
        }
    }
    for (kb, target) in &wanted_fragments {
        if old_fragments.contains_key(kb) {
            continue;
        }
        let home = vip_home(kb);
        let e = free_vip_entry(home, &vips.taken).ok_or_else(|| {
            let name = match target {
                ServiceKey::Vip { addr, protocol, .. } => format!("{addr}/{}", protocol.name()),
                ServiceKey::CatchAll => unreachable!("the catch-all has no fragment entry"),
            };
            anyhow!(
                "fragment entry of {name}: no free entry in l4lb_vips within L4LB_VIP_MAX_PROBES = {VIP_MAX_PROBES} entries of its home entry {home}"
            )
        })?;
        vips.taken.insert(e);
        let n = numbers.number_of[target];
        plan.publish.push((e, *kb, n));
        vips.after[e as usize] = vip_entry(kb, n);
        vips.probes_needed = vips.probes_needed.max(probes_to(e, home));
    }
    Ok(plan)
}

/// The configuration word as written at (a), at (b), and at the end.
struct Configs {
    a: Config,
    b: Config,
    fin: Config,
}

fn plan_configs(
    now: &Snapshot,
    wanted: &Model,
    numbers: &ServiceNumbers,
    probes_needed: u32,
    stamped: bool,
    fresh_seed: u32,
) -> Configs {
    let old = now.config;
    let g = &wanted.global;
    let set = |c: &mut Config, bit: u32, on: bool| if on { c.flags |= bit } else { c.flags &= !bit };
    let mut fin = old;
    let seed_set = old.flags & consts::L4LB_CONFIG_SEED_SET != 0;
    match g.hash_seed {
        Some(seed) if seed_set && old.hash_seed == seed => {}
        Some(seed) => {
            fin.hash_seed = seed;
            fin.flags |= consts::L4LB_CONFIG_SEED_SET | consts::L4LB_CONFIG_SEED_FIXED;
        }
        None if seed_set => {}
        None => {
            fin.hash_seed = fresh_seed;
            fin.flags |= consts::L4LB_CONFIG_SEED_SET;
            fin.flags &= !consts::L4LB_CONFIG_SEED_FIXED;
        }
    }
    fin.src_v4 = g.source_v4.map(|a| a.octets()).unwrap_or_default();
    set(&mut fin, consts::L4LB_CONFIG_SRC_SET, g.source_v4.is_some());
    fin.src_v6 = g.source_v6.map(|a| a.octets()).unwrap_or_default();
    set(&mut fin, consts::L4LB_CONFIG_SRC6_SET, g.source_v6.is_some());
    fin.gateway_mac = g.gateway_mac.unwrap_or_default();
    set(&mut fin, consts::L4LB_CONFIG_GATEWAY_SET, g.gateway_mac.is_some());
    let catch_all = numbers.number_of.get(&ServiceKey::CatchAll).copied();
    fin.catch_all = catch_all.unwrap_or(0);
    set(&mut fin, consts::L4LB_CONFIG_CATCH_ALL, catch_all.is_some());
    let any_port = wanted.services.iter().any(|s| matches!(s.key, ServiceKey::Vip { port: 0, .. }));
    set(&mut fin, consts::L4LB_CONFIG_ANY_PORT, any_port);
    fin.vip_probes = probes_needed;
    if let Some(mtu) = g.mtu {
        fin.mtu = mtu;
    }
    // (a): sources and gateway new backends need; old values kept where the
    // wanted model drops them (removed services still send until (d)); the
    // MTU.
    let mut a = old;
    a.mtu = fin.mtu;
    // Slots go into transition: the tick they count from, before them.
    if stamped {
        a.clock = now.tick;
        fin.clock = now.tick;
    }
    if let Some(addr) = g.source_v4 {
        a.src_v4 = addr.octets();
        a.flags |= consts::L4LB_CONFIG_SRC_SET;
    }
    if let Some(addr) = g.source_v6 {
        a.src_v6 = addr.octets();
        a.flags |= consts::L4LB_CONFIG_SRC6_SET;
    }
    if let Some(m) = g.gateway_mac {
        a.gateway_mac = m;
        a.flags |= consts::L4LB_CONFIG_GATEWAY_SET;
    }
    let removed_catch_all = numbers.removed.iter().find(|s| s.key == ServiceKey::CatchAll).map(|s| s.number);
    if removed_catch_all.is_some_and(|n| numbers.reused.contains(&n)) {
        a.flags &= !consts::L4LB_CONFIG_CATCH_ALL;
        a.catch_all = 0;
    }
    // (b): lookups cover old and new VIPs; the new catch-all is published.
    let mut b = a;
    b.vip_probes = old.vip_probes.max(fin.vip_probes);
    if any_port {
        b.flags |= consts::L4LB_CONFIG_ANY_PORT;
    }
    if let Some(n) = catch_all.filter(|_| now.running.service(&ServiceKey::CatchAll).is_none()) {
        b.flags |= consts::L4LB_CONFIG_CATCH_ALL;
        b.catch_all = n;
    }
    Configs { a, b, fin }
}

/// A VIP entry written with family 0 (not matched), then whole.
fn publish_vip(steps: &mut Vec<Step>, e: u32, kb: &[u8; 20], n: u32) {
    let mut staged = vip_entry(kb, n);
    staged[16] = 0;
    steps.push(Step::Write { map: MapId::Vips, key: e, value: staged.to_vec() });
    steps.push(Step::Write { map: MapId::Vips, key: e, value: vip_entry(kb, n).to_vec() });
}

/// A running VIP entry unpublished: its family byte 0.
fn unpublish_vip(steps: &mut Vec<Step>, now: &Snapshot, vips: &VipPlan, r: &RunningService) {
    if let Some(e) = vip_key_bytes(&r.key).and_then(|kb| vips.positions.get(&kb)) {
        let mut freed = now.vips[*e as usize];
        freed[16] = 0;
        steps.push(Step::Write { map: MapId::Vips, key: *e, value: freed.to_vec() });
    }
}

/// The writes in the order of the module comment's steps (a) to (g), then
/// without the configuration writes that change nothing.
fn order_steps(
    now: &Snapshot,
    numbers: &ServiceNumbers,
    services: &ServicePlan,
    vips: &VipPlan,
    fragments: &FragmentPlan,
    configs: &Configs,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let write = |map: MapId, key: u32, value: Vec<u8>| Step::Write { map, key, value };
    // (a)
    for &n in &services.fresh_backends {
        steps.push(Step::Zero { map: MapId::BackendStats, key: n });
    }
    for (n, entry) in &services.backend_writes {
        steps.push(write(MapId::Backends, *n, bytes_of(entry)));
    }
    steps.push(write(MapId::Config, 0, bytes_of(&configs.a)));
    // Removed services whose number a new service takes: unpublished first.
    let early: Vec<&&RunningService> = numbers.removed.iter().filter(|r| numbers.reused.contains(&r.number)).collect();
    if !early.is_empty() || !fragments.early.is_empty() {
        for (e, value) in &fragments.early {
            steps.push(write(MapId::Vips, *e, value.to_vec()));
        }
        for r in &early {
            unpublish_vip(&mut steps, now, vips, r);
        }
        steps.push(Step::Grace);
    }
    // (b)
    for (n, writes, entry, _) in &services.new_services {
        steps.push(Step::Zero { map: MapId::ServiceStats, key: *n });
        steps.push(Step::Slots { service: *n, writes: writes.clone() });
        steps.push(write(MapId::Services, *n, bytes_of(entry)));
    }
    steps.push(write(MapId::Config, 0, bytes_of(&configs.b)));
    for (e, kb, n) in vips.new_entries.iter().chain(&fragments.publish) {
        publish_vip(&mut steps, *e, kb, *n);
    }
    for (e, value) in &fragments.repoint {
        steps.push(write(MapId::Vips, *e, value.to_vec()));
    }
    // (c)
    for (n, writes, entry) in &services.changed_services {
        if !writes.is_empty() {
            steps.push(Step::Slots { service: *n, writes: writes.clone() });
        }
        steps.push(write(MapId::Services, *n, bytes_of(entry)));
    }
    // (d), (e)
    for (e, value) in &fragments.unpublish {
        steps.push(write(MapId::Vips, *e, value.to_vec()));
    }
    for r in numbers.removed.iter().filter(|r| !numbers.reused.contains(&r.number)) {
        unpublish_vip(&mut steps, now, vips, r);
    }
    steps.push(write(MapId::Config, 0, bytes_of(&configs.fin)));
    // (f), (g)
    let in_use_services: BTreeSet<u32> = numbers.number_of.values().copied().collect();
    let mut clears = Vec::new();
    for &e in vips.removed_entries.iter().chain(&fragments.clear) {
        clears.push(write(MapId::Vips, e, vec![0; 24]));
    }
    for r in numbers.removed.iter().filter(|r| !in_use_services.contains(&r.number)) {
        clears.push(write(MapId::Services, r.number, bytes_of(&bpf::Service::default())));
    }
    for &n in services.removed_backends.iter().filter(|n| !services.in_use_backends.contains(n)) {
        clears.push(write(MapId::Backends, n, bytes_of(&bpf::Backend::default())));
    }
    if !clears.is_empty() {
        steps.push(Step::Grace);
        steps.extend(clears);
    }
    drop_unchanged_config_writes(&mut steps, &now.config);
    steps
}

/// Drops the configuration writes that change nothing; a plan of grace
/// periods alone becomes empty.
fn drop_unchanged_config_writes(steps: &mut Vec<Step>, old: &Config) {
    let mut config_now = bytes_of(old);
    steps.retain(|s| match s {
        Step::Write { map: MapId::Config, value, .. } => {
            let changes = *value != config_now;
            config_now = value.clone();
            changes
        }
        _ => true,
    });
    if steps.iter().all(|s| matches!(s, Step::Grace)) {
        steps.clear();
    }
}

/// The maps as the plan leaves them.
fn snapshot_after(
    now: &Snapshot,
    g: &config::Global,
    services: Vec<RunningService>,
    vips: Vec<VipEntry>,
    fin: Config,
) -> Snapshot {
    Snapshot {
        running: Running {
            global: config::Global {
                source_v4: g.source_v4,
                source_v6: g.source_v6,
                gateway_mac: g.gateway_mac,
                hash_seed: Some(fin.hash_seed),
                mtu: (fin.mtu != 0).then_some(fin.mtu),
            },
            seed_fixed: fin.flags & consts::L4LB_CONFIG_SEED_FIXED != 0,
            services,
            fragments: fragments_of(&vips),
        },
        config: fin,
        vips,
        service_tables: now.service_tables,
        tick: now.tick,
    }
}

/// The slots in transition of a tracked service after an apply that gives
/// it `table` (current backend numbers) and `members`, from the running
/// service `old`; and whether any slot went into transition or changed
/// while in one (then the service's `changed` is stamped).
fn next_transitions(old: &RunningService, table: &[u32], members: &[RunningBackend]) -> (BTreeMap<u32, u32>, bool) {
    // An old number stays when the same backend (address) keeps it.
    let stays = |n: u32| {
        old.backends
            .iter()
            .find(|b| b.number == n)
            .is_some_and(|b| members.iter().any(|m| m.number == n && m.backend.addr == b.backend.addr))
    };
    let mut transitions = BTreeMap::new();
    let mut started = false;
    for (i, &current) in table.iter().enumerate() {
        let slot = i as u32;
        let was = transition::Slot::of(old.table[i], old.transitions.get(&slot).copied());
        let next = transition::next_slot(was, current, stays);
        if let Some(previous) = next.previous() {
            transitions.insert(slot, previous);
            started |= next != was;
        }
    }
    (transitions, started)
}

// ---------------------------------------------------------------------------
// Execution

/// Reads and writes of the maps the engine needs.
pub trait Io {
    /// The bytes of an entry (every CPU's value, concatenated, for per-CPU maps).
    fn read(&self, map: MapId, key: u32) -> Result<Vec<u8>>;
    fn write(&self, map: MapId, key: u32, value: &[u8]) -> Result<()>;
    /// `count` consecutive u32 entries of l4lb_tables from `start`.
    fn read_slots(&self, start: u32, count: u32) -> Result<Vec<u32>>;
    /// (index, value) entries of l4lb_tables.
    fn write_slots(&self, entries: &[(u32, u32)]) -> Result<()>;
    /// Waits for an RCU grace period.
    fn grace(&self);
}

enum Undo {
    Entry { map: MapId, key: u32, old: Vec<u8> },
    Slots(Vec<(u32, u32)>),
    Grace,
}

/// A refused write: which map and key.
#[derive(Debug)]
struct Refused {
    map: MapId,
    key: u32,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writing entry {} of map `{}`", self.key, self.map.name())
    }
}

/// Carries out the steps in order. If a write fails, every write done is
/// undone in reverse order (waiting for a grace period where the steps did)
/// and the error names the map and key; the maps are then byte for byte as
/// they were.
pub fn execute(io: &dyn Io, plan: &Plan) -> Result<()> {
    let mut journal: Vec<Undo> = Vec::new();
    let result = run_steps(io, &plan.steps, &mut journal);
    let Err(err) = result else { return Ok(()) };
    match undo(io, journal) {
        Ok(()) => Err(err.context("the update was rolled back; the maps are as they were")),
        Err(restore) => {
            Err(err.context(format!("rolling back failed too, the maps are left half-updated: {restore:#}")))
        }
    }
}

fn run_steps(io: &dyn Io, steps: &[Step], journal: &mut Vec<Undo>) -> Result<()> {
    for step in steps {
        match step {
            Step::Write { map, key, value } => {
                let old =
                    io.read(*map, *key).with_context(|| format!("reading entry {key} of map `{}`", map.name()))?;
                if old == *value {
                    continue;
                }
                journal.push(Undo::Entry { map: *map, key: *key, old });
                io.write(*map, *key, value).context(Refused { map: *map, key: *key })?;
            }
            Step::Zero { map, key } => {
                let old =
                    io.read(*map, *key).with_context(|| format!("reading entry {key} of map `{}`", map.name()))?;
                if old.iter().all(|&b| b == 0) {
                    continue;
                }
                let zero = vec![0u8; old.len()];
                journal.push(Undo::Entry { map: *map, key: *key, old });
                io.write(*map, *key, &zero).context(Refused { map: *map, key: *key })?;
            }
            Step::Slots { service, writes } => {
                let base = service * MAGLEV_SIZE as u32;
                let lo = writes.iter().map(|w| w.0).min().unwrap_or(0);
                let hi = writes.iter().map(|w| w.0).max().unwrap_or(0);
                let old = io
                    .read_slots(base + lo, hi - lo + 1)
                    .with_context(|| format!("reading the table of service {service} in map `{}`", bpf::MAP_TABLES))?;
                let mut undo = Vec::new();
                let mut entries = Vec::new();
                for &(slot, number) in writes {
                    let was = old[(slot - lo) as usize];
                    if was != number {
                        undo.push((base + slot, was));
                        entries.push((base + slot, number));
                    }
                }
                if entries.is_empty() {
                    continue;
                }
                journal.push(Undo::Slots(undo));
                io.write_slots(&entries).context(Refused { map: MapId::Tables, key: entries[0].0 })?;
            }
            Step::Grace => {
                io.grace();
                journal.push(Undo::Grace);
            }
        }
    }
    Ok(())
}

fn undo(io: &dyn Io, journal: Vec<Undo>) -> Result<()> {
    for entry in journal.into_iter().rev() {
        match entry {
            Undo::Entry { map, key, old } => io.write(map, key, &old).context(Refused { map, key })?,
            Undo::Slots(entries) => {
                io.write_slots(&entries).context(Refused { map: MapId::Tables, key: entries[0].0 })?
            }
            Undo::Grace => io.grace(),
        }
    }
    Ok(())
}

/// An [`Io`] that refuses its `fail_at`-th write (0-based; slot batches
/// count as one write): for checking the rollback, in the tests and the
/// root suite.
pub struct Faulty<'a> {
    pub inner: &'a dyn Io,
    pub fail_at: usize,
    pub writes: std::cell::Cell<usize>,
}

impl<'a> Faulty<'a> {
    pub fn new(inner: &'a dyn Io, fail_at: usize) -> Self {
        Faulty { inner, fail_at, writes: std::cell::Cell::new(0) }
    }

    fn count(&self) -> Result<()> {
        let n = self.writes.get();
        self.writes.set(n + 1);
        if n == self.fail_at {
            bail!("injected failure (write {n})");
        }
        Ok(())
    }
}

impl Io for Faulty<'_> {
    fn read(&self, map: MapId, key: u32) -> Result<Vec<u8>> {
        self.inner.read(map, key)
    }
    fn write(&self, map: MapId, key: u32, value: &[u8]) -> Result<()> {
        self.count()?;
        self.inner.write(map, key, value)
    }
    fn read_slots(&self, start: u32, count: u32) -> Result<Vec<u32>> {
        self.inner.read_slots(start, count)
    }
    fn write_slots(&self, entries: &[(u32, u32)]) -> Result<()> {
        self.count()?;
        self.inner.write_slots(entries)
    }
    fn grace(&self) {
        self.inner.grace()
    }
}

/// The maps in memory, as the kernel would hold them (tests).
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::cell::RefCell;

    pub struct FakeMaps {
        pub entries: RefCell<BTreeMap<MapId, Vec<Vec<u8>>>>,
        pub tables: RefCell<Vec<u32>>,
        pub graces: std::cell::Cell<usize>,
    }

    impl FakeMaps {
        pub fn new() -> Self {
            let mut entries = BTreeMap::new();
            entries.insert(MapId::Config, vec![vec![0; size_of::<Config>()]]);
            entries.insert(MapId::Vips, vec![vec![0; 24]; VIP_SLOTS]);
            entries.insert(MapId::Services, vec![vec![0; size_of::<bpf::Service>()]; MAX_SERVICES]);
            entries.insert(MapId::Backends, vec![vec![0; size_of::<bpf::Backend>()]; MAX_BACKENDS]);
            let cpus = 2;
            entries.insert(MapId::BackendStats, vec![vec![0; 16 * cpus]; MAX_BACKENDS]);
            entries.insert(MapId::ServiceStats, vec![vec![0; 16 * cpus]; MAX_SERVICES]);
            FakeMaps {
                entries: RefCell::new(entries),
                tables: RefCell::new(vec![0; MAX_SERVICES * MAGLEV_SIZE]),
                graces: std::cell::Cell::new(0),
            }
        }

        /// Every byte, for before/after comparisons.
        pub fn dump(&self) -> (BTreeMap<MapId, Vec<Vec<u8>>>, Vec<u32>) {
            (self.entries.borrow().clone(), self.tables.borrow().clone())
        }

        pub fn snapshot(&self) -> Snapshot {
            let e = self.entries.borrow();
            let config: Config = bpf::value_from(&e[&MapId::Config][0]).unwrap();
            let vips = e[&MapId::Vips].iter().map(|v| v[..].try_into().unwrap()).collect();
            let services: Vec<bpf::Service> = e[&MapId::Services].iter().map(|v| bpf::value_from(v).unwrap()).collect();
            let backends: Vec<bpf::Backend> = e[&MapId::Backends].iter().map(|v| bpf::value_from(v).unwrap()).collect();
            let tables = self.tables.borrow();
            decode(config, vips, &services, &backends, |n| {
                let base = n as usize * MAGLEV_SIZE;
                Ok(tables[base..base + MAGLEV_SIZE].to_vec())
            })
            .unwrap()
        }
    }

    impl Io for FakeMaps {
        fn read(&self, map: MapId, key: u32) -> Result<Vec<u8>> {
            Ok(self.entries.borrow()[&map][key as usize].clone())
        }
        fn write(&self, map: MapId, key: u32, value: &[u8]) -> Result<()> {
            let mut e = self.entries.borrow_mut();
            let slot = &mut e.get_mut(&map).unwrap()[key as usize];
            assert_eq!(slot.len(), value.len(), "value size of {map:?}");
            slot.copy_from_slice(value);
            Ok(())
        }
        fn read_slots(&self, start: u32, count: u32) -> Result<Vec<u32>> {
            Ok(self.tables.borrow()[start as usize..(start + count) as usize].to_vec())
        }
        fn write_slots(&self, entries: &[(u32, u32)]) -> Result<()> {
            let mut t = self.tables.borrow_mut();
            for &(k, v) in entries {
                t[k as usize] = v;
            }
            Ok(())
        }
        fn grace(&self) {
            self.graces.set(self.graces.get() + 1);
        }
    }
}

#[cfg(test)]
mod tests;
