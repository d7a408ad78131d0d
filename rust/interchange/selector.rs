//! Parsl's manager selector: the order in which pools with free capacity are offered
//! tasks ([`Selector`]), kept as a set of candidates ([`Candidates`]).
//!
//! The pools that may take tasks, kept so that offering tasks to k of them costs
//! O(k log n) at most, not O(all managers): with 1,000 pools and one task queued, the
//! dispatch looks at one manager. Random order is a partial Fisher-Yates shuffle over a
//! dense vector (the same distribution as shuffling all, as Parsl's
//! `RandomManagerSelector` does); block-id order is a sorted set walked from its top
//! (Parsl's `BlockIdManagerSelector`: highest block id first, managers without one last).

use std::collections::BTreeSet;

/// How pools with free capacity are ordered for dispatch (Parsl's selectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Random,
    /// Highest block id first, compared as strings (Parsl's `BlockIdManagerSelector`).
    BlockId,
}

/// Sort key of the block-id order: `(has a block id, block id, identity, slot)`, taken
/// from the top.
type BlockKey = (bool, String, Vec<u8>, u32);

/// Candidates by their managers' table slots (`table.rs`): no hashing, no copies of
/// identities, per insert, remove or pick.
pub enum Candidates {
    Random {
        ids: Vec<u32>,
        /// Position in `ids` by slot (`ABSENT`: not a candidate).
        pos: Vec<u32>,
    },
    BlockId {
        set: BTreeSet<BlockKey>,
        keys: Vec<Option<BlockKey>>,
        count: usize,
    },
}

const ABSENT: u32 = u32::MAX;

impl Candidates {
    #[must_use]
    pub fn new(selector: Selector) -> Self {
        match selector {
            Selector::Random => Candidates::Random {
                ids: Vec::new(),
                pos: Vec::new(),
            },
            Selector::BlockId => Candidates::BlockId {
                set: BTreeSet::new(),
                keys: Vec::new(),
                count: 0,
            },
        }
    }

    /// Make the manager in `slot` a candidate (`identity` and `block_id` order the
    /// block-id selector).
    pub fn insert(&mut self, slot: u32, identity: &[u8], block_id: Option<&str>) {
        let i = slot as usize;
        match self {
            Candidates::Random { ids, pos } => {
                if pos.len() <= i {
                    pos.resize(i + 1, ABSENT);
                }
                if pos[i] == ABSENT {
                    pos[i] = u32::try_from(ids.len()).expect("fewer than 2^32 candidates");
                    ids.push(slot);
                }
            }
            Candidates::BlockId { set, keys, count } => {
                if keys.len() <= i {
                    keys.resize(i + 1, None);
                }
                if keys[i].is_none() {
                    let key = (
                        block_id.is_some(),
                        block_id.unwrap_or_default().to_string(),
                        identity.to_vec(),
                        slot,
                    );
                    set.insert(key.clone());
                    keys[i] = Some(key);
                    *count += 1;
                }
            }
        }
    }

