//! For the suites that drive the services control plane through the `l4lb`
//! binary (end_to_end, under_load, apply): the attached l4lb program under
//! BPF_PROG_TEST_RUN (the program the kernel runs, with the maps the host
//! wrote), frames of both families, what an output frame's outer header says,
//! and which backend the running state (read back through the library)
//! predicts for a flow, following the datapath semantics of issue 4, and,
//! in slots in transition, with a model of the flow table's pins
//! (docs/transitions.md, "Packet rules in a slot in transition").

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use l4lb::apply::{self, Snapshot};
use l4lb::config::Model;
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
            XDP_TX => Verdict::Backend(
                outer_destination(&out).ok_or_else(|| fail(format!("{probe:?}: XDP_TX output is not encapsulated")))?,
            ),
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
/// clear), or one of an established connection (ACK set, no SYN). In a
/// slot in transition a SYN takes the current backend and pins there;
/// any other segment follows a pin that holds, else is a connection from
/// before the change (the previous backend, pinned). Steady slots pin
/// nothing.
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
    running
        .service(&key(probe.dport))
        .or_else(|| running.service(&key(0)))
        .or_else(|| running.service(&ServiceKey::CatchAll))
}

/// What the running state says the datapath does with `probe` (spec steps
/// 2 to 5): the backend's address of its slot's current backend, Pass, or
/// Dropped(XDP_DROP) for an empty slot. Pins are not looked at: right for
/// TCP SYNs (a SYN takes the current backend, in transition or not) and for
/// every packet of a steady slot (see `predict_pinned`).
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

/// The backend `probe`'s slot names in `service`'s table, its current one
/// for a slot in transition (None: an empty slot, or a number that is not
/// one of the service's backends).
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

impl PinKey {
    /// The key bytes as the datapath writes them (struct l4lb_flow_key):
    /// addresses widened to 16 bytes, ports as on the wire.
    pub fn kernel(&self) -> l4lb::bpf::FlowKey {
        let (family, daddr) = addr16(self.dst);
        let [a, b] = self.sport.to_be_bytes();
        let [c, d] = self.dport.to_be_bytes();
        l4lb::bpf::FlowKey {
            saddr: addr16(self.src).1,
            daddr,
            ports: u32::from_ne_bytes([a, b, c, d]),
            family,
            proto: self.proto,
            pad: [0; 2],
        }
    }
}

/// (family, 16 address bytes) as l4lb's structs hold an address (IPv4 in
/// the first 4 bytes).
fn addr16(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (4, out)
        }
        IpAddr::V6(a) => (6, a.octets()),
    }
}

/// A pin (struct l4lb_flow): the backend number and address a flow was
/// pinned to, the slot of l4lb_tables it was pinned in, the tick of its
/// last packet, and (for the reports) the service that pinned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub service: ServiceKey,
    /// Index in l4lb_tables (service number x MAGLEV_SIZE + slot).
    pub slot: u32,
    pub number: u32,
    pub addr: IpAddr,
    /// l4lb_config.clock when it was written or last held.
    pub seen: u32,
}

impl Pin {
    /// Whether the kernel's entry is this pin, field for field (the
    /// service is the test's bookkeeping, not in the entry).
    pub fn is(&self, entry: &l4lb::bpf::FlowPin) -> bool {
        let (family, addr) = addr16(self.addr);
        entry.backend == self.number
            && entry.slot == self.slot
            && entry.seen == self.seen
            && entry.family == family
            && entry.addr == addr
    }
}

/// The kernel's pin entry in words, for failure messages.
pub fn describe_entry(entry: &l4lb::bpf::FlowPin) -> String {
    let addr: IpAddr = if entry.family == 6 {
        IpAddr::from(entry.addr)
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&entry.addr[..4]).expect("4 bytes"))
    };
    format!("backend {} ({addr}, family {}), slot {}, seen {}", entry.backend, entry.family, entry.slot, entry.seen)
}

