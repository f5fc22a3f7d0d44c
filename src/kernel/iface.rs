//! Facts about a network interface: index, IPv4 and IPv6 addresses, MTU,
//! link state.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// A network interface, resolved by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

/// Whether an interface can pass packets, and how often its carrier has
/// come and gone since it was created (the kernel's IFLA_CARRIER_CHANGES:
/// an admin down and up, a pulled cable or a peer going down each count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up and running (IFF_UP and IFF_RUNNING: carrier, and
    /// operational state up or unknown).
    pub up: bool,
    pub carrier_changes: u32,
}

/// Why the kernel would refuse `name` as an interface name (its
/// dev_valid_name rules), if it would.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("it is empty".into())
    } else if name.len() >= nix::libc::IFNAMSIZ {
        Some(format!("{} bytes: at most {}", name.len(), nix::libc::IFNAMSIZ - 1))
    } else if name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("no `/`, `:`, blanks, `.` or `..`".into())
    } else {
        None
    }
}

/// Whether the namespace file at `path` (`/proc/PID/ns/net`, a
/// `/run/netns` name) is the namespace `own` describes; None if it cannot be
/// read.
fn is_netns(own: &std::fs::Metadata, path: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.dev() == own.dev() && m.ino() == own.ino())
}

/// The network namespace this process runs in, for an error message:
/// "network namespace `NAME`" when `ip netns` named it, else "this network
/// namespace (net:[INODE])", with ", PID 1's" when it is the init process's.
pub fn current_netns() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(own) = std::fs::metadata("/proc/self/ns/net") else { return "this network namespace".into() };
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| is_netns(&own, &e.path()) == Some(true))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if let Some(name) = names.first() {
            return format!("network namespace `{name}`");
        }
    }
    let init = if is_netns(&own, std::path::Path::new("/proc/1/ns/net")) == Some(true) { ", PID 1's" } else { "" };
    format!("this network namespace (net:[{}]{init})", own.ino())
}

/// The inode of this process's network namespace unless it is PID 1's:
/// what tells apart files in /run, which every namespace shares, of
/// interfaces of one name in two namespaces. None in PID 1's namespace, and
/// when either cannot be read (PID 1's needs root or CAP_SYS_PTRACE): the
/// names then stay those of PID 1's namespace, which the agent, as root,
/// uses there too.
pub fn other_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net").ok()?;
    match is_netns(&own, std::path::Path::new("/proc/1/ns/net")) {
        Some(false) => Some(own.ino()),
        _ => None,
    }
}

impl Interface {
    pub fn by_name(name: &str) -> Result<Self> {
        if let Some(why) = name_problem(name) {
            bail!("`{name}` is not a valid interface name ({why})");
        }
        let index = nix::net::if_::if_nametoindex(name).map_err(|_| {
            anyhow::anyhow!(
                "no interface `{name}` in {} (l4lb sees the interfaces of the namespace it runs in: `ip netns exec NS l4lb ...` for another)",
                current_netns()
            )
        })?;
        Ok(Interface { name: name.to_string(), index })
    }

    /// The first IPv4 address configured on the interface.
    pub fn ipv4_addr(&self) -> Result<Option<Ipv4Addr>> {
        Ok(self.ipv4_addrs()?.into_iter().next())
    }

    /// Every IPv4 address configured on the interface, in the kernel's order.
    pub fn ipv4_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
        let mut found: Vec<Ipv4Addr> = Vec::new();
        for addr in addrs
            .filter(|a| a.interface_name == self.name)
            .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip())))
        {
            if !found.contains(&addr) {
                found.push(addr);
            }
        }
        Ok(found)
    }

    /// Every IPv6 address configured on the interface (link-local ones
    /// included), in the kernel's order.
    pub fn ipv6_addrs(&self) -> Result<Vec<Ipv6Addr>> {
        let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
        let mut found: Vec<Ipv6Addr> = Vec::new();
        for addr in addrs
            .filter(|a| a.interface_name == self.name)
            .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in6().map(|sin6| sin6.ip())))
        {
            if !found.contains(&addr) {
                found.push(addr);
            }
        }
        Ok(found)
    }

    /// The interface's Ethernet address (from its link-layer entry, which
    /// getifaddrs reads in the calling thread's namespace, unlike /sys).
    pub fn mac(&self) -> Result<[u8; 6]> {
        let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
        addrs
            .filter(|a| a.interface_name == self.name)
            .find_map(|a| a.address.and_then(|s| s.as_link_addr().and_then(|l| l.addr())))
            .with_context(|| format!("{}: no Ethernet address", self.name))
    }

    /// The link's state, asked of the kernel over rtnetlink (RTM_GETLINK),
    /// in the calling thread's network namespace.
    pub fn link_state(&self) -> Result<LinkState> {
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
        use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
        use netlink_packet_route::RouteNetlinkMessage;
        use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

        let context = || format!("{}: reading its link state", self.name);
        let socket = Socket::new(NETLINK_ROUTE).with_context(context)?;
        // The kernel answers a request for one link at once; the timeout
        // only bounds a read that would otherwise never end.
        let timeout = nix::sys::time::TimeVal::new(1, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .with_context(context)?;
        socket.connect(&SocketAddr::new(0, 0)).with_context(context)?;
        let mut request = LinkMessage::default();
        request.header.index = self.index;
        let mut packet = NetlinkMessage::from(RouteNetlinkMessage::GetLink(request));
        packet.header.flags = NLM_F_REQUEST;
        packet.header.sequence_number = 1;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        socket.send(&bytes, 0).with_context(context)?;
        let (answer, _) = socket.recv_from_full().with_context(context)?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
            .map_err(|err| anyhow::anyhow!("{err}"))
            .with_context(context)?;
        let link = match answer.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
            NetlinkPayload::Error(err) => {
                return Err(err.to_io()).with_context(context);
            }
            other => bail!("{}: the kernel answered a link request with {other:?}", self.name),
        };
        let flags = link.header.flags;
        let carrier_changes = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::CarrierChanges(n) => Some(*n),
                _ => None,
            })
            .with_context(|| format!("{}: the kernel's answer has no carrier change count", self.name))?;
        Ok(LinkState { up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::Running), carrier_changes })
    }

    /// The interface MTU (largest L3 packet it sends).
    pub fn mtu(&self) -> Result<u32> {
        let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
            .context("opening a socket to ask for the MTU")?;
        // SAFETY: ifreq is plain data; the name fits (checked in by_name).
        let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(self.name.bytes()) {
            *dst = src as nix::libc::c_char;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu of a valid ifreq.
        let rc = unsafe { nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCGIFMTU, &mut request) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("{}: reading the MTU", self.name));
        }
        // SAFETY: SIOCGIFMTU filled the ifru_mtu member.
        Ok(unsafe { request.ifr_ifru.ifru_mtu } as u32)
    }
}
