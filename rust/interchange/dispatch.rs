//! Dispatch: which queued task goes to which pool. One pass decides from the pool table,
//! the queues and the turn's clock alone, writes each pool's batch to an [`Outbox`] (the
//! router in the interchange's loop, a recorder in tests) and reports what it could not
//! deliver as [`Event`]s. It reads no socket and no clock, so every rule below has an
//! exact unit test.
//!
//! Rules, in the order a pass applies them:
//! - Tasks that ask for resources go first, in priority order, each to a pool with a free
//!   slot and room for it (the selector's choice among those).
//! - One that fits nowhere now waits; tasks behind it may take the room it waits for
//!   (backfill) until it has waited [`BACKFILL_WINDOW`], then the pool with the most room
//!   among those that could ever hold it is kept for it, so its wait is bounded by the
//!   tasks already running there.
//! - One that no connected pool could ever hold fails at once (`STATUS_UNPLACEABLE`).
//! - Plain tasks then fill the free capacity of pools in the selector's order
//!   (`Pools::dispatch_order`), one batch per pool, in priority order.
//! - A pool the outbox refuses (its connection is gone) is forgotten: its batch goes back
//!   to the queue and the tasks it already held are reported lost.

use std::time::{Duration, Instant};

use super::handle::Event;
use super::pools::{Placement, Pools};
use super::queue::{PendingTask, TaskQueue};
use crate::protocol::STATUS_UNPLACEABLE;
use crate::zmtp::router::{NotConnected, Peer};

/// How long a task that asks for resources lets later ones take the room it waits for.
pub const BACKFILL_WINDOW: Duration = Duration::from_millis(200);
/// Most tasks asking for resources looked at per pass.
const SIZED_SCAN: usize = 1024;

/// Where dispatch sends batches.
pub trait Outbox {
    /// Send `tasks` with their `(task id, flags)` meta to the pool `identity`, by `peer`
    /// when known (else by identity), and return the connection used. Refused whole,
    /// before anything is queued, when the pool is not connected.
    fn send_tasks(
        &mut self,
        peer: Option<Peer>,
        identity: &[u8],
        meta: &[(u64, u8)],
        tasks: &[PendingTask],
    ) -> Result<Peer, NotConnected>;
}

/// The queued tasks and the pass that hands them to pools.
#[derive(Default)]
pub struct Dispatch {
    /// Tasks without a resource request or a time limit.
    plain: TaskQueue,
    /// Tasks with a resource request or a time limit, each matched to a pool with room
    /// and time for it before `plain`.
    sized: TaskQueue,
    /// A task joined `sized` since the last pass (it may be bigger than every pool).
    sized_new: bool,
    /// A batch, its meta and its task ids, reused from one batch to the next.
    batch: Vec<PendingTask>,
    meta: Vec<(u64, u8)>,
    ids: Vec<u64>,
}

impl Dispatch {
    pub fn push(&mut self, task: PendingTask) {
        if task.placed.is_some() {
            self.sized_new = true;
            self.sized.push(task);
        } else {
            self.plain.push(task);
        }
    }

