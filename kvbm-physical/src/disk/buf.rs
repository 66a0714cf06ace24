//! Page-aligned I/O buffers (what `O_DIRECT` needs), with no `unsafe`: a `Vec` one page
//! longer than asked, used from its first page boundary. The `Vec` never grows, so its heap
//! block, and with it the alignment, never moves.

use parking_lot::Mutex;

use super::format::PAGE;

/// A zeroed buffer of `len` bytes whose first byte is [`PAGE`]-aligned.
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `None` if the allocation fails (the caller reports it as an I/O error).
    pub(crate) fn new(len: usize) -> Option<Self> {
        let total = len.checked_add(PAGE)?;
        let mut raw = Vec::new();
        raw.try_reserve_exact(total).ok()?;
        raw.resize(total, 0);
        let start = raw.as_ptr().align_offset(PAGE);
        if start > PAGE {
            return None;
        }
        Some(Self { raw, start, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// Slot-sized buffers and header pages kept between calls (a 2 MiB buffer costs page
/// faults to make).
#[derive(Debug)]
pub(crate) struct BufPool {
    len: usize,
    keep: usize,
    free: Mutex<Vec<AlignedBuf>>,
    pages: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    /// Buffers of `len` bytes; at most `keep` of each kind are kept when returned.
    pub(crate) fn new(len: usize, keep: usize) -> Self {
        Self {
            len,
            keep,
            free: Mutex::new(Vec::new()),
            pages: Mutex::new(Vec::new()),
        }
    }

    /// A buffer (contents unspecified); `None` if memory is short.
    pub(crate) fn take(&self) -> Option<AlignedBuf> {
        if let Some(buf) = self.free.lock().pop() {
            return Some(buf);
        }
        AlignedBuf::new(self.len)
    }

    pub(crate) fn give(&self, buf: AlignedBuf) {
        let mut free = self.free.lock();
        if free.len() < self.keep && buf.len() == self.len {
            free.push(buf);
        }
    }

    /// A page (contents unspecified); `None` if memory is short.
    pub(crate) fn take_page(&self) -> Option<AlignedBuf> {
        if let Some(page) = self.pages.lock().pop() {
            return Some(page);
        }
        AlignedBuf::new(PAGE)
    }

    pub(crate) fn give_page(&self, page: AlignedBuf) {
        let mut pages = self.pages.lock();
        if pages.len() < self.keep && page.len() == PAGE {
            pages.push(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_pooled() {
        let pool = BufPool::new(3 * PAGE, 1);
        let mut a = pool.take().unwrap();
        assert_eq!(a.as_slice().as_ptr() as usize % PAGE, 0);
        assert_eq!(a.len(), 3 * PAGE);
        a.as_mut_slice()[0] = 7;
        let addr = a.as_slice().as_ptr();
        pool.give(a);
        let b = pool.take().unwrap();
        assert_eq!(b.as_slice().as_ptr(), addr, "the pooled buffer is reused");
        assert!(AlignedBuf::new(usize::MAX).is_none());
        let page = pool.take_page().unwrap();
        assert_eq!(
            (page.len(), page.as_slice().as_ptr() as usize % PAGE),
            (PAGE, 0)
        );
        let at = page.as_slice().as_ptr();
        pool.give_page(page);
        assert_eq!(pool.take_page().unwrap().as_slice().as_ptr(), at);
    }
}
