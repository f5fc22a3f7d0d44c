//! `l4lb bench` end to end, shortened: it must measure every row (IPv4 VIP
//! TCP and UDP, 1500 bytes, IPv4 options, IPv6 in IPv6, IPv4 in IPv6, the
//! catch-all), have l4lb send back every frame it saw through the services
//! the rows are sent to, write its chart and JSON, and leave no namespace
//! behind. Needs root (BPF, network namespaces); without it the test is
//! reported as ignored.

mod common;

use std::process::Command;

use common::fail;
use libtest_mimic::Failed;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

/// The rows, in order, and the service (as `l4lb config` names it) each is sent to.
const ROWS: [(&str, &str, &str); 7] = [
    ("tcp_syn_64", "IPv4", "198.19.0.1:80/tcp"),
    ("udp_64", "IPv4", "198.19.0.1:53/udp"),
    ("tcp_1500", "IPv4", "198.19.0.1:80/tcp"),
    ("ipv4_options", "IPv4", "198.19.0.1:80/tcp"),
    ("ipv6_tcp_syn_74", "IPv6", "[2001:db8:19::1]:80/tcp"),
    ("tcp_syn_64_4in6", "IPv6", "198.19.0.2:80/tcp"),
    ("catch_all_tcp_syn_64", "IPv4", "*"),
];

fn main() {
    common::run_suite(
        "bench",
        "the benchmark loads XDP programs into network namespaces",
        vec![("short_run_reports_every_row_and_cleans_up", short_run_reports_every_row_and_cleans_up)],
    )
}

fn bench_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("running ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("l4lbb-"))
        .map(str::to_string)
        .collect()
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn short_run_reports_every_row_and_cleans_up() -> Result<(), Failed> {
    let dir = std::env::temp_dir().join(format!("l4lbt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let chart = dir.join("ratios.svg");
    let before = bench_namespaces();
    let out = Command::new(BIN)
        .args(["bench", "--rounds", "1", "--seconds", "0.2", "--json", "--chart"])
        .arg(&chart)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(fail(format!("l4lb bench failed: {stderr}")));
    }
    let results: Value = serde_json::from_slice(&out.stdout).map_err(|err| fail(format!("not JSON ({err}): {stderr}")))?;
    let kinds = results["kinds"].as_array().ok_or_else(|| fail("no kinds"))?;
    let names: Vec<&str> = kinds.iter().filter_map(|k| k["kind"].as_str()).collect();
    let wanted: Vec<&str> = ROWS.iter().map(|r| r.0).collect();
    if names != wanted {
        return Err(fail(format!("kinds {names:?}, expected {wanted:?}")));
    }
    for (kind, (name, outer, _)) in kinds.iter().zip(ROWS) {
        if kind["outer"] != outer {
            return Err(fail(format!("{name}: outer {}, expected {outer}", kind["outer"])));
        }
        let t = &kind["throughput"];
        for key in ["l4lb_mpps", "plain_mpps", "encap_mpps", "ratio_plain", "ratio_encap"] {
            let median = number(&t[key]["median"]);
            if !(median > 0.0 && median.is_finite()) {
                return Err(fail(format!("{name} {key}: {median}")));
            }
        }
        if t["rounds"].as_array().map_or(0, Vec::len) != 1 {
            return Err(fail(format!("{name}: rounds {}", t["rounds"])));
        }
        // A ratio far from 1 means a program dropped frames, not a slow one.
        let ratio = number(&t["ratio_encap"]["median"]);
        if !(0.3..3.0).contains(&ratio) {
            return Err(fail(format!("{name}: l4lb / encap floor = {ratio}")));
        }
        for key in ["test_run_ns", "run_time_ns"] {
            let l4lb = number(&kind[key]["l4lb"]);
            if !(l4lb > 0.0 && l4lb.is_finite()) {
                return Err(fail(format!("{name}: {key} of l4lb = {l4lb}")));
            }
        }
    }

    // l4lb's own counters: every frame seen was sent back, nothing passed or
    // dropped, and the services the rows go to counted all of it.
    let counts = &results["l4lb_counts"];
    let (rx, tx) = (counts["rx"].as_u64().unwrap_or(0), counts["tx"].as_u64().unwrap_or(0));
    if rx == 0 || rx != tx {
        return Err(fail(format!("l4lb counted rx {rx}, tx {tx}")));
    }
    if counts["others"].as_array().is_none_or(|o| !o.is_empty()) {
        return Err(fail(format!("other l4lb counters moved: {}", counts["others"])));
    }
    let services = counts["services"].as_array().ok_or_else(|| fail("no service counts"))?;
    let summed: u64 = services.iter().filter_map(|s| s["packets"].as_u64()).sum();
    if summed != tx {
        return Err(fail(format!("services counted {summed} packets, l4lb sent {tx}: {services:?}")));
    }
    for (name, _, service) in ROWS {
        let packets = services.iter().find(|s| s["service"] == service).and_then(|s| s["packets"].as_u64()).unwrap_or(0);
        if packets == 0 {
            return Err(fail(format!("{name}: service {service} counted no packets: {services:?}")));
        }
    }

    if results["control_plane"]["destinations"] != 512 {
        return Err(fail(format!("control plane: {}", results["control_plane"])));
    }
    let svg = std::fs::read_to_string(&chart)?;
    if !svg.starts_with("<svg") || !svg.contains("TCP SYN 64 B") || !svg.contains("IPv6 SYN") {
        return Err(fail("the chart is not an SVG with the packet kinds"));
    }
    let left: Vec<String> = bench_namespaces().into_iter().filter(|ns| !before.contains(ns)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    if !left.is_empty() {
        return Err(fail(format!("namespaces left behind: {left:?}")));
    }
    Ok(())
}
