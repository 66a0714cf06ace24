//! The tier stack under random operations and faults: a model-based property test
//! (lookup, onboard, poll, cancel, offload, evictions, corruption in G2 and G3, injected
//! copy failures and bad checksums) and an 8-thread stress test. Every served block is read
//! back and compared byte for byte; every slot is accounted for after every step; nothing
//! is held once the test has let go.

mod common;

use std::sync::Arc;

use common::{
    MemStore, RandomFaults, StackOpts, assert_stack_conserved, assert_stack_idle, chain, stack_kv,
    stack_write_register,
};
use kvbm_logical::{BlockManager, Device, Host, ImmutableBlock, SequenceHash};
use kvbm_physical::stack::{OnboardError, Probe, StoreTierConfig, TierStack};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum How {
    Wait,
    Poll,
    Cancel,
}

#[derive(Clone, Debug)]
enum Op {
    /// A request for the first `len` blocks of chain `chain`, committing at most `limit`.
    Request {
        chain: u64,
        len: usize,
        limit: usize,
        how: How,
    },
    /// The oldest held request finishes.
    Release,
    /// Everything inactive leaves G1 (direct eviction through the stack).
    EvictG1,
    /// Everything inactive leaves G2 (behind the stack's back).
    EvictG2,
    /// A G2 block's bytes flip behind the stack's back.
    CorruptG2 { chain: u64, i: usize },
    /// A G3 value's bytes flip behind the stack's back.
    CorruptG3 { chain: u64, i: usize },
    /// Wait for the workers.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let how = prop_oneof![Just(How::Wait), Just(How::Poll), Just(How::Cancel)];
    prop_oneof![
        6 => (0..6u64, 1..7usize, 0..8usize, how).prop_map(|(chain, len, limit, how)| Op::Request {
            chain,
            len,
            limit,
            how
        }),
        3 => Just(Op::Release),
        1 => Just(Op::EvictG1),
        1 => Just(Op::EvictG2),
        1 => (0..6u64, 0..7usize).prop_map(|(chain, i)| Op::CorruptG2 { chain, i }),
        1 => (0..6u64, 0..7usize).prop_map(|(chain, i)| Op::CorruptG3 { chain, i }),
        1 => Just(Op::Flush),
    ]
}

struct World {
    t: TierStack,
    m2: BlockManager<Host>,
    store: Arc<MemStore>,
    held: Vec<Vec<ImmutableBlock<Device>>>,
    /// The model: every hash computed (written and registered) so far. A block is only ever
    /// served for one of these.
    computed: std::collections::HashSet<SequenceHash>,
}

/// Reads every block of `blocks` and checks it is `hashes`' prefix with the right bytes.
fn check_served(t: &TierStack, hashes: &[SequenceHash], blocks: &[ImmutableBlock<Device>]) {
    assert!(blocks.len() <= hashes.len());
    for (b, h) in blocks.iter().zip(hashes) {
        assert_eq!(b.sequence_hash(), *h, "served out of order");
        assert_eq!(
            common::read(t.g1().layout(), b.block_id().index()),
            stack_kv(t, *h),
            "wrong bytes served for {h:?}"
        );
    }
}

/// One request as a scheduler runs it: plan, commit (with back-pressure), complete, compute
/// the rest if G1 has room (`patient`: waiting for the offload queue once if it has not).
/// Returns the blocks it holds and how many of them were served from the cache (the rest it
/// computed).
fn request(
    t: &TierStack,
    hashes: &[SequenceHash],
    limit: usize,
    how: &How,
    patient: bool,
) -> (Vec<ImmutableBlock<Device>>, usize) {
    let plan = t.lookup(hashes);
    assert!(plan.len() <= hashes.len());
    assert_eq!(plan.hashes(), &hashes[..plan.len()]);
    let mut blocks = match t.onboard(plan, limit) {
        Ok(pending) => match how {
            How::Wait => pending.wait().blocks,
            How::Poll => {
                let mut p = pending;
                loop {
                    match p.try_complete() {
                        Ok(done) => break done.blocks,
                        Err(back) => {
                            p = back;
                            std::thread::yield_now();
                        }
                    }
                }
            }
            How::Cancel => {
                drop(pending);
                Vec::new()
            }
        },
        Err(OnboardError::NoRoom { .. }) => Vec::new(),
        Err(e) => panic!("{e}"),
    };
    check_served(t, hashes, &blocks);
    let have = blocks.len();
    let mut fresh = t.allocate(hashes.len() - have);
    if fresh.is_err() && patient {
        // Back-pressure: queued offloads hold their G1 blocks until their copies land.
        t.flush();
        fresh = t.allocate(hashes.len() - have);
    }
    if have < hashes.len()
        && let Ok(fresh) = fresh
    {
        let reg = stack_write_register(t, fresh, hashes, have);
        check_served(t, &hashes[have..], &reg);
        blocks.extend(reg);
    }
    (blocks, have)
}

impl World {
    fn new(write_back: bool, seed: u64) -> Self {
        let bytes = StackOpts::new(1, 1).block_bytes();
        let store = Arc::new(MemStore::new(bytes, 24));
        let mut opts = StackOpts {
            faults: Some(Arc::new(RandomFaults::new(seed, 60, 40))),
            stores: vec![
                StoreTierConfig::new(store.clone()).probe(if seed.is_multiple_of(2) {
                    Probe::OnLookup
                } else {
                    Probe::Deferred
                }),
            ],
            ..StackOpts::new(12, 10)
        };
        if write_back {
            opts = opts.eager_write_back();
        } else if seed % 3 == 1 {
            // Write-through with a free reserve: a worker evicts ahead of allocations.
            opts.reserve = Some(kvbm_physical::stack::Watermarks::new(2, 4));
        }
        let (t, _, m2) = opts.build();
        Self {
            t,
            m2,
            store,
            held: Vec::new(),
            computed: std::collections::HashSet::new(),
        }
    }

