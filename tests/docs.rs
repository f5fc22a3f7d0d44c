//! The documentation's links hold (no root needed): every relative link and
//! image in README.md and docs/*.md names a file that exists, and a link
//! with an anchor (`page.md#heading`) names a heading of that page, by the
//! anchors GitHub gives headings. Links to other sites are not fetched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).expect("listing docs/").flatten() {
        if entry.path().extension().is_some_and(|e| e == "md") {
            pages.push(entry.path());
        }
    }
    pages.sort();
    pages
}

/// GitHub's anchor for a heading: lower case, spaces to hyphens, other
/// punctuation dropped (hyphens and underscores kept); repeats get -1, -2...
fn anchor(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings, and its links (destination, line).
fn read(page: &Path) -> (BTreeSet<String>, Vec<(String, usize)>) {
    let text = std::fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut links = Vec::new();
    let mut heading: Option<String> = None;
    for (event, range) in Parser::new(&text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) if level <= HeadingLevel::H6 => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = anchor(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                anchors.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
                *n += 1;
            }
            Event::Start(Tag::Link { dest_url, .. }) | Event::Start(Tag::Image { dest_url, .. }) => {
                let line = text[..range.start].matches('\n').count() + 1;
                links.push((dest_url.to_string(), line));
            }
            _ => {}
        }
    }
    (anchors, links)
}

#[test]
fn relative_links_and_anchors_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let (own_anchors, links) = read(&page);
        for (dest, line) in links {
            if dest.contains("://") || dest.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = match dest.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (dest.as_str(), None),
            };
            let where_ = format!("{}:{line}: `{dest}`", page.strip_prefix(root()).unwrap_or(&page).display());
            let target = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            if !target.exists() {
                broken.push(format!("{where_}: no file {}", target.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let anchors = if file.is_empty() { own_anchors.clone() } else { read(&target).0 };
                if !anchors.contains(fragment) {
                    broken.push(format!("{where_}: no heading with anchor #{fragment}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 20, "only {checked} relative links found: is the scan working?");
}

#[test]
fn readme_stays_short() {
    let lines = std::fs::read_to_string(root().join("README.md")).unwrap().lines().count();
    assert!(lines <= 250, "README.md has {lines} lines: the details belong in docs/");
}

#[test]
fn anchors_follow_github() {
    assert_eq!(anchor("Maglev tables"), "maglev-tables");
    assert_eq!(anchor("The backend side: `l4lb decap`"), "the-backend-side-l4lb-decap");
    assert_eq!(
        anchor("Target and findings of 2026-11-25 (the previous connection tracking)"),
        "target-and-findings-of-2026-11-25-the-previous-connection-tracking"
    );
}
