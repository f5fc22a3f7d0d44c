//! The balancer's XDP program under BPF_PROG_TEST_RUN, its maps filled
//! directly (not through the host's apply engine), and a reference model of
//! what it must do to a frame, written from the datapath semantics of issue 4
//! (docs: spec steps 1 to 8), issue 5's decisions (VLAN tags, IPv4 header
//! checksum, TTL 0, fragment entries, ICMP errors, too-big answers) and
//! include/l4lb.h, independently of src/bpf/.
//!
//! Map values are written as bytes laid out here from the header (so the
//! layouts are checked too); only the flow hash and the slot come from the
//! host's model (`Flow::hash`, `maglev::flow_slot`), which the suites check
//! against the datapath.
//!
//! Slots in transition (docs/transitions.md, include/l4lb.h "Connection
//! tracking") are modelled too: a slot word is a steady backend number (no
//! per-flow state at all), the empty word, or a word in transition (current |
//! TRANSITION | previous << 16: any word with the TRANSITION bit but the
//! empty one).
//! The model keeps its own copy of the pins (`Lb::flows`) and, for a frame
//! in a slot in transition, says which rule decides (a SYN, a pin that holds,
//! a flow from before the change, a new flow), what it finds and writes
//! (pins, re-pins, a full table, a pin's `seen` raised to the clock), and
//! `Lb::pin_applied` records it, so that the suites can compare the kernel's
//! l4lb_flows with the model's, entry by entry.
//!
//! Used by tests/datapath.rs (explicit expectations, cross-checked with the
//! model) and tests/fuzz.rs (the model is the expectation).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapMut, MapType, OpenObject, ProgramInput, ProgramMut};

use super::packet::internet_checksum;
use super::{fail, TestResult};
use l4lb::bpf::consts::*;
use l4lb::bpf::counter::*;
use l4lb::bpf::percpu_skel::{L4lbXdpPercpuSkel, L4lbXdpPercpuSkelBuilder};
use l4lb::bpf::skel::{L4lbXdpSkel, L4lbXdpSkelBuilder};
use l4lb::flow_hash::Flow;

pub const NCNT: usize = L4LB_CNT_MAX as usize;
pub const MAGLEV_SIZE: usize = L4LB_MAGLEV_SIZE as usize;
pub const MAX_SERVICES: usize = L4LB_MAX_SERVICES as usize;
pub const MAX_BACKENDS: usize = L4LB_MAX_BACKENDS as usize;
pub const VIP_SLOTS: usize = L4LB_VIP_SLOTS as usize;
pub const SLOT_EMPTY: u32 = L4LB_SLOT_EMPTY;

pub const ETH_LEN: usize = 14;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const HOPOPTS: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DSTOPTS: u8 = 60;

// ---------------------------------------------------------------- map values

/// struct l4lb_config, 52 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LbConfig {
    pub hash_seed: u32,
    pub flags: u32,
    pub mtu: u32,
    pub catch_all: u32,
    pub vip_probes: u32,
    pub src_v4: [u8; 4],
    pub src_v6: [u8; 16],
    pub gateway_mac: [u8; 6],
    /// The tick (seconds of the host's monotonic clock): pins' `seen`.
    pub clock: u32,
}

pub const CONFIG_LEN: usize = 52;

impl LbConfig {
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..4].copy_from_slice(&self.hash_seed.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.mtu.to_ne_bytes());
        b[12..16].copy_from_slice(&self.catch_all.to_ne_bytes());
        b[16..20].copy_from_slice(&self.vip_probes.to_ne_bytes());
        b[20..24].copy_from_slice(&self.src_v4);
        b[24..40].copy_from_slice(&self.src_v6);
        b[40..46].copy_from_slice(&self.gateway_mac);
        b[48..52].copy_from_slice(&self.clock.to_ne_bytes());
        b
    }
}

/// struct l4lb_service, 16 bytes: flags (L4LB_SERVICE_*), the tick of the
/// last change that put slots in transition, the UDP grace and the idle
/// timeout (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub flags: u32,
    pub changed: u32,
    pub udp_grace: u32,
    pub idle_timeout: u32,
}

pub const SERVICE_LEN: usize = 16;

impl ServiceEntry {
    pub fn bytes(&self) -> [u8; SERVICE_LEN] {
        let mut b = [0u8; SERVICE_LEN];
        b[0..4].copy_from_slice(&self.flags.to_ne_bytes());
        b[4..8].copy_from_slice(&self.changed.to_ne_bytes());
        b[8..12].copy_from_slice(&self.udp_grace.to_ne_bytes());
        b[12..16].copy_from_slice(&self.idle_timeout.to_ne_bytes());
        b
    }
}

/// A slot word of l4lb_tables, as the datapath reads it: the empty word, a
/// word with the TRANSITION bit, in transition (current in the low 16 bits,
/// previous in bits 16..27), or any other word, a steady backend number (one
/// bit test tells it; a number past l4lb_backends' end finds no backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotWord {
    Empty,
    Steady(u32),
    Transition { current: u32, previous: u32 },
}

impl SlotWord {
    pub fn of(word: u32) -> SlotWord {
        if word == SLOT_EMPTY {
            SlotWord::Empty
        } else if word & L4LB_SLOT_TRANSITION == 0 {
            SlotWord::Steady(word)
        } else {
            SlotWord::Transition {
                current: word & L4LB_SLOT_BACKEND_MASK,
                previous: (word >> L4LB_SLOT_PREVIOUS_SHIFT) & L4LB_SLOT_PREVIOUS_MASK,
            }
        }
    }
}

/// The word of a slot in transition: new flows to `current`, flows from
/// before the change to `previous` (spelled out here from include/l4lb.h).
pub fn transition(current: u32, previous: u32) -> u32 {
    current | L4LB_SLOT_TRANSITION | (previous << L4LB_SLOT_PREVIOUS_SHIFT)
}

/// struct l4lb_vip_key, 20 bytes; `port` in host order here, network order in the map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub proto: u8,
    pub port: u16,
}

impl VipKey {
    pub fn new(addr: IpAddr, proto: u8, port: u16) -> Self {
        VipKey { addr: addr_bytes(addr), family: family_of(addr), proto, port }
    }

    pub fn bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..16].copy_from_slice(&self.addr);
        b[16] = self.family;
        b[17] = self.proto;
        b[18..20].copy_from_slice(&self.port.to_be_bytes());
        b
    }

    pub fn with_port(&self, port: u16) -> Self {
        VipKey { port, ..*self }
    }

    /// The fragment entry of (addr, proto): family | L4LB_FAMILY_FRAGMENT, port 0 (issue 5).
    pub fn fragment(addr: IpAddr, proto: u8) -> Self {
        VipKey { addr: addr_bytes(addr), family: family_of(addr) | L4LB_FAMILY_FRAGMENT as u8, proto, port: 0 }
    }

    pub fn is_fragment_entry(&self) -> bool {
        self.family & L4LB_FAMILY_FRAGMENT as u8 != 0
    }
}

/// The home entry of a VIP key in l4lb_vips (spec step 2), computed here.
pub fn vip_home(key: &VipKey) -> u32 {
    let b = key.bytes();
    let fold = (0..5).map(|i| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())).fold(0, |a, w| a ^ w);
    fold.wrapping_mul(L4LB_VIP_HASH_MUL) >> (32 - L4LB_VIP_BITS)
}

/// struct l4lb_backend, 32 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: [u8; 16],
    pub mac: [u8; 6],
    pub family: u8,
    pub flags: u8,
    pub service: u32,
    pub weight: u32,
}

impl BackendEntry {
    /// An active backend of `service` at `addr` with next hop `mac`.
    pub fn new(addr: IpAddr, mac: [u8; 6], service: u32) -> Self {
        BackendEntry {
            addr: addr_bytes(addr),
            mac,
            family: family_of(addr),
            flags: L4LB_BACKEND_ACTIVE as u8,
            service,
            weight: 1,
        }
    }

    /// Flagged GATEWAY_MAC: `mac` holds the gateway's MAC (the host writes it so).
    pub fn via_gateway(addr: IpAddr, gateway_mac: [u8; 6], service: u32) -> Self {
        BackendEntry {
            flags: (L4LB_BACKEND_ACTIVE | L4LB_BACKEND_GATEWAY_MAC) as u8,
            ..Self::new(addr, gateway_mac, service)
        }
    }

