//! The hot paths make a constant number of heap allocations, whatever the number of blocks.
//!
//! A counting global allocator counts allocations made by the current thread (a
//! thread-local counter, so that the test harness's other threads do not disturb it).
//! `match_blocks`, `scan_matches`, `allocate_blocks` (from the reset pool and by eviction),
//! `register_blocks` and the batch releases are each run for 16 and for 1024 blocks, and must
//! allocate exactly as often for both. `hash_block` allocates nothing, whatever the block size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kvbm_logical::{
    BlockManager, Device, FrequencyTracking, ImmutableBlock, MutableBlock, SaltHash, SequenceHash,
    hash_block,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the counter may already be gone while a thread's destructors run.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations `f` makes on this thread, and its result.
fn count<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let before = ALLOCATIONS.with(Cell::get);
    let r = f();
    (ALLOCATIONS.with(Cell::get) - before, r)
}

const BLOCK_SIZE: usize = 16;

/// Allocation counts of each operation for `n` blocks, on a manager of `2n` blocks.
fn profile(n: usize) -> Vec<(&'static str, usize)> {
    let m = BlockManager::<Device>::builder()
        .block_count(2 * n)
        .block_size(BLOCK_SIZE)
        .frequency_tracking(FrequencyTracking::Small)
        .build()
        .unwrap();
    let hashes: Vec<SequenceHash> = (0..n as u64).map(SequenceHash::new).collect();
    let mut out = Vec::new();

    let (a, blocks) = count(|| m.allocate_blocks(n).unwrap());
    out.push(("allocate_blocks (reset pool)", a));
    let staged: Vec<_> = blocks
        .into_iter()
        .zip(&hashes)
        .map(|(b, &h)| b.stage(h, BLOCK_SIZE).unwrap())
        .collect();
    let (a, registered) = count(|| m.register_blocks(staged).unwrap());
    out.push(("register_blocks", a));
    let (a, ()) = count(|| ImmutableBlock::release_all(registered));
    out.push(("ImmutableBlock::release_all", a));

    let (a, hits) = count(|| m.match_blocks(&hashes));
    assert_eq!(hits.len(), n);
    out.push(("match_blocks (inactive)", a));
    let (a, again) = count(|| m.match_blocks(&hashes));
    assert_eq!(again.len(), n);
    out.push(("match_blocks (active)", a));
    let (a, scanned) = count(|| m.scan_matches(&hashes, true));
    assert_eq!(scanned.len(), n);
    out.push(("scan_matches", a));
    for batch in [hits, again, scanned] {
        ImmutableBlock::release_all(batch);
    }

    // A side-effect-free scan of inactive blocks (they stay in the eviction order), clones
    // (lock-free), and plain drops of shared owners (lock-free) and of last owners.
    let (a, quiet) = count(|| m.scan_matches(&hashes, false));
    assert_eq!(quiet.len(), n);
    out.push(("scan_matches (no touch)", a));
    let (a, clones) = count(|| quiet.to_vec());
    out.push(("clone every handle", a));
    let (a, ()) = count(|| drop(clones));
    out.push(("drop (shared owners)", a));
    let (a, ()) = count(|| drop(quiet));
    out.push(("drop (last owners)", a));
    assert_eq!(m.counts().inactive, n);

    // The reset pool holds n blocks and the inactive pool n: 2n forces n evictions.
    let (a, blocks) = count(|| m.allocate_blocks(2 * n).unwrap());
    assert_eq!(
        m.counts().inactive,
        0,
        "the call evicted every inactive block"
    );
    out.push(("allocate_blocks (evicting)", a));
    let (a, ()) = count(|| MutableBlock::release_all(blocks));
    out.push(("MutableBlock::release_all", a));

    // Again with a subscriber: registering publishes `Stored` events and the eviction a
    // `Removed` one. The store's event buffers grow on first use and are reused after that
    // (the subscriber swaps two sets of buffers with the store), so the third round counts.
    let events = m.subscribe(16);
    for round in 0..3 {
        let blocks = m.allocate_blocks(n).unwrap();
        let staged: Vec<_> = blocks
            .into_iter()
            .zip(&hashes)
            .map(|(b, &h)| b.stage(h, BLOCK_SIZE).unwrap())
            .collect();
        let (a, registered) = count(|| m.register_blocks(staged).unwrap());
        ImmutableBlock::release_all(registered);
        assert_eq!(events.drain().count(), 1, "one Stored batch");
        let (b, blocks) = count(|| m.allocate_blocks(2 * n).unwrap());
        assert_eq!(events.drain().count(), 1, "one Removed batch");
        MutableBlock::release_all(blocks);
        if round == 2 {
            out.push(("register_blocks (with a subscriber)", a));
            out.push(("allocate_blocks (evicting, with a subscriber)", b));
        }
    }
    out
}

#[test]
fn hot_paths_allocate_a_constant_number_of_times() {
    // Warm up lazily initialised state (thread-locals, tracing's callsite registry).
    let _ = profile(4);
    let small = profile(16);
    let large = profile(1024);
    assert_eq!(small, large, "allocation counts for 16 vs 1024 blocks");
    // And the constants are small: the returned Vec and nothing else, with or without a
    // subscriber (events are recorded into reused buffers; the subscriber builds them).
    for (op, a) in &large {
        let bound = if op.starts_with("drop") { 0 } else { 1 };
        assert!(*a <= bound, "{op}: {a} allocations");
    }
}

#[test]
fn hash_block_does_not_allocate() {
    let salt = SaltHash::default();
    let _ = hash_block(None, salt, &[1; 16], &[]); // warm-up
    for n in [0usize, 1, 16, 28, 29, 64, 124, 125, 1024, 65_536] {
        let tokens: Vec<u32> = (0..n as u32).collect();
        for extras in [&[][..], &[7, 8, 9][..]] {
            let parent = Some(SequenceHash::new(n as u64));
            let (a, hash) = count(|| hash_block(parent, salt, &tokens, extras));
            assert_eq!(a, 0, "{n} tokens, {} extra keys", extras.len());
            assert_ne!(hash, hash_block(None, salt, &tokens, extras));
        }
    }
}

#[test]
fn a_request_makes_no_allocation_per_token() {
    use kvbm_logical::RequestSequence;
    // Decode: push a token, allocate when a block is needed, commit it; every 16th token
    // fills a block, which is registered. Once reserved, none of it allocates (no subscriber).
    let m = BlockManager::<Device>::builder()
        .block_count(512)
        .block_size(16)
        .frequency_tracking(FrequencyTracking::Small)
        .build()
        .unwrap();
    let prompt: Vec<u32> = (0..100).collect();
    let mut req = RequestSequence::builder(&m)
        .prompt(&prompt)
        .reserve_tokens(4096)
        .build();
    req.match_prefix().unwrap();
    req.allocate(100).unwrap();
    req.commit(100).unwrap();
    let (allocations, ()) = count(|| {
        for t in 0..4096u32 {
            req.push(t);
            req.allocate(1).unwrap();
            let done = req.commit(1).unwrap();
            assert!(done.changed.is_empty());
        }
    });
    assert_eq!(allocations, 0);
    assert_eq!(req.num_computed_tokens(), 4196);
    // Appending and committing tokens in chunks (chunked prefill, speculative tokens).
    let (allocations, ()) = count(|| {
        req.truncate(4196 - 40);
        for chunk in [[1u32; 8], [2; 8], [3; 8]] {
            req.extend(&chunk);
            req.allocate(8).unwrap();
            req.commit(8).unwrap();
        }
    });
    assert_eq!(allocations, 0);
}
