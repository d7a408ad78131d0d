//! The worker pool's data path: a thread that owns the DEALER to the interchange and
//! the Unix stream socket its worker processes connect to (one stream per worker,
//! framed by `crate::stream`: no ZMQ I/O threads between pool and worker). It registers
//! the pool, heartbeats, spreads task batches over ready workers and forwards their
//! result batches to the interchange frame for frame. Python keeps the process
//! supervision (start, pin, restart workers) and is told why the core stopped:
//! shutdown, refusal, or interchange silence.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{decode_header, decode_meta, encode_meta, header, Kind, META_ENTRY};
use crate::stream::{self, Decoder, Outbox};
use crate::transport::{recv_frames, send_frames, Mailbox};

/// CURVE client keys (40-character Z85 text or 32 raw bytes each).
#[derive(Clone)]
pub struct ClientKeys {
    pub public: Vec<u8>,
    pub secret: Vec<u8>,
    pub server_public: Vec<u8>,
}

#[derive(Clone)]
pub struct Config {
    pub interchange_url: String,
    pub identity: Vec<u8>,
    /// Where workers connect: `@name` for an abstract Unix socket, else a path.
    pub worker_url: String,
    /// Largest message a worker may send (a result batch), in bytes.
    pub max_message_bytes: usize,
    pub registration: Vec<u8>,
    pub heartbeat_period: Duration,
    pub heartbeat_threshold: Duration,
    /// Tasks one worker may hold at once.
    pub per_worker: usize,
    pub curve: Option<ClientKeys>,
}

/// Why the core stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The interchange told the pool to exit (drained, or the executor shut down).
    Shutdown,
    /// The interchange refused this pool; the text says why.
    Refused(String),
    /// Nothing heard from the interchange for longer than the heartbeat threshold.
    Silent,
    /// The TCP connection to the interchange broke. libzmq drops what the interchange had
    /// queued for us, so the pool exits and its tasks end as ManagerLost instead of hanging.
    Disconnected,
    /// Python asked the core to stop.
    Requested,
    /// The core thread ended without a reason: a bug (a panic); see the pool's stderr.
    Crashed,
}

pub enum Command {
    /// A worker process died: forget it, return the tasks it held.
    WorkerDied(Vec<u8>, Sender<Vec<u64>>),
    /// Results made on the Python side (e.g. WorkerLost), forwarded to the interchange.
    Results(Vec<(u64, u8)>, Vec<Vec<u8>>),
    Stop,
}

struct Shared {
    inbox: Mailbox<Command>,
    stopped: Mutex<Option<Stopped>>,
    stopped_cv: Condvar,
}

struct StopGuard(Arc<Shared>);
impl Drop for StopGuard {
    fn drop(&mut self) {
        // Commands sent from now on (a worker's death noticed late) get no answer:
        // disconnect their reply channels instead of letting callers wait them out.
        self.0.inbox.close();
        let mut s = self.0.stopped.lock().unwrap();
        if s.is_none() {
            *s = Some(Stopped::Crashed);
        }
        self.0.stopped_cv.notify_all();
    }
}

