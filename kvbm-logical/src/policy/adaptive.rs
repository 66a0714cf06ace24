//! Adaptive, prefix-preserving eviction: leaves first, recency weighted by frequency, the
//! weight tuned online by miniature simulations.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, TryReserveError};
use std::sync::Arc;

use super::heap::{ClassedHeap, table};
use super::linked::NIL;
use super::tuner::{CLASSES, Tuner, bonus};
use super::{InactiveEntry, InactivePool};
use crate::frequency::FrequencySketch;
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Absent,
    /// No pool member names this one's hash as its parent: a candidate victim.
    Leaf,
    /// Some pool member is a child: kept until its children go.
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
    class: u8,
    state: State,
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

/// Per hash: one pool member with it (the others hang off `same_next`) and how many members
/// name it as their parent.
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

/// The frequency class of a hash whose sketch estimate (uses so far, this one included) is
/// `estimate`: on a log scale, as the multi-level LRU's levels (1 use → 0, 2–3 → 1, 4–7 → 2,
/// 8 and more → 3), so that a system prompt shared by hundreds of requests outranks one
/// conversation's history.
pub(crate) fn class_of(estimate: u8) -> u8 {
    super::multi_lru::level(estimate)
}

/// Adaptive prefix-preserving eviction.
///
/// * **Prefix-preserving.** Only a *leaf* can be evicted: a block no other pool member names
///   as its parent. A cached prefix is never evicted while an evictable block that extends
///   it remains, so every chain is truncated from its tail and stays matchable up to where it
///   was cut, however the caller released it.
/// * **Frequency-weighted recency.** Each block has a frequency class (0 to 3: used once,
///   2–3 times, 4–7 times, more, by the manager's TinyLFU sketch) and a recency stamp. The victim is the leaf with
///   the smallest `stamp + w × class`: with `w = 0` this is leaf-first LRU (the lineage
///   backend); with a large `w` a block used before outlives any number of one-off blocks.
/// * **Self-tuned.** `w` is picked among 0, ¼, 1 and 4 times the capacity per class, and
///   strict class order, by *miniature simulations*: for each candidate, a scaled-down cache
///   of at least 512 entries replays the uses of a sampled 1/2^k of the hashes, and every
///   `2 × entries` sampled uses the candidate with the most hits is adopted, recency order
///   unless another hits at least 2% more. Workloads that reward frequency (popular shared
///   prefixes, scans of one-off prompts through a small pool) get it; those that do not
///   (working sets that shift) keep LRU order.
///
/// O(log n) per operation (a heap of leaves per class; as in lineage, the newest leaf and the
/// last leaf uncovered by a removal wait outside the heaps, so a chain released head first
/// and evicted tail first never enters them), amortised O(1) hash-table upkeep, and the
/// miniatures cost a sampled fraction of insertions. No allocation after construction.
/// Needs frequency tracking.
pub(crate) struct AdaptivePool {
    nodes: Box<[Node]>,
    /// The leaves except `fresh`, by class, keyed by stamp.
    leaves: ClassedHeap,
    /// The most recently inserted leaf, kept out of the heaps: when the next insertion is its
    /// child (a chain released head first) it stops being a leaf without a heap operation.
    fresh: u32,
    /// A leaf uncovered by a removal, kept out of the heaps: when eviction walks a chain from
    /// its tail, each parent it uncovers is usually the next victim, again without heap
    /// operations. Holds the lower-keyed of two candidates.
    next: u32,
    len: usize,
    map: Map,
    next_stamp: u64,
    sketch: Arc<FrequencySketch>,
    tuner: Tuner,
    /// Victim-order bonus per class under the tuner's weight.
    bonus: [u64; CLASSES],
    capacity: usize,
}

impl std::fmt::Debug for AdaptivePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdaptivePool")
            .field("len", &self.len)
            .field("bonus", &self.bonus)
            .finish_non_exhaustive()
    }
}

