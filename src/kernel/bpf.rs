//! The datapath as the host sees it: the generated skeleton, the layouts of
//! every map value (from the skeleton's BTF types), the constants and counter
//! names of include/l4lb.h, and the names the kernel knows the maps by.

#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_xdp.skel.rs"));
}

/// The driver build of the same source (`-DL4LB_DRIVER_BUILD`: plain
/// adds into per-CPU counters), which `l4lb attach` loads off the NIC.
#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod percpu_skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_xdp_percpu.skel.rs"));
}

/// The backend's decapsulation program (src/bpf/l4lb_decap.bpf.c); see `crate::decap`.
#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod decap_skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_decap.skel.rs"));
}

/// The health probes' encapsulation (src/bpf/l4lb_probe.bpf.c); see `crate::probe_path`.
#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
pub mod probe_skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_probe.skel.rs"));
}

#[allow(dead_code, non_camel_case_types, non_upper_case_globals)]
pub mod consts {
    include!(concat!(env!("OUT_DIR"), "/l4lb_consts.rs"));
    include!(concat!(env!("OUT_DIR"), "/l4lb_counter_names.rs"));
    include!(concat!(env!("OUT_DIR"), "/l4lb_decap_counter_names.rs"));
    include!(concat!(env!("OUT_DIR"), "/l4lb_probe_counter_names.rs"));
}

pub use consts::l4lb_counter as counter;
pub use consts::l4lb_decap_counter as decap_counter;
pub use consts::{COUNTER_NAMES, DECAP_COUNTER_NAMES, PROBE_COUNTER_NAMES};
pub use decap_skel::types::l4lb_decap_addr as DecapAddr;
pub use probe_skel::types::l4lb_probe_target as ProbeTarget;
pub use skel::types::{
    l4lb_backend as Backend, l4lb_config as Config, l4lb_flow as FlowPin, l4lb_flow_key as FlowKey,
    l4lb_service as Service, l4lb_traffic as Traffic, l4lb_vip as Vip,
};

// SAFETY: plain C structs of integers and byte arrays, any bit pattern is valid.
unsafe impl plain::Plain for Backend {}
unsafe impl plain::Plain for Config {}
unsafe impl plain::Plain for Service {}
unsafe impl plain::Plain for Traffic {}
unsafe impl plain::Plain for Vip {}
unsafe impl plain::Plain for DecapAddr {}
unsafe impl plain::Plain for ProbeTarget {}
unsafe impl plain::Plain for FlowKey {}
unsafe impl plain::Plain for FlowPin {}

/// The XDP program's name as the kernel reports it.
pub const PROG_NAME: &str = "l4lb_balance";
/// The maps of the balancer, as the kernel knows them (src/bpf/maps.h).
pub const MAP_CONFIG: &str = "l4lb_config";
pub const MAP_VIPS: &str = "l4lb_vips";
pub const MAP_SERVICES: &str = "l4lb_services";
pub const MAP_TABLES: &str = "l4lb_tables";
pub const MAP_BACKENDS: &str = "l4lb_backends";
pub const MAP_BACKEND_STATS: &str = "l4lb_be_stats";
pub const MAP_SERVICE_STATS: &str = "l4lb_svc_stats";
pub const MAP_COUNTERS: &str = "l4lb_counters";
pub const MAP_FLOWS: &str = "l4lb_flows";
/// Entries of l4lb_flows as the object declares it (iproute2 and offload load that).
pub const FLOW_ENTRIES: u32 = consts::L4LB_FLOW_ENTRIES;
/// Entries `l4lb attach` gives the LRU flow table unless told otherwise.
pub const FLOW_ENTRIES_DEFAULT: u32 = consts::L4LB_FLOW_ENTRIES_DEFAULT;

