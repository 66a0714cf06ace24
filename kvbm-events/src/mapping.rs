//! kvbm's events → vLLM's events. The one place that knows both schemas.
//!
//! | kvbm | vLLM |
//! |---|---|
//! | `Stored { block_hashes, parent, block_size, token_ids, .. }` | `BlockStored { block_hashes, parent_block_hash, token_ids (empty when `None`), block_size, medium, .. }` |
//! | `Removed { block_hashes, reason }` (any reason) | `BlockRemoved { block_hashes, medium }` |
//! | `Cleared` | `AllBlocksCleared {}` when the publisher has one source; nothing otherwise |
//! | a snapshot's blocks ([`kvbm_logical::CacheSnapshot`]) | `BlockStored` events, parents first, no tokens |
//!
//! `medium` is the event's own (`KvEvent::medium`, kvbm's `BlockTier::MEDIUM`), named as
//! [`Medium::for_tier_name`] names kvbm's tiers.
//!
//! kvbm emits `Cleared` right after the `Removed` of the manager's last blocks, so a
//! subscriber that has the stream already holds none of that manager's blocks. vLLM's
//! `AllBlocksCleared` empties the router's view of the whole server, every medium: with
//! several sources (G1 and G2) it would make the router forget the other tiers' blocks, which
//! are still cached, so it is published only for a publisher of one source.

use kvbm_logical::{KvEvent, KvEventKind};

use crate::wire::{BlockHashes, BlockRemoved, BlockStored, Medium, WireEvent};

/// What a source knows that its events do not (yet) carry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SourceMeta {
    pub(crate) medium: Medium,
    pub(crate) block_size: u64,
    /// Whether `Cleared` becomes `AllBlocksCleared` (the publisher's only source).
    pub(crate) clears_all: bool,
}

/// The medium of an event of tier `tier` whose own medium is `medium`.
pub(crate) fn medium_of(tier: &str, medium: &'static str) -> &'static str {
    Medium::for_tier_name(tier).map_or(medium, Medium::as_str)
}

/// The vLLM event for one kvbm event; `None` for a kind not published (kvbm's event kinds
/// are `#[non_exhaustive]`, and see `Cleared` above).
pub(crate) fn wire_event<'a>(event: &'a KvEvent, meta: &SourceMeta) -> Option<WireEvent<'a>> {
    wire_kind(&event.kind, medium_of(event.tier, event.medium), meta)
}

/// [`wire_event`] for an event kind of a known medium (a snapshot's).
pub(crate) fn wire_kind<'a>(
    kind: &'a KvEventKind,
    medium: &'a str,
    meta: &SourceMeta,
) -> Option<WireEvent<'a>> {
    match kind {
        KvEventKind::Stored {
            block_hashes,
            parent,
            block_size,
            token_ids,
            ..
        } => Some(WireEvent::BlockStored(BlockStored {
            block_hashes: BlockHashes::Sequence(block_hashes),
            parent_block_hash: parent.map(|p| p.as_u64()),
            token_ids: token_ids.as_deref().unwrap_or(&[]),
            block_size: u64::try_from(*block_size).unwrap_or(u64::MAX),
            lora_id: None,
            medium: Some(medium),
            lora_name: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
        })),
        KvEventKind::Removed { block_hashes, .. } => Some(WireEvent::BlockRemoved(BlockRemoved {
            block_hashes: BlockHashes::Sequence(block_hashes),
            medium: Some(medium),
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
    fn stored_keeps_hashes_parent_size_and_tokens() {
        let tokens: Vec<u32> = (0..64).collect();
        let kind = KvEventKind::Stored {
            block_hashes: vec![SequenceHash::new(5), SequenceHash::new(6)],
            parent: Some(SequenceHash::new(4)),
            tier: "host",
            block_size: 32,
            token_ids: Some(tokens.clone()),
        };
        let Some(WireEvent::BlockStored(e)) = wire_kind(&kind, "CPU", &META) else {
            panic!("not a BlockStored");
        };
        assert_eq!(e.block_hashes.len(), 2);
        assert_eq!(e.parent_block_hash, Some(4));
        assert_eq!(e.block_size, 32);
        assert_eq!(e.medium, Some("CPU"));
        assert_eq!(e.token_ids, &tokens[..]);
        let untokenized = KvEventKind::Stored {
            block_hashes: vec![SequenceHash::new(5)],
            parent: None,
            tier: "host",
            block_size: 32,
            token_ids: None,
        };
        let Some(WireEvent::BlockStored(e)) = wire_kind(&untokenized, "CPU", &META) else {
            panic!("not a BlockStored");
        };
        assert!(e.token_ids.is_empty());
    }

    #[test]
    fn kvbm_tier_names_map_to_the_documented_media() {
        assert_eq!(medium_of("device", "GPU"), "GPU");
        assert_eq!(medium_of("host", "CPU"), "CPU");
        assert_eq!(medium_of("disk", "DISK"), "DISK");
        assert_eq!(medium_of("remote", "remote"), "REMOTE");
        assert_eq!(medium_of("nvme-pool", "NVME"), "NVME");
    }

    #[test]
    fn every_removal_reason_is_a_block_removed() {
        for reason in [
            RemovalReason::Evicted,
            RemovalReason::Reset,
            RemovalReason::Demoted,
            RemovalReason::Invalidated,
            RemovalReason::Released,
        ] {
            let kind = KvEventKind::Removed {
                block_hashes: vec![SequenceHash::new(9)],
                reason,
            };
            let Some(WireEvent::BlockRemoved(e)) = wire_kind(&kind, "CPU", &META) else {
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
            wire_kind(&KvEventKind::Cleared, "CPU", &META),
            Some(WireEvent::AllBlocksCleared)
        );
    }

    #[test]
    fn cleared_of_one_of_several_sources_is_not_published() {
        let meta = SourceMeta {
            clears_all: false,
            ..META
        };
        assert_eq!(wire_kind(&KvEventKind::Cleared, "CPU", &meta), None);
    }
}
