//! A worker process's end of its stream to the pool. The worker's main thread takes
//! tasks in order ([`Inbox::next`]) and sends each result the moment it has it
//! ([`Inbox::send_result`]). While it has nothing to run it reads the stream itself, so a
//! task reaches it with no hand-off between threads; while it runs a task, a helper
//! thread, which never needs the worker's interpreter, reads instead: it queues the tasks
//! the core sends ahead and answers RECLAIM at once with every task not yet started, even
//! while a long task holds the interpreter.
//!
//! Once the stream has ended (the pool is gone, or the core closed it) nothing more is
//! handed out: the core has put this worker's unstarted tasks back in its queue.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use crate::protocol::{decode_header, decode_meta, encode_meta, header, message_limit, Kind};
use crate::stream::{peer_cred, unix_addr, write_parts, Decoder};

/// A task as the core sent it: its id, the flags of its meta entry, its payload.
pub struct Task {
    pub id: u64,
    pub flags: u8,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct State {
    tasks: VecDeque<Task>,
    closed: bool,
    /// The main thread is running a task (the helper reads the stream meanwhile).
    running: bool,
    /// The helper waits for the main thread to start a task.
    helper_parked: bool,
}

struct Shared {
    /// Blocking, for writes; reads never block (`MSG_DONTWAIT`): both threads wait in
    /// `poll`, and whoever reads holds `reading`.
    stream: UnixStream,
    reading: Mutex<Decoder>,
    writing: Mutex<()>,
    state: Mutex<State>,
    helper_cv: Condvar,
    /// Written when the helper queued tasks or saw the end while the main thread waits.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

pub struct Inbox {
    shared: Arc<Shared>,
}

/// The pool's worker socket (`@name`: abstract, else a path), if a process of our own
/// user serves it. An abstract name has no file permissions: whoever binds it first holds
/// it, and a worker that took tasks from another user's socket would run their pickles
/// and hand them its results (the pool checks its workers the same way).
pub fn connect(url: &str) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect_addr(&unix_addr(url)?)?;
    // SAFETY: geteuid cannot fail. SO_PEERCRED gives the listener's effective uid.
    let own = unsafe { libc::geteuid() };
    match peer_cred(&stream) {
        Some((_, uid)) if uid == own => Ok(stream),
        Some((_, uid)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the pool socket {url} is served by uid {uid}, this worker runs as uid {own}: \
                 another user holds the pool's socket name; refusing to take tasks from it"
            ),
        )),
        None => Err(std::io::Error::last_os_error()),
    }
}

impl Inbox {
    /// Register as worker `rank` on `stream` and start the helper. Messages with more
    /// than `max_message_bytes` of payload end the stream (the core never sends one).
    pub fn start(
        stream: UnixStream,
        rank: &[u8],
        max_message_bytes: usize,
    ) -> std::io::Result<Inbox> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            stream,
            reading: Mutex::new(Decoder::new(message_limit(max_message_bytes))),
            writing: Mutex::new(()),
            state: Mutex::default(),
            helper_cv: Condvar::new(),
            wake_tx,
            wake_rx,
        });
        shared.send(&[&header(Kind::Register), rank])?;
        let helper = shared.clone();
        std::thread::Builder::new()
            .name("htex-rs-worker-inbox".into())
            .spawn(move || helper.help())?;
        Ok(Inbox { shared })
    }

    /// The next task to run, waiting for one; `None` once the stream has ended.
    #[must_use]
    pub fn next(&self) -> Option<Task> {
        let sh = &self.shared;
        loop {
            {
                let mut s = sh.state.lock().unwrap();
                if s.closed {
                    return None;
                }
                if let Some(t) = s.tasks.pop_front() {
                    s.running = true;
                    if s.helper_parked {
                        sh.helper_cv.notify_one();
                    }
                    return Some(t);
                }
                s.running = false;
            }
            wait_readable(&[sh.stream.as_raw_fd(), sh.wake_rx.as_raw_fd()]);
            let mut drain = [0u8; 64];
            while matches!((&sh.wake_rx).read(&mut drain), Ok(n) if n > 0) {}
            sh.pump();
        }
    }

    /// One task's result (or exception, or any other status), sent at once; the payload
    /// is given in parts, written back to back as one frame.
    pub fn send_result(&self, task_id: u64, status: u8, payload: &[&[u8]]) -> std::io::Result<()> {
        let head = header(Kind::Results);
        let meta = encode_meta(&[(task_id, status)]);
        let _w = self.shared.writing.lock().unwrap();
        write_parts(&mut &self.shared.stream, &[&[&head], &[&meta], payload])
    }
}

