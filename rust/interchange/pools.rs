//! The table of registered worker pools (Parsl's "managers"): their outstanding tasks, capacity,
//! heartbeats, drain and hold state, and the order in which they are offered tasks.

// foldhash: the table is looked up several times per message and per task (SipHash was
// a visible share of the interchange thread at 10,000 pools); seeded per process.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::selector::{Candidates, Selector};
use super::table::Table;
use super::taskset::TaskSet;
use crate::protocol::Registration;
use crate::resources::Resources;
use crate::zmtp::router::Peer;

pub struct Pool {
    pub identity: Vec<u8>,
    /// Its slot in the table (`table.rs`), by which the dispatch candidates know it.
    pub slot: u32,
    /// The connection it last spoke on (`None` until it has spoken since registering):
    /// routed by index, not by identity.
    pub peer: Option<Peer>,
    pub reg: Registration,
    pub tasks: TaskSet,
    pub active: bool,
    pub draining: bool,
    pub last_seen: Instant,
    pub idle_since: Option<Instant>,
    /// Node reporting (monitoring on only): tasks sent since the last report, those of
    /// them already done (listed once in the next report all the same), and when the
    /// last report was made.
    unreported: HashSet<u64>,
    done_unreported: Vec<u64>,
    last_report: Instant,
    /// Resources of the tasks it holds that asked for them, and their sum.
    granted: HashMap<u64, Resources>,
    used: Resources,
    /// When its block ends (from its registration's `block_end`), on this clock.
    ends_at: Option<Instant>,
}

/// The time a task limited to `walltime` needs left in a block: its limit, a second to
/// start it, and a twentieth more (a pool's clock and ours, its worker's start-up).
#[must_use]
pub fn time_needed(walltime: Duration) -> Duration {
    walltime + Duration::from_secs(1) + walltime / 20
}

impl Pool {
    /// Time left in its block at `now`; `None`: its end is unknown.
    #[must_use]
    pub fn time_left(&self, now: Instant) -> Option<Duration> {
        self.ends_at.map(|e| e.saturating_duration_since(now))
    }

    /// Its block has time left at `now` for a task limited to `walltime` (any block
    /// whose end is unknown, and any for a task without a limit).
    #[must_use]
    pub fn has_time_for(&self, walltime: Option<Duration>, now: Instant) -> bool {
        match (walltime, self.time_left(now)) {
            (Some(w), Some(left)) => left >= time_needed(w),
            _ => true,
        }
    }

    #[must_use]
    pub fn free_capacity(&self) -> usize {
        (self.reg.max_capacity as usize).saturating_sub(self.tasks.len())
    }

    fn eligible(&self) -> bool {
        self.active && !self.draining && self.free_capacity() > 0
    }

    /// What it can grant in all (nothing if it advertised nothing).
    #[must_use]
    pub fn total(&self) -> Resources {
        self.reg.resources.unwrap_or_default()
    }

    /// What it has not granted to tasks it holds.
    #[must_use]
    pub fn room(&self) -> Resources {
        self.total().minus(&self.used)
    }
}

/// Where a task that asks for resources can go now.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// To the pool in this slot.
    Fits(u32),
    /// Nowhere now; the pool in this slot (the most room among those that could ever
    /// hold it) is the one to keep free for it, if any is.
    Wait(Option<u32>),
    /// No connected manager could ever hold it: the largest one's totals.
    Never(Resources),
}

/// A snapshot of one manager for `connected_managers()`.
#[derive(Debug, Clone)]
pub struct ManagerInfo {
    pub manager: String,
    pub block_id: Option<String>,
    pub worker_count: u32,
    pub tasks: usize,
    pub idle_duration: f64,
    pub active: bool,
    pub draining: bool,
    pub parsl_version: String,
    pub python_version: String,
    pub hostname: String,
    /// Seconds left in its block (`None`: its end is unknown).
    pub time_left: Option<f64>,
}

