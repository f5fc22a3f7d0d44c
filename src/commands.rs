//! The subcommands: each resolves the interface, talks to the kernel through
//! `attach`, `discover` and `maps`, and leaves the computing to pure modules.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use comfy_table::{presets, Table};

use crate::bpf::{consts, Config, TABLE_SIZE};
use crate::cli::{AttachMode, Command, DecapCommand, DecapMode, Sampling};
use crate::decap::{self, DecapMaps};
use crate::addr::check_unicast_ipv4;
use crate::destinations;
use crate::discover::{self, Mode};
use crate::iface::Interface;
use crate::maps::LbMaps;
use crate::stats::{self, Sample};
use crate::table;

pub fn run(command: Command) -> Result<()> {
    require_root()?;
    match command {
        Command::Attach { interface, mode, force, seed } => attach(&interface, mode, force, seed),
        Command::Detach { interface } => detach(&interface),
        Command::Map { interface, file, source, seed } => map(&interface, &file, source, seed),
        Command::Stats { interface, sampling } => stats(&interface, sampling),
        Command::Status { interface } => status(&interface),
        Command::Bench { rounds, seconds, chart, json, variants } => {
            crate::bench::run(&crate::bench::Options { rounds: rounds as usize, seconds, chart, json, variants })
        }
        Command::Decap { command } => match command {
            DecapCommand::Attach { interface, mode, force, addrs } => decap_attach(&interface, mode, force, addrs),
            DecapCommand::Detach { interface } => decap_detach(&interface),
            DecapCommand::Stats { interface, sampling } => decap_stats(&interface, sampling),
        },
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("l4lb needs root (CAP_BPF and CAP_NET_ADMIN) to load and read BPF programs: run it with sudo");
    }
    Ok(())
}

/// The interface, its l4lb program and that program's maps.
fn open_l4lb(name: &str) -> Result<(Interface, discover::AttachedProgram, LbMaps)> {
    let iface = Interface::by_name(name)?;
    let program = discover::find_l4lb(&iface)?;
    let maps = LbMaps::open(&program)?;
    Ok((iface, program, maps))
}

/// Serialises updates of one interface's maps: two `l4lb map` runs at once
/// would each plan against a state the other is changing. Held until dropped.
fn update_lock(iface: &Interface) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = std::path::PathBuf::from(format!("/run/l4lb-{}.lock", iface.name));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}: opening the update lock", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("{}: taking the update lock: {errno}", path.display()))
}

fn random_seed() -> Result<u32> {
    let mut bytes = [0u8; 4];
    getrandom::getrandom(&mut bytes).map_err(|err| anyhow!("reading a random hash seed: {err}"))?;
    Ok(u32::from_ne_bytes(bytes))
}

/// The configuration after an update: a given seed is fixed; otherwise the
/// current seed stays, or a random one is chosen the first time.
fn updated_config(current: &Config, seed: Option<u32>, source: Option<Ipv4Addr>, mtu: u32) -> Result<Config> {
    let mut next = *current;
    match seed {
        Some(seed) => {
            next.hash_seed = seed;
            next.flags |= consts::L4LB_CONFIG_SEED_SET | consts::L4LB_CONFIG_SEED_FIXED;
        }
        None if current.flags & consts::L4LB_CONFIG_SEED_SET == 0 => {
            next.hash_seed = random_seed()?;
            next.flags |= consts::L4LB_CONFIG_SEED_SET;
        }
        None => {}
    }
    if let Some(source) = source {
        next.src_addr = u32::from_ne_bytes(source.octets());
        next.flags |= consts::L4LB_CONFIG_SRC_SET;
    }
    next.mtu = mtu;
    Ok(next)
}

fn attach(name: &str, mode: AttachMode, force: bool, seed: Option<u32>) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let mode = Mode::from(mode);
    let mtu = iface.mtu()?;
    let _lock = update_lock(&iface)?;
    let id = crate::attach::attach(&iface, mode, force)?;
    let (_, _, maps) = open_l4lb(name)?;
    let source = iface.ipv4_addr()?;
    let config = updated_config(&maps.read_config()?, seed, source, mtu)?;
    maps.write_config(&config)?;
    println!("l4lb attached to {} in {mode} mode (program id {id})", iface.name);
    match source {
        Some(source) => println!("outer source {source} (from {}); fill the table with `l4lb map -i {} -f FILE`", iface.name, iface.name),
        None => println!("{} has no IPv4 address: give the outer source with `l4lb map -i {} -f FILE -s ADDR`", iface.name, iface.name),
    }
    Ok(())
}

