//! The command line.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Protocol, ServiceKey};
use crate::discover::Mode;

#[derive(Debug, Parser)]
#[command(
    name = "l4lb",
    version,
    about = "XDP layer-4 load balancer: hashes each flow to a destination and sends it there over IP-in-IP (direct server return)",
    after_help = "Example: l4lb attach -i eth0 && l4lb apply -i eth0 -c lb.toml && l4lb stats -i eth0\n\nManual: docs/ in the source tree, and man l4lb-<command>"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How l4lb is loaded and attached (`attach`, and `serve` where none is attached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct LoadOptions {
    #[arg(short, long, value_enum, default_value = "drv")]
    pub mode: AttachMode,
    /// Hash seed (shared by balancers that must agree on flows); random if not given
    #[arg(long, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: Option<u32>,
    /// Largest packet the balancer sends, outer header included (L3 bytes; 576 to 65535, at least 1320 with IPv6 backends); larger ones get an ICMP too-big answer or are dropped [default: DEV's MTU]
    #[arg(long, value_name = "BYTES", value_parser = parse_mtu, allow_hyphen_values = true)]
    pub mtu: Option<u32>,
    /// Flows the connection table holds: pins of flows in slots in transition (an LRU hash: the least recently used pin goes first); about 128 bytes each [default: 262144; hw mode: the object's 65536, fixed]
    #[arg(long, value_name = "N", value_parser = parse_flow_entries, allow_hyphen_values = true)]
    pub flow_entries: Option<u32>,
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
    #[command(after_help = "Example: l4lb attach -i eth0 --seed 0x5eed1234")]
    Attach {
        /// Interface to attach to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        #[command(flatten)]
        load: LoadOptions,
        /// Replace an XDP program already attached to DEV
        #[arg(long)]
        force: bool,
    },
    /// Remove the l4lb program from an interface, whatever its mode
    #[command(after_help = "Example: l4lb detach -i eth0")]
    Detach {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
    },
    /// Set the backends of the catch-all service (or of one VIP) from a destination file (`IP, MAC` rows)
    #[command(
        after_help = "Example: l4lb map -i eth0 -f destination_samples/4_destinations.csv --vip 203.0.113.10:80/tcp"
    )]
    Map {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Destination file: one `IP, MAC` row per destination
        #[arg(short, long, value_name = "FILE")]
        file: PathBuf,
        /// The service to fill: ADDR[:PORT][/tcp|udp] ([ADDR]:PORT for IPv6; port 0 or none = every port, tcp by default) [default: the catch-all]
        #[arg(long, value_name = "VIP", value_parser = parse_vip)]
        vip: Option<ServiceKey>,
        /// Outer source address [default: DEV's IPv4 address]
        #[arg(short, long, value_name = "ADDR", value_parser = parse_source)]
        source: Option<Ipv4Addr>,
        /// Hash seed; keeps the current one if not given (a new seed moves every flow)
        #[arg(long, value_parser = parse_seed, allow_hyphen_values = true)]
        seed: Option<u32>,
    },
    /// Program the services of a configuration file (TOML), changing only what differs
    #[command(after_help = "Example: l4lb apply -i eth0 -c lb.toml --dry-run")]
    Apply {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Configuration file (TOML; format: docs/configuration.md)
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Print the changes, write nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the running configuration as a file `l4lb apply` takes back unchanged
    #[command(after_help = "Example: l4lb config -i eth0 > lb.toml")]
    Config {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
    },
    /// Show traffic per service and backend, and the counters, redrawn every interval
    #[command(after_help = "Example: l4lb stats -i eth0 --interval 2")]
    Stats {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Show the program, settings, and per service its backends, weights and table slots
    #[command(after_help = "Example: l4lb status -i eth0 --flows")]
    Status {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// One JSON object
        #[arg(long)]
        json: bool,
        /// Also walk the flow table: flows pinned per backend and service, entries in use and stale
        #[arg(long)]
        flows: bool,
    },
    /// End the transitions a table change started once their connections are idle (the sweep; docs/transitions.md)
    ///
    /// Each round advances the tick pins count time by, drops pins idle longer than their service's idle_timeout,
    /// and returns each slot in transition whose service changed at least idle_timeout ago, and none of whose
    /// connections still needs another backend than the current one, to steady. Run it with --every: without a
    /// sweep, transitions never end.
    #[command(after_help = "Example: l4lb settle -i eth0 --every 5")]
    Settle {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Run a round every SECONDS until stopped (default: one round)
        #[arg(long, value_name = "SECONDS", value_parser = parse_interval)]
        every: Option<f64>,
    },
    /// Live view in the terminal: each service's and backend's rates with their recent history, and drops by reason; q quits
    #[command(after_help = "Example: l4lb top -i eth0")]
    Top {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Seconds between two samples
        #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval)]
        interval: f64,
    },
    /// Replace the running l4lb program in place with this binary's datapath (or an l4lb object): its maps, tables, flow pins and counters carried over, one atomic swap; refused if the map layouts differ
    #[command(after_help = "Example: l4lb upgrade -i eth0")]
    Upgrade {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// An l4lb BPF object to load instead of the datapath built into this binary
        #[arg(long, value_name = "FILE")]
        object: Option<PathBuf>,
    },
    /// Run as the balancer's agent: attach l4lb if none is attached, apply FILE, apply it again on every change and on SIGHUP, sweep transitions; stop with SIGTERM (the datapath keeps forwarding)
    ///
    /// --mode, --seed, --mtu and --flow-entries are used only when the agent attaches l4lb itself: an l4lb already attached is kept as it is.
    #[command(after_help = "Example: l4lb serve -i eth0 -c /etc/l4lb/lb.toml --log-format json")]
    Serve {
        /// Interface to balance on
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        /// Configuration file (the format of `l4lb apply`), watched for changes
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        load: LoadOptions,
        /// Seconds between two rounds of the sweep that ends transitions (`l4lb settle`)
        #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_interval)]
        sweep_every: f64,
        /// Log lines as text or as JSON objects (one per line)
        #[arg(long, value_enum, default_value = "text")]
        log_format: crate::agent::log::LogFormat,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a PORT alone: on 127.0.0.1); the only port the agent opens [default: none]
        #[arg(long, value_name = "[ADDR:]PORT", value_parser = parse_metrics_addr)]
        metrics: Option<std::net::SocketAddr>,
        /// BIRD's control socket: the agent enables the --bird-protocol protocols (the VIPs' routes) while the datapath is attached and programmed, and disables them when it stops [default: no announcement]
        #[arg(long, value_name = "PATH")]
        bird_socket: Option<PathBuf>,
        /// A BIRD protocol holding VIPs' routes; repeat it for several (one static protocol per address family)
        #[arg(long, value_name = "NAME", default_value = "l4lb_vips", requires = "bird_socket", action = clap::ArgAction::Append)]
        bird_protocol: Vec<String>,
    },
    /// Throughput benchmark: l4lb against two floors measured in the same run, on a veth pair in private namespaces
    #[command(after_help = "Example: l4lb bench --rounds 3 --seconds 0.5 --chart ratios.svg")]
    Bench {
        /// Rounds: each measures every packet kind through l4lb and both floors, in turn
        #[arg(long, default_value = "4", value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Seconds per program, packet kind and round
        #[arg(long, default_value = "1", value_parser = crate::bench::parse_seconds)]
        seconds: f64,
        /// Also write the ratios as a bar chart (SVG) to PATH
        #[arg(long, value_name = "PATH")]
        chart: Option<PathBuf>,
        /// Print the results as one JSON object instead of tables
        #[arg(long)]
        json: bool,
        /// Also measure l4lb's stages added one by one to the encapsulation floor (64-byte TCP)
        #[arg(long)]
        variants: bool,
        /// Flow table size of the l4lbs under test, as `attach --flow-entries` [default: attach's]
        #[arg(long, value_name = "N", value_parser = parse_flow_entries, allow_hyphen_values = true)]
        flow_entries: Option<u32>,
    },
    /// Print a shell completion script to standard output (no privileges needed)
    #[command(after_help = "Example: l4lb completions bash > /usr/share/bash-completion/completions/l4lb")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages of l4lb and of every subcommand (roff, section 1) into DIR (no privileges needed)
    #[command(after_help = "Example: l4lb man --out /usr/local/share/man/man1")]
    Man {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Backend side: strip the balancer's IPIP header in XDP (no ipip module needed)
    #[command(after_help = "Example: l4lb decap attach -i eth0")]
    Decap {
        #[command(subcommand)]
        command: DecapCommand,
    },
}

/// XDP modes the decap program runs in (it is never offloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecapMode {
    /// Native driver mode (XDP_FLAGS_DRV_MODE)
    Drv,
    /// Generic mode in the stack (XDP_FLAGS_SKB_MODE)
    Skb,
}

