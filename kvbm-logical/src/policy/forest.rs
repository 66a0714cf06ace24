//! The leaf bookkeeping shared by the prefix-preserving pools (lineage and adaptive): which
//! members are leaves (no member names their hash as its parent), the same-hash chains of
//! duplicates, and the two slots that keep the common chain patterns out of the heaps.
//!
//! A pool owns a [`Forest`] over its own heap of leaves ([`Leaves`]) and decides the victim
//! from the heap tops and the two slots. Leaves rank by `stamp + bonus[class]` (then stamp):
//! lineage keeps every class 0 and the bonus 0 (plain recency), adaptive sets both.

use std::collections::{HashMap, TryReserveError};

use super::InactiveEntry;
use super::heap::{ClassedHeap, IndexedHeap, table};
use super::linked::NIL;
use super::tuner::CLASSES;
use crate::hashing::SequenceHash;
use crate::index::Index;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Absent,
    /// No pool member names this one's hash as its parent: a candidate victim.
    Leaf,
    /// Some pool member is a child: kept until its children go.
    Internal,
}

/// A pool member. 40 bytes: the parent is held as the index of its hash's record, not the
/// hash, so that removing a member reaches its parent's child count without a hash lookup.
#[derive(Clone, Copy, Debug)]
pub(super) struct Node {
    pub(super) hash: SequenceHash,
    pub(super) stamp: u64,
    /// The record of `hash` (meaningful while a member).
    own: u32,
    /// The record of the parent's hash, or `NIL` for a root.
    parent: u32,
    /// Other pool members with the same hash (duplicates under policy `Allow`).
    same_prev: u32,
    same_next: u32,
    pub(super) class: u8,
    pub(super) state: State,
}

const ABSENT: Node = Node {
    hash: SequenceHash::new(0),
    stamp: 0,
    own: NIL,
    parent: NIL,
    same_prev: NIL,
    same_next: NIL,
    class: 0,
    state: State::Absent,
};

/// Per hash in use (a member's own or a member's parent's): one pool member with it (the
/// others hang off `same_next`), and how many members name it as their parent. Records
/// live in a preallocated slab; the hash table maps a hash to its record's index, and
/// members hold the indices of their own and their parent's records, so only adding a
/// member (to find or create its records) and dropping a record that emptied probe the
/// table. A record that empties when its hash's last child leaves (the hash itself already
/// gone) is dropped only after a number of others have, so that a prefix taken out of the
/// pool and put back (matched, then released) keeps its records.
#[derive(Clone, Copy, Debug)]
struct Rec {
    hash: SequenceHash,
    /// A member with this hash, or `NIL`; for a free record, the next free one.
    head: u32,
    children: u32,
}

/// The key of record `r` of `recs`: its hash.
fn key_in(recs: &[Rec]) -> impl Fn(u32) -> u64 + '_ {
    move |r| recs[r as usize].hash.as_u64()
}

/// A heap of leaves keyed by stamp: one heap (lineage) or one per class (adaptive).
pub(super) trait Leaves {
    fn push(&mut self, class: u8, id: u32, stamp: u64);
    fn remove(&mut self, id: u32) -> bool;
    fn contains(&self, id: u32) -> bool;
    fn check(&self) -> Result<(), String>;
}

impl Leaves for IndexedHeap {
    fn push(&mut self, _class: u8, id: u32, stamp: u64) {
        IndexedHeap::push(self, id, stamp);
    }
    fn remove(&mut self, id: u32) -> bool {
        IndexedHeap::remove(self, id)
    }
    fn contains(&self, id: u32) -> bool {
        IndexedHeap::contains(self, id)
    }
    fn check(&self) -> Result<(), String> {
        IndexedHeap::check(self)
    }
}

impl Leaves for ClassedHeap {
    fn push(&mut self, class: u8, id: u32, stamp: u64) {
        ClassedHeap::push(self, class, id, stamp);
    }
    fn remove(&mut self, id: u32) -> bool {
        ClassedHeap::remove(self, id)
    }
    fn contains(&self, id: u32) -> bool {
        ClassedHeap::contains(self, id)
    }
    fn check(&self) -> Result<(), String> {
        ClassedHeap::check(self)
    }
}

