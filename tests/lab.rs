//! The lab (`scripts/lab`): a client, a bridge, the balancer and backends in
//! network namespaces, with l4lb on the balancer and `l4lb decap` plus an HTTP
//! server on every backend. Real TCP connections from the client to the VIPs
//! (IPv4 and IPv6, outer headers of both families) go through l4lb and come
//! back straight from the backends.
//!
//! Each test brings up its own lab under the prefix `l4lbt-lab-<pid>-<n>`
//! (state in /run/<prefix>) with the `l4lb` binary cargo built for the tests;
//! a guard runs `scripts/lab down` when the test ends, also when it fails.
//! The tests take a lock and run one at a time: the lab's traffic and
//! counters are easiest to reason about without a second lab competing for
//! the 2 CPUs.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use common::{fail, in_netns, run, run_with, Outcome, TestResult};
use l4lb::config::{self, Model, Protocol, Service, ServiceKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab");
/// Prefix of this suite's labs (namespaces `l4lbt-lab-<pid>-<n>-client` ...).
const PREFIX: &str = "l4lbt-lab";
/// `scripts/lab up` takes about 2 s for 4 backends; generous for a loaded machine.
const LAB_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections of the round-trip test (about 1.5 s).
const CONNECTIONS: usize = 1000;
/// Two-sided miss probability of each backend's interval (see `binomial_interval`).
const ALPHA: f64 = 1e-4;
/// For tests that count packets exactly (health probes are decapsulated by
/// the backends but never pass l4lb) or apply their own files.
const NO_HEALTH_CHECKS: (&str, &str) = ("LAB_HEALTH", "none");

/// The steps of `scripts/lab up`, in order (LAB_FAIL_AFTER accepts each).
const STEPS: &[&str] = &["namespaces", "segment", "client", "balancer", "backends", "servers", "decap", "l4lb"];

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn main() {
    if common::is_root() {
        remove_leftovers();
    }
    common::run_suite(
        "lab",
        "network namespaces, XDP and servers in them need root",
        vec![
            ("round_trips_follow_the_table_and_counters_agree", round_trips_follow_the_table_and_counters_agree),
            ("up_down_are_idempotent_and_leave_nothing_behind", up_down_are_idempotent_and_leave_nothing_behind),
            ("failure_at_every_step_of_up_leaves_nothing_behind", failure_at_every_step_of_up_leaves_nothing_behind),
            ("hundred_applies_under_the_lab_flood_drop_nothing", hundred_applies_under_the_lab_flood_drop_nothing),
            ("too_big_answers_teach_the_client_its_path_mtu", too_big_answers_teach_the_client_its_path_mtu),
            (
                "health_checks_take_dead_backends_out_and_bring_them_back",
                health_checks_take_dead_backends_out_and_bring_them_back,
            ),
            ("health_checks_keep_every_backend_when_all_are_down", health_all_down_keeps_every_backend),
            (
                "prometheus_scraping_the_agent_counts_what_the_backends_decapsulated",
                prometheus_counts_what_backends_got,
            ),
        ],
    );
}

// ---------------------------------------------------------------- the lab

/// One lab; `scripts/lab down` when dropped.
struct Lab {
    prefix: String,
    state: PathBuf,
}

impl Lab {
    fn new() -> Self {
        let prefix = common::lab_prefix(PREFIX);
        let state = PathBuf::from(format!("/run/{prefix}"));
        Lab { prefix, state }
    }

    /// `scripts/lab ARGS` for this lab, with extra environment variables.
    fn lab(&self, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let mut full_env = vec![("LAB_PREFIX", self.prefix.as_str()), ("L4LB", BIN)];
        full_env.extend_from_slice(env);
        run_with(LAB, args, &full_env, LAB_TIMEOUT)
    }

    fn up(&self, backends: usize) -> TestResult<Outcome> {
        self.lab(&["up", "--backends", &backends.to_string()], &[]).success()
    }

    /// `up` with the lab's environment variables `env` (LAB_FLOW_ENTRIES, LAB_HEALTH).
    fn up_with(&self, backends: usize, env: &[(&str, &str)]) -> TestResult<Outcome> {
        self.lab(&["up", "--backends", &backends.to_string()], env).success()
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// `l4lb ARGS` inside one of the lab's namespaces.
    fn l4lb(&self, ns: &str, args: &[&str]) -> Outcome {
        let ns = self.ns(ns);
        let mut full = vec!["netns", "exec", ns.as_str(), BIN];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The KEY=VALUE pairs of the lab's lab.env.
    fn env(&self) -> TestResult<LabEnv> {
        let path = self.state.join("lab.env");
        let text = std::fs::read_to_string(&path).map_err(|err| fail(format!("{}: {err}", path.display())))?;
        Ok(LabEnv(
            text.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ))
    }

    /// (address, MAC) of every backend, from the destination file the lab wrote.
    fn backends(&self) -> TestResult<Vec<(Ipv4Addr, String)>> {
        let path = self.state.join("destinations.csv");
        let text = std::fs::read_to_string(&path).map_err(|err| fail(format!("{}: {err}", path.display())))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let row = line.split('#').next().unwrap_or("").trim();
            if let Some((addr, mac)) = row.split_once(',') {
                out.push((
                    addr.trim().parse().map_err(|_| fail(format!("bad row {line:?} in {}", path.display())))?,
                    mac.trim().to_string(),
                ));
            }
        }
        Ok(out)
    }

    /// Everything that exists now and belongs to this lab.
    fn traces(&self) -> Traces {
        let namespaces = run("ip", &["netns", "list"])
            .stdout
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| name.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect();
        let state = self.state.exists();
        // Any process whose command line names the state directory (the servers do).
        let marker = self.state.display().to_string();
        let mut processes = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
                if pid == std::process::id() {
                    continue;
                }
                if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if cmdline.contains(&marker) {
                        processes.push(format!("{pid}: {cmdline}"));
                    }
                }
            }
        }
        Traces { namespaces, state, processes }
    }
}

/// A lab's lab.env: what scripts/lab built (namespaces, addresses, files).
struct LabEnv(BTreeMap<String, String>);

impl LabEnv {
    /// The value of `key`.
    fn get(&self, key: &str) -> TestResult<String> {
        self.0.get(key).cloned().ok_or_else(|| fail(format!("{key} missing from lab.env: {:?}", self.0)))
    }

    /// The value of `key`, parsed.
    fn parse<T: std::str::FromStr>(&self, key: &str) -> TestResult<T> {
        let text = self.get(key)?;
        text.parse().map_err(|_| fail(format!("lab.env: {key}={text} does not parse")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.lab(&["down"], &[]);
        if out.code != Some(0) {
            eprintln!("lab {}: `scripts/lab down` in the guard failed: {}", self.prefix, out.describe());
        }
    }
}

/// What a lab left: must be empty after `down`.
#[derive(Debug, PartialEq, Eq)]
struct Traces {
    namespaces: Vec<String>,
    state: bool,
    processes: Vec<String>,
}

impl Traces {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && !self.state && self.processes.is_empty()
    }
}

/// Program ids from the lab's `   xdp on NS/DEV: NAME id N MODE` lines.
fn program_ids(output: &str) -> Vec<u32> {
    output
        .lines()
        .filter(|line| line.trim_start().starts_with("xdp on "))
        .filter_map(|line| line.split_whitespace().skip_while(|word| *word != "id").nth(1)?.parse().ok())
        .collect()
}

/// Server pids from the lab's `   servers: be1 pid N  be2 pid M` line.
fn server_pids(output: &str) -> Vec<u32> {
    let Some(line) = output.lines().find(|line| line.trim_start().starts_with("servers:")) else { return Vec::new() };
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).filter(|pair| pair[0] == "pid").filter_map(|pair| pair[1].parse().ok()).collect()
}

/// Whether a BPF program with this id still exists.
fn program_exists(id: u32) -> bool {
    // SAFETY: plain syscall wrapper.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if fd >= 0 {
        // SAFETY: fd was just returned to us.
        unsafe { nix::libc::close(fd) };
        return true;
    }
    false
}

/// Links of the initial namespace (the lab must never create any there).
fn root_links() -> BTreeSet<String> {
    let json: Value = serde_json::from_str(&run("ip", &["-j", "link", "show"]).stdout).unwrap_or(Value::Null);
    json.as_array().into_iter().flatten().filter_map(|link| link["ifname"].as_str().map(str::to_string)).collect()
}

/// After `down`: no namespace, state directory, process, program (given by
/// id) or root-namespace link of the lab remains. Programs are freed when
/// the kernel finishes destroying the namespaces, asynchronously: up to 10 s.
fn assert_nothing_left(
    lab: &Lab,
    programs: &[u32],
    pids: &[u32],
    links_before: &BTreeSet<String>,
    when: &str,
) -> TestResult {
    let traces = lab.traces();
    ensure!(traces.is_empty(), "{when}: left behind: {traces:?}");
    for pid in pids {
        ensure!(!common::runs(*pid), "{when}: server pid {pid} still runs");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<u32> = programs.iter().copied().filter(|&id| program_exists(id)).collect();
        if alive.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "{when}: XDP programs {alive:?} of the lab still exist 10 s after down");
        std::thread::sleep(Duration::from_millis(100));
    }
    let new_links: Vec<String> = root_links().difference(links_before).cloned().collect();
    let lab_like = |name: &String| ["client0", "lb0", "sw0", "sw-", "be"].iter().any(|p| name.starts_with(p));
    let ours: Vec<&String> = new_links.iter().filter(|name| lab_like(name)).collect();
    ensure!(ours.is_empty(), "{when}: links with lab names appeared in the initial namespace: {ours:?}");
    Ok(())
}

/// Labs of earlier runs of this suite whose process is gone.
fn remove_leftovers() {
    for prefix in common::dead_labs(PREFIX) {
        let _ = run_with(LAB, &["down"], &[("LAB_PREFIX", &prefix), ("L4LB", BIN)], LAB_TIMEOUT);
    }
}

// ---------------------------------------------------------------- traffic

/// One HTTP GET to VIP:port from the calling thread's namespace: (local port,
/// the answer's body) or what went wrong.
fn http_get(vip: IpAddr, port: u16) -> Result<(u16, String), String> {
    common::http::get(SocketAddr::new(vip, port), Duration::from_secs(3))
}

/// The interval [lo, hi] that a Binomial(n, p) count falls into with
/// probability at least 1 - alpha: P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2
/// (exact, from the probability mass function).
fn binomial_interval(n: usize, p: f64, alpha: f64) -> (usize, usize) {
    if p <= 0.0 {
        return (0, 0);
    }
    if p >= 1.0 {
        return (n, n);
    }
    // pmf(k+1) = pmf(k) * (n-k)/(k+1) * p/(1-p), from pmf(0) = (1-p)^n, in logs.
    let mut log_pmf = Vec::with_capacity(n + 1);
    let mut current = n as f64 * (1.0 - p).ln();
    for k in 0..=n {
        log_pmf.push(current);
        current += ((n - k) as f64 / (k + 1) as f64).ln() + (p / (1.0 - p)).ln();
    }
    let pmf: Vec<f64> = log_pmf.iter().map(|l| l.exp()).collect();
    let mut lo = 0;
    let mut below = 0.0;
    while lo < n && below + pmf[lo] <= alpha / 2.0 {
        below += pmf[lo];
        lo += 1;
    }
    let mut hi = n;
    let mut above = 0.0;
    while hi > 0 && above + pmf[hi] <= alpha / 2.0 {
        above += pmf[hi];
        hi -= 1;
    }
    (lo, hi)
}