    pub fn active(&self) -> bool {
        u32::from(self.flags) & L4LB_BACKEND_ACTIVE != 0
    }

    pub fn ip(&self) -> IpAddr {
        if self.family == L4LB_FAMILY_IPV6 as u8 {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        } else {
            IpAddr::V4(Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]))
        }
    }

    pub fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.addr);
        b[16..22].copy_from_slice(&self.mac);
        b[22] = self.family;
        b[23] = self.flags;
        b[24..28].copy_from_slice(&self.service.to_ne_bytes());
        b[28..32].copy_from_slice(&self.weight.to_ne_bytes());
        b
    }
}

pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

pub fn family_of(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        L4LB_FAMILY_IPV4 as u8
    } else {
        L4LB_FAMILY_IPV6 as u8
    }
}

/// struct l4lb_flow_key, 40 bytes: the flow as it is hashed (ports 0 for
/// fragments and for UDP services that do not hash ports); ports as on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
}

pub const FLOW_KEY_LEN: usize = 40;
pub const FLOW_PIN_LEN: usize = 32;

impl FlowKey {
    /// The key of a flow from `client`:`sport` to `vip`:`dport` (the same family).
    pub fn new(client: IpAddr, vip: IpAddr, proto: u8, sport: u16, dport: u16) -> Self {
        FlowKey { saddr: addr_bytes(client), daddr: addr_bytes(vip), sport, dport, family: family_of(vip), proto }
    }

    pub fn bytes(&self) -> [u8; FLOW_KEY_LEN] {
        let mut b = [0u8; FLOW_KEY_LEN];
        b[..16].copy_from_slice(&self.saddr);
        b[16..32].copy_from_slice(&self.daddr);
        b[32..34].copy_from_slice(&self.sport.to_be_bytes());
        b[34..36].copy_from_slice(&self.dport.to_be_bytes());
        b[36] = self.family;
        b[37] = self.proto;
        b
    }
}

/// struct l4lb_flow, 32 bytes: the backend a flow is pinned to (its number
/// and what that number held), the slot (index in l4lb_tables) it was pinned
/// in, and the tick it was last seen at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowPin {
    pub addr: [u8; 16],
    pub backend: u32,
    pub slot: u32,
    pub seen: u32,
    pub family: u8,
}

impl FlowPin {
    /// A pin to backend `number` made in `slot` at tick `seen`, holding what that entry holds now.
    pub fn to(number: u32, backend: &BackendEntry, slot: u32, seen: u32) -> Self {
        FlowPin { addr: backend.addr, backend: number, slot, seen, family: backend.family }
    }

    pub fn bytes(&self) -> [u8; FLOW_PIN_LEN] {
        let mut b = [0u8; FLOW_PIN_LEN];
        b[..16].copy_from_slice(&self.addr);
        b[16..20].copy_from_slice(&self.backend.to_ne_bytes());
        b[20..24].copy_from_slice(&self.slot.to_ne_bytes());
        b[24..28].copy_from_slice(&self.seen.to_ne_bytes());
        b[28] = self.family;
        b
    }
}

/// What the pin lookup of a frame in a slot in transition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinState {
    /// No entry.
    None,
    /// An entry made in this slot whose backend number still holds that
    /// backend (active, the frame's service, same family and address).
    Held,
    /// An entry made in another slot, or whose backend number holds another
    /// backend, or none.
    Stale,
}

/// Which rule of docs/transitions.md decided a frame in a slot in transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A TCP SYN: the current backend, pinned (over any entry).
    Syn,
    /// A pin that holds (not a SYN): its backend; `seen` raised to the clock.
    Pin,
    /// A flow from before the change (TCP but a SYN; UDP during the grace),
    /// its previous backend valid: the previous backend.
    Previous,
    /// A flow from before the change whose previous backend is not one of
    /// the service (inactive, another service): the current backend.
    PreviousGone,
    /// UDP after the grace: a new flow, the current backend.
    New,
}

/// What a frame in a slot in transition does to l4lb_flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    pub key: FlowKey,
    /// The slot's index in l4lb_tables and its word.
    pub slot: u32,
    pub word: u32,
    pub state: PinState,
    pub rule: Rule,
    /// The backend number the rule chose (valid or not: the datapath checks it after).
    pub number: u32,
    /// The frame followed its pin (held, not a SYN): its `seen` becomes the clock.
    pub followed: bool,
    /// The pin the frame writes (None: it writes none, or the update is refused).
    pub write: Option<FlowPin>,
    /// The FLOW_* counter it moves: FLOW_PINNED, FLOW_REPINNED or FLOW_TABLE_FULL.
    pub event: Option<u32>,
    /// The clock the frame saw (a followed pin's new `seen`).
    pub clock: u32,
}

impl Tracking {
    /// The FLOW_* counter the frame moves, if any.
    pub fn event(&self) -> Option<u32> {
        self.event
    }
}

// ---------------------------------------------------------------- the model's answer

/// What the datapath must do with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// test_run refuses it (shorter than an Ethernet header): the program does not run.
    Refused,
    /// XDP_PASS counted PASS (not IPv4/IPv6 TCP/UDP, or ICMP that is not an error about a flow).
    Pass,
    /// XDP_PASS counted PASS_NO_SERVICE.
    PassNoService,
    /// XDP_DROP counted by this counter.
    Drop(u32),
    /// XDP_TX, encapsulated.
    Tx(Tx),
    /// XDP_TX counted TX_TOO_BIG: the frame became an ICMP "fragmentation
    /// needed" / ICMPv6 "packet too big" answer to the client.
    TooBig(TooBig),
}

/// An encapsulated frame: where it goes and what its outer header copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tx {
    pub service: u32,
    pub backend: u32,
    /// The flow hash (the IPv6 outer flow label is its low 20 bits).
    pub hash: u32,
    /// 20 (outer IPv4) or 40 (outer IPv6).
    pub overhead: usize,
    /// The client's packet: IPv4 tot_len or 40 + payload length.
    pub l3_len: usize,
    pub tos: u8,
    /// IPv4 DF of the client's packet (false for IPv6).
    pub df: bool,
    /// The client's packet is IPv6.
    pub inner_v6: bool,
    /// Ethernet header with its VLAN tags: 14, 18 or 22 bytes (the tags are kept).
    pub l2_len: usize,
    /// The packet is an ICMP error balanced like the flow it quotes.
    pub icmp_error: bool,
}

/// An ICMP answer to a packet too big once encapsulated (issue 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig {
    /// The service and backend the packet would have gone to.
    pub service: u32,
    pub backend: u32,
    /// The MTU advertised: config mtu - the backend family's overhead.
    pub mtu: u32,
    /// The client's packet is IPv6 (ICMPv6 packet too big) or IPv4 (fragmentation needed).
    pub v6: bool,
    pub l2_len: usize,
}

/// Bytes of the client's packet an answer quotes.
pub const ICMP4_QUOTE: usize = L4LB_ICMP4_QUOTE as usize;
pub const ICMP6_QUOTE: usize = L4LB_ICMP6_QUOTE as usize;

impl Outcome {
    /// The verdict and the counter, as the program returns and counts them.
    pub fn verdict_and_counter(&self) -> (u32, u32) {
        match self {
            Outcome::Refused => (0, 0),
            Outcome::Pass => (super::wire::XDP_PASS, L4LB_CNT_PASS),
            Outcome::PassNoService => (super::wire::XDP_PASS, L4LB_CNT_PASS_NO_SERVICE),
            Outcome::Drop(counter) => (super::wire::XDP_DROP, *counter),
            Outcome::Tx(_) => (super::wire::XDP_TX, L4LB_CNT_TX),
            Outcome::TooBig(_) => (super::wire::XDP_TX, L4LB_CNT_TX_TOO_BIG),
        }
    }
}

