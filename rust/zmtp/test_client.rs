//! A CurveZMQ client for tests, built from the same boxes as the server, whose every
//! field can be set wrong: the adversarial tests (`attacks.rs`) drive the server with it,
//! through [`Handshake`](super::curve::Handshake) directly or over a socket.

use zeroize::Zeroizing;

use super::curve::{agree, keypair, nonce, open, random, seal, secretbox, SecretKey, MESSAGE};
use super::{command_body, metadata};

/// What an INITIATE says; each field left `None` is the honest value.
#[derive(Default, Clone)]
pub struct Initiate {
    /// The long-term key named in the INITIATE (C).
    pub long_public: Option<[u8; 32]>,
    /// The secret that seals the vouch (else the client's own c).
    pub vouch_signer: Option<[u8; 32]>,
    /// The short-term key the vouch names (C').
    pub vouch_short: Option<[u8; 32]>,
    /// The server key the vouch names (S).
    pub vouch_server: Option<[u8; 32]>,
    /// The cookie sent back (16-byte nonce + 80-byte box), else the WELCOME's.
    pub cookie: Option<Vec<u8>>,
    /// The INITIATE's short nonce (else the next one).
    pub nonce: Option<u64>,
    /// Metadata (else a DEALER with identity "mallory").
    pub metadata: Option<Vec<u8>>,
}

pub struct Client {
    pub long_public: [u8; 32],
    long_secret: SecretKey,
    pub server: [u8; 32],
    pub short_public: [u8; 32],
    short_secret: SecretKey,
    /// The server's short-term key and cookie, from WELCOME.
    pub server_short: Option<[u8; 32]>,
    pub cookie: Option<Vec<u8>>,
    /// Our last nonce sent, the server's last seen.
    pub nonce: u64,
    pub server_nonce: u64,
}

impl Client {
    /// A client with a fresh long-term key pair, for server key `server`.
    pub fn new(server: [u8; 32]) -> Client {
        let (long_public, long_secret) = keypair();
        Client::with_keys(server, long_public, *long_secret)
    }

    pub fn with_keys(server: [u8; 32], long_public: [u8; 32], long_secret: [u8; 32]) -> Client {
        let (short_public, short_secret) = keypair();
        Client {
            long_public,
            long_secret: Zeroizing::new(long_secret),
            server,
            short_public,
            short_secret,
            server_short: None,
            cookie: None,
            nonce: 0,
            server_nonce: 0,
        }
    }

    fn next_nonce(&mut self) -> u64 {
        self.nonce += 1;
        self.nonce
    }

    /// The HELLO command body (200 bytes).
    pub fn hello(&mut self) -> Vec<u8> {
        let n = self.next_nonce().to_be_bytes();
        let k = agree(&self.server, &self.short_secret).expect("a valid server key");
        let mut body = b"\x05HELLO\x01\x00".to_vec();
        body.extend_from_slice(&[0u8; 72]);
        body.extend_from_slice(&self.short_public);
        body.extend_from_slice(&n);
        body.extend_from_slice(&seal(&[0u8; 64], &nonce(b"CurveZMQHELLO---", &n), &k));
        body
    }

