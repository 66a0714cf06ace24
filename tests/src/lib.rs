//! Cross-crate integration tests for kvbm (they live in `tests/tests/`, one file per scenario).
