//! The onboard job, run on a worker: fetch store blocks into G2, copy G2 → G1, register the
//! landed blocks in G1 as one prefix, and report where it ended.
//!
//! **Overlap.** The job walks its blocks in chunks of about [`CHUNK_BYTES`] of store blocks.
//! When there is more than one chunk, a reader thread (scoped to the job) fetches chunk
//! *k + 1* from the store tiers while the worker stages chunk *k* in G2 and copies it up to
//! G1, so the store's reads and the copies up overlap; the reader stays at most one chunk
//! ahead, and stops as soon as the prefix has ended (a miss, a lost block, no room) or the
//! onboard was cancelled. After a cancel the worker stages and copies nothing more: a chunk
//! read meanwhile goes back to G2's reset pool unused.
//!
//! **In place.** The reader allocates each chunk's G2 slots first and hands the store tier
//! write-locked views of them ([`Layout::block_view_mut`](crate::Layout::block_view_mut)),
//! so a disk tier reads straight into G2's memory (page-aligned, no bounce copy where the
//! file is `O_DIRECT`) and no block passes through a heap buffer. A verified block's view
//! is committed (G2's checksum of it recorded); any other outcome drops the view, which
//! forgets the slot's checksum, and the slot goes back to G2's reset pool. Where G2's blocks
//! are not one range of host memory each, a chunk is read into one buffer and written into
//! its slots.
//!
//! **Runs in plan order; unverified candidates without a slot until found.** A
//! [`Probe::Deferred`](super::Probe::Deferred) tier's candidates were planned without asking
//! it, so a request's brand-new blocks are among them. A chunk reads its store blocks in runs
//! of one kind, in plan order, each only inside the prefix the earlier runs left: a run of
//! verified candidates in place into slots taken first, a run of unverified ones into one
//! buffer, and only the blocks the store had get a G2 slot (a copy each). A slot taken for a
//! miss would evict one of G2's cached blocks for nothing, and a read past a miss would cost
//! a round trip for nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use kvbm_logical::{BlockId, Device, Host, ImmutableBlock, MutableBlock, SequenceHash};

use crate::store_tier::GetOutcome;

use super::core::Inner;
use super::offload::{PairOutcome, STORE_IMAGES};
use super::onboard::{
    EndReason, Item, ItemSource, LostBlock, LostCause, OnboardJob, Output, PrefixEnd,
};
use super::stats::{Direction, Skip, TierId};
use super::stepped::{
    allocate_up_to, register_in_steps, release_immutable, release_mutable, touch_held_in_steps,
};

/// About how many bytes of store blocks one chunk of an onboard reads.
pub(crate) const CHUNK_BYTES: usize = 4 << 20;
/// The fewest store blocks in a chunk (keeps a disk tier's queue full for large blocks).
pub(crate) const MIN_CHUNK_BLOCKS: usize = 16;

/// One store block of a chunk to read: the item's index in the job, its position in the plan,
/// its store tier, and whether the lookup saw it there (false: a deferred probe's candidate).
#[derive(Clone, Copy)]
struct StoreRead {
    item: usize,
    pos: usize,
    tier: usize,
    verified: bool,
}

/// What the reader did with one [`StoreRead`].
enum Fetched {
    /// Not read: past where the reader saw the prefix end.
    NotRead,
    /// No G2 slot was free for it.
    NoRoom,
    /// Read into `slot` with `outcome`; on a `Hit` the slot holds the verified block.
    Read {
        slot: MutableBlock<Host>,
        outcome: GetOutcome,
    },
    /// Read and verified, but writing it into its G2 slot failed (buffer path only).
    StageFailed(MutableBlock<Host>),
    /// An unverified candidate read before any G2 slot was taken for it, and given none:
    /// not a usable hit (a miss, say), or past where the prefix ends.
    Probed(GetOutcome),
}

