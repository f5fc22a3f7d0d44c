//! The XDP datapath run in the kernel with BPF_PROG_TEST_RUN: verdicts, exact
//! output frames and counters, frame by frame. Needs root (CAP_BPF); without
//! it every test is reported as ignored.
//!
//! Expected frames are built here from the specification, field by field; the
//! outer checksum is computed here (RFC 1071) and checked again with
//! etherparse, never with the datapath's code. Which destination a flow goes
//! to is predicted with the host's hash model (`Flow::slot`) and the table the
//! library plans (`table::plan`).
//!
//! Random tests draw a new seed on every run and name it when they fail;
//! `L4LB_TEST_SEED=N cargo test --test datapath` replays a run.

mod common;

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::path::Path;

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Dscp, Ipv4Ecn,
    Ipv4Header, Ipv4HeaderSlice, Ipv4Options, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapMut, MapType, OpenObject, ProgramInput};
use libtest_mimic::Failed;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::packet::internet_checksum;
use common::wire::*;
use common::{counter_moves, fail, same_bytes};
use l4lb::bpf::consts::{L4LB_BACKEND_ACTIVE, L4LB_CONFIG_SEED_FIXED, L4LB_CONFIG_SEED_SET, L4LB_CONFIG_SRC_SET};
use l4lb::bpf::counter::{self, *};
use l4lb::bpf::skel::{L4lbXdpSkel, L4lbXdpSkelBuilder};
use l4lb::bpf::{
    value_bytes, value_from, Backend, BackendStats, Config, COUNTER_NAMES, IPIP_OVERHEAD, SLOT_EMPTY, TABLE_SIZE,
};
use l4lb::destinations::Destination;
use l4lb::flow_hash::Flow;
use l4lb::table::{plan, TableState};

type TestResult = Result<(), Failed>;

fn main() {
    common::run_suite(
        "datapath",
        "BPF_PROG_TEST_RUN needs CAP_BPF",
        vec![
            ("tcp_udp_single_destination", tcp_udp_single_destination),
            ("tcp_udp_predicted_backend_random_flows", tcp_udp_predicted_backend_random_flows),
            ("ipv4_options_ihl_6_to_15", ipv4_options_ihl_6_to_15),
            ("not_tcp_udp_passes", not_tcp_udp_passes),
            ("truncated_frames_drop", truncated_frames_drop),
            ("malformed_ipv4_drops", malformed_ipv4_drops),
            ("fragments_hash_without_ports", fragments_hash_without_ports),
            ("empty_table_drops", empty_table_drops),
            ("mtu_limit", mtu_limit),
            ("checksum_carry_folding", checksum_carry_folding),
            ("checksum_random_headers", checksum_random_headers),
            ("spread_32_destinations", spread_32_destinations),
            ("per_cpu_counters", per_cpu_counters),
        ],
    )
}

// ---------------------------------------------------------------------------
// Addresses (documentation ranges; test_run never sends anything anywhere)

/// The balancer's own MAC: the destination of every frame it receives.
const LB_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0x00, 0x01];
/// The router handing frames to the balancer: their source MAC.
const ROUTER_MAC: [u8; 6] = [0x02, 0x52, 0x54, 0x00, 0x00, 0xfe];
/// The outer source address the balancer is configured with.
const LB_SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A client and the service address it talks to.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The destination of single-destination tables.
const BACKEND: Destination =
    Destination { addr: Ipv4Addr::new(10, 1, 0, 1), mac: [0x02, 0xbe, 0x00, 0x00, 0x00, 0x01] };
const HASH_SEED: u32 = 0x5eed_0001;
const SAMPLE_32: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/destination_samples/32_destinations.csv");

// ---------------------------------------------------------------------------
// The program under test

/// What a frame should lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// XDP_TX, encapsulated towards this backend number.
    Tx(u32),
    /// XDP_PASS, frame untouched.
    Pass,
    /// XDP_DROP, counted by this counter.
    Drop(counter::Type),
    /// test_run refuses the frame (shorter than an Ethernet header): the program does not run.
    Refused,
}

/// One loaded program and what its maps hold.
struct Balancer {
    skel: L4lbXdpSkel<'static>,
    config: Config,
    /// The backends and slots as written to the maps.
    table: TableState,
}

impl Balancer {
    fn load() -> Result<Self, Failed> {
        Self::load_with(false)
    }

