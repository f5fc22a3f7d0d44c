//! Fuzzing the XDP datapath through BPF_PROG_TEST_RUN (repeat 1 per frame):
//! 1,000,000 random and mutated frames by default, each checked on its own.
//! Needs root (CAP_BPF); without it every test is reported as ignored.
//!
//! For every frame a reference classifier written here from README's table
//! ("What the datapath does") says what must happen, and the test checks:
//! the verdict (only XDP_PASS, XDP_DROP or XDP_TX; test_run refuses only
//! frames shorter than an Ethernet header, with EINVAL); PASS and DROP leave
//! the frame untouched; a TX frame is parsed here, independently of the
//! datapath, as Ethernet + outer IPv4 towards exactly the destination the
//! host's hash model (`Flow::slot` and the table) predicts, with an RFC 1071
//! checksum computed here, followed by the input from offset 14 byte for
//! byte; after every frame the global counters are read and must have moved
//! by exactly rx + the expected outcome. After each slice the counters and
//! the per-destination packets/bytes equal the test's own tally.
//!
//! The frames (see `Kind`): valid TCP/UDP IPv4 frames with random addresses,
//! ports, options, fragment bits, TOS, DF and lengths (some near the MTU);
//! the same with 1..8 bytes changed; truncated; with tot_len or IHL lied
//! about; random bytes; other EtherTypes and IP protocols; rarely shorter
//! than 14 bytes. Slices: 5 destinations with holes in the table (empty
//! slots, slots naming inactive backends), 32 destinations, an empty table,
//! a low MTU, and no MTU with frames up to 3000 bytes; the last two with
//! high outer addresses, so that some outer header sums carry past a first
//! fold (about 100 of the low-MTU slice's 30,000 TX frames, see HIGH).
//!
//! `L4LB_FUZZ_SEED=N` replays a run (the seed is printed, and named in any
//! failure); `L4LB_FUZZ_FRAMES=N` changes the total number of frames (the
//! slices share it in fixed proportions, so a replay needs the same N).