    fn apply(&mut self, op: &Op) {
        let t = &self.t;
        match op {
            Op::Request {
                chain: c,
                len,
                limit,
                how,
            } => {
                let hashes = chain(*c, *len);
                let plan = t.lookup(&hashes);
                if plan.unverified() == 0 {
                    assert!(
                        plan.hashes().iter().all(|h| self.computed.contains(h)),
                        "planned a block never computed"
                    );
                }
                drop(plan);
                let (blocks, served) = request(t, &hashes, *limit, how, false);
                assert!(
                    blocks[..served]
                        .iter()
                        .all(|b| self.computed.contains(&b.sequence_hash())),
                    "served a block never computed"
                );
                self.computed
                    .extend(blocks.iter().map(|b| b.sequence_hash()));
                self.held.push(blocks);
                if self.held.len() > 3 {
                    ImmutableBlock::release_all(self.held.remove(0));
                }
            }
            Op::Release => {
                if !self.held.is_empty() {
                    ImmutableBlock::release_all(self.held.remove(0));
                }
            }
            Op::EvictG1 => {
                if let Ok(b) = t.allocate(t.g1().available_blocks()) {
                    drop(b);
                }
            }
            Op::EvictG2 => {
                if let Ok(b) = self.m2.allocate_blocks(self.m2.available_blocks()) {
                    drop(b);
                }
            }
            Op::CorruptG2 { chain: c, i } => {
                let h = chain(*c, i + 1)[*i];
                // Only an inactive block: a held one may be mid-copy.
                if self.m2.counts().active == 0 {
                    for b in self.m2.scan_matches(&[h], false) {
                        let r = t.g2().layout().region(b.block_id(), 0, 0).unwrap();
                        // SAFETY: a live system slab; this test holds the block and no job
                        // reads G2 while no G2 block is held by the stack (active == 0).
                        unsafe { *(r.addr as *mut u8) ^= 0x40 };
                    }
                }
            }
            Op::CorruptG3 { chain: c, i } => self.store.corrupt(chain(*c, i + 1)[*i]),
            Op::Flush => {
                t.flush();
                let c1 = t.g1().counts();
                let held: std::collections::HashSet<_> =
                    self.held.iter().flatten().map(|b| b.block_id()).collect();
                assert_eq!(c1.mutable, 0, "{c1:?}");
                assert_eq!(c1.active, held.len(), "{c1:?}");
                let c2 = t.g2().counts();
                assert_eq!((c2.mutable, c2.active), (0, 0), "{c2:?}");
            }
        }
        assert_stack_conserved(t);
    }

    fn finish(mut self) {
        for h in self.held.drain(..) {
            ImmutableBlock::release_all(h);
        }
        assert_stack_idle(&self.t);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_wrong_byte_no_lost_slot_under_random_operations_and_faults(
        write_back in any::<bool>(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut w = World::new(write_back, seed);
        for op in &ops {
            w.apply(op);
        }
        w.finish();
    }
}

#[test]
fn eight_threads_always_see_their_own_bytes() {
    for (write_back, reserve) in [(false, false), (false, true), (true, false)] {
        let bytes = StackOpts::new(1, 1).block_bytes();
        let store = Arc::new(MemStore::new(bytes, 512));
        let mut opts = StackOpts {
            stores: vec![StoreTierConfig::new(store.clone())],
            faults: Some(Arc::new(RandomFaults::new(7, 10, 10))),
            workers: 3,
            ..StackOpts::new(160, 192)
        };
        if write_back {
            opts.mode = kvbm_physical::stack::WriteMode::WriteBack(
                kvbm_physical::stack::Watermarks::new(8, 16),
            );
        }
        if reserve {
            opts.reserve = Some(kvbm_physical::stack::Watermarks::new(8, 16));
        }
        let (t, _, _) = opts.build();
        let t = Arc::new(t);
        std::thread::scope(|s| {
            for thread in 0..8u64 {
                let t = Arc::clone(&t);
                s.spawn(move || {
                    let mut x = thread * 7919 + 3;
                    let mut held: Vec<Vec<ImmutableBlock<Device>>> = Vec::new();
                    for _ in 0..300 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let hashes = chain(x % 96, 1 + (x >> 8) as usize % 8);
                        let how = match (x >> 20) % 5 {
                            0 => How::Cancel,
                            1 => How::Poll,
                            _ => How::Wait,
                        };
                        held.push(request(&t, &hashes, usize::MAX, &how, true).0);
                        // At most two requests held per thread: 8 × 2 × 8 blocks fit in G1.
                        if held.len() > 1 {
                            ImmutableBlock::release_all(held.remove(0));
                        }
                    }
                });
            }
        });
        let t = Arc::into_inner(t).unwrap();
        assert_stack_idle(&t);
        let st = t.stats();
        let g2 = st.tier(kvbm_physical::stack::TierId::G2).unwrap();
        let g3 = st.tier(kvbm_physical::stack::TierId::Store(0)).unwrap();
        assert!(
            g2.offloaded > 0 && g2.onboarded > 0 && g3.onboarded > 0 && g2.lost > 0,
            "write_back {write_back}: {st:?}"
        );
    }
}
