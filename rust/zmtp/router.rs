//! A ZMTP ROUTER served from the caller's thread: a listening TCP socket and its
//! connections in one epoll, each connection's bytes parsed and written here. Messages
//! come out as libzmq's ROUTER gives them (the peer's routing identity, then the frames)
//! and go out addressed the same way; a send to an identity that is not connected is
//! refused, as with `ZMQ_ROUTER_MANDATORY`.
//!
//! [`Router::wait`] is the caller's one blocking call: one `epoll_wait` over the
//! connections, the listener and one fd of the caller's ([`Router::watch`]), after which
//! [`Router::read_into`] hands out the messages it parsed, each with the [`Peer`] it came
//! from. [`Router::send_to`] routes by that peer (an index, where an identity is a hash
//! probe and a compare against a cold key with thousands of connections) and
//! [`Router::send`] by identity; both write at once when nothing waits on the connection,
//! and [`Router::flush`] writes what the socket did not take.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::Bytes;
use std::time::{Duration, Instant};

use super::conn::{self, Upcalls};
use super::curve;
use super::{frame_head, put_frame, MORE};
use crate::epoll::{self, Epoll, Ready};
use crate::logging::FirstSeen;
use crate::stream::{Outbox, BIG_FRAME};

/// Whom the router admits and how large a frame it takes (the listener is [`bind`]'s).
pub struct Options {
    /// CurveZMQ server key and admitted clients; `None`: the NULL mechanism.
    pub curve: Option<curve::Server>,
    /// A peer sending a frame larger than this is disconnected (`ZMQ_MAXMSGSIZE`).
    pub max_frame: Option<usize>,
    pub handshakes: HandshakeLimits,
}

/// What peers that have not proven who they are may take of the router. The caps are for
/// CURVE, where each handshake step costs X25519 agreements on the caller's thread; a NULL
/// router admits anyone, and only the timeout applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// A connection that has not finished its handshake by then is dropped (libzmq's
    /// `ZMQ_HANDSHAKE_IVL` default is 30 s).
    pub timeout: Duration,
    /// Most connections in their CURVE handshake at once; a new one past it drops the
    /// oldest (a flood from many addresses cannot keep a pool out for the timeout).
    pub max_pending: usize,
    /// Most connections in their CURVE handshake from one address; new ones past it are
    /// refused at once (and the address logged once).
    pub max_pending_per_source: usize,
    /// Most CURVE handshake steps (a HELLO or an INITIATE, each two X25519 agreements)
    /// in one [`Router::wait`]: the rest stay in the kernel until the next turn, so the
    /// messages of admitted peers are never queued behind a flood of handshakes.
    pub steps_per_turn: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Duration::from_secs(30),
            max_pending: 4096,
            max_pending_per_source: 256,
            steps_per_turn: 4,
        }
    }
}

/// A connection: its socket and what the router keeps about it; the protocol is `conn`'s.
struct Link {
    stream: TcpStream,
    peer: SocketAddr,
    gen: u32,
    /// Counted among the CURVE handshakes pending (`Router::pending`).
    pending: bool,
    /// The part of a frame still coming.
    inbuf: Vec<u8>,
    /// POLLOUT is armed (bytes are left that the socket would not take).
    armed: bool,
    conn: conn::Conn,
    /// What waits behind `conn.out` once a payload is queued by reference (see
    /// [`Router::send_shared`]): written after it, and new bytes go here while it holds any.
    shared: Outbox,
}

impl Link {
    fn idle(&self) -> bool {
        self.conn.out.is_empty() && self.shared.is_empty()
    }
}

/// A frame to send: bytes to copy, or a buffer to queue by reference.
pub enum Part<'a> {
    Copy(&'a [u8]),
    Shared(&'a Bytes),
}

impl Part<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Part::Copy(b) => b,
            Part::Shared(b) => b,
        }
    }
}

/// A connection as the router knows it: its slot and generation (a closed connection's
/// slot is reused under another generation, so a stale `Peer` routes nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub conn: u32,
    pub gen: u32,
}

impl Peer {
    fn of(c: usize, gen: u32) -> Peer {
        Peer {
            conn: u32::try_from(c).expect("fewer than 2^32 connections"),
            gen,
        }
    }
}

/// A send to a routing identity with no connection (`ZMQ_ROUTER_MANDATORY`'s refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotConnected;

/// Counters for the interchange's statistics and logs.
#[derive(Default, Debug, Clone, Copy)]
pub struct Counts {
    pub accepted: u64,
    pub closed: u64,
    /// CURVE clients whose key is not admitted.
    pub refused: u64,
    /// Connections refused at once: their address had `max_pending_per_source` handshakes.
    pub turned_away: u64,
    /// Handshakes dropped for newer ones past `max_pending`.
    pub evicted: u64,
    /// CURVE handshake steps taken (HELLO, INITIATE), and reads put off to a later turn
    /// because a turn's `steps_per_turn` were taken.
    pub handshake_steps: u64,
    pub deferred: u64,
}

