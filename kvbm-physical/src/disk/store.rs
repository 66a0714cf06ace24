//! [`StoreTier`] for [`DiskTier`]: `put`, `get`, `remove` over the tier's block manager
//! (which slot holds what) and its I/O back end (the slot operations of [`super::ops`]).

use std::collections::HashMap;

use kvbm_logical::{ImmutableBlock, SequenceHash};

use super::engine::{Admission, DiskTier, MANAGER_BLOCK_SIZE};
use super::error::SlotIoError;
use super::ops::{ReadResult, ReadTask, Reads, WriteTask, Writes};
use super::stats::Counters;
use crate::store_tier::{
    GetOutcome, PutOutcome, SkipReason, StoreBlock, StoreError, StoreStats, StoreTier,
};

impl StoreTier for DiskTier {
    fn medium(&self) -> &'static str {
        "DISK"
    }

    fn block_bytes(&self) -> usize {
        self.geometry.block_bytes()
    }

    fn contains(&self, hashes: &[SequenceHash]) -> Vec<bool> {
        self.manager.contains_each(hashes)
    }

    fn put(&self, blocks: &[StoreBlock<'_>]) -> Vec<PutOutcome> {
        let bb = self.geometry.block_bytes();
        let mut outcomes: Vec<Option<PutOutcome>> = vec![None; blocks.len()];
        // Wrong sizes fail alone; repeats within the batch follow their first occurrence.
        let mut first: HashMap<SequenceHash, usize> = HashMap::with_capacity(blocks.len());
        let mut repeats = Vec::new();
        let mut candidates = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            if b.bytes.len() != bb {
                outcomes[i] = Some(PutOutcome::Failed(StoreError::BufferSize {
                    expected: bb,
                    actual: b.bytes.len(),
                }));
            } else if let Some(&j) = first.get(&b.hash) {
                repeats.push((i, j));
            } else {
                first.insert(b.hash, i);
                candidates.push(i);
            }
        }
        let admission = self.admission();
        if admission == Admission::Refused {
            for &i in &candidates {
                outcomes[i] = Some(PutOutcome::Skipped(SkipReason::Degraded));
            }
            candidates.clear();
        }
        let hashes: Vec<SequenceHash> = candidates.iter().map(|&i| blocks[i].hash).collect();
        {
            // Claim the rest; what another put is writing now is as good as present. Asking
            // the manager under the claim lock closes the gap between another put's
            // registration and the release of its claim.
            let mut writing = self.writing.lock();
            let present = self.manager.contains_each(&hashes);
            candidates = candidates
                .into_iter()
                .zip(present)
                .filter_map(|(i, p)| {
                    if p || !writing.insert(blocks[i].hash) {
                        outcomes[i] = Some(PutOutcome::Present);
                        None
                    } else {
                        Some(i)
                    }
                })
                .collect();
        }
        // Released on every path out, an unwinding one included (a claim left behind would
        // make every later put of its hash `Present` for the life of the tier).
        let claimed = Claims {
            tier: self,
            hashes: candidates.iter().map(|&i| blocks[i].hash).collect(),
        };

        // Slots: free ones first, then by evicting in the manager's policy order. Blocks
        // held by readers are never evicted, so fewer may be had: the rest is no room.
        let mut slots = match self.manager.allocate_blocks(candidates.len()) {
            Ok(s) => s,
            Err(kvbm_logical::AllocationError::Exhausted { available, .. }) => self
                .manager
                .allocate_blocks(available.min(candidates.len()))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for &i in &candidates[slots.len()..] {
            outcomes[i] = Some(PutOutcome::Skipped(SkipReason::NoRoom));
        }
        candidates.truncate(slots.len());
        let jobs: Vec<(usize, u32)> = candidates
            .iter()
            .zip(&slots)
            .map(|(&i, s)| (i, s.block_id().get()))
            .collect();
        // Generations follow the batch's order (not the order the I/O threads happen to prepare
        // the writes in), so a restart recovers the blocks oldest first, deterministically.
        let first_generation = self
            .generation
            .fetch_add(jobs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let tasks = jobs
            .iter()
            .zip(first_generation..)
            .map(|(&(i, slot), generation)| WriteTask {
                slot,
                block: blocks[i],
                generation,
            })
            .collect();
        let results = self
            .queue
            .run(&self.file, &self.bufs, &Writes { tier: self }, tasks);

        // Register what landed; what did not goes back to the free slots.
        let mut staged = Vec::with_capacity(jobs.len());
        let mut staged_at = Vec::with_capacity(jobs.len());
        let mut written = 0u64;
        let mut first_error = None;
        // A failed write may have left the slot's previous (evicted) block intact, or torn:
        // zero its header while the slot is still ours, so that no restart brings back a
        // block this tier has let go of.
        let failed_slots: Vec<u32> = jobs
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(&(_, slot), _)| slot)
            .collect();
        if !failed_slots.is_empty() {
            self.tombstone(&failed_slots);
        }
        for ((&(i, _), slot), result) in jobs.iter().zip(slots.drain(..)).zip(results) {
            match result {
                Ok(()) => {
                    written += 1;
                    match slot.stage(blocks[i].hash, MANAGER_BLOCK_SIZE) {
                        Ok(c) => {
                            staged.push(c.with_parent(blocks[i].parent));
                            staged_at.push(i);
                        }
                        Err(e) => {
                            drop(e.into_block());
                            outcomes[i] = Some(PutOutcome::Failed(StoreError::Io(
                                "the tier's block manager refused the block".into(),
                            )));
                        }
                    }
                }
                Err(e) => {
                    drop(slot);
                    if e != SlotIoError::NoMemory {
                        // No buffer for the write says nothing about the disk.
                        first_error.get_or_insert_with(|| e.clone());
                    }
                    outcomes[i] = Some(PutOutcome::Failed(e.into()));
                }
            }
        }
        let ids: Vec<_> = staged.iter().map(|c| c.block_id()).collect();
        match self.manager.register_blocks(staged) {
            Ok(handles) => {
                for ((h, id), i) in handles.iter().zip(ids).zip(staged_at) {
                    // A racing put of the same hash registered first: ours went back free.
                    outcomes[i] = Some(if h.block_id() == id {
                        PutOutcome::Stored
                    } else {
                        PutOutcome::Present
                    });
                }
                ImmutableBlock::release_all(handles);
            }
            Err(e) => {
                drop(e.into_blocks());
                for i in staged_at {
                    outcomes[i] = Some(PutOutcome::Failed(StoreError::Io(
                        "the tier's block manager refused the blocks".into(),
                    )));
                }
            }
        }
        drop(claimed);
        match (first_error, admission) {
            (Some(e), _) => self.degrade(e),
            // Only the put that was handed the try clears a degradation.
            (None, Admission::Try(ticket)) if written > 0 => self.try_wrote(ticket),
            _ => {}
        }
        for (i, j) in repeats {
            outcomes[i] = outcomes[j].clone();
        }
        let outcomes: Vec<PutOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(PutOutcome::Skipped(SkipReason::NoRoom)))
            .collect();
        let c = &self.counters;
        let count = |f: fn(&PutOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count() as u64;
        Counters::add(&c.stored, count(|o| matches!(o, PutOutcome::Stored)));
        Counters::add(&c.skipped, count(|o| matches!(o, PutOutcome::Skipped(_))));
        Counters::add(&c.failed, count(|o| matches!(o, PutOutcome::Failed(_))));
        Counters::add(&c.bytes_written, written * bb as u64);
        Counters::add(&c.io_errors, jobs.len() as u64 - written);
        outcomes
    }

    fn get(&self, hashes: &[SequenceHash], out: &mut [&mut [u8]]) -> Vec<GetOutcome> {
        let bb = self.geometry.block_bytes();
        let mut outcomes = vec![GetOutcome::Miss; hashes.len()];
        let mut wanted = Vec::with_capacity(hashes.len());
        for (i, outcome) in outcomes.iter_mut().enumerate() {
            let actual = out.get(i).map_or(0, |b| b.len());
            if actual == bb {
                wanted.push(i);
            } else {
                *outcome = GetOutcome::Failed(StoreError::BufferSize {
                    expected: bb,
                    actual,
                });
            }
        }
        // Handles keep the slots from being evicted and rewritten while they are read.
        let want_hashes: Vec<SequenceHash> = wanted.iter().map(|&i| hashes[i]).collect();
        let handles = self.manager.scan_matches(&want_hashes, true);
        let mut jobs = Vec::with_capacity(handles.len());
        let mut found = handles.iter().peekable();
        for &i in &wanted {
            if let Some(h) = found.next_if(|h| h.sequence_hash() == hashes[i]) {
                jobs.push((i, h.block_id().get()));
            }
        }
        // The jobs' output buffers, in job order (`jobs` is in increasing index order).
        let mut bufs = out.iter_mut().enumerate();
        let tasks: Vec<ReadTask<'_>> = jobs
            .iter()
            .filter_map(|&(i, slot)| {
                let (_, buf) = bufs.find(|(k, _)| *k == i)?;
                Some(ReadTask {
                    slot,
                    hash: hashes[i],
                    out: buf,
                    in_place: false,
                })
            })
            .collect();
        let results = self
            .queue
            .run(&self.file, &self.bufs, &Reads { tier: self }, tasks);
        let mut first_error = None;
        let results: Vec<GetOutcome> = results
            .into_iter()
            .map(|r| match r {
                ReadResult::Hit(parent) => GetOutcome::Hit { parent },
                ReadResult::Miss => GetOutcome::Miss,
                ReadResult::Corrupt => GetOutcome::Corrupt,
                ReadResult::Failed(SlotIoError::NoMemory) => {
                    // Not the disk's fault: the block stays, and the tier keeps admitting.
                    GetOutcome::Failed(SlotIoError::NoMemory.into())
                }
                ReadResult::Failed(e) => {
                    first_error.get_or_insert_with(|| e.clone());
                    GetOutcome::Failed(e.into())
                }
            })
            .collect();

        // Corrupt or unreadable: removed from the tier, and its header zeroed (best effort)
        // while the handle still holds the slot, so it is never served and never retried,
        // not even after a restart.
        let mut bad_slots = Vec::new();
        let mut bad_hashes = Vec::new();
        for (&(i, slot), result) in jobs.iter().zip(results) {
            match &result {
                GetOutcome::Corrupt => {
                    tracing::warn!(hash = %hashes[i], slot, "disk tier block failed verification: removed");
                    bad_slots.push(slot);
                    bad_hashes.push(hashes[i]);
                }
                GetOutcome::Failed(e) if !e.is_transient() => {
                    bad_slots.push(slot);
                    bad_hashes.push(hashes[i]);
                }
                GetOutcome::Miss => bad_hashes.push(hashes[i]),
                _ => {}
            }
            outcomes[i] = result;
        }
        if !bad_slots.is_empty() {
            self.tombstone(&bad_slots);
        }
        ImmutableBlock::release_all(handles);
        if !bad_hashes.is_empty() {
            // Purged, not invalidated: another get may hold one of them (its slot is reused
            // only once that get lets go), and it must leave the tier now all the same.
            let n = self.manager.purge_blocks(&bad_hashes).total();
            Counters::add(&self.counters.removed, n as u64);
        }
        if let Some(e) = first_error {
            self.degrade(e);
        }
        let c = &self.counters;
        let count = |f: fn(&GetOutcome) -> bool| outcomes.iter().filter(|o| f(o)).count() as u64;
        let hits = count(GetOutcome::is_hit);
        let failed = count(|o| matches!(o, GetOutcome::Failed(_)));
        Counters::add(&c.hits, hits);
        Counters::add(&c.misses, count(|o| matches!(o, GetOutcome::Miss)));
        Counters::add(&c.corrupt, count(|o| matches!(o, GetOutcome::Corrupt)));
        Counters::add(&c.failed, failed);
        Counters::add(&c.bytes_read, hits * bb as u64);
        Counters::add(
            &c.io_errors,
            count(
                |o| matches!(o, GetOutcome::Failed(e) if !matches!(e, StoreError::BufferSize { .. })),
            ),
        );
        outcomes
    }

    fn remove(&self, hashes: &[SequenceHash]) {
        let handles = self.manager.scan_matches(hashes, false);
        if handles.is_empty() {
            return;
        }
        let slots: Vec<u32> = handles.iter().map(|h| h.block_id().get()).collect();
        let found: Vec<SequenceHash> = handles.iter().map(|h| h.sequence_hash()).collect();
        self.tombstone(&slots);
        ImmutableBlock::release_all(handles);
        // Purged: a block a concurrent get holds leaves the tier too (its header is zeroed;
        // left registered, it would be `contains` and `Present` until some get missed).
        let n = self.manager.purge_blocks(&found).total();
        Counters::add(&self.counters.removed, n as u64);
    }

    fn stats(&self) -> StoreStats {
        self.counters
            .store_stats(self.manager.counts().registered_hashes as u64)
    }
}

/// The hashes a put claimed (being written by it), released when dropped.
struct Claims<'t> {
    tier: &'t DiskTier,
    hashes: Vec<SequenceHash>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let mut writing = self.tier.writing.lock();
        for hash in &self.hashes {
            writing.remove(hash);
        }
    }
}
