//! The VIPs' announcement over BGP, through BIRD (2.x): the agent turns a
//! BIRD protocol on while this balancer's datapath is attached and
//! programmed, and off when it stops or loses the datapath, so that the
//! router sends clients only to balancers that forward. BIRD holds the
//! routes (a `protocol static` with the VIPs, exported to the BGP sessions);
//! the agent only says `enable NAME` or `disable NAME` on BIRD's control
//! socket, as `birdc` would.
//!
//! An agent killed with SIGKILL leaves the protocol on: the datapath it
//! leaves behind goes on forwarding, so the announcement stays true. A dead
//! host drops its BGP sessions, and the router its routes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long BIRD may take to answer one command.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where and what to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bird {
    /// BIRD's control socket (`bird -s PATH`).
    pub socket: PathBuf,
    /// The protocols holding the VIPs' routes (a BIRD 2 static protocol
    /// has one channel: IPv4 and IPv6 VIPs need one each).
    pub protocols: Vec<String>,
}

impl Bird {
    /// Turns the protocols on: the VIPs are announced.
    pub fn announce(&self) -> Result<String> {
        self.each("enable")
    }

    /// Turns the protocols off: the VIPs are withdrawn.
    pub fn withdraw(&self) -> Result<String> {
        self.each("disable")
    }

    /// `VERB` for each protocol, in order; BIRD's answers joined. The first
    /// error stops (the caller tries again later: enabling or disabling
    /// twice is harmless).
    fn each(&self, verb: &str) -> Result<String> {
        let answers: Vec<String> = self.protocols.iter().map(|p| self.command(verb, p)).collect::<Result<_>>()?;
        Ok(answers.join("; "))
    }

    /// Sends `VERB PROTOCOL` and returns BIRD's answer; an error answer
    /// (a code not starting with 0) is an error naming it.
    fn command(&self, verb: &str, protocol: &str) -> Result<String> {
        let socket = self.socket.display();
        let stream = UnixStream::connect(&self.socket).with_context(|| format!("connecting to BIRD at {socket}"))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let greeting = read_reply(&mut reader).with_context(|| format!("BIRD at {socket}: its greeting"))?;
        if !greeting.0.starts_with('0') {
            bail!("BIRD at {socket} is not ready: {}", greeting.1);
        }
        (&stream).write_all(format!("{verb} {protocol}\n").as_bytes())?;
        let (code, text) = read_reply(&mut reader).with_context(|| format!("BIRD at {socket}: `{verb} {protocol}`"))?;
        if !code.starts_with('0') {
            bail!("BIRD at {socket} refused `{verb} {protocol}`: {text} ({code})");
        }
        Ok(text)
    }
}

/// One reply of BIRD's control protocol: lines `CODE-text` continue it,
/// lines ` text` continue the previous code, `CODE text` ends it. Returns
/// the last code and the text of every line that has some, joined.
fn read_reply(reader: &mut impl BufRead) -> Result<(String, String)> {
    let mut texts = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("the connection closed mid-reply");
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(text) = line.strip_prefix(' ') {
            texts.push(text.to_string());
            continue;
        }
        let (code, rest) = line.split_at_checked(4).context("a reply line without a code")?;
        if !code.bytes().all(|b| b.is_ascii_digit()) {
            bail!("a reply line without a code: {line:?}");
        }
        let (last, text) = match rest.chars().next() {
            Some('-') => (false, &rest[1..]),
            Some(' ') => (true, &rest[1..]),
            None => (true, ""),
            Some(_) => bail!("a malformed reply line: {line:?}"),
        };
        texts.push(text.to_string());
        if last {
            texts.retain(|t| !t.trim().is_empty());
            return Ok((code.to_string(), texts.join("; ")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn replies_are_read_to_their_last_line() {
        let text = "1002-vips      Static     master4    up     12:00:00\n 2 routes\n0000 \n";
        assert_eq!(
            read_reply(&mut text.as_bytes()).unwrap(),
            ("0000".into(), "vips      Static     master4    up     12:00:00; 2 routes".into())
        );
        assert_eq!(
            read_reply(&mut "0011 vips: enabled\n".as_bytes()).unwrap(),
            ("0011".into(), "vips: enabled".into())
        );
        assert!(read_reply(&mut "0011-vips".as_bytes()).is_err(), "cut off");
        assert!(read_reply(&mut "hello\n".as_bytes()).is_err());
    }

    /// A fake BIRD on a socket: greets, records each command, answers from `answers`.
    fn fake_bird(answers: Vec<&'static str>) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bird.ctl");
        let listener = UnixListener::bind(&socket).unwrap();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                stream.write_all(b"0001 BIRD 2.15 ready.\n").unwrap();
                let mut line = String::new();
                BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
                seen.push(line.trim_end().to_string());
                stream.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (dir, socket, thread)
    }

    #[test]
    fn enable_and_disable_name_the_protocol_and_errors_name_the_answer() {
        let (_dir, socket, bird) = fake_bird(vec![
            "0011 vips: enabled\n",
            "0011 vips6: enabled\n",
            "0012 vips: disabled\n",
            "0012 vips6: disabled\n",
            "8003 No protocols match\n",
        ]);
        let announce = Bird { socket: socket.clone(), protocols: vec!["vips".into(), "vips6".into()] };
        assert_eq!(announce.announce().unwrap(), "vips: enabled; vips6: enabled");
        assert_eq!(announce.withdraw().unwrap(), "vips: disabled; vips6: disabled");
        let err = format!("{:#}", announce.announce().unwrap_err());
        assert!(err.contains("refused `enable vips`: No protocols match (8003)"), "{err}");
        assert_eq!(
            bird.join().unwrap(),
            ["enable vips", "enable vips6", "disable vips", "disable vips6", "enable vips"]
        );
        let gone = Bird { socket: socket.with_file_name("none.ctl"), protocols: vec!["vips".into()] };
        assert!(format!("{:#}", gone.announce().unwrap_err()).contains("connecting to BIRD at"));
    }
}
