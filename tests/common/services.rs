//! For the suites that drive the services control plane through the `l4lb`
//! binary (end_to_end, under_load, apply): the attached l4lb program under
//! BPF_PROG_TEST_RUN (the program the kernel runs, with the maps the host
//! wrote), frames of both families, what an output frame's outer header says,
//! and which backend the running state (read back through the library)
//! predicts for a flow, following the datapath semantics of issue 4, and,
//! for services that track flows, with a model of the flow table's pins
//! (include/l4lb.h, "Connection tracking").

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use l4lb::apply::Snapshot;
use l4lb::config::{Protocol, ServiceKey};
use l4lb::flow_hash::Flow;
use l4lb::state::{Running, RunningBackend, RunningService};

use super::wire::{TCP, UDP, XDP_PASS, XDP_TX};
use super::{fail, TestResult};

/// A loaded XDP program, by id (ids are global: any namespace will do).
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    pub fn from_id(id: u32) -> TestResult<Self> {
        // SAFETY: plain syscall wrapper.
        let fd = unsafe { libbpf_sys::bpf_prog_get_fd_by_id(id) };
        ensure!(fd >= 0, "opening program id {id}: {}", std::io::Error::from_raw_os_error(-fd));
        // SAFETY: fd was just returned to us.
        Ok(Program { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// One BPF_PROG_TEST_RUN (repeat 1): the verdict and the output frame.
    pub fn run(&self, frame: &[u8]) -> TestResult<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        // SAFETY: plain C struct; all-zero is its documented default.
        let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
        opts.data_in = frame.as_ptr().cast();
        opts.data_size_in = frame.len() as u32;
        opts.data_out = out.as_mut_ptr().cast();
        opts.data_size_out = out.len() as u32;
        opts.repeat = 1;
        // SAFETY: every pointer in opts is valid for the sizes given, for the call.
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(self.fd.as_raw_fd(), &mut opts) };
        ensure!(rc == 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::from_raw_os_error(-rc));
        out.truncate(opts.data_size_out as usize);
        Ok((opts.retval, out))
    }

    /// What the program did with `probe`'s frame (a TCP probe is a SYN).
    pub fn verdict(&self, probe: &Probe) -> TestResult<Verdict> {
        self.verdict_as(probe, Segment::Syn)
    }

    /// What the program did with `probe`'s frame as a `segment` (UDP
    /// probes are the same datagram either way).
    pub fn verdict_as(&self, probe: &Probe, segment: Segment) -> TestResult<Verdict> {
        let (verdict, out) = self.run(&probe.frame_as(segment))?;
        Ok(match verdict {
            XDP_TX => Verdict::Backend(outer_destination(&out).ok_or_else(|| fail(format!("{probe:?}: XDP_TX output is not encapsulated")))?),
            XDP_PASS => Verdict::Pass,
            other => Verdict::Dropped(other),
        })
    }
}

/// What the datapath does with a frame, as far as these suites care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Encapsulated to this backend address.
    Backend(IpAddr),
    /// Handed to the stack (no service takes it).
    Pass,
    /// Any other verdict (XDP_DROP, XDP_ABORTED).
    Dropped(u32),
}

/// The outer destination of an encapsulated frame.
pub fn outer_destination(out: &[u8]) -> Option<IpAddr> {
    match out.get(12..14)? {
        [0x08, 0x00] => {
            let a: [u8; 4] = out.get(30..34)?.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        [0x86, 0xdd] => {
            let a: [u8; 16] = out.get(38..54)?.try_into().ok()?;
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

/// A client's TCP or UDP packet to a destination address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Probe {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// What a TCP probe's segment is: a connection's first (SYN set, ACK
/// clear), or one of an established connection (ACK set, no SYN). The
/// datapath pins a flow on its first segment without SYN; a SYN takes the
/// table's backend and pins only over an existing pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Segment {
    #[default]
    Syn,
    Established,
}

impl Probe {
    /// The frame, a SYN if TCP (Ethernet addresses are arbitrary: the
    /// program does not check them).
    pub fn frame(&self) -> Vec<u8> {
        self.frame_as(Segment::Syn)
    }

    /// The frame, as `segment` if TCP.
    pub fn frame_as(&self, segment: Segment) -> Vec<u8> {
        let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => panic!("probe of mixed families: {self:?}"),
        };
        let payload = [0x5au8; 16];
        let mut frame = Vec::new();
        if self.proto == TCP {
            let tcp = ip.tcp(self.sport, self.dport, 1, 64240);
            let tcp = match segment {
                Segment::Syn => tcp.syn(),
                Segment::Established => tcp.ack(1),
            };
            tcp.write(&mut frame, &payload).expect("building a TCP frame");
        } else {
            ip.udp(self.sport, self.dport).write(&mut frame, &payload).expect("building a UDP frame");
        }
        frame
    }

    fn protocol(&self) -> Protocol {
        if self.proto == TCP {
            Protocol::Tcp
        } else {
            Protocol::Udp
        }
    }
}

/// The service that takes `probe` (spec step 2): its exact VIP, else a
/// port-0 VIP of its address, else the catch-all.
pub fn service_of<'a>(running: &'a Running, probe: &Probe) -> Option<&'a RunningService> {
    let key = |port| ServiceKey::Vip { addr: probe.dst, protocol: probe.protocol(), port };
    running.service(&key(probe.dport)).or_else(|| running.service(&key(0))).or_else(|| running.service(&ServiceKey::CatchAll))
}

