//! End to end: the `l4lb` binary and the BPF object on a veth pair between
//! two network namespaces. A generator namespace sends crafted frames to the
//! balancer's veth; the encapsulated frames the balancer sends back (XDP_TX)
//! are captured on the generator side and checked byte for byte, and the
//! counters `l4lb stats` reports are compared with what was captured.
//!
//! Each test builds its own namespaces (`l4lbt-<pid>-<n>-gen`, `-lb`); a guard
//! deletes them, and with them the veth and its XDP programs, even when an
//! assertion fails.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::packet::{internet_checksum, PacketSocket};
use common::services::{predict, Probe, Verdict};
use common::veth::{attach_xdp_pass, VethPair, LB_ADDR};
use common::{fail, in_netns, ip, run, Outcome, TestResult};
use l4lb::state::Running;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");
const BPF_OBJECT: &str = env!("L4LB_BPF_OBJECT");
const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/destination_samples");
/// Namespaces, interfaces and temporary directories of this suite start with this.
const PREFIX: &str = "l4lbt";
/// Frames per traffic check.
const N: usize = 200;

fn main() {
    if common::is_root() {
        common::remove_leftovers(PREFIX);
    }
    common::run_suite(
        "end_to_end",
        "network namespaces and XDP need root",
        vec![
            ("iproute2_load_then_map_balances_and_counts", iproute2_load_then_map_balances_and_counts),
            ("attach_driver_mode_with_outer_source_flag", attach_driver_mode_with_outer_source_flag),
            (
                "attach_refuses_without_force_and_generic_mode_works",
                attach_refuses_without_force_and_generic_mode_works,
            ),
            ("bad_destination_files_leave_maps_byte_identical", bad_destination_files_leave_maps_byte_identical),
            ("clear_errors_without_an_l4lb_program", clear_errors_without_an_l4lb_program),
            (
                "map_without_address_needs_source_and_foreign_program_is_left_alone",
                map_without_address_needs_source_and_foreign_program_is_left_alone,
            ),
            (
                "remap_keeps_counters_and_flows_of_staying_destinations",
                remap_keeps_counters_and_flows_of_staying_destinations,
            ),
        ],
    );
}

// ---------------------------------------------------------------- commands

fn sample(name: &str) -> String {
    format!("{SAMPLES}/{name}")
}

// ---------------------------------------------------------------- topology

/// The suite's gen <-> lb veth pair (gen runs an XDP_PASS program, so that
/// it receives the balancer's XDP_TX frames).
struct Topology(VethPair);

impl std::ops::Deref for Topology {
    type Target = VethPair;
    fn deref(&self) -> &VethPair {
        &self.0
    }
}

impl Topology {
    /// gen (192.0.2.1/24, XDP_PASS) <-> lb (192.0.2.2/24 when `lb_address`,
    /// no XDP program yet).
    fn new(lb_address: bool) -> TestResult<Self> {
        let topo = Topology(VethPair::new(PREFIX, lb_address)?);
        attach_xdp_pass(&topo.gen, &topo.gen_dev)?;
        Ok(topo)
    }

    /// `l4lb ARGS` inside the lb namespace.
    fn l4lb(&self, args: &[&str]) -> Outcome {
        let mut full = vec!["netns", "exec", &self.lb, BIN];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Writes a file into the scratch directory; returns its path.
    fn file(&self, name: &str, contents: &[u8]) -> TestResult<String> {
        Ok(self.write_file(name, contents)?.display().to_string())
    }

    /// The XDP programs on the lb veth as `ip -j -d link show` lists them:
    /// (mode as iproute2 names it: "xdp" (driver), "xdpgeneric", "xdpoffload";
    /// program id; program name).
    fn lb_xdp_programs(&self) -> TestResult<Vec<(String, u32, String)>> {
        let json: Value =
            serde_json::from_str(&ip(&["-n", &self.lb, "-j", "-d", "link", "show", "dev", &self.lb_dev])?)?;
        let xdp = &json[0]["xdp"];
        let attached = match xdp["attached"].as_array() {
            Some(list) => list.clone(),
            None if xdp.is_object() => vec![xdp.clone()],
            None => Vec::new(),
        };
        attached
            .iter()
            .map(|entry| {
                let mode = match entry["mode"].as_u64() {
                    Some(1) => "xdp",
                    Some(2) => "xdpgeneric",
                    Some(3) => "xdpoffload",
                    _ => return Err(fail(format!("unknown XDP mode in {entry}"))),
                };
                let id = entry["prog"]["id"].as_u64().ok_or_else(|| fail(format!("no program id in {entry}")))?;
                Ok((mode.to_string(), id as u32, entry["prog"]["name"].as_str().unwrap_or("").to_string()))
            })
            .collect()
    }

    /// Asserts that the lb veth has no XDP program at all.
    fn assert_no_xdp(&self) -> TestResult {
        let text = ip(&["-n", &self.lb, "-d", "link", "show", "dev", &self.lb_dev])?;
        ensure!(
            !text.contains("prog/xdp") && !text.contains(" xdp"),
            "{} still has an XDP program:\n{text}",
            self.lb_dev
        );
        Ok(())
    }

    /// Runs `f` on the maps of the l4lb program on the lb veth, through the library.
    fn with_maps<T>(&self, f: impl FnOnce(&l4lb::maps::LbMaps) -> anyhow::Result<T>) -> TestResult<T> {
        let program = self.attached_l4lb()?;
        Ok(f(&l4lb::maps::LbMaps::open(&program)?)?)
    }

    /// Every byte of every map of the l4lb program.
    fn dump(&self) -> TestResult<Vec<u8>> {
        self.with_maps(|maps| maps.dump())
    }

    /// The running state (seed, services, tables) of the l4lb program, to
    /// predict each flow's destination.
    fn model(&self) -> TestResult<Running> {
        self.with_maps(|maps| maps.read_running())
    }

    /// Two `l4lb stats --json` samples, parsed.
    fn stats(&self) -> TestResult<Vec<Value>> {
        let out = self.l4lb(&["stats", "-i", &self.lb_dev, "--json", "--count", "2", "--interval", "0.2"]).success()?;
        let samples: Vec<Value> = out
            .stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).map_err(|err| fail(format!("stats line {line:?} is not JSON: {err}")))
            })
            .collect::<TestResult<_>>()?;
        ensure!(samples.len() == 2, "expected 2 JSON lines from stats --count 2:\n{}", out.stdout);
        Ok(samples)
    }
}

