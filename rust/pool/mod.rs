//! The worker pool's core (the Rust half of `htex_rs.worker_pool`): a thread that owns the DEALER to the interchange and
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

//!
//! - `handle.rs`: what the pool's Python supervisor calls (start, commands, counts, why
//!   it stopped).
//! - `tasks.rs`: every task the pool holds, and which worker gets which.
//! - `workers.rs`: the worker streams (accept, read, write, their messages).
//! - `upstream.rs`: the interchange side (its messages, results on their way back).
//! - this file: the loop, a worker's death, and the dispatch pass.

mod handle;
mod tasks;
mod upstream;
mod workers;

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::epoll::{self, zmq_ready, Epoll};
use crate::logging::FirstSeen;
use crate::protocol::{encode_meta, header, Kind, STATUS_TIMEOUT, STATUS_WORKER_LOST};
use crate::resources;
use crate::resources::FLAG_WALLTIME;
use crate::stream;
use crate::transport::{recv_frames, send_frames};
use handle::Shared;
pub use handle::{ClientKeys, Command, Config, Counts, Handle, Stopped};
use tasks::{Task, Tasks};
use upstream::ResultBatch;
use workers::Conn;

struct Core {
    config: Config,
    _ctx: zmq::Context,
    ep: Epoll,
    ix: zmq::Socket,
    listener: UnixListener,
    conns: HashMap<u64, Conn>,
    next_token: u64,
    own_uid: u32,
    monitor: zmq::Socket,
    shared: Arc<Shared>,
    /// Every task the pool holds: queued, or held by a worker (keyed by stream token).
    tasks: Tasks<Bytes>,
    results: ResultBatch,
    /// Peers (`None`: the interchange; else a worker stream's token) whose dropped
    /// messages were logged once; later drops are only counted.
    warned_peers: FirstSeen<Option<u64>>,
    counts: Counts,
    /// Process groups to SIGKILL, and when (workers ended for a task's limit).
    kills: Vec<(Instant, u32)>,
    /// The block's end, and when to hand unstarted tasks back before it (or at the drain
    /// time); `ending` says why once that has begun.
    ends_at: Option<Instant>,
    hand_back_at: Option<Instant>,
    ending: Option<String>,
    stop: Option<Stopped>,
}
/// How long past its limit a task may run before the pool ends it: Parsl's own timeout
/// inside the worker (an `AppTimeout` raised between bytecodes) speaks first when it can.
const LIMIT_GRACE: Duration = Duration::from_millis(500);
/// From SIGTERM to SIGKILL for the process group of a worker ended for a task's limit.
const KILL_AFTER: Duration = Duration::from_millis(500);

