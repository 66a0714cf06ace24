//! One request's blocks: [`RequestSequence`], the part of an inference server's scheduler that
//! every integrator would otherwise write around [`BlockManager`].
//!
//! A request owns its token sequence (prompt, then generated tokens) and the blocks holding
//! their KV, in order: its **block table**. Tokens are *known* once appended and *computed*
//! once the engine has written their KV ([`commit`](RequestSequence::commit)); every block
//! whose tokens are all computed is staged and registered right then, so other requests can
//! share it at once. The cycle, as vLLM's `KVCacheManager` and Dynamo's request sequences run
//! it:
//!
//! ```text
//! build (prompt) ─▶ match_prefix ─▶ allocate(n) ─▶ engine step ─▶ commit(n) ─┐
//!                         ▲              ▲                                    │
//!                         │              └──── push / extend (sampled tokens) ◀┘
//!                         └── preempt (blocks released, tokens kept) ── resume
//! ```
//!
//! Rules:
//! * **Prefix match, minus the last token.** [`match_prefix`](RequestSequence::match_prefix)
//!   takes the longest cached prefix of complete blocks but, by default, never the block
//!   holding the last known token: the engine must compute at least that token to produce
//!   logits (vLLM caps its hit the same way). [`RequestBuilder::match_whole_prompt`] lifts
//!   the cap (for replays of traces whose blocks are whole prompts).
//! * **All or nothing.** [`allocate`](RequestSequence::allocate) takes every block a step
//!   needs ([`blocks_needed`](RequestSequence::blocks_needed)) or none.
//! * **A block-table entry never changes silently.** Under
//!   [`BlockDuplicationPolicy::Reject`](crate::BlockDuplicationPolicy::Reject), registering a
//!   block whose hash another request registered meanwhile hands back that block: the entry
//!   now names another slot (same tokens, same KV). [`Committed::changed`] lists every such
//!   entry; a [`truncate`](RequestSequence::truncate) that cuts into registered blocks reports
//!   the first changed entry. Nothing else ever changes an entry.
//! * **Tail first.** Preemption and drop release the blocks from the last to the first, so
//!   that under any recency policy the head of the prefix is the most recently used.
//! * **No allocation per token.** Appending, allocating and committing make no heap
//!   allocation once [`RequestBuilder::reserve_tokens`] has sized the buffers (except the
//!   `Stored` events, only while someone subscribes), and cost a few nanoseconds per token,
//!   hashing included (BENCHMARKS.md).

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::blocks::{ImmutableBlock, MutableBlock};
use crate::error::{AllocationError, RequestError};
use crate::events::RemovalReason;
use crate::hashing::{Salt, SaltHash, SequenceHash};
use crate::ids::BlockId;
use crate::manager::BlockManager;
use crate::sequence::TokenBlockSequence;
use crate::tier::BlockTier;

/// A block-table entry that a call changed: the engine must use `new` for block `index`
/// from now on. `old` went back to the reset pool (or, after a truncation, was released).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct TableChange {
    /// The entry (block index in the request).
    pub index: usize,
    /// The slot the entry named before.
    pub old: BlockId,
    /// The slot it names now.
    pub new: BlockId,
}

/// What a [`commit`](RequestSequence::commit) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Committed {
    /// The blocks (indices into the block table) that filled and were registered.
    pub registered: Range<usize>,
    /// Entries that now name another slot (policy `Reject` found the hash already cached);
    /// empty, and unallocated, in the usual case.
    pub changed: Vec<TableChange>,
}

/// What a [`truncate`](RequestSequence::truncate) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Truncated {
    /// Computed tokens now. Below the new length when the cut went into a registered block:
    /// those tokens must be computed again.
    pub computed: usize,
    /// The first block-table entry that changed, if any: registered blocks from there on
    /// were released and the entries after them moved down.
    pub changed_from: Option<usize>,
}

/// Configures a [`RequestSequence`]; see [`RequestSequence::builder`]. Every setter is
/// infallible and [`build`](Self::build) cannot fail.
#[derive(Clone, Debug)]
pub struct RequestBuilder<T: BlockTier> {
    manager: BlockManager<T>,
    prompt: Vec<u32>,
    salt: SaltHash,
    extra_keys: Vec<(usize, u64)>,
    cache: bool,
    whole_prompt: bool,
    reserve: usize,
    retention: Option<crate::RequestRetention>,
}

