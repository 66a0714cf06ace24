//! kvbm's events → vLLM's events. The one place that knows both schemas.
//!
//! | kvbm | vLLM |
//! |---|---|
//! | `Stored { block_hashes, parent, .. }` | `BlockStored { block_hashes, parent_block_hash, token_ids, block_size, medium, .. }` |
//! | `Removed { block_hashes, reason }` (any reason) | `BlockRemoved { block_hashes, medium }` |
//! | `Cleared` | `AllBlocksCleared {}` when the publisher has one source; nothing otherwise |
//!
//! kvbm emits `Cleared` right after the `Removed` of the manager's last blocks, so a
//! subscriber that has the stream already holds none of that manager's blocks. vLLM's
//! `AllBlocksCleared` empties the router's view of the whole server, every medium: with
//! several sources (G1 and G2) it would make the router forget the other tiers' blocks, which
//! are still cached, so it is published only for a publisher of one source.
//!
//! Today's kvbm events carry neither tokens nor block size, and `Removed` carries no tier, so
//! those come from the [`Source`](crate::Source) (`token_ids` is empty). When the events carry
//! their own (issue 14: every event its tier, `Stored` its block size and token ids), only
//! [`wire_event`] changes.

use kvbm_logical::KvEventKind;

use crate::wire::{BlockHashes, BlockRemoved, BlockStored, Medium, WireEvent};

/// What a source knows that its events do not (yet) carry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SourceMeta {
    pub(crate) medium: Medium,
    pub(crate) block_size: u64,
    /// Whether `Cleared` becomes `AllBlocksCleared` (the publisher's only source).
    pub(crate) clears_all: bool,
}

/// The vLLM event for one kvbm event; `None` for a kind this version does not publish (kvbm's
/// event kinds are `#[non_exhaustive]`).
pub(crate) fn wire_event<'a>(kind: &'a KvEventKind, meta: &SourceMeta) -> Option<WireEvent<'a>> {
    match kind {
        KvEventKind::Stored {
            block_hashes,
            parent,
            ..
        } => Some(WireEvent::BlockStored(BlockStored {
            block_hashes: BlockHashes::Sequence(block_hashes),
            parent_block_hash: parent.map(|p| p.as_u64()),
            // Issue 14: the event's own token ids (when staged from tokens) and block size.
            token_ids: &[],
            block_size: meta.block_size,
            lora_id: None,
            // Issue 14: the event's own tier, through `Medium::for_tier_name`.
            medium: Some(meta.medium.as_str()),
            lora_name: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        })),
        KvEventKind::Removed { block_hashes, .. } => Some(WireEvent::BlockRemoved(BlockRemoved {
            block_hashes: BlockHashes::Sequence(block_hashes),
            medium: Some(meta.medium.as_str()),
            group_idx: None,
        })),
        KvEventKind::Cleared => meta.clears_all.then_some(WireEvent::AllBlocksCleared),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use kvbm_logical::{RemovalReason, SequenceHash};

    use super::*;

    const META: SourceMeta = SourceMeta {
        medium: Medium::CPU,
        block_size: 32,
        clears_all: true,
    };

    #[test]
    fn stored_keeps_hashes_parent_and_takes_size_and_medium_from_the_source() {
        let kind = KvEventKind::Stored {
            block_hashes: vec![SequenceHash::new(5), SequenceHash::new(6)],
            parent: Some(SequenceHash::new(4)),
            tier: "host",
        };
        let Some(WireEvent::BlockStored(e)) = wire_event(&kind, &META) else {
            panic!("not a BlockStored");
        };
        assert_eq!(e.block_hashes.len(), 2);
        assert_eq!(e.parent_block_hash, Some(4));
        assert_eq!(e.block_size, 32);
        assert_eq!(e.medium, Some("CPU"));
        assert!(e.token_ids.is_empty());
    }

    #[test]
    fn every_removal_reason_is_a_block_removed() {
        for reason in [
            RemovalReason::Evicted,
            RemovalReason::Reset,
            RemovalReason::Demoted,
            RemovalReason::Invalidated,
        ] {
            let kind = KvEventKind::Removed {
                block_hashes: vec![SequenceHash::new(9)],
                reason,
            };
            let Some(WireEvent::BlockRemoved(e)) = wire_event(&kind, &META) else {
                panic!("{reason:?} is not a BlockRemoved");
            };
            assert_eq!(
                e.block_hashes,
                BlockHashes::Sequence(&[SequenceHash::new(9)])
            );
            assert_eq!(e.medium, Some("CPU"));
        }
    }

    #[test]
    fn cleared_is_all_blocks_cleared() {
        assert_eq!(
            wire_event(&KvEventKind::Cleared, &META),
            Some(WireEvent::AllBlocksCleared)
        );
    }

    #[test]
    fn cleared_of_one_of_several_sources_is_not_published() {
        let meta = SourceMeta {
            clears_all: false,
            ..META
        };
        assert_eq!(wire_event(&KvEventKind::Cleared, &meta), None);
    }
}