/// Members, their leaf state, and the leaves not in the heap; see the [module docs](self).
#[derive(Debug)]
pub(super) struct Forest<L> {
    pub(super) nodes: Box<[Node]>,
    /// The leaves, except the (at most two) held in `fresh` and `next`.
    pub(super) leaves: L,
    /// The most recently inserted leaf, kept out of the heap: when the next insertion is its
    /// child (a chain released head first, the common case) it stops being a leaf without
    /// ever touching the heap.
    pub(super) fresh: u32,
    /// A leaf uncovered by a removal, kept out of the heap: when eviction walks a chain from
    /// its tail, each parent it uncovers is usually the next victim, again without heap
    /// operations. Holds the lower-ranked of two candidates.
    pub(super) next: u32,
    /// Members.
    pub(super) len: usize,
    /// Hash → index of its record in `recs`.
    map: Index,
    /// Records of the hashes in `map`, and free ones chained from `free`. Two per block id
    /// (each member brings at most its own hash and its parent's), so one is always free
    /// when a hash needs one.
    recs: Box<[Rec]>,
    free: u32,
    /// The record of the most recently inserted member's hash, or `NIL` (always a record in
    /// use): the next insertion's parent, when a chain is released head first, without a
    /// table lookup.
    last: u32,
    /// Records that emptied (no member, no child), oldest first, kept in the index until
    /// `pending.len()` more have: a ring of record indices. An entry may have been reused
    /// since (it is then skipped); each record is in it at most once (`queued`).
    pending: Box<[u32]>,
    pending_start: usize,
    pending_len: usize,
    queued: Box<[bool]>,
    next_stamp: u64,
    /// Victim-order bonus per class (all 0 for plain recency).
    pub(super) bonus: [u64; CLASSES],
}

impl<L: Leaves> Forest<L> {
    /// A forest for block ids `0..capacity` over `leaves`.
    pub(super) fn try_new(capacity: usize, leaves: L) -> Result<Self, TryReserveError> {
        // Hashes in use: at most one per member plus one per parent hash not in the pool,
        // so 2 × capacity; and the emptied records kept, a quarter of the capacity. So a
        // record is free whenever a hash needs one, and the index (sized for them all) is
        // at most 5/8 full; at 2^k blocks it has 4 × 2^k slots, as without the kept ones.
        let kept = capacity.div_ceil(4);
        let records = capacity.saturating_mul(2).saturating_add(kept);
        // Record indices are u32 with `NIL` reserved: more records than that is reported as
        // the capacity overflow it is, by asking for a table no allocator can give.
        let records = if records < NIL as usize {
            records
        } else {
            usize::MAX
        };
        // At most 5/8 full (see `crate::index`): at 2^k blocks, 4 × 2^k slots of 8 bytes.
        let map = Index::with_load(records, 5, 8)?;
        let mut recs = table(
            records,
            Rec {
                hash: SequenceHash::new(0),
                head: NIL,
                children: 0,
            },
        )?;
        // Free list: 0 → 1 → … → NIL. Ids are u32, so the record count fits too.
        for (i, rec) in recs.iter_mut().enumerate() {
            rec.head = if i + 1 < records { (i + 1) as u32 } else { NIL };
        }
        Ok(Self {
            nodes: table(capacity, ABSENT)?,
            leaves,
            fresh: NIL,
            next: NIL,
            len: 0,
            map,
            recs,
            free: if records > 0 { 0 } else { NIL },
            last: NIL,
            pending: table(kept, NIL)?,
            pending_start: 0,
            pending_len: 0,
            queued: table(records, false)?,
            next_stamp: 0,
            bonus: [0; CLASSES],
        })
    }

    pub(super) fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// The victim order of a node: smaller goes first.
    pub(super) fn rank(&self, node: &Node) -> (u64, u64) {
        (
            node.stamp.saturating_add(self.bonus[node.class as usize]),
            node.stamp,
        )
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.nodes
            .get(id as usize)
            .is_some_and(|n| n.state != State::Absent)
    }