/// What the running state says the datapath does with `probe` (spec steps
/// 2 to 5): the backend's address, Pass, or Dropped(XDP_DROP) for an empty
/// slot. Pins are not looked at: right for SYNs and for flows that were
/// never pinned (see `predict_pinned`).
pub fn predict(running: &Running, probe: &Probe) -> Verdict {
    match balanced_by(running, probe) {
        None => Verdict::Pass,
        Some(service) => match slot_backend(running, service, probe) {
            Some(b) => Verdict::Backend(b.backend.addr),
            None => Verdict::Dropped(super::wire::XDP_DROP),
        },
    }
}

/// The service that balances `probe`; None: the datapath passes it (no
/// service, or an IPv6 client of a catch-all with IPv4 backends).
pub fn balanced_by<'a>(running: &'a Running, probe: &Probe) -> Option<&'a RunningService> {
    let service = service_of(running, probe)?;
    let ipv4_backends = service.backends.iter().any(|b| b.backend.addr.is_ipv4());
    if probe.src.is_ipv6() && ipv4_backends {
        return None;
    }
    Some(service)
}

/// The flow as the datapath hashes it for `service`.
fn hashed_flow(service: &RunningService, probe: &Probe) -> Flow {
    let hash_ports = probe.proto == TCP || service.hash_ports;
    Flow {
        saddr: probe.src,
        daddr: probe.dst,
        sport: if hash_ports { probe.sport } else { 0 },
        dport: if hash_ports { probe.dport } else { 0 },
        proto: probe.proto,
    }
}

/// The backend `probe`'s slot names in `service`'s table (None: an empty
/// slot, or a number that is not one of the service's backends).
pub fn slot_backend<'a>(running: &Running, service: &'a RunningService, probe: &Probe) -> Option<&'a RunningBackend> {
    let seed = running.global.hash_seed.unwrap_or(0);
    let number = service.table[hashed_flow(service, probe).slot(seed)];
    service.backends.iter().find(|b| b.number == number)
}

/// The key of a pin in l4lb_flows: the flow as it is hashed (ports 0 for
/// UDP services that do not hash ports), so two probes may share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A pin: the backend number and address a flow was pinned to, and (for
/// the reports) the service that pinned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub service: ServiceKey,
    pub number: u32,
    pub addr: IpAddr,
}

/// The test's copy of l4lb_flows, as far as the probes sent through a
/// model (`predict_pinned` + `Pins::record`) made it. Pins are never
/// removed, as in the kernel (short of LRU eviction).
#[derive(Debug, Default, Clone)]
pub struct Pins {
    map: HashMap<PinKey, Pin>,
}

