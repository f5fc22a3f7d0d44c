//! The backend side of direct server return: the `l4lb_decap` XDP program
//! (src/bpf/l4lb_decap.bpf.c) strips the outer header the balancer pushed
//! (IPv4 protocol 4; IPv6 next header 4 or 41), for IP-in-IP addressed to one
//! of the backend's own addresses, and passes the client's packet to the stack. For kernels without the ipip
//! module. This module loads, attaches and detaches it, fills its address map
//! and reads its counters; the steps it shares with the balancer live in
//! `attach`, `discover` and `maps`.

use std::collections::BTreeSet;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::addr::check_unicast;
use crate::attach;
use crate::bpf::decap_skel::L4lbDecapSkelBuilder;
use crate::bpf::{self, consts, DecapAddr, DECAP_COUNTER_NAMES};
use crate::discover::{self, AttachedProgram, Kind, Mode};
use crate::iface::Interface;
use crate::libbpf_log;
use crate::maps::{self, ProgramMaps};

/// The decap program, as the kernel and the error messages name it.
pub const KIND: Kind = Kind { prog_name: "l4lb_decap", label: "l4lb decap", attach_command: "l4lb decap attach" };
pub const MAP_ADDRS: &str = "decap_addrs";
pub const MAP_COUNTERS: &str = "decap_counters";
/// Addresses one program decapsulates for.
pub const MAX_ADDRS: usize = consts::L4LB_DECAP_MAX_ADDRS as usize;

/// The decap_addrs key of an address: family, then the address bytes in
/// network order, zero-filled to 16.
pub fn addr_key(addr: IpAddr) -> DecapAddr {
    let mut key = DecapAddr::default();
    match addr {
        IpAddr::V4(v4) => {
            key.family = consts::L4LB_DECAP_FAMILY_IPV4 as u8;
            key.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            key.family = consts::L4LB_DECAP_FAMILY_IPV6 as u8;
            key.addr = v6.octets();
        }
    }
    key
}

/// The address a decap_addrs key holds; None for an unknown family.
pub fn key_addr(key: &DecapAddr) -> Option<IpAddr> {
    match u32::from(key.family) {
        consts::L4LB_DECAP_FAMILY_IPV4 => {
            Some(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]).into())
        }
        consts::L4LB_DECAP_FAMILY_IPV6 => Some(Ipv6Addr::from(key.addr).into()),
        _ => None,
    }
}

/// The addresses to decapsulate for, checked (unicast IPv4 or IPv6: the
/// outer destinations the balancer may use), without duplicates, in order.
pub fn check_addrs(addrs: &[IpAddr]) -> Result<Vec<IpAddr>> {
    let mut seen = BTreeSet::new();
    let mut checked = Vec::new();
    for &addr in addrs {
        check_unicast(addr).map_err(|why| anyhow!("cannot decapsulate for {addr}: it {why}"))?;
        if seen.insert(addr) {
            checked.push(addr);
        }
    }
    if checked.is_empty() {
        bail!("no address to decapsulate for");
    }
    if checked.len() > MAX_ADDRS {
        bail!("{} addresses to decapsulate for; at most {MAX_ADDRS}", checked.len());
    }
    Ok(checked)
}

/// Loads the decap program, fills its address map with `addrs` (checked with
/// `check_addrs`) before it sees a frame, and attaches it to `iface` in
/// `mode`. A program already on `iface` is replaced only with `force`. The
/// attachment stays after this process exits.
pub fn attach(iface: &Interface, mode: Mode, force: bool, addrs: &[IpAddr]) -> Result<AttachedProgram> {
    if mode == Mode::Offload {
        bail!("l4lb decap cannot be offloaded (its counters are per-CPU): use --mode drv or skb");
    }
    let addrs = check_addrs(addrs)?;
    let present = discover::attached_programs(iface)?;
    attach::refuse_unless_forced(iface, &present, force)?;

    libbpf_log::capture();
    let mut storage = MaybeUninit::uninit();
    let open = L4lbDecapSkelBuilder::default().open(&mut storage).context("opening the embedded l4lb decap object")?;
    let skel = open.load().map_err(|err| attach::refused(KIND.label, "", err))?;
    for &addr in &addrs {
        skel.maps
            .decap_addrs
            .update(bpf::value_bytes(&addr_key(addr)), &0u32.to_ne_bytes(), MapFlags::NO_EXIST)
            .with_context(|| format!("writing {addr} into map `{MAP_ADDRS}`"))?;
    }
    attach::attach_fd(iface, skel.progs.l4lb_decap.as_fd(), mode, force, &present)?;
    discover::find(iface, &KIND)
}

