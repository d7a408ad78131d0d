//! Multipart messages over a byte stream: the link between a pool and its worker
//! processes, a plain Unix stream socket per worker. It replaces a ZMQ ipc hop, whose
//! I/O threads cost four thread wake-ups per task round trip on each side.
//!
//! A message is `u32 n` (little-endian), `n` frame lengths (`u32` each), then the frames'
//! bytes back to back. `python/htex_rs/stream.py` is the other end.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use bytes::Bytes;

/// The socket address of a pool's worker URL: `@name` is a Linux abstract socket,
/// anything else a path. The pool binds it, its workers connect to it.
pub fn unix_addr(url: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    match url.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(url),
    }
}

/// (pid, uid) of the process at the other end of a Unix stream (SO_PEERCRED).
#[must_use]
pub fn peer_cred(stream: &UnixStream) -> Option<(u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some((cred.pid as u32, cred.uid))
}

/// At most this many frames in one message (a batch of 64k tasks plus header and meta).
pub const MAX_FRAMES: usize = 1 << 16;

/// Encode one message; a frame the 32-bit lengths cannot carry, or more frames than a
/// decoder accepts, is an error (the sender's limits keep both from happening).
pub fn encode<B: AsRef<[u8]>>(frames: &[B]) -> Result<Vec<u8>, DecodeError> {
    let head = head_of(frames.iter().map(|f| f.as_ref().len()))?;
    let body: usize = frames.iter().map(|f| f.as_ref().len()).sum();
    let mut out = Vec::with_capacity(head.len() + body);
    out.extend_from_slice(&head);
    for f in frames {
        out.extend_from_slice(f.as_ref());
    }
    Ok(out)
}

/// Write one message to a blocking stream, each frame given as parts sent back to back
/// (a header and a pickle, say): nothing is joined or copied on the way.
pub fn write_parts(w: &mut impl Write, frames: &[&[&[u8]]]) -> std::io::Result<()> {
    let lens = frames
        .iter()
        .map(|f| f.iter().map(|p| p.len()).sum::<usize>());
    let head =
        head_of(lens).map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
    let mut slices: Vec<IoSlice> = std::iter::once(IoSlice::new(&head))
        .chain(
            frames
                .iter()
                .flat_map(|f| f.iter().map(|p| IoSlice::new(p))),
        )
        .filter(|s| !s.is_empty())
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The frame count and lengths that start a message with frames of these lengths.
fn head_of(lens: impl ExactSizeIterator<Item = usize>) -> Result<Vec<u8>, DecodeError> {
    let n = lens.len();
    if n > MAX_FRAMES {
        return Err(DecodeError::TooManyFrames(n));
    }
    let mut head = Vec::with_capacity(4 + 4 * n);
    head.extend_from_slice(&(n as u32).to_le_bytes());
    for len in lens {
        let len = u32::try_from(len).map_err(|_| DecodeError::FrameTooLarge(len))?;
        head.extend_from_slice(&len.to_le_bytes());
    }
    Ok(head)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooManyFrames(usize),
    TooLarge(usize),
    /// One frame longer than a u32 length can say (4 GiB).
    FrameTooLarge(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooManyFrames(n) => {
                write!(f, "{n} frames in one message (max {MAX_FRAMES})")
            }
            DecodeError::TooLarge(n) => write!(f, "a {n}-byte message is over the limit"),
            DecodeError::FrameTooLarge(n) => write!(f, "a {n}-byte frame is over 4 GiB"),
        }
    }
}

/// Frames at least this large are read straight into a buffer of their own (a payload
/// reaches its consumer without a copy); smaller ones are cut from the decoder's buffer.
pub const BIG_FRAME: usize = 64 * 1024;

/// Incremental decoder: feed bytes as they arrive (or let it read), take whole messages
/// out. Each frame comes out in a vector of exactly its size.
pub struct Decoder {
    /// Bytes read and not yet cut into frames (from `start`).
    buf: Vec<u8>,
    start: usize,
    max_bytes: usize,
    /// The message whose head has been read.
    open: Option<Open>,
    /// Whole messages not yet taken, and their bytes.
    ready: VecDeque<Vec<Vec<u8>>>,
    held: usize,
    /// What made the stream unreadable (given once the messages before it are taken).
    failed: Option<DecodeError>,
    /// Where small reads land (allocated on first use and kept).
    scratch: Vec<u8>,
}

