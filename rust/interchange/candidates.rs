//! The managers that may take tasks, kept so that offering tasks to k of them costs
//! O(k log n) at most, not O(all managers): with 1,000 pools and one task queued, the
//! dispatch looks at one manager. Random order is a partial Fisher-Yates shuffle over a
//! dense vector (the same distribution as shuffling all, as Parsl's
//! `RandomManagerSelector` does); block-id order is a sorted set walked from its top
//! (Parsl's `BlockIdManagerSelector`: highest block id first, managers without one last).

use std::collections::BTreeSet;

use foldhash::{HashMap, HashMapExt};

use super::managers::Selector;

/// Sort key of the block-id order: `(has a block id, block id, identity)`, taken from the
/// top.
type BlockKey = (bool, String, Vec<u8>);

pub enum Candidates {
    Random {
        ids: Vec<Vec<u8>>,
        pos: HashMap<Vec<u8>, usize>,
    },
    BlockId {
        set: BTreeSet<BlockKey>,
        keys: HashMap<Vec<u8>, BlockKey>,
    },
}

impl Candidates {
    #[must_use]
    pub fn new(selector: Selector) -> Self {
        match selector {
            Selector::Random => Candidates::Random {
                ids: Vec::new(),
                pos: HashMap::new(),
            },
            Selector::BlockId => Candidates::BlockId {
                set: BTreeSet::new(),
                keys: HashMap::new(),
            },
        }
    }

    pub fn insert(&mut self, id: &[u8], block_id: Option<&str>) {
        match self {
            Candidates::Random { ids, pos } => {
                if !pos.contains_key(id) {
                    pos.insert(id.to_vec(), ids.len());
                    ids.push(id.to_vec());
                }
            }
            Candidates::BlockId { set, keys } => {
                if !keys.contains_key(id) {
                    let key = (
                        block_id.is_some(),
                        block_id.unwrap_or_default().to_string(),
                        id.to_vec(),
                    );
                    set.insert(key.clone());
                    keys.insert(id.to_vec(), key);
                }
            }
        }
    }

    pub fn remove(&mut self, id: &[u8]) {
        match self {
            Candidates::Random { ids, pos } => {
                if let Some(i) = pos.remove(id) {
                    ids.swap_remove(i);
                    if let Some(moved) = ids.get(i) {
                        *pos.get_mut(moved).expect("every id has a position") = i;
                    }
                }
            }
            Candidates::BlockId { set, keys } => {
                if let Some(key) = keys.remove(id) {
                    set.remove(&key);
                }
            }
        }
    }

    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Candidates::Random { ids, .. } => ids.len(),
            Candidates::BlockId { keys, .. } => keys.len(),
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Candidates in selector order until their free capacity adds up to `need`.
    /// `free(id)` is a candidate's free capacity, or `None` when it can no longer take
    /// tasks (held, draining, full, gone): those are dropped from the set on the way.
    pub fn pick(
        &mut self,
        need: usize,
        mut free: impl FnMut(&[u8]) -> Option<usize>,
    ) -> Vec<Vec<u8>> {
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
                        *pos.get_mut(&ids[i]).expect("every id has a position") = i;
                        *pos.get_mut(&ids[j]).expect("every id has a position") = j;
                    }
                    match free(&ids[i]) {
                        Some(f) if f > 0 => {
                            got += f;
                            chosen.push(ids[i].clone());
                        }
                        _ => dropped.push(ids[i].clone()),
                    }
                }
            }
            Candidates::BlockId { set, .. } => {
                for (_, _, id) in set.iter().rev() {
                    if got >= need {
                        break;
                    }
                    match free(id) {
                        Some(f) if f > 0 => {
                            got += f;
                            chosen.push(id.clone());
                        }
                        _ => dropped.push(id.clone()),
                    }
                }
            }
        }
        for id in dropped {
            self.remove(&id);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(c: &mut Candidates) -> Vec<Vec<u8>> {
        c.pick(usize::MAX, |_| Some(1))
    }

    #[test]
    fn random_pick_stops_at_need_and_drops_ineligible() {
        let mut c = Candidates::new(Selector::Random);
        for i in 0..100u8 {
            c.insert(&[i], None);
        }
        c.insert(&[5], None); // already there: no duplicate
        assert_eq!(c.len(), 100);
        let mut looked = 0;
        let got = c.pick(6, |_| {
            looked += 1;
            Some(3)
        });
        assert_eq!((got.len(), looked), (2, 2), "O(picked), not O(candidates)");
        // Odd ids are ineligible: a full walk drops them.
        let got = c.pick(usize::MAX, |id| (id[0] % 2 == 0).then_some(1));
        assert_eq!(got.len(), 50);
        assert_eq!(c.len(), 50);
        let mut left = all(&mut c);
        left.sort();
        assert_eq!(
            left,
            (0..100u8).step_by(2).map(|i| vec![i]).collect::<Vec<_>>()
        );
    }

    #[test]
    fn random_order_varies_and_positions_stay_consistent() {
        let mut c = Candidates::new(Selector::Random);
        for i in 0..20u8 {
            c.insert(&[i], None);
        }
        let firsts: std::collections::HashSet<u8> =
            (0..200).map(|_| c.pick(1, |_| Some(1))[0][0]).collect();
        assert!(firsts.len() > 10, "the first pick is spread: {firsts:?}");
        for i in (0..20u8).step_by(3) {
            c.remove(&[i]);
        }
        let mut left = all(&mut c);
        left.sort();
        let want: Vec<Vec<u8>> = (0..20u8).filter(|i| i % 3 != 0).map(|i| vec![i]).collect();
        assert_eq!(left, want);
    }

    #[test]
    fn block_order_is_highest_block_first_then_none() {
        let mut c = Candidates::new(Selector::BlockId);
        c.insert(b"n", None);
        c.insert(b"a", Some("10"));
        c.insert(b"b", Some("9"));
        c.insert(b"c", Some("1"));
        assert_eq!(
            all(&mut c),
            [&b"b"[..], b"a", b"c", b"n"].map(<[u8]>::to_vec)
        );
        assert_eq!(c.pick(1, |_| Some(1)), vec![b"b".to_vec()]);
        c.remove(b"b");
        assert_eq!(c.pick(1, |_| Some(1)), vec![b"a".to_vec()]);
    }
}
