//! The worker port under attack: each case a reviewer tries first against a CurveZMQ
//! server, and the libzmq 4.3.5 security cases that apply to it (docs/security.md keeps
//! the table). Handshake and session cases drive [`Handshake`] and [`Session`] with the
//! test client; socket cases run a real [`Router`] against raw TCP peers and libzmq
//! DEALERs, and check that nothing reached the message path and that an honest pool
//! still gets through afterwards.

#![allow(clippy::many_single_char_names)] // p: the port, k: its keys, c: a client

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::curve::{Handshake, Refusal, Server, Session};
use super::router::{bind, HandshakeLimits, Options, Router};
use super::test_client::{forge_cookie, Client, Initiate};
use super::{command, frame_head, greeting, metadata, next_frame, put_frame, COMMAND, GREETING};

const READY_MD: &[u8] = b"\x0bSocket-Type\x00\x00\x00\x06ROUTER";

struct Keys {
    secret: [u8; 32],
    server: Server,
    server_public: [u8; 32],
    /// An admitted client's key pair.
    allowed: ([u8; 32], [u8; 32]),
}

fn keys() -> Keys {
    let s = zmq::CurveKeyPair::new().unwrap();
    let c = zmq::CurveKeyPair::new().unwrap();
    Keys {
        secret: s.secret_key,
        server: Server::new(Zeroizing::new(s.secret_key), [c.public_key]),
        server_public: s.public_key,
        allowed: (c.public_key, c.secret_key),
    }
}

impl Keys {
    /// Another server with the same keys (a router owns its own).
    fn server(&self) -> Server {
        Server::new(Zeroizing::new(self.secret), [self.allowed.0])
    }
}

fn allowed_client(k: &Keys) -> Client {
    Client::with_keys(k.server_public, k.allowed.0, k.allowed.1)
}

/// HELLO and WELCOME done: the server's handshake waits for INITIATE.
fn welcomed(k: &Keys, c: &mut Client) -> Handshake {
    let mut hs = Handshake::WaitHello;
    let welcome = hs.hello(&k.server, &c.hello()).expect("an honest HELLO");
    c.welcome(&welcome).unwrap();
    hs
}

fn initiate(k: &Keys, c: &mut Client, how: &Initiate) -> Result<Session, Refusal> {
    let hs = welcomed(k, c);
    let body = c.initiate(how);
    hs.initiate(&k.server, &body, READY_MD)
        .map(|(info, session, ready)| {
            assert_eq!(c.ready(&ready).unwrap(), READY_MD);
            assert_eq!(info.identity, b"mallory");
            session
        })
}

fn refused(r: Result<Session, Refusal>, why: &str) {
    match r {
        Err(Refusal::Protocol(m)) => assert!(m.contains(why), "refused for {m:?}, not {why:?}"),
        Err(other) => panic!("refused as {other:?}, not for {why:?}"),
        Ok(_) => panic!("admitted; wanted a refusal for {why:?}"),
    }
}

fn established(k: &Keys) -> (Client, Session) {
    let mut c = allowed_client(k);
    let s = initiate(k, &mut c, &Initiate::default()).expect("an honest client");
    (c, s)
}

// ------------------------------------------------------------------ the handshake

#[test]
fn an_honest_client_is_admitted_and_messages_flow_both_ways() {
    let k = keys();
    let (mut c, mut s) = established(&k);
    let (flags, body) = s.decode(&c.message(0x01, b"task", None)).unwrap();
    assert_eq!((flags, &body[..]), (super::MORE, &b"task"[..]));
    let mut out = Vec::new();
    s.encode(0, b"result", &mut out);
    let (_, head, size) = next_frame(&out).unwrap().unwrap();
    assert_eq!(
        c.open_message(&out[head..head + size]),
        Some((0, b"result".to_vec()))
    );
}

#[test]
fn a_client_that_is_not_allowed_is_refused_by_key() {
    let k = keys();
    let mut c = Client::new(k.server_public);
    assert!(matches!(
        initiate(&k, &mut c, &Initiate::default()),
        Err(Refusal::NotAllowed(key)) if key == c.long_public
    ));
}

/// Impersonation: the INITIATE names an admitted key, but the vouch is sealed with
/// another secret (the attacker's own).
#[test]
fn an_allowed_key_with_a_vouch_signed_by_another_secret_is_refused() {
    let k = keys();
    let mut c = Client::new(k.server_public);
    let mallory_secret = zmq::CurveKeyPair::new().unwrap().secret_key;
    let how = Initiate {
        long_public: Some(k.allowed.0),
        vouch_signer: Some(mallory_secret),
        ..Initiate::default()
    };
    refused(initiate(&k, &mut c, &how), "cannot open the INITIATE vouch");
}

