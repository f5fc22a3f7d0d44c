//! Raw frames: an AF_PACKET socket to send and receive them on an interface,
//! and the Internet checksum of their headers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use super::{fail, TestResult};

/// An AF_PACKET socket bound to one interface (of the calling thread's
/// namespace): sends frames and receives the incoming ones (with a short
/// timeout and a large buffer), never its own outgoing frames.
pub struct PacketSocket {
    fd: OwnedFd,
}

const PACKET_OUTGOING: u8 = 4;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

impl PacketSocket {
    pub fn bind(dev: &str) -> TestResult<Self> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol as libc::c_int) };
        ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned to us.
        let socket = PacketSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = nix::net::if_::if_nametoindex(dev)? as i32;
        // SAFETY: addr is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(rc == 0, "binding to {dev}: {}", std::io::Error::last_os_error());
        socket.option(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(16i32 << 20))?;
        socket.option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &libc::timeval { tv_sec: 0, tv_usec: 50_000 })?;
        // Older kernels lack it; outgoing frames are filtered in recv() too.
        let _ = socket.option(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32);
        Ok(socket)
    }

    fn option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> TestResult {
        // SAFETY: value points to a T of the given size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                value as *const T as *const libc::c_void,
                std::mem::size_of::<T>() as u32,
            )
        };
        ensure!(rc == 0, "setsockopt({level}, {name}): {}", std::io::Error::last_os_error());
        Ok(())
    }

    pub fn send(&self, frame: &[u8]) -> TestResult {
        // SAFETY: frame is a valid buffer of frame.len() bytes.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        ensure!(
            sent == frame.len() as isize,
            "sending a {}-byte frame: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// The next incoming frame; None after the receive timeout or for an outgoing one.
    pub fn recv(&self) -> TestResult<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and addr are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut addr as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => {
                    Ok(None)
                }
                _ => Err(fail(format!("receiving: {err}"))),
            };
        }
        if addr.sll_pkttype == PACKET_OUTGOING {
            return Ok(None);
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }
}

/// RFC 1071: one's complement of the one's-complement sum of big-endian
/// 16-bit words (0 over a header whose checksum field is right); computed
/// here, independently of etherparse and the datapath.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 =
        bytes.chunks(2).map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