    pub fn remove(&mut self, slot: u32) {
        let i = slot as usize;
        match self {
            Candidates::Random { ids, pos } => {
                let Some(&p) = pos.get(i).filter(|p| **p != ABSENT) else {
                    return;
                };
                pos[i] = ABSENT;
                ids.swap_remove(p as usize);
                if let Some(&moved) = ids.get(p as usize) {
                    pos[moved as usize] = p;
                }
            }
            Candidates::BlockId { set, keys, count } => {
                if let Some(key) = keys.get_mut(i).and_then(Option::take) {
                    set.remove(&key);
                    *count -= 1;
                }
            }
        }
    }

    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Candidates::Random { ids, .. } => ids.len(),
            Candidates::BlockId { count, .. } => *count,
        }
    }

    #[cfg(test)]
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Candidates in selector order until their free capacity adds up to `need`.
    /// `free(slot)` is a candidate's free capacity, or `None` when it can no longer take
    /// tasks (held, draining, full, gone): those are dropped from the set on the way.
    pub fn pick(&mut self, need: usize, mut free: impl FnMut(u32) -> Option<usize>) -> Vec<u32> {
        let mut chosen = Vec::new();
        let mut dropped = Vec::new();
        let mut got = 0;
        match self {
            Candidates::Random { ids, pos } => {
                let n = ids.len();
                for i in 0..n {
                    if got >= need {
                        break;
                    }
                    let j = fastrand::usize(i..n);
                    if i != j {
                        ids.swap(i, j);
                        pos[ids[i] as usize] = i as u32;
                        pos[ids[j] as usize] = j as u32;
                    }
                    match free(ids[i]) {
                        Some(f) if f > 0 => {
                            got += f;
                            chosen.push(ids[i]);
                        }
                        _ => dropped.push(ids[i]),
                    }
                }
            }
            Candidates::BlockId { set, .. } => {
                for &(_, _, _, slot) in set.iter().rev() {
                    if got >= need {
                        break;
                    }
                    match free(slot) {
                        Some(f) if f > 0 => {
                            got += f;
                            chosen.push(slot);
                        }
                        _ => dropped.push(slot),
                    }
                }
            }
        }
        for slot in dropped {
            self.remove(slot);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(c: &mut Candidates) -> Vec<u32> {
        c.pick(usize::MAX, |_| Some(1))
    }

    #[test]
    fn random_pick_stops_at_need_and_drops_ineligible() {
        let mut c = Candidates::new(Selector::Random);
        for i in 0..100u32 {
            c.insert(i, &i.to_be_bytes(), None);
        }
        c.insert(5, &5u32.to_be_bytes(), None); // already there: no duplicate
        assert_eq!(c.len(), 100);
        let mut looked = 0;
        let got = c.pick(6, |_| {
            looked += 1;
            Some(3)
        });
        assert_eq!((got.len(), looked), (2, 2), "O(picked), not O(candidates)");
        // Odd ids are ineligible: a full walk drops them.
        let got = c.pick(usize::MAX, |slot| (slot % 2 == 0).then_some(1));
        assert_eq!(got.len(), 50);
        assert_eq!(c.len(), 50);
        let mut left = all(&mut c);
        left.sort_unstable();
        assert_eq!(left, (0..100u32).step_by(2).collect::<Vec<_>>());
    }

    #[test]
    fn random_order_varies_and_positions_stay_consistent() {
        let mut c = Candidates::new(Selector::Random);
        for i in 0..20u32 {
            c.insert(i, &i.to_be_bytes(), None);
        }
        let firsts: std::collections::HashSet<u32> =
            (0..200).map(|_| c.pick(1, |_| Some(1))[0]).collect();
        assert!(firsts.len() > 10, "the first pick is spread: {firsts:?}");
        for i in (0..20u32).step_by(3) {
            c.remove(i);
        }
        c.remove(99); // never a candidate: nothing
        let mut left = all(&mut c);
        left.sort_unstable();
        let want: Vec<u32> = (0..20u32).filter(|i| i % 3 != 0).collect();
        assert_eq!(left, want);
    }

    #[test]
    fn block_order_is_highest_block_first_then_none() {
        let mut c = Candidates::new(Selector::BlockId);
        let (n, a, b, cc) = (0, 1, 2, 3);
        c.insert(n, b"n", None);
        c.insert(a, b"a", Some("10"));
        c.insert(b, b"b", Some("9"));
        c.insert(cc, b"c", Some("1"));
        assert_eq!(all(&mut c), [b, a, cc, n]);
        assert_eq!(c.pick(1, |_| Some(1)), vec![b]);
        c.remove(b);
        assert_eq!(c.len(), 3);
        assert_eq!(c.pick(1, |_| Some(1)), vec![a]);
    }
}
