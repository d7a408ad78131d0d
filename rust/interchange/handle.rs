//! What other threads call: the submit side starts the interchange thread with
//! [`Handle::start`], hands it tasks and commands, and collects [`Event`]s.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::pools::{ManagerInfo, NodeInfo};
use super::queue::Placed;
use super::selector::Selector;
use super::Interchange;
use crate::logging::{self, Sink};
use crate::protocol::{message_limit, PROTOCOL_VERSION};
use crate::resources::{self, Head, Resources, FLAG_RESOURCES, FLAG_WALLTIME};
use crate::socket_thread::SocketThread;
use crate::transport::Mailbox;
use crate::zmtp::{curve, router};

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
    /// The serialized task, shared (a Python `bytes` object's own buffer, say): it is
    /// written to the pool from where it is, not copied. With a request or a time
    /// limit, it starts with them as the pool reads them ([`NewTask::with_head`]).
    pub payload: Bytes,
    /// What it asks for (cores, memory, GPUs) and how long it may run; `None`: any free
    /// slot will do, for as long as it takes.
    pub placed: Option<Box<Placed>>,
}

impl NewTask {
    /// A task that asks for nothing and has no limit: its payload goes as it is.
    #[must_use]
    pub fn plain(task_id: u64, priority: f64, flags: u8, payload: Bytes) -> NewTask {
        NewTask {
            task_id,
            priority,
            flags,
            payload,
            placed: None,
        }
    }

    /// A task asking for `request` (`FLAG_RESOURCES`) or limited to `walltime`
    /// (`FLAG_WALLTIME`), or both: they are written at the head of its payload for the
    /// pool (the one copy such a task costs).
    #[must_use]
    pub fn with_head(
        task_id: u64,
        priority: f64,
        flags: u8,
        payload: &[u8],
        request: Option<Resources>,
        walltime: Option<Duration>,
    ) -> NewTask {
        let head = Head {
            request: request.unwrap_or_default(),
            walltime: walltime.map(|w| w.as_secs_f64()),
        };
        let mut flags = flags;
        if request.is_some() {
            flags |= FLAG_RESOURCES;
        }
        if walltime.is_some() {
            flags |= FLAG_WALLTIME;
        }
        NewTask {
            task_id,
            priority,
            flags,
            payload: resources::join(&head.to_json(), payload).into(),
            placed: Some(Box::new(Placed {
                request,
                walltime,
                blocked_since: None,
            })),
        }
    }
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
        /// What the pool said as it left (its block ended); `None`: it went silent or
        /// unreachable.
        reason: Option<String>,
    },
    /// A pool the executor cannot work with (version mismatch): fail everything.
    Fatal(String),
    /// A manager's record for monitoring (only with `Config::node_events`): it
    /// registered, was held, went away, or its task set changed (see `NodeInfo`).
    Node(NodeInfo),
}

#[derive(Default)]
pub struct Stats {
    pub dropped: AtomicU64,
    pub tasks_received: AtomicU64,
    pub results_forwarded: AtomicU64,
}

/// What the submit side hands the interchange thread.
pub(super) enum Input {
    Task(NewTask),
    Command(Command),
}

pub(super) struct Shared {
    pub(super) inbox: Arc<Mailbox<Input>>,
    events: Mutex<VecDeque<Event>>,
    events_cv: Condvar,
    alive: AtomicBool,
    pub(super) stats: Stats,
}

impl Shared {
    pub(super) fn emit(&self, events: impl IntoIterator<Item = Event>) {
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

/// The worker port's listen backlog: a storm of thousands of pools starting at once
/// overflows a small one, and each refused SYN waits out TCP's 1, 3, 7 s retries (10,000
/// pools took 32 s to register behind libzmq's 100). The kernel caps it at somaxconn.
const LISTEN_BACKLOG: i32 = 65_535;

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
        let bind_address = config.bind_address.clone();
        let mut ix = Interchange::new(config, router, shared.clone());
        let bound = format!(
            "htex_rs {HTEX_RS_VERSION} interchange (protocol v{PROTOCOL_VERSION}) bound worker port {port} on {bind_address}, encrypted={encrypted}",
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
