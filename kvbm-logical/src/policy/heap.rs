//! An indexed binary min-heap over node ids `0..capacity`, keyed by `u64`.
//!
//! Every operation is O(log n) and allocation-free: the heap array, the position table and
//! the keys are preallocated. Ties cannot happen in our uses (keys embed a unique stamp).

use std::collections::TryReserveError;

use super::linked::NIL;

#[derive(Debug)]
pub(crate) struct IndexedHeap {
    /// Ids, heap-ordered by `key`.
    heap: Vec<u32>,
    /// Position of each id in `heap`, or `NIL`.
    pos: Box<[u32]>,
    /// Key of each id (meaningful while in the heap).
    key: Box<[u64]>,
}

pub(crate) fn table<T: Clone>(capacity: usize, value: T) -> Result<Box<[T]>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(capacity)?;
    v.resize(capacity, value);
    Ok(v.into_boxed_slice())
}

impl IndexedHeap {
    pub(crate) fn try_new(capacity: usize) -> Result<Self, TryReserveError> {
        let mut heap = Vec::new();
        heap.try_reserve_exact(capacity)?;
        Ok(Self {
            heap,
            pos: table(capacity, NIL)?,
            key: table(capacity, 0)?,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.pos.get(id as usize).is_some_and(|&p| p != NIL)
    }

    /// Inserts `id` (not in the heap) with `key`.
    pub(crate) fn push(&mut self, id: u32, key: u64) {
        debug_assert!(!self.contains(id));
        self.key[id as usize] = key;
        let at = self.heap.len();
        self.heap.push(id);
        self.pos[id as usize] = at as u32;
        self.sift_up(at);
    }

    /// The id with the smallest key, and the key.
    pub(crate) fn peek(&self) -> Option<(u32, u64)> {
        self.heap.first().map(|&id| (id, self.key[id as usize]))
    }

    pub(crate) fn pop(&mut self) -> Option<u32> {
        let id = *self.heap.first()?;
        self.remove(id);
        Some(id)
    }

    /// Removes `id`; whether it was there.
    pub(crate) fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        let at = self.pos[id as usize];
        let at = at as usize;
        let last = self.heap.pop().expect("non-empty");
        self.pos[id as usize] = NIL;
        if last != id {
            self.heap[at] = last;
            self.pos[last as usize] = at as u32;
            self.restore(at);
        }
        true
    }

    /// Changes the key of `id` (in the heap); whether it was there.
    pub(crate) fn update(&mut self, id: u32, key: u64) -> bool {
        if !self.contains(id) {
            return false;
        }
        let at = self.pos[id as usize];
        self.key[id as usize] = key;
        self.restore(at as usize);
        true
    }

    fn restore(&mut self, at: usize) {
        if at > 0 && self.less(at, (at - 1) / 2) {
            self.sift_up(at);
        } else {
            self.sift_down(at);
        }
    }

    fn less(&self, a: usize, b: usize) -> bool {
        self.key[self.heap[a] as usize] < self.key[self.heap[b] as usize]
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a] as usize] = a as u32;
        self.pos[self.heap[b] as usize] = b as u32;
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if !self.less(at, parent) {
                break;
            }
            self.swap(at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        let n = self.heap.len();
        loop {
            let left = 2 * at + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let child = if right < n && self.less(right, left) {
                right
            } else {
                left
            };
            if !self.less(child, at) {
                break;
            }
            self.swap(at, child);
            at = child;
        }
    }

