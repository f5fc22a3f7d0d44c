//! `l4lb status`: the balancer's settings and, per service, its backends,
//! their weights and slot counts in the service's Maglev table, the table's
//! health (slots that lead nowhere) and its slots in transition
//! (docs/transitions.md: how many, from which backend, when the service last
//! changed); with `--flows`, the flows pinned to each backend, which is how
//! a draining backend is seen to empty out. Pure: the caller reads the maps
//! (the running state, the flow table's entries) and the program; this
//! counts, builds, renders and serialises.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use comfy_table::{presets, Cell, CellAlignment, Table};
use num_format::{Locale, ToFormattedString};
use serde::Serialize;

use crate::bpf::{FlowKey, FlowPin, FAMILY_IPV4, FAMILY_IPV6, MAGLEV_SIZE, SLOT_EMPTY};
use crate::config::{format_mac, Protocol, ServiceKey, IDLE_TIMEOUT_DEFAULT, UDP_GRACE_DEFAULT};
use crate::discover::Mode;
use crate::state::{Running, RunningService};
use crate::stats::{service_label, table_text, ServiceId};

/// What the caller knows about the interface and the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub interface: String,
    pub ifindex: u32,
    /// The program's name and id as the kernel reports them.
    pub name: String,
    pub id: u32,
    pub mode: Mode,
    /// Whether the counter maps are per-CPU (else shared, atomic adds).
    pub per_cpu_counters: bool,
    /// l4lb_config.vip_probes: how many entries a VIP lookup looks at.
    pub vip_probes: Option<u32>,
    /// The flow table (l4lb_flows) as the kernel describes it.
    pub flow_table: FlowTable,
    /// l4lb_config.clock and the host's tick now (None if not read).
    pub tick: Option<Tick>,
}

/// The datapath's tick as written by the last apply or sweep, and now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub clock: u32,
    pub now: u32,
}

/// The flow table's type and size (the map's info; no entry read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTable {
    /// An LRU hash (evicts the least recently used pins), else a hash (evicts nothing).
    pub lru: bool,
    pub max_entries: u32,
}

/// The `--json` object, and what the text shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub interface: String,
    pub ifindex: u32,
    pub program: String,
    pub program_id: u32,
    /// `driver`, `generic` or `offload`.
    pub mode: &'static str,
    pub per_cpu_counters: bool,
    /// None until a seed has been chosen (the first apply).
    pub hash_seed: Option<u32>,
    /// Whether the seed was given by the operator (else random).
    pub seed_fixed: bool,
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    pub gateway_mac: Option<String>,
    /// Largest L3 packet after encapsulation; 0 = no limit.
    pub mtu: u32,
    /// VIPs (services other than the catch-all).
    pub vips: usize,
    /// Entries a VIP lookup looks at (None if not read).
    pub vip_probes: Option<u32>,
    /// The fragment entries of l4lb_vips: where fragments (no ports) of
    /// each VIP address and protocol go.
    pub fragments: Vec<FragmentStatus>,
    pub flow_table: FlowTableStatus,
    /// The tick (l4lb_config.clock) and its age in seconds.
    pub tick: Option<TickStatus>,
    pub services: Vec<ServiceStatus>,
    #[serde(skip)]
    pub mode_label: String,
}

/// The tick pins and transitions count time by.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TickStatus {
    pub clock: u32,
    /// Seconds since it was written (by an apply or `l4lb settle`).
    pub age: u32,
}

/// One fragment entry: fragments of (`vip`, `protocol`) go to service
/// `number` (`service`, its key as `l4lb` prints it; None if no running
/// service has that number).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FragmentStatus {
    pub vip: IpAddr,
    pub protocol: &'static str,
    pub service: Option<String>,
    pub number: u32,
    /// Index of the entry in l4lb_vips.
    pub entry: u32,
}

/// The flow table; `entries` and `stale` only when it was walked (`--flows`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowTableStatus {
    /// `lru_hash` or `hash`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub max_entries: u32,
    /// Entries in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<usize>,
    /// Entries whose pin no longer holds (see [`PinCounter`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStatus {
    /// The key as `l4lb` prints it (see stats::ServiceTraffic).
    pub service: String,
    #[serde(flatten)]
    pub id: ServiceId,
    pub number: u32,
    /// Whether UDP flows hash their ports (TCP flows always do).
    pub hash_ports: bool,
    /// Whether a table change puts the slots whose backend changed in
    /// transition (connection tracking).
    pub track_flows: bool,
    /// Seconds a connection may stay silent through a change and keep its
    /// backend (`l4lb settle` ends a transition once its pins are that idle).
    pub idle_timeout: u32,
    /// Seconds after a change during which UDP flows without a pin count as
    /// flows from before it.
    pub udp_grace: u32,
    /// Tick (l4lb_config.clock) of the last apply that put slots of it in
    /// transition; 0 = none since it was added.
    pub changed: u32,
    /// Slots of the service's table.
    pub slots: usize,
    /// Slots naming no backend (L4LB_SLOT_EMPTY): their flows are dropped.
    pub unset_slots: usize,
    /// Slots naming a backend number that is not one of the service's
    /// backends: should be 0.
    pub foreign_slots: usize,
    /// Slots in transition: new flows to their current backend, flows from
    /// before the change to their previous one (0 once `l4lb settle` ended
    /// them all).
    pub transition_slots: usize,
    /// Flows pinned to the service's backends (with `--flows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<usize>,
    pub backends: Vec<BackendStatus>,
    #[serde(skip)]
    pub key: ServiceKey,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendStatus {
    pub number: u32,
    pub addr: IpAddr,
    /// The next hop's MAC the datapath writes (the gateway's if the backend
    /// has none of its own; None if that is not set either).
    pub mac: Option<String>,
    /// True when `mac` is the gateway's.
    pub via_gateway: bool,
    pub weight: u32,
    /// Slots of the service's table naming this backend.
    pub slots: usize,
    /// Those slots as a percentage of the table.
    pub share: f64,
    /// Slots in transition whose previous backend it is: flows from before
    /// the change still go to it there.
    pub previous_slots: usize,
    /// Flows pinned to the backend whose pin holds (with `--flows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<usize>,
}

