//! One ZMTP 3.1 connection, server side, without I/O: bytes in, messages and bytes out.
//! [`Conn::receive`] takes what the peer sent (greeting, NULL or CURVE handshake,
//! frames), answers in [`Conn::out`] (our greeting and READY, WELCOME, PONG, an ERROR for
//! a refused client) and hands whole messages and the handshake's outcome to its
//! [`Upcalls`]; [`Conn::encode`] frames what we send. The router (`router.rs`) owns the
//! sockets and the routing table and only moves bytes between them and this; a test or a
//! fuzzer drives it with nothing but byte strings.
//!
//! Rules held here against hostile peers: a greeting of another mechanism or none is
//! refused; no frame over 64 KiB before the handshake is done and none over `max_frame`
//! after, refused from the frame's header before its bytes arrive; after the CURVE
//! handshake only MESSAGE boxes; no message of more than [`MAX_FRAMES`] frames; one PONG
//! pending at a time.

use std::borrow::Cow;

use super::curve::{self, Handshake, Refusal, Session};
use super::{
    check_greeting, command, command_body, frame_header, greeting, metadata, next_frame,
    parse_metadata, put_frame, COMMAND, GREETING, MORE,
};

/// Largest frame taken before the handshake is done.
pub const HANDSHAKE_FRAME: usize = 64 * 1024;
/// Most frames in one message (a task batch's payloads, their meta and header).
pub const MAX_FRAMES: usize = crate::stream::MAX_FRAMES + 8;

/// What a connection asks of its owner as it reads.
pub trait Upcalls {
    /// The handshake is done and the peer asked to be routed by `requested` (empty: none
    /// given): the identity to route by, or why the connection must close.
    fn admit(&mut self, requested: Vec<u8>) -> Result<Vec<u8>, String>;
    /// A whole message: the routing identity, then its frames.
    fn message(&mut self, frames: Vec<zmq::Message>);
    /// An empty vector for the next message's frames (a recycled one, where there is).
    fn spare(&mut self) -> Vec<zmq::Message> {
        Vec::new()
    }
    /// A CURVE handshake step (a HELLO or an INITIATE) is about to be taken.
    fn step(&mut self) {}
    /// A CURVE client whose long-term key is not admitted was refused.
    fn refused(&mut self, _key: [u8; 32]) {}
    /// Bytes for the peer wait beyond [`Conn::out`] (so a PING gets no PONG yet).
    fn backlogged(&self) -> bool {
        false
    }
}

enum State {
    Greeting,
    /// Greeted; NULL waits for the peer's READY.
    Null,
    Curve(Handshake),
    Ready,
}

/// Our READY's metadata (libzmq's ROUTER sends an empty Identity too).
#[must_use]
pub fn ready_metadata() -> Vec<u8> {
    metadata(&[(b"Socket-Type", b"ROUTER"), (b"Identity", b"")])
}

/// A connection's protocol state.
pub struct Conn {
    state: State,
    session: Option<Session>,
    /// Routing identity, once admitted.
    identity: Vec<u8>,
    /// Bytes to write to the peer, in order.
    pub out: Vec<u8>,
    /// The message being read: its routing identity, then its frames so far.
    frames: Vec<zmq::Message>,
    /// Bytes still missing of the frame being read (to size the next read).
    pub need: usize,
}

impl Conn {
    /// A connection just accepted: our greeting (and for NULL our READY, which libzmq
    /// reads after the greeting) is already in `out`.
    #[must_use]
    pub fn new(curve: bool) -> Conn {
        let mechanism: &[u8] = if curve { b"CURVE" } else { b"NULL" };
        let mut out = greeting(mechanism).to_vec();
        if !curve {
            put_frame(&mut out, COMMAND, &command(b"READY", &ready_metadata()));
        }
        Conn {
            state: State::Greeting,
            session: None,
            identity: Vec::new(),
            out,
            frames: Vec::new(),
            need: 0,
        }
    }

    /// The handshake is done: messages flow.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Frames go out in CURVE boxes (encrypted, so a copy), not as they are.
    #[must_use]
    pub fn is_encrypted(&self) -> bool {
        self.session.is_some()
    }

    /// The routing identity (empty until admitted).
    #[must_use]
    pub fn identity(&self) -> &[u8] {
        &self.identity
    }

    /// Append `frames`, one message, framed (and boxed, under CURVE) to `w`.
    pub fn encode<B: AsRef<[u8]>>(&mut self, frames: impl IntoIterator<Item = B>, w: &mut Vec<u8>) {
        let mut frames = frames.into_iter().peekable();
        while let Some(f) = frames.next() {
            let flags = if frames.peek().is_some() { MORE } else { 0 };
            match self.session.as_mut() {
                Some(s) => s.encode(flags, f.as_ref(), w),
                None => put_frame(w, flags, f.as_ref()),
            }
        }
    }