/// A manager's record for monitoring (Parsl's NODE_INFO, which fills the `node` table and
/// tells Globus Compute endpoints which block each task runs in). Reported when the
/// manager registers, is held or goes (`active` false), and when its task set changes:
/// at once for tasks sent after a quiet spell, then at most once per
/// [`NODE_REPORT_INTERVAL`]. Every task is listed in at least one record: one that
/// started and finished between two reports is listed in the next.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub uid: String,
    pub hostname: String,
    pub block_id: Option<String>,
    pub cpu_count: u32,
    pub total_memory: u64,
    pub worker_count: u32,
    pub max_capacity: u32,
    pub python_version: String,
    pub parsl_version: String,
    pub active: bool,
    pub draining: bool,
    /// The manager's outstanding task ids and those done since the last report, ascending.
    pub tasks: Vec<u64>,
    /// Epoch seconds.
    pub start_time: f64,
    pub last_heartbeat: f64,
    pub idle_since: Option<f64>,
}

/// The shortest gap between two task-set reports of one manager (Parsl's interchange
/// reports on every dispatch and every result; this keeps monitoring off the hot path).
pub const NODE_REPORT_INTERVAL: Duration = Duration::from_millis(100);

impl NodeInfo {
    fn of(m: &Pool, active: bool) -> NodeInfo {
        let epoch = |t: Instant| epoch_now() - t.elapsed().as_secs_f64();
        let mut tasks: Vec<u64> = m
            .tasks
            .iter()
            .chain(m.done_unreported.iter().copied())
            .collect();
        tasks.sort_unstable();
        NodeInfo {
            uid: m.reg.uid.clone(),
            hostname: m.reg.hostname.clone(),
            block_id: m.reg.block_id.clone(),
            cpu_count: m.reg.cpu_count,
            total_memory: m.reg.total_memory,
            worker_count: m.reg.worker_count,
            max_capacity: m.reg.max_capacity,
            python_version: m.reg.python_version.clone(),
            parsl_version: m.reg.parsl_version.clone(),
            active,
            draining: m.draining,
            tasks,
            start_time: m.reg.start_time,
            last_heartbeat: epoch(m.last_seen),
            idle_since: m.idle_since.map(epoch),
        }
    }
}

/// Node reports not yet taken, and the managers whose task set changed since their last.
#[derive(Default)]
struct NodeReports {
    out: Vec<NodeInfo>,
    pending: HashSet<Vec<u8>>,
}

impl NodeReports {
    fn report(&mut self, m: &mut Pool, now: Instant) {
        self.out.push(NodeInfo::of(m, m.active));
        m.unreported.clear();
        m.done_unreported.clear();
        m.last_report = now;
        self.pending.remove(&m.identity);
    }

    fn mark(&mut self, m: &Pool) {
        if !self.pending.contains(&m.identity) {
            self.pending.insert(m.identity.clone());
        }
    }
}

/// Tasks of a manager that was declared lost.
pub struct Lost {
    pub uid: String,
    pub hostname: String,
    pub tasks: Vec<u64>,
}

pub struct Pools {
    map: Table<Pool>,
    /// A connection's index (`Peer::conn`) to the slot of the manager that last spoke on
    /// it ([`NO_SLOT`]: none); checked against the manager's own `peer`.
    by_conn: Vec<u32>,
    /// Pools that may have free capacity, in the selector's order; dispatch looks at
    /// as few of them as the queued tasks need.
    candidates: Candidates,
    selector: Selector,
    /// One block id per registration, duplicates kept (Parsl's `connected_block_history`).
    pub block_history: Vec<String>,
    /// Node reports, when monitoring is on (`None`: not tracked, nothing done).
    reports: Option<NodeReports>,
}

/// An empty entry of `Pools::by_conn`.
const NO_SLOT: u32 = u32::MAX;

