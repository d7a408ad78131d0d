//! The interchange side: messages from the interchange, and results on their way back
//! to it (those that finished in one pass of the loop leave together).

use super::tasks::Task;
use super::{Core, Stopped};
use crate::protocol::{decode_header, decode_meta, encode_meta, header, Kind};
use crate::resources;
use crate::stream;
use crate::transport::send_frames;

/// Results waiting to go to the interchange: those that arrived in one pass of the loop
/// (all already finished) leave together at its end.
#[derive(Default)]
pub(super) struct ResultBatch {
    pub(super) meta: Vec<(u64, u8)>,
    pub(super) payloads: Vec<Vec<u8>>,
    pub(super) bytes: usize,
}

impl ResultBatch {
    /// Past these, a batch is sent before more is added.
    const MAX_RESULTS: usize = 1024;
    const MAX_BYTES: usize = 16 << 20;

    pub(super) fn full(&self) -> bool {
        self.payloads.len() >= Self::MAX_RESULTS || self.bytes >= Self::MAX_BYTES
    }

    pub(super) fn push(&mut self, task_id: u64, status: u8, payload: Vec<u8>) {
        self.meta.push((task_id, status));
        self.bytes += payload.len();
        self.payloads.push(payload);
    }

    pub(super) fn send(&mut self, ix: &zmq::Socket) {
        if self.payloads.is_empty() {
            return;
        }
        let head = [header(Kind::Results).to_vec(), encode_meta(&self.meta)];
        self.meta.clear();
        let payloads = std::mem::take(&mut self.payloads);
        self.bytes = 0;
        let _ = send_frames(ix, head.into_iter().chain(payloads));
    }
}
impl Core {
    pub(super) fn on_interchange(&mut self, mut frames: Vec<zmq::Message>) {
        match decode_header(&frames[0]) {
            Ok(Kind::Tasks) if frames.len() >= 2 => {
                let payloads = frames.split_off(2);
                let meta = match decode_meta(&frames[1], payloads.len()) {
                    Ok(m) => m,
                    Err(e) => return self.drop_junk(None, &e.to_string()),
                };
                self.counts.received += payloads.len() as u64;
                for ((id, flags), payload) in meta.into_iter().zip(payloads) {
                    let (request, walltime) = resources::head_of(flags, &payload);
                    log::debug!("Received task {id} from the interchange");
                    let payload = stream::message_bytes(payload);
                    self.tasks
                        .push(Task::new(id, flags, payload, request).limited(walltime));
                }
            }
            Ok(Kind::Shutdown) => self.stop = Some(Stopped::Shutdown),
            Ok(Kind::Refused) => {
                let why = frames
                    .get(1)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default();
                self.stop = Some(Stopped::Refused(why));
            }
            // Answers the pool does not act on (beyond counting as contact).
            Ok(Kind::Registered | Kind::HeartbeatReply | Kind::ProbeAck) => {}
            Ok(k) => self.drop_junk(None, &format!("unexpected message kind {k:?}")),
            Err(e) => self.drop_junk(None, &e.to_string()),
        }
    }
}
