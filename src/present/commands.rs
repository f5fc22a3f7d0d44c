//! The subcommands: each resolves the interface, talks to the kernel through
//! `attach`, `discover` and `maps`, and leaves the computing to pure modules.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::addr::check_unicast_ipv4;
use crate::apply;
use crate::bpf::MAGLEV_SIZE;
use crate::cli::{Command, DecapCommand, DecapMode, LoadOptions, Sampling};
use crate::config::{self, ServiceKey};
use crate::decap::{self, DecapMaps};
use crate::destinations;
use crate::device::{self, default_mtu, open_l4lb, update_lock};
use crate::discover::Mode;
use crate::iface::Interface;
use crate::maps::{random_seed, LbMaps};
use crate::stats::{self, Sample};

pub fn run(command: Command) -> Result<()> {
    // Generated from the command line's definition: nothing to open, no privileges.
    match command {
        Command::Completions { shell } => {
            crate::generate::completions(shell, &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { out } => return crate::generate::man_pages(&out),
        _ => {}
    }
    require_privileges()?;
    match command {
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
        Command::Attach { interface, load, force } => attach(&interface, load, force),
        Command::Detach { interface } => detach(&interface),
        Command::Map { interface, file, vip, source, seed } => map(&interface, &file, vip, source, seed),
        Command::Apply { interface, config, dry_run } => apply(&interface, &config, dry_run),
        Command::Config { interface } => show_config(&interface),
        Command::Stats { interface, sampling } => stats(&interface, sampling),
        Command::Status { interface, json, flows } => status(&interface, json, flows),
        Command::Settle { interface, every } => settle(&interface, every),
        Command::Upgrade { interface, object } => upgrade(&interface, object.as_deref()),
        Command::Top { interface, interval } => {
            let (iface, program, maps) = open_l4lb(&interface)?;
            let title = format!("l4lb top: {} ({} mode, program id {})", iface.name, program.mode, program.id);
            let health_file = crate::health::state_file(&iface.name);
            crate::top::run(
                title,
                program.mode,
                Duration::from_secs_f64(interval),
                || sample(&maps),
                || published_health(&health_file),
            )
        }
        Command::Serve { interface, config, load, sweep_every, log_format, metrics, bird_socket, bird_protocol } => {
            crate::agent::run(&crate::agent::Options {
                interface,
                config,
                mode: Mode::from(load.mode),
                seed: load.seed,
                mtu: load.mtu,
                flow_entries: load.flow_entries,
                sweep_every: Duration::from_secs_f64(sweep_every),
                log_format,
                metrics,
                bird: bird_socket.map(|socket| crate::agent::announce::Bird { socket, protocols: bird_protocol }),
            })
        }
        Command::Bench { rounds, seconds, chart, json, variants, flow_entries } => {
            crate::bench::run(&crate::bench::Options {
                rounds: rounds as usize,
                seconds,
                chart,
                json,
                variants,
                flow_entries,
            })
        }
        Command::Decap { command } => match command {
            DecapCommand::Attach { interface, mode, force, addrs } => decap_attach(&interface, mode, force, addrs),
            DecapCommand::Detach { interface } => decap_detach(&interface),
            DecapCommand::Stats { interface, sampling } => decap_stats(&interface, sampling),
        },
    }
}

/// The capabilities every subcommand needs, with their bit numbers:
/// CAP_SYS_ADMIN because the kernel asks it (not CAP_BPF) to open a program
/// or a map by id, which every subcommand does (it also covers loading), and
/// CAP_NET_ADMIN to attach XDP.
const NEEDED_CAPABILITIES: [(u32, &str); 2] = [(21, "CAP_SYS_ADMIN"), (12, "CAP_NET_ADMIN")];

/// Refuses, before anything is read or touched, to run without the
/// capabilities every subcommand needs, saying which are missing and how
/// to get them.
fn require_privileges() -> Result<()> {
    let uid = nix::unistd::geteuid();
    let missing: Vec<&str> = match effective_capabilities() {
        Some(caps) => {
            NEEDED_CAPABILITIES.iter().filter(|(bit, _)| caps & (1 << bit) == 0).map(|&(_, name)| name).collect()
        }
        None if uid.is_root() => Vec::new(),
        None => NEEDED_CAPABILITIES.iter().map(|&(_, name)| name).collect(),
    };
    if missing.is_empty() {
        return Ok(());
    }
    let missing = missing.join(" and ");
    if uid.is_root() {
        bail!(
            "l4lb needs CAP_SYS_ADMIN and CAP_NET_ADMIN (to load BPF programs, attach XDP and open BPF maps; CAP_BPF is not enough), and this root process lacks {missing}: in a container, run it with --cap-add SYS_ADMIN --cap-add NET_ADMIN (or --privileged)"
        );
    }
    bail!(
        "l4lb needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN, to load BPF programs, attach XDP and open BPF maps; CAP_BPF is not enough), and uid {uid} lacks {missing}: run it with sudo"
    );
}

/// The effective capability set (CapEff of /proc/self/status), if readable.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn attach(name: &str, load: LoadOptions, force: bool) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let device::Attached { id, mode, flows, source } =
        device::attach(&iface, Mode::from(load.mode), force, load.seed, load.mtu, load.flow_entries)?;
    println!("l4lb attached to {} in {mode} mode (program id {id}); flow table: {flows}", iface.name);
    match source {
        Some(source) => println!(
            "outer source {source} (from {}); configure services with `l4lb apply -i {} -c FILE` or fill the catch-all with `l4lb map -i {} -f FILE`",
            iface.name, iface.name, iface.name
        ),
        None => println!(
            "{} has no IPv4 address: configure services with `l4lb apply -i {} -c FILE` or give the outer source with `l4lb map -i {} -f FILE -s ADDR`",
            iface.name, iface.name, iface.name
        ),
    }
    Ok(())
}

/// `l4lb upgrade`: the datapath replaced in place, under the update lock.
fn upgrade(name: &str, object: Option<&Path>) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let _lock = update_lock(&iface)?;
    let done = crate::upgrade::upgrade(&iface, object)?;
    let kept: Vec<String> = done.kept.iter().map(|(name, id)| format!("{name} (id {id})")).collect();
    println!(
        "{}: l4lb upgraded in place in {} mode: program id {} -> {}; maps kept: {}",
        iface.name,
        done.old.mode,
        done.old.id,
        done.new_id,
        kept.join(", ")
    );
    Ok(())
}