impl Pins {
    pub fn get(&self, key: &PinKey) -> Option<&Pin> {
        self.map.get(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Takes what the datapath did to the flow table for a prediction.
    pub fn record(&mut self, prediction: &Prediction) {
        if let (Some(key), Some(pin)) = (prediction.key, prediction.pinned) {
            self.map.insert(key, pin);
        }
    }
}

/// What a packet does to its flow, by the datapath's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub verdict: Verdict,
    /// The flow's pin key (None: passed, or the service does not track flows).
    pub key: Option<PinKey>,
    /// The pin the flow had before this packet.
    pub previous: Option<Pin>,
    /// Whether that pin still held (its number names the same backend in
    /// this service) and the packet used it.
    pub held: bool,
    /// The pin the packet wrote (new, or over a stale one or a SYN's).
    pub pinned: Option<Pin>,
}

/// What the running state and the pins say the datapath does with
/// `probe` sent as `segment` (include/l4lb.h, "Connection tracking"): a
/// pin whose backend number still names the same backend (in this
/// service, same address) decides, unless the packet is a SYN; otherwise
/// the slot's backend, pinned unless the packet is a SYN that found no pin
/// (a SYN pins only over an existing entry).
pub fn predict_pinned(running: &Running, pins: &Pins, probe: &Probe, segment: Segment) -> Prediction {
    let none = Prediction { verdict: Verdict::Pass, key: None, previous: None, held: false, pinned: None };
    let Some(service) = balanced_by(running, probe) else { return none };
    let table = |key, previous| {
        let Some(b) = slot_backend(running, service, probe) else {
            return Prediction { verdict: Verdict::Dropped(super::wire::XDP_DROP), key, previous, held: false, pinned: None };
        };
        let syn = probe.proto == TCP && segment == Segment::Syn;
        let pinned = (key.is_some() && (!syn || previous.is_some())).then_some(Pin { service: service.key, number: b.number, addr: b.backend.addr });
        Prediction { verdict: Verdict::Backend(b.backend.addr), key, previous, held: false, pinned }
    };
    if !service.track_flows {
        return table(None, None);
    }
    let flow = hashed_flow(service, probe);
    let key = PinKey { src: flow.saddr, dst: flow.daddr, sport: flow.sport, dport: flow.dport, proto: flow.proto };
    let previous = pins.get(&key).copied();
    let holds = previous.is_some_and(|p| service.backends.iter().any(|b| b.number == p.number && b.backend.addr == p.addr));
    match previous {
        Some(p) if holds && !(probe.proto == TCP && segment == Segment::Syn) => {
            Prediction { verdict: Verdict::Backend(p.addr), key: Some(key), previous, held: true, pinned: None }
        }
        _ => table(Some(key), previous),
    }
}

/// A service's table as backend addresses per slot (None: empty or naming
/// no backend of the service): what must agree between balancers whatever
/// numbers they gave services and backends.
pub fn table_addresses(service: &RunningService) -> Vec<Option<IpAddr>> {
    let by_number: std::collections::HashMap<u32, IpAddr> = service.backends.iter().map(|b| (b.number, b.backend.addr)).collect();
    service.table.iter().map(|n| by_number.get(n).copied()).collect()
}

/// What Maglev (`l4lb::maglev::populate`, computed here from the service's
/// backend addresses and weights, whatever the planner did) puts in each
/// slot of `service`'s table, as backend addresses (None: an empty slot).
pub fn maglev_addresses(service: &RunningService) -> TestResult<Vec<Option<IpAddr>>> {
    let ids: Vec<l4lb::maglev::Backend> = service.backends.iter().map(|b| l4lb::maglev::Backend::from_addr(b.backend.addr, b.backend.weight)).collect();
    let slots = l4lb::maglev::populate(&ids, l4lb::bpf::MAGLEV_SIZE).map_err(|e| fail(format!("service {}: maglev: {e}", service.key)))?;
    Ok(slots.iter().map(|&i| (i != l4lb::maglev::EMPTY).then(|| service.backends[i as usize].backend.addr)).collect())
}

/// Fails unless every table of `running` is, slot for slot, Maglev's for
/// its service's backends and weights.
pub fn tables_are_maglev(what: &str, running: &Running) -> TestResult {
    for s in &running.services {
        let (got, want) = (table_addresses(s), maglev_addresses(s)?);
        ensure!(got.len() == want.len(), "{what}: service {}: {} slots, Maglev's table has {}", s.key, got.len(), want.len());
        let differ: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
        let name = |a: Option<IpAddr>| a.map_or("no backend".to_string(), |a| a.to_string());
        ensure!(
            differ.is_empty(),
            "{what}: service {}: {} of {} slots are not Maglev's for its backends (address, weight) {:?}; first: slot {} names {}, Maglev's {}",
            s.key,
            differ.len(),
            want.len(),
            s.backends.iter().map(|b| (b.backend.addr, b.backend.weight)).collect::<Vec<_>>(),
            differ[0],
            name(got[differ[0]]),
            name(want[differ[0]])
        );
    }
    Ok(())
}

/// Fails unless the running configuration (as `l4lb config` renders it)
/// is `expected`; the message shows the canonical lines that differ.
pub fn same_configuration(what: &str, running: &Running, expected: &l4lb::config::Model) -> TestResult {
    let got = running.model();
    if got == *expected {
        return Ok(());
    }
    let (g, e) = (l4lb::config::to_toml(&got), l4lb::config::to_toml(expected));
    let only = |a: &str, b: &str| a.lines().filter(|l| !b.lines().any(|x| x == *l)).map(|l| format!("\n    {l}")).collect::<String>();
    Err(fail(format!(
        "{what}: the running configuration is not the wanted one\n  running only:{}\n  wanted only:{}{}",
        only(&g, &e),
        only(&e, &g),
        if g == e { "\n  (same canonical text: a difference the text does not show)" } else { "" }
    )))
}

/// Fails unless two snapshots hold the same services, numbers, tables,
/// configuration bytes and VIP entries; the message says what differs.
pub fn same_snapshot(what: &str, actual: &Snapshot, expected: &Snapshot) -> TestResult {
    let config = |s: &Snapshot| l4lb::bpf::value_bytes(&s.config).to_vec();
    if config(actual) != config(expected) {
        return Err(fail(format!("{what}: l4lb_config differs: {:?}, expected {:?}", actual.config, expected.config)));
    }
    if let Some(i) = (0..actual.vips.len()).find(|&i| actual.vips[i] != expected.vips[i]) {
        return Err(fail(format!("{what}: VIP entry {i} differs: {:?}, expected {:?}", actual.vips[i], expected.vips[i])));
    }
    let (a, e) = (&actual.running, &expected.running);
    if a == e {
        return Ok(());
    }
    let keys = |r: &Running| r.services.iter().map(|s| (s.key, s.number)).collect::<Vec<_>>();
    ensure!(keys(a) == keys(e), "{what}: services (key, number) {:?}, expected {:?}", keys(a), keys(e));
    for (sa, se) in a.services.iter().zip(&e.services) {
        ensure!(sa.backends == se.backends, "{what}: service {}: backends {:?}, expected {:?}", sa.key, sa.backends, se.backends);
        ensure!(sa.hash_ports == se.hash_ports, "{what}: service {}: hash_ports {}, expected {}", sa.key, sa.hash_ports, se.hash_ports);
        let differ = (0..sa.table.len()).filter(|&i| sa.table[i] != se.table[i]).count();
        ensure!(differ == 0, "{what}: service {}: {differ} table slots differ", sa.key);
    }
    Err(fail(format!("{what}: running state differs (global {:?} / {:?}, fragments {:?} / {:?})", a.global, e.global, a.fragments, e.fragments)))
}

/// splitmix64's finaliser (after its increment): a bijective 64-bit mix
/// in which every input bit moves every output bit.
pub fn mix64(z: u64) -> u64 {
    let z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash a probe is drawn from: every input (the salt, the destination
/// itself, the probe's index for it) goes through the mix in turn, so
/// that no two inputs give related probes (a destination's position in a
/// list plays no part).
fn probe_hash(salt: u64, dst: IpAddr, proto: u8, dport: u16, index: u64) -> u64 {
    let (family, addr) = match dst {
        IpAddr::V4(a) => (4u64, u128::from(u32::from(a))),
        IpAddr::V6(a) => (6u64, u128::from(a)),
    };
    let words = [salt, (addr >> 64) as u64, addr as u64, family << 32 | u64::from(proto) << 16 | u64::from(dport), index];
    words.iter().fold(0x6c34_6c62_7072_6f62, |h, &w| mix64(h ^ w))
}

/// Where a sample's clients come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clients {
    /// 198.18.0.0/16 and 2001:db8:cafe::/64, source ports 1024 to 61023.
    Any,
    /// 100.64.0.0/16 and 2001:db8:e57::/64, source ports 1024 to 0x7fff:
    /// no flood frame of these suites (bench frames: clients in
    /// 198.18.0.0/16 and 2001:db8:18::/48, ports from 0x8000) shares a
    /// flow, or a pin, with them.
    Quiet,
}

/// The probe that hash `h` names for a destination.
fn probe_of(h: u64, (dst, proto, dport): (IpAddr, u8, u16), clients: Clients) -> Probe {
    let (v4_net, v6_net, ports) = match clients {
        Clients::Any => ([198, 18], [0xca, 0xfe], 60000),
        Clients::Quiet => ([100, 64], [0x0e, 0x57], 0x7000),
    };
    let src = match dst {
        IpAddr::V4(_) => IpAddr::from([v4_net[0], v4_net[1], (h >> 8) as u8, h as u8 | 1]),
        IpAddr::V6(_) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            a[4..6].copy_from_slice(&v6_net);
            a[8..].copy_from_slice(&h.to_be_bytes());
            a[15] |= 1;
            IpAddr::from(a)
        }
    };
    let sport = 1024 + (mix64(h) % ports) as u16;
    Probe { src, dst, proto, sport, dport }
}

/// A flow as the flow table may key it: a UDP service that does not hash
/// ports pins (source, destination) whatever the ports, so UDP flows are
/// known without them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowId {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ports: (u16, u16),
}

