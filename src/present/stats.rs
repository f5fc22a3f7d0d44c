//! Statistics: samples of the counters, rates between two samples, and their
//! rendering as a table or as JSON lines; the same for the backend's decap
//! counters. Pure: sampling the maps is done by the caller.
//!
//! A balancer sample holds, for every service of the running configuration,
//! its traffic (l4lb_svc_stats) and that of each of its backends
//! (l4lb_be_stats), plus the global counters (l4lb_counters). Two samples
//! give a [`Report`]: cumulative totals and rates over the interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use comfy_table::{presets, Cell, CellAlignment, Table};
use num_format::{Locale, ToFormattedString};
use serde::Serialize;

use crate::bpf::{COUNTER_NAMES, DECAP_COUNTER_NAMES};
use crate::config::{self, ServiceKey};
use crate::discover::Mode;
use crate::state::Running;

/// Cumulative packets and bytes of a service or a backend (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

/// One backend entry and its counts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSample {
    /// Index in l4lb_backends and l4lb_be_stats.
    pub number: u32,
    pub backend: config::Backend,
    pub counts: Counts,
}

/// One service and its counts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSample {
    /// Index in l4lb_services and l4lb_svc_stats.
    pub number: u32,
    pub key: ServiceKey,
    pub counts: Counts,
    /// In the running state's order (by address).
    pub backends: Vec<BackendSample>,
}

/// Cumulative counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// In the running state's order (canonical: catch-all first).
    pub services: Vec<ServiceSample>,
    /// Global counters, indexed like COUNTER_NAMES.
    pub counters: Vec<u64>,
}

