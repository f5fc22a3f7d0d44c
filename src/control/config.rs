//! Declarative configuration (`l4lb apply -c lb.toml`, `l4lb config`): the
//! TOML file, its validation, the canonical model the datapath is programmed
//! from, the diff between the running and the wanted model, and the model
//! rendered back as TOML. Pure code, no syscalls: the whole file is checked
//! before anything touches the kernel, and every error names `FILE:LINE` of
//! the offending value (semantic errors too, not only TOML syntax).
//!
//! # Format
//!
//! ```toml
//! [global]
//! source_v4 = "198.18.0.2"          # outer source of packets to IPv4 backends
//! source_v6 = "2001:db8::2"         # outer source of packets to IPv6 backends
//! gateway_mac = "02:00:00:00:00:01" # next hop of backends without their own MAC
//! hash_seed = 0x1234abcd            # optional: absent = keep the running seed
//!                                   # (random on the first apply)
//! mtu = 1500                        # optional: largest packet once encapsulated;
//!                                   # absent = keep the running one (attach: the device's)
//!
//! [[service]]
//! vip = "203.0.113.10"              # IPv4 or IPv6 address
//! protocol = "tcp"                  # tcp | udp
//! port = 80                         # 1..=65535, or 0 = every port of the address
//! health = { check = "http", path = "/healthz" }  # optional: `l4lb serve` probes each backend
//! backends = [
//!   { address = "198.18.0.101", mac = "02:00:c6:12:00:65", weight = 1 },
//!   { address = "198.18.0.102", weight = 2 },       # via gateway_mac
//!   { address = "2001:db8::103", weight = 0 },      # IPv4-in-IPv6, draining
//! ]
//!
//! [[service]]
//! vip = "2001:db8::10"
//! protocol = "udp"
//! port = 53
//! hash_ports = false                # UDP: hash addresses only (default true)
//! track_flows = false               # no connection tracking (default true)
//! idle_timeout = 300                # seconds a connection may stay silent through a change
//! udp_grace = 30                    # seconds after a change unknown UDP flows count as old
//! backends = [ { address = "2001:db8::101" } ]      # weight 1 by default
//!
//! [service.health]                  # the same as health = { ... } above,
//! check = "tcp"                     # here for the UDP service: probes are
//! port = 53                         # TCP connections, so it names the port
//!
//! [[service]]
//! vip = "*"                         # the catch-all service: the seed's mode,
//! protocol = "any"                  # every TCP and UDP packet that no other
//! port = 0                          # service takes (protocol/port optional)
//! backends = [ { address = "198.18.0.201", mac = "02:00:c6:12:00:c9" } ]
//! ```
//!
//! Keys:
//!
//! * `[global]`: `source_v4`, `source_v6` (unicast addresses of their family;
//!   each is required as soon as one backend of that family exists),
//!   `gateway_mac` (unicast; required as soon as one backend has no `mac`),
//!   `hash_seed` (0..=0xffffffff, optional), `mtu` (optional: the largest
//!   L3 packet the balancer sends, outer header included; larger ones get an
//!   ICMP fragmentation-needed / packet-too-big answer or are dropped;
//!   [`MIN_MTU`]..=[`MAX_MTU`], and at least [`MIN_MTU_IPV6_BACKENDS`] as
//!   soon as one backend is IPv6; absent = keep the running MTU, which
//!   `l4lb attach` sets to the device's or to `--mtu`).
//! * `[[service]]`: `vip` (required), `protocol` (`tcp` or `udp`, required;
//!   `any` and only `any` for the catch-all, where it may be left out), `port`
//!   (0..=65535, required; 0 = every port; the catch-all takes only 0, may be
//!   left out), `hash_ports` (default true; `false` is for UDP services and
//!   the catch-all's UDP traffic: a TCP service always hashes ports),
//!   `track_flows` (default true: a table change puts the slots whose
//!   backend changed in transition, where connections from before the change
//!   keep their backend, so that backend and weight changes move only the
//!   flows of backends that leave; `false`: every packet follows the Maglev
//!   table; docs/transitions.md), `idle_timeout` (seconds, 1..=86400,
//!   default 300: how long a connection may stay silent through a change
//!   and keep its backend; `l4lb settle` ends a transition once its
//!   connections have been idle that long), `udp_grace` (seconds,
//!   0..=86400, default 30: after a change, UDP flows a slot in transition
//!   has not seen yet count as flows from before the change for this long),
//!   `health` (optional, below), `backends` (at least one).
//! * `health`, an inline table or a `[service.health]` table after its
//!   service; `l4lb serve` probes each backend of the service and takes
//!   those found down out of its table (`health`): `check` (required:
//!   `tcp`, a TCP connection is established; `http`, `GET path` answers
//!   with `status`; `none`, no check, the other keys ignored), `port`
//!   (1..=65535, default the service's; required for a UDP service, the
//!   probe being TCP, and for one of port 0), `path` (`http` only; starts
//!   with `/`, printable ASCII without spaces; default `/`), `status`
//!   (`http` only, 100..=599, default 200), `interval` (seconds, decimals
//!   allowed, to the millisecond; 0.1..=3600, default 2), `timeout`
//!   (seconds, more than 0 and less than `interval`; default 1, or half the
//!   interval when that is 1 or less), `rise` (passed probes in a row for a
//!   down backend to come back, 1..=100, default 2), `fall` (failed probes
//!   in a row for an up backend to go down, 1..=100, default 3). The
//!   catch-all may not have one (probes go to a service's VIP and port).
//! * backend: `address` (required), `mac` (optional), `weight` (integer
//!   0..=[`MAX_WEIGHT`], default 1; 0 drains: no new flows; its connections
//!   stay until idle while `track_flows` is on).
//!
//! A service is known by (vip, protocol, port): each must be unique, and
//! within a service each backend address must be unique. The same backend
//! may serve several services. An IPv4 VIP may have IPv4 and IPv6 backends
//! (IPv4-in-IPv6); an IPv6 VIP only IPv6 backends (IPv6-in-IPv4 is not
//! supported). The catch-all may not mix IPv4 and IPv6 backends: with IPv6
//! backends it takes IPv4 and IPv6 clients (IPv4-in-IPv6), with IPv4
//! backends only IPv4 clients (IPv6 packets go to the stack).
//! Unknown keys and wrong types are errors. Addresses may not be
//! unspecified, loopback, multicast, broadcast or IPv4-mapped IPv6.
//!
//! A file with `[global]` and no `[[service]]` is valid: applied, it removes
//! every service. A file with neither (empty, or only comments) is refused.
//!
//! # Limits
//!
//! [`MAX_SERVICES`] services (64: each costs a Maglev table of 200 KiB, see
//! `maglev`), [`MAX_BACKENDS_PER_SERVICE`] backends per service (512, the
//! Maglev table's limit) and [`MAX_TOTAL_BACKENDS`] backend entries over all
//! services (32768 = 64 x 512, so any file within the first two limits is
//! within this one; a backend in two services counts twice).
//!
//! # Canonical model
//!
//! [`Model`] holds parsed values only: services sorted by [`ServiceKey`]
//! (catch-all first, then by address, IPv4 before IPv6, protocol, port),
//! backends sorted by address, MACs as bytes. Two files that say the same
//! thing give equal models; [`to_toml`] renders a model so that
//! `parse(to_toml(m)) == m`, which is what `l4lb config` prints. Health
//! checks are in [`Model::health`], not in [`Service`]: the datapath does
//! not hold them, and [`diff`] (what the maps need) ignores them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::addr::{check_unicast, parse_unicast_mac, MacError};
use crate::health::{
    Check, CheckKind, FALL_DEFAULT, INTERVAL_DEFAULT, MAX_INTERVAL, MAX_RISE_FALL, MIN_INTERVAL, PATH_DEFAULT,
    RISE_DEFAULT, STATUS_DEFAULT, TIMEOUT_DEFAULT,
};
pub use crate::maglev::MAX_BACKENDS_PER_SERVICE;

/// Services per configuration.
pub const MAX_SERVICES: usize = 64;
/// Backend entries over all services (a backend in two services counts twice).
pub const MAX_TOTAL_BACKENDS: usize = 32768;
// Every service may have its 512 backends: the total needs no check of its own.
const _: () = assert!(MAX_TOTAL_BACKENDS == MAX_SERVICES * MAX_BACKENDS_PER_SERVICE);
/// The largest backend weight.
pub const MAX_WEIGHT: u32 = 65535;
/// Files larger than this are refused before reading: a configuration at
/// every limit (64 services of 512 backends, one per line) is about 1.2 MB.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A backend's weight when the file gives none.
pub const DEFAULT_WEIGHT: u32 = 1;

/// The smallest MTU (L4LB_MIN_MTU): the IPv4 datagram every host takes
/// (RFC 791), which also holds the datapath's ICMP answers.
pub const MIN_MTU: u32 = crate::bpf::consts::L4LB_MIN_MTU;
/// The smallest MTU with IPv6 backends: L4LB_MIN_MTU6 + L4LB_IP6_OVERHEAD,
/// so that a packet-too-big answer (advertising the MTU less the 40-byte
/// outer IPv6 header) never advertises less than the IPv6 minimum link MTU
/// of 1280 (RFC 8200).
pub const MIN_MTU_IPV6_BACKENDS: u32 = crate::bpf::consts::L4LB_MIN_MTU6 + crate::bpf::consts::L4LB_IP6_OVERHEAD;
/// The largest MTU: the largest IPv4 packet (its length field has 16 bits).
pub const MAX_MTU: u32 = 65535;

/// Why `mtu` is refused, if it is: `what` names the value (`mtu`, `--mtu`),
/// `ipv6_backend` is one of the configuration's IPv6 backends, if any, and
/// how to find it (`2001:db8::101 on line 12`).
pub fn mtu_problem(what: &str, mtu: i64, ipv6_backend: Option<&str>) -> Option<String> {
    if mtu < i64::from(MIN_MTU) {
        return Some(format!(
            "{what} {mtu} is below L4LB_MIN_MTU = {MIN_MTU} (the IPv4 datagram every host accepts, RFC 791; the balancer's ICMP answers need it)"
        ));
    }
    if mtu > i64::from(MAX_MTU) {
        return Some(format!("{what} {mtu} is above {MAX_MTU} (the largest IPv4 packet)"));
    }
    match ipv6_backend {
        Some(backend) if mtu < i64::from(MIN_MTU_IPV6_BACKENDS) => Some(format!(
            "{what} {mtu} is below {MIN_MTU_IPV6_BACKENDS} = L4LB_MIN_MTU6 + L4LB_IP6_OVERHEAD (1280 + 40), the least with IPv6 backends \
             (here {backend}): a packet-too-big answer advertises the MTU less the 40-byte outer IPv6 header, and may not advertise \
             less than the IPv6 minimum link MTU of 1280 (RFC 8200)"
        )),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The model

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What a service answers for. The derived order is the canonical one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKey {
    /// `vip = "*"`: every TCP and UDP packet no other service takes.
    CatchAll,
    /// (address, protocol, port); port 0 = every port of the address.
    Vip { addr: IpAddr, protocol: Protocol, port: u16 },
}

impl fmt::Display for ServiceKey {
    /// `203.0.113.10:80/tcp`, `[2001:db8::10]:*/udp` (port 0), `*` (catch-all).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ServiceKey::CatchAll => f.write_str("*"),
            ServiceKey::Vip { addr, protocol, port } => {
                match addr {
                    IpAddr::V4(a) => write!(f, "{a}")?,
                    IpAddr::V6(a) => write!(f, "[{a}]")?,
                }
                if port == 0 {
                    write!(f, ":*/{}", protocol.name())
                } else {
                    write!(f, ":{port}/{}", protocol.name())
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    /// Next hop; None = the global gateway MAC.
    pub mac: Option<[u8; 6]>,
    /// 0..=MAX_WEIGHT; 0 = draining.
    pub weight: u32,
}

impl fmt::Display for Backend {
    /// `198.18.0.101 mac 02:00:c6:12:00:65 weight 1`, `... mac gateway ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mac {} weight {}", self.addr, OptMac(self.mac), self.weight)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    /// Whether UDP flows hash their ports (always true for TCP services).
    pub hash_ports: bool,
    /// Whether flows are pinned to their first backend (connection
    /// tracking, L4LB_SERVICE_TRACK_FLOWS), so that table changes do not
    /// move established flows.
    pub track_flows: bool,
    /// Seconds a connection may stay silent through a table change and keep
    /// its backend (docs/transitions.md).
    pub idle_timeout: u32,
    /// Seconds after a change during which a UDP flow without a pin counts
    /// as one from before the change.
    pub udp_grace: u32,
    /// Sorted by address, addresses unique, at least one.
    pub backends: Vec<Backend>,
}

/// Default `idle_timeout` (seconds).
pub const IDLE_TIMEOUT_DEFAULT: u32 = crate::bpf::consts::L4LB_IDLE_TIMEOUT_DEFAULT;
/// Default `udp_grace` (seconds).
pub const UDP_GRACE_DEFAULT: u32 = crate::bpf::consts::L4LB_UDP_GRACE_DEFAULT;
/// Largest `idle_timeout` and `udp_grace`: a day.
pub const MAX_TRANSITION_SECONDS: u32 = 86_400;

impl Service {
    /// A service with the default settings.
    pub fn new(key: ServiceKey, backends: Vec<Backend>) -> Self {
        Service {
            key,
            hash_ports: true,
            track_flows: true,
            idle_timeout: IDLE_TIMEOUT_DEFAULT,
            udp_grace: UDP_GRACE_DEFAULT,
            backends,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Global {
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    pub gateway_mac: Option<[u8; 6]>,
    /// None = keep the running seed (random on the first apply).
    pub hash_seed: Option<u32>,
    /// Largest L3 packet once encapsulated (l4lb_config.mtu). None = keep
    /// the running one; read back from the maps, None = no limit (0).
    pub mtu: Option<u32>,
}

/// A validated configuration in canonical form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub global: Global,
    /// Sorted by key, keys unique.
    pub services: Vec<Service>,
    /// The health check of each service that has one. Apart from
    /// `services`: the datapath does not hold it, so the running state
    /// (compared with `Service`) has none, and [`diff`] ignores it.
    pub health: BTreeMap<ServiceKey, Check>,
}

impl Model {
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.binary_search_by(|s| s.key.cmp(key)).ok().map(|i| &self.services[i])
    }

    pub fn total_backends(&self) -> usize {
        self.services.iter().map(|s| s.backends.len()).sum()
    }
}

/// Lower-case `02:00:c6:12:00:65`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, g] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
}

struct OptMac(Option<[u8; 6]>);

impl fmt::Display for OptMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(mac) => f.write_str(&format_mac(mac)),
            None => f.write_str("gateway"),
        }
    }
}

// ---------------------------------------------------------------------------
// The file as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    global: Option<RawGlobal>,
    #[serde(default, rename = "service")]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    source_v4: Option<Spanned<String>>,
    source_v6: Option<Spanned<String>>,
    gateway_mac: Option<Spanned<String>>,
    hash_seed: Option<Spanned<i64>>,
    mtu: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    vip: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    hash_ports: Option<Spanned<bool>>,
    track_flows: Option<Spanned<bool>>,
    idle_timeout: Option<Spanned<i64>>,
    udp_grace: Option<Spanned<i64>>,
    health: Option<Spanned<RawHealth>>,
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
    // Seconds, integer or decimal (serde reads an integer as a float).
    interval: Option<Spanned<f64>>,
    timeout: Option<Spanned<f64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    mac: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

// ---------------------------------------------------------------------------
// Reading and validation

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Model> {
    parse(&path.display().to_string(), &read(path)?)
}

/// A configuration file's bytes (at most MAX_FILE_BYTES), for `parse`.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    crate::input_file::read_limited(path, MAX_FILE_BYTES, "configuration file")
}

