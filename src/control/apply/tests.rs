//! The planner and the executor against maps held in memory (`fake`).

use super::fake::FakeMaps;
use super::*;
use crate::config::{Global, Service};

const SEED: u32 = 0x5eed_0001;
const GW: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW2: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC: [u8; 6] = [2, 0, 0xc6, 0x12, 0, 0x65];

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn global() -> Global {
    Global {
        source_v4: Some(Ipv4Addr::new(198, 18, 0, 2)),
        source_v6: Some("2001:db8::2".parse().unwrap()),
        gateway_mac: Some(GW),
        hash_seed: None,
        mtu: None,
    }
}

fn tcp(addr: &str, port: u16) -> ServiceKey {
    ServiceKey::Vip { addr: ip(addr), protocol: Protocol::Tcp, port }
}

fn udp(addr: &str, port: u16) -> ServiceKey {
    ServiceKey::Vip { addr: ip(addr), protocol: Protocol::Udp, port }
}

fn be(addr: &str, weight: u32) -> Backend {
    Backend { addr: ip(addr), mac: None, weight }
}

fn service(key: ServiceKey, backends: &[Backend]) -> Service {
    let mut backends = backends.to_vec();
    backends.sort();
    Service::new(key, backends)
}

fn model(services: Vec<Service>) -> Model {
    let mut services = services;
    services.sort_by_key(|s| s.key);
    Model { global: global(), services, ..Model::default() }
}

/// `n` backends 10.0.x.y (weight 1).
fn pool(first: u32, n: u32) -> Vec<Backend> {
    (first..first + n)
        .map(|i| Backend { addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), mac: None, weight: 1 })
        .collect()
}

/// Flags of a tracked service with IPv4 backends (ports hashed).
const TRACKED_V4: u32 = consts::L4LB_SERVICE_ACTIVE
    | consts::L4LB_SERVICE_HASH_PORTS
    | consts::L4LB_SERVICE_IPV4_BACKENDS
    | consts::L4LB_SERVICE_TRACK_FLOWS;

/// An l4lb_services entry as include/l4lb.h lays it out: flags, changed,
/// udp_grace, idle_timeout (native order).
fn entry_bytes(flags: u32, changed: u32, udp_grace: u32, idle_timeout: u32) -> Vec<u8> {
    [flags, changed, udp_grace, idle_timeout].iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fn config_bytes(c: &Config) -> Vec<u8> {
    bytes_of(c)
}

fn assert_same(got: &Snapshot, want: &Snapshot) {
    assert_eq!(got.running, want.running);
    assert_eq!(config_bytes(&got.config), config_bytes(&want.config));
    assert!(got.vips == want.vips, "VIP entries differ");
}

/// Plans and executes `wanted`, checks that the maps read back as the plan
/// said and that planning the same model again writes nothing.
fn run(maps: &FakeMaps, wanted: &Model) -> Plan {
    run_at(maps, wanted, 0)
}

/// [`run`] with the host's tick at `tick` when the maps are read (what
/// changed services are stamped with); planned again one tick later.
fn run_at(maps: &FakeMaps, wanted: &Model, tick: u32) -> Plan {
    let now = snapshot_at(maps, tick);
    let plan = plan(&now, wanted, SEED).unwrap();
    let tables = maps.tables.borrow().clone();
    execute(maps, &plan).unwrap();
    check_after(maps, &plan, &now, &tables);
    let after = snapshot_at(maps, tick + 1);
    assert_eq!(after.running.model().services, wanted.services);
    let again = super::plan(&after, wanted, SEED ^ 1).unwrap();
    assert!(again.is_empty(), "not idempotent: {:?}", again.steps);
    assert!(again.diff.is_empty());
    plan
}

/// The maps read at tick `tick`.
fn snapshot_at(maps: &FakeMaps, tick: u32) -> Snapshot {
    let mut now = maps.snapshot();
    now.tick = tick;
    now
}

/// After `plan` (made from `now`, the tables then `tables`) was carried
/// out: the maps read back exactly as `plan.after` (services with their
/// tables, transitions and `changed`; the configuration with its clock;
/// the VIP entries); every table word is the current backend, with the
/// TRANSITION bit and the previous backend in the high half for a slot in
/// transition; each entry carries changed, udp_grace and idle_timeout; a
/// service that stays had exactly the slots whose word changed written.
/// And the planner's promises: an untracked service has no slot in
/// transition, a previous backend is a backend of the service.
fn check_after(maps: &FakeMaps, plan: &Plan, now: &Snapshot, tables: &[u32]) {
    assert_same(&maps.snapshot(), &plan.after);
    let words = maps.tables.borrow();
    for s in &plan.after.running.services {
        let base = s.number as usize * MAGLEV_SIZE;
        for (i, &word) in words[base..base + MAGLEV_SIZE].iter().enumerate() {
            let want = match s.transitions.get(&(i as u32)) {
                Some(&previous) => {
                    s.table[i] | consts::L4LB_SLOT_TRANSITION | previous << consts::L4LB_SLOT_PREVIOUS_SHIFT
                }
                None => s.table[i],
            };
            assert_eq!(word, want, "service {} slot {i}", s.key);
        }
        let entry = maps.read(MapId::Services, s.number).unwrap();
        assert_eq!(entry[4..], entry_bytes(0, s.changed, s.udp_grace, s.idle_timeout)[4..], "service {}", s.key);
        assert!(s.track_flows || s.transitions.is_empty(), "{}: untracked with slots in transition", s.key);
        for (slot, previous) in &s.transitions {
            assert!(
                s.backends.iter().any(|b| b.number == *previous),
                "{} slot {slot}: previous {previous} is no backend of it",
                s.key
            );
        }
        if now.running.service(&s.key).is_some() {
            let written: BTreeSet<u32> = slot_writes(plan, s.number).iter().map(|w| w.0).collect();
            let changed: BTreeSet<u32> =
                (0..MAGLEV_SIZE).filter(|&i| tables[base + i] != words[base + i]).map(|i| i as u32).collect();
            assert_eq!(written, changed, "{}: slots written", s.key);
        }
    }
}

/// The (slot, word) writes of `plan` into service `number`'s table.
fn slot_writes(plan: &Plan, number: u32) -> Vec<(u32, u32)> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Slots { service, writes } if *service == number => Some(writes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn writes_to(plan: &Plan, map: MapId) -> Vec<u32> {
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Write { map: m, key, .. } | Step::Zero { map: m, key } if *m == map => Some(*key),
            _ => None,
        })
        .collect()
}

fn position(plan: &Plan, pred: impl Fn(&Step) -> bool) -> usize {
    plan.steps.iter().position(pred).expect("step present")
}

#[test]
fn a_new_service_is_written_whole_before_it_is_published() {
    let maps = FakeMaps::new();
    let wanted = model(vec![service(tcp("203.0.113.10", 80), &pool(1, 3))]);
    let plan = run(&maps, &wanted);
    let s = &plan.after.running.services[0];
    assert_eq!(s.number, 0);
    assert_eq!(s.backends.iter().map(|b| b.number).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(s.table.iter().all(|&n| n < 3), "every slot leads to a backend");
    assert_eq!(plan.slots_written(), MAGLEV_SIZE);

    let table = position(&plan, |s| matches!(s, Step::Slots { service: 0, .. }));
    let entry = position(&plan, |s| matches!(s, Step::Write { map: MapId::Services, key: 0, .. }));
    let vip_writes: Vec<usize> = plan
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Step::Write { map: MapId::Vips, .. }))
        .map(|(i, _)| i)
        .collect();
    let backends = position(&plan, |s| matches!(s, Step::Write { map: MapId::Backends, .. }));
    assert!(backends < table && table < entry && entry < vip_writes[0], "{:?}", plan.steps);
    // The entry is staged with family 0, then published by its family.
    let Step::Write { value: staged, .. } = &plan.steps[vip_writes[0]] else { unreachable!() };
    let Step::Write { value: published, .. } = &plan.steps[vip_writes[1]] else { unreachable!() };
    assert_eq!(staged[16], 0);
    assert_eq!(staged[..16], published[..16]);
    assert_eq!(staged[17..], published[17..]);
    assert_eq!(published[16], bpf::FAMILY_IPV4);
    // vip_probes is raised before the entry is published.
    let config = position(&plan, |s| matches!(s, Step::Write { map: MapId::Config, .. }));
    assert!(config < vip_writes[0]);
    assert_eq!(plan.after.config.vip_probes, 1);
    assert!(!plan.steps.contains(&Step::Grace), "nothing to clear, no grace period");
    // Counters of new numbers start at zero.
    assert_eq!(writes_to(&plan, MapId::BackendStats), [0, 1, 2]);
    assert_eq!(writes_to(&plan, MapId::ServiceStats), [0]);
    // The entries as the datapath reads them.
    let c = plan.after.config;
    assert_eq!(c.flags & consts::L4LB_CONFIG_SRC_SET, consts::L4LB_CONFIG_SRC_SET);
    assert_eq!(c.flags & (consts::L4LB_CONFIG_ANY_PORT | consts::L4LB_CONFIG_CATCH_ALL), 0);
    let backend: bpf::Backend = bpf::value_from(&maps.read(MapId::Backends, 0).unwrap()).unwrap();
    assert_eq!(
        (backend.addr[..4].to_vec(), backend.mac, backend.family, backend.service, backend.weight),
        (vec![10, 0, 0, 1], GW, 4, 0, 1)
    );
    assert_eq!(u32::from(backend.flags), consts::L4LB_BACKEND_ACTIVE | consts::L4LB_BACKEND_GATEWAY_MAC);
    // Its entry: flags, never changed, the default grace and idle timeout.
    assert_eq!(maps.read(MapId::Services, 0).unwrap(), entry_bytes(TRACKED_V4, 0, 30, 300));
}