// ---------------------------------------------------------------- frames

/// Identifies a sent frame: (IP protocol, source address, source port).
type FlowKey = (u8, Ipv4Addr, u16);

/// The flow key and the flow as the datapath hashes it, from an IPv4 packet.
fn flow_of(packet: &[u8]) -> Option<(FlowKey, l4lb::flow_hash::Flow)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let ports = packet.get(ihl..ihl + 4)?;
    let saddr = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let flow = l4lb::flow_hash::Flow {
        saddr: saddr.into(),
        daddr: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]).into(),
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: packet[9],
    };
    Some(((flow.proto, saddr, flow.sport), flow))
}

/// `count` TCP and UDP frames from gen to the lb veth's MAC, with distinct
/// source ports starting at `first_port`, varied addresses, TOS, DF and
/// payload sizes (deterministic for a given `first_port`).
fn probe_frames(topo: &Topology, count: usize, first_port: u16) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(first_port));
    (0..count)
        .map(|i| {
            let saddr = Ipv4Addr::new(192, 0, 2, rng.gen_range(100..=250));
            let daddr = if i % 4 == 3 { Ipv4Addr::new(192, 0, 2, 50) } else { LB_ADDR };
            let sport = first_port + i as u16;
            let dport = [80, 443, 53, 8080, rng.gen()][i % 5];
            let payload: Vec<u8> = (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect();
            let builder = etherparse::PacketBuilder::ethernet2(topo.gen_mac, topo.lb_mac).ipv4(
                saddr.octets(),
                daddr.octets(),
                64,
            );
            let mut frame = Vec::new();
            if i % 2 == 0 {
                builder.udp(sport, dport).write(&mut frame, &payload).expect("building a UDP frame");
            } else {
                builder
                    .tcp(sport, dport, rng.gen(), 65535)
                    .syn()
                    .write(&mut frame, &payload)
                    .expect("building a TCP frame");
            }
            // Vary what the outer header copies (TOS, DF) and the id; fix the checksum.
            frame[15] = rng.gen();
            frame[18..20].copy_from_slice(&(i as u16).to_be_bytes());
            frame[20..22].copy_from_slice(&(if i % 3 == 0 { 0u16 } else { 0x4000 }).to_be_bytes());
            frame[24..26].fill(0);
            let check = internet_checksum(&frame[14..34]);
            frame[24..26].copy_from_slice(&check.to_be_bytes());
            frame
        })
        .collect()
}

