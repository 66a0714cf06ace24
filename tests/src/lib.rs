//! Cross-crate integration tests for kvbm (they live in `tests/tests/`, one file per scenario).

/// The README's usage example, compiled and run as a doctest so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExample;
