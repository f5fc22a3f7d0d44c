//! The frames the benchmark sends, built on the host: the template the
//! generator (`bench_gen` in src/bpf/l4lb_bench.bpf.c) copies into every
//! frame it sends, the settings that tell it where to write, and a model of what it
//! then changes (the last two bytes of the client address, the client port,
//! the checksums), so that the two can be compared. Also the services the
//! frames are sent to. Pure.
//!
//! Every row but one draws a new client address and port for every frame: a
//! new flow each time. The 64-services row also draws the destination, one
//! of `SPREAD_SERVICES` VIPs. The TCP ACK row draws from a bounded set of flows
//! (`ACK_FLOWS`: 16 bits of address, one port), so that once l4lb has pinned
//! them (connection tracking) every frame finds its pin.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Size of the template the generator copies (`BENCH_TEMPLATE_LEN`).
pub const TEMPLATE_LEN: usize = 80;
/// Header bytes the generator writes: at least a minimum frame
/// (`BENCH_MIN_FRAME`), Ethernet + IPv4 with options + TCP
/// (`BENCH_OPTIONS_HEADER`), Ethernet + IPv6 + TCP (`BENCH_IPV6_HEADER`).
pub const MIN_FRAME: usize = 60;
pub const OPTIONS_HEADER: usize = 66;
pub const IPV6_HEADER: usize = 74;
const _: () = assert!(IPV6_HEADER <= TEMPLATE_LEN);
/// Size of the generator's settings (`struct bench_gen_config`): offsets,
/// masks and the frame's length (24 bytes), then the template.
pub const GEN_CONFIG_LEN: usize = 24 + TEMPLATE_LEN;
/// IPv4 clients are 198.18.0.0/16 (the benchmarking range), ports 32768-65535.
pub const CLIENT_NET: u32 = 0xc612_0000;
/// IPv6 clients are 2001:db8:18::/112 (the last 16 bits drawn).
pub const CLIENT6_NET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0);
/// Distinct flows of the TCP ACK row: its random word is masked with
/// `ACK_FLOW_MASK` (the address's last 16 bits; the port stays 32768).
pub const ACK_FLOW_MASK: u32 = 0x0000_ffff;
pub const ACK_FLOWS: u64 = ACK_FLOW_MASK as u64 + 1;

/// The IPv4 VIP: TCP port 80 and UDP port 53, IPv4 backends.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// An IPv4 VIP with IPv6 backends (IPv4 in IPv6), TCP port 80.
pub const VIP4_TO_6: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// The IPv6 VIP, TCP port 80, IPv6 backends.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 1);
/// An address no VIP takes: the catch-all's traffic.
pub const NO_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 9);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// The port of the service the rows in transition go to (TCP, on `VIP4`):
/// 32 backends, and a 33rd added just before each round of those rows, so
/// that about 1/33 of its slots are in transition while they are measured.
pub const CHANGE_PORT: u16 = 81;
/// The 64-services row: VIPs `SPREAD_BASE` + 0 .. `SPREAD_SERVICES` - 1
/// (198.19.4.128 - 198.19.4.191), TCP port 80, 512 IPv4 backends each. The
/// generator adds a random number below `SPREAD_SERVICES` to the address's
/// last byte (128: the sum never carries out of it).
pub const SPREAD_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 4, 128);
pub const SPREAD_SERVICES: usize = 64;
const SPREAD_MASK: u16 = SPREAD_SERVICES as u16 - 1;
const _: () = assert!(SPREAD_SERVICES.is_power_of_two() && 128 + SPREAD_SERVICES <= 256);

const TCP: u8 = 6;
const UDP: u8 = 17;
const IPV4_DF: u16 = 0x4000;

