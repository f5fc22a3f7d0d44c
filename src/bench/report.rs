//! The benchmark's numbers once measured: statistics over rounds, ratios to
//! the floors, nanoseconds added, and their rendering as text tables and
//! JSON. Pure: the measuring is in `live.rs`.

use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;

use super::frames::Kind;

/// l4lb's goal: this share of the encapsulation floor on every row.
pub const TARGET: f64 = 0.95;
/// What every row in steady state must reach (share of the encapsulation
/// floor, median of the rounds' ratios) ...
pub const MIN_STEADY: f64 = 0.90;
/// ... and every row measured right after a change.
pub const MIN_CHANGED: f64 = 0.85;
/// The tracked l4lb against the untracked one (median of the rounds' ratios):
/// in steady state tracking must cost (almost) nothing.
pub const MIN_TRACKED_SHARE: f64 = 0.97;

/// One row against its targets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TargetCheck {
    pub kind: Kind,
    /// Median share of the encapsulation floor, tracked (the default) and untracked.
    pub share: f64,
    pub untracked_share: f64,
    /// MIN_STEADY or MIN_CHANGED.
    pub minimum: f64,
    /// Median of the rounds' tracked / untracked ratios.
    pub tracked_over_untracked: f64,
    pub met: bool,
}

/// Minimum, median and maximum of a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// None for no values (or when a value is not a number).
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Summary { min: sorted[0], median, max: sorted[n - 1] })
    }
}

/// Nanoseconds per packet l4lb adds over a floor, from their rates in Mpps.
pub fn ns_added(l4lb_mpps: f64, floor_mpps: f64) -> f64 {
    1e3 / l4lb_mpps - 1e3 / floor_mpps
}

/// What l4lb's connection tracking did while one row was measured in one
/// round, from l4lb's own counters (the tracked instance): frames it sent
/// to backends, flows it pinned (new entries), pinned again, or could not pin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlowEvents {
    pub tx: u64,
    pub pinned: u64,
    pub repinned: u64,
    pub table_full: u64,
    /// Flows pinned while the row warmed up before it was measured (rows
    /// with a bounded set of flows: l4lb alone, until every flow had its pin).
    pub warmup_pinned: u64,
}

/// Throughput of one round: the four programs on the balancer's veth (the
/// encapsulation floor pushes the outer header the row's backends need: IPv4
/// or IPv6), frames
/// back at the generator per second of wall time, millions, measured with
/// the ring of frames on one CPU; and how busy that CPU was meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Round {
    /// l4lb as configured by default: every service tracks flows.
    pub l4lb: f64,
    /// Another l4lb with the same services, `track_flows = false`.
    pub l4lb_untracked: f64,
    pub plain: f64,
    pub encap: f64,
    /// Share of the measured time the ring's CPU was busy (/proc/stat:
    /// user, system, irq and softirq), the smallest of the programs'.
    /// Near 1: the path was CPU-bound and the wall-clock rates are its own.
    pub cpu_busy: f64,
    /// Share of the measured time the hypervisor took from that CPU (steal),
    /// the largest of the programs'.
    pub steal: f64,
    /// Share of the wall time the ring's CPU ran its softirq thread
    /// (ksoftirqd/N, where the ring runs once it is busy), the smallest of
    /// the four. Below `cpu_busy`: something else ran on that CPU, or the
    /// ring's softirq work ran at the end of interrupts.
    pub softirq_share: f64,
    /// Share of the wall time that thread was runnable but waited for its
    /// CPU (schedstat run_delay: another task had it), the largest of the
    /// four. Slices above 5% are measured again (up to 4 times).
    pub softirq_waited: f64,
    /// The tracked l4lb's counters over the row's measurement.
    pub flows: FlowEvents,
}

/// The rounds of one packet kind, summarised. Ratios and ns added are taken
/// per round (each compares programs measured seconds apart) and then
/// summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Throughput {
    pub rounds: Vec<Round>,
    pub l4lb_mpps: Summary,
    pub l4lb_untracked_mpps: Summary,
    pub plain_mpps: Summary,
    pub encap_mpps: Summary,
    pub ratio_plain: Summary,
    pub ratio_encap: Summary,
    /// The untracked l4lb's share of the encapsulation floor.
    pub ratio_encap_untracked: Summary,
    pub ns_added_over_encap: Summary,
    pub ns_added_over_encap_untracked: Summary,
    /// ns per packet the tracked l4lb takes beyond the untracked one (per
    /// round, from their rates): what connection tracking costs on the row.
    pub ns_tracking: Summary,
    pub cpu_busy: Summary,
    pub steal: Summary,
    pub softirq_share: Summary,
    pub softirq_waited: Summary,
}

