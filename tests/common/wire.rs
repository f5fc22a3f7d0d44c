//! Numbers from the wire and the XDP ABI that the packet tests spell out.

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const ICMP: u8 = 1;
pub const IPIP: u8 = 4;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const IPV6_IN_IPV4: u8 = 41;
pub const GRE: u8 = 47;
pub const ESP: u8 = 50;
pub const SCTP: u8 = 132;

/// An XDP verdict by name, for failure messages.
pub fn verdict_name(verdict: u32) -> String {
    match verdict {
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        other => format!("verdict {other}"),
    }
}