#[test]
fn a_vouch_for_another_short_term_key_is_refused() {
    let k = keys();
    let mut c = allowed_client(&k);
    let other = Client::new(k.server_public).short_public;
    let how = Initiate {
        vouch_short: Some(other),
        ..Initiate::default()
    };
    refused(
        initiate(&k, &mut c, &how),
        "vouch is for another short-term key",
    );
}

/// RFC 26: the server validates every field of the vouch, its own key included (a vouch
/// made for another server must not open a session with this one). libzmq skips it.
#[test]
fn a_vouch_for_another_server_key_is_refused() {
    let k = keys();
    let mut c = allowed_client(&k);
    let how = Initiate {
        vouch_server: Some(zmq::CurveKeyPair::new().unwrap().public_key),
        ..Initiate::default()
    };
    refused(initiate(&k, &mut c, &how), "vouch is for another server");
}

/// libzmq's test_null_client_public_key and test_null_client_secret_key.
#[test]
fn a_zero_client_key_or_secret_is_refused_before_the_allowed_set() {
    let k = keys();
    let mut c = Client::new(k.server_public);
    let how = Initiate {
        long_public: Some([0; 32]),
        ..Initiate::default()
    };
    refused(initiate(&k, &mut c, &how), "low-order long-term key");
    let mut c = allowed_client(&k);
    let how = Initiate {
        vouch_signer: Some([0; 32]),
        ..Initiate::default()
    };
    refused(initiate(&k, &mut c, &how), "cannot open the INITIATE vouch");
}

#[test]
fn a_cookie_from_another_connection_is_refused() {
    let k = keys();
    // The same client, same short-term key, on two connections: each cookie is under its
    // own connection's key.
    let mut c = allowed_client(&k);
    let first = welcomed(&k, &mut c);
    let cookie_a = c.cookie.clone().unwrap();
    let second = welcomed(&k, &mut c);
    let body = c.initiate(&Initiate {
        cookie: Some(cookie_a),
        ..Initiate::default()
    });
    refused(
        second.initiate(&k.server, &body, READY_MD).map(|x| x.1),
        "bad cookie",
    );
    drop(first);
    // A cookie this client could make itself (it knows C' but not the server's cookie key
    // nor s') is no better.
    let mut c = allowed_client(&k);
    let hs = welcomed(&k, &mut c);
    let forged = forge_cookie(&[7; 32], &c.short_public, &[9; 32]);
    let body = c.initiate(&Initiate {
        cookie: Some(forged),
        ..Initiate::default()
    });
    refused(
        hs.initiate(&k.server, &body, READY_MD).map(|x| x.1),
        "bad cookie",
    );
}

#[test]
fn a_tampered_cookie_or_initiate_box_is_refused() {
    let k = keys();
    // Offsets: 9..25 the cookie's nonce, 25..105 its box (libzmq flips 30), 113.. the
    // INITIATE box (libzmq flips 150).
    for (at, why) in [
        (12, "bad cookie"),
        (30, "bad cookie"),
        (104, "bad cookie"),
        (110, "cannot open INITIATE"),
        (150, "cannot open INITIATE"),
        (260, "cannot open INITIATE"),
    ] {
        let mut c = allowed_client(&k);
        let hs = welcomed(&k, &mut c);
        let mut body = c.initiate(&Initiate::default());
        body[at] ^= 0x20;
        refused(hs.initiate(&k.server, &body, READY_MD).map(|x| x.1), why);
    }
}

#[test]
fn malformed_and_out_of_turn_hellos_are_refused() {
    let k = keys();
    let mut c = Client::new(k.server_public);
    let good = c.hello();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\x05HELLO".to_vec(), "malformed HELLO"), // libzmq's wrong_length
        (good[..199].to_vec(), "malformed HELLO"),
        ([&good[..], b"x"].concat(), "malformed HELLO"),
    ];
    let mut name = good.clone();
    name[5] = b'X'; // libzmq's invalid_hello_command_name
    cases.push((name, "malformed HELLO"));
    for (at, v) in [(6, 2), (7, 1)] {
        let mut version = good.clone(); // libzmq's invalid_hello_version
        version[at] = v;
        cases.push((version, "unknown CurveZMQ version"));
    }
    let mut flipped = good.clone();
    flipped[150] ^= 1;
    cases.push((flipped, "cannot open HELLO"));
    let mut zero_key = good.clone();
    zero_key[80..112].fill(0);
    cases.push((zero_key, "low-order"));
    for (bytes, why) in cases {
        match Handshake::WaitHello.hello(&k.server, &bytes) {
            Err(Refusal::Protocol(m)) => assert!(m.contains(why), "{m:?} for {why:?}"),
            other => panic!("{why}: {:?}", other.map(|_| ())),
        }
    }
    // A second HELLO after the WELCOME.
    let mut hs = welcomed(&k, &mut c);
    assert!(hs.hello(&k.server, &c.hello()).is_err());
}