    /// Checks heap order and the position table (O(n)).
    pub(crate) fn check(&self) -> Result<(), String> {
        for (at, &id) in self.heap.iter().enumerate() {
            if self.pos[id as usize] as usize != at {
                return Err(format!(
                    "heap: id {id} at {at} but pos says {}",
                    self.pos[id as usize]
                ));
            }
            if at > 0 && self.less(at, (at - 1) / 2) {
                return Err(format!("heap: order broken at {at}"));
            }
        }
        let placed = self.pos.iter().filter(|&&p| p != NIL).count();
        if placed != self.heap.len() {
            return Err(format!(
                "heap: {placed} positions for {} ids",
                self.heap.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_sorted_vec(ops in prop::collection::vec((0u32..32, 0u64..1000, 0u8..4), 1..300)) {
            let mut heap = IndexedHeap::try_new(32).unwrap();
            let mut model: Vec<(u64, u32)> = Vec::new();
            for (id, key, op) in ops {
                // Unique keys: break ties by id, as the real users embed a unique stamp.
                let key = key * 64 + u64::from(id);
                match op {
                    0 => {
                        if !heap.contains(id) {
                            heap.push(id, key);
                            model.push((key, id));
                        }
                    }
                    1 => {
                        let was = model.iter().position(|&(_, i)| i == id);
                        prop_assert_eq!(heap.remove(id), was.is_some());
                        if let Some(p) = was { model.remove(p); }
                    }
                    2 => {
                        let was = model.iter().position(|&(_, i)| i == id);
                        prop_assert_eq!(heap.update(id, key), was.is_some());
                        if let Some(p) = was { model[p].0 = key; }
                    }
                    _ => {
                        let min = model.iter().copied().min();
                        prop_assert_eq!(heap.pop(), min.map(|(_, i)| i));
                        if let Some(m) = min { model.retain(|&x| x != m); }
                    }
                }
                prop_assert_eq!(heap.len(), model.len());
                heap.check().map_err(TestCaseError::fail)?;
            }
        }
    }
}

/// Several indexed binary min-heaps over node ids `0..capacity` (a node is in at most one),
/// sharing one position and key table. O(log n) per operation, allocation-free: every heap
/// array is preallocated to the capacity.
#[derive(Debug)]
pub(crate) struct ClassedHeap {
    heaps: Box<[Vec<u32>]>,
    /// Position of each id in its heap, or `NIL`.
    pos: Box<[u32]>,
    /// Which heap each id is in (meaningful while `pos` is set).
    class: Box<[u8]>,
    key: Box<[u64]>,
}

impl ClassedHeap {
    pub(crate) fn try_new(capacity: usize, classes: usize) -> Result<Self, TryReserveError> {
        let mut heaps = Vec::new();
        heaps.try_reserve_exact(classes)?;
        for _ in 0..classes {
            let mut heap = Vec::new();
            heap.try_reserve_exact(capacity)?;
            heaps.push(heap);
        }
        Ok(Self {
            heaps: heaps.into_boxed_slice(),
            pos: table(capacity, NIL)?,
            class: table(capacity, 0)?,
            key: table(capacity, 0)?,
        })
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.pos.get(id as usize).is_some_and(|&p| p != NIL)
    }

    /// Inserts `id` (in no heap) into heap `class` with `key`.
    pub(crate) fn push(&mut self, class: u8, id: u32, key: u64) {
        debug_assert!(!self.contains(id));
        let i = id as usize;
        self.key[i] = key;
        self.class[i] = class;
        let heap = &mut self.heaps[class as usize];
        let at = heap.len();
        heap.push(id);
        self.pos[i] = at as u32;
        self.sift_up(class, at);
    }

    /// The id with the smallest key in heap `class`, and the key.
    pub(crate) fn peek(&self, class: u8) -> Option<(u32, u64)> {
        self.heaps[class as usize]
            .first()
            .map(|&id| (id, self.key[id as usize]))
    }

    /// Removes `id` from its heap; whether it was in one.
    pub(crate) fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        let i = id as usize;
        let (class, at) = (self.class[i], self.pos[i] as usize);
        let heap = &mut self.heaps[class as usize];
        let last = heap.pop().expect("non-empty");
        self.pos[i] = NIL;
        if last != id {
            heap[at] = last;
            self.pos[last as usize] = at as u32;
            if at > 0 && self.less(class, at, (at - 1) / 2) {
                self.sift_up(class, at);
            } else {
                self.sift_down(class, at);
            }
        }
        true
    }

    fn less(&self, class: u8, a: usize, b: usize) -> bool {
        let heap = &self.heaps[class as usize];
        self.key[heap[a] as usize] < self.key[heap[b] as usize]
    }

    fn swap(&mut self, class: u8, a: usize, b: usize) {
        let heap = &mut self.heaps[class as usize];
        heap.swap(a, b);
        let (x, y) = (heap[a], heap[b]);
        self.pos[x as usize] = a as u32;
        self.pos[y as usize] = b as u32;
    }

    fn sift_up(&mut self, class: u8, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if !self.less(class, at, parent) {
                break;
            }
            self.swap(class, at, parent);
            at = parent;
        }
    }

    fn sift_down(&mut self, class: u8, mut at: usize) {
        let n = self.heaps[class as usize].len();
        loop {
            let left = 2 * at + 1;
            if left >= n {
                break;
            }
            let right = left + 1;
            let child = if right < n && self.less(class, right, left) {
                right
            } else {
                left
            };
            if !self.less(class, child, at) {
                break;
            }
            self.swap(class, at, child);
            at = child;
        }
    }

    /// Checks every heap's order and the shared tables (O(n)).
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut placed = 0;
        for (class, heap) in self.heaps.iter().enumerate() {
            for (at, &id) in heap.iter().enumerate() {
                let i = id as usize;
                if self.pos[i] as usize != at || self.class[i] as usize != class {
                    return Err(format!("classed heap: id {id} misplaced"));
                }
                if at > 0 && self.less(class as u8, at, (at - 1) / 2) {
                    return Err(format!("classed heap {class}: order broken at {at}"));
                }
            }
            placed += heap.len();
        }
        let positions = self.pos.iter().filter(|&&p| p != NIL).count();
        if positions != placed {
            return Err(format!(
                "classed heap: {positions} positions for {placed} ids"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod classed_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_sorted_vecs(ops in prop::collection::vec((0u32..32, 0u64..1000, 0u8..3, 0u8..3), 1..300)) {
            let mut heap = ClassedHeap::try_new(32, 3).unwrap();
            let mut model: Vec<(u8, u64, u32)> = Vec::new();
            for (id, key, class, op) in ops {
                let key = key * 64 + u64::from(id);
                match op {
                    0 => {
                        if !heap.contains(id) {
                            heap.push(class, id, key);
                            model.push((class, key, id));
                        }
                    }
                    1 => {
                        let was = model.iter().position(|&(_, _, i)| i == id);
                        prop_assert_eq!(heap.remove(id), was.is_some());
                        if let Some(p) = was { model.remove(p); }
                    }
                    _ => {
                        let min = model.iter().filter(|m| m.0 == class).map(|m| (m.1, m.2)).min();
                        prop_assert_eq!(heap.peek(class).map(|(i, k)| (k, i)), min);
                    }
                }
                heap.check().map_err(TestCaseError::fail)?;
            }
        }
    }
}