/// The test's copy of l4lb_flows, as far as the probes sent through the
/// model (`predict_pinned` + `Pins::record`) made it. The datapath never
/// removes a pin and no `l4lb settle` runs in these suites; the one thing
/// the model cannot know is which pins an LRU flow table evicts under a
/// flood (`forget`). Rounds (`start_round`) tell a pin written or held
/// lately from one no packet looked up since.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    map: HashMap<PinKey, Pin>,
    /// The round each pin was last written or held in.
    touched: HashMap<PinKey, u64>,
    round: u64,
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
            self.touched.insert(key, self.round);
        }
    }

    /// Drops a pin the kernel's LRU flow table evicted; returns it.
    pub fn forget(&mut self, key: &PinKey) -> Option<Pin> {
        self.touched.remove(key);
        self.map.remove(key)
    }

    /// Starts a round of packets.
    pub fn start_round(&mut self) {
        self.round += 1;
    }

    /// Whether the pin under `key` was written or held in the current round.
    pub fn touched_this_round(&self, key: &PinKey) -> bool {
        self.touched.get(key) == Some(&self.round)
    }

    /// Whether the pin under `key` was written or held in the current or the previous round.
    pub fn touched_lately(&self, key: &PinKey) -> bool {
        self.touched.get(key).is_some_and(|&r| r + 1 >= self.round)
    }
}

/// Which of the datapath's rules decided a packet (docs/transitions.md,
/// "Packet rules in a slot in transition"; src/bpf/flows.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// No service takes the packet, or it cannot carry it: passed.
    Passed,
    /// An empty slot, or one naming no backend of the service: dropped.
    Empty,
    /// A steady slot: its backend; no per-flow state read or written.
    Steady,
    /// Rule 1, a TCP SYN in a slot in transition: the current backend,
    /// pinned there (over any entry the flow had).
    Syn,
    /// Rule 2, a pin that holds (made in this slot, its backend number
    /// still names the same backend: active, same service, same address):
    /// its backend; its tick refreshed.
    Held,
    /// Rule 3, a flow from before the change (TCP but a SYN, UDP within the
    /// service's grace): the previous backend, pinned there.
    Previous,
    /// Rule 3 with a previous backend that is not (any more) one of the
    /// service: the current backend, pinned there.
    PreviousGone,
    /// Rule 4, UDP after the service's grace: a new flow, the current
    /// backend, pinned there.
    AfterGrace,
}

/// What a packet does to its flow, by the datapath's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub verdict: Verdict,
    pub rule: Rule,
    /// The flow's pin key: Some only in a slot in transition (the only
    /// place the datapath looks a flow up).
    pub key: Option<PinKey>,
    /// The slot's index in l4lb_tables and its current and previous
    /// backend numbers, for a slot in transition.
    pub transition: Option<(u32, u32, u32)>,
    /// The entry the flow had before this packet (in a slot in transition).
    pub found: Option<Pin>,
    /// The pin the flow has after it: written (rules 1, 3, 4) or refreshed
    /// (rule 2); None outside slots in transition.
    pub pinned: Option<Pin>,
}

impl Prediction {
    /// Whether the packet wrote an entry over an existing one (the
    /// datapath counts flow_repinned, else flow_pinned, for a written pin).
    pub fn repinned(&self) -> bool {
        self.found.is_some() && matches!(self.rule, Rule::Syn | Rule::Previous | Rule::PreviousGone | Rule::AfterGrace)
    }
}

