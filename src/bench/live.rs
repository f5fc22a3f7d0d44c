//! The measuring: namespaces and veth, l4lb through the product path, the
//! floors, the ring of frames, the test_run loops, bpf stats and the
//! control-plane timings. Everything here needs root; the numbers go to the
//! pure `report` module.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::MapCore;

use super::frames::{self, Endpoints, Kind};
use super::report::{
    ControlPlane, FlowEvents, KindResult, L4lbCounts, ProgramSize, ProgramSizes, ProgramTimes, Round, ServicePackets,
    Summary, Throughput, Variants,
};
use super::ring::{Ring, RingMaps};
use super::skel::L4lbBenchSkelBuilder;
use super::sys::{self, Topology};
use super::Options;
use crate::apply;
use crate::config::{self, Model, ServiceKey};
use crate::destinations::Destination;
use crate::discover::{self, Mode};
use crate::iface::Interface;
use crate::maps::LbMaps;

/// Time for the path to settle before a bpf stats measurement.
const WARMUP: Duration = Duration::from_millis(100);
/// Traffic through the tracked l4lb alone before a row with a bounded set of
/// flows is measured, so that every flow has its pin (65536 flows drawn at
/// random at 3 to 4 Mpps: all of them drawn after about 0.2 s).
const FLOW_WARMUP: Duration = Duration::from_millis(400);
/// Programs are measured in turn in slices of about this length ...
const SLICE: Duration = Duration::from_millis(100);
/// ... each after this much traffic through the freshly swapped program.
const SETTLE: Duration = Duration::from_millis(20);
/// A slice in which the ring's softirq thread waited for its CPU (another
/// task had it) longer than this share of the time, or in which more than
/// MAX_OFF_CPU of the frames came back on another CPU, is measured again,
/// up to SLICE_TRIES times.
const MAX_WAITED: f64 = 0.05;
const MAX_OFF_CPU: f64 = 0.01;
const SLICE_TRIES: usize = 4;
/// test_run calls per program and packet kind, in chunks taken in turn.
const TEST_RUN_CHUNKS: usize = 21;
const TEST_RUN_PER_CHUNK: usize = 500;
/// Frames with distinct random clients that the test_run loops cycle
/// through: enough to touch most lines of l4lb's slot table, as live traffic does.
const TEST_RUN_FRAMES: usize = 4096;
/// Live traffic per program and kind with bpf stats on (at most `--seconds`).
const STATS_SECONDS: f64 = 0.5;
/// Fresh l4lb programs filled for the fill timing; stats samples timed.
const FILL_REPEATS: usize = 5;
const STATS_SAMPLES: usize = 20;
/// Backends of each service (the limit of one service).
const DESTINATIONS: usize = crate::bpf::MAX_SERVICE_BACKENDS;
/// The packet kind of the variants phase.
const VARIANT_KIND: Kind = Kind::TcpSyn64;
/// Outer IPv6 source of l4lb (used only inside the namespaces).
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 2);

const XDP_TX: u32 = 3;

/// A program on the balancer's veth. `L4lb` is l4lb as configured by
/// default (every service tracks flows), `L4lbUntracked` a second l4lb with
/// the same services and `track_flows = false`. `Encap` is the floor of the
/// packet kind: outer IPv4 or outer IPv6, as the kind's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    L4lb,
    L4lbUntracked,
    Plain,
    Encap,
}

const VARIANTS: [Variant; 4] = [Variant::L4lb, Variant::L4lbUntracked, Variant::Plain, Variant::Encap];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::L4lb => "l4lb",
            Variant::L4lbUntracked => "l4lb untracked",
            Variant::Plain => "plain",
            Variant::Encap => "encap",
        }
    }
}

/// Raw fds of the programs and maps, usable from any thread.
#[derive(Debug, Clone, Copy)]
struct Fds {
    gen: RawFd,
    plain: RawFd,
    encap: RawFd,
    encap6: RawFd,
    empty: RawFd,
    l4lb: RawFd,
    l4lb_untracked: RawFd,
    /// The pair holding the 64 services of the 64-services row.
    l4lb_spread: RawFd,
    l4lb_spread_untracked: RawFd,
    ring: RingMaps,
}

impl Fds {
    /// The benchmark object's programs and maps and the l4lbs the bench holds.
    fn new(skel: &super::skel::L4lbBenchSkel<'_>, lb: &L4lbSetup) -> Fds {
        Fds {
            gen: skel.progs.bench_gen.as_fd().as_raw_fd(),
            plain: skel.progs.bench_plain.as_fd().as_raw_fd(),
            encap: skel.progs.bench_encap.as_fd().as_raw_fd(),
            encap6: skel.progs.bench_encap6.as_fd().as_raw_fd(),
            empty: skel.progs.bench_empty.as_fd().as_raw_fd(),
            l4lb: lb.tracked.as_raw_fd(),
            l4lb_untracked: lb.untracked.as_raw_fd(),
            l4lb_spread: lb.spread.program.as_raw_fd(),
            l4lb_spread_untracked: lb.spread_untracked.program.as_raw_fd(),
            ring: RingMaps {
                cfg: skel.maps.bench_gen_cfg.as_fd().as_raw_fd(),
                ctl: skel.maps.bench_gen_ctl.as_fd().as_raw_fd(),
                back: skel.maps.bench_back_cnt.as_fd().as_raw_fd(),
                sent: skel.maps.bench_gen_cnt.as_fd().as_raw_fd(),
            },
        }
    }

    fn of(&self, variant: Variant, kind: Kind) -> RawFd {
        let spread = kind == Kind::Spread64;
        match variant {
            Variant::L4lb if spread => self.l4lb_spread,
            Variant::L4lbUntracked if spread => self.l4lb_spread_untracked,
            Variant::L4lb => self.l4lb,
            Variant::L4lbUntracked => self.l4lb_untracked,
            Variant::Plain => self.plain,
            Variant::Encap => self.encap_of(kind),
        }
    }

    /// The encapsulation floor of `kind`: outer IPv4 or IPv6, as l4lb pushes.
    fn encap_of(&self, kind: Kind) -> RawFd {
        if kind.outer_ipv6() {
            self.encap6
        } else {
            self.encap
        }
    }
}

/// Everything the measurements need to know about the setup.
struct Setup<'a> {
    topo: &'a Topology,
    fds: Fds,
    ends: Endpoints,
    /// The ring of frames between the veths: the traffic.
    ring: Ring,
    /// ksoftirqd of the ring's CPU, where the ring runs.
    softirqd: i32,
    lb_ifindex: u32,
    /// The CPU the ring runs on; everything else of this process runs on
    /// the others while traffic flows.
    gen_cpu: usize,
    other_cpus: Vec<usize>,
    /// The tracked l4lb's maps: its counters are read around every row.
    tracked_maps: &'a LbMaps,
    /// The tracked l4lb's flow table, emptied before each row after a change.
    tracked_flows: &'a libbpf_rs::MapHandle,
    untracked_maps: &'a LbMaps,
    /// The tracked l4lb of the 64-services row's pair.
    spread_maps: &'a LbMaps,
}

impl Setup<'_> {
    /// The maps of the tracked l4lb that measures `kind`.
    fn tracked_maps_of(&self, kind: Kind) -> &LbMaps {
        if kind == Kind::Spread64 {
            self.spread_maps
        } else {
            self.tracked_maps
        }
    }

    /// Both l4lbs right after adding the change service's 33rd backend.
    fn start_change(&self) -> Result<()> {
        start_change(self.tracked_maps, Some(self.tracked_flows), true).context("the tracked l4lb")?;
        start_change(self.untracked_maps, None, false).context("the untracked l4lb")
    }
}

/// What `measure` found (the caller adds the context).
pub struct Measured {
    pub kinds: Vec<KindResult>,
    pub sizes: ProgramSizes,
    pub stats_overhead_ns: f64,
    pub control: ControlPlane,
    pub variants: Option<Variants>,
    /// The CPU the ring ran on.
    pub generator_cpu: usize,
    /// l4lb's counters after the run, tracked and untracked.
    pub counts: L4lbCounts,
    pub untracked_counts: L4lbCounts,
}