/// Sends `frames` out of the gen veth and returns every IPv4-in-IPv4 frame
/// that comes back: until as many as were sent arrived and 300 ms passed
/// without more, or 5 s in all.
fn exchange(topo: &Topology, frames: &[Vec<u8>]) -> TestResult<Vec<Vec<u8>>> {
    in_netns(&topo.gen, || {
        let socket = PacketSocket::bind(&topo.gen_dev)?;
        for (i, frame) in frames.iter().enumerate() {
            socket.send(frame)?;
            if i % 32 == 31 {
                std::thread::sleep(Duration::from_millis(2)); // keep the veth rings (256) from overflowing
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut quiet_until: Option<Instant> = None;
        let mut received = Vec::new();
        while Instant::now() < deadline {
            if received.len() >= frames.len()
                && *quiet_until.get_or_insert(Instant::now() + Duration::from_millis(300)) <= Instant::now()
            {
                break;
            }
            if let Some(frame) = socket.recv()? {
                if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 4 {
                    received.push(frame);
                }
            }
        }
        Ok(received)
    })
}

/// What every encapsulated frame must look like.
struct Expectation {
    lb_mac: [u8; 6],
    outer_src: Ipv4Addr,
    /// Active destinations: address -> MAC.
    destinations: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// The running state from the maps: each flow's destination is predicted.
    model: Running,
    /// Where flows went before (`send_and_check`'s routes): after a change,
    /// a UDP flow in a slot in transition is one from before the change (the
    /// grace lasts 30 s): it goes to its previous destination while that is
    /// still active (docs/transitions.md); a TCP SYN takes the new table.
    pinned: HashMap<FlowKey, Ipv4Addr>,
}

impl Expectation {
    fn new(topo: &Topology, outer_src: Ipv4Addr, destinations: &[(Ipv4Addr, [u8; 6])]) -> TestResult<Self> {
        let destinations = destinations.iter().copied().collect();
        Ok(Expectation { lb_mac: topo.lb_mac, outer_src, destinations, model: topo.model()?, pinned: HashMap::new() })
    }

    /// The same, for frames sent again after `routes` (their UDP flows keep their destination).
    fn after(self, routes: &HashMap<FlowKey, Ipv4Addr>) -> Self {
        let pinned = routes.iter().filter(|(key, _)| key.0 == PROTO_UDP).map(|(k, v)| (*k, *v)).collect();
        Expectation { pinned, ..self }
    }
}

const PROTO_UDP: u8 = 17;

/// Checks one captured frame against the frame sent for its flow; returns
/// the flow and the outer destination.
fn check_encapsulated(
    frame: &[u8],
    sent: &HashMap<FlowKey, &Vec<u8>>,
    expect: &Expectation,
) -> Result<(FlowKey, Ipv4Addr), String> {
    ensure!(frame.len() >= 14 + 20 + 20, "{}-byte frame is too short for Ethernet + 2 IPv4 headers", frame.len());
    let inner = &frame[34..];
    let (key, flow) = flow_of(inner).ok_or("inner packet has no ports")?;
    let original = sent.get(&key).ok_or_else(|| format!("inner packet of flow {key:?} was never sent"))?;
    ensure!(
        inner == &original[14..],
        "inner packet of flow {key:?} differs from what was sent:\n sent {:02x?}\n got  {:02x?}",
        &original[14..],
        inner
    );

    let outer = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..])
        .map_err(|err| format!("outer header of {key:?}: {err}"))?;
    let dst = outer.destination_addr();
    let mac = expect
        .destinations
        .get(&dst)
        .ok_or_else(|| format!("flow {key:?}: outer destination {dst} is not an active destination"))?;
    ensure!(
        frame[0..6] == mac[..],
        "flow {key:?}: Ethernet destination {:02x?}, want {dst}'s MAC {:02x?}",
        &frame[0..6],
        mac
    );
    ensure!(
        frame[6..12] == expect.lb_mac,
        "flow {key:?}: Ethernet source {:02x?}, want the lb veth's {:02x?}",
        &frame[6..12],
        expect.lb_mac
    );
    ensure!(frame[14] == 0x45, "flow {key:?}: outer version/IHL byte {:#04x}, want 0x45", frame[14]);
    ensure!(
        outer.source_addr() == expect.outer_src,
        "flow {key:?}: outer source {}, want {}",
        outer.source_addr(),
        expect.outer_src
    );
    ensure!(outer.ttl() == 64, "flow {key:?}: outer TTL {}", outer.ttl());
    ensure!(outer.protocol().0 == 4, "flow {key:?}: outer protocol {}", outer.protocol().0);
    ensure!(
        usize::from(outer.total_len()) == frame.len() - 14,
        "flow {key:?}: outer total length {} for {} bytes after Ethernet",
        outer.total_len(),
        frame.len() - 14
    );
    ensure!(
        internet_checksum(&frame[14..34]) == 0,
        "flow {key:?}: outer header checksum {:#06x} is wrong",
        outer.header_checksum()
    );
    ensure!(frame[15] == inner[1], "flow {key:?}: outer TOS {:#04x}, inner {:#04x}", frame[15], inner[1]);
    let df = u16::from_be_bytes([inner[6], inner[7]]) & 0x4000;
    ensure!(
        u16::from_be_bytes([frame[20], frame[21]]) == df,
        "flow {key:?}: outer flags/offset {:02x?}, want only the inner DF ({df:#06x})",
        &frame[20..22]
    );

    if let Some(&pinned) = expect.pinned.get(&key).filter(|d| expect.destinations.contains_key(d)) {
        ensure!(dst == pinned, "flow {key:?} went to {dst}; it is pinned to {pinned}, still a destination");
        return Ok((key, dst));
    }
    let probe = Probe { src: flow.saddr, dst: flow.daddr, proto: flow.proto, sport: flow.sport, dport: flow.dport };
    let predicted = predict(&expect.model, &probe);
    ensure!(
        predicted == Verdict::Backend(dst.into()),
        "flow {key:?} went to {dst}; its slot in the catch-all's table leads to {predicted:?}"
    );
    Ok((key, dst))
}

