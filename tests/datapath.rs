//! The XDP datapath run in the kernel with BPF_PROG_TEST_RUN (repeat 1):
//! verdicts, exact output frames, all the counters and the traffic of every
//! backend and service, frame by frame. Needs root (CAP_BPF); without it
//! every test is reported as ignored. Every test runs on both builds of
//! src/bpf/l4lb_xdp.bpf.c: as NAME on l4lb_xdp.o (atomic adds: what iproute2
//! and offload load) and as driver::NAME on l4lb_xdp_percpu.o (the driver
//! build `l4lb attach` loads: per-CPU counters, a pin's `seen` stored).
//!
//! The maps are filled directly (tests/common/lb.rs lays the values out from
//! include/l4lb.h), not through the host's apply engine, so this suite tests
//! the datapath's semantics (issue 4's spec, steps 1 to 8, and issue 5's
//! decisions: VLAN tags, ICMP errors, too-big answers, IPv4 checksum, TTL 0,
//! fragment entries, which tests write as the host would) on their own.
//! ICMP answers are checked twice: against bytes built here with etherparse
//! and against the reference model's, built with its own RFC 1071 sums (the
//! ICMPv6 one over the pseudo-header).
//!
//! Each case states what must happen; the expected output frame is built
//! here with etherparse from the specification, field by field, and the
//! outer IPv4 checksum is checked again with an RFC 1071 sum computed here.
//! The flow hash (and so the slot, the backend and the IPv6 outer flow label)
//! comes from the host's model (`Flow::hash`, `maglev::flow_slot`), which
//! `hash_model_agrees_*` and `maglev_through_the_datapath` check against the
//! datapath on thousands of flows. Every case is also put to the reference
//! model of tests/common/lb.rs (the fuzzer's expectation), which must agree.
//!
//! Slots in transition (section 17, docs/transitions.md): `check` also
//! compares the kernel's l4lb_flows with the model's after every frame (so
//! every case with steady slots checks that no entry is ever made) and
//! counts the frame's FLOW_* event; the tracking cases state the backend,
//! the event and the map's entries (keys and values spelled out byte by
//! byte: backend, slot, last-seen tick), fill the object's HASH map, load it
//! as an LRU hash, and run two balancers side by side where they need it.
//!
//! Random tests draw a new seed on every run and name it when they fail;
//! `L4LB_TEST_SEED=N cargo test --test datapath` replays a run.

#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset,
    IpNumber, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4HeaderSlice, Ipv4Options, Ipv6FlowLabel, Ipv6Header, Ipv6HeaderSlice,
    TcpHeader, UdpHeader,
};
use libbpf_rs::{MapCore, MapType};
use libtest_mimic::Failed;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::lb::{
    BackendEntry, Build, FlowKey, FlowPin, FlowTable, Lb, LbConfig, Outcome, ServiceEntry, Skel, SlotWord, VipKey,
    MAGLEV_SIZE, MAX_BACKENDS, NCNT, SLOT_EMPTY,
};
use common::packet::internet_checksum;
use common::wire::*;
use common::{counter_moves, fail, same_bytes};
use l4lb::bpf::consts::*;
use l4lb::bpf::counter::*;
use l4lb::bpf::COUNTER_NAMES;
use l4lb::flow_hash::Flow;
use l4lb::maglev;

type TestResult = Result<(), Failed>;

fn main() {
    common::lb::run_suite_both_builds(
        "datapath",
        "BPF_PROG_TEST_RUN needs CAP_BPF",
        vec![
            ("golden_ipv4_client_ipv4_backend", golden_ipv4_client_ipv4_backend),
            ("golden_ipv4_client_ipv6_backend", golden_ipv4_client_ipv6_backend),
            ("golden_ipv6_client_ipv6_backend", golden_ipv6_client_ipv6_backend),
            ("ipv6_extension_headers", ipv6_extension_headers),
            ("ipv6_fragments_hash_without_ports", ipv6_fragments_hash_without_ports),
            ("ipv6_malformed", ipv6_malformed),
            ("vip_matching", vip_matching),
            ("udp_hash_ports", udp_hash_ports),
            ("no_backend", no_backend),
            ("mtu_limit", mtu_limit),
            ("not_tcp_udp_passes", not_tcp_udp_passes),
            ("ipv4_options_ihl_6_to_15", ipv4_options_ihl_6_to_15),
            ("truncated_ipv4_frames_drop", truncated_ipv4_frames_drop),
            ("malformed_ipv4_drops", malformed_ipv4_drops),
            ("ipv4_fragments_hash_without_ports", ipv4_fragments_hash_without_ports),
            ("checksum_carry_folding", checksum_carry_folding),
            ("checksum_random_headers", checksum_random_headers),
            ("hash_model_agrees_ipv4", hash_model_agrees_ipv4),
            ("hash_model_agrees_ipv6", hash_model_agrees_ipv6),
            ("maglev_through_the_datapath", maglev_through_the_datapath),
            ("per_cpu_counters", per_cpu_counters),
            ("vlan_tags", vlan_tags),
            ("icmp_errors", icmp_errors),
            ("too_big_answers", too_big_answers),
            ("checksum_ttl_tot_len", checksum_ttl_tot_len),
            ("fragments_follow_fragment_entry", fragments_follow_fragment_entry),
            ("tracking_slot_words", tracking_slot_words),
            ("tracking_steady_slots_create_nothing", tracking_steady_slots_create_nothing),
            ("tracking_transition_rules", tracking_transition_rules),
            ("tracking_what_is_a_syn", tracking_what_is_a_syn),
            ("tracking_pin_holds", tracking_pin_holds),
            ("tracking_double_change", tracking_double_change),
            ("tracking_previous_not_in_service", tracking_previous_not_in_service),
            ("tracking_syn_repins", tracking_syn_repins),
            ("tracking_pin_other_slot", tracking_pin_other_slot),
            ("tracking_backend_number_reused", tracking_backend_number_reused),
            ("tracking_fragments", tracking_fragments),
            ("tracking_icmp_errors", tracking_icmp_errors),
            ("tracking_table_full", tracking_table_full),
            ("tracking_lru", tracking_lru),
            ("tracking_too_big", tracking_too_big),
            ("tracking_ipv6", tracking_ipv6),
            ("tracking_udp_ports", tracking_udp_ports),
            ("tracking_empty_and_odd_words", tracking_empty_and_odd_words),
            ("tracking_two_balancers_agree", tracking_two_balancers_agree),
        ],
    )
}

// ---------------------------------------------------------------------------
// Addresses (documentation ranges; test_run never sends anything anywhere)

/// The balancer's own MAC: the destination of every frame it receives.
const LB_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0x00, 0x01];
/// The router handing frames to the balancer: their source MAC.
const ROUTER_MAC: [u8; 6] = [0x02, 0x52, 0x54, 0x00, 0x00, 0xfe];
/// The next hop of backends without a MAC of their own.
const GATEWAY_MAC: [u8; 6] = [0x02, 0x9a, 0x7e, 0x00, 0x00, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0xbe, 0x00, 0x00, 0x00, 0x01];
/// The outer sources the balancer is configured with.
const LB_SRC4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LB_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1b, 0, 0, 0, 0, 1);
/// Clients and the service addresses they talk to.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0, 0, 0, 0, 1);
const HASH_SEED: u32 = 0x5eed_0001;

/// The service and backend numbers of single-backend setups (not 0: a
/// zeroed entry must never be what makes a test pass).
const SVC: u32 = 5;
const BE: u32 = 9;

fn base_config() -> LbConfig {
    LbConfig {
        hash_seed: HASH_SEED,
        flags: L4LB_CONFIG_SEED_SET
            | L4LB_CONFIG_SEED_FIXED
            | L4LB_CONFIG_SRC_SET
            | L4LB_CONFIG_SRC6_SET
            | L4LB_CONFIG_GATEWAY_SET,
        mtu: 0,
        catch_all: 0,
        vip_probes: 0,
        src_v4: LB_SRC4.octets(),
        src_v6: LB_SRC6.octets(),
        gateway_mac: GATEWAY_MAC,
        clock: 0,
    }
}

fn service_flags(backends: &[BackendEntry], hash_ports: bool) -> u32 {
    let mut flags = L4LB_SERVICE_ACTIVE;
    if hash_ports {
        flags |= L4LB_SERVICE_HASH_PORTS;
    }
    if backends.iter().any(|b| b.family == L4LB_FAMILY_IPV4 as u8) {
        flags |= L4LB_SERVICE_IPV4_BACKENDS;
    }
    flags
}

/// Loaded and configured (base_config), nothing else.
fn loaded() -> Result<Lb, Failed> {
    let mut lb = Lb::load(false)?;
    lb.set_config(base_config())?;
    Ok(lb)
}

/// Service `service` filled with `numbered` backends by slot: `table` maps a
/// slot index to an index of `numbered`.
fn add_service(lb: &mut Lb, service: u32, numbered: &[(u32, BackendEntry)], hash_ports: bool) -> TestResult {
    let entries: Vec<BackendEntry> = numbered.iter().map(|(_, b)| *b).collect();
    for (number, entry) in numbered {
        lb.set_backend(*number, BackendEntry { service, ..*entry })?;
    }
    lb.set_service(service, service_flags(&entries, hash_ports))?;
    let table: Vec<u32> = if numbered.len() == 1 {
        vec![numbered[0].0; MAGLEV_SIZE]
    } else {
        let identities: Vec<maglev::Backend> =
            entries.iter().map(|b| maglev::Backend::from_addr(b.ip(), b.weight)).collect();
        let indices = maglev::populate(&identities, MAGLEV_SIZE).map_err(|e| fail(format!("maglev: {e}")))?;
        let numbers: Vec<u32> = numbered.iter().map(|(n, _)| *n).collect();
        maglev::to_numbers(&indices, &numbers)
    };
    lb.set_table(service, &table)
}

/// A catch-all service SVC whose every slot names backend BE.
fn catch_all_one(backend: BackendEntry) -> Result<Lb, Failed> {
    let mut lb = loaded()?;
    add_service(&mut lb, SVC, &[(BE, backend)], true)?;
    let mut config = lb.config.clone();
    config.flags |= L4LB_CONFIG_CATCH_ALL;
    config.catch_all = SVC;
    lb.set_config(config)?;
    Ok(lb)
}

fn backend4() -> BackendEntry {
    BackendEntry::new(BACKEND4.into(), BACKEND_MAC, SVC)
}

fn backend6() -> BackendEntry {
    BackendEntry::new(BACKEND6.into(), BACKEND_MAC, SVC)
}

// ---------------------------------------------------------------------------
// Checking one frame

/// What a frame should lead to.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// XDP_TX to `backend` of `service`; `flow` as hashed (ports 0 where the
    /// datapath leaves them out).
    Tx { service: u32, backend: u32, flow: Flow },
    /// XDP_TX counted TX_TOO_BIG: the ICMP answer advertising `mtu`.
    TooBig { mtu: u32 },
    /// XDP_PASS counted PASS, frame untouched.
    Pass,
    /// XDP_PASS counted PASS_NO_SERVICE, frame untouched.
    NoService,
    /// XDP_DROP counted by this counter, frame untouched.
    Drop(u32),
    /// test_run refuses the frame (shorter than an Ethernet header).
    Refused,
}

fn tx(service: u32, backend: u32, flow: Flow) -> Want {
    Want::Tx { service, backend, flow }
}

/// Runs `frame` once and checks everything it should do: the verdict, the
/// exact output, RX plus exactly one outcome counter (and the model's FLOW_*
/// event, if any: all counters compared), the packets and bytes of every
/// backend and service (only the chosen ones move), and l4lb_flows (the
/// kernel's entries byte for byte against the model's: for an untracked
/// service, no entry ever). The reference model must agree with `want`.
/// Returns the output.
fn check(lb: &Lb, what: &str, frame: &[u8], want: Want) -> Result<Vec<u8>, Failed> {
    check_tracked(lb, what, frame, want, None)
}

/// `check`, with the connection-tracking event stated by the case: `pin`
/// Some(event) requires the reference model to agree (Pin::Nothing: the
/// frame writes no entry), and the kernel's counters to move by it.
fn check_tracked(lb: &Lb, what: &str, frame: &[u8], want: Want, pin: Option<Pin>) -> Result<Vec<u8>, Failed> {
    // The fuzzer's model must say the same as the case.
    let (model, tracking) = lb.classify_tracked(frame);
    let event = tracking.as_ref().and_then(|t| t.event());
    if let Some(pin) = pin {
        ensure!(
            pin.counter() == event,
            "{what}: the reference model says {tracking:?} (event {:?}), the case {pin:?}",
            event.map(|e| COUNTER_NAMES[e as usize])
        );
    }
    let agrees = match (want, model) {
        (Want::Tx { service, backend, flow }, Outcome::Tx(t)) => {
            t.service == service && t.backend == backend && t.hash == flow.hash(lb.config.hash_seed)
        }
        (Want::TooBig { mtu }, Outcome::TooBig(t)) => t.mtu == mtu,
        (Want::Pass, Outcome::Pass) | (Want::NoService, Outcome::PassNoService) | (Want::Refused, Outcome::Refused) => {
            true
        }
        (Want::Drop(a), Outcome::Drop(b)) => a == b,
        _ => false,
    };
    ensure!(agrees, "{what}: the reference model says {model:?}, the case {want:?}");

    let counters_before = lb.counters()?;
    let backends_before = lb.backend_traffic()?;
    let services_before = lb.service_traffic()?;
    let mut counters_wanted = counters_before;
    let mut backends_wanted = backends_before.clone();
    let mut services_wanted = services_before.clone();

    let output = match (want, lb.run(frame)) {
        (Want::Refused, Err(error)) if error.kind() == libbpf_rs::ErrorKind::InvalidInput => Vec::new(),
        (Want::Refused, result) => {
            return Err(fail(format!(
                "{what}: test_run gave {result:?} for a {}-byte frame, expected EINVAL",
                frame.len()
            )))
        }
        (_, Err(error)) => return Err(fail(format!("{what}: test_run failed: {error}"))),
        (want, Ok((verdict, output))) => {
            let (verdict_wanted, outcome, output_wanted) = match want {
                Want::Tx { backend, flow, .. } => {
                    let entry = &lb.backends[backend as usize];
                    (XDP_TX, L4LB_CNT_TX, encapsulated(frame, entry, &lb.config, flow.hash(lb.config.hash_seed)))
                }
                Want::TooBig { mtu } => (XDP_TX, L4LB_CNT_TX_TOO_BIG, too_big_answer(frame, mtu)),
                Want::Pass => (XDP_PASS, L4LB_CNT_PASS, frame.to_vec()),
                Want::NoService => (XDP_PASS, L4LB_CNT_PASS_NO_SERVICE, frame.to_vec()),
                Want::Drop(counter) => (XDP_DROP, counter, frame.to_vec()),
                Want::Refused => unreachable!(),
            };
            if verdict != verdict_wanted {
                return Err(fail(format!(
                    "{what}: verdict {}, expected {}; counters moved: {}",
                    verdict_name(verdict),
                    verdict_name(verdict_wanted),
                    counter_moves(&COUNTER_NAMES, &counters_before, &lb.counters()?)
                )));
            }
            if let (Want::Tx { .. }, Outcome::Tx(t)) = (want, model) {
                // Named fields first (a clearer message), then every byte.
                lb.check_tx_output(frame, &output, &t).map_err(|e| fail(format!("{what}: {e}")))?;
            }
            if let (Want::TooBig { .. }, Outcome::TooBig(t)) = (want, model) {
                common::lb::check_too_big_output(frame, &output, &t).map_err(|e| fail(format!("{what}: {e}")))?;
                same_bytes(&format!("{what} (the model's answer)"), &output, &common::lb::too_big_answer(frame, &t))?;
            }
            same_bytes(what, &output, &output_wanted)?;
            counters_wanted[L4LB_CNT_RX as usize] += 1;
            counters_wanted[outcome as usize] += 1;
            if let Some(event) = event {
                counters_wanted[event as usize] += 1;
            }
            lb.pin_applied(&tracking);
            if let Want::Tx { service, backend, .. } = want {
                check_outer_checksum(what, &output)?;
                backends_wanted[backend as usize].0 += 1;
                backends_wanted[backend as usize].1 += output.len() as u64;
                services_wanted[service as usize].0 += 1;
                services_wanted[service as usize].1 += output.len() as u64;
            }
            output
        }
    };

    let counters_after = lb.counters()?;
    ensure!(
        counters_after == counters_wanted,
        "{what}: counters moved: {}; expected: {}",
        counter_moves(&COUNTER_NAMES, &counters_before, &counters_after),
        counter_moves(&COUNTER_NAMES, &counters_before, &counters_wanted)
    );
    let backends_after = lb.backend_traffic()?;
    if let Some(n) = (0..MAX_BACKENDS).find(|&n| backends_after[n] != backends_wanted[n]) {
        return Err(fail(format!(
            "{what}: backend {n} (packets, bytes) went {:?} -> {:?}, expected {:?}",
            backends_before[n], backends_after[n], backends_wanted[n]
        )));
    }
    let services_after = lb.service_traffic()?;
    if let Some(s) = (0..services_after.len()).find(|&s| services_after[s] != services_wanted[s]) {
        return Err(fail(format!(
            "{what}: service {s} (packets, bytes) went {:?} -> {:?}, expected {:?}",
            services_before[s], services_after[s], services_wanted[s]
        )));
    }
    lb.compare_flows().map_err(|e| fail(format!("{what}: {e}")))?;
    Ok(output)
}

/// What a frame of a tracked service does to l4lb_flows, as a case states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// No update: untracked, followed its pin, a SYN without an entry, an ICMP error.
    Nothing,
    /// A new entry (FLOW_PINNED).
    Pinned,
    /// Over an existing entry (FLOW_REPINNED).
    Repinned,
    /// Refused: the HASH map is full (FLOW_TABLE_FULL).
    Full,
}

impl Pin {
    fn counter(self) -> Option<u32> {
        match self {
            Pin::Nothing => None,
            Pin::Pinned => Some(L4LB_CNT_FLOW_PINNED),
            Pin::Repinned => Some(L4LB_CNT_FLOW_REPINNED),
            Pin::Full => Some(L4LB_CNT_FLOW_TABLE_FULL),
        }
    }
}

/// `check` with XDP_TX to the backend the host's model predicts for `packet` in `service`.
fn check_balanced(lb: &Lb, what: &str, packet: &Packet, service: u32) -> Result<Vec<u8>, Failed> {
    let hash_ports = lb.services[service as usize].flags & L4LB_SERVICE_HASH_PORTS != 0;
    let flow = packet.flow(hash_ports);
    let number = lb.predict(service, &flow);
    check(lb, &format!("{what} {flow:?}"), &packet.frame(), tx(service, number, flow))
}

// ---------------------------------------------------------------------------
// Expected output, independent of the datapath's code

/// What the balancer should send for `frame` to `backend`: Ethernet to the
/// backend's MAC (its own, or the gateway's written into it) from the MAC the
/// frame was sent to, the outer header (spec step 7), then every byte after
/// the input's Ethernet header, unchanged. Built with etherparse.
fn encapsulated(frame: &[u8], backend: &BackendEntry, config: &LbConfig, hash: u32) -> Vec<u8> {
    let l2 = l2_len_of(frame);
    let inner = &frame[l2..];
    let inner_v6 = frame[l2 - 2..l2] == ETHERTYPE_IPV6.to_be_bytes();
    let (l3_len, tos, df) = if inner_v6 {
        let ip6 = Ipv6HeaderSlice::from_slice(inner).expect("an IPv6 header");
        (40 + ip6.payload_length(), ip6.traffic_class(), false)
    } else {
        let ip = Ipv4HeaderSlice::from_slice(inner).expect("an IPv4 header");
        (ip.total_len(), ip.dcp().value() << 2 | ip.ecn().value(), ip.dont_fragment())
    };
    let (ether_type, outer): (u16, Vec<u8>) = if backend.family == L4LB_FAMILY_IPV6 as u8 {
        let outer = Ipv6Header {
            traffic_class: tos,
            flow_label: Ipv6FlowLabel::try_new(hash & 0xfffff).unwrap(),
            payload_length: l3_len,
            next_header: IpNumber(if inner_v6 { 41 } else { 4 }),
            hop_limit: 64,
            source: config.src_v6,
            destination: backend.addr,
        };
        (ETHERTYPE_IPV6, outer.to_bytes().to_vec())
    } else {
        let dst: [u8; 4] = backend.addr[..4].try_into().unwrap();
        let mut outer = Ipv4Header::new(l3_len, 64, IpNumber(4), config.src_v4, dst).expect("fits");
        outer.dscp = Ipv4Dscp::try_new(tos >> 2).unwrap();
        outer.ecn = Ipv4Ecn::try_new(tos & 3).unwrap();
        outer.identification = 0;
        outer.dont_fragment = df;
        outer.header_checksum = outer.calc_header_checksum();
        (ETHERTYPE_IPV4, outer.to_bytes().to_vec())
    };
    // The tags stay between the MACs and the (outer) EtherType.
    let src: [u8; 6] = frame[..6].try_into().unwrap();
    let tags = &frame[12..l2 - 2];
    [&backend.mac[..], &src[..], tags, &ether_type.to_be_bytes(), &outer, inner].concat()
}

/// The ICMP answer for a too-big `frame`, built with etherparse (the
/// reference model builds it again with its own RFC 1071 sums): MACs
/// swapped, tags kept, IPv4 (tos 0, id 0, no DF, TTL 64, protocol 1, VIP ->
/// client) + ICMP 3/4 with the next-hop MTU + the packet's first 68 bytes,
/// or IPv6 (hop limit 64, next header 58) + ICMPv6 2/0 with the MTU + 80 bytes.
fn too_big_answer(frame: &[u8], mtu: u32) -> Vec<u8> {
    let l2 = l2_len_of(frame);
    let ip = &frame[l2..];
    let macs = [&frame[6..12], &frame[0..6], &frame[12..l2 - 2]].concat();
    if frame[l2 - 2..l2] == ETHERTYPE_IPV4.to_be_bytes() {
        let quote = &ip[..68];
        let icmp = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu as u16 }),
            quote,
        );
        let src: [u8; 4] = ip[16..20].try_into().unwrap();
        let dst: [u8; 4] = ip[12..16].try_into().unwrap();
        let mut header = Ipv4Header::new(8 + 68, 64, IpNumber(ICMP), src, dst).expect("fits");
        header.identification = 0;
        header.dont_fragment = false;
        header.header_checksum = header.calc_header_checksum();
        [&macs[..], &ETHERTYPE_IPV4.to_be_bytes(), &header.to_bytes(), &icmp.to_bytes(), quote].concat()
    } else {
        let quote = &ip[..80];
        let src: [u8; 16] = ip[24..40].try_into().unwrap();
        let dst: [u8; 16] = ip[8..24].try_into().unwrap();
        let icmp = Icmpv6Header::with_checksum(Icmpv6Type::PacketTooBig { mtu }, src, dst, quote).expect("fits");
        let header = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: 88,
            next_header: IpNumber(58),
            hop_limit: 64,
            source: src,
            destination: dst,
        };
        [&macs[..], &ETHERTYPE_IPV6.to_be_bytes(), &header.to_bytes(), &icmp.to_bytes(), quote].concat()
    }
}

/// An outer IPv4 header's checksum, checked again with an RFC 1071 sum
/// computed here (the header must sum to 0) and with etherparse.
fn check_outer_checksum(what: &str, output: &[u8]) -> TestResult {
    let l2 = l2_len_of(output);
    if output[l2 - 2..l2] != ETHERTYPE_IPV4.to_be_bytes() {
        return Ok(()); // IPv6 has no header checksum
    }
    let header = &output[l2..l2 + 20];
    let outer =
        Ipv4HeaderSlice::from_slice(header).map_err(|e| fail(format!("{what}: outer header: {e}")))?.to_header();
    ensure!(
        internet_checksum(header) == 0 && outer.calc_header_checksum() == outer.header_checksum,
        "{what}: outer checksum {:#06x} is wrong",
        outer.header_checksum
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Input frames

/// An IPv6 extension header before the TCP/UDP header.
#[derive(Debug, Clone, Copy)]
enum Ext {
    /// Hop-by-hop options of (n + 1) * 8 bytes.
    HopByHop(u8),
    Routing(u8),
    DestOpts(u8),
    /// Offset in 8-byte units; `more`: the M bit.
    Fragment {
        offset: u16,
        more: bool,
    },
}

impl Ext {
    fn code(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::DestOpts(_) => 60,
            Ext::Fragment { .. } => 44,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext::HopByHop(n) | Ext::DestOpts(n) => {
                let len = (usize::from(n) + 1) * 8;
                // One PadN option filling the header.
                let mut b = vec![next, n, 1, (len - 4) as u8];
                b.resize(len, 0);
                b
            }
            Ext::Routing(n) => {
                // Routing type 253 (experimental), segments left 0: skipped by every node.
                let mut b = vec![next, n, 253, 0];
                b.resize((usize::from(n) + 1) * 8, 0x5a);
                b
            }
            Ext::Fragment { offset, more } => {
                let field = offset << 3 | u16::from(more);
                [&[next, 0][..], &field.to_be_bytes(), &0x4c42_0001u32.to_be_bytes()].concat()
            }
        }
    }
}

/// A packet to send, as fields; `frame()` builds it (etherparse for the IP and
/// L4 headers, every checksum correct).
#[derive(Debug, Clone)]
struct Packet {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    /// IPv6 flow label of the client's packet (the outer one is the hash's).
    label: u32,
    df: bool,
    mf: bool,
    /// IPv4, in 8-byte units; not 0: a later fragment, with no L4 header.
    frag_offset: u16,
    /// IPv4 options: a multiple of 4 bytes, at most 40.
    options: Vec<u8>,
    /// IPv6 extension headers.
    ext: Vec<Ext>,
    /// Bytes after the TCP/UDP header (after the IP headers when there is none).
    payload: Vec<u8>,
    /// VLAN tags (TPID, TCI) between the MACs and the EtherType, outer first.
    tags: Vec<(u16, u16)>,
    /// IPv4 TTL / IPv6 hop limit.
    ttl: u8,
    /// The TCP header's flags byte (CWR ECE URG ACK PSH RST SYN FIN).
    tcp_flags: u8,
}

impl Packet {
    fn tcp4(sport: u16, dport: u16) -> Self {
        Packet {
            src: CLIENT4.into(),
            dst: VIP4.into(),
            proto: TCP,
            sport,
            dport,
            tos: 0,
            label: 0,
            df: true,
            mf: false,
            frag_offset: 0,
            options: Vec::new(),
            ext: Vec::new(),
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            tags: Vec::new(),
            ttl: 64,
            tcp_flags: TCP_ACK | TCP_PSH,
        }
    }

    fn udp4(sport: u16, dport: u16) -> Self {
        Packet { proto: UDP, df: false, payload: b"\x12\x34\x01\x00 dns?".to_vec(), ..Self::tcp4(sport, dport) }
    }

    fn tcp6(sport: u16, dport: u16) -> Self {
        Packet { src: CLIENT6.into(), dst: VIP6.into(), df: false, label: 0x12345, ..Self::tcp4(sport, dport) }
    }

    fn udp6(sport: u16, dport: u16) -> Self {
        Packet { proto: UDP, payload: b"\x12\x34\x01\x00 dns?".to_vec(), ..Self::tcp6(sport, dport) }
    }

    fn other4(proto: u8, payload: Vec<u8>) -> Self {
        Packet { proto, sport: 0, dport: 0, payload, ..Self::tcp4(0, 0) }
    }

    fn other6(proto: u8, payload: Vec<u8>) -> Self {
        Packet { proto, sport: 0, dport: 0, payload, ..Self::tcp6(0, 0) }
    }

    /// A TCP or UDP IPv4 packet with random addresses, ports, TOS, DF and payload.
    fn random4(rng: &mut StdRng) -> Self {
        let base = if rng.gen() { Self::tcp4(rng.gen(), rng.gen()) } else { Self::udp4(rng.gen(), rng.gen()) };
        Packet {
            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
            dst: Ipv4Addr::from(rng.gen::<u32>()).into(),
            tos: rng.gen(),
            df: rng.gen(),
            payload: (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            ..base
        }
    }

    /// A TCP or UDP IPv6 packet with random addresses, ports, traffic class, label and payload.
    fn random6(rng: &mut StdRng) -> Self {
        let base = if rng.gen() { Self::tcp6(rng.gen(), rng.gen()) } else { Self::udp6(rng.gen(), rng.gen()) };
        Packet {
            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
            dst: Ipv6Addr::from(rng.gen::<u128>()).into(),
            tos: rng.gen(),
            label: rng.gen_range(0..1 << 20),
            payload: (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect(),
            ..base
        }
    }

    fn is_v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The L3 length: IPv4 tot_len, or 40 + IPv6 payload length.
    fn l3_len(&self) -> usize {
        self.ip_bytes().len()
    }

    /// This packet with its payload sized for an L3 length of `l3_len`.
    fn sized(self, l3_len: usize) -> Self {
        let without = Packet { payload: Vec::new(), ..self.clone() }.l3_len();
        Packet { payload: (0..l3_len - without).map(|i| i as u8).collect(), ..self }
    }

    fn is_fragment(&self) -> bool {
        self.mf
            || self.frag_offset != 0
            || self.ext.iter().any(|e| matches!(e, Ext::Fragment { offset, more } if *offset != 0 || *more))
    }

    fn has_l4_header(&self) -> bool {
        matches!(self.proto, TCP | UDP)
            && self.frag_offset == 0
            && !self.ext.iter().any(|e| matches!(e, Ext::Fragment { offset, .. } if *offset != 0))
    }

    /// The flow as the datapath should hash it: ports 0 for any fragment and
    /// for UDP when the service does not hash ports.
    fn flow(&self, hash_ports: bool) -> Flow {
        let ports = !self.is_fragment() && (self.proto == TCP || hash_ports);
        let (sport, dport) = if ports { (self.sport, self.dport) } else { (0, 0) };
        Flow { saddr: self.src, daddr: self.dst, sport, dport, proto: self.proto }
    }

    fn l4_bytes(&self, checksum: impl Fn(&TcpHeader) -> u16, udp: impl Fn(u16, u16) -> UdpHeader) -> Vec<u8> {
        if !self.has_l4_header() {
            return Vec::new();
        }
        if self.proto == TCP {
            let mut tcp = TcpHeader::new(self.sport, self.dport, 0x0102_0304, 64240);
            let flag = |bit: u8| self.tcp_flags & bit != 0;
            (tcp.fin, tcp.syn, tcp.rst, tcp.psh) = (flag(TCP_FIN), flag(TCP_SYN), flag(TCP_RST), flag(TCP_PSH));
            (tcp.ack, tcp.urg, tcp.ece, tcp.cwr) = (flag(TCP_ACK), flag(0x20), flag(0x40), flag(0x80));
            tcp.acknowledgment_number = if flag(TCP_ACK) { 0x0a0b_0c0d } else { 0 };
            tcp.checksum = checksum(&tcp);
            tcp.to_bytes().to_vec()
        } else {
            udp(self.sport, self.dport).to_bytes().to_vec()
        }
    }

    /// The IP packet.
    fn ip_bytes(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip =
                    Ipv4Header::new(0, self.ttl, IpNumber(self.proto), src.octets(), dst.octets()).expect("fits");
                ip.dscp = Ipv4Dscp::try_new(self.tos >> 2).unwrap();
                ip.ecn = Ipv4Ecn::try_new(self.tos & 3).unwrap();
                ip.identification = 0x4c42;
                ip.dont_fragment = self.df;
                ip.more_fragments = self.mf;
                ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).expect("13-bit fragment offset");
                ip.options =
                    Ipv4Options::try_from(&self.options[..]).expect("options: a multiple of 4, at most 40 bytes");
                let l4 = self.l4_bytes(
                    |tcp| tcp.calc_checksum_ipv4(&ip, &self.payload).unwrap(),
                    |s, d| UdpHeader::with_ipv4_checksum(s, d, &ip, &self.payload).unwrap(),
                );
                ip.set_payload_len(l4.len() + self.payload.len()).expect("fits in tot_len");
                let mut bytes = Vec::new();
                ip.write(&mut bytes).expect("writing to a Vec");
                [bytes, l4, self.payload.clone()].concat()
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut ext = Vec::new();
                for (i, e) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(self.proto, Ext::code);
                    ext.extend(e.bytes(next));
                }
                let mut ip = Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::try_new(self.label).unwrap(),
                    payload_length: 0,
                    next_header: IpNumber(self.ext.first().map_or(self.proto, Ext::code)),
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                };
                let l4 = self.l4_bytes(
                    |tcp| tcp.calc_checksum_ipv6(&ip, &self.payload).unwrap(),
                    |s, d| UdpHeader::with_ipv6_checksum(s, d, &ip, &self.payload).unwrap(),
                );
                ip.payload_length = (ext.len() + l4.len() + self.payload.len()) as u16;
                [ip.to_bytes().to_vec(), ext, l4, self.payload.clone()].concat()
            }
            _ => panic!("source and destination of different families"),
        }
    }

    fn frame(&self) -> Vec<u8> {
        tagged_frame(&self.tags, if self.is_v6() { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 }, &self.ip_bytes())
    }
}

