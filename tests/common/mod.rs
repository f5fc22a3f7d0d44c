//! Shared by the root-only suites: run a list of tests under libtest-mimic,
//! reporting each as ignored (and saying why, once) when not root.

#![allow(dead_code)]

use libtest_mimic::{Arguments, Failed, Trial};

pub type TestFn = fn() -> Result<(), Failed>;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `tests`; exits the process with libtest's status.
pub fn run_suite(suite: &str, needs: &str, tests: Vec<(&'static str, TestFn)>) -> ! {
    let args = Arguments::from_args();
    let root = is_root();
    if !root {
        eprintln!("skipped: {suite}: {} tests need root ({needs}); not running as root", tests.len());
    }
    let trials = tests.into_iter().map(|(name, test)| Trial::test(name, test).with_ignored_flag(!root)).collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Fails the current test with a message (for use with `?`).
pub fn fail(message: impl Into<String>) -> Failed {
    Failed::from(message.into())
}

/// The result of a test or of one of its steps.
pub type TestResult<T = ()> = Result<T, Failed>;

/// `ensure!(condition, "format", args..)`: fails the test with the message
/// when the condition does not hold (`#[macro_use] mod common;` to use it).
macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            return Err(format!($($message)+).into());
        }
    };
}

pub mod flood;
pub mod http;
pub mod lb;
pub mod packet;
pub mod services;
pub mod veth;
pub mod wire;

// ---------------------------------------------------------------- checks

/// Equal bytes, or a failure naming the first difference.
pub fn same_bytes(what: &str, actual: &[u8], expected: &[u8]) -> TestResult {
    if actual == expected {
        return Ok(());
    }
    let first = actual.iter().zip(expected).position(|(a, e)| a != e).unwrap_or(actual.len().min(expected.len()));
    let window = |bytes: &[u8]| hex(&bytes[first.saturating_sub(8).min(bytes.len())..(first + 24).min(bytes.len())]);
    Err(fail(format!(
        "{what}: output differs at byte {first} (lengths {} and {} expected)\n  actual   ..{}\n  expected ..{}",
        actual.len(),
        expected.len(),
        window(actual),
        window(expected)
    )))
}

/// "0a 0b 0c": bytes in hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// "rx +1, pass +1": the counters that differ, named from `names`.
pub fn counter_moves(names: &[&str], before: &[u64], after: &[u64]) -> String {
    let moves: Vec<String> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .map(|i| format!("{} {:+}", names[i], after[i] as i128 - before[i] as i128))
        .collect();
    if moves.is_empty() {
        "none".into()
    } else {
        moves.join(", ")
    }
}

// ---------------------------------------------------------------- commands

/// How long `run` lets a command take before killing it.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A finished (or timed-out) command.
pub struct Outcome {
    pub what: String,
    /// None: killed after its timeout, or could not be started.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn describe(&self) -> String {
        format!("`{}` exited with {:?}\nstdout:\n{}\nstderr:\n{}", self.what, self.code, self.stdout, self.stderr)
    }

    pub fn success(self) -> TestResult<Self> {
        ensure!(self.code == Some(0), "expected success: {}", self.describe());
        Ok(self)
    }

    /// A clean non-zero exit (not a timeout, not a signal).
    pub fn failure(self) -> TestResult<Self> {
        ensure!(matches!(self.code, Some(code) if code != 0), "expected a non-zero exit: {}", self.describe());
        Ok(self)
    }
}

/// Runs a command with output capture and a timeout of COMMAND_TIMEOUT.
pub fn run(program: &str, args: &[&str]) -> Outcome {
    run_with(program, args, &[], COMMAND_TIMEOUT)
}

/// `ip ARGS`, which must succeed; its stdout.
pub fn ip(args: &[&str]) -> TestResult<String> {
    Ok(run("ip", args).success()?.stdout)
}

/// Runs a command with extra environment variables, output capture and a timeout.
pub fn run_with(program: &str, args: &[&str], env: &[(&str, &str)], timeout: std::time::Duration) -> Outcome {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let what = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return Outcome { what, code: None, stdout: String::new(), stderr: format!("cannot start: {err}") },
    };
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = stderr.join().unwrap_or_default();
    if code.is_none() {
        stderr.push_str(&format!("\n(killed after {timeout:?} or by a signal)"));
    }
    Outcome { what, code, stdout, stderr }
}

// ---------------------------------------------------------------- namespaces

/// Runs `f` in a thread that has entered network namespace `ns` (setns
/// affects only the calling thread). Panics in `f` are passed on.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> TestResult<T> + Send) -> TestResult<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let file = std::fs::File::open(&path).map_err(|err| fail(format!("{path}: {err}")))?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|err| fail(format!("setns {path}: {err}")))?;
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Whether `name` (`<prefix>-<pid>-...`) is left from an earlier run of a
/// suite whose process is gone (a run in another process keeps its own).
pub fn is_leftover(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("{prefix}-")) else { return false };
    let pid = rest.split('-').next().unwrap_or("");
    pid.parse::<u32>()
        .is_ok_and(|pid| pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether process `pid` runs: it exists and has not exited. A zombie
/// (state Z) has exited, freed what it held and only waits for its parent
/// (for a lab's daemons PID 1, which may reap late) to collect it.
pub fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// A lab's name prefix unique to this process and call:
/// `<prefix>-<pid>-<n>` (what `is_leftover` and `dead_labs` read back).
pub fn lab_prefix(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
}

/// The lab prefixes (`<prefix>-<pid>-<n>`, see `lab_prefix`) of earlier runs
/// whose process is gone, from their namespaces and their /run state
/// directories, for the lab script's `down`.
pub fn dead_labs(prefix: &str) -> std::collections::BTreeSet<String> {
    let lab_of = |name: &str| -> Option<String> {
        if !is_leftover(prefix, name) {
            return None;
        }
        let mut parts = name.strip_prefix(&format!("{prefix}-"))?.splitn(3, '-');
        Some(format!("{prefix}-{}-{}", parts.next()?, parts.next()?))
    };
    let mut labs = std::collections::BTreeSet::new();
    for line in run("ip", &["netns", "list"]).stdout.lines() {
        labs.extend(lab_of(line.split_whitespace().next().unwrap_or("")));
    }
    if let Ok(entries) = std::fs::read_dir("/run") {
        for entry in entries.flatten() {
            labs.extend(lab_of(&entry.file_name().to_string_lossy()));
        }
    }
    labs
}

/// Deletes the network namespaces `<prefix>-<pid>-...` of earlier runs whose
/// process is gone.
pub fn remove_leftover_namespaces(prefix: &str) {
    for line in run("ip", &["netns", "list"]).stdout.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if is_leftover(prefix, name) {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// Deletes what earlier runs of a suite whose process is gone left behind:
/// namespaces `<prefix>-<pid>-...` and scratch directories of that name in
/// the temporary directory.
pub fn remove_leftovers(prefix: &str) {
    remove_leftover_namespaces(prefix);
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if is_leftover(prefix, &entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The MAC address of `dev` in namespace `ns`.
pub fn link_mac(ns: &str, dev: &str) -> TestResult<[u8; 6]> {
    let json: serde_json::Value = serde_json::from_str(&ip(&["-n", ns, "-j", "link", "show", "dev", dev])?)?;
    let text = json[0]["address"].as_str().ok_or_else(|| fail(format!("no MAC for {dev} in {json}")))?;
    Ok(text.parse::<macaddr::MacAddr6>()?.into_array())
}
