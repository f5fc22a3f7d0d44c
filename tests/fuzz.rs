//! Fuzzing the XDP datapath through BPF_PROG_TEST_RUN (repeat 1 per frame):
//! 1,000,000 random and mutated frames by default, each checked on its own.
//! Needs root (CAP_BPF); without it every test is reported as ignored.
//!
//! For every frame the reference model of tests/common/lb.rs (issue 4's
//! datapath semantics, written independently of src/bpf/; the flow hash and
//! slot from the host's model) says what must happen, and the test checks:
//! the verdict (only XDP_PASS, XDP_DROP or XDP_TX; test_run refuses only
//! frames shorter than an Ethernet header, with EINVAL); PASS and DROP leave
//! the frame byte for byte untouched; a TX frame is parsed field by field,
//! independently of the datapath, as Ethernet (the backend's or the gateway's
//! MAC, from the frame's destination MAC) + an outer IPv4 header (RFC 1071
//! checksum computed here) or an outer IPv6 header (traffic class, flow label
//! = hash & 0xfffff, payload length, next header 4 or 41, hop limit, sources)
//! towards exactly the backend the model predicts, behind the input's VLAN
//! tags (kept), followed by the input's IP packet byte for byte; a TX_TOO_BIG
//! frame is parsed as an ICMP "fragmentation needed" / ICMPv6 "packet too
//! big" answer back to the sender (MACs swapped, tags kept, IPv4 header
//! checksum, ICMP checksum and ICMPv6 checksum with its pseudo-header all
//! computed here, MTU = mtu - the backend family's overhead) whose quote is
//! the start of the input's IP packet, and compared with the model's answer
//! byte for byte; after every frame all global counters are read and must
//! have moved by exactly rx + the expected outcome (+ its FLOW_* event). At the end of a
//! slice the counters and the packets/bytes of every backend (32,768) and every
//! service (64) equal the test's own tally.
//!
//! The frames (see `Kind`): valid TCP/UDP IPv4 frames (options, fragment
//! bits, TOS, DF, lengths near the MTU) and IPv6 frames (0 to 6 extension
//! headers: hop-by-hop, routing, destination options, fragment with any offset
//! and M bit; traffic class, flow label), aimed at the slice's VIPs (address
//! and port) or anywhere; the same with 1..8 bytes changed; truncated; with
//! tot_len/IHL or payload length lied about; random bytes; other EtherTypes,
//! IP protocols and next headers; rarely shorter than 14 bytes. Issue 5
//! added: frames behind 1 to 3 VLAN tags (802.1Q / 802.1ad, sometimes cut in
//! the tags); ICMP / ICMPv6 errors to the VIPs quoting a VIP's answer, half
//! of them mutated (quote bytes, type, quoted source, lengths); IPv4 headers
//! with a wrong checksum (flipped frames get it right again half the time),
//! TTL 0 and hop limit 0. Fragments look up the fragment entries the host
//! would write.
//!
//! Slices (`SLICES`): several services (IPv4 and IPv6 VIPs, exact ports and
//! port 0, a VIP displaced from its home entry, a VIP of an inactive service,
//! a catch-all with IPv4 backends; IPv4 and IPv6 backends, own and gateway MACs; UDP with and
//! without hash_ports) with holes in a table (empty slots, slots naming a
//! backend never written, written inactive or past l4lb_backends' end); a
//! 32-backend Maglev catch-all with IPv4 backends (IPv6 packets pass) and an
//! IPv6 VIP; empty tables; the
//! lowest MTU the host accepts (576, frames up to 1200 bytes: many too-big
//! answers) with high outer addresses (outer IPv4 sums that carry past a
//! first fold); no MTU with frames up to 3000 bytes. `maglev_32_and_ipv6_vip`
//! and `low_mtu` load the driver build (l4lb_xdp_percpu.o, what `l4lb
//! attach` loads: per-CPU counters, a pin's `seen` stored), the others
//! l4lb_xdp.o (atomic adds: what iproute2 and offload load).
//!
//! Slots in transition (docs/transitions.md): in four slices some services
//! track flows (`Slice::tracked`): about 7 in 10 of their slots are words in
//! transition (`put_in_transition`: the previous backend another of the
//! service's, the same one, or one that is not the service's: inactive,
//! never written, another service's; the current one the slot's, holes and
//! a number past l4lb_backends included), their `changed` 0 to 35 s before
//! the first frame with UDP graces of 0, 10, 30 and 60 s, and the clock
//! moves 100 s over the slice (wrapping past u32::MAX in `low_mtu`), so that
//! graces end during the run and pins' `seen` moves. `mtu_unset_large_frames`
//! tracks none and `empty_tables` has no table: both must leave l4lb_flows
//! empty. The model keeps its own copy of the pins and says for each frame
//! which rule decides (SYN, a pin that holds, a flow from before the change
//! with its previous backend valid or not, a new UDP flow after the grace),
//! whether it pins (FLOW_PINNED), pins again (FLOW_REPINNED: a SYN over an
//! entry, or a stale one, e.g. a key shared by two services, whose slots
//! differ) or finds the HASH map full (FLOW_TABLE_FULL, modelled exactly:
//! `services_with_holes` loads it with 16,384 entries and fills it; a
//! current backend past l4lb_backends counts it too); the per-frame counter
//! check covers the FLOW_* counters, and at the end of a slice the kernel's
//! l4lb_flows (backend, slot, last-seen tick) must equal the model's entry
//! for entry. A fifth of the valid frames and ICMP errors come from 4
//! clients and 2 client ports per family, so that flows recur. A run of
//! 1,000,000 frames (seed 4370193062551559530) sent 157,690 frames through
//! slots in transition (13,820 followed a pin; every rule decided thousands)
//! and counted FLOW pinned 87,929, repinned 1,053, table full 47,522 (36 of
//! them for a current backend past l4lb_backends); each slice prints its own
//! figures.
//!
//! `L4LB_FUZZ_SEED=N` replays a run (the seed is printed, and named in any
//! failure); `L4LB_FUZZ_FRAMES=N` changes the total number of frames (the
//! slices share it in fixed proportions, so a replay needs the same N).

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::Instant;

use libtest_mimic::Failed;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use common::lb::{
    transition, BackendEntry, Build, FlowTable, Lb, LbConfig, Outcome, Rule, ServiceEntry, SlotWord, VipKey,
    MAGLEV_SIZE, MAX_BACKENDS, MAX_SERVICES, NCNT, SLOT_EMPTY,
};
use common::packet::internet_checksum;
use common::wire::*;
use common::{counter_moves, fail, hex, same_bytes};
use l4lb::bpf::consts::*;
use l4lb::bpf::counter::*;
use l4lb::bpf::COUNTER_NAMES;
use l4lb::maglev;

type TestResult = Result<(), Failed>;

const DEFAULT_FRAMES: u64 = 1_000_000;

fn main() {
    let settings = settings();
    if common::is_root() {
        println!(
            "fuzz: {} frames, seed {} (L4LB_FUZZ_SEED={} L4LB_FUZZ_FRAMES={} replays this run)",
            settings.frames, settings.seed, settings.seed, settings.frames
        );
    }
    common::run_suite(
        "fuzz",
        "BPF_PROG_TEST_RUN needs CAP_BPF",
        vec![
            ("services_with_holes", services_with_holes),
            ("maglev_32_and_ipv6_vip", maglev_32_and_ipv6_vip),
            ("empty_tables", empty_tables),
            ("low_mtu", low_mtu),
            ("mtu_unset_large_frames", mtu_unset_large_frames),
        ],
    )
}

// ---------------------------------------------------------------------------
// Settings and slices

struct Settings {
    seed: u64,
    frames: u64,
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let env = |name: &str| std::env::var(name).ok().and_then(|s| s.trim().parse::<u64>().ok());
        Settings {
            seed: env("L4LB_FUZZ_SEED").unwrap_or_else(rand::random::<u64>),
            frames: env("L4LB_FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES),
        }
    })
}

