//! The event-loop shell both socket threads wait in (the interchange's router and a
//! pool's core): one level-triggered epoll, each fd registered under a `u64` token the
//! owner chooses. A turn is one [`Epoll::wait`], then the owner handles every ready token.
//!
//! A libzmq socket joins through its `ZMQ_FD` (see [`zmq_ready`]): that fd only says that
//! the socket's state may have changed, so its owner asks `ZMQ_EVENTS` after each wait and
//! before each wait (an operation on the socket can consume the fd's signal while leaving
//! messages to read).

use std::io::ErrorKind;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readable (or hung up, or in error: a read then says which).
pub const IN: u32 = libc::EPOLLIN as u32;
/// Writable.
pub const OUT: u32 = libc::EPOLLOUT as u32;
/// Interest in nothing: the fd stays registered, and only an error or hang-up is reported.
pub const NONE: u32 = 0;

pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

/// One ready fd of a turn: its token and what it is ready for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    pub token: u64,
    flags: u32,
}

impl Ready {
    /// Readable, hung up or in error: reading says which.
    #[must_use]
    pub fn readable(self) -> bool {
        self.flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }

    #[must_use]
    pub fn writable(self) -> bool {
        self.flags & OUT != 0
    }
}

impl Epoll {
    /// An epoll that reports at most `batch` ready fds per wait (the rest the next turn).
    pub fn new(batch: usize) -> std::io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; the fd is owned from here on.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; batch.max(1)],
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, interest: u32, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: interest,
            u64: token,
        };
        // SAFETY: both descriptors are open; ev lives across the call.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &raw mut ev) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Watch `fd` for `interest` ([`IN`], [`OUT`], both, or [`NONE`]) under `token`.
    pub fn add(&self, fd: RawFd, interest: u32, token: u64) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, interest, token)
    }

    /// Change what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, interest: u32, token: u64) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token)
    }

    /// Stop watching `fd`. Closing an fd removes it too, unless a duplicate of it (a
    /// forked child's, say) keeps it open: an owner that ends a connection removes it.
    pub fn delete(&self, fd: RawFd) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Wait up to `timeout_ms` (0: not at all, negative: without limit) for watched fds
    /// and put what is ready in `ready` (emptied first; the caller keeps it between turns
    /// and may change registrations while handling it). A signal ends the wait with
    /// nothing ready. Fails only if epoll does.
    pub fn wait(&mut self, timeout_ms: i32, ready: &mut Vec<Ready>) -> std::io::Result<()> {
        ready.clear();
        let max = i32::try_from(self.events.len()).unwrap_or(i32::MAX);
        // SAFETY: events has room for `max` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                max,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        ready.extend(
            self.events[..usize::try_from(n).unwrap_or(0)]
                .iter()
                .map(|e| Ready {
                    token: e.u64,
                    flags: e.events,
                }),
        );
        Ok(())
    }
}

/// Whether a libzmq socket has a message to read now (`ZMQ_EVENTS`), which also lets
/// libzmq take in what its I/O thread signalled through `ZMQ_FD`.
#[must_use]
pub fn zmq_ready(sock: &zmq::Socket) -> bool {
    sock.get_events().is_ok_and(|e| e.contains(zmq::POLLIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_each_ready_token_with_what_it_is_ready_for() {
        let mut ep = Epoll::new(8).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        ep.add(b.as_raw_fd(), IN, 7).unwrap();
        ep.add(c.as_raw_fd(), NONE, 9).unwrap();
        let mut got = Vec::new();
        ep.wait(0, &mut got).unwrap();
        assert!(got.is_empty(), "nothing written, nothing asked");
        a.write_all(b"x").unwrap();
        ep.modify(c.as_raw_fd(), OUT, 9).unwrap();
        ep.wait(1000, &mut got).unwrap();
        got.sort_by_key(|r| r.token);
        assert_eq!(got.len(), 2);
        assert!(got[0].token == 7 && got[0].readable() && !got[0].writable());
        assert!(got[1].token == 9 && got[1].writable() && !got[1].readable());
        ep.delete(b.as_raw_fd()).unwrap();
        ep.delete(c.as_raw_fd()).unwrap();
        ep.wait(0, &mut got).unwrap();
        assert!(got.is_empty(), "deleted fds are not reported");
    }

    #[test]
    fn a_hang_up_counts_as_readable() {
        let mut ep = Epoll::new(1).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        ep.add(b.as_raw_fd(), NONE, 1).unwrap();
        drop(a);
        let mut got = Vec::new();
        ep.wait(1000, &mut got).unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].readable());
    }

    #[test]
    fn a_zmq_socket_joins_through_its_fd() {
        let ctx = zmq::Context::new();
        let a = ctx.socket(zmq::PAIR).unwrap();
        let b = ctx.socket(zmq::PAIR).unwrap();
        a.bind("inproc://epoll-test").unwrap();
        b.connect("inproc://epoll-test").unwrap();
        let mut ep = Epoll::new(4).unwrap();
        ep.add(b.get_fd().unwrap(), IN, 3).unwrap();
        assert!(!zmq_ready(&b));
        a.send("hi", 0).unwrap();
        let mut got = Vec::new();
        ep.wait(1000, &mut got).unwrap();
        assert_eq!(got.first().map(|r| r.token), Some(3));
        assert!(zmq_ready(&b));
        assert_eq!(b.recv_bytes(zmq::DONTWAIT).unwrap(), b"hi");
        assert!(!zmq_ready(&b));
    }
}