/// The variant programs of the benchmark object, in the order of the table.
fn variant_programs(skel: &super::skel::L4lbBenchSkel<'_>, l4lb: RawFd) -> Vec<(&'static str, &'static str, RawFd)> {
    let fd = |p: &libbpf_rs::Program<'_>| p.as_fd().as_raw_fd();
    let progs = &skel.progs;
    vec![
        ("encap floor", "count, push outer IPv4 header, XDP_TX", fd(&progs.bench_encap)),
        ("+ parse", "+ parse_packet(): every check, the 5-tuple", fd(&progs.bv_parse)),
        (
            "+ select, hot table",
            "+ config, VIP, service, jhash, slot (of 256), backend, MTU check",
            fd(&progs.bv_select_hot),
        ),
        ("+ select", "the same with all 51203 slots (200 KiB), as l4lb", fd(&progs.bv_select)),
        ("+ counters", "+ rx and tx counters (plain adds, per-CPU map)", fd(&progs.bv_count)),
        ("+ backend stats", "+ per-backend and per-service packets and bytes", fd(&progs.bv_be_stats)),
        ("+ flow table", "+ 40-byte key, l4lb_flows lookup (LRU hash; a SYN misses) = l4lb's work", fd(&progs.bv_l4lb)),
        ("l4lb", "l4lb_balance itself", l4lb),
        (
            "l4lb, no VIP lookup",
            "l4lb's work, the catch-all's service number instead of the VIP lookup",
            fd(&progs.bv_no_vip),
        ),
        (
            "l4lb, VIP home entry",
            "l4lb's work, VIP looked up at its home entry only (1 probe, no port 0)",
            fd(&progs.bv_vip_home),
        ),
        (
            "l4lb, atomic adds",
            "l4lb's work with atomic adds, as l4lb_xdp.o counts (iproute2, offload)",
            fd(&progs.bv_atomic_add),
        ),
        ("l4lb, cheap hash", "l4lb's work with two multiplications instead of jhash", fd(&progs.bv_cheap_hash)),
        ("l4lb, 128 KiB table", "l4lb's work, slot & 32767 (u16 entries' footprint)", fd(&progs.bv_table_32k)),
        ("l4lb, 16 KiB table", "l4lb's work, slot & 4095", fd(&progs.bv_table_4k)),
        ("l4lb, 1 KiB table", "l4lb's work, slot & 255", fd(&progs.bv_small_table)),
        ("plain floor", "count, XDP_TX", fd(&progs.bench_plain)),
    ]
}

/// Runs the whole benchmark.
pub fn measure(options: &Options) -> Result<Measured> {
    let topo = Topology::create()?;
    let ends = Endpoints { src_mac: topo.gen_mac, dst_mac: topo.lb_mac };

    // l4lb through the product path, and the control-plane timings.
    eprintln!("l4lb bench: attaching l4lb and filling a service of {DESTINATIONS} backends ({FILL_REPEATS} times)");
    let lb = sys::in_netns(&topo.lb_ns, || setup_l4lb(&topo.lb_dev, options.flow_entries))?;
    let tracked_maps = open_maps(lb.tracked_id, &lb.tracked_maps)?;
    let untracked_maps = open_maps(lb.untracked_id, &lb.untracked_maps)?;
    let spread_maps = open_maps(lb.spread.id, &lb.spread.map_ids)?;
    let spread_untracked_maps = open_maps(lb.spread_untracked.id, &lb.spread_untracked.map_ids)?;
    let tracked_flows = crate::maps::open_flows(&held_program(lb.tracked_id, &lb.tracked_maps))?;

    // The benchmark's programs; the variants use l4lb's own (filled) maps.
    let mut storage = MaybeUninit::uninit();
    let skel = load_bench_object(&mut storage, &lb.tracked_maps)?;
    let fds = Fds::new(&skel, &lb);
    let allowed = sys::allowed_cpus()?;
    let (&gen_cpu, others) = allowed.split_last().ok_or_else(|| anyhow!("no CPU to run on"))?;
    let ring = Ring::new(fds.gen, fds.ring, (&topo.gen_ns, &topo.gen_dev), gen_cpu, ends)
        .context("the ring of frames on the generator's veth")?;
    let setup = Setup {
        topo: &topo,
        fds,
        ends,
        ring,
        softirqd: sys::ksoftirqd(gen_cpu)?,
        lb_ifindex: lb.ifindex,
        gen_cpu,
        other_cpus: others.to_vec(),
        tracked_maps: &tracked_maps,
        tracked_flows: &tracked_flows,
        untracked_maps: &untracked_maps,
        spread_maps: &spread_maps,
    };
    let variants = variant_programs(&skel, fds.l4lb);
    let row_services = RowServices {
        tracked: &lb.services,
        untracked: &lb.untracked_services,
        spread: &lb.spread.services,
        spread_untracked: &lb.spread_untracked.services,
    };
    check_programs(&setup, &variants, &row_services)?;
    let sizes = ProgramSizes {
        l4lb: size(fds.l4lb)?,
        plain: size(fds.plain)?,
        encap: size(fds.encap)?,
        encap6: size(fds.encap6)?,
    };

    eprintln!("l4lb bench: timing the programs with BPF_PROG_TEST_RUN");
    let test_runs = Kind::ALL
        .into_iter()
        .map(|kind| {
            if kind.changed() {
                setup.start_change()?;
            }
            time_test_run(&fds, kind, &ends)
        })
        .collect::<Result<Vec<_>>>()?;

    let variants = if options.variants { Some(variants.as_slice()) } else { None };
    let (rounds, run_times, stats_overhead_ns, variant_rounds) = live_phases(&setup, options, variants)?;
    let (counts, untracked_counts) =
        check_counts_after(&setup, &spread_untracked_maps, &row_services, (&lb.spread, &lb.spread_untracked))?;
    let kinds = kind_results(rounds, &test_runs, &run_times)?;
    let variants = match (variants, variant_rounds) {
        (Some(programs), Some(rounds)) => Some(variant_results(programs, rounds)?),
        _ => None,
    };
    drop(topo);
    Ok(Measured {
        kinds,
        sizes,
        stats_overhead_ns,
        control: lb.control,
        variants,
        generator_cpu: gen_cpu,
        counts,
        untracked_counts,
    })
}

/// Opens the embedded benchmark object and loads it, its variants sharing
/// the maps of the tracked l4lb (`map_ids`) that they read.
fn load_bench_object<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    map_ids: &[u32],
) -> Result<super::skel::L4lbBenchSkel<'obj>> {
    crate::libbpf_log::capture();
    let mut open = L4lbBenchSkelBuilder::default().open(storage).context("opening the embedded benchmark object")?;
    let mut handles = Vec::new();
    for &id in map_ids {
        handles.push(libbpf_rs::MapHandle::from_map_id(id).with_context(|| format!("opening l4lb's map id {id}"))?);
    }
    let find = |name: &str| {
        handles.iter().find(|h| h.name().to_string_lossy() == name).ok_or_else(|| anyhow!("l4lb has no map `{name}`"))
    };
    // The variants read l4lb's configuration, VIPs, services, tables and
    // backends (filled), and look up and pin flows in its flow table (the
    // tracked l4lb's); they count into maps of their own, of the same
    // types (per-CPU in driver mode), so that l4lb's counters stay l4lb's.
    let maps = &mut open.maps;
    for (map, name) in [
        (&mut maps.l4lb_config, crate::bpf::MAP_CONFIG),
        (&mut maps.l4lb_vips, crate::bpf::MAP_VIPS),
        (&mut maps.l4lb_services, crate::bpf::MAP_SERVICES),
        (&mut maps.l4lb_tables, crate::bpf::MAP_TABLES),
        (&mut maps.l4lb_backends, crate::bpf::MAP_BACKENDS),
        (&mut maps.l4lb_flows, crate::bpf::MAP_FLOWS),
    ] {
        map.reuse_fd(find(name)?.as_fd()).with_context(|| format!("sharing l4lb's map `{name}` with the variants"))?;
    }
    for (map, name) in [
        (&mut maps.l4lb_be_stats, crate::bpf::MAP_BACKEND_STATS),
        (&mut maps.l4lb_svc_stats, crate::bpf::MAP_SERVICE_STATS),
        (&mut maps.l4lb_counters, crate::bpf::MAP_COUNTERS),
    ] {
        map.set_type(find(name)?.map_type()).with_context(|| format!("typing the variants' `{name}`"))?;
    }
    let skel = open
        .load()
        .map_err(|err| anyhow!("the kernel refused the benchmark programs: {err}{}", crate::libbpf_log::tail(12)))?;
    let gen_cfg_size = skel.maps.bench_gen_cfg.value_size() as usize;
    if gen_cfg_size != frames::GEN_CONFIG_LEN {
        bail!("bench_gen_cfg has value size {gen_cfg_size}, expected {}", frames::GEN_CONFIG_LEN);
    }
    Ok(skel)
}

