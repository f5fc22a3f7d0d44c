//! The agent's Prometheus endpoint: `GET /metrics` in the Prometheus text
//! format (0.0.4), built at each scrape from the datapath's counters (read
//! then, through the maps) and the agent's own figures (applies, sweeps,
//! transitions and the flow table as of the last sweep). Nothing else is
//! served, and nothing is taken from the network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::bpf::COUNTER_NAMES;
use crate::health::Target;
use crate::maps::LbMaps;
use crate::stats::Sample;

/// Label pairs of one series.
type Labels = Vec<(String, String)>;

/// Bounds of the apply duration histogram, seconds (1 ms to about 8 s).
const APPLY_SECONDS_BUCKETS: [f64; 14] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0];

/// What the agent counts itself; the endpoint's thread reads it.
#[derive(Debug, Clone)]
pub struct AgentFigures {
    /// Applies by result: `applied`, `unchanged`, `refused` (a bad file),
    /// `failed` (a health change's apply the kernel refused).
    pub applies: [(&'static str, u64); 4],
    /// Seconds of each apply that wrote (shared with every clone).
    pub apply_seconds: Histogram,
    pub generation: u64,
    pub sweeps_ok: u64,
    pub sweeps_failed: u64,
    /// As of the last sweep: slots in transition per service, pins in the
    /// flow table, and the table's size.
    pub slots_in_transition: Vec<(String, u64)>,
    pub flow_table_entries: u64,
    pub flow_table_capacity: u64,
    /// Per probed backend of a service.
    pub health: BTreeMap<Target, HealthFigures>,
}

/// What the probes of one backend of a service found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthFigures {
    pub up: bool,
    pub passed: u64,
    pub failed: u64,
    /// Probes not counted: the balancer's link was down while they ran.
    pub link_down: u64,
    /// Seconds the last passed probe took.
    pub last_seconds: Option<f64>,
}

impl Default for AgentFigures {
    fn default() -> Self {
        AgentFigures {
            applies: [("applied", 0), ("unchanged", 0), ("refused", 0), ("failed", 0)],
            apply_seconds: Histogram::new(APPLY_SECONDS_BUCKETS),
            generation: 0,
            sweeps_ok: 0,
            sweeps_failed: 0,
            slots_in_transition: Vec::new(),
            flow_table_entries: 0,
            flow_table_capacity: 0,
            health: BTreeMap::new(),
        }
    }
}

impl AgentFigures {
    /// Counts one probe of `target` (a backend starts up: see health::Tracker).
    /// `link_down`: the probe was not counted (see probes::Outcome).
    pub fn probe(&mut self, target: &Target, result: &Result<std::time::Duration, String>, link_down: bool) {
        let figures = self.health.entry(*target).or_insert(HealthFigures { up: true, ..HealthFigures::default() });
        match result {
            _ if link_down => figures.link_down += 1,
            Ok(took) => {
                figures.passed += 1;
                figures.last_seconds = Some(took.as_secs_f64());
            }
            Err(_) => figures.failed += 1,
        }
    }

    /// Records that `target` went up or down.
    pub fn backend_state(&mut self, target: &Target, up: bool) {
        self.health.entry(*target).or_default().up = up;
    }

    /// Forgets the backends no longer probed.
    pub fn keep_health_of(&mut self, probed: &[Target]) {
        self.health.retain(|t, _| probed.contains(t));
    }

