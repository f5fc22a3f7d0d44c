//! The backend's decap program (`l4lb decap`). Needs root; without it every
//! test is reported as ignored.
//!
//! Golden tests run it in the kernel through BPF_PROG_TEST_RUN (repeat 1):
//! for every frame the verdict, the exact output and the counters (seen plus
//! exactly one outcome) are checked. Frames are built here field by field:
//! the outer IPv4 header by hand, the outer IPv6 header and the client's
//! packet with etherparse (the client's checksums re-checked independently);
//! the expected output is the Ethernet header as sent (EtherType of the
//! client's packet) followed by the client's packet byte for byte, never
//! derived from the program. Two frames (6in6, 4in6) are also spelled out
//! byte by byte, input and output.
//!
//! End to end: two namespaces joined by a veth pair (`l4lbt-decap-<pid>-<n>-*`,
//! removed by a guard even when a check fails). The backend side gets
//! 192.0.2.2, the VIP on lo and `l4lb decap attach`; a UDP socket bound to the
//! VIP must receive what the other side sends inside IPIP frames (built here,
//! sent with AF_PACKET), and `l4lb decap stats` must count them. The same
//! with IPv6 outer headers (2001:db8::2 on the backend, IPv6-in-IPv6 to an
//! IPv6 VIP and IPv4-in-IPv6 to the IPv4 VIP). Then the balancer
//! (`l4lb attach`) on the other side doing the encapsulation, and the
//! commands' refusals and errors.

#[macro_use]
mod common;

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etherparse::{
    IpNumber, Ipv4Dscp, Ipv4Ecn, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};
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
            ("ipv6_outer_golden_bytes", ipv6_outer_golden_bytes),
            ("ipv6_outer_6in6_4in6_decapsulated", ipv6_outer_6in6_4in6_decapsulated),
            ("ipv6_outer_not_ours_passes_untouched", ipv6_outer_not_ours_passes_untouched),
            ("ipv6_outer_malformed_drops", ipv6_outer_malformed_drops),
            ("ipv6_outer_malformed_inner_drops", ipv6_outer_malformed_inner_drops),
            ("end_to_end_udp_service_on_vip", end_to_end_udp_service_on_vip),
            ("end_to_end_ipv6_outer_udp_services", end_to_end_ipv6_outer_udp_services),
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

/// The same roles in IPv6.
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const LOCAL6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x77);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
const ICMPV6: u8 = 58;

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
    ip.header_checksum = ip.calc_header_checksum();
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

/// The client's packet over IPv6 as the balancer received it, every checksum right.
fn client_packet6(proto: u8, sport: u16, traffic_class: u8, flow_label: u32, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ipv6Header {
        traffic_class,
        flow_label: Ipv6FlowLabel::try_new(flow_label).expect("a 20-bit flow label"),
        payload_length: 0,
        next_header: IpNumber(proto),
        hop_limit: 61,
        source: CLIENT6.octets(),
        destination: VIP6.octets(),
    };
    let l4 = match proto {
        TCP => {
            let mut tcp = TcpHeader::new(sport, 443, 0x0102_0304, 64240);
            tcp.ack = true;
            tcp.checksum = tcp.calc_checksum_ipv6(&ip, payload).unwrap();
            tcp.to_bytes().to_vec()
        }
        UDP => UdpHeader::with_ipv6_checksum(sport, 53, &ip, payload).unwrap().to_bytes().to_vec(),
        _ => Vec::new(),
    };
    ip.set_payload_length(l4.len() + payload.len()).expect("fits in payload_len");
    [&ip.to_bytes()[..], &l4, payload].concat()
}

fn udp_packet6(sport: u16, payload_len: usize) -> Vec<u8> {
    client_packet6(UDP, sport, 0, 0, &(0..payload_len).map(|i| i as u8).collect::<Vec<_>>())
}

/// Whether the checksums of a client's packet (IPv4 header; TCP, UDP,
/// ICMPv6 over either family) are right, computed here with the RFC 1071 sum
/// and the pseudo-headers spelled out, independently of etherparse.
fn checksums_right(packet: &[u8]) -> bool {
    let (proto, l4, pseudo) = match packet[0] >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0xf) * 4;
            let tot_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if internet_checksum(&packet[..ihl]) != 0 {
                return false;
            }
            let l4 = &packet[ihl..tot_len];
            let pseudo = [&packet[12..20], &[0, packet[9]], &(l4.len() as u16).to_be_bytes()[..]].concat();
            (packet[9], l4, pseudo)
        }
        6 => {
            let l4 = &packet[40..40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]))];
            let pseudo = [&packet[8..40], &(l4.len() as u32).to_be_bytes(), &[0, 0, 0, packet[6]]].concat();
            (packet[6], l4, pseudo)
        }
        _ => return false,
    };
    match proto {
        TCP | UDP | ICMPV6 => internet_checksum(&[pseudo, l4.to_vec()].concat()) == 0,
        _ => true,
    }
}

/// An IPv6 outer header in front of the client's packet, as the balancer
/// sends it to an IPv6 backend, with knobs for what it never does.
#[derive(Debug, Clone)]
struct Ip6in {
    dst: Ipv6Addr,
    /// 41 (IPv6 inside) or 4 (IPv4 inside); anything else in some tests.
    next_header: u8,
    traffic_class: u8,
    flow_label: u32,
    /// What the outer header carries: the client's packet (in some tests
    /// behind extension headers).
    inner: Vec<u8>,
    /// Bytes behind the outer packet (Ethernet padding).
    trailer: Vec<u8>,
}