/// What the running state, the tick (`l4lb_config.clock`) and the pins say
/// the datapath does with `probe` sent as `segment` (docs/transitions.md,
/// src/bpf/flows.h `transition_backend`). A steady slot: its backend, no
/// pin read or written. A slot in transition, in order: a TCP SYN goes to
/// the current backend and pins there; a pin that holds (made in this
/// slot, its number still naming the same backend: active, same service,
/// same family and address) decides and is refreshed; TCP but a SYN, and
/// UDP while the service's grace lasts ((clock - changed) < udp_grace,
/// signed: a clock behind the change is inside), go to the previous
/// backend if it is one of the service's (else the current one) and pin
/// there; UDP after the grace goes to the current backend and pins there. Nothing is pinned to a number that names no
/// backend of the service (the packet is dropped).
pub fn predict_pinned(running: &Running, clock: u32, pins: &Pins, probe: &Probe, segment: Segment) -> Prediction {
    let outcome = |verdict, rule| Prediction { verdict, rule, key: None, transition: None, found: None, pinned: None };
    let Some(service) = balanced_by(running, probe) else { return outcome(Verdict::Pass, Rule::Passed) };
    let dropped = outcome(Verdict::Dropped(super::wire::XDP_DROP), Rule::Empty);
    let flow = hashed_flow(service, probe);
    let slot = flow.slot(running.global.hash_seed.unwrap_or(0));
    let current = service.table[slot];
    let member = |n: u32| service.backends.iter().find(|b| b.number == n);
    let Some(&previous) = service.transitions.get(&(slot as u32)).filter(|_| current != l4lb::maglev::EMPTY) else {
        return match member(current) {
            Some(b) => outcome(Verdict::Backend(b.backend.addr), Rule::Steady),
            None => dropped,
        };
    };
    let index = service.number * l4lb::bpf::MAGLEV_SIZE as u32 + slot as u32;
    let key = PinKey { src: flow.saddr, dst: flow.daddr, sport: flow.sport, dport: flow.dport, proto: flow.proto };
    let found = pins.get(&key).copied();
    let syn = probe.proto == TCP && segment == Segment::Syn;
    let base = Prediction {
        verdict: Verdict::Pass,
        rule: Rule::Syn,
        key: Some(key),
        transition: Some((index, current, previous)),
        found,
        pinned: None,
    };
    let holds = found.filter(|p| p.slot == index && member(p.number).is_some_and(|b| b.backend.addr == p.addr));
    if let Some(pin) = holds.filter(|_| !syn) {
        return Prediction {
            verdict: Verdict::Backend(pin.addr),
            rule: Rule::Held,
            pinned: Some(Pin { seen: clock, ..pin }),
            ..base
        };
    }
    // Signed, as the datapath reads it: a clock behind the change is inside the grace.
    let within_grace = (clock.wrapping_sub(service.changed) as i32) < service.udp_grace as i32;
    let rule = if syn {
        Rule::Syn
    } else if probe.proto == UDP && !within_grace {
        Rule::AfterGrace
    } else if member(previous).is_some() {
        Rule::Previous
    } else {
        Rule::PreviousGone
    };
    let target = if rule == Rule::Previous { previous } else { current };
    match member(target) {
        Some(b) => Prediction {
            verdict: Verdict::Backend(b.backend.addr),
            rule,
            pinned: Some(Pin { service: service.key, slot: index, number: target, addr: b.backend.addr, seen: clock }),
            ..base
        },
        None => Prediction { rule: Rule::Empty, ..dropped },
    }
}

/// A service's table as backend addresses per slot (None: empty or naming
/// no backend of the service): what must agree between balancers whatever
/// numbers they gave services and backends.
pub fn table_addresses(service: &RunningService) -> Vec<Option<IpAddr>> {
    let by_number: std::collections::HashMap<u32, IpAddr> =
        service.backends.iter().map(|b| (b.number, b.backend.addr)).collect();
    service.table.iter().map(|n| by_number.get(n).copied()).collect()
}

/// What Maglev (`l4lb::maglev::populate`, computed here from the service's
/// backend addresses and weights, whatever the planner did) puts in each
/// slot of `service`'s table, as backend addresses (None: an empty slot).
pub fn maglev_addresses(service: &RunningService) -> TestResult<Vec<Option<IpAddr>>> {
    let ids: Vec<l4lb::maglev::Backend> =
        service.backends.iter().map(|b| l4lb::maglev::Backend::from_addr(b.backend.addr, b.backend.weight)).collect();
    let slots = l4lb::maglev::populate(&ids, l4lb::bpf::MAGLEV_SIZE)
        .map_err(|e| fail(format!("service {}: maglev: {e}", service.key)))?;
    Ok(slots.iter().map(|&i| (i != l4lb::maglev::EMPTY).then(|| service.backends[i as usize].backend.addr)).collect())
}