/// The balancer's state and traffic as its maps hold them.
struct LbView {
    running: l4lb::state::Running,
    /// Packets per backend number.
    packets: Vec<u64>,
    counters: BTreeMap<&'static str, u64>,
    /// Entries the flow table holds.
    flow_entries: u64,
}

impl LbView {
    /// The drop counters that are not 0, as "name value".
    fn drops(&self) -> Vec<String> {
        self.counters
            .iter()
            .filter(|(n, v)| n.starts_with("drop_") && **v > 0)
            .map(|(n, v)| format!("{n} {v}"))
            .collect()
    }
}

fn lb_view(lb_ns: &str, lb_dev: &str) -> TestResult<LbView> {
    let (running, traffic, counters, flow_entries) = in_netns(lb_ns, || {
        use libbpf_rs::MapCore;
        let iface = l4lb::iface::Interface::by_name(lb_dev)?;
        let program = l4lb::discover::find_l4lb(&iface)?;
        let maps = l4lb::maps::LbMaps::open(&program)?;
        let flow_entries = u64::from(l4lb::maps::open_flows(&program)?.max_entries());
        Ok((maps.read_running()?, maps.read_backend_stats()?, maps.read_counters()?, flow_entries))
    })?;
    let counters = l4lb::bpf::COUNTER_NAMES.iter().copied().zip(counters).collect();
    Ok(LbView { running, packets: traffic.iter().map(|t| t.packets).collect(), counters, flow_entries })
}

/// The decapsulated count of one `l4lb decap stats --json` sample on backend `k`.
fn decapsulated(lab: &Lab, k: usize) -> TestResult<(u64, Value)> {
    let dev = format!("be{k}");
    let out = lab.l4lb(&format!("be{k}"), &["decap", "stats", "-i", &dev, "--json", "--count", "1"]).success()?;
    let sample: Value = serde_json::from_str(out.stdout.trim())
        .map_err(|err| fail(format!("decap stats output {:?}: {err}", out.stdout)))?;
    let count = sample["counters"]["decapsulated"]
        .as_u64()
        .ok_or_else(|| fail(format!("no counters.decapsulated in {sample}")))?;
    Ok((count, sample))
}

/// The lab's backend K's name from an answer "beK ADDRESS".
fn answering_backend(body: &str) -> TestResult<usize> {
    body.split_whitespace()
        .next()
        .and_then(|name| name.strip_prefix("be"))
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| fail(format!("answer {body:?} names no backend")))
}

/// The lab's backend number K (1-based) of a backend address (scripts/lab:
/// 198.18.0.(100+K) and 2001:db8:18::(100+K)).
fn lab_backend_of(addr: IpAddr) -> Option<usize> {
    (1..=100).find(|&k| addr == backend_addr6(k) || addr == IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + k as u8)))
}

/// Source ports for `count` new connections: never handed out before in
/// this process, and below the kernel's ephemeral range (32768 on), so that
/// no other socket takes them meanwhile. The lab suite makes a few thousand
/// such connections; past 32767 the ports start again from the bottom, by
/// then long out of TIME_WAIT.
fn new_source_ports(count: usize) -> Vec<u16> {
    const FIRST: u32 = 10_000;
    const END: u32 = 32_768;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = NEXT.fetch_add(count as u32, std::sync::atomic::Ordering::Relaxed);
    (start..start + count as u32).map(|n| (FIRST + n % (END - FIRST)) as u16).collect()
}

/// `connections` HTTP GETs from the client namespace to vip:port, each from a
/// new source port (the test's: the kernel may hand out a port again):
/// every one completes, and each is answered by the backend
/// that its flow's slot names in `service`'s table as the kernel holds it
/// (flow hash model). Returns how many each lab backend (index K - 1)
/// answered.
fn http_round_trips(
    client_ns: &str,
    client: IpAddr,
    vip: IpAddr,
    port: u16,
    connections: usize,
    service: &l4lb::state::RunningService,
    seed: u32,
) -> TestResult<Vec<usize>> {
    let key = service.key;
    let target = SocketAddr::new(vip, port);
    let sports = new_source_ports(connections);
    let results = in_netns(client_ns, || {
        Ok(sports
            .iter()
            .map(|&sport| common::http::get_from(sport, target, Duration::from_secs(3)))
            .collect::<Vec<_>>())
    })?;
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    ensure!(
        failures.is_empty(),
        "{key}: {} of {connections} connections failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let answers: Vec<(u16, String)> = results.into_iter().map(Result::unwrap).collect();
    ensure!(
        answers.iter().map(|a| a.0).eq(sports.iter().copied()),
        "{key}: the connections did not leave from the {connections} source ports asked for"
    );

    let mut answered = vec![0usize; 4];
    let mut misrouted = Vec::new();
    for (sport, body) in &answers {
        let k = answering_backend(body)?;
        ensure!((1..=4).contains(&k), "answer {body:?} from an unknown backend");
        answered[k - 1] += 1;
        let flow = l4lb::flow_hash::Flow { saddr: client, daddr: vip, sport: *sport, dport: port, proto: 6 };
        let slot = l4lb::maglev::flow_slot(&flow, seed, service.table.len());
        let predicted = service
            .backends
            .iter()
            .find(|b| b.number == service.table[slot])
            .and_then(|b| lab_backend_of(b.backend.addr));
        if predicted != Some(k) {
            misrouted.push(format!("source port {sport}: answered by be{k}, table says {predicted:?}"));
        }
    }
    ensure!(
        misrouted.is_empty(),
        "{key}: {} connections answered by another backend than the table's, e.g. {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    Ok(answered)
}

// ---------------------------------------------------------------- tests

/// HTTP round trips from the client to each of the lab's three services
/// (IPv4 in IPv4, IPv4 in IPv6, IPv6 in IPv6): every one completes, each is
/// answered by the backend its flow's slot names in the service's Maglev
/// table as the kernel holds it (flow hash model + table read back), every
/// backend answers, each backend's share is within the binomial interval of
/// its table share, and l4lb's packets per backend (summed over the
/// backend's entries in the three services) equal what each backend
/// decapsulated; no drop counter moves.
///
/// The statistics: every connection has a new source port, so with the hash
/// spreading flows uniformly over the table's slots, the number of
/// connections backend k answers is Binomial(n, slots_k / slots). Its exact
/// interval with miss probability ALPHA = 1e-4 (99.99%) is checked for each
/// backend of each service, so a correct balancer fails this check with
/// probability at most 12 x 1e-4 (union bound). For 1000 connections and a
/// share of 1/4 the interval is [198, 304].
fn round_trips_follow_the_table_and_counters_agree() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    lab.up_with(4, &[NO_HEALTH_CHECKS])?;
    let env = lab.env()?;
    let addr = |key: &str| -> TestResult<IpAddr> { env.parse(key) };
    let port: u16 = env.parse("PORT")?;
    let (client4, client6) = (addr("CLIENT_ADDR")?, addr("CLIENT_ADDR6")?);
    let (lb_ns, lb_dev) = (env.get("LB_NS")?, env.get("LB_DEV")?);
    let backends = lab.backends()?;
    ensure!(backends.len() == 4, "4 backends wanted, the destination file has {backends:?}");

    let before = lb_view(&lb_ns, &lb_dev)?;
    let seed = before.running.global.hash_seed.ok_or_else(|| fail("no hash seed set"))?;
    let services =
        [("VIP", CONNECTIONS, client4), ("VIP_4IN6", CONNECTIONS / 2, client4), ("VIP6", CONNECTIONS / 2, client6)];
    let mut answered_total = [0usize; 4];
    for (key, connections, client) in services {
        let vip = addr(key)?;
        let service_key = l4lb::config::ServiceKey::Vip { addr: vip, protocol: l4lb::config::Protocol::Tcp, port };
        let service = before
            .running
            .service(&service_key)
            .ok_or_else(|| fail(format!("no service {service_key} in the kernel")))?;
        ensure!(service.backends.len() == 4, "{service_key}: {} backends", service.backends.len());
        // Backend number -> lab backend index (by the address family's row order).
        let lab_index = |number: u32| service.backends.iter().position(|b| b.number == number);
        let mut slots = [0usize; 4];
        for &number in &service.table {
            let index = lab_index(number)
                .ok_or_else(|| fail(format!("{service_key}: slot names number {number}, not one of its backends")))?;
            slots[index] += 1;
        }
        // The service's backends are sorted by address, as the lab numbers them.
        for (i, b) in service.backends.iter().enumerate() {
            let want: IpAddr =
                if vip.is_ipv4() && key == "VIP" { IpAddr::V4(backends[i].0) } else { backend_addr6(i + 1) };
            ensure!(b.backend.addr == want, "{service_key}: backend {i} is {}, the lab made {want}", b.backend.addr);
        }

        let started = Instant::now();
        let answered = http_round_trips(&lab.ns("client"), client, vip, port, connections, service, seed)?;
        let elapsed = started.elapsed();
        let mut out_of_bounds = Vec::new();
        let mut intervals = Vec::new();
        for i in 0..4 {
            ensure!(
                answered[i] > 0,
                "{service_key}: be{} answered none of {connections} connections: {answered:?}",
                i + 1
            );
            let share = slots[i] as f64 / service.table.len() as f64;
            let (lo, hi) = binomial_interval(connections, share, ALPHA);
            intervals.push((lo, hi));
            if answered[i] < lo || answered[i] > hi {
                out_of_bounds.push(format!(
                    "be{}: {} of {connections}, table share {share:.4}, 99.99% interval [{lo}, {hi}]",
                    i + 1,
                    answered[i]
                ));
            }
            answered_total[i] += answered[i];
        }
        ensure!(out_of_bounds.is_empty(), "{service_key}: shares outside their binomial intervals: {out_of_bounds:?}");
        eprintln!("lab: {service_key}: {connections} round trips in {elapsed:.2?}, answered {answered:?}, 99.99% intervals {intervals:?}");
    }

    // Counters, once the traffic has stopped (the last ACKs of the closes can
    // still be on their way: wait until two samples agree).
    let mut previous = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let view = lb_view(&lb_ns, &lb_dev)?;
        if previous.as_ref() == Some(&view.packets) {
            break view;
        }
        ensure!(Instant::now() < deadline, "l4lb counters still moving 10 s after the last connection");
        previous = Some(view.packets);
        std::thread::sleep(Duration::from_millis(500));
    };
    let drops = after.drops();
    ensure!(drops.is_empty(), "l4lb drop counters moved: {drops:?}: {:?}", after.counters);
    let tx = after.counters["tx"];
    ensure!(tx == after.packets.iter().sum::<u64>(), "l4lb tx {tx} != sum over backends");
    // Every backend entry of every service: what l4lb sent to lab backend k.
    let mut sent = [0u64; 4];
    for service in &after.running.services {
        for b in &service.backends {
            let k = match b.backend.addr {
                IpAddr::V4(a) => backends.iter().position(|row| row.0 == a),
                v6 => (1..=4).position(|k| backend_addr6(k) == v6),
            }
            .ok_or_else(|| fail(format!("{}: unknown backend {}", service.key, b.backend.addr)))?;
            sent[k] += after.packets[b.number as usize];
        }
    }
    for k in 0..4 {
        let (decap, sample) = decapsulated(&lab, k + 1)?;
        ensure!(
            decap == sent[k],
            "backend be{} decapsulated {decap} packets, l4lb sent it {}: {sample}",
            k + 1,
            sent[k]
        );
        // Every connection is at least SYN, ACK, request, ACK/FIN from the client.
        ensure!(
            sent[k] >= 4 * answered_total[k] as u64,
            "l4lb sent be{} {} packets for {} connections",
            k + 1,
            sent[k],
            answered_total[k]
        );
    }
    eprintln!("lab: l4lb packets per backend {sent:?} = decapsulated per backend");
    Ok(())
}