impl From<DecapMode> for Mode {
    fn from(mode: DecapMode) -> Mode {
        match mode {
            DecapMode::Drv => Mode::Driver,
            DecapMode::Skb => Mode::Generic,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DecapCommand {
    /// Load the decap program and attach it to a backend's interface (stays attached after exit)
    #[command(after_help = "Example: l4lb decap attach -i eth0 --addr 198.18.0.101 2001:db8:18::101")]
    Attach {
        /// Interface to attach to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        #[arg(short, long, value_enum, default_value = "drv")]
        mode: DecapMode,
        /// Replace an XDP program already attached to DEV
        #[arg(long)]
        force: bool,
        /// Outer destination addresses to decapsulate for [default: DEV's IPv4 and IPv6 addresses, link-local aside]
        #[arg(long = "addr", value_name = "ADDR", num_args = 1..)]
        addrs: Vec<IpAddr>,
    },
    /// Remove the decap program from an interface, whatever its mode
    #[command(after_help = "Example: l4lb decap detach -i eth0")]
    Detach {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
    },
    /// Show the decap counters, redrawn every interval
    #[command(after_help = "Example: l4lb decap stats -i eth0 --count 5")]
    Stats {
        /// Interface the program is attached to
        #[arg(short, long, value_name = "DEV")]
        interface: String,
        #[command(flatten)]
        sampling: Sampling,
    },
}

/// How `stats` and `decap stats` sample: every `interval` seconds, `count`
/// times (or until interrupted), as tables or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct Sampling {
    /// Seconds between samples
    #[arg(long, default_value = "1", value_parser = parse_interval)]
    pub interval: f64,
    /// Print this many samples, then exit (default: until interrupted)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// One JSON object per line per sample
    #[arg(long)]
    pub json: bool,
}

fn parse_seed(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a 32-bit seed (decimal or 0x-prefixed hex)"))
}

/// `map -s`: a unicast IPv4 address (destination files list IPv4
/// destinations, so the outer header is IPv4).
fn parse_source(text: &str) -> Result<Ipv4Addr, String> {
    let addr: Ipv4Addr = match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(addr)) => addr,
        Ok(IpAddr::V6(_)) => {
            return Err(format!(
            "`{text}` is IPv6: the outer source of `l4lb map` is IPv4 (IPv6 backends are configured with `l4lb apply`)"
        ))
        }
        Err(_) => return Err(format!("`{text}` is not an IPv4 address")),
    };
    crate::addr::check_unicast_ipv4(addr).map_err(|why| format!("outer source address {addr} {why}"))?;
    Ok(addr)
}