pub struct Router {
    ep: Epoll,
    /// What the last wait found ready (kept between turns for its allocation).
    ready: Vec<Ready>,
    listeners: Vec<TcpListener>,
    pub port: u16,
    options: Options,
    /// The CURVE server (shared with each read's upcalls); `None`: NULL.
    curve: Option<Arc<curve::Server>>,
    conns: Vec<Option<Link>>,
    free: Vec<usize>,
    next_gen: u32,
    by_identity: foldhash::HashMap<Vec<u8>, usize>,
    incoming: VecDeque<(Peer, Vec<zmq::Message>)>,
    /// Emptied message vectors, for the next messages read (not an allocation each).
    spare: Vec<Vec<zmq::Message>>,
    dirty: Vec<usize>,
    next_anonymous: u32,
    /// Connections still in their handshake, oldest first, with their deadlines.
    handshakes: VecDeque<(Instant, usize, u32)>,
    /// CURVE handshakes pending, in all and by address; steps taken this turn.
    pending: usize,
    pending_by_source: foldhash::HashMap<IpAddr, usize>,
    steps: usize,
    /// Addresses already logged as over their handshake cap.
    crowded_sources: FirstSeen<IpAddr>,
    /// The listener is not watched (accept failed for want of fds) until the next
    /// `expire_handshakes`.
    paused: bool,
    /// CURVE keys already logged as refused (a refused DEALER retries every 100 ms).
    refused_keys: FirstSeen<[u8; 32]>,
    /// Where reads land and sends are encoded, whichever the connection: memory that
    /// stays in cache, where a buffer per connection is cold with thousands of them.
    scratch: Vec<u8>,
    wbuf: Vec<u8>,
    pub counts: Counts,
}

/// Epoll tokens at and above this are listeners.
const LISTENER: u64 = u64::MAX - 16;
/// The epoll token of the caller's watched fd.
const WATCHED: u64 = LISTENER - 1;
/// Most bytes read from one connection per pass (others get their turn).
const READ_CHUNK: usize = 256 * 1024;
/// Most bytes reserved ahead of a frame's arrival (the rest as it comes).
const RESERVE_AHEAD: usize = 16 << 20;
/// Parsed messages waiting above which connections are not read (see [`Router::wait`]).
const INCOMING_HIGH: usize = 8192;
/// Most emptied message vectors kept for reuse.
const SPARE_VECS: usize = 64;
/// Only vectors of at most this many frames are kept (a batch's vector can be huge).
const SPARE_FRAMES: usize = 1024;
/// A buffer emptied with more capacity than this is given back.
const KEEP_CAPACITY: usize = 4 * READ_CHUNK;

