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
//! [`prefetch_write`] asks for the line in exclusive state (`PREFETCHW`), for memory the walk
//! will write: a block record or owner count that another thread (a stack's worker) wrote
//! last is otherwise fetched shared first, and then again for ownership.

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

/// Starts loading the cache line holding `*p` for writing (`PREFETCHW`, which CPUs without
/// it execute as a no-op: the opcode lies in the range reserved for no-ops since the
/// Pentium Pro).
#[inline(always)]
pub(crate) fn prefetch_write<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetchw` reads nothing architecturally, writes nothing, cannot fault and
    // touches no register but its address operand (read only); the stack is not used.
    unsafe {
        core::arch::asm!(
            "prefetchw [{0}]",
            in(reg) (p as *const T),
            options(nostack, preserves_flags, readonly)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
