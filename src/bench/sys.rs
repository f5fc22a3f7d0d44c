//! Thin wrappers over the BPF and namespace syscalls the benchmark needs, on
//! raw file descriptors (so that any thread can use them), and the
//! benchmark's namespaces.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::libc;

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    pub retval: u32,
    /// Average per repetition, ns (the kernel's own timer).
    pub duration_ns: u32,
    pub data_len: usize,
}

fn os_error(rc: i32) -> std::io::Error {
    if rc < 0 {
        std::io::Error::from_raw_os_error(-rc)
    } else {
        std::io::Error::last_os_error()
    }
}

/// BPF_PROG_TEST_RUN on an XDP program, `data` run through it once.
pub fn test_run(prog: RawFd, data: &[u8], out: Option<&mut [u8]>) -> std::io::Result<TestRun> {
    // SAFETY: plain C struct; all-zero is its documented default.
    let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
    opts.data_in = data.as_ptr().cast();
    opts.data_size_in = data.len() as u32;
    let out_len = out.as_ref().map_or(0, |o| o.len());
    if let Some(out) = out {
        opts.data_out = out.as_mut_ptr().cast();
        opts.data_size_out = out_len as u32;
    }
    opts.repeat = 1;
    // SAFETY: every pointer in opts is valid for the sizes given, for the call.
    let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog, &mut opts) };
    if rc != 0 {
        return Err(os_error(rc));
    }
    Ok(TestRun { retval: opts.retval, duration_ns: opts.duration, data_len: opts.data_size_out as usize })
}

/// The sum over CPUs of entry 0 of a per-CPU array of u64.
pub fn percpu_sum(map: RawFd, cpus: usize) -> Result<u64> {
    Ok(percpu_values(map, cpus)?.iter().sum())
}

/// Entry 0 of a per-CPU array of u64, one value per possible CPU.
pub fn percpu_values(map: RawFd, cpus: usize) -> Result<Vec<u64>> {
    let mut values = vec![0u64; cpus];
    let key = 0u32;
    // SAFETY: values holds one 8-byte slot per possible CPU, as the kernel writes.
    let rc = unsafe { libbpf_sys::bpf_map_lookup_elem(map, (&key as *const u32).cast(), values.as_mut_ptr().cast()) };
    if rc != 0 {
        return Err(os_error(rc)).context("reading a per-CPU counter");
    }
    Ok(values)
}

pub fn map_update(map: RawFd, key: u32, value: &[u8]) -> Result<()> {
    // SAFETY: key and value are valid for the map's sizes (checked by the caller).
    let rc = unsafe { libbpf_sys::bpf_map_update_elem(map, (&key as *const u32).cast(), value.as_ptr().cast(), 0) };
    if rc != 0 {
        return Err(os_error(rc)).context("writing a map entry");
    }
    Ok(())
}

/// The number of entries map `map` was created with.
pub fn map_max_entries(map: RawFd) -> Result<u32> {
    // SAFETY: plain C struct.
    let mut info: libbpf_sys::bpf_map_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: info is valid for len bytes.
    let rc = unsafe { libbpf_sys::bpf_map_get_info_by_fd(map, &mut info, &mut len) };
    if rc != 0 {
        return Err(os_error(rc)).context("reading map info");
    }
    Ok(info.max_entries)
}

pub fn prog_info(prog: RawFd) -> Result<libbpf_sys::bpf_prog_info> {
    // SAFETY: plain C struct.
    let mut info: libbpf_sys::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: info is valid for len bytes; no arrays requested.
    let rc = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(prog, &mut info, &mut len) };
    if rc != 0 {
        return Err(os_error(rc)).context("reading program info");
    }
    Ok(info)
}

