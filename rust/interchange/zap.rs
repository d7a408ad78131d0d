//! ZAP (ZMQ RFC 27) handler: admits CURVE clients whose public key is in the run's
//! certificate directory, refuses everyone else. Served from the interchange loop on
//! a REP socket bound to `inproc://zeromq.zap.01` in the interchange's context.

use std::collections::HashSet;

pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// Decide one ZAP request; returns the reply frames.
#[must_use]
pub fn decide(request: &[Vec<u8>], allowed: &HashSet<[u8; 32]>) -> Vec<Vec<u8>> {
    let request_id = request.get(1).cloned().unwrap_or_default();
    let (code, text): (&[u8], &[u8]) = match request {
        [version, _, _domain, _address, _identity, mechanism, key, ..]
            if version.as_slice() == b"1.0" && mechanism.as_slice() == b"CURVE" =>
        {
            match <[u8; 32]>::try_from(key.as_slice()) {
                Ok(k) if allowed.contains(&k) => (b"200", b"OK"),
                _ => (b"400", b"client key not in the certificate directory"),
            }
        }
        _ => (b"400", b"only CURVE clients are admitted"),
    };
    vec![
        b"1.0".to_vec(),
        request_id,
        code.to_vec(),
        text.to_vec(),
        Vec::new(),
        Vec::new(),
    ]
}

/// Decode a Z85 (40 characters) or raw (32 bytes) public key.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(mech: &[u8], key: &[u8]) -> Vec<Vec<u8>> {
        vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            b"".to_vec(),
            b"127.0.0.1".to_vec(),
            b"".to_vec(),
            mech.to_vec(),
            key.to_vec(),
        ]
    }

    #[test]
    fn admits_only_listed_curve_keys() {
        let good = [1u8; 32];
        let allowed: HashSet<[u8; 32]> = [good].into_iter().collect();
        assert_eq!(decide(&req(b"CURVE", &good), &allowed)[2], b"200");
        assert_eq!(decide(&req(b"CURVE", &[2u8; 32]), &allowed)[2], b"400");
        assert_eq!(decide(&req(b"NULL", &good), &allowed)[2], b"400");
        assert_eq!(decide(&[b"junk".to_vec()], &allowed)[2], b"400");
        assert_eq!(decide(&req(b"CURVE", &good), &allowed)[1], b"7");
    }

    #[test]
    fn keys_decode_from_z85_and_raw() {
        let raw = [9u8; 32];
        let z85 = zmq::z85_encode(&raw).unwrap();
        assert_eq!(decode_key(z85.as_bytes()).unwrap(), raw);
        assert_eq!(decode_key(&raw).unwrap(), raw);
        assert!(decode_key(b"short").is_err());
    }

    #[test]
    fn libzmq_has_curve() {
        // Guard: a build that fell back to a bundled libzmq without libsodium fails here.
        assert_eq!(zmq::has("curve"), Some(true));
    }
}
