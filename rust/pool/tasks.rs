//! The pool's tasks, owned in one place: one queue in the order the interchange sent them
//! (Parsl's priority order) and, per worker, the tasks it holds in the order it runs them:
//! the first is running, the rest (at most `LOOKAHEAD`) wait in the worker so it never
//! idles for a round trip between short tasks. A look-ahead is only given while no worker
//! is idle, only to a worker whose last task was short (`QUICK`): for longer tasks the
//! round trip it hides is noise, and only once the worker's look-ahead has run down to
//! half, then topped up to an even share of the queue, so tasks travel several to a
//! message (one message per task cost a fifth of the prefetch-64 throughput). It is
//! taken back (`reclaims`, `returned`) as soon as a worker is idle with nothing queued, so
//! no idle worker waits while another holds unstarted tasks, and once the task ahead of
//! it has run for `STALE`, so a task never waits long behind a long one while later
//! tasks run elsewhere (priority order). A dead worker's running task is lost; its
//! unstarted ones go back to the front of the queue.
//!
//! A task that asks for resources (cores, memory, GPUs; [`crate::resources`]) is given
//! only to an idle worker and only with a grant from the pool's [`Allocator`] (its CPUs
//! and accelerators, released when its result arrives or its worker dies); one that
//! does not fit now lets the tasks behind it go first. It is never a look-ahead, and its
//! worker gets no look-ahead while it runs: a task waiting behind it would wait for all
//! of it. The interchange sends such a task only when its grants here leave room, so
//! the wait is for a worker, not for resources.
//!
//! A task with a time limit (`walltime`) is watched from the moment it runs (given to
//! an idle worker, or the result ahead of it arrived): past its limit it is taken from
//! its worker ([`Tasks::overdue`]), whose look-ahead goes back to the queue, and the core
//! ends that worker.
//!
//! Workers are keys (the core's stream tokens), not identities: a restarted worker that
//! registers under its predecessor's rank before that death is reported is a new key.

use std::cmp::Reverse;
use std::collections::{vec_deque, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::resources::{Allocator, Grant, Resources};

/// Tasks a worker may hold beyond the one it runs.
pub const LOOKAHEAD: usize = 8;
/// A worker whose last task ran shorter than this gets a look-ahead.
pub const QUICK: Duration = Duration::from_millis(2);
/// A look-ahead is taken back once the task ahead of it has run this long.
pub const STALE: Duration = Duration::from_millis(10);

/// A task: its id, the flags of its meta entry, its opaque payload, and what it asks
/// for and was granted (tasks that ask for nothing: `None`, `None`).
pub struct Task<P> {
    pub id: u64,
    pub flags: u8,
    pub payload: P,
    pub request: Option<Resources>,
    pub grant: Option<Grant>,
    /// How long it may run (`None`: no limit).
    pub walltime: Option<Duration>,
}

impl<P> Task<P> {
    #[must_use]
    pub fn new(id: u64, flags: u8, payload: P, request: Option<Resources>) -> Task<P> {
        Task {
            id,
            flags,
            payload,
            request,
            grant: None,
            walltime: None,
        }
    }

    #[must_use]
    pub fn limited(mut self, walltime: Option<Duration>) -> Task<P> {
        self.walltime = walltime;
        self
    }
}

/// A task taken from its worker for running past its limit ([`Tasks::overdue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    pub worker: u64,
    pub task_id: u64,
    pub limit: Duration,
    /// How long it had run.
    pub ran: Duration,
}

struct Held<P> {
    /// In the order the worker runs them; the first is running.
    tasks: VecDeque<Task<P>>,
    /// A reclaim was sent and not yet answered: give this worker nothing more until then.
    reclaiming: bool,
    /// When the first task became the one it runs (given to an idle worker, or the
    /// previous task's result arrived).
    since: Instant,
    /// Its last task ran shorter than `QUICK`.
    quick: bool,
}