impl Ip6in {
    /// The outer header the balancer writes for `inner`: next header from
    /// the inner version, traffic class copied, some flow label.
    fn to(dst: Ipv6Addr, inner: Vec<u8>) -> Self {
        let (next_header, traffic_class) = match inner[0] >> 4 {
            4 => (IPIP, inner[1]),
            _ => (IPV6_IN_IPV4, inner[0] << 4 | inner[1] >> 4),
        };
        let flow_label = (inner.len() as u32).wrapping_mul(0x9e37_79b1) >> 12;
        Ip6in { dst, next_header, traffic_class, flow_label, inner, trailer: Vec::new() }
    }

    fn outer_header(&self) -> Vec<u8> {
        Ipv6Header {
            traffic_class: self.traffic_class,
            flow_label: Ipv6FlowLabel::try_new(self.flow_label).unwrap(),
            payload_length: self.inner.len() as u16,
            next_header: IpNumber(self.next_header),
            hop_limit: 64,
            source: LB6.octets(),
            destination: self.dst.octets(),
        }
        .to_bytes()
        .to_vec()
    }

    fn frame(&self) -> Vec<u8> {
        [ethernet_header(ETHERTYPE_IPV6), self.outer_header(), self.inner.clone(), self.trailer.clone()].concat()
    }

    /// What the backend's stack must get: the same MACs, the client's
    /// packet's EtherType, the client's packet and whatever followed it.
    fn decapsulated(&self) -> Vec<u8> {
        let ether_type = if self.next_header == IPIP { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 };
        [ethernet_header(ether_type), self.inner.clone(), self.trailer.clone()].concat()
    }
}

