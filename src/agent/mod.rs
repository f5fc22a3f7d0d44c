//! `l4lb serve`, the agent: one long-running process per balancer that keeps
//! the datapath programmed from a file. It attaches l4lb where none is
//! attached (and keeps one it finds), applies the file, applies it again on
//! every change and on SIGHUP with the same all-or-nothing apply as
//! `l4lb apply`, runs the sweep that ends table transitions, and probes the
//! backends of services with a health check: what it programs is the file
//! without the backends that are down (`checks`).
//!
//! Forwarding never depends on it: the program stays attached and its maps
//! stay filled when the agent stops, crashes or restarts; a restarted agent
//! finds the program, and applying the same file again writes nothing.

pub mod announce;
mod checks;
pub mod log;
pub mod metrics;
pub mod probes;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libbpf_rs::MapHandle;

use crate::apply;
use crate::config;
use crate::device;
use crate::discover::{self, AttachedProgram, Mode};
use crate::iface::Interface;
use crate::maps::LbMaps;
use log::{Event, Level, Log, LogFormat};
use metrics::AgentFigures;
use watch::Wake;

/// How long after the first change in the file's directory the file is
/// read again: an editor's or a deployment's burst of events is one read.
const QUIET: Duration = Duration::from_millis(200);

/// How long after a backend went up or down its service is programmed
/// again: probes of one dead host fail together, for every service it
/// serves, and become one apply.
const HEALTH_QUIET: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Options {
    pub interface: String,
    pub config: PathBuf,
    /// Used only when the agent attaches l4lb itself.
    pub mode: Mode,
    pub seed: Option<u32>,
    pub mtu: Option<u32>,
    pub flow_entries: Option<u32>,
    /// Between two rounds of the sweep (`l4lb settle`).
    pub sweep_every: Duration,
    pub log_format: LogFormat,
    /// Where `GET /metrics` is served; None: nowhere.
    pub metrics: Option<SocketAddr>,
    /// The BIRD protocol that announces the VIPs; None: no announcement.
    pub bird: Option<announce::Bird>,
}