/// The lab's IPv6 address of backend K (scripts/lab: 2001:db8:18::(100+K)).
fn backend_addr6(k: usize) -> IpAddr {
    format!("2001:db8:18::{}", 100 + k).parse().expect("lab IPv6 backend address")
}

/// up, up again (kept as it is), status, down, down again, status: each
/// succeeds with the right message, and after `down` nothing of the lab is left.
fn up_down_are_idempotent_and_leave_nothing_behind() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let links_before = root_links();
    let lab = Lab::new();
    let first = lab.up(2)?;
    let programs = program_ids(&first.stdout);
    // 2 backends' decap, decap on the balancer's bridge-side peer, l4lb.
    ensure!(programs.len() == 4, "expected 4 XDP program lines in the output of up: {}", first.stdout);
    let pids = server_pids(&first.stdout);
    ensure!(pids.len() == 2, "expected 2 server pids in the output of up: {}", first.stdout);
    ensure!(pids.iter().all(|pid| common::runs(*pid)), "a server is not running: {pids:?}");
    let before = lab.traces();
    // The two servers and the agent (`l4lb serve -c STATE/lb.toml`).
    let agents = before.processes.iter().filter(|p| p.contains(" serve -i ")).count();
    ensure!(
        before.namespaces.len() == 5 && before.state && before.processes.len() == 3 && agents == 1,
        "after up: {before:?}"
    );
    let status = lab.lab(&["status"], &[]).success()?.stdout;
    ensure!(
        status.contains("HTTP pid") && status.contains("agent (l4lb serve) pid"),
        "status after up does not list the servers and the agent:\n{status}"
    );

    let second = lab.up(2)?;
    ensure!(second.stdout.contains("already up"), "second up did not keep the lab: {}", second.stdout);
    let status = lab.lab(&["status"], &[]).success()?.stdout;
    for id in &programs {
        ensure!(status.contains(&format!("id {id} ")), "program {id} changed after the second up:\n{status}");
    }
    ensure!(lab.traces() == before, "the second up changed the lab: {:?} vs {before:?}", lab.traces());

    let down = lab.lab(&["down"], &[]).success()?;
    ensure!(down.stdout.contains("removed"), "down: {}", down.stdout);
    assert_nothing_left(&lab, &programs, &pids, &links_before, "after down")?;
    let again = lab.lab(&["down"], &[]).success()?;
    ensure!(again.stdout.contains("nothing to remove"), "second down: {}", again.stdout);
    let status = lab.lab(&["status"], &[]);
    ensure!(status.code == Some(3) && status.stdout.contains("is down"), "status after down: {}", status.describe());
    assert_nothing_left(&lab, &programs, &pids, &links_before, "after the second down")
}

/// `up` made to fail after each of its steps (LAB_FAIL_AFTER) exits non-zero
/// and removes everything it had built: servers, programs, namespaces, state.
fn failure_at_every_step_of_up_leaves_nothing_behind() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let links_before = root_links();
    let lab = Lab::new();
    for step in STEPS {
        let out = lab.lab(&["up", "--backends", "2"], &[("LAB_FAIL_AFTER", step)]).failure()?;
        ensure!(
            out.stderr.contains(&format!("failing on purpose after step `{step}'")),
            "step {step}: {}",
            out.describe()
        );
        ensure!(out.stderr.contains("removing what was built"), "step {step}: no cleanup message: {}", out.describe());
        let programs = program_ids(&out.stdout);
        let pids = server_pids(&out.stdout);
        let reached = STEPS.iter().position(|s| s == step).unwrap_or(0);
        if reached >= STEPS.iter().position(|s| *s == "servers").unwrap_or(0) {
            ensure!(pids.len() == 2, "step {step}: the servers had started, yet no pids in {}", out.stdout);
        }
        if reached >= STEPS.iter().position(|s| *s == "decap").unwrap_or(0) {
            ensure!(!programs.is_empty(), "step {step}: programs were attached, yet no ids in {}", out.stdout);
        }
        assert_nothing_left(&lab, &programs, &pids, &links_before, &format!("after a failure after step {step}"))?;
    }
    // A typo in the step name is refused, not ignored.
    let out = lab.lab(&["up"], &[("LAB_FAIL_AFTER", "nosuchstep")]).failure()?;
    ensure!(out.stderr.contains("is not a step"), "{}", out.describe());
    assert_nothing_left(&lab, &[], &[], &links_before, "after a refused up")?;
    // And the same lab still comes up afterwards.
    lab.up(1)?;
    Ok(())
}

/// Configuration changes under the lab's flood.
const APPLIES: usize = 100;

/// Kills the flood when dropped.
struct Flood(std::process::Child);

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One change of the lab's services (`k` picks the kind, `rng` the details):
/// a weight (0 drains; a service keeps one backend with weight above 0), a
/// backend removed (a service keeps one) or all of the lab's put back, a
/// fourth service (203.0.113.12:8080, no traffic) added or removed. Returns
/// what it did.
fn change_services(model: &mut Model, base: &Model, rng: &mut StdRng, k: usize) -> String {
    let extra = ServiceKey::Vip { addr: "203.0.113.12".parse().expect("address"), protocol: Protocol::Tcp, port: 8080 };
    if k % 4 == 3 {
        if let Some(i) = model.services.iter().position(|s| s.key == extra) {
            model.services.remove(i);
            return format!("remove service {extra}");
        }
        let backends = base.services[0].backends.iter().map(|b| config::Backend { weight: 1, ..*b }).collect();
        model.services.push(Service { track_flows: base.services[0].track_flows, ..Service::new(extra, backends) });
        model.services.sort_by_key(|s| s.key);
        return format!("add service {extra}");
    }
    let lab: Vec<usize> =
        (0..model.services.len()).filter(|&i| base.service(&model.services[i].key).is_some()).collect();
    let index = lab[rng.gen_range(0..lab.len())];
    let service = &mut model.services[index];
    let original = base.service(&service.key).expect("a lab service");
    match k % 4 {
        0 => {
            let b = rng.gen_range(0..service.backends.len());
            service.backends[b].weight = rng.gen_range(0..=3);
            if service.backends.iter().all(|b| b.weight == 0) {
                service.backends[b].weight = 1;
            }
            format!("{}: {} weight {}", service.key, service.backends[b].addr, service.backends[b].weight)
        }
        1 if service.backends.len() > 1 => {
            let b = rng.gen_range(0..service.backends.len());
            let gone = service.backends.remove(b);
            if service.backends.iter().all(|b| b.weight == 0) {
                service.backends[0].weight = 1;
            }
            format!("{}: remove {}", service.key, gone.addr)
        }
        _ => {
            service.backends = original.backends.clone();
            format!("{}: the lab's backends back", service.key)
        }
    }
}

/// Long-lived connections from the client to the lab's services.
const KEPT_PER_SERVICE: usize = 20;
/// Applies of the comparison without connection tracking.
const UNTRACKED_APPLIES: usize = 20;
/// How long one request on a kept connection (or a connect) may take.
const KEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A kept-alive HTTP/1.1 connection from the client to one of the lab's services.
struct Kept {
    stream: TcpStream,
    /// The client's address (the flow's source).
    client: IpAddr,
    /// Index in `Conns::services`.
    service: usize,
    local_port: u16,
    /// The lab backend (K) that answered its first request.
    backend: usize,
    /// The apply after which it was opened (0: before the first).
    opened: usize,
    /// The apply that removed its backend from its service, if one did.
    backend_removed: Option<usize>,
    /// Whether its flow's slot named another backend at some request.
    off_table: bool,
}

/// One HTTP/1.1 request on a kept connection: the answer's body, or what went
/// wrong (the connection is then useless).
fn kept_request(stream: &mut TcpStream, host: &str) -> Result<String, String> {
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: l4lb-lab-test\r\n\r\n").as_bytes())
        .map_err(|err| format!("send: {err}"))?;
    kept_answer(stream)
}

/// One of the lab's services, as the kept connections see it.
#[derive(Clone, Copy)]
struct LabService {
    key: ServiceKey,
    target: SocketAddr,
    /// Its backends are the lab backends' IPv4 addresses (else their IPv6 ones).
    ipv4_backends: bool,
}

impl LabService {
    /// Lab backend K's address in this service.
    fn backend_addr(&self, k: usize) -> IpAddr {
        if self.ipv4_backends {
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + k as u8))
        } else {
            backend_addr6(k)
        }
    }
}

/// The lab backend (K) that the slot of the flow from `client`:`port` to
/// `service` names in `running` (the current backend of a slot in
/// transition: where a SYN goes).
fn slot_lab_backend(running: &l4lb::state::Running, service: &LabService, client: IpAddr, port: u16) -> Option<usize> {
    let seed = running.global.hash_seed?;
    let entry = running.service(&service.key)?;
    let target = service.target;
    let flow = l4lb::flow_hash::Flow { saddr: client, daddr: target.ip(), sport: port, dport: target.port(), proto: 6 };
    let number = entry.table[l4lb::maglev::flow_slot(&flow, seed, entry.table.len())];
    lab_backend_of(entry.backends.iter().find(|b| b.number == number)?.backend.addr)
}

/// Connections opened per service right before each apply whose handshake
/// the apply splits: the SYN goes through l4lb before it, the first segment
/// that acknowledges the SYN-ACK after.
const STRADDLES_PER_SERVICE: usize = 2;

/// The flow table of the hundred-applies test (256 MiB): sized for its
/// flood as docs/transitions.md says to size one. The flood (about 270,000
/// SYNs a second here, nearly all into slots in transition after some
/// applies) turns the default 262,144 entries over in about 1.4 s, and a
/// straddling handshake's window (its SYN, the SYNs of the others opened
/// after it, an unoptimized `l4lb apply` under the flood, the requests)
/// reached 1.82 s with 301,580 pins written in it (three runs with the
/// failing seeds): eight times the entries leave a margin of about seven.
const FLOOD_FLOW_ENTRIES: u32 = 1 << 21;
/// The straddling connections' client ports: 0xf000 - 0xf3ff (61440-62463),
/// outside the kernel's ephemeral range, one port per connection.
const STRADDLE_PORTS: u16 = 0xf000;
const STRADDLE_PORT_MASK: u16 = 0xfc00;