/// `ADDR[:PORT][/tcp|udp]`, `[ADDR6][:PORT][/tcp|udp]` or a bare IPv6
/// address (with an optional `/tcp|udp`): a VIP service key; port 0 (or
/// none, or `*`) = every port; tcp by default.
pub fn parse_vip(text: &str) -> Result<ServiceKey, String> {
    let bad = |why: &str| format!("`{text}` is not a VIP ({why}; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)");
    let (rest, protocol) = match text.rsplit_once('/') {
        Some((rest, "tcp")) => (rest, Protocol::Tcp),
        Some((rest, "udp")) => (rest, Protocol::Udp),
        Some(_) => return Err(bad("the protocol is tcp or udp")),
        None => (text, Protocol::Tcp),
    };
    let (addr_text, port_text) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, after) = inner.split_once(']').ok_or_else(|| bad("no closing ]"))?;
        match after {
            "" => (addr, None),
            p => (addr, Some(p.strip_prefix(':').ok_or_else(|| bad("expected :PORT after ]"))?)),
        }
    } else if rest.matches(':').count() > 1 {
        (rest, None)
    } else {
        match rest.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        }
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    crate::addr::check_unicast(addr).map_err(|why| format!("VIP {addr} {why}"))?;
    let port = match port_text {
        None | Some("*") => 0,
        Some(p) => p.parse::<u16>().map_err(|_| bad("the port is 0 to 65535"))?,
    };
    Ok(ServiceKey::Vip { addr, protocol, port })
}

