//! The backend's decap program (`l4lb decap`). Needs root; without it every
//! test is reported as ignored.
//!
//! Golden tests run it in the kernel through BPF_PROG_TEST_RUN (repeat 1):
//! for every frame the verdict, the exact output and the counters (seen plus
//! exactly one outcome) are checked. Frames are built here field by field:
//! the outer header by hand, the client's packet with etherparse; the expected
//! output is the Ethernet header as sent followed by the client's packet byte
//! for byte, never derived from the program.
//!
//! End to end: two namespaces joined by a veth pair (`l4lbt-decap-<pid>-<n>-*`,
//! removed by a guard even when a check fails). The backend side gets
//! 192.0.2.2, the VIP on lo and `l4lb decap attach`; a UDP socket bound to the
//! VIP must receive what the other side sends inside IPIP frames (built here,
//! sent with AF_PACKET), and `l4lb decap stats` must count them. Then the same
//! with the balancer (`l4lb attach`) on the other side doing the
//! encapsulation, and the commands' refusals and errors.

#[macro_use]
mod common;

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etherparse::{IpNumber, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject, ProgramInput};
use serde_json::Value;

use common::packet::{internet_checksum, PacketSocket};
use common::wire::*;
use common::{counter_moves, fail, in_netns, ip, link_mac, run, same_bytes, Outcome, TestResult};
use l4lb::bpf::decap_counter::{self, *};
use l4lb::bpf::decap_skel::{L4lbDecapSkel, L4lbDecapSkelBuilder};
use l4lb::bpf::{value_bytes, DecapAddr, DECAP_COUNTER_NAMES};
use l4lb::decap::addr_key;

fn main() {
    if common::is_root() {
        common::remove_leftover_namespaces(PREFIX);
    }
    common::run_suite(
        "decap",
        "BPF_PROG_TEST_RUN, network namespaces and XDP need root",
        vec![
            ("ipip_udp_tcp_decapsulated", ipip_udp_tcp_decapsulated),
            ("outer_and_inner_options", outer_and_inner_options),
            ("bytes_behind_the_inner_packet_are_kept", bytes_behind_the_inner_packet_are_kept),
            ("not_ours_passes_untouched", not_ours_passes_untouched),
            ("malformed_outer_drops", malformed_outer_drops),
            ("malformed_inner_drops", malformed_inner_drops),
            ("end_to_end_udp_service_on_vip", end_to_end_udp_service_on_vip),
            ("end_to_end_balancer_then_decap", end_to_end_balancer_then_decap),
            ("end_to_end_cli_errors_and_foreign_programs", end_to_end_cli_errors_and_foreign_programs),
        ],
    );
}

// ---------------------------------------------------------------------------
// Addresses (documentation ranges; test_run sends nothing anywhere)

/// The backend's own addresses: what the address map holds.
const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const LOCAL_2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// An address that is not the backend's.
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// The balancer (outer source), a client and the service address.
const LB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const BACKEND_MAC: [u8; 6] = [0x02, 0xbe, 0x00, 0x00, 0x00, 0x02];
const LB_MAC: [u8; 6] = [0x02, 0x4c, 0x42, 0x00, 0x00, 0x01];

// ---------------------------------------------------------------------------
// Frames

/// The client's packet as the balancer received it: IPv4, every checksum right.
fn client_packet(proto: u8, sport: u16, tos: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 61, IpNumber(proto), CLIENT.octets(), VIP.octets()).expect("empty payload fits");
    ip.dscp = Ipv4Dscp::try_new(tos >> 2).unwrap();
    ip.ecn = Ipv4Ecn::try_new(tos & 3).unwrap();
    ip.identification = 0x1d2c;
    ip.dont_fragment = proto == TCP;
    ip.options = Ipv4Options::try_from(options).expect("options: a multiple of 4, at most 40 bytes");
    let l4 = match proto {
        TCP => {
            let mut tcp = TcpHeader::new(sport, 443, 0x0102_0304, 64240);
            tcp.ack = true;
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).unwrap();
            tcp.to_bytes().to_vec()
        }
        UDP => UdpHeader::with_ipv4_checksum(sport, 53, &ip, payload).unwrap().to_bytes().to_vec(),
        _ => Vec::new(),
    };
    ip.set_payload_len(l4.len() + payload.len()).expect("fits in tot_len");
    let mut bytes = ip.to_bytes().to_vec();
    bytes.extend(l4);
    bytes.extend(payload);
    bytes
}

fn udp_packet(sport: u16, payload_len: usize) -> Vec<u8> {
    client_packet(UDP, sport, 0, &[], &(0..payload_len).map(|i| i as u8).collect::<Vec<_>>())
}

fn ethernet_header(ether_type: u16) -> Vec<u8> {
    [&BACKEND_MAC[..], &LB_MAC, &ether_type.to_be_bytes()].concat()
}