impl FlowId {
    fn of(p: &Probe) -> Self {
        let ports = if p.proto == TCP { (p.sport, p.dport) } else { (0, 0) };
        FlowId { src: p.src, dst: p.dst, proto: p.proto, ports }
    }
}

/// The flows handed out so far: a probe drawn through it is a flow that
/// no earlier one used (nor shared a pin with), whatever the salts and the
/// destinations' order, so a test that wants new connections gets them
/// for certain, not with high probability.
#[derive(Debug, Default, Clone)]
pub struct FreshFlows {
    used: HashSet<FlowId>,
}

impl FreshFlows {
    /// `per` new probes to each of `dsts` from 198.18.0.0/16 and
    /// 2001:db8:cafe::/64, each drawn from (`salt`, the destination, an
    /// index); a probe whose flow was handed out before is skipped for the
    /// next index.
    pub fn probes(&mut self, dsts: &[(IpAddr, u8, u16)], per: usize, salt: u64) -> Vec<Probe> {
        self.sample(dsts, per, salt, Clients::Any)
    }

    /// Like `probes`, from clients that no other traffic of these suites
    /// uses (100.64.0.0/16, 2001:db8:e57::/64) and from source ports below
    /// 0x8000, so that no flood frame (bench frames: clients in
    /// 198.18.0.0/16 and 2001:db8:18::/48, ports from 0x8000) shares a
    /// flow, or a pin, with them: for established-flow probes whose pins
    /// the test models.
    pub fn quiet_probes(&mut self, dsts: &[(IpAddr, u8, u16)], per: usize, salt: u64) -> Vec<Probe> {
        self.sample(dsts, per, salt, Clients::Quiet)
    }