/// Packets and bytes per destination.
type Tally = BTreeMap<Ipv4Addr, (u64, u64)>;

/// Sends `frames`, checks that exactly one encapsulated frame comes back for
/// each and that each is right; returns the flows' destinations and the tally
/// per destination (every active destination present, maybe with 0).
fn send_and_check(
    topo: &Topology,
    frames: &[Vec<u8>],
    expect: &Expectation,
) -> TestResult<(HashMap<FlowKey, Ipv4Addr>, Tally)> {
    let sent: HashMap<FlowKey, &Vec<u8>> =
        frames.iter().map(|f| (flow_of(&f[14..]).expect("probe has ports").0, f)).collect();
    assert_eq!(sent.len(), frames.len(), "probe flows must be distinct");
    let received = exchange(topo, frames)?;
    let mut tally: Tally = expect.destinations.keys().map(|&addr| (addr, (0, 0))).collect();
    let mut routes = HashMap::new();
    let mut problems = Vec::new();
    for frame in &received {
        match check_encapsulated(frame, &sent, expect) {
            Ok((key, dst)) => {
                if routes.insert(key, dst).is_some() {
                    problems.push(format!("flow {key:?} came back more than once"));
                }
                let entry = tally.get_mut(&dst).expect("checked destination");
                entry.0 += 1;
                entry.1 += frame.len() as u64;
            }
            Err(problem) => problems.push(problem),
        }
    }
    ensure!(
        received.len() == frames.len() && problems.is_empty(),
        "sent {} frames, received {} encapsulated frames; {} problems, first ones:\n{}",
        frames.len(),
        received.len(),
        problems.len(),
        problems.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok((routes, tally))
}

/// The catch-all's table as backend addresses per slot.
fn catch_all_addresses(running: &Running) -> TestResult<Vec<Option<IpAddr>>> {
    let service = running.service(&l4lb::config::ServiceKey::CatchAll).ok_or_else(|| fail("no catch-all service"))?;
    Ok(common::services::table_addresses(service))
}

/// Destinations of a sample file, read here independently of l4lb's parser.
fn read_destinations(path: &str) -> TestResult<Vec<(Ipv4Addr, [u8; 6])>> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let row = line.split('#').next().unwrap_or("").trim();
        if let Some((addr, mac)) = row.split_once(',') {
            out.push((addr.trim().parse()?, mac.trim().parse::<macaddr::MacAddr6>()?.into_array()));
        }
    }
    Ok(out)
}

fn destinations_text(destinations: &[(Ipv4Addr, [u8; 6])]) -> String {
    destinations.iter().map(|(addr, mac)| format!("{addr}, {}\n", macaddr::MacAddr6::from(*mac))).collect()
}

/// Packets and bytes per destination (backend of the catch-all service, the
/// only service `l4lb map` without --vip fills) of one stats sample.
fn stats_tally(sample: &Value) -> TestResult<Tally> {
    let services = sample["services"].as_array().ok_or_else(|| fail(format!("no services in {sample}")))?;
    ensure!(services.len() == 1, "expected the catch-all service only: {sample}");
    let service = &services[0];
    ensure!(
        service["service"] == "*" && service["vip"] == "*" && service["protocol"] == "any",
        "not the catch-all: {service}"
    );
    let rows = service["backends"].as_array().ok_or_else(|| fail(format!("no backends in {service}")))?;
    let mut tally = Tally::new();
    for row in rows {
        let addr: Ipv4Addr =
            row["addr"].as_str().unwrap_or("").parse().map_err(|_| fail(format!("bad addr in {row}")))?;
        let packets = row["packets"].as_u64().ok_or_else(|| fail(format!("no packets in {row}")))?;
        let bytes = row["bytes"].as_u64().ok_or_else(|| fail(format!("no bytes in {row}")))?;
        ensure!(tally.insert(addr, (packets, bytes)).is_none(), "{addr} listed twice in {sample}");
    }
    Ok(tally)
}

