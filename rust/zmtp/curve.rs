//! The CurveZMQ server handshake (rfc.zeromq.org/spec/26) and its message boxes, as
//! libzmq's `curve_server.cpp` speaks them, over libsodium (the same static library
//! libzmq links). A client is admitted when its long-term public key is in the allowed
//! set (what libzmq asks of a ZAP handler).
//!
//! Client HELLO (C', Box[64 zeros](C'->S)); server WELCOME (Box[S' + cookie](S->C'),
//! cookie = Box[C' + s'](K) under a key K of this connection); client INITIATE (cookie,
//! Box[C + vouch + metadata](C'->S'), vouch = Box[C' + S](C->S')); server READY
//! (Box[metadata](S'->C')); then each frame is a MESSAGE: a short nonce and
//! Box[flags + body](C'<->S'), nonces rising on each side.

use std::collections::HashSet;
use std::sync::Once;

use libsodium_sys as na;

use super::{command, parse_metadata, put_frame, PeerInfo};

const MAC: usize = 16;

fn init() {
    static INIT: Once = Once::new();
    // SAFETY: sodium_init has no preconditions and may be called more than once.
    INIT.call_once(|| {
        assert!(
            unsafe { na::sodium_init() } >= 0,
            "libsodium failed to start"
        );
    });
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: b is N writable bytes.
    unsafe { na::randombytes_buf(b.as_mut_ptr().cast(), N) };
    b
}

fn nonce(prefix: &[u8], tail: &[u8]) -> [u8; 24] {
    let mut n = [0u8; 24];
    n[..prefix.len()].copy_from_slice(prefix);
    n[prefix.len()..].copy_from_slice(tail);
    n
}

/// `crypto_box_easy` (MAC then ciphertext) from `sk` to `pk`.
fn seal(m: &[u8], n: &[u8; 24], pk: &[u8; 32], sk: &[u8; 32]) -> Vec<u8> {
    let mut c = vec![0u8; m.len() + MAC];
    // SAFETY: c has room for m plus the MAC; the keys and nonce have their sizes.
    let rc = unsafe {
        na::crypto_box_easy(
            c.as_mut_ptr(),
            m.as_ptr(),
            m.len() as u64,
            n.as_ptr(),
            pk.as_ptr(),
            sk.as_ptr(),
        )
    };
    assert_eq!(rc, 0, "crypto_box_easy");
    c
}

/// Open a `crypto_box_easy` box from `pk` to `sk`.
fn open(c: &[u8], n: &[u8; 24], pk: &[u8; 32], sk: &[u8; 32]) -> Option<Vec<u8>> {
    let mut m = vec![0u8; c.len().checked_sub(MAC)?];
    // SAFETY: m has room for the plaintext; the keys and nonce have their sizes.
    let rc = unsafe {
        na::crypto_box_open_easy(
            m.as_mut_ptr(),
            c.as_ptr(),
            c.len() as u64,
            n.as_ptr(),
            pk.as_ptr(),
            sk.as_ptr(),
        )
    };
    (rc == 0).then_some(m)
}

/// The server's long-term secret key and the clients it admits.
pub struct Server {
    secret: [u8; 32],
    allowed: HashSet<[u8; 32]>,
}

impl Server {
    #[must_use]
    pub fn new(secret: [u8; 32], allowed: impl IntoIterator<Item = [u8; 32]>) -> Server {
        init();
        Server {
            secret,
            allowed: allowed.into_iter().collect(),
        }
    }
}

/// Where one connection's handshake stands.
pub enum Handshake {
    WaitHello,
    WaitInitiate {
        client_short: [u8; 32],
        short_public: [u8; 32],
        short_secret: [u8; 32],
        cookie_key: [u8; 32],
    },
}

/// Why a handshake ended: a protocol or crypto error (drop the connection), or a client
/// whose key is not admitted (answer ERROR, then drop).
#[derive(Debug)]
pub enum Refusal {
    Protocol(String),
    NotAllowed([u8; 32]),
}

/// An established connection's keys and nonces.
pub struct Session {
    precomputed: [u8; 32],
    /// The next nonce we send (READY took 1), and the last one the client sent.
    send_nonce: u64,
    recv_nonce: u64,
}