    /// Loads the program; `per_cpu` switches both counter maps to per-CPU arrays first.
    fn load_with(per_cpu: bool) -> Result<Self, Failed> {
        // The skeleton borrows this storage for its whole life: one small leak per test.
        let storage = Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit()));
        let mut open = L4lbXdpSkelBuilder::default().open(storage)?;
        if per_cpu {
            open.maps.l4lb_counters.set_type(MapType::PercpuArray)?;
            open.maps.l4lb_be_stats.set_type(MapType::PercpuArray)?;
        }
        let skel = open.load()?;
        // Array maps start zeroed: every slot points to backend 0, which is inactive.
        let table = TableState { slots: vec![0; TABLE_SIZE], ..TableState::empty(TABLE_SIZE) };
        Ok(Balancer { skel, config: Config::default(), table })
    }

    /// Loaded, configured with HASH_SEED, LB_SRC and no MTU, and the table filled with `destinations`.
    fn with_destinations(destinations: &[Destination]) -> Result<Self, Failed> {
        let mut lb = Self::load()?;
        lb.configure(HASH_SEED, LB_SRC, 0)?;
        lb.install(destinations)?;
        Ok(lb)
    }

    fn configure(&mut self, hash_seed: u32, src: Ipv4Addr, mtu: u32) -> TestResult {
        self.config = Config {
            hash_seed,
            src_addr: u32::from_ne_bytes(src.octets()),
            mtu,
            flags: L4LB_CONFIG_SEED_SET | L4LB_CONFIG_SEED_FIXED | L4LB_CONFIG_SRC_SET,
        };
        self.skel.maps.l4lb_config.update(&key(0), value_bytes(&self.config), MapFlags::ANY)?;
        Ok(())
    }

    /// Fills the table from empty as the host does: the library's plan, written out.
    fn install(&mut self, destinations: &[Destination]) -> TestResult {
        let target = plan(&TableState::empty(TABLE_SIZE), destinations).target;
        for (number, destination) in target.backends.iter().enumerate() {
            if destination.is_some() {
                self.set_backend(number as u32, *destination)?;
            }
        }
        self.set_slots(&target.slots)
    }

    /// Writes one backend entry: active with `destination`, or cleared.
    fn set_backend(&mut self, number: u32, destination: Option<Destination>) -> TestResult {
        let entry = match destination {
            Some(d) => {
                Backend { addr: u32::from_ne_bytes(d.addr.octets()), mac: d.mac, flags: L4LB_BACKEND_ACTIVE as u16 }
            }
            None => Backend::default(),
        };
        self.skel.maps.l4lb_backends.update(&key(number), value_bytes(&entry), MapFlags::ANY)?;
        self.table.backends[number as usize] = destination;
        Ok(())
    }

    fn set_slots(&mut self, slots: &[u32]) -> TestResult {
        let keys: Vec<u8> = (0..slots.len() as u32).flat_map(u32::to_ne_bytes).collect();
        let values: Vec<u8> = slots.iter().flat_map(|slot| slot.to_ne_bytes()).collect();
        let count = slots.len() as u32;
        self.skel.maps.l4lb_slots.update_batch(&keys, &values, count, MapFlags::ANY, MapFlags::ANY)?;
        self.table.slots = slots.to_vec();
        Ok(())
    }

    /// The backend number the host's model says `flow` goes to.
    fn backend_of(&self, flow: &Flow) -> Result<u32, Failed> {
        let slot = flow.slot(self.config.hash_seed);
        let number = self.table.slots[slot];
        match self.table.backends.get(number as usize) {
            Some(Some(_)) => Ok(number),
            _ => Err(fail(format!("{flow:?}: slot {slot} leads to no active backend"))),
        }
    }

    fn destination(&self, number: u32) -> Destination {
        self.table.backends[number as usize].expect("an active backend")
    }

    /// The frame the program should send for `frame` to backend `number`.
    fn encapsulated(&self, frame: &[u8], number: u32) -> Vec<u8> {
        let src = Ipv4Addr::from(self.config.src_addr.to_ne_bytes());
        encapsulated(frame, &self.destination(number), src)
    }

    /// One BPF_PROG_TEST_RUN (repeat 1): the verdict and the output frame.
    fn run(&self, frame: &[u8]) -> libbpf_rs::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + IPIP_OVERHEAD as usize + 256];
        let input = ProgramInput { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() };
        let output = self.skel.progs.l4lb_balance.test_run(input)?;
        let data = output.data.map(|data| data.to_vec()).unwrap_or_default();
        Ok((output.return_value, data))
    }

    /// Global counters (summed over CPUs when per-CPU).
    fn counters(&self) -> Result<Vec<u64>, Failed> {
        (0..L4LB_CNT_MAX)
            .map(|index| {
                let values = read_value(&self.skel.maps.l4lb_counters, index)?;
                Ok(values.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap())).sum())
            })
            .collect()
    }

    /// (packets, bytes) of one backend (summed over CPUs when per-CPU).
    fn backend_stats(&self, number: u32) -> Result<(u64, u64), Failed> {
        let mut total = (0, 0);
        for bytes in read_value(&self.skel.maps.l4lb_be_stats, number)? {
            let stats: BackendStats = value_from(&bytes).ok_or_else(|| fail("backend stats of unexpected size"))?;
            total.0 += stats.packets;
            total.1 += stats.bytes;
        }
        Ok(total)
    }

    fn active_backends(&self) -> Vec<u32> {
        (0..self.table.backends.len() as u32).filter(|&n| self.table.backends[n as usize].is_some()).collect()
    }

    /// Runs `frame` once and checks everything it should do: the verdict, the
    /// exact output, RX plus exactly one outcome counter, and for XDP_TX the
    /// chosen backend's packets and bytes (no other backend's). Returns the output.
    fn check(&self, what: &str, frame: &[u8], want: Want) -> Result<Vec<u8>, Failed> {
        let mut watched = self.active_backends();
        if let Want::Tx(number) = want {
            if !watched.contains(&number) {
                watched.push(number);
            }
        }
        let counters_before = self.counters()?;
        let stats_before = watched.iter().map(|&n| self.backend_stats(n)).collect::<Result<Vec<_>, _>>()?;
        let mut counters_wanted = counters_before.clone();
        let mut stats_wanted = stats_before.clone();

        let output = match (want, self.run(frame)) {
            (Want::Refused, Err(error)) if error.kind() == libbpf_rs::ErrorKind::InvalidInput => Vec::new(),
            (Want::Refused, Ok((verdict, _))) => {
                return Err(fail(format!(
                    "{what}: test_run took the {}-byte frame ({}), expected it refused",
                    frame.len(),
                    verdict_name(verdict)
                )))
            }
            (_, Err(error)) => return Err(fail(format!("{what}: test_run failed: {error}"))),
            (want, Ok((verdict, output))) => {
                let (verdict_wanted, outcome, output_wanted) = match want {
                    Want::Tx(number) => (XDP_TX, L4LB_CNT_TX, self.encapsulated(frame, number)),
                    Want::Pass => (XDP_PASS, L4LB_CNT_PASS, frame.to_vec()),
                    Want::Drop(counter) => (XDP_DROP, counter, frame.to_vec()),
                    Want::Refused => unreachable!(),
                };
                if verdict != verdict_wanted {
                    return Err(fail(format!(
                        "{what}: verdict {}, expected {}; counters moved: {}",
                        verdict_name(verdict),
                        verdict_name(verdict_wanted),
                        counter_moves(&COUNTER_NAMES, &counters_before, &self.counters()?)
                    )));
                }
                same_bytes(what, &output, &output_wanted)?;
                counters_wanted[L4LB_CNT_RX as usize] += 1;
                counters_wanted[outcome as usize] += 1;
                if let Want::Tx(number) = want {
                    check_outer_checksum(what, &output)?;
                    let index = watched.iter().position(|&n| n == number).unwrap();
                    stats_wanted[index].0 += 1;
                    stats_wanted[index].1 += output.len() as u64;
                }
                output
            }
        };

        let counters_after = self.counters()?;
        if counters_after != counters_wanted {
            return Err(fail(format!(
                "{what}: counters moved: {}; expected: {}",
                counter_moves(&COUNTER_NAMES, &counters_before, &counters_after),
                counter_moves(&COUNTER_NAMES, &counters_before, &counters_wanted)
            )));
        }
        for (index, &number) in watched.iter().enumerate() {
            let stats = self.backend_stats(number)?;
            if stats != stats_wanted[index] {
                return Err(fail(format!(
                    "{what}: backend {number} (packets, bytes) went {:?} -> {stats:?}, expected {:?}",
                    stats_before[index], stats_wanted[index]
                )));
            }
        }
        Ok(output)
    }

    /// `check` with XDP_TX to the backend the host's model predicts for `packet`.
    fn check_balanced(&self, what: &str, packet: &Packet) -> Result<Vec<u8>, Failed> {
        let number = self.backend_of(&packet.flow())?;
        self.check(what, &packet.frame(), Want::Tx(number))
    }
}