#[derive(Clone, Copy)]
enum Setup {
    /// Several services with VIPs, a catch-all, holes; IPv4 backends at these addresses.
    Services(&'static [[u8; 4]; 5]),
    /// A 32-backend Maglev catch-all (IPv4 backends) and an IPv6 VIP (port 0).
    Maglev32,
    /// A catch-all and a VIP whose tables were never written.
    Empty,
}

struct Slice {
    index: u64,
    name: &'static str,
    /// Share of the total number of frames, per mille (the shares add up to 1000).
    share: u64,
    setup: Setup,
    /// Configured MTU (0: unset, no limit).
    mtu: u32,
    /// Largest L3 length the generator builds.
    max_len: usize,
    /// The configured outer IPv4 source.
    src: Ipv4Addr,
    /// Services that track flows (L4LB_SERVICE_TRACK_FLOWS): some of their
    /// slots are in transition (`put_in_transition`).
    tracked: &'static [u32],
    /// l4lb_config.clock at the first frame; it moves CLOCK_SPAN seconds
    /// forward over the slice (wrapping past u32::MAX in `low_mtu`).
    clock: u32,
    /// l4lb_flows' size (a HASH map, as the object declares it): small in
    /// `services_with_holes`, which fills it.
    flow_entries: u32,
    /// The build of the datapath loaded (l4lb_xdp.o, or the driver build).
    build: Build,
}

/// Seconds the clock moves over a slice: the UDP graces (0, 10, 30, 60 s
/// after changes 0 to 35 s before the first frame) end during the run.
const CLOCK_SPAN: u64 = 100;
const UDP_GRACES: [u32; 4] = [30, 0, 60, 10];

const SLICES: [Slice; 5] = [
    Slice {
        index: 0,
        name: "services_with_holes",
        share: 400,
        setup: Setup::Services(&LOW),
        mtu: 1500,
        max_len: 1600,
        src: LB_SRC,
        tracked: &[1, 2, 3, 5],
        clock: 100_000,
        flow_entries: 16384,
        build: Build::Object,
    },
    Slice {
        index: 1,
        name: "maglev_32_and_ipv6_vip",
        share: 300,
        setup: Setup::Maglev32,
        mtu: 1500,
        max_len: 1600,
        src: LB_SRC,
        tracked: &[0, 7],
        clock: 7,
        flow_entries: L4LB_FLOW_ENTRIES,
        build: Build::Driver,
    },
    Slice {
        index: 2,
        name: "empty_tables",
        share: 50,
        setup: Setup::Empty,
        mtu: 1500,
        max_len: 1600,
        src: LB_SRC,
        tracked: &[0, 2],
        clock: 100_000,
        flow_entries: L4LB_FLOW_ENTRIES,
        build: Build::Object,
    },
    Slice {
        index: 3,
        name: "low_mtu",
        share: 150,
        setup: Setup::Services(&HIGH),
        mtu: 576,
        max_len: 1200,
        src: HIGH_SRC,
        tracked: &[1, 2, 3, 5, 6],
        clock: u32::MAX - 40,
        flow_entries: L4LB_FLOW_ENTRIES,
        build: Build::Driver,
    },
    Slice {
        index: 4,
        name: "mtu_unset_large_frames",
        share: 100,
        setup: Setup::Maglev32,
        mtu: 0,
        max_len: 3000,
        src: HIGH_SRC,
        tracked: &[],
        clock: 100_000,
        flow_entries: L4LB_FLOW_ENTRIES,
        build: Build::Object,
    },
];

fn services_with_holes() -> TestResult {
    run_slice(&SLICES[0])
}

fn maglev_32_and_ipv6_vip() -> TestResult {
    run_slice(&SLICES[1])
}

fn empty_tables() -> TestResult {
    run_slice(&SLICES[2])
}

fn low_mtu() -> TestResult {
    run_slice(&SLICES[3])
}

fn mtu_unset_large_frames() -> TestResult {
    run_slice(&SLICES[4])
}

/// Frames of this slice: its share of the total; slice 0 also takes the rounding remainder.
fn slice_frames(slice: &Slice, total: u64) -> u64 {
    let share = |s: &Slice| total * s.share / 1000;
    if slice.index == 0 {
        total - SLICES[1..].iter().map(share).sum::<u64>()
    } else {
        share(slice)
    }
}

// ---------------------------------------------------------------------------
// Addresses (documentation ranges; test_run never sends anything anywhere)

const LB_SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HIGH_SRC: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 254);
const LB_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1b, 0, 0, 0, 0, 1);
const GATEWAY_MAC: [u8; 6] = [0x02, 0x9a, 0x7e, 0x00, 0x00, 0x01];
const LOW: [[u8; 4]; 5] = [[10, 9, 0, 1], [10, 9, 0, 2], [10, 9, 0, 3], [10, 9, 0, 4], [10, 9, 0, 5]];
/// With HIGH_SRC and the low-MTU slice's sizes, about 0.3% to 0.6% of the
/// outer headers to each of these carry past one fold (searched for: the
/// first two with words read big-endian, the others little-endian).
const HIGH: [[u8; 4]; 5] =
    [[255, 255, 122, 2], [255, 255, 57, 249], [255, 255, 58, 240], [255, 255, 123, 228], [255, 255, 61, 229]];
const HASH_SEED: u32 = 0x5eed_f022;

/// The VIP addresses the generator aims at (and some that no VIP has).
const VIP4: [Ipv4Addr; 3] =
    [Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(203, 0, 113, 12)];
const VIP6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x10),
    Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x12),
];
const PORTS: [u16; 4] = [80, 443, 53, 8080];

/// Clients and client ports that a fifth of the valid frames and ICMP errors
/// come from, so that flows recur: pins are followed, SYNs meet entries,
/// fragments and whole packets of a client share keys across services.
const CLIENTS4: [[u8; 4]; 4] = [[198, 51, 100, 1], [198, 51, 100, 2], [198, 51, 100, 3], [198, 51, 100, 4]];
const CLIENT_PORTS: [u16; 2] = [40000, 40001];
const REUSE: f64 = 0.2;

/// Backend numbers the holes point to: never written, and written but inactive.
const UNSET_BACKEND: u32 = 3000;
const INACTIVE_BACKEND: u32 = 3001;
/// A steady number past l4lb_backends' end (in transition: a current
/// backend the pin cannot be made for, counted FLOW_TABLE_FULL).
const BEYOND_BACKENDS: u32 = 0x7fff;

fn mac(service: u32, i: u32) -> [u8; 6] {
    [0x02, 0xbe, 0xef, service as u8, 0x00, i as u8]
}

fn v6(tag: u16, i: u32) -> IpAddr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xbe, tag, 0, 0, 0, i as u16 + 1).into()
}

/// Fills `service` with `backends` (numbers first + i) by Maglev and marks it active.
fn add_service(
    lb: &mut Lb,
    service: u32,
    first: u32,
    backends: &[BackendEntry],
    hash_ports: bool,
) -> Result<Vec<u32>, Failed> {
    let mut flags = L4LB_SERVICE_ACTIVE;
    if hash_ports {
        flags |= L4LB_SERVICE_HASH_PORTS;
    }
    if backends.iter().any(|b| b.family == L4LB_FAMILY_IPV4 as u8) {
        flags |= L4LB_SERVICE_IPV4_BACKENDS;
    }
    let numbers: Vec<u32> = (0..backends.len() as u32).map(|i| first + i).collect();
    for (n, b) in numbers.iter().zip(backends) {
        lb.set_backend(*n, BackendEntry { service, ..*b })?;
    }
    let identities: Vec<maglev::Backend> = backends.iter().map(|b| maglev::Backend::from_addr(b.ip(), 1)).collect();
    let indices = maglev::populate(&identities, MAGLEV_SIZE).map_err(|e| fail(format!("maglev: {e}")))?;
    let table = maglev::to_numbers(&indices, &numbers);
    lb.set_service(service, flags)?;
    lb.set_table(service, &table)?;
    Ok(table)
}

