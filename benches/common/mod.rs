//! A fake worker pool for the benches: a DEALER that registers with the interchange and
//! answers every task batch with its payloads as results. Shared by `interchange` and
//! `scale` (a subdirectory, so cargo does not take it for a bench of its own).

use htex_rs::api::protocol::{
    decode_meta, encode_meta, header, Kind, Registration, PROTOCOL_VERSION, STATUS_RESULT,
};

/// Connect to the interchange on `port` and register as `uid` with `capacity` slots.
#[allow(dead_code)] // the scale bench makes its own sockets
pub fn register(
    ctx: &zmq::Context,
    port: u16,
    uid: &str,
    block_id: &str,
    capacity: u32,
) -> zmq::Socket {
    register_socket(
        ctx.socket(zmq::DEALER).unwrap(),
        port,
        uid,
        block_id,
        capacity,
    )
}

/// [`register`] on a DEALER socket made elsewhere.
#[allow(dead_code)] // only the scale bench makes its own
pub fn register_socket(
    s: zmq::Socket,
    port: u16,
    uid: &str,
    block_id: &str,
    capacity: u32,
) -> zmq::Socket {
    s.set_linger(0).unwrap();
    s.set_identity(uid.as_bytes()).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    s.send_multipart(registration(uid, block_id, capacity), 0)
        .unwrap();
    s
}

/// The frames of a registration as `uid` with `capacity` slots.
pub fn registration(uid: &str, block_id: &str, capacity: u32) -> [Vec<u8>; 2] {
    let reg = Registration {
        protocol_version: PROTOCOL_VERSION,
        uid: uid.into(),
        block_id: Some(block_id.into()),
        worker_count: capacity,
        max_capacity: capacity,
        ..Registration::default()
    };
    [
        header(Kind::Register).to_vec(),
        serde_json::to_vec(&reg).unwrap(),
    ]
}

/// For a task batch: its task ids and the results message that echoes it. `None` for
/// anything else (registration acknowledgements, heartbeat replies).
pub fn echo(frames: Vec<Vec<u8>>) -> Option<(Vec<u64>, Vec<Vec<u8>>)> {
    if frames.first()? != &header(Kind::Tasks) {
        return None;
    }
    let meta = decode_meta(&frames[1], frames.len() - 2).unwrap();
    let ids: Vec<u64> = meta.iter().map(|(id, _)| *id).collect();
    let out: Vec<(u64, u8)> = ids.iter().map(|id| (*id, STATUS_RESULT)).collect();
    let mut msg = vec![header(Kind::Results).to_vec(), encode_meta(&out)];
    msg.extend(frames.into_iter().skip(2));
    Some((ids, msg))
}