/// Bind `address` (an IP literal, or `*` for every interface) on `port`.
pub fn bind(address: &str, port: u16, backlog: i32) -> std::io::Result<TcpListener> {
    let listener = if address == "*" {
        // [::] takes IPv4 too (dual stack) where the host has IPv6 at all.
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .or_else(|_| TcpListener::bind(("0.0.0.0", port)))?
    } else {
        let ip: IpAddr = address.parse().map_err(|e| {
            std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("{address:?} is not an IP address: {e}"),
            )
        })?;
        TcpListener::bind((ip, port))?
    };
    // std listens with a smaller backlog; a storm of pools starting at once overflows it
    // and each refused SYN waits out TCP's retries. Linux takes a second listen() as a
    // resize (capped at somaxconn).
    // SAFETY: listen on our own bound socket.
    unsafe { libc::listen(listener.as_raw_fd(), backlog) };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl Router {
    /// Serve on `listener` (see [`bind`]).
    pub fn new(listener: TcpListener, options: Options) -> std::io::Result<Router> {
        let ep = Epoll::new(256)?;
        ep.add(listener.as_raw_fd(), epoll::IN, LISTENER)?;
        let port = listener.local_addr()?.port();
        let mut options = options;
        let curve = options.curve.take().map(Arc::new);
        Ok(Router {
            ep,
            ready: Vec::with_capacity(256),
            listeners: vec![listener],
            port,
            options,
            curve,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            by_identity: foldhash::HashMap::default(),
            incoming: VecDeque::new(),
            spare: Vec::new(),
            dirty: Vec::new(),
            next_anonymous: fastrand::u32(..),
            handshakes: VecDeque::new(),
            pending: 0,
            pending_by_source: foldhash::HashMap::default(),
            steps: 0,
            crowded_sources: FirstSeen::default(),
            paused: false,
            refused_keys: FirstSeen::default(),
            scratch: Vec::with_capacity(READ_CHUNK),
            wbuf: Vec::new(),
            counts: Counts::default(),
        })
    }

    /// Watch `fd` for input too: [`Router::wait`] returns when it is readable, and says
    /// so (the caller's wake-up, so that one `epoll_wait` a turn serves both).
    pub fn watch(&mut self, fd: i32) -> std::io::Result<()> {
        self.ep.add(fd, epoll::IN, WATCHED)
    }

    /// Wait up to `timeout_ms` (not at all while parsed messages wait) for the sockets,
    /// then accept, read, parse and write what they allow; whether the watched fd is
    /// readable. While [`INCOMING_HIGH`] parsed messages wait, connections are not read:
    /// their data stays in the kernel, whose flow control holds back a peer that sends
    /// faster than the caller takes. Fails only if epoll does (not for a signal).
    pub fn wait(&mut self, timeout_ms: i32) -> std::io::Result<bool> {
        let timeout = if self.incoming.is_empty() {
            timeout_ms
        } else {
            0
        };
        let mut ready = std::mem::take(&mut self.ready);
        let waited = self.ep.wait(timeout, &mut ready);
        let woken = waited.map(|()| self.handle(&ready));
        self.ready = ready;
        self.flush();
        woken
    }

    /// Handle what one wait found ready; whether the watched fd was among it.
    fn handle(&mut self, ready: &[Ready]) -> bool {
        let reading = self.incoming.len() < INCOMING_HIGH;
        self.steps = 0;
        let mut woken = false;
        for r in ready {
            let token = r.token;
            if token == WATCHED {
                woken = true;
                continue;
            }
            if token >= LISTENER {
                self.accept((token - LISTENER) as usize);
                continue;
            }
            let c = (token & 0xffff_ffff) as usize;
            let gen = (token >> 32) as u32;
            if self
                .conns
                .get(c)
                .and_then(Option::as_ref)
                .is_none_or(|x| x.gen != gen)
            {
                continue; // closed since (and perhaps the slot reused)
            }
            if r.writable() {
                self.write(c);
            }
            if reading && r.readable() {
                if self.steps >= self.options.handshakes.steps_per_turn
                    && self.conns[c].as_ref().is_some_and(|x| x.pending)
                {
                    // This turn's handshake work is done: the peer's bytes wait in the
                    // kernel, and the level-triggered epoll reports it again next turn.
                    self.counts.deferred += 1;
                    continue;
                }
                self.read(c);
            }
        }
        woken
    }

    #[cfg(test)]
    /// Connections that have finished their handshake.
    #[must_use]
    pub fn peers(&self) -> usize {
        self.by_identity.len()
    }

    /// The next message [`Router::wait`] parsed (routing identity first) into `frames`,
    /// and the connection it came by; `None` when none waits.
    pub fn read_into(&mut self, frames: &mut Vec<zmq::Message>) -> Option<Peer> {
        let (peer, mut m) = self.incoming.pop_front()?;
        std::mem::swap(frames, &mut m);
        // The caller's last message's vector holds the next one read.
        m.clear();
        if self.spare.len() < SPARE_VECS && m.capacity() <= SPARE_FRAMES {
            self.spare.push(m);
        }
        Some(peer)
    }

    /// Send a message to `identity`; `Err` if no such peer is connected. What the socket
    /// does not take now is written by [`Router::flush`].
    pub fn send<B: AsRef<[u8]>>(
        &mut self,
        identity: &[u8],
        frames: impl IntoIterator<Item = B>,
    ) -> Result<(), NotConnected> {
        self.send_to(None, identity, frames).map(drop)
    }

    /// [`Router::send`] by the connection `peer` while it lasts, else by `identity` (none
    /// known yet, or the peer reconnected); the peer it went to.
    pub fn send_to<B: AsRef<[u8]>>(
        &mut self,
        peer: Option<Peer>,
        identity: &[u8],
        frames: impl IntoIterator<Item = B>,
    ) -> Result<Peer, NotConnected> {
        let c = self.route(peer, identity)?;
        let gen = self.send_on(c, frames);
        Ok(Peer::of(c, gen))
    }

    /// Encode `frames` for connection `c` (ready) and write them; its generation.
    fn send_on<B: AsRef<[u8]>>(&mut self, c: usize, frames: impl IntoIterator<Item = B>) -> u32 {
        let conn = self.conns[c].as_mut().expect("a mapped connection");
        let gen = conn.gen;
        if !conn.shared.is_empty() {
            let mut w = Vec::new();
            conn.conn.encode(frames, &mut w);
            conn.shared.push(w);
            return gen;
        }
        // Nothing waiting on this connection: encode where it stays in cache and write
        // now; only what the socket does not take is kept with the connection.
        let direct = conn.conn.out.is_empty() && !conn.armed;
        let mut w = if direct {
            std::mem::take(&mut self.wbuf)
        } else {
            std::mem::take(&mut conn.conn.out)
        };
        conn.conn.encode(frames, &mut w);
        if !direct {
            conn.conn.out = w;
            return gen;
        }
        // Would block, or failed: what is left goes to `flush()`, which finds out which.
        let (done, _) = write_some(&mut conn.stream, &w);
        if done < w.len() {
            conn.conn.out.extend_from_slice(&w[done..]);
            self.dirty.push(c);
        }
        w.clear();
        if w.capacity() > KEEP_CAPACITY {
            w = Vec::new();
        }
        self.wbuf = w;
        gen
    }

    /// [`Router::send_to`] for a message whose large frames are shared buffers: on an
    /// unencrypted connection those are queued by reference and written from where they
    /// are (`writev`), not copied; under CURVE they are boxed like any frame.
    pub fn send_shared(
        &mut self,
        peer: Option<Peer>,
        identity: &[u8],
        frames: &[Part<'_>],
    ) -> Result<Peer, NotConnected> {
        let c = self.route(peer, identity)?;
        let link = self.conns[c].as_ref().expect("a routed connection");
        let by_reference = !link.conn.is_encrypted()
            && frames
                .iter()
                .any(|p| matches!(p, Part::Shared(b) if b.len() >= BIG_FRAME));
        if !by_reference {
            let gen = self.send_on(c, frames.iter().map(Part::bytes));
            return Ok(Peer::of(c, gen));
        }
        let link = self.conns[c].as_mut().expect("a routed connection");
        let mut small = Vec::new();
        let last = frames.len().saturating_sub(1);
        for (i, part) in frames.iter().enumerate() {
            let flags = if i < last { MORE } else { 0 };
            match part {
                Part::Shared(b) if b.len() >= BIG_FRAME => {
                    let (head, n) = frame_head(flags, b.len());
                    small.extend_from_slice(&head[..n]);
                    link.shared.push(std::mem::take(&mut small));
                    link.shared.push((*b).clone());
                }
                _ => put_frame(&mut small, flags, part.bytes()),
            }
        }
        link.shared.push(small);
        self.dirty.push(c);
        Ok(Peer::of(c, link.gen))
    }

    /// The ready connection `peer` while it lasts, else the one admitted as `identity`.
    fn route(&self, peer: Option<Peer>, identity: &[u8]) -> Result<usize, NotConnected> {
        let live = peer.filter(|p| {
            self.conns
                .get(p.conn as usize)
                .and_then(Option::as_ref)
                .is_some_and(|x| x.gen == p.gen && x.conn.is_ready())
        });
        match live {
            Some(p) => Ok(p.conn as usize),
            None => self.by_identity.get(identity).copied().ok_or(NotConnected),
        }
    }

    /// Write what [`Router::send`] queued.
    pub fn flush(&mut self) {
        for c in std::mem::take(&mut self.dirty) {
            self.write(c);
        }
    }

    /// Flush until every queued byte is written or `linger` has passed (at stop).
    pub fn linger(&mut self, linger: Duration) {
        let deadline = Instant::now() + linger;
        self.flush();
        while Instant::now() < deadline && self.conns.iter().flatten().any(|c| !c.idle()) {
            std::thread::sleep(Duration::from_millis(1));
            for c in 0..self.conns.len() {
                if self.conns[c].as_ref().is_some_and(|c| !c.idle()) {
                    self.write(c);
                }
            }
        }
    }

    fn token(c: usize, gen: u32) -> u64 {
        (u64::from(gen) << 32) | c as u64
    }

    fn accept(&mut self, l: usize) {
        loop {
            let (stream, peer) = match self.listeners[l].accept() {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of fds (EMFILE, ENFILE) or memory: the pending connection stays
                    // in the backlog and the listener readable; stop watching it until
                    // the next `expire_handshakes` instead of spinning on it.
                    log::warn!(
                        "worker port: accept failed: {e} (pools wait in the listen backlog; \
                         raise the open-file limit, `ulimit -n`, if this repeats)"
                    );
                    let fd = self.listeners[l].as_raw_fd();
                    let _ = self.ep.modify(fd, epoll::NONE, LISTENER + l as u64);
                    self.paused = true;
                    return;
                }
            };
            let source = peer.ip().to_canonical();
            let curve = self.curve.is_some();
            if curve && !self.make_room_for(source) {
                continue; // dropping `stream` closes it
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let c = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            // 31 bits: a connection's token never reaches the listeners' and the
            // watched fd's.
            self.next_gen = self.next_gen.wrapping_add(1) & 0x7fff_ffff;
            let gen = self.next_gen;
            let token = Self::token(c, gen);
            if let Err(e) = self.ep.add(stream.as_raw_fd(), epoll::IN, token) {
                log::warn!("worker port: cannot watch a connection from {peer}: {e}");
                self.free.push(c);
                continue;
            }
            self.conns[c] = Some(Link {
                stream,
                peer,
                gen,
                pending: curve,
                inbuf: Vec::new(),
                armed: false,
                conn: conn::Conn::new(curve),
                shared: Outbox::default(),
            });
            if curve {
                self.pending += 1;
                *self.pending_by_source.entry(source).or_default() += 1;
            }
            self.handshakes
                .push_back((Instant::now() + self.options.handshakes.timeout, c, gen));
            self.counts.accepted += 1;
            self.dirty.push(c);
        }
    }

    /// Whether a CURVE connection from `source` may start its handshake: not when the
    /// address has its `max_pending_per_source`; past `max_pending` the oldest pending
    /// handshake makes room.
    fn make_room_for(&mut self, source: IpAddr) -> bool {
        let limits = self.options.handshakes;
        let mine = self.pending_by_source.get(&source).copied().unwrap_or(0);
        if mine >= limits.max_pending_per_source {
            self.counts.turned_away += 1;
            if self.crowded_sources.first(source) {
                log::warn!(
                    "worker port: {source} has {mine} connections in their CURVE handshake, the \
                     most one address may have; its further connections are refused until \
                     those finish or time out (logged once per address)"
                );
            }
            return false;
        }
        while self.pending >= limits.max_pending {
            let Some((_, c, gen)) = self.handshakes.pop_front() else {
                break;
            };
            let oldest = self.conns[c].as_ref().filter(|x| x.gen == gen && x.pending);
            if let Some(ip) = oldest.map(|x| x.peer.ip().to_canonical()) {
                self.counts.evicted += 1;
                if self.crowded_sources.first(ip) {
                    log::warn!(
                        "worker port: {} CURVE handshakes pending, the most allowed: dropping \
                         the oldest, from {ip} (logged once per address)",
                        self.pending
                    );
                }
                self.close(c, "dropped for a newer handshake");
            }
        }
        true
    }

    /// A connection leaves the pending CURVE handshakes (admitted or closed).
    fn settle(&mut self, peer: SocketAddr) {
        self.pending -= 1;
        let source = peer.ip().to_canonical();
        if let Some(n) = self.pending_by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.pending_by_source.remove(&source);
            }
        }
    }

    fn close(&mut self, c: usize, why: &str) {
        let Some(conn) = self.conns[c].take() else {
            return;
        };
        if conn.pending {
            self.settle(conn.peer);
        }
        if !why.is_empty() {
            log::debug!(
                "worker port: dropping {} ({:?}): {why}",
                conn.peer,
                String::from_utf8_lossy(conn.conn.identity())
            );
        }
        let identity = conn.conn.identity();
        if !identity.is_empty() && self.by_identity.get(identity) == Some(&c) {
            self.by_identity.remove(identity);
        }
        self.counts.closed += 1;
        self.free.push(c);
        // Out of the epoll and shut down explicitly: a forked child of the user's process
        // may hold the fd open, which would keep both alive.
        let _ = self.ep.delete(conn.stream.as_raw_fd());
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    }

    fn write(&mut self, c: usize) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let out = &mut conn.conn.out;
        let (done, failed) = write_some(&mut conn.stream, out);
        if let Some(e) = failed {
            return self.close(c, &format!("write failed: {e}"));
        }
        if done == out.len() {
            out.clear();
            if out.capacity() > KEEP_CAPACITY {
                *out = Vec::new();
            }
            if let Err(e) = conn.shared.flush(&mut conn.stream) {
                return self.close(c, &format!("write failed: {e}"));
            }
        } else {
            out.drain(..done);
        }
        let want = !conn.idle();
        if want != conn.armed {
            let interest = if want {
                epoll::IN | epoll::OUT
            } else {
                epoll::IN
            };
            let token = Self::token(c, conn.gen);
            conn.armed = want;
            if let Err(e) = self.ep.modify(conn.stream.as_raw_fd(), interest, token) {
                self.close(c, &format!("epoll: {e}"));
            }
        }
    }

    /// Drop connections whose handshake has outlasted [`HandshakeLimits::timeout`] (call
    /// now and then; it looks only at the oldest).
    pub fn expire_handshakes(&mut self) {
        if std::mem::take(&mut self.paused) {
            for (l, listener) in self.listeners.iter().enumerate() {
                let _ = self
                    .ep
                    .modify(listener.as_raw_fd(), epoll::IN, LISTENER + l as u64);
            }
        }
        let now = Instant::now();
        while let Some(&(deadline, c, gen)) = self.handshakes.front() {
            let live = self.conns[c].as_ref().filter(|x| x.gen == gen);
            if live.is_none_or(|x| x.conn.is_ready()) {
                self.handshakes.pop_front();
                continue;
            }
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            self.close(c, "no handshake within the handshake timeout");
        }
    }

    fn read(&mut self, c: usize) {
        let Some(mut conn) = self.conns[c].take() else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        // Read into the router's own buffer (in cache, whichever connection it is), and
        // keep in the connection's only the part of a frame still coming; a connection
        // with such a part reads onto it.
        let mut scratch = std::mem::take(&mut self.scratch);
        let (ended, consumed, parsed);
        if conn.inbuf.is_empty() {
            ended = read_some(fd, &mut scratch, conn.conn.need);
            (consumed, parsed) = self.receive(c, &mut conn, &scratch);
            conn.inbuf.extend_from_slice(&scratch[consumed..]);
        } else {
            let mut inbuf = std::mem::take(&mut conn.inbuf);
            ended = read_some(fd, &mut inbuf, conn.conn.need);
            (consumed, parsed) = self.receive(c, &mut conn, &inbuf);
            if consumed == inbuf.len() {
                inbuf.clear();
                if inbuf.capacity() > KEEP_CAPACITY {
                    inbuf = Vec::new();
                }
            } else {
                inbuf.drain(..consumed);
            }
            conn.inbuf = inbuf;
        }
        scratch.clear();
        if scratch.capacity() > KEEP_CAPACITY {
            scratch = Vec::with_capacity(READ_CHUNK);
        }
        self.scratch = scratch;
        let wants_write = !conn.idle() && !conn.armed;
        self.conns[c] = Some(conn);
        if let Err(why) = parsed {
            self.write(c); // an ERROR for a refused client, best effort
            return self.close(c, &why);
        }
        if wants_write {
            self.dirty.push(c); // a duplicate in `dirty` only costs a write of nothing
        }
        if let Some(why) = ended {
            self.close(c, &why);
        }
    }

    /// Hand `buf` to the connection's protocol state (taken out of `conns` meanwhile).
    fn receive(&mut self, c: usize, link: &mut Link, buf: &[u8]) -> (usize, Result<(), String>) {
        let curve = self.curve.clone();
        let max_frame = self.options.max_frame;
        let before = link.conn.out.len();
        let mut up = Up {
            router: self,
            c,
            gen: link.gen,
            peer: link.peer,
            pending: &mut link.pending,
            backlogged: !link.shared.is_empty(),
        };
        let got = link.conn.receive(buf, curve.as_deref(), max_frame, &mut up);
        // Bytes it answered with go behind what is already queued by reference.
        if !link.shared.is_empty() && link.conn.out.len() > before {
            link.shared.push(link.conn.out.split_off(before));
        }
        got
    }
}

