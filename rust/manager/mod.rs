//! The worker pool's data path: a thread that owns the DEALER to the interchange and
//! the ROUTER its worker processes connect to. It registers the pool, heartbeats,
//! spreads task batches over ready workers and forwards their result batches without
//! re-encoding them. Python keeps the process supervision (start, pin, restart workers)
//! and is told why the core stopped: shutdown, refusal, or interchange silence.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{decode_header, decode_meta, encode_meta, header, Kind, META_ENTRY};
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
    pub worker_url: String,
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
        let workers = ctx.socket(zmq::ROUTER).map_err(|e| e.to_string())?;
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
            workers.set_linger(0)?;
            workers.set_router_handover(true)?;
            workers.set_sndhwm(0)?;
            workers.set_rcvhwm(0)?;
            Ok(())
        };
        setup().map_err(|e| format!("cannot configure the pool sockets: {e}"))?;
        workers
            .bind(&config.worker_url)
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
            workers,
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

struct Core {
    config: Config,
    _ctx: zmq::Context,
    ix: zmq::Socket,
    workers: zmq::Socket,
    monitor: zmq::Socket,
    shared: Arc<Shared>,
    /// (meta entry, payload) of tasks not yet given to a worker.
    pending: VecDeque<([u8; META_ENTRY], zmq::Message)>,
    /// Registered workers and the task ids each holds.
    ready: HashMap<Vec<u8>, HashSet<u64>>,
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
            let (ix_ready, workers_ready, wake_ready, monitor_ready) = {
                let mut items = [
                    self.ix.as_poll_item(zmq::POLLIN),
                    self.workers.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(self.shared.inbox.fd(), zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                ];
                if zmq::poll(&mut items, timeout).is_err() {
                    continue;
                }
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                    items[3].is_readable(),
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
            if workers_ready {
                for _ in 0..1024 {
                    match recv_frames(&self.workers) {
                        Some(f) => self.on_worker(f),
                        None => break,
                    }
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
                    // Results the worker sent just before dying are still queued on the
                    // ipc socket: forward them first, so only unfinished tasks are lost.
                    while let Some(frames) = recv_frames(&self.workers) {
                        self.on_worker(frames);
                    }
                    let mut held: Vec<u64> = self
                        .ready
                        .remove(&id)
                        .map(|s| s.into_iter().collect())
                        .unwrap_or_default();
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

    fn on_worker(&mut self, mut frames: Vec<zmq::Message>) {
        if frames.len() < 2 {
            return;
        }
        let id = frames[0].to_vec();
        match decode_header(&frames[1]) {
            Ok(Kind::Register) => {
                self.ready.entry(id).or_default();
            }
            Ok(Kind::Results) if frames.len() >= 3 => {
                if let Ok(meta) = decode_meta(&frames[2], frames.len() - 3) {
                    if let Some(held) = self.ready.get_mut(&id) {
                        for (tid, _) in meta {
                            held.remove(&tid);
                        }
                    }
                }
                // Already in protocol form: forward as is, minus the worker identity.
                let _ = send_frames(&self.ix, frames.split_off(1));
            }
            _ => {}
        }
    }

    fn dispatch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let per_worker = self.config.per_worker;
        // Least-loaded first, so prefetched tasks spread over the workers.
        let mut order: Vec<(usize, Vec<u8>)> = self
            .ready
            .iter()
            .filter(|(_, held)| held.len() < per_worker)
            .map(|(id, held)| (held.len(), id.clone()))
            .collect();
        order.sort_unstable();
        for (held, id) in order {
            if self.pending.is_empty() {
                break;
            }
            let n = (per_worker - held).min(self.pending.len());
            let batch: Vec<_> = self.pending.drain(..n).collect();
            let mut meta = Vec::with_capacity(n * META_ENTRY);
            let set = self.ready.get_mut(&id).expect("worker in order is ready");
            for (e, _) in &batch {
                meta.extend_from_slice(e);
                let mut tid = [0u8; 8];
                tid.copy_from_slice(&e[..8]);
                set.insert(u64::from_le_bytes(tid));
            }
            let _ = self.workers.send(&id[..], zmq::SNDMORE);
            let _ = self.workers.send(&header(Kind::Tasks)[..], zmq::SNDMORE);
            let _ = self.workers.send(meta, zmq::SNDMORE);
            let last = batch.len() - 1;
            for (i, (_, p)) in batch.into_iter().enumerate() {
                let _ = self
                    .workers
                    .send(p, if i < last { zmq::SNDMORE } else { 0 });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{STATUS_EXCEPTION, STATUS_RESULT};

    /// A fake interchange (ROUTER) and a core with one fake worker (DEALER), real sockets.
    struct Rig {
        _ctx: zmq::Context,
        ix: zmq::Socket,
        worker: zmq::Socket,
        core: Handle,
    }

    fn rig(per_worker: usize, threshold: Duration) -> Rig {
        let ctx = zmq::Context::new();
        let ix = ctx.socket(zmq::ROUTER).unwrap();
        ix.set_linger(0).unwrap();
        ix.bind("tcp://127.0.0.1:*").unwrap();
        let url = ix.get_last_endpoint().unwrap().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "htex-rs-core-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let worker_url = format!("ipc://{}/w", dir.display());
        let core = Handle::start(Config {
            interchange_url: url,
            identity: b"pool-1".to_vec(),
            worker_url: worker_url.clone(),
            registration: b"{}".to_vec(),
            heartbeat_period: Duration::from_millis(50),
            heartbeat_threshold: threshold,
            per_worker,
            curve: None,
        })
        .unwrap();
        let worker = ctx.socket(zmq::DEALER).unwrap();
        worker.set_linger(0).unwrap();
        worker.set_identity(b"0").unwrap();
        worker.connect(&worker_url).unwrap();
        worker.send(&header(Kind::Register)[..], 0).unwrap();
        Rig {
            _ctx: ctx,
            ix,
            worker,
            core,
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
        let r = rig(2, Duration::from_secs(30));
        let reg = recv_kind(&r.ix, Kind::Register);
        assert_eq!(reg[1], b"{}");
        send_tasks(&r, &[1, 2, 3]);
        // The worker may hold 2 at once: it gets 2, the third waits.
        let batch = recv_kind(&r.worker, Kind::Tasks);
        let meta = decode_meta(&batch[1], batch.len() - 2).unwrap();
        assert_eq!(meta.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(batch[2], 1u64.to_le_bytes());
        let results = encode_meta(&[(1, STATUS_RESULT), (2, STATUS_EXCEPTION)]);
        r.worker
            .send_multipart([&header(Kind::Results)[..], &results, b"r1", b"r2"], 0)
            .unwrap();
        let fwd = recv_kind(&r.ix, Kind::Results);
        assert_eq!(fwd[1], results);
        assert_eq!(&fwd[2..], &[b"r1".to_vec(), b"r2".to_vec()]);
        let batch = recv_kind(&r.worker, Kind::Tasks);
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