#[test]
fn a_removed_service_is_unpublished_then_cleared_after_a_grace_period() {
    let maps = FakeMaps::new();
    let web = service(tcp("203.0.113.10", 80), &pool(1, 3));
    let dns = service(udp("203.0.113.10", 53), &pool(1, 2));
    run(&maps, &model(vec![web.clone(), dns.clone()]));
    let before = maps.snapshot();
    let dns_number = before.running.service(&dns.key).unwrap().number;
    let dns_backends: Vec<u32> = before.running.service(&dns.key).unwrap().backends.iter().map(|b| b.number).collect();
    let entry = before.vip_positions()[&vip_key_bytes(&dns.key).unwrap()];

    let plan = run(&maps, &model(vec![web.clone()]));
    let grace = position(&plan, |s| *s == Step::Grace);
    let freed = position(
        &plan,
        |s| matches!(s, Step::Write { map: MapId::Vips, value, .. } if value[16] == 0 && value[..16] != [0; 16]),
    );
    let cleared =
        position(&plan, |s| matches!(s, Step::Write { map: MapId::Vips, value, .. } if value == &vec![0; 24]));
    assert!(freed < grace && grace < cleared);
    assert_eq!(writes_to(&plan, MapId::Services), [dns_number]);
    let mut backends = writes_to(&plan, MapId::Backends);
    backends.sort();
    assert_eq!(backends, dns_backends);
    assert!(plan.steps[grace..].iter().all(|s| !matches!(s, Step::Slots { .. })));
    assert_eq!(maps.snapshot().vips[entry as usize], [0; 24]);
    assert_eq!(maps.graces.get(), 1);
    // The staying service kept its number and table.
    assert_eq!(plan.after.running.service(&web.key), before.running.service(&web.key));
}

#[test]
fn backend_changes_write_only_the_slots_that_change() {
    let maps = FakeMaps::new();
    let key = tcp("203.0.113.10", 80);
    let backends = pool(1, 10);
    run(&maps, &model(vec![service(key, &backends)]));
    let before = maps.snapshot().running.service(&key).unwrap().clone();

    // One more backend: it takes a new number, the others keep theirs.
    let more = pool(1, 11);
    let plan = run(&maps, &model(vec![service(key, &more)]));
    let after = plan.after.running.service(&key).unwrap();
    for b in &before.backends {
        assert_eq!(after.backends.iter().find(|a| a.backend.addr == b.backend.addr).unwrap().number, b.number);
    }
    let new_number = after.backends.iter().find(|a| a.backend.addr == more[10].addr).unwrap().number;
    assert_eq!(new_number, 10);
    assert_eq!(plan.slots_written(), maglev::diff(&before.table, &after.table).len());
    assert!(plan.slots_written() < MAGLEV_SIZE / 5, "about 1/11 of the slots move: {}", plan.slots_written());
    assert_eq!(writes_to(&plan, MapId::Backends), [10], "only the new entry is written");
    assert_eq!(writes_to(&plan, MapId::BackendStats), [10]);

    // A weight change: the entry (bookkeeping) and some slots.
    let mut heavier = more.clone();
    heavier[0].weight = 3;
    let plan = run(&maps, &model(vec![service(key, &heavier)]));
    assert_eq!(writes_to(&plan, MapId::Backends), [0]);
    assert!(writes_to(&plan, MapId::BackendStats).is_empty(), "its counters keep counting");
    assert!(plan.slots_written() > 0 && plan.slots_written() < MAGLEV_SIZE / 2);

    // A backend removed: its slots move first, its entry is cleared after the grace period.
    let fewer: Vec<Backend> = heavier.iter().copied().filter(|b| b.addr != ip("10.0.0.5")).collect();
    let removed_number = maps
        .snapshot()
        .running
        .service(&key)
        .unwrap()
        .backends
        .iter()
        .find(|b| b.backend.addr == ip("10.0.0.5"))
        .unwrap()
        .number;
    let plan = run(&maps, &model(vec![service(key, &fewer)]));
    let slots = position(&plan, |s| matches!(s, Step::Slots { .. }));
    let grace = position(&plan, |s| *s == Step::Grace);
    let clear =
        position(&plan, |s| matches!(s, Step::Write { map: MapId::Backends, key, .. } if *key == removed_number));
    assert!(slots < grace && grace < clear);
    assert!(plan.after.running.service(&key).unwrap().table.iter().all(|&n| n != removed_number));

    // Cleared by that apply, the number is free again: the lowest free one.
    let plan = run(&maps, &model(vec![service(key, &heavier)]));
    let back = plan
        .after
        .running
        .service(&key)
        .unwrap()
        .backends
        .iter()
        .find(|b| b.backend.addr == ip("10.0.0.5"))
        .unwrap()
        .number;
    assert_eq!(back, removed_number);
    assert_eq!(writes_to(&plan, MapId::BackendStats), [removed_number]);
}

#[test]
fn a_drained_backend_keeps_its_entry_and_loses_its_slots() {
    let maps = FakeMaps::new();
    let key = tcp("203.0.113.10", 80);
    let mut backends = pool(1, 4);
    run(&maps, &model(vec![service(key, &backends)]));
    backends[2].weight = 0;
    let plan = run(&maps, &model(vec![service(key, &backends)]));
    let s = plan.after.running.service(&key).unwrap();
    let drained = s.backends[2].number;
    assert!(s.table.iter().all(|&n| n != drained));
    assert_eq!(writes_to(&plan, MapId::Backends), [drained]);
}

#[test]
fn flipping_track_flows_writes_only_the_service_entry() {
    let maps = FakeMaps::new();
    let tracked = service(udp("203.0.113.10", 53), &pool(1, 3));
    let untracked = Service { track_flows: false, ..tracked.clone() };
    let plan = run(&maps, &model(vec![tracked.clone()]));
    let number = plan.after.running.service(&tracked.key).unwrap().number;
    let table = plan.after.running.service(&tracked.key).unwrap().table.clone();
    let base = consts::L4LB_SERVICE_ACTIVE | consts::L4LB_SERVICE_HASH_PORTS | consts::L4LB_SERVICE_IPV4_BACKENDS;
    for (wanted, flags) in [(&untracked, base), (&tracked, base | consts::L4LB_SERVICE_TRACK_FLOWS)] {
        let plan = run(&maps, &model(vec![wanted.clone()]));
        assert_eq!(
            plan.steps,
            [Step::Write { map: MapId::Services, key: number, value: entry_bytes(flags, 0, 30, 300) }]
        );
        let after = plan.after.running.service(&wanted.key).unwrap();
        assert_eq!((after.track_flows, &after.table), (wanted.track_flows, &table), "the table stays");
        assert_eq!(plan.diff.changed[0].track_flows, Some((!wanted.track_flows, wanted.track_flows)));
    }
}

