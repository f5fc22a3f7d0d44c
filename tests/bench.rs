//! `l4lb bench` end to end, shortened: it must measure every row (IPv4 VIP
//! TCP SYN, TCP ACK of established flows and UDP, 1500 bytes, IPv4 options,
//! IPv6 in IPv6, IPv4 in IPv6, the catch-all, ACKs and SYNs right after
//! a change, and SYNs spread over 64 services) with l4lb tracking flows and
//! untracked, have both send back
//! every frame they saw through the services the rows are sent to, pin flows
//! only where they should (none in steady slots; after a change, the ACK
//! row's flows of slots in transition in its warm-up, at most its 65536, and
//! some SYNs of the flood), measure every variant of `--variants` (each
//! loads, passes the verifier and forwards), write its chart and JSON, and
//! leave no namespace behind. Needs root (BPF,
//! network namespaces); without it the test is reported as ignored.

mod common;

use std::process::Command;

use common::fail;
use libtest_mimic::Failed;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

/// The rows, in order, and the service (as `l4lb config` names it) each is sent to.
const ROWS: [(&str, &str, &str); 11] = [
    ("tcp_syn_64", "IPv4", "198.19.0.1:80/tcp"),
    ("tcp_ack_64", "IPv4", "198.19.0.1:80/tcp"),
    ("udp_64", "IPv4", "198.19.0.1:53/udp"),
    ("tcp_1500", "IPv4", "198.19.0.1:80/tcp"),
    ("ipv4_options", "IPv4", "198.19.0.1:80/tcp"),
    ("ipv6_tcp_syn_74", "IPv6", "[2001:db8:19::1]:80/tcp"),
    ("tcp_syn_64_4in6", "IPv6", "198.19.0.2:80/tcp"),
    ("catch_all_tcp_syn_64", "IPv4", "*"),
    ("tcp_ack_64_transition", "IPv4", "198.19.0.1:81/tcp"),
    ("tcp_syn_64_transition", "IPv4", "198.19.0.1:81/tcp"),
    ("tcp_syn_64_spread", "IPv4", SPREAD_ROW_SERVICE),
];

/// The first of the 64 services of the 64-services row, which a second pair
/// of l4lbs holds (the bench itself checks their counters: every one of the
/// 64 services counted packets); l4lb_counts are the main pair's.
const SPREAD_ROW_SERVICE: &str = "198.19.4.128:80/tcp";

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

/// Distinct flows of the TCP ACK row (`frames::ACK_FLOWS`).
const ACK_FLOWS: u64 = 65_536;

/// l4lb's counters (tracked or untracked): every frame seen was sent back,
/// nothing passed or dropped, the services the rows go to counted all of it.
fn check_counts(which: &str, counts: &Value) -> Result<(), Failed> {
    let (rx, tx) = (counts["rx"].as_u64().unwrap_or(0), counts["tx"].as_u64().unwrap_or(0));
    if rx == 0 || rx != tx {
        return Err(fail(format!("{which}: l4lb counted rx {rx}, tx {tx}")));
    }
    if counts["others"].as_array().is_none_or(|o| !o.is_empty()) {
        return Err(fail(format!("{which}: other l4lb counters moved: {}", counts["others"])));
    }
    let services = counts["services"].as_array().ok_or_else(|| fail("no service counts"))?;
    let summed: u64 = services.iter().filter_map(|s| s["packets"].as_u64()).sum();
    if summed != tx {
        return Err(fail(format!("{which}: services counted {summed} packets, l4lb sent {tx}: {services:?}")));
    }
    for (name, _, service) in ROWS.into_iter().filter(|row| row.2 != SPREAD_ROW_SERVICE) {
        let packets =
            services.iter().find(|s| s["service"] == service).and_then(|s| s["packets"].as_u64()).unwrap_or(0);
        if packets == 0 {
            return Err(fail(format!("{which}: {name}: service {service} counted no packets: {services:?}")));
        }
    }
    Ok(())
}

/// A connection-tracking event counter of l4lb's counts.
fn flow_event(counts: &Value, name: &str) -> Option<u64> {
    counts["flow_events"].as_array()?.iter().find(|e| e[0] == name).and_then(|e| e[1].as_u64())
}

/// The variants phase: the floor first, l4lb_balance itself among them,
/// every program measured (it loaded, passed the verifier and forwarded).
fn check_variants(variants: &Value) -> Result<(), Failed> {
    let rows = variants["rows"].as_array().ok_or_else(|| fail(format!("no variants: {variants}")))?;
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    if names.first() != Some(&"encap floor") || !names.contains(&"l4lb") || !names.contains(&"l4lb, atomic adds") {
        return Err(fail(format!("variants {names:?}")));
    }
    for row in rows {
        let mpps = number(&row["mpps"]["median"]);
        if !(mpps > 0.0 && mpps.is_finite()) {
            return Err(fail(format!("variant {}: {mpps} Mpps", row["name"])));
        }
    }
    Ok(())
}