/// The packet kinds of the benchmark (one row each). Sizes follow RFC 2544: a
/// "64 B" frame is 64 bytes on the wire with its FCS, 60 bytes in the buffer;
/// "1500 B" is an IPv4 packet of 1500 bytes (a 1514-byte buffer); the IPv6
/// SYN is the shortest IPv6 TCP frame, 74 bytes (78 with FCS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// TCP SYN to the IPv4 VIP, port 80, no payload, padded to the minimum frame.
    #[serde(rename = "tcp_syn_64")]
    TcpSyn64,
    /// TCP ACK (no SYN) to the IPv4 VIP, port 80, no payload: established
    /// traffic from `ACK_FLOWS` flows, each pinned after its first segment.
    #[serde(rename = "tcp_ack_64")]
    TcpAck64,
    /// UDP to the IPv4 VIP, port 53, 18 bytes of payload.
    #[serde(rename = "udp_64")]
    Udp64,
    /// TCP segment with 1460 bytes of payload: a full 1500-byte IPv4 packet.
    #[serde(rename = "tcp_1500")]
    Tcp1500,
    /// TCP SYN behind an IPv4 header with 12 bytes of options (IHL 8).
    #[serde(rename = "ipv4_options")]
    Ipv4Options,
    /// IPv6 TCP SYN to the IPv6 VIP, IPv6 backends (IPv6 in IPv6).
    #[serde(rename = "ipv6_tcp_syn_74")]
    Ipv6Syn,
    /// IPv4 TCP SYN to an IPv4 VIP with IPv6 backends (IPv4 in IPv6).
    #[serde(rename = "tcp_syn_64_4in6")]
    Syn4in6,
    /// IPv4 TCP SYN to an address no VIP takes: the catch-all (the seed's mode).
    #[serde(rename = "catch_all_tcp_syn_64")]
    CatchAll,
    /// TCP ACK from `ACK_FLOWS` established flows to the change service, a
    /// 33rd backend just added: the flows of its slots in transition go to
    /// their previous backend, pinned.
    #[serde(rename = "tcp_ack_64_transition")]
    AckChanged,
    /// TCP SYN from random clients to the change service, a 33rd backend
    /// just added: a SYN in a slot in transition pins its flow.
    #[serde(rename = "tcp_syn_64_transition")]
    SynChanged,
    /// TCP SYN from random clients to one of `SPREAD_SERVICES` VIPs (drawn
    /// per frame), 512 backends each: every service's table in use.
    #[serde(rename = "tcp_syn_64_spread")]
    Spread64,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::TcpSyn64,
        Kind::TcpAck64,
        Kind::Udp64,
        Kind::Tcp1500,
        Kind::Ipv4Options,
        Kind::Ipv6Syn,
        Kind::Syn4in6,
        Kind::CatchAll,
        Kind::AckChanged,
        Kind::SynChanged,
        Kind::Spread64,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::TcpSyn64 => "TCP SYN 64 B",
            Kind::TcpAck64 => "TCP ACK 64 B",
            Kind::Udp64 => "UDP 64 B",
            Kind::Tcp1500 => "TCP 1500 B",
            Kind::Ipv4Options => "IPv4 options",
            Kind::Ipv6Syn => "IPv6 SYN 78 B",
            Kind::Syn4in6 => "4in6 SYN 64 B",
            Kind::CatchAll => "catch-all 64 B",
            Kind::AckChanged => "ACK, 33rd added",
            Kind::SynChanged => "SYN, 33rd added",
            Kind::Spread64 => "64 services",
        }
    }

    /// What the row measures, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::TcpSyn64 => "IPv4 TCP SYN to the VIP's port 80, IPv4 backends (IPIP)",
            Kind::TcpAck64 => "IPv4 TCP ACK to the VIP's port 80 from 65536 flows (established), IPv4 backends (IPIP)",
            Kind::Udp64 => "IPv4 UDP, 18 bytes of payload, to the VIP's port 53, IPv4 backends (IPIP)",
            Kind::Tcp1500 => "IPv4 TCP, 1460 bytes of payload, to the VIP's port 80, IPv4 backends (IPIP)",
            Kind::Ipv4Options => "IPv4 TCP SYN with 12 bytes of IPv4 options to the VIP's port 80 (IPIP)",
            Kind::Ipv6Syn => "IPv6 TCP SYN (74-byte buffer) to an IPv6 VIP, IPv6 backends (6in6)",
            Kind::Syn4in6 => "IPv4 TCP SYN to an IPv4 VIP with IPv6 backends (4in6)",
            Kind::CatchAll => "IPv4 TCP SYN to an address no VIP takes: the catch-all service (IPIP)",
            Kind::AckChanged => "IPv4 TCP ACK from 65536 established flows to port 81, 32 backends and a 33rd added just before the round (IPIP)",
            Kind::SynChanged => "IPv4 TCP SYN from random clients to port 81, 32 backends and a 33rd added just before the round (IPIP)",
            Kind::Spread64 => "IPv4 TCP SYN from random clients to 64 VIPs (198.19.4.128-191 port 80, drawn per frame), 512 backends each: a second l4lb pair holding those 64 services, every table in use (IPIP)",
        }
    }

    /// What connection tracking does with the row's frames in l4lb (every
    /// service of the bench tracks flows): in steady slots nothing; in the
    /// rows measured right after a change, the frames of the slots in
    /// transition (about 1/33) look their pin up: an ACK finds the pin of
    /// its established flow, a SYN pins its new flow.
    pub fn tracking(self) -> &'static str {
        match self {
            Kind::AckChanged => "1/33: pin hit",
            Kind::SynChanged => "1/33: new pin",
            _ => "nothing (steady)",
        }
    }

    /// Whether the row is measured right after a table change (slots in transition).
    pub fn changed(self) -> bool {
        matches!(self, Kind::AckChanged | Kind::SynChanged)
    }

    /// The random word's mask: what the generator draws the client from.
    pub fn random_mask(self) -> u32 {
        if matches!(self, Kind::TcpAck64 | Kind::AckChanged) {
            ACK_FLOW_MASK
        } else {
            u32::MAX
        }
    }

    /// Distinct flows the row draws from, when bounded.
    pub fn flows(self) -> Option<u64> {
        (self.random_mask() != u32::MAX).then(|| u64::from(self.random_mask()) + 1)
    }

    /// Bytes in the buffer (no FCS).
    pub fn frame_len(self) -> usize {
        match self {
            Kind::TcpSyn64
            | Kind::TcpAck64
            | Kind::Udp64
            | Kind::Syn4in6
            | Kind::CatchAll
            | Kind::AckChanged
            | Kind::SynChanged
            | Kind::Spread64 => 60,
            Kind::Tcp1500 => ETH_LEN + 1500,
            Kind::Ipv4Options => ETH_LEN + 32 + 20,
            Kind::Ipv6Syn => ETH_LEN + 40 + 20,
        }
    }

    pub fn is_ipv6(self) -> bool {
        self == Kind::Ipv6Syn
    }

    pub fn ip_header_len(self) -> usize {
        match self {
            Kind::Ipv4Options => 32,
            Kind::Ipv6Syn => 40,
            _ => 20,
        }
    }

    pub fn is_udp(self) -> bool {
        self == Kind::Udp64
    }

    /// Whether the row's backends are IPv6: l4lb and the floor push an outer
    /// IPv6 header (40 bytes) instead of an IPv4 one (20).
    pub fn outer_ipv6(self) -> bool {
        matches!(self, Kind::Ipv6Syn | Kind::Syn4in6)
    }

    /// Bytes the encapsulation adds.
    pub fn overhead(self) -> usize {
        if self.outer_ipv6() {
            40
        } else {
            20
        }
    }

    /// The destination the frames go to.
    pub fn dst(self) -> IpAddr {
        match self {
            Kind::Ipv6Syn => VIP6.into(),
            Kind::Syn4in6 => VIP4_TO_6.into(),
            Kind::CatchAll => NO_VIP.into(),
            Kind::Spread64 => SPREAD_BASE.into(),
            _ => VIP4.into(),
        }
    }

    /// What the generator's second random number is masked with: 0 but for
    /// the 64-services row (`SPREAD_SERVICES` - 1).
    pub fn dst_mask(self) -> u16 {
        if self == Kind::Spread64 {
            SPREAD_MASK
        } else {
            0
        }
    }

    /// The destination of a frame whose second random number is `dst_random`.
    pub fn dst_of(self, dst_random: u32) -> IpAddr {
        match self.dst() {
            IpAddr::V4(base) => Ipv4Addr::from(u32::from(base) + (dst_random & u32::from(self.dst_mask()))).into(),
            dst => dst,
        }
    }

    pub fn dport(self) -> u16 {
        if self.is_udp() {
            UDP_PORT
        } else if self.changed() {
            CHANGE_PORT
        } else {
            TCP_PORT
        }
    }

    fn l4_header_len(self) -> usize {
        if self.is_udp() {
            8
        } else {
            20
        }
    }

    /// L3 length: IPv4 total length, IPv6 40 + payload length.
    pub fn ip_len(self) -> usize {
        match self {
            Kind::Udp64 => 20 + 8 + 18,
            Kind::Tcp1500 => 1500,
            _ => self.ip_header_len() + 20,
        }
    }

    pub fn l4_offset(self) -> usize {
        ETH_LEN + self.ip_header_len()
    }

    /// Header bytes the generator copies from the template.
    pub fn header_len(self) -> usize {
        (self.l4_offset() + self.l4_header_len()).max(MIN_FRAME)
    }

    /// Offset of the TCP or UDP checksum in the frame.
    fn l4_checksum_offset(self) -> usize {
        self.l4_offset() + if self.is_udp() { 6 } else { 16 }
    }

    /// Offset of the last two bytes of the client address.
    fn addr_offset(self) -> usize {
        if self.is_ipv6() {
            ETH_LEN + 8 + 14
        } else {
            ETH_LEN + 12 + 2
        }
    }

    /// Offset of the last two bytes of the destination address.
    fn dst_offset(self) -> usize {
        if self.is_ipv6() {
            ETH_LEN + 24 + 14
        } else {
            ETH_LEN + 16 + 2
        }
    }

    /// Offset of the IPv4 header checksum (None for IPv6).
    fn ip_checksum_offset(self) -> Option<usize> {
        (!self.is_ipv6()).then_some(ETH_LEN + 10)
    }
}

