//! Simulated pools without libzmq on their side: each is a plain nonblocking TCP socket
//! speaking ZMTP 3.0 (NULL mechanism) as a DEALER, and one thread serves thousands of them
//! from one epoll. The interchange under test is unchanged (its libzmq ROUTER cannot tell
//! these peers from `zmq::DEALER`s); what changes is the simulator's own CPU, which shares
//! the machine with the interchange: a libzmq DEALER per simulated pool costs a mailbox
//! (eventfd) wake-up and a thread hand-off per message, which grows with the number of
//! sockets (2.1 us per task at 10 pools, 3.9 at 10,000), where a pool on its own node
//! would pay it on its own CPU.
//!
//! ZMTP 3.0 (rfc.zeromq.org/spec/23): a 64-byte greeting each way, then a READY command
//! with the socket type and the routing identity, then frames of `flags, size, body`
//! (flags: 0x01 more, 0x02 long size, 0x04 command).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

// The framing is the crate's own (`htex_rs::zmtp`, the interchange's worker port).
use htex_rs::api::zmtp::{command, greeting, metadata};
pub use htex_rs::api::zmtp::{put_frame, COMMAND, GREETING, MORE};

/// The frame at the start of `b`, if all of it is there: its flags, header length and
/// body length.
pub fn next_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    htex_rs::api::zmtp::next_frame(b).ok().flatten()
}

/// Append a message (its frames, `MORE` on all but the last).
pub fn put_message<B: AsRef<[u8]>>(out: &mut Vec<u8>, frames: &[B]) {
    for (i, f) in frames.iter().enumerate() {
        let flags = if i + 1 < frames.len() { MORE } else { 0 };
        put_frame(out, flags, f.as_ref());
    }
}

/// Our greeting and READY command: a DEALER whose routing identity is `identity`.
fn handshake(identity: &[u8]) -> Vec<u8> {
    let mut out = greeting(b"NULL").to_vec();
    out[32] = 0; // as-server: a client
    let ready = metadata(&[(b"Socket-Type", b"DEALER"), (b"Identity", identity)]);
    put_frame(&mut out, COMMAND, &command(b"READY", &ready));
    out
}

/// One simulated pool's connection.
pub struct Peer {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes of `inbuf` already parsed.
    start: usize,
    greeted: bool,
    /// Messages to send once the peer's READY has come: libzmq takes any frame before
    /// it has sent its own READY for a handshake command, and drops the connection.
    held: Vec<u8>,
    frames: Vec<Vec<u8>>,
    /// Bytes the socket would not take yet.
    pub outbuf: Vec<u8>,
}

impl Peer {
    /// Connect to `port` on loopback as DEALER `identity`; `first` (the registration)
    /// goes once the handshake is done.
    pub fn connect<B: AsRef<[u8]>>(port: u16, identity: &[u8], first: &[B]) -> Peer {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the interchange");
        stream.set_nodelay(true).unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        put_message(&mut held, first);
        let mut p = Peer {
            stream,
            inbuf: Vec::new(),
            start: 0,
            greeted: false,
            held,
            frames: Vec::new(),
            outbuf: handshake(identity),
        };
        p.flush();
        p
    }

    #[must_use]
    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Write what is queued; what the socket will not take stays in `outbuf`.
    pub fn flush(&mut self) {
        let mut done = 0;
        while done < self.outbuf.len() {
            match self.stream.write(&self.outbuf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock (or the peer is gone): kept for later
            }
        }
        self.outbuf.drain(..done);
    }

    /// Read what has arrived (through `scratch`, one buffer for all of a thread's peers)
    /// and call `on_message` with each whole message (commands skipped). Returns false
    /// when the connection is closed.
    pub fn read(
        &mut self,
        scratch: &mut [u8],
        mut on_message: impl FnMut(Vec<Vec<u8>>, &mut Vec<u8>),
    ) -> bool {
        let mut open = true;
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    if n < scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: all read
            }
        }
        if !self.greeted {
            if self.inbuf.len() < GREETING {
                return open;
            }
            self.start = GREETING;
            self.greeted = true;
        }
        loop {
            let b = &self.inbuf[self.start..];
            let Some((flags, head, size)) = next_frame(b) else {
                break;
            };
            if flags & COMMAND != 0 {
                if b[head..head + size].starts_with(b"\x05READY") {
                    self.outbuf.append(&mut self.held);
                }
            } else {
                self.frames.push(b[head..head + size].to_vec());
                if flags & MORE == 0 {
                    on_message(std::mem::take(&mut self.frames), &mut self.outbuf);
                }
            }
            self.start += head + size;
        }
        self.inbuf.drain(..self.start);
        self.start = 0;
        if !self.outbuf.is_empty() {
            self.flush();
        }
        open
    }
}
