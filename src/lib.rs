//! l4lb host library: everything the `l4lb` binary does, split by concern so
//! that the pure parts (file parsing, table computation, statistics) are
//! tested without root.

pub mod addr;
pub mod apply;
pub mod attach;
pub mod bench;
pub mod bpf;
pub mod cli;
pub mod commands;
pub mod config;
pub mod decap;
pub mod destinations;
pub mod discover;
pub mod flow_hash;
pub mod generate;
pub mod iface;
pub mod input_file;
pub mod libbpf_log;
pub mod maglev;
pub mod maps;
pub mod settle;
pub mod state;
pub mod stats;
pub mod status;
pub mod transition;
