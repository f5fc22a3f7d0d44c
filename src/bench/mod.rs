//! `l4lb bench`: the throughput benchmark.
//!
//! A generator on one end of a veth pair (two private network namespaces,
//! `l4lbb-<pid>-gen` and `-lb`) sends frames with random client addresses
//! and ports to the other end and turns every frame that comes back into the
//! next one: a ring of frames (`ring`).
//! On the other end runs, in turn, l4lb (loaded and configured through the
//! product path: `attach`, then `apply::plan` + `apply::execute` with five
//! services: an IPv4 VIP for TCP and for UDP, an IPv4 VIP with IPv6
//! backends, an IPv6 VIP, the catch-all; 512 backends each, tracking flows),
//! a second l4lb with the same services untracked (`track_flows = false`:
//! what connection tracking costs), or one of two floors measured in the
//! same run: the plain floor (count, XDP_TX) and the
//! encapsulation floor (count, push the outer IPv4 or IPv6 header the row's
//! backends need, XDP_TX). What comes back is counted by the generator.
//! The programs are in src/bpf/l4lb_bench.bpf.c.
//!
//! Pure parts: `frames` (what the generator sends), `report` (statistics,
//! ratios, tables, JSON), `chart` (SVG). Syscall parts: `sys`, `ring`, `live`.

pub mod chart;
pub mod frames;
mod live;
pub mod report;
pub mod ring;
mod sys;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};

use report::{Context, Results, TARGET};

#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, non_snake_case)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/l4lb_bench.skel.rs"));
}

/// What `l4lb bench` was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub rounds: usize,
    pub seconds: f64,
    pub chart: Option<PathBuf>,
    pub json: bool,
    /// Also measure l4lb's stages one by one (`--variants`).
    pub variants: bool,
    /// Size of the tracked l4lb's flow table (`--flow-entries`; None: attach's default).
    pub flow_entries: Option<u32>,
}

/// `--seconds`: 0.1 to 60 seconds per program, packet kind and round.
pub fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=60.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("`{text}` is not a duration between 0.1 and 60 seconds")),
    }
}

/// Programs measured per row: l4lb tracked and untracked, the two floors.
const PROGRAMS_PER_KIND: usize = 4;

/// Rough length of a run, seconds: rounds (with the flow warm-ups), the bpf
/// stats phase, setup.
pub fn estimated_seconds(rounds: usize, seconds: f64, variants: bool) -> f64 {
    let kinds = frames::Kind::ALL.len() as f64;
    let per_kind = PROGRAMS_PER_KIND as f64;
    let programs = kinds * per_kind + if variants { 16.0 } else { 0.0 };
    rounds as f64 * (programs * seconds * 1.35 + 0.5) + kinds * per_kind * (seconds.min(0.5) + 0.15) + 8.0
}

pub fn run(options: &Options) -> Result<()> {
    sys::catch_interrupts();
    eprintln!(
        "l4lb bench: {} rounds x {} packet kinds x {} programs x {} s, about {:.0} s in all",
        options.rounds,
        frames::Kind::ALL.len(),
        PROGRAMS_PER_KIND,
        options.seconds,
        estimated_seconds(options.rounds, options.seconds, options.variants)
    );
    let load_before = load_average();
    let date = utc_date_time(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    let measured = live::measure(options)?;
    let results = Results {
        context: Context {
            cpu: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
            date,
            command: command_line(),
            generator_cpu: measured.generator_cpu,
            rounds: options.rounds,
            seconds: options.seconds,
            load_before,
            load_after: load_average(),
        },
        target_share_of_encap_floor: TARGET,
        kinds: measured.kinds,
        program_sizes: measured.sizes,
        stats_overhead_ns: measured.stats_overhead_ns,
        control_plane: measured.control,
        l4lb_counts: measured.counts,
        l4lb_untracked_counts: measured.untracked_counts,
        flow_entries: options.flow_entries.unwrap_or(crate::bpf::FLOW_ENTRIES_DEFAULT),
        variants: measured.variants,
    };
    if let Some(path) = &options.chart {
        let svg = chart::svg(&results).map_err(anyhow::Error::msg)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, svg).with_context(|| format!("writing the chart to {}", path.display()))?;
        eprintln!("l4lb bench: chart written to {}", path.display());
    }
    if options.json {
        println!("{}", serde_json::to_string(&results).expect("results serialise"));
    } else {
        print!("{}", report::render(&results));
    }
    Ok(())
}

fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|p| std::path::Path::new(&p).file_name().map_or(p.clone(), |name| name.to_string_lossy().into_owned()));
    program.into_iter().chain(args).collect::<Vec<_>>().join(" ")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// "YYYY-MM-DD HH:MM UTC" of a Unix time (civil-from-days, proleptic Gregorian).
pub fn utc_date_time(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let minutes = (unix_seconds % 86_400) / 60;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", minutes / 60, minutes % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_date_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date_time(1_795_000_000), "2026-11-18 11:06 UTC");
    }

    #[test]
    fn seconds_are_bounded_and_the_default_run_is_short() {
        assert_eq!(parse_seconds("1"), Ok(1.0));
        assert!(parse_seconds("0.05").is_err());
        assert!(parse_seconds("61").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(estimated_seconds(4, 1.0, false) < 300.0, "{}", estimated_seconds(4, 1.0, false));
    }
}