/// A HELLO whose box opens but does not hold 64 zeros is not a CurveZMQ client's.
#[test]
fn a_hello_signature_that_is_not_zeros_is_refused() {
    let k = keys();
    let c = Client::new(k.server_public);
    let (short_public, short_secret) = super::curve::keypair();
    let key = super::curve::agree(&c.server, &short_secret).unwrap();
    let n = 1u64.to_be_bytes();
    let mut body = b"\x05HELLO\x01\x00".to_vec();
    body.extend_from_slice(&[0u8; 72]);
    body.extend_from_slice(&short_public);
    body.extend_from_slice(&n);
    body.extend_from_slice(&super::curve::seal(
        &[1u8; 64],
        &super::curve::nonce(b"CurveZMQHELLO---", &n),
        &key,
    ));
    let r = Handshake::WaitHello.hello(&k.server, &body);
    assert!(matches!(r, Err(Refusal::Protocol(m)) if m.contains("not 64 zeros")));
}

#[test]
fn malformed_and_out_of_turn_initiates_are_refused() {
    let k = keys();
    let mut c = allowed_client(&k);
    let hs = welcomed(&k, &mut c);
    let good = c.initiate(&Initiate::default());
    // Before any HELLO.
    assert!(Handshake::WaitHello
        .initiate(&k.server, &good, READY_MD)
        .is_err());
    let mut name = good.clone();
    name[5] = b'X'; // libzmq's invalid_initiate_command_name
    for (bytes, why) in [
        (b"\x08INITIATE".to_vec(), "malformed INITIATE"), // libzmq's wrong_length
        (good[..256].to_vec(), "malformed INITIATE"),
        (name, "malformed INITIATE"),
    ] {
        refused(hs.initiate(&k.server, &bytes, READY_MD).map(|x| x.1), why);
    }
    // No metadata, or metadata of a socket that cannot talk to a ROUTER.
    for md in [Vec::new(), metadata(&[(b"Socket-Type", b"PUB")])] {
        let mut c = allowed_client(&k);
        let r = initiate(
            &k,
            &mut c,
            &Initiate {
                metadata: Some(md),
                ..Initiate::default()
            },
        );
        assert!(matches!(r, Err(Refusal::Protocol(m)) if m.contains("cannot talk to a ROUTER")));
    }
    // The honest INITIATE still opens the session (the refusals above changed nothing).
    assert!(hs.initiate(&k.server, &good, READY_MD).is_ok());
}

// ------------------------------------------------------------------ the session

#[test]
fn a_replayed_message_and_a_nonce_going_backwards_are_refused() {
    let k = keys();
    let (mut c, mut s) = established(&k);
    let first = c.message(0, b"one", None);
    assert!(s.decode(&first).is_ok());
    let replay = s.decode(&first).unwrap_err();
    assert!(replay.contains("out of sequence"), "{replay}");
    let n = c.nonce;
    let ahead = c.message(0, b"ahead", Some(n + 10));
    assert!(s.decode(&ahead).is_ok());
    let behind = c.message(0, b"behind", Some(n + 5));
    assert!(s.decode(&behind).unwrap_err().contains("out of sequence"));
    // The same nonce again, with other content.
    let same = c.message(0, b"other", Some(n + 10));
    assert!(s.decode(&same).is_err());
}

#[test]
fn a_bit_flipped_message_never_opens_and_changes_nothing() {
    let k = keys();
    let (mut c, mut s) = established(&k);
    let good = c.message(0, b"a task's bytes", None);
    // Every bit of the nonce, the MAC and the ciphertext (the prefix is checked first).
    for at in super::curve::MESSAGE.len()..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[at] ^= 1 << bit;
            assert!(s.decode(&bad).is_err(), "byte {at} bit {bit} opened");
        }
    }
    // Nothing above moved the session: the honest message still opens.
    assert_eq!(s.decode(&good).unwrap().1, b"a task's bytes");
}

/// A MESSAGE the server sent, reflected back at it: its nonce prefix is the server's
/// ("CurveZMQMESSAGES"), so it does not open as the client's, whatever its nonce.
#[test]
fn the_servers_own_message_reflected_back_is_refused() {
    let k = keys();
    let (_c, mut s) = established(&k);
    let mut out = Vec::new();
    for _ in 0..20 {
        out.clear();
        s.encode(0, b"result", &mut out); // nonces climb past the client's
    }
    let (_, head, size) = next_frame(&out).unwrap().unwrap();
    let reflected = &out[head..head + size];
    assert!(s.decode(reflected).unwrap_err().contains("does not open"));
}

