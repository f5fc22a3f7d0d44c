//! The services control plane on real maps: `l4lb apply`, `l4lb config` and
//! `l4lb map [--vip]` (the binary), and the apply engine (`apply::plan`,
//! `apply::execute`, `apply::Faulty`) over the kernel's maps of an attached
//! program, read back through the library (`LbMaps::dump`, `read_snapshot`)
//! and checked through the datapath with BPF_PROG_TEST_RUN on the attached
//! program itself.
//!
//! Each balancer is a namespace `l4lbt-<pid>-a<n>` holding a veth pair
//! (`l4lbt-a<n>l` with l4lb attached in driver mode, its peer `l4lbt-a<n>p`);
//! a guard deletes the namespace, and with it the veth and the program, even
//! when an assertion fails.

#[macro_use]
mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result as AnyResult;
use common::services::{
    plan_as_applied, predict, probes, same_snapshot, table_addresses, Probe, Program, Verdict, PROTO_TCP, PROTO_UDP,
};
use common::{fail, in_netns, ip, run, Outcome, TestResult};
use l4lb::apply::{self, Faulty, Io, MapId, Snapshot};
use l4lb::bpf::MAGLEV_SIZE;
use l4lb::config::{self, Model, ServiceKey};
use l4lb::maps::LbMaps;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
/// Namespaces, interfaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt";

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "apply",
        "network namespaces, XDP and BPF maps need root",
        vec![
            ("apply_then_config_round_trips_and_reapply_changes_nothing", apply_then_config_round_trips),
            ("changed_file_prints_the_diff_and_writes_only_changed_slots", changed_file_prints_the_diff),
            ("bad_files_are_refused_with_file_line_and_leave_maps_byte_identical", bad_files_are_refused),
            ("kernel_failure_at_every_write_index_rolls_back_completely", failure_at_every_write_rolls_back),
            ("map_with_and_without_vip_fills_only_that_pool", map_fills_only_its_pool),
            ("two_balancers_agree_whatever_the_order_of_applies", two_balancers_agree),
        ],
    );
}

// ---------------------------------------------------------------- a balancer

/// One namespace with a veth pair, l4lb attached to one end.
struct Balancer {
    ns: String,
    dev: String,
    dir: PathBuf,
}

