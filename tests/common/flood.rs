//! A flood of live frames from the gen end of a `VethPair` to the lb end:
//! the benchmark's generator (`bench_gen`, run by BPF_PROG_TEST_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES in a thread inside the gen namespace, pinned
//! to one CPU) and its sink (`bench_sink` on the gen veth counts and drops
//! what the lb end sends back: a veth accepts its peer's XDP_TX frames only
//! when it runs an XDP program).

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::veth::VethPair;
use super::{fail, in_netns, TestResult};
use l4lb::bench::frames::{self, Endpoints, Kind};
use libbpf_rs::MapCore;

const BENCH_OBJECT: &str = env!("L4LB_BENCH_OBJECT");
/// Frames per live test_run call of the generator (a few ms of traffic).
const LIVE_BATCH: u32 = 1 << 14;
/// A backstop only: the test stops the generator (`Flood::stop`, or its
/// Drop when a check fails), and it ends with the process. The limit must
/// outlast any test on a slow machine: at 150 s, an unoptimized run of the
/// apply test on a loaded machine (152 s) had its flood stop under it and
/// failed as "the generator stopped early".
const FLOOD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The live-frame generator and the sink, from the benchmark's object. Drop
/// stops the generator thread (before the object's programs go).
pub struct Flood {
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
    /// generator thread on the last CPU this process may use. It sends
    /// `kinds` in turn, LIVE_BATCH frames of each, from random clients.
    pub fn start(topo: &VethPair, kinds: &[Kind]) -> TestResult<Self> {
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
            let map = object
                .maps()
                .find(|m| m.name() == name)
                .ok_or_else(|| fail(format!("{BENCH_OBJECT} has no map {name}")))?;
            if let Some(size) = value_size {
                ensure!(
                    map.value_size() as usize == size,
                    "map {name} has value size {}, expected {size}",
                    map.value_size()
                );
            }
            Ok(map.as_fd().as_raw_fd())
        };
        let (gen, sink) = (prog_fd("bench_gen")?, prog_fd("bench_sink")?);
        let gen_cfg = map_fd("bench_gen_cfg", Some(frames::GEN_CONFIG_LEN))?;
        let sink_cnt = map_fd("bench_sink_cnt", None)?;

        let gen_ifindex = in_netns(&topo.gen, || {
            let index = nix::net::if_::if_nametoindex(topo.gen_dev.as_str())?;
            xdp_attach(index, sink, libbpf_sys::XDP_FLAGS_DRV_MODE)?;
            xdp_attach(nix::net::if_::if_nametoindex("lo")?, gen, libbpf_sys::XDP_FLAGS_SKB_MODE)?;
            Ok(index)
        })?;

        let ends = Endpoints { src_mac: topo.gen_mac, dst_mac: topo.lb_mac };
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        let gen_cpu = (0..nix::sched::CpuSet::count()).rfind(|&cpu| cpus.is_set(cpu).unwrap_or(false)).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let ns = topo.gen.clone();
        let kinds = kinds.to_vec();
        let thread = {
            let (stop, sent, error) = (stop.clone(), sent.clone(), error.clone());
            std::thread::spawn(move || {
                if let Err(err) = generate(&ns, gen_cpu, (gen, gen_cfg), gen_ifindex, &ends, &kinds, (&stop, &sent)) {
                    *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                }
            })
        };
        let flood = Flood {
            stop,
            sent,
            error,
            thread: Some(thread),
            sink_cnt,
            started: Instant::now(),
            stopped: None,
            _object: object,
        };
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
    pub fn check(&self) -> TestResult {
        if let Some(err) = self.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(fail(format!("generator: {err}")));
        }
        ensure!(
            self.stopped.is_some() || !self.thread.as_ref().is_some_and(|t| t.is_finished()),
            "the generator stopped early"
        );
        Ok(())
    }

    /// Stops the generator and waits for it; returns how long it ran.
    pub fn stop(&mut self) -> TestResult<Duration> {
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

    /// Frames the generator has sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Frames l4lb sent back that reached the sink on the gen veth.
    pub fn sunk(&self) -> TestResult<u64> {
        let cpus = libbpf_rs::num_possible_cpus()?;
        let mut values = vec![0u64; cpus];
        let key = 0u32;
        // SAFETY: values holds one u64 per possible CPU, as the kernel writes for a per-CPU array.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(self.sink_cnt, (&key as *const u32).cast(), values.as_mut_ptr().cast())
        };
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
/// sends LIVE_BATCH frames per live test_run call of `prog` (configured
/// through map `cfg`) out of the gen veth, each of `kinds` in turn, until
/// told to stop (or FLOOD_LIMIT passed); counts what it sent in `sent`.
fn generate(
    ns: &str,
    cpu: usize,
    (prog, cfg): (RawFd, RawFd),
    ifindex: u32,
    ends: &Endpoints,
    kinds: &[Kind],
    (stop, sent): (&AtomicBool, &AtomicU64),
) -> Result<(), String> {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|err| format!("/run/netns/{ns}: {err}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|err| format!("setns {ns}: {err}"))?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|err| format!("CPU {cpu}: {err}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|err| format!("pinning to CPU {cpu}: {err}"))?;
    let configs: Vec<(Vec<u8>, Vec<u8>)> = kinds
        .iter()
        .map(|&kind| (frames::gen_config(kind, ends), frames::frame(kind, ends, frames::client_of(kind, 0).0, 0)))
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
    if stop.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(format!("stopped by its backstop after FLOOD_LIMIT = {} s: the test ran longer", FLOOD_LIMIT.as_secs()))
    }
}
