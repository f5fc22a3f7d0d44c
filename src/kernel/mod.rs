//! Layer 2, the kernel-facing host: the datapath's layouts as Rust types
//! (`bpf`), loading and attaching programs (`attach`, `decap`), finding
//! what is attached (`discover`), reading and writing the maps (`maps`),
//! replacing the program in place (`upgrade`), interfaces (`iface`),
//! locks scoped to the network namespace (`netns_lock`) and libbpf's log
//! (`libbpf_log`). It knows the
//! control plane only where `maps` implements `apply::Io`.

pub mod attach;
pub mod bpf;
pub mod decap;
pub mod discover;
pub mod iface;
pub mod libbpf_log;
pub mod maps;
pub mod netns_lock;
pub mod probe_path;
pub mod upgrade;
