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
    let trials = tests
        .into_iter()
        .map(|(name, test)| Trial::test(name, test).with_ignored_flag(!root))
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// Fails the current test with a message (for use with `?`).
pub fn fail(message: impl Into<String>) -> Failed {
    Failed::from(message.into())
}
