//! The health probes' path (src/bpf/l4lb_probe.bpf.c): probes of a backend
//! go to the service's VIP, encapsulated to that backend as the balancer
//! encapsulates clients' packets, so that a backend whose decapsulation or VIP
//! binding is broken fails its probes.
//!
//! Set up by `l4lb serve` for its interface DEV (index N), torn down when it
//! stops (and on the next start, if it was killed):
//! * a veth pair `l4lbpN` / `l4lbqN`, ARP off (no neighbour is ever resolved
//!   for a VIP), the probe program on `l4lbpN`'s TC egress;
//! * policy rules (IPv4 and IPv6): packets marked L4LB_PROBE_MARK (upper 16
//!   bits) look up table L4LB_PROBE_MARK + N, whose default route is `l4lbpN`
//!   with the balancer's source address;
//! * the map of targets: for each target number (the mark's lower 16 bits),
//!   the backend's address and next hop, the balancer's source and MAC.
//!
//! The backend answers the balancer's source address directly; the answer
//! comes in on DEV, where l4lb passes it (it is not for a VIP) to the stack.
//! A reverse-path filter in strict mode on DEV drops those answers unless a
//! route to the VIPs points at DEV (docs/operations.md).

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::process::Command;

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, TcHookBuilder, TC_EGRESS};

use crate::bpf::probe_skel::L4lbProbeSkelBuilder;
use crate::bpf::{self, consts, ProbeTarget, PROBE_COUNTER_NAMES};
use crate::iface::Interface;
use crate::libbpf_log;

/// The mark of every probe socket: L4LB_PROBE_MARK | target number.
pub const MARK: u32 = consts::L4LB_PROBE_MARK;
/// Target numbers: 0..TARGETS.
pub const TARGETS: usize = consts::L4LB_PROBE_TARGETS as usize;

/// Where one target's probes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The backend (outer destination).
    pub backend: IpAddr,
    /// The backend's next hop.
    pub next_hop: [u8; 6],
    /// The balancer's outer source of that family.
    pub source: IpAddr,
}

/// The probe device, its rules and its program, for one interface; torn
/// down on drop.
pub struct ProbePath {
    device: String,
    table: u32,
    ifindex: u32,
    mac: [u8; 6],
    targets: MapHandle,
    counters: MapHandle,
}

/// The probe device's name for the interface of index `ifindex`, and its peer's.
pub fn device_names(ifindex: u32) -> (String, String) {
    (format!("l4lbp{ifindex}"), format!("l4lbq{ifindex}"))
}

impl ProbePath {
    /// Sets the path up for `iface`, with `source_v4` / `source_v6` as the
    /// probes' source addresses (the balancer's, where backends answer);
    /// leftovers of an agent that was killed are removed first.
    pub fn set_up(iface: &Interface, source_v4: Option<Ipv4Addr>, source_v6: Option<Ipv6Addr>) -> Result<ProbePath> {
        let (device, peer) = device_names(iface.index);
        let table = MARK + iface.index;
        tear_down(&device, table);
        let mac = iface.mac()?;
        let (targets, counters) =
            load(&device, &peer).and_then(|_| attach(&device)).inspect_err(|_| tear_down(&device, table))?;
        let path = ProbePath { device, table, ifindex: iface.index, mac, targets, counters };
        path.route(source_v4.map(IpAddr::V4), "-4")?;
        // IPv6 probes go to IPv6 VIPs, whose backends are IPv6: they need a
        // source of the family. A host without one (or without IPv6) gets
        // no IPv6 rule, and its IPv4 probes still work.
        if let Some(source) = source_v6 {
            path.route(Some(IpAddr::V6(source)), "-6")?;
        }
        Ok(path)
    }

