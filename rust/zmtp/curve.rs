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
//!
//! Every field is checked (RFC 26 asks the server to validate them all; libzmq skips the
//! vouch's server key and the HELLO signature's zeros). Work for an unauthenticated peer
//! is kept small: one X25519 agreement for (C', S) serves both HELLO and WELCOME, one for
//! (C', S') both INITIATE and the session, so a full handshake costs four (with the
//! short-term key pair and the vouch) where `crypto_box_easy` for each box costs six.
//! Secrets (keys, agreements, the cookie's plaintext) are wiped when dropped.

use std::collections::HashSet;
use std::sync::Once;

use libsodium_sys as na;
use zeroize::Zeroizing;

use super::{command, parse_metadata, put_frame, PeerInfo};

pub(super) const MAC: usize = 16;

/// A 32-byte key that is wiped when dropped.
pub type SecretKey = Zeroizing<[u8; 32]>;

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

pub(super) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // SAFETY: b is N writable bytes.
    unsafe { na::randombytes_buf(b.as_mut_ptr().cast(), N) };
    b
}

pub(super) fn nonce(prefix: &[u8], tail: &[u8]) -> [u8; 24] {
    let mut n = [0u8; 24];
    n[..prefix.len()].copy_from_slice(prefix);
    n[prefix.len()..].copy_from_slice(tail);
    n
}

/// The X25519 agreement of `pk` and `sk`, ready for the `_afternm` boxes; `None` for a
/// public key of low order (libsodium refuses an all-zero shared point).
pub(super) fn agree(pk: &[u8; 32], sk: &[u8; 32]) -> Option<SecretKey> {
    let mut k = Zeroizing::new([0u8; 32]);
    // SAFETY: 32-byte keys and output.
    let rc = unsafe { na::crypto_box_beforenm(k.as_mut_ptr(), pk.as_ptr(), sk.as_ptr()) };
    (rc == 0).then_some(k)
}

/// A fresh key pair: (public, secret).
pub(super) fn keypair() -> ([u8; 32], SecretKey) {
    let mut public = [0u8; 32];
    let mut secret = Zeroizing::new([0u8; 32]);
    // SAFETY: both buffers are 32 bytes.
    unsafe { na::crypto_box_keypair(public.as_mut_ptr(), secret.as_mut_ptr()) };
    (public, secret)
}

/// The public key of `secret`.
#[must_use]
pub fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    init();
    let mut public = [0u8; 32];
    // SAFETY: 32-byte input and output.
    unsafe { na::crypto_scalarmult_base(public.as_mut_ptr(), secret.as_ptr()) };
    public
}

/// A box (MAC then ciphertext) under the agreement `k`, appended to `out`.
pub(super) fn seal_into(m: &[u8], n: &[u8; 24], k: &[u8; 32], out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + m.len() + MAC, 0);
    // SAFETY: out has room for m plus the MAC after `at`; key and nonce have their sizes.
    let rc = unsafe {
        na::crypto_box_easy_afternm(
            out[at..].as_mut_ptr(),
            m.as_ptr(),
            m.len() as u64,
            n.as_ptr(),
            k.as_ptr(),
        )
    };
    assert_eq!(rc, 0, "crypto_box_easy_afternm");
}

/// A box under the agreement `k`.
#[cfg(test)]
pub(super) fn seal(m: &[u8], n: &[u8; 24], k: &[u8; 32]) -> Vec<u8> {
    let mut c = Vec::with_capacity(m.len() + MAC);
    seal_into(m, n, k, &mut c);
    c
}

/// Open a box under the agreement `k`.
pub(super) fn open(c: &[u8], n: &[u8; 24], k: &[u8; 32]) -> Option<Vec<u8>> {
    let mut m = vec![0u8; c.len().checked_sub(MAC)?];
    // SAFETY: m has room for the plaintext; the key and nonce have their sizes.
    let rc = unsafe {
        na::crypto_box_open_easy_afternm(
            m.as_mut_ptr(),
            c.as_ptr(),
            c.len() as u64,
            n.as_ptr(),
            k.as_ptr(),
        )
    };
    (rc == 0).then_some(m)
}

/// A secret box (the cookie) under `key`.
pub(super) fn secretbox(m: &[u8], n: &[u8; 24], key: &[u8; 32]) -> Vec<u8> {
    let mut c = vec![0u8; m.len() + MAC];
    // SAFETY: c has room for m plus the MAC; key and nonce have their sizes.
    unsafe {
        na::crypto_secretbox_easy(
            c.as_mut_ptr(),
            m.as_ptr(),
            m.len() as u64,
            n.as_ptr(),
            key.as_ptr(),
        )
    };
    c
}

/// Open a secret box of exactly `N` bytes of plaintext into wiped memory.
fn secretbox_open<const N: usize>(
    c: &[u8],
    n: &[u8; 24],
    key: &[u8; 32],
) -> Option<Zeroizing<[u8; N]>> {
    if c.len() != N + MAC {
        return None;
    }
    let mut m = Zeroizing::new([0u8; N]);
    // SAFETY: m has room for N bytes, c is N plus the MAC; key and nonce have their sizes.
    let rc = unsafe {
        na::crypto_secretbox_open_easy(
            m.as_mut_ptr(),
            c.as_ptr(),
            c.len() as u64,
            n.as_ptr(),
            key.as_ptr(),
        )
    };
    (rc == 0).then_some(m)
}