fn load(slice: &Slice) -> Result<Lb, Failed> {
    let mut lb = Lb::load_build(slice.build, false, FlowTable { lru: false, entries: slice.flow_entries })?;
    lb.set_config(LbConfig {
        hash_seed: HASH_SEED,
        flags: L4LB_CONFIG_SEED_SET
            | L4LB_CONFIG_SEED_FIXED
            | L4LB_CONFIG_SRC_SET
            | L4LB_CONFIG_SRC6_SET
            | L4LB_CONFIG_GATEWAY_SET,
        mtu: slice.mtu,
        catch_all: 0,
        vip_probes: 0,
        src_v4: slice.src.octets(),
        src_v6: LB_SRC6.octets(),
        gateway_mac: GATEWAY_MAC,
        clock: slice.clock,
    })?;
    let catch_all = |lb: &mut Lb, service: u32| {
        let mut config = lb.config.clone();
        config.flags |= L4LB_CONFIG_CATCH_ALL;
        config.catch_all = service;
        lb.set_config(config)
    };
    match slice.setup {
        Setup::Services(addresses) => {
            // 1: VIP4[0]:80/tcp and :8080/tcp -> 5 IPv4 backends, holes in the table.
            let s1: Vec<BackendEntry> =
                (0..5).map(|i| BackendEntry::new(Ipv4Addr::from(addresses[i as usize]).into(), mac(1, i), 1)).collect();
            let mut table = add_service(&mut lb, 1, 10, &s1, true)?;
            lb.set_backend(
                INACTIVE_BACKEND,
                BackendEntry { flags: 0, ..BackendEntry::new(Ipv4Addr::new(10, 9, 9, 9).into(), mac(1, 99), 1) },
            )?;
            for (slot, number) in table.iter_mut().enumerate() {
                match slot % 16 {
                    3 => *number = SLOT_EMPTY,
                    7 => *number = UNSET_BACKEND,
                    11 => *number = INACTIVE_BACKEND,
                    13 => *number = BEYOND_BACKENDS,
                    _ => {}
                }
            }
            lb.set_table(1, &table)?;
            lb.add_vip(VipKey::new(VIP4[0].into(), TCP, 80), 1)?;
            lb.add_vip(VipKey::new(VIP4[0].into(), TCP, 8080), 1)?;
            // 2: VIP4[0]:0/udp (every port) -> 3 IPv6 backends behind the gateway, UDP without ports.
            let s2: Vec<BackendEntry> = (0..3).map(|i| BackendEntry::via_gateway(v6(2, i), GATEWAY_MAC, 2)).collect();
            add_service(&mut lb, 2, 20, &s2, false)?;
            lb.add_vip(VipKey::new(VIP4[0].into(), UDP, 0), 2)?;
            // 3: VIP6[0]:443/tcp and :53/udp -> 4 IPv6 backends, own and gateway MACs.
            let s3: Vec<BackendEntry> = (0..4)
                .map(|i| {
                    if i % 2 == 0 {
                        BackendEntry::new(v6(3, i), mac(3, i), 3)
                    } else {
                        BackendEntry::via_gateway(v6(3, i), GATEWAY_MAC, 3)
                    }
                })
                .collect();
            add_service(&mut lb, 3, 30, &s3, true)?;
            lb.add_vip(VipKey::new(VIP6[0].into(), TCP, 443), 3)?;
            lb.add_vip(VipKey::new(VIP6[0].into(), UDP, 53), 3)?;
            lb.add_vip(VipKey::new(VIP6[2].into(), TCP, 0), 3)?;
            lb.add_vip(VipKey::new(VIP6[2].into(), UDP, 0), 3)?;
            // 4: VIP6[1]:0/tcp -> a service that is not active.
            lb.add_vip(VipKey::new(VIP6[1].into(), TCP, 0), 4)?;
            // 6: VIP4[1]:443/tcp, placed 2 entries after its home -> 2 IPv4 backends (+ an IPv6 one).
            let s6 = vec![
                BackendEntry::new(Ipv4Addr::from(addresses[0]).into(), mac(6, 0), 6),
                BackendEntry::new(Ipv4Addr::from(addresses[4]).into(), mac(6, 1), 6),
                BackendEntry::new(v6(6, 2), mac(6, 2), 6),
            ];
            add_service(&mut lb, 6, 60, &s6, true)?;
            lb.place_vip(VipKey::new(VIP4[1].into(), TCP, 443), 6, 2)?;
            // 5: the catch-all -> 5 IPv4 backends (the last behind the gateway):
            // IPv6 packets no VIP takes go to the stack.
            // The fragment entries the host writes: per (address, protocol) the
            // port-0 VIP, else the lowest port. VIP4[2] has none (fragments
            // there go to the catch-all).
            for (addr, proto, service) in [
                (IpAddr::from(VIP4[0]), TCP, 1),
                (VIP4[0].into(), UDP, 2),
                (VIP6[0].into(), TCP, 3),
                (VIP6[0].into(), UDP, 3),
                (VIP6[2].into(), TCP, 3),
                (VIP6[2].into(), UDP, 3),
                (VIP6[1].into(), TCP, 4),
                (VIP4[1].into(), TCP, 6),
            ] {
                lb.add_vip(VipKey::fragment(addr, proto), service)?;
            }
            let s5: Vec<BackendEntry> = (0..5u32)
                .map(|i| {
                    let addr = Ipv4Addr::from(addresses[i as usize]).into();
                    if i == 4 {
                        BackendEntry::via_gateway(addr, GATEWAY_MAC, 5)
                    } else {
                        BackendEntry::new(addr, mac(5, i), 5)
                    }
                })
                .collect();
            add_service(&mut lb, 5, 50, &s5, true)?;
            catch_all(&mut lb, 5)?;
            let mut config = lb.config.clone();
            config.vip_probes = 4;
            lb.set_config(config)?;
        }
        Setup::Maglev32 => {
            let s0: Vec<BackendEntry> = (0..32)
                .map(|i| BackendEntry::new(Ipv4Addr::new(10, 32, 0, i as u8 + 1).into(), mac(0, i), 0))
                .collect();
            add_service(&mut lb, 0, 100, &s0, true)?;
            catch_all(&mut lb, 0)?;
            let s7: Vec<BackendEntry> = (0..8).map(|i| BackendEntry::new(v6(7, i), mac(7, i), 7)).collect();
            add_service(&mut lb, 7, 200, &s7, false)?;
            lb.add_vip(VipKey::new(VIP6[0].into(), TCP, 0), 7)?;
            lb.add_vip(VipKey::new(VIP6[0].into(), UDP, 0), 7)?;
            lb.add_vip(VipKey::fragment(VIP6[0].into(), TCP), 7)?;
            lb.add_vip(VipKey::fragment(VIP6[0].into(), UDP), 7)?;
        }
        Setup::Empty => {
            // Fresh maps: every slot 0, backend 0 zeroed.
            lb.set_service(0, L4LB_SERVICE_ACTIVE | L4LB_SERVICE_HASH_PORTS)?;
            catch_all(&mut lb, 0)?;
            lb.add_vip(VipKey::new(VIP4[0].into(), TCP, 80), 1)?;
            lb.add_vip(VipKey::new(VIP6[0].into(), UDP, 0), 2)?;
            lb.set_service(2, L4LB_SERVICE_ACTIVE)?;
            lb.add_vip(VipKey::fragment(VIP4[0].into(), TCP), 1)?;
            lb.add_vip(VipKey::fragment(VIP6[0].into(), UDP), 2)?;
        }
    }
    for &service in slice.tracked {
        let entry = ServiceEntry {
            flags: lb.services[service as usize].flags | L4LB_SERVICE_TRACK_FLOWS,
            changed: slice.clock.wrapping_sub(5 * service),
            udp_grace: UDP_GRACES[service as usize % UDP_GRACES.len()],
            idle_timeout: 300,
        };
        lb.set_service_entry(service, entry)?;
        put_in_transition(&mut lb, service)?;
    }
    Ok(lb)
}