/// `frame` (an IPv6 outer one) with the outer payload_len set.
fn with_outer_payload_len(frame: &[u8], payload_len: usize) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    frame
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
    fn with<A: Copy + Into<IpAddr>>(addrs: &[A]) -> TestResult<Self> {
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
    let tagged = [
        ethernet_header(ETHERTYPE_VLAN),
        vec![0x00, 0x05, 0x08, 0x00],
        Ipip::to(LOCAL, inner.clone()).frame()[ETH_LEN..].to_vec(),
    ]
    .concat();
    decap.check("802.1Q-tagged IPIP", &tagged, Want::Pass)?;
    // Too short to be told apart (no whole fixed IPv4 header): the stack's business.
    let frame = Ipip::to(LOCAL, inner.clone()).frame();
    for len in ETH_LEN..ETH_LEN + 20 {
        decap.check(&format!("IPIP frame cut to {len} bytes"), &frame[..len], Want::Pass)?;
    }

    // The family is part of the key: an IPv6 entry with the same leading bytes is not 192.0.2.2.
    let decap = Decap::with::<Ipv4Addr>(&[])?;
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
        decap.check(
            &format!("outer IHL {ihl}"),
            &with_byte(&frame, ETH_LEN, 0x40 | ihl),
            Want::Drop(L4LB_DECAP_CNT_DROP_BAD_IHL),
        )?;
    }
    // Options cut off by the end of the frame.
    let with_options = Ipip { options: vec![0x01; 40], ..ipip.clone() }.frame();
    for len in ETH_LEN + 20..ETH_LEN + 60 {
        decap.check(
            &format!("outer IHL 15, frame cut to {len}"),
            &with_options[..len],
            Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_OUTER),
        )?;
    }
    for tot_len in [ip_len + 1, ip_len + 100, 0xffff] {
        let bad = with_outer_tot_len(&frame, tot_len);
        decap.check(
            &format!("outer tot_len {tot_len} beyond the frame"),
            &bad,
            Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN),
        )?;
    }
    for tot_len in [0usize, 1, 19] {
        let bad = with_outer_tot_len(&frame, tot_len);
        decap.check(
            &format!("outer tot_len {tot_len} below the header"),
            &bad,
            Want::Drop(L4LB_DECAP_CNT_DROP_BAD_TOT_LEN),
        )?;
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
            decap.check(
                &format!("{tag}: {room} inner bytes, more behind"),
                &behind,
                Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER),
            )?;
            let mut padded = cut.clone();
            padded.resize(cut.len() + 40, 0);
            decap.check(
                &format!("{tag}: {room} inner bytes, zeros behind"),
                &padded,
                Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER),
            )?;
        }
        // Inner options beyond the outer packet.
        let optioned = Ipip { inner: client_packet(UDP, 13, 0, &[0x01; 40], b"x"), ..ipip.clone() }.frame();
        for room in 20..60 {
            let bad = with_outer_tot_len(&optioned, outer_len + room);
            decap.check(
                &format!("{tag}: inner IHL 15, {room} inner bytes"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER),
            )?;
        }

        for version in [0u8, 5, 7, 15] {
            let bad = with_byte(&frame, inner_at, version << 4 | 5);
            decap.check(
                &format!("{tag}: inner version {version}"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_INNER_VERSION),
            )?;
        }
        let bad = with_byte(&frame, inner_at, 0x65);
        decap.check(&format!("{tag}: inner version 6"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY))?;
        let ipv6_inside = Ipip { inner: ipv6_packet(), ..ipip.clone() }.frame();
        decap.check(
            &format!("{tag}: IPv6 packet under protocol 4"),
            &ipv6_inside,
            Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY),
        )?;
        for room in 1..20 {
            // The family is told from the first byte: a short IPv6 packet is still the wrong family.
            let cut = with_outer_tot_len(&ipv6_inside[..inner_at + room], outer_len + room);
            decap.check(
                &format!("{tag}: {room} bytes of IPv6 under protocol 4"),
                &cut,
                Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY),
            )?;
            let bad = with_outer_tot_len(&with_byte(&frame, inner_at, 0x55), outer_len + room);
            decap.check(
                &format!("{tag}: {room} inner bytes of version 5"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_INNER_VERSION),
            )?;
        }
        for ihl in 0u8..5 {
            let bad = with_byte(&frame, inner_at, 0x40 | ihl);
            decap.check(&format!("{tag}: inner IHL {ihl}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_IHL))?;
        }
        let inner_len = ipip.inner.len();
        for tot_len in [0usize, 19, inner_len + 1, 0xffff] {
            let mut bad = frame.clone();
            bad[inner_at + 2..inner_at + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
            decap.check(
                &format!("{tag}: inner tot_len {tot_len}"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_INNER_TOT_LEN),
            )?;
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
// Golden tests, IPv6 outer headers

/// Hex text to bytes (whitespace ignored).
fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect()
}

/// One IPv6-in-IPv6 and one IPv4-in-IPv6 frame written out byte by byte
/// (checksums computed by hand, re-checked here), and the exact frames the
/// stack must get.
fn ipv6_outer_golden_bytes() -> TestResult {
    let decap = Decap::with(&[LOCAL6])?;
    let ethernet = "02be00000002 024c42000001";
    // Client 2001:db8:c::7 port 40000 -> VIP 2001:db8:ff::10 port 53, UDP "hi",
    // traffic class 0x28, flow label 0xabcde, hop limit 61.
    let inner6 = "628abcde 000a 11 3d
                  20010db8000c00000000000000000007
                  20010db800ff00000000000000000010
                  9c40 0035 000a 9e67 6869";
    // Outer: traffic class 0x28 copied, flow label 0x12345, payload 50, next header 41,
    // hop limit 64, 2001:db8::1 -> 2001:db8::2.
    let outer6 = "62812345 0032 29 40
                  20010db8000000000000000000000001
                  20010db8000000000000000000000002";
    let frame = unhex(&format!("{ethernet} 86dd {outer6} {inner6}"));
    let want = unhex(&format!("{ethernet} 86dd {inner6}"));
    ensure!(frame.len() == 14 + 40 + 50 && checksums_right(&want[ETH_LEN..]), "the 6in6 golden frame is wrong");
    decap.check("golden IPv6-in-IPv6", &frame, Want::Decap(want))?;

    // Client 198.51.100.7 port 40000 -> VIP 203.0.113.10 port 53, UDP "hi",
    // tos 0x28, id 0x1d2c, DF, TTL 61.
    let inner4 = "4528 001e 1d2c 4000 3d 11 ba35 c6336407 cb00710a
                  9c40 0035 000a 94b5 6869";
    // Outer: traffic class 0x28 copied, flow label 0xfffff, payload 30, next header 4.
    let outer4 = "628fffff 001e 04 40
                  20010db8000000000000000000000001
                  20010db8000000000000000000000002";
    let frame = unhex(&format!("{ethernet} 86dd {outer4} {inner4}"));
    let want = unhex(&format!("{ethernet} 0800 {inner4}"));
    ensure!(frame.len() == 14 + 40 + 30 && checksums_right(&want[ETH_LEN..]), "the 4in6 golden frame is wrong");
    decap.check("golden IPv4-in-IPv6", &frame, Want::Decap(want))?;
    Ok(())
}

/// `check` of an IPv6 outer frame that must come out decapsulated.
fn check_decap6(decap: &Decap, what: &str, frame: &Ip6in) -> TestResult {
    decap.check(what, &frame.frame(), Want::Decap(frame.decapsulated()))
}

fn ipv6_outer_6in6_4in6_decapsulated() -> TestResult {
    let decap = Decap::with(&[IpAddr::from(LOCAL6), LOCAL6_2.into(), LOCAL.into()])?;
    for (i, payload_len) in [0usize, 1, 7, 100, 1400, 1432].into_iter().enumerate() {
        let payload: Vec<u8> = (0..payload_len).map(|b| (b * 11 + i) as u8).collect();
        for (proto, dst) in [(UDP, LOCAL6), (TCP, LOCAL6), (UDP, LOCAL6_2), (TCP, LOCAL6_2)] {
            let class = (i as u8) * 41;
            let inner6 = client_packet6(proto, 40000 + i as u16, class, (0x12345 * i as u32) & 0xfffff, &payload);
            let inner4 = client_packet(proto, 40000 + i as u16, class, &[], &payload);
            for inner in [inner6, inner4] {
                ensure!(
                    checksums_right(&inner),
                    "built a client packet with a wrong checksum: {}",
                    common::hex(&inner)
                );
                let family = if inner[0] >> 4 == 6 { "6in6" } else { "4in6" };
                let mut frame = Ip6in::to(dst, inner);
                check_decap6(&decap, &format!("{family}, proto {proto} to {dst}, {payload_len}-byte payload"), &frame)?;
                // Outer fields the program does not look at.
                (frame.traffic_class, frame.flow_label) = (0xff, 0xfffff);
                check_decap6(
                    &decap,
                    &format!("{family}, proto {proto} to {dst}, {payload_len} bytes, other class and label"),
                    &frame,
                )?;
            }
        }
    }
    // Whatever the client's packet is, once it is whole: ICMPv6, ICMP, the
    // client's own fragments and extension headers, delivered as they are.
    let mut ping6 = Vec::new();
    etherparse::PacketBuilder::ipv6(CLIENT6.octets(), VIP6.octets(), 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut ping6, b"ping")
        .expect("building an ICMPv6 echo request");
    ensure!(checksums_right(&ping6), "ICMPv6 checksum");
    check_decap6(&decap, "ICMPv6 inside", &Ip6in::to(LOCAL6, ping6))?;
    let ping = client_packet(ICMP, 0, 0, &[], &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]);
    check_decap6(&decap, "ICMP inside", &Ip6in::to(LOCAL6, ping))?;
    let mut fragment = udp_packet(1, 64);
    fragment[6] = 0x20; // MF
    check_decap6(&decap, "inner IPv4 fragment", &Ip6in::to(LOCAL6, fragment))?;
    let udp6 = udp_packet6(2, 64);
    let mut with_fragment_header = udp6.clone();
    with_fragment_header[6] = 44; // next header: fragment
    with_fragment_header.splice(40..40, [UDP, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]); // offset 0, M
    with_fragment_header[4..6].copy_from_slice(&((udp6.len() - 40 + 8) as u16).to_be_bytes());
    check_decap6(&decap, "inner IPv6 first fragment", &Ip6in::to(LOCAL6, with_fragment_header))?;
    let mut with_hop_by_hop = udp6.clone();
    with_hop_by_hop[6] = 0;
    with_hop_by_hop.splice(40..40, [UDP, 0, 1, 4, 0, 0, 0, 0]); // PadN
    with_hop_by_hop[4..6].copy_from_slice(&((udp6.len() - 40 + 8) as u16).to_be_bytes());
    check_decap6(&decap, "inner IPv6 with a hop-by-hop header", &Ip6in::to(LOCAL6, with_hop_by_hop))?;
    // An IPv6 packet with no payload at all (next header 59) is a whole packet too.
    let mut empty = udp_packet6(3, 0)[..40].to_vec();
    (empty[4], empty[5], empty[6]) = (0, 0, 59);
    check_decap6(&decap, "inner IPv6 with payload length 0", &Ip6in::to(LOCAL6, empty))?;

    // Bytes behind: Ethernet padding behind a small outer packet, the outer
    // payload longer than the client's packet. They go along; the stack trims them.
    let mut padded = Ip6in::to(LOCAL6, client_packet(UDP, 4, 0, &[], &[]));
    padded.trailer = vec![0; 6];
    check_decap6(&decap, "padding behind a 4in6 packet", &padded)?;
    for inner in [udp_packet6(5, 10), udp_packet(5, 10)] {
        let mut longer = Ip6in::to(LOCAL6, inner.clone());
        longer.inner.extend([0xee; 5]);
        check_decap6(
            &decap,
            &format!("inner packet of version {} shorter than the outer payload", inner[0] >> 4),
            &longer,
        )?;
        longer.trailer = vec![0x11; 9];
        check_decap6(
            &decap,
            &format!("inner packet of version {}, more behind the outer payload", inner[0] >> 4),
            &longer,
        )?;
    }
    // IPv4 outer headers still work next to IPv6 ones.
    check_decap(&decap, "IPIP next to IPv6 addresses", &Ipip::to(LOCAL, udp_packet(6, 20)))?;
    Ok(())
}

fn ipv6_outer_not_ours_passes_untouched() -> TestResult {
    let decap = Decap::with(&[LOCAL6])?;
    let inner = udp_packet6(7, 20);
    decap.check("6in6 for another address", &Ip6in::to(OTHER6, inner.clone()).frame(), Want::Pass)?;
    decap.check("6in6 for the client's VIP", &Ip6in::to(VIP6, inner.clone()).frame(), Want::Pass)?;
    decap.check("4in6 for another address", &Ip6in::to(OTHER6, udp_packet(7, 20)).frame(), Want::Pass)?;
    // Plain traffic and other next headers to the local address.
    for next_header in [TCP, UDP, ICMPV6, GRE, ESP, 59, 0x8f, 255] {
        let frame = Ip6in { next_header, ..Ip6in::to(LOCAL6, inner.clone()) }.frame();
        decap.check(&format!("next header {next_header} to the local address"), &frame, Want::Pass)?;
    }
    // The balancer never adds extension headers: an outer header with one is
    // someone else's, whatever follows it.
    let extension_headers: [(u8, &str, Vec<u8>); 5] = [
        (0, "hop-by-hop", vec![IPV6_IN_IPV4, 0, 1, 4, 0, 0, 0, 0]),
        (60, "destination options", vec![IPV6_IN_IPV4, 0, 1, 4, 0, 0, 0, 0]),
        (43, "routing (segments left 0)", vec![IPV6_IN_IPV4, 0, 0, 0, 0, 0, 0, 0]),
        (44, "fragment (atomic)", vec![IPV6_IN_IPV4, 0, 0, 0, 0x12, 0x34, 0x56, 0x78]),
        (51, "authentication", [&[IPV6_IN_IPV4, 2, 0, 0][..], &[0x11; 12]].concat()),
    ];
    for (next_header, name, header) in extension_headers {
        for (inner, inside) in [(inner.clone(), IPV6_IN_IPV4), (udp_packet(8, 20), IPIP)] {
            let mut header = header.clone();
            header[0] = inside;
            let frame = Ip6in { next_header, ..Ip6in::to(LOCAL6, [header, inner].concat()) }.frame();
            decap.check(&format!("{name} header, then next header {inside}"), &frame, Want::Pass)?;
        }
    }
    // Too short to be told apart (no whole fixed IPv6 header): the stack's business.
    let frame = Ip6in::to(LOCAL6, inner.clone()).frame();
    for len in ETH_LEN..ETH_LEN + 40 {
        decap.check(&format!("6in6 frame cut to {len} bytes"), &frame[..len], Want::Pass)?;
    }
    // IPv6 outer headers in other wrappings.
    let tagged = [ethernet_header(ETHERTYPE_VLAN), vec![0x00, 0x05, 0x86, 0xdd], frame[ETH_LEN..].to_vec()].concat();
    decap.check("802.1Q-tagged 6in6", &tagged, Want::Pass)?;
    let mut as_ipv4 = frame.clone();
    as_ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    // (Read as IPv4, its protocol byte is an address byte, 0x01: not IPIP.)
    decap.check("an IPv6 outer header under EtherType IPv4", &as_ipv4, Want::Pass)?;

    // The family is part of the key: the IPv4 key 192.0.2.2 is not the IPv6
    // address c000:202:: (the same leading bytes, zeros behind), and the
    // other way round.
    let lookalike = Ipv6Addr::from([192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let decap = Decap::with(&[LOCAL])?;
    let frame = Ip6in::to(lookalike, inner.clone()).frame();
    decap.check("6in6 to c000:202:: with only the IPv4 key 192.0.2.2", &frame, Want::Pass)?;
    let mut v4_key = addr_key(lookalike.into());
    v4_key.family = 4;
    decap.add(v4_key)?;
    decap.check("6in6 to c000:202:: with an IPv4 key of the same 16 bytes", &frame, Want::Pass)?;
    decap.add(addr_key(lookalike.into()))?;
    decap.check("the IPv6 key added", &frame, Want::Decap(Ip6in::to(lookalike, inner).decapsulated()))?;
    check_decap(&decap, "the IPv4 key still decapsulates IPIP", &Ipip::to(LOCAL, udp_packet(9, 9)))?;
    Ok(())
}

fn ipv6_outer_malformed_drops() -> TestResult {
    let decap = Decap::with(&[LOCAL6])?;
    for inner in [udp_packet6(11, 40), udp_packet(11, 40)] {
        let good = Ip6in::to(LOCAL6, inner);
        let frame = good.frame();
        let tag = if good.next_header == IPIP { "4in6" } else { "6in6" };
        let payload_len = frame.len() - ETH_LEN - 40;

        for version in [0u8, 1, 4, 5, 7, 15] {
            let bad = with_byte(&frame, ETH_LEN, version << 4 | (frame[ETH_LEN] & 0xf));
            decap.check(
                &format!("{tag}: outer version {version}"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_BAD_VERSION6),
            )?;
        }
        for len in [payload_len + 1, payload_len + 100, 0xffff] {
            let bad = with_outer_payload_len(&frame, len);
            decap.check(
                &format!("{tag}: outer payload_len {len} beyond the frame"),
                &bad,
                Want::Drop(L4LB_DECAP_CNT_DROP_BAD_PAYLOAD_LEN),
            )?;
        }
        // Cut anywhere after the fixed header: payload_len still says the whole.
        for len in ETH_LEN + 40..frame.len() {
            decap.check(
                &format!("{tag}: frame cut to {len}"),
                &frame[..len],
                Want::Drop(L4LB_DECAP_CNT_DROP_BAD_PAYLOAD_LEN),
            )?;
        }
        check_decap6(&decap, &format!("{tag}: the same frame, whole"), &good)?;
    }
    Ok(())
}

fn ipv6_outer_malformed_inner_drops() -> TestResult {
    let decap = Decap::with(&[LOCAL6])?;
    let inner_at = ETH_LEN + 40;

    // IPv6-in-IPv6.
    let good = Ip6in::to(LOCAL6, udp_packet6(12, 40));
    let frame = good.frame();
    let inner_len = good.inner.len();
    // The outer packet ends before a whole inner header: cut there, with
    // the rest of the inner header still in the frame behind it, or zeros.
    for room in 0..40 {
        let cut = with_outer_payload_len(&frame[..inner_at + room], room);
        decap.check(&format!("6in6: {room} inner bytes"), &cut, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER6))?;
        let behind = with_outer_payload_len(&frame, room);
        decap.check(
            &format!("6in6: {room} inner bytes, more behind"),
            &behind,
            Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER6),
        )?;
        let mut padded = cut.clone();
        padded.resize(cut.len() + 40, 0);
        decap.check(
            &format!("6in6: {room} inner bytes, zeros behind"),
            &padded,
            Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER6),
        )?;
    }
    for version in [0u8, 1, 5, 7, 15] {
        let bad = with_byte(&frame, inner_at, version << 4);
        decap.check(&format!("6in6: inner version {version}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER6_VERSION))?;
        let short = with_outer_payload_len(&bad, 1);
        decap.check(
            &format!("6in6: one inner byte, version {version}"),
            &short,
            Want::Drop(L4LB_DECAP_CNT_DROP_INNER6_VERSION),
        )?;
    }
    // An IPv4 packet under next header 41, whole or as short as one byte.
    let ipv4_inside = Ip6in { next_header: IPV6_IN_IPV4, ..Ip6in::to(LOCAL6, udp_packet(13, 40)) };
    decap.check(
        "6in6: IPv4 packet under next header 41",
        &ipv4_inside.frame(),
        Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY),
    )?;
    for room in [1usize, 19, 20, 39] {
        let short = with_outer_payload_len(&ipv4_inside.frame()[..inner_at + room], room);
        decap.check(
            &format!("6in6: {room} bytes of IPv4 under next header 41"),
            &short,
            Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY),
        )?;
    }
    // Inner payload_len beyond the outer payload (and the frame), or beyond
    // the outer payload only (padding behind it).
    for len in [inner_len - 40 + 1, inner_len - 40 + 100, 0xffff] {
        let mut bad = frame.clone();
        bad[inner_at + 4..inner_at + 6].copy_from_slice(&(len as u16).to_be_bytes());
        decap.check(
            &format!("6in6: inner payload_len {len}"),
            &bad,
            Want::Drop(L4LB_DECAP_CNT_DROP_INNER6_PAYLOAD_LEN),
        )?;
    }
    let padded = Ip6in { trailer: vec![0; 20], ..good.clone() }.frame();
    for len in [inner_len - 40 + 1, inner_len - 40 + 20] {
        let mut bad = padded.clone();
        bad[inner_at + 4..inner_at + 6].copy_from_slice(&(len as u16).to_be_bytes());
        let what = format!("6in6: inner payload_len {len}, outer payload {inner_len}, frame longer");
        decap.check(&what, &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER6_PAYLOAD_LEN))?;
    }
    check_decap6(&decap, "6in6: inner payload_len exactly the outer payload", &good)?;

    // IPv4-in-IPv6: the inner checks of IPIP, under an IPv6 outer header.
    let good = Ip6in::to(LOCAL6, udp_packet(14, 40));
    let frame = good.frame();
    let inner_len = good.inner.len();
    for room in 0..20 {
        let cut = with_outer_payload_len(&frame[..inner_at + room], room);
        decap.check(&format!("4in6: {room} inner bytes"), &cut, Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER))?;
        let behind = with_outer_payload_len(&frame, room);
        decap.check(
            &format!("4in6: {room} inner bytes, more behind"),
            &behind,
            Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER),
        )?;
    }
    let optioned = Ip6in::to(LOCAL6, client_packet(UDP, 15, 0, &[0x01; 40], b"x")).frame();
    for room in 20..60 {
        let bad = with_outer_payload_len(&optioned, room);
        decap.check(
            &format!("4in6: inner IHL 15, {room} inner bytes"),
            &bad,
            Want::Drop(L4LB_DECAP_CNT_DROP_SHORT_INNER),
        )?;
    }
    for version in [0u8, 5, 7, 15] {
        let bad = with_byte(&frame, inner_at, version << 4 | 5);
        decap.check(&format!("4in6: inner version {version}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_VERSION))?;
    }
    let ipv6_inside = Ip6in { next_header: IPIP, ..Ip6in::to(LOCAL6, udp_packet6(16, 40)) };
    decap.check(
        "4in6: IPv6 packet under next header 4",
        &ipv6_inside.frame(),
        Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY),
    )?;
    let short = with_outer_payload_len(&ipv6_inside.frame()[..inner_at + 1], 1);
    decap.check("4in6: one byte of IPv6 under next header 4", &short, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_FAMILY))?;
    for ihl in 0u8..5 {
        let bad = with_byte(&frame, inner_at, 0x40 | ihl);
        decap.check(&format!("4in6: inner IHL {ihl}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_IHL))?;
    }
    for tot_len in [0usize, 19, inner_len + 1, 0xffff] {
        let mut bad = frame.clone();
        bad[inner_at + 2..inner_at + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        decap.check(&format!("4in6: inner tot_len {tot_len}"), &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_TOT_LEN))?;
    }
    let padded = Ip6in { trailer: vec![0; 20], ..good.clone() }.frame();
    for tot_len in [inner_len + 1, inner_len + 20] {
        let mut bad = padded.clone();
        bad[inner_at + 2..inner_at + 4].copy_from_slice(&(tot_len as u16).to_be_bytes());
        let what = format!("4in6: inner tot_len {tot_len}, outer payload {inner_len}, frame longer");
        decap.check(&what, &bad, Want::Drop(L4LB_DECAP_CNT_DROP_INNER_TOT_LEN))?;
    }
    check_decap6(&decap, "4in6: inner tot_len exactly the outer payload", &good)?;
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
        Self::with_ipv6(false)
    }

    /// `new`, and with `ipv6` the backend namespace keeps IPv6: LOCAL6/64 on
    /// its veth and VIP6 on lo, usable at once (no duplicate address
    /// detection). gen stays without IPv6 (it only sends raw frames).
    fn with_ipv6(ipv6: bool) -> TestResult<Self> {
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
            let sysctls = if ipv6 && ns == &pair.be {
                ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
            } else {
                ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            };
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", sysctls[0], sysctls[1]]).success()?;
        }
        let (gen, be, gen_dev, be_dev) = (&pair.gen, &pair.be, &pair.gen_dev, &pair.be_dev);
        ip(&["-n", gen, "link", "add", gen_dev, "type", "veth", "peer", "name", be_dev, "netns", be])?;
        ip(&["-n", gen, "addr", "add", &format!("{GEN_ADDR}/24"), "dev", gen_dev])?;
        ip(&["-n", be, "addr", "add", &format!("{BE_ADDR}/24"), "dev", be_dev])?;
        ip(&["-n", be, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        if ipv6 {
            ip(&["-n", be, "addr", "add", &format!("{LOCAL6}/64"), "dev", be_dev, "nodad"])?;
            ip(&["-n", be, "addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
        }
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
        let json: Value =
            serde_json::from_str(&ip(&["-n", &self.be, "-j", "-d", "link", "show", "dev", &self.be_dev])?)?;
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
                (
                    mode.to_string(),
                    entry["prog"]["id"].as_u64().unwrap_or(0),
                    entry["prog"]["name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }

    /// One `l4lb decap stats --json` sample.
    fn decap_stats(&self) -> TestResult<Value> {
        let out = self
            .l4lb(&["decap", "stats", "-i", &self.be_dev, "--json", "--count", "1", "--interval", "0.1"])
            .success()?;
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
                let mut outer =
                    Ipv4Header::new(inner.len() as u16, 64, IpNumber::IPV4, GEN_ADDR.octets(), outer_dst.octets())
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
        let socket =
            UdpSocket::bind((VIP, SERVICE_PORT)).map_err(|err| fail(format!("binding {VIP}:{SERVICE_PORT}: {err}")))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        send()?;
        let mut received = Vec::new();
        let mut buf = [0u8; 2048];
        while received.len() < expected {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => received.push((buf[..n].to_vec(), from)),
                Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    break
                }
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
    ensure!(
        attached.stdout.contains(&format!("decapsulating IPIP for {BE_ADDR}")),
        "attach output: {}",
        attached.describe()
    );
    let programs = pair.be_xdp()?;
    ensure!(
        programs.len() == 1 && programs[0].0 == "xdp" && programs[0].2 == "l4lb_decap",
        "after decap attach: {programs:?}"
    );

    let payloads: Vec<Vec<u8>> =
        (0..FRAMES).map(|i| format!("l4lb decap datagram {i:02} {}", "x".repeat(i * 37)).into_bytes()).collect();
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

/// UDP datagrams from CLIENT6 port `first_port + i` to [VIP6]:SERVICE_PORT carrying `payloads[i]`.
fn client_datagrams6(first_port: u16, payloads: &[Vec<u8>]) -> Vec<Vec<u8>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let mut packet = Vec::new();
            etherparse::PacketBuilder::ipv6(CLIENT6.octets(), VIP6.octets(), 64)
                .udp(first_port + i as u16, SERVICE_PORT)
                .write(&mut packet, payload)
                .expect("building a UDP packet");
            packet
        })
        .collect()
}

/// What a UDP socket received: (payload, sender) per datagram.
type Received = Vec<(Vec<u8>, SocketAddr)>;

/// UDP sockets bound to `services` in the backend namespace: calls `send`
/// (in that namespace's thread) and returns what each socket received
/// (payload, sender) until `expected` datagrams arrived over all of them or
/// 3 s passed without one.
fn udp_services_receive(
    pair: &Pair,
    services: &[SocketAddr],
    send: impl FnOnce() -> TestResult + Send,
    expected: usize,
) -> TestResult<Vec<Received>> {
    in_netns(&pair.be, || {
        let mut sockets = Vec::new();
        for service in services {
            let socket = UdpSocket::bind(service).map_err(|err| fail(format!("binding {service}: {err}")))?;
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
            sockets.push(socket);
        }
        send()?;
        let mut received = vec![Vec::new(); sockets.len()];
        let mut buf = [0u8; 2048];
        let mut last = Instant::now();
        while received.iter().map(Vec::len).sum::<usize>() < expected && last.elapsed() < Duration::from_secs(3) {
            for ((socket, got), service) in sockets.iter().zip(&mut received).zip(services) {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        got.push((buf[..n].to_vec(), from));
                        last = Instant::now();
                    }
                    Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    }
                    Err(err) => return Err(fail(format!("receiving on {service}: {err}"))),
                }
            }
        }
        Ok(received)
    })
}

/// IPv6 outer headers on a real interface: IPv6-in-IPv6 frames to an IPv6
/// service and IPv4-in-IPv6 frames to an IPv4 one, both for the backend's
/// IPv6 address, reach their sockets; the addresses come from the veth when
/// no --addr is given, and show in `decap stats`.
fn end_to_end_ipv6_outer_udp_services() -> TestResult {
    const FRAMES: usize = 20;
    let pair = Pair::with_ipv6(true)?;
    let dev = pair.be_dev.as_str();
    let attached = pair.l4lb(&["decap", "attach", "-i", dev]).success()?;
    let wanted = format!("decapsulating IPIP for {BE_ADDR}, {LOCAL6} (from {dev}'s addresses)");
    ensure!(attached.stdout.contains(&wanted), "attach output (link-local left out?): {}", attached.describe());

    let payloads6: Vec<Vec<u8>> =
        (0..FRAMES).map(|i| format!("6in6 datagram {i:02} {}", "v".repeat(i * 61)).into_bytes()).collect();
    let payloads4: Vec<Vec<u8>> =
        (0..FRAMES).map(|i| format!("4in6 datagram {i:02} {}", "w".repeat(i * 29)).into_bytes()).collect();
    let inners = [client_datagrams6(43000, &payloads6), client_datagrams(44000, &payloads4)].concat();
    for inner in &inners {
        ensure!(checksums_right(inner), "built a client datagram with a wrong checksum: {}", common::hex(inner));
    }
    let frames: Vec<Vec<u8>> = inners
        .into_iter()
        .map(|inner| {
            let mut frame = Ip6in::to(LOCAL6, inner).frame();
            frame[..6].copy_from_slice(&pair.be_mac);
            frame[6..12].copy_from_slice(&pair.gen_mac);
            frame
        })
        .collect();
    let services = [SocketAddr::new(VIP6.into(), SERVICE_PORT), SocketAddr::new(VIP.into(), SERVICE_PORT)];
    let send = || in_netns(&pair.gen, || send_frames(&pair.gen_dev, &frames));
    let mut got = udp_services_receive(&pair, &services, send, 2 * FRAMES)?;
    let got4 = got.pop().unwrap_or_default();
    let got6 = got.pop().unwrap_or_default();
    check_received_from(got6, services[0], CLIENT6.into(), 43000, &payloads6)?;
    check_received_from(got4, services[1], CLIENT.into(), 44000, &payloads4)?;

    let stats = pair.decap_stats()?;
    let counters = stats["counters"].as_object().ok_or_else(|| fail(format!("no counters in {stats}")))?;
    ensure!(
        counters["decapsulated"] == 2 * FRAMES,
        "decapsulated {}, want {}: {stats}",
        counters["decapsulated"],
        2 * FRAMES
    );
    for (name, value) in counters.iter().filter(|(name, _)| name.starts_with("drop_")) {
        ensure!(value == 0, "{name} is {value}, want 0: {stats}");
    }
    ensure!(stats["addrs"] == serde_json::json!([BE_ADDR.to_string(), LOCAL6.to_string()]), "stats: {stats}");
    let table = pair.l4lb(&["decap", "stats", "-i", dev, "--count", "1", "--interval", "0.1"]).success()?;
    ensure!(table.stdout.contains(&format!("Addresses: {BE_ADDR}, {LOCAL6}\n")), "{}", table.describe());

    // Only the IPv6 address: IPIP for the IPv4 one passes (the stack has no
    // ipip handler and drops it), 6in6 still arrives.
    pair.l4lb(&["decap", "attach", "-i", dev, "--force", "--addr", &LOCAL6.to_string()]).success()?;
    let stats = pair.decap_stats()?;
    ensure!(stats["addrs"] == serde_json::json!([LOCAL6.to_string()]), "stats after --addr {LOCAL6}: {stats}");
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| format!("again {i}").into_bytes()).collect();
    let mut frames: Vec<Vec<u8>> = pair.ipip_frames(BE_ADDR, 45000, &payloads);
    frames.extend(client_datagrams6(46000, &payloads).into_iter().map(|inner| {
        let mut frame = Ip6in::to(LOCAL6, inner).frame();
        frame[..6].copy_from_slice(&pair.be_mac);
        frame[6..12].copy_from_slice(&pair.gen_mac);
        frame
    }));
    let send = || in_netns(&pair.gen, || send_frames(&pair.gen_dev, &frames));
    // Waits for 6, so it waits out its 3 s: nothing may reach the IPv4 service.
    let mut got = udp_services_receive(&pair, &services, send, 6)?;
    let got4 = got.pop().unwrap_or_default();
    let got6 = got.pop().unwrap_or_default();
    check_received_from(got6, services[0], CLIENT6.into(), 46000, &payloads)?;
    ensure!(got4.is_empty(), "IPIP for an address no longer listed reached the IPv4 service: {got4:?}");
    let stats = pair.decap_stats()?;
    ensure!(
        stats["counters"]["decapsulated"] == 3 && stats["counters"]["passed"].as_u64() >= Some(3),
        "stats: {stats}"
    );

    pair.l4lb(&["decap", "detach", "-i", dev]).success()?;
    ensure!(pair.be_xdp()?.is_empty(), "XDP left on {dev}: {:?}", pair.be_xdp()?);
    Ok(())
}

/// The service got exactly `payloads`, the i-th from CLIENT port `first_port + i`.
fn check_received(got: Vec<(Vec<u8>, SocketAddr)>, first_port: u16, payloads: &[Vec<u8>]) -> TestResult {
    check_received_from(got, SocketAddr::new(VIP.into(), SERVICE_PORT), CLIENT.into(), first_port, payloads)
}

/// The service on `service` got exactly `payloads`, the i-th from `client` port `first_port + i`.
fn check_received_from(
    mut got: Vec<(Vec<u8>, SocketAddr)>,
    service: SocketAddr,
    client: IpAddr,
    first_port: u16,
    payloads: &[Vec<u8>],
) -> TestResult {
    got.sort();
    let want: Vec<(Vec<u8>, SocketAddr)> =
        payloads.iter().enumerate().map(|(i, p)| (p.clone(), SocketAddr::new(client, first_port + i as u16))).collect();
    ensure!(
        got == want,
        "the service on {service} received {} of {} datagrams, or not as sent; got: {:?}",
        got.len(),
        payloads.len(),
        got.iter()
            .map(|(p, from)| (String::from_utf8_lossy(&p[..p.len().min(24)]).into_owned(), *from))
            .collect::<Vec<_>>()
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

    let payloads: Vec<Vec<u8>> =
        (0..FRAMES).map(|i| format!("through the balancer {i:02} {}", "y".repeat(i * 53)).into_bytes()).collect();
    let frames: Vec<Vec<u8>> = client_datagrams(42000, &payloads)
        .iter()
        .map(|packet| [&pair.gen_mac[..], &pair.be_mac, &ETHERTYPE_IPV4.to_be_bytes(), packet].concat())
        .collect();
    // Sent from the backend's side of the pair, to the balancer's MAC.
    check_received(udp_service_receives(&pair, || send_frames(&pair.be_dev, &frames), FRAMES)?, 42000, &payloads)?;

    let decap = pair.decap_stats()?;
    ensure!(decap["counters"]["decapsulated"] == FRAMES, "decap stats: {decap}");
    let out =
        pair.l4lb_gen(&["stats", "-i", &pair.gen_dev, "--json", "--count", "1", "--interval", "0.1"]).success()?;
    let balancer: Value =
        serde_json::from_str(out.stdout.trim()).map_err(|err| fail(format!("{}: {err}", out.describe())))?;
    ensure!(balancer["counters"]["tx"] == FRAMES, "balancer stats: {balancer}");
    Ok(())
}

fn end_to_end_cli_errors_and_foreign_programs() -> TestResult {
    let pair = Pair::new()?;
    let dev = pair.be_dev.as_str();

    error_containing(
        pair.l4lb(&["decap", "stats", "-i", dev, "--count", "1"]),
        &format!("no l4lb decap program on {dev}"),
    )?;
    error_containing(pair.l4lb(&["decap", "detach", "-i", dev]), &format!("no l4lb decap program on {dev}"))?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", "nosuchdev0"]), "nosuchdev0")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--addr", "ff02::1"]), "ff02::1: it is multicast")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--addr", "::ffff:192.0.2.2"]), "IPv4-mapped")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--addr", "127.0.0.1"]), "127.0.0.1")?;
    ensure!(pair.be_xdp()?.is_empty(), "a refused attach left a program: {:?}", pair.be_xdp()?);

    pair.l4lb(&["decap", "attach", "-i", dev]).success()?;
    let first = pair.be_xdp()?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev]), "--force")?;
    error_containing(pair.l4lb(&["decap", "attach", "-i", dev, "--mode", "skb"]), "--force")?;
    ensure!(pair.be_xdp()? == first, "a refused attach changed the programs: {:?}, was {first:?}", pair.be_xdp()?);

    let other = Ipv4Addr::new(198, 18, 0, 9);
    pair.l4lb(&[
        "decap",
        "attach",
        "-i",
        dev,
        "--force",
        "--mode",
        "skb",
        "--addr",
        &VIP.to_string(),
        &other.to_string(),
    ])
    .success()?;
    let generic = pair.be_xdp()?;
    ensure!(
        generic.len() == 1 && generic[0].0 == "xdpgeneric" && generic[0].2 == "l4lb_decap",
        "after --force --mode skb: {generic:?}"
    );
    let stats = pair.decap_stats()?;
    ensure!(
        stats["mode"] == "generic" && stats["addrs"] == serde_json::json!([other.to_string(), VIP.to_string()]),
        "stats: {stats}"
    );

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