/// What [`Inner::read_chunk`] gathers per read of a chunk, by index.
struct ChunkReads {
    /// The G2 slot taken for it.
    slots: Vec<Option<MutableBlock<Host>>>,
    /// Its outcome, once read into its slot (`Err`: verified, but writing it into the slot
    /// failed).
    outcomes: Vec<Option<Result<GetOutcome, ()>>>,
    /// An unverified read's outcome, read into the buffer (taken once given a slot).
    probed: Vec<Option<GetOutcome>>,
    /// No G2 slot was free for it.
    no_room: Vec<bool>,
    /// Slots to give back unread.
    unread: Vec<MutableBlock<Host>>,
}

/// A chunk: the job's items `items`, of which `reads` are store blocks.
struct Chunk {
    items: std::ops::Range<usize>,
    reads: Vec<StoreRead>,
}

/// The job's state while it walks its chunks.
struct Walk<'a> {
    hashes: &'a [SequenceHash],
    out: Output,
    end: Option<(usize, EndReason)>,
    /// Each item's G2 block (its source, or its staged copy), until copied.
    sources: Vec<Option<ImmutableBlock<Host>>>,
    /// Each item's copy into G1 landed.
    landed: Vec<bool>,
    /// Every item before this one was copied (the copies form one prefix).
    copied_to: usize,
    g2_invalid: Vec<SequenceHash>,
}

impl Walk<'_> {
    fn stop(&self) -> usize {
        self.end.as_ref().map_or(usize::MAX, |e| e.0)
    }
}

