//! htex_rs wire protocol between the interchange and worker pools.
//!
//! Every message is a ZMQ multipart message whose first frame is a 4-byte header
//! `b"HX" + version + kind`. Task and result payloads are opaque bytes in frames of
//! their own, so the interchange never parses them (and writes a task's payload from
//! the submitter's own buffer: docs/design.md counts the copies).
//! Fixed fields (task ids, flags) travel in one packed "meta" frame per batch.

use serde::{Deserialize, Serialize};

/// Bumped whenever a frame layout or a message meaning changes.
pub const PROTOCOL_VERSION: u8 = 5;
pub const MAGIC: [u8; 2] = *b"HX";
/// What a message may carry beyond its payload (the user's `max_message_bytes`): the
/// header, meta and framing of a batch around it. Every size limit adds it here.
pub const FRAMING_HEADROOM: usize = 1 << 20;

/// The largest message accepted for a payload limit of `payload_limit` bytes.
#[must_use]
pub const fn message_limit(payload_limit: usize) -> usize {
    payload_limit.saturating_add(FRAMING_HEADROOM)
}

/// Bytes per entry of a task or result meta frame: task id (u64 LE) + flags/status (u8).
pub const META_ENTRY: usize = 9;

/// Message kinds. Pool -> interchange kinds are below 64, interchange -> pool at 64 and up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Probe = 1,
    Register = 2,
    Heartbeat = 3,
    Results = 4,
    /// Worker -> pool only: the tasks it had not started, answering a `Reclaim`.
    Returned = 5,
    /// Pool -> interchange: its block is ending; the tasks it had not started, to run
    /// elsewhere (`[header, reason, meta, payloads...]`). It is given nothing more.
    GiveBack = 6,
    /// Pool -> interchange: it exits now (`[header, reason]`); the tasks it still runs
    /// fail as ManagerLost with the reason.
    Leaving = 7,
    ProbeAck = 65,
    Tasks = 66,
    HeartbeatReply = 67,
    Shutdown = 68,
    Refused = 69,
    Registered = 70,
    /// Pool -> worker only: send back the tasks you have not started.
    Reclaim = 71,
}

impl Kind {
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Probe,
            2 => Kind::Register,
            3 => Kind::Heartbeat,
            4 => Kind::Results,
            5 => Kind::Returned,
            6 => Kind::GiveBack,
            7 => Kind::Leaving,
            65 => Kind::ProbeAck,
            66 => Kind::Tasks,
            67 => Kind::HeartbeatReply,
            68 => Kind::Shutdown,
            69 => Kind::Refused,
            70 => Kind::Registered,
            71 => Kind::Reclaim,
            _ => return None,
        })
    }
}