/// Both stats samples show `mode`, exactly `expected` per destination, and
/// counters saying that all `frames` frames seen were sent back, nothing
/// else, and that nothing was pinned (every slot is steady: no per-flow state).
fn check_stats(samples: &[Value], mode: &str, expected: &Tally, frames: &[Vec<u8>]) -> TestResult {
    let packets: u64 = expected.values().map(|v| v.0).sum();
    let bytes: u64 = expected.values().map(|v| v.1).sum();
    check_stats_totals(samples, mode, expected, (packets, bytes), frames.len(), (0, 0))
}

/// check_stats, with the catch-all service's (and so all services')
/// totals given (a service counts the traffic of backends it no longer
/// has), and the flow-table events: (flow_pinned, flow_repinned).
fn check_stats_totals(
    samples: &[Value],
    mode: &str,
    expected: &Tally,
    (packets, bytes): (u64, u64),
    frames: usize,
    (pinned, repinned): (u64, u64),
) -> TestResult {
    let frames = frames as u64;
    for sample in samples {
        ensure!(sample["mode"] == mode, "stats mode {}, want {mode}: {sample}", sample["mode"]);
        let tally = stats_tally(sample)?;
        ensure!(&tally == expected, "stats per destination (packets, bytes) {tally:?}, captured {expected:?}");
        ensure!(
            sample["totals"]["packets"] == packets,
            "totals.packets {}, want {packets}",
            sample["totals"]["packets"]
        );
        ensure!(sample["totals"]["bytes"] == bytes, "totals.bytes {}, want {bytes}", sample["totals"]["bytes"]);
        let service = &sample["services"][0];
        ensure!(
            service["packets"] == packets && service["bytes"] == bytes,
            "catch-all service counts {}/{}, want {packets}/{bytes}",
            service["packets"],
            service["bytes"]
        );
        let counters = sample["counters"].as_object().ok_or_else(|| fail(format!("no counters in {sample}")))?;
        ensure!(counters["tx"] == frames, "counters.tx {}, want {frames}", counters["tx"]);
        ensure!(counters["rx"] == frames, "counters.rx {}, want {frames} (no other traffic)", counters["rx"]);
        ensure!(
            counters["flow_pinned"] == pinned,
            "counters.flow_pinned {}, want {pinned} (the flows of slots in transition)",
            counters["flow_pinned"]
        );
        ensure!(
            counters["flow_repinned"] == repinned,
            "counters.flow_repinned {}, want {repinned}",
            counters["flow_repinned"]
        );
        let others = ["rx", "tx", "flow_pinned", "flow_repinned"];
        for (name, value) in counters.iter().filter(|(name, _)| !others.contains(&name.as_str())) {
            ensure!(value == 0, "counter {name} is {value}, want 0: {sample}");
        }
    }
    Ok(())
}

fn sum(a: &Tally, b: &Tally) -> Tally {
    let mut out = a.clone();
    for (addr, (p, by)) in b {
        let entry = out.entry(*addr).or_default();
        entry.0 += p;
        entry.1 += by;
    }
    out
}

// ---------------------------------------------------------------- tests

/// (a) iproute2 loads the object; `l4lb map` fills it; traffic, stats, status, detach.
fn iproute2_load_then_map_balances_and_counts() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    ip(&["-n", &topo.lb, "link", "set", "dev", dev, "xdpdrv", "obj", BPF_OBJECT, "sec", "xdp"])?;
    let programs = topo.lb_xdp_programs()?;
    ensure!(
        programs.len() == 1 && programs[0].0 == "xdp" && programs[0].2 == "l4lb_balance",
        "after ip link set: {programs:?}"
    );

    let file = sample("4_destinations.csv");
    let destinations = read_destinations(&file)?;
    assert_eq!(destinations.len(), 4);
    topo.l4lb(&["map", "-i", dev, "-f", &file]).success()?;

    let expect = Expectation::new(&topo, LB_ADDR, &destinations)?;
    let frames = probe_frames(&topo, N, 10_000);
    let (_, tally) = send_and_check(&topo, &frames, &expect)?;
    check_stats(&topo.stats()?, "driver", &tally, &frames)?;

    let status = topo.l4lb(&["status", "-i", dev]).success()?.stdout;
    ensure!(
        status.contains("Services:      1, 4 backends") && status.contains("Service * (catch-all)"),
        "status does not show the catch-all with 4 backends:\n{status}"
    );
    ensure!(status.contains("Driver mode") && status.contains("l4lb_balance"), "status:\n{status}");
    ensure!(status.contains(&format!("Source IPv4:   {LB_ADDR}\n")), "status:\n{status}");
    for (addr, _) in &destinations {
        ensure!(status.contains(&format!(" {addr} ")), "status does not list {addr}:\n{status}");
    }

    topo.l4lb(&["detach", "-i", dev]).success()?;
    topo.assert_no_xdp()?;
    let status = topo.l4lb(&["status", "-i", dev]).failure()?;
    ensure!(status.stderr.contains("no l4lb program"), "status after detach: {}", status.describe());
    Ok(())
}

