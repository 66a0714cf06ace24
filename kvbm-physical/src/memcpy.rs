//! Host copies for the `Memcpy` strategy.
//!
//! A batch that moves more bytes than the caches hold gains nothing from caching its
//! destination: offloaded blocks are not read again soon, and a GPU reads pinned memory from
//! DRAM anyway. Ordinary stores still pull every destination line into the cache first (a
//! read for ownership), which costs about half the bandwidth. glibc's `memcpy` switches to
//! non-temporal (streaming) stores only for a *single* copy above a cache-sized threshold
//! (hundreds of MiB on large servers), so a batch of 2 MiB block copies never gets them.
//! Measured on the development machine: 2 MiB blocks copied one by one ran at 50% of one
//! large `memcpy`; with streaming stores, at ~100% (BENCHMARKS.md).
//!
//! So large batches copy their long runs with non-temporal (streaming) stores, then fence
//! once: 32-byte AVX stores where the CPU has AVX (detected at run time), else 16-byte SSE2
//! stores (baseline on x86_64). Loads are ordinary (unaligned) loads; nothing is prefetched
//! by hand (the hardware prefetcher follows the sequential reads). Other architectures, and
//! short runs, use plain `memcpy`.

/// Batches of at least this many bytes stream their stores.
pub(crate) const STREAM_BATCH_BYTES: usize = 8 << 20;
/// Runs shorter than this use plain `memcpy` even in a streaming batch.
const STREAM_MIN_RUN: usize = 4096;

/// Copies `len` bytes; streams the stores when `stream` and the run is long enough. After a
/// batch with `stream`, call [`fence`] before publishing the destination.
///
/// # Safety
/// `src..src+len` must be readable, `dst..dst+len` writable, the two must not overlap, and
/// no one else may access either range during the call.
pub(crate) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize, stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream && len >= STREAM_MIN_RUN {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: forwarded from the caller; AVX is present (checked just above).
            unsafe { stream_copy_avx(dst, src, len) };
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { stream_copy(dst, src, len) };
        }
        return;
    }
    let _ = stream;
    // SAFETY: forwarded from the caller.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Orders streaming stores before later stores (the lock release that publishes them).
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `sfence` has no preconditions; SSE is baseline on x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// Copies with 16-byte SSE2 streaming stores, 64 bytes per iteration.
///
/// # Safety
/// As [`copy`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(mut dst: *mut u8, mut src: *const u8, mut len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // Align the destination to 16 bytes with a short ordinary copy.
    let head = dst.align_offset(16).min(len);
    // SAFETY: within the caller's ranges (head <= len).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        dst = dst.add(head);
        src = src.add(head);
    }
    len -= head;
    while len >= 64 {
        // SAFETY: 64 bytes remain in both ranges; `dst` is 16-byte aligned (streaming
        // stores need it), loads are unaligned; SSE2 is baseline on x86_64.
        unsafe {
            let s = src.cast::<__m128i>();
            let d = dst.cast::<__m128i>();
            let (a, b, c, e) = (
                _mm_loadu_si128(s),
                _mm_loadu_si128(s.add(1)),
                _mm_loadu_si128(s.add(2)),
                _mm_loadu_si128(s.add(3)),
            );
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            dst = dst.add(64);
            src = src.add(64);
        }
        len -= 64;
    }
    // SAFETY: the remaining `len` (< 64) bytes of both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// As [`stream_copy`], with 32-byte AVX stores, 128 bytes per iteration.
///
/// # Safety
/// As [`copy`]; the CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn stream_copy_avx(mut dst: *mut u8, mut src: *const u8, mut len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256};
    let head = dst.align_offset(32).min(len);
    // SAFETY: within the caller's ranges (head <= len).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        dst = dst.add(head);
        src = src.add(head);
    }
    len -= head;
    while len >= 128 {
        // SAFETY: 128 bytes remain in both ranges; `dst` is 32-byte aligned (streaming
        // stores need it), loads are unaligned; AVX is enabled for this function.
        unsafe {
            let s = src.cast::<__m256i>();
            let d = dst.cast::<__m256i>();
            let (a, b, c, e) = (
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            );
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
            dst = dst.add(128);
            src = src.add(128);
        }
        len -= 128;
    }
    // SAFETY: the remaining `len` (< 128) bytes of both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_and_length_copies_exactly() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 31 % 251) as u8 + 1).collect();
        for len in [0, 1, 15, 16, 63, 64, 65, 4095, 4096, 4097, 5000, 8191] {
            for src_off in [0, 1, 7, 16] {
                for dst_off in [0, 3, 8, 16] {
                    for stream in [false, true] {
                        let mut dst = vec![0u8; 9000];
                        // SAFETY: both ranges lie inside their vectors, which are distinct.
                        unsafe {
                            copy(
                                dst.as_mut_ptr().add(dst_off),
                                src.as_ptr().add(src_off),
                                len,
                                stream,
                            )
                        };
                        fence();
                        assert_eq!(&dst[dst_off..dst_off + len], &src[src_off..src_off + len]);
                        assert!(dst[..dst_off].iter().all(|&b| b == 0));
                        assert!(
                            dst[dst_off + len..].iter().all(|&b| b == 0),
                            "{len} {src_off} {dst_off}"
                        );
                    }
                }
            }
        }
    }
}