impl Sample {
    /// The services and backends of `running` with their counts, read by
    /// `service_counts(service number)` and `backend_counts(backend number)`.
    pub fn new(
        running: &Running,
        mut service_counts: impl FnMut(u32) -> Result<Counts>,
        mut backend_counts: impl FnMut(u32) -> Result<Counts>,
        counters: Vec<u64>,
    ) -> Result<Sample> {
        let services = running
            .services
            .iter()
            .map(|service| {
                let backends = service
                    .backends
                    .iter()
                    .map(|b| {
                        Ok(BackendSample { number: b.number, backend: b.backend, counts: backend_counts(b.number)? })
                    })
                    .collect::<Result<_>>()?;
                Ok(ServiceSample {
                    number: service.number,
                    key: service.key,
                    counts: service_counts(service.number)?,
                    backends,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Sample { services, counters })
    }

    /// Backend entries over all services.
    pub fn backend_count(&self) -> usize {
        self.services.iter().map(|s| s.backends.len()).sum()
    }
}

/// Totals and rates of a service, a backend or all services.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Traffic {
    /// Cumulative.
    pub packets: u64,
    pub bytes: u64,
    /// Per second over the interval.
    pub pps: f64,
    pub bps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendTraffic {
    pub number: u32,
    pub addr: IpAddr,
    pub weight: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceTraffic {
    /// The key as `l4lb` prints it: `203.0.113.10:80/tcp`, `[2001:db8::10]:*/udp`, `*`.
    pub service: String,
    #[serde(flatten)]
    pub id: ServiceId,
    pub number: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub backends: Vec<BackendTraffic>,
    #[serde(skip)]
    pub key: ServiceKey,
}

/// A service key as configuration values: `vip` (an address or `*`),
/// `protocol` (`tcp`, `udp`, or `any` for the catch-all), `port` (0 = every port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceId {
    pub vip: String,
    pub protocol: &'static str,
    pub port: u16,
}

impl From<&ServiceKey> for ServiceId {
    fn from(key: &ServiceKey) -> Self {
        match *key {
            ServiceKey::CatchAll => ServiceId { vip: "*".into(), protocol: "any", port: 0 },
            ServiceKey::Vip { addr, protocol, port } => {
                ServiceId { vip: addr.to_string(), protocol: protocol.name(), port }
            }
        }
    }
}

/// How tables name a service: its key, and `* (catch-all)`.
pub fn service_label(key: &ServiceKey) -> String {
    match key {
        ServiceKey::CatchAll => "* (catch-all)".to_string(),
        key => key.to_string(),
    }
}

/// One report: the `--json` line, and what the table shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub interval_s: f64,
    pub services: Vec<ServiceTraffic>,
    /// Over all services.
    pub totals: Traffic,
    /// Cumulative, one key per COUNTER_NAMES entry.
    pub counters: serde_json::Map<String, serde_json::Value>,
    /// Per second over the interval, same keys.
    pub counter_rates: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    pub mode_label: String,
}

/// What a counter gained from `before` to `now`. A counter that went back
/// was restarted (its entry zeroed) in between: it gained `now` since.
fn delta(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

fn rate(now: u64, before: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    delta(now, before) as f64 / seconds
}

/// `now` and its rates since `before`; no rate without a `before` (a
/// service or backend that appeared in between: its counts have no start).
fn traffic(now: Counts, before: Option<Counts>, seconds: f64) -> Traffic {
    let before = before.unwrap_or(now);
    Traffic {
        packets: now.packets,
        bytes: now.bytes,
        pps: rate(now.packets, before.packets, seconds),
        bps: rate(now.bytes, before.bytes, seconds) * 8.0,
    }
}

/// Rates between two samples `elapsed` apart. A service is the same in both
/// when its number and key are; a backend when its number, service key and
/// address are. One that is new in `now` (added, or its number reused) has
/// its totals and a rate of 0 until the next report; counters that went back
/// count as restarted from 0.
pub fn report(mode: Mode, before: &Sample, now: &Sample, elapsed: Duration) -> Report {
    let seconds = elapsed.as_secs_f64();
    let services_before: HashMap<(u32, ServiceKey), Counts> =
        before.services.iter().map(|s| ((s.number, s.key), s.counts)).collect();
    let backends_before: HashMap<(u32, ServiceKey, IpAddr), Counts> = before
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(move |b| ((b.number, s.key, b.backend.addr), b.counts)))
        .collect();
    let services: Vec<ServiceTraffic> = now
        .services
        .iter()
        .map(|s| ServiceTraffic {
            service: s.key.to_string(),
            id: ServiceId::from(&s.key),
            number: s.number,
            traffic: traffic(s.counts, services_before.get(&(s.number, s.key)).copied(), seconds),
            backends: s
                .backends
                .iter()
                .map(|b| BackendTraffic {
                    number: b.number,
                    addr: b.backend.addr,
                    weight: b.backend.weight,
                    traffic: traffic(
                        b.counts,
                        backends_before.get(&(b.number, s.key, b.backend.addr)).copied(),
                        seconds,
                    ),
                })
                .collect(),
            key: s.key,
        })
        .collect();
    let totals = Traffic {
        packets: services.iter().map(|s| s.traffic.packets).sum(),
        bytes: services.iter().map(|s| s.traffic.bytes).sum(),
        pps: services.iter().map(|s| s.traffic.pps).sum(),
        bps: services.iter().map(|s| s.traffic.bps).sum(),
    };
    let counters = named(&COUNTER_NAMES, now.counters.iter().copied());
    let counter_rates = named(
        &COUNTER_NAMES,
        now.counters.iter().enumerate().map(|(i, &n)| rate(n, before.counters.get(i).copied().unwrap_or(n), seconds)),
    );
    Report {
        mode: mode.json_name(),
        interval_s: seconds,
        services,
        totals,
        counters,
        counter_rates,
        mode_label: mode.to_string(),
    }
}

/// `{name: value}` in the order of `names`.
fn named<T: Into<serde_json::Value>>(
    names: &[&str],
    values: impl Iterator<Item = T>,
) -> serde_json::Map<String, serde_json::Value> {
    names.iter().zip(values).map(|(name, value)| (name.to_string(), value.into())).collect()
}

/// One `l4lb decap stats` report: the `--json` line, and what the table shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecapReport {
    pub mode: &'static str,
    pub interval_s: f64,
    /// The addresses IPIP is decapsulated for.
    pub addrs: Vec<IpAddr>,
    /// Cumulative, one key per DECAP_COUNTER_NAMES entry.
    pub counters: serde_json::Map<String, serde_json::Value>,
    /// Per second over the interval, same keys.
    pub rates: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    pub mode_label: String,
}

/// Decap counters (indexed like DECAP_COUNTER_NAMES) and their rates between two samples.
pub fn decap_report(mode: Mode, addrs: &[IpAddr], before: &[u64], now: &[u64], elapsed: Duration) -> DecapReport {
    let seconds = elapsed.as_secs_f64();
    DecapReport {
        mode: mode.json_name(),
        interval_s: seconds,
        addrs: addrs.to_vec(),
        counters: named(&DECAP_COUNTER_NAMES, now.iter().copied()),
        rates: named(&DECAP_COUNTER_NAMES, now.iter().zip(before).map(|(&n, &b)| rate(n, b, seconds))),
        mode_label: mode.to_string(),
    }
}

/// The decap screen: addresses, then one row per counter (drop counters only
/// when not zero) with its total and rate.
pub fn render_decap_table(report: &DecapReport) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(vec!["Counter", "total", "per second"]);
    for (name, value) in &report.counters {
        let total = value.as_u64().unwrap_or(0);
        if name.starts_with("drop_") && total == 0 {
            continue;
        }
        let rate = report.rates.get(name).and_then(|r| r.as_f64()).unwrap_or(0.0);
        table.add_row(vec![Cell::new(name), Cell::new(thousands(total as f64)), Cell::new(thousands(rate))]);
    }
    for column in 1..3 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let addrs: Vec<String> = report.addrs.iter().map(IpAddr::to_string).collect();
    let addrs = if addrs.is_empty() { "none".to_string() } else { addrs.join(", ") };
    format!("== l4lb decap statistics [{}] ==\nAddresses: {addrs}\n{}", report.mode_label, table_text(&table))
}