fn detach(name: &str) -> Result<()> {
    let iface = Interface::by_name(name)?;
    for program in crate::attach::detach(&iface)? {
        println!("detached {program} from {}", iface.name);
    }
    Ok(())
}

fn map(name: &str, file: &Path, source: Option<Ipv4Addr>, seed: Option<u32>) -> Result<()> {
    let list = destinations::load(file)?;
    let (iface, _, maps) = open_l4lb(name)?;
    let _lock = update_lock(&iface)?;
    let source = match source {
        Some(addr) => addr,
        None => iface
            .ipv4_addr()?
            .ok_or_else(|| anyhow!("{} has no IPv4 address: give the outer source address with -s ADDR", iface.name))?,
    };
    check_unicast_ipv4(source).map_err(|why| anyhow!("outer source address {source} {why}"))?;
    let mtu = iface.mtu()?;

    let old_config = maps.read_config()?;
    let config = updated_config(&old_config, seed, Some(source), mtu)?;
    let current = maps.read_table()?;
    let plan = table::plan(&current, &list.destinations);

    if list.ignored > 0 {
        eprintln!(
            "warning: {} lists {} destinations; using the first {}",
            file.display(),
            list.destinations.len() + list.ignored,
            list.destinations.len()
        );
    }
    println!("Loading file with {} destinations", list.destinations.len());
    maps.write_config(&config)?;
    if let Err(err) = maps.apply(&current, &plan) {
        maps.write_config(&old_config).context("restoring the configuration")?;
        return Err(err);
    }
    let added = plan.fresh_backends.len();
    let removed = current.backends.iter().flatten().count() + added - list.destinations.len();
    let changed = plan.backend_writes.len() - added;
    println!(
        "{}: {} destinations ({added} added, {removed} removed, {changed} changed), {} of {TABLE_SIZE} slots written, outer source {source}",
        iface.name,
        list.destinations.len(),
        plan.slot_writes.len()
    );
    Ok(())
}

/// One `l4lb stats` sample (also timed by `l4lb bench`).
pub(crate) fn sample(maps: &LbMaps) -> Result<Sample> {
    let backends = maps.read_backends()?;
    let traffic = maps.read_backend_stats()?;
    let destinations = backends
        .iter()
        .zip(&traffic)
        .filter_map(|(backend, t)| backend.map(|d| (d.addr, t.packets, t.bytes)))
        .collect();
    Ok(Sample { destinations, counters: maps.read_counters()? })
}

fn stats(name: &str, sampling: Sampling) -> Result<()> {
    let (_, program, maps) = open_l4lb(name)?;
    print_samples(sampling, || sample(&maps), |before, now, elapsed| {
        let report = stats::report(program.mode, before, now, elapsed);
        if sampling.json { stats::render_json(&report) + "\n" } else { stats::render_table(&report) }
    })
}

/// Prints a report every `sampling.interval` seconds, `sampling.count` times
/// or until interrupted: `take` samples the counters, `render` turns two
/// samples and the time between them into text. The screen is redrawn in place when
/// stdout is a terminal and the output is not JSON.
fn print_samples<S>(
    sampling: Sampling,
    mut take: impl FnMut() -> Result<S>,
    mut render: impl FnMut(&S, &S, Duration) -> String,
) -> Result<()> {
    let Sampling { interval, count, json } = sampling;
    let redraw = !json && std::io::stdout().is_terminal();
    let mut before = take()?;
    let mut taken = Instant::now();
    let mut printed = 0u64;
    while count.is_none_or(|n| printed < n) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now = take()?;
        let at = Instant::now();
        let text = render(&before, &now, at - taken);
        let mut out = std::io::stdout().lock();
        if redraw {
            write!(out, "\x1b[H\x1b[2J")?;
        }
        if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
            return Ok(()); // reader went away (e.g. `| head`)
        }
        before = now;
        taken = at;
        printed += 1;
    }
    Ok(())
}