/// Parses and validates a configuration; `origin` names the file in errors.
pub fn parse(origin: &str, bytes: &[u8]) -> Result<Model> {
    let line_of = |offset: usize| bytes[..offset.min(bytes.len())].iter().filter(|&&b| b == b'\n').count() + 1;
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        bail!("{origin}:{}: not text (NUL byte)", line_of(nul));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| anyhow!("{origin}:{}: not text (invalid UTF-8)", line_of(e.valid_up_to())))?;
    let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => anyhow!("{origin}:{}: {}", line_of(span.start), toml_message(&e)),
        None => anyhow!("{origin}: {}", toml_message(&e)),
    })?;
    if raw.global.is_none() && raw.services.is_empty() {
        bail!("{origin}: no configuration (expected a [global] table and [[service]] tables)");
    }
    let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    Validator { origin, line_starts, first_ipv6_backend: std::cell::Cell::new(None) }.model(raw)
}

/// toml's message, with serde's type names said for people.
fn toml_message(e: &toml::de::Error) -> String {
    let mut message = e
        .message()
        .trim_end()
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number");
    // serde names the structs a table deserialises into: say "a table".
    for raw in ["RawGlobal", "RawService", "RawBackend", "RawHealth"] {
        message = message.replace(&format!("expected struct {raw}"), "expected a table");
    }
    message
}

struct Validator<'a> {
    origin: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    /// The first IPv6 backend and its line (for the MTU rule).
    first_ipv6_backend: std::cell::Cell<Option<(IpAddr, usize)>>,
}