/// A tc egress program for the client's veth: drops the pure ACKs (flags ==
/// ACK) of TCP segments from the straddling ports, counting them. The
/// handshake's final ACK never leaves; the first segment that acknowledges
/// the SYN-ACK is the request the test writes after the apply (PSH|ACK).
const HOLD_ACKS_C: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} l4lbt_held SEC(".maps");

SEC("tc")
int l4lbt_hold_acks(struct __sk_buff *skb)
{
	unsigned char *p = (void *)(long)skb->data, *end = (void *)(long)skb->data_end, *l4;
	__u32 zero = 0;
	__u64 *held;

	if (p + 54 > end)
		return 0; /* TC_ACT_OK */
	if (p[12] == 0x08 && p[13] == 0x00 && p[23] == 6)
		l4 = p + 14 + (p[14] & 0xf) * 4;
	else if (p[12] == 0x86 && p[13] == 0xdd && p[20] == 6)
		l4 = p + 54;
	else
		return 0;
	if (l4 + 14 > end)
		return 0;
	if ((((l4[0] << 8) | l4[1]) & PORT_MASK) != PORTS || l4[13] != 0x10)
		return 0;
	held = bpf_map_lookup_elem(&l4lbt_held, &zero);
	if (held)
		__sync_fetch_and_add(held, 1);
	return 2; /* TC_ACT_SHOT */
}

char LICENSE[] SEC("license") = "GPL";
"#;

/// Builds the ACK-holding program, attaches it to egress of `dev` in
/// `client_ns` (the namespace's deletion removes it) and returns the id of
/// its counter map.
fn hold_acks(client_ns: &str, dev: &str, scratch: &Path) -> TestResult<u32> {
    let source = scratch.join("hold_acks.bpf.c");
    let object = scratch.join("hold_acks.bpf.o");
    std::fs::write(&source, HOLD_ACKS_C)?;
    let (source, object) = (source.display().to_string(), object.display().to_string());
    let ports = format!("-DPORTS={STRADDLE_PORTS:#x}");
    let mask = format!("-DPORT_MASK={STRADDLE_PORT_MASK:#x}");
    // The multiarch include directory holds asm/types.h (as the Makefile passes it).
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    run("clang", &["-O2", "-g", "-target", "bpf", &multiarch, &ports, &mask, "-c", &source, "-o", &object])
        .success()?;
    let dev = dev.to_string();
    in_netns(client_ns, move || {
        use libbpf_rs::MapCore;
        use std::os::fd::AsFd;
        let object = libbpf_rs::ObjectBuilder::default().open_file(&object)?.load()?;
        let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).map_err(|err| fail(format!("{dev}: {err}")))?;
        let map_id =
            object.maps().find(|m| m.name() == "l4lbt_held").ok_or_else(|| fail("no map l4lbt_held"))?.info()?.info.id;
        let program = object.progs().find(|p| p.name() == "l4lbt_hold_acks").ok_or_else(|| fail("no program"))?;
        let mut hook = libbpf_rs::TcHookBuilder::new(program.as_fd())
            .ifindex(ifindex as i32)
            .replace(true)
            .handle(1)
            .priority(1)
            .hook(libbpf_rs::TC_EGRESS);
        hook.create()?;
        hook.attach()?;
        Ok(map_id)
    })
}

/// The pure ACKs the program held back so far.
fn held_acks(map_id: u32) -> TestResult<u64> {
    use libbpf_rs::MapCore;
    let map = libbpf_rs::MapHandle::from_map_id(map_id)?;
    let value = map.lookup(&0u32.to_ne_bytes(), libbpf_rs::MapFlags::ANY)?.ok_or_else(|| fail("no counter"))?;
    Ok(u64::from_ne_bytes(value[..8].try_into().map_err(|_| fail("short counter"))?))
}

/// A connection from client port `port` to `target` (from the calling
/// thread's namespace): connect() returns on the SYN-ACK, whose ACK the
/// client's egress program drops.
fn connect_from(port: u16, target: SocketAddr) -> Result<TcpStream, String> {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    use std::os::fd::AsRawFd;
    let (family, local) = if target.is_ipv4() {
        (AddressFamily::Inet, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
    } else {
        (AddressFamily::Inet6, SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port))
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|err| format!("socket: {err}"))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(local)).map_err(|err| format!("bind to port {port}: {err}"))?;
    // A blocking connect gives up after SO_SNDTIMEO.
    let timeout = nix::sys::time::TimeVal::new(KEPT_TIMEOUT.as_secs() as _, 0);
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(|err| format!("SO_SNDTIMEO: {err}"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(target)).map_err(|err| format!("connect: {err}"))?;
    Ok(TcpStream::from(fd))
}

/// A connection opened right before an apply, its final ACK held back.
struct Straddle {
    stream: TcpStream,
    service: usize,
    client: IpAddr,
    local_port: u16,
    /// The lab backend the SYN went to (its slot's current backend before the apply).
    syn_backend: Option<usize>,
}

/// From the first straddling SYN before an apply to the last request after
/// it: how long, and how many pins the flood wrote meanwhile. A pin outlives
/// about as many newer ones as the flow table holds (an LRU; under the lab's
/// flood with most slots in transition, about 1.4 s for 262,144 entries),
/// and a straddling handshake whose pin went is sent to its slot's previous
/// backend (docs/transitions.md, "Bounds under attack"): the window must stay
/// well inside that.
#[derive(Clone, Copy, Default)]
struct Window {
    took: Duration,
    pins: u64,
    flow_entries: u64,
}

/// The answers of one apply's straddling connections, and their window.
type Asked = (Vec<(Straddle, Result<String, String>)>, Window);

/// What the connections whose handshake straddled an apply did.
#[derive(Default)]
struct Straddles {
    opened: usize,
    /// The next client port (after STRADDLE_PORTS).
    next_port: u16,
    /// In a slot whose backend the apply changed.
    slot_changed: usize,
    /// Answered by the backend that had the SYN (every one whose backend stayed).
    answered: usize,
    /// Broken because the apply removed the backend that had the SYN.
    broken_removed: usize,
    /// The longest window, and the most pins written in one.
    longest: Duration,
    most_pins: u64,
}

impl Straddles {
    /// Opens STRADDLES_PER_SERVICE connections to each service; `before`:
    /// the kernel's state they meet.
    fn open(
        &mut self,
        client_ns: &str,
        services: &[LabService],
        before: &l4lb::state::Running,
        k: usize,
    ) -> TestResult<Vec<Straddle>> {
        let mut pending = Vec::new();
        for (service, lab_service) in services.iter().enumerate() {
            for _ in 0..STRADDLES_PER_SERVICE {
                let target = lab_service.target;
                let port = STRADDLE_PORTS + self.next_port;
                ensure!(
                    port & STRADDLE_PORT_MASK == STRADDLE_PORTS,
                    "out of straddling ports after {} connections",
                    self.next_port
                );
                self.next_port += 1;
                let stream = in_netns(client_ns, || {
                    connect_from(port, target)
                        .map_err(|err| fail(format!("{}: connect before apply {k}: {err}", lab_service.key)))
                })?;
                stream.set_read_timeout(Some(KEPT_TIMEOUT))?;
                stream.set_write_timeout(Some(KEPT_TIMEOUT))?;
                let local = stream.local_addr()?;
                let syn_backend = slot_lab_backend(before, lab_service, local.ip(), local.port());
                pending.push(Straddle { stream, service, client: local.ip(), local_port: local.port(), syn_backend });
            }
        }
        Ok(pending)
    }

    /// After apply `k` to `model` (`after`: the kernel's state then): each
    /// pending connection sends its request (with the held-back ACK) and
    /// must be answered by the backend that had its SYN, unless the apply
    /// removed that backend.
    /// Right after the apply command returns: each pending connection sends
    /// its request (the first segment acknowledging its SYN-ACK) and reads
    /// the answer. Its pin must outlive the window (see `Window`): the
    /// window is the apply command alone, which no longer waits for a sweep
    /// walking the flow table (`settle::round` walks it before taking the
    /// update lock).
    fn ask(pending: Vec<Straddle>, services: &[LabService]) -> Vec<(Straddle, Result<String, String>)> {
        pending
            .into_iter()
            .map(|mut p| {
                let answer = kept_request(&mut p.stream, &services[p.service].target.to_string());
                (p, answer)
            })
            .collect()
    }