proptest::proptest! {
    #![proptest_config(crate::protocol::fuzz::cases(1_000, 20_000))]

    /// Random changes to a genuine MESSAGE of a real session (one to eight bytes, and
    /// truncation or extension) never open; the session takes the genuine one after.
    #[test]
    fn a_forged_message_never_opens_in_a_real_session(
        edits in proptest::collection::vec((0usize..64, 1u8..=255), 1..8),
        cut in proptest::option::of(0usize..64),
        extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
    ) {
        let k = keys();
        let (mut c, mut s) = established(&k);
        let good = c.message(0, b"payload of a task, some bytes long", None);
        let mut bad = good.clone();
        for (at, x) in &edits {
            let at = at % bad.len();
            bad[at] ^= x;
        }
        if let Some(cut) = cut {
            bad.truncate(cut.min(bad.len()));
        }
        bad.extend_from_slice(&extra);
        if bad != good {
            proptest::prop_assert!(s.decode(&bad).is_err(), "a forged MESSAGE opened");
        }
        proptest::prop_assert!(s.decode(&good).is_ok() || bad == good);
    }
}

// ------------------------------------------------------------------ over sockets

fn router_with(limits: HandshakeLimits) -> (Port, Keys) {
    let k = keys();
    let l = bind("127.0.0.1", 0, 1024).unwrap();
    let options = Options {
        curve: Some(k.server()),
        max_frame: None,
        handshakes: limits,
    };
    let port = Port {
        r: Router::new(l, options).unwrap(),
        delivered: Vec::new(),
    };
    (port, k)
}

fn curve_router() -> (Port, Keys) {
    router_with(HandshakeLimits::default())
}

/// A router and every message it delivered.
struct Port {
    r: Router,
    delivered: Vec<Vec<Vec<u8>>>,
}

impl Port {
    fn turn(&mut self) {
        self.r.wait(1).unwrap();
        self.r.expire_handshakes();
        let mut frames = Vec::new();
        while self.r.read_into(&mut frames).is_some() {
            self.delivered
                .push(frames.iter().map(|f| f.to_vec()).collect());
        }
    }

    fn turn_until(&mut self, what: &str, mut done: impl FnMut(&mut Port) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "not within 5 s: {what} ({:?})",
                self.r.counts
            );
            self.turn();
        }
    }

    /// An honest libzmq DEALER still gets its message through and an answer back.
    fn serves_an_honest_pool(&mut self, k: &Keys) {
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_identity(b"honest").unwrap();
        s.set_curve_serverkey(&k.server_public).unwrap();
        s.set_curve_publickey(&k.allowed.0).unwrap();
        s.set_curve_secretkey(&k.allowed.1).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{}", self.r.port))
            .unwrap();
        s.send(&b"task"[..], 0).unwrap();
        let before = self.delivered.len();
        self.turn_until("the honest pool's message", |p| p.delivered.len() > before);
        assert_eq!(
            self.delivered.last().unwrap(),
            &[b"honest".to_vec(), b"task".to_vec()]
        );
        self.r.send(b"honest", [&b"result"[..]]).unwrap();
        self.turn_until("the answer to the honest pool", |_| {
            s.poll(zmq::POLLIN, 0).unwrap() > 0
        });
        assert_eq!(s.recv_bytes(0).unwrap(), b"result");
    }
}

/// A peer over raw TCP: what it writes and reads is up to the test.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    closed: bool,
    /// Everything written, for replaying on another connection.
    sent: Vec<u8>,
}

fn client_greeting(mechanism: &[u8]) -> [u8; GREETING] {
    let mut g = greeting(mechanism);
    g[32] = 0; // as-server off
    g
}

