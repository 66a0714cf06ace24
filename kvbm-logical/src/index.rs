//! A fixed-capacity hash index from 64-bit keys to `u32` records whose keys the caller
//! keeps (the registry's slots, the lineage forest's records): open addressing with linear
//! probing, at most a fixed fraction full (a quarter for the registry: runs stay short, a
//! miss or a removal looks at ~1.4 slots), deletion by shifting the rest of the run back
//! (no tombstones).
//!
//! It never grows or rehashes, so it allocates only when built. A slot is 8 bytes: the
//! record and the top half of the key's mixed hash, which gives the key's home slot without
//! mixing it again and rules out all but the right record before the caller's key is read.
//! Against hashbrown sized to rehash in place (16-byte entries plus a control byte, at most
//! a quarter full), it is half the memory.
//!
//! The mix is MurmurHash3's 64-bit finaliser of the key XOR a per-index random seed:
//! consecutive keys (ids from a trace, test hashes) spread like random ones, and which keys
//! share a home is not predictable from outside the process.

use std::collections::TryReserveError;

/// The empty slot's record.
const EMPTY: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// The top 32 bits of the key's mix.
    tag: u32,
    /// The key's record, `EMPTY` for an empty slot.
    rec: u32,
}

/// Where an absent key would go; see [`Index::find`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vacant {
    at: usize,
    tag: u32,
}

/// Key → record; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Index {
    slots: Box<[Slot]>,
    /// `slots.len()` is `1 << (64 - shift)`: a key's home slot is its mix's top bits.
    shift: u32,
    len: usize,
    seed: u64,
    /// The most keys it takes.
    capacity: usize,
}

impl Index {
    /// Room for `entries` keys, at most a quarter full (the table is at least four times
    /// that, a power of two).
    pub(crate) fn try_new(entries: usize) -> Result<Self, TryReserveError> {
        Self::with_load(entries, 1, 4)
    }

