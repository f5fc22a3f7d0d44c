//! `l4lb status`: the balancer's settings and, per service, its backends,
//! their weights and slot counts in the service's Maglev table, and the
//! table's health (slots that lead nowhere). Pure: the caller reads the maps
//! (the running state) and the program; this builds, renders and serialises.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use comfy_table::{presets, Cell, CellAlignment, Table};
use num_format::{Locale, ToFormattedString};
use serde::Serialize;

use crate::bpf::SLOT_EMPTY;
use crate::config::{format_mac, Protocol, ServiceKey};
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
    pub services: Vec<ServiceStatus>,
    #[serde(skip)]
    pub mode_label: String,
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceStatus {
    /// The key as `l4lb` prints it (see stats::ServiceTraffic).
    pub service: String,
    #[serde(flatten)]
    pub id: ServiceId,
    pub number: u32,
    /// Whether UDP flows hash their ports (TCP flows always do).
    pub hash_ports: bool,
    /// Whether flows are pinned to their backend (connection tracking).
    pub track_flows: bool,
    /// Slots of the service's table.
    pub slots: usize,
    /// Slots naming no backend (L4LB_SLOT_EMPTY): their flows are dropped.
    pub unset_slots: usize,
    /// Slots naming a backend number that is not one of the service's
    /// backends: should be 0.
    pub foreign_slots: usize,
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
}

/// The status of `running` on `program`.
pub fn build(program: &Program, running: &Running) -> Status {
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
        services: running.services.iter().map(|s| service(s, gateway)).collect(),
        mode_label: program.mode.to_string(),
    }
}

fn service(service: &RunningService, gateway: Option<[u8; 6]>) -> ServiceStatus {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &number in &service.table {
        *counts.entry(number).or_default() += 1;
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
        slots,
        unset_slots,
        foreign_slots,
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

fn render_service(service: &ServiceStatus) -> String {
    let udp_ports = match service.key {
        ServiceKey::Vip { protocol: Protocol::Tcp, .. } => "",
        _ if service.hash_ports => "",
        _ => ", UDP flows hash addresses only",
    };
    // Like hash_ports, only the exception is said.
    let tracking = if service.track_flows { "" } else { ", flows not tracked (table changes move them)" };
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
    let mut text = format!(
        "\nService {}, number {}: {}{udp_ports}{tracking}\nTable: {health}\n",
        service_label(&service.key),
        service.number,
        plural(service.backends.len(), "backend", "backends"),
    );
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(vec!["#", "Backend", "MAC", "Weight", "Slots", "Share"]);
    for backend in &service.backends {
        let mac = match (&backend.mac, backend.via_gateway) {
            (Some(mac), false) => mac.clone(),
            (Some(mac), true) => format!("gateway {mac}"),
            (None, _) => "gateway (not set)".to_string(),
        };
        table.add_row(vec![
            Cell::new(backend.number),
            Cell::new(backend.addr),
            Cell::new(mac),
            Cell::new(backend.weight),
            Cell::new(backend.slots.to_formatted_string(&Locale::en)),
            Cell::new(format!("{:.3}%", backend.share)),
        ]);
    }
    for column in 3..6 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    text.push_str(&table_text(&table));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Global};
    use crate::state::{RunningBackend, RunningFragment};

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
        };
        // Tables of 10 slots: 3 and 4 take 3 and 6, one slot unset.
        let web = crate::state::RunningService {
            number: 1,
            key: ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 },
            hash_ports: true,
            track_flows: true,
            backends: vec![backend(3, "198.18.0.101", Some([2, 0, 0xc6, 0x12, 0, 0x65]), 1), backend(4, "198.18.0.102", None, 2)],
            table: vec![3, 4, 4, 3, 4, 4, 3, 4, 4, SLOT_EMPTY],
        };
        // A damaged table: 2 slots name backend 3 (of another service).
        let dns = crate::state::RunningService {
            number: 2,
            key: ServiceKey::Vip { addr: "2001:db8::10".parse().unwrap(), protocol: Protocol::Udp, port: 53 },
            hash_ports: false,
            track_flows: false,
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
                RunningFragment { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, service: 1, entry: 523 },
                // An entry naming a service number nothing runs (an interrupted apply).
                RunningFragment { addr: "2001:db8::10".parse().unwrap(), protocol: Protocol::Tcp, service: 9, entry: 78 },
                RunningFragment { addr: "2001:db8::10".parse().unwrap(), protocol: Protocol::Udp, service: 2, entry: 77 },
            ],
        };
        (program, running)
    }

    #[test]
    fn slot_counts_shares_and_table_health() {
        let (program, running) = example();
        let status = build(&program, &running);
        assert_eq!(status.vips, 2);
        let web = &status.services[0];
        assert_eq!((web.slots, web.unset_slots, web.foreign_slots), (10, 1, 0));
        assert_eq!(web.backends.iter().map(|b| b.slots).collect::<Vec<_>>(), [3, 6]);
        assert_eq!(web.backends[1].share, 60.0);
        assert_eq!(web.backends[1].mac.as_deref(), Some("02:00:00:00:00:01"));
        assert!(web.backends[1].via_gateway && !web.backends[0].via_gateway);
        let dns = &status.services[1];
        assert_eq!((dns.slots, dns.unset_slots, dns.foreign_slots), (10, 0, 2));
    }

    #[test]
    fn text_shows_settings_and_a_table_per_service() {
        let (program, running) = example();
        let text = render(&build(&program, &running));
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
Services:      2, 3 backends

Service 203.0.113.10:80/tcp, number 1: 2 backends
Table: 10 slots, 1 unset
 #  Backend       MAC                        Weight  Slots    Share
 3  198.18.0.101  02:00:c6:12:00:65               1      3  30.000%
 4  198.18.0.102  gateway 02:00:00:00:00:01       2      6  60.000%

Service [2001:db8::10]:53/udp, number 2: 1 backend, UDP flows hash addresses only, flows not tracked (table changes move them)
Table: 10 slots, 0 unset, 2 naming no backend of the service (table damaged: apply again)
 #  Backend        MAC                        Weight  Slots    Share
 5  2001:db8::101  gateway 02:00:00:00:00:01       0      8  80.000%
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn nothing_applied_yet() {
        let (program, _) = example();
        let text = render(&build(&program, &Running::default()));
        assert!(text.contains("Hash seed:     not set (chosen at the first `l4lb apply`)\n"), "{text}");
        assert!(text.contains("MTU:           no limit\n"), "{text}");
        assert!(text.contains("Fragments:     no entries\n"), "{text}");
        assert!(text.ends_with("Services:      0, 0 backends\nNo services: every packet goes to the stack\n"), "{text}");
    }

    #[test]
    fn json_has_the_documented_shape() {
        let (program, running) = example();
        let value: serde_json::Value = serde_json::from_str(&crate::stats::render_json(&build(&program, &running))).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "interface", "ifindex", "program", "program_id", "mode", "per_cpu_counters", "hash_seed", "seed_fixed",
                "source_v4", "source_v6", "gateway_mac", "mtu", "vips", "vip_probes", "fragments", "services"
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
                "hash_ports": false, "track_flows": false, "slots": 10, "unset_slots": 0, "foreign_slots": 2,
                "backends": [{"number": 5, "addr": "2001:db8::101", "mac": "02:00:00:00:00:01", "via_gateway": true,
                              "weight": 0, "slots": 8, "share": 80.0}]
            })
        );
        assert_eq!(value["services"][0]["backends"][0]["mac"], "02:00:c6:12:00:65");
        assert_eq!(value["services"][0]["track_flows"], true);
    }
}
