//! Loading the datapath through the skeleton, attaching it, detaching it.
//! The attach and detach steps serve the decap program too (`crate::decap`).

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapType, Xdp, XdpFlags};

use crate::bpf::percpu_skel::L4lbXdpPercpuSkelBuilder;
use crate::bpf::skel::L4lbXdpSkelBuilder;
use crate::discover::{self, AttachedProgram, Kind, Mode};
use crate::iface::Interface;
use crate::libbpf_log;

/// The connection table (`l4lb_flows`) a program is loaded with. The object
/// declares a HASH map of L4LB_FLOW_ENTRIES (the only kind offload takes; it
/// evicts nothing, a full one pins no new flow); off the NIC l4lb loads an
/// LRU hash instead, which makes room by dropping the least recently used pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTable {
    pub lru: bool,
    pub entries: u32,
}

impl FlowTable {
    /// The table for `mode`, with `entries` (`--flow-entries`) if given.
    /// Offloaded, the object's HASH map is kept as it is.
    pub fn for_mode(mode: Mode, entries: Option<u32>) -> Result<FlowTable> {
        match (mode, entries) {
            (Mode::Offload, Some(n)) => bail!(
                "--flow-entries {n}: offloaded, the flow table is the object's HASH map of {} entries; leave --flow-entries out",
                crate::bpf::FLOW_ENTRIES
            ),
            (Mode::Offload, None) => Ok(FlowTable { lru: false, entries: crate::bpf::FLOW_ENTRIES }),
            (_, n) => Ok(FlowTable { lru: true, entries: n.unwrap_or(crate::bpf::FLOW_ENTRIES_DEFAULT) }),
        }
    }
}

impl std::fmt::Display for FlowTable {
    /// `LRU hash of 1048576 flows`, `HASH of 65536 flows (no eviction)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lru {
            write!(f, "LRU hash of {} flows", self.entries)
        } else {
            write!(f, "HASH of {} flows (no eviction)", self.entries)
        }
    }
}

/// Opens an l4lb skeleton (`$builder`), shapes its maps for `$mode`, loads
/// it and attaches it: one body for the two builds of the datapath, whose
/// skeletons have the same maps and program under different types.
macro_rules! load_and_attach {
    ($builder:ty, $iface:expr, $mode:expr, $force:expr, $flows:expr, $present:expr) => {{
        let (iface, mode, flows): (&Interface, Mode, FlowTable) = ($iface, $mode, $flows);
        let mut storage = MaybeUninit::uninit();
        let mut open = <$builder>::default().open(&mut storage).context("opening the embedded l4lb object")?;
        if mode == Mode::Offload {
            open.progs.l4lb_balance.set_ifindex(iface.index);
            let maps = &mut open.maps;
            for map in [
                &mut maps.l4lb_config,
                &mut maps.l4lb_vips,
                &mut maps.l4lb_services,
                &mut maps.l4lb_tables,
                &mut maps.l4lb_backends,
                &mut maps.l4lb_be_stats,
                &mut maps.l4lb_svc_stats,
                &mut maps.l4lb_flows,
                &mut maps.l4lb_counters,
            ] {
                map.set_map_ifindex(iface.index);
            }
            // Room for fewer service tables on the NIC: see L4LB_OFFLOAD_MAX_SERVICES.
            maps.l4lb_tables
                .set_max_entries(crate::bpf::table_entries(crate::bpf::OFFLOAD_MAX_SERVICES))
                .context("sizing l4lb_tables for offload")?;
        } else {
            // Off the NIC, per-CPU counters keep CPUs from bouncing cache
            // lines (and the driver build adds to them without atomics).
            for map in [&mut open.maps.l4lb_counters, &mut open.maps.l4lb_be_stats, &mut open.maps.l4lb_svc_stats] {
                map.set_type(MapType::PercpuArray).context("switching counters to per-CPU")?;
            }
        }
        if flows.lru {
            let table = &mut open.maps.l4lb_flows;
            table.set_type(MapType::LruHash).context("switching l4lb_flows to an LRU hash")?;
            table
                .set_max_entries(flows.entries)
                .with_context(|| format!("sizing l4lb_flows to {} entries", flows.entries))?;
        }
        let skel = open.load().map_err(|err| {
            let hint = if mode == Mode::Offload {
                format!(" ({} may not support XDP hardware offload)", iface.name)
            } else {
                String::new()
            };
            refused("l4lb", &hint, err)
        })?;
        attach_fd(iface, skel.progs.l4lb_balance.as_fd(), mode, $force, $present)?;
    }};
}

