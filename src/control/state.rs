//! The balancer's running state as read back from its maps: services with
//! their backend entries and Maglev tables, and the global settings. Plain
//! data: `maps` fills it, `apply` plans against it, `stats` and `status`
//! render it.

use crate::config::{self, Backend, Global, ServiceKey};

/// One backend entry of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningBackend {
    /// Index in l4lb_backends (and l4lb_be_stats).
    pub number: u32,
    pub backend: Backend,
}

/// One service as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningService {
    /// Index in l4lb_services (and l4lb_svc_stats); its table is
    /// l4lb_tables[number * MAGLEV_SIZE ..][.. MAGLEV_SIZE].
    pub number: u32,
    pub key: ServiceKey,
    pub hash_ports: bool,
    /// Whether table changes put slots in transition (L4LB_SERVICE_TRACK_FLOWS).
    pub track_flows: bool,
    pub idle_timeout: u32,
    pub udp_grace: u32,
    /// Tick of the last apply that put slots of it in transition.
    pub changed: u32,
    /// Sorted by address.
    pub backends: Vec<RunningBackend>,
    /// MAGLEV_SIZE backend numbers (or SLOT_EMPTY): each slot's current
    /// backend, the one new flows get.
    pub table: Vec<u32>,
    /// The slots in transition: slot -> previous backend number
    /// (docs/transitions.md; `transition::join` gives the words).
    pub transitions: std::collections::BTreeMap<u32, u32>,
}

/// Everything `l4lb config` prints and `l4lb apply` plans against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Running {
    /// hash_seed is Some once a seed has been chosen (random or fixed).
    pub global: Global,
    /// Whether the seed was given by the operator (else random).
    pub seed_fixed: bool,
    /// In canonical order (config::ServiceKey's order).
    pub services: Vec<RunningService>,
    /// The fragment entries of l4lb_vips, sorted by (address, protocol).
    pub fragments: Vec<RunningFragment>,
}

/// A fragment entry of l4lb_vips: fragments of (addr, protocol), which
/// carry no ports, go to service `service` (the address's port-0 VIP for the
/// protocol if there is one, else its VIP with the lowest port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunningFragment {
    pub addr: std::net::IpAddr,
    pub protocol: config::Protocol,
    /// Service number the entry names.
    pub service: u32,
    /// Index of the entry in l4lb_vips.
    pub entry: u32,
}

impl Running {
    /// The running configuration as a model (what `l4lb config` prints).
    pub fn model(&self) -> config::Model {
        config::Model {
            global: self.global.clone(),
            services: self.services.iter().map(RunningService::model).collect(),
            // Not in the maps: the agent's, from its file.
            health: Default::default(),
        }
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&RunningService> {
        self.services.iter().find(|s| s.key == *key)
    }

    /// The service numbered `number`.
    pub fn service_numbered(&self, number: u32) -> Option<&RunningService> {
        self.services.iter().find(|s| s.number == number)
    }
}

impl RunningService {
    /// The service as a configuration model entry.
    pub fn model(&self) -> config::Service {
        config::Service {
            key: self.key,
            hash_ports: self.hash_ports,
            track_flows: self.track_flows,
            idle_timeout: self.idle_timeout,
            udp_grace: self.udp_grace,
            backends: self.backends.iter().map(|b| b.backend).collect(),
        }
    }
}