/// Bounds of `--flow-entries`: below a thousand flows the table would churn
/// under any load; above 16 Mi it would take gigabytes of kernel memory.
pub const MIN_FLOW_ENTRIES: u32 = 1024;
pub const MAX_FLOW_ENTRIES: u32 = 1 << 24;

/// `--flow-entries`: a number of flows within [MIN_FLOW_ENTRIES, MAX_FLOW_ENTRIES].
fn parse_flow_entries(text: &str) -> Result<u32, String> {
    let range = format!("{MIN_FLOW_ENTRIES} to {MAX_FLOW_ENTRIES}");
    let n: i64 = text.parse().map_err(|_| format!("`{text}` is not a number of flows ({range})"))?;
    if !(i64::from(MIN_FLOW_ENTRIES)..=i64::from(MAX_FLOW_ENTRIES)).contains(&n) {
        return Err(format!("{n} flows is outside {range}"));
    }
    Ok(n as u32)
}

/// `--mtu`: a number of bytes within the MTU rules that need no backends
/// (the planner checks the IPv6 rule against the configuration).
fn parse_mtu(text: &str) -> Result<u32, String> {
    let mtu: i64 = text.parse().map_err(|_| {
        format!("`{text}` is not an MTU (a number of bytes, {} to {})", crate::config::MIN_MTU, crate::config::MAX_MTU)
    })?;
    match crate::config::mtu_problem("MTU", mtu, None) {
        Some(problem) => Err(problem),
        None => Ok(mtu as u32),
    }
}