/// Who sends to whom: MACs of the two veth ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The client address and port the generator derives from one random word
/// for `kind`: the word is masked with the kind's `random_mask()`, then its
/// low 16 bits are the address's last two bytes, its high 15 the port's.
pub fn client_of(kind: Kind, random: u32) -> (IpAddr, u16) {
    let random = random & kind.random_mask();
    let port = ((random >> 16) as u16) | 0x8000;
    if kind.is_ipv6() {
        let mut octets = CLIENT6_NET.octets();
        octets[14..].copy_from_slice(&(random as u16).to_be_bytes());
        (Ipv6Addr::from(octets).into(), port)
    } else {
        (Ipv4Addr::from(CLIENT_NET | (random & 0xffff)).into(), port)
    }
}

/// The client address and port written in a frame of `kind`.
pub fn client_in(kind: Kind, f: &[u8]) -> (IpAddr, u16) {
    let addr = if kind.is_ipv6() {
        IpAddr::from(<[u8; 16]>::try_from(&f[ETH_LEN + 8..ETH_LEN + 24]).expect("16 bytes"))
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&f[ETH_LEN + 12..ETH_LEN + 16]).expect("4 bytes"))
    };
    let l4 = kind.l4_offset();
    (addr, u16::from_be_bytes([f[l4], f[l4 + 1]]))
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is padded).
fn sum16(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The destination address written in a frame of `kind`.
pub fn dst_in(kind: Kind, f: &[u8]) -> IpAddr {
    if kind.is_ipv6() {
        IpAddr::from(<[u8; 16]>::try_from(&f[ETH_LEN + 24..ETH_LEN + 40]).expect("16 bytes"))
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&f[ETH_LEN + 16..ETH_LEN + 20]).expect("4 bytes"))
    }
}

