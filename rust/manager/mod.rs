//! The worker pool's data path: a thread that owns the DEALER to the interchange and
//! the Unix stream socket its worker processes connect to (one stream per worker,
//! framed by `crate::stream`: no ZMQ I/O threads between pool and worker). It registers
//! the pool, heartbeats, and owns every task the pool holds (`tasks`): one queue; a task
//! goes to an idle worker first, and a few to run next (a look-ahead, several tasks in
//! one message) only to quick workers while no worker is idle, taken back when one is,
//! so a free worker never waits behind a busy one.
//! Results go to the interchange as their tasks end (results that finished together
//! share a message). When the Python supervisor reports a worker's death (pid, exit
//! code), the core fails that worker's running task with `STATUS_WORKER_LOST` itself.
//! Python keeps only process supervision (start, pin, restart workers) and is told why
//! the core stopped: shutdown, refusal, or interchange silence.

mod tasks;

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::logging::{self, FirstSeen, Sink};
use crate::protocol::{
    decode_header, decode_meta, encode_meta, header, message_limit, Kind, META_ENTRY,
    STATUS_MONITORING, STATUS_WORKER_LOST,
};
use crate::resources::{self, FLAG_RESOURCES};
use crate::socket_thread::{self, SocketThread};
use crate::stream::{self, Decoder, Outbox};
use crate::transport::{recv_frames, send_frames, Mailbox};
use tasks::{Task, Tasks};

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
    /// Largest payload a worker may send (one result), in bytes; its framing comes on top.
    pub max_message_bytes: usize,
    pub registration: Vec<u8>,
    pub heartbeat_period: Duration,
    pub heartbeat_threshold: Duration,
    /// This node's name, for the WorkerLost of a task whose worker died.
    pub hostname: String,
    pub curve: Option<ClientKeys>,
    /// What the pool grants tasks that ask for resources: CPU slots, memory (MB),
    /// accelerators (see `crate::resources`).
    pub slots: Vec<crate::resources::Slot>,
    pub memory: u64,
    pub accelerators: Vec<String>,
    /// Where the core's log records go (the pool drains a queue sink into Python's
    /// `logging`); `None`: nowhere.
    pub log: Option<Arc<Sink>>,
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
    /// The worker process `pid` ended with `exit_code` (negative: killed by that signal).
    /// The core forwards what it sent before dying, fails its running task as WorkerLost
    /// and forgets it.
    WorkerDied {
        pid: u32,
        exit_code: i32,
    },
    Stop,
}

/// What the core has done, counted as it goes (read with [`Handle::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tasks received from the interchange.
    pub received: u64,
    /// Tasks handed to a worker.
    pub started: u64,
    /// Results forwarded to the interchange (monitoring messages not included).
    pub results: u64,
    /// Tasks failed as WorkerLost because their worker died running them.
    pub lost: u64,
    /// Worker deaths reported by the supervisor.
    pub deaths: u64,
    /// Tasks returned unstarted (taken back for an idle worker, or held by a dead one).
    pub requeued: u64,
    /// Tasks queued now, held by workers now (running or look-ahead).
    pub queued: u64,
    pub held: u64,
    /// Registered workers now (until their death is reported).
    pub workers: u64,
    /// Malformed or unexpected messages dropped (from the interchange or a worker stream).
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    started: AtomicU64,
    results: AtomicU64,
    lost: AtomicU64,
    deaths: AtomicU64,
    requeued: AtomicU64,
    queued: AtomicU64,
    held: AtomicU64,
    workers: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            received: get(&self.received),
            started: get(&self.started),
            results: get(&self.results),
            lost: get(&self.lost),
            deaths: get(&self.deaths),
            requeued: get(&self.requeued),
            queued: get(&self.queued),
            held: get(&self.held),
            workers: get(&self.workers),
            dropped: get(&self.dropped),
        }
    }
}

struct Shared {
    inbox: Arc<Mailbox<Command>>,
    stopped: Mutex<Option<Stopped>>,
    stopped_cv: Condvar,
    counters: Counters,
}