/// Fails unless every table of `running` is, slot for slot, Maglev's for
/// its service's backends and weights.
pub fn tables_are_maglev(what: &str, running: &Running) -> TestResult {
    for s in &running.services {
        let (got, want) = (table_addresses(s), maglev_addresses(s)?);
        ensure!(
            got.len() == want.len(),
            "{what}: service {}: {} slots, Maglev's table has {}",
            s.key,
            got.len(),
            want.len()
        );
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
    let only = |a: &str, b: &str| {
        a.lines().filter(|l| !b.lines().any(|x| x == *l)).map(|l| format!("\n    {l}")).collect::<String>()
    };
    Err(fail(format!(
        "{what}: the running configuration is not the wanted one\n  running only:{}\n  wanted only:{}{}",
        only(&g, &e),
        only(&e, &g),
        if g == e { "\n  (same canonical text: a difference the text does not show)" } else { "" }
    )))
}

/// Fails unless two snapshots hold the same services, numbers, settings,
/// tables (slot words: current and previous backends), change ticks,
/// configuration bytes (the clock included) and VIP entries; the message
/// says what differs. A caller comparing with a plan made at another tick
/// than the apply's plans again at the apply's (its clock tells it).
pub fn same_snapshot(what: &str, actual: &Snapshot, expected: &Snapshot) -> TestResult {
    let config = |s: &Snapshot| l4lb::bpf::value_bytes(&s.config).to_vec();
    if config(actual) != config(expected) {
        return Err(fail(format!("{what}: l4lb_config differs: {:?}, expected {:?}", actual.config, expected.config)));
    }
    if let Some(i) = (0..actual.vips.len()).find(|&i| actual.vips[i] != expected.vips[i]) {
        return Err(fail(format!(
            "{what}: VIP entry {i} differs: {:?}, expected {:?}",
            actual.vips[i], expected.vips[i]
        )));
    }
    let (a, e) = (&actual.running, &expected.running);
    if a == e {
        return Ok(());
    }
    let keys = |r: &Running| r.services.iter().map(|s| (s.key, s.number)).collect::<Vec<_>>();
    ensure!(keys(a) == keys(e), "{what}: services (key, number) {:?}, expected {:?}", keys(a), keys(e));
    for (sa, se) in a.services.iter().zip(&e.services) {
        ensure!(
            sa.backends == se.backends,
            "{what}: service {}: backends {:?}, expected {:?}",
            sa.key,
            sa.backends,
            se.backends
        );
        let settings = |s: &RunningService| (s.hash_ports, s.track_flows, s.idle_timeout, s.udp_grace);
        ensure!(
            settings(sa) == settings(se),
            "{what}: service {}: (hash_ports, track_flows, idle_timeout, udp_grace) {:?}, expected {:?}",
            sa.key,
            settings(sa),
            settings(se)
        );
        ensure!(
            sa.changed == se.changed,
            "{what}: service {}: changed at tick {}, expected {}",
            sa.key,
            sa.changed,
            se.changed
        );
        let differ = (0..sa.table.len()).filter(|&i| sa.table[i] != se.table[i]).count();
        ensure!(differ == 0, "{what}: service {}: {differ} table slots differ", sa.key);
        if sa.transitions != se.transitions {
            let slots: std::collections::BTreeSet<u32> =
                sa.transitions.keys().chain(se.transitions.keys()).copied().collect();
            let first =
                slots.iter().find(|i| sa.transitions.get(i) != se.transitions.get(i)).expect("some slot differs");
            return Err(fail(format!(
                "{what}: service {}: {} slots in transition, expected {}; first difference: slot {first} previous {:?}, expected {:?}",
                sa.key,
                sa.transitions.len(),
                se.transitions.len(),
                sa.transitions.get(first),
                se.transitions.get(first)
            )));
        }
    }
    Err(fail(format!(
        "{what}: running state differs (global {:?} / {:?}, fragments {:?} / {:?})",
        a.global, e.global, a.fragments, e.fragments
    )))
}

/// A slot by backend addresses: what must agree whatever numbers a
/// balancer gave backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAddr {
    Empty,
    Steady(IpAddr),
    Transition { current: IpAddr, previous: IpAddr },
}

impl SlotAddr {
    pub fn in_transition(self) -> bool {
        matches!(self, SlotAddr::Transition { .. })
    }

    /// The backend new flows get (None: empty).
    pub fn current(self) -> Option<IpAddr> {
        match self {
            SlotAddr::Empty => None,
            SlotAddr::Steady(c) | SlotAddr::Transition { current: c, .. } => Some(c),
        }
    }
}