    /// The record of `hash`, created empty if it has none (one table probe).
    fn record(&mut self, hash: SequenceHash) -> u32 {
        match self.map.find(hash.as_u64(), key_in(&self.recs)) {
            Ok(r) => r,
            Err(vacant) => {
                let r = self.free;
                debug_assert_ne!(r, NIL, "more hashes than records");
                let rec = &mut self.recs[r as usize];
                self.free = rec.head;
                *rec = Rec {
                    hash,
                    head: NIL,
                    children: 0,
                };
                let inserted = self.map.insert(vacant, r);
                debug_assert!(inserted, "the index has room for every record");
                r
            }
        }
    }

    /// Record `r`, of a hash not in the pool, lost its last child: a prefix being taken
    /// out of the pool head first (matched), likely to come back (released). It stays in
    /// the index for now, and the record that emptied longest ago goes if there are too
    /// many.
    fn emptied(&mut self, r: u32) {
        if self.queued[r as usize] {
            // Already waiting (it emptied, was reused, and emptied again).
            return;
        }
        let kept = self.pending.len();
        if kept == 0 {
            self.drop_record(r);
            return;
        }
        self.queued[r as usize] = true;
        if self.pending_len < kept {
            let mut at = self.pending_start + self.pending_len;
            if at >= kept {
                at -= kept;
            }
            self.pending[at] = r;
            self.pending_len += 1;
            return;
        }
        // Full: the oldest makes room, and goes unless it was reused since.
        let old = std::mem::replace(&mut self.pending[self.pending_start], r);
        self.pending_start += 1;
        if self.pending_start == kept {
            self.pending_start = 0;
        }
        self.queued[old as usize] = false;
        let rec = &self.recs[old as usize];
        if rec.head == NIL && rec.children == 0 {
            self.drop_record(old);
        }
    }

    /// Drops record `r`, without members or children, from the index.
    fn drop_record(&mut self, r: u32) {
        let hash = self.recs[r as usize].hash.as_u64();
        let removed = self.map.remove(hash, r, key_in(&self.recs));
        debug_assert!(removed, "record {r} not in the index");
        let rec = &mut self.recs[r as usize];
        rec.head = self.free;
        self.free = r;
        if self.last == r {
            self.last = NIL;
        }
    }

    /// Sets the state of `head` and the members chained after it.
    fn set_state_from(&mut self, head: u32, state: State) {
        let mut cur = head;
        while cur != NIL {
            let node = &mut self.nodes[cur as usize];
            let was = node.state;
            node.state = state;
            let next = node.same_next;
            match (was, state) {
                (State::Leaf, State::Internal) => self.unleaf(cur),
                (State::Internal, State::Leaf) => self.uncovered(cur),
                _ => {}
            }
            cur = next;
        }
    }

    /// `id` stops being a leaf (or leaves the pool): out of its slot or the heap.
    fn unleaf(&mut self, id: u32) {
        if self.fresh == id {
            self.fresh = NIL;
        } else if self.next == id {
            self.next = NIL;
        } else {
            self.leaves.remove(id);
        }
    }

    /// `id` became a leaf because its last child left: it takes the `next` slot if it ranks
    /// before the slot's holder (which then goes to the heap), else the heap.
    fn uncovered(&mut self, id: u32) {
        let keep = if self.next == NIL {
            self.next = id;
            return;
        } else if self.rank(&self.nodes[id as usize]) < self.rank(&self.nodes[self.next as usize]) {
            std::mem::replace(&mut self.next, id)
        } else {
            id
        };
        let node = &self.nodes[keep as usize];
        self.leaves.push(node.class, keep, node.stamp);
    }

    /// Whether `id` is a leaf held in the heap (not in a slot).
    pub(super) fn in_heap(&self, id: u32) -> bool {
        self.nodes[id as usize].state == State::Leaf && self.fresh != id && self.next != id
    }

    /// Whether `id` is a member with no other member of the same hash.
    pub(super) fn is_single(&self, id: u32) -> bool {
        self.contains(id) && {
            let node = &self.nodes[id as usize];
            node.same_prev == NIL && node.same_next == NIL
        }
    }