impl<T: BlockTier> RequestBuilder<T> {
    /// The prompt's tokens.
    pub fn prompt(mut self, tokens: &[u32]) -> Self {
        self.prompt = tokens.to_vec();
        self
    }

    /// The cache namespace: LoRA adapter and/or cache salt (default [`Salt::none`]).
    pub fn salt(mut self, salt: &Salt) -> Self {
        self.salt = salt.hash();
        self
    }

    /// The cache namespace as an already hashed salt.
    pub fn salt_hash(mut self, salt: SaltHash) -> Self {
        self.salt = salt;
        self
    }

    /// Per-block extra keys as `(token position, key)`, e.g. multimodal content hashes; see
    /// [`TokenBlockSequence::with_extra_keys`].
    pub fn extra_keys(mut self, keys: &[(usize, u64)]) -> Self {
        self.extra_keys = keys.to_vec();
        self
    }

    /// Whether the request's own blocks stay cached after it (default `true`). With `false`
    /// ("do not cache", Dynamo's reset-on-release) they are registered, so concurrent
    /// requests can share them, but each goes straight back to the reset pool when its last
    /// owner releases it (see [`CompleteBlock::reset_on_release`](crate::CompleteBlock::reset_on_release)).
    /// Blocks it matched from the cache are not affected.
    pub fn cache(mut self, cache: bool) -> Self {
        self.cache = cache;
        self
    }

    /// Let [`match_prefix`](RequestSequence::match_prefix) match every complete block of the
    /// known tokens (default `false`: never the block holding the last token, which the
    /// engine must compute to produce logits).
    pub fn match_whole_prompt(mut self, whole: bool) -> Self {
        self.whole_prompt = whole;
        self
    }

    /// The retention (eviction priority, with an optional expiry) of the blocks this request
    /// registers, by block index: e.g. a system prompt's blocks kept at a high priority. By
    /// default every block gets [`Retention::default`](crate::Retention::default). Only the
    /// [`Priority`](crate::EvictionBackend::Priority) eviction backend reads it. Blocks
    /// matched from the cache keep theirs; a block deduplicated onto a cached one gives it
    /// the stronger of the two.
    ///
    /// ```
    /// use kvbm_logical::{BlockManager, Device, EvictionBackend, RequestRetention, RequestSequence, Retention};
    /// let m = BlockManager::<Device>::builder()
    ///     .block_count(4).block_size(4).eviction(EvictionBackend::Priority).build()?;
    /// // Block 1 at priority 90, the rest at the default.
    /// let keep = RequestRetention::new(Retention::default()).with_range(1..2, Retention::new(90)?);
    /// let mut r = RequestSequence::builder(&m).prompt(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).retention(keep).build();
    /// r.allocate(9)?;
    /// r.commit(9)?;
    /// let first = r.registered_blocks()[0].sequence_hash();
    /// drop(r); // tail first: block 1 would be the older inactive block
    /// // Under pressure, the default-priority block 0 goes first all the same.
    /// let (_blocks, evicted) = m.allocate_blocks_with_evictions(3)?;
    /// assert_eq!(evicted, vec![first]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn retention(mut self, retention: crate::RequestRetention) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Room for this many tokens beyond the prompt (generated and speculative), reserved up
    /// front so that appending them, and the block table, make no allocation.
    pub fn reserve_tokens(mut self, tokens: usize) -> Self {
        self.reserve = tokens;
        self
    }

    /// The request, holding no block yet.
    pub fn build(self) -> RequestSequence<T> {
        let block_size = self.manager.block_size();
        // The manager's block size is at least 1 (checked by its builder).
        let mut seq = TokenBlockSequence::with_valid_block_size(block_size, self.salt);
        if !self.extra_keys.is_empty() {
            seq = seq.with_extra_keys(&self.extra_keys);
        }
        // A hint, bounded by what the manager could ever hold for one request (a larger one
        // is never served whole anyway): an absurd hint must not abort the process.
        let most = self
            .manager
            .total_blocks()
            .saturating_mul(block_size)
            .max(self.prompt.len());
        let capacity = self.prompt.len().saturating_add(self.reserve).min(most);
        seq.reserve(capacity);
        seq.extend(&self.prompt);
        let blocks = capacity / block_size + 1;
        RequestSequence {
            manager: self.manager,
            seq,
            prompt_len: self.prompt.len(),
            computed: 0,
            registered: Vec::with_capacity(blocks),
            mutable: VecDeque::with_capacity(blocks),
            table: Vec::with_capacity(blocks),
            cache: self.cache,
            whole_prompt: self.whole_prompt,
            retention: self.retention,
        }
    }
}

