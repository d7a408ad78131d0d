//! ZMTP 3.1 (rfc.zeromq.org/spec/37), the wire protocol of ZeroMQ, spoken by the
//! interchange's worker port itself: `router` is a ROUTER that worker pools' libzmq DEALERs
//! connect to, over plain TCP sockets served from the interchange thread's own epoll;
//! `curve` is its CurveZMQ server (rfc.zeromq.org/spec/26), `certs` reads its keys. It
//! replaces a libzmq ROUTER, whose I/O thread, pipes and mailbox commands cost more per
//! message than the message's own read and write, the more so the more connections there
//! are (docs/design.md). docs/security.md says what it defends against, and which test
//! proves each claim.
//!
//! This file is the framing: the 64-byte greeting, frames (`flags, size, body`) and
//! commands (`name-length, name, body`) with their metadata properties.

#[cfg(test)]
mod attacks;
pub mod certs;
pub mod conn;
pub mod curve;
pub mod router;
#[cfg(test)]
pub(crate) mod test_client;

/// Frame flags.
pub const MORE: u8 = 0x01;
pub const LONG: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
/// The greeting's length.
pub const GREETING: usize = 64;

/// Our greeting: ZMTP 3.1, `mechanism` ("NULL" or "CURVE"), as a server.
#[must_use]
pub fn greeting(mechanism: &[u8]) -> [u8; GREETING] {
    let mut g = [0u8; GREETING];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 1;
    g[12..12 + mechanism.len()].copy_from_slice(mechanism);
    g[32] = 1; // as-server
    g
}

/// Check a peer's greeting: ZMTP 3.x with our mechanism.
pub fn check_greeting(g: &[u8], mechanism: &[u8]) -> Result<(), String> {
    if g.len() < GREETING || g[0] != 0xff || g[9] & 1 != 1 {
        return Err("not a ZMTP 3 peer (no ZMTP signature)".into());
    }
    if g[10] < 3 {
        return Err(format!("ZMTP {}.0 peer: 3.0 or later is needed", g[10]));
    }
    let theirs = &g[12..32];
    let name_len = theirs.iter().position(|&b| b == 0).unwrap_or(20);
    if &theirs[..name_len] != mechanism {
        return Err(format!(
            "security mechanism {:?}, this interchange uses {:?} (encrypted on one side only?)",
            String::from_utf8_lossy(&theirs[..name_len]),
            String::from_utf8_lossy(mechanism)
        ));
    }
    Ok(())
}

/// The header of the frame at the start of `b`, once the header is there (the body may
/// still be coming): its flags, header length and body length. `Err` for a size no
/// machine could hold.
pub fn frame_header(b: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    let Some(&flags) = b.first() else {
        return Ok(None);
    };
    if flags & LONG == 0 {
        return Ok(b.get(1).map(|&s| (flags, 2, usize::from(s))));
    }
    let Some(s) = b.get(1..9) else {
        return Ok(None);
    };
    let size = u64::from_be_bytes(s.try_into().expect("8 bytes"));
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= isize::MAX as usize - 9)
        .ok_or_else(|| format!("a frame of {size} bytes"))?;
    Ok(Some((flags, 9, size)))
}

/// The frame at the start of `b` if all of it is there: its flags, header length and
/// body length. `Err` for a size no machine could hold.
pub fn next_frame(b: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    Ok(frame_header(b)?.filter(|&(_, head, size)| b.len() >= head + size))
}

/// The header a frame of `len` bytes needs (flags are OR-ed into its first byte).
#[must_use]
pub fn frame_head(flags: u8, len: usize) -> ([u8; 9], usize) {
    let mut h = [0u8; 9];
    if let Ok(short) = u8::try_from(len) {
        h[0] = flags;
        h[1] = short;
        (h, 2)
    } else {
        h[0] = flags | LONG;
        h[1..9].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 9)
    }
}

/// Append one frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, flags: u8, body: &[u8]) {
    let (h, n) = frame_head(flags, body.len());
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(body);
}

/// A command's body: its name, then `body`.
#[must_use]
pub fn command(name: &[u8], body: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(1 + name.len() + body.len());
    c.push(u8::try_from(name.len()).expect("a short command name"));
    c.extend_from_slice(name);
    c.extend_from_slice(body);
    c
}

/// If `frame` is the command `name`, its body.
#[must_use]
pub fn command_body<'a>(frame: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let (&n, rest) = frame.split_first()?;
    (usize::from(n) == name.len() && rest.starts_with(name)).then(|| &rest[name.len()..])
}

