//! Slot verification, shared by reads and recovery, and the scan that recovery runs over the
//! slots of an existing file.

use std::io;

use xxhash_rust::xxh3::xxh3_64;

use super::faults::DiskFaults;
use super::format::{DiskGeometry, HeaderRead, PAGE, SlotHeader};
use super::io::{Ops, Scratch, Step};

/// What verifying one slot found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotCheck {
    /// Header and (if checked) image verify.
    Valid(SlotHeader),
    /// Never written, or removed.
    Empty,
    /// Written under an older epoch: not ours to read.
    Stale,
    /// Torn or damaged: header, fingerprint, length or checksum wrong.
    Torn,
}

/// The identity a slot must carry to be read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expect {
    pub fingerprint: u64,
    pub epoch: u64,
    pub block_bytes: usize,
}

/// Copies `src` into `dst` (same length) and returns the xxh3-64 of the bytes. (One-shot
/// xxh3 after the copy: measured 2.5x faster than hashing chunk by chunk as they are
/// copied, whose streaming state costs more than the second pass over cached data.)
pub(crate) fn copy_and_hash(src: &[u8], dst: &mut [u8]) -> u64 {
    dst.copy_from_slice(src);
    xxh3_64(dst)
}

/// Verifies a slot from its header page and, when given, the xxh3-64 of its image.
pub(crate) fn check_slot(expect: &Expect, header_page: &[u8], image_sum: Option<u64>) -> SlotCheck {
    let header = match SlotHeader::decode(header_page) {
        HeaderRead::Empty => return SlotCheck::Empty,
        HeaderRead::Damaged => return SlotCheck::Torn,
        HeaderRead::Valid(h) => h,
    };
    if header.epoch != expect.epoch {
        return SlotCheck::Stale;
    }
    if header.fingerprint != expect.fingerprint || header.len != expect.block_bytes as u64 {
        return SlotCheck::Torn;
    }
    if let Some(sum) = image_sum
        && sum != header.checksum
    {
        return SlotCheck::Torn;
    }
    SlotCheck::Valid(header)
}

/// The recovery scan: every slot `0..slots`, whole ([`RecoveryMode::Verify`]) or header
/// page only ([`RecoveryMode::Headers`]); one task per slot.
///
/// [`RecoveryMode::Verify`]: super::RecoveryMode::Verify
/// [`RecoveryMode::Headers`]: super::RecoveryMode::Headers
pub(crate) struct Scan<'a> {
    pub geometry: DiskGeometry,
    pub expect: Expect,
    pub verify: bool,
    pub faults: Option<&'a dyn DiskFaults>,
}

/// What the scan found in one slot.
#[derive(Debug)]
pub(crate) enum Scanned {
    /// A slot that verifies (header, and image too with `verify`).
    Found(SlotHeader),
    Empty,
    Stale,
    /// Header or image does not verify.
    Torn,
    /// The read failed or came out short.
    Unreadable(io::Error),
}

impl Scan<'_> {
    fn expected_len(&self) -> usize {
        if self.verify {
            self.geometry.slot_bytes()
        } else {
            PAGE
        }
    }
}

impl Ops for Scan<'_> {
    type Task = u32;
    type Out = Scanned;

    fn prepare<'t>(&self, slot: &'t mut u32, scratch: &'t mut Scratch<'_>) -> Step<'t> {
        let slot = *slot;
        let g = self.geometry;
        let (offset, buf) = if self.verify {
            (g.slot_offset(slot), scratch.bounce())
        } else {
            (g.header_offset(slot), scratch.page())
        };
        let Some(buf) = buf else {
            return Step::Done(Err(io::ErrorKind::OutOfMemory.into()));
        };
        let len = self.expected_len();
        Step::Read {
            offset,
            segs: vec![&mut buf[..len]],
        }
        .with_fault(self.faults.and_then(|f| f.before_read(slot)))
    }

    fn finish(&self, slot: u32, scratch: &Scratch<'_>, result: io::Result<usize>) -> Scanned {
        let len = self.expected_len();
        let buf = if self.verify {
            scratch.bounce_bytes()
        } else {
            scratch.page_bytes()
        };
        match result {
            Ok(n) if n == len && buf.len() >= len => {}
            Ok(n) => {
                return Scanned::Unreadable(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read of slot {slot}: {n} of {len} bytes"),
                ));
            }
            Err(e) => return Scanned::Unreadable(e),
        }
        let check = if self.verify {
            let at = self.geometry.header_in_slot();
            let sum = xxh3_64(&buf[..self.geometry.block_bytes()]);
            check_slot(&self.expect, &buf[at..at + PAGE], Some(sum))
        } else {
            check_slot(&self.expect, &buf[..PAGE], None)
        };
        match check {
            SlotCheck::Valid(h) => Scanned::Found(h),
            SlotCheck::Empty => Scanned::Empty,
            SlotCheck::Stale => Scanned::Stale,
            SlotCheck::Torn => Scanned::Torn,
        }
    }

    fn abandoned(&self) -> Scanned {
        Scanned::Unreadable(io::Error::other("the I/O thread failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_hash_copies_and_hashes_like_one_shot_xxh3() {
        for len in [0, 1, 4095, 32 << 10, (32 << 10) + 17, 300_001] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            assert_eq!(copy_and_hash(&src, &mut dst), xxh3_64(&src), "len {len}");
            assert_eq!(dst, src);
        }
    }
}
