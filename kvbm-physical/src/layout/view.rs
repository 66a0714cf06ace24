//! Locked views of one block's image in place: what lets a store tier read a block from disk
//! straight into G2's memory, or write it from there, with no copy through a heap buffer.
//!
//! A view exists only where the block's image is one range of host memory (a fully
//! contiguous layout in system or pinned memory, or any layout whose images are contiguous).
//! It holds the block's lock for as long as it lives — shared for [`BlockView`], exclusive for
//! [`BlockViewMut`] — so a transfer (or another view) that would write the bytes being read,
//! or read the bytes being written, is refused with `BlockBusy` instead of racing. A mutable
//! view keeps the block's checksum right: [`BlockViewMut::commit`] records the checksum of
//! the bytes written; dropping the view uncommitted forgets the block's checksum (its bytes
//! are then unknown), so a later transfer never trusts a stale one.

use std::ops::{Deref, DerefMut};

use kvbm_logical::BlockId;

use super::Layout;
use crate::error::LayoutError;

/// A read-locked view of one block's image (see [`Layout::block_view`]).
pub struct BlockView<'a> {
    layout: &'a Layout,
    block: usize,
    bytes: &'a [u8],
}

/// A write-locked view of one block's image (see [`Layout::block_view_mut`]).
pub struct BlockViewMut<'a> {
    layout: &'a Layout,
    block: usize,
    bytes: &'a mut [u8],
    committed: bool,
}

impl Layout {
    /// Where block `block`'s image lies, if it is one range of host memory.
    fn view_addr(&self, block: BlockId) -> Result<u64, LayoutError> {
        self.geometry.check(block.index(), 0, 0)?;
        if !self.memory.is_host() || !self.contiguous_images {
            return Err(LayoutError::NoBlockView {
                memory: self.memory,
                contiguous: self.contiguous_images,
            });
        }
        Ok(self.addr(block.index(), 0, 0))
    }