/// Metadata properties, as READY and INITIATE carry them.
#[must_use]
pub fn metadata(props: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut m = Vec::new();
    for (name, value) in props {
        m.push(u8::try_from(name.len()).expect("a short property name"));
        m.extend_from_slice(name);
        m.extend_from_slice(
            &u32::try_from(value.len())
                .expect("a short value")
                .to_be_bytes(),
        );
        m.extend_from_slice(value);
    }
    m
}

/// What a peer's metadata says of it: its socket type and routing identity.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub socket_type: Vec<u8>,
    pub identity: Vec<u8>,
}

/// Parse metadata properties; names compare without case, unknown ones are skipped.
pub fn parse_metadata(mut b: &[u8]) -> Result<PeerInfo, String> {
    let mut info = PeerInfo::default();
    let bad = || "malformed metadata".to_string();
    while !b.is_empty() {
        let n = usize::from(b[0]);
        let name = b.get(1..1 + n).ok_or_else(bad)?;
        let len = b.get(1 + n..5 + n).ok_or_else(bad)?;
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        let value = b.get(5 + n..5 + n + len).ok_or_else(bad)?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            info.socket_type = value.to_vec();
        } else if name.eq_ignore_ascii_case(b"Identity") {
            info.identity = value.to_vec();
        }
        b = &b[5 + n + len..];
    }
    match info.socket_type.as_slice() {
        b"DEALER" | b"REQ" | b"ROUTER" => Ok(info),
        other => Err(format!(
            "a {:?} socket cannot talk to a ROUTER",
            String::from_utf8_lossy(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_short_and_long() {
        let mut out = Vec::new();
        put_frame(&mut out, MORE, b"abc");
        put_frame(&mut out, 0, &vec![7u8; 300]);
        assert_eq!(next_frame(&out).unwrap(), Some((MORE, 2, 3)));
        let rest = &out[5..];
        assert_eq!(next_frame(rest).unwrap(), Some((LONG, 9, 300)));
        assert_eq!(next_frame(&rest[..100]).unwrap(), None);
        assert_eq!(next_frame(&[]).unwrap(), None);
        let huge = [LONG, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(next_frame(&huge).is_err());
    }

    #[test]
    fn greetings_are_checked() {
        let ours = greeting(b"NULL");
        assert!(check_greeting(&ours, b"NULL").is_ok());
        let err = check_greeting(&ours, b"CURVE").unwrap_err();
        assert!(err.contains("encrypted on one side only"), "{err}");
        let mut old = ours;
        old[10] = 2;
        assert!(check_greeting(&old, b"NULL").is_err());
        assert!(check_greeting(b"GET / HTTP/1.1\r\n", b"NULL").is_err());
    }

    #[test]
    fn metadata_round_trips_and_needs_a_routable_socket_type() {
        let m = metadata(&[
            (b"Socket-Type", b"DEALER"),
            (b"identity", b"pool-1"),
            (b"X", b""),
        ]);
        let info = parse_metadata(&m).unwrap();
        assert_eq!(info.identity, b"pool-1");
        assert_eq!(info.socket_type, b"DEALER");
        assert!(parse_metadata(&metadata(&[(b"Socket-Type", b"PUB")])).is_err());
        assert!(parse_metadata(&m[..m.len() - 1]).is_err());
        assert_eq!(command_body(&command(b"READY", &m), b"READY"), Some(&m[..]));
        assert_eq!(command_body(&command(b"READY", &m), b"ERROR"), None);
    }
}

#[cfg(test)]
mod fuzz {
    //! Property-based fuzzing of what reads a peer's bytes: never a panic.
    use super::*;
    use crate::protocol::fuzz::cases;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(cases(20_000, 1_000_000))]

        #[test]
        fn frame_metadata_and_greeting_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = check_greeting(&bytes, b"NULL");
            if let Ok(info) = parse_metadata(&bytes) {
                prop_assert!(matches!(info.socket_type.as_slice(), b"DEALER" | b"REQ" | b"ROUTER"));
            }
            if let Ok(Some((flags, head, size))) = next_frame(&bytes) {
                prop_assert!(head + size <= bytes.len());
                if flags & LONG == 0 {
                    let mut out = Vec::new();
                    put_frame(&mut out, flags, &bytes[head..head + size]);
                    prop_assert_eq!(&out[..], &bytes[..head + size]);
                }
            }
            let _ = command_body(&bytes, b"READY");
        }
    }
}