/// Inside a MESSAGE box the flags are libzmq's `msg_t` flags: more 0x01, command 0x02
/// (on the wire outside a box a command is 0x04).
const BOX_MORE: u8 = 0x01;
const BOX_COMMAND: u8 = 0x02;

const HELLO_SIZE: usize = 200;
const INITIATE_MIN: usize = 257;
const MESSAGE: &[u8] = b"\x07MESSAGE";

impl Handshake {
    /// Handle the client's HELLO; returns the WELCOME command's frame body.
    pub fn hello(&mut self, server: &Server, cmd: &[u8]) -> Result<Vec<u8>, Refusal> {
        let proto = |m: &str| Refusal::Protocol(m.into());
        if !matches!(self, Handshake::WaitHello) {
            return Err(proto("HELLO out of turn"));
        }
        if !cmd.starts_with(b"\x05HELLO") || cmd.len() != HELLO_SIZE {
            return Err(proto("malformed HELLO"));
        }
        if cmd[6] != 1 || cmd[7] != 0 {
            return Err(proto("unknown CurveZMQ version in HELLO"));
        }
        let client_short: [u8; 32] = cmd[80..112].try_into().expect("32 bytes");
        let n = nonce(b"CurveZMQHELLO---", &cmd[112..120]);
        open(&cmd[120..200], &n, &client_short, &server.secret)
            .ok_or_else(|| proto("cannot open HELLO (the client has another server key?)"))?;
        let (mut short_public, mut short_secret) = ([0u8; 32], [0u8; 32]);
        // SAFETY: both buffers are 32 bytes.
        unsafe { na::crypto_box_keypair(short_public.as_mut_ptr(), short_secret.as_mut_ptr()) };
        let cookie_key: [u8; 32] = random();
        let cookie_tail: [u8; 16] = random();
        let mut cookie_plain = [0u8; 64];
        cookie_plain[..32].copy_from_slice(&client_short);
        cookie_plain[32..].copy_from_slice(&short_secret);
        let mut cookie = [0u8; 80];
        let cn = nonce(b"COOKIE--", &cookie_tail);
        // SAFETY: cookie has room for 64 bytes plus the MAC; key and nonce have their sizes.
        unsafe {
            na::crypto_secretbox_easy(
                cookie.as_mut_ptr(),
                cookie_plain.as_ptr(),
                64,
                cn.as_ptr(),
                cookie_key.as_ptr(),
            )
        };
        let mut plain = Vec::with_capacity(128);
        plain.extend_from_slice(&short_public);
        plain.extend_from_slice(&cookie_tail);
        plain.extend_from_slice(&cookie);
        let welcome_tail: [u8; 16] = random();
        let boxed = seal(
            &plain,
            &nonce(b"WELCOME-", &welcome_tail),
            &client_short,
            &server.secret,
        );
        let mut body = welcome_tail.to_vec();
        body.extend_from_slice(&boxed);
        *self = Handshake::WaitInitiate {
            client_short,
            short_public,
            short_secret,
            cookie_key,
        };
        Ok(command(b"WELCOME", &body))
    }

