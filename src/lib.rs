//! l4lb host library: everything the `l4lb` binary does, one folder per
//! layer (docs/architecture.md): `kernel` (layer 2: layouts, loading, maps),
//! `control` (layer 3: configuration to map writes, pure where it can be),
//! `present` (layer 4: command line and output); the benchmark beside them.
//! Layer 1, the datapath, is the C under src/bpf/.

pub mod agent;
pub mod bench;
pub mod control;
pub mod kernel;
pub mod present;

// Every module under its short name (`crate::config`, `l4lb::maps`, ...),
// as the code and the tests name them.
pub use control::{
    addr, apply, config, destinations, device, flow_hash, health, input_file, maglev, settle, state, transition,
};
pub use kernel::{attach, bpf, decap, discover, iface, libbpf_log, maps, netns_lock, probe_path, upgrade};
pub use present::{cli, commands, generate, stats, status, top};