/// After the live phases: every l4lb's counters must add up (and every
/// table of the 64 services must have been used); returns the main pair's.
fn check_counts_after(
    setup: &Setup,
    spread_untracked_maps: &LbMaps,
    rows: &RowServices<'_>,
    (spread, spread_untracked): (&HeldL4lb, &HeldL4lb),
) -> Result<(L4lbCounts, L4lbCounts)> {
    let main_rows: Vec<Kind> = Kind::ALL.into_iter().filter(|&k| k != Kind::Spread64).collect();
    let counts = check_l4lb_counters(setup.tracked_maps, rows.tracked, true, &main_rows).context("the tracked l4lb")?;
    let untracked_counts =
        check_l4lb_counters(setup.untracked_maps, rows.untracked, false, &main_rows).context("the untracked l4lb")?;
    for (maps, held, name) in [
        (setup.spread_maps, spread, "the tracked l4lb of the 64 services"),
        (spread_untracked_maps, spread_untracked, "the untracked l4lb of the 64 services"),
    ] {
        let spread_counts = check_l4lb_counters(maps, &held.services, held.tracked, &[Kind::Spread64]).context(name)?;
        if let Some(idle) = spread_counts.services.iter().find(|s| s.packets == 0) {
            bail!("{name}: service {} counted no packets: not every table was in use", idle.service);
        }
    }
    Ok((counts, untracked_counts))
}

/// One result per packet kind, from its rounds and timings.
fn kind_results(
    rounds: Vec<Vec<Round>>,
    test_runs: &[(ProgramTimes, f64)],
    run_times: &[ProgramTimes],
) -> Result<Vec<KindResult>> {
    Kind::ALL
        .into_iter()
        .zip(rounds)
        .enumerate()
        .map(|(i, (kind, rounds))| {
            let throughput =
                Throughput::of(rounds).ok_or_else(|| anyhow!("no rounds measured for {}", kind.label()))?;
            Ok(KindResult {
                kind,
                label: kind.label(),
                outer: if kind.outer_ipv6() { "IPv6" } else { "IPv4" },
                frame_bytes: kind.frame_len(),
                throughput,
                test_run_ns: test_runs[i].0,
                test_run_empty_ns: test_runs[i].1,
                run_time_ns: run_times[i],
            })
        })
        .collect()
}

/// The variants' table: each program's rounds and size.
fn variant_results(programs: &[(&'static str, &'static str, RawFd)], rounds: Vec<Vec<f64>>) -> Result<Variants> {
    let mut rows = Vec::new();
    for (&(name, what, fd), mpps) in programs.iter().zip(rounds) {
        rows.push((name, what, mpps, size(fd)?));
    }
    Variants::of(VARIANT_KIND, rows).ok_or_else(|| anyhow!("no variant rounds measured"))
}

/// The discovery record of an l4lb program the bench holds, by its ids.
fn held_program(id: u32, map_ids: &[u32]) -> discover::AttachedProgram {
    discover::AttachedProgram { id, name: crate::bpf::PROG_NAME.into(), mode: Mode::Driver, map_ids: map_ids.to_vec() }
}

/// The maps of an l4lb program we hold (attached or not), by its ids.
fn open_maps(id: u32, map_ids: &[u32]) -> Result<LbMaps> {
    LbMaps::open(&held_program(id, map_ids))
}

// ------------------------------------------------------------ l4lb, control plane

/// 512 IPv4 backends in 198.19.0.0/16; `set` picks one of disjoint sets
/// (0 and 1: the TCP VIP's, back and forth; 2: the UDP VIP's; 3: the catch-all's).
fn destinations(set: u8) -> Vec<Destination> {
    (0..DESTINATIONS as u32)
        .map(|n| Destination {
            addr: Ipv4Addr::from(0xc613_0000 | (u32::from(set) + 1) << 12 | n),
            mac: [0x02, 0xbe, set, 0, (n >> 8) as u8, n as u8],
        })
        .collect()
}

fn backends_of(destinations: Vec<Destination>) -> Vec<config::Backend> {
    let mut backends: Vec<config::Backend> =
        destinations.iter().map(|d| config::Backend { addr: d.addr.into(), mac: Some(d.mac), weight: 1 }).collect();
    backends.sort();
    backends
}

/// 512 IPv6 backends in 2001:db8:be:<set>::/64.
fn backends6(set: u8) -> Vec<config::Backend> {
    let mut backends: Vec<config::Backend> = (0..DESTINATIONS as u16)
        .map(|n| config::Backend {
            addr: Ipv6Addr::new(0x2001, 0xdb8, 0xbe, u16::from(set), 0, 0, 0, n + 1).into(),
            mac: Some([0x02, 0xbe, set, 6, (n >> 8) as u8, n as u8]),
            weight: 1,
        })
        .collect();
    backends.sort();
    backends
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e3
}

fn global() -> config::Global {
    config::Global {
        source_v4: Some(sys::LB_ADDR),
        source_v6: Some(LB_ADDR6),
        hash_seed: Some(0x5eed_bec4),
        ..Default::default()
    }
}

fn vip(addr: IpAddr, protocol: config::Protocol, port: u16) -> ServiceKey {
    ServiceKey::Vip { addr, protocol, port }
}

/// The TCP VIP's service, the one the generator's TCP frames hit.
fn tcp_vip() -> ServiceKey {
    vip(frames::VIP4.into(), config::Protocol::Tcp, frames::TCP_PORT)
}

/// The service a packet kind is sent to.
fn service_of(kind: Kind) -> ServiceKey {
    match kind {
        Kind::TcpSyn64 | Kind::TcpAck64 | Kind::Tcp1500 | Kind::Ipv4Options => tcp_vip(),
        Kind::Udp64 => vip(frames::VIP4.into(), config::Protocol::Udp, frames::UDP_PORT),
        Kind::Ipv6Syn => vip(frames::VIP6.into(), config::Protocol::Tcp, frames::TCP_PORT),
        Kind::Syn4in6 => vip(frames::VIP4_TO_6.into(), config::Protocol::Tcp, frames::TCP_PORT),
        Kind::CatchAll => ServiceKey::CatchAll,
        Kind::AckChanged | Kind::SynChanged => change_vip(),
        Kind::Spread64 => vip(frames::SPREAD_BASE.into(), config::Protocol::Tcp, frames::TCP_PORT),
    }
}

/// The 64-services row's l4lbs hold these: `SPREAD_SERVICES` TCP VIPs, 512
/// IPv4 backends each (eight backend sets, taken in turn): every service
/// at its limit, 32,768 backend entries, all 64 tables in use.
fn spread_model(track_flows: bool) -> Model {
    let mut services: Vec<config::Service> = (0..frames::SPREAD_SERVICES as u32)
        .map(|i| {
            let key =
                vip(Ipv4Addr::from(u32::from(frames::SPREAD_BASE) + i).into(), config::Protocol::Tcp, frames::TCP_PORT);
            config::Service { track_flows, ..config::Service::new(key, backends_of(destinations((i % 8) as u8))) }
        })
        .collect();
    services.sort_by_key(|s| s.key);
    Model { global: global(), services, ..Model::default() }
}