pub struct Tasks<P> {
    queue: VecDeque<Task<P>>,
    held: HashMap<u64, Held<P>>,
    /// Idle workers in the order they became idle; `idle_set` is the same set, for
    /// O(1) removal (stale entries in `idle` are skipped when popped).
    idle: VecDeque<u64>,
    idle_set: HashSet<u64>,
    /// Workers that may be given tasks (registered, stream open).
    usable: HashSet<u64>,
    /// Tasks that went back to the queue unstarted, so far.
    requeued: u64,
    /// The pool's CPUs, memory and accelerators, for tasks that ask for them.
    alloc: Allocator,
    /// Running tasks with a limit: (when it runs out, worker, task id), soonest first. An
    /// entry whose task is no longer its worker's running one is skipped when reached.
    deadlines: BinaryHeap<Reverse<(Instant, u64, u64)>>,
}

impl<P> Default for Tasks<P> {
    fn default() -> Self {
        Tasks::new(Allocator::new(Vec::new(), 0, Vec::new()))
    }
}

impl<P> Tasks<P> {
    #[must_use]
    pub fn new(alloc: Allocator) -> Self {
        Tasks {
            queue: VecDeque::new(),
            held: HashMap::new(),
            idle: VecDeque::new(),
            idle_set: HashSet::new(),
            usable: HashSet::new(),
            requeued: 0,
            alloc,
            deadlines: BinaryHeap::new(),
        }
    }

    /// A task from the interchange: behind everything queued.
    pub fn push(&mut self, task: Task<P>) {
        self.queue.push_back(task);
    }

    /// A worker that registered: idle until given a task.
    pub fn add_worker(&mut self, worker: u64) {
        self.usable.insert(worker);
        self.held.entry(worker).or_insert_with(|| Held {
            tasks: VecDeque::new(),
            reclaiming: false,
            since: Instant::now(),
            quick: false,
        });
        self.make_idle(worker);
    }

    /// A worker whose stream ended: give it nothing more, and put its look-ahead back at
    /// the front of the queue (a worker starts no task once its stream has ended, and runs
    /// its tasks in order, so only the first can have started). The first stays its own
    /// until its death is reported ([`Tasks::remove_worker`]) or its result arrives.
    pub fn retire(&mut self, worker: u64) {
        self.usable.remove(&worker);
        self.idle_set.remove(&worker);
        let Some(h) = self.held.get_mut(&worker) else {
            return;
        };
        let back: Vec<Task<P>> = h.tasks.drain(1.min(h.tasks.len())..).collect();
        self.requeue_front(back);
    }

    /// Unstarted tasks back at the front of the queue, in their order.
    fn requeue_front(&mut self, back: Vec<Task<P>>) {
        self.requeued += back.len() as u64;
        for mut t in back.into_iter().rev() {
            self.release(&mut t);
            self.queue.push_front(t);
        }
    }

    fn release(&mut self, t: &mut Task<P>) {
        if let Some(g) = t.grant.take() {
            self.alloc.release(&g);
        }
    }

    /// How many of the first `at_most` queued tasks ask for no resources before the
    /// first that does (what may go as a look-ahead).
    fn plain_prefix(&self, at_most: usize) -> usize {
        self.queue
            .iter()
            .take(at_most)
            .take_while(|t| t.request.is_none())
            .count()
    }

    /// Bring the first task an idle worker can take now to the front of the queue (with
    /// its grant, if it asks for resources): the front one unless it asks for more than
    /// is free. False if none can go.
    fn next_for_idle(&mut self) -> bool {
        if self.queue.front().is_some_and(|t| t.request.is_none()) {
            return true;
        }
        let free = self.alloc.free();
        let Some(at) = self
            .queue
            .iter()
            .position(|t| t.request.is_none_or(|r| r.fits(&free)))
        else {
            return false;
        };
        let mut t = self.queue.remove(at).expect("found above");
        if let Some(r) = t.request {
            t.grant = self.alloc.grant(&r);
        }
        self.queue.push_front(t);
        true
    }