/// The service that balances `probe` and its slot there by addresses
/// (None inside: the slot names a number of no backend of the service).
pub fn probe_slot(running: &Running, probe: &Probe) -> Option<(ServiceKey, Option<SlotAddr>)> {
    let service = balanced_by(running, probe)?;
    let slot = hashed_flow(service, probe).slot(running.global.hash_seed.unwrap_or(0));
    Some((service.key, slot_addr(service, slot)))
}

/// The key the datapath would look `probe`'s flow up with in the service
/// that balances it (whether its slot is in transition or not).
pub fn pin_key(running: &Running, probe: &Probe) -> Option<PinKey> {
    let flow = hashed_flow(balanced_by(running, probe)?, probe);
    Some(PinKey { src: flow.saddr, dst: flow.daddr, sport: flow.sport, dport: flow.dport, proto: flow.proto })
}

/// Slot `i` of `service` by addresses; None: a number that names no
/// backend of the service.
pub fn slot_addr(service: &RunningService, i: usize) -> Option<SlotAddr> {
    let addr = |n: u32| service.backends.iter().find(|b| b.number == n).map(|b| b.backend.addr);
    let current = service.table[i];
    if current == l4lb::maglev::EMPTY {
        return Some(SlotAddr::Empty);
    }
    Some(match service.transitions.get(&(i as u32)) {
        Some(&p) => SlotAddr::Transition { current: addr(current)?, previous: addr(p)? },
        None => SlotAddr::Steady(addr(current)?),
    })
}

/// Slots in transition after an apply, as `transitions_as_designed` counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransitionCount {
    /// Slots in transition after the apply, in all services.
    pub slots: usize,
    /// Of those: put in transition by this apply (steady before).
    pub started: usize,
    /// Of those: in transition before and changed again.
    pub changed_again: usize,
    /// Services whose change tick the apply stamped.
    pub stamped: usize,
}