/// VIP keys (TCP ports of 203.0.113.10) whose home entry is the same, and
/// that home: the first one whose VIP_MAX_PROBES entries from it leave the
/// home of the address's fragment entry alone.
fn colliding(count: usize) -> (u32, Vec<ServiceKey>) {
    let fragment_home = vip_home(&fragment_key_bytes(ip("203.0.113.10"), Protocol::Tcp));
    let mut by_home: HashMap<u32, Vec<ServiceKey>> = HashMap::new();
    for port in 1..=u16::MAX {
        let key = tcp("203.0.113.10", port);
        let home = vip_home(&vip_key_bytes(&key).unwrap());
        if (fragment_home.wrapping_sub(home) & VIP_MASK) < VIP_MAX_PROBES {
            continue;
        }
        let keys = by_home.entry(home).or_default();
        keys.push(key);
        if keys.len() == count {
            return (home, keys.clone());
        }
    }
    panic!("no {count} colliding keys");
}

#[test]
fn vips_are_placed_within_the_probe_bound() {
    let probes = VIP_MAX_PROBES as usize;
    let (home, keys) = colliding(probes + 1);
    let maps = FakeMaps::new();
    let services: Vec<Service> = keys[..probes].iter().map(|&k| service(k, &pool(1, 1))).collect();
    // One at a time: each next one a step further from home.
    for n in 1..=probes {
        let plan = run(&maps, &model(services[..n].to_vec()));
        assert_eq!(plan.after.config.vip_probes, n as u32);
    }
    let positions = maps.snapshot().vip_positions();
    for (i, k) in keys[..probes].iter().enumerate() {
        assert_eq!(positions[&vip_key_bytes(k).unwrap()], (home + i as u32) & VIP_MASK);
    }
    // One more has no free entry within the bound.
    let mut more = services.clone();
    more.push(service(keys[probes], &pool(1, 1)));
    let err = plan(&maps.snapshot(), &model(more), SEED).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "VIP {}: no free entry in l4lb_vips within L4LB_VIP_MAX_PROBES = {probes} entries of its home entry {home}",
            keys[probes]
        )
    );
    // Removing the first: the others stay where they are, the bound stays.
    // (Its fragment entry moves to the next lowest port: rewritten in place.)
    let plan = run(&maps, &model(services[1..].to_vec()));
    assert_eq!(plan.after.config.vip_probes, VIP_MAX_PROBES);
    let fragment = maps.snapshot().running.fragments[0].entry;
    assert!(writes_to(&plan, MapId::Vips).iter().all(|&e| e == home || e == fragment));
    // The freed home entry goes to the last one on the next apply (not in
    // the same one as a removal), and the probe bound covers both until the end.
    let mut swap = services[1..].to_vec();
    swap.push(service(keys[probes], &pool(1, 1)));
    let plan = run(&maps, &model(swap));
    assert_eq!(maps.snapshot().vip_positions()[&vip_key_bytes(&keys[probes]).unwrap()], home);
    assert_eq!(plan.after.config.vip_probes, VIP_MAX_PROBES);
    // Removing the far ones lowers the bound, after they are unpublished.
    let plan = run(&maps, &model(vec![service(keys[probes], &pool(1, 1))]));
    assert_eq!(plan.after.config.vip_probes, 1);
    let last_config = plan.steps.iter().rposition(|s| matches!(s, Step::Write { map: MapId::Config, .. })).unwrap();
    let last_unpublish = plan
        .steps
        .iter()
        .rposition(
            |s| matches!(s, Step::Write { map: MapId::Vips, value, .. } if value[16] == 0 && value != &vec![0; 24]),
        )
        .unwrap();
    assert!(last_unpublish < last_config);
    let plan = run(&maps, &model(vec![]));
    assert_eq!(plan.after.config.vip_probes, 0);
}

#[test]
fn any_port_and_catch_all_flags() {
    let maps = FakeMaps::new();
    let plan = run(
        &maps,
        &model(vec![service(tcp("203.0.113.10", 0), &pool(1, 2)), service(ServiceKey::CatchAll, &pool(3, 2))]),
    );
    let c = plan.after.config;
    assert_ne!(c.flags & consts::L4LB_CONFIG_ANY_PORT, 0);
    assert_ne!(c.flags & consts::L4LB_CONFIG_CATCH_ALL, 0);
    let catch_all = plan.after.running.service(&ServiceKey::CatchAll).unwrap().number;
    assert_eq!(c.catch_all, catch_all);
    // The catch-all is published by the configuration after its table.
    let table = position(&plan, |s| matches!(s, Step::Slots { service, .. } if *service == catch_all));
    let publish = position(&plan, |s| {
        matches!(s, Step::Write { map: MapId::Config, value, .. }
        if u32::from_ne_bytes(value[4..8].try_into().unwrap()) & consts::L4LB_CONFIG_CATCH_ALL != 0)
    });
    assert!(table < publish);
    let plan = run(&maps, &model(vec![service(tcp("203.0.113.10", 80), &pool(1, 2))]));
    assert_eq!(plan.after.config.flags & (consts::L4LB_CONFIG_ANY_PORT | consts::L4LB_CONFIG_CATCH_ALL), 0);
    assert_eq!(plan.after.config.catch_all, 0);
}

#[test]
fn the_seed_is_chosen_once_and_kept() {
    let maps = FakeMaps::new();
    let plan = run(&maps, &Model { global: global(), ..Model::default() });
    assert_eq!(plan.after.running.global.hash_seed, Some(SEED));
    assert!(!plan.after.running.seed_fixed);
    // What `l4lb config` prints (the random seed written out) changes nothing.
    let printed = config::parse("lb.toml", config::to_toml(&maps.snapshot().running.model()).as_bytes()).unwrap();
    assert_eq!(printed.global.hash_seed, Some(SEED));
    assert!(plan_of(&maps, &printed).is_empty());
    // No seed in the file keeps it too.
    assert!(plan_of(&maps, &Model { global: global(), ..Model::default() }).is_empty());
    // A new seed is fixed.
    let mut fixed = printed.clone();
    fixed.global.hash_seed = Some(7);
    let plan = run(&maps, &fixed);
    assert_eq!(plan.steps.len(), 1, "{:?}", plan.steps);
    assert_eq!((plan.after.config.hash_seed, plan.after.running.seed_fixed), (7, true));
}

fn plan_of(maps: &FakeMaps, wanted: &Model) -> Plan {
    plan(&maps.snapshot(), wanted, SEED ^ 0xff).unwrap()
}

#[test]
fn a_gateway_change_rewrites_the_entries_that_use_it() {
    let maps = FakeMaps::new();
    let mut backends = pool(1, 3);
    backends[1].mac = Some(MAC);
    let key = tcp("203.0.113.10", 80);
    run(&maps, &model(vec![service(key, &backends)]));
    let mut wanted = model(vec![service(key, &backends)]);
    wanted.global.gateway_mac = Some(GW2);
    let plan = run(&maps, &wanted);
    let numbers = &plan.after.running.service(&key).unwrap().backends;
    let mut written = writes_to(&plan, MapId::Backends);
    written.sort();
    assert_eq!(written, [numbers[0].number, numbers[2].number]);
    assert_eq!(plan.slots_written(), 0);
    let entry: bpf::Backend = bpf::value_from(&maps.read(MapId::Backends, numbers[0].number).unwrap()).unwrap();
    assert_eq!(entry.mac, GW2);
    // Entries are rewritten before the configuration names the new gateway.
    let config = position(&plan, |s| matches!(s, Step::Write { map: MapId::Config, .. }));
    assert!(position(&plan, |s| matches!(s, Step::Write { map: MapId::Backends, .. })) < config);
}

#[test]
fn limits_are_errors() {
    let too_many: Vec<Service> = (0..65u16).map(|p| service(tcp("203.0.113.10", p + 1), &pool(1, 1))).collect();
    assert_eq!(check_limits(&model(too_many)).unwrap_err().to_string(), "65 services: at most MAX_SERVICES = 64");
    let wide = model(vec![service(ServiceKey::CatchAll, &pool(0, 513))]);
    assert_eq!(
        check_limits(&wide).unwrap_err().to_string(),
        "service * has 513 backends: at most MAX_BACKENDS_PER_SERVICE = 512"
    );
    // Every service at its 512 backends fits l4lb_backends: no limit of its own.
    let full: Vec<Service> = (0..64u16).map(|p| service(tcp("203.0.113.10", p + 1), &pool(0, 512))).collect();
    assert!(check_limits(&model(full)).is_ok());
    let mixed = model(vec![service(ServiceKey::CatchAll, &[be("198.18.0.101", 1), be("2001:db8::101", 1)])]);
    assert_eq!(
        check_limits(&mixed).unwrap_err().to_string(),
        "the catch-all service may not mix IPv4 and IPv6 backends"
    );
    assert!(plan(&Snapshot::empty(), &mixed, SEED).is_err());
}