    /// Give out queued tasks: first one to each idle worker (the longest idle first),
    /// then, only while none is idle, look-aheads to busy quick workers: a worker whose
    /// look-ahead has run down to half of `LOOKAHEAD` is topped up, to an even share of
    /// the queue (at most `LOOKAHEAD`), so tasks travel to a worker several at a time.
    /// `send` is called once per worker given tasks, with those tasks; they stay held
    /// here until they end.
    pub fn assign(
        &mut self,
        now: Instant,
        mut send: impl FnMut(u64, vec_deque::Iter<'_, Task<P>>),
    ) {
        while !self.queue.is_empty() {
            let Some(&w) = self.idle.front() else {
                break;
            };
            if !self.idle_set.contains(&w) {
                self.idle.pop_front(); // stale
                continue;
            }
            if !self.next_for_idle() {
                break; // all queued tasks wait for resources held by running ones
            }
            self.idle.pop_front();
            self.idle_set.remove(&w);
            if let Some(h) = self.held.get_mut(&w) {
                h.since = now;
            }
            self.give(w, 1, &mut send);
            self.watch_running(w);
        }
        if self.queue.is_empty() || !self.idle_set.is_empty() {
            return;
        }
        let mut busy: Vec<u64> = self
            .held
            .iter()
            .filter(|(w, h)| {
                self.usable.contains(w)
                    && h.quick
                    && !h.reclaiming
                    && h.tasks.front().is_some_and(|t| t.grant.is_none())
                    && h.tasks.len() <= 1 + LOOKAHEAD / 2
            })
            .map(|(w, _)| *w)
            .collect();
        if busy.is_empty() {
            return;
        }
        busy.sort_unstable();
        // Look-aheads stop at the first task that asks for resources: it waits for an
        // idle worker and a grant.
        let plain = self.plain_prefix(LOOKAHEAD * busy.len());
        if plain == 0 {
            return;
        }
        let share = plain.div_ceil(busy.len()).min(LOOKAHEAD);
        for w in busy {
            let room = (1 + share).saturating_sub(self.held[&w].tasks.len());
            self.give(w, room, &mut send);
        }
    }

    /// Up to `n` queued tasks to `worker`, in one `send`.
    fn give(
        &mut self,
        worker: u64,
        n: usize,
        send: &mut impl FnMut(u64, vec_deque::Iter<'_, Task<P>>),
    ) {
        let Some(first) = self.held.get(&worker).map(|h| h.tasks.len()) else {
            return;
        };
        let n = if first == 0 {
            n.min(self.queue.len())
        } else {
            self.plain_prefix(n)
        };
        if n == 0 {
            return;
        }
        let h = self.held.get_mut(&worker).expect("looked up above");
        h.tasks.extend(self.queue.drain(..n));
        send(worker, h.tasks.range(first..));
    }

    /// Workers to ask for their unstarted tasks back (each asked once until it answers):
    /// every one holding a look-ahead while a worker is idle and nothing is queued, and
    /// any whose look-ahead has waited `STALE` behind the task it runs.
    pub fn reclaims(&mut self, now: Instant) -> Vec<u64> {
        let starving = self.queue.is_empty() && !self.idle_set.is_empty();
        let mut out: Vec<u64> = self
            .held
            .iter_mut()
            .filter(|(_, h)| {
                !h.reclaiming
                    && h.tasks.len() > 1
                    && (starving || now.saturating_duration_since(h.since) >= STALE)
            })
            .map(|(w, h)| {
                h.reclaiming = true;
                h.quick = false; // it runs a long task now
                *w
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Every worker holding a look-ahead, asked for it back (the pool is ending). Each is
    /// asked once until it answers.
    pub fn reclaim_all(&mut self) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .held
            .iter_mut()
            .filter(|(_, h)| !h.reclaiming && h.tasks.len() > 1)
            .map(|(w, h)| {
                h.reclaiming = true;
                *w
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Take the tasks no worker has started, to hand back: the queue, and with
    /// `lookaheads` every worker's look-ahead too (for a pool that stops now: its workers
    /// are ended with it, so none of those will start). Grants are released.
    pub fn take_unstarted(&mut self, lookaheads: bool) -> Vec<Task<P>> {
        let mut out: Vec<Task<P>> = self.queue.drain(..).collect();
        if lookaheads {
            let mut workers: Vec<u64> = self.held.keys().copied().collect();
            workers.sort_unstable();
            for w in workers {
                let h = self.held.get_mut(&w).expect("listed above");
                out.extend(h.tasks.drain(1.min(h.tasks.len())..));
            }
        }
        for t in &mut out {
            self.release(t);
        }
        out
    }

    /// `worker` answered a reclaim with the tasks it had not started: they go back to the
    /// front of the queue, in their order.
    pub fn returned(&mut self, worker: u64, ids: &[u64]) {
        let Some(h) = self.held.get_mut(&worker) else {
            return;
        };
        h.reclaiming = false;
        let mut back = Vec::new();
        for id in ids {
            if let Some(at) = h.tasks.iter().position(|t| t.id == *id) {
                back.extend(h.tasks.remove(at));
            }
        }
        let empty = h.tasks.is_empty();
        self.requeue_front(back);
        if empty && self.usable.contains(&worker) {
            self.make_idle(worker);
        }
    }

    /// `worker` sent the result of `task_id` at `now`. True if it held that task.
    pub fn finished(&mut self, worker: u64, task_id: u64, now: Instant) -> bool {
        let Some(h) = self.held.get_mut(&worker) else {
            return false;
        };
        let Some(at) = h.tasks.iter().position(|t| t.id == task_id) else {
            return false;
        };
        let grant = h.tasks.remove(at).and_then(|t| t.grant);
        if at == 0 {
            h.quick = now.saturating_duration_since(h.since) < QUICK;
            h.since = now;
        }
        if h.tasks.is_empty() && self.usable.contains(&worker) {
            self.make_idle(worker);
        }
        if at == 0 {
            self.watch_running(worker);
        }
        if let Some(g) = grant {
            self.alloc.release(&g);
        }
        true
    }

    /// Watch the limit of the task `worker` runs now, if it has one.
    fn watch_running(&mut self, worker: u64) {
        let Some(h) = self.held.get(&worker) else {
            return;
        };
        if let Some((id, limit)) = h.tasks.front().and_then(|t| Some((t.id, t.walltime?))) {
            self.deadlines.push(Reverse((h.since + limit, worker, id)));
        }
    }

    /// Whether `task_id` is `worker`'s running task and has run its whole limit by `now`.
    #[must_use]
    pub fn reached_limit(&self, worker: u64, task_id: u64, now: Instant) -> bool {
        self.held.get(&worker).is_some_and(|h| {
            h.tasks.front().is_some_and(|t| {
                t.id == task_id
                    && t.walltime
                        .is_some_and(|w| now.saturating_duration_since(h.since) >= w)
            })
        })
    }

    /// When the soonest limit of a running task runs out (it may have ended since).
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Running tasks whose limit ran out `grace` or more before `now`: each is taken from
    /// its worker (its grant released), and that worker is retired (its look-ahead goes
    /// back to the queue, it is given nothing more): the caller ends the worker, and its
    /// death, when reported, loses no task.
    pub fn overdue(&mut self, now: Instant, grace: Duration) -> Vec<Overdue> {
        let mut out = Vec::new();
        while let Some(&Reverse((at, worker, task_id))) = self.deadlines.peek() {
            if at + grace > now {
                break;
            }
            self.deadlines.pop();
            let Some(h) = self.held.get(&worker) else {
                continue;
            };
            let Some(t) = h.tasks.front().filter(|t| t.id == task_id) else {
                continue; // it ended in time
            };
            let limit = t.walltime.unwrap_or_default();
            let ran = now.saturating_duration_since(h.since);
            self.retire(worker);
            let h = self.held.get_mut(&worker).expect("looked up above");
            if let Some(mut t) = h.tasks.pop_front() {
                self.release(&mut t);
            }
            out.push(Overdue {
                worker,
                task_id,
                limit,
                ran,
            });
        }
        out
    }

    /// A worker died: forget it, its unstarted tasks back at the front of the queue.
    /// Returns the id of the task it was running, which is lost.
    pub fn remove_worker(&mut self, worker: u64) -> Option<u64> {
        self.retire(worker);
        let mut lost = self.held.remove(&worker)?.tasks.into_iter().next()?;
        self.release(&mut lost);
        Some(lost.id)
    }

    /// What is not granted now (the pool's totals when no task holds a grant).
    #[cfg(test)]
    pub fn free_resources(&self) -> Resources {
        self.alloc.free()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Tasks that went back to the queue unstarted so far (reclaimed, or held by a worker
    /// whose stream ended).
    pub fn requeued(&self) -> u64 {
        self.requeued
    }

    /// Whether any worker holds a look-ahead (the core then wakes often enough to take
    /// back a stale one).
    pub fn has_lookahead(&self) -> bool {
        self.held.values().any(|h| h.tasks.len() > 1)
    }

    /// Registered workers whose death has not been reported (streams open or not).
    pub fn workers(&self) -> usize {
        self.held.len()
    }

    /// Tasks held by workers (running or look-ahead).
    pub fn held(&self) -> usize {
        self.held.values().map(|h| h.tasks.len()).sum()
    }

    #[cfg(test)]
    pub fn idle_workers(&self) -> usize {
        self.idle_set.len()
    }

    fn make_idle(&mut self, worker: u64) {
        let holds = self.held.get(&worker).is_some_and(|h| !h.tasks.is_empty());
        if !holds && self.idle_set.insert(worker) {
            self.idle.push_back(worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64) -> Task<()> {
        Task::new(id, 0, (), None)
    }

    /// The tests' clock stands still (every task is quick, no look-ahead goes stale)
    /// unless a test moves it on explicitly.
    fn now() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    /// A registered worker whose last task was quick, so it may get a look-ahead.
    fn add(t: &mut Tasks<()>, w: u64) {
        let _ = now();
        t.add_worker(w);
        t.held.get_mut(&w).unwrap().quick = true;
    }

    fn assign(t: &mut Tasks<()>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        t.assign(now(), |w, tasks| out.extend(tasks.map(|task| (w, task.id))));
        out
    }

    #[test]
    fn idle_workers_first_then_an_even_share_of_look_ahead_refilled_at_half() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=30 {
            t.push(task(id));
        }
        let given = assign(&mut t);
        assert_eq!(given[..2], [(1, 1), (2, 2)], "idle workers first, one each");
        let ids = |w: u64| -> Vec<u64> {
            given[2..]
                .iter()
                .filter(|g| g.0 == w)
                .map(|g| g.1)
                .collect()
        };
        assert_eq!(
            ids(1),
            (3..=10).collect::<Vec<_>>(),
            "then LOOKAHEAD each, in queue order"
        );
        assert_eq!(ids(2), (11..=18).collect::<Vec<_>>());
        assert_eq!((t.queued(), t.held(), t.idle_workers()), (12, 18, 0));
        assert_eq!(
            t.reclaims(now()),
            Vec::<u64>::new(),
            "tasks are queued: nothing to take back"
        );
        // Worker 1 runs down its look-ahead; at half it is topped up, several at once.
        for id in [1, 3, 4] {
            assert!(t.finished(1, id, now()));
            assert_eq!(assign(&mut t), vec![], "more than half left: nothing yet");
        }
        assert!(t.finished(1, 5, now()));
        assert_eq!(assign(&mut t), vec![(1, 19), (1, 20), (1, 21), (1, 22)]);
    }

    #[test]
    fn a_short_queue_is_shared_evenly() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=6 {
            t.push(task(id));
        }
        assert_eq!(
            assign(&mut t),
            vec![(1, 1), (2, 2), (1, 3), (1, 4), (2, 5), (2, 6)]
        );
    }

    #[test]
    fn a_look_ahead_behind_a_long_task_is_taken_back_for_an_idle_worker() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=4 {
            t.push(task(id));
        }
        assert_eq!(assign(&mut t), vec![(1, 1), (2, 2), (1, 3), (2, 4)]);
        // Worker 2 runs both of its tasks; worker 1 is stuck in task 1 holding task 3.
        assert!(t.finished(2, 2, now()));
        assert!(t.finished(2, 4, now()));
        assert_eq!(t.idle_workers(), 1);
        assert_eq!(t.reclaims(now()), vec![1]);
        assert_eq!(
            t.reclaims(now()),
            Vec::<u64>::new(),
            "asked once until it answers"
        );
        assert_eq!(
            assign(&mut t),
            vec![],
            "nothing more for a worker being asked"
        );
        t.returned(1, &[3]);
        assert_eq!(assign(&mut t), vec![(2, 3)]);
        assert!(t.finished(2, 3, now()));
        assert!(t.finished(1, 1, now()));
        assert_eq!((t.queued(), t.held(), t.idle_workers()), (0, 0, 2));
    }

    #[test]
    fn a_reclaim_that_comes_too_late_returns_nothing_and_changes_nothing() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=3 {
            t.push(task(id));
        }
        assert_eq!(assign(&mut t), vec![(1, 1), (2, 2), (1, 3)]);
        assert!(t.finished(2, 2, now()));
        assert_eq!(t.reclaims(now()), vec![1]);
        assert!(t.finished(1, 1, now())); // it had already started task 3
        t.returned(1, &[]);
        assert_eq!(t.held(), 1);
        assert!(t.finished(1, 3, now()));
        assert_eq!(t.idle_workers(), 2);
    }

    #[test]
    fn a_dead_worker_loses_only_its_running_task() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=7 {
            t.push(task(id));
        }
        assert_eq!(
            assign(&mut t),
            vec![(1, 1), (2, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7)]
        );
        assert_eq!(t.remove_worker(1), Some(1));
        assert_eq!(t.requeued(), 3);
        assert_eq!(
            t.remove_worker(1),
            None,
            "a second report loses nothing more"
        );
        assert_eq!(t.requeued(), 3, "nor requeues anything more");
        // Its look-ahead is first in the queue again, in order; the restarted worker (a new key)
        // and worker 2 run everything else.
        add(&mut t, 3);
        let mut done = Vec::new();
        while t.queued() + t.held() > 0 {
            for (w, id) in assign(&mut t) {
                let _ = w;
                done.push(id);
            }
            for w in [2, 3] {
                let first = t.held.get(&w).and_then(|h| h.tasks.front()).map(|x| x.id);
                if let Some(id) = first {
                    assert!(t.finished(w, id, now()));
                }
            }
        }
        assert_eq!(
            done,
            vec![3, 4, 5],
            "the dead worker's unstarted tasks, in order"
        );
    }

    #[test]
    fn a_retired_worker_gets_nothing_and_its_late_result_still_counts() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        t.push(task(1));
        assert_eq!(assign(&mut t), vec![(1, 1)]);
        t.retire(2); // idle, stream ended: not given task 2
        t.retire(1); // running, stream ended after it sent its result
        assert_eq!(t.requeued(), 0);
        t.push(task(2));
        assert_eq!(assign(&mut t), vec![]);
        assert!(t.finished(1, 1, now()));
        assert_eq!(t.remove_worker(1), None, "its result arrived: nothing lost");
        assert_eq!(t.requeued(), 0);
        add(&mut t, 3);
        assert_eq!(assign(&mut t), vec![(3, 2)]);
    }

    #[test]
    fn a_worker_whose_stream_ends_gives_back_its_look_ahead_at_once() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        for id in 1..=5 {
            t.push(task(id));
        }
        assert_eq!(assign(&mut t), vec![(1, 1), (2, 2), (1, 3), (1, 4), (2, 5)]);
        t.retire(1);
        assert_eq!(t.requeued(), 2);
        assert!(t.finished(2, 2, now()));
        assert_eq!(
            assign(&mut t),
            vec![(2, 3), (2, 4)],
            "the look-ahead goes first again"
        );
        assert_eq!(t.remove_worker(1), Some(1));
        assert_eq!(t.requeued(), 2);
    }

    #[test]
    fn a_fresh_or_slow_worker_gets_no_look_ahead_and_a_stale_one_is_taken_back() {
        let mut t = Tasks::default();
        let _ = now();
        t.add_worker(1); // no task run yet: not known to be quick
        for id in 1..=3 {
            t.push(task(id));
        }
        assert_eq!(assign(&mut t), vec![(1, 1)]);
        assert!(t.finished(1, 1, now() + QUICK * 2)); // a slow task
        assert_eq!(assign(&mut t), vec![(1, 2)]);
        assert!(t.finished(1, 2, now())); // a quick one (given at now())
        assert_eq!(assign(&mut t), vec![(1, 3)]);
        t.push(task(4));
        assert_eq!(assign(&mut t), vec![(1, 4)], "quick: one look-ahead");
        // Task 3 turns out long: its look-ahead is taken back once it has waited STALE.
        assert_eq!(t.reclaims(now() + STALE / 2), Vec::<u64>::new());
        assert_eq!(t.reclaims(now() + STALE), vec![1]);
        t.returned(1, &[4]);
        assert_eq!(t.queued(), 1);
        assert_eq!(assign(&mut t), vec![], "no longer quick: no look-ahead");
    }

    #[test]
    fn results_for_other_tasks_change_nothing() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        t.push(task(5));
        assert_eq!(assign(&mut t), vec![(1, 5)]);
        assert!(!t.finished(1, 6, now()));
        assert!(!t.finished(9, 5, now()));
        assert_eq!((t.held(), t.idle_workers()), (1, 0));
    }

    fn typed(id: u64, cores: u32, gpus: u32) -> Task<()> {
        let r = Resources {
            cores,
            memory: 0,
            gpus,
        };
        Task::new(id, crate::resources::FLAG_RESOURCES, (), Some(r))
    }

    /// A pool of 4 CPU slots (one NUMA node) and GPUs "a", "b".
    fn pool() -> Tasks<()> {
        let slots = (0..4)
            .map(|cpu| crate::resources::Slot { cpu, numa: 0 })
            .collect();
        Tasks::new(Allocator::new(slots, 0, vec!["a".into(), "b".into()]))
    }

    fn assign_grants(t: &mut Tasks<()>) -> Vec<(u64, u64, Vec<u32>, Vec<String>)> {
        let mut out = Vec::new();
        t.assign(now(), |w, tasks| {
            out.extend(tasks.map(|task| {
                let g = task.grant.clone().unwrap_or_default();
                (w, task.id, g.cpus, g.accelerators)
            }));
        });
        out
    }

    #[test]
    fn resource_tasks_get_disjoint_grants_and_the_ones_that_do_not_fit_let_others_by() {
        let mut t = pool();
        for w in 1..=4 {
            add(&mut t, w);
        }
        t.push(typed(1, 2, 1));
        t.push(typed(2, 3, 0)); // only 2 slots left: waits
        t.push(typed(3, 1, 1));
        t.push(task(4));
        let got = assign_grants(&mut t);
        assert_eq!(
            got,
            [
                (1, 1, vec![0, 1], vec!["a".to_string()]),
                (2, 3, vec![2], vec!["b".to_string()]),
                (3, 4, vec![], vec![]),
            ]
        );
        assert_eq!(t.queued(), 1, "task 2 waits for 3 slots");
        assert_eq!(t.free_resources().cores, 1);
        assert!(t.finished(1, 1, now()));
        assert_eq!(t.free_resources().cores, 3, "task 1's grant is back");
        let got = assign_grants(&mut t);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].1, got[0].2.len()), (2, 3));
        // A dead worker's grant comes back with its lost task.
        assert_eq!(t.remove_worker(got[0].0), Some(2));
        assert_eq!(t.remove_worker(2), Some(3));
        assert_eq!(t.free_resources().cores, 4);
        assert_eq!(t.free_resources().gpus, 2);
    }

