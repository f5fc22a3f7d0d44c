//! Statistics: samples of the counters, rates between two samples, and their
//! rendering as the seed's table or as JSON lines; the same for the backend's
//! decap counters. Pure: sampling the maps is done by the caller.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use comfy_table::{presets, Cell, CellAlignment, Table};
use num_format::{Locale, ToFormattedString};
use serde::Serialize;

use crate::bpf::{COUNTER_NAMES, DECAP_COUNTER_NAMES};
use crate::discover::Mode;

/// Cumulative counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// (address, packets, bytes) per active destination.
    pub destinations: Vec<(Ipv4Addr, u64, u64)>,
    /// Global counters, indexed like COUNTER_NAMES.
    pub counters: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub bps: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationTraffic {
    pub addr: Ipv4Addr,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// One report: the `--json` line, and what the table shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub interval_s: f64,
    pub destinations: Vec<DestinationTraffic>,
    pub totals: Traffic,
    pub counters: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    pub mode_label: String,
}

fn rate(now: u64, before: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 / seconds
}

/// Rates between two samples `elapsed` apart. Destinations are matched by
/// address and sorted numerically; one absent from `before` has rate 0.
pub fn report(mode: Mode, before: &Sample, now: &Sample, elapsed: Duration) -> Report {
    let seconds = elapsed.as_secs_f64();
    let previous: HashMap<Ipv4Addr, (u64, u64)> =
        before.destinations.iter().map(|&(addr, p, b)| (addr, (p, b))).collect();
    let mut destinations: Vec<DestinationTraffic> = now
        .destinations
        .iter()
        .map(|&(addr, packets, bytes)| {
            let (p0, b0) = previous.get(&addr).copied().unwrap_or((packets, bytes));
            DestinationTraffic {
                addr,
                traffic: Traffic {
                    packets,
                    bytes,
                    pps: rate(packets, p0, seconds),
                    bps: rate(bytes, b0, seconds) * 8.0,
                },
            }
        })
        .collect();
    destinations.sort_by_key(|d| u32::from(d.addr));
    let totals = Traffic {
        packets: destinations.iter().map(|d| d.traffic.packets).sum(),
        bytes: destinations.iter().map(|d| d.traffic.bytes).sum(),
        pps: destinations.iter().map(|d| d.traffic.pps).sum(),
        bps: destinations.iter().map(|d| d.traffic.bps).sum(),
    };
    let counters = named(&COUNTER_NAMES, now.counters.iter().copied());
    Report { mode: mode.json_name(), interval_s: seconds, destinations, totals, counters, mode_label: mode.to_string() }
}

/// `{name: value}` in the order of `names`.
fn named<T: Into<serde_json::Value>>(names: &[&str], values: impl Iterator<Item = T>) -> serde_json::Map<String, serde_json::Value> {
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

/// The seed's screen: header, one row per destination, totals, then counters.
pub fn render_table(report: &Report) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(vec!["#", "Destination", "pkts/s", "bits/s"]);
    for (row, destination) in report.destinations.iter().enumerate() {
        table.add_row(vec![
            Cell::new(row + 1),
            Cell::new(destination.addr),
            Cell::new(format!("{} pkts/s", thousands(destination.traffic.pps))),
            Cell::new(format!("{} bits/s", thousands(destination.traffic.bps))),
        ]);
    }
    table.add_row(vec![
        Cell::new(""),
        Cell::new("[Totals]"),
        Cell::new(format!("{} pkts/s", thousands(report.totals.pps))),
        Cell::new(format!("{} bits/s", thousands(report.totals.bps))),
    ]);
    for column in 2..4 {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let counters: Vec<String> = report
        .counters
        .iter()
        .filter(|(name, value)| !name.starts_with("drop_") || value.as_u64() != Some(0))
        .map(|(name, value)| format!("{name} {}", thousands(value.as_u64().unwrap_or(0) as f64)))
        .collect();
    format!(
        "== Load balancer outbound statistics [{}] ==\n{}Counters: {}\n",
        report.mode_label,
        table_text(&table),
        counters.join(", ")
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

    fn sample(rows: &[(u8, u64, u64)], rx: u64) -> Sample {
        let mut counters = vec![0; COUNTER_NAMES.len()];
        counters[0] = rx;
        Sample { destinations: rows.iter().map(|&(last, p, b)| (Ipv4Addr::new(10, 0, 0, last), p, b)).collect(), counters }
    }

    #[test]
    fn rates_are_deltas_over_the_interval_sorted_by_address() {
        let before = sample(&[(57, 100, 10_000), (9, 0, 0)], 100);
        let now = sample(&[(57, 2_100, 210_000), (9, 500, 64_000), (200, 7, 700)], 2_607);
        let report = report(Mode::Driver, &before, &now, Duration::from_millis(2000));
        let addrs: Vec<String> = report.destinations.iter().map(|d| d.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.9", "10.0.0.57", "10.0.0.200"]);
        assert_eq!(report.destinations[1].traffic, Traffic { packets: 2_100, bytes: 210_000, pps: 1_000.0, bps: 800_000.0 });
        assert_eq!(report.destinations[0].traffic.pps, 250.0);
        assert_eq!(report.destinations[2].traffic.pps, 0.0, "new destination: no rate yet");
        assert_eq!(report.totals, Traffic { packets: 2_607, bytes: 274_700, pps: 1_250.0, bps: 1_056_000.0 });
        assert_eq!(report.counters["rx"], 2_607);
    }

    #[test]
    fn counters_that_went_back_give_zero_not_garbage() {
        let report = report(Mode::Generic, &sample(&[(1, 500, 500)], 0), &sample(&[(1, 10, 10)], 0), Duration::from_secs(1));
        assert_eq!(report.destinations[0].traffic.pps, 0.0);
    }

    #[test]
    fn table_has_seed_header_rows_and_thousands_separators() {
        let before = sample(&[(57, 0, 0)], 0);
        let now = sample(&[(57, 1_029_744, 148_283_028)], 1_029_744);
        let text = render_table(&report(Mode::Offload, &before, &now, Duration::from_secs(1)));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "== Load balancer outbound statistics [Offload] ==");
        assert!(lines[2].contains(" 1 ") && lines[2].contains("10.0.0.57"), "{text}");
        assert!(lines[2].ends_with("1,029,744 pkts/s  1,186,264,224 bits/s"), "{text}");
        assert!(lines[3].trim_start().starts_with("[Totals]") && lines[3].ends_with("1,029,744 pkts/s  1,186,264,224 bits/s"), "{text}");
        assert_eq!(lines[4], "Counters: rx 1,029,744, tx 0, pass 0");
    }

    #[test]
    fn json_line_has_the_documented_shape() {
        let report = report(Mode::Driver, &sample(&[(57, 0, 0)], 0), &sample(&[(57, 3, 300)], 3), Duration::from_millis(500));
        let value: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        assert_eq!(value["mode"], "driver");
        assert_eq!(value["interval_s"], 0.5);
        assert_eq!(value["destinations"][0], serde_json::json!({"addr": "10.0.0.57", "packets": 3, "bytes": 300, "pps": 6.0, "bps": 4800.0}));
        assert_eq!(value["totals"], serde_json::json!({"packets": 3, "bytes": 300, "pps": 6.0, "bps": 4800.0}));
        assert_eq!(value["counters"]["rx"], 3);
        assert_eq!(value["counters"]["drop_bad_ihl"], 0);
        assert_eq!(value.as_object().unwrap().len(), 5);
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
