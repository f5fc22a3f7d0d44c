//! A lock named within the network namespace: an abstract Unix socket,
//! bound and listening while the lock is held. Abstract socket names belong
//! to the network namespace, so two namespaces' interfaces of one name have
//! locks of their own; the kernel frees the name when the holder closes it
//! or dies, so nothing is left behind (a lock file in /run stays, and is
//! shared by every namespace).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

/// How often a waiting process tries again.
const RETRY: Duration = Duration::from_millis(5);
/// After this long waiting, say what is waited for (once).
pub const QUIET_WAIT: Duration = Duration::from_secs(2);
/// Connections the holder's socket queues: each waiter asks who holds the
/// lock at most twice (the holder never accepts; the queue goes with it).
const BACKLOG: i32 = 16;

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct NetnsLock {
    _socket: OwnedFd,
}

/// Who holds a lock that could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub uid: u32,
}

/// What a try found: the lock taken, or held by someone (known or not).
#[derive(Debug)]
pub enum Tried {
    Taken(NetnsLock),
    Held,
}

/// The lock's socket name as `ss -xl` shows it (`@` for the abstract namespace).
pub fn display_name(name: &str) -> String {
    format!("@{name}")
}

fn address(name: &str) -> Result<UnixAddr> {
    UnixAddr::new_abstract(name.as_bytes()).with_context(|| format!("{}: not a valid lock name", display_name(name)))
}

/// Takes the lock `name` if it is free.
pub fn try_lock(name: &str) -> Result<Tried> {
    let addr = address(name)?;
    let sock = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("{}: creating the lock's socket", display_name(name)))?;
    match socket::bind(sock.as_raw_fd(), &addr) {
        Ok(()) => {
            socket::listen(&sock, Backlog::new(BACKLOG).expect("a valid backlog"))
                .with_context(|| format!("{}: listening on the lock's socket", display_name(name)))?;
            Ok(Tried::Taken(NetnsLock { _socket: sock }))
        }
        Err(Errno::EADDRINUSE) => Ok(Tried::Held),
        Err(errno) => bail!("{}: binding the lock's socket: {errno}", display_name(name)),
    }
}

/// Who holds the lock `name`: connects (without waiting) and asks the
/// kernel for the listener's credentials. None if nobody listens (released
/// meanwhile) or its queue is full.
pub fn holder(name: &str) -> Result<Option<Holder>> {
    let addr = address(name)?;
    let probe =
        socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
            .with_context(|| format!("{}: creating a socket to ask who holds the lock", display_name(name)))?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) => {
            let creds = socket::getsockopt(&probe, sockopt::PeerCredentials)
                .with_context(|| format!("{}: asking who holds the lock", display_name(name)))?;
            Ok(Some(Holder { pid: creds.pid(), uid: creds.uid() }))
        }
        Err(Errno::ECONNREFUSED | Errno::ENOENT | Errno::EAGAIN) => Ok(None),
        Err(errno) => bail!("{}: asking who holds the lock: {errno}", display_name(name)),
    }
}

/// Takes the lock `name`, waiting while another process of this user holds
/// it. A holder of another user is refused at once: that is not an l4lb of
/// ours, and waiting for it could be forever. `what` names the lock in the
/// message printed once the wait gets long.
pub fn lock(name: &str, what: &str) -> Result<NetnsLock> {
    let own_uid = nix::unistd::geteuid().as_raw();
    let mut waiting_since: Option<Instant> = None;
    let mut told = false;
    loop {
        if let Tried::Taken(lock) = try_lock(name)? {
            return Ok(lock);
        }
        match waiting_since {
            None => {
                waiting_since = Some(Instant::now());
                if let Some(holder) = holder(name)? {
                    if holder.uid != own_uid {
                        bail!(
                            "{what} ({}) is held by pid {} of uid {}, not by an l4lb of uid {own_uid}",
                            display_name(name),
                            holder.pid,
                            holder.uid
                        );
                    }
                }
            }
            Some(since) if !told && since.elapsed() >= QUIET_WAIT => {
                told = true;
                match holder(name)? {
                    Some(holder) => {
                        eprintln!("waiting for {what} ({}), held by pid {}", display_name(name), holder.pid)
                    }
                    None => eprintln!("waiting for {what} ({})", display_name(name)),
                }
            }
            Some(_) => {}
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        format!("l4lb-test-{tag}-{}", std::process::id())
    }

    #[test]
    fn a_held_lock_names_its_holder_and_is_free_again_once_dropped() {
        let name = unique("held");
        let Tried::Taken(first) = try_lock(&name).unwrap() else { panic!("a fresh name is free") };
        assert!(matches!(try_lock(&name).unwrap(), Tried::Held));
        let asked = holder(&name).unwrap().expect("the holder answers");
        assert_eq!(asked, Holder { pid: std::process::id() as i32, uid: nix::unistd::geteuid().as_raw() });
        drop(first);
        assert!(holder(&name).unwrap().is_none());
        assert!(matches!(try_lock(&name).unwrap(), Tried::Taken(_)));
    }

    #[test]
    fn asking_never_blocks_even_with_the_holders_queue_full() {
        let name = unique("full");
        let Tried::Taken(_held) = try_lock(&name).unwrap() else { panic!("a fresh name is free") };
        // The holder never accepts: its queue fills, then the answer is unknown.
        let answers: Vec<Option<Holder>> = (0..BACKLOG + 4).map(|_| holder(&name).unwrap()).collect();
        assert!(answers[0].is_some());
        assert!(answers.last().unwrap().is_none());
    }

    #[test]
    fn lock_waits_for_the_holder() {
        let name = unique("wait");
        let Tried::Taken(held) = try_lock(&name).unwrap() else { panic!("a fresh name is free") };
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = released.clone();
        let waiter = {
            let name = name.clone();
            std::thread::spawn(move || {
                let lock = lock(&name, "the test lock").unwrap();
                // Taken only after the holder let go.
                assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
                drop(lock);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        released.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(held);
        waiter.join().unwrap();
    }

    #[test]
    fn names_are_distinct_locks() {
        let (a, b) = (unique("a"), unique("b"));
        let Tried::Taken(_a) = try_lock(&a).unwrap() else { panic!("a fresh name is free") };
        assert!(matches!(try_lock(&b).unwrap(), Tried::Taken(_)));
    }
}
