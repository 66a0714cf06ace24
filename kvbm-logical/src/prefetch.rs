//! A software prefetch: asks the CPU to start loading the cache line at an address, without
//! waiting for it. A batch walk (a request's 64 hashes through the registry) issues its
//! loads a few steps ahead, so that their cache misses overlap instead of following one
//! another: on a server whose scheduler thread shares its caches with everything else, the
//! registry's slots and the block records are rarely cached.
//!
//! A prefetch is only a hint: it never faults, not even on an invalid address, and never
//! changes what a later load reads. Other architectures than x86-64 get no hint (the walks
//! are correct either way).
//!
//! Only `PREFETCHT0`, which every x86-64 CPU has: `PREFETCHW` (for lines about to be
//! written) is missing from Intel CPUs before Broadwell, and made no difference that this
//! project's benchmarks could measure.

#![allow(unsafe_code)]

/// Starts loading the cache line holding `*p` into every cache level.
#[inline(always)]
pub(crate) fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetch` (PREFETCHT0) is in SSE, which every x86-64 CPU has (the target's
    // baseline); it reads nothing architecturally and cannot fault. `p` is a reference
    // anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (p as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