    /// The rule and the default route of one family (`-4` or `-6`).
    fn route(&self, source: Option<IpAddr>, family: &str) -> Result<()> {
        let (mark, table) = (format!("{MARK:#x}/{:#x}", consts::L4LB_PROBE_MARK_MASK), self.table.to_string());
        ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table, "pref", "100"])?;
        let mut route = vec![family, "route", "replace", "default", "dev", &self.device, "table", &table];
        let source = source.map(|s| s.to_string());
        if let Some(source) = &source {
            route.extend(["src", source.as_str()]);
        }
        ip(&route)
    }

    /// Points target `number`'s probes at `route`.
    pub fn set_target(&self, number: usize, route: &Route) -> Result<()> {
        let mut target =
            ProbeTarget { dst_mac: route.next_hop, src_mac: self.mac, ifindex: self.ifindex, ..Default::default() };
        match (route.backend, route.source) {
            (IpAddr::V4(backend), IpAddr::V4(source)) => {
                target.family = consts::L4LB_FAMILY_IPV4 as u8;
                target.dst[..4].copy_from_slice(&backend.octets());
                target.src[..4].copy_from_slice(&source.octets());
            }
            (IpAddr::V6(backend), IpAddr::V6(source)) => {
                target.family = consts::L4LB_FAMILY_IPV6 as u8;
                target.dst = backend.octets();
                target.src = source.octets();
            }
            (backend, source) => bail!("probe target {number}: backend {backend} and source {source} differ in family"),
        }
        if number >= TARGETS {
            bail!("probe target {number}: at most {TARGETS} backends are probed");
        }
        self.targets
            .update(&(number as u32).to_ne_bytes(), bpf::value_bytes(&target), MapFlags::ANY)
            .with_context(|| format!("{}: writing probe target {number}", self.device))
    }

    /// The probe program's counters, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for (i, name) in PROBE_COUNTER_NAMES.iter().enumerate() {
            let value = self
                .counters
                .lookup(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .with_context(|| format!("{}: reading the probe counters", self.device))?
                .and_then(|v| v.get(..8).map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default())))
                .unwrap_or(0);
            out.push((*name, value));
        }
        Ok(out)
    }
}

impl Drop for ProbePath {
    fn drop(&mut self) {
        tear_down(&self.device, self.table);
    }
}

/// Creates the veth pair, both ends up, ARP off on the probe device.
fn load(device: &str, peer: &str) -> Result<()> {
    ip(&["link", "add", device, "type", "veth", "peer", "name", peer])?;
    ip(&["link", "set", "dev", device, "arp", "off", "up"])?;
    ip(&["link", "set", "dev", peer, "up"])
}

/// Loads the probe program and attaches it to `device`'s TC egress; returns
/// its maps (the filter keeps the program and its maps alive).
fn attach(device: &str) -> Result<(MapHandle, MapHandle)> {
    let index = Interface::by_name(device)?.index;
    libbpf_log::capture();
    let mut storage = MaybeUninit::uninit();
    let open = L4lbProbeSkelBuilder::default().open(&mut storage).context("opening the embedded probe object")?;
    let skel = open.load().map_err(|err| crate::attach::refused("l4lb probe", "", err))?;
    let mut hook = TcHookBuilder::new(skel.progs.l4lb_probe_encap.as_fd())
        .ifindex(index as i32)
        .replace(true)
        .handle(1)
        .priority(1)
        .hook(TC_EGRESS);
    hook.create().with_context(|| format!("{device}: creating the clsact qdisc"))?;
    hook.attach().with_context(|| format!("{device}: attaching the probe program to TC egress"))?;
    let targets = MapHandle::try_from(&skel.maps.l4lb_probe_targets).context("the probe targets map")?;
    let counters = MapHandle::try_from(&skel.maps.l4lb_probe_counters).context("the probe counters map")?;
    Ok((targets, counters))
}

/// Removes the device (its peer, routes and filter go with it) and every
/// rule to the table; each step may find nothing to remove.
fn tear_down(device: &str, table: u32) {
    let _ = ip(&["link", "del", "dev", device]);
    let table = table.to_string();
    for family in ["-4", "-6"] {
        // One rule per family, but a crash between two adds may have left two.
        while ip(&[family, "rule", "del", "lookup", &table]).is_ok() {}
    }
}

/// Runs `ip ARGS`; an error names the command and what it said.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
