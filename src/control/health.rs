//! Health checks, the pure part: what is probed (`targets`), what the
//! probes' outcomes make of each backend (`Tracker`), and the model the
//! datapath is programmed from once the backends found down are taken out
//! (`effective`). No sockets and no clock here: the agent probes, passes the
//! outcomes and the time in, and applies what comes out.
//!
//! A backend is up or down per service (the same address may answer on one
//! port and not on another). It goes down after `fall` failed probes in a
//! row, at once: a dead backend must leave the table. It comes back after
//! `rise` passed probes in a row, but not before a hold since it went down
//! has passed: a backend that keeps going down and up would otherwise move
//! its share of the new flows back and forth, resetting the connections it
//! takes each time it dies. The hold starts at [`FLAP_HOLD_MIN`] and doubles,
//! up to [`FLAP_HOLD_MAX`], each time the backend goes down again within
//! `FLAP_HOLD_MAX` of coming back; once it stays up that long, the next fall
//! starts over at `FLAP_HOLD_MIN`. (Counted from its return, not from its
//! previous fall: a fall comes more than a hold after the previous one, so
//! counted from there a hold near `FLAP_HOLD_MAX` would always start over,
//! and a backend flapping without end would never be held the longest.)

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::{Backend, Model, ServiceKey};

/// The least a backend stays down.
pub const FLAP_HOLD_MIN: Duration = Duration::from_secs(10);
/// The most a backend stays down once its probes pass again; also how long
/// it must stay up for its next fall to be held only `FLAP_HOLD_MIN`.
pub const FLAP_HOLD_MAX: Duration = Duration::from_secs(300);

/// Default `interval`.
pub const INTERVAL_DEFAULT: Duration = Duration::from_secs(2);
/// Default `timeout` when `interval` is above 1 s (otherwise half the interval).
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);
/// Default `rise`.
pub const RISE_DEFAULT: u32 = 2;
/// Default `fall`.
pub const FALL_DEFAULT: u32 = 3;
/// Default `status` of an HTTP check.
pub const STATUS_DEFAULT: u16 = 200;
/// Default `path` of an HTTP check.
pub const PATH_DEFAULT: &str = "/";
/// Shortest `interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Largest `rise` and `fall`.
pub const MAX_RISE_FALL: u32 = 100;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckKind {
    /// A TCP connection is established.
    Tcp,
    /// `GET path` answers with this status code.
    Http { path: String, status: u16 },
}

/// A service's health check, the same for each of its backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    pub kind: CheckKind,
    /// TCP port probed (1..=65535).
    pub port: u16,
    /// Time between two probes of one backend.
    pub interval: Duration,
    /// How long a probe may take; less than `interval`.
    pub timeout: Duration,
    /// Passed probes in a row for a down backend to come back.
    pub rise: u32,
    /// Failed probes in a row for an up backend to go down.
    pub fall: u32,
}

impl Check {
    /// A check of `kind` on `port` with the default timing.
    pub fn new(kind: CheckKind, port: u16) -> Self {
        Check {
            kind,
            port,
            interval: INTERVAL_DEFAULT,
            timeout: TIMEOUT_DEFAULT,
            rise: RISE_DEFAULT,
            fall: FALL_DEFAULT,
        }
    }
}

/// One backend of one service, as probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub service: ServiceKey,
    pub backend: IpAddr,
}

impl fmt::Display for Target {
    /// `198.18.0.101 of 203.0.113.10:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.backend, self.service)
    }
}

/// Every backend of every service that has a check (draining ones too:
/// their pinned connections still need a live backend), in the model's
/// order: by service, then by backend address.
pub fn targets(model: &Model) -> Vec<(Target, Check)> {
    let mut out = Vec::new();
    for service in &model.services {
        if let Some(check) = model.health.get(&service.key) {
            for b in &service.backends {
                out.push((Target { service: service.key, backend: b.addr }, check.clone()));
            }
        }
    }
    out
}

/// A backend's state flipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub target: Target,
    /// The new state.
    pub up: bool,
    /// Why, for people: `3 probes failed in a row, the last: connect: ...`.
    pub reason: String,
}