/// What the parser takes from a balanced packet. For an ICMP error the
/// addresses, protocol and ports are those of the flow it is about, seen from
/// the client (the quoted packet's, swapped); the lengths, TOS and DF are the
/// ICMP packet's own.
#[derive(Debug, Clone, Copy)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// As on the wire; 0 for fragments.
    pub sport: u16,
    pub dport: u16,
    pub fragment: bool,
    pub l3_len: usize,
    pub tos: u8,
    pub df: bool,
    pub icmp_error: bool,
    /// A TCP segment (not a fragment, not an ICMP error) whose flags byte lies
    /// inside the frame and the datagram, with SYN and without ACK.
    pub syn: bool,
    /// Set by `classify` (the parsers see the L3 bytes only).
    pub l2_len: usize,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Whether the TCP header at `l4` of `ip` (the bytes from the IP header to
/// the frame's end; the datagram ends at `l3_end`) has SYN without ACK. A
/// flags byte (offset 13) outside the frame or the datagram: not a SYN.
fn tcp_syn(ip: &[u8], proto: u8, l4: usize, l3_end: usize) -> bool {
    let flags = l4 + 13;
    proto == TCP && flags < l3_end.min(ip.len()) && ip[flags] & 0x12 == 0x02
}

pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const TPID_8021Q: usize = 0x8100;
pub const TPID_8021AD: usize = 0x88a8;

/// Spec step 1 for an IPv4 packet (the bytes after the Ethernet header and
/// its tags), with issue 5's checks: header checksum (any IHL), TTL 0, ICMP
/// destination unreachable about a flow.
pub fn parse_ipv4(ip: &[u8]) -> Result<Parsed, Outcome> {
    if ip.len() < 20 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_IPV4));
    }
    if ip[0] >> 4 != 4 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_VERSION));
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_IHL));
    }
    if header_len > ip.len() {
        return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_IPV4));
    }
    let tot_len = be16(ip, 2);
    if tot_len < header_len || tot_len > ip.len() {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_TOT_LEN));
    }
    let proto = ip[9];
    if proto != TCP && proto != UDP && proto != ICMP {
        return Err(Outcome::Pass);
    }
    // A right header (checksum field included) sums to 0xffff: RFC 1071 gives 0.
    if internet_checksum(&ip[..header_len]) != 0 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_CSUM));
    }
    if ip[8] == 0 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_TTL_ZERO));
    }
    let fragment = be16(ip, 6) & 0x3fff != 0; // MF or an offset
    if proto == ICMP {
        return parse_icmp4_error(ip, header_len, tot_len, fragment);
    }
    let (sport, dport) = if fragment {
        (0, 0)
    } else {
        if header_len + 4 > tot_len {
            return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_L4));
        }
        (be16(ip, header_len) as u16, be16(ip, header_len + 2) as u16)
    };
    let v4 = |at: usize| IpAddr::V4(Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]));
    Ok(Parsed {
        src: v4(12),
        dst: v4(16),
        proto,
        sport,
        dport,
        fragment,
        l3_len: tot_len,
        tos: ip[1],
        df: ip[6] & 0x40 != 0,
        icmp_error: false,
        syn: !fragment && tcp_syn(ip, proto, header_len, tot_len),
        l2_len: 0,
    })
}

/// An IPv4 ICMP packet: a destination unreachable (type 3, any code), not a
/// fragment, quoting an IPv4 TCP/UDP packet (not a later fragment) sent by
/// the outer destination, whole up to its ports inside both the frame and
/// tot_len, is about the flow (quoted dst:dport -> quoted src:sport).
/// Everything else ICMP is passed.
fn parse_icmp4_error(ip: &[u8], header_len: usize, tot_len: usize, fragment: bool) -> Result<Parsed, Outcome> {
    let quoted = header_len + 8;
    if quoted + 20 > ip.len() || quoted + 20 > tot_len {
        return Err(Outcome::Pass);
    }
    if ip[header_len] != 3 || fragment {
        return Err(Outcome::Pass);
    }
    let q = &ip[quoted..];
    if q[0] >> 4 != 4
        || q[0] & 0x0f < 5
        || (q[9] != TCP && q[9] != UDP)
        || be16(q, 6) & 0x1fff != 0
        || q[12..16] != ip[16..20]
    {
        return Err(Outcome::Pass);
    }
    let quoted_len = usize::from(q[0] & 0x0f) * 4;
    if quoted + quoted_len + 4 > ip.len() || quoted + quoted_len + 4 > tot_len {
        return Err(Outcome::Pass);
    }
    let v4 = |at: usize| IpAddr::V4(Ipv4Addr::new(q[at], q[at + 1], q[at + 2], q[at + 3]));
    Ok(Parsed {
        src: v4(16),
        dst: v4(12),
        proto: q[9],
        sport: be16(q, quoted_len + 2) as u16,
        dport: be16(q, quoted_len) as u16,
        fragment: false,
        l3_len: tot_len,
        tos: ip[1],
        df: ip[6] & 0x40 != 0,
        icmp_error: true,
        syn: false,
        l2_len: 0,
    })
}

/// Spec step 1 for an IPv6 packet: at most 4 extension headers; hop limit 0
/// dropped; ICMPv6 destination unreachable / packet too big about a flow.
pub fn parse_ipv6(ip: &[u8]) -> Result<Parsed, Outcome> {
    if ip.len() < 40 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_IPV6));
    }
    if ip[0] >> 4 != 6 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_VERSION));
    }
    let payload_len = be16(ip, 4);
    let l3_end = 40 + payload_len;
    if payload_len == 0 || l3_end > ip.len() {
        return Err(Outcome::Drop(L4LB_CNT_DROP_BAD_PAYLOAD_LEN));
    }
    let mut next = ip[6];
    let mut at = 40;
    let mut fragment = false;
    let mut headers = 0;
    while next != TCP && next != UDP && next != ICMPV6 {
        let is_ext = matches!(next, HOPOPTS | ROUTING | DSTOPTS | FRAGMENT);
        if !is_ext {
            return Err(Outcome::Pass);
        }
        if headers == L4LB_MAX_EXT_HEADERS as usize {
            return Err(Outcome::Drop(L4LB_CNT_DROP_EXT_HEADERS));
        }
        headers += 1;
        let len = if next == FRAGMENT {
            8
        } else if at + 2 <= ip.len() {
            (usize::from(ip[at + 1]) + 1) * 8
        } else {
            8
        };
        if at + len > l3_end {
            return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_IPV6));
        }
        if next == FRAGMENT {
            // Offset or M bit: a fragment. Offset 0 without M: atomic, keeps its ports.
            fragment |= be16(ip, at + 2) & 0xfff9 != 0;
        }
        next = ip[at];
        at += len;
    }
    if ip[7] == 0 {
        return Err(Outcome::Drop(L4LB_CNT_DROP_TTL_ZERO));
    }
    let tos = ((u32::from_be_bytes(ip[0..4].try_into().unwrap()) >> 20) & 0xff) as u8;
    let v6 = |at: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap()));
    if next == ICMPV6 {
        // Type 1 or 2, not a fragment, quoting IPv6 TCP/UDP right after its
        // fixed header, sent by the outer destination, ports inside the packet.
        if at + 8 + 40 + 4 > l3_end || (ip[at] != 1 && ip[at] != 2) || fragment {
            return Err(Outcome::Pass);
        }
        let q = at + 8;
        if ip[q] >> 4 != 6 || (ip[q + 6] != TCP && ip[q + 6] != UDP) || ip[q + 8..q + 24] != ip[24..40] {
            return Err(Outcome::Pass);
        }
        return Ok(Parsed {
            src: v6(q + 24),
            dst: v6(q + 8),
            proto: ip[q + 6],
            sport: be16(ip, q + 42) as u16,
            dport: be16(ip, q + 40) as u16,
            fragment: false,
            l3_len: l3_end,
            tos,
            df: false,
            icmp_error: true,
            syn: false,
            l2_len: 0,
        });
    }
    let (sport, dport) = if fragment {
        (0, 0)
    } else {
        if at + 4 > l3_end {
            return Err(Outcome::Drop(L4LB_CNT_DROP_SHORT_L4));
        }
        (be16(ip, at) as u16, be16(ip, at + 2) as u16)
    };
    Ok(Parsed {
        src: v6(8),
        dst: v6(24),
        proto: next,
        sport,
        dport,
        fragment,
        l3_len: l3_end,
        tos,
        df: false,
        icmp_error: false,
        syn: !fragment && tcp_syn(ip, next, at, l3_end),
        l2_len: 0,
    })
}

// ---------------------------------------------------------------- the balancer