impl Throughput {
    pub fn of(rounds: Vec<Round>) -> Option<Throughput> {
        let pick = |f: fn(&Round) -> f64| Summary::of(&rounds.iter().map(f).collect::<Vec<_>>());
        Some(Throughput {
            l4lb_mpps: pick(|r| r.l4lb)?,
            l4lb_untracked_mpps: pick(|r| r.l4lb_untracked)?,
            plain_mpps: pick(|r| r.plain)?,
            encap_mpps: pick(|r| r.encap)?,
            ratio_plain: pick(|r| r.l4lb / r.plain)?,
            ratio_encap: pick(|r| r.l4lb / r.encap)?,
            ratio_encap_untracked: pick(|r| r.l4lb_untracked / r.encap)?,
            ns_added_over_encap: pick(|r| ns_added(r.l4lb, r.encap))?,
            ns_added_over_encap_untracked: pick(|r| ns_added(r.l4lb_untracked, r.encap))?,
            ns_tracking: pick(|r| ns_added(r.l4lb, r.l4lb_untracked))?,
            cpu_busy: pick(|r| r.cpu_busy)?,
            steal: pick(|r| r.steal)?,
            softirq_share: pick(|r| r.softirq_share)?,
            softirq_waited: pick(|r| r.softirq_waited)?,
            rounds,
        })
    }
}

/// Per-packet times of the programs alone, ns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProgramTimes {
    pub l4lb: f64,
    pub l4lb_untracked: f64,
    pub plain: f64,
    pub encap: f64,
}

/// Everything measured for one packet kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindResult {
    pub kind: Kind,
    pub label: &'static str,
    /// The outer header l4lb and the encapsulation floor push: "IPv4" or "IPv6".
    pub outer: &'static str,
    pub frame_bytes: usize,
    pub throughput: Throughput,
    /// BPF_PROG_TEST_RUN, repeat = 1 in a loop, minus the same loop on an
    /// empty program.
    pub test_run_ns: ProgramTimes,
    /// The empty program's loop itself (what was subtracted).
    pub test_run_empty_ns: f64,
    /// run_time_ns / run_cnt from the kernel with bpf stats on, live traffic.
    pub run_time_ns: ProgramTimes,
}

/// Size of a loaded program: BPF instructions after the verifier, x86 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProgramSize {
    pub xlated_insns: u32,
    pub jited_bytes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProgramSizes {
    pub l4lb: ProgramSize,
    pub plain: ProgramSize,
    pub encap: ProgramSize,
    /// The IPv6 encapsulation floor.
    pub encap6: ProgramSize,
}

/// One service's traffic as l4lb counted it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePackets {
    pub service: String,
    pub number: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// l4lb's own counters after the run (checked: every frame seen was sent
/// back, no drop or pass counter moved, the services' packets add up).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L4lbCounts {
    pub rx: u64,
    pub tx: u64,
    /// Every other outcome counter that is not 0 (none, when the check passed).
    pub others: Vec<(String, u64)>,
    /// The connection-tracking events (flow_*: not outcomes), all of them.
    pub flow_events: Vec<(String, u64)>,
    pub services: Vec<ServicePackets>,
}

/// The control plane, one service of 512 backends, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlPlane {
    pub destinations: usize,
    /// The service applied to a fresh l4lb: read the maps, plan, write.
    pub fill_ms: Summary,
    pub fill_read_ms: Summary,
    pub fill_plan_ms: Summary,
    pub fill_apply_ms: Summary,
    /// Every backend replaced by another (every slot rewritten).
    pub replace_ms: Summary,
    /// One `l4lb stats` sample: backends, per-backend stats, counters.
    pub stats_sample_ms: Summary,
}

/// One variant of the variants phase (`--variants`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub what: &'static str,
    pub mpps: Summary,
    /// Per round, against the encapsulation floor of the same round.
    pub ratio_encap: Summary,
    pub ns_added_over_encap: Summary,
    pub size: ProgramSize,
}