/// Slots of one service's Maglev table (`maglev::TABLE_SIZE`).
pub const MAGLEV_SIZE: usize = consts::L4LB_MAGLEV_SIZE as usize;
pub const MAX_SERVICES: usize = consts::L4LB_MAX_SERVICES as usize;
/// Services an offloaded program has tables for (l4lb_tables is loaded smaller).
pub const OFFLOAD_MAX_SERVICES: usize = consts::L4LB_OFFLOAD_MAX_SERVICES as usize;
/// Backend entries over all services.
pub const MAX_BACKENDS: usize = consts::L4LB_MAX_BACKENDS as usize;
/// Backends one service may have.
pub const MAX_SERVICE_BACKENDS: usize = consts::L4LB_MAX_SERVICE_BACKENDS as usize;
pub const SLOT_EMPTY: u32 = consts::L4LB_SLOT_EMPTY;
/// Slot words per entry of l4lb_tables (include/l4lb.h, "l4lb_tables packs").
pub const TABLE_ENTRY_SLOTS: usize = consts::L4LB_TABLE_ENTRY_SLOTS as usize;
/// Entries of l4lb_tables for `services` tables.
pub const fn table_entries(services: usize) -> u32 {
    (services * MAGLEV_SIZE).div_ceil(TABLE_ENTRY_SLOTS) as u32
}
pub const VIP_SLOTS: usize = consts::L4LB_VIP_SLOTS as usize;
pub const VIP_BITS: u32 = consts::L4LB_VIP_BITS;
pub const VIP_MASK: u32 = consts::L4LB_VIP_MASK;
pub const VIP_MAX_PROBES: u32 = consts::L4LB_VIP_MAX_PROBES;
pub const VIP_HASH_MUL: u32 = consts::L4LB_VIP_HASH_MUL;
pub const IPIP_OVERHEAD: u32 = consts::L4LB_IPIP_OVERHEAD;
pub const IP6_OVERHEAD: u32 = consts::L4LB_IP6_OVERHEAD;
pub const FAMILY_IPV4: u8 = consts::L4LB_FAMILY_IPV4 as u8;
pub const FAMILY_IPV6: u8 = consts::L4LB_FAMILY_IPV6 as u8;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_limits_equal_the_datapath_constants() {
        assert_eq!(crate::maglev::TABLE_SIZE, MAGLEV_SIZE);
        assert_eq!(crate::maglev::EMPTY, SLOT_EMPTY);
        assert_eq!(crate::config::MAX_SERVICES, MAX_SERVICES);
        assert_eq!(crate::config::MAX_TOTAL_BACKENDS, MAX_BACKENDS);
        assert_eq!(crate::config::MAX_BACKENDS_PER_SERVICE, MAX_SERVICE_BACKENDS);
        assert_eq!(VIP_SLOTS, 1 << VIP_BITS);
        assert_eq!(VIP_MASK as usize, VIP_SLOTS - 1);
    }

    #[test]
    fn layouts_are_the_headers() {
        use std::mem::offset_of;
        assert_eq!(size_of::<Vip>(), 24);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(
            [
                offset_of!(Service, flags),
                offset_of!(Service, changed),
                offset_of!(Service, udp_grace),
                offset_of!(Service, idle_timeout)
            ],
            [0, 4, 8, 12]
        );
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<Traffic>(), 16);
        assert_eq!(size_of::<Config>(), 52);
        assert_eq!(offset_of!(Config, clock), 48);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowPin>(), 32);
        assert_eq!(
            [
                offset_of!(FlowPin, addr),
                offset_of!(FlowPin, backend),
                offset_of!(FlowPin, slot),
                offset_of!(FlowPin, seen),
                offset_of!(FlowPin, family)
            ],
            [0, 16, 20, 24, 28]
        );
    }

    #[test]
    fn slot_words_fit_the_backend_numbers() {
        // A steady word is a bare backend number: below the TRANSITION bit
        // and never EMPTY; a previous number fits its field.
        assert!((MAX_BACKENDS as u32 - 1) <= consts::L4LB_SLOT_BACKEND_MASK);
        assert!((MAX_BACKENDS as u32 - 1) <= consts::L4LB_SLOT_PREVIOUS_MASK);
        assert_eq!(consts::L4LB_SLOT_BACKEND_MASK & consts::L4LB_SLOT_TRANSITION, 0);
        assert_eq!(
            (consts::L4LB_SLOT_PREVIOUS_MASK << consts::L4LB_SLOT_PREVIOUS_SHIFT) & consts::L4LB_SLOT_TRANSITION,
            0
        );
        assert_eq!(
            (consts::L4LB_SLOT_PREVIOUS_MASK << consts::L4LB_SLOT_PREVIOUS_SHIFT) & consts::L4LB_SLOT_BACKEND_MASK,
            0
        );
        assert_eq!((consts::L4LB_IDLE_TIMEOUT_DEFAULT, consts::L4LB_UDP_GRACE_DEFAULT), (300, 30));
    }
}