pub struct Handle {
    shared: Arc<Shared>,
    thread: SocketThread<Command>,
}

impl Handle {
    /// Connect to the interchange, bind the worker socket, register, start the thread.
    pub fn start(mut config: Config) -> Result<Handle, String> {
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

        let log = config.log.take();
        let inbox = Arc::new(Mailbox::new().map_err(|e| e.to_string())?);
        let shared = Arc::new(Shared {
            inbox: inbox.clone(),
            stopped: Mutex::new(None),
            stopped_cv: Condvar::new(),
            counters: Counters::default(),
        });
        // The allocator owns the pool's resources; the config keeps none of them.
        let alloc = crate::resources::Allocator::new(
            std::mem::take(&mut config.slots),
            config.memory,
            std::mem::take(&mut config.accelerators),
        );
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
            tasks: Tasks::new(alloc),
            results: ResultBatch::default(),
            warned_peers: FirstSeen::default(),
            stop: None,
        };
        let on_exit = shared.clone();
        let thread = SocketThread::spawn(
            "htex-rs-pool-core",
            inbox,
            || Command::Stop,
            move || {
                logging::attach(log);
                core.run();
            },
            // A thread that ended without saying why panicked: tell the supervisor.
            move || {
                let mut s = on_exit.stopped.lock().unwrap();
                if s.is_none() {
                    *s = Some(Stopped::Crashed);
                }
                on_exit.stopped_cv.notify_all();
            },
        )?;
        Ok(Handle { shared, thread })
    }

    pub fn command(&self, c: Command) {
        self.thread.push([c]);
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

    #[must_use]
    pub fn counts(&self) -> Counts {
        self.shared.counters.snapshot()
    }

    /// Stop the thread and wait for it (idempotent, callable from any thread).
    pub fn stop(&self) {
        self.thread.stop();
    }
}

fn bind_workers(url: &str) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind_addr(&stream::unix_addr(url)?)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// One worker's stream.
struct Conn {
    stream: UnixStream,
    decoder: Decoder,
    out: Outbox,
    /// The connecting process (SO_PEERCRED): how a reported death finds its stream.
    pid: u32,
    /// The worker's rank, set by its registration. Streams that never register (a
    /// process's monitoring channel) only send monitoring messages.
    rank: Option<Vec<u8>>,
    /// False once the stream ended or broke; the entry stays until the worker's death is
    /// reported, so the task it was running can be failed.
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

/// Results waiting to go to the interchange: those that arrived in one pass of the loop
/// (all already finished) leave together at its end.
#[derive(Default)]
struct ResultBatch {
    meta: Vec<(u64, u8)>,
    payloads: Vec<Vec<u8>>,
    bytes: usize,
}

impl ResultBatch {
    /// Past these, a batch is sent before more is added.
    const MAX_RESULTS: usize = 1024;
    const MAX_BYTES: usize = 16 << 20;

    fn full(&self) -> bool {
        self.payloads.len() >= Self::MAX_RESULTS || self.bytes >= Self::MAX_BYTES
    }

    fn push(&mut self, task_id: u64, status: u8, payload: Vec<u8>) {
        self.meta.push((task_id, status));
        self.bytes += payload.len();
        self.payloads.push(payload);
    }

    fn send(&mut self, ix: &zmq::Socket) {
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
    /// Every task the pool holds: queued, or held by a worker (keyed by stream token).
    tasks: Tasks<zmq::Message>,
    results: ResultBatch,
    /// Peers (`None`: the interchange; else a worker stream's token) whose dropped
    /// messages were logged once; later drops are only counted.
    warned_peers: FirstSeen<Option<u64>>,
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
            let mut next = (last_beat + hb).min(last_contact + threshold);
            if self.tasks.has_lookahead() {
                next = next.min(now + tasks::STALE / 2); // to take a stale one back
            }
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
                if let Err(e) = socket_thread::poll(&mut items, timeout) {
                    log::error!("the pool core cannot poll its sockets: {e}; stopping");
                    self.stop = Some(Stopped::Crashed);
                    break;
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
            // Counts first: whoever sees these results then sees counts that include them.
            self.publish_counts();
            self.results.send(&self.ix);
        }
        log::info!(
            "pool core stopped: {:?}; counts {:?}",
            self.stop,
            self.shared.counters.snapshot()
        );
        let mut s = self.shared.stopped.lock().unwrap();
        *s = self.stop.take();
        self.shared.stopped_cv.notify_all();
    }

