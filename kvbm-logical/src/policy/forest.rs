//! The leaf bookkeeping shared by the prefix-preserving pools (lineage and adaptive): which
//! members are leaves (no member names their hash as its parent), the same-hash chains of
//! duplicates, and the two slots that keep the common chain patterns out of the heaps.
//!
//! A pool owns a [`Forest`] over its own heap of leaves ([`Leaves`]) and decides the victim
//! from the heap tops and the two slots. Leaves rank by `stamp + bonus[class]` (then stamp):
//! lineage keeps every class 0 and the bonus 0 (plain recency), adaptive sets both.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, TryReserveError};

use super::InactiveEntry;
use super::heap::{ClassedHeap, IndexedHeap, table};
use super::linked::NIL;
use super::tuner::CLASSES;
use crate::hashing::SequenceHash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Absent,
    /// No pool member names this one's hash as its parent: a candidate victim.
    Leaf,
    /// Some pool member is a child: kept until its children go.
    Internal,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Node {
    pub(super) hash: SequenceHash,
    pub(super) parent: SequenceHash,
    pub(super) stamp: u64,
    /// Other pool members with the same hash (duplicates under policy `Allow`).
    same_prev: u32,
    same_next: u32,
    has_parent: bool,
    pub(super) class: u8,
    pub(super) state: State,
}

const ABSENT: Node = Node {
    hash: SequenceHash::new(0),
    parent: SequenceHash::new(0),
    stamp: 0,
    same_prev: NIL,
    same_next: NIL,
    has_parent: false,
    class: 0,
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
    /// Hash → its members and child count.
    map: Map,
    next_stamp: u64,
    /// Victim-order bonus per class (all 0 for plain recency).
    pub(super) bonus: [u64; CLASSES],
}

impl<L: Leaves> Forest<L> {
    /// A forest for block ids `0..capacity` over `leaves`.
    pub(super) fn try_new(capacity: usize, leaves: L) -> Result<Self, TryReserveError> {
        // Entries: at most one per member plus one per parent hash not in the pool, so
        // 2 × capacity. Reserving twice that keeps the table at most half full, where
        // hashbrown reclaims deleted slots by rehashing in place instead of growing.
        let mut map = Map::default();
        map.try_reserve(capacity.saturating_mul(4))?;
        Ok(Self {
            nodes: table(capacity, ABSENT)?,
            leaves,
            fresh: NIL,
            next: NIL,
            len: 0,
            map,
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
        let node = self.nodes[keep as usize];
        self.leaves.push(node.class, keep, node.stamp);
    }

    /// Whether `id` is a leaf held in the heap (not in a slot).
    pub(super) fn in_heap(&self, id: u32) -> bool {
        self.nodes[id as usize].state == State::Leaf && self.fresh != id && self.next != id
    }

    /// Adds a member of frequency class `class` (0 for plain recency).
    pub(super) fn insert(&mut self, entry: InactiveEntry, class: u8) {
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
            class,
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
                let old = self.nodes[self.fresh as usize];
                self.leaves.push(old.class, self.fresh, old.stamp);
            }
            self.fresh = id;
        }
    }

    /// Takes member `id` out; its parent may become a leaf.
    pub(super) fn detach(&mut self, id: u32) {
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

    /// The hash table's capacity (for the test that it never grows).
    #[cfg(test)]
    pub(super) fn map_capacity(&self) -> usize {
        self.map.capacity()
    }

    /// Every invariant, O(capacity); `name` prefixes the messages.
    pub(super) fn check(&self, name: &str) -> Result<(), String> {
        self.leaves.check()?;
        let mut children: HashMap<SequenceHash, u32> = HashMap::new();
        let mut members = 0;
        for node in self.nodes.iter().filter(|n| n.state != State::Absent) {
            members += 1;
            if node.has_parent {
                *children.entry(node.parent).or_default() += 1;
            }
            if node.class as usize >= CLASSES {
                return Err(format!("{name}: class {} out of range", node.class));
            }
        }
        if members != self.len {
            return Err(format!("{name}: {members} nodes, len {}", self.len));
        }
        for (hash, hn) in &self.map {
            if hn.children != children.get(hash).copied().unwrap_or(0) {
                return Err(format!("{name}: child count of {hash} is off"));
            }
            if hn.head == NIL && hn.children == 0 {
                return Err(format!("{name}: empty entry for {hash} kept"));
            }
            if hn.head != NIL && self.nodes[hn.head as usize].hash != *hash {
                return Err(format!("{name}: head of {hash} has another hash"));
            }
        }
        if children.keys().any(|h| !self.map.contains_key(h)) {
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
