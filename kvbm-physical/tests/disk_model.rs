//! A model-based property test of the disk tier: random puts, gets, removes, injected write
//! and read faults, resumes and restarts (verifying or header-only recovery), checked after
//! every step against a model that knows exactly which blocks the tier holds, in which LRU
//! order, which of them were damaged on their way to disk, and whether it is degraded.
//! Every block served is checked byte for byte with its parent.

mod disk_util;

use std::collections::HashMap;
use std::sync::Arc;

use disk_util::*;
use kvbm_physical::disk::{DiskFaults, DiskGeometry, DiskTier, IoFault, RecoveryMode};
use kvbm_physical::{GetOutcome, PutOutcome, SkipReason, StoreError, StoreTier};
use parking_lot::Mutex;
use proptest::prelude::*;

/// Where an injected bit flip lands.
#[derive(Clone, Copy, Debug)]
enum Flip {
    Image(usize),
    Header(usize),
}

#[derive(Clone, Copy, Debug)]
enum WriteFault {
    Flip(Flip),
    Fail(IoFault),
}

#[derive(Clone, Debug)]
enum Op {
    Put(Vec<u64>),
    PutFaulty(u64, WriteFault),
    Get(Vec<u64>),
    GetFaulty(u64, IoFault),
    Remove(Vec<u64>),
    Resume,
    Reopen(RecoveryMode),
}

/// Arms a fault for the next slot write or read only.
#[derive(Debug, Default)]
struct Switch {
    write: Mutex<Option<WriteFault>>,
    read: Mutex<Option<IoFault>>,
}

impl DiskFaults for Switch {
    fn before_write(&self, _slot: u32, image: &mut [u8]) -> Option<IoFault> {
        match self.write.lock().take()? {
            WriteFault::Fail(f) => Some(f),
            WriteFault::Flip(flip) => {
                let header = DiskGeometry::new(BB, 1).unwrap().slot_bytes() - 4096;
                let bit = match flip {
                    Flip::Image(b) => b,
                    Flip::Header(b) => header * 8 + b,
                };
                image[bit / 8] ^= 1 << (bit % 8);
                None
            }
        }
    }

    fn before_read(&self, _slot: u32) -> Option<IoFault> {
        self.read.lock().take()
    }
}

/// What the model knows about a resident block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    None,
    Image,
    Header,
}

#[derive(Debug)]
struct Model {
    slots: usize,
    /// Resident blocks, least recently used first.
    lru: Vec<u64>,
    /// Per resident block: the write order, and whether it was damaged on its way to disk.
    written: HashMap<u64, (u64, Damage)>,
    seq: u64,
    degraded: bool,
}

impl Model {
    fn touch(&mut self, n: u64) {
        self.lru.retain(|&x| x != n);
        self.lru.push(n);
    }

    fn drop_block(&mut self, n: u64) {
        self.lru.retain(|&x| x != n);
        self.written.remove(&n);
    }

    /// A batch put: outcomes, and the model updated.
    fn put(&mut self, hashes: &[u64], damage: Damage, fails: bool) -> Vec<PutOutcome> {
        let mut firsts: Vec<u64> = Vec::new();
        for &n in hashes {
            if !firsts.contains(&n) {
                firsts.push(n);
            }
        }
        let mut out: HashMap<u64, PutOutcome> = HashMap::new();
        if self.degraded {
            for &n in &firsts {
                out.insert(n, PutOutcome::Skipped(SkipReason::Degraded));
            }
        } else {
            let mut fresh = Vec::new();
            for &n in &firsts {
                if self.written.contains_key(&n) {
                    out.insert(n, PutOutcome::Present);
                } else {
                    fresh.push(n);
                }
            }
            let granted = fresh.len().min(self.slots);
            let free = self.slots - self.lru.len();
            for _ in 0..granted.saturating_sub(free) {
                let victim = self.lru.remove(0);
                self.written.remove(&victim);
            }
            for (k, &n) in fresh.iter().enumerate() {
                if k >= granted {
                    out.insert(n, PutOutcome::Skipped(SkipReason::NoRoom));
                } else if fails {
                    // Outcome checked by the caller (the error's text varies).
                    self.degraded = true;
                } else {
                    self.seq += 1;
                    self.written.insert(n, (self.seq, damage));
                    self.lru.push(n);
                    out.insert(n, PutOutcome::Stored);
                }
            }
        }
        hashes
            .iter()
            .map(|n| {
                out.get(n)
                    .cloned()
                    .unwrap_or(PutOutcome::Failed(StoreError::NoSpace))
            })
            .collect()
    }

    /// The blocks a restart brings back, oldest first.
    fn reopen(&mut self, mode: RecoveryMode) -> Vec<u64> {
        self.written.retain(|_, (_, d)| match mode {
            RecoveryMode::Headers => *d != Damage::Header,
            _ => *d == Damage::None,
        });
        let mut order: Vec<(u64, u64)> = self.written.iter().map(|(&n, &(s, _))| (s, n)).collect();
        order.sort_unstable();
        self.lru = order.into_iter().map(|(_, n)| n).collect();
        self.degraded = false;
        self.lru.clone()
    }
}

fn hashes() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0u64..14, 1..5)
}