/// What a walk of the flow table found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Entries seen.
    pub entries: usize,
    /// Entries whose pin does not hold.
    pub stale: usize,
    /// Pins that hold, per backend number.
    pub pinned: HashMap<u32, usize>,
}

/// An address as the maps hold it: the family, and IPv4 in the first 4 bytes.
fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (FAMILY_IPV4, bytes)
        }
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
    }
}

fn ip_protocol(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// A VIP address and protocol as a flow key holds them: (address, family, protocol).
type Destination = ([u8; 16], u8, u8);

/// Counts the entries of l4lb_flows, fed one by one (the table is walked in
/// batches, never held whole), against the running state. A pin holds, as
/// in the datapath (src/bpf/flows.h), when its backend number names an
/// active backend with the pin's family and address, of the flow's
/// service, and the slot it was made in (its index in l4lb_tables) is a
/// slot of that service still in transition: the datapath reads pins in
/// such slots only, so a pin left in a slot whose transition ended is
/// stale too (`l4lb settle` deletes it). The flow's service is found from
/// the key like the datapath finds a packet's: its VIP (with the
/// destination port, else the address's every-port VIP), else the
/// catch-all. A key without ports (a fragment, or a UDP service that hashes
/// addresses only) does not say which port it was sent to: any service of
/// its address and protocol (its fragment entry's, its VIPs', the
/// catch-all) counts as its own. The slot is not hashed again from the key:
/// a pin of a flow that a new hash seed moved to another slot still in
/// transition counts as holding.
pub struct PinCounter {
    /// Backend number -> (service number, family, address).
    backends: HashMap<u32, (u32, u8, [u8; 16])>,
    /// The slots in transition, as indices in l4lb_tables.
    transitions: HashSet<u32>,
    /// (destination, port) -> service number; port 0 takes every port.
    vips: HashMap<(Destination, u16), u32>,
    /// Destination -> the services of its VIPs and fragment entry.
    destinations: HashMap<Destination, Vec<u32>>,
    catch_all: Option<u32>,
    counts: FlowCounts,
}

impl PinCounter {
    pub fn new(running: &Running) -> Self {
        let mut counter = PinCounter {
            backends: HashMap::new(),
            transitions: HashSet::new(),
            vips: HashMap::new(),
            destinations: HashMap::new(),
            catch_all: None,
            counts: FlowCounts::default(),
        };
        for service in &running.services {
            for b in &service.backends {
                let (family, addr) = addr_bytes(b.backend.addr);
                counter.backends.insert(b.number, (service.number, family, addr));
            }
            let base = service.number * MAGLEV_SIZE as u32;
            counter.transitions.extend(service.transitions.keys().map(|slot| base + slot));
            match service.key {
                ServiceKey::CatchAll => counter.catch_all = Some(service.number),
                ServiceKey::Vip { addr, protocol, port } => {
                    let (family, addr) = addr_bytes(addr);
                    let destination = (addr, family, ip_protocol(protocol));
                    counter.vips.insert((destination, port), service.number);
                    counter.destinations.entry(destination).or_default().push(service.number);
                }
            }
        }
        for fragment in &running.fragments {
            let (family, addr) = addr_bytes(fragment.addr);
            counter
                .destinations
                .entry((addr, family, ip_protocol(fragment.protocol)))
                .or_default()
                .push(fragment.service);
        }
        counter
    }

    /// Whether a flow with this key may belong to service `number`.
    fn flow_of(&self, key: &FlowKey, number: u32) -> bool {
        let destination = (key.daddr, key.family, key.proto);
        if key.ports == 0 {
            return self.catch_all == Some(number)
                || self.destinations.get(&destination).is_some_and(|services| services.contains(&number));
        }
        // Source and destination port as on the wire: the destination port is the second half.
        let bytes = key.ports.to_ne_bytes();
        let port = u16::from_be_bytes([bytes[2], bytes[3]]);
        let service = self
            .vips
            .get(&(destination, port))
            .or_else(|| self.vips.get(&(destination, 0)))
            .copied()
            .or(self.catch_all);
        service == Some(number)
    }

    /// Whether `pin.slot` is a slot in transition of service `number`.
    fn in_transition(&self, pin: &FlowPin, number: u32) -> bool {
        pin.slot / MAGLEV_SIZE as u32 == number && self.transitions.contains(&pin.slot)
    }

    pub fn add(&mut self, key: &FlowKey, pin: &FlowPin) {
        self.counts.entries += 1;
        let holds = self.backends.get(&pin.backend).is_some_and(|&(service, family, addr)| {
            family == pin.family && addr == pin.addr && self.flow_of(key, service) && self.in_transition(pin, service)
        });
        if holds {
            *self.counts.pinned.entry(pin.backend).or_default() += 1;
        } else {
            self.counts.stale += 1;
        }
    }

    pub fn finish(self) -> FlowCounts {
        self.counts
    }
}

/// The pins of `entries` counted against `running` (see [`PinCounter`]).
pub fn count_pins<'a>(running: &Running, entries: impl IntoIterator<Item = (&'a FlowKey, &'a FlowPin)>) -> FlowCounts {
    let mut counter = PinCounter::new(running);
    for (key, pin) in entries {
        counter.add(key, pin);
    }
    counter.finish()
}

