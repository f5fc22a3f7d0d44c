//! Loading the datapath through the skeleton, attaching it, detaching it.

use std::mem::MaybeUninit;
use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapType, Xdp, XdpFlags};

use crate::bpf::skel::L4lbXdpSkelBuilder;
use crate::discover::{self, AttachedProgram, Mode};
use crate::iface::Interface;
use crate::libbpf_log;

/// Loads l4lb and attaches it to `iface` in `mode`. The attachment is a
/// netlink one: it stays after this process exits. Returns the program id.
pub fn attach(iface: &Interface, mode: Mode, force: bool) -> Result<u32> {
    let present = discover::attached_programs(iface)?;
    if let Some(other) = present.first() {
        if !force {
            bail!("{} already has XDP program {other}; use --force to replace it", iface.name);
        }
    }

    libbpf_log::capture();
    let mut storage = MaybeUninit::uninit();
    let mut open = L4lbXdpSkelBuilder::default()
        .open(&mut storage)
        .context("opening the embedded l4lb object")?;
    if mode == Mode::Offload {
        open.progs.l4lb_balance.set_ifindex(iface.index);
        let maps = &mut open.maps;
        for map in [
            &mut maps.l4lb_config,
            &mut maps.l4lb_backends,
            &mut maps.l4lb_slots,
            &mut maps.l4lb_be_stats,
            &mut maps.l4lb_counters,
        ] {
            map.set_map_ifindex(iface.index);
        }
    } else {
        // Off the NIC, per-CPU counters keep CPUs from bouncing cache lines.
        for map in [&mut open.maps.l4lb_counters, &mut open.maps.l4lb_be_stats] {
            map.set_type(MapType::PercpuArray).context("switching counters to per-CPU")?;
        }
    }
    let skel = open.load().map_err(|err| {
        let hint = if mode == Mode::Offload {
            format!(" ({} may not support XDP hardware offload)", iface.name)
        } else {
            String::new()
        };
        anyhow!("the kernel refused the l4lb program{hint}: {err}{}", libbpf_log::tail(12))
    })?;

    let program_fd = skel.progs.l4lb_balance.as_fd();
    // Only one mode may hold a program at a time: clear the others first.
    for other in present.iter().filter(|p| p.mode != mode) {
        detach_program(iface, other)?;
    }
    let mut flags = mode.flag();
    if !force {
        flags |= XdpFlags::UPDATE_IF_NOEXIST;
    }
    Xdp::new(program_fd).attach(iface.index as i32, flags).map_err(|err| {
        let hint = match mode {
            Mode::Offload => format!(": {} does not support XDP hardware offload", iface.name),
            Mode::Driver => format!(": {} may lack native XDP support (try --mode skb)", iface.name),
            Mode::Generic => String::new(),
        };
        anyhow!("attaching to {} in {mode} mode failed{hint} ({err})", iface.name)
    })?;
    let id = discover::find_l4lb(iface)?.id;
    Ok(id)
}

/// Detaches every l4lb program on the interface; returns what was removed.
pub fn detach(iface: &Interface) -> Result<Vec<AttachedProgram>> {
    let present = discover::attached_programs(iface)?;
    let ours: Vec<AttachedProgram> = present.iter().filter(|p| p.is_l4lb()).cloned().collect();
    if ours.is_empty() {
        match present.first() {
            Some(other) => bail!("{} has XDP program {other}, which is not l4lb: leaving it", iface.name),
            None => bail!("no l4lb program on {}", iface.name),
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
