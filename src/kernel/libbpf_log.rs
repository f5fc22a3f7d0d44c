//! libbpf's messages (verifier log included) are kept, not printed, so that a
//! refusal becomes one clear error carrying the log's last lines.

use std::sync::Mutex;

use libbpf_rs::PrintLevel;

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn keep(_level: PrintLevel, message: String) {
    if let Ok(mut log) = LOG.lock() {
        log.extend(message.lines().map(str::to_string));
    }
}

/// Starts capturing libbpf's messages (warnings and the verifier log).
pub fn capture() {
    libbpf_rs::set_print(Some((PrintLevel::Info, keep)));
}

/// The last `n` non-empty captured lines, indented, for an error message.
pub fn tail(n: usize) -> String {
    let log = LOG.lock().map(|l| l.clone()).unwrap_or_default();
    let lines: Vec<&String> = log.iter().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| format!("\n  {l}")).collect()
}