/// A message being read: its frames' lengths, the frames done, and a large frame being
/// filled in place (how much of it is).
struct Open {
    lens: Vec<usize>,
    frames: Vec<Vec<u8>>,
    big: Option<(Vec<u8>, usize)>,
    size: usize,
}

impl Decoder {
    #[must_use]
    pub fn new(max_bytes: usize) -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            max_bytes,
            open: None,
            ready: VecDeque::new(),
            held: 0,
            failed: None,
            scratch: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.progress();
    }

    /// Read from `r` until it would block, or until more is held than one message may
    /// hold (`next_message` then yields what is whole, or the size error, and the next
    /// call reads on); `Ok(false)` at end of stream. A peer cannot make the decoder hold
    /// more than that however fast it writes. A large frame's bytes are read into its own
    /// buffer directly.
    pub fn fill_from(&mut self, r: &mut impl Read) -> std::io::Result<bool> {
        let bound = self.max_bytes.saturating_add(4 + 4 * MAX_FRAMES);
        loop {
            if self.failed.is_some() || self.buf.len() - self.start + self.held >= bound {
                return Ok(true);
            }
            let got = if let Some((frame, filled)) = self.open.as_mut().and_then(|o| o.big.as_mut())
            {
                let got = r.read(&mut frame[*filled..]);
                if let Ok(n) = got {
                    *filled += n;
                }
                got
            } else {
                // Small messages: through a read buffer kept initialized (no clearing of
                // fresh memory per read), then appended.
                if self.scratch.is_empty() {
                    self.scratch = vec![0; READ_AHEAD];
                }
                let got = r.read(&mut self.scratch);
                if let Ok(n) = got {
                    self.buf.extend_from_slice(&self.scratch[..n]);
                }
                got
            };
            match got {
                Ok(0) => return Ok(false),
                Ok(_) => self.progress(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Vec<Vec<u8>>>, DecodeError> {
        if self.ready.is_empty() {
            self.progress();
        }
        if let Some(m) = self.ready.pop_front() {
            self.held -= m.iter().map(Vec::len).sum::<usize>();
            return Ok(Some(m));
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    /// Cut what is buffered into frames and whole messages, as far as it goes.
    fn progress(&mut self) {
        while self.failed.is_none() {
            if self.open.is_none() {
                match self.head() {
                    Ok(Some(open)) => self.open = Some(open),
                    Ok(None) => break,
                    Err(e) => {
                        self.failed = Some(e);
                        break;
                    }
                }
            }
            let open = self.open.as_mut().expect("opened above");
            while open.frames.len() < open.lens.len() {
                let len = open.lens[open.frames.len()];
                let avail = &self.buf[self.start..];
                if let Some((frame, filled)) = open.big.as_mut() {
                    let take = (len - *filled).min(avail.len());
                    frame[*filled..*filled + take].copy_from_slice(&avail[..take]);
                    *filled += take;
                    self.start += take;
                    if *filled < len {
                        break;
                    }
                    let (frame, _) = open.big.take().expect("a frame being filled");
                    open.frames.push(frame);
                } else if len >= BIG_FRAME {
                    // Zeroed pages straight from the allocator: no pass over the memory.
                    open.big = Some((vec![0; len], 0));
                } else if avail.len() >= len {
                    open.frames.push(avail[..len].to_vec());
                    self.start += len;
                } else {
                    break;
                }
            }
            if open.frames.len() < open.lens.len() {
                break;
            }
            let done = self.open.take().expect("opened above");
            self.held += done.size;
            self.ready.push_back(done.frames);
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) && self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The head of the next message (frame count and lengths), checked against the
    /// limits and consumed; `Ok(None)` if it is not all here yet.
    fn head(&mut self) -> Result<Option<Open>, DecodeError> {
        let avail = &self.buf[self.start..];
        let word = |at: usize| -> Option<usize> {
            avail
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let Some(n) = word(0) else { return Ok(None) };
        if n > MAX_FRAMES {
            return Err(DecodeError::TooManyFrames(n));
        }
        let head = 4 + 4 * n;
        if avail.len() < head {
            return Ok(None);
        }
        let lens: Vec<usize> = (0..n).map(|i| word(4 + 4 * i).unwrap_or(0)).collect();
        let total = lens.iter().fold(head, |t, l| t.saturating_add(*l));
        if total > self.max_bytes {
            return Err(DecodeError::TooLarge(total));
        }
        self.start += head;
        Ok(Some(Open {
            frames: Vec::with_capacity(n),
            lens,
            big: None,
            size: total - head,
        }))
    }
}

/// Bytes asked of the stream per read into the decoder's own buffer.
const READ_AHEAD: usize = 64 * 1024;

/// Tests: the next whole message from a blocking stream, waiting up to 5 s; panics if
/// none comes or the peer closes the stream first.
#[cfg(test)]
pub(crate) fn recv_message(
    s: &std::os::unix::net::UnixStream,
    decoder: &mut Decoder,
) -> Vec<Vec<u8>> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(m) = decoder.next_message().unwrap() {
            return m;
        }
        let n = (&*s).read(&mut buf).expect("no message within 5 s");
        assert!(n > 0, "the peer closed the stream");
        decoder.feed(&buf[..n]);
    }
}

/// Bytes waiting to be written to a non-blocking stream: buffers shared with where they
/// came from (a task's payload is queued, not copied), written with `writev`.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<Bytes>,
    /// Bytes of the front buffer already written.
    offset: usize,
}

impl Outbox {
    pub fn push(&mut self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        if !bytes.is_empty() {
            self.queue.push_back(bytes);
        }
    }

    /// Queue one message whose frames are each their parts back to back (a grant ahead of
    /// a payload, say). A large part is queued by reference; small ones are gathered into
    /// one buffer with the head (a copy of a few bytes costs less than a segment).
    pub fn push_message(&mut self, frames: &[&[Bytes]]) -> Result<(), DecodeError> {
        let mut small = head_of(frames.iter().map(|f| f.iter().map(Bytes::len).sum()))?;
        for part in frames.iter().flat_map(|f| f.iter()) {
            if part.len() >= BIG_FRAME {
                self.push(std::mem::take(&mut small));
                self.push(part.clone());
            } else {
                small.extend_from_slice(part);
            }
        }
        self.push(small);
        Ok(())
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Write as much as the stream takes without blocking; `Err` if it is broken.
    pub fn flush(&mut self, w: &mut impl Write) -> std::io::Result<()> {
        while let Some(front) = self.queue.front() {
            let slices: Vec<IoSlice> = std::iter::once(IoSlice::new(&front[self.offset..]))
                .chain(self.queue.iter().skip(1).take(63).map(|b| IoSlice::new(b)))
                .collect();
            match w.write_vectored(&slices) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let left = self.queue[0].len() - self.offset;
                        if n >= left {
                            n -= left;
                            self.queue.pop_front();
                            self.offset = 0;
                        } else {
                            self.offset += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A libzmq message as [`Bytes`], without a copy (it is freed when the last share goes).
#[must_use]
pub fn message_bytes(m: zmq::Message) -> Bytes {
    struct Owner(zmq::Message);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    Bytes::from_owner(Owner(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_split_anywhere() {
        let msgs: Vec<Vec<Vec<u8>>> = vec![
            vec![b"HX\x01\x42".to_vec(), vec![], b"payload".to_vec()],
            vec![],
            vec![vec![7; 100_000]],
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for cut in [1, 3, 4, 5, 17, 4096, bytes.len()] {
            let mut d = Decoder::new(1 << 20);
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                d.feed(chunk);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "cut every {cut} bytes");
        }
    }

    #[test]
    fn an_endless_writer_fills_the_buffer_only_to_the_limit() {
        // io::repeat never blocks nor ends: an unbounded read would never return.
        let mut d = Decoder::new(1 << 20);
        let mut endless = std::io::repeat(0x41);
        assert!(d.fill_from(&mut endless).unwrap());
        assert!(d.buf.len() <= (1 << 20) + 4 + 4 * MAX_FRAMES + 64 * 1024);
        // 0x41414141 frames: refused by its header.
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::TooManyFrames(_))
        ));
    }

    #[test]
    fn frames_over_4_gib_and_too_many_frames_are_encode_errors() {
        assert_eq!(
            head_of([1usize << 32].into_iter()),
            Err(DecodeError::FrameTooLarge(1 << 32))
        );
        let many = vec![&b""[..]; MAX_FRAMES + 1];
        assert_eq!(
            encode(&many),
            Err(DecodeError::TooManyFrames(MAX_FRAMES + 1))
        );
        assert_eq!(
            encode(&[b"ab"]).unwrap(),
            [1, 0, 0, 0, 2, 0, 0, 0, b'a', b'b']
        );
    }

    #[test]
    fn refuses_oversized_and_absurd_headers() {
        let mut d = Decoder::new(1000);
        d.feed(&encode(&[vec![0u8; 2000]]).unwrap()[..12]);
        assert_eq!(d.next_message(), Err(DecodeError::TooLarge(2008)));
        let mut d = Decoder::new(1000);
        d.feed(&u32::MAX.to_le_bytes());
        assert!(matches!(
            d.next_message(),
            Err(DecodeError::TooManyFrames(_))
        ));
    }

    #[test]
    fn outbox_writes_everything_through_a_socket_pair() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut out = Outbox::default();
        let big = vec![9u8; 3 << 20]; // more than the socket buffer: needs several flushes
        let big = Bytes::from(big);
        out.push_message(&[
            &[big.slice(..1000), big.slice(1000..)],
            &[Bytes::from_static(b"x")],
        ])
        .unwrap();
        out.push(encode(&[b"tail"]).unwrap());
        let reader = std::thread::spawn(move || {
            let mut d = Decoder::new(8 << 20);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while got.len() < 2 {
                let n = b.read(&mut buf).unwrap();
                d.feed(&buf[..n]);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            got
        });
        let mut a = a;
        while !out.is_empty() {
            out.flush(&mut a).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let got = reader.join().unwrap();
        assert_eq!(got[0][0].len(), 3 << 20);
        assert!(got[0][0].iter().all(|b| *b == 9));
        assert_eq!(got[1], vec![b"tail".to_vec()]);
    }

    #[test]
    fn a_large_frame_is_read_into_a_buffer_of_exactly_its_size() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let big: Vec<u8> = (0..(5usize << 20)).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            write_parts(&mut a, &[&[b"HX"], &[&big[..7], &big[7..]], &[]]).unwrap();
            write_parts(&mut a, &[&[b"next"]]).unwrap();
        });
        let mut d = Decoder::new(8 << 20);
        let mut got = Vec::new();
        let mut b = b;
        // Blocking: it reads until the writer is done and has closed its end.
        assert!(!d.fill_from(&mut b).unwrap());
        while let Some(m) = d.next_message().unwrap() {
            got.push(m);
        }
        writer.join().unwrap();
        assert_eq!(got[0][0], b"HX");
        assert_eq!(got[0][1], expected);
        assert_eq!(got[0][1].capacity(), 5 << 20, "its own buffer, no spare");
        assert!(got[0][2].is_empty());
        assert_eq!(got[1], vec![b"next".to_vec()]);
        assert!(
            d.buf.capacity() <= 4 * READ_AHEAD,
            "not staged in the decoder's buffer"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Arbitrary bytes never panic the decoder and never yield more than was fed.
        #[test]
        fn decoder_survives_junk(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut d = Decoder::new(4096);
            d.feed(&bytes);
            for _ in 0..=bytes.len() {
                match d.next_message() {
                    Ok(Some(m)) => prop_assert!(m.iter().map(Vec::len).sum::<usize>() <= bytes.len()),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