/// A rate with thousands separators, rounded to a whole number.
pub fn thousands(value: f64) -> String {
    (value.max(0.0).round() as u64).to_formatted_string(&Locale::en)
}

/// The statistics screen: one row per service with its backends below it
/// (weight, rates, totals), the totals over all services, then the global
/// counters (drop counters only when not zero) with their rates.
pub fn render_table(report: &Report) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(vec!["Service / backend", "weight", "pkts/s", "bits/s", "packets", "bytes"]);
    let row = |label: String, weight: String, t: &Traffic| {
        vec![
            Cell::new(label),
            Cell::new(weight),
            Cell::new(format!("{} pkts/s", thousands(t.pps))),
            Cell::new(format!("{} bits/s", thousands(t.bps))),
            Cell::new(t.packets.to_formatted_string(&Locale::en)),
            Cell::new(format!("{} B", t.bytes.to_formatted_string(&Locale::en))),
        ]
    };
    for service in &report.services {
        table.add_row(row(service_label(&service.key), String::new(), &service.traffic));
        for backend in &service.backends {
            table.add_row(row(format!("  {}", backend.addr), backend.weight.to_string(), &backend.traffic));
        }
    }
    table.add_row(row("[Totals]".to_string(), String::new(), &report.totals));
    for column in 1..6 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }

    let mut counters = Table::new();
    counters.load_preset(presets::NOTHING);
    counters.set_header(vec!["Counter", "frames", "frames/s"]);
    for (name, value) in &report.counters {
        let total = value.as_u64().unwrap_or(0);
        if name.starts_with("drop_") && total == 0 {
            continue;
        }
        let rate = report.counter_rates.get(name).and_then(|r| r.as_f64()).unwrap_or(0.0);
        counters.add_row(vec![
            Cell::new(name),
            Cell::new(total.to_formatted_string(&Locale::en)),
            Cell::new(thousands(rate)),
        ]);
    }
    for column in 1..3 {
        if let Some(column) = counters.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let services = if report.services.is_empty() { "No services: every packet goes to the stack\n" } else { "" };
    format!(
        "== Load balancer outbound statistics [{}] ==\n{services}{}\n{}",
        report.mode_label,
        table_text(&table),
        table_text(&counters)
    )
}

/// A borderless table's text, without the padding it leaves at line ends.
pub fn table_text(table: &Table) -> String {
    table.lines().map(|line| format!("{}\n", line.trim_end())).collect()
}

