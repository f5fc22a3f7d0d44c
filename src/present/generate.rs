//! What is generated from the command line's own definition (`crate::cli`),
//! so that it cannot drift from it: shell completions, manual pages, and
//! the command reference in docs/commands.md.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "l4lb", out);
}

/// Writes l4lb.1 and one page per subcommand (l4lb-attach.1,
/// l4lb-decap-attach.1, ...) into `dir`, which must exist.
pub fn man_pages(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing the manual pages into {}", dir.display()))
}

/// The command reference (docs/commands.md): every command's `--help`, in
/// the order the command line lists them.
pub fn command_reference() -> String {
    let mut text = String::from(
        "# Commands\n\n\
         <!-- Generated from src/present/cli.rs by `cargo test --lib generate` (L4LB_BLESS=1 rewrites it): do not edit. -->\n\n\
         Every command's `--help`, as the binary prints it. The same text is in the manual pages\n\
         (`man l4lb`, `man l4lb-apply`, ...) that `make install` installs.\n",
    );
    let mut command = Cli::command().term_width(100);
    command.build();
    reference_of(&command, "l4lb", &mut text);
    text
}

fn reference_of(command: &clap::Command, path: &str, text: &mut String) {
    let mut command = command.clone();
    let help: String = command.render_long_help().to_string().lines().map(|l| format!("{}\n", l.trim_end())).collect();
    let heading = if path == "l4lb" { "## l4lb".to_string() } else { format!("## {path}") };
    let _ = write!(text, "\n{heading}\n\n```text\n{}\n```\n", help.trim_end());
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        reference_of(sub, &format!("{path} {}", sub.get_name()), text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and subcommand shows one example in its --help.
    #[test]
    fn every_command_has_an_example() {
        fn check(command: &clap::Command, path: &str) {
            let help = command.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("Example: l4lb"), "`{path} --help` gives no example");
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "l4lb");
    }

    /// docs/commands.md is what the command line says today. After a change
    /// of src/present/cli.rs: L4LB_BLESS=1 cargo test --lib generate.
    #[test]
    fn command_reference_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/commands.md");
        let wanted = command_reference();
        if std::env::var_os("L4LB_BLESS").is_some() {
            std::fs::write(&path, &wanted).expect("writing docs/commands.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == wanted,
            "docs/commands.md differs from the command line's definition: regenerate it with \
             `L4LB_BLESS=1 cargo test --lib generate` and commit it"
        );
    }

    /// A scratch directory, removed when dropped (also when a check fails).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let scratch = Scratch(std::env::temp_dir().join(format!("l4lb-man-test-{}", std::process::id())));
        let dir = scratch.0.clone();
        std::fs::create_dir_all(&dir).unwrap();
        man_pages(&dir).unwrap();
        for page in ["l4lb.1", "l4lb-attach.1", "l4lb-apply.1", "l4lb-settle.1", "l4lb-decap-attach.1"] {
            let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is not a roff manual page");
            assert!(text.contains("Example: l4lb"), "{page} has no example");
        }
        assert!(man_pages(&dir.join("missing")).unwrap_err().to_string().contains("is not a directory"));
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        completions(Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        for word in ["attach", "apply", "settle", "decap"] {
            assert!(script.contains(word), "the bash completions do not know `{word}`");
        }
    }
}
