//! The interchange: a thread that serves the worker port pools connect to (a ZMTP ROUTER
//! of our own, `crate::zmtp::router`, on this thread's epoll), queues tasks by priority,
//! hands them to pools with free capacity in batches, forwards results, and declares
//! silent pools lost. It never touches Python.
//!
//! - `handle.rs`: what other threads call ([`Handle::submit`], [`Handle::wait_events`]).
//! - `dispatch.rs`: which task goes to which pool; pure, tested without sockets.
//! - `pools.rs`: the table of connected pools; `selector.rs`: Parsl's manager selector;
//!   `queue.rs`: tasks in Parsl's priority order.
//! - this file: the loop. It reads the router and the inbox, updates the table, runs a
//!   dispatch pass and writes.

pub mod dispatch;
pub mod handle;
pub mod pools;
pub mod queue;
pub mod selector;
pub mod table;
pub mod taskset;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::logging::FirstSeen;
use crate::protocol::{
    decode_header, decode_meta, encode_meta, header, DecodeError, Kind, Registration,
    PROTOCOL_VERSION,
};
use crate::resources;
use crate::zmtp::router;
use dispatch::{Dispatch, Outbox};
pub use handle::{
    AskError, Command, Config, Event, Handle, NewTask, COMMAND_TIMEOUT, HTEX_RS_VERSION,
};
use handle::{Input, Shared};
pub use pools::NodeInfo;
use pools::Pools;
use queue::PendingTask;
pub use selector::Selector;

pub(crate) struct Interchange {
    config: Config,
    router: router::Router,
    /// The router's refused CURVE clients already counted in `Stats::dropped`.
    refused_seen: u64,
    shared: Arc<Shared>,
    dispatch: Dispatch,
    pools: Pools,
    warned_peers: FirstSeen<Vec<u8>>,
    refused_peers: FirstSeen<Vec<u8>>,
    /// Events of this loop turn (results read, tasks failed), handed over together after
    /// the turn: one trip through the events lock and one wake-up of the submit side per
    /// turn, not per message (with thousands of pools a turn reads many one-result-batch
    /// messages).
    events: Vec<Event>,
    /// The frames of the message being handled, reused from one message to the next.
    frames: Vec<zmq::Message>,
    /// When this loop turn's wait ended.
    now: Instant,
    stop: bool,
}

/// Most messages handled per socket per loop turn, so one busy peer cannot starve timers.
const BATCH: usize = 4096;

