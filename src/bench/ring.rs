//! The traffic of `l4lb bench` and of the flood tests: a ring of frames
//! between the two ends of a veth pair.
//!
//! `bench_gen` (src/bpf/l4lb_bench.bpf.c) is the XDP program of the
//! generator's veth. Every frame the balancer's veth sends back (XDP_TX) comes
//! to it: it counts the frame, makes it the next frame of the traffic (the
//! next kind in turn, a new random client) and sends it out again (XDP_TX).
//! A few frames sent once from a packet socket go round and round, as fast
//! as the two programs and the two veths let them: no system call per frame.
//!
//! Where it runs: a veth that sends schedules its peer's NAPI on the CPU it
//! runs on. The first frames are sent from a thread on the generator's CPU,
//! so both veths' NAPI, both programs and the copies all run there, in
//! softirq (in ksoftirqd/N as soon as it is busy), and stay there.
//!
//! Why not the kernel's own traffic source, BPF_PROG_TEST_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES (used until 2026-12): machines of this kind
//! now refuse it with EPERM, whatever the program and the flags.
//!
//! Frames leave the ring when the balancer passes or drops them (a VIP
//! removed under a flood), when there is no program on its veth, or when a
//! veth's queue is full. `keep` tops the ring up when it slows down or
//! stops; a surplus costs nothing but drops at a full queue, outside the
//! balancer.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::frames::{self, Endpoints, Kind};
use super::sys;

/// Kinds of frame one ring can send in turn (`BENCH_GEN_KINDS`).
pub const MAX_KINDS: usize = 8;
/// Frames put in the ring when it starts: half of a veth's queue (256), so
/// that neither end's queue overflows when all of them wait at one end.
pub const SEED_FRAMES: usize = 128;
/// Frames `keep` adds when the ring has slowed to half its best rate.
const TOP_UP: usize = 16;
/// How often `keep` looks at the ring.
const KEEP_TICK: Duration = Duration::from_millis(1);
/// `stop` waits for the frames in flight until no frame came back for this long.
const DRAIN_QUIET: Duration = Duration::from_millis(3);

/// The generator's maps, as raw fds (usable from any thread).
#[derive(Debug, Clone, Copy)]
pub struct RingMaps {
    /// `bench_gen_cfg`: one `struct bench_gen_config` per kind.
    pub cfg: RawFd,
    /// `bench_gen_ctl`: running, and how many kinds.
    pub ctl: RawFd,
    /// `bench_back_cnt`: frames that came back to the generator's veth (per CPU).
    pub back: RawFd,
    /// `bench_gen_cnt`: frames the generator sent (per CPU).
    pub sent: RawFd,
}

/// A ring on one veth pair: the generator linked to its veth (it leaves when
/// the ring is dropped, or when the process ends), and the packet socket
/// that starts it.
pub struct Ring {
    maps: RingMaps,
    ends: Endpoints,
    cpu: usize,
    cpus: usize,
    socket: OwnedFd,
    /// Frames sent from the packet socket.
    seeded: AtomicU64,
    /// What `start` was given last; empty while stopped.
    kinds: Mutex<Vec<Kind>>,
    // Last: the generator leaves the veth when this closes.
    _link: OwnedFd,
}

impl Ring {
    /// Links the generator `prog` to `dev` of network namespace `ns` and opens
    /// the packet socket there. The ring runs on `cpu` once started.
    pub fn new(prog: RawFd, maps: RingMaps, (ns, dev): (&str, &str), cpu: usize, ends: Endpoints) -> Result<Ring> {
        let cpus = libbpf_rs::num_possible_cpus().context("counting possible CPUs")?;
        let entries = sys::map_max_entries(maps.cfg).context("the generator's settings")?;
        if entries as usize != MAX_KINDS {
            bail!(
                "bench_gen_cfg has {entries} entries, expected {MAX_KINDS}: the benchmark object is of another build"
            );
        }
        let (link, socket) = sys::in_netns(ns, || {
            let ifindex = nix::net::if_::if_nametoindex(dev).with_context(|| format!("no {dev} in {ns}"))?;
            let link = sys::xdp_link(ifindex, prog).with_context(|| format!("the generator on {dev}"))?;
            Ok((link, sys::packet_socket(ifindex).with_context(|| format!("on {dev}"))?))
        })?;
        let ring = Ring {
            maps,
            ends,
            cpu,
            cpus,
            socket,
            seeded: AtomicU64::new(0),
            kinds: Mutex::new(Vec::new()),
            _link: link,
        };
        ring.disarm()?;
        Ok(ring)
    }