fn key(index: u32) -> [u8; 4] {
    index.to_ne_bytes()
}

/// One map value: one entry per CPU for per-CPU maps, else one.
fn read_value(map: &MapMut, index: u32) -> Result<Vec<Vec<u8>>, Failed> {
    let values = if map.map_type().is_percpu() {
        map.lookup_percpu(&key(index), MapFlags::ANY)?
    } else {
        map.lookup(&key(index), MapFlags::ANY)?.map(|value| vec![value])
    };
    values.ok_or_else(|| fail(format!("{}: no entry {index}", map.name().to_string_lossy())))
}

/// Draws a seed (or takes L4LB_TEST_SEED) and names it in any failure.
fn with_rng(test: impl FnOnce(&mut StdRng) -> TestResult) -> TestResult {
    let seed = std::env::var("L4LB_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    test(&mut StdRng::seed_from_u64(seed)).map_err(|failed| {
        fail(format!("{} [random seed {seed}: L4LB_TEST_SEED={seed} replays it]", failed.message().unwrap_or("failed")))
    })
}

fn destinations_32() -> Result<Vec<Destination>, Failed> {
    let list = l4lb::destinations::load(Path::new(SAMPLE_32)).map_err(|e| fail(format!("{e:#}")))?;
    if list.destinations.len() != 32 {
        return Err(fail(format!("{SAMPLE_32}: {} destinations, expected 32", list.destinations.len())));
    }
    Ok(list.destinations)
}

// ---------------------------------------------------------------------------
// Input frames

/// An IPv4 packet to send, as fields; `frame()` builds it with etherparse.
#[derive(Debug, Clone)]
struct Packet {
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    tos: u8,
    df: bool,
    mf: bool,
    /// In 8-byte units; not 0: a later fragment, with no L4 header.
    frag_offset: u16,
    /// IPv4 options: a multiple of 4 bytes, at most 40.
    options: Vec<u8>,
    /// Bytes after the TCP/UDP header (after the IPv4 header when there is none).
    payload: Vec<u8>,
}

impl Packet {
    fn tcp(sport: u16, dport: u16) -> Self {
        Packet {
            saddr: CLIENT,
            daddr: VIP,
            proto: TCP,
            sport,
            dport,
            tos: 0,
            df: true,
            mf: false,
            frag_offset: 0,
            options: Vec::new(),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        }
    }