fn status(name: &str) -> Result<()> {
    let (iface, program, maps) = open_l4lb(name)?;
    let config = maps.read_config()?;
    let table = maps.read_table()?;
    let counts = table.slot_counts();
    let flag = |bit: u32| config.flags & bit != 0;

    println!("Interface:     {} (index {})", iface.name, iface.index);
    println!("Program:       {} (id {}), {} mode", program.name, program.id, program.mode);
    println!("Counters:      {}", if maps.per_cpu_counters() { "per-CPU" } else { "shared (atomic adds)" });
    let source = Ipv4Addr::from(config.src_addr.to_ne_bytes());
    println!("Outer source:  {}", if flag(consts::L4LB_CONFIG_SRC_SET) { source.to_string() } else { "not set".into() });
    let seed = match (flag(consts::L4LB_CONFIG_SEED_SET), flag(consts::L4LB_CONFIG_SEED_FIXED)) {
        (false, _) => "not set (chosen at the first `l4lb map`)".to_string(),
        (true, false) => format!("{:#010x} (random)", config.hash_seed),
        (true, true) => format!("{:#010x} (set with --seed)", config.hash_seed),
    };
    println!("Hash seed:     {seed}");
    println!("MTU:           {}", if config.mtu == 0 { "not set".to_string() } else { config.mtu.to_string() });
    println!("Lookup table:  {} slots, {} unset", table.slots.len(), table.unset_slots());

    let mut rows: Vec<(u32, destinations::Destination)> = table
        .backends
        .iter()
        .enumerate()
        .filter_map(|(n, d)| d.map(|d| (n as u32, d)))
        .collect();
    rows.sort_by_key(|(_, d)| u32::from(d.addr));
    println!("Destinations:  {}", rows.len());
    if rows.is_empty() {
        return Ok(());
    }
    let mut out = Table::new();
    out.load_preset(presets::NOTHING);
    out.set_header(vec!["#", "Destination", "MAC", "Backend", "Slots", "Share"]);
    for (row, (number, destination)) in rows.iter().enumerate() {
        let slots = counts[*number as usize];
        out.add_row(vec![
            (row + 1).to_string(),
            destination.addr.to_string(),
            macaddr::MacAddr6::from(destination.mac).to_string().to_lowercase(),
            number.to_string(),
            slots.to_string(),
            format!("{:.3}%", 100.0 * slots as f64 / table.slots.len() as f64),
        ]);
    }
    print!("{}", stats::table_text(&out));
    Ok(())
}

fn decap_attach(name: &str, mode: DecapMode, force: bool, addrs: Vec<IpAddr>) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let mode = Mode::from(mode);
    let (addrs, origin) = if addrs.is_empty() {
        let own: Vec<IpAddr> = iface.ipv4_addrs()?.into_iter().map(IpAddr::V4).collect();
        if own.is_empty() {
            bail!("{} has no IPv4 address: give the addresses to decapsulate for with --addr ADDR", iface.name);
        }
        (own, format!("{}'s addresses", iface.name))
    } else {
        (addrs, "--addr".to_string())
    };
    let program = decap::attach(&iface, mode, force, &addrs)?;
    let addrs = DecapMaps::open(&program)?.read_addrs()?;
    println!("l4lb decap attached to {} in {mode} mode (program id {})", iface.name, program.id);
    println!("decapsulating IPIP for {} (from {origin})", join_addrs(&addrs));
    Ok(())
}

fn decap_detach(name: &str) -> Result<()> {
    let iface = Interface::by_name(name)?;
    for program in decap::detach(&iface)? {
        println!("detached {program} from {}", iface.name);
    }
    Ok(())
}

fn decap_stats(name: &str, sampling: Sampling) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let (program, maps) = DecapMaps::find(&iface)?;
    let addrs = maps.read_addrs()?;
    print_samples(sampling, || maps.read_counters(), |before, now, elapsed| {
        let report = stats::decap_report(program.mode, &addrs, before, now, elapsed);
        if sampling.json { stats::render_json(&report) + "\n" } else { stats::render_decap_table(&report) }
    })
}

fn join_addrs(addrs: &[IpAddr]) -> String {
    addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}
