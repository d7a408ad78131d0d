//! The interchange: a thread that owns the worker port pools connect to (a ZMTP ROUTER of
//! our own, `crate::zmtp::router`, served from this thread's epoll),
//! queues tasks by priority, offers them to managers with free capacity in batches,
//! forwards results, and declares silent managers lost. It never touches Python:
//! the submit side hands it tasks through [`Handle::submit`] and collects
//! [`Event`]s with [`Handle::wait_events`].

pub mod candidates;
pub mod managers;
pub mod queue;
pub mod table;
pub mod taskset;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::logging::{self, FirstSeen, Sink};
use crate::protocol::{
    decode_header, decode_meta, encode_meta, header, message_limit, DecodeError, Kind,
    Registration, PROTOCOL_VERSION, STATUS_UNPLACEABLE,
};
use crate::resources::{self, FLAG_RESOURCES};
use crate::socket_thread::SocketThread;
use crate::transport::Mailbox;
use crate::zmtp::{curve, router};
pub use managers::{ManagerInfo, Selector};
use managers::{Managers, Placement};
use queue::{PendingTask, TaskQueue};

pub const HTEX_RS_VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct Config {
    /// IP literal to bind, or `*` for every interface.
    pub bind_address: String,
    pub worker_port: Option<u16>,
    pub port_range: (u16, u16),
    pub heartbeat_threshold: Duration,
    pub poll_period: Duration,
    pub selector: Selector,
    /// The CURVE server (its secret key and the clients it admits); `None`: unencrypted.
    pub curve: Option<curve::Server>,
    /// What peers still in their handshake may take (CURVE: caps and work per turn).
    pub handshakes: router::HandshakeLimits,
    pub log_path: Option<PathBuf>,
    pub debug: bool,
    /// `major.minor` of the submit side's Python; pools must match unless `check_python` is off.
    pub python_version: String,
    pub check_python: bool,
    /// Largest payload (task or result) in bytes; a peer sending a frame larger than
    /// this plus its framing is disconnected before the frame is buffered.
    /// `None`: unlimited.
    pub max_message_bytes: Option<usize>,
    /// Emit `Event::Node` for Parsl's monitoring `node` table.
    pub node_events: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind_address: "127.0.0.1".into(),
            worker_port: None,
            port_range: (54000, 55000),
            heartbeat_threshold: Duration::from_secs(120),
            poll_period: Duration::from_millis(10),
            selector: Selector::Random,
            curve: None,
            handshakes: router::HandshakeLimits::default(),
            log_path: None,
            debug: false,
            python_version: String::new(),
            check_python: false,
            max_message_bytes: None,
            node_events: false,
        }
    }
}

pub struct NewTask {
    pub task_id: u64,
    pub priority: f64,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// Queries and controls, answered by the interchange thread.
pub enum Command {
    Managers(Sender<Vec<ManagerInfo>>),
    ConnectedBlocks(Sender<Vec<String>>),
    Packages(Sender<Vec<(String, String)>>),
    Hold(String, Sender<bool>),
    Stop,
}

/// What the interchange reports to the submit side.
pub enum Event {
    Result {
        task_id: u64,
        status: u8,
        payload: zmq::Message,
    },
    ManagerLost {
        uid: String,
        hostname: String,
        tasks: Vec<u64>,
    },
    /// A pool the executor cannot work with (version mismatch): fail everything.
    Fatal(String),
    /// A manager's record for monitoring (only with `Config::node_events`): it
    /// registered, was held, went away, or its task set changed (see `NodeInfo`).
    Node(managers::NodeInfo),
}

#[derive(Default)]
pub struct Stats {
    pub dropped: AtomicU64,
    pub tasks_received: AtomicU64,
    pub results_forwarded: AtomicU64,
}

/// What the submit side hands the interchange thread.
enum Input {
    Task(NewTask),
    Command(Command),
}

struct Shared {
    inbox: Arc<Mailbox<Input>>,
    events: Mutex<VecDeque<Event>>,
    events_cv: Condvar,
    alive: AtomicBool,
    stats: Stats,
}

impl Shared {
    fn emit(&self, events: impl IntoIterator<Item = Event>) {
        let mut q = self.events.lock().unwrap();
        let before = q.len();
        q.extend(events);
        if q.len() != before {
            self.events_cv.notify_all();
        }
    }
}

/// The submit side's handle on a running interchange thread.
pub struct Handle {
    pub port: u16,
    shared: Arc<Shared>,
    thread: SocketThread<Input>,
}

fn bind_worker_port(config: &Config) -> Result<std::net::TcpListener, String> {
    let addr = &config.bind_address;
    if let Some(port) = config.worker_port {
        return router::bind(addr, port, LISTEN_BACKLOG)
            .map_err(|e| format!("cannot bind worker port {addr}:{port}: {e}"));
    }
    let (lo, hi) = config.port_range;
    if lo >= hi {
        return Err(format!("worker_port_range ({lo}, {hi}) is empty"));
    }
    let mut last = String::new();
    for _ in 0..100 {
        let port = fastrand::u16(lo..hi);
        match router::bind(addr, port, LISTEN_BACKLOG) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(format!("cannot bind the worker port on {addr}: {e}"))
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "no free port for the worker port on {addr} in {lo}..{hi} after 100 tries: {last}"
    ))
}