/// One request's token sequence and blocks; see the [module docs](self).
///
/// ```
/// use kvbm_logical::{BlockManager, Device, RequestSequence};
///
/// let m = BlockManager::<Device>::builder().block_count(64).block_size(4).build()?;
/// let prompt: Vec<u32> = (0..10).collect();
///
/// // Prefill in two chunks.
/// let mut req = RequestSequence::builder(&m).prompt(&prompt).build();
/// assert_eq!(req.match_prefix()?, 0);
/// req.allocate(6)?;
/// assert_eq!(req.block_table().len(), 2);
/// let done = req.commit(6)?; // the engine wrote tokens 0..6: block 0 is full
/// assert_eq!(done.registered, 0..1);
/// req.allocate(4)?;
/// req.commit(4)?; // tokens 6..10: block 1 full, block 2 holds 2 tokens
/// assert_eq!((req.num_computed_tokens(), req.block_table().len()), (10, 3));
///
/// // Decode: the sampled token is appended, then its KV computed in the next step.
/// req.push(99);
/// req.allocate(1)?;
/// req.commit(1)?;
///
/// // Preempted: blocks released (tail first), tokens kept; resumed later.
/// req.preempt();
/// assert!(req.block_table().is_empty());
/// assert_eq!(req.match_prefix()?, 2); // both full blocks are still cached
/// req.allocate(req.num_pending_tokens())?;
/// req.commit(req.num_pending_tokens())?;
///
/// // Another request with the same prompt shares the prefix.
/// let mut other = RequestSequence::builder(&m).prompt(&prompt).build();
/// assert_eq!(other.match_prefix()?, 2);
/// assert_eq!(other.block_table()[..2], req.block_table()[..2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RequestSequence<T: BlockTier> {
    manager: BlockManager<T>,
    seq: TokenBlockSequence,
    prompt_len: usize,
    /// Tokens whose KV is in the blocks; `registered.len() == computed / block_size`.
    computed: usize,
    /// Table entries `0..registered.len()`: block `i` holds `seq.blocks()[i]`.
    registered: Vec<ImmutableBlock<T>>,
    /// The entries after them: allocated, not yet full.
    mutable: VecDeque<MutableBlock<T>>,
    /// `registered` then `mutable`, by slot.
    table: Vec<BlockId>,
    cache: bool,
    whole_prompt: bool,
    /// The retention of the blocks it registers, by index (`None`: the default).
    retention: Option<crate::RequestRetention>,
}

impl<T: BlockTier> RequestSequence<T> {
    /// A builder for a request served by `manager`.
    pub fn builder(manager: &BlockManager<T>) -> RequestBuilder<T> {
        RequestBuilder {
            manager: manager.clone(),
            prompt: Vec::new(),
            salt: SaltHash::default(),
            extra_keys: Vec::new(),
            cache: true,
            whole_prompt: false,
            reserve: 0,
            retention: None,
        }
    }

    fn block_size(&self) -> usize {
        self.seq.block_size()
    }

    /// Takes the longest cached prefix of the known tokens' complete blocks (never the block
    /// of the last token, unless built with
    /// [`match_whole_prompt`](RequestBuilder::match_whole_prompt)); those tokens count as
    /// computed. Returns how many blocks matched. For a new request and after
    /// [`preempt`](Self::preempt) (resumption); refused while the request holds blocks.
    /// One lock acquisition; hits count as accesses, as with
    /// [`BlockManager::match_blocks`].
    pub fn match_prefix(&mut self) -> Result<usize, RequestError> {
        if !self.table.is_empty() {
            return Err(RequestError::HoldsBlocks {
                blocks: self.table.len(),
            });
        }
        let known = self.seq.tokens().len();
        let limit = if self.whole_prompt {
            known
        } else {
            known.saturating_sub(1)
        } / self.block_size();
        let candidates = &self.seq.blocks()[..limit.min(self.seq.blocks().len())];
        if candidates.is_empty() {
            return Ok(0);
        }
        let store = self.manager.store();
        {
            let mut state = store.lock();
            for block in candidates {
                let hash = block.sequence_hash();
                let probe = state.probe(hash);
                match state.lookup_acquire(probe) {
                    Some(id) => {
                        self.registered
                            .push(ImmutableBlock::new(Arc::clone(store), id, hash));
                        self.table.push(id);
                    }
                    None => break,
                }
            }
        }
        let matched = self.registered.len();
        store.metrics.add_match(candidates.len(), matched);
        store.record_accesses(candidates[..matched].iter().map(|b| b.sequence_hash()));
        self.computed = matched * self.block_size();
        Ok(matched)
    }