/// The service of the rows measured right after a change.
fn change_vip() -> ServiceKey {
    vip(frames::VIP4.into(), config::Protocol::Tcp, frames::CHANGE_PORT)
}

/// Backends of the change service before a change (the 33rd is added).
const CHANGE_BACKENDS: usize = 32;

/// One service, the TCP VIP, with backend set `set`: the control-plane timings.
fn timing_model(set: u8) -> Model {
    Model {
        global: global(),
        services: vec![config::Service::new(tcp_vip(), backends_of(destinations(set)))],
        ..Model::default()
    }
}

/// What the rows are sent to: the TCP VIP (set 0, as the timings leave it),
/// the UDP VIP, the IPv4 VIP with IPv6 backends, the IPv6 VIP and the
/// catch-all, 512 backends each, and the change service with `change`
/// backends (CHANGE_BACKENDS, or one more right after a change); every one
/// tracking flows (the default) or none.
fn bench_model_with(track_flows: bool, change: usize) -> Model {
    let service = |key, backends| config::Service { track_flows, ..config::Service::new(key, backends) };
    let mut services = vec![
        service(tcp_vip(), backends_of(destinations(0))),
        service(service_of(Kind::Udp64), backends_of(destinations(2))),
        service(service_of(Kind::Syn4in6), backends6(1)),
        service(service_of(Kind::Ipv6Syn), backends6(2)),
        service(ServiceKey::CatchAll, backends_of(destinations(3))),
        service(change_vip(), backends_of(destinations(4).into_iter().take(change).collect())),
    ];
    services.sort_by_key(|s| s.key);
    Model { global: global(), services, ..Model::default() }
}

fn bench_model(track_flows: bool) -> Model {
    bench_model_with(track_flows, CHANGE_BACKENDS)
}

/// Makes the change service's slots all steady with CHANGE_BACKENDS
/// backends and empties the flow table, then adds the 33rd backend: about
/// 1/33 of the slots go in transition (tracked), or just change (untracked).
/// What a row measured right after a change starts from.
fn start_change(maps: &LbMaps, flows: Option<&libbpf_rs::MapHandle>, track_flows: bool) -> Result<()> {
    if track_flows {
        // Tracking turned off writes every slot steady; turned on again it
        // changes no slot.
        let mut off = bench_model(true);
        for s in off.services.iter_mut().filter(|s| s.key == change_vip()) {
            s.track_flows = false;
        }
        maps.apply(&off)?;
    }
    maps.apply(&bench_model(track_flows))?;
    if let Some(flows) = flows {
        let mut keys = Vec::new();
        crate::maps::walk_flows(flows, |key, _| keys.push(crate::bpf::value_bytes(key).to_vec()))?;
        for key in keys {
            let _ = flows.delete(&key);
        }
    }
    maps.apply(&bench_model_with(track_flows, CHANGE_BACKENDS + 1))?;
    let running = maps.read_running()?;
    let in_transition = running.service(&change_vip()).map_or(0, |s| s.transitions.len());
    if track_flows != (in_transition > 0) {
        bail!(
            "{} slots of {} in transition after the 33rd backend, tracking {track_flows}",
            in_transition,
            change_vip()
        );
    }
    Ok(())
}

/// The backends' outer addresses per service, as the maps hold them.
type ServiceBackends = HashMap<ServiceKey, (u32, Vec<IpAddr>)>;

/// A further l4lb the bench holds (the 64-services row's pair).
struct HeldL4lb {
    program: OwnedFd,
    id: u32,
    map_ids: Vec<u32>,
    tracked: bool,
    services: ServiceBackends,
}

/// Attaches a fresh l4lb to `iface` and applies `model` to it (every service
/// tracking flows or none); the caller holds it from here on.
fn held_l4lb(iface: &Interface, flow_entries: Option<u32>, model: &Model, tracked: bool) -> Result<HeldL4lb> {
    let (id, program, maps) = fresh_l4lb(iface, flow_entries)?;
    let services = apply_checked(&maps, model, tracked)?;
    Ok(HeldL4lb { program: discover::program_fd(id)?, id, map_ids: program.map_ids, tracked, services })
}

/// The services each l4lb holds, by row: the main pair's, and the 64
/// services of the spread pair.
struct RowServices<'a> {
    tracked: &'a ServiceBackends,
    untracked: &'a ServiceBackends,
    spread: &'a ServiceBackends,
    spread_untracked: &'a ServiceBackends,
}

/// The l4lb programs the bench holds, all loaded and configured by the
/// product path: the tracked one (every service tracks flows, the default)
/// and the untracked one (the same services, `track_flows = false`), and
/// the pair of the 64-services row.
struct L4lbSetup {
    tracked: OwnedFd,
    tracked_id: u32,
    tracked_maps: Vec<u32>,
    untracked: OwnedFd,
    untracked_id: u32,
    untracked_maps: Vec<u32>,
    ifindex: u32,
    control: ControlPlane,
    /// The services' numbers and backends in each.
    services: ServiceBackends,
    untracked_services: ServiceBackends,
    spread: HeldL4lb,
    spread_untracked: HeldL4lb,
}

/// Attaches a fresh l4lb to `iface` (`crate::attach::attach`, driver mode,
/// an LRU flow table of `flow_entries`, else attach's default), sets its
/// MTU, and opens its maps.
fn fresh_l4lb(iface: &Interface, flow_entries: Option<u32>) -> Result<(u32, discover::AttachedProgram, LbMaps)> {
    let flows = crate::attach::FlowTable::for_mode(Mode::Driver, flow_entries)?;
    let id = crate::attach::attach(iface, Mode::Driver, true, flows)?;
    let program = discover::find_l4lb(iface)?;
    let maps = LbMaps::open(&program)?;
    let mut config = maps.read_config()?;
    config.mtu = iface.mtu()?;
    maps.write_config(&config)?;
    Ok((id, program, maps))
}

/// Applies the benchmark's services (tracked or not) and checks them back;
/// returns their numbers and backends.
fn apply_bench_model(maps: &LbMaps, track_flows: bool) -> Result<ServiceBackends> {
    apply_checked(maps, &bench_model(track_flows), track_flows)
}

/// Applies `full` (every service tracking flows or none) and checks it
/// back; returns the services' numbers and backends.
fn apply_checked(maps: &LbMaps, full: &Model, track_flows: bool) -> Result<ServiceBackends> {
    maps.apply(full)?;
    let running = maps.read_running()?;
    if running.model().services != full.services {
        bail!("the benchmark's services did not read back as applied");
    }
    let mut services = ServiceBackends::new();
    for s in &running.services {
        if s.table.contains(&crate::bpf::SLOT_EMPTY) {
            bail!("service {} has empty slots", s.key);
        }
        if s.track_flows != track_flows {
            bail!("service {} has track_flows {}", s.key, s.track_flows);
        }
        services.insert(s.key, (s.number, s.backends.iter().map(|b| b.backend.addr).collect()));
    }
    Ok(services)
}

