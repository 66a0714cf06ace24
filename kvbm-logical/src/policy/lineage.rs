//! Lineage (leaf-first) eviction.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, TryReserveError};

use super::heap::IndexedHeap;
use super::linked::NIL;
use super::{InactiveEntry, InactivePool};
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Absent,
    /// No inactive block names this one's hash as its parent: evictable.
    Leaf,
    /// Some inactive block is a child: kept until its children go.
    Internal,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    hash: SequenceHash,
    parent: SequenceHash,
    stamp: u64,
    /// Other pool members with the same hash (duplicates under policy `Allow`).
    same_prev: u32,
    same_next: u32,
    has_parent: bool,
    state: State,
}

const ABSENT: Node = Node {
    hash: SequenceHash::new(0),
    parent: SequenceHash::new(0),
    stamp: 0,
    same_prev: NIL,
    same_next: NIL,
    has_parent: false,
    state: State::Absent,
};

/// Per hash: one pool member with it (the others hang off `same_next`), and how many members
/// name it as their parent. One table, so that each operation probes it at most twice.
#[derive(Clone, Copy, Debug)]
struct HashNode {
    head: u32,
    children: u32,
}

const EMPTY: HashNode = HashNode {
    head: NIL,
    children: 0,
};

type Map = HashMap<SequenceHash, HashNode, foldhash::fast::RandomState>;

/// Leaf-first eviction: a block is evictable only when no block in the pool names it as
/// its parent, so a cached prefix is never evicted before its tail and prefix chains stay
/// matchable as long as possible. Among leaves, the least recently used goes first.
///
/// Parents are known by hash (from [`CompleteBlock::with_parent`] or
/// [`MutableBlock::stage_token_block`]); a block staged without a parent is a root. If the
/// pool holds blocks but no leaf (only possible with a cycle of parent hashes, which real
/// chained hashes never form), the least recently used block overall is the victim, found
/// by a scan, so `pop_victim` never fails on a non-empty pool.
///
/// O(log n) per operation (an indexed heap of leaves; O(1) for a chain released head first
/// and for eviction walking a chain from its tail, which bypass the heap), amortised O(1)
/// hash-table upkeep, and no allocation after construction (the table is sized for the
/// twice its largest possible content, so hashbrown always rehashes in place, never grows).
///
/// [`CompleteBlock::with_parent`]: crate::CompleteBlock::with_parent
/// [`MutableBlock::stage_token_block`]: crate::MutableBlock::stage_token_block
///
/// ```
/// use kvbm_logical::policy::{InactiveEntry, InactivePool, LineagePool};
/// use kvbm_logical::{BlockId, SequenceHash};
/// let (a, b) = (SequenceHash::new(1), SequenceHash::new(2));
/// let mut pool = LineagePool::new(4);
/// pool.insert(InactiveEntry::new(BlockId::new(0), b, Some(a))); // the tail, released first
/// pool.insert(InactiveEntry::new(BlockId::new(1), a, None)); // its prefix
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(0))); // the tail goes first anyway
/// assert_eq!(pool.pop_victim(), Some(BlockId::new(1)));
/// ```
#[derive(Debug)]
pub struct LineagePool {
    nodes: Box<[Node]>,
    /// The leaves, except the (at most two) held in `fresh` and `next`.
    leaves: IndexedHeap,
    /// The most recently inserted leaf, kept out of the heap: when the next insertion is its
    /// child (a chain released head first, the common case) it stops being a leaf without
    /// ever touching the heap.
    fresh: u32,
    /// A leaf uncovered by a removal, kept out of the heap: when eviction walks a chain from
    /// its tail, each parent it uncovers is the next victim, again without heap operations.
    /// Holds the older of two candidates.
    next: u32,
    /// Members.
    len: usize,
    /// Hash → its members and child count.
    map: Map,
    next_stamp: u64,
}

impl LineagePool {
    /// A pool for block ids `0..capacity`.
    ///
    /// # Panics
    /// If the tables cannot be allocated; see [`try_new`](Self::try_new).
    pub fn new(capacity: usize) -> Self {
        match Self::try_new(capacity) {
            Ok(pool) => pool,
            Err(e) => panic!("cannot allocate a lineage pool for {capacity} blocks: {e}"),
        }
    }