/// The status of `running` on `program`, with the flow table's counts if it
/// was walked.
pub fn build(program: &Program, running: &Running, flows: Option<&FlowCounts>) -> Status {
    let gateway = running.global.gateway_mac;
    Status {
        interface: program.interface.clone(),
        ifindex: program.ifindex,
        program: program.name.clone(),
        program_id: program.id,
        mode: program.mode.json_name(),
        per_cpu_counters: program.per_cpu_counters,
        hash_seed: running.global.hash_seed,
        seed_fixed: running.seed_fixed,
        source_v4: running.global.source_v4,
        source_v6: running.global.source_v6,
        gateway_mac: gateway.map(format_mac),
        mtu: running.global.mtu.unwrap_or(0),
        vips: running.services.iter().filter(|s| s.key != ServiceKey::CatchAll).count(),
        vip_probes: program.vip_probes,
        fragments: running
            .fragments
            .iter()
            .map(|f| FragmentStatus {
                vip: f.addr,
                protocol: f.protocol.name(),
                service: running.service_numbered(f.service).map(|s| s.key.to_string()),
                number: f.service,
                entry: f.entry,
            })
            .collect(),
        flow_table: FlowTableStatus {
            kind: if program.flow_table.lru { "lru_hash" } else { "hash" },
            max_entries: program.flow_table.max_entries,
            entries: flows.map(|f| f.entries),
            stale: flows.map(|f| f.stale),
        },
        tick: program.tick.map(|t| TickStatus { clock: t.clock, age: t.now.saturating_sub(t.clock) }),
        services: running.services.iter().map(|s| service(s, gateway, flows)).collect(),
        mode_label: program.mode.to_string(),
    }
}

fn service(service: &RunningService, gateway: Option<[u8; 6]>, flows: Option<&FlowCounts>) -> ServiceStatus {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &number in &service.table {
        *counts.entry(number).or_default() += 1;
    }
    let mut previous: HashMap<u32, usize> = HashMap::new();
    for &number in service.transitions.values() {
        *previous.entry(number).or_default() += 1;
    }
    let slots = service.table.len();
    let unset_slots = counts.get(&SLOT_EMPTY).copied().unwrap_or(0);
    let backends: Vec<BackendStatus> = service
        .backends
        .iter()
        .map(|b| {
            let taken = counts.get(&b.number).copied().unwrap_or(0);
            BackendStatus {
                number: b.number,
                addr: b.backend.addr,
                mac: b.backend.mac.or(gateway).map(format_mac),
                via_gateway: b.backend.mac.is_none(),
                weight: b.backend.weight,
                slots: taken,
                share: if slots == 0 { 0.0 } else { 100.0 * taken as f64 / slots as f64 },
                previous_slots: previous.get(&b.number).copied().unwrap_or(0),
                pinned: flows.map(|f| f.pinned.get(&b.number).copied().unwrap_or(0)),
            }
        })
        .collect();
    let own: HashSet<u32> = service.backends.iter().map(|b| b.number).collect();
    let foreign_slots = counts.iter().filter(|(n, _)| **n != SLOT_EMPTY && !own.contains(n)).map(|(_, c)| c).sum();
    ServiceStatus {
        service: service.key.to_string(),
        id: ServiceId::from(&service.key),
        number: service.number,
        hash_ports: service.hash_ports,
        track_flows: service.track_flows,
        idle_timeout: service.idle_timeout,
        udp_grace: service.udp_grace,
        changed: service.changed,
        slots,
        unset_slots,
        foreign_slots,
        transition_slots: service.transitions.len(),
        pinned: flows.map(|_| backends.iter().filter_map(|b| b.pinned).sum()),
        backends,
        key: service.key,
    }
}

fn or_not_set<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "not set".to_string(), |v| v.to_string())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{} {}", n.to_formatted_string(&Locale::en), if n == 1 { one } else { many })
}

/// The status as text: settings, then one block per service.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let label = if label.is_empty() { String::new() } else { format!("{label}:") };
        out.push_str(&format!("{label:<15}{value}\n"))
    };
    line("Interface", format!("{} (index {})", status.interface, status.ifindex));
    line("Program", format!("{} (id {}), {} mode", status.program, status.program_id, status.mode_label));
    line("Counters", if status.per_cpu_counters { "per-CPU".into() } else { "shared (atomic adds)".into() });
    line("Source IPv4", or_not_set(status.source_v4));
    line("Source IPv6", or_not_set(status.source_v6));
    line("Gateway MAC", or_not_set(status.gateway_mac.as_ref()));
    line(
        "Hash seed",
        match (status.hash_seed, status.seed_fixed) {
            (None, _) => "not set (chosen at the first `l4lb apply`)".to_string(),
            (Some(seed), false) => format!("{seed:#010x} (random)"),
            (Some(seed), true) => format!("{seed:#010x} (fixed)"),
        },
    );
    line("MTU", if status.mtu == 0 { "no limit".to_string() } else { status.mtu.to_string() });
    let probes = match status.vip_probes {
        Some(p) => format!(", lookups look at {}", plural(p as usize, "entry", "entries")),
        None => String::new(),
    };
    line("VIPs", format!("{}{probes}", status.vips));
    if status.fragments.is_empty() {
        line("Fragments", "no entries".to_string());
    }
    for (i, f) in status.fragments.iter().enumerate() {
        let vip = match f.vip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let target = match &f.service {
            Some(key) => format!("{key} (service {})", f.number),
            None => format!("service {} (not running)", f.number),
        };
        let text = format!("{vip}/{} -> {target}", f.protocol);
        if i == 0 {
            line("Fragments", text);
        } else {
            line("", text);
        }
    }
    line("Flow table", flow_table_text(&status.flow_table));
    if let Some(tick) = &status.tick {
        let in_transition = status.services.iter().any(|s| s.transition_slots > 0);
        let mut text = format!("{}, written {} s ago (by an apply or `l4lb settle`)", tick.clock, tick.age);
        if in_transition && tick.age > crate::settle::STALE_TICK {
            text.push_str(&format!(
                "; slots are in transition and no sweep ran for {} s: transitions end only while `l4lb settle -i {} --every 5` runs",
                tick.age, status.interface
            ));
        }
        line("Tick", text);
    }
    let backends: usize = status.services.iter().map(|s| s.backends.len()).sum();
    line("Services", format!("{}, {}", status.services.len(), plural(backends, "backend", "backends")));
    if status.services.is_empty() {
        out.push_str("No services: every packet goes to the stack\n");
    }
    for service in &status.services {
        out.push_str(&render_service(service));
    }
    out
}