    /// Sends `kinds` in turn, from random clients: writes each kind's
    /// settings, lets the generator run, puts SEED_FRAMES frames in the ring
    /// and waits until the first come back. The ring must be stopped.
    pub fn start(&self, kinds: &[Kind]) -> Result<()> {
        check_kinds(kinds)?;
        let mut current = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        if !current.is_empty() {
            bail!("the ring is running already ({:?})", *current);
        }
        self.arm(kinds)?;
        *current = kinds.to_vec();
        drop(current);
        let before = self.back()?;
        self.seed(SEED_FRAMES)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.back()? == before {
            if Instant::now() > deadline {
                bail!("none of the {SEED_FRAMES} frames sent into the ring came back within 5 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Stops the generator and waits until the frames in flight are back (it
    /// drops them): the ring is empty.
    pub fn stop(&self) -> Result<()> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.disarm()?;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut last = self.back()?;
        let mut quiet_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_micros(500));
            let now = self.back()?;
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= DRAIN_QUIET {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("frames still came back 1 s after the generator stopped");
            }
        }
    }

    /// Empties the ring and starts it again with the same kinds: back on its
    /// CPU, should it have left it.
    pub fn restart(&self) -> Result<()> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if kinds.is_empty() {
            bail!("the ring is stopped");
        }
        self.stop()?;
        self.start(&kinds)
    }

    /// Whether the ring was started and not stopped since.
    pub fn running(&self) -> bool {
        !self.kinds.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Frames that came back to the generator's veth so far.
    pub fn back(&self) -> Result<u64> {
        sys::percpu_sum(self.maps.back, self.cpus).context("the generator's count of frames back")
    }

    /// Frames back so far: those that came back on the ring's CPU, and all.
    pub fn back_on_cpu(&self) -> Result<(u64, u64)> {
        let values = sys::percpu_values(self.maps.back, self.cpus).context("the generator's count of frames back")?;
        Ok((values.get(self.cpu).copied().unwrap_or(0), values.iter().sum()))
    }

    /// Frames sent into the balancer's veth so far: by the packet socket and
    /// by the generator.
    pub fn sent(&self) -> Result<u64> {
        let generated = sys::percpu_sum(self.maps.sent, self.cpus).context("the generator's count of frames sent")?;
        Ok(self.seeded.load(Ordering::SeqCst) + generated)
    }

    /// The CPU the ring runs on.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Keeps the ring full until `stop` is set or `until` passes: every
    /// KEEP_TICK, adds SEED_FRAMES frames when none came back, TOP_UP when
    /// fewer than half as many as in the best tick of late. Runs on the
    /// ring's CPU (the calling thread is moved there). Does nothing while the
    /// ring is stopped.
    pub fn keep(&self, stop: &AtomicBool, until: Instant) -> Result<()> {
        sys::set_cpus(&[self.cpu])?;
        let mut last = self.back()?;
        let mut best = 0u64;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(KEEP_TICK);
            let now = self.back()?;
            let moved = now.saturating_sub(last);
            last = now;
            if !self.running() {
                best = 0;
                continue;
            }
            match top_up(moved, best) {
                0 => {}
                n => self.send_seeds(n)?,
            }
            // The best tick fades, so that a slower balancer (a program
            // swapped in, a busier CPU) becomes the new measure.
            best = moved.max(best - best / 64);
        }
        Ok(())
    }

