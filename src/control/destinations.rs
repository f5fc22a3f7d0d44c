//! Destination files in the seed's format: one `IP, MAC` row per destination,
//! no header; blank lines and `#` comments allowed. Pure parsing, no syscalls:
//! the whole file is validated before anything touches the kernel.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Result};
use macaddr::MacAddr6;

use crate::addr::{check_unicast_ipv4, parse_unicast_mac, MacError};

use crate::bpf::MAX_SERVICE_BACKENDS as MAX_BACKENDS;

/// Files larger than this are refused before reading: a destination list of
/// the maximum size is a few tens of kilobytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {}", self.addr, MacAddr6::from(self.mac))
    }
}

/// The destinations of a file, in file order, and what was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationList {
    pub destinations: Vec<Destination>,
    /// Destinations past MAX_SERVICE_BACKENDS (512, a service's limit), ignored as the seed did (with a warning).
    pub ignored: usize,
}

/// Reads and validates a destination file.
pub fn load(path: &Path) -> Result<DestinationList> {
    let bytes = crate::input_file::read_limited(path, MAX_FILE_BYTES, "destination file")?;
    parse(&path.display().to_string(), &bytes)
}

/// Parses destination rows; `origin` names the file in error messages.
pub fn parse(origin: &str, bytes: &[u8]) -> Result<DestinationList> {
    let mut destinations = Vec::new();
    let mut first_line: HashMap<Ipv4Addr, usize> = HashMap::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        let text =
            std::str::from_utf8(raw).map_err(|_| anyhow::anyhow!("{origin}:{line}: not text (invalid UTF-8)"))?;
        let row = text.split('#').next().unwrap_or("").trim();
        if row.is_empty() {
            continue;
        }
        let destination = parse_row(row).map_err(|what| anyhow::anyhow!("{origin}:{line}: {what}"))?;
        if let Some(previous) = first_line.insert(destination.addr, line) {
            bail!("{origin}:{line}: destination {} is already listed on line {previous}", destination.addr);
        }
        destinations.push(destination);
    }
    if destinations.is_empty() {
        bail!("{origin}: no destinations (expected rows of `IP, MAC`)");
    }
    let ignored = destinations.len().saturating_sub(MAX_BACKENDS);
    destinations.truncate(MAX_BACKENDS);
    Ok(DestinationList { destinations, ignored })
}