/// Attaches l4lb to `dev` with `crate::attach::attach`, fills one service
/// (the TCP VIP, 512 backends) with `apply::plan` + `apply::execute` (what
/// `l4lb apply` does), FILL_REPEATS times on a fresh program, and times a
/// replacement of every backend and `l4lb stats` samples. Then applies the
/// benchmark's whole configuration (five services, tracking flows) and
/// checks it back; then attaches a second l4lb with the same services
/// untracked. Runs in the lb namespace. Returns fds of the two programs
/// (kept attached only by the caller's swaps from here on), their map ids,
/// the ifindex, the timings and the services' numbers and backends.
fn setup_l4lb(dev: &str, flow_entries: Option<u32>) -> Result<L4lbSetup> {
    let iface = Interface::by_name(dev)?;
    let (fills, (id, map_ids, maps)) = time_fills(&iface, flow_entries)?;
    let replace = time_replacements(&maps)?;
    let stats = time_stats_samples(&maps)?;

    // The rows' services, through the same engine, tracked; then a second
    // l4lb (replacing the first on the device: the fd keeps the first) with
    // the same services untracked.
    let services = apply_bench_model(&maps, true)?;
    let tracked = discover::program_fd(id)?;
    let (untracked_id, untracked_program, untracked_maps) = fresh_l4lb(&iface, flow_entries)?;
    let untracked_services = apply_bench_model(&untracked_maps, false)?;
    // Held from here on: the next attach replaces it on the device.
    let untracked = discover::program_fd(untracked_id)?;
    eprintln!(
        "l4lb bench: two more l4lbs with {} services of {DESTINATIONS} backends (the 64-services row)",
        frames::SPREAD_SERVICES
    );
    let spread = held_l4lb(&iface, flow_entries, &spread_model(true), true)?;
    let spread_untracked = held_l4lb(&iface, flow_entries, &spread_model(false), false)?;

    let summary = |values: &[f64]| Summary::of(values).expect("timings are numbers");
    let control = ControlPlane {
        destinations: DESTINATIONS,
        fill_ms: summary(&fills.total),
        fill_read_ms: summary(&fills.read),
        fill_plan_ms: summary(&fills.plan),
        fill_apply_ms: summary(&fills.apply),
        replace_ms: summary(&replace),
        stats_sample_ms: summary(&stats),
    };
    Ok(L4lbSetup {
        tracked,
        tracked_id: id,
        tracked_maps: map_ids,
        untracked,
        untracked_id,
        untracked_maps: untracked_program.map_ids,
        ifindex: iface.index,
        control,
        services,
        untracked_services,
        spread,
        spread_untracked,
    })
}

/// The l4lb the fills leave: program id, map ids, maps.
type FilledL4lb = (u32, Vec<u32>, LbMaps);

/// Milliseconds of each fill of the TCP VIP's service: in all, and its
/// three steps (read the maps, plan, write).
#[derive(Default)]
struct FillTimes {
    total: Vec<f64>,
    read: Vec<f64>,
    plan: Vec<f64>,
    apply: Vec<f64>,
}

/// Fills the TCP VIP's service (512 backends) on a fresh l4lb, FILL_REPEATS
/// times, timing each step; checks the last fill and returns the timings
/// and the last l4lb (program id, map ids, maps).
fn time_fills(iface: &Interface, flow_entries: Option<u32>) -> Result<(FillTimes, FilledL4lb)> {
    let wanted = timing_model(0);
    let mut times = FillTimes::default();
    let mut last = None;
    for _ in 0..FILL_REPEATS {
        sys::check_interrupted()?;
        let (id, program, maps) = fresh_l4lb(iface, flow_entries)?;

        let t0 = Instant::now();
        let current = maps.read_snapshot()?;
        let t1 = Instant::now();
        let plan = apply::plan(&current, &wanted, 0x5eed_bec4)?;
        let t2 = Instant::now();
        apply::execute(&maps, &plan)?;
        let t3 = Instant::now();
        times.total.push(ms(t3 - t0));
        times.read.push(ms(t1 - t0));
        times.plan.push(ms(t2 - t1));
        times.apply.push(ms(t3 - t2));
        last = Some((id, program.map_ids.clone(), maps));
    }
    let last = last.expect("FILL_REPEATS > 0");
    let running = last.2.read_running()?;
    let filled = running
        .service(&tcp_vip())
        .is_some_and(|s| s.backends.len() == DESTINATIONS && s.table.iter().all(|&n| n != crate::bpf::SLOT_EMPTY));
    if !filled {
        bail!("the service {} was not filled with {DESTINATIONS} backends", tcp_vip());
    }
    Ok((times, last))
}

/// Milliseconds of replacing every backend of the TCP VIP, back and forth
/// (every slot is rewritten); leaves the first backend set.
fn time_replacements(maps: &LbMaps) -> Result<Vec<f64>> {
    let mut replace = Vec::new();
    for round in 0..4u8 {
        let t0 = Instant::now();
        maps.apply(&timing_model((round + 1) % 2))?;
        replace.push(ms(t0.elapsed()));
    }
    // Back to set 0 (4 replacements: 1, 0, 1, 0).
    if maps.read_running()?.model().services != timing_model(0).services {
        bail!("the TCP VIP does not hold the first backend set after the replacements");
    }
    Ok(replace)
}

/// Milliseconds of STATS_SAMPLES `l4lb stats` samples, each checked.
fn time_stats_samples(maps: &LbMaps) -> Result<Vec<f64>> {
    let mut stats = Vec::new();
    for _ in 0..STATS_SAMPLES {
        let t0 = Instant::now();
        let sample = crate::commands::sample(maps)?;
        stats.push(ms(t0.elapsed()));
        let listed: usize = sample.services.iter().map(|s| s.backends.len()).sum();
        if listed != DESTINATIONS {
            bail!("a stats sample listed {listed} backends, expected {DESTINATIONS}");
        }
    }
    Ok(stats)
}

// ------------------------------------------------------------ checks

/// Checks the generator's frames against the host's model; that l4lb sends
/// every kind back (XDP_TX) with the outer header of the kind's backends,
/// addressed to a backend of the kind's service; that the floors send it
/// back with an outer header as long; and that the IPv4 variants do too.
fn check_programs(setup: &Setup, variants: &[(&str, &str, RawFd)], rows: &RowServices<'_>) -> Result<()> {
    for kind in Kind::ALL {
        check_generator(setup, kind)?;
        let (client, port) = frames::client_of(kind, 0x9c40_0102);
        let frame = frames::frame(kind, &setup.ends, client, port);
        let l4lb_out = check_l4lbs(setup, kind, &frame, rows)?;
        check_answer("the encapsulation floor", setup.fds.encap_of(kind), kind, &frame)?;
        // The variants replicate l4lb's work on IPv4 to a VIP with IPv4
        // backends; the one with every stage must give l4lb's frame byte for byte.
        if kind.is_ipv6() || kind.outer_ipv6() || matches!(kind, Kind::CatchAll | Kind::Spread64) {
            continue;
        }
        for &(name, _, fd) in variants.iter().filter(|v| v.2 != setup.fds.plain) {
            let out = check_answer(name, fd, kind, &frame)
                .with_context(|| format!("the variant `{name}`: is the table filled?"))?;
            if (name.starts_with("+ backend") || name.starts_with("+ flow")) && out != l4lb_out {
                bail!("the variant `{name}` does not produce l4lb's frame for {}", kind.label());
            }
        }
    }
    Ok(())
}

/// The generator, run once on a frame of garbage as long as the balancer
/// sends it back, must write the whole `kind` frame as the host's model
/// builds it, from a client in its range, over the tail of what it got.
/// A kind whose frame is all header is also made from a shorter frame (in
/// a ring of several kinds, a frame of another kind): grown at its head.
fn check_generator(setup: &Setup, kind: Kind) -> Result<()> {
    setup.ring.arm(&[kind])?;
    let back: Vec<u8> = (0..kind.frame_len() + kind.overhead()).map(|i| 0xa5 ^ i as u8).collect();
    let mut checks = vec![("sent back", back.as_slice())];
    if kind.header_len() == kind.frame_len() {
        checks.push(("shorter", &back[..frames::ETH_LEN + 6]));
    }
    let checked = checks.into_iter().try_for_each(|(what, input)| {
        check_generated(setup.fds.gen, setup, kind, input)
            .with_context(|| format!("generator, {} from a frame {what}", kind.label()))
    });
    setup.ring.disarm()?;
    checked
}

