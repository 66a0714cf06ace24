//! The disk tier's in-place path: blocks of whole pages read into and written from
//! page-aligned caller buffers (G2's memory) with no bounce copy, on both back ends, checked
//! byte for byte against the bounce path; and the integrity rules on that path (a byte
//! flipped in the file, a short read).

mod disk_util;

use std::os::unix::fs::FileExt;

use disk_util::{FP, h, image, parent_of};
use kvbm_physical::disk::{
    Capacity, Degraded, DiskFaultPlan, DiskTier, IoBackend, IoFault, PAGE, SlotIoError,
};
use kvbm_physical::{GetOutcome, PutOutcome, StoreBlock, StoreError, StoreTier};

/// Two pages: the image fills its pages, so the slot is the image then the header page.
const BB: usize = 2 * PAGE;

/// `n` blocks of `BB` bytes in one allocation, starting at a page boundary, or one byte past
/// it when `!aligned`.
struct Blocks {
    mem: Vec<u8>,
    start: usize,
    n: usize,
}

impl Blocks {
    fn new(n: usize, aligned: bool) -> Self {
        let mem = vec![0u8; n * BB + 2 * PAGE];
        let start = mem.as_ptr().align_offset(PAGE) + usize::from(!aligned);
        Self { mem, start, n }
    }

    fn all(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.n * BB]
    }

    fn views(&mut self) -> Vec<&mut [u8]> {
        self.all().chunks_mut(BB).collect()
    }
}

fn tier(dir: &std::path::Path, backend: IoBackend, depth: usize) -> DiskTier {
    DiskTier::builder()
        .path(dir.join("g3.kvbm"))
        .block_bytes(BB)
        .capacity(Capacity::Blocks(64))
        .fingerprint(FP)
        .io_backend(backend)
        .queue_depth(depth)
        .open()
        .unwrap()
}

/// Puts blocks `hashes` from `src` (their images written there first).
fn put_from(tier: &DiskTier, hashes: &[u64], src: &mut Blocks) -> Vec<PutOutcome> {
    for (&n, buf) in hashes.iter().zip(src.views()) {
        buf.copy_from_slice(&image(h(n), BB));
    }
    let bytes = src.all();
    let blocks: Vec<StoreBlock<'_>> = hashes
        .iter()
        .zip(bytes.chunks(BB))
        .map(|(&n, bytes)| StoreBlock {
            hash: h(n),
            parent: parent_of(h(n)),
            bytes,
        })
        .collect();
    tier.put(&blocks)
}

fn get_into(tier: &DiskTier, hashes: &[u64], dst: &mut Blocks) -> Vec<GetOutcome> {
    let hs: Vec<_> = hashes.iter().map(|&n| h(n)).collect();
    tier.get(&hs, &mut dst.views())
}

#[test]
fn aligned_and_unaligned_buffers_round_trip_the_same_bytes_on_both_back_ends() {
    let hashes: Vec<u64> = (1..=24).collect();
    for backend in [IoBackend::ThreadPool, IoBackend::IoUring] {
        for depth in [1, 4] {
            for (put_aligned, get_aligned) in [(true, true), (true, false), (false, true)] {
                let dir = tempfile::tempdir().unwrap();
                let t = tier(dir.path(), backend, depth);
                let mut src = Blocks::new(hashes.len(), put_aligned);
                assert_eq!(
                    put_from(&t, &hashes, &mut src),
                    vec![PutOutcome::Stored; hashes.len()]
                );
                let mut dst = Blocks::new(hashes.len(), get_aligned);
                let got = get_into(&t, &hashes, &mut dst);
                for ((&n, outcome), buf) in hashes.iter().zip(got).zip(dst.views()) {
                    let case = format!(
                        "{backend:?} depth {depth} put {put_aligned} get {get_aligned} block {n}"
                    );
                    assert_eq!(
                        outcome,
                        GetOutcome::Hit {
                            parent: parent_of(h(n))
                        },
                        "{case}"
                    );
                    assert!(*buf == image(h(n), BB)[..], "{case}");
                }
                t.check_invariants().unwrap();
            }
        }
    }
}

#[test]
fn a_byte_flipped_in_the_file_is_corrupt_in_place_too_and_removed() {
    for backend in [IoBackend::ThreadPool, IoBackend::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let t = tier(dir.path(), backend, 4);
        let hashes: Vec<u64> = (10..14).collect();
        let mut src = Blocks::new(hashes.len(), true);
        put_from(&t, &hashes, &mut src);
        // Find block 12's slot by its bytes and flip one, behind the tier's back.
        let g = t.geometry();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        let want = image(h(12), BB);
        let mut buf = vec![0u8; BB];
        let slot = (0..g.slots())
            .find(|&k| {
                file.read_exact_at(&mut buf, g.slot_offset(k)).unwrap();
                buf == want
            })
            .unwrap();
        let at = g.slot_offset(slot) + 5000;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 1], at).unwrap();
        file.sync_all().unwrap();

        let mut dst = Blocks::new(hashes.len(), true);
        let got = get_into(&t, &hashes, &mut dst);
        assert_eq!(got[2], GetOutcome::Corrupt, "{backend:?}");
        for k in [0, 1, 3] {
            assert!(got[k].is_hit(), "{backend:?}: {:?}", got[k]);
            assert!(dst.views()[k][..] == image(h(hashes[k]), BB)[..]);
        }
        assert_eq!(t.contains(&[h(12)]), vec![false], "removed");
        assert_eq!(
            get_into(&t, &[12], &mut Blocks::new(1, true)),
            vec![GetOutcome::Miss]
        );
        assert_eq!(t.stats().corrupt, 1);
        t.check_invariants().unwrap();
    }
}

#[test]
fn a_short_read_in_place_fails_typed_and_is_never_a_hit() {
    let dir = tempfile::tempdir().unwrap();
    let t = DiskTier::builder()
        .path(dir.path().join("g3.kvbm"))
        .block_bytes(BB)
        .capacity(Capacity::Blocks(8))
        .fingerprint(FP)
        .faults(std::sync::Arc::new(
            DiskFaultPlan::new().fail_read(0, IoFault::Short { bytes: PAGE }),
        ))
        .open()
        .unwrap();
    let mut src = Blocks::new(1, true);
    put_from(&t, &[7], &mut src);
    let mut dst = Blocks::new(1, true);
    let got = get_into(&t, &[7], &mut dst);
    assert!(
        matches!(&got[0], GetOutcome::Failed(StoreError::Io(m)) if m.contains("short read")),
        "{got:?}"
    );
    assert!(matches!(
        t.degraded(),
        Some(Degraded::Io(SlotIoError::Short {
            op: "read",
            done: PAGE,
            expected,
        })) if expected == BB + PAGE
    ));
    assert!(!got[0].is_hit());
    assert_eq!(
        t.contains(&[h(7)]),
        vec![false],
        "invalidated, never retried"
    );
}