/// Which build of src/bpf/l4lb_xdp.bpf.c a balancer loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// l4lb_xdp.o, what iproute2 and offload load: atomic adds only (the
    /// counters, a pin's `seen`).
    Object,
    /// l4lb_xdp_percpu.o (-DL4LB_DRIVER_BUILD), what `l4lb attach` loads in
    /// driver and generic mode: plain adds into per-CPU counters (always
    /// loaded per-CPU here, as attach does), a pin's `seen` stored.
    Driver,
}

impl Build {
    pub const ALL: [Build; 2] = [Build::Object, Build::Driver];

    pub fn name(self) -> &'static str {
        match self {
            Build::Object => "l4lb_xdp.o",
            Build::Driver => "l4lb_xdp_percpu.o (driver build)",
        }
    }
}

thread_local! {
    /// The build `Lb::load` and `Lb::load_with` load on this thread (a test
    /// runs on one thread: `run_suite_both_builds` sets it per test).
    static BUILD: std::cell::Cell<Build> = const { std::cell::Cell::new(Build::Object) };
}

/// The build this thread's loads use.
pub fn current_build() -> Build {
    BUILD.with(|b| b.get())
}

/// Runs `test` with this thread's loads using `build`.
pub fn with_build<T>(build: Build, test: impl FnOnce() -> T) -> T {
    let before = BUILD.with(|b| b.replace(build));
    let out = test();
    BUILD.with(|b| b.set(before));
    out
}