#[test]
fn the_catch_all_through_map_edits_leaves_other_services_alone() {
    let maps = FakeMaps::new();
    let web = service(tcp("203.0.113.10", 80), &pool(100, 4));
    run(&maps, &model(vec![web.clone()]));
    let web_before = maps.snapshot().running.service(&web.key).unwrap().clone();
    // What `l4lb map` does: the running model with the catch-all's backends replaced.
    let rows =
        |first: u32| -> Vec<Backend> { pool(first, 5).into_iter().map(|b| Backend { mac: Some(MAC), ..b }).collect() };
    for first in [1, 3] {
        let mut wanted = maps.snapshot().running.model();
        let catch_all = service(ServiceKey::CatchAll, &rows(first));
        match wanted.services.binary_search_by(|s| s.key.cmp(&ServiceKey::CatchAll)) {
            Ok(i) => wanted.services[i] = catch_all,
            Err(i) => wanted.services.insert(i, catch_all),
        }
        let plan = run(&maps, &wanted);
        assert!(!plan.steps.iter().any(|s| matches!(s, Step::Slots { service, .. } if *service == web_before.number)));
        assert_eq!(plan.after.running.service(&web.key), Some(&web_before));
        let catch_all = plan.after.running.service(&ServiceKey::CatchAll).unwrap();
        assert_eq!(
            catch_all.backends.iter().map(|b| b.backend.addr).collect::<Vec<_>>(),
            rows(first).iter().map(|b| b.addr).collect::<Vec<_>>()
        );
    }
}

#[test]
fn ipv6_services_and_ipv4_in_ipv6() {
    let maps = FakeMaps::new();
    let v6 = service(udp("2001:db8::10", 53), &[be("2001:db8::101", 1), be("2001:db8::102", 2)]);
    let mixed = service(tcp("203.0.113.10", 443), &[be("198.18.0.101", 1), be("2001:db8::103", 1)]);
    let plan = run(&maps, &model(vec![v6.clone(), mixed.clone()]));
    let n6 = plan.after.running.service(&v6.key).unwrap().number;
    assert_eq!(
        maps.read(MapId::Services, n6).unwrap(),
        entry_bytes(TRACKED_V4 & !consts::L4LB_SERVICE_IPV4_BACKENDS, 0, 30, 300)
    );
    let n4 = plan.after.running.service(&mixed.key).unwrap().number;
    assert_eq!(
        maps.read(MapId::Services, n4).unwrap(),
        entry_bytes(TRACKED_V4, 0, 30, 300),
        "IPv4-in-IPv6: some backend is IPv4"
    );
    let b = plan.after.running.service(&mixed.key).unwrap().backends[1].number;
    let entry: bpf::Backend = bpf::value_from(&maps.read(MapId::Backends, b).unwrap()).unwrap();
    assert_eq!((entry.family, entry.addr), (bpf::FAMILY_IPV6, "2001:db8::103".parse::<Ipv6Addr>().unwrap().octets()));
}

#[test]
fn a_refused_write_leaves_every_map_as_it_was() {
    let maps = FakeMaps::new();
    let web = tcp("203.0.113.10", 80);
    let dns = udp("203.0.113.10", 53);
    run(&maps, &model(vec![service(web, &pool(1, 6)), service(dns, &pool(1, 2))]));
    maps.write(MapId::BackendStats, 9, &[1; 32]).unwrap();
    let mut next = model(vec![
        service(web, &pool(3, 7)),
        service(ServiceKey::CatchAll, &pool(20, 2)),
        service(tcp("203.0.113.11", 0), &pool(30, 1)),
    ]);
    next.global.gateway_mac = Some(GW2);
    next.global.hash_seed = Some(99);
    let now = maps.snapshot();
    let plan = plan(&now, &next, SEED).unwrap();
    let total = {
        let counter = Faulty::new(&maps, usize::MAX);
        let dump = maps.dump();
        execute(&counter, &plan).unwrap();
        let writes = counter.writes.get();
        // Put the maps back for the failure runs.
        *maps.entries.borrow_mut() = dump.0;
        *maps.tables.borrow_mut() = dump.1;
        writes
    };
    assert!(total > 20, "{total} writes");
    let before = maps.dump();
    for fail_at in 0..total {
        let faulty = Faulty::new(&maps, fail_at);
        let err = format!("{:#}", execute(&faulty, &plan).unwrap_err());
        assert!(err.contains("of map `l4lb_"), "{err}");
        assert!(err.contains("the update was rolled back"), "{err}");
        assert!(maps.dump() == before, "maps changed after a failure at write {fail_at}: {err}");
    }
    // And for real.
    execute(&maps, &plan).unwrap();
    assert_same(&maps.snapshot(), &plan.after);
}

#[test]
fn a_full_balancer_reuses_numbers_only_after_unpublishing() {
    let maps = FakeMaps::new();
    let full: Vec<Service> =
        (0..64u16).map(|p| service(tcp("203.0.113.10", p + 1), &pool(u32::from(p) * 2, 1))).collect();
    run(&maps, &model(full.clone()));
    let mut swapped = full[1..].to_vec();
    swapped.push(service(tcp("203.0.113.20", 80), &pool(500, 1)));
    let plan = run(&maps, &model(swapped));
    let old = maps.snapshot();
    let reused = plan.after.running.service(&tcp("203.0.113.20", 80)).unwrap().number;
    assert_eq!(reused, 0, "the removed service's number");
    let grace = position(&plan, |s| *s == Step::Grace);
    let table = position(&plan, |s| matches!(s, Step::Slots { service: 0, .. }));
    let unpublish = position(&plan, |s| matches!(s, Step::Write { map: MapId::Vips, value, .. } if value[16] == 0));
    assert!(unpublish < grace && grace < table, "{:?}", &plan.steps[..8]);
    // Its service entry is not cleared afterwards.
    assert!(!plan.steps[table..]
        .iter()
        .any(|s| matches!(s, Step::Write { map: MapId::Services, key: 0, value } if value == &vec![0; 16])));
    assert_eq!(old.running.services.len(), 64);
}

#[test]
fn decode_ignores_what_nothing_publishes() {
    let maps = FakeMaps::new();
    run(&maps, &model(vec![service(tcp("203.0.113.10", 80), &pool(1, 2))]));
    // An active service and backend no VIP names (an interrupted apply).
    maps.write(MapId::Services, 5, &entry_bytes(consts::L4LB_SERVICE_ACTIVE, 0, 30, 300)).unwrap();
    let stray = backend_entry(&be("10.9.9.9", 1), 5, Some(GW));
    maps.write(MapId::Backends, 77, &bytes_of(&stray)).unwrap();
    let running = maps.snapshot().running;
    assert_eq!(running.services.len(), 1);
    assert_eq!(running.services[0].backends.len(), 2);
}

#[test]
fn an_offloaded_program_holds_fewer_service_tables() {
    let mut small = Snapshot::empty();
    small.service_tables = crate::bpf::OFFLOAD_MAX_SERVICES;
    let services: Vec<Service> =
        (0..33u16).map(|p| service(tcp("203.0.113.10", p + 1), &pool(u32::from(p), 1))).collect();
    let err = plan(&small, &model(services.clone()), 7).unwrap_err().to_string();
    assert_eq!(
        err,
        "33 services: this program's l4lb_tables holds 32 service tables (an offloaded program gets L4LB_OFFLOAD_MAX_SERVICES = 32)"
    );
    let plan = plan(&small, &model(services[..32].to_vec()), 7).unwrap();
    assert!(plan.after.running.services.iter().all(|s| (s.number as usize) < 32));
}

// ----- fragment entries

fn fragment(snapshot: &Snapshot, addr: &str, protocol: Protocol) -> Option<crate::state::RunningFragment> {
    snapshot.running.fragments.iter().copied().find(|f| f.addr == ip(addr) && f.protocol == protocol)
}

fn number(snapshot: &Snapshot, key: &ServiceKey) -> u32 {
    snapshot.running.service(key).unwrap_or_else(|| panic!("no {key}")).number
}