/// Compare secrets in constant time.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    // SAFETY: both have the length given.
    a.len() == b.len()
        && unsafe { na::sodium_memcmp(a.as_ptr().cast(), b.as_ptr().cast(), a.len()) } == 0
}

/// The server's long-term key pair and the clients it admits.
pub struct Server {
    secret: SecretKey,
    public: [u8; 32],
    allowed: HashSet<[u8; 32]>,
}

impl Server {
    #[must_use]
    pub fn new(secret: SecretKey, allowed: impl IntoIterator<Item = [u8; 32]>) -> Server {
        init();
        let public = public_of(&secret);
        Server {
            secret,
            public,
            allowed: allowed.into_iter().collect(),
        }
    }

    /// The server's long-term public key (what clients name as `curve_serverkey`).
    #[must_use]
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Whether a client with long-term key `key` is admitted.
    #[must_use]
    pub fn admits(&self, key: &[u8; 32]) -> bool {
        self.allowed.contains(key)
    }
}

/// Where one connection's handshake stands.
pub enum Handshake {
    WaitHello,
    WaitInitiate {
        client_short: [u8; 32],
        short_secret: SecretKey,
        cookie_key: SecretKey,
    },
}

/// Why a handshake ended: a protocol or crypto error (drop the connection), or a client
/// whose key is not admitted (answer ERROR, then drop).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Protocol(String),
    NotAllowed([u8; 32]),
}

/// An established connection's keys and nonces.
pub struct Session {
    precomputed: SecretKey,
    /// The next nonce we send (READY took 1), and the last one the client sent.
    send_nonce: u64,
    recv_nonce: u64,
}

/// Inside a MESSAGE box the flags are libzmq's `msg_t` flags: more 0x01, command 0x02
/// (on the wire outside a box a command is 0x04).
const BOX_MORE: u8 = 0x01;
const BOX_COMMAND: u8 = 0x02;

pub(super) const HELLO_SIZE: usize = 200;
pub(super) const INITIATE_MIN: usize = 257;
pub(super) const MESSAGE: &[u8] = b"\x07MESSAGE";

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
        // One agreement opens the HELLO and seals the WELCOME (both are C' <-> S).
        let k = agree(&client_short, &server.secret)
            .ok_or_else(|| proto("a HELLO with a low-order short-term key"))?;
        let n = nonce(b"CurveZMQHELLO---", &cmd[112..120]);
        let signature = open(&cmd[120..200], &n, &k)
            .ok_or_else(|| proto("cannot open HELLO (the client has another server key?)"))?;
        if signature.iter().any(|&b| b != 0) {
            return Err(proto("a HELLO signature that is not 64 zeros"));
        }
        let (short_public, short_secret) = keypair();
        let cookie_key = Zeroizing::new(random::<32>());
        let cookie_tail: [u8; 16] = random();
        let mut cookie_plain = Zeroizing::new([0u8; 64]);
        cookie_plain[..32].copy_from_slice(&client_short);
        cookie_plain[32..].copy_from_slice(&short_secret[..]);
        let cookie = secretbox(
            &cookie_plain[..],
            &nonce(b"COOKIE--", &cookie_tail),
            &cookie_key,
        );
        let mut plain = Vec::with_capacity(128);
        plain.extend_from_slice(&short_public);
        plain.extend_from_slice(&cookie_tail);
        plain.extend_from_slice(&cookie);
        let welcome_tail: [u8; 16] = random();
        let mut body = welcome_tail.to_vec();
        seal_into(&plain, &nonce(b"WELCOME-", &welcome_tail), &k, &mut body);
        *self = Handshake::WaitInitiate {
            client_short,
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
            short_secret,
            cookie_key,
        } = self
        else {
            return Err(proto("INITIATE out of turn"));
        };
        if !cmd.starts_with(b"\x08INITIATE") || cmd.len() < INITIATE_MIN {
            return Err(proto("malformed INITIATE"));
        }
        // The cookie is ours, from this connection's WELCOME, for this C' and S'.
        let cookie =
            secretbox_open::<64>(&cmd[25..105], &nonce(b"COOKIE--", &cmd[9..25]), cookie_key);
        if !cookie.is_some_and(|c| {
            c[..32] == client_short[..] && same_secret(&c[32..], &short_secret[..])
        }) {
            return Err(proto("INITIATE carries a bad cookie"));
        }
        let client_nonce = u64::from_be_bytes(cmd[105..113].try_into().expect("8 bytes"));
        // One agreement opens the INITIATE and keys the session (both are C' <-> S').
        let k = agree(client_short, short_secret)
            .ok_or_else(|| proto("cannot agree on the session key"))?;
        let n = nonce(b"CurveZMQINITIATE", &cmd[105..113]);
        let plain =
            Zeroizing::new(open(&cmd[113..], &n, &k).ok_or_else(|| proto("cannot open INITIATE"))?);
        if plain.len() < 128 {
            return Err(proto("INITIATE too short"));
        }
        let client_long: [u8; 32] = plain[..32].try_into().expect("32 bytes");
        // The vouch proves the client holds C's secret, for this C' and this server.
        let vk = agree(&client_long, short_secret)
            .ok_or_else(|| proto("an INITIATE with a low-order long-term key"))?;
        let vouch =
            open(&plain[48..128], &nonce(b"VOUCH---", &plain[32..48]), &vk).ok_or_else(|| {
                proto("cannot open the INITIATE vouch (not signed by its long-term key)")
            })?;
        if vouch[..32] != client_short[..] {
            return Err(proto("the INITIATE vouch is for another short-term key"));
        }
        if vouch[32..] != server.public[..] {
            return Err(proto("the INITIATE vouch is for another server"));
        }
        if !server.admits(&client_long) {
            return Err(Refusal::NotAllowed(client_long));
        }
        let info = parse_metadata(&plain[128..]).map_err(Refusal::Protocol)?;
        let mut session = Session {
            precomputed: k,
            send_nonce: 1,
            recv_nonce: client_nonce,
        };
        let ready_nonce = session.next_nonce();
        let mut body = ready_nonce.to_be_bytes().to_vec();
        seal_into(
            ready_metadata,
            &nonce(b"CurveZMQREADY---", &ready_nonce.to_be_bytes()),
            &session.precomputed,
            &mut body,
        );
        Ok((info, session, command(b"READY", &body)))
    }
}