    /// Take the server's WELCOME command body.
    pub fn welcome(&mut self, cmd: &[u8]) -> Result<(), &'static str> {
        let body = command_body(cmd, b"WELCOME").ok_or("not a WELCOME")?;
        if body.len() != 16 + 144 {
            return Err("a WELCOME of the wrong size");
        }
        let k = agree(&self.server, &self.short_secret).ok_or("bad server key")?;
        let plain = open(&body[16..], &nonce(b"WELCOME-", &body[..16]), &k)
            .ok_or("WELCOME does not open")?;
        self.server_short = Some(plain[..32].try_into().unwrap());
        self.cookie = Some(plain[32..].to_vec());
        Ok(())
    }

    /// An INITIATE command body, honest but for what `how` changes.
    pub fn initiate(&mut self, how: &Initiate) -> Vec<u8> {
        let server_short = self.server_short.expect("a WELCOME first");
        let vouch_tail: [u8; 16] = random();
        let mut vouch = Vec::with_capacity(64);
        vouch.extend_from_slice(&how.vouch_short.unwrap_or(self.short_public));
        vouch.extend_from_slice(&how.vouch_server.unwrap_or(self.server));
        let signer = how
            .vouch_signer
            .map_or_else(|| self.long_secret.clone(), Zeroizing::new);
        let vk = agree(&server_short, &signer).unwrap();
        let vouch_box = seal(&vouch, &nonce(b"VOUCH---", &vouch_tail), &vk);
        let mut plain = how.long_public.unwrap_or(self.long_public).to_vec();
        plain.extend_from_slice(&vouch_tail);
        plain.extend_from_slice(&vouch_box);
        plain.extend_from_slice(&how.metadata.clone().unwrap_or_else(|| {
            metadata(&[(b"Socket-Type", b"DEALER"), (b"Identity", b"mallory")])
        }));
        let n = match how.nonce {
            Some(n) => {
                self.nonce = n;
                n
            }
            None => self.next_nonce(),
        }
        .to_be_bytes();
        let k = agree(&server_short, &self.short_secret).unwrap();
        let mut body = b"\x08INITIATE".to_vec();
        body.extend_from_slice(
            how.cookie
                .as_ref()
                .or(self.cookie.as_ref())
                .expect("a cookie"),
        );
        body.extend_from_slice(&n);
        body.extend_from_slice(&seal(&plain, &nonce(b"CurveZMQINITIATE", &n), &k));
        body
    }

    /// The session's agreement (C' <-> S').
    fn session_key(&self) -> SecretKey {
        agree(
            &self.server_short.expect("a WELCOME first"),
            &self.short_secret,
        )
        .unwrap()
    }

    /// Take the server's READY: its metadata.
    pub fn ready(&mut self, cmd: &[u8]) -> Result<Vec<u8>, &'static str> {
        let body = command_body(cmd, b"READY").ok_or("not a READY")?;
        let n = body.get(..8).ok_or("short READY")?;
        let plain = open(
            &body[8..],
            &nonce(b"CurveZMQREADY---", n),
            &self.session_key(),
        )
        .ok_or("READY does not open")?;
        self.server_nonce = u64::from_be_bytes(n.try_into().unwrap());
        Ok(plain)
    }

    /// A MESSAGE frame body carrying `body` with box flags `flags` (0x01 more, 0x02
    /// command), under nonce `n` (else the next one).
    pub fn message(&mut self, flags: u8, body: &[u8], n: Option<u64>) -> Vec<u8> {
        let n = n.unwrap_or_else(|| self.next_nonce()).to_be_bytes();
        let mut plain = vec![flags];
        plain.extend_from_slice(body);
        let mut frame = MESSAGE.to_vec();
        frame.extend_from_slice(&n);
        frame.extend_from_slice(&seal(
            &plain,
            &nonce(b"CurveZMQMESSAGEC", &n),
            &self.session_key(),
        ));
        frame
    }

    /// Open a MESSAGE frame from the server: (box flags, body).
    pub fn open_message(&mut self, frame: &[u8]) -> Option<(u8, Vec<u8>)> {
        let n = frame.get(MESSAGE.len()..MESSAGE.len() + 8)?;
        let plain = open(
            &frame[MESSAGE.len() + 8..],
            &nonce(b"CurveZMQMESSAGES", n),
            &self.session_key(),
        )?;
        self.server_nonce = u64::from_be_bytes(n.try_into().unwrap());
        Some((plain[0], plain[1..].to_vec()))
    }
}

/// A cookie as a server with cookie key `key` would make it for (C', s').
pub fn forge_cookie(key: &[u8; 32], client_short: &[u8; 32], short_secret: &[u8; 32]) -> Vec<u8> {
    let tail: [u8; 16] = random();
    let mut plain = client_short.to_vec();
    plain.extend_from_slice(short_secret);
    let mut c = tail.to_vec();
    c.extend_from_slice(&secretbox(&plain, &nonce(b"COOKIE--", &tail), key));
    c
}