/// `LRU hash, 1,048,576 entries, 12,345 in use (3 stale)`,
/// `hash, 65,536 entries (no eviction)`.
fn flow_table_text(table: &FlowTableStatus) -> String {
    let mut text = format!(
        "{}, {} entries",
        if table.kind == "lru_hash" { "LRU hash" } else { "hash" },
        table.max_entries.to_formatted_string(&Locale::en)
    );
    if table.kind != "lru_hash" {
        text.push_str(" (no eviction)");
    }
    if let (Some(entries), Some(stale)) = (table.entries, table.stale) {
        text.push_str(&format!(
            ", {} in use ({} stale)",
            entries.to_formatted_string(&Locale::en),
            stale.to_formatted_string(&Locale::en)
        ));
    }
    text
}

fn render_service(service: &ServiceStatus) -> String {
    let pinned = match service.pinned {
        Some(n) => format!(", {}", plural(n, "flow pinned", "flows pinned")),
        None => String::new(),
    };
    let mut text = format!(
        "\nService {}, number {}: {}{pinned}{}\nTable: {}\n",
        service_label(&service.key),
        service.number,
        plural(service.backends.len(), "backend", "backends"),
        settings_text(service),
        table_health_text(service),
    );
    text.push_str(&table_text(&backend_table(service)));
    text.push_str(&drained_text(service));
    text
}

/// The service's settings that differ from the defaults, each after a comma.
fn settings_text(service: &ServiceStatus) -> String {
    let mut text = String::from(match service.key {
        ServiceKey::Vip { protocol: Protocol::Tcp, .. } => "",
        _ if service.hash_ports => "",
        _ => ", UDP flows hash addresses only",
    });
    // Like hash_ports, only the exception is said: no tracking, or
    // transition settings other than the defaults.
    if !service.track_flows {
        text.push_str(", flows not tracked (table changes move them)");
    } else {
        if service.idle_timeout != IDLE_TIMEOUT_DEFAULT {
            text.push_str(&format!(", idle_timeout {} s", service.idle_timeout));
        }
        if service.udp_grace != UDP_GRACE_DEFAULT {
            text.push_str(&format!(", udp_grace {} s", service.udp_grace));
        }
    }
    text
}

/// The table's health: `10 slots, 1 unset, 3 in transition, last change at tick 1000`.
fn table_health_text(service: &ServiceStatus) -> String {
    let mut health = format!(
        "{} slots, {} unset",
        service.slots.to_formatted_string(&Locale::en),
        service.unset_slots.to_formatted_string(&Locale::en)
    );
    if service.foreign_slots > 0 {
        health.push_str(&format!(
            ", {} naming no backend of the service (table damaged: apply again)",
            service.foreign_slots.to_formatted_string(&Locale::en)
        ));
    }
    if service.track_flows || service.transition_slots > 0 {
        health.push_str(&format!(", {} in transition", service.transition_slots.to_formatted_string(&Locale::en)));
    }
    if service.changed != 0 {
        health.push_str(&format!(", last change at tick {}", service.changed));
    }
    health
}

/// A row per backend: its next hop, weight and slots, and the slots and flows it still has from before a change.
fn backend_table(service: &ServiceStatus) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    // Slots in transition from each backend, while there are any.
    let transitions = service.transition_slots > 0;
    let mut header = vec!["#", "Backend", "MAC", "Weight", "Slots", "Share"];
    if transitions {
        header.push("Previous");
    }
    if service.pinned.is_some() {
        header.push("Pinned");
    }
    table.set_header(header);
    for backend in &service.backends {
        let mac = match (&backend.mac, backend.via_gateway) {
            (Some(mac), false) => mac.clone(),
            (Some(mac), true) => format!("gateway {mac}"),
            (None, _) => "gateway (not set)".to_string(),
        };
        let mut row = vec![
            Cell::new(backend.number),
            Cell::new(backend.addr),
            Cell::new(mac),
            Cell::new(backend.weight),
            Cell::new(backend.slots.to_formatted_string(&Locale::en)),
            Cell::new(format!("{:.3}%", backend.share)),
        ];
        if transitions {
            row.push(Cell::new(backend.previous_slots.to_formatted_string(&Locale::en)));
        }
        if let Some(pinned) = backend.pinned {
            row.push(Cell::new(pinned.to_formatted_string(&Locale::en)));
        }
        table.add_row(row);
    }
    for column in 3..8 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// A line per backend that is drained.
