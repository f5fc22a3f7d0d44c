//! The frames the benchmark sends, built on the host: the template the
//! generator (`bench_gen` in src/bpf/l4lb_bench.bpf.c) copies into every live
//! frame, and a model of what it then changes (client address, client port,
//! both checksums), so that the two can be compared. Pure.

use std::net::Ipv4Addr;

use serde::Serialize;

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// Size of the template the generator copies (`BENCH_TEMPLATE_LEN`).
pub const TEMPLATE_LEN: usize = 72;
/// The most header bytes the generator writes (`BENCH_MAX_HEADER`).
pub const MAX_HEADER: usize = 66;
const _: () = assert!(MAX_HEADER <= TEMPLATE_LEN);
/// Clients are 198.18.0.0/16 (`BENCH_CLIENT_NET`), ports 32768-65535.
pub const CLIENT_NET: u32 = 0xc612_0000;

const TCP: u8 = 6;
const UDP: u8 = 17;
const IPV4_DF: u16 = 0x4000;

/// The packet kinds of the benchmark. Sizes follow RFC 2544: a "64 B" frame is
/// 64 bytes on the wire with its FCS, 60 bytes in the buffer; "1500 B" is an
/// IPv4 packet of 1500 bytes (a 1514-byte buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// TCP SYN, no payload, padded to the minimum frame.
    #[serde(rename = "tcp_syn_64")]
    TcpSyn64,
    /// UDP with 18 bytes of payload.
    #[serde(rename = "udp_64")]
    Udp64,
    /// TCP segment with 1460 bytes of payload: a full 1500-byte IPv4 packet.
    #[serde(rename = "tcp_1500")]
    Tcp1500,
    /// TCP SYN behind an IPv4 header with 12 bytes of options (IHL 8).
    #[serde(rename = "ipv4_options")]
    Ipv4Options,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::TcpSyn64, Kind::Udp64, Kind::Tcp1500, Kind::Ipv4Options];

    pub fn label(self) -> &'static str {
        match self {
            Kind::TcpSyn64 => "TCP SYN 64 B",
            Kind::Udp64 => "UDP 64 B",
            Kind::Tcp1500 => "TCP 1500 B",
            Kind::Ipv4Options => "IPv4 options",
        }
    }

    /// Bytes in the buffer (no FCS).
    pub fn frame_len(self) -> usize {
        match self {
            Kind::TcpSyn64 | Kind::Udp64 => 60,
            Kind::Tcp1500 => ETH_LEN + 1500,
            Kind::Ipv4Options => ETH_LEN + 32 + 20,
        }
    }

    pub fn ip_header_len(self) -> usize {
        if self == Kind::Ipv4Options {
            32
        } else {
            20
        }
    }

    pub fn is_udp(self) -> bool {
        self == Kind::Udp64
    }

    fn l4_header_len(self) -> usize {
        if self.is_udp() {
            8
        } else {
            20
        }
    }

    /// IPv4 total length.
    pub fn ip_len(self) -> usize {
        match self {
            Kind::TcpSyn64 | Kind::Ipv4Options => self.ip_header_len() + 20,
            Kind::Udp64 => 20 + 8 + 18,
            Kind::Tcp1500 => 1500,
        }
    }

    fn l4_offset(self) -> usize {
        ETH_LEN + self.ip_header_len()
    }

    /// Offset of the TCP or UDP checksum in the frame.
    fn l4_checksum_offset(self) -> usize {
        self.l4_offset() + if self.is_udp() { 6 } else { 16 }
    }
}

/// Who sends to whom: MACs of the two veth ends and the service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vip: Ipv4Addr,
}

/// The client address and port the generator derives from one random word.
pub fn client_of(random: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(CLIENT_NET | (random & 0xffff)), ((random >> 16) as u16) | 0x8000)
}