/// Index of the first write to VIP entry `entry` whose value passes `pred`.
fn vip_write(plan: &Plan, entry: u32, pred: impl Fn(&[u8]) -> bool) -> usize {
    position(plan, |s| matches!(s, Step::Write { map: MapId::Vips, key, value } if *key == entry && pred(value)))
}

fn service_write(plan: &Plan, n: u32) -> usize {
    position(
        plan,
        |s| matches!(s, Step::Write { map: MapId::Services, key, value } if *key == n && value != &vec![0; 16]),
    )
}

/// Fails the plan at every write in turn: each time the maps are back byte
/// for byte; then carries it out.
fn rollback_everywhere(maps: &FakeMaps, plan: &Plan) {
    let before = maps.dump();
    let counter = Faulty::new(maps, usize::MAX);
    execute(&counter, plan).unwrap();
    let total = counter.writes.get();
    *maps.entries.borrow_mut() = before.0.clone();
    *maps.tables.borrow_mut() = before.1.clone();
    for fail_at in 0..total {
        let faulty = Faulty::new(maps, fail_at);
        let err = format!("{:#}", execute(&faulty, plan).unwrap_err());
        assert!(err.contains("the update was rolled back"), "{err}");
        assert!(maps.dump() == before, "maps changed after a failure at write {fail_at}: {err}");
    }
    execute(maps, plan).unwrap();
    assert_same(&maps.snapshot(), &plan.after);
}

#[test]
fn fragment_entries_follow_the_vips() {
    let maps = FakeMaps::new();
    let web = service(tcp("203.0.113.10", 80), &pool(1, 2));
    let tls = service(tcp("203.0.113.10", 443), &pool(1, 2));
    let dns = service(udp("203.0.113.10", 53), &pool(3, 1));
    let dns6 = service(udp("2001:db8::10", 53), &[be("2001:db8::101", 1)]);
    let catch_all = service(ServiceKey::CatchAll, &pool(9, 1));
    let plan = run(&maps, &model(vec![web.clone(), tls.clone(), dns.clone(), dns6.clone(), catch_all.clone()]));
    let now = maps.snapshot();
    // One entry per (address, protocol) of the VIPs, none for the catch-all;
    // not services: the running model is the wanted one (run checks it).
    assert_eq!(now.running.fragments.len(), 3);
    assert_eq!(now.running.services.len(), 5);
    let f = fragment(&now, "203.0.113.10", Protocol::Tcp).unwrap();
    assert_eq!(f.service, number(&now, &web.key), "the lowest port");
    assert_eq!(fragment(&now, "203.0.113.10", Protocol::Udp).unwrap().service, number(&now, &dns.key));
    let f6 = fragment(&now, "2001:db8::10", Protocol::Udp).unwrap();
    assert_eq!(f6.service, number(&now, &dns6.key));
    // The bytes the datapath looks up: family | FRAGMENT, port 0.
    let e = now.vips[f.entry as usize];
    assert_eq!((&e[..4], e[16], e[17], &e[18..20]), (&[203, 0, 113, 10][..], 0x84, 6, &[0, 0][..]));
    assert_eq!(now.vips[f6.entry as usize][16], 0x86);
    assert_eq!(e[..20], fragment_key_bytes(ip("203.0.113.10"), Protocol::Tcp));
    // Placed from its home like a VIP, counted in vip_probes.
    let home = vip_home(&fragment_key_bytes(ip("203.0.113.10"), Protocol::Tcp));
    assert!((f.entry.wrapping_sub(home) & VIP_MASK) < plan.after.config.vip_probes);
    // Written after its service is published, staged with family 0 first.
    let staged = vip_write(&plan, f.entry, |v| v[16] == 0);
    let published = vip_write(&plan, f.entry, |v| v[16] == 0x84);
    assert!(service_write(&plan, f.service) < staged && staged < published);
    assert!(
        vip_write(
            &plan,
            now.vips.iter().position(|v| v[..20] == vip_key_bytes(&web.key).unwrap()[..]).unwrap() as u32,
            |v| v[16] == 4
        ) < staged
    );

    // A port-0 VIP is preferred: the entry is re-pointed in place, one
    // write of the service field, once the new service is published.
    let any = service(tcp("203.0.113.10", 0), &pool(5, 1));
    let plan =
        run(&maps, &model(vec![web.clone(), tls.clone(), dns.clone(), dns6.clone(), catch_all.clone(), any.clone()]));
    let after = maps.snapshot();
    let any_number = number(&after, &any.key);
    assert_eq!(
        fragment(&after, "203.0.113.10", Protocol::Tcp).unwrap(),
        crate::state::RunningFragment { service: any_number, ..f }
    );
    let repoint: Vec<usize> = plan
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Step::Write { map: MapId::Vips, key, .. } if *key == f.entry))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(repoint.len(), 1, "{:?}", plan.steps);
    let Step::Write { value, .. } = &plan.steps[repoint[0]] else { unreachable!() };
    assert_eq!(value[..20], e[..20], "only the service field changes");
    assert_eq!(u32::from_ne_bytes(value[20..].try_into().unwrap()), any_number);
    assert!(service_write(&plan, any_number) < repoint[0]);
    assert!(!plan.steps.contains(&Step::Grace), "a re-pointed entry needs no grace period");

    // The port-0 VIP goes: back to the lowest port, before it is unpublished.
    let any_entry = after.vip_positions()[&vip_key_bytes(&any.key).unwrap()];
    let plan = run(&maps, &model(vec![web.clone(), tls.clone(), dns.clone(), dns6.clone(), catch_all.clone()]));
    let back = vip_write(&plan, f.entry, |v| v[16] == 0x84);
    let unpublished = vip_write(&plan, any_entry, |v| v[16] == 0 && v != [0; 24]);
    assert!(back < unpublished && unpublished < position(&plan, |s| *s == Step::Grace));
    assert_eq!(fragment(&maps.snapshot(), "203.0.113.10", Protocol::Tcp).unwrap().service, number(&now, &web.key));

    // The lowest port goes: the next one takes the fragments.
    run(&maps, &model(vec![tls.clone(), dns.clone(), dns6.clone(), catch_all.clone()]));
    assert_eq!(fragment(&maps.snapshot(), "203.0.113.10", Protocol::Tcp).unwrap().service, number(&now, &tls.key));

    // The last UDP VIP of an address goes: its entry is unpublished before
    // the service, cleared after the grace period.
    let fu = fragment(&maps.snapshot(), "203.0.113.10", Protocol::Udp).unwrap();
    let dns_entry = maps.snapshot().vip_positions()[&vip_key_bytes(&dns.key).unwrap()];
    let plan = run(&maps, &model(vec![tls.clone(), dns6.clone(), catch_all.clone()]));
    let off = vip_write(&plan, fu.entry, |v| v[16] == 0 && v != [0; 24]);
    let dns_off = vip_write(&plan, dns_entry, |v| v[16] == 0 && v != [0; 24]);
    let grace = position(&plan, |s| *s == Step::Grace);
    let cleared = vip_write(&plan, fu.entry, |v| v == [0; 24]);
    assert!(off < dns_off && dns_off < grace && grace < cleared);
    assert!(fragment(&maps.snapshot(), "203.0.113.10", Protocol::Udp).is_none());

    // Nothing left: every entry free again.
    run(&maps, &model(vec![]));
    assert!(maps.snapshot().vips.iter().all(|v| *v == [0; 24]));
}

