//! Replacing the running l4lb program in place: a new program is loaded on
//! the running program's own maps (configuration, services, tables,
//! backends, flow pins, counters) and swapped in with one atomic netlink
//! replace (XDP_FLAGS_REPLACE naming the old program), so that every frame
//! meets one program or the other, both reading the same tables: no frame
//! is dropped, no flow moves, the counters go on counting.
//!
//! It refuses, before loading anything, when a map's layout differs (key or
//! value size, or a map one side lacks): the new program would misread the
//! old state.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapHandle, OpenObject};

use crate::attach::refused;
use crate::bpf::percpu_skel::L4lbXdpPercpuSkelBuilder;
use crate::discover::{self, AttachedProgram, Mode};
use crate::iface::Interface;
use crate::libbpf_log;

/// The maps that hold l4lb's state; any others of an object (its .rodata,
/// .bss) are the new program's own.
pub const STATE_MAPS: [&str; 9] = [
    crate::bpf::MAP_CONFIG,
    crate::bpf::MAP_VIPS,
    crate::bpf::MAP_SERVICES,
    crate::bpf::MAP_TABLES,
    crate::bpf::MAP_BACKENDS,
    crate::bpf::MAP_BACKEND_STATS,
    crate::bpf::MAP_SERVICE_STATS,
    crate::bpf::MAP_COUNTERS,
    crate::bpf::MAP_FLOWS,
];

/// What `upgrade` did.
pub struct Upgraded {
    pub old: AttachedProgram,
    pub new_id: u32,
    /// The maps the new program took over (by name, with their ids).
    pub kept: Vec<(String, u32)>,
}

/// One map of the running program.
struct RunningMap {
    handle: MapHandle,
    id: u32,
}

/// The size of one map's keys and values, as the two sides declare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub key_size: u32,
    pub value_size: u32,
}

/// Why `running` and `new` (by map name) cannot share maps, or None (pure).
pub fn incompatibility(running: &BTreeMap<String, Layout>, new: &BTreeMap<String, Layout>) -> Option<String> {
    for name in STATE_MAPS {
        match (running.get(name), new.get(name)) {
            (Some(r), Some(n)) if r == n => {}
            (Some(r), Some(n)) => {
                return Some(format!(
                    "map `{name}` has {}-byte keys and {}-byte values in the running program, {} and {} in the new one",
                    r.key_size, r.value_size, n.key_size, n.value_size
                ))
            }
            (Some(_), None) => return Some(format!("the new program has no map `{name}`: its state would be lost")),
            (None, Some(_)) => return Some(format!("the running program has no map `{name}`")),
            (None, None) => return Some(format!("neither program has map `{name}`")),
        }
    }
    None
}

/// Replaces the l4lb program on `iface` with the binary's own datapath (or
/// the l4lb object in `object`), keeping its maps. Driver and generic mode.
pub fn upgrade(iface: &Interface, object: Option<&Path>) -> Result<Upgraded> {
    let old = discover::find_l4lb(iface)?;
    if old.mode == Mode::Offload {
        bail!("{}: {old} is offloaded: its maps live on the NIC, which an in-place upgrade cannot share", iface.name);
    }
    let running = running_maps(&old)?;
    libbpf_log::capture();
    let new_id = match object {
        None => {
            let mut storage = MaybeUninit::uninit();
            let mut open =
                L4lbXdpPercpuSkelBuilder::default().open(&mut storage).context("opening the embedded l4lb object")?;
            share_maps(open.open_object_mut(), &running)?;
            let skel = open.load().map_err(|err| refused("new l4lb", "", err))?;
            replace(iface, &old, skel.progs.l4lb_balance.as_fd())?
        }
        Some(path) => {
            let mut open = libbpf_rs::ObjectBuilder::default()
                .open_file(path)
                .with_context(|| format!("{}: opening the BPF object", path.display()))?;
            share_maps(&mut open, &running)?;
            let loaded = open.load().map_err(|err| refused("new l4lb", &format!(" ({})", path.display()), err))?;
            let program = loaded
                .progs()
                .find(|p| p.name() == crate::bpf::PROG_NAME)
                .ok_or_else(|| anyhow!("{}: no program `{}`", path.display(), crate::bpf::PROG_NAME))?;
            replace(iface, &old, program.as_fd())?
        }
    };
    let kept = running.into_iter().map(|(name, map)| (name, map.id)).collect();
    Ok(Upgraded { old, new_id, kept })
}