    /// Judges the answers after apply `k` to `model` (`after`: the kernel's
    /// state then): each must come from the backend that had the SYN,
    /// unless the apply removed that backend.
    fn finish(
        &mut self,
        (answered, window): Asked,
        services: &[LabService],
        model: &Model,
        after: &l4lb::state::Running,
        k: usize,
        change: &str,
    ) -> TestResult {
        self.longest = self.longest.max(window.took);
        self.most_pins = self.most_pins.max(window.pins);
        for (p, answer) in answered {
            let service = &services[p.service];
            self.opened += 1;
            let slot_now = slot_lab_backend(after, service, p.client, p.local_port);
            self.slot_changed += usize::from(slot_now != p.syn_backend);
            let syn_backend = p.syn_backend.ok_or_else(|| {
                fail(format!("{}: no backend for port {} before apply {k}", service.key, p.local_port))
            })?;
            let stayed = model
                .service(&service.key)
                .is_some_and(|s| s.backends.iter().any(|b| b.addr == service.backend_addr(syn_backend)));
            match answer {
                Ok(body) => {
                    let backend = answering_backend(&body)?;
                    ensure!(
                        backend == syn_backend,
                        "apply {k} ({change}): {} port {}: the handshake began with backend {syn_backend}, backend {backend} answered",
                        service.key,
                        p.local_port
                    );
                    self.answered += 1;
                }
                Err(_) if !stayed => self.broken_removed += 1,
                Err(err) => {
                    let Window { took, pins, flow_entries } = window;
                    let evicted = if 2 * pins >= flow_entries {
                        "; that is enough to evict its pin: the window outgrew the table, the test must keep it shorter"
                    } else {
                        ""
                    };
                    return Err(fail(format!(
                        "apply {k} ({change}): {} port {}: a handshake begun before the apply with backend {syn_backend} (still in the service; its slot names {slot_now:?} now) broke: {err}; between its SYN and its request ({took:.2?}) the flood wrote {pins} pins into a flow table of {flow_entries}{evicted}",
                        service.key, p.local_port
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The kept connections and what happened to them.
struct Conns {
    client_ns: String,
    /// The lab's three services.
    services: Vec<LabService>,
    open: Vec<Kept>,
    /// Connections opened; requests sent after applies (not counting each
    /// connection's first, which learns its backend); answers from the
    /// connection's own backend; connections broken after their backend was
    /// removed; answers after their backend was removed (by it).
    opened: usize,
    requests: usize,
    same_backend: usize,
    broken_removed: usize,
    survived_removal: usize,
    /// Broken although their backend stayed in the service, and answered
    /// by another backend than their own: only allowed without tracking.
    broken_stayed: usize,
    other_backend: usize,
    /// Answers from the connection's own backend while its weight was 0,
    /// and while its flow's slot named another backend (the pin kept it).
    drained_answers: usize,
    off_table_answers: usize,
    /// How many applies each broken connection lived through.
    lifetimes: Vec<usize>,
}

impl Conns {
    fn new(client_ns: &str, services: &[LabService]) -> Self {
        Conns {
            client_ns: client_ns.to_string(),
            services: services.to_vec(),
            open: Vec::new(),
            opened: 0,
            requests: 0,
            same_backend: 0,
            broken_removed: 0,
            survived_removal: 0,
            broken_stayed: 0,
            other_backend: 0,
            drained_answers: 0,
            off_table_answers: 0,
            lifetimes: Vec::new(),
        }
    }

    /// Opens one connection to service `service` (from the client's
    /// namespace) and learns its backend from a first request.
    fn open(&mut self, service: usize, after_apply: usize) -> TestResult {
        let LabService { key, target, .. } = self.services[service];
        let mut stream = in_netns(&self.client_ns, || {
            TcpStream::connect_timeout(&target, KEPT_TIMEOUT)
                .map_err(|err| fail(format!("{key}: connect after apply {after_apply}: {err}")))
        })?;
        stream.set_read_timeout(Some(KEPT_TIMEOUT))?;
        stream.set_write_timeout(Some(KEPT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let local_port = local.port();
        let body = kept_request(&mut stream, &target.to_string()).map_err(|err| {
            fail(format!(
                "{key}: the first request of a new connection (port {local_port}) after apply {after_apply}: {err}"
            ))
        })?;
        let backend = answering_backend(&body)?;
        self.opened += 1;
        self.open.push(Kept {
            stream,
            client: local.ip(),
            service,
            local_port,
            backend,
            opened: after_apply,
            backend_removed: None,
            off_table: false,
        });
        Ok(())
    }

    /// After apply `k` to `model` (`running`: the kernel's state then):
    /// notes which connections lost their backend, sends one request on
    /// every connection, and checks the answers. `tracked`: a connection
    /// whose backend is still in its service must be answered by that
    /// backend (else only counted). A broken connection is replaced by a
    /// new one to the same service.
    fn round(
        &mut self,
        model: &Model,
        running: &l4lb::state::Running,
        k: usize,
        change: &str,
        tracked: bool,
    ) -> TestResult {
        // The lab backend (K) that a connection's slot names now.
        let slot_backend = |c: &Kept| slot_lab_backend(running, &self.services[c.service], c.client, c.local_port);
        let slots: Vec<Option<usize>> = self.open.iter().map(slot_backend).collect();
        let weight_of = |c: &Kept| {
            let service = self.services[c.service];
            let addr = service.backend_addr(c.backend);
            model.service(&service.key).and_then(|s| s.backends.iter().find(|b| b.addr == addr)).map(|b| b.weight)
        };
        let weights: Vec<Option<u32>> = self.open.iter().map(weight_of).collect();
        for (c, weight) in self.open.iter_mut().zip(&weights) {
            if weight.is_none() && c.backend_removed.is_none() {
                c.backend_removed = Some(k);
            }
        }
        // Every request first, then every answer: the backends work in parallel.
        let mut sent = Vec::new();
        for c in &mut self.open {
            let host = self.services[c.service].target.to_string();
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: l4lb-lab-test\r\n\r\n");
            sent.push(c.stream.write_all(request.as_bytes()).map_err(|err| format!("send: {err}")));
        }
        let mut broken = Vec::new();
        for (i, c) in self.open.iter_mut().enumerate() {
            self.requests += 1;
            let key = self.services[c.service].key;
            let answer = match &sent[i] {
                Err(err) => Err(err.clone()),
                Ok(()) => kept_answer(&mut c.stream),
            };
            let what = format!(
                "apply {k} ({change}): {key}: connection from port {}, opened after apply {}, backend be{}",
                c.local_port, c.opened, c.backend
            );
            match answer {
                Ok(body) => {
                    let answered = answering_backend(&body)?;
                    if answered == c.backend {
                        self.same_backend += 1;
                        self.drained_answers += usize::from(weights[i] == Some(0));
                        if slots[i] != Some(c.backend) {
                            self.off_table_answers += 1;
                            c.off_table = true;
                        }
                        if c.backend_removed.is_some() {
                            self.survived_removal += 1;
                        }
                    } else {
                        ensure!(!tracked, "{what}: answered by be{answered}");
                        self.other_backend += 1;
                    }
                }
                Err(err) => {
                    if let Some(removed) = c.backend_removed {
                        ensure!(
                            removed == k,
                            "{what}: broke ({err}) one or more applies after its backend was removed (apply {removed})"
                        );
                        self.broken_removed += 1;
                    } else {
                        ensure!(!tracked, "{what}: broke although its backend stayed in the service: {err}");
                        self.broken_stayed += 1;
                    }
                    broken.push(i);
                }
            }
        }
        for &i in broken.iter().rev() {
            let gone = self.open.remove(i);
            self.lifetimes.push(k - 1 - gone.opened);
            self.open(gone.service, k)?;
        }
        Ok(())
    }

    fn close_all(&mut self) {
        self.open.clear();
    }
}

/// The answer to a request already sent on a kept connection: one HTTP/1.1
/// answer (head and Content-Length body), nothing more.
fn kept_answer(stream: &mut TcpStream) -> Result<String, String> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 200") {
                return Err(format!("answer {head:?}"));
            }
            let length: usize = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok())
                })
                .flatten()
                .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
            if answer.len() >= end + 4 + length {
                if answer.len() > end + 4 + length {
                    return Err(format!("more than one answer: {:?}", String::from_utf8_lossy(&answer)));
                }
                return Ok(String::from_utf8_lossy(&answer[end + 4..]).trim().to_string());
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(format!("closed by the peer (after {:?})", String::from_utf8_lossy(&answer))),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(err) => return Err(format!("receive: {err} (after {:?})", String::from_utf8_lossy(&answer))),
        }
    }
}

/// While the lab's flood runs through the balancer (`hping3 --rand-source
/// --flood -S` to the IPv4 VIP's port 80, as `make demo` sends it), APPLIES
/// `l4lb apply` changes: weights (0 included: draining), backends removed
/// and put back, a fourth service added and removed, the last one back to the
/// lab's own file. During every apply frames reach l4lb and no drop counter
/// moves (no frame meets a missing or half-written table entry); afterwards
/// every frame l4lb saw was sent or passed, and HTTP round trips to the three
/// services are each answered by the backend the kernel's table names.
///
/// Flows of unchanged backends stay put: before the flood, the client opens
/// KEPT_PER_SERVICE kept-alive HTTP/1.1 connections to each of the three
/// services; after every apply one request goes on each. A connection whose
/// backend is still in its service (any weight, 0 included) is answered by
/// that backend, every time, through all the applies (connection tracking
/// pins it, whatever its slot says now); one whose backend was removed may
/// break at the next request (its packets reach another backend, which
/// resets it) and is replaced by a new one, which then must keep its
/// backend. Right before each apply the client also opens
/// STRADDLES_PER_SERVICE connections to each service whose handshake the
/// apply splits: their SYN goes through l4lb before it, and a tc program on
/// the client's egress drops their pure ACKs, so the first segment that
/// acknowledges the SYN-ACK is the request written after the apply; each
/// must be answered by the backend its SYN reached, unless the apply
/// removed that backend. For comparison, UNTRACKED_APPLIES more changes with
/// `track_flows = false` on every service, with fresh connections: what
/// breaks then is printed, not asserted.
fn hundred_applies_under_the_lab_flood_drop_nothing() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    // No health checks: the test applies its own files, which a health
    // change would make the agent overwrite with the lab's.
    lab.up_with(4, &[("LAB_FLOW_ENTRIES", &FLOOD_FLOW_ENTRIES.to_string()), NO_HEALTH_CHECKS])?;
    let env = lab.env()?;
    let (lb_ns, lb_dev, client_ns) = (env.get("LB_NS")?, env.get("LB_DEV")?, env.get("CLIENT_NS")?);
    let base = config::load(Path::new(&env.get("CONFIG")?)).map_err(|err| fail(format!("{err:#}")))?;
    let scratch = Scratch(PathBuf::from(format!("/run/{}-churn", lab.prefix)));
    std::fs::create_dir_all(&scratch.0).map_err(|err| fail(format!("{}: {err}", scratch.0.display())))?;
    let seed: u64 = std::env::var("L4LB_LAB_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("lab: changes from seed {seed} (L4LB_LAB_SEED={seed} repeats them)");
    let mut rng = StdRng::seed_from_u64(seed);
    let port: u16 = env.parse("PORT")?;
    let mut services = Vec::new();
    for name in ["VIP", "VIP_4IN6", "VIP6"] {
        let vip: IpAddr = env.get(name)?.parse().map_err(|_| fail(format!("bad {name}")))?;
        let key = ServiceKey::Vip { addr: vip, protocol: Protocol::Tcp, port };
        let service = base.service(&key).ok_or_else(|| fail(format!("no service {key} in the lab's file")))?;
        ensure!(service.track_flows, "{key}: the lab's services track flows (the default)");
        services.push(LabService {
            key,
            target: SocketAddr::new(vip, port),
            ipv4_backends: service.backends[0].addr.is_ipv4(),
        });
    }

    // The kept connections, before the flood.
    let mut conns = Conns::new(&client_ns, &services);
    for service in 0..services.len() {
        for _ in 0..KEPT_PER_SERVICE {
            conns.open(service, 0)?;
        }
    }
    let first_backends: BTreeSet<(usize, usize)> = conns.open.iter().map(|c| (c.service, c.backend)).collect();

    let flood = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &client_ns,
            "hping3",
            &env.get("VIP")?,
            "--rand-source",
            "--flood",
            "-S",
            "-p",
            &env.get("PORT")?,
            "-q",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|err| fail(format!("starting hping3: {err}")))?;
    let flood = Flood(flood);
    std::thread::sleep(Duration::from_millis(500));

    // One apply of `model` under the flood: no drop, frames during it; the
    // kernel's state after it.
    // With `straddle` (the straddles and the kernel's state before), opens
    // the straddling connections right before the apply command and sends
    // their requests right after it; returns their answers.
    let apply_straddled = |k: usize,
                           model: &Model,
                           change: &str,
                           straddle: Option<(&mut Straddles, &l4lb::state::Running)>|
     -> TestResult<(u64, l4lb::state::Running, Asked)> {
        let file = scratch.0.join(format!("update-{k}.toml"));
        std::fs::write(&file, config::to_toml(model)).map_err(|err| fail(format!("{}: {err}", file.display())))?;
        let view_before = lb_view(&lb_ns, &lb_dev)?;
        let (rx_before, pinned_before) = (view_before.counters["rx"], view_before.counters["flow_pinned"]);
        let opened_at = Instant::now();
        let pending = match straddle {
            Some((straddles, before)) => straddles.open(&client_ns, &services, before, k)?,
            None => Vec::new(),
        };
        lab.l4lb("lb", &["apply", "-i", &lb_dev, "-c", &file.display().to_string()])
            .success()
            .map_err(|err| fail(format!("apply {k} ({change}): {err:?}")))?;
        let answers = Straddles::ask(pending, &services);
        let took = opened_at.elapsed();
        let view = lb_view(&lb_ns, &lb_dev)?;
        let pins = view.counters["flow_pinned"] - pinned_before;
        let window = Window { took, pins, flow_entries: view.flow_entries };
        let drops = view.drops();
        ensure!(drops.is_empty(), "apply {k} ({change}): drop counters moved: {drops:?}");
        let frames = view.counters["rx"] - rx_before;
        ensure!(frames > 0, "apply {k} ({change}): no frame reached l4lb during the apply: is the flood running?");
        Ok((frames, view.running, (answers, window)))
    };
    let apply = |k: usize, model: &Model, change: &str| -> TestResult<(u64, l4lb::state::Running)> {
        apply_straddled(k, model, change, None).map(|(frames, running, _)| (frames, running))
    };

    let mut model = base.clone();
    let mut during = Vec::new();
    let mut kinds = BTreeMap::new();
    let mut straddles = Straddles::default();
    let held = hold_acks(&client_ns, &env.get("CLIENT_DEV")?, &scratch.0)?;
    let mut before = lb_view(&lb_ns, &lb_dev)?.running;
    let started = Instant::now();
    for k in 1..=APPLIES {
        let change = if k == APPLIES {
            model = base.clone();
            "back to the lab's lb.toml".to_string()
        } else {
            change_services(&mut model, &base, &mut rng, k)
        };
        let kind = if change.contains(" weight 0") {
            "weight 0"
        } else if change.contains(" weight ") {
            "weight 1..3"
        } else if change.contains(": remove ") {
            "backend removed"
        } else if change.contains("backends back") || change.starts_with("back to") {
            "backends put back"
        } else if change.starts_with("add service") {
            "4th service added"
        } else {
            "4th service removed"
        };
        *kinds.entry(kind).or_insert(0usize) += 1;
        let (frames, running, asked) = apply_straddled(k, &model, &change, Some((&mut straddles, &before)))?;
        straddles.finish(asked, &services, &model, &running, k, &change)?;
        during.push(frames);
        conns.round(&model, &running, k, &change, true)?;
        before = running;
    }
    let took = started.elapsed();
    let lasted = conns.open.iter().filter(|c| c.opened == 0).count();
    let off_table = conns.open.iter().filter(|c| c.off_table).count();
    // Applies each connection lived through (those still open: all since they opened).
    let mut lives: Vec<usize> =
        conns.lifetimes.iter().copied().chain(conns.open.iter().map(|c| APPLIES - c.opened)).collect();
    lives.sort_unstable();
    ensure!(
        conns.survived_removal == 0,
        "{} requests were answered by a backend removed from the connection's service",
        conns.survived_removal
    );
    eprintln!(
        "lab: kept connections, tracked: {} connections ({} opened before the applies, {} after), {} requests after the applies, {} answered by the connection's own backend ({} of them while it drained at weight 0, {} while the flow's slot named another backend: kept by its pin), {} broken because their backend was removed (each right after the apply that removed it, then reopened), 0 broken otherwise, 0 answered by another backend; {lasted} of the first {} lasted all {APPLIES} applies ({} service/backend pairs among them); of the {} open at the end, {off_table} were at some point off their slot's backend; applies a connection lived through: median {}, max {}",
        conns.opened,
        services.len() * KEPT_PER_SERVICE,
        conns.opened - services.len() * KEPT_PER_SERVICE,
        conns.requests,
        conns.same_backend,
        conns.drained_answers,
        conns.off_table_answers,
        conns.broken_removed,
        services.len() * KEPT_PER_SERVICE,
        first_backends.len(),
        conns.open.len(),
        lives[lives.len() / 2],
        lives[lives.len() - 1]
    );
    eprintln!("lab: the {APPLIES} changes: {kinds:?}");
    let held = held_acks(held)?;
    eprintln!(
        "lab: handshakes straddling an apply, tracked: {} connections opened right before an apply (their SYN through l4lb before it; the client's egress dropped {held} pure ACKs of theirs, so the first segment acknowledging the SYN-ACK was the request written after the apply), {} of them in a slot whose backend the apply changed; {} answered by the backend that had the SYN, {} broken because the apply removed that backend, 0 broken otherwise; from the first SYN to the last request at most {:.2?} and {} pins written (flow table {})",
        straddles.opened, straddles.slot_changed, straddles.answered, straddles.broken_removed, straddles.longest, straddles.most_pins, lb_view(&lb_ns, &lb_dev)?.flow_entries
    );
    ensure!(
        held >= straddles.opened as u64,
        "the client's egress held back {held} pure ACKs of {} straddling connections",
        straddles.opened
    );
    ensure!(
        straddles.slot_changed > 0,
        "no handshake straddled an apply that changed its slot: the test did not test the window"
    );

    // The comparison: the same kind of changes without connection tracking.
    let mut untracked = base.clone();
    for s in &mut untracked.services {
        s.track_flows = false;
    }
    model = untracked.clone();
    let mut k = APPLIES + 1;
    during.push(apply(k, &model, "track_flows = false")?.0);
    conns.close_all();
    let mut plain = Conns::new(&client_ns, &services);
    for service in 0..services.len() {
        for _ in 0..KEPT_PER_SERVICE {
            plain.open(service, k)?;
        }
    }
    for j in 1..=UNTRACKED_APPLIES {
        k += 1;
        let change = change_services(&mut model, &untracked, &mut rng, j);
        let (frames, running) = apply(k, &model, &change)?;
        during.push(frames);
        plain.round(&model, &running, k, &change, false)?;
    }
    eprintln!(
        "lab: kept connections, untracked (track_flows = false), {UNTRACKED_APPLIES} applies: {} connections, {} requests after the applies, {} answered by the connection's own backend, {} broken because their backend was removed, {} broken although their backend stayed (their slot changed hands), {} answered by another backend",
        plain.opened,
        plain.requests,
        plain.same_backend,
        plain.broken_removed,
        plain.broken_stayed,
        plain.other_backend
    );
    plain.close_all();
    k += 1;
    model = base.clone();
    during.push(apply(k, &model, "back to the lab's lb.toml, tracking flows")?.0);
    drop(flood);
    std::thread::sleep(Duration::from_millis(500));

    let view = lb_view(&lb_ns, &lb_dev)?;
    let c = &view.counters;
    let drops = view.drops();
    ensure!(drops.is_empty(), "after the flood: drop counters moved: {drops:?}");
    ensure!(
        c["rx"] == c["tx"] + c["tx_too_big"] + c["pass"] + c["pass_no_service"],
        "rx {} != tx + tx_too_big + pass + pass_no_service: {c:?}",
        c["rx"]
    );
    ensure!(view.running.model().services == base.services, "the last apply did not bring back the lab's services");
    let hash_seed = view.running.global.hash_seed.ok_or_else(|| fail("no hash seed"))?;
    for (vip, client) in [("VIP", "CLIENT_ADDR"), ("VIP_4IN6", "CLIENT_ADDR"), ("VIP6", "CLIENT_ADDR6")] {
        let vip: IpAddr = env.get(vip)?.parse().map_err(|_| fail("bad VIP"))?;
        let client: IpAddr = env.get(client)?.parse().map_err(|_| fail("bad client address"))?;
        let key = ServiceKey::Vip { addr: vip, protocol: Protocol::Tcp, port };
        let service = view.running.service(&key).ok_or_else(|| fail(format!("no service {key}")))?;
        http_round_trips(&client_ns, client, vip, port, 100, service, hash_seed)?;
    }
    let applies = during.len();
    let in_applies: u64 = during.iter().sum();
    during.sort_unstable();
    eprintln!(
        "lab: {applies} applies under the flood ({APPLIES} tracked in {took:.2?}): {in_applies} frames reached l4lb during them (per apply min {} median {} max {}), rx {} tx {}, flows pinned {} re-pinned {}, no drop",
        during[0],
        during[during.len() / 2],
        during[during.len() - 1],
        c["rx"],
        c["tx"],
        c["flow_pinned"],
        c["flow_repinned"]
    );
    Ok(())
}

/// Path MTU discovery through l4lb: with the client's routes to the VIPs at
/// the segment's full 1500 bytes (the lab sets 1480 / 1460), an HTTP request
/// with a 4000-byte header sends full-size segments with DF set; l4lb
/// answers them with ICMP "fragmentation needed" / "packet too big"
/// advertising 1500 minus its outer header, the client's kernel lowers its
/// path MTU to exactly that (`ip route get` shows it) and retransmits, and
/// the request is answered. For each service: IPv4 in IPv4 (1480), IPv4 in
/// IPv6 (1460), IPv6 in IPv6 (1460).
fn too_big_answers_teach_the_client_its_path_mtu() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    lab.up(2)?;
    let env = lab.env()?;
    let (lb_ns, lb_dev, client_ns, client_dev) =
        (env.get("LB_NS")?, env.get("LB_DEV")?, env.get("CLIENT_NS")?, env.get("CLIENT_DEV")?);
    let header = format!("X-Pad: {}", "a".repeat(4000));
    for (vip_key, via_key, family, advertised) in
        [("VIP", "LB_ADDR", "-4", 1480), ("VIP_4IN6", "LB_ADDR", "-4", 1460), ("VIP6", "LB_ADDR6", "-6", 1460)]
    {
        let (vip, via) = (env.get(vip_key)?, env.get(via_key)?);
        let prefix = if family == "-4" { format!("{vip}/32") } else { format!("{vip}/128") };
        run(
            "ip",
            &["-n", &client_ns, family, "route", "change", &prefix, "via", &via, "dev", &client_dev, "mtu", "1500"],
        )
        .success()?;
        let before = lb_view(&lb_ns, &lb_dev)?.counters["tx_too_big"];
        let url = if family == "-4" { format!("http://{vip}/") } else { format!("http://[{vip}]/") };
        let out = run("ip", &["netns", "exec", &client_ns, "curl", "-sS", "--max-time", "10", "-H", &header, &url])
            .success()?;
        ensure!(out.stdout.starts_with("be"), "{url}: answer {:?}", out.stdout);
        let view = lb_view(&lb_ns, &lb_dev)?;
        let answers = view.counters["tx_too_big"] - before;
        ensure!(
            answers > 0,
            "{url}: l4lb sent no ICMP answer for the client's full-size segments: {:?}",
            view.counters
        );
        let route = run("ip", &["-n", &client_ns, family, "route", "get", &vip]).success()?.stdout;
        ensure!(
            route.contains(&format!("mtu {advertised}")),
            "{url}: the client's route did not learn mtu {advertised}: {route}"
        );
        let drops = view.drops();
        ensure!(drops.is_empty(), "{url}: drop counters moved: {drops:?}");
        eprintln!("lab: {url}: {answers} too-big answers, the client's path MTU is now {advertised}");
    }
    Ok(())
}

// ---------------------------------------------------------------- Prometheus

/// A Prometheus server (Debian's `prometheus`) in the balancer's namespace,
/// scraping the lab's agent every second; killed on drop.
struct Prometheus {
    child: std::process::Child,
    ns: String,
    _scratch: Scratch,
}

/// Where the test's Prometheus listens, inside the balancer's namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";

impl Prometheus {
    fn start(lb_ns: &str, metrics: &str) -> TestResult<Prometheus> {
        let scratch = Scratch(std::env::temp_dir().join(format!("{PREFIX}-{}-prometheus", std::process::id())));
        std::fs::create_dir_all(scratch.0.join("data"))?;
        let config = scratch.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: l4lb\n    static_configs:\n      - targets: ['{metrics}']\n"
            ),
        )?;
        let log = std::fs::File::create(scratch.0.join("prometheus.log"))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", lb_ns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", scratch.0.join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| fail(format!("starting prometheus: {err}")))?;
        let prometheus = Prometheus { child, ns: lb_ns.to_string(), _scratch: scratch };
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get("/-/ready").map(|(status, _)| status) != Ok(200) {
            let log = std::fs::read_to_string(prometheus._scratch.0.join("prometheus.log")).unwrap_or_default();
            ensure!(Instant::now() < deadline, "prometheus not ready within 30 s:\n{log}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prometheus)
    }

    /// GET `path` from the server: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        in_netns(&self.ns, || {
            let mut stream = TcpStream::connect(PROMETHEUS)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {PROMETHEUS}\r\n\r\n")?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .map_err(|err| err.message().unwrap_or("failed").to_string())
        .and_then(|answer| {
            let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
            Ok((status, body.to_string()))
        })
    }