    /// Whether [`block_view`](Self::block_view) and [`block_view_mut`](Self::block_view_mut)
    /// can work: the layout's memory is host memory and every block's image is one range.
    ///
    /// ```
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 2, num_layers: 2, outer_dim: 2, page_size: 4, inner_dim: 8, dtype_bytes: 2 };
    /// assert!(Layout::system(LayoutKind::FullyContiguous, c)?.has_block_views());
    /// assert!(!Layout::system(LayoutKind::LayerSeparate, c)?.has_block_views());
    /// # Ok::<(), kvbm_physical::LayoutError>(())
    /// ```
    pub fn has_block_views(&self) -> bool {
        self.memory.is_host() && self.contiguous_images
    }

    /// The image of `block` in place, read-locked until the view is dropped: a transfer that
    /// would write the block meanwhile is refused (`BlockBusy`), other readers are not.
    /// Refused with [`LayoutError::NoBlockView`] where the image is not one range of host
    /// memory, and with [`LayoutError::BlockBusy`] while a writer holds the block.
    ///
    /// ```
    /// use kvbm_logical::BlockId;
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutError, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 2, num_layers: 1, outer_dim: 2, page_size: 4, inner_dim: 4, dtype_bytes: 1 };
    /// let layout = Layout::system(LayoutKind::FullyContiguous, c)?.with_checksums()?;
    /// layout.write_block(BlockId::new(1), &[5; 32])?;
    /// let view = layout.block_view(BlockId::new(1))?;
    /// assert_eq!(&view[..], &[5; 32]);
    /// assert!(view.verify()); // the bytes match the recorded checksum
    /// // A writer waits for the reader to go.
    /// assert_eq!(layout.write_block(BlockId::new(1), &[6; 32]), Err(LayoutError::BlockBusy(1)));
    /// drop(view);
    /// layout.write_block(BlockId::new(1), &[6; 32])?;
    /// # Ok::<(), LayoutError>(())
    /// ```
    pub fn block_view(&self, block: BlockId) -> Result<BlockView<'_>, LayoutError> {
        let addr = self.view_addr(block)?;
        let i = block.index();
        if !self.locks.try_read(i) {
            return Err(LayoutError::BlockBusy(i));
        }
        // SAFETY: `addr .. addr + block_bytes` is block `i`'s image, one range of a live host
        // slab (checked index, contiguous images) that lives as long as `self`. The read lock,
        // held until the view drops, keeps every writer (transfers, `write_block`, mutable
        // views) out, so the bytes do not change while this shared slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, self.block_bytes()) };
        Ok(BlockView {
            layout: self,
            block: i,
            bytes,
        })
    }

    /// The image of `block` in place, for writing, write-locked until the view is dropped:
    /// a transfer that would read or write the block meanwhile is refused (`BlockBusy`).
    /// [`commit`](BlockViewMut::commit) records the checksum of what was written (when
    /// checksums are on); dropping the view uncommitted forgets the block's checksum.
    /// Refused with [`LayoutError::NoBlockView`] where the image is not one range of host
    /// memory, and with [`LayoutError::BlockBusy`] while anyone else holds the block.
    ///
    /// ```
    /// use kvbm_logical::BlockId;
    /// use kvbm_physical::{Layout, LayoutConfig, LayoutError, LayoutKind};
    /// let c = LayoutConfig { num_blocks: 2, num_layers: 1, outer_dim: 2, page_size: 4, inner_dim: 4, dtype_bytes: 1 };
    /// let layout = Layout::system(LayoutKind::FullyContiguous, c)?.with_checksums()?;
    /// let mut view = layout.block_view_mut(BlockId::new(0))?;
    /// view.fill(3); // a store tier's read lands here
    /// // Nobody else may touch the block meanwhile.
    /// assert!(layout.block_view(BlockId::new(0)).is_err());
    /// view.commit();
    /// assert_eq!(layout.checksum(BlockId::new(0)), Some(xxhash_rust::xxh3::xxh3_64(&[3; 32])));
    /// // Uncommitted: the checksum is forgotten.
    /// layout.block_view_mut(BlockId::new(0))?[0] = 9;
    /// assert_eq!(layout.checksum(BlockId::new(0)), None);
    /// # Ok::<(), LayoutError>(())
    /// ```
    pub fn block_view_mut(&self, block: BlockId) -> Result<BlockViewMut<'_>, LayoutError> {
        let addr = self.view_addr(block)?;
        let i = block.index();
        if !self.locks.try_write(i) {
            return Err(LayoutError::BlockBusy(i));
        }
        // SAFETY: as in `block_view`; the write lock, held until the view drops, keeps every
        // other reader and writer out, so this is the only reference to these bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, self.block_bytes()) };
        Ok(BlockViewMut {
            layout: self,
            block: i,
            bytes,
            committed: false,
        })
    }
}

impl BlockView<'_> {
    /// The block viewed.
    pub fn block_id(&self) -> BlockId {
        BlockId::new(self.block as u32)
    }

    /// Whether the bytes match the block's recorded checksum (`true` when checksums are off
    /// or none is recorded): what a transfer checks before copying a block out.
    pub fn verify(&self) -> bool {
        self.layout
            .checksum(self.block_id())
            .is_none_or(|sum| sum == xxhash_rust::xxh3::xxh3_64(self.bytes))
    }
}

impl BlockViewMut<'_> {
    /// The block viewed.
    pub fn block_id(&self) -> BlockId {
        BlockId::new(self.block as u32)
    }

    /// Ends the write: records the checksum of the block's bytes (when checksums are on)
    /// and releases the lock.
    pub fn commit(mut self) {
        if let Some(sums) = self.layout.checksums() {
            let sum = xxhash_rust::xxh3::xxh3_64(self.bytes);
            sums.lock()[self.block] = Some(sum);
        }
        self.committed = true;
    }
}

impl Deref for BlockView<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Deref for BlockViewMut<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl DerefMut for BlockViewMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

impl Drop for BlockView<'_> {
    fn drop(&mut self) {
        self.layout.locks.unlock_read(self.block);
    }
}

impl Drop for BlockViewMut<'_> {
    fn drop(&mut self) {
        if !self.committed
            && let Some(sums) = self.layout.checksums()
        {
            sums.lock()[self.block] = None;
        }
        self.layout.locks.unlock_write(self.block);
    }
}

impl std::fmt::Debug for BlockView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockView")
            .field("block", &self.block)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl std::fmt::Debug for BlockViewMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockViewMut")
            .field("block", &self.block)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}