impl Inner {
    pub(crate) fn run_onboard(&self, mut job: OnboardJob) {
        if job.completion.cancelled.load(Ordering::Acquire) {
            self.counters.cancelled();
            return; // the drop releases everything
        }
        let items = std::mem::take(&mut job.items);
        let hashes = std::mem::take(&mut job.hashes);
        // The commit's use of the G2 sources (taken in place on the scheduler's thread).
        touch_held_in_steps(
            &self.g2.manager,
            items.iter().filter_map(|i| match &i.source {
                ItemSource::G2(b) => Some(b),
                ItemSource::Store { .. } => None,
            }),
        );
        let chunks = self.chunks(&items);
        let mut w = Walk {
            hashes: &hashes,
            out: Output::default(),
            end: None,
            sources: Vec::with_capacity(items.len()),
            landed: vec![false; items.len()],
            copied_to: 0,
            g2_invalid: Vec::new(),
        };
        let mut dsts: Vec<MutableBlock<Device>> = Vec::with_capacity(items.len());
        let mut from: Vec<TierId> = Vec::with_capacity(items.len());
        let mut positions: Vec<usize> = Vec::with_capacity(items.len());
        for item in items {
            let (src, tier) = match item.source {
                ItemSource::G2(b) => (Some(b), TierId::G2),
                ItemSource::Store { tier, .. } => (None, TierId::Store(tier)),
            };
            positions.push(item.pos);
            w.sources.push(src);
            dsts.push(item.dst);
            from.push(tier);
        }
        let cancelled = &job.completion.cancelled;
        let halt = AtomicBool::new(false);
        let reading = chunks.iter().filter(|c| !c.reads.is_empty()).count();
        if reading > 1 {
            // Chunk k + 1 is read while chunk k is staged and copied up.
            std::thread::scope(|scope| {
                let (tx, rx) = mpsc::sync_channel::<Vec<Fetched>>(0);
                let (chunks_ref, hashes_ref, halt_ref) = (&chunks, &hashes, &halt);
                scope.spawn(move || {
                    let mut read_end = usize::MAX;
                    for chunk in chunks_ref.iter().filter(|c| !c.reads.is_empty()) {
                        if halt_ref.load(Ordering::Acquire) || read_end != usize::MAX {
                            break;
                        }
                        let fetched = self.read_chunk(&chunk.reads, hashes_ref, &mut read_end);
                        if let Err(mpsc::SendError(unused)) = tx.send(fetched) {
                            release_fetched(unused);
                            break;
                        }
                    }
                });
                for chunk in &chunks {
                    let fetched = if chunk.reads.is_empty() {
                        Vec::new()
                    } else {
                        // A chunk the reader did not read (it stopped): nothing of it is staged.
                        rx.recv().unwrap_or_default()
                    };
                    if cancelled.load(Ordering::Acquire) {
                        // Nobody will use the rest: stage and copy nothing more.
                        halt.store(true, Ordering::Release);
                        release_fetched(fetched);
                        break;
                    }
                    self.walk_chunk(&mut w, chunk, fetched, &dsts, &positions);
                    if w.end.is_some() {
                        halt.store(true, Ordering::Release);
                    }
                }
                // A reader blocked handing over a chunk gets it back and stops.
                drop(rx);
            });
        } else {
            let mut read_end = usize::MAX;
            for chunk in &chunks {
                if cancelled.load(Ordering::Acquire) {
                    break;
                }
                let fetched = if chunk.reads.is_empty() || read_end != usize::MAX {
                    Vec::new()
                } else {
                    self.read_chunk(&chunk.reads, &hashes, &mut read_end)
                };
                if cancelled.load(Ordering::Acquire) {
                    // Cancelled during the read: nobody will use it, stage and copy nothing.
                    release_fetched(fetched);
                    break;
                }
                self.walk_chunk(&mut w, chunk, fetched, &dsts, &positions);
            }
        }
        let Walk {
            mut out,
            end,
            sources,
            landed,
            g2_invalid,
            ..
        } = w;
        let stop = end.as_ref().map_or(usize::MAX, |e| e.0);
        // Cancelled meanwhile? Then nothing is registered: every G1 block goes back.
        let cancelled = cancelled.load(Ordering::Acquire);
        let mut register = Vec::new();
        let mut reg_from = Vec::new();
        let mut reg_pos = Vec::new();
        let mut spare = Vec::new();
        for (k, dst) in dsts.into_iter().enumerate() {
            let pos = positions[k];
            if cancelled || pos >= stop || !landed[k] {
                spare.push(dst);
                continue;
            }
            let parent = pos.checked_sub(1).map(|p| hashes[p]);
            match dst.stage(hashes[pos], self.g1.manager.block_size()) {
                Ok(c) => {
                    register.push(c.with_parent(parent));
                    reg_from.push(from[k]);
                    reg_pos.push(pos);
                }
                Err(e) => spare.push(e.into_block()),
            }
        }
        if cancelled {
            release_mutable(spare);
        } else {
            // The caller computes the blocks past the end next: it gets their slots.
            out.spare = spare;
        }
        // Purge, not invalidate: a corrupt block that another request holds must stop being
        // served too (it leaves the cache when its last holder drops it).
        self.counters.lost(TierId::G2, g2_invalid.len());
        if !g2_invalid.is_empty() {
            self.g2.manager.purge_blocks(&g2_invalid);
        }
        for l in &out.lost {
            if let TierId::Store(_) = l.tier {
                self.counters.lost(l.tier, 1);
            }
        }
        if cancelled {
            self.counters.cancelled();
        } else {
            // In steps, in chain order: what registered is a prefix (a refused step cannot
            // happen for G1's own blocks; it and the rest go back to the reset pool).
            let reg = register_in_steps(&self.g1.manager, register);
            // Only the slots kvbm copied into: a hash the engine registered in G1 meanwhile
            // comes back as the engine's block, whose engine event must stay, and which is in
            // the prefix but not onboarded (its copy went unused).
            // Written by kvbm's own copy: no engine event stands for these slots any more.
            self.g1_events.clear(
                reg.handles
                    .iter()
                    .zip(&reg.own)
                    .filter(|(_, own)| **own)
                    .map(|(h, _)| h.block_id()),
            );
            let onboarded_from: Vec<TierId> = reg_from
                .iter()
                .zip(&reg.own)
                .filter(|(_, own)| **own)
                .map(|(&t, _)| t)
                .collect();
            for (tier, n) in count_by(&onboarded_from) {
                self.counters.onboarded(tier, n);
            }
            out.landed = reg_pos.into_iter().zip(reg.handles).collect();
        }
        // The G2 sources go only now: a block is never in neither tier (G2 could evict a
        // released source before its G1 copy was matchable).
        release_immutable(sources.into_iter().flatten());
        out.end = end.map(|(at, reason)| PrefixEnd {
            at,
            hash: hashes[at],
            reason,
        });
        job.done = true;
        job.completion.complete(out);
    }

