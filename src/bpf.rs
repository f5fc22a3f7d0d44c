//! The datapath as the host sees it: the generated skeleton, the layouts of
//! every map value (from the skeleton's BTF types), the constants and counter
//! names of include/l4lb.h, and the names the kernel knows the maps by.

#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_xdp.skel.rs"));
}

/// The backend's decapsulation program (src/bpf/l4lb_decap.bpf.c); see `crate::decap`.
#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod decap_skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_decap.skel.rs"));
}

#[allow(dead_code, non_camel_case_types, non_upper_case_globals)]
pub mod consts {
    include!(concat!(env!("OUT_DIR"), "/l4lb_consts.rs"));
    include!(concat!(env!("OUT_DIR"), "/l4lb_counter_names.rs"));
    include!(concat!(env!("OUT_DIR"), "/l4lb_decap_counter_names.rs"));
}

pub use consts::l4lb_counter as counter;
pub use consts::l4lb_decap_counter as decap_counter;
pub use consts::{COUNTER_NAMES, DECAP_COUNTER_NAMES};
pub use decap_skel::types::l4lb_decap_addr as DecapAddr;
pub use skel::types::{
    l4lb_backend as Backend, l4lb_backend_stats as BackendStats, l4lb_config as Config,
};

// SAFETY: plain C structs of integers and byte arrays, any bit pattern is valid.
unsafe impl plain::Plain for Backend {}
unsafe impl plain::Plain for BackendStats {}
unsafe impl plain::Plain for Config {}
unsafe impl plain::Plain for DecapAddr {}

/// The XDP program's name as the kernel reports it.
pub const PROG_NAME: &str = "l4lb_balance";
pub const MAP_CONFIG: &str = "l4lb_config";
pub const MAP_BACKENDS: &str = "l4lb_backends";
pub const MAP_SLOTS: &str = "l4lb_slots";
pub const MAP_BACKEND_STATS: &str = "l4lb_be_stats";
pub const MAP_COUNTERS: &str = "l4lb_counters";

pub const TABLE_SIZE: usize = consts::L4LB_TABLE_SIZE as usize;
pub const MAX_BACKENDS: usize = consts::L4LB_MAX_BACKENDS as usize;
pub const SLOT_EMPTY: u32 = consts::L4LB_SLOT_EMPTY;
pub const IPIP_OVERHEAD: u32 = consts::L4LB_IPIP_OVERHEAD;

/// The bytes of a map value, as the kernel takes them.
pub fn value_bytes<T: plain::Plain>(value: &T) -> &[u8] {
    // SAFETY: T is Plain (no padding-dependent invariants, no pointers).
    unsafe { plain::as_bytes(value) }
}

/// A map value read back from the kernel; None when the size does not match.
pub fn value_from<T: plain::Plain + Default>(bytes: &[u8]) -> Option<T> {
    let mut value = T::default();
    plain::copy_from_bytes(&mut value, bytes).ok()?;
    Some(value)
}
