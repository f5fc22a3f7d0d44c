//! What wakes the agent: a change in the configuration file's directory
//! (inotify) and signals (SIGHUP: apply the file again; SIGTERM, SIGINT:
//! stop). Each source is a thread that sends `Wake`s down one channel.

use std::path::Path;
use std::sync::mpsc::Sender;

use anyhow::{Context, Result};
use inotify::{Inotify, WatchMask};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// Something in the file's directory changed (the file may not have).
    DirectoryChanged,
    /// SIGHUP: apply the file again, changed or not.
    Reload,
    /// SIGTERM or SIGINT (its name): stop, leaving the datapath as it is.
    Stop(&'static str),
    /// A health probe's outcome.
    Probe(super::probes::Outcome),
}

/// Watches the directory of `file`, not the file: editors and deployment
/// tools replace a file by renaming another over it (and Kubernetes swaps a
/// symlinked directory), which a watch on the old inode would never see.
/// The agent reads the file again after a quiet moment and applies it only
/// if its bytes changed, so other files' events cost one read.
pub fn directory(file: &Path, wake: Sender<Wake>) -> Result<()> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let inotify = Inotify::init().context("inotify_init")?;
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB;
    inotify.watches().add(&dir, mask).with_context(|| format!("{}: watching the directory", dir.display()))?;
    std::thread::Builder::new().name("l4lb-watch".into()).spawn(move || {
        let mut inotify = inotify;
        let mut buffer = [0u8; 4096];
        // A read error ends the watch; SIGHUP still works.
        while let Ok(events) = inotify.read_events_blocking(&mut buffer) {
            if events.count() > 0 && wake.send(Wake::DirectoryChanged).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}

/// Turns SIGHUP, SIGTERM and SIGINT into `Wake`s (their default actions no
/// longer apply: the agent decides).
pub fn signals(wake: Sender<Wake>) -> Result<()> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).context("installing signal handlers")?;
    std::thread::Builder::new().name("l4lb-signals".into()).spawn(move || {
        for signal in signals.forever() {
            let wake_up = match signal {
                SIGHUP => Wake::Reload,
                SIGTERM => Wake::Stop("SIGTERM"),
                _ => Wake::Stop("SIGINT"),
            };
            if wake.send(wake_up).is_err() {
                return;
            }
        }
    })?;
    Ok(())
}