    /// Splits the job's items into chunks of about [`CHUNK_BYTES`] of store blocks (at
    /// least [`MIN_CHUNK_BLOCKS`]); G2 items ride with the chunk they fall in.
    fn chunks(&self, items: &[Item]) -> Vec<Chunk> {
        let per_chunk = (CHUNK_BYTES / self.g2.layout.block_bytes().max(1)).max(MIN_CHUNK_BLOCKS);
        let mut chunks = vec![Chunk {
            items: 0..0,
            reads: Vec::new(),
        }];
        for (k, item) in items.iter().enumerate() {
            if let ItemSource::Store { tier, verified } = item.source {
                let last = chunks.last().map_or(0, |c| c.reads.len());
                if last == per_chunk {
                    chunks.push(Chunk {
                        items: k..k,
                        reads: Vec::new(),
                    });
                }
                if let Some(c) = chunks.last_mut() {
                    c.reads.push(StoreRead {
                        item: k,
                        pos: item.pos,
                        tier,
                        verified,
                    });
                }
            }
            if let Some(c) = chunks.last_mut() {
                c.items.end = k + 1;
            }
        }
        chunks
    }

    /// Reads a chunk's store blocks into freshly allocated G2 slots (one batched `get` per
    /// tier and run), in place where G2's layout allows. Stops at the first block that ends
    /// the prefix (`read_end`, carried over chunks): blocks past it are not read, except the
    /// rest of a batch (one `get` asks for all of a run's blocks of a tier).
    ///
    /// The reads go in runs, in plan order: a run of verified candidates (their tier said it
    /// had them at lookup) is read in place into slots taken first; a run of a deferred
    /// probe's candidates (unverified: the lookup did not ask their tier, typically a remote
    /// one) is read into a buffer, and only the blocks the store had get a G2 slot (one copy
    /// each). So a miss, of either kind, spends no slot and no read on what follows it in a
    /// later run: a slot taken for a remote miss would evict one of G2's cached blocks for
    /// nothing, and a remote read after a local miss would cost a round trip for nothing.
    fn read_chunk(
        &self,
        reads: &[StoreRead],
        hashes: &[SequenceHash],
        read_end: &mut usize,
    ) -> Vec<Fetched> {
        let n = reads.len();
        let mut r = ChunkReads {
            slots: (0..n).map(|_| None).collect(),
            outcomes: (0..n).map(|_| None).collect(),
            probed: (0..n).map(|_| None).collect(),
            no_room: vec![false; n],
            unread: Vec::new(),
        };
        let mut start = 0;
        while start < n && reads[start].pos < *read_end {
            let verified = reads[start].verified;
            let end = (start..n)
                .find(|&k| reads[k].verified != verified)
                .unwrap_or(n);
            if verified {
                self.read_verified(&reads[..end], start, hashes, read_end, &mut r);
            } else {
                self.read_unverified(&reads[..end], start, hashes, read_end, &mut r);
            }
            start = end;
        }
        let ChunkReads {
            slots,
            outcomes,
            probed,
            no_room,
            mut unread,
        } = r;
        let fetched = slots
            .into_iter()
            .zip(outcomes)
            .zip(no_room)
            .zip(probed)
            .map(
                |(((slot, outcome), no_room), probed)| match (slot, outcome) {
                    (Some(slot), Some(Ok(outcome))) => Fetched::Read { slot, outcome },
                    (Some(slot), Some(Err(()))) => Fetched::StageFailed(slot),
                    (Some(slot), None) => {
                        unread.push(slot); // cannot happen: every slot's tier was read
                        Fetched::NotRead
                    }
                    (None, _) if no_room => Fetched::NoRoom,
                    (None, _) => probed.map_or(Fetched::NotRead, Fetched::Probed),
                },
            )
            .collect();
        release_mutable(unread);
        fetched
    }

