//! The command line.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::discover::Mode;

#[derive(Debug, Parser)]
#[command(name = "l4lb", version, about = "XDP layer-4 load balancer: hashes each flow to a destination and sends it there over IP-in-IP (direct server return)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// Native driver mode (XDP_FLAGS_DRV_MODE)
    Drv,
    /// Generic mode in the stack (XDP_FLAGS_SKB_MODE)
    Skb,
    /// Offloaded to the NIC (XDP_FLAGS_HW_MODE)
    Hw,
}

impl From<AttachMode> for Mode {
    fn from(mode: AttachMode) -> Mode {
        match mode {
            AttachMode::Drv => Mode::Driver,
            AttachMode::Skb => Mode::Generic,
            AttachMode::Hw => Mode::Offload,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load l4lb and attach it to an interface (stays attached after exit)
    Attach {
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        #[arg(short, long, value_enum, default_value = "drv")]
        mode: AttachMode,
        /// Replace an XDP program already attached to DEV
        #[arg(long)]
        force: bool,
        /// Hash seed (shared by balancers that must agree on flows); random if not given
        #[arg(long, value_parser = parse_seed)]
        seed: Option<u32>,
    },
    /// Remove the l4lb program from an interface, whatever its mode
    Detach {
        #[arg(short, long, value_name = "DEV")]
        interface: String,
    },
    /// Fill the lookup table from a destination file (`IP, MAC` rows)
    Map {
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Destination file: one `IP, MAC` row per destination
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
        /// Outer source address [default: DEV's IPv4 address]
        #[arg(short, long, value_name = "ADDR")]
        source: Option<Ipv4Addr>,
        /// Hash seed; keeps the current one if not given (a new seed moves every flow)
        #[arg(long, value_parser = parse_seed)]
        seed: Option<u32>,
    },
    /// Show traffic per destination, redrawn every interval
    Stats {
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Seconds between samples
        #[arg(long, default_value = "1", value_parser = parse_interval)]
        interval: f64,
        /// Print this many samples, then exit (default: until interrupted)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// One JSON object per line per sample
        #[arg(long)]
        json: bool,
    },
    /// Show the program, mode, configuration and destinations of an interface
    Status {
        #[arg(short, long, value_name = "DEV")]
        interface: String,
    },
}

fn parse_seed(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a 32-bit seed (decimal or 0x-prefixed hex)"))
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.05..=3600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("`{text}` is not an interval between 0.05 and 3600 seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn seeds_and_intervals_are_checked() {
        assert_eq!(parse_seed("0xdeadbeef"), Ok(0xdead_beef));
        assert_eq!(parse_seed("42"), Ok(42));
        assert!(parse_seed("0x1_0000_0000").is_err());
        assert!(parse_seed("-1").is_err());
        assert_eq!(parse_interval("0.5"), Ok(0.5));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("NaN").is_err());
    }

    #[test]
    fn seed_file_contract_parses() {
        let cli = Cli::try_parse_from(["l4lb", "map", "-i", "eth0", "-f", "d.csv", "-s", "10.0.0.1"]).unwrap();
        match cli.command {
            Command::Map { interface, source, .. } => {
                assert_eq!(interface, "eth0");
                assert_eq!(source, Some(Ipv4Addr::new(10, 0, 0, 1)));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["l4lb", "map", "-i", "eth0", "-f", "d.csv", "-s", "10.0.0"]).is_err());
        assert!(Cli::try_parse_from(["l4lb", "attach", "-i", "eth0", "--mode", "turbo"]).is_err());
    }
}
