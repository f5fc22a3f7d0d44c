//! Table updates under load: the README's claim that a valid `l4lb map`
//! update never lets traffic meet a half-written table, checked with live
//! traffic.
//!
//! Two namespaces, gen and lb, are joined by a veth pair; `l4lb attach`
//! (driver mode) runs on the lb end. A live-frame generator (the benchmark's
//! `bench_gen`, run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES in a
//! thread inside the gen namespace, pinned to one CPU) floods the lb end with
//! 64-byte TCP SYN and UDP frames from random client addresses and ports for
//! the whole test; the benchmark's `bench_sink` on the gen end counts and drops
//! what l4lb sends back (a veth accepts its peer's XDP_TX frames only when it
//! runs an XDP program). Meanwhile `l4lb map` runs, as a process in the lb
//! namespace, on the other CPU(s):
//!
//! * 100 updates cycling through destination sets of 1 to 64 destinations
//!   (overlapping sets, additions and removals in one update, MAC changes,
//!   full replacements, the same file again). Each must exit 0; the counters
//!   are sampled around each one (frames must arrive during every update, and
//!   no drop counter may move); after each, the kernel's table (read through
//!   the library) must be exactly `table::plan`'s target computed from the
//!   previous kernel state, every slot must lead to an active destination of
//!   the new set with the file's MAC, slot counts must differ by at most one,
//!   and the slots of a destination that stays must stay with it unless its
//!   share shrank (and then it keeps a subset of them).
//! * Two `l4lb map` processes started at the same moment with different
//!   files, 10 times: both succeed, and the final table and both processes'
//!   summary lines are exactly those of one order of the two updates (each
//!   planned against the other's finished table), never a mix.
//!
//! After the flood stops, `l4lb stats --json` must show rx = tx + pass, every
//! drop counter 0 (`drop_no_backend` above all), and more than 100,000 frames.
//! The figures (frames, update times, counters) are printed.
//!
//! Namespaces are `l4lbt-<pid>-u<n>-gen` / `-lb`; a guard deletes them (and
//! with them the veth and its XDP programs) even when an assertion fails. The
//! two tests take a lock so that their floods never share the CPUs.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fail, in_netns, ip, link_mac, TestResult};
use l4lb::bench::frames::{self, Endpoints, Kind};
use l4lb::bpf::{COUNTER_NAMES, TABLE_SIZE};
use l4lb::destinations::Destination;
use l4lb::maps::LbMaps;
use libbpf_rs::MapCore;
use l4lb::table::{self, TableState};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const BENCH_OBJECT: &str = env!("L4LB_BENCH_OBJECT");
/// Namespaces, interfaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt";
const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Updates under the flood in the main test.
const UPDATES: usize = 100;
/// Rounds of two concurrent `l4lb map` processes.
const CONCURRENT_ROUNDS: usize = 10;
/// Destinations the sets are drawn from (a full replacement of 64 needs 128).
const POOL: usize = 160;
const MAX_SET: usize = 64;
/// Frames per live test_run call of the generator (a few ms of traffic).
const LIVE_BATCH: u32 = 1 << 14;
/// The generator stops by itself after this, whatever happens.
const FLOOD_LIMIT: Duration = Duration::from_secs(50);
/// How long one `l4lb` process may take.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);
/// The flood must have delivered more than this.
const MIN_FRAMES: u64 = 100_000;

/// The floods of the two tests must not share the CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "under_load",
        "network namespaces, XDP and live-frame traffic need root",
        vec![
            ("hundred_map_updates_under_flood_never_expose_a_half_written_table", hundred_map_updates_under_flood),
            ("concurrent_map_processes_are_serialised_under_flood", concurrent_map_processes_are_serialised),
        ],
    );
}

// ---------------------------------------------------------------- topology

/// gen (192.0.2.1/24) <-> lb (192.0.2.2/24, l4lb attached in driver mode);
/// deleting the namespaces on drop removes the veth and every XDP program.
struct Topology {
    gen: String,
    lb: String,
    gen_dev: String,
    lb_dev: String,
    gen_mac: [u8; 6],
    lb_mac: [u8; 6],
    /// Scratch directory for destination files.
    dir: PathBuf,
}

