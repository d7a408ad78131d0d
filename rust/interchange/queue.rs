//! Pending-task queue with Parsl's ordering: lower priority value first, FIFO by
//! task id inside one priority, tasks without a priority (infinity) last.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use crate::resources::Resources;

/// A task waiting for a manager. The payload is opaque to the interchange.
pub struct PendingTask {
    pub task_id: u64,
    pub priority: f64,
    pub flags: u8,
    pub payload: zmq::Message,
    /// What it asks for (`FLAG_RESOURCES`); `None` for a plain task.
    pub request: Option<Resources>,
    /// Since when it has found no pool with room (while others were placed).
    pub blocked_since: Option<Instant>,
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

#[derive(Default)]
pub struct TaskQueue {
    heap: BinaryHeap<PendingTask>,
}

impl TaskQueue {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, task: PendingTask) {
        self.heap.push(task);
    }

    pub fn pop(&mut self) -> Option<PendingTask> {
        self.heap.pop()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
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
            payload: zmq::Message::new(),
            request: None,
            blocked_since: None,
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
}
