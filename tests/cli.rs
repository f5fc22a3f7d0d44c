//! The command line against a running balancer: every bad input (interface,
//! mode, addresses, ports, seeds, intervals, input files) is refused with an
//! error naming the bad value, a non-zero exit, and the running state left
//! byte for byte (`LbMaps::dump()` and the XDP programs of both interfaces,
//! compared before and after each case); running without root or without
//! the needed capabilities is refused before anything is touched; the update
//! lock is the network namespace's, waited for when another l4lb holds it and
//! refused when someone else does; l4lb needs
//! no bpffs and no RLIMIT_MEMLOCK (kernels from 5.11 charge BPF memory to
//! the memory cgroup); a NIC or kernel that refuses the program says why.
//!
//! The expected messages are asserted exactly. Errors found by l4lb are one
//! line `l4lb: error: ...` and exit 1; values the argument parser (clap)
//! refuses exit 2 with clap's `error: invalid value 'VALUE' for '--opt'...`
//! first line, then its usage hint.
//!
//! Each balancer is a namespace `l4lbt-cli-<pid>-<n>` holding a veth pair
//! (`l4lbt-c<n>l` with l4lb attached in driver mode and services applied,
//! its peer `l4lbt-c<n>p` without a program); a guard deletes the namespace
//! (and with it the veth and the program) and its scratch directory even
//! when an assertion fails.

#[macro_use]
mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::services::{probes, Program, PROTO_TCP, PROTO_UDP};
use common::{fail, in_netns, ip, run, Outcome, TestResult};
use l4lb::discover::AttachedProgram;
use l4lb::maps::LbMaps;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
/// Namespaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt-cli";

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "cli",
        "network namespaces, XDP, BPF maps and switching users need root",
        vec![
            ("bad_interfaces_are_named_with_the_namespace", bad_interfaces),
            ("bad_values_on_the_command_line_are_named_and_change_nothing", bad_values),
            ("bad_input_files_are_named_and_change_nothing", bad_files),
            ("without_root_or_capabilities_every_subcommand_refuses_first", without_privileges),
            ("works_with_bpffs_unmounted", without_bpffs),
            ("loads_with_a_memlock_limit_of_zero", memlock_zero),
            ("the_update_lock_is_the_namespaces_own", update_lock_per_namespace),
            ("nic_or_kernel_refusing_the_program_says_why", kernel_refusals),
            ("verifier_rejection_carries_the_end_of_the_verifier_log", verifier_rejection),
        ],
    );
}

// ---------------------------------------------------------------- a balancer

const CONFIG: &str = r#"[global]
source_v4 = "192.0.2.2"
source_v6 = "2001:db8::2"
gateway_mac = "02:00:00:00:00:01"
hash_seed = 0x1234abcd

[[service]]
vip = "*"
backends = [ { address = "198.18.0.1", mac = "02:00:c6:12:00:01" } ]

[[service]]
vip = "203.0.113.10"
protocol = "tcp"
port = 80
backends = [
  { address = "198.18.0.101", mac = "02:00:c6:12:00:65", weight = 2 },
  { address = "2001:db8::103" },
]

[[service]]
vip = "2001:db8::10"
protocol = "udp"
port = 0
hash_ports = false
backends = [ { address = "2001:db8::121" } ]
"#;

/// A good destination file (for cases where something else is bad).
const DESTINATIONS: &str = "10.0.1.1, 02:00:0a:00:01:01\n10.0.1.2, 02:00:0a:00:01:02\n";

/// One namespace with a veth pair, l4lb attached to one end, CONFIG applied
/// and some traffic counted.
struct Balancer {
    ns: String,
    dev: String,
    peer: String,
    dir: PathBuf,
}