impl Raw {
    fn connect(p: &Port) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", p.r.port)).unwrap();
        s.set_nonblocking(true).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            closed: false,
            sent: Vec::new(),
        }
    }

    fn send(&mut self, p: &mut Port, bytes: &[u8]) {
        self.sent.extend_from_slice(bytes);
        let mut done = 0;
        while done < bytes.len() && !self.closed {
            match self.s.write(&bytes[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.pump(p),
                Err(_) => self.closed = true,
            }
        }
    }

    fn command(&mut self, p: &mut Port, body: &[u8]) {
        let mut f = Vec::new();
        put_frame(&mut f, COMMAND, body);
        self.send(p, &f);
    }

    fn data(&mut self, p: &mut Port, body: &[u8]) {
        let mut f = Vec::new();
        put_frame(&mut f, 0, body);
        self.send(p, &f);
    }

    fn pump(&mut self, p: &mut Port) {
        p.turn();
        let mut chunk = vec![0u8; 65536];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn take(&mut self, p: &mut Port, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.buf.len() < n {
            assert!(
                !self.closed && Instant::now() < deadline,
                "{n} bytes did not come"
            );
            self.pump(p);
        }
        self.buf.drain(..n).collect()
    }

    /// The next whole frame's body.
    fn frame(&mut self, p: &mut Port) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((_, head, size)) = next_frame(&self.buf).unwrap() {
                let f = self.buf[head..head + size].to_vec();
                self.buf.drain(..head + size);
                return f;
            }
            assert!(!self.closed && Instant::now() < deadline, "no frame came");
            self.pump(p);
        }
    }

    /// Whether the router closes this connection within `within`.
    fn is_closed_within(&mut self, p: &mut Port, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.closed && Instant::now() < deadline {
            self.pump(p);
        }
        self.closed
    }

    fn is_closed(&mut self, p: &mut Port) -> bool {
        self.is_closed_within(p, Duration::from_secs(5))
    }

    /// Greeting, HELLO, WELCOME: the server waits for INITIATE.
    fn welcomed(p: &mut Port, c: &mut Client) -> Raw {
        let mut raw = Raw::connect(p);
        raw.send(p, &client_greeting(b"CURVE"));
        assert_eq!(raw.take(p, GREETING)[12..17], *b"CURVE");
        raw.command(p, &c.hello());
        let welcome = raw.frame(p);
        c.welcome(&welcome).unwrap();
        raw
    }

    /// A whole honest handshake.
    fn admitted(p: &mut Port, c: &mut Client) -> Raw {
        let mut raw = Raw::welcomed(p, c);
        raw.command(p, &c.initiate(&Initiate::default()));
        let ready = raw.frame(p);
        c.ready(&ready).unwrap();
        raw
    }
}

#[test]
fn an_honest_raw_client_is_served_over_a_socket() {
    let (mut p, k) = curve_router();
    let mut c = allowed_client(&k);
    let mut raw = Raw::admitted(&mut p, &mut c);
    let m = c.message(0, b"task", None);
    raw.data(&mut p, &m);
    p.turn_until("the message", |p| !p.delivered.is_empty());
    assert_eq!(p.delivered[0], [b"mallory".to_vec(), b"task".to_vec()]);
    p.r.send(b"mallory", [&b"result"[..]]).unwrap();
    let f = raw.frame(&mut p);
    assert_eq!(c.open_message(&f), Some((0, b"result".to_vec())));
}

#[test]
fn a_frame_over_64_kib_during_the_handshake_closes_the_connection() {
    let (mut p, k) = curve_router();
    // Before HELLO, and after it (waiting for INITIATE): the header alone is refused.
    let mut before = Raw::connect(&p);
    before.send(&mut p, &client_greeting(b"CURVE"));
    let (h, n) = frame_head(COMMAND, 64 * 1024 + 1);
    before.send(&mut p, &h[..n]);
    before.send(&mut p, &[0u8; 100]);
    assert!(before.is_closed(&mut p));
    let mut c = allowed_client(&k);
    let mut after = Raw::welcomed(&mut p, &mut c);
    let mut big = Vec::new();
    put_frame(&mut big, COMMAND, &vec![0u8; 70_000]);
    after.send(&mut p, &big);
    assert!(after.is_closed(&mut p));
    assert!(p.delivered.is_empty());
    p.serves_an_honest_pool(&k);
}

#[test]
fn plaintext_after_the_handshake_closes_the_connection() {
    let (mut p, k) = curve_router();
    for plain_command in [false, true] {
        let mut c = allowed_client(&k);
        let mut raw = Raw::admitted(&mut p, &mut c);
        if plain_command {
            raw.command(&mut p, &command(b"PING", b"\x00\x00"));
        } else {
            raw.data(&mut p, b"a task in the clear");
        }
        assert!(raw.is_closed(&mut p));
    }
    assert!(p.delivered.is_empty());
    p.serves_an_honest_pool(&k);
}

/// Everything an honest client sent on one connection, replayed on another: the server's
/// new short-term key and cookie key make the INITIATE worthless there.
#[test]
fn an_initiate_replayed_on_a_new_connection_is_refused() {
    let (mut p, k) = curve_router();
    let mut c = allowed_client(&k);
    let mut honest = Raw::admitted(&mut p, &mut c);
    let m = c.message(0, b"task", None);
    honest.data(&mut p, &m);
    p.turn_until("the honest message", |p| p.delivered.len() == 1);
    drop(honest);
    let mut replay = Raw::connect(&p);
    let recorded = c_sent(&mut p, &k);
    replay.send(&mut p, &recorded);
    assert!(replay.is_closed(&mut p));
    assert_eq!(p.delivered.len(), 1, "the replayed MESSAGE was delivered");
    p.serves_an_honest_pool(&k);
}