#[test]
fn fragment_entries_roll_back_and_survive_number_reuse() {
    // 64 services: 203.0.113.10:1 (number 0) and 63 on 203.0.113.11.
    let maps = FakeMaps::new();
    let first = service(tcp("203.0.113.10", 1), &pool(0, 1));
    let mut full: Vec<Service> =
        (1..64u16).map(|p| service(tcp("203.0.113.11", p), &pool(u32::from(p) * 2, 1))).collect();
    full.push(first.clone());
    run(&maps, &model(full.clone()));
    let before = maps.snapshot();
    assert_eq!(number(&before, &first.key), 0);
    let f = fragment(&before, "203.0.113.10", Protocol::Tcp).unwrap();
    assert_eq!(f.service, 0);

    // 203.0.113.10:1 replaced by :2, which can only take number 0 back: the
    // fragment entry is unpublished before the grace period that precedes
    // the new table, and published again once service 0 is.
    let second = service(tcp("203.0.113.10", 2), &pool(200, 1));
    let mut swapped = full[..63].to_vec();
    swapped.push(second.clone());
    let plan = plan(&before, &model(swapped.clone()), SEED).unwrap();
    rollback_everywhere(&maps, &plan);
    let after = maps.snapshot();
    assert_eq!(number(&after, &second.key), 0);
    let off = vip_write(&plan, f.entry, |v| v[16] == 0);
    let grace = position(&plan, |s| *s == Step::Grace);
    let table = position(&plan, |s| matches!(s, Step::Slots { service: 0, .. }));
    let on = vip_write(&plan, f.entry, |v| v[16] == 0x84);
    assert!(
        off < grace && grace < table && table < service_write(&plan, 0) && service_write(&plan, 0) < on,
        "{:?}",
        plan.steps.iter().filter(|s| !matches!(s, Step::Slots { .. })).collect::<Vec<_>>()
    );
    assert_eq!(fragment(&after, "203.0.113.10", Protocol::Tcp).unwrap(), f);
    assert!(super::plan(&after, &model(swapped.clone()), SEED).unwrap().is_empty());

    // 203.0.113.11:1 (the lowest port there) replaced by 203.0.113.12:1,
    // which reuses its number: the .11 entry is re-pointed to :2 (running
    // all along) before the grace period.
    let eleven = fragment(&after, "203.0.113.11", Protocol::Tcp).unwrap();
    let low = tcp("203.0.113.11", 1);
    let reused = number(&after, &low);
    let mut moved: Vec<Service> = swapped.iter().filter(|s| s.key != low).cloned().collect();
    moved.push(service(tcp("203.0.113.12", 1), &pool(300, 1)));
    let plan = super::plan(&after, &model(moved.clone()), SEED).unwrap();
    rollback_everywhere(&maps, &plan);
    let now = maps.snapshot();
    assert_eq!(number(&now, &tcp("203.0.113.12", 1)), reused);
    let repoint = vip_write(&plan, eleven.entry, |_| true);
    assert!(repoint < position(&plan, |s| *s == Step::Grace));
    assert_eq!(fragment(&now, "203.0.113.11", Protocol::Tcp).unwrap().service, number(&now, &tcp("203.0.113.11", 2)));
    assert_eq!(fragment(&now, "203.0.113.12", Protocol::Tcp).unwrap().service, reused);
    assert!(super::plan(&now, &model(moved), SEED).unwrap().is_empty());

    // Port 0 added and the lowest port removed at once, a new address, a
    // removed protocol: every write still undone.
    let mut next = model(vec![
        service(tcp("203.0.113.10", 0), &pool(400, 2)),
        service(udp("203.0.113.10", 53), &pool(402, 1)),
        service(udp("2001:db8::10", 53), &[be("2001:db8::101", 1)]),
    ]);
    next.global.mtu = Some(1400);
    let plan = super::plan(&now, &next, SEED).unwrap();
    rollback_everywhere(&maps, &plan);
    let end = maps.snapshot();
    assert_eq!(end.running.fragments.len(), 3);
    assert_eq!(end.config.mtu, 1400);
    assert!(super::plan(&end, &next, SEED).unwrap().is_empty());
}

#[test]
fn fragment_entries_are_placed_within_the_probe_bound() {
    // VIPs of 203.0.113.10 filling every entry from the home of
    // 203.0.113.20/tcp's fragment entry to the probe bound but one; the
    // .10 fragment entry and the .20:80 VIP elsewhere.
    let probes = VIP_MAX_PROBES;
    let target = vip_home(&fragment_key_bytes(ip("203.0.113.20"), Protocol::Tcp));
    let window = |e: u32| (e.wrapping_sub(target) & VIP_MASK) < probes;
    assert!(!window(vip_home(&fragment_key_bytes(ip("203.0.113.10"), Protocol::Tcp))));
    assert!(!window(vip_home(&vip_key_bytes(&tcp("203.0.113.20", 80)).unwrap())));
    let fillers: Vec<ServiceKey> = (1..=u16::MAX)
        .map(|p| tcp("203.0.113.10", p))
        .filter(|k| vip_home(&vip_key_bytes(k).unwrap()) == target)
        .take(probes as usize)
        .collect();
    let maps = FakeMaps::new();
    let mut services: Vec<Service> = fillers[..probes as usize - 1].iter().map(|&k| service(k, &pool(1, 1))).collect();
    services.push(service(tcp("203.0.113.20", 80), &pool(2, 1)));
    let plan = run(&maps, &model(services.clone()));
    let f = fragment(&maps.snapshot(), "203.0.113.20", Protocol::Tcp).unwrap();
    assert_eq!(f.entry, (target + probes - 1) & VIP_MASK, "the last entry within the bound");
    assert_eq!(plan.after.config.vip_probes, probes);
    // One more filler: no room for it (the fragment entry holds the last
    // entry), and from nothing, where VIPs are placed first, none for the
    // fragment entry: errors, the plan is all or nothing.
    services.push(service(fillers[probes as usize - 1], &pool(1, 1)));
    let err = super::plan(&maps.snapshot(), &model(services.clone()), SEED).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("VIP {}: no free entry in l4lb_vips within L4LB_VIP_MAX_PROBES = {probes} entries of its home entry {target}", fillers[probes as usize - 1])
    );
    let err = super::plan(&Snapshot::empty(), &model(services), SEED).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("fragment entry of 203.0.113.20/tcp: no free entry in l4lb_vips within L4LB_VIP_MAX_PROBES = {probes} entries of its home entry {target}")
    );
}

#[test]
fn the_mtu_is_written_first_kept_when_absent_and_checked() {
    let maps = FakeMaps::new();
    let web = service(tcp("203.0.113.10", 80), &pool(1, 2));
    let mut wanted = model(vec![web.clone()]);
    wanted.global.mtu = Some(1500);
    let plan = run(&maps, &wanted);
    assert_eq!((plan.after.config.mtu, plan.after.running.global.mtu), (1500, Some(1500)));
    assert_eq!(plan.diff.global.last(), Some(&config::GlobalChange::Mtu { old: None, new: 1500 }));
    // Written by the first configuration write, before any service.
    let first = position(&plan, |s| matches!(s, Step::Write { map: MapId::Config, .. }));
    let Step::Write { value, .. } = &plan.steps[first] else { unreachable!() };
    assert_eq!(u32::from_ne_bytes(value[8..12].try_into().unwrap()), 1500);
    assert!(first < service_write(&plan, 0));
    // Absent: kept. What `l4lb config` prints (with the MTU) changes nothing.
    assert!(plan_of(&maps, &model(vec![web.clone()])).is_empty());
    let printed = config::to_toml(&maps.snapshot().running.model());
    assert!(printed.contains("\nmtu = 1500\n"), "{printed}");
    assert!(plan_of(&maps, &config::parse("lb.toml", printed.as_bytes()).unwrap()).is_empty());
    // A change is one configuration write.
    wanted.global.mtu = Some(9000);
    let plan = run(&maps, &wanted);
    assert_eq!(plan.steps.len(), 1);
    assert_eq!(
        plan.diff.to_string(),
        "~ global mtu 1500 -> 9000\nservices: 0 added, 0 removed, 0 changed; global: 1 changed\n"
    );

    // Refused: out of range (models built by hand), too small for IPv6
    // backends (given, or running with no mtu in the model).
    let dns6 = service(udp("2001:db8::10", 53), &[be("2001:db8::101", 1)]);
    wanted.global.mtu = Some(500);
    assert!(plan_of_err(&maps, &wanted).starts_with("mtu 500 is below L4LB_MIN_MTU = 576"));
    wanted.global.mtu = Some(70000);
    assert_eq!(plan_of_err(&maps, &wanted), "mtu 70000 is above 65535 (the largest IPv4 packet)");
    let mut v6 = model(vec![web.clone(), dns6.clone()]);
    v6.global.mtu = Some(1319);
    assert!(
        plan_of_err(&maps, &v6).starts_with("mtu 1319 is below 1320 = L4LB_MIN_MTU6 + L4LB_IP6_OVERHEAD (1280 + 40), the least with IPv6 backends (here 2001:db8::101 of [2001:db8::10]:53/udp)"),
        "{}",
        plan_of_err(&maps, &v6)
    );
    v6.global.mtu = Some(1320);
    run(&maps, &v6);
    // Back to IPv4 backends and a small MTU; then IPv6 backends without an
    // mtu in the file: the running one is too small.
    let mut small = model(vec![web.clone()]);
    small.global.mtu = Some(1300);
    run(&maps, &small);
    let err = plan_of_err(&maps, &model(vec![web, dns6]));
    assert!(err.starts_with("the running MTU 1300 is below 1320"), "{err}");
    assert!(err.ends_with("; raise it with [global] mtu (or `l4lb attach --mtu`)"), "{err}");
    // A program loaded without an MTU (0, no limit) is not refused.
    assert!(check_mtu(&model(vec![service(udp("2001:db8::10", 53), &[be("2001:db8::101", 1)])]), 0).is_ok());
}

