//! The agent, `l4lb serve`, as an operator runs it: a real process in the lb
//! namespace of a gen <-> lb veth pair, its JSON log read line by line.
//!
//! * It attaches l4lb, applies the file, applies every change (a file
//!   renamed over the old one, as editors and deployment tools write), and
//!   refuses a bad file with FILE:LINE in its log while the running
//!   configuration stays exactly as it was; SIGHUP applies the file again
//!   and so undoes a change made by hand; SIGTERM stops it with the program
//!   attached and configured; a new agent keeps that program and writes
//!   nothing.
//! * A bad file at the start, or another XDP program on the interface,
//!   stops it before anything is touched.
//! * Forwarding never depends on it: killed with SIGKILL under a flood
//!   (the benchmark's ring of frames) and started again, no frame is dropped (every frame l4lb
//!   received went out, no drop counter moved) and no flow moved (the
//!   program, its services and every table slot are what they were).
//! * A change's transition ends without a person: the agent's sweep ends it
//!   and logs it.
//! * `--metrics`: after a flood, `GET /metrics` passes `promtool check
//!   metrics` and gives every backend's packets and bytes and the datapath's
//!   counters exactly as `l4lb stats` reads them; any other path is a 404.
//! * `l4lb upgrade` under a flood, from the previous commit's datapath
//!   (built from `git archive HEAD~1`) to this binary's: one atomic swap, no
//!   frame dropped, every map kept (same ids: tables, pins, counters, which
//!   go on counting), the running state unchanged; an object whose maps do
//!   not match is refused and nothing changes.
//! * `l4lb top` in a real terminal (tmux): the flood's service and every
//!   backend with rates, the view redrawn to a smaller window, q quits.
//!
//! Each test builds its own namespaces (`l4lbt-agent-<pid>-<n>-gen`, `-lb`)
//! and removes them, agents included, also when a check fails.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::flood::Flood;
use common::veth::{attach_xdp_pass, VethPair, LB_ADDR};
use common::{fail, run, Outcome, TestResult};
use l4lb::bench::frames::{self, Kind};
use l4lb::bpf::COUNTER_NAMES;
use l4lb::state::Running;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const DECAP_OBJECT: &str = env!("L4LB_DECAP_OBJECT");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Namespaces, interfaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt-agent";
/// How long an agent may take to log an expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "agent",
        "network namespaces, XDP and signals to root processes need root",
        vec![
            ("serve_applies_the_file_and_every_change_and_refuses_bad_ones", serve_applies_the_file_and_every_change),
            ("serve_with_a_bad_file_or_a_foreign_program_touches_nothing", serve_refuses_to_start),
            ("killing_the_agent_under_a_flood_drops_no_frame_and_moves_no_flow", kill_under_flood),
            ("the_agents_sweep_ends_transitions", sweep_ends_transitions),
            ("the_metrics_endpoint_serves_what_the_datapath_counted", metrics_endpoint),
            ("upgrade_in_place_under_a_flood_drops_no_frame_and_keeps_the_maps", upgrade_under_flood),
            ("top_in_a_real_terminal_shows_the_flood_and_follows_resizes", top_in_tmux),
            ("the_agent_announces_the_vips_through_bird_while_it_serves", announce_through_bird),
            ("the_link_state_the_probers_read_follows_the_link_and_its_peer", link_state_follows),
        ],
    );
}

// ---------------------------------------------------------------- link state

/// What the health probers read of the balancer's link (probes during
/// which it was down are not counted): up, and a carrier change count that
/// moves when the link is set down, when it comes back, and when its peer
/// (the other end of the cable) goes down.
fn link_state_follows() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    let state = || common::in_netns(&topo.lb, || Ok(l4lb::iface::Interface::by_name(&topo.lb_dev)?.link_state()?));
    let first = state()?;
    ensure!(first.up, "{}: not up after VethPair::new: {first:?}", topo.lb_dev);
    let mut seen = vec![first];
    for (ns, dev, updown, up) in [
        (&topo.lb, &topo.lb_dev, "down", false),
        (&topo.lb, &topo.lb_dev, "up", true),
        (&topo.gen, &topo.gen_dev, "down", false),
        (&topo.gen, &topo.gen_dev, "up", true),
    ] {
        common::ip(&["-n", ns, "link", "set", dev, updown])?;
        let now = state()?;
        let before = seen.last().expect("seen starts with one");
        ensure!(
            now.up == up && now.carrier_changes > before.carrier_changes,
            "after `ip link set {dev} {updown}`: {} is {now:?}, before {before:?}",
            topo.lb_dev
        );
        seen.push(now);
    }
    eprintln!("  {}: {seen:?}", topo.lb_dev);
    Ok(())
}

// ---------------------------------------------------------------- the agent