    /// A pool for block ids `0..capacity`, reporting an allocation failure.
    pub fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        let mut nodes = Vec::new();
        nodes.try_reserve_exact(capacity)?;
        nodes.resize(capacity, ABSENT);
        // At most one entry per member plus one per parent hash not in the pool: 2 × capacity
        // (a smaller table than that would have to grow; a larger one misses cache more).
        // Entries: at most one per member plus one per parent hash not in the pool, so
        // 2 × capacity. Reserving twice that keeps the table at most half full, where
        // hashbrown reclaims deleted slots by rehashing in place instead of growing.
        let mut map = Map::default();
        map.try_reserve(capacity.saturating_mul(4))?;
        Ok(Self {
            nodes: nodes.into_boxed_slice(),
            leaves: IndexedHeap::try_new(capacity)?,
            fresh: NIL,
            next: NIL,
            len: 0,
            map,
            next_stamp: 0,
        })
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
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

    /// `id` became a leaf because its last child left: it takes the `next` slot if it is
    /// older than the slot's holder (which then goes to the heap), else the heap.
    fn uncovered(&mut self, id: u32) {
        let stamp = self.nodes[id as usize].stamp;
        if self.next == NIL {
            self.next = id;
        } else if stamp < self.nodes[self.next as usize].stamp {
            let old = std::mem::replace(&mut self.next, id);
            self.leaves.push(old, self.nodes[old as usize].stamp);
        } else {
            self.leaves.push(id, stamp);
        }
    }

    /// The least recently used member, by a scan: only needed when no member is a leaf,
    /// which takes a cycle of parent hashes (real chained hashes never form one). O(capacity),
    /// once per cycle broken.
    fn oldest_member(&self) -> Option<u32> {
        (self.len > 0).then_some(())?;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.state != State::Absent)
            .min_by_key(|(_, n)| n.stamp)
            .map(|(id, _)| id as u32)
    }

    /// The least recently used leaf: the older of the heap's top and the two slots.
    fn oldest_leaf(&self) -> Option<u32> {
        let mut best = self.leaves.peek();
        for slot in [self.fresh, self.next] {
            if slot != NIL {
                let stamp = self.nodes[slot as usize].stamp;
                if best.is_none_or(|(_, s)| stamp < s) {
                    best = Some((slot, stamp));
                }
            }
        }
        best.map(|(id, _)| id)
    }

    fn detach(&mut self, id: u32) {
        let node = self.nodes[id as usize];
        debug_assert_ne!(node.state, State::Absent);
        if node.state == State::Leaf {
            self.unleaf(id);
        }
        self.len -= 1;
        self.nodes[id as usize] = ABSENT;
        // Out of the same-hash chain.
        if node.same_next != NIL {
            self.nodes[node.same_next as usize].same_prev = node.same_prev;
        }
        if node.same_prev != NIL {
            self.nodes[node.same_prev as usize].same_next = node.same_next;
        } else if let Entry::Occupied(mut entry) = self.map.entry(node.hash) {
            let hn = entry.get_mut();
            hn.head = node.same_next;
            if hn.head == NIL && hn.children == 0 {
                entry.remove();
            }
        }
        // One child fewer for the parent; the last one makes it a leaf again.
        if node.has_parent
            && let Entry::Occupied(mut entry) = self.map.entry(node.parent)
        {
            let hn = entry.get_mut();
            hn.children -= 1;
            if hn.children == 0 {
                let head = hn.head;
                if head == NIL {
                    entry.remove();
                } else {
                    self.set_state_from(head, State::Leaf);
                }
            }
        }
    }
}