    fn udp(sport: u16, dport: u16) -> Self {
        Packet { proto: UDP, df: false, payload: b"\x12\x34\x01\x00 dns?".to_vec(), ..Self::tcp(sport, dport) }
    }

    fn other(proto: u8, payload: Vec<u8>) -> Self {
        Packet { proto, sport: 0, dport: 0, payload, ..Self::tcp(0, 0) }
    }

    /// A TCP or UDP packet with random addresses, ports, TOS, DF and payload.
    fn random(rng: &mut StdRng) -> Self {
        let base = if rng.gen() { Self::tcp(rng.gen(), rng.gen()) } else { Self::udp(rng.gen(), rng.gen()) };
        let payload_len = rng.gen_range(0..64);
        Packet {
            saddr: Ipv4Addr::from(rng.gen::<u32>()),
            daddr: Ipv4Addr::from(rng.gen::<u32>()),
            tos: rng.gen(),
            df: rng.gen(),
            payload: (0..payload_len).map(|_| rng.gen()).collect(),
            ..base
        }
    }

    /// This packet with its payload sized for an IPv4 tot_len of `tot_len`.
    fn sized(self, tot_len: usize) -> Self {
        let l4_len = if self.proto == TCP { 20 } else { 8 };
        Packet { payload: (0..tot_len - 20 - l4_len).map(|i| i as u8).collect(), ..self }
    }

    fn has_l4_header(&self) -> bool {
        self.frag_offset == 0 && matches!(self.proto, TCP | UDP)
    }

    fn is_fragment(&self) -> bool {
        self.mf || self.frag_offset != 0
    }

    /// The flow as the datapath should hash it: ports 0 for any fragment.
    fn flow(&self) -> Flow {
        let (sport, dport) = if self.is_fragment() { (0, 0) } else { (self.sport, self.dport) };
        Flow { saddr: self.saddr, daddr: self.daddr, sport, dport, proto: self.proto }
    }

    /// The IPv4 packet, every checksum correct.
    fn ip_bytes(&self) -> Vec<u8> {
        let mut ip = Ipv4Header::new(0, 64, IpNumber(self.proto), self.saddr.octets(), self.daddr.octets())
            .expect("an empty payload fits");
        ip.dscp = Ipv4Dscp::try_new(self.tos >> 2).unwrap();
        ip.ecn = Ipv4Ecn::try_new(self.tos & 3).unwrap();
        ip.identification = 0x4c42;
        ip.dont_fragment = self.df;
        ip.more_fragments = self.mf;
        ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).expect("13-bit fragment offset");
        ip.options = Ipv4Options::try_from(&self.options[..]).expect("options: a multiple of 4, at most 40 bytes");
        let l4: Vec<u8> = match self.proto {
            TCP if self.has_l4_header() => {
                let mut tcp = TcpHeader::new(self.sport, self.dport, 0x0102_0304, 64240);
                tcp.ack = true;
                tcp.psh = true;
                tcp.acknowledgment_number = 0x0a0b_0c0d;
                tcp.checksum = tcp.calc_checksum_ipv4(&ip, &self.payload).unwrap();
                tcp.to_bytes().to_vec()
            }
            UDP if self.has_l4_header() => {
                UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ip, &self.payload).unwrap().to_bytes().to_vec()
            }
            _ => Vec::new(),
        };
        ip.set_payload_len(l4.len() + self.payload.len()).expect("packet fits in tot_len");
        let mut bytes = Vec::new();
        ip.write(&mut bytes).expect("writing to a Vec");
        bytes.extend(l4);
        bytes.extend(&self.payload);
        bytes
    }

    fn frame(&self) -> Vec<u8> {
        ethernet_frame(ETHERTYPE_IPV4, &self.ip_bytes())
    }
}

/// ROUTER_MAC -> LB_MAC frame carrying `payload`.
fn ethernet_frame(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let eth = Ethernet2Header { source: ROUTER_MAC, destination: LB_MAC, ether_type: EtherType(ether_type) };
    [&eth.to_bytes()[..], payload].concat()
}

/// `frame` with zeros appended up to `len` bytes (Ethernet padding).
fn padded(frame: &[u8], len: usize) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame.resize(len.max(frame.len()), 0);
    frame
}

/// `frame` with byte `offset` of its IPv4 header replaced, header checksum redone.
fn with_ip_byte(frame: &[u8], offset: usize, value: u8) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + offset] = value;
    refresh_ipv4_checksum(&mut frame);
    frame
}

/// `frame` (same length) with the IPv4 tot_len set to `tot_len`, header checksum redone.
fn with_tot_len(frame: &[u8], tot_len: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&tot_len.to_be_bytes());
    refresh_ipv4_checksum(&mut frame);
    frame
}

/// The datagram of `frame` cut to `ip_len` bytes, tot_len saying so.
fn datagram_cut(frame: &[u8], ip_len: usize) -> Vec<u8> {
    with_tot_len(&frame[..ETH_LEN + ip_len], ip_len as u16)
}