    /// A run of verified candidates, `reads[start..]`: G2 slots for those inside the prefix,
    /// then one in-place `get` per tier (a tier's block that ends the prefix sends the later
    /// tiers' slots back unread).
    fn read_verified(
        &self,
        reads: &[StoreRead],
        start: usize,
        hashes: &[SequenceHash],
        read_end: &mut usize,
        r: &mut ChunkReads,
    ) {
        let run = start..reads.len();
        let wanted = reads[run.clone()]
            .iter()
            .filter(|x| x.pos < *read_end)
            .count();
        let mut free = allocate_up_to(&self.g2.manager, wanted).into_iter();
        for k in run.clone() {
            if reads[k].pos >= *read_end {
                break;
            }
            match free.next() {
                Some(slot) => r.slots[k] = Some(slot),
                None => {
                    r.no_room[k] = true;
                    *read_end = reads[k].pos;
                }
            }
        }
        r.unread.extend(free);
        for (t, store) in self.stores.iter().enumerate() {
            let mut idx: Vec<usize> = Vec::new();
            for k in run.clone() {
                if reads[k].tier != t || r.slots[k].is_none() {
                    continue;
                }
                if reads[k].pos >= *read_end {
                    r.unread.extend(r.slots[k].take());
                } else {
                    idx.push(k);
                }
            }
            let ids: Vec<BlockId> = idx
                .iter()
                .filter_map(|&k| r.slots[k].as_ref().map(MutableBlock::block_id))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let want: Vec<SequenceHash> = idx.iter().map(|&k| hashes[reads[k].pos]).collect();
            let got = self.get_into_g2(store.tier.as_ref(), &want, &ids);
            for (&k, outcome) in idx.iter().zip(got) {
                if !matches!(&outcome, Ok(o) if usable_hit(o, hashes, reads[k].pos)) {
                    *read_end = (*read_end).min(reads[k].pos);
                }
                r.outcomes[k] = Some(outcome);
            }
        }
    }

    /// A run of a deferred probe's candidates, `reads[start..]`: those inside the prefix are
    /// read into one buffer, then the blocks the store had (still inside the prefix) get G2
    /// slots and are written into them.
    fn read_unverified(
        &self,
        reads: &[StoreRead],
        start: usize,
        hashes: &[SequenceHash],
        read_end: &mut usize,
        r: &mut ChunkReads,
    ) {
        let bytes = self.g2.layout.block_bytes();
        let run: Vec<usize> = (start..reads.len())
            .filter(|&k| reads[k].pos < *read_end)
            .collect();
        if run.is_empty() {
            return;
        }
        // Block j of the worker's image buffer for the j-th of `run` (reused: a store writes
        // all of a block it answers a hit for, and the rest is never read).
        STORE_IMAGES.with_borrow_mut(|buf| {
            if buf.len() < bytes * run.len() {
                buf.resize(bytes * run.len(), 0);
            }
            for (t, store) in self.stores.iter().enumerate() {
                let mine: Vec<bool> = run.iter().map(|&k| reads[k].tier == t).collect();
                if !mine.contains(&true) {
                    continue;
                }
                let want: Vec<SequenceHash> = run
                    .iter()
                    .zip(&mine)
                    .filter(|(_, m)| **m)
                    .map(|(&k, _)| hashes[reads[k].pos])
                    .collect();
                let got = {
                    let mut outs: Vec<&mut [u8]> = buf
                        .chunks_mut(bytes.max(1))
                        .zip(&mine)
                        .filter(|(_, m)| **m)
                        .map(|(c, _)| c)
                        .collect();
                    store.tier.get(&want, &mut outs)
                };
                let mut got = got.into_iter();
                for (&k, _) in run.iter().zip(&mine).filter(|(_, m)| **m) {
                    // A short answer from the store: the rest are misses.
                    let outcome = got.next().unwrap_or(GetOutcome::Miss);
                    if !usable_hit(&outcome, hashes, reads[k].pos) {
                        *read_end = (*read_end).min(reads[k].pos);
                    }
                    r.probed[k] = Some(outcome);
                }
            }
            let wanted = run.iter().filter(|&&k| reads[k].pos < *read_end).count();
            let mut free = allocate_up_to(&self.g2.manager, wanted).into_iter();
            for (j, &k) in run.iter().enumerate() {
                if reads[k].pos >= *read_end {
                    break;
                }
                let Some(slot) = free.next() else {
                    r.no_room[k] = true;
                    *read_end = reads[k].pos;
                    break;
                };
                let image = &buf[j * bytes..(j + 1) * bytes];
                r.outcomes[k] = match self.g2.layout.write_block(slot.block_id(), image) {
                    Ok(()) => r.probed[k].take().map(Ok),
                    Err(_) => Some(Err(())),
                };
                r.slots[k] = Some(slot);
            }
            r.unread.extend(free);
        });
    }

