//! Token sequences cut into hashed blocks.

use std::ops::Range;

use crate::error::SequenceError;
use crate::hashing::{SaltHash, SequenceHash, hash_block};

/// One complete block of a [`TokenBlockSequence`]: its hash, its parent's hash and its size.
///
/// It carries everything [`MutableBlock::stage_token_block`](crate::MutableBlock::stage_token_block)
/// needs; the tokens themselves stay in the sequence ([`TokenBlockSequence::block_tokens`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenBlock {
    sequence_hash: SequenceHash,
    parent: Option<SequenceHash>,
    block_size: usize,
    index: usize,
}

impl TokenBlock {
    /// The block's sequence hash (names the block and its whole prefix).
    pub fn sequence_hash(&self) -> SequenceHash {
        self.sequence_hash
    }

    /// The previous block's sequence hash; `None` for the first block.
    pub fn parent(&self) -> Option<SequenceHash> {
        self.parent
    }

    /// Tokens in the block (the sequence's block size).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Position of the block in its sequence (0 for the first).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// A growing token sequence cut into complete blocks of `block_size` tokens plus a partial
/// tail, each complete block hashed by the [specification](crate::hashing).
///
/// Appending tokens extends the tail and hashes every block it completes; hashes of earlier
/// blocks never change. [`truncate`](Self::truncate) rolls back (for example rejected
/// speculative tokens).
///
/// ```
/// use kvbm_logical::{Salt, TokenBlockSequence};
///
/// let mut seq = TokenBlockSequence::new(4, &Salt::none())?;
/// let done = seq.extend(&[1, 2, 3, 4, 5, 6]);
/// assert_eq!(done, 0..1); // one block completed
/// assert_eq!(seq.partial_tokens(), &[5, 6]);
///
/// let done = seq.extend(&[7, 8, 9]);
/// assert_eq!(done, 1..2);
/// let blocks = seq.blocks();
/// assert_eq!(blocks[1].parent(), Some(blocks[0].sequence_hash()));
/// assert_eq!(seq.block_tokens(1), &[5, 6, 7, 8]);
///
/// // The same tokens give the same hashes, however they arrive.
/// let whole = TokenBlockSequence::from_tokens(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4, &Salt::none())?;
/// assert_eq!(whole.sequence_hashes().collect::<Vec<_>>(), seq.sequence_hashes().collect::<Vec<_>>());
/// # Ok::<(), kvbm_logical::SequenceError>(())
/// ```
#[derive(Clone, Debug)]
pub struct TokenBlockSequence {
    block_size: usize,
    salt: SaltHash,
    tokens: Vec<u32>,
    blocks: Vec<TokenBlock>,
    /// Token positions of the extra keys, ascending; `extra_keys[i]` is at `extra_pos[i]`.
    extra_pos: Vec<usize>,
    extra_keys: Vec<u64>,
}

impl TokenBlockSequence {
    /// An empty sequence. Errors if `block_size` is zero.
    pub fn new(block_size: usize, salt: &crate::Salt) -> Result<Self, SequenceError> {
        Self::with_salt_hash(block_size, salt.hash())
    }

    /// An empty sequence chaining from an already hashed salt.
    pub fn with_salt_hash(block_size: usize, salt: SaltHash) -> Result<Self, SequenceError> {
        if block_size == 0 {
            return Err(SequenceError::ZeroBlockSize);
        }
        Ok(Self::with_valid_block_size(block_size, salt))
    }

    /// An empty sequence; `block_size` is not zero (a manager's).
    pub(crate) fn with_valid_block_size(block_size: usize, salt: SaltHash) -> Self {
        debug_assert!(block_size > 0);
        Self {
            block_size: block_size.max(1),
            salt,
            tokens: Vec::new(),
            blocks: Vec::new(),
            extra_pos: Vec::new(),
            extra_keys: Vec::new(),
        }
    }