impl Topology {
    fn new() -> TestResult<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}-{}-u{n}", std::process::id());
        let mut topo = Topology {
            gen: format!("{base}-gen"),
            lb: format!("{base}-lb"),
            gen_dev: format!("{PREFIX}-u{n}g"),
            lb_dev: format!("{PREFIX}-u{n}l"),
            gen_mac: [0; 6],
            lb_mac: [0; 6],
            dir: std::env::temp_dir().join(&base),
        };
        // From here on the guard exists: a failure below still cleans up.
        std::fs::create_dir_all(&topo.dir)?;
        for ns in [&topo.gen, &topo.lb] {
            ip(&["netns", "add", ns])?;
            // No IPv6: no router solicitations or MLD reports among the counters.
            common::run("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
                .success()?;
        }
        let (gen, lb, gen_dev, lb_dev) = (&topo.gen, &topo.lb, &topo.gen_dev, &topo.lb_dev);
        ip(&["-n", gen, "link", "add", gen_dev, "type", "veth", "peer", "name", lb_dev, "netns", lb])?;
        ip(&["-n", gen, "addr", "add", &format!("{GEN_ADDR}/24"), "dev", gen_dev])?;
        ip(&["-n", lb, "addr", "add", &format!("{LB_ADDR}/24"), "dev", lb_dev])?;
        ip(&["-n", gen, "link", "set", "dev", gen_dev, "up"])?;
        ip(&["-n", lb, "link", "set", "dev", lb_dev, "up"])?;
        topo.gen_mac = link_mac(gen, gen_dev)?;
        topo.lb_mac = link_mac(lb, lb_dev)?;
        topo.l4lb(&["attach", "-i", lb_dev])?.success()?;
        Ok(topo)
    }

    /// Starts `l4lb ARGS` processes in the lb namespace one right after the
    /// other and waits for all of them (each child is forked by a thread that
    /// entered the namespace, so no `ip netns exec` sits in the timings).
    fn l4lb_many(&self, commands: &[Vec<String>]) -> TestResult<Vec<Run>> {
        in_netns(&self.lb, || {
            let mut children = Vec::new();
            for args in commands {
                let started = Instant::now();
                let child = Command::new(BIN)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|err| fail(format!("starting {BIN}: {err}")))?;
                children.push((args.join(" "), started, child));
            }
            let mut runs = Vec::new();
            for (what, started, mut child) in children {
                let code = loop {
                    match child.try_wait()? {
                        Some(status) => break status.code(),
                        None if started.elapsed() < PROCESS_TIMEOUT => std::thread::sleep(Duration::from_micros(200)),
                        None => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break None;
                        }
                    }
                };
                let elapsed = started.elapsed();
                let output = child.wait_with_output()?;
                runs.push(Run {
                    what: format!("l4lb {what}"),
                    code,
                    elapsed,
                    stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
            Ok(runs)
        })
    }

    fn l4lb(&self, args: &[&str]) -> TestResult<Run> {
        let mut runs = self.l4lb_many(&[args.iter().map(|a| a.to_string()).collect()])?;
        Ok(runs.remove(0))
    }

    /// `l4lb map -i DEV -f FILE` arguments for a file written now.
    fn map_args(&self, name: &str, set: &[Destination]) -> TestResult<Vec<String>> {
        let path = self.dir.join(name);
        std::fs::write(&path, destination_file(set))?;
        Ok(vec!["map".into(), "-i".into(), self.lb_dev.clone(), "-f".into(), path.display().to_string()])
    }

    /// Discovers the l4lb program on the lb veth through the library, in a
    /// thread inside the lb namespace, and opens its maps. The handles work
    /// from any thread afterwards.
    fn open_maps(&self) -> TestResult<LbMaps> {
        in_netns(&self.lb, || {
            let iface = l4lb::iface::Interface::by_name(&self.lb_dev)?;
            let program = l4lb::discover::find_l4lb(&iface)?;
            Ok(LbMaps::open(&program)?)
        })
    }

    /// The table as the datapath sees it, found afresh through the library.
    fn kernel_table(&self) -> TestResult<TableState> {
        let maps = self.open_maps()?;
        Ok(maps.read_table()?)
    }

    /// One `l4lb stats --json` sample's counters.
    fn stats_counters(&self) -> TestResult<BTreeMap<String, u64>> {
        let run = self.l4lb(&["stats", "-i", &self.lb_dev, "--json", "--count", "1", "--interval", "0.2"])?.success()?;
        let line = run.stdout.lines().next().ok_or_else(|| fail(format!("no output from {}", run.what)))?;
        let sample: Value = serde_json::from_str(line).map_err(|err| fail(format!("stats line {line:?} is not JSON: {err}")))?;
        let counters = sample["counters"].as_object().ok_or_else(|| fail(format!("no counters in {line}")))?;
        let mut out = BTreeMap::new();
        for name in COUNTER_NAMES {
            let value = counters.get(&name.to_string()).and_then(Value::as_u64).ok_or_else(|| fail(format!("no counter `{name}` in {line}")))?;
            out.insert(name.to_string(), value);
        }
        Ok(out)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gen, &self.lb] {
            let _ = common::run("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A finished `l4lb` process.
struct Run {
    what: String,
    /// None: killed after PROCESS_TIMEOUT.
    code: Option<i32>,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Run {
    fn success(self) -> TestResult<Self> {
        ensure!(
            self.code == Some(0),
            "`{}` exited with {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.code,
            self.elapsed,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

// ---------------------------------------------------------------- the flood

/// The live-frame generator and the sink, from the benchmark's object. Drop
/// stops the generator thread (before the object's programs go).
struct Flood {
    stop: Arc<AtomicBool>,
    /// Frames the generator has sent (whole test_run calls).
    sent: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    sink_cnt: RawFd,
    started: Instant,
    stopped: Option<Duration>,
    // Last: dropped after the thread is joined.
    _object: libbpf_rs::Object,
}

impl Flood {
    /// Loads bench_gen and bench_sink, attaches the sink to the gen veth
    /// (driver mode), parks the generator on the gen namespace's loopback
    /// (generic mode: it then stays in the kernel's XDP dispatcher, so a live
    /// test_run call does not wait for an RCU grace period) and starts the
    /// generator thread on the last CPU this process may use.
    fn start(topo: &Topology) -> TestResult<Self> {
        let mut open = libbpf_rs::ObjectBuilder::default()
            .open_file(BENCH_OBJECT)
            .map_err(|err| fail(format!("opening {BENCH_OBJECT}: {err}")))?;
        for mut prog in open.progs_mut() {
            let wanted = matches!(prog.name().to_str(), Some("bench_gen" | "bench_sink"));
            prog.set_autoload(wanted);
        }
        let object = open.load().map_err(|err| fail(format!("loading {BENCH_OBJECT}: {err}")))?;
        let prog_fd = |name: &str| -> TestResult<RawFd> {
            object
                .progs()
                .find(|p| p.name() == name)
                .map(|p| p.as_fd().as_raw_fd())
                .ok_or_else(|| fail(format!("{BENCH_OBJECT} has no program {name}")))
        };
        let map_fd = |name: &str, value_size: Option<usize>| -> TestResult<RawFd> {
            let map = object.maps().find(|m| m.name() == name).ok_or_else(|| fail(format!("{BENCH_OBJECT} has no map {name}")))?;
            if let Some(size) = value_size {
                ensure!(map.value_size() as usize == size, "map {name} has value size {}, expected {size}", map.value_size());
            }
            Ok(map.as_fd().as_raw_fd())
        };
        let (gen, sink) = (prog_fd("bench_gen")?, prog_fd("bench_sink")?);
        let gen_cfg = map_fd("bench_gen_cfg", Some(16 + frames::TEMPLATE_LEN))?;
        let sink_cnt = map_fd("bench_sink_cnt", None)?;

        let gen_ifindex = in_netns(&topo.gen, || {
            let index = nix::net::if_::if_nametoindex(topo.gen_dev.as_str())?;
            xdp_attach(index, sink, libbpf_sys::XDP_FLAGS_DRV_MODE)?;
            xdp_attach(nix::net::if_::if_nametoindex("lo")?, gen, libbpf_sys::XDP_FLAGS_SKB_MODE)?;
            Ok(index)
        })?;

        let ends = Endpoints { src_mac: topo.gen_mac, dst_mac: topo.lb_mac, vip: VIP };
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        let gen_cpu = (0..nix::sched::CpuSet::count()).rfind(|&cpu| cpus.is_set(cpu).unwrap_or(false)).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let ns = topo.gen.clone();
        let thread = {
            let (stop, sent, error) = (stop.clone(), sent.clone(), error.clone());
            std::thread::spawn(move || {
                if let Err(err) = generate(&ns, gen_cpu, gen, gen_cfg, gen_ifindex, &ends, &stop, &sent) {
                    *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                }
            })
        };
        let flood = Flood { stop, sent, error, thread: Some(thread), sink_cnt, started: Instant::now(), stopped: None, _object: object };
        // The first frames must be under way before anything is measured.
        let deadline = Instant::now() + Duration::from_secs(5);
        while flood.sent.load(Ordering::SeqCst) == 0 {
            flood.check()?;
            ensure!(Instant::now() < deadline, "the generator sent nothing within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(flood)
    }

    /// Fails when the generator thread failed or stopped early.
    fn check(&self) -> TestResult {
        if let Some(err) = self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(fail(format!("generator: {err}")));
        }
        ensure!(self.stopped.is_some() || !self.thread.as_ref().is_some_and(|t| t.is_finished()), "the generator stopped early");
        Ok(())
    }

    /// Stops the generator and waits for it; returns how long it ran.
    fn stop(&mut self) -> TestResult<Duration> {
        self.check()?;
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let ran = *self.stopped.get_or_insert(self.started.elapsed());
        if let Some(err) = self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(fail(format!("generator: {err}")));
        }
        Ok(ran)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Frames l4lb sent back that reached the sink on the gen veth.
    fn sunk(&self) -> TestResult<u64> {
        let cpus = libbpf_rs::num_possible_cpus()?;
        let mut values = vec![0u64; cpus];
        let key = 0u32;
        // SAFETY: values holds one u64 per possible CPU, as the kernel writes for a per-CPU array.
        let rc = unsafe { libbpf_sys::bpf_map_lookup_elem(self.sink_cnt, (&key as *const u32).cast(), values.as_mut_ptr().cast()) };
        ensure!(rc == 0, "reading the sink's counter: {}", std::io::Error::last_os_error());
        Ok(values.iter().sum())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn xdp_attach(ifindex: u32, prog: RawFd, flags: u32) -> TestResult {
    // SAFETY: plain syscall wrapper with a valid fd, null options.
    let rc = unsafe { libbpf_sys::bpf_xdp_attach(ifindex as i32, prog, flags, std::ptr::null()) };
    ensure!(rc == 0, "attaching an XDP program to ifindex {ifindex}: {}", std::io::Error::from_raw_os_error(-rc));
    Ok(())
}

/// The generator thread: enters the gen namespace, pins itself to `cpu`, and
/// sends LIVE_BATCH frames per live test_run call out of the gen veth,
/// TCP SYN and UDP in turn, until told to stop (or FLOOD_LIMIT passed).
#[allow(clippy::too_many_arguments)]
fn generate(
    ns: &str,
    cpu: usize,
    prog: RawFd,
    cfg: RawFd,
    ifindex: u32,
    ends: &Endpoints,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), String> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|err| format!("/run/netns/{ns}: {err}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|err| format!("setns {ns}: {err}"))?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|err| format!("CPU {cpu}: {err}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|err| format!("pinning to CPU {cpu}: {err}"))?;
    let kinds = [Kind::TcpSyn64, Kind::Udp64];
    let configs: Vec<(Vec<u8>, Vec<u8>)> = kinds
        .iter()
        .map(|&kind| {
            let mut value = Vec::with_capacity(16 + frames::TEMPLATE_LEN);
            value.extend_from_slice(&(kind.ip_header_len() as u32).to_ne_bytes());
            value.extend_from_slice(&u32::from(kind.is_udp()).to_ne_bytes());
            value.extend_from_slice(&[0u8; 8]);
            value.extend_from_slice(&frames::template(kind, ends));
            (value, frames::frame(kind, ends, Ipv4Addr::UNSPECIFIED, 0))
        })
        .collect();
    let deadline = Instant::now() + FLOOD_LIMIT;
    let mut turn = 0;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let (value, data) = &configs[turn % configs.len()];
        turn += 1;
        let key = 0u32;
        // SAFETY: key and value have the map's sizes (checked when loading).
        let rc = unsafe { libbpf_sys::bpf_map_update_elem(cfg, (&key as *const u32).cast(), value.as_ptr().cast(), 0) };
        if rc != 0 {
            return Err(format!("writing the generator's configuration: {}", std::io::Error::last_os_error()));
        }
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let ctx: [u32; 6] = [0, data.len() as u32, 0, ifindex, 0, 0];
        // SAFETY: plain C struct; all-zero is its documented default.
        let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
        opts.data_in = data.as_ptr().cast();
        opts.data_size_in = data.len() as u32;
        opts.ctx_in = ctx.as_ptr().cast();
        opts.ctx_size_in = std::mem::size_of_val(&ctx) as u32;
        opts.repeat = LIVE_BATCH as i32;
        opts.flags = 2; // BPF_F_TEST_XDP_LIVE_FRAMES
        // SAFETY: every pointer in opts is valid for the sizes given, for the call.
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog, &mut opts) };
        match rc {
            0 => {
                sent.fetch_add(u64::from(LIVE_BATCH), Ordering::SeqCst);
            }
            rc if -rc == nix::libc::EINTR => {}
            rc => return Err(format!("live test_run of the generator: {}", std::io::Error::from_raw_os_error(-rc))),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- destinations

/// The pool's destination `i` with MAC generation `generation`.
fn destination(i: usize, generation: u8) -> Destination {
    Destination { addr: Ipv4Addr::new(10, 77, (i / 200) as u8, (i % 200 + 1) as u8), mac: [0x02, 0x4c, 0x34, generation, 0, i as u8] }
}

/// A destination file: a comment, then `IP, MAC` rows (with a blank line).
fn destination_file(set: &[Destination]) -> String {
    let mut text = String::from("# l4lb under_load test\n");
    for (i, d) in set.iter().enumerate() {
        let [a, b, c, e, f, g] = d.mac;
        let _ = writeln!(text, "{}{}, {a:02x}:{b:02x}:{c:02x}:{e:02x}:{f:02x}:{g:02x}", if i == 1 { "\n" } else { "" }, d.addr);
    }
    text
}

/// Draws destination sets from the pool: each from the one before.
struct Sets {
    rng: rand::rngs::StdRng,
    /// MAC generation per pool index.
    generation: Vec<u8>,
}

/// What kind of change an update makes (for the printed summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    /// Some destinations kept, some removed and/or added.
    Overlap,
    /// The same, and some of the kept destinations' MACs changed.
    OverlapMac,
    /// Every destination replaced.
    Replace,
    /// Same destinations, some MACs changed.
    MacOnly,
    /// The same file again.
    Same,
}

impl Sets {
    fn new(seed: u64) -> Self {
        Sets { rng: rand::rngs::StdRng::seed_from_u64(seed), generation: vec![0; POOL] }
    }

    fn index_of(d: &Destination) -> usize {
        let [_, _, hi, lo] = d.addr.octets();
        usize::from(hi) * 200 + usize::from(lo) - 1
    }

    fn make(&self, indices: &[usize]) -> Vec<Destination> {
        indices.iter().map(|&i| destination(i, self.generation[i])).collect()
    }

    /// A set of `size` destinations, none of them in `avoid`.
    fn fresh(&mut self, size: usize, avoid: &BTreeSet<usize>) -> Vec<usize> {
        let free: Vec<usize> = (0..POOL).filter(|i| !avoid.contains(i)).collect();
        free.choose_multiple(&mut self.rng, size).copied().collect()
    }

    /// The next set after `previous` for update `k` (1-based), and what changed.
    fn next(&mut self, previous: &[Destination], k: usize) -> (Vec<Destination>, Change) {
        let prev: Vec<usize> = previous.iter().map(Self::index_of).collect();
        let prev_set: BTreeSet<usize> = prev.iter().copied().collect();
        let (mut indices, change) = if k.is_multiple_of(10) {
            let size = if k.is_multiple_of(20) { MAX_SET } else { self.rng.gen_range(1..=MAX_SET) };
            (self.fresh(size, &prev_set), Change::Replace)
        } else if k % 25 == 12 {
            let mut same = prev.clone();
            let changes = self.rng.gen_range(1..=same.len().min(4));
            for &i in same.choose_multiple(&mut self.rng, changes) {
                self.generation[i] = self.generation[i].wrapping_add(1);
            }
            same.shuffle(&mut self.rng);
            (same, Change::MacOnly)
        } else if k == 55 {
            (prev.clone(), Change::Same)
        } else {
            // Target size: the extremes now and then, else anything from 1 to 64.
            let size = match k {
                3 | 41 | 77 => 1,
                4 | 42 | 78 => MAX_SET,
                _ => self.rng.gen_range(1..=MAX_SET),
            };
            let most_kept = size.min(prev.len());
            // Keep most, but drop a few so that additions and removals mix.
            let kept_n = most_kept.saturating_sub(self.rng.gen_range(0..=most_kept.min(3))).max(usize::from(size > 1 && prev.len() > 1));
            let mut kept: Vec<usize> = prev.choose_multiple(&mut self.rng, kept_n).copied().collect();
            let mac_change = k % 7 == 3 && !kept.is_empty();
            if mac_change {
                let changes = self.rng.gen_range(1..=kept.len().min(3));
                for &i in kept.choose_multiple(&mut self.rng, changes) {
                    self.generation[i] = self.generation[i].wrapping_add(1);
                }
            }
            let added = self.fresh(size - kept.len(), &prev_set);
            kept.extend(added);
            kept.shuffle(&mut self.rng);
            (kept, if mac_change { Change::OverlapMac } else { Change::Overlap })
        };
        indices.shuffle(&mut self.rng);
        (self.make(&indices), change)
    }
}

// ---------------------------------------------------------------- checks

/// Checks the kernel's table after an update from `before` to `set`:
/// identical to the plan's target, every slot on an active destination of the
/// set (with the file's MAC), even counts, staying destinations' slots kept.
fn check_table(what: &str, before: &TableState, set: &[Destination], after: &TableState) -> TestResult {
    let plan = table::plan(before, set);
    if plan.target != *after {
        let slots = (0..after.slots.len()).filter(|&s| plan.target.slots[s] != after.slots[s]).count();
        let backends: Vec<usize> = (0..after.backends.len()).filter(|&n| plan.target.backends[n] != after.backends[n]).collect();
        return Err(fail(format!(
            "{what}: the kernel's table is not the plan's target: {slots} slots and backend entries {backends:?} differ"
        )));
    }
    let wanted: HashMap<Ipv4Addr, [u8; 6]> = set.iter().map(|d| (d.addr, d.mac)).collect();
    let active: Vec<(usize, Destination)> = after.backends.iter().enumerate().filter_map(|(n, b)| b.map(|b| (n, b))).collect();
    ensure!(active.len() == set.len(), "{what}: {} active backend entries for {} destinations", active.len(), set.len());
    for (n, d) in &active {
        ensure!(wanted.get(&d.addr) == Some(&d.mac), "{what}: backend entry {n} holds {d}, which is not in the file");
    }
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for slot in 0..after.slots.len() {
        let (number, d) = after.slot_backend(slot).ok_or_else(|| fail(format!("{what}: slot {slot} leads to no active destination")))?;
        ensure!(wanted.get(&d.addr) == Some(&d.mac), "{what}: slot {slot} leads to {d}, not in the file");
        *counts.entry(number).or_default() += 1;
    }
    ensure!(counts.len() == set.len(), "{what}: {} destinations have slots, {} listed", counts.len(), set.len());
    let (min, max) = (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
    ensure!(max - min <= 1, "{what}: slot counts range from {min} to {max}");
    ensure!(min == TABLE_SIZE / set.len(), "{what}: smallest share {min}, expected {}", TABLE_SIZE / set.len());

    // Destinations that stay keep their number and their slots, unless their
    // share shrank; then they keep a subset of their old slots.
    let old_counts = before.slot_counts();
    for (number, d) in before.backends.iter().enumerate().filter_map(|(n, b)| b.map(|b| (n, b))) {
        if old_counts[number] == 0 || !wanted.contains_key(&d.addr) {
            continue;
        }
        let new_number = active.iter().find(|(_, a)| a.addr == d.addr).map(|(n, _)| *n);
        ensure!(new_number == Some(number), "{what}: {} moved from backend {number} to {new_number:?}", d.addr);
        let number = number as u32;
        let old_count = old_counts[number as usize];
        let new_count = counts[&number];
        let lost = (0..before.slots.len()).filter(|&s| before.slots[s] == number && after.slots[s] != number).count();
        let gained = (0..before.slots.len()).filter(|&s| before.slots[s] != number && after.slots[s] == number).count();
        if new_count >= old_count {
            ensure!(lost == 0, "{what}: {} lost {lost} of its {old_count} slots although its share grew to {new_count}", d.addr);
        } else {
            ensure!(gained == 0, "{what}: {} gained {gained} slots although its share shrank from {old_count} to {new_count}", d.addr);
        }
    }
    Ok(())
}

/// The drop counters that are not 0, as "name value".
/// The table that two updates planned against the same `state` leave when
/// `b`'s writes land after all of `a`'s (what the lock prevents).
fn unserialised(state: &TableState, a: &[Destination], b: &[Destination]) -> TableState {
    let mut table = table::plan(state, a).target;
    let plan = table::plan(state, b);
    for (number, d) in &plan.backend_writes {
        table.backends[*number as usize] = Some(*d);
    }
    for &(slot, number) in &plan.slot_writes {
        table.slots[slot as usize] = number;
    }
    for &number in &plan.backend_clears {
        table.backends[number as usize] = None;
    }
    table
}

fn nonzero_drops(counters: &[u64]) -> Vec<String> {
    COUNTER_NAMES
        .iter()
        .zip(counters)
        .filter(|(name, value)| name.starts_with("drop_") && **value > 0)
        .map(|(name, value)| format!("{name} {value}"))
        .collect()
}

fn counter(counters: &[u64], name: &str) -> u64 {
    COUNTER_NAMES.iter().position(|n| *n == name).map_or(0, |i| counters[i])
}

/// After the flood: rx = tx + pass, no drop, and enough frames.
fn check_final_counters(topo: &Topology) -> TestResult<BTreeMap<String, u64>> {
    let counters = topo.stats_counters()?;
    let (rx, tx, pass) = (counters["rx"], counters["tx"], counters["pass"]);
    let drops: Vec<String> = counters.iter().filter(|(n, v)| n.starts_with("drop_") && **v > 0).map(|(n, v)| format!("{n} {v}")).collect();
    ensure!(drops.is_empty(), "drop counters moved under load: {}", drops.join(", "));
    ensure!(rx == tx + pass, "rx {rx} != tx {tx} + pass {pass}");
    ensure!(rx > MIN_FRAMES, "only {rx} frames reached l4lb (expected more than {MIN_FRAMES})");
    Ok(counters)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "min / median / max" of durations, in ms.
fn summary(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = if sorted.len() % 2 == 1 {
        ms(sorted[sorted.len() / 2])
    } else {
        (ms(sorted[sorted.len() / 2 - 1]) + ms(sorted[sorted.len() / 2])) / 2.0
    };
    format!("min {:.1} ms, median {median:.1} ms, max {:.1} ms", ms(sorted[0]), ms(sorted[sorted.len() - 1]))
}

fn seed() -> u64 {
    std::env::var("UNDER_LOAD_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- tests

fn hundred_map_updates_under_flood() -> TestResult {
    let _serial = serial();
    let seed = seed();
    println!("under_load: destination sets from seed {seed} (UNDER_LOAD_SEED={seed} repeats them)");
    let topo = Topology::new()?;
    let mut sets = Sets::new(seed);

    // The first fill, before the flood: frames must never meet an empty table.
    let first = sets.fresh(32, &BTreeSet::new());
    let mut set: Vec<Destination> = sets.make(&first);
    let empty = topo.kernel_table()?;
    topo.l4lb_many(&[topo.map_args("initial.csv", &set)?])?.remove(0).success()?;
    let mut state = topo.kernel_table()?;
    check_table("initial fill", &empty, &set, &state)?;
    let maps = topo.open_maps()?;

    let mut flood = Flood::start(&topo)?;
    let mut times = Vec::new();
    let mut during = Vec::new();
    let mut sizes = Vec::new();
    let mut kinds: BTreeMap<Change, usize> = BTreeMap::new();
    let mut slots_written = 0usize;
    let updates_started = Instant::now();
    let rx_at_start = counter(&maps.read_counters()?, "rx");
    for k in 1..=UPDATES {
        let (next, change) = sets.next(&set, k);
        let what = format!("update {k} ({change:?}, {} -> {} destinations)", set.len(), next.len());
        let args = topo.map_args(&format!("update-{k}.csv"), &next)?;
        flood.check()?;
        let before = maps.read_counters()?;
        let run = topo.l4lb_many(&[args])?.remove(0);
        let after = maps.read_counters()?;
        let run = Run { what: format!("{what}: {}", run.what), ..run }.success()?;
        let drops = nonzero_drops(&after);
        ensure!(drops.is_empty(), "{what}: drop counters moved: {}", drops.join(", "));
        let frames = counter(&after, "rx") - counter(&before, "rx");
        ensure!(frames > 0, "{what}: no frame reached l4lb while `l4lb map` ran ({:?})", run.elapsed);

        let next_state = topo.kernel_table()?;
        check_table(&what, &state, &next, &next_state)?;
        slots_written += table::plan(&state, &next).slot_writes.len();
        times.push(run.elapsed);
        during.push(frames);
        sizes.push(next.len());
        *kinds.entry(change).or_default() += 1;
        state = next_state;
        set = next;
    }
    let updates_took = updates_started.elapsed();
    let rx_during_updates = counter(&maps.read_counters()?, "rx") - rx_at_start;
    let ran = flood.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    let counters = check_final_counters(&topo)?;
    let (sent, sunk) = (flood.sent(), flood.sunk()?);

    let in_updates: u64 = during.iter().sum();
    println!("under_load: {UPDATES} `l4lb map` updates under flood in {:.2} s: {kinds:?}", updates_took.as_secs_f64());
    println!("  set sizes: {sizes:?}");
    println!("  update times (process start to exit): {}", summary(&times));
    println!("  slots written in all: {slots_written}");
    println!(
        "  frames reaching l4lb while an update ran: {in_updates} in all, per update min {} / median {} / max {}",
        during.iter().min().unwrap_or(&0),
        { let mut d = during.clone(); d.sort(); d[d.len() / 2] },
        during.iter().max().unwrap_or(&0)
    );
    println!("  frames reaching l4lb during the {UPDATES} updates and checks: {rx_during_updates}");
    println!(
        "  flood: {:.2} s, generator sent {sent} ({:.2} Mpps), l4lb rx {}, sink received {sunk}",
        ran.as_secs_f64(),
        sent as f64 / ran.as_secs_f64() / 1e6,
        counters["rx"]
    );
    println!("  counters: {counters:?}");
    Ok(())
}

fn concurrent_map_processes_are_serialised() -> TestResult {
    let _serial = serial();
    let seed = seed();
    println!("under_load: concurrent sets from seed {seed} (UNDER_LOAD_SEED={seed} repeats them)");
    let topo = Topology::new()?;
    let mut sets = Sets::new(seed);
    let first = sets.fresh(20, &BTreeSet::new());
    let mut set: Vec<Destination> = sets.make(&first);
    topo.l4lb_many(&[topo.map_args("initial.csv", &set)?])?.remove(0).success()?;
    let mut state = topo.kernel_table()?;
    let mut flood = Flood::start(&topo)?;

    let mut orders = [0usize; 2];
    let mut times = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        // Two different files, each overlapping the current set and the other,
        // drawn until the check has teeth: the two orders end differently, and
        // what two unserialised updates (both planned against the same table)
        // would leave differs from both. Some draws cannot tell them apart
        // (e.g. when one update only adds to what the other leaves).
        let end_of = |a: &[Destination], b: &[Destination]| table::plan(&table::plan(&state, a).target, b).target;
        let mut draw = 0;
        let (one, two, end_12, end_21) = loop {
            let (one, _) = sets.next(&set, 2 * round + 1 + draw);
            let (two, _) = sets.next(&one, 2 * round + 2 + draw);
            let (end_12, end_21) = (end_of(&one, &two), end_of(&two, &one));
            let telling = one != two
                && end_12 != end_21
                && [(&one, &two), (&two, &one)].iter().all(|(a, b)| {
                    let mixed = unserialised(&state, a, b);
                    mixed != end_12 && mixed != end_21
                });
            if telling {
                break (one, two, end_12, end_21);
            }
            draw += 1;
            ensure!(draw < 50, "round {round}: no pair of files among 50 draws tells the orders apart");
        };
        // Started one right after the other, in turn in both orders.
        let mut args = vec![topo.map_args(&format!("c{round}-1.csv"), &one)?, topo.map_args(&format!("c{round}-2.csv"), &two)?];
        if round % 2 == 1 {
            args.reverse();
        }
        let mut runs = topo.l4lb_many(&args)?.into_iter().map(|r| r.success()).collect::<TestResult<Vec<_>>>()?;
        if round % 2 == 1 {
            runs.reverse();
        }
        // first_run: the process given `one`; second_run: the one given `two`.
        let (second_run, first_run) = (runs.pop().expect("two runs"), runs.pop().expect("two runs"));
        times.push(first_run.elapsed);
        times.push(second_run.elapsed);
        let after = topo.kernel_table()?;

        // Either order, each update planned against the other's finished table.
        let summary_line = |from: &TableState, to: &[Destination]| -> String {
            let plan = table::plan(from, to);
            let added = plan.fresh_backends.len();
            let removed = from.backends.iter().flatten().count() + added - to.len();
            let changed = plan.backend_writes.len() - added;
            format!(
                "{}: {} destinations ({added} added, {removed} removed, {changed} changed), {} of {TABLE_SIZE} slots written, outer source {LB_ADDR}",
                topo.lb_dev,
                to.len(),
                plan.slot_writes.len()
            )
        };
        if end_12 != after && end_21 != after {
            for (a, b) in [(&one, &two), (&two, &one)] {
                ensure!(unserialised(&state, a, b) != after, "round {round}: the table is what two unserialised updates leave (the lock did not serialise them)");
            }
        }
        let mut matched = None;
        for (order, (a, b, a_run, b_run)) in [(&one, &two, &first_run, &second_run), (&two, &one, &second_run, &first_run)].into_iter().enumerate() {
            let middle = table::plan(&state, a).target;
            let end = table::plan(&middle, b).target;
            if end == after && a_run.stdout.contains(&summary_line(&state, a)) && b_run.stdout.contains(&summary_line(&middle, b)) {
                check_table(&format!("round {round}, order {order}, second update"), &middle, b, &after)?;
                // order 0: `one` applied first; started first on even rounds.
                matched = Some((usize::from((order == 1) != (round % 2 == 1)), b.clone()));
                break;
            }
        }
        let Some((order, last)) = matched else {
            return Err(fail(format!(
                "round {round}: the final table and the outputs match neither order of the two updates (a mix?)\nfirst:\n{}\nsecond:\n{}",
                first_run.stdout, second_run.stdout
            )));
        };
        orders[order] += 1;
        state = after;
        set = last;
    }
    let ran = flood.stop()?;
    std::thread::sleep(Duration::from_millis(100));
    let counters = check_final_counters(&topo)?;
    println!(
        "under_load: {CONCURRENT_ROUNDS} rounds of two concurrent `l4lb map` processes: both succeeded every time; first-started file applied first {} times, second-started first {} times",
        orders[0], orders[1]
    );
    println!("  process times: {}", summary(&times));
    println!("  flood: {:.2} s, generator sent {}, counters: {counters:?}", ran.as_secs_f64(), flood.sent());
    Ok(())
}
