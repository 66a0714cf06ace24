//! Lookup: a [`Plan`] of where each block of a request's prefix is, across all tiers.

use kvbm_logical::{Device, Host, ImmutableBlock, SequenceHash};

use super::config::Probe;
use super::core::{Inner, TierStack};
use super::stats::TierId;

/// Where one block of a plan comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A G1 hit, held so nothing can evict it.
    G1(ImmutableBlock<Device>),
    /// A G2 hit, held (in place) so nothing can evict it before the onboard copies it.
    G2(ImmutableBlock<Host>),
    /// In store tier `tier`; `verified` is false for a deferred probe (fetched on demand).
    Store { tier: usize, verified: bool },
}

/// The result of [`TierStack::lookup`]: the longest prefix of the request that some tier
/// holds, block by block, with the G1 and G2 hits held (nothing can evict them while the
/// plan lives). A plan copies nothing and allocates nothing; commit it with
/// [`TierStack::onboard`], or drop it (its hits are released, back where they were).
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
            Source::G2(_) => TierId::G2,
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

    /// Shortens the plan to its first `len` blocks, releasing the hits beyond.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.hashes.truncate(len);
            release(self.sources.split_off(len));
        }
    }
}

/// Releases the G1 and G2 hits among `sources` (one lock per tier).
pub(crate) fn release(sources: Vec<Source>) {
    let mut g2 = Vec::new();
    ImmutableBlock::release_all(sources.into_iter().filter_map(|s| match s {
        Source::G1(b) => Some(b),
        Source::G2(b) => {
            g2.push(b);
            None
        }
        Source::Store { .. } => None,
    }));
    ImmutableBlock::release_all(g2);
}

/// The hashes among `hashes` that `hits` lacks. `hits` holds blocks of some of them, in
/// their order, so one pass of compares does it.
fn absent<T: kvbm_logical::BlockTier>(
    hashes: &[SequenceHash],
    hits: &[ImmutableBlock<T>],
) -> Vec<SequenceHash> {
    if hits.len() == hashes.len() {
        return Vec::new();
    }
    let mut next = hits.iter().peekable();
    let mut out = Vec::with_capacity(hashes.len() - hits.len());
    out.extend(
        (hashes.iter().copied()).filter(|&h| next.next_if(|b| b.sequence_hash() == h).is_none()),
    );
    out
}

impl Drop for Plan {
    fn drop(&mut self) {
        self.truncate(0);
    }
}

impl TierStack {
    /// Plans onboarding `hashes` (a chain from the start of a sequence): walks them in
    /// order across all tiers and stops at the first hash no tier has. A G1 hit after a G2
    /// hit is still a G1 hit. Takes the G1 hits as handles (one lock, one registry probe
    /// per hash), then G2's hits among the hashes G1 lacks (one lock; none if G1 has them
    /// all; without a store tier only up to G2's first miss), and asks each
    /// [`Probe::OnLookup`] store tier about those G2 lacks too (`contains`, one call); a
    /// [`Probe::Deferred`] tier is not asked: the blocks no other tier holds are planned
    /// from it, unverified. Holding G2's hits means that nothing can evict them between the
    /// lookup and the onboard's copy, and that the commit need not look them up again.
    ///
    /// No copy, no allocation, no access recorded, no eviction order changed: the hits are
    /// taken with `scan_matches(.., touch: false)` (or `scan_prefix`), which leaves an
    /// inactive hit where it was in its tier's eviction order (a plan dropped uncommitted,
    /// and a hit past the end of the plan, go back there); committing records the use.
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
        // G1: one lock, one registry probe per hash, and the hits taken at once (in place:
        // no access recorded, no eviction order changed). Those past the end of the walk
        // are released below, back where they were.
        let g1 = self.g1.manager.scan_matches(hashes, false);
        let lacking = absent(hashes, &g1);
        // G2 is asked only about the hashes G1 lacks (none: no G2 lock at all), and its hits
        // are taken as handles in place, like G1's, so that nothing evicts them before the
        // onboard copies them; store tiers are asked only about the hashes G2 lacks too.
        let g2_hits = if lacking.is_empty() {
            Vec::new()
        } else if self.stores.is_empty() {
            // No tier below G2: the walk ends at the first hash G1 and G2 both lack, so G2 is
            // asked only up to its first miss among the hashes G1 lacks (a request's new
            // blocks are not probed one by one).
            self.g2.manager.scan_prefix(&lacking)
        } else {
            self.g2.manager.scan_matches(&lacking, false)
        };
        let mut in_store: Vec<Vec<bool>> = Vec::new();
        let mut deferred = None;
        if !self.stores.is_empty() {
            let misses = absent(&lacking, &g2_hits);
            deferred = self.stores.iter().position(|s| s.probe == Probe::Deferred);
            in_store.reserve_exact(self.stores.len());
            for s in &self.stores {
                if misses.is_empty() || s.probe == Probe::Deferred {
                    in_store.push(Vec::new());
                    continue;
                }
                let mut found = s.tier.contains(&misses);
                found.resize(misses.len(), false);
                in_store.push(found);
            }
        }
        // The walk: stops at the first hash no tier has (or may have, for a deferred tier).
        let mut hits = [0usize; 2];
        let mut store_hits: Vec<usize> = vec![0; self.stores.len()];
        plan.hashes.reserve_exact(hashes.len());
        plan.sources.reserve_exact(hashes.len());
        let mut miss_at = 0;
        let mut g1 = g1.into_iter().peekable();
        let mut g2_hits = g2_hits.into_iter().peekable();
        for &h in hashes {
            let source = match g1.next_if(|b| b.sequence_hash() == h) {
                Some(b) => {
                    hits[0] += 1;
                    Source::G1(b)
                }
                None => {
                    // `g2_hits` is in chain order too: the next one is this hash's or later.
                    if let Some(b) = g2_hits.next_if(|b| b.sequence_hash() == h) {
                        hits[1] += 1;
                        Source::G2(b)
                    } else {
                        let k = miss_at;
                        miss_at += 1;
                        let found = (0..self.stores.len())
                            .find(|&t| in_store[t].get(k) == Some(&true))
                            .map(|t| (t, true))
                            .or(deferred.map(|t| (t, false)));
                        let Some((tier, verified)) = found else { break };
                        store_hits[tier] += 1;
                        Source::Store { tier, verified }
                    }
                }
            };
            plan.hashes.push(h);
            plan.sources.push(source);
        }
        // Hits past the end go back where they were (one lock per tier, if any).
        if g1.peek().is_some() {
            ImmutableBlock::release_all(g1);
        }
        if g2_hits.peek().is_some() {
            ImmutableBlock::release_all(g2_hits);
        }
        if store_hits.is_empty() {
            self.counters.lookup(&hits);
        } else {
            let mut all = Vec::with_capacity(2 + store_hits.len());
            all.extend_from_slice(&hits);
            all.extend_from_slice(&store_hits);
            self.counters.lookup(&all);
        }
        plan
    }
}