fn detach(name: &str) -> Result<()> {
    let iface = Interface::by_name(name)?;
    for program in crate::attach::detach(&iface)? {
        println!("detached {program} from {}", iface.name);
    }
    Ok(())
}

/// `l4lb apply`: the whole configuration from a file.
fn apply(name: &str, file: &Path, dry_run: bool) -> Result<()> {
    let wanted = config::load(file)?;
    let (iface, _, maps) = open_l4lb(name)?;
    let planned = device::plan(&iface, &maps, wanted)?;
    let plan = &planned.plan;
    print!("{}", plan.diff);
    if dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    if plan.is_empty() {
        return Ok(());
    }
    apply::execute(&maps, plan)?;
    println!("{}: applied ({} map writes, {} table slots)", iface.name, plan.writes(), plan.slots_written());
    Ok(())
}

/// `l4lb settle`: sweep rounds (docs/transitions.md), one or one every
/// `every` seconds until the process is stopped.
fn settle(name: &str, every: Option<f64>) -> Result<()> {
    let (iface, program, maps) = open_l4lb(name)?;
    let flows = crate::maps::open_flows(&program).with_context(|| format!("{}: the flow table", iface.name))?;
    loop {
        let round = crate::settle::round(&maps, &flows, || update_lock(&iface))
            .with_context(|| format!("{}: settling", iface.name))?;
        println!("{}: {round}", iface.name);
        match every {
            None => return Ok(()),
            Some(seconds) => std::thread::sleep(std::time::Duration::from_secs_f64(seconds)),
        }
    }
}

