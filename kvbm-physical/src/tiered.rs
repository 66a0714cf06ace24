//! Two tiers glued by copies: G1 (device, where the engine computes) and G2 (host).
//!
//! - **Offload.** With [`OffloadMode::WriteThrough`], registering a block in G1 copies it to
//!   G2 and registers it there. With [`OffloadMode::WriteBack`], the copy happens when a G1
//!   allocation evicts the block: the allocation returns only after the evicted bytes have
//!   reached G2, so the caller may overwrite the slot at once.
//! - **Onboard.** [`TieredManager::match_blocks`] returns the G1 prefix hits, then copies the
//!   following G2 hits into fresh G1 blocks and registers them, so the caller receives one
//!   prefix of G1 blocks.
//! - **Failure.** A failed copy never registers a block: the destination slots go back to
//!   their reset pool and the outcome's error lists every hash that did not reach the tier
//!   (failed copies and blocks that found no room alike), as many as
//!   [`TieredStats::lost`] counts. A G2 block whose checksum no longer matches is dropped
//!   from G2.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvbm_logical::{
    BlockId, BlockManager, BlockTier, CompleteBlock, Device, Host, ImmutableBlock, MutableBlock,
    RegisterError, SequenceHash,
};

use crate::error::{TieredError, TransferError};
use crate::layout::Layout;
use crate::transfer::{CopyOptions, TransferEngine};

/// When G1 blocks are copied to G2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OffloadMode {
    /// On registration in G1.
    WriteThrough,
    /// When G1 evicts the block.
    WriteBack,
}

/// A block manager and the memory its block ids index.
#[derive(Debug)]
pub struct Tier<T: BlockTier> {
    manager: BlockManager<T>,
    layout: Arc<Layout>,
}

impl<T: BlockTier> Tier<T> {
    /// Pairs `manager` with `layout`; they must agree on the block count and on tokens per
    /// block (`page_size`).
    pub fn new(manager: BlockManager<T>, layout: Arc<Layout>) -> Result<Self, TieredError> {
        if manager.total_blocks() != layout.num_blocks() {
            return Err(TieredError::Config(format!(
                "{} manager has {} blocks, its layout {}",
                T::NAME,
                manager.total_blocks(),
                layout.num_blocks()
            )));
        }
        if manager.block_size() != layout.config().page_size {
            return Err(TieredError::Config(format!(
                "{} manager has {} tokens per block, its layout's page_size is {}",
                T::NAME,
                manager.block_size(),
                layout.config().page_size
            )));
        }
        Ok(Self { manager, layout })
    }

    /// The block manager.
    pub fn manager(&self) -> &BlockManager<T> {
        &self.manager
    }

    /// The memory.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }
}

/// What [`TieredManager::allocate_blocks`] did.
#[derive(Debug)]
pub struct Allocation {
    /// The fresh G1 blocks.
    pub blocks: Vec<MutableBlock<Device>>,
    /// Evicted blocks copied to G2 first (write-back).
    pub offloaded: usize,
    /// Evicted blocks that could not be copied to G2: gone from both tiers.
    pub error: Option<TieredError>,
}

/// What [`TieredManager::register_blocks`] did.
#[derive(Debug)]
pub struct Registration {
    /// One G1 handle per input, in order.
    pub blocks: Vec<ImmutableBlock<Device>>,
    /// Blocks newly copied to and registered in G2 (write-through; blocks already in G2 are
    /// not copied again).
    pub offloaded: usize,
    /// Blocks that did not reach G2 (they are still correct in G1).
    pub error: Option<TieredError>,
}

/// What [`TieredManager::match_blocks`] found.
#[derive(Debug)]
pub struct MatchOutcome {
    /// One prefix of G1 blocks: the G1 hits, then the onboarded ones.
    pub blocks: Vec<ImmutableBlock<Device>>,
    /// How many of `blocks` were already in G1.
    pub g1_hits: usize,
    /// How many were copied from G2.
    pub onboarded: usize,
    /// Why onboarding stopped early, if it did: the G2 hits that did not reach G1.
    pub error: Option<TieredError>,
    /// Write-back: blocks that the onboarding's G1 allocation evicted and copied to G2
    /// first (as [`Allocation::offloaded`]).
    pub offloaded: usize,
    /// Write-back: blocks that allocation evicted but could not copy to G2, so gone from
    /// both tiers (as [`Allocation::error`]); `None` when every evicted block reached G2.
    pub offload_error: Option<TieredError>,
}