/// Turns on run_time_ns/run_cnt accounting of every BPF program while the
/// returned fd is open (it costs every program run, system-wide).
pub fn enable_bpf_stats() -> Result<OwnedFd> {
    // SAFETY: plain syscall wrapper.
    let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
    if fd < 0 {
        return Err(os_error(fd)).context("enabling bpf stats (BPF_ENABLE_STATS)");
    }
    // SAFETY: fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches (or replaces) the XDP program of `ifindex` in driver mode, in the
/// calling thread's network namespace.
pub fn xdp_attach(ifindex: u32, prog: RawFd) -> Result<()> {
    let flags = libbpf_sys::XDP_FLAGS_DRV_MODE;
    // SAFETY: plain syscall wrapper with a valid fd, null options.
    let rc = unsafe { libbpf_sys::bpf_xdp_attach(ifindex as i32, prog, flags, std::ptr::null()) };
    if rc != 0 {
        return Err(os_error(rc)).with_context(|| format!("attaching an XDP program to ifindex {ifindex}"));
    }
    Ok(())
}

/// Attaches `prog` to `ifindex` (driver mode) through a BPF link, in the
/// calling thread's network namespace: the program leaves the device when
/// the returned fd is closed, at the latest when this process ends.
pub fn xdp_link(ifindex: u32, prog: RawFd) -> Result<OwnedFd> {
    // SAFETY: plain C struct; all-zero is its documented default.
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _;
    opts.flags = libbpf_sys::XDP_FLAGS_DRV_MODE;
    // SAFETY: plain syscall wrapper with a valid fd and options.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog, ifindex as i32, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(os_error(fd)).with_context(|| format!("linking an XDP program to ifindex {ifindex}"));
    }
    // SAFETY: fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A raw packet socket bound to `ifindex` (of the calling thread's network
/// namespace) that only sends: protocol 0 receives nothing.
pub fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a packet socket");
    }
    // SAFETY: fd was just returned to us.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain C struct; all-zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll for its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding a packet socket to ifindex {ifindex}"));
    }
    Ok(socket)
}

/// Sends one whole frame (Ethernet header included) on a bound packet
/// socket. False: the device's queue was full and dropped it (ENOBUFS).
pub fn send_frame(socket: &OwnedFd, frame: &[u8]) -> Result<bool> {
    // SAFETY: frame is valid for its length.
    let sent = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if sent == frame.len() as isize {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOBUFS) {
        return Ok(false);
    }
    Err(err).context("sending a frame on the packet socket")
}

/// Runs `f` in a thread that entered network namespace `ns` (setns affects
/// the calling thread only). Panics in `f` are passed on.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter_netns(ns)?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))
}

/// The pid of `cpu`'s softirq thread, ksoftirqd/N: where softirq work runs
/// once a CPU has more of it than the end of an interrupt can take.
pub fn ksoftirqd(cpu: usize) -> Result<i32> {
    let name = format!("ksoftirqd/{cpu}");
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name) {
            return Ok(pid);
        }
    }
    bail!("no {name} in /proc")
}

/// Task `pid`'s time on a CPU and time runnable but waiting for one (the
/// first two fields of its schedstat), ns.
pub fn schedstat(pid: i32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_schedstat(&text).ok_or_else(|| anyhow!("unexpected {path}: {text}"))
}

fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// One CPU's line of /proc/stat, in ticks (USER_HZ).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks {
    /// user, nice, system, irq and softirq (guest time is inside user).
    pub busy: u64,
    /// idle and iowait.
    pub idle: u64,
    pub steal: u64,
}

impl CpuTicks {
    pub fn total(&self) -> u64 {
        self.busy + self.idle + self.steal
    }

    /// The ticks between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            busy: self.busy.saturating_sub(earlier.busy),
            idle: self.idle.saturating_sub(earlier.idle),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    pub fn add(&mut self, other: &CpuTicks) {
        self.busy += other.busy;
        self.idle += other.idle;
        self.steal += other.steal;
    }
}

/// The line `cpuN` of a /proc/stat text.
pub fn parse_cpu_ticks(stat: &str, cpu: usize) -> Option<CpuTicks> {
    let name = format!("cpu{cpu}");
    let line = stat.lines().find(|line| line.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if v.len() < 8 {
        return None;
    }
    Some(CpuTicks { busy: v[0] + v[1] + v[2] + v[5] + v[6], idle: v[3] + v[4], steal: v[7] })
}

/// The ticks of CPU `cpu` so far.
pub fn cpu_ticks(cpu: usize) -> Result<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_cpu_ticks(&stat, cpu).ok_or_else(|| anyhow!("no line for cpu{cpu} in /proc/stat"))
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect())
}

/// Restricts the calling thread to `cpus`.
pub fn set_cpus(cpus: &[usize]) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("sched_setaffinity to CPUs {cpus:?}"))
}