    /// Room for `entries` keys, at most `num / den` full (`0 < num / den < 1`): the table
    /// is the power of two at or above `entries × den / num`, and takes that fraction of it.
    pub(crate) fn with_load(
        entries: usize,
        num: usize,
        den: usize,
    ) -> Result<Self, TryReserveError> {
        debug_assert!(0 < num && num < den, "a load below one");
        let size = entries
            .saturating_mul(den)
            .div_ceil(num)
            .max(2)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        let mut slots = Vec::new();
        // An impossible size fails here, as an allocation.
        slots.try_reserve_exact(size)?;
        slots.resize(size, Slot { tag: 0, rec: EMPTY });
        Ok(Self {
            slots: slots.into_boxed_slice(),
            shift: 64 - size.trailing_zeros(),
            len: 0,
            capacity: (size as u128 * num as u128 / den as u128) as usize,
            seed: std::hash::BuildHasher::hash_one(&foldhash::fast::RandomState::default(), 0u64),
        })
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The most keys it takes (its load bound times its slots).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Its slots.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn mix(&self, key: u64) -> u64 {
        let mut x = key ^ self.seed;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    #[inline]
    fn wrap(&self, i: usize) -> usize {
        i & (self.slots.len() - 1)
    }

    /// The home slot of the key in `slot` (`key_of` gives a record's key).
    #[inline]
    fn home_of(&self, slot: Slot, key_of: impl Fn(u32) -> u64) -> usize {
        if self.shift >= 32 {
            (slot.tag >> (self.shift - 32)) as usize
        } else {
            // Over 2^32 slots: the tag is shorter than the home.
            (self.mix(key_of(slot.rec)) >> self.shift) as usize
        }
    }

    /// The record of `key` (`key_of` gives a record's key), or where it would go.
    #[inline]
    pub(crate) fn find(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Result<u32, Vacant> {
        self.find_mixed(self.mix(key), key, key_of)
    }

    /// [`find`](Self::find) with `key`'s [mix](Self::mixed) already computed.
    #[inline]
    pub(crate) fn find_mixed(
        &self,
        mixed: u64,
        key: u64,
        key_of: impl Fn(u32) -> u64,
    ) -> Result<u32, Vacant> {
        debug_assert_eq!(mixed, self.mix(key));
        let tag = (mixed >> 32) as u32;
        let mut i = (mixed >> self.shift) as usize;
        loop {
            let slot = self.slots[i];
            if slot.rec == EMPTY {
                return Err(Vacant { at: i, tag });
            }
            if slot.tag == tag && key_of(slot.rec) == key {
                return Ok(slot.rec);
            }
            i = self.wrap(i + 1);
        }
    }

    /// `key`'s mix, for the `_mixed` methods: a batch walk computes it once per key, for
    /// its prefetches and its probe.
    #[inline]
    pub(crate) fn mixed(&self, key: u64) -> u64 {
        self.mix(key)
    }

    /// Starts loading the home slot of the key whose mix is `mixed` (see
    /// [`crate::prefetch`]): a batch walk calls it a few keys ahead of its probes.
    #[inline]
    pub(crate) fn prefetch_mixed(&self, mixed: u64) {
        if let Some(slot) = self.slots.get((mixed >> self.shift) as usize) {
            crate::prefetch::prefetch(slot);
        }
    }

    /// The record in the home slot of the key whose mix is `mixed`, if that slot's tag is
    /// the key's, without reading the caller's key: most likely the key's record (a hint for
    /// prefetching it; a key displaced from its home, or another key with the same tag,
    /// gives none or a wrong one).
    #[inline]
    pub(crate) fn home_record_mixed(&self, mixed: u64) -> Option<u32> {
        let slot = self.slots.get((mixed >> self.shift) as usize)?;
        (slot.rec != EMPTY && slot.tag == (mixed >> 32) as u32).then_some(slot.rec)
    }

    /// The record of `key`, if any.
    #[inline]
    pub(crate) fn get(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        self.find(key, key_of).ok()
    }

    /// [`get`](Self::get) with `key`'s [mix](Self::mixed) already computed.
    #[inline]
    pub(crate) fn get_mixed(
        &self,
        mixed: u64,
        key: u64,
        key_of: impl Fn(u32) -> u64,
    ) -> Option<u32> {
        self.find_mixed(mixed, key, key_of).ok()
    }

    /// Puts `rec` (whose key [`find`](Self::find) did not find, and nothing was inserted
    /// or removed since) where `find` said. Refused (`false`, nothing changes) when the
    /// index is full.
    #[inline]
    pub(crate) fn insert(&mut self, vacant: Vacant, rec: u32) -> bool {
        debug_assert_ne!(rec, EMPTY);
        if self.len >= self.capacity() {
            return false;
        }
        self.slots[vacant.at] = Slot {
            tag: vacant.tag,
            rec,
        };
        self.len += 1;
        true
    }

    /// The slot holding `rec`, whose key is `key`.
    #[inline]
    fn slot_of(&self, key: u64, rec: u32) -> Option<usize> {
        let mut i = (self.mix(key) >> self.shift) as usize;
        loop {
            match self.slots[i].rec {
                r if r == rec => return Some(i),
                EMPTY => return None,
                _ => i = self.wrap(i + 1),
            }
        }
    }

    /// Makes `key`, held by `old`, be held by `new` instead (a record with the same key).
    /// Returns whether `old` held it.
    #[inline]
    pub(crate) fn replace(&mut self, key: u64, old: u32, new: u32) -> bool {
        debug_assert_ne!(new, EMPTY);
        match self.slot_of(key, old) {
            Some(i) => {
                self.slots[i].rec = new;
                true
            }
            None => false,
        }
    }

    /// Removes `key`, held by `rec` (`key_of` gives other records' keys). Returns whether
    /// `rec` held it.
    pub(crate) fn remove(&mut self, key: u64, rec: u32, key_of: impl Fn(u32) -> u64) -> bool {
        let Some(mut hole) = self.slot_of(key, rec) else {
            return false;
        };
        // Close the hole: a later key of the run moves into it unless its home lies
        // (cyclically) after the hole, where it must stay reachable from.
        let mut j = hole;
        loop {
            j = self.wrap(j + 1);
            let slot = self.slots[j];
            if slot.rec == EMPTY {
                break;
            }
            let home = self.home_of(slot, &key_of);
            if self.wrap(j.wrapping_sub(home)) >= self.wrap(j.wrapping_sub(hole)) {
                self.slots[hole] = slot;
                hole = j;
            }
        }
        self.slots[hole].rec = EMPTY;
        self.len -= 1;
        true
    }

    /// The records held, in table order.
    pub(crate) fn records(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().map(|s| s.rec).filter(|&r| r != EMPTY)
    }

    /// Every invariant, O(size): each record is found under its key, with the right tag,
    /// and the count is right.
    pub(crate) fn check(&self, key_of: impl Fn(u32) -> u64) -> Result<(), String> {
        let mut n = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.rec == EMPTY {
                continue;
            }
            n += 1;
            let key = key_of(slot.rec);
            if (self.mix(key) >> 32) as u32 != slot.tag {
                return Err(format!("index slot {i}: tag of another key"));
            }
            if self.get(key, &key_of) != Some(slot.rec) {
                return Err(format!("index slot {i}: record {} not found", slot.rec));
            }
        }
        if n != self.len {
            return Err(format!("index holds {n} keys, counts {}", self.len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Records 0..64, each with a key from `keys` (the caller's side of the index).
    fn key_of(keys: &[u64]) -> impl Fn(u32) -> u64 + '_ {
        move |r| keys[r as usize]
    }

    proptest! {
        /// Against a `HashMap`: inserts of absent keys (up to the capacity), removals,
        /// replacements by another record of the same key, lookups of present and absent
        /// keys; keys drawn from a small range so that runs form and shift back.
        #[test]
        fn behaves_like_a_map(
            ops in prop::collection::vec((0u64..40, 0u8..3), 1..500),
            full in any::<bool>(),
        ) {
            // A quarter full (the registry), or 5/8 (the forest's records), where runs are
            // long and removals shift keys back across the array's end.
            let mut index = if full {
                Index::with_load(20, 5, 8).unwrap()
            } else {
                Index::try_new(32).unwrap()
            };
            let mut model: HashMap<u64, u32> = HashMap::new();
            // Record r holds key keys[r]; records are handed out in order.
            let mut keys: Vec<u64> = Vec::new();
            for (key, op) in ops {
                let found = index.find(key, key_of(&keys));
                prop_assert_eq!(found.ok(), model.get(&key).copied());
                match (op, found) {
                    (0, Err(vacant)) if model.len() < index.capacity() => {
                        let rec = keys.len() as u32;
                        keys.push(key);
                        prop_assert!(index.insert(vacant, rec));
                        model.insert(key, rec);
                    }
                    (1, Ok(rec)) => {
                        prop_assert!(index.remove(key, rec, key_of(&keys)));
                        model.remove(&key);
                    }
                    (2, Ok(rec)) => {
                        let new = keys.len() as u32;
                        keys.push(key);
                        prop_assert!(index.replace(key, rec, new));
                        model.insert(key, new);
                    }
                    _ => {}
                }
                prop_assert_eq!(index.len(), model.len());
                index.check(key_of(&keys)).map_err(TestCaseError::fail)?;
                // The `_mixed` forms answer as the plain ones; the home-slot hint names a
                // record in the index, and a present key's own record exactly when the key
                // sits in its home slot.
                let mixed = index.mixed(key);
                prop_assert_eq!(
                    index.get_mixed(mixed, key, key_of(&keys)),
                    model.get(&key).copied()
                );
                if let Some(r) = index.home_record_mixed(mixed) {
                    prop_assert!(index.records().any(|x| x == r));
                }
                if let Some(&rec) = model.get(&key) {
                    let home = (mixed >> index.shift) as usize;
                    prop_assert_eq!(
                        index.home_record_mixed(mixed) == Some(rec),
                        index.slots[home].rec == rec
                    );
                }
            }
            let mut held: Vec<u32> = index.records().collect();
            let mut expected: Vec<u32> = model.values().copied().collect();
            held.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(held, expected);
        }
    }

    #[test]
    fn a_full_index_refuses_and_removing_a_record_it_lacks_changes_nothing() {
        let mut index = Index::try_new(4).unwrap();
        let keys: Vec<u64> = (100..120).collect();
        for r in 0..index.capacity() as u32 {
            let vacant = index.find(keys[r as usize], key_of(&keys)).unwrap_err();
            assert!(index.insert(vacant, r));
        }
        let r = index.capacity() as u32;
        let vacant = index.find(keys[r as usize], key_of(&keys)).unwrap_err();
        assert!(!index.insert(vacant, r), "over capacity");
        assert!(!index.remove(keys[r as usize], r, key_of(&keys)));
        assert!(
            !index.replace(keys[0], 7, 9),
            "record 7 does not hold key 0"
        );
        assert_eq!(index.len(), index.capacity());
        index.check(key_of(&keys)).unwrap();
    }
}