impl Handle {
    /// Bind the worker port and start the interchange thread.
    pub fn start(mut config: Config) -> Result<Handle, String> {
        let batch_wanted = crate::sched::wanted();
        // The router owns the server key from here on (wiped when it drops).
        let curve = config.curve.take();
        let encrypted = curve.is_some();
        let max_frame = config.max_message_bytes.map(message_limit);
        let listener = bind_worker_port(&config)?;
        let options = router::Options {
            curve,
            max_frame,
            handshakes: config.handshakes,
        };
        let mut router = router::Router::new(listener, options)
            .map_err(|e| format!("cannot serve the worker port: {e}"))?;
        let port = router.port;

        let inbox = Arc::new(Mailbox::new().map_err(|e| e.to_string())?);
        // One epoll_wait a turn for the pools and the submit side's wake-ups.
        router
            .watch(inbox.fd())
            .map_err(|e| format!("cannot watch the interchange's inbox: {e}"))?;
        let shared = Arc::new(Shared {
            inbox: inbox.clone(),
            events: Mutex::new(VecDeque::new()),
            events_cv: Condvar::new(),
            alive: AtomicBool::new(true),
            stats: Stats::default(),
        });
        let log = match &config.log_path {
            Some(p) => Some(
                Sink::open(p, config.debug)
                    .map_err(|e| format!("cannot open the interchange log {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let node_events = config.node_events;
        let managers = Managers::new(config.selector, node_events);
        let mut ix = Interchange {
            config,
            router,
            refused_seen: 0,
            shared: shared.clone(),
            queue: TaskQueue::new(),
            typed: TaskQueue::new(),
            typed_new: false,
            managers,
            warned_peers: FirstSeen::default(),
            refused_peers: FirstSeen::default(),
            results: Vec::new(),
            frames: Vec::new(),
            batch: Vec::new(),
            meta: Vec::new(),
            ids: Vec::new(),
            now: Instant::now(),
            stop: false,
        };
        let bound = format!(
            "htex_rs {HTEX_RS_VERSION} interchange (protocol v{PROTOCOL_VERSION}) bound worker port {port} on {}, encrypted={encrypted}",
            ix.config.bind_address,
        );
        let on_exit = shared.clone();
        let thread = SocketThread::spawn(
            "htex-rs-interchange",
            inbox,
            || Input::Command(Command::Stop),
            move || {
                logging::attach(log);
                let batch = crate::sched::batch_this_thread_if(batch_wanted);
                log::info!("{bound}; SCHED_BATCH={batch}");
                ix.run();
            },
            // However the thread ends, panics included, the submit side learns it is
            // dead and fails outstanding tasks instead of waiting forever.
            move || {
                on_exit.alive.store(false, Ordering::Release);
                let _q = on_exit.events.lock();
                on_exit.events_cv.notify_all();
            },
        )?;
        Ok(Handle {
            port,
            shared,
            thread,
        })
    }

    pub fn submit(&self, tasks: impl IntoIterator<Item = NewTask>) {
        self.thread.push(tasks.into_iter().map(Input::Task));
    }

    pub fn command(&self, command: Command) {
        self.thread.push([Input::Command(command)]);
    }

    #[must_use]
    pub fn alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Wait up to `timeout` for events; return at most `max` of them (possibly none).
    pub fn wait_events(&self, timeout: Duration, max: usize) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.events.lock().unwrap();
        while q.is_empty() && self.alive() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .shared
                .events_cv
                .wait_timeout(q, deadline - now)
                .unwrap()
                .0;
        }
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Ask the interchange thread a question (a [`Command`] carrying the reply channel)
    /// and wait up to [`COMMAND_TIMEOUT`] for the answer.
    pub fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, AskError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.command(make(tx));
        rx.recv_timeout(COMMAND_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Disconnected => AskError::Stopped,
            RecvTimeoutError::Timeout => AskError::Timeout(COMMAND_TIMEOUT),
        })
    }

    /// Stop the thread and wait for it (idempotent, callable from any thread).
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// How long a query to the interchange thread may take: it answers between two passes
/// of its loop, so only a wedged thread takes this long.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a query got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// The interchange thread has ended (stopped, or failed: see interchange.log).
    Stopped,
    /// No answer within this long.
    Timeout(Duration),
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Stopped => write!(f, "the interchange has stopped"),
            AskError::Timeout(d) => write!(f, "the interchange did not answer within {d:?}"),
        }
    }
}