/// The running program's state maps, by name.
fn running_maps(program: &AttachedProgram) -> Result<BTreeMap<String, RunningMap>> {
    let mut maps = BTreeMap::new();
    for &id in &program.map_ids {
        let handle = MapHandle::from_map_id(id).with_context(|| format!("opening map id {id} of {program}"))?;
        let name = handle.name().to_string_lossy().into_owned();
        if STATE_MAPS.contains(&name.as_str()) {
            maps.insert(name, RunningMap { handle, id });
        }
    }
    Ok(maps)
}

/// Points the new object's state maps at the running ones (the same type
/// and size, whatever the object declares: per-CPU counters, the LRU flow
/// table of the size it was attached with), after checking their layouts.
fn share_maps(open: &mut OpenObject, running: &BTreeMap<String, RunningMap>) -> Result<()> {
    let layout = |key_size, value_size| Layout { key_size, value_size };
    let running_layouts =
        running.iter().map(|(name, m)| (name.clone(), layout(m.handle.key_size(), m.handle.value_size()))).collect();
    let new_layouts = open
        .maps()
        .map(|m| (m.name().to_string_lossy().into_owned(), layout(m.key_size(), m.value_size())))
        .filter(|(name, _)| STATE_MAPS.contains(&name.as_str()))
        .collect();
    if let Some(why) = incompatibility(&running_layouts, &new_layouts) {
        bail!("the map layouts are incompatible: {why}; nothing was changed (to start afresh: l4lb attach --force, then apply the configuration again)");
    }
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        let Some(old) = running.get(&name) else { continue };
        map.set_type(old.handle.map_type()).with_context(|| format!("typing `{name}` as the running one"))?;
        map.set_max_entries(old.handle.max_entries()).with_context(|| format!("sizing `{name}` as the running one"))?;
        map.reuse_fd(old.handle.as_fd()).with_context(|| format!("sharing the running `{name}`"))?;
    }
    Ok(())
}

/// Swaps `new` in for `old` on `iface` in one netlink request that fails if
/// `old` is no longer the attached program; returns the new program's id.
fn replace(iface: &Interface, old: &AttachedProgram, new: BorrowedFd<'_>) -> Result<u32> {
    let old_fd = discover::program_fd(old.id).with_context(|| format!("opening {old}"))?;
    // SAFETY: an all-zero bpf_xdp_attach_opts with sz set is the documented init.
    let mut opts: libbpf_sys::bpf_xdp_attach_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_xdp_attach_opts>() as _;
    opts.old_prog_fd = old_fd.as_raw_fd();
    let flags = old.mode.flag().bits() | libbpf_sys::XDP_FLAGS_REPLACE;
    // SAFETY: valid fds and a sized options struct.
    let rc = unsafe { libbpf_sys::bpf_xdp_attach(iface.index as i32, new.as_raw_fd(), flags, &opts) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc))
            .with_context(|| format!("{}: replacing {old} (was it replaced meanwhile?)", iface.name));
    }
    Ok(discover::find_l4lb(iface)?.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts(changes: &[(&str, Option<Layout>)]) -> BTreeMap<String, Layout> {
        let mut all: BTreeMap<String, Layout> =
            STATE_MAPS.iter().map(|n| (n.to_string(), Layout { key_size: 4, value_size: 16 })).collect();
        for (name, layout) in changes {
            match layout {
                Some(l) => all.insert(name.to_string(), *l),
                None => all.remove(*name),
            };
        }
        all
    }

    #[test]
    fn maps_of_the_same_sizes_are_compatible_and_any_difference_is_named() {
        assert_eq!(incompatibility(&layouts(&[]), &layouts(&[])), None);
        let wider = layouts(&[("l4lb_flows", Some(Layout { key_size: 4, value_size: 24 }))]);
        assert_eq!(
            incompatibility(&layouts(&[]), &wider).as_deref(),
            Some("map `l4lb_flows` has 4-byte keys and 16-byte values in the running program, 4 and 24 in the new one")
        );
        let without = layouts(&[("l4lb_counters", None)]);
        assert!(incompatibility(&layouts(&[]), &without).unwrap().contains("new program has no map `l4lb_counters`"));
        assert!(incompatibility(&without, &layouts(&[])).unwrap().contains("running program has no map"));
    }
}