mod common;

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject, ProgramInput};
use libtest_mimic::Failed;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use common::packet::internet_checksum;
use common::wire::*;
use common::{counter_moves, fail, hex, same_bytes};
use l4lb::bpf::consts::{L4LB_BACKEND_ACTIVE, L4LB_CONFIG_SEED_FIXED, L4LB_CONFIG_SEED_SET, L4LB_CONFIG_SRC_SET};
use l4lb::bpf::counter::*;
use l4lb::bpf::skel::{L4lbXdpSkel, L4lbXdpSkelBuilder};
use l4lb::bpf::{value_bytes, value_from, Backend, BackendStats, Config, COUNTER_NAMES, MAX_BACKENDS, SLOT_EMPTY, TABLE_SIZE};
use l4lb::destinations::Destination;
use l4lb::flow_hash::Flow;
use l4lb::table::{plan, TableState};

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
            ("five_destinations_with_holes", five_destinations_with_holes),
            ("thirty_two_destinations", thirty_two_destinations),
            ("empty_table", empty_table),
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
enum TableKind {
    /// The library's plan for five destinations with these addresses, then
    /// holes punched in it: empty slots, slots naming a backend never
    /// written, slots naming a backend written but inactive.
    Five(&'static [[u8; 4]; 5]),
    /// destination_samples/32_destinations.csv, planned by the library.
    ThirtyTwo,
    /// Fresh maps: every slot 0, backend 0 inactive.
    Empty,
}

struct Slice {
    index: u64,
    name: &'static str,
    /// Share of the total number of frames, per mille (the shares add up to 1000).
    share: u64,
    table: TableKind,
    /// Configured MTU (0: unset, no limit).
    mtu: u32,
    /// Largest IPv4 tot_len the generator builds.
    max_tot_len: usize,
    /// The configured outer source address.
    src: Ipv4Addr,
}

/// The low-MTU slice uses high addresses (outer source and destinations) so
/// that the outer header's word sum often carries past a first fold.
const SLICES: [Slice; 5] = [
    Slice { index: 0, name: "five_destinations_with_holes", share: 450, table: TableKind::Five(&LOW), mtu: 1500, max_tot_len: 1600, src: LB_SRC },
    Slice { index: 1, name: "thirty_two_destinations", share: 350, table: TableKind::ThirtyTwo, mtu: 1500, max_tot_len: 1600, src: LB_SRC },
    Slice { index: 2, name: "empty_table", share: 50, table: TableKind::Empty, mtu: 1500, max_tot_len: 1600, src: LB_SRC },
    Slice { index: 3, name: "low_mtu", share: 100, table: TableKind::Five(&HIGH), mtu: 200, max_tot_len: 600, src: HIGH_SRC },
    Slice { index: 4, name: "mtu_unset_large_frames", share: 50, table: TableKind::ThirtyTwo, mtu: 0, max_tot_len: 3000, src: HIGH_SRC },
];

fn five_destinations_with_holes() -> TestResult {
    run_slice(&SLICES[0])
}

fn thirty_two_destinations() -> TestResult {
    run_slice(&SLICES[1])
}

fn empty_table() -> TestResult {
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
const LOW: [[u8; 4]; 5] = [[10, 9, 0, 1], [10, 9, 0, 2], [10, 9, 0, 3], [10, 9, 0, 4], [10, 9, 0, 5]];
/// With HIGH_SRC and the low-MTU slice's sizes, about 0.3% to 0.6% of the
/// outer headers to each of these carry past one fold (searched for: the
/// first two with words read big-endian, the others little-endian, as the
/// datapath loads them).
const HIGH: [[u8; 4]; 5] =
    [[255, 255, 122, 2], [255, 255, 57, 249], [255, 255, 58, 240], [255, 255, 123, 228], [255, 255, 61, 229]];
const HASH_SEED: u32 = 0x5eed_f022;
const SAMPLE_32: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/destination_samples/32_destinations.csv");

fn five_destinations(addresses: &[[u8; 4]; 5]) -> Vec<Destination> {
    (1..=5u8)
        .zip(addresses)
        .map(|(i, &addr)| Destination { addr: Ipv4Addr::from(addr), mac: [0x02, 0xbe, 0xef, 0x00, 0x00, i] })
        .collect()
}

/// Backend numbers the holes point to: never written, and written but inactive.
const UNSET_BACKEND: u32 = 300;
const INACTIVE_BACKEND: u32 = 301;

// ---------------------------------------------------------------------------
// The program under test

const NCNT: usize = L4LB_CNT_MAX as usize;

struct Balancer {
    skel: L4lbXdpSkel<'static>,
    config: Config,
    /// What the maps hold: the model the expectations are computed from.
    table: TableState,
}

impl Balancer {
    fn load(table_kind: TableKind, mtu: u32, src: Ipv4Addr) -> Result<Self, Failed> {
        // The skeleton borrows this storage for its whole life: one small leak per slice.
        let storage = Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit()));
        let skel = L4lbXdpSkelBuilder::default().open(storage)?.load()?;
        let config = Config {
            hash_seed: HASH_SEED,
            src_addr: u32::from_ne_bytes(src.octets()),
            mtu,
            flags: L4LB_CONFIG_SEED_SET | L4LB_CONFIG_SEED_FIXED | L4LB_CONFIG_SRC_SET,
        };
        skel.maps.l4lb_config.update(&0u32.to_ne_bytes(), value_bytes(&config), MapFlags::ANY)?;
        // Fresh array maps: every slot 0, backend 0 inactive.
        let mut lb = Balancer { skel, config, table: TableState { slots: vec![0; TABLE_SIZE], ..TableState::empty(TABLE_SIZE) } };
        let destinations = match table_kind {
            TableKind::Empty => return Ok(lb),
            TableKind::Five(prefix) => five_destinations(prefix),
            TableKind::ThirtyTwo => {
                let list = l4lb::destinations::load(Path::new(SAMPLE_32)).map_err(|e| fail(format!("{e:#}")))?;
                list.destinations
            }
        };
        let mut target = plan(&TableState::empty(TABLE_SIZE), &destinations).target;
        for (number, destination) in target.backends.iter().enumerate() {
            if let Some(destination) = destination {
                lb.write_backend(number as u32, destination, L4LB_BACKEND_ACTIVE as u16)?;
            }
        }
        if let TableKind::Five(_) = table_kind {
            // Written with an address and a MAC, but not active: never to be selected.
            lb.write_backend(INACTIVE_BACKEND, &Destination { addr: Ipv4Addr::new(10, 9, 9, 9), mac: [2, 0, 0, 0, 9, 9] }, 0)?;
            for (slot, number) in target.slots.iter_mut().enumerate() {
                match slot % 16 {
                    3 => *number = SLOT_EMPTY,
                    7 => *number = UNSET_BACKEND,
                    11 => *number = INACTIVE_BACKEND,
                    _ => {}
                }
            }
        }
        let keys: Vec<u8> = (0..TABLE_SIZE as u32).flat_map(u32::to_ne_bytes).collect();
        let values: Vec<u8> = target.slots.iter().flat_map(|n| n.to_ne_bytes()).collect();
        lb.skel.maps.l4lb_slots.update_batch(&keys, &values, TABLE_SIZE as u32, MapFlags::ANY, MapFlags::ANY)?;
        lb.table = target;
        Ok(lb)
    }