struct Interchange {
    config: Config,
    router: router::Router,
    /// The router's refused CURVE clients already counted in `Stats::dropped`.
    refused_seen: u64,
    shared: Arc<Shared>,
    queue: TaskQueue,
    /// Tasks that ask for resources: matched to pools with room, before `queue`.
    typed: TaskQueue,
    /// A task joined `typed` since its last pass (it may be bigger than every pool).
    typed_new: bool,
    managers: Managers,
    warned_peers: FirstSeen<Vec<u8>>,
    refused_peers: FirstSeen<Vec<u8>>,
    /// Results read this loop turn, handed over together after the turn's reads: one
    /// trip through the events lock and one wake-up of the submit side per turn, not per
    /// message (with thousands of pools a turn reads many one-result-batch messages).
    results: Vec<Event>,
    /// The frames of the message being handled, reused from one message to the next.
    frames: Vec<zmq::Message>,
    /// A dispatch batch, its meta and its task ids, reused from one batch to the next.
    batch: Vec<PendingTask>,
    meta: Vec<(u64, u8)>,
    ids: Vec<u64>,
    /// When this loop turn's wait ended.
    now: Instant,
    stop: bool,
}

/// The worker port's listen backlog: a storm of thousands of pools starting at once
/// overflows a small one, and each refused SYN waits out TCP's 1, 3, 7 s retries (10,000
/// pools took 32 s to register behind libzmq's 100). The kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 65_535;

/// How long a task that asks for resources lets later ones take the room it waits for.
pub const BACKFILL_WINDOW: Duration = Duration::from_millis(200);
/// Most tasks asking for resources looked at per dispatch pass.
const TYPED_SCAN: usize = 1024;

/// Most messages handled per socket per loop turn, so one busy peer cannot starve timers.
const BATCH: usize = 4096;

impl Interchange {
    fn run(&mut self) {
        let mut last_timers = Instant::now();
        let timer_period = Duration::from_millis(100).min(self.config.heartbeat_threshold / 4);
        let poll_ms =
            i32::try_from(self.config.poll_period.as_millis().clamp(1, 1000)).unwrap_or(1000);
        while !self.stop {
            let woken = match self.router.wait(poll_ms) {
                Ok(w) => w,
                Err(e) => {
                    let msg = format!("the interchange cannot poll its sockets: {e}");
                    log::error!("{msg}");
                    self.shared.emit([Event::Fatal(msg)]);
                    break;
                }
            };
            // The turn's clock: what it reads is stamped with this.
            self.now = Instant::now();
            // The flag too: with thousands of pools ready at once, one wait returns 256 of
            // them and the wake fd may come only turns later.
            if woken || self.shared.inbox.pending() {
                self.take_inbox();
            }
            let mut frames = std::mem::take(&mut self.frames);
            for _ in 0..BATCH {
                let Some(peer) = self.router.read_into(&mut frames) else {
                    break;
                };
                self.on_manager_message(peer, &mut frames);
            }
            frames.clear();
            self.frames = frames;
            if !self.results.is_empty() {
                self.shared.emit(self.results.drain(..));
            }
            let refused = self.router.counts.refused;
            if refused > self.refused_seen {
                self.shared
                    .stats
                    .dropped
                    .fetch_add(refused - self.refused_seen, Ordering::Relaxed);
                self.refused_seen = refused;
            }
            if self.now.duration_since(last_timers) >= timer_period {
                last_timers = self.now;
                self.expire();
                self.router.expire_handshakes();
                self.managers.report_changed();
            }
            self.dispatch();
            // One write per connection for everything this turn sent it.
            self.router.flush();
            // Not through emit() unconditionally: that takes the events lock every round.
            let nodes = self.managers.take_node_changes();
            if !nodes.is_empty() {
                self.shared.emit(nodes.into_iter().map(Event::Node));
            }
        }
        // Tell every pool to exit now rather than after heartbeat_threshold of silence.
        for id in self.managers.identities() {
            let _ = self.router.send(&id, [&header(Kind::Shutdown)[..]]);
        }
        self.router.linger(Duration::from_millis(500));
        log::info!("interchange stopped");
    }