/// ROUTER_MAC -> LB_MAC frame with VLAN `tags` (TPID, TCI), then `ether_type` and `payload`.
fn tagged_frame(tags: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = [&LB_MAC[..], &ROUTER_MAC[..]].concat();
    for (tpid, tci) in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&tci.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The Ethernet header's length with up to two 802.1Q / 802.1ad tags.
fn l2_len_of(frame: &[u8]) -> usize {
    let mut l2 = ETH_LEN;
    for _ in 0..2 {
        if matches!(u16::from_be_bytes([frame[l2 - 2], frame[l2 - 1]]), 0x8100 | 0x88a8) {
            l2 += 4;
        }
    }
    l2
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

/// `frame` (same length) with the IPv6 payload length set to `len`.
fn with_payload_len(frame: &[u8], len: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len.to_be_bytes());
    frame
}

/// The datagram of `frame` cut to `ip_len` bytes, tot_len saying so.
fn datagram_cut(frame: &[u8], ip_len: usize) -> Vec<u8> {
    with_tot_len(&frame[..ETH_LEN + ip_len], ip_len as u16)
}

/// The IPv6 packet of `frame` cut to `ip_len` bytes, payload length saying so.
fn ipv6_cut(frame: &[u8], ip_len: usize) -> Vec<u8> {
    with_payload_len(&frame[..ETH_LEN + ip_len], (ip_len - 40) as u16)
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

/// Draws a seed (or takes L4LB_TEST_SEED) and names it in any failure.
fn with_rng(test: impl FnOnce(&mut StdRng) -> TestResult) -> TestResult {
    let seed = std::env::var("L4LB_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    test(&mut StdRng::seed_from_u64(seed)).map_err(|failed| {
        fail(format!("{} [random seed {seed}: L4LB_TEST_SEED={seed} replays it]", failed.message().unwrap_or("failed")))
    })
}

const TOS_VALUES: [u8; 7] = [0x00, 0x01, 0x02, 0x03, 0xb8, 0xbb, 0xff];

/// TCP flags (the flags byte, offset 13 of the TCP header).
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

// ---------------------------------------------------------------------------
// 1. Golden packets, every family combination

/// IPv4 clients to an IPv4 backend (IPIP): own MAC and gateway MAC, TCP and
/// UDP, DF set and clear, every TOS class, several payload sizes, padding.
fn golden_ipv4_client_ipv4_backend() -> TestResult {
    for backend in [backend4(), BackendEntry::via_gateway(BACKEND4.into(), GATEWAY_MAC, SVC)] {
        let lb = catch_all_one(backend)?;
        let mac = if backend.flags & L4LB_BACKEND_GATEWAY_MAC as u8 != 0 { "gateway MAC" } else { "own MAC" };
        for base in [Packet::tcp4(40000, 443), Packet::udp4(53000, 53)] {
            for df in [true, false] {
                for tos in TOS_VALUES {
                    for payload_len in [0, 1, 333] {
                        let packet = Packet { df, tos, payload: vec![0xa5; payload_len], ..base.clone() };
                        let what =
                            format!("{mac}: 4in4 proto {} df {df} tos {tos:#04x} payload {payload_len}", packet.proto);
                        let out = check(&lb, &what, &packet.frame(), tx(SVC, BE, packet.flow(true)))?;
                        // A few fields spelled out once more, by offset.
                        ensure!(out[0..6] == backend.mac && out[6..12] == LB_MAC, "{what}: MACs {:02x?}", &out[..12]);
                        ensure!(out[ETH_LEN + 9] == 4 && out[ETH_LEN + 8] == 64, "{what}: protocol/TTL");
                        ensure!(out[ETH_LEN + 16..ETH_LEN + 20] == BACKEND4.octets(), "{what}: outer destination");
                    }
                }
            }
            // Shorter than Ethernet's minimum: the padding travels on behind the datagram.
            let short = Packet { payload: Vec::new(), ..base.clone() };
            let what = format!("{mac}: proto {} padded to 60 bytes", base.proto);
            check(&lb, &what, &padded(&short.frame(), 60), tx(SVC, BE, short.flow(true)))?;
        }
    }
    Ok(())
}

/// IPv4 clients to an IPv6 backend: outer IPv6, next header 4, traffic class
/// = the inner TOS, flow label = hash & 0xfffff, payload length = tot_len.
fn golden_ipv4_client_ipv6_backend() -> TestResult {
    for backend in [backend6(), BackendEntry::via_gateway(BACKEND6.into(), GATEWAY_MAC, SVC)] {
        let lb = catch_all_one(backend)?;
        for base in [Packet::tcp4(40000, 443), Packet::udp4(53000, 53)] {
            for tos in TOS_VALUES {
                for payload_len in [0, 1, 333] {
                    for sport in [1u16, 40000, 65535] {
                        let packet = Packet { tos, sport, payload: vec![0x5a; payload_len], ..base.clone() };
                        let what =
                            format!("4in6 proto {} tos {tos:#04x} payload {payload_len} sport {sport}", packet.proto);
                        let out = check(&lb, &what, &packet.frame(), tx(SVC, BE, packet.flow(true)))?;
                        outer_ipv6_fields(&what, &out, &packet, 4)?;
                        ensure!(out[12..14] == [0x86, 0xdd], "{what}: EtherType");
                        ensure!(out[ETH_LEN + 8..ETH_LEN + 24] == LB_SRC6.octets(), "{what}: outer source");
                        ensure!(out[ETH_LEN + 24..ETH_LEN + 40] == BACKEND6.octets(), "{what}: outer destination");
                    }
                }
            }
            let short = Packet { payload: Vec::new(), ..base.clone() };
            check(&lb, "4in6 padded to 60 bytes", &padded(&short.frame(), 60), tx(SVC, BE, short.flow(true)))?;
        }
    }
    Ok(())
}

/// The outer IPv6 header's fields of `out`, spelled out (on top of the
/// byte-for-byte comparison `check` made): version, traffic class = the
/// client's TOS / class, flow label = the flow hash & 0xfffff, payload
/// length = the client's packet, `next_header`, hop limit 64.
fn outer_ipv6_fields(what: &str, out: &[u8], packet: &Packet, next_header: u8) -> TestResult {
    let hash = packet.flow(true).hash(HASH_SEED);
    let vtc = u32::from_be_bytes(out[ETH_LEN..ETH_LEN + 4].try_into().unwrap());
    ensure!(vtc == 6 << 28 | u32::from(packet.tos) << 20 | (hash & 0xfffff), "{what}: vtc {vtc:#010x}");
    let payload = u16::from_be_bytes([out[ETH_LEN + 4], out[ETH_LEN + 5]]) as usize;
    ensure!(payload == packet.l3_len(), "{what}: outer payload length {payload}");
    ensure!(out[ETH_LEN + 6] == next_header && out[ETH_LEN + 7] == 64, "{what}: next header/hop limit");
    Ok(())
}

/// IPv6 clients to an IPv6 backend: next header 41; the client's flow label
/// is not copied (the outer one is the hash's).
fn golden_ipv6_client_ipv6_backend() -> TestResult {
    for backend in [backend6(), BackendEntry::via_gateway(BACKEND6.into(), GATEWAY_MAC, SVC)] {
        let lb = catch_all_one(backend)?;
        for base in [Packet::tcp6(40000, 443), Packet::udp6(53000, 53)] {
            for tos in TOS_VALUES {
                for label in [0u32, 0x12345, 0xfffff] {
                    for payload_len in [0, 1, 333] {
                        let packet = Packet { tos, label, payload: vec![0x3c; payload_len], ..base.clone() };
                        let what = format!(
                            "6in6 proto {} class {tos:#04x} label {label:#x} payload {payload_len}",
                            packet.proto
                        );
                        let out = check(&lb, &what, &packet.frame(), tx(SVC, BE, packet.flow(true)))?;
                        outer_ipv6_fields(&what, &out, &packet, 41)?;
                    }
                }
            }
            let padded_frame = padded(&base.frame(), base.frame().len() + 7);
            check(&lb, "6in6 with 7 bytes of trailer", &padded_frame, tx(SVC, BE, base.flow(true)))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. IPv6 extension headers

fn ipv6_extension_headers() -> TestResult {
    with_rng(|rng| {
        let mut lb = loaded()?;
        let backends: Vec<(u32, BackendEntry)> = (0..16u32)
            .map(|i| {
                (
                    100 + i,
                    BackendEntry::new(
                        Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0, 0, 0, 1, i as u16).into(),
                        BACKEND_MAC,
                        SVC,
                    ),
                )
            })
            .collect();
        add_service(&mut lb, SVC, &backends, true)?;
        let mut config = lb.config.clone();
        config.flags |= L4LB_CONFIG_CATCH_ALL;
        config.catch_all = SVC;
        lb.set_config(config)?;

        let chains: [&[Ext]; 9] = [
            &[Ext::HopByHop(0)],
            &[Ext::Routing(1)],
            &[Ext::DestOpts(3)],
            &[Ext::HopByHop(0), Ext::Routing(2), Ext::DestOpts(0)],
            &[Ext::HopByHop(1), Ext::Routing(0), Ext::DestOpts(1), Ext::DestOpts(0)],
            &[Ext::HopByHop(0), Ext::DestOpts(0), Ext::Routing(0), Ext::Fragment { offset: 0, more: false }],
            // An atomic fragment (offset 0, no M bit) is a whole packet: it keeps its ports.
            &[Ext::Fragment { offset: 0, more: false }],
            &[Ext::DestOpts(30)],
            &[Ext::HopByHop(0), Ext::HopByHop(0), Ext::HopByHop(0), Ext::HopByHop(0)],
        ];
        for (c, chain) in chains.iter().enumerate() {
            for i in 0..20 {
                let packet = Packet { ext: chain.to_vec(), ..Packet::random6(rng) };
                check_balanced(&lb, &format!("chain {c} {chain:?} flow {i}:"), &packet, SVC)?;
            }
        }

        // Five extension headers: one too many, whichever they are.
        let five: [&[Ext]; 3] = [
            &[Ext::HopByHop(0), Ext::Routing(0), Ext::DestOpts(0), Ext::DestOpts(0), Ext::DestOpts(0)],
            &[Ext::HopByHop(0); 5],
            &[
                Ext::HopByHop(0),
                Ext::Routing(0),
                Ext::DestOpts(0),
                Ext::Routing(0),
                Ext::Fragment { offset: 0, more: false },
            ],
        ];
        for chain in five {
            let packet = Packet { ext: chain.to_vec(), ..Packet::tcp6(40000, 443) };
            check(
                &lb,
                &format!("5 extension headers {chain:?}"),
                &packet.frame(),
                Want::Drop(L4LB_CNT_DROP_EXT_HEADERS),
            )?;
        }
        // Four, then a next header that is neither TCP/UDP nor an extension: to the stack.
        let icmp_after_four =
            Packet { ext: vec![Ext::HopByHop(0); 4], ..Packet::other6(58, vec![128, 0, 0, 0, 0, 1, 0, 1]) };
        check(&lb, "ICMPv6 after 4 extension headers", &icmp_after_four.frame(), Want::Pass)?;
        for next in [58u8, 59, 50, 51, 135, 132, 4, 41] {
            let packet = Packet { ext: vec![Ext::DestOpts(0)], ..Packet::other6(next, vec![0; 16]) };
            check(&lb, &format!("next header {next} after destination options"), &packet.frame(), Want::Pass)?;
        }

        // A header cut off by the packet's end (payload length says so): every cut.
        let packet = Packet {
            ext: vec![Ext::HopByHop(1), Ext::Routing(0), Ext::Fragment { offset: 0, more: false }],
            payload: Vec::new(),
            ..Packet::udp6(1234, 53)
        };
        let frame = packet.frame();
        let headers_end = 40 + 16 + 8 + 8;
        for ip_len in 41..headers_end {
            let what = format!("extension headers cut at {ip_len}");
            check(&lb, &what, &ipv6_cut(&frame, ip_len), Want::Drop(L4LB_CNT_DROP_SHORT_IPV6))?;
        }
        for ip_len in headers_end..headers_end + 4 {
            let what = format!("ports cut at {ip_len}");
            check(&lb, &what, &ipv6_cut(&frame, ip_len), Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
        }
        // The frame holds the rest, but the payload length ends the packet before it.
        for ip_len in 41..headers_end {
            let lied = with_payload_len(&frame, (ip_len - 40) as u16);
            check(&lb, &format!("payload length ends at {ip_len}"), &lied, Want::Drop(L4LB_CNT_DROP_SHORT_IPV6))?;
        }
        let ports_only = ipv6_cut(&frame, headers_end + 4);
        check(
            &lb,
            "ports and nothing more",
            &ports_only,
            tx(SVC, lb.predict(SVC, &packet.flow(true)), packet.flow(true)),
        )?;
        Ok(())
    })
}

/// IPv6 fragments (fragment header with an offset or the M bit) hash without
/// ports: every fragment of a datagram goes where the first one goes, and two
/// fragments of different "ports" (the first fragment's, or later fragments'
/// payload bytes where ports would be) go to the same backend.
fn ipv6_fragments_hash_without_ports() -> TestResult {
    with_rng(|rng| {
        let mut lb = loaded()?;
        let backends: Vec<(u32, BackendEntry)> = (0..32u32)
            .map(|i| {
                (
                    200 + i,
                    BackendEntry::new(
                        Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0, 0, 0, 2, i as u16).into(),
                        BACKEND_MAC,
                        SVC,
                    ),
                )
            })
            .collect();
        add_service(&mut lb, SVC, &backends, true)?;
        let mut config = lb.config.clone();
        config.flags |= L4LB_CONFIG_CATCH_ALL;
        config.catch_all = SVC;
        lb.set_config(config)?;

        let mut ports_would_move = 0;
        for i in 0..200 {
            let flow = Packet::random6(rng);
            let first = Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], ..flow.clone() };
            let other_ports = Packet { sport: flow.sport ^ 0x5555, dport: flow.dport ^ 0x0f0f, ..first.clone() };
            let middle =
                Packet { ext: vec![Ext::Fragment { offset: 5, more: true }], payload: vec![0xf2; 24], ..flow.clone() };
            let last = Packet {
                ext: vec![Ext::HopByHop(0), Ext::Fragment { offset: 9, more: false }],
                payload: vec![0xf3; 5],
                ..flow.clone()
            };
            let mut expected = None;
            for (name, fragment) in
                [("first", first), ("first, other ports", other_ports), ("middle", middle), ("last", last)]
            {
                let what = format!("flow {i}: {name} fragment");
                let number = lb.predict(SVC, &fragment.flow(true));
                expected.get_or_insert(number);
                ensure!(Some(number) == expected, "{what}: the model sends it to {number}, not {expected:?}");
                check(&lb, &what, &fragment.frame(), tx(SVC, number, fragment.flow(true)))?;
            }
            if lb.predict(SVC, &flow.flow(true)) != expected.unwrap() {
                ports_would_move += 1;
            }
        }
        // The test only tells ports from no ports if the two usually differ.
        ensure!(ports_would_move >= 150, "only {ports_would_move} of 200 flows change backend without ports");
        Ok(())
    })
}

fn ipv6_malformed() -> TestResult {
    let lb = catch_all_one(backend6())?;
    let packet = Packet::tcp6(40000, 443);
    let frame = packet.frame();
    let ip_len = frame.len() - ETH_LEN;

    // The fixed header cut off anywhere.
    for len in ETH_LEN..ETH_LEN + 40 {
        check(&lb, &format!("IPv6 frame cut to {len} bytes"), &frame[..len], Want::Drop(L4LB_CNT_DROP_SHORT_IPV6))?;
    }
    for version in [0u8, 4, 5, 7, 15] {
        let mut bad = frame.clone();
        bad[ETH_LEN] = version << 4 | (bad[ETH_LEN] & 0x0f);
        check(&lb, &format!("version {version} under EtherType IPv6"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;
    }
    let ipv4_as_ipv6 =
        [&frame[..12], &ETHERTYPE_IPV6.to_be_bytes(), &Packet::tcp4(1, 2).ip_bytes(), &[0u8; 20]].concat();
    check(&lb, "IPv4 packet under EtherType IPv6", &ipv4_as_ipv6, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;

    check(
        &lb,
        "payload length 0 (jumbogram)",
        &with_payload_len(&frame, 0),
        Want::Drop(L4LB_CNT_DROP_BAD_PAYLOAD_LEN),
    )?;
    for payload_len in [ip_len - 40 + 1, ip_len - 40 + 100, 0xffff] {
        let bad = with_payload_len(&frame, payload_len as u16);
        check(
            &lb,
            &format!("payload length {payload_len} beyond the frame"),
            &bad,
            Want::Drop(L4LB_CNT_DROP_BAD_PAYLOAD_LEN),
        )?;
    }
    // Frame cut inside the TCP header (payload length still says the whole).
    for len in ETH_LEN + 40..frame.len() {
        check(
            &lb,
            &format!("frame cut to {len}, payload length unchanged"),
            &frame[..len],
            Want::Drop(L4LB_CNT_DROP_BAD_PAYLOAD_LEN),
        )?;
    }
    // Packets that end before the 4 port bytes.
    for l4 in 1..4 {
        check(&lb, &format!("{l4} L4 bytes"), &ipv6_cut(&frame, 40 + l4), Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
        let ports_behind = with_payload_len(&frame, l4 as u16);
        check(&lb, &format!("{l4} L4 bytes, ports behind"), &ports_behind, Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
    }
    check(&lb, "payload length exactly the frame", &frame, tx(SVC, BE, packet.flow(true)))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Finding the service

fn vip_matching() -> TestResult {
    let mut lb = loaded()?;
    // Backends: one per service, so the backend number names the service.
    let web4 = 1; // 203.0.113.10:443/tcp
    let any4 = 2; // 203.0.113.10:0/udp (every port)
    let web6 = 3; // [VIP6]:443/tcp
    let catch = 4; // catch-all (IPv6 backend)
    let displaced = 6; // a VIP 3 entries after its home
    let idle = 7; // a VIP whose service is not active
    let v4only = 8; // catch-all with IPv4 backends (used later)
    for (service, addr) in [
        (web4, IpAddr::from(Ipv4Addr::new(10, 1, 1, 1))),
        (any4, Ipv4Addr::new(10, 1, 2, 1).into()),
        (web6, Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 3, 0, 0, 0, 1).into()),
        (catch, Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 4, 0, 0, 0, 1).into()),
        (displaced, Ipv4Addr::new(10, 1, 6, 1).into()),
        (v4only, Ipv4Addr::new(10, 1, 8, 1).into()),
    ] {
        add_service(&mut lb, service, &[(100 + service, BackendEntry::new(addr, BACKEND_MAC, service))], true)?;
    }
    lb.set_backend(100 + idle, BackendEntry::new(Ipv4Addr::new(10, 1, 7, 1).into(), BACKEND_MAC, idle))?;
    lb.set_table(idle, &vec![100 + idle; MAGLEV_SIZE])?; // filled, but the service is not ACTIVE
    let be = |service: u32| 100 + service;

    // Our model of the VIP home agrees with the host's.
    for key in
        [VipKey::new(VIP4.into(), TCP, 443), VipKey::new(VIP6.into(), UDP, 0), VipKey::new(CLIENT4.into(), UDP, 65535)]
    {
        let host = l4lb::flow_hash::vip_home(&key.bytes());
        ensure!(
            host == common::lb::vip_home(&key),
            "vip_home of {key:?}: host {host}, test {}",
            common::lb::vip_home(&key)
        );
    }

    let tcp443 = Packet::tcp4(40000, 443);
    let udp53 = Packet::udp4(5353, 53);
    let tcp6 = Packet::tcp6(40000, 443);
    check(&lb, "no VIP, no catch-all: TCP", &tcp443.frame(), Want::NoService)?;
    check(&lb, "no VIP, no catch-all: IPv6 UDP", &Packet::udp6(1, 2).frame(), Want::NoService)?;

    lb.add_vip(VipKey::new(VIP4.into(), TCP, 443), web4)?;
    check(&lb, "exact port", &tcp443.frame(), tx(web4, be(web4), tcp443.flow(true)))?;
    check(&lb, "other port", &Packet::tcp4(40000, 444).frame(), Want::NoService)?;
    check(&lb, "other protocol, same port", &Packet::udp4(40000, 443).frame(), Want::NoService)?;
    check(
        &lb,
        "other address",
        &Packet { dst: Ipv4Addr::new(203, 0, 113, 11).into(), ..tcp443.clone() }.frame(),
        Want::NoService,
    )?;
    // The IPv6 address whose first 4 bytes are the IPv4 VIP's: another key (family, rest).
    let lookalike: Ipv6Addr = Ipv6Addr::from(u128::from(u32::from(VIP4)) << 96);
    check(
        &lb,
        "IPv6 lookalike of the IPv4 VIP",
        &Packet { dst: lookalike.into(), ..tcp6.clone() }.frame(),
        Want::NoService,
    )?;

    lb.add_vip(VipKey::new(VIP4.into(), UDP, 0), any4)?;
    ensure!(lb.config.flags & L4LB_CONFIG_ANY_PORT != 0, "add_vip sets ANY_PORT");
    for dport in [53u16, 1, 443, 65535] {
        let packet = Packet::udp4(5353, dport);
        check(&lb, &format!("port-0 VIP, UDP port {dport}"), &packet.frame(), tx(any4, be(any4), packet.flow(true)))?;
    }
    check(&lb, "port-0 VIP is UDP only", &Packet::tcp4(1, 80).frame(), Want::NoService)?;
    check(&lb, "exact VIP still first", &tcp443.frame(), tx(web4, be(web4), tcp443.flow(true)))?;
    // ANY_PORT clear: the port-0 VIP is not looked up.
    let mut config = lb.config.clone();
    config.flags &= !L4LB_CONFIG_ANY_PORT;
    lb.set_config(config.clone())?;
    check(&lb, "port-0 VIP without ANY_PORT", &udp53.frame(), Want::NoService)?;
    config.flags |= L4LB_CONFIG_ANY_PORT;
    lb.set_config(config)?;
    check(&lb, "port-0 VIP with ANY_PORT again", &udp53.frame(), tx(any4, be(any4), udp53.flow(true)))?;
    // Fragments have no ports (issue 5): they look up their (address,
    // protocol)'s fragment entry only, never a VIP by port or port 0.
    let first_fragment = Packet { mf: true, ..udp53.clone() };
    check(&lb, "UDP first fragment, no fragment entry", &first_fragment.frame(), Want::NoService)?;
    let tcp_fragment = Packet { frag_offset: 3, payload: vec![1; 8], ..tcp443.clone() };
    check(&lb, "TCP later fragment, no fragment entry", &tcp_fragment.frame(), Want::NoService)?;
    // The host's fragment entries: UDP -> the port-0 VIP, TCP -> the lowest port (443).
    lb.add_vip(VipKey::fragment(VIP4.into(), UDP), any4)?;
    lb.add_vip(VipKey::fragment(VIP4.into(), TCP), web4)?;
    check(
        &lb,
        "UDP first fragment: fragment entry",
        &first_fragment.frame(),
        tx(any4, be(any4), first_fragment.flow(true)),
    )?;
    check(
        &lb,
        "TCP later fragment: fragment entry",
        &tcp_fragment.frame(),
        tx(web4, be(web4), tcp_fragment.flow(true)),
    )?;
    // A port-0 packet is no fragment: the fragment entry (family | 0x80) is not its key.
    check(&lb, "TCP to port 0 (not a fragment)", &Packet::tcp4(40000, 0).frame(), Want::NoService)?;

    lb.add_vip(VipKey::new(VIP6.into(), TCP, 443), web6)?;
    check(&lb, "IPv6 exact port", &tcp6.frame(), tx(web6, be(web6), tcp6.flow(true)))?;
    check(&lb, "IPv6 other port", &Packet::tcp6(1, 80).frame(), Want::NoService)?;

    // Catch-all: what no VIP takes.
    let mut config = lb.config.clone();
    config.flags |= L4LB_CONFIG_CATCH_ALL;
    config.catch_all = catch;
    lb.set_config(config)?;
    let stray4 = Packet::tcp4(1, 80);
    let stray6 = Packet::udp6(1, 2);
    check(&lb, "catch-all: IPv4 TCP", &stray4.frame(), tx(catch, be(catch), stray4.flow(true)))?;
    check(&lb, "catch-all: IPv6 UDP", &stray6.frame(), tx(catch, be(catch), stray6.flow(true)))?;
    check(
        &lb,
        "catch-all: TCP later fragment still to its entry",
        &tcp_fragment.frame(),
        tx(web4, be(web4), tcp_fragment.flow(true)),
    )?;
    let stray_fragment = Packet { dst: Ipv4Addr::new(203, 0, 113, 99).into(), ..tcp_fragment.clone() };
    check(
        &lb,
        "catch-all: fragment to no VIP",
        &stray_fragment.frame(),
        tx(catch, be(catch), stray_fragment.flow(true)),
    )?;
    check(&lb, "VIPs still before the catch-all", &tcp443.frame(), tx(web4, be(web4), tcp443.flow(true)))?;
    check(&lb, "catch-all: not TCP/UDP still passes", &Packet::other4(ICMP, vec![8, 0, 0, 0]).frame(), Want::Pass)?;

    // A VIP 3 entries after its home: found only when vip_probes >= 4.
    let key = VipKey::new(Ipv4Addr::new(203, 0, 113, 77).into(), TCP, 8080);
    let home = common::lb::vip_home(&key);
    for i in 0..3 {
        // Other VIPs (to no service a packet of `key` could match) take the entries before it.
        let filler = (0u16..)
            .map(|p| VipKey::new(Ipv4Addr::new(198, 18, 0, 1).into(), UDP, p))
            .find(|k| common::lb::vip_home(k) == (home + i) % 1024);
        let filler = filler.ok_or_else(|| fail("no filler key"))?;
        lb.place_vip(filler, idle, 0)?;
    }
    lb.place_vip(key, displaced, 3)?;
    let to_displaced = Packet { dst: Ipv4Addr::new(203, 0, 113, 77).into(), ..Packet::tcp4(40000, 8080) };
    for probes in 0..=8u32 {
        let mut config = lb.config.clone();
        config.vip_probes = probes;
        lb.set_config(config)?;
        let what = format!("VIP at home+3, vip_probes {probes}");
        if probes >= 4 {
            check(&lb, &what, &to_displaced.frame(), tx(displaced, be(displaced), to_displaced.flow(true)))?;
        } else {
            // Not found: the catch-all takes it.
            check(&lb, &what, &to_displaced.frame(), tx(catch, be(catch), to_displaced.flow(true)))?;
        }
    }
    // vip_probes 0: no VIP is looked at, not even at home.
    let mut config = lb.config.clone();
    config.vip_probes = 0;
    lb.set_config(config)?;
    check(&lb, "vip_probes 0: exact VIP not looked up", &tcp443.frame(), tx(catch, be(catch), tcp443.flow(true)))?;
    let mut config = lb.config.clone();
    config.vip_probes = 8;
    lb.set_config(config)?;

    // A VIP whose service is not active, and a VIP naming a service beyond the map.
    let idle_key = VipKey::new(Ipv4Addr::new(203, 0, 113, 78).into(), TCP, 80);
    lb.add_vip(idle_key, idle)?;
    let to_idle = Packet { dst: Ipv4Addr::new(203, 0, 113, 78).into(), ..Packet::tcp4(1, 80) };
    check(&lb, "inactive service", &to_idle.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.add_vip(VipKey::new(Ipv4Addr::new(203, 0, 113, 79).into(), TCP, 80), 64)?;
    let to_64 = Packet { dst: Ipv4Addr::new(203, 0, 113, 79).into(), ..Packet::tcp4(1, 80) };
    check(&lb, "service number 64 (beyond the map)", &to_64.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.add_vip(VipKey::new(Ipv4Addr::new(203, 0, 113, 80).into(), TCP, 80), u32::MAX)?;
    let to_max = Packet { dst: Ipv4Addr::new(203, 0, 113, 80).into(), ..Packet::tcp4(1, 80) };
    check(&lb, "service number 0xffffffff", &to_max.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;

    // A catch-all with IPv4 backends: IPv6 packets go to the stack, IPv4 ones to it.
    let mut config = lb.config.clone();
    config.catch_all = v4only;
    lb.set_config(config)?;
    check(&lb, "IPv4-backend catch-all: IPv6 packet", &stray6.frame(), Want::NoService)?;
    check(&lb, "IPv4-backend catch-all: IPv4 packet", &stray4.frame(), tx(v4only, be(v4only), stray4.flow(true)))?;
    check(&lb, "IPv4-backend catch-all: IPv6 VIP still served", &tcp6.frame(), tx(web6, be(web6), tcp6.flow(true)))?;
    // A catch-all number beyond the map; then an inactive one.
    for (number, name) in [(64u32, "64"), (idle, "inactive")] {
        let mut config = lb.config.clone();
        config.catch_all = number;
        lb.set_config(config)?;
        check(&lb, &format!("catch-all {name}"), &stray4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    }
    // CATCH_ALL clear: catch_all is ignored.
    let mut config = lb.config.clone();
    config.flags &= !L4LB_CONFIG_CATCH_ALL;
    config.catch_all = catch;
    lb.set_config(config)?;
    check(&lb, "CATCH_ALL flag clear", &stray4.frame(), Want::NoService)?;

    // A VIP entry removed (zeroed): its packets are no longer taken.
    let index = (0..1024u32)
        .find(|&i| matches!(lb.vips[i as usize], Some((k, _)) if k == VipKey::new(VIP4.into(), TCP, 443)))
        .unwrap();
    lb.set_vip_entry(index, None)?;
    check(&lb, "VIP entry zeroed", &tcp443.frame(), Want::NoService)?;
    Ok(())
}

/// UDP to a service without HASH_PORTS: all of a client's datagrams (any
/// ports) go to one backend; with HASH_PORTS they spread; TCP always hashes ports.
fn udp_hash_ports() -> TestResult {
    with_rng(|rng| {
        let mut lb = loaded()?;
        let backends = |base: u32| -> Vec<(u32, BackendEntry)> {
            (0..32u32)
                .map(|i| {
                    (
                        base + i,
                        BackendEntry::new(Ipv4Addr::new(10, 3, (base / 100) as u8, i as u8 + 1).into(), BACKEND_MAC, 0),
                    )
                })
                .collect()
        };
        let no_ports = 1;
        let ports = 2;
        add_service(&mut lb, no_ports, &backends(100), false)?;
        add_service(&mut lb, ports, &backends(200), true)?;
        lb.add_vip(VipKey::new(VIP4.into(), UDP, 53), no_ports)?;
        lb.add_vip(VipKey::new(VIP4.into(), TCP, 53), no_ports)?;
        lb.add_vip(VipKey::new(VIP4.into(), UDP, 54), ports)?;
        // An IPv6 VIP needs IPv6 backends (a service with an IPv4 backend passes IPv6 packets).
        let no_ports6 = 3;
        let backends6: Vec<(u32, BackendEntry)> = (0..32u32)
            .map(|i| {
                (
                    300 + i,
                    BackendEntry::new(
                        Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 3, 0, 0, 0, i as u16 + 1).into(),
                        BACKEND_MAC,
                        0,
                    ),
                )
            })
            .collect();
        add_service(&mut lb, no_ports6, &backends6, false)?;
        lb.add_vip(VipKey::new(VIP6.into(), UDP, 53), no_ports6)?;
        // ... and a service with some IPv4 backend takes no IPv6 packet, even through a VIP.
        lb.add_vip(VipKey::new(VIP6.into(), UDP, 54), no_ports)?;
        check(&lb, "IPv6 VIP of a service with IPv4 backends", &Packet::udp6(1, 54).frame(), Want::NoService)?;

        for client in 0..20 {
            let src4: IpAddr = Ipv4Addr::from(rng.gen::<u32>()).into();
            let src6: IpAddr = Ipv6Addr::from(rng.gen::<u128>()).into();
            let mut one_backend = std::collections::BTreeSet::new();
            let mut spread = std::collections::BTreeSet::new();
            let mut tcp_spread = std::collections::BTreeSet::new();
            for i in 0..16 {
                let sport = rng.gen();
                let udp = Packet { src: src4, ..Packet::udp4(sport, 53) };
                let out =
                    check_balanced(&lb, &format!("client {client} datagram {i}, no hash_ports:"), &udp, no_ports)?;
                one_backend.insert(out[ETH_LEN + 16..ETH_LEN + 20].to_vec());
                let udp6 = Packet { src: src6, ..Packet::udp6(sport, 53) };
                check_balanced(&lb, &format!("client {client} IPv6 datagram {i}, no hash_ports:"), &udp6, no_ports6)?;
                let hashed = Packet { src: src4, ..Packet::udp4(sport, 54) };
                let out = check_balanced(&lb, &format!("client {client} datagram {i}, hash_ports:"), &hashed, ports)?;
                spread.insert(out[ETH_LEN + 16..ETH_LEN + 20].to_vec());
                let tcp = Packet { src: src4, ..Packet::tcp4(sport, 53) };
                let out = check_balanced(&lb, &format!("client {client} TCP {i}, no hash_ports:"), &tcp, no_ports)?;
                tcp_spread.insert(out[ETH_LEN + 16..ETH_LEN + 20].to_vec());
            }
            ensure!(
                one_backend.len() == 1,
                "client {client}: UDP without hash_ports reached {} backends",
                one_backend.len()
            );
            ensure!(spread.len() >= 4, "client {client}: UDP with hash_ports reached only {} backends", spread.len());
            ensure!(tcp_spread.len() >= 4, "client {client}: TCP reached only {} backends", tcp_spread.len());
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 4. No backend

fn no_backend() -> TestResult {
    let frame4 = Packet::tcp4(40000, 80);
    let frame6 = Packet::tcp6(40000, 80);
    let mut lb = loaded()?;
    let mut config = lb.config.clone();
    config.flags |= L4LB_CONFIG_CATCH_ALL;
    config.catch_all = SVC;
    lb.set_config(config)?;
    check(&lb, "catch-all service not written", &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.set_service(SVC, L4LB_SERVICE_ACTIVE | L4LB_SERVICE_HASH_PORTS)?;
    check(&lb, "fresh table: every slot 0, backend 0 zeroed", &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.set_backend(0, backend6())?;
    check(&lb, "fresh table: backend 0 written", &frame4.frame(), tx(SVC, 0, frame4.flow(true)))?;
    lb.set_backend(0, BackendEntry::default())?;

    lb.set_backend(BE, backend6())?;
    lb.set_table(SVC, &vec![BE; MAGLEV_SIZE])?;
    check(&lb, "table filled: IPv4", &frame4.frame(), tx(SVC, BE, frame4.flow(true)))?;
    check(&lb, "table filled: IPv6", &frame6.frame(), tx(SVC, BE, frame6.flow(true)))?;
    lb.set_backend(BE, BackendEntry { flags: 0, ..backend6() })?;
    check(&lb, "backend not active", &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.set_backend(BE, BackendEntry { flags: L4LB_BACKEND_GATEWAY_MAC as u8, ..backend6() })?;
    check(&lb, "backend GATEWAY_MAC only, not active", &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    lb.set_backend(BE, backend6())?;
    for (number, name) in
        [(SLOT_EMPTY, "SLOT_EMPTY"), (MAX_BACKENDS as u32, "MAX_BACKENDS (beyond the map)"), (BE + 1, "a zeroed entry")]
    {
        lb.set_table(SVC, &vec![number; MAGLEV_SIZE])?;
        check(&lb, &format!("every slot {name}"), &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    }
    lb.set_table(SVC, &vec![BE; MAGLEV_SIZE])?;
    // An IPv6 packet and an IPv4 backend, the service not flagged IPV4_BACKENDS
    // (a config the host never writes): no IPv6 in IPv4.
    lb.set_backend(BE, backend4())?;
    check(&lb, "IPv6 packet, IPv4 backend", &frame6.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    check(&lb, "IPv4 packet, IPv4 backend", &frame4.frame(), tx(SVC, BE, frame4.flow(true)))?;
    // A backend of no family (0) or an unknown one.
    for family in [0u8, 5, 41] {
        lb.set_backend(BE, BackendEntry { family, ..backend4() })?;
        check(&lb, &format!("backend family {family}"), &frame4.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    }
    // Service flags without ACTIVE.
    lb.set_backend(BE, backend6())?;
    lb.set_service(SVC, L4LB_SERVICE_HASH_PORTS)?;
    check(&lb, "service not ACTIVE", &frame6.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. MTU

/// What a packet too big once encapsulated gets (issue 5): IPv4 with DF and
/// every IPv6 packet an ICMP answer advertising mtu - overhead, IPv4 without
/// DF a drop. Exact boundaries: l3_len + overhead == mtu is encapsulated.
fn too_big_want(client: &Packet, mtu: usize, overhead: usize) -> Want {
    if client.is_v6() || client.df {
        Want::TooBig { mtu: (mtu - overhead) as u32 }
    } else {
        Want::Drop(L4LB_CNT_DROP_TOO_BIG)
    }
}

fn mtu_limit() -> TestResult {
    for (backend, overhead) in [(backend4(), 20usize), (backend6(), 40)] {
        let mut lb = catch_all_one(backend)?;
        let mut clients: Vec<Packet> = vec![
            Packet::udp4(5353, 53),
            Packet::tcp4(40000, 80),
            Packet { df: true, ..Packet::udp4(5353, 53) },
            Packet { df: false, ..Packet::tcp4(40000, 80) },
        ];
        if overhead == 40 {
            clients.extend([Packet::udp6(5353, 53), Packet::tcp6(40000, 80)]);
        }
        // 3000, not 9000: test_run keeps at most about 3,500 bytes linear (the rest in
        // fragments a program without xdp.frags does not see).
        for mtu in [1500usize, 3000, 1280, 576] {
            let mut config = lb.config.clone();
            config.mtu = mtu as u32;
            lb.set_config(config)?;
            for client in &clients {
                let family = if client.is_v6() { 6 } else { 4 };
                let fits = client.clone().sized(mtu - overhead);
                let what = format!("mtu {mtu}, IPv{family} proto {} df {} in +{overhead}", client.proto, client.df);
                for extra in [1, 2, 100] {
                    let too_big = client.clone().sized(mtu - overhead + extra);
                    let want = too_big_want(client, mtu, overhead);
                    check(&lb, &format!("{what}: inner {}", mtu - overhead + extra), &too_big.frame(), want)?;
                }
                check(&lb, &format!("{what}: inner {}", mtu - overhead), &fits.frame(), tx(SVC, BE, fits.flow(true)))?;
                // Trailer bytes are not part of the packet (nor of the answer's quote).
                let trailer = padded(&fits.frame(), fits.frame().len() + 6);
                check(
                    &lb,
                    &format!("{what}: inner {} + 6 bytes trailer", mtu - overhead),
                    &trailer,
                    tx(SVC, BE, fits.flow(true)),
                )?;
                let too_big = client.clone().sized(mtu - overhead + 1);
                let trailer = padded(&too_big.frame(), too_big.frame().len() + 9);
                check(
                    &lb,
                    &format!("{what}: too big + 9 bytes trailer"),
                    &trailer,
                    too_big_want(client, mtu, overhead),
                )?;
            }
        }
        let mut config = lb.config.clone();
        config.mtu = 0;
        lb.set_config(config)?;
        for client in &clients {
            let big = client.clone().sized(1500 - overhead + 1);
            check(&lb, "mtu 0 (unset)", &big.frame(), tx(SVC, BE, big.flow(true)))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Frames that are not IPv4/IPv6 TCP/UDP go to the stack

fn not_tcp_udp_passes() -> TestResult {
    let lb = catch_all_one(backend6())?;

    let echo = Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 0x4c42, seq: 1 });
    let ping = [&Icmpv4Header::with_checksum(echo, b"ping").to_bytes()[..], b"ping"].concat();
    check(&lb, "ICMP echo request", &Packet::other4(ICMP, ping).frame(), Want::Pass)?;
    let gre_over_ipv4 = [&[0u8, 0, 0x08, 0x00][..], &Packet::tcp4(1, 2).ip_bytes()].concat();
    check(&lb, "GRE", &Packet::other4(GRE, gre_over_ipv4).frame(), Want::Pass)?;
    check(&lb, "IPIP", &Packet::other4(IPIP, Packet::udp4(1, 2).ip_bytes()).frame(), Want::Pass)?;
    check(&lb, "IPv6 in IPv4", &Packet::other4(IPV6_IN_IPV4, Packet::udp6(1, 2).ip_bytes()).frame(), Want::Pass)?;
    for proto in [ESP, SCTP, 0, 255] {
        check(&lb, &format!("IPv4 protocol {proto}"), &Packet::other4(proto, vec![7; 24]).frame(), Want::Pass)?;
    }
    let echo6 = [128u8, 0, 0, 0, 0x4c, 0x42, 0, 1];
    check(&lb, "ICMPv6 echo request", &Packet::other6(58, echo6.to_vec()).frame(), Want::Pass)?;
    check(&lb, "IPv6 no next header", &Packet::other6(59, Vec::new()).sized(41).frame(), Want::Pass)?;
    for next in [4u8, 41, 47, 50, 132, 255] {
        check(&lb, &format!("IPv6 next header {next}"), &Packet::other6(next, vec![7; 24]).frame(), Want::Pass)?;
    }

    check(&lb, "ARP request", &arp_request_frame(), Want::Pass)?;
    // Tagged frames are balanced now (issue 5; see vlan_tags): three tags are not ours.
    let three = [(0x88a8, 5), (0x8100, 6), (0x8100, 7)];
    check(
        &lb,
        "three VLAN tags, IPv4 TCP",
        &Packet { tags: three.to_vec(), ..Packet::tcp4(1, 2) }.frame(),
        Want::Pass,
    )?;
    check(
        &lb,
        "three VLAN tags, IPv6 TCP",
        &Packet { tags: three.to_vec(), ..Packet::tcp6(1, 2) }.frame(),
        Want::Pass,
    )?;
    check(&lb, "Ethernet header alone, type ARP", &ethernet_frame(ETHERTYPE_ARP, &[]), Want::Pass)?;
    check(&lb, "EtherType 0x0801", &ethernet_frame(0x0801, &Packet::tcp4(1, 2).ip_bytes()), Want::Pass)?;
    check(&lb, "EtherType 0xdd86", &ethernet_frame(0xdd86, &Packet::tcp6(1, 2).ip_bytes()), Want::Pass)?;
    for len in 0..ETH_LEN {
        check(&lb, &format!("{len}-byte frame"), &Packet::tcp4(1, 2).frame()[..len], Want::Refused)?;
    }
    Ok(())
}

fn arp_request_frame() -> Vec<u8> {
    let mut arp = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]; // Ethernet/IPv4, request
    arp.extend(ROUTER_MAC);
    arp.extend(Ipv4Addr::new(192, 0, 2, 254).octets());
    arp.extend([0; 6]);
    arp.extend(LB_SRC4.octets());
    let mut frame = ethernet_frame(ETHERTYPE_ARP, &arp);
    frame[..6].copy_from_slice(&[0xff; 6]);
    padded(&frame, 60)
}

// ---------------------------------------------------------------------------
// 7. IPv4: options, truncation, malformed headers, fragments (as before)

/// A catch-all over 32 IPv4 backends (Maglev), numbers 300..332.
fn catch_all_32_ipv4() -> Result<Lb, Failed> {
    let mut lb = loaded()?;
    let backends: Vec<(u32, BackendEntry)> = (0..32u32)
        .map(|i| (300 + i, BackendEntry::new(Ipv4Addr::new(10, 32, 0, i as u8 + 1).into(), BACKEND_MAC, SVC)))
        .collect();
    add_service(&mut lb, SVC, &backends, true)?;
    let mut config = lb.config.clone();
    config.flags |= L4LB_CONFIG_CATCH_ALL;
    config.catch_all = SVC;
    lb.set_config(config)?;
    Ok(lb)
}

fn ipv4_options_ihl_6_to_15() -> TestResult {
    with_rng(|rng| {
        let lb = catch_all_32_ipv4()?;
        for ihl in 6..=15usize {
            // NOPs then end-of-options: bytes a parser ignoring IHL would take for ports.
            let mut options = vec![0x01; (ihl - 5) * 4];
            *options.last_mut().unwrap() = 0x00;
            for i in 0..40 {
                let packet = Packet { options: options.clone(), ..Packet::random4(rng) };
                check_balanced(&lb, &format!("IHL {ihl} flow {i}:"), &packet, SVC)?;
            }
        }
        Ok(())
    })
}

fn truncated_ipv4_frames_drop() -> TestResult {
    let lb = catch_all_one(backend4())?;

    // Cut anywhere in a plain TCP frame (60 bytes, datagram 46).
    let frame = Packet { payload: vec![0x5a; 6], ..Packet::tcp4(40000, 80) }.frame();
    for len in 0..frame.len() {
        let want = match len {
            0..=13 => Want::Refused,
            14..=33 => Want::Drop(L4LB_CNT_DROP_SHORT_IPV4),
            _ => Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN), // tot_len still says 46
        };
        check(&lb, &format!("TCP frame cut to {len} bytes"), &frame[..len], want)?;
    }

    // Cut inside 40 bytes of options (IHL 15).
    let with_options = Packet { options: vec![0x01; 40], ..Packet::udp4(1234, 53) }.frame();
    for len in ETH_LEN + 20..ETH_LEN + 60 {
        check(
            &lb,
            &format!("IHL 15 frame cut to {len} bytes"),
            &with_options[..len],
            Want::Drop(L4LB_CNT_DROP_SHORT_IPV4),
        )?;
    }

    // Datagrams that end before the 4 port bytes: frame cut there, or padded
    // so that the real ports are still in the frame behind tot_len.
    for base in [Packet::tcp4(40000, 80), Packet::udp4(40000, 53)] {
        for ihl in [5usize, 6, 15] {
            let packet = Packet { options: vec![0x01; (ihl - 5) * 4], ..base.clone() };
            let frame = packet.frame();
            for extra in 0..4 {
                let ip_len = ihl * 4 + extra;
                let what = format!("proto {} IHL {ihl}: datagram of {ip_len} bytes", base.proto);
                check(&lb, &what, &datagram_cut(&frame, ip_len), Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
                let ports_behind = with_tot_len(&frame, ip_len as u16);
                check(&lb, &format!("{what}, ports behind it"), &ports_behind, Want::Drop(L4LB_CNT_DROP_SHORT_L4))?;
            }
            // The 4 port bytes and nothing more: enough to balance.
            let ip_len = ihl * 4 + 4;
            let what = format!("proto {} IHL {ihl}: datagram of {ip_len} bytes (ports only)", base.proto);
            check(&lb, &what, &datagram_cut(&frame, ip_len), tx(SVC, BE, packet.flow(true)))?;
        }
    }
    Ok(())
}

fn malformed_ipv4_drops() -> TestResult {
    let lb = catch_all_one(backend4())?;
    let packet = Packet::tcp4(40000, 80);
    let frame = packet.frame();
    let ip_len = frame.len() - ETH_LEN;

    for version in [0u8, 1, 2, 3, 5, 6, 7, 15] {
        let bad = with_ip_byte(&frame, 0, version << 4 | 5);
        check(&lb, &format!("version {version}"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;
    }
    let v6 = Packet::tcp6(40000, 443).frame();
    let ipv6_as_ipv4 = [&v6[..12], &ETHERTYPE_IPV4.to_be_bytes(), &v6[ETH_LEN..]].concat();
    check(&lb, "IPv6 packet in an IPv4 EtherType", &ipv6_as_ipv4, Want::Drop(L4LB_CNT_DROP_BAD_VERSION))?;

    for ihl in 0u8..5 {
        check(&lb, &format!("IHL {ihl}"), &with_ip_byte(&frame, 0, 0x40 | ihl), Want::Drop(L4LB_CNT_DROP_BAD_IHL))?;
    }
    for tot_len in [ip_len + 1, ip_len + 100, 0xffff] {
        let bad = with_tot_len(&frame, tot_len as u16);
        check(&lb, &format!("tot_len {tot_len} beyond the frame"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    for tot_len in [0u16, 1, 19] {
        let bad = with_tot_len(&frame, tot_len);
        check(&lb, &format!("tot_len {tot_len} below the header"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    let with_options = Packet { options: vec![0x01; 4], ..Packet::tcp4(40000, 80) }.frame();
    for tot_len in 20u16..24 {
        let bad = with_tot_len(&with_options, tot_len);
        check(&lb, &format!("IHL 6, tot_len {tot_len}"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
    }
    check(&lb, "tot_len exactly the frame", &frame, tx(SVC, BE, packet.flow(true)))?;
    Ok(())
}

fn ipv4_fragments_hash_without_ports() -> TestResult {
    with_rng(|rng| {
        let lb = catch_all_32_ipv4()?;
        let mut ports_would_move = 0;
        for i in 0..200 {
            let flow = Packet { df: false, ..Packet::random4(rng) };
            let first = Packet { mf: true, payload: vec![0xf1; 16], ..flow.clone() };
            let other_ports = Packet { sport: flow.sport ^ 0x5555, dport: flow.dport ^ 0x0f0f, ..first.clone() };
            let middle = Packet { mf: true, frag_offset: 5, payload: vec![0xf2; 24], ..flow.clone() };
            let last = Packet { frag_offset: 8, payload: vec![0xf3; 5], ..flow.clone() };
            let empty = Packet { frag_offset: 11, payload: Vec::new(), ..flow.clone() };
            let mut backends = std::collections::BTreeSet::new();
            for (name, fragment) in [
                ("first", first),
                ("first, other ports", other_ports),
                ("middle", middle),
                ("last", last),
                ("empty later", empty),
            ] {
                let out = check_balanced(&lb, &format!("flow {i}: {name} fragment"), &fragment, SVC)?;
                backends.insert(out[ETH_LEN + 16..ETH_LEN + 20].to_vec());
            }
            ensure!(backends.len() == 1, "flow {i}: fragments went to {} backends", backends.len());
            if lb.predict(SVC, &flow.flow(true)) != lb.predict(SVC, &Packet { mf: true, ..flow }.flow(true)) {
                ports_would_move += 1;
            }
        }
        ensure!(ports_would_move >= 150, "only {ports_would_move} of 200 flows change backend without ports");
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 8. Outer IPv4 checksum

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

/// The outer IPv4 header the balancer should push, checksum included (by hand).
fn outer_header(tos: u8, tot_len: u16, df: bool, src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0] = 0x45;
    header[1] = tos;
    header[2..4].copy_from_slice(&tot_len.to_be_bytes());
    header[6] = if df { 0x40 } else { 0 };
    header[8] = 64;
    header[9] = IPIP;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// Outer headers whose word sum still carries after the first fold (words
/// loaded either way round), and headers whose checksum comes out 0x0000:
/// source 255.255.255.254, backends 255.255.a.b searched for the property.
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
    ensure!(
        carries_big_endian.len() >= 8 && carries_little_endian.len() >= 8 && !zero_checksum.is_empty(),
        "search found {} + {} carrying and {} zero-checksum headers",
        carries_big_endian.len(),
        carries_little_endian.len(),
        zero_checksum.len()
    );

    let mut lb = catch_all_one(backend4())?;
    let mut config = lb.config.clone();
    config.src_v4 = src.octets();
    lb.set_config(config)?;
    let chosen = carries_big_endian.iter().chain(&carries_little_endian).chain(&zero_checksum);
    for &(backend, tos, inner_len) in chosen {
        lb.set_backend(BE, BackendEntry::new(backend.into(), BACKEND_MAC, SVC))?;
        let packet = Packet { tos, df: true, ..Packet::udp4(5353, 53).sized(usize::from(inner_len)) };
        let what = format!("outer {src} -> {backend}, tos {tos:#04x}, inner {inner_len} bytes");
        let out = check(&lb, &what, &packet.frame(), tx(SVC, BE, packet.flow(true)))?;
        ensure!(
            out[ETH_LEN..ETH_LEN + 20] == outer_header(tos, inner_len + 20, true, src, backend),
            "{what}: hand-built header"
        );
    }
    Ok(())
}

fn checksum_random_headers() -> TestResult {
    with_rng(|rng| {
        let mut lb = catch_all_one(backend4())?;
        for i in 0..3000 {
            let src = Ipv4Addr::from(rng.gen::<u32>());
            let backend = Ipv4Addr::from(rng.gen::<u32>());
            let mut config = lb.config.clone();
            config.hash_seed = rng.gen();
            config.src_v4 = src.octets();
            lb.set_config(config)?;
            lb.set_backend(BE, BackendEntry::new(backend.into(), BACKEND_MAC, SVC))?;
            let packet = Packet::random4(rng).sized(rng.gen_range(40..=1400));
            let what = format!("header {i}: outer {src} -> {backend}, tos {:#04x}, df {}", packet.tos, packet.df);
            check(&lb, &what, &packet.frame(), tx(SVC, BE, packet.flow(true)))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 9. The host's hash model against the datapath

/// 4096 IPv6 backends, number n at 2001:db8:4b::n; service `catch` (catch-all,
/// hash_ports) maps slot s to backend s % 4096, service `vip` (no hash_ports,
/// VIP4:53/udp and [VIP6]:53/udp) maps s to (7s + 1) % 4096. An output then
/// tells its slot modulo 4096 (outer destination) and the low 20 bits of the
/// datapath's hash (outer flow label).
fn numbered_slots() -> Result<Lb, Failed> {
    let mut lb = loaded()?;
    for n in 0..MAX_BACKENDS as u32 {
        let addr = Ipv6Addr::new(0x2001, 0xdb8, 0x4b, 0, 0, 0, (n >> 16) as u16, n as u16);
        let mac = [0x02, 0xbe, 0x4b, 0, (n >> 8) as u8, n as u8];
        lb.set_backend(n, BackendEntry::new(addr.into(), mac, 0))?;
    }
    let (catch, vip) = (1, 2);
    lb.set_service(catch, L4LB_SERVICE_ACTIVE | L4LB_SERVICE_HASH_PORTS)?;
    lb.set_service(vip, L4LB_SERVICE_ACTIVE)?;
    lb.set_table(catch, &(0..MAGLEV_SIZE as u32).map(|s| s % 4096).collect::<Vec<_>>())?;
    lb.set_table(vip, &(0..MAGLEV_SIZE as u32).map(|s| (7 * s + 1) % 4096).collect::<Vec<_>>())?;
    lb.add_vip(VipKey::new(VIP4.into(), UDP, 53), vip)?;
    lb.add_vip(VipKey::new(VIP6.into(), UDP, 53), vip)?;
    let mut config = lb.config.clone();
    config.flags |= L4LB_CONFIG_CATCH_ALL;
    config.catch_all = catch;
    lb.set_config(config)?;
    Ok(lb)
}

/// Runs `flows` packets through the datapath and compares what their output
/// reveals (slot mod 4096, hash & 0xfffff) with the host's model.
fn hash_model_agrees(rng: &mut StdRng, v6: bool) -> TestResult {
    const FLOWS: usize = 3000;
    let mut lb = numbered_slots()?;
    let mut seen_slots = std::collections::BTreeSet::new();
    for i in 0..FLOWS {
        if i % 1000 == 0 {
            let mut config = lb.config.clone();
            config.hash_seed = rng.gen();
            lb.set_config(config)?;
        }
        let mut packet = if v6 { Packet::random6(rng) } else { Packet::random4(rng) };
        let (service, multiplier, add) = if rng.gen_bool(0.3) {
            packet.dst = if v6 { VIP6.into() } else { VIP4.into() };
            packet.proto = UDP;
            packet.dport = 53;
            (2u32, 7usize, 1usize)
        } else {
            (1, 1, 0)
        };
        match rng.gen_range(0..10) {
            0 if v6 => packet.ext = vec![Ext::HopByHop(0), Ext::Fragment { offset: rng.gen_range(0..100), more: true }],
            0 => packet.mf = true,
            1 if v6 => packet.ext = vec![Ext::Routing(1), Ext::DestOpts(0)],
            1 => packet.options = vec![1; 8],
            _ => {}
        }
        // Fragments look up their fragment entry: none here, the catch-all takes them.
        let (service, multiplier, add) = if packet.is_fragment() { (1, 1, 0) } else { (service, multiplier, add) };
        let hash_ports = service == 1;
        let flow = packet.flow(hash_ports);
        let hash = flow.hash(lb.config.hash_seed);
        let slot = maglev::flow_slot(&flow, lb.config.hash_seed, MAGLEV_SIZE);
        let predicted = ((multiplier * slot + add) % 4096) as u32;
        ensure!(lb.predict(service, &flow) == predicted, "flow {i}: the model's table lookup");
        let frame = packet.frame();
        let (verdict, out) = lb.run(&frame)?;
        let what = format!("flow {i} {flow:?} (service {service}, seed {:#x})", lb.config.hash_seed);
        ensure!(verdict == XDP_TX, "{what}: {}", verdict_name(verdict));
        // The outer destination 2001:db8:4b::(n >> 16):(n & 0xffff) names backend n.
        let number = u32::from_be_bytes(out[ETH_LEN + 36..ETH_LEN + 40].try_into().unwrap());
        let label = u32::from_be_bytes(out[ETH_LEN..ETH_LEN + 4].try_into().unwrap()) & 0xfffff;
        ensure!(
            label == hash & 0xfffff,
            "{what}: datapath hash & 0xfffff = {label:#07x}, model {:#07x}",
            hash & 0xfffff
        );
        ensure!(number == predicted, "{what}: datapath chose backend {number}, model slot {slot} -> {predicted}");
        // And every other byte, as the reference model says.
        match lb.classify(&frame) {
            Outcome::Tx(t) => lb.check_tx_output(&frame, &out, &t).map_err(|e| fail(format!("{what}: {e}")))?,
            other => return Err(fail(format!("{what}: the reference model says {other:?}"))),
        }
        seen_slots.insert(slot % 4096);
    }
    eprintln!(
        "hash model vs datapath, IPv{}: {FLOWS} flows agree (flow label = hash & 0xfffff, backend = slot), {} distinct slots mod 4096",
        if v6 { 6 } else { 4 },
        seen_slots.len()
    );
    Ok(())
}

fn hash_model_agrees_ipv4() -> TestResult {
    with_rng(|rng| hash_model_agrees(rng, false))
}

fn hash_model_agrees_ipv6() -> TestResult {
    with_rng(|rng| hash_model_agrees(rng, true))
}

// ---------------------------------------------------------------------------
// 10. Maglev through the datapath

/// Flows sent through test_run for each table (every one checked against the
/// model), and flows put to the model alone once they agree.
const MAGLEV_DATAPATH_FLOWS: usize = 100_000;
const MAGLEV_MODEL_FLOWS: usize = 2_000_000;

struct Measured {
    /// Backend index (into the backend list) of each datapath flow.
    datapath: Vec<u32>,
    /// ... of each model flow.
    model: Vec<u32>,
}

/// Fills service SVC (catch-all) with `list` (Maglev, Backend::from_addr
/// identities; backend numbers 1000 + index), sends the datapath flows
/// through test_run, checks each against the model, and looks up the model
/// flows' slots.
fn measure(
    lb: &mut Lb,
    list: &[(Ipv4Addr, u32)],
    frames: &[Vec<u8>],
    flows: &[Flow],
    model_slots: &[u32],
) -> Result<Measured, Failed> {
    let numbered: Vec<(u32, BackendEntry)> = list
        .iter()
        .map(|&(addr, weight)| {
            let n = 1000 + u32::from(addr.octets()[3]);
            (n, BackendEntry { weight, ..BackendEntry::new(addr.into(), BACKEND_MAC, SVC) })
        })
        .collect();
    add_service(lb, SVC, &numbered, true)?;
    let index_of = |number: u32| numbered.iter().position(|(n, _)| *n == number).map(|i| i as u32);
    let mut out = vec![0u8; 2048];
    let mut datapath = Vec::with_capacity(frames.len());
    for (i, (frame, flow)) in frames.iter().zip(flows).enumerate() {
        let (verdict, len) = lb.run_into(frame, &mut out)?;
        ensure!(
            verdict == XDP_TX && len == frame.len() + 20,
            "flow {i} {flow:?}: {} ({len} bytes)",
            verdict_name(verdict)
        );
        let number = 1000 + u32::from(out[ETH_LEN + 19]);
        let predicted = lb.predict(SVC, flow);
        ensure!(
            number == predicted && out[ETH_LEN + 16..ETH_LEN + 19] == [10, 64, 0],
            "flow {i} {flow:?}: datapath sent it to {:?}, the model to backend {predicted}",
            &out[ETH_LEN + 16..ETH_LEN + 20]
        );
        datapath.push(index_of(number).ok_or_else(|| fail(format!("flow {i}: backend {number} not in the list")))?);
    }
    let table = lb.tables[SVC as usize].as_ref().unwrap();
    let model = model_slots.iter().map(|&slot| index_of(table[slot as usize]).unwrap()).collect();
    Ok(Measured { datapath, model })
}

fn shares(indices: &[u32], backends: usize) -> Vec<f64> {
    let mut counts = vec![0u64; backends];
    for &i in indices {
        counts[i as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / indices.len() as f64).collect()
}

/// Largest relative deviation of a share from its target.
fn worst_deviation(shares: &[f64], targets: &[f64]) -> f64 {
    shares.iter().zip(targets).map(|(s, t)| (s - t).abs() / t).fold(0.0, f64::max)
}

/// Fraction of flows whose backend (by address) differs between two runs.
fn moved(before: &[u32], before_list: &[(Ipv4Addr, u32)], after: &[u32], after_list: &[(Ipv4Addr, u32)]) -> f64 {
    let changed =
        before.iter().zip(after).filter(|(&b, &a)| before_list[b as usize].0 != after_list[a as usize].0).count();
    changed as f64 / before.len() as f64
}

fn maglev_through_the_datapath() -> TestResult {
    with_rng(|rng| {
        let mut lb = loaded()?;
        let mut config = lb.config.clone();
        config.flags |= L4LB_CONFIG_CATCH_ALL;
        config.catch_all = SVC;
        config.hash_seed = rng.gen();
        lb.set_config(config)?;

        let addr = |i: u8| Ipv4Addr::new(10, 64, 0, i);
        let equal32: Vec<(Ipv4Addr, u32)> = (1..=32).map(|i| (addr(i), 1)).collect();
        let removed = rng.gen_range(0..32);
        let equal31: Vec<(Ipv4Addr, u32)> =
            equal32.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, b)| *b).collect();
        let equal33: Vec<(Ipv4Addr, u32)> = equal32.iter().copied().chain([(addr(33), 1)]).collect();
        let weighted: Vec<(Ipv4Addr, u32)> = vec![(addr(41), 1), (addr(42), 2), (addr(43), 3)];

        // The same flows for every table.
        let packets: Vec<Packet> = (0..MAGLEV_DATAPATH_FLOWS).map(|_| Packet::random4(rng)).collect();
        let frames: Vec<Vec<u8>> = packets.iter().map(Packet::frame).collect();
        let flows: Vec<Flow> = packets.iter().map(|p| p.flow(true)).collect();
        let seed = lb.config.hash_seed;
        let model_slots: Vec<u32> = (0..MAGLEV_MODEL_FLOWS)
            .map(|_| {
                let proto = if rng.gen() { TCP } else { UDP };
                let flow = Flow {
                    saddr: Ipv4Addr::from(rng.gen::<u32>()).into(),
                    daddr: Ipv4Addr::from(rng.gen::<u32>()).into(),
                    sport: rng.gen(),
                    dport: rng.gen(),
                    proto,
                };
                maglev::flow_slot(&flow, seed, MAGLEV_SIZE) as u32
            })
            .collect();

        let m32 = measure(&mut lb, &equal32, &frames, &flows, &model_slots)?;
        let table_share = |lb: &Lb, list: &[(Ipv4Addr, u32)]| -> Vec<f64> {
            let table = lb.tables[SVC as usize].as_ref().unwrap();
            list.iter()
                .map(|(a, _)| {
                    table.iter().filter(|&&n| n == 1000 + u32::from(a.octets()[3])).count() as f64 / MAGLEV_SIZE as f64
                })
                .collect()
        };
        let slots32 = table_share(&lb, &equal32);
        let m31 = measure(&mut lb, &equal31, &frames, &flows, &model_slots)?;
        let m33 = measure(&mut lb, &equal33, &frames, &flows, &model_slots)?;
        let mw = measure(&mut lb, &weighted, &frames, &flows, &model_slots)?;
        let slots_w = table_share(&lb, &weighted);

        let even32 = vec![1.0 / 32.0; 32];
        let (dp32, model32, table32) = (
            worst_deviation(&shares(&m32.datapath, 32), &even32),
            worst_deviation(&shares(&m32.model, 32), &even32),
            worst_deviation(&slots32, &even32),
        );
        let moved31 = (
            moved(&m32.datapath, &equal32, &m31.datapath, &equal31),
            moved(&m32.model, &equal32, &m31.model, &equal31),
        );
        let moved33 = (
            moved(&m32.datapath, &equal32, &m33.datapath, &equal33),
            moved(&m32.model, &equal32, &m33.model, &equal33),
        );
        let targets_w = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
        let (shares_w_dp, shares_w_model) = (shares(&mw.datapath, 3), shares(&mw.model, 3));
        let pct = |v: &[f64]| v.iter().map(|s| format!("{:.3}%", s * 100.0)).collect::<Vec<_>>().join(", ");
        eprintln!(
            "maglev through the datapath ({MAGLEV_DATAPATH_FLOWS} flows per table through test_run, each equal to the model's choice; \
             {MAGLEV_MODEL_FLOWS} more flows through the model):\n\
             \x20 32 equal backends: worst share deviation from the mean {:.2}% (datapath flows), {:.2}% (model flows), {:.3}% (table slots)\n\
             \x20 remove 1 of 32 (backend {}): {:.3}% of flows moved (datapath), {:.3}% (model); bound 1/32 + 1% = {:.3}%\n\
             \x20 add a 33rd: {:.3}% moved (datapath), {:.3}% (model); bound 1/33 + 1% = {:.3}%\n\
             \x20 weights 1:2:3: shares {} (datapath), {} (model), {} (table slots); targets 16.667%, 33.333%, 50.000%",
            dp32 * 100.0,
            model32 * 100.0,
            table32 * 100.0,
            removed + 1,
            moved31.0 * 100.0,
            moved31.1 * 100.0,
            (1.0 / 32.0 + 0.01) * 100.0,
            moved33.0 * 100.0,
            moved33.1 * 100.0,
            (1.0 / 33.0 + 0.01) * 100.0,
            pct(&shares_w_dp),
            pct(&shares_w_model),
            pct(&slots_w),
        );
        // The issue's bounds, on the model's 2,000,000 flows (the datapath
        // agreed flow by flow on its 100,000): share within 2% of the mean.
        ensure!(model32 <= 0.02, "32 equal backends: a share {:.2}% off the mean", model32 * 100.0);
        ensure!(table32 <= 0.02, "32 equal backends: a table share {:.2}% off the mean", table32 * 100.0);
        ensure!(moved31.1 <= 1.0 / 32.0 + 0.01 && moved31.0 <= 1.0 / 32.0 + 0.01, "removing 1 of 32 moved {moved31:?}");
        ensure!(moved33.1 <= 1.0 / 33.0 + 0.01 && moved33.0 <= 1.0 / 33.0 + 0.01, "adding a 33rd moved {moved33:?}");
        let dev_w = worst_deviation(&shares_w_model, &targets_w);
        ensure!(dev_w <= 0.02, "weights 1:2:3: shares {} off by {:.2}%", pct(&shares_w_model), dev_w * 100.0);
        // The 100,000 datapath flows alone: 32 shares of ~3,125 flows each
        // have a binomial spread of ~1.8%, so only a looser bound holds there.
        ensure!(dp32 <= 0.08, "32 equal backends: a datapath share {:.2}% off the mean", dp32 * 100.0);
        // (The 1/6 share of 100,000 flows spreads by ~0.7% relative: 5% is 7 sigma.)
        ensure!(
            worst_deviation(&shares_w_dp, &targets_w) <= 0.05,
            "weights 1:2:3 through the datapath: {}",
            pct(&shares_w_dp)
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 11. Per-CPU counter maps

fn per_cpu_counters() -> TestResult {
    let mut lb = Lb::load(true)?;
    for map in [lb.maps().l4lb_counters, lb.maps().l4lb_be_stats, lb.maps().l4lb_svc_stats] {
        ensure!(
            map.map_type() == MapType::PercpuArray,
            "{} is {:?}, expected PercpuArray",
            map.name().to_string_lossy(),
            map.map_type()
        );
    }
    lb.set_config(base_config())?;
    add_service(&mut lb, SVC, &[(BE, backend6())], true)?;
    lb.add_vip(VipKey::new(VIP4.into(), TCP, 80), SVC)?;
    lb.add_vip(VipKey::new(VIP6.into(), TCP, 80), SVC)?;
    for i in 0..5u16 {
        let p4 = Packet::tcp4(40000 + i, 80);
        let p6 = Packet::tcp6(40000 + i, 80);
        check(&lb, &format!("per-CPU: TCP {i}"), &p4.frame(), tx(SVC, BE, p4.flow(true)))?;
        check(&lb, &format!("per-CPU: IPv6 TCP {i}"), &p6.frame(), tx(SVC, BE, p6.flow(true)))?;
    }
    check(&lb, "per-CPU: ARP", &arp_request_frame(), Want::Pass)?;
    check(&lb, "per-CPU: no service", &Packet::tcp4(1, 81).frame(), Want::NoService)?;
    check(
        &lb,
        "per-CPU: IHL 4",
        &with_ip_byte(&Packet::udp4(1, 2).frame(), 0, 0x44),
        Want::Drop(L4LB_CNT_DROP_BAD_IHL),
    )?;
    let counters = lb.counters()?;
    ensure!(counters.len() == NCNT && counters[L4LB_CNT_RX as usize] == 13, "counters {counters:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 12. Issue 5: VLAN tags

/// Service SVC: VIP4:80/tcp, VIP4:53/udp, [VIP6]:80/tcp, [VIP6]:53/udp over 16
/// backends of `family` (IPv6 backends take both families, IPv4 only IPv4),
/// numbers 400.., UDP hashing ports.
fn vip_service(v6_backends: bool) -> Result<Lb, Failed> {
    let mut lb = loaded()?;
    let backends: Vec<(u32, BackendEntry)> = (0..16u32)
        .map(|i| {
            let addr: IpAddr = if v6_backends {
                Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 5, 0, 0, 0, i as u16 + 1).into()
            } else {
                Ipv4Addr::new(10, 5, 0, i as u8 + 1).into()
            };
            (400 + i, BackendEntry::new(addr, [0x02, 0xbe, 0x05, 0, 0, i as u8], SVC))
        })
        .collect();
    add_service(&mut lb, SVC, &backends, true)?;
    for (addr, proto, port) in
        [(IpAddr::from(VIP4), TCP, 80), (VIP4.into(), UDP, 53), (VIP6.into(), TCP, 80), (VIP6.into(), UDP, 53)]
    {
        lb.add_vip(VipKey::new(addr, proto, port), SVC)?;
    }
    Ok(lb)
}

const TAG_SETS: [&[(u16, u16)]; 6] = [
    &[(0x8100, 0x0005)],
    &[(0x8100, 0xefff)],
    &[(0x88a8, 0x0064)],
    &[(0x88a8, 0x0064), (0x8100, 0x2005)],
    &[(0x8100, 0x0fff), (0x8100, 0x0001)],
    &[(0x88a8, 0xffff), (0x8100, 0x0000)],
];

fn vlan_tags() -> TestResult {
    with_rng(|rng| {
        for v6_backends in [false, true] {
            let lb = vip_service(v6_backends)?;
            for tags in TAG_SETS {
                for i in 0..20 {
                    let mut packets = vec![
                        Packet { src: Ipv4Addr::from(rng.gen::<u32>()).into(), ..Packet::tcp4(rng.gen(), 80) },
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            tos: rng.gen(),
                            ..Packet::udp4(rng.gen(), 53)
                        },
                    ];
                    if v6_backends {
                        packets.push(Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            ..Packet::tcp6(rng.gen(), 80)
                        });
                        packets.push(Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            ..Packet::udp6(rng.gen(), 53)
                        });
                    }
                    for packet in packets {
                        let tagged = Packet { tags: tags.to_vec(), ..packet.clone() };
                        let what = format!("tags {tags:04x?} flow {i} (v6 backends {v6_backends})");
                        let out = check_balanced(&lb, &what, &tagged, SVC)?;
                        // Spelled out once more: the tags sit between the MACs and the outer EtherType.
                        let l2 = 12 + 4 * tags.len();
                        for (k, (tpid, tci)) in tags.iter().enumerate() {
                            ensure!(
                                out[12 + 4 * k..16 + 4 * k] == [tpid.to_be_bytes(), tci.to_be_bytes()].concat()[..],
                                "{what}: tag {k} is {:02x?}",
                                &out[12 + 4 * k..16 + 4 * k]
                            );
                        }
                        let outer_type = if v6_backends { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
                        ensure!(
                            out[l2..l2 + 2] == outer_type.to_be_bytes(),
                            "{what}: outer EtherType {:02x?}",
                            &out[l2..l2 + 2]
                        );
                        // The same flow untagged goes to the same backend.
                        let plain = lb.run(&packet.frame())?.1;
                        ensure!(
                            plain[ETH_LEN..ETH_LEN + 40.min(plain.len() - ETH_LEN)]
                                == out[l2 + 2..l2 + 2 + 40.min(plain.len() - ETH_LEN)],
                            "{what}: the untagged flow's outer header differs"
                        );
                    }
                }
            }
            // A third tag: not ours, whatever follows.
            for tags in [[(0x8100, 1), (0x8100, 2), (0x8100, 3)], [(0x88a8, 1), (0x8100, 2), (0x88a8, 3)]] {
                for packet in [Packet::tcp4(40000, 80), Packet::tcp6(40000, 80)] {
                    let frame = Packet { tags: tags.to_vec(), ..packet }.frame();
                    check(&lb, &format!("three tags {tags:04x?}"), &frame, Want::Pass)?;
                    check(&lb, "three tags, cut after the third", &frame[..ETH_LEN + 12], Want::Pass)?;
                }
            }
            // Tags cut off: the first (frames of 14..17 bytes), the second (18..21).
            let two = Packet { tags: vec![(0x88a8, 7), (0x8100, 8)], ..Packet::tcp4(40000, 80) }.frame();
            for len in ETH_LEN..ETH_LEN + 8 {
                check(
                    &lb,
                    &format!("two tags, frame cut to {len}"),
                    &two[..len],
                    Want::Drop(L4LB_CNT_DROP_SHORT_VLAN),
                )?;
            }
            let one = Packet { tags: vec![(0x8100, 7)], ..Packet::tcp6(40000, 80) }.frame();
            for len in ETH_LEN..ETH_LEN + 4 {
                check(&lb, &format!("one tag, frame cut to {len}"), &one[..len], Want::Drop(L4LB_CNT_DROP_SHORT_VLAN))?;
            }
            // Whole tags, the IP header cut: the IP checks after the tags.
            check(&lb, "two tags, then 4 bytes of IPv4", &two[..ETH_LEN + 12], Want::Drop(L4LB_CNT_DROP_SHORT_IPV4))?;
            check(&lb, "one tag, then 4 bytes of IPv6", &one[..ETH_LEN + 8], Want::Drop(L4LB_CNT_DROP_SHORT_IPV6))?;
            // A tagged frame of another EtherType: the stack's.
            let arp = tagged_frame(&[(0x8100, 9)], ETHERTYPE_ARP, &[0; 28]);
            check(&lb, "tagged ARP", &arp, Want::Pass)?;
            // A tagged frame no VIP takes.
            let stray = Packet { tags: vec![(0x8100, 9)], ..Packet::tcp4(40000, 81) };
            check(&lb, "tagged, no service", &stray.frame(), Want::NoService)?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 13. Issue 5: ICMP errors about balanced flows

/// The router that reports an error.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0xfe);

/// How an ICMP error's quote is built.
#[derive(Debug, Clone, Copy)]
struct Quote {
    /// Bytes of the VIP's answer quoted (None: all of it).
    len: Option<usize>,
}

/// The VIP's answer to `flow`'s client: VIP:dport -> client:sport.
fn answer_of(flow: &Packet) -> Packet {
    Packet { src: flow.dst, dst: flow.src, sport: flow.dport, dport: flow.sport, df: true, ..flow.clone() }
}

/// ICMP (type, code, rest-of-header) from ROUTER4 to `to`, quoting `quoted` (IP bytes).
fn icmp4_error(to: IpAddr, icmp_type: u8, code: u8, rest: u32, quoted: &[u8]) -> Packet {
    let mut message = vec![icmp_type, code, 0, 0];
    message.extend_from_slice(&rest.to_be_bytes());
    message.extend_from_slice(quoted);
    let sum = internet_checksum(&message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    Packet { src: ROUTER4.into(), dst: to, df: false, ..Packet::other4(ICMP, message) }
}

/// ICMPv6 (type, code, rest) from ROUTER6 to `to`, quoting `quoted`; checksum with the pseudo-header.
fn icmp6_error(to: IpAddr, icmp_type: u8, code: u8, rest: u32, quoted: &[u8]) -> Packet {
    let mut message = vec![icmp_type, code, 0, 0];
    message.extend_from_slice(&rest.to_be_bytes());
    message.extend_from_slice(quoted);
    let IpAddr::V6(dst) = to else { panic!("IPv6 destination") };
    let sum = common::lb::icmpv6_checksum(&ROUTER6.octets(), &dst.octets(), &message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    Packet { src: ROUTER6.into(), dst: to, ..Packet::other6(58, message) }
}

fn quote_of(answer: &Packet, quote: Quote) -> Vec<u8> {
    let bytes = answer.ip_bytes();
    let len = quote.len.unwrap_or(bytes.len()).min(bytes.len());
    bytes[..len].to_vec()
}

fn icmp_errors() -> TestResult {
    with_rng(|rng| {
        for v6_backends in [false, true] {
            let mut lb = vip_service(v6_backends)?;
            // UDP to :5353 in a service that does not hash UDP ports.
            let no_ports = 6;
            let backends: Vec<(u32, BackendEntry)> = (0..16u32)
                .map(|i| {
                    (
                        500 + i,
                        BackendEntry::new(
                            Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 6, 0, 0, 0, i as u16 + 1).into(),
                            BACKEND_MAC,
                            no_ports,
                        ),
                    )
                })
                .collect();
            add_service(&mut lb, no_ports, &backends, false)?;
            lb.add_vip(VipKey::new(VIP4.into(), UDP, 5353), no_ports)?;
            lb.add_vip(VipKey::new(VIP6.into(), UDP, 5353), no_ports)?;

            let mut moved_without_swap = 0;
            let mut cases = 0;
            for i in 0..40 {
                let mut flows = vec![
                    (
                        SVC,
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            ..Packet::tcp4(rng.gen_range(1024..65535), 80)
                        },
                    ),
                    (
                        SVC,
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            ..Packet::udp4(rng.gen_range(1024..65535), 53)
                        },
                    ),
                    (
                        no_ports,
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            ..Packet::udp4(rng.gen_range(1024..65535), 5353)
                        },
                    ),
                ];
                if v6_backends {
                    flows.push((
                        SVC,
                        Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            ..Packet::tcp6(rng.gen_range(1024..65535), 80)
                        },
                    ));
                    flows.push((
                        SVC,
                        Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            ..Packet::udp6(rng.gen_range(1024..65535), 53)
                        },
                    ));
                    flows.push((
                        no_ports,
                        Packet { src: Ipv6Addr::from(rng.gen::<u128>()).into(), ..Packet::udp6(1, 5353) },
                    ));
                }
                for (service, flow) in flows {
                    let hash_ports = lb.services[service as usize].flags & L4LB_SERVICE_HASH_PORTS != 0;
                    // The client's flow first: where it goes.
                    let out = check_balanced(&lb, &format!("flow {i}"), &flow, service)?;
                    let number = lb.predict(service, &flow.flow(hash_ports));
                    let flow_outer = out[ETH_LEN..].to_vec();
                    let answer = answer_of(&flow);
                    // Hashing the quoted tuple unswapped would usually land elsewhere.
                    let unswapped = Flow {
                        saddr: answer.src,
                        daddr: answer.dst,
                        sport: answer.sport,
                        dport: answer.dport,
                        proto: answer.proto,
                    };
                    moved_without_swap += usize::from(lb.predict(service, &unswapped) != number);
                    let errors: Vec<(String, Packet)> = if flow.is_v6() {
                        vec![
                            (
                                "ICMPv6 packet too big".into(),
                                icmp6_error(flow.dst, 2, 0, 1280, &quote_of(&answer, Quote { len: Some(1232) })),
                            ),
                            (
                                "ICMPv6 unreachable, port".into(),
                                icmp6_error(flow.dst, 1, 4, 0, &quote_of(&answer, Quote { len: Some(48) })),
                            ),
                            (
                                "ICMPv6 unreachable, no route".into(),
                                icmp6_error(flow.dst, 1, 0, 0, &quote_of(&answer, Quote { len: None })),
                            ),
                        ]
                    } else {
                        vec![
                            (
                                "frag needed".into(),
                                icmp4_error(flow.dst, 3, 4, 1400, &quote_of(&answer, Quote { len: Some(28) })),
                            ),
                            (
                                "host unreachable".into(),
                                icmp4_error(flow.dst, 3, 1, 0, &quote_of(&answer, Quote { len: None })),
                            ),
                            (
                                "port unreachable".into(),
                                icmp4_error(flow.dst, 3, 3, 0, &quote_of(&answer, Quote { len: Some(24) })),
                            ),
                            ("admin prohibited, quoted options".into(), {
                                let with_options = Packet { options: vec![1, 1, 1, 0], ..answer.clone() };
                                icmp4_error(flow.dst, 3, 13, 0, &quote_of(&with_options, Quote { len: Some(32) }))
                            }),
                        ]
                    };
                    for (name, error) in errors {
                        let what = format!("flow {i} {:?}: {name}", flow.flow(true));
                        // The ICMP packet is encapsulated whole to the flow's backend,
                        // its hash (and IPv6 flow label) the flow's own.
                        let out = check(&lb, &what, &error.frame(), tx(service, number, flow.flow(hash_ports)))?;
                        let l3 = error.l3_len();
                        let outer_len = out.len() - ETH_LEN - l3;
                        ensure!(
                            out[ETH_LEN + 12.min(outer_len)..ETH_LEN + outer_len]
                                == flow_outer[12.min(outer_len)..outer_len]
                                || outer_len == 20,
                            "{what}: outer header differs from the flow's"
                        );
                        // Tagged too.
                        let tagged = Packet { tags: vec![(0x88a8, 3), (0x8100, 4)], ..error.clone() };
                        check(
                            &lb,
                            &format!("{what}, QinQ"),
                            &tagged.frame(),
                            tx(service, number, flow.flow(hash_ports)),
                        )?;
                        cases += 2;
                    }
                }
            }
            ensure!(moved_without_swap >= 40, "only {moved_without_swap} flows would move with the tuple unswapped");
            eprintln!("ICMP errors (v6 backends {v6_backends}): {cases} errors encapsulated to their flow's backend");

            icmp_errors_passed(&mut lb)?;
        }
        Ok(())
    })
}

/// ICMP that does not qualify: passed untouched (or dropped for the IP
/// checks every packet gets). `lb` is a vip_service.
fn icmp_errors_passed(lb: &mut Lb) -> TestResult {
    let v6 = lb.backends[400].family == L4LB_FAMILY_IPV6 as u8;
    let flow = Packet::tcp4(40000, 80);
    let answer = answer_of(&flow);
    let quoted = answer.ip_bytes();
    let good = icmp4_error(VIP4.into(), 3, 4, 1400, &quoted[..28]);
    let flow_tx = tx(SVC, lb.predict(SVC, &flow.flow(true)), flow.flow(true));
    check(lb, "IPv4 reference error", &good.frame(), flow_tx)?;

    // Echo request / reply, time exceeded, redirect, source quench, parameter problem.
    let echo = Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 0x4c42, seq: 1 });
    let ping = [&Icmpv4Header::with_checksum(echo, b"ping").to_bytes()[..], b"ping"].concat();
    check(
        lb,
        "echo request to the VIP",
        &Packet { src: CLIENT4.into(), ..Packet::other4(ICMP, ping) }.frame(),
        Want::Pass,
    )?;
    for icmp_type in [0u8, 4, 5, 8, 11, 12, 13, 255] {
        let error = icmp4_error(VIP4.into(), icmp_type, 0, 0, &quoted[..28]);
        check(lb, &format!("ICMP type {icmp_type} quoting the flow"), &error.frame(), Want::Pass)?;
    }
    // The quoted packet not from the outer destination.
    let other_src = Packet { src: Ipv4Addr::new(203, 0, 113, 11).into(), ..answer.clone() };
    check(
        lb,
        "quote from another address",
        &icmp4_error(VIP4.into(), 3, 4, 0, &other_src.ip_bytes()[..28]).frame(),
        Want::Pass,
    )?;
    let from_client = flow.ip_bytes();
    check(
        lb,
        "quote of the client's own packet",
        &icmp4_error(VIP4.into(), 3, 4, 0, &from_client[..28]).frame(),
        Want::Pass,
    )?;
    // Not TCP/UDP.
    for proto in [ICMP, GRE, SCTP, IPIP] {
        let mut q = quoted[..28].to_vec();
        q[9] = proto;
        q[10..12].fill(0);
        let sum = internet_checksum(&q[..20]);
        q[10..12].copy_from_slice(&sum.to_be_bytes());
        check(lb, &format!("quoted protocol {proto}"), &icmp4_error(VIP4.into(), 3, 4, 0, &q).frame(), Want::Pass)?;
    }
    // Quoted version / IHL wrong.
    for first in [0x65u8, 0x44, 0x40, 0x35] {
        let mut q = quoted[..28].to_vec();
        q[0] = first;
        check(
            lb,
            &format!("quoted first byte {first:#04x}"),
            &icmp4_error(VIP4.into(), 3, 4, 0, &q).frame(),
            Want::Pass,
        )?;
    }
    // A later fragment quoted (no ports there); a first fragment has its ports.
    let later = Packet { frag_offset: 4, ..answer.clone() };
    let q = later.ip_bytes();
    check(lb, "quoted later fragment", &icmp4_error(VIP4.into(), 3, 4, 0, &q[..q.len().min(28)]).frame(), Want::Pass)?;
    // Cut short: the quote ends before the quoted ports (every cut), in the
    // frame and only by tot_len.
    for len in 0..24 {
        let error = icmp4_error(VIP4.into(), 3, 4, 0, &quoted[..len]);
        check(lb, &format!("quote of {len} bytes"), &error.frame(), Want::Pass)?;
        let whole = icmp4_error(VIP4.into(), 3, 4, 0, &quoted[..28]).frame();
        check(lb, &format!("quote of {len} bytes by tot_len"), &with_tot_len(&whole, (28 + len) as u16), Want::Pass)?;
    }
    let options = Packet { options: vec![1; 8], ..answer.clone() }.ip_bytes();
    for len in [20, 27, 28, 31] {
        let error = icmp4_error(VIP4.into(), 3, 4, 0, &options[..len]);
        check(lb, &format!("quote with 8 option bytes, {len} bytes"), &error.frame(), Want::Pass)?;
    }
    let error = icmp4_error(VIP4.into(), 3, 4, 0, &options[..32]);
    check(lb, "quote with 8 option bytes, 32 bytes (ports in)", &error.frame(), flow_tx)?;
    // The ICMP packet itself a fragment.
    check(lb, "the error a first fragment", &Packet { mf: true, ..good.clone() }.frame(), Want::Pass)?;
    check(lb, "the error a later fragment", &Packet { frag_offset: 2, ..good.clone() }.frame(), Want::Pass)?;
    // IP checks first: bad header checksum, TTL 0.
    let mut bad = good.frame();
    bad[ETH_LEN + 10] ^= 0x01;
    check(lb, "error with a bad header checksum", &bad, Want::Drop(L4LB_CNT_DROP_BAD_CSUM))?;
    check(lb, "error with TTL 0", &Packet { ttl: 0, ..good.clone() }.frame(), Want::Drop(L4LB_CNT_DROP_TTL_ZERO))?;
    check(lb, "error with TTL 1", &Packet { ttl: 1, ..good.clone() }.frame(), flow_tx)?;
    // About a flow to a port no VIP has (and no catch-all).
    let stray = answer_of(&Packet::tcp4(40000, 81)).ip_bytes();
    check(
        lb,
        "error about a flow no VIP takes",
        &icmp4_error(VIP4.into(), 3, 4, 0, &stray[..28]).frame(),
        Want::NoService,
    )?;

    // ICMPv6.
    if v6 {
        let flow = Packet::tcp6(40000, 80);
        let answer = answer_of(&flow);
        let quoted = answer.ip_bytes();
        let good = icmp6_error(VIP6.into(), 2, 0, 1280, &quoted[..48]);
        check(lb, "IPv6 reference error", &good.frame(), tx(SVC, lb.predict(SVC, &flow.flow(true)), flow.flow(true)))?;
        for icmp_type in [0u8, 3, 4, 127, 128, 129, 135, 136] {
            let error = icmp6_error(VIP6.into(), icmp_type, 0, 0, &quoted[..48]);
            check(lb, &format!("ICMPv6 type {icmp_type} quoting the flow"), &error.frame(), Want::Pass)?;
        }
        let other_src = Packet { src: CLIENT6.into(), ..answer.clone() };
        check(
            lb,
            "ICMPv6 quote from another address",
            &icmp6_error(VIP6.into(), 1, 0, 0, &other_src.ip_bytes()[..48]).frame(),
            Want::Pass,
        )?;
        let mut icmp_quoted = quoted[..48].to_vec();
        icmp_quoted[6] = 58;
        check(lb, "ICMPv6 quoting ICMPv6", &icmp6_error(VIP6.into(), 1, 0, 0, &icmp_quoted).frame(), Want::Pass)?;
        let mut v4_quoted = quoted[..48].to_vec();
        v4_quoted[0] = 0x45;
        check(lb, "ICMPv6 quoting version 4", &icmp6_error(VIP6.into(), 1, 0, 0, &v4_quoted).frame(), Want::Pass)?;
        let with_ext = Packet { ext: vec![Ext::DestOpts(0)], ..answer.clone() }.ip_bytes();
        check(
            lb,
            "ICMPv6 quoting extension headers",
            &icmp6_error(VIP6.into(), 1, 0, 0, &with_ext[..56]).frame(),
            Want::Pass,
        )?;
        let fragment_quoted =
            Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], ..answer.clone() }.ip_bytes();
        check(
            lb,
            "ICMPv6 quoting a fragment header",
            &icmp6_error(VIP6.into(), 2, 0, 1280, &fragment_quoted[..56]).frame(),
            Want::Pass,
        )?;
        for len in 0..44 {
            let error = icmp6_error(VIP6.into(), 2, 0, 1280, &quoted[..len]);
            check(lb, &format!("ICMPv6 quote of {len} bytes"), &error.frame(), Want::Pass)?;
        }
        // Behind extension headers: skipped like any packet's.
        let behind = Packet { ext: vec![Ext::HopByHop(0), Ext::DestOpts(1)], ..good.clone() };
        check(
            lb,
            "ICMPv6 error behind extension headers",
            &behind.frame(),
            tx(SVC, lb.predict(SVC, &flow.flow(true)), flow.flow(true)),
        )?;
        // The ICMPv6 packet a fragment (not atomic).
        let fragment = Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], ..good.clone() };
        check(lb, "ICMPv6 error in a fragment", &fragment.frame(), Want::Pass)?;
        check(
            lb,
            "ICMPv6 error, hop limit 0",
            &Packet { ttl: 0, ..good.clone() }.frame(),
            Want::Drop(L4LB_CNT_DROP_TTL_ZERO),
        )?;
        let echo6 = Packet { src: CLIENT6.into(), ..Packet::other6(58, vec![128, 0, 0, 0, 0x4c, 0x42, 0, 1]) };
        check(lb, "ICMPv6 echo request to the VIP", &echo6.frame(), Want::Pass)?;
    }

    // Never an error about an error: too big once encapsulated -> dropped, DF or not.
    let overhead = if v6 { 40 } else { 20 };
    let big = icmp4_error(VIP4.into(), 3, 4, 1400, &answer.clone().sized(600).ip_bytes());
    let mut config = lb.config.clone();
    config.mtu = (big.l3_len() + overhead - 1) as u32;
    lb.set_config(config.clone())?;
    for df in [false, true] {
        check(
            lb,
            &format!("too-big ICMP error, df {df}"),
            &Packet { df, ..big.clone() }.frame(),
            Want::Drop(L4LB_CNT_DROP_TOO_BIG),
        )?;
    }
    if v6 {
        let flow = Packet::tcp6(40000, 80);
        let big6 = icmp6_error(VIP6.into(), 1, 0, 0, &answer_of(&flow).sized(600).ip_bytes());
        check(lb, "too-big ICMPv6 error", &big6.frame(), Want::Drop(L4LB_CNT_DROP_TOO_BIG))?;
    }
    config.mtu = (big.l3_len() + overhead) as u32;
    lb.set_config(config.clone())?;
    check(lb, "ICMP error exactly at the MTU", &big.frame(), flow_tx)?;
    config.mtu = 0;
    lb.set_config(config)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 14. Issue 5: too big -> ICMP answers

fn too_big_answers() -> TestResult {
    with_rng(|rng| {
        // 4in4 (overhead 20) and 4in6 / 6in6 (overhead 40): the advertised MTU
        // depends on the chosen backend's family.
        for (v6_backends, overhead) in [(false, 20usize), (true, 40)] {
            let mut lb = vip_service(v6_backends)?;
            for mtu in [576usize, 1320, 1500, 2000] {
                let mut config = lb.config.clone();
                config.mtu = mtu as u32;
                lb.set_config(config)?;
                for i in 0..10 {
                    let tags = TAG_SETS[rng.gen_range(0..TAG_SETS.len())].to_vec();
                    let mut clients = vec![
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            tos: rng.gen(),
                            ..Packet::tcp4(rng.gen(), 80)
                        },
                        Packet {
                            src: Ipv4Addr::from(rng.gen::<u32>()).into(),
                            df: true,
                            ..Packet::udp4(rng.gen(), 53)
                        },
                        Packet { options: vec![1; 40], ..Packet::tcp4(rng.gen(), 80) },
                        Packet { df: false, ..Packet::tcp4(rng.gen(), 80) },
                    ];
                    if v6_backends {
                        clients.push(Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            tos: rng.gen(),
                            ..Packet::tcp6(rng.gen(), 80)
                        });
                        clients.push(Packet {
                            src: Ipv6Addr::from(rng.gen::<u128>()).into(),
                            ..Packet::udp6(rng.gen(), 53)
                        });
                        clients.push(Packet { ext: vec![Ext::HopByHop(2)], ..Packet::tcp6(rng.gen(), 80) });
                    }
                    for client in clients {
                        for tags in [Vec::new(), tags.clone()] {
                            let client = Packet { tags, ..client.clone() };
                            let what = format!(
                                "mtu {mtu} +{overhead} client {i} {:?} tags {:04x?} df {}",
                                client.flow(true),
                                client.tags,
                                client.df
                            );
                            let at = client.clone().sized(mtu - overhead);
                            check_balanced(&lb, &format!("{what}: exactly at the MTU"), &at, SVC)?;
                            for extra in [1usize, 7, 300] {
                                let big = client.clone().sized(mtu - overhead + extra);
                                let want = too_big_want(&big, mtu, overhead);
                                let out = check(&lb, &format!("{what}: {extra} over"), &big.frame(), want)?;
                                if let Want::TooBig { mtu: advertised } = want {
                                    // A few fields by offset once more.
                                    let l2 = 12 + 4 * big.tags.len() + 2;
                                    ensure!(
                                        out[..6] == ROUTER_MAC && out[6..12] == LB_MAC,
                                        "{what}: MACs {:02x?}",
                                        &out[..12]
                                    );
                                    let icmp = l2 + if big.is_v6() { 40 } else { 20 };
                                    let mtu_field = if big.is_v6() {
                                        u32::from_be_bytes(out[icmp + 4..icmp + 8].try_into().unwrap())
                                    } else {
                                        u32::from(u16::from_be_bytes([out[icmp + 6], out[icmp + 7]]))
                                    };
                                    ensure!(
                                        mtu_field == advertised && advertised as usize == mtu - overhead,
                                        "{what}: MTU field {mtu_field}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
            // Below the host's minimum (the datapath must still be safe): a
            // packet shorter than the quote, and an MTU not above the overhead.
            let quote_len = |v6: bool| if v6 { 80usize } else { 68 };
            for v6 in [false, true] {
                if v6 && !v6_backends {
                    continue;
                }
                let client = if v6 { Packet::tcp6(40000, 80) } else { Packet::tcp4(40000, 80) };
                let minimum = client.clone().sized(client.l3_len()).l3_len();
                for l3 in [minimum.max(quote_len(v6) - 1), quote_len(v6)] {
                    if l3 < minimum {
                        continue;
                    }
                    let mut config = lb.config.clone();
                    config.mtu = (l3 + overhead - 1) as u32;
                    lb.set_config(config)?;
                    let packet = client.clone().sized(l3);
                    let want = if l3 < quote_len(v6) {
                        Want::Drop(L4LB_CNT_DROP_TOO_BIG)
                    } else {
                        Want::TooBig { mtu: (l3 - 1) as u32 }
                    };
                    check(
                        &lb,
                        &format!("IPv{} packet of {l3} bytes, mtu {}", if v6 { 6 } else { 4 }, l3 + overhead - 1),
                        &packet.frame(),
                        want,
                    )?;
                }
                for mtu in [1, overhead - 1, overhead] {
                    let mut config = lb.config.clone();
                    config.mtu = mtu as u32;
                    lb.set_config(config)?;
                    check(
                        &lb,
                        &format!("mtu {mtu} <= overhead {overhead}"),
                        &client.frame(),
                        Want::Drop(L4LB_CNT_DROP_TOO_BIG),
                    )?;
                }
            }
            let mut config = lb.config.clone();
            config.mtu = 0;
            lb.set_config(config)?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 15. Issue 5: IPv4 header checksum, TTL / hop limit, tot_len

fn checksum_ttl_tot_len() -> TestResult {
    with_rng(|rng| {
        let lb = catch_all_32_ipv4()?;
        let lb6 = catch_all_one(backend6())?;
        for i in 0..100 {
            let ihl = [5usize, 6, 10, 15][i % 4];
            let mut options = vec![0x01; (ihl - 5) * 4];
            if let Some(last) = options.last_mut() {
                *last = 0;
            }
            let packet = Packet { options, ..Packet::random4(rng) };
            let frame = packet.frame();
            ensure!(internet_checksum(&frame[ETH_LEN..ETH_LEN + ihl * 4]) == 0, "test frame {i}: header checksum");
            check_balanced(&lb, &format!("IHL {ihl} flow {i}, right checksum"), &packet, SVC)?;
            // The checksum field off by one bit, or any header byte changed without it.
            let mut bad = frame.clone();
            bad[ETH_LEN + 10 + rng.gen_range(0..2)] ^= 1 << rng.gen_range(0..8);
            check(
                &lb,
                &format!("IHL {ihl} flow {i}, checksum field flipped"),
                &bad,
                Want::Drop(L4LB_CNT_DROP_BAD_CSUM),
            )?;
            // A byte the parser does not otherwise read (TOS, id, addresses, options).
            let mut bad = frame.clone();
            let at = [1usize, 4, 5, 12, 15, 19]
                .into_iter()
                .chain(20..ihl * 4)
                .nth(rng.gen_range(0..6 + (ihl - 5) * 4))
                .unwrap();
            bad[ETH_LEN + at] ^= rng.gen_range(1..=255u8);
            check(
                &lb,
                &format!("IHL {ihl} flow {i}, header byte {at} changed"),
                &bad,
                Want::Drop(L4LB_CNT_DROP_BAD_CSUM),
            )?;
        }
        // The checksum's two zeros: a field of 0xffff where 0x0000 is right
        // (one's complement: the same sum) verifies, as RFC 1071 says.
        let zero = (0u16..=u16::MAX)
            .map(|id| {
                let mut frame = Packet::udp4(5353, 53).frame();
                frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&id.to_be_bytes());
                refresh_ipv4_checksum(&mut frame);
                frame
            })
            .find(|frame| frame[ETH_LEN + 10..ETH_LEN + 12] == [0, 0]);
        if let Some(mut frame) = zero {
            check(
                &lb,
                "checksum 0x0000",
                &frame,
                tx(SVC, lb.predict(SVC, &Packet::udp4(5353, 53).flow(true)), Packet::udp4(5353, 53).flow(true)),
            )?;
            frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0xff, 0xff]);
            check(
                &lb,
                "checksum 0xffff for 0x0000",
                &frame,
                tx(SVC, lb.predict(SVC, &Packet::udp4(5353, 53).flow(true)), Packet::udp4(5353, 53).flow(true)),
            )?;
        }
        // Not ours: a bad checksum on GRE / ESP is the stack's business.
        for proto in [GRE, ESP, IPIP] {
            let mut frame = Packet::other4(proto, vec![7; 24]).frame();
            frame[ETH_LEN + 10] ^= 0x40;
            check(&lb, &format!("protocol {proto} with a bad checksum"), &frame, Want::Pass)?;
        }
        // Checks before the checksum: tot_len below the header, with or without a right checksum.
        for tot_len in [0u16, 19] {
            let frame = with_tot_len(&Packet::tcp4(1, 2).frame(), tot_len);
            check(&lb, &format!("tot_len {tot_len}"), &frame, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
            let mut bad = frame.clone();
            bad[ETH_LEN + 10] ^= 0x01;
            check(&lb, &format!("tot_len {tot_len}, bad checksum"), &bad, Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN))?;
        }
        let options = Packet { options: vec![1; 40], ..Packet::tcp4(1, 2) }.frame();
        for tot_len in [20u16, 59] {
            check(
                &lb,
                &format!("IHL 15, tot_len {tot_len}"),
                &with_tot_len(&options, tot_len),
                Want::Drop(L4LB_CNT_DROP_BAD_TOT_LEN),
            )?;
        }

        // TTL: 0 dropped (after the checksum), 1 balanced with the inner TTL untouched.
        for packet in
            [Packet::tcp4(40000, 80), Packet::udp4(5353, 53), Packet { options: vec![1; 12], ..Packet::tcp4(1, 2) }]
        {
            check(
                &lb,
                &format!("TTL 0, proto {}", packet.proto),
                &Packet { ttl: 0, ..packet.clone() }.frame(),
                Want::Drop(L4LB_CNT_DROP_TTL_ZERO),
            )?;
            let mut bad = Packet { ttl: 0, ..packet.clone() }.frame();
            bad[ETH_LEN + 11] ^= 0x10;
            check(&lb, "TTL 0 and a bad checksum", &bad, Want::Drop(L4LB_CNT_DROP_BAD_CSUM))?;
            for ttl in [1u8, 2, 255] {
                let alive = Packet { ttl, ..packet.clone() };
                let out = check_balanced(&lb, &format!("TTL {ttl}"), &alive, SVC)?;
                ensure!(out[ETH_LEN + 20 + 8] == ttl, "TTL {ttl}: inner TTL became {}", out[ETH_LEN + 28]);
            }
        }
        check(&lb, "TTL 0, GRE (not ours)", &Packet { ttl: 0, ..Packet::other4(GRE, vec![0; 8]) }.frame(), Want::Pass)?;
        check(
            &lb,
            "TTL 0 ICMP echo",
            &Packet { ttl: 0, ..Packet::other4(ICMP, vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0]) }.frame(),
            Want::Drop(L4LB_CNT_DROP_TTL_ZERO),
        )?;
        // IPv6 hop limit.
        for packet in [
            Packet::tcp6(40000, 80),
            Packet::udp6(5353, 53),
            Packet { ext: vec![Ext::HopByHop(0)], ..Packet::tcp6(1, 2) },
        ] {
            check(
                &lb6,
                "hop limit 0",
                &Packet { ttl: 0, ..packet.clone() }.frame(),
                Want::Drop(L4LB_CNT_DROP_TTL_ZERO),
            )?;
            for ttl in [1u8, 255] {
                let alive = Packet { ttl, ..packet.clone() };
                let out = check(&lb6, &format!("hop limit {ttl}"), &alive.frame(), tx(SVC, BE, alive.flow(true)))?;
                ensure!(out[ETH_LEN + 40 + 7] == ttl, "hop limit {ttl}: inner hop limit became {}", out[ETH_LEN + 47]);
            }
        }
        check(
            &lb6,
            "hop limit 0, ICMPv6 echo",
            &Packet { ttl: 0, ..Packet::other6(58, vec![128, 0, 0, 0, 0, 1, 0, 1]) }.frame(),
            Want::Drop(L4LB_CNT_DROP_TTL_ZERO),
        )?;
        check(
            &lb6,
            "hop limit 0, no next header",
            &Packet { ttl: 0, ..Packet::other6(59, vec![0; 8]) }.frame(),
            Want::Pass,
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 16. Issue 5: fragments follow the fragment entry

/// Writes the fragment entries the host would for `vips` (address,
/// protocol, port, service): per (address, protocol) the port-0 VIP's
/// service if any, else the lowest port's.
fn add_fragment_entries(lb: &mut Lb, vips: &[(IpAddr, u8, u16, u32)]) -> TestResult {
    let mut chosen: std::collections::BTreeMap<(IpAddr, u8), (u16, u32)> = std::collections::BTreeMap::new();
    for &(addr, proto, port, service) in vips {
        let entry = chosen.entry((addr, proto)).or_insert((port, service));
        if port < entry.0 {
            *entry = (port, service);
        }
    }
    for ((addr, proto), (_, service)) in chosen {
        lb.add_vip(VipKey::fragment(addr, proto), service)?;
    }
    Ok(())
}

fn fragments_follow_fragment_entry() -> TestResult {
    with_rng(|rng| {
        let mut lb = loaded()?;
        let family_backends = |base: u32, v6: bool, service: u32| -> Vec<(u32, BackendEntry)> {
            (0..32u32)
                .map(|i| {
                    let addr: IpAddr = if v6 {
                        Ipv6Addr::new(0x2001, 0xdb8, 0xbe, base as u16, 0, 0, 0, i as u16 + 1).into()
                    } else {
                        Ipv4Addr::new(10, (base / 100) as u8, 0, i as u8 + 1).into()
                    };
                    (base + i, BackendEntry::new(addr, BACKEND_MAC, service))
                })
                .collect()
        };
        let (web, any, other, catch) = (1u32, 2, 3, 4);
        add_service(&mut lb, web, &family_backends(100, true, web), true)?;
        add_service(&mut lb, any, &family_backends(200, true, any), false)?;
        add_service(&mut lb, other, &family_backends(300, false, other), true)?;
        add_service(&mut lb, catch, &family_backends(600, true, catch), true)?;
        // VIP4 / VIP6: port 80 only (TCP and UDP). VIP4b / VIP6b: port 80 and port 0.
        // VIP4c: port 80 without a fragment entry (another host's view).
        let vip4b: IpAddr = Ipv4Addr::new(203, 0, 113, 20).into();
        let vip6b: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x20).into();
        let vip4c: IpAddr = Ipv4Addr::new(203, 0, 113, 30).into();
        let vips = [
            (IpAddr::from(VIP4), TCP, 80u16, web),
            (VIP4.into(), TCP, 8080, other),
            (VIP4.into(), UDP, 80, web),
            (VIP6.into(), TCP, 80, web),
            (VIP6.into(), UDP, 80, web),
            (vip4b, TCP, 80, web),
            (vip4b, TCP, 0, any),
            (vip6b, UDP, 80, web),
            (vip6b, UDP, 0, any),
        ];
        for &(addr, proto, port, service) in &vips {
            lb.add_vip(VipKey::new(addr, proto, port), service)?;
        }
        add_fragment_entries(&mut lb, &vips)?;
        lb.add_vip(VipKey::new(vip4c, TCP, 80), web)?;

        let mut ports_would_move = 0;
        for i in 0..60 {
            for (dst, proto, service) in [
                (IpAddr::from(VIP4), TCP, web),
                (VIP4.into(), UDP, web),
                (VIP6.into(), TCP, web),
                (VIP6.into(), UDP, web),
                (vip4b, TCP, any),
                (vip6b, UDP, any),
            ] {
                let base =
                    if dst.is_ipv6() { Packet::random6(rng) } else { Packet { df: false, ..Packet::random4(rng) } };
                let flow = Packet { dst, proto, dport: 80, ..base };
                let fragments: Vec<(&str, Packet)> = if dst.is_ipv6() {
                    vec![
                        ("first", Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], ..flow.clone() }),
                        (
                            "middle",
                            Packet {
                                ext: vec![Ext::Fragment { offset: 3, more: true }],
                                payload: vec![0xf2; 24],
                                ..flow.clone()
                            },
                        ),
                        (
                            "last",
                            Packet {
                                ext: vec![Ext::DestOpts(0), Ext::Fragment { offset: 6, more: false }],
                                payload: vec![0xf3; 5],
                                ..flow.clone()
                            },
                        ),
                    ]
                } else {
                    vec![
                        ("first", Packet { mf: true, payload: vec![0xf1; 16], ..flow.clone() }),
                        ("middle", Packet { mf: true, frag_offset: 5, payload: vec![0xf2; 24], ..flow.clone() }),
                        ("last", Packet { frag_offset: 8, payload: vec![0xf3; 5], ..flow.clone() }),
                    ]
                };
                // Fragments: addresses and protocol only, whatever the protocol and service.
                let no_ports = Flow { sport: 0, dport: 0, ..flow.flow(true) };
                let number = lb.predict(service, &no_ports);
                for (name, fragment) in fragments {
                    let what = format!("flow {i} to {dst} proto {proto}: {name} fragment");
                    ensure!(fragment.flow(true).sport == 0, "{what}: a fragment's flow has no ports");
                    check(&lb, &what, &fragment.frame(), tx(service, number, fragment.flow(true)))?;
                }
                // The unfragmented packet: by port (VIP :80 for vip4b/vip6b too), ports hashed where the service does.
                let whole_service = web;
                check_balanced(&lb, &format!("flow {i} to {dst} proto {proto}: whole"), &flow, whole_service)?;
                if lb.predict(web, &flow.flow(true)) != lb.predict(web, &no_ports) {
                    ports_would_move += 1;
                }
            }
            // No fragment entry: the catch-all if there is one, else the stack.
            let stray = Packet { dst: vip4c, mf: true, ..Packet::random4(rng) };
            let stray = Packet { proto: TCP, ..stray };
            check(
                &lb,
                &format!("flow {i}: fragment, no fragment entry, no catch-all"),
                &stray.frame(),
                Want::NoService,
            )?;
        }
        ensure!(ports_would_move >= 100, "only {ports_would_move} flows change backend without ports");

        // A fragment entry is not found by the port-0 pass of whole packets, nor the other way round.
        check(&lb, "TCP to VIP4 port 0", &Packet::tcp4(1, 0).frame(), Want::NoService)?;
        let mut config = lb.config.clone();
        config.flags |= L4LB_CONFIG_CATCH_ALL;
        config.catch_all = catch;
        lb.set_config(config)?;
        let stray = Packet { dst: vip4c, frag_offset: 9, ..Packet::tcp4(1, 80) };
        check(
            &lb,
            "fragment, no fragment entry: catch-all",
            &stray.frame(),
            tx(catch, lb.predict(catch, &stray.flow(true)), stray.flow(true)),
        )?;
        let stray6 = Packet { dst: vip4c, ..Packet::udp4(1, 80) };
        let stray6 = Packet { mf: true, ..stray6 };
        check(
            &lb,
            "UDP fragment to a TCP-only address: catch-all",
            &stray6.frame(),
            tx(catch, lb.predict(catch, &stray6.flow(true)), stray6.flow(true)),
        )?;
        // An IPv6 fragment to a catch-all with IPv4 backends: the stack's (like any IPv6 packet).
        let mut config = lb.config.clone();
        config.catch_all = other;
        lb.set_config(config)?;
        let frag6 = Packet { ext: vec![Ext::Fragment { offset: 2, more: false }], ..Packet::tcp6(1, 80) };
        let frag6 = Packet { dst: Ipv6Addr::new(0x2001, 0xdb8, 0xf0, 0, 0, 0, 0, 0x99).into(), ..frag6 };
        check(&lb, "IPv6 fragment, IPv4-backend catch-all", &frag6.frame(), Want::NoService)?;
        // An IPv4 fragment to IPv4 backends (4in4) through a fragment entry.
        lb.add_vip(VipKey::fragment(vip4c, UDP), other)?;
        let frag4 = Packet { dst: vip4c, mf: true, ..Packet::udp4(1, 80) };
        check(
            &lb,
            "IPv4 fragment to IPv4 backends",
            &frag4.frame(),
            tx(other, lb.predict(other, &frag4.flow(true)), frag4.flow(true)),
        )?;
        // Atomic IPv6 fragments are whole packets: looked up by port.
        let atomic = Packet { ext: vec![Ext::Fragment { offset: 0, more: false }], ..Packet::tcp6(1, 80) };
        check_balanced(&lb, "atomic IPv6 fragment", &atomic, web)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// 17. Slots in transition (docs/transitions.md, include/l4lb.h "Connection
// tracking")
//
// A slot word is a steady backend number (no per-flow state at all), the
// empty word, or a word in transition (current | TRANSITION | previous << 16).
// Only frames in a slot in transition read or write l4lb_flows. Every case
// states the frame's outcome (exact output bytes through `check`), its
// FLOW_* event (checked against the reference model and the kernel's
// counters), and then the whole of l4lb_flows, entry by entry, with keys and
// values spelled out here byte by byte from include/l4lb.h (`check` also
// compares the kernel's map with the model's after every frame).

/// Backends of these cases: number 20 + i - 1 is 10.7.0.i, with a MAC of its own.
fn pin_backend(i: u8) -> BackendEntry {
    BackendEntry::new(Ipv4Addr::new(10, 7, 0, i).into(), [0x02, 0xbe, 0x07, 0, 0, i], SVC)
}

const BE_A: u32 = 20;
const BE_B: u32 = 21;
const BE_C: u32 = 22;

/// The tick the cases start at, the tick SVC's slots were put in transition,
/// its UDP grace and idle timeout (seconds).
const CLOCK: u32 = 1_000;
const CHANGED: u32 = 990;
const GRACE: u32 = 30;
const IDLE: u32 = 300;

/// A slot word in transition, spelled out from include/l4lb.h: the current
/// backend in the low 16 bits, bit 31 set, the previous backend from bit 16.
fn word(current: u32, previous: u32) -> u32 {
    current | 0x8000_0000 | (previous << 16)
}

/// Every slot of `service`'s table holds `word`.
fn fill_table(lb: &mut Lb, service: u32, word: u32) -> TestResult {
    lb.set_table(service, &vec![word; MAGLEV_SIZE])
}

fn hash_ports(lb: &Lb, service: u32) -> bool {
    lb.services[service as usize].flags & L4LB_SERVICE_HASH_PORTS != 0
}

/// SVC's entry with `flags`, changed at CHANGED, grace GRACE, idle timeout IDLE.
fn svc_entry(flags: u32) -> ServiceEntry {
    ServiceEntry { flags, changed: CHANGED, udp_grace: GRACE, idle_timeout: IDLE }
}

/// Loaded with `flows`, the clock at CLOCK; service SVC (TRACK_FLOWS, UDP
/// hashing ports, changed at CHANGED) with backends BE_A, BE_B, BE_C
/// (10.7.0.1..3), every slot steady on BE_A; VIP4:80/tcp, VIP4:53/udp, and
/// the fragment entries of VIP4.
fn pin_lb_with(flows: FlowTable) -> Result<Lb, Failed> {
    let mut lb = Lb::load_with(false, flows)?;
    lb.set_config(LbConfig { clock: CLOCK, ..base_config() })?;
    add_service(&mut lb, SVC, &[(BE_A, pin_backend(1)), (BE_B, pin_backend(2)), (BE_C, pin_backend(3))], true)?;
    lb.set_service_entry(SVC, svc_entry(lb.services[SVC as usize].flags | L4LB_SERVICE_TRACK_FLOWS))?;
    fill_table(&mut lb, SVC, BE_A)?;
    let vips = [(IpAddr::from(VIP4), TCP, 80u16, SVC), (VIP4.into(), UDP, 53, SVC)];
    for &(addr, proto, port, service) in &vips {
        lb.add_vip(VipKey::new(addr, proto, port), service)?;
    }
    add_fragment_entries(&mut lb, &vips)?;
    Ok(lb)
}

fn pin_lb() -> Result<Lb, Failed> {
    pin_lb_with(FlowTable::OBJECT)
}

/// `pin_lb`, every slot of SVC in transition: new flows to `current`, old ones to `previous`.
fn transition_lb(current: u32, previous: u32) -> Result<Lb, Failed> {
    let mut lb = pin_lb()?;
    fill_table(&mut lb, SVC, word(current, previous))?;
    Ok(lb)
}

fn addr16(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => [&a.octets()[..], &[0u8; 12]].concat(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// struct l4lb_flow_key spelled out: client address, VIP address (IPv4 in
/// the first 4 bytes, then 12 zero bytes), source and destination port as on
/// the wire (big-endian), family (4 or 6), protocol, 2 zero bytes: 40 bytes.
fn key_bytes(client: IpAddr, vip: IpAddr, sport: u16, dport: u16, proto: u8) -> Vec<u8> {
    let family = if vip.is_ipv4() { 4 } else { 6 };
    [addr16(client), addr16(vip), sport.to_be_bytes().to_vec(), dport.to_be_bytes().to_vec(), vec![family, proto, 0, 0]]
        .concat()
}

/// struct l4lb_flow spelled out: the backend's address (16 bytes as in
/// l4lb_backend), its number, the slot's index in l4lb_tables, the tick it
/// was last seen at (host order), its family, 3 zero bytes: 32 bytes.
fn pin_bytes(backend: IpAddr, number: u32, slot: u32, seen: u32) -> Vec<u8> {
    let family = if backend.is_ipv4() { 4 } else { 6 };
    [
        addr16(backend),
        number.to_ne_bytes().to_vec(),
        slot.to_ne_bytes().to_vec(),
        seen.to_ne_bytes().to_vec(),
        vec![family, 0, 0, 0],
    ]
    .concat()
}

/// The flow `packet` is hashed as in SVC (ports 0 for fragments, and for
/// UDP when SVC does not hash ports).
fn svc_flow(lb: &Lb, packet: &Packet) -> Flow {
    packet.flow(hash_ports(lb, SVC))
}

/// The index in l4lb_tables of the slot `packet`'s flow falls in, in SVC.
fn slot_of(lb: &Lb, packet: &Packet) -> u32 {
    lb.table_index(SVC, &svc_flow(lb, packet))
}

/// The key of `packet`'s flow in SVC.
fn key_of(lb: &Lb, packet: &Packet) -> Vec<u8> {
    let flow = svc_flow(lb, packet);
    key_bytes(packet.src, packet.dst, flow.sport, flow.dport, packet.proto)
}

/// The entry of `packet`'s flow pinned to `number` in its slot of SVC, last seen at `seen`.
fn entry_seen(lb: &Lb, packet: &Packet, number: u32, seen: u32) -> (Vec<u8>, Vec<u8>) {
    (key_of(lb, packet), pin_bytes(lb.backends[number as usize].ip(), number, slot_of(lb, packet), seen))
}

/// The entry of `packet`'s flow pinned to `number` now (seen: the clock).
fn entry(lb: &Lb, packet: &Packet, number: u32) -> (Vec<u8>, Vec<u8>) {
    entry_seen(lb, packet, number, lb.config.clock)
}

/// The FlowKey (the model's and `set_flow`'s) of `packet`'s flow in SVC.
fn flow_key(lb: &Lb, packet: &Packet) -> FlowKey {
    let flow = svc_flow(lb, packet);
    FlowKey::new(packet.src, packet.dst, packet.proto, flow.sport, flow.dport)
}

type Entries = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// l4lb_flows holds exactly `want` (key, value bytes), read back from the kernel.
fn expect_flows(lb: &Lb, what: &str, want: &Entries) -> TestResult {
    let got = lb.read_flows()?;
    let show = |m: &Entries| {
        m.iter().map(|(k, v)| format!("\n    {} -> {}", common::hex(k), common::hex(v))).collect::<String>()
    };
    ensure!(
        got == *want,
        "{what}: l4lb_flows holds {} entries:{}\n  expected {}:{}",
        got.len(),
        show(&got),
        want.len(),
        show(want)
    );
    Ok(())
}

fn entries<const N: usize>(list: [(Vec<u8>, Vec<u8>); N]) -> Entries {
    list.into_iter().collect()
}

/// What a case stated so far: frames run and FLOW_* events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stated {
    rx: u64,
    pinned: u64,
    repinned: u64,
    full: u64,
}

/// `check_tracked`, keeping the case's tally.
fn send(lb: &Lb, stated: &mut Stated, what: &str, frame: &[u8], want: Want, pin: Pin) -> Result<Vec<u8>, Failed> {
    let out = check_tracked(lb, what, frame, want, Some(pin))?;
    if !matches!(want, Want::Refused) {
        stated.rx += 1;
    }
    match pin {
        Pin::Nothing => {}
        Pin::Pinned => stated.pinned += 1,
        Pin::Repinned => stated.repinned += 1,
        Pin::Full => stated.full += 1,
    }
    Ok(out)
}

/// The kernel's RX and FLOW_* counters are what the case stated, frame by frame.
fn expect_stated(lb: &Lb, what: &str, stated: Stated) -> TestResult {
    let c = lb.counters()?;
    let got = Stated {
        rx: c[L4LB_CNT_RX as usize],
        pinned: c[L4LB_CNT_FLOW_PINNED as usize],
        repinned: c[L4LB_CNT_FLOW_REPINNED as usize],
        full: c[L4LB_CNT_FLOW_TABLE_FULL as usize],
    };
    ensure!(got == stated, "{what}: counters (rx, pinned, repinned, table full) {got:?}, the case stated {stated:?}");
    Ok(())
}

fn syn(packet: Packet) -> Packet {
    Packet { tcp_flags: TCP_SYN, payload: Vec::new(), ..packet }
}

/// An ICMP error from a router about `flow` (quoting the VIP's answer to
/// its client): fragmentation needed, or ICMPv6 packet too big.
fn error_of(flow: &Packet) -> Packet {
    let answer = answer_of(flow).ip_bytes();
    if flow.is_v6() {
        icmp6_error(flow.dst, 2, 0, 1280, &answer[..48])
    } else {
        icmp4_error(flow.dst, 3, 4, 1400, &answer[..28])
    }
}

/// The slot words agree: spelled here, by the model, by the host's encoder.
/// (And this run's build is the one loaded: the driver build with per-CPU counters.)
fn tracking_slot_words() -> TestResult {
    let lb = pin_lb()?;
    let build = common::lb::current_build();
    let counters = lb.maps().l4lb_counters.map_type();
    ensure!(
        lb.build == build
            && matches!((&lb.skel, build), (Skel::Object(_), Build::Object) | (Skel::Driver(_), Build::Driver)),
        "{} loaded, {} wanted",
        lb.build.name(),
        build.name()
    );
    ensure!(build == Build::Object || counters == MapType::PercpuArray, "the driver build's counters are {counters:?}");
    for (current, previous) in [(BE_B, BE_A), (0, 0), (0xfffe, 0x7fff), (32767, 1), (1, 32767)] {
        let spelled = word(current, previous);
        let host = l4lb::transition::Slot::Transition { current, previous }.encode();
        ensure!(spelled == host, "({current}, {previous}): spelled {spelled:#010x}, the host encodes {host:#010x}");
        ensure!(
            spelled == common::lb::transition(current, previous),
            "({current}, {previous}): the model encodes another word"
        );
        ensure!(
            SlotWord::of(spelled) == SlotWord::Transition { current, previous },
            "({current}, {previous}): the model decodes {:?}",
            SlotWord::of(spelled)
        );
        ensure!(
            l4lb::transition::Slot::decode(spelled) == l4lb::transition::Slot::Transition { current, previous },
            "({current}, {previous}): the host decodes {:?}",
            l4lb::transition::Slot::decode(spelled)
        );
    }
    ensure!(word(BE_B, BE_A) == 0x8014_0015, "word(21, 20) is {:#010x}", word(BE_B, BE_A));
    ensure!(SlotWord::of(SLOT_EMPTY) == SlotWord::Empty && SLOT_EMPTY == 0xffff_ffff, "the empty word");
    ensure!(SlotWord::of(0xffff) == SlotWord::Steady(0xffff), "0xffff is steady");
    ensure!(
        SlotWord::of(0x1_0000) == SlotWord::Steady(0x1_0000),
        "0x10000 (no TRANSITION bit) is steady for the datapath: a number past l4lb_backends"
    );
    ensure!(
        SlotWord::of(0x8000_0000) == SlotWord::Transition { current: 0, previous: 0 },
        "the TRANSITION bit alone is a word in transition"
    );
    Ok(())
}

/// (a) Steady slots keep no per-flow state: no packet kind (SYN, ACK, UDP,
/// first and later fragments, ICMP errors) reads or writes l4lb_flows,
/// whether the service says TRACK_FLOWS or not; a pin already there (written
/// by hand, one that would hold) is neither followed nor touched.
fn tracking_steady_slots_create_nothing() -> TestResult {
    let mut lb = pin_lb()?;
    let mut stated = Stated::default();
    let flow = Packet::tcp4(40000, 80);
    let udp = Packet::udp4(40001, 53);
    let first = Packet { mf: true, tcp_flags: TCP_SYN, ..Packet::tcp4(40002, 80) };
    let later = Packet { frag_offset: 5, payload: vec![0xf2; 24], ..Packet::tcp4(40002, 80) };
    let udp_later = Packet { frag_offset: 9, payload: vec![0xf3; 16], ..Packet::udp4(40003, 53) };
    let kinds = [
        ("SYN", syn(flow.clone()), flow.clone()),
        ("TCP ACK", flow.clone(), flow.clone()),
        ("UDP", udp.clone(), udp.clone()),
        ("first fragment (SYN flags)", first.clone(), first.clone()),
        ("later fragment", later.clone(), later.clone()),
        ("later UDP fragment", udp_later.clone(), udp_later.clone()),
        ("ICMP error about the TCP flow", error_of(&flow), flow.clone()),
        ("ICMP error about the UDP flow", error_of(&udp), udp.clone()),
    ];
    let tracked = lb.services[SVC as usize].flags;
    for track in [true, false] {
        let flags = if track { tracked } else { tracked & !L4LB_SERVICE_TRACK_FLOWS };
        lb.set_service(SVC, flags)?;
        for number in [BE_A, BE_B] {
            fill_table(&mut lb, SVC, number)?;
            for (name, packet, about) in &kinds {
                let what = format!("steady {number}, TRACK_FLOWS {track}: {name}");
                send(&lb, &mut stated, &what, &packet.frame(), tx(SVC, number, about.flow(true)), Pin::Nothing)?;
            }
            expect_flows(&lb, "steady slots", &Entries::new())?;
        }
    }
    // A pin of the flow that would hold in a slot in transition (BE_C, its
    // slot, an old tick): a steady slot does not look at it.
    lb.set_service(SVC, tracked)?;
    fill_table(&mut lb, SVC, BE_A)?;
    lb.set_flow(&flow_key(&lb, &flow), &FlowPin::to(BE_C, &pin_backend(3), slot_of(&lb, &flow), 7))?;
    let kept = entries([entry_seen(&lb, &flow, BE_C, 7)]);
    for (name, packet, about) in &kinds {
        let what = format!("steady BE_A, a pin to BE_C there: {name}");
        send(&lb, &mut stated, &what, &packet.frame(), tx(SVC, BE_A, about.flow(true)), Pin::Nothing)?;
    }
    expect_flows(&lb, "the pin untouched, its seen too", &kept)?;
    expect_stated(&lb, "steady slots", stated)?;
    ensure!(stated.pinned + stated.repinned + stated.full == 0, "steady slots moved FLOW counters");
    Ok(())
}

/// (b) The rules of a slot in transition (current BE_B, previous BE_A),
/// for flows without a pin: a SYN goes to the current backend, any other TCP
/// segment (a connection from before the change) to the previous one; UDP
/// to the previous backend while the grace lasts ((clock - changed) <
/// udp_grace), to the current one after it. Each pins its flow where it went
/// (made in its slot, seen at the clock). The pinned flows then stay there.
fn tracking_transition_rules() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let mut want = Entries::new();
    let new_conn = Packet::tcp4(40000, 80);
    let old_conn = Packet::tcp4(40001, 80);
    send(
        &lb,
        &mut stated,
        "SYN: a new connection",
        &syn(new_conn.clone()).frame(),
        tx(SVC, BE_B, new_conn.flow(true)),
        Pin::Pinned,
    )?;
    want.extend([entry(&lb, &new_conn, BE_B)]);
    let out = send(
        &lb,
        &mut stated,
        "ACK without a pin: from before the change",
        &old_conn.frame(),
        tx(SVC, BE_A, old_conn.flow(true)),
        Pin::Pinned,
    )?;
    ensure!(
        out[..6] == pin_backend(1).mac && out[ETH_LEN + 16..ETH_LEN + 20] == [10, 7, 0, 1],
        "the ACK is not sent to 10.7.0.1"
    );
    want.extend([entry(&lb, &old_conn, BE_A)]);
    // The ACK's entry, spelled out once more by hand.
    let slot = slot_of(&lb, &old_conn);
    ensure!(slot / MAGLEV_SIZE as u32 == SVC, "slot index {slot} is not in SVC's table");
    let key: Vec<u8> =
        [&[198, 51, 100, 7][..], &[0; 12], &[203, 0, 113, 10], &[0; 12], &[0x9c, 0x41, 0x00, 0x50], &[4, 6, 0, 0]]
            .concat();
    let value: Vec<u8> =
        [&[10, 7, 0, 1][..], &[0; 12], &BE_A.to_ne_bytes(), &slot.to_ne_bytes(), &CLOCK.to_ne_bytes(), &[4, 0, 0, 0]]
            .concat();
    ensure!(want.get(&key) == Some(&value), "the ACK's entry is spelled {:?}", want.get(&key).map(|v| common::hex(v)));
    expect_flows(&lb, "SYN and ACK", &want)?;

    // UDP: within the grace (29 s after the change), at its end (30 s), long after.
    let udp_in = Packet::udp4(40002, 53);
    let udp_end = Packet::udp4(40003, 53);
    let udp_late = Packet::udp4(40004, 53);
    lb.set_clock(CHANGED + GRACE - 1)?;
    send(&lb, &mut stated, "UDP within the grace", &udp_in.frame(), tx(SVC, BE_A, udp_in.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &udp_in, BE_A)]);
    lb.set_clock(CHANGED + GRACE)?;
    send(&lb, &mut stated, "UDP at the grace's end", &udp_end.frame(), tx(SVC, BE_B, udp_end.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &udp_end, BE_B)]);
    lb.set_clock(CLOCK + 4000)?;
    send(
        &lb,
        &mut stated,
        "UDP long after the grace",
        &udp_late.frame(),
        tx(SVC, BE_B, udp_late.flow(true)),
        Pin::Pinned,
    )?;
    want.extend([entry(&lb, &udp_late, BE_B)]);
    // TCP knows no grace: an ACK without a pin is old whenever it comes.
    let old_late = Packet::tcp4(40005, 80);
    send(
        &lb,
        &mut stated,
        "ACK without a pin, long after",
        &old_late.frame(),
        tx(SVC, BE_A, old_late.flow(true)),
        Pin::Pinned,
    )?;
    want.extend([entry(&lb, &old_late, BE_A)]);
    expect_flows(&lb, "UDP and late TCP", &want)?;

    // Every flow pinned so far stays where it went (seen raised to the clock).
    for (name, packet, number) in [
        ("the SYN's ACK", &new_conn, BE_B),
        ("the old connection", &old_conn, BE_A),
        ("the UDP flow of the grace", &udp_in, BE_A),
        ("the UDP flow of the grace's end", &udp_end, BE_B),
    ] {
        send(
            &lb,
            &mut stated,
            &format!("{name}, pinned"),
            &packet.frame(),
            tx(SVC, number, packet.flow(true)),
            Pin::Nothing,
        )?;
        want.extend([entry(&lb, packet, number)]);
    }
    expect_flows(&lb, "pins followed", &want)?;

    // `changed` ahead of the clock (a service stamped after the tick was
    // written, no sweep since): (clock - changed) is computed signed in
    // flows.h, so the grace has not started to run out: unknown UDP is old.
    lb.set_service_entry(SVC, ServiceEntry { changed: lb.config.clock + 5, ..lb.services[SVC as usize] })?;
    let udp_ahead = Packet::udp4(40006, 53);
    send(
        &lb,
        &mut stated,
        "UDP, changed 5 s ahead of the clock",
        &udp_ahead.frame(),
        tx(SVC, BE_A, udp_ahead.flow(true)),
        Pin::Pinned,
    )?;
    want.extend([entry(&lb, &udp_ahead, BE_A)]);
    eprintln!("tracking: with `changed` 5 s ahead of the clock, unknown UDP is inside the grace (signed (clock - changed)): the previous backend");
    // A grace of 0: no UDP flow is old.
    lb.set_service_entry(SVC, ServiceEntry { changed: lb.config.clock, udp_grace: 0, ..lb.services[SVC as usize] })?;
    let udp_zero = Packet::udp4(40007, 53);
    send(&lb, &mut stated, "UDP, grace 0", &udp_zero.frame(), tx(SVC, BE_B, udp_zero.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &udp_zero, BE_B)]);
    expect_flows(&lb, "grace edge cases", &want)?;
    expect_stated(&lb, "transition rules", stated)
}

/// (c) What is a SYN: SYN without ACK (with FIN, RST, PSH, ECE, CWR too);
/// SYN+ACK, RST, FIN+ACK, no flags are not (from before the change: the
/// previous backend); a TCP segment cut before its flags byte (in the frame
/// or by tot_len) is not a SYN; UDP never is (its byte 13 is no flag).
fn tracking_what_is_a_syn() -> TestResult {
    let lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let mut want = Entries::new();
    let cases: [(u8, bool); 9] = [
        (TCP_SYN | TCP_ACK, false),
        (TCP_RST, false),
        (TCP_FIN | TCP_ACK, false),
        (0, false),
        (TCP_SYN | TCP_FIN, true),
        (TCP_SYN | TCP_RST, true),
        (TCP_SYN | TCP_PSH | 0x40 | 0x80, true),
        (TCP_SYN | TCP_ACK | TCP_PSH, false),
        (!TCP_ACK, true),
    ];
    for (i, (flags, is_syn)) in cases.into_iter().enumerate() {
        let packet = Packet { tcp_flags: flags, ..Packet::tcp4(41000 + i as u16, 80) };
        let number = if is_syn { BE_B } else { BE_A };
        send(
            &lb,
            &mut stated,
            &format!("flags {flags:#04x}"),
            &packet.frame(),
            tx(SVC, number, packet.flow(true)),
            Pin::Pinned,
        )?;
        want.extend([entry(&lb, &packet, number)]);
    }
    // SYNs cut: 4..=13 TCP header bytes (no flags byte) in the frame or in the datagram; 14 is whole.
    for tcp_len in 4..=14usize {
        for (how, sport_offset) in [("frame", 0u16), ("datagram", 100)] {
            let packet = syn(Packet::tcp4(42000 + tcp_len as u16 + sport_offset, 80));
            let whole = packet.frame();
            let frame = if how == "frame" {
                datagram_cut(&whole, 20 + tcp_len)
            } else {
                with_tot_len(&whole, (20 + tcp_len) as u16)
            };
            let number = if tcp_len < 14 { BE_A } else { BE_B };
            let what = format!("SYN, {tcp_len} TCP header bytes in the {how}");
            send(&lb, &mut stated, &what, &frame, tx(SVC, number, packet.flow(true)), Pin::Pinned)?;
            want.extend([entry(&lb, &packet, number)]);
        }
    }
    // UDP with 0x02 where TCP's flags would be: UDP within the grace, old.
    let udp = Packet { payload: vec![0x02; 8], ..Packet::udp4(43000, 53) };
    let frame = udp.frame();
    ensure!(frame[ETH_LEN + 20 + 13] == 0x02, "UDP byte 13 is {:#04x}", frame[ETH_LEN + 20 + 13]);
    send(&lb, &mut stated, "UDP, byte 13 = SYN", &frame, tx(SVC, BE_A, udp.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &udp, BE_A)]);
    expect_flows(&lb, "SYN or not", &want)?;
    expect_stated(&lb, "SYN or not", stated)
}

/// (d) A pin that holds wins over the slot's rules: a connection opened
/// during the transition (its SYN pinned it to the current backend) stays
/// there although its later segments are not SYNs. Each packet raises the
/// pin's `seen` to the clock by an atomic add of (clock - seen): forward, and
/// back from a `seen` ahead of the clock (mod 2^32); not at all when equal.
/// A held backend's MAC or weight may change (the same backend).
fn tracking_pin_holds() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    let key = flow_key(&lb, &conn);
    send(&lb, &mut stated, "SYN", &syn(conn.clone()).frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Pinned)?;
    expect_flows(&lb, "SYN pinned", &entries([entry_seen(&lb, &conn, BE_B, CLOCK)]))?;
    for (clock, seen_before) in [(CLOCK, CLOCK), (CLOCK + 5, CLOCK), (CLOCK + 5, CLOCK + 5), (CLOCK + 6, CLOCK + 5)] {
        lb.set_clock(clock)?;
        let what = format!("ACK, clock {clock}, seen {seen_before}");
        let out = send(&lb, &mut stated, &what, &conn.frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Nothing)?;
        ensure!(out[ETH_LEN + 16..ETH_LEN + 20] == [10, 7, 0, 2], "{what}: not to 10.7.0.2");
        expect_flows(&lb, &what, &entries([entry_seen(&lb, &conn, BE_B, clock)]))?;
    }
    // Hand-written `seen`: ahead of the clock, far behind, 0, the largest.
    let pin = FlowPin::to(BE_B, &pin_backend(2), slot_of(&lb, &conn), 0);
    for seen in [CLOCK + 2000, 1, 0, u32::MAX, CLOCK + 7] {
        lb.set_flow(&key, &FlowPin { seen, ..pin })?;
        let what = format!("ACK, clock {}, seen {seen} written by hand", CLOCK + 6);
        send(&lb, &mut stated, &what, &conn.frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Nothing)?;
        expect_flows(&lb, &what, &entries([entry_seen(&lb, &conn, BE_B, CLOCK + 6)]))?;
    }
    // The clock wraps: seen u32::MAX - 1, clock 3.
    lb.set_clock(3)?;
    lb.set_flow(&key, &FlowPin { seen: u32::MAX - 1, ..pin })?;
    send(&lb, &mut stated, "ACK, the clock wrapped", &conn.frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Nothing)?;
    expect_flows(&lb, "the clock wrapped", &entries([entry_seen(&lb, &conn, BE_B, 3)]))?;
    lb.set_clock(CLOCK + 10)?;
    // Another MAC and weight for BE_B: the same backend, the new MAC on the wire.
    lb.set_backend(BE_B, BackendEntry { mac: [0x02, 0xbe, 0x07, 0, 2, 2], weight: 0, ..lb.backends[BE_B as usize] })?;
    let out = send(
        &lb,
        &mut stated,
        "BE_B's MAC and weight changed",
        &conn.frame(),
        tx(SVC, BE_B, conn.flow(true)),
        Pin::Nothing,
    )?;
    ensure!(out[..6] == [0x02, 0xbe, 0x07, 0, 2, 2], "old MAC used");
    // The table moves again (current BE_C, previous still BE_A): the pin holds.
    fill_table(&mut lb, SVC, word(BE_C, BE_A))?;
    send(
        &lb,
        &mut stated,
        "ACK, the slot's current backend now BE_C",
        &conn.frame(),
        tx(SVC, BE_B, conn.flow(true)),
        Pin::Nothing,
    )?;
    // UDP: pinned within the grace, followed after it.
    let udp = Packet::udp4(40001, 53);
    lb.set_clock(CHANGED + 1)?;
    send(&lb, &mut stated, "UDP within the grace", &udp.frame(), tx(SVC, BE_A, udp.flow(true)), Pin::Pinned)?;
    lb.set_clock(CHANGED + GRACE + 100)?;
    send(
        &lb,
        &mut stated,
        "the same UDP flow after the grace",
        &udp.frame(),
        tx(SVC, BE_A, udp.flow(true)),
        Pin::Nothing,
    )?;
    expect_flows(
        &lb,
        "pins held",
        &entries([entry_seen(&lb, &conn, BE_B, CLOCK + 10), entry_seen(&lb, &udp, BE_A, CHANGED + GRACE + 100)]),
    )?;
    expect_stated(&lb, "pins hold", stated)
}

/// (e) A double change: A -> B -> C with A still in the service leaves the
/// slot in transition with current C and previous A (the planner). A
/// connection opened while the slot named B (pinned to B) stays on B, an
/// unpinned ACK goes to A, a SYN to C. Then "consult the pins only"
/// (previous = current = C): the pins still hold, an unpinned ACK goes to C.
fn tracking_double_change() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let on_b = Packet::tcp4(40000, 80);
    let on_a = Packet::tcp4(40001, 80);
    send(
        &lb,
        &mut stated,
        "SYN while the slot names B",
        &syn(on_b.clone()).frame(),
        tx(SVC, BE_B, on_b.flow(true)),
        Pin::Pinned,
    )?;
    send(
        &lb,
        &mut stated,
        "an old connection while the slot names B",
        &on_a.frame(),
        tx(SVC, BE_A, on_a.flow(true)),
        Pin::Pinned,
    )?;
    fill_table(&mut lb, SVC, word(BE_C, BE_A))?;
    lb.set_clock(CLOCK + 1)?;
    let unpinned = Packet::tcp4(40002, 80);
    let new_conn = Packet::tcp4(40003, 80);
    send(&lb, &mut stated, "the connection pinned to B", &on_b.frame(), tx(SVC, BE_B, on_b.flow(true)), Pin::Nothing)?;
    send(&lb, &mut stated, "the connection pinned to A", &on_a.frame(), tx(SVC, BE_A, on_a.flow(true)), Pin::Nothing)?;
    send(&lb, &mut stated, "an unpinned ACK", &unpinned.frame(), tx(SVC, BE_A, unpinned.flow(true)), Pin::Pinned)?;
    send(&lb, &mut stated, "a SYN", &syn(new_conn.clone()).frame(), tx(SVC, BE_C, new_conn.flow(true)), Pin::Pinned)?;
    let mut want = entries([
        entry(&lb, &on_b, BE_B),
        entry(&lb, &on_a, BE_A),
        entry(&lb, &unpinned, BE_A),
        entry(&lb, &new_conn, BE_C),
    ]);
    expect_flows(&lb, "A -> B -> C", &want)?;
    // Previous = current = C: only the pins keep flows elsewhere.
    fill_table(&mut lb, SVC, word(BE_C, BE_C))?;
    lb.set_clock(CLOCK + 2)?;
    let fresh = Packet::tcp4(40004, 80);
    for (name, packet, number) in
        [("pinned to B", &on_b, BE_B), ("pinned to A", &on_a, BE_A), ("pinned to C", &new_conn, BE_C)]
    {
        send(
            &lb,
            &mut stated,
            &format!("pins only: {name}"),
            &packet.frame(),
            tx(SVC, number, packet.flow(true)),
            Pin::Nothing,
        )?;
        want.extend([entry(&lb, packet, number)]);
    }
    send(&lb, &mut stated, "pins only: an unpinned ACK", &fresh.frame(), tx(SVC, BE_C, fresh.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &fresh, BE_C)]);
    expect_flows(&lb, "pins only", &want)?;
    expect_stated(&lb, "double change", stated)
}

/// (f) A previous backend that is not one of the service's (written
/// inactive, moved to another service, never written, the largest number a
/// word holds): flows from before the change go to the current backend (and
/// pin there), ICMP errors too (pinning nothing). Valid again: new old flows
/// go to it; the flows pinned to the current backend meanwhile stay there.
fn tracking_previous_not_in_service() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let mut want = Entries::new();
    let mut port = 40000;
    let mut next = |proto: u8| {
        port += 1;
        if proto == TCP {
            Packet::tcp4(port, 80)
        } else {
            Packet::udp4(port, 53)
        }
    };
    let cases: [(&str, u32, Option<BackendEntry>); 4] = [
        ("A inactive", BE_A, Some(BackendEntry { flags: 0, ..pin_backend(1) })),
        ("A in service 6", BE_A, Some(BackendEntry { service: 6, ..pin_backend(1) })),
        ("previous 3000, never written", 3000, None),
        ("previous 4095, never written", 4095, None),
    ];
    for (name, previous, a) in cases {
        if let Some(a) = a {
            lb.set_backend(BE_A, a)?;
        }
        fill_table(&mut lb, SVC, word(BE_B, previous))?;
        let ack = next(TCP);
        let udp = next(UDP);
        let icmp_about = next(TCP);
        send(&lb, &mut stated, &format!("{name}: ACK"), &ack.frame(), tx(SVC, BE_B, ack.flow(true)), Pin::Pinned)?;
        send(
            &lb,
            &mut stated,
            &format!("{name}: UDP within the grace"),
            &udp.frame(),
            tx(SVC, BE_B, udp.flow(true)),
            Pin::Pinned,
        )?;
        let error = error_of(&icmp_about);
        send(
            &lb,
            &mut stated,
            &format!("{name}: ICMP error"),
            &error.frame(),
            tx(SVC, BE_B, icmp_about.flow(true)),
            Pin::Nothing,
        )?;
        want.extend([entry(&lb, &ack, BE_B), entry(&lb, &udp, BE_B)]);
        lb.set_backend(BE_A, pin_backend(1))?;
        expect_flows(&lb, name, &want)?;
    }
    // A valid again: an old flow goes to it; those pinned to B meanwhile stay.
    fill_table(&mut lb, SVC, word(BE_B, BE_A))?;
    let ack = next(TCP);
    send(&lb, &mut stated, "A back: an unpinned ACK", &ack.frame(), tx(SVC, BE_A, ack.flow(true)), Pin::Pinned)?;
    want.extend([entry(&lb, &ack, BE_A)]);
    let first = Packet::tcp4(40001, 80);
    send(
        &lb,
        &mut stated,
        "A back: the flow pinned to B",
        &first.frame(),
        tx(SVC, BE_B, first.flow(true)),
        Pin::Nothing,
    )?;
    expect_flows(&lb, "A back", &want)?;
    expect_stated(&lb, "previous not in the service", stated)
}

/// (g) A SYN is a new connection whatever its 4-tuple's entry says: over a
/// pin that holds, over one to the slot's current backend, over a stale one
/// (its backend removed) and over one made in another slot, it goes to the
/// current backend and pins again (FLOW_REPINNED).
fn tracking_syn_repins() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    send(&lb, &mut stated, "an old connection", &conn.frame(), tx(SVC, BE_A, conn.flow(true)), Pin::Pinned)?;
    lb.set_clock(CLOCK + 1)?;
    send(
        &lb,
        &mut stated,
        "SYN over a pin that holds (to A)",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_B, conn.flow(true)),
        Pin::Repinned,
    )?;
    expect_flows(&lb, "SYN over a held pin", &entries([entry(&lb, &conn, BE_B)]))?;
    send(&lb, &mut stated, "its ACK", &conn.frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Nothing)?;
    lb.set_clock(CLOCK + 2)?;
    send(
        &lb,
        &mut stated,
        "SYN over a pin to the current backend",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_B, conn.flow(true)),
        Pin::Repinned,
    )?;
    expect_flows(&lb, "SYN over a pin to B", &entries([entry(&lb, &conn, BE_B)]))?;
    // B removed; the slot now names C (previous A).
    lb.set_backend(BE_B, BackendEntry { flags: 0, ..pin_backend(2) })?;
    fill_table(&mut lb, SVC, word(BE_C, BE_A))?;
    lb.set_clock(CLOCK + 3)?;
    send(
        &lb,
        &mut stated,
        "SYN over a stale pin",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_C, conn.flow(true)),
        Pin::Repinned,
    )?;
    expect_flows(&lb, "SYN over a stale pin", &entries([entry(&lb, &conn, BE_C)]))?;
    // A pin to A made in another slot.
    let other_slot = slot_of(&lb, &conn) + 1;
    lb.set_flow(&flow_key(&lb, &conn), &FlowPin::to(BE_A, &pin_backend(1), other_slot, CLOCK))?;
    send(
        &lb,
        &mut stated,
        "SYN over a pin of another slot",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_C, conn.flow(true)),
        Pin::Repinned,
    )?;
    expect_flows(&lb, "SYN over another slot's pin", &entries([entry(&lb, &conn, BE_C)]))?;
    expect_stated(&lb, "SYN re-pins", stated)
}

/// (h) A pin holds only in the slot it was made in: written by hand with
/// the next slot's index, or made before the hash seed changed (the flow now
/// falls in another slot), it is stale: the flow is handled as unpinned (an
/// ACK: the previous backend) and its entry written over (FLOW_REPINNED).
fn tracking_pin_other_slot() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    let key = flow_key(&lb, &conn);
    let slot = slot_of(&lb, &conn);
    for (name, other) in [
        ("the next slot", slot + 1),
        ("the slot before", slot - 1),
        ("the same slot of service 6", slot + MAGLEV_SIZE as u32),
    ] {
        lb.set_flow(&key, &FlowPin::to(BE_C, &pin_backend(3), other, CLOCK - 1))?;
        send(
            &lb,
            &mut stated,
            &format!("a pin to C made in {name}"),
            &conn.frame(),
            tx(SVC, BE_A, conn.flow(true)),
            Pin::Repinned,
        )?;
        expect_flows(&lb, name, &entries([entry(&lb, &conn, BE_A)]))?;
    }
    // The same pin in its own slot holds.
    lb.set_flow(&key, &FlowPin::to(BE_C, &pin_backend(3), slot, CLOCK - 1))?;
    send(
        &lb,
        &mut stated,
        "a pin to C made in this slot",
        &conn.frame(),
        tx(SVC, BE_C, conn.flow(true)),
        Pin::Nothing,
    )?;
    expect_flows(&lb, "its own slot", &entries([entry(&lb, &conn, BE_C)]))?;
    // Another hash seed: the flow falls in another slot, its pin (to C) no longer holds.
    let old_entry = entry(&lb, &conn, BE_C);
    lb.set_config(LbConfig { hash_seed: HASH_SEED ^ 0x0101_0101, ..lb.config.clone() })?;
    ensure!(slot_of(&lb, &conn) != slot, "the new seed puts the flow in the same slot");
    send(
        &lb,
        &mut stated,
        "new seed: the pin of the old slot",
        &conn.frame(),
        tx(SVC, BE_A, conn.flow(true)),
        Pin::Repinned,
    )?;
    let new_entry = entry(&lb, &conn, BE_A);
    ensure!(new_entry.0 == old_entry.0 && new_entry.1 != old_entry.1, "the same key, another value");
    expect_flows(&lb, "new seed", &entries([new_entry]))?;
    expect_stated(&lb, "pins of other slots", stated)
}

/// (i) A pin holds only while its backend number names the backend it was
/// pinned to: the number given to another address (same service), the
/// address under another family byte, the number moved to another service,
/// a number past l4lb_backends' end or never written: stale, the flow is
/// handled as unpinned (an ACK: the previous backend, BE_A) and re-pinned.
fn tracking_backend_number_reused() -> TestResult {
    let mut lb = transition_lb(BE_C, BE_A)?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    let key = flow_key(&lb, &conn);
    let slot = slot_of(&lb, &conn);
    send(
        &lb,
        &mut stated,
        "SYN: pinned to C (10.7.0.3)",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_C, conn.flow(true)),
        Pin::Pinned,
    )?;
    // C's number given to 10.7.0.9 in the same service.
    let reused = BackendEntry::new(Ipv4Addr::new(10, 7, 0, 9).into(), [0x02, 0xbe, 0x07, 0, 0, 9], SVC);
    lb.set_backend(BE_C, reused)?;
    let out = send(
        &lb,
        &mut stated,
        "C's number now 10.7.0.9",
        &conn.frame(),
        tx(SVC, BE_A, conn.flow(true)),
        Pin::Repinned,
    )?;
    ensure!(out[ETH_LEN + 16..ETH_LEN + 20] == [10, 7, 0, 1], "not to the previous backend 10.7.0.1");
    expect_flows(&lb, "re-pinned to A", &entries([entry(&lb, &conn, BE_A)]))?;
    lb.set_backend(BE_C, pin_backend(3))?;
    // Hand-written pins that do not hold; then one that does.
    let stale: [(&str, FlowPin); 5] = [
        ("10.7.0.3 under family 6", FlowPin { family: 6, ..FlowPin::to(BE_C, &pin_backend(3), slot, CLOCK) }),
        ("another address", FlowPin::to(BE_C, &pin_backend(4), slot, CLOCK)),
        ("backend number 5000", FlowPin { backend: 5000, ..FlowPin::to(BE_C, &pin_backend(3), slot, CLOCK) }),
        ("backend number 3000, never written", FlowPin { addr: [0; 16], backend: 3000, slot, seen: CLOCK, family: 0 }),
        ("backend B moved to service 6", FlowPin::to(BE_B, &pin_backend(2), slot, CLOCK)),
    ];
    lb.set_backend(BE_B, BackendEntry { service: 6, ..pin_backend(2) })?;
    for (name, pin) in stale {
        lb.set_flow(&key, &pin)?;
        send(
            &lb,
            &mut stated,
            &format!("hand-written pin: {name}"),
            &conn.frame(),
            tx(SVC, BE_A, conn.flow(true)),
            Pin::Repinned,
        )?;
        expect_flows(&lb, name, &entries([entry(&lb, &conn, BE_A)]))?;
    }
    lb.set_backend(BE_B, pin_backend(2))?;
    lb.set_flow(&key, &FlowPin::to(BE_B, &pin_backend(2), slot, 7))?;
    send(
        &lb,
        &mut stated,
        "hand-written pin to B that holds",
        &conn.frame(),
        tx(SVC, BE_B, conn.flow(true)),
        Pin::Nothing,
    )?;
    expect_flows(&lb, "held", &entries([entry(&lb, &conn, BE_B)]))?;
    expect_stated(&lb, "numbers reused", stated)
}

/// Loaded with IPv6 backends (2001:db8:be:8::i, numbers BE_A..BE_C) for
/// SVC, every slot `word`; VIP4:80/tcp, VIP4:53/udp, VIP6:80/tcp,
/// VIP6:53/udp and their fragment entries.
fn transition_lb6(word: u32) -> Result<Lb, Failed> {
    let mut lb = Lb::load(false)?;
    lb.set_config(LbConfig { clock: CLOCK, ..base_config() })?;
    let be = |i: u16| {
        BackendEntry::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 8, 0, 0, 0, i).into(),
            [0x02, 0xbe, 0x86, 0, 0, i as u8],
            SVC,
        )
    };
    add_service(&mut lb, SVC, &[(BE_A, be(1)), (BE_B, be(2)), (BE_C, be(3))], true)?;
    lb.set_service_entry(SVC, svc_entry(lb.services[SVC as usize].flags | L4LB_SERVICE_TRACK_FLOWS))?;
    fill_table(&mut lb, SVC, word)?;
    let vips = [
        (IpAddr::from(VIP4), TCP, 80u16, SVC),
        (VIP4.into(), UDP, 53, SVC),
        (VIP6.into(), TCP, 80, SVC),
        (VIP6.into(), UDP, 53, SVC),
    ];
    for &(addr, proto, port, service) in &vips {
        lb.add_vip(VipKey::new(addr, proto, port), service)?;
    }
    add_fragment_entries(&mut lb, &vips)?;
    Ok(lb)
}

/// (j) Fragments are keyed without ports and follow their protocol's rule:
/// a TCP fragment is never a SYN (its flags are not parsed), so it goes to
/// the previous backend and pins there, even a first fragment with SYN set;
/// the later fragments follow the pin. UDP fragments: the previous backend
/// within the grace, the current one after it. The same addresses
/// unfragmented are another flow (with ports); an atomic IPv6 fragment is a
/// whole packet. IPv4 and IPv6.
fn tracking_fragments() -> TestResult {
    let mut lb = transition_lb6(word(BE_B, BE_A))?;
    let mut stated = Stated::default();
    let mut want = Entries::new();
    let tcp4 = Packet::tcp4(40000, 80);
    let first4 = Packet { mf: true, tcp_flags: TCP_SYN, ..tcp4.clone() };
    let later4 = Packet { frag_offset: 5, payload: vec![0xf2; 24], ..tcp4.clone() };
    let tcp6 = Packet::tcp6(40001, 80);
    let first6 = Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], tcp_flags: TCP_SYN, ..tcp6.clone() };
    let later6 = Packet { ext: vec![Ext::Fragment { offset: 9, more: false }], payload: vec![0xf3; 5], ..tcp6.clone() };
    for (name, first, later) in [("IPv4", &first4, &later4), ("IPv6", &first6, &later6)] {
        send(
            &lb,
            &mut stated,
            &format!("{name} TCP first fragment (SYN set)"),
            &first.frame(),
            tx(SVC, BE_A, first.flow(true)),
            Pin::Pinned,
        )?;
        want.extend([entry(&lb, first, BE_A)]);
        ensure!(key_of(&lb, first)[32..36] == [0, 0, 0, 0], "{name}: a fragment's key has ports");
        send(
            &lb,
            &mut stated,
            &format!("{name} TCP later fragment"),
            &later.frame(),
            tx(SVC, BE_A, later.flow(true)),
            Pin::Nothing,
        )?;
    }
    // Unfragmented SYNs of the same addresses and ports: their own flows.
    for packet in [&tcp4, &tcp6] {
        send(
            &lb,
            &mut stated,
            "whole SYN",
            &syn(packet.clone()).frame(),
            tx(SVC, BE_B, packet.flow(true)),
            Pin::Pinned,
        )?;
        want.extend([entry(&lb, packet, BE_B)]);
    }
    expect_flows(&lb, "TCP fragments", &want)?;
    // UDP, within the grace and after it.
    let udp4 = Packet::udp4(40002, 53);
    let udp6 = Packet::udp6(40003, 53);
    for (when, clock, number) in [("within the grace", CLOCK, BE_A), ("after the grace", CHANGED + GRACE, BE_B)] {
        lb.set_clock(clock)?;
        let client = if clock == CLOCK { 1 } else { 2 };
        let u4 = Packet { src: Ipv4Addr::new(198, 51, 100, client).into(), ..udp4.clone() };
        let u6 =
            Packet { src: Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, u16::from(client)).into(), ..udp6.clone() };
        let first4 = Packet { mf: true, ..u4.clone() };
        let later4 = Packet { frag_offset: 3, payload: vec![0xf4; 8], ..u4.clone() };
        let first6 = Packet { ext: vec![Ext::Fragment { offset: 0, more: true }], ..u6.clone() };
        let later6 =
            Packet { ext: vec![Ext::Fragment { offset: 2, more: false }], payload: vec![0xf5; 8], ..u6.clone() };
        for (name, first, later) in [("IPv4", &first4, &later4), ("IPv6", &first6, &later6)] {
            send(
                &lb,
                &mut stated,
                &format!("{name} UDP first fragment, {when}"),
                &first.frame(),
                tx(SVC, number, first.flow(true)),
                Pin::Pinned,
            )?;
            want.extend([entry(&lb, first, number)]);
            send(
                &lb,
                &mut stated,
                &format!("{name} UDP later fragment, {when}"),
                &later.frame(),
                tx(SVC, number, later.flow(true)),
                Pin::Nothing,
            )?;
        }
        // An atomic IPv6 fragment (offset 0, no M bit) is a whole datagram: keyed with ports.
        let atomic = Packet { ext: vec![Ext::Fragment { offset: 0, more: false }], ..u6.clone() };
        send(
            &lb,
            &mut stated,
            &format!("IPv6 atomic fragment, {when}"),
            &atomic.frame(),
            tx(SVC, number, atomic.flow(true)),
            Pin::Pinned,
        )?;
        want.extend([entry(&lb, &atomic, number)]);
        ensure!(key_of(&lb, &atomic)[32..36] != [0, 0, 0, 0], "an atomic fragment's key has no ports");
    }
    expect_flows(&lb, "UDP fragments", &want)?;
    expect_stated(&lb, "fragments", stated)
}

/// (k) ICMP errors about a flow in a slot in transition follow its pin
/// (raising its `seen`), else the rules (TCP: the previous backend; UDP: the
/// previous one within the grace, the current one after it; the current one
/// when the previous is not in the service), and never write an entry:
/// neither a new one nor over a stale one.
fn tracking_icmp_errors() -> TestResult {
    let mut lb = transition_lb6(word(BE_B, BE_A))?;
    let mut stated = Stated::default();
    let flows = [Packet::tcp4(40000, 80), Packet::udp4(40001, 53), Packet::tcp6(40002, 80), Packet::udp6(40003, 53)];
    let mut want = Entries::new();
    // The TCP connections are opened now (SYN: pinned to B); the UDP flows
    // are old (within the grace: pinned to A).
    let pinned_to = |packet: &Packet| if packet.proto == TCP { BE_B } else { BE_A };
    for flow in &flows {
        let first = if flow.proto == TCP { syn(flow.clone()) } else { flow.clone() };
        send(&lb, &mut stated, "pins", &first.frame(), tx(SVC, pinned_to(flow), flow.flow(true)), Pin::Pinned)?;
    }
    lb.set_clock(CLOCK + 3)?;
    for flow in &flows {
        let what = format!("ICMP error about pinned {:?}", flow.flow(true));
        send(
            &lb,
            &mut stated,
            &what,
            &error_of(flow).frame(),
            tx(SVC, pinned_to(flow), flow.flow(true)),
            Pin::Nothing,
        )?;
        want.extend([entry(&lb, flow, pinned_to(flow))]);
    }
    expect_flows(&lb, "errors followed the pins, seen raised", &want)?;
    // Unpinned flows (another client port), within the grace and after it.
    for (when, clock) in [("within the grace", CLOCK + 3), ("after the grace", CHANGED + GRACE)] {
        lb.set_clock(clock)?;
        for flow in &flows {
            let unpinned = Packet { sport: flow.sport + 1000, ..flow.clone() };
            let number = if flow.proto == UDP && clock >= CHANGED + GRACE { BE_B } else { BE_A };
            let what = format!("ICMP error about unpinned {:?}, {when}", unpinned.flow(true));
            send(
                &lb,
                &mut stated,
                &what,
                &error_of(&unpinned).frame(),
                tx(SVC, number, unpinned.flow(true)),
                Pin::Nothing,
            )?;
        }
    }
    eprintln!(
        "tracking: an ICMP error about an unpinned flow follows the flow's rule by the quoted protocol: \
         UDP after the grace goes to the current backend (docs/transitions.md of b29456a, rule 3, said the previous one)"
    );
    expect_flows(&lb, "no entry for unpinned flows", &want)?;
    // B removed: the TCP pins are stale; their errors take the previous backend and re-pin nothing.
    lb.set_backend(BE_B, BackendEntry { flags: 0, ..lb.backends[BE_B as usize] })?;
    for flow in flows.iter().filter(|f| f.proto == TCP) {
        let what = format!("ICMP error about stale {:?}", flow.flow(true));
        send(&lb, &mut stated, &what, &error_of(flow).frame(), tx(SVC, BE_A, flow.flow(true)), Pin::Nothing)?;
    }
    // A not in the service either: the current backend, inactive: dropped.
    lb.set_backend(BE_A, BackendEntry { flags: 0, ..lb.backends[BE_A as usize] })?;
    let flow = &flows[0];
    send(
        &lb,
        &mut stated,
        "ICMP error, previous and current inactive",
        &error_of(flow).frame(),
        Want::Drop(L4LB_CNT_DROP_NO_BACKEND),
        Pin::Nothing,
    )?;
    expect_flows(&lb, "stale pins left as they were", &want)?;
    expect_stated(&lb, "ICMP errors", stated)
}

/// The loaded l4lb_flows is a `map_type` map of `entries`.
fn expect_flow_table(lb: &Lb, map_type: MapType, entries: u32) -> TestResult {
    let flows = lb.maps().l4lb_flows;
    ensure!(
        flows.map_type() == map_type && flows.max_entries() == entries,
        "l4lb_flows is {:?} of {}, want {map_type:?} of {entries}",
        flows.map_type(),
        flows.max_entries()
    );
    Ok(())
}

/// (l) The object's flow table (a HASH map of L4LB_FLOW_ENTRIES, as
/// iproute2 and offload load it) filled by the host with pins of other
/// clients: a new flow is refused (FLOW_TABLE_FULL) and still goes where its
/// rule says (an ACK to the previous backend, a SYN to the current one, UDP
/// after the grace to the current one); pins there still hold; an existing
/// entry is still written over (a SYN, a stale pin); a deleted entry makes
/// room again.
fn tracking_table_full() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    expect_flow_table(&lb, MapType::Hash, L4LB_FLOW_ENTRIES)?;
    let mut stated = Stated::default();
    // Four flows of the case pinned by packets, the rest filled by the host.
    let flows: Vec<Packet> = (0..4).map(|i| Packet::tcp4(40000 + i, 80)).collect();
    for flow in &flows {
        send(
            &lb,
            &mut stated,
            &format!("flow {}", flow.sport),
            &flow.frame(),
            tx(SVC, BE_A, flow.flow(true)),
            Pin::Pinned,
        )?;
    }
    let fill = L4LB_FLOW_ENTRIES as usize - flows.len();
    let filler: Vec<(FlowKey, FlowPin)> = (0..fill)
        .map(|i| {
            let client = Ipv4Addr::new(100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            (
                FlowKey::new(client.into(), VIP4.into(), TCP, 1024, 80),
                FlowPin::to(BE_C, &pin_backend(3), SVC * MAGLEV_SIZE as u32, 1),
            )
        })
        .collect();
    let keys: Vec<u8> = filler.iter().flat_map(|(k, _)| k.bytes()).collect();
    let values: Vec<u8> = filler.iter().flat_map(|(_, p)| p.bytes()).collect();
    lb.maps().l4lb_flows.update_batch(
        &keys,
        &values,
        fill as u32,
        libbpf_rs::MapFlags::ANY,
        libbpf_rs::MapFlags::ANY,
    )?;
    lb.flows.borrow_mut().extend(filler);
    lb.compare_flows().map_err(fail)?;
    ensure!(lb.read_flows()?.len() == L4LB_FLOW_ENTRIES as usize, "the map is not full");

    let ack = Packet::tcp4(41000, 80);
    let syn_new = Packet::tcp4(41001, 80);
    let udp_new = Packet::udp4(41002, 53);
    send(&lb, &mut stated, "ACK of a new flow, table full", &ack.frame(), tx(SVC, BE_A, ack.flow(true)), Pin::Full)?;
    send(&lb, &mut stated, "the same ACK again", &ack.frame(), tx(SVC, BE_A, ack.flow(true)), Pin::Full)?;
    send(
        &lb,
        &mut stated,
        "SYN of a new flow, table full",
        &syn(syn_new.clone()).frame(),
        tx(SVC, BE_B, syn_new.flow(true)),
        Pin::Full,
    )?;
    send(
        &lb,
        &mut stated,
        "UDP within the grace, table full",
        &udp_new.frame(),
        tx(SVC, BE_A, udp_new.flow(true)),
        Pin::Full,
    )?;
    lb.set_clock(CHANGED + GRACE + 1)?;
    send(
        &lb,
        &mut stated,
        "UDP after the grace, table full",
        &udp_new.frame(),
        tx(SVC, BE_B, udp_new.flow(true)),
        Pin::Full,
    )?;
    send(
        &lb,
        &mut stated,
        "ICMP error, table full",
        &error_of(&ack).frame(),
        tx(SVC, BE_A, ack.flow(true)),
        Pin::Nothing,
    )?;
    // Pins hold, full or not; entries are written over.
    send(&lb, &mut stated, "flow 40000 held", &flows[0].frame(), tx(SVC, BE_A, flows[0].flow(true)), Pin::Nothing)?;
    send(
        &lb,
        &mut stated,
        "SYN over an entry, table full",
        &syn(flows[1].clone()).frame(),
        tx(SVC, BE_B, flows[1].flow(true)),
        Pin::Repinned,
    )?;
    lb.set_flow(&flow_key(&lb, &flows[2]), &FlowPin::to(BE_A, &pin_backend(1), slot_of(&lb, &flows[2]) + 1, 1))?;
    send(
        &lb,
        &mut stated,
        "a pin of another slot, table full",
        &flows[2].frame(),
        tx(SVC, BE_A, flows[2].flow(true)),
        Pin::Repinned,
    )?;
    // The host deletes one: room for one more, then full again.
    lb.delete_flow(&flow_key(&lb, &flows[3]))?;
    send(&lb, &mut stated, "ACK, room again", &ack.frame(), tx(SVC, BE_A, ack.flow(true)), Pin::Pinned)?;
    send(
        &lb,
        &mut stated,
        "SYN, full again",
        &syn(syn_new.clone()).frame(),
        tx(SVC, BE_B, syn_new.flow(true)),
        Pin::Full,
    )?;
    // The case's entries, all last seen at the clock (flow 40003's deleted).
    let case = entries([
        entry(&lb, &flows[0], BE_A),
        entry(&lb, &flows[1], BE_B),
        entry(&lb, &flows[2], BE_A),
        entry(&lb, &ack, BE_A),
    ]);
    let got = lb.read_flows()?;
    ensure!(got.len() == L4LB_FLOW_ENTRIES as usize, "{} entries, expected a full map", got.len());
    for (key, value) in &case {
        ensure!(
            got.get(key) == Some(value),
            "entry {}: {:?}, expected {}",
            common::hex(key),
            got.get(key).map(|v| common::hex(v)),
            common::hex(value)
        );
    }
    expect_stated(&lb, "table full", stated)
}

/// (m) l4lb_flows switched to an LRU hash before loading (as `l4lb attach`
/// does in driver and generic mode): the same rules (the map is kept far
/// below its size: which pin an LRU map would evict is not modelled).
fn tracking_lru() -> TestResult {
    let mut lb = pin_lb_with(FlowTable { lru: true, entries: 4096 })?;
    fill_table(&mut lb, SVC, word(BE_B, BE_A))?;
    expect_flow_table(&lb, MapType::LruHash, 4096)?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    let old = Packet::tcp4(40001, 80);
    let fragment = Packet { frag_offset: 3, ..Packet::udp4(40002, 53) };
    send(&lb, &mut stated, "LRU: SYN", &syn(conn.clone()).frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Pinned)?;
    send(&lb, &mut stated, "LRU: old ACK", &old.frame(), tx(SVC, BE_A, old.flow(true)), Pin::Pinned)?;
    send(&lb, &mut stated, "LRU: UDP fragment", &fragment.frame(), tx(SVC, BE_A, fragment.flow(true)), Pin::Pinned)?;
    lb.set_clock(CLOCK + 9)?;
    send(&lb, &mut stated, "LRU: held", &conn.frame(), tx(SVC, BE_B, conn.flow(true)), Pin::Nothing)?;
    lb.set_backend(BE_A, BackendEntry { flags: 0, ..pin_backend(1) })?;
    send(&lb, &mut stated, "LRU: stale, previous gone", &old.frame(), tx(SVC, BE_B, old.flow(true)), Pin::Repinned)?;
    lb.set_backend(BE_A, pin_backend(1))?;
    fill_table(&mut lb, SVC, word(BE_C, BE_A))?;
    send(
        &lb,
        &mut stated,
        "LRU: SYN over a pin",
        &syn(conn.clone()).frame(),
        tx(SVC, BE_C, conn.flow(true)),
        Pin::Repinned,
    )?;
    send(&lb, &mut stated, "LRU: ICMP error", &error_of(&conn).frame(), tx(SVC, BE_C, conn.flow(true)), Pin::Nothing)?;
    let mut want = entries([entry(&lb, &conn, BE_C), entry(&lb, &old, BE_B), entry_seen(&lb, &fragment, BE_A, CLOCK)]);
    expect_flows(&lb, "LRU", &want)?;
    // 500 more old flows: all pinned, none evicted below the map's size.
    for i in 0..500u16 {
        let packet = Packet { src: Ipv4Addr::new(198, 51, 101, (i % 250) as u8).into(), ..Packet::tcp4(10000 + i, 80) };
        send(
            &lb,
            &mut stated,
            &format!("LRU: flow {i}"),
            &packet.frame(),
            tx(SVC, BE_A, packet.flow(true)),
            Pin::Pinned,
        )?;
        want.extend([entry(&lb, &packet, BE_A)]);
    }
    expect_flows(&lb, "LRU: 503 flows", &want)?;
    expect_stated(&lb, "LRU", stated)
}

/// (n) Too big once encapsulated: answered (DF) or dropped (no DF), not
/// sent to a backend, yet pinned like any packet of a slot in transition
/// (the pin comes before the MTU check): an old ACK to the previous backend,
/// old UDP too, a SYN to the current one; the flows' next, smaller packets
/// follow those pins.
fn tracking_too_big() -> TestResult {
    let mut lb = transition_lb(BE_B, BE_A)?;
    let mut config = lb.config.clone();
    config.mtu = 1000;
    lb.set_config(config)?;
    let mut stated = Stated::default();
    let answered = Packet::tcp4(40000, 80).sized(1000 - 20 + 1);
    let dropped = Packet { df: false, ..Packet::udp4(40001, 53) }.sized(1000 - 20 + 1);
    let syn_big = Packet { tcp_flags: TCP_SYN, ..Packet::tcp4(40002, 80) }.sized(1000 - 20 + 1);
    send(
        &lb,
        &mut stated,
        "too big ACK, DF: answered",
        &answered.frame(),
        too_big_want(&answered, 1000, 20),
        Pin::Pinned,
    )?;
    send(
        &lb,
        &mut stated,
        "too big UDP, no DF: dropped",
        &dropped.frame(),
        too_big_want(&dropped, 1000, 20),
        Pin::Pinned,
    )?;
    send(&lb, &mut stated, "too big SYN: answered", &syn_big.frame(), too_big_want(&syn_big, 1000, 20), Pin::Pinned)?;
    let want = entries([entry(&lb, &answered, BE_A), entry(&lb, &dropped, BE_A), entry(&lb, &syn_big, BE_B)]);
    expect_flows(&lb, "too big", &want)?;
    lb.set_clock(CHANGED + GRACE + 5)?;
    for (packet, number) in [(&answered, BE_A), (&dropped, BE_A), (&syn_big, BE_B)] {
        let small = Packet { payload: Vec::new(), tcp_flags: TCP_ACK, ..packet.clone() };
        let what = format!("the flow of port {} again, small", packet.sport);
        send(&lb, &mut stated, &what, &small.frame(), tx(SVC, number, small.flow(true)), Pin::Nothing)?;
    }
    expect_stated(&lb, "too big", stated)
}

/// (o) IPv6 clients with IPv6 backends (16-byte addresses in key and value,
/// family 6), and IPv4 clients with IPv6 backends (an IPv4 key, an IPv6 pin).
fn tracking_ipv6() -> TestResult {
    let lb = transition_lb6(word(BE_B, BE_A))?;
    let mut stated = Stated::default();
    let tcp6 = Packet::tcp6(40000, 80);
    let udp6 = Packet::udp6(40001, 53);
    let tcp4 = Packet::tcp4(40002, 80);
    for (name, packet) in [("6in6 TCP", &tcp6), ("6in6 UDP", &udp6), ("4in6 TCP", &tcp4)] {
        send(&lb, &mut stated, name, &packet.frame(), tx(SVC, BE_A, packet.flow(true)), Pin::Pinned)?;
    }
    let slot = slot_of(&lb, &tcp6);
    let be_a: Vec<u8> = [
        &[0x20, 0x01, 0x0d, 0xb8, 0x00, 0xbe, 0x00, 0x08, 0, 0, 0, 0, 0, 0, 0, 1][..],
        &BE_A.to_ne_bytes(),
        &slot.to_ne_bytes(),
        &CLOCK.to_ne_bytes(),
        &[6, 0, 0, 0],
    ]
    .concat();
    let key6: Vec<u8> = [
        &CLIENT6.octets()[..],
        &[0x20, 0x01, 0x0d, 0xb8, 0x00, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
        &[0x9c, 0x40, 0, 80, 6, 6, 0, 0],
    ]
    .concat();
    ensure!(entry(&lb, &tcp6, BE_A) == (key6, be_a), "the IPv6 entry is spelled {:?}", entry(&lb, &tcp6, BE_A));
    let other = Packet { src: Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 8).into(), ..tcp6.clone() };
    send(
        &lb,
        &mut stated,
        "another IPv6 client, SYN",
        &syn(other.clone()).frame(),
        tx(SVC, BE_B, other.flow(true)),
        Pin::Pinned,
    )?;
    let want =
        entries([entry(&lb, &tcp6, BE_A), entry(&lb, &udp6, BE_A), entry(&lb, &tcp4, BE_A), entry(&lb, &other, BE_B)]);
    expect_flows(&lb, "IPv6", &want)?;
    expect_stated(&lb, "IPv6", stated)
}

/// (p) UDP services that do not hash ports key a client's flow with ports
/// 0: its datagrams from every port share one entry (and one slot).
fn tracking_udp_ports() -> TestResult {
    let mut lb = pin_lb()?;
    let mut stated = Stated::default();
    // Service 6: VIP4:5353/udp, not hashing ports, backends 60 and 61, in transition (current 61, previous 60).
    let other = 6;
    let be = |i: u8| BackendEntry::new(Ipv4Addr::new(10, 7, 6, i).into(), [0x02, 0xbe, 0x07, 6, 0, i], other);
    add_service(&mut lb, other, &[(60, be(1)), (61, be(2))], false)?;
    lb.set_service_entry(other, svc_entry(lb.services[other as usize].flags | L4LB_SERVICE_TRACK_FLOWS))?;
    fill_table(&mut lb, other, word(61, 60))?;
    lb.add_vip(VipKey::new(VIP4.into(), UDP, 5353), other)?;
    let first = Packet::udp4(50000, 5353);
    let second = Packet::udp4(50001, 5353);
    send(
        &lb,
        &mut stated,
        "no hash_ports, port 50000, within the grace",
        &first.frame(),
        tx(other, 60, first.flow(false)),
        Pin::Pinned,
    )?;
    lb.set_clock(CHANGED + GRACE + 1)?;
    send(
        &lb,
        &mut stated,
        "no hash_ports, port 50001, after the grace",
        &second.frame(),
        tx(other, 60, second.flow(false)),
        Pin::Nothing,
    )?;
    let slot = lb.table_index(other, &first.flow(false));
    ensure!(slot == lb.table_index(other, &second.flow(false)), "two slots for one client");
    let shared = (
        key_bytes(first.src, first.dst, 0, 0, UDP),
        pin_bytes(Ipv4Addr::new(10, 7, 6, 1).into(), 60, slot, lb.config.clock),
    );
    let client2 = Packet { src: Ipv4Addr::new(198, 51, 100, 9).into(), ..first.clone() };
    send(
        &lb,
        &mut stated,
        "no hash_ports, another client after the grace",
        &client2.frame(),
        tx(other, 61, client2.flow(false)),
        Pin::Pinned,
    )?;
    let slot2 = lb.table_index(other, &client2.flow(false));
    let client2_entry = (
        key_bytes(client2.src, client2.dst, 0, 0, UDP),
        pin_bytes(Ipv4Addr::new(10, 7, 6, 2).into(), 61, slot2, lb.config.clock),
    );
    expect_flows(&lb, "ports 0", &entries([shared, client2_entry]))?;
    expect_stated(&lb, "UDP ports", stated)
}

/// (q) The empty word drops every packet (DROP_NO_BACKEND), reading and
/// writing no pin. Words the host does not write, as the datapath reads
/// them: the largest steady number (past l4lb_backends: dropped, no state);
/// a word in transition whose current backend is inactive (the pin is
/// written before the backend is checked: FLOW_PINNED, then dropped) or past
/// l4lb_backends (FLOW_TABLE_FULL counted, no entry, dropped); and one above
/// 0xffff without bit 31 (the datapath tests "above 0xffff", not the bit).
fn tracking_empty_and_odd_words() -> TestResult {
    let mut lb = pin_lb()?;
    let mut stated = Stated::default();
    let conn = Packet::tcp4(40000, 80);
    let udp = Packet::udp4(40001, 53);
    lb.set_flow(&flow_key(&lb, &conn), &FlowPin::to(BE_A, &pin_backend(1), slot_of(&lb, &conn), 7))?;
    let kept = entry_seen(&lb, &conn, BE_A, 7);
    for (name, w) in [
        ("the empty word", SLOT_EMPTY),
        ("steady 0xffff", 0xffff),
        ("steady MAX_BACKENDS", MAX_BACKENDS as u32),
        ("steady 0x00140015 (no TRANSITION bit)", 0x0014_0015),
    ] {
        fill_table(&mut lb, SVC, w)?;
        for (kind, packet) in
            [("SYN", syn(conn.clone())), ("ACK", conn.clone()), ("UDP", udp.clone()), ("ICMP error", error_of(&conn))]
        {
            let what = format!("{name}: {kind}");
            send(&lb, &mut stated, &what, &packet.frame(), Want::Drop(L4LB_CNT_DROP_NO_BACKEND), Pin::Nothing)?;
        }
    }
    expect_flows(&lb, "empty and out-of-range words", &entries([kept.clone()]))?;
    // Current backend inactive: SYNs are dropped and pin nothing (a pin goes
    // only to a backend the frame can go to).
    lb.set_backend(BE_B, BackendEntry { flags: 0, ..pin_backend(2) })?;
    fill_table(&mut lb, SVC, word(BE_B, BE_A))?;
    let new_conn = Packet::tcp4(40002, 80);
    send(
        &lb,
        &mut stated,
        "current inactive: SYN",
        &syn(new_conn.clone()).frame(),
        Want::Drop(L4LB_CNT_DROP_NO_BACKEND),
        Pin::Nothing,
    )?;
    send(
        &lb,
        &mut stated,
        "current inactive: ACK of a pinned flow",
        &conn.frame(),
        tx(SVC, BE_A, conn.flow(true)),
        Pin::Nothing,
    )?;
    expect_flows(&lb, "no pin to the inactive current backend", &entries([entry(&lb, &conn, BE_A)]))?;
    lb.set_backend(BE_B, pin_backend(2))?;
    // Current backend MAX_BACKENDS (past l4lb_backends), previous A.
    fill_table(&mut lb, SVC, word(MAX_BACKENDS as u32, BE_A))?;
    let fresh = Packet::tcp4(40003, 80);
    send(
        &lb,
        &mut stated,
        "current MAX_BACKENDS: SYN",
        &syn(fresh.clone()).frame(),
        Want::Drop(L4LB_CNT_DROP_NO_BACKEND),
        Pin::Nothing,
    )?;
    send(
        &lb,
        &mut stated,
        "current MAX_BACKENDS: an old ACK",
        &fresh.frame(),
        tx(SVC, BE_A, fresh.flow(true)),
        Pin::Pinned,
    )?;
    // The TRANSITION bit with current 21 (B), previous 20 (A).
    fill_table(&mut lb, SVC, word(BE_B, BE_A))?;
    let odd = Packet::tcp4(40004, 80);
    send(&lb, &mut stated, "in transition: an old ACK", &odd.frame(), tx(SVC, BE_A, odd.flow(true)), Pin::Pinned)?;
    let odd_syn = syn(Packet::tcp4(40005, 80));
    send(&lb, &mut stated, "in transition: a SYN", &odd_syn.frame(), tx(SVC, BE_B, odd_syn.flow(true)), Pin::Pinned)?;
    expect_stated(&lb, "empty and odd words", stated)
}

/// Loaded as `pin_lb`, SVC's table the words a tracked apply writes when
/// BE_C is drained (weight 0, still in the service): Maglev over A, B, C
/// before, over A, B after, each slot through `transition::next_slot` (the
/// planner's rule): C's slots in transition with previous C, the slots
/// Maglev moved between A and B in transition too, the others steady.
fn drained_lb(before: &[u32], after: &[u32]) -> Result<Lb, Failed> {
    let mut lb = pin_lb()?;
    let words: Vec<u32> = before
        .iter()
        .zip(after)
        .map(|(&old, &new)| {
            l4lb::transition::next_slot(l4lb::transition::Slot::Steady(old), new, |n| [BE_A, BE_B, BE_C].contains(&n))
                .encode()
        })
        .collect();
    lb.set_table(SVC, &words)?;
    Ok(lb)
}

/// Maglev's tables over (number, backend) pairs.
fn maglev_numbers(numbered: &[(u32, BackendEntry)]) -> Result<Vec<u32>, Failed> {
    let identities: Vec<maglev::Backend> =
        numbered.iter().map(|(_, b)| maglev::Backend::from_addr(b.ip(), b.weight)).collect();
    let indices = maglev::populate(&identities, MAGLEV_SIZE).map_err(|e| fail(format!("maglev: {e}")))?;
    Ok(maglev::to_numbers(&indices, &numbered.iter().map(|(n, _)| *n).collect::<Vec<_>>()))
}

/// (r) Two balancers agree: two programs loaded with the same configuration
/// and the same slot words (a drain of BE_C, as the planner writes it). An
/// established connection (an ACK) that only the second balancer ever sees
/// reaches the same backend there as on the first: its slot's previous
/// backend, a function of the configuration alone. A connection opened
/// during the transition is pinned on the balancer that saw its SYN only:
/// moved by ECMP to the other one, its ACK goes to the previous backend
/// there (the documented cost, docs/transitions.md "Why these rules"). Once
/// the transition has ended (steady words) both send it to the current one.
fn tracking_two_balancers_agree() -> TestResult {
    with_rng(|rng| {
        let all = [(BE_A, pin_backend(1)), (BE_B, pin_backend(2)), (BE_C, pin_backend(3))];
        let before = maglev_numbers(&all)?;
        let after = maglev_numbers(&all[..2])?;
        let lb1 = drained_lb(&before, &after)?;
        let lb2 = drained_lb(&before, &after)?;
        ensure!(lb1.tables[SVC as usize] == lb2.tables[SVC as usize], "the two balancers' words differ");
        let words = lb1.tables[SVC as usize].clone().unwrap_or_default();
        let in_transition = words.iter().filter(|&&w| matches!(SlotWord::of(w), SlotWord::Transition { .. })).count();
        let from_c = words
            .iter()
            .filter(|&&w| matches!(SlotWord::of(w), SlotWord::Transition { previous, .. } if previous == BE_C))
            .count();
        ensure!(from_c > 0 && in_transition >= from_c, "{in_transition} slots in transition, {from_c} from C");
        let (mut s1, mut s2) = (Stated::default(), Stated::default());
        let (mut want1, mut want2) = (Entries::new(), Entries::new());

        // Established connections: random clients until 30 fall in slots in transition and 10 in steady ones.
        let (mut moved, mut steady) = (0, 0);
        while moved < 30 || steady < 10 {
            let conn =
                Packet { src: Ipv4Addr::from(rng.gen::<u32>()).into(), ..Packet::tcp4(rng.gen_range(1024..65535), 80) };
            let flow = conn.flow(true);
            match SlotWord::of(lb1.predict(SVC, &flow)) {
                SlotWord::Transition { previous, .. } if moved < 30 => {
                    moved += 1;
                    let what = format!("an established connection {flow:?}");
                    let out2 = send(
                        &lb2,
                        &mut s2,
                        &format!("{what}, seen by balancer 2 only"),
                        &conn.frame(),
                        tx(SVC, previous, flow),
                        Pin::Pinned,
                    )?;
                    let out1 = send(
                        &lb1,
                        &mut s1,
                        &format!("{what}, on balancer 1"),
                        &conn.frame(),
                        tx(SVC, previous, flow),
                        Pin::Pinned,
                    )?;
                    ensure!(out1 == out2, "{what}: the balancers' frames differ");
                    want1.extend([entry(&lb1, &conn, previous)]);
                    want2.extend([entry(&lb2, &conn, previous)]);
                }
                SlotWord::Steady(number) if steady < 10 => {
                    steady += 1;
                    let what = format!("a connection in a steady slot {flow:?}");
                    send(
                        &lb2,
                        &mut s2,
                        &format!("{what}, balancer 2"),
                        &conn.frame(),
                        tx(SVC, number, flow),
                        Pin::Nothing,
                    )?;
                    send(
                        &lb1,
                        &mut s1,
                        &format!("{what}, balancer 1"),
                        &conn.frame(),
                        tx(SVC, number, flow),
                        Pin::Nothing,
                    )?;
                }
                _ => {}
            }
        }
        expect_flows(&lb1, "balancer 1", &want1)?;
        expect_flows(&lb2, "balancer 2", &want2)?;

        // Connections opened during the transition on balancer 1, moved to balancer 2.
        let mut opened = Vec::new();
        while opened.len() < 10 {
            let conn =
                Packet { src: Ipv4Addr::from(rng.gen::<u32>()).into(), ..Packet::tcp4(rng.gen_range(1024..65535), 80) };
            let flow = conn.flow(true);
            let SlotWord::Transition { current, previous } = SlotWord::of(lb1.predict(SVC, &flow)) else { continue };
            send(
                &lb1,
                &mut s1,
                &format!("SYN {flow:?} on balancer 1"),
                &syn(conn.clone()).frame(),
                tx(SVC, current, flow),
                Pin::Pinned,
            )?;
            send(&lb1, &mut s1, "its ACK on balancer 1", &conn.frame(), tx(SVC, current, flow), Pin::Nothing)?;
            send(&lb2, &mut s2, "its ACK moved to balancer 2", &conn.frame(), tx(SVC, previous, flow), Pin::Pinned)?;
            want1.extend([entry(&lb1, &conn, current)]);
            want2.extend([entry(&lb2, &conn, previous)]);
            opened.push((conn, current, previous));
        }
        expect_flows(&lb1, "balancer 1, connections opened", &want1)?;
        expect_flows(&lb2, "balancer 2, connections moved", &want2)?;
        eprintln!(
            "tracking: {} connections opened on balancer 1 during the transition (SYN to the current backend) \
             went to their previous backend once ECMP moved them to balancer 2 (broken: the documented cost); \
             30 established connections seen by balancer 2 only reached the same backend as on balancer 1",
            opened.len()
        );

        // The transition ends (steady words, as `l4lb settle` writes them): the current backend everywhere, no pin read.
        let (mut lb1, mut lb2) = (lb1, lb2);
        lb1.set_table(SVC, &after)?;
        lb2.set_table(SVC, &after)?;
        for (conn, current, _) in &opened {
            for (name, lb, stated) in [("balancer 1", &lb1, &mut s1), ("balancer 2", &lb2, &mut s2)] {
                let what = format!("transition over: {:?} on {name}", conn.flow(true));
                send(lb, stated, &what, &conn.frame(), tx(SVC, *current, conn.flow(true)), Pin::Nothing)?;
            }
        }
        expect_stated(&lb1, "balancer 1", s1)?;
        expect_stated(&lb2, "balancer 2", s2)?;

        // The cost, measured over many connections: back in the transition,
        // each opened on balancer 1 (its SYN), then moved by ECMP to balancer
        // 2 (its next segment). Exactly those whose slot is in transition
        // reach another backend there; the share is the table's.
        lb1.set_table(SVC, &words)?;
        lb2.set_table(SVC, &words)?;
        let (total, mut broken, mut in_slots_in_transition) = (4000usize, 0usize, 0usize);
        for _ in 0..total {
            let conn =
                Packet { src: Ipv4Addr::from(rng.gen::<u32>()).into(), ..Packet::tcp4(rng.gen_range(1024..65535), 80) };
            let in_transition = matches!(SlotWord::of(lb1.predict(SVC, &conn.flow(true))), SlotWord::Transition { .. });
            let (verdict1, out1) = lb1.run(&syn(conn.clone()).frame())?;
            let (verdict2, out2) = lb2.run(&conn.frame())?;
            ensure!(verdict1 == XDP_TX && verdict2 == XDP_TX, "verdicts {verdict1} and {verdict2}");
            // The outer destination (the SYN and the ACK differ inside).
            let outer_dst = |out: &[u8]| match u16::from_be_bytes([out[12], out[13]]) {
                0x0800 => out[14 + 16..14 + 20].to_vec(),
                _ => out[14 + 24..14 + 40].to_vec(),
            };
            broken += usize::from(outer_dst(&out1) != outer_dst(&out2));
            in_slots_in_transition += usize::from(in_transition);
        }
        ensure!(
            broken == in_slots_in_transition,
            "{broken} of {total} moved connections reached another backend, {in_slots_in_transition} were in slots in transition"
        );
        eprintln!(
            "tracking: ECMP cost: of {total} random connections opened on balancer 1 during the transition and moved to balancer 2, \
             {broken} ({:.1}%) reached another backend there (broken), exactly those in slots in transition \
             ({in_transition} of {} slots, {:.1}%)",
            100.0 * broken as f64 / total as f64,
            words.len(),
            100.0 * in_transition as f64 / words.len() as f64
        );
        Ok(())
    })
}