/// (b) `l4lb attach` (driver mode, per-CPU counters) and `map -s`.
fn attach_driver_mode_with_outer_source_flag() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    topo.l4lb(&["attach", "-i", dev]).success()?;
    let file = sample("4_destinations.csv");
    let source = Ipv4Addr::new(192, 0, 2, 99);
    topo.l4lb(&["map", "-i", dev, "-f", &file, "-s", &source.to_string()]).success()?;

    let status = topo.l4lb(&["status", "-i", dev]).success()?.stdout;
    ensure!(status.contains("Driver mode") && status.contains("per-CPU"), "status:\n{status}");
    ensure!(status.contains(&format!("Source IPv4:   {source}\n")), "status:\n{status}");
    ensure!(status.contains("Services:      1, 4 backends"), "status:\n{status}");

    let expect = Expectation::new(&topo, source, &read_destinations(&file)?)?;
    let frames = probe_frames(&topo, N, 20_000);
    let (_, tally) = send_and_check(&topo, &frames, &expect)?;
    check_stats(&topo.stats()?, "driver", &tally, &frames)?;

    topo.l4lb(&["detach", "-i", dev]).success()?;
    topo.assert_no_xdp()
}

/// (b) attach over an attached program needs --force; generic mode works.
fn attach_refuses_without_force_and_generic_mode_works() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    topo.l4lb(&["attach", "-i", dev]).success()?;
    let first = topo.lb_xdp_programs()?;
    ensure!(first.len() == 1 && first[0].0 == "xdp" && first[0].2 == "l4lb_balance", "after attach: {first:?}");

    for args in [&["attach", "-i", dev][..], &["attach", "-i", dev, "--mode", "skb"][..]] {
        let refused = topo.l4lb(args).failure()?;
        ensure!(refused.stderr.contains("--force"), "refusal does not mention --force: {}", refused.describe());
        ensure!(
            topo.lb_xdp_programs()? == first,
            "a refused attach changed the programs: {:?}",
            topo.lb_xdp_programs()?
        );
    }

    topo.l4lb(&["attach", "-i", dev, "--force"]).success()?;
    let replaced = topo.lb_xdp_programs()?;
    ensure!(
        replaced.len() == 1 && replaced[0].0 == "xdp" && replaced[0].1 != first[0].1,
        "after attach --force: {replaced:?} (was {first:?})"
    );

    topo.l4lb(&["attach", "-i", dev, "--mode", "skb", "--force"]).success()?;
    let generic = topo.lb_xdp_programs()?;
    ensure!(
        generic.len() == 1 && generic[0].0 == "xdpgeneric" && generic[0].2 == "l4lb_balance",
        "after --mode skb --force: {generic:?}"
    );
    let status = topo.l4lb(&["status", "-i", dev]).success()?.stdout;
    ensure!(status.contains("Generic mode"), "status does not say Generic:\n{status}");

    let file = sample("4_destinations.csv");
    topo.l4lb(&["map", "-i", dev, "-f", &file]).success()?;
    let expect = Expectation::new(&topo, LB_ADDR, &read_destinations(&file)?)?;
    let frames = probe_frames(&topo, 50, 30_000);
    let (_, tally) = send_and_check(&topo, &frames, &expect)?;
    check_stats(&topo.stats()?, "generic", &tally, &frames)?;

    topo.l4lb(&["detach", "-i", dev]).success()?;
    topo.assert_no_xdp()
}

