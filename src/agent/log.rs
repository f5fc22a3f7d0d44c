//! The agent's log: one line per event on standard error (the journal's
//! input under systemd), as text for a person or as one JSON object per line
//! for a log shipper. The lines are built by pure functions, tested here.

use std::io::Write;
use std::time::SystemTime;

use clap::ValueEnum;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL DEV EVENT: message`
    Text,
    /// One JSON object per line: time, level, interface, event, message and the event's fields
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// One event: what happened (`event`, a fixed word such as `applied`), what a
/// person reads (`message`, one line), and fields for machines.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub level: Level,
    pub event: &'static str,
    pub message: String,
    pub fields: Map<String, Value>,
}

impl Event {
    pub fn new(level: Level, event: &'static str, message: impl Into<String>) -> Event {
        Event { level, event, message: message.into(), fields: Map::new() }
    }

    pub fn info(event: &'static str, message: impl Into<String>) -> Event {
        Event::new(Level::Info, event, message)
    }

    pub fn error(event: &'static str, message: impl Into<String>) -> Event {
        Event::new(Level::Error, event, message)
    }

    /// The event with one more field.
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Event {
        self.fields.insert(name.to_string(), value.into());
        self
    }
}

/// Writes events of one interface's agent.
pub struct Log {
    format: LogFormat,
    interface: String,
}

impl Log {
    pub fn new(format: LogFormat, interface: &str) -> Log {
        Log { format, interface: interface.to_string() }
    }

    /// One write(2) per line, newline included (`eprintln!` writes the
    /// line and its newline separately): a reader of the log file sees a
    /// line whole, or as the one unterminated line at the end while the
    /// kernel copies it in.
    pub fn write(&self, event: Event) {
        let mut text = line(self.format, SystemTime::now(), &self.interface, &event);
        text.push('\n');
        // Nowhere to report a failed log write to.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// The line of `event` at `time`: text, or a JSON object whose first keys
/// are time, level, interface, event and message (an event's field of one of
/// those names is left out rather than allowed to hide them).
pub fn line(format: LogFormat, time: SystemTime, interface: &str, event: &Event) -> String {
    let time = humantime::format_rfc3339_millis(time).to_string();
    // One line whatever the message holds.
    let message = event.message.replace('\n', "; ");
    match format {
        LogFormat::Text => format!("{time} {} {interface} {}: {message}", event.level.name(), event.event),
        LogFormat::Json => {
            let mut object = Map::new();
            object.insert("time".into(), time.into());
            object.insert("level".into(), event.level.name().into());
            object.insert("interface".into(), interface.into());
            object.insert("event".into(), event.event.into());
            object.insert("message".into(), message.into());
            for (name, value) in &event.fields {
                if !object.contains_key(name) {
                    object.insert(name.clone(), value.clone());
                }
            }
            Value::Object(object).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_796_565_600_123)
    }

    #[test]
    fn text_lines_are_one_line_with_time_level_interface_and_event() {
        let event = Event::info("applied", "generation 2: + service 192.0.2.1:80/tcp\n1 service added");
        assert_eq!(
            line(LogFormat::Text, at(), "eth0", &event),
            "2026-12-06T14:00:00.123Z info eth0 applied: generation 2: + service 192.0.2.1:80/tcp; 1 service added"
        );
        let refused = Event::error("refused", "lb.toml:3: unknown key `prot`");
        assert_eq!(
            line(LogFormat::Text, at(), "eth0", &refused),
            "2026-12-06T14:00:00.123Z error eth0 refused: lb.toml:3: unknown key `prot`"
        );
    }

    #[test]
    fn json_lines_carry_the_fields_and_keep_the_fixed_keys_first() {
        let event = Event::info("applied", "two\nlines")
            .with("generation", 2)
            .with("changes", vec!["+ a", "- b"])
            .with("event", "hidden");
        let text = line(LogFormat::Json, at(), "eth0", &event);
        assert!(!text.contains('\n'), "{text}");
        assert_eq!(
            text,
            r#"{"time":"2026-12-06T14:00:00.123Z","level":"info","interface":"eth0","event":"applied","message":"two; lines","generation":2,"changes":["+ a","- b"]}"#
        );
    }
}