pub struct Handle {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Connect to the interchange, bind the worker socket, register, start the thread.
    pub fn start(config: Config) -> Result<Handle, String> {
        let ctx = zmq::Context::new();
        let ix = ctx.socket(zmq::DEALER).map_err(|e| e.to_string())?;
        let setup = || -> zmq::Result<()> {
            ix.set_identity(&config.identity)?;
            ix.set_linger(0)?;
            ix.set_ipv6(true)?;
            ix.set_sndhwm(0)?;
            ix.set_rcvhwm(0)?;
            if let Some(k) = &config.curve {
                ix.set_curve_publickey(&k.public)?;
                ix.set_curve_secretkey(&k.secret)?;
                ix.set_curve_serverkey(&k.server_public)?;
            }
            Ok(())
        };
        setup().map_err(|e| format!("cannot configure the pool sockets: {e}"))?;
        let listener = bind_workers(&config.worker_url)
            .map_err(|e| format!("cannot bind {}: {e}", config.worker_url))?;
        // Watch the connection: a reset loses the tasks queued towards us (see `Disconnected`).
        let monitor_url = format!("inproc://htex-rs-pool-monitor-{}", fastrand::u64(..));
        ix.monitor(&monitor_url, zmq::SocketEvent::DISCONNECTED as i32)
            .map_err(|e| format!("cannot monitor the interchange socket: {e}"))?;
        let monitor = ctx.socket(zmq::PAIR).map_err(|e| e.to_string())?;
        monitor.set_linger(0).map_err(|e| e.to_string())?;
        monitor.connect(&monitor_url).map_err(|e| e.to_string())?;
        ix.connect(&config.interchange_url)
            .map_err(|e| format!("cannot connect to {}: {e}", config.interchange_url))?;
        ix.send_multipart([&header(Kind::Register)[..], &config.registration], 0)
            .map_err(|e| format!("cannot send the registration: {e}"))?;

        let shared = Arc::new(Shared {
            inbox: Mailbox::new().map_err(|e| e.to_string())?,
            stopped: Mutex::new(None),
            stopped_cv: Condvar::new(),
        });
        let guard = StopGuard(shared.clone());
        let mut core = Core {
            config,
            _ctx: ctx,
            ix,
            listener,
            conns: HashMap::new(),
            next_token: 0,
            // SAFETY: geteuid cannot fail.
            own_uid: unsafe { libc::geteuid() },
            monitor,
            shared: shared.clone(),
            pending: VecDeque::new(),
            ready: HashMap::new(),
            stop: None,
        };
        let thread = std::thread::Builder::new()
            .name("htex-rs-pool-core".into())
            .spawn(move || {
                let _guard = guard;
                core.run();
            })
            .map_err(|e| e.to_string())?;
        Ok(Handle {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn command(&self, c: Command) {
        self.shared.inbox.push([c]);
    }

    /// Wait up to `timeout` for the core to stop; `None` while it runs.
    pub fn wait_stopped(&self, timeout: Duration) -> Option<Stopped> {
        let s = self.shared.stopped.lock().unwrap();
        let (s, _) = self
            .shared
            .stopped_cv
            .wait_timeout_while(s, timeout, |s| s.is_none())
            .unwrap();
        s.clone()
    }

    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            self.command(Command::Stop);
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_workers(url: &str) -> std::io::Result<UnixListener> {
    let listener = if let Some(name) = url.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        UnixListener::bind_addr(&addr)?
    } else {
        UnixListener::bind(url)?
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The uid of the process at the other end of a Unix stream (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// One worker's stream.
struct Conn {
    stream: UnixStream,
    decoder: Decoder,
    out: Outbox,
    /// Set by the worker's registration.
    identity: Option<Vec<u8>>,
    /// False once the stream ended or broke; the entry stays until the worker's death is
    /// reported, so the tasks it held can be returned.
    open: bool,
}

impl Conn {
    /// Stop using this stream and end it for the peer too: a real worker then sees the
    /// end of its stream and exits, and its supervisor reports the loss (WorkerLost).
    fn close(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.open = false;
    }
}

/// A registered worker: its stream and the task ids it holds.
struct Worker {
    token: u64,
    held: HashSet<u64>,
}

struct Core {
    config: Config,
    _ctx: zmq::Context,
    ix: zmq::Socket,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    own_uid: u32,
    monitor: zmq::Socket,
    shared: Arc<Shared>,
    /// (meta entry, payload) of tasks not yet given to a worker.
    pending: VecDeque<([u8; META_ENTRY], zmq::Message)>,
    /// Registered workers by identity.
    ready: HashMap<Vec<u8>, Worker>,
    stop: Option<Stopped>,
}

impl Core {
    fn run(&mut self) {
        let mut last_beat = Instant::now();
        let mut last_contact = Instant::now();
        let hb = self.config.heartbeat_period;
        let threshold = self.config.heartbeat_threshold;
        while self.stop.is_none() {
            let now = Instant::now();
            if now.duration_since(last_beat) >= hb {
                let _ = self.ix.send(&header(Kind::Heartbeat)[..], 0);
                last_beat = now;
            }
            if now.duration_since(last_contact) > threshold {
                self.stop = Some(Stopped::Silent);
                break;
            }
            let next = (last_beat + hb).min(last_contact + threshold);
            let timeout = next
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 1000) as i64;
            let tokens: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.open)
                .map(|(t, _)| *t)
                .collect();
            let (ix_ready, listener_ready, wake_ready, monitor_ready, conn_events) = {
                let mut items = vec![
                    self.ix.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.listener.as_raw_fd(), zmq::POLLIN),
                    zmq::PollItem::from_fd(self.shared.inbox.fd(), zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                ];
                for t in &tokens {
                    let c = &self.conns[t];
                    let mut ev = zmq::POLLIN;
                    if !c.out.is_empty() {
                        ev |= zmq::POLLOUT;
                    }
                    items.push(zmq::PollItem::from_fd(c.stream.as_raw_fd(), ev));
                }
                if zmq::poll(&mut items, timeout).is_err() {
                    continue;
                }
                let conn_events: Vec<(u64, bool, bool)> = tokens
                    .iter()
                    .zip(&items[4..])
                    .filter(|(_, i)| i.get_revents().bits() != 0)
                    .map(|(t, i)| (*t, i.is_readable() || i.is_error(), i.is_writable()))
                    .collect();
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                    items[3].is_readable(),
                    conn_events,
                )
            };
            if ix_ready {
                last_contact = Instant::now();
                for _ in 0..1024 {
                    match recv_frames(&self.ix) {
                        Some(f) => self.on_interchange(f),
                        None => break,
                    }
                }
            }
            if listener_ready {
                self.accept();
            }
            for (token, readable, writable) in conn_events {
                if writable {
                    self.flush(token);
                }
                if readable {
                    self.read(token);
                }
            }
            if wake_ready {
                self.take_inbox();
            }
            if monitor_ready && recv_frames(&self.monitor).is_some() && self.stop.is_none() {
                self.stop = Some(Stopped::Disconnected);
            }
            self.dispatch();
        }
        let mut s = self.shared.stopped.lock().unwrap();
        *s = self.stop.take();
        self.shared.stopped_cv.notify_all();
    }

    fn take_inbox(&mut self) {
        for c in self.shared.inbox.take() {
            match c {
                Command::WorkerDied(id, tx) => {
                    // Results the worker sent just before dying may still be unread on
                    // its stream: forward them first, so only unfinished tasks are lost.
                    let mut held: Vec<u64> = Vec::new();
                    if let Some(token) = self.ready.get(&id).map(|w| w.token) {
                        self.read(token);
                        self.conns.remove(&token);
                        if let Some(w) = self.ready.remove(&id) {
                            held = w.held.into_iter().collect();
                        }
                    }
                    held.sort_unstable();
                    let _ = tx.send(held);
                }
                Command::Results(meta, payloads) => {
                    let head = [header(Kind::Results).to_vec(), encode_meta(&meta)];
                    let _ = send_frames(&self.ix, head.into_iter().chain(payloads));
                }
                Command::Stop => self.stop = Some(Stopped::Requested),
            }
        }
    }

    fn on_interchange(&mut self, mut frames: Vec<zmq::Message>) {
        match decode_header(&frames[0]) {
            Ok(Kind::Tasks) if frames.len() >= 2 => {
                let payloads = frames.split_off(2);
                let meta = &frames[1];
                if meta.len() != payloads.len() * META_ENTRY {
                    return; // malformed; the interchange never sends this
                }
                for (entry, p) in meta.chunks_exact(META_ENTRY).zip(payloads) {
                    let mut e = [0u8; META_ENTRY];
                    e.copy_from_slice(entry);
                    self.pending.push_back((e, p));
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
            _ => {}
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // An abstract socket has no file permissions: admit only processes
                    // of our own user (workers are our children).
                    if peer_uid(&stream) != Some(self.own_uid)
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    self.next_token += 1;
                    self.conns.insert(
                        self.next_token,
                        Conn {
                            stream,
                            decoder: Decoder::new(self.config.max_message_bytes),
                            out: Outbox::default(),
                            identity: None,
                            open: true,
                        },
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Read what the worker sent and act on every whole message.
    fn read(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut messages = Vec::new();
        let alive = c.open && matches!(c.decoder.fill_from(&mut c.stream), Ok(true));
        loop {
            match c.decoder.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break,
                Err(_) => {
                    // A broken or hostile stream: its worker is restarted and its tasks
                    // end as WorkerLost rather than hang.
                    c.close();
                    break;
                }
            }
        }
        if !alive {
            c.open = false; // end of stream: the worker exited; its supervisor reports it
        }
        let unregistered_and_closed = !c.open && c.identity.is_none();
        for m in messages {
            self.on_worker(token, m);
        }
        if unregistered_and_closed {
            self.conns.remove(&token); // never a worker: nobody will report its death
        }
    }

    fn flush(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if c.out.flush(&mut c.stream).is_err() {
                c.close();
            }
        }
    }

    fn on_worker(&mut self, token: u64, frames: Vec<Vec<u8>>) {
        let Some(kind) = frames.first().and_then(|h| decode_header(h).ok()) else {
            return;
        };
        match kind {
            Kind::Register if frames.len() == 2 => {
                let id = frames[1].clone();
                let claimed = self
                    .ready
                    .get(&id)
                    .is_some_and(|w| self.conns.get(&w.token).is_some_and(|c| c.open));
                if claimed {
                    // Someone else claims a live worker's identity: drop the newcomer.
                    if let Some(mut c) = self.conns.remove(&token) {
                        c.close();
                    }
                    return;
                }
                if let Some(c) = self.conns.get_mut(&token) {
                    c.identity = Some(id.clone());
                }
                self.ready.insert(
                    id,
                    Worker {
                        token,
                        held: HashSet::new(),
                    },
                );
            }
            Kind::Results if frames.len() >= 2 => {
                let Ok(meta) = decode_meta(&frames[1], frames.len() - 2) else {
                    return;
                };
                let identity = self.conns.get(&token).and_then(|c| c.identity.as_ref());
                if let Some(w) = identity.and_then(|id| self.ready.get_mut(id)) {
                    for (tid, _) in meta {
                        w.held.remove(&tid);
                    }
                }
                // Already in protocol form: forward frame for frame.
                let _ = send_frames(&self.ix, frames);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let per_worker = self.config.per_worker;
        let conns = &self.conns;
        // Least-loaded first, so prefetched tasks spread over the workers.
        let mut order: Vec<(usize, Vec<u8>)> = self
            .ready
            .iter()
            .filter(|(_, w)| {
                w.held.len() < per_worker && conns.get(&w.token).is_some_and(|c| c.open)
            })
            .map(|(id, w)| (w.held.len(), id.clone()))
            .collect();
        order.sort_unstable();
        for (held, id) in order {
            if self.pending.is_empty() {
                break;
            }
            let n = (per_worker - held).min(self.pending.len());
            let batch: Vec<_> = self.pending.drain(..n).collect();
            let mut meta = Vec::with_capacity(n * META_ENTRY);
            let w = self.ready.get_mut(&id).expect("worker in order is ready");
            for (e, _) in &batch {
                meta.extend_from_slice(e);
                let mut tid = [0u8; 8];
                tid.copy_from_slice(&e[..8]);
                w.held.insert(u64::from_le_bytes(tid));
            }
            let head = header(Kind::Tasks);
            let mut frames: Vec<&[u8]> = Vec::with_capacity(n + 2);
            frames.push(&head);
            frames.push(&meta);
            frames.extend(batch.iter().map(|(_, p)| &p[..]));
            let token = w.token;
            if let Some(c) = self.conns.get_mut(&token) {
                c.out.push(stream::encode(&frames));
            }
            self.flush(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{STATUS_EXCEPTION, STATUS_RESULT};

    /// A fake interchange (ROUTER) and a core with one fake worker (a Unix stream),
    /// real sockets.
    struct Rig {
        _ctx: zmq::Context,
        ix: zmq::Socket,
        worker: FakeWorker,
        core: Handle,
        worker_addr: std::os::unix::net::SocketAddr,
    }

    struct FakeWorker {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl FakeWorker {
        fn send(&mut self, frames: &[&[u8]]) {
            use std::io::Write;
            self.stream.write_all(&stream::encode(frames)).unwrap();
        }

        fn recv(&mut self) -> Vec<Vec<u8>> {
            use std::io::Read;
            self.stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = vec![0u8; 65536];
            loop {
                if let Some(m) = self.decoder.next_message().unwrap() {
                    return m;
                }
                let n = self
                    .stream
                    .read(&mut buf)
                    .expect("timed out waiting for tasks");
                assert!(n > 0, "the core closed the stream");
                self.decoder.feed(&buf[..n]);
            }
        }
    }

    fn rig(per_worker: usize, threshold: Duration) -> Rig {
        let ctx = zmq::Context::new();
        let ix = ctx.socket(zmq::ROUTER).unwrap();
        ix.set_linger(0).unwrap();
        ix.bind("tcp://127.0.0.1:*").unwrap();
        let url = ix.get_last_endpoint().unwrap().unwrap();
        let name = format!(
            "htex-rs-core-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        );
        let core = Handle::start(Config {
            interchange_url: url,
            identity: b"pool-1".to_vec(),
            worker_url: format!("@{name}"),
            max_message_bytes: 1 << 20,
            registration: b"{}".to_vec(),
            heartbeat_period: Duration::from_millis(50),
            heartbeat_threshold: threshold,
            per_worker,
            curve: None,
        })
        .unwrap();
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()
        };
        let mut worker = FakeWorker {
            stream: UnixStream::connect_addr(&addr).unwrap(),
            decoder: Decoder::new(1 << 20),
        };
        worker.send(&[&header(Kind::Register), b"0"]);
        Rig {
            _ctx: ctx,
            ix,
            worker,
            core,
            worker_addr: addr,
        }
    }

    fn recv_kind(sock: &zmq::Socket, kind: Kind) -> Vec<Vec<u8>> {
        loop {
            assert!(
                sock.poll(zmq::POLLIN, 5000).unwrap() > 0,
                "timed out waiting for {kind:?}"
            );
            let frames = sock.recv_multipart(0).unwrap();
            let at = frames
                .iter()
                .position(|f| f.len() == 4 && f[..2] == *b"HX")
                .unwrap();
            if decode_header(&frames[at]) == Ok(kind) {
                return frames[at..].to_vec();
            }
        }
    }

    fn send_tasks(r: &Rig, ids: &[u64]) {
        let meta = encode_meta(&ids.iter().map(|i| (*i, 0)).collect::<Vec<_>>());
        let mut frames = vec![b"pool-1".to_vec(), header(Kind::Tasks).to_vec(), meta];
        frames.extend(ids.iter().map(|i| i.to_le_bytes().to_vec()));
        r.ix.send_multipart(frames, 0).unwrap();
    }

    #[test]
    fn registers_routes_tasks_and_forwards_results() {
        let mut r = rig(2, Duration::from_secs(30));
        let reg = recv_kind(&r.ix, Kind::Register);
        assert_eq!(reg[1], b"{}");
        send_tasks(&r, &[1, 2, 3]);
        // The worker may hold 2 at once: it gets 2, the third waits.
        let batch = r.worker.recv();
        assert_eq!(decode_header(&batch[0]), Ok(Kind::Tasks));
        let meta = decode_meta(&batch[1], batch.len() - 2).unwrap();
        assert_eq!(meta.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(batch[2], 1u64.to_le_bytes());
        let results = encode_meta(&[(1, STATUS_RESULT), (2, STATUS_EXCEPTION)]);
        r.worker
            .send(&[&header(Kind::Results), &results, b"r1", b"r2"]);
        let fwd = recv_kind(&r.ix, Kind::Results);
        assert_eq!(fwd[1], results);
        assert_eq!(&fwd[2..], &[b"r1".to_vec(), b"r2".to_vec()]);
        let batch = r.worker.recv();
        assert_eq!(decode_meta(&batch[1], 1).unwrap(), vec![(3, 0)]);
        // The worker dies holding task 3: the core hands it back for WorkerLost.
        let (tx, rx) = std::sync::mpsc::channel();
        r.core.command(Command::WorkerDied(b"0".to_vec(), tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), vec![3]);
        r.core.command(Command::Results(
            vec![(3, STATUS_EXCEPTION)],
            vec![b"lost".to_vec()],
        ));
        let fwd = recv_kind(&r.ix, Kind::Results);
        assert_eq!(fwd[2], b"lost");
        assert_eq!(r.core.wait_stopped(Duration::from_millis(10)), None);
    }

    #[test]
    fn results_sent_just_before_death_are_forwarded_and_junk_is_ignored() {
        use std::io::Write;
        let r = rig(1, Duration::from_secs(30));
        let Rig {
            ix,
            mut worker,
            core,
            worker_addr,
            ..
        } = r;
        recv_kind(&ix, Kind::Register);
        // A peer that sends garbage (an absurd frame count) is cut off; the rest goes on.
        let mut junk = UnixStream::connect_addr(&worker_addr).unwrap();
        junk.write_all(&u32::MAX.to_le_bytes()).unwrap();
        let meta = encode_meta(&[(7, 0)]);
        ix.send_multipart([&b"pool-1"[..], &header(Kind::Tasks), &meta, b"t7"], 0)
            .unwrap();
        assert_eq!(worker.recv()[2], b"t7");
        let results = encode_meta(&[(7, STATUS_RESULT)]);
        worker.send(&[&header(Kind::Results), &results, b"done"]);
        drop(worker); // the worker exits right after sending
        let (tx, rx) = std::sync::mpsc::channel();
        core.command(Command::WorkerDied(b"0".to_vec(), tx));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(recv_kind(&ix, Kind::Results)[2], b"done");
        assert_eq!(core.wait_stopped(Duration::from_millis(10)), None);
    }

    #[test]
    fn heartbeats_then_stops_on_shutdown() {
        let r = rig(1, Duration::from_secs(30));
        recv_kind(&r.ix, Kind::Register);
        recv_kind(&r.ix, Kind::Heartbeat);
        r.ix.send_multipart([&b"pool-1"[..], &header(Kind::Shutdown)[..]], 0)
            .unwrap();
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Shutdown)
        );
    }

    #[test]
    fn stops_at_once_when_the_connection_breaks() {
        let r = rig(1, Duration::from_secs(30));
        recv_kind(&r.ix, Kind::Register);
        drop(r.ix); // the interchange side goes away: the TCP connection is reset
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Disconnected)
        );
    }

    #[test]
    fn stops_when_the_interchange_is_silent_or_refuses() {
        let r = rig(1, Duration::from_millis(300));
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Silent)
        );
        let r = rig(1, Duration::from_secs(30));
        recv_kind(&r.ix, Kind::Register); // connected: the ROUTER can address it now
        r.ix.send_multipart(
            [&b"pool-1"[..], &header(Kind::Refused)[..], b"other version"],
            0,
        )
        .unwrap();
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Refused("other version".into()))
        );
    }
}