    /// One batched `get` of `want` into G2's blocks `ids`: in place through write-locked
    /// views where G2's layout has them, else through one buffer and `write_block`. `Err`
    /// for a verified block that could not be written into its slot.
    fn get_into_g2(
        &self,
        store: &dyn crate::store_tier::StoreTier,
        want: &[SequenceHash],
        ids: &[BlockId],
    ) -> Vec<Result<GetOutcome, ()>> {
        let layout = &self.g2.layout;
        if layout.has_block_views() {
            let views: Result<Vec<_>, _> =
                ids.iter().map(|&id| layout.block_view_mut(id)).collect();
            if let Ok(mut views) = views {
                let outcomes = {
                    let mut outs: Vec<&mut [u8]> = views.iter_mut().map(|v| &mut v[..]).collect();
                    store.get(want, &mut outs)
                };
                let mut outcomes = outcomes.into_iter();
                let mut result = Vec::with_capacity(ids.len());
                for view in views {
                    // A short answer from the store: the rest are misses.
                    let outcome = outcomes.next().unwrap_or(GetOutcome::Miss);
                    if outcome.is_hit() {
                        view.commit(); // G2's checksum of the verified bytes
                    } else {
                        drop(view); // unverified bytes: the slot's checksum is forgotten
                    }
                    result.push(Ok(outcome));
                }
                return result;
            }
            // A slot busy (cannot happen for fresh slots): the buffer path below.
        }
        let bytes = layout.block_bytes();
        let mut buf = vec![0u8; bytes * ids.len()];
        let outcomes = {
            let mut outs: Vec<&mut [u8]> = buf.chunks_mut(bytes).collect();
            store.get(want, &mut outs)
        };
        let mut outcomes = outcomes.into_iter();
        ids.iter()
            .enumerate()
            .map(|(k, &id)| {
                let outcome = outcomes.next().unwrap_or(GetOutcome::Miss);
                if outcome.is_hit()
                    && layout
                        .write_block(id, &buf[k * bytes..(k + 1) * bytes])
                        .is_err()
                {
                    return Err(());
                }
                Ok(outcome)
            })
            .collect()
    }