/// The health state an agent publishes at `path`, if one runs.
fn published_health(path: &Path) -> Option<crate::health::Published> {
    let text = std::fs::read_to_string(path).ok()?;
    let published: crate::health::Published = serde_json::from_str(&text).ok()?;
    Path::new(&format!("/proc/{}", published.pid)).exists().then_some(published)
}

/// `l4lb config`: the running configuration as a file `apply` takes back
/// unchanged.
fn show_config(name: &str) -> Result<()> {
    let (_, _, maps) = open_l4lb(name)?;
    print!("{}", config::to_toml(&maps.read_running()?.model()));
    Ok(())
}

/// `l4lb map`: the seed's command. The destinations become the backends
/// (weight 1) of the catch-all service, or of `vip`'s service (created if
/// absent); other services are left alone.
fn map(name: &str, file: &Path, vip: Option<ServiceKey>, source: Option<Ipv4Addr>, seed: Option<u32>) -> Result<()> {
    let list = destinations::load(file)?;
    let key = vip.unwrap_or(ServiceKey::CatchAll);
    if let ServiceKey::Vip { addr: IpAddr::V6(addr), .. } = key {
        bail!("VIP {addr} is IPv6 and destination files list IPv4 destinations: IPv6-in-IPv4 is not supported (use `l4lb apply`)");
    }
    let (iface, _, maps) = open_l4lb(name)?;
    let _lock = update_lock(&iface)?;
    let now = maps.read_snapshot()?;
    // -s, else the source already configured (other services use it too),
    // else DEV's own address.
    let source = match source.or(now.running.global.source_v4) {
        Some(addr) => addr,
        None => iface
            .ipv4_addr()?
            .ok_or_else(|| anyhow!("{} has no IPv4 address: give the outer source address with -s ADDR", iface.name))?,
    };
    check_unicast_ipv4(source).map_err(|why| anyhow!("outer source address {source} {why}"))?;

    let mut wanted = now.running.model();
    wanted.global.source_v4 = Some(source);
    if seed.is_some() {
        wanted.global.hash_seed = seed;
    }
    let mut backends: Vec<config::Backend> = list
        .destinations
        .iter()
        .map(|d| config::Backend { addr: d.addr.into(), mac: Some(d.mac), weight: 1 })
        .collect();
    backends.sort();
    // A new service gets the defaults; an existing one keeps its settings.
    let service = match wanted.service(&key) {
        Some(existing) => config::Service { backends, ..existing.clone() },
        None => config::Service::new(key, backends),
    };
    match wanted.services.binary_search_by(|s| s.key.cmp(&key)) {
        Ok(i) => wanted.services[i] = service,
        Err(i) => wanted.services.insert(i, service),
    }
    default_mtu(&iface, &now, &mut wanted)?;
    let plan = apply::plan(&now, &wanted, random_seed()?)?;

    if list.ignored > 0 {
        eprintln!(
            "warning: {} lists {} destinations; using the first {}",
            file.display(),
            list.destinations.len() + list.ignored,
            list.destinations.len()
        );
    }
    println!("Loading file with {} destinations", list.destinations.len());
    apply::execute(&maps, &plan)?;
    let (added, removed, changed) =
        match (plan.diff.added.iter().find(|s| s.key == key), plan.diff.changed.iter().find(|c| c.key == key)) {
            (Some(s), _) => (s.backends.len(), 0, 0),
            (_, Some(c)) => (c.added.len(), c.removed.len(), c.changed.len()),
            _ => (0, 0, 0),
        };
    let target = match key {
        ServiceKey::CatchAll => String::new(),
        key => format!(" for {key}"),
    };
    println!(
        "{}: {} destinations{target} ({added} added, {removed} removed, {changed} changed), {} of {MAGLEV_SIZE} slots written, outer source {source}",
        iface.name,
        list.destinations.len(),
        plan.slots_written()
    );
    Ok(())
}