    fn take_inbox(&mut self) {
        let mut received = 0;
        for input in self.shared.inbox.take() {
            match input {
                Input::Task(t) => {
                    received += 1;
                    log::debug!("Put task {} onto pending_task_queue", t.task_id);
                    let request =
                        (t.flags & FLAG_RESOURCES != 0).then(|| resources::request_of(&t.payload));
                    if request == Some(None) {
                        self.unplaceable(t.task_id, "its resource request is malformed".into());
                        continue;
                    }
                    let task = PendingTask {
                        task_id: t.task_id,
                        priority: t.priority,
                        flags: t.flags,
                        payload: t.payload,
                        request: request.flatten(),
                        blocked_since: None,
                    };
                    if task.request.is_some() {
                        self.typed_new = true;
                        self.typed.push(task);
                    } else {
                        self.queue.push(task);
                    }
                }
                Input::Command(c) => self.on_command(c),
            }
        }
        self.shared
            .stats
            .tasks_received
            .fetch_add(received, Ordering::Relaxed);
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Managers(tx) => {
                let _ = tx.send(self.managers.infos());
            }
            Command::ConnectedBlocks(tx) => {
                let _ = tx.send(self.managers.block_history.clone());
            }
            Command::Packages(tx) => {
                let _ = tx.send(self.managers.packages());
            }
            Command::Hold(uid, tx) => {
                let found = self.managers.hold(&uid);
                log::info!("Holding manager {uid} (found: {found})");
                let _ = tx.send(found);
            }
            Command::Stop => self.stop = true,
        }
    }

    fn drop_junk(&mut self, identity: &[u8], why: &str) {
        self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        if self.warned_peers.first(identity.to_vec()) {
            log::warn!(
                "dropping message from peer {:?}: {why} (further drops from this peer are counted, not logged)",
                String::from_utf8_lossy(identity)
            );
        }
    }

    /// Send `frames` to the peer `identity` (dropped if it is not connected).
    fn send(&mut self, frames: &[&[u8]]) -> Result<(), router::NotConnected> {
        self.router.send(frames[0], frames[1..].iter().copied())
    }

    fn on_manager_message(&mut self, peer: router::Peer, frames: &mut Vec<zmq::Message>) {
        // Taken out of the frames (they are drained below) rather than copied.
        let identity_frame = std::mem::replace(&mut frames[0], zmq::Message::new());
        let identity: &[u8] = &identity_frame;
        if frames.len() < 2 {
            self.drop_junk(identity, "no payload frame");
            return;
        }
        let kind = match decode_header(&frames[1]) {
            Ok(k) => k,
            Err(DecodeError::Version(v)) => {
                self.refuse_version(identity, v, frames.get(2).map(|m| &m[..]));
                return;
            }
            Err(e) => {
                self.drop_junk(identity, &e.to_string());
                return;
            }
        };
        match kind {
            Kind::Probe => {
                let _ = self.send(&[identity, &header(Kind::ProbeAck)]);
            }
            Kind::Register => self.on_register(identity.to_vec(), frames),
            Kind::Heartbeat => match self.managers.resolve(identity, peer) {
                Some(slot) => {
                    self.managers.touch_at(slot, self.now);
                    let reply = [&header(Kind::HeartbeatReply)[..]];
                    let _ = self.router.send_to(Some(peer), identity, reply);
                }
                None => self.drop_junk(identity, "heartbeat from an unregistered manager"),
            },
            Kind::Results => self.on_results(identity, peer, frames),
            _ => self.drop_junk(identity, "message kind not accepted from a worker pool"),
        }
    }

    fn refuse_version(&mut self, identity: &[u8], theirs: u8, doc: Option<&[u8]>) {
        self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        if !self.refused_peers.first(identity.to_vec()) {
            return;
        }
        let their_version = doc
            .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
            .and_then(|v| {
                v.get("htex_rs_version")
                    .and_then(|s| s.as_str())
                    .map(String::from)
            })
            .map(|v| format!(" (htex_rs {v})"))
            .unwrap_or_default();
        let msg = format!(
            "htex_rs protocol version mismatch: worker pool {:?} speaks protocol v{theirs}{their_version}, \
             the interchange speaks protocol v{PROTOCOL_VERSION} (htex_rs {HTEX_RS_VERSION}). \
             Install the same htex_rs version on the worker nodes as on the submit side.",
            String::from_utf8_lossy(identity)
        );
        self.refuse(identity, msg);
    }

    fn refuse(&mut self, identity: &[u8], msg: String) {
        log::warn!("{msg}");
        let _ = self.send(&[identity, &header(Kind::Refused), msg.as_bytes()]);
        self.shared.emit([Event::Fatal(msg)]);
    }

    fn on_register(&mut self, identity: Vec<u8>, frames: &[zmq::Message]) {
        let reg = match frames.get(2).map(|f| Registration::decode(f)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return self.drop_junk(&identity, &e.to_string()),
            None => return self.drop_junk(&identity, "registration without a document"),
        };
        if reg.protocol_version != PROTOCOL_VERSION {
            let doc = frames.get(2).map(|m| m.to_vec());
            return self.refuse_version(&identity, reg.protocol_version, doc.as_deref());
        }
        if self.config.check_python && !same_minor(&reg.python_version, &self.config.python_version)
        {
            let msg = format!(
                "Python version mismatch: worker pool {} on {} runs Python {}, the submit side runs Python {}. \
                 Use the same Python major.minor on the workers, or set _check_python_mismatch=False.",
                reg.uid, reg.hostname, reg.python_version, self.config.python_version
            );
            return self.refuse(&identity, msg);
        }
        if self.managers.get(&identity).is_some() {
            return self.drop_junk(&identity, "duplicate registration");
        }
        log::info!(
            "Registered manager {} (block {:?}, host {}, {} workers, capacity {})",
            reg.uid,
            reg.block_id,
            reg.hostname,
            reg.worker_count,
            reg.max_capacity
        );
        let _ = self.send(&[&identity, &header(Kind::Registered)]);
        self.managers.register(identity, reg);
    }

    fn on_results(&mut self, identity: &[u8], peer: router::Peer, frames: &mut Vec<zmq::Message>) {
        let Some(slot) = self.managers.resolve(identity, peer) else {
            return self.drop_junk(identity, "results from an unregistered manager");
        };
        if frames.len() < 3 {
            return self.drop_junk(identity, "results without a meta frame");
        }
        let meta = match decode_meta(&frames[2], frames.len() - 3) {
            Ok(m) => m,
            Err(e) => return self.drop_junk(identity, &e.to_string()),
        };
        self.managers
            .complete_at(slot, meta.iter().map(|(id, _)| *id), self.now);
        self.shared
            .stats
            .results_forwarded
            .fetch_add(meta.len() as u64, Ordering::Relaxed);
        self.results
            .extend(
                meta.into_iter()
                    .zip(frames.drain(3..))
                    .map(|((task_id, status), payload)| Event::Result {
                        task_id,
                        status,
                        payload,
                    }),
            );
    }

    fn expire(&mut self) {
        let lost = self.managers.expire_silent(self.config.heartbeat_threshold);
        for l in &lost {
            log::warn!(
                "Manager {} on {} missed heartbeats for {:?}; failing its {} tasks with ManagerLost",
                l.uid,
                l.hostname,
                self.config.heartbeat_threshold,
                l.tasks.len()
            );
        }
        self.shared
            .emit(lost.into_iter().map(|l| Event::ManagerLost {
                uid: l.uid,
                hostname: l.hostname,
                tasks: l.tasks,
            }));
        for id in self.managers.drained() {
            log::info!(
                "Manager {:?} drained and idle; telling it to exit",
                String::from_utf8_lossy(&id)
            );
            let _ = self.send(&[&id, &header(Kind::Shutdown)]);
        }
    }

    /// Fail a task at once, with `message` for its exception.
    fn unplaceable(&mut self, task_id: u64, message: String) {
        log::warn!("Task {task_id} failed: {message}");
        self.shared.emit([Event::Result {
            task_id,
            status: STATUS_UNPLACEABLE,
            payload: zmq::Message::from(message.into_bytes()),
        }]);
    }

    /// Match tasks that ask for resources to managers with room, in priority order. One
    /// that fits nowhere now waits; tasks behind it may take the room it waits for
    /// (backfill) until it has waited `BACKFILL_WINDOW`, then that manager is kept for it
    /// (so a large task's wait is bounded by the tasks already running there). One that
    /// no connected manager could ever hold fails at once.
    fn dispatch_typed(&mut self) {
        if self.typed.is_empty() || self.managers.is_empty() {
            return;
        }
        // Every pool busy and every waiting task seen before: nothing can change.
        if !std::mem::take(&mut self.typed_new) && !self.managers.any_eligible() {
            return;
        }
        let now = Instant::now();
        let mut kept: foldhash::HashSet<Vec<u8>> = foldhash::HashSet::default();
        let mut waiting: Vec<PendingTask> = Vec::new();
        let mut batches: Vec<(Vec<u8>, Vec<PendingTask>)> = Vec::new();
        for _ in 0..TYPED_SCAN {
            let Some(mut t) = self.typed.pop() else { break };
            let req = t.request.unwrap_or_default();
            match self.managers.place(&req, &kept) {
                Placement::Fits(id) => {
                    self.managers.assign(&id, &[t.task_id]);
                    self.managers.grant(&id, t.task_id, req);
                    t.blocked_since = None;
                    match batches.iter_mut().find(|(b, _)| *b == id) {
                        Some((_, v)) => v.push(t),
                        None => batches.push((id, vec![t])),
                    }
                }
                Placement::Wait(keep) => {
                    let since = *t.blocked_since.get_or_insert(now);
                    if let Some(k) = keep.filter(|_| now.duration_since(since) >= BACKFILL_WINDOW) {
                        kept.insert(k);
                    }
                    waiting.push(t);
                }
                Placement::Never(largest) => self.unplaceable(
                    t.task_id,
                    format!(
                        "it asks for {req}, more than any connected pool has (the largest: \
                         {largest}); ask for less, or give the pools more (workers per node, \
                         a larger node, available_accelerators)"
                    ),
                ),
            }
        }
        for t in waiting {
            self.typed.push(t);
        }
        for (id, batch) in batches {
            let meta: Vec<(u64, u8)> = batch.iter().map(|t| (t.task_id, t.flags)).collect();
            if let Err(returned) = self.send_tasks(&id, &meta, batch) {
                for t in returned {
                    self.typed.push(t);
                }
                self.forget_unreachable(&id);
            }
        }
    }

    fn dispatch(&mut self) {
        self.dispatch_typed();
        if self.queue.is_empty() {
            return;
        }
        // Reused from one batch to the next: no allocation per batch.
        let mut batch = std::mem::take(&mut self.batch);
        let mut meta = std::mem::take(&mut self.meta);
        let mut ids = std::mem::take(&mut self.ids);
        for slot in self.managers.dispatch_order(self.queue.len()) {
            if self.queue.is_empty() {
                break;
            }
            let Some(m) = self.managers.at(slot) else {
                continue;
            };
            let n = m.free_capacity().min(self.queue.len());
            batch.clear();
            batch.extend((0..n).map_while(|_| self.queue.pop()));
            meta.clear();
            meta.extend(batch.iter().map(|t| (t.task_id, t.flags)));
            ids.clear();
            ids.extend(meta.iter().map(|(i, _)| *i));
            if let Ok(peer) = send_batch(&mut self.router, m.peer, &m.identity, &meta, &batch) {
                if m.peer != Some(peer) {
                    self.managers.bind(slot, peer);
                }
                self.managers.assign_at(slot, &ids);
            } else {
                let id = m.identity.clone();
                for t in batch.drain(..) {
                    self.queue.push(t);
                }
                self.forget_unreachable(&id);
            }
        }
        batch.clear();
        self.batch = batch;
        self.meta = meta;
        self.ids = ids;
    }

    /// The peer is gone (the router refused a send; its batch was requeued):
    /// forget it; its outstanding tasks are lost with it.
    fn forget_unreachable(&mut self, id: &[u8]) {
        if let Some(m) = self.managers.remove(id) {
            log::warn!("Manager {} is unreachable; removed", m.reg.uid);
            self.shared.emit([Event::ManagerLost {
                uid: m.reg.uid,
                hostname: m.reg.hostname,
                tasks: m.tasks.into_sorted(),
            }]);
        }
    }

    fn send_tasks(
        &mut self,
        identity: &[u8],
        meta: &[(u64, u8)],
        batch: Vec<PendingTask>,
    ) -> Result<(), Vec<PendingTask>> {
        match send_batch(&mut self.router, None, identity, meta, &batch) {
            Ok(_) => Ok(()),
            Err(_) => Err(batch),
        }
    }
}

