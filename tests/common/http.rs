//! One HTTP/1.0 GET on a new connection, for the tests that talk to the
//! lab's servers through a balancer (tests/lab.rs, tests/scale_out.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET /` to `target` from the calling thread's namespace, each step
/// within `timeout`: (local port, the answer's body, trimmed), or what went
/// wrong (naming the local port once there is one). Only a 200 passes.
pub fn get(target: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(|err| format!("connect: {err}"))?;
    let local = stream.local_addr().map_err(|err| format!("local_addr: {err}"))?.port();
    stream.set_read_timeout(Some(timeout)).map_err(|err| err.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|err| err.to_string())?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {target}\r\nUser-Agent: l4lb-test\r\n\r\n").as_bytes())
        .map_err(|err| format!("port {local}: send: {err}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|err| format!("port {local}: receive: {err} (after {answer:?})"))?;
    let (head, body) =
        answer.split_once("\r\n\r\n").ok_or_else(|| format!("port {local}: no HTTP header end in {answer:?}"))?;
    // The lab's servers speak HTTP/1.1 and close after answering a 1.0 request.
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("port {local}: answer {head:?}"));
    }
    Ok((local, body.trim().to_string()))
}