    #[cfg(test)]
    /// Tasks waiting for a pool.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.plain.len() + self.sized.len()
    }

    /// One pass at `now`: send what can go, append what failed to `events`.
    pub fn run(
        &mut self,
        pools: &mut Pools,
        out: &mut impl Outbox,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        self.run_sized(pools, out, now, events);
        self.run_plain(pools, out, now, events);
    }

    fn run_plain(
        &mut self,
        pools: &mut Pools,
        out: &mut impl Outbox,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        if self.plain.is_empty() {
            return;
        }
        let Dispatch {
            plain: queue,
            batch,
            meta,
            ids,
            ..
        } = self;
        for slot in pools.dispatch_order(queue.len()) {
            if queue.is_empty() {
                break;
            }
            let Some(pool) = pools.at(slot) else {
                continue;
            };
            let n = pool.free_capacity().min(queue.len());
            batch.clear();
            batch.extend((0..n).map_while(|_| queue.pop()));
            meta.clear();
            meta.extend(batch.iter().map(|t| (t.task_id, t.flags)));
            if let Ok(peer) = out.send_tasks(pool.peer, &pool.identity, meta, batch) {
                if pool.peer != Some(peer) {
                    pools.bind(slot, peer);
                }
                ids.clear();
                ids.extend(meta.iter().map(|(i, _)| *i));
                pools.assign_at(slot, ids, now);
            } else {
                ids.clear();
                ids.extend(meta.iter().map(|(i, _)| *i));
                for t in batch.drain(..) {
                    queue.push(t);
                }
                forget(pools, slot, ids, events);
            }
        }
        batch.clear();
    }

    fn run_sized(
        &mut self,
        pools: &mut Pools,
        out: &mut impl Outbox,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        if self.sized.is_empty() || pools.is_empty() {
            return;
        }
        // Every pool busy and every waiting task seen before: nothing can change.
        if !std::mem::take(&mut self.sized_new) && !pools.any_eligible() {
            return;
        }
        let mut kept: Vec<u32> = Vec::new();
        let mut waiting: Vec<PendingTask> = Vec::new();
        let mut batches: Vec<(u32, Vec<PendingTask>)> = Vec::new();
        for _ in 0..SIZED_SCAN {
            let Some(mut t) = self.sized.pop() else { break };
            let placed = t.placed.as_deref().copied().unwrap_or_default();
            let req = placed.request.unwrap_or_default();
            match pools.place(&req, placed.walltime, &kept, now) {
                Placement::Fits(slot) => {
                    pools.assign_at(slot, &[t.task_id], now);
                    pools.grant_at(slot, t.task_id, req);
                    if let Some(p) = t.placed.as_mut() {
                        p.blocked_since = None;
                    }
                    match batches.iter_mut().find(|(s, _)| *s == slot) {
                        Some((_, v)) => v.push(t),
                        None => batches.push((slot, vec![t])),
                    }
                }
                Placement::Wait(keep) => {
                    let since = t
                        .placed
                        .as_mut()
                        .map_or(now, |p| *p.blocked_since.get_or_insert(now));
                    if let Some(k) = keep.filter(|_| now.duration_since(since) >= BACKFILL_WINDOW) {
                        if !kept.contains(&k) {
                            kept.push(k);
                        }
                    }
                    waiting.push(t);
                }
                Placement::Never(largest) => events.push(unplaceable(
                    t.task_id,
                    format!(
                        "it asks for {req}, more than any connected pool has (the largest: \
                         {largest}); ask for less, or give the pools more (workers per node, \
                         a larger node, available_accelerators)"
                    ),
                )),
            }
        }
        for t in waiting {
            self.sized.push(t);
        }
        for (slot, batch) in batches {
            let Some(pool) = pools.at(slot) else { continue };
            let meta: Vec<(u64, u8)> = batch.iter().map(|t| (t.task_id, t.flags)).collect();
            if let Ok(peer) = out.send_tasks(pool.peer, &pool.identity, &meta, &batch) {
                if pool.peer != Some(peer) {
                    pools.bind(slot, peer);
                }
            } else {
                let ids: Vec<u64> = meta.iter().map(|(i, _)| *i).collect();
                for t in batch {
                    self.sized.push(t);
                }
                forget(pools, slot, &ids, events);
            }
        }
    }
}

