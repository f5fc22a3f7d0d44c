//! The health probes: one thread per probed backend of a service, each
//! probing every interval and sending its outcome to the agent's loop. A
//! probe is a TCP connection (and for `http`, a GET) to the service's VIP
//! from a socket marked for the backend's probe route (crate::probe_path):
//! the balancer encapsulates it to that backend as it would a client's
//! packet, so the probe passes only if the backend's host, its
//! decapsulation, its VIP binding and its server all work.
//!
//! A probe also needs the balancer's own link: while that is down, every
//! probe fails, and the backends would go down one by one as their probes
//! happen to time out, leaving the balancer a partial table when its link
//! comes back. So each prober reads the link's state before and after its
//! probe, and a probe during which the link was down or lost its carrier
//! says nothing about the backend (`Outcome::link_down`): it is not counted.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::watch::Wake;
use crate::health::{Check, CheckKind, Target};
use crate::iface::{Interface, LinkState};

/// One probe's outcome: its latency, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub target: Target,
    /// Which set of probers sent it: outcomes of a replaced set are ignored.
    pub round: u64,
    /// When the probe started.
    pub started: Instant,
    pub result: Result<Duration, String>,
    /// Why the probe says nothing about its backend, if it does not: the
    /// balancer's link was down, or went down (and maybe up), while it ran.
    pub link_down: Option<String>,
}

/// The running probers; dropping it stops them (each within an interval).
pub struct Probers {
    pub round: u64,
    _stops: Vec<Sender<()>>,
}

impl Probers {
    /// No prober.
    pub fn none() -> Probers {
        Probers { round: 0, _stops: Vec::new() }
    }

    /// Starts one prober per (target, check, mark), numbered `round`,
    /// probing out of `iface`.
    pub fn start(
        round: u64,
        targets: Vec<(Target, Check, u32)>,
        iface: &Interface,
        wake: &Sender<Wake>,
    ) -> std::io::Result<Probers> {
        let mut stops = Vec::new();
        for (target, check, mark) in targets {
            let (stop, stopped) = mpsc::channel::<()>();
            let (wake, iface) = (wake.clone(), iface.clone());
            std::thread::Builder::new().name("l4lb-probe".into()).spawn(move || loop {
                // Probes start an interval apart, however long each took:
                // a dead backend is down within fall x interval + timeout.
                let started = Instant::now();
                let before = iface.link_state();
                let result = probe(&target, &check, mark);
                // A link state that cannot be read leaves the probe
                // counted: the agent then judges by the probes alone.
                let link_down = match (before, iface.link_state()) {
                    (Ok(before), Ok(after)) => link_down(&iface.name, before, after),
                    _ => None,
                };
                if wake.send(Wake::Probe(Outcome { target, round, started, result, link_down })).is_err() {
                    return;
                }
                match stopped.recv_timeout(check.interval.saturating_sub(started.elapsed())) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
            stops.push(stop);
        }
        Ok(Probers { round, _stops: stops })
    }
}

/// One probe of `target` (the whole probe within the check's timeout).
pub fn probe(target: &Target, check: &Check, mark: u32) -> Result<Duration, String> {
    let started = Instant::now();
    let vip = match target.service {
        crate::config::ServiceKey::Vip { addr, .. } => addr,
        crate::config::ServiceKey::CatchAll => return Err("the catch-all service has no VIP to probe".into()),
    };
    let addr = SocketAddr::new(vip, check.port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|err| format!("socket: {err}"))?;
    socket.set_mark(mark).map_err(|err| format!("SO_MARK {mark:#x}: {err}"))?;
    socket.connect_timeout(&addr.into(), check.timeout).map_err(|err| connect_error(err, check.timeout))?;
    if let CheckKind::Http { path, status } = &check.kind {
        let left = check.timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        let mut stream: std::net::TcpStream = socket.into();
        http_get(&mut stream, vip, path, *status, left)?;
    }
    Ok(started.elapsed())
}

/// Whether the balancer's link is down, as the probes saw it: the state
/// is that of the probe started last. (Outcomes come in the order the
/// probes ended, and a probe that started before the link came back may
/// end after one that started after.)
#[derive(Debug, Default)]
pub struct LinkWatch {
    down: bool,
    /// When the probe that set `down` started.
    seen: Option<Instant>,
}

impl LinkWatch {
    /// A probe started at `started` found the link `down` or not: the new
    /// state if that changes it.
    pub fn see(&mut self, started: Instant, down: bool) -> Option<bool> {
        if self.seen.is_some_and(|seen| started < seen) {
            return None;
        }
        self.seen = Some(started);
        let changed = down != self.down;
        self.down = down;
        changed.then_some(down)
    }
}

/// Why a probe that ran while the balancer's link went from `before` to
/// `after` says nothing about its backend, if it does not.
fn link_down(dev: &str, before: LinkState, after: LinkState) -> Option<String> {
    if !after.up {
        Some(format!("{dev} is down"))
    } else if !before.up {
        Some(format!("{dev} came up during the probe"))
    } else if before.carrier_changes != after.carrier_changes {
        Some(format!("{dev} lost its carrier during the probe"))
    } else {
        None
    }
}

fn connect_error(err: std::io::Error, timeout: Duration) -> String {
    match err.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            format!("connect: no answer within {} s", timeout.as_secs_f64())
        }
        _ => format!("connect: {err}"),
    }
}

