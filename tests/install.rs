//! `make install` and `make uninstall` into a scratch DESTDIR (no root
//! needed): the binary, the standalone object, a manual page for l4lb and
//! for every subcommand, the shell completions, the agent's systemd unit
//! (verified by `systemd-analyze verify`) and the documentation land where
//! the Makefile says; uninstall takes every one of them away again.
//! The scratch directory goes even when an assertion fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

const BIN: &str = env!("CARGO_BIN_EXE_l4lb");

/// Removes the scratch directory on the way out, passed or failed.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `make TARGET` with the binary this test was built with: CARGO=true keeps
/// make from building again (the suite already built everything).
fn make(target: &str, destdir: &Path) {
    let out = Command::new("make")
        .args(["--no-print-directory", "-C", env!("CARGO_MANIFEST_DIR"), target])
        .arg(format!("DESTDIR={}", destdir.display()))
        .args(["PREFIX=/usr", "CARGO=true"])
        .arg(format!("L4LB_BIN={BIN}"))
        .output()
        .expect("running make");
    assert!(
        out.status.success(),
        "make {target} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every manual page clap_mangen writes: l4lb.1, then l4lb-SUB.1 and
/// l4lb-SUB-SUBSUB.1 for each subcommand.
fn manual_pages() -> Vec<String> {
    fn walk(command: &clap::Command, name: &str, pages: &mut Vec<String>) {
        pages.push(format!("{name}.1"));
        for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{name}-{}", sub.get_name()), pages);
        }
    }
    let mut pages = Vec::new();
    walk(&l4lb::cli::Cli::command(), "l4lb", &mut pages);
    pages
}

#[test]
fn make_install_then_uninstall() {
    let scratch = Scratch(std::env::temp_dir().join(format!("l4lbt-install-{}", std::process::id())));
    let root = scratch.0.clone();
    make("install", &root);
    let usr = root.join("usr");

    let bin = usr.join("bin/l4lb");
    let version = Command::new(&bin).arg("--version").output().expect("running the installed l4lb");
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("l4lb {}", env!("CARGO_PKG_VERSION")));

    let object = std::fs::read(usr.join("lib/l4lb/l4lb_xdp.o")).expect("the installed object");
    let built = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("l4lb_xdp.o")).expect("the built object");
    assert!(object == built, "the installed l4lb_xdp.o is not the one make built");

    let pages = manual_pages();
    assert!(pages.len() >= 15, "only {} manual pages: {pages:?}", pages.len());
    for page in &pages {
        let text =
            std::fs::read_to_string(usr.join("share/man/man1").join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains("\n.TH "), "{page} is not a roff manual page");
        assert!(text.contains("Example: l4lb"), "{page} gives no example");
    }

    for (file, marker) in [
        ("share/bash-completion/completions/l4lb", "complete -F"),
        ("share/zsh/site-functions/_l4lb", "#compdef l4lb"),
        ("share/fish/vendor_completions.d/l4lb.fish", "complete -c l4lb"),
    ] {
        let text = std::fs::read_to_string(usr.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(marker) && text.contains("apply"), "{file} is not l4lb's completion script");
    }

    check_unit(&usr, &root);

    for doc in ["README.md", "docs/commands.md", "docs/transitions.md"] {
        assert!(usr.join("share/doc/l4lb").join(doc).is_file(), "{doc} is not installed");
    }

    make("uninstall", &root);
    let mut left = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("listing the scratch directory").flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            } else {
                left.push(entry.path());
            }
        }
    }
    assert!(left.is_empty(), "make uninstall left {left:?}");
}

/// The installed unit runs the installed binary's `serve` with the
/// instance's interface and file; an instance of it, pointed at the binary
/// in DESTDIR, passes `systemd-analyze verify` without a warning.
fn check_unit(usr: &Path, root: &Path) {
    let unit = std::fs::read_to_string(usr.join("lib/systemd/system/l4lb@.service")).expect("the installed unit");
    let exec = "ExecStart=/usr/bin/l4lb serve -i %i -c /etc/l4lb/%i.toml $L4LB_SERVE_ARGS";
    assert!(unit.lines().any(|line| line == exec), "the unit does not run `{exec}`:\n{unit}");
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"), "reload must be SIGHUP");
    let instance = root.join("l4lb@l4lbt0.service");
    let bin = usr.join("bin/l4lb");
    std::fs::write(&instance, unit.replace("/usr/bin/l4lb", &bin.display().to_string())).expect("writing");
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&instance)
        .output()
        .expect("running systemd-analyze (scripts/install-deps.sh installs systemd)");
    let said = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    std::fs::remove_file(&instance).expect("removing the instance");
}