impl Shared {
    fn send(&self, frames: &[&[u8]]) -> std::io::Result<()> {
        let _w = self.writing.lock().unwrap();
        let frames: Vec<&[&[u8]]> = frames.iter().map(std::slice::from_ref).collect();
        write_parts(&mut &self.stream, &frames)
    }

    /// The helper: reads the stream while the main thread runs a task, until it ends.
    fn help(&self) {
        loop {
            {
                let mut s = self.state.lock().unwrap();
                while !s.running && !s.closed {
                    s.helper_parked = true;
                    s = self.helper_cv.wait(s).unwrap();
                }
                s.helper_parked = false;
                if s.closed {
                    return;
                }
            }
            wait_readable(&[self.stream.as_raw_fd()]);
            if self.state.lock().unwrap().running {
                self.pump();
            } // else the main thread waits for a task and reads it itself
        }
    }

    /// Read what has arrived, without blocking, and act on every whole message.
    fn pump(&self) {
        let mut decoder = self.reading.lock().unwrap();
        let open = matches!(decoder.fill_from(&mut DontWait(&self.stream)), Ok(true));
        loop {
            match decoder.next_message() {
                Ok(Some(frames)) => {
                    if !self.on_message(frames) {
                        return self.close();
                    }
                }
                Ok(None) => break,
                Err(_) => return self.close(),
            }
        }
        if !open {
            self.close();
        }
    }

    /// False if the stream should end here.
    fn on_message(&self, mut frames: Vec<Vec<u8>>) -> bool {
        match frames.first().map(|h| decode_header(h)) {
            Some(Ok(Kind::Tasks)) if frames.len() >= 2 => {
                let payloads = frames.split_off(2);
                let Ok(meta) = decode_meta(&frames[1], payloads.len()) else {
                    return false;
                };
                let mut s = self.state.lock().unwrap();
                s.tasks.extend(
                    meta.into_iter()
                        .zip(payloads)
                        .map(|((id, flags), payload)| Task { id, flags, payload }),
                );
                if !s.running {
                    let _ = (&self.wake_tx).write(&[1]);
                }
                true
            }
            Some(Ok(Kind::Reclaim)) => {
                let back: Vec<(u64, u8)> = {
                    let mut s = self.state.lock().unwrap();
                    s.tasks.drain(..).map(|t| (t.id, 0)).collect()
                };
                self.send(&[&header(Kind::Returned), &encode_meta(&back)])
                    .is_ok()
            }
            _ => true, // a kind this side does not use
        }
    }

    fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.helper_cv.notify_all();
        let _ = (&self.wake_tx).write(&[1]);
    }
}

/// Reads a stream whose writes block without blocking (`MSG_DONTWAIT`), so that
/// [`Decoder::fill_from`] stops at "would block".
struct DontWait<'a>(&'a UnixStream);