/// What an honest client writes from greeting to its first MESSAGE.
fn c_sent(p: &mut Port, k: &Keys) -> Vec<u8> {
    let mut c = allowed_client(k);
    let mut raw = Raw::admitted(p, &mut c);
    let m = c.message(0, b"task", None);
    raw.data(p, &m);
    p.turn_until("the recorded client's message", |p| p.delivered.len() == 2);
    p.delivered.pop();
    raw.sent.clone()
}

#[test]
fn a_replayed_message_on_the_wire_closes_the_connection() {
    let (mut p, k) = curve_router();
    let mut c = allowed_client(&k);
    let mut raw = Raw::admitted(&mut p, &mut c);
    let m = c.message(0, b"task", None);
    raw.data(&mut p, &m);
    raw.data(&mut p, &m);
    assert!(raw.is_closed(&mut p));
    assert_eq!(p.delivered.len(), 1);
    p.serves_an_honest_pool(&k);
}

#[test]
fn a_handshake_that_never_ends_is_dropped_at_its_timeout() {
    let (mut p, k) = router_with(HandshakeLimits {
        timeout: Duration::from_millis(300),
        ..HandshakeLimits::default()
    });
    let silent = Raw::connect(&p);
    let mut greeted = Raw::connect(&p);
    greeted.send(&mut p, &client_greeting(b"CURVE"));
    let mut c = allowed_client(&k);
    let mut welcomed = Raw::welcomed(&mut p, &mut c);
    let started = Instant::now();
    for raw in [&mut greeted, &mut welcomed] {
        assert!(raw.is_closed(&mut p));
    }
    let mut silent = silent;
    assert!(silent.is_closed(&mut p));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "dropped before its timeout"
    );
    p.serves_an_honest_pool(&k);
    // An admitted peer is not dropped by the timeout.
    let mut c = allowed_client(&k);
    let mut admitted = Raw::admitted(&mut p, &mut c);
    assert!(!admitted.is_closed_within(&mut p, Duration::from_millis(600)));
}

// ------------------------------------------------------------------ the budget

#[test]
fn handshakes_past_the_per_source_cap_are_refused_at_once() {
    let (mut p, k) = router_with(HandshakeLimits {
        max_pending_per_source: 8,
        ..HandshakeLimits::default()
    });
    let mut c = allowed_client(&k);
    let mut pool = Raw::admitted(&mut p, &mut c);
    let mut crowd: Vec<Raw> = (0..20).map(|_| Raw::connect(&p)).collect();
    p.turn_until("20 connections accepted or refused", |p| {
        p.r.counts.accepted + p.r.counts.turned_away >= 21
    });
    assert_eq!(p.r.counts.turned_away, 12);
    let closed = crowd
        .iter_mut()
        .map(|r| r.is_closed_within(&mut p, Duration::from_millis(20)))
        .filter(|&c| c)
        .count();
    assert_eq!(closed, 12);
    // The admitted pool is unaffected.
    let m = c.message(0, b"task", None);
    pool.data(&mut p, &m);
    p.turn_until("the pool's message", |p| p.delivered.len() == 1);
    // Once the crowd is gone, the address may connect again.
    drop(crowd);
    p.turn_until("the crowd's connections closed", |p| p.r.counts.closed >= 8);
    p.serves_an_honest_pool(&k);
}

#[test]
fn past_max_pending_the_oldest_handshake_makes_room() {
    let (mut p, k) = router_with(HandshakeLimits {
        max_pending: 8,
        ..HandshakeLimits::default()
    });
    let mut stale: Vec<Raw> = (0..8).map(|_| Raw::connect(&p)).collect();
    p.turn_until("8 accepted", |p| p.r.counts.accepted >= 8);
    p.serves_an_honest_pool(&k);
    assert_eq!(p.r.counts.evicted, 1);
    assert!(
        stale[0].is_closed(&mut p),
        "the oldest was not the one dropped"
    );
    assert!(!stale[7].is_closed_within(&mut p, Duration::from_millis(50)));
}