    /// Handle the whole frames at the start of `buf` (`server`: the CURVE server, `None`
    /// for NULL; `max_frame`: the largest frame taken once ready); how many bytes they
    /// took, and an error when the connection must close (its `out` may hold an ERROR
    /// for the peer).
    pub fn receive(
        &mut self,
        buf: &[u8],
        server: Option<&curve::Server>,
        max_frame: Option<usize>,
        up: &mut impl Upcalls,
    ) -> (usize, Result<(), String>) {
        let mut pos = 0;
        if matches!(self.state, State::Greeting) {
            if buf.first().is_some_and(|&b| b != 0xff) {
                return (0, Err("not a ZMTP peer".into()));
            }
            if buf.len() < GREETING {
                return (0, Ok(()));
            }
            let mechanism: &[u8] = if server.is_some() { b"CURVE" } else { b"NULL" };
            if let Err(e) = check_greeting(&buf[..GREETING], mechanism) {
                return (0, Err(e));
            }
            pos = GREETING;
            self.state = if server.is_some() {
                State::Curve(Handshake::WaitHello)
            } else {
                State::Null
            };
        }
        self.need = 0;
        let result = loop {
            let frame = match next_frame(&buf[pos..]) {
                Ok(f) => f,
                Err(e) => break Err(e),
            };
            let Some((flags, head, size)) = frame else {
                // A frame still coming: refuse it now if it is too large, else note
                // how much is missing.
                if let Ok(Some((_, head, size))) = frame_header(&buf[pos..]) {
                    if let Err(e) = self.check_size(size, max_frame) {
                        break Err(e);
                    }
                    self.need = (head + size).saturating_sub(buf.len() - pos);
                }
                break Ok(());
            };
            if let Err(e) = self.check_size(size, max_frame) {
                break Err(e);
            }
            let body = &buf[pos + head..pos + head + size];
            pos += head + size;
            if let Err(e) = self.on_frame(flags, body, server, up) {
                break Err(e);
            }
        };
        (pos, result)
    }

