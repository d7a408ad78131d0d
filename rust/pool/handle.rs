//! What the pool's Python supervisor calls: start the core thread, report a worker's
//! death, read the counts, learn why the core stopped.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::tasks::Tasks;
use super::{Core, ResultBatch};
use crate::logging::{self, FirstSeen, Sink};
use crate::protocol::{header, Kind};
use crate::socket_thread::SocketThread;
use crate::stream;
use crate::transport::{Mailbox, Signal};

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
    /// Epoch seconds at which the pool's block ends (`None`: unknown): the pool hands its
    /// unstarted tasks back shortly before, and leaves at that time.
    pub block_end: Option<f64>,
    /// Epoch seconds at which the pool drains (`drain_period`): it hands its unstarted
    /// tasks back and runs what it has started.
    pub drain_time: Option<f64>,
    /// Raised when the core stops (and, through the log sink, when it logs): the
    /// supervisor waits on its fd instead of asking every so often.
    pub events: Arc<Signal>,
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
    /// The block ended (its end time, or the batch system's SIGTERM): unstarted tasks were
    /// handed back; the text says why.
    Ended(String),
}

impl Stopped {
    /// The pool process's exit status: 0 when told or asked to stop, 1 when it lost the
    /// interchange, 3 when refused, 4 for a bug.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Stopped::Shutdown | Stopped::Requested | Stopped::Ended(_) => 0,
            Stopped::Silent | Stopped::Disconnected => 1,
            Stopped::Refused(_) => 3,
            Stopped::Crashed => 4,
        }
    }

    /// What the pool logs as it exits (critical when `exit_code` is not 0).
    #[must_use]
    pub fn message(&self) -> String {
        match self {
            Stopped::Shutdown => "Interchange asked this pool to exit".into(),
            Stopped::Requested => "The pool was asked to stop".into(),
            Stopped::Refused(why) => format!("Interchange refused this pool: {why}"),
            Stopped::Silent => {
                "Missing contact with interchange beyond heartbeat_threshold; exiting".into()
            }
            Stopped::Disconnected => "The connection to the interchange broke; exiting, so the \
                 interchange fails this pool's tasks as ManagerLost instead of losing them"
                .into(),
            Stopped::Crashed => "The pool's Rust core stopped unexpectedly (a bug); exiting".into(),
            Stopped::Ended(why) => format!("{why}; unstarted tasks were handed back, exiting"),
        }
    }
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
    /// The block ends now (the batch system's SIGTERM): hand every unstarted task back,
    /// tell the interchange why, and stop.
    End(String),
}

/// What the core has done: counted by the core as it goes, published once a turn (read
/// with [`Handle::counts`]).
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
    /// Tasks failed for running past their walltime (their workers were ended).
    pub timed_out: u64,
    /// Unstarted tasks handed back to the interchange as the block ended.
    pub given_back: u64,
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

pub(super) struct Shared {
    pub(super) inbox: Arc<Mailbox<Command>>,
    pub(super) stopped: Mutex<Option<Stopped>>,
    pub(super) stopped_cv: Condvar,
    /// The core's counts as of its last turn.
    pub(super) counts: Mutex<Counts>,
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
            counts: Mutex::default(),
        });
        // The allocator owns the pool's resources; the config keeps none of them.
        let alloc = crate::resources::Allocator::new(
            std::mem::take(&mut config.slots),
            config.memory,
            std::mem::take(&mut config.accelerators),
        );
        let (ends_at, hand_back_at) = block_clock(config.block_end, config.drain_time);
        let mut core = Core {
            config,
            _ctx: ctx,
            ep: crate::epoll::Epoll::new(64).map_err(|e| format!("cannot create an epoll: {e}"))?,
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
            counts: Counts::default(),
            kills: Vec::new(),
            ends_at,
            hand_back_at,
            ending: None,
            stop: None,
        };
        let on_exit = shared.clone();
        let events = core.config.events.clone();
        let thread = SocketThread::spawn(
            "htex-rs-pool",
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
                drop(s);
                events.raise();
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
        *self.shared.counts.lock().unwrap()
    }

    /// Stop the thread and wait for it (idempotent, callable from any thread).
    pub fn stop(&self) {
        self.thread.stop();
    }
}

/// Most time before its block's end that a pool hands its unstarted tasks back.
pub const HAND_BACK_BEFORE_END: Duration = Duration::from_secs(60);

/// When the block ends and when to hand unstarted tasks back, on this clock, from epoch
/// seconds: a tenth of the time left before the end (between 1 s and
/// [`HAND_BACK_BEFORE_END`]), or at the drain time if that comes first.
fn block_clock(
    block_end: Option<f64>,
    drain_time: Option<f64>,
) -> (Option<Instant>, Option<Instant>) {
    let now = Instant::now();
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let at = |t: f64| now + Duration::from_secs_f64((t - epoch).clamp(0.0, 1e9));
    let ends_at = block_end.map(at);
    let notice = ends_at.map(|end| {
        let before = (end.saturating_duration_since(now) / 10)
            .clamp(Duration::from_secs(1), HAND_BACK_BEFORE_END);
        end.checked_sub(before).unwrap_or(now)
    });
    let hand_back_at = match (notice, drain_time.map(at)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    (ends_at, hand_back_at)
}

fn bind_workers(url: &str) -> std::io::Result<UnixListener> {
    let listener = UnixListener::bind_addr(&stream::unix_addr(url)?)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