impl Balancer {
    fn new() -> TestResult<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = format!("{PREFIX}-{}-{n}", std::process::id());
        let b = Balancer {
            ns: base.clone(),
            dev: format!("l4lbt-c{n}l"),
            peer: format!("l4lbt-c{n}p"),
            dir: std::env::temp_dir().join(&base),
        };
        // From here on the guard exists: a failure below still cleans up.
        std::fs::create_dir_all(&b.dir)?;
        ip(&["netns", "add", &b.ns])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &b.ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )
        .success()?;
        ip(&["-n", &b.ns, "link", "add", &b.dev, "type", "veth", "peer", "name", &b.peer])?;
        ip(&["-n", &b.ns, "addr", "add", "192.0.2.2/24", "dev", &b.dev])?;
        ip(&["-n", &b.ns, "link", "set", "dev", &b.peer, "up"])?;
        ip(&["-n", &b.ns, "link", "set", "dev", &b.dev, "up"])?;
        b.l4lb(&["attach", "-i", &b.dev]).success()?;
        let config = b.file("lb.toml", CONFIG)?;
        b.l4lb(&["apply", "-i", &b.dev, "-c", &config]).success()?;
        // Traffic, so that the counters are not all zero.
        let program = Program::from_id(b.program()?.id)?;
        let v4: IpAddr = "203.0.113.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        for p in probes(&[(v4, PROTO_TCP, 80), (v4, PROTO_UDP, 53), (v6, PROTO_UDP, 53)], 5, 1) {
            program.verdict(&p)?;
        }
        Ok(b)
    }

    /// `l4lb ARGS` inside the namespace.
    fn l4lb(&self, args: &[&str]) -> Outcome {
        self.l4lb_as(&[], args)
    }

    /// `WRAPPER... l4lb ARGS` inside the namespace (`setpriv ...`, `prlimit ...`).
    fn l4lb_as(&self, wrapper: &[&str], args: &[&str]) -> Outcome {
        let mut full = vec!["netns", "exec", &self.ns];
        full.extend_from_slice(wrapper);
        full.push(BIN);
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Writes a file into the scratch directory; returns its path.
    fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> TestResult<String> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents)?;
        Ok(path.display().to_string())
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The l4lb program on `dev`.
    fn program(&self) -> TestResult<AttachedProgram> {
        in_netns(&self.ns, || {
            let iface = l4lb::iface::Interface::by_name(&self.dev)?;
            Ok(l4lb::discover::find_l4lb(&iface)?)
        })
    }

    /// The running state: every map of the l4lb program, byte for byte, and
    /// the XDP programs of both interfaces.
    fn state(&self) -> TestResult<(Vec<u8>, Vec<AttachedProgram>, Vec<AttachedProgram>)> {
        in_netns(&self.ns, || {
            let dev = l4lb::iface::Interface::by_name(&self.dev)?;
            let peer = l4lb::iface::Interface::by_name(&self.peer)?;
            let on_dev = l4lb::discover::attached_programs(&dev)?;
            let on_peer = l4lb::discover::attached_programs(&peer)?;
            let program = l4lb::discover::find_l4lb(&dev)?;
            Ok((LbMaps::open(&program)?.dump()?, on_dev, on_peer))
        })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- cases

/// What a refused command must print.
enum Want {
    /// Found by l4lb: stderr is exactly `l4lb: error: MESSAGE\n`, exit 1.
    L4lb(String),
    /// Refused by the argument parser: stderr's first line is exactly this
    /// (it names the value), exit 2.
    Usage(String),
    /// A kernel refusal: the first line is `l4lb: error: MESSAGE`, then
    /// libbpf's last lines, indented; exit 1.
    Kernel(String),
}

fn l4lb_error(message: impl Into<String>) -> Want {
    Want::L4lb(message.into())
}

/// clap's first line for a value its parser refused with `why`.
fn invalid(value: &str, option: &str, why: &str) -> Want {
    Want::Usage(format!("error: invalid value '{value}' for '{option}': {why}"))
}

/// The problems of one outcome against what it must print, if any.
fn mismatch(out: &Outcome, want: &Want) -> Option<String> {
    let ok = match want {
        Want::L4lb(message) => out.code == Some(1) && out.stderr == format!("l4lb: error: {message}\n"),
        Want::Usage(line) => out.code == Some(2) && out.stderr.lines().next() == Some(line.as_str()),
        Want::Kernel(first) => {
            let mut lines = out.stderr.lines();
            out.code == Some(1)
                && lines.next() == Some(format!("l4lb: error: {first}").as_str())
                && lines.clone().count() >= 1
                && lines.all(|l| l.starts_with("  "))
        }
    };
    if ok && out.stdout.is_empty() {
        return None;
    }
    let expected = match want {
        Want::L4lb(m) => format!("exit 1, stderr exactly `l4lb: error: {m}`"),
        Want::Usage(l) => format!("exit 2, first line `{l}`"),
        Want::Kernel(f) => format!("exit 1, first line `l4lb: error: {f}`, then indented libbpf lines"),
    };
    Some(format!("want {expected}, nothing on stdout; got {}", out.describe()))
}

/// Runs each case (`wrapper` before the binary, args, what it must print)
/// against `b`, checking the running state after each; fails listing every
/// case that went wrong.
fn check_cases(b: &Balancer, cases: &[(Vec<&str>, Vec<String>, Want)]) -> TestResult {
    let before = b.state()?;
    let mut problems = Vec::new();
    for (wrapper, args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = b.l4lb_as(wrapper, &args);
        if let Some(problem) = mismatch(&out, want) {
            problems.push(format!("l4lb {}: {problem}", args.join(" ")));
        }
        if b.state()? != before {
            problems.push(format!("l4lb {}: the running state changed", args.join(" ")));
        }
    }
    println!(
        "{} bad inputs refused, the running state byte-identical after each",
        cases.len() - problems.len().min(cases.len())
    );
    ensure!(problems.is_empty(), "{} of {} cases:\n{}", problems.len(), cases.len(), problems.join("\n\n"));
    Ok(())
}

/// `l4lb ARGS` split on blanks (no wrapper).
fn case(args: &str, want: Want) -> (Vec<&'static str>, Vec<String>, Want) {
    (Vec::new(), args.split_whitespace().map(str::to_string).collect(), want)
}

/// `l4lb ARGS` with the arguments given one by one (for empty or blank ones).
fn case_args(args: &[&str], want: Want) -> (Vec<&'static str>, Vec<String>, Want) {
    (Vec::new(), args.iter().map(|a| a.to_string()).collect(), want)
}

// ---------------------------------------------------------------- tests

fn bad_interfaces() -> TestResult {
    let b = Balancer::new()?;
    let (dev, peer, ns) = (b.dev.as_str(), b.peer.as_str(), b.ns.as_str());
    let config = b.file("good.toml", CONFIG)?;
    let destinations = b.file("good.csv", DESTINATIONS)?;
    let id = b.program()?.id;
    let missing = |name: &str| {
        l4lb_error(format!(
            "no interface `{name}` in network namespace `{ns}` (l4lb sees the interfaces of the namespace it runs in: `ip netns exec NS l4lb ...` for another)"
        ))
    };
    let invalid_name = |name: &str, why: &str| l4lb_error(format!("`{name}` is not a valid interface name ({why})"));
    let mut cases = Vec::new();
    // A missing interface, named by every subcommand that takes one.
    for args in [
        "attach -i l4lbt-nosuch",
        "attach -i l4lbt-nosuch --mode skb --force",
        "detach -i l4lbt-nosuch",
        &format!("map -i l4lbt-nosuch -f {destinations}"),
        &format!("apply -i l4lbt-nosuch -c {config}"),
        &format!("apply -i l4lbt-nosuch -c {config} --dry-run"),
        "config -i l4lbt-nosuch",
        "stats -i l4lbt-nosuch --count 1 --interval 0.1",
        "status -i l4lbt-nosuch --json",
        "decap attach -i l4lbt-nosuch --addr 192.0.2.9",
        "decap detach -i l4lbt-nosuch",
        "decap stats -i l4lbt-nosuch --count 1",
    ] {
        cases.push(case(args, missing("l4lbt-nosuch")));
    }
    // Names the kernel cannot have.
    cases.push(case("status -i abcdefghijklmnop", invalid_name("abcdefghijklmnop", "16 bytes: at most 15")));
    cases.push(case(
        &format!("apply -i {dev}-much-too-long -c {config}"),
        invalid_name(&format!("{dev}-much-too-long"), &format!("{} bytes: at most 15", dev.len() + 14)),
    ));
    cases.push(case_args(&["status", "-i", ""], invalid_name("", "it is empty")));
    for name in ["a/b", "eth0:1", "a b", "..", "tab\there"] {
        cases.push(case_args(&["config", "-i", name], invalid_name(name, "no `/`, `:`, blanks, `.` or `..`")));
    }
    // Interfaces without the program asked for.
    cases.push(case(
        &format!("status -i {peer}"),
        l4lb_error(format!("no l4lb program on {peer} (attach one with `l4lb attach -i {peer}`)")),
    ));
    cases.push(case(&format!("detach -i {peer}"), l4lb_error(format!("no l4lb program on {peer}"))));
    cases.push(case(
        &format!("map -i {peer} -f {destinations}"),
        l4lb_error(format!("no l4lb program on {peer} (attach one with `l4lb attach -i {peer}`)")),
    ));
    cases.push(case(
        &format!("decap stats -i {dev}"),
        l4lb_error(format!("{dev} has XDP program `l4lb_balance` (id {id}, Driver mode), which is not l4lb decap")),
    ));
    cases.push(case(
        &format!("decap detach -i {dev}"),
        l4lb_error(format!(
            "{dev} has XDP program `l4lb_balance` (id {id}, Driver mode), which is not l4lb decap: leaving it"
        )),
    ));
    cases.push(case(
        &format!("attach -i {dev}"),
        l4lb_error(format!(
            "{dev} already has XDP program `l4lb_balance` (id {id}, Driver mode); use --force to replace it"
        )),
    ));
    cases.push(case(
        &format!("decap attach -i {dev} --addr 192.0.2.9"),
        l4lb_error(format!(
            "{dev} already has XDP program `l4lb_balance` (id {id}, Driver mode); use --force to replace it"
        )),
    ));
    // The option missing or without a value.
    cases.push(case("status", Want::Usage("error: the following required arguments were not provided:".into())));
    cases.push(case(
        "status -i",
        Want::Usage("error: a value is required for '--interface <DEV>' but none was supplied".into()),
    ));
    check_cases(&b, &cases)?;

    // The interface exists, in another namespace than the one l4lb runs in:
    // the error names the namespace l4lb looked in.
    let before = b.state()?;
    let out = run(BIN, &["status", "-i", dev]);
    let want = l4lb_error(format!(
        "no interface `{dev}` in {} (l4lb sees the interfaces of the namespace it runs in: `ip netns exec NS l4lb ...` for another)",
        l4lb::iface::current_netns()
    ));
    if let Some(problem) = mismatch(&out, &want) {
        return Err(fail(format!("status of an interface of another namespace: {problem}")));
    }
    ensure!(b.state()? == before, "status from another namespace changed the running state");
    Ok(())
}

fn bad_values() -> TestResult {
    let b = Balancer::new()?;
    let (dev, peer) = (b.dev.as_str(), b.peer.as_str());
    let d = b.file("good.csv", DESTINATIONS)?;
    let map = |rest: &str| format!("map -i {dev} -f {d} {rest}");
    let mut cases = vec![
        // --mode
        case(&format!("attach -i {dev} --force --mode turbo"), invalid("turbo", "--mode <MODE>", "").map_usage_prefix()),
        case(&format!("decap attach -i {peer} --mode hw"), invalid("hw", "--mode <MODE>", "").map_usage_prefix()),
        case(&format!("attach -i {dev} --force --mode"), Want::Usage("error: a value is required for '--mode <MODE>' but none was supplied".into())),
        // --seed
        case(&format!("attach -i {dev} --force --seed abc"), invalid("abc", "--seed <SEED>", "`abc` is not a 32-bit seed (decimal or 0x-prefixed hex)")),
        case(&format!("attach -i {dev} --force --seed -1"), invalid("-1", "--seed <SEED>", "`-1` is not a 32-bit seed (decimal or 0x-prefixed hex)")),
        case(&format!("attach -i {dev} --force --seed 4294967296"), invalid("4294967296", "--seed <SEED>", "`4294967296` is not a 32-bit seed (decimal or 0x-prefixed hex)")),
        case(&map("--seed 0x100000000"), invalid("0x100000000", "--seed <SEED>", "`0x100000000` is not a 32-bit seed (decimal or 0x-prefixed hex)")),
        case(&map("--seed 0xfoo"), invalid("0xfoo", "--seed <SEED>", "`0xfoo` is not a 32-bit seed (decimal or 0x-prefixed hex)")),
        // --mtu
        case(
            &format!("attach -i {dev} --force --mtu 100"),
            invalid("100", "--mtu <BYTES>", "MTU 100 is below L4LB_MIN_MTU = 576 (the IPv4 datagram every host accepts, RFC 791; the balancer's ICMP answers need it)"),
        ),
        case(&format!("attach -i {dev} --force --mtu 1500B"), invalid("1500B", "--mtu <BYTES>", "`1500B` is not an MTU (a number of bytes, 576 to 65535)")),
        // map -s: the outer source
        case(&map("-s 0.0.0.0"), invalid("0.0.0.0", "--source <ADDR>", "outer source address 0.0.0.0 is unspecified (0.0.0.0)")),
        case(&map("-s 224.0.0.1"), invalid("224.0.0.1", "--source <ADDR>", "outer source address 224.0.0.1 is multicast")),
        case(&map("-s 127.0.0.1"), invalid("127.0.0.1", "--source <ADDR>", "outer source address 127.0.0.1 is a loopback address")),
        case(&map("-s 255.255.255.255"), invalid("255.255.255.255", "--source <ADDR>", "outer source address 255.255.255.255 is the broadcast address")),
        case(
            &map("-s 2001:db8::2"),
            invalid("2001:db8::2", "--source <ADDR>", "`2001:db8::2` is IPv6: the outer source of `l4lb map` is IPv4 (IPv6 backends are configured with `l4lb apply`)"),
        ),
        case(&map("-s 192.0.2"), invalid("192.0.2", "--source <ADDR>", "`192.0.2` is not an IPv4 address")),
        case(&map("-s lb.example"), invalid("lb.example", "--source <ADDR>", "`lb.example` is not an IPv4 address")),
        // map --vip: address, port, protocol
        case(&map("--vip 0.0.0.0:80"), invalid("0.0.0.0:80", "--vip <VIP>", "VIP 0.0.0.0 is unspecified (0.0.0.0)")),
        case(&map("--vip 224.0.0.1:80"), invalid("224.0.0.1:80", "--vip <VIP>", "VIP 224.0.0.1 is multicast")),
        case(&map("--vip 255.255.255.255"), invalid("255.255.255.255", "--vip <VIP>", "VIP 255.255.255.255 is the broadcast address")),
        case(&map("--vip 127.0.0.1:80"), invalid("127.0.0.1:80", "--vip <VIP>", "VIP 127.0.0.1 is a loopback address")),
        case(&map("--vip [::1]:80"), invalid("[::1]:80", "--vip <VIP>", "VIP ::1 is a loopback address")),
        case(&map("--vip [::]:80"), invalid("[::]:80", "--vip <VIP>", "VIP :: is unspecified (::)")),
        case(&map("--vip ff02::1"), invalid("ff02::1", "--vip <VIP>", "VIP ff02::1 is multicast")),
        case(
            &map("--vip [::ffff:203.0.113.10]:80"),
            invalid("[::ffff:203.0.113.10]:80", "--vip <VIP>", "VIP ::ffff:203.0.113.10 is an IPv4-mapped IPv6 address (write the IPv4 address)"),
        ),
        case(
            &map("--vip 203.0.113.10:65536"),
            invalid("203.0.113.10:65536", "--vip <VIP>", "`203.0.113.10:65536` is not a VIP (the port is 0 to 65535; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip 203.0.113.10:-1"),
            invalid("203.0.113.10:-1", "--vip <VIP>", "`203.0.113.10:-1` is not a VIP (the port is 0 to 65535; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip 203.0.113.10:http"),
            invalid("203.0.113.10:http", "--vip <VIP>", "`203.0.113.10:http` is not a VIP (the port is 0 to 65535; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip 203.0.113.10:80/sctp"),
            invalid("203.0.113.10:80/sctp", "--vip <VIP>", "`203.0.113.10:80/sctp` is not a VIP (the protocol is tcp or udp; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip lb.example:80"),
            invalid("lb.example:80", "--vip <VIP>", "`lb.example:80` is not a VIP (not an IPv4 or IPv6 address; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip [2001:db8::10:443"),
            invalid("[2001:db8::10:443", "--vip <VIP>", "`[2001:db8::10:443` is not a VIP (no closing ]; expected ADDR[:PORT][/tcp|udp], IPv6 as [ADDR]:PORT)"),
        ),
        case(
            &map("--vip [2001:db8::10]:443"),
            l4lb_error("VIP 2001:db8::10 is IPv6 and destination files list IPv4 destinations: IPv6-in-IPv4 is not supported (use `l4lb apply`)"),
        ),
        // decap attach --addr (on the peer, which has no program: a good
        // value would attach there)
        case(&format!("decap attach -i {peer} --addr 224.0.0.1"), l4lb_error("cannot decapsulate for 224.0.0.1: it is multicast")),
        case(&format!("decap attach -i {peer} --addr 192.0.2.9 0.0.0.0"), l4lb_error("cannot decapsulate for 0.0.0.0: it is unspecified (0.0.0.0)")),
        case(&format!("decap attach -i {peer} --addr 127.0.0.2"), l4lb_error("cannot decapsulate for 127.0.0.2: it is a loopback address")),
        case(&format!("decap attach -i {peer} --addr ::"), l4lb_error("cannot decapsulate for ::: it is unspecified (::)")),
        case(&format!("decap attach -i {peer} --addr ::1"), l4lb_error("cannot decapsulate for ::1: it is a loopback address")),
        case(&format!("decap attach -i {peer} --addr ff02::1"), l4lb_error("cannot decapsulate for ff02::1: it is multicast")),
        case(
            &format!("decap attach -i {peer} --addr ::ffff:192.0.2.9"),
            l4lb_error("cannot decapsulate for ::ffff:192.0.2.9: it is an IPv4-mapped IPv6 address (write the IPv4 address)"),
        ),
        case(&format!("decap attach -i {peer} --addr 192.0.2.300"), invalid("192.0.2.300", "--addr <ADDR>...", "invalid IP address syntax")),
        case(&format!("decap attach -i {peer} --addr"), Want::Usage("error: a value is required for '--addr <ADDR>...' but none was supplied".into())),
        // sampling and bench values
        case(&format!("stats -i {dev} --interval 0"), invalid("0", "--interval <INTERVAL>", "`0` is not an interval between 0.05 and 3600 seconds")),
        case(&format!("stats -i {dev} --interval soon"), invalid("soon", "--interval <INTERVAL>", "`soon` is not an interval between 0.05 and 3600 seconds")),
        case(&format!("stats -i {dev} --count 0"), invalid("0", "--count <N>", "0 is not in 1..18446744073709551615")),
        case(&format!("decap stats -i {peer} --count many"), invalid("many", "--count <N>", "invalid digit found in string")),
        case("bench --rounds 0", invalid("0", "--rounds <ROUNDS>", "0 is not in 1..=100")),
        case("bench --seconds 100", invalid("100", "--seconds <SECONDS>", "`100` is not a duration between 0.1 and 60 seconds")),
        // options that do not exist
        case(&format!("map -i {dev} -f {d} --weight 2"), Want::Usage("error: unexpected argument '--weight' found".into())),
        case("balance -i eth0", Want::Usage("error: unrecognized subcommand 'balance'".into())),
    ];
    // More addresses than the decap program holds.
    let many: Vec<String> = (1..=65).map(|i| format!("192.0.2.{i}")).collect();
    let mut args = vec!["decap".to_string(), "attach".into(), "-i".into(), peer.to_string(), "--addr".into()];
    args.extend(many);
    cases.push((Vec::new(), args, l4lb_error("65 addresses to decapsulate for; at most 64")));
    check_cases(&b, &cases)
}

impl Want {
    /// clap's `[possible values: ...]` goes on the next line: the first line
    /// of an unknown --mode value ends at the option.
    fn map_usage_prefix(self) -> Want {
        match self {
            Want::Usage(line) => Want::Usage(line.trim_end_matches(": ").to_string()),
            other => other,
        }
    }
}

fn bad_files() -> TestResult {
    let b = Balancer::new()?;
    let dev = b.dev.as_str();
    let apply = |path: &str| format!("apply -i {dev} -c {path}");
    let map = |path: &str| format!("map -i {dev} -f {path}");
    let mut cases = Vec::new();

    // Files that are not readable text of a sane size, for both commands.
    // (The missing file, the directory, empty, comment-only, NUL and invalid
    // UTF-8 files are cases of tests/apply.rs and tests/end_to_end.rs.)
    let fifo = b.path("fifo");
    nix::unistd::mkfifo(fifo.as_str(), nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    // 1 TiB, sparse: read, it would take the time-out or the memory.
    let huge = b.path("huge");
    std::fs::File::create(&huge)?.set_len(1 << 40)?;
    let locked = b.file("locked", CONFIG)?;
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000))?;
    for (command, what, limit) in [
        (&apply as &dyn Fn(&str) -> String, "configuration file", l4lb::config::MAX_FILE_BYTES),
        (&map, "destination file", l4lb::destinations::MAX_FILE_BYTES),
    ] {
        cases.push(case(&command(&fifo), l4lb_error(format!("{fifo}: not a regular file"))));
        cases.push(case(
            &command(&huge),
            l4lb_error(format!("{huge}: 1099511627776 bytes is too large for a {what} (limit {limit})")),
        ));
        // Root reads any file: the unreadable one is read by a root without
        // CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; and /proc/self/mem is a
        // regular file whose first read fails for anyone.
        let args: Vec<String> = command(&locked).split_whitespace().map(str::to_string).collect();
        cases.push((
            vec!["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"],
            args,
            l4lb_error(format!("{locked}: cannot read: Permission denied (os error 13)")),
        ));
        cases.push(case(
            &command("/proc/self/mem"),
            l4lb_error("/proc/self/mem: cannot read: Input/output error (os error 5)"),
        ));
    }

    // Destination files: addresses and MACs the tests of end_to_end do not try.
    let good = "10.0.1.1, 02:00:0a:00:01:01\n";
    for (name, row, message) in [
        ("broadcast-mac", "10.0.1.2, ff:ff:ff:ff:ff:ff", "MAC FF:FF:FF:FF:FF:FF is not a unicast address"),
        ("zero-mac", "10.0.1.2, 00:00:00:00:00:00", "MAC 00:00:00:00:00:00 is not a unicast address"),
        (
            "short-mac",
            "10.0.1.2, 02:00:0a:00:01",
            "`02:00:0a:00:01` is not a MAC address (expected six hex pairs like 00:15:4d:59:7f:ad)",
        ),
        ("multicast-ip", "239.1.1.1, 02:00:0a:00:01:02", "address 239.1.1.1 is multicast"),
        ("loopback-ip", "127.0.0.1, 02:00:0a:00:01:02", "address 127.0.0.1 is a loopback address"),
        ("unspecified-ip", "0.0.0.0, 02:00:0a:00:01:02", "address 0.0.0.0 is unspecified (0.0.0.0)"),
        ("broadcast-ip", "255.255.255.255, 02:00:0a:00:01:02", "address 255.255.255.255 is the broadcast address"),
        ("ipv6-ip", "2001:db8::1, 02:00:0a:00:01:02", "`2001:db8::1` is not an IPv4 address"),
        ("swapped", "02:00:0a:00:01:02, 10.0.1.2", "`02:00:0a:00:01:02` is not an IPv4 address"),
        ("semicolons", "10.0.1.2; 02:00:0a:00:01:02", "expected 2 fields `IP, MAC`, found 1"),
    ] {
        let path = b.file(&format!("{name}.csv"), format!("{good}{row}\n"))?;
        cases.push(case(&map(&path), l4lb_error(format!("{path}:2: {message}"))));
    }

    // Configuration files: type errors and values apply.rs does not try.
    // HEAD is 4 lines; a service starts on line 6.
    const HEAD: &str =
        "[global]\nsource_v4 = \"192.0.2.2\"\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:01\"\n";
    let service = |vip: &str, proto: &str, port: &str, extra: &str, backends: &str| {
        format!("{HEAD}\n[[service]]\nvip = {vip}\nprotocol = {proto}\nport = {port}\n{extra}backends = {backends}\n")
    };
    let one = "[ { address = \"198.18.0.1\" } ]";
    let tcp80 = |backends: &str| service("\"203.0.113.10\"", "\"tcp\"", "80", "", backends);
    let configs: Vec<(&str, String, usize, String)> = vec![
        ("weight-string", tcp80("[ { address = \"198.18.0.1\", weight = \"2\" } ]"), 10, "invalid type: string \"2\", expected an integer".into()),
        ("weight-negative", tcp80("[ { address = \"198.18.0.1\", weight = -1 } ]"), 10, "weight -1 is out of range (0 to MAX_WEIGHT = 65535; 0 drains)".into()),
        ("weight-float", tcp80("[ { address = \"198.18.0.1\", weight = 1.5 } ]"), 10, "invalid type: floating point `1.5`, expected an integer".into()),
        ("port-negative", service("\"203.0.113.10\"", "\"tcp\"", "-1", "", one), 9, "port -1 is out of range (0 to 65535; 0 = every port)".into()),
        ("port-float", service("\"203.0.113.10\"", "\"tcp\"", "80.5", "", one), 9, "invalid type: floating point `80.5`, expected an integer".into()),
        ("vip-integer", service("10", "\"tcp\"", "80", "", one), 7, "invalid type: integer `10`, expected a string".into()),
        ("protocol-array", service("\"203.0.113.10\"", "[\"tcp\"]", "80", "", one), 8, "invalid type: sequence, expected a string".into()),
        ("hash-ports-integer", service("\"203.0.113.10\"", "\"udp\"", "53", "hash_ports = 0\n", one), 10, "invalid type: integer `0`, expected a boolean".into()),
        ("backends-string", tcp80("\"198.18.0.1\""), 10, "invalid type: string \"198.18.0.1\", expected a sequence".into()),
        ("backend-string", tcp80("[ \"198.18.0.1\" ]"), 10, "invalid type: string \"198.18.0.1\", expected a table".into()),
        ("global-integer", "global = 1\n".into(), 1, "invalid type: integer `1`, expected a table".into()),
        ("service-table", format!("{HEAD}\n[service]\nvip = \"203.0.113.10\"\n"), 6, "invalid type: map, expected a sequence".into()),
        ("seed-string", format!("{HEAD}hash_seed = \"random\"\n"), 5, "invalid type: string \"random\", expected an integer".into()),
        ("seed-negative", format!("{HEAD}hash_seed = -1\n"), 5, "hash_seed -1 is out of range (0 to 0xffffffff)".into()),
        ("seed-too-big", format!("{HEAD}hash_seed = 0x100000000\n"), 5, "hash_seed 4294967296 is out of range (0 to 0xffffffff)".into()),
        ("source-v4-is-ipv6", "[global]\nsource_v4 = \"2001:db8::2\"\n".into(), 2, "source_v4 2001:db8::2 is not an IPv4 address".into()),
        ("source-v6-is-ipv4", "[global]\nsource_v6 = \"192.0.2.2\"\n".into(), 2, "source_v6 192.0.2.2 is not an IPv6 address".into()),
        ("source-loopback", "[global]\nsource_v4 = \"127.0.0.1\"\n".into(), 2, "source_v4 127.0.0.1 is a loopback address".into()),
        ("gateway-broadcast", "[global]\ngateway_mac = \"ff:ff:ff:ff:ff:ff\"\n".into(), 2, "gateway_mac ff:ff:ff:ff:ff:ff is not a unicast MAC address".into()),
        ("gateway-zero", "[global]\ngateway_mac = \"00:00:00:00:00:00\"\n".into(), 2, "gateway_mac 00:00:00:00:00:00 is not a unicast MAC address".into()),
        ("vip-mapped", service("\"::ffff:203.0.113.10\"", "\"tcp\"", "80", "", one), 7, "vip ::ffff:203.0.113.10 is an IPv4-mapped IPv6 address (write the IPv4 address)".into()),
        ("vip-broadcast", service("\"255.255.255.255\"", "\"tcp\"", "80", "", one), 7, "vip 255.255.255.255 is the broadcast address".into()),
        ("backend-loopback", tcp80("[ { address = \"::1\" } ]"), 10, "backend ::1 is a loopback address".into()),
        ("protocol-any-on-vip", service("\"203.0.113.10\"", "\"any\"", "80", "", one), 8, "protocol \"any\" is only for the catch-all service (vip = \"*\"): use \"tcp\" or \"udp\"".into()),
        ("hash-ports-tcp", service("\"203.0.113.10\"", "\"tcp\"", "80", "hash_ports = false\n", one), 10, "service 203.0.113.10:80/tcp: hash_ports = false is for UDP services only (TCP flows always hash their ports)".into()),
        ("duplicate-catch-all", format!("{HEAD}\n[[service]]\nvip = \"*\"\nbackends = {one}\n\n[[service]]\nvip = \"*\"\nprotocol = \"any\"\nbackends = {one}\n"), 11, "service * is already defined on line 7".into()),
        ("duplicate-backend-other-spelling", tcp80("[ { address = \"2001:db8::1\" }, { address = \"2001:0db8:0::0001\" } ]"), 10, "service 203.0.113.10:80/tcp: backend 2001:db8::1 is already listed on line 10".into()),
    ];
    for (name, text, line, message) in configs {
        let path = b.file(&format!("{name}.toml"), text)?;
        cases.push(case(&apply(&path), l4lb_error(format!("{path}:{line}: {message}"))));
        // A dry run checks the same way.
        if name == "weight-string" {
            cases.push(case(&format!("{} --dry-run", apply(&path)), l4lb_error(format!("{path}:{line}: {message}"))));
        }
    }
    check_cases(&b, &cases)
}