    /// Sets per-block extra keys, such as the content hashes of multimodal inputs: each
    /// `(position, key)` enters the hash of the block holding token `position` (keys of one
    /// block in position order, then input order), as the `extra_keys` of
    /// [`hash_block`](crate::hash_block). Replaces any earlier keys and re-hashes the blocks
    /// already complete. Keys at positions beyond the tokens apply once those tokens come.
    ///
    /// ```
    /// use kvbm_logical::{Salt, TokenBlockSequence, hash_block};
    /// let tokens = [7u32; 8];
    /// let image = 0xfeed_u64; // the image's content hash; its placeholders are tokens 5..8
    /// let seq = TokenBlockSequence::new(4, &Salt::none())?.with_extra_keys(&[(5, image)]);
    /// let mut seq = seq;
    /// seq.extend(&tokens);
    /// let first = hash_block(None, Salt::none().hash(), &tokens[..4], &[]);
    /// assert_eq!(seq.blocks()[0].sequence_hash(), first);
    /// let second = hash_block(Some(first), Salt::none().hash(), &tokens[4..], &[image]);
    /// assert_eq!(seq.blocks()[1].sequence_hash(), second);
    /// # Ok::<(), kvbm_logical::SequenceError>(())
    /// ```
    pub fn with_extra_keys(mut self, keys: &[(usize, u64)]) -> Self {
        let mut sorted = keys.to_vec();
        sorted.sort_by_key(|&(pos, _)| pos); // stable: input order within a position
        self.extra_pos = sorted.iter().map(|&(pos, _)| pos).collect();
        self.extra_keys = sorted.iter().map(|&(_, key)| key).collect();
        let complete = self.blocks.len();
        self.blocks.clear();
        for index in 0..complete {
            self.hash_block_at(index);
        }
        self
    }

    /// The extra keys of complete or future block `index` (see
    /// [`with_extra_keys`](Self::with_extra_keys)).
    pub fn block_extra_keys(&self, index: usize) -> &[u64] {
        let start = index.saturating_mul(self.block_size);
        let end = start.saturating_add(self.block_size);
        let lo = self.extra_pos.partition_point(|&p| p < start);
        let hi = self.extra_pos.partition_point(|&p| p < end);
        &self.extra_keys[lo..hi]
    }

    /// Reserves room for `additional` more tokens (and their blocks), so that appending them
    /// makes no allocation.
    pub fn reserve(&mut self, additional: usize) {
        self.tokens.reserve(additional);
        self.blocks
            .reserve((self.tokens.len() + additional) / self.block_size - self.blocks.len());
    }

    /// A sequence holding `tokens`.
    pub fn from_tokens(
        tokens: &[u32],
        block_size: usize,
        salt: &crate::Salt,
    ) -> Result<Self, SequenceError> {
        let mut seq = Self::new(block_size, salt)?;
        seq.extend(tokens);
        Ok(seq)
    }

    /// Appends tokens; returns the indices (into [`blocks`](Self::blocks)) of the blocks this
    /// call completed.
    pub fn extend(&mut self, tokens: &[u32]) -> Range<usize> {
        let first_new = self.blocks.len();
        self.tokens.extend_from_slice(tokens);
        let complete = self.tokens.len() / self.block_size;
        self.blocks.reserve(complete - first_new);
        for index in first_new..complete {
            self.hash_block_at(index);
        }
        first_new..complete
    }

    /// Appends one token; returns the block it completed, if any.
    #[inline]
    pub fn push(&mut self, token: u32) -> Option<TokenBlock> {
        self.tokens.push(token);
        // A multiplication, not a division: a decode loop pushes one token at a time.
        if self.tokens.len() == (self.blocks.len() + 1) * self.block_size {
            self.hash_block_at(self.blocks.len());
            self.blocks.last().copied()
        } else {
            None
        }
    }

    /// Shortens the sequence to `len` tokens, dropping the blocks that are no longer complete.
    /// Does nothing if `len` is not shorter than the sequence.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.blocks.truncate(self.tokens.len() / self.block_size);
    }