/// What the probes made of one target so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    /// The check in force (from the last `sync`).
    pub check: Check,
    pub up: bool,
    /// When `up` last flipped (or when the target was first seen).
    pub since: Instant,
    /// The last probe's latency, if it passed.
    pub last_latency: Option<Duration>,
    /// The last probe's error, if it failed.
    pub last_error: Option<String>,
    /// Probes passed and failed since the target was first seen.
    pub passed: u64,
    pub failed: u64,
    /// Outcomes in a row against the current state: failures while up,
    /// passes while down.
    pub streak: u32,
    /// How long the backend stays down at least, from its last fall.
    hold: Duration,
    /// When it last went down.
    fell: Option<Instant>,
    /// When it last came back up (not when first seen: a first fall is
    /// held FLAP_HOLD_MIN).
    rose: Option<Instant>,
}

impl TargetState {
    fn new(check: Check, now: Instant) -> Self {
        TargetState {
            check,
            up: true,
            since: now,
            last_latency: None,
            last_error: None,
            passed: 0,
            failed: 0,
            streak: 0,
            hold: FLAP_HOLD_MIN,
            fell: None,
            rose: None,
        }
    }

    /// One probe's outcome; the reason when the state flips.
    fn observe(&mut self, result: Result<Duration, String>, now: Instant) -> Option<String> {
        let passed = result.is_ok();
        match result {
            Ok(latency) => {
                self.passed = self.passed.saturating_add(1);
                (self.last_latency, self.last_error) = (Some(latency), None);
            }
            Err(error) => {
                self.failed = self.failed.saturating_add(1);
                (self.last_latency, self.last_error) = (None, Some(error));
            }
        }
        // A probe that agrees with the state ends the streak against it.
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        if self.up {
            if self.streak < self.check.fall {
                return None;
            }
            // Down at once. Falling again soon after coming back doubles the hold.
            let again = self.rose.is_some_and(|rose| now.saturating_duration_since(rose) < FLAP_HOLD_MAX);
            self.hold = if again { (self.hold * 2).min(FLAP_HOLD_MAX) } else { FLAP_HOLD_MIN };
            self.fell = Some(now);
            let error = self.last_error.as_deref().unwrap_or_default();
            let reason = match self.streak {
                1 => format!("the probe failed: {error}"),
                n => format!("{n} probes failed in a row, the last: {error}"),
            };
            self.flip(false, now);
            return Some(reason);
        }
        let held = self.fell.is_some_and(|fell| now.saturating_duration_since(fell) < self.hold);
        if self.streak < self.check.rise || held {
            return None;
        }
        let mut reason = match self.streak {
            1 => "the probe passed".to_string(),
            n => format!("{n} probes passed in a row"),
        };
        // More than `rise` in a row: the hold kept it down after `rise`.
        if self.streak > self.check.rise {
            reason.push_str(&format!(" (after {} s held down: flapping damped)", self.hold.as_secs()));
        }
        self.rose = Some(now);
        self.flip(true, now);
        Some(reason)
    }

    fn flip(&mut self, up: bool, now: Instant) {
        self.up = up;
        self.since = now;
        self.streak = 0;
    }
}

/// Per-target state of every probed backend.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    states: BTreeMap<Target, TargetState>,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker::default()
    }

    /// Follows a new list of targets (from [`targets`]): those still there
    /// keep their state under their new check, new ones start up (the agent
    /// may restart while the datapath forwards to them: a dead one leaves
    /// after `fall` probes), the others are forgotten.
    pub fn sync(&mut self, targets: &[(Target, Check)], now: Instant) {
        let mut old = std::mem::take(&mut self.states);
        for (target, check) in targets {
            let state = match old.remove(target) {
                Some(state) => TargetState { check: check.clone(), ..state },
                None => TargetState::new(check.clone(), now),
            };
            self.states.insert(*target, state);
        }
    }

    /// One probe's outcome: `Ok(latency)` or `Err(reason)`. Returns the
    /// change when the target's state flips; None for an unknown target.
    pub fn observe(&mut self, target: &Target, result: Result<Duration, String>, now: Instant) -> Option<Change> {
        let state = self.states.get_mut(target)?;
        let reason = state.observe(result, now)?;
        Some(Change { target: *target, up: state.up, reason })
    }

    /// Starts a target not probed yet as down (no flap hold: it comes up
    /// after `rise` passes). For an agent that restarts: a backend of the
    /// file that the running service lacks was most likely taken out by the
    /// agent before; starting it up would put it back until `fall` probes
    /// failed again.
    pub fn start_down(&mut self, target: &Target, now: Instant) {
        if let Some(state) = self.states.get_mut(target).filter(|s| s.passed + s.failed == 0) {
            state.up = false;
            state.since = now;
        }
    }

    /// Whether the target is up; a target not tracked is (nothing says otherwise).
    pub fn is_up(&self, target: &Target) -> bool {
        self.states.get(target).is_none_or(|s| s.up)
    }

    pub fn state(&self, target: &Target) -> Option<&TargetState> {
        self.states.get(target)
    }

    /// Every tracked target, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&Target, &TargetState)> {
        self.states.iter()
    }
}