/// With a flood of HELLOs waiting, a turn takes at most `steps_per_turn` of them, and an
/// admitted peer's message waiting beside them is delivered in the first turn.
#[test]
fn handshake_work_per_turn_is_bounded_and_admitted_peers_go_first() {
    let (mut p, k) = router_with(HandshakeLimits {
        steps_per_turn: 2,
        ..HandshakeLimits::default()
    });
    let mut c = allowed_client(&k);
    let mut pool = Raw::admitted(&mut p, &mut c);
    let mut flood: Vec<(Raw, Client)> = (0..12)
        .map(|_| {
            let mut raw = Raw::connect(&p);
            raw.sent.clear();
            let mut c = Client::new(k.server_public);
            let mut bytes = client_greeting(b"CURVE").to_vec();
            put_frame(&mut bytes, COMMAND, &c.hello());
            raw.s.write_all(&bytes).unwrap();
            (raw, c)
        })
        .collect();
    let m = c.message(0, b"task", None);
    let mut frame = Vec::new();
    put_frame(&mut frame, 0, &m);
    pool.s.write_all(&frame).unwrap();
    // Accept the flood first (a turn or two), then count the steps each turn takes.
    p.turn_until("12 accepted", |p| p.r.counts.accepted >= 13);
    let mut turns = 0;
    let mut delivered_at = None;
    let steps_before = p.r.counts.handshake_steps;
    while p.r.counts.handshake_steps - steps_before < 12 {
        let before = p.r.counts.handshake_steps;
        p.turn();
        turns += 1;
        assert!(
            p.r.counts.handshake_steps - before <= 2,
            "a turn took more than its budget"
        );
        if delivered_at.is_none() && !p.delivered.is_empty() {
            delivered_at = Some(p.r.counts.handshake_steps - steps_before);
        }
        assert!(turns < 10_000);
    }
    assert!(p.r.counts.deferred > 0);
    assert!(
        delivered_at.is_some_and(|steps| steps < 12),
        "the pool waited behind the flood: {delivered_at:?}"
    );
    for (raw, c) in &mut flood {
        let _greeting = raw.take(&mut p, GREETING);
        let welcome = raw.frame(&mut p);
        assert!(super::command_body(&welcome, b"WELCOME").is_some());
        c.welcome(&welcome).unwrap();
    }
}

// ------------------------------------------------------------------ libzmq's own cases

/// libzmq 4.3.5 tests/test_security_curve.cpp, against our router with real libzmq clients.
mod libzmq_cases {
    use super::*;

    const EVENT_HANDSHAKE_SUCCEEDED: u16 = 0x1000;
    const EVENT_HANDSHAKE_FAILED_AUTH: u16 = 0x4000;

    /// A CURVE DEALER with the given keys, its monitor socket, and whether it bounced a
    /// message off the router (sent, delivered, answered).
    fn client(
        p: &mut Port,
        server: &[u8; 32],
        public: &[u8; 32],
        secret: &[u8; 32],
        identity: &[u8],
    ) -> (bool, Vec<(u16, u32)>) {
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_identity(identity).unwrap();
        s.set_curve_serverkey(server).unwrap();
        s.set_curve_publickey(public).unwrap();
        s.set_curve_secretkey(secret).unwrap();
        bounce(p, &ctx, &s, identity)
    }

    fn bounce(
        p: &mut Port,
        ctx: &zmq::Context,
        s: &zmq::Socket,
        identity: &[u8],
    ) -> (bool, Vec<(u16, u32)>) {
        let endpoint = format!("inproc://monitor-{}", fastrand::u64(..));
        s.monitor(&endpoint, 0xffff).unwrap();
        let mon = ctx.socket(zmq::PAIR).unwrap();
        mon.connect(&endpoint).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{}", p.r.port)).unwrap();
        s.send_multipart([&[1u8; 32][..], &[2u8; 32][..]], 0)
            .unwrap();
        let before = p.delivered.len();
        let deadline = Instant::now() + Duration::from_millis(750);
        let mut bounced = false;
        while Instant::now() < deadline {
            p.turn();
            if p.delivered.len() > before && !bounced {
                let m = p.delivered.last().unwrap().clone();
                assert_eq!(m[0], identity);
                p.r.send(identity, &m[1..]).unwrap();
            }
            if s.poll(zmq::POLLIN, 0).unwrap() > 0 {
                assert_eq!(s.recv_multipart(0).unwrap(), [vec![1u8; 32], vec![2u8; 32]]);
                bounced = true;
                break;
            }
        }
        let mut events = Vec::new();
        while mon.poll(zmq::POLLIN, 0).unwrap() > 0 {
            let m = mon.recv_multipart(0).unwrap();
            let e = &m[0];
            events.push((
                u16::from_le_bytes([e[0], e[1]]),
                u32::from_le_bytes([e[2], e[3], e[4], e[5]]),
            ));
        }
        (bounced, events)
    }

    #[test]
    fn valid_credentials_bounce() {
        let (mut p, k) = curve_router();
        let (ok, events) = client(
            &mut p,
            &k.server_public,
            &k.allowed.0,
            &k.allowed.1,
            b"IDENT",
        );
        assert!(ok);
        assert!(
            events.iter().any(|e| e.0 == EVENT_HANDSHAKE_SUCCEEDED),
            "{events:?}"
        );
    }

    /// The mirror of libzmq's large routing id case: a client whose identity is 255 bytes.
    #[test]
    fn valid_credentials_with_a_255_byte_routing_id_bounce() {
        let (mut p, k) = curve_router();
        let id: Vec<u8> = b"0123456789"
            .repeat(25)
            .into_iter()
            .chain(*b"01234")
            .collect();
        assert_eq!(id.len(), 255);
        assert!(client(&mut p, &k.server_public, &k.allowed.0, &k.allowed.1, &id).0);
    }