impl Session {
    fn next_nonce(&mut self) -> u64 {
        let n = self.send_nonce;
        self.send_nonce += 1;
        n
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
        let len = MESSAGE.len() + 8 + plain.len() + MAC;
        let (h, hn) = super::frame_head(0, len);
        out.extend_from_slice(&h[..hn]);
        out.extend_from_slice(MESSAGE);
        out.extend_from_slice(&n.to_be_bytes());
        seal_into(
            &plain,
            &nonce(b"CurveZMQMESSAGES", &n.to_be_bytes()),
            &self.precomputed,
            out,
        );
    }

    /// Open one MESSAGE frame: its flags and body. Refused: a nonce not above the last
    /// one (a replay, or reordering), a box that does not open under this session's key
    /// and the client's nonce prefix (tampered, or our own MESSAGE reflected back).
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
        let mut m = open(c, &nonce(b"CurveZMQMESSAGEC", tail), &self.precomputed)
            .ok_or("a MESSAGE that does not open")?;
        self.recv_nonce = n;
        let mut flags = if m[0] & BOX_MORE != 0 { super::MORE } else { 0 };
        if m[0] & BOX_COMMAND != 0 {
            flags |= super::COMMAND;
        }
        m.remove(0);
        Ok((flags, m))
    }
}

/// Decode a Z85 (40 characters) or raw (32 bytes) CURVE key; what it passes through is
/// wiped (the key may be a secret).
pub fn decode_key(key: &[u8]) -> Result<SecretKey, String> {
    let mut out = Zeroizing::new([0u8; 32]);
    match key.len() {
        32 => out.copy_from_slice(key),
        40 => {
            let text = std::str::from_utf8(key).map_err(|e| e.to_string())?;
            let raw =
                Zeroizing::new(zmq::z85_decode(text).map_err(|e| format!("invalid Z85 key: {e}"))?);
            if raw.len() != 32 {
                return Err("decoded key is not 32 bytes".into());
            }
            out.copy_from_slice(&raw);
        }
        n => {
            return Err(format!(
                "a CURVE key is 32 bytes or 40 Z85 characters, got {n}"
            ))
        }
    }
    Ok(out)
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
        assert_eq!(*decode_key(z85.as_bytes()).unwrap(), raw);
        assert_eq!(*decode_key(&raw).unwrap(), raw);
        assert!(decode_key(b"short").is_err());
    }

    #[test]
    fn the_public_key_is_libzmqs() {
        let pair = zmq::CurveKeyPair::new().unwrap();
        assert_eq!(public_of(&pair.secret_key), pair.public_key);
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
            let server = Server::new(Zeroizing::new([5u8; 32]), [[6u8; 32]]);
            let _ = Handshake::WaitHello.hello(&server, &bytes);
            let waiting = Handshake::WaitInitiate {
                client_short: [1; 32],
                short_secret: Zeroizing::new([3; 32]),
                cookie_key: Zeroizing::new([4; 32]),
            };
            let _ = waiting.initiate(&server, &bytes, b"");
            let mut session = Session { precomputed: Zeroizing::new([7; 32]), send_nonce: 1, recv_nonce: 1 };
            proptest::prop_assert!(session.decode(&bytes).is_err(), "a forged MESSAGE opened");
        }
    }

    #[test]
    fn libzmq_has_curve() {
        // Guard: the pools' libzmq must speak CURVE to this server.
        assert_eq!(zmq::has("curve"), Some(true));
    }
}