    /// Settles one chunk: reports and cuts at what its reads found, stages and registers
    /// its verified blocks in G2 (queuing their store copies), then copies the chunk's part
    /// of the prefix up to G1.
    fn walk_chunk(
        &self,
        w: &mut Walk<'_>,
        chunk: &Chunk,
        fetched: Vec<Fetched>,
        dsts: &[MutableBlock<Device>],
        positions: &[usize],
    ) {
        let hashes = w.hashes;
        // 1. What the reads found, in plan order: losses and cuts.
        let mut invalid: Vec<Vec<SequenceHash>> = vec![Vec::new(); self.stores.len()];
        let mut hits: Vec<(StoreRead, MutableBlock<Host>)> = Vec::new();
        let mut spare: Vec<MutableBlock<Host>> = Vec::new();
        let mut no_room = 0;
        for (r, f) in chunk.reads.iter().zip(fetched) {
            let pos = r.pos;
            let hash = hashes[pos];
            let tier = TierId::Store(r.tier);
            let lose = |out: &mut Output, cause| {
                out.lost.push(LostBlock { hash, tier, cause });
            };
            let (slot, outcome) = match f {
                Fetched::NotRead => continue,
                Fetched::NoRoom => {
                    no_room += 1;
                    cut(&mut w.end, pos, EndReason::NoRoom { tier: TierId::G2 });
                    continue;
                }
                Fetched::StageFailed(slot) => {
                    spare.push(slot);
                    cut(&mut w.end, pos, EndReason::NoRoom { tier: TierId::G2 });
                    continue;
                }
                Fetched::Read { slot, outcome } => (Some(slot), outcome),
                Fetched::Probed(outcome) => (None, outcome),
            };
            match outcome {
                GetOutcome::Hit { .. } if usable_hit(&outcome, hashes, pos) => {
                    match slot {
                        Some(slot) => hits.push((*r, slot)),
                        // Read but given no slot: past the prefix's end already.
                        None => cut(&mut w.end, pos, EndReason::NoRoom { tier: TierId::G2 }),
                    }
                    continue;
                }
                GetOutcome::Hit { .. } => {
                    // Verified bytes under a different chain: never serve it.
                    invalid[r.tier].push(hash);
                    lose(&mut w.out, LostCause::Corrupt);
                    cut(&mut w.end, pos, EndReason::Lost { tier });
                }
                GetOutcome::Corrupt => {
                    // The store removed it already (its contract).
                    lose(&mut w.out, LostCause::Corrupt);
                    cut(&mut w.end, pos, EndReason::Lost { tier });
                }
                GetOutcome::Failed(e) if e.is_transient() => {
                    // A timeout or an unreachable store says nothing about the block: a
                    // shared remote block must not be deleted for every server because one
                    // connection dropped. A miss now; a later lookup may read it.
                    cut(&mut w.end, pos, EndReason::Miss { tier });
                }
                GetOutcome::Failed(e) => {
                    invalid[r.tier].push(hash);
                    lose(&mut w.out, LostCause::StoreFailed(e));
                    cut(&mut w.end, pos, EndReason::Lost { tier });
                }
                _ => cut(&mut w.end, pos, EndReason::Miss { tier }),
            }
            spare.extend(slot);
        }
        self.counters.skipped(TierId::G2, Skip::NoRoom, no_room);
        // 2. Stage the verified blocks still inside the prefix, and register them in G2.
        let stop = w.stop();
        let mut complete = Vec::with_capacity(hits.len());
        let mut at: Vec<StoreRead> = Vec::with_capacity(hits.len());
        for (r, slot) in hits {
            if r.pos >= stop {
                spare.push(slot);
                continue;
            }
            let parent = r.pos.checked_sub(1).map(|p| hashes[p]);
            match slot.stage(hashes[r.pos], self.g2.manager.block_size()) {
                Ok(c) => {
                    complete.push(c.with_parent(parent));
                    at.push(r);
                }
                Err(e) => spare.push(e.into_block()),
            }
        }
        release_mutable(spare);
        // In steps; a refused step (cannot happen: G2's own blocks) leaves its blocks without
        // a source, which step 3 cuts at.
        let handles = if complete.is_empty() {
            Vec::new()
        } else {
            register_in_steps(&self.g2.manager, complete).handles
        };
        if !handles.is_empty() {
            let mut fills: Vec<Vec<(ImmutableBlock<Host>, Option<SequenceHash>)>> =
                vec![Vec::new(); self.stores.len()];
            for (h, r) in handles.into_iter().zip(at) {
                let parent = r.pos.checked_sub(1).map(|p| hashes[p]);
                fills[r.tier].push((h.clone(), parent));
                w.sources[r.item] = Some(h);
            }
            // A block fetched from G4 belongs in G3 too (not back where it came from).
            for (t, f) in fills.into_iter().enumerate() {
                if !f.is_empty() {
                    self.enqueue_store(f, Some(t));
                }
            }
        }
        for (t, hs) in invalid.iter().enumerate() {
            if !hs.is_empty() {
                self.stores[t].tier.remove(hs);
            }
        }
        // 3. Copy this chunk's part of the prefix up to G1 (the copies form one prefix).
        if w.copied_to < chunk.items.start {
            return; // an earlier item was not copied: the prefix ended before this chunk
        }
        let stop = w.stop();
        let copy: Vec<usize> = chunk
            .items
            .clone()
            .take_while(|&k| positions[k] < stop && w.sources[k].is_some())
            .collect();
        if let Some(k) = chunk
            .items
            .clone()
            .find(|&k| positions[k] < stop && w.sources[k].is_none())
        {
            // A store block that did not reach G2 without a recorded reason: end there.
            cut(
                &mut w.end,
                positions[k],
                EndReason::NoRoom { tier: TierId::G2 },
            );
        }
        let pairs: Vec<(BlockId, BlockId)> = copy
            .iter()
            .filter_map(|&k| Some((w.sources[k].as_ref()?.block_id(), dsts[k].block_id())))
            .collect();
        if pairs.is_empty() {
            return;
        }
        let copied = self.copy_pairs(Direction::Onboard, &pairs, true, &[]);
        if copied.event.is_some() {
            w.out.event = copied.event;
        }
        let mut all_landed = copy.len() == chunk.items.len();
        for (&k, outcome) in copy.iter().zip(&copied.outcomes) {
            let pos = positions[k];
            let hash = hashes[pos];
            match outcome {
                PairOutcome::Landed => w.landed[k] = true,
                PairOutcome::Skipped => all_landed = false,
                PairOutcome::Failed | PairOutcome::SourceCorrupt => {
                    all_landed = false;
                    // Lost at the tier that held it: G2 (the onboard's source, or the
                    // staging copy of a store block, which is invalidated in G2 too).
                    let cause = if *outcome == PairOutcome::Failed {
                        LostCause::CopyFailed
                    } else {
                        LostCause::Corrupt
                    };
                    w.g2_invalid.push(hash);
                    w.out.lost.push(LostBlock {
                        hash,
                        tier: TierId::G2,
                        cause,
                    });
                    cut(&mut w.end, pos, EndReason::Lost { tier: TierId::G2 });
                }
            }
        }
        if all_landed {
            w.copied_to = chunk.items.end;
        }
    }
}