/// Puts about 7 in 10 of `service`'s non-empty slots in transition (none if
/// its table was never written), chosen by slot: the current backend is the
/// slot's (a hole's number too), the previous one another backend of the
/// service (3 in 10), the same number ("pins only", 1 in 10), or a number
/// that is not one of the service's: the inactive entry, one never written,
/// a backend of another service (1 in 10 each). The datapath must take the
/// current backend for old flows whose previous one is not the service's.
fn put_in_transition(lb: &mut Lb, service: u32) -> TestResult {
    let Some(table) = lb.tables[service as usize].clone() else { return Ok(()) };
    let own: Vec<u32> = (0..MAX_BACKENDS as u32).filter(|&n| lb.service_backend(n, service)).collect();
    let foreign = (0..MAX_BACKENDS as u32)
        .find(|&n| lb.backends[n as usize].active() && lb.backends[n as usize].service != service);
    ensure!(!own.is_empty() && foreign.is_some(), "service {service}: backends {own:?}, another service's {foreign:?}");
    let words: Vec<u32> = table
        .iter()
        .enumerate()
        .map(|(slot, &word)| {
            let pick = (slot as u32).wrapping_mul(0x9e37_79b1) >> 20;
            let previous = match pick % 10 {
                _ if word == SLOT_EMPTY => return word,
                0..=2 => own[(pick / 10) as usize % own.len()],
                3 => word,
                4 => INACTIVE_BACKEND,
                5 => UNSET_BACKEND,
                6 => foreign.unwrap_or(UNSET_BACKEND),
                _ => return word,
            };
            transition(word, previous)
        })
        .collect();
    lb.set_table(service, &words)
}

// ---------------------------------------------------------------------------
// Frame generation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A valid TCP/UDP IPv4 frame (options, fragments, TOS, DF, lengths at random).
    Valid4,
    /// A valid TCP/UDP IPv6 frame (extension headers, fragments, class, label, lengths).
    Valid6,
    /// A valid frame (either family) with 1..8 bytes changed.
    Flipped,
    /// A valid frame cut at a random length (at least 14 bytes).
    Truncated,
    /// A valid IPv4 frame whose tot_len and/or IHL lie.
    Lied4,
    /// A valid IPv6 frame whose payload length or an extension header's length lies.
    Lied6,
    /// Random bytes (some behind EtherType IPv4/IPv6, some also with the version).
    Random,
    /// Other EtherTypes (ARP, VLAN, swapped, random), IP protocols and next headers.
    Other,
    /// Fewer than 14 bytes: refused by test_run.
    Tiny,
    /// A valid frame (either family, or an ICMP error) behind 1 to 3 VLAN tags, sometimes cut in the tags.
    Vlan,
    /// An ICMP / ICMPv6 error to a VIP quoting a VIP's answer; half of them mutated
    /// (quote bytes, type, quoted source, lengths).
    IcmpError,
    /// A valid frame with a wrong IPv4 header checksum, TTL 0 or hop limit 0.
    BadCsumTtl,
}

const KINDS: [(Kind, u32); 12] = [
    (Kind::Valid4, 140),
    (Kind::Valid6, 140),
    (Kind::Flipped, 150),
    (Kind::Truncated, 90),
    (Kind::Lied4, 70),
    (Kind::Lied6, 70),
    (Kind::Random, 70),
    (Kind::Other, 98),
    (Kind::Tiny, 2),
    (Kind::Vlan, 60),
    (Kind::IcmpError, 80),
    (Kind::BadCsumTtl, 30),
];

const OTHER_PROTOCOLS: [u8; 8] = [ICMP, IPIP, GRE, ESP, SCTP, IPV6_IN_IPV4, 0, 255];
const OTHER_NEXT_HEADERS: [u8; 8] = [58, 59, IPIP, IPV6_IN_IPV4, GRE, ESP, 51, SCTP];
const EXT_HEADERS: [u8; 4] = [0, 43, 60, 44];

struct Generator {
    rng: StdRng,
    /// Random bytes that options, L4 headers and payloads are copied from.
    pool: Vec<u8>,
    mtu: u32,
    max_len: usize,
}

/// Recomputes the checksum of the IPv4 header at `at` (when its IHL is sane and the header is whole).
fn fix_checksum_at(bytes: &mut [u8], at: usize) {
    let header_len = usize::from(bytes[at] & 0x0f) * 4;
    if header_len < 20 || bytes.len() < at + header_len {
        return;
    }
    bytes[at + 10..at + 12].fill(0);
    let sum = internet_checksum(&bytes[at..at + header_len]);
    bytes[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
}

/// The same for an untagged frame's IPv4 header, if it has one.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() >= ETH_LEN + 20 && frame[12..14] == ETHERTYPE_IPV4.to_be_bytes() {
        fix_checksum_at(frame, ETH_LEN);
    }
}

fn be16(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]))
}

