//! `l4lb top`: a live view of one balancer in the terminal. Every interval
//! a stats sample is taken and turned into a `stats::Report`; the view keeps
//! a short history of each service's and backend's packet rate and draws
//! them as text sparklines beside the rates, with the datapath's drops by
//! reason below. Where an agent probes the backends, their health comes
//! from the state it publishes (health::Published): up, or DOWN, with the
//! down backends the agent took out of the datapath listed too. The drawing
//! is a pure function of the view (tested on ratatui's test backend); `run`
//! owns the terminal.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::Frame;

use crate::health::Published;
use crate::stats::{self, thousands, Report, Sample};

/// Rates kept per row: enough for the widest terminal's sparkline.
const HISTORY: usize = 240;
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Width of the columns before the sparkline.
const FIXED: [u16; 6] = [30, 7, 6, 13, 15, 6];

/// What the view shows: the last report and the rates before it.
pub struct View {
    pub title: String,
    pub report: Option<Report>,
    /// The agent's health state, where one probes.
    pub health: Option<Published>,
    /// Packet rates, oldest first, by row key (`service` or `service backend`).
    history: BTreeMap<String, VecDeque<f64>>,
}

impl View {
    pub fn new(title: String) -> View {
        View { title, report: None, health: None, history: BTreeMap::new() }
    }

    /// `up`, `DOWN`, or empty (not probed) for a backend of a service.
    fn health_of(&self, service: &str, backend: std::net::IpAddr) -> &'static str {
        match self.health.as_ref().and_then(|h| h.state(service, backend)) {
            Some(true) => "up",
            Some(false) => "DOWN",
            None => "",
        }
    }

    /// Takes a new report; rows that left the configuration lose their history.
    pub fn update(&mut self, report: Report) {
        let mut history = BTreeMap::new();
        for service in &report.services {
            let mut keep = |key: String, pps: f64| {
                let mut rates = self.history.remove(&key).unwrap_or_default();
                if rates.len() == HISTORY {
                    rates.pop_front();
                }
                rates.push_back(pps);
                history.insert(key, rates);
            };
            keep(service.service.clone(), service.traffic.pps);
            for backend in &service.backends {
                keep(format!("{} {}", service.service, backend.addr), backend.traffic.pps);
            }
        }
        self.history = history;
        self.report = Some(report);
    }

    fn sparkline(&self, key: &str, width: usize) -> String {
        let Some(rates) = self.history.get(key) else { return String::new() };
        let shown: Vec<f64> = rates.iter().rev().take(width).rev().copied().collect();
        let top = shown.iter().copied().fold(0.0, f64::max);
        shown.iter().map(|&r| if top <= 0.0 { SPARKS[0] } else { SPARKS[((r / top) * 7.0).round() as usize] }).collect()
    }
}

/// Draws the whole view into `frame`, fitted to its size.
pub fn draw(frame: &mut Frame, view: &View) {
    let [head, table, drops] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(4)]).areas(frame.area());
    let Some(report) = &view.report else {
        frame.render_widget(Paragraph::new(format!("{}\nwaiting for the first interval ...", view.title)), head);
        return;
    };
    let totals = &report.totals;
    let rate = |name: &str| report.counter_rates.get(name).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let dropped: f64 =
        report.counter_rates.iter().filter(|(k, _)| k.starts_with("drop_")).filter_map(|(_, v)| v.as_f64()).sum();
    let summary = format!(
        "sent {} pkts/s {}  received {} pkts/s  passed {} pkts/s  dropped {} pkts/s",
        thousands(totals.pps),
        bits(totals.bps),
        thousands(rate("rx")),
        thousands(rate("pass") + rate("pass_no_service")),
        thousands(dropped)
    );
    let header = Paragraph::new(vec![
        Line::styled(view.title.clone(), Style::new().add_modifier(Modifier::BOLD)),
        Line::raw(summary),
        Line::raw(format!("every {:.1} s; q quits", report.interval_s)),
    ]);
    frame.render_widget(header, head);
    frame.render_widget(services_table(view, report, table), table);
    frame.render_widget(drops_text(report), drops);
}