/// The subcommands, each with arguments that would work with root.
fn every_subcommand(b: &Balancer) -> Vec<Vec<String>> {
    let (dev, peer) = (b.dev.as_str(), b.peer.as_str());
    let config = b.path("lb.toml");
    let missing = b.path("missing.csv");
    [
        format!("attach -i {dev} --force"),
        format!("attach -i {peer} --mode skb"),
        format!("detach -i {dev}"),
        format!("map -i {dev} -f {missing}"),
        format!("apply -i {dev} -c {config}"),
        format!("config -i {dev}"),
        format!("stats -i {dev} --count 1 --interval 0.1"),
        format!("status -i {dev}"),
        "bench --rounds 1 --seconds 0.1".to_string(),
        format!("decap attach -i {peer} --addr 192.0.2.9"),
        format!("decap detach -i {peer}"),
        format!("decap stats -i {peer} --count 1"),
        "status -i l4lbt-nosuch".to_string(),
    ]
    .into_iter()
    .map(|args| args.split_whitespace().map(str::to_string).collect())
    .collect()
}

const WHY: &str =
    "(CAP_SYS_ADMIN and CAP_NET_ADMIN, to load BPF programs, attach XDP and open BPF maps; CAP_BPF is not enough)";

fn without_privileges() -> TestResult {
    let b = Balancer::new()?;
    let nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"];
    let no_sys_admin = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin"];
    // What the brief of issue 5 thought enough: CAP_BPF and CAP_NET_ADMIN
    // (and CAP_PERFMON): the kernel asks CAP_SYS_ADMIN to open a program by id.
    let bpf_only = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon,+net_admin,+dac_override"];
    let no_net_admin = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"];
    let container = |lacks: &str| {
        l4lb_error(format!(
            "l4lb needs CAP_SYS_ADMIN and CAP_NET_ADMIN (to load BPF programs, attach XDP and open BPF maps; CAP_BPF is not enough), and this root process lacks {lacks}: in a container, run it with --cap-add SYS_ADMIN --cap-add NET_ADMIN (or --privileged)"
        ))
    };
    let mut cases = Vec::new();
    for args in every_subcommand(&b) {
        cases.push((
            nobody.to_vec(),
            args.clone(),
            l4lb_error(format!(
                "l4lb needs root {WHY}, and uid 65534 lacks CAP_SYS_ADMIN and CAP_NET_ADMIN: run it with sudo"
            )),
        ));
        cases.push((no_sys_admin.to_vec(), args.clone(), container("CAP_SYS_ADMIN")));
        cases.push((bpf_only.to_vec(), args.clone(), container("CAP_SYS_ADMIN")));
        cases.push((no_net_admin.to_vec(), args, container("CAP_NET_ADMIN")));
    }
    check_cases(&b, &cases)?;

    // The check is on capabilities, not on the user id: a user given
    // CAP_SYS_ADMIN and CAP_NET_ADMIN (ambient) reads the balancer.
    let with_caps = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=+sys_admin,+net_admin",
        "--ambient-caps=+sys_admin,+net_admin",
    ];
    let out = b.l4lb_as(&with_caps, &["status", "-i", &b.dev]).success()?;
    ensure!(
        out.stdout.contains("203.0.113.10:80/tcp"),
        "status as uid 65534 with the capabilities: {}",
        out.describe()
    );
    Ok(())
}