/// Loads l4lb and attaches it to `iface` in `mode`. The attachment is a
/// netlink one: it stays after this process exits. Returns the program id.
/// Offloaded it loads the object iproute2 loads (`l4lb_xdp.o`: atomic adds
/// only); in driver and generic mode the driver build of the same source
/// (`l4lb_xdp_percpu.o`: plain adds into its per-CPU counters).
pub fn attach(iface: &Interface, mode: Mode, force: bool, flows: FlowTable) -> Result<u32> {
    let present = discover::attached_programs(iface)?;
    refuse_unless_forced(iface, &present, force)?;

    libbpf_log::capture();
    if mode == Mode::Offload {
        load_and_attach!(L4lbXdpSkelBuilder, iface, mode, force, flows, &present);
    } else {
        load_and_attach!(L4lbXdpPercpuSkelBuilder, iface, mode, force, flows, &present);
    }
    let id = discover::find_l4lb(iface)?.id;
    Ok(id)
}

/// The error of a program the kernel refused to load: `err` (libbpf's),
/// then the last lines libbpf logged (for a verifier rejection, the end of
/// the verifier log: the instruction it stopped at and why).
pub fn refused(label: &str, hint: &str, err: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("the kernel refused the {label} program{hint}: {err}{}", libbpf_log::tail(12))
}

/// Refuses to go on when the interface already has an XDP program (`present`,
/// as listed before loading anything) and `force` was not given.
pub fn refuse_unless_forced(iface: &Interface, present: &[AttachedProgram], force: bool) -> Result<()> {
    match present.first() {
        Some(other) if !force => bail!("{} already has XDP program {other}; use --force to replace it", iface.name),
        _ => Ok(()),
    }
}

/// Attaches a loaded XDP program in `mode` (a netlink attachment: it stays
/// after this process exits). Programs of `present` in other modes are
/// removed first; one in the same mode is replaced only with `force`.
pub fn attach_fd(
    iface: &Interface,
    program: BorrowedFd<'_>,
    mode: Mode,
    force: bool,
    present: &[AttachedProgram],
) -> Result<()> {
    // Only one mode may hold a program at a time: clear the others first.
    for other in present.iter().filter(|p| p.mode != mode) {
        detach_program(iface, other)?;
    }
    let mut flags = mode.flag();
    if !force {
        flags |= XdpFlags::UPDATE_IF_NOEXIST;
    }
    Xdp::new(program).attach(iface.index as i32, flags).map_err(|err| {
        let hint = match mode {
            Mode::Offload => format!(": {} does not support XDP hardware offload", iface.name),
            Mode::Driver => format!(": {} may lack native XDP support (try --mode skb)", iface.name),
            Mode::Generic => String::new(),
        };
        anyhow!("attaching to {} in {mode} mode failed{hint} ({err})", iface.name)
    })
}

/// Detaches every l4lb program on the interface; returns what was removed.
pub fn detach(iface: &Interface) -> Result<Vec<AttachedProgram>> {
    detach_kind(iface, &discover::L4LB)
}

/// Detaches every program of this kind on the interface, whatever its mode;
/// returns what was removed. Another program is left alone, and named.
pub fn detach_kind(iface: &Interface, kind: &Kind) -> Result<Vec<AttachedProgram>> {
    let present = discover::attached_programs(iface)?;
    let ours: Vec<AttachedProgram> = present.iter().filter(|p| p.is(kind)).cloned().collect();
    if ours.is_empty() {
        match present.first() {
            Some(other) => bail!("{} has XDP program {other}, which is not {}: leaving it", iface.name, kind.label),
            None => bail!("no {} program on {}", kind.label, iface.name),
        }
    }
    for program in &ours {
        detach_program(iface, program)?;
    }
    Ok(ours)
}

fn detach_program(iface: &Interface, program: &AttachedProgram) -> Result<()> {
    // SAFETY: plain syscall wrapper; null options detach whatever is in that mode.
    let rc = unsafe { libbpf_sys::bpf_xdp_detach(iface.index as i32, program.mode.flag().bits(), std::ptr::null()) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc))
            .with_context(|| format!("{}: detaching {program}", iface.name));
    }
    Ok(())
}