impl Generator {
    fn new(seed: u64, slice: &Slice) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pool = vec![0u8; 1 << 16];
        rng.fill_bytes(&mut pool);
        Generator { rng, pool, mtu: slice.mtu, max_len: slice.max_len }
    }

    fn kind(&mut self) -> Kind {
        let mut pick = self.rng.gen_range(0..1000);
        for (kind, weight) in KINDS {
            if pick < weight {
                return kind;
            }
            pick -= weight;
        }
        unreachable!("weights add up to 1000")
    }

    /// `len` random bytes appended to `buf`.
    fn random_bytes(&mut self, buf: &mut Vec<u8>, len: usize) {
        let start = self.rng.gen_range(0..self.pool.len() - len);
        buf.extend_from_slice(&self.pool[start..start + len]);
    }

    fn tcp_or_udp(&mut self) -> u8 {
        if self.rng.gen() {
            TCP
        } else {
            UDP
        }
    }

    /// Builds a frame of `kind` into `buf`.
    fn frame(&mut self, kind: Kind, buf: &mut Vec<u8>) {
        buf.clear();
        match kind {
            Kind::Valid4 => {
                let proto = self.tcp_or_udp();
                self.ipv4(buf, proto);
            }
            Kind::Valid6 => {
                let proto = self.tcp_or_udp();
                self.ipv6(buf, proto);
            }
            Kind::Flipped => {
                self.either(buf);
                for _ in 0..self.rng.gen_range(1..=8) {
                    // Mostly in the headers, where it matters.
                    let end = if self.rng.gen_bool(0.7) { buf.len().min(ETH_LEN + 100) } else { buf.len() };
                    let at = self.rng.gen_range(0..end);
                    buf[at] ^= self.rng.gen_range(1..=255u8);
                }
                // Half the time the IPv4 header checksum is made right again, so
                // that the flips reach the checks behind it.
                if self.rng.gen() {
                    fix_ipv4_checksum(buf);
                }
            }
            Kind::Truncated => {
                self.either(buf);
                let len = if self.rng.gen_bool(0.6) {
                    self.rng.gen_range(ETH_LEN..=buf.len().min(ETH_LEN + 120))
                } else {
                    self.rng.gen_range(ETH_LEN..=buf.len())
                };
                buf.truncate(len);
            }
            Kind::Lied4 => {
                let proto = self.tcp_or_udp();
                self.ipv4(buf, proto);
                let ip = ETH_LEN;
                let tot_len = be16(buf, ip + 2) as u16;
                let lie = self.rng.gen_range(0..10);
                if lie < 6 {
                    let header_len = u16::from(buf[ip] & 0x0f) * 4;
                    let new = match self.rng.gen_range(0..5) {
                        0 => self.rng.gen(),
                        1 => tot_len.wrapping_add(self.rng.gen_range(1..=8)),
                        2 => tot_len.wrapping_sub(self.rng.gen_range(1..=8)),
                        // Around the end of the IPv4 header: ports outside the packet.
                        3 => header_len + self.rng.gen_range(0..=5),
                        _ => self.rng.gen_range(0..=64),
                    };
                    buf[ip + 2..ip + 4].copy_from_slice(&new.to_be_bytes());
                }
                if lie >= 4 {
                    buf[ip] = 0x40 | self.rng.gen_range(0..16u8);
                }
            }
            Kind::Lied6 => {
                let proto = self.tcp_or_udp();
                let ext_end = self.ipv6(buf, proto);
                let ip = ETH_LEN;
                let payload_len = be16(buf, ip + 4) as u16;
                let new = match self.rng.gen_range(0..7) {
                    0 => self.rng.gen(),
                    1 => payload_len.wrapping_add(self.rng.gen_range(1..=8)),
                    2 => payload_len.wrapping_sub(self.rng.gen_range(1..=8)),
                    // Around the end of the extension headers: headers or ports outside the packet.
                    3 => (ext_end - 40 + self.rng.gen_range(0..=5)).saturating_sub(self.rng.gen_range(0..=8)) as u16,
                    4 => 0,
                    _ => {
                        // An extension header's length field, if there is one; else the version.
                        if ext_end > 40 && buf[ip + 6] != 44 {
                            buf[ip + 41] = self.rng.gen();
                        } else {
                            buf[ip] = self.rng.gen_range(0..16u8) << 4 | (buf[ip] & 0x0f);
                        }
                        payload_len
                    }
                };
                buf[ip + 4..ip + 6].copy_from_slice(&new.to_be_bytes());
            }
            Kind::Random => {
                let len = if self.rng.gen_bool(0.7) {
                    self.rng.gen_range(ETH_LEN..=128)
                } else {
                    self.rng.gen_range(ETH_LEN..=1600)
                };
                self.random_bytes(buf, len);
                let variant = self.rng.gen_range(0..10);
                let v6 = self.rng.gen_bool(0.5);
                if variant >= 4 {
                    let ethertype = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
                    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
                }
                if variant >= 7 && buf.len() > ETH_LEN + 9 {
                    let proto = self.tcp_or_udp();
                    if v6 {
                        buf[ETH_LEN] = 0x60 | (buf[ETH_LEN] & 0x0f);
                        buf[ETH_LEN + 6] = if self.rng.gen() { proto } else { EXT_HEADERS[self.rng.gen_range(0..4)] };
                    } else {
                        buf[ETH_LEN] = 0x40 | (buf[ETH_LEN] & 0x0f);
                        buf[ETH_LEN + 9] = proto;
                    }
                }
            }
            Kind::Other => match self.rng.gen_range(0..3) {
                0 => {
                    let proto = if self.rng.gen_bool(0.8) {
                        OTHER_PROTOCOLS[self.rng.gen_range(0..OTHER_PROTOCOLS.len())]
                    } else {
                        loop {
                            let p: u8 = self.rng.gen();
                            if p != TCP && p != UDP {
                                break p;
                            }
                        }
                    };
                    self.ipv4(buf, proto);
                }
                1 => {
                    let next = if self.rng.gen_bool(0.8) {
                        OTHER_NEXT_HEADERS[self.rng.gen_range(0..OTHER_NEXT_HEADERS.len())]
                    } else {
                        loop {
                            let p: u8 = self.rng.gen();
                            if ![TCP, UDP, 0, 43, 60, 44].contains(&p) {
                                break p;
                            }
                        }
                    };
                    self.ipv6(buf, next);
                }
                _ => {
                    self.either(buf);
                    let ethertype = match self.rng.gen_range(0..6) {
                        0 => ETHERTYPE_ARP,
                        1 => ETHERTYPE_IPV6.swap_bytes(),
                        2 => ETHERTYPE_VLAN,
                        3 => ETHERTYPE_IPV4.swap_bytes(),
                        4 => 0x0801,
                        _ => loop {
                            let t: u16 = self.rng.gen();
                            if t != ETHERTYPE_IPV4 && t != ETHERTYPE_IPV6 {
                                break t;
                            }
                        },
                    };
                    let inner = [buf[12], buf[13]];
                    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
                    if ethertype == ETHERTYPE_VLAN {
                        // A tag, then the real EtherType: still not IP at offset 12.
                        let tag = [self.rng.gen(), self.rng.gen(), inner[0], inner[1]];
                        for (i, byte) in tag.into_iter().enumerate() {
                            buf.insert(ETH_LEN + i, byte);
                        }
                    }
                }
            },
            Kind::Tiny => {
                let len = self.rng.gen_range(0..ETH_LEN);
                self.random_bytes(buf, len);
            }
            Kind::Vlan => {
                if self.rng.gen_bool(0.8) {
                    self.either(buf);
                } else {
                    self.icmp_error(buf);
                }
                let tags = match self.rng.gen_range(0..10) {
                    0..=4 => 1,
                    5..=8 => 2,
                    _ => 3,
                };
                for i in 0..tags {
                    let tpid: u16 = if i == 0 && self.rng.gen() { 0x88a8 } else { 0x8100 };
                    let tag = [tpid.to_be_bytes(), self.rng.gen::<u16>().to_be_bytes()].concat();
                    for (k, byte) in tag.into_iter().enumerate() {
                        buf.insert(12 + k, byte);
                    }
                }
                if self.rng.gen_bool(0.1) {
                    let len = self.rng.gen_range(ETH_LEN..=(ETH_LEN + 4 * tags).min(buf.len()));
                    buf.truncate(len);
                }
            }
            Kind::IcmpError => self.icmp_error(buf),
            Kind::BadCsumTtl => {
                let v6 = self.rng.gen_bool(0.3);
                let proto = if self.rng.gen_bool(0.1) { ICMP } else { self.tcp_or_udp() };
                if v6 {
                    self.ipv6(buf, if proto == ICMP { 58 } else { proto });
                    buf[ETH_LEN + 7] = 0;
                } else {
                    self.ipv4(buf, proto);
                    match self.rng.gen_range(0..3) {
                        0 => {
                            buf[ETH_LEN + 8] = 0;
                            fix_ipv4_checksum(buf);
                        }
                        1 => buf[ETH_LEN + 10 + self.rng.gen_range(0..2)] ^= 1 << self.rng.gen_range(0..8),
                        _ => {
                            let header_len = usize::from(buf[ETH_LEN] & 0x0f) * 4;
                            let at = ETH_LEN + self.rng.gen_range(0..header_len);
                            buf[at] ^= self.rng.gen_range(1..=255u8);
                        }
                    }
                }
            }
        }
    }

    /// An ICMP destination unreachable (IPv4) or ICMPv6 destination
    /// unreachable / packet too big to a VIP address, quoting a VIP's answer
    /// to a client (VIP:port -> client:port), sized up to the MTU and beyond;
    /// half of them mutated.
    fn icmp_error(&mut self, buf: &mut Vec<u8>) {
        let v6 = self.rng.gen_bool(0.4);
        let proto = self.tcp_or_udp();
        let reuse = self.rng.gen_bool(REUSE);
        let (vport, cport) = (self.port(), self.client_port(reuse));
        let mut quoted = Vec::new();
        if v6 {
            let vip = VIP6[self.rng.gen_range(0..VIP6.len())];
            quoted.extend_from_slice(&(6u32 << 28 | self.rng.gen_range(0..1u32 << 28)).to_be_bytes());
            quoted.extend_from_slice(&[0, 0, proto, 64]);
            quoted.extend_from_slice(&vip.octets());
            let client = self.client6(reuse);
            quoted.extend_from_slice(&client);
        } else {
            let vip = VIP4[self.rng.gen_range(0..VIP4.len())];
            let ihl = if self.rng.gen_bool(0.8) { 5 } else { self.rng.gen_range(6..=15) };
            quoted.extend_from_slice(&[0x40 | ihl as u8, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
            quoted.extend_from_slice(&vip.octets());
            let client = self.client4(reuse);
            quoted.extend_from_slice(&client);
            self.random_bytes(&mut quoted, (ihl - 5) * 4);
        }
        quoted.extend_from_slice(&vport.to_be_bytes());
        quoted.extend_from_slice(&cport.to_be_bytes());
        let header = if v6 { 40 } else { 20 };
        let fixed = header + 8 + quoted.len();
        let len = self.length(fixed);
        self.random_bytes(&mut quoted, len - fixed);
        if !v6 {
            let ql = quoted.len() as u16;
            quoted[2..4].copy_from_slice(&ql.to_be_bytes());
            fix_checksum_at(&mut quoted, 0);
        } else {
            let pl = (quoted.len() - 40) as u16;
            quoted[4..6].copy_from_slice(&pl.to_be_bytes());
        }
        let rest: u32 = if self.rng.gen() { self.rng.gen_range(68..9000) } else { 0 };
        let (icmp_type, code) = if v6 {
            (self.rng.gen_range(1..=2u8), self.rng.gen_range(0..7u8))
        } else {
            (3u8, self.rng.gen_range(0..16u8))
        };
        let mut message = vec![icmp_type, code, 0, 0];
        message.extend_from_slice(&rest.to_be_bytes());
        message.extend_from_slice(&quoted);
        let router: u128 = self.rng.gen();
        let dst: Vec<u8> = quoted[if v6 { 8..24 } else { 12..16 }].to_vec();
        if v6 {
            let sum = common::lb::icmpv6_checksum(&router.to_be_bytes(), &dst, &message);
            message[2..4].copy_from_slice(&sum.to_be_bytes());
            self.ethernet(buf, ETHERTYPE_IPV6);
            buf.extend_from_slice(&(6u32 << 28 | self.rng.gen_range(0..1u32 << 28)).to_be_bytes());
            buf.extend_from_slice(&(message.len() as u16).to_be_bytes());
            buf.extend_from_slice(&[58, self.rng.gen_range(1..=255)]);
            buf.extend_from_slice(&router.to_be_bytes());
            buf.extend_from_slice(&dst);
        } else {
            let sum = internet_checksum(&message);
            message[2..4].copy_from_slice(&sum.to_be_bytes());
            self.ethernet(buf, ETHERTYPE_IPV4);
            let df: u8 = if self.rng.gen() { 0x40 } else { 0 };
            buf.extend_from_slice(&[0x45, self.rng.gen()]);
            buf.extend_from_slice(&((20 + message.len()) as u16).to_be_bytes());
            buf.extend_from_slice(&[self.rng.gen(), self.rng.gen(), df, 0, self.rng.gen_range(1..=255), ICMP, 0, 0]);
            buf.extend_from_slice(&(router as u32).to_be_bytes());
            buf.extend_from_slice(&dst);
        }
        buf.extend_from_slice(&message);
        if self.rng.gen() {
            // Mutations: bytes of the ICMP header or quote, the quoted source,
            // the lengths, the type; the IPv4 header checksum made right again.
            let ip = ETH_LEN;
            let icmp = ip + header;
            match self.rng.gen_range(0..6) {
                0 | 1 => {
                    for _ in 0..self.rng.gen_range(1..=4) {
                        let at = self.rng.gen_range(icmp..buf.len().min(icmp + 8 + header + 8));
                        buf[at] ^= self.rng.gen_range(1..=255u8);
                    }
                }
                2 => buf[icmp] = self.rng.gen(),
                3 => {
                    let at = icmp + 8 + if v6 { 8 } else { 12 };
                    buf[at + self.rng.gen_range(0..4)] ^= 0x01;
                }
                4 => {
                    let keep = self.rng.gen_range(0..=8 + header + 8);
                    let new = (if v6 { 8 } else { header + 8 } + keep) as u16;
                    let at = if v6 { ip + 4 } else { ip + 2 };
                    buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
                    if self.rng.gen() {
                        buf.truncate(icmp + 8 + keep);
                    }
                }
                _ => buf.truncate(self.rng.gen_range(ETH_LEN..buf.len())),
            }
            if !v6 {
                fix_ipv4_checksum(buf);
            }
        }
        self.trailer(buf);
    }

    /// A valid TCP/UDP frame of either family.
    fn either(&mut self, buf: &mut Vec<u8>) {
        let proto = self.tcp_or_udp();
        if self.rng.gen() {
            self.ipv4(buf, proto);
        } else {
            self.ipv6(buf, proto);
        }
    }

    fn ethernet(&mut self, buf: &mut Vec<u8>, ethertype: u16) {
        let mut macs = [0u8; 12];
        self.rng.fill_bytes(&mut macs);
        buf.extend_from_slice(&macs);
        buf.extend_from_slice(&ethertype.to_be_bytes());
    }

    /// An IPv4 client address: one of CLIENTS4 when `reuse`, else random.
    fn client4(&mut self, reuse: bool) -> [u8; 4] {
        if reuse {
            CLIENTS4[self.rng.gen_range(0..CLIENTS4.len())]
        } else {
            self.rng.gen::<u32>().to_be_bytes()
        }
    }

    /// An IPv6 client address: 2001:db8:c1::1..4 when `reuse`, else random.
    fn client6(&mut self, reuse: bool) -> [u8; 16] {
        if reuse {
            Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, self.rng.gen_range(1..=4)).octets()
        } else {
            self.rng.gen::<u128>().to_be_bytes()
        }
    }

    fn client_port(&mut self, reuse: bool) -> u16 {
        if reuse {
            CLIENT_PORTS[self.rng.gen_range(0..CLIENT_PORTS.len())]
        } else {
            self.rng.gen()
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.gen_bool(0.6) {
            PORTS[self.rng.gen_range(0..PORTS.len())]
        } else {
            self.rng.gen()
        }
    }

    /// The L4 header length for `proto` (random bytes, TCP data offset fixed).
    fn l4_len(&mut self, proto: u8) -> usize {
        match proto {
            TCP => 20 + 4 * self.rng.gen_range(0..=2) * usize::from(self.rng.gen_bool(0.2)),
            UDP => 8,
            _ => self.rng.gen_range(0..=20),
        }
    }

    /// A packet length from `fixed` up: small, anywhere, around the MTU (for
    /// either outer header), or exactly `fixed`.
    fn length(&mut self, fixed: usize) -> usize {
        let max = self.max_len.max(fixed);
        match self.rng.gen_range(0..20) {
            0..=9 => fixed + self.rng.gen_range(0..=64),
            10..=14 => self.rng.gen_range(fixed..=max),
            15..=18 => {
                let overhead = if self.rng.gen() { 20 } else { 40 };
                let around = if self.mtu != 0 { self.mtu as usize - overhead } else { max };
                (around + self.rng.gen_range(0..=8)).saturating_sub(4).clamp(fixed, max)
            }
            _ => fixed,
        }
    }

    /// Trailing bytes behind the packet: padding to 60, or more.
    fn trailer(&mut self, buf: &mut Vec<u8>) {
        match self.rng.gen_range(0..10) {
            0 | 1 => {
                let extra = self.rng.gen_range(1..=40);
                self.random_bytes(buf, extra);
            }
            2 | 3 if buf.len() < 60 => buf.resize(60, 0),
            _ => {}
        }
    }

    /// A well-formed IPv4 frame of protocol `proto` with random fields.
    fn ipv4(&mut self, buf: &mut Vec<u8>, proto: u8) {
        self.ethernet(buf, ETHERTYPE_IPV4);
        let rng = &mut self.rng;
        let ihl: usize = if rng.gen_bool(0.7) { 5 } else { rng.gen_range(6..=15) };
        let header_len = ihl * 4;
        let df = rng.gen::<bool>();
        let (mf, offset) = match rng.gen_range(0..8) {
            0 => (true, 0u16),                                  // first fragment
            1 => (rng.gen::<bool>(), rng.gen_range(1..0x2000)), // later fragment
            _ => (false, 0),
        };
        let reserved = rng.gen_bool(0.02);
        let frag_off = (u16::from(reserved) << 15) | (u16::from(df) << 14) | (u16::from(mf) << 13) | offset;
        let l4_len = if offset != 0 { 0 } else { self.l4_len(proto) };
        let tot_len = self.length(header_len + l4_len);
        let dst = if self.rng.gen_bool(0.6) {
            VIP4[self.rng.gen_range(0..VIP4.len())]
        } else {
            Ipv4Addr::from(self.rng.gen::<u32>())
        };
        let reuse = self.rng.gen_bool(REUSE);
        let src = self.client4(reuse);

        let ip = buf.len();
        buf.extend_from_slice(&[0x40 | ihl as u8, self.rng.gen()]);
        buf.extend_from_slice(&(tot_len as u16).to_be_bytes());
        buf.extend_from_slice(&self.rng.gen::<u16>().to_be_bytes());
        buf.extend_from_slice(&frag_off.to_be_bytes());
        buf.extend_from_slice(&[self.rng.gen(), proto, 0, 0]);
        buf.extend_from_slice(&src);
        buf.extend_from_slice(&dst.octets());
        // Options, L4 header and payload: random bytes, then the ports.
        self.random_bytes(buf, tot_len - 20);
        if l4_len >= 4 {
            let (sport, dport) = (self.client_port(reuse), self.port());
            buf[ip + header_len..ip + header_len + 2].copy_from_slice(&sport.to_be_bytes());
            buf[ip + header_len + 2..ip + header_len + 4].copy_from_slice(&dport.to_be_bytes());
        }
        if proto == TCP && l4_len >= 20 {
            // A TCP data offset that matches the header built.
            buf[ip + header_len + 12] = ((l4_len / 4) as u8) << 4 | (buf[ip + header_len + 12] & 0x0f);
        }
        let checksum = internet_checksum(&buf[ip..ip + header_len]);
        buf[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
        self.trailer(buf);
    }

    /// A well-formed IPv6 frame whose upper protocol is `proto`, behind 0 to 6
    /// extension headers. Returns where the extension headers end (from the
    /// IPv6 header's start).
    fn ipv6(&mut self, buf: &mut Vec<u8>, proto: u8) -> usize {
        self.ethernet(buf, ETHERTYPE_IPV6);
        let ip = buf.len();
        let count = match self.rng.gen_range(0..100) {
            0..=54 => 0,
            55..=94 => self.rng.gen_range(1..=4),
            _ => self.rng.gen_range(5..=6),
        };
        let chain: Vec<u8> = (0..count).map(|_| EXT_HEADERS[self.rng.gen_range(0..4)]).collect();
        let vtc = 6u32 << 28 | self.rng.gen_range(0..1u32 << 28);
        buf.extend_from_slice(&vtc.to_be_bytes());
        buf.extend_from_slice(&[0, 0, chain.first().copied().unwrap_or(proto), self.rng.gen()]);
        let reuse = self.rng.gen_bool(REUSE);
        let src = self.client6(reuse);
        buf.extend_from_slice(&src);
        let dst = if self.rng.gen_bool(0.6) {
            VIP6[self.rng.gen_range(0..VIP6.len())]
        } else {
            Ipv6Addr::from(self.rng.gen::<u128>())
        };
        buf.extend_from_slice(&dst.octets());

        let mut later_fragment = false;
        for (i, &code) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied().unwrap_or(proto);
            if code == 44 {
                let offset: u16 = if self.rng.gen_bool(0.6) { 0 } else { self.rng.gen_range(1..0x2000) };
                later_fragment |= offset != 0;
                let field = offset << 3 | self.rng.gen_range(0..8u16); // M bit and the reserved bits
                buf.extend_from_slice(&[next, self.rng.gen()]);
                buf.extend_from_slice(&field.to_be_bytes());
                buf.extend_from_slice(&self.rng.gen::<u32>().to_be_bytes());
            } else {
                let units: u8 = if self.rng.gen_bool(0.8) { 0 } else { self.rng.gen_range(1..=3) };
                buf.extend_from_slice(&[next, units]);
                self.random_bytes(buf, (usize::from(units) + 1) * 8 - 2);
            }
        }
        let ext_end = buf.len() - ip;
        let l4_len = if later_fragment { 0 } else { self.l4_len(proto) };
        let len = self.length(ext_end + l4_len);
        self.random_bytes(buf, len - ext_end);
        if l4_len >= 4 {
            let (sport, dport) = (self.client_port(reuse), self.port());
            buf[ip + ext_end..ip + ext_end + 2].copy_from_slice(&sport.to_be_bytes());
            buf[ip + ext_end + 2..ip + ext_end + 4].copy_from_slice(&dport.to_be_bytes());
        }
        if proto == TCP && l4_len >= 20 {
            buf[ip + ext_end + 12] = ((l4_len / 4) as u8) << 4 | (buf[ip + ext_end + 12] & 0x0f);
        }
        buf[ip + 4..ip + 6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        self.trailer(buf);
        ext_end
    }
}

// ---------------------------------------------------------------------------
// The run

/// What a slice saw, for the summary line.
#[derive(Default)]
struct Tally {
    counters: [u64; NCNT],
    backends: Vec<(u64, u64)>,
    services: Vec<(u64, u64)>,
    refused: u64,
    kinds: [u64; KINDS.len()],
    /// TX frames by (outer family, inner family): 4in4, 4in6, 6in6.
    families: [u64; 3],
    /// TX frames whose outer IPv4 header sum (words read either way round) still carries after one fold.
    carries: u64,
    /// TX_TOO_BIG answers: ICMP, ICMPv6.
    answers: [u64; 2],
    /// TX frames that were ICMP errors, and TX frames with VLAN tags.
    icmp_tx: u64,
    tagged_tx: u64,
    /// Frames in a slot in transition, those of them that followed a pin,
    /// and how many each rule decided (RULES' order).
    tracked: u64,
    followed: u64,
    rules: [u64; RULES.len()],
}

/// The rules of a slot in transition, in the summary's order.
const RULES: [Rule; 5] = [Rule::Syn, Rule::Pin, Rule::Previous, Rule::PreviousGone, Rule::New];

/// Whether the one's-complement sum of `header` (checksum field zeroed) needs
/// a second fold, with 16-bit words read big- or little-endian.
fn carries_twice(header: &[u8], little_endian: bool) -> bool {
    let sum: u32 = header
        .chunks(2)
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, w)| {
            u32::from(if little_endian { u16::from_le_bytes([w[0], w[1]]) } else { u16::from_be_bytes([w[0], w[1]]) })
        })
        .sum();
    (sum & 0xffff) + (sum >> 16) > 0xffff
}

