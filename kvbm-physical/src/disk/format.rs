//! The tier file's on-disk format: a superblock page, then fixed-size slots, each a block
//! image followed by a header page. All integers are little-endian.
//!
//! ```text
//! offset 0          4096                    4096 + slot_bytes
//! ┌───────────────┬──────────────────────────┬──────────────────────────┬───
//! │ superblock    │ slot 0                   │ slot 1                   │ …
//! │ (one page)    │ block image │ pad │ hdr  │ block image │ pad │ hdr  │
//! └───────────────┴──────────────────────────┴──────────────────────────┴───
//! ```
//!
//! A slot is `round_up(block_bytes, 4096) + 4096` bytes at a 4 KiB-aligned offset, written
//! and read whole in one I/O. The header sits in the slot's last page so that the image
//! starts on a page boundary. A slot is valid only if its header decodes (magic, version,
//! its own checksum), names the file's epoch and layout fingerprint, the block length, and
//! the xxh3-64 of the image matches: a torn write (old header with new bytes, new header
//! with old bytes, or half of either) fails the last check.

use kvbm_logical::SequenceHash;
use xxhash_rust::xxh3::xxh3_64;

/// Alignment of every offset, length and buffer address of the tier file (`O_DIRECT`).
pub const PAGE: usize = 4096;

/// First bytes of the superblock.
pub(crate) const FILE_MAGIC: [u8; 8] = *b"KVBMG3\0\x01";
/// First bytes of a slot header.
pub(crate) const SLOT_MAGIC: [u8; 8] = *b"KVBMSLOT";
/// The format written by this version; files of another version are not read.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// Bytes of the encoded superblock (the rest of its page is zero).
const SUPER_LEN: usize = 64;
/// Bytes of the encoded slot header (the rest of its page is zero).
pub(crate) const HEADER_LEN: usize = 80;

/// Rounds `n` up to a multiple of [`PAGE`]; `None` on overflow.
pub(crate) fn page_round(n: usize) -> Option<usize> {
    n.checked_add(PAGE - 1).map(|v| v / PAGE * PAGE)
}

/// Where block images and headers lie in the tier file.
///
/// ```
/// use kvbm_physical::disk::DiskGeometry;
/// let g = DiskGeometry::new(256 << 10, 8).unwrap();
/// assert_eq!(g.slot_bytes(), (256 << 10) + 4096); // image + header page
/// assert_eq!(g.slot_offset(0), 4096); // after the superblock
/// assert_eq!(g.header_offset(1), 4096 + 2 * g.slot_bytes() as u64 - 4096);
/// assert_eq!(g.file_len(), 4096 + 8 * g.slot_bytes() as u64);
/// assert!(DiskGeometry::new(0, 8).is_none());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DiskGeometry {
    block_bytes: usize,
    slot_bytes: usize,
    slots: u32,
}

impl DiskGeometry {
    /// The geometry of `slots` slots of `block_bytes`-byte images; `None` if either is zero or
    /// the file would not be addressable.
    pub fn new(block_bytes: usize, slots: u32) -> Option<Self> {
        if block_bytes == 0 || slots == 0 {
            return None;
        }
        let slot_bytes = page_round(block_bytes)?.checked_add(PAGE)?;
        // The whole file must fit in a u64 offset and each slot in one I/O (isize).
        u64::try_from(slot_bytes)
            .ok()?
            .checked_mul(u64::from(slots))?
            .checked_add(PAGE as u64)?;
        isize::try_from(slot_bytes).ok()?;
        Some(Self {
            block_bytes,
            slot_bytes,
            slots,
        })
    }

    /// Bytes of one block image.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Bytes of one slot: the image rounded up to a page, plus the header page.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Slots in the file.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Offset of slot `slot`'s first byte (its image).
    pub fn slot_offset(&self, slot: u32) -> u64 {
        PAGE as u64 + u64::from(slot) * self.slot_bytes as u64
    }

    /// Offset of slot `slot`'s header page.
    pub fn header_offset(&self, slot: u32) -> u64 {
        self.slot_offset(slot) + (self.slot_bytes - PAGE) as u64
    }

    /// Offset of the header page within a slot image buffer.
    pub(crate) fn header_in_slot(&self) -> usize {
        self.slot_bytes - PAGE
    }

    /// The file's length: the superblock page and every slot.
    pub fn file_len(&self) -> u64 {
        self.slot_offset(self.slots)
    }
}

/// The superblock: what the file holds and for whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub fingerprint: u64,
    /// Random at creation and at every reinitialisation: slots of an older epoch are never
    /// read back.
    pub epoch: u64,
    pub block_bytes: u64,
    pub slot_bytes: u64,
    pub slots: u64,
}

/// Why a page is not a superblock of this format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SuperError {
    /// Not a kvbm tier file at all (wrong magic).
    NotOurs,
    /// A kvbm tier file of another format version.
    Version(u32),
    /// The superblock's checksum does not match: damaged.
    Damaged,
}