pub fn render_json<T: Serialize>(report: &T) -> String {
    serde_json::to_string(report).expect("a report always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Protocol};
    use crate::state::{RunningBackend, RunningService};
    use std::net::Ipv4Addr;

    fn vip(last: u8, port: u16) -> ServiceKey {
        ServiceKey::Vip { addr: Ipv4Addr::new(203, 0, 113, last).into(), protocol: Protocol::Tcp, port }
    }

    fn backend(number: u32, last: u8, weight: u32) -> RunningBackend {
        RunningBackend { number, backend: Backend { addr: Ipv4Addr::new(198, 18, 0, last).into(), mac: None, weight } }
    }

    fn running(services: &[(u32, ServiceKey, Vec<RunningBackend>)]) -> Running {
        Running {
            services: services
                .iter()
                .map(|(number, key, backends)| RunningService {
                    number: *number,
                    key: *key,
                    hash_ports: true,
                    track_flows: true,
                    idle_timeout: 300,
                    udp_grace: 30,
                    changed: 0,
                    transitions: Default::default(),
                    backends: backends.clone(),
                    table: Vec::new(),
                })
                .collect(),
            ..Running::default()
        }
    }

    /// A sample of `running` with packets `counts[number]` (bytes 100 times
    /// as many) for services and backends alike, and rx = `rx`.
    fn sample(running: &Running, services: &[(u32, u64)], backends: &[(u32, u64)], rx: u64) -> Sample {
        let find = |list: &[(u32, u64)], n: u32| {
            let packets = list.iter().find(|e| e.0 == n).map_or(0, |e| e.1);
            Ok(Counts { packets, bytes: packets * 100 })
        };
        let mut counters = vec![0; COUNTER_NAMES.len()];
        counters[0] = rx;
        Sample::new(running, |n| find(services, n), |n| find(backends, n), counters).unwrap()
    }

    #[test]
    fn sample_follows_the_running_state() {
        let r = running(&[
            (0, ServiceKey::CatchAll, vec![backend(5, 9, 1)]),
            (2, vip(10, 80), vec![backend(1, 1, 1), backend(7, 2, 3)]),
        ]);
        let s = sample(&r, &[(2, 40)], &[(7, 30), (1, 10)], 0);
        assert_eq!(s.backend_count(), 3);
        assert_eq!(s.services[1].number, 2);
        assert_eq!(s.services[1].counts, Counts { packets: 40, bytes: 4_000 });
        assert_eq!(s.services[1].backends[1].number, 7);
        assert_eq!(s.services[1].backends[1].counts.packets, 30);
        assert_eq!(s.services[0].counts, Counts::default());
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let r = running(&[
            (0, ServiceKey::CatchAll, vec![backend(5, 9, 1)]),
            (2, vip(10, 80), vec![backend(1, 1, 1), backend(7, 2, 3)]),
        ]);
        let before = sample(&r, &[(0, 100), (2, 1_000)], &[(5, 100), (1, 400), (7, 600)], 1_100);
        let now = sample(&r, &[(0, 300), (2, 4_000)], &[(5, 300), (1, 1_400), (7, 2_600)], 4_400);
        let report = report(Mode::Driver, &before, &now, Duration::from_millis(2000));
        assert_eq!(report.services.len(), 2);
        let web = &report.services[1];
        assert_eq!(web.service, "203.0.113.10:80/tcp");
        assert_eq!(web.traffic, Traffic { packets: 4_000, bytes: 400_000, pps: 1_500.0, bps: 1_200_000.0 });
        assert_eq!(web.backends[0].traffic.pps, 500.0);
        assert_eq!(web.backends[1].traffic, Traffic { packets: 2_600, bytes: 260_000, pps: 1_000.0, bps: 800_000.0 });
        assert_eq!(web.backends[1].weight, 3);
        assert_eq!(report.services[0].traffic.pps, 100.0);
        assert_eq!(report.totals, Traffic { packets: 4_300, bytes: 430_000, pps: 1_600.0, bps: 1_280_000.0 });
        assert_eq!(report.counters["rx"], 4_400);
        assert_eq!(report.counter_rates["rx"], 1_650.0);
        assert_eq!(report.counter_rates["drop_no_backend"], 0.0);
    }

    #[test]
    fn new_or_reused_entries_have_no_rate_and_restarts_count_from_zero() {
        // Before: service 2 = :80 with backends 1 (.1) and 7 (.2).
        let old = running(&[(2, vip(10, 80), vec![backend(1, 1, 1), backend(7, 2, 1)])]);
        let before = sample(&old, &[(2, 5_000)], &[(1, 2_000), (7, 3_000)], 5_000);
        // Now: number 2 names another service (:443), :80 moved to number 3;
        // backend 7 is another address; backend 1 was zeroed and counted 10.
        let new = running(&[
            (2, vip(10, 443), vec![backend(7, 3, 1)]),
            (3, vip(10, 80), vec![backend(1, 1, 1), backend(8, 2, 1)]),
        ]);
        let now = sample(&new, &[(2, 6_000), (3, 20)], &[(1, 10), (7, 3_500), (8, 10)], 5_030);
        let report = report(Mode::Generic, &before, &now, Duration::from_secs(1));
        let https = &report.services[0];
        assert_eq!((https.number, https.service.as_str()), (2, "203.0.113.10:443/tcp"));
        assert_eq!(
            (https.traffic.packets, https.traffic.pps, https.traffic.bps),
            (6_000, 0.0, 0.0),
            "number reused: no rate"
        );
        assert_eq!(https.backends[0].traffic.pps, 0.0, "backend number reused for another address: no rate");
        let web = &report.services[1];
        assert_eq!(web.traffic.pps, 0.0, "service moved to another number: new");
        assert_eq!(web.backends[0].traffic.pps, 10.0, "same backend, counters went back: restarted from 0");
        assert_eq!(web.backends[1].traffic.pps, 0.0, "new backend number");
        for traffic in report
            .services
            .iter()
            .flat_map(|s| std::iter::once(&s.traffic).chain(s.backends.iter().map(|b| &b.traffic)))
        {
            assert!(traffic.pps >= 0.0 && traffic.bps >= 0.0 && traffic.pps < 1e6);
        }
        // The global counters restart too (a counter that went back).
        let mut back = now.clone();
        back.counters[0] = 7;
        assert_eq!(super::report(Mode::Generic, &now, &back, Duration::from_secs(1)).counter_rates["rx"], 7.0);
    }

    #[test]
    fn table_shows_services_their_backends_totals_and_counters() {
        let r = running(&[
            (0, ServiceKey::CatchAll, vec![backend(5, 9, 1)]),
            (2, vip(10, 80), vec![backend(1, 1, 1), backend(7, 2, 0)]),
        ]);
        let before = sample(&r, &[], &[], 0);
        let mut now = sample(&r, &[(0, 20), (2, 1_029_744)], &[(5, 20), (1, 1_029_744)], 1_029_770);
        now.counters[1] = 1_029_764;
        let pass = COUNTER_NAMES.iter().position(|&n| n == "pass").unwrap();
        now.counters[pass] = 6;
        let drop_short_l4 = COUNTER_NAMES.iter().position(|&n| n == "drop_short_l4").unwrap();
        now.counters[drop_short_l4] = 4;
        let text = render_table(&report(Mode::Offload, &before, &now, Duration::from_secs(1)));
        let expected = "\
== Load balancer outbound statistics [Offload] ==
 Service / backend    weight            pkts/s              bits/s    packets          bytes
 * (catch-all)                       20 pkts/s       16,000 bits/s         20        2,000 B
   198.18.0.9              1         20 pkts/s       16,000 bits/s         20        2,000 B
 203.0.113.10:80/tcp          1,029,744 pkts/s  823,795,200 bits/s  1,029,744  102,974,400 B
   198.18.0.1              1  1,029,744 pkts/s  823,795,200 bits/s  1,029,744  102,974,400 B
   198.18.0.2              0          0 pkts/s            0 bits/s          0            0 B
 [Totals]                     1,029,764 pkts/s  823,811,200 bits/s  1,029,764  102,976,400 B

 Counter             frames   frames/s
 rx               1,029,770  1,029,770
 tx               1,029,764  1,029,764
 tx_too_big               0          0
 pass                     6          6
 pass_no_service          0          0
 drop_short_l4            4          4
 flow_pinned              0          0
 flow_repinned            0          0
 flow_table_full          0          0
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn table_without_services_says_so() {
        let empty = Sample { services: Vec::new(), counters: vec![0; COUNTER_NAMES.len()] };
        let text = render_table(&report(Mode::Driver, &empty, &empty, Duration::from_secs(1)));
        assert!(text.lines().nth(1) == Some("No services: every packet goes to the stack"), "{text}");
        assert!(text.contains(" [Totals]") && text.contains(" rx "), "{text}");
    }

    #[test]
    fn json_line_has_the_documented_shape() {
        let v6: ServiceKey =
            ServiceKey::Vip { addr: "2001:db8::10".parse().unwrap(), protocol: Protocol::Udp, port: 0 };
        let r = running(&[(0, ServiceKey::CatchAll, vec![]), (4, v6, vec![backend(9, 57, 2)])]);
        let before = sample(&r, &[], &[], 0);
        let now = sample(&r, &[(4, 3)], &[(9, 3)], 3);
        let report = report(Mode::Driver, &before, &now, Duration::from_millis(500));
        let value: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["mode", "interval_s", "services", "totals", "counters", "counter_rates"]);
        assert_eq!(value["mode"], "driver");
        assert_eq!(value["interval_s"], 0.5);
        assert_eq!(
            value["services"][0],
            serde_json::json!({"service": "*", "vip": "*", "protocol": "any", "port": 0, "number": 0,
                               "packets": 0, "bytes": 0, "pps": 0.0, "bps": 0.0, "backends": []})
        );
        assert_eq!(
            value["services"][1],
            serde_json::json!({"service": "[2001:db8::10]:*/udp", "vip": "2001:db8::10", "protocol": "udp", "port": 0, "number": 4,
                               "packets": 3, "bytes": 300, "pps": 6.0, "bps": 4800.0,
                               "backends": [{"number": 9, "addr": "198.18.0.57", "weight": 2, "packets": 3, "bytes": 300, "pps": 6.0, "bps": 4800.0}]})
        );
        assert_eq!(value["totals"], serde_json::json!({"packets": 3, "bytes": 300, "pps": 6.0, "bps": 4800.0}));
        assert_eq!(value["counters"]["rx"], 3);
        assert_eq!(value["counters"]["pass_no_service"], 0);
        assert_eq!(value["counters"].as_object().unwrap().len(), COUNTER_NAMES.len());
        assert_eq!(value["counter_rates"]["rx"], 6.0);
        assert_eq!(value["counter_rates"].as_object().unwrap().len(), COUNTER_NAMES.len());
    }

    #[test]
    fn decap_report_has_every_counter_rates_and_the_addresses() {
        let mut before = vec![0; DECAP_COUNTER_NAMES.len()];
        let mut now = before.clone();
        (before[0], before[1]) = (10, 4);
        (now[0], now[1], now[2]) = (1_510, 1_504, 6);
        let drop_fragment = DECAP_COUNTER_NAMES.iter().position(|&n| n == "drop_fragment").unwrap();
        now[drop_fragment] = 2;
        let addrs: Vec<IpAddr> = vec![Ipv4Addr::new(192, 0, 2, 2).into()];
        let report = decap_report(Mode::Driver, &addrs, &before, &now, Duration::from_millis(500));

        let value: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        assert_eq!(value["mode"], "driver");
        assert_eq!(value["addrs"], serde_json::json!(["192.0.2.2"]));
        assert_eq!(value["counters"]["seen"], 1_510);
        assert_eq!(value["counters"]["decapsulated"], 1_504);
        assert_eq!(value["rates"]["decapsulated"], 3_000.0);
        assert_eq!(value["counters"].as_object().unwrap().len(), DECAP_COUNTER_NAMES.len());
        assert_eq!(value.as_object().unwrap().len(), 5);

        let text = render_decap_table(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "== l4lb decap statistics [Driver] ==");
        assert_eq!(lines[1], "Addresses: 192.0.2.2");
        assert!(lines[3].starts_with(" seen") && lines[3].ends_with("1,510       3,000"), "{text}");
        assert!(text.contains("drop_fragment") && !text.contains("drop_bad_ihl"), "only non-zero drops: {text}");
    }

    #[test]
    fn thousands_rounds_and_groups() {
        assert_eq!(thousands(33_026_761.4), "33,026,761");
        assert_eq!(thousands(999.5), "1,000");
        assert_eq!(thousands(0.0), "0");
    }
}
