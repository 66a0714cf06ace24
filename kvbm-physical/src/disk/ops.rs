//! The slot operations of a [`DiskTier`]: block writes, block reads and header
//! tombstones, as [`Ops`] for the I/O back ends.
//!
//! **Zero copy.** A slot is the image followed by its header page. When the image fills
//! whole pages (`block_bytes` a multiple of 4 KiB) and the caller's buffer is page-aligned
//! (or the file is buffered), a write is one `pwritev` of the caller's bytes and a header
//! page, and a read one `preadv` straight into the caller's buffer and a header page: no
//! copy, only the checksum. Otherwise (and for writes under fault injection, which may
//! change the bytes on their way) the slot goes through a page-aligned bounce buffer.

use std::io;

use kvbm_logical::SequenceHash;
use xxhash_rust::xxh3::xxh3_64;

use super::engine::DiskTier;
use super::error::SlotIoError;
use super::format::{PAGE, SlotHeader};
use super::io::{Ops, Scratch, Step, direct_ok};
use super::recovery::{SlotCheck, check_slot, copy_and_hash};
use super::stats::Counters;
use crate::store_tier::StoreBlock;

fn out_of_memory<'t>() -> Step<'t> {
    Step::Done(Err(io::ErrorKind::OutOfMemory.into()))
}

fn thread_failed() -> SlotIoError {
    SlotIoError::Io {
        errno: None,
        message: "the I/O thread failed".into(),
    }
}

impl DiskTier {
    /// Whether a block image at `bytes` can be read or written in place (no bounce buffer).
    fn in_place(&self, bytes: &[u8]) -> bool {
        let g = self.geometry;
        g.header_in_slot() == g.block_bytes() && direct_ok(self.io_mode.is_direct(), bytes)
    }

    fn header(&self, block: &StoreBlock<'_>, checksum: u64, generation: u64) -> SlotHeader {
        SlotHeader {
            hash: block.hash,
            parent: block.parent,
            fingerprint: self.expect.fingerprint,
            epoch: self.expect.epoch,
            generation,
            len: self.geometry.block_bytes() as u64,
            checksum,
        }
    }
}

/// One block write: the block into a slot.
pub(crate) struct WriteTask<'a> {
    pub slot: u32,
    pub block: StoreBlock<'a>,
    /// The slot header's generation, assigned in the batch's order.
    pub generation: u64,
}

/// The block writes of a `put`.
pub(crate) struct Writes<'a> {
    pub tier: &'a DiskTier,
}

impl<'a> Ops for Writes<'a> {
    fn sequential(&self) -> bool {
        self.tier.faults.is_some()
    }

    type Task = WriteTask<'a>;
    type Out = Result<(), SlotIoError>;

    fn prepare<'t>(&self, task: &'t mut WriteTask<'a>, scratch: &'t mut Scratch<'_>) -> Step<'t> {
        let tier = self.tier;
        let g = tier.geometry;
        let block = task.block;
        let offset = g.slot_offset(task.slot);
        if tier.faults.is_none() && tier.in_place(block.bytes) {
            Counters::add(&tier.counters.in_place_writes, 1);
            let checksum = xxh3_64(block.bytes);
            let Some(page) = scratch.page() else {
                return out_of_memory();
            };
            tier.header(&block, checksum, task.generation).encode(page);
            return Step::Write {
                offset,
                segs: vec![block.bytes, page],
            };
        }
        let Some(buf) = scratch.bounce() else {
            return out_of_memory();
        };
        Counters::add(&tier.counters.bounce_writes, 1);
        let (data, rest) = buf.split_at_mut(g.block_bytes());
        let checksum = copy_and_hash(block.bytes, data);
        let pad = g.header_in_slot() - g.block_bytes();
        rest[..pad].fill(0);
        tier.header(&block, checksum, task.generation)
            .encode(&mut rest[pad..]);
        let slot = &mut buf[..g.slot_bytes()];
        let fault = tier
            .faults
            .as_deref()
            .and_then(|f| f.before_write(task.slot, slot));
        Step::Write {
            offset,
            segs: vec![slot],
        }
        .with_fault(fault)
    }

    fn finish(
        &self,
        _task: WriteTask<'a>,
        _scratch: &Scratch<'_>,
        result: io::Result<usize>,
    ) -> Result<(), SlotIoError> {
        let expected = self.tier.geometry.slot_bytes();
        match result {
            Ok(n) if n == expected => Ok(()),
            Ok(done) => Err(SlotIoError::Short {
                op: "write",
                done,
                expected,
            }),
            Err(e) => Err(SlotIoError::from_io(&e)),
        }
    }

    fn abandoned(&self) -> Result<(), SlotIoError> {
        Err(thread_failed())
    }
}