impl InactivePool for LineagePool {
    fn name(&self) -> &'static str {
        "lineage"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let id = entry.id.get();
        let stamp = self.stamp();
        let own = self.map.entry(entry.hash).or_insert(EMPTY);
        let head = std::mem::replace(&mut own.head, id);
        // A block naming its own hash as parent (a cycle real hashes never form) is its own
        // child: never a leaf.
        let has_children = own.children > 0 || entry.parent == Some(entry.hash);
        if head != NIL {
            self.nodes[head as usize].same_prev = id;
        }
        self.nodes[id as usize] = Node {
            hash: entry.hash,
            parent: entry.parent.unwrap_or(SequenceHash::new(0)),
            stamp,
            same_prev: NIL,
            same_next: head,
            has_parent: entry.parent.is_some(),
            state: if has_children {
                State::Internal
            } else {
                State::Leaf
            },
        };
        self.len += 1;
        if let Some(parent) = entry.parent {
            let hn = self.map.entry(parent).or_insert(EMPTY);
            hn.children += 1;
            if hn.children == 1 {
                let head = hn.head;
                self.set_state_from(head, State::Internal);
            }
        }
        if !has_children {
            // The newest leaf takes the `fresh` slot; the previous holder goes to the heap.
            if self.fresh != NIL {
                let old = self.fresh;
                self.leaves.push(old, self.nodes[old as usize].stamp);
            }
            self.fresh = id;
        }
    }

    fn remove(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.detach(id.get());
        true
    }

    fn pop_victim(&mut self) -> Option<BlockId> {
        let id = match self.oldest_leaf() {
            Some(id) => id,
            None => self.oldest_member()?,
        };
        self.detach(id);
        Some(BlockId::new(id))
    }

    fn touch(&mut self, id: BlockId) -> bool {
        if !self.contains(id) {
            return false;
        }
        let stamp = self.stamp();
        let node = &mut self.nodes[id.index()];
        node.stamp = stamp;
        let id = id.get();
        if node.state == State::Leaf && self.fresh != id && self.next != id {
            self.leaves.update(id, stamp);
        }
        true
    }

    fn len(&self) -> usize {
        self.len
    }

    fn contains(&self, id: BlockId) -> bool {
        self.nodes
            .get(id.index())
            .is_some_and(|n| n.state != State::Absent)
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.leaves.check()?;
        let mut children: HashMap<SequenceHash, u32> = HashMap::new();
        let mut members = 0;
        for node in self.nodes.iter().filter(|n| n.state != State::Absent) {
            members += 1;
            if node.has_parent {
                *children.entry(node.parent).or_default() += 1;
            }
        }
        if members != self.len() {
            return Err(format!("lineage: {members} nodes, len {}", self.len()));
        }
        for (hash, hn) in &self.map {
            if hn.children != children.get(hash).copied().unwrap_or(0) {
                return Err(format!("lineage: child count of {hash} is off"));
            }
            if hn.head == NIL && hn.children == 0 {
                return Err(format!("lineage: empty entry for {hash} kept"));
            }
            if hn.head != NIL && self.nodes[hn.head as usize].hash != *hash {
                return Err(format!("lineage: head of {hash} has another hash"));
            }
        }
        if children.keys().any(|h| !self.map.contains_key(h)) {
            return Err("lineage: a parent's child count is missing".into());
        }
        for slot in [self.fresh, self.next] {
            if slot != NIL && self.nodes[slot as usize].state != State::Leaf {
                return Err(format!("lineage: slot holds node {slot}, not a leaf"));
            }
        }
        if self.fresh != NIL && self.fresh == self.next {
            return Err("lineage: one node in both slots".into());
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
                return Err(format!("lineage: node {id} in state {:?}", node.state));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_table_never_grows() {
        // Each pool has its own random hash seed; try many, with chains cut often so that
        // parents are absent (the table's worst case: two entries per member).
        for seed in 0..32u64 {
            let mut pool = LineagePool::new(64);
            let capacity = pool.map.capacity();
            let mut next = seed << 32 | 1;
            for round in 0..100u64 {
                for i in 0..64u32 {
                    let id = BlockId::new(i);
                    if pool.contains(id) {
                        continue;
                    }
                    let parent = ((next + round) % 3 != 0).then(|| SequenceHash::new(next + 7919));
                    pool.insert(InactiveEntry::new(id, SequenceHash::new(next), parent));
                    next += 1;
                }
                for _ in 0..(16 + round % 48) {
                    pool.pop_victim();
                }
                // Growing would at least double it; deleted slots only lower the reported
                // capacity until an in-place rehash restores it.
                assert!(
                    pool.map.capacity() <= capacity,
                    "the table grew (seed {seed})"
                );
            }
            pool.check_invariants().unwrap();
        }
    }
}