impl Validator<'_> {
    /// The 1-based line where `span` starts.
    fn line(&self, span: &Range<usize>) -> usize {
        self.line_starts.partition_point(|&start| start <= span.start)
    }

    /// `FILE:LINE: what`, LINE being where `span` starts.
    fn at(&self, span: &Range<usize>, what: impl fmt::Display) -> anyhow::Error {
        anyhow!("{}:{}: {what}", self.origin, self.line(span))
    }

    fn model(&self, raw: RawFile) -> Result<Model> {
        let mtu_span = raw.global.as_ref().and_then(|g| g.mtu.as_ref()).map(|m| (*m.get_ref(), m.span()));
        let global = match raw.global {
            Some(g) => self.global(g)?,
            None => Global::default(),
        };
        let mut services: Vec<Service> = Vec::new();
        let mut health = BTreeMap::new();
        // Where each key and backend was first given, for duplicate errors.
        let mut seen: HashMap<ServiceKey, usize> = HashMap::new();
        let mut total = 0usize;
        for (index, spanned) in raw.services.iter().enumerate() {
            let span = spanned.span();
            if index == MAX_SERVICES {
                return Err(
                    self.at(&span, format!("{} services: at most MAX_SERVICES = {MAX_SERVICES}", raw.services.len()))
                );
            }
            let service = self.service(spanned.get_ref(), &span, &global, &mut seen, &mut total)?;
            if let Some(check) = self.health(spanned.get_ref(), &service.key)? {
                health.insert(service.key, check);
            }
            services.push(service);
        }
        services.sort_by_key(|s| s.key);
        if let (Some((mtu, span)), Some((backend, line))) = (mtu_span, self.first_ipv6_backend.get()) {
            if let Some(problem) = mtu_problem("mtu", mtu, Some(&format!("{backend} on line {line}"))) {
                return Err(self.at(&span, problem));
            }
        }
        Ok(Model { global, services, health })
    }

    fn global(&self, raw: RawGlobal) -> Result<Global> {
        let source_v4 = match raw.source_v4 {
            Some(s) => Some(match self.address(&s, "source_v4")? {
                IpAddr::V4(a) => a,
                IpAddr::V6(a) => return Err(self.at(&s.span(), format!("source_v4 {a} is not an IPv4 address"))),
            }),
            None => None,
        };
        let source_v6 = match raw.source_v6 {
            Some(s) => Some(match self.address(&s, "source_v6")? {
                IpAddr::V6(a) => a,
                IpAddr::V4(a) => return Err(self.at(&s.span(), format!("source_v6 {a} is not an IPv6 address"))),
            }),
            None => None,
        };
        let gateway_mac = raw.gateway_mac.map(|m| self.mac(&m, "gateway_mac")).transpose()?;
        let hash_seed = match raw.hash_seed {
            Some(s) => Some(u32::try_from(*s.get_ref()).map_err(|_| {
                self.at(&s.span(), format!("hash_seed {} is out of range (0 to 0xffffffff)", s.get_ref()))
            })?),
            None => None,
        };
        let mtu = match raw.mtu {
            Some(m) => match mtu_problem("mtu", *m.get_ref(), None) {
                Some(problem) => return Err(self.at(&m.span(), problem)),
                None => Some(*m.get_ref() as u32),
            },
            None => None,
        };
        Ok(Global { source_v4, source_v6, gateway_mac, hash_seed, mtu })
    }

    /// A unicast address of either family; `what` names it in errors.
    fn address(&self, text: &Spanned<String>, what: &str) -> Result<IpAddr> {
        let span = text.span();
        let addr: IpAddr = text
            .get_ref()
            .parse()
            .map_err(|_| self.at(&span, format!("{what} `{}` is not an IPv4 or IPv6 address", text.get_ref())))?;
        check_unicast(addr).map_err(|why| self.at(&span, format!("{what} {addr} {why}")))?;
        Ok(addr)
    }

    fn mac(&self, text: &Spanned<String>, what: &str) -> Result<[u8; 6]> {
        let span = text.span();
        parse_unicast_mac(text.get_ref()).map_err(|err| match err {
            MacError::Unreadable => self.at(
                &span,
                format!(
                    "{what} `{}` is not a MAC address (expected six hex pairs like 02:00:c6:12:00:65)",
                    text.get_ref()
                ),
            ),
            MacError::NotUnicast(mac) => {
                self.at(&span, format!("{what} {} is not a unicast MAC address", format_mac(mac.into_array())))
            }
        })
    }

    fn key(&self, raw: &RawService, span: &Range<usize>) -> Result<ServiceKey> {
        let vip = raw
            .vip
            .as_ref()
            .ok_or_else(|| self.at(span, "service has no vip (an address, or \"*\" for the catch-all)"))?;
        if vip.get_ref() == "*" {
            if let Some(p) = &raw.protocol {
                if p.get_ref() != "any" {
                    return Err(self.at(
                        &p.span(),
                        format!("the catch-all service (vip = \"*\") takes TCP and UDP: protocol must be \"any\" (or left out), not `{}`", p.get_ref()),
                    ));
                }
            }
            if let Some(p) = &raw.port {
                if *p.get_ref() != 0 {
                    return Err(self.at(
                        &p.span(),
                        format!("the catch-all service (vip = \"*\") takes every port: port must be 0 (or left out), not {}", p.get_ref()),
                    ));
                }
            }
            return Ok(ServiceKey::CatchAll);
        }
        let addr = self.address(vip, "vip")?;
        let protocol = match &raw.protocol {
            None => return Err(self.at(span, format!("service {addr} has no protocol (\"tcp\" or \"udp\")"))),
            Some(p) => match p.get_ref().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "any" => {
                    return Err(self.at(
                        &p.span(),
                        "protocol \"any\" is only for the catch-all service (vip = \"*\"): use \"tcp\" or \"udp\"",
                    ))
                }
                other => return Err(self.at(&p.span(), format!("protocol `{other}` is not \"tcp\" or \"udp\""))),
            },
        };
        let port = match &raw.port {
            None => return Err(self.at(span, format!("service {addr} has no port (1 to 65535, or 0 for every port)"))),
            Some(p) => u16::try_from(*p.get_ref()).map_err(|_| {
                self.at(&p.span(), format!("port {} is out of range (0 to 65535; 0 = every port)", p.get_ref()))
            })?,
        };
        Ok(ServiceKey::Vip { addr, protocol, port })
    }

    fn service(
        &self,
        raw: &RawService,
        span: &Range<usize>,
        global: &Global,
        seen: &mut HashMap<ServiceKey, usize>,
        total: &mut usize,
    ) -> Result<Service> {
        let key = self.key(raw, span)?;
        let key_span = raw.vip.as_ref().map(Spanned::span).unwrap_or_else(|| span.clone());
        if let Some(first) = seen.insert(key, self.line(&key_span)) {
            return Err(self.at(&key_span, format!("service {key} is already defined on line {first}")));
        }
        let (hash_ports, track_flows, idle_timeout, udp_grace) = self.service_settings(raw, &key)?;
        let backends = self.service_backends(raw, span, &key, global, total)?;
        Ok(Service { key, hash_ports, track_flows, idle_timeout, udp_grace, backends })
    }

    /// A service's settings: hash_ports, track_flows, idle_timeout, udp_grace.
    fn service_settings(&self, raw: &RawService, key: &ServiceKey) -> Result<(bool, bool, u32, u32)> {
        let key = *key;
        let hash_ports = match &raw.hash_ports {
            None => true,
            Some(h) => {
                let tcp = matches!(key, ServiceKey::Vip { protocol: Protocol::Tcp, .. });
                if tcp && !*h.get_ref() {
                    return Err(self.at(&h.span(), format!("service {key}: hash_ports = false is for UDP services only (TCP flows always hash their ports)")));
                }
                *h.get_ref()
            }
        };
        let track_flows = raw.track_flows.as_ref().is_none_or(|t| *t.get_ref());
        let seconds = |value: &Option<Spanned<i64>>, name: &str, min: i64, default: u32| -> Result<u32> {
            match value {
                None => Ok(default),
                Some(v) if (min..=i64::from(MAX_TRANSITION_SECONDS)).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
                Some(v) => Err(self.at(
                    &v.span(),
                    format!(
                        "service {key}: {name} = {} is out of range ({min}..={MAX_TRANSITION_SECONDS} seconds)",
                        v.get_ref()
                    ),
                )),
            }
        };
        let idle_timeout = seconds(&raw.idle_timeout, "idle_timeout", 1, IDLE_TIMEOUT_DEFAULT)?;
        let udp_grace = seconds(&raw.udp_grace, "udp_grace", 0, UDP_GRACE_DEFAULT)?;
        Ok((hash_ports, track_flows, idle_timeout, udp_grace))
    }

    /// A service's health check, if it has one (`check = "none"` is none,
    /// whatever else the table says, so that a check can be turned off and
    /// kept in the file).
    fn health(&self, raw: &RawService, key: &ServiceKey) -> Result<Option<Check>> {
        let Some(spanned) = &raw.health else { return Ok(None) };
        let (h, span) = (spanned.get_ref(), spanned.span());
        let key = *key;
        let check = h.check.as_ref().ok_or_else(|| {
            self.at(&span, format!("service {key}: health has no check (\"tcp\", \"http\" or \"none\")"))
        })?;
        let http = match check.get_ref().as_str() {
            "none" => return Ok(None),
            "tcp" => false,
            "http" => true,
            other => {
                return Err(self.at(
                    &check.span(),
                    format!("service {key}: health check `{other}` is not \"tcp\", \"http\" or \"none\""),
                ))
            }
        };
        let ServiceKey::Vip { protocol, port: service_port, .. } = key else {
            return Err(self.at(
                &span,
                "the catch-all service (vip = \"*\") cannot have a health check: probes go to a service's VIP and port, and it has neither",
            ));
        };
        let port = match &h.port {
            Some(p) => u16::try_from(*p.get_ref()).ok().filter(|&p| p != 0).ok_or_else(|| {
                self.at(&p.span(), format!("service {key}: health port = {} is out of range (1..=65535)", p.get_ref()))
            })?,
            None if protocol == Protocol::Udp => {
                return Err(self.at(
                    &span,
                    format!(
                        "service {key}: health needs a port (the probe is a TCP connection and the service is UDP)"
                    ),
                ))
            }
            None if service_port == 0 => {
                return Err(self.at(&span, format!("service {key}: health needs a port (the service takes every port)")))
            }
            None => service_port,
        };
        let http_only = |name: &str, given: Option<Range<usize>>| match given {
            Some(at) if !http => {
                Err(self.at(&at, format!("service {key}: health {name} is for check = \"http\" only")))
            }
            _ => Ok(()),
        };
        http_only("path", h.path.as_ref().map(Spanned::span))?;
        http_only("status", h.status.as_ref().map(Spanned::span))?;
        let kind = if http {
            let path = match &h.path {
                None => PATH_DEFAULT.to_string(),
                Some(p) if p.get_ref().starts_with('/') && p.get_ref().bytes().all(|b| b.is_ascii_graphic()) => {
                    p.get_ref().clone()
                }
                Some(p) => {
                    let path = p.get_ref();
                    let what =
                        format!("health path {path:?} must start with \"/\" and be printable ASCII without spaces");
                    return Err(self.at(&p.span(), format!("service {key}: {what}")));
                }
            };
            let status = match &h.status {
                None => STATUS_DEFAULT,
                Some(s) => u16::try_from(*s.get_ref()).ok().filter(|s| (100..=599).contains(s)).ok_or_else(|| {
                    self.at(
                        &s.span(),
                        format!("service {key}: health status = {} is out of range (100..=599)", s.get_ref()),
                    )
                })?,
            };
            CheckKind::Http { path, status }
        } else {
            CheckKind::Tcp
        };
        let (interval, timeout, rise, fall) = self.health_timing(h, &key)?;
        Ok(Some(Check { kind, port, interval, timeout, rise, fall }))
    }

    /// A health check's interval, timeout, rise and fall.
    fn health_timing(&self, h: &RawHealth, key: &ServiceKey) -> Result<(Duration, Duration, u32, u32)> {
        let key = *key;
        let interval = match &h.interval {
            None => INTERVAL_DEFAULT,
            Some(i) => Some(*i.get_ref())
                .filter(|s| (MIN_INTERVAL.as_secs_f64()..=MAX_INTERVAL.as_secs_f64()).contains(s))
                .and_then(millis)
                .ok_or_else(|| {
                    self.at(
                        &i.span(),
                        format!(
                            "service {key}: health interval = {} is out of range (0.1..=3600 seconds)",
                            i.get_ref()
                        ),
                    )
                })?,
        };
        let timeout = match &h.timeout {
            None if interval <= Duration::from_secs(1) => interval / 2,
            None => TIMEOUT_DEFAULT,
            Some(t) => millis(*t.get_ref()).filter(|t| !t.is_zero() && *t < interval).ok_or_else(|| {
                self.at(
                    &t.span(),
                    format!(
                        "service {key}: health timeout = {} is out of range (more than 0 and less than interval = {} seconds)",
                        t.get_ref(),
                        seconds(interval)
                    ),
                )
            })?,
        };
        let count = |value: &Option<Spanned<i64>>, name: &str, default: u32| -> Result<u32> {
            match value {
                None => Ok(default),
                Some(v) if (1..=i64::from(MAX_RISE_FALL)).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
                Some(v) => Err(self.at(
                    &v.span(),
                    format!("service {key}: health {name} = {} is out of range (1..={MAX_RISE_FALL})", v.get_ref()),
                )),
            }
        };
        let rise = count(&h.rise, "rise", RISE_DEFAULT)?;
        let fall = count(&h.fall, "fall", FALL_DEFAULT)?;
        Ok((interval, timeout, rise, fall))
    }

    /// A service's backends, each checked, none twice, sorted; `total`
    /// counts them over the file.
    fn service_backends(
        &self,
        raw: &RawService,
        span: &Range<usize>,
        key: &ServiceKey,
        global: &Global,
        total: &mut usize,
    ) -> Result<Vec<Backend>> {
        let key = *key;
        let raw_backends = raw.backends.as_ref().ok_or_else(|| {
            self.at(span, format!("service {key} has no backends (backends = [ {{ address = ... }} ])"))
        })?;
        if raw_backends.get_ref().is_empty() {
            return Err(self.at(
                &raw_backends.span(),
                format!("service {key} has no backends (at least one is needed; weight 0 drains a backend)"),
            ));
        }
        let count = raw_backends.get_ref().len();
        let mut backends: Vec<Backend> = Vec::with_capacity(count);
        let mut first_line: HashMap<IpAddr, usize> = HashMap::new();
        for (index, raw_backend) in raw_backends.get_ref().iter().enumerate() {
            let bspan = raw_backend.span();
            if index == MAX_BACKENDS_PER_SERVICE {
                return Err(self.at(
                    &bspan,
                    format!("service {key} has {count} backends: at most MAX_BACKENDS_PER_SERVICE = {MAX_BACKENDS_PER_SERVICE}"),
                ));
            }
            *total += 1;
            let backend = self.backend(raw_backend.get_ref(), &bspan, &key, global)?;
            let aspan = raw_backend.get_ref().address.as_ref().map(Spanned::span).unwrap_or(bspan);
            if let Some(first) = first_line.insert(backend.addr, self.line(&aspan)) {
                return Err(self
                    .at(&aspan, format!("service {key}: backend {} is already listed on line {first}", backend.addr)));
            }
            if key == ServiceKey::CatchAll {
                if let Some(other) = backends.iter().find(|b| b.addr.is_ipv4() != backend.addr.is_ipv4()) {
                    return Err(self.at(
                        &aspan,
                        format!(
                            "the catch-all service may not mix IPv4 and IPv6 backends: {} after {} (line {}); IPv6 backends take IPv4 clients too",
                            backend.addr,
                            other.addr,
                            first_line[&other.addr]
                        ),
                    ));
                }
            }
            backends.push(backend);
        }
        backends.sort();
        Ok(backends)
    }

    fn backend(&self, raw: &RawBackend, span: &Range<usize>, key: &ServiceKey, global: &Global) -> Result<Backend> {
        let address =
            raw.address.as_ref().ok_or_else(|| self.at(span, format!("service {key}: backend has no address")))?;
        let aspan = address.span();
        let addr = self.address(address, "backend")?;
        match (key, addr) {
            (ServiceKey::Vip { addr: IpAddr::V6(vip), .. }, IpAddr::V4(_)) => {
                return Err(self.at(
                    &aspan,
                    format!("backend {addr} is IPv4 but VIP {vip} is IPv6: IPv6-in-IPv4 is not supported (give IPv6 VIPs IPv6 backends)"),
                ))
            }
            (_, IpAddr::V4(_)) if global.source_v4.is_none() => {
                return Err(self.at(&aspan, format!("backend {addr} is IPv4 but [global] has no source_v4 (the outer source address of packets to IPv4 backends)")))
            }
            (_, IpAddr::V6(_)) if global.source_v6.is_none() => {
                return Err(self.at(&aspan, format!("backend {addr} is IPv6 but [global] has no source_v6 (the outer source address of packets to IPv6 backends)")))
            }
            _ => {}
        }
        if addr.is_ipv6() && self.first_ipv6_backend.get().is_none() {
            self.first_ipv6_backend.set(Some((addr, self.line(&aspan))));
        }
        let mac = match &raw.mac {
            Some(m) => Some(self.mac(m, "mac")?),
            None if global.gateway_mac.is_none() => {
                return Err(self.at(
                    &aspan,
                    format!("backend {addr} has no mac and [global] has no gateway_mac (frames to a backend without its own MAC go to the gateway)"),
                ))
            }
            None => None,
        };
        let weight = match &raw.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => u32::try_from(*w.get_ref()).ok().filter(|&w| w <= MAX_WEIGHT).ok_or_else(|| {
                self.at(
                    &w.span(),
                    format!("weight {} is out of range (0 to MAX_WEIGHT = {MAX_WEIGHT}; 0 drains)", w.get_ref()),
                )
            })?,
        };
        Ok(Backend { addr, mac, weight })
    }
}

/// Seconds as the file gives them, to the millisecond; None unless finite
/// and within MAX_INTERVAL.
fn millis(seconds: f64) -> Option<Duration> {
    let ms = (seconds * 1000.0).round();
    (0.0..=MAX_INTERVAL.as_millis() as f64).contains(&ms).then(|| Duration::from_millis(ms as u64))
}

/// A duration in seconds as the file writes it: `2`, `0.5`, `1.25`.
fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    match ms % 1000 {
        0 => format!("{}", ms / 1000),
        fraction => format!("{}.{}", ms / 1000, format!("{fraction:03}").trim_end_matches('0')),
    }
}

// ---------------------------------------------------------------------------
// Rendering

/// The model as a canonical TOML file: `parse(to_toml(m)) == m`.
pub fn to_toml(model: &Model) -> String {
    let mut out = String::new();
    let g = &model.global;
    out.push_str("[global]\n");
    if let Some(a) = g.source_v4 {
        let _ = writeln!(out, "source_v4 = \"{a}\"");
    }
    if let Some(a) = g.source_v6 {
        let _ = writeln!(out, "source_v6 = \"{a}\"");
    }
    if let Some(m) = g.gateway_mac {
        let _ = writeln!(out, "gateway_mac = \"{}\"", format_mac(m));
    }
    if let Some(s) = g.hash_seed {
        let _ = writeln!(out, "hash_seed = 0x{s:08x}");
    }
    if let Some(m) = g.mtu {
        let _ = writeln!(out, "mtu = {m}");
    }
    for service in &model.services {
        out.push_str("\n[[service]]\n");
        let carries_udp = match service.key {
            ServiceKey::CatchAll => {
                out.push_str("vip = \"*\"\nprotocol = \"any\"\nport = 0\n");
                true
            }
            ServiceKey::Vip { addr, protocol, port } => {
                let _ = writeln!(out, "vip = \"{addr}\"\nprotocol = \"{}\"\nport = {port}", protocol.name());
                protocol == Protocol::Udp
            }
        };
        if carries_udp {
            let _ = writeln!(out, "hash_ports = {}", service.hash_ports);
        }
        let _ = writeln!(out, "track_flows = {}", service.track_flows);
        let _ = writeln!(out, "idle_timeout = {}\nudp_grace = {}", service.idle_timeout, service.udp_grace);
        if let Some(h) = model.health.get(&service.key) {
            out.push_str(&health_line(h));
        }
        out.push_str("backends = [\n");
        for b in &service.backends {
            let _ = write!(out, "  {{ address = \"{}\"", b.addr);
            if let Some(m) = b.mac {
                let _ = write!(out, ", mac = \"{}\"", format_mac(m));
            }
            let _ = writeln!(out, ", weight = {} }},", b.weight);
        }
        out.push_str("]\n");
    }
    out
}

/// `health = { check = "http", port = 80, path = "/", ... }`, every key written.
fn health_line(h: &Check) -> String {
    let mut line = String::from("health = { ");
    match &h.kind {
        CheckKind::Tcp => {
            let _ = write!(line, "check = \"tcp\", port = {}", h.port);
        }
        CheckKind::Http { path, status } => {
            // A path is printable ASCII: only `"` and `\` need escaping.
            let path = path.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = write!(line, "check = \"http\", port = {}, path = \"{path}\", status = {status}", h.port);
        }
    }
    let (interval, timeout) = (seconds(h.interval), seconds(h.timeout));
    let _ = writeln!(line, ", interval = {interval}, timeout = {timeout}, rise = {}, fall = {} }}", h.rise, h.fall);
    line
}

