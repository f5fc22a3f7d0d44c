//! One HTTP/1.0 GET on a new connection, for the tests that talk to the
//! lab's servers through a balancer (tests/lab.rs, tests/scale_out.rs).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// `GET /` to `target` from the calling thread's namespace, each step
/// within `timeout`: (local port, the answer's body, trimmed), or what went
/// wrong (naming the local port once there is one). Only a 200 passes.
pub fn get(target: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
    let stream = TcpStream::connect_timeout(&target, timeout).map_err(|err| format!("connect: {err}"))?;
    exchange(stream, target, timeout)
}

/// The same from local port `port`. The kernel may hand out a port again as
/// soon as the server has closed the previous connection from it (the
/// server, closing first, keeps the TIME_WAIT state), so a test that needs a
/// new flow per connection names the ports itself.
pub fn get_from(port: u16, target: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
    let socket =
        Socket::new(Domain::for_address(target), Type::STREAM, None).map_err(|err| format!("socket: {err}"))?;
    socket.set_reuse_address(true).map_err(|err| format!("SO_REUSEADDR: {err}"))?;
    let any: IpAddr = if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    socket.bind(&SocketAddr::new(any, port).into()).map_err(|err| format!("bind to port {port}: {err}"))?;
    socket.connect_timeout(&target.into(), timeout).map_err(|err| format!("port {port}: connect: {err}"))?;
    exchange(socket.into(), target, timeout)
}

fn exchange(mut stream: TcpStream, target: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
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