    /// The value of an instant PromQL query with one result.
    fn query(&self, promql: &str) -> TestResult<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = self.get(&format!("/api/v1/query?query={encoded}")).map_err(fail)?;
        ensure!(status == 200, "query {promql}: {status} {body}");
        let answer: Value = serde_json::from_str(&body).map_err(|err| fail(format!("{body}: {err}")))?;
        let results = answer["data"]["result"].as_array().cloned().unwrap_or_default();
        ensure!(results.len() == 1, "query {promql}: {} results: {body}", results.len());
        results[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| fail(format!("query {promql}: no value in {body}")))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus scrapes the lab's agent (`l4lb serve --metrics`) while
/// the client makes HTTP connections to the IPv4 VIP for about 8 s: the
/// packets its samples say l4lb sent each backend over the run equal
/// exactly what that backend decapsulated (`l4lb decap stats`), and the
/// rate it computes for each backend is that count over the run's length
/// (within 25%: the run's edges fall between scrapes).
fn prometheus_counts_what_backends_got() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    lab.up_with(2, &[NO_HEALTH_CHECKS])?;
    let env = lab.env()?;
    let (lb_ns, vip, client_ns) = (env.get("LB_NS")?, env.get("VIP")?, env.get("CLIENT_NS")?);
    let vip: IpAddr = vip.parse().map_err(|_| fail("bad VIP"))?;
    let port: u16 = env.parse("PORT")?;
    let prometheus = Prometheus::start(&lb_ns, &env.get("METRICS")?)?;
    // Scrapes before the traffic (the counters' start): Prometheus scrapes
    // its targets only some seconds after it says it is ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.query("count_over_time(up{job=\"l4lb\"}[1m])").unwrap_or(0.0) < 2.0 {
        ensure!(Instant::now() < deadline, "Prometheus did not scrape the agent twice within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = [decapsulated(&lab, 1)?.0, decapsulated(&lab, 2)?.0];
    let started = Instant::now();
    let mut connections = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let results = in_netns(&client_ns, || Ok((0..50).map(|_| http_get(vip, port)).collect::<Vec<_>>()))?;
        ensure!(results.iter().all(Result::is_ok), "a connection failed: {:?}", results.iter().find(|r| r.is_err()));
        connections += results.len();
    }
    let ran = started.elapsed().as_secs_f64();
    let after = [decapsulated(&lab, 1)?.0, decapsulated(&lab, 2)?.0];
    // Scrapes after the traffic (the counters' end).
    std::thread::sleep(Duration::from_secs(3));