/// Recomputes the IPv4 header checksum of a frame, when the whole header is there.
fn refresh_ipv4_checksum(frame: &mut [u8]) {
    let header_len = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    if header_len < 20 || frame.len() < ETH_LEN + header_len {
        return;
    }
    let header = &mut frame[ETH_LEN..ETH_LEN + header_len];
    header[10..12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Expected output, independent of the datapath's code

/// Whether the 32-bit sum of the 16-bit words of `header` still carries after
/// one fold. Where that happens depends on how the words are loaded: RFC 1071
/// reads them big-endian, a little-endian CPU (BPF on x86) the other way round.
fn needs_second_fold(header: &[u8], little_endian: bool) -> bool {
    let word = |pair: &[u8]| {
        u32::from(if little_endian {
            u16::from_le_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], pair[1]])
        })
    };
    let sum: u32 = header.chunks(2).map(word).sum();
    (sum & 0xffff) + (sum >> 16) > 0xffff
}

/// The outer IPv4 header the balancer should push, checksum included.
fn outer_header(tos: u8, tot_len: u16, df: bool, src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0] = 0x45; // version 4, IHL 5
    header[1] = tos; // DSCP and ECN as the client sent them
    header[2..4].copy_from_slice(&tot_len.to_be_bytes());
    // [4..6] id 0
    header[6] = if df { 0x40 } else { 0 }; // DF only, offset 0
    header[8] = 64; // TTL
    header[9] = IPIP;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// What the balancer should send for `frame` to `backend`: Ethernet to the
/// backend's MAC from the MAC the frame was sent to, the outer header, then
/// every byte after the input's Ethernet header, unchanged.
fn encapsulated(frame: &[u8], backend: &Destination, src: Ipv4Addr) -> Vec<u8> {
    let inner = &frame[ETH_LEN..];
    let inner_tot_len = u16::from_be_bytes([inner[2], inner[3]]);
    let df = inner[6] & 0x40 != 0;
    let outer = outer_header(inner[1], inner_tot_len + 20, df, src, backend.addr);
    [&backend.mac[..], &frame[..6], &ETHERTYPE_IPV4.to_be_bytes(), &outer, inner].concat()
}

