//! The agent's health checks: the probe path (crate::probe_path), the
//! probers (super::probes) and what they found (crate::health::Tracker).
//! The agent programs `effective(file)`: the file's model without the
//! backends that are down.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc::Sender;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::probes::{Outcome, Probers};
use super::watch::Wake;
use crate::config::{Model, ServiceKey};
use crate::health::{self, Change, Check, Target, Tracker};
use crate::iface::Interface;
use crate::probe_path::{self, ProbePath, Route};

/// Health checking of one interface's services.
pub struct Checks {
    /// Set up while some service has a check.
    path: Option<ProbePath>,
    pub tracker: Tracker,
    probers: Probers,
    /// What the probers probe, with each target's mark.
    probed: Vec<(Target, Check, u32)>,
    /// Sets of probers started so far (numbers each set's outcomes).
    rounds: u64,
    wake: Sender<Wake>,
    /// Where the state is published (health::state_file), once it was.
    published: Option<std::path::PathBuf>,
}

impl Checks {
    pub fn new(wake: Sender<Wake>) -> Checks {
        Checks {
            path: None,
            tracker: Tracker::new(),
            probers: Probers::none(),
            probed: Vec::new(),
            rounds: 0,
            wake,
            published: None,
        }
    }

    /// Follows the checks of `model` (the file's): sets the probe path up
    /// (or down when no service has a check), writes each backend's route,
    /// and restarts the probers if what they probe changed. Backends keep
    /// their state across changes.
    pub fn configure(&mut self, iface: &Interface, model: &Model) -> Result<()> {
        let targets = health::targets(model);
        if targets.is_empty() {
            self.probers = Probers::none();
            self.probed.clear();
            self.path = None;
            self.tracker.sync(&[], Instant::now());
            return Ok(());
        }
        let sources = Sources::of(iface, model)?;
        let routes = routes(iface, model, &targets, &sources)?;
        if self.path.is_none() {
            self.path = Some(ProbePath::set_up(iface, sources.v4, sources.v6).context("setting up the probe path")?);
        }
        let path = self.path.as_ref().expect("set up above");
        let numbers: BTreeMap<IpAddr, usize> = routes.keys().enumerate().map(|(i, &addr)| (addr, i)).collect();
        for (addr, route) in &routes {
            path.set_target(numbers[addr], route)?;
        }
        let probed: Vec<(Target, Check, u32)> =
            targets.iter().map(|(t, c)| (*t, c.clone(), probe_path::MARK | numbers[&t.backend] as u32)).collect();
        self.tracker.sync(&targets, Instant::now());
        if probed != self.probed {
            self.probers = Probers::none();
            self.rounds += 1;
            self.probers =
                Probers::start(self.rounds, probed.clone(), iface, &self.wake).context("starting the probe threads")?;
            self.probed = probed;
        }
        Ok(())
    }

    /// At the agent's start: backends of the file that `running` (the
    /// datapath as found) has taken out of a service start down, so that a
    /// restarted agent does not put back a backend it had found dead.
    pub fn adopt(&mut self, running: &Model) {
        let now = Instant::now();
        let absent: Vec<Target> = self
            .tracker
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| running.service(&t.service).is_some_and(|s| s.backends.iter().all(|b| b.addr != t.backend)))
            .collect();
        for target in absent {
            self.tracker.start_down(&target, now);
        }
    }

    /// One probe's outcome; the change it makes, if any. Outcomes of
    /// probers replaced since are ignored, and so are those of probes that
    /// ran while the balancer's link was down.
    pub fn observe(&mut self, outcome: Outcome) -> Option<Change> {
        if outcome.round != self.probers.round || self.probed.is_empty() || outcome.link_down.is_some() {
            return None;
        }
        self.tracker.observe(&outcome.target, outcome.result, Instant::now())
    }

    /// Writes the backends' states where `l4lb top` reads them (renamed
    /// over the old file: readers never see half of one).
    pub fn publish(&mut self, iface: &Interface) -> Result<()> {
        let path = health::state_file(&iface.name);
        // Nothing probed: nothing to publish (and what was published goes).
        if self.probed.is_empty() {
            if self.published.take().is_some() {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&health::Published::of(&self.tracker, std::process::id()))?;
        let partial = path.with_extension("json.tmp");
        std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
        self.published = Some(path);
        Ok(())
    }

    /// The model to program for the file's `model`, and the services kept
    /// whole although all their backends are down.
    pub fn effective(&self, model: &Model) -> (Model, Vec<ServiceKey>) {
        health::effective(model, &self.tracker)
    }
}

/// The balancer's probe sources: the file's `source_v4`/`source_v6`, else
/// the interface's first address of the family (a global one for IPv6),
/// read once per configuration.
struct Sources {
    v4: Option<std::net::Ipv4Addr>,
    v6: Option<std::net::Ipv6Addr>,
}

impl Sources {
    fn of(iface: &Interface, model: &Model) -> Result<Sources> {
        let v4 = match model.global.source_v4 {
            Some(source) => Some(source),
            None => iface.ipv4_addr()?,
        };
        let v6 = match model.global.source_v6 {
            Some(source) => Some(source),
            None => iface.ipv6_addrs()?.into_iter().find(|a| is_global(*a)),
        };
        Ok(Sources { v4, v6 })
    }
}

/// Each probed backend's route: its address, its next hop (its own MAC or
/// the gateway's) and the balancer's source of its family.
fn routes(
    iface: &Interface,
    model: &Model,
    targets: &[(Target, Check)],
    sources: &Sources,
) -> Result<BTreeMap<IpAddr, Route>> {
    let mut out = BTreeMap::new();
    for (target, _) in targets {
        let service = model.service(&target.service).context("a probed service is not in the model")?;
        let backend = service.backends.iter().find(|b| b.addr == target.backend).context("a probed backend left")?;
        let Some(next_hop) = backend.mac.or(model.global.gateway_mac) else {
            bail!("{target}: no MAC and no gateway_mac: its probes have no next hop");
        };
        let source: Option<IpAddr> = match backend.addr {
            IpAddr::V4(_) => sources.v4.map(IpAddr::V4),
            IpAddr::V6(_) => sources.v6.map(IpAddr::V6),
        };
        let Some(source) = source else {
            bail!("{target}: {} has no address of that family and the file sets no source for it", iface.name);
        };
        out.insert(backend.addr, Route { backend: backend.addr, next_hop, source });
    }
    if out.len() > probe_path::TARGETS {
        bail!("{} backends have health checks: at most {} can be probed", out.len(), probe_path::TARGETS);
    }
    Ok(out)
}

/// Not link-local (fe80::/10): an address a backend can answer.
fn is_global(addr: std::net::Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 != 0xfe80
}

impl Drop for Checks {
    /// The published state leaves with the agent.
    fn drop(&mut self) {
        if let Some(path) = &self.published {
            let _ = std::fs::remove_file(path);
        }
    }
}