impl Balancer {
    fn new() -> TestResult<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}-{}-a{n}", std::process::id());
        let b = Balancer { ns: base.clone(), dev: format!("{PREFIX}-a{n}l"), dir: std::env::temp_dir().join(&base) };
        // From here on the guard exists: a failure below still cleans up.
        std::fs::create_dir_all(&b.dir)?;
        ip(&["netns", "add", &b.ns])?;
        // No IPv6 in the kernel's stack: no router solicitations or MLD reports
        // among the counters (the datapath's IPv6 is exercised by test runs).
        run(
            "ip",
            &[
                "netns",
                "exec",
                &b.ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )
        .success()?;
        let peer = format!("{PREFIX}-a{n}p");
        ip(&["-n", &b.ns, "link", "add", &b.dev, "type", "veth", "peer", "name", &peer])?;
        ip(&["-n", &b.ns, "addr", "add", "192.0.2.2/24", "dev", &b.dev])?;
        ip(&["-n", &b.ns, "link", "set", "dev", &peer, "up"])?;
        ip(&["-n", &b.ns, "link", "set", "dev", &b.dev, "up"])?;
        b.l4lb(&["attach", "-i", &b.dev]).success()?;
        Ok(b)
    }

    /// `l4lb ARGS` inside the namespace.
    fn l4lb(&self, args: &[&str]) -> Outcome {
        let mut full = vec!["netns", "exec", &self.ns, BIN];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `l4lb apply -i DEV -c PATH`, and how long it took.
    fn apply(&self, path: &str) -> (Outcome, Duration) {
        let started = Instant::now();
        let out = self.l4lb(&["apply", "-i", &self.dev, "-c", path]);
        (out, started.elapsed())
    }

    /// Writes a file into the scratch directory; returns its path.
    fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> TestResult<String> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents)?;
        Ok(path.display().to_string())
    }

    /// The maps of the attached program, opened through the library (the
    /// handles work from any thread afterwards), and the program's id.
    fn maps(&self) -> TestResult<(LbMaps, u32)> {
        in_netns(&self.ns, || {
            let iface = l4lb::iface::Interface::by_name(&self.dev)?;
            let program = l4lb::discover::find_l4lb(&iface)?;
            Ok((LbMaps::open(&program)?, program.id))
        })
    }

    fn dump(&self) -> TestResult<Vec<u8>> {
        Ok(self.maps()?.0.dump()?)
    }

    fn snapshot(&self) -> TestResult<Snapshot> {
        Ok(self.maps()?.0.read_snapshot()?)
    }

    /// The attached program, for BPF_PROG_TEST_RUN.
    fn program(&self) -> TestResult<Program> {
        Program::from_id(self.maps()?.1)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- configurations

const GLOBAL: &str = r#"[global]
source_v4 = "192.0.2.2"
source_v6 = "2001:db8::2"
gateway_mac = "02:00:00:00:00:01"
hash_seed = 0x1234abcd
"#;

/// Every kind of service: the catch-all (IPv6 backends: IPv4 clients go
/// IPv4-in-IPv6), IPv4 and IPv6 VIPs with a port and with port 0, an IPv4
/// VIP with IPv4 and IPv6 backends, backends with and without a MAC, weights
/// 0 (draining), 1, 2, 3.
const SERVICES: [&str; 5] = [
    r#"
[[service]]
vip = "*"
backends = [
  { address = "2001:db8:1::1", mac = "02:00:00:00:01:01" },
  { address = "2001:db8:1::2" },
]
"#,
    r#"
[[service]]
vip = "203.0.113.10"
protocol = "tcp"
port = 80
backends = [
  { address = "198.18.0.101", mac = "02:00:c6:12:00:65", weight = 1 },
  { address = "198.18.0.102", weight = 2 },
  { address = "2001:db8::103" },
  { address = "198.18.0.104", weight = 0 },
]
"#,
    r#"
[[service]]
vip = "203.0.113.10"
protocol = "udp"
port = 0
hash_ports = false
backends = [ { address = "198.18.0.111" }, { address = "198.18.0.112", mac = "02:00:c6:12:00:70" } ]
"#,
    r#"
[[service]]
vip = "2001:db8::10"
protocol = "tcp"
port = 443
backends = [ { address = "2001:db8::101" }, { address = "2001:db8::102", mac = "02:00:00:00:01:02", weight = 3 } ]
"#,
    r#"
[[service]]
vip = "2001:db8::10"
protocol = "udp"
port = 0
backends = [ { address = "2001:db8::121" } ]
"#,
];

fn full_config() -> String {
    let mut text = GLOBAL.to_string();
    for s in SERVICES {
        text.push_str(s);
    }
    text
}

/// Probes for every service of `full_config` (and some nobody takes).
fn full_probes(per: usize, salt: u32) -> Vec<Probe> {
    let v4: IpAddr = "203.0.113.10".parse().unwrap();
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    let other4: IpAddr = "203.0.113.99".parse().unwrap();
    let other6: IpAddr = "2001:db8::99".parse().unwrap();
    probes(
        &[
            (v4, PROTO_TCP, 80),
            (v4, PROTO_TCP, 8080), // no VIP: the catch-all (4in6)
            (v4, PROTO_UDP, 53),   // port 0 VIP, addresses only
            (v4, PROTO_UDP, 5353),
            (v6, PROTO_TCP, 443),
            (v6, PROTO_TCP, 444), // the catch-all (6in6)
            (v6, PROTO_UDP, 53),  // port 0 VIP
            (other4, PROTO_UDP, 9),
            (other6, PROTO_TCP, 22),
        ],
        per,
        salt,
    )
}

fn model_of(text: &str) -> TestResult<Model> {
    config::parse("test.toml", text.as_bytes()).map_err(|e| fail(format!("{e:#}\n{text}")))
}

/// Every probe through the attached program lands where the running state
/// says; returns the verdicts.
fn check_datapath(
    what: &str,
    program: &Program,
    running: &l4lb::state::Running,
    probes: &[Probe],
) -> TestResult<Vec<Verdict>> {
    let mut out = Vec::with_capacity(probes.len());
    for p in probes {
        let got = program.verdict(p)?;
        let want = predict(running, p);
        ensure!(got == want, "{what}: {p:?}: the datapath says {got:?}, the running state {want:?}");
        ensure!(!matches!(got, Verdict::Dropped(_)), "{what}: {p:?} dropped");
        out.push(got);
    }
    Ok(out)
}

// ---------------------------------------------------------------- tests

fn apply_then_config_round_trips() -> TestResult {
    let b = Balancer::new()?;
    let text = full_config();
    let path = b.file("lb.toml", &text)?;
    let wanted = model_of(&text)?;
    let empty = b.snapshot()?;

    let (out, took) = b.apply(&path);
    let out = out.success()?;
    let plan = apply::plan(&empty, &wanted, 0)?;
    let applied = format!("{}: applied ({} map writes, {} table slots)\n", b.dev, plan.writes(), plan.slots_written());
    ensure!(
        out.stdout == format!("{}{applied}", plan.diff),
        "apply printed:\n{}\nexpected:\n{}{applied}",
        out.stdout,
        plan.diff
    );
    ensure!(
        plan.slots_written() == 5 * MAGLEV_SIZE,
        "a first apply of 5 services wrote {} slots",
        plan.slots_written()
    );
    for line in [
        "+ service * (2 backends)",
        "+ service 203.0.113.10:80/tcp (4 backends)",
        "    hash_ports false",
        "+ service [2001:db8::10]:*/udp (1 backend)",
        "    + 198.18.0.104 mac gateway weight 0",
        "services: 5 added, 0 removed, 0 changed; global: 3 changed",
    ] {
        ensure!(out.stdout.lines().any(|l| l == line), "apply output lacks `{line}`:\n{}", out.stdout);
    }
    let after = b.snapshot()?;
    same_snapshot("after the first apply", &after, &plan.after)?;
    println!(
        "apply: 5 services, 10 backends from nothing: {:.1} ms (process), {} map writes, {} table slots",
        took.as_secs_f64() * 1e3,
        plan.writes(),
        plan.slots_written()
    );

    // `l4lb config` prints what apply takes back unchanged.
    let printed = b.l4lb(&["config", "-i", &b.dev]).success()?.stdout;
    let reparsed = model_of(&printed)?;
    // The file names no MTU: the running one (attach's, the device's) is printed.
    let mut running = wanted.clone();
    running.global.mtu = empty.running.global.mtu;
    ensure!(running.global.mtu.is_some(), "attach set no MTU");
    ensure!(reparsed == running, "`l4lb config` gives another model:\n{printed}");
    ensure!(printed == config::to_toml(&running), "`l4lb config` is not the canonical rendering:\n{printed}");
    let before = b.dump()?;
    let printed_path = b.file("printed.toml", &printed)?;
    for file in [&printed_path, &path] {
        let out = b.apply(file).0.success()?;
        ensure!(out.stdout == "no changes\n", "re-applying {file} printed:\n{}", out.stdout);
        ensure!(b.dump()? == before, "re-applying {file} changed the maps");
    }
    // A dry run prints and writes nothing.
    let changed = text.replace("weight = 3", "weight = 4");
    let changed_path = b.file("changed.toml", &changed)?;
    let out = b.l4lb(&["apply", "-i", &b.dev, "-c", &changed_path, "--dry-run"]).success()?;
    ensure!(
        out.stdout == "~ service [2001:db8::10]:443/tcp\n    ~ 2001:db8::102 weight 3 -> 4\nservices: 0 added, 0 removed, 1 changed; global: 0 changed\ndry run: nothing written\n",
        "dry run printed:\n{}",
        out.stdout
    );
    ensure!(b.dump()? == before, "a dry run changed the maps");

    // Through the datapath: every service answers as its table says.
    let program = b.program()?;
    let verdicts = check_datapath("after apply", &program, &after.running, &full_probes(40, 1))?;
    let backends: std::collections::BTreeSet<_> = verdicts.iter().collect();
    ensure!(backends.len() >= 10, "the probes reached only {backends:?}");
    ensure!(
        !verdicts.contains(&Verdict::Pass),
        "a probe passed: the catch-all (IPv6 backends) takes every IPv4 and IPv6 flow"
    );
    Ok(())
}

fn changed_file_prints_the_diff() -> TestResult {
    let b = Balancer::new()?;
    let global = "[global]\nsource_v4 = \"192.0.2.2\"\ngateway_mac = \"02:00:00:00:00:01\"\nhash_seed = 7\n";
    let first = format!(
        "{global}\n[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n  {{ address = \"198.18.0.1\" }},\n  {{ address = \"198.18.0.2\" }},\n  {{ address = \"198.18.0.3\" }},\n]\n\n[[service]]\nvip = \"203.0.113.20\"\nprotocol = \"udp\"\nport = 53\nbackends = [ {{ address = \"198.18.0.9\" }} ]\n"
    );
    let second = format!(
        "{global}\n[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n  {{ address = \"198.18.0.1\" }},\n  {{ address = \"198.18.0.2\", weight = 2 }},\n  {{ address = \"198.18.0.4\", mac = \"02:00:00:00:00:44\" }},\n]\n\n[[service]]\nvip = \"203.0.113.30\"\nprotocol = \"tcp\"\nport = 443\nbackends = [ {{ address = \"198.18.0.31\" }} ]\n"
    );
    b.apply(&b.file("first.toml", &first)?).0.success()?;
    let before = b.snapshot()?;
    let key: ServiceKey =
        ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: config::Protocol::Tcp, port: 80 };
    let old_table = before.running.service(&key).ok_or_else(|| fail("no 203.0.113.10:80/tcp"))?.table.clone();

    let out = b.apply(&b.file("second.toml", &second)?).0.success()?;
    let after = b.snapshot()?;
    let new_table = after.running.service(&key).ok_or_else(|| fail("no 203.0.113.10:80/tcp after"))?.table.clone();
    let changed = l4lb::maglev::diff(&old_table, &new_table).len();
    // Planned at the tick the process read the maps at (the clock says it).
    let plan = plan_as_applied(&before, &model_of(&second)?, &after)?;
    same_snapshot("after the second apply", &after, &plan.after)?;
    ensure!(
        plan.slots_written() == MAGLEV_SIZE + changed,
        "the plan writes {} slots: a new table ({MAGLEV_SIZE}) and {changed} changed slots expected",
        plan.slots_written()
    );
    let expected = format!(
        "- service 203.0.113.20:53/udp (1 backend)
+ service 203.0.113.30:443/tcp (1 backend)
    + 198.18.0.31 mac gateway weight 1
~ service 203.0.113.10:80/tcp
    - 198.18.0.3
    + 198.18.0.4 mac 02:00:00:00:00:44 weight 1
    ~ 198.18.0.2 weight 1 -> 2
services: 1 added, 1 removed, 1 changed; global: 0 changed
{}: applied ({} map writes, {} table slots)
",
        b.dev,
        plan.writes(),
        MAGLEV_SIZE + changed
    );
    ensure!(out.stdout == expected, "apply printed:\n{}\nexpected:\n{expected}", out.stdout);
    println!("apply: 1 service changed (3 backends: 1 removed, 1 added, 1 reweighted): {changed} of {MAGLEV_SIZE} slots changed ({:.1}%)", 100.0 * changed as f64 / MAGLEV_SIZE as f64);

    // Only changed slots are written: every slot write of the next apply,
    // through the engine on the real maps, changes its slot, and they are
    // exactly the slots whose value differs afterwards.
    let third = second.replace("{ address = \"198.18.0.1\" },", "{ address = \"198.18.0.1\", weight = 0 },");
    let (maps, _) = b.maps()?;
    let tables_before = read_all_slots(&maps)?;
    let now = maps.read_snapshot()?;
    let plan = apply::plan(&now, &model_of(&third)?, 0)?;
    let recorder = Recorder { inner: &maps, slots: Cell::new(0), unchanged: Cell::new(0) };
    apply::execute(&recorder, &plan)?;
    let tables_after = read_all_slots(&maps)?;
    let differ = tables_before.iter().zip(&tables_after).filter(|(a, b)| a != b).count();
    ensure!(recorder.unchanged.get() == 0, "{} slot writes wrote the value the slot held", recorder.unchanged.get());
    ensure!(recorder.slots.get() == differ, "{} slots written, {differ} differ", recorder.slots.get());
    ensure!(plan.slots_written() == differ, "the plan says {} slots, {differ} differ", plan.slots_written());
    println!("apply: draining 1 of 3 backends: {differ} slots written");
    Ok(())
}