/// One's-complement sum of big-endian 16-bit words (an odd last byte is padded).
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A whole frame from `client`:`port` to the service, checksums correct.
pub fn frame(kind: Kind, ends: &Endpoints, client: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut f = vec![0u8; kind.frame_len()];
    f[0..6].copy_from_slice(&ends.dst_mac);
    f[6..12].copy_from_slice(&ends.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());

    let ihl = kind.ip_header_len();
    let ip = &mut f[ETH_LEN..ETH_LEN + ihl];
    ip[0] = 0x40 | (ihl / 4) as u8;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(kind.ip_len() as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0u16.to_be_bytes());
    ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    ip[8] = 64;
    ip[9] = if kind.is_udp() { UDP } else { TCP };
    ip[12..16].copy_from_slice(&client.octets());
    ip[16..20].copy_from_slice(&ends.vip.octets());
    if ihl > 20 {
        // Record Route with two empty slots, then End of Options List.
        ip[20..23].copy_from_slice(&[7, 11, 4]);
    }
    let check = fold(sum16(ip));
    ip[10..12].copy_from_slice(&check.to_be_bytes());

    let l4 = kind.l4_offset();
    let end = ETH_LEN + kind.ip_len();
    f[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    if kind.is_udp() {
        f[l4 + 2..l4 + 4].copy_from_slice(&53u16.to_be_bytes());
        f[l4 + 4..l4 + 6].copy_from_slice(&((end - l4) as u16).to_be_bytes());
        for (i, byte) in f[l4 + 8..end].iter_mut().enumerate() {
            *byte = b'a' + i as u8;
        }
    } else {
        f[l4 + 2..l4 + 4].copy_from_slice(&80u16.to_be_bytes());
        f[l4 + 4..l4 + 8].copy_from_slice(&0x1b5c_0f2au32.to_be_bytes());
        f[l4 + 12] = 5 << 4;
        if kind == Kind::Tcp1500 {
            f[l4 + 8..l4 + 12].copy_from_slice(&0x0000_0001u32.to_be_bytes());
            f[l4 + 13] = 0x18; // PSH, ACK
            for (i, byte) in f[l4 + 20..end].iter_mut().enumerate() {
                *byte = (i % 251) as u8;
            }
        } else {
            f[l4 + 13] = 0x02; // SYN
        }
        f[l4 + 14..l4 + 16].copy_from_slice(&64240u16.to_be_bytes());
    }
    // Pseudo-header, then the segment.
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&client.octets());
    pseudo.extend_from_slice(&ends.vip.octets());
    pseudo.extend_from_slice(&[0, f[ETH_LEN + 9]]);
    pseudo.extend_from_slice(&((end - l4) as u16).to_be_bytes());
    let mut check = fold(sum16(&pseudo) + sum16(&f[l4..end]));
    if kind.is_udp() && check == 0 {
        check = 0xffff;
    }
    let at = kind.l4_checksum_offset();
    f[at..at + 2].copy_from_slice(&check.to_be_bytes());
    f
}

/// The generator's template: the first bytes of the frame sent from 0.0.0.0
/// port 0, checksums computed for those zeros.
pub fn template(kind: Kind, ends: &Endpoints) -> [u8; TEMPLATE_LEN] {
    let zero = frame(kind, ends, Ipv4Addr::UNSPECIFIED, 0);
    let mut out = [0u8; TEMPLATE_LEN];
    let n = zero.len().min(TEMPLATE_LEN);
    out[..n].copy_from_slice(&zero[..n]);
    out
}