/// One run of the generator on `input` (see `check_generator`).
fn check_generated(gen: RawFd, setup: &Setup, kind: Kind, input: &[u8]) -> Result<()> {
    let mut out = vec![0u8; 4096];
    let run = sys::test_run(gen, input, Some(&mut out)).context("running the generator once")?;
    if run.retval != XDP_TX || run.data_len != kind.frame_len() {
        bail!("verdict {} and {} bytes (expected XDP_TX, {})", run.retval, run.data_len, kind.frame_len());
    }
    let got = &out[..run.data_len];
    let (client, port) = frames::client_in(kind, got);
    if client.is_ipv6() != kind.is_ipv6() {
        bail!("a frame from {client}");
    }
    let dst = frames::dst_in(kind, got);
    if !(0..=u32::from(kind.dst_mask())).any(|r| kind.dst_of(r) == dst) {
        bail!("a frame to {dst}");
    }
    let mut want = frames::frame_to(kind, &setup.ends, client, port, dst);
    // Past the headers the generator leaves the tail of what it was given.
    let header = kind.header_len();
    want[header..].copy_from_slice(&input[input.len() - (kind.frame_len() - header)..]);
    if let Some(at) = got.iter().zip(&want).position(|(g, w)| g != w) {
        let end = (at + 16).min(got.len());
        bail!(
            "the frame differs from the host's model from byte {at}:\n got  {:02x?}\n want {:02x?}",
            &got[at..end],
            &want[at..end]
        );
    }
    let (lowest, _) = frames::client_of(kind, 0);
    let (highest, _) = frames::client_of(kind, 0xffff);
    if client < lowest || client > highest || port < 0x8000 {
        bail!("client {client} port {port} outside {lowest} - {highest}, 32768-65535");
    }
    Ok(())
}

/// Runs `frame` through program `fd` once: it must answer XDP_TX with the
/// frame and `kind`'s outer header. Returns what it sent.
fn check_answer(name: &str, fd: RawFd, kind: Kind, frame: &[u8]) -> Result<Vec<u8>> {
    let expected = frame.len() + kind.overhead();
    let mut out = vec![0u8; 4096];
    let run = sys::test_run(fd, frame, Some(&mut out))?;
    if run.retval != XDP_TX || run.data_len != expected {
        bail!(
            "{name} answered a {} frame with verdict {} and {} bytes (expected XDP_TX, {expected})",
            kind.label(),
            run.retval,
            run.data_len
        );
    }
    out.truncate(run.data_len);
    Ok(out)
}

/// Both l4lbs of `kind`'s row must send `frame` to a backend of its
/// service; returns the tracked one's frame.
fn check_l4lbs(setup: &Setup, kind: Kind, frame: &[u8], rows: &RowServices<'_>) -> Result<Vec<u8>> {
    let (services, untracked_services) =
        if kind == Kind::Spread64 { (rows.spread, rows.spread_untracked) } else { (rows.tracked, rows.untracked) };
    let mut l4lb_out = Vec::new();
    for (name, variant, services) in
        [("l4lb", Variant::L4lb, services), ("the untracked l4lb", Variant::L4lbUntracked, untracked_services)]
    {
        let got = check_answer(name, setup.fds.of(variant, kind), kind, frame)?;
        let outer_dst: IpAddr = if kind.outer_ipv6() {
            <[u8; 16]>::try_from(&got[14 + 24..14 + 40]).expect("16 bytes").into()
        } else {
            <[u8; 4]>::try_from(&got[14 + 16..14 + 20]).expect("4 bytes").into()
        };
        let key = service_of(kind);
        let (_, backends) = services.get(&key).ok_or_else(|| anyhow!("no service {key}"))?;
        if !backends.contains(&outer_dst) {
            bail!("{name} sent a {} frame to {outer_dst}, not a backend of {key}", kind.label());
        }
        if l4lb_out.is_empty() {
            l4lb_out = got;
        }
    }
    Ok(l4lb_out)
}

/// The value of l4lb's counter `name` in `counters` (indexed like COUNTER_NAMES).
fn counter(counters: &[u64], name: &str) -> u64 {
    crate::bpf::COUNTER_NAMES.iter().position(|n| *n == name).map_or(0, |i| counters[i])
}

/// What the tracked l4lb counted between two reads of its counters.
fn flow_events(before: &[u64], after: &[u64]) -> FlowEvents {
    let delta = |name: &str| counter(after, name).saturating_sub(counter(before, name));
    FlowEvents {
        tx: delta("tx"),
        pinned: delta("flow_pinned"),
        repinned: delta("flow_repinned"),
        table_full: delta("flow_table_full"),
        warmup_pinned: 0,
    }
}

/// An l4lb's counters after the run (the caller's generator has stopped:
/// nothing is in flight): every frame it saw was sent back, no drop or pass
/// counter moved, the services' packets add up, the service of each of
/// `rows` counted packets, and flows were pinned exactly when tracking met
/// slots in transition (rows measured right after a change).
fn check_l4lb_counters(maps: &LbMaps, services: &ServiceBackends, tracked: bool, rows: &[Kind]) -> Result<L4lbCounts> {
    let (counters, traffic) = (maps.read_counters()?, maps.read_service_stats()?);
    let names = crate::bpf::COUNTER_NAMES;
    let (rx, tx) = (counter(&counters, "rx"), counter(&counters, "tx"));
    let others: Vec<(String, u64)> = names
        .iter()
        .zip(&counters)
        .filter(|(name, count)| !matches!(**name, "rx" | "tx") && !name.starts_with("flow_") && **count > 0)
        .map(|(name, count)| (name.to_string(), *count))
        .collect();
    let flow_events: Vec<(String, u64)> = names
        .iter()
        .zip(&counters)
        .filter(|(name, _)| name.starts_with("flow_"))
        .map(|(name, count)| (name.to_string(), *count))
        .collect();
    let mut per_service: Vec<ServicePackets> = services
        .iter()
        .map(|(key, (number, _))| {
            let t = &traffic[*number as usize];
            ServicePackets { service: key.to_string(), number: *number, packets: t.packets, bytes: t.bytes }
        })
        .collect();
    for (number, t) in traffic.iter().enumerate() {
        if t.packets > 0 && !per_service.iter().any(|s| s.number as usize == number) {
            per_service.push(ServicePackets {
                service: format!("(no service, number {number})"),
                number: number as u32,
                packets: t.packets,
                bytes: t.bytes,
            });
        }
    }
    per_service.sort_by_key(|s| s.number);
    let counts = L4lbCounts { rx, tx, others, flow_events, services: per_service };
    let summed: u64 = counts.services.iter().map(|s| s.packets).sum();
    if rx == 0 || rx != tx || !counts.others.is_empty() || summed != tx {
        let others: Vec<String> = counts.others.iter().map(|(n, c)| format!("{n} {c}")).collect();
        let services: Vec<String> = counts.services.iter().map(|s| format!("{} {}", s.service, s.packets)).collect();
        bail!(
            "l4lb did not send back everything it saw: rx {rx}, tx {tx}, {summed} packets counted by services ({}); {}",
            services.join(", "),
            others.join(", ")
        );
    }
    for &kind in rows {
        let key = service_of(kind).to_string();
        if !counts.services.iter().any(|s| s.service == key && s.packets > 0) {
            bail!("l4lb's service {key} ({}) counted no packets", kind.label());
        }
    }
    // Only the rows measured right after a change meet slots in
    // transition: the tracked l4lb pins their flows, the untracked none.
    let pinned = counter(&counters, "flow_pinned");
    let transitions = tracked && rows.iter().any(|k| k.changed());
    if transitions == (pinned == 0) {
        bail!("l4lb pinned {pinned} flows with its services' track_flows {tracked}");
    }
    Ok(counts)
}

fn size(fd: RawFd) -> Result<ProgramSize> {
    let info = sys::prog_info(fd)?;
    Ok(ProgramSize { xlated_insns: info.xlated_prog_len / 8, jited_bytes: info.jited_prog_len })
}

// ------------------------------------------------------------ test_run