/// An IPIP frame as the balancer sends it to a backend, with knobs for what
/// the balancer never does (options, fragments, other protocols).
#[derive(Debug, Clone)]
struct Ipip {
    dst: Ipv4Addr,
    protocol: u8,
    tos: u8,
    /// Flags and fragment offset, as on the wire.
    frag: u16,
    options: Vec<u8>,
    /// What the outer header carries (the client's packet).
    inner: Vec<u8>,
    /// Bytes behind the outer packet (Ethernet padding).
    trailer: Vec<u8>,
}

impl Ipip {
    fn to(dst: Ipv4Addr, inner: Vec<u8>) -> Self {
        Ipip { dst, protocol: IPIP, tos: 0, frag: 0x4000, options: Vec::new(), inner, trailer: Vec::new() }
    }

    fn outer_len(&self) -> usize {
        20 + self.options.len()
    }

    fn outer_header(&self) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let tot_len = (self.outer_len() + self.inner.len()) as u16;
        let mut header = vec![0x40 | (self.outer_len() / 4) as u8, self.tos];
        header.extend(tot_len.to_be_bytes());
        header.extend([0, 0]); // id
        header.extend(self.frag.to_be_bytes());
        header.extend([64, self.protocol, 0, 0]);
        header.extend(LB.octets());
        header.extend(self.dst.octets());
        header.extend(&self.options);
        let check = internet_checksum(&header);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        header
    }

    fn frame(&self) -> Vec<u8> {
        [ethernet_header(ETHERTYPE_IPV4), self.outer_header(), self.inner.clone(), self.trailer.clone()].concat()
    }

    /// What the backend's stack must get: the same Ethernet header, then the
    /// client's packet and whatever followed it.
    fn decapsulated(&self) -> Vec<u8> {
        [ethernet_header(ETHERTYPE_IPV4), self.inner.clone(), self.trailer.clone()].concat()
    }
}

/// `frame` with the outer tot_len set (checksum not redone: not checked).
fn with_outer_tot_len(frame: &[u8], tot_len: usize) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
    frame
}

fn with_byte(frame: &[u8], offset: usize, value: u8) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[offset] = value;
    frame
}

fn arp_request() -> Vec<u8> {
    let mut arp = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
    arp.extend(LB_MAC);
    arp.extend(LB.octets());
    arp.extend([0; 6]);
    arp.extend(LOCAL.octets());
    let mut frame = [ethernet_header(ETHERTYPE_ARP), arp].concat();
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame.resize(60, 0);
    frame
}

fn ipv6_packet() -> Vec<u8> {
    let udp = UdpHeader { source_port: 5353, destination_port: 53, length: 8, checksum: 0 };
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
        payload_length: 8,
        next_header: IpNumber::UDP,
        hop_limit: 64,
        source: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
        destination: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    };
    [&ip.to_bytes()[..], &udp.to_bytes()].concat()
}

// ---------------------------------------------------------------------------
// The program under test

#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// XDP_PASS with exactly these bytes, counted as decapsulated.
    Decap(Vec<u8>),
    /// XDP_PASS, frame untouched, counted as passed.
    Pass,
    /// XDP_DROP, counted by this counter.
    Drop(decap_counter::Type),
}

struct Decap {
    skel: L4lbDecapSkel<'static>,
}