    let mut figures = Vec::new();
    for (k, addr) in [(1, "198.18.0.101"), (2, "198.18.0.102")] {
        let series = format!("l4lb_backend_packets_total{{service=\"{vip}:{port}/tcp\",backend=\"{addr}\"}}");
        let window = "[60s]";
        let counted =
            prometheus.query(&format!("max_over_time({series}{window}) - min_over_time({series}{window})"))?;
        let got = (after[k - 1] - before[k - 1]) as f64;
        if counted != got {
            let last = prometheus.query(&series)?;
            let first = prometheus.query(&format!("min_over_time({series}{window})"))?;
            let samples = prometheus.query(&format!("count_over_time({series}{window})"))?;
            let view = lb_view(&lb_ns, &env.get("LB_DEV")?)?;
            return Err(fail(format!(
                "be{k}: Prometheus counted {counted} packets sent to it (last {last}, first {first}, {samples} samples), it decapsulated {got} ({:?} .. {:?}); l4lb's backend packets now {:?}",
                before,
                after,
                &view.packets[..2]
            )));
        }
        let rate = prometheus.query(&format!("max_over_time(rate({series}[3s])[60s:1s])"))?;
        let mean = got / ran;
        ensure!(
            rate >= 0.75 * mean && rate <= 2.0 * mean,
            "be{k}: Prometheus's highest 3 s rate {rate:.0} pkts/s, its decapsulated mean {mean:.0} pkts/s"
        );
        figures.push(format!("be{k}: {got} decapsulated = {counted} counted, rate {rate:.0} pkts/s (mean {mean:.0})"));
    }
    println!("prometheus: {connections} connections in {ran:.1} s; {}", figures.join("; "));
    Ok(())
}

// ---------------------------------------------------------------- health checks

/// The lab's health check (scripts/lab, LAB_HEALTH=http): every second,
/// down after 2 failures, up after 2 passes, each probe within 0.5 s.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const HEALTH_FALL: u32 = 2;
const HEALTH_RISE: u32 = 2;
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// The first up after a down waits at least this long (health::FLAP_HOLD_MIN).
const FLAP_HOLD: Duration = Duration::from_secs(10);

/// When a connection began, and the lab backend that answered or the error.
type Connection = (SystemTime, Result<usize, String>);

/// New HTTP connections to a VIP, one after the other, from a thread in
/// the client's namespace until dropped: when each began and how it ended
/// (the answering lab backend, or the error).
struct ClientLoad {
    results: std::sync::Arc<Mutex<Vec<Connection>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientLoad {
    fn start(client_ns: &str, vip: IpAddr, port: u16) -> ClientLoad {
        let results = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, out, done) = (client_ns.to_string(), results.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _ = in_netns(&ns, || {
                while !done.load(Ordering::Relaxed) {
                    let began = SystemTime::now();
                    let result = http_get(vip, port)
                        .and_then(|(_, body)| answering_backend(&body).map_err(|err| format!("{err:?}")));
                    out.lock().unwrap_or_else(|e| e.into_inner()).push((began, result));
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            });
        });
        ClientLoad { results, stop, thread: Some(thread) }
    }

    /// The connections begun at or after `since`: (answered per lab
    /// backend, the failures).
    fn since(&self, since: SystemTime) -> (BTreeMap<usize, usize>, Vec<String>) {
        let mut answered = BTreeMap::new();
        let mut failed = Vec::new();
        for (began, result) in self.results.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if *began < since {
                continue;
            }
            match result {
                Ok(backend) => *answered.entry(*backend).or_insert(0) += 1,
                Err(err) => failed.push(err.clone()),
            }
        }
        (answered, failed)
    }
}