// ---------------------------------------------------------------------------
// Diff

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalChange {
    SourceV4 {
        old: Option<Ipv4Addr>,
        new: Option<Ipv4Addr>,
    },
    SourceV6 {
        old: Option<Ipv6Addr>,
        new: Option<Ipv6Addr>,
    },
    GatewayMac {
        old: Option<[u8; 6]>,
        new: Option<[u8; 6]>,
    },
    /// Only when the wanted model names a seed (None keeps the running one).
    HashSeed {
        old: Option<u32>,
        new: u32,
    },
    /// Only when the wanted model names an MTU (None keeps the running one).
    Mtu {
        old: Option<u32>,
        new: u32,
    },
}

impl fmt::Display for GlobalChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "(none)".to_string(), T::to_string)
        }
        let mac = |m: &Option<[u8; 6]>| m.map_or_else(|| "(none)".to_string(), format_mac);
        match self {
            GlobalChange::SourceV4 { old, new } => write!(f, "source_v4 {} -> {}", opt(old), opt(new)),
            GlobalChange::SourceV6 { old, new } => write!(f, "source_v6 {} -> {}", opt(old), opt(new)),
            GlobalChange::GatewayMac { old, new } => write!(f, "gateway_mac {} -> {}", mac(old), mac(new)),
            GlobalChange::HashSeed { old, new } => {
                let old = old.map_or_else(|| "(random)".to_string(), |s| format!("0x{s:08x}"));
                write!(f, "hash_seed {old} -> 0x{new:08x}")
            }
            GlobalChange::Mtu { old, new } => {
                let old = old.map_or_else(|| "(no limit)".to_string(), |m| m.to_string());
                write!(f, "mtu {old} -> {new}")
            }
        }
    }
}

/// A backend present in both models whose MAC or weight differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChange {
    pub old: Backend,
    pub new: Backend,
}

/// A service present in both models whose settings or backends differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChange {
    pub key: ServiceKey,
    /// (old, new) when it differs.
    pub hash_ports: Option<(bool, bool)>,
    /// (old, new) when it differs.
    pub track_flows: Option<(bool, bool)>,
    /// (old, new) when it differs.
    pub idle_timeout: Option<(u32, u32)>,
    /// (old, new) when it differs.
    pub udp_grace: Option<(u32, u32)>,
    pub added: Vec<Backend>,
    pub removed: Vec<Backend>,
    pub changed: Vec<BackendChange>,
}

/// What applying `wanted` over `running` does; every list sorted like the
/// model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub global: Vec<GlobalChange>,
    pub added: Vec<Service>,
    pub removed: Vec<Service>,
    pub changed: Vec<ServiceChange>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The changes from the running model to the wanted one. A wanted
/// `hash_seed` (or `mtu`) of None keeps the running seed (MTU), so it is no
/// change.
pub fn diff(running: &Model, wanted: &Model) -> Diff {
    let (r, w) = (&running.global, &wanted.global);
    let mut global = Vec::new();
    if r.source_v4 != w.source_v4 {
        global.push(GlobalChange::SourceV4 { old: r.source_v4, new: w.source_v4 });
    }
    if r.source_v6 != w.source_v6 {
        global.push(GlobalChange::SourceV6 { old: r.source_v6, new: w.source_v6 });
    }
    if r.gateway_mac != w.gateway_mac {
        global.push(GlobalChange::GatewayMac { old: r.gateway_mac, new: w.gateway_mac });
    }
    if let Some(new) = w.hash_seed {
        if r.hash_seed != Some(new) {
            global.push(GlobalChange::HashSeed { old: r.hash_seed, new });
        }
    }
    if let Some(new) = w.mtu {
        if r.mtu != Some(new) {
            global.push(GlobalChange::Mtu { old: r.mtu, new });
        }
    }
    let mut out = Diff { global, ..Diff::default() };
    merge(
        &running.services,
        &wanted.services,
        |s| s.key,
        |side| match side {
            Side::Old(s) => out.removed.push(s.clone()),
            Side::New(s) => out.added.push(s.clone()),
            Side::Both(old, new) => {
                if let Some(change) = service_change(old, new) {
                    out.changed.push(change);
                }
            }
        },
    );
    out
}

fn service_change(old: &Service, new: &Service) -> Option<ServiceChange> {
    let mut change = ServiceChange {
        key: new.key,
        hash_ports: changed(old.hash_ports, new.hash_ports),
        track_flows: changed(old.track_flows, new.track_flows),
        idle_timeout: changed(old.idle_timeout, new.idle_timeout),
        udp_grace: changed(old.udp_grace, new.udp_grace),
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
    };
    merge(
        &old.backends,
        &new.backends,
        |b| b.addr,
        |side| match side {
            Side::Old(b) => change.removed.push(*b),
            Side::New(b) => change.added.push(*b),
            Side::Both(o, n) if o != n => change.changed.push(BackendChange { old: *o, new: *n }),
            Side::Both(..) => {}
        },
    );
    let unchanged = change.hash_ports.is_none()
        && change.track_flows.is_none()
        && change.idle_timeout.is_none()
        && change.udp_grace.is_none()
        && change.added.is_empty()
        && change.removed.is_empty()
        && change.changed.is_empty();
    (!unchanged).then_some(change)
}

/// (old, new) when they differ.
fn changed<T: PartialEq>(old: T, new: T) -> Option<(T, T)> {
    (old != new).then_some((old, new))
}

enum Side<'a, T> {
    Old(&'a T),
    New(&'a T),
    Both(&'a T, &'a T),
}

/// Walks two lists sorted by `key` (keys unique) in order.
fn merge<'a, T, K: Ord>(old: &'a [T], new: &'a [T], key: impl Fn(&T) -> K, mut visit: impl FnMut(Side<'a, T>)) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        let order = match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) => key(o).cmp(&key(n)),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                visit(Side::Old(&old[i]));
                i += 1;
            }
            Ordering::Greater => {
                visit(Side::New(&new[j]));
                j += 1;
            }
            Ordering::Equal => {
                visit(Side::Both(&old[i], &new[j]));
                i += 1;
                j += 1;
            }
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