/// Send a batch of tasks by `peer` (else by `identity`: see `Router::send_to`); refused
/// for a peer that is not connected, before anything is queued, so the caller still has
/// the batch whole.
fn send_batch(
    router: &mut router::Router,
    peer: Option<router::Peer>,
    identity: &[u8],
    meta: &[(u64, u8)],
    batch: &[PendingTask],
) -> Result<router::Peer, router::NotConnected> {
    let head = [&header(Kind::Tasks)[..], &encode_meta(meta)[..]];
    let payloads = batch.iter().map(|t| &t.payload[..]);
    router.send_to(peer, identity, head.iter().copied().chain(payloads))
}

fn same_minor(a: &str, b: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(a) == mm(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::STATUS_RESULT;

    #[test]
    fn python_versions_compare_by_major_minor() {
        assert!(same_minor("3.11.7", "3.11"));
        assert!(same_minor("3.11.2", "3.11.9"));
        assert!(!same_minor("3.12.0", "3.11.7"));
    }

    fn start(threshold: Duration, curve: Option<curve::Server>) -> Handle {
        Handle::start(Config {
            heartbeat_threshold: threshold,
            curve,
            ..Config::default()
        })
        .unwrap()
    }

    /// A fake pool: a DEALER that registers with the given capacity and drain time.
    fn pool(ctx: &zmq::Context, port: u16, uid: &str, cap: u32, drain: Option<f64>) -> zmq::Socket {
        let reg = Registration {
            protocol_version: PROTOCOL_VERSION,
            uid: uid.into(),
            block_id: Some("0".into()),
            hostname: "testhost".into(),
            worker_count: cap,
            max_capacity: cap,
            drain_time: drain,
            ..Registration::default()
        };
        pool_with(ctx, port, &reg)
    }

    /// A fake pool that registers with `reg`.
    fn pool_with(ctx: &zmq::Context, port: u16, reg: &Registration) -> zmq::Socket {
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.set_identity(reg.uid.as_bytes()).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        s.send_multipart(
            [
                &header(Kind::Register)[..],
                &serde_json::to_vec(reg).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(recv(&s)[0], header(Kind::Registered));
        s
    }

    fn recv(s: &zmq::Socket) -> Vec<Vec<u8>> {
        assert!(s.poll(zmq::POLLIN, 5000).unwrap() > 0, "nothing received");
        s.recv_multipart(0).unwrap()
    }

    fn task(id: u64, priority: f64) -> NewTask {
        NewTask {
            task_id: id,
            priority,
            flags: 0,
            payload: id.to_le_bytes().to_vec(),
        }
    }

    fn wait_for<T>(h: &Handle, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            for e in h.wait_events(Duration::from_millis(100), usize::MAX) {
                if let Some(t) = pick(e) {
                    return t;
                }
            }
        }
        panic!("event not seen");
    }

    #[test]
    fn tasks_go_out_in_priority_order_in_batches_and_results_come_back() {
        let h = start(Duration::from_secs(60), None);
        h.submit([
            task(1, f64::INFINITY),
            task(2, 5.0),
            task(3, 1.0),
            task(4, 5.0),
        ]);
        let ctx = zmq::Context::new();
        let p = pool(&ctx, h.port, "p1", 4, None);
        let frames = recv(&p);
        assert_eq!(frames[0], header(Kind::Tasks));
        let meta = decode_meta(&frames[1], frames.len() - 2).unwrap();
        assert_eq!(
            meta.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![3, 2, 4, 1]
        );
        assert_eq!(frames[2], 3u64.to_le_bytes());
        p.send_multipart(
            [
                &header(Kind::Results)[..],
                &encode_meta(&[(3, STATUS_RESULT)]),
                b"ok",
            ],
            0,
        )
        .unwrap();
        let (id, payload) = wait_for(&h, |e| match e {
            Event::Result {
                task_id, payload, ..
            } => Some((task_id, payload.to_vec())),
            _ => None,
        });
        assert_eq!((id, payload), (3, b"ok".to_vec()));
        let infos = {
            let (tx, rx) = std::sync::mpsc::channel();
            h.command(Command::Managers(tx));
            rx.recv_timeout(Duration::from_secs(5)).unwrap()
        };
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].tasks, 3);
    }

    /// A pool found and sent to by its connection: when it reconnects under the same
    /// identity (a DEALER after a network blip), its results on the new connection are
    /// still its own and its next tasks go to the new connection.
    #[test]
    fn a_pool_that_reconnects_under_its_identity_keeps_its_tasks_and_gets_new_ones() {
        let h = start(Duration::from_secs(60), None);
        let ctx = zmq::Context::new();
        let first = pool(&ctx, h.port, "p1", 2, None);
        h.submit([task(1, 0.0), task(2, 0.0)]);
        let mut sent = sent_ids(&first);
        if sent.len() < 2 {
            sent.extend(sent_ids(&first));
        }
        sent.sort_unstable();
        assert_eq!(sent, [1, 2]);
        drop(first);
        // The same identity on a new connection, without registering again.
        let second = ctx.socket(zmq::DEALER).unwrap();
        second.set_linger(0).unwrap();
        second.set_identity(b"p1").unwrap();
        second
            .connect(&format!("tcp://127.0.0.1:{}", h.port))
            .unwrap();
        let done = |id: u64| {
            [
                header(Kind::Results).to_vec(),
                encode_meta(&[(id, STATUS_RESULT)]),
                b"ok".to_vec(),
            ]
        };
        // Until the old connection is gone the new one is refused (libzmq's rule): retry.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            second.send_multipart(done(1), 0).unwrap();
            got = h
                .wait_events(Duration::from_millis(100), usize::MAX)
                .into_iter()
                .find_map(|e| match e {
                    Event::Result { task_id, .. } => Some(task_id),
                    _ => None,
                });
        }
        assert_eq!(
            got,
            Some(1),
            "the result on the new connection is the pool's"
        );
        // Its freed slot takes the next task, on the new connection.
        h.submit([task(3, 0.0)]);
        assert_eq!(sent_ids(&second), [3]);
        let infos = h.ask(Command::Managers).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].tasks, 2, "task 2 is still held, task 3 added");
    }

    fn typed(id: u64, cores: u32) -> NewTask {
        let head = format!("{{\"cores\":{cores}}}");
        NewTask {
            task_id: id,
            priority: f64::INFINITY,
            flags: FLAG_RESOURCES,
            payload: resources::join(head.as_bytes(), &id.to_le_bytes()),
        }
    }

    fn sent_ids(p: &zmq::Socket) -> Vec<u64> {
        let frames = recv(p);
        assert_eq!(frames[0], header(Kind::Tasks));
        decode_meta(&frames[1], frames.len() - 2)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect()
    }

    #[test]
    fn resource_tasks_wait_for_room_and_one_too_big_for_every_pool_fails_at_once() {
        let h = start(Duration::from_secs(60), None);
        let ctx = zmq::Context::new();
        let p = pool_with(
            &ctx,
            h.port,
            &Registration {
                protocol_version: PROTOCOL_VERSION,
                uid: "p4".into(),
                block_id: Some("0".into()),
                worker_count: 4,
                max_capacity: 8,
                resources: Some(resources::Resources {
                    cores: 4,
                    memory: 1000,
                    gpus: 0,
                }),
                ..Registration::default()
            },
        );
        h.submit([typed(1, 4), typed(2, 2), typed(3, 8)]);
        let (id, message) = wait_for(&h, |e| match e {
            Event::Result {
                task_id,
                status: STATUS_UNPLACEABLE,
                payload,
            } => Some((task_id, String::from_utf8_lossy(&payload).into_owned())),
            _ => None,
        });
        assert_eq!(id, 3);
        assert!(
            message.contains("8 cores") && message.contains("the largest: 4 cores"),
            "{message}"
        );
        assert_eq!(sent_ids(&p), [1], "task 2 waits: task 1 holds all 4 cores");
        h.submit([task(9, 0.0)]);
        assert_eq!(
            sent_ids(&p),
            [9],
            "plain tasks are not held back by resources"
        );
        assert_eq!(
            p.poll(zmq::POLLIN, 300).unwrap(),
            0,
            "still no room for task 2"
        );
        p.send_multipart(
            [
                &header(Kind::Results)[..],
                &encode_meta(&[(1, STATUS_RESULT)]),
                b"ok",
            ],
            0,
        )
        .unwrap();
        assert_eq!(sent_ids(&p), [2], "task 1's cores came back");
    }

    #[test]
    fn a_silent_manager_is_lost_with_its_tasks() {
        let h = start(Duration::from_millis(300), None);
        let ctx = zmq::Context::new();
        let p = pool(&ctx, h.port, "quiet", 2, None);
        h.submit([task(7, 0.0), task(8, 0.0)]);
        recv(&p);
        let lost = wait_for(&h, |e| match e {
            Event::ManagerLost {
                uid,
                hostname,
                tasks,
            } => Some((uid, hostname, tasks)),
            _ => None,
        });
        assert_eq!(
            lost,
            ("quiet".to_string(), "testhost".to_string(), vec![7, 8])
        );
    }

    #[test]
    fn a_drained_idle_manager_is_told_to_exit_and_a_held_one_gets_nothing() {
        let h = start(Duration::from_secs(60), None);
        let ctx = zmq::Context::new();
        let drained = pool(&ctx, h.port, "drained", 1, Some(0.0));
        assert_eq!(recv(&drained)[0], header(Kind::Shutdown));
        let held = pool(&ctx, h.port, "held", 1, None);
        let (tx, rx) = std::sync::mpsc::channel();
        h.command(Command::Hold("held".into(), tx));
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        h.submit([task(1, 0.0)]);
        assert_eq!(held.poll(zmq::POLLIN, 300).unwrap(), 0);
    }

    #[test]
    fn another_protocol_version_is_refused_and_reported() {
        let h = start(Duration::from_secs(60), None);
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::DEALER).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{}", h.port)).unwrap();
        s.send(
            &[b'H', b'X', PROTOCOL_VERSION + 1, Kind::Probe as u8][..],
            0,
        )
        .unwrap();
        let frames = recv(&s);
        assert_eq!(frames[0], header(Kind::Refused));
        let msg = wait_for(&h, |e| match e {
            Event::Fatal(m) => Some(m),
            _ => None,
        });
        assert!(msg.contains(&format!("v{}", PROTOCOL_VERSION + 1)));
        assert!(msg.contains(&format!("v{PROTOCOL_VERSION}")));
        assert_eq!(String::from_utf8_lossy(&frames[1]), msg);
    }

    #[test]
    fn curve_serves_listed_clients_only() {
        let server = zmq::CurveKeyPair::new().unwrap();
        let client = zmq::CurveKeyPair::new().unwrap();
        let rogue = zmq::CurveKeyPair::new().unwrap();
        let h = start(
            Duration::from_secs(60),
            Some(curve::Server::new(
                zeroize::Zeroizing::new(server.secret_key),
                [client.public_key],
            )),
        );
        let ctx = zmq::Context::new();
        let probe = |keys: &zmq::CurveKeyPair| {
            let s = ctx.socket(zmq::DEALER).unwrap();
            s.set_linger(0).unwrap();
            s.set_curve_serverkey(&server.public_key).unwrap();
            s.set_curve_publickey(&keys.public_key).unwrap();
            s.set_curve_secretkey(&keys.secret_key).unwrap();
            s.connect(&format!("tcp://127.0.0.1:{}", h.port)).unwrap();
            s.send(&header(Kind::Probe)[..], 0).unwrap();
            s.poll(zmq::POLLIN, 1000).unwrap() > 0
        };
        assert!(!probe(&rogue));
        assert!(probe(&client));
        assert!(h.stats().dropped.load(Ordering::Relaxed) >= 1);
    }
}