/// `ADDR:PORT`, or a port alone (127.0.0.1: reachable from this host only).
fn parse_metrics_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("`{text}` is neither ADDR:PORT (192.0.2.1:9469, [2001:db8::1]:9469) nor a port"))
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
    fn vips_parse() {
        let v4: IpAddr = "203.0.113.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let key = |addr, protocol, port| Ok(ServiceKey::Vip { addr, protocol, port });
        assert_eq!(parse_vip("203.0.113.10"), key(v4, Protocol::Tcp, 0));
        assert_eq!(parse_vip("203.0.113.10:80"), key(v4, Protocol::Tcp, 80));
        assert_eq!(parse_vip("203.0.113.10:53/udp"), key(v4, Protocol::Udp, 53));
        assert_eq!(parse_vip("203.0.113.10/udp"), key(v4, Protocol::Udp, 0));
        assert_eq!(parse_vip("203.0.113.10:*/udp"), key(v4, Protocol::Udp, 0));
        assert_eq!(parse_vip("[2001:db8::10]:53/udp"), key(v6, Protocol::Udp, 53));
        assert_eq!(parse_vip("[2001:db8::10]"), key(v6, Protocol::Tcp, 0));
        assert_eq!(parse_vip("2001:db8::10"), key(v6, Protocol::Tcp, 0));
        assert_eq!(parse_vip("2001:db8::10/udp"), key(v6, Protocol::Udp, 0));
        for bad in [
            "203.0.113.10:80/sctp",
            "203.0.113.10:65536",
            "[2001:db8::10:53",
            "[2001:db8::10]53",
            "example.com:80",
            "224.0.0.1:80",
        ] {
            assert!(parse_vip(bad).is_err(), "{bad}");
        }
        let cli =
            Cli::try_parse_from(["l4lb", "map", "-i", "eth0", "-f", "d.csv", "--vip", "203.0.113.10:80"]).unwrap();
        match cli.command {
            Command::Map { vip, .. } => assert_eq!(Ok(vip.unwrap()), key(v4, Protocol::Tcp, 80)),
            other => panic!("parsed as {other:?}"),
        }
        match Cli::try_parse_from(["l4lb", "apply", "-i", "eth0", "-c", "lb.toml", "--dry-run"]).unwrap().command {
            Command::Apply { interface, config, dry_run } => {
                assert_eq!((interface.as_str(), config.to_str(), dry_run), ("eth0", Some("lb.toml"), true))
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            Cli::try_parse_from(["l4lb", "config", "-i", "eth0"]).unwrap().command,
            Command::Config { .. }
        ));
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

    #[test]
    fn flow_entries_are_checked() {
        let entries = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Attach { load, .. }) => Ok(load.flow_entries),
            Ok(other) => panic!("{other:?}"),
            Err(err) => Err(err.to_string()),
        };
        assert_eq!(entries(&["l4lb", "attach", "-i", "eth0"]), Ok(None));
        assert_eq!(entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "1024"]), Ok(Some(1024)));
        assert_eq!(entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "16777216"]), Ok(Some(1 << 24)));
        let low = entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "1023"]).unwrap_err();
        assert!(
            low.contains("invalid value '1023' for '--flow-entries <N>': 1023 flows is outside 1024 to 16777216"),
            "{low}"
        );
        let high = entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "16777217"]).unwrap_err();
        assert!(high.contains("16777217 flows is outside 1024 to 16777216"), "{high}");
        let text = entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "many"]).unwrap_err();
        assert!(text.contains("'--flow-entries <N>': `many` is not a number of flows (1024 to 16777216)"), "{text}");
        assert!(entries(&["l4lb", "attach", "-i", "eth0", "--flow-entries", "-5"])
            .unwrap_err()
            .contains("-5 flows is outside"));
    }

    #[test]
    fn mtus_are_checked() {
        let mtu = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Attach { load, .. }) => Ok(load.mtu),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(mtu(&["l4lb", "attach", "-i", "eth0"]), Ok(None));
        assert_eq!(mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "1400"]), Ok(Some(1400)));
        assert_eq!(mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "576"]), Ok(Some(576)));
        assert_eq!(mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "65535"]), Ok(Some(65535)));
        let low = mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "575"]).unwrap_err();
        assert!(low.contains("invalid value '575' for '--mtu <BYTES>': MTU 575 is below L4LB_MIN_MTU = 576 (the IPv4 datagram every host accepts, RFC 791"), "{low}");
        let high = mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "65536"]).unwrap_err();
        assert!(high.contains("'--mtu <BYTES>': MTU 65536 is above 65535 (the largest IPv4 packet)"), "{high}");
        let text = mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "jumbo"]).unwrap_err();
        assert!(text.contains("'--mtu <BYTES>': `jumbo` is not an MTU (a number of bytes, 576 to 65535)"), "{text}");
        assert!(mtu(&["l4lb", "attach", "-i", "eth0", "--mtu", "-1"]).is_err());
    }

    #[test]
    fn metrics_take_an_address_and_port_or_a_port_on_loopback() {
        assert_eq!(parse_metrics_addr("9469"), Ok("127.0.0.1:9469".parse().unwrap()));
        assert_eq!(parse_metrics_addr("0.0.0.0:9100"), Ok("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(parse_metrics_addr("[::1]:9469"), Ok("[::1]:9469".parse().unwrap()));
        assert!(parse_metrics_addr("localhost:9469").unwrap_err().contains("`localhost:9469` is neither"));
        assert!(parse_metrics_addr("70000").is_err());
    }

    #[test]
    fn settle_parses_one_round_or_an_interval() {
        let settle = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Settle { interface, every }) => Ok((interface, every)),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(err) => Err(err.to_string()),
        };
        assert_eq!(settle(&["l4lb", "settle", "-i", "eth0"]), Ok(("eth0".to_string(), None)));
        assert_eq!(
            settle(&["l4lb", "settle", "--interface", "eth0", "--every", "5"]),
            Ok(("eth0".to_string(), Some(5.0)))
        );
        assert_eq!(settle(&["l4lb", "settle", "-i", "eth0", "--every", "0.05"]), Ok(("eth0".to_string(), Some(0.05))));
        let zero = settle(&["l4lb", "settle", "-i", "eth0", "--every", "0"]).unwrap_err();
        assert!(
            zero.contains(
                "invalid value '0' for '--every <SECONDS>': `0` is not an interval between 0.05 and 3600 seconds"
            ),
            "{zero}"
        );
        assert!(settle(&["l4lb", "settle", "-i", "eth0", "--every", "3601"]).is_err());
        assert!(settle(&["l4lb", "settle", "--every", "5"]).unwrap_err().contains("--interface <DEV>"));
    }

    #[test]
    fn decap_commands_parse() {
        let addrs = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Command::Decap { command: DecapCommand::Attach { addrs, .. } }) => Ok(addrs),
            other => Err(format!("{other:?}")),
        };
        let a: IpAddr = "192.0.2.2".parse().unwrap();
        let b: IpAddr = "203.0.113.10".parse().unwrap();
        assert_eq!(addrs(&["l4lb", "decap", "attach", "-i", "eth0"]), Ok(vec![]));
        assert_eq!(
            addrs(&["l4lb", "decap", "attach", "-i", "eth0", "--addr", "192.0.2.2", "203.0.113.10"]),
            Ok(vec![a, b])
        );
        assert_eq!(
            addrs(&["l4lb", "decap", "attach", "--addr", "192.0.2.2", "--addr", "203.0.113.10", "-i", "eth0"]),
            Ok(vec![a, b])
        );
        match Cli::try_parse_from(["l4lb", "decap", "attach", "-i", "eth0", "--mode", "skb", "--force"])
            .unwrap()
            .command
        {
            Command::Decap { command: DecapCommand::Attach { mode, force, .. } } => {
                assert_eq!((mode, force), (DecapMode::Skb, true))
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["l4lb", "decap", "attach", "-i", "eth0", "--mode", "hw"]).is_err());
        assert!(Cli::try_parse_from(["l4lb", "decap", "attach", "-i", "eth0", "--addr", "192.0.2"]).is_err());
        assert!(Cli::try_parse_from(["l4lb", "decap", "attach", "-i", "eth0", "--addr"]).is_err());
        match Cli::try_parse_from([
            "l4lb",
            "decap",
            "stats",
            "-i",
            "eth0",
            "--json",
            "--count",
            "1",
            "--interval",
            "0.2",
        ])
        .unwrap()
        .command
        {
            Command::Decap {
                command: DecapCommand::Stats { interface, sampling: Sampling { interval, count, json } },
            } => {
                assert_eq!((interface.as_str(), interval, count, json), ("eth0", 0.2, Some(1), true))
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["l4lb", "decap", "detach", "-i", "eth0"]).is_ok());
        assert!(Cli::try_parse_from(["l4lb", "decap", "stats", "-i", "eth0", "--count", "0"]).is_err());
    }
}