impl Decap {
    /// Loaded, with `addrs` in its address map.
    fn with(addrs: &[Ipv4Addr]) -> TestResult<Self> {
        // The skeleton borrows this storage for its whole life: one small leak per test.
        let storage = Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit()));
        let skel = L4lbDecapSkelBuilder::default().open(storage)?.load()?;
        let decap = Decap { skel };
        for &addr in addrs {
            decap.add(addr_key(addr.into()))?;
        }
        Ok(decap)
    }

    fn add(&self, key: DecapAddr) -> TestResult {
        self.skel.maps.decap_addrs.update(value_bytes(&key), &0u32.to_ne_bytes(), MapFlags::ANY)?;
        Ok(())
    }

    /// One BPF_PROG_TEST_RUN (repeat 1): the verdict and the output frame.
    fn run(&self, frame: &[u8]) -> libbpf_rs::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let input = ProgramInput { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() };
        let output = self.skel.progs.l4lb_decap.test_run(input)?;
        Ok((output.return_value, output.data.map(|data| data.to_vec()).unwrap_or_default()))
    }

    /// The counters, summed over CPUs.
    fn counters(&self) -> TestResult<Vec<u64>> {
        (0..L4LB_DECAP_CNT_MAX)
            .map(|index| {
                let values = self
                    .skel
                    .maps
                    .decap_counters
                    .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)?
                    .ok_or_else(|| fail(format!("decap_counters has no entry {index}")))?;
                Ok(values.iter().map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap())).sum())
            })
            .collect()
    }

    /// Runs `frame` once; checks the verdict, the exact output, and that
    /// `seen` and exactly one outcome counter went up by one.
    fn check(&self, what: &str, frame: &[u8], want: Want) -> TestResult {
        let before = self.counters()?;
        let (verdict, output) = self.run(frame).map_err(|err| fail(format!("{what}: test_run failed: {err}")))?;
        let (verdict_wanted, outcome, output_wanted) = match want {
            Want::Decap(bytes) => (XDP_PASS, L4LB_DECAP_CNT_DECAPSULATED, bytes),
            Want::Pass => (XDP_PASS, L4LB_DECAP_CNT_PASSED, frame.to_vec()),
            Want::Drop(counter) => (XDP_DROP, counter, frame.to_vec()),
        };
        let after = self.counters()?;
        let mut wanted = before.clone();
        wanted[L4LB_DECAP_CNT_SEEN as usize] += 1;
        wanted[outcome as usize] += 1;
        ensure!(
            verdict == verdict_wanted && after == wanted,
            "{what}: verdict {verdict}, counters moved {}; expected verdict {verdict_wanted}, {}",
            counter_moves(&DECAP_COUNTER_NAMES, &before, &after),
            counter_moves(&DECAP_COUNTER_NAMES, &before, &wanted)
        );
        same_bytes(what, &output, &output_wanted)
    }
}

/// `check` of an IPIP frame that must come out decapsulated.
fn check_decap(decap: &Decap, what: &str, ipip: &Ipip) -> TestResult {
    decap.check(what, &ipip.frame(), Want::Decap(ipip.decapsulated()))
}

// ---------------------------------------------------------------------------
// Golden tests

