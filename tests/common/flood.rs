//! A flood from the gen end of a `VethPair` to the lb end: the benchmark's
//! ring of frames (`l4lb::bench::ring`). `bench_gen` on the gen veth turns
//! every frame the lb end sends back into the next frame of the flood; a
//! thread on one CPU starts the ring there and keeps it full.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::veth::VethPair;
use super::{fail, TestResult};
use l4lb::bench::frames::{self, Endpoints, Kind};
use l4lb::bench::ring::{Ring, RingMaps};
use libbpf_rs::MapCore;

const BENCH_OBJECT: &str = env!("L4LB_BENCH_OBJECT");
/// A backstop only: the test stops the flood (`Flood::stop`, or its Drop
/// when a check fails), and the generator leaves the veth when the process
/// ends. The limit must outlast any test on a slow machine: at 150 s, an
/// unoptimized run of the apply test on a loaded machine (152 s) had its
/// flood stop under it and failed as "the generator stopped early".
const FLOOD_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The ring and the thread that keeps it full. Drop stops both (before the
/// object's programs go).
pub struct Flood {
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    ring: Arc<Ring>,
    started: Instant,
    stopped: Option<Duration>,
    // Last: dropped after the ring.
    _object: libbpf_rs::Object,
}

impl Flood {
    /// Loads bench_gen, links it to the gen veth, starts the ring with
    /// `kinds` in turn (random clients) on the last CPU this process may
    /// use, and keeps it full from a thread on that CPU.
    pub fn start(topo: &VethPair, kinds: &[Kind]) -> TestResult<Self> {
        let mut open = libbpf_rs::ObjectBuilder::default()
            .open_file(BENCH_OBJECT)
            .map_err(|err| fail(format!("opening {BENCH_OBJECT}: {err}")))?;
        for mut prog in open.progs_mut() {
            prog.set_autoload(prog.name() == "bench_gen");
        }
        let object = open.load().map_err(|err| fail(format!("loading {BENCH_OBJECT}: {err}")))?;
        let gen = object
            .progs()
            .find(|p| p.name() == "bench_gen")
            .map(|p| p.as_fd().as_raw_fd())
            .ok_or_else(|| fail(format!("{BENCH_OBJECT} has no program bench_gen")))?;
        let map_fd = |name: &str, value_size: usize| -> TestResult<RawFd> {
            let map = object
                .maps()
                .find(|m| m.name() == name)
                .ok_or_else(|| fail(format!("{BENCH_OBJECT} has no map {name}")))?;
            ensure!(
                map.value_size() as usize == value_size,
                "map {name} has value size {}, expected {value_size}",
                map.value_size()
            );
            Ok(map.as_fd().as_raw_fd())
        };
        let maps = RingMaps {
            cfg: map_fd("bench_gen_cfg", frames::GEN_CONFIG_LEN)?,
            ctl: map_fd("bench_gen_ctl", 8)?,
            back: map_fd("bench_back_cnt", 8)?,
            sent: map_fd("bench_gen_cnt", 8)?,
        };

        let ends = Endpoints { src_mac: topo.gen_mac, dst_mac: topo.lb_mac };
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        let gen_cpu = (0..nix::sched::CpuSet::count()).rfind(|&cpu| cpus.is_set(cpu).unwrap_or(false)).unwrap_or(0);
        let ring = Ring::new(gen, maps, (&topo.gen, &topo.gen_dev), gen_cpu, ends)
            .map_err(|err| fail(format!("the ring on {}: {err:#}", topo.gen_dev)))?;
        ring.start(kinds).map_err(|err| fail(format!("starting the ring: {err:#}")))?;
        let ring = Arc::new(ring);
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let thread = {
            let (ring, stop, error) = (ring.clone(), stop.clone(), error.clone());
            std::thread::spawn(move || {
                let result = match ring.keep(&stop, Instant::now() + FLOOD_LIMIT) {
                    Err(err) => Err(format!("keeping the ring full: {err:#}")),
                    Ok(()) if !stop.load(Ordering::SeqCst) => Err(format!(
                        "stopped by its backstop after FLOOD_LIMIT = {} s: the test ran longer",
                        FLOOD_LIMIT.as_secs()
                    )),
                    Ok(()) => Ok(()),
                };
                let stopped = ring.stop().map_err(|err| format!("stopping the ring: {err:#}"));
                if let Err(err) = result.and(stopped) {
                    *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                }
            })
        };
        Ok(Flood { stop, error, thread: Some(thread), ring, started: Instant::now(), stopped: None, _object: object })
    }

    /// Fails when the flood failed or stopped early.
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

    /// Stops the flood and waits until the ring is empty; returns how long it ran.
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

    /// Frames sent into the lb end so far (from the packet socket and by the generator).
    pub fn sent(&self) -> u64 {
        self.ring.sent().unwrap_or(0)
    }

    /// Frames the lb end sent back that reached the generator.
    pub fn sunk(&self) -> TestResult<u64> {
        self.ring.back().map_err(|err| fail(format!("{err:#}")))
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
