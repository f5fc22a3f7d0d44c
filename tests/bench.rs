//! `l4lb bench` end to end, shortened: it must measure every packet kind,
//! write its chart and JSON, and leave no namespace behind. Needs root (BPF,
//! network namespaces); without it the test is reported as ignored.

mod common;

use std::process::Command;

use common::fail;
use libtest_mimic::Failed;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

fn main() {
    common::run_suite(
        "bench",
        "the benchmark loads XDP programs into network namespaces",
        vec![("short_run_reports_every_kind_and_cleans_up", short_run_reports_every_kind_and_cleans_up)],
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

fn short_run_reports_every_kind_and_cleans_up() -> Result<(), Failed> {
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
    if names != ["tcp_syn_64", "udp_64", "tcp_1500", "ipv4_options"] {
        return Err(fail(format!("kinds {names:?}")));
    }
    for kind in kinds {
        let t = &kind["throughput"];
        for key in ["l4lb_mpps", "plain_mpps", "encap_mpps", "ratio_plain", "ratio_encap"] {
            let median = t[key]["median"].as_f64().unwrap_or(f64::NAN);
            if !(median > 0.0 && median.is_finite()) {
                return Err(fail(format!("{} {key}: {median}", kind["kind"])));
            }
        }
        // A ratio far from 1 means a program dropped frames, not a slow one.
        let ratio = t["ratio_encap"]["median"].as_f64().unwrap_or(0.0);
        if !(0.3..3.0).contains(&ratio) {
            return Err(fail(format!("{}: l4lb / encap floor = {ratio}", kind["kind"])));
        }
    }
    if results["control_plane"]["destinations"] != 512 {
        return Err(fail(format!("control plane: {}", results["control_plane"])));
    }
    let svg = std::fs::read_to_string(&chart)?;
    if !svg.starts_with("<svg") || !svg.contains("TCP SYN 64 B") {
        return Err(fail("the chart is not an SVG with the packet kinds"));
    }
    let left: Vec<String> = bench_namespaces().into_iter().filter(|ns| !before.contains(ns)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    if !left.is_empty() {
        return Err(fail(format!("namespaces left behind: {left:?}")));
    }
    Ok(())
}
