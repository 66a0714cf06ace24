//! Lookup: a [`Plan`] of where each block of a request's prefix is, across all tiers.

use kvbm_logical::{Device, ImmutableBlock, SequenceHash};

use super::config::Probe;
use super::core::{Inner, TierStack};
use super::stats::TierId;

/// Where one block of a plan comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A G1 hit, held so nothing can evict it.
    G1(ImmutableBlock<Device>),
    /// In G2 (by `contains`; taken as a handle when the plan is committed).
    G2,
    /// In store tier `tier`; `verified` is false for a deferred probe (fetched on demand).
    Store { tier: usize, verified: bool },
}

/// The result of [`TierStack::lookup`]: the longest prefix of the request that some tier
/// holds, block by block, with the G1 hits held (nothing can evict them while the plan
/// lives). A plan copies nothing and allocates nothing; commit it with
/// [`TierStack::onboard`], or drop it (the G1 hits are released).
#[derive(Debug)]
pub struct Plan {
    pub(crate) stack: u64,
    pub(crate) hashes: Vec<SequenceHash>,
    pub(crate) sources: Vec<Source>,
}

impl Plan {
    /// Blocks in the planned prefix.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether no tier holds the first block.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The planned prefix's hashes.
    pub fn hashes(&self) -> &[SequenceHash] {
        &self.hashes
    }

    /// The tier block `i` comes from; `None` beyond the prefix.
    pub fn tier(&self, i: usize) -> Option<TierId> {
        self.sources.get(i).map(|s| match s {
            Source::G1(_) => TierId::G1,
            Source::G2 => TierId::G2,
            Source::Store { tier, .. } => TierId::Store(*tier),
        })
    }

    /// Blocks planned from `tier`.
    pub fn from_tier(&self, tier: TierId) -> usize {
        (0..self.len())
            .filter(|&i| self.tier(i) == Some(tier))
            .count()
    }

    /// G1 hits (held by the plan).
    pub fn g1_hits(&self) -> usize {
        self.from_tier(TierId::G1)
    }

    /// Store-tier candidates not verified by the lookup (deferred probes); a miss when
    /// fetched ends the prefix there.
    pub fn unverified(&self) -> usize {
        self.sources
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Source::Store {
                        verified: false,
                        ..
                    }
                )
            })
            .count()
    }

    /// Free G1 blocks committing the whole plan needs (every block that is not a G1 hit).
    pub fn blocks_needed(&self) -> usize {
        self.blocks_needed_within(self.len())
    }

    /// Free G1 blocks committing the first `limit` blocks needs.
    pub fn blocks_needed_within(&self, limit: usize) -> usize {
        self.sources
            .iter()
            .take(limit)
            .filter(|s| !matches!(s, Source::G1(_)))
            .count()
    }

    /// Shortens the plan to its first `len` blocks, releasing G1 hits beyond.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.hashes.truncate(len);
            let tail = self.sources.split_off(len);
            ImmutableBlock::release_all(tail.into_iter().filter_map(|s| match s {
                Source::G1(b) => Some(b),
                _ => None,
            }));
        }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        self.truncate(0);
    }
}

impl TierStack {
    /// Plans onboarding `hashes` (a chain from the start of a sequence): walks them in
    /// order across all tiers and stops at the first hash no tier has. A G1 hit after a G2
    /// hit is still a G1 hit. Takes the G1 hits as handles (one lock), asks G2 which it
    /// holds (`contains_each`, one lock) and each [`Probe::OnLookup`] store tier
    /// (`contains`, one call); a [`Probe::Deferred`] tier is not asked: the blocks no other
    /// tier holds are planned from it, unverified.
    ///
    /// No copy, no allocation, no access recorded, no eviction order changed — with one
    /// caveat from kvbm-logical: G1 hits are taken with `scan_matches(.., touch: false)`,
    /// which records no access, but an inactive hit whose plan is dropped uncommitted
    /// re-enters the inactive pool at its most recently used end.
    ///
    /// ```
    /// # use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
    /// # use kvbm_physical::stack::{EngineSync, TierStack};
    /// # use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// # let config = |n| LayoutConfig { num_blocks: n, num_layers: 1, outer_dim: 2, page_size: 16, inner_dim: 8, dtype_bytes: 2 };
    /// # let stack = TierStack::builder()
    /// #     .g1(BlockManager::<Device>::builder().block_count(4).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::LayerSeparate, config(4))?.into_shared())
    /// #     .g2(BlockManager::<Host>::builder().block_count(8).block_size(16).build()?,
    /// #         Layout::system(LayoutKind::FullyContiguous, config(8))?.into_shared())
    /// #     .build()?;
    /// # let registered = stack.register(
    /// #     stack.allocate(2)?.into_iter().zip([1, 2]).map(|(b, h)| b.stage(SequenceHash::new(h), 16)).collect::<Result<Vec<_>, _>>()?,
    /// #     EngineSync::Ready,
    /// # )?;
    /// // Blocks 1 and 2 are registered in G1; 3 is nowhere.
    /// let plan = stack.lookup(&[1, 2, 3].map(SequenceHash::new));
    /// assert_eq!((plan.len(), plan.g1_hits(), plan.blocks_needed()), (2, 2, 0));
    /// assert_eq!(plan.tier(0), Some(kvbm_physical::stack::TierId::G1));
    /// # drop(registered);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn lookup(&self, hashes: &[SequenceHash]) -> Plan {
        self.inner().lookup(hashes)
    }
}

