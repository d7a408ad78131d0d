//! The floor under the scale bench: the least any interchange could do per message, to
//! tell what the 10,000-pool ratio is bounded by on this machine. One thread, one epoll,
//! plain TCP sockets speaking ZMTP 3.0 as a ROUTER (the same framing as the simulated
//! pools, `zmtp.rs`): it admits registrations, and for every results message it counts
//! the results and writes the next batch of tasks to that connection at once. No task
//! queue, no manager table, no priorities, no heartbeats, no libzmq: what is left is the
//! cost of reading and writing one message on each of thousands of connections.
//!
//! `HTEX_RS_SCALE_IX=floor cargo bench --bench scale` runs the whole table against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use htex_rs::api::protocol::{encode_meta, header, Kind};

use htex_rs::api::zmtp::{command, greeting, metadata};

use crate::zmtp::{next_frame, put_frame, COMMAND, GREETING, MORE};

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    greeted: bool,
    /// Frames of the message being read so far, and its first frame's kind.
    frames: usize,
    kind: Option<Kind>,
    outbuf: Vec<u8>,
}

/// The floor router: its listener, connections and counters.
pub struct Floor {
    listener: TcpListener,
    pub port: u16,
    ep: i32,
    conns: Vec<Conn>,
    pub registered: usize,
    pub results: u64,
    /// Tasks handed out so far, and how many to hand out in all.
    sent: u64,
    total: u64,
    capacity: u64,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    pending: Vec<usize>,
}

const LISTENER: u64 = u64::MAX;

fn kind_of(frame: &[u8]) -> Option<Kind> {
    [Kind::Register, Kind::Results, Kind::Heartbeat]
        .into_iter()
        .find(|k| header(*k)[..] == *frame)
}

impl Floor {
    /// Listen on a free loopback port; each pool gets up to `capacity` tasks at a time.
    pub fn bind(capacity: u32) -> Floor {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        // std listens with a backlog of 128: a storm of 10,000 would wait out SYN retries.
        // SAFETY: listen on our own bound socket (Linux takes a second call as a resize).
        unsafe { libc::listen(listener.as_raw_fd(), 65_535) };
        let port = listener.local_addr().unwrap().port();
        // SAFETY: plain epoll calls on fds we own.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: LISTENER,
        };
        // SAFETY: as above.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), &raw mut ev) };
        Floor {
            listener,
            port,
            ep,
            conns: Vec::new(),
            registered: 0,
            results: 0,
            sent: 0,
            total: 0,
            capacity: u64::from(capacity),
            payload: vec![0; 100],
            scratch: vec![0; 65_536],
            pending: Vec::new(),
        }
    }

    /// Hand out `n` more tasks: every connection gets a batch now, and another as each
    /// batch comes back, until they are all out.
    pub fn start(&mut self, n: u64) {
        self.total += n;
        for c in 0..self.conns.len() {
            self.refill(c, self.capacity);
        }
    }

    /// One task to connection `c` (one-at-a-time latency).
    pub fn one(&mut self, c: usize) {
        self.total += 1;
        self.refill(c, 1);
    }

    fn refill(&mut self, c: usize, most: u64) {
        let n = most.min(self.total - self.sent);
        if n == 0 {
            return;
        }
        let first = self.sent + 1;
        self.sent += n;
        let meta: Vec<(u64, u8)> = (first..first + n).map(|id| (id, 0)).collect();
        let out = &mut self.conns[c].outbuf;
        put_frame(out, MORE, &header(Kind::Tasks));
        put_frame(out, MORE, &encode_meta(&meta));
        for i in 0..n {
            put_frame(out, if i + 1 < n { MORE } else { 0 }, &self.payload);
        }
        self.flush(c);
    }

    fn flush(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        let mut done = 0;
        while done < conn.outbuf.len() {
            match conn.stream.write(&conn.outbuf[done..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        conn.outbuf.drain(..done);
        if !conn.outbuf.is_empty() && !self.pending.contains(&c) {
            self.pending.push(c);
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            stream.set_nonblocking(true).unwrap();
            stream.set_nodelay(true).unwrap();
            let n = self.conns.len();
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: n as u64,
            };
            // SAFETY: the stream's fd is open; ev lives across the call.
            unsafe {
                libc::epoll_ctl(
                    self.ep,
                    libc::EPOLL_CTL_ADD,
                    stream.as_raw_fd(),
                    &raw mut ev,
                )
            };
            let mut outbuf = greeting(b"NULL").to_vec();
            let ready = metadata(&[(b"Socket-Type", b"ROUTER")]);
            put_frame(&mut outbuf, COMMAND, &command(b"READY", &ready));
            self.conns.push(Conn {
                stream,
                inbuf: Vec::new(),
                greeted: false,
                frames: 0,
                kind: None,
                outbuf,
            });
            self.flush(n);
        }
    }

    fn read(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        loop {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    conn.inbuf.extend_from_slice(&self.scratch[..n]);
                    if n < self.scratch.len() {
                        break;
                    }
                }
            }
        }
        let mut start = 0;
        if !conn.greeted {
            if conn.inbuf.len() < GREETING {
                return;
            }
            start = GREETING;
            conn.greeted = true;
        }
        let mut batches_back = 0;
        while let Some((flags, head, size)) = next_frame(&conn.inbuf[start..]) {
            if flags & COMMAND == 0 {
                if conn.frames == 0 {
                    conn.kind = kind_of(&conn.inbuf[start + head..start + head + size]);
                }
                conn.frames += 1;
                if flags & MORE == 0 {
                    match conn.kind {
                        Some(Kind::Register) => self.registered += 1,
                        Some(Kind::Results) => {
                            self.results += conn.frames as u64 - 2;
                            batches_back += 1;
                        }
                        _ => {}
                    }
                    conn.frames = 0;
                }
            }
            start += head + size;
        }
        conn.inbuf.drain(..start);
        for _ in 0..batches_back {
            self.refill(c, self.capacity);
        }
    }

    /// One pass: wait up to `wait_ms` for sockets, then read and answer what is ready.
    pub fn turn(&mut self, wait_ms: i32) {
        let pending = std::mem::take(&mut self.pending);
        for c in pending {
            self.flush(c);
        }
        let wait_ms = if self.pending.is_empty() { wait_ms } else { 0 };
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        // SAFETY: events has room for 256 entries.
        let n = unsafe { libc::epoll_wait(self.ep, events.as_mut_ptr(), 256, wait_ms) };
        for e in events.iter().take(usize::try_from(n).unwrap_or(0)) {
            match e.u64 {
                LISTENER => self.accept(),
                c => self.read(usize::try_from(c).unwrap()),
            }
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        // SAFETY: the epoll fd is ours.
        unsafe { libc::close(self.ep) };
    }
}