/// test_run duration of each program, repeat = 1 in a loop (with repeat > 1
/// the frame is not reset, so an encapsulating program would encapsulate its
/// own output). The programs take turns in chunks; each chunk's average minus
/// the empty program's chunk of the same turn is one sample, and the median
/// of the samples is the result (a burst of load elsewhere spoils a few
/// samples, not the result). Returns the programs' times and the empty
/// program's.
fn time_test_run(fds: &Fds, kind: Kind, ends: &Endpoints) -> Result<(ProgramTimes, f64)> {
    let frames: Vec<Vec<u8>> = (0..TEST_RUN_FRAMES as u32)
        .map(|i| frames::generated(kind, ends, i.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995, i.wrapping_mul(0x85eb_ca6b)))
        .collect();
    let programs =
        [fds.empty, fds.of(Variant::L4lb, kind), fds.of(Variant::L4lbUntracked, kind), fds.plain, fds.encap_of(kind)];
    let mut samples = vec![Vec::new(); programs.len()];
    let mut next = 0;
    for _ in 0..TEST_RUN_CHUNKS {
        sys::check_interrupted()?;
        let mut avg = [0f64; 5];
        for (p, &fd) in programs.iter().enumerate() {
            let mut sum = 0u64;
            for _ in 0..TEST_RUN_PER_CHUNK {
                next = (next + 1) % frames.len();
                sum += u64::from(sys::test_run(fd, &frames[next], None).context("timing with test_run")?.duration_ns);
            }
            avg[p] = sum as f64 / TEST_RUN_PER_CHUNK as f64;
        }
        samples[0].push(avg[0]);
        for p in 1..programs.len() {
            samples[p].push(avg[p] - avg[0]);
        }
    }
    let median = |p: usize| Summary::of(&samples[p]).map_or(f64::NAN, |s| s.median);
    Ok((ProgramTimes { l4lb: median(1), l4lb_untracked: median(2), plain: median(3), encap: median(4) }, median(0)))
}

/// What bpf stats add to one run of the empty program, ns: chunks of its
/// test_run loop with the stats off and on in turn, median of the differences.
fn stats_overhead_ns(fds: &Fds) -> Result<f64> {
    let frame = vec![0u8; 60];
    let chunk = |fd: RawFd| -> Result<f64> {
        let mut sum = 0u64;
        for _ in 0..TEST_RUN_PER_CHUNK {
            sum += u64::from(sys::test_run(fd, &frame, None)?.duration_ns);
        }
        Ok(sum as f64 / TEST_RUN_PER_CHUNK as f64)
    };
    let mut diffs = Vec::new();
    for _ in 0..TEST_RUN_CHUNKS {
        sys::check_interrupted()?;
        let off = chunk(fds.empty)?;
        let stats = sys::enable_bpf_stats()?;
        let on = chunk(fds.empty)?;
        drop(stats);
        diffs.push(on - off);
    }
    Ok(Summary::of(&diffs).map_or(f64::NAN, |s| s.median))
}

// ------------------------------------------------------------ live traffic

/// Puts `kind` in the ring: empties it, puts the plain floor on the
/// balancer's veth (an l4lb sees only frames of its own rows: the pair of
/// the 64-services row has none of the other rows' services, and would pass
/// their frames to the stack), then starts it with `kind`.
fn switch_row(setup: &Setup, kind: Kind) -> Result<()> {
    setup.ring.stop()?;
    attach(setup, setup.fds.plain)?;
    setup.ring.start(&[kind]).with_context(|| format!("starting the ring with {}", kind.label()))
}

/// Puts a program on the balancer's veth (replacing the one there).
fn attach(setup: &Setup, fd: RawFd) -> Result<()> {
    let ifindex = setup.lb_ifindex;
    sys::in_netns(&setup.topo.lb_ns, || sys::xdp_attach(ifindex, fd))
        .context("putting a program on the balancer's veth")
}

fn attach_variant(setup: &Setup, variant: Variant, kind: Kind) -> Result<()> {
    attach(setup, setup.fds.of(variant, kind)).with_context(|| format!("with {}", variant.name()))
}

/// Throughput of one program over the slices it had.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// Frames back at the generator per second of wall time, millions.
    mpps: f64,
    /// Share of the time the ring's CPU was busy (softirq included).
    busy: f64,
    /// Share of the time the hypervisor took from it.
    steal: f64,
    /// Share of the wall time the ring's softirq thread (ksoftirqd) ran.
    softirq: f64,
    /// Share of the wall time it was runnable but waited for its CPU.
    waited: f64,
}

/// One reading of what `interleaved` measures.
struct Sample {
    /// Frames back at the generator: on the ring's CPU, and all.
    back_on_cpu: u64,
    back: u64,
    /// The ring's ksoftirqd: time on the CPU, time waiting for it, ns.
    softirq_ns: u64,
    waited_ns: u64,
    ticks: sys::CpuTicks,
    at: Instant,
}

fn sample(setup: &Setup) -> Result<Sample> {
    let (back_on_cpu, back) = setup.ring.back_on_cpu()?;
    let (softirq_ns, waited_ns) = sys::schedstat(setup.softirqd)?;
    Ok(Sample { back_on_cpu, back, softirq_ns, waited_ns, ticks: sys::cpu_ticks(setup.gen_cpu)?, at: Instant::now() })
}

/// Measures the programs `fds` in turn on the balancer's veth, in slices of
/// SLICE taken in rotating order until each had `seconds`, so that a burst of
/// load from elsewhere falls on all of them alike. Counts the frames that came
/// back to the generator per wall-clock second, and how busy the ring's CPU
/// was meanwhile (/proc/stat) and how much of it the ring's ksoftirqd had.
/// A slice in which another task took the ring's CPU for more than
/// MAX_WAITED of the time is measured again (up to SLICE_TRIES times in all);
/// so is one in which the ring left its CPU (it is started again there).
fn interleaved(setup: &Setup, fds: &[RawFd], seconds: f64, start: usize) -> Result<Vec<Rate>> {
    let slices = ((seconds / SLICE.as_secs_f64()).round() as usize).max(1);
    let slice = Duration::from_secs_f64(seconds / slices as f64);
    let mut frames = vec![0u64; fds.len()];
    let mut wall = vec![0f64; fds.len()];
    let mut softirq = vec![0u64; fds.len()];
    let mut waited = vec![0u64; fds.len()];
    let mut ticks = vec![sys::CpuTicks::default(); fds.len()];
    for cycle in 0..slices {
        for step in 0..fds.len() {
            let p = (start + cycle + step) % fds.len();
            attach(setup, fds[p])?;
            sys::sleep(SETTLE)?;
            for attempt in 1..=SLICE_TRIES {
                let s0 = sample(setup)?;
                sys::sleep(slice)?;
                let s1 = sample(setup)?;
                let dt = (s1.at - s0.at).as_secs_f64();
                let wait = s1.waited_ns.saturating_sub(s0.waited_ns);
                let back = s1.back.saturating_sub(s0.back);
                let off_cpu = back.saturating_sub(s1.back_on_cpu.saturating_sub(s0.back_on_cpu));
                if attempt < SLICE_TRIES {
                    if off_cpu as f64 > MAX_OFF_CPU * back as f64 {
                        setup.ring.restart().context("starting the ring again on its CPU")?;
                        sys::sleep(SETTLE)?;
                        continue;
                    }
                    if wait as f64 / 1e9 > MAX_WAITED * dt {
                        continue;
                    }
                }
                wall[p] += dt;
                softirq[p] += s1.softirq_ns.saturating_sub(s0.softirq_ns);
                waited[p] += wait;
                frames[p] += back;
                ticks[p].add(&s1.ticks.since(&s0.ticks));
                break;
            }
        }
    }
    if let Some(p) = frames.iter().position(|&n| n == 0) {
        bail!("no frames came back to the generator with program {p} on the balancer's veth");
    }
    Ok((0..fds.len())
        .map(|p| {
            let total = ticks[p].total().max(1) as f64;
            Rate {
                mpps: frames[p] as f64 / wall[p] / 1e6,
                busy: ticks[p].busy as f64 / total,
                steal: ticks[p].steal as f64 / total,
                softirq: softirq[p] as f64 / 1e9 / wall[p],
                waited: waited[p] as f64 / 1e9 / wall[p],
            }
        })
        .collect())
}

/// Keeps the calling thread (and the threads it starts) off the ring's
/// CPU until dropped.
struct OffRingCpu(Option<Vec<usize>>);