/// What a connection's reads ask of the router.
struct Up<'a> {
    router: &'a mut Router,
    c: usize,
    gen: u32,
    peer: SocketAddr,
    pending: &'a mut bool,
    backlogged: bool,
}

impl Upcalls for Up<'_> {
    /// Route to this connection by `requested` (libzmq's rules: none given gets a
    /// generated one; a leading zero byte is reserved; an identity already connected is
    /// refused).
    fn admit(&mut self, requested: Vec<u8>) -> Result<Vec<u8>, String> {
        let r = &mut *self.router;
        let identity = if requested.is_empty() {
            r.next_anonymous = r.next_anonymous.wrapping_add(1);
            let mut id = vec![0u8];
            id.extend_from_slice(&r.next_anonymous.to_be_bytes());
            id
        } else if requested[0] == 0 {
            return Err("a routing identity starting with a zero byte (reserved)".into());
        } else {
            requested
        };
        if r.by_identity.contains_key(&identity) {
            return Err(format!(
                "identity {:?} is already connected",
                String::from_utf8_lossy(&identity)
            ));
        }
        r.by_identity.insert(identity.clone(), self.c);
        if std::mem::take(self.pending) {
            r.settle(self.peer);
        }
        Ok(identity)
    }

    fn message(&mut self, frames: Vec<zmq::Message>) {
        let peer = Peer::of(self.c, self.gen);
        self.router.incoming.push_back((peer, frames));
    }

    fn spare(&mut self) -> Vec<zmq::Message> {
        self.router.spare.pop().unwrap_or_default()
    }

    fn step(&mut self) {
        self.router.steps += 1;
        self.router.counts.handshake_steps += 1;
    }

    fn backlogged(&self) -> bool {
        self.backlogged
    }

    fn refused(&mut self, key: [u8; 32]) {
        self.router.counts.refused += 1;
        if self.router.refused_keys.first(key) {
            log::warn!(
                "refused a CURVE client from {}: client key {} not in the certificate directory \
                 (its retries are counted, not logged)",
                self.peer.ip(),
                zmq::z85_encode(&key).unwrap_or_default()
            );
        }
    }
}