    /// Blocks to allocate so that `new_tokens` more tokens can be computed.
    pub fn blocks_needed(&self, new_tokens: usize) -> usize {
        let end = self.computed.saturating_add(new_tokens);
        // Decode asks once per token and almost always fits: no division then.
        if end <= self.table.len() * self.block_size() {
            return 0;
        }
        end.div_ceil(self.block_size())
            .saturating_sub(self.table.len())
    }

    /// Allocates the [`blocks_needed`](Self::blocks_needed) for `new_tokens` more tokens, all
    /// or nothing, and appends them to the block table; returns how many. `Err` when too few
    /// blocks are free or evictable: nothing was taken.
    pub fn allocate(&mut self, new_tokens: usize) -> Result<usize, AllocationError> {
        let n = self.blocks_needed(new_tokens);
        if n == 0 {
            return Ok(0);
        }
        let (table, mutable) = (&mut self.table, &mut self.mutable);
        let before = mutable.len();
        let result = self
            .manager
            .allocate_into(n, None, RemovalReason::Evicted, |block| {
                table.push(block.block_id());
                mutable.push_back(block);
            });
        if result.is_err() {
            // Only a broken eviction policy hands out blocks and then fails: give them back.
            self.table.truncate(self.registered.len() + before);
            MutableBlock::release_all(self.mutable.drain(before..));
        }
        result.map(|()| n)
    }

    /// Appends one known token (a sampled or speculative one); its KV is computed later
    /// ([`commit`](Self::commit)). No allocation within the reserved room.
    #[inline]
    pub fn push(&mut self, token: u32) {
        self.seq.push(token);
    }

    /// Appends known tokens; see [`push`](Self::push).
    pub fn extend(&mut self, tokens: &[u32]) {
        self.seq.extend(tokens);
    }

    /// The engine wrote the KV of the next `tokens` known tokens into the block table: they
    /// are computed now, and every block they fill is staged and registered (one lock
    /// acquisition for all of them), so that other requests can match it. Refused, changing
    /// nothing, if fewer tokens are known and not computed, or the table lacks the blocks.
    ///
    /// Under policy `Reject`, a filled block whose hash is already cached is swapped for the
    /// cached one (its slot goes back to the reset pool): [`Committed::changed`] says which
    /// entries now name another slot.
    pub fn commit(&mut self, tokens: usize) -> Result<Committed, RequestError> {
        let uncomputed = self.num_pending_tokens();
        if tokens > uncomputed {
            return Err(RequestError::NotEnoughTokens {
                requested: tokens,
                uncomputed,
            });
        }
        let bs = self.block_size();
        let end = self.computed + tokens;
        if end > self.table.len() * bs {
            return Err(RequestError::NotAllocated {
                needed: end.div_ceil(bs),
                allocated: self.table.len(),
            });
        }
        self.computed = end;
        let first = self.registered.len();
        // Decode commits one token at a time and fills a block every `bs` of them: the
        // common case takes no division.
        if end < (first + 1) * bs {
            return Ok(Committed {
                registered: first..first,
                changed: Vec::new(),
            });
        }
        let full = end / bs;
        let mut out = Committed {
            registered: first..full,
            changed: Vec::new(),
        };
        let seq = &self.seq;
        let retention = self.retention.as_ref();
        let staged = self
            .mutable
            .drain(..full - first)
            .zip(&seq.blocks()[first..full])
            .map(|(block, tb)| {
                let tokens = seq.block_tokens(tb.index());
                let mut staged = block.stage_own_size(tb.sequence_hash(), tb.parent());
                if let Some(r) = retention {
                    staged.set_retention(r.for_block(tb.index()));
                }
                (staged, tokens)
            });
        let (registered, table, changed) =
            (&mut self.registered, &mut self.table, &mut out.changed);
        self.manager
            .register_token_blocks(staged, !self.cache, |handle, moved| {
                let index = registered.len();
                if moved {
                    changed.push(TableChange {
                        index,
                        old: table[index],
                        new: handle.block_id(),
                    });
                    table[index] = handle.block_id();
                }
                registered.push(handle);
            });
        Ok(out)
    }