/// The model to program: `model` with each service's down backends taken
/// out. A service that would be left with no backend taking new flows (none
/// at all, or draining ones only, where it had one) keeps every backend
/// instead: without them its new connections have nowhere to go, with them
/// whatever still answers gets them. Those services' keys are returned (the
/// agent logs them). Services without a check are unchanged.
pub fn effective(model: &Model, tracker: &Tracker) -> (Model, Vec<ServiceKey>) {
    let takes_new_flows = |backends: &[Backend]| backends.iter().any(|b| b.weight > 0);
    let mut out = model.clone();
    let mut kept_whole = Vec::new();
    for service in &mut out.services {
        if !model.health.contains_key(&service.key) {
            continue;
        }
        let key = service.key;
        let up: Vec<Backend> = service
            .backends
            .iter()
            .filter(|b| tracker.is_up(&Target { service: key, backend: b.addr }))
            .copied()
            .collect();
        if up.is_empty() || (takes_new_flows(&service.backends) && !takes_new_flows(&up)) {
            kept_whole.push(key);
        } else {
            service.backends = up;
        }
    }
    (out, kept_whole)
}

/// What the agent publishes for other commands (`l4lb top`): each probed
/// backend's state, in `/run/l4lb-DEV.health.json` (see [`state_file_in`]),
/// written whole (renamed over) at every change and removed when the agent
/// stops. `pid` is the agent's: a file whose agent is gone is stale.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub pid: u32,
    pub backends: Vec<PublishedBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedBackend {
    /// As `ServiceKey` displays it (`203.0.113.10:80/tcp`).
    pub service: String,
    pub backend: IpAddr,
    pub up: bool,
    /// The last probe's error, if it failed.
    pub error: Option<String>,
}

impl Published {
    /// The tracker's state, as agent `pid` publishes it.
    pub fn of(tracker: &Tracker, pid: u32) -> Published {
        let backends = tracker
            .iter()
            .map(|(t, s)| PublishedBackend {
                service: t.service.to_string(),
                backend: t.backend,
                up: s.up,
                error: s.last_error.clone(),
            })
            .collect();
        Published { pid, backends }
    }

    /// Whether `backend` of `service` (displayed) is up, down, or not probed.
    pub fn state(&self, service: &str, backend: IpAddr) -> Option<bool> {
        self.backends.iter().find(|b| b.service == service && b.backend == backend).map(|b| b.up)
    }
}

/// Where the agent of interface `ifname` in this network namespace
/// publishes its health state (see [`state_file_in`]).
pub fn state_file(ifname: &str) -> std::path::PathBuf {
    state_file_in(ifname, crate::iface::other_netns())
}

