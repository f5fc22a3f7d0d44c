//! Table updates under load: the documentation's claim (docs/usage.md) that a valid `l4lb map`
//! update never lets traffic meet a half-written table, checked with live
//! traffic.
//!
//! Two namespaces, gen and lb, are joined by a veth pair; `l4lb attach`
//! (driver mode) runs on the lb end. The benchmark's ring of frames
//! (`l4lb::bench::ring`: its generator `bench_gen` on the gen end turns every
//! frame l4lb sends back into the next one, all of it on one CPU) floods the
//! lb end with IPv4 TCP SYN and UDP frames to the benchmark's IPv4 VIP, IPv4
//! SYNs to its 4in6 VIP and to no VIP (the catch-all), and, in the apply
//! test, IPv6 SYNs to its IPv6 VIP, from random client addresses and ports
//! for the whole test (in slots in transition each of its frames pins its
//! flow: millions of pins, an LRU flow table turned over and over). The map
//! tests send only what their catch-all takes: a frame l4lb passes to the
//! stack leaves the ring, and the ring can replace only a few of those.
//! Meanwhile `l4lb map` runs, as a process in the lb namespace, on the other
//! CPU(s):
//!
//! * 100 `l4lb map` updates of the catch-all cycling through destination
//!   sets of 1 to 64 destinations (overlapping sets, additions and removals
//!   in one update, MAC changes, full replacements, the same file again).
//!   Each must exit 0 and print the planner's summary line; the counters are
//!   sampled around each one (frames must arrive during every update, and no
//!   drop counter may move); after each, the kernel's state (read through the
//!   library) must be exactly `apply::plan`'s prediction from the previous
//!   kernel state, planned at the process's tick (the clock and the
//!   services' `changed` move when slots go in transition), every slot word
//!   (current and previous backend) must be what docs/transitions.md makes
//!   of the one before, checked by addresses without the planner, the
//!   catch-all must hold the file's destinations with its MACs, every slot
//!   must name one of them, each must have slots, and the slots written
//!   must be exactly those whose word changed.
//! * 100 `l4lb apply` updates of IPv4 and IPv6 services (the flood's VIPs,
//!   the catch-all, and extra services added and removed; backends added,
//!   removed, reweighted to 0..4 (0 = draining), MACs changed, the gateway
//!   changed, flood services taken away and given back, the same file
//!   again): each prints exactly the planner's diff, no drop counter moves,
//!   the kernel's state is the planner's prediction, and, checked without
//!   the planner, the running configuration read back is the file's (with
//!   the hash seed and MTU `l4lb attach` set), every table is Maglev's
//!   for its backends and weights and every slot word what the design makes
//!   of the one before. Flows, all from clients and ports the flood never
//!   uses, run through the attached program (BPF_PROG_TEST_RUN) before and
//!   after each apply, each against a model of the datapath's rules and of
//!   its flow table (`predict_pinned`: steady slots pin nothing; in a slot
//!   in transition a SYN takes the current backend and pins, a pin that
//!   holds decides, other TCP and UDP within the grace take the previous
//!   backend, UDP after it the current one, pinned):
//!   - established flows (TCP segments with ACK, UDP datagrams; a fixed set
//!     per destination, sent around every apply): the datapath does what
//!     the model says, and a flow whose backend is still in the service that
//!     balanced it (same address, any weight, 0 included) keeps that
//!     backend, without exception;
//!   - new connections (SYNs, flows no probe used before, new ones for
//!     every apply) follow the tables, before and after the apply: one
//!     changes backend only when its slot's backend changed. Their ACKs,
//!     sent after the apply and before the SYNs again, go to the backend
//!     that answered the SYN while it is in the service: in a slot the apply
//!     put in transition that is its previous backend (the handshake window
//!     is closed), in one in transition already the SYN's pin holds.
//!   - the flow table: after each apply its entries for the probes' flows
//!     are the model's pins field for field (backend number and address,
//!     slot, tick), and at the end every entry of the probes' clients is;
//!     pins the LRU evicted under the flood are followed and counted; a
//!     probe whose pin was evicted takes its slot's rule again (as the
//!     model says), and a move that causes is counted apart, never as
//!     moved otherwise (docs/transitions.md, "Bounds under attack").
//! * Two `l4lb map` processes started at the same moment with different
//!   files, 10 times: both succeed, and the final table and both processes'
//!   summary lines are exactly those of one order of the two updates (each
//!   planned against the other's finished table), never a mix.
//!
//! After the flood stops, `l4lb stats --json` must show rx = tx + pass +
//! pass_no_service, every
//! drop counter 0 (`drop_no_backend` above all), and more than 100,000 frames.
//! The figures (frames, update times, slots in transition, the probes'
//! outcomes and the rules that decided them, pins, counters) are printed.
//!
//! Everything a test chooses comes from one seed, printed at its start:
//! destination sets, configurations, probes and the balancer's hash seed
//! (`l4lb attach --seed`); `UNDER_LOAD_SEED=N` repeats a run (the flood's
//! random clients, drawn in the kernel, and the timing of concurrent
//! processes aside: neither decides an outcome the tests check).
//!
//! Namespaces are `l4lbt-<pid>-u<n>-gen` / `-lb`; a guard deletes them (and
//! with them the veth and its XDP programs) even when an assertion fails. The
//! two tests take a lock so that their floods never share the CPUs.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::flood::Flood;
use common::services::{
    balanced_by, describe_entry, mix64, pin_key, plan_as_applied, plan_at, predict, predict_pinned, probe_slot,
    quiet_client, same_configuration, same_snapshot, table_addresses, tables_are_maglev, transitions_as_designed,
    FreshFlows, PinKey, Pins, Prediction, Probe, Program, Rule, Segment, SlotAddr, TransitionCount, Verdict, PROTO_TCP,
    PROTO_UDP,
};
use common::veth::{VethPair, LB_ADDR};
use common::{fail, in_netns, TestResult};
use l4lb::apply::{self, Snapshot};
use l4lb::bench::frames::{self, Kind};
use l4lb::bpf::{COUNTER_NAMES, MAGLEV_SIZE};
use l4lb::config::{self, Model, Protocol, ServiceKey};
use l4lb::destinations::Destination;
use l4lb::maps::LbMaps;
use libbpf_rs::MapCore;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
/// Namespaces, interfaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt";
/// Updates under the flood in the main test.
const UPDATES: usize = 100;
/// `l4lb apply` updates under the flood.
const APPLIES: usize = 100;
/// What the flood of the apply test sends (spread over the services it configures).
const FLOOD_KINDS: [Kind; 5] = [Kind::TcpSyn64, Kind::Udp64, Kind::Syn4in6, Kind::Ipv6Syn, Kind::CatchAll];
/// What the flood of the map tests sends: the IPv4 kinds, all of which their
/// IPv4 catch-all takes (it passes IPv6 frames to the stack).
const MAP_FLOOD_KINDS: [Kind; 4] = [Kind::TcpSyn64, Kind::Udp64, Kind::Syn4in6, Kind::CatchAll];
/// Rounds of two concurrent `l4lb map` processes.
const CONCURRENT_ROUNDS: usize = 10;
/// Destinations the sets are drawn from (a full replacement of 64 needs 128).
const POOL: usize = 160;
const MAX_SET: usize = 64;
/// How long one `l4lb` process may take.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);
/// The flood must have delivered more than this.
const MIN_FRAMES: u64 = 100_000;
/// The flow table of the apply test (`l4lb attach --flow-entries`, 128
/// MiB): the flood's frames in slots in transition pin about 300,000 new
/// flows a second, which turn the default table (262,144 entries) over in
/// less than a second: a SYN's pin would then be evicted before its ACK
/// (one apply later) now and then, and the established probes' pins
/// looked up once per apply would be at risk. With four times as many
/// entries the probes' pins mostly outlive the rounds they are used in
/// (as slots in transition pile up without a sweep, the flood pins faster
/// and some do not: those are counted); the model follows every eviction
/// (`FlowTable`).
const APPLY_FLOW_ENTRIES: u32 = 1 << 20;

/// The floods of the two tests must not share the CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "under_load",
        "network namespaces and XDP need root",
        vec![
            ("hundred_map_updates_under_flood_never_expose_a_half_written_table", hundred_map_updates_under_flood),
            ("apply_updates_of_ipv4_and_ipv6_services_under_flood_drop_nothing", apply_updates_under_flood),
            ("concurrent_map_processes_are_serialised_under_flood", concurrent_map_processes_are_serialised),
        ],
    );
}

// ---------------------------------------------------------------- topology

/// The suite's gen <-> lb veth pair, l4lb attached to lb in driver mode.
struct Topology {
    veth: VethPair,
    /// The balancer's hash seed (`l4lb attach --seed`).
    hash_seed: u32,
}

impl std::ops::Deref for Topology {
    type Target = VethPair;
    fn deref(&self) -> &VethPair {
        &self.veth
    }
}

impl Topology {
    /// `hash_seed`: the balancer's (`l4lb attach --seed`), so that a run's
    /// seed decides which slot every flow takes; `flow_entries`: its flow
    /// table's size (`--flow-entries`; None: attach's default).
    fn new(hash_seed: u32, flow_entries: Option<u32>) -> TestResult<Self> {
        let topo = Topology { veth: VethPair::new(PREFIX, true)?, hash_seed };
        let lb_dev = &topo.lb_dev;
        let mut attach =
            vec!["attach".to_string(), "-i".into(), lb_dev.clone(), "--seed".into(), format!("{hash_seed:#010x}")];
        if let Some(n) = flow_entries {
            attach.extend(["--flow-entries".to_string(), n.to_string()]);
        }
        topo.l4lb_many(&[attach])?.remove(0).success()?;
        Ok(topo)
    }

