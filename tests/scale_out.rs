//! The scale-out lab (`scripts/scale-lab`): a client behind a BGP router
//! (BIRD 2) that spreads the VIPs' flows (an IPv4 and an IPv6 VIP) over
//! several balancers by ECMP; each balancer's agent (`l4lb serve
//! --bird-socket`) announces both while its datapath forwards. Every balancer
//! has the same services and hash seed, so a connection keeps its backend
//! whichever balancer it goes through, also when a balancer leaves (its
//! routes are withdrawn) or comes back, and also in a table transition
//! (docs/transitions.md, rule 3), which this suite measures too.
//!
//! Each test brings up its own lab under the prefix `l4lbt-scale-<pid>-<n>`
//! (state in /run/<prefix>) with the `l4lb` binary cargo built; a guard runs
//! `scripts/scale-lab down` when the test ends, also when it fails. The tests
//! run one at a time. Figures (shares, convergence times, connections moved
//! and broken) go to stderr.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{fail, in_netns, run_with, Outcome, TestResult};

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const SCALE_LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/scale-lab");
/// Prefix of this suite's labs (namespaces `l4lbt-scale-<pid>-<n>-client` ...).
const PREFIX: &str = "l4lbt-scale";
const LAB_TIMEOUT: Duration = Duration::from_secs(120);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
const PORT: u16 = 80;
const CLIENT: &str = "198.18.1.10";
/// The balancers' IPv4 addresses: lbK is SEGMENT.(10+K).
const SEGMENT: &str = "198.18.0.";
/// New HTTP/1.0 connections per round.
const CONNECTIONS: usize = 200;
/// Keep-alive connections watched across a balancer leaving and coming back.
const KEPT: usize = 40;
/// Keep-alive connections to each VIP opened before a table change, and
/// again during the transition it makes.
const TRANSITION_KEPT: usize = 120;
/// Longest wait for both agents to apply a changed file (and, after taking
/// a backend out with a short idle_timeout, for the transition to end).
const APPLY_LIMIT: Duration = Duration::from_secs(60);
/// The backend the transition test takes out and back in (be4's addresses).
const BE4: [&str; 2] = ["198.18.0.104", "2001:db8:18::104"];
/// Least share of the new connections each of 2 balancers must carry.
const MIN_SHARE: f64 = 0.2;
/// Longest wait for the router's route to change.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(20);

/// How long lb2's link stays cut at least: longer than the lab's health
/// checks (interval 1 s, timeout 0.5 s, fall 2, scripts/scale-lab) take to
/// find a backend down, so that probes counted while the link is down would
/// take every backend out of lb2's table (and one at a time, as each one's
/// probe times out, some out before the others).
const CUT_AT_LEAST: Duration = Duration::from_secs(4);

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn main() {
    if common::is_root() {
        remove_leftovers();
    }
    common::run_suite(
        "scale_out",
        "network namespaces, XDP, BIRD and servers in them need root",
        vec![
            ("connections_spread_over_balancers_and_survive_one_leaving", connections_spread_and_survive_one_leaving),
            (
                "a_balancer_link_cut_is_withdrawn_by_bfd_and_connections_keep_their_backend",
                link_cut_is_withdrawn_by_bfd,
            ),
            (
                "connections_moved_by_ecmp_during_a_table_transition_keep_their_backend",
                moved_during_a_transition_keep_their_backend,
            ),
        ],
    );
}

// ---------------------------------------------------------------- the lab

struct Lab {
    prefix: String,
    state: PathBuf,
}

impl Lab {
    fn new() -> Self {
        let prefix = common::lab_prefix(PREFIX);
        let state = PathBuf::from(format!("/run/{prefix}"));
        Lab { prefix, state }
    }