fn ipip_udp_tcp_decapsulated() -> TestResult {
    let decap = Decap::with(&[LOCAL, LOCAL_2])?;
    for (i, payload_len) in [0usize, 1, 7, 100, 1400, 1452].into_iter().enumerate() {
        let payload: Vec<u8> = (0..payload_len).map(|b| (b * 7 + i) as u8).collect();
        for (proto, dst) in [(UDP, LOCAL), (TCP, LOCAL), (UDP, LOCAL_2), (TCP, LOCAL_2)] {
            let tos = (i as u8) * 37;
            let mut ipip = Ipip::to(dst, client_packet(proto, 40000 + i as u16, tos, &[], &payload));
            ipip.tos = tos;
            check_decap(&decap, &format!("proto {proto} to {dst}, {payload_len}-byte payload"), &ipip)?;
            ipip.frag = 0; // DF clear: still one whole packet
            check_decap(&decap, &format!("proto {proto} to {dst}, {payload_len}-byte payload, DF clear"), &ipip)?;
        }
    }
    // Whatever the outer carries, once it is a whole IPv4 header: ICMP, a fragment of the client's.
    let ping = client_packet(ICMP, 0, 0, &[], &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    check_decap(&decap, "ICMP inside", &Ipip::to(LOCAL, ping))?;
    let mut fragment = udp_packet(1, 64);
    fragment[6] = 0x20; // MF: the client's own fragment, delivered as it is
    check_decap(&decap, "inner fragment", &Ipip::to(LOCAL, fragment))?;
    Ok(())
}

fn outer_and_inner_options() -> TestResult {
    let decap = Decap::with(&[LOCAL])?;
    for words in 1..=10usize {
        let options: Vec<u8> = [&[0x07u8, (words * 4 - 1) as u8, 4][..], &vec![0x01; words * 4 - 3]].concat();
        let mut ipip = Ipip::to(LOCAL, udp_packet(2000 + words as u16, 30));
        ipip.options = options.clone();
        check_decap(&decap, &format!("outer IHL {}", 5 + words), &ipip)?;
        ipip.inner = client_packet(TCP, 3000, 0x10, &vec![0x01; words * 4], b"hello");
        check_decap(&decap, &format!("outer IHL {0}, inner IHL {0}", 5 + words), &ipip)?;
        ipip.options.clear();
        check_decap(&decap, &format!("inner IHL {}", 5 + words), &ipip)?;
    }
    Ok(())
}

fn bytes_behind_the_inner_packet_are_kept() -> TestResult {
    let decap = Decap::with(&[LOCAL])?;
    // Ethernet padding behind a small outer packet (the stack trims it by tot_len).
    let mut ipip = Ipip::to(LOCAL, udp_packet(1, 0));
    ipip.trailer = vec![0; 60 - ipip.frame().len().min(60) + 6];
    check_decap(&decap, "padding behind the outer packet", &ipip)?;
    // The outer packet longer than the inner one: the rest goes along, trimmed by the stack.
    let mut inner = udp_packet(2, 10);
    inner.extend([0xee; 5]);
    check_decap(&decap, "inner tot_len below the outer payload", &Ipip::to(LOCAL, inner))?;
    Ok(())
}

fn not_ours_passes_untouched() -> TestResult {
    let decap = Decap::with(&[LOCAL])?;
    let inner = udp_packet(7, 20);
    decap.check("IPIP for another address", &Ipip::to(OTHER, inner.clone()).frame(), Want::Pass)?;
    decap.check("IPIP for the client's VIP", &Ipip::to(VIP, inner.clone()).frame(), Want::Pass)?;
    for proto in [UDP, TCP, ICMP] {
        let mut plain = client_packet(proto, 9, 0, &[], b"plain");
        plain[16..20].copy_from_slice(&LOCAL.octets());
        let frame = [ethernet_header(ETHERTYPE_IPV4), plain].concat();
        decap.check(&format!("plain protocol {proto} to the local address"), &frame, Want::Pass)?;
    }
    for proto in [IPV6_IN_IPV4, GRE, 0, 255] {
        let frame = Ipip { protocol: proto, ..Ipip::to(LOCAL, inner.clone()) }.frame();
        decap.check(&format!("outer protocol {proto} to the local address"), &frame, Want::Pass)?;
    }
    decap.check("ARP request", &arp_request(), Want::Pass)?;
    decap.check("IPv6 UDP", &[ethernet_header(ETHERTYPE_IPV6), ipv6_packet()].concat(), Want::Pass)?;
    let tagged = [ethernet_header(ETHERTYPE_VLAN), vec![0x00, 0x05, 0x08, 0x00], Ipip::to(LOCAL, inner.clone()).frame()[ETH_LEN..].to_vec()].concat();
    decap.check("802.1Q-tagged IPIP", &tagged, Want::Pass)?;
    // Too short to be told apart (no whole fixed IPv4 header): the stack's business.
    let frame = Ipip::to(LOCAL, inner.clone()).frame();
    for len in ETH_LEN..ETH_LEN + 20 {
        decap.check(&format!("IPIP frame cut to {len} bytes"), &frame[..len], Want::Pass)?;
    }

    // The family is part of the key: an IPv6 entry with the same leading bytes is not 192.0.2.2.
    let decap = Decap::with(&[])?;
    decap.check("empty address map", &frame, Want::Pass)?;
    let mut v6_key = addr_key(LOCAL.into());
    v6_key.family = 6;
    decap.add(v6_key)?;
    decap.check("only an IPv6 key with the same bytes", &frame, Want::Pass)?;
    decap.add(addr_key(LOCAL.into()))?;
    decap.check("the IPv4 key added", &frame, Want::Decap(Ipip::to(LOCAL, inner).decapsulated()))?;
    Ok(())
}

fn malformed_outer_drops() -> TestResult {
    let decap = Decap::with(&[LOCAL])?;
    let ipip = Ipip::to(LOCAL, udp_packet(11, 40));
    let frame = ipip.frame();
    let ip_len = frame.len() - ETH_LEN;

    for version in [0u8, 1, 2, 3, 5, 6, 7, 15] {
        let bad = with_byte(&frame, ETH_LEN, version << 4 | 5);
        decap.check(&format!("outer version {version}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_BAD_VERSION))?;
    }
    for ihl in 0u8..5 {
        decap.check(&format!("outer IHL {ihl}"), &with_byte(&frame, ETH_LEN, 0x40 | ihl), Want::Drop(L4LB_DECAP_CNT_DROP_BAD_IHL))?;
    }
    // Options cut off by the end of the frame.
    let with_options = Ipip { options: vec![0x01; 40], ..ipip.clone() }.frame();
    for len in ETH_LEN + 20..ETH_LEN + 60 {
        decap.check(&format!("outer IHL 15, frame cut to {len}"), &with_options[..len], Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_OUTER))?;
    }
    for tot_len in [ip_len + 1, ip_len + 100, 0xffff] {
        let bad = with_outer_tot_len(&frame, tot_len);
        decap.check(&format!("outer tot_len {tot_len} beyond the frame"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN))?;
    }
    for tot_len in [0usize, 1, 19] {
        let bad = with_outer_tot_len(&frame, tot_len);
        decap.check(&format!("outer tot_len {tot_len} below the header"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN))?;
    }
    let six_words = Ipip { options: vec![0x01; 4], ..ipip.clone() }.frame();
    for tot_len in 20usize..24 {
        let bad = with_outer_tot_len(&six_words, tot_len);
        decap.check(&format!("outer IHL 6, tot_len {tot_len}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN))?;
    }
    // Cut anywhere after the fixed header: outer tot_len still says the whole.
    for len in ETH_LEN + 20..frame.len() {
        decap.check(&format!("frame cut to {len}"), &frame[..len], Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN))?;
    }
    for (frag, name) in [(0x2000u16, "MF"), (0x0001, "offset 8"), (0x1fff, "last offset"), (0x6001, "DF+MF+offset")] {
        let bad = Ipip { frag, ..ipip.clone() }.frame();
        decap.check(&format!("outer fragment, {name}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_FRAGMENT))?;
    }
    check_decap(&decap, "the same frame, whole", &ipip)?;
    Ok(())
}

fn malformed_inner_drops() -> TestResult {
    let decap = Decap::with(&[LOCAL])?;
    for outer_options in [0usize, 12] {
        let ipip = Ipip { options: vec![0x01; outer_options], ..Ipip::to(LOCAL, udp_packet(12, 40)) };
        let outer_len = ipip.outer_len();
        let frame = ipip.frame();
        let inner_at = ETH_LEN + outer_len;
        let tag = format!("outer IHL {}", outer_len / 4);

        // The outer packet ends before a whole inner header: cut there, or
        // with the rest of the inner header still in the frame behind it.
        for room in 0..20 {
            let cut = with_outer_tot_len(&frame[..inner_at + room], outer_len + room);
            decap.check(&format!("{tag}: {room} inner bytes"), &cut, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER))?;
            let behind = with_outer_tot_len(&frame, outer_len + room);
            decap.check(&format!("{tag}: {room} inner bytes, more behind"), &behind, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER))?;
            let mut padded = cut.clone();
            padded.resize(cut.len() + 40, 0);
            decap.check(&format!("{tag}: {room} inner bytes, zeros behind"), &padded, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER))?;
        }
        // Inner options beyond the outer packet.
        let optioned = Ipip { inner: client_packet(UDP, 13, 0, &[0x01; 40], b"x"), ..ipip.clone() }.frame();
        for room in 20..60 {
            let bad = with_outer_tot_len(&optioned, outer_len + room);
            decap.check(&format!("{tag}: inner IHL 15, {room} inner bytes"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER))?;
        }

        for version in [0u8, 5, 6, 15] {
            let bad = with_byte(&frame, inner_at, version << 4 | 5);
            decap.check(&format!("{tag}: inner version {version}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_VERSION))?;
        }
        let ipv6_inside = Ipip { inner: ipv6_packet(), ..ipip.clone() }.frame();
        decap.check(&format!("{tag}: IPv6 packet under protocol 4"), &ipv6_inside, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_VERSION))?;
        for ihl in 0u8..5 {
            let bad = with_byte(&frame, inner_at, 0x40 | ihl);
            decap.check(&format!("{tag}: inner IHL {ihl}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_IHL))?;
        }
        let inner_len = ipip.inner.len();
        for tot_len in [0usize, 19, inner_len + 1, 0xffff] {
            let mut bad = frame.clone();
            bad[inner_at + 2..inner_at + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
            decap.check(&format!("{tag}: inner tot_len {tot_len}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_TOT_LEN))?;
        }
        // Beyond the outer packet, though not beyond the frame (padding behind it).
        let padded = Ipip { trailer: vec![0; 20], ..ipip.clone() }.frame();
        for tot_len in [inner_len + 1, inner_len + 20] {
            let mut bad = padded.clone();
            bad[inner_at + 2..inner_at + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
            let what = format!("{tag}: inner tot_len {tot_len}, outer payload {inner_len}, frame longer");
            decap.check(&what, &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_TOT_LEN))?;
        }
        check_decap(&decap, &format!("{tag}: inner tot_len exactly the outer payload"), &ipip)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// End to end

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
/// Namespaces of this suite: `l4lbt-decap-<pid>-<n>-gen` and `-be`.
const PREFIX: &str = "l4lbt-decap";
const GEN_ADDR: Ipv4Addr = LB;
const BE_ADDR: Ipv4Addr = LOCAL;
const SERVICE_PORT: u16 = 5555;

/// A clean failure: exit 1 and one `l4lb: error:` line containing `needle`.
fn error_containing(out: Outcome, needle: &str) -> TestResult<Outcome> {
    let lines: Vec<&str> = out.stderr.lines().collect();
    ensure!(
        out.code == Some(1) && lines.len() == 1 && lines[0].starts_with("l4lb: error: ") && lines[0].contains(needle),
        "expected exit 1 and one `l4lb: error:` line containing {needle:?}: {}",
        out.describe()
    );
    Ok(out)
}

/// A balancer-side namespace (`gen`) and a backend namespace (`be`) joined by
/// a veth pair; deleting them on drop removes the veth and its XDP programs.
struct Pair {
    gen: String,
    be: String,
    gen_dev: String,
    be_dev: String,
    gen_mac: [u8; 6],
    be_mac: [u8; 6],
}

impl Pair {
    /// gen: 192.0.2.1/24. be: 192.0.2.2/24 on its veth, the VIP on lo, no
    /// reverse-path filter (clients' addresses are not routed back through
    /// the tunnel side). No IPv6, so that nothing else crosses the veth.
    fn new() -> TestResult<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}-{}-{n}", std::process::id());
        let mut pair = Pair {
            gen: format!("{base}-gen"),
            be: format!("{base}-be"),
            gen_dev: format!("l4dcap{n}g"),
            be_dev: format!("l4dcap{n}b"),
            gen_mac: [0; 6],
            be_mac: [0; 6],
        };
        // From here on the guard exists: a failure below still cleans up.
        for ns in [&pair.gen, &pair.be] {
            ip(&["netns", "add", ns])?;
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
                .success()?;
        }
        let (gen, be, gen_dev, be_dev) = (&pair.gen, &pair.be, &pair.gen_dev, &pair.be_dev);
        ip(&["-n", gen, "link", "add", gen_dev, "type", "veth", "peer", "name", be_dev, "netns", be])?;
        ip(&["-n", gen, "addr", "add", &format!("{GEN_ADDR}/24"), "dev", gen_dev])?;
        ip(&["-n", be, "addr", "add", &format!("{BE_ADDR}/24"), "dev", be_dev])?;
        ip(&["-n", be, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        for (ns, dev) in [(gen, gen_dev), (be, be_dev), (be, &"lo".to_string())] {
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
        }
        let rp_dev = format!("net.ipv4.conf.{be_dev}.rp_filter=0");
        run("ip", &["netns", "exec", be, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", &rp_dev]).success()?;
        pair.gen_mac = link_mac(&pair.gen, &pair.gen_dev)?;
        pair.be_mac = link_mac(&pair.be, &pair.be_dev)?;
        Ok(pair)
    }

    /// `l4lb ARGS` inside the backend namespace.
    fn l4lb(&self, args: &[&str]) -> Outcome {
        let mut full = vec!["netns", "exec", &self.be, BIN];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `l4lb ARGS` inside the gen namespace (where a balancer may run).
    fn l4lb_gen(&self, args: &[&str]) -> Outcome {
        let mut full = vec!["netns", "exec", &self.gen, BIN];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The XDP programs on the backend veth: (mode as iproute2 names it, id, name).
    fn be_xdp(&self) -> TestResult<Vec<(String, u64, String)>> {
        let json: Value = serde_json::from_str(&ip(&["-n", &self.be, "-j", "-d", "link", "show", "dev", &self.be_dev])?)?;
        let xdp = &json[0]["xdp"];
        let attached = match xdp["attached"].as_array() {
            Some(list) => list.clone(),
            None if xdp.is_object() => vec![xdp.clone()],
            None => Vec::new(),
        };
        Ok(attached
            .iter()
            .map(|entry| {
                let mode = match entry["mode"].as_u64() {
                    Some(1) => "xdp",
                    Some(2) => "xdpgeneric",
                    _ => "other",
                };
                (mode.to_string(), entry["prog"]["id"].as_u64().unwrap_or(0), entry["prog"]["name"].as_str().unwrap_or("").to_string())
            })
            .collect())
    }

    /// One `l4lb decap stats --json` sample.
    fn decap_stats(&self) -> TestResult<Value> {
        let out = self.l4lb(&["decap", "stats", "-i", &self.be_dev, "--json", "--count", "1", "--interval", "0.1"]).success()?;
        let lines: Vec<&str> = out.stdout.lines().collect();
        ensure!(lines.len() == 1, "expected one JSON line: {}", out.describe());
        serde_json::from_str(lines[0]).map_err(|err| fail(format!("{:?} is not JSON: {err}", lines[0])))
    }

    /// IPIP frames from the gen veth to the backend: inner UDP from CLIENT
    /// port `first_port + i` to VIP:SERVICE_PORT carrying `payloads[i]`.
    fn ipip_frames(&self, outer_dst: Ipv4Addr, first_port: u16, payloads: &[Vec<u8>]) -> Vec<Vec<u8>> {
        client_datagrams(first_port, payloads)
            .iter()
            .map(|inner| {
                let mut outer = Ipv4Header::new(inner.len() as u16, 64, IpNumber::IPV4, GEN_ADDR.octets(), outer_dst.octets())
                    .expect("fits");
                outer.dont_fragment = true;
                outer.header_checksum = outer.calc_header_checksum();
                [&self.be_mac[..], &self.gen_mac, &ETHERTYPE_IPV4.to_be_bytes(), &outer.to_bytes(), inner].concat()
            })
            .collect()
    }
}

/// UDP datagrams from CLIENT port `first_port + i` to VIP:SERVICE_PORT carrying `payloads[i]`.
fn client_datagrams(first_port: u16, payloads: &[Vec<u8>]) -> Vec<Vec<u8>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let mut packet = Vec::new();
            etherparse::PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 64)
                .udp(first_port + i as u16, SERVICE_PORT)
                .write(&mut packet, payload)
                .expect("building a UDP packet");
            packet
        })
        .collect()
}

/// Sends frames out of `dev` (of the calling thread's namespace) with an AF_PACKET socket.
fn send_frames(dev: &str, frames: &[Vec<u8>]) -> TestResult {
    let socket = PacketSocket::bind(dev)?;
    for frame in frames {
        socket.send(frame)?;
    }
    Ok(())
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.gen, &self.be] {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Binds a UDP socket to VIP:SERVICE_PORT in the backend namespace, calls
/// `send` (in that namespace's thread) and returns what the socket received
/// (payload, sender) until `expected` datagrams arrived or 3 s passed
/// without one.
fn udp_service_receives(
    pair: &Pair,
    send: impl FnOnce() -> TestResult + Send,
    expected: usize,
) -> TestResult<Vec<(Vec<u8>, SocketAddr)>> {
    in_netns(&pair.be, || {
        let socket = UdpSocket::bind((VIP, SERVICE_PORT)).map_err(|err| fail(format!("binding {VIP}:{SERVICE_PORT}: {err}")))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        send()?;
        let mut received = Vec::new();
        let mut buf = [0u8; 2048];
        while received.len() < expected {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => received.push((buf[..n].to_vec(), from)),
                Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(err) => return Err(fail(format!("receiving on {VIP}:{SERVICE_PORT}: {err}"))),
            }
        }
        Ok(received)
    })
}

fn end_to_end_udp_service_on_vip() -> TestResult {
    const FRAMES: usize = 20;
    let pair = Pair::new()?;
    let dev = pair.be_dev.as_str();
    let attached = pair.l4lb(&["decap", "attach", "-i", dev]).success()?;
    ensure!(attached.stdout.contains(&format!("decapsulating IPIP for {BE_ADDR}")), "attach output: {}", attached.describe());
    let programs = pair.be_xdp()?;
    ensure!(programs.len() == 1 && programs[0].0 == "xdp" && programs[0].2 == "l4lb_decap", "after decap attach: {programs:?}");

    let payloads: Vec<Vec<u8>> = (0..FRAMES).map(|i| format!("l4lb decap datagram {i:02} {}", "x".repeat(i * 37)).into_bytes()).collect();
    let frames = pair.ipip_frames(BE_ADDR, 41000, &payloads);
    let send = || in_netns(&pair.gen, || send_frames(&pair.gen_dev, &frames));
    check_received(udp_service_receives(&pair, send, FRAMES)?, 41000, &payloads)?;

    let stats = pair.decap_stats()?;
    let counters = stats["counters"].as_object().ok_or_else(|| fail(format!("no counters in {stats}")))?;
    ensure!(counters["decapsulated"] == FRAMES, "decapsulated {}, want {FRAMES}: {stats}", counters["decapsulated"]);
    ensure!(counters["seen"].as_u64() >= Some(FRAMES as u64), "seen {}: {stats}", counters["seen"]);
    for (name, value) in counters.iter().filter(|(name, _)| name.starts_with("drop_")) {
        ensure!(value == 0, "{name} is {value}, want 0: {stats}");
    }
    ensure!(stats["mode"] == "driver" && stats["addrs"] == serde_json::json!([BE_ADDR.to_string()]), "stats: {stats}");

    let detached = pair.l4lb(&["decap", "detach", "-i", dev]).success()?;
    ensure!(detached.stdout.contains("detached `l4lb_decap`"), "{}", detached.describe());
    ensure!(pair.be_xdp()?.is_empty(), "XDP left on {dev}: {:?}", pair.be_xdp()?);
    Ok(())
}

/// The service got exactly `payloads`, the i-th from CLIENT port `first_port + i`.
fn check_received(mut got: Vec<(Vec<u8>, SocketAddr)>, first_port: u16, payloads: &[Vec<u8>]) -> TestResult {
    got.sort();
    let want: Vec<(Vec<u8>, SocketAddr)> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), SocketAddr::new(IpAddr::V4(CLIENT), first_port + i as u16)))
        .collect();
    ensure!(
        got == want,
        "the service on {VIP}:{SERVICE_PORT} received {} of {} datagrams, or not as sent; got: {:?}",
        got.len(),
        payloads.len(),
        got.iter().map(|(p, from)| (String::from_utf8_lossy(&p[..p.len().min(24)]).into_owned(), *from)).collect::<Vec<_>>()
    );
    Ok(())
}

/// Both halves of direct server return: client packets sent to the
/// balancer's veth (gen side) come back encapsulated (XDP_TX) into the
/// backend's veth, whose decap program hands them to the service on the VIP.
fn end_to_end_balancer_then_decap() -> TestResult {
    const FRAMES: usize = 20;
    let pair = Pair::new()?;
    pair.l4lb(&["decap", "attach", "-i", &pair.be_dev]).success()?;
    pair.l4lb_gen(&["attach", "-i", &pair.gen_dev]).success()?;
    let file = std::env::temp_dir().join(format!("{}.csv", pair.gen));
    std::fs::write(&file, format!("{BE_ADDR}, {}\n", macaddr::MacAddr6::from(pair.be_mac)))?;
    let mapped = pair.l4lb_gen(&["map", "-i", &pair.gen_dev, "-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    mapped.success()?;

    let payloads: Vec<Vec<u8>> = (0..FRAMES).map(|i| format!("through the balancer {i:02} {}", "y".repeat(i * 53)).into_bytes()).collect();
    let frames: Vec<Vec<u8>> = client_datagrams(42000, &payloads)
        .iter()
        .map(|packet| [&pair.gen_mac[..], &pair.be_mac, &ETHERTYPE_IPV4.to_be_bytes(), packet].concat())
        .collect();
    // Sent from the backend's side of the pair, to the balancer's MAC.
    check_received(udp_service_receives(&pair, || send_frames(&pair.be_dev, &frames), FRAMES)?, 42000, &payloads)?;

    let decap = pair.decap_stats()?;
    ensure!(decap["counters"]["decapsulated"] == FRAMES, "decap stats: {decap}");
    let out = pair.l4lb_gen(&["stats", "-i", &pair.gen_dev, "--json", "--count", "1", "--interval", "0.1"]).success()?;
    let balancer: Value = serde_json::from_str(out.stdout.trim()).map_err(|err| fail(format!("{}: {err}", out.describe())))?;
    ensure!(balancer["counters"]["tx"] == FRAMES, "balancer stats: {balancer}");
    Ok(())
}

fn end_to_end_cli_errors_and_foreign_programs() -> TestResult {
    let pair = Pair::new()?;
    let dev = pair.be_dev.as_str();

    error_containing(pair.l4lb(&["decap", "stats", "-i", dev, "--count", "1"]), &format!("no l4lb decap program on {dev}"))?;
    error_containing(pair.l4lb(&["decap", "detach", "-i", dev]), &format!("no l4lb decap program on {dev}"))?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", "nosuchdev0"]), "nosuchdev0")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--addr", "2001:db8::2"]), "IPv6")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--addr", "127.0.0.1"]), "127.0.0.1")?;
    ensure!(pair.be_xdp()?.is_empty(), "a refused attach left a program: {:?}", pair.be_xdp()?);

    pair.l4lb(&["decap", "attach", "-i", dev]).success()?;
    let first = pair.be_xdp()?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev]), "--force")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--mode", "skb"]), "--force")?;
    ensure!(pair.be_xdp()? == first, "a refused attach changed the programs: {:?}, was {first:?}", pair.be_xdp()?);

    let other = Ipv4Addr::new(198, 18, 0, 9);
    pair.l4lb(&["decap", "attach", "-i", dev, "--force", "--mode", "skb", "--addr", &VIP.to_string(), &other.to_string()]).success()?;
    let generic = pair.be_xdp()?;
    ensure!(generic.len() == 1 && generic[0].0 == "xdpgeneric" && generic[0].2 == "l4lb_decap", "after --force --mode skb: {generic:?}");
    let stats = pair.decap_stats()?;
    ensure!(stats["mode"] == "generic" && stats["addrs"] == serde_json::json!([other.to_string(), VIP.to_string()]), "stats: {stats}");

    // The balancer's commands leave the decap program alone, and the other way round.
    error_containing(pair.l4lb(&["detach", "-i", dev]), "not l4lb")?;
    pair.l4lb(&["decap", "detach", "-i", dev]).success()?;
    pair.l4lb(&["attach", "-i", dev]).success()?;
    let balancer = pair.be_xdp()?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev]), "--force")?;
    error_containing(pair.l4lb(&["decap", "detach", "-i", dev]), "not l4lb decap")?;
    error_containing(pair.l4lb(&["decap", "stats", "-i", dev, "--count", "1"]), "not l4lb decap")?;
    ensure!(pair.be_xdp()? == balancer, "decap commands changed the balancer: {:?}, was {balancer:?}", pair.be_xdp()?);
    pair.l4lb(&["detach", "-i", dev]).success()?;

    ip(&["-n", &pair.be, "addr", "flush", "dev", dev])?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev]), "--addr")?;
    ensure!(pair.be_xdp()?.is_empty(), "programs left: {:?}", pair.be_xdp()?);
    Ok(())
}