/// What the generator does to a frame after copying the template: set the
/// client address and port from `random` and fix both checksums incrementally
/// (RFC 1624: the fields were 0 when the checksums were computed).
pub fn randomize(f: &mut [u8], kind: Kind, random: u32) {
    let (client, port) = client_of(random);
    let add = |f: &mut [u8], at: usize, words: &[u16]| -> u16 {
        let old = u16::from_be_bytes([f[at], f[at + 1]]);
        let sum = u32::from(!old) + words.iter().map(|&w| u32::from(w)).sum::<u32>();
        fold(sum)
    };
    let octets = client.octets();
    let hi = u16::from_be_bytes([octets[0], octets[1]]);
    let lo = u16::from_be_bytes([octets[2], octets[3]]);
    let ip = ETH_LEN;
    f[ip + 12..ip + 16].copy_from_slice(&octets);
    let l4 = kind.l4_offset();
    f[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
    let check = add(f, ip + 10, &[hi, lo]);
    f[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    let at = kind.l4_checksum_offset();
    let mut check = add(f, at, &[hi, lo, port]);
    if kind.is_udp() && check == 0 {
        check = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// A frame as the generator leaves it: `data_in` (whose bytes past the
/// template stay) with the template over its head, then randomized.
pub fn generated(kind: Kind, ends: &Endpoints, random: u32) -> Vec<u8> {
    let mut f = frame(kind, ends, Ipv4Addr::UNSPECIFIED, 0);
    let header = (kind.l4_offset() + kind.l4_header_len()).max(60);
    f[..header].copy_from_slice(&template(kind, ends)[..header]);
    randomize(&mut f, kind, random);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDS: Endpoints = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vip: Ipv4Addr::new(198, 19, 0, 1),
    };

    /// RFC 1071 verification: the sum over a header including its checksum is 0xffff.
    fn verifies(bytes: &[u8]) -> bool {
        fold(sum16(bytes)) == 0
    }

    #[test]
    fn frames_have_their_sizes_and_valid_checksums() {
        for kind in Kind::ALL {
            let f = frame(kind, &ENDS, Ipv4Addr::new(198, 18, 3, 4), 40000);
            assert_eq!(f.len(), kind.frame_len(), "{kind:?}");
            let ihl = kind.ip_header_len();
            assert_eq!(usize::from(f[ETH_LEN] & 0xf) * 4, ihl);
            assert_eq!(usize::from(u16::from_be_bytes([f[16], f[17]])), kind.ip_len());
            assert!(verifies(&f[ETH_LEN..ETH_LEN + ihl]), "{kind:?}: IPv4 checksum");
            let l4 = ETH_LEN + ihl;
            let end = ETH_LEN + kind.ip_len();
            let mut pseudo = f[ETH_LEN + 12..ETH_LEN + 20].to_vec();
            pseudo.extend_from_slice(&[0, f[ETH_LEN + 9]]);
            pseudo.extend_from_slice(&((end - l4) as u16).to_be_bytes());
            pseudo.extend_from_slice(&f[l4..end]);
            assert!(verifies(&pseudo), "{kind:?}: L4 checksum");
        }
        assert_eq!(frame(Kind::TcpSyn64, &ENDS, Ipv4Addr::LOCALHOST, 1)[ETH_LEN + 20 + 13], 0x02, "SYN");
        assert_eq!(Kind::Tcp1500.frame_len(), 1514);
    }

    #[test]
    fn incremental_checksums_match_a_full_computation() {
        let mut random = 0x1234_5678u32;
        for _ in 0..2000 {
            random ^= random << 13;
            random ^= random >> 17;
            random ^= random << 5;
            for kind in Kind::ALL {
                let (client, port) = client_of(random);
                assert_eq!(generated(kind, &ENDS, random), frame(kind, &ENDS, client, port), "{kind:?} {random:#x}");
            }
        }
        // Extremes of the ranges, including sums that carry.
        for random in [0, u32::MAX, 0xffff, 0xffff_0000, 0x7fff_8000] {
            for kind in Kind::ALL {
                let (client, port) = client_of(random);
                assert_eq!(generated(kind, &ENDS, random), frame(kind, &ENDS, client, port), "{kind:?} {random:#x}");
            }
        }
    }

    #[test]
    fn clients_stay_in_the_benchmark_range() {
        assert_eq!(client_of(0), (Ipv4Addr::new(198, 18, 0, 0), 32768));
        assert_eq!(client_of(u32::MAX), (Ipv4Addr::new(198, 18, 255, 255), 65535));
    }

    #[test]
    fn template_covers_every_header_byte() {
        for kind in Kind::ALL {
            let header = kind.l4_offset() + kind.l4_header_len();
            assert!(header <= MAX_HEADER, "{kind:?}");
            let t = template(kind, &ENDS);
            assert_eq!(t[ETH_LEN + 12..ETH_LEN + 16], [0; 4], "client address 0 in the template");
        }
    }
}