fn plan_of_err(maps: &FakeMaps, wanted: &Model) -> String {
    plan(&maps.snapshot(), wanted, SEED).unwrap_err().to_string()
}

// ----- slots in transition (docs/transitions.md)

/// The word of a slot in transition, as include/l4lb.h spells it.
fn transition_word(current: u32, previous: u32) -> u32 {
    current | consts::L4LB_SLOT_TRANSITION | previous << consts::L4LB_SLOT_PREVIOUS_SHIFT
}

/// l4lb_config.clock in the bytes of a configuration write.
fn clock_of(value: &[u8]) -> u32 {
    u32::from_ne_bytes(value[48..52].try_into().unwrap())
}

/// 203.0.113.10:80/tcp with 10 backends (numbers 0..=9) applied at tick 0,
/// then an 11th (number 10) at tick 1000: slots in transition.
fn tracked_in_transition(maps: &FakeMaps) -> ServiceKey {
    let key = tcp("203.0.113.10", 80);
    run(maps, &model(vec![service(key, &pool(1, 10))]));
    run_at(maps, &model(vec![service(key, &pool(1, 11))]), 1000);
    key
}

#[test]
fn adding_a_backend_puts_exactly_the_changed_slots_in_transition() {
    let maps = FakeMaps::new();
    let key = tcp("203.0.113.10", 80);
    let first = run_at(&maps, &model(vec![service(key, &pool(1, 10))]), 500);
    let before = first.after.running.service(&key).unwrap().clone();
    assert!(before.transitions.is_empty() && before.changed == 0, "a new service starts steady, never changed");
    assert_eq!(first.after.config.clock, 0, "no transition, no clock written");

    let plan = run_at(&maps, &model(vec![service(key, &pool(1, 11))]), 1000);
    let after = plan.after.running.service(&key).unwrap();
    let moved: BTreeMap<u32, u32> =
        (0..MAGLEV_SIZE).filter(|&i| before.table[i] != after.table[i]).map(|i| (i as u32, before.table[i])).collect();
    assert!(
        moved.len() > MAGLEV_SIZE / 20 && moved.len() < MAGLEV_SIZE / 5,
        "about 1/11 of the slots move: {}",
        moved.len()
    );
    assert_eq!(
        after.transitions, moved,
        "the slots whose backend changed, each with its old backend as the previous one"
    );
    assert!(
        after
            .table
            .iter()
            .enumerate()
            .filter(|(_, &n)| n == 10)
            .all(|(i, _)| after.transitions.get(&(i as u32)).is_some_and(|&p| p < 10)),
        "every slot of the new backend came from an old one"
    );
    assert_eq!((after.changed, plan.after.config.clock), (1000, 1000), "stamped with the snapshot's tick");
    // The writes: counters and entry of the new backend, the clock (before
    // any slot), the transition words of the moved slots, the entry.
    let Step::Write { map: MapId::Config, value: config, .. } = &plan.steps[2] else { panic!("{:?}", plan.steps[2]) };
    assert_eq!(clock_of(config), 1000);
    let words: Vec<(u32, u32)> =
        moved.iter().map(|(&i, &previous)| (i, transition_word(after.table[i as usize], previous))).collect();
    assert_eq!(
        plan.steps.len(),
        5,
        "{:?}",
        plan.steps.iter().filter(|s| !matches!(s, Step::Slots { .. })).collect::<Vec<_>>()
    );
    assert_eq!(plan.steps[0], Step::Zero { map: MapId::BackendStats, key: 10 });
    assert!(matches!(plan.steps[1], Step::Write { map: MapId::Backends, key: 10, .. }));
    assert_eq!(plan.steps[3], Step::Slots { service: after.number, writes: words });
    assert_eq!(
        plan.steps[4],
        Step::Write { map: MapId::Services, key: after.number, value: entry_bytes(TRACKED_V4, 1000, 30, 300) }
    );
    assert_eq!(plan.slots_written(), moved.len());
}

#[test]
fn a_removed_backend_leaves_no_transition_behind() {
    let maps = FakeMaps::new();
    let key = tracked_in_transition(&maps);
    let before = maps.snapshot().running.service(&key).unwrap().clone();
    let removed = before.backends.iter().find(|b| b.backend.addr == ip("10.0.0.3")).unwrap().number;
    let fewer: Vec<Backend> = pool(1, 11).into_iter().filter(|b| b.addr != ip("10.0.0.3")).collect();
    let now = snapshot_at(&maps, 2000);
    let plan = plan(&now, &model(vec![service(key, &fewer)]), SEED).unwrap();
    let tables = maps.tables.borrow().clone();
    rollback_everywhere(&maps, &plan);
    check_after(&maps, &plan, &now, &tables);
    let after = plan.after.running.service(&key).unwrap();
    assert!(after.table.iter().all(|&n| n != removed));
    // Slot by slot, the rule of docs/transitions.md with `removed` gone.
    let stays = |n: u32| n != removed;
    let (mut steady_removed, mut previous_removed) = (0, 0);
    for i in 0..MAGLEV_SIZE {
        let (was, current) = (before.table[i], after.table[i]);
        let want = match before.transitions.get(&(i as u32)) {
            // Steady on the removed backend: steady on the new one.
            None if was == removed => {
                steady_removed += 1;
                None
            }
            None if was == current => None,
            None => Some(was),
            // In transition from the removed backend: the old current one
            // if it stays, else the new one.
            Some(&previous) if !stays(previous) => {
                previous_removed += 1;
                Some(if stays(was) { was } else { current })
            }
            Some(&previous) => Some(previous),
        };
        assert_eq!(
            after.transitions.get(&(i as u32)).copied(),
            want,
            "slot {i}: was {was} (previous {:?}), now {current}",
            before.transitions.get(&(i as u32))
        );
    }
    assert!(
        steady_removed > 1000 && previous_removed > 100,
        "{steady_removed} steady on it, {previous_removed} in transition from it"
    );
    assert!(after.transitions.values().all(|&p| p != removed), "no previous number the apply removes");
    // Its slots (steady, or current of a transition) are steady now.
    for (i, &was) in before.table.iter().enumerate() {
        if was == removed && !before.transitions.contains_key(&(i as u32)) {
            assert!(!after.transitions.contains_key(&(i as u32)), "slot {i}");
        }
    }
    // Slots in transition changed: the service is stamped, the clock written.
    assert_eq!((after.changed, plan.after.config.clock), (2000, 2000));

    // The new backend (number 10) goes too: the slots whose previous and
    // current backends are both gone keep only their pins (previous = the
    // new current).
    let before = after.clone();
    let both_gone: Vec<usize> = (0..MAGLEV_SIZE)
        .filter(|&i| before.table[i] == 10 && before.transitions.get(&(i as u32)) == Some(&10))
        .collect();
    assert!(both_gone.len() > 100, "{}", both_gone.len());
    let fewer: Vec<Backend> = fewer.into_iter().filter(|b| b.addr != ip("10.0.0.11")).collect();
    let plan = run_at(&maps, &model(vec![service(key, &fewer)]), 3000);
    let after = plan.after.running.service(&key).unwrap();
    for i in both_gone {
        assert_eq!(after.transitions.get(&(i as u32)), Some(&after.table[i]), "slot {i}");
    }
    assert!(after.transitions.values().all(|&p| p != 10 && p != removed));
    assert_eq!(after.changed, 3000);
}