    /// Handle the client's INITIATE: the peer's metadata, its session, and the READY
    /// command's frame body.
    pub fn initiate(
        &self,
        server: &Server,
        cmd: &[u8],
        ready_metadata: &[u8],
    ) -> Result<(PeerInfo, Session, Vec<u8>), Refusal> {
        let proto = |m: &str| Refusal::Protocol(m.into());
        let Handshake::WaitInitiate {
            client_short,
            short_public: _,
            short_secret,
            cookie_key,
        } = self
        else {
            return Err(proto("INITIATE out of turn"));
        };
        if !cmd.starts_with(b"\x08INITIATE") || cmd.len() < INITIATE_MIN {
            return Err(proto("malformed INITIATE"));
        }
        let mut cookie_plain = [0u8; 64];
        let cn = nonce(b"COOKIE--", &cmd[9..25]);
        // SAFETY: 80 bytes of box into 64 of plaintext; key and nonce have their sizes.
        let rc = unsafe {
            na::crypto_secretbox_open_easy(
                cookie_plain.as_mut_ptr(),
                cmd[25..105].as_ptr(),
                80,
                cn.as_ptr(),
                cookie_key.as_ptr(),
            )
        };
        if rc != 0
            || cookie_plain[..32] != client_short[..]
            || cookie_plain[32..] != short_secret[..]
        {
            return Err(proto("INITIATE carries a bad cookie"));
        }
        let client_nonce = u64::from_be_bytes(cmd[105..113].try_into().expect("8 bytes"));
        let n = nonce(b"CurveZMQINITIATE", &cmd[105..113]);
        let plain = open(&cmd[113..], &n, client_short, short_secret)
            .ok_or_else(|| proto("cannot open INITIATE"))?;
        if plain.len() < 128 {
            return Err(proto("INITIATE too short"));
        }
        let client_long: [u8; 32] = plain[..32].try_into().expect("32 bytes");
        let vn = nonce(b"VOUCH---", &plain[32..48]);
        let vouch = open(&plain[48..128], &vn, &client_long, short_secret)
            .ok_or_else(|| proto("cannot open the INITIATE vouch"))?;
        if vouch[..32] != client_short[..] {
            return Err(proto("the INITIATE vouch is for another key"));
        }
        if !server.allowed.contains(&client_long) {
            return Err(Refusal::NotAllowed(client_long));
        }
        let info = parse_metadata(&plain[128..]).map_err(Refusal::Protocol)?;
        let mut precomputed = [0u8; 32];
        // SAFETY: 32-byte keys and output.
        unsafe {
            na::crypto_box_beforenm(
                precomputed.as_mut_ptr(),
                client_short.as_ptr(),
                short_secret.as_ptr(),
            )
        };
        let mut session = Session {
            precomputed,
            send_nonce: 1,
            recv_nonce: client_nonce,
        };
        let ready_nonce = session.next_nonce();
        let boxed = session.seal(
            &nonce(b"CurveZMQREADY---", &ready_nonce.to_be_bytes()),
            ready_metadata,
        );
        let mut body = ready_nonce.to_be_bytes().to_vec();
        body.extend_from_slice(&boxed);
        Ok((info, session, command(b"READY", &body)))
    }
}

impl Session {
    fn next_nonce(&mut self) -> u64 {
        let n = self.send_nonce;
        self.send_nonce += 1;
        n
    }

    fn seal(&self, n: &[u8; 24], m: &[u8]) -> Vec<u8> {
        let mut c = vec![0u8; m.len() + MAC];
        // SAFETY: c has room for m plus the MAC; the key and nonce have their sizes.
        let rc = unsafe {
            na::crypto_box_easy_afternm(
                c.as_mut_ptr(),
                m.as_ptr(),
                m.len() as u64,
                n.as_ptr(),
                self.precomputed.as_ptr(),
            )
        };
        assert_eq!(rc, 0, "crypto_box_easy_afternm");
        c
    }

    /// Append frame `body` with `flags` (MORE, COMMAND) as one MESSAGE frame.
    pub fn encode(&mut self, flags: u8, body: &[u8], out: &mut Vec<u8>) {
        let n = self.next_nonce();
        let mut plain = Vec::with_capacity(1 + body.len());
        let mut inner = if flags & super::MORE != 0 {
            BOX_MORE
        } else {
            0
        };
        if flags & super::COMMAND != 0 {
            inner |= BOX_COMMAND;
        }
        plain.push(inner);
        plain.extend_from_slice(body);
        let boxed = self.seal(&nonce(b"CurveZMQMESSAGES", &n.to_be_bytes()), &plain);
        let len = MESSAGE.len() + 8 + boxed.len();
        let (h, hn) = super::frame_head(0, len);
        out.extend_from_slice(&h[..hn]);
        out.extend_from_slice(MESSAGE);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&boxed);
    }

    /// Open one MESSAGE frame: its flags and body.
    pub fn decode(&mut self, frame: &[u8]) -> Result<(u8, Vec<u8>), String> {
        if !frame.starts_with(MESSAGE) || frame.len() < MESSAGE.len() + 8 + MAC + 1 {
            return Err("malformed MESSAGE".into());
        }
        let tail = &frame[MESSAGE.len()..MESSAGE.len() + 8];
        let n = u64::from_be_bytes(tail.try_into().expect("8 bytes"));
        if n <= self.recv_nonce {
            return Err("a MESSAGE nonce out of sequence (a replay?)".into());
        }
        let c = &frame[MESSAGE.len() + 8..];
        let mut m = vec![0u8; c.len() - MAC];
        let full = nonce(b"CurveZMQMESSAGEC", tail);
        // SAFETY: m has room for the plaintext; the key and nonce have their sizes.
        let rc = unsafe {
            na::crypto_box_open_easy_afternm(
                m.as_mut_ptr(),
                c.as_ptr(),
                c.len() as u64,
                full.as_ptr(),
                self.precomputed.as_ptr(),
            )
        };
        if rc != 0 {
            return Err("a MESSAGE that does not open".into());
        }
        self.recv_nonce = n;
        let mut flags = if m[0] & BOX_MORE != 0 { super::MORE } else { 0 };
        if m[0] & BOX_COMMAND != 0 {
            flags |= super::COMMAND;
        }
        m.remove(0);
        Ok((flags, m))
    }
}