fn without_bpffs() -> TestResult {
    let b = Balancer::new()?;
    let host_bpffs = || -> Vec<String> {
        std::fs::read_dir("/sys/fs/bpf")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    let pinned_before = host_bpffs();
    // A private mount namespace with every bpf file system unmounted, then
    // the balancer's network namespace entered without touching mounts
    // (`ip netns exec` would mount a new sysfs).
    let script = format!(
        "set -e
while m=$(awk '$3 == \"bpf\" {{ print $2; exit }}' /proc/self/mounts) && [ -n \"$m\" ]; do umount \"$m\"; done
if awk '$3 == \"bpf\"' /proc/self/mounts | grep -q .; then echo 'bpffs still mounted' >&2; exit 97; fi
exec nsenter --net=/run/netns/{} {BIN} \"$@\"",
        b.ns
    );
    let l4lb = |args: &[&str]| {
        let mut full = vec!["-m", "--propagation", "private", "sh", "-c", &script, "sh"];
        full.extend_from_slice(args);
        run("unshare", &full)
    };
    let (dev, peer) = (b.dev.as_str(), b.peer.as_str());
    let config = b.path("lb.toml");
    let destinations = b.file("d.csv", DESTINATIONS)?;
    l4lb(&["detach", "-i", dev]).success()?;
    l4lb(&["attach", "-i", dev, "--seed", "7"]).success()?;
    let out = l4lb(&["apply", "-i", dev, "-c", &config]).success()?;
    ensure!(out.stdout.contains("applied"), "apply without bpffs: {}", out.describe());
    l4lb(&["map", "-i", dev, "-f", &destinations, "--vip", "203.0.113.20:443"]).success()?;
    let out = l4lb(&["status", "-i", dev]).success()?;
    ensure!(out.stdout.contains("203.0.113.20:443/tcp"), "status without bpffs: {}", out.describe());
    let printed = l4lb(&["config", "-i", dev]).success()?.stdout;
    ensure!(printed.contains("hash_seed = 0x1234abcd"), "config without bpffs:\n{printed}");
    l4lb(&["stats", "-i", dev, "--count", "1", "--interval", "0.1", "--json"]).success()?;
    l4lb(&["decap", "attach", "-i", peer, "--addr", "192.0.2.9"]).success()?;
    l4lb(&["decap", "stats", "-i", peer, "--count", "1", "--interval", "0.1"]).success()?;
    l4lb(&["decap", "detach", "-i", peer]).success()?;
    l4lb(&["detach", "-i", dev]).success()?;
    ensure!(host_bpffs() == pinned_before, "something was pinned: /sys/fs/bpf {pinned_before:?} -> {:?}", host_bpffs());
    println!("without bpffs: attach, apply, map, status, config, stats, decap attach/stats/detach, detach all work");
    Ok(())
}

/// Binds an abstract socket named argv[1] and listens, as l4lb's update
/// lock does; prints its pid once it holds it.
const SQUAT_LOCK: &str = "import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind('\\0' + sys.argv[1])
s.listen(1)
print(os.getpid(), flush=True)
time.sleep(120)";

/// Connections queued on the listening abstract socket `name` in namespace
/// `ns` (`ss -xl`'s Recv-Q); 0 if nothing listens there.
fn queued_on(ns: &str, name: &str) -> TestResult<u64> {
    let out = run("ip", &["netns", "exec", ns, "ss", "-xlH"]).success()?;
    let at = format!("@{name}");
    Ok(out
        .stdout
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(4) == Some(&at.as_str()))
        .and_then(|fields| fields.get(2)?.parse().ok())
        .unwrap_or(0))
}

/// A process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The update lock is an abstract socket, so the network namespace's own:
/// the same name held in another namespace (the test's) does not hold an
/// update up; held in the balancer's namespace by a process of l4lb's user,
/// the update waits for it and says so after two seconds; held there by
/// another user, the update is refused at once, naming the holder, and the
/// running state stays as it was.
fn update_lock_per_namespace() -> TestResult {
    let b = Balancer::new()?;
    let config = b.file("lb.toml", CONFIG)?;
    let name = l4lb::device::update_lock_name(&b.dev);
    let take = || match l4lb::netns_lock::try_lock(&name)? {
        l4lb::netns_lock::Tried::Taken(lock) => Ok(lock),
        l4lb::netns_lock::Tried::Held => Err(fail(format!("@{name} is held already"))),
    };

    let outside = take()?;
    b.l4lb(&["apply", "-i", &b.dev, "-c", &config]).success()?;
    drop(outside);

    let inside = in_netns(&b.ns, take)?;
    let (out, done) = std::thread::scope(|scope| -> TestResult<_> {
        let apply = scope.spawn(|| {
            let out = b.l4lb(&["apply", "-i", &b.dev, "-c", &config]);
            (out, Instant::now())
        });
        // The waiter asks who holds the lock as it starts waiting (a
        // connection queued on the lock's socket); then its wait is let run
        // past the point where it says what it waits for.
        let asked = Instant::now();
        while queued_on(&b.ns, &name)? == 0 {
            ensure!(asked.elapsed() < Duration::from_secs(20), "apply never asked who holds @{name}");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(l4lb::netns_lock::QUIET_WAIT + Duration::from_millis(500));
        let released = Instant::now();
        drop(inside);
        let (out, done) = apply.join().expect("the apply thread");
        Ok((out, done.checked_duration_since(released)))
    })?;
    let out = out.success()?;
    ensure!(done.is_some(), "apply finished while its namespace's update lock was held: {}", out.describe());
    let waiting = format!("waiting for {}'s update lock (@{name}), held by pid {}\n", b.dev, std::process::id());
    ensure!(out.stderr.contains(&waiting), "no `{}` from apply: {}", waiting.trim_end(), out.describe());

    let mut squatter = KillOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &b.ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
            // The system's python3 (scripts/install-deps.sh): root's PATH
            // may lead into directories that uid 65534 cannot enter.
            .args(["/usr/bin/python3", "-c", SQUAT_LOCK, &name])
            .stdout(std::process::Stdio::piped())
            .spawn()?,
    );
    let mut pid = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.0.stdout.as_mut().expect("piped stdout")),
        &mut pid,
    )?;
    let pid = pid.trim();
    ensure!(pid.parse::<u32>().is_ok(), "the squatter did not take @{name}: {pid:?}");
    check_cases(
        &b,
        &[case(
            &format!("apply -i {} -c {config}", b.dev),
            l4lb_error(format!(
                "{}'s update lock (@{name}) is held by pid {pid} of uid 65534, not by an l4lb of uid 0",
                b.dev
            )),
        )],
    )
}