impl OffRingCpu {
    fn new(setup: &Setup) -> Result<OffRingCpu> {
        if setup.other_cpus.is_empty() {
            return Ok(OffRingCpu(None));
        }
        let before = sys::allowed_cpus()?;
        sys::set_cpus(&setup.other_cpus)?;
        Ok(OffRingCpu(Some(before)))
    }
}

impl Drop for OffRingCpu {
    fn drop(&mut self) {
        if let Some(cpus) = &self.0 {
            let _ = sys::set_cpus(cpus);
        }
    }
}

type LivePhases = (Vec<Vec<Round>>, Vec<ProgramTimes>, f64, Option<Vec<Vec<f64>>>);

/// The A/B rounds, the variants (when asked for) and the bpf stats phase.
/// Returns the rounds per kind, run_time_ns/run_cnt per kind, the measured
/// cost of bpf stats, and Mpps per variant per round.
fn live_phases(setup: &Setup, options: &Options, variants: Option<&[(&str, &str, RawFd)]>) -> Result<LivePhases> {
    let _off = OffRingCpu::new(setup)?;
    let phases = (|| -> Result<LivePhases> {
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); Kind::ALL.len()];
        for round in 0..options.rounds {
            for (k, kind) in Kind::ALL.into_iter().enumerate() {
                let r = ab_round(setup, kind, round + k, options.seconds)?;
                print_round(setup, kind, round, options.rounds, &r);
                rounds[k].push(r);
            }
        }
        let variant_rounds = match variants {
            None => None,
            Some(programs) => Some(variant_rounds(setup, programs, options)?),
        };
        // bpf stats: on only for this phase (they cost every program run).
        eprintln!("l4lb bench: run_time_ns/run_cnt with bpf stats on");
        let stats_overhead = stats_overhead_ns(&setup.fds)?;
        let stats = sys::enable_bpf_stats()?;
        let run_times =
            Kind::ALL.into_iter().map(|kind| run_times_of(setup, kind, options.seconds)).collect::<Result<Vec<_>>>()?;
        drop(stats);
        Ok((rounds, run_times, stats_overhead, variant_rounds))
    })();
    // The ring stops however the phases ended.
    let stopped = setup.ring.stop();
    let phases = phases?;
    stopped?;
    attach_variant(setup, Variant::L4lb, VARIANT_KIND)?;
    Ok(phases)
}

/// One A/B round of `kind`: the four programs alternated in slices (`turn`
/// decides which goes first), with the tracked l4lb's flow events.
fn ab_round(setup: &Setup, kind: Kind, turn: usize, seconds: f64) -> Result<Round> {
    let counters = |kind: Kind| setup.tracked_maps_of(kind).read_counters();
    // A row measured right after a change: the 33rd backend just added.
    if kind.changed() {
        setup.start_change()?;
    }
    switch_row(setup, kind)?;
    // A row of bounded flows: the tracked l4lb alone first, until every flow
    // has its pin; the row then measures pins that hold.
    let mut warmup_pinned = 0;
    let mut before = counters(kind)?;
    if kind.flows().is_some() {
        attach_variant(setup, Variant::L4lb, kind)?;
        let start = counters(kind)?;
        sys::sleep(FLOW_WARMUP)?;
        before = counters(kind)?;
        warmup_pinned = flow_events(&start, &before).pinned;
    }
    let fds: Vec<RawFd> = VARIANTS.iter().map(|&v| setup.fds.of(v, kind)).collect();
    let mpps = interleaved(setup, &fds, seconds, turn)?;
    let flows = FlowEvents { warmup_pinned, ..flow_events(&before, &counters(kind)?) };
    Ok(Round {
        l4lb: mpps[0].mpps,
        l4lb_untracked: mpps[1].mpps,
        plain: mpps[2].mpps,
        encap: mpps[3].mpps,
        cpu_busy: mpps.iter().map(|m| m.busy).fold(f64::INFINITY, f64::min),
        steal: mpps.iter().map(|m| m.steal).fold(0.0, f64::max),
        softirq_share: mpps.iter().map(|m| m.softirq).fold(f64::INFINITY, f64::min),
        softirq_waited: mpps.iter().map(|m| m.waited).fold(0.0, f64::max),
        flows,
    })
}

/// The progress line of one A/B round.
fn print_round(setup: &Setup, kind: Kind, round: usize, rounds: usize, r: &Round) {
    let warmup = if kind.flows().is_some() { format!(" (warm-up {})", r.flows.warmup_pinned) } else { String::new() };
    eprintln!(
        "round {}/{} {:<14} l4lb {:.3}  untracked {:.3}  plain {:.3}  encap {:.3} Mpps  l4lb/encap {:.3}, untracked {:.3}; pinned {}{}  (CPU {} busy {:.0}%, steal {:.0}%, ksoftirqd ran {:.0}%, waited {:.1}%)",
        round + 1,
        rounds,
        kind.label(),
        r.l4lb,
        r.l4lb_untracked,
        r.plain,
        r.encap,
        r.l4lb / r.encap,
        r.l4lb_untracked / r.encap,
        r.flows.pinned,
        warmup,
        setup.gen_cpu,
        100.0 * r.cpu_busy,
        100.0 * r.steal,
        100.0 * r.softirq_share,
        100.0 * r.softirq_waited
    );
}

/// The variants phase: every variant program alternated in slices on
/// VARIANT_KIND, `options.rounds` times; Mpps per program per round.
fn variant_rounds(setup: &Setup, programs: &[(&str, &str, RawFd)], options: &Options) -> Result<Vec<Vec<f64>>> {
    eprintln!("l4lb bench: variants, {}", VARIANT_KIND.label());
    switch_row(setup, VARIANT_KIND)?;
    let fds: Vec<RawFd> = programs.iter().map(|p| p.2).collect();
    let mut per_program = vec![Vec::new(); programs.len()];
    for round in 0..options.rounds {
        let rates = interleaved(setup, &fds, options.seconds, round)?;
        let busy = rates.iter().map(|r| r.busy).fold(f64::INFINITY, f64::min);
        let waited = rates.iter().map(|r| r.waited).fold(0.0, f64::max);
        let mpps: Vec<f64> = rates.iter().map(|r| r.mpps).collect();
        let encap = mpps[0];
        let line: Vec<String> = programs.iter().zip(&mpps).map(|(p, m)| format!("{} {:.3}", p.0, m / encap)).collect();
        eprintln!(
            "variants round {}/{} (share of the encap floor; CPU busy {:.0}%, ksoftirqd waited {:.1}%): {}",
            round + 1,
            options.rounds,
            100.0 * busy,
            100.0 * waited,
            line.join(", ")
        );
        for (p, m) in mpps.into_iter().enumerate() {
            per_program[p].push(m);
        }
    }
    Ok(per_program)
}

/// run_time_ns / run_cnt of each of the four programs on `kind`'s live
/// traffic (bpf stats must be on).
fn run_times_of(setup: &Setup, kind: Kind, seconds: f64) -> Result<ProgramTimes> {
    if kind.changed() {
        setup.start_change()?;
    }
    switch_row(setup, kind)?;
    let mut ns = [0f64; 4];
    for (v, &variant) in VARIANTS.iter().enumerate() {
        attach_variant(setup, variant, kind)?;
        sys::sleep(WARMUP)?;
        let fd = setup.fds.of(variant, kind);
        let before = sys::prog_info(fd)?;
        sys::sleep(Duration::from_secs_f64(STATS_SECONDS.min(seconds)))?;
        let after = sys::prog_info(fd)?;
        let runs = after.run_cnt.saturating_sub(before.run_cnt);
        if runs == 0 {
            bail!("{} did not run with bpf stats on", variant.name());
        }
        ns[v] = after.run_time_ns.saturating_sub(before.run_time_ns) as f64 / runs as f64;
    }
    Ok(ProgramTimes { l4lb: ns[0], l4lb_untracked: ns[1], plain: ns[2], encap: ns[3] })
}