/// Every entry of l4lb_tables.
fn read_all_slots(maps: &LbMaps) -> TestResult<Vec<u32>> {
    Ok(maps.read_slots(0, (l4lb::bpf::MAX_SERVICES * MAGLEV_SIZE) as u32)?)
}

/// An Io that counts slot writes, and those that would not change the slot.
struct Recorder<'a> {
    inner: &'a LbMaps,
    slots: Cell<usize>,
    unchanged: Cell<usize>,
}

impl Io for Recorder<'_> {
    fn read(&self, map: MapId, key: u32) -> AnyResult<Vec<u8>> {
        self.inner.read(map, key)
    }
    fn write(&self, map: MapId, key: u32, value: &[u8]) -> AnyResult<()> {
        self.inner.write(map, key, value)
    }
    fn read_slots(&self, start: u32, count: u32) -> AnyResult<Vec<u32>> {
        self.inner.read_slots(start, count)
    }
    fn write_slots(&self, entries: &[(u32, u32)]) -> AnyResult<()> {
        for &(index, value) in entries {
            if self.inner.read_slots(index, 1)?[0] == value {
                self.unchanged.set(self.unchanged.get() + 1);
            }
        }
        self.slots.set(self.slots.get() + entries.len());
        self.inner.write_slots(entries)
    }
    fn grace(&self) {
        self.inner.grace()
    }
}