impl Superblock {
    pub(crate) fn encode(&self, page: &mut [u8]) {
        page[..PAGE].fill(0);
        page[0..8].copy_from_slice(&FILE_MAGIC);
        page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        page[16..24].copy_from_slice(&self.fingerprint.to_le_bytes());
        page[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        page[32..40].copy_from_slice(&self.block_bytes.to_le_bytes());
        page[40..48].copy_from_slice(&self.slot_bytes.to_le_bytes());
        page[48..56].copy_from_slice(&self.slots.to_le_bytes());
        let sum = xxh3_64(&page[..SUPER_LEN - 8]);
        page[SUPER_LEN - 8..SUPER_LEN].copy_from_slice(&sum.to_le_bytes());
    }

    pub(crate) fn decode(page: &[u8]) -> Result<Self, SuperError> {
        if page.len() < SUPER_LEN || page[0..8] != FILE_MAGIC {
            return Err(SuperError::NotOurs);
        }
        let version = u32_at(page, 8);
        if version != FORMAT_VERSION {
            return Err(SuperError::Version(version));
        }
        if u64_at(page, SUPER_LEN - 8) != xxh3_64(&page[..SUPER_LEN - 8]) {
            return Err(SuperError::Damaged);
        }
        Ok(Self {
            fingerprint: u64_at(page, 16),
            epoch: u64_at(page, 24),
            block_bytes: u64_at(page, 32),
            slot_bytes: u64_at(page, 40),
            slots: u64_at(page, 48),
        })
    }
}

/// One slot's header: the block's identity and the checksum of its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    pub hash: SequenceHash,
    pub parent: Option<SequenceHash>,
    pub fingerprint: u64,
    pub epoch: u64,
    /// Monotonic per tier file: the write order, kept across restarts.
    pub generation: u64,
    pub len: u64,
    /// xxh3-64 of the image.
    pub checksum: u64,
}

/// What a header page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderRead {
    /// All zero: never written, or removed.
    Empty,
    /// A header that decodes and whose own checksum matches.
    Valid(SlotHeader),
    /// Anything else: torn or damaged.
    Damaged,
}

impl SlotHeader {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `page` and zeroes the rest of
    /// the page.
    pub(crate) fn encode(&self, page: &mut [u8]) {
        page[..PAGE].fill(0);
        page[0..8].copy_from_slice(&SLOT_MAGIC);
        page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&u32::from(self.parent.is_some()).to_le_bytes());
        page[16..24].copy_from_slice(&self.hash.as_u64().to_le_bytes());
        let parent = self.parent.map_or(0, SequenceHash::as_u64);
        page[24..32].copy_from_slice(&parent.to_le_bytes());
        page[32..40].copy_from_slice(&self.fingerprint.to_le_bytes());
        page[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        page[48..56].copy_from_slice(&self.generation.to_le_bytes());
        page[56..64].copy_from_slice(&self.len.to_le_bytes());
        page[64..72].copy_from_slice(&self.checksum.to_le_bytes());
        // Last, the header's own checksum.
        let sum = xxh3_64(&page[..HEADER_LEN - 8]);
        page[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
    }

    /// Reads a header page.
    pub(crate) fn decode(page: &[u8]) -> HeaderRead {
        if page[..HEADER_LEN].iter().all(|&b| b == 0) {
            return HeaderRead::Empty;
        }
        if page[0..8] != SLOT_MAGIC || u32_at(page, 8) != FORMAT_VERSION {
            return HeaderRead::Damaged;
        }
        let flags = u32_at(page, 12);
        if flags > 1 || u64_at(page, HEADER_LEN - 8) != xxh3_64(&page[..HEADER_LEN - 8]) {
            return HeaderRead::Damaged;
        }
        HeaderRead::Valid(Self {
            hash: SequenceHash::new(u64_at(page, 16)),
            parent: (flags == 1).then(|| SequenceHash::new(u64_at(page, 24))),
            fingerprint: u64_at(page, 32),
            epoch: u64_at(page, 40),
            generation: u64_at(page, 48),
            len: u64_at(page, 56),
            checksum: u64_at(page, 64),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SlotHeader {
        SlotHeader {
            hash: SequenceHash::new(0xdead_beef),
            parent: Some(SequenceHash::new(7)),
            fingerprint: 42,
            epoch: 9,
            generation: 1234,
            len: 4096,
            checksum: 0x0123_4567_89ab_cdef,
        }
    }

    #[test]
    fn header_round_trips_and_detects_every_flipped_bit() {
        let mut page = vec![0u8; PAGE];
        for h in [
            header(),
            SlotHeader {
                parent: None,
                ..header()
            },
        ] {
            h.encode(&mut page);
            assert_eq!(SlotHeader::decode(&page), HeaderRead::Valid(h));
        }
        header().encode(&mut page);
        for bit in 0..HEADER_LEN * 8 {
            let mut p = page.clone();
            p[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(
                SlotHeader::decode(&p),
                HeaderRead::Valid(header()),
                "bit {bit} flipped went unnoticed"
            );
        }
        assert_eq!(SlotHeader::decode(&vec![0u8; PAGE]), HeaderRead::Empty);
    }

    #[test]
    fn superblock_round_trips_and_rejects_others() {
        let s = Superblock {
            fingerprint: 1,
            epoch: 2,
            block_bytes: 3,
            slot_bytes: 4,
            slots: 5,
        };
        let mut page = vec![0u8; PAGE];
        s.encode(&mut page);
        assert_eq!(Superblock::decode(&page), Ok(s));
        let mut damaged = page.clone();
        damaged[20] ^= 1;
        assert_eq!(Superblock::decode(&damaged), Err(SuperError::Damaged));
        let mut other = page.clone();
        other[8] = 2;
        assert_eq!(Superblock::decode(&other), Err(SuperError::Version(2)));
        assert_eq!(Superblock::decode(b"#!/bin/sh\n"), Err(SuperError::NotOurs));
    }

    #[test]
    fn geometry_refuses_what_cannot_be_addressed() {
        assert!(DiskGeometry::new(1, 0).is_none());
        assert!(DiskGeometry::new(usize::MAX, 1).is_none());
        let g = DiskGeometry::new(1, 3).unwrap();
        assert_eq!(g.slot_bytes(), 2 * PAGE);
        assert_eq!(g.header_in_slot(), PAGE);
        assert_eq!(g.slot_offset(2) % PAGE as u64, 0);
    }
}