/// l4lb's stages added one by one to the encapsulation floor, and l4lb with
/// one thing changed. The first row is the encapsulation floor itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variants {
    pub kind: Kind,
    pub rows: Vec<Variant>,
}

impl Variants {
    /// `rows`: (name, what, Mpps per round, size); row 0 is the floor.
    pub fn of(kind: Kind, rows: Vec<(&'static str, &'static str, Vec<f64>, ProgramSize)>) -> Option<Variants> {
        let floor = rows.first()?.2.clone();
        let rows = rows
            .into_iter()
            .map(|(name, what, mpps, size)| {
                let ratios: Vec<f64> = mpps.iter().zip(&floor).map(|(m, f)| m / f).collect();
                let added: Vec<f64> = mpps.iter().zip(&floor).map(|(&m, &f)| ns_added(m, f)).collect();
                Some(Variant {
                    name,
                    what,
                    mpps: Summary::of(&mpps)?,
                    ratio_encap: Summary::of(&ratios)?,
                    ns_added_over_encap: Summary::of(&added)?,
                    size,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Variants { kind, rows })
    }
}

/// The machine and the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Context {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub date: String,
    pub command: String,
    /// The CPU the ring of frames ran on.
    pub generator_cpu: usize,
    pub rounds: usize,
    pub seconds: f64,
    pub load_before: String,
    pub load_after: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Results {
    pub context: Context,
    pub target_share_of_encap_floor: f64,
    pub kinds: Vec<KindResult>,
    pub program_sizes: ProgramSizes,
    /// What enabling bpf stats adds to one program run, ns (measured).
    pub stats_overhead_ns: f64,
    pub control_plane: ControlPlane,
    /// The tracked l4lb's counters (the default configuration).
    pub l4lb_counts: L4lbCounts,
    /// The untracked l4lb's (the same services, `track_flows = false`).
    pub l4lb_untracked_counts: L4lbCounts,
    /// Entries of the l4lbs' LRU flow tables (`--flow-entries`, else attach's default).
    pub flow_entries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variants: Option<Variants>,
}

impl Results {
    /// Every row against its targets: MIN_STEADY (MIN_CHANGED right after a
    /// change) of the encapsulation floor, and in steady state the tracked
    /// l4lb at least MIN_TRACKED_SHARE of the untracked one.
    pub fn target_checks(&self) -> Vec<TargetCheck> {
        self.kinds
            .iter()
            .map(|k| {
                let t = &k.throughput;
                let minimum = if k.kind.changed() { MIN_CHANGED } else { MIN_STEADY };
                let ratios: Vec<f64> = t.rounds.iter().map(|r| r.l4lb / r.l4lb_untracked).collect();
                let tracked_over_untracked = Summary::of(&ratios).map_or(f64::NAN, |s| s.median);
                let tracking_ok = k.kind.changed() || tracked_over_untracked >= MIN_TRACKED_SHARE;
                TargetCheck {
                    kind: k.kind,
                    share: t.ratio_encap.median,
                    untracked_share: t.ratio_encap_untracked.median,
                    minimum,
                    tracked_over_untracked,
                    met: t.ratio_encap.median >= minimum && tracking_ok,
                }
            })
            .collect()
    }
}

fn range(s: &Summary, decimals: usize) -> String {
    format!("{:.d$} {:.d$} {:.d$}", s.min, s.median, s.max, d = decimals)
}

fn right_align(table: &mut Table, from: usize) {
    let columns = table.column_count();
    for column in from..columns {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn new_table(header: Vec<&str>) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::ASCII_MARKDOWN);
    table.set_header(header);
    table
}

/// The throughput table: Mpps (medians) and ratios (min median max).
pub fn throughput_table(results: &Results) -> Table {
    let mut table = new_table(vec![
        "packet",
        "outer",
        "l4lb Mpps",
        "plain floor Mpps",
        "encap floor Mpps",
        "l4lb / plain (min med max)",
        "l4lb / encap (min med max)",
        "ns added over encap (min med max)",
    ]);
    for k in &results.kinds {
        let t = &k.throughput;
        table.add_row(vec![
            k.label.to_string(),
            k.outer.to_string(),
            format!("{:.3}", t.l4lb_mpps.median),
            format!("{:.3}", t.plain_mpps.median),
            format!("{:.3}", t.encap_mpps.median),
            range(&t.ratio_plain, 3),
            range(&t.ratio_encap, 3),
            range(&t.ns_added_over_encap, 1),
        ]);
    }
    right_align(&mut table, 2);
    table
}

/// Connection tracking, row by row: the tracked l4lb (every service's
/// default) against the same services untracked, measured in the same rounds.
pub fn tracking_table(results: &Results) -> Table {
    let mut table = new_table(vec![
        "packet",
        "tracking does",
        "tracked / encap (min med max)",
        "untracked / encap (min med max)",
        "ns tracking adds (min med max)",
        "run_time ns tracked / untracked",
        "test_run ns tracked / untracked",
        "new pins per round (med)",
    ]);
    for k in &results.kinds {
        let t = &k.throughput;
        let pinned: Vec<f64> = t.rounds.iter().map(|r| r.flows.pinned as f64).collect();
        let warmup: Vec<f64> = t.rounds.iter().map(|r| r.flows.warmup_pinned as f64).collect();
        let median = |v: &[f64]| Summary::of(v).map_or(0.0, |s| s.median);
        let pins = match k.kind.flows() {
            Some(_) => format!("{:.0} (warm-up {:.0})", median(&pinned), median(&warmup)),
            None => format!("{:.0}", median(&pinned)),
        };
        table.add_row(vec![
            k.label.to_string(),
            k.kind.tracking().to_string(),
            range(&t.ratio_encap, 3),
            range(&t.ratio_encap_untracked, 3),
            range(&t.ns_tracking, 1),
            format!("{:.1} / {:.1}", k.run_time_ns.l4lb, k.run_time_ns.l4lb_untracked),
            format!("{:.1} / {:.1}", k.test_run_ns.l4lb, k.test_run_ns.l4lb_untracked),
            pins,
        ]);
    }
    right_align(&mut table, 2);
    table
}

/// The per-program times table: test_run and bpf stats, ns per packet.
pub fn program_table(results: &Results) -> Table {
    let mut table = new_table(vec![
        "packet",
        "test_run l4lb",
        "test_run plain",
        "test_run encap",
        "(empty loop)",
        "run_time l4lb",
        "run_time plain",
        "run_time encap",
    ]);
    for k in &results.kinds {
        table.add_row(vec![
            k.label.to_string(),
            format!("{:.1}", k.test_run_ns.l4lb),
            format!("{:.1}", k.test_run_ns.plain),
            format!("{:.1}", k.test_run_ns.encap),
            format!("{:.1}", k.test_run_empty_ns),
            format!("{:.1}", k.run_time_ns.l4lb),
            format!("{:.1}", k.run_time_ns.plain),
            format!("{:.1}", k.run_time_ns.encap),
        ]);
    }
    let s = &results.program_sizes;
    table.add_row(vec![
        "size (insns / x86 bytes)".to_string(),
        format!("{} / {}", s.l4lb.xlated_insns, s.l4lb.jited_bytes),
        format!("{} / {}", s.plain.xlated_insns, s.plain.jited_bytes),
        format!(
            "{} / {}, IPv6 {} / {}",
            s.encap.xlated_insns, s.encap.jited_bytes, s.encap6.xlated_insns, s.encap6.jited_bytes
        ),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    right_align(&mut table, 1);
    table
}

/// The variants table: what each stage of l4lb costs.
pub fn variants_table(variants: &Variants) -> Table {
    let mut table = new_table(vec![
        "program",
        "what it does",
        "Mpps (med)",
        "/ encap (min med max)",
        "ns over encap (med)",
        "insns / x86 bytes",
    ]);
    for row in &variants.rows {
        table.add_row(vec![
            row.name.to_string(),
            row.what.to_string(),
            format!("{:.3}", row.mpps.median),
            range(&row.ratio_encap, 3),
            format!("{:.1}", row.ns_added_over_encap.median),
            format!("{} / {}", row.size.xlated_insns, row.size.jited_bytes),
        ]);
    }
    right_align(&mut table, 2);
    table
}

pub fn control_table(results: &Results) -> Table {
    let c = &results.control_plane;
    let title = format!("control plane, one service of {} backends", c.destinations);
    let mut table = new_table(vec![title.as_str(), "ms (min med max)"]);
    let rows = [
        ("the service applied to a fresh l4lb", &c.fill_ms),
        ("  of which: read the maps", &c.fill_read_ms),
        ("  of which: apply::plan", &c.fill_plan_ms),
        ("  of which: apply::execute", &c.fill_apply_ms),
        ("replace all backends (every slot moves)", &c.replace_ms),
        ("stats refresh (one `l4lb stats` sample)", &c.stats_sample_ms),
    ];
    for (what, summary) in rows {
        table.add_row(vec![what.to_string(), range(summary, 2)]);
    }
    right_align(&mut table, 1);
    table
}

/// The whole text report.
pub fn render(results: &Results) -> String {
    let mut out = run_header(&results.context);
    out.push_str(&throughput_section(results));
    out.push_str(&ring_cpu_line(results));
    out.push_str(&target_lines(results));
    out.push_str(&tracking_section(results));
    out.push_str(&programs_section(results));
    out.push('\n');
    for (which, n) in [("l4lb's", &results.l4lb_counts), ("the untracked l4lb's", &results.l4lb_untracked_counts)] {
        out.push_str(&counters_line(which, n));
    }
    out.push('\n');
    out.push_str(&table_lines(&control_table(results)));
    if let Some(variants) = &results.variants {
        out.push_str(&variants_section(variants));
    }
    out
}

/// The machine, the kernel and how the rounds ran.
fn run_header(c: &Context) -> String {
    let mut out = format!("l4lb bench: {} CPUs ({}), kernel {}, {}\n", c.cpus, c.cpu, c.kernel, c.date);
    out.push_str(&format!(
        "{} rounds of {} s per program and packet kind, alternating; load average before: {}, after: {}\n\n",
        c.rounds, c.seconds, c.load_before, c.load_after
    ));
    out
}

/// What the throughput is, its table, and what each row's packets are.
fn throughput_section(results: &Results) -> String {
    let mut out = format!(
        "Throughput through the balancer's veth, Mpps: frames back at the generator per wall-clock second. The ring of\n\
         frames runs on CPU {} and keeps it busy; the generator, both veths and the program all run there:\n",
        results.context.generator_cpu
    );
    out.push_str(&table_lines(&throughput_table(results)));
    out.push_str(
        "Rows (outer: the header l4lb pushes for the row's backends; its encapsulation floor pushes the same):\n",
    );
    for k in &results.kinds {
        out.push_str(&format!("  {:<15} {}\n", k.label, k.kind.describe()));
    }
    out
}

/// How busy the ring's CPU was over all rounds, and whether that makes the
/// rates understate the path; nothing without rounds.
fn ring_cpu_line(results: &Results) -> String {
    let all = |f: fn(&Round) -> f64| -> Vec<f64> {
        results.kinds.iter().flat_map(|k| k.throughput.rounds.iter().map(f)).collect()
    };
    let (Some(busy), Some(steal), Some(thread), Some(waited)) = (
        Summary::of(&all(|r| r.cpu_busy)),
        Summary::of(&all(|r| r.steal)),
        Summary::of(&all(|r| r.softirq_share)),
        Summary::of(&all(|r| r.softirq_waited)),
    ) else {
        return String::new();
    };
    format!(
        "CPU {} was busy {:.0}% to {:.0}% of the measured time (/proc/stat, softirq included), steal {:.0}% to {:.0}%;\n\
         its ksoftirqd ran {:.0}% to {:.0}% of it and waited for the CPU {:.1}% to {:.1}%{}.\n",
        results.context.generator_cpu,
        100.0 * busy.min,
        100.0 * busy.max,
        100.0 * steal.min,
        100.0 * steal.max,
        100.0 * thread.min,
        100.0 * thread.max,
        100.0 * waited.min,
        100.0 * waited.max,
        match (busy.min < 0.95, waited.max > 0.05) {
            (true, _) => " (below 95% busy: the path was not CPU-bound there, those rates understate it)",
            (false, true) => " (other tasks took the ring's CPU: those rounds' rates understate the path)",
            _ => "",
        }
    )
}

/// One line per packet kind: its share of the encapsulation floor against the target.
fn target_lines(results: &Results) -> String {
    let mut out = String::new();
    for c in results.target_checks() {
        let tracking = if c.kind.changed() {
            String::new()
        } else {
            format!(", tracked / untracked {:.3} (at least {MIN_TRACKED_SHARE:.2})", c.tracked_over_untracked)
        };
        out.push_str(&format!(
            "target: {:<15} {:.3} of the encapsulation floor (at least {:.2}, goal {TARGET:.2}){tracking}: {}; untracked {:.3}\n",
            c.kind.label(),
            c.share,
            c.minimum,
            if c.met { "met" } else { "NOT met" },
            c.untracked_share
        ));
    }
    out
}

/// What connection tracking costs: how it was measured, and its table.
fn tracking_section(results: &Results) -> String {
    let mut out = format!(
        "\nConnection tracking: l4lb above is l4lb as configured by default (every service tracks flows: an LRU hash\n\
         of {} flows); untracked is a second l4lb with the same services and track_flows = false, measured in\n\
         the same rounds against the same floors. ns tracking adds: per packet, tracked minus untracked, per round.\n",
        results.flow_entries
    );
    out.push_str(&table_lines(&tracking_table(results)));
    out
}

/// The programs' own time per packet: how it was measured, and its table.
fn programs_section(results: &Results) -> String {
    let mut out = String::from(
        "\nThe programs alone, ns per packet (test_run: repeat = 1 in a loop, minus the empty program's loop;\n",
    );
    out.push_str(&format!(
        "run_time: run_time_ns / run_cnt with bpf stats on, live traffic; enabling the stats adds about {:.0} ns per run):\n",
        results.stats_overhead_ns
    ));
    out.push_str(&table_lines(&program_table(results)));
    out
}

/// An l4lb's counters after the run: outcomes, flow events and packets per service.
fn counters_line(which: &str, n: &L4lbCounts) -> String {
    format!(
        "{which} counters after the run: rx {}, tx {}{}; {}; per service: {}\n",
        n.rx,
        n.tx,
        if n.others.is_empty() {
            ", no pass or drop counter moved".to_string()
        } else {
            n.others.iter().map(|(name, c)| format!(", {name} {c}")).collect::<String>()
        },
        n.flow_events.iter().map(|(name, c)| format!("{name} {c}")).collect::<Vec<_>>().join(", "),
        n.services.iter().map(|s| format!("{} {}", s.service, s.packets)).collect::<Vec<_>>().join(", ")
    )
}

/// What each variant of the program costs, against the encapsulation floor.
fn variants_section(variants: &Variants) -> String {
    let mut out = format!(
        "\nWhat costs what ({}, programs measured in turn like the rounds above, ratios per round to the encapsulation floor):\n",
        variants.kind.label()
    );
    out.push_str(&table_lines(&variants_table(variants)));
    out
}

fn table_lines(table: &Table) -> String {
    table.lines().map(|line| format!("{}\n", line.trim_end())).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn summary_takes_min_median_max() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]), Some(Summary { min: 1.0, median: 2.0, max: 3.0 }));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]), Some(Summary { min: 1.0, median: 2.5, max: 4.0 }));
        assert_eq!(Summary::of(&[5.0]), Some(Summary { min: 5.0, median: 5.0, max: 5.0 }));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ns_added_is_the_difference_of_packet_times() {
        // 4 Mpps = 250 ns per packet, 5 Mpps = 200 ns.
        assert!((ns_added(4.0, 5.0) - 50.0).abs() < 1e-9);
        assert!((ns_added(5.0, 5.0)).abs() < 1e-9);
        assert!(ns_added(5.0, 4.0) < 0.0, "faster than the floor: negative");
    }

    fn round(l4lb: f64, plain: f64, encap: f64) -> Round {
        Round {
            l4lb,
            l4lb_untracked: l4lb * 1.25,
            plain,
            encap,
            cpu_busy: 0.99,
            steal: 0.0,
            softirq_share: 0.97,
            softirq_waited: 0.01,
            flows: FlowEvents { tx: 1000, pinned: 7, ..FlowEvents::default() },
        }
    }

    #[test]
    fn ratios_are_taken_per_round() {
        let rounds = vec![
            round(3.8, 4.0, 4.0),
            round(1.9, 2.0, 2.0), // a slow (noisy) round: same ratio
            round(4.0, 4.0, 4.0),
        ];
        let t = Throughput::of(rounds).unwrap();
        assert!((t.ratio_encap.min - 0.95).abs() < 1e-12);
        assert!((t.ratio_encap.median - 0.95).abs() < 1e-12);
        assert!((t.ratio_encap.max - 1.0).abs() < 1e-12);
        assert_eq!(t.l4lb_mpps.median, 3.8);
        // Untracked 1.25 times as fast: 3.8 Mpps against 4.75, 263.2 - 210.5 ns.
        assert!((t.l4lb_untracked_mpps.median - 4.75).abs() < 1e-12);
        assert!((t.ratio_encap_untracked.median - 4.75 / 4.0).abs() < 1e-12);
        assert!((t.ns_tracking.median - ns_added(3.8, 4.75)).abs() < 1e-9 && t.ns_tracking.median > 52.0);
        assert!((t.ns_added_over_encap_untracked.median - ns_added(5.0, 4.0)).abs() < 1e-9, "the middle one: -50 ns");
        assert!((t.ns_added_over_encap.max - ns_added(1.9, 2.0)).abs() < 1e-9);
        assert!((t.cpu_busy.median - 0.99).abs() < 1e-12);
        assert!(Throughput::of(Vec::new()).is_none());
    }

    pub(crate) fn example() -> Results {
        let s = |v: f64| Summary { min: v * 0.99, median: v, max: v * 1.01 };
        let kinds = Kind::ALL
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let l4lb = 3.8 - i as f64 * 0.3;
                let rounds = vec![round(l4lb, 4.3, 4.0); 3];
                KindResult {
                    kind,
                    label: kind.label(),
                    outer: if kind.outer_ipv6() { "IPv6" } else { "IPv4" },
                    frame_bytes: kind.frame_len(),
                    throughput: Throughput::of(rounds).unwrap(),
                    test_run_ns: ProgramTimes { l4lb: 30.0, l4lb_untracked: 24.0, plain: 2.0, encap: 8.0 },
                    test_run_empty_ns: 25.0,
                    run_time_ns: ProgramTimes { l4lb: 60.0, l4lb_untracked: 52.5, plain: 40.0, encap: 45.0 },
                }
            })
            .collect();
        let size = ProgramSize { xlated_insns: 100, jited_bytes: 600 };
        Results {
            flow_entries: crate::bpf::FLOW_ENTRIES_DEFAULT,
            context: Context {
                cpu: "Some CPU".into(),
                cpus: 2,
                kernel: "6.18.0".into(),
                date: "2026-11-25".into(),
                command: "l4lb bench".into(),
                generator_cpu: 1,
                rounds: 3,
                seconds: 1.0,
                load_before: "0.10 0.20 0.30".into(),
                load_after: "0.90 0.50 0.40".into(),
            },
            target_share_of_encap_floor: TARGET,
            kinds,
            program_sizes: ProgramSizes { l4lb: size, plain: size, encap: size, encap6: size },
            stats_overhead_ns: 40.0,
            control_plane: ControlPlane {
                destinations: 512,
                fill_ms: s(20.0),
                fill_read_ms: s(2.0),
                fill_plan_ms: s(3.0),
                fill_apply_ms: s(15.0),
                replace_ms: s(21.0),
                stats_sample_ms: s(1.5),
            },
            l4lb_counts: L4lbCounts {
                rx: 10,
                tx: 10,
                others: Vec::new(),
                flow_events: vec![
                    ("flow_pinned".into(), 4),
                    ("flow_repinned".into(), 0),
                    ("flow_table_full".into(), 0),
                ],
                services: vec![ServicePackets { service: "*".into(), number: 0, packets: 10, bytes: 740 }],
            },
            l4lb_untracked_counts: L4lbCounts {
                rx: 12,
                tx: 12,
                others: Vec::new(),
                flow_events: vec![
                    ("flow_pinned".into(), 0),
                    ("flow_repinned".into(), 0),
                    ("flow_table_full".into(), 0),
                ],
                services: vec![ServicePackets { service: "*".into(), number: 0, packets: 12, bytes: 888 }],
            },
            variants: None,
        }
    }

    #[test]
    fn text_report_has_every_kind_ratio_and_target_line() {
        let results = example();
        let text = render(&results);
        for kind in Kind::ALL {
            assert!(text.contains(kind.label()), "{text}");
        }
        // 3.8 / 4.0 = 0.95 of the floor, but 3.8 / 4.75 = 0.8 of the
        // untracked l4lb: not met; a row after a change has no tracked /
        // untracked target, only 0.85 of the floor.
        assert!(
            text.contains("target: TCP SYN 64 B    0.950 of the encapsulation floor (at least 0.90, goal 0.95), tracked / untracked 0.800 (at least 0.97): NOT met; untracked 1.188\n"),
            "{text}"
        );
        assert!(
            text.contains("target: TCP ACK 64 B    0.875 of the encapsulation floor (at least 0.90, goal 0.95)"),
            "{text}"
        );
        assert!(text.contains("target: SYN, 33rd added 0.275 of the encapsulation floor (at least 0.85, goal 0.95): NOT met; untracked 0.344\n"), "{text}");
        let checks = results.target_checks();
        assert_eq!(checks.len(), Kind::ALL.len());
        // The tracking table: both ratios, the ns tracking adds, program times, pins.
        assert!(text.contains("untracked / encap (min med max)"), "{text}");
        assert!(text.contains("1.188 1.188 1.188"), "{text}");
        assert!(text.contains("52.6 52.6 52.6"), "{text}");
        assert!(text.contains("60.0 / 52.5"), "{text}");
        assert!(text.contains("7 (warm-up 0)"), "{text}");
        assert!(text.contains("1/33: pin hit"), "{text}");
        assert!(text.contains("the untracked l4lb's counters after the run: rx 12"), "{text}");
        assert!(text.contains("flow_pinned 4"), "{text}");
        assert!(text.contains("0.950 0.950 0.950"), "{text}");
        assert!(text.contains("| 3.800 |") || text.contains(" 3.800 "), "{text}");
        assert!(text.contains("about 40 ns per run"), "{text}");
        assert!(text.contains("frames runs on CPU 1"), "{text}");
        assert!(text.contains("its ksoftirqd ran 97% to 97%"), "{text}");
        assert!(text.contains("CPU 1 was busy 99% to 99%"), "{text}");
        assert!(!text.contains("not CPU-bound"), "{text}");
        assert!(text.contains("stats refresh"), "{text}");
        assert!(text.lines().all(|line| line == line.trim_end()));
    }

    #[test]
    fn variants_are_compared_with_the_floor_of_their_round() {
        let size = ProgramSize { xlated_insns: 1, jited_bytes: 2 };
        let v = Variants::of(
            Kind::TcpSyn64,
            vec![("floor", "f", vec![4.0, 2.0], size), ("slower", "s", vec![3.2, 1.6], size)],
        )
        .unwrap();
        assert_eq!(v.rows[0].ratio_encap.median, 1.0);
        assert!((v.rows[1].ratio_encap.min - 0.8).abs() < 1e-12 && (v.rows[1].ratio_encap.max - 0.8).abs() < 1e-12);
        // 3.2 Mpps vs 4: 312.5 - 250 = 62.5 ns; 1.6 vs 2: 125 ns.
        assert!((v.rows[1].ns_added_over_encap.median - 93.75).abs() < 1e-9);
        let mut results = example();
        results.variants = Some(v);
        let text = render(&results);
        assert!(text.contains("What costs what (TCP SYN 64 B"), "{text}");
        assert!(text.contains("0.800 0.800 0.800"), "{text}");
        assert!(Variants::of(Kind::Udp64, Vec::new()).is_none());
    }

    #[test]
    fn json_has_the_rounds_and_summaries() {
        let value = serde_json::to_value(example()).unwrap();
        assert_eq!(value["kinds"][0]["kind"], "tcp_syn_64");
        assert_eq!(value["kinds"][1]["kind"], "tcp_ack_64");
        assert_eq!(value["kinds"][1]["throughput"]["rounds"][0]["flows"]["pinned"], 7);
        assert!(value["kinds"][0]["throughput"]["ratio_encap_untracked"]["median"].is_f64());
        assert!(value["kinds"][0]["throughput"]["ns_tracking"]["median"].is_f64());
        assert_eq!(value["kinds"][0]["run_time_ns"]["l4lb_untracked"], 52.5);
        assert_eq!(value["l4lb_untracked_counts"]["rx"], 12);
        assert_eq!(value["l4lb_counts"]["flow_events"][0][0], "flow_pinned");
        assert_eq!(value["kinds"][1]["throughput"]["rounds"].as_array().unwrap().len(), 3);
        assert_eq!(value["kinds"][0]["throughput"]["ratio_encap"]["median"], 0.95);
        assert_eq!(value["control_plane"]["destinations"], 512);
    }
}