    /// Records `probe`'s flow; false if it was handed out before.
    pub fn claim(&mut self, probe: &Probe) -> bool {
        self.used.insert(FlowId::of(probe))
    }

    /// Whether `probe`'s flow was handed out (or claimed) before.
    pub fn used(&self, probe: &Probe) -> bool {
        self.used.contains(&FlowId::of(probe))
    }

    /// Flows handed out so far.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    fn sample(&mut self, dsts: &[(IpAddr, u8, u16)], per: usize, salt: u64, clients: Clients) -> Vec<Probe> {
        let mut out = Vec::with_capacity(dsts.len() * per);
        for &dst in dsts {
            let (mut index, mut taken) = (0u64, 0);
            while taken < per {
                // Each destination has at least 2^15 clients times 2^12 ports.
                assert!(index < 64 * per as u64 + 4096, "no fresh flow to {dst:?} after {index} draws ({} flows used)", self.used.len());
                let probe = probe_of(probe_hash(salt, dst.0, dst.1, dst.2, index), dst, clients);
                index += 1;
                if self.claim(&probe) {
                    out.push(probe);
                    taken += 1;
                }
            }
        }
        out
    }
}

/// A deterministic sample of probes: IPv4 and IPv6 clients (198.18.0.0/16,
/// 2001:db8:cafe::/64) to `dst` addresses, TCP and UDP, to the given
/// ports; `per` distinct flows to each, drawn from (`salt`, the
/// destination, an index) as `FreshFlows::probes` draws them (a test that
/// needs flows new across calls keeps one `FreshFlows`).
pub fn probes(dsts: &[(IpAddr, u8, u16)], per: usize, salt: u32) -> Vec<Probe> {
    FreshFlows::default().probes(dsts, per, u64::from(salt))
}

pub const PROTO_TCP: u8 = TCP;
pub const PROTO_UDP: u8 = UDP;