/// A whole frame from `client`:`port` to the kind's (first) destination,
/// checksums correct. `client` must be of the kind's family.
pub fn frame(kind: Kind, ends: &Endpoints, client: IpAddr, port: u16) -> Vec<u8> {
    frame_to(kind, ends, client, port, kind.dst())
}

/// The same to destination `dst` (of the kind's family).
pub fn frame_to(kind: Kind, ends: &Endpoints, client: IpAddr, port: u16, dst: IpAddr) -> Vec<u8> {
    assert_eq!(client.is_ipv6(), kind.is_ipv6(), "client family of {kind:?}");
    assert_eq!(dst.is_ipv6(), kind.is_ipv6(), "destination family of {kind:?}");
    let mut f = vec![0u8; kind.frame_len()];
    f[0..6].copy_from_slice(&ends.dst_mac);
    f[6..12].copy_from_slice(&ends.src_mac);
    let proto = if kind.is_udp() { UDP } else { TCP };
    let ihl = kind.ip_header_len();
    let (src, dst) = (octets(client), octets(dst));
    if kind.is_ipv6() {
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        let ip = &mut f[ETH_LEN..ETH_LEN + 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&((kind.ip_len() - 40) as u16).to_be_bytes());
        ip[6] = proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
    } else {
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[ETH_LEN..ETH_LEN + ihl];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[1] = 0;
        ip[2..4].copy_from_slice(&(kind.ip_len() as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0u16.to_be_bytes());
        ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        if ihl > 20 {
            // Record Route with two empty slots, then End of Options List.
            ip[20..23].copy_from_slice(&[7, 11, 4]);
        }
        let check = fold(sum16(ip));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
    }

    let l4 = kind.l4_offset();
    let end = ETH_LEN + kind.ip_len();
    f[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&kind.dport().to_be_bytes());
    if kind.is_udp() {
        f[l4 + 4..l4 + 6].copy_from_slice(&((end - l4) as u16).to_be_bytes());
        for (i, byte) in f[l4 + 8..end].iter_mut().enumerate() {
            *byte = b'a' + i as u8;
        }
    } else {
        f[l4 + 4..l4 + 8].copy_from_slice(&0x1b5c_0f2au32.to_be_bytes());
        f[l4 + 12] = 5 << 4;
        if kind == Kind::Tcp1500 {
            f[l4 + 8..l4 + 12].copy_from_slice(&0x0000_0001u32.to_be_bytes());
            f[l4 + 13] = 0x18; // PSH, ACK
            for (i, byte) in f[l4 + 20..end].iter_mut().enumerate() {
                *byte = (i % 251) as u8;
            }
        } else if matches!(kind, Kind::TcpAck64 | Kind::AckChanged) {
            f[l4 + 8..l4 + 12].copy_from_slice(&0x0000_0001u32.to_be_bytes());
            f[l4 + 13] = 0x10; // ACK
        } else {
            f[l4 + 13] = 0x02; // SYN
        }
        f[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
    }
    // Pseudo-header (RFC 768/793, RFC 8200 8.1), then the segment.
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(((end - l4) as u32) | u32::from(proto) << 16).to_be_bytes()[..]);
    let mut check = fold(sum16(&pseudo) + sum16(&f[l4..end]));
    if kind.is_udp() && check == 0 {
        check = 0xffff;
    }
    let at = kind.l4_checksum_offset();
    f[at..at + 2].copy_from_slice(&check.to_be_bytes());
    f
}

/// The generator's template: the first bytes of the frame sent from the
/// client whose last two address bytes are 0, port 0, checksums computed for
/// those zeros.
pub fn template(kind: Kind, ends: &Endpoints) -> [u8; TEMPLATE_LEN] {
    let zero = frame(kind, ends, client_of(kind, 0).0, 0);
    let mut out = [0u8; TEMPLATE_LEN];
    let n = zero.len().min(TEMPLATE_LEN);
    out[..n].copy_from_slice(&zero[..n]);
    out
}

/// The value of the generator's settings map (`struct bench_gen_config`,
/// native byte order): what to copy, where to write, the random word's
/// mask, the destination's offset and mask, the frame's length, and the
/// template.
pub fn gen_config(kind: Kind, ends: &Endpoints) -> Vec<u8> {
    let mut value = Vec::with_capacity(GEN_CONFIG_LEN);
    for field in [
        kind.header_len(),
        kind.addr_offset(),
        kind.l4_offset(),
        kind.ip_checksum_offset().unwrap_or(0),
        kind.l4_checksum_offset(),
        usize::from(kind.is_udp()),
    ] {
        value.extend_from_slice(&(field as u16).to_ne_bytes());
    }
    value.extend_from_slice(&kind.random_mask().to_ne_bytes());
    value.extend_from_slice(&(kind.dst_offset() as u16).to_ne_bytes());
    value.extend_from_slice(&kind.dst_mask().to_ne_bytes());
    value.extend_from_slice(&(kind.frame_len() as u16).to_ne_bytes());
    value.extend_from_slice(&[0; 2]);
    value.extend_from_slice(&template(kind, ends));
    value
}

/// What the generator does to a frame after copying the template: set the
/// last two bytes of the client address and the port from `random` (masked
/// with the kind's `random_mask()`), add `dst_random` masked with the kind's
/// `dst_mask()` to the destination's last two bytes, and fix the checksums
/// incrementally (RFC 1624: the fields were 0 when the checksums were
/// computed; the destination's added number lands in its last byte, which
/// does not carry).
pub fn randomize(f: &mut [u8], kind: Kind, random: u32, dst_random: u32) {
    let lo = (random & kind.random_mask()) as u16;
    let dst_add = dst_random as u16 & kind.dst_mask();
    let (_, port) = client_of(kind, random);
    let add = |f: &mut [u8], at: usize, words: &[u16]| {
        let old = u16::from_be_bytes([f[at], f[at + 1]]);
        let sum = u32::from(!old) + words.iter().map(|&w| u32::from(w)).sum::<u32>();
        fold(sum)
    };
    let at = kind.addr_offset();
    f[at..at + 2].copy_from_slice(&lo.to_be_bytes());
    let at = kind.dst_offset();
    let dst = u16::from_be_bytes([f[at], f[at + 1]]) + dst_add;
    f[at..at + 2].copy_from_slice(&dst.to_be_bytes());
    let l4 = kind.l4_offset();
    f[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    if let Some(at) = kind.ip_checksum_offset() {
        let check = add(f, at, &[lo, dst_add]);
        f[at..at + 2].copy_from_slice(&check.to_be_bytes());
    }
    let at = kind.l4_checksum_offset();
    let mut check = add(f, at, &[lo, port, dst_add]);
    if kind.is_udp() && check == 0 {
        check = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// A frame as the generator leaves it: `data_in` (whose bytes past the
/// template stay) with the template over its head, then randomized.
pub fn generated(kind: Kind, ends: &Endpoints, random: u32, dst_random: u32) -> Vec<u8> {
    let mut f = frame(kind, ends, client_of(kind, 0).0, 0);
    let header = kind.header_len();
    f[..header].copy_from_slice(&template(kind, ends)[..header]);
    randomize(&mut f, kind, random, dst_random);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDS: Endpoints = Endpoints { src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2] };

    /// RFC 1071 verification: the sum over a header including its checksum is 0xffff.
    fn verifies(bytes: &[u8]) -> bool {
        fold(sum16(bytes)) == 0
    }

    #[test]
    fn frames_have_their_sizes_and_valid_checksums() {
        for kind in Kind::ALL {
            let (client, port) = client_of(kind, 0x1234_0304);
            let f = frame(kind, &ENDS, client, port);
            assert_eq!(f.len(), kind.frame_len(), "{kind:?}");
            assert_eq!(client_in(kind, &f), (client, port | 0x8000), "{kind:?}");
            let l4 = kind.l4_offset();
            let end = ETH_LEN + kind.ip_len();
            let mut pseudo;
            if kind.is_ipv6() {
                assert_eq!(&f[12..14], &[0x86, 0xdd]);
                assert_eq!(f[ETH_LEN] >> 4, 6);
                assert_eq!(usize::from(u16::from_be_bytes([f[18], f[19]])) + 40, kind.ip_len());
                pseudo = f[ETH_LEN + 8..ETH_LEN + 40].to_vec();
                pseudo.extend_from_slice(&((end - l4) as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, f[ETH_LEN + 6]]);
            } else {
                let ihl = kind.ip_header_len();
                assert_eq!(usize::from(f[ETH_LEN] & 0xf) * 4, ihl);
                assert_eq!(usize::from(u16::from_be_bytes([f[16], f[17]])), kind.ip_len());
                assert!(verifies(&f[ETH_LEN..ETH_LEN + ihl]), "{kind:?}: IPv4 checksum");
                pseudo = f[ETH_LEN + 12..ETH_LEN + 20].to_vec();
                pseudo.extend_from_slice(&[0, f[ETH_LEN + 9]]);
                pseudo.extend_from_slice(&((end - l4) as u16).to_be_bytes());
            }
            pseudo.extend_from_slice(&f[l4..end]);
            assert!(verifies(&pseudo), "{kind:?}: L4 checksum");
            assert_eq!(u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]), kind.dport());
        }
        let syn = frame(Kind::TcpSyn64, &ENDS, Ipv4Addr::LOCALHOST.into(), 1);
        assert_eq!(syn[ETH_LEN + 20 + 13], 0x02, "SYN");
        let ack = frame(Kind::TcpAck64, &ENDS, Ipv4Addr::LOCALHOST.into(), 1);
        assert_eq!(ack[ETH_LEN + 20 + 13], 0x10, "ACK without SYN");
        assert_eq!(ack.len(), 60);
        assert_eq!(Kind::Tcp1500.frame_len(), 1514);
        assert_eq!(Kind::Ipv6Syn.frame_len(), 74);
        assert_eq!(Kind::Ipv6Syn.header_len(), IPV6_HEADER);
        assert_eq!(Kind::Ipv4Options.header_len(), OPTIONS_HEADER);
    }

    #[test]
    fn incremental_checksums_match_a_full_computation() {
        let mut random = 0x1234_5678u32;
        for _ in 0..2000 {
            random ^= random << 13;
            random ^= random >> 17;
            random ^= random << 5;
            let dst_random = random.rotate_left(7);
            for kind in Kind::ALL {
                let (client, port) = client_of(kind, random);
                let want = frame_to(kind, &ENDS, client, port, kind.dst_of(dst_random));
                assert_eq!(generated(kind, &ENDS, random, dst_random), want, "{kind:?} {random:#x}");
            }
        }
        // Extremes of the ranges, including sums that carry.
        for random in [0, u32::MAX, 0xffff, 0xffff_0000, 0x7fff_8000] {
            for kind in Kind::ALL {
                let (client, port) = client_of(kind, random);
                let want = frame_to(kind, &ENDS, client, port, kind.dst_of(random));
                assert_eq!(generated(kind, &ENDS, random, random), want, "{kind:?} {random:#x}");
            }
        }
    }

    #[test]
    fn clients_stay_in_the_benchmark_ranges() {
        assert_eq!(client_of(Kind::TcpSyn64, 0), (Ipv4Addr::new(198, 18, 0, 0).into(), 32768));
        assert_eq!(client_of(Kind::Udp64, u32::MAX), (Ipv4Addr::new(198, 18, 255, 255).into(), 65535));
        assert_eq!(client_of(Kind::Ipv6Syn, 0xffff_abcd), ("2001:db8:18::abcd".parse::<IpAddr>().unwrap(), 65535));
    }

    #[test]
    fn the_ack_row_draws_from_a_bounded_set_of_flows() {
        assert_eq!(Kind::TcpAck64.flows(), Some(ACK_FLOWS));
        assert_eq!(Kind::AckChanged.flows(), Some(ACK_FLOWS));
        assert_eq!(ACK_FLOWS, 65_536);
        assert!(Kind::ALL
            .iter()
            .filter(|&&k| !matches!(k, Kind::TcpAck64 | Kind::AckChanged))
            .all(|k| k.flows().is_none()));
        // Whatever the random word, the port is 32768 and the address one of 65536.
        let mut random = 0x9e37_79b9u32;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            random ^= random << 13;
            random ^= random >> 17;
            random ^= random << 5;
            let (client, port) = client_of(Kind::TcpAck64, random);
            assert_eq!(port, 32768);
            seen.insert(client);
            // The generator's frame (template + randomize) is the model's.
            if random.is_multiple_of(1024) {
                assert_eq!(
                    generated(Kind::TcpAck64, &ENDS, random, random),
                    frame(Kind::TcpAck64, &ENDS, client, port)
                );
            }
        }
        assert!(seen.len() as u64 <= ACK_FLOWS && seen.len() > 60_000, "{} flows", seen.len());
        assert_eq!(client_of(Kind::TcpAck64, 0xffff_ffff), (Ipv4Addr::new(198, 18, 255, 255).into(), 32768));
        assert_eq!(client_of(Kind::TcpSyn64, 0xffff_ffff), (Ipv4Addr::new(198, 18, 255, 255).into(), 65535));
    }

    #[test]
    fn template_and_settings_cover_every_header_byte() {
        for kind in Kind::ALL {
            assert!(kind.header_len() <= TEMPLATE_LEN, "{kind:?}");
            assert!(kind.header_len() <= kind.frame_len(), "{kind:?}");
            assert!([MIN_FRAME, OPTIONS_HEADER, IPV6_HEADER].contains(&kind.header_len()), "{kind:?}");
            let t = template(kind, &ENDS);
            let at = kind.addr_offset();
            assert_eq!(t[at..at + 2], [0, 0], "{kind:?}: address's last bytes 0 in the template");
            let l4 = kind.l4_offset();
            assert_eq!(t[l4..l4 + 2], [0, 0], "{kind:?}: port 0 in the template");
            let value = gen_config(kind, &ENDS);
            assert_eq!(value.len(), GEN_CONFIG_LEN);
            assert_eq!(usize::from(u16::from_ne_bytes([value[0], value[1]])), kind.header_len());
            assert!(value[..12].chunks(2).all(|w| u16::from_ne_bytes([w[0], w[1]]) < 0x80), "offsets below the mask");
            assert_eq!(u32::from_ne_bytes(value[12..16].try_into().unwrap()), kind.random_mask(), "{kind:?}");
            assert_eq!(usize::from(u16::from_ne_bytes([value[16], value[17]])), kind.dst_offset(), "{kind:?}");
            assert!(kind.dst_offset() < 0x80, "{kind:?}: destination offset below the mask");
            assert_eq!(u16::from_ne_bytes([value[18], value[19]]), kind.dst_mask(), "{kind:?}");
        }
    }

    #[test]
    fn the_spread_row_draws_each_of_its_vips() {
        let vips: std::collections::BTreeSet<IpAddr> =
            (0..4096u32).map(|r| Kind::Spread64.dst_of(r.wrapping_mul(0x9e37_79b9))).collect();
        let want: std::collections::BTreeSet<IpAddr> =
            (0..SPREAD_SERVICES as u32).map(|i| Ipv4Addr::from(u32::from(SPREAD_BASE) + i).into()).collect();
        assert_eq!(vips, want);
        assert_eq!(Kind::Spread64.dst_of(u32::MAX), IpAddr::from(Ipv4Addr::new(198, 19, 4, 191)));
        assert!(Kind::ALL
            .iter()
            .filter(|&&k| k != Kind::Spread64)
            .all(|k| k.dst_mask() == 0 && k.dst_of(u32::MAX) == k.dst()));
    }
}