fn run_slice(slice: &Slice) -> TestResult {
    let settings = settings();
    let frames = slice_frames(slice, settings.frames);
    let seed = settings.seed ^ slice.index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let replay =
        format!("[seed {0}: L4LB_FUZZ_SEED={0} L4LB_FUZZ_FRAMES={1} replays it]", settings.seed, settings.frames);
    fuzz(slice, frames, seed)
        .map_err(|failed| fail(format!("{}: {} {replay}", slice.name, failed.message().unwrap_or("failed"))))
}

fn fuzz(slice: &Slice, frames: u64, seed: u64) -> TestResult {
    let started = Instant::now();
    let mut lb = load(slice)?;
    let mut generator = Generator::new(seed, slice);
    let mut tally =
        Tally { backends: vec![(0, 0); MAX_BACKENDS], services: vec![(0, 0); MAX_SERVICES], ..Tally::default() };
    let mut frame = Vec::with_capacity(4096);
    let mut out = vec![0u8; 8192];
    let counters = lb.counters()?;
    ensure!(counters == tally.counters, "counters not zero after loading: {counters:?}");

    for index in 0..frames {
        // The tick moves on: 0 to CLOCK_SPAN seconds from the slice's start.
        let clock = slice.clock.wrapping_add((index * CLOCK_SPAN / frames.max(1)) as u32);
        if clock != lb.config.clock {
            lb.set_clock(clock)?;
        }
        let kind = generator.kind();
        generator.frame(kind, &mut frame);
        tally.kinds[KINDS.iter().position(|(k, _)| *k == kind).unwrap()] += 1;
        let (expect, tracking) = lb.classify_tracked(&frame);
        let before = tally.counters;
        let what =
            || format!("frame {index} ({kind:?}, {} bytes: {})", frame.len(), hex(&frame[..frame.len().min(120)]));

        match (expect, lb.run_into(&frame, &mut out)) {
            (Outcome::Refused, Err(error)) if error.kind() == libbpf_rs::ErrorKind::InvalidInput => tally.refused += 1,
            (Outcome::Refused, Err(error)) => {
                return Err(fail(format!("{}: test_run failed with {error}, expected EINVAL", what())))
            }
            (Outcome::Refused, Ok((verdict, _))) => {
                return Err(fail(format!(
                    "{}: test_run ran the program ({}), expected EINVAL",
                    what(),
                    verdict_name(verdict)
                )))
            }
            (_, Err(error)) => return Err(fail(format!("{}: test_run failed: {error}", what()))),
            (_, Ok((verdict, len))) => {
                let output = &out[..len];
                ensure!(
                    [XDP_PASS, XDP_DROP, XDP_TX].contains(&verdict),
                    "{}: verdict {verdict}, not one of XDP_PASS, XDP_DROP, XDP_TX",
                    what()
                );
                let (wanted, outcome) = expect.verdict_and_counter();
                if verdict != wanted {
                    let counters = lb.counters()?;
                    return Err(fail(format!(
                        "{}: verdict {}, expected {} ({expect:?}); counters moved: {}",
                        what(),
                        verdict_name(verdict),
                        verdict_name(wanted),
                        counter_moves(&COUNTER_NAMES, &before, &counters)
                    )));
                }
                match expect {
                    Outcome::Tx(tx) => {
                        lb.check_tx_output(&frame, output, &tx).map_err(|message| {
                            fail(format!(
                                "{}: XDP_TX to backend {} ({}): {message}",
                                what(),
                                tx.backend,
                                lb.backends[tx.backend as usize].ip()
                            ))
                        })?;
                        if tx.overhead == 20 {
                            let outer = &output[tx.l2_len..tx.l2_len + 20];
                            tally.carries += u64::from(carries_twice(outer, false) || carries_twice(outer, true));
                        }
                        tally.families[if tx.overhead == 20 {
                            0
                        } else if tx.inner_v6 {
                            2
                        } else {
                            1
                        }] += 1;
                        tally.icmp_tx += u64::from(tx.icmp_error);
                        tally.tagged_tx += u64::from(tx.l2_len > ETH_LEN);
                        tally.backends[tx.backend as usize].0 += 1;
                        tally.backends[tx.backend as usize].1 += len as u64;
                        tally.services[tx.service as usize].0 += 1;
                        tally.services[tx.service as usize].1 += len as u64;
                    }
                    Outcome::TooBig(tb) => {
                        common::lb::check_too_big_output(&frame, output, &tb).map_err(|message| {
                            fail(format!("{}: XDP_TX ICMP answer (mtu {}): {message}", what(), tb.mtu))
                        })?;
                        same_bytes(&what(), output, &common::lb::too_big_answer(&frame, &tb))?;
                        tally.answers[usize::from(tb.v6)] += 1;
                    }
                    // The datapath writes nothing before it decides to pass or drop.
                    _ if output != &frame[..] => same_bytes(&what(), output, &frame)?,
                    _ => {}
                }
                tally.counters[L4LB_CNT_RX as usize] += 1;
                tally.counters[outcome as usize] += 1;
                if let Some(t) = &tracking {
                    tally.tracked += 1;
                    tally.followed += u64::from(t.followed);
                    tally.rules[RULES.iter().position(|r| *r == t.rule).unwrap()] += 1;
                    if let Some(event) = t.event() {
                        tally.counters[event as usize] += 1;
                    }
                }
                lb.pin_applied(&tracking);
            }
        }

        let counters = lb.counters()?;
        if counters != tally.counters {
            return Err(fail(format!(
                "{}: counters moved: {}; expected: {} ({expect:?})",
                what(),
                counter_moves(&COUNTER_NAMES, &before, &counters),
                counter_moves(&COUNTER_NAMES, &before, &tally.counters)
            )));
        }
    }

    // The totals: every frame run is in rx and in exactly one outcome, and
    // the per-backend and per-service traffic is what the test saw leave.
    let counters = lb.counters()?;
    let run = frames - tally.refused;
    let rx = counters[L4LB_CNT_RX as usize];
    // The FLOW_* counters after the outcomes are events, not outcomes.
    let outcomes: u64 = counters[L4LB_CNT_TX as usize..L4LB_CNT_FLOW_PINNED as usize].iter().sum();
    ensure!(
        rx == run && outcomes == rx && counters == tally.counters,
        "after {frames} frames ({} refused): counters {}, expected {}; rx {rx}, frames run {run}, tx + pass + drops {outcomes}",
        tally.refused,
        named(&counters),
        named(&tally.counters)
    );
    let backends = lb.backend_traffic()?;
    ensure!(
        backends.len() >= MAX_BACKENDS && tally.backends.len() >= MAX_BACKENDS,
        "backend traffic: {} entries read",
        backends.len()
    );
    for (number, (got, want)) in backends.iter().zip(&tally.backends).enumerate().take(MAX_BACKENDS) {
        ensure!(got == want, "backend {number}: (packets, bytes) {got:?}, expected {want:?}");
    }
    let services = lb.service_traffic()?;
    ensure!(
        services.len() >= MAX_SERVICES && tally.services.len() >= MAX_SERVICES,
        "service traffic: {} entries read",
        services.len()
    );
    for (service, (got, want)) in services.iter().zip(&tally.services).enumerate().take(MAX_SERVICES) {
        ensure!(got == want, "service {service}: (packets, bytes) {got:?}, expected {want:?}");
    }
    // l4lb_flows: exactly the model's pins, key and value bytes.
    lb.compare_flows().map_err(fail)?;
    let entries = lb.flows.borrow().len();
    let flow = |counter: u32| tally.counters[counter as usize];
    let (pinned, repinned, full) =
        (flow(L4LB_CNT_FLOW_PINNED), flow(L4LB_CNT_FLOW_REPINNED), flow(L4LB_CNT_FLOW_TABLE_FULL));
    if slice.tracked.is_empty() {
        ensure!(
            tally.tracked == 0 && entries == 0,
            "no tracked service, yet {} frames tracked, {entries} entries",
            tally.tracked
        );
    } else if !matches!(slice.setup, Setup::Empty) && frames >= 100_000 {
        // Not vacuous: pins made, followed and made again; every rule decided frames.
        ensure!(
            pinned > 0 && repinned > 0 && tally.followed > 0,
            "tracking: {pinned} pinned, {repinned} re-pinned, {} followed",
            tally.followed
        );
        ensure!(
            tally.rules.iter().all(|&n| n > 0),
            "tracking: a rule never decided: {:?}",
            RULES.iter().zip(tally.rules).collect::<Vec<_>>()
        );
        ensure!(
            slice.flow_entries == L4LB_FLOW_ENTRIES || full > 0,
            "tracking: a flow table of {} entries never full",
            slice.flow_entries
        );
    }
    let transition_slots = slice
        .tracked
        .iter()
        .filter_map(|&s| lb.tables[s as usize].as_ref())
        .flatten()
        .filter(|&&w| matches!(SlotWord::of(w), SlotWord::Transition { .. }))
        .count();
    let used = tally.backends.iter().filter(|(packets, _)| *packets > 0).count();
    let services_used = tally.services.iter().filter(|(packets, _)| *packets > 0).count();
    println!(
        "fuzz {} ({}): {frames} frames in {:.1?} ({} refused with EINVAL), {used} backends and {services_used} services used, \
         TX 4in4 {} 4in6 {} 6in6 {} (ICMP errors {}, tagged {}), ICMP answers {} + ICMPv6 {}, {} outer sums carrying past one fold; \
         tracking (services {:?}, {transition_slots} slots in transition, clock {} to {}): {} frames in slots in transition, \
         {} followed a pin, rules {}, FLOW pinned {pinned} repinned {repinned} table full {full}, {entries} entries at the end (of {}); \
         kinds {}; counters {}",
        slice.name,
        slice.build.name(),
        started.elapsed(),
        tally.refused,
        tally.families[0],
        tally.families[1],
        tally.families[2],
        tally.icmp_tx,
        tally.tagged_tx,
        tally.answers[0],
        tally.answers[1],
        tally.carries,
        slice.tracked,
        slice.clock,
        lb.config.clock,
        tally.tracked,
        tally.followed,
        RULES.iter().zip(tally.rules).map(|(r, n)| format!("{r:?} {n}")).collect::<Vec<_>>().join(", "),
        lb.flow_entries,
        KINDS.iter().zip(tally.kinds).map(|((kind, _), n)| format!("{kind:?} {n}")).collect::<Vec<_>>().join(", "),
        named(&counters)
    );
    Ok(())
}

fn named(counters: &[u64; NCNT]) -> String {
    COUNTER_NAMES.iter().zip(counters).map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
}