impl Drop for ClientLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits (up to `limit`) for a line of the agent's log that contains
/// `needle`, beyond the first `seen` bytes; returns the time the agent
/// wrote on the line and where the line ends.
fn await_log(log: &Path, needle: &str, seen: usize, limit: Duration) -> TestResult<(SystemTime, usize)> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.get(seen..).and_then(|rest| rest.find(needle)).map(|at| seen + at) {
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            let stamp = text[line_start..].split_whitespace().next().unwrap_or_default();
            let time =
                humantime::parse_rfc3339(stamp).map_err(|err| fail(format!("log line time {stamp:?}: {err}")))?;
            return Ok((time, line_end));
        }
        ensure!(
            started.elapsed() < limit,
            "no `{needle}` in the agent's log within {limit:?}:\n{}",
            text.get(seen..).unwrap_or("")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's log and the client load of the health test.
struct HealthWatch {
    log: PathBuf,
    /// How much of the log was read.
    seen: usize,
    load: ClientLoad,
    /// The IPv4 service (displayed), which the load uses.
    service: String,
}

impl HealthWatch {
    /// The longest a dead backend may stay in: the first failing probe
    /// within an interval, then fall - 1 more, the last taking the timeout.
    const BOUND_DOWN: Duration = Duration::from_millis(
        HEALTH_INTERVAL.as_millis() as u64 * HEALTH_FALL as u64 + HEALTH_TIMEOUT.as_millis() as u64,
    );
    /// How long to wait for a log line that should come.
    const PATIENCE: Duration = Duration::from_secs(8);

    /// Lab backend `k` (`addr`), broken at `broke`: marked down within
    /// BOUND_DOWN (half a second allowed for the command that broke it),
    /// and of the new connections after the apply that took it out (3 s of
    /// them) none fails and none reaches it. Returns when it went down, how
    /// long after `broke`, and how many connections followed.
    fn taken_out(&mut self, k: usize, addr: &str, broke: SystemTime) -> TestResult<(SystemTime, Duration, usize)> {
        let (down, at) =
            await_log(&self.log, &format!("backend_down: {addr} of {}", self.service), self.seen, Self::PATIENCE)?;
        let (applied, at) = await_log(&self.log, "applied: health", at, Self::PATIENCE)?;
        self.seen = at;
        let took = since(down, broke);
        ensure!(
            took <= Self::BOUND_DOWN + Duration::from_millis(500),
            "be{k}: marked down {took:?} after it broke, more than {:?}",
            Self::BOUND_DOWN
        );
        std::thread::sleep(Duration::from_secs(3));
        let (answered, failed) = self.load.since(applied);
        let count = answered.values().sum::<usize>();
        ensure!(
            failed.is_empty() && !answered.contains_key(&k) && count > 20,
            "after be{k} was taken out: answered {answered:?}, failed {failed:?}"
        );
        Ok((down, took, count))
    }

    /// Lab backend `k` (`addr`), repaired at `repaired`: back up (after
    /// its flap hold at the latest), and new connections after the apply
    /// that put it back reach it (3 s of them, none failing). Returns when
    /// it came up and how long after `repaired`.
    fn back(&mut self, k: usize, addr: &str, repaired: SystemTime) -> TestResult<(SystemTime, Duration)> {
        let patience = FLAP_HOLD + Self::PATIENCE;
        let (up, at) = await_log(&self.log, &format!("backend_up: {addr} of {}", self.service), self.seen, patience)?;
        let (back, at) = await_log(&self.log, "applied: health", at, Self::PATIENCE)?;
        self.seen = at;
        std::thread::sleep(Duration::from_secs(3));
        let (answered, failed) = self.load.since(back);
        ensure!(
            failed.is_empty() && answered.contains_key(&k),
            "after be{k} came back: answered {answered:?}, failed {failed:?}"
        );
        Ok((up, since(up, repaired)))
    }
}

/// Under client load on the IPv4 VIP, the lab's agent (health check http
/// every second, fall 2, rise 2):
/// * takes out a backend whose server stopped, within fall x interval plus a
///   probe's timeout (the first failing probe comes within an interval), and
///   after that every new connection succeeds; brings it back once its
///   server answers again (rise x interval, not before the 10 s flap hold);
/// * takes out a backend whose decapsulation is broken although its server
///   runs (the probe goes to the VIP through the same encapsulation as
///   clients), and brings it back once decap is attached again;
/// * says so in its log (with the reason) and its metrics (l4lb_backend_up).
fn health_checks_take_dead_backends_out_and_bring_them_back() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    lab.up(4)?;
    let env = lab.env()?;
    let (client_ns, log) = (env.get("CLIENT_NS")?, PathBuf::from(env.get("AGENT_LOG")?));
    let vip: IpAddr = env.parse("VIP")?;
    let port: u16 = env.parse("PORT")?;
    let state =
        PathBuf::from(env.get("CONFIG")?).parent().map(Path::to_path_buf).ok_or_else(|| fail("no state dir"))?;
    let backend_ns = |k: usize| format!("{}{k}", env.get("BACKEND_NS_PREFIX").unwrap_or_default());
    let service = format!("{vip}:{port}/tcp");
    let load = ClientLoad::start(&client_ns, vip, port);
    std::thread::sleep(Duration::from_secs(2));
    let (answered, failed) = load.since(SystemTime::now() - Duration::from_secs(2));
    ensure!(
        failed.is_empty() && answered.len() == 4,
        "before anything broke: answered {answered:?}, failed {failed:?}"
    );
    let mut watch = HealthWatch { seen: std::fs::read_to_string(&log)?.len(), log, load, service: service.clone() };
    let mut figures = Vec::new();

    // Backend 2: its server stops.
    let pid = std::fs::read_to_string(state.join("be2.pid"))?.trim().to_string();
    let stopped = SystemTime::now();
    run("kill", &[&pid]).success()?;
    let (down, took, answered) = watch.taken_out(2, "198.18.0.102", stopped)?;
    let log_text = std::fs::read_to_string(&watch.log)?;
    let reason = format!("backend_down: 198.18.0.102 of {service}: {HEALTH_FALL} probes failed in a row");
    ensure!(log_text.contains(&reason), "no `{reason}` in:\n{log_text}");
    figures.push(format!(
        "server of be2 stopped: down after {took:.2?} (bound {:?}), then {answered} new connections, all answered",
        HealthWatch::BOUND_DOWN
    ));
    let metrics = metrics_text(&env.get("LB_NS")?, &env.get("METRICS")?)?;
    let up_line = format!("l4lb_backend_up{{service=\"{service}\",backend=\"198.18.0.102\"}} 0");
    ensure!(metrics.lines().any(|l| l == up_line), "no `{up_line}` in the metrics:\n{metrics}");
    promtool_accepts(metrics.split_once("\r\n\r\n").map_or(metrics.as_str(), |(_, body)| body))?;

    // Its server starts again.
    let restarted = SystemTime::now();
    start_server(&state, &backend_ns(2), 2)?;
    let (up, took) = watch.back(2, "198.18.0.102", restarted)?;
    let held = since(up, down);
    ensure!(
        // The log's times are to the millisecond and written just after each flip.
        held + Duration::from_millis(20) >= FLAP_HOLD
            && held <= FLAP_HOLD + HEALTH_INTERVAL * HEALTH_RISE + Duration::from_secs(1),
        "back up {held:?} after going down: not between the flap hold ({FLAP_HOLD:?}) and the hold plus rise x interval"
    );
    figures.push(format!(
        "server of be2 restarted: up after {took:.2?} ({held:.2?} after it went down; hold {FLAP_HOLD:?})"
    ));

    // Backend 3: its decapsulation breaks, its server runs on.
    lab.l4lb("be3", &["decap", "detach", "-i", "be3"]).success()?;
    // Broken for sure once the command returned (it may have broken earlier).
    let broke = SystemTime::now();
    let (_, took, answered) = watch.taken_out(3, "198.18.0.103", broke)?;
    figures.push(format!(
        "decap of be3 detached (server running): down after {took:.2?}, then {answered} new connections, all answered"
    ));
    let repaired = SystemTime::now();
    lab.l4lb(
        "be3",
        &["decap", "attach", "-i", "be3", "--mode", "drv", "--addr", "198.18.0.103", "--addr", "2001:db8:18::103"],
    )
    .success()?;
    let (_, took) = watch.back(3, "198.18.0.103", repaired)?;
    figures.push(format!("decap of be3 attached again: up after {took:.2?}"));
    drop(watch);
    for figure in figures {
        eprintln!("health: {figure}");
    }
    Ok(())
}

/// Starts lab backend `k`'s HTTP server again (in namespace `ns`, as
/// scripts/lab's `up` starts it: its own session, no pipe of ours, so that it
/// outlives the command), writing its pid to `state`/beK.pid.
fn start_server(state: &Path, ns: &str, k: usize) -> TestResult {
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let httpd = state.join("httpd.py").display().to_string();
    let pid_file = state.join(format!("be{k}.pid")).display().to_string();
    let (name, addr) = (format!("be{k}"), format!("198.18.0.{}", 100 + k));
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "setsid", "-f", python, &httpd, "80", &name, &addr, &pid_file])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|err| fail(format!("restarting the server of {name}: {err}")))?;
    ensure!(status.success(), "restarting the server of {name}: {status}");
    Ok(())
}

/// Stops lab backend `k`'s HTTP server (the pid in `state`/beK.pid).
fn stop_server(state: &Path, k: usize) -> TestResult {
    let pid = std::fs::read_to_string(state.join(format!("be{k}.pid")))?.trim().to_string();
    run("kill", &[&pid]).success()?;
    Ok(())
}

/// The backends the balancer runs for `service` (lab.env's LB_NS and LB_DEV).
fn running_backends(lb_ns: &str, dev: &str, service: &l4lb::config::ServiceKey) -> TestResult<Vec<IpAddr>> {
    in_netns(lb_ns, || {
        let iface = l4lb::iface::Interface::by_name(dev)?;
        let program = l4lb::discover::find_l4lb(&iface)?;
        let running = l4lb::maps::LbMaps::open(&program)?.read_running()?;
        let found = running.service(service).ok_or_else(|| fail(format!("no service {service} runs")))?;
        Ok(found.backends.iter().map(|b| b.backend.addr).collect())
    })
}

/// With every backend of a service down, the agent keeps them all (with
/// none, new connections would have nowhere to go: `all_down` in its log);
/// the first one back then takes every new connection alone.
fn health_all_down_keeps_every_backend() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::new();
    lab.up(3)?;
    let env = lab.env()?;
    let (client_ns, log) = (env.get("CLIENT_NS")?, PathBuf::from(env.get("AGENT_LOG")?));
    let (lb_ns, lb_dev) = (env.get("LB_NS")?, env.get("LB_DEV")?);
    let vip: IpAddr = env.parse("VIP")?;
    let port: u16 = env.parse("PORT")?;
    let state =
        PathBuf::from(env.get("CONFIG")?).parent().map(Path::to_path_buf).ok_or_else(|| fail("no state dir"))?;
    let key = l4lb::config::ServiceKey::Vip { addr: vip, protocol: l4lb::config::Protocol::Tcp, port };
    let addr = |k: usize| -> IpAddr { IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 100 + k as u8)) };
    let patience = HealthWatch::PATIENCE;
    let mut seen = std::fs::read_to_string(&log)?.len();

    // be1 and be2 die: be3 alone is left.
    stop_server(&state, 1)?;
    stop_server(&state, 2)?;
    let mut after_downs = seen;
    for k in [1, 2] {
        let (_, at) = await_log(&log, &format!("backend_down: {} of {key}", addr(k)), seen, patience)?;
        after_downs = after_downs.max(at);
    }
    seen = after_downs;
    await_backends(&lb_ns, &lb_dev, &key, &[addr(3)], "with be1 and be2 down")?;

    // be3 dies too: all three are kept.
    stop_server(&state, 3)?;
    let (_, at) = await_log(&log, &format!("backend_down: {} of {key}", addr(3)), seen, patience)?;
    let (_, at) = await_log(&log, &format!("all_down: {key}: no backend that takes new flows is up"), at, patience)?;
    seen = at;
    await_backends(&lb_ns, &lb_dev, &key, &[addr(1), addr(2), addr(3)], "with every backend down")?;

    // be3's server starts again: after its flap hold, be3 alone takes every new connection.
    let restarted = SystemTime::now();
    start_server(&state, &lab.ns("be3"), 3)?;
    let (up, _) = await_log(&log, &format!("backend_up: {} of {key}", addr(3)), seen, FLAP_HOLD + patience)?;
    await_backends(&lb_ns, &lb_dev, &key, &[addr(3)], "after be3 came back")?;
    let back = SystemTime::now();
    let load = ClientLoad::start(&client_ns, vip, port);
    std::thread::sleep(Duration::from_secs(2));
    let (answered, failed) = load.since(back);
    ensure!(
        failed.is_empty() && answered.keys().eq([3].iter()) && answered[&3] > 10,
        "after be3 came back: answered {answered:?}, failed {failed:?}"
    );
    eprintln!(
        "health: be1, be2 down: be3 alone; be3 down: all three kept (all_down); be3's server restarted: up \
         {:.2?} later (flap hold {FLAP_HOLD:?}), then {} new connections, all answered by be3",
        since(up, restarted),
        answered[&3]
    );
    Ok(())
}

/// Waits (up to 5 s) until the balancer runs exactly `want` for `service`.
fn await_backends(
    lb_ns: &str,
    dev: &str,
    service: &l4lb::config::ServiceKey,
    want: &[IpAddr],
    when: &str,
) -> TestResult {
    let started = Instant::now();
    loop {
        let running = running_backends(lb_ns, dev, service)?;
        if running == want {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(5), "{when}, {service} runs {running:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long after `earlier` `later` was (0 if it was not later).
fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// `promtool check metrics` passes on `text` (the exposition, without the HTTP header).
fn promtool_accepts(text: &str) -> TestResult {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| fail(format!("promtool: {err}")))?;
    child.stdin.take().ok_or_else(|| fail("promtool's stdin"))?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The agent's metrics (GET /metrics at `addr` inside `lb_ns`).
fn metrics_text(lb_ns: &str, addr: &str) -> TestResult<String> {
    let addr: SocketAddr = addr.parse().map_err(|_| fail(format!("bad metrics address {addr}")))?;
    in_netns(lb_ns, || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
}