/// (c) every bad destination file is refused with one clear line, and no map changes.
fn bad_destination_files_leave_maps_byte_identical() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    topo.l4lb(&["attach", "-i", dev]).success()?;
    let file = sample("4_destinations.csv");
    topo.l4lb(&["map", "-i", dev, "-f", &file]).success()?;
    // Some traffic first, so that the counters are not all zero.
    let expect = Expectation::new(&topo, LB_ADDR, &read_destinations(&file)?)?;
    send_and_check(&topo, &probe_frames(&topo, 50, 40_000), &expect)?;
    let before = topo.dump()?;

    let directory = topo.dir.join("destinations.d");
    std::fs::create_dir_all(&directory)?;
    let good = "10.0.1.1, 02:00:0a:00:01:01\n";
    // (name, path, line the error must name)
    let cases: Vec<(&str, String, Option<usize>)> = vec![
        ("missing file", topo.dir.join("missing.csv").display().to_string(), None),
        ("empty file", topo.file("empty.csv", b"")?, None),
        ("only comments", topo.file("comments.csv", b"# IP, MAC\n\n   # nothing else\n")?, None),
        ("bad IP", topo.file("bad_ip.csv", format!("{good}10.0.1.256, 02:00:0a:00:01:02\n").as_bytes())?, Some(2)),
        (
            "bad MAC",
            topo.file("bad_mac.csv", format!("# lab\n{good}10.0.1.2, 02:00:0a:00:01:0g\n").as_bytes())?,
            Some(3),
        ),
        ("3 fields", topo.file("three.csv", b"10.0.1.1, 02:00:0a:00:01:01, 7\n")?, Some(1)),
        (
            "duplicate address",
            topo.file(
                "dup.csv",
                format!("{good}10.0.1.2, 02:00:0a:00:01:02\n10.0.1.1, 02:00:0a:00:01:03\n").as_bytes(),
            )?,
            Some(3),
        ),
        (
            "binary garbage",
            topo.file("garbage.csv", &[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0xff, 0xfe, 0x80, 0, b',', 0xc3])?,
            Some(1),
        ),
        ("a directory", directory.display().to_string(), None),
    ];
    let mut problems = Vec::new();
    for (name, path, line) in &cases {
        let out = topo.l4lb(&["map", "-i", dev, "-f", path]);
        let lines: Vec<&str> = out.stderr.lines().collect();
        let names_place = match line {
            Some(line) => out.stderr.contains(&format!("{path}:{line}:")),
            None => out.stderr.contains(path.as_str()),
        };
        if !matches!(out.code, Some(code) if code != 0)
            || lines.len() != 1
            || !lines[0].starts_with("l4lb: error:")
            || !names_place
        {
            problems.push(format!(
                "{name}: want one `l4lb: error:` line naming {path}{}: {}",
                line.map(|l| format!(":{l}")).unwrap_or_default(),
                out.describe()
            ));
        }
        if topo.dump()? != before {
            problems.push(format!("{name}: the maps changed"));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// (d) errors without an l4lb program: unknown interface, nothing attached, offload on veth.
fn clear_errors_without_an_l4lb_program() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    let file = sample("4_destinations.csv");

    let out = topo.l4lb(&["map", "-i", "nosuchdev0", "-f", &file]).failure()?;
    ensure!(out.stderr.starts_with("l4lb: error:") && out.stderr.contains("nosuchdev0"), "{}", out.describe());

    for args in [
        &["stats", "-i", dev, "--count", "1", "--interval", "0.1"][..],
        &["stats", "-i", dev][..],
        &["status", "-i", dev][..],
        &["map", "-i", dev, "-f", &file][..],
        &["detach", "-i", dev][..],
    ] {
        let out = topo.l4lb(args).failure()?;
        ensure!(out.stderr.contains("no l4lb program"), "{}", out.describe());
    }

    let out = topo.l4lb(&["attach", "-i", dev, "--mode", "hw"]).failure()?;
    ensure!(out.stderr.to_lowercase().contains("offload"), "offload failure does not say so: {}", out.describe());
    topo.assert_no_xdp()?;
    Ok(())
}

/// (d) `map` without an address needs -s; a foreign XDP program is left alone.
fn map_without_address_needs_source_and_foreign_program_is_left_alone() -> TestResult {
    let topo = Topology::new(false)?;
    let dev = topo.lb_dev.as_str();
    let file = sample("4_destinations.csv");

    topo.l4lb(&["attach", "-i", dev]).success()?;
    let before = topo.dump()?;
    let out = topo.l4lb(&["map", "-i", dev, "-f", &file]).failure()?;
    ensure!(
        out.stderr.starts_with("l4lb: error:") && out.stderr.contains("-s"),
        "map without address: {}",
        out.describe()
    );
    ensure!(topo.dump()? == before, "a refused map changed the maps");
    topo.l4lb(&["map", "-i", dev, "-f", &file, "-s", "192.0.2.98"]).success()?;
    topo.l4lb(&["detach", "-i", dev]).success()?;
    topo.assert_no_xdp()?;

    attach_xdp_pass(&topo.lb, dev)?;
    let foreign = topo.lb_xdp_programs()?;
    ensure!(foreign.len() == 1 && foreign[0].2 == "l4lbt_pass", "foreign program: {foreign:?}");
    let out = topo.l4lb(&["detach", "-i", dev]).failure()?;
    ensure!(out.stderr.contains("not l4lb"), "detach of a foreign program: {}", out.describe());
    ensure!(topo.lb_xdp_programs()? == foreign, "detach removed or changed the foreign program");
    let out = topo.l4lb(&["map", "-i", dev, "-f", &file, "-s", "192.0.2.98"]).failure()?;
    ensure!(out.stderr.contains("not l4lb"), "map on a foreign program: {}", out.describe());
    let out = topo.l4lb(&["attach", "-i", dev]).failure()?;
    ensure!(out.stderr.contains("--force"), "attach over a foreign program: {}", out.describe());
    ensure!(topo.lb_xdp_programs()? == foreign, "refused commands changed the foreign program");
    Ok(())
}

/// (e) a second `map` with one destination removed and one added keeps the
/// counters, and the flows, of the destinations that stay.
fn remap_keeps_counters_and_flows_of_staying_destinations() -> TestResult {
    let topo = Topology::new(true)?;
    let dev = topo.lb_dev.as_str();
    topo.l4lb(&["attach", "-i", dev]).success()?;
    let file = sample("4_destinations.csv");
    let old = read_destinations(&file)?;
    topo.l4lb(&["map", "-i", dev, "-f", &file]).success()?;
    let frames = probe_frames(&topo, N, 50_000);
    let expect_old = Expectation::new(&topo, LB_ADDR, &old)?;
    let first_model = expect_old.model.clone();
    let (old_routes, first) = send_and_check(&topo, &frames, &expect_old)?;
    check_stats(&topo.stats()?, "driver", &first, &frames)?;

    let removed = old[3];
    let added = (Ipv4Addr::new(10, 0, 1, 5), [0x02, 0x00, 0x0a, 0x00, 0x01, 0x05]);
    let new: Vec<_> = old[..3].iter().copied().chain([added]).collect();
    let path = topo.file("swapped.csv", destinations_text(&new).as_bytes())?;
    topo.l4lb(&["map", "-i", dev, "-f", &path]).success()?;

    let after = stats_tally(&topo.stats()?[1])?;
    let mut expected: Tally = first.clone();
    expected.remove(&removed.0);
    expected.insert(added.0, (0, 0));
    ensure!(
        after == expected,
        "after the update stats show {after:?}, want {expected:?} (staying counters kept, new one at 0)"
    );

    // The same flows again. The slots whose backend changed while it stays
    // are in transition: a UDP flow there counts as one from before the
    // change and keeps its destination; a TCP SYN is a new connection and
    // moves exactly when Maglev's new table gave its slot to another backend
    // (the tables read before and after the update say which slots changed
    // hands). Both are pinned there; flows of steady slots pin nothing.
    let expect_new = Expectation::new(&topo, LB_ADDR, &new)?.after(&old_routes);
    let (new_routes, second) = send_and_check(&topo, &frames, &expect_new)?;
    let (before_table, after_table) = (catch_all_addresses(&first_model)?, catch_all_addresses(&expect_new.model)?);
    let seed = expect_new.model.global.hash_seed.unwrap_or(0);
    let staying_slots =
        (0..before_table.len()).filter(|&s| before_table[s].is_some_and(|a| a != IpAddr::V4(removed.0))).count();
    let moved_slots = (0..before_table.len())
        .filter(|&s| before_table[s].is_some_and(|a| a != IpAddr::V4(removed.0)) && after_table[s] != before_table[s])
        .count();
    let (mut moved, mut staying, mut pinned_kept, mut pinned_slot_moved, mut in_transition) = (0, 0, 0, 0, 0u64);
    for frame in &frames {
        let (key, flow) = flow_of(&frame[14..]).expect("probe has ports");
        let (old_dst, new_dst) = (old_routes[&key], new_routes[&key]);
        if old_dst == removed.0 {
            continue;
        }
        let slot = flow.slot(seed);
        let slot_moved = after_table[slot] != before_table[slot];
        in_transition += u64::from(slot_moved);
        if key.0 == PROTO_UDP {
            ensure!(new_dst == old_dst, "pinned flow {key:?} went {old_dst} -> {new_dst} although {old_dst} stayed");
            pinned_kept += 1;
            pinned_slot_moved += usize::from(slot_moved);
            continue;
        }
        staying += 1;
        ensure!(
            slot_moved == (old_dst != new_dst),
            "SYN flow {key:?} went {old_dst} -> {new_dst}, its slot {slot}: {:?} -> {:?}",
            before_table[slot],
            after_table[slot]
        );
        moved += usize::from(old_dst != new_dst);
    }
    println!(
        "remap: {moved} of {staying} unpinned (SYN) flows of staying destinations moved (their slots changed hands: {moved_slots} of {staying_slots} slots of staying destinations, {:.1}%); \
         {pinned_kept} UDP flows of staying destinations stayed, {pinned_slot_moved} of them although their slot changed hands (in transition); {in_transition} flows pinned in slots in transition",
        100.0 * moved_slots as f64 / staying_slots as f64
    );
    let staying_set: HashSet<Ipv4Addr> = new.iter().map(|d| d.0).collect();
    ensure!(new_routes.values().all(|dst| staying_set.contains(dst)), "traffic still goes to removed {}", removed.0);
    // Per destination: kept counts plus the second batch; rx/tx: both batches.
    let all = sum(&first, &second);
    let totals = (all.values().map(|v| v.0).sum(), all.values().map(|v| v.1).sum());
    check_stats_totals(&topo.stats()?, "driver", &sum(&expected, &second), totals, 2 * N, (in_transition, 0))?;
    Ok(())
}