/// The outer header's checksum, checked a second way with etherparse.
fn check_outer_checksum(what: &str, output: &[u8]) -> TestResult {
    let outer = Ipv4HeaderSlice::from_slice(&output[ETH_LEN..ETH_LEN + 20])
        .map_err(|e| fail(format!("{what}: outer header does not parse: {e}")))?
        .to_header();
    if outer.calc_header_checksum() != outer.header_checksum || internet_checksum(&output[ETH_LEN..ETH_LEN + 20]) != 0 {
        return Err(fail(format!("{what}: outer checksum {:#06x} is wrong", outer.header_checksum)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. TCP and UDP

const TOS_VALUES: [u8; 7] = [0x00, 0x01, 0x02, 0x03, 0xb8, 0xbb, 0xff];

fn tcp_udp_single_destination() -> TestResult {
    let lb = Balancer::with_destinations(&[BACKEND])?;
    for base in [Packet::tcp(40000, 443), Packet::udp(53000, 53)] {
        for df in [true, false] {
            for tos in TOS_VALUES {
                for payload_len in [0, 1, 333] {
                    let packet = Packet { df, tos, payload: vec![0xa5; payload_len], ..base.clone() };
                    let what = format!("proto {} df {df} tos {tos:#04x} payload {payload_len}", packet.proto);
                    lb.check(&what, &packet.frame(), Want::Tx(0))?;
                }
            }
        }
        // Shorter than Ethernet's minimum: the padding travels on behind the datagram.
        let short = Packet { payload: Vec::new(), ..base.clone() };
        lb.check(&format!("proto {} padded to 60 bytes", base.proto), &padded(&short.frame(), 60), Want::Tx(0))?;
    }
    Ok(())
}

fn tcp_udp_predicted_backend_random_flows() -> TestResult {
    with_rng(|rng| {
        let destinations = destinations_32()?;
        let mut lb = Balancer::with_destinations(&destinations)?;
        lb.configure(rng.gen(), LB_SRC, 0)?;
        let mut used = vec![false; destinations.len()];
        for i in 0..2000 {
            let packet = Packet::random(rng);
            lb.check_balanced(&format!("random flow {i}: {:?}", packet.flow()), &packet)?;
            used[lb.backend_of(&packet.flow())? as usize] = true;
        }
        let unused = used.iter().filter(|&&u| !u).count();
        if unused > 0 {
            return Err(fail(format!("{unused} of 32 destinations got none of 2000 flows")));
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 2. IPv4 options

fn ipv4_options_ihl_6_to_15() -> TestResult {
    with_rng(|rng| {
        let lb = Balancer::with_destinations(&destinations_32()?)?;
        for ihl in 6..=15usize {
            // NOPs then end-of-options: bytes a parser ignoring IHL would take for ports.
            let mut options = vec![0x01; (ihl - 5) * 4];
            *options.last_mut().unwrap() = 0x00;
            for i in 0..40 {
                let packet = Packet { options: options.clone(), ..Packet::random(rng) };
                lb.check_balanced(&format!("IHL {ihl} flow {i}: {:?}", packet.flow()), &packet)?;
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 3. Frames that are not IPv4 TCP/UDP go to the stack

fn not_tcp_udp_passes() -> TestResult {
    let lb = Balancer::with_destinations(&[BACKEND])?;

    let echo = Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 0x4c42, seq: 1 });
    let ping = [&Icmpv4Header::with_checksum(echo, b"ping").to_bytes()[..], b"ping"].concat();
    lb.check("ICMP echo request", &Packet::other(ICMP, ping).frame(), Want::Pass)?;

    let gre_over_ipv4 = [&[0u8, 0, 0x08, 0x00][..], &Packet::tcp(1, 2).ip_bytes()].concat();
    lb.check("GRE", &Packet::other(GRE, gre_over_ipv4).frame(), Want::Pass)?;
    lb.check("IPIP", &Packet::other(IPIP, Packet::udp(1, 2).ip_bytes()).frame(), Want::Pass)?;
    for proto in [ESP, SCTP, 0, 255] {
        lb.check(&format!("IPv4 protocol {proto}"), &Packet::other(proto, vec![7; 24]).frame(), Want::Pass)?;
    }

    lb.check("ARP request", &arp_request_frame(), Want::Pass)?;
    lb.check("IPv6 TCP", &ipv6_tcp_frame(), Want::Pass)?;
    let tagged = [&[0x00, 0x05][..], &ETHERTYPE_IPV4.to_be_bytes(), &Packet::tcp(1, 2).ip_bytes()].concat();
    lb.check("802.1Q-tagged IPv4 TCP", &ethernet_frame(ETHERTYPE_VLAN, &tagged), Want::Pass)?;
    lb.check("Ethernet header alone, type ARP", &ethernet_frame(ETHERTYPE_ARP, &[]), Want::Pass)?;
    Ok(())
}

fn arp_request_frame() -> Vec<u8> {
    let mut arp = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]; // Ethernet/IPv4, request
    arp.extend(ROUTER_MAC);
    arp.extend(Ipv4Addr::new(192, 0, 2, 254).octets());
    arp.extend([0; 6]);
    arp.extend(LB_SRC.octets());
    let mut frame = ethernet_frame(ETHERTYPE_ARP, &arp);
    frame[..6].copy_from_slice(&[0xff; 6]);
    padded(&frame, 60)
}

fn ipv6_tcp_frame() -> Vec<u8> {
    let tcp = TcpHeader::new(40000, 443, 1, 64240);
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
        payload_length: tcp.header_len() as u16,
        next_header: IpNumber::TCP,
        hop_limit: 64,
        source: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        destination: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
    };
    ethernet_frame(ETHERTYPE_IPV6, &[&ip.to_bytes()[..], &tcp.to_bytes()].concat())
}

// ---------------------------------------------------------------------------
// 4. Truncated frames

fn truncated_frames_drop() -> TestResult {
    let lb = Balancer::with_destinations(&[BACKEND])?;

    // Cut anywhere in a plain TCP frame (60 bytes, datagram 46).
    let frame = Packet { payload: vec![0x5a; 6], ..Packet::tcp(40000, 80) }.frame();
    for len in 0..frame.len() {
        let want = match len {
            0..=13 => Want::Refused,
            14..=33 => Want::Drop(L4LB_CNT_DROP_SHORT_IPV4),
            _ => Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN), // tot_len still says 46
        };
        lb.check(&format!("TCP frame cut to {len} bytes"), &frame[..len], want)?;
    }

    // Cut inside 40 bytes of options (IHL 15).
    let with_options = Packet { options: vec![0x01; 40], ..Packet::udp(1234, 53) }.frame();
    for len in ETH_LEN + 20..ETH_LEN + 60 {
        lb.check(
            &format!("IHL 15 frame cut to {len} bytes"),
            &with_options[..len],
            Want::Drop(L4LB_CNT_DROP_SHORT_IPV4),
        )?;
    }

    // Datagrams that end before the 4 port bytes: frame cut there, or padded
    // so that the real ports are still in the frame behind tot_len.
    for base in [Packet::tcp(40000, 80), Packet::udp(40000, 53)] {
        for ihl in [5usize, 6, 15] {
            let packet = Packet { options: vec![0x01; (ihl - 5) * 4], ..base.clone() };
            let frame = packet.frame();
            for extra in 0..4 {
                let ip_len = ihl * 4 + extra;
                let what = format!("proto {} IHL {ihl}: datagram of {ip_len} bytes", base.proto);
                lb.check(&what, &datagram_cut(&frame, ip_len), Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
                let ports_behind = with_tot_len(&frame, ip_len as u16);
                lb.check(&format!("{what}, ports behind it"), &ports_behind, Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
            }
            // The 4 port bytes and nothing more: enough to balance.
            let ip_len = ihl * 4 + 4;
            let what = format!("proto {} IHL {ihl}: datagram of {ip_len} bytes (ports only)", base.proto);
            lb.check(&what, &datagram_cut(&frame, ip_len), Want::Tx(0))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Malformed IPv4 headers

fn malformed_ipv4_drops() -> TestResult {
    let lb = Balancer::with_destinations(&[BACKEND])?;
    let frame = Packet::tcp(40000, 80).frame();
    let ip_len = frame.len() - ETH_LEN;

    for version in [0u8, 1, 2, 3, 5, 6, 7, 15] {
        let bad = with_ip_byte(&frame, 0, version << 4 | 5);
        lb.check(&format!("version {version}"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;
    }
    let ipv6_as_ipv4 = [&ipv6_tcp_frame()[..12], &ETHERTYPE_IPV4.to_be_bytes(), &ipv6_tcp_frame()[ETH_LEN..]].concat();
    lb.check("IPv6 packet in an IPv4 EtherType", &ipv6_as_ipv4, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;

    for ihl in 0u8..5 {
        lb.check(&format!("IHL {ihl}"), &with_ip_byte(&frame, 0, 0x40 | ihl), Want::Drop(L4LB_CNT_DROP_BAD_IHL))?;
    }

    for tot_len in [ip_len + 1, ip_len + 100, 0xffff] {
        let bad = with_tot_len(&frame, tot_len as u16);
        lb.check(&format!("tot_len {tot_len} beyond the frame"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    for tot_len in [0u16, 1, 19] {
        let bad = with_tot_len(&frame, tot_len);
        lb.check(&format!("tot_len {tot_len} below the header"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    let with_options = Packet { options: vec![0x01; 4], ..Packet::tcp(40000, 80) }.frame();
    for tot_len in 20u16..24 {
        let bad = with_tot_len(&with_options, tot_len);
        lb.check(&format!("IHL 6, tot_len {tot_len}"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    lb.check("tot_len exactly the frame", &frame, Want::Tx(0))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Fragments

fn fragments_hash_without_ports() -> TestResult {
    with_rng(|rng| {
        let lb = Balancer::with_destinations(&destinations_32()?)?;
        let mut ports_would_move = 0;
        for i in 0..200 {
            let flow = Packet { df: false, ..Packet::random(rng) };
            let first = Packet { mf: true, payload: vec![0xf1; 16], ..flow.clone() };
            let middle = Packet { mf: true, frag_offset: 5, payload: vec![0xf2; 24], ..flow.clone() };
            let last = Packet { frag_offset: 8, payload: vec![0xf3; 5], ..flow.clone() };
            let empty = Packet { frag_offset: 11, payload: Vec::new(), ..flow.clone() };
            for (name, fragment) in [("first", first), ("middle", middle), ("last", last), ("empty later", empty)] {
                lb.check_balanced(&format!("flow {i}: {name} fragment {:?}", fragment.flow()), &fragment)?;
            }
            if lb.backend_of(&flow.flow())? != lb.backend_of(&Packet { mf: true, ..flow }.flow())? {
                ports_would_move += 1;
            }
        }
        // The test only tells ports from no ports if the two usually differ.
        if ports_would_move < 150 {
            return Err(fail(format!("only {ports_would_move} of 200 flows change backend without ports")));
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 7. No backend; MTU

fn empty_table_drops() -> TestResult {
    let frame = Packet::tcp(40000, 80).frame();

    let mut lb = Balancer::load()?;
    lb.configure(HASH_SEED, LB_SRC, 0)?;
    lb.check("fresh maps: slots 0, backend 0 inactive", &frame, Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;

    lb.install(&[BACKEND])?;
    lb.check("table filled", &frame, Want::Tx(0))?;
    lb.set_backend(0, None)?;
    lb.check("its backend cleared", &frame, Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;

    lb.install(&[BACKEND])?;
    lb.set_slots(&vec![SLOT_EMPTY; TABLE_SIZE])?;
    lb.check("every slot SLOT_EMPTY", &frame, Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    Ok(())
}

fn mtu_limit() -> TestResult {
    let mut lb = Balancer::with_destinations(&[BACKEND])?;
    lb.configure(HASH_SEED, LB_SRC, 1500)?;
    let fits = Packet::udp(5353, 53).sized(1480).frame();
    let too_big = Packet::udp(5353, 53).sized(1481).frame();
    lb.check("mtu 1500, inner 1481", &too_big, Want::Drop(L4LB_CNT_DROP_TOO_BIG))?;
    lb.check("mtu 1500, inner 1480", &fits, Want::Tx(0))?;
    lb.check("mtu 1500, inner 1480 + 6 bytes padding", &padded(&fits, fits.len() + 6), Want::Tx(0))?;
    let tcp_too_big = Packet::tcp(40000, 80).sized(1481).frame();
    lb.check("mtu 1500, TCP inner 1481", &tcp_too_big, Want::Drop(L4LB_CNT_DROP_TOO_BIG))?;
    lb.configure(HASH_SEED, LB_SRC, 0)?;
    lb.check("mtu 0 (unset), inner 1481", &too_big, Want::Tx(0))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. Outer checksum

/// Outer headers whose word sum still carries after the first fold (words
/// loaded either way round), and headers whose checksum comes out 0x0000:
/// source 255.255.255.254, backends 255.255.a.b searched for the property
/// under a few TOS values and lengths.
fn checksum_carry_folding() -> TestResult {
    let src = Ipv4Addr::new(255, 255, 255, 254);
    let mut carries_big_endian = Vec::new();
    let mut carries_little_endian = Vec::new();
    let mut zero_checksum = Vec::new();
    for (tos, inner_len) in [(0xff, 1400u16), (0xb8, 28), (0x03, 576), (0xfc, 1001)] {
        for low in 0..=u16::MAX {
            let [a, b] = low.to_be_bytes();
            let backend = Ipv4Addr::new(255, 255, a, b);
            let header = outer_header(tos, inner_len + 20, true, src, backend);
            let mut unsummed = header;
            unsummed[10..12].copy_from_slice(&[0, 0]);
            let case = (backend, tos, inner_len);
            if needs_second_fold(&unsummed, false) {
                carries_big_endian.push(case);
            }
            if needs_second_fold(&unsummed, true) {
                carries_little_endian.push(case);
            }
            if header[10..12] == [0, 0] {
                zero_checksum.push(case);
            }
        }
    }
    if carries_big_endian.len() < 8 || carries_little_endian.len() < 8 || zero_checksum.is_empty() {
        return Err(fail(format!(
            "search found {} + {} carrying and {} zero-checksum headers",
            carries_big_endian.len(),
            carries_little_endian.len(),
            zero_checksum.len()
        )));
    }

    let mut lb = Balancer::with_destinations(&[BACKEND])?;
    lb.configure(HASH_SEED, src, 0)?;
    let chosen = carries_big_endian.iter().chain(&carries_little_endian).chain(&zero_checksum);
    for &(backend, tos, inner_len) in chosen {
        lb.set_backend(0, Some(Destination { addr: backend, ..BACKEND }))?;
        let packet = Packet { tos, df: true, ..Packet::udp(5353, 53).sized(usize::from(inner_len)) };
        let what = format!("outer {src} -> {backend}, tos {tos:#04x}, inner {inner_len} bytes");
        lb.check(&what, &packet.frame(), Want::Tx(0))?;
    }
    Ok(())
}

fn checksum_random_headers() -> TestResult {
    with_rng(|rng| {
        let mut lb = Balancer::with_destinations(&[BACKEND])?;
        for i in 0..3000 {
            let src = Ipv4Addr::from(rng.gen::<u32>());
            let backend = Ipv4Addr::from(rng.gen::<u32>());
            lb.configure(rng.gen(), src, 0)?;
            lb.set_backend(0, Some(Destination { addr: backend, ..BACKEND }))?;
            let packet = Packet::random(rng).sized(rng.gen_range(40..=1400));
            let what = format!("header {i}: outer {src} -> {backend}, tos {:#04x}, df {}", packet.tos, packet.df);
            lb.check(&what, &packet.frame(), Want::Tx(0))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 9. Spread over 32 destinations

fn spread_32_destinations() -> TestResult {
    const FRAMES: u64 = 100_000;
    with_rng(|rng| {
        let destinations = destinations_32()?;
        let mut lb = Balancer::with_destinations(&destinations)?;
        lb.configure(rng.gen(), LB_SRC, 0)?;
        let mut packets = vec![0u64; destinations.len()];
        let mut bytes = vec![0u64; destinations.len()];
        for i in 0..FRAMES {
            let packet = Packet { daddr: VIP, ..Packet::random(rng) };
            let frame = packet.frame();
            let number = lb.backend_of(&packet.flow())?;
            let (verdict, output) = lb.run(&frame)?;
            if verdict != XDP_TX {
                return Err(fail(format!("frame {i} {:?}: {}", packet.flow(), verdict_name(verdict))));
            }
            same_bytes(&format!("frame {i} {:?}", packet.flow()), &output, &lb.encapsulated(&frame, number))?;
            packets[number as usize] += 1;
            bytes[number as usize] += output.len() as u64;
        }

        let mean = FRAMES as f64 / destinations.len() as f64;
        for (number, &count) in packets.iter().enumerate() {
            if (count as f64 - mean).abs() > mean / 10.0 {
                return Err(fail(format!("destination {number} got {count} frames, mean {mean}: {packets:?}")));
            }
            let stats = lb.backend_stats(number as u32)?;
            if stats != (count, bytes[number]) {
                return Err(fail(format!(
                    "destination {number}: l4lb_be_stats (packets, bytes) {stats:?}, observed {:?}",
                    (count, bytes[number])
                )));
            }
        }
        let counters = lb.counters()?;
        let mut wanted = vec![0u64; counters.len()];
        wanted[L4LB_CNT_RX as usize] = FRAMES;
        wanted[L4LB_CNT_TX as usize] = FRAMES;
        if counters != wanted {
            return Err(fail(format!(
                "counters {}, expected {}",
                counter_moves(&COUNTER_NAMES, &vec![0; counters.len()], &counters),
                counter_moves(&COUNTER_NAMES, &vec![0; counters.len()], &wanted)
            )));
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 10. Per-CPU counter maps

fn per_cpu_counters() -> TestResult {
    let mut lb = Balancer::load_with(true)?;
    for map in [&lb.skel.maps.l4lb_counters, &lb.skel.maps.l4lb_be_stats] {
        if map.map_type() != MapType::PercpuArray {
            return Err(fail(format!(
                "{} is {:?}, expected PercpuArray",
                map.name().to_string_lossy(),
                map.map_type()
            )));
        }
    }
    lb.configure(HASH_SEED, LB_SRC, 0)?;
    lb.install(&[BACKEND])?;
    for i in 0..5u16 {
        lb.check(&format!("per-CPU: TCP {i}"), &Packet::tcp(40000 + i, 80).frame(), Want::Tx(0))?;
    }
    lb.check("per-CPU: ARP", &arp_request_frame(), Want::Pass)?;
    lb.check("per-CPU: IHL 4", &with_ip_byte(&Packet::udp(1, 2).frame(), 0, 0x44), Want::Drop(L4LB_CNT_DROP_BAD_IHL))?;
    Ok(())
}