    /// Adds a member of frequency class `class` (0 for plain recency).
    pub(super) fn insert(&mut self, entry: InactiveEntry, class: u8) {
        let id = entry.id.get();
        let stamp = self.stamp();
        // The parent's record: the previous insertion's when this continues its chain.
        let parent = match entry.parent {
            None => NIL,
            Some(p) if self.last != NIL && self.recs[self.last as usize].hash == p => self.last,
            Some(p) => self.record(p),
        };
        let own = if parent != NIL && entry.parent == Some(entry.hash) {
            parent
        } else {
            self.record(entry.hash)
        };
        self.last = own;
        let rec = &mut self.recs[own as usize];
        let head = std::mem::replace(&mut rec.head, id);
        // A block naming its own hash as parent (a cycle real hashes never form) is its own
        // child: never a leaf.
        let has_children = rec.children > 0 || own == parent;
        if head != NIL {
            self.nodes[head as usize].same_prev = id;
        }
        self.nodes[id as usize] = Node {
            hash: entry.hash,
            stamp,
            own,
            parent,
            same_prev: NIL,
            same_next: head,
            class,
            state: if has_children {
                State::Internal
            } else {
                State::Leaf
            },
        };
        self.len += 1;
        if parent != NIL {
            let rec = &mut self.recs[parent as usize];
            rec.children += 1;
            if rec.children == 1 {
                let head = rec.head;
                self.set_state_from(head, State::Internal);
            }
        }
        if !has_children {
            // The newest leaf takes the `fresh` slot; the previous holder goes to the heap.
            if self.fresh != NIL {
                let old = &self.nodes[self.fresh as usize];
                self.leaves.push(old.class, self.fresh, old.stamp);
            }
            self.fresh = id;
        }
    }

    /// Takes member `id` out; its parent may become a leaf.
    pub(super) fn detach(&mut self, id: u32) {
        let node = &mut self.nodes[id as usize];
        debug_assert_ne!(node.state, State::Absent);
        let was = std::mem::replace(&mut node.state, State::Absent);
        let node = *node;
        if was == State::Leaf {
            self.unleaf(id);
        }
        self.len -= 1;
        // Out of the same-hash chain.
        if node.same_next != NIL {
            self.nodes[node.same_next as usize].same_prev = node.same_prev;
        }
        if node.same_prev != NIL {
            self.nodes[node.same_prev as usize].same_next = node.same_next;
        } else {
            let rec = &mut self.recs[node.own as usize];
            rec.head = node.same_next;
            // Its last member went: eviction walking a chain, or a block freed for good.
            // Dropped now, unless it already waits in the ring.
            if rec.head == NIL && rec.children == 0 && !self.queued[node.own as usize] {
                self.drop_record(node.own);
            }
        }
        // One child fewer for the parent; the last one makes it a leaf again.
        if node.parent != NIL {
            let rec = &mut self.recs[node.parent as usize];
            rec.children -= 1;
            if rec.children == 0 {
                let head = rec.head;
                if head == NIL {
                    self.emptied(node.parent);
                } else {
                    self.set_state_from(head, State::Leaf);
                }
            }
        }
    }