/// Sends `GET path` and checks the status line's code against `expected`.
fn http_get(
    stream: &mut std::net::TcpStream,
    vip: IpAddr,
    path: &str,
    expected: u16,
    timeout: Duration,
) -> Result<(), String> {
    let host = match vip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    stream.set_read_timeout(Some(timeout)).map_err(|err| format!("http: {err}"))?;
    stream.set_write_timeout(Some(timeout)).map_err(|err| format!("http: {err}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: l4lb-health\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|err| format!("http: sending the request: {err}"))?;
    // The status line fits in the first read of any server worth probing;
    // read until its end or 512 bytes.
    let mut head = Vec::new();
    let mut buffer = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 512 {
        let n = stream.read(&mut buffer).map_err(|err| match err.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                format!("http: no answer within {} s", timeout.as_secs_f64())
            }
            _ => format!("http: reading the answer: {err}"),
        })?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let code = status_code(&head).ok_or_else(|| {
        let line = String::from_utf8_lossy(&head);
        format!("http: no status line in the answer ({:?})", line.lines().next().unwrap_or(""))
    })?;
    if code != expected {
        return Err(format!("http: status {code}, expected {expected}"));
    }
    Ok(())
}

/// The code of an HTTP status line (`HTTP/1.1 200 OK`).
fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = words.next()?;
    (code.len() == 3).then_some(())?;
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_counts_only_if_the_link_stayed_up_throughout() {
        let up = |carrier_changes| LinkState { up: true, carrier_changes };
        let down = |carrier_changes| LinkState { up: false, carrier_changes };
        assert_eq!(link_down("lb2", up(2), up(2)), None);
        assert_eq!(link_down("lb2", up(2), down(3)).as_deref(), Some("lb2 is down"));
        assert_eq!(link_down("lb2", down(3), down(3)).as_deref(), Some("lb2 is down"));
        assert_eq!(link_down("lb2", down(3), up(4)).as_deref(), Some("lb2 came up during the probe"));
        // Down and up again while the probe waited for its answer.
        assert_eq!(link_down("lb2", up(2), up(4)).as_deref(), Some("lb2 lost its carrier during the probe"));
    }

    #[test]
    fn the_link_is_as_the_probe_started_last_found_it() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut link = LinkWatch::default();
        assert_eq!(link.see(at(0), false), None, "up from the start: nothing to say");
        assert_eq!(link.see(at(1000), true), Some(true), "down");
        assert_eq!(link.see(at(1001), true), None, "still down");
        // Back at 1999: a probe started at 2000 ends first, one started at
        // 1998 (while it was down) ends 0.5 s later, timed out.
        assert_eq!(link.see(at(2000), false), Some(false), "up");
        assert_eq!(link.see(at(1998), true), None, "an older probe does not take it down again");
        assert_eq!(link.see(at(3000), false), None);
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc OK\r\n"), None);
        assert_eq!(status_code(b""), None);
    }
}
