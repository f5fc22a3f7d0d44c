//! The scale-out lab (`scripts/scale-lab`): a client behind a BGP router
//! (BIRD 2) that spreads the VIP's flows over several balancers by ECMP; each
//! balancer's agent (`l4lb serve --bird-socket`) announces the VIP while its
//! datapath forwards. Every balancer has the same services and hash seed, so
//! a connection keeps its backend whichever balancer it goes through, also
//! when a balancer leaves (its route is withdrawn) or comes back.
//!
//! Each test brings up its own lab under the prefix `l4lbt-scale-<pid>-<n>`
//! (state in /run/<prefix>) with the `l4lb` binary cargo built; a guard runs
//! `scripts/scale-lab down` when the test ends, also when it fails. The tests
//! run one at a time. Figures (shares, convergence times) go to stderr.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{fail, in_netns, run, run_with, Outcome, TestResult};

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const SCALE_LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/scale-lab");
/// Prefix of this suite's labs (namespaces `l4lbt-scale-<pid>-<n>-client` ...).
const PREFIX: &str = "l4lbt-scale";
const LAB_TIMEOUT: Duration = Duration::from_secs(120);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 80;
const CLIENT: &str = "198.18.1.10";
/// New HTTP/1.0 connections per round.
const CONNECTIONS: usize = 200;
/// Keep-alive connections watched across a balancer leaving and coming back.
const KEPT: usize = 40;
/// Least share of the new connections each of 2 balancers must carry.
const MIN_SHARE: f64 = 0.2;
/// Longest wait for the router's route to change.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(20);

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

    /// Nexthops of the router's route to the VIP (0: none).
    fn nexthops(&self) -> TestResult<usize> {
        let out = common::ip(&["-n", &self.ns("rt"), "route", "show", &format!("{VIP}/32")])?;
        if out.trim().is_empty() {
            return Ok(0);
        }
        Ok(out.lines().filter(|line| line.contains("nexthop")).count().max(1))
    }

    /// Waits until the router's route has `want` nexthops: the time since `since`.
    fn await_nexthops(&self, want: usize, since: Instant) -> TestResult<Duration> {
        loop {
            if self.nexthops()? == want {
                return Ok(since.elapsed());
            }
            if since.elapsed() > CONVERGENCE_LIMIT {
                let route = run("ip", &["-n", &self.ns("rt"), "route", "show", &format!("{VIP}/32")]).stdout;
                return Err(fail(format!(
                    "the router's route to {VIP} has not {want} nexthops after {CONVERGENCE_LIMIT:?}: {route:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Balancer (1-based) the router sends the client's flow from `port` to.
    fn balancer_of(&self, port: u16) -> TestResult<usize> {
        let port = port.to_string();
        let out = common::ip(&[
            "-n",
            &self.ns("rt"),
            "route",
            "get",
            &VIP.to_string(),
            "from",
            CLIENT,
            "iif",
            "rt-client",
            "ipproto",
            "tcp",
            "sport",
            &port,
            "dport",
            &PORT.to_string(),
        ])?;
        let via = out.split_whitespace().skip_while(|w| *w != "via").nth(1).unwrap_or("");
        via.strip_prefix("198.18.0.")
            .and_then(|last| last.parse::<usize>().ok())
            .filter(|last| *last > 10)
            .map(|last| last - 10)
            .ok_or_else(|| fail(format!("`ip route get` names no balancer: {out:?}")))
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

/// One HTTP/1.0 GET to the VIP on a new connection: (local port, the answer's body).
fn http_get() -> Result<(u16, String), String> {
    common::http::get(SocketAddr::new(IpAddr::V4(VIP), PORT), Duration::from_secs(3))
}

/// The answers of new connections, and the errors of those that failed.
type Answers = (Vec<(u16, String)>, Vec<String>);

/// `count` new connections from the client: (port, answer) of each, or errors.
fn new_connections(lab: &Lab, count: usize) -> TestResult<Answers> {
    let results = in_netns(&lab.ns("client"), || Ok((0..count).map(|_| http_get()).collect::<Vec<_>>()))?;
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

fn open_kept(lab: &Lab, count: usize) -> TestResult<Vec<Kept>> {
    in_netns(&lab.ns("client"), || {
        let mut kept = Vec::new();
        for _ in 0..count {
            let target = SocketAddr::new(IpAddr::V4(VIP), PORT);
            let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .map_err(|err| fail(format!("kept connection: connect: {err}")))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let port = stream.local_addr()?.port();
            let mut stream = BufReader::new(stream);
            let backend = kept_request(&mut stream).map_err(|err| fail(format!("kept connection {port}: {err}")))?;
            kept.push(Kept { stream, port, backend });
        }
        Ok(kept)
    })
}

/// A request on every kept connection: (how many answered from another
/// backend, how many broke), with the first few problems described.
fn ask_kept(kept: &mut [Kept]) -> (usize, usize, Vec<String>) {
    let (mut moved, mut broke, mut notes) = (0, 0, Vec::new());
    for conn in kept.iter_mut() {
        match kept_request(&mut conn.stream) {
            Ok(backend) if backend == conn.backend => {}
            Ok(backend) => {
                moved += 1;
                notes.push(format!("port {}: {} then {backend}", conn.port, conn.backend));
            }
            Err(err) => {
                broke += 1;
                notes.push(format!("port {}: {err}", conn.port));
            }
        }
    }
    notes.truncate(5);
    (moved, broke, notes)
}

fn deltas(before: &[u64], after: &[u64]) -> Vec<u64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

/// How many of the kept connections the router sends to each balancer.
fn kept_per_balancer(lab: &Lab, kept: &[Kept], n: usize) -> TestResult<Vec<usize>> {
    let mut per = vec![0; n];
    for conn in kept {
        per[lab.balancer_of(conn.port)? - 1] += 1;
    }
    Ok(per)
}

/// New connections: all answered; returns the balancers' packet deltas.
fn new_round(lab: &Lab, what: &str, n: usize) -> TestResult<Vec<u64>> {
    let before = lab.all_balanced(n)?;
    let (ok, errors) = new_connections(lab, CONNECTIONS)?;
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

fn up(lab: &Lab, balancers: usize) -> TestResult {
    let started = Instant::now();
    lab.script(&["up", "--balancers", &balancers.to_string(), "--backends", "3"]).success()?;
    eprintln!("  scripts/scale-lab up --balancers {balancers} --backends 3: {:.1} s", started.elapsed().as_secs_f64());
    ensure!(lab.nexthops()? == balancers, "after up the router has {} nexthops, not {balancers}", lab.nexthops()?);
    Ok(())
}

/// Spread over 2 balancers, shares of each; the kept connections.
fn spread_and_keep(lab: &Lab) -> TestResult<Vec<Kept>> {
    let packets = new_round(lab, "2 balancers", 2)?;
    let total: u64 = packets.iter().sum();
    let shares: Vec<f64> = packets.iter().map(|p| *p as f64 / total.max(1) as f64).collect();
    eprintln!("  shares of the balancers' packets: lb1 {:.1} %, lb2 {:.1} %", shares[0] * 100.0, shares[1] * 100.0);
    for (k, share) in shares.iter().enumerate() {
        ensure!(
            *share >= MIN_SHARE,
            "balancer lb{} carried {:.1} % of the packets (< {:.0} %): {packets:?}",
            k + 1,
            share * 100.0,
            MIN_SHARE * 100.0
        );
    }
    let kept = open_kept(lab, KEPT)?;
    let per = kept_per_balancer(lab, &kept, 2)?;
    let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
    for conn in &kept {
        *backends.entry(conn.backend.split_whitespace().next().unwrap_or("?")).or_default() += 1;
    }
    eprintln!(
        "  {KEPT} keep-alive connections open: via lb1 {}, via lb2 {} (router's ECMP choice); backends {backends:?}",
        per[0], per[1]
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
    up(&lab, 2)?;
    let mut kept = spread_and_keep(&lab)?;
    let on_lb2 = kept_per_balancer(&lab, &kept, 2)?[1];
    ensure!(on_lb2 > 0, "no kept connection goes through lb2: nothing to move");

    // lb2's agent stops: it withdraws the VIP, its datapath stays.
    let pid = lab.agent_pid(2)?;
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .map_err(|err| fail(format!("SIGTERM to the agent {pid}: {err}")))?;
    let withdrawn = lab.await_nexthops(1, t0)?;
    eprintln!(
        "  agent of lb2 stopped (SIGTERM): router down to 1 nexthop after {:.1} ms",
        withdrawn.as_secs_f64() * 1e3
    );
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent {pid} is still running 5 s after SIGTERM"
    );
    let packets = check_kept(&lab, &mut kept, "lb2 withdrawn")?;
    eprintln!("  {on_lb2} of {KEPT} kept connections moved from lb2 to lb1 (same table, same backend)");
    ensure!(packets[1] == 0, "lb2 still got {} packets of kept connections after its route was withdrawn", packets[1]);
    ensure!(packets[0] > 0, "lb1 got none of the kept connections' packets");
    let packets = new_round(&lab, "lb2 withdrawn", 2)?;
    ensure!(packets[1] == 0, "lb2 got {} packets of new connections after its route was withdrawn", packets[1]);

    // The agent starts again: it finds its datapath and announces again.
    let t0 = Instant::now();
    lab.script(&["start-agent", "2"]).success()?;
    let back = lab.await_nexthops(2, t0)?;
    eprintln!("  agent of lb2 started again: router back to 2 nexthops after {:.1} ms", back.as_secs_f64() * 1e3);
    let packets = check_kept(&lab, &mut kept, "lb2 back")?;
    ensure!(packets[1] > 0, "lb2 got none of the kept connections' packets after coming back");
    let packets = new_round(&lab, "lb2 back", 2)?;
    ensure!(packets[1] > 0, "lb2 got no packets of new connections after coming back");
    Ok(())
}

fn link_cut_is_withdrawn_by_bfd() -> TestResult {
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    up(&lab, 2)?;
    let mut kept = spread_and_keep(&lab)?;
    let lb2 = lab.ns("lb2");

    let t0 = Instant::now();
    common::ip(&["-n", &lb2, "link", "set", "lb2", "down"])?;
    let withdrawn = lab.await_nexthops(1, t0)?;
    eprintln!(
        "  lb2's link cut: router down to 1 nexthop after {:.1} ms (BFD 100 ms x 3)",
        withdrawn.as_secs_f64() * 1e3
    );
    let packets = check_kept(&lab, &mut kept, "lb2 cut off")?;
    ensure!(packets[1] == 0, "lb2 got {} packets while its link was down", packets[1]);
    new_round(&lab, "lb2 cut off", 2)?;

    let t0 = Instant::now();
    common::ip(&["-n", &lb2, "link", "set", "lb2", "up"])?;
    let back = lab.await_nexthops(2, t0)?;
    eprintln!("  lb2's link up again: router back to 2 nexthops after {:.1} ms", back.as_secs_f64() * 1e3);
    let packets = check_kept(&lab, &mut kept, "lb2 link back")?;
    ensure!(packets[1] > 0, "lb2 got none of the kept connections' packets after its link came back");
    Ok(())
}