    fn hash_block_at(&mut self, index: usize) {
        let parent = index.checked_sub(1).map(|p| self.blocks[p].sequence_hash);
        let range = index * self.block_size..(index + 1) * self.block_size;
        let extra = if self.extra_pos.is_empty() {
            &[][..]
        } else {
            self.block_extra_keys(index)
        };
        let sequence_hash = hash_block(parent, self.salt, &self.tokens[range], extra);
        self.blocks.push(TokenBlock {
            sequence_hash,
            parent,
            block_size: self.block_size,
            index,
        });
    }

    /// The complete blocks, in order.
    pub fn blocks(&self) -> &[TokenBlock] {
        &self.blocks
    }

    /// The sequence hashes of the complete blocks, in order: the argument of
    /// [`BlockManager::match_blocks`](crate::BlockManager::match_blocks).
    pub fn sequence_hashes(&self) -> impl ExactSizeIterator<Item = SequenceHash> + '_ {
        self.blocks.iter().map(TokenBlock::sequence_hash)
    }

    /// The tokens of complete block `index`.
    ///
    /// # Panics
    /// If `index >= self.blocks().len()`, like slice indexing.
    pub fn block_tokens(&self, index: usize) -> &[u32] {
        assert!(index < self.blocks.len(), "block {index} is not complete");
        &self.tokens[index * self.block_size..(index + 1) * self.block_size]
    }

    /// The tokens after the last complete block (fewer than `block_size`).
    pub fn partial_tokens(&self) -> &[u32] {
        &self.tokens[self.blocks.len() * self.block_size..]
    }

    /// Every token of the sequence.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The salt hash the first block chains from.
    pub fn salt_hash(&self) -> SaltHash {
        self.salt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Salt, hash_block};

    #[test]
    fn zero_block_size_is_an_error() {
        assert_eq!(
            TokenBlockSequence::new(0, &Salt::none()).unwrap_err(),
            SequenceError::ZeroBlockSize
        );
    }

    #[test]
    fn push_extend_and_from_tokens_agree() {
        let tokens: Vec<u32> = (0..37).map(|t| t * 7 + 1).collect();
        let whole = TokenBlockSequence::from_tokens(&tokens, 8, &Salt::none()).unwrap();
        let mut pushed = TokenBlockSequence::new(8, &Salt::none()).unwrap();
        let mut completed = Vec::new();
        for &t in &tokens {
            completed.extend(pushed.push(t));
        }
        assert_eq!(whole.blocks(), pushed.blocks());
        assert_eq!(completed, whole.blocks());
        assert_eq!(whole.blocks().len(), 4);
        assert_eq!(whole.partial_tokens(), &tokens[32..]);
    }

    #[test]
    fn blocks_follow_the_primitive() {
        let salt = Salt::none().with_lora_id(3);
        let tokens: Vec<u32> = (100..112).collect();
        let seq = TokenBlockSequence::from_tokens(&tokens, 4, &salt).unwrap();
        let mut parent = None;
        for (i, b) in seq.blocks().iter().enumerate() {
            let expect = hash_block(parent, salt.hash(), &tokens[i * 4..i * 4 + 4], &[]);
            assert_eq!(b.sequence_hash(), expect);
            assert_eq!(b.parent(), parent);
            assert_eq!(b.index(), i);
            assert_eq!(b.block_size(), 4);
            parent = Some(expect);
        }
    }

    #[test]
    fn truncate_rolls_back_and_rehashes_identically() {
        let tokens: Vec<u32> = (0..20).collect();
        let mut seq = TokenBlockSequence::from_tokens(&tokens, 4, &Salt::none()).unwrap();
        let before = seq.blocks().to_vec();
        seq.truncate(9);
        assert_eq!(seq.blocks(), &before[..2]);
        assert_eq!(seq.partial_tokens(), &[8]);
        seq.extend(&tokens[9..]);
        assert_eq!(seq.blocks(), &before[..]);
        seq.truncate(100);
        assert_eq!(seq.tokens().len(), 20);
    }

    #[test]
    #[should_panic(expected = "not complete")]
    fn block_tokens_of_an_incomplete_block_panics() {
        let seq = TokenBlockSequence::from_tokens(&[1, 2, 3], 4, &Salt::none()).unwrap();
        let _ = seq.block_tokens(0);
    }
}
