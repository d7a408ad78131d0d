//! The pool's tasks, owned in one place: one queue in the order the interchange sent them
//! (Parsl's priority order) and the one task each worker is running. A worker is given a
//! task only when it is idle, so no idle worker ever waits while another worker holds
//! unstarted tasks, and a dead worker takes only its running task with it.
//!
//! Workers are keys (the core's stream tokens), not identities: a restarted worker that
//! registers under its predecessor's rank before that death is reported is a new key.

use std::collections::{HashMap, HashSet, VecDeque};

/// A queued task: its id, the flags of its meta entry, its opaque payload.
pub struct Task<P> {
    pub id: u64,
    pub flags: u8,
    pub payload: P,
}

pub struct Tasks<P> {
    queue: VecDeque<Task<P>>,
    /// Worker -> the id of the task it runs.
    running: HashMap<u64, u64>,
    /// Idle workers in the order they became idle; `idle_set` is the same set, for
    /// O(1) removal (stale entries in `idle` are skipped when popped).
    idle: VecDeque<u64>,
    idle_set: HashSet<u64>,
    /// Workers that may be given tasks (registered, stream open).
    usable: HashSet<u64>,
}

impl<P> Default for Tasks<P> {
    fn default() -> Self {
        Tasks {
            queue: VecDeque::new(),
            running: HashMap::new(),
            idle: VecDeque::new(),
            idle_set: HashSet::new(),
            usable: HashSet::new(),
        }
    }
}

impl<P> Tasks<P> {
    /// A task from the interchange: behind everything queued.
    pub fn push(&mut self, task: Task<P>) {
        self.queue.push_back(task);
    }

    /// A worker that registered: idle until given a task.
    pub fn add_worker(&mut self, worker: u64) {
        self.usable.insert(worker);
        self.make_idle(worker);
    }

    /// A worker whose stream ended: give it nothing more. What it runs stays its own until
    /// its death is reported ([`Tasks::remove_worker`]) or its result arrives.
    pub fn retire(&mut self, worker: u64) {
        self.usable.remove(&worker);
        self.idle_set.remove(&worker);
    }

    /// The next (worker, task) pairing, while a task is queued and a worker is idle.
    /// FIFO on both sides: the oldest queued task goes to the longest-idle worker.
    pub fn next_assignment(&mut self) -> Option<(u64, Task<P>)> {
        if self.queue.is_empty() {
            return None;
        }
        let worker = loop {
            let w = self.idle.pop_front()?;
            if self.idle_set.remove(&w) {
                break w;
            }
        };
        let task = self.queue.pop_front().expect("queue checked non-empty");
        self.running.insert(worker, task.id);
        Some((worker, task))
    }

    /// `worker` sent the result of `task_id`. True if that was the task it was running
    /// (it is idle again); false for anything else, which changes nothing.
    pub fn finished(&mut self, worker: u64, task_id: u64) -> bool {
        if self.running.get(&worker) != Some(&task_id) {
            return false;
        }
        self.running.remove(&worker);
        if self.usable.contains(&worker) {
            self.make_idle(worker);
        }
        true
    }

    /// A worker died: forget it. Returns the task it was running, which is lost.
    pub fn remove_worker(&mut self, worker: u64) -> Option<u64> {
        self.retire(worker);
        self.running.remove(&worker)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    #[cfg(test)]
    pub fn idle_workers(&self) -> usize {
        self.idle_set.len()
    }

    fn make_idle(&mut self, worker: u64) {
        if !self.running.contains_key(&worker) && self.idle_set.insert(worker) {
            self.idle.push_back(worker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64) -> Task<()> {
        Task {
            id,
            flags: 0,
            payload: (),
        }
    }

    fn drain(t: &mut Tasks<()>) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| t.next_assignment().map(|(w, t)| (w, t.id))).collect()
    }

    #[test]
    fn a_worker_runs_one_task_at_a_time_and_an_idle_one_takes_the_next() {
        let mut t = Tasks::default();
        t.add_worker(1);
        t.add_worker(2);
        for id in 10..14 {
            t.push(task(id));
        }
        // One each; the other two stay queued, bound to nobody.
        assert_eq!(drain(&mut t), vec![(1, 10), (2, 11)]);
        assert_eq!((t.queued(), t.running(), t.idle_workers()), (2, 2, 0));
        // Worker 1 stays busy (a long task); worker 2 takes every remaining short one.
        assert!(t.finished(2, 11));
        assert_eq!(drain(&mut t), vec![(2, 12)]);
        assert!(t.finished(2, 12));
        assert_eq!(drain(&mut t), vec![(2, 13)]);
        assert!(t.finished(2, 13));
        assert_eq!(drain(&mut t), vec![]);
        assert_eq!(t.idle_workers(), 1);
    }

    #[test]
    fn a_dead_worker_loses_only_its_running_task() {
        let mut t = Tasks::default();
        t.add_worker(1);
        for id in 1..=7 {
            t.push(task(id));
        }
        assert_eq!(drain(&mut t), vec![(1, 1)]);
        assert_eq!(t.remove_worker(1), Some(1));
        assert_eq!(t.remove_worker(1), None, "a second report loses nothing more");
        // The restarted worker (a new key) runs the six that were queued.
        t.add_worker(2);
        let mut done = Vec::new();
        while let Some((w, task)) = t.next_assignment() {
            assert!(t.finished(w, task.id));
            done.push(task.id);
        }
        assert_eq!(done, vec![2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_retired_worker_gets_nothing_and_its_late_result_still_counts() {
        let mut t = Tasks::default();
        t.add_worker(1);
        t.add_worker(2);
        t.push(task(1));
        assert_eq!(drain(&mut t), vec![(1, 1)]);
        t.retire(2); // idle, stream ended: not given task 2
        t.retire(1); // running, stream ended after it sent its result
        t.push(task(2));
        assert_eq!(drain(&mut t), vec![]);
        assert!(t.finished(1, 1));
        assert_eq!(t.remove_worker(1), None, "its result arrived: nothing lost");
        assert_eq!(drain(&mut t), vec![]);
        t.add_worker(3);
        assert_eq!(drain(&mut t), vec![(3, 2)]);
    }

    #[test]
    fn results_for_other_tasks_change_nothing() {
        let mut t = Tasks::default();
        t.add_worker(1);
        t.push(task(5));
        assert_eq!(drain(&mut t), vec![(1, 5)]);
        assert!(!t.finished(1, 6));
        assert!(!t.finished(9, 5));
        assert_eq!((t.running(), t.idle_workers()), (1, 0));
    }
}