/// Fails unless every slot of every service in `after` is what
/// docs/transitions.md says an apply makes of it from `before` (checked by
/// backend addresses, without the planner): a service that did not change
/// keeps its words; an untracked or new one has no slot in transition; in
/// a changed tracked one, a slot whose current backend A gives way to B
/// goes in transition (previous A) while A stays in the service (any
/// weight), else steady; a slot in transition (current B, previous A) now
/// current C stays in transition with previous A if A stays, else B if B
/// stays, else C; an empty slot has no previous. A service with a slot
/// newly in transition or changed in transition (another word) has
/// `changed` = `clock` (the apply's tick), every other keeps its `changed`.
pub fn transitions_as_designed(
    what: &str,
    before: &Running,
    after: &Running,
    clock: u32,
) -> TestResult<TransitionCount> {
    let mut count = TransitionCount::default();
    for s in &after.services {
        let name = |a: Option<SlotAddr>| a.map_or("a number of no backend".to_string(), |a| format!("{a:?}"));
        let got: Vec<Option<SlotAddr>> = (0..s.table.len()).map(|i| slot_addr(s, i)).collect();
        if let Some(i) = got.iter().position(Option::is_none) {
            return Err(fail(format!(
                "{what}: service {}: slot {i} (current {}, previous {:?}) names no backend of it",
                s.key,
                s.table[i],
                s.transitions.get(&(i as u32))
            )));
        }
        count.slots += s.transitions.len();
        let old = before.service(&s.key);
        let Some(old) = old.filter(|_| s.track_flows) else {
            ensure!(
                s.transitions.is_empty(),
                "{what}: service {} ({}) has {} slots in transition",
                s.key,
                if s.track_flows { "new" } else { "untracked" },
                s.transitions.len()
            );
            continue;
        };
        if old.model() == s.model() {
            ensure!(
                old.table == s.table && old.transitions == s.transitions && old.changed == s.changed,
                "{what}: service {} did not change, its table words or change tick did",
                s.key
            );
            continue;
        }
        let stays = |a: IpAddr| {
            old.backends.iter().any(|b| b.backend.addr == a) && s.backends.iter().any(|b| b.backend.addr == a)
        };
        let mut stamped = false;
        for (i, got) in got.iter().enumerate() {
            let got = got.expect("checked above");
            let was = slot_addr(old, i).ok_or_else(|| {
                fail(format!("{what}: service {}: slot {i} named no backend before the apply", s.key))
            })?;
            let current = match got {
                SlotAddr::Empty => None,
                SlotAddr::Steady(c) | SlotAddr::Transition { current: c, .. } => Some(c),
            };
            let want = match (was, current) {
                (_, None) => SlotAddr::Empty,
                (SlotAddr::Empty, Some(c)) => SlotAddr::Steady(c),
                (SlotAddr::Steady(a), Some(c)) if a == c => SlotAddr::Steady(c),
                (SlotAddr::Steady(a), Some(c)) if stays(a) => SlotAddr::Transition { current: c, previous: a },
                (SlotAddr::Steady(_), Some(c)) => SlotAddr::Steady(c),
                (SlotAddr::Transition { current: b, previous: a }, Some(c)) => {
                    let previous = if stays(a) {
                        a
                    } else if stays(b) {
                        b
                    } else {
                        c
                    };
                    SlotAddr::Transition { current: c, previous }
                }
            };
            ensure!(
                got == want,
                "{what}: service {}: slot {i} was {was:?}, is {}, the design says {want:?}",
                s.key,
                name(Some(got))
            );
            if got.in_transition() {
                // Another word: the numbers of a staying backend do not change, so words differ where addresses do, or where a number was reused.
                let word = |r: &RunningService| (r.table[i], r.transitions.get(&(i as u32)).copied());
                if word(old) != word(s) {
                    stamped = true;
                    if was.in_transition() {
                        count.changed_again += 1;
                    } else {
                        count.started += 1;
                    }
                }
            }
        }
        let want = if stamped { clock } else { old.changed };
        ensure!(s.changed == want, "{what}: service {}: changed at tick {}, expected {want} (slots newly in transition: {stamped}; clock {clock}, before {})", s.key, s.changed, old.changed);
        count.stamped += usize::from(stamped);
    }
    Ok(count)
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
    let words =
        [salt, (addr >> 64) as u64, addr as u64, family << 32 | u64::from(proto) << 16 | u64::from(dport), index];
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

/// Whether `addr` is one of the quiet clients (`FreshFlows::quiet_probes`):
/// 100.64.0.0/16 or 2001:db8:e57::/64, which no flood frame uses.
pub fn quiet_client(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.octets()[..2] == [100, 64],
        IpAddr::V6(a) => a.octets()[..8] == [0x20, 0x01, 0x0d, 0xb8, 0x0e, 0x57, 0, 0],
    }
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
                assert!(
                    index < 64 * per as u64 + 4096,
                    "no fresh flow to {dst:?} after {index} draws ({} flows used)",
                    self.used.len()
                );
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

/// `apply::plan` of `wanted` over `now` as a process that read the maps at
/// tick `tick` makes it: the tick is what slots put in transition count
/// from (l4lb_config.clock, the services' `changed`).
pub fn plan_at(now: &Snapshot, wanted: &Model, tick: u32) -> TestResult<apply::Plan> {
    let mut at = now.clone();
    at.tick = tick;
    apply::plan(&at, wanted, 0).map_err(|e| fail(format!("{e:#}")))
}

/// The plan the `l4lb` process carried out over `before` (read by the
/// test at `before.tick`), given what the test read afterwards (`after`,
/// at `after.tick`): the process read the maps at a tick in between, which
/// shows in the clock when its plan put slots in transition (else the
/// clock stays and the tick plays no part). Fails if the clock is a tick
/// outside that window.
pub fn plan_as_applied(before: &Snapshot, wanted: &Model, after: &Snapshot) -> TestResult<apply::Plan> {
    let plan = apply::plan(before, wanted, 0).map_err(|e| fail(format!("{e:#}")))?;
    let clock = after.config.clock;
    if clock == plan.after.config.clock {
        return Ok(plan);
    }
    ensure!(
        (before.tick..=after.tick).contains(&clock),
        "the clock is {clock} after the update: not the old one ({}) nor a tick between the readings around it ({} to {})",
        before.config.clock,
        before.tick,
        after.tick
    );
    plan_at(before, wanted, clock)
}