fn bad_files_are_refused() -> TestResult {
    let b = Balancer::new()?;
    b.apply(&b.file("lb.toml", full_config())?).0.success()?;
    // Traffic first, so that the counters are not all zero.
    let program = b.program()?;
    for p in full_probes(5, 2) {
        program.verdict(&p)?;
    }
    let before = b.dump()?;

    // GLOBAL is 5 lines: a service from line 7 on.
    let service = |vip: &str, proto: &str, port: &str, backends: &str| {
        format!("{GLOBAL}\n[[service]]\nvip = \"{vip}\"\nprotocol = \"{proto}\"\nport = {port}\nbackends = [\n{backends}]\n")
    };
    let one = "  { address = \"198.18.0.1\" },\n";
    let many_services: String = GLOBAL.to_string()
        + &(0..65).map(|i| format!("\n[[service]]\nvip = \"203.0.113.{}\"\nprotocol = \"tcp\"\nport = 80\nbackends = [ {{ address = \"198.18.0.1\" }} ]\n", i + 1)).collect::<String>();
    let many_backends: String =
        (0..513).map(|i| format!("  {{ address = \"198.18.{}.{}\" }},\n", i / 200, i % 200 + 1)).collect();
    let directory = b.dir.join("config.d");
    std::fs::create_dir_all(&directory)?;
    let mut huge = full_config();
    while huge.len() as u64 <= l4lb::config::MAX_FILE_BYTES {
        huge.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    // (name, contents (None: no file), line the error must name, text it must contain)
    let cases: Vec<(&str, Option<String>, Option<usize>, &str)> = vec![
        (
            "syntax error",
            Some(format!("{GLOBAL}\n[[service]]\nvip = \"203.0.113.10\nprotocol = \"tcp\"\n")),
            Some(8),
            "",
        ),
        ("wrong type", Some(service("203.0.113.10", "tcp", "\"80\"", one)), Some(10), "\"80\""),
        ("unknown key", Some(service("203.0.113.10", "tcp", "80", one).replace("protocol", "proto")), Some(9), "proto"),
        ("unknown protocol", Some(service("203.0.113.10", "sctp", "80", one)), Some(9), "sctp"),
        ("port out of range", Some(service("203.0.113.10", "tcp", "65536", one)), Some(10), "65536"),
        (
            "duplicate service",
            Some(
                service("203.0.113.10", "tcp", "80", one)
                    + &service("203.0.113.10", "tcp", "80", one).replace(GLOBAL, ""),
            ),
            Some(16),
            "203.0.113.10:80/tcp is already defined on line 8",
        ),
        (
            "duplicate backend",
            Some(service("203.0.113.10", "tcp", "80", &format!("{one}  {{ address = \"198.18.0.2\" }},\n{one}"))),
            Some(14),
            "198.18.0.1",
        ),
        ("65 services", Some(many_services), Some(5 + 64 * 6 + 2), "65 services"),
        ("513 backends", Some(service("203.0.113.10", "tcp", "80", &many_backends)), Some(12 + 512), "513 backends"),
        (
            "bad address",
            Some(service("203.0.113.10", "tcp", "80", "  { address = \"198.18.0.300\" },\n")),
            Some(12),
            "198.18.0.300",
        ),
        ("bad VIP", Some(service("203.0.113.1000", "tcp", "80", one)), Some(8), "203.0.113.1000"),
        (
            "multicast backend",
            Some(service("203.0.113.10", "tcp", "80", "  { address = \"224.0.0.5\" },\n")),
            Some(12),
            "224.0.0.5",
        ),
        (
            "bad MAC",
            Some(service(
                "203.0.113.10",
                "tcp",
                "80",
                "  { address = \"198.18.0.1\", mac = \"02:00:00:00:00:0g\" },\n",
            )),
            Some(12),
            "02:00:00:00:00:0g",
        ),
        (
            "multicast MAC",
            Some(service(
                "203.0.113.10",
                "tcp",
                "80",
                "  { address = \"198.18.0.1\", mac = \"01:00:5e:00:00:01\" },\n",
            )),
            Some(12),
            "01:00:5e:00:00:01",
        ),
        (
            "weight out of range",
            Some(service("203.0.113.10", "tcp", "80", "  { address = \"198.18.0.1\", weight = 65536 },\n")),
            Some(12),
            "65536",
        ),
        (
            "IPv6 VIP, IPv4 backend",
            Some(service("2001:db8::10", "tcp", "80", &format!("  {{ address = \"2001:db8::1\" }},\n{one}"))),
            Some(13),
            "198.18.0.1",
        ),
        (
            "catch-all mixing families",
            Some(format!(
                "{GLOBAL}\n[[service]]\nvip = \"*\"\nbackends = [\n{one}  {{ address = \"2001:db8::1\" }},\n]\n"
            )),
            Some(11),
            "2001:db8::1 after 198.18.0.1 (line 10)",
        ),
        ("no backends", Some(service("203.0.113.10", "tcp", "80", "")), Some(11), "no backends"),
        ("empty file", Some(String::new()), None, "no configuration"),
        ("only comments", Some("# nothing\n\n# here\n".into()), None, "no configuration"),
        ("missing file", None, None, "cannot read"),
        ("huge file", Some(huge), None, "too large"),
    ];
    let mut problems = Vec::new();
    let mut check = |name: &str, path: &str, line: Option<usize>, text: &str| -> TestResult {
        let out = b.apply(path).0;
        let lines: Vec<&str> = out.stderr.lines().collect();
        let place = match line {
            Some(line) => format!("{path}:{line}:"),
            None => path.to_string(),
        };
        if !matches!(out.code, Some(code) if code != 0)
            || lines.len() != 1
            || !lines[0].starts_with("l4lb: error:")
            || !lines[0].contains(&place)
            || !lines[0].contains(text)
            || !out.stdout.is_empty()
        {
            problems.push(format!(
                "{name}: want one `l4lb: error:` line naming {place} and `{text}`, nothing on stdout: {}",
                out.describe()
            ));
        }
        if b.dump()? != before {
            problems.push(format!("{name}: the maps changed"));
        }
        Ok(())
    };
    for (i, (name, contents, line, text)) in cases.iter().enumerate() {
        let path = match contents {
            Some(c) => b.file(&format!("bad-{i}.toml"), c)?,
            None => b.dir.join("missing.toml").display().to_string(),
        };
        check(name, &path, *line, text)?;
    }
    let binary =
        b.file("binary.toml", [b"[global]\n".as_slice(), &[0x7f, b'E', b'L', b'F', 0, 1, 0xff, 0xfe]].concat())?;
    check("binary file", &binary, Some(2), "not text")?;
    let utf = b.file("latin1.toml", [b"[global]\n# caf".as_slice(), &[0xe9, b'\n']].concat())?;
    check("invalid UTF-8", &utf, Some(2), "not text")?;
    check("a directory", &directory.display().to_string(), None, "not a regular file")?;
    ensure!(problems.is_empty(), "{} of {} cases:\n{}", problems.len(), cases.len() + 3, problems.join("\n"));
    Ok(())
}

fn failure_at_every_write_rolls_back() -> TestResult {
    let b = Balancer::new()?;
    // Counters that are not zero, on numbers the next applies free and reuse.
    b.apply(&b.file("one.toml", full_config())?).0.success()?;
    let program = b.program()?;
    for p in full_probes(10, 3) {
        program.verdict(&p)?;
    }
    // Remove a service and some backends: their numbers are free, their counters not zero.
    let two = full_config()
        .replace(SERVICES[4], "")
        .replace("  { address = \"198.18.0.102\", weight = 2 },\n", "")
        .replace("{ address = \"2001:db8::101\" }, ", "");
    b.apply(&b.file("two.toml", &two)?).0.success()?;

    // The change under test: a new gateway MAC (backend entries rewritten), a
    // service removed, two added (one on port 0), backends added, removed and
    // reweighted, hash_ports changed.
    let three = two
        .replace("02:00:00:00:00:01", "02:00:00:00:00:02")
        .replace(SERVICES[0], "")
        .replace(
            "{ address = \"198.18.0.111\" }",
            "{ address = \"198.18.0.113\" }, { address = \"198.18.0.111\", weight = 5 }",
        )
        .replace("hash_ports = false\n", "")
        + r#"
[[service]]
vip = "203.0.113.20"
protocol = "tcp"
port = 0
backends = [ { address = "198.18.0.201" }, { address = "2001:db8::202" } ]

[[service]]
vip = "2001:db8::20"
protocol = "udp"
port = 5353
hash_ports = false
backends = [ { address = "2001:db8::211" }, { address = "2001:db8::212", weight = 0 }, { address = "2001:db8::213" } ]
"#;
    let wanted = model_of(&three)?;
    let (maps, _) = b.maps()?;
    let before = maps.dump()?;
    let now = maps.read_snapshot()?;
    let plan = apply::plan(&now, &wanted, 0)?;
    ensure!(
        plan.diff.added.len() == 2 && plan.diff.removed.len() == 1 && !plan.diff.changed.is_empty(),
        "the plan is not the intended mix:\n{}",
        plan.diff
    );
    let steps = plan.steps.len();
    // Each step is at most one write (a slot batch counts as one): try every
    // index up to the first that is past the last write (the apply then
    // succeeds).
    let started = Instant::now();
    let mut failed = 0;
    let mut done = None;
    for fail_at in 0..=steps {
        let faulty = Faulty::new(&maps, fail_at);
        match apply::execute(&faulty, &plan) {
            Ok(()) => {
                done = Some(fail_at);
                break;
            }
            Err(err) => {
                let message = format!("{err:#}");
                ensure!(
                    message.contains("injected failure") && message.contains("rolled back"),
                    "write {fail_at}: the error does not say what failed and that it was rolled back: {message}"
                );
                failed += 1;
                if maps.dump()? != before {
                    let after = maps.read_snapshot()?;
                    same_snapshot(&format!("after a failure at write {fail_at}"), &after, &now)?;
                    return Err(fail(format!("write {fail_at} failed: the maps are not byte-identical (counters?)")));
                }
            }
        }
    }
    let writes = done.ok_or_else(|| fail(format!("the apply failed at every one of {} indices", steps + 1)))?;
    ensure!(writes == failed && writes > 0, "{writes} writes, {failed} failures");
    same_snapshot("after the apply without failure", &maps.read_snapshot()?, &plan.after)?;
    println!(
        "rollback: {writes} map writes ({} steps, {} slots) each failed in turn and rolled back byte for byte, in {:.1} s",
        steps,
        plan.slots_written(),
        started.elapsed().as_secs_f64()
    );
    // The datapath follows the final state.
    let running = maps.read_running()?;
    check_datapath(
        "after the apply",
        &program,
        &running,
        &probes(
            &[("203.0.113.20".parse().unwrap(), PROTO_TCP, 7), ("2001:db8::20".parse().unwrap(), PROTO_UDP, 5353)],
            50,
            4,
        ),
    )?;
    Ok(())
}

fn map_fills_only_its_pool() -> TestResult {
    let b = Balancer::new()?;
    // The catch-all with IPv4 backends here (map fills IPv4 destinations).
    let text =
        full_config().replace(SERVICES[0], "\n[[service]]\nvip = \"*\"\nbackends = [ { address = \"198.18.0.1\" } ]\n");
    b.apply(&b.file("lb.toml", &text)?).0.success()?;
    let key: ServiceKey =
        ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: config::Protocol::Tcp, port: 80 };
    let destinations = "10.0.1.1, 02:00:0a:00:01:01\n10.0.1.2, 02:00:0a:00:01:02\n198.18.0.101, 02:00:c6:12:00:65\n";
    let file = b.file("d.csv", destinations)?;

    let only_changed = |what: &str, before: &Snapshot, after: &Snapshot, changed: ServiceKey| -> TestResult {
        // The tick may move: the slots the change put in transition count from it.
        let mut same_clock = after.config;
        same_clock.clock = before.config.clock;
        ensure!(
            l4lb::bpf::value_bytes(&before.config) == l4lb::bpf::value_bytes(&same_clock),
            "{what}: the configuration changed"
        );
        ensure!(before.vips == after.vips, "{what}: VIP entries changed");
        let keys = |s: &Snapshot| s.running.services.iter().map(|s| (s.key, s.number)).collect::<Vec<_>>();
        ensure!(keys(before) == keys(after), "{what}: services changed: {:?} -> {:?}", keys(before), keys(after));
        for (x, y) in before.running.services.iter().zip(&after.running.services) {
            if x.key != changed {
                ensure!(x == y, "{what}: service {} changed", x.key);
            }
        }
        let s = after.running.service(&changed).ok_or_else(|| fail(format!("{what}: no {changed}")))?;
        let addrs: Vec<String> = s
            .backends
            .iter()
            .map(|b| format!("{}, {}", b.backend.addr, b.backend.mac.map(config::format_mac).unwrap_or_default()))
            .collect();
        ensure!(
            addrs == ["10.0.1.1, 02:00:0a:00:01:01", "10.0.1.2, 02:00:0a:00:01:02", "198.18.0.101, 02:00:c6:12:00:65"],
            "{what}: {changed} has {addrs:?}"
        );
        ensure!(s.backends.iter().all(|b| b.backend.weight == 1), "{what}: weights {:?}", s.backends);
        let ids: Vec<l4lb::maglev::Backend> =
            s.backends.iter().map(|b| l4lb::maglev::Backend::from_addr(b.backend.addr, 1)).collect();
        let numbers: Vec<u32> = s.backends.iter().map(|b| b.number).collect();
        let table = l4lb::maglev::to_numbers(
            &l4lb::maglev::populate(&ids, MAGLEV_SIZE).map_err(|e| fail(e.to_string()))?,
            &numbers,
        );
        ensure!(s.table == table, "{what}: {changed}'s table is not Maglev's for its backends");
        Ok(())
    };

    let before = b.snapshot()?;
    let out = b.l4lb(&["map", "-i", &b.dev, "-f", &file, "--vip", "203.0.113.10:80/tcp"]).success()?;
    let after = b.snapshot()?;
    only_changed("map --vip", &before, &after, key)?;
    let old = before.running.service(&key).unwrap();
    let slots = l4lb::maglev::diff(&old.table, &after.running.service(&key).unwrap().table).len();
    let line = format!("{}: 3 destinations for 203.0.113.10:80/tcp (2 added, 3 removed, 0 changed), {slots} of {MAGLEV_SIZE} slots written, outer source 192.0.2.2", b.dev);
    ensure!(out.stdout.lines().any(|l| l == line), "map --vip printed:\n{}\nexpected a line:\n{line}", out.stdout);

    let before = after;
    b.l4lb(&["map", "-i", &b.dev, "-f", &file]).success()?;
    let after = b.snapshot()?;
    only_changed("map (catch-all)", &before, &after, ServiceKey::CatchAll)?;

    // A new VIP: created (the others untouched); an IPv6 VIP: refused, nothing changes.
    let before = after;
    b.l4lb(&["map", "-i", &b.dev, "-f", &file, "--vip", "203.0.113.77:8080"]).success()?;
    let after = b.snapshot()?;
    let new_key =
        ServiceKey::Vip { addr: "203.0.113.77".parse().unwrap(), protocol: config::Protocol::Tcp, port: 8080 };
    ensure!(
        after.running.services.len() == before.running.services.len() + 1 && after.running.service(&new_key).is_some(),
        "map --vip of a new VIP did not add exactly it"
    );
    for s in &before.running.services {
        ensure!(after.running.service(&s.key) == Some(s), "map --vip of a new VIP changed {}", s.key);
    }
    let dump = b.dump()?;
    let out = b.l4lb(&["map", "-i", &b.dev, "-f", &file, "--vip", "[2001:db8::10]:443"]).failure()?;
    ensure!(
        out.stderr.starts_with("l4lb: error:") && out.stderr.contains("2001:db8::10") && out.stderr.contains("IPv6"),
        "map --vip IPv6: {}",
        out.describe()
    );
    ensure!(b.dump()? == dump, "a refused map --vip changed the maps");

    // Through the datapath.
    let program = b.program()?;
    let v4: IpAddr = "203.0.113.10".parse().unwrap();
    check_datapath(
        "after map",
        &program,
        &after.running,
        &probes(&[(v4, PROTO_TCP, 80), (v4, PROTO_TCP, 81), ("203.0.113.77".parse().unwrap(), PROTO_TCP, 8080)], 60, 5),
    )?;
    Ok(())
}

