//! Values keyed by a routing identity, stored in slots: one hash lookup finds a value's
//! slot, and everything that refers to it afterwards (the dispatch candidates, a dispatch
//! pass) holds the slot number instead of a copy of the identity. With thousands of
//! managers each lookup by identity is a cold hash probe and a compare against a cold key;
//! a slot is one index into a dense vector.

use foldhash::{HashMap, HashMapExt};

pub struct Table<V> {
    index: HashMap<Vec<u8>, u32>,
    slots: Vec<Option<V>>,
    free: Vec<u32>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V> Table<V> {
    /// Insert (or replace) the value for `key`; returns its slot.
    pub fn insert(&mut self, key: Vec<u8>, value: V) -> u32 {
        if let Some(&s) = self.index.get(&key) {
            self.slots[s as usize] = Some(value);
            return s;
        }
        let s = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 slots")
        });
        self.slots[s as usize] = Some(value);
        self.index.insert(key, s);
        s
    }

    #[must_use]
    pub fn slot(&self, key: &[u8]) -> Option<u32> {
        self.index.get(key).copied()
    }

    #[must_use]
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        self.at(self.slot(key)?)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let s = self.slot(key)?;
        self.at_mut(s)
    }

    #[must_use]
    pub fn at(&self, slot: u32) -> Option<&V> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn at_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        let s = self.index.remove(key)?;
        self.free.push(s);
        self.slots[s as usize].take()
    }

    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.index.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.index.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().flatten()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots.iter_mut().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_lookups_agree() {
        let mut table: Table<u32> = Table::default();
        let first = table.insert(b"a".to_vec(), 1);
        let second = table.insert(b"b".to_vec(), 2);
        assert_ne!(first, second);
        assert_eq!(table.get(b"a"), Some(&1));
        assert_eq!(table.at(second), Some(&2));
        assert_eq!(
            table.insert(b"a".to_vec(), 3),
            first,
            "replacing keeps the slot"
        );
        assert_eq!(table.remove(b"a"), Some(3));
        assert_eq!(table.get(b"a"), None);
        assert_eq!(table.at(first), None);
        let third = table.insert(b"c".to_vec(), 4);
        assert_eq!(third, first, "a freed slot is reused");
        *table.get_mut(b"c").unwrap() += 1;
        assert_eq!(table.at(third), Some(&5));
        assert_eq!(table.len(), 2);
        let mut values: Vec<u32> = table.values().copied().collect();
        values.sort_unstable();
        assert_eq!(values, [2, 5]);
    }
}