/// Runs the agent until SIGTERM or SIGINT. A configuration file that does not
/// validate stops the start before anything is touched; once running, a bad
/// file is refused (logged with FILE:LINE) and the running state is kept.
pub fn run(options: &Options) -> Result<()> {
    let log = Log::new(options.log_format, &options.interface);
    let origin = options.config.display().to_string();
    let bytes = config::read(&options.config)?;
    let wanted = config::parse(&origin, &bytes)?;
    let iface = Interface::by_name(&options.interface)?;

    let (wake, woken) = mpsc::channel();
    watch::signals(wake.clone())?;
    watch::directory(&options.config, wake.clone())?;
    let mut agent = Agent::start(options, iface, log, checks::Checks::new(wake))?;
    let started = match options.metrics {
        Some(addr) => metrics::serve(addr, agent.shared()),
        None => Ok(()),
    };
    if let Err(err) = started.and_then(|()| agent.apply(bytes, wanted, "start")) {
        // Leave the interface as the agent found it.
        if agent.attached_here {
            let _ = crate::attach::detach(&agent.iface);
        }
        return Err(err);
    }
    agent.log.write(
        Event::info(
            "serving",
            format!(
                "applying {origin} on every change and on SIGHUP; sweeping transitions every {} s",
                options.sweep_every.as_secs_f64()
            ),
        )
        .with("file", origin.as_str())
        .with("pid", std::process::id())
        .with("metrics", options.metrics.map_or("none".to_string(), |addr| format!("http://{addr}/metrics"))),
    );

    agent.announce(true, "the datapath is attached and programmed");

    let mut timers = Timers::new(Instant::now(), options.sweep_every);
    loop {
        match woken.recv_timeout(timers.wait(Instant::now())) {
            Ok(Wake::DirectoryChanged) => timers.file_touched(Instant::now()),
            Ok(Wake::Reload) => agent.reload("SIGHUP", true),
            Ok(Wake::Probe(outcome)) => {
                if agent.probed(outcome) {
                    timers.health_changed(Instant::now());
                }
            }
            Ok(Wake::Stop(signal)) => {
                // Clients go to other balancers while this one has no agent.
                agent.announce(false, signal);
                agent.log.write(Event::info(
                    "stopping",
                    format!("{signal}: stopping; the datapath keeps forwarding as configured"),
                ));
                return Ok(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => bail!("the signal and file watchers stopped"),
        }
        let now = Instant::now();
        if timers.take_reread(now) {
            agent.reload("file changed", false);
        }
        if timers.take_reprogram(now) {
            agent.reprogram();
        }
        if timers.sweep_due(now) {
            agent.sweep();
            timers.swept(Instant::now());
        }
    }
}

/// When to read the file again and when to sweep (pure, unit-tested).
#[derive(Debug)]
struct Timers {
    reread_at: Option<Instant>,
    /// When to program the health checks' outcome (HEALTH_QUIET after the
    /// first change, so that backends found down together are one apply).
    reprogram_at: Option<Instant>,
    next_sweep: Instant,
    every: Duration,
}

impl Timers {
    fn new(now: Instant, every: Duration) -> Timers {
        Timers { reread_at: None, reprogram_at: None, next_sweep: now + every, every }
    }

    /// A backend went up or down.
    fn health_changed(&mut self, now: Instant) {
        self.reprogram_at.get_or_insert(now + HEALTH_QUIET);
    }

    fn take_reprogram(&mut self, now: Instant) -> bool {
        let due = self.reprogram_at.is_some_and(|at| at <= now);
        if due {
            self.reprogram_at = None;
        }
        due
    }

    /// A change in the directory: read the file QUIET after the first one.
    fn file_touched(&mut self, now: Instant) {
        self.reread_at.get_or_insert(now + QUIET);
    }

    /// How long to wait for a wake-up before the next deadline.
    fn wait(&self, now: Instant) -> Duration {
        let next = [self.reread_at, self.reprogram_at].into_iter().flatten().fold(self.next_sweep, Instant::min);
        next.saturating_duration_since(now)
    }

    fn take_reread(&mut self, now: Instant) -> bool {
        let due = self.reread_at.is_some_and(|at| at <= now);
        if due {
            self.reread_at = None;
        }
        due
    }

    fn sweep_due(&self, now: Instant) -> bool {
        self.next_sweep <= now
    }

    /// A round ended at `now`: the next one is an interval after it, not
    /// after its start, as with `l4lb settle --every`: however long a round
    /// takes (a walk of a flow table full of a flood's pins), `l4lb apply`
    /// finds the update lock free between rounds.
    fn swept(&mut self, now: Instant) {
        self.next_sweep = now + self.every;
    }
}

/// The agent's hold on one interface's l4lb.
struct Agent<'a> {
    options: &'a Options,
    iface: Interface,
    log: Log,
    program: AttachedProgram,
    maps: Arc<LbMaps>,
    flows: MapHandle,
    /// The maps the metrics endpoint reads (the same as `maps`).
    shared_maps: Arc<Mutex<Arc<LbMaps>>>,
    figures: Arc<Mutex<AgentFigures>>,
    /// Applies that changed something since the agent started.
    generation: u64,
    /// The bytes of the file last applied.
    applied: Option<Vec<u8>>,
    /// The agent attached l4lb at its start (none was attached).
    attached_here: bool,
    /// The last read of the file was refused (said once it is right again).
    refusing: bool,
    /// The bytes of the file last refused, not read and refused again.
    refused_bytes: Option<Vec<u8>>,
    /// The model of the file last applied; what is programmed is its
    /// effective model (down backends out).
    file_model: Option<config::Model>,
    checks: checks::Checks,
    /// Whether BIRD was last told to announce the VIPs (None: not told yet).
    announced: Option<bool>,
    /// Whether the interface was down during the probe started last.
    link: probes::LinkWatch,
}

impl<'a> Agent<'a> {
    /// Keeps the l4lb attached to the interface, or attaches one where no
    /// XDP program is; refuses to replace another program.
    fn start(options: &'a Options, iface: Interface, log: Log, checks: checks::Checks) -> Result<Agent<'a>> {
        let (program, attached_here) = attach_unless_attached(options, &iface, &log)?;
        let (maps, flows) = open(&iface, &program)?;
        let maps = Arc::new(maps);
        let figures = AgentFigures { flow_table_capacity: flow_capacity(&flows), ..AgentFigures::default() };
        Ok(Agent {
            options,
            iface,
            log,
            program,
            shared_maps: Arc::new(Mutex::new(maps.clone())),
            maps,
            flows,
            figures: Arc::new(Mutex::new(figures)),
            generation: 0,
            applied: None,
            attached_here,
            refusing: false,
            refused_bytes: None,
            file_model: None,
            checks,
            announced: None,
            link: probes::LinkWatch::default(),
        })
    }

    /// What the metrics endpoint reads.
    fn shared(&self) -> metrics::Shared {
        metrics::Shared { maps: self.shared_maps.clone(), figures: self.figures.clone() }
    }

    /// Updates the agent's figures.
    fn count(&self, update: impl FnOnce(&mut AgentFigures)) {
        update(&mut self.figures.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Reads the file again and applies it: always when `forced` (SIGHUP:
    /// it also undoes changes made by hand since), else only if its bytes
    /// changed. A file that cannot be read or does not validate is refused
    /// and the running state is kept.
    fn reload(&mut self, cause: &str, forced: bool) {
        let origin = self.options.config.display().to_string();
        let bytes = match config::read(&self.options.config) {
            Ok(bytes) => bytes,
            Err(err) => return self.refused(cause, err),
        };
        if !forced && self.applied.as_ref() == Some(&bytes) {
            self.refused_bytes = None;
            if self.refusing {
                self.refusing = false;
                self.log
                    .write(Event::info("unchanged", format!("{cause}: the file is the running configuration again")));
            }
            return;
        }
        // The same bad bytes again (another file of the directory changed):
        // refused once is enough.
        if !forced && self.refused_bytes.as_ref() == Some(&bytes) {
            return;
        }
        let outcome = config::parse(&origin, &bytes).and_then(|wanted| self.apply(bytes.clone(), wanted, cause));
        if let Err(err) = outcome {
            self.refused(cause, err);
            self.refused_bytes = Some(bytes);
        }
    }

    /// Takes `wanted` (the file's model, `bytes`): follows its health checks
    /// and programs its effective model.
    fn apply(&mut self, bytes: Vec<u8>, wanted: config::Model, cause: &str) -> Result<()> {
        if let Err(err) = self.checks.configure(&self.iface, &wanted) {
            // Probing is the agent's own work: without it every backend stays.
            self.log.write(
                Event::error("health_failed", format!("health checks: {err:#}; every backend is kept"))
                    .with("error", format!("{err:#}")),
            );
            self.checks.configure(&self.iface, &config::Model { health: Default::default(), ..wanted.clone() })?;
        }
        if self.file_model.is_none() {
            self.checks.adopt(&self.maps.read_running()?.model());
        }
        let probed: Vec<crate::health::Target> = self.checks.tracker.iter().map(|(t, _)| *t).collect();
        self.count(|f| f.keep_health_of(&probed));
        self.publish_health();
        if let Err(err) = self.program(&wanted, cause) {
            // Refused: the checks go back to the running file's, as the datapath does.
            if let Some(running) = self.file_model.clone() {
                let _ = self.checks.configure(&self.iface, &running);
            }
            return Err(err);
        }
        self.file_model = Some(wanted);
        self.applied = Some(bytes);
        self.refusing = false;
        self.refused_bytes = None;
        Ok(())
    }

    /// A probe's outcome: a backend that went down or came up is logged
    /// (then true: the caller has the file's effective model programmed
    /// again, `reprogram`).
    fn probed(&mut self, outcome: probes::Outcome) -> bool {
        let (target, result) = (outcome.target, outcome.result.clone());
        self.count(|f| f.probe(&target, &result, outcome.link_down.is_some()));
        self.link_state(outcome.started, outcome.link_down.as_deref());
        let Some(change) = self.checks.observe(outcome) else { return false };
        let (event, level) = if change.up { ("backend_up", Level::Info) } else { ("backend_down", Level::Warn) };
        self.count(|f| f.backend_state(&change.target, change.up));
        self.publish_health();
        self.log.write(
            Event::new(level, event, format!("{}: {}", change.target, change.reason))
                .with("service", change.target.service.to_string())
                .with("backend", change.target.backend.to_string())
                .with("reason", change.reason.as_str()),
        );
        true
    }

    /// Says once when probes stop counting because the interface is down
    /// (`why`), and once when they count again.
    fn link_state(&mut self, started: Instant, down: Option<&str>) {
        match (down, self.link.see(started, down.is_some())) {
            (Some(why), Some(true)) => self.log.write(Event::new(
                Level::Warn,
                "link_down",
                format!(
                    "{why}: health probes are not counted until it is up (cut off, the balancer would find \
                     every backend down)"
                ),
            )),
            (None, Some(false)) => {
                self.log.write(Event::info("link_up", format!("{} is up: health probes count again", self.iface.name)))
            }
            _ => {}
        }
    }

    /// Programs the file's effective model after backends went up or down.
    fn reprogram(&mut self) {
        let Some(model) = self.file_model.clone() else { return };
        if let Err(err) = self.program(&model, "health") {
            self.count(|f| f.count_apply("failed"));
            self.log.write(
                Event::error("apply_failed", format!("health: {err:#}; the running configuration is kept"))
                    .with("error", format!("{err:#}")),
            );
        }
    }

    /// Publishes the backends' health for `l4lb top`; a failure is logged,
    /// the agent goes on.
    fn publish_health(&mut self) {
        if let Err(err) = self.checks.publish(&self.iface) {
            self.log.write(Event::new(Level::Warn, "publish_failed", format!("health state: {err:#}")));
        }
    }

    /// Plans the effective model of `file` against the running state and
    /// executes the plan (all or nothing: a failed write rolls back the
    /// ones before it).
    fn program(&mut self, file: &config::Model, cause: &str) -> Result<()> {
        let started = Instant::now();
        let (wanted, kept_whole) = self.checks.effective(file);
        for service in kept_whole {
            self.log.write(
                Event::new(
                    Level::Warn,
                    "all_down",
                    format!("{service}: no backend that takes new flows is up: all are kept (with none, new clients would have nowhere to go)"),
                )
                .with("service", service.to_string()),
            );
        }
        let planned = device::plan(&self.iface, &self.maps, wanted)?;
        let plan = &planned.plan;
        if plan.is_empty() {
            self.count(|f| f.count_apply("unchanged"));
            self.log.write(
                Event::info("unchanged", format!("{cause}: the running configuration is the file's already"))
                    .with("cause", cause)
                    .with("generation", self.generation),
            );
        } else {
            apply::execute(&*self.maps, plan)?;
            self.generation += 1;
            let (seconds, generation) = (started.elapsed().as_secs_f64(), self.generation);
            self.count(|f| {
                f.count_apply("applied");
                f.apply_seconds.observe(seconds);
                f.generation = generation;
            });
            let changes: Vec<String> = plan.diff.to_string().lines().map(|line| line.trim().to_string()).collect();
            self.log.write(
                Event::info(
                    "applied",
                    format!(
                        "{cause}: generation {}: {} ({} map writes, {} table slots)",
                        self.generation,
                        changes.join("; "),
                        plan.writes(),
                        plan.slots_written()
                    ),
                )
                .with("cause", cause)
                .with("generation", self.generation)
                .with("changes", changes)
                .with("map_writes", plan.writes())
                .with("slots_written", plan.slots_written()),
            );
        }
        Ok(())
    }

    fn refused(&mut self, cause: &str, err: anyhow::Error) {
        self.refusing = true;
        self.count(|f| f.count_apply("refused"));
        self.log.write(
            Event::error("refused", format!("{cause}: {err:#}; the running configuration is kept"))
                .with("cause", cause)
                .with("error", format!("{err:#}")),
        );
    }

    /// Tells BIRD to announce the VIPs (`want`) or to withdraw them,
    /// unless it was told so already; `why` goes in the log. A failure is
    /// logged and tried again at the next sweep.
    fn announce(&mut self, want: bool, why: &str) {
        let Some(bird) = &self.options.bird else { return };
        if self.announced == Some(want) {
            return;
        }
        let (event, result) = if want { ("announced", bird.announce()) } else { ("withdrawn", bird.withdraw()) };
        match result {
            Ok(answer) => {
                self.announced = Some(want);
                self.log.write(
                    Event::info(event, format!("{why}: BIRD {}: {answer}", bird.protocols.join(", ")))
                        .with("protocols", bird.protocols.clone()),
                );
            }
            Err(err) => {
                self.announced = None;
                self.log.write(
                    Event::error("announce_failed", format!("{why}: {err:#}")).with("error", format!("{err:#}")),
                );
            }
        }
    }

    /// One round of the sweep, after making sure l4lb is still the program
    /// on the interface (attached again if someone detached it); logs each
    /// service's slots that left their transition. The VIPs are announced
    /// while the check passes.
    fn sweep(&mut self) {
        if let Err(err) = self.check_attached() {
            self.count(|f| f.sweeps_failed += 1);
            self.log.write(Event::error("sweep_failed", format!("{err:#}")));
            self.announce(false, "no l4lb on the interface");
            return;
        }
        self.announce(true, "the datapath is attached and programmed");
        let round = crate::settle::round(&self.maps, &self.flows, || device::update_lock(&self.iface));
        match round {
            Ok(round) => {
                self.count(|f| {
                    f.sweeps_ok += 1;
                    f.slots_in_transition = round.open.iter().map(|(s, &n)| (s.clone(), n as u64)).collect();
                    let deleted = round.pins_idle + round.pins_stale + round.pins_ended;
                    f.flow_table_entries = round.pins_seen.saturating_sub(deleted) as u64;
                });
                for (service, &ended) in round.ended.iter().filter(|(_, &n)| n > 0) {
                    let open = round.open.get(service).copied().unwrap_or(0);
                    self.log.write(
                        Event::info(
                            "transition_ended",
                            format!("{service}: {ended} slots left their transition, {open} still in transition"),
                        )
                        .with("service", service.as_str())
                        .with("slots_ended", ended)
                        .with("slots_in_transition", open),
                    );
                }
            }
            Err(err) => {
                self.count(|f| f.sweeps_failed += 1);
                self.log.write(Event::error("sweep_failed", format!("{err:#}")));
            }
        }
    }

    /// The program on the interface is still ours; another l4lb (replaced
    /// by hand) is adopted, and where none is, l4lb is attached again; both
    /// then get the file.
    fn check_attached(&mut self) -> Result<()> {
        let present = discover::attached_programs(&self.iface)?;
        if present.iter().any(|p| p.is_l4lb() && p.id == self.program.id) {
            return Ok(());
        }
        self.program = match present.iter().find(|p| p.is_l4lb()) {
            Some(other) => {
                self.log.write(Event::new(
                    Level::Warn,
                    "adopted",
                    format!("l4lb {} replaced {}: applying the file to it", other, self.program),
                ));
                other.clone()
            }
            None => {
                self.log.write(Event::new(
                    Level::Warn,
                    "reattaching",
                    format!("{} is no longer attached to {}", self.program, self.iface.name),
                ));
                self.announce(false, "l4lb was detached");
                attach_unless_attached(self.options, &self.iface, &self.log)?.0
            }
        };
        let (maps, flows) = open(&self.iface, &self.program)?;
        let capacity = flow_capacity(&flows);
        self.count(|f| f.flow_table_capacity = capacity);
        (self.maps, self.flows) = (Arc::new(maps), flows);
        *self.shared_maps.lock().unwrap_or_else(|e| e.into_inner()) = self.maps.clone();
        self.applied = None;
        self.reload("program changed", true);
        Ok(())
    }
}

/// The l4lb attached to `iface`, or a fresh one attached as the options say
/// where no XDP program is (then true).
fn attach_unless_attached(options: &Options, iface: &Interface, log: &Log) -> Result<(AttachedProgram, bool)> {
    let present = discover::attached_programs(iface)?;
    if let Some(l4lb) = present.iter().find(|p| p.is_l4lb()) {
        log.write(Event::info("kept", format!("l4lb is attached already: {l4lb}")).with("program_id", l4lb.id));
        return Ok((l4lb.clone(), false));
    }
    if let Some(other) = present.first() {
        bail!(
            "{} has XDP program {other}, not l4lb: the agent keeps an l4lb it finds and attaches one where no program is; detach the other program first",
            iface.name
        );
    }
    let attached = device::attach(iface, options.mode, false, options.seed, options.mtu, options.flow_entries)?;
    let source = attached.source.map_or("none (the file must give source_v4)".to_string(), |s| s.to_string());
    log.write(
        Event::info(
            "attached",
            format!(
                "l4lb attached in {} mode (program id {}); flow table: {}; outer source {source}",
                attached.mode, attached.id, attached.flows
            ),
        )
        .with("program_id", attached.id),
    );
    Ok((discover::find_l4lb(iface)?, true))
}

/// Entries the flow table holds at most.
fn flow_capacity(flows: &MapHandle) -> u64 {
    u64::from(libbpf_rs::MapCore::max_entries(flows))
}

/// The program's maps and flow table.
fn open(iface: &Interface, program: &AttachedProgram) -> Result<(LbMaps, MapHandle)> {
    let maps = LbMaps::open(program).with_context(|| format!("{}: opening l4lb's maps", iface.name))?;
    let flows = crate::maps::open_flows(program).with_context(|| format!("{}: the flow table", iface.name))?;
    Ok((maps, flows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_file_events_is_one_read_a_quiet_moment_after_the_first() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0, Duration::from_secs(5));
        assert_eq!(timers.wait(t0), Duration::from_secs(5));
        timers.file_touched(t0);
        timers.file_touched(t0 + Duration::from_millis(150));
        assert_eq!(timers.wait(t0 + Duration::from_millis(150)), Duration::from_millis(50));
        assert!(!timers.take_reread(t0 + Duration::from_millis(199)));
        assert!(timers.take_reread(t0 + QUIET));
        assert!(!timers.take_reread(t0 + QUIET), "one read per burst");
        assert_eq!(timers.wait(t0 + QUIET), Duration::from_secs(5) - QUIET);
    }

    #[test]
    fn sweeps_come_an_interval_after_the_last_one_ended() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0, Duration::from_secs(2));
        assert!(!timers.sweep_due(t0 + Duration::from_millis(1999)));
        assert!(timers.sweep_due(t0 + Duration::from_secs(2)));
        // A round from 2 s to 3.5 s (a long walk of the flow table): the
        // next is due at 5.5 s, leaving the update lock free for 2 s.
        timers.swept(t0 + Duration::from_millis(3500));
        assert!(!timers.sweep_due(t0 + Duration::from_millis(5499)));
        assert_eq!(timers.wait(t0 + Duration::from_millis(3500)), Duration::from_secs(2));
        assert!(timers.sweep_due(t0 + Duration::from_millis(5500)));
        // A wait past a deadline is zero, never negative.
        assert_eq!(timers.wait(t0 + Duration::from_secs(60)), Duration::ZERO);
    }

    #[test]
    fn backends_that_change_together_are_programmed_once_a_quiet_moment_after_the_first() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0, Duration::from_secs(5));
        timers.health_changed(t0);
        timers.health_changed(t0 + Duration::from_millis(30));
        assert_eq!(timers.wait(t0 + Duration::from_millis(30)), Duration::from_millis(20));
        assert!(!timers.take_reprogram(t0 + Duration::from_millis(49)));
        assert!(timers.take_reprogram(t0 + HEALTH_QUIET));
        assert!(!timers.take_reprogram(t0 + Duration::from_secs(1)), "one apply for both");
        assert_eq!(timers.wait(t0 + Duration::from_secs(1)), Duration::from_secs(4), "then the sweep's deadline");
    }
}