/// Detaches the decap program from `iface`, whatever its mode; another XDP
/// program is left alone (and named in the error).
pub fn detach(iface: &Interface) -> Result<Vec<AttachedProgram>> {
    attach::detach_kind(iface, &KIND)
}

/// The maps of an attached decap program.
pub struct DecapMaps {
    addrs: MapHandle,
    counters: MapHandle,
}

impl DecapMaps {
    /// The decap program on `iface` and its maps.
    pub fn find(iface: &Interface) -> Result<(AttachedProgram, Self)> {
        let program = discover::find(iface, &KIND)?;
        let maps = Self::open(&program)?;
        Ok((program, maps))
    }

    pub fn open(program: &AttachedProgram) -> Result<Self> {
        let mut maps = ProgramMaps::open(program)?;
        let decap = DecapMaps { addrs: maps.take(MAP_ADDRS)?, counters: maps.take(MAP_COUNTERS)? };
        maps::check_shape(&decap.addrs, size_of::<u32>(), MAX_ADDRS)?;
        maps::check_shape(&decap.counters, size_of::<u64>(), DECAP_COUNTER_NAMES.len())?;
        if decap.addrs.key_size() as usize != size_of::<DecapAddr>() {
            bail!("map `{MAP_ADDRS}` has {}-byte keys, this l4lb expects {}: object and binary are from different versions",
                decap.addrs.key_size(), size_of::<DecapAddr>());
        }
        Ok(decap)
    }

    /// The addresses decapsulated for, sorted.
    pub fn read_addrs(&self) -> Result<Vec<IpAddr>> {
        let mut addrs: Vec<IpAddr> = self
            .addrs
            .keys()
            .filter_map(|bytes| bpf::value_from::<DecapAddr>(&bytes))
            .filter_map(|key| key_addr(&key))
            .collect();
        addrs.sort();
        Ok(addrs)
    }

    /// The counters, indexed like DECAP_COUNTER_NAMES, summed over CPUs.
    pub fn read_counters(&self) -> Result<Vec<u64>> {
        maps::read_u64_counters(&self.counters, DECAP_COUNTER_NAMES.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_family_and_zero_filled_address() {
        let key = addr_key(Ipv4Addr::new(192, 0, 2, 2).into());
        assert_eq!(bpf::value_bytes(&key), [4, 0, 0, 0, 192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let v6: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(addr_key(v6).family, 6);
        for addr in [Ipv4Addr::new(203, 0, 113, 10).into(), v6] {
            assert_eq!(key_addr(&addr_key(addr)), Some(addr));
        }
        assert_eq!(key_addr(&DecapAddr::default()), None);
    }

    #[test]
    fn addresses_are_checked_and_deduplicated() {
        let a: IpAddr = "192.0.2.2".parse().unwrap();
        let b: IpAddr = "198.51.100.9".parse().unwrap();
        let c: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(check_addrs(&[a, b, a]).unwrap(), [a, b]);
        assert_eq!(check_addrs(&[c, a, c]).unwrap(), [c, a]);
        let err = |addrs: &[IpAddr]| format!("{:#}", check_addrs(addrs).unwrap_err());
        assert!(err(&["ff02::1".parse().unwrap()]).contains("ff02::1: it is multicast"));
        assert!(err(&["::".parse().unwrap()]).contains("unspecified"));
        assert!(err(&["::1".parse().unwrap()]).contains("loopback"));
        assert!(err(&["::ffff:192.0.2.2".parse().unwrap()]).contains("IPv4-mapped"));
        assert!(err(&["224.0.0.1".parse().unwrap()]).contains("224.0.0.1: it is multicast"));
        assert!(err(&["0.0.0.0".parse().unwrap()]).contains("unspecified"));
        assert!(err(&[]).contains("no address"));
        let many: Vec<IpAddr> = (0..=MAX_ADDRS as u32).map(|n| Ipv4Addr::from(0x0a00_0001 + n).into()).collect();
        assert!(err(&many).contains("at most 64"));
    }
}