/// One `IP, MAC` row (comment and surrounding blanks already removed).
fn parse_row(row: &str) -> std::result::Result<Destination, String> {
    let fields: Vec<&str> = row.split(',').map(str::trim).collect();
    let [addr_text, mac_text] = fields[..] else {
        return Err(format!("expected 2 fields `IP, MAC`, found {}", fields.len()));
    };
    let addr: Ipv4Addr = addr_text.parse().map_err(|_| format!("`{addr_text}` is not an IPv4 address"))?;
    check_unicast_ipv4(addr).map_err(|why| format!("address {addr} {why}"))?;
    let mac = parse_unicast_mac(mac_text).map_err(|err| match err {
        MacError::Unreadable => {
            format!("`{mac_text}` is not a MAC address (expected six hex pairs like 00:15:4d:59:7f:ad)")
        }
        MacError::NotUnicast(mac) => format!("MAC {mac} is not a unicast address"),
    })?;
    Ok(Destination { addr, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", parse("d.csv", text.as_bytes()).unwrap_err())
    }

    #[test]
    fn reads_seed_format_with_comments_and_blank_lines() {
        let text = "# lab backends\n10.0.89.127, 00:15:4d:59:7f:ad\n\n10.0.0.57,00:15:4D:00:00:01\n   \n";
        let list = parse("d.csv", text.as_bytes()).unwrap();
        assert_eq!(list.ignored, 0);
        assert_eq!(
            list.destinations,
            vec![
                Destination { addr: Ipv4Addr::new(10, 0, 89, 127), mac: [0x00, 0x15, 0x4d, 0x59, 0x7f, 0xad] },
                Destination { addr: Ipv4Addr::new(10, 0, 0, 57), mac: [0x00, 0x15, 0x4d, 0, 0, 1] },
            ]
        );
    }

    #[test]
    fn names_file_line_and_problem() {
        assert_eq!(
            err("10.0.0.1, 02:00:00:00:00:01\n10.0.0.300, 02:00:00:00:00:02\n"),
            "d.csv:2: `10.0.0.300` is not an IPv4 address"
        );
        assert_eq!(
            err("10.0.0.1, 02:00:00:00:00:zz\n"),
            "d.csv:1: `02:00:00:00:00:zz` is not a MAC address (expected six hex pairs like 00:15:4d:59:7f:ad)"
        );
        assert_eq!(err("10.0.0.1\n"), "d.csv:1: expected 2 fields `IP, MAC`, found 1");
        assert_eq!(err("10.0.0.1, 02:00:00:00:00:01, x\n"), "d.csv:1: expected 2 fields `IP, MAC`, found 3");
        assert_eq!(
            err("# c\n\n10.0.0.1, 02:00:00:00:00:01\n10.0.0.1, 02:00:00:00:00:02\n"),
            "d.csv:4: destination 10.0.0.1 is already listed on line 3"
        );
        assert_eq!(err("224.0.0.1, 02:00:00:00:00:01\n"), "d.csv:1: address 224.0.0.1 is multicast");
        assert_eq!(err("0.0.0.0, 02:00:00:00:00:01\n"), "d.csv:1: address 0.0.0.0 is unspecified (0.0.0.0)");
        assert_eq!(err("10.0.0.1, 01:00:5e:00:00:01\n"), "d.csv:1: MAC 01:00:5E:00:00:01 is not a unicast address");
        assert_eq!(err("10.0.0.1, 00:00:00:00:00:00\n"), "d.csv:1: MAC 00:00:00:00:00:00 is not a unicast address");
    }

    #[test]
    fn refuses_empty_and_binary_files() {
        assert_eq!(err(""), "d.csv: no destinations (expected rows of `IP, MAC`)");
        assert_eq!(err("# only a comment\n\n"), "d.csv: no destinations (expected rows of `IP, MAC`)");
        assert_eq!(err("\u{7f}ELF\u{2}\u{1}\u{1}\0\0\0"), "d.csv:1: expected 2 fields `IP, MAC`, found 1");
        let binary = [b'#', b'\n', 0xff, 0xfe, b',', 0x80, b'\n'];
        assert_eq!(format!("{:#}", parse("d.csv", &binary).unwrap_err()), "d.csv:2: not text (invalid UTF-8)");
        let crlf = parse("d.csv", b"10.0.0.1, 02:00:00:00:00:01 # lab\r\n").unwrap();
        assert_eq!(crlf.destinations[0].mac, [2, 0, 0, 0, 0, 1], "trailing comments and CR are ignored");
    }

    #[test]
    fn keeps_the_first_512_and_counts_the_rest() {
        let text: String = (0..600)
            .map(|i| format!("10.1.{}.{}, 02:00:00:00:{:02x}:{:02x}\n", i / 256, i % 256, i / 256, i % 256))
            .collect();
        let list = parse("d.csv", text.as_bytes()).unwrap();
        assert_eq!(list.destinations.len(), MAX_BACKENDS);
        assert_eq!(list.ignored, 600 - MAX_BACKENDS);
        assert_eq!(list.destinations[511].addr, Ipv4Addr::new(10, 1, 1, 255));
    }

    #[test]
    fn load_names_missing_and_oversized_files() {
        let missing = format!("{:#}", load(Path::new("/nonexistent/l4lb.csv")).unwrap_err());
        assert!(missing.starts_with("/nonexistent/l4lb.csv: cannot read: "), "{missing}");
        let dir = std::env::temp_dir().join(format!("l4lb-dest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let huge = dir.join("huge.csv");
        std::fs::write(&huge, vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        let message = format!("{:#}", load(&huge).unwrap_err());
        let dir_message = format!("{:#}", load(&dir).unwrap_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(message.ends_with("is too large for a destination file (limit 1048576)"), "{message}");
        assert!(dir_message.ends_with("not a regular file"), "{dir_message}");
    }
}
