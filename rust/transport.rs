//! Socket plumbing: the pool's libzmq multipart receive and send, and the mailbox
//! through which other threads hand work to the thread that owns a component's sockets
//! (the interchange's, a pool's).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Receive one multipart message if one is waiting (never blocks on the first frame).
#[must_use]
pub fn recv_frames(sock: &zmq::Socket) -> Option<Vec<zmq::Message>> {
    let mut frames = Vec::with_capacity(4);
    loop {
        let mut msg = zmq::Message::new();
        let flags = if frames.is_empty() { zmq::DONTWAIT } else { 0 };
        sock.recv(&mut msg, flags).ok()?;
        let more = msg.get_more();
        frames.push(msg);
        if !more {
            return Some(frames);
        }
    }
}

/// Send frames as one multipart message; errors after the first frame cannot happen
/// for an accepted message, so only the first frame's result is returned.
pub fn send_frames<T: zmq::Sendable>(
    sock: &zmq::Socket,
    frames: impl IntoIterator<Item = T>,
) -> zmq::Result<()> {
    let mut iter = frames.into_iter().peekable();
    let mut first = true;
    while let Some(f) = iter.next() {
        let flags = if iter.peek().is_some() {
            zmq::SNDMORE
        } else {
            0
        };
        let r = sock.send(f, flags);
        if first {
            r?;
            first = false;
        }
    }
    Ok(())
}

/// A wake-up fd another thread can poll: raised any number of times, it reads as one
/// wake-up until cleared. A raise writes to the fd only when no wake-up is already
/// pending, so a burst costs one system call.
pub struct Signal {
    pending: AtomicBool,
    tx: UnixStream,
    rx: UnixStream,
}

impl Signal {
    pub fn new() -> std::io::Result<Self> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Signal {
            pending: AtomicBool::new(false),
            tx,
            rx,
        })
    }

    pub fn raise(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer already means a wake-up is pending.
            let _ = (&self.tx).write(&[1]);
        }
    }

    /// The fd to poll for readability.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Raised since the last [`Signal::clear`]: an atomic load, for a thread whose poll
    /// may report the fd late (an epoll with more ready fds than one wait returns).
    #[must_use]
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Empty the fd and lower the signal; look at what it announced after this, so that a
    /// raise racing with the clear wakes the next poll.
    pub fn clear(&self) {
        let mut buf = [0u8; 256];
        loop {
            match (&self.rx).read(&mut buf) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break,
            }
        }
        self.pending.store(false, Ordering::Release);
    }
}

/// Items for the socket thread, announced by a [`Signal`] it polls beside its sockets.
pub struct Mailbox<T> {
    /// `None` once the socket thread has ended (`close`): pushes are dropped at once.
    items: Mutex<Option<Vec<T>>>,
    signal: Signal,
}

impl<T> Mailbox<T> {
    pub fn new() -> std::io::Result<Self> {
        Ok(Mailbox {
            items: Mutex::new(Some(Vec::new())),
            signal: Signal::new()?,
        })
    }

    /// Queue items for the socket thread; once it has ended (`close`) they are dropped
    /// at once, so a reply channel among them disconnects instead of waiting forever.
    pub fn push(&self, items: impl IntoIterator<Item = T>) {
        match self.items.lock().unwrap().as_mut() {
            Some(q) => q.extend(items),
            None => return,
        }
        self.signal.raise();
    }

    /// The socket thread has ended: drop what is queued and everything pushed later.
    pub fn close(&self) {
        *self.items.lock().unwrap() = None;
    }

    /// The fd to poll for readability.
    #[must_use]
    pub fn fd(&self) -> RawFd {
        self.signal.fd()
    }

    /// Items were pushed since the last [`Mailbox::take`] (see [`Signal::pending`]).
    #[must_use]
    pub fn pending(&self) -> bool {
        self.signal.pending()
    }

    /// Take everything pushed so far (socket thread only).
    pub fn take(&self) -> Vec<T> {
        self.signal.clear();
        self.items
            .lock()
            .unwrap()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_wakes_once_per_burst_and_hands_over_in_order() {
        let m = Mailbox::new().unwrap();
        m.push([1, 2]);
        m.push([3]);
        let mut fds = [zmq::PollItem::from_fd(m.fd(), zmq::POLLIN)];
        assert_eq!(zmq::poll(&mut fds, 1000).unwrap(), 1);
        assert!(m.pending());
        assert_eq!(m.take(), vec![1, 2, 3]);
        assert!(!m.pending());
        let mut fds = [zmq::PollItem::from_fd(m.fd(), zmq::POLLIN)];
        assert_eq!(
            zmq::poll(&mut fds, 0).unwrap(),
            0,
            "drained: no spurious wake-up"
        );
        m.push([4]);
        let mut fds = [zmq::PollItem::from_fd(m.fd(), zmq::POLLIN)];
        assert_eq!(zmq::poll(&mut fds, 1000).unwrap(), 1);
        assert_eq!(m.take(), vec![4]);
    }

    #[test]
    fn a_closed_mailbox_drops_what_it_held_and_what_comes_later() {
        let m = Mailbox::new().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        m.push([tx]);
        m.close();
        assert!(rx.recv().is_err(), "the queued reply channel is dropped");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        m.push([tx]);
        assert!(rx.recv().is_err(), "a later one too");
        assert!(m.take().is_empty());
    }

    #[test]
    fn frames_round_trip_over_a_socket_pair() {
        let ctx = zmq::Context::new();
        let a = ctx.socket(zmq::PAIR).unwrap();
        let b = ctx.socket(zmq::PAIR).unwrap();
        a.bind("inproc://t").unwrap();
        b.connect("inproc://t").unwrap();
        assert!(recv_frames(&b).is_none());
        send_frames(&a, [&b"x"[..], b"yz", b""]).unwrap();
        b.poll(zmq::POLLIN, 1000).unwrap();
        let got: Vec<Vec<u8>> = recv_frames(&b)
            .unwrap()
            .iter()
            .map(|m| m.to_vec())
            .collect();
        assert_eq!(got, vec![b"x".to_vec(), b"yz".to_vec(), Vec::new()]);
    }
}
