//! Pending-task queue with Parsl's ordering: lower priority value first, FIFO by
//! task id inside one priority, tasks without a priority (infinity) last.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use crate::resources::Resources;

/// A task waiting for a manager. The payload is opaque to the interchange.
pub struct PendingTask {
    pub task_id: u64,
    pub priority: f64,
    pub flags: u8,
    pub payload: bytes::Bytes,
    /// What a task placed one by one carries (a request, a time limit); `None` for a
    /// plain task. Boxed: plain tasks are most tasks, and a queue of a million moves less.
    pub placed: Option<Box<Placed>>,
}

/// A task placed one by one (see `dispatch.rs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Placed {
    /// What it asks for (`FLAG_RESOURCES`).
    pub request: Option<Resources>,
    /// How long it may run (`FLAG_WALLTIME`): it goes only to a pool whose block has
    /// that much time left.
    pub walltime: Option<std::time::Duration>,
    /// Since when it has found no pool with room (while others were placed).
    pub blocked_since: Option<Instant>,
}

impl PendingTask {
    #[must_use]
    pub fn new(
        task_id: u64,
        priority: f64,
        flags: u8,
        payload: bytes::Bytes,
        request: Option<Resources>,
        walltime: Option<std::time::Duration>,
    ) -> PendingTask {
        let placed = (request.is_some() || walltime.is_some()).then(|| {
            Box::new(Placed {
                request,
                walltime,
                blocked_since: None,
            })
        });
        PendingTask {
            task_id,
            priority,
            flags,
            payload,
            placed,
        }
    }
}

impl PartialEq for PendingTask {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for PendingTask {}
impl PartialOrd for PendingTask {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PendingTask {
    // BinaryHeap pops the greatest: the greatest is the lowest (priority, task_id).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .total_cmp(&self.priority)
            .then_with(|| other.task_id.cmp(&self.task_id))
    }
}

/// Tasks in pop order. Most arrive in that order already (one priority, usually none,
/// and rising task ids): those go to a FIFO, O(1) each way; any other (a new priority,
/// a task handed back) goes to a heap. `pop` takes the better of the two heads, so the
/// order is the heap's alone would give. A heap of millions of tasks costs a sift through
/// cache-cold entries on every pop; the FIFO does not.
#[derive(Default)]
pub struct TaskQueue {
    /// Same priority, rising task ids: front first.
    fifo: VecDeque<PendingTask>,
    heap: BinaryHeap<PendingTask>,
}

impl TaskQueue {
    #[cfg(test)]
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, task: PendingTask) {
        let in_order = self.fifo.back().is_none_or(|last| {
            last.priority.total_cmp(&task.priority) == Ordering::Equal
                && last.task_id < task.task_id
        });
        if in_order {
            self.fifo.push_back(task);
        } else {
            self.heap.push(task);
        }
    }

    pub fn pop(&mut self) -> Option<PendingTask> {
        // The greater (per Ord) of the two heads goes first.
        match (self.fifo.front(), self.heap.peek()) {
            (Some(f), Some(h)) if h > f => self.heap.pop(),
            (Some(_), _) => self.fifo.pop_front(),
            (None, _) => self.heap.pop(),
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.fifo.len() + self.heap.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fifo.is_empty() && self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: u64, prio: f64) -> PendingTask {
        PendingTask {
            task_id: id,
            priority: prio,
            flags: 0,
            payload: bytes::Bytes::new(),
            placed: None,
        }
    }

    #[test]
    fn priority_then_fifo_then_none_last() {
        let mut q = TaskQueue::new();
        for (id, p) in [
            (1, f64::INFINITY),
            (2, 5.0),
            (3, 1.0),
            (4, 5.0),
            (5, -2.0),
            (6, f64::INFINITY),
            (7, 1.0),
        ] {
            q.push(task(id, p));
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|t| t.task_id)).collect();
        assert_eq!(order, vec![5, 3, 7, 2, 4, 1, 6]);
    }

    proptest::proptest! {
        /// Any mix of priorities and id orders (tasks handed back, new priorities) pops
        /// in the order of a plain sort by (priority, task id), interleaved pushes and pops
        /// included.
        #[test]
        fn pops_in_priority_then_id_order(
            ops in proptest::collection::vec((0u64..200, 0u8..4, proptest::bool::ANY), 0..300)
        ) {
            let prios = [f64::INFINITY, 1.0, -3.5, 1.0e9];
            let mut q = TaskQueue::new();
            let mut model: Vec<(f64, u64)> = Vec::new();
            let mut next_id = 1000;
            for (id, p, pop) in ops {
                if pop {
                    model.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    let want = (!model.is_empty()).then(|| model.remove(0));
                    let got = q.pop().map(|t| (t.priority, t.task_id));
                    proptest::prop_assert_eq!(got, want);
                } else {
                    // Mostly rising ids (the common case), some older ones (handed back).
                    let id = if id % 3 == 0 { id } else { next_id += 1; next_id };
                    if model.iter().all(|m| m.1 != id) {
                        q.push(task(id, prios[p as usize]));
                        model.push((prios[p as usize], id));
                    }
                }
                proptest::prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
