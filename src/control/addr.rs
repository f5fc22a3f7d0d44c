//! Which addresses l4lb can send to: the checks every input (destination
//! files, configuration, command-line addresses) applies. Callers word the
//! error for their own input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use macaddr::MacAddr6;

/// IPv4 addresses a packet can be tunnelled to; the reason otherwise.
pub fn check_unicast_ipv4(addr: Ipv4Addr) -> Result<(), &'static str> {
    if addr.is_unspecified() {
        Err("is unspecified (0.0.0.0)")
    } else if addr.is_broadcast() {
        Err("is the broadcast address")
    } else if addr.is_multicast() {
        Err("is multicast")
    } else if addr.is_loopback() {
        Err("is a loopback address")
    } else {
        Ok(())
    }
}

/// IPv6 addresses a packet can be tunnelled to; the reason otherwise.
pub fn check_unicast_ipv6(addr: Ipv6Addr) -> Result<(), &'static str> {
    if addr.is_unspecified() {
        Err("is unspecified (::)")
    } else if addr.is_loopback() {
        Err("is a loopback address")
    } else if addr.is_multicast() {
        Err("is multicast")
    } else if addr.to_ipv4_mapped().is_some() {
        Err("is an IPv4-mapped IPv6 address (write the IPv4 address)")
    } else {
        Ok(())
    }
}

/// Either family: [`check_unicast_ipv4`] or [`check_unicast_ipv6`].
pub fn check_unicast(addr: IpAddr) -> Result<(), &'static str> {
    match addr {
        IpAddr::V4(a) => check_unicast_ipv4(a),
        IpAddr::V6(a) => check_unicast_ipv6(a),
    }
}

/// Why a MAC address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacError {
    /// Not six hex pairs.
    Unreadable,
    /// All zero, or a multicast/broadcast address: no next hop.
    NotUnicast(MacAddr6),
}

/// A next-hop MAC address: readable and unicast.
pub fn parse_unicast_mac(text: &str) -> Result<[u8; 6], MacError> {
    let mac: MacAddr6 = text.parse().map_err(|_| MacError::Unreadable)?;
    if mac.is_nil() || mac.is_multicast() {
        return Err(MacError::NotUnicast(mac));
    }
    Ok(mac.into_array())
}