/// `/run/l4lb-DEV.health.json` in PID 1's network namespace (`netns`
/// None), `/run/l4lb-DEV.netINODE.health.json` in another: /run is shared,
/// and two namespaces may each have a DEV with an agent of its own.
pub fn state_file_in(ifname: &str, netns: Option<u64>) -> std::path::PathBuf {
    match netns {
        None => std::path::PathBuf::from(format!("/run/l4lb-{ifname}.health.json")),
        Some(inode) => std::path::PathBuf::from(format!("/run/l4lb-{ifname}.net{inode}.health.json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_of_one_interface_name_differ_by_network_namespace() {
        assert_eq!(state_file_in("eth0", None), std::path::PathBuf::from("/run/l4lb-eth0.health.json"));
        let (a, b) = (state_file_in("eth0", Some(4026532001)), state_file_in("eth0", Some(4026532002)));
        assert_eq!(a, std::path::PathBuf::from("/run/l4lb-eth0.net4026532001.health.json"));
        assert_ne!(a, b);
    }

    #[test]
    fn a_target_started_down_comes_up_after_rise_passes_without_a_hold() {
        let (target, check) = (
            Target { service: ServiceKey::CatchAll, backend: "192.0.2.1".parse().unwrap() },
            Check::new(CheckKind::Tcp, 80),
        );
        let mut tracker = Tracker::new();
        let t0 = Instant::now();
        tracker.sync(&[(target, check.clone())], t0);
        tracker.start_down(&target, t0);
        assert!(!tracker.is_up(&target));
        assert_eq!(tracker.observe(&target, Ok(Duration::from_millis(1)), t0), None);
        let change = tracker.observe(&target, Ok(Duration::from_millis(1)), t0 + Duration::from_secs(2)).unwrap();
        assert!(change.up, "{change:?}");
        // Only before any probe: a probed target keeps what its probes said.
        tracker.start_down(&target, t0);
        assert!(tracker.is_up(&target));
    }
    use crate::config::{Protocol, Service};

    const REFUSED: &str = "connect: Connection refused";

    fn web() -> ServiceKey {
        ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 }
    }

    fn dns() -> ServiceKey {
        ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Udp, port: 53 }
    }

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    fn target(last: u8) -> Target {
        Target { service: web(), backend: addr(last) }
    }

    fn check(rise: u32, fall: u32) -> Check {
        Check { rise, fall, ..Check::new(CheckKind::Tcp, 80) }
    }

    /// `t0` plus `seconds`.
    fn at(t0: Instant, seconds: u64) -> Instant {
        t0 + Duration::from_secs(seconds)
    }

    fn pass() -> Result<Duration, String> {
        Ok(Duration::from_millis(2))
    }

    fn fail() -> Result<Duration, String> {
        Err(REFUSED.to_string())
    }

    /// A tracker of backends 1..=n of `web()` under `check`, synced at `t0`.
    fn tracker(check: &Check, n: u8, t0: Instant) -> Tracker {
        let mut t = Tracker::new();
        t.sync(&(1..=n).map(|i| (target(i), check.clone())).collect::<Vec<_>>(), t0);
        t
    }

    #[test]
    fn every_target_starts_up() {
        let t0 = Instant::now();
        let t = tracker(&check(2, 3), 2, t0);
        assert!(t.is_up(&target(1)) && t.is_up(&target(2)));
        let s = t.state(&target(1)).unwrap();
        assert_eq!((s.up, s.since, s.passed, s.failed, s.streak), (true, t0, 0, 0, 0));
        assert_eq!((&s.last_latency, &s.last_error), (&None, &None));
        assert_eq!(t.state(&target(3)), None);
        assert!(t.is_up(&target(3)), "a target not tracked is not taken down");
        assert_eq!(t.iter().map(|(target, _)| *target).collect::<Vec<_>>(), [target(1), target(2)]);
    }

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let t0 = Instant::now();
        let mut t = tracker(&check(2, 3), 1, t0);
        let b = target(1);
        assert_eq!(t.observe(&b, fail(), at(t0, 1)), None);
        assert_eq!(t.observe(&b, fail(), at(t0, 2)), None);
        assert_eq!(t.observe(&b, pass(), at(t0, 3)), None, "a pass ends the streak");
        assert_eq!(t.state(&b).unwrap().streak, 0);
        assert_eq!(t.observe(&b, fail(), at(t0, 4)), None);
        assert_eq!(t.observe(&b, fail(), at(t0, 5)), None);
        assert!(t.is_up(&b));
        let change = t.observe(&b, fail(), at(t0, 6));
        assert_eq!(
            change,
            Some(Change { target: b, up: false, reason: format!("3 probes failed in a row, the last: {REFUSED}") })
        );
        assert!(!t.is_up(&b));
        let s = t.state(&b).unwrap();
        assert_eq!((s.since, s.passed, s.failed, s.streak), (at(t0, 6), 1, 5, 0));
        assert_eq!((s.last_latency, s.last_error.as_deref()), (None, Some(REFUSED)));
        // Down stays down on failures: no second change.
        assert_eq!(t.observe(&b, fail(), at(t0, 7)), None);
        // fall = 1: the first failure.
        let mut one = tracker(&check(2, 1), 1, t0);
        let change = one.observe(&b, Err("timeout".into()), at(t0, 1)).unwrap();
        assert_eq!((change.up, change.reason.as_str()), (false, "the probe failed: timeout"));
    }

    #[test]
    fn rises_after_rise_passes_in_a_row() {
        let t0 = Instant::now();
        let mut t = tracker(&check(2, 1), 1, t0);
        let b = target(1);
        assert!(t.observe(&b, fail(), t0).is_some());
        // Once the hold (10 s) is over: pass, fail, pass, pass.
        assert_eq!(t.observe(&b, pass(), at(t0, 11)), None);
        assert_eq!(t.observe(&b, fail(), at(t0, 12)), None, "a failure ends the streak");
        assert_eq!(t.observe(&b, pass(), at(t0, 13)), None);
        let change = t.observe(&b, pass(), at(t0, 14)).unwrap();
        assert_eq!((change.up, change.reason.as_str()), (true, "2 probes passed in a row"));
        let s = t.state(&b).unwrap();
        assert_eq!((s.up, s.since, s.passed, s.failed), (true, at(t0, 14), 3, 2));
        assert_eq!((s.last_latency, &s.last_error), (Some(Duration::from_millis(2)), &None));
        // Up stays up on passes.
        assert_eq!(t.observe(&b, pass(), at(t0, 15)), None);
    }

    #[test]
    fn down_is_never_delayed() {
        let t0 = Instant::now();
        let mut t = tracker(&check(1, 1), 1, t0);
        let b = target(1);
        assert!(t.observe(&b, fail(), t0).is_some_and(|c| !c.up));
        assert!(t.observe(&b, pass(), at(t0, 10)).is_some_and(|c| c.up));
        // Down again a second later, its hold now 20 s: down at once all the same.
        assert!(t.observe(&b, fail(), at(t0, 11)).is_some_and(|c| !c.up));
        assert!(!t.is_up(&b));
    }

    /// Takes `b` down at `down` (fall 1), then passes a probe each second
    /// until it is up: how long it stayed down, and the reason it came up.
    fn flap(t: &mut Tracker, b: &Target, t0: Instant, down: u64) -> (u64, String) {
        assert!(t.observe(b, fail(), at(t0, down)).is_some_and(|c| !c.up));
        for s in 1..=1000 {
            if let Some(change) = t.observe(b, pass(), at(t0, down + s)) {
                assert!(change.up);
                return (s, change.reason);
            }
        }
        panic!("never came back up");
    }

    #[test]
    fn flapping_is_damped() {
        let t0 = Instant::now();
        let mut t = tracker(&check(1, 1), 1, t0);
        let b = target(1);
        let (held, reason) = flap(&mut t, &b, t0, 0);
        assert_eq!(held, 10, "FLAP_HOLD_MIN");
        assert_eq!(reason, "10 probes passed in a row (after 10 s held down: flapping damped)");
        // Each fall within 300 s of coming back doubles the hold, up to 300 s
        // (here 10 s after each return).
        let mut down = 0;
        let mut holds = Vec::new();
        for _ in 0..6 {
            down += 10 + holds.last().copied().unwrap_or(10);
            holds.push(flap(&mut t, &b, t0, down).0);
        }
        assert_eq!(holds, [20, 40, 80, 160, 300, 300]);
        // After 300 s up, back to 10 s.
        let back = down + 300;
        assert_eq!(flap(&mut t, &b, t0, back + 300).0, 10);
        // 299 s up still counts as flapping.
        assert_eq!(flap(&mut t, &b, t0, back + 300 + 10 + 299).0, 20);
    }

    #[test]
    fn a_rise_not_held_back_says_nothing_of_damping() {
        let t0 = Instant::now();
        let mut t = tracker(&Check { interval: Duration::from_secs(60), ..check(2, 1) }, 1, t0);
        let b = target(1);
        assert!(t.observe(&b, fail(), t0).is_some());
        assert_eq!(t.observe(&b, pass(), at(t0, 60)), None);
        assert_eq!(t.observe(&b, pass(), at(t0, 120)).unwrap().reason, "2 probes passed in a row");
        // rise = 1: one pass.
        let mut one = tracker(&check(1, 1), 1, t0);
        assert!(one.observe(&b, fail(), t0).is_some());
        assert_eq!(one.observe(&b, pass(), at(t0, 10)).unwrap().reason, "the probe passed");
    }

    #[test]
    fn sync_keeps_adds_and_forgets() {
        let t0 = Instant::now();
        let mut t = tracker(&check(2, 1), 2, t0);
        assert!(t.observe(&target(1), fail(), at(t0, 1)).is_some());
        let stricter = check(5, 1);
        t.sync(&[(target(1), stricter.clone()), (target(3), stricter.clone())], at(t0, 2));
        let kept = t.state(&target(1)).unwrap();
        assert_eq!(
            (kept.up, kept.since, kept.failed, &kept.check),
            (false, at(t0, 1), 1, &stricter),
            "state kept, new check"
        );
        let added = t.state(&target(3)).unwrap();
        assert_eq!((added.up, added.since, &added.check), (true, at(t0, 2), &stricter));
        assert_eq!(t.state(&target(2)), None, "forgotten");
        assert_eq!(t.observe(&target(2), fail(), at(t0, 3)), None, "a forgotten target is ignored");
        // The new rise applies: five passes once the hold is over.
        for s in 11..15 {
            assert_eq!(t.observe(&target(1), pass(), at(t0, s)), None);
        }
        assert!(t.observe(&target(1), pass(), at(t0, 15)).is_some_and(|c| c.up));
    }

    fn backend(last: u8, weight: u32) -> Backend {
        Backend { addr: addr(last), mac: None, weight }
    }

    /// `web()` with backends 1 to 3 (3 draining) and a check; `dns()`
    /// with backend 1 and none; the catch-all with backend 9 and none.
    fn model() -> Model {
        Model {
            services: vec![
                Service::new(ServiceKey::CatchAll, vec![backend(9, 1)]),
                Service::new(web(), vec![backend(1, 1), backend(2, 1), backend(3, 0)]),
                Service::new(dns(), vec![backend(1, 1)]),
            ],
            health: BTreeMap::from([(web(), check(2, 1))]),
            ..Model::default()
        }
    }

    #[test]
    fn targets_are_the_checked_services_backends_in_order() {
        let mut m = model();
        m.health.insert(dns(), Check::new(CheckKind::Http { path: "/".into(), status: 200 }, 8053));
        let got: Vec<(Target, u16)> = targets(&m).into_iter().map(|(t, c)| (t, c.port)).collect();
        let dns1 = Target { service: dns(), backend: addr(1) };
        assert_eq!(got, [(target(1), 80), (target(2), 80), (target(3), 80), (dns1, 8053)], "draining ones too");
        assert_eq!(targets(&Model { health: BTreeMap::new(), ..m }), []);
    }

    #[test]
    fn effective_takes_down_backends_out() {
        let t0 = Instant::now();
        let m = model();
        let mut t = Tracker::new();
        t.sync(&targets(&m), t0);
        assert_eq!(effective(&m, &t), (m.clone(), vec![]), "all up: unchanged");
        t.observe(&target(2), fail(), t0);
        let (eff, kept) = effective(&m, &t);
        assert_eq!(kept, []);
        assert_eq!(eff.service(&web()).unwrap().backends, [backend(1, 1), backend(3, 0)]);
        assert_eq!(eff.service(&dns()), m.service(&dns()), "no check: unchanged");
        assert_eq!(eff.service(&ServiceKey::CatchAll), m.service(&ServiceKey::CatchAll));
        assert_eq!((&eff.global, &eff.health), (&m.global, &m.health));
        // A draining backend that is down goes too.
        t.observe(&target(3), fail(), t0);
        assert_eq!(effective(&m, &t).0.service(&web()).unwrap().backends, [backend(1, 1)]);
    }

    #[test]
    fn effective_keeps_a_service_whole_rather_than_empty() {
        let t0 = Instant::now();
        let m = model();
        let mut t = Tracker::new();
        t.sync(&targets(&m), t0);
        for i in 1..=3 {
            t.observe(&target(i), fail(), t0);
        }
        assert_eq!(effective(&m, &t), (m.clone(), vec![web()]), "all down: all kept");
        // Only a draining backend up: no backend would take new flows, so all kept too.
        t.observe(&target(3), pass(), at(t0, 10));
        t.observe(&target(3), pass(), at(t0, 11));
        assert!(t.is_up(&target(3)));
        assert_eq!(effective(&m, &t), (m.clone(), vec![web()]));
        // A service drained by its file loses its down backends all the same.
        let mut drained = m.clone();
        drained.services[1].backends = vec![backend(1, 0), backend(2, 0), backend(3, 0)];
        let (eff, kept) = effective(&drained, &t);
        assert_eq!((eff.service(&web()).unwrap().backends.as_slice(), kept), (&[backend(3, 0)][..], vec![]));
    }
}