/// `super::run_suite`, every test run twice: as `NAME` on l4lb_xdp.o and as
/// `driver::NAME` on the driver build.
pub fn run_suite_both_builds(suite: &str, needs: &str, tests: Vec<(&'static str, super::TestFn)>) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let root = super::is_root();
    if !root {
        eprintln!("skipped: {suite}: {} tests need root ({needs}); not running as root", 2 * tests.len());
    }
    let trials = Build::ALL
        .into_iter()
        .flat_map(|build| {
            tests.iter().map(move |&(name, test)| {
                let name = if build == Build::Object { name.to_string() } else { format!("driver::{name}") };
                libtest_mimic::Trial::test(name, move || with_build(build, test)).with_ignored_flag(!root)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// The loaded skeleton of either build (the same maps and program).
pub enum Skel {
    Object(L4lbXdpSkel<'static>),
    Driver(L4lbXdpPercpuSkel<'static>),
}

/// The maps of a loaded balancer, whichever its build.
pub struct Maps<'a> {
    pub l4lb_config: &'a MapMut<'static>,
    pub l4lb_vips: &'a MapMut<'static>,
    pub l4lb_services: &'a MapMut<'static>,
    pub l4lb_tables: &'a MapMut<'static>,
    pub l4lb_backends: &'a MapMut<'static>,
    pub l4lb_be_stats: &'a MapMut<'static>,
    pub l4lb_svc_stats: &'a MapMut<'static>,
    pub l4lb_counters: &'a MapMut<'static>,
    pub l4lb_flows: &'a MapMut<'static>,
}

macro_rules! skel_maps {
    ($skel:expr) => {
        Maps {
            l4lb_config: &$skel.maps.l4lb_config,
            l4lb_vips: &$skel.maps.l4lb_vips,
            l4lb_services: &$skel.maps.l4lb_services,
            l4lb_tables: &$skel.maps.l4lb_tables,
            l4lb_backends: &$skel.maps.l4lb_backends,
            l4lb_be_stats: &$skel.maps.l4lb_be_stats,
            l4lb_svc_stats: &$skel.maps.l4lb_svc_stats,
            l4lb_counters: &$skel.maps.l4lb_counters,
            l4lb_flows: &$skel.maps.l4lb_flows,
        }
    };
}

/// Opens `$builder`'s object into leaked storage, shapes its maps (`per_cpu`,
/// `flows`) and loads it.
macro_rules! open_and_load {
    ($builder:ty, $per_cpu:expr, $flows:expr) => {{
        // The skeleton borrows this storage for its whole life: one small leak per load.
        let storage = Box::leak(Box::new(MaybeUninit::<OpenObject>::uninit()));
        let mut open = <$builder>::default().open(storage)?;
        if $per_cpu {
            open.maps.l4lb_counters.set_type(MapType::PercpuArray)?;
            open.maps.l4lb_be_stats.set_type(MapType::PercpuArray)?;
            open.maps.l4lb_svc_stats.set_type(MapType::PercpuArray)?;
        }
        if $flows != FlowTable::OBJECT {
            if $flows.lru {
                open.maps.l4lb_flows.set_type(MapType::LruHash)?;
            }
            open.maps.l4lb_flows.set_max_entries($flows.entries)?;
        }
        open.load()?
    }};
}

impl Skel {
    pub fn maps(&self) -> Maps<'_> {
        match self {
            Skel::Object(skel) => skel_maps!(skel),
            Skel::Driver(skel) => skel_maps!(skel),
        }
    }

    pub fn program(&self) -> &ProgramMut<'static> {
        match self {
            Skel::Object(skel) => &skel.progs.l4lb_balance,
            Skel::Driver(skel) => &skel.progs.l4lb_balance,
        }
    }
}

/// One loaded program, and what its maps hold (the model's state).
pub struct Lb {
    pub skel: Skel,
    pub build: Build,
    pub config: LbConfig,
    pub vips: Vec<Option<(VipKey, u32)>>,
    pub services: Vec<ServiceEntry>,
    /// Each service's table (slot words); None: as loaded (every slot 0).
    pub tables: Vec<Option<Vec<u32>>>,
    pub backends: Vec<BackendEntry>,
    pub per_cpu: bool,
    /// The model's copy of l4lb_flows (`pin_applied` keeps it up to date).
    pub flows: RefCell<BTreeMap<FlowKey, FlowPin>>,
    /// l4lb_flows as loaded: LRU hash or HASH, and its max_entries.
    pub flow_lru: bool,
    pub flow_entries: u32,
}

/// How l4lb_flows is loaded: as the object declares it (HASH of
/// L4LB_FLOW_ENTRIES), or switched and sized first (as src/kernel/attach.rs does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTable {
    pub lru: bool,
    pub entries: u32,
}

impl FlowTable {
    pub const OBJECT: FlowTable = FlowTable { lru: false, entries: L4LB_FLOW_ENTRIES };
}

impl Lb {
    /// Loads the program (this thread's build: `with_build`); `per_cpu`
    /// switches the counter and traffic maps to per-CPU arrays first (the
    /// driver build's always are).
    pub fn load(per_cpu: bool) -> TestResult<Self> {
        Self::load_with(per_cpu, FlowTable::OBJECT)
    }

    /// `load`, with l4lb_flows switched to an LRU hash and/or resized first.
    pub fn load_with(per_cpu: bool, flows: FlowTable) -> TestResult<Self> {
        Self::load_build(current_build(), per_cpu, flows)
    }

    /// `load_with` of `build`.
    pub fn load_build(build: Build, per_cpu: bool, flows: FlowTable) -> TestResult<Self> {
        let per_cpu = per_cpu || build == Build::Driver;
        let skel = match build {
            Build::Object => Skel::Object(open_and_load!(L4lbXdpSkelBuilder, per_cpu, flows)),
            Build::Driver => Skel::Driver(open_and_load!(L4lbXdpPercpuSkelBuilder, per_cpu, flows)),
        };
        Ok(Lb {
            skel,
            build,
            config: LbConfig::default(),
            vips: vec![None; VIP_SLOTS],
            services: vec![ServiceEntry::default(); MAX_SERVICES],
            tables: vec![None; MAX_SERVICES],
            backends: vec![BackendEntry::default(); MAX_BACKENDS],
            per_cpu,
            flows: RefCell::new(BTreeMap::new()),
            flow_lru: flows.lru,
            flow_entries: flows.entries,
        })
    }

    /// The maps, whichever the build.
    pub fn maps(&self) -> Maps<'_> {
        self.skel.maps()
    }

    pub fn set_config(&mut self, config: LbConfig) -> TestResult {
        self.maps().l4lb_config.update(&0u32.to_ne_bytes(), &config.bytes(), MapFlags::ANY)?;
        self.config = config;
        Ok(())
    }

    /// Writes entry `index` of l4lb_vips (None: a free, zeroed entry).
    pub fn set_vip_entry(&mut self, index: u32, vip: Option<(VipKey, u32)>) -> TestResult {
        let mut bytes = [0u8; 24];
        if let Some((key, service)) = vip {
            bytes[..20].copy_from_slice(&key.bytes());
            bytes[20..].copy_from_slice(&service.to_ne_bytes());
        }
        self.maps().l4lb_vips.update(&index.to_ne_bytes(), &bytes, MapFlags::ANY)?;
        self.vips[index as usize] = vip;
        Ok(())
    }

    /// Places a VIP `displacement` entries after its home; returns the entry.
    pub fn place_vip(&mut self, key: VipKey, service: u32, displacement: u32) -> TestResult<u32> {
        let index = (vip_home(&key) + displacement) & L4LB_VIP_MASK;
        if let Some((other, _)) = self.vips[index as usize] {
            if other != key {
                return Err(fail(format!("VIP entry {index} is taken by {other:?}")));
            }
        }
        self.set_vip_entry(index, Some((key, service)))?;
        Ok(index)
    }

    /// Places a VIP at the first free entry from its home (as the host does);
    /// raises vip_probes (and sets ANY_PORT for port 0) as needed.
    pub fn add_vip(&mut self, key: VipKey, service: u32) -> TestResult<u32> {
        let home = vip_home(&key);
        let displacement = (0..L4LB_VIP_MAX_PROBES)
            .find(|i| match self.vips[((home + i) & L4LB_VIP_MASK) as usize] {
                None => true,
                Some((other, _)) => other == key,
            })
            .ok_or_else(|| fail(format!("no free VIP entry near the home of {key:?}")))?;
        let index = self.place_vip(key, service, displacement)?;
        let mut config = self.config.clone();
        config.vip_probes = config.vip_probes.max(displacement + 1);
        if key.port == 0 && !key.is_fragment_entry() {
            config.flags |= L4LB_CONFIG_ANY_PORT;
        }
        self.set_config(config)?;
        Ok(index)
    }

    /// Writes the flags of `service`'s entry (its other fields as they are).
    pub fn set_service(&mut self, service: u32, flags: u32) -> TestResult {
        let entry = ServiceEntry { flags, ..self.services[service as usize] };
        self.set_service_entry(service, entry)
    }

    /// Writes the whole entry of `service`.
    pub fn set_service_entry(&mut self, service: u32, entry: ServiceEntry) -> TestResult {
        self.maps().l4lb_services.update(&service.to_ne_bytes(), &entry.bytes(), MapFlags::ANY)?;
        self.services[service as usize] = entry;
        Ok(())
    }

    /// Writes l4lb_config.clock (the tick), the rest of the configuration as it is.
    pub fn set_clock(&mut self, clock: u32) -> TestResult {
        let config = LbConfig { clock, ..self.config.clone() };
        self.set_config(config)
    }

    /// Writes one slot word (`slot` in 0..MAGLEV_SIZE) of `service`'s table.
    pub fn set_slot(&mut self, service: u32, slot: usize, word: u32) -> TestResult {
        self.tables[service as usize].get_or_insert_with(|| vec![0; MAGLEV_SIZE])[slot] = word;
        let index = service * MAGLEV_SIZE as u32 + slot as u32;
        self.write_table_entries(index, index)
    }

    /// Writes a whole table (MAGLEV_SIZE slot words) of `service`.
    pub fn set_table(&mut self, service: u32, table: &[u32]) -> TestResult {
        if table.len() != MAGLEV_SIZE {
            return Err(fail(format!("a table of {} slots, expected {MAGLEV_SIZE}", table.len())));
        }
        self.tables[service as usize] = Some(table.to_vec());
        let base = service * MAGLEV_SIZE as u32;
        self.write_table_entries(base, base + MAGLEV_SIZE as u32 - 1)
    }

    /// Writes the entries of l4lb_tables that hold slot words `first..=last`
    /// (L4LB_TABLE_ENTRY_SLOTS words each, include/l4lb.h) from the model's
    /// tables: an entry may hold the end of one service's table and the start
    /// of the next one's (a table never written is zeros).
    fn write_table_entries(&self, first: u32, last: u32) -> TestResult {
        let per = L4LB_TABLE_ENTRY_SLOTS;
        let word = |g: u32| {
            let (service, slot) = ((g as usize) / MAGLEV_SIZE, (g as usize) % MAGLEV_SIZE);
            self.tables.get(service).and_then(|t| t.as_ref()).map_or(0, |t| t[slot])
        };
        let entries: Vec<u32> = (first / per..=last / per).collect();
        let keys: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        let values: Vec<u8> =
            entries.iter().flat_map(|&e| (e * per..(e + 1) * per).flat_map(|g| word(g).to_ne_bytes())).collect();
        self.maps().l4lb_tables.update_batch(&keys, &values, entries.len() as u32, MapFlags::ANY, MapFlags::ANY)?;
        Ok(())
    }

    pub fn set_backend(&mut self, number: u32, entry: BackendEntry) -> TestResult {
        self.maps().l4lb_backends.update(&number.to_ne_bytes(), &entry.bytes(), MapFlags::ANY)?;
        self.backends[number as usize] = entry;
        Ok(())
    }

    /// Writes an entry of l4lb_flows directly (as a host or an earlier packet
    /// would have), in the kernel and in the model.
    pub fn set_flow(&self, key: &FlowKey, pin: &FlowPin) -> TestResult {
        self.maps().l4lb_flows.update(&key.bytes(), &pin.bytes(), MapFlags::ANY)?;
        self.flows.borrow_mut().insert(*key, *pin);
        Ok(())
    }

    /// Deletes an entry of l4lb_flows, in the kernel and in the model.
    pub fn delete_flow(&self, key: &FlowKey) -> TestResult {
        self.maps().l4lb_flows.delete(&key.bytes())?;
        self.flows.borrow_mut().remove(key);
        Ok(())
    }

    /// Every entry of the kernel's l4lb_flows, as (key, value) bytes, sorted.
    pub fn read_flows(&self) -> TestResult<BTreeMap<Vec<u8>, Vec<u8>>> {
        let map = self.maps().l4lb_flows;
        let mut entries = BTreeMap::new();
        for key in map.keys() {
            let value = map
                .lookup(&key, MapFlags::ANY)?
                .ok_or_else(|| fail(format!("l4lb_flows: key {} listed but not found", super::hex(&key))))?;
            entries.insert(key, value);
        }
        Ok(entries)
    }

    /// The model's l4lb_flows, as (key, value) bytes, sorted.
    pub fn model_flows(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.flows.borrow().iter().map(|(k, p)| (k.bytes().to_vec(), p.bytes().to_vec())).collect()
    }

    /// Checks that the kernel's l4lb_flows holds exactly the model's entries;
    /// Err names the first difference.
    pub fn compare_flows(&self) -> Result<(), String> {
        let kernel = self.read_flows().map_err(|e| format!("reading l4lb_flows: {e:?}"))?;
        let model = self.model_flows();
        if kernel == model {
            return Ok(());
        }
        for (key, value) in &kernel {
            match model.get(key) {
                None => {
                    return Err(format!(
                        "l4lb_flows holds {} -> {} that the model does not ({} entries, model {})",
                        super::hex(key),
                        super::hex(value),
                        kernel.len(),
                        model.len()
                    ))
                }
                Some(v) if v != value => {
                    return Err(format!(
                        "l4lb_flows: {} -> {}, the model says {}",
                        super::hex(key),
                        super::hex(value),
                        super::hex(v)
                    ))
                }
                _ => {}
            }
        }
        let missing = model.keys().find(|k| !kernel.contains_key(*k)).map(|k| super::hex(k)).unwrap_or_default();
        Err(format!("l4lb_flows lacks {missing} ({} entries, model {})", kernel.len(), model.len()))
    }

    /// Records in the model what a frame did to l4lb_flows (its `Tracking`,
    /// from `classify_tracked`, once the frame has run): a followed pin's
    /// `seen` becomes the clock; a pin written replaces the flow's entry.
    pub fn pin_applied(&self, tracking: &Option<Tracking>) {
        let Some(t) = tracking else { return };
        let mut flows = self.flows.borrow_mut();
        if t.followed {
            if let Some(pin) = flows.get_mut(&t.key) {
                pin.seen = t.clock;
            }
        }
        if let Some(pin) = t.write {
            flows.insert(t.key, pin);
        }
    }

    /// The word in `slot` of `service`'s table, as the maps hold it.
    pub fn slot_value(&self, service: u32, slot: usize) -> u32 {
        self.tables[service as usize].as_ref().map_or(0, |table| table[slot])
    }

    /// The slot (0..MAGLEV_SIZE) `flow` falls in, in any service's table.
    pub fn slot_of(&self, flow: &Flow) -> usize {
        l4lb::maglev::flow_slot(flow, self.config.hash_seed, MAGLEV_SIZE)
    }

    /// The index in l4lb_tables of the slot `flow` of `service` falls in (a pin's `slot`).
    pub fn table_index(&self, service: u32, flow: &Flow) -> u32 {
        service * MAGLEV_SIZE as u32 + self.slot_of(flow) as u32
    }

    /// The slot word the model says `flow` of `service` lands on (for a
    /// steady table: its backend number, valid or not).
    pub fn predict(&self, service: u32, flow: &Flow) -> u32 {
        self.slot_value(service, self.slot_of(flow))
    }

    /// One BPF_PROG_TEST_RUN (repeat 1) into `out`: the verdict and the output length.
    pub fn run_into(&self, frame: &[u8], out: &mut [u8]) -> libbpf_rs::Result<(u32, usize)> {
        let input = ProgramInput { data_in: Some(frame), data_out: Some(out), repeat: 1, ..Default::default() };
        let output = self.skel.program().test_run(input)?;
        Ok((output.return_value, output.data.map_or(0, |data| data.len())))
    }

    /// One BPF_PROG_TEST_RUN (repeat 1): the verdict and the output frame.
    pub fn run(&self, frame: &[u8]) -> libbpf_rs::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let (verdict, len) = self.run_into(frame, &mut out)?;
        out.truncate(len);
        Ok((verdict, out))
    }

    /// The global counters, L4LB_CNT_MAX of them (summed over CPUs when per-CPU).
    pub fn counters(&self) -> TestResult<[u64; NCNT]> {
        let values = read_u64s(self.maps().l4lb_counters, NCNT, 1)?;
        let mut out = [0u64; NCNT];
        out.copy_from_slice(&values);
        Ok(out)
    }

    /// (packets, bytes) of every backend entry.
    pub fn backend_traffic(&self) -> TestResult<Vec<(u64, u64)>> {
        Ok(read_u64s(self.maps().l4lb_be_stats, MAX_BACKENDS, 2)?.chunks_exact(2).map(|v| (v[0], v[1])).collect())
    }

    /// (packets, bytes) of every service.
    pub fn service_traffic(&self) -> TestResult<Vec<(u64, u64)>> {
        Ok(read_u64s(self.maps().l4lb_svc_stats, MAX_SERVICES, 2)?.chunks_exact(2).map(|v| (v[0], v[1])).collect())
    }

    // ------------------------------------------------------------ the model

    /// What the datapath must do with `frame`, given what the maps hold.
    pub fn classify(&self, frame: &[u8]) -> Outcome {
        self.classify_tracked(frame).0
    }

    /// `classify`, and for a frame that falls in a slot in transition what
    /// it finds in l4lb_flows and what it writes (`pin_applied` records it).
    pub fn classify_tracked(&self, frame: &[u8]) -> (Outcome, Option<Tracking>) {
        if frame.len() < ETH_LEN {
            return (Outcome::Refused, None);
        }
        // Up to two 802.1Q / 802.1ad tags (either TPID in either place); a third is not ours.
        let mut ethertype = be16(frame, 12);
        let mut l2_len = ETH_LEN;
        for _ in 0..L4LB_MAX_VLAN_TAGS {
            if ethertype == TPID_8021Q || ethertype == TPID_8021AD {
                if frame.len() < l2_len + 4 {
                    return (Outcome::Drop(L4LB_CNT_DROP_SHORT_VLAN), None);
                }
                ethertype = be16(frame, l2_len + 2);
                l2_len += 4;
            }
        }
        let parsed = match ethertype {
            0x0800 => parse_ipv4(&frame[l2_len..]),
            0x86dd => parse_ipv6(&frame[l2_len..]),
            _ => return (Outcome::Pass, None),
        };
        match parsed {
            Ok(p) => self.decide_tracked(&Parsed { l2_len, ..p }),
            Err(outcome) => (outcome, None),
        }
    }

    /// The VIP entry's service for `key`, looking at vip_probes entries from its home.
    pub fn find_vip(&self, key: &VipKey) -> Option<u32> {
        let home = vip_home(key);
        (0..self.config.vip_probes.min(L4LB_VIP_MAX_PROBES)).find_map(|i| {
            match self.vips[((home + i) & L4LB_VIP_MASK) as usize] {
                Some((entry, service)) if entry == *key => Some(service),
                _ => None,
            }
        })
    }

    /// Spec steps 2 to 8 for a parsed packet (issue 5: fragments look up
    /// their fragment entry only; too big answered or dropped).
    pub fn decide(&self, p: &Parsed) -> Outcome {
        self.decide_tracked(p).0
    }

    /// Whether backend number `number` is a backend of `service` (active, that service).
    pub fn service_backend(&self, number: u32, service: u32) -> bool {
        self.backends.get(number as usize).is_some_and(|b| b.active() && b.service == service)
    }

    /// Whether `pin` holds for a frame of `service` in slot `slot` (index in
    /// l4lb_tables): made in that slot, and its backend number still names
    /// the backend it was pinned to (active, the service, same family and address).
    pub fn pin_holds(&self, pin: &FlowPin, service: u32, slot: u32) -> bool {
        pin.slot == slot
            && self.service_backend(pin.backend, service)
            && self.backends.get(pin.backend as usize).is_some_and(|b| b.family == pin.family && b.addr == pin.addr)
    }

    /// Whether a frame without a pin that holds is from a flow from before
    /// the change of its slot: any TCP frame but a SYN (fragments and ICMP
    /// errors included), UDP while (clock - changed) < udp_grace, computed
    /// signed (a `changed` ahead of the clock, no sweep since the apply, is
    /// inside the grace).
    pub fn is_from_before_change(&self, p: &Parsed, service: &ServiceEntry) -> bool {
        !p.syn
            && (p.proto != UDP || (self.config.clock.wrapping_sub(service.changed) as i32) < service.udp_grace as i32)
    }

    /// The rules of a slot in transition (docs/transitions.md, flows.h):
    /// the backend number for the frame and what it does to l4lb_flows.
    fn transition_tracking(&self, p: &Parsed, service: u32, key: FlowKey, slot: u32, word: u32) -> Tracking {
        let SlotWord::Transition { current, previous } = SlotWord::of(word) else {
            unreachable!("not a word in transition: {word:#x}")
        };
        let clock = self.config.clock;
        let pin = self.flows.borrow().get(&key).copied();
        let state = match pin {
            None => PinState::None,
            Some(pin) if self.pin_holds(&pin, service, slot) => PinState::Held,
            Some(_) => PinState::Stale,
        };
        let mut t = Tracking {
            key,
            slot,
            word,
            state,
            rule: Rule::Syn,
            number: current,
            followed: false,
            write: None,
            event: None,
            clock,
        };
        if state == PinState::Held && !p.syn {
            t.rule = Rule::Pin;
            t.number = pin.map_or(current, |pin| pin.backend);
            t.followed = true;
            return t;
        }
        if self.is_from_before_change(p, &self.services[service as usize]) {
            if self.service_backend(previous, service) {
                t.rule = Rule::Previous;
                t.number = previous;
            } else {
                t.rule = Rule::PreviousGone;
            }
        } else if !p.syn {
            t.rule = Rule::New;
        }
        if p.icmp_error {
            return t;
        }
        // The pin: only to a backend of the service the frame can go to
        // (else no pin, no event: the frame is dropped); a full HASH map
        // refuses a new key.
        if !self.service_backend(t.number, service) {
            return t;
        }
        let full = !self.flow_lru && pin.is_none() && self.flows.borrow().len() >= self.flow_entries as usize;
        if full {
            t.event = Some(L4LB_CNT_FLOW_TABLE_FULL);
        } else {
            t.write = Some(FlowPin::to(t.number, &self.backends[t.number as usize], slot, clock));
            t.event = Some(if pin.is_some() { L4LB_CNT_FLOW_REPINNED } else { L4LB_CNT_FLOW_PINNED });
        }
        t
    }

    /// `decide`, with the rules of a slot in transition (`Tracking`, None for
    /// a frame that never reaches one): a SYN takes the current backend; a
    /// pin that holds keeps its flow (its `seen` raised to the clock); a flow
    /// from before the change takes the previous backend while it is one of
    /// the service, else the current one; UDP after the grace the current
    /// one. All but a held pin's frames pin where they went (not an ICMP
    /// error): a new entry FLOW_PINNED, over one FLOW_REPINNED, refused by a
    /// full HASH map (or a backend number past l4lb_backends' end)
    /// FLOW_TABLE_FULL. An LRU map is never full (the model cannot say which
    /// pin the kernel would evict: the suites keep LRU maps under their size).
    pub fn decide_tracked(&self, p: &Parsed) -> (Outcome, Option<Tracking>) {
        let mut tracking = None;
        let outcome = self.decide_into(p, &mut tracking);
        (outcome, tracking)
    }

    fn decide_into(&self, p: &Parsed, tracking: &mut Option<Tracking>) -> Outcome {
        let key = VipKey::new(p.dst, p.proto, p.dport);
        let mut service = if p.fragment {
            self.find_vip(&VipKey::fragment(p.dst, p.proto))
        } else {
            let exact = self.find_vip(&key);
            if exact.is_none() && key.port != 0 && self.config.flags & L4LB_CONFIG_ANY_PORT != 0 {
                self.find_vip(&key.with_port(0))
            } else {
                exact
            }
        };
        if service.is_none() && self.config.flags & L4LB_CONFIG_CATCH_ALL != 0 {
            service = Some(self.config.catch_all);
        }
        let Some(service) = service else { return Outcome::PassNoService };
        let Some(&ServiceEntry { flags, .. }) = self.services.get(service as usize) else {
            return Outcome::Drop(L4LB_CNT_DROP_NO_BACKEND);
        };
        if flags & L4LB_SERVICE_ACTIVE == 0 {
            return Outcome::Drop(L4LB_CNT_DROP_NO_BACKEND);
        }
        let inner_v6 = p.src.is_ipv6();
        if inner_v6 && flags & L4LB_SERVICE_IPV4_BACKENDS != 0 {
            return Outcome::PassNoService;
        }
        let hash_ports = !p.fragment && (p.proto == TCP || flags & L4LB_SERVICE_HASH_PORTS != 0);
        let flow = Flow {
            saddr: p.src,
            daddr: p.dst,
            sport: if hash_ports { p.sport } else { 0 },
            dport: if hash_ports { p.dport } else { 0 },
            proto: p.proto,
        };
        let hash = flow.hash(self.config.hash_seed);
        // The slot word: steady (a backend number), empty, or in transition
        // (the only frames that read or write l4lb_flows, whatever the
        // service's TRACK_FLOWS flag says: the host's business).
        let slot = self.table_index(service, &flow);
        let word = self.predict(service, &flow);
        let number = match SlotWord::of(word) {
            SlotWord::Empty => return Outcome::Drop(L4LB_CNT_DROP_NO_BACKEND),
            SlotWord::Steady(number) => number,
            SlotWord::Transition { .. } => {
                let key = FlowKey::new(p.src, p.dst, p.proto, flow.sport, flow.dport);
                let t = self.transition_tracking(p, service, key, slot, word);
                let number = t.number;
                *tracking = Some(t);
                number
            }
        };
        let Some(backend) = self.backends.get(number as usize).filter(|b| b.active()) else {
            return Outcome::Drop(L4LB_CNT_DROP_NO_BACKEND);
        };
        let overhead = if backend.family == L4LB_FAMILY_IPV6 as u8 {
            40
        } else if backend.family == L4LB_FAMILY_IPV4 as u8 && !inner_v6 {
            20
        } else {
            return Outcome::Drop(L4LB_CNT_DROP_NO_BACKEND);
        };
        let mtu = self.config.mtu as usize;
        if mtu != 0 && p.l3_len + overhead > mtu {
            // Never an error about an error; IPv4 without DF is dropped; an
            // answer needs the whole quote (only short of it below 576).
            let quote = if inner_v6 { ICMP6_QUOTE } else { ICMP4_QUOTE };
            if p.icmp_error || mtu <= overhead || (!inner_v6 && !p.df) || p.l3_len < quote {
                return Outcome::Drop(L4LB_CNT_DROP_TOO_BIG);
            }
            return Outcome::TooBig(TooBig {
                service,
                backend: number,
                mtu: (mtu - overhead) as u32,
                v6: inner_v6,
                l2_len: p.l2_len,
            });
        }
        Outcome::Tx(Tx {
            service,
            backend: number,
            hash,
            overhead,
            l3_len: p.l3_len,
            tos: p.tos,
            df: p.df,
            inner_v6,
            l2_len: p.l2_len,
            icmp_error: p.icmp_error,
        })
    }

    /// Checks an XDP_TX output field by field against `tx` (spec step 7),
    /// with a parser and an RFC 1071 checksum of its own. Err names the field.
    pub fn check_tx_output(&self, frame: &[u8], out: &[u8], tx: &Tx) -> Result<(), String> {
        let backend = &self.backends[tx.backend as usize];
        if out.len() != frame.len() + tx.overhead {
            return Err(format!("output is {} bytes, expected {} + {}", out.len(), frame.len(), tx.overhead));
        }
        let l2 = tx.l2_len;
        field("Ethernet destination (backend's or gateway's MAC)", &out[0..6], &backend.mac)?;
        field("Ethernet source (the frame's destination)", &out[6..12], &frame[0..6])?;
        field("VLAN tags (kept byte for byte)", &out[12..l2 - 2], &frame[12..l2 - 2])?;
        let outer = &out[l2..l2 + tx.overhead];
        if tx.overhead == 20 {
            field("EtherType", &out[l2 - 2..l2], &[0x08, 0x00])?;
            field("outer version/IHL", &outer[0..1], &[0x45])?;
            field("outer TOS", &outer[1..2], &[tx.tos])?;
            field("outer tot_len", &outer[2..4], &((tx.l3_len + 20) as u16).to_be_bytes())?;
            field("outer id", &outer[4..6], &[0, 0])?;
            field("outer flags/offset", &outer[6..8], &[if tx.df { 0x40 } else { 0 }, 0])?;
            field("outer TTL", &outer[8..9], &[64])?;
            field("outer protocol", &outer[9..10], &[4])?;
            let mut unsummed = [0u8; 20];
            unsummed.copy_from_slice(outer);
            unsummed[10..12].fill(0);
            field("outer checksum (RFC 1071)", &outer[10..12], &internet_checksum(&unsummed).to_be_bytes())?;
            if internet_checksum(outer) != 0 {
                return Err("outer header does not sum to 0".into());
            }
            field("outer source", &outer[12..16], &self.config.src_v4)?;
            field("outer destination (predicted backend)", &outer[16..20], &backend.addr[..4])?;
        } else {
            field("EtherType", &out[l2 - 2..l2], &[0x86, 0xdd])?;
            let vtc = (6u32 << 28) | (u32::from(tx.tos) << 20) | (tx.hash & 0xfffff);
            field("outer version/traffic class/flow label", &outer[0..4], &vtc.to_be_bytes())?;
            field("outer payload length", &outer[4..6], &(tx.l3_len as u16).to_be_bytes())?;
            field("outer next header", &outer[6..7], &[if tx.inner_v6 { 41 } else { 4 }])?;
            field("outer hop limit", &outer[7..8], &[64])?;
            field("outer source", &outer[8..24], &self.config.src_v6)?;
            field("outer destination (predicted backend)", &outer[24..40], &backend.addr)?;
        }
        if out[l2 + tx.overhead..] != frame[l2..] {
            let at = out[l2 + tx.overhead..].iter().zip(&frame[l2..]).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("inner packet differs from the input at its byte {at}"));
        }
        Ok(())
    }
}

fn field(what: &str, actual: &[u8], expected: &[u8]) -> Result<(), String> {
    if actual == expected {
        Ok(())
    } else {
        Err(format!("{what}: {} , expected {}", super::hex(actual), super::hex(expected)))
    }
}

/// The ICMP answer the datapath must send for `frame` (spec "Too big"),
/// built here byte by byte with this file's RFC 1071 sums: Ethernet back to
/// the sender (MACs swapped, tags kept), a new IP header from the VIP to the
/// client, ICMP type 3 code 4 with the 16-bit next-hop MTU (IPv4) or ICMPv6
/// type 2 with the 32-bit MTU (checksum over the pseudo-header), then the
/// first 68 / 80 bytes of the client's packet.
pub fn too_big_answer(frame: &[u8], tb: &TooBig) -> Vec<u8> {
    let l2 = tb.l2_len;
    let ip = &frame[l2..];
    let mut out = Vec::new();
    out.extend_from_slice(&frame[6..12]);
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&frame[12..l2 - 2]);
    if !tb.v6 {
        out.extend_from_slice(&[0x08, 0x00]);
        let quote = &ip[..ICMP4_QUOTE];
        let mut header = [0u8; 20];
        header[0] = 0x45;
        header[2..4].copy_from_slice(&((20 + 8 + ICMP4_QUOTE) as u16).to_be_bytes());
        header[8] = L4LB_ICMP_TTL as u8;
        header[9] = ICMP;
        header[12..16].copy_from_slice(&ip[16..20]);
        header[16..20].copy_from_slice(&ip[12..16]);
        let sum = internet_checksum(&header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&(tb.mtu as u16).to_be_bytes());
        icmp.extend_from_slice(quote);
        let sum = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&icmp);
    } else {
        out.extend_from_slice(&[0x86, 0xdd]);
        let quote = &ip[..ICMP6_QUOTE];
        let len = 8 + ICMP6_QUOTE;
        let mut header = [0u8; 40];
        header[0] = 0x60;
        header[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        header[6] = ICMPV6;
        header[7] = L4LB_ICMP_TTL as u8;
        header[8..24].copy_from_slice(&ip[24..40]);
        header[24..40].copy_from_slice(&ip[8..24]);
        let mut icmp = vec![2u8, 0, 0, 0];
        icmp.extend_from_slice(&tb.mtu.to_be_bytes());
        icmp.extend_from_slice(quote);
        let sum = icmpv6_checksum(&header[8..24], &header[24..40], &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&icmp);
    }
    out
}

