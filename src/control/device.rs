//! One device's l4lb as every command and the agent handle it: find it,
//! serialise its updates, attach it with its first configuration, and plan
//! a wanted configuration against what runs. The subcommands print what
//! these return; the agent logs it.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::apply;
use crate::attach::FlowTable;
use crate::bpf::{consts, Config};
use crate::config;
use crate::discover::{self, Mode};
use crate::iface::Interface;
use crate::maps::{random_seed, LbMaps};

/// The update lock of one interface, held until dropped.
pub type UpdateLock = crate::netns_lock::NetnsLock;

/// The name of interface `ifname`'s update lock: an abstract socket, so one
/// per network namespace (`ss -xlp | grep l4lb-update` shows who holds it).
pub fn update_lock_name(ifname: &str) -> String {
    format!("l4lb-update-{ifname}")
}

/// The interface, its l4lb program and that program's maps.
pub fn open_l4lb(name: &str) -> Result<(Interface, discover::AttachedProgram, LbMaps)> {
    let iface = Interface::by_name(name)?;
    let program = discover::find_l4lb(&iface)?;
    let maps = LbMaps::open(&program)?;
    Ok((iface, program, maps))
}

/// Serialises updates of one interface's maps: two `l4lb map` runs at once
/// would each plan against a state the other is changing. Waits while
/// another l4lb holds it; held until dropped.
pub fn update_lock(iface: &Interface) -> Result<UpdateLock> {
    crate::netns_lock::lock(&update_lock_name(&iface.name), &format!("{}'s update lock", iface.name))
}

/// The configuration of a freshly attached program: a given seed is fixed,
/// else a random one is chosen; the outer IPv4 source is the device's
/// address if it has one; the MTU is the device's. No service yet.
pub fn attach_config(seed: Option<u32>, source: Option<Ipv4Addr>, mtu: u32) -> Result<Config> {
    let mut config = Config::default();
    match seed {
        Some(seed) => {
            config.hash_seed = seed;
            config.flags |= consts::L4LB_CONFIG_SEED_SET | consts::L4LB_CONFIG_SEED_FIXED;
        }
        None => {
            config.hash_seed = random_seed()?;
            config.flags |= consts::L4LB_CONFIG_SEED_SET;
        }
    }
    if let Some(source) = source {
        config.src_v4 = source.octets();
        config.flags |= consts::L4LB_CONFIG_SRC_SET;
    }
    config.mtu = mtu;
    Ok(config)
}

/// The MTU to run with: `--mtu` if given (warned about when above the
/// device's: the device drops what it cannot send), else the device's,
/// capped at config::MAX_MTU (loopback has 65536) and refused below
/// config::MIN_MTU.
pub fn choose_mtu(iface: &Interface, given: Option<u32>) -> Result<u32> {
    let device = iface.mtu()?;
    match given {
        Some(mtu) => {
            if mtu > device {
                eprintln!(
                    "warning: --mtu {mtu} is above {}'s MTU {device}: frames the device cannot send are dropped by it",
                    iface.name
                );
            }
            Ok(mtu)
        }
        None => {
            match config::mtu_problem(&format!("{}'s MTU", iface.name), i64::from(device.min(config::MAX_MTU)), None) {
                Some(problem) => bail!("{problem}: raise it (ip link set {} mtu 1500) or give --mtu", iface.name),
                None => Ok(device.min(config::MAX_MTU)),
            }
        }
    }
}

/// The MTU `apply` and `map` plan with: the wanted one, else the running
/// one, else (a program iproute2 loaded runs without) the device's.
pub fn default_mtu(iface: &Interface, now: &apply::Snapshot, wanted: &mut config::Model) -> Result<()> {
    if wanted.global.mtu.is_none() && now.config.mtu == 0 {
        wanted.global.mtu = Some(choose_mtu(iface, None)?);
    }
    Ok(())
}

/// What `attach` did.
pub struct Attached {
    pub id: u32,
    pub mode: Mode,
    pub flows: FlowTable,
    /// The outer IPv4 source (the device's address), if it has one.
    pub source: Option<Ipv4Addr>,
}

/// Loads and attaches l4lb to `iface` in `mode` (replacing another XDP
/// program only with `force`) and writes its first configuration: the
/// hash seed (`seed`, else a random one), the device's IPv4 address as the
/// outer source, the MTU (`mtu`, else the device's), no service.
pub fn attach(
    iface: &Interface,
    mode: Mode,
    force: bool,
    seed: Option<u32>,
    mtu: Option<u32>,
    flow_entries: Option<u32>,
) -> Result<Attached> {
    let mtu = choose_mtu(iface, mtu)?;
    let flows = FlowTable::for_mode(mode, flow_entries)?;
    let _lock = update_lock(iface)?;
    let id = crate::attach::attach(iface, mode, force, flows)?;
    let (_, _, maps) = open_l4lb(&iface.name)?;
    let source = iface.ipv4_addr()?;
    maps.write_config(&attach_config(seed, source, mtu)?)?;
    Ok(Attached { id, mode, flows, source })
}

/// A plan of `wanted` against the running state, made and to be executed
/// under the update lock, which it holds until dropped.
pub struct Planned {
    pub plan: apply::Plan,
    _lock: UpdateLock,
}

/// Takes the update lock, reads the running state and plans `wanted`
/// against it (the MTU defaults as `default_mtu` says).
pub fn plan(iface: &Interface, maps: &LbMaps, mut wanted: config::Model) -> Result<Planned> {
    let lock = update_lock(iface)?;
    let now = maps.read_snapshot()?;
    default_mtu(iface, &now, &mut wanted)?;
    let plan = apply::plan(&now, &wanted, random_seed()?)?;
    Ok(Planned { plan, _lock: lock })
}