/// Why a frame could not be decoded. Malformed input is dropped and counted, never fatal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not an htex_rs header at all (wrong length or magic).
    NotHtex,
    /// An htex_rs header from another protocol version.
    Version(u8),
    UnknownKind(u8),
    /// The meta frame's length is not a multiple of [`META_ENTRY`] or does not match
    /// the number of payload frames.
    BadBatch {
        entries: usize,
        payloads: usize,
    },
    BadRegistration(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NotHtex => write!(f, "not an htex_rs frame"),
            DecodeError::Version(v) => write!(
                f,
                "peer speaks htex_rs protocol v{v}, this interchange speaks v{PROTOCOL_VERSION}"
            ),
            DecodeError::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            DecodeError::BadBatch { entries, payloads } => write!(
                f,
                "batch meta names {entries} entries but {payloads} payload frames follow"
            ),
            DecodeError::BadRegistration(e) => write!(f, "malformed registration: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

#[must_use]
pub fn header(kind: Kind) -> [u8; 4] {
    [MAGIC[0], MAGIC[1], PROTOCOL_VERSION, kind as u8]
}

/// Decode a header frame.
pub fn decode_header(frame: &[u8]) -> Result<Kind, DecodeError> {
    if frame.len() != 4 || frame[0..2] != MAGIC {
        return Err(DecodeError::NotHtex);
    }
    if frame[2] != PROTOCOL_VERSION {
        return Err(DecodeError::Version(frame[2]));
    }
    Kind::from_u8(frame[3]).ok_or(DecodeError::UnknownKind(frame[3]))
}

/// Pack `(task_id, flag)` pairs into a meta frame.
#[must_use]
pub fn encode_meta(entries: &[(u64, u8)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * META_ENTRY);
    for (id, flag) in entries {
        out.extend_from_slice(&id.to_le_bytes());
        out.push(*flag);
    }
    out
}

/// Unpack a meta frame, checking it against the number of payload frames that follow.
pub fn decode_meta(meta: &[u8], payloads: usize) -> Result<Vec<(u64, u8)>, DecodeError> {
    if meta.len() % META_ENTRY != 0 || meta.len() / META_ENTRY != payloads {
        return Err(DecodeError::BadBatch {
            entries: meta.len() / META_ENTRY,
            payloads,
        });
    }
    Ok(meta
        .chunks_exact(META_ENTRY)
        .map(|c| {
            let mut id = [0u8; 8];
            id.copy_from_slice(&c[..8]);
            (u64::from_le_bytes(id), c[8])
        })
        .collect())
}

/// Task flag: the payload is the executor's pickle of (context, buffer), not the bare
/// buffer (the pool never reads it; the worker does).
pub const FLAG_CONTEXT: u8 = 1;
/// Result status byte in a Results meta frame.
pub const STATUS_RESULT: u8 = 0;
pub const STATUS_EXCEPTION: u8 = 1;
/// A monitoring message from a worker (task id 0), forwarded like a result.
pub const STATUS_MONITORING: u8 = 2;
/// The task's worker died while running it. The payload is JSON made by the pool:
/// `{"worker_id", "hostname", "pid", "exit_code"}`; the executor raises Parsl's WorkerLost.
pub const STATUS_WORKER_LOST: u8 = 3;
/// The interchange's own answer to a task that asks for more resources than any
/// connected pool has (payload: the message, UTF-8); never sent by a pool.
pub const STATUS_UNPLACEABLE: u8 = 4;
/// The task ran past its walltime and the pool ended its worker. The payload is JSON made
/// by the pool: `{"worker_id", "hostname", "pid", "walltime", "ran"}` (seconds); the
/// executor raises Parsl's AppTimeout.
pub const STATUS_TIMEOUT: u8 = 5;

/// Registration document sent by a worker pool (JSON, second frame of `Register`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Registration {
    pub protocol_version: u8,
    pub htex_rs_version: String,
    pub python_version: String,
    pub parsl_version: String,
    pub uid: String,
    pub block_id: Option<String>,
    pub hostname: String,
    pub worker_count: u32,
    pub prefetch_capacity: u32,
    pub max_capacity: u32,
    pub start_time: f64,
    /// Epoch seconds after which the pool drains; `None` means never.
    pub drain_time: Option<f64>,
    /// Epoch seconds at which the pool's block ends (its batch job's end); `None`: unknown.
    /// Tasks with a walltime go only to pools with time left for them.
    pub block_end: Option<f64>,
    pub os: String,
    pub dir: String,
    pub cpu_count: u32,
    pub total_memory: u64,
    pub packages: serde_json::Map<String, serde_json::Value>,
    /// What the pool can grant tasks that ask for resources (its CPU slots, memory in
    /// MB, accelerators); `None` from a pool that grants nothing.
    pub resources: Option<crate::resources::Resources>,
}

impl Registration {
    /// A pool's registration document from the fields it measured (a JSON object): this
    /// struct is the document's one definition, so a field it does not have is refused,
    /// and the protocol and htex_rs versions are this build's, not the caller's.
    pub fn from_fields(fields: &[u8]) -> Result<Vec<u8>, String> {
        let given: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(fields).map_err(|e| format!("registration fields: {e}"))?;
        let known = serde_json::to_value(Registration::default()).expect("a struct serializes");
        for key in given.keys() {
            let ours = matches!(key.as_str(), "protocol_version" | "htex_rs_version");
            if ours || known.get(key).is_none() {
                return Err(format!(
                    "a registration has no field {key:?} for a pool to set"
                ));
            }
        }
        let mut reg: Registration = serde_json::from_value(serde_json::Value::Object(given))
            .map_err(|e| format!("registration fields: {e}"))?;
        reg.protocol_version = PROTOCOL_VERSION;
        reg.htex_rs_version = env!("CARGO_PKG_VERSION").into();
        let doc = serde_json::to_vec(&reg).expect("a struct serializes");
        Registration::decode(&doc).map_err(|e| e.to_string())?;
        Ok(doc)
    }

    pub fn decode(frame: &[u8]) -> Result<Registration, DecodeError> {
        let reg: Registration = serde_json::from_slice(frame)
            .map_err(|e| DecodeError::BadRegistration(e.to_string()))?;
        if reg.uid.is_empty() {
            return Err(DecodeError::BadRegistration("empty uid".into()));
        }
        if reg.max_capacity == 0 {
            return Err(DecodeError::BadRegistration("max_capacity is 0".into()));
        }
        Ok(reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_made_from_known_fields_with_this_builds_versions() {
        let doc =
            Registration::from_fields(br#"{"uid":"p","max_capacity":2,"block_id":"0"}"#).unwrap();
        let reg = Registration::decode(&doc).unwrap();
        assert_eq!(reg.protocol_version, PROTOCOL_VERSION);
        assert_eq!(reg.htex_rs_version, env!("CARGO_PKG_VERSION"));
        assert_eq!((reg.uid.as_str(), reg.max_capacity), ("p", 2));
        for bad in [
            &br#"{"uid":"p","max_capacity":2,"colour":"red"}"#[..],
            br#"{"uid":"p","max_capacity":2,"protocol_version":9}"#,
            br#"{"uid":"","max_capacity":2}"#,
            br#"{"uid":"p","max_capacity":"two"}"#,
            b"[1]",
        ] {
            assert!(Registration::from_fields(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_round_trip() {
        for k in [Kind::Probe, Kind::Register, Kind::Tasks, Kind::Refused] {
            assert_eq!(decode_header(&header(k)), Ok(k));
        }
    }

    #[test]
    fn header_rejects_junk_and_other_versions() {
        assert_eq!(decode_header(b"FuzzyByte"), Err(DecodeError::NotHtex));
        assert_eq!(decode_header(b"{}"), Err(DecodeError::NotHtex));
        assert_eq!(
            decode_header(&[b'H', b'X', 99, 2]),
            Err(DecodeError::Version(99))
        );
        assert_eq!(
            decode_header(&[b'H', b'X', PROTOCOL_VERSION, 200]),
            Err(DecodeError::UnknownKind(200))
        );
    }

    #[test]
    fn meta_round_trip_and_mismatch() {
        let entries = vec![(1u64, 0u8), (u64::MAX, 1), (42, 0)];
        let meta = encode_meta(&entries);
        assert_eq!(decode_meta(&meta, 3).unwrap(), entries);
        assert!(decode_meta(&meta, 2).is_err());
        assert!(decode_meta(&meta[..10], 1).is_err());
    }

    #[test]
    fn registration_requires_uid_and_capacity() {
        assert!(Registration::decode(b"{\"uid\":\"a\",\"max_capacity\":2}").is_ok());
        assert!(Registration::decode(b"{\"max_capacity\":2}").is_err());
        assert!(Registration::decode(b"{\"uid\":\"a\"}").is_err());
        assert!(Registration::decode(b"not json").is_err());
    }
}

#[cfg(test)]
pub(crate) mod fuzz {
    //! Property-based fuzzing of every decoder that reads bytes from the network: it must
    //! never panic, and what it accepts must re-encode to the same bytes.
    use super::*;
    use proptest::prelude::*;

    /// `fast` cases by default; `full` with `HTEX_RS_FUZZ_FULL=1` (CI sets it for one run).
    pub(crate) fn cases(fast: u32, full: u32) -> ProptestConfig {
        let full_run = std::env::var_os("HTEX_RS_FUZZ_FULL").is_some_and(|v| v == "1");
        ProptestConfig {
            cases: if full_run { full } else { fast },
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(cases(20_000, 1_000_000))]

        #[test]
        fn header_and_meta_decoders_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..48), n in 0usize..8) {
            if let Ok(kind) = decode_header(&frame) {
                prop_assert_eq!(header(kind).to_vec(), frame.clone());
            }
            if let Ok(entries) = decode_meta(&frame, n) {
                prop_assert_eq!(entries.len(), n);
                prop_assert_eq!(encode_meta(&entries), frame);
            }
        }
    }

    proptest! {
        #![proptest_config(cases(5_000, 100_000))]

        #[test]
        fn registration_decoder_never_panics(doc in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Registration::decode(&doc);
        }

        #[test]
        fn registration_decoder_survives_json_shaped_junk(
            uid in "[a-z0-9]{0,12}", cap in any::<i64>(), extra in "[ -~]{0,40}") {
            let doc = format!("{{\"uid\":\"{uid}\",\"max_capacity\":{cap},\"drain_time\":{extra}}}");
            if let Ok(r) = Registration::decode(doc.as_bytes()) {
                prop_assert!(!r.uid.is_empty() && r.max_capacity > 0);
            }
        }

        #[test]
        fn meta_round_trips(entries in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..64)) {
            prop_assert_eq!(decode_meta(&encode_meta(&entries), entries.len()).unwrap(), entries);
        }
    }
}
