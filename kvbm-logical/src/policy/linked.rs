//! Doubly linked lists threaded through one preallocated table indexed by block id.
//!
//! Several lists share the table (a node is in at most one); `prev`/`next` are indices, so
//! there is no `unsafe`, no pointer and no allocation after construction.

use std::collections::TryReserveError;

/// The null index.
pub(crate) const NIL: u32 = u32::MAX;
/// `list` value of a node that is in no list.
const DETACHED: u8 = u8::MAX;

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: u32,
    next: u32,
    list: u8,
}

#[derive(Clone, Copy, Debug)]
struct Ends {
    head: u32,
    tail: u32,
    len: usize,
}

/// `lists` doubly linked lists over node ids `0..capacity`.
#[derive(Debug)]
pub(crate) struct LinkedSlab {
    links: Box<[Link]>,
    lists: Box<[Ends]>,
}

impl LinkedSlab {
    /// Room for ids `0..capacity` in `lists` lists (at most 254).
    pub(crate) fn new(capacity: usize, lists: usize) -> Self {
        match Self::try_new(capacity, lists) {
            Ok(slab) => slab,
            Err(e) => panic!("cannot allocate a {capacity}-node list table: {e}"),
        }
    }

    /// [`new`](Self::new), reporting an allocation failure instead of aborting.
    pub(crate) fn try_new(capacity: usize, lists: usize) -> Result<Self, TryReserveError> {
        assert!(lists < DETACHED as usize, "at most 254 lists");
        let detached = Link {
            prev: NIL,
            next: NIL,
            list: DETACHED,
        };
        let empty = Ends {
            head: NIL,
            tail: NIL,
            len: 0,
        };
        let mut links = Vec::new();
        links.try_reserve_exact(capacity)?;
        links.resize(capacity, detached);
        Ok(Self {
            links: links.into_boxed_slice(),
            lists: vec![empty; lists].into_boxed_slice(),
        })
    }

    /// The list `id` is in, if any. Ids beyond the capacity are in none.
    pub(crate) fn list_of(&self, id: u32) -> Option<u8> {
        self.links
            .get(id as usize)
            .map(|l| l.list)
            .filter(|&l| l != DETACHED)
    }

    /// Number of lists.
    pub(crate) fn lists(&self) -> usize {
        self.lists.len()
    }

    /// Length of `list`.
    pub(crate) fn len(&self, list: u8) -> usize {
        self.lists[list as usize].len
    }

    /// Appends detached node `id` at the back (most recent end) of `list`.
    pub(crate) fn push_back(&mut self, list: u8, id: u32) {
        debug_assert_eq!(
            self.links[id as usize].list, DETACHED,
            "node {id} is linked"
        );
        let ends = &mut self.lists[list as usize];
        let old_tail = ends.tail;
        ends.tail = id;
        if old_tail == NIL {
            ends.head = id;
        }
        ends.len += 1;
        self.links[id as usize] = Link {
            prev: old_tail,
            next: NIL,
            list,
        };
        if old_tail != NIL {
            self.links[old_tail as usize].next = id;
        }
    }

    /// Detaches `id` from whatever list holds it; returns that list.
    pub(crate) fn unlink(&mut self, id: u32) -> Option<u8> {
        let list = self.list_of(id)?;
        let Link { prev, next, .. } = self.links[id as usize];
        let ends = &mut self.lists[list as usize];
        if prev == NIL {
            ends.head = next;
        }
        if next == NIL {
            ends.tail = prev;
        }
        ends.len -= 1;
        if prev != NIL {
            self.links[prev as usize].next = next;
        }
        if next != NIL {
            self.links[next as usize].prev = prev;
        }
        self.links[id as usize] = Link {
            prev: NIL,
            next: NIL,
            list: DETACHED,
        };
        Some(list)
    }

    /// The front (oldest) node of `list`.
    pub(crate) fn front(&self, list: u8) -> Option<u32> {
        let head = self.lists[list as usize].head;
        (head != NIL).then_some(head)
    }

    /// Detaches and returns the front (oldest) node of `list`.
    pub(crate) fn pop_front(&mut self, list: u8) -> Option<u32> {
        let head = self.lists[list as usize].head;
        if head == NIL {
            return None;
        }
        self.unlink(head);
        Some(head)
    }

    /// Moves linked node `id` to the back of its list; returns whether it was linked.
    pub(crate) fn move_to_back(&mut self, id: u32) -> bool {
        match self.unlink(id) {
            Some(list) => {
                self.push_back(list, id);
                true
            }
            None => false,
        }
    }

    /// Checks every list: links agree both ways, lengths match, every linked node is reached
    /// exactly once from its list's head. O(capacity).
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut reached = vec![false; self.links.len()];
        for (list, ends) in self.lists.iter().enumerate() {
            let mut prev = NIL;
            let mut cur = ends.head;
            let mut count = 0usize;
            while cur != NIL {
                let link = self
                    .links
                    .get(cur as usize)
                    .ok_or_else(|| format!("list {list}: node {cur} out of range"))?;
                if reached[cur as usize] {
                    return Err(format!("list {list}: node {cur} reached twice (cycle?)"));
                }
                reached[cur as usize] = true;
                if link.list as usize != list {
                    return Err(format!("list {list}: node {cur} claims list {}", link.list));
                }
                if link.prev != prev {
                    return Err(format!(
                        "list {list}: node {cur} prev {} != {prev}",
                        link.prev
                    ));
                }
                count += 1;
                prev = cur;
                cur = link.next;
            }
            if ends.tail != prev {
                return Err(format!("list {list}: tail {} != last {prev}", ends.tail));
            }
            if count != ends.len {
                return Err(format!("list {list}: len {} != walked {count}", ends.len));
            }
        }
        for (id, link) in self.links.iter().enumerate() {
            if link.list != DETACHED && !reached[id] {
                return Err(format!(
                    "node {id} claims list {} but is unreachable",
                    link.list
                ));
            }
        }
        Ok(())
    }

    /// Ids of `list`, front to back (for tests and invariant checks).
    pub(crate) fn iter(&self, list: u8) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.lists[list as usize].head;
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let id = cur;
                cur = self.links[id as usize].next;
                id
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_unlink_pop_keep_lists_well_formed() {
        let mut s = LinkedSlab::new(8, 2);
        for id in [3, 1, 4, 0] {
            s.push_back(0, id);
        }
        s.push_back(1, 5);
        s.check().unwrap();
        assert_eq!(s.iter(0).collect::<Vec<_>>(), vec![3, 1, 4, 0]);
        assert_eq!(s.unlink(4), Some(0));
        assert_eq!(s.unlink(4), None);
        assert!(s.move_to_back(3));
        assert_eq!(s.iter(0).collect::<Vec<_>>(), vec![1, 0, 3]);
        assert_eq!(s.pop_front(0), Some(1));
        assert_eq!(s.len(0), 2);
        assert_eq!(s.list_of(5), Some(1));
        assert_eq!(s.list_of(6), None);
        assert_eq!(s.list_of(99), None);
        s.check().unwrap();
        assert_eq!(s.pop_front(1), Some(5));
        assert_eq!(s.pop_front(1), None);
        s.check().unwrap();
    }

    #[test]
    fn check_detects_a_broken_link() {
        let mut s = LinkedSlab::new(4, 1);
        s.push_back(0, 0);
        s.push_back(0, 1);
        s.links[1].prev = 3;
        assert!(s.check().is_err());
    }
}