impl fmt::Display for Diff {
    /// One line per change (`+` added, `-` removed, `~` changed), then a
    /// summary; "no changes" when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        for g in &self.global {
            writeln!(f, "~ global {g}")?;
        }
        for s in &self.removed {
            writeln!(f, "- service {} ({})", s.key, plural(s.backends.len(), "backend"))?;
        }
        for s in &self.added {
            writeln!(f, "+ service {} ({})", s.key, plural(s.backends.len(), "backend"))?;
            if !s.hash_ports {
                writeln!(f, "    hash_ports false")?;
            }
            if !s.track_flows {
                writeln!(f, "    track_flows false")?;
            }
            if s.idle_timeout != IDLE_TIMEOUT_DEFAULT {
                writeln!(f, "    idle_timeout {}", s.idle_timeout)?;
            }
            if s.udp_grace != UDP_GRACE_DEFAULT {
                writeln!(f, "    udp_grace {}", s.udp_grace)?;
            }
            for b in &s.backends {
                writeln!(f, "    + {b}")?;
            }
        }
        for c in &self.changed {
            writeln!(f, "~ service {}", c.key)?;
            if let Some((old, new)) = c.hash_ports {
                writeln!(f, "    ~ hash_ports {old} -> {new}")?;
            }
            if let Some((old, new)) = c.track_flows {
                writeln!(f, "    ~ track_flows {old} -> {new}")?;
            }
            if let Some((old, new)) = c.idle_timeout {
                writeln!(f, "    ~ idle_timeout {old} -> {new}")?;
            }
            if let Some((old, new)) = c.udp_grace {
                writeln!(f, "    ~ udp_grace {old} -> {new}")?;
            }
            for b in &c.removed {
                writeln!(f, "    - {}", b.addr)?;
            }
            for b in &c.added {
                writeln!(f, "    + {b}")?;
            }
            for BackendChange { old, new } in &c.changed {
                write!(f, "    ~ {}", new.addr)?;
                if old.mac != new.mac {
                    write!(f, " mac {} -> {}", OptMac(old.mac), OptMac(new.mac))?;
                }
                if old.weight != new.weight {
                    write!(f, " weight {} -> {}", old.weight, new.weight)?;
                }
                writeln!(f)?;
            }
        }
        writeln!(
            f,
            "services: {} added, {} removed, {} changed; global: {} changed",
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.global.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(text: &str) -> Model {
        parse("lb.toml", text.as_bytes()).unwrap_or_else(|e| panic!("{e:#}\n{text}"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse("lb.toml", text.as_bytes()).unwrap_err())
    }

    /// Four lines of [global] with every setting a service may need, then
    /// `rest` from line 5 on.
    fn with_global(rest: &str) -> String {
        format!("[global]\nsource_v4 = \"198.18.0.2\"\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:01\"\n{rest}")
    }

    fn v4(text: &str) -> IpAddr {
        IpAddr::V4(text.parse().unwrap())
    }

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(text.parse().unwrap())
    }

    fn backend(addr: IpAddr, mac: Option<[u8; 6]>, weight: u32) -> Backend {
        Backend { addr, mac, weight }
    }

    fn tcp(addr: IpAddr, port: u16) -> ServiceKey {
        ServiceKey::Vip { addr, protocol: Protocol::Tcp, port }
    }

    fn udp(addr: IpAddr, port: u16) -> ServiceKey {
        ServiceKey::Vip { addr, protocol: Protocol::Udp, port }
    }

    /// The example of the module documentation, as written there.
    fn doc_example() -> String {
        let source = include_str!("config.rs");
        let start = source.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
        let end = start + source[start..].find("//! ```\n").unwrap();
        source[start..end]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("//!").unwrap().trim_start_matches(' ')))
            .collect()
    }

    const MAC65: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x65];

    // ----- good files

    #[test]
    fn reads_the_documented_example() {
        let m = model(&doc_example());
        assert_eq!(
            m.global,
            Global {
                source_v4: Some("198.18.0.2".parse().unwrap()),
                source_v6: Some("2001:db8::2".parse().unwrap()),
                gateway_mac: Some([2, 0, 0, 0, 0, 1]),
                hash_seed: Some(0x1234abcd),
                mtu: Some(1500),
            }
        );
        let keys: Vec<ServiceKey> = m.services.iter().map(|s| s.key).collect();
        assert_eq!(keys, [ServiceKey::CatchAll, tcp(v4("203.0.113.10"), 80), udp(v6("2001:db8::10"), 53)]);
        assert_eq!(m.services[0].backends, [backend(v4("198.18.0.201"), Some([2, 0, 0xc6, 0x12, 0, 0xc9]), 1)]);
        assert!(m.services[0].hash_ports);
        assert_eq!(
            m.services[1].backends,
            [
                backend(v4("198.18.0.101"), Some(MAC65), 1),
                backend(v4("198.18.0.102"), None, 2),
                backend(v6("2001:db8::103"), None, 0),
            ],
            "sorted by address, IPv4 first"
        );
        assert_eq!(m.services[2].backends, [backend(v6("2001:db8::101"), None, 1)], "weight 1 by default");
        assert!(!m.services[2].hash_ports);
        assert!(m.services[0].track_flows && m.services[1].track_flows, "flows are tracked by default");
        assert!(!m.services[2].track_flows);
        assert!(
            m.services.iter().all(|s| (s.idle_timeout, s.udp_grace) == (300, 30)),
            "the defaults, written out or not"
        );
        assert_eq!(m.total_backends(), 5);
        assert_eq!(m.service(&udp(v6("2001:db8::10"), 53)), Some(&m.services[2]));
        assert_eq!(m.service(&udp(v6("2001:db8::10"), 54)), None);
        let http = CheckKind::Http { path: "/healthz".to_string(), status: 200 };
        assert_eq!(
            m.health,
            BTreeMap::from([
                (tcp(v4("203.0.113.10"), 80), Check::new(http, 80)),
                (udp(v6("2001:db8::10"), 53), Check::new(CheckKind::Tcp, 53)),
            ])
        );
    }

    #[test]
    fn reads_an_ipv4_only_file_without_gateway() {
        let m = model(
            "[global]\nsource_v4 = \"198.18.0.2\"\n\n[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"udp\"\nport = 0\n\
             backends = [\n  { address = \"198.18.0.101\", mac = \"02:00:C6:12:00:65\" },\n]\n",
        );
        assert_eq!(m.global, Global { source_v4: Some(Ipv4Addr::new(198, 18, 0, 2)), ..Global::default() });
        assert_eq!(
            m.services,
            [Service::new(udp(v4("203.0.113.10"), 0), vec![backend(v4("198.18.0.101"), Some(MAC65), 1)])]
        );
        assert_eq!(m.services[0].key.to_string(), "203.0.113.10:*/udp");
    }

    #[test]
    fn reads_an_ipv6_only_file() {
        let m = model(
            "[global]\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:01\"\n\n\
             [[service]]\nvip = \"2001:DB8:0::0010\"\nprotocol = \"tcp\"\nport = 443\n\
             backends = [{ address = \"2001:db8::102\", weight = 3 }, { address = \"2001:db8::101\", weight = 65535 }]\n",
        );
        assert_eq!(m.global.source_v4, None);
        let s = &m.services[0];
        assert_eq!(s.key, tcp(v6("2001:db8::10"), 443));
        assert_eq!(s.key.to_string(), "[2001:db8::10]:443/tcp");
        assert_eq!(s.backends, [backend(v6("2001:db8::101"), None, 65535), backend(v6("2001:db8::102"), None, 3)]);
    }

    #[test]
    fn reads_mixed_families_and_catch_all() {
        // The catch-all with protocol and port left out; an IPv4 VIP served
        // by IPv4 and IPv6 backends; services given out of order.
        let m = model(&with_global(
            "[[service]]\nvip = \"2001:db8::10\"\nprotocol = \"udp\"\nport = 53\nbackends = [{ address = \"2001:db8::101\" }]\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"udp\"\nport = 53\nbackends = [{ address = \"2001:db8::101\" }, { address = \"198.18.0.101\" }]\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 53\nbackends = [{ address = \"198.18.0.101\" }]\n\
             [[service]]\nvip = \"*\"\nhash_ports = false\nbackends = [{ address = \"198.18.0.101\" }]\n",
        ));
        let keys: Vec<String> = m.services.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(keys, ["*", "203.0.113.10:53/tcp", "203.0.113.10:53/udp", "[2001:db8::10]:53/udp"]);
        assert!(!m.services[0].hash_ports, "the catch-all's UDP traffic may hash addresses only");
        assert_eq!(
            m.services[2].backends,
            [backend(v4("198.18.0.101"), None, 1), backend(v6("2001:db8::101"), None, 1)]
        );
        assert_eq!(m.total_backends(), 5, "a backend counts once per service");
    }

    #[test]
    fn track_flows_is_on_unless_turned_off() {
        let text = |setting: &str| {
            with_global(&format!("[[service]]\nvip = \"*\"\n{setting}backends = [{{ address = \"198.18.0.101\" }}]\n"))
        };
        assert!(model(&text("")).services[0].track_flows, "default true");
        assert!(model(&text("track_flows = true\n")).services[0].track_flows);
        let off = model(&text("track_flows = false\n"));
        assert!(!off.services[0].track_flows);
        assert!(off.services[0].hash_ports, "independent of hash_ports");
        // Rendered like every other key, default included.
        assert!(
            to_toml(&off).contains("\nport = 0\nhash_ports = true\ntrack_flows = false\nidle_timeout = 300\nudp_grace = 30\nbackends = [\n"),
            "{}",
            to_toml(&off)
        );
        assert!(to_toml(&model(&text("")))
            .contains("\nhash_ports = true\ntrack_flows = true\nidle_timeout = 300\nudp_grace = 30\nbackends = [\n"));
        assert_eq!(
            err(&text("track_flows = \"off\"\n")),
            "lb.toml:7: invalid type: string \"off\", expected a boolean"
        );
    }

    #[test]
    fn idle_timeout_and_udp_grace_default_and_are_checked() {
        // The setting on line 9.
        let text = |setting: &str| {
            with_global(&format!(
                "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"udp\"\nport = 53\n{setting}backends = [{{ address = \"198.18.0.101\" }}]\n"
            ))
        };
        let settings = |m: &Model| (m.services[0].idle_timeout, m.services[0].udp_grace);
        assert_eq!((IDLE_TIMEOUT_DEFAULT, UDP_GRACE_DEFAULT, MAX_TRANSITION_SECONDS), (300, 30, 86_400));
        assert_eq!(settings(&model(&text(""))), (300, 30), "defaults");
        assert_eq!(settings(&model(&text("idle_timeout = 5\nudp_grace = 0\n"))), (5, 0));
        assert_eq!(settings(&model(&text("udp_grace = 86400\nidle_timeout = 86400\n"))), (86_400, 86_400));
        assert_eq!(settings(&model(&text("idle_timeout = 1\n"))), (1, 30));
        // Independent of track_flows (kept for when it is turned back on).
        let untracked = model(&text("track_flows = false\nidle_timeout = 60\n"));
        assert_eq!((untracked.services[0].track_flows, settings(&untracked)), (false, (60, 30)));

        let range = |name: &str, value: &str, min: u32| {
            format!("lb.toml:9: service 203.0.113.10:53/udp: {name} = {value} is out of range ({min}..=86400 seconds)")
        };
        assert_eq!(err(&text("idle_timeout = 0\n")), range("idle_timeout", "0", 1));
        assert_eq!(err(&text("idle_timeout = 86401\n")), range("idle_timeout", "86401", 1));
        assert_eq!(err(&text("idle_timeout = -300\n")), range("idle_timeout", "-300", 1));
        assert_eq!(
            err(&text("idle_timeout = 4294967596\n")),
            range("idle_timeout", "4294967596", 1),
            "not wrapped to 300"
        );
        assert_eq!(err(&text("udp_grace = -1\n")), range("udp_grace", "-1", 0));
        assert_eq!(err(&text("udp_grace = 86401\n")), range("udp_grace", "86401", 0));
        assert_eq!(
            err(&text("idle_timeout = 5\nudp_grace = 100000\n")),
            "lb.toml:10: service 203.0.113.10:53/udp: udp_grace = 100000 is out of range (0..=86400 seconds)"
        );
        assert_eq!(
            err(&text("idle_timeout = \"300\"\n")),
            "lb.toml:9: invalid type: string \"300\", expected an integer"
        );
        assert_eq!(
            err(&text("idle_timeout = \"5m\"\n")),
            "lb.toml:9: invalid type: string \"5m\", expected an integer"
        );
        assert_eq!(
            err(&text("udp_grace = 1.5\n")),
            "lb.toml:9: invalid type: floating point `1.5`, expected an integer"
        );
        assert_eq!(err(&text("udp_grace = true\n")), "lb.toml:9: invalid type: boolean `true`, expected an integer");

        // Rendered (defaults included) and read back.
        let tuned = model(&text("idle_timeout = 5\nudp_grace = 0\n"));
        let rendered = to_toml(&tuned);
        assert!(
            rendered.contains(
                "\nport = 53\nhash_ports = true\ntrack_flows = true\nidle_timeout = 5\nudp_grace = 0\nbackends = [\n"
            ),
            "{rendered}"
        );
        assert_eq!(model(&rendered), tuned);
        assert_eq!(to_toml(&model(&rendered)), rendered);

        // The diff names each change; an added service its non-defaults.
        let running = model(&text(""));
        let d = diff(&running, &model(&text("idle_timeout = 5\n")));
        assert_eq!((d.changed.len(), d.changed[0].idle_timeout, d.changed[0].udp_grace), (1, Some((300, 5)), None));
        assert_eq!(
            d.to_string(),
            "~ service 203.0.113.10:53/udp\n\
             \x20   ~ idle_timeout 300 -> 5\n\
             services: 0 added, 0 removed, 1 changed; global: 0 changed\n"
        );
        let d = diff(&running, &tuned);
        assert_eq!((d.changed[0].idle_timeout, d.changed[0].udp_grace), (Some((300, 5)), Some((30, 0))));
        assert_eq!(
            d.to_string(),
            "~ service 203.0.113.10:53/udp\n\
             \x20   ~ idle_timeout 300 -> 5\n\
             \x20   ~ udp_grace 30 -> 0\n\
             services: 0 added, 0 removed, 1 changed; global: 0 changed\n"
        );
        assert!(diff(&tuned, &model(&rendered)).is_empty());
        assert_eq!(
            diff(&Model { global: tuned.global.clone(), ..Model::default() }, &tuned).to_string(),
            "+ service 203.0.113.10:53/udp (1 backend)\n\
             \x20   idle_timeout 5\n\
             \x20   udp_grace 0\n\
             \x20   + 198.18.0.101 mac gateway weight 1\n\
             services: 1 added, 0 removed, 0 changed; global: 0 changed\n"
        );
        assert_eq!(
            diff(&Model { global: running.global.clone(), ..Model::default() }, &running).to_string(),
            "+ service 203.0.113.10:53/udp (1 backend)\n\
             \x20   + 198.18.0.101 mac gateway weight 1\n\
             services: 1 added, 0 removed, 0 changed; global: 0 changed\n",
            "defaults are not listed"
        );
    }

    /// A service of `protocol` on `port` of 203.0.113.10 with `health` on line 9.
    fn checked(protocol: &str, port: u16, health: &str) -> String {
        with_global(&format!(
            "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"{protocol}\"\nport = {port}\n{health}\nbackends = [{{ address = \"198.18.0.101\" }}]\n"
        ))
    }

    /// The one health check of `text`, if any.
    fn check_of(text: &str) -> Option<Check> {
        let m = model(text);
        assert!(m.health.len() <= 1);
        m.health.into_values().next()
    }

    fn http(path: &str, status: u16) -> CheckKind {
        CheckKind::Http { path: path.to_string(), status }
    }

    #[test]
    fn health_checks_default_and_read_both_forms() {
        let tcp80 = |health: &str| check_of(&checked("tcp", 80, health));
        assert_eq!(tcp80(""), None, "no health, no check");
        assert_eq!(tcp80("health = { check = \"tcp\" }"), Some(Check::new(CheckKind::Tcp, 80)), "the service's port");
        assert_eq!(tcp80("health = { check = \"http\" }"), Some(Check::new(http("/", 200), 80)));
        assert_eq!(
            tcp80("health = { check = \"http\", port = 8080, path = \"/healthz?full=1\", status = 204, interval = 0.5, timeout = 0.2, rise = 1, fall = 100 }"),
            Some(Check {
                kind: http("/healthz?full=1", 204),
                port: 8080,
                interval: Duration::from_millis(500),
                timeout: Duration::from_millis(200),
                rise: 1,
                fall: 100,
            })
        );
        // The timeout's default: 1 s, or half the interval when that is 1 s or less.
        let timing = |health: &str| tcp80(health).map(|c| (c.interval, c.timeout)).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(timing("health = { check = \"tcp\", interval = 5 }"), (ms(5000), ms(1000)));
        assert_eq!(timing("health = { check = \"tcp\", interval = 1.5 }"), (ms(1500), ms(1000)));
        assert_eq!(timing("health = { check = \"tcp\", interval = 1 }"), (ms(1000), ms(500)));
        assert_eq!(timing("health = { check = \"tcp\", interval = 0.1 }"), (ms(100), ms(50)));
        assert_eq!(
            timing("health = { check = \"tcp\", interval = 3600, timeout = 3599.999 }"),
            (ms(3_600_000), ms(3_599_999))
        );
        assert_eq!(
            timing("health = { check = \"tcp\", interval = 0.25, timeout = 0.0006 }"),
            (ms(250), ms(1)),
            "to the millisecond"
        );
        // A UDP service, or one of every port, names the port probed.
        assert_eq!(
            check_of(&checked("udp", 53, "health = { check = \"tcp\", port = 53 }")),
            Some(Check::new(CheckKind::Tcp, 53))
        );
        assert_eq!(
            check_of(&checked("tcp", 0, "health = { check = \"tcp\", port = 22 }")),
            Some(Check::new(CheckKind::Tcp, 22))
        );
        // "none" is no check, whatever else the table says, on the catch-all too.
        assert_eq!(tcp80("health = { check = \"none\", path = \"/x\", rise = 5 }"), None);
        let catch_all = with_global(
            "[[service]]\nvip = \"*\"\nhealth = { check = \"none\" }\nbackends = [{ address = \"198.18.0.101\" }]\n",
        );
        assert_eq!(model(&catch_all).health, BTreeMap::new());
        // A [service.health] table says the same as the inline one.
        let table = with_global(
            "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{ address = \"198.18.0.101\" }]\n\
             [service.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = 2\n",
        );
        assert_eq!(model(&table), model(&checked("tcp", 80, "health = { check = \"http\", path = \"/healthz\" }")));
        // Per service: the other service has none.
        let two = format!("{}[[service]]\nvip = \"203.0.113.11\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{{ address = \"198.18.0.101\" }}]\n", checked("tcp", 80, "health = { check = \"tcp\" }"));
        assert_eq!(model(&two).health.keys().copied().collect::<Vec<_>>(), [tcp(v4("203.0.113.10"), 80)]);
    }

    #[test]
    fn reads_the_health_example_of_the_configuration_page() {
        let page = include_str!("../../docs/configuration.md");
        let section = &page[page.find("## Health checks").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```\n").unwrap()];
        let m = model(&with_global(example));
        let web = Check::new(http("/healthz", 200), 80);
        assert_eq!(
            m.health,
            BTreeMap::from([
                (tcp(v4("203.0.113.10"), 80), web),
                (udp(v4("203.0.113.10"), 53), Check::new(CheckKind::Tcp, 53))
            ])
        );
    }

    #[test]
    fn refuses_bad_health_checks() {
        let tcp80 = |health: &str| err(&checked("tcp", 80, &format!("health = {{ {health} }}")));
        let named = |what: &str| format!("lb.toml:9: service 203.0.113.10:80/tcp: health {what}");
        assert_eq!(tcp80(""), named("has no check (\"tcp\", \"http\" or \"none\")"));
        assert_eq!(tcp80("check = \"icmp\""), named("check `icmp` is not \"tcp\", \"http\" or \"none\""));
        assert_eq!(tcp80("check = \"tcp\", port = 0"), named("port = 0 is out of range (1..=65535)"));
        assert_eq!(tcp80("check = \"tcp\", port = 65536"), named("port = 65536 is out of range (1..=65535)"));
        assert_eq!(tcp80("check = \"tcp\", port = -80"), named("port = -80 is out of range (1..=65535)"));
        assert_eq!(tcp80("check = \"tcp\", path = \"/\""), named("path is for check = \"http\" only"));
        assert_eq!(tcp80("check = \"tcp\", status = 200"), named("status is for check = \"http\" only"));
        let path = |p: &str| named(&format!("path {p:?} must start with \"/\" and be printable ASCII without spaces"));
        for bad in ["healthz", "", "/a b", "/caf\u{e9}", "/a\tb"] {
            assert_eq!(tcp80(&format!("check = \"http\", path = {bad:?}")), path(bad));
        }
        assert_eq!(tcp80("check = \"http\", status = 99"), named("status = 99 is out of range (100..=599)"));
        assert_eq!(tcp80("check = \"http\", status = 600"), named("status = 600 is out of range (100..=599)"));
        let interval = |value: &str| named(&format!("interval = {value} is out of range (0.1..=3600 seconds)"));
        for (given, said) in
            [("0.09", "0.09"), ("0", "0"), ("-2", "-2"), ("3600.5", "3600.5"), ("nan", "NaN"), ("inf", "inf")]
        {
            assert_eq!(tcp80(&format!("check = \"tcp\", interval = {given}")), interval(said));
        }
        let timeout = |value: &str, interval: &str| {
            named(&format!(
                "timeout = {value} is out of range (more than 0 and less than interval = {interval} seconds)"
            ))
        };
        assert_eq!(tcp80("check = \"tcp\", timeout = 2"), timeout("2", "2"), "the default interval");
        assert_eq!(tcp80("check = \"tcp\", interval = 0.5, timeout = 1"), timeout("1", "0.5"));
        assert_eq!(tcp80("check = \"tcp\", timeout = 0"), timeout("0", "2"));
        assert_eq!(tcp80("check = \"tcp\", timeout = 0.0004"), timeout("0.0004", "2"), "0 once to the millisecond");
        assert_eq!(tcp80("check = \"tcp\", timeout = -1"), timeout("-1", "2"));
        assert_eq!(tcp80("check = \"tcp\", rise = 0"), named("rise = 0 is out of range (1..=100)"));
        assert_eq!(tcp80("check = \"tcp\", fall = 101"), named("fall = 101 is out of range (1..=100)"));
        assert_eq!(
            tcp80("check = \"tcp\", intervall = 2"),
            "lb.toml:9: unknown field `intervall`, expected one of `check`, `port`, `path`, `status`, `interval`, `timeout`, `rise`, `fall`"
        );
        assert_eq!(
            tcp80("check = \"tcp\", interval = \"2s\""),
            "lb.toml:9: invalid type: string \"2s\", expected a number"
        );
        assert_eq!(
            tcp80("check = \"tcp\", rise = 1.5"),
            "lb.toml:9: invalid type: floating point `1.5`, expected an integer"
        );
        assert_eq!(
            err(&checked("tcp", 80, "health = \"tcp\"")),
            "lb.toml:9: invalid type: string \"tcp\", expected a table"
        );

        // The port probed: a UDP service and one of every port name it.
        assert_eq!(
            err(&checked("udp", 53, "health = { check = \"tcp\" }")),
            "lb.toml:9: service 203.0.113.10:53/udp: health needs a port (the probe is a TCP connection and the service is UDP)"
        );
        assert_eq!(
            err(&checked("tcp", 0, "health = { check = \"http\" }")),
            "lb.toml:9: service 203.0.113.10:*/tcp: health needs a port (the service takes every port)"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"*\"\nbackends = [{ address = \"198.18.0.101\" }]\nhealth = { check = \"tcp\", port = 80 }\n")),
            "lb.toml:8: the catch-all service (vip = \"*\") cannot have a health check: probes go to a service's VIP and port, and it has neither"
        );

        // In a [service.health] table, the line of the value.
        let table = |rest: &str| {
            err(&with_global(&format!(
                "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{{ address = \"198.18.0.101\" }}]\n\n[service.health]\ncheck = \"tcp\"\n{rest}"
            )))
        };
        assert_eq!(
            table("rise = 2\nfall = 0\n"),
            "lb.toml:14: service 203.0.113.10:80/tcp: health fall = 0 is out of range (1..=100)"
        );
        assert_eq!(table("checks = 2\n"), "lb.toml:13: unknown field `checks`, expected one of `check`, `port`, `path`, `status`, `interval`, `timeout`, `rise`, `fall`");
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{ address = \"198.18.0.101\" }]\n[service.health]\nport = 80\n")),
            "lb.toml:10: service 203.0.113.10:80/tcp: health has no check (\"tcp\", \"http\" or \"none\")",
            "the table's header"
        );
    }

    #[test]
    fn health_checks_are_rendered_and_not_diffed() {
        let text = checked(
            "tcp",
            80,
            "health = { check = \"http\", path = \"/a\\\"b\\\\c\", status = 503, interval = 0.125, timeout = 0.001, rise = 100, fall = 1 }",
        );
        let m = model(&text);
        assert_eq!(m.health.values().next().unwrap().kind, http("/a\"b\\c", 503));
        let rendered = to_toml(&m);
        assert!(
            rendered.contains(
                "\nudp_grace = 30\nhealth = { check = \"http\", port = 80, path = \"/a\\\"b\\\\c\", status = 503, interval = 0.125, timeout = 0.001, rise = 100, fall = 1 }\nbackends = [\n"
            ),
            "{rendered}"
        );
        assert_eq!(model(&rendered), m);
        assert!(to_toml(&model(&checked("udp", 0, "health = { check = \"tcp\", port = 9, interval = 1.5 }")))
            .contains("\nhealth = { check = \"tcp\", port = 9, interval = 1.5, timeout = 1, rise = 2, fall = 3 }\n"));
        // The datapath's diff: adding, changing or removing a check is no change to the maps.
        let plain = model(&checked("tcp", 80, ""));
        assert!(diff(&plain, &m).is_empty());
        assert!(diff(&m, &plain).is_empty());
        assert!(diff(&m, &model(&checked("tcp", 80, "health = { check = \"tcp\" }"))).is_empty());
        assert_ne!(plain, m, "the models differ");
    }

    #[test]
    fn a_global_table_alone_means_no_services() {
        assert_eq!(model("[global]\n"), Model::default());
        assert_eq!(model("# nothing balanced\n[global]\ngateway_mac = \"02:00:00:00:00:01\"\n").services, []);
    }

    #[test]
    fn same_meaning_gives_the_same_model() {
        let a = model(&with_global(
            "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nhash_ports = true\n\
             backends = [{ address = \"198.18.0.101\", weight = 1 }, { address = \"2001:db8::0:101\", mac = \"02:00:C6:12:00:65\" }]\n",
        ));
        let b = model(
            "[[service]]\nbackends = [{ mac = \"02:00:c6:12:00:65\", address = \"2001:db8::101\" }, { address = \"198.18.0.101\" }]\n\
             port = 80\nprotocol = \"tcp\"\nvip = \"203.0.113.10\"\n\
             [global]\ngateway_mac = \"02:00:00:00:00:01\"\nsource_v6 = \"2001:0db8::2\"\nsource_v4 = \"198.18.0.2\"\n",
        );
        assert_eq!(a, b);
    }

    // ----- bad files: every message with its line

    #[test]
    fn refuses_duplicates() {
        let dup_service = with_global(
            "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{ address = \"198.18.0.101\" }]\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{ address = \"198.18.0.102\" }]\n",
        );
        assert_eq!(err(&dup_service), "lb.toml:11: service 203.0.113.10:80/tcp is already defined on line 6");
        let same_v6 = with_global(
            "[[service]]\nvip = \"2001:db8::10\"\nprotocol = \"udp\"\nport = 0\nbackends = [{ address = \"2001:db8::101\" }]\n\
             [[service]]\nvip = \"2001:db8:0:0::10\"\nprotocol = \"udp\"\nport = 0\nbackends = [{ address = \"2001:db8::102\" }]\n",
        );
        assert_eq!(err(&same_v6), "lb.toml:11: service [2001:db8::10]:*/udp is already defined on line 6");
        let two_catch_alls = with_global(
            "[[service]]\nvip = \"*\"\nbackends = [{ address = \"198.18.0.101\" }]\n[[service]]\nvip = \"*\"\nprotocol = \"any\"\nbackends = [{ address = \"198.18.0.101\" }]\n",
        );
        assert_eq!(err(&two_catch_alls), "lb.toml:9: service * is already defined on line 6");
        let dup_backend = with_global(
            "[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n  { address = \"2001:db8::101\" },\n  { address = \"198.18.0.101\" },\n  { address = \"2001:db8:0::101\", weight = 2 },\n]\n",
        );
        assert_eq!(
            err(&dup_backend),
            "lb.toml:12: service 203.0.113.10:80/tcp: backend 2001:db8::101 is already listed on line 10"
        );
    }

    /// One TCP service on port 80 of `vip` with `backends` as given; the
    /// backends line is line 9.
    fn service(vip: &str, backends: &str) -> String {
        with_global(&format!("[[service]]\nvip = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\nbackends = [{backends}]\n"))
    }

    #[test]
    fn refuses_bad_addresses() {
        let b = "{ address = \"198.18.0.101\" }";
        assert_eq!(err(&service("203.0.113.300", b)), "lb.toml:6: vip `203.0.113.300` is not an IPv4 or IPv6 address");
        assert_eq!(
            err(&service("www.example.com", b)),
            "lb.toml:6: vip `www.example.com` is not an IPv4 or IPv6 address"
        );
        assert_eq!(err(&service("0.0.0.0", b)), "lb.toml:6: vip 0.0.0.0 is unspecified (0.0.0.0)");
        assert_eq!(err(&service("255.255.255.255", b)), "lb.toml:6: vip 255.255.255.255 is the broadcast address");
        assert_eq!(err(&service("127.0.0.1", b)), "lb.toml:6: vip 127.0.0.1 is a loopback address");
        assert_eq!(err(&service("224.0.0.1", b)), "lb.toml:6: vip 224.0.0.1 is multicast");
        assert_eq!(err(&service("::", "")), "lb.toml:6: vip :: is unspecified (::)");
        assert_eq!(err(&service("::1", "")), "lb.toml:6: vip ::1 is a loopback address");
        assert_eq!(err(&service("ff02::1", "")), "lb.toml:6: vip ff02::1 is multicast");
        assert_eq!(
            err(&service("::ffff:203.0.113.10", "")),
            "lb.toml:6: vip ::ffff:203.0.113.10 is an IPv4-mapped IPv6 address (write the IPv4 address)"
        );
        let vip = "203.0.113.10";
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0\" }")),
            "lb.toml:9: backend `198.18.0` is not an IPv4 or IPv6 address"
        );
        assert_eq!(err(&service(vip, "{ address = \"224.1.2.3\" }")), "lb.toml:9: backend 224.1.2.3 is multicast");
        assert_eq!(err(&service(vip, "{ address = \"::1\" }")), "lb.toml:9: backend ::1 is a loopback address");
        assert_eq!(
            err(&service(vip, "{ weight = 1 }")),
            "lb.toml:9: service 203.0.113.10:80/tcp: backend has no address"
        );
        assert_eq!(
            err("[global]\nsource_v4 = \"2001:db8::2\"\n"),
            "lb.toml:2: source_v4 2001:db8::2 is not an IPv4 address"
        );
        assert_eq!(
            err("[global]\nsource_v6 = \"198.18.0.2\"\n"),
            "lb.toml:2: source_v6 198.18.0.2 is not an IPv6 address"
        );
        assert_eq!(
            err("[global]\n\nsource_v4 = \"0.0.0.0\"\n"),
            "lb.toml:3: source_v4 0.0.0.0 is unspecified (0.0.0.0)"
        );
        assert_eq!(err("[global]\nsource_v6 = \"ff02::2\"\n"), "lb.toml:2: source_v6 ff02::2 is multicast");
    }

    #[test]
    fn refuses_bad_macs_and_weights() {
        let vip = "203.0.113.10";
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0.101\", mac = \"02:00:00:00:00:0g\" }")),
            "lb.toml:9: mac `02:00:00:00:00:0g` is not a MAC address (expected six hex pairs like 02:00:c6:12:00:65)"
        );
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0.101\", mac = \"01:00:5E:00:00:01\" }")),
            "lb.toml:9: mac 01:00:5e:00:00:01 is not a unicast MAC address"
        );
        assert_eq!(
            err("[global]\ngateway_mac = \"00:00:00:00:00:00\"\n"),
            "lb.toml:2: gateway_mac 00:00:00:00:00:00 is not a unicast MAC address"
        );
        assert_eq!(
            err("[global]\ngateway_mac = \"gateway\"\n"),
            "lb.toml:2: gateway_mac `gateway` is not a MAC address (expected six hex pairs like 02:00:c6:12:00:65)"
        );
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0.101\", weight = 65536 }")),
            "lb.toml:9: weight 65536 is out of range (0 to MAX_WEIGHT = 65535; 0 drains)"
        );
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0.101\", weight = -1 }")),
            "lb.toml:9: weight -1 is out of range (0 to MAX_WEIGHT = 65535; 0 drains)"
        );
        assert_eq!(
            err(&service(vip, "{ address = \"198.18.0.101\", weight = 1.5 }")),
            "lb.toml:9: invalid type: floating point `1.5`, expected an integer"
        );
        let draining = model(&service(vip, "{ address = \"198.18.0.101\", weight = 0 }"));
        assert_eq!(draining.services[0].backends[0].weight, 0, "weight 0 drains");
    }

    #[test]
    fn refuses_unknown_keys_and_wrong_types() {
        assert_eq!(
            err("[global]\nsource = \"198.18.0.2\"\n"),
            "lb.toml:2: unknown field `source`, expected one of `source_v4`, `source_v6`, `gateway_mac`, `hash_seed`, `mtu`"
        );
        assert_eq!(err("[globals]\n"), "lb.toml:1: unknown field `globals`, expected `global` or `service`");
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"*\"\nports = 0\n")),
            "lb.toml:7: unknown field `ports`, expected one of `vip`, `protocol`, `port`, `hash_ports`, `track_flows`, `idle_timeout`, `udp_grace`, `health`, `backends`"
        );
        assert_eq!(
            err(&service("203.0.113.10", "{ address = \"198.18.0.101\", wieght = 2 }")),
            "lb.toml:9: unknown field `wieght`, expected one of `address`, `mac`, `weight`"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = \"80\"\n")),
            "lb.toml:8: invalid type: string \"80\", expected an integer"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"*\"\nhash_ports = \"no\"\n")),
            "lb.toml:7: invalid type: string \"no\", expected a boolean"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\ntrack_flows = 1\n")),
            "lb.toml:9: invalid type: integer `1`, expected a boolean"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = 10\n")),
            "lb.toml:6: invalid type: integer `10`, expected a string"
        );
        assert_eq!(
            err(&with_global("[[service]]\nvip = \"*\"\nbackends = \"198.18.0.101\"\n")),
            "lb.toml:7: invalid type: string \"198.18.0.101\", expected a sequence"
        );
        assert_eq!(
            err("[global]\nhash_seed = 0x1_0000_0000\n"),
            "lb.toml:2: hash_seed 4294967296 is out of range (0 to 0xffffffff)"
        );
        assert_eq!(err("[global]\nhash_seed = \"1\"\n"), "lb.toml:2: invalid type: string \"1\", expected an integer");
        assert_eq!(err("[global]\nsource_v4 = \"198.18.0.2\n"), "lb.toml:2: invalid basic string, expected `\"`");
        assert_eq!(err("[global]\n[global]\n"), "lb.toml:2: duplicate key");
    }

    #[test]
    fn refuses_incomplete_or_contradictory_services() {
        let head = |vip: &str, rest: &str| with_global(&format!("\n[[service]]\nvip = \"{vip}\"\n{rest}"));
        let b = "backends = [{ address = \"198.18.0.101\" }]\n";
        assert_eq!(
            err(&with_global("\n[[service]]\nprotocol = \"tcp\"\n")),
            "lb.toml:6: service has no vip (an address, or \"*\" for the catch-all)"
        );
        assert_eq!(
            err(&head("203.0.113.10", "port = 80\n")),
            "lb.toml:6: service 203.0.113.10 has no protocol (\"tcp\" or \"udp\")"
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"TCP\"\n")),
            "lb.toml:8: protocol `TCP` is not \"tcp\" or \"udp\""
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"any\"\n")),
            "lb.toml:8: protocol \"any\" is only for the catch-all service (vip = \"*\"): use \"tcp\" or \"udp\""
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"udp\"\n")),
            "lb.toml:6: service 203.0.113.10 has no port (1 to 65535, or 0 for every port)"
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"udp\"\nport = 65536\n")),
            "lb.toml:9: port 65536 is out of range (0 to 65535; 0 = every port)"
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"udp\"\nport = 53\n")),
            "lb.toml:6: service 203.0.113.10:53/udp has no backends (backends = [ { address = ... } ])"
        );
        assert_eq!(
            err(&head("203.0.113.10", "protocol = \"udp\"\nport = 53\nbackends = []\n")),
            "lb.toml:10: service 203.0.113.10:53/udp has no backends (at least one is needed; weight 0 drains a backend)"
        );
        assert_eq!(
            err(&head("203.0.113.10", &format!("protocol = \"tcp\"\nport = 80\nhash_ports = false\n{b}"))),
            "lb.toml:10: service 203.0.113.10:80/tcp: hash_ports = false is for UDP services only (TCP flows always hash their ports)"
        );
        assert_eq!(
            err(&head("*", &format!("port = 80\n{b}"))),
            "lb.toml:8: the catch-all service (vip = \"*\") takes every port: port must be 0 (or left out), not 80"
        );
        assert_eq!(
            err(&head("*", &format!("protocol = \"tcp\"\n{b}"))),
            "lb.toml:8: the catch-all service (vip = \"*\") takes TCP and UDP: protocol must be \"any\" (or left out), not `tcp`"
        );
        assert_eq!(
            model(&head("*", &format!("protocol = \"any\"\nport = 0\n{b}"))).services[0].key,
            ServiceKey::CatchAll
        );
    }

    #[test]
    fn the_catch_all_does_not_mix_families() {
        let mixed = with_global("[[service]]\nvip = \"*\"\nbackends = [\n  { address = \"2001:db8::101\" },\n  { address = \"2001:db8::102\" },\n  { address = \"198.18.0.101\" },\n]\n");
        assert_eq!(
            err(&mixed),
            "lb.toml:10: the catch-all service may not mix IPv4 and IPv6 backends: 198.18.0.101 after 2001:db8::101 (line 8); IPv6 backends take IPv4 clients too"
        );
        let v6_only = with_global("[[service]]\nvip = \"*\"\nbackends = [{ address = \"2001:db8::101\" }]\n");
        assert_eq!(model(&v6_only).services[0].backends.len(), 1);
    }

    #[test]
    fn refuses_backends_the_datapath_cannot_reach() {
        let ipv6_vip = with_global(
            "[[service]]\nvip = \"2001:db8::10\"\nprotocol = \"tcp\"\nport = 443\nbackends = [\n  { address = \"2001:db8::101\" },\n  { address = \"198.18.0.101\" },\n]\n",
        );
        assert_eq!(
            err(&ipv6_vip),
            "lb.toml:11: backend 198.18.0.101 is IPv4 but VIP 2001:db8::10 is IPv6: IPv6-in-IPv4 is not supported (give IPv6 VIPs IPv6 backends)"
        );
        let no_gateway = "[global]\nsource_v4 = \"198.18.0.2\"\n[[service]]\nvip = \"*\"\nbackends = [\n  { address = \"198.18.0.101\", mac = \"02:00:c6:12:00:65\" },\n  { address = \"198.18.0.102\" },\n]\n";
        assert_eq!(
            err(no_gateway),
            "lb.toml:7: backend 198.18.0.102 has no mac and [global] has no gateway_mac (frames to a backend without its own MAC go to the gateway)"
        );
        let no_v6 = "[global]\nsource_v4 = \"198.18.0.2\"\ngateway_mac = \"02:00:00:00:00:01\"\n[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n  { address = \"198.18.0.101\" },\n  { address = \"2001:db8::101\" },\n]\n";
        assert_eq!(
            err(no_v6),
            "lb.toml:10: backend 2001:db8::101 is IPv6 but [global] has no source_v6 (the outer source address of packets to IPv6 backends)"
        );
        let no_v4 = "[global]\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:01\"\n[[service]]\nvip = \"*\"\nbackends = [{ address = \"198.18.0.101\" }]\n";
        assert_eq!(
            err(no_v4),
            "lb.toml:6: backend 198.18.0.101 is IPv4 but [global] has no source_v4 (the outer source address of packets to IPv4 backends)"
        );
        let no_global =
            "[[service]]\nvip = \"*\"\nbackends = [{ address = \"198.18.0.101\", mac = \"02:00:c6:12:00:65\" }]\n";
        assert_eq!(
            err(no_global),
            "lb.toml:3: backend 198.18.0.101 is IPv4 but [global] has no source_v4 (the outer source address of packets to IPv4 backends)"
        );
    }

    /// A file of `services` services of `per_service` backends each; the
    /// backends of a service on one line each, so backend `i` of service
    /// `s` is on line 5 + s * (per_service + 6) + 5 + i.
    fn sized(services: usize, per_service: usize) -> String {
        let mut text = with_global("");
        for s in 0..services {
            let _ = write!(
                text,
                "[[service]]\nvip = \"203.0.113.{}\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n",
                s + 1
            );
            for i in 0..per_service {
                let _ = writeln!(text, "  {{ address = \"10.{}.{}.{}\" }},", s, i / 256, i % 256);
            }
            text.push_str("]\n");
        }
        text
    }

    #[test]
    fn enforces_the_limits() {
        assert_eq!((MAX_SERVICES, MAX_BACKENDS_PER_SERVICE, MAX_TOTAL_BACKENDS, MAX_WEIGHT), (64, 512, 32768, 65535));
        assert_eq!(model(&sized(MAX_SERVICES, 1)).services.len(), 64);
        // Service 65 starts at line 5 + 64 * 7.
        assert_eq!(err(&sized(MAX_SERVICES + 1, 1)), "lb.toml:453: 65 services: at most MAX_SERVICES = 64");

        assert_eq!(model(&sized(1, MAX_BACKENDS_PER_SERVICE)).services[0].backends.len(), 512);
        // Backend 513 (index 512) of service 0: line 5 + 5 + 512.
        assert_eq!(
            err(&sized(1, MAX_BACKENDS_PER_SERVICE + 10)),
            "lb.toml:522: service 203.0.113.1:80/tcp has 522 backends: at most MAX_BACKENDS_PER_SERVICE = 512"
        );

        // Every service at its 512 backends: the largest configuration, and its file fits the size limit.
        let largest = sized(MAX_SERVICES, MAX_BACKENDS_PER_SERVICE);
        assert!(
            largest.len() < MAX_FILE_BYTES as usize,
            "a file at the limits fits the size limit ({} bytes)",
            largest.len()
        );
        assert_eq!(model(&largest).total_backends(), MAX_TOTAL_BACKENDS);
    }

    #[test]
    fn refuses_empty_and_binary_files() {
        let none = "lb.toml: no configuration (expected a [global] table and [[service]] tables)";
        assert_eq!(err(""), none);
        assert_eq!(err("# only a comment\n\n  \n"), none);
        assert_eq!(err("#\n\u{7f}ELF\u{2}\u{1}\u{1}\0\0\0"), "lb.toml:2: not text (NUL byte)");
        assert_eq!(
            format!("{:#}", parse("lb.toml", b"[global]\n\n# \xff\xfe\n").unwrap_err()),
            "lb.toml:3: not text (invalid UTF-8)"
        );
        let crlf = model("[global]\r\nsource_v4 = \"198.18.0.2\" # lab\r\n");
        assert_eq!(crlf.global.source_v4, Some(Ipv4Addr::new(198, 18, 0, 2)));
    }

    #[test]
    fn load_reads_files_and_names_the_problem() {
        let missing = format!("{:#}", load(Path::new("/nonexistent/lb.toml")).unwrap_err());
        assert!(missing.starts_with("/nonexistent/lb.toml: cannot read: "), "{missing}");
        let dir = std::env::temp_dir().join(format!("l4lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("lb.toml");
        std::fs::write(&good, doc_example()).unwrap();
        let huge = dir.join("huge.toml");
        std::fs::write(&huge, vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[global]\nhash_seed = -1\n").unwrap();
        let loaded = load(&good);
        let huge_message = format!("{:#}", load(&huge).unwrap_err());
        let dir_message = format!("{:#}", load(&dir).unwrap_err());
        let bad_message = format!("{:#}", load(&bad).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), model(&doc_example()));
        assert!(
            huge_message.ends_with("huge.toml: 4194305 bytes is too large for a configuration file (limit 4194304)"),
            "{huge_message}"
        );
        assert!(dir_message.ends_with(": not a regular file"), "{dir_message}");
        assert_eq!(bad_message, format!("{}:2: hash_seed -1 is out of range (0 to 0xffffffff)", bad.display()));
    }

    // ----- rendering

    #[test]
    fn renders_the_canonical_form() {
        let text = to_toml(&model(&doc_example()));
        assert_eq!(
            text,
            r#"[global]
source_v4 = "198.18.0.2"
source_v6 = "2001:db8::2"
gateway_mac = "02:00:00:00:00:01"
hash_seed = 0x1234abcd
mtu = 1500

[[service]]
vip = "*"
protocol = "any"
port = 0
hash_ports = true
track_flows = true
idle_timeout = 300
udp_grace = 30
backends = [
  { address = "198.18.0.201", mac = "02:00:c6:12:00:c9", weight = 1 },
]

[[service]]
vip = "203.0.113.10"
protocol = "tcp"
port = 80
track_flows = true
idle_timeout = 300
udp_grace = 30
health = { check = "http", port = 80, path = "/healthz", status = 200, interval = 2, timeout = 1, rise = 2, fall = 3 }
backends = [
  { address = "198.18.0.101", mac = "02:00:c6:12:00:65", weight = 1 },
  { address = "198.18.0.102", weight = 2 },
  { address = "2001:db8::103", weight = 0 },
]

[[service]]
vip = "2001:db8::10"
protocol = "udp"
port = 53
hash_ports = false
track_flows = false
idle_timeout = 300
udp_grace = 30
health = { check = "tcp", port = 53, interval = 2, timeout = 1, rise = 2, fall = 3 }
backends = [
  { address = "2001:db8::101", weight = 1 },
]
"#
        );
        assert_eq!(to_toml(&Model::default()), "[global]\n");
    }

    #[test]
    fn round_trips() {
        let mut big = model(&sized(8, 512));
        big.global.hash_seed = Some(0);
        big.services[3].backends[7].weight = MAX_WEIGHT;
        big.services[3].backends[8].mac = Some(MAC65);
        let models = [
            model(&doc_example()),
            Model::default(),
            model("[global]\nhash_seed = 0xffffffff\n"),
            model(&with_global("[[service]]\nvip = \"*\"\nhash_ports = false\nbackends = [{ address = \"2001:db8::1\" }]\n")),
            model(&with_global("[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\ntrack_flows = false\nbackends = [{ address = \"198.18.0.101\" }]\n")),
            model(&with_global("[[service]]\nvip = \"*\"\nidle_timeout = 86400\nudp_grace = 0\nbackends = [{ address = \"198.18.0.101\" }]\n")),
            model(&checked("tcp", 80, "health = { check = \"http\", path = \"/x\\\\y\", interval = 3600, timeout = 0.001 }")),
            model(&checked("udp", 53, "health = { check = \"tcp\", port = 65535, interval = 0.1, rise = 1, fall = 100 }")),
            model(&checked("tcp", 0, "health = { check = \"http\", port = 1, status = 599, interval = 1.001 }")),
            big,
        ];
        for m in &models {
            let text = to_toml(m);
            assert_eq!(&model(&text), m, "{text}");
            assert_eq!(to_toml(&model(&text)), text);
            assert!(diff(m, m).is_empty());
            assert_eq!(diff(m, m).to_string(), "no changes\n");
        }
    }

    // ----- diff

    #[test]
    fn diff_lists_every_change() {
        let running = model(&with_global(
            "hash_seed = 1\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n\
               { address = \"198.18.0.101\" },\n  { address = \"198.18.0.102\" },\n  { address = \"198.18.0.103\", mac = \"02:00:c6:12:00:65\" },\n  { address = \"198.18.0.104\" },\n]\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"udp\"\nport = 53\nbackends = [{ address = \"198.18.0.101\" }]\n\
             [[service]]\nvip = \"203.0.113.11\"\nprotocol = \"udp\"\nport = 53\nbackends = [{ address = \"198.18.0.101\" }]\n",
        ));
        let wanted = model(
            "[global]\nsource_v4 = \"198.18.0.2\"\nsource_v6 = \"2001:db8::2\"\ngateway_mac = \"02:00:00:00:00:02\"\nhash_seed = 0x1234abcd\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\ntrack_flows = false\nbackends = [\n\
               { address = \"198.18.0.101\", weight = 3 },\n  { address = \"198.18.0.102\" },\n  { address = \"198.18.0.103\", weight = 2 },\n  { address = \"2001:db8::105\" },\n]\n\
             [[service]]\nvip = \"203.0.113.10\"\nprotocol = \"udp\"\nport = 53\nhash_ports = false\nbackends = [{ address = \"198.18.0.101\" }]\n\
             [[service]]\nvip = \"2001:db8::10\"\nprotocol = \"tcp\"\nport = 0\ntrack_flows = false\nbackends = [{ address = \"2001:db8::101\" }, { address = \"2001:db8::102\", mac = \"02:00:c6:12:00:65\" }]\n",
        );
        let d = diff(&running, &wanted);
        assert_eq!(
            d.global,
            [
                GlobalChange::GatewayMac { old: Some([2, 0, 0, 0, 0, 1]), new: Some([2, 0, 0, 0, 0, 2]) },
                GlobalChange::HashSeed { old: Some(1), new: 0x1234abcd },
            ]
        );
        assert_eq!(d.removed.iter().map(|s| s.key).collect::<Vec<_>>(), [udp(v4("203.0.113.11"), 53)]);
        assert_eq!(d.added.iter().map(|s| s.key).collect::<Vec<_>>(), [tcp(v6("2001:db8::10"), 0)]);
        assert_eq!(d.changed.len(), 2);
        let web = &d.changed[0];
        assert_eq!(web.key, tcp(v4("203.0.113.10"), 80));
        assert_eq!(web.hash_ports, None);
        assert_eq!(web.track_flows, Some((true, false)));
        assert_eq!(web.removed, [backend(v4("198.18.0.104"), None, 1)]);
        assert_eq!(web.added, [backend(v6("2001:db8::105"), None, 1)]);
        assert_eq!(
            web.changed,
            [
                BackendChange { old: backend(v4("198.18.0.101"), None, 1), new: backend(v4("198.18.0.101"), None, 3) },
                BackendChange {
                    old: backend(v4("198.18.0.103"), Some(MAC65), 1),
                    new: backend(v4("198.18.0.103"), None, 2)
                },
            ]
        );
        assert_eq!(d.changed[1].hash_ports, Some((true, false)));
        assert_eq!(d.changed[1].track_flows, None);
        assert_eq!(
            d.to_string(),
            "~ global gateway_mac 02:00:00:00:00:01 -> 02:00:00:00:00:02\n\
             ~ global hash_seed 0x00000001 -> 0x1234abcd\n\
             - service 203.0.113.11:53/udp (1 backend)\n\
             + service [2001:db8::10]:*/tcp (2 backends)\n\
             \x20   track_flows false\n\
             \x20   + 2001:db8::101 mac gateway weight 1\n\
             \x20   + 2001:db8::102 mac 02:00:c6:12:00:65 weight 1\n\
             ~ service 203.0.113.10:80/tcp\n\
             \x20   ~ track_flows true -> false\n\
             \x20   - 198.18.0.104\n\
             \x20   + 2001:db8::105 mac gateway weight 1\n\
             \x20   ~ 198.18.0.101 weight 1 -> 3\n\
             \x20   ~ 198.18.0.103 mac 02:00:c6:12:00:65 -> gateway weight 1 -> 2\n\
             ~ service 203.0.113.10:53/udp\n\
             \x20   ~ hash_ports true -> false\n\
             services: 1 added, 1 removed, 2 changed; global: 2 changed\n"
        );
    }

    #[test]
    fn diff_from_nothing_and_to_nothing() {
        let m = model(&doc_example());
        let up = diff(&Model::default(), &m);
        assert_eq!(up.added, m.services);
        assert_eq!(up.global.len(), 5, "both sources, the gateway, the seed and the MTU");
        assert!(up.to_string().starts_with("~ global source_v4 (none) -> 198.18.0.2\n"), "{up}");
        assert!(up.to_string().contains("~ global hash_seed (random) -> 0x1234abcd\n"), "{up}");
        assert!(up.to_string().contains("~ global mtu (no limit) -> 1500\n"), "{up}");
        assert!(up.to_string().ends_with("services: 3 added, 0 removed, 0 changed; global: 5 changed\n"), "{up}");
        let down = diff(&m, &model("[global]\nhash_seed = 0x1234abcd\n"));
        assert_eq!(down.removed, m.services);
        assert_eq!(down.global.len(), 3);
        assert!(down.to_string().contains("~ global source_v6 2001:db8::2 -> (none)\n"), "{down}");
    }

    #[test]
    fn an_absent_mtu_keeps_the_running_one() {
        let running = model("[global]\nmtu = 1500\n");
        assert!(diff(&running, &model("[global]\n")).is_empty());
        let d = diff(&running, &model("[global]\nmtu = 9000\n"));
        assert_eq!(d.global, [GlobalChange::Mtu { old: Some(1500), new: 9000 }]);
        assert_eq!(
            d.to_string(),
            "~ global mtu 1500 -> 9000\nservices: 0 added, 0 removed, 0 changed; global: 1 changed\n"
        );
        assert!(diff(&running, &running).is_empty());
        assert_eq!(
            diff(&Model::default(), &running).to_string().lines().next(),
            Some("~ global mtu (no limit) -> 1500")
        );
        // Printed and read back.
        for m in [
            running,
            model(&with_global("mtu = 1320\n[[service]]\nvip = \"*\"\nbackends = [{ address = \"2001:db8::1\" }]\n")),
        ] {
            let text = to_toml(&m);
            assert!(text.contains(&format!("\nmtu = {}\n", m.global.mtu.unwrap())), "{text}");
            assert_eq!(model(&text), m);
        }
    }

    #[test]
    fn refuses_mtus_out_of_range() {
        assert_eq!(model("[global]\nmtu = 576\n").global.mtu, Some(MIN_MTU));
        assert_eq!(model("[global]\nmtu = 65535\n").global.mtu, Some(MAX_MTU));
        let below = "lb.toml:3: mtu 575 is below L4LB_MIN_MTU = 576 (the IPv4 datagram every host accepts, RFC 791; the balancer's ICMP answers need it)";
        assert_eq!(err("[global]\nhash_seed = 1\nmtu = 575\n"), below);
        assert_eq!(err("[global]\nmtu = 0\n"), "lb.toml:2: mtu 0 is below L4LB_MIN_MTU = 576 (the IPv4 datagram every host accepts, RFC 791; the balancer's ICMP answers need it)");
        assert_eq!(err("[global]\nmtu = -1500\n"), "lb.toml:2: mtu -1500 is below L4LB_MIN_MTU = 576 (the IPv4 datagram every host accepts, RFC 791; the balancer's ICMP answers need it)");
        assert_eq!(err("[global]\nmtu = 65536\n"), "lb.toml:2: mtu 65536 is above 65535 (the largest IPv4 packet)");
        assert_eq!(
            err("[global]\nmtu = 9999999999999\n"),
            "lb.toml:2: mtu 9999999999999 is above 65535 (the largest IPv4 packet)"
        );
        assert_eq!(err("[global]\nmtu = \"1500\"\n"), "lb.toml:2: invalid type: string \"1500\", expected an integer");
        assert_eq!(
            err("[global]\nmtu = 1500.0\n"),
            "lb.toml:2: invalid type: floating point `1500.0`, expected an integer"
        );
    }

    #[test]
    fn refuses_small_mtus_with_ipv6_backends() {
        assert_eq!((MIN_MTU, MIN_MTU_IPV6_BACKENDS), (576, 1320));
        // IPv4 backends only: 576 will do.
        let v4 = |mtu: u32| {
            with_global(&format!("mtu = {mtu}\n[[service]]\nvip = \"203.0.113.10\"\nprotocol = \"tcp\"\nport = 80\nbackends = [\n  {{ address = \"198.18.0.101\" }},\n]\n"))
        };
        assert_eq!(model(&v4(576)).global.mtu, Some(576));
        // One IPv6 backend (line 19, in the second service): 1320 at least, the error on the mtu line.
        let v6 = |mtu: u32| {
            format!(
                "{}[[service]]\nvip = \"203.0.113.11\"\nprotocol = \"udp\"\nport = 53\nbackends = [\n  {{ address = \"198.18.0.102\" }},\n  {{ address = \"2001:db8::101\" }},\n]\n",
                v4(mtu)
            )
        };
        assert_eq!(model(&v6(1320)).global.mtu, Some(1320));
        assert_eq!(
            err(&v6(1319)),
            "lb.toml:5: mtu 1319 is below 1320 = L4LB_MIN_MTU6 + L4LB_IP6_OVERHEAD (1280 + 40), the least with IPv6 backends \
             (here 2001:db8::101 on line 19): a packet-too-big answer advertises the MTU less the 40-byte outer IPv6 header, and may \
             not advertise less than the IPv6 minimum link MTU of 1280 (RFC 8200)"
        );
        // Below 576 the general rule is the one named.
        assert!(err(&v6(500)).starts_with("lb.toml:5: mtu 500 is below L4LB_MIN_MTU = 576"), "{}", err(&v6(500)));
        // No mtu in the file: the planner checks the running one (apply::check_mtu).
        assert_eq!(model(&v6(1320).replace("mtu = 1320\n", "")).global.mtu, None);
    }

    #[test]
    fn an_absent_hash_seed_keeps_the_running_one() {
        let running = model("[global]\nhash_seed = 7\n");
        assert!(diff(&running, &model("[global]\n")).is_empty());
        assert_eq!(
            diff(&running, &model("[global]\nhash_seed = 8\n")).global,
            [GlobalChange::HashSeed { old: Some(7), new: 8 }]
        );
        assert!(diff(&running, &running).is_empty());
    }
}