/// RFC 4443 section 2.3 / RFC 8200 section 8.1: the ICMPv6 checksum covers a
/// pseudo-header (source, destination, 32-bit upper-layer length, 3 zero
/// bytes, next header 58) and the message (its checksum field as given).
pub fn icmpv6_checksum(src: &[u8], dst: &[u8], message: &[u8]) -> u16 {
    let mut bytes = Vec::with_capacity(40 + message.len());
    bytes.extend_from_slice(src);
    bytes.extend_from_slice(dst);
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, ICMPV6]);
    bytes.extend_from_slice(message);
    internet_checksum(&bytes)
}

/// Checks an XDP_TX output counted TX_TOO_BIG, parsed field by field
/// (independently of `too_big_answer`): a well-formed ICMP answer to the
/// frame's sender whose checksums verify and whose quote is the start of the
/// frame's IP packet. Err names the field.
pub fn check_too_big_output(frame: &[u8], out: &[u8], tb: &TooBig) -> Result<(), String> {
    let l2 = tb.l2_len;
    let ip = &frame[l2..];
    let (headers, quote) = if tb.v6 { (48, ICMP6_QUOTE) } else { (28, ICMP4_QUOTE) };
    if out.len() != l2 + headers + quote {
        return Err(format!("ICMP answer is {} bytes, expected {l2} + {headers} + {quote}", out.len()));
    }
    field("answer Ethernet destination (the frame's source)", &out[0..6], &frame[6..12])?;
    field("answer Ethernet source (the frame's destination)", &out[6..12], &frame[0..6])?;
    field("answer VLAN tags (kept)", &out[12..l2 - 2], &frame[12..l2 - 2])?;
    let answer = &out[l2..];
    if !tb.v6 {
        field("answer EtherType", &out[l2 - 2..l2], &[0x08, 0x00])?;
        field("answer version/IHL, TOS", &answer[0..2], &[0x45, 0])?;
        field("answer tot_len", &answer[2..4], &96u16.to_be_bytes())?;
        field("answer id, flags/offset (no DF)", &answer[4..8], &[0, 0, 0, 0])?;
        field("answer TTL, protocol", &answer[8..10], &[64, 1])?;
        if internet_checksum(&answer[..20]) != 0 {
            return Err(format!("answer IPv4 header checksum {} does not verify", super::hex(&answer[10..12])));
        }
        field("answer source (the VIP)", &answer[12..16], &ip[16..20])?;
        field("answer destination (the client)", &answer[16..20], &ip[12..16])?;
        let icmp = &answer[20..];
        field("ICMP type/code (3/4)", &icmp[0..2], &[3, 4])?;
        field("ICMP unused + next-hop MTU", &icmp[4..8], &[0, 0, (tb.mtu >> 8) as u8, tb.mtu as u8])?;
        if internet_checksum(icmp) != 0 {
            return Err(format!("ICMP checksum {} does not verify", super::hex(&icmp[2..4])));
        }
        field("ICMP quote (the client's packet's first 68 bytes)", &icmp[8..], &ip[..ICMP4_QUOTE])?;
    } else {
        field("answer EtherType", &out[l2 - 2..l2], &[0x86, 0xdd])?;
        field("answer version/class/label", &answer[0..4], &[0x60, 0, 0, 0])?;
        field("answer payload length, next header, hop limit", &answer[4..8], &[0, 88, 58, 64])?;
        field("answer source (the VIP)", &answer[8..24], &ip[24..40])?;
        field("answer destination (the client)", &answer[24..40], &ip[8..24])?;
        let icmp = &answer[40..];
        field("ICMPv6 type/code (2/0)", &icmp[0..2], &[2, 0])?;
        field("ICMPv6 MTU", &icmp[4..8], &tb.mtu.to_be_bytes())?;
        if icmpv6_checksum(&answer[8..24], &answer[24..40], icmp) != 0 {
            return Err(format!(
                "ICMPv6 checksum {} does not verify (pseudo-header included)",
                super::hex(&icmp[2..4])
            ));
        }
        field("ICMPv6 quote (the client's packet's first 80 bytes)", &icmp[8..], &ip[..ICMP6_QUOTE])?;
    }
    Ok(())
}