fn two_balancers_agree() -> TestResult {
    // a and c apply the file directly; b gets there through other
    // configurations first, so its services and backends have other numbers.
    let (a, b, c) = (Balancer::new()?, Balancer::new()?, Balancer::new()?);
    let text = full_config();
    for x in [&a, &c] {
        x.apply(&x.file("lb.toml", &text)?).0.success()?;
    }
    let detour = format!(
        "{GLOBAL}{}{}\n[[service]]\nvip = \"203.0.113.99\"\nprotocol = \"tcp\"\nport = 1\nbackends = [ {{ address = \"2001:db8::103\" }}, {{ address = \"198.18.0.104\" }}, {{ address = \"198.18.0.9\" }} ]\n",
        SERVICES[4], SERVICES[3]
    );
    b.apply(&b.file("detour.toml", &detour)?).0.success()?;
    b.apply(&b.file("lb.toml", &text)?).0.success()?;

    // Same configuration from scratch: every map byte-identical.
    let (dump_a, dump_b, dump_c) = (a.dump()?, b.dump()?, c.dump()?);
    common::same_bytes("maps of two balancers given the same file", &dump_c, &dump_a)?;
    let (sa, sb) = (a.snapshot()?, b.snapshot()?);
    let numbers = |s: &Snapshot| s.running.services.iter().map(|x| (x.key, x.number)).collect::<BTreeMap<_, _>>();
    ensure!(numbers(&sa) != numbers(&sb), "the detour did not change the service numbers: {:?}", numbers(&sb));
    ensure!(dump_a != dump_b, "different numbers yet identical bytes?");
    ensure!(sa.running.model() == sb.running.model(), "the two balancers run different configurations");
    ensure!(sa.running.global.hash_seed == sb.running.global.hash_seed, "seeds differ");
    for x in &sa.running.services {
        let y = sb.running.service(&x.key).ok_or_else(|| fail(format!("b lacks {}", x.key)))?;
        let (ta, tb) = (table_addresses(x), table_addresses(y));
        let differ = (0..ta.len()).filter(|&i| ta[i] != tb[i]).count();
        ensure!(differ == 0, "service {}: {differ} slots name other backends on the two balancers", x.key);
        ensure!(
            ta.iter().all(|t| t.is_some()) || x.backends.iter().all(|b| b.backend.weight == 0),
            "service {}: slots naming no backend",
            x.key
        );
    }

    // Through both datapaths: the same backend for every flow.
    let (pa, pb, pc) = (a.program()?, b.program()?, c.program()?);
    let probes = full_probes(112, 6);
    ensure!(probes.len() >= 1000, "{} probes", probes.len());
    let (va, vb, vc) = (
        check_datapath("a", &pa, &sa.running, &probes)?,
        check_datapath("b", &pb, &sb.running, &probes)?,
        check_datapath("c", &pc, &sa.running, &probes)?,
    );
    let disagree = (0..probes.len()).filter(|&i| va[i] != vb[i] || va[i] != vc[i]).count();
    ensure!(disagree == 0, "{disagree} of {} flows went elsewhere on another balancer", probes.len());
    println!(
        "ecmp: {} flows, 3 balancers (one with other service numbers {:?} vs {:?}): the same backend for every flow",
        probes.len(),
        numbers(&sb).values().collect::<Vec<_>>(),
        numbers(&sa).values().collect::<Vec<_>>()
    );
    Ok(())
}