#[must_use]
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Pools {
    /// `track_nodes`: collect node changes for Parsl's monitoring (`take_node_changes`).
    #[must_use]
    pub fn new(selector: Selector, track_nodes: bool) -> Self {
        Pools {
            map: Table::default(),
            by_conn: Vec::new(),
            candidates: Candidates::new(selector),
            selector,
            block_history: Vec::new(),
            reports: track_nodes.then(NodeReports::default),
        }
    }

    /// The node reports since the last call (always empty when not tracking).
    pub fn take_node_changes(&mut self) -> Vec<NodeInfo> {
        self.reports
            .as_mut()
            .map(|r| std::mem::take(&mut r.out))
            .unwrap_or_default()
    }

    /// Report the managers whose task set changed and whose last report is at least
    /// [`NODE_REPORT_INTERVAL`] old (called from the interchange's timer).
    pub fn report_changed(&mut self) {
        let Some(r) = self.reports.as_mut().filter(|r| !r.pending.is_empty()) else {
            return;
        };
        let now = Instant::now();
        let due: Vec<Vec<u8>> = r
            .pending
            .iter()
            .filter(|id| {
                self.map
                    .get(id)
                    .is_none_or(|m| now.duration_since(m.last_report) >= NODE_REPORT_INTERVAL)
            })
            .cloned()
            .collect();
        for id in due {
            r.pending.remove(&id);
            if let Some(m) = self.map.get_mut(&id) {
                r.report(m, now);
            }
        }
    }

    pub fn register(&mut self, identity: Vec<u8>, reg: Registration) {
        if let Some(b) = &reg.block_id {
            self.block_history.push(b.clone());
        }
        let now = Instant::now();
        let mut m = Pool {
            identity: identity.clone(),
            slot: 0,
            peer: None,
            reg,
            tasks: TaskSet::default(),
            active: true,
            draining: false,
            last_seen: now,
            idle_since: Some(now),
            unreported: HashSet::new(),
            done_unreported: Vec::new(),
            last_report: now,
            granted: HashMap::new(),
            used: Resources::default(),
            ends_at: None,
        };
        m.ends_at = m.reg.block_end.map(|end| {
            let left = end - epoch_now();
            if left > 0.0 {
                now + Duration::from_secs_f64(left.min(1e9))
            } else {
                now
            }
        });
        if let Some(r) = &mut self.reports {
            r.report(&mut m, now);
            // The first tasks it is sent are reported at once, not an interval later.
            m.last_report = now.checked_sub(NODE_REPORT_INTERVAL).unwrap_or(now);
        }
        let slot = self.map.insert(identity, m);
        if let Some(m) = self.map.at_mut(slot) {
            m.slot = slot;
            self.candidates
                .insert(slot, &m.identity, m.reg.block_id.as_deref());
        }
    }

    #[must_use]
    pub fn get(&self, identity: &[u8]) -> Option<&Pool> {
        self.map.get(identity)
    }

    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The slot of the manager `identity`, which sent a message by `peer`: found by the
    /// connection's index while it stays the manager's connection, else by identity (a
    /// first message, or a pool that reconnected), which makes `peer` its connection.
    pub fn resolve(&mut self, identity: &[u8], peer: Peer) -> Option<u32> {
        let by_conn = self.by_conn.get(peer.conn as usize).copied();
        if let Some(s) = by_conn.filter(|&s| self.map.at(s).is_some_and(|m| m.peer == Some(peer))) {
            return Some(s);
        }
        let s = self.map.slot(identity)?;
        self.bind(s, peer);
        Some(s)
    }

    /// The manager in `slot` is reached by `peer` from now on.
    pub fn bind(&mut self, slot: u32, peer: Peer) {
        let Some(m) = self.map.at_mut(slot) else {
            return;
        };
        m.peer = Some(peer);
        let i = peer.conn as usize;
        if self.by_conn.len() <= i {
            self.by_conn.resize(i + 1, NO_SLOT);
        }
        self.by_conn[i] = slot;
    }

    /// The manager in `slot` was heard from at `now`.
    pub fn touch_at(&mut self, slot: u32, now: Instant) {
        if let Some(m) = self.map.at_mut(slot) {
            m.last_seen = now;
        }
    }

    /// Record finished tasks, reported at `now` (so the manager was heard from); it
    /// becomes a dispatch candidate again.
    pub fn complete_at(
        &mut self,
        slot: u32,
        task_ids: impl IntoIterator<Item = u64>,
        now: Instant,
    ) {
        if let Some(m) = self.map.at_mut(slot) {
            m.last_seen = now;
            let tracking = self.reports.is_some();
            for id in task_ids {
                m.tasks.remove(id);
                if !m.granted.is_empty() {
                    if let Some(r) = m.granted.remove(&id) {
                        m.used = m.used.minus(&r);
                    }
                }
                if tracking && m.unreported.remove(&id) {
                    m.done_unreported.push(id);
                }
            }
            if let Some(r) = &mut self.reports {
                r.mark(m);
            }
            if m.tasks.is_empty() {
                m.idle_since = Some(now);
            }
            self.candidates
                .insert(m.slot, &m.identity, m.reg.block_id.as_deref());
        }
    }

    #[cfg(test)]
    /// The slot of the pool `identity`, if it is registered.
    #[must_use]
    pub fn slot(&self, identity: &[u8]) -> Option<u32> {
        self.map.slot(identity)
    }

    /// Record tasks sent, at `now`, to the pool in `slot`.
    pub fn assign_at(&mut self, slot: u32, task_ids: &[u64], now: Instant) {
        if let Some(m) = self.map.at_mut(slot) {
            m.tasks.extend(task_ids);
            m.idle_since = None;
            if m.free_capacity() == 0 {
                self.candidates.remove(slot);
            }
            if let Some(r) = &mut self.reports {
                if now.duration_since(m.last_report) >= NODE_REPORT_INTERVAL {
                    r.report(m, now);
                } else {
                    m.unreported.extend(task_ids.iter().copied());
                    r.mark(m);
                }
            }
        }
    }

    /// Whether any manager could be sent a task now (active, not draining, a free slot).
    #[must_use]
    pub fn any_eligible(&self) -> bool {
        self.map.values().any(Pool::eligible)
    }

    /// Record a task that asked for `req` sent to the pool in `slot` (after
    /// [`Pools::assign_at`]).
    pub fn grant_at(&mut self, slot: u32, task_id: u64, req: Resources) {
        if let Some(m) = self.map.at_mut(slot) {
            m.used = m.used.plus(&req);
            m.granted.insert(task_id, req);
        }
    }

    /// Where a task asking for `req` can go now, among managers not in `kept` (kept free
    /// for a task ahead of it): the selector's choice among those with a free slot and
    /// room for it (`BlockId`: the highest block; `Random`: any).
    #[must_use]
    pub fn place(
        &self,
        req: &Resources,
        walltime: Option<Duration>,
        kept: &[u32],
        now: Instant,
    ) -> Placement {
        let fitting = self.map.values().filter(|m| {
            m.eligible()
                && req.fits(&m.room())
                && m.has_time_for(walltime, now)
                && !kept.contains(&m.slot)
        });
        let chosen = match self.selector {
            Selector::BlockId => fitting.max_by(|a, b| a.reg.block_id.cmp(&b.reg.block_id)),
            Selector::Random => {
                let all: Vec<&Pool> = fitting.collect();
                (!all.is_empty()).then(|| all[fastrand::usize(..all.len())])
            }
        };
        if let Some(m) = chosen {
            return Placement::Fits(m.slot);
        }
        let could = self
            .map
            .values()
            .filter(|m| req.fits(&m.total()) && m.has_time_for(walltime, now))
            .filter(|m| m.active && !m.draining)
            .max_by_key(|m| (m.room().cores, m.room().gpus, m.room().memory));
        if could.is_none() && !self.map.values().any(|m| req.fits(&m.total())) {
            let largest = self
                .map
                .values()
                .map(Pool::total)
                .max_by_key(|t| (t.cores, t.gpus, t.memory))
                .unwrap_or_default();
            return Placement::Never(largest);
        }
        Placement::Wait(could.map(|m| m.slot))
    }

    /// Pools to offer `queued` tasks to, in the selector's order: as many as it takes
    /// for their free capacity to cover `queued`. Costs O(managers returned), not
    /// O(all managers): saturated ones are not candidates, held and draining ones are
    /// dropped from the candidates when met.
    pub fn dispatch_order(&mut self, queued: usize) -> Vec<u32> {
        let map = &self.map;
        self.candidates.pick(queued, |slot| {
            map.at(slot)
                .filter(|m| m.eligible())
                .map(Pool::free_capacity)
        })
    }

    /// The manager in `slot` (from [`Pools::dispatch_order`]).
    #[must_use]
    pub fn at(&self, slot: u32) -> Option<&Pool> {
        self.map.at(slot)
    }

    pub fn hold(&mut self, uid: &str) -> bool {
        let mut found = false;
        for m in self.map.values_mut() {
            if m.reg.uid == uid {
                m.active = false;
                found = true;
                if let Some(r) = &mut self.reports {
                    r.report(m, Instant::now());
                }
            }
        }
        found
    }

    /// Remove managers silent for longer than `threshold`; return their tasks.
    pub fn expire_silent(&mut self, threshold: Duration) -> Vec<Lost> {
        let now = Instant::now();
        let dead: Vec<Vec<u8>> = self
            .map
            .values()
            .filter(|m| now.duration_since(m.last_seen) > threshold)
            .map(|m| m.identity.clone())
            .collect();
        dead.into_iter()
            .filter_map(|id| self.remove(&id))
            .map(|m| Lost {
                uid: m.reg.uid,
                hostname: m.reg.hostname,
                tasks: m.tasks.into_sorted(),
            })
            .collect()
    }

    /// Mark managers past their drain time as draining; return the identities of
    /// draining managers with no tasks left, removed from the table (to be told to exit).
    pub fn drained(&mut self) -> Vec<Vec<u8>> {
        let now = epoch_now();
        let mut done = Vec::new();
        for m in self.map.values_mut() {
            if !m.draining && m.reg.drain_time.is_some_and(|t| now >= t) {
                m.draining = true;
            }
            if m.draining && m.tasks.is_empty() {
                done.push(m.identity.clone());
            }
        }
        for id in &done {
            self.remove(id);
        }
        done
    }

    /// The pool in `slot` is ending: it gets nothing more (as if draining), and is told
    /// to exit once it holds no task. Its uid, for the log.
    pub fn drain(&mut self, slot: u32) -> String {
        match self.map.at_mut(slot) {
            Some(m) => {
                m.draining = true;
                m.reg.uid.clone()
            }
            None => String::new(),
        }
    }

    pub fn remove(&mut self, identity: &[u8]) -> Option<Pool> {
        let m = self.map.remove(identity);
        if let Some(m) = &m {
            self.candidates.remove(m.slot);
        }
        if let (Some(r), Some(m)) = (&mut self.reports, &m) {
            r.pending.remove(identity);
            if m.active {
                r.out.push(NodeInfo::of(m, false));
            }
        }
        m
    }

    #[must_use]
    pub fn identities(&self) -> Vec<Vec<u8>> {
        self.map.keys().cloned().collect()
    }

    #[must_use]
    pub fn infos(&self) -> Vec<ManagerInfo> {
        let now = Instant::now();
        self.map
            .values()
            .map(|m| ManagerInfo {
                manager: m.reg.uid.clone(),
                block_id: m.reg.block_id.clone(),
                worker_count: m.reg.worker_count,
                tasks: m.tasks.len(),
                idle_duration: m
                    .idle_since
                    .map_or(0.0, |t| now.duration_since(t).as_secs_f64()),
                active: m.active,
                draining: m.draining,
                parsl_version: m.reg.parsl_version.clone(),
                python_version: m.reg.python_version.clone(),
                hostname: m.reg.hostname.clone(),
                time_left: m.time_left(now).map(|d| d.as_secs_f64()),
            })
            .collect()
    }

    #[must_use]
    pub fn packages(&self) -> Vec<(String, String)> {
        self.map
            .values()
            .map(|m| {
                (
                    m.reg.uid.clone(),
                    serde_json::Value::Object(m.reg.packages.clone()).to_string(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(m: &mut Pools, identity: &[u8], ids: impl IntoIterator<Item = u64>) {
        let slot = m.map.slot(identity).expect("a registered manager");
        m.complete_at(slot, ids, Instant::now());
    }

    fn assign(m: &mut Pools, identity: &[u8], ids: &[u64]) {
        let slot = m.slot(identity).expect("a registered pool");
        m.assign_at(slot, ids, Instant::now());
    }

    fn at(m: &Pools, identity: &[u8]) -> u32 {
        m.slot(identity).expect("a registered pool")
    }

    fn reg(uid: &str, block: &str, cap: u32) -> Registration {
        Registration {
            uid: uid.into(),
            block_id: Some(block.into()),
            max_capacity: cap,
            worker_count: cap,
            ..Registration::default()
        }
    }

    /// `dispatch_order` as identities.
    fn order(m: &mut Pools, queued: usize) -> Vec<Vec<u8>> {
        let slots = m.dispatch_order(queued);
        slots
            .into_iter()
            .map(|s| m.at(s).unwrap().identity.clone())
            .collect()
    }

    #[test]
    fn block_selector_prefers_highest_block_string() {
        let mut m = Pools::new(Selector::BlockId, false);
        m.register(b"a".to_vec(), reg("a", "10", 1));
        m.register(b"b".to_vec(), reg("b", "9", 1));
        m.register(b"c".to_vec(), reg("c", "1", 1));
        assert_eq!(
            order(&mut m, 3),
            vec![b"b".to_vec(), b"a".to_vec(), b"c".to_vec()]
        );
        assert_eq!(m.block_history, vec!["10", "9", "1"]);
    }

    #[test]
    fn saturated_held_and_draining_managers_get_nothing() {
        let mut m = Pools::new(Selector::Random, false);
        m.register(b"a".to_vec(), reg("a", "0", 2));
        m.register(b"b".to_vec(), reg("b", "1", 1));
        assign(&mut m, b"a", &[1, 2]);
        assert_eq!(order(&mut m, 10), vec![b"b".to_vec()]);
        assert!(m.hold("b"));
        assert!(m.dispatch_order(10).is_empty());
        complete(&mut m, b"a", [1]);
        assert_eq!(m.get(b"a").unwrap().free_capacity(), 1);
        assert_eq!(order(&mut m, 10), vec![b"a".to_vec()]);
    }

    #[test]
    fn silent_managers_are_lost_with_their_tasks() {
        let mut m = Pools::new(Selector::Random, false);
        m.register(b"a".to_vec(), reg("a", "0", 4));
        assign(&mut m, b"a", &[7, 3]);
        assert!(m.expire_silent(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        let lost = m.expire_silent(Duration::from_millis(1));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].tasks, vec![3, 7]);
        assert!(m.is_empty());
    }

    #[test]
    fn node_changes_only_when_tracked_on_register_hold_and_loss() {
        let mut m = Pools::new(Selector::Random, false);
        m.register(b"a".to_vec(), reg("a", "0", 1));
        m.remove(b"a");
        assert!(
            m.take_node_changes().is_empty(),
            "monitoring off: nothing collected"
        );
        let mut m = Pools::new(Selector::Random, true);
        m.register(b"a".to_vec(), reg("a", "0", 2));
        m.register(b"b".to_vec(), reg("b", "1", 2));
        assert!(m.hold("a"));
        m.remove(b"a"); // already inactive: no second 'inactive' row
        m.remove(b"b");
        let changes = m.take_node_changes();
        let seen: Vec<(String, bool)> = changes.iter().map(|n| (n.uid.clone(), n.active)).collect();
        assert_eq!(
            seen,
            [("a", true), ("b", true), ("a", false), ("b", false)].map(|(u, a)| (u.to_string(), a))
        );
        assert_eq!(changes[0].worker_count, 2);
        assert!(changes[0].last_heartbeat > 1.0e9, "epoch seconds");
        assert!(m.take_node_changes().is_empty(), "taken once");
    }

    #[test]
    fn task_sets_are_reported_coalesced_and_every_task_is_listed() {
        let mut m = Pools::new(Selector::Random, false);
        m.register(b"a".to_vec(), reg("a", "0", 8));
        assign(&mut m, b"a", &[1]);
        complete(&mut m, b"a", [1]);
        m.report_changed();
        assert!(m.take_node_changes().is_empty(), "monitoring off: nothing");

        let mut m = Pools::new(Selector::Random, true);
        m.register(b"a".to_vec(), reg("a", "7", 8));
        assert_eq!(m.take_node_changes().len(), 1, "registration");
        assign(&mut m, b"a", &[1, 2]);
        let first = m.take_node_changes();
        assert_eq!(first.len(), 1, "the first dispatch is reported at once");
        assert_eq!(first[0].tasks, [1, 2]);
        assert_eq!(first[0].block_id.as_deref(), Some("7"));
        assign(&mut m, b"a", &[3]);
        assign(&mut m, b"a", &[4]);
        complete(&mut m, b"a", [2, 3]);
        m.report_changed();
        assert!(
            m.take_node_changes().is_empty(),
            "within the interval: nothing yet"
        );
        std::thread::sleep(NODE_REPORT_INTERVAL);
        m.report_changed();
        let later = m.take_node_changes();
        assert_eq!(later.len(), 1, "one coalesced report of the changes");
        assert_eq!(
            later[0].tasks,
            [1, 3, 4],
            "outstanding, and 3 (done, never listed); not 2 (listed before)"
        );
        m.report_changed();
        assert!(m.take_node_changes().is_empty(), "nothing changed since");
        complete(&mut m, b"a", [1, 4]);
        std::thread::sleep(NODE_REPORT_INTERVAL);
        m.report_changed();
        let idle = m.take_node_changes();
        assert_eq!(idle.len(), 1);
        assert!(
            idle[0].tasks.is_empty(),
            "1 and 4 were listed: an idle manager"
        );
        assign(&mut m, b"a", &[5]);
        assert!(m.take_node_changes().is_empty(), "just reported: waits");
        std::thread::sleep(NODE_REPORT_INTERVAL);
        assign(&mut m, b"a", &[6]);
        let quiet = m.take_node_changes();
        assert_eq!(quiet[0].tasks, [5, 6], "after a quiet spell: at once");
        m.remove(b"a");
        m.report_changed();
        let gone = m.take_node_changes();
        assert_eq!(gone.len(), 1);
        assert!(!gone[0].active);
    }

    fn sized(uid: &str, block: &str, cap: u32, cores: u32, gpus: u32) -> Registration {
        Registration {
            resources: Some(Resources {
                cores,
                memory: 16_000,
                gpus,
            }),
            ..reg(uid, block, cap)
        }
    }

    fn want(cores: u32, gpus: u32) -> Resources {
        Resources {
            cores,
            memory: 0,
            gpus,
        }
    }

    #[test]
    fn resource_tasks_go_where_they_fit_wait_or_never_fit() {
        let mut m = Pools::new(Selector::BlockId, false);
        let none: &[u32] = &[];
        assert_eq!(
            m.place(&want(1, 0), None, none, Instant::now()),
            Placement::Never(Resources::default())
        );
        m.register(b"a".to_vec(), sized("a", "1", 8, 8, 0));
        m.register(b"b".to_vec(), sized("b", "2", 8, 4, 2));
        assert_eq!(
            m.place(&want(2, 0), None, none, Instant::now()),
            Placement::Fits(at(&m, b"b")),
            "highest block"
        );
        assert_eq!(
            m.place(&want(6, 0), None, none, Instant::now()),
            Placement::Fits(at(&m, b"a")),
            "only a has 6"
        );
        assert_eq!(
            m.place(&want(1, 1), None, none, Instant::now()),
            Placement::Fits(at(&m, b"b")),
            "only b has GPUs"
        );
        let largest = Placement::Never(Resources {
            cores: 8,
            memory: 16_000,
            gpus: 0,
        });
        assert_eq!(
            m.place(&want(9, 0), None, none, Instant::now()),
            largest,
            "bigger than every pool"
        );
        assign(&mut m, b"a", &[1]);
        m.grant_at(at(&m, b"a"), 1, want(6, 0));
        assert_eq!(
            m.place(&want(6, 0), None, none, Instant::now()),
            Placement::Wait(Some(at(&m, b"a")))
        );
        assert_eq!(
            m.place(&want(2, 0), None, none, Instant::now()),
            Placement::Fits(at(&m, b"b"))
        );
        let kept = [at(&m, b"b")];
        assert_eq!(
            m.place(&want(2, 0), None, &kept, Instant::now()),
            Placement::Fits(at(&m, b"a")),
            "b kept"
        );
        complete(&mut m, b"a", [1]);
        assert_eq!(
            m.get(b"a").unwrap().room(),
            m.get(b"a").unwrap().total(),
            "released"
        );
        assert_eq!(
            m.place(&want(6, 0), None, none, Instant::now()),
            Placement::Fits(at(&m, b"a"))
        );
        assert!(m.hold("a"));
        assert_eq!(
            m.place(&want(6, 0), None, none, Instant::now()),
            Placement::Wait(None),
            "only a held pool could"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, failure_persistence: None, ..Default::default() })]

        /// Whatever the order of placements, results and losses, no manager is granted
        /// more than its totals, its grants are the sum of its outstanding resource
        /// tasks, and every grant is released when its task ends or its manager goes.
        #[test]
        fn grants_never_exceed_totals_and_are_all_released(
            pools in proptest::collection::vec((1u32..6, 1u32..9, 0u32..3), 1..4),
            ops in proptest::collection::vec((0u32..10, 0u32..3, 0u8..4), 1..80),
        ) {
            let mut m = Pools::new(Selector::Random, false);
            for (i, (cap, cores, gpus)) in pools.iter().enumerate() {
                let id = format!("p{i}");
                m.register(id.clone().into_bytes(), sized(&id, &i.to_string(), *cap, *cores, *gpus));
            }
            let mut outstanding: Vec<(Vec<u8>, u64, Resources)> = Vec::new();
            let mut next = 1u64;
            for (cores, gpus, op) in ops {
                match op {
                    0 | 1 => {
                        let req = want(cores, gpus);
                        if let Placement::Fits(slot) = m.place(&req, None, &[], Instant::now()) {
                            m.assign_at(slot, &[next], Instant::now());
                            m.grant_at(slot, next, req);
                            let id = m.at(slot).unwrap().identity.clone();
                            outstanding.push((id, next, req));
                            next += 1;
                        }
                    }
                    2 if !outstanding.is_empty() => {
                        let (id, t, _) = outstanding.remove(cores as usize % outstanding.len());
                        complete(&mut m, &id, [t]);
                    }
                    3 if !outstanding.is_empty() && cores == 0 => {
                        let (id, _, _) = outstanding[gpus as usize % outstanding.len()].clone();
                        m.remove(&id);
                        outstanding.retain(|(i, _, _)| *i != id);
                    }
                    _ => {}
                }
                for mgr in m.map.values() {
                    let sum = outstanding.iter().filter(|(i, _, _)| *i == mgr.identity)
                        .fold(Resources::default(), |u, (_, _, r)| u.plus(r));
                    proptest::prop_assert_eq!(mgr.used, sum);
                    proptest::prop_assert!(mgr.used.fits(&mgr.total()));
                    proptest::prop_assert!(mgr.tasks.len() <= mgr.reg.max_capacity as usize);
                }
            }
            for (id, t, _) in outstanding.drain(..) {
                complete(&mut m, &id, [t]);
            }
            for mgr in m.map.values() {
                proptest::prop_assert_eq!(mgr.used, Resources::default());
                proptest::prop_assert!(mgr.granted.is_empty());
            }
        }
    }

    #[test]
    fn drained_idle_managers_are_removed() {
        let mut m = Pools::new(Selector::Random, false);
        let mut r = reg("a", "0", 1);
        r.drain_time = Some(0.0);
        m.register(b"a".to_vec(), r);
        assign(&mut m, b"a", &[1]);
        assert!(m.drained().is_empty());
        assert!(m.get(b"a").unwrap().draining);
        complete(&mut m, b"a", [1]);
        assert_eq!(m.drained(), vec![b"a".to_vec()]);
        assert!(m.is_empty());
    }
}