fn op() -> impl Strategy<Value = Op> {
    let write_fault = prop_oneof![
        (0..BB * 8).prop_map(|b| WriteFault::Flip(Flip::Image(b))),
        (0..80 * 8usize).prop_map(|b| WriteFault::Flip(Flip::Header(b))),
        Just(WriteFault::Fail(IoFault::NoSpace)),
        Just(WriteFault::Fail(IoFault::Io)),
        (0..3usize).prop_map(|p| WriteFault::Fail(IoFault::Short { bytes: p * 4096 })),
    ];
    let read_fault = prop_oneof![
        Just(IoFault::Io),
        (0..3usize).prop_map(|p| IoFault::Short { bytes: p * 4096 }),
    ];
    prop_oneof![
        6 => hashes().prop_map(Op::Put),
        6 => hashes().prop_map(Op::Get),
        2 => (0u64..14, write_fault).prop_map(|(n, f)| Op::PutFaulty(n, f)),
        1 => (0u64..14, read_fault).prop_map(|(n, f)| Op::GetFaulty(n, f)),
        1 => hashes().prop_map(Op::Remove),
        1 => Just(Op::Resume),
        1 => prop_oneof![Just(RecoveryMode::Verify), Just(RecoveryMode::Headers)].prop_map(Op::Reopen),
    ]
}

fn check_state(tier: &DiskTier, model: &Model) -> Result<(), TestCaseError> {
    let all: Vec<_> = (0..14).map(h).collect();
    let want: Vec<bool> = (0..14).map(|n| model.written.contains_key(&n)).collect();
    prop_assert_eq!(tier.contains(&all), want);
    prop_assert_eq!(tier.degraded().is_some(), model.degraded);
    let counts = tier
        .check_invariants()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(counts.registered_hashes, model.lru.len());
    prop_assert_eq!(counts.total, model.slots);
    prop_assert_eq!(
        counts.reset + counts.inactive,
        model.slots,
        "nothing held between calls"
    );
    Ok(())
}

fn run(slots: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let switch = Arc::new(Switch::default());
    let reopen = |mode| {
        builder(dir.path(), slots)
            .faults(switch.clone())
            .recovery(mode)
            .open()
            .unwrap()
    };
    let mut tier = reopen(RecoveryMode::Verify);
    let mut model = Model {
        slots: slots as usize,
        lru: Vec::new(),
        written: HashMap::new(),
        seq: 0,
        degraded: false,
    };
    for op in ops {
        match op {
            Op::Put(hs) => {
                let want = model.put(&hs, Damage::None, false);
                prop_assert_eq!(put(&tier, &hs), want);
            }
            Op::PutFaulty(n, fault) => {
                *switch.write.lock() = Some(fault);
                let (damage, fails) = match fault {
                    WriteFault::Flip(Flip::Image(_)) => (Damage::Image, false),
                    WriteFault::Flip(Flip::Header(_)) => (Damage::Header, false),
                    WriteFault::Fail(_) => (Damage::None, true),
                };
                let will_write = !model.degraded && !model.written.contains_key(&n);
                let want = model.put(&[n], damage, fails);
                let got = put(&tier, &[n]);
                if will_write && fails {
                    let ok = match fault {
                        WriteFault::Fail(IoFault::NoSpace) => {
                            got[0] == PutOutcome::Failed(StoreError::NoSpace)
                        }
                        _ => matches!(&got[0], PutOutcome::Failed(StoreError::Io(_))),
                    };
                    prop_assert!(ok, "{:?} gave {:?}", fault, got);
                } else {
                    prop_assert_eq!(got, want);
                }
                *switch.write.lock() = None;
            }
            Op::Get(hs) => {
                // One batch; presence as it was when the call began.
                let want: Vec<GetOutcome> = hs
                    .iter()
                    .map(|n| match model.written.get(n) {
                        None => GetOutcome::Miss,
                        Some((_, Damage::None)) => GetOutcome::Hit {
                            parent: parent_of(h(*n)),
                        },
                        Some(_) => GetOutcome::Corrupt,
                    })
                    .collect();
                let mut bufs = vec![vec![0u8; BB]; hs.len()];
                let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                let got = tier.get(&hs.iter().map(|&n| h(n)).collect::<Vec<_>>(), &mut outs);
                prop_assert_eq!(&got, &want, "get {:?}", hs);
                for ((&n, o), buf) in hs.iter().zip(&got).zip(&bufs) {
                    match o {
                        GetOutcome::Hit { .. } => {
                            prop_assert!(*buf == image(h(n), BB), "bytes of {} served wrong", n);
                            model.touch(n);
                        }
                        GetOutcome::Corrupt => model.drop_block(n),
                        _ => {}
                    }
                }
            }
            Op::GetFaulty(n, fault) => {
                *switch.read.lock() = Some(fault);
                let got = get(&tier, n);
                if model.written.contains_key(&n) {
                    prop_assert!(
                        matches!(&got, GetOutcome::Failed(StoreError::Io(_))),
                        "{:?}",
                        got
                    );
                    model.drop_block(n);
                    model.degraded = true;
                } else {
                    prop_assert_eq!(got, GetOutcome::Miss);
                }
                *switch.read.lock() = None;
            }
            Op::Remove(hs) => {
                tier.remove(&hs.iter().map(|&n| h(n)).collect::<Vec<_>>());
                for n in hs {
                    model.drop_block(n);
                }
            }
            Op::Resume => {
                tier.resume();
                model.degraded = false;
            }
            Op::Reopen(mode) => {
                drop(tier);
                tier = reopen(mode);
                let want = model.reopen(mode);
                let got: Vec<u64> = tier
                    .recovery()
                    .blocks
                    .iter()
                    .map(|b| b.hash.as_u64())
                    .collect();
                prop_assert_eq!(got, want, "recovered, oldest first ({:?})", mode);
                for b in &tier.recovery().blocks {
                    prop_assert_eq!(b.parent, parent_of(b.hash));
                }
            }
        }
        check_state(&tier, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_disk_tier_matches_its_model(slots in 2u32..6, ops in prop::collection::vec(op(), 1..40)) {
        run(slots, ops)?;
    }
}
