//! The store's synchronisation primitives: its lock and the per-slot reference counts.
//! `parking_lot`'s mutex and std's atomics normally; with the `shuttle` feature (model
//! checking only, never for production) shuttle's instrumented versions, so that the
//! concurrency models in `tests/shuttle_models.rs` explore interleavings at every lock
//! acquisition **and** at every lock-free reference-count operation.

#[cfg(not(feature = "shuttle"))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::atomic::{AtomicI64, AtomicU64};

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::atomic::{AtomicI64, AtomicU64};
#[cfg(feature = "shuttle")]
pub(crate) use shuttle_shim::{Mutex, MutexGuard};

#[cfg(feature = "shuttle")]
mod shuttle_shim {
    /// `parking_lot`'s API (a `lock` that returns the guard) over shuttle's mutex.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);

    pub(crate) type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(shuttle::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }
}