    fn write_backend(&self, number: u32, d: &Destination, flags: u16) -> TestResult {
        let entry = Backend { addr: u32::from_ne_bytes(d.addr.octets()), mac: d.mac, flags };
        self.skel.maps.l4lb_backends.update(&number.to_ne_bytes(), value_bytes(&entry), MapFlags::ANY)?;
        Ok(())
    }

    /// One BPF_PROG_TEST_RUN, repeat 1, into `out`: the verdict and the output length.
    fn run(&self, frame: &[u8], out: &mut [u8]) -> libbpf_rs::Result<(u32, usize)> {
        let input = ProgramInput { data_in: Some(frame), data_out: Some(out), repeat: 1, ..Default::default() };
        let output = self.skel.progs.l4lb_balance.test_run(input)?;
        Ok((output.return_value, output.data.map_or(0, |data| data.len())))
    }

    /// All global counters with one batch lookup (no allocation).
    fn read_counters(&self, values: &mut [u64; NCNT]) -> TestResult {
        let fd = self.skel.maps.l4lb_counters.as_fd().as_raw_fd();
        let mut keys = [0u32; NCNT];
        let mut count = NCNT as u32;
        let mut out_batch = 0u32;
        // SAFETY: plain C struct; zero is its documented default.
        let mut opts: libbpf_sys::bpf_map_batch_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _;
        // SAFETY: keys, values and out_batch are valid for `count` entries of the map's key and value sizes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                fd,
                std::ptr::null_mut(),
                (&mut out_batch as *mut u32).cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        if (rc != 0 && rc != -libc_enoent()) || count as usize != NCNT {
            return Err(fail(format!("batch lookup of l4lb_counters: rc {rc}, {count} entries")));
        }
        if keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
            return Err(fail(format!("batch lookup of l4lb_counters returned keys {keys:?}")));
        }
        Ok(())
    }

    fn backend_stats(&self, number: u32) -> Result<(u64, u64), Failed> {
        let bytes = self
            .skel
            .maps
            .l4lb_be_stats
            .lookup(&number.to_ne_bytes(), MapFlags::ANY)?
            .ok_or_else(|| fail(format!("l4lb_be_stats: no entry {number}")))?;
        let stats: BackendStats = value_from(&bytes).ok_or_else(|| fail("backend stats of unexpected size"))?;
        Ok((stats.packets, stats.bytes))
    }
}