    #[test]
    fn resource_tasks_are_never_a_look_ahead_and_their_workers_get_none() {
        let mut t = pool();
        add(&mut t, 1);
        add(&mut t, 2);
        t.push(typed(1, 1, 0));
        t.push(task(2));
        t.push(task(3));
        t.push(typed(4, 1, 0));
        t.push(task(5));
        let got = assign(&mut t);
        // Worker 1 runs typed task 1 and gets nothing more; worker 2 runs 2 with 3 as its
        // look-ahead, which stops at typed task 4 (it waits for an idle worker).
        assert_eq!(got, [(1, 1), (2, 2), (2, 3)]);
        assert_eq!(t.queued(), 2);
        assert!(t.finished(2, 2, now()));
        assert!(t.finished(2, 3, now()));
        let got = assign(&mut t);
        assert_eq!(got[0], (2, 4), "the idle worker takes the typed task first");
    }

    fn limited(id: u64, secs: u64) -> Task<()> {
        task(id).limited(Some(Duration::from_secs(secs)))
    }

    #[test]
    fn a_task_past_its_limit_is_taken_from_its_worker_whose_look_ahead_goes_back() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        add(&mut t, 2);
        t.push(limited(1, 10));
        t.push(limited(2, 30));
        t.push(task(3));
        t.push(task(4));
        // 1 and 2 run; 3 and 4 are look-aheads, one each.
        assert_eq!(assign(&mut t), [(1, 1), (2, 2), (1, 3), (2, 4)]);
        let grace = Duration::from_millis(500);
        let t0 = now();
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(
            t.overdue(t0 + Duration::from_secs(10), grace).is_empty(),
            "grace"
        );
        let late = t0 + Duration::from_millis(10_600);
        assert_eq!(
            t.overdue(late, grace),
            [Overdue {
                worker: 1,
                task_id: 1,
                limit: Duration::from_secs(10),
                ran: Duration::from_millis(10_600),
            }]
        );
        // Task 3 is back at the head of the queue; worker 1 gets nothing more, and its
        // death, when reported, loses no task.
        assert_eq!((t.queued(), t.requeued()), (1, 1));
        assert_eq!(assign(&mut t), []);
        assert_eq!(t.remove_worker(1), None);
        // Worker 2's task 2 finished in time: its limit is forgotten, and task 4, a
        // look-ahead without a limit, runs on unwatched.
        assert!(t.finished(2, 2, late));
        assert!(t.overdue(t0 + Duration::from_secs(3600), grace).is_empty());
        assert!(t.finished(2, 4, late));
        assert_eq!(assign(&mut t), [(2, 3)]);
    }

    #[test]
    fn a_limit_counts_from_when_the_task_starts_not_when_it_arrives() {
        let mut t = Tasks::default();
        add(&mut t, 1);
        t.push(task(1));
        t.push(limited(2, 5));
        assert_eq!(assign(&mut t), [(1, 1), (1, 2)]);
        assert_eq!(t.next_deadline(), None, "2 waits behind 1: not running yet");
        let started = now() + Duration::from_secs(100);
        assert!(t.finished(1, 1, started));
        assert_eq!(t.next_deadline(), Some(started + Duration::from_secs(5)));
        let grace = Duration::ZERO;
        assert!(t
            .overdue(started + Duration::from_secs(4), grace)
            .is_empty());
        let got = t.overdue(started + Duration::from_secs(6), grace);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].task_id, got[0].ran), (2, Duration::from_secs(6)));
    }
}