fn memlock_zero() -> TestResult {
    let b = Balancer::new()?;
    let zero = ["prlimit", "--memlock=0:0"];
    let config = b.path("lb.toml");
    let release = nix::sys::utsname::uname()?.release().to_string_lossy().into_owned();
    let version: Vec<u32> =
        release.split(|c: char| !c.is_ascii_digit()).take(2).map(|n| n.parse().unwrap_or(0)).collect();
    let attach = b.l4lb_as(&zero, &["attach", "-i", &b.dev, "--force"]);
    if version[..] < [5, 11][..] {
        // Before 5.11 BPF memory counts against RLIMIT_MEMLOCK: libbpf
        // raises the limit itself with CAP_SYS_RESOURCE, else the error
        // carries its advice.
        ensure!(
            attach.code == Some(0) || attach.stderr.contains("ulimit -l"),
            "kernel {release}: {}",
            attach.describe()
        );
        return Ok(());
    }
    attach.success()?;
    let out = b.l4lb_as(&zero, &["apply", "-i", &b.dev, "-c", &config]).success()?;
    ensure!(out.stdout.contains("applied"), "{}", out.describe());
    b.l4lb_as(&zero, &["decap", "attach", "-i", &b.peer, "--addr", "192.0.2.9"]).success()?;
    b.l4lb_as(&zero, &["status", "-i", &b.dev]).success()?;
    println!("kernel {release}: attach, apply and decap attach work with RLIMIT_MEMLOCK 0 (BPF memory is charged to the memory cgroup)");
    Ok(())
}

