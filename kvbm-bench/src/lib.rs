//! `kvbm-bench`: how fast is kvbm, and how much cache hit would a given amount of memory and
//! eviction policy give? See `kvbm-bench --help`. The library holds the pieces the binary and
//! its tests share.

pub mod cycle;
pub mod disk;
pub mod remote;
pub mod replay;
pub mod report;
pub mod soak;
pub mod tiered;
pub mod trace;
pub mod transfer;
pub mod workload;