impl Interchange {
    fn new(config: Config, router: router::Router, shared: Arc<Shared>) -> Interchange {
        let pools = Pools::new(config.selector, config.node_events);
        Interchange {
            config,
            router,
            refused_seen: 0,
            shared,
            dispatch: Dispatch::default(),
            pools,
            warned_peers: FirstSeen::default(),
            refused_peers: FirstSeen::default(),
            events: Vec::new(),
            frames: Vec::new(),
            now: Instant::now(),
            stop: false,
        }
    }

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
            self.dispatch.run(
                &mut self.pools,
                &mut self.router,
                self.now,
                &mut self.events,
            );
            if !self.events.is_empty() {
                self.shared.emit(self.events.drain(..));
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
                self.pools.report_changed();
            }
            // One write per connection for everything this turn sent it.
            self.router.flush();
            // Not through emit() unconditionally: that takes the events lock every round.
            let nodes = self.pools.take_node_changes();
            if !nodes.is_empty() {
                self.shared.emit(nodes.into_iter().map(Event::Node));
            }
        }
        // Tell every pool to exit now rather than after heartbeat_threshold of silence.
        for id in self.pools.identities() {
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
                    self.dispatch.push(PendingTask {
                        task_id: t.task_id,
                        priority: t.priority,
                        flags: t.flags,
                        payload: t.payload,
                        placed: t.placed,
                    });
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
                let _ = tx.send(self.pools.infos());
            }
            Command::ConnectedBlocks(tx) => {
                let _ = tx.send(self.pools.block_history.clone());
            }
            Command::Packages(tx) => {
                let _ = tx.send(self.pools.packages());
            }
            Command::Hold(uid, tx) => {
                let found = self.pools.hold(&uid);
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
            Kind::Heartbeat => match self.pools.resolve(identity, peer) {
                Some(slot) => {
                    self.pools.touch_at(slot, self.now);
                    let reply = [&header(Kind::HeartbeatReply)[..]];
                    let _ = self.router.send_to(Some(peer), identity, reply);
                }
                None => self.drop_junk(identity, "heartbeat from an unregistered manager"),
            },
            Kind::Results => self.on_results(identity, peer, frames),
            Kind::GiveBack => self.on_give_back(identity, peer, frames),
            Kind::Leaving => self.on_leaving(identity, peer, frames),
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
        if self.pools.get(&identity).is_some() {
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
        self.pools.register(identity, reg);
    }

    fn on_results(&mut self, identity: &[u8], peer: router::Peer, frames: &mut Vec<zmq::Message>) {
        let Some(slot) = self.pools.resolve(identity, peer) else {
            return self.drop_junk(identity, "results from an unregistered manager");
        };
        if frames.len() < 3 {
            return self.drop_junk(identity, "results without a meta frame");
        }
        let meta = match decode_meta(&frames[2], frames.len() - 3) {
            Ok(m) => m,
            Err(e) => return self.drop_junk(identity, &e.to_string()),
        };
        self.pools
            .complete_at(slot, meta.iter().map(|(id, _)| *id), self.now);
        self.shared
            .stats
            .results_forwarded
            .fetch_add(meta.len() as u64, Ordering::Relaxed);
        self.events
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

    /// A pool whose block is ending hands back the tasks it has not started: they go
    /// back to the queue ahead of everything (they had been chosen to run), the pool gets
    /// nothing more, and no retry is spent. Only tasks it really held are taken back.
    fn on_give_back(
        &mut self,
        identity: &[u8],
        peer: router::Peer,
        frames: &mut Vec<zmq::Message>,
    ) {
        let Some(slot) = self.pools.resolve(identity, peer) else {
            return self.drop_junk(identity, "tasks given back by an unregistered manager");
        };
        if frames.len() < 4 {
            return self.drop_junk(identity, "tasks given back without a reason or meta frame");
        }
        let meta = match decode_meta(&frames[3], frames.len() - 4) {
            Ok(m) => m,
            Err(e) => return self.drop_junk(identity, &e.to_string()),
        };
        let reason = String::from_utf8_lossy(&frames[2]).into_owned();
        let held: Vec<bool> = self.pools.at(slot).map_or_else(Vec::new, |p| {
            meta.iter().map(|(id, _)| p.tasks.contains(*id)).collect()
        });
        let ids: Vec<u64> = meta
            .iter()
            .zip(&held)
            .filter(|(_, h)| **h)
            .map(|((id, _), _)| *id)
            .collect();
        self.pools.complete_at(slot, ids.iter().copied(), self.now);
        let uid = self.pools.drain(slot);
        log::info!(
            "Manager {uid} is ending ({reason}); {} unstarted tasks back in the queue",
            ids.len()
        );
        for (((task_id, flags), payload), held) in meta.into_iter().zip(frames.drain(4..)).zip(held)
        {
            if !held {
                self.drop_junk(identity, "a task given back that it did not hold");
                continue;
            }
            let payload = crate::stream::message_bytes(payload);
            let (request, walltime) = resources::head_of(flags, &payload);
            self.dispatch.push(PendingTask::new(
                task_id,
                f64::NEG_INFINITY,
                flags,
                payload,
                request,
                walltime,
            ));
        }
    }

    /// A pool exits now (its block's end): the tasks it still runs fail as ManagerLost,
    /// with the reason it gave, at once rather than a heartbeat threshold later.
    fn on_leaving(&mut self, identity: &[u8], peer: router::Peer, frames: &[zmq::Message]) {
        let Some(slot) = self.pools.resolve(identity, peer) else {
            return self.drop_junk(identity, "a goodbye from an unregistered manager");
        };
        let reason = frames
            .get(2)
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .unwrap_or_default();
        let Some(p) = self.pools.at(slot).map(|p| p.identity.clone()) else {
            return;
        };
        if let Some(p) = self.pools.remove(&p) {
            log::info!(
                "Manager {} on {} left ({reason}); failing the {} tasks it ran with ManagerLost",
                p.reg.uid,
                p.reg.hostname,
                p.tasks.len()
            );
            self.shared.emit([Event::ManagerLost {
                uid: p.reg.uid,
                hostname: p.reg.hostname,
                tasks: p.tasks.into_sorted(),
                reason: Some(reason),
            }]);
        }
    }

    fn expire(&mut self) {
        let lost = self.pools.expire_silent(self.config.heartbeat_threshold);
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
                reason: None,
            }));
        for id in self.pools.drained() {
            log::info!(
                "Manager {:?} drained and idle; telling it to exit",
                String::from_utf8_lossy(&id)
            );
            let _ = self.send(&[&id, &header(Kind::Shutdown)]);
        }
    }
}

/// Dispatch writes to the router: a header, the batch's meta, then each payload.
impl Outbox for router::Router {
    fn send_tasks(
        &mut self,
        peer: Option<router::Peer>,
        identity: &[u8],
        meta: &[(u64, u8)],
        tasks: &[PendingTask],
    ) -> Result<router::Peer, router::NotConnected> {
        let (head, meta) = (header(Kind::Tasks), encode_meta(meta));
        let mut frames = Vec::with_capacity(2 + tasks.len());
        frames.extend([router::Part::Copy(&head), router::Part::Copy(&meta)]);
        frames.extend(tasks.iter().map(|t| router::Part::Shared(&t.payload)));
        self.send_shared(peer, identity, &frames)
    }
}

fn same_minor(a: &str, b: &str) -> bool {
    let mm = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    mm(a) == mm(b)
}

#[cfg(test)]
mod loop_tests;
