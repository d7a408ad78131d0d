//! A manager's outstanding task ids. Most pools hold a few tasks (a node's workers plus
//! prefetch): a vector of them is one or two cache lines, searched in a few compares,
//! where a hash set is a control group, a bucket and a hash per id, all cold with
//! thousands of managers. Past [`SMALL`] ids it becomes a hash set, so a pool holding
//! thousands of tasks costs O(1) per result, not O(tasks).

use foldhash::{HashSet, HashSetExt};

/// Most ids kept in the vector.
const SMALL: usize = 64;

#[derive(Debug)]
pub enum TaskSet {
    Small(Vec<u64>),
    Large(HashSet<u64>),
}

impl Default for TaskSet {
    fn default() -> Self {
        TaskSet::Small(Vec::new())
    }
}

impl TaskSet {
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            TaskSet::Small(v) => v.len(),
            TaskSet::Large(s) => s.len(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add `ids` (none of them held already: a task is sent to one manager at a time).
    pub fn extend(&mut self, ids: &[u64]) {
        match self {
            TaskSet::Small(v) if v.len() + ids.len() <= SMALL => {
                debug_assert!(ids.iter().all(|id| !v.contains(id)), "a task id held twice");
                v.extend_from_slice(ids);
            }
            TaskSet::Small(v) => {
                let mut s = HashSet::with_capacity(v.len() + ids.len());
                s.extend(v.iter().chain(ids).copied());
                *self = TaskSet::Large(s);
            }
            TaskSet::Large(s) => s.extend(ids.iter().copied()),
        }
    }

    #[must_use]
    pub fn contains(&self, id: u64) -> bool {
        match self {
            TaskSet::Small(v) => v.contains(&id),
            TaskSet::Large(s) => s.contains(&id),
        }
    }

    /// Remove `id`; whether it was held.
    pub fn remove(&mut self, id: u64) -> bool {
        match self {
            // Results mostly come back in the order the tasks went out: from the front.
            TaskSet::Small(v) => match v.iter().position(|&x| x == id) {
                Some(i) => {
                    v.swap_remove(i);
                    true
                }
                None => false,
            },
            TaskSet::Large(s) => s.remove(&id),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (small, large) = match self {
            TaskSet::Small(v) => (Some(v.iter()), None),
            TaskSet::Large(s) => (None, Some(s.iter())),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
            .copied()
    }

    /// The ids, ascending.
    #[must_use]
    pub fn into_sorted(self) -> Vec<u64> {
        let mut ids: Vec<u64> = match self {
            TaskSet::Small(v) => v,
            TaskSet::Large(s) => s.into_iter().collect(),
        };
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest::proptest! {
        /// Whatever the adds and removes, it holds what a hash set would, across the
        /// switch from vector to set.
        #[test]
        fn holds_what_a_set_holds(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 1usize..40), 1..200)) {
            let mut t = TaskSet::default();
            let mut want = std::collections::BTreeSet::new();
            let mut next = 1000u64;
            for (add, pick, n) in ops {
                if add {
                    let ids: Vec<u64> = (next..next + n as u64).collect();
                    next += n as u64;
                    t.extend(&ids);
                    want.extend(ids);
                } else {
                    let id = want.iter().nth(pick as usize % want.len().max(1)).copied().unwrap_or(pick);
                    prop_assert_eq!(t.remove(id), want.remove(&id));
                    prop_assert!(!t.remove(id), "removed twice");
                }
                prop_assert_eq!(t.len(), want.len());
                prop_assert_eq!(t.is_empty(), want.is_empty());
                let mut got: Vec<u64> = t.iter().collect();
                got.sort_unstable();
                prop_assert_eq!(&got, &want.iter().copied().collect::<Vec<_>>());
            }
            let want: Vec<u64> = want.into_iter().collect();
            prop_assert_eq!(t.into_sorted(), want);
        }
    }

    #[test]
    fn becomes_a_set_past_small() {
        let mut t = TaskSet::default();
        t.extend(&(0..SMALL as u64).collect::<Vec<_>>());
        assert!(matches!(t, TaskSet::Small(_)));
        t.extend(&[SMALL as u64]);
        assert!(matches!(t, TaskSet::Large(_)));
        assert_eq!(t.len(), SMALL + 1);
    }
}