/// Decode a Z85 (40 characters) or raw (32 bytes) CURVE key.
pub fn decode_key(key: &[u8]) -> Result<[u8; 32], String> {
    let raw = match key.len() {
        32 => key.to_vec(),
        40 => {
            let text = std::str::from_utf8(key).map_err(|e| e.to_string())?;
            zmq::z85_decode(text).map_err(|e| format!("invalid Z85 key: {e}"))?
        }
        n => {
            return Err(format!(
                "a CURVE key is 32 bytes or 40 Z85 characters, got {n}"
            ))
        }
    };
    <[u8; 32]>::try_from(raw.as_slice()).map_err(|_| "decoded key is not 32 bytes".to_string())
}

fn wipe(b: &mut [u8]) {
    // SAFETY: b is a valid, writable buffer of its length.
    unsafe { na::sodium_memzero(b.as_mut_ptr().cast(), b.len()) };
}

impl Drop for Server {
    fn drop(&mut self) {
        wipe(&mut self.secret);
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Handshake::WaitInitiate {
            short_secret,
            cookie_key,
            ..
        } = self
        {
            wipe(short_secret);
            wipe(cookie_key);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        wipe(&mut self.precomputed);
    }
}

/// The ERROR command libzmq sends a refused client.
#[must_use]
pub fn error_frame() -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, super::COMMAND, &command(b"ERROR", b"\x03400"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode_from_z85_and_raw() {
        let raw = [9u8; 32];
        let z85 = zmq::z85_encode(&raw).unwrap();
        assert_eq!(decode_key(z85.as_bytes()).unwrap(), raw);
        assert_eq!(decode_key(&raw).unwrap(), raw);
        assert!(decode_key(b"short").is_err());
    }

    proptest::proptest! {
        #![proptest_config(crate::protocol::fuzz::cases(5_000, 200_000))]

        /// A peer's HELLO, INITIATE and MESSAGE bytes, right prefix or not, never panic.
        #[test]
        fn handshake_and_message_decoders_never_panic(
            prefix in 0usize..4,
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let head: &[u8] = [&b""[..], b"\x05HELLO\x01\x00", b"\x08INITIATE", MESSAGE][prefix];
            let bytes = [head, &tail[..]].concat();
            let server = Server::new([5u8; 32], [[6u8; 32]]);
            let _ = Handshake::WaitHello.hello(&server, &bytes);
            let waiting = Handshake::WaitInitiate {
                client_short: [1; 32],
                short_public: [2; 32],
                short_secret: [3; 32],
                cookie_key: [4; 32],
            };
            let _ = waiting.initiate(&server, &bytes, b"");
            let mut session = Session { precomputed: [7; 32], send_nonce: 1, recv_nonce: 1 };
            proptest::prop_assert!(session.decode(&bytes).is_err(), "a forged MESSAGE opened");
        }
    }

    #[test]
    fn libzmq_has_curve() {
        // Guard: the pools' libzmq must speak CURVE to this server.
        assert_eq!(zmq::has("curve"), Some(true));
    }
}