/// Gives back the G2 slots of fetched blocks nobody will stage.
fn release_fetched(fetched: Vec<Fetched>) {
    let slots = fetched.into_iter().filter_map(|f| match f {
        Fetched::Read { slot, .. } | Fetched::StageFailed(slot) => Some(slot),
        Fetched::NotRead | Fetched::NoRoom | Fetched::Probed(_) => None,
    });
    release_mutable(slots);
}

fn count_by(tiers: &[TierId]) -> Vec<(TierId, usize)> {
    let mut out: Vec<(TierId, usize)> = Vec::new();
    for &t in tiers {
        match out.iter_mut().find(|(x, _)| *x == t) {
            Some((_, n)) => *n += 1,
            None => out.push((t, 1)),
        }
    }
    out
}

/// Whether `outcome` is a hit for plan position `pos` of `hashes`: verified bytes stored
/// under the chain's own parent (or none recorded).
fn usable_hit(outcome: &GetOutcome, hashes: &[SequenceHash], pos: usize) -> bool {
    let parent = pos.checked_sub(1).map(|p| hashes[p]);
    matches!(outcome, GetOutcome::Hit { parent: stored } if stored.is_none_or(|s| Some(s) == parent))
}

/// Ends the prefix at `pos` unless it already ends earlier.
fn cut(end: &mut Option<(usize, EndReason)>, pos: usize, reason: EndReason) {
    if end.as_ref().is_none_or(|e| pos < e.0) {
        *end = Some((pos, reason));
    }
}