fn short_run_reports_every_row_and_cleans_up() -> Result<(), Failed> {
    let dir = std::env::temp_dir().join(format!("l4lbt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let chart = dir.join("ratios.svg");
    let bench = Command::new(BIN)
        .args(["bench", "--rounds", "1", "--seconds", "0.2", "--variants", "--json", "--chart"])
        .arg(&chart)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The bench names its namespaces after its pid: only those are its
    // own (another bench running on the machine has others).
    let own = format!("l4lbb-{}-", bench.id());
    let out = bench.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(fail(format!("l4lb bench failed: {stderr}")));
    }
    let results: Value =
        serde_json::from_slice(&out.stdout).map_err(|err| fail(format!("not JSON ({err}): {stderr}")))?;
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
        for key in [
            "l4lb_mpps",
            "l4lb_untracked_mpps",
            "plain_mpps",
            "encap_mpps",
            "ratio_plain",
            "ratio_encap",
            "ratio_encap_untracked",
        ] {
            let median = number(&t[key]["median"]);
            if !(median > 0.0 && median.is_finite()) {
                return Err(fail(format!("{name} {key}: {median}")));
            }
        }
        if t["rounds"].as_array().map_or(0, Vec::len) != 1 {
            return Err(fail(format!("{name}: rounds {}", t["rounds"])));
        }
        // No bound on the ratios: one round of 0.2 s per program on a shared
        // machine gives any ratio (a clean-clone CI run saw 0.21 for
        // ratio_encap_untracked while other work ran); speed is the bench's
        // to report, not this test's to judge. Dropped frames, which a ratio
        // was once meant to catch, show in l4lb's counters (rx = tx, below).
        if !number(&t["ns_tracking"]["median"]).is_finite() {
            return Err(fail(format!("{name}: ns_tracking {}", t["ns_tracking"])));
        }
        for key in ["test_run_ns", "run_time_ns"] {
            for program in ["l4lb", "l4lb_untracked"] {
                let ns = number(&kind[key][program]);
                if !(ns > 0.0 && ns.is_finite()) {
                    return Err(fail(format!("{name}: {key} of {program} = {ns}")));
                }
            }
        }

        // Connection tracking, from the tracked l4lb's counters over the row.
        let flows = &t["rounds"][0]["flows"];
        let count = |key: &str| flows[key].as_u64().ok_or_else(|| fail(format!("{name}: no flows.{key}: {flows}")));
        let (tx, pinned, warmup) = (count("tx")?, count("pinned")?, count("warmup_pinned")?);
        if tx == 0 {
            return Err(fail(format!("{name}: the tracked l4lb sent nothing to backends: {flows}")));
        }
        match name {
            // Right after a change: the established flows of the slots in
            // transition (about 1/33) are pinned in the warm-up, at most once
            // each; then the pins hold.
            "tcp_ack_64_transition" if warmup == 0 || pinned + warmup > ACK_FLOWS || count("repinned")? > 0 => {
                return Err(fail(format!("{name}: {ACK_FLOWS} flows, 1/33 in transition, but: {flows}")));
            }
            // A SYN in a slot in transition pins its new flow.
            "tcp_syn_64_transition" if pinned == 0 => return Err(fail(format!("{name}: no SYN pinned: {flows}"))),
            "tcp_ack_64_transition" | "tcp_syn_64_transition" => {}
            // Every other row meets steady slots only: no per-flow state.
            _ if pinned + warmup > 0 => return Err(fail(format!("{name}: flows pinned in steady slots: {flows}"))),
            _ => {}
        }
    }

    check_counts("tracked", &results["l4lb_counts"])?;
    check_counts("untracked", &results["l4lb_untracked_counts"])?;
    let pinned = |which: &str| flow_event(&results[which], "flow_pinned");
    if pinned("l4lb_counts").unwrap_or(0) == 0 || pinned("l4lb_untracked_counts") != Some(0) {
        return Err(fail(format!(
            "flow_pinned: tracked {:?}, untracked {:?}",
            pinned("l4lb_counts"),
            pinned("l4lb_untracked_counts")
        )));
    }

    check_variants(&results["variants"])?;
    if results["control_plane"]["destinations"] != 512 {
        return Err(fail(format!("control plane: {}", results["control_plane"])));
    }
    let svg = std::fs::read_to_string(&chart)?;
    if !svg.starts_with("<svg")
        || !svg.contains("TCP SYN 64 B")
        || !svg.contains("TCP ACK 64 B")
        || !svg.contains("IPv6 SYN")
    {
        return Err(fail("the chart is not an SVG with the packet kinds"));
    }
    let left: Vec<String> = bench_namespaces().into_iter().filter(|ns| ns.starts_with(&own)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    if !left.is_empty() {
        return Err(fail(format!("namespaces left behind: {left:?}")));
    }
    Ok(())
}
