//! Lineage (leaf-first) eviction.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, TryReserveError};

use super::heap::IndexedHeap;
use super::linked::{LinkedSlab, NIL};
use super::{InactiveEntry, InactivePool};
use crate::hashing::SequenceHash;
use crate::ids::BlockId;

const ALL: u8 = 0;

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
/// pool holds blocks but no leaf (only possible with a hash cycle, which real hashes never
/// form), the least recently used block overall is the victim, so `pop_victim` never fails
/// on a non-empty pool.
///
/// O(log n) per operation (an indexed heap of leaves), no allocation after construction
/// (the hash tables are sized for the capacity).
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
    leaves: IndexedHeap,
    /// Every member in recency order (the fallback victim order).
    all: LinkedSlab,
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
        let mut map = Map::default();
        map.try_reserve(capacity.saturating_mul(2))?;
        Ok(Self {
            nodes: nodes.into_boxed_slice(),
            leaves: IndexedHeap::try_new(capacity)?,
            all: LinkedSlab::try_new(capacity, 1)?,
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
            let (stamp, next) = (node.stamp, node.same_next);
            match (was, state) {
                (State::Leaf, State::Internal) => {
                    self.leaves.remove(cur);
                }
                (State::Internal, State::Leaf) => self.leaves.push(cur, stamp),
                _ => {}
            }
            cur = next;
        }
    }

    fn detach(&mut self, id: u32) {
        let node = self.nodes[id as usize];
        debug_assert_ne!(node.state, State::Absent);
        if node.state == State::Leaf {
            self.leaves.remove(id);
        }
        self.all.unlink(id);
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
        let has_children = own.children > 0;
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
        if !has_children {
            self.leaves.push(id, stamp);
        }
        self.all.push_back(ALL, id);
        if let Some(parent) = entry.parent {
            let hn = self.map.entry(parent).or_insert(EMPTY);
            hn.children += 1;
            if hn.children == 1 {
                let head = hn.head;
                self.set_state_from(head, State::Internal);
            }
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
        let id = match self.leaves.peek() {
            Some((id, _)) => id,
            None => self.all.front(ALL)?,
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
        if node.state == State::Leaf {
            self.leaves.update(id.get(), stamp);
        }
        self.all.move_to_back(id.get());
        true
    }

    fn len(&self) -> usize {
        self.all.len(ALL)
    }

    fn contains(&self, id: BlockId) -> bool {
        self.nodes
            .get(id.index())
            .is_some_and(|n| n.state != State::Absent)
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.leaves.check()?;
        self.all.check()?;
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
        for (id, node) in self.nodes.iter().enumerate() {
            let leaf = !children.contains_key(&node.hash);
            let ok = match node.state {
                State::Absent => !self.leaves.contains(id as u32),
                State::Leaf => leaf && self.leaves.contains(id as u32),
                State::Internal => !leaf && !self.leaves.contains(id as u32),
            };
            if !ok {
                return Err(format!("lineage: node {id} in state {:?}", node.state));
            }
        }
        Ok(())
    }
}