fn libc_enoent() -> i32 {
    nix::libc::ENOENT
}

// ---------------------------------------------------------------------------
// The reference: what README's table says must happen to a frame

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// test_run refuses it (shorter than an Ethernet header): EINVAL, the program does not run.
    Refused,
    Pass,
    Drop(Type),
    /// XDP_TX, encapsulated towards this backend number.
    Tx(u32),
}

fn be16(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]))
}

/// Classifies `frame` following README's table, in its order: short eth,
/// not IPv4 (pass), short IPv4 header, bad version, bad IHL, options cut off,
/// bad tot_len, not TCP/UDP (pass), ports cut off (not for fragments, which
/// hash with ports 0), no backend, too big for the MTU, else TX.
fn classify(frame: &[u8], config: &Config, table: &TableState) -> Expect {
    if frame.len() < ETH_LEN {
        return Expect::Refused;
    }
    if be16(frame, 12) != usize::from(ETHERTYPE_IPV4) {
        return Expect::Pass;
    }
    let ip = &frame[ETH_LEN..];
    if ip.len() < 20 {
        return Expect::Drop(L4LB_CNT_DROP_SHORT_IPV4);
    }
    if ip[0] >> 4 != 4 {
        return Expect::Drop(L4LB_CNT_DROP_BAD_VERSION);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 {
        return Expect::Drop(L4LB_CNT_DROP_BAD_IHL);
    }
    if header_len > ip.len() {
        return Expect::Drop(L4LB_CNT_DROP_SHORT_IPV4);
    }
    let tot_len = be16(ip, 2);
    if tot_len < header_len || tot_len > ip.len() {
        return Expect::Drop(L4LB_CNT_DROP_BAD_TOT_LEN);
    }
    let proto = ip[9];
    if proto != TCP && proto != UDP {
        return Expect::Pass;
    }
    let fragment = be16(ip, 6) & 0x3fff != 0; // MF or an offset
    let (sport, dport) = if fragment {
        (0, 0)
    } else {
        if header_len + 4 > tot_len {
            return Expect::Drop(L4LB_CNT_DROP_SHORT_L4);
        }
        (be16(ip, header_len) as u16, be16(ip, header_len + 2) as u16)
    };
    let address = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let flow = Flow { saddr: address(12), daddr: address(16), sport, dport, proto };
    let number = table.slots[flow.slot(config.hash_seed)];
    if !matches!(table.backends.get(number as usize), Some(Some(_))) {
        return Expect::Drop(L4LB_CNT_DROP_NO_BACKEND);
    }
    if config.mtu != 0 && tot_len + 20 > config.mtu as usize {
        return Expect::Drop(L4LB_CNT_DROP_TOO_BIG);
    }
    Expect::Tx(number)
}

/// Checks an XDP_TX output against its input with a parser of its own.
fn check_encapsulated(
    frame: &[u8],
    out: &[u8],
    destination: &Destination,
    src: Ipv4Addr,
    configured: &[Ipv4Addr],
) -> Result<(), String> {
    if out.len() != frame.len() + 20 {
        return Err(format!("output is {} bytes, expected {} + 20", out.len(), frame.len()));
    }
    let field = |what: &str, actual: &[u8], expected: &[u8]| {
        if actual == expected {
            Ok(())
        } else {
            Err(format!("{what}: {} , expected {}", hex(actual), hex(expected)))
        }
    };
    field("Ethernet destination", &out[0..6], &destination.mac)?;
    field("Ethernet source", &out[6..12], &frame[0..6])?;
    field("EtherType", &out[12..14], &ETHERTYPE_IPV4.to_be_bytes())?;
    let outer = &out[ETH_LEN..ETH_LEN + 20];
    let inner = &frame[ETH_LEN..];
    field("outer version/IHL", &outer[0..1], &[0x45])?;
    field("outer TOS", &outer[1..2], &inner[1..2])?;
    field("outer tot_len", &outer[2..4], &((be16(inner, 2) + 20) as u16).to_be_bytes())?;
    field("outer id", &outer[4..6], &[0, 0])?;
    // DF as the inner's; MF, offset and the reserved bit clear.
    field("outer flags/offset", &outer[6..8], &[inner[6] & 0x40, 0])?;
    field("outer TTL", &outer[8..9], &[64])?;
    field("outer protocol", &outer[9..10], &[IPIP])?;
    let mut unsummed = [0u8; 20];
    unsummed.copy_from_slice(outer);
    unsummed[10..12].fill(0);
    field("outer checksum (RFC 1071)", &outer[10..12], &internet_checksum(&unsummed).to_be_bytes())?;
    field("outer source", &outer[12..16], &src.octets())?;
    let daddr = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
    if !configured.contains(&daddr) {
        return Err(format!("outer destination {daddr} is none of the configured destinations"));
    }
    field("outer destination (predicted backend)", &outer[16..20], &destination.addr.octets())?;
    same_bytes("inner packet (input from offset 14)", &out[ETH_LEN + 20..], inner)
        .map_err(|failed| failed.message().unwrap_or("differs").to_string())
}

// ---------------------------------------------------------------------------
// Frame generation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A valid TCP/UDP IPv4 frame (options, fragments, TOS, DF, lengths at random).
    Valid,
    /// A valid frame with 1..8 bytes changed.
    Flipped,
    /// A valid frame cut at a random length (at least 14 bytes).
    Truncated,
    /// A valid frame whose tot_len and/or IHL lie.
    Lied,
    /// Random bytes (some behind EtherType IPv4, some also with version 4).
    Random,
    /// Other EtherTypes (ARP, IPv6, VLAN, swapped IPv4, random) and other IP protocols.
    Other,
    /// Fewer than 14 bytes: refused by test_run.
    Tiny,
}