// ------------------------------------------------------------ interruption

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM stop the benchmark at the next check, so that it
/// removes its namespaces before exiting.
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, checking for an interruption every 20 ms.
pub fn sleep(duration: Duration) -> Result<()> {
    let end = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

// ------------------------------------------------------------ namespaces

/// Namespaces of this benchmark start with this, then `-<pid>-`.
pub const PREFIX: &str = "l4lbb";
/// Addresses of the two veth ends (used only inside the namespaces).
pub const GEN_ADDR: &str = "192.0.2.1";
pub const LB_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 2);
/// Room for a 1500-byte packet plus the 20-byte outer header.
pub const MTU: u32 = 1600;

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed? `make deps`)"))?;
    if !output.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Two namespaces joined by a veth pair; dropping it deletes both, and with
/// them the veth and every XDP program attached to it.
pub struct Topology {
    pub gen_ns: String,
    pub lb_ns: String,
    pub gen_dev: String,
    pub lb_dev: String,
    pub gen_mac: [u8; 6],
    pub lb_mac: [u8; 6],
}

impl Topology {
    pub fn create() -> Result<Topology> {
        remove_leftovers();
        let base = format!("{PREFIX}-{}", std::process::id());
        let mut topo = Topology {
            gen_ns: format!("{base}-gen"),
            lb_ns: format!("{base}-lb"),
            gen_dev: "bench-gen".into(),
            lb_dev: "bench-lb".into(),
            gen_mac: [0; 6],
            lb_mac: [0; 6],
        };
        let mtu = MTU.to_string();
        let lb_cidr = format!("{LB_ADDR}/24");
        let gen_cidr = format!("{GEN_ADDR}/24");
        // From here on an error drops `topo`, which deletes what exists.
        let (gen, lb, gen_dev, lb_dev) = (&topo.gen_ns, &topo.lb_ns, &topo.gen_dev, &topo.lb_dev);
        for ns in [gen, lb] {
            run("ip", &["netns", "add", ns])?;
            // No IPv6: no router solicitations or MLD reports on the veth.
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        let steps: [&[&str]; 5] = [
            &[
                "-n", gen, "link", "add", gen_dev, "mtu", &mtu, "type", "veth", "peer", "name", lb_dev, "netns", lb,
                "mtu", &mtu,
            ],
            &["-n", gen, "addr", "add", &gen_cidr, "dev", gen_dev],
            &["-n", lb, "addr", "add", &lb_cidr, "dev", lb_dev],
            &["-n", gen, "link", "set", "dev", gen_dev, "up"],
            &["-n", lb, "link", "set", "dev", lb_dev, "up"],
        ];
        for args in steps {
            run("ip", args).context("creating the benchmark's veth pair")?;
        }
        topo.gen_mac = link_mac(&topo.gen_ns, &topo.gen_dev)?;
        topo.lb_mac = link_mac(&topo.lb_ns, &topo.lb_dev)?;
        Ok(topo)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gen_ns, &self.lb_ns] {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

fn link_mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let json: serde_json::Value = serde_json::from_str(&run("ip", &["-n", ns, "-j", "link", "show", "dev", dev])?)?;
    let text = json[0]["address"].as_str().ok_or_else(|| anyhow!("no MAC address for {dev} in {json}"))?;
    Ok(text.parse::<macaddr::MacAddr6>().with_context(|| format!("MAC address {text}"))?.into_array())
}

/// Deletes namespaces of earlier runs whose process is gone.
fn remove_leftovers() {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
        {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_are_read_per_cpu() {
        let stat =
            "cpu  10 1 30 400 5 2 60 7 0 0\ncpu0 4 0 10 200 1 1 20 3 0 0\ncpu1 6 1 20 200 4 1 40 4 0 0\nintr 1 2 3\n";
        assert_eq!(parse_cpu_ticks(stat, 1), Some(CpuTicks { busy: 6 + 1 + 20 + 1 + 40, idle: 204, steal: 4 }));
        assert_eq!(parse_cpu_ticks(stat, 0).map(|t| t.total()), Some(4 + 10 + 1 + 20 + 201 + 3));
        assert_eq!(parse_cpu_ticks(stat, 2), None);
        let later = CpuTicks { busy: 100, idle: 10, steal: 5 };
        assert_eq!(later.since(&CpuTicks { busy: 40, idle: 8, steal: 5 }), CpuTicks { busy: 60, idle: 2, steal: 0 });
    }

    #[test]
    fn schedstat_gives_run_and_wait_time() {
        assert_eq!(parse_schedstat("12520980978 2005843506 48189\n"), Some((12_520_980_978, 2_005_843_506)));
        assert_eq!(parse_schedstat("12 x 3"), None);
        assert_eq!(parse_schedstat(""), None);
    }
}
