//! Finding what is attached to an interface through the kernel alone, so that
//! a program loaded by `l4lb attach` and one loaded by
//! `ip link set dev DEV xdpdrv obj l4lb_xdp.o sec xdp` are handled the same.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use libbpf_rs::XdpFlags;

use crate::bpf::PROG_NAME;
use crate::iface::Interface;

/// XDP attachment modes, as the seed's statistics header names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Driver,
    Generic,
    Offload,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Driver, Mode::Generic, Mode::Offload];

    /// The attach flag of this mode.
    pub fn flag(self) -> XdpFlags {
        match self {
            Mode::Driver => XdpFlags::DRV_MODE,
            Mode::Generic => XdpFlags::SKB_MODE,
            Mode::Offload => XdpFlags::HW_MODE,
        }
    }

    /// Lower-case name used in JSON output.
    pub fn json_name(self) -> &'static str {
        match self {
            Mode::Driver => "driver",
            Mode::Generic => "generic",
            Mode::Offload => "offload",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Driver => "Driver",
            Mode::Generic => "Generic",
            Mode::Offload => "Offload",
        })
    }
}

/// An XDP program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub map_ids: Vec<u32>,
}

impl AttachedProgram {
    pub fn is_l4lb(&self) -> bool {
        self.is(&L4LB)
    }

    pub fn is(&self, kind: &Kind) -> bool {
        self.name == kind.prog_name
    }
}

/// A kind of program l4lb attaches: what the kernel calls it, what errors
/// call it, and the command that attaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub prog_name: &'static str,
    pub label: &'static str,
    pub attach_command: &'static str,
}

/// The balancer.
pub const L4LB: Kind = Kind { prog_name: PROG_NAME, label: "l4lb", attach_command: "l4lb attach" };

impl fmt::Display for AttachedProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (id {}, {} mode)", self.name, self.id, self.mode)
    }
}

/// Every XDP program attached to the interface, one per mode at most.
pub fn attached_programs(iface: &Interface) -> Result<Vec<AttachedProgram>> {
    // SAFETY: an all-zero bpf_xdp_query_opts with sz set is the documented init.
    let mut opts: libbpf_sys::bpf_xdp_query_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _;
    // SAFETY: opts is a valid, sized options struct.
    let rc = unsafe { libbpf_sys::bpf_xdp_query(iface.index as i32, 0, &mut opts) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc))
            .with_context(|| format!("{}: querying attached XDP programs", iface.name));
    }
    let ids = [(Mode::Driver, opts.drv_prog_id), (Mode::Generic, opts.skb_prog_id), (Mode::Offload, opts.hw_prog_id)];
    ids.into_iter().filter(|&(_, id)| id != 0).map(|(mode, id)| program_info(id, mode)).collect()
}

/// A file descriptor of the BPF program with this id.
pub fn program_fd(id: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall wrapper; a negative return is an error code.
    let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd)).with_context(|| format!("opening BPF program id {id}"));
    }
    // SAFETY: fd was just returned to us and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn program_info(id: u32, mode: Mode) -> Result<AttachedProgram> {
    let fd = program_fd(id)?;
    let mut map_ids = vec![0u32; 64];
    let mut info = libbpf_sys::bpf_prog_info {
        nr_map_ids: map_ids.len() as u32,
        map_ids: map_ids.as_mut_ptr() as u64,
        ..Default::default()
    };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: info points to a bpf_prog_info of `len` bytes whose map_ids buffer holds nr_map_ids entries.
    let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc)).with_context(|| format!("reading BPF program id {id}"));
    }
    map_ids.truncate(info.nr_map_ids.min(64) as usize);
    let name: Vec<u8> = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok(AttachedProgram { id, name: String::from_utf8_lossy(&name).into_owned(), mode, map_ids })
}

/// The l4lb program on the interface, or an error that says what is there instead.
pub fn find_l4lb(iface: &Interface) -> Result<AttachedProgram> {
    find(iface, &L4LB)
}

/// The program of this kind on the interface, or an error that says what is there instead.
pub fn find(iface: &Interface, kind: &Kind) -> Result<AttachedProgram> {
    let programs = attached_programs(iface)?;
    if let Some(program) = programs.iter().find(|p| p.is(kind)) {
        return Ok(program.clone());
    }
    match programs.first() {
        None => bail!(
            "no {} program on {} (attach one with `{} -i {}`)",
            kind.label,
            iface.name,
            kind.attach_command,
            iface.name
        ),
        Some(other) => bail!("{} has XDP program {other}, which is not {}", iface.name, kind.label),
    }
}