/// A running `l4lb serve` in the lb namespace, its log going to a file.
/// Dropping it kills it (SIGKILL): the namespaces go right after.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `l4lb serve -i DEV -c FILE --log-format json EXTRA..` and waits
    /// for its `serving` event.
    fn start(topo: &VethPair, config: &Path, log_name: &str, extra: &[&str]) -> TestResult<Agent> {
        let agent = Agent::spawn(topo, config, log_name, extra)?;
        agent.wait_for("serving", |_| true)?;
        Ok(agent)
    }

    fn spawn(topo: &VethPair, config: &Path, log_name: &str, extra: &[&str]) -> TestResult<Agent> {
        let log = topo.dir.join(log_name);
        let stderr = std::fs::File::create(&log)?;
        let config = config.display().to_string();
        let mut args = vec!["netns", "exec", &topo.lb, BIN, "serve", "-i", &topo.lb_dev, "-c", &config];
        args.extend(["--log-format", "json"]);
        args.extend_from_slice(extra);
        // `ip netns exec` execs l4lb: the child's pid is the agent's.
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|err| fail(format!("starting {BIN} serve: {err}")))?;
        Ok(Agent { child, log })
    }

    /// Every line logged so far, each a JSON object. A last line without its
    /// newline is still being written (a write to a file becomes visible page
    /// by page: a reader can catch a line half copied): it is left for the
    /// next read.
    fn events(&self) -> TestResult<Vec<Value>> {
        let text = std::fs::read_to_string(&self.log)?;
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).map_err(|err| fail(format!("log line {line:?} is not JSON: {err}"))))
            .collect()
    }

    /// Waits for the first event named `name` that `matches` (counting from
    /// the start of the log); fails if the agent exits first.
    fn wait_for(&self, name: &str, matches: impl Fn(&Value) -> bool) -> TestResult<Value> {
        self.wait_for_nth(name, 1, matches)
    }

    /// The `n`th event named `name` that `matches`.
    fn wait_for_nth(&self, name: &str, n: usize, matches: impl Fn(&Value) -> bool) -> TestResult<Value> {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let events = self.events()?;
            if let Some(event) = events.iter().filter(|e| e["event"] == name && matches(e)).nth(n - 1) {
                return Ok(event.clone());
            }
            let log = events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
            ensure!(Instant::now() < deadline, "no event `{name}` (#{n}) within {EVENT_TIMEOUT:?}; the log:\n{log}");
            ensure!(
                std::fs::metadata(format!("/proc/{}", self.child.id())).is_ok(),
                "the agent is gone before event `{name}`; the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the agent.
    fn signal(&self, signal: nix::sys::signal::Signal) -> TestResult {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
    }

    /// Waits for the agent to exit; its exit code (None: killed by a signal).
    fn wait_exit(&mut self, timeout: Duration) -> TestResult<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            ensure!(Instant::now() < deadline, "the agent did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- helpers

/// `l4lb ARGS` inside the lb namespace.
fn l4lb(topo: &VethPair, args: &[&str]) -> Outcome {
    let mut full = vec!["netns", "exec", &topo.lb, BIN];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// The running state of the l4lb on the lb veth, read through the library.
fn running(topo: &VethPair) -> TestResult<Running> {
    Ok(l4lb::maps::LbMaps::open(&topo.attached_l4lb()?)?.read_running()?)
}

/// The running state without what the sweep changes on its own (which
/// slots are in transition): what an apply writes. The agent's sweep ends
/// transitions at any moment (`idle_timeout = 1` in these files).
fn configured(topo: &VethPair) -> TestResult<Running> {
    let mut state = running(topo)?;
    for service in &mut state.services {
        service.transitions.clear();
    }
    Ok(state)
}

/// Writes `text` as `name` in the scratch directory the way editors and
/// deployment tools do: a new file renamed over the old one.
fn replace_file(topo: &VethPair, name: &str, text: &str) -> TestResult<PathBuf> {
    let scratch = topo.write_file(&format!(".{name}.new"), text.as_bytes())?;
    let path = topo.dir.join(name);
    std::fs::rename(&scratch, &path)?;
    Ok(path)
}

/// The services of configuration `text` are the running ones (checked on the
/// running configuration read back, so a planner's mistake cannot pass).
fn runs_file(topo: &VethPair, text: &str) -> TestResult {
    let wanted = l4lb::config::parse("wanted", text.as_bytes())?;
    let model = running(topo)?.model();
    ensure!(
        model.services == wanted.services,
        "running services differ from the file's:\n running {:#?}\n file {:#?}",
        model.services,
        wanted.services
    );
    ensure!(model.global.source_v4 == wanted.global.source_v4, "source_v4 {:?}", model.global.source_v4);
    ensure!(model.global.gateway_mac == wanted.global.gateway_mac, "gateway_mac {:?}", model.global.gateway_mac);
    Ok(())
}

/// A configuration: the benchmark's IPv4 VIP (TCP port 80, where the flood
/// goes) with `backends` (198.18.0.<n>, each with its own MAC), idle_timeout 1 s.
fn config_text(backends: &[u8]) -> String {
    config_with_idle_timeout(backends, 1)
}

fn config_with_idle_timeout(backends: &[u8], idle_timeout: u32) -> String {
    let mut text =
        format!("# l4lb agent test\n[global]\nsource_v4 = \"{LB_ADDR}\"\ngateway_mac = \"02:00:00:00:00:01\"\n\n");
    text += &format!("[[service]]\nvip = \"{}\"\nprotocol = \"tcp\"\nport = {}\n", frames::VIP4, frames::TCP_PORT);
    text += &format!("idle_timeout = {idle_timeout}\nbackends = [\n");
    for n in backends {
        text += &format!("  {{ address = \"198.18.0.{n}\", mac = \"02:00:c6:12:00:{n:02x}\" }},\n");
    }
    text + "]\n"
}

/// One `l4lb stats --json` sample's counters.
fn counters(topo: &VethPair) -> TestResult<BTreeMap<String, u64>> {
    let out = l4lb(topo, &["stats", "-i", &topo.lb_dev, "--json", "--count", "1", "--interval", "0.2"]).success()?;
    let line = out.stdout.lines().next().ok_or_else(|| fail(format!("no output: {}", out.describe())))?;
    let sample: Value = serde_json::from_str(line).map_err(|err| fail(format!("{line:?} is not JSON: {err}")))?;
    COUNTER_NAMES
        .iter()
        .map(|&name| {
            let value = sample["counters"][name].as_u64().ok_or_else(|| fail(format!("no `{name}` in {line}")))?;
            Ok((name.to_string(), value))
        })
        .collect()
}

/// The lb veth's XDP programs: (name, id).
fn lb_programs(topo: &VethPair) -> TestResult<Vec<(String, u32)>> {
    common::in_netns(&topo.lb, || {
        let iface = l4lb::iface::Interface::by_name(&topo.lb_dev)?;
        Ok(l4lb::discover::attached_programs(&iface)?.into_iter().map(|p| (p.name, p.id)).collect())
    })
}

// ---------------------------------------------------------------- tests

fn serve_applies_the_file_and_every_change() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    let first = config_text(&[1, 2, 3]);
    let file = replace_file(&topo, "lb.toml", &first)?;
    let mut agent = Agent::start(&topo, &file, "agent1.log", &["--sweep-every", "0.2"])?;
    agent.wait_for("attached", |_| true)?;
    let applied = agent.wait_for("applied", |e| e["cause"] == "start")?;
    ensure!(applied["generation"] == 1, "first apply: {applied}");
    runs_file(&topo, &first)?;
    let program = topo.attached_l4lb()?.id;

    // A change, written the way editors write: applied as generation 2.
    let second = config_text(&[1, 2, 3, 4]);
    replace_file(&topo, "lb.toml", &second)?;
    let applied = agent.wait_for("applied", |e| e["generation"] == 2)?;
    ensure!(applied["cause"] == "file changed", "{applied}");
    let changes = applied["changes"].to_string();
    ensure!(changes.contains("+ 198.18.0.4"), "the change's diff should name the new backend: {applied}");
    runs_file(&topo, &second)?;

    // A bad file: refused with FILE:LINE, the running state exactly kept.
    let before = configured(&topo)?;
    let bad = second.replace("port = 80\n", "port = 80\nprot = 1\n");
    let bad_line = bad.lines().position(|l| l == "prot = 1").expect("inserted") + 1;
    replace_file(&topo, "lb.toml", &bad)?;
    let refused = agent.wait_for("refused", |_| true)?;
    let place = format!("{}:{bad_line}:", file.display());
    ensure!(refused["level"] == "error" && refused["error"].as_str().is_some_and(|e| e.contains(&place)), "{refused}");
    ensure!(configured(&topo)? == before, "a refused file changed the running state");

    // Put back as it was: nothing to write, and the log says it is right again.
    replace_file(&topo, "lb.toml", &second)?;
    let again = agent.wait_for("unchanged", |e| e["message"].as_str().is_some_and(|m| m.contains("again")))?;
    ensure!(again["level"] == "info", "{again}");
    ensure!(configured(&topo)? == before, "putting the applied file back changed the running state");

    // The same bad file again: refused again (once), the running state kept.
    replace_file(&topo, "lb.toml", &bad)?;
    agent.wait_for_nth("refused", 2, |_| true)?;
    // Other files of the directory changing do not make it refuse again.
    topo.write_file("unrelated.txt", b"x")?;
    std::thread::sleep(Duration::from_millis(600));
    let refusals = agent.events()?.iter().filter(|e| e["event"] == "refused").count();
    ensure!(refusals == 2, "{refusals} refusals of two bad writes");
    ensure!(configured(&topo)? == before, "a refused file changed the running state");

    // Fixed again (another change than the last applied): applied.
    let third = config_text(&[2, 3, 4]);
    replace_file(&topo, "lb.toml", &third)?;
    agent.wait_for("applied", |e| e["generation"] == 3)?;
    runs_file(&topo, &third)?;

    // A change by hand; SIGHUP puts the file's configuration back.
    let by_hand = topo.write_file("by-hand.toml", config_text(&[9]).as_bytes())?;
    l4lb(&topo, &["apply", "-i", &topo.lb_dev, "-c", &by_hand.display().to_string()]).success()?;
    runs_file(&topo, &config_text(&[9]))?;
    agent.signal(nix::sys::signal::Signal::SIGHUP)?;
    let applied = agent.wait_for("applied", |e| e["generation"] == 4)?;
    ensure!(applied["cause"] == "SIGHUP", "{applied}");
    runs_file(&topo, &third)?;

    // SIGTERM: exits 0, the program stays attached and configured.
    let before = configured(&topo)?;
    agent.signal(nix::sys::signal::Signal::SIGTERM)?;
    ensure!(agent.wait_exit(Duration::from_secs(10))? == Some(0), "the agent should exit 0 on SIGTERM");
    agent.wait_for("stopping", |_| true)?;
    ensure!(topo.attached_l4lb()?.id == program, "the program changed");
    ensure!(configured(&topo)? == before, "stopping the agent changed the running state");

    // A new agent keeps the program and writes nothing.
    let again = Agent::start(&topo, &file, "agent2.log", &[])?;
    again.wait_for("kept", |e| e["program_id"] == program)?;
    again.wait_for("unchanged", |e| e["cause"] == "start")?;
    ensure!(again.events()?.iter().all(|e| e["event"] != "applied" && e["event"] != "attached"), "wrote something");
    ensure!(configured(&topo)? == before, "a restarted agent changed the running state");
    println!("agent: applied 4 generations (start, a renamed file, a fixed file, SIGHUP), refused a bad file at line {bad_line}, stopped on SIGTERM, kept program {program} on restart");
    Ok(())
}

fn serve_refuses_to_start() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    // A file that does not validate: exit 1 with FILE:LINE, nothing attached.
    let bad = config_text(&[1]).replace("protocol = \"tcp\"", "protocol = \"sctp\"");
    let bad_line = bad.lines().position(|l| l.starts_with("protocol")).expect("present") + 1;
    let file = replace_file(&topo, "bad.toml", &bad)?;
    let mut agent = Agent::spawn(&topo, &file, "bad.log", &[])?;
    ensure!(agent.wait_exit(Duration::from_secs(10))? == Some(1), "a bad file at the start must exit 1");
    let log = std::fs::read_to_string(&agent.log)?;
    ensure!(log.contains(&format!("l4lb: error: {}:{bad_line}:", file.display())), "expected FILE:LINE: {log}");
    ensure!(lb_programs(&topo)?.is_empty(), "something was attached: {:?}", lb_programs(&topo)?);

    // Another XDP program: refused, left attached.
    attach_xdp_pass(&topo.lb, &topo.lb_dev)?;
    let before = lb_programs(&topo)?;
    ensure!(before.len() == 1 && before[0].0 == "l4lbt_pass", "the XDP_PASS program is not attached: {before:?}");
    let good = replace_file(&topo, "good.toml", &config_text(&[1]))?;
    let mut agent = Agent::spawn(&topo, &good, "foreign.log", &[])?;
    ensure!(agent.wait_exit(Duration::from_secs(10))? == Some(1), "a foreign program must stop the agent");
    let log = std::fs::read_to_string(&agent.log)?;
    ensure!(log.contains("not l4lb") && log.contains("detach the other program first"), "{log}");
    ensure!(lb_programs(&topo)? == before, "the foreign program was touched");
    println!("agent: refused a bad file (line {bad_line}) and a foreign program {before:?}, touching nothing");
    Ok(())
}

fn kill_under_flood() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    let text = config_text(&(1..=16).collect::<Vec<u8>>());
    let file = replace_file(&topo, "lb.toml", &text)?;
    let agent = Agent::start(&topo, &file, "agent1.log", &["--sweep-every", "0.2"])?;
    let program = topo.attached_l4lb()?.id;
    let before = running(&topo)?;
    let mut flood = Flood::start(&topo, &[Kind::TcpSyn64])?;
    let counted_before = counters(&topo)?;

    std::thread::sleep(Duration::from_millis(500));
    drop(agent); // SIGKILL
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Agent::start(&topo, &file, "agent2.log", &["--sweep-every", "0.2"])?;
    restarted.wait_for("kept", |e| e["program_id"] == program)?;
    restarted.wait_for("unchanged", |_| true)?;
    std::thread::sleep(Duration::from_millis(500));
    let ran = flood.stop()?;
    let sent = flood.sent();
    std::thread::sleep(Duration::from_millis(200));
    let counted = counters(&topo)?;

    let delta = |name: &str| counted[name] - counted_before[name];
    let drops: Vec<String> = COUNTER_NAMES
        .iter()
        .filter(|name| name.starts_with("drop_") && counted[**name] != 0)
        .map(|name| format!("{name} {}", counted[*name]))
        .collect();
    ensure!(drops.is_empty(), "frames were dropped: {}", drops.join(", "));
    let accounted = counted["tx"] + counted["pass"] + counted["pass_no_service"];
    ensure!(
        counted["rx"] == accounted,
        "rx {} but tx + pass + pass_no_service {accounted}: frames lost",
        counted["rx"]
    );
    ensure!(
        delta("tx") * 100 >= delta("rx") * 99,
        "tx {} of rx {}: the flood was not forwarded",
        delta("tx"),
        delta("rx")
    );
    ensure!(delta("rx") > 100_000, "only {} frames during the test", delta("rx"));
    ensure!(topo.attached_l4lb()?.id == program, "the program changed");
    ensure!(running(&topo)? == before, "the services or tables changed: flows moved");
    ensure!(restarted.events()?.iter().all(|e| e["event"] != "applied"), "the restarted agent wrote");
    println!(
        "agent: SIGKILL and restart under a flood of {sent} frames in {ran:.1?}: l4lb received {} and sent {} during the test, 0 dropped, program {program} and its tables unchanged",
        delta("rx"),
        delta("tx")
    );
    Ok(())
}

fn sweep_ends_transitions() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    // idle_timeout 3 s: the sweep ends the transition 2 to 3 s after the
    // change (the clock ticks in seconds), long after it is read here.
    let file = replace_file(&topo, "lb.toml", &config_with_idle_timeout(&[1, 2, 3], 3))?;
    let agent = Agent::start(&topo, &file, "agent.log", &["--sweep-every", "0.2"])?;
    // A fourth backend takes slots of the three: those go in transition (no
    // flow holds a pin).
    replace_file(&topo, "lb.toml", &config_with_idle_timeout(&[1, 2, 3, 4], 3))?;
    agent.wait_for("applied", |e| e["generation"] == 2)?;
    let in_transition = running(&topo)?.services[0].transitions.len();
    ensure!(in_transition > 0, "the change put no slot in transition");
    let ended = agent.wait_for("transition_ended", |_| true)?;
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !running(&topo)?.services[0].transitions.is_empty() {
        ensure!(Instant::now() < deadline, "slots still in transition: {ended}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let service = format!("{}:{}/tcp", frames::VIP4, frames::TCP_PORT);
    ensure!(ended["service"] == service.as_str() && ended["slots_ended"].as_u64() > Some(0), "{ended}");
    println!("agent: {in_transition} slots in transition after a change, ended by the agent's sweep: {ended}");
    Ok(())
}

/// `GET PATH` to 127.0.0.1:PORT inside the lb namespace: (status, body).
fn http_get(topo: &VethPair, port: u16, path: &str) -> TestResult<(u16, String)> {
    let response = common::in_netns(&topo.lb, || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?;
    let (head, body) =
        response.split_once("\r\n\r\n").ok_or_else(|| fail(format!("no HTTP header end: {response}")))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Ok((status.ok_or_else(|| fail(format!("no status in {head:?}")))?, body.to_string()))
}

/// The value of the series `name{labels}` (exactly as written) in an exposition.
fn series(text: &str, name_and_labels: &str) -> TestResult<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
        .ok_or_else(|| fail(format!("no series {name_and_labels} in:\n{text}")))
}

fn metrics_endpoint() -> TestResult {
    const PORT: u16 = 9469;
    let topo = VethPair::new(PREFIX, true)?;
    run("ip", &["-n", &topo.lb, "link", "set", "dev", "lo", "up"]).success()?;
    let text = config_text(&[1, 2, 3, 4]);
    let file = replace_file(&topo, "lb.toml", &text)?;
    let agent = Agent::start(&topo, &file, "agent.log", &["--metrics", &PORT.to_string()])?;
    let serving = agent.wait_for("serving", |_| true)?;
    ensure!(serving["metrics"] == format!("http://127.0.0.1:{PORT}/metrics"), "{serving}");
    let mut flood = Flood::start(&topo, &[Kind::TcpSyn64])?;
    std::thread::sleep(Duration::from_millis(500));
    flood.stop()?;
    std::thread::sleep(Duration::from_millis(200));

    let (status, exposition) = http_get(&topo, PORT, "/metrics")?;
    ensure!(status == 200, "GET /metrics: {status}: {exposition}");
    let checked = topo.write_file("metrics.txt", exposition.as_bytes())?;
    let promtool = run("sh", &["-c", &format!("promtool check metrics < {}", checked.display())]);
    ensure!(promtool.code == Some(0), "promtool check metrics: {}", promtool.describe());

    let out = l4lb(&topo, &["stats", "-i", &topo.lb_dev, "--json", "--count", "1", "--interval", "0.1"]).success()?;
    let sample: Value = serde_json::from_str(out.stdout.lines().next().unwrap_or(""))
        .map_err(|err| fail(format!("stats --json: {err}: {}", out.describe())))?;
    let service = format!("{}:{}/tcp", frames::VIP4, frames::TCP_PORT);
    let mut compared = 0;
    for backend in sample["services"][0]["backends"].as_array().ok_or_else(|| fail(format!("{sample}")))? {
        let labels = format!("{{service=\"{service}\",backend=\"{}\"}}", backend["addr"].as_str().unwrap_or(""));
        for what in ["packets", "bytes"] {
            let exported = series(&exposition, &format!("l4lb_backend_{what}_total{labels}"))?;
            ensure!(Some(exported) == backend[what].as_u64(), "{what} of {labels}: {exported} exported, {backend}");
        }
        ensure!(backend["packets"].as_u64() > Some(1000), "backend {backend} got almost nothing of the flood");
        compared += 1;
    }
    ensure!(compared == 4, "{compared} backends in {sample}");
    for (counter, series_name) in [("rx", "l4lb_received_packets_total"), ("tx", "l4lb_forwarded_packets_total")] {
        let exported = series(&exposition, series_name)?;
        ensure!(Some(exported) == sample["counters"][counter].as_u64(), "{series_name} {exported}: {sample}");
    }
    ensure!(series(&exposition, "l4lb_applies_total{result=\"applied\"}")? == 1, "{exposition}");
    ensure!(series(&exposition, "l4lb_config_generation")? == 1, "{exposition}");
    let (status, _) = http_get(&topo, PORT, "/")?;
    ensure!(status == 404, "GET / answered {status}");
    println!(
        "agent: /metrics passed promtool; {compared} backends' packets and bytes and rx {} / tx {} as `l4lb stats` read them",
        sample["counters"]["rx"],
        sample["counters"]["tx"]
    );
    Ok(())
}

/// The previous commit's datapath, driver build (what `l4lb attach` of that
/// commit loads), built with its own Makefile rule into `dir`; None (said)
/// when this clone has no previous commit.
fn previous_commit_object(dir: &Path) -> TestResult<Option<PathBuf>> {
    let rev = run("git", &["-C", REPO, "rev-parse", "--short", "HEAD~1"]);
    if rev.code != Some(0) {
        println!("note: this clone has no commit before HEAD: the upgrade starts from this commit's datapath");
        return Ok(None);
    }
    let rev = rev.stdout.trim().to_string();
    let tree = dir.join(format!("l4lb-{rev}"));
    std::fs::create_dir_all(&tree)?;
    let archive = format!("git -C {REPO} archive {rev} Makefile src/bpf include | tar -x -C {}", tree.display());
    run("sh", &["-c", &archive]).success()?;
    let object = tree.join("l4lb_xdp_percpu.o");
    let build = [
        "--no-print-directory".to_string(),
        "-C".into(),
        tree.display().to_string(),
        "BPF_EXTRA_CFLAGS=-DL4LB_DRIVER_BUILD".into(),
        format!("BPF_OBJ={}", object.display()),
        object.display().to_string(),
    ];
    run("make", &build.iter().map(String::as_str).collect::<Vec<_>>()).success()?;
    println!("upgrade: the previous commit {rev}'s datapath built");
    Ok(Some(object))
}

fn upgrade_under_flood() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    l4lb(&topo, &["attach", "-i", &topo.lb_dev]).success()?;
    // Slots in transition, so that the flood's SYNs pin flows.
    for (name, backends) in [("a.toml", &[1u8, 2, 3][..]), ("b.toml", &[1, 2, 3, 4][..])] {
        let file = topo.write_file(name, config_text(backends).as_bytes())?;
        l4lb(&topo, &["apply", "-i", &topo.lb_dev, "-c", &file.display().to_string()]).success()?;
    }
    let first = topo.attached_l4lb()?;
    let upgrade = |object: Option<&Path>| {
        let mut args = vec!["upgrade".to_string(), "-i".into(), topo.lb_dev.clone()];
        if let Some(object) = object {
            args.extend(["--object".to_string(), object.display().to_string()]);
        }
        l4lb(&topo, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Start from the previous commit's datapath, on the same maps.
    if let Some(previous) = previous_commit_object(&topo.dir)? {
        upgrade(Some(&previous)).success()?;
    }
    let sorted = |mut ids: Vec<u32>| {
        ids.sort_unstable();
        ids
    };
    let old = topo.attached_l4lb()?;
    ensure!(
        sorted(old.map_ids.clone()) == sorted(first.map_ids.clone()),
        "the maps changed: {:?} -> {:?}",
        first.map_ids,
        old.map_ids
    );

    let mut flood = Flood::start(&topo, &[Kind::TcpSyn64])?;
    std::thread::sleep(Duration::from_millis(300));
    let before = counters(&topo)?;
    let state = running(&topo)?;
    let out = upgrade(None).success()?;
    let upgraded = counters(&topo)?;
    // Counting goes on through the new program: 300 ms of flood after the
    // replace. (Not after `during`: the flood may send nothing between that
    // read and its stop, which once failed a clean-clone run.)
    std::thread::sleep(Duration::from_millis(300));
    let during = counters(&topo)?;
    flood.stop()?;
    std::thread::sleep(Duration::from_millis(200));
    let after = counters(&topo)?;

    let new = topo.attached_l4lb()?;
    ensure!(new.id != old.id, "the program was not replaced: {}", out.describe());
    ensure!(
        sorted(new.map_ids.clone()) == sorted(old.map_ids.clone()),
        "the maps were not kept: {:?} -> {:?}",
        old.map_ids,
        new.map_ids
    );
    ensure!(running(&topo)? == state, "the running state changed");
    let drops: Vec<String> = COUNTER_NAMES
        .iter()
        .filter(|name| name.starts_with("drop_") && after[**name] != 0)
        .map(|name| format!("{name} {}", after[*name]))
        .collect();
    ensure!(drops.is_empty(), "frames were dropped: {}", drops.join(", "));
    let accounted = after["tx"] + after["pass"] + after["pass_no_service"];
    ensure!(after["rx"] == accounted, "rx {} but tx + pass + pass_no_service {accounted}", after["rx"]);
    ensure!(
        upgraded["rx"] >= before["rx"] && during["rx"] > upgraded["rx"] && after["rx"] >= during["rx"],
        "the counters did not go on counting: rx {} before the upgrade, {} right after it, {} 300 ms later, {} at the end",
        before["rx"],
        upgraded["rx"],
        during["rx"],
        after["rx"]
    );
    ensure!(after["flow_pinned"] > before["flow_pinned"], "no pin after the upgrade: {after:?}");

    // An object without l4lb's maps: refused, nothing changed.
    let refused = upgrade(Some(Path::new(DECAP_OBJECT)));
    ensure!(
        refused.code == Some(1) && refused.stderr.contains("the map layouts are incompatible"),
        "{}",
        refused.describe()
    );
    ensure!(topo.attached_l4lb()?.id == new.id, "a refused upgrade replaced the program");
    println!(
        "upgrade: program {} -> {} under a flood ({} frames received meanwhile, {} pins made), 0 dropped, maps {:?} kept",
        old.id,
        new.id,
        after["rx"] - before["rx"],
        after["flow_pinned"] - before["flow_pinned"],
        new.map_ids
    );
    Ok(())
}

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Outcome {
        let mut full = vec!["-L", &self.socket];
        full.extend_from_slice(args);
        run("tmux", &full)
    }

    /// The visible screen of session `name`.
    fn screen(&self, name: &str) -> TestResult<String> {
        Ok(self.run(&["capture-pane", "-p", "-t", name]).success()?.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Waits until `screen()` satisfies `ready`; returns that screen.
fn wait_screen(tmux: &Tmux, name: &str, ready: impl Fn(&str) -> bool) -> TestResult<String> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let screen = tmux.screen(name)?;
        if ready(&screen) {
            return Ok(screen);
        }
        ensure!(Instant::now() < deadline, "the screen never showed what was expected:\n{screen}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn top_in_tmux() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    l4lb(&topo, &["attach", "-i", &topo.lb_dev]).success()?;
    let file = topo.write_file("lb.toml", config_text(&[1, 2, 3]).as_bytes())?;
    l4lb(&topo, &["apply", "-i", &topo.lb_dev, "-c", &file.display().to_string()]).success()?;
    let tmux = Tmux { socket: format!("{PREFIX}-{}", std::process::id()) };
    let command = format!("ip netns exec {} {BIN} top -i {} --interval 0.5", topo.lb, topo.lb_dev);
    tmux.run(&["new-session", "-d", "-s", "top", "-x", "120", "-y", "30", &command]).success()?;
    let mut flood = Flood::start(&topo, &[Kind::TcpSyn64])?;

    let service = format!("{}:{}/tcp", frames::VIP4, frames::TCP_PORT);
    // A line of the service with a non-zero rate, and every backend's.
    let busy = |screen: &str| {
        let rated = |start: &str| {
            screen
                .lines()
                .any(|l| l.trim_start().starts_with(start) && l.split_whitespace().nth(2).is_some_and(|r| r != "0"))
        };
        rated(&service) && (1..=3).all(|n| rated(&format!("198.18.0.{n} ")))
    };
    let wide = wait_screen(&tmux, "top", busy)?;
    ensure!(wide.contains(&format!("l4lb top: {}", topo.lb_dev)) && wide.contains("Drops: none"), "{wide}");
    ensure!(wide.contains('█'), "no sparkline:\n{wide}");

    tmux.run(&["resize-window", "-t", "top", "-x", "72", "-y", "20"]).success()?;
    let narrow = wait_screen(&tmux, "top", |s| s.lines().count() <= 20 && busy(s))?;
    ensure!(narrow.lines().all(|l| l.chars().count() <= 72), "wider than the window:\n{narrow}");
    flood.stop()?;

    tmux.run(&["send-keys", "-t", "top", "q"]).success()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.run(&["has-session", "-t", "top"]).code == Some(0) {
        ensure!(Instant::now() < deadline, "l4lb top did not quit on q:\n{}", tmux.screen("top")?);
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("top: 120x30 then 72x20, the flood's service and its 3 backends with rates; q quit it\n{narrow}");
    Ok(())
}

// ---------------------------------------------------------------- BGP

/// A BIRD daemon in the lb namespace (its own config, socket and pid file
/// in the scratch directory), stopped on drop.
struct BirdDaemon {
    socket: PathBuf,
    pid_file: PathBuf,
}

impl BirdDaemon {
    /// BIRD with the VIPs' static protocol `l4lb_vips`, disabled, as the
    /// agent expects to find it.
    fn start(topo: &VethPair) -> TestResult<BirdDaemon> {
        let config = topo.dir.join("bird.conf");
        std::fs::write(
            &config,
            format!(
                "router id 198.18.0.2;\nprotocol device {{ }}\nprotocol static l4lb_vips {{\n  disabled;\n  ipv4;\n  route {}/32 blackhole;\n}}\n",
                frames::VIP4
            ),
        )?;
        let (socket, pid_file) = (topo.dir.join("bird.ctl"), topo.dir.join("bird.pid"));
        let (c, s, p) = (config.display().to_string(), socket.display().to_string(), pid_file.display().to_string());
        run("ip", &["netns", "exec", &topo.lb, "bird", "-c", &c, "-s", &s, "-P", &p]).success()?;
        Ok(BirdDaemon { socket, pid_file })
    }

    /// `birdc show protocols l4lb_vips`: the protocol's state column (`up` or `down`).
    fn state(&self) -> TestResult<String> {
        let out =
            run("birdc", &["-s", &self.socket.display().to_string(), "show", "protocols", "l4lb_vips"]).success()?;
        let line = out.stdout.lines().find(|l| l.starts_with("l4lb_vips")).ok_or_else(|| fail(out.stdout.clone()))?;
        Ok(line.split_whitespace().nth(3).unwrap_or_default().to_string())
    }
}

impl Drop for BirdDaemon {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let _ = run("kill", &[pid.trim()]);
        }
    }
}

/// With `--bird-socket`, a real BIRD's protocol holding the VIPs (disabled
/// in its config) is enabled once the agent has attached and applied, and
/// disabled again when the agent stops (SIGTERM); the agent logs both.
fn announce_through_bird() -> TestResult {
    let topo = VethPair::new(PREFIX, true)?;
    let bird = BirdDaemon::start(&topo)?;
    ensure!(bird.state()? == "down", "the protocol should start disabled");
    let file = replace_file(&topo, "lb.toml", &config_text(&[1, 2]))?;
    let socket = bird.socket.display().to_string();
    let mut agent =
        Agent::start(&topo, &file, "agent.log", &["--bird-socket", &socket, "--bird-protocol", "l4lb_vips"])?;
    let announced = agent.wait_for("announced", |_| true)?;
    ensure!(bird.state()? == "up", "announced, but the protocol is not up: {announced}");
    agent.signal(nix::sys::signal::Signal::SIGTERM)?;
    ensure!(agent.wait_exit(EVENT_TIMEOUT)? == Some(0), "the agent did not exit cleanly");
    let events = agent.events()?;
    let withdrawn = events
        .iter()
        .find(|e| e["event"] == "withdrawn")
        .ok_or_else(|| fail(format!("no `withdrawn` in {events:?}")))?;
    ensure!(bird.state()? == "down", "the agent stopped, but the protocol is still up: {withdrawn}");
    println!("agent: BIRD protocol l4lb_vips: {}; then {}", announced["message"], withdrawn["message"]);
    Ok(())
}