fn kernel_refusals() -> TestResult {
    let b = Balancer::new()?;
    let (dev, peer) = (b.dev.as_str(), b.peer.as_str());
    let cases = vec![
        // veth cannot run offloaded programs: the maps are refused first.
        case(
            &format!("attach -i {peer} --mode hw"),
            Want::Kernel(format!("the kernel refused the l4lb program ({peer} may not support XDP hardware offload): Invalid argument (os error 22)")),
        ),
        case(&format!("decap attach -i {peer} --mode hw"), invalid("hw", "--mode <MODE>", "").map_usage_prefix()),
        // lo has no native XDP.
        case(
            "attach -i lo",
            l4lb_error("attaching to lo in Driver mode failed: lo may lack native XDP support (try --mode skb) (Operation not supported (os error 95))"),
        ),
        case(
            "decap attach -i lo --addr 192.0.2.9",
            l4lb_error("attaching to lo in Driver mode failed: lo may lack native XDP support (try --mode skb) (Operation not supported (os error 95))"),
        ),
        // Generic mode over the driver-mode program, without --force.
        case(
            &format!("attach -i {dev} --mode skb"),
            l4lb_error(format!("{dev} already has XDP program `l4lb_balance` (id {}, Driver mode); use --force to replace it", b.program()?.id)),
        ),
    ];
    check_cases(&b, &cases)?;
    let lo = in_netns(&b.ns, || Ok(l4lb::discover::attached_programs(&l4lb::iface::Interface::by_name("lo")?)?))?;
    ensure!(lo.is_empty(), "refused attaches left {lo:?} on lo");
    Ok(())
}