    fn script(&self, args: &[&str]) -> Outcome {
        run_with(SCALE_LAB, args, &[("SCALE_PREFIX", &self.prefix), ("L4LB", BIN)], LAB_TIMEOUT)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Pid of balancer K's agent, from its pid file.
    fn agent_pid(&self, k: usize) -> TestResult<i32> {
        let path = self.state.join(format!("agent-lb{k}.pid"));
        let text = std::fs::read_to_string(&path).map_err(|err| fail(format!("{}: {err}", path.display())))?;
        text.trim().parse().map_err(|_| fail(format!("{}: {text:?} is no pid", path.display())))
    }

    /// Balancer K's agent's log lines of `event` (`... lbK EVENT: ...`).
    fn agent_events(&self, k: usize, event: &str) -> TestResult<Vec<String>> {
        let path = self.state.join(format!("agent-lb{k}.log"));
        let text = std::fs::read_to_string(&path).map_err(|err| fail(format!("{}: {err}", path.display())))?;
        let marker = format!(" lb{k} {event}: ");
        Ok(text.lines().filter(|line| line.contains(&marker)).map(str::to_string).collect())
    }

    /// The router's route to `vip` (`ip route show`).
    fn route(&self, vip: IpAddr) -> TestResult<String> {
        let (family, prefix) = if vip.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        common::ip(&["-n", &self.ns("rt"), family, "route", "show", &format!("{vip}/{prefix}")])
    }

    /// Nexthops of the router's route to `vip` (0: none).
    fn nexthops(&self, vip: IpAddr) -> TestResult<usize> {
        let out = self.route(vip)?;
        if out.trim().is_empty() {
            return Ok(0);
        }
        Ok(out.lines().filter(|line| line.contains("nexthop")).count().max(1))
    }

    /// Waits until the router's routes to both VIPs have `want` nexthops:
    /// the time since `since` until both had.
    fn await_nexthops(&self, want: usize, since: Instant) -> TestResult<Duration> {
        loop {
            if self.nexthops(IpAddr::V4(VIP))? == want && self.nexthops(IpAddr::V6(VIP6))? == want {
                return Ok(since.elapsed());
            }
            if since.elapsed() > CONVERGENCE_LIMIT {
                let (route, route6) = (self.route(IpAddr::V4(VIP))?, self.route(IpAddr::V6(VIP6))?);
                return Err(fail(format!(
                    "the router's routes to {VIP} and {VIP6} have not {want} nexthops each after \
                     {CONVERGENCE_LIMIT:?}: {route:?}, {route6:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Balancer (1-based) the router sends the client's IPv4 flow from
    /// `port` to. IPv4 only: for IPv6, `ip -6 route get ... sport dport`
    /// answered otherwise than the router forwarded (6 connections checked
    /// by the balancers' counters all went through lb2, the command said lb1
    /// for 3 of them), so IPv6 connections are placed by what the balancers
    /// saw (their pins), never by this.
    fn balancer_of(&self, port: u16) -> TestResult<usize> {
        let (vip, port, dport) = (VIP.to_string(), port.to_string(), PORT.to_string());
        let out = common::ip(&[
            "-n",
            &self.ns("rt"),
            "-4",
            "route",
            "get",
            &vip,
            "from",
            CLIENT,
            "iif",
            "rt-client",
            "ipproto",
            "tcp",
            "sport",
            &port,
            "dport",
            &dport,
        ])?;
        let via = out.split_whitespace().skip_while(|w| *w != "via").nth(1).unwrap_or("");
        via.strip_prefix(SEGMENT)
            .and_then(|last| last.parse::<usize>().ok())
            .filter(|last| *last > 10)
            .map(|last| last - 10)
            .ok_or_else(|| fail(format!("`ip route get` names no balancer: {out:?}")))
    }

    /// Balancer K's running services, read from its maps.
    fn running(&self, k: usize) -> TestResult<l4lb::state::Running> {
        let dev = format!("lb{k}");
        in_netns(&self.ns(&format!("lb{k}")), || {
            let iface = l4lb::iface::Interface::by_name(&dev)?;
            let program = l4lb::discover::find_l4lb(&iface)?;
            Ok(l4lb::maps::LbMaps::open(&program)?.read_running()?)
        })
    }

    /// Balancer K's agent configuration file.
    fn config_path(&self, k: usize) -> PathBuf {
        self.state.join(format!("lb-lb{k}.toml"))
    }

    /// Packets balancer K's datapath sent to backends (its per-backend counters).
    fn balanced(&self, k: usize) -> TestResult<u64> {
        let dev = format!("lb{k}");
        in_netns(&self.ns(&format!("lb{k}")), || {
            let iface = l4lb::iface::Interface::by_name(&dev)?;
            let program = l4lb::discover::find_l4lb(&iface)?;
            let maps = l4lb::maps::LbMaps::open(&program)?;
            Ok(maps.read_backend_stats()?.iter().map(|t| t.packets).sum())
        })
    }

    fn all_balanced(&self, n: usize) -> TestResult<Vec<u64>> {
        (1..=n).map(|k| self.balanced(k)).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if out.code != Some(0) {
            eprintln!("scale lab {}: `scripts/scale-lab down` in the guard failed: {}", self.prefix, out.describe());
        }
    }
}

/// Removes labs of earlier runs whose process is gone.
fn remove_leftovers() {
    for prefix in common::dead_labs(PREFIX) {
        let _ = run_with(SCALE_LAB, &["down"], &[("SCALE_PREFIX", &prefix), ("L4LB", BIN)], LAB_TIMEOUT);
    }
}

// ---------------------------------------------------------------- traffic

/// One HTTP/1.0 GET to `vip` on a new connection: (local port, the answer's body).
fn http_get(vip: IpAddr) -> Result<(u16, String), String> {
    common::http::get(SocketAddr::new(vip, PORT), Duration::from_secs(3))
}

/// The answers of new connections, and the errors of those that failed.
type Answers = (Vec<(u16, String)>, Vec<String>);

/// `count` new connections from the client to `vip`: (port, answer) of each, or errors.
fn new_connections(lab: &Lab, vip: IpAddr, count: usize) -> TestResult<Answers> {
    let results = in_netns(&lab.ns("client"), || Ok((0..count).map(|_| http_get(vip)).collect::<Vec<_>>()))?;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(answer) => ok.push(answer),
            Err(err) => errors.push(err),
        }
    }
    Ok((ok, errors))
}

/// One keep-alive connection and the backend that answered it first.
struct Kept {
    stream: BufReader<TcpStream>,
    vip: IpAddr,
    port: u16,
    backend: String,
}

/// One HTTP/1.1 request on a kept connection: the answer's body.
fn kept_request(stream: &mut BufReader<TcpStream>) -> Result<String, String> {
    stream
        .get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {VIP}\r\n\r\n").as_bytes())
        .map_err(|err| format!("send: {err}"))?;
    let mut status = String::new();
    stream.read_line(&mut status).map_err(|err| format!("receive: {err}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {status:?}"));
    }
    let mut length = None;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).map_err(|err| format!("receive header: {err}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length.ok_or("no Content-Length")?];
    stream.read_exact(&mut body).map_err(|err| format!("receive body: {err}"))?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

/// `count` keep-alive connections to `vip`, each asked once.
fn open_kept(lab: &Lab, vip: IpAddr, count: usize) -> TestResult<Vec<Kept>> {
    in_netns(&lab.ns("client"), || {
        let mut kept = Vec::new();
        for _ in 0..count {
            let target = SocketAddr::new(vip, PORT);
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .map_err(|err| fail(format!("kept connection: connect: {err}")))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let port = stream.local_addr()?.port();
            let mut stream = BufReader::new(stream);
            let backend = kept_request(&mut stream).map_err(|err| fail(format!("kept connection {port}: {err}")))?;
            kept.push(Kept { stream, vip, port, backend });
        }
        Ok(kept)
    })
}

/// What a request on a kept connection found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Answered by the backend that answered it first.
    Same,
    /// Answered by another backend (the string names it).
    Other(String),
    /// No answer: the error.
    Broken(String),
}

/// A request on every kept connection, in order.
fn ask_each(kept: &mut [Kept]) -> Vec<Answer> {
    kept.iter_mut()
        .map(|conn| match kept_request(&mut conn.stream) {
            Ok(backend) if backend == conn.backend => Answer::Same,
            Ok(backend) => Answer::Other(backend),
            Err(err) => Answer::Broken(err),
        })
        .collect()
}

/// A request on every kept connection: (how many answered from another
/// backend, how many broke), with the first few problems described.
fn ask_kept(kept: &mut [Kept]) -> (usize, usize, Vec<String>) {
    let (mut moved, mut broke, mut notes) = (0, 0, Vec::new());
    let answers = ask_each(kept);
    for (conn, answer) in kept.iter().zip(answers) {
        match answer {
            Answer::Same => {}
            Answer::Other(backend) => {
                moved += 1;
                notes.push(format!("{} port {}: {} then {backend}", conn.vip, conn.port, conn.backend));
            }
            Answer::Broken(err) => {
                broke += 1;
                notes.push(format!("{} port {}: {err}", conn.vip, conn.port));
            }
        }
    }
    notes.truncate(5);
    (moved, broke, notes)
}

fn deltas(before: &[u64], after: &[u64]) -> Vec<u64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

/// How many of the kept IPv4 connections the router sends to each balancer
/// (see `Lab::balancer_of`).
fn kept_per_balancer(lab: &Lab, kept: &[Kept], n: usize) -> TestResult<Vec<usize>> {
    let mut per = vec![0; n];
    for conn in kept.iter().filter(|conn| conn.vip.is_ipv4()) {
        per[lab.balancer_of(conn.port)? - 1] += 1;
    }
    Ok(per)
}

/// New connections to each VIP: all answered; returns the balancers'
/// packet deltas over both.
fn new_round(lab: &Lab, what: &str, n: usize) -> TestResult<Vec<u64>> {
    let v4 = new_round_to(lab, IpAddr::V4(VIP), what, n)?;
    let v6 = new_round_to(lab, IpAddr::V6(VIP6), what, n)?;
    Ok(v4.iter().zip(&v6).map(|(a, b)| a + b).collect())
}

/// New connections to `vip`: all answered; returns the balancers' packet deltas.
fn new_round_to(lab: &Lab, vip: IpAddr, what: &str, n: usize) -> TestResult<Vec<u64>> {
    let what = format!("{what}, {vip}");
    let before = lab.all_balanced(n)?;
    let (ok, errors) = new_connections(lab, vip, CONNECTIONS)?;
    let after = lab.all_balanced(n)?;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for (_, body) in &ok {
        *per_backend.entry(body.split_whitespace().next().unwrap_or("?").to_string()).or_default() += 1;
    }
    let moved = deltas(&before, &after);
    eprintln!(
        "  {what}: {} of {CONNECTIONS} new connections answered, backends {per_backend:?}, balancer packets {moved:?}",
        ok.len()
    );
    ensure!(
        errors.is_empty(),
        "{what}: {} of {CONNECTIONS} new connections failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    Ok(moved)
}

// ---------------------------------------------------------------- tests

fn up(lab: &Lab, balancers: usize, backends: usize) -> TestResult {
    let started = Instant::now();
    lab.script(&["up", "--balancers", &balancers.to_string(), "--backends", &backends.to_string()]).success()?;
    eprintln!(
        "  scripts/scale-lab up --balancers {balancers} --backends {backends}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let have = lab.nexthops(vip)?;
        ensure!(have == balancers, "after up the router's route to {vip} has {have} nexthops, not {balancers}");
    }
    Ok(())
}

/// Spread over 2 balancers, shares of each for each VIP; the kept
/// connections (KEPT to each VIP).
fn spread_and_keep(lab: &Lab) -> TestResult<Vec<Kept>> {
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let packets = new_round_to(lab, vip, "2 balancers", 2)?;
        let total: u64 = packets.iter().sum();
        let shares: Vec<f64> = packets.iter().map(|p| *p as f64 / total.max(1) as f64).collect();
        eprintln!(
            "  {vip}: shares of the balancers' packets: lb1 {:.1} %, lb2 {:.1} %",
            shares[0] * 100.0,
            shares[1] * 100.0
        );
        for (k, share) in shares.iter().enumerate() {
            ensure!(
                *share >= MIN_SHARE,
                "{vip}: balancer lb{} carried {:.1} % of the packets (< {:.0} %): {packets:?}",
                k + 1,
                share * 100.0,
                MIN_SHARE * 100.0
            );
        }
    }
    let mut kept = open_kept(lab, IpAddr::V4(VIP), KEPT)?;
    kept.extend(open_kept(lab, IpAddr::V6(VIP6), KEPT)?);
    let per = kept_per_balancer(lab, &kept, 2)?;
    let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
    for conn in &kept {
        *backends.entry(conn.backend.split_whitespace().next().unwrap_or("?")).or_default() += 1;
    }
    eprintln!(
        "  {} keep-alive connections open ({KEPT} to each VIP), the IPv4 ones via lb1 {}, via lb2 {} (router's \
         ECMP choice); backends {backends:?}",
        kept.len(),
        per[0],
        per[1]
    );
    Ok(kept)
}

/// Asks every kept connection; none may break or change backend.
fn check_kept(lab: &Lab, kept: &mut [Kept], what: &str) -> TestResult<Vec<u64>> {
    let before = lab.all_balanced(2)?;
    let (moved, broke, notes) = ask_kept(kept);
    let after = lab.all_balanced(2)?;
    let packets = deltas(&before, &after);
    eprintln!("  {what}: kept connections answered by another backend: {moved}, broken: {broke}; balancer packets {packets:?}");
    ensure!(moved == 0 && broke == 0, "{what}: {moved} kept connections changed backend and {broke} broke: {notes:?}");
    Ok(packets)
}

fn connections_spread_and_survive_one_leaving() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    up(&lab, 2, 3)?;
    let mut kept = spread_and_keep(&lab)?;
    let on_lb2 = kept_per_balancer(&lab, &kept, 2)?[1];
    ensure!(on_lb2 > 0, "no kept IPv4 connection goes through lb2: nothing to move");

    // lb2's agent stops: it withdraws the VIP, its datapath stays.
    let pid = lab.agent_pid(2)?;
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .map_err(|err| fail(format!("SIGTERM to the agent {pid}: {err}")))?;
    let withdrawn = lab.await_nexthops(1, t0)?;
    eprintln!(
        "  agent of lb2 stopped (SIGTERM): router's routes to both VIPs down to 1 nexthop after {:.1} ms",
        withdrawn.as_secs_f64() * 1e3
    );
    for _ in 0..100 {
        if !common::runs(pid as u32) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(!common::runs(pid as u32), "the agent {pid} is still running 5 s after SIGTERM");
    let packets = check_kept(&lab, &mut kept, "lb2 withdrawn")?;
    eprintln!("  {on_lb2} of the {KEPT} kept IPv4 connections (and IPv6 ones, not counted) moved from lb2 to lb1 (same table, same backend)");
    ensure!(packets[1] == 0, "lb2 still got {} packets of kept connections after its route was withdrawn", packets[1]);
    ensure!(packets[0] > 0, "lb1 got none of the kept connections' packets");
    let packets = new_round(&lab, "lb2 withdrawn", 2)?;
    ensure!(packets[1] == 0, "lb2 got {} packets of new connections after its route was withdrawn", packets[1]);

    // The agent starts again: it finds its datapath and announces again.
    let t0 = Instant::now();
    lab.script(&["start-agent", "2"]).success()?;
    let back = lab.await_nexthops(2, t0)?;
    eprintln!(
        "  agent of lb2 started again: router's routes back to 2 nexthops after {:.1} ms",
        back.as_secs_f64() * 1e3
    );
    let packets = check_kept(&lab, &mut kept, "lb2 back")?;
    ensure!(packets[1] > 0, "lb2 got none of the kept connections' packets after coming back");
    let packets = new_round(&lab, "lb2 back", 2)?;
    ensure!(packets[1] > 0, "lb2 got no packets of new connections after coming back");
    Ok(())
}

fn link_cut_is_withdrawn_by_bfd() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    up(&lab, 2, 3)?;
    let mut kept = spread_and_keep(&lab)?;
    let lb2 = lab.ns("lb2");

    let t0 = Instant::now();
    common::ip(&["-n", &lb2, "link", "set", "lb2", "down"])?;
    let withdrawn = lab.await_nexthops(1, t0)?;
    eprintln!(
        "  lb2's link cut: router's routes to both VIPs down to 1 nexthop after {:.1} ms (BFD 100 ms x 3)",
        withdrawn.as_secs_f64() * 1e3
    );
    let packets = check_kept(&lab, &mut kept, "lb2 cut off")?;
    ensure!(packets[1] == 0, "lb2 got {} packets while its link was down", packets[1]);
    new_round(&lab, "lb2 cut off", 2)?;
    std::thread::sleep(CUT_AT_LEAST.saturating_sub(t0.elapsed()));

    // Cut off, lb2's agent saw every probe fail, and counted none of them.
    let said = lab.agent_events(2, "link_down")?;
    ensure!(said.len() == 1, "lb2's agent said link_down {} times, not once: {said:?}", said.len());
    let down = lab.agent_events(2, "backend_down")?;
    ensure!(down.is_empty(), "lb2's agent took backends out while its own link was down: {down:?}");
    let cut = t0.elapsed();
    eprintln!("  lb2 cut off for {:.1} s: its agent counted no probe ({})", cut.as_secs_f64(), said[0]);

    let t0 = Instant::now();
    common::ip(&["-n", &lb2, "link", "set", "lb2", "up"])?;
    let back = lab.await_nexthops(2, t0)?;
    eprintln!("  lb2's link up again: router's routes back to 2 nexthops after {:.1} ms", back.as_secs_f64() * 1e3);
    let packets = check_kept(&lab, &mut kept, "lb2 link back")?;
    ensure!(packets[1] > 0, "lb2 got none of the kept connections' packets after its link came back");
    // Its probes count again, and find every backend up.
    while lab.agent_events(2, "link_up")?.is_empty() {
        ensure!(t0.elapsed() < CONVERGENCE_LIMIT, "lb2's agent did not say link_up within {CONVERGENCE_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let down = lab.agent_events(2, "backend_down")?;
    ensure!(down.is_empty(), "lb2's agent took backends out once its link was back: {down:?}");
    Ok(())
}

// ---------------------------------------------------------------- a transition

/// `text` (a balancer's lb-lbK.toml as scripts/scale-lab writes it) without
/// be4's backends and with a 2-second idle_timeout in every service, so that
/// the transition taking be4 out makes ends within seconds.
fn without_be4(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if BE4.iter().any(|addr| line.contains(&format!("address = \"{addr}\""))) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("port = ") {
            out.push_str("idle_timeout = 2\n");
        }
    }
    out
}

/// Waits until both balancers' running services satisfy `ready`.
fn await_running(lab: &Lab, what: &str, ready: impl Fn(&l4lb::state::Running) -> bool) -> TestResult<Duration> {
    let started = Instant::now();
    loop {
        let running = [lab.running(1)?, lab.running(2)?];
        if running.iter().all(&ready) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > APPLY_LIMIT {
            let summary: Vec<String> = running
                .iter()
                .flat_map(|r| &r.services)
                .map(|s| {
                    format!("{}: {} backends, {} slots in transition", s.key, s.backends.len(), s.transitions.len())
                })
                .collect();
            return Err(fail(format!("the balancers are not {what} after {APPLY_LIMIT:?}: {summary:?}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether every service of `running` has `backends` backends and slots in
/// transition (`in_transition`) or none.
fn services_are(running: &l4lb::state::Running, backends: usize, in_transition: bool) -> bool {
    running.services.len() == 2
        && running.services.iter().all(|s| s.backends.len() == backends && s.transitions.is_empty() != in_transition)
}

/// An address as a pin or flow key holds it (16 bytes, family 4 or 6).
fn addr16(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

/// The pins in balancer K's flow table: (VIP, client port) -> the backend
/// the flow is pinned to. Only this lab's client sends, so the VIP and the
/// client port name a connection.
fn pins(lab: &Lab, k: usize) -> TestResult<BTreeMap<(IpAddr, u16), IpAddr>> {
    let dev = format!("lb{k}");
    in_netns(&lab.ns(&format!("lb{k}")), || {
        let iface = l4lb::iface::Interface::by_name(&dev)?;
        let program = l4lb::discover::find_l4lb(&iface)?;
        let map = l4lb::maps::open_flows(&program)?;
        let mut pins = BTreeMap::new();
        l4lb::maps::walk_flows(&map, |key, pin| {
            let ports = key.ports.to_le_bytes();
            let vip = addr16(key.daddr, key.family);
            pins.insert((vip, u16::from_be_bytes([ports[0], ports[1]])), addr16(pin.addr, pin.family));
        })?;
        Ok(pins)
    })
}

/// The lab's name of the backend at `addr` (198.18.0.(100+K) and
/// 2001:db8:18::(100+K) are beK), as its answers begin ("be2 198.18.0.102").
fn backend_name(addr: IpAddr) -> String {
    let text = addr.to_string();
    let last = text.rsplit(['.', ':']).next().and_then(|last| last.parse::<usize>().ok());
    match last {
        Some(last) if last > 100 => format!("be{}", last - 100),
        _ => text,
    }
}

/// The backend name a kept connection was first answered by.
fn first_backend(conn: &Kept) -> &str {
    conn.backend.split_whitespace().next().unwrap_or("?")
}

/// Connections established before a table change that ECMP moves to another
/// balancer during the transition keep their backend there (rule 3: the
/// other balancer never saw them); connections opened during the transition
/// and moved break exactly when their slot is in transition (docs/transitions.md
/// says why). Which connections those are is read from lb2's pins before its
/// link is cut: in a slot in transition every packet pins its flow, in a
/// steady slot none does, so lb2's pins are exactly its connections in
/// changed slots.
fn moved_during_a_transition_keep_their_backend() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    up(&lab, 2, 4)?;
    let original: Vec<String> = (1..=2)
        .map(|k| std::fs::read_to_string(lab.config_path(k)).map_err(|err| fail(format!("lb{k}'s config: {err}"))))
        .collect::<TestResult<_>>()?;

    // be4 out, and its transition over: every slot steady on three backends.
    for (k, text) in (1..=2).zip(&original) {
        std::fs::write(lab.config_path(k), without_be4(text))?;
    }
    let took = await_running(&lab, "on 3 backends with every slot steady", |r| services_are(r, 3, false))?;
    eprintln!("  be4 taken out of both services on both balancers; transition over after {:.1} s", took.as_secs_f64());
    let mut kept = open_kept(&lab, IpAddr::V4(VIP), TRANSITION_KEPT)?;
    kept.extend(open_kept(&lab, IpAddr::V6(VIP6), TRANSITION_KEPT)?);

    // be4 back (idle_timeout back to its default, 300 s): the slots Maglev
    // gives it are in transition on both balancers, alike.
    for (k, text) in (1..=2).zip(&original) {
        std::fs::write(lab.config_path(k), text)?;
    }
    let took = await_running(&lab, "on 4 backends in transition", |r| services_are(r, 4, true))?;
    let (lb1, lb2) = (lab.running(1)?, lab.running(2)?);
    for (a, b) in lb1.services.iter().zip(&lb2.services) {
        ensure!(
            a.table == b.table && a.transitions == b.transitions,
            "lb1 and lb2 hold different tables for {} after the same change",
            a.key
        );
        eprintln!(
            "  be4 back on both balancers after {:.1} s: {} of {} slots of {} in transition",
            took.as_secs_f64(),
            a.transitions.len(),
            a.table.len(),
            a.key
        );
    }
    check_kept(&lab, &mut kept, "after the change")?;
    let mut opened = open_kept(&lab, IpAddr::V4(VIP), TRANSITION_KEPT)?;
    opened.extend(open_kept(&lab, IpAddr::V6(VIP6), TRANSITION_KEPT)?);

    // lb2's connections in changed slots, from its pins: those from before
    // the change are pinned to the backend that answered them (rule 3),
    // those opened since to the one that answered them too (rule 1).
    let on_lb2 = pins(&lab, 2)?;
    let pinned_on_lb2 = |conn: &Kept| -> TestResult<bool> {
        match on_lb2.get(&(conn.vip, conn.port)) {
            None => Ok(false),
            Some(addr) if backend_name(*addr) == first_backend(conn) => Ok(true),
            Some(addr) => Err(fail(format!(
                "{} port {}: answered by {} but pinned to {addr} on lb2",
                conn.vip, conn.port, conn.backend
            ))),
        }
    };
    let mut moved_in_transition = [0, 0];
    for conn in &kept {
        if pinned_on_lb2(conn)? {
            moved_in_transition[usize::from(conn.vip.is_ipv6())] += 1;
        }
    }
    let doomed: Vec<bool> = opened.iter().map(&pinned_on_lb2).collect::<TestResult<_>>()?;
    for (i, family) in ["IPv4", "IPv6"].iter().enumerate() {
        ensure!(
            moved_in_transition[i] > 0,
            "no {family} connection from before the change goes through lb2 in a slot in transition: nothing to test"
        );
    }

    let t0 = Instant::now();
    common::ip(&["-n", &lab.ns("lb2"), "link", "set", "lb2", "down"])?;
    let withdrawn = lab.await_nexthops(1, t0)?;
    eprintln!(
        "  lb2's link cut during the transition: routes to both VIPs down to 1 nexthop after {:.1} ms",
        withdrawn.as_secs_f64() * 1e3
    );

    let (changed, broke, notes) = ask_kept(&mut kept);
    eprintln!(
        "  {} connections from before the change; through lb2 in slots in transition, so moved to lb1 and sent \
         to their previous backend by rule 3 there: {} IPv4, {} IPv6; answered by another backend: {changed}, \
         broken: {broke}",
        kept.len(),
        moved_in_transition[0],
        moved_in_transition[1]
    );
    ensure!(
        changed == 0 && broke == 0,
        "connections from before the change: {changed} changed backend, {broke} broke: {notes:?}"
    );

    let answers = ask_each(&mut opened);
    let predicted = doomed.iter().filter(|d| **d).count();
    let mut surprises = Vec::new();
    for ((conn, answer), doomed) in opened.iter().zip(&answers).zip(&doomed) {
        let expected = if *doomed { matches!(answer, Answer::Broken(_)) } else { *answer == Answer::Same };
        if !expected {
            surprises.push(format!(
                "{} port {} (on {}, pinned on lb2: {doomed}): {answer:?}",
                conn.vip, conn.port, conn.backend
            ));
        }
    }
    let broken = answers.iter().filter(|a| matches!(a, Answer::Broken(_))).count();
    eprintln!(
        "  {} connections opened during the transition: {broken} broke after the move, {predicted} predicted (through \
         lb2 in a slot in transition: pinned on lb2 only, sent to the previous backend by lb1)",
        opened.len()
    );
    surprises.truncate(5);
    ensure!(
        surprises.is_empty(),
        "connections opened during the transition went otherwise than predicted: {surprises:?}"
    );
    Ok(())
}