/// Every entry of an array map of u64 words (`words` per value), summed over
/// CPUs for a per-CPU map, with one batch lookup: entry e's word w at
/// e * words + w.
pub fn read_u64s(map: &MapMut, entries: usize, words: usize) -> TestResult<Vec<u64>> {
    let cpus = if map.map_type().is_percpu() { libbpf_rs::num_possible_cpus()? } else { 1 };
    let stride = words * cpus;
    let mut keys = vec![0u32; entries];
    let mut values = vec![0u64; entries * stride];
    let mut count = entries as u32;
    let mut out_batch = 0u32;
    // SAFETY: plain C struct; zero is its documented default.
    let mut opts: libbpf_sys::bpf_map_batch_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _;
    // SAFETY: keys, values and out_batch hold `count` entries of the map's key and (per-CPU) value sizes.
    let rc = unsafe {
        libbpf_sys::bpf_map_lookup_batch(
            map.as_fd().as_raw_fd(),
            std::ptr::null_mut(),
            (&mut out_batch as *mut u32).cast(),
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            &mut count,
            &opts,
        )
    };
    if (rc != 0 && rc != -nix::libc::ENOENT) || count as usize != entries {
        return Err(fail(format!("batch lookup of {}: rc {rc}, {count} entries", map.name().to_string_lossy())));
    }
    if keys.iter().enumerate().any(|(i, &k)| k as usize != i) {
        return Err(fail(format!("batch lookup of {}: keys out of order", map.name().to_string_lossy())));
    }
    // Summed over CPUs into one flat vector, entry after entry: a check reads
    // 32,768 backends twice, and the suite runs unoptimized in CI.
    let mut out = vec![0u64; entries * words];
    for (e, entry) in values.chunks_exact(stride).enumerate() {
        for cpu in entry.chunks_exact(words) {
            for (w, value) in cpu.iter().enumerate() {
                out[e * words + w] += value;
            }
        }
    }
    Ok(out)
}