    fn take_inbox(&mut self) {
        for c in self.shared.inbox.take() {
            match c {
                Command::WorkerDied { pid, exit_code } => self.worker_died(pid, exit_code),
                Command::Stop => self.stop = Some(Stopped::Requested),
            }
        }
    }

    /// The supervisor saw process `pid` end. Its stream (and a monitoring stream it may
    /// have opened) is read to the end first: results it sent just before dying are
    /// forwarded, so only a task that really did not finish is lost.
    fn worker_died(&mut self, pid: u32, exit_code: i32) {
        self.shared.counters.deaths.fetch_add(1, Ordering::Relaxed);
        log::info!("worker pid {pid} ended (exit code {exit_code})");
        // A worker that connected and died at once may still sit in the listen backlog.
        self.accept();
        let mut tokens: Vec<(bool, u64)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pid == pid)
            .map(|(t, c)| (c.rank.is_some(), *t))
            .collect();
        tokens.sort_unstable();
        // One process has one worker stream; should a new worker ever get a pid whose
        // death is still being handled, the older registered stream is the dead one.
        if let Some(first) = tokens.iter().position(|(registered, _)| *registered) {
            tokens.truncate(first + 1);
        }
        for (_, token) in tokens {
            self.read(token);
            let Some(conn) = self.conns.remove(&token) else {
                continue;
            };
            let Some(task_id) = self.tasks.remove_worker(token) else {
                continue;
            };
            self.shared.counters.lost.fetch_add(1, Ordering::Relaxed);
            let rank = conn.rank.unwrap_or_default();
            let lost = serde_json::json!({
                "worker_id": String::from_utf8_lossy(&rank),
                "hostname": self.config.hostname,
                "pid": pid,
                "exit_code": exit_code,
            });
            if self.results.full() {
                self.results.send(&self.ix);
            }
            self.results
                .push(task_id, STATUS_WORKER_LOST, lost.to_string().into_bytes());
        }
    }

    fn publish_counts(&self) {
        let c = &self.shared.counters;
        c.queued
            .store(self.tasks.queued() as u64, Ordering::Relaxed);
        c.held.store(self.tasks.held() as u64, Ordering::Relaxed);
        c.requeued.store(self.tasks.requeued(), Ordering::Relaxed);
        c.workers
            .store(self.tasks.workers() as u64, Ordering::Relaxed);
    }