    /// Starts `l4lb ARGS` processes in the lb namespace one right after the
    /// other and waits for all of them (each child is forked by a thread that
    /// entered the namespace, so no `ip netns exec` sits in the timings).
    fn l4lb_many(&self, commands: &[Vec<String>]) -> TestResult<Vec<Run>> {
        in_netns(&self.lb, || {
            let mut children = Vec::new();
            for args in commands {
                let started = Instant::now();
                let child = Command::new(BIN)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|err| fail(format!("starting {BIN}: {err}")))?;
                children.push((args.join(" "), started, child));
            }
            let mut runs = Vec::new();
            for (what, started, mut child) in children {
                let code = loop {
                    match child.try_wait()? {
                        Some(status) => break status.code(),
                        None if started.elapsed() < PROCESS_TIMEOUT => std::thread::sleep(Duration::from_micros(200)),
                        None => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break None;
                        }
                    }
                };
                let elapsed = started.elapsed();
                let output = child.wait_with_output()?;
                runs.push(Run {
                    what: format!("l4lb {what}"),
                    code,
                    elapsed,
                    stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
            Ok(runs)
        })
    }

    fn l4lb(&self, args: &[&str]) -> TestResult<Run> {
        let mut runs = self.l4lb_many(&[args.iter().map(|a| a.to_string()).collect()])?;
        Ok(runs.remove(0))
    }

    /// `l4lb map -i DEV -f FILE` arguments for a file written now.
    fn map_args(&self, name: &str, set: &[Destination]) -> TestResult<Vec<String>> {
        let path = self.write_file(name, destination_file(set).as_bytes())?;
        Ok(vec!["map".into(), "-i".into(), self.lb_dev.clone(), "-f".into(), path.display().to_string()])
    }

    /// The maps of the l4lb program on the lb veth, found afresh.
    fn open_maps(&self) -> TestResult<LbMaps> {
        Ok(LbMaps::open(&self.attached_l4lb()?)?)
    }

    /// The state as the datapath sees it, found afresh through the library.
    fn snapshot(&self) -> TestResult<Snapshot> {
        let maps = self.open_maps()?;
        Ok(maps.read_snapshot()?)
    }

    /// The flow table (l4lb_flows) of the attached program.
    fn open_flows(&self) -> TestResult<libbpf_rs::MapHandle> {
        Ok(l4lb::maps::open_flows(&self.attached_l4lb()?)?)
    }

    /// The attached l4lb program, for BPF_PROG_TEST_RUN.
    fn program(&self) -> TestResult<Program> {
        Program::from_id(self.attached_l4lb()?.id)
    }

    /// `l4lb apply -i DEV -c FILE` arguments for a file written now.
    fn apply_args(&self, name: &str, text: &str) -> TestResult<Vec<String>> {
        let path = self.write_file(name, text.as_bytes())?;
        Ok(vec!["apply".into(), "-i".into(), self.lb_dev.clone(), "-c".into(), path.display().to_string()])
    }

    /// One `l4lb stats --json` sample's counters.
    fn stats_counters(&self) -> TestResult<BTreeMap<String, u64>> {
        let run =
            self.l4lb(&["stats", "-i", &self.lb_dev, "--json", "--count", "1", "--interval", "0.2"])?.success()?;
        let line = run.stdout.lines().next().ok_or_else(|| fail(format!("no output from {}", run.what)))?;
        let sample: Value =
            serde_json::from_str(line).map_err(|err| fail(format!("stats line {line:?} is not JSON: {err}")))?;
        let counters = sample["counters"].as_object().ok_or_else(|| fail(format!("no counters in {line}")))?;
        let mut out = BTreeMap::new();
        for name in COUNTER_NAMES {
            let value = counters
                .get(&name.to_string())
                .and_then(Value::as_u64)
                .ok_or_else(|| fail(format!("no counter `{name}` in {line}")))?;
            out.insert(name.to_string(), value);
        }
        Ok(out)
    }
}

/// A finished `l4lb` process.
struct Run {
    what: String,
    /// None: killed after PROCESS_TIMEOUT.
    code: Option<i32>,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(self) -> TestResult<Self> {
        ensure!(
            self.code == Some(0),
            "`{}` exited with {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.elapsed,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

// ---------------------------------------------------------------- destinations

/// The pool's destination `i` with MAC generation `generation`.
fn destination(i: usize, generation: u8) -> Destination {
    Destination {
        addr: Ipv4Addr::new(10, 77, (i / 200) as u8, (i % 200 + 1) as u8),
        mac: [0x02, 0x4c, 0x34, generation, 0, i as u8],
    }
}

/// A destination file: a comment, then `IP, MAC` rows (with a blank line).
fn destination_file(set: &[Destination]) -> String {
    let mut text = String::from("# l4lb under_load test\n");
    for (i, d) in set.iter().enumerate() {
        let [a, b, c, e, f, g] = d.mac;
        let _ = writeln!(
            text,
            "{}{}, {a:02x}:{b:02x}:{c:02x}:{e:02x}:{f:02x}:{g:02x}",
            if i == 1 { "\n" } else { "" },
            d.addr
        );
    }
    text
}

/// Draws destination sets from the pool: each from the one before.
struct Sets {
    rng: rand::rngs::StdRng,
    /// MAC generation per pool index.
    generation: Vec<u8>,
}

/// What kind of change an update makes (for the printed summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    /// Some destinations kept, some removed and/or added.
    Overlap,
    /// The same, and some of the kept destinations' MACs changed.
    OverlapMac,
    /// Every destination replaced.
    Replace,
    /// Same destinations, some MACs changed.
    MacOnly,
    /// The same file again.
    Same,
}

impl Sets {
    fn new(seed: u64) -> Self {
        Sets { rng: rand::rngs::StdRng::seed_from_u64(seed), generation: vec![0; POOL] }
    }

    fn index_of(d: &Destination) -> usize {
        let [_, _, hi, lo] = d.addr.octets();
        usize::from(hi) * 200 + usize::from(lo) - 1
    }

    fn make(&self, indices: &[usize]) -> Vec<Destination> {
        indices.iter().map(|&i| destination(i, self.generation[i])).collect()
    }

    /// A set of `size` destinations, none of them in `avoid`.
    fn fresh(&mut self, size: usize, avoid: &BTreeSet<usize>) -> Vec<usize> {
        let free: Vec<usize> = (0..POOL).filter(|i| !avoid.contains(i)).collect();
        free.choose_multiple(&mut self.rng, size).copied().collect()
    }

    /// The next set after `previous` for update `k` (1-based), and what changed.
    fn next(&mut self, previous: &[Destination], k: usize) -> (Vec<Destination>, Change) {
        let prev: Vec<usize> = previous.iter().map(Self::index_of).collect();
        let prev_set: BTreeSet<usize> = prev.iter().copied().collect();
        let (mut indices, change) = if k.is_multiple_of(10) {
            let size = if k.is_multiple_of(20) { MAX_SET } else { self.rng.gen_range(1..=MAX_SET) };
            (self.fresh(size, &prev_set), Change::Replace)
        } else if k % 25 == 12 {
            let mut same = prev.clone();
            let changes = self.rng.gen_range(1..=same.len().min(4));
            for &i in same.choose_multiple(&mut self.rng, changes) {
                self.generation[i] = self.generation[i].wrapping_add(1);
            }
            same.shuffle(&mut self.rng);
            (same, Change::MacOnly)
        } else if k == 55 {
            (prev.clone(), Change::Same)
        } else {
            // Target size: the extremes now and then, else anything from 1 to 64.
            let size = match k {
                3 | 41 | 77 => 1,
                4 | 42 | 78 => MAX_SET,
                _ => self.rng.gen_range(1..=MAX_SET),
            };
            let most_kept = size.min(prev.len());
            // Keep most, but drop a few so that additions and removals mix.
            let kept_n = most_kept
                .saturating_sub(self.rng.gen_range(0..=most_kept.min(3)))
                .max(usize::from(size > 1 && prev.len() > 1));
            let mut kept: Vec<usize> = prev.choose_multiple(&mut self.rng, kept_n).copied().collect();
            let mac_change = k % 7 == 3 && !kept.is_empty();
            if mac_change {
                let changes = self.rng.gen_range(1..=kept.len().min(3));
                for &i in kept.choose_multiple(&mut self.rng, changes) {
                    self.generation[i] = self.generation[i].wrapping_add(1);
                }
            }
            let added = self.fresh(size - kept.len(), &prev_set);
            kept.extend(added);
            kept.shuffle(&mut self.rng);
            (kept, if mac_change { Change::OverlapMac } else { Change::Overlap })
        };
        indices.shuffle(&mut self.rng);
        (self.make(&indices), change)
    }
}

// ---------------------------------------------------------------- checks

/// What `l4lb map -f FILE` plans over `now` (its own reading: the running
/// configuration with the catch-all's backends replaced by the file's, the
/// outer source the veth's address, the MTU kept).
fn plan_map(now: &Snapshot, set: &[Destination]) -> TestResult<apply::Plan> {
    Ok(apply::plan(now, &map_wanted(now, set), 0)?)
}

/// The configuration `l4lb map -f FILE` wants over `now`.
fn map_wanted(now: &Snapshot, set: &[Destination]) -> Model {
    let mut wanted = now.running.model();
    wanted.global.source_v4 = Some(LB_ADDR);
    let mut backends: Vec<config::Backend> =
        set.iter().map(|d| config::Backend { addr: d.addr.into(), mac: Some(d.mac), weight: 1 }).collect();
    backends.sort();
    // A new catch-all gets the defaults; an existing one keeps its settings.
    let service = match wanted.service(&ServiceKey::CatchAll) {
        Some(existing) => config::Service { backends, ..existing.clone() },
        None => config::Service::new(ServiceKey::CatchAll, backends),
    };
    wanted.services.retain(|s| s.key != ServiceKey::CatchAll);
    wanted.services.insert(0, service);
    wanted
}

/// The line `l4lb map` ends with for `plan`.
fn map_summary(dev: &str, plan: &apply::Plan, set: &[Destination]) -> String {
    let (added, removed, changed) = match (
        plan.diff.added.iter().find(|s| s.key == ServiceKey::CatchAll),
        plan.diff.changed.iter().find(|c| c.key == ServiceKey::CatchAll),
    ) {
        (Some(s), _) => (s.backends.len(), 0, 0),
        (_, Some(c)) => (c.added.len(), c.removed.len(), c.changed.len()),
        _ => (0, 0, 0),
    };
    format!(
        "{dev}: {} destinations ({added} added, {removed} removed, {changed} changed), {} of {MAGLEV_SIZE} slots written, outer source {LB_ADDR}",
        set.len(),
        plan.slots_written()
    )
}

/// Slot figures of one update of the catch-all.
#[derive(Debug, Default, Clone, Copy)]
struct Churn {
    /// Slots whose word changed.
    written: usize,
    /// Slots held by backends that stay (same address, same weight) before the update ...
    staying: usize,
    /// ... and those of them that changed hands.
    moved: usize,
    /// Slots in transition after the update, of them put in transition by
    /// it and changed again in transition; services whose tick it stamped.
    transitions: TransitionCount,
}

impl Churn {
    fn add(&mut self, c: &Churn) {
        self.written += c.written;
        self.staying += c.staying;
        self.moved += c.moved;
        self.transitions.slots = self.transitions.slots.max(c.transitions.slots);
        self.transitions.started += c.transitions.started;
        self.transitions.changed_again += c.transitions.changed_again;
        self.transitions.stamped += c.transitions.stamped;
    }
}

/// Checks the kernel's state after `l4lb map` from `before` to `set`:
/// exactly the planner's prediction (made at the process's tick), and
/// without the planner: the running configuration that `map` wants, every
/// table Maglev's, every slot word what docs/transitions.md makes of the
/// one before (`transitions_as_designed`), the catch-all holding the
/// file's destinations (with the file's MACs), every slot naming one of
/// them and each of them some slots, the slots written exactly those whose
/// word changed; returns the plan and the slot churn.
fn check_map_update(
    what: &str,
    before: &Snapshot,
    set: &[Destination],
    after: &Snapshot,
) -> TestResult<(apply::Plan, Churn)> {
    let plan = plan_as_applied(before, &map_wanted(before, set), after)?;
    same_snapshot(what, after, &plan.after)?;
    same_configuration(what, &after.running, &map_wanted(before, set))?;
    tables_are_maglev(what, &after.running)?;
    let transitions = transitions_as_designed(what, &before.running, &after.running, after.config.clock)?;
    let service = after.running.service(&ServiceKey::CatchAll).ok_or_else(|| fail(format!("{what}: no catch-all")))?;
    let mut wanted: Vec<(IpAddr, Option<[u8; 6]>, u32)> =
        set.iter().map(|d| (IpAddr::V4(d.addr), Some(d.mac), 1)).collect();
    wanted.sort();
    let held: Vec<(IpAddr, Option<[u8; 6]>, u32)> =
        service.backends.iter().map(|b| (b.backend.addr, b.backend.mac, b.backend.weight)).collect();
    ensure!(held == wanted, "{what}: the catch-all holds {held:?}, the file says {wanted:?}");
    let table = table_addresses(service);
    let mut counts: HashMap<IpAddr, usize> = HashMap::new();
    for (slot, addr) in table.iter().enumerate() {
        let addr = addr.ok_or_else(|| fail(format!("{what}: slot {slot} names no backend of the catch-all")))?;
        *counts.entry(addr).or_default() += 1;
    }
    ensure!(counts.len() == set.len(), "{what}: {} of {} destinations have slots", counts.len(), set.len());
    if before.running.service(&ServiceKey::CatchAll).is_none() {
        ensure!(plan.slots_written() == MAGLEV_SIZE, "{what}: a new catch-all: {} slots written", plan.slots_written());
    }
    let mut churn = Churn { written: plan.slots_written(), transitions, ..Churn::default() };
    let words = |s: &l4lb::state::RunningService| l4lb::transition::join(&s.table, &s.transitions);
    if let Some(old) = before.running.service(&ServiceKey::CatchAll) {
        let old_table = table_addresses(old);
        // Words, not backend numbers: a slot may change state (steady, in transition) with its current backend.
        let raw = l4lb::maglev::diff(&words(old), &words(service)).len();
        ensure!(plan.slots_written() == raw, "{what}: {} slots written, {raw} slot words differ", plan.slots_written());
        let stays = |a: &IpAddr| old.backends.iter().any(|b| b.backend.addr == *a) && held.iter().any(|h| h.0 == *a);
        for i in 0..table.len() {
            if old_table[i].as_ref().is_some_and(stays) {
                churn.staying += 1;
                churn.moved += usize::from(table[i] != old_table[i]);
            }
        }
    }
    Ok((plan, churn))
}

/// The drop counters that are not 0, as "name value".
fn nonzero_drops(counters: &[u64]) -> Vec<String> {
    COUNTER_NAMES
        .iter()
        .zip(counters)
        .filter(|(name, value)| name.starts_with("drop_") && **value > 0)
        .map(|(name, value)| format!("{name} {value}"))
        .collect()
}

/// One `l4lb` update command while the flood runs: it succeeds, no drop
/// counter moves, and frames reached l4lb meanwhile. Returns the run and
/// how many frames l4lb saw during it.
fn run_under_flood(
    topo: &Topology,
    maps: &LbMaps,
    flood: &mut Flood,
    what: &str,
    args: Vec<String>,
) -> TestResult<(Run, u64)> {
    flood.check()?;
    let before = maps.read_counters()?;
    let run = topo.l4lb_many(&[args])?.remove(0);
    let after = maps.read_counters()?;
    let run = Run { what: format!("{what}: {}", run.what), ..run }.success()?;
    let drops = nonzero_drops(&after);
    ensure!(drops.is_empty(), "{what}: drop counters moved: {}", drops.join(", "));
    let frames = counter(&after, "rx") - counter(&before, "rx");
    ensure!(frames > 0, "{what}: no frame reached l4lb while `l4lb` ran ({:?})", run.elapsed);
    Ok((run, frames))
}

fn counter(counters: &[u64], name: &str) -> u64 {
    COUNTER_NAMES.iter().position(|n| *n == name).map_or(0, |i| counters[i])
}

/// After the flood: rx = tx + pass + pass_no_service, no drop, and enough frames.
fn check_final_counters(topo: &Topology) -> TestResult<BTreeMap<String, u64>> {
    let counters = topo.stats_counters()?;
    let (rx, tx, pass, none) = (counters["rx"], counters["tx"], counters["pass"], counters["pass_no_service"]);
    let drops: Vec<String> =
        counters.iter().filter(|(n, v)| n.starts_with("drop_") && **v > 0).map(|(n, v)| format!("{n} {v}")).collect();
    ensure!(drops.is_empty(), "drop counters moved under load: {}", drops.join(", "));
    ensure!(rx == tx + pass + none, "rx {rx} != tx {tx} + pass {pass} + pass_no_service {none}");
    ensure!(rx > MIN_FRAMES, "only {rx} frames reached l4lb (expected more than {MIN_FRAMES})");
    Ok(counters)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "min / median / max" of durations, in ms.
fn summary(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = if sorted.len() % 2 == 1 {
        ms(sorted[sorted.len() / 2])
    } else {
        (ms(sorted[sorted.len() / 2 - 1]) + ms(sorted[sorted.len() / 2])) / 2.0
    };
    format!("min {:.1} ms, median {median:.1} ms, max {:.1} ms", ms(sorted[0]), ms(sorted[sorted.len() - 1]))
}

/// The run's seed: UNDER_LOAD_SEED, else a random one. Everything the
/// tests choose comes from it: destination sets, configurations, probes,
/// and the balancer's hash seed (`hash_seed_of`).
fn seed() -> u64 {
    std::env::var("UNDER_LOAD_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

/// The balancer's hash seed for a run's seed.
fn hash_seed_of(seed: u64) -> u32 {
    (mix64(seed ^ 0x6861_7368_5f73_6565) >> 32) as u32
}

/// The line that names a run's seeds: enough to repeat the run exactly.
fn print_seed(what: &str, seed: u64) {
    println!(
        "under_load: {what} from seed {seed}, the balancer's hash seed from it: {:#010x} (`l4lb attach --seed {:#010x}`); UNDER_LOAD_SEED={seed} repeats the run",
        hash_seed_of(seed),
        hash_seed_of(seed)
    );
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- tests

fn hundred_map_updates_under_flood() -> TestResult {
    let _serial = serial();
    let seed = seed();
    print_seed("destination sets", seed);
    let topo = Topology::new(hash_seed_of(seed), None)?;
    let mut sets = Sets::new(seed);

    // The first fill, before the flood: frames must never meet an empty table.
    let first = sets.fresh(32, &BTreeSet::new());
    let mut set: Vec<Destination> = sets.make(&first);
    let empty = topo.snapshot()?;
    topo.l4lb_many(&[topo.map_args("initial.csv", &set)?])?.remove(0).success()?;
    let mut state = topo.snapshot()?;
    check_map_update("initial fill", &empty, &set, &state)?;
    let maps = topo.open_maps()?;

    let mut flood = Flood::start(&topo, &MAP_FLOOD_KINDS)?;
    let mut times = Vec::new();
    let mut during = Vec::new();
    let mut sizes = Vec::new();
    let mut kinds: BTreeMap<Change, usize> = BTreeMap::new();
    let mut churn = Churn::default();
    let updates_started = Instant::now();
    let rx_at_start = counter(&maps.read_counters()?, "rx");
    for k in 1..=UPDATES {
        let (next, change) = sets.next(&set, k);
        let what = format!("update {k} ({change:?}, {} -> {} destinations)", set.len(), next.len());
        let args = topo.map_args(&format!("update-{k}.csv"), &next)?;
        let (run, frames) = run_under_flood(&topo, &maps, &mut flood, &what, args)?;

        let next_state = topo.snapshot()?;
        let (plan, c) = check_map_update(&what, &state, &next, &next_state)?;
        let line = map_summary(&topo.lb_dev, &plan, &next);
        ensure!(
            run.stdout.lines().any(|l| l == line),
            "{what}: `l4lb map` printed\n{}\nexpected the line\n{line}",
            run.stdout
        );
        churn.add(&c);
        times.push(run.elapsed);
        during.push(frames);
        sizes.push(next.len());
        *kinds.entry(change).or_default() += 1;
        state = next_state;
        set = next;
    }
    let updates_took = updates_started.elapsed();
    let rx_during_updates = counter(&maps.read_counters()?, "rx") - rx_at_start;
    let ran = flood.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    let counters = check_final_counters(&topo)?;
    let (sent, sunk) = (flood.sent(), flood.sunk()?);

    let in_updates: u64 = during.iter().sum();
    println!("under_load: {UPDATES} `l4lb map` updates under flood in {:.2} s: {kinds:?}", updates_took.as_secs_f64());
    println!("  set sizes: {sizes:?}");
    println!("  update times (process start to exit): {}", summary(&times));
    println!(
        "  slots written in all: {} ({:.0} per update); slots of staying destinations that changed hands: {} of {} ({:.1}%)",
        churn.written,
        churn.written as f64 / UPDATES as f64,
        churn.moved,
        churn.staying,
        100.0 * churn.moved as f64 / churn.staying.max(1) as f64
    );
    println!(
        "  slots in transition (every slot word as docs/transitions.md makes it, checked after every update): {} put in transition, {} changed again in transition, the tick stamped {} times, at most {} of {MAGLEV_SIZE} in transition at once, {} at the end",
        churn.transitions.started,
        churn.transitions.changed_again,
        churn.transitions.stamped,
        churn.transitions.slots,
        state.running.service(&ServiceKey::CatchAll).map_or(0, |s| s.transitions.len())
    );
    println!(
        "  frames reaching l4lb while an update ran: {in_updates} in all, per update min {} / median {} / max {}",
        during.iter().min().unwrap_or(&0),
        {
            let mut d = during.clone();
            d.sort();
            d[d.len() / 2]
        },
        during.iter().max().unwrap_or(&0)
    );
    println!("  frames reaching l4lb during the {UPDATES} updates and checks: {rx_during_updates}");
    println!(
        "  flood: {:.2} s, generator sent {sent} ({:.2} Mpps), l4lb rx {}, back at the generator {sunk}",
        ran.as_secs_f64(),
        sent as f64 / ran.as_secs_f64() / 1e6,
        counters["rx"]
    );
    println!("  counters: {counters:?}");
    Ok(())
}

// ---------------------------------------------------------------- configurations under load

/// A backend of a generated configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GenBackend {
    addr: IpAddr,
    weight: u32,
    mac: Option<[u8; 6]>,
}

/// A configuration the apply test mutates step by step.
#[derive(Debug, Clone)]
struct GenConfig {
    gateway: u8,
    services: BTreeMap<ServiceKey, (bool, Vec<GenBackend>)>,
}

fn vip_key(addr: IpAddr, protocol: Protocol, port: u16) -> ServiceKey {
    ServiceKey::Vip { addr, protocol, port }
}

/// The services the flood's frames go to (Kind::dst / dport).
fn flood_keys() -> [ServiceKey; 5] {
    [
        ServiceKey::CatchAll,
        vip_key(frames::VIP4.into(), Protocol::Tcp, frames::TCP_PORT),
        vip_key(frames::VIP4.into(), Protocol::Udp, frames::UDP_PORT),
        vip_key(frames::VIP4_TO_6.into(), Protocol::Tcp, frames::TCP_PORT),
        vip_key(frames::VIP6.into(), Protocol::Tcp, frames::TCP_PORT),
    ]
}

impl GenConfig {
    /// Whether backends of `key` are IPv6 (IPv4 otherwise; the IPv4 VIP
    /// port 80 service mixes both).
    fn family(key: &ServiceKey, rng: &mut rand::rngs::StdRng) -> bool {
        match key {
            ServiceKey::CatchAll => false,
            ServiceKey::Vip { addr: IpAddr::V6(_), .. } => true,
            k if *k == flood_keys()[3] => true,
            k if *k == flood_keys()[1] => rng.gen_bool(0.25),
            _ => rng.gen_bool(0.5),
        }
    }

    fn new_backend(key: &ServiceKey, rng: &mut rand::rngs::StdRng) -> GenBackend {
        let n: u16 = rng.gen_range(1..250);
        let group = flood_keys().iter().position(|k| k == key).unwrap_or(9) as u8;
        let addr: IpAddr = if Self::family(key, rng) {
            Ipv6Addr::new(0x2001, 0xdb8, 0x88, u16::from(group), 0, 0, 0, n).into()
        } else {
            Ipv4Addr::new(10, 88, group, n as u8).into()
        };
        let mac = rng.gen_bool(0.5).then_some([0x02, 0x88, group, 0, (n >> 8) as u8, n as u8]);
        GenBackend { addr, weight: rng.gen_range(1..=3), mac }
    }

    fn new_service(key: ServiceKey, rng: &mut rand::rngs::StdRng) -> (bool, Vec<GenBackend>) {
        let mut backends: Vec<GenBackend> = Vec::new();
        for _ in 0..rng.gen_range(2..=12) {
            let b = Self::new_backend(&key, rng);
            if backends.iter().all(|x| x.addr != b.addr) {
                backends.push(b);
            }
        }
        let udp = !matches!(key, ServiceKey::Vip { protocol: Protocol::Tcp, .. });
        (!(udp && rng.gen_bool(0.3)), backends)
    }

    fn initial(rng: &mut rand::rngs::StdRng) -> Self {
        let services = flood_keys().into_iter().map(|k| (k, Self::new_service(k, rng))).collect();
        GenConfig { gateway: 1, services }
    }

    /// One step: backends added, removed and reweighted (0 = draining) in
    /// some services, now and then a service added or removed, a flood
    /// service taken away or given back, the gateway changed.
    fn mutate(&mut self, k: usize, rng: &mut rand::rngs::StdRng, taken: &mut Vec<ServiceKey>) -> String {
        let mut what = Vec::new();
        if k == 30 {
            return "the same file again".into();
        }
        let keys: Vec<ServiceKey> = self.services.keys().copied().collect();
        let count = rng.gen_range(1..=3);
        for key in keys.choose_multiple(rng, count).copied().collect::<Vec<_>>() {
            let (_, backends) = self.services.get_mut(&key).expect("present");
            match rng.gen_range(0..4) {
                0 if backends.len() < 24 => {
                    let b = Self::new_backend(&key, rng);
                    if backends.iter().all(|x| x.addr != b.addr) {
                        backends.push(b);
                        what.push(format!("{key}: + {}", b.addr));
                    }
                }
                1 if backends.len() > 1 => {
                    let i = rng.gen_range(0..backends.len());
                    let b = backends.remove(i);
                    what.push(format!("{key}: - {}", b.addr));
                }
                2 => {
                    let i = rng.gen_range(0..backends.len());
                    backends[i].weight = rng.gen_range(0..=4);
                    what.push(format!("{key}: {} weight {}", backends[i].addr, backends[i].weight));
                }
                _ => {
                    let i = rng.gen_range(0..backends.len());
                    backends[i].mac =
                        if backends[i].mac.is_some() { None } else { Some([0x02, 0x99, 0, 0, k as u8, i as u8]) };
                    what.push(format!("{key}: {} mac {:?}", backends[i].addr, backends[i].mac));
                }
            }
            // Some weight stays above 0: a service of draining backends only drops its traffic.
            if backends.iter().all(|b| b.weight == 0) {
                backends[0].weight = 1;
            }
        }
        let extras: Vec<ServiceKey> = self.services.keys().filter(|k| !flood_keys().contains(k)).copied().collect();
        if k.is_multiple_of(6) || extras.is_empty() && k % 6 == 3 {
            let key = if rng.gen_bool(0.5) {
                vip_key(
                    Ipv4Addr::new(203, 0, 113, rng.gen_range(1..200)).into(),
                    if rng.gen() { Protocol::Tcp } else { Protocol::Udp },
                    [0, 80, 443][rng.gen_range(0..3)],
                )
            } else {
                vip_key(
                    Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, rng.gen_range(1..200)).into(),
                    if rng.gen() { Protocol::Tcp } else { Protocol::Udp },
                    [0, 53, 443][rng.gen_range(0..3)],
                )
            };
            if let std::collections::btree_map::Entry::Vacant(entry) = self.services.entry(key) {
                entry.insert(Self::new_service(key, rng));
                what.push(format!("+ service {key}"));
            }
        } else if k % 6 == 3 {
            let key = *extras.choose(rng).expect("some extra");
            self.services.remove(&key);
            what.push(format!("- service {key}"));
        }
        if k % 10 == 5 {
            let key = flood_keys()[[0, 2, 3, 4][(k / 10) % 4]];
            self.services.remove(&key);
            taken.push(key);
            what.push(format!("- flood service {key}"));
        } else if k % 10 == 9 {
            for key in taken.drain(..) {
                let service = Self::new_service(key, rng);
                self.services.insert(key, service);
                what.push(format!("+ flood service {key} back"));
            }
        }
        if k % 15 == 7 {
            self.gateway = self.gateway.wrapping_add(1).max(1);
            what.push(format!("gateway 02:00:00:00:00:{:02x}", self.gateway));
        }
        what.join("; ")
    }

    fn text(&self) -> String {
        let mut out = format!(
            "# l4lb under_load apply test\n[global]\nsource_v4 = \"{LB_ADDR}\"\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:{:02x}\"\n",
            self.gateway
        );
        for (key, (hash_ports, backends)) in &self.services {
            out.push_str("\n[[service]]\n");
            match key {
                ServiceKey::CatchAll => out.push_str("vip = \"*\"\n"),
                ServiceKey::Vip { addr, protocol, port } => {
                    let _ = write!(out, "vip = \"{addr}\"\nprotocol = \"{}\"\nport = {port}\n", protocol.name());
                }
            }
            if !matches!(key, ServiceKey::Vip { protocol: Protocol::Tcp, .. }) {
                let _ = writeln!(out, "hash_ports = {hash_ports}");
            }
            out.push_str("backends = [\n");
            for b in backends {
                let _ = write!(out, "  {{ address = \"{}\", weight = {}", b.addr, b.weight);
                if let Some(m) = b.mac {
                    let _ = write!(out, ", mac = \"{}\"", config::format_mac(m));
                }
                out.push_str(" },\n");
            }
            out.push_str("]\n");
        }
        out
    }
}

/// The destinations of the probes: the flood's services, UDP to the
/// catch-all, and the VIP services of `model` (a port-0 VIP is probed on
/// port 4242).
fn probe_destinations(model: &Model) -> Vec<(IpAddr, u8, u16)> {
    let mut dsts: Vec<(IpAddr, u8, u16)> = FLOOD_KINDS
        .iter()
        .map(|kind| (kind.dst(), if kind.is_udp() { PROTO_UDP } else { PROTO_TCP }, kind.dport()))
        .collect();
    dsts.push((frames::NO_VIP.into(), PROTO_UDP, 5353));
    for s in &model.services {
        if let ServiceKey::Vip { addr, protocol, port } = s.key {
            let proto = if protocol == Protocol::Tcp { PROTO_TCP } else { PROTO_UDP };
            dsts.push((addr, proto, if port == 0 { 4242 } else { port }));
        }
    }
    dsts.sort();
    dsts.dedup();
    dsts
}

/// SYN probes (new connections) to the TCP destinations of `model`: flows
/// no probe used before (`fresh`), new ones for every apply, from the quiet
/// clients: a flood SYN in a slot in transition pins its flow, so no flood
/// frame may share a flow with them.
fn syn_probes(model: &Model, fresh: &mut FreshFlows, salt: u64) -> Vec<Probe> {
    let tcp: Vec<(IpAddr, u8, u16)> = probe_destinations(model).into_iter().filter(|d| d.1 == PROTO_TCP).collect();
    fresh.quiet_probes(&tcp, 24, salt)
}

/// The kernel's state after `l4lb apply` of `wanted`, checked without the
/// planner: the running configuration read back is the file's (what the
/// file leaves out, the hash seed and the MTU, as `kept` has them), and
/// every table is Maglev's for its backends and weights.
fn check_running(what: &str, got: &Snapshot, wanted: &Model, kept: &config::Global) -> TestResult {
    let mut expected = wanted.clone();
    expected.global.hash_seed = expected.global.hash_seed.or(kept.hash_seed);
    expected.global.mtu = expected.global.mtu.or(kept.mtu);
    same_configuration(what, &got.running, &expected)?;
    tables_are_maglev(what, &got.running)
}

/// Established-flow probes per destination (TCP segments with ACK and UDP
/// datagrams), sent before and after every apply.
const ESTABLISHED_PER_DESTINATION: usize = 16;

/// SYN probes through the datapath and the model (`running` at tick
/// `clock`): each goes to its slot's current backend, in transition or not
/// (what `predict` reads off the table), and the model says the same; in a
/// slot in transition it pins there (recorded in `pins`). Returns the
/// verdicts and how many pinned.
fn syn_verdicts(
    what: &str,
    program: &Program,
    flows: &mut FlowTable,
    running: &l4lb::state::Running,
    clock: u32,
    pins: &mut Pins,
    probes: &[Probe],
) -> TestResult<(Vec<Verdict>, usize)> {
    let mut pinned = 0;
    let verdicts = probes
        .iter()
        .map(|p| {
            flows.adopt_eviction(what, pins, running, p)?;
            let got = program.verdict(p)?;
            let want = predict(running, p);
            ensure!(got == want, "{what}: SYN {p:?}: the datapath says {got:?}, the table {want:?}");
            let model = predict_pinned(running, clock, pins, p, Segment::Syn);
            ensure!(model.verdict == want, "{what}: SYN {p:?}: the pin model says {model:?}, the table {want:?}");
            ensure!(
                matches!(model.rule, Rule::Syn | Rule::Steady | Rule::Passed),
                "{what}: SYN {p:?}: decided by {:?}",
                model.rule
            );
            pinned += usize::from(model.pinned.is_some());
            pins.record(&model);
            ensure!(!matches!(got, Verdict::Dropped(_)), "{what}: {p:?} was dropped");
            Ok(got)
        })
        .collect::<TestResult<Vec<_>>>()?;
    Ok((verdicts, pinned))
}

/// The backend address `probe`'s slot names in `running` (None: no
/// service, or the slot names none).
fn slot_address(running: &l4lb::state::Running, probe: &Probe) -> Option<(ServiceKey, Option<IpAddr>)> {
    let service = common::services::service_of(running, probe)?;
    Some((service.key, common::services::slot_backend(running, service, probe).map(|b| b.backend.addr)))
}

/// Whether the service `key` of `running` has a backend at `addr` (any weight).
fn has_backend(running: &l4lb::state::Running, key: ServiceKey, addr: IpAddr) -> bool {
    running.service(&key).is_some_and(|s| s.backends.iter().any(|b| b.backend.addr == addr))
}

/// The kernel's flow table (l4lb_flows, an LRU hash in driver mode) as
/// the test compares it with the model.
struct FlowTable {
    map: libbpf_rs::MapHandle,
    /// Pins of the model the LRU evicted (the flood pins in slots in
    /// transition faster than the table turns over), all of flows that no
    /// longer meet a slot in transition: none written or held in this
    /// apply's round of packets or the one before (that fails the test).
    evicted_idle: usize,
    /// Pins of probes still in use (written or held in this round of
    /// packets or the one before) that the LRU evicted all the same: the
    /// flood's pins in slots in transition can turn the table over in about
    /// a second (docs/transitions.md, "Bounds under attack"). The model
    /// forgets them; a flow that then goes elsewhere is counted as moved
    /// because its pin was evicted, never as moved otherwise.
    evicted_in_use: usize,
    /// Entries found equal to the model's pin, field for field.
    compared: usize,
}

impl FlowTable {
    fn entry(&self, what: &str, key: &PinKey) -> TestResult<Option<l4lb::bpf::FlowPin>> {
        Ok(self
            .map
            .lookup(l4lb::bpf::value_bytes(&key.kernel()), libbpf_rs::MapFlags::ANY)
            .map_err(|e| fail(format!("{what}: looking up {key:?} in l4lb_flows: {e}")))?
            .map(|bytes| l4lb::bpf::value_from::<l4lb::bpf::FlowPin>(&bytes).expect("value size checked")))
    }

    /// Before `probe` is sent to `running`: the kernel's entry under the
    /// key the datapath looks its flow up with is the model's pin, field
    /// for field, or gone (evicted) if no packet wrote or held it in this
    /// round or the one before: then the model forgets it too. (A lookup
    /// from user space does not mark an LRU entry used.) Returns the
    /// evicted pin.
    fn adopt_eviction(
        &mut self,
        what: &str,
        pins: &mut Pins,
        running: &l4lb::state::Running,
        probe: &Probe,
    ) -> TestResult<Option<common::services::Pin>> {
        let Some(key) = pin_key(running, probe) else { return Ok(None) };
        let Some(pin) = pins.get(&key).copied() else { return Ok(None) };
        match self.entry(what, &key)? {
            Some(entry) if pin.is(&entry) => Ok(None),
            Some(entry) => Err(fail(format!(
                "{what}: {probe:?}: l4lb_flows holds {} under {key:?}, the model {pin:?}",
                describe_entry(&entry)
            ))),
            None => {
                if pins.touched_lately(&key) {
                    self.evicted_in_use += 1;
                } else {
                    self.evicted_idle += 1;
                }
                pins.forget(&key);
                Ok(Some(pin))
            }
        }
    }

    /// After a round of packets: for the flow of each of `probes`, the
    /// entry under the key it is looked up with in `running` is the
    /// model's pin field for field (backend number, address, slot, tick),
    /// absent where the model has none; a pin written or held in this
    /// round is there, an older one may have been evicted (forgotten).
    fn check<'a>(
        &mut self,
        what: &str,
        pins: &mut Pins,
        running: &l4lb::state::Running,
        probes: impl Iterator<Item = &'a Probe>,
    ) -> TestResult {
        for p in probes {
            let Some(key) = pin_key(running, p) else { continue };
            match (pins.get(&key).copied(), self.entry(what, &key)?) {
                (None, None) => {}
                (Some(pin), Some(entry)) if pin.is(&entry) => self.compared += 1,
                (Some(_), None) => {
                    if pins.touched_this_round(&key) {
                        self.evicted_in_use += 1;
                    } else {
                        self.evicted_idle += 1;
                    }
                    pins.forget(&key);
                }
                (model, entry) => {
                    return Err(fail(format!(
                        "{what}: {p:?}: l4lb_flows holds {} under {key:?}, the model {model:?}{}",
                        entry.as_ref().map_or("nothing".to_string(), describe_entry),
                        if pins.touched_this_round(&key) { " (written or held in this round)" } else { "" }
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The model's key of a kernel flow key.
fn key_of(key: &l4lb::bpf::FlowKey) -> PinKey {
    let addr = |a: &[u8; 16]| -> IpAddr {
        if key.family == 6 {
            IpAddr::from(*a)
        } else {
            IpAddr::from(<[u8; 4]>::try_from(&a[..4]).expect("4 bytes"))
        }
    };
    let [a, b, c, d] = key.ports.to_ne_bytes();
    PinKey {
        src: addr(&key.saddr),
        dst: addr(&key.daddr),
        sport: u16::from_be_bytes([a, b]),
        dport: u16::from_be_bytes([c, d]),
        proto: key.proto,
    }
}

/// The established probes' bookkeeping: for each probe the (service,
/// backend address) it was last balanced to (None: never, or passed
/// since: no contract holds then), and the figures.
#[derive(Default)]
struct Established {
    probes: Vec<Probe>,
    destinations: BTreeSet<(IpAddr, u8, u16)>,
    balanced: HashMap<Probe, (ServiceKey, IpAddr)>,
    /// Probes sent after the applies; of those: kept their backend, moved
    /// because their backend left its service, moved because another
    /// service now takes them, balanced for the first time (or the first
    /// since being passed), passed.
    sent: usize,
    kept: usize,
    left: usize,
    other_service: usize,
    first: usize,
    passed: usize,
    /// Kept their backend although their slot changed hands in the apply
    /// while that backend stayed (what the table alone would have moved).
    saved_from_churn: usize,
    /// Kept their backend although their slot's current backend is another one.
    kept_off_table: usize,
    /// Moved although their backend stayed, because the LRU evicted their
    /// pin under the flood (`FlowTable::evicted_in_use`).
    moved_pin_evicted: usize,
    /// The rule that decided each kept one.
    kept_by: BTreeMap<Rule, usize>,
    /// The rule that decided each one sent after an apply.
    rules: BTreeMap<Rule, usize>,
}

impl Established {
    /// Adds probes for destinations not seen before (flows no probe used
    /// before: `fresh`; quiet clients: no flood frame shares their flows).
    fn extend(&mut self, model: &Model, fresh: &mut FreshFlows, salt: u64) {
        let new: Vec<(IpAddr, u8, u16)> =
            probe_destinations(model).into_iter().filter(|d| !self.destinations.contains(d)).collect();
        self.destinations.extend(new.iter().copied());
        self.probes.extend(fresh.quiet_probes(&new, ESTABLISHED_PER_DESTINATION, salt));
    }

    /// Sends every probe as an established segment through the program and
    /// the model (`running` at tick `clock`): the datapath must do exactly
    /// what the model says, and a flow whose backend is still in the
    /// service that balanced it (same address, any weight) stays with it.
    /// `before`: the state right before the apply that made `running`
    /// (then the outcomes are counted); None: nothing changed since the
    /// last send.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        what: &str,
        program: &Program,
        flows: &mut FlowTable,
        pins: &mut Pins,
        running: &l4lb::state::Running,
        clock: u32,
        before: Option<&l4lb::state::Running>,
    ) -> TestResult {
        for p in &self.probes {
            let evicted = flows.adopt_eviction(what, pins, running, p)?;
            let prediction: Prediction = predict_pinned(running, clock, pins, p, Segment::Established);
            let got = program.verdict_as(p, Segment::Established)?;
            let now = balanced_by(running, p);
            let last = self.balanced.get(p).copied();
            // The contract: a flow whose backend is still in the service
            // that balanced it (same address, any weight) stays with it.
            let stays =
                last.filter(|&(key, addr)| now.is_some_and(|s| s.key == key) && has_backend(running, key, addr));
            // A flow whose pin the flood's pins evicted takes its slot's
            // rule again (checked against the model below): counted apart.
            let moved_by_eviction = evicted.is_some() && stays.is_some_and(|(_, addr)| got != Verdict::Backend(addr));
            if let (Some((key, addr)), false) = (stays, moved_by_eviction) {
                ensure!(
                    got == Verdict::Backend(addr),
                    "{what}: established {p:?} moved otherwise: balanced to {addr} by {key}, which still has it, but the datapath says {got:?} (its slot: {:?}; pin model: {prediction:?}{})",
                    probe_slot(running, p),
                    evicted.map_or(String::new(), |pin| format!("; the LRU evicted its pin {pin:?}"))
                );
            }
            ensure!(
                got == prediction.verdict,
                "{what}: established {p:?}: the datapath says {got:?}, the pin model {prediction:?}"
            );
            ensure!(!matches!(got, Verdict::Dropped(_)), "{what}: established {p:?} was dropped");
            pins.record(&prediction);
            if let Some(before) = before {
                self.sent += 1;
                *self.rules.entry(prediction.rule).or_default() += 1;
                match (got, last, stays) {
                    (Verdict::Pass, ..) => self.passed += 1,
                    _ if moved_by_eviction => self.moved_pin_evicted += 1,
                    (_, _, Some((key, addr))) => {
                        self.kept += 1;
                        *self.kept_by.entry(prediction.rule).or_default() += 1;
                        let slot_now = slot_address(running, p).and_then(|s| s.1);
                        self.kept_off_table += usize::from(slot_now != Some(addr));
                        // The slot's backend before the apply was still in the service with the same address after it.
                        let slot_before = slot_address(before, p).filter(|s| s.0 == key).and_then(|s| s.1);
                        let stayed = slot_before.is_some_and(|b| has_backend(running, key, b));
                        self.saved_from_churn += usize::from(slot_before != slot_now && stayed);
                    }
                    (_, None, _) => self.first += 1,
                    (_, Some((key, _)), None) if now.is_some_and(|s| s.key != key) => self.other_service += 1,
                    (_, Some(_), None) => self.left += 1,
                }
            }
            match (got, now) {
                (Verdict::Backend(addr), Some(s)) => {
                    self.balanced.insert(*p, (s.key, addr));
                }
                _ => {
                    self.balanced.remove(p);
                }
            }
        }
        Ok(())
    }
}

/// The SYN probes' figures: each SYN sent before and after its apply, its
/// ACK after the apply and before the second SYN.
#[derive(Default)]
struct Handshakes {
    flows: usize,
    /// SYNs (before, after the apply) that pinned: their slot was in transition.
    pinned_before: usize,
    pinned_after: usize,
    /// SYNs after the apply whose two SYNs went to different backends;
    /// of those: the slot's backend changed (all of them); the old one
    /// stayed unchanged in the service (Maglev's extra churn).
    moved: usize,
    moved_slot: usize,
    kept_slot_moved: usize,
    /// ACKs to the backend that answered the SYN, still in the service
    /// that balanced it; of those: in a slot the apply put in transition
    /// (its previous backend), through the SYN's pin (its slot was in
    /// transition already), in a steady slot.
    ack_kept: usize,
    ack_previous: usize,
    ack_pin: usize,
    ack_steady: usize,
    /// ACKs whose SYN's backend left the service, or whose flow another
    /// service (or none) takes now.
    ack_left: usize,
    ack_other_service: usize,
    /// ACKs whose SYN's pin the LRU evicted under the flood before them.
    ack_pin_evicted: usize,
}

fn apply_updates_under_flood() -> TestResult {
    let _serial = serial();
    let seed = seed();
    print_seed("configurations", seed);
    let topo = Topology::new(hash_seed_of(seed), Some(APPLY_FLOW_ENTRIES))?;
    // What the files leave out stays as `l4lb attach` set it: the hash
    // seed given, the MTU of the device.
    let attached = topo.snapshot()?;
    ensure!(
        attached.running.global.hash_seed == Some(topo.hash_seed),
        "attached with --seed {:#010x}, the running hash seed is {:?}",
        topo.hash_seed,
        attached.running.global.hash_seed
    );
    let kept = config::Global {
        hash_seed: Some(topo.hash_seed),
        mtu: attached.running.global.mtu,
        ..config::Global::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut gen = GenConfig::initial(&mut rng);
    let text = gen.text();
    let initial = config::parse("initial.toml", text.as_bytes())
        .map_err(|e| fail(format!("the initial configuration: {e:#}\n{text}")))?;
    topo.l4lb_many(&[topo.apply_args("initial.toml", &text)?])?.remove(0).success()?;
    let maps = topo.open_maps()?;
    let mut flows = FlowTable { map: topo.open_flows()?, evicted_idle: 0, evicted_in_use: 0, compared: 0 };
    let program = topo.program()?;
    let mut state = maps.read_snapshot()?;
    check_running("the initial apply", &state, &initial, &kept)?;
    // Every probe's flow is new to the balancer when first sent: SYN
    // probes new for every apply, established ones new for their
    // destination, none of them a flow another one used, none a flow of
    // the flood.
    let mut fresh = FreshFlows::default();
    let probe_salt = mix64(seed);

    let mut flood = Flood::start(&topo, &FLOOD_KINDS)?;
    let mut taken = Vec::new();
    let mut times = Vec::new();
    let mut slots = Vec::new();
    let mut hs = Handshakes::default();
    // From the first SYN before an apply to the last ACK after it.
    let mut handshake_windows = Vec::new();
    let mut transitions = TransitionCount::default();
    let mut pins = Pins::default();
    let mut established = Established::default();
    let mut services_seen = BTreeSet::new();
    let flow_counters =
        |c: &[u64]| (counter(c, "flow_pinned"), counter(c, "flow_repinned"), counter(c, "flow_table_full"));
    let flow_before = flow_counters(&maps.read_counters()?);
    let started = Instant::now();
    for k in 1..=APPLIES {
        let change = gen.mutate(k, &mut rng, &mut taken);
        let text = gen.text();
        let wanted =
            config::parse("generated.toml", text.as_bytes()).map_err(|e| fail(format!("update {k}: {e:#}\n{text}")))?;
        let what = format!("apply {k} ({change})");
        let clock = state.config.clock;
        pins.start_round();
        let round_started = Instant::now();
        let probes = syn_probes(&wanted, &mut fresh, probe_salt.wrapping_add(k as u64));
        let (before_verdicts, pinned) =
            syn_verdicts(&format!("{what}, before"), &program, &mut flows, &state.running, clock, &mut pins, &probes)?;
        hs.pinned_before += pinned;
        // Destinations of this apply's services too: their probes go to
        // the catch-all (or are passed) until the apply, to the new service after it.
        established.extend(&wanted, &mut fresh, probe_salt.wrapping_add(k as u64));
        established.send(&format!("{what}, before"), &program, &mut flows, &mut pins, &state.running, clock, None)?;

        let args = topo.apply_args(&format!("update-{k}.toml"), &text)?;
        let (run, _frames) = run_under_flood(&topo, &maps, &mut flood, &what, args)?;
        let next = maps.read_snapshot()?;
        // Planned at the process's tick (the clock shows it when slots went in transition).
        let plan = plan_as_applied(&state, &wanted, &next)?;
        let expected_out = if plan.is_empty() {
            "no changes\n".to_string()
        } else {
            format!(
                "{}{}: applied ({} map writes, {} table slots)\n",
                plan.diff,
                topo.lb_dev,
                plan.writes(),
                plan.slots_written()
            )
        };
        ensure!(run.stdout == expected_out, "{what}: `l4lb apply` printed\n{}\nexpected\n{expected_out}", run.stdout);
        ensure!(k != 30 || plan.is_empty(), "{what}: the same file planned writes");
        same_snapshot(&what, &next, &plan.after)?;
        // Not only the planner's own prediction: the configuration read
        // back is the file's, every table Maglev's, every slot word what
        // the design makes of the one before.
        check_running(&what, &next, &wanted, &kept)?;
        let t = transitions_as_designed(&what, &state.running, &next.running, next.config.clock)?;
        transitions.slots = transitions.slots.max(t.slots);
        transitions.started += t.started;
        transitions.changed_again += t.changed_again;
        transitions.stamped += t.stamped;
        let clock = next.config.clock;
        established.send(
            &format!("{what}, after"),
            &program,
            &mut flows,
            &mut pins,
            &next.running,
            clock,
            Some(&state.running),
        )?;

        // The ACK of each SYN sent before the apply, now: the handshake
        // window is closed. The backend that answered the SYN gets it
        // while it is in the service that balanced the SYN: in a slot the
        // apply put in transition it is the previous backend (rule 4), in
        // one in transition before the SYN's pin holds.
        for (i, p) in probes.iter().enumerate() {
            let evicted = flows.adopt_eviction(&format!("{what}, ACK"), &mut pins, &next.running, p)?;
            let model = predict_pinned(&next.running, clock, &pins, p, Segment::Established);
            let got = program.verdict_as(p, Segment::Established)?;
            ensure!(
                got == model.verdict,
                "{what}: ACK {p:?} after the apply: the datapath says {got:?}, the pin model {model:?}"
            );
            let (syn_at, ack_at) = (probe_slot(&state.running, p), probe_slot(&next.running, p));
            match (before_verdicts[i], syn_at, ack_at) {
                // Its pin evicted by the flood's pins: the slot's rule again
                // (the model's verdict, checked above), counted apart.
                (Verdict::Backend(a), Some((k0, _)), Some((k1, _)))
                    if k0 == k1
                        && has_backend(&next.running, k1, a)
                        && evicted.is_some()
                        && got != Verdict::Backend(a) =>
                {
                    hs.ack_pin_evicted += 1
                }
                (Verdict::Backend(a), Some((k0, was)), Some((k1, now)))
                    if k0 == k1 && has_backend(&next.running, k1, a) =>
                {
                    ensure!(
                        got == Verdict::Backend(a),
                        "{what}: ACK {p:?}: its SYN before the apply went to {a} of {k0}, still in the service, the ACK after it to {got:?} (slot {was:?} -> {now:?}; pin model {model:?})"
                    );
                    hs.ack_kept += 1;
                    if let (Some(SlotAddr::Steady(x)), Some(SlotAddr::Transition { previous, .. })) = (was, now) {
                        ensure!(
                            x == a && previous == a && model.rule == Rule::Previous,
                            "{what}: ACK {p:?}: the apply put its slot (steady {x}) in transition {now:?}; the SYN went to {a}, the ACK to {got:?} ({:?})",
                            model.rule
                        );
                        hs.ack_previous += 1;
                    }
                    hs.ack_pin += usize::from(model.rule == Rule::Held);
                    hs.ack_steady += usize::from(model.rule == Rule::Steady);
                }
                (Verdict::Backend(_), Some((k0, _)), Some((k1, _))) if k0 == k1 => hs.ack_left += 1,
                _ => hs.ack_other_service += 1,
            }
            pins.record(&model);
        }
        handshake_windows.push(round_started.elapsed());
        // The same SYNs again: the new tables' current backends, pinned
        // (over the ACK's pin) in slots in transition.
        let (after_verdicts, pinned) =
            syn_verdicts(&format!("{what}, after"), &program, &mut flows, &next.running, clock, &mut pins, &probes)?;
        hs.pinned_after += pinned;
        // A new connection changes backend only when its slot's backend
        // changed (or its service did): the tables before and after say which.
        for (i, p) in probes.iter().enumerate() {
            let (old, new) = (slot_address(&state.running, p), slot_address(&next.running, p));
            hs.flows += 1;
            if before_verdicts[i] != after_verdicts[i] {
                hs.moved += 1;
                ensure!(
                    old != new,
                    "{what}: {p:?} moved {:?} -> {:?} although its slot still names {old:?}",
                    before_verdicts[i],
                    after_verdicts[i]
                );
                hs.moved_slot += 1;
                // Maglev's extra churn: the old backend is still in the service with its weight.
                if let (Some((ko, Some(a))), Some((kn, _))) = (old, new) {
                    let still = next.running.service(&kn).is_some_and(|s| {
                        ko == kn
                            && s.backends.iter().any(|b| {
                                b.backend.addr == a
                                    && state
                                        .running
                                        .service(&ko)
                                        .is_some_and(|o| o.backends.iter().any(|ob| ob.backend == b.backend))
                            })
                    });
                    hs.kept_slot_moved += usize::from(still);
                }
            }
        }
        // The flow table holds exactly the model's pins for every probe's flow.
        flows.check(&format!("{what}, after"), &mut pins, &next.running, established.probes.iter().chain(&probes))?;
        for s in &next.running.services {
            services_seen.insert(s.key);
        }
        times.push(run.elapsed);
        slots.push(plan.slots_written());
        state = next;
    }
    let took = started.elapsed();
    let flow_after = flow_counters(&maps.read_counters()?);
    let ran = flood.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    let counters = check_final_counters(&topo)?;
    // The whole flow table: the quiet clients' entries are the model's pins, all of them.
    let (mut total, mut quiet) = (0usize, 0usize);
    let mut wrong: Vec<String> = Vec::new();
    l4lb::maps::walk_flows(&flows.map, |key, entry| {
        total += 1;
        let key = key_of(key);
        if !quiet_client(key.src) {
            return;
        }
        quiet += 1;
        if !pins.get(&key).is_some_and(|pin| pin.is(entry)) && wrong.len() < 5 {
            wrong.push(format!("{key:?}: {} (model: {:?})", describe_entry(entry), pins.get(&key)));
        }
    })
    .map_err(|e| fail(format!("walking l4lb_flows: {e:#}")))?;
    ensure!(
        wrong.is_empty(),
        "after the applies, l4lb_flows holds entries of the probes' flows that the model has not: {}",
        wrong.join("; ")
    );
    // The model's pins the walk did not meet: evicted (not looked up by the probes since).
    let unseen = pins.len() - quiet;

    let v6 = services_seen.iter().filter(|k| matches!(k, ServiceKey::Vip { addr: IpAddr::V6(_), .. })).count();
    println!(
        "under_load: {APPLIES} `l4lb apply` updates under flood in {:.2} s ({} services seen, {v6} of them IPv6)",
        took.as_secs_f64(),
        services_seen.len()
    );
    println!("  apply times (process start to exit): {}", summary(&times));
    let mut sorted = slots.clone();
    sorted.sort();
    println!(
        "  table slots written per apply: min {} / median {} / max {}",
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    println!(
        "  slots in transition (every slot word as docs/transitions.md makes it, checked after every apply): {} put in transition, {} changed again in transition, a service's tick stamped {} times, at most {} slots in transition at once",
        transitions.started, transitions.changed_again, transitions.stamped, transitions.slots
    );
    let e = &established;
    println!(
        "  established probes ({} flows to {} destinations, TCP ACK and UDP, sent before and after every apply): {} after the applies; kept their backend {}, moved because their backend left {}, moved because another service took them {}, moved because the flood's pins evicted theirs {}, balanced for the first time {}, passed (no service) {}, moved otherwise 0",
        e.probes.len(),
        e.destinations.len(),
        e.sent,
        e.kept,
        e.left,
        e.other_service,
        e.moved_pin_evicted,
        e.first,
        e.passed
    );
    println!(
        "  of those kept: {} had their slot change hands in the apply while their backend stayed (the table alone would have moved them), {} were off their slot's current backend; decided by {:?}",
        e.saved_from_churn, e.kept_off_table, e.kept_by
    );
    println!("  rules that decided the established probes after the applies: {:?}", e.rules);
    println!(
        "  SYN probes (new every apply, {} flows used by all probes, none twice): {}; pinned (slot in transition) before the apply {}, after it {}; changed backend: {} (all where the slot's backend changed: {}; of those, the old backend stayed unchanged in the service: {})",
        fresh.len(),
        hs.flows,
        hs.pinned_before,
        hs.pinned_after,
        hs.moved,
        hs.moved_slot,
        hs.kept_slot_moved
    );
    println!(
        "  their ACKs after the apply: to the backend that answered the SYN, still in the service: {} of {} (in a slot the apply put in transition, its previous backend: {}; through the SYN's pin: {}; steady slot: {}), the SYN's backend left {}, another service or none takes the flow {}, elsewhere because the flood's pins evicted the SYN's {}",
        hs.ack_kept,
        hs.flows,
        hs.ack_previous,
        hs.ack_pin,
        hs.ack_steady,
        hs.ack_left,
        hs.ack_other_service,
        hs.ack_pin_evicted
    );
    println!("  from the SYNs before an apply to their ACKs after it: {}", summary(&handshake_windows));
    println!("  after every apply, the running configuration read back was the file's and every table Maglev's for its backends");
    println!(
        "  flow table during the applies: {} flows pinned, {} re-pinned, {} refused (table full); the model's pins: {} ({} entries matched field for field after the applies); evicted by the LRU under the flood: {} pins of flows no longer looked up, {} of flows the probes still used, {unseen} more found gone at the end, when {quiet} of its {total} entries were the probes' (all as the model says)",
        flow_after.0 - flow_before.0,
        flow_after.1 - flow_before.1,
        flow_after.2 - flow_before.2,
        pins.len(),
        flows.compared,
        flows.evicted_idle,
        flows.evicted_in_use
    );
    println!("  flood: {:.2} s, generator sent {}, counters: {counters:?}", ran.as_secs_f64(), flood.sent());
    Ok(())
}

/// The (first, second) ticks two updates between the snapshots `before`
/// and `after` may have planned at. A tick shapes an update's result only
/// where it is stamped: into the clock and into the `changed` of a service
/// whose slots went into transition; a stamp the other update overwrote, or
/// none, leaves the final state the same whatever the tick was. So the
/// candidates are the stamps `after` holds within the round's seconds, and
/// the round's first second. (Every pair of seconds in between made the
/// search quadratic in the round's duration, two plans a pair: a clean-clone
/// CI run on a loaded machine was still in this test after 20 minutes.)
fn candidate_ticks(before: &Snapshot, after: &Snapshot) -> Vec<(u32, u32)> {
    let mut stamps: BTreeSet<u32> = after.running.services.iter().map(|s| s.changed).collect();
    stamps.insert(after.config.clock);
    stamps.insert(before.tick);
    stamps.retain(|t| (before.tick..=after.tick).contains(t));
    stamps.iter().flat_map(|&ta| stamps.iter().filter(move |&&tb| tb >= ta).map(move |&tb| (ta, tb))).collect()
}

fn concurrent_map_processes_are_serialised() -> TestResult {
    let _serial = serial();
    let seed = seed();
    print_seed("concurrent sets", seed);
    let topo = Topology::new(hash_seed_of(seed), None)?;
    let mut sets = Sets::new(seed);
    let first = sets.fresh(20, &BTreeSet::new());
    let mut set: Vec<Destination> = sets.make(&first);
    topo.l4lb_many(&[topo.map_args("initial.csv", &set)?])?.remove(0).success()?;
    let mut state = topo.snapshot()?;
    let mut flood = Flood::start(&topo, &MAP_FLOOD_KINDS)?;

    let mut orders = [0usize; 2];
    let mut times = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        // Two different files, each overlapping the current set and the
        // other, drawn until the two orders end differently.
        let end_of = |a: &[Destination], b: &[Destination]| -> TestResult<Snapshot> {
            Ok(plan_map(&plan_map(&state, a)?.after, b)?.after)
        };
        let mut draw = 0;
        let (one, two) = loop {
            let (one, _) = sets.next(&set, 2 * round + 1 + draw);
            let (two, _) = sets.next(&one, 2 * round + 2 + draw);
            if one != two && same_snapshot("", &end_of(&one, &two)?, &end_of(&two, &one)?).is_err() {
                break (one, two);
            }
            draw += 1;
            ensure!(draw < 50, "round {round}: no pair of files among 50 draws tells the orders apart");
        };
        // Started one right after the other, in turn in both orders.
        let mut args =
            vec![topo.map_args(&format!("c{round}-1.csv"), &one)?, topo.map_args(&format!("c{round}-2.csv"), &two)?];
        if round % 2 == 1 {
            args.reverse();
        }
        let mut runs = topo.l4lb_many(&args)?.into_iter().map(|r| r.success()).collect::<TestResult<Vec<_>>>()?;
        if round % 2 == 1 {
            runs.reverse();
        }
        // first_run: the process given `one`; second_run: the one given `two`.
        let (second_run, first_run) = (runs.pop().expect("two runs"), runs.pop().expect("two runs"));
        times.push(first_run.elapsed);
        times.push(second_run.elapsed);
        let after = topo.snapshot()?;

        // Either order, each update planned against the other's finished
        // state, each process at its own tick (between the readings around
        // the round; the later one's no earlier).
        let mut matched = None;
        let ticks = candidate_ticks(&state, &after);
        'orders: for (order, (a, b, a_run, b_run)) in
            [(&one, &two, &first_run, &second_run), (&two, &one, &second_run, &first_run)].into_iter().enumerate()
        {
            for &(ta, tb) in &ticks {
                let middle_plan = plan_at(&state, &map_wanted(&state, a), ta)?;
                let end_plan = plan_at(&middle_plan.after, &map_wanted(&middle_plan.after, b), tb)?;
                if same_snapshot("", &after, &end_plan.after).is_ok()
                    && a_run.stdout.contains(&map_summary(&topo.lb_dev, &middle_plan, a))
                    && b_run.stdout.contains(&map_summary(&topo.lb_dev, &end_plan, b))
                {
                    check_map_update(
                        &format!("round {round}, order {order}, second update"),
                        &middle_plan.after,
                        b,
                        &after,
                    )?;
                    // order 0: `one` applied first; started first on even rounds.
                    matched = Some((usize::from((order == 1) != (round % 2 == 1)), b.clone()));
                    break 'orders;
                }
            }
        }
        let Some((order, last)) = matched else {
            return Err(fail(format!(
                "round {round}: the final state and the outputs match neither order of the two updates (a mix?)\nfirst:\n{}\nsecond:\n{}",
                first_run.stdout, second_run.stdout
            )));
        };
        orders[order] += 1;
        state = after;
        set = last;
    }
    let ran = flood.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    let counters = check_final_counters(&topo)?;
    println!(
        "under_load: {CONCURRENT_ROUNDS} rounds of two concurrent `l4lb map` processes: both succeeded every time; first-started file applied first {} times, second-started first {} times",
        orders[0], orders[1]
    );
    println!("  process times: {}", summary(&times));
    println!("  flood: {:.2} s, generator sent {}, counters: {counters:?}", ran.as_secs_f64(), flood.sent());
    Ok(())
}