    /// The least recently used member, by a scan: only needed when no member is a leaf,
    /// which takes a cycle of parent hashes (real chained hashes never form one). O(capacity),
    /// once per cycle broken.
    pub(super) fn oldest_member(&self) -> Option<u32> {
        (self.len > 0).then_some(())?;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.state != State::Absent)
            .min_by_key(|(_, n)| n.stamp)
            .map(|(id, _)| id as u32)
    }

    /// The hash index's slots and the keys it holds now (for the test of its bound).
    #[cfg(test)]
    pub(super) fn map_size(&self) -> (usize, usize) {
        (self.map.slots(), self.map.len())
    }

    /// Every invariant, O(capacity); `name` prefixes the messages.
    pub(super) fn check(&self, name: &str) -> Result<(), String> {
        self.leaves.check()?;
        // Records: those in the index are in use, found from their hash, tagged with it;
        // the rest are free.
        let mut in_use = vec![false; self.recs.len()];
        for r in self.map.records() {
            if r as usize >= self.recs.len() || std::mem::replace(&mut in_use[r as usize], true) {
                return Err(format!("{name}: record {r} out of range or indexed twice"));
            }
        }
        self.map
            .check(key_in(&self.recs))
            .map_err(|e| format!("{name}: {e}"))?;
        let (mut free, mut cur) = (0, self.free);
        while cur != NIL {
            if in_use.get(cur as usize) != Some(&false) || free >= self.recs.len() {
                return Err(format!("{name}: free list broken at record {cur}"));
            }
            free += 1;
            cur = self.recs[cur as usize].head;
        }
        if free + self.map.len() != self.recs.len() {
            return Err(format!(
                "{name}: {free} free records, {} used",
                self.map.len()
            ));
        }
        if self.last != NIL && !in_use[self.last as usize] {
            return Err(format!("{name}: last record {} is free", self.last));
        }
        // The ring of emptied records: each at most once, exactly the `queued` ones, all in
        // the index.
        let kept = self.pending.len();
        let mut in_ring = vec![false; self.recs.len()];
        for k in 0..self.pending_len.min(kept) {
            let r = self.pending[(self.pending_start + k) % kept.max(1)] as usize;
            if r >= self.recs.len() || std::mem::replace(&mut in_ring[r], true) || !in_use[r] {
                return Err(format!("{name}: emptied record {r} listed wrongly"));
            }
        }
        if self.pending_len > kept || in_ring[..] != self.queued[..] {
            return Err(format!("{name}: the emptied records' flags are off"));
        }
        let mut children: HashMap<SequenceHash, u32> = HashMap::new();
        let mut members = 0;
        for node in self.nodes.iter().filter(|n| n.state != State::Absent) {
            members += 1;
            let own = self.recs.get(node.own as usize);
            if own.is_none_or(|r| r.hash != node.hash) || !in_use[node.own as usize] {
                return Err(format!(
                    "{name}: a member of {} has a wrong record",
                    node.hash
                ));
            }
            if node.parent != NIL {
                if !in_use.get(node.parent as usize).is_some_and(|&u| u) {
                    return Err(format!(
                        "{name}: a child of {} has a free parent",
                        node.hash
                    ));
                }
                *children
                    .entry(self.recs[node.parent as usize].hash)
                    .or_default() += 1;
            }
            if node.class as usize >= CLASSES {
                return Err(format!("{name}: class {} out of range", node.class));
            }
        }
        if members != self.len {
            return Err(format!("{name}: {members} nodes, len {}", self.len));
        }
        for r in self.map.records() {
            let rec = &self.recs[r as usize];
            let hash = rec.hash;
            if rec.children != children.get(&hash).copied().unwrap_or(0) {
                return Err(format!("{name}: child count of {hash} is off"));
            }
            if rec.head == NIL && rec.children == 0 && !self.queued[r as usize] {
                return Err(format!("{name}: empty record of {hash} not listed"));
            }
            if rec.head != NIL {
                let head = &self.nodes[rec.head as usize];
                if head.hash != hash || head.state == State::Absent || head.same_prev != NIL {
                    return Err(format!("{name}: head of {hash} is off"));
                }
            }
        }
        if self.map.len() > self.map.capacity() {
            return Err(format!(
                "{name}: index holds {} keys, over its {}",
                self.map.len(),
                self.map.capacity()
            ));
        }
        if children
            .keys()
            .any(|&h| self.map.get(h.as_u64(), key_in(&self.recs)).is_none())
        {
            return Err(format!("{name}: a parent's child count is missing"));
        }
        for slot in [self.fresh, self.next] {
            if slot != NIL && self.nodes[slot as usize].state != State::Leaf {
                return Err(format!("{name}: slot holds node {slot}, not a leaf"));
            }
        }
        if self.fresh != NIL && self.fresh == self.next {
            return Err(format!("{name}: one node in both slots"));
        }
        for (id, node) in self.nodes.iter().enumerate() {
            let id = id as u32;
            let leaf = !children.contains_key(&node.hash);
            let slotted = id == self.fresh || id == self.next;
            let ok = match node.state {
                State::Absent => !self.leaves.contains(id) && !slotted,
                // Every leaf is in the heap or in exactly one slot.
                State::Leaf => leaf && (self.leaves.contains(id) != slotted),
                State::Internal => !leaf && !self.leaves.contains(id) && !slotted,
            };
            if !ok {
                return Err(format!("{name}: node {id} in state {:?}", node.state));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_records_than_u32_indices_is_an_error_not_a_wrap() {
        // 2^31 blocks need 2.25 × 2^31 records, past u32: refused before allocating any.
        let leaves = IndexedHeap::try_new(0).unwrap();
        assert!(Forest::try_new(1 << 31, leaves).is_err());
    }
}