#[test]
fn a_second_change_keeps_the_first_previous_backend() {
    // A -> B (a new backend, number 4) at tick 100, then B -> C (another
    // new one, number 5) at tick 200: A stays the previous backend.
    let maps = FakeMaps::new();
    let key = tcp("203.0.113.10", 80);
    run(&maps, &model(vec![service(key, &pool(1, 4))]));
    let original = maps.snapshot().running.service(&key).unwrap().table.clone();
    let first = run_at(&maps, &model(vec![service(key, &pool(1, 5))]), 100);
    let middle = first.after.running.service(&key).unwrap().clone();
    let plan = run_at(&maps, &model(vec![service(key, &pool(1, 6))]), 200);
    let after = plan.after.running.service(&key).unwrap();
    let mut twice = 0;
    for (i, (&first, (&b, &c))) in original.iter().zip(middle.table.iter().zip(&after.table)).enumerate() {
        let slot = i as u32;
        match middle.transitions.get(&slot) {
            // A -> B -> C.
            Some(&a) if c != b => {
                assert_eq!(a, first);
                assert_eq!(after.transitions.get(&slot), Some(&a), "slot {i}: {a} -> {b} -> {c}");
                twice += 1;
            }
            // A -> B, left alone.
            Some(&a) => assert_eq!(after.transitions.get(&slot), Some(&a)),
            // Steady B -> C.
            None if c != b => assert_eq!(after.transitions.get(&slot), Some(&b)),
            None => assert_eq!(after.transitions.get(&slot), None),
        }
    }
    assert!(twice > 100, "{twice} slots changed twice");
    assert!(after.transitions.values().all(|&p| p < 4), "only the first four backends are ever previous ones");
    assert_eq!((middle.changed, after.changed, plan.after.config.clock), (100, 200, 200));
    // Only the slots whose word changed were written: those left alone
    // kept their word.
    let written: BTreeSet<u32> = slot_writes(&plan, after.number).iter().map(|w| w.0).collect();
    assert_eq!(written.len(), (0..MAGLEV_SIZE).filter(|&i| middle.table[i] != after.table[i]).count());
}

#[test]
fn draining_puts_the_drained_backend_s_slots_in_transition_from_it() {
    let maps = FakeMaps::new();
    let key = tcp("203.0.113.10", 80);
    let mut backends = pool(1, 4);
    run(&maps, &model(vec![service(key, &backends)]));
    let before = maps.snapshot().running.service(&key).unwrap().clone();
    let drained = before.backends.iter().find(|b| b.backend.addr == ip("10.0.0.3")).unwrap().number;
    backends[2].weight = 0;
    let plan = run_at(&maps, &model(vec![service(key, &backends)]), 500);
    let after = plan.after.running.service(&key).unwrap();
    let its: BTreeSet<u32> = (0..MAGLEV_SIZE as u32).filter(|&i| before.table[i as usize] == drained).collect();
    let from_it: BTreeSet<u32> = after.transitions.iter().filter(|(_, &p)| p == drained).map(|(&i, _)| i).collect();
    assert!(its.len() > MAGLEV_SIZE / 5);
    assert_eq!(from_it, its, "every slot it had, in transition with it as the previous backend");
    assert!(after.table.iter().all(|&n| n != drained), "no new flows");
    for (&i, &previous) in &after.transitions {
        assert_eq!(previous, before.table[i as usize]);
    }
    assert_eq!((after.changed, plan.after.config.clock), (500, 500));
    // The entry stays (weight 0, bookkeeping); its words name it.
    assert_eq!(writes_to(&plan, MapId::Backends), [drained]);
    let slot = *its.first().unwrap();
    assert_eq!(
        maps.tables.borrow()[after.number as usize * MAGLEV_SIZE + slot as usize],
        transition_word(after.table[slot as usize], drained)
    );
}

#[test]
fn an_untracked_service_gets_steady_words_only() {
    let maps = FakeMaps::new();
    let key = udp("203.0.113.10", 53);
    let untracked = |n| Service { track_flows: false, ..service(key, &pool(1, n)) };
    run(&maps, &model(vec![untracked(10)]));
    let before = maps.snapshot().running.service(&key).unwrap().clone();
    let plan = run_at(&maps, &model(vec![untracked(11)]), 100);
    let after = plan.after.running.service(&key).unwrap();
    assert!(after.transitions.is_empty());
    let writes = slot_writes(&plan, after.number);
    let moved: Vec<(u32, u32)> =
        (0..MAGLEV_SIZE).filter(|&i| before.table[i] != after.table[i]).map(|i| (i as u32, after.table[i])).collect();
    assert_eq!(writes, moved, "the new backend numbers, bare");
    assert!(writes.iter().all(|&(_, w)| w < MAX_BACKENDS as u32));
    // Nothing stamped, no clock written.
    assert_eq!((after.changed, plan.after.config.clock), (0, 0));
    assert!(writes_to(&plan, MapId::Config).is_empty(), "{:?}", writes_to(&plan, MapId::Config));
    assert_eq!(
        maps.read(MapId::Services, after.number).unwrap(),
        entry_bytes(TRACKED_V4 & !consts::L4LB_SERVICE_TRACK_FLOWS, 0, 30, 300)
    );
}

#[test]
fn turning_tracking_off_makes_every_slot_steady() {
    let maps = FakeMaps::new();
    let key = tracked_in_transition(&maps);
    let before = maps.snapshot().running.service(&key).unwrap().clone();
    assert!(!before.transitions.is_empty());
    let off = Service { track_flows: false, ..service(key, &pool(1, 11)) };
    let plan = run_at(&maps, &model(vec![off.clone()]), 2000);
    let after = plan.after.running.service(&key).unwrap();
    assert!(after.transitions.is_empty());
    assert_eq!(after.table, before.table, "same backends, same table");
    // The slots in transition, steady on their current backend; then the
    // entry (tracking off, `changed` kept); nothing else, no clock.
    let steady: Vec<(u32, u32)> = before.transitions.keys().map(|&i| (i, before.table[i as usize])).collect();
    assert_eq!(
        plan.steps,
        [
            Step::Slots { service: after.number, writes: steady },
            Step::Write {
                map: MapId::Services,
                key: after.number,
                value: entry_bytes(TRACKED_V4 & !consts::L4LB_SERVICE_TRACK_FLOWS, 1000, 30, 300)
            },
        ]
    );
    assert_eq!((after.changed, plan.after.config.clock), (1000, 1000));
    assert_eq!(plan.diff.changed[0].track_flows, Some((true, false)));
    // Back on: only the entry; the table stays steady.
    let plan = run_at(&maps, &model(vec![service(key, &pool(1, 11))]), 3000);
    assert_eq!(
        plan.steps,
        [Step::Write { map: MapId::Services, key: after.number, value: entry_bytes(TRACKED_V4, 1000, 30, 300) }]
    );
    assert!(plan.after.running.service(&key).unwrap().transitions.is_empty());
}

#[test]
fn a_settings_change_rewrites_only_the_service_entry() {
    let maps = FakeMaps::new();
    let key = tracked_in_transition(&maps);
    let before = maps.snapshot().running.service(&key).unwrap().clone();
    let tuned = Service { idle_timeout: 5, ..service(key, &pool(1, 11)) };
    let plan = run_at(&maps, &model(vec![tuned.clone()]), 2000);
    assert_eq!(
        plan.steps,
        [Step::Write { map: MapId::Services, key: before.number, value: entry_bytes(TRACKED_V4, 1000, 30, 5) }]
    );
    let after = plan.after.running.service(&key).unwrap();
    assert_eq!(
        (&after.table, &after.transitions, after.changed),
        (&before.table, &before.transitions, 1000),
        "slots and their change time stay"
    );
    assert_eq!(plan.diff.to_string(), "~ service 203.0.113.10:80/tcp\n    ~ idle_timeout 300 -> 5\nservices: 0 added, 0 removed, 1 changed; global: 0 changed\n");
    let graced = Service { udp_grace: 0, ..tuned };
    let plan = run_at(&maps, &model(vec![graced]), 2001);
    assert_eq!(
        plan.steps,
        [Step::Write { map: MapId::Services, key: before.number, value: entry_bytes(TRACKED_V4, 1000, 0, 5) }]
    );
}

#[test]
fn an_apply_that_changes_nothing_writes_nothing() {
    let maps = FakeMaps::new();
    let key = tracked_in_transition(&maps);
    let wanted = maps.snapshot().running.model();
    assert!(!maps.snapshot().running.service(&key).unwrap().transitions.is_empty());
    let before = maps.dump();
    let plan = plan(&snapshot_at(&maps, 5000), &wanted, SEED).unwrap();
    assert!(plan.is_empty() && plan.diff.is_empty() && plan.writes() == 0, "{:?}", plan.steps);
    execute(&maps, &plan).unwrap();
    assert!(maps.dump() == before, "no write, the clock included");
    assert_eq!((plan.after.config.clock, plan.after.running.service(&key).unwrap().changed), (1000, 1000));
    assert_eq!(maps.graces.get(), 0);
}