/// Send `sig` to the process group `pid` leads (a worker starts its own session, so
/// a bash app's children are in it), or to `pid` alone if it leads none.
fn signal_group(pid: u32, sig: i32) {
    // 0 (a peer in another pid namespace) would signal our own group, 1 init's; a
    // worker is neither, nor this process.
    if pid <= 1 || pid == std::process::id() {
        return;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory preconditions; a stale pid gets ESRCH.
    if unsafe { libc::kill(-pid, sig) } != 0 {
        unsafe { libc::kill(pid, sig) };
    }
}

/// Epoll tokens of the core's own fds; a worker stream's token is its key in `conns`
/// (counted up from 1).
const IX: u64 = u64::MAX;
const MONITOR: u64 = u64::MAX - 1;
const LISTENER: u64 = u64::MAX - 2;
const INBOX: u64 = u64::MAX - 3;

impl Core {
    /// Watch the core's own fds: the interchange socket and its monitor through their
    /// `ZMQ_FD`s, the worker listener, the inbox.
    fn watch(&self) -> std::io::Result<()> {
        let zmq_fd = |s: &zmq::Socket| s.get_fd().map_err(std::io::Error::from);
        self.ep.add(zmq_fd(&self.ix)?, epoll::IN, IX)?;
        self.ep.add(zmq_fd(&self.monitor)?, epoll::IN, MONITOR)?;
        self.ep
            .add(self.listener.as_raw_fd(), epoll::IN, LISTENER)?;
        self.ep.add(self.shared.inbox.fd(), epoll::IN, INBOX)
    }

    fn run(&mut self) {
        if let Err(e) = self.watch() {
            log::error!("the pool cannot watch its sockets: {e}; stopping");
            self.stop = Some(Stopped::Crashed);
        }
        // Asking a libzmq socket whether it has a message is what makes its next message
        // signal the fd (a pipe nobody has found empty wakes nobody): the monitor is asked
        // once here, then read only when its fd fires.
        let _ = zmq_ready(&self.monitor);
        let mut last_beat = Instant::now();
        let mut last_contact = Instant::now();
        let hb = self.config.heartbeat_period;
        let threshold = self.config.heartbeat_threshold;
        let mut ready = Vec::with_capacity(64);
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
            if let Some(at) = self.tasks.next_deadline() {
                next = next.min(at + LIMIT_GRACE);
            }
            if let Some(&(at, _)) = self.kills.first() {
                next = next.min(at);
            }
            for at in [self.ends_at, self.hand_back_at].into_iter().flatten() {
                if at > now {
                    next = next.min(at);
                }
            }
            // libzmq's fds say only that something may have changed: a message the
            // DEALER took in during this turn's sends leaves its fd quiet, so ask it
            // before waiting. The monitor is only ever read when its fd fires.
            let ix_waiting = zmq_ready(&self.ix);
            let timeout = if ix_waiting {
                0
            } else {
                next.saturating_duration_since(now)
                    .as_millis()
                    .clamp(1, 1000) as i32
            };
            if let Err(e) = self.ep.wait(timeout, &mut ready) {
                log::error!("the pool cannot wait on its sockets: {e}; stopping");
                self.stop = Some(Stopped::Crashed);
                break;
            }
            let (mut ix_fired, mut monitor_fired, mut wake_ready) = (ix_waiting, false, false);
            for r in &ready {
                match r.token {
                    IX => ix_fired = true,
                    MONITOR => monitor_fired = true,
                    LISTENER => self.accept(),
                    INBOX => wake_ready = true,
                    token => {
                        if r.writable() {
                            self.flush(token);
                        }
                        if r.readable() {
                            self.read(token);
                        }
                    }
                }
            }
            if ix_fired && self.read_interchange() {
                last_contact = Instant::now();
            }
            if wake_ready {
                self.take_inbox();
            }
            if monitor_fired && recv_frames(&self.monitor).is_some() && self.stop.is_none() {
                self.stop = Some(Stopped::Disconnected);
            }
            let now = Instant::now();
            self.enforce_limits(now);
            self.watch_block_end(now);
            self.dispatch();
            if self.ending.is_some() {
                self.give_back(false, false);
            }
            // Counts first: whoever sees these results then sees counts that include them.
            self.publish_counts();
            self.results.send(&self.ix);
            self.arm_streams();
        }
        self.publish_counts();
        log::info!("pool stopped: {:?}; counts {:?}", self.stop, self.counts);
        let mut s = self.shared.stopped.lock().unwrap();
        *s = self.stop.take();
        self.shared.stopped_cv.notify_all();
    }

    /// End every worker whose task ran past its limit: the task fails with a timeout (its
    /// limit and the time it ran) and the worker is ended ([`Core::end_worker`]).
    fn enforce_limits(&mut self, now: Instant) {
        for o in self.tasks.overdue(now, LIMIT_GRACE) {
            self.counts.timed_out += 1;
            let Some(c) = self.conns.get(&o.worker) else {
                continue;
            };
            log::warn!(
                "task {} ran {:.1} s, past its walltime of {} s: ending its worker (pid {})",
                o.task_id,
                o.ran.as_secs_f64(),
                o.limit.as_secs_f64(),
                c.pid
            );
            let timeout = serde_json::json!({
                "worker_id": String::from_utf8_lossy(c.rank.as_deref().unwrap_or_default()),
                "hostname": self.config.hostname,
                "pid": c.pid,
                "walltime": o.limit.as_secs_f64(),
                "ran": o.ran.as_secs_f64(),
            });
            self.end_worker(o.worker, now);
            if self.results.full() {
                self.results.send(&self.ix);
            }
            self.results
                .push(o.task_id, STATUS_TIMEOUT, timeout.to_string().into_bytes());
        }
        while self.kills.first().is_some_and(|(at, _)| *at <= now) {
            let (_, pid) = self.kills.remove(0);
            signal_group(pid, libc::SIGKILL);
        }
    }

    /// Act on what the interchange sent (at most 1024 messages a turn); whether there was
    /// any.
    fn read_interchange(&mut self) -> bool {
        let mut heard = false;
        for _ in 0..1024 {
            match recv_frames(&self.ix) {
                Some(f) => {
                    heard = true;
                    self.on_interchange(f);
                }
                None => break,
            }
        }
        heard
    }

    /// At the hand-back time (shortly before the block's end, or the drain time) begin
    /// ending; at the block's end, leave.
    fn watch_block_end(&mut self, now: Instant) {
        if self.ending.is_none() && self.hand_back_at.is_some_and(|t| now >= t) {
            let why = match self.ends_at {
                Some(end) if end > now => format!(
                    "the block ends in {:.0} s (its walltime)",
                    (end - now).as_secs_f64()
                ),
                _ => "drain_period reached".to_string(),
            };
            self.begin_end(why);
        }
        if self.stop.is_none() && self.ends_at.is_some_and(|t| now >= t) {
            self.leave("the block reached its end (its walltime)".into());
        }
    }

    /// Begin ending: start no more tasks, ask workers for their look-aheads back, and hand
    /// the queue back to the interchange (which sends nothing more). Tasks already running
    /// go on; the interchange tells the pool to exit once they are done.
    fn begin_end(&mut self, why: String) {
        if self.ending.is_some() {
            return;
        }
        log::info!("{why}: handing unstarted tasks back to the interchange");
        self.ending = Some(why);
        let reclaim = stream::encode(&[&header(Kind::Reclaim)[..]]).expect("one 4-byte frame");
        for token in self.tasks.reclaim_all() {
            if let Some(c) = self.conns.get_mut(&token) {
                c.out.push(reclaim.clone());
            }
            self.flush(token);
        }
        self.give_back(true, false);
    }

    /// Hand the unstarted tasks back: the queue, and with `lookaheads` every worker's
    /// look-ahead too (else they come back from their workers into the queue).
    /// `always`: send the message even with no task in it, so the interchange learns
    /// the pool is ending.
    fn give_back(&mut self, always: bool, lookaheads: bool) {
        let tasks = self.tasks.take_unstarted(lookaheads);
        if tasks.is_empty() && !always {
            return;
        }
        self.counts.given_back += tasks.len() as u64;
        let why = self.ending.clone().unwrap_or_default();
        let meta = encode_meta(&tasks.iter().map(|t| (t.id, t.flags)).collect::<Vec<_>>());
        let head = [header(Kind::GiveBack).to_vec(), why.into_bytes(), meta];
        let payloads = tasks.iter().map(|t| &t.payload[..]);
        let _ = send_frames(&self.ix, head.iter().map(Vec::as_slice).chain(payloads));
    }

    /// Leave now: hand back every unstarted task, look-aheads included (the workers end
    /// with the pool), tell the interchange why (the tasks still running fail as
    /// ManagerLost with that reason), and stop.
    fn leave(&mut self, why: String) {
        self.ending.get_or_insert_with(|| why.clone());
        // The socket closes as the core stops: give what is sent from here a moment to
        // leave (its linger is 0 otherwise, which would drop the tasks handed back).
        let _ = self.ix.set_linger(2000);
        self.give_back(true, true);
        self.results.send(&self.ix);
        let _ = send_frames(&self.ix, [&header(Kind::Leaving)[..], why.as_bytes()]);
        log::info!("{why}: leaving");
        self.stop = Some(Stopped::Ended(why));
    }

    /// End a worker and everything it started: it is given nothing more (its look-ahead
    /// goes back to the queue), its stream is closed, its process group gets SIGTERM and,
    /// [`KILL_AFTER`] later, SIGKILL (for a child that ignores SIGTERM). The supervisor
    /// restarts it when it reports the death.
    pub(super) fn end_worker(&mut self, token: u64, now: Instant) {
        self.tasks.retire(token);
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.close();
        signal_group(c.pid, libc::SIGTERM);
        self.kills.push((now + KILL_AFTER, c.pid));
    }

    /// Watch each open worker stream for output only while it has some to write, and
    /// stop watching a closed one (its entry stays until its worker's death is reported).
    fn arm_streams(&mut self) {
        for (&token, c) in &mut self.conns {
            let want = if !c.open {
                None
            } else if c.out.is_empty() {
                Some(epoll::IN)
            } else {
                Some(epoll::IN | epoll::OUT)
            };
            if want == c.watched {
                continue;
            }
            let fd = c.stream.as_raw_fd();
            let done = match (c.watched, want) {
                (_, None) => self.ep.delete(fd),
                (None, Some(w)) => self.ep.add(fd, w, token),
                (Some(_), Some(w)) => self.ep.modify(fd, w, token),
            };
            c.watched = want;
            if let Err(e) = done {
                log::error!("cannot watch the stream of pid {}: {e}; ending it", c.pid);
                c.close();
                self.tasks.retire(token);
            }
        }
    }

    fn take_inbox(&mut self) {
        for c in self.shared.inbox.take() {
            match c {
                Command::WorkerDied { pid, exit_code } => self.worker_died(pid, exit_code),
                Command::Stop => self.stop = Some(Stopped::Requested),
                Command::End(why) => self.leave(why),
            }
        }
    }

    /// The supervisor saw process `pid` end. Its stream (and a monitoring stream it may
    /// have opened) is read to the end first: results it sent just before dying are
    /// forwarded, so only a task that really did not finish is lost.
    fn worker_died(&mut self, pid: u32, exit_code: i32) {
        self.counts.deaths += 1;
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
            self.counts.lost += 1;
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

    fn publish_counts(&mut self) {
        let c = &mut self.counts;
        c.queued = self.tasks.queued() as u64;
        c.held = self.tasks.held() as u64;
        c.requeued = self.tasks.requeued();
        c.workers = self.tasks.workers() as u64;
        *self.shared.counts.lock().unwrap() = *c;
    }

    /// Count a message dropped from `peer` (`None`: the interchange, else a worker
    /// stream) and log the first from each peer, as the interchange does.
    pub(super) fn drop_junk(&mut self, peer: Option<u64>, why: &str) {
        self.counts.dropped += 1;
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

    /// Give out queued tasks (idle workers first, then look-aheads) and take back
    /// look-aheads when a worker is idle with nothing queued.
    pub(super) fn dispatch(&mut self) {
        if self.ending.is_some() {
            return; // nothing more starts; unstarted tasks go back to the interchange
        }
        let head = header(Kind::Tasks);
        let mut touched = Vec::new();
        let conns = &mut self.conns;
        let started = &mut self.counts.started;
        let now = Instant::now();
        self.tasks.assign(now, |token, given| {
            let given: Vec<&Task<Bytes>> = given.collect();
            *started += given.len() as u64;
            // A worker never sees a time limit: the pool keeps it.
            let meta = encode_meta(
                &given
                    .iter()
                    .map(|t| (t.id, t.flags & !FLAG_WALLTIME))
                    .collect::<Vec<_>>(),
            );
            // Each payload frame is the task's own buffer, queued by reference; a task with
            // a grant goes with the grant's head in place of its request, then the rest; a
            // task with only a limit, without its head.
            let mut frames: Vec<Vec<Bytes>> = Vec::with_capacity(2 + given.len());
            frames.push(vec![Bytes::copy_from_slice(&head)]);
            frames.push(vec![Bytes::from(meta)]);
            frames.extend(given.iter().map(|t| {
                let rest = || {
                    let (_, rest) = resources::split(&t.payload)?;
                    Some(t.payload.slice_ref(rest))
                };
                if let Some(g) = &t.grant {
                    if let Some(rest) = rest() {
                        return vec![Bytes::from(resources::join(&g.head(), &[])), rest];
                    }
                } else if t.flags & FLAG_WALLTIME != 0 {
                    if let Some(rest) = rest() {
                        return vec![rest];
                    }
                }
                vec![t.payload.clone()]
            }));
            let frames: Vec<&[Bytes]> = frames.iter().map(Vec::as_slice).collect();
            if let Some(c) = conns.get_mut(&token) {
                match c.out.push_message(&frames) {
                    Ok(()) => {}
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
mod loop_tests;