    /// Shortens the known tokens to `len` (rejected speculative tokens, a stop string). Tokens
    /// computed beyond `len` are dropped; if `len` cuts into a registered block, that block
    /// and the registered ones after it are released (tail first), their tokens up to `len`
    /// must be computed again, and the entries from there on change (reported). Allocated
    /// blocks stay in the table. Does nothing if `len` is not shorter.
    pub fn truncate(&mut self, len: usize) -> Truncated {
        let mut out = Truncated {
            computed: self.computed,
            changed_from: None,
        };
        if len >= self.seq.tokens().len() {
            return out;
        }
        self.seq.truncate(len);
        if self.computed > len {
            let keep = len / self.block_size();
            if self.registered.len() > keep {
                // The bookkeeping first, then the release: a release that unwinds (a user
                // clock's panic, resumed there) must not leave released slots in the table
                // (and the drain leaves `registered` at `keep` blocks whatever happens).
                self.table.clear();
                self.table
                    .extend(self.registered[..keep].iter().map(ImmutableBlock::block_id));
                self.table
                    .extend(self.mutable.iter().map(MutableBlock::block_id));
                self.computed = keep * self.block_size();
                out.changed_from = Some(keep);
                ImmutableBlock::release_all(self.registered.drain(keep..).rev());
            } else {
                self.computed = len;
            }
            out.computed = self.computed;
        }
        out
    }

    /// Preemption: releases every block, tail first (allocated ones to the reset pool,
    /// registered ones to the inactive pool, where they stay matchable), and keeps the
    /// tokens; nothing is computed any more. Resume with [`match_prefix`](Self::match_prefix)
    /// and [`allocate`](Self::allocate). Returns how many blocks were released.
    pub fn preempt(&mut self) -> usize {
        let n = self.table.len();
        // The bookkeeping first, then the releases (see `truncate`); the emptied buffers come
        // back afterwards, so a resumed request keeps its reserved room.
        let mut mutable = std::mem::take(&mut self.mutable);
        let mut registered = std::mem::take(&mut self.registered);
        self.table.clear();
        self.computed = 0;
        MutableBlock::release_all(mutable.drain(..).rev());
        ImmutableBlock::release_all(registered.drain(..).rev());
        self.mutable = mutable;
        self.registered = registered;
        n
    }

    /// The block table: slot ids, one per block of the request, in order (what attention
    /// kernels index).
    pub fn block_table(&self) -> &[BlockId] {
        &self.table
    }

    /// The registered blocks (the first `num_computed_tokens() / block_size` entries of the
    /// table), e.g. to hand to an offload tier.
    pub fn registered_blocks(&self) -> &[ImmutableBlock<T>] {
        &self.registered
    }

    /// The sequence hashes of the complete blocks of the known tokens.
    pub fn sequence_hashes(&self) -> impl ExactSizeIterator<Item = SequenceHash> + '_ {
        self.seq.sequence_hashes()
    }

    /// The token sequence (known tokens, complete blocks and their hashes).
    pub fn sequence(&self) -> &TokenBlockSequence {
        &self.seq
    }

    /// Known tokens: the prompt and every token appended since (minus truncations).
    pub fn num_tokens(&self) -> usize {
        self.seq.tokens().len()
    }

    /// Tokens whose KV is in the block table.
    pub fn num_computed_tokens(&self) -> usize {
        self.computed
    }

    /// Known tokens not yet computed.
    pub fn num_pending_tokens(&self) -> usize {
        self.num_tokens() - self.computed
    }

    /// The prompt's length, as built.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Whether the request's own blocks stay cached after it ([`RequestBuilder::cache`]).
    pub fn is_cached(&self) -> bool {
        self.cache
    }

    /// The manager serving the request.
    pub fn manager(&self) -> &BlockManager<T> {
        &self.manager
    }
}

impl<T: BlockTier> Drop for RequestSequence<T> {
    /// Releases every block, tail first, as [`preempt`](RequestSequence::preempt) does.
    fn drop(&mut self) {
        self.preempt();
    }
}

impl<T: BlockTier> fmt::Debug for RequestSequence<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSequence")
            .field("tier", &T::NAME)
            .field("manager", &self.manager.id())
            .field("tokens", &self.num_tokens())
            .field("computed", &self.computed)
            .field("registered", &self.registered.len())
            .field("allocated", &self.mutable.len())
            .field("cache", &self.cache)
            .finish()
    }
}
