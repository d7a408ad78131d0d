//! The worker streams: accept a worker's connection (same uid only), read its frames,
//! write what it is sent, and act on its messages (registration, results, monitoring).

use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::Core;
use crate::protocol::{
    decode_header, decode_meta, message_limit, Kind, META_ENTRY, STATUS_MONITORING,
};
use crate::stream::{self, Decoder, Outbox};

/// One worker's stream.
pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) decoder: Decoder,
    pub(super) out: Outbox,
    /// The connecting process (SO_PEERCRED): how a reported death finds its stream.
    pub(super) pid: u32,
    /// The worker's rank, set by its registration. Streams that never register (a
    /// process's monitoring channel) only send monitoring messages.
    pub(super) rank: Option<Vec<u8>>,
    /// False once the stream ended or broke; the entry stays until the worker's death is
    /// reported, so the task it was running can be failed.
    pub(super) open: bool,
    /// What the loop's epoll watches this stream for (`None`: not watched).
    pub(super) watched: Option<u32>,
}

impl Conn {
    /// Stop using this stream and end it for the peer too: a real worker then sees the
    /// end of its stream and exits, and its supervisor reports the loss (WorkerLost).
    pub(super) fn close(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.open = false;
    }
}
impl Core {
    pub(super) fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // An abstract socket has no file permissions: admit only processes
                    // of our own user (workers are our children).
                    let Some((pid, uid)) = stream::peer_cred(&stream) else {
                        continue;
                    };
                    if uid != self.own_uid || stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.next_token += 1;
                    self.conns.insert(
                        self.next_token,
                        Conn {
                            stream,
                            decoder: Decoder::new(message_limit(self.config.max_message_bytes)),
                            out: Outbox::default(),
                            pid,
                            rank: None,
                            open: true,
                            watched: None,
                        },
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Read what the worker sent and act on every whole message.
    pub(super) fn read(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut messages = Vec::new();
        let alive = c.open && matches!(c.decoder.fill_from(&mut c.stream), Ok(true));
        loop {
            match c.decoder.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(e) => {
                    // A broken or hostile stream: its worker is restarted and its tasks
                    // end as WorkerLost rather than hang.
                    log::warn!("closing the stream of pid {}: {e}", c.pid);
                    c.close();
                    break;
                }
            }
        }
        if !alive {
            c.open = false; // end of stream: the worker exited; its supervisor reports it
        }
        let unregistered_and_closed = !c.open && c.rank.is_none();
        if !c.open {
            self.tasks.retire(token);
        }
        for m in messages {
            self.on_worker(token, m);
        }
        if unregistered_and_closed {
            self.conns.remove(&token); // never a worker: nobody will report its death
        }
    }

    pub(super) fn flush(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if c.out.flush(&mut c.stream).is_err() {
                c.close();
                self.tasks.retire(token);
            }
        }
    }

    pub(super) fn on_worker(&mut self, token: u64, frames: Vec<Vec<u8>>) {
        let kind = match frames.first().map(|h| decode_header(h)) {
            Some(Ok(k)) => k,
            Some(Err(e)) => return self.drop_junk(Some(token), &e.to_string()),
            None => return self.drop_junk(Some(token), "an empty message"),
        };
        match kind {
            Kind::Register if frames.len() == 2 => {
                let Some(c) = self.conns.get_mut(&token) else {
                    return;
                };
                if c.rank.is_some() || !c.open {
                    return self.drop_junk(Some(token), "a second registration");
                }
                log::debug!(
                    "Worker {} (pid {}) registered",
                    String::from_utf8_lossy(&frames[1]),
                    c.pid
                );
                c.rank = Some(frames[1].clone());
                self.tasks.add_worker(token);
            }
            Kind::Returned if frames.len() == 2 => {
                // A meta frame of the returned task ids, with no payload frames.
                let Ok(meta) = decode_meta(&frames[1], frames[1].len() / META_ENTRY) else {
                    return self.drop_junk(Some(token), "a malformed list of returned tasks");
                };
                let ids: Vec<u64> = meta.into_iter().map(|(id, _)| id).collect();
                self.tasks.returned(token, &ids);
            }
            Kind::Results if frames.len() >= 2 => {
                let mut frames = frames.into_iter();
                let (Some(_), Some(meta)) = (frames.next(), frames.next()) else {
                    return;
                };
                let payloads: Vec<Vec<u8>> = frames.collect();
                let meta = match decode_meta(&meta, payloads.len()) {
                    Ok(m) => m,
                    Err(e) => return self.drop_junk(Some(token), &e.to_string()),
                };
                let registered = self.conns.get(&token).is_some_and(|c| c.rank.is_some());
                for ((task_id, status), payload) in meta.into_iter().zip(payloads) {
                    if status != STATUS_MONITORING {
                        if !registered {
                            // Only a worker sends results, and only its own.
                            self.drop_junk(Some(token), "a result from an unregistered stream");
                            continue;
                        }
                        let now = Instant::now();
                        // Parsl's own timeout ended it (a python app between bytecodes, a
                        // bash app's shell): what the task started may still run, so its
                        // worker is ended all the same.
                        let reached_limit = self.tasks.reached_limit(token, task_id, now);
                        self.tasks.finished(token, task_id, now);
                        self.counts.results += 1;
                        if reached_limit {
                            log::info!(
                                "task {task_id} ended at its walltime: ending its worker and \
                                 what it started"
                            );
                            self.end_worker(token, now);
                        }
                    }
                    if self.results.full() {
                        self.results.send(&self.ix);
                    }
                    self.results.push(task_id, status, payload);
                }
            }
            k => self.drop_junk(
                Some(token),
                &format!("unexpected message kind {k:?} or frame count"),
            ),
        }
    }
}