    /// A frame of `size` bytes is refused over `max_frame`, and before the handshake is
    /// done over [`HANDSHAKE_FRAME`].
    fn check_size(&self, size: usize, max_frame: Option<usize>) -> Result<(), String> {
        if !self.is_ready() && size > HANDSHAKE_FRAME {
            return Err(format!("a frame of {size} bytes during the handshake"));
        }
        if max_frame.is_some_and(|m| size > m) {
            return Err(format!("a frame of {size} bytes, over max_message_size"));
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        flags: u8,
        body: &[u8],
        server: Option<&curve::Server>,
        up: &mut impl Upcalls,
    ) -> Result<(), String> {
        match self.state {
            State::Greeting => unreachable!("the greeting is read first"),
            State::Null => {
                let md = (flags & COMMAND != 0)
                    .then(|| command_body(body, b"READY"))
                    .flatten()
                    .ok_or("a message before its READY")?;
                let info = parse_metadata(md)?;
                self.admit(info.identity, up)
            }
            State::Curve(ref mut hs) => {
                if flags & COMMAND == 0 {
                    return Err("a message before the CURVE handshake ended".into());
                }
                let server = server.expect("a CURVE connection has a server");
                up.step();
                if matches!(hs, Handshake::WaitHello) {
                    let welcome = hs.hello(server, body).map_err(|r| format!("{r:?}"))?;
                    put_frame(&mut self.out, COMMAND, &welcome);
                    return Ok(());
                }
                match hs.initiate(server, body, &ready_metadata()) {
                    Ok((info, session, ready)) => {
                        put_frame(&mut self.out, COMMAND, &ready);
                        self.session = Some(session);
                        self.admit(info.identity, up)
                    }
                    Err(Refusal::NotAllowed(key)) => {
                        up.refused(key);
                        self.out.extend_from_slice(&curve::error_frame());
                        Err("client key not admitted".into())
                    }
                    Err(Refusal::Protocol(m)) => Err(m),
                }
            }
            State::Ready => {
                let (flags, data) = match self.session.as_mut() {
                    // Once CURVE is up every frame is a MESSAGE box (libzmq's rule too).
                    Some(_) if flags & COMMAND != 0 => {
                        return Err("a plain command after the CURVE handshake".into());
                    }
                    Some(s) => {
                        let (f, d) = s.decode(body)?;
                        (f, Cow::Owned(d))
                    }
                    None => (flags, Cow::Borrowed(body)),
                };
                if flags & COMMAND != 0 {
                    return self.on_command(&data, up);
                }
                if self.frames.is_empty() {
                    // A spare vector only for the message being read: none stays parked
                    // with an idle connection.
                    if self.frames.capacity() == 0 {
                        self.frames = up.spare();
                    }
                    self.frames.push(zmq::Message::from(&self.identity[..]));
                } else if self.frames.len() > MAX_FRAMES {
                    return Err(format!("a message of more than {MAX_FRAMES} frames"));
                }
                self.frames.push(match data {
                    // A large decrypted frame is handed on as it is, not copied.
                    Cow::Owned(d) if d.len() >= crate::stream::BIG_FRAME => zmq::Message::from(d),
                    d => zmq::Message::from(&d[..]),
                });
                if flags & MORE == 0 {
                    up.message(std::mem::take(&mut self.frames));
                }
                Ok(())
            }
        }
    }

    /// A command after the handshake: PING is answered (ZMTP 3.1 heartbeats), ERROR
    /// ends the connection, the rest is ignored.
    fn on_command(&mut self, cmd: &[u8], up: &impl Upcalls) -> Result<(), String> {
        if let Some(ping) = command_body(cmd, b"PING") {
            if !self.out.is_empty() || up.backlogged() {
                return Ok(()); // a peer that does not read gets one PONG, not a pile
            }
            let context = ping.get(2..).unwrap_or_default();
            let pong = command(b"PONG", &context[..context.len().min(16)]);
            match self.session.as_mut() {
                Some(s) => s.encode(COMMAND, &pong, &mut self.out),
                None => put_frame(&mut self.out, COMMAND, &pong),
            }
            return Ok(());
        }
        if command_body(cmd, b"ERROR").is_some() {
            return Err("the peer sent ERROR".into());
        }
        Ok(())
    }

    fn admit(&mut self, requested: Vec<u8>, up: &mut impl Upcalls) -> Result<(), String> {
        self.identity = up.admit(requested)?;
        self.state = State::Ready;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The connection alone, fed byte strings: what a peer can make it do.
    use super::*;
    use crate::protocol::fuzz::cases;
    use proptest::prelude::*;

    /// Records what the connection asks; admits any identity but a taken one.
    #[derive(Default)]
    struct Recorder {
        admitted: Vec<Vec<u8>>,
        messages: Vec<Vec<Vec<u8>>>,
        taken: Vec<Vec<u8>>,
        /// What `backlogged` answers (bytes queued by the owner beyond `out`).
        backlog: bool,
    }

    impl Upcalls for Recorder {
        fn admit(&mut self, requested: Vec<u8>) -> Result<Vec<u8>, String> {
            if self.taken.contains(&requested) {
                return Err("taken".into());
            }
            let id = if requested.is_empty() {
                b"\0anon".to_vec()
            } else {
                requested
            };
            self.admitted.push(id.clone());
            Ok(id)
        }
        fn backlogged(&self) -> bool {
            self.backlog
        }
        fn message(&mut self, frames: Vec<zmq::Message>) {
            self.messages
                .push(frames.iter().map(|f| f.to_vec()).collect());
        }
    }

    fn null_peer(identity: &[u8]) -> Vec<u8> {
        let mut b = greeting(b"NULL").to_vec();
        let md = metadata(&[(b"Socket-Type", b"DEALER"), (b"Identity", identity)]);
        put_frame(&mut b, COMMAND, &command(b"READY", &md));
        b
    }

    #[test]
    fn a_null_peer_is_greeted_admitted_and_its_messages_come_out_whole_in_any_split() {
        let mut bytes = null_peer(b"pool-1");
        put_frame(&mut bytes, MORE, b"head");
        put_frame(&mut bytes, 0, b"body");
        put_frame(&mut bytes, 0, b"second");
        for split in [1, 7, 63, 64, 65, 80, bytes.len()] {
            let mut c = Conn::new(false);
            assert!(c.out.starts_with(&greeting(b"NULL")));
            let mut r = Recorder::default();
            let mut buf = Vec::new();
            for chunk in bytes.chunks(split) {
                buf.extend_from_slice(chunk);
                let (used, res) = c.receive(&buf, None, None, &mut r);
                res.unwrap();
                buf.drain(..used);
            }
            assert!(buf.is_empty() && c.is_ready());
            assert_eq!(r.admitted, vec![b"pool-1".to_vec()]);
            assert_eq!(
                r.messages,
                vec![
                    vec![b"pool-1".to_vec(), b"head".to_vec(), b"body".to_vec()],
                    vec![b"pool-1".to_vec(), b"second".to_vec()]
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn what_a_peer_cannot_do() {
        let refuse = |bytes: &[u8], curve: bool| {
            let server = curve.then(|| curve::Server::new(curve::keypair().1, std::iter::empty()));
            let mut c = Conn::new(curve);
            let mut r = Recorder::default();
            let (_, res) = c.receive(bytes, server.as_ref(), Some(1000), &mut r);
            assert!(r.messages.is_empty());
            res.expect_err("refused")
        };
        assert_eq!(refuse(b"GET / HTTP/1.1\r\n", false), "not a ZMTP peer");
        // Another mechanism than ours.
        assert!(refuse(&greeting(b"NULL"), true).contains("mechanism"));
        // A message before READY; a big frame before the handshake; one over max_frame.
        let mut b = greeting(b"NULL").to_vec();
        put_frame(&mut b, 0, b"hello");
        assert_eq!(refuse(&b, false), "a message before its READY");
        let mut b = greeting(b"NULL").to_vec();
        b.extend_from_slice(&[0x06, 0, 0, 0, 0, 0, 1, 0, 1]);
        assert!(refuse(&b, false).contains("during the handshake"));
        let mut b = null_peer(b"p");
        b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert!(refuse(&b, false).contains("over max_message_size"));
        // A routing identity already connected.
        let mut c = Conn::new(false);
        let mut r = Recorder {
            taken: vec![b"p".to_vec()],
            ..Recorder::default()
        };
        assert_eq!(
            c.receive(&null_peer(b"p"), None, None, &mut r).1,
            Err("taken".into())
        );
        // Plain frames on a CURVE connection are refused before the handshake ends.
        let mut b = greeting(b"CURVE").to_vec();
        put_frame(&mut b, 0, b"plain");
        assert!(refuse(&b, true).contains("before the CURVE handshake"));
    }

    #[test]
    fn a_ping_gets_one_pong_and_error_closes() {
        let mut c = Conn::new(false);
        let mut r = Recorder::default();
        c.receive(&null_peer(b"p"), None, None, &mut r).1.unwrap();
        c.out.clear();
        let mut b = Vec::new();
        put_frame(&mut b, COMMAND, &command(b"PING", b"\0\x0aCTX"));
        put_frame(&mut b, COMMAND, &command(b"PING", b"\0\x0aCTX"));
        c.receive(&b, None, None, &mut r).1.unwrap();
        let mut pong = Vec::new();
        put_frame(&mut pong, COMMAND, &command(b"PONG", b"CTX"));
        assert_eq!(c.out, pong, "one PONG while the first is unwritten");
        // Bytes the owner still holds (a payload queued by reference): no PONG either,
        // so a peer that does not read cannot pile them up.
        c.out.clear();
        r.backlog = true;
        let mut b = Vec::new();
        put_frame(&mut b, COMMAND, &command(b"PING", b"\0\x0aCTX"));
        c.receive(&b, None, None, &mut r).1.unwrap();
        assert!(c.out.is_empty(), "no PONG while the owner is backlogged");
        r.backlog = false;
        c.receive(&b, None, None, &mut r).1.unwrap();
        assert_eq!(c.out, pong);
        let mut b = Vec::new();
        put_frame(&mut b, COMMAND, &command(b"ERROR", b"\x03bye"));
        assert_eq!(
            c.receive(&b, None, None, &mut r).1,
            Err("the peer sent ERROR".into())
        );
    }

    proptest! {
        #![proptest_config(cases(5_000, 200_000))]

        /// Whatever bytes a peer sends, in whatever pieces: no panic, nothing taken past
        /// the buffer, no message before admission, and no message from a CURVE
        /// connection that never finished its handshake.
        #[test]
        fn any_bytes_in_any_pieces(
            curve in any::<bool>(),
            prefix in any::<bool>(),
            junk in proptest::collection::vec(any::<u8>(), 0..400),
            cut in 1usize..64,
        ) {
            let server = curve.then(|| curve::Server::new(curve::keypair().1, std::iter::empty()));
            let mut bytes = Vec::new();
            if prefix {
                bytes = if curve { greeting(b"CURVE").to_vec() } else { null_peer(b"f") };
            }
            bytes.extend_from_slice(&junk);
            let mut c = Conn::new(curve);
            let mut r = Recorder::default();
            let mut buf = Vec::new();
            for chunk in bytes.chunks(cut) {
                buf.extend_from_slice(chunk);
                let (used, res) = c.receive(&buf, server.as_ref(), Some(1 << 20), &mut r);
                prop_assert!(used <= buf.len());
                buf.drain(..used);
                if res.is_err() {
                    break;
                }
            }
            prop_assert!(r.messages.is_empty() || !r.admitted.is_empty());
            if curve {
                prop_assert!(r.messages.is_empty(), "no admitted client key");
            }
        }
    }
}
