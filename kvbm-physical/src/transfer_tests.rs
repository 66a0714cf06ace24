//! Unit tests of the transfer engine's pure checks (the integration tests drive the rest).

use super::*;

const DEV0: MemoryKind = MemoryKind::Device { ordinal: 0 };
const DEV1: MemoryKind = MemoryKind::Device { ordinal: 1 };

#[test]
fn device_memory_of_another_gpu_is_refused_with_both_ordinals() {
    use MemoryKind::{Pinned, System};
    for strategy in [
        Strategy::AsyncCopies,
        Strategy::BatchedDriver,
        Strategy::Kernel,
    ] {
        // An engine on device 0 against device 1's memory, on either side.
        assert_eq!(
            check_reach(strategy, Some(0), DEV1, Pinned),
            Err(TransferError::DeviceMismatch {
                side: Side::Source,
                layout: 1,
                engine: 0
            })
        );
        assert_eq!(
            check_reach(strategy, Some(1), DEV1, DEV0),
            Err(TransferError::DeviceMismatch {
                side: Side::Destination,
                layout: 0,
                engine: 1
            })
        );
        assert_eq!(
            check_reach(strategy, Some(2), DEV0, DEV1),
            Err(TransferError::DeviceMismatch {
                side: Side::Source,
                layout: 0,
                engine: 2
            })
        );
        // Its own device's memory, and host memory, are reachable.
        assert_eq!(check_reach(strategy, Some(1), DEV1, Pinned), Ok(()));
        assert_eq!(check_reach(strategy, Some(0), Pinned, DEV0), Ok(()));
        assert_eq!(check_reach(strategy, Some(0), DEV0, DEV0), Ok(()));
        // No CUDA device at all: unsupported, whatever the memory.
        assert!(matches!(
            check_reach(strategy, None, DEV0, System),
            Err(TransferError::Unsupported { .. })
        ));
    }
    // Kernels still cannot reach pageable memory, on the right device too.
    assert!(matches!(
        check_reach(Strategy::Kernel, Some(0), DEV0, System),
        Err(TransferError::Unsupported {
            strategy: Strategy::Kernel,
            ..
        })
    ));
}

#[test]
fn memcpy_reaches_host_memory_only() {
    use MemoryKind::{Pinned, System};
    for engine in [None, Some(0)] {
        assert_eq!(
            check_reach(Strategy::Memcpy, engine, System, Pinned),
            Ok(())
        );
        assert!(matches!(
            check_reach(Strategy::Memcpy, engine, DEV0, Pinned),
            Err(TransferError::Unsupported {
                strategy: Strategy::Memcpy,
                ..
            })
        ));
    }
}