fn drained_text(service: &ServiceStatus) -> String {
    let mut text = String::new();
    // A drained backend nothing goes to any more (known with --flows only:
    // a pin may hold it in a slot it is not the previous backend of).
    for backend in &service.backends {
        if backend.weight == 0 && backend.slots == 0 && backend.previous_slots == 0 && backend.pinned == Some(0) {
            text.push_str(&format!(
                "Backend {} ({}) is drained: no slot, none in transition from it, no flow pinned\n",
                backend.number, backend.addr
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Global};
    use crate::state::{RunningBackend, RunningFragment};
    use std::collections::BTreeMap;

    /// Index in l4lb_tables of slot `slot` of service `number`.
    fn slot(number: u32, slot: u32) -> u32 {
        number * MAGLEV_SIZE as u32 + slot
    }

    fn backend(number: u32, addr: &str, mac: Option<[u8; 6]>, weight: u32) -> RunningBackend {
        RunningBackend { number, backend: Backend { addr: addr.parse().unwrap(), mac, weight } }
    }

    fn example() -> (Program, Running) {
        let program = Program {
            interface: "l4lb-doc0".into(),
            ifindex: 3,
            name: "l4lb_balance".into(),
            id: 124,
            mode: Mode::Driver,
            per_cpu_counters: true,
            vip_probes: Some(1),
            flow_table: FlowTable { lru: true, max_entries: 1 << 20 },
            tick: None,
        };
        // Tables of 10 slots: 3 and 4 take 3 and 6, one slot unset. Backend
        // 4 was added at tick 1000: 3 of the slots it took from 3 are still
        // in transition. A shorter idle timeout than the default.
        let web = crate::state::RunningService {
            number: 1,
            key: ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 },
            hash_ports: true,
            track_flows: true,
            idle_timeout: 60,
            udp_grace: 30,
            changed: 1000,
            transitions: BTreeMap::from([(1, 3), (2, 3), (4, 3)]),
            backends: vec![
                backend(3, "198.18.0.101", Some([2, 0, 0xc6, 0x12, 0, 0x65]), 1),
                backend(4, "198.18.0.102", None, 2),
            ],
            table: vec![3, 4, 4, 3, 4, 4, 3, 4, 4, SLOT_EMPTY],
        };
        // A damaged table: 2 slots name backend 3 (of another service).
        let dns = crate::state::RunningService {
            number: 2,
            key: ServiceKey::Vip { addr: "2001:db8::10".parse().unwrap(), protocol: Protocol::Udp, port: 53 },
            hash_ports: false,
            track_flows: false,
            idle_timeout: 300,
            udp_grace: 30,
            changed: 0,
            transitions: Default::default(),
            backends: vec![backend(5, "2001:db8::101", None, 0)],
            table: vec![5, 5, 5, 5, 5, 5, 5, 5, 3, 3],
        };
        let running = Running {
            global: Global {
                source_v4: Some("198.18.0.2".parse().unwrap()),
                source_v6: None,
                gateway_mac: Some([2, 0, 0, 0, 0, 1]),
                hash_seed: Some(0x13373a9b),
                mtu: Some(1500),
            },
            seed_fixed: false,
            services: vec![web, dns],
            fragments: vec![
                RunningFragment {
                    addr: "203.0.113.10".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    service: 1,
                    entry: 523,
                },
                // An entry naming a service number nothing runs (an interrupted apply).
                RunningFragment {
                    addr: "2001:db8::10".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    service: 9,
                    entry: 78,
                },
                RunningFragment {
                    addr: "2001:db8::10".parse().unwrap(),
                    protocol: Protocol::Udp,
                    service: 2,
                    entry: 77,
                },
            ],
        };
        (program, running)
    }

    #[test]
    fn slot_counts_shares_and_table_health() {
        let (program, running) = example();
        let status = build(&program, &running, None);
        assert_eq!(status.vips, 2);
        let web = &status.services[0];
        assert_eq!((web.slots, web.unset_slots, web.foreign_slots), (10, 1, 0));
        assert_eq!(web.backends.iter().map(|b| b.slots).collect::<Vec<_>>(), [3, 6]);
        assert_eq!(web.backends[1].share, 60.0);
        assert_eq!(web.backends[1].mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(web.backends[1].via_gateway && !web.backends[0].via_gateway);
        assert_eq!((web.transition_slots, web.changed, web.idle_timeout, web.udp_grace), (3, 1000, 60, 30));
        assert_eq!(web.backends.iter().map(|b| b.previous_slots).collect::<Vec<_>>(), [3, 0]);
        let dns = &status.services[1];
        assert_eq!((dns.slots, dns.unset_slots, dns.foreign_slots), (10, 0, 2));
        assert_eq!((dns.transition_slots, dns.changed), (0, 0));
    }

    #[test]
    fn text_shows_settings_and_a_table_per_service() {
        let (program, running) = example();
        let text = render(&build(&program, &running, None));
        let expected = "\
Interface:     l4lb-doc0 (index 3)
Program:       l4lb_balance (id 124), Driver mode
Counters:      per-CPU
Source IPv4:   198.18.0.2
Source IPv6:   not set
Gateway MAC:   02:00:00:00:00:01
Hash seed:     0x13373a9b (random)
MTU:           1500
VIPs:          2, lookups look at 1 entry
Fragments:     203.0.113.10/tcp -> 203.0.113.10:80/tcp (service 1)
               [2001:db8::10]/tcp -> service 9 (not running)
               [2001:db8::10]/udp -> [2001:db8::10]:53/udp (service 2)
Flow table:    LRU hash, 1,048,576 entries
Services:      2, 3 backends

Service 203.0.113.10:80/tcp, number 1: 2 backends, idle_timeout 60 s
Table: 10 slots, 1 unset, 3 in transition, last change at tick 1000
 #  Backend       MAC                        Weight  Slots    Share  Previous
 3  198.18.0.101  02:00:c6:12:00:65               1      3  30.000%         3
 4  198.18.0.102  gateway 02:00:00:00:00:01       2      6  60.000%         0

Service [2001:db8::10]:53/udp, number 2: 1 backend, UDP flows hash addresses only, flows not tracked (table changes move them)
Table: 10 slots, 0 unset, 2 naming no backend of the service (table damaged: apply again)
 #  Backend        MAC                        Weight  Slots    Share
 5  2001:db8::101  gateway 02:00:00:00:00:01       0      8  80.000%
";
        assert_eq!(text, expected, "\n{text}");
        // Only settings other than the defaults are said, and only for a
        // service that tracks flows.
        let (program, mut running) = example();
        (running.services[0].idle_timeout, running.services[0].udp_grace) = (300, 5);
        running.services[1].idle_timeout = 10;
        let text = render(&build(&program, &running, None));
        assert!(text.contains("\nService 203.0.113.10:80/tcp, number 1: 2 backends, udp_grace 5 s\n"), "\n{text}");
        assert!(
            text.contains(
                "number 2: 1 backend, UDP flows hash addresses only, flows not tracked (table changes move them)\n"
            ),
            "\n{text}"
        );
    }

    #[test]
    fn nothing_applied_yet() {
        let (program, _) = example();
        let text = render(&build(&program, &Running::default(), None));
        assert!(text.contains("Hash seed:     not set (chosen at the first `l4lb apply`)\n"), "{text}");
        assert!(text.contains("MTU:           no limit\n"), "{text}");
        assert!(text.contains("Fragments:     no entries\n"), "{text}");
        assert!(
            text.ends_with("Services:      0, 0 backends\nNo services: every packet goes to the stack\n"),
            "{text}"
        );
    }

    #[test]
    fn json_has_the_documented_shape() {
        let (program, running) = example();
        let value: serde_json::Value =
            serde_json::from_str(&crate::stats::render_json(&build(&program, &running, None))).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "interface",
                "ifindex",
                "program",
                "program_id",
                "mode",
                "per_cpu_counters",
                "hash_seed",
                "seed_fixed",
                "source_v4",
                "source_v6",
                "gateway_mac",
                "mtu",
                "vips",
                "vip_probes",
                "fragments",
                "flow_table",
                "tick",
                "services"
            ]
        );
        assert_eq!(value["mode"], "driver");
        assert_eq!(value["hash_seed"], 0x13373a9b);
        assert_eq!(value["source_v4"], "198.18.0.2");
        assert_eq!(value["source_v6"], serde_json::Value::Null);
        assert_eq!(value["gateway_mac"], "02:00:00:00:00:01");
        assert_eq!(value["mtu"], 1500);
        assert_eq!(
            value["fragments"],
            serde_json::json!([
                {"vip": "203.0.113.10", "protocol": "tcp", "service": "203.0.113.10:80/tcp", "number": 1, "entry": 523},
                {"vip": "2001:db8::10", "protocol": "tcp", "service": null, "number": 9, "entry": 78},
                {"vip": "2001:db8::10", "protocol": "udp", "service": "[2001:db8::10]:53/udp", "number": 2, "entry": 77},
            ])
        );
        assert_eq!(
            value["services"][1],
            serde_json::json!({
                "service": "[2001:db8::10]:53/udp", "vip": "2001:db8::10", "protocol": "udp", "port": 53, "number": 2,
                "hash_ports": false, "track_flows": false, "idle_timeout": 300, "udp_grace": 30, "changed": 0,
                "slots": 10, "unset_slots": 0, "foreign_slots": 2, "transition_slots": 0,
                "backends": [{"number": 5, "addr": "2001:db8::101", "mac": "02:00:00:00:00:01", "via_gateway": true,
                              "weight": 0, "slots": 8, "share": 80.0, "previous_slots": 0}]
            })
        );
        assert_eq!(value["services"][0]["backends"][0]["mac"], "02:00:c6:12:00:65");
        assert_eq!(value["services"][0]["track_flows"], true);
        let web = &value["services"][0];
        assert_eq!(
            (&web["idle_timeout"], &web["udp_grace"], &web["changed"], &web["transition_slots"]),
            (&serde_json::json!(60), &serde_json::json!(30), &serde_json::json!(1000), &serde_json::json!(3))
        );
        assert_eq!(web["backends"][0]["previous_slots"], 3);
        assert_eq!(web["backends"][1]["previous_slots"], 0);
        // Without --flows: no counts.
        assert_eq!(value["flow_table"], serde_json::json!({"type": "lru_hash", "max_entries": 1048576}));
    }

    /// A flow key as the datapath writes it: ports as on the wire (0 for
    /// fragments and for UDP services that hash addresses only).
    fn flow(client: &str, vip: &str, ports: Option<(u16, u16)>, protocol: Protocol) -> FlowKey {
        let (family, daddr) = addr_bytes(vip.parse().unwrap());
        let (_, saddr) = addr_bytes(client.parse().unwrap());
        let ports = ports.map_or(0, |(source, destination)| {
            let [a, b] = source.to_be_bytes();
            let [c, d] = destination.to_be_bytes();
            u32::from_ne_bytes([a, b, c, d])
        });
        FlowKey { saddr, daddr, ports, family, proto: ip_protocol(protocol), pad: [0; 2] }
    }

    /// A pin to backend `backend` at `addr`, made in slot `slot` of l4lb_tables.
    fn pin(backend: u32, addr: &str, slot: u32) -> FlowPin {
        let (family, addr) = addr_bytes(addr.parse().unwrap());
        FlowPin { addr, backend, slot, seen: 0, family, pad: [0; 3] }
    }

    /// The example's flow table: 4 pins that hold, 6 that do not. The web
    /// service (number 1) has slots 1, 2 and 4 in transition.
    #[test]
    fn the_tick_line_says_its_age_and_warns_when_no_sweep_runs() {
        let (mut program, running) = example();
        program.tick = Some(Tick { clock: 1000, now: 1003 });
        let text = render(&build(&program, &running, None));
        assert!(text.contains("\nTick:          1000, written 3 s ago (by an apply or `l4lb settle`)\n"), "{text}");
        program.tick = Some(Tick { clock: 1000, now: 1060 });
        let text = render(&build(&program, &running, None));
        assert!(
            text.contains("\nTick:          1000, written 60 s ago (by an apply or `l4lb settle`); slots are in transition and no sweep ran for 60 s: transitions end only while `l4lb settle -i l4lb-doc0 --every 5` runs\n"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&crate::stats::render_json(&build(&program, &running, None))).unwrap();
        assert_eq!(json["tick"], serde_json::json!({"clock": 1000, "age": 60}));
    }

    fn example_flows() -> Vec<(FlowKey, FlowPin)> {
        let web = |port| flow("192.0.2.1", "203.0.113.10", Some((port, 80)), Protocol::Tcp);
        vec![
            // A connection from before the change, on the previous backend.
            (web(40001), pin(3, "198.18.0.101", slot(1, 1))),
            // New ones, on the current backend.
            (web(40002), pin(4, "198.18.0.102", slot(1, 2))),
            (web(40003), pin(4, "198.18.0.102", slot(1, 4))),
            // A fragment (no ports) of the web VIP's address and protocol.
            (flow("192.0.2.2", "203.0.113.10", None, Protocol::Tcp), pin(4, "198.18.0.102", slot(1, 1))),
            // Stale: slot 0 is steady (its transition ended; `l4lb settle`
            // deletes the pin).
            (web(40007), pin(3, "198.18.0.101", slot(1, 0))),
            // Stale: the DNS service tracks no flows, no slot of it is in
            // transition (a UDP flow hashed without ports).
            (flow("2001:db8:c::1", "2001:db8::10", None, Protocol::Udp), pin(5, "2001:db8::101", slot(2, 3))),
            // Stale: backend 3's number now holds another address (reused).
            (web(40004), pin(3, "198.18.0.99", slot(1, 1))),
            // Stale: backend 9 is gone.
            (web(40005), pin(9, "198.18.0.109", slot(1, 1))),
            // Stale: backend 5 is the DNS service's, not the web service's
            // (a number reused by another service, same address).
            (web(40006), pin(5, "2001:db8::101", slot(1, 1))),
            // Stale: no service takes port 443 of the address (no catch-all).
            (flow("192.0.2.1", "203.0.113.10", Some((40007, 443)), Protocol::Tcp), pin(3, "198.18.0.101", slot(1, 1))),
        ]
    }

    #[test]
    fn pins_hold_for_their_backend_of_their_flows_service_in_a_slot_in_transition() {
        let (_, running) = example();
        let flows = example_flows();
        let counts = count_pins(&running, flows.iter().map(|(k, p)| (k, p)));
        assert_eq!((counts.entries, counts.stale), (10, 6));
        assert_eq!(counts.pinned, HashMap::from([(3, 1), (4, 3)]));
        // Once the transitions ended, every pin is stale.
        let mut settled = running.clone();
        settled.services[0].transitions.clear();
        let counts = count_pins(&settled, flows.iter().map(|(k, p)| (k, p)));
        assert_eq!((counts.entries, counts.stale, counts.pinned.len()), (10, 10, 0));
    }

    #[test]
    fn a_flow_s_service_is_its_vip_then_the_every_port_vip_then_the_catch_all() {
        let (_, mut running) = example();
        let service = |number, key, backends| crate::state::RunningService {
            number,
            key,
            hash_ports: true,
            track_flows: true,
            idle_timeout: 300,
            udp_grace: 30,
            changed: 0,
            transitions: Default::default(),
            backends,
            table: Vec::new(),
        };
        // 203.0.113.10, every TCP port but 80 (service 3); everything else (service 4).
        // Each with slot 7 in transition.
        let mut every_port = service(
            3,
            ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 0 },
            vec![backend(6, "198.18.0.106", None, 1)],
        );
        every_port.transitions = BTreeMap::from([(7, 6)]);
        let mut catch_all = service(4, ServiceKey::CatchAll, vec![backend(7, "198.18.0.107", None, 1)]);
        catch_all.transitions = BTreeMap::from([(7, 7)]);
        running.services.extend([every_port, catch_all]);
        let tcp = |vip, port| flow("192.0.2.1", vip, Some((40000, port)), Protocol::Tcp);
        let flows = [
            (tcp("203.0.113.10", 80), pin(3, "198.18.0.101", slot(1, 1))),
            (tcp("203.0.113.10", 443), pin(6, "198.18.0.106", slot(3, 7))),
            (tcp("198.51.100.1", 443), pin(7, "198.18.0.107", slot(4, 7))),
            // Port 443 is the every-port VIP's, not the catch-all's nor port 80's.
            (tcp("203.0.113.10", 443), pin(7, "198.18.0.107", slot(4, 7))),
            (tcp("203.0.113.10", 443), pin(3, "198.18.0.101", slot(1, 1))),
            // Port 80 is its own VIP's.
            (tcp("203.0.113.10", 80), pin(6, "198.18.0.106", slot(3, 7))),
            // The catch-all takes other addresses, and fragments without a
            // fragment entry (they may be any port's).
            (tcp("198.51.100.1", 80), pin(3, "198.18.0.101", slot(1, 1))),
            (flow("192.0.2.1", "198.51.100.1", None, Protocol::Udp), pin(7, "198.18.0.107", slot(4, 7))),
            // Stale: the slot is in transition, but in another service's
            // table than the flow's (slot 7 of the catch-all, slot 1 of web).
            (tcp("203.0.113.10", 443), pin(6, "198.18.0.106", slot(4, 7))),
            (tcp("198.51.100.1", 443), pin(7, "198.18.0.107", slot(1, 1))),
        ];
        let counts = count_pins(&running, flows.iter().map(|(k, p)| (k, p)));
        assert_eq!((counts.entries, counts.stale), (10, 6));
        assert_eq!(counts.pinned, HashMap::from([(3, 1), (6, 1), (7, 2)]));
    }

    #[test]
    fn flows_show_in_the_header_per_service_and_per_backend() {
        let (program, running) = example();
        let flows = example_flows();
        let counts = count_pins(&running, flows.iter().map(|(k, p)| (k, p)));
        let status = build(&program, &running, Some(&counts));
        let text = render(&status);
        let expected = "\
Flow table:    LRU hash, 1,048,576 entries, 10 in use (6 stale)
Services:      2, 3 backends

Service 203.0.113.10:80/tcp, number 1: 2 backends, 4 flows pinned, idle_timeout 60 s
Table: 10 slots, 1 unset, 3 in transition, last change at tick 1000
 #  Backend       MAC                        Weight  Slots    Share  Previous  Pinned
 3  198.18.0.101  02:00:c6:12:00:65               1      3  30.000%         3       1
 4  198.18.0.102  gateway 02:00:00:00:00:01       2      6  60.000%         0       3

Service [2001:db8::10]:53/udp, number 2: 1 backend, 0 flows pinned, UDP flows hash addresses only, flows not tracked (table changes move them)
Table: 10 slots, 0 unset, 2 naming no backend of the service (table damaged: apply again)
 #  Backend        MAC                        Weight  Slots    Share  Pinned
 5  2001:db8::101  gateway 02:00:00:00:00:01       0      8  80.000%       0
";
        assert!(text.ends_with(expected), "\n{text}");

        let value: serde_json::Value = serde_json::from_str(&crate::stats::render_json(&status)).unwrap();
        assert_eq!(
            value["flow_table"],
            serde_json::json!({"type": "lru_hash", "max_entries": 1048576, "entries": 10, "stale": 6})
        );
        assert_eq!(value["services"][0]["pinned"], 4);
        assert_eq!(value["services"][0]["backends"][1]["pinned"], 3);
        let keys: Vec<&str> = value["services"][0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(&keys[keys.len() - 2..], ["pinned", "backends"]);
    }

    #[test]
    fn a_draining_backend_is_seen_to_empty_out() {
        // Backend 6 of the web service drained (weight 0): no slot of its
        // own, slot 8 still in transition from it, one connection pinned.
        let (program, mut running) = example();
        let web = &mut running.services[0];
        web.backends.push(backend(6, "198.18.0.103", None, 0));
        web.transitions.insert(8, 6);
        let mut flows = example_flows();
        let old = flow("192.0.2.3", "203.0.113.10", Some((40008, 80)), Protocol::Tcp);
        flows.push((old, pin(6, "198.18.0.103", slot(1, 8))));
        let text = render(&build(&program, &running, Some(&count_pins(&running, flows.iter().map(|(k, p)| (k, p))))));
        let draining = "\
Service 203.0.113.10:80/tcp, number 1: 3 backends, 5 flows pinned, idle_timeout 60 s
Table: 10 slots, 1 unset, 4 in transition, last change at tick 1000
 #  Backend       MAC                        Weight  Slots    Share  Previous  Pinned
 3  198.18.0.101  02:00:c6:12:00:65               1      3  30.000%         3       1
 4  198.18.0.102  gateway 02:00:00:00:00:01       2      6  60.000%         0       3
 6  198.18.0.103  gateway 02:00:00:00:00:01       0      0   0.000%         1       1

Service [2001:db8::10]:53/udp";
        assert!(text.contains(draining), "\n{text}");
        // `l4lb settle` ended slot 8 (its pin went idle): nothing left.
        running.services[0].transitions.remove(&8);
        let text = render(&build(&program, &running, Some(&count_pins(&running, flows.iter().map(|(k, p)| (k, p))))));
        let drained = "\
Table: 10 slots, 1 unset, 3 in transition, last change at tick 1000
 #  Backend       MAC                        Weight  Slots    Share  Previous  Pinned
 3  198.18.0.101  02:00:c6:12:00:65               1      3  30.000%         3       1
 4  198.18.0.102  gateway 02:00:00:00:00:01       2      6  60.000%         0       3
 6  198.18.0.103  gateway 02:00:00:00:00:01       0      0   0.000%         0       0
Backend 6 (198.18.0.103) is drained: no slot, none in transition from it, no flow pinned

Service [2001:db8::10]:53/udp";
        assert!(text.contains(drained), "\n{text}");
        // Without --flows the pins are unknown: not said.
        assert!(!render(&build(&program, &running, None)).contains("drained"));
        // Every transition ended: no Previous column, 0 in transition.
        running.services[0].transitions.clear();
        let text = render(&build(&program, &running, None));
        assert!(
            text.contains("Table: 10 slots, 1 unset, 0 in transition, last change at tick 1000\n #  Backend       MAC                        Weight  Slots    Share\n"),
            "\n{text}"
        );
    }

    #[test]
    fn a_hash_flow_table_evicts_nothing() {
        let (mut program, running) = example();
        program.flow_table = FlowTable { lru: false, max_entries: 65536 };
        let text = render(&build(&program, &running, None));
        assert!(text.contains("\nFlow table:    hash, 65,536 entries (no eviction)\n"), "{text}");
        let counts = FlowCounts { entries: 12345, stale: 0, pinned: HashMap::new() };
        let text = render(&build(&program, &running, Some(&counts)));
        assert!(
            text.contains("\nFlow table:    hash, 65,536 entries (no eviction), 12,345 in use (0 stale)\n"),
            "{text}"
        );
        let value: serde_json::Value =
            serde_json::from_str(&crate::stats::render_json(&build(&program, &running, None))).unwrap();
        assert_eq!(value["flow_table"]["type"], "hash");
        assert!(
            value["services"][0].get("pinned").is_none() && value["services"][0]["backends"][0].get("pinned").is_none()
        );
    }
}