impl AdaptivePool {
    /// A pool for block ids `0..capacity` that reads frequencies from `sketch`.
    pub(crate) fn try_new(
        capacity: usize,
        sketch: Arc<FrequencySketch>,
    ) -> Result<Self, TryReserveError> {
        // As in lineage: at most one entry per member plus one per absent parent, and twice
        // that reserved so that hashbrown rehashes in place instead of growing.
        let mut map = Map::default();
        map.try_reserve(capacity.saturating_mul(4))?;
        let tuner = Tuner::try_new(capacity)?;
        let weight = tuner.weight();
        Ok(Self {
            nodes: table(capacity, ABSENT)?,
            leaves: ClassedHeap::try_new(capacity, CLASSES)?,
            fresh: NIL,
            next: NIL,
            len: 0,
            map,
            next_stamp: 0,
            sketch,
            tuner,
            bonus: std::array::from_fn(|c| bonus(weight, capacity, c as u8)),
            capacity,
        })
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Reads the class of `hash` and shows the use to the tuner.
    fn observe(&mut self, hash: SequenceHash) -> u8 {
        let (estimate, mixed) = self.sketch.estimate_and_mix(hash);
        let class = class_of(estimate);
        if self.tuner.observe(hash, mixed, class) {
            let weight = self.tuner.weight();
            self.bonus = std::array::from_fn(|c| bonus(weight, self.capacity, c as u8));
        }
        class
    }

    fn key(&self, id: u32) -> (u64, u64) {
        let node = &self.nodes[id as usize];
        (
            node.stamp.saturating_add(self.bonus[node.class as usize]),
            node.stamp,
        )
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

    /// `id` stops being a leaf (or leaves the pool).
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
    /// before the slot's holder (which then goes to its heap), else its heap.
    fn uncovered(&mut self, id: u32) {
        let keep = if self.next == NIL {
            self.next = id;
            return;
        } else if self.key(id) < self.key(self.next) {
            std::mem::replace(&mut self.next, id)
        } else {
            id
        };
        let node = self.nodes[keep as usize];
        self.leaves.push(node.class, keep, node.stamp);
    }

    /// The leaf to evict: the smallest `stamp + bonus(class)` among the heads of the class
    /// heaps and the two slots.
    fn victim(&self) -> Option<u32> {
        let mut best: Option<(u64, u64, u32)> = None;
        let mut consider = |id: u32, stamp: u64, class: u8| {
            let key = (stamp.saturating_add(self.bonus[class as usize]), stamp);
            if best.is_none_or(|(k, s, _)| key < (k, s)) {
                best = Some((key.0, key.1, id));
            }
        };
        for class in 0..CLASSES as u8 {
            if let Some((id, stamp)) = self.leaves.peek(class) {
                consider(id, stamp, class);
            }
        }
        for slot in [self.fresh, self.next] {
            if slot != NIL {
                let node = &self.nodes[slot as usize];
                consider(slot, node.stamp, node.class);
            }
        }
        best.map(|(_, _, id)| id)
    }

    /// The least recently used member, by a scan: only needed when no member is a leaf,
    /// which takes a cycle of parent hashes (real chained hashes never form one).
    fn oldest_member(&self) -> Option<u32> {
        (self.len > 0).then_some(())?;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.state != State::Absent)
            .min_by_key(|(_, n)| n.stamp)
            .map(|(id, _)| id as u32)
    }

    fn detach(&mut self, id: u32) {
        let node = self.nodes[id as usize];
        debug_assert_ne!(node.state, State::Absent);
        if node.state == State::Leaf {
            self.unleaf(id);
        }
        self.len -= 1;
        self.nodes[id as usize] = ABSENT;
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

impl InactivePool for AdaptivePool {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn insert(&mut self, entry: InactiveEntry) {
        let id = entry.id.get();
        let class = self.observe(entry.hash);
        let stamp = self.stamp();
        let own = self.map.entry(entry.hash).or_insert(EMPTY);
        let head = std::mem::replace(&mut own.head, id);
        // A block naming its own hash as parent is its own child: never a leaf.
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
            if self.fresh != NIL {
                let old = self.nodes[self.fresh as usize];
                self.leaves.push(old.class, self.fresh, old.stamp);
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
        let id = match self.victim() {
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
        let hash = self.nodes[id.index()].hash;
        let class = self.observe(hash);
        let stamp = self.stamp();
        let id = id.get();
        let node = &mut self.nodes[id as usize];
        node.stamp = stamp;
        node.class = class;
        if node.state == State::Leaf && self.fresh != id && self.next != id {
            self.leaves.remove(id);
            self.leaves.push(class, id, stamp);
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
        self.tuner.check()?;
        let mut children: HashMap<SequenceHash, u32> = HashMap::new();
        let mut members = 0;
        for node in self.nodes.iter().filter(|n| n.state != State::Absent) {
            members += 1;
            if node.has_parent {
                *children.entry(node.parent).or_default() += 1;
            }
            if node.class as usize >= CLASSES {
                return Err(format!("adaptive: class {} out of range", node.class));
            }
        }
        if members != self.len {
            return Err(format!("adaptive: {members} nodes, len {}", self.len));
        }
        for (hash, hn) in &self.map {
            if hn.children != children.get(hash).copied().unwrap_or(0) {
                return Err(format!("adaptive: child count of {hash} is off"));
            }
            if hn.head == NIL && hn.children == 0 {
                return Err(format!("adaptive: empty entry for {hash} kept"));
            }
            if hn.head != NIL && self.nodes[hn.head as usize].hash != *hash {
                return Err(format!("adaptive: head of {hash} has another hash"));
            }
        }
        if children.keys().any(|h| !self.map.contains_key(h)) {
            return Err("adaptive: a parent's child count is missing".into());
        }
        if self.fresh != NIL && self.nodes[self.fresh as usize].state != State::Leaf {
            return Err(format!(
                "adaptive: fresh slot holds {}, not a leaf",
                self.fresh
            ));
        }
        for (id, node) in self.nodes.iter().enumerate() {
            let id = id as u32;
            let leaf = !children.contains_key(&node.hash);
            let slotted = id == self.fresh || id == self.next;
            let ok = match node.state {
                State::Absent => !self.leaves.contains(id) && !slotted,
                State::Leaf => leaf && (self.leaves.contains(id) != slotted),
                State::Internal => !leaf && !self.leaves.contains(id) && !slotted,
            };
            if !ok {
                return Err(format!("adaptive: node {id} in state {:?}", node.state));
            }
        }
        Ok(())
    }
}
