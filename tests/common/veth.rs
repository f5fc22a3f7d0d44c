//! The topology of the end-to-end suites: two network namespaces, `gen` (the
//! traffic generator's side) and `lb` (the balancer's), joined by a veth
//! pair. Dropping it deletes both namespaces, and with them the veth, every
//! XDP program attached to it and the scratch directory, also when a check
//! failed half-way through building it.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{fail, in_netns, ip, link_mac, run, TestResult};
use l4lb::discover::AttachedProgram;

/// The gen end's address (/24).
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The lb end's address (/24), when it has one.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// gen and lb joined by a veth pair; neither namespace has IPv6, so no router
/// solicitations or MLD reports cross the veth among a test's frames.
pub struct VethPair {
    /// Namespaces `<prefix>-<pid>-<n>-gen` and `-lb`.
    pub gen: String,
    pub lb: String,
    /// Interfaces `<prefix><n>g` (in gen) and `<prefix><n>l` (in lb).
    pub gen_dev: String,
    pub lb_dev: String,
    pub gen_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    /// Scratch directory `<tmp>/<prefix>-<pid>-<n>` for the files a test writes.
    pub dir: PathBuf,
}

impl VethPair {
    /// gen gets GEN_ADDR/24; lb gets LB_ADDR/24 when `lb_address`. Names
    /// start with `prefix` (the suite's, so `remove_leftovers(prefix)` finds
    /// what a killed run left) and the process id.
    pub fn new(prefix: &str, lb_address: bool) -> TestResult<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("{prefix}-{}-{n}", std::process::id());
        let mut pair = VethPair {
            gen: format!("{base}-gen"),
            lb: format!("{base}-lb"),
            gen_dev: format!("{prefix}{n}g"),
            lb_dev: format!("{prefix}{n}l"),
            gen_mac: [0; 6],
            lb_mac: [0; 6],
            dir: std::env::temp_dir().join(&base),
        };
        // From here on the guard exists: a failure below still cleans up.
        std::fs::create_dir_all(&pair.dir)?;
        for ns in [&pair.gen, &pair.lb] {
            ip(&["netns", "add", ns])?;
            let no_ipv6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"];
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", no_ipv6[0], no_ipv6[1]]).success()?;
        }
        let (gen, lb, gen_dev, lb_dev) = (&pair.gen, &pair.lb, &pair.gen_dev, &pair.lb_dev);
        ip(&["-n", gen, "link", "add", gen_dev, "type", "veth", "peer", "name", lb_dev, "netns", lb])?;
        ip(&["-n", gen, "addr", "add", &format!("{GEN_ADDR}/24"), "dev", gen_dev])?;
        if lb_address {
            ip(&["-n", lb, "addr", "add", &format!("{LB_ADDR}/24"), "dev", lb_dev])?;
        }
        ip(&["-n", gen, "link", "set", "dev", gen_dev, "up"])?;
        ip(&["-n", lb, "link", "set", "dev", lb_dev, "up"])?;
        pair.gen_mac = link_mac(gen, gen_dev)?;
        pair.lb_mac = link_mac(lb, lb_dev)?;
        Ok(pair)
    }

    /// Writes a file into the scratch directory; returns its path.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> TestResult<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).map_err(|err| fail(format!("writing {}: {err}", path.display())))?;
        Ok(path)
    }

    /// The l4lb program attached to the lb veth, found through the library
    /// (in a thread inside the lb namespace; its maps and program open by id
    /// from anywhere afterwards).
    pub fn attached_l4lb(&self) -> TestResult<AttachedProgram> {
        in_netns(&self.lb, || {
            let iface = l4lb::iface::Interface::by_name(&self.lb_dev)?;
            Ok(l4lb::discover::find_l4lb(&iface)?)
        })
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.gen, &self.lb] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Loads `r0 = XDP_PASS; exit` and attaches it to `dev` of namespace `ns` in
/// driver mode: a veth hands its peer's XDP_TX frames only to an end that
/// runs an XDP program. The attachment outlives the program fd (netlink
/// attach).
pub fn attach_xdp_pass(ns: &str, dev: &str) -> TestResult {
    in_netns(ns, || {
        let index = nix::net::if_::if_nametoindex(dev)?;
        // SAFETY: bpf_insn is plain data; all-zero is a valid value.
        let mut insns: [libbpf_sys::bpf_insn; 2] = unsafe { std::mem::zeroed() };
        insns[0].code = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
        insns[0].imm = 2; // XDP_PASS
        insns[1].code = 0x95; // BPF_JMP | BPF_EXIT

        // SAFETY: valid instruction array of 2, NUL-terminated strings, null opts.
        let fd = unsafe {
            libbpf_sys::bpf_prog_load(
                libbpf_sys::BPF_PROG_TYPE_XDP,
                c"l4lbt_pass".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr(),
                2,
                std::ptr::null_mut(),
            )
        };
        ensure!(fd >= 0, "loading the XDP_PASS program: {}", std::io::Error::from_raw_os_error(-fd));
        // SAFETY: fd was just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain syscall wrapper with a valid fd, null options.
        let rc = unsafe {
            libbpf_sys::bpf_xdp_attach(index as i32, fd.as_raw_fd(), libbpf_sys::XDP_FLAGS_DRV_MODE, std::ptr::null())
        };
        ensure!(rc == 0, "attaching the XDP_PASS program to {dev}: {}", std::io::Error::from_raw_os_error(-rc));
        Ok(())
    })
}