/// The kernel's verifier rejects a program: the error l4lb builds
/// (`attach::refused`, used by `attach` and `decap attach`) ends with the
/// verifier's last lines, which say why. The shipped programs pass the
/// verifier, so a small one that reads the packet without a bounds check is
/// compiled here and loaded through libbpf with l4lb's log capture.
fn verifier_rejection() -> TestResult {
    let dir = std::env::temp_dir().join(format!("{PREFIX}-{}-verifier", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> TestResult {
        let source = dir.join("unchecked.bpf.c");
        let object = dir.join("unchecked.bpf.o");
        std::fs::write(
            &source,
            "struct xdp_md { unsigned int data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex; };\n\
             __attribute__((section(\"xdp\"), used)) int l4lbt_unchecked(struct xdp_md *ctx)\n\
             {\n    return *(volatile unsigned char *)(long)ctx->data; /* no check against data_end */\n}\n\
             char _license[] __attribute__((section(\"license\"), used)) = \"GPL\";\n",
        )?;
        let (source, object) = (source.display().to_string(), object.display().to_string());
        run("clang", &["-O2", "-target", "bpf", "-c", &source, "-o", &object]).success()?;
        l4lb::libbpf_log::capture();
        let open = libbpf_rs::ObjectBuilder::default().open_file(&object)?;
        let err = match open.load() {
            Ok(_) => return Err(fail("the verifier accepted a packet read without a bounds check")),
            Err(err) => err,
        };
        let message = format!("{:#}", l4lb::attach::refused("l4lb", "", err));
        let lines: Vec<&str> = message.lines().collect();
        ensure!(
            lines[0] == "the kernel refused the l4lb program: Permission denied (os error 13)",
            "first line: {message}"
        );
        ensure!(
            (2..=13).contains(&lines.len()) && lines[1..].iter().all(|l| l.starts_with("  ")),
            "not at most 12 indented lines of libbpf's log: {message}"
        );
        ensure!(
            lines.iter().any(|l| l.contains("-- END PROG LOAD LOG --")),
            "the end of the verifier log is not there: {message}"
        );
        ensure!(
            lines.iter().any(|l| l.contains("invalid access to packet")),
            "the verifier's reason is not among the last lines: {message}"
        );
        println!("verifier rejection: {message}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