    #[test]
    fn null_server_key_client_secret_or_client_public_do_not_bounce() {
        let (mut p, k) = curve_router();
        let zero = [0u8; 32];
        assert!(!client(&mut p, &zero, &k.allowed.0, &k.allowed.1, b"a").0);
        assert!(!client(&mut p, &k.server_public, &zero, &k.allowed.1, b"b").0);
        assert!(!client(&mut p, &k.server_public, &k.allowed.0, &zero, b"c").0);
        assert!(p.delivered.is_empty());
        p.serves_an_honest_pool(&k);
    }

    /// A well-formed client whose key is not admitted gets ERROR "400": libzmq reports
    /// HANDSHAKE_FAILED_AUTH 400 to it once, and it does not retry.
    #[test]
    fn bogus_client_credentials_get_error_400_once() {
        let (mut p, k) = curve_router();
        let bogus = zmq::CurveKeyPair::new().unwrap();
        let (ok, events) = client(
            &mut p,
            &k.server_public,
            &bogus.public_key,
            &bogus.secret_key,
            b"x",
        );
        assert!(!ok);
        let auth: Vec<_> = events
            .iter()
            .filter(|e| e.0 == EVENT_HANDSHAKE_FAILED_AUTH)
            .collect();
        assert_eq!(auth, [&(EVENT_HANDSHAKE_FAILED_AUTH, 400)], "{events:?}");
        assert_eq!(p.r.counts.refused, 1);
        p.serves_an_honest_pool(&k);
    }

    #[test]
    fn null_and_plain_clients_are_refused_at_the_greeting() {
        let (mut p, k) = curve_router();
        let ctx = zmq::Context::new();
        let null = ctx.socket(zmq::DEALER).unwrap();
        null.set_linger(0).unwrap();
        null.set_identity(b"null").unwrap();
        assert!(!bounce(&mut p, &ctx, &null, b"null").0);
        let plain = ctx.socket(zmq::DEALER).unwrap();
        plain.set_linger(0).unwrap();
        plain.set_identity(b"plain").unwrap();
        plain.set_plain_username(Some("admin")).unwrap();
        plain.set_plain_password(Some("password")).unwrap();
        assert!(!bounce(&mut p, &ctx, &plain, b"plain").0);
        assert!(p.delivered.is_empty());
        assert_eq!(
            p.r.counts.handshake_steps, 0,
            "no CURVE work for a peer of another mechanism"
        );
        p.serves_an_honest_pool(&k);
    }

    /// libzmq's unauthenticated_message: a ZMTP 1.0 greeting and a message.
    #[test]
    fn a_zmtp_1_0_peer_delivers_nothing() {
        let (mut p, k) = curve_router();
        let mut raw = Raw::connect(&p);
        raw.send(&mut p, b"\x01\x00");
        raw.send(&mut p, b"\x08\x00sneaky\x00");
        assert!(raw.is_closed(&mut p));
        assert!(p.delivered.is_empty());
        p.serves_an_honest_pool(&k);
    }

    /// libzmq's invalid_hello_* and invalid_initiate_* over a raw socket: the exact bytes
    /// its tests send, each closing the connection without delivering anything.
    #[test]
    fn invalid_hellos_and_initiates_over_a_socket_close_the_connection() {
        let (mut p, k) = curve_router();
        let hellos: [fn(&mut Vec<u8>); 3] = [
            |h| h.truncate(6), // wrong_length: "\x05HELLO"
            |h| h[5] = b'X',   // command_name
            |h| h[6] = 2,      // version
        ];
        for mutate in hellos {
            let mut c = Client::new(k.server_public);
            let mut raw = Raw::connect(&p);
            raw.send(&mut p, &client_greeting(b"CURVE"));
            let mut hello = c.hello();
            mutate(&mut hello);
            raw.command(&mut p, &hello);
            assert!(raw.is_closed(&mut p));
        }
        let initiates: [fn(&mut Vec<u8>); 4] = [
            |i| i.truncate(9),                  // wrong_length: "\x08INITIATE"
            |i| i[5] = b'X',                    // command_name
            |i| i[30] = u8::from(i[30] == 0),   // encrypted_cookie
            |i| i[150] = u8::from(i[150] == 0), // encrypted_content
        ];
        for mutate in initiates {
            let mut c = allowed_client(&k);
            let mut raw = Raw::welcomed(&mut p, &mut c);
            let mut initiate = c.initiate(&Initiate::default());
            mutate(&mut initiate);
            raw.command(&mut p, &initiate);
            assert!(raw.is_closed(&mut p));
        }
        assert!(p.delivered.is_empty());
        p.serves_an_honest_pool(&k);
    }
}