    /// Sends `n` frames into the ring from a thread on the ring's CPU.
    fn seed(&self, n: usize) -> Result<()> {
        let cpu = self.cpu;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    sys::set_cpus(&[cpu])?;
                    self.send_seeds(n)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes the settings of `kinds` and lets the generator run: what
    /// `start` does before it sends the first frames, for one frame run
    /// through the generator by hand (the ring stays as it was).
    pub(super) fn arm(&self, kinds: &[Kind]) -> Result<()> {
        for (key, &kind) in kinds.iter().enumerate() {
            sys::map_update(self.maps.cfg, key as u32, &frames::gen_config(kind, &self.ends))
                .with_context(|| format!("the generator's settings for {}", kind.label()))?;
        }
        self.write_ctl(true, kinds.len())
    }

    /// Stops the generator: it drops what comes back.
    pub(super) fn disarm(&self) -> Result<()> {
        self.write_ctl(false, 0)
    }

    /// Sends up to `n` frames of the current kinds, in turn, from the calling
    /// thread; stops at the first the balancer's veth had no room for (its
    /// queue is full: the ring is, too).
    fn send_seeds(&self, n: usize) -> Result<()> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (i, kind) in kinds.iter().cycle().take(if kinds.is_empty() { 0 } else { n }).enumerate() {
            let (client, port) = frames::client_of(*kind, i as u32);
            if !sys::send_frame(&self.socket, &frames::frame(*kind, &self.ends, client, port))? {
                break;
            }
            self.seeded.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn write_ctl(&self, running: bool, kinds: usize) -> Result<()> {
        sys::map_update(self.maps.ctl, 0, &ctl_value(running, kinds)).context("the generator's control")
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let _ = self.disarm();
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("cpu", &self.cpu).field("socket", &self.socket.as_raw_fd()).finish()
    }
}

/// `struct bench_gen_ctl`: running, kinds (native byte order).
fn ctl_value(running: bool, kinds: usize) -> Vec<u8> {
    let mut value = u32::from(running).to_ne_bytes().to_vec();
    value.extend_from_slice(&(kinds as u32).to_ne_bytes());
    value
}

/// Kinds one ring can send in turn: 1 to MAX_KINDS, and either one kind or
/// kinds whose frames are all header (the generator writes every byte of
/// them): a frame changes kind as it goes round, and only the headers are
/// rewritten.
pub fn check_kinds(kinds: &[Kind]) -> Result<()> {
    if kinds.is_empty() || kinds.len() > MAX_KINDS {
        bail!("a ring sends 1 to {MAX_KINDS} kinds of frame, not {}", kinds.len());
    }
    if kinds.len() > 1 {
        if let Some(kind) = kinds.iter().find(|k| k.frame_len() != k.header_len()) {
            bail!("{} has a payload: a ring sends it alone", kind.label());
        }
    }
    Ok(())
}

/// Frames `keep` adds after a tick in which `moved` came back, the best tick
/// of late having had `best`.
fn top_up(moved: u64, best: u64) -> usize {
    if moved == 0 {
        SEED_FRAMES
    } else if moved * 2 < best {
        TOP_UP
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_with_a_payload_go_alone() {
        assert!(check_kinds(&[Kind::Tcp1500]).is_ok());
        assert!(check_kinds(&[Kind::TcpSyn64, Kind::Udp64, Kind::Syn4in6, Kind::Ipv6Syn, Kind::CatchAll]).is_ok());
        let err = check_kinds(&[Kind::TcpSyn64, Kind::Tcp1500]).unwrap_err();
        assert_eq!(err.to_string(), format!("{} has a payload: a ring sends it alone", Kind::Tcp1500.label()));
        assert!(check_kinds(&[]).is_err());
        assert!(check_kinds(&[Kind::TcpSyn64; MAX_KINDS + 1]).is_err());
        assert!(check_kinds(&[Kind::TcpSyn64; MAX_KINDS]).is_ok());
    }

    #[test]
    fn the_ring_is_topped_up_when_it_stops_or_slows_to_half() {
        assert_eq!(top_up(0, 0), SEED_FRAMES);
        assert_eq!(top_up(0, 5000), SEED_FRAMES);
        assert_eq!(top_up(2499, 5000), TOP_UP);
        assert_eq!(top_up(2500, 5000), 0);
        assert_eq!(top_up(7000, 5000), 0);
        assert_eq!(top_up(1, 0), 0);
    }

    #[test]
    fn the_control_value_is_the_c_struct() {
        let value = ctl_value(true, 5);
        assert_eq!(value.len(), 8);
        assert_eq!(u32::from_ne_bytes(value[..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(value[4..].try_into().unwrap()), 5);
        assert_eq!(ctl_value(false, 0), vec![0; 8]);
    }
}