impl Read for DontWait<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// Until one of `fds` is readable (or has hung up).
fn wait_readable(fds: &[RawFd]) {
    let mut items: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: items is a valid array of items.len() pollfds.
        let rc = unsafe { libc::poll(items.as_mut_ptr(), items.len() as libc::nfds_t, -1) };
        if rc >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{META_ENTRY, STATUS_RESULT};
    use crate::stream::encode;
    use std::time::Duration;

    /// The core's end: whole messages in and out.
    struct Core {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl Core {
        fn send(&mut self, frames: &[&[u8]]) {
            self.stream.write_all(&encode(frames).unwrap()).unwrap();
        }

        fn tasks(&mut self, ids: &[u64]) {
            let meta = encode_meta(&ids.iter().map(|id| (*id, 0)).collect::<Vec<_>>());
            let payloads: Vec<Vec<u8>> = ids.iter().map(|id| id.to_le_bytes().to_vec()).collect();
            let head = header(Kind::Tasks);
            let mut frames: Vec<&[u8]> = vec![&head, &meta];
            frames.extend(payloads.iter().map(Vec::as_slice));
            self.send(&frames);
        }

        fn recv(&mut self) -> Vec<Vec<u8>> {
            crate::stream::recv_message(&self.stream, &mut self.decoder)
        }
    }

    fn pair() -> (Inbox, Core) {
        let (a, b) = UnixStream::pair().unwrap();
        let inbox = Inbox::start(a, b"3", 1 << 20).unwrap();
        let mut core = Core {
            stream: b,
            decoder: Decoder::new(1 << 20),
        };
        let reg = core.recv();
        assert_eq!(decode_header(&reg[0]), Ok(Kind::Register));
        assert_eq!(reg[1], b"3");
        (inbox, core)
    }

    #[test]
    fn tasks_come_out_in_order_and_results_go_back_at_once() {
        let (inbox, mut core) = pair();
        core.tasks(&[5, 6]);
        core.tasks(&[7]);
        for want in [5u64, 6, 7] {
            let t = inbox.next().unwrap();
            assert_eq!((t.id, t.payload), (want, want.to_le_bytes().to_vec()));
            inbox
                .send_result(t.id, STATUS_RESULT, &[b"do", b"ne"])
                .unwrap();
            let r = core.recv();
            assert_eq!(decode_header(&r[0]), Ok(Kind::Results));
            assert_eq!(decode_meta(&r[1], 1).unwrap(), vec![(want, STATUS_RESULT)]);
            assert_eq!(r[2], b"done");
        }
    }

    #[test]
    fn a_reclaim_is_answered_with_the_unstarted_tasks_while_one_runs() {
        let (inbox, mut core) = pair();
        core.tasks(&[1, 2, 3]);
        let running = inbox.next().unwrap();
        assert_eq!(running.id, 1);
        // The main thread is busy with task 1; the reader answers alone.
        core.send(&[&header(Kind::Reclaim)]);
        let r = core.recv();
        assert_eq!(decode_header(&r[0]), Ok(Kind::Returned));
        let back = decode_meta(&r[1], r[1].len() / META_ENTRY).unwrap();
        assert_eq!(back, vec![(2, 0), (3, 0)]);
        // Nothing is left to start; a reclaim with nothing to give back says so.
        core.send(&[&header(Kind::Reclaim)]);
        assert!(core.recv()[1].is_empty());
        core.tasks(&[4]);
        assert_eq!(inbox.next().unwrap().id, 4);
    }

    #[test]
    fn a_worker_waiting_for_work_answers_a_reclaim_and_takes_the_next_task() {
        let (inbox, mut core) = pair();
        let inbox = Arc::new(inbox);
        let waiter = {
            let inbox = inbox.clone();
            std::thread::spawn(move || inbox.next().map(|t| t.id))
        };
        core.send(&[&header(Kind::Reclaim)]);
        let r = core.recv();
        assert_eq!(decode_header(&r[0]), Ok(Kind::Returned));
        assert!(r[1].is_empty(), "nothing was queued");
        core.tasks(&[9]);
        assert_eq!(waiter.join().unwrap(), Some(9));
    }

    #[test]
    fn nothing_starts_after_the_stream_ends() {
        let (inbox, mut core) = pair();
        core.tasks(&[1, 2]);
        assert_eq!(inbox.next().unwrap().id, 1);
        drop(core);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if inbox.shared.state.lock().unwrap().closed {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the end was not seen");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(inbox.next().is_none(), "task 2 is the core's again");
    }

    #[test]
    fn a_malformed_stream_ends_it() {
        let (inbox, mut core) = pair();
        core.stream.write_all(&u32::MAX.to_le_bytes()).unwrap(); // too many frames
        assert!(inbox.next().is_none());
    }
}