    /// Counts one apply of `result` (one of the four).
    pub fn count_apply(&mut self, result: &str) {
        for (name, count) in &mut self.applies {
            if *name == result {
                *count += 1;
            }
        }
    }
}

/// The maps the endpoint reads (replaced when the agent adopts another
/// program) and the agent's figures.
#[derive(Clone)]
pub struct Shared {
    pub maps: Arc<Mutex<Arc<LbMaps>>>,
    pub figures: Arc<Mutex<AgentFigures>>,
}

/// Starts serving `GET /metrics` on `addr` in a thread of its own.
pub fn serve(addr: SocketAddr, shared: Shared) -> Result<()> {
    let server = tiny_http::Server::http(addr).map_err(|err| anyhow!("metrics endpoint {addr}: {err}"))?;
    std::thread::Builder::new().name("l4lb-metrics".into()).spawn(move || {
        for request in server.incoming_requests() {
            let (status, body, content_type) = answer(&request, &shared);
            let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header");
            let _ =
                request.respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
        }
    })?;
    Ok(())
}

fn answer(request: &tiny_http::Request, shared: &Shared) -> (u16, String, &'static str) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let path = request.url().split('?').next().unwrap_or("");
    if request.method() != &tiny_http::Method::Get || path != "/metrics" {
        return (404, "l4lb serves GET /metrics only\n".into(), PLAIN);
    }
    let maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sample = match crate::commands::sample(&maps) {
        Ok(sample) => sample,
        Err(err) => return (500, format!("reading l4lb's maps: {err:#}\n"), PLAIN),
    };
    let figures = shared.figures.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match render(&sample, &figures) {
        Ok(text) => (200, text, prometheus_text::CONTENT_TYPE),
        Err(err) => (500, format!("encoding the metrics: {err}\n"), PLAIN),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A family of counters, registered under `name` (`_total` is added).
fn counters(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// The exposition of one scrape (pure: the sample and the figures in, text out).
pub fn render(sample: &Sample, figures: &AgentFigures) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("l4lb");
    traffic(&mut registry, sample);
    datapath_counters(&mut registry, &sample.counters);
    agent(&mut registry, figures);
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Per service and per backend: packets and bytes sent, and weights.
fn traffic(registry: &mut Registry, sample: &Sample) {
    let service_packets = counters(registry, "service_packets", "Packets l4lb sent to a backend of the service");
    let service_bytes = counters(registry, "service_bytes", "Bytes l4lb sent to backends of the service, as received");
    let backend_packets = counters(registry, "backend_packets", "Packets l4lb sent to the backend");
    let backend_bytes = counters(registry, "backend_bytes", "Bytes l4lb sent to the backend, as received");
    let weight = gauges(registry, "backend_weight", "The backend's weight in the configuration (0: draining)");
    for service in &sample.services {
        let name = service.key.to_string();
        let of_service = labels(&[("service", &name)]);
        service_packets.get_or_create(&of_service).inc_by(service.counts.packets);
        service_bytes.get_or_create(&of_service).inc_by(service.counts.bytes);
        for backend in &service.backends {
            let addr = backend.backend.addr.to_string();
            let of_backend = labels(&[("service", &name), ("backend", &addr)]);
            backend_packets.get_or_create(&of_backend).inc_by(backend.counts.packets);
            backend_bytes.get_or_create(&of_backend).inc_by(backend.counts.bytes);
            weight.get_or_create(&of_backend).set(i64::from(backend.backend.weight));
        }
    }
}

/// The datapath's global counters, by what they count.
fn datapath_counters(registry: &mut Registry, values: &[u64]) {
    let received = counters(registry, "received_packets", "Packets the l4lb program saw");
    let forwarded = counters(registry, "forwarded_packets", "Packets encapsulated and sent to a backend (XDP_TX)");
    let too_big = counters(registry, "too_big_answers", "ICMP too-big answers sent for packets over the MTU");
    let passed = counters(registry, "passed_packets", "Packets left to the kernel's stack, by reason");
    let dropped = counters(registry, "dropped_packets", "Packets dropped, by reason");
    let flows = counters(registry, "flow_table_events", "Changes of the flow table by the datapath, by event");
    for (name, &value) in COUNTER_NAMES.iter().zip(values) {
        let family_and_labels = match *name {
            "rx" => (&received, labels(&[])),
            "tx" => (&forwarded, labels(&[])),
            "tx_too_big" => (&too_big, labels(&[])),
            "pass" => (&passed, labels(&[("reason", "not_balanced")])),
            "pass_no_service" => (&passed, labels(&[("reason", "no_service")])),
            other => match (other.strip_prefix("drop_"), other.strip_prefix("flow_")) {
                (Some(reason), _) => (&dropped, labels(&[("reason", reason)])),
                (_, Some(event)) => (&flows, labels(&[("event", event)])),
                _ => continue,
            },
        };
        family_and_labels.0.get_or_create(&family_and_labels.1).inc_by(value);
    }
}

/// The agent's own figures.
fn agent(registry: &mut Registry, figures: &AgentFigures) {
    let applies = counters(registry, "applies", "Applies of the configuration file by the agent, by result");
    for (result, count) in figures.applies {
        applies.get_or_create(&labels(&[("result", result)])).inc_by(count);
    }
    registry.register(
        "apply_duration_seconds",
        "Seconds an apply that wrote took (plan and map writes)",
        figures.apply_seconds.clone(),
    );
    let generation = Gauge::<i64>::default();
    generation.set(figures.generation as i64);
    registry.register("config_generation", "Applies that changed the datapath since the agent started", generation);
    let sweeps = counters(registry, "sweeps", "Rounds of the sweep that ends transitions, by result");
    sweeps.get_or_create(&labels(&[("result", "ok")])).inc_by(figures.sweeps_ok);
    sweeps.get_or_create(&labels(&[("result", "failed")])).inc_by(figures.sweeps_failed);
    let in_transition = gauges(registry, "slots_in_transition", "Table slots in transition, as of the last sweep");
    for (service, slots) in &figures.slots_in_transition {
        in_transition.get_or_create(&labels(&[("service", service)])).set(*slots as i64);
    }
    health(registry, &figures.health);
    for (name, help, value) in [
        ("flow_table_entries", "Pins in the flow table, as of the last sweep", figures.flow_table_entries),
        ("flow_table_capacity", "Entries the flow table holds at most", figures.flow_table_capacity),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(value as i64);
        registry.register(name, help, gauge);
    }
}

/// Per probed backend: up or down, probes by result, the last probe's latency.
fn health(registry: &mut Registry, health: &BTreeMap<Target, HealthFigures>) {
    let up = gauges(registry, "backend_up", "1 if the backend passes its service's health check, 0 if it is down");
    let probes = counters(registry, "health_probes", "Health probes of the backend, by result");
    let latency = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    registry.register(
        "health_probe_duration_seconds",
        "Seconds the backend's last passed health probe took (connect, and the HTTP answer)",
        latency.clone(),
    );
    for (target, figures) in health {
        let (service, backend) = (target.service.to_string(), target.backend.to_string());
        let of_backend = labels(&[("service", &service), ("backend", &backend)]);
        up.get_or_create(&of_backend).set(i64::from(figures.up));
        for (result, count) in
            [("passed", figures.passed), ("failed", figures.failed), ("link_down", figures.link_down)]
        {
            probes
                .get_or_create(&labels(&[("service", &service), ("backend", &backend), ("result", result)]))
                .inc_by(count);
        }
        if let Some(seconds) = figures.last_seconds {
            latency.get_or_create(&of_backend).set(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Protocol, ServiceKey};
    use crate::stats::{BackendSample, Counts, ServiceSample};

    fn sample() -> Sample {
        let key = ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 };
        let backend = |addr: &str, weight, packets| BackendSample {
            number: 0,
            backend: Backend { addr: addr.parse().unwrap(), mac: None, weight },
            counts: Counts { packets, bytes: packets * 60 },
        };
        let mut counters = vec![0u64; COUNTER_NAMES.len()];
        let at = |name: &str| COUNTER_NAMES.iter().position(|n| *n == name).unwrap();
        counters[at("rx")] = 12;
        counters[at("tx")] = 10;
        counters[at("pass_no_service")] = 2;
        counters[at("drop_bad_csum")] = 3;
        Sample {
            services: vec![ServiceSample {
                number: 0,
                key,
                counts: Counts { packets: 10, bytes: 600 },
                backends: vec![backend("198.18.0.101", 1, 4), backend("2001:db8::1", 0, 6)],
            }],
            counters,
        }
    }

    #[test]
    fn the_exposition_names_series_by_prometheus_conventions() {
        let mut figures = AgentFigures::default();
        figures.count_apply("applied");
        figures.count_apply("refused");
        figures.generation = 1;
        figures.apply_seconds.observe(0.003);
        figures.slots_in_transition = vec![("203.0.113.10:80/tcp".into(), 7)];
        figures.flow_table_capacity = 262144;
        let key = ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 };
        let target = Target { service: key, backend: "198.18.0.101".parse().unwrap() };
        figures.probe(&target, &Ok(std::time::Duration::from_millis(3)), false);
        figures.probe(&target, &Err("connect: refused".into()), false);
        figures.probe(&target, &Err("connect: no answer within 0.5 s".into()), true);
        figures.backend_state(&target, false);
        let text = render(&sample(), &figures).unwrap();
        for line in [
            "# TYPE l4lb_service_packets_total counter",
            "l4lb_service_packets_total{service=\"203.0.113.10:80/tcp\"} 10",
            "l4lb_backend_packets_total{service=\"203.0.113.10:80/tcp\",backend=\"2001:db8::1\"} 6",
            "l4lb_backend_bytes_total{service=\"203.0.113.10:80/tcp\",backend=\"198.18.0.101\"} 240",
            "l4lb_backend_weight{service=\"203.0.113.10:80/tcp\",backend=\"2001:db8::1\"} 0",
            "l4lb_received_packets_total 12",
            "l4lb_forwarded_packets_total 10",
            "l4lb_passed_packets_total{reason=\"no_service\"} 2",
            "l4lb_dropped_packets_total{reason=\"bad_csum\"} 3",
            "l4lb_dropped_packets_total{reason=\"no_backend\"} 0",
            "l4lb_flow_table_events_total{event=\"table_full\"} 0",
            "l4lb_applies_total{result=\"refused\"} 1",
            "l4lb_apply_duration_seconds_bucket{le=\"0.005\"} 1",
            "l4lb_apply_duration_seconds_count 1",
            "l4lb_config_generation 1",
            "l4lb_slots_in_transition{service=\"203.0.113.10:80/tcp\"} 7",
            "l4lb_flow_table_capacity 262144",
            "l4lb_backend_up{service=\"203.0.113.10:80/tcp\",backend=\"198.18.0.101\"} 0",
            "l4lb_health_probes_total{service=\"203.0.113.10:80/tcp\",backend=\"198.18.0.101\",result=\"failed\"} 1",
            "l4lb_health_probes_total{service=\"203.0.113.10:80/tcp\",backend=\"198.18.0.101\",result=\"link_down\"} 1",
            "l4lb_health_probe_duration_seconds{service=\"203.0.113.10:80/tcp\",backend=\"198.18.0.101\"} 0.003",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "Prometheus text format, not OpenMetrics");
    }
}