const KINDS: [(Kind, u32); 7] = [
    (Kind::Valid, 300),
    (Kind::Flipped, 200),
    (Kind::Truncated, 120),
    (Kind::Lied, 130),
    (Kind::Random, 100),
    (Kind::Other, 148),
    (Kind::Tiny, 2),
];

struct Generator {
    rng: StdRng,
    /// Random bytes that options, L4 headers and payloads are copied from.
    pool: Vec<u8>,
    mtu: u32,
    max_tot_len: usize,
}

const OTHER_PROTOCOLS: [u8; 8] = [ICMP, IPIP, GRE, ESP, SCTP, IPV6_IN_IPV4, 0, 255];

impl Generator {
    fn new(seed: u64, slice: &Slice) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pool = vec![0u8; 1 << 16];
        rng.fill_bytes(&mut pool);
        Generator { rng, pool, mtu: slice.mtu, max_tot_len: slice.max_tot_len }
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

    /// Builds a frame of `kind` into `buf`.
    fn frame(&mut self, kind: Kind, buf: &mut Vec<u8>) {
        buf.clear();
        match kind {
            Kind::Valid => self.tcp_or_udp(buf),
            Kind::Flipped => {
                self.tcp_or_udp(buf);
                for _ in 0..self.rng.gen_range(1..=8) {
                    // Mostly in the headers, where it matters.
                    let end = if self.rng.gen_bool(0.7) { buf.len().min(ETH_LEN + 64) } else { buf.len() };
                    let at = self.rng.gen_range(0..end);
                    buf[at] ^= self.rng.gen_range(1..=255u8);
                }
            }
            Kind::Truncated => {
                self.tcp_or_udp(buf);
                let len = if self.rng.gen_bool(0.6) {
                    // Around the headers.
                    self.rng.gen_range(ETH_LEN..=buf.len().min(ETH_LEN + 84))
                } else {
                    self.rng.gen_range(ETH_LEN..=buf.len())
                };
                buf.truncate(len);
            }
            Kind::Lied => {
                self.tcp_or_udp(buf);
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
            Kind::Random => {
                let len = if self.rng.gen_bool(0.7) { self.rng.gen_range(ETH_LEN..=128) } else { self.rng.gen_range(ETH_LEN..=1600) };
                self.random_bytes(buf, len);
                let variant = self.rng.gen_range(0..10);
                if variant >= 4 {
                    buf[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                }
                if variant >= 7 && buf.len() > ETH_LEN + 9 {
                    buf[ETH_LEN] = 0x40 | (buf[ETH_LEN] & 0x0f);
                    buf[ETH_LEN + 9] = if self.rng.gen() { TCP } else { UDP };
                }
            }
            Kind::Other => {
                if self.rng.gen() {
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
                } else {
                    self.tcp_or_udp(buf);
                    let ethertype = match self.rng.gen_range(0..6) {
                        0 => ETHERTYPE_ARP,
                        1 => ETHERTYPE_IPV6,
                        2 => ETHERTYPE_VLAN,
                        3 => ETHERTYPE_IPV4.swap_bytes(),
                        4 => 0x0801,
                        _ => loop {
                            let t: u16 = self.rng.gen();
                            if t != ETHERTYPE_IPV4 {
                                break t;
                            }
                        },
                    };
                    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
                    if ethertype == ETHERTYPE_VLAN {
                        // A tag, then the IPv4 EtherType: still not IPv4 at offset 12.
                        let tag = [self.rng.gen(), self.rng.gen(), 0x08, 0x00];
                        for (i, byte) in tag.into_iter().enumerate() {
                            buf.insert(ETH_LEN + i, byte);
                        }
                    }
                }
            }
            Kind::Tiny => {
                let len = self.rng.gen_range(0..ETH_LEN);
                self.random_bytes(buf, len);
            }
        }
    }

    fn tcp_or_udp(&mut self, buf: &mut Vec<u8>) {
        let proto = if self.rng.gen() { TCP } else { UDP };
        self.ipv4(buf, proto);
    }

    /// A well-formed IPv4 frame of protocol `proto` with random fields.
    fn ipv4(&mut self, buf: &mut Vec<u8>, proto: u8) {
        let rng = &mut self.rng;
        let mut macs = [0u8; 12];
        rng.fill_bytes(&mut macs);
        buf.extend_from_slice(&macs);
        buf.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());

        let ihl: usize = if rng.gen_bool(0.7) { 5 } else { rng.gen_range(6..=15) };
        let header_len = ihl * 4;
        let df = rng.gen::<bool>();
        let (mf, offset) = match rng.gen_range(0..8) {
            0 => (true, 0u16),                               // first fragment
            1 => (rng.gen::<bool>(), rng.gen_range(1..0x2000)), // later fragment
            _ => (false, 0),
        };
        let reserved = rng.gen_bool(0.02);
        let frag_off = (u16::from(reserved) << 15) | (u16::from(df) << 14) | (u16::from(mf) << 13) | offset;
        let l4_len = if offset != 0 {
            0
        } else if proto == TCP {
            20 + 4 * rng.gen_range(0..=2) * usize::from(rng.gen_bool(0.2))
        } else if proto == UDP {
            8
        } else {
            rng.gen_range(0..=20)
        };
        let fixed = header_len + l4_len;
        let max = self.max_tot_len.max(fixed);
        let tot_len = match rng.gen_range(0..20) {
            0..=9 => fixed + rng.gen_range(0..=64),
            10..=14 => rng.gen_range(fixed..=max),
            15..=18 => {
                // Around the MTU (or the largest size when there is none).
                let around = if self.mtu != 0 { self.mtu as usize - 20 } else { max };
                (around + rng.gen_range(0..=8)).saturating_sub(4).clamp(fixed, max)
            }
            _ => fixed,
        };

        let ip = buf.len();
        buf.extend_from_slice(&[0x40 | ihl as u8, rng.gen()]);
        buf.extend_from_slice(&(tot_len as u16).to_be_bytes());
        buf.extend_from_slice(&rng.gen::<u16>().to_be_bytes());
        buf.extend_from_slice(&frag_off.to_be_bytes());
        buf.extend_from_slice(&[rng.gen(), proto, 0, 0]);
        buf.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
        buf.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
        // Options, L4 header (ports included) and payload: random bytes.
        self.random_bytes(buf, tot_len - 20);
        if proto == TCP && l4_len >= 20 {
            // A TCP data offset that matches the header built.
            buf[ip + header_len + 12] = ((l4_len / 4) as u8) << 4 | (buf[ip + header_len + 12] & 0x0f);
        }
        let checksum = internet_checksum(&buf[ip..ip + header_len]);
        buf[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());

        // Trailing bytes behind the packet: padding to 60, or more.
        match self.rng.gen_range(0..10) {
            0 | 1 => {
                let extra = self.rng.gen_range(1..=40);
                self.random_bytes(buf, extra);
            }
            2 | 3 if buf.len() < 60 => buf.resize(60, 0),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// The run

/// What a slice saw, for the summary line.
#[derive(Default)]
struct Tally {
    counters: [u64; NCNT],
    backends: Vec<(u64, u64)>,
    refused: u64,
    kinds: [u64; KINDS.len()],
    /// TX frames whose outer header sum (words read either way round) still carries after one fold.
    carries: u64,
}

/// Whether the one's-complement sum of `header` (checksum field zeroed) needs
/// a second fold, with 16-bit words read big- or little-endian.
fn carries_twice(header: &[u8], little_endian: bool) -> bool {
    let sum: u32 = header
        .chunks(2)
        .enumerate()
        .filter(|(i, _)| *i != 5)
        .map(|(_, w)| u32::from(if little_endian { u16::from_le_bytes([w[0], w[1]]) } else { u16::from_be_bytes([w[0], w[1]]) }))
        .sum();
    (sum & 0xffff) + (sum >> 16) > 0xffff
}

fn run_slice(slice: &Slice) -> TestResult {
    let settings = settings();
    let frames = slice_frames(slice, settings.frames);
    let seed = settings.seed ^ slice.index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let replay = format!("[seed {0}: L4LB_FUZZ_SEED={0} L4LB_FUZZ_FRAMES={1} replays it]", settings.seed, settings.frames);
    fuzz(slice, frames, seed).map_err(|failed| fail(format!("{}: {} {replay}", slice.name, failed.message().unwrap_or("failed"))))
}

fn fuzz(slice: &Slice, frames: u64, seed: u64) -> TestResult {
    let started = Instant::now();
    let lb = Balancer::load(slice.table, slice.mtu, slice.src)?;
    let configured: Vec<Ipv4Addr> = lb.table.backends.iter().flatten().map(|d| d.addr).collect();
    let mut generator = Generator::new(seed, slice);
    let mut tally = Tally { backends: vec![(0, 0); MAX_BACKENDS], ..Tally::default() };
    let mut frame = Vec::with_capacity(4096);
    let mut out = vec![0u8; 8192];
    let mut counters = [0u64; NCNT];
    lb.read_counters(&mut counters)?;
    if counters != tally.counters {
        return Err(fail(format!("counters not zero after loading: {counters:?}")));
    }

    for index in 0..frames {
        let kind = generator.kind();
        generator.frame(kind, &mut frame);
        tally.kinds[KINDS.iter().position(|(k, _)| *k == kind).unwrap()] += 1;
        let expect = classify(&frame, &lb.config, &lb.table);
        let before = tally.counters;
        let what = || format!("frame {index} ({kind:?}, {} bytes: {})", frame.len(), hex(&frame[..frame.len().min(80)]));

        match (expect, lb.run(&frame, &mut out)) {
            (Expect::Refused, Err(error)) if error.kind() == libbpf_rs::ErrorKind::InvalidInput => tally.refused += 1,
            (Expect::Refused, Err(error)) => return Err(fail(format!("{}: test_run failed with {error}, expected EINVAL", what()))),
            (Expect::Refused, Ok((verdict, _))) => {
                return Err(fail(format!("{}: test_run ran the program ({}), expected EINVAL", what(), verdict_name(verdict))))
            }
            (_, Err(error)) => return Err(fail(format!("{}: test_run failed: {error}", what()))),
            (_, Ok((verdict, len))) => {
                let output = &out[..len];
                if ![XDP_PASS, XDP_DROP, XDP_TX].contains(&verdict) {
                    return Err(fail(format!("{}: verdict {verdict}, not one of XDP_PASS, XDP_DROP, XDP_TX", what())));
                }
                let (wanted, outcome) = match expect {
                    Expect::Pass => (XDP_PASS, L4LB_CNT_PASS),
                    Expect::Drop(counter) => (XDP_DROP, counter),
                    Expect::Tx(_) => (XDP_TX, L4LB_CNT_TX),
                    Expect::Refused => unreachable!(),
                };
                if verdict != wanted {
                    lb.read_counters(&mut counters)?;
                    return Err(fail(format!(
                        "{}: verdict {}, expected {} ({expect:?}); counters moved: {}",
                        what(),
                        verdict_name(verdict),
                        verdict_name(wanted),
                        counter_moves(&COUNTER_NAMES, &before, &counters)
                    )));
                }
                match expect {
                    Expect::Tx(number) => {
                        let destination = lb.table.backends[number as usize].expect("an active backend");
                        check_encapsulated(&frame, output, &destination, slice.src, &configured)
                            .map_err(|message| fail(format!("{}: XDP_TX to backend {number} ({}): {message}", what(), destination.addr)))?;
                        let outer = &output[ETH_LEN..ETH_LEN + 20];
                        tally.carries += u64::from(carries_twice(outer, false) || carries_twice(outer, true));
                        tally.backends[number as usize].0 += 1;
                        tally.backends[number as usize].1 += len as u64;
                    }
                    // The datapath writes nothing before it decides to pass or drop.
                    _ => same_bytes(&what(), output, &frame)?,
                }
                tally.counters[L4LB_CNT_RX as usize] += 1;
                tally.counters[outcome as usize] += 1;
            }
        }

        lb.read_counters(&mut counters)?;
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
    // the per-destination statistics are what the test saw leave.
    lb.read_counters(&mut counters)?;
    let run = frames - tally.refused;
    let rx = counters[L4LB_CNT_RX as usize];
    let outcomes: u64 = counters[L4LB_CNT_TX as usize..].iter().sum();
    if rx != run || outcomes != rx || counters != tally.counters {
        return Err(fail(format!(
            "after {frames} frames ({} refused): counters {:?}, expected {:?}; rx {rx}, frames run {run}, tx + pass + drops {outcomes}",
            tally.refused,
            named(&counters),
            named(&tally.counters)
        )));
    }
    for number in 0..MAX_BACKENDS as u32 {
        let stats = lb.backend_stats(number)?;
        if stats != tally.backends[number as usize] {
            return Err(fail(format!(
                "backend {number}: (packets, bytes) {stats:?}, expected {:?}",
                tally.backends[number as usize]
            )));
        }
    }
    let used = tally.backends.iter().filter(|(packets, _)| *packets > 0).count();
    println!(
        "fuzz {}: {frames} frames in {:.1?} ({} refused with EINVAL), {used} destinations used, \
         {} outer sums carrying past one fold; kinds {}; counters {}",
        slice.name,
        started.elapsed(),
        tally.refused,
        tally.carries,
        KINDS.iter().zip(tally.kinds).map(|((kind, _), n)| format!("{kind:?} {n}")).collect::<Vec<_>>().join(", "),
        named(&counters)
    );
    Ok(())
}

fn named(counters: &[u64; NCNT]) -> String {
    COUNTER_NAMES.iter().zip(counters).map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
}

