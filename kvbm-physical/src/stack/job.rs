//! The onboard job, run on a worker: fetch store blocks into G2 (batched per tier), copy
//! G2 → G1, register the landed blocks in G1 as one prefix, and report where it ended.

use std::sync::atomic::Ordering;

use kvbm_logical::{BlockId, Device, Host, ImmutableBlock, MutableBlock, SequenceHash};

use crate::store_tier::GetOutcome;

use super::core::Inner;
use super::offload::{PairOutcome, allocate_up_to};
use super::onboard::{
    EndReason, Item, ItemSource, LostBlock, LostCause, OnboardJob, Output, PrefixEnd,
};
use super::stats::{Direction, Skip, TierId};

impl Inner {
    pub(crate) fn run_onboard(&self, mut job: OnboardJob) {
        if job.completion.cancelled.load(Ordering::Acquire) {
            self.counters.cancelled();
            return; // the drop releases everything
        }
        let items = std::mem::take(&mut job.items);
        let hashes = std::mem::take(&mut job.hashes);
        let mut out = Output::default();
        let mut end: Option<(usize, EndReason)> = None;
        // 1. Store blocks: fetch, stage and register in G2.
        let mut staged = self.stage_store_blocks(&items, &hashes, &mut out, &mut end);
        // 2. Copy G2 → G1 for everything inside the prefix.
        let stop = end.as_ref().map_or(usize::MAX, |e| e.0);
        let mut sources: Vec<Option<ImmutableBlock<Host>>> = Vec::with_capacity(items.len());
        let mut dsts: Vec<MutableBlock<Device>> = Vec::with_capacity(items.len());
        let mut from: Vec<TierId> = Vec::with_capacity(items.len());
        let mut positions: Vec<usize> = Vec::with_capacity(items.len());
        for (k, item) in items.into_iter().enumerate() {
            let (src, tier) = match item.source {
                ItemSource::G2(b) => (Some(b), TierId::G2),
                ItemSource::Store(t) => (staged[k].take(), TierId::Store(t)),
            };
            positions.push(item.pos);
            sources.push(src);
            dsts.push(item.dst);
            from.push(tier);
        }
        let copy: Vec<usize> = (0..dsts.len())
            .take_while(|&k| positions[k] < stop && sources[k].is_some())
            .collect();
        if let Some(k) = (0..dsts.len()).find(|&k| positions[k] < stop && sources[k].is_none()) {
            // A store block that did not reach G2 without a recorded reason: end there.
            cut(
                &mut end,
                positions[k],
                EndReason::NoRoom { tier: TierId::G2 },
            );
        }
        let pairs: Vec<(BlockId, BlockId)> = copy
            .iter()
            .filter_map(|&k| Some((sources[k].as_ref()?.block_id(), dsts[k].block_id())))
            .collect();
        let outcomes = if pairs.is_empty() {
            Vec::new()
        } else {
            let copied = self.copy_pairs(Direction::Onboard, &pairs, true, &[]);
            out.event = copied.event;
            copied.outcomes
        };
        let mut g2_invalid = Vec::new();
        for (&k, outcome) in copy.iter().zip(&outcomes) {
            let pos = positions[k];
            let hash = hashes[pos];
            match outcome {
                PairOutcome::Landed | PairOutcome::Skipped => {}
                PairOutcome::Failed | PairOutcome::SourceCorrupt => {
                    // Lost at the tier that held it: G2 (the onboard's source, or the
                    // staging copy of a store block, which is invalidated in G2 too).
                    let cause = if *outcome == PairOutcome::Failed {
                        LostCause::CopyFailed
                    } else {
                        LostCause::Corrupt
                    };
                    g2_invalid.push(hash);
                    out.lost.push(LostBlock {
                        hash,
                        tier: TierId::G2,
                        cause,
                    });
                    cut(&mut end, pos, EndReason::Lost { tier: TierId::G2 });
                }
            }
        }
        let stop = end.as_ref().map_or(usize::MAX, |e| e.0);
        // 3. Cancelled meanwhile? Then nothing is registered: every G1 block goes back.
        let cancelled = job.completion.cancelled.load(Ordering::Acquire);
        let mut register = Vec::new();
        let mut reg_from = Vec::new();
        let mut reg_pos = Vec::new();
        let mut spare = Vec::new();
        for (k, dst) in dsts.into_iter().enumerate() {
            let pos = positions[k];
            // `copy` is the items `0..copy.len()`, so `outcomes[k]` is item k's.
            let ok = !cancelled && pos < stop && outcomes.get(k) == Some(&PairOutcome::Landed);
            if !ok {
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
        MutableBlock::release_all(spare);
        ImmutableBlock::release_all(sources.into_iter().flatten());
        // Invalidate only after releasing our handles (held blocks cannot be invalidated).
        self.counters.lost(TierId::G2, g2_invalid.len());
        if !g2_invalid.is_empty() {
            self.g2.manager.invalidate_blocks(&g2_invalid);
        }
        for l in &out.lost {
            if let TierId::Store(_) = l.tier {
                self.counters.lost(l.tier, 1);
            }
        }
        if cancelled {
            self.counters.cancelled();
        } else if let Ok(handles) = self.g1.manager.register_blocks(register) {
            // Written by kvbm's own copy: no engine event stands for these slots any more.
            self.g1_events
                .clear(handles.iter().map(ImmutableBlock::block_id));
            for (tier, n) in count_by(&reg_from) {
                self.counters.onboarded(tier, n);
            }
            out.landed = reg_pos.into_iter().zip(handles).collect();
        }
        out.end = end.map(|(at, reason)| PrefixEnd {
            at,
            hash: hashes[at],
            reason,
        });
        job.done = true;
        job.completion.complete(out);
    }

    /// Fetches the job's store blocks (one batched `get` per tier), stages the ones inside
    /// the prefix in G2 and registers them there; returns each item's G2 block.
    fn stage_store_blocks(
        &self,
        items: &[Item],
        hashes: &[SequenceHash],
        out: &mut Output,
        end: &mut Option<(usize, EndReason)>,
    ) -> Vec<Option<ImmutableBlock<Host>>> {
        let mut staged: Vec<Option<ImmutableBlock<Host>>> = Vec::new();
        staged.resize_with(items.len(), || None);
        for (t, store) in self.stores.iter().enumerate() {
            let mut invalid: Vec<SequenceHash> = Vec::new();
            let idx: Vec<usize> = (0..items.len())
                .filter(|&k| matches!(items[k].source, ItemSource::Store(s) if s == t))
                .filter(|&k| end.as_ref().is_none_or(|e| items[k].pos < e.0))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let tier = TierId::Store(t);
            let bytes = self.g2.layout.block_bytes();
            let want: Vec<SequenceHash> = idx.iter().map(|&k| hashes[items[k].pos]).collect();
            let mut bufs: Vec<Vec<u8>> = (0..idx.len()).map(|_| vec![0u8; bytes]).collect();
            let outcomes = {
                let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                store.tier.get(&want, &mut views)
            };
            let mut fetched: Vec<(usize, Vec<u8>)> = Vec::new();
            for (n, (&k, buf)) in idx.iter().zip(bufs).enumerate() {
                let pos = items[k].pos;
                let hash = hashes[pos];
                let parent = pos.checked_sub(1).map(|p| hashes[p]);
                let lose = |out: &mut Output, cause| {
                    out.lost.push(LostBlock { hash, tier, cause });
                };
                match outcomes.get(n) {
                    Some(GetOutcome::Hit { parent: stored })
                        if stored.is_none_or(|s| Some(s) == parent) =>
                    {
                        fetched.push((k, buf));
                    }
                    Some(GetOutcome::Hit { .. }) => {
                        // Verified bytes under a different chain: never serve it.
                        invalid.push(hash);
                        lose(out, LostCause::Corrupt);
                        cut(end, pos, EndReason::Lost { tier });
                    }
                    Some(GetOutcome::Corrupt) => {
                        // The store removed it already (its contract).
                        lose(out, LostCause::Corrupt);
                        cut(end, pos, EndReason::Lost { tier });
                    }
                    Some(GetOutcome::Failed(e)) => {
                        invalid.push(hash);
                        lose(out, LostCause::StoreFailed(e.clone()));
                        cut(end, pos, EndReason::Lost { tier });
                    }
                    _ => cut(end, pos, EndReason::Miss { tier }),
                }
            }
            // Stage the fetched blocks that are still inside the prefix.
            let stop = end.as_ref().map_or(usize::MAX, |e| e.0);
            fetched.retain(|(k, _)| items[*k].pos < stop);
            let slots = allocate_up_to(&self.g2.manager, fetched.len());
            if slots.len() < fetched.len() {
                let (k, _) = &fetched[slots.len()];
                cut(end, items[*k].pos, EndReason::NoRoom { tier: TierId::G2 });
                self.counters
                    .skipped(TierId::G2, Skip::NoRoom, fetched.len() - slots.len());
            }
            let mut complete = Vec::with_capacity(slots.len());
            let mut at = Vec::with_capacity(slots.len());
            let mut parents = Vec::with_capacity(slots.len());
            let mut spare = Vec::new();
            for ((k, buf), slot) in fetched.iter().zip(slots) {
                let pos = items[*k].pos;
                let parent = pos.checked_sub(1).map(|p| hashes[p]);
                if self.g2.layout.write_block(slot.block_id(), buf).is_err() {
                    spare.push(slot);
                    cut(end, pos, EndReason::NoRoom { tier: TierId::G2 });
                    continue;
                }
                match slot.stage(hashes[pos], self.g2.manager.block_size()) {
                    Ok(c) => {
                        complete.push(c.with_parent(parent));
                        at.push(*k);
                        parents.push(parent);
                    }
                    Err(e) => spare.push(e.into_block()),
                }
            }
            MutableBlock::release_all(spare);
            if let Ok(handles) = self.g2.manager.register_blocks(complete) {
                let mut fills = Vec::with_capacity(handles.len());
                for ((h, k), parent) in handles.into_iter().zip(at).zip(parents) {
                    fills.push((h.clone(), parent));
                    staged[k] = Some(h);
                }
                // A block fetched from G4 belongs in G3 too (not back where it came from).
                self.enqueue_store(fills, Some(t));
            }
            if !invalid.is_empty() {
                store.tier.remove(&invalid);
            }
        }
        staged
    }
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

/// Ends the prefix at `pos` unless it already ends earlier.
fn cut(end: &mut Option<(usize, EndReason)>, pos: usize, reason: EndReason) {
    if end.as_ref().is_none_or(|e| pos < e.0) {
        *end = Some((pos, reason));
    }
}