/// Counters of a [`TieredManager`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TieredStats {
    /// Blocks copied G1 → G2 and registered there.
    pub offloaded: u64,
    /// Blocks copied G2 → G1 and registered there.
    pub onboarded: u64,
    /// Blocks that a failed or refused copy kept from their tier.
    pub lost: u64,
}

/// A G1 (device) and a G2 (host) tier with offload and onboard copies; see the
/// [module docs](self) and the crate example.
#[derive(Debug)]
pub struct TieredManager {
    g1: Tier<Device>,
    g2: Tier<Host>,
    engine: TransferEngine,
    mode: OffloadMode,
    offloaded: AtomicU64,
    onboarded: AtomicU64,
    lost: AtomicU64,
}

/// A block to copy down: its G1 slot, hash and parent.
type Item = (BlockId, SequenceHash, Option<SequenceHash>);

impl TieredManager {
    /// Glues two tiers. Their layouts must have the same shape per block (layers, outer
    /// dimension, region size) and their managers the same block size.
    pub fn new(
        g1: Tier<Device>,
        g2: Tier<Host>,
        engine: TransferEngine,
        mode: OffloadMode,
    ) -> Result<Self, TieredError> {
        let (a, b) = (g1.layout.config(), g2.layout.config());
        if (a.num_layers, a.outer_dim, g1.layout.region_bytes())
            != (b.num_layers, b.outer_dim, g2.layout.region_bytes())
        {
            return Err(TieredError::Config(format!(
                "block shapes differ: G1 {a:?}, G2 {b:?}"
            )));
        }
        Ok(Self {
            g1,
            g2,
            engine,
            mode,
            offloaded: AtomicU64::new(0),
            onboarded: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// The device tier.
    pub fn g1(&self) -> &Tier<Device> {
        &self.g1
    }

    /// The host tier.
    pub fn g2(&self) -> &Tier<Host> {
        &self.g2
    }

    /// The offload mode.
    pub fn mode(&self) -> OffloadMode {
        self.mode
    }

    /// Counters since construction.
    pub fn stats(&self) -> TieredStats {
        TieredStats {
            offloaded: self.offloaded.load(Ordering::Relaxed),
            onboarded: self.onboarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }

    /// Allocates `count` G1 blocks, all or nothing. In write-back mode, blocks this evicts
    /// from G1 are copied to G2 before the call returns.
    pub fn allocate_blocks(&self, count: usize) -> Result<Allocation, TieredError> {
        if self.mode == OffloadMode::WriteThrough {
            let blocks = self.g1.manager.allocate_blocks(count)?;
            return Ok(Allocation {
                blocks,
                offloaded: 0,
                error: None,
            });
        }
        let (blocks, evicted) = self.g1.manager.allocate_blocks_evicting(count)?;
        let items: Vec<Item> = evicted
            .iter()
            .map(|e| (e.block_id, e.hash, e.parent))
            .collect();
        let (offloaded, error) = self.offload(&items);
        Ok(Allocation {
            blocks,
            offloaded,
            error,
        })
    }

    /// Registers staged G1 blocks (see [`BlockManager::register_blocks`]); in write-through
    /// mode, also copies the ones not yet in G2 there and registers them. A foreign block
    /// refuses the batch, as in G1, handing every block back.
    pub fn register_blocks(
        &self,
        blocks: Vec<CompleteBlock<Device>>,
    ) -> Result<Registration, RegisterError<Vec<CompleteBlock<Device>>>> {
        let parents: Vec<Option<SequenceHash>> = blocks.iter().map(|b| b.parent()).collect();
        let blocks = self.g1.manager.register_blocks(blocks)?;
        let (offloaded, error) = if self.mode == OffloadMode::WriteThrough {
            let items: Vec<Item> = blocks
                .iter()
                .zip(parents)
                .map(|(b, p)| (b.block_id(), b.sequence_hash(), p))
                .collect();
            self.offload(&items)
        } else {
            (0, None)
        };
        Ok(Registration {
            blocks,
            offloaded,
            error,
        })
    }

    /// Copies G1 blocks (held by the caller: registered handles or freshly evicted slots)
    /// to G2 and registers them there; skips hashes G2 already has.
    fn offload(&self, items: &[Item]) -> (usize, Option<TieredError>) {
        let hashes: Vec<SequenceHash> = items.iter().map(|i| i.1).collect();
        let present = self.g2.manager.contains_each(&hashes);
        let todo: Vec<Item> = items
            .iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(&item, _)| item)
            .collect();
        if todo.is_empty() {
            return (0, None);
        }
        let g2 = &self.g2.manager;
        let want = todo.len().min(g2.available_blocks());
        // Should someone take blocks in between, nothing is copied.
        let dst = g2.allocate_blocks(want).unwrap_or_default();
        let (fits, spill) = todo.split_at(dst.len());
        let spilled = || spill.iter().map(|i| i.1);
        let mut error = (!spill.is_empty()).then(|| TieredError::Exhausted {
            tier: Host::NAME,
            lost: spilled().collect(),
        });
        let mut done = 0;
        if !fits.is_empty() {
            let pairs: Vec<(BlockId, BlockId)> = fits
                .iter()
                .zip(&dst)
                .map(|(i, b)| (i.0, b.block_id()))
                .collect();
            let copied = self
                .engine
                .copy_blocks_blocking(
                    &self.g1.layout,
                    &self.g2.layout,
                    &pairs,
                    &CopyOptions::default(),
                )
                .map(|_| ());
            let (ok, failure) = split_outcome(copied, fits.len());
            let mut staged = Vec::with_capacity(fits.len());
            let mut lost = Vec::new();
            for ((i, block), ok) in fits.iter().zip(dst).zip(ok) {
                if ok {
                    match block.stage(i.1, g2.block_size()) {
                        Ok(b) => staged.push(b.with_parent(i.2)),
                        Err(_) => lost.push(i.1), // sizes were checked at construction
                    }
                } else {
                    lost.push(i.1); // `block` drops: back to G2's reset pool
                }
            }
            done = staged.len();
            if let Ok(handles) = g2.register_blocks(staged) {
                ImmutableBlock::release_all(handles);
            }
            if let Some(source) = failure {
                // One error for the call: the failed copies and the blocks that found no room.
                lost.extend(spilled());
                error = Some(TieredError::Copy {
                    tier: Host::NAME,
                    lost,
                    source,
                });
            }
        }
        self.offloaded.fetch_add(done as u64, Ordering::Relaxed);
        self.lost
            .fetch_add((todo.len() - done) as u64, Ordering::Relaxed);
        (done, error)
    }

    /// Prefix match across tiers: the G1 hits, then the G2 hits after them onboarded into
    /// G1 (copied and registered), as one prefix of G1 blocks. `hashes` is a chain from the
    /// start of a sequence: each onboarded block is registered with the hash before it as
    /// its parent.
    pub fn match_blocks(&self, hashes: &[SequenceHash]) -> MatchOutcome {
        let mut blocks = self.g1.manager.match_blocks(hashes);
        let g1_hits = blocks.len();
        // Before the G1 allocation nothing is evicted.
        let outcome = |blocks, onboarded, error| MatchOutcome {
            blocks,
            g1_hits,
            onboarded,
            error,
            offloaded: 0,
            offload_error: None,
        };
        let rest = &hashes[g1_hits..];
        if rest.is_empty() {
            return outcome(blocks, 0, None);
        }
        let mut hits = self.g2.manager.match_blocks(rest);
        // Hashes that were in G2 but did not reach G1, and the first reason why.
        let mut lost: Vec<SequenceHash> = Vec::new();
        let mut first_error: Option<TieredError> = None;
        let room = self.g1.manager.available_blocks();
        if hits.len() > room {
            let skipped = hits.split_off(room);
            lost.extend(skipped.iter().map(ImmutableBlock::sequence_hash));
            first_error = Some(TieredError::Exhausted {
                tier: Device::NAME,
                lost: lost.clone(),
            });
        }
        if hits.is_empty() {
            return outcome(blocks, 0, first_error);
        }
        let Allocation {
            blocks: fresh,
            offloaded,
            error: offload_error,
        } = match self.allocate_blocks(hits.len()) {
            Ok(allocation) => allocation,
            Err(e) => return outcome(blocks, 0, Some(e)),
        };
        let mut pairs: Vec<(BlockId, BlockId)> = hits
            .iter()
            .zip(&fresh)
            .map(|(h, f)| (h.block_id(), f.block_id()))
            .collect();
        let mut copied = self.copy_up(&pairs);
        if let Err(TransferError::ChecksumMismatch {
            block,
            expected,
            actual,
        }) = copied
        {
            // The G2 copy at `k` is corrupt: drop it from G2 and onboard what precedes it.
            let k = pairs.iter().position(|p| p.0 == block).unwrap_or(0);
            let corrupt = hits[k].sequence_hash();
            lost.splice(0..0, hits.drain(k..).map(|h| h.sequence_hash()));
            self.g2.manager.invalidate_blocks(&[corrupt]);
            pairs.truncate(k);
            first_error.get_or_insert(TieredError::Copy {
                tier: Device::NAME,
                lost: Vec::new(),
                source: TransferError::ChecksumMismatch {
                    block,
                    expected,
                    actual,
                },
            });
            copied = if k > 0 { self.copy_up(&pairs) } else { Ok(()) };
        }
        let (ok, failure) = split_outcome(copied, pairs.len());
        // Keep the prefix that landed; everything from the first failure goes back.
        let landed = ok.iter().take_while(|&&ok| ok).count();
        let mut staged = Vec::with_capacity(landed);
        let mut not_landed = Vec::new();
        for (i, block) in fresh.into_iter().enumerate() {
            let at = g1_hits + i;
            if i < landed {
                let parent = at.checked_sub(1).map(|p| hashes[p]);
                match block.stage(hashes[at], self.g1.manager.block_size()) {
                    Ok(b) => staged.push(b.with_parent(parent)),
                    Err(_) => not_landed.push(hashes[at]),
                }
            } else if i < pairs.len() {
                not_landed.push(hashes[at]); // `block` drops: back to G1's reset pool
            }
        }
        lost.splice(0..0, not_landed);
        drop(hits);
        let onboarded = staged.len();
        if let Ok(handles) = self.g1.manager.register_blocks(staged) {
            blocks.extend(handles);
        }
        self.onboarded
            .fetch_add(onboarded as u64, Ordering::Relaxed);
        if let Some(source) = failure {
            first_error.get_or_insert(TieredError::Copy {
                tier: Device::NAME,
                lost: Vec::new(),
                source,
            });
        }
        // Every error carries the full list of hashes that stayed behind in G2.
        let error = first_error.map(|mut e| {
            match &mut e {
                TieredError::Copy { lost: l, .. } | TieredError::Exhausted { lost: l, .. } => {
                    l.clone_from(&lost)
                }
                _ => {}
            }
            e
        });
        self.lost.fetch_add(lost.len() as u64, Ordering::Relaxed);
        MatchOutcome {
            offloaded,
            offload_error,
            ..outcome(blocks, onboarded, error)
        }
    }

    fn copy_up(&self, pairs: &[(BlockId, BlockId)]) -> Result<(), TransferError> {
        self.engine
            .copy_blocks_blocking(
                &self.g2.layout,
                &self.g1.layout,
                pairs,
                &CopyOptions::default(),
            )
            .map(|_| ())
    }
}

/// Per pair: did its copy land? And the error, if any.
fn split_outcome(
    result: Result<(), TransferError>,
    n: usize,
) -> (Vec<bool>, Option<TransferError>) {
    match result {
        Ok(()) => (vec![true; n], None),
        Err(TransferError::CopyFailed { failed, error }) => {
            let mut ok = vec![true; n];
            for &i in &failed {
                if let Some(slot) = ok.get_mut(i) {
                    *slot = false;
                }
            }
            (ok, Some(TransferError::CopyFailed { failed, error }))
        }
        Err(other) => (vec![false; n], Some(other)),
    }
}