/// Services, each followed by its backends: weight, rates, share of the
/// service's packets and the rate's recent history.
fn services_table<'a>(view: &View, report: &Report, area: Rect) -> Table<'a> {
    let fixed: u16 = FIXED.iter().sum::<u16>() + FIXED.len() as u16;
    let spark_width = area.width.saturating_sub(fixed + 2) as usize;
    let mut rows = Vec::new();
    for service in &report.services {
        rows.push(
            Row::new(vec![
                stats::service_label(&service.key),
                String::new(),
                String::new(),
                thousands(service.traffic.pps),
                bits(service.traffic.bps),
                String::new(),
                view.sparkline(&service.service, spark_width),
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        );
        for backend in &service.backends {
            let share = if service.traffic.pps > 0.0 { 100.0 * backend.traffic.pps / service.traffic.pps } else { 0.0 };
            let weight = if backend.weight == 0 { "0 drain".to_string() } else { backend.weight.to_string() };
            rows.push(Row::new(vec![
                format!("  {}", backend.addr),
                weight,
                view.health_of(&service.service, backend.addr).to_string(),
                thousands(backend.traffic.pps),
                bits(backend.traffic.bps),
                format!("{share:.0}%"),
                view.sparkline(&format!("{} {}", service.service, backend.addr), spark_width),
            ]));
        }
        // Down backends the agent took out: not in the datapath, still in the file.
        let taken_out =
            view.health.iter().flat_map(|h| &h.backends).filter(|b| {
                !b.up && b.service == service.service && service.backends.iter().all(|r| r.addr != b.backend)
            });
        for down in taken_out {
            rows.push(Row::new(vec![
                format!("  {}", down.backend),
                "-".to_string(),
                "DOWN".to_string(),
                "taken out".to_string(),
                String::new(),
                String::new(),
                down.error.clone().unwrap_or_default(),
            ]));
        }
    }
    let widths = FIXED.iter().map(|&w| Constraint::Length(w)).chain([Constraint::Fill(1)]);
    Table::new(rows, widths)
        .header(
            Row::new(["Service / backend", "weight", "health", "pkts/s", "bits/s", "share", "pkts/s, recent"])
                .style(Style::new().add_modifier(Modifier::UNDERLINED)),
        )
        .block(Block::new().borders(Borders::TOP))
}

/// The drop counters that moved or ever counted: rate and total.
fn drops_text<'a>(report: &Report) -> Paragraph<'a> {
    let mut parts = Vec::new();
    for (name, total) in report.counters.iter().filter(|(k, _)| k.starts_with("drop_")) {
        let total = total.as_u64().unwrap_or(0);
        let rate = report.counter_rates.get(name).and_then(|v| v.as_f64()).unwrap_or(0.0);
        if total > 0 || rate > 0.0 {
            parts.push(format!("{} {}/s ({})", name.trim_start_matches("drop_"), thousands(rate), total));
        }
    }
    let text = if parts.is_empty() { "none".to_string() } else { parts.join("  ") };
    Paragraph::new(format!("Drops: {text}"))
        .wrap(ratatui::widgets::Wrap { trim: true })
        .block(Block::new().borders(Borders::TOP))
}

fn bits(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

/// Runs the view on the terminal until q, Esc or Ctrl-C: a sample every
/// `interval` (`take`), redrawn at once when the terminal is resized.
pub fn run(
    title: String,
    mode: crate::discover::Mode,
    interval: Duration,
    mut take: impl FnMut() -> Result<Sample>,
    mut health: impl FnMut() -> Option<Published>,
) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        bail!("l4lb top draws on a terminal and standard output is not one: use `l4lb stats` (or --json) instead");
    }
    let mut view = View::new(title);
    let mut before = take()?;
    let mut taken = Instant::now();
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        loop {
            terminal.draw(|frame| draw(frame, &view)).context("drawing")?;
            let wait = interval.saturating_sub(taken.elapsed());
            if event::poll(wait).context("reading the terminal")? {
                match event::read().context("reading the terminal")? {
                    Event::Key(key) if key.kind == KeyEventKind::Press => {
                        let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(());
                        }
                    }
                    _ => {} // a resize: drawn again at the top of the loop
                }
            }
            if taken.elapsed() >= interval {
                let now = take()?;
                let at = Instant::now();
                view.update(stats::report(mode, &before, &now, at - taken));
                view.health = health();
                (before, taken) = (now, at);
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Protocol, ServiceKey};
    use crate::discover::Mode;
    use crate::stats::{BackendSample, Counts, ServiceSample};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn sample(packets: [u64; 2], dropped: u64) -> Sample {
        let key = ServiceKey::Vip { addr: "203.0.113.10".parse().unwrap(), protocol: Protocol::Tcp, port: 80 };
        let backend = |n: u32, addr: &str, weight, packets| BackendSample {
            number: n,
            backend: Backend { addr: addr.parse().unwrap(), mac: None, weight },
            counts: Counts { packets, bytes: packets * 100 },
        };
        let mut counters = vec![0u64; crate::bpf::COUNTER_NAMES.len()];
        let at = |name: &str| crate::bpf::COUNTER_NAMES.iter().position(|n| *n == name).unwrap();
        counters[at("drop_bad_csum")] = dropped;
        counters[at("tx")] = packets[0] + packets[1];
        Sample {
            services: vec![ServiceSample {
                number: 1,
                key,
                counts: Counts { packets: packets[0] + packets[1], bytes: (packets[0] + packets[1]) * 100 },
                backends: vec![backend(0, "198.18.0.101", 1, packets[0]), backend(1, "198.18.0.102", 0, packets[1])],
            }],
            counters,
        }
    }

    fn screen(view: &View, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| draw(frame, view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| (0..width).map(|x| buffer[(x, y)].symbol().to_string()).collect::<String>().trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_view_shows_rates_shares_history_and_drops_and_fits_the_terminal() {
        let mut view = View::new("l4lb top: eth0".into());
        let second = Duration::from_secs(1);
        view.update(stats::report(Mode::Driver, &sample([0, 0], 0), &sample([300, 100], 0), second));
        view.update(stats::report(Mode::Driver, &sample([300, 100], 0), &sample([900, 200], 5), second));
        let wide = screen(&view, 120, 16);
        assert!(wide.contains("l4lb top: eth0"), "{wide}");
        let service = wide.lines().find(|l| l.starts_with("203.0.113.10:80/tcp")).expect(&wide);
        assert!(service.contains("700") && service.ends_with("▅█"), "{service}");
        let first = wide.lines().find(|l| l.starts_with("  198.18.0.101")).expect(&wide);
        assert!(first.contains("600") && first.contains("86%") && first.ends_with("▅█"), "{first}");
        let drained = wide.lines().find(|l| l.starts_with("  198.18.0.102")).expect(&wide);
        assert!(drained.contains("0 drain") && drained.contains("14%"), "{drained}");
        assert!(wide.contains("Drops: bad_csum 5/s (5)"), "{wide}");
        // With an agent's health state: probed backends say up or DOWN, and
        // one it took out of the datapath is listed.
        let backend = |addr: &str, up, error: Option<&str>| crate::health::PublishedBackend {
            service: "203.0.113.10:80/tcp".into(),
            backend: addr.parse().unwrap(),
            up,
            error: error.map(String::from),
        };
        view.health = Some(Published {
            pid: 1,
            backends: vec![
                backend("198.18.0.101", true, None),
                backend("198.18.0.103", false, Some("connect: Connection refused")),
            ],
        });
        let wide = screen(&view, 120, 16);
        let first = wide.lines().find(|l| l.starts_with("  198.18.0.101")).expect(&wide);
        assert!(first.contains(" up "), "{first}");
        let out = wide.lines().find(|l| l.starts_with("  198.18.0.103")).expect(&wide);
        assert!(out.contains("DOWN") && out.contains("taken out") && out.contains("connect: Connection"), "{out}");
        // A narrow terminal: every line within its width, the rows still there.
        let narrow = screen(&view, 70, 16);
        assert!(narrow.lines().all(|l| l.chars().count() <= 70), "{narrow}");
        assert!(narrow.contains("198.18.0.102"), "{narrow}");
    }
}