impl Inner {
    pub(crate) fn lookup(&self, hashes: &[SequenceHash]) -> Plan {
        let mut plan = Plan {
            stack: self.id,
            hashes: Vec::new(),
            sources: Vec::new(),
        };
        if hashes.is_empty() {
            self.counters.lookup(&[]);
            return plan;
        }
        let in_g1 = self.g1.manager.contains_each(hashes);
        // G2 is asked only about the hashes G1 lacks (none: no G2 lock at all).
        let lacking: Vec<SequenceHash> = hashes
            .iter()
            .zip(&in_g1)
            .filter(|(_, hit)| !**hit)
            .map(|(h, _)| *h)
            .collect();
        let mut in_g2 = vec![false; hashes.len()];
        if !lacking.is_empty() {
            let found = self.g2.manager.contains_each(&lacking);
            let mut found = found.into_iter();
            for (slot, &hit) in in_g2.iter_mut().zip(&in_g1) {
                if !hit {
                    *slot = found.next().unwrap_or(false);
                }
            }
        }
        // Store tiers: asked only for the hashes the slot tiers lack, before the first hash
        // that every eager tier lacks too (found by walking).
        let misses: Vec<usize> = (0..hashes.len())
            .filter(|&i| !in_g1[i] && !in_g2[i])
            .collect();
        let mut in_store: Vec<Vec<bool>> = Vec::with_capacity(self.stores.len());
        let deferred = self.stores.iter().position(|s| s.probe == Probe::Deferred);
        for s in &self.stores {
            if misses.is_empty() || s.probe == Probe::Deferred {
                in_store.push(Vec::new());
                continue;
            }
            let asked: Vec<SequenceHash> = misses.iter().map(|&i| hashes[i]).collect();
            let mut found = s.tier.contains(&asked);
            found.resize(asked.len(), false);
            in_store.push(found);
        }
        // The walk, without G1 handles yet.
        #[derive(Clone, Copy, PartialEq)]
        enum Where {
            G1,
            G2,
            Store(usize, bool),
        }
        let mut walk: Vec<Where> = Vec::with_capacity(hashes.len());
        let mut miss_at = 0;
        for i in 0..hashes.len() {
            let w = if in_g1[i] {
                Where::G1
            } else if in_g2[i] {
                Where::G2
            } else {
                let k = miss_at;
                miss_at += 1;
                match (0..self.stores.len()).find(|&t| in_store[t].get(k) == Some(&true)) {
                    Some(t) => Where::Store(t, true),
                    None => match deferred {
                        Some(t) => Where::Store(t, false),
                        None => break,
                    },
                }
            };
            walk.push(w);
        }
        // Take the G1 hits. One evicted since `contains_each` (a race with another thread's
        // allocation) ends the prefix there: G2 was not asked about it.
        let g1_hashes: Vec<SequenceHash> = walk
            .iter()
            .zip(hashes)
            .filter(|(w, _)| **w == Where::G1)
            .map(|(_, h)| *h)
            .collect();
        let mut g1_handles = self
            .g1
            .manager
            .scan_matches(&g1_hashes, false)
            .into_iter()
            .peekable();
        let mut hits = vec![0usize; 2 + self.stores.len()];
        plan.hashes.reserve_exact(walk.len());
        plan.sources.reserve_exact(walk.len());
        for (i, w) in walk.into_iter().enumerate() {
            let source = match w {
                Where::G1 => match g1_handles.next_if(|h| h.sequence_hash() == hashes[i]) {
                    Some(h) => Source::G1(h),
                    None => break,
                },
                Where::G2 => Source::G2,
                Where::Store(tier, verified) => Source::Store { tier, verified },
            };
            let tier = match &source {
                Source::G1(_) => TierId::G1,
                Source::G2 => TierId::G2,
                Source::Store { tier, .. } => TierId::Store(*tier),
            };
            hits[tier.index()] += 1;
            plan.hashes.push(hashes[i]);
            plan.sources.push(source);
        }
        // Handles past an early end are released with the iterator.
        ImmutableBlock::release_all(g1_handles);
        self.counters.lookup(&hits);
        plan
    }
}