/// One `l4lb stats` sample (also timed by `l4lb bench`): the running
/// services and backends, their traffic, and the global counters.
pub(crate) fn sample(maps: &LbMaps) -> Result<Sample> {
    let running = maps.read_running_without_tables()?;
    let counts = |map, n| {
        let traffic = crate::maps::read_traffic_entry(map, n)?;
        Ok(stats::Counts { packets: traffic.packets, bytes: traffic.bytes })
    };
    Sample::new(&running, |n| counts(&maps.svc_stats, n), |n| counts(&maps.be_stats, n), maps.read_counters()?)
}

fn stats(name: &str, sampling: Sampling) -> Result<()> {
    let (_, program, maps) = open_l4lb(name)?;
    print_samples(
        sampling,
        || sample(&maps),
        |before, now, elapsed| {
            let report = stats::report(program.mode, before, now, elapsed);
            if sampling.json {
                stats::render_json(&report) + "\n"
            } else {
                stats::render_table(&report)
            }
        },
    )
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

/// `l4lb status`; with `flows`, the flow table is walked and its pins
/// counted against the running state (read first: a pin made to a backend
/// added meanwhile counts as stale).
fn status(name: &str, json: bool, flows: bool) -> Result<()> {
    use libbpf_rs::MapCore;
    let (iface, program, maps) = open_l4lb(name)?;
    let running = maps.read_running()?;
    let vip_probes = maps.read_config().ok().map(|config| config.vip_probes);
    let table = crate::maps::open_flows(&program).with_context(|| format!("{}: the flow table", iface.name))?;
    let info = crate::status::Program {
        interface: iface.name.clone(),
        ifindex: iface.index,
        name: program.name.clone(),
        id: program.id,
        mode: program.mode,
        per_cpu_counters: maps.per_cpu_counters(),
        vip_probes,
        flow_table: crate::status::FlowTable {
            lru: table.map_type() == libbpf_rs::MapType::LruHash,
            max_entries: table.max_entries(),
        },
        tick: match (maps.read_config(), crate::maps::tick()) {
            (Ok(config), Ok(now)) => Some(crate::status::Tick { clock: config.clock, now }),
            _ => None,
        },
    };
    let counts = if flows {
        let mut counter = crate::status::PinCounter::new(&running);
        crate::maps::walk_flows(&table, |key, pin| counter.add(key, pin))
            .with_context(|| format!("{}: walking map `{}`", iface.name, crate::bpf::MAP_FLOWS))?;
        Some(counter.finish())
    } else {
        None
    };
    let status = crate::status::build(&info, &running, counts.as_ref());
    if json {
        println!("{}", stats::render_json(&status));
    } else {
        print!("{}", crate::status::render(&status));
    }
    Ok(())
}

fn decap_attach(name: &str, mode: DecapMode, force: bool, addrs: Vec<IpAddr>) -> Result<()> {
    let iface = Interface::by_name(name)?;
    let mode = Mode::from(mode);
    let (addrs, origin) = if addrs.is_empty() {
        // Link-local IPv6 addresses are left out: every interface has one,
        // and a balancer sends to a backend's routable address.
        let v4 = iface.ipv4_addrs()?.into_iter().map(IpAddr::V4);
        let v6 = iface.ipv6_addrs()?.into_iter().filter(|a| !a.is_unicast_link_local()).map(IpAddr::V6);
        let own: Vec<IpAddr> = v4.chain(v6).collect();
        if own.is_empty() {
            bail!(
                "{} has no IPv4 or IPv6 address (link-local aside): give the addresses to decapsulate for with --addr ADDR",
                iface.name
            );
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
    print_samples(
        sampling,
        || maps.read_counters(),
        |before, now, elapsed| {
            let report = stats::decap_report(program.mode, &addrs, before, now, elapsed);
            if sampling.json {
                stats::render_json(&report) + "\n"
            } else {
                stats::render_decap_table(&report)
            }
        },
    )
}

fn join_addrs(addrs: &[IpAddr]) -> String {
    addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}