/// One block read: a slot into the caller's buffer.
pub(crate) struct ReadTask<'o> {
    pub slot: u32,
    pub hash: SequenceHash,
    pub out: &'o mut [u8],
    /// Read in place (set by `prepare`).
    pub in_place: bool,
}

/// What one read found.
#[derive(Debug)]
pub(crate) enum ReadResult {
    /// Verified; the caller's buffer holds the image.
    Hit(Option<SequenceHash>),
    /// Removed meanwhile (an empty header): gone, not corrupt.
    Miss,
    /// Did not verify.
    Corrupt,
    /// The read failed or came out short.
    Failed(SlotIoError),
}

/// The block reads of a `get`.
pub(crate) struct Reads<'a> {
    pub tier: &'a DiskTier,
}

impl<'o> Ops for Reads<'o> {
    fn sequential(&self) -> bool {
        self.tier.faults.is_some()
    }

    type Task = ReadTask<'o>;
    type Out = ReadResult;

    fn prepare<'t>(&self, task: &'t mut ReadTask<'o>, scratch: &'t mut Scratch<'_>) -> Step<'t> {
        let tier = self.tier;
        let g = tier.geometry;
        let offset = g.slot_offset(task.slot);
        task.in_place = tier.in_place(task.out);
        let step = if task.in_place {
            let Some(page) = scratch.page() else {
                return out_of_memory();
            };
            Counters::add(&tier.counters.in_place_reads, 1);
            Step::Read {
                offset,
                segs: vec![&mut task.out[..], page],
            }
        } else {
            let Some(buf) = scratch.bounce() else {
                return out_of_memory();
            };
            Counters::add(&tier.counters.bounce_reads, 1);
            Step::Read {
                offset,
                segs: vec![&mut buf[..g.slot_bytes()]],
            }
        };
        step.with_fault(
            tier.faults
                .as_deref()
                .and_then(|f| f.before_read(task.slot)),
        )
    }

    fn finish(
        &self,
        task: ReadTask<'o>,
        scratch: &Scratch<'_>,
        result: io::Result<usize>,
    ) -> ReadResult {
        let g = self.tier.geometry;
        let expected = g.slot_bytes();
        match result {
            Ok(n) if n == expected => {}
            Ok(done) => {
                return ReadResult::Failed(SlotIoError::Short {
                    op: "read",
                    done,
                    expected,
                });
            }
            Err(e) => return ReadResult::Failed(SlotIoError::from_io(&e)),
        }
        let check = {
            let (image, header): (&[u8], &[u8]) = if task.in_place {
                (&task.out[..], scratch.page_bytes())
            } else {
                let buf = scratch.bounce_bytes();
                let h = g.header_in_slot();
                (&buf[..g.block_bytes()], &buf[h..h + PAGE])
            };
            if header.len() < PAGE || image.len() != g.block_bytes() {
                return ReadResult::Failed(thread_failed());
            }
            check_slot(&self.tier.expect, header, Some(xxh3_64(image)))
        };
        match check {
            SlotCheck::Valid(h) if h.hash == task.hash => {
                if !task.in_place {
                    task.out
                        .copy_from_slice(&scratch.bounce_bytes()[..g.block_bytes()]);
                }
                ReadResult::Hit(h.parent)
            }
            // Removed while registered (a racing remove): gone, not corrupt.
            SlotCheck::Empty => ReadResult::Miss,
            _ => ReadResult::Corrupt,
        }
    }

    fn abandoned(&self) -> ReadResult {
        ReadResult::Failed(thread_failed())
    }
}

/// Header tombstones: zero the header page of each slot (one task per slot).
pub(crate) struct Tombstones<'a> {
    pub tier: &'a DiskTier,
}

impl Ops for Tombstones<'_> {
    fn sequential(&self) -> bool {
        self.tier.faults.is_some()
    }

    type Task = u32;
    /// Whether the header page was written.
    type Out = bool;

    fn prepare<'t>(&self, slot: &'t mut u32, scratch: &'t mut Scratch<'_>) -> Step<'t> {
        let Some(page) = scratch.page() else {
            return out_of_memory();
        };
        page.fill(0);
        let fault = self
            .tier
            .faults
            .as_deref()
            .and_then(|f| f.before_write(*slot, page));
        Step::Write {
            offset: self.tier.geometry.header_offset(*slot),
            segs: vec![page],
        }
        .with_fault(fault)
    }

    fn finish(&self, _slot: u32, _scratch: &Scratch<'_>, result: io::Result<usize>) -> bool {
        matches!(result, Ok(PAGE))
    }

    fn abandoned(&self) -> bool {
        false
    }
}