/// The pool in `slot` is gone (the outbox refused it): forget it and report the tasks it
/// held lost, except `requeued`, which were never delivered and wait for another pool.
fn forget(pools: &mut Pools, slot: u32, requeued: &[u64], events: &mut Vec<Event>) {
    let Some(identity) = pools.at(slot).map(|p| p.identity.clone()) else {
        return;
    };
    if let Some(p) = pools.remove(&identity) {
        log::warn!("Manager {} is unreachable; removed", p.reg.uid);
        let mut tasks = p.tasks.into_sorted();
        tasks.retain(|id| !requeued.contains(id));
        events.push(Event::ManagerLost {
            uid: p.reg.uid,
            hostname: p.reg.hostname,
            tasks,
            reason: None,
        });
    }
}

/// A task that fails at once, with `message` for its exception.
fn unplaceable(task_id: u64, message: String) -> Event {
    log::warn!("Task {task_id} failed: {message}");
    Event::Result {
        task_id,
        status: STATUS_UNPLACEABLE,
        payload: zmq::Message::from(message.into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interchange::selector::Selector;
    use crate::protocol::Registration;
    use crate::resources::Resources;

    /// An outbox that records each batch and refuses the identities in `gone`.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<(Vec<u8>, Vec<u64>)>,
        gone: Vec<Vec<u8>>,
    }

    impl Outbox for Recorder {
        fn send_tasks(
            &mut self,
            _peer: Option<Peer>,
            identity: &[u8],
            meta: &[(u64, u8)],
            tasks: &[PendingTask],
        ) -> Result<Peer, NotConnected> {
            if self.gone.iter().any(|g| g == identity) {
                return Err(NotConnected);
            }
            assert_eq!(meta.len(), tasks.len());
            assert!(meta.iter().zip(tasks).all(|(m, t)| m.0 == t.task_id));
            self.sent
                .push((identity.to_vec(), meta.iter().map(|m| m.0).collect()));
            Ok(Peer { conn: 0, gen: 0 })
        }
    }

    impl Recorder {
        /// Batches sent since the last call, as (pool, task ids).
        fn take(&mut self) -> Vec<(String, Vec<u64>)> {
            self.sent
                .drain(..)
                .map(|(i, t)| (String::from_utf8(i).unwrap(), t))
                .collect()
        }
    }

    fn plain(id: u64, priority: f64) -> PendingTask {
        PendingTask::new(id, priority, 0, bytes::Bytes::new(), None, None)
    }

    fn sized(id: u64, cores: u32) -> PendingTask {
        let request = Resources {
            cores,
            memory: 0,
            gpus: 0,
        };
        PendingTask::new(
            id,
            f64::INFINITY,
            0,
            bytes::Bytes::new(),
            Some(request),
            None,
        )
    }

    fn pool(pools: &mut Pools, uid: &str, block: &str, capacity: u32, cores: Option<u32>) {
        register(
            pools,
            Registration {
                resources: cores.map(|cores| Resources {
                    cores,
                    memory: 1000,
                    gpus: 0,
                }),
                ..registration(uid, block, capacity)
            },
        );
    }

    fn registration(uid: &str, block: &str, capacity: u32) -> Registration {
        Registration {
            uid: uid.into(),
            block_id: Some(block.into()),
            max_capacity: capacity,
            worker_count: capacity,
            ..Registration::default()
        }
    }

    fn register(pools: &mut Pools, reg: Registration) {
        pools.register(reg.uid.as_bytes().to_vec(), reg);
    }

    fn done(pools: &mut Pools, uid: &str, ids: &[u64], now: Instant) {
        let slot = pools.slot(uid.as_bytes()).unwrap();
        pools.complete_at(slot, ids.iter().copied(), now);
    }

    fn unplaced(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Result {
                    task_id,
                    status: STATUS_UNPLACEABLE,
                    ..
                } => Some(*task_id),
                _ => None,
            })
            .collect()
    }

    struct Bench {
        d: Dispatch,
        pools: Pools,
        out: Recorder,
        events: Vec<Event>,
        now: Instant,
    }

    impl Bench {
        fn new() -> Bench {
            Bench {
                d: Dispatch::default(),
                pools: Pools::new(Selector::BlockId, false),
                out: Recorder::default(),
                events: Vec::new(),
                now: Instant::now(),
            }
        }

        fn pass(&mut self) -> Vec<(String, Vec<u64>)> {
            self.d
                .run(&mut self.pools, &mut self.out, self.now, &mut self.events);
            self.out.take()
        }
    }

    fn batch(uid: &str, ids: &[u64]) -> (String, Vec<u64>) {
        (uid.to_string(), ids.to_vec())
    }

    #[test]
    fn plain_tasks_fill_pools_in_selector_order_in_priority_order() {
        let mut b = Bench::new();
        pool(&mut b.pools, "low", "1", 2, None);
        pool(&mut b.pools, "high", "2", 3, None);
        for (id, p) in [
            (1, f64::INFINITY),
            (2, 5.0),
            (3, 1.0),
            (4, 5.0),
            (5, 0.0),
            (6, 9.0),
        ] {
            b.d.push(plain(id, p));
        }
        // Highest block first, up to its free capacity; then the next.
        assert_eq!(
            b.pass(),
            vec![batch("high", &[5, 3, 2]), batch("low", &[4, 6])]
        );
        assert_eq!(b.d.queued(), 1);
        assert!(b.pass().is_empty(), "every pool full");
        done(&mut b.pools, "low", &[4], b.now);
        assert_eq!(b.pass(), vec![batch("low", &[1])]);
        assert_eq!(b.d.queued(), 0);
        assert!(b.events.is_empty());
    }

    fn limited(id: u64, secs: u64) -> PendingTask {
        let walltime = Some(Duration::from_secs(secs));
        PendingTask::new(id, f64::INFINITY, 0, bytes::Bytes::new(), None, walltime)
    }

    /// A pool whose block ends `secs` from now.
    fn ending(pools: &mut Pools, uid: &str, block: &str, capacity: u32, secs: f64) {
        register(
            pools,
            Registration {
                block_end: Some(crate::interchange::pools::epoch_now() + secs),
                ..registration(uid, block, capacity)
            },
        );
    }

    #[test]
    fn a_task_with_a_walltime_goes_only_to_a_block_with_time_left_for_it() {
        let mut b = Bench::new();
        // The selector prefers the highest block: "short", which ends in 60 s.
        ending(&mut b.pools, "long", "1", 4, 3600.0);
        ending(&mut b.pools, "short", "2", 4, 60.0);
        b.d.push(limited(1, 1800)); // only "long" has time for it
        b.d.push(limited(2, 30)); // both have: the selector's choice
        b.d.push(plain(3, f64::INFINITY)); // no limit: anywhere
        b.d.push(limited(4, 100_000)); // nobody has: it waits
        assert_eq!(
            b.pass(),
            vec![
                batch("long", &[1]),
                batch("short", &[2]),
                batch("short", &[3])
            ]
        );
        assert_eq!(b.d.queued(), 1);
        assert!(
            b.events.is_empty(),
            "a task no block has time for waits, never fails"
        );
        // A pool whose end is unknown (no batch system said) takes it.
        pool(&mut b.pools, "unknown", "3", 1, None);
        assert_eq!(b.pass(), vec![batch("unknown", &[4])]);
    }

    #[test]
    fn the_margin_covers_a_task_s_start_and_the_two_clocks() {
        let mut pools = Pools::new(Selector::BlockId, false);
        ending(&mut pools, "p", "1", 1, 100.0);
        let now = Instant::now();
        let p = pools.get(b"p").unwrap();
        assert!(p.time_left(now).unwrap() <= Duration::from_secs(100));
        assert!(p.has_time_for(Some(Duration::from_secs(90)), now));
        // 95 s + 1 s + 95/20 s > 100 s.
        assert!(!p.has_time_for(Some(Duration::from_secs(95)), now));
        assert!(p.has_time_for(None, now));
    }

    #[test]
    fn held_and_draining_pools_get_nothing() {
        let mut b = Bench::new();
        pool(&mut b.pools, "held", "3", 4, None);
        pool(&mut b.pools, "open", "1", 4, None);
        assert!(b.pools.hold("held"));
        b.d.push(plain(1, 0.0));
        assert_eq!(b.pass(), vec![batch("open", &[1])]);
        done(&mut b.pools, "open", &[1], b.now);
        assert!(b.pools.hold("open"));
        b.d.push(plain(2, 0.0));
        assert!(b.pass().is_empty());
        assert_eq!(b.d.queued(), 1, "kept, not lost");
    }

    #[test]
    fn an_unreachable_pool_is_forgotten_its_batch_requeued_and_its_held_tasks_lost() {
        let mut b = Bench::new();
        pool(&mut b.pools, "a", "2", 2, None);
        pool(&mut b.pools, "b", "1", 2, None);
        b.d.push(plain(1, 0.0));
        assert_eq!(b.pass(), vec![batch("a", &[1])]);
        b.out.gone.push(b"a".to_vec());
        for id in 2..=4 {
            b.d.push(plain(id, 0.0));
        }
        // a refuses [2]: 2 goes back and on to b with 3; 4 waits.
        assert_eq!(b.pass(), vec![batch("b", &[2, 3])]);
        assert_eq!(b.pools.len(), 1);
        assert!(matches!(
            &b.events[..],
            [Event::ManagerLost { uid, tasks, .. }] if uid == "a" && tasks == &[1]
        ));
        assert_eq!(b.d.queued(), 1);
    }

    #[test]
    fn an_unreachable_pool_loses_no_sized_task_that_was_never_sent() {
        let mut b = Bench::new();
        pool(&mut b.pools, "a", "1", 4, Some(4));
        b.out.gone.push(b"a".to_vec());
        b.d.push(sized(1, 2));
        assert!(b.pass().is_empty());
        assert!(matches!(
            &b.events[..],
            [Event::ManagerLost { tasks, .. }] if tasks.is_empty()
        ));
        assert_eq!(b.d.queued(), 1, "waits for the next pool");
        b.events.clear();
        pool(&mut b.pools, "c", "1", 4, Some(4));
        assert_eq!(b.pass(), vec![batch("c", &[1])]);
    }

    #[test]
    fn sized_tasks_go_where_they_fit_before_plain_ones_take_the_slots() {
        let mut b = Bench::new();
        pool(&mut b.pools, "small", "2", 4, Some(2));
        pool(&mut b.pools, "big", "1", 4, Some(8));
        b.d.push(plain(1, 0.0));
        b.d.push(sized(2, 6));
        b.d.push(sized(3, 2));
        b.d.push(sized(4, 2));
        // In task id order: 2 fits only big; 3 takes small (the highest block with
        // room), which leaves 4 only big. The plain task takes a slot of small after.
        assert_eq!(
            b.pass(),
            vec![
                batch("big", &[2, 4]),
                batch("small", &[3]),
                batch("small", &[1])
            ]
        );
        assert!(b.events.is_empty());
    }

    #[test]
    fn a_sized_task_bigger_than_every_pool_fails_at_once() {
        let mut b = Bench::new();
        b.d.push(sized(1, 64));
        assert!(b.pass().is_empty(), "no pool yet: it waits");
        assert!(b.events.is_empty());
        pool(&mut b.pools, "p", "1", 4, Some(8));
        assert!(b.pass().is_empty());
        assert_eq!(unplaced(&b.events), vec![1]);
        assert_eq!(b.d.queued(), 0);
    }

    #[test]
    fn backfill_runs_until_the_window_then_the_pool_is_kept_for_the_waiting_task() {
        let mut b = Bench::new();
        pool(&mut b.pools, "p", "1", 8, Some(4));
        b.d.push(sized(1, 3));
        assert_eq!(b.pass(), vec![batch("p", &[1])]);
        // 2 needs all 4 cores: it waits; 3 (1 core) backfills beside 1.
        b.d.push(sized(2, 4));
        b.d.push(sized(3, 1));
        assert_eq!(b.pass(), vec![batch("p", &[3])]);
        done(&mut b.pools, "p", &[3], b.now);
        b.now += BACKFILL_WINDOW;
        // 2 has waited the window: p is kept for it, 4 may not take the freed core.
        b.d.push(sized(4, 1));
        assert!(b.pass().is_empty());
        assert_eq!(b.d.queued(), 2);
        done(&mut b.pools, "p", &[1], b.now);
        assert_eq!(b.pass(), vec![batch("p", &[2])]);
        done(&mut b.pools, "p", &[2], b.now);
        assert_eq!(b.pass(), vec![batch("p", &[4])]);
        assert!(b.events.is_empty());
    }

    #[test]
    fn a_task_that_waited_does_not_keep_a_pool_before_the_window() {
        let mut b = Bench::new();
        pool(&mut b.pools, "p", "1", 8, Some(4));
        b.d.push(sized(1, 4));
        assert_eq!(b.pass(), vec![batch("p", &[1])]);
        b.d.push(sized(2, 4));
        assert!(b.pass().is_empty());
        b.now += BACKFILL_WINDOW
            .checked_sub(Duration::from_millis(1))
            .unwrap();
        done(&mut b.pools, "p", &[1], b.now);
        // Lower task id, same priority: 2 pops first and takes the room itself.
        b.d.push(sized(3, 1));
        assert_eq!(b.pass(), vec![batch("p", &[2])]);
        assert_eq!(b.d.queued(), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, failure_persistence: None, ..Default::default() })]

        /// Whatever arrives and finishes, every task is sent once, failed once or still
        /// queued; no pool holds more than its capacity or is granted more than it has.
        #[test]
        fn every_task_is_accounted_for_once_and_no_pool_is_overfilled(
            pools in proptest::collection::vec((1u32..4, proptest::option::of(1u32..6)), 1..4),
            ops in proptest::collection::vec((0u8..4, 0u32..8, 0u64..50), 1..120),
        ) {
            let mut b = Bench::new();
            for (i, (cap, cores)) in pools.iter().enumerate() {
                pool(&mut b.pools, &format!("p{i}"), &i.to_string(), *cap, *cores);
            }
            let mut next = 1u64;
            let mut sent: Vec<(String, u64)> = Vec::new();
            let mut finished = 0usize;
            for (op, cores, pick) in ops {
                match op {
                    0 => { b.d.push(plain(next, f64::from(cores % 3))); next += 1; }
                    1 => { b.d.push(sized(next, cores)); next += 1; }
                    2 if !sent.is_empty() => {
                        let (uid, id) = sent.remove(usize::try_from(pick).unwrap() % sent.len());
                        done(&mut b.pools, &uid, &[id], b.now);
                        finished += 1;
                    }
                    _ => b.now += Duration::from_millis(50),
                }
                for (uid, ids) in b.pass() {
                    sent.extend(ids.into_iter().map(|i| (uid.clone(), i)));
                }
                for (uid, _) in &sent {
                    let p = b.pools.at(b.pools.slot(uid.as_bytes()).unwrap()).unwrap();
                    proptest::prop_assert!(p.tasks.len() <= p.reg.max_capacity as usize);
                }
            }
            let failed = unplaced(&b.events).len();
            let total = usize::try_from(next - 1).unwrap();
            proptest::prop_assert_eq!(finished + sent.len() + failed + b.d.queued(), total);
            let mut ids: Vec<u64> = sent.iter().map(|s| s.1).collect();
            ids.extend(unplaced(&b.events));
            ids.sort_unstable();
            let before = ids.len();
            ids.dedup();
            proptest::prop_assert_eq!(before, ids.len());
        }
    }
}