    fn on_interchange(&mut self, mut frames: Vec<zmq::Message>) {
        match decode_header(&frames[0]) {
            Ok(Kind::Tasks) if frames.len() >= 2 => {
                let payloads = frames.split_off(2);
                let meta = match decode_meta(&frames[1], payloads.len()) {
                    Ok(m) => m,
                    Err(e) => return self.drop_junk(None, &e.to_string()),
                };
                self.shared
                    .counters
                    .received
                    .fetch_add(payloads.len() as u64, Ordering::Relaxed);
                for ((id, flags), payload) in meta.into_iter().zip(payloads) {
                    let request = (flags & FLAG_RESOURCES != 0)
                        .then(|| resources::request_of(&payload))
                        .flatten();
                    log::debug!("Received task {id} from the interchange");
                    self.tasks.push(Task::new(id, flags, payload, request));
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

    /// Count a message dropped from `peer` (`None`: the interchange, else a worker
    /// stream) and log the first from each peer, as the interchange does.
    fn drop_junk(&mut self, peer: Option<u64>, why: &str) {
        self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
        if self.warned_peers.first(peer) {
            let from = match peer.and_then(|t| self.conns.get(&t)) {
                None if peer.is_none() => "the interchange".to_string(),
                None => "a closed worker stream".to_string(),
                Some(c) => format!(
                    "worker {} (pid {})",
                    c.rank
                        .as_deref()
                        .map_or_else(|| "?".into(), String::from_utf8_lossy),
                    c.pid
                ),
            };
            log::warn!(
                "dropping a message from {from}: {why} (further drops from it are counted, not logged)"
            );
        }
    }

    fn accept(&mut self) {
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

    fn flush(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if c.out.flush(&mut c.stream).is_err() {
                c.close();
                self.tasks.retire(token);
            }
        }
    }

    fn on_worker(&mut self, token: u64, frames: Vec<Vec<u8>>) {
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
                        self.tasks.finished(token, task_id, Instant::now());
                        self.shared.counters.results.fetch_add(1, Ordering::Relaxed);
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

    /// Give out queued tasks (idle workers first, then look-aheads) and take back
    /// look-aheads when a worker is idle with nothing queued.
    fn dispatch(&mut self) {
        let head = header(Kind::Tasks);
        let mut touched = Vec::new();
        let conns = &mut self.conns;
        let started = &self.shared.counters.started;
        let now = Instant::now();
        self.tasks.assign(now, |token, given| {
            let given: Vec<&Task<zmq::Message>> = given.collect();
            started.fetch_add(given.len() as u64, Ordering::Relaxed);
            let meta = encode_meta(&given.iter().map(|t| (t.id, t.flags)).collect::<Vec<_>>());
            // A task with a grant goes with the grant in place of its request.
            let granted: Vec<Option<Vec<u8>>> = given
                .iter()
                .map(|t| {
                    let g = t.grant.as_ref()?;
                    let (_, rest) = resources::split(&t.payload)?;
                    Some(resources::join(&g.head(), rest))
                })
                .collect();
            let mut frames: Vec<&[u8]> = vec![&head, &meta];
            frames.extend(
                given
                    .iter()
                    .zip(&granted)
                    .map(|(t, g)| g.as_deref().unwrap_or(&t.payload[..])),
            );
            if let Some(c) = conns.get_mut(&token) {
                match stream::encode(&frames) {
                    Ok(bytes) => c.out.push(bytes),
                    // Unreachable under max_message_bytes (< 4 GiB); should it happen, the
                    // worker is ended, so its tasks fail as WorkerLost instead of hanging.
                    Err(e) => {
                        log::error!("cannot send tasks to pid {}: {e}; ending its stream", c.pid);
                        c.close();
                    }
                }
                touched.push(token);
            }
        });
        let reclaim = header(Kind::Reclaim);
        for token in self.tasks.reclaims(now) {
            if let Some(c) = self.conns.get_mut(&token) {
                c.out
                    .push(stream::encode(&[&reclaim[..]]).expect("one 4-byte frame"));
                touched.push(token);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for token in touched {
            self.flush(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_meta, STATUS_EXCEPTION, STATUS_RESULT};

    /// A fake interchange (ROUTER) and a core with one fake worker (a Unix stream),
    /// real sockets.
    struct Rig {
        _ctx: zmq::Context,
        ix: zmq::Socket,
        worker: FakeWorker,
        core: Handle,
        worker_addr: std::os::unix::net::SocketAddr,
        log: Arc<crate::logging::Sink>,
    }

    struct FakeWorker {
        stream: UnixStream,
        decoder: Decoder,
        /// Tasks received and not yet taken by `next_task`, in order.
        pending: std::collections::VecDeque<(u64, Vec<u8>)>,
    }

    impl FakeWorker {
        fn send(&mut self, frames: &[&[u8]]) {
            use std::io::Write;
            self.stream
                .write_all(&stream::encode(frames).unwrap())
                .unwrap();
        }

        fn recv(&mut self) -> Vec<Vec<u8>> {
            stream::recv_message(&self.stream, &mut self.decoder)
        }
    }

    fn connect(addr: &std::os::unix::net::SocketAddr, rank: &[u8]) -> FakeWorker {
        let mut w = FakeWorker {
            stream: UnixStream::connect_addr(addr).unwrap(),
            decoder: Decoder::new(1 << 20),
            pending: std::collections::VecDeque::default(),
        };
        w.send(&[&header(Kind::Register), rank]);
        w
    }

    impl FakeWorker {
        /// The next task given to this worker, in order (a message may carry several):
        /// its id and payload.
        fn next_task(&mut self) -> (u64, Vec<u8>) {
            while self.pending.is_empty() {
                let m = self.recv();
                assert_eq!(decode_header(&m[0]), Ok(Kind::Tasks));
                self.take_tasks(m);
            }
            self.pending.pop_front().unwrap()
        }

        fn take_tasks(&mut self, m: Vec<Vec<u8>>) {
            let meta = decode_meta(&m[1], m.len() - 2).unwrap();
            assert!(!meta.is_empty(), "a task message carries tasks");
            let ids = meta.into_iter().map(|(id, _)| id);
            self.pending.extend(ids.zip(m.into_iter().skip(2)));
        }

        /// Tasks are taken in until a RECLAIM arrives; the ids of those not yet started.
        fn until_reclaim(&mut self) -> Vec<u64> {
            loop {
                let m = self.recv();
                match decode_header(&m[0]) {
                    Ok(Kind::Reclaim) => return self.pending.drain(..).map(|t| t.0).collect(),
                    Ok(Kind::Tasks) => self.take_tasks(m),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }

        fn finish(&mut self, id: u64, payload: &[u8]) {
            let meta = encode_meta(&[(id, STATUS_RESULT)]);
            self.send(&[&header(Kind::Results), &meta, payload]);
        }

        /// Nothing arrives within `ms`.
        fn assert_quiet(&mut self, ms: u64) {
            use std::io::Read;
            self.stream
                .set_read_timeout(Some(Duration::from_millis(ms)))
                .unwrap();
            let mut buf = [0u8; 64];
            match self.stream.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("expected nothing, got {other:?}"),
            }
        }
    }

    /// Results forwarded to the interchange, in order, until `n` have arrived.
    fn results(ix: &zmq::Socket, n: usize) -> Vec<(u64, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while out.len() < n {
            let f = recv_kind(ix, Kind::Results);
            let meta = decode_meta(&f[1], f.len() - 2).unwrap();
            out.extend(
                meta.into_iter()
                    .zip(&f[2..])
                    .map(|((t, s), p)| (t, s, p.clone())),
            );
        }
        out
    }

    fn rig(threshold: Duration) -> Rig {
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
        let log = crate::logging::Sink::queue(false);
        let core = Handle::start(Config {
            interchange_url: url,
            identity: b"pool-1".to_vec(),
            worker_url: format!("@{name}"),
            max_message_bytes: 1 << 20,
            registration: b"{}".to_vec(),
            heartbeat_period: Duration::from_millis(50),
            heartbeat_threshold: threshold,
            hostname: "node-a".into(),
            curve: None,
            slots: Vec::new(),
            memory: 0,
            accelerators: Vec::new(),
            log: Some(log.clone()),
        })
        .unwrap();
        let addr = {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()
        };
        let worker = connect(&addr, b"0");
        Rig {
            _ctx: ctx,
            ix,
            worker,
            core,
            worker_addr: addr,
            log,
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
        send_tasks_to(&r.ix, ids);
    }

    fn send_tasks_to(ix: &zmq::Socket, ids: &[u64]) {
        let meta = encode_meta(&ids.iter().map(|i| (*i, 0)).collect::<Vec<_>>());
        let mut frames = vec![b"pool-1".to_vec(), header(Kind::Tasks).to_vec(), meta];
        frames.extend(ids.iter().map(|i| i.to_le_bytes().to_vec()));
        ix.send_multipart(frames, 0).unwrap();
    }

    /// Wait until the core's counts satisfy `done` (the core publishes them as it goes).
    fn wait_counts(core: &Handle, what: &str, done: impl Fn(&Counts) -> bool) -> Counts {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = core.counts();
            if done(&c) {
                return c;
            }
            assert!(Instant::now() < deadline, "{c:?}: never {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_workers(core: &Handle, n: u64) {
        wait_counts(core, &format!("{n} workers"), |c| c.workers == n);
    }

    fn died(core: &Handle) {
        core.command(Command::WorkerDied {
            pid: std::process::id(),
            exit_code: -9,
        });
    }

    #[test]
    fn registers_routes_tasks_and_forwards_results() {
        let mut r = rig(Duration::from_secs(30));
        let reg = recv_kind(&r.ix, Kind::Register);
        assert_eq!(reg[1], b"{}");
        send_tasks(&r, &[1, 2, 3]);
        // A fresh worker gets one task: no look-ahead until its tasks prove quick.
        assert_eq!(r.worker.next_task(), (1, 1u64.to_le_bytes().to_vec()));
        r.worker.assert_quiet(100);
        let meta = encode_meta(&[(1, STATUS_EXCEPTION)]);
        r.worker.send(&[&header(Kind::Results), &meta, b"r1"]);
        assert_eq!(
            results(&r.ix, 1),
            vec![(1, STATUS_EXCEPTION, b"r1".to_vec())]
        );
        assert_eq!(r.worker.next_task().0, 2);
        r.worker.finish(2, b"r2");
        assert_eq!(r.worker.next_task().0, 3);
        r.worker.finish(3, b"r3");
        assert_eq!(results(&r.ix, 2).len(), 2);
        let c = r.core.counts();
        assert_eq!((c.received, c.started, c.results, c.lost), (3, 3, 3, 0));
        assert_eq!(r.core.wait_stopped(Duration::from_millis(10)), None);
    }

    #[test]
    fn a_look_ahead_behind_a_long_task_is_taken_back_for_the_idle_worker() {
        let mut r = rig(Duration::from_secs(30));
        recv_kind(&r.ix, Kind::Register);
        let mut second = connect(&r.worker_addr, b"1");
        wait_workers(&r.core, 2); // both registered before the tasks arrive
                                  // One quick task each first, so both may get a look-ahead.
        send_tasks(&r, &[100, 101]);
        let w = r.worker.next_task().0;
        r.worker.finish(w, b"ok");
        let w = second.next_task().0;
        second.finish(w, b"ok");
        assert_eq!(results(&r.ix, 2).len(), 2);
        send_tasks(&r, &[1, 2, 3, 4, 5]);
        // Each gets a task, then the rest is shared as look-ahead: tasks 3 and 4 for the
        // first worker, which never finishes its task, 5 for the second.
        let a1 = r.worker.next_task().0;
        let mut done = vec![];
        while done.len() < 2 {
            let (id, _) = second.next_task();
            second.finish(id, b"ok");
            done.push(id);
        }
        // The second worker is idle with nothing queued: the core asks for the look-ahead.
        let back = r.worker.until_reclaim();
        assert_eq!(back.len(), 2, "the first worker's look-ahead");
        let meta: Vec<(u64, u8)> = back.iter().map(|id| (*id, 0)).collect();
        r.worker
            .send(&[&header(Kind::Returned), &encode_meta(&meta)]);
        for want in back {
            let (id, _) = second.next_task();
            assert_eq!(
                id, want,
                "the returned tasks run on the idle worker, in order"
            );
            second.finish(id, b"ok");
            done.push(id);
        }
        done.push(a1);
        done.sort_unstable();
        assert_eq!(done, vec![1, 2, 3, 4, 5]);
        assert_eq!(results(&r.ix, 4).len(), 4);
        assert_eq!(r.core.counts().requeued, 2);
        r.worker.assert_quiet(100);
    }

    #[test]
    fn a_dead_worker_loses_only_its_running_task_and_the_queue_goes_on() {
        let r = rig(Duration::from_secs(30));
        let Rig {
            ix,
            mut worker,
            core,
            worker_addr,
            ..
        } = r;
        recv_kind(&ix, Kind::Register);
        send_tasks_to(&ix, &[1, 2, 3, 4]);
        assert_eq!(worker.next_task().0, 1);
        drop(worker); // killed while running task 1

        // Its replacement registers under the same rank before the death is reported:
        // a new worker, not the dead one (the reuse race of issue #6).
        let mut next = connect(&worker_addr, b"0");
        wait_workers(&core, 2);
        died(&core);
        let lost = results(&ix, 1);
        assert_eq!((lost[0].0, lost[0].1), (1, STATUS_WORKER_LOST));
        let doc: serde_json::Value = serde_json::from_slice(&lost[0].2).unwrap();
        assert_eq!(doc["worker_id"], "0");
        assert_eq!(doc["hostname"], "node-a");
        assert_eq!(doc["exit_code"], -9);
        for want in 2..=4 {
            let (id, _) = next.next_task();
            assert_eq!(id, want, "queued tasks keep their order");
            next.finish(id, b"ok");
        }
        let rest = results(&ix, 3);
        assert!(rest.iter().all(|(_, s, _)| *s == STATUS_RESULT));
        let c = core.counts();
        assert_eq!(
            (c.lost, c.deaths, c.requeued, c.queued, c.held),
            (1, 1, 0, 0, 0)
        );
    }

    #[test]
    fn results_sent_just_before_death_are_forwarded_and_junk_is_ignored() {
        use std::io::Write;
        let r = rig(Duration::from_secs(30));
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
        send_tasks_to(&ix, &[7]);
        assert_eq!(worker.next_task().0, 7);
        worker.finish(7, b"done");
        drop(worker); // the worker exits right after sending
        died(&core);
        let got = results(&ix, 1);
        assert_eq!(got, vec![(7, STATUS_RESULT, b"done".to_vec())]);
        // The result may have left before the death was handled: wait for the death.
        let c = wait_counts(&core, "the death handled", |c| c.deaths == 1);
        assert_eq!((c.lost, c.deaths, c.results), (0, 1, 1));
        assert_eq!(core.wait_stopped(Duration::from_millis(10)), None);
    }

    #[test]
    fn junk_is_dropped_counted_and_logged_once_per_peer() {
        let Rig {
            ix,
            mut worker,
            core,
            log,
            ..
        } = rig(Duration::from_secs(30));
        recv_kind(&ix, Kind::Register);
        for _ in 0..3 {
            ix.send_multipart([&b"pool-1"[..], b"not a header"], 0)
                .unwrap();
        }
        worker.send(&[b"junk"]);
        worker.send(&[&header(Kind::Results)[..], b"\x01"]); // a truncated meta frame
        let c = wait_counts(&core, "the junk counted", |c| c.dropped == 5);
        assert_eq!(c.dropped, 5);
        send_tasks_to(&ix, &[9]);
        assert_eq!(worker.next_task().0, 9, "the pool goes on");
        let (records, _) = log.take();
        let text: Vec<&str> = records.iter().map(|r| r.message.as_str()).collect();
        let count = |what: &str| text.iter().filter(|m| m.contains(what)).count();
        assert_eq!(
            count("dropping a message from the interchange"),
            1,
            "{text:?}"
        );
        assert_eq!(count("dropping a message from worker 0"), 1, "{text:?}");
        assert!(
            records.iter().all(|r| r.target == "htex_rs.manager"),
            "{records:?}"
        );
        core.stop();
    }

    #[test]
    fn heartbeats_then_stops_on_shutdown() {
        let r = rig(Duration::from_secs(30));
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
        let r = rig(Duration::from_secs(30));
        recv_kind(&r.ix, Kind::Register);
        drop(r.ix); // the interchange side goes away: the TCP connection is reset
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Disconnected)
        );
    }

    #[test]
    fn stops_when_the_interchange_is_silent_or_refuses() {
        let r = rig(Duration::from_millis(300));
        assert_eq!(
            r.core.wait_stopped(Duration::from_secs(5)),
            Some(Stopped::Silent)
        );
        let r = rig(Duration::from_secs(30));
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