/// Write as much of `bytes` as the socket takes now: how much, and the error if the
/// connection failed (not for a full socket).
fn write_some(stream: &mut TcpStream, bytes: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    while done < bytes.len() {
        match stream.write(&bytes[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

/// Read what `fd` has onto the end of `buf` (at most [`READ_CHUNK`] a call, sized for
/// `need` more bytes of a frame); why the connection ended, if it did.
fn read_some(fd: i32, buf: &mut Vec<u8>, need: usize) -> Option<String> {
    let mut total = 0;
    loop {
        let want = need.saturating_sub(total).clamp(64 * 1024, RESERVE_AHEAD);
        if buf.capacity() - buf.len() < want / 2 {
            buf.reserve(want);
        }
        let spare = buf.spare_capacity_mut();
        // SAFETY: reading into the vector's spare capacity; set_len covers only the
        // bytes the kernel wrote.
        // recv, not read: a socket's read goes through the file layer first.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), 0) };
        if n > 0 {
            let n = n as usize;
            let full = n == spare.len();
            // SAFETY: see above.
            unsafe { buf.set_len(buf.len() + n) };
            total += n;
            if full && total < READ_CHUNK {
                continue;
            }
            return None;
        }
        if n == 0 {
            return Some("closed by the peer".to_string());
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::Interrupted => {}
            ErrorKind::WouldBlock => return None,
            _ => return Some(format!("read failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zmtp::{greeting, COMMAND};

    fn router(curve: Option<curve::Server>, max_frame: Option<usize>) -> Router {
        let l = bind("127.0.0.1", 0, 128).unwrap();
        Router::new(
            l,
            Options {
                curve,
                max_frame,
                handshakes: HandshakeLimits::default(),
            },
        )
        .unwrap()
    }

    fn dealer(ctx: &zmq::Context, port: u16, identity: Option<&[u8]>) -> zmq::Socket {
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        if let Some(id) = identity {
            s.set_identity(id).unwrap();
        }
        s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        s
    }

    /// Turn the router until a message comes (or 5 s pass).
    fn next(r: &mut Router) -> Option<Vec<Vec<u8>>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut frames = Vec::new();
        while Instant::now() < deadline {
            r.wait(1).unwrap();
            if r.read_into(&mut frames).is_some() {
                return Some(frames.iter().map(|f| f.to_vec()).collect());
            }
            r.expire_handshakes();
        }
        None
    }

    /// Turn the router until `done` holds (at most 5 s); how many messages came meanwhile.
    fn turn_until(r: &mut Router, done: impl Fn(&Router) -> bool) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while !done(r) {
            assert!(Instant::now() < deadline, "not within 5 s: {:?}", r.counts);
            got += turn_for(r, Duration::from_millis(10));
        }
        got
    }

    /// Turn the router for `d`; how many messages came.
    fn turn_for(r: &mut Router, d: Duration) -> usize {
        let deadline = Instant::now() + d;
        let mut frames = Vec::new();
        let mut got = 0;
        while Instant::now() < deadline {
            r.wait(1).unwrap();
            while r.read_into(&mut frames).is_some() {
                got += 1;
            }
        }
        got
    }

    #[test]
    fn libzmq_dealers_round_trip_by_identity_with_large_frames() {
        let mut r = router(None, None);
        let ctx = zmq::Context::new();
        let a = dealer(&ctx, r.port, Some(b"pool-a"));
        let b = dealer(&ctx, r.port, Some(b"pool-b"));
        let big = vec![7u8; 3 << 20];
        a.send_multipart([&b"one"[..], &big[..]], 0).unwrap();
        b.send(&b"two"[..], 0).unwrap();
        let mut got = [next(&mut r).unwrap(), next(&mut r).unwrap()];
        got.sort();
        assert_eq!(
            got[0],
            vec![b"pool-a".to_vec(), b"one".to_vec(), big.clone()]
        );
        assert_eq!(got[1], vec![b"pool-b".to_vec(), b"two".to_vec()]);
        r.send(b"pool-b", [&b"x"[..], &big[..]]).unwrap();
        r.send(b"pool-a", [&b"y"[..]]).unwrap();
        assert!(r.send(b"pool-c", [&b"z"[..]]).is_err(), "no such peer");
        r.flush();
        for (s, want) in [
            (&b, vec![b"x".to_vec(), big.clone()]),
            (&a, vec![b"y".to_vec()]),
        ] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.poll(zmq::POLLIN, 1).unwrap() == 0 {
                assert!(Instant::now() < deadline, "nothing arrived");
                turn_for(&mut r, Duration::from_millis(1));
            }
            assert_eq!(s.recv_multipart(0).unwrap(), want);
        }
        assert_eq!(r.peers(), 2);
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.peers() > 1 {
            assert!(Instant::now() < deadline, "a closed peer stays routable");
            turn_for(&mut r, Duration::from_millis(5));
        }
        assert!(r.send(b"pool-a", [&b"y"[..]]).is_err());
    }

    /// Shared payloads, large and small, interleaved with copied frames and plain sends
    /// on one connection, arrive whole and in order, on a socket too small to take them
    /// at once; the receiver drains them only later.
    #[test]
    fn shared_payloads_go_by_reference_in_order_with_everything_else() {
        let mut r = router(None, None);
        let ctx = zmq::Context::new();
        let d = dealer(&ctx, r.port, Some(b"pool"));
        d.send(&b"hi"[..], 0).unwrap();
        next(&mut r).unwrap();
        let big = Bytes::from(
            (0..(9usize << 20))
                .map(|i| (i % 253) as u8)
                .collect::<Vec<u8>>(),
        );
        let small = Bytes::from_static(b"small");
        let parts = [
            Part::Copy(b"head"),
            Part::Shared(&big),
            Part::Shared(&small),
        ];
        r.send_shared(None, b"pool", &parts).unwrap();
        r.send(b"pool", [&b"after"[..]]).unwrap();
        r.send_shared(None, b"pool", &[Part::Shared(&big.slice(1..=BIG_FRAME))])
            .unwrap();
        assert!(r.send_shared(None, b"nobody", &parts).is_err());
        let want: Vec<Vec<Vec<u8>>> = vec![
            vec![b"head".to_vec(), big.to_vec(), b"small".to_vec()],
            vec![b"after".to_vec()],
            vec![big[1..=BIG_FRAME].to_vec()],
        ];
        for w in want {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.poll(zmq::POLLIN, 1).unwrap() == 0 {
                assert!(Instant::now() < deadline, "nothing arrived");
                turn_for(&mut r, Duration::from_millis(1));
            }
            assert_eq!(d.recv_multipart(0).unwrap(), w);
        }
        assert!(r.conns.iter().flatten().all(Link::idle));
    }

    #[test]
    fn an_anonymous_peer_gets_an_identity_its_answer_reaches() {
        let mut r = router(None, None);
        let ctx = zmq::Context::new();
        let s = dealer(&ctx, r.port, None);
        s.send(&b"probe"[..], 0).unwrap();
        let m = next(&mut r).unwrap();
        assert_eq!(m[0].len(), 5);
        assert_eq!(m[0][0], 0);
        r.send(&m[0], [&b"ack"[..]]).unwrap();
        r.flush();
        assert!(s.poll(zmq::POLLIN, 5000).unwrap() > 0);
        assert_eq!(s.recv_bytes(0).unwrap(), b"ack");
    }

    #[test]
    fn a_second_connection_with_a_connected_identity_is_not_routed() {
        let mut r = router(None, None);
        let ctx = zmq::Context::new();
        let first = dealer(&ctx, r.port, Some(b"same"));
        first.send(&b"1"[..], 0).unwrap();
        assert_eq!(next(&mut r).unwrap()[1], b"1");
        let second = dealer(&ctx, r.port, Some(b"same"));
        second.send(&b"2"[..], 0).unwrap();
        assert_eq!(turn_for(&mut r, Duration::from_millis(300)), 0);
        assert_eq!(r.peers(), 1);
        first.send(&b"3"[..], 0).unwrap();
        assert_eq!(next(&mut r).unwrap()[1], b"3");
    }

    /// A peer sending faster than the caller takes is held back by the kernel's flow
    /// control, not queued without limit: while `INCOMING_HIGH` messages wait, no
    /// connection is read. Taken, every message still arrives.
    #[test]
    fn a_flooding_peer_is_held_back_not_queued_without_limit() {
        const N: usize = 300_000;
        let mut r = router(None, None);
        let ctx = zmq::Context::new();
        let d = dealer(&ctx, r.port, Some(b"flood"));
        d.set_sndhwm(0).unwrap();
        for _ in 0..N {
            d.send(&b"x"[..], 0).unwrap();
        }
        // Until the mark is reached, then a second more of turns without taking.
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.incoming.len() < INCOMING_HIGH {
            assert!(Instant::now() < deadline, "the flood did not arrive");
            r.wait(10).unwrap();
        }
        let more = Instant::now() + Duration::from_secs(1);
        while Instant::now() < more {
            r.wait(1).unwrap();
        }
        let queued = r.incoming.len();
        assert!(queued < N / 2, "{queued} of {N} messages queued unread");
        let mut frames = Vec::new();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < N && Instant::now() < deadline {
            r.wait(1).unwrap();
            while r.read_into(&mut frames).is_some() {
                assert_eq!(frames[1].to_vec(), b"x");
                got += 1;
            }
        }
        assert_eq!(got, N);
    }

    #[test]
    fn oversized_frames_and_junk_drop_the_connection_not_the_router() {
        let mut r = router(None, Some(1000));
        let ctx = zmq::Context::new();
        let s = dealer(&ctx, r.port, Some(b"big"));
        s.send(&vec![0u8; 4 << 20][..], 0).unwrap(); // refused from its header on
        let mut junk = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // A greeting, then a command announcing 2^40 bytes before any handshake: refused
        // from its header, nothing reserved for it.
        let mut huge = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        huge.write_all(&greeting(b"NULL")).unwrap();
        huge.write_all(&[COMMAND | super::super::LONG, 0, 0, 1, 0, 0, 0, 0, 0])
            .unwrap();
        // The DEALER reconnects (libzmq does), its message is gone.
        assert_eq!(turn_until(&mut r, |r| r.counts.closed >= 3), 0);
        let ok = dealer(&ctx, r.port, Some(b"small"));
        ok.send(&vec![0u8; 500][..], 0).unwrap();
        assert_eq!(next(&mut r).unwrap()[1].len(), 500);
    }

    fn curve_dealer(
        ctx: &zmq::Context,
        port: u16,
        server: &zmq::CurveKeyPair,
        me: &zmq::CurveKeyPair,
    ) -> zmq::Socket {
        curve_dealer_with(ctx, port, server, me, |_| {})
    }

    fn curve_dealer_with(
        ctx: &zmq::Context,
        port: u16,
        server: &zmq::CurveKeyPair,
        me: &zmq::CurveKeyPair,
        more: impl FnOnce(&zmq::Socket),
    ) -> zmq::Socket {
        let s = ctx.socket(zmq::DEALER).unwrap();
        more(&s);
        s.set_linger(0).unwrap();
        s.set_identity(&me.public_key[..8]).unwrap();
        s.set_curve_serverkey(&server.public_key).unwrap();
        s.set_curve_publickey(&me.public_key).unwrap();
        s.set_curve_secretkey(&me.secret_key).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        s
    }

    /// libzmq DEALERs that heartbeat (ZMTP PING every 50 ms, give up after 1 s without an
    /// answer) stay connected and see no PONG as data, over NULL and over CURVE.
    #[test]
    fn heartbeating_dealers_are_answered_and_stay_connected() {
        let server = zmq::CurveKeyPair::new().unwrap();
        let client = zmq::CurveKeyPair::new().unwrap();
        let ctx = zmq::Context::new();
        for encrypted in [false, true] {
            let mut r = if encrypted {
                router(
                    Some(curve::Server::new(
                        zeroize::Zeroizing::new(server.secret_key),
                        [client.public_key],
                    )),
                    None,
                )
            } else {
                router(None, None)
            };
            let s = if encrypted {
                curve_dealer_with(&ctx, r.port, &server, &client, |s| {
                    s.set_heartbeat_ivl(50).unwrap();
                    s.set_heartbeat_timeout(1000).unwrap();
                })
            } else {
                let s = ctx.socket(zmq::DEALER).unwrap();
                s.set_linger(0).unwrap();
                s.set_identity(b"beating").unwrap();
                s.set_heartbeat_ivl(50).unwrap();
                s.set_heartbeat_timeout(1000).unwrap();
                s.connect(&format!("tcp://127.0.0.1:{}", r.port)).unwrap();
                s
            };
            s.send(&b"hello"[..], 0).unwrap();
            assert_eq!(next(&mut r).unwrap()[1], b"hello");
            let accepted = r.counts.accepted;
            assert_eq!(
                turn_for(&mut r, Duration::from_millis(2500)),
                0,
                "a PING taken for data"
            );
            assert_eq!(s.poll(zmq::POLLIN, 0).unwrap(), 0, "a PONG taken for data");
            assert_eq!(
                r.counts.accepted, accepted,
                "the DEALER gave up and reconnected"
            );
            assert_eq!(r.peers(), 1);
        }
    }

    #[test]
    fn curve_clients_in_the_allowed_set_talk_and_others_are_refused() {
        let server = zmq::CurveKeyPair::new().unwrap();
        let client = zmq::CurveKeyPair::new().unwrap();
        let rogue = zmq::CurveKeyPair::new().unwrap();
        let mut r = router(
            Some(curve::Server::new(
                zeroize::Zeroizing::new(server.secret_key),
                [client.public_key],
            )),
            None,
        );
        let ctx = zmq::Context::new();
        let s = curve_dealer(&ctx, r.port, &server, &client);
        let payload = vec![3u8; 100_000];
        for i in 0..3u8 {
            s.send_multipart([&[i][..], &payload[..]], 0).unwrap();
        }
        for i in 0..3u8 {
            let m = next(&mut r).unwrap();
            assert_eq!(
                m,
                vec![client.public_key[..8].to_vec(), vec![i], payload.clone()]
            );
        }
        for i in 0..3u8 {
            r.send(&client.public_key[..8], [&[i][..], &payload[..]])
                .unwrap();
        }
        r.flush();
        for i in 0..3u8 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.poll(zmq::POLLIN, 1).unwrap() == 0 {
                assert!(Instant::now() < deadline, "nothing arrived");
                turn_for(&mut r, Duration::from_millis(1));
            }
            assert_eq!(s.recv_multipart(0).unwrap(), vec![vec![i], payload.clone()]);
        }
        let bad = curve_dealer(&ctx, r.port, &server, &rogue);
        bad.send(&b"let me in"[..], 0).unwrap();
        assert_eq!(turn_until(&mut r, |r| r.counts.refused >= 1), 0);
        assert_eq!(r.peers(), 1);
        // A plain (NULL) peer cannot talk to a CURVE router.
        let plain = dealer(&ctx, r.port, Some(b"plain"));
        plain.send(&b"hello"[..], 0).unwrap();
        assert_eq!(turn_for(&mut r, Duration::from_millis(300)), 0);
        assert_eq!(r.peers(), 1);
    }
}
